//! The attacks of `capnet-probe` as a library, so that the same corpus runs inside a
//! grain (the `capnet-probe` binary) and inside a driver host (the hostile test plugin,
//! `tests/plugins/hostile`). Every attack prints one JSON line to stdout:
//! `{"attack": "...", "outcome": "refused"|"succeeded"|"killed"|"limited"|"info", "detail": "...", "errno": N}`.
//!
//! - `refused`: the attempt failed (`errno` says how; the tests check it is the errno the
//!   wall is supposed to produce, so an incidental failure does not pass for a wall);
//! - `killed`: the attempt ran in a forked child and the child died (`detail` names the
//!   signal; SIGSYS = seccomp's kill action);
//! - `succeeded`: the wall did not hold (or, for `control:*` lines, the expected
//!   positive result);
//! - `limited`: a resource attack was contained (fork bomb);
//! - `info`: an observation.
//!
//! This is test code: `unsafe` is everywhere by necessity (raw syscalls with bad
//! arguments are the point); each block says why it cannot corrupt the probe itself.
//! Forks (`in_child`) run only raw system calls and `_exit` in the child, so they are
//! safe in a multi-threaded host process too.

pub mod expect;

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fmt::Display;
use std::io::Write;
use std::net::{SocketAddrV4, TcpStream};
use std::time::{Duration, Instant};

pub fn emit(attack: &str, outcome: &str, detail: impl Display, errno: Option<i32>) {
    let mut v = serde_json::json!({
        "attack": attack,
        "outcome": outcome,
        "detail": detail.to_string(),
    });
    if let Some(e) = errno {
        v["errno"] = serde_json::json!(e);
    }
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{v}");
    let _ = out.flush();
}

pub fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

pub fn errno_text(e: i32) -> String {
    format!("errno {e} ({})", std::io::Error::from_raw_os_error(e))
}

/// Reports a syscall-style return value (-1 + errno = refused).
pub fn report_ret(attack: &str, ret: i64) {
    if ret == -1 {
        let e = errno();
        emit(attack, "refused", errno_text(e), Some(e));
    } else {
        emit(attack, "succeeded", format!("returned {ret}"), None);
    }
}

pub fn report_io<T>(attack: &str, r: std::io::Result<T>) {
    match r {
        Ok(_) => emit(attack, "succeeded", "no error", None),
        Err(e) => {
            let n = e.raw_os_error().unwrap_or(0);
            emit(attack, "refused", errno_text(n), Some(n));
        }
    }
}

/// A raw syscall with six integer arguments.
pub fn raw(nr: libc::c_long, a: [u64; 6]) -> i64 {
    // SAFETY: every caller passes either 0/NULL, small integers, or pointers to live local
    // buffers sized for the call; the calls that could fork (clone) are issued through
    // `raw_clone`, which handles the child side.
    unsafe { libc::syscall(nr, a[0], a[1], a[2], a[3], a[4], a[5]) as i64 }
}

pub fn cstr(s: &str) -> CString {
    CString::new(s).unwrap_or_default()
}

/// clone(flags) with fork semantics: a child that comes to exist exits at once.
pub fn raw_clone(flags: u64) -> i64 {
    let ret = raw(
        libc::SYS_clone,
        [flags | libc::SIGCHLD as u64, 0, 0, 0, 0, 0],
    );
    if ret == 0 {
        // SAFETY: we are the child; leave immediately without touching shared state.
        unsafe { libc::_exit(0) };
    }
    if ret > 0 {
        let mut st = 0;
        // SAFETY: waiting for our own child with a valid status pointer.
        unsafe { libc::waitpid(ret as libc::pid_t, &mut st, 0) };
    }
    ret
}

/// Runs `f` in a forked child; reports `killed` with the signal, or the child's verdict.
pub fn in_child(attack: &str, f: impl FnOnce() -> i32) {
    let _ = std::io::stdout().flush();
    // SAFETY: the probe is single-threaded when it forks (attack mode runs no threads).
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        let code = f();
        // SAFETY: leave the child without running the parent's destructors.
        unsafe { libc::_exit(code) };
    }
    if pid < 0 {
        let e = errno();
        emit(
            attack,
            "refused",
            format!("fork failed: {}", errno_text(e)),
            Some(e),
        );
        return;
    }
    let mut st = 0;
    // SAFETY: waiting for our own child with a valid status pointer.
    unsafe { libc::waitpid(pid, &mut st, 0) };
    if libc::WIFSIGNALED(st) {
        let sig = libc::WTERMSIG(st);
        emit(attack, "killed", format!("signal {sig}"), None);
    } else {
        let code = libc::WEXITSTATUS(st);
        if code == 0 {
            emit(attack, "succeeded", "child exited 0", None);
        } else {
            emit(attack, "refused", errno_text(code), Some(code));
        }
    }
}

/// The i386 `getpid` (20) through `int 0x80`.
pub fn int80_getpid() -> i64 {
    let ret: i64;
    // SAFETY: `int 0x80` with eax=20 is the i386 getpid; it reads no memory and clobbers
    // only rax (declared). Under the sandbox's filter it kills the (forked) process.
    unsafe {
        std::arch::asm!("int 0x80", inlateout("rax") 20i64 => ret, options(nostack));
    }
    ret
}

pub const X32_SYSCALL_BIT: libc::c_long = 0x4000_0000;

/// The syscall classes the seccomp profile refuses.
pub fn syscall_attacks() {
    let p = |s: &str| cstr(s);
    let tmp = p("/tmp");
    let root = p("/");
    let empty = p("");
    let user = p("user");
    let key = p("capnet-probe");
    let tmpfs = p("tmpfs");
    let none = p("none");
    let mut buf = [0u8; 256];
    let b = buf.as_mut_ptr() as u64;
    let ptr = |c: &CString| c.as_ptr() as u64;

    report_ret("ptrace_traceme", raw(libc::SYS_ptrace, [0, 0, 0, 0, 0, 0]));
    report_ret(
        "ptrace_attach_init",
        raw(
            libc::SYS_ptrace,
            [libc::PTRACE_ATTACH as u64, 1, 0, 0, 0, 0],
        ),
    );
    report_ret(
        "process_vm_readv",
        raw(libc::SYS_process_vm_readv, [1, 0, 0, 0, 0, 0]),
    );
    report_ret(
        "process_vm_writev",
        raw(libc::SYS_process_vm_writev, [1, 0, 0, 0, 0, 0]),
    );
    report_ret(
        "pidfd_getfd",
        raw(libc::SYS_pidfd_getfd, [0, 0, 0, 0, 0, 0]),
    );
    report_ret(
        "keyctl",
        raw(libc::SYS_keyctl, [0, (-3i64) as u64, 0, 0, 0, 0]),
    );
    report_ret(
        "add_key",
        raw(
            libc::SYS_add_key,
            [ptr(&user), ptr(&key), b, 1, (-3i64) as u64, 0],
        ),
    );
    report_ret(
        "request_key",
        raw(libc::SYS_request_key, [ptr(&user), ptr(&key), 0, 0, 0, 0]),
    );
    report_ret("bpf", raw(libc::SYS_bpf, [5, b, 128, 0, 0, 0]));
    report_ret(
        "perf_event_open",
        raw(libc::SYS_perf_event_open, [b, 0, u64::MAX, u64::MAX, 0, 0]),
    );
    report_ret(
        "userfaultfd",
        raw(libc::SYS_userfaultfd, [0, 0, 0, 0, 0, 0]),
    );
    report_ret(
        "io_uring_setup",
        raw(libc::SYS_io_uring_setup, [1, b, 0, 0, 0, 0]),
    );
    report_ret(
        "io_uring_enter",
        raw(libc::SYS_io_uring_enter, [u64::MAX, 0, 0, 0, 0, 0]),
    );
    report_ret(
        "io_uring_register",
        raw(libc::SYS_io_uring_register, [u64::MAX, 0, 0, 0, 0, 0]),
    );
    report_ret(
        "mount_tmpfs",
        raw(
            libc::SYS_mount,
            [ptr(&none), ptr(&tmp), ptr(&tmpfs), 0, 0, 0],
        ),
    );
    report_ret(
        "mount_bind_root",
        raw(
            libc::SYS_mount,
            [ptr(&root), ptr(&tmp), 0, libc::MS_BIND, 0, 0],
        ),
    );
    report_ret(
        "umount_proc",
        raw(libc::SYS_umount2, [ptr(&p("/proc")), 2, 0, 0, 0, 0]),
    );
    report_ret(
        "pivot_root",
        raw(libc::SYS_pivot_root, [ptr(&tmp), ptr(&tmp), 0, 0, 0, 0]),
    );
    report_ret("chroot", raw(libc::SYS_chroot, [ptr(&tmp), 0, 0, 0, 0, 0]));
    report_ret(
        "move_mount",
        raw(
            libc::SYS_move_mount,
            [u64::MAX, ptr(&empty), u64::MAX, ptr(&empty), 0, 0],
        ),
    );
    report_ret(
        "fsopen",
        raw(libc::SYS_fsopen, [ptr(&tmpfs), 0, 0, 0, 0, 0]),
    );
    report_ret(
        "fsconfig",
        raw(libc::SYS_fsconfig, [u64::MAX, 0, 0, 0, 0, 0]),
    );
    report_ret("fsmount", raw(libc::SYS_fsmount, [u64::MAX, 0, 0, 0, 0, 0]));
    report_ret(
        "fspick",
        raw(libc::SYS_fspick, [u64::MAX, ptr(&empty), 0, 0, 0, 0]),
    );
    report_ret(
        "open_tree",
        raw(
            libc::SYS_open_tree,
            [libc::AT_FDCWD as u64, ptr(&root), 1, 0, 0, 0],
        ),
    );
    report_ret(
        "mount_setattr",
        raw(libc::SYS_mount_setattr, [u64::MAX, ptr(&empty), 0, 0, 0, 0]),
    );
    for (name, flag) in [
        ("unshare_user", libc::CLONE_NEWUSER),
        ("unshare_net", libc::CLONE_NEWNET),
        ("unshare_mount", libc::CLONE_NEWNS),
        ("unshare_files", libc::CLONE_FILES),
    ] {
        report_ret(name, raw(libc::SYS_unshare, [flag as u64, 0, 0, 0, 0, 0]));
    }
    report_ret("setns", raw(libc::SYS_setns, [0, 0, 0, 0, 0, 0]));
    for (name, flag) in [
        ("clone_newuser", libc::CLONE_NEWUSER),
        ("clone_newpid", libc::CLONE_NEWPID),
        ("clone_newns", libc::CLONE_NEWNS),
        ("clone_newnet", libc::CLONE_NEWNET),
        ("clone_newipc", libc::CLONE_NEWIPC),
        ("clone_newuts", libc::CLONE_NEWUTS),
        ("clone_newcgroup", libc::CLONE_NEWCGROUP),
    ] {
        report_ret(name, raw_clone(flag as u64));
    }
    // clone3 with CLONE_NEWUSER in its (in-memory) arguments.
    let mut args = [0u64; 11];
    args[0] = libc::CLONE_NEWUSER as u64;
    args[4] = libc::SIGCHLD as u64;
    let ret = raw(libc::SYS_clone3, [args.as_mut_ptr() as u64, 88, 0, 0, 0, 0]);
    if ret == 0 {
        // SAFETY: child of a successful clone3: leave at once.
        unsafe { libc::_exit(0) };
    }
    report_ret("clone3_newuser", ret);
    report_ret(
        "open_by_handle_at",
        raw(
            libc::SYS_open_by_handle_at,
            [libc::AT_FDCWD as u64, b, 0, 0, 0, 0],
        ),
    );
    report_ret(
        "name_to_handle_at",
        raw(
            libc::SYS_name_to_handle_at,
            [libc::AT_FDCWD as u64, ptr(&root), b, b + 128, 0, 0],
        ),
    );
    report_ret("kexec_load", raw(libc::SYS_kexec_load, [0, 0, 0, 0, 0, 0]));
    report_ret(
        "kexec_file_load",
        raw(libc::SYS_kexec_file_load, [u64::MAX, u64::MAX, 0, 0, 0, 0]),
    );
    report_ret(
        "init_module",
        raw(libc::SYS_init_module, [b, 16, ptr(&empty), 0, 0, 0]),
    );
    report_ret(
        "finit_module",
        raw(libc::SYS_finit_module, [0, ptr(&empty), 0, 0, 0, 0]),
    );
    report_ret(
        "delete_module",
        raw(libc::SYS_delete_module, [ptr(&key), 0, 0, 0, 0, 0]),
    );
    let c = b"x".as_ptr() as u64;
    report_ret(
        "ioctl_tiocsti",
        raw(libc::SYS_ioctl, [0, libc::TIOCSTI, c, 0, 0, 0]),
    );
    report_ret(
        "ioctl_tiocsti_high_bits",
        raw(
            libc::SYS_ioctl,
            [0, (1u64 << 32) | libc::TIOCSTI, c, 0, 0, 0],
        ),
    );
    report_ret(
        "ioctl_tioclinux",
        raw(libc::SYS_ioctl, [0, libc::TIOCLINUX, b, 0, 0, 0]),
    );
    report_ret(
        "personality_no_aslr",
        raw(libc::SYS_personality, [0x0040000, 0, 0, 0, 0, 0]),
    );
    report_ret(
        "personality_read_implies_exec",
        raw(libc::SYS_personality, [0x0400000, 0, 0, 0, 0, 0]),
    );
    let ret = raw(libc::SYS_personality, [0xffff_ffff, 0, 0, 0, 0, 0]);
    emit(
        "control:personality_query",
        if ret == -1 { "refused" } else { "succeeded" },
        format!("returned {ret}"),
        None,
    );
    report_ret("acct", raw(libc::SYS_acct, [0, 0, 0, 0, 0, 0]));
    report_ret("swapon", raw(libc::SYS_swapon, [ptr(&tmp), 0, 0, 0, 0, 0]));
    report_ret(
        "swapoff",
        raw(libc::SYS_swapoff, [ptr(&tmp), 0, 0, 0, 0, 0]),
    );
    report_ret(
        "reboot_cad_off",
        raw(libc::SYS_reboot, [0xfee1_dead, 672_274_793, 0, 0, 0, 0]),
    );
    report_ret(
        "settimeofday",
        raw(libc::SYS_settimeofday, [0, 0, 0, 0, 0, 0]),
    );
    let mut ts = [0u64; 2];
    raw(
        libc::SYS_clock_gettime,
        [0, ts.as_mut_ptr() as u64, 0, 0, 0, 0],
    );
    report_ret(
        "clock_settime",
        raw(libc::SYS_clock_settime, [0, ts.as_ptr() as u64, 0, 0, 0, 0]),
    );
    let mut timex = [0u8; 256];
    report_ret(
        "adjtimex",
        raw(
            libc::SYS_adjtimex,
            [timex.as_mut_ptr() as u64, 0, 0, 0, 0, 0],
        ),
    );
    report_ret("syslog", raw(libc::SYS_syslog, [10, 0, 0, 0, 0, 0]));
    report_ret("quotactl", raw(libc::SYS_quotactl, [0, 0, 0, 0, 0, 0]));
    report_ret(
        "lookup_dcookie",
        raw(libc::SYS_lookup_dcookie, [0, b, 16, 0, 0, 0]),
    );
    report_ret("vhangup", raw(libc::SYS_vhangup, [0, 0, 0, 0, 0, 0]));
    report_ret("iopl", raw(libc::SYS_iopl, [3, 0, 0, 0, 0, 0]));
    report_ret("ioperm", raw(libc::SYS_ioperm, [0x80, 1, 1, 0, 0, 0]));
    report_ret("modify_ldt", raw(libc::SYS_modify_ldt, [0, b, 16, 0, 0, 0]));
    report_ret(
        "uselib",
        raw(libc::SYS_uselib, [ptr(&empty), 0, 0, 0, 0, 0]),
    );
    report_ret("sysctl", raw(libc::SYS__sysctl, [b, 0, 0, 0, 0, 0]));
    report_ret("sysfs", raw(libc::SYS_sysfs, [3, 0, 0, 0, 0, 0]));
    report_ret("mbind", raw(libc::SYS_mbind, [0, 0, 0, 0, 0, 0]));
    report_ret(
        "migrate_pages",
        raw(libc::SYS_migrate_pages, [0, 0, 0, 0, 0, 0]),
    );
    report_ret("move_pages", raw(libc::SYS_move_pages, [0, 0, 0, 0, 0, 0]));
    report_ret(
        "set_mempolicy",
        raw(libc::SYS_set_mempolicy, [0, 0, 0, 0, 0, 0]),
    );
    report_ret(
        "fanotify_init",
        raw(libc::SYS_fanotify_init, [0, 0, 0, 0, 0, 0]),
    );

    // Sockets.
    for (name, family, ty, proto) in [
        ("socket_netlink", libc::AF_NETLINK, libc::SOCK_RAW, 0),
        ("socket_packet", libc::AF_PACKET, libc::SOCK_RAW, 0),
        (
            "socket_inet_raw",
            libc::AF_INET,
            libc::SOCK_RAW,
            libc::IPPROTO_ICMP,
        ),
        (
            "socket_inet6_raw",
            libc::AF_INET6,
            libc::SOCK_RAW,
            libc::IPPROTO_ICMPV6,
        ),
        ("socket_inet_packet", libc::AF_INET, 10, 0),
        (
            "socket_inet_raw_cloexec",
            libc::AF_INET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            1,
        ),
        ("socket_vsock", libc::AF_VSOCK, libc::SOCK_STREAM, 0),
        ("socket_alg", libc::AF_ALG, libc::SOCK_SEQPACKET, 0),
        ("socket_bluetooth", 31, libc::SOCK_STREAM, 0),
        ("socket_family_255", 255, libc::SOCK_STREAM, 0),
    ] {
        report_ret(
            name,
            raw(
                libc::SYS_socket,
                [family as u64, ty as u64, proto as u64, 0, 0, 0],
            ),
        );
    }
    for (name, family) in [
        ("control:socket_unix", libc::AF_UNIX),
        ("control:socket_inet", libc::AF_INET),
        ("control:socket_inet6", libc::AF_INET6),
    ] {
        let ret = raw(
            libc::SYS_socket,
            [family as u64, libc::SOCK_STREAM as u64, 0, 0, 0, 0],
        );
        if ret >= 0 {
            // SAFETY: closing the socket we just created.
            unsafe { libc::close(ret as i32) };
        }
        emit(
            name,
            if ret >= 0 { "succeeded" } else { "refused" },
            format!("returned {ret}"),
            None,
        );
    }

    // Other ABIs: expected to kill the (forked) process with SIGSYS.
    in_child("int80_getpid", || {
        int80_getpid();
        0
    });
    in_child("x32_getpid", || {
        raw(X32_SYSCALL_BIT | 39, [0; 6]);
        0
    });
    in_child("x32_ptrace", || {
        raw(X32_SYSCALL_BIT | 521, [0; 6]);
        0
    });
}

pub fn status_fields() -> BTreeMap<String, String> {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.to_string(), v.trim().to_string()))
        .collect()
}

pub fn fs_attacks(state_dir: Option<&str>) {
    report_io("read_etc_shadow", std::fs::read("/etc/shadow"));
    report_io("list_root_home", std::fs::read_dir("/root"));
    if let Some(d) = state_dir {
        report_io("list_supervisor_state_dir", std::fs::read_dir(d));
    }
    report_io("read_sys", std::fs::read_dir("/sys/fs/cgroup"));
    report_io("write_app_tree", std::fs::write("/app/pwned", b"x"));
    report_io("write_root", std::fs::write("/pwned", b"x"));
    report_io("write_usr", std::fs::write("/usr/pwned", b"x"));
    report_io("write_dev", std::fs::write("/dev/pwned", b"x"));
    report_io(
        "write_proc_sysrq",
        std::fs::write("/proc/sysrq-trigger", b"h"),
    );
    report_io(
        "write_proc_sys_hostname",
        std::fs::write("/proc/sys/kernel/hostname", b"pwned"),
    );
    report_io("open_init_mem", std::fs::File::open("/proc/1/mem"));
    report_io(
        "open_init_exe_for_write",
        std::fs::OpenOptions::new().write(true).open("/proc/1/exe"),
    );
    report_io("read_init_environ", std::fs::read("/proc/1/environ"));
    let node = cstr("/tmp/null");
    // SAFETY: mknod with a valid path string.
    let ret = unsafe { libc::mknod(node.as_ptr(), libc::S_IFCHR | 0o666, libc::makedev(1, 3)) };
    report_ret("mknod_char_device", ret as i64);
    let node = cstr("/tmp/sda");
    // SAFETY: as above.
    let ret = unsafe { libc::mknod(node.as_ptr(), libc::S_IFBLK | 0o666, libc::makedev(8, 0)) };
    report_ret("mknod_block_device", ret as i64);

    // A setuid-root copy of ourselves: chown to root must fail, exec from /tmp too.
    let copy = "/tmp/suid";
    let _ = std::fs::copy("/proc/self/exe", copy);
    let c = cstr(copy);
    // SAFETY: chown/chmod with a valid path.
    let chown = unsafe { libc::chown(c.as_ptr(), 0, 0) };
    report_ret("setuid_chown_root", chown as i64);
    // SAFETY: as above.
    unsafe { libc::chmod(c.as_ptr(), 0o4755) };
    in_child("exec_setuid_copy_in_tmp", || {
        let argv = [c.as_ptr(), std::ptr::null()];
        let envp = [std::ptr::null()];
        // SAFETY: NULL-terminated argv/envp of valid C strings.
        unsafe { libc::execve(c.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
        errno()
    });
    let shm = "/dev/shm/x";
    let _ = std::fs::copy("/proc/self/exe", shm);
    let s = cstr(shm);
    // SAFETY: chmod with a valid path.
    unsafe { libc::chmod(s.as_ptr(), 0o755) };
    in_child("exec_from_dev_shm", || {
        let argv = [s.as_ptr(), std::ptr::null()];
        let envp = [std::ptr::null()];
        // SAFETY: NULL-terminated argv/envp of valid C strings.
        unsafe { libc::execve(s.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
        errno()
    });
    let _ = std::fs::remove_file(copy);
    let _ = std::fs::remove_file(shm);
    // SAFETY: plain id syscalls.
    report_ret("setuid_0", unsafe { libc::setuid(0) } as i64);
    // SAFETY: as above.
    report_ret("setgid_0", unsafe { libc::setgid(0) } as i64);
    report_io("write_tmp_is_allowed", std::fs::write("/tmp/ok", b"x"))
}

pub fn process_attacks(supervisor_pid: Option<i32>) {
    let pids: Vec<String> = std::fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
                .collect()
        })
        .unwrap_or_default();
    let init = std::fs::read_to_string("/proc/1/comm").unwrap_or_default();
    let outcome = if pids.len() <= 2 && init.trim() == "capnet-init" {
        "refused"
    } else {
        "succeeded"
    };
    emit(
        "see_host_processes",
        outcome,
        format!("pids={} init={}", pids.join(","), init.trim()),
        None,
    );
    if let Some(pid) = supervisor_pid {
        // SAFETY: kill with signal 0 only checks for existence/permission.
        let ret = unsafe { libc::kill(pid, 0) };
        report_ret("signal_supervisor", ret as i64);
    }
    signal_scan();
    // SAFETY: kill with signal 0.
    let ret = unsafe { libc::kill(1, libc::SIGKILL) };
    // PID 1 ignores SIGKILL from inside its namespace; kill() still returns 0.
    let init_alive = std::path::Path::new("/proc/1").exists();
    emit(
        "kill_init",
        if init_alive { "refused" } else { "succeeded" },
        format!("kill returned {ret}, init alive: {init_alive}"),
        None,
    );
}

/// `kill(pid, 0)` for every possible pid: each one that answers must be visible in our
/// own `/proc`, i.e. lie in our own pid namespace. This finds the supervisor (and every
/// other host process) whatever its pid, without being told it.
pub fn signal_scan() {
    let pid_max: i32 = std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .ok()
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or(32768)
        .min(4 << 20);
    let mut reachable = Vec::new();
    for pid in 1..=pid_max {
        // SAFETY: kill with signal 0 only checks for existence/permission.
        if unsafe { libc::kill(pid, 0) } == 0 || errno() == libc::EPERM {
            reachable.push(pid);
        }
    }
    let foreign: Vec<i32> = reachable
        .iter()
        .copied()
        .filter(|p| !std::path::Path::new(&format!("/proc/{p}")).exists())
        .collect();
    emit(
        "signal_any_host_pid",
        if foreign.is_empty() {
            "refused"
        } else {
            "succeeded"
        },
        format!("pid_max={pid_max} reachable={reachable:?} outside_our_namespace={foreign:?}"),
        None,
    );
}

pub fn net_attacks(host_port: Option<u16>) {
    if let Some(port) = host_port {
        let addr = SocketAddrV4::new(std::net::Ipv4Addr::LOCALHOST, port);
        report_io(
            "connect_host_loopback",
            TcpStream::connect_timeout(&addr.into(), Duration::from_secs(2)),
        );
    }
    let ifaces: Vec<String> = std::fs::read_to_string("/proc/net/dev")
        .unwrap_or_default()
        .lines()
        .skip(2)
        .filter_map(|l| l.split(':').next().map(|s| s.trim().to_string()))
        .collect();
    emit(
        "see_host_interfaces",
        if ifaces == ["lo"] {
            "refused"
        } else {
            "succeeded"
        },
        format!("interfaces={}", ifaces.join(",")),
        None,
    );
}

pub fn privilege_checks() {
    let st = status_fields();
    let get = |k: &str| st.get(k).cloned().unwrap_or_default();
    let zero = "0000000000000000";
    let ok = get("NoNewPrivs") == "1"
        && get("Seccomp") == "2"
        && ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"]
            .iter()
            .all(|k| get(k) == zero);
    emit(
        "privileges",
        if ok { "refused" } else { "succeeded" },
        format!(
            "NoNewPrivs={} Seccomp={} CapInh={} CapPrm={} CapEff={} CapBnd={} CapAmb={} Uid={} Gid={} Groups={}",
            get("NoNewPrivs"),
            get("Seccomp"),
            get("CapInh"),
            get("CapPrm"),
            get("CapEff"),
            get("CapBnd"),
            get("CapAmb"),
            get("Uid"),
            get("Gid"),
            get("Groups"),
        ),
        None,
    );
    let mut fds: Vec<i32> = std::fs::read_dir("/proc/self/fd")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().to_string_lossy().parse().ok())
                .collect()
        })
        .unwrap_or_default();
    fds.sort_unstable();
    // The directory handle used for listing is one extra fd; drop the highest.
    let listed = fds.len();
    let open: Vec<i32> = fds
        .iter()
        .copied()
        .filter(|&fd| {
            // SAFETY: F_GETFD only queries flags.
            let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
            flags != -1
        })
        .collect();
    emit(
        "inherited_fds",
        if open == [0, 1, 2, 3] {
            "refused"
        } else {
            "succeeded"
        },
        format!("open={open:?} listed={listed}"),
        None,
    );
    // SAFETY: getsid/getpgrp/getpid take no pointers.
    let (sid, pid) = unsafe { (libc::getsid(0), libc::getpid()) };
    emit(
        "session",
        if sid == pid { "refused" } else { "succeeded" },
        format!("sid={sid} pid={pid}"),
        None,
    );
    let mut host = [0u8; 65];
    // SAFETY: buffer and length match.
    unsafe { libc::gethostname(host.as_mut_ptr() as *mut libc::c_char, host.len()) };
    let end = host.iter().position(|&b| b == 0).unwrap_or(host.len());
    emit(
        "info:hostname",
        "info",
        String::from_utf8_lossy(&host[..end]),
        None,
    );
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid rlimit pointer.
    unsafe { libc::getrlimit(libc::RLIMIT_CORE, &mut rl) };
    emit(
        "core_dumps",
        if rl.rlim_max == 0 {
            "refused"
        } else {
            "succeeded"
        },
        format!("RLIMIT_CORE={}/{}", rl.rlim_cur, rl.rlim_max),
        None,
    );
    let dev: Vec<String> = std::fs::read_dir("/dev")
        .map(|d| {
            let mut v: Vec<String> = d
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            v.sort();
            v
        })
        .unwrap_or_default();
    emit("info:dev", "info", dev.join(","), None);
    report_io(
        "control:read_dev_urandom",
        std::fs::File::open("/dev/urandom"),
    );
}

pub fn attacks(args: &[String]) {
    let get = |flag: &str| args.windows(2).find(|w| w[0] == flag).map(|w| w[1].clone());
    privilege_checks();
    syscall_attacks();
    fs_attacks(get("--state-dir").as_deref());
    process_attacks(get("--supervisor-pid").and_then(|s| s.parse().ok()));
    net_attacks(get("--host-port").and_then(|s| s.parse().ok()));
    emit("done", "info", "", None);
}

/// The driver-host lock-down walls, once `lock_down_driver_host()` is in force: exec,
/// opening for writing (or creating, truncating, appending), creating, linking,
/// renaming, removing files, device nodes and memfds are all refused. `existing` is a
/// file that exists and is readable (its read-only open is the positive control).
pub fn after_lockdown(existing: &str) {
    in_child("exec_after_lockdown", || {
        let t = cstr("/bin/true");
        let argv = [t.as_ptr(), std::ptr::null()];
        let envp = [std::ptr::null()];
        // SAFETY: NULL-terminated argv/envp of valid C strings.
        unsafe { libc::execve(t.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
        errno()
    });
    let open = |path: &str, flags: i32| {
        let p = cstr(path);
        // SAFETY: open with a valid path; the fd (if any) is closed.
        let fd = unsafe { libc::open(p.as_ptr(), flags, 0o644) };
        let e = errno();
        if fd >= 0 {
            // SAFETY: closing our own fd.
            unsafe { libc::close(fd) };
        }
        (fd, e)
    };
    for (name, path, flags) in [
        (
            "open_wronly_creat",
            "/tmp/new",
            libc::O_WRONLY | libc::O_CREAT,
        ),
        ("open_rdwr_existing", existing, libc::O_RDWR),
        ("open_wronly_existing", existing, libc::O_WRONLY),
        (
            "open_rdonly_trunc",
            existing,
            libc::O_RDONLY | libc::O_TRUNC,
        ),
        (
            "open_rdonly_creat",
            "/tmp/new2",
            libc::O_RDONLY | libc::O_CREAT,
        ),
        ("open_append", existing, libc::O_WRONLY | libc::O_APPEND),
    ] {
        let (fd, e) = open(path, flags);
        if fd >= 0 {
            emit(name, "succeeded", "", None);
        } else {
            emit(name, "refused", errno_text(e), Some(e));
        }
    }
    let (fd, _) = open(existing, libc::O_RDONLY);
    emit(
        "control:open_rdonly",
        if fd >= 0 { "succeeded" } else { "refused" },
        "",
        None,
    );
    let before = cstr(existing);
    let other = cstr("/tmp/other");
    let mut how = [0u64; 3];
    how[0] = (libc::O_WRONLY | libc::O_CREAT) as u64;
    report_ret(
        "openat2_creat",
        raw(
            libc::SYS_openat2,
            [
                libc::AT_FDCWD as u64,
                other.as_ptr() as u64,
                how.as_mut_ptr() as u64,
                24,
                0,
                0,
            ],
        ),
    );
    report_ret(
        "creat",
        raw(libc::SYS_creat, [other.as_ptr() as u64, 0o644, 0, 0, 0, 0]),
    );
    report_ret(
        "mkdir",
        raw(libc::SYS_mkdir, [other.as_ptr() as u64, 0o755, 0, 0, 0, 0]),
    );
    report_ret(
        "unlink",
        raw(libc::SYS_unlink, [before.as_ptr() as u64, 0, 0, 0, 0, 0]),
    );
    report_ret(
        "rename",
        raw(
            libc::SYS_rename,
            [before.as_ptr() as u64, other.as_ptr() as u64, 0, 0, 0, 0],
        ),
    );
    report_ret(
        "symlink",
        raw(
            libc::SYS_symlink,
            [before.as_ptr() as u64, other.as_ptr() as u64, 0, 0, 0, 0],
        ),
    );
    report_ret(
        "link",
        raw(
            libc::SYS_link,
            [before.as_ptr() as u64, other.as_ptr() as u64, 0, 0, 0, 0],
        ),
    );
    report_ret(
        "mknod_fifo",
        raw(
            libc::SYS_mknod,
            [
                other.as_ptr() as u64,
                (libc::S_IFIFO | 0o644) as u64,
                0,
                0,
                0,
                0,
            ],
        ),
    );
    report_ret(
        "memfd_create",
        raw(
            libc::SYS_memfd_create,
            [before.as_ptr() as u64, 0, 0, 0, 0, 0],
        ),
    );
}

pub fn fork_bomb() {
    let mut children = Vec::new();
    let err = loop {
        // SAFETY: single-threaded; the child only pauses.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            loop {
                // SAFETY: pause has no preconditions.
                unsafe { libc::pause() };
            }
        }
        if pid < 0 {
            break errno();
        }
        children.push(pid);
        if children.len() > 100_000 {
            break 0;
        }
    };
    emit(
        "fork_bomb",
        if err == libc::EAGAIN {
            "limited"
        } else {
            "succeeded"
        },
        format!("forks={} then {}", children.len(), errno_text(err)),
        Some(err),
    );
    for pid in &children {
        // SAFETY: killing and reaping our own children.
        unsafe {
            libc::kill(*pid, libc::SIGKILL);
            libc::waitpid(*pid, std::ptr::null_mut(), 0);
        }
    }
}

pub fn mem_hog() {
    let mut hoard: Vec<Vec<u8>> = Vec::new();
    for i in 0..65536u64 {
        // 1 MiB, every page touched so it is really charged.
        hoard.push(vec![(i % 251) as u8 + 1; 1 << 20]);
    }
    emit(
        "mem_hog",
        "succeeded",
        format!("allocated {} MiB", hoard.len()),
        None,
    );
}

pub fn cpu_hog(args: &[String]) {
    let secs: f64 = args.first().and_then(|s| s.parse().ok()).unwrap_or(2.0);
    let threads: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(2);
    let start = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            std::thread::spawn(move || {
                let mut x = 0u64;
                while start.elapsed().as_secs_f64() < secs {
                    x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
                    std::hint::black_box(x);
                }
            })
        })
        .collect();
    for h in handles {
        let _ = h.join();
    }
    let mut ru: libc::rusage = unsafe_zeroed_rusage();
    // SAFETY: valid rusage pointer.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let cpu = ru.ru_utime.tv_sec as f64
        + ru.ru_utime.tv_usec as f64 / 1e6
        + ru.ru_stime.tv_sec as f64
        + ru.ru_stime.tv_usec as f64 / 1e6;
    emit(
        "cpu_hog",
        "info",
        format!("wall={:.3} cpu={cpu:.3}", start.elapsed().as_secs_f64()),
        None,
    );
}

pub fn unsafe_zeroed_rusage() -> libc::rusage {
    // SAFETY: rusage is plain old data; all-zero is valid.
    unsafe { std::mem::zeroed() }
}
