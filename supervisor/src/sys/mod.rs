//! The only place in the supervisor that issues raw system calls or contains `unsafe`.
//!
//! Everything here is a small, documented wrapper whose safety argument is local: the
//! callers in [`crate::sandbox`] stay entirely safe Rust. Wrappers that are only sound in
//! a single-threaded process ([`fork_single_threaded`], [`clone_single_threaded`]) check
//! that precondition at run time instead of pushing an `unsafe` contract onto callers.
//!
//! Threat answered: a mistake in a raw syscall (a wrong argument type, an fd used after
//! close, a fork in a multi-threaded process) is a memory-safety or sandbox-escape bug;
//! keeping all of them in one short file makes them reviewable.

pub mod plugin;
pub mod process;

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::Command;

/// Returns `Err(last_os_error)` when a libc call returned -1.
fn cvt(ret: libc::c_long) -> io::Result<libc::c_long> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Number of threads of the calling process, from `/proc/self/task`.
pub fn thread_count() -> io::Result<usize> {
    Ok(std::fs::read_dir("/proc/self/task")?.count())
}

fn ensure_single_threaded(what: &str) -> io::Result<()> {
    let n = thread_count()?;
    if n != 1 {
        return Err(io::Error::other(format!(
            "{what} requires a single-threaded process, found {n} threads"
        )));
    }
    Ok(())
}

/// Result of a fork-like call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forked {
    /// We are the child.
    Child,
    /// We are the parent; the child's pid (as seen from our pid namespace).
    Parent(libc::pid_t),
}

/// `clone(flags | SIGCHLD)` with fork semantics (no new stack: the child continues on a
/// copy of the parent's stack, exactly like `fork`). `flags` are `CLONE_NEW*` flags.
pub fn clone_single_threaded(flags: libc::c_int) -> io::Result<Forked> {
    ensure_single_threaded("clone")?;
    // SAFETY: the raw clone syscall with a NULL stack behaves like fork(2): the child gets a
    // copy-on-write copy of the address space and resumes here. The process is
    // single-threaded (checked above), so no lock can be held by another thread at the time
    // of the copy, and glibc keeps no cached pid since 2.25. The argument order for x86_64
    // is (flags, stack, parent_tid, child_tid, tls); the pointers are NULL and unused because
    // no CLONE_*SETTID / CLONE_SETTLS flag is passed.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_clone,
            (flags | libc::SIGCHLD) as libc::c_ulong,
            std::ptr::null_mut::<libc::c_void>(),
            std::ptr::null_mut::<libc::c_int>(),
            std::ptr::null_mut::<libc::c_int>(),
            0 as libc::c_ulong,
        )
    };
    match cvt(ret)? {
        0 => Ok(Forked::Child),
        pid => Ok(Forked::Parent(pid as libc::pid_t)),
    }
}

/// `fork()` in a process that is known to be single-threaded.
pub fn fork_single_threaded() -> io::Result<Forked> {
    clone_single_threaded(0)
}

/// `_exit(code)`: leaves without running destructors or atexit handlers (used in forked
/// children, which must not flush the parent's buffers twice).
pub fn exit_immediately(code: i32) -> ! {
    // SAFETY: _exit never returns and has no memory-safety preconditions.
    unsafe { libc::_exit(code) }
}

/// `pidfd_open(pid, 0)`.
pub fn pidfd_open(pid: libc::pid_t) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes plain integers and returns a new fd or -1.
    let fd = cvt(unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0 as libc::c_uint) })?;
    // SAFETY: on success the kernel returned a fresh fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// `pidfd_send_signal(pidfd, sig, NULL, 0)`.
pub fn pidfd_send_signal(pidfd: BorrowedFd<'_>, sig: libc::c_int) -> io::Result<()> {
    // SAFETY: the fd is borrowed and therefore open for the duration of the call; the
    // siginfo pointer is NULL, which the kernel accepts (it fills in a default siginfo).
    cvt(unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            sig,
            std::ptr::null_mut::<libc::siginfo_t>(),
            0 as libc::c_uint,
        )
    })?;
    Ok(())
}

/// How a waited-for child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChildStatus {
    /// `exit(code)`.
    Exited(i32),
    /// Killed by this signal.
    Signaled(i32),
}

/// `waitid(P_PIDFD, pidfd, WEXITED [| WNOHANG])`: reaps the child behind `pidfd`.
/// Returns `None` with `nohang` when it has not exited yet.
pub fn waitid_pidfd(pidfd: BorrowedFd<'_>, nohang: bool) -> io::Result<Option<ChildStatus>> {
    const P_PIDFD: libc::idtype_t = 3;
    let mut flags = libc::WEXITED;
    if nohang {
        flags |= libc::WNOHANG;
    }
    // SAFETY: siginfo_t is plain old data, all-zero is a valid value.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: `info` is a valid, writable siginfo_t; the fd is borrowed (open).
        let ret =
            unsafe { libc::waitid(P_PIDFD, pidfd.as_raw_fd() as libc::id_t, &mut info, flags) };
        if ret == -1 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        break;
    }
    // SAFETY: waitid filled `info` for a child event (or left si_pid 0 with WNOHANG);
    // si_pid/si_status are valid to read for SIGCHLD siginfo.
    let (pid, status) = unsafe { (info.si_pid(), info.si_status()) };
    if pid == 0 {
        return Ok(None);
    }
    Ok(Some(match info.si_code {
        libc::CLD_EXITED => ChildStatus::Exited(status),
        _ => ChildStatus::Signaled(status),
    }))
}

/// `close_range(first, u32::MAX, 0)`: closes every fd from `first` up.
pub fn close_fds_from(first: RawFd) -> io::Result<()> {
    // SAFETY: closing fds is memory safe; the callers (a freshly forked child about to
    // exec, or the helper at start) own every fd in the process and hold no borrowed
    // handles to the closed ones.
    cvt(unsafe { libc::syscall(libc::SYS_close_range, first as libc::c_uint, u32::MAX, 0) })?;
    Ok(())
}

/// Rearranges the fd table of a process that is about to exec:
/// every `(src, dst)` in `targets` ends up as a non-close-on-exec `dst`; every fd in
/// `keep` is moved to a fresh number above all targets and stays close-on-exec (their new
/// numbers are returned, in order); every other fd is closed.
pub fn arrange_fds(targets: &[(RawFd, RawFd)], keep: &[RawFd]) -> io::Result<Vec<RawFd>> {
    let max_dst = targets.iter().map(|t| t.1).max().unwrap_or(2).max(2);
    let max_any = targets
        .iter()
        .flat_map(|t| [t.0, t.1])
        .chain(keep.iter().copied())
        .max()
        .unwrap_or(2);
    let high = (max_any + 1).max(max_dst + 1 + keep.len() as RawFd);
    let dup_high = |fd: RawFd| -> io::Result<RawFd> {
        // SAFETY: F_DUPFD_CLOEXEC only creates a new descriptor.
        Ok(cvt(unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, high) } as libc::c_long)? as RawFd)
    };
    let tmp_targets = targets
        .iter()
        .map(|&(src, dst)| Ok((dup_high(src)?, dst)))
        .collect::<io::Result<Vec<_>>>()?;
    let tmp_keep = keep
        .iter()
        .map(|&fd| dup_high(fd))
        .collect::<io::Result<Vec<_>>>()?;
    for &(tmp, dst) in &tmp_targets {
        // SAFETY: dup3 atomically replaces `dst`; tmp >= high > dst so they differ.
        cvt(unsafe { libc::dup3(tmp, dst, 0) } as libc::c_long)?;
    }
    let mut new_keep = Vec::with_capacity(keep.len());
    for (i, &tmp) in tmp_keep.iter().enumerate() {
        let dst = max_dst + 1 + i as RawFd;
        // SAFETY: as above; dst < high <= tmp.
        cvt(unsafe { libc::dup3(tmp, dst, libc::O_CLOEXEC) } as libc::c_long)?;
        new_keep.push(dst);
    }
    for fd in 0..=max_dst {
        if !targets.iter().any(|t| t.1 == fd) {
            // SAFETY: closing an fd we own (or EBADF if it was not open, which is ignored).
            unsafe { libc::close(fd) };
        }
    }
    close_fds_from(max_dst + 1 + keep.len() as RawFd)?;
    Ok(new_keep)
}

/// Clears `FD_CLOEXEC` on `fd` so that it survives the next exec.
/// Async-signal-safe (used between fork and exec).
fn clear_cloexec_raw(fd: RawFd) -> io::Result<()> {
    // SAFETY: F_SETFD with 0 only changes the fd's close-on-exec flag.
    cvt(unsafe { libc::fcntl(fd, libc::F_SETFD, 0) } as libc::c_long)?;
    Ok(())
}

/// Configures `cmd` so that the child (between fork and exec, with only async-signal-safe
/// calls): gets `PR_SET_PDEATHSIG(SIGKILL)`, exits if the parent already died (getppid
/// differs from `parent_pid`), and inherits the listed fds (their close-on-exec flag is
/// cleared in the child only; the parent's copies stay close-on-exec).
pub fn command_pre_exec(cmd: &mut Command, parent_pid: libc::pid_t, inherit: Vec<RawFd>) {
    let hook = move || -> io::Result<()> {
        // SAFETY: prctl(PR_SET_PDEATHSIG) takes plain integers.
        let rc = unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) };
        cvt(rc as libc::c_long)?;
        // SAFETY: getppid has no preconditions.
        if unsafe { libc::getppid() } != parent_pid {
            // The supervisor died before PDEATHSIG was armed.
            exit_immediately(1);
        }
        for &fd in &inherit {
            clear_cloexec_raw(fd)?;
        }
        Ok(())
    };
    // SAFETY: the hook runs in the forked child before exec and calls only prctl, getppid,
    // fcntl and _exit, all async-signal-safe; it allocates nothing (the Vec was allocated
    // in the parent and is only read).
    unsafe {
        cmd.pre_exec(hook);
    }
}

/// Brings the loopback interface `lo` of the current network namespace up
/// (`SIOCSIFFLAGS` with `IFF_UP | IFF_RUNNING`).
pub fn loopback_up() -> io::Result<()> {
    // SAFETY: socket() takes integers and returns a new fd.
    let sock = cvt(
        unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) }
            as libc::c_long,
    )? as RawFd;
    // SAFETY: the fd was just created and is owned only here.
    let sock = unsafe { OwnedFd::from_raw_fd(sock) };
    // SAFETY: ifreq is plain old data; zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: `req` is a valid ifreq with a NUL-terminated name; SIOCGIFFLAGS writes the
    // union's flags member.
    cvt(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) } as libc::c_long)?;
    // SAFETY: reading/writing the `ifru_flags` member of the union the kernel just filled.
    unsafe {
        req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    }
    // SAFETY: as above, SIOCSIFFLAGS reads the ifreq.
    cvt(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) } as libc::c_long)?;
    Ok(())
}

/// Execs the program behind `fd` (`execveat(fd, "", argv, envp, AT_EMPTY_PATH)`).
/// Only returns on error.
pub fn fexecve(fd: RawFd, argv: &[&CStr], envp: &[&CStr]) -> io::Error {
    let mut argv_ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    argv_ptrs.push(std::ptr::null());
    let mut envp_ptrs: Vec<*const libc::c_char> = envp.iter().map(|a| a.as_ptr()).collect();
    envp_ptrs.push(std::ptr::null());
    // SAFETY: argv/envp are NULL-terminated arrays of pointers to NUL-terminated strings
    // that outlive the call (borrowed from the caller); "" is a valid C string.
    unsafe {
        libc::syscall(
            libc::SYS_execveat,
            fd,
            c"".as_ptr(),
            argv_ptrs.as_ptr(),
            envp_ptrs.as_ptr(),
            libc::AT_EMPTY_PATH,
        )
    };
    io::Error::last_os_error()
}

/// Sets the calling process's signal mask (`SIG_SETMASK`) to exactly `signals`.
pub fn set_signal_mask(signals: &[libc::c_int]) -> io::Result<()> {
    // SAFETY: sigset_t is plain old data; sigemptyset initialises it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t for the duration of these calls.
    unsafe {
        libc::sigemptyset(&mut set);
        for &s in signals {
            libc::sigaddset(&mut set, s);
        }
    }
    // SAFETY: `set` is initialised; the old-set pointer is NULL.
    let rc = unsafe { libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut()) };
    cvt(rc as libc::c_long)?;
    Ok(())
}

/// Resets the disposition of `sig` to the default and raises it against the calling
/// process (used by the helper to mirror the app's death signal). Returns only if the
/// signal did not terminate the process.
pub fn reraise_default(sig: libc::c_int) {
    // SAFETY: setting SIG_DFL and unblocking are always valid; kill on our own pid is
    // valid; if the signal's default action is to terminate we never return.
    unsafe {
        libc::signal(sig, libc::SIG_DFL);
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, sig);
        libc::sigprocmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
        libc::kill(libc::getpid(), sig);
    }
}

/// Takes ownership of fd number `fd`, which the parent process handed to this process
/// (its number travels in the spec). Fails with `EBADF` if it is not open.
pub fn owned_from_inherited(fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: F_GETFD only queries the fd's flags.
    cvt(unsafe { libc::fcntl(fd, libc::F_GETFD) } as libc::c_long)?;
    // SAFETY: the fd is open (checked above) and, by the spawn protocol, was inherited for
    // exactly one owner in this process: the stage that reads its number from the spec
    // takes it once; nothing else in the process refers to that number.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Registers an owned fd (a pidfd) with the current tokio reactor for readiness.
pub fn async_fd(fd: OwnedFd) -> io::Result<tokio::io::unix::AsyncFd<OwnedFd>> {
    // SAFETY: an OwnedFd is a valid open descriptor that stays open and refers to the
    // same file description until the OwnedFd is dropped, which only happens when the
    // AsyncFd that owns it is dropped; `as_raw_fd` always returns the same number.
    unsafe { tokio::io::unix::AsyncFd::register(fd) }.map_err(io::Error::from)
}
