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
    common::assert_only_fds_0_to_3(&r);
    common::assert_grain_walls(&r, "probe-attacks");
    sb.teardown().unwrap();
}
