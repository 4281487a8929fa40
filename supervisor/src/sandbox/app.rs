//! Stage 4: the app process, forked by the init, confined step by step and then
//! replaced by the sandboxed program with `execve`.
//!
//! Order matters: new session; default signal mask; `PR_SET_PDEATHSIG`; the fd table
//! (stdin `/dev/null`, stdout/stderr the log, fd 3 the RPC socket, the driver host's
//! extra fds, nothing else); rlimits (core 0, nofile, fsize); every capability dropped
//! except granted ambient ones; `no_new_privs`; not dumpable; and the seccomp filter
//! **last**, so that none of the preceding steps has to be allowed by it. Then exec.
//!
//! Threat answered: inherited authority. Whatever the supervisor, helper or init held —
//! fds, capabilities, a controlling terminal, a session, a core-dumpable image — must not
//! reach the program.

use std::ffi::CString;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;

use nix::sys::resource::{Resource, setrlimit};

use super::wire::{ErrorPipe, WireSpec};
use super::{caps, seccomp};
use crate::sys;

/// Exit code of the app stage when its setup or the exec failed.
pub const EXIT_EXEC_FAILED: i32 = 127;

fn fail(err: &ErrorPipe, stage: &str, message: impl std::fmt::Display) -> ! {
    err.report(stage, message);
    sys::exit_immediately(EXIT_EXEC_FAILED)
}

fn cstring(s: &[u8]) -> Result<CString, String> {
    CString::new(s).map_err(|_| format!("{:?} contains a NUL byte", String::from_utf8_lossy(s)))
}

/// Runs the app stage. Never returns.
pub fn run(spec: &WireSpec, err: &ErrorPipe) -> ! {
    if let Err(e) = nix::unistd::setsid() {
        fail(err, "app: setsid", e);
    }
    if let Err(e) = sys::set_signal_mask(&[]) {
        fail(err, "app: signal mask", e);
    }
    if let Err(e) = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL) {
        fail(err, "app: pdeathsig", e);
    }
    // Build argv/envp before the fd table changes (no allocation failure paths later).
    let argv0 = match &spec.program_path {
        Some(p) => p.as_os_str().as_bytes().to_vec(),
        None => spec.id.as_bytes().to_vec(),
    };
    let argv: Result<Vec<CString>, String> = std::iter::once(argv0.as_slice())
        .chain(spec.args.iter().map(|a| a.as_bytes()))
        .map(cstring)
        .collect();
    let envp: Result<Vec<CString>, String> = spec
        .env
        .iter()
        .map(|(k, v)| cstring(format!("{k}={v}").as_bytes()))
        .collect();
    let (argv, envp) = match (argv, envp) {
        (Ok(a), Ok(e)) => (a, e),
        (Err(e), _) | (_, Err(e)) => fail(err, "app: arguments", e),
    };
    let keep_caps = match caps::parse_names(&spec.ambient_caps) {
        Ok(c) => c,
        Err(name) => fail(
            err,
            "app: capabilities",
            format!("unknown capability {name}"),
        ),
    };

    let null = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
    {
        Ok(f) => f,
        Err(e) => fail(err, "app: open /dev/null", e),
    };
    let out: RawFd = spec.log_fd.unwrap_or(null.as_raw_fd());
    let mut targets = vec![(null.as_raw_fd(), 0), (out, 1), (out, 2), (spec.rpc_fd, 3)];
    targets.extend(spec.extra_fds.iter().copied());
    // Slot 0: the error pipe (-1 if it is closed), slot 1: the program image (or -1).
    let keep = [err.raw().unwrap_or(-1), spec.program_fd.unwrap_or(-1)];
    let keep: Vec<RawFd> = keep.into_iter().filter(|&fd| fd >= 0).collect();
    let kept = match sys::arrange_fds(&targets, &keep) {
        Ok(k) => k,
        Err(e) => fail(err, "app: arrange fds", e),
    };
    let (err_fd, program_fd) = match (err.raw(), spec.program_fd) {
        (Some(_), Some(_)) => (kept.first().copied(), kept.get(1).copied()),
        (Some(_), None) => (kept.first().copied(), None),
        (None, Some(_)) => (None, kept.first().copied()),
        (None, None) => (None, None),
    };
    // `err` now refers to a closed number; use the moved copy.
    let err = ErrorPipe::from_inherited(err_fd.unwrap_or(-1));
    std::mem::forget(null); // its number was closed (or reused as fd 0) by arrange_fds

    for (res, value) in [
        (Resource::RLIMIT_CORE, 0),
        (Resource::RLIMIT_NOFILE, spec.nofile),
        (Resource::RLIMIT_FSIZE, spec.fsize_bytes),
    ] {
        if let Err(e) = setrlimit(res, value, value) {
            fail(&err, "app: rlimit", format!("{res:?}={value}: {e}"));
        }
    }
    if let Err(e) = caps::drop_all_except(&keep_caps) {
        fail(&err, "app: drop capabilities", e);
    }
    if let Err(e) = nix::sys::prctl::set_no_new_privs() {
        fail(&err, "app: no_new_privs", e);
    }
    if let Err(e) = nix::sys::prctl::set_dumpable(false) {
        fail(&err, "app: not dumpable", e);
    }
    if let Err(e) = seccomp::load_base() {
        fail(&err, "app: seccomp", e);
    }
    let argv_refs: Vec<&std::ffi::CStr> = argv.iter().map(|c| c.as_c_str()).collect();
    let envp_refs: Vec<&std::ffi::CStr> = envp.iter().map(|c| c.as_c_str()).collect();
    let e = match (program_fd, &spec.program_path) {
        (Some(fd), _) => sys::fexecve(fd, &argv_refs, &envp_refs),
        (None, Some(_)) => match nix::unistd::execve(&argv[0], &argv_refs, &envp_refs) {
            Err(e) => std::io::Error::from(e),
            Ok(never) => match never {},
        },
        (None, None) => std::io::Error::other("no program"),
    };
    fail(
        &err,
        "app: exec",
        format!("{}: {e}", String::from_utf8_lossy(&argv0)),
    )
}
