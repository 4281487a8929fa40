//! Descriptors a process inherited at known numbers (fd 3 of a grain, the driver host's
//! fds 3-5). capnetd starts processes only through the sandbox spawner
//! (`crate::sandbox::spawn`); nothing here forks.

use std::os::fd::{OwnedFd, RawFd};

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
