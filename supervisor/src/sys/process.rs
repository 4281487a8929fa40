//! Starting child processes with chosen file descriptors and a parent-death signal.
//!
//! The work between `fork` and `exec` is limited to async-signal-safe calls: `dup2`,
//! `prctl`, `getppid`, `setsid`.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use nix::fcntl::{FcntlArg, fcntl};

/// The descriptors a child gets: each `(fd, number)` appears at `number` in the child.
pub struct ChildFds {
    /// Duplicates of the caller's descriptors, above any target number, close-on-exec.
    high: Vec<(OwnedFd, RawFd)>,
}

impl ChildFds {
    /// Prepares `fds` for [`configure`]. Takes ownership; the child gets copies.
    pub fn new(fds: Vec<(OwnedFd, RawFd)>) -> io::Result<Self> {
        let mut high = Vec::with_capacity(fds.len());
        for (fd, target) in fds {
            let dup = fcntl(&fd, FcntlArg::F_DUPFD_CLOEXEC(100)).map_err(io::Error::from)?;
            // SAFETY: F_DUPFD_CLOEXEC returned a new descriptor that nothing else owns.
            let dup = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(dup) };
            high.push((dup, target));
        }
        Ok(Self { high })
    }
}

/// Arranges for the command's child to receive `fds` at their target numbers, to start a
/// new session, and to be killed with SIGKILL when the spawning thread's process dies
/// (spawn from the daemon's main thread, which lives as long as the daemon).
pub fn configure(cmd: &mut tokio::process::Command, fds: ChildFds, new_session: bool) {
    let parent = std::process::id() as libc::pid_t;
    let pairs: Vec<(RawFd, RawFd)> = fds.high.iter().map(|(f, t)| (f.as_raw_fd(), *t)).collect();
    // The duplicates must stay open until the child has copied them; `fds` moves into the
    // closure, which lives in the Command until it is dropped after spawning.
    let keep = fds;
    // SAFETY: the closure runs in the child between fork and exec and only makes
    // async-signal-safe calls (prctl, getppid, setsid, dup2) on descriptors that are open in
    // the parent at fork time (kept alive by `keep`), allocating nothing.
    unsafe {
        cmd.pre_exec(move || {
            let _ = &keep;
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            if libc::getppid() != parent {
                // The parent died before the death signal was armed.
                libc::_exit(1);
            }
            if new_session && libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            for &(src, target) in &pairs {
                // dup2 clears close-on-exec on the new descriptor.
                if libc::dup2(src, target) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

/// Descriptors below 64 already claimed by [`inherited_fd`].
static CLAIMED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Takes ownership of a descriptor this process inherited at a known number (fd 3 of a
/// grain, the driver host's fds 3-5). Returns `None` if it is not open or was already
/// claimed, so no descriptor can end up owned twice.
pub fn inherited_fd(fd: RawFd) -> Option<OwnedFd> {
    if !(0..64).contains(&fd) {
        return None;
    }
    let bit = 1u64 << fd;
    if CLAIMED.fetch_or(bit, std::sync::atomic::Ordering::SeqCst) & bit != 0 {
        return None;
    }
    // SAFETY: F_GETFD only queries flags; an unopened number yields EBADF.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return None;
    }
    // SAFETY: the descriptor is open (checked above), was inherited by contract with the
    // parent, and the CLAIMED bit guarantees this is the only OwnedFd made for it.
    Some(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) })
}
