//! Stage 3: the init, PID 1 of the sandbox's pid namespace.
//!
//! Mechanism: the first process of a pid namespace is its init: orphans are reparented
//! to it, it must reap them, it receives from inside the namespace only the signals it
//! has handlers for, and when it exits the kernel SIGKILLs everything else in the
//! namespace. That last property is what makes teardown reliable: killing the init kills
//! the sandbox.
//!
//! Steps: wait for the helper's go (the id maps are written); open the bind sources
//! ([`super::rootfs::open_sources`], still with the helper's host identity); switch to uid/gid 1000
//! keeping its namespace capabilities (`PR_SET_KEEPCAPS`); arm `PR_SET_PDEATHSIG`
//! (cleared by the uid change, so armed after it) and check the helper's lifeline pipe,
//! so that the sandbox dies with the helper (and the helper with the supervisor);
//! hostname, loopback, the new root ([`super::rootfs`]); fork the app
//! ([`super::app`]); then lock itself down (no capabilities, no_new_privs, the same
//! seccomp filter, not dumpable), report ready, and loop: reap every child, forward
//! SIGTERM/SIGINT/SIGHUP to the app, and when the app exits kill whatever is left in the
//! namespace and exit with the app's status (also written to the status pipe, so the
//! helper can reproduce a death by signal exactly).
//!
//! Threat answered: zombies and stray processes (a grain that daemonises must not
//! survive its teardown) and a supervisor crash leaving orphaned sandboxes behind.

use std::os::fd::{AsFd, OwnedFd};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{Gid, Pid, Uid};

use super::helper::{FORWARDED, encode_status, signalfd_for};
use super::wire::{ErrorPipe, WireSpec};
use super::{Role, SANDBOX_UID, app, caps, namespaces, rootfs, seccomp};
use crate::sys;

/// Exit code of the init when its own setup failed.
pub const EXIT_INIT_FAILED: i32 = 126;

fn fail(err: &ErrorPipe, stage: &str, message: impl std::fmt::Display) -> ! {
    err.report(stage, message);
    sys::exit_immediately(EXIT_INIT_FAILED)
}

/// Runs the init. Never returns.
pub fn run(spec: &WireSpec, err: &mut ErrorPipe, sync_r: OwnedFd, status_w: OwnedFd) -> ! {
    // Wait for the helper to write our id maps.
    let mut go = [0u8; 1];
    match nix::unistd::read(sync_r.as_fd(), &mut go) {
        Ok(1) => {}
        _ => sys::exit_immediately(EXIT_INIT_FAILED),
    }
    // Open the bind sources with the helper's file-system identity, before the switch.
    let sources = match rootfs::open_sources(spec) {
        Ok(s) => s,
        Err(e) => fail(err, "init: root filesystem", e),
    };
    if let Err(e) = become_sandbox_user() {
        fail(err, "init: switch to uid 1000", e);
    }
    if let Err(e) = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL) {
        fail(err, "init: pdeathsig", e);
    }
    // The helper may have died before PDEATHSIG was armed: its write end would be closed.
    let mut fds = [PollFd::new(sync_r.as_fd(), PollFlags::POLLIN)];
    if poll(&mut fds, PollTimeout::ZERO).is_ok_and(|n| n > 0) {
        sys::exit_immediately(EXIT_INIT_FAILED);
    }
    let _ = nix::sys::prctl::set_name(c"capnet-init");
    if let Err(e) = namespaces::set_hostname(&spec.id) {
        fail(err, "init: hostname", e);
    }
    if spec.role == Role::Grain
        && let Err(e) = namespaces::loopback_up()
    {
        fail(err, "init: loopback", e);
    }
    if let Err(e) = rootfs::build(spec, sources) {
        fail(err, "init: root filesystem", e);
    }
    if let Err(e) = nix::sys::prctl::set_dumpable(false) {
        fail(err, "init: not dumpable", e);
    }
    let mut watched = FORWARDED.to_vec();
    watched.push(libc::SIGCHLD);
    let sfd = match signalfd_for(&watched) {
        Ok(s) => s,
        Err(e) => fail(err, "init: signalfd", e),
    };
    let app_pid = match sys::fork_single_threaded() {
        Ok(sys::Forked::Child) => app::run(spec, err),
        Ok(sys::Forked::Parent(pid)) => Pid::from_raw(pid),
        Err(e) => fail(err, "init: fork app", e),
    };
    // The app has its own copies of its fds; ours would hide its closing them.
    spec.close_app_fds();
    drop(sync_r);
    if let Err(e) = lock_down() {
        let _ = kill(app_pid, Signal::SIGKILL);
        fail(err, "init: lock down", e);
    }
    err.ready();
    err.close();

    loop {
        let Ok(Some(info)) = sfd.read_signal() else {
            continue;
        };
        let signo = info.ssi_signo as libc::c_int;
        if FORWARDED.contains(&signo) {
            if let Ok(sig) = Signal::try_from(signo) {
                let _ = kill(app_pid, sig);
            }
            continue;
        }
        // SIGCHLD: reap everything that has exited.
        loop {
            match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) if pid == app_pid => {
                    finish(&status_w, sys::ChildStatus::Exited(code))
                }
                Ok(WaitStatus::Signaled(pid, sig, _)) if pid == app_pid => {
                    finish(&status_w, sys::ChildStatus::Signaled(sig as i32))
                }
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                Ok(_) => continue,
            }
        }
    }
}

/// The app is gone: kill the rest of the namespace, report, exit.
fn finish(status_w: &OwnedFd, status: sys::ChildStatus) -> ! {
    // From PID 1, kill(-1) reaches every other process of the namespace.
    let _ = kill(Pid::from_raw(-1), Signal::SIGKILL);
    let _ = nix::unistd::write(status_w.as_fd(), &encode_status(status));
    let code = match status {
        sys::ChildStatus::Exited(c) => c,
        sys::ChildStatus::Signaled(s) => 128 + s,
    };
    sys::exit_immediately(code)
}

/// setresgid/setresuid to 1000 while keeping the namespace capabilities needed to build
/// the mount tree (they are dropped before anything untrusted runs).
fn become_sandbox_user() -> Result<(), String> {
    nix::sys::prctl::set_keepcaps(true).map_err(|e| format!("keepcaps: {e}"))?;
    let gid = Gid::from_raw(SANDBOX_UID);
    let uid = Uid::from_raw(SANDBOX_UID);
    nix::unistd::setresgid(gid, gid, gid).map_err(|e| format!("setresgid: {e}"))?;
    nix::unistd::setresuid(uid, uid, uid).map_err(|e| format!("setresuid: {e}"))?;
    nix::sys::prctl::set_keepcaps(false).map_err(|e| format!("keepcaps: {e}"))?;
    caps::raise_effective().map_err(|e| e.to_string())?;
    Ok(())
}

fn lock_down() -> Result<(), String> {
    caps::drop_all_except(&[]).map_err(|e| e.to_string())?;
    nix::sys::prctl::set_no_new_privs().map_err(|e| format!("no_new_privs: {e}"))?;
    seccomp::load_base().map_err(|e| e.to_string())?;
    Ok(())
}
