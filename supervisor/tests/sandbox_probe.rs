//! The hostile corpus: `capnet-probe` attacks a grain's walls from inside.
mod common;

use std::net::TcpListener;

use capnet_supervisor::sandbox::ExitReason;

/// Scenario: a grain runs the probe's full attack corpus (every seccomp syscall class,
/// other ABIs, host files, the app tree, device nodes, setuid binaries, mounts, host
/// processes, the supervisor's pid, a service on the host's 127.0.0.1, raw/packet/netlink
/// sockets, capability and fd inspection).
/// Promise: every attack is refused in the expected way — the documented errno, SIGSYS
/// for foreign ABIs — while the positive controls (AF_UNIX/INET sockets, /tmp, urandom)
/// still work.
#[test]
fn grain_refuses_every_attack() {
    let spawner = common::spawner("probe");
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port().to_string();
    let state = tempfile::tempdir().unwrap();
    let state_dir = state.path().to_str().unwrap().to_string();
    let sup_pid = std::process::id().to_string();
    let (spec, _rpc, mut log, _app) = common::probe_grain(
        "probe-attacks",
        &[
            "attacks",
            "--state-dir",
            &state_dir,
            "--supervisor-pid",
            &sup_pid,
            "--host-port",
            &port,
        ],
    );
    let sb = spawner.spawn(spec).expect("spawn probe");
    let exit = sb.wait_blocking().unwrap();
    let text = log.read();
    assert_eq!(exit.reason, ExitReason::Exited(0), "probe log:\n{text}");
    let r = common::parse_probe(&text);
    eprintln!("{text}");
    assert!(r.contains_key("done"), "probe did not finish:\n{text}");
    common::assert_syscall_walls(&r);
    common::assert_privileges_dropped(&r);

    let errno = |a: &str| {
        let o = &r[a];
        assert_eq!(o.outcome, "refused", "{a}: {o:?}");
        o.errno.unwrap_or(0)
    };
    for a in [
        "read_etc_shadow",
        "list_root_home",
        "list_supervisor_state_dir",
        "read_sys",
    ] {
        assert_eq!(
            errno(a),
            libc::ENOENT,
            "{a}: host files must not exist inside"
        );
    }
    for a in ["write_app_tree", "write_root", "write_usr", "write_dev"] {
        assert_eq!(errno(a), libc::EROFS, "{a}");
    }
    for a in [
        "write_proc_sysrq",
        "write_proc_sys_hostname",
        "open_init_mem",
        "open_init_exe_for_write",
        "read_init_environ",
    ] {
        errno(a);
    }
    assert_eq!(errno("mknod_char_device"), libc::EPERM);
    assert_eq!(errno("mknod_block_device"), libc::EPERM);
    errno("setuid_chown_root");
    errno("setuid_0");
    errno("setgid_0");
    assert_eq!(
        errno("exec_setuid_copy_in_tmp"),
        libc::EACCES,
        "/tmp is noexec"
    );
    assert_eq!(
        errno("exec_from_dev_shm"),
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
    assert_eq!(errno("signal_supervisor"), libc::ESRCH);
    assert_eq!(r["kill_init"].outcome, "refused");
    assert_eq!(errno("connect_host_loopback"), libc::ECONNREFUSED);
    assert_eq!(
        r["see_host_interfaces"].outcome, "refused",
        "{:?}",
        r["see_host_interfaces"]
    );
    assert_eq!(r["info:hostname"].detail, "probe-attacks");
    assert_eq!(
        r["info:dev"].detail,
        "fd,full,null,random,shm,stderr,stdin,stdout,urandom,zero"
    );
    assert_eq!(r["control:read_dev_urandom"].outcome, "succeeded");
    sb.teardown().unwrap();
}
