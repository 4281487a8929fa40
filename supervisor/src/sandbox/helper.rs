//! Stage 2: the `capnet-sandbox` setup helper (single-threaded, root on the host).
//!
//! The supervisor execs this binary from a sealed memfd copy ([`super::HelperImage`]),
//! so `/proc/<pid>/exe` of the helper and of the init it clones points at an immutable
//! anonymous file, never at a file on disk that a sandboxed process could rewrite
//! (runc's CVE-2019-5736).
//!
//! Steps: read the spec (JSON) from the fd named on the command line; clear the
//! supplementary groups; join the sandbox's cgroups; block the signals it will forward;
//! `clone()` the init into new namespaces ([`super::namespaces::clone_flags`]); write the
//! id maps; release the init by writing one byte to the sync pipe (whose write end stays
//! open as the init's lifeline); then forward SIGTERM/SIGINT/SIGHUP to the init and, when
//! the init exits, exit with the app's status — the same exit code, or death by the same
//! signal — read from the status pipe the init writes before it exits.
//!
//! Exit codes of the helper itself when setup fails: [`EXIT_SETUP_FAILED`] (details on
//! the error pipe).

use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};

use nix::sys::signal::{Signal, kill};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

use super::wire::{ErrorPipe, WireSpec};
use super::{init, namespaces};
use crate::sys;

/// Exit code of the helper when setup failed before the app ran.
pub const EXIT_SETUP_FAILED: i32 = 125;

/// Signals the helper and the init forward to the next stage.
pub(crate) const FORWARDED: [libc::c_int; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP];

fn sigset(signals: &[libc::c_int]) -> nix::sys::signal::SigSet {
    let mut set = nix::sys::signal::SigSet::empty();
    for &s in signals {
        if let Ok(sig) = Signal::try_from(s) {
            set.add(sig);
        }
    }
    set
}

/// Blocks `signals` and returns a signalfd for them.
pub(crate) fn signalfd_for(signals: &[libc::c_int]) -> std::io::Result<SignalFd> {
    sys::set_signal_mask(signals)?;
    SignalFd::with_flags(&sigset(signals), SfdFlags::SFD_CLOEXEC).map_err(std::io::Error::from)
}

/// The exit status of the app as the init reports it: 8 bytes (kind, value).
pub(crate) fn encode_status(status: sys::ChildStatus) -> [u8; 8] {
    let (kind, value) = match status {
        sys::ChildStatus::Exited(c) => (0u32, c),
        sys::ChildStatus::Signaled(s) => (1u32, s),
    };
    let mut out = [0u8; 8];
    out[..4].copy_from_slice(&kind.to_le_bytes());
    out[4..].copy_from_slice(&value.to_le_bytes());
    out
}

fn decode_status(b: &[u8]) -> Option<sys::ChildStatus> {
    if b.len() != 8 {
        return None;
    }
    let kind = u32::from_le_bytes(b[..4].try_into().ok()?);
    let value = i32::from_le_bytes(b[4..].try_into().ok()?);
    match kind {
        0 => Some(sys::ChildStatus::Exited(value)),
        1 => Some(sys::ChildStatus::Signaled(value)),
        _ => None,
    }
}

/// Entry point of the `capnet-sandbox` binary. Returns the process exit code (or does
/// not return when it mirrors a death signal).
pub fn main(args: &[String]) -> i32 {
    let spec_fd = match args {
        [_, flag, n] if flag == "--spec-fd" => n.parse::<i32>().ok(),
        _ => None,
    };
    let Some(spec_fd) = spec_fd else {
        eprintln!("usage: capnet-sandbox --spec-fd N  (started by capnetd only)");
        return 2;
    };
    let spec = match read_spec(spec_fd) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("capnet-sandbox: cannot read the spec from fd {spec_fd}: {e}");
            return EXIT_SETUP_FAILED;
        }
    };
    let mut err = ErrorPipe::from_inherited(spec.error_fd);
    match run(&spec, &mut err) {
        Ok(code) => code,
        Err((stage, message)) => {
            err.report(stage, message);
            EXIT_SETUP_FAILED
        }
    }
}

fn read_spec(fd: i32) -> Result<WireSpec, String> {
    let owned = sys::owned_from_inherited(fd).map_err(|e| e.to_string())?;
    let mut text = Vec::new();
    std::fs::File::from(owned)
        .read_to_end(&mut text)
        .map_err(|e| e.to_string())?;
    serde_json::from_slice(&text).map_err(|e| e.to_string())
}

type StageResult<T> = Result<T, (&'static str, String)>;

fn stage<T, E: std::fmt::Display>(name: &'static str, r: Result<T, E>) -> StageResult<T> {
    r.map_err(|e| (name, e.to_string()))
}

fn run(spec: &WireSpec, err: &mut ErrorPipe) -> StageResult<i32> {
    stage(
        "helper: set name",
        nix::sys::prctl::set_name(c"capnet-sandbox"),
    )?;
    // A helper core dump could contain the spec; nothing in it is for anyone else.
    stage(
        "helper: rlimit core",
        nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_CORE, 0, 0),
    )?;
    stage("helper: not dumpable", nix::sys::prctl::set_dumpable(false))?;
    // Supplementary groups can never be dropped inside the sandbox (setgroups is
    // denied there), so drop root's now.
    stage("helper: setgroups", nix::unistd::setgroups(&[]))?;
    for procs in &spec.cgroup_procs {
        let pid = std::process::id().to_string();
        stage(
            "helper: join cgroup",
            std::fs::write(procs, &pid).map_err(|e| format!("{}: {e}", procs.display())),
        )?;
    }
    let (sync_r, sync_w) = stage(
        "helper: pipe",
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC),
    )?;
    let (status_r, status_w) = stage(
        "helper: pipe",
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC),
    )?;
    let mut watched = FORWARDED.to_vec();
    watched.push(libc::SIGCHLD);
    let sfd = stage("helper: signalfd", signalfd_for(&watched))?;

    let flags = namespaces::clone_flags(spec.role);
    match stage("helper: clone", sys::clone_single_threaded(flags))? {
        sys::Forked::Child => {
            drop(sync_w);
            drop(status_r);
            drop(sfd);
            init::run(spec, err, sync_r, status_w)
        }
        sys::Forked::Parent(child) => {
            drop(sync_r);
            drop(status_w);
            // The init has its own copies; the app's fds must not stay open here.
            spec.close_app_fds();
            parent(spec, err, child, sync_w, status_r, sfd)
        }
    }
}

fn parent(
    spec: &WireSpec,
    err: &mut ErrorPipe,
    child: libc::pid_t,
    sync_w: OwnedFd,
    status_r: OwnedFd,
    sfd: SignalFd,
) -> StageResult<i32> {
    let child_pid = Pid::from_raw(child);
    if let Err(e) = namespaces::write_id_maps(child, spec.host_uid, spec.host_gid) {
        let _ = kill(child_pid, Signal::SIGKILL);
        let _ = waitpid(child_pid, None);
        return Err(("helper: id maps", e.to_string()));
    }
    if let Err(e) = nix::unistd::write(sync_w.as_fd(), b"g") {
        let _ = kill(child_pid, Signal::SIGKILL);
        let _ = waitpid(child_pid, None);
        return Err(("helper: release init", e.to_string()));
    }
    // From here on the init and the app report their own errors.
    err.close();
    // sync_w stays open until we exit: the init's lifeline.
    let init_status = loop {
        let Ok(Some(info)) = sfd.read_signal() else {
            continue;
        };
        let signo = info.ssi_signo as libc::c_int;
        if FORWARDED.contains(&signo) {
            if let Ok(sig) = Signal::try_from(signo) {
                let _ = kill(child_pid, sig);
            }
            continue;
        }
        // SIGCHLD: only the init is our child.
        match waitpid(child_pid, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(_, code)) => break sys::ChildStatus::Exited(code),
            Ok(WaitStatus::Signaled(_, sig, _)) => break sys::ChildStatus::Signaled(sig as i32),
            Ok(_) => continue,
            Err(nix::Error::ECHILD) => break sys::ChildStatus::Exited(EXIT_SETUP_FAILED),
            Err(_) => continue,
        }
    };
    drop(sync_w);
    let mut buf = [0u8; 8];
    let n = nix::unistd::read(status_r.as_fd(), &mut buf).unwrap_or(0);
    let status = decode_status(&buf[..n]).unwrap_or(init_status);
    Ok(mirror(status))
}

/// Exits (or dies) the way the app did.
fn mirror(status: sys::ChildStatus) -> i32 {
    match status {
        sys::ChildStatus::Exited(code) => code,
        sys::ChildStatus::Signaled(sig) => {
            sys::reraise_default(sig);
            128 + sig
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The init→helper status encoding round-trips, so the helper can mirror the app.
    #[test]
    fn status_roundtrip() {
        for s in [
            sys::ChildStatus::Exited(0),
            sys::ChildStatus::Exited(42),
            sys::ChildStatus::Signaled(9),
        ] {
            assert_eq!(decode_status(&encode_status(s)), Some(s));
        }
        assert_eq!(decode_status(&[1, 2]), None);
    }
}
