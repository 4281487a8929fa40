//! What the hostile corpus must find: the outcome every attack of this library must have
//! inside a grain and inside a driver host. Shared by the sandbox library's tests
//! (`supervisor/tests/sandbox_*.rs`) and the end-to-end tests through the daemon
//! (`tests/tests/sandbox_e2e.rs`), so both hold the walls to the same expectations.
//! Every check names the errno the wall is supposed to produce, so an incidental
//! failure cannot pass for a wall.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;

/// Parsed probe output: attack → outcome.
pub type Report = BTreeMap<String, Outcome>;

/// One line of probe output.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub outcome: String,
    pub detail: String,
    pub errno: Option<i32>,
}

/// Parses the probe's JSON lines (attack → outcome); panics on a malformed line.
pub fn parse_probe(log: &str) -> Report {
    let mut out = Report::new();
    for line in log.lines().filter(|l| l.starts_with('{')) {
        let v: serde_json::Value = serde_json::from_str(line).expect("probe line is JSON");
        let attack = v["attack"].as_str().unwrap().to_string();
        out.insert(
            attack,
            Outcome {
                outcome: v["outcome"].as_str().unwrap().to_string(),
                detail: v["detail"].as_str().unwrap_or("").to_string(),
                errno: v["errno"].as_i64().map(|e| e as i32),
            },
        );
    }
    out
}

/// Asserts that every syscall-class attack of the probe was refused by the seccomp
/// profile with the errno the profile defines (not merely failed for another reason).
pub fn assert_syscall_walls(r: &Report) {
    let expect = |attack: &str, errno: i32| {
        let o = r
            .get(attack)
            .unwrap_or_else(|| panic!("probe did not report {attack}"));
        assert_eq!(
            (o.outcome.as_str(), o.errno),
            ("refused", Some(errno)),
            "{attack}: {o:?}"
        );
    };
    for a in [
        "ptrace_traceme",
        "ptrace_attach_init",
        "process_vm_readv",
        "process_vm_writev",
        "pidfd_getfd",
        "keyctl",
        "add_key",
        "request_key",
        "bpf",
        "perf_event_open",
        "userfaultfd",
        "io_uring_setup",
        "io_uring_enter",
        "io_uring_register",
        "mount_tmpfs",
        "mount_bind_root",
        "umount_proc",
        "pivot_root",
        "chroot",
        "move_mount",
        "fsopen",
        "fsconfig",
        "fsmount",
        "fspick",
        "open_tree",
        "mount_setattr",
        "unshare_user",
        "unshare_net",
        "unshare_mount",
        "unshare_files",
        "setns",
        "clone_newuser",
        "clone_newpid",
        "clone_newns",
        "clone_newnet",
        "clone_newipc",
        "clone_newuts",
        "clone_newcgroup",
        "open_by_handle_at",
        "name_to_handle_at",
        "kexec_load",
        "kexec_file_load",
        "init_module",
        "finit_module",
        "delete_module",
        "ioctl_tiocsti",
        "ioctl_tiocsti_high_bits",
        "ioctl_tioclinux",
        "personality_no_aslr",
        "personality_read_implies_exec",
        "acct",
        "swapon",
        "swapoff",
        "reboot_cad_off",
        "settimeofday",
        "clock_settime",
        "adjtimex",
        "syslog",
        "quotactl",
        "lookup_dcookie",
        "vhangup",
        "iopl",
        "ioperm",
        "modify_ldt",
        "uselib",
        "sysctl",
        "sysfs",
        "mbind",
        "migrate_pages",
        "move_pages",
        "set_mempolicy",
        "fanotify_init",
        "socket_inet_raw",
        "socket_inet6_raw",
        "socket_inet_packet",
        "socket_inet_raw_cloexec",
    ] {
        expect(a, libc::EPERM);
    }
    expect("clone3_newuser", libc::ENOSYS);
    for a in [
        "socket_netlink",
        "socket_packet",
        "socket_vsock",
        "socket_alg",
        "socket_bluetooth",
        "socket_family_255",
    ] {
        expect(a, libc::EAFNOSUPPORT);
    }
    // Other ABIs are killed by the bad-arch action (SIGSYS = 31).
    for a in ["int80_getpid", "x32_getpid", "x32_ptrace"] {
        let o = &r[a];
        assert_eq!(
            (o.outcome.as_str(), o.detail.as_str()),
            ("killed", "signal 31"),
            "{a}"
        );
    }
    for c in [
        "control:socket_unix",
        "control:socket_inet",
        "control:socket_inet6",
        "control:personality_query",
    ] {
        assert_eq!(r[c].outcome, "succeeded", "{c}: {:?}", r[c]);
    }
}

/// Asserts the confinement properties the probe reads from /proc/self/status and co.:
/// no capability in any set, NoNewPrivs 1, Seccomp 2 (filter), its own session, no core
/// dumps.
pub fn assert_privileges_dropped(r: &Report) {
    for a in ["privileges", "session", "core_dumps"] {
        let o = r
            .get(a)
            .unwrap_or_else(|| panic!("probe did not report {a}"));
        assert_eq!(o.outcome, "refused", "{a}: {o:?}");
    }
}

/// Asserts that only fds 0-3 were open when the program started.
pub fn assert_only_fds_0_to_3(r: &Report) {
    let o = r
        .get("inherited_fds")
        .unwrap_or_else(|| panic!("probe did not report inherited_fds"));
    assert_eq!(o.outcome, "refused", "inherited_fds: {o:?}");
}

fn errno_of(r: &Report, a: &str) -> i32 {
    let o = r
        .get(a)
        .unwrap_or_else(|| panic!("probe did not report {a}"));
    assert_eq!(o.outcome, "refused", "{a}: {o:?}");
    o.errno.unwrap_or(0)
}

/// Asserts the walls of a grain against the probe's `attacks` mode (run with
/// `--state-dir`, `--supervisor-pid` and `--host-port`): host files invisible, the tree
/// read-only, no devices, no setuid, no host processes or supervisor, no host network,
/// the hostname and the exact `/dev`.
pub fn assert_grain_walls(r: &Report, hostname: &str) {
    assert!(r.contains_key("done"), "the probe did not finish: {r:?}");
    for a in [
        "read_etc_shadow",
        "list_root_home",
        "list_supervisor_state_dir",
        "read_sys",
    ] {
        assert_eq!(
            errno_of(r, a),
            libc::ENOENT,
            "{a}: host files must not exist inside"
        );
    }
    for a in ["write_app_tree", "write_root", "write_usr", "write_dev"] {
        assert_eq!(errno_of(r, a), libc::EROFS, "{a}");
    }
    for a in [
        "write_proc_sysrq",
        "write_proc_sys_hostname",
        "open_init_mem",
        "open_init_exe_for_write",
        "read_init_environ",
    ] {
        errno_of(r, a);
    }
    assert_eq!(errno_of(r, "mknod_char_device"), libc::EPERM);
    assert_eq!(errno_of(r, "mknod_block_device"), libc::EPERM);
    errno_of(r, "setuid_chown_root");
    errno_of(r, "setuid_0");
    errno_of(r, "setgid_0");
    assert_eq!(
        errno_of(r, "exec_setuid_copy_in_tmp"),
        libc::EACCES,
        "/tmp is noexec"
    );
    assert_eq!(
        errno_of(r, "exec_from_dev_shm"),
        libc::EACCES,
        "/dev/shm is noexec"
    );
    assert_eq!(
        r["write_tmp_is_allowed"].outcome, "succeeded",
        "{:?}",
        r["write_tmp_is_allowed"]
    );
    assert_eq!(
        r["see_host_processes"].outcome, "refused",
        "{:?}",
        r["see_host_processes"]
    );
    assert_eq!(errno_of(r, "signal_supervisor"), libc::ESRCH);
    assert_eq!(
        r["signal_any_host_pid"].outcome, "refused",
        "{:?}",
        r["signal_any_host_pid"]
    );
    assert_eq!(r["kill_init"].outcome, "refused");
    assert_eq!(errno_of(r, "connect_host_loopback"), libc::ECONNREFUSED);
    assert_eq!(
        r["see_host_interfaces"].outcome, "refused",
        "{:?}",
        r["see_host_interfaces"]
    );
    assert_eq!(r["info:hostname"].detail, hostname);
    assert_eq!(
        r["info:dev"].detail,
        "fd,full,null,random,shm,stderr,stdin,stdout,urandom,zero"
    );
    assert_eq!(r["control:read_dev_urandom"].outcome, "succeeded");
}

/// Asserts the driver-host lock-down against [`crate::after_lockdown`]: no exec, no open
/// for writing in any form, no creating, linking, renaming or removing files, no device
/// nodes or memfds (EPERM), `openat2` ENOSYS, while reading still works.
pub fn assert_lockdown_walls(r: &Report) {
    assert_eq!(
        r["control:open_rdonly"].outcome, "succeeded",
        "{:?}",
        r["control:open_rdonly"]
    );
    for a in [
        "exec_after_lockdown",
        "open_wronly_creat",
        "open_rdwr_existing",
        "open_wronly_existing",
        "open_rdonly_trunc",
        "open_rdonly_creat",
        "open_append",
        "creat",
        "mkdir",
        "unlink",
        "rename",
        "symlink",
        "link",
        "mknod_fifo",
        "memfd_create",
    ] {
        let o = r
            .get(a)
            .unwrap_or_else(|| panic!("probe did not report {a}"));
        assert_eq!(
            (o.outcome.as_str(), o.errno),
            ("refused", Some(libc::EPERM)),
            "{a}: {o:?}"
        );
    }
    assert_eq!(r["openat2_creat"].errno, Some(libc::ENOSYS));
}
