//! The bridge's only `unsafe` code: two small process-level operations that need a raw
//! descriptor or a `pre_exec` hook.

use nix::fcntl::{FcntlArg, FdFlag, fcntl};
use nix::sys::signal::Signal;
use nix::unistd::{Pid, getppid};

/// Marks the grain API descriptor close-on-exec, so that the app the bridge starts does
/// not inherit it (the supervisor hands fd 3 over with `dup2`, which clears the flag).
/// Does nothing if fd 3 is not open.
pub fn cloexec_grain_api() -> nix::Result<()> {
    if std::fs::metadata(format!("/proc/self/fd/{}", capnet_schemas::grain::API_FD)).is_err() {
        return Ok(());
    }
    // SAFETY: fd 3 is open (checked just above) and, by the grain contract, belongs to this
    // process for its whole life; the borrow does not outlive this call and nothing closes
    // fd 3 concurrently (this runs before any other thread or task exists).
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(capnet_schemas::grain::API_FD) };
    fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)).map(|_| ())
}

/// Makes the child die with SIGKILL when the bridge dies, even by SIGKILL (the app runs in
/// its own process group, so a signal to the bridge's group would not reach it).
pub fn die_with_parent(cmd: &mut tokio::process::Command) {
    let parent = Pid::this();
    // SAFETY: the hook runs in the child between fork and exec; it only calls prctl(2),
    // getppid(2) and kill(2) through nix, which are async-signal-safe, allocates nothing
    // and touches no lock.
    unsafe {
        cmd.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)?;
            // The parent may have died before the death signal was armed.
            if getppid() != parent {
                let _ = nix::sys::signal::kill(Pid::this(), Signal::SIGKILL);
            }
            Ok(())
        });
    }
}
