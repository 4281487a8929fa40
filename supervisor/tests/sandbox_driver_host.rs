//! The driver-host role: host network, read-only resolver files, lock-down after load.
mod common;

use std::io::Write;
use std::net::TcpListener;
use std::os::fd::OwnedFd;

use capnet_supervisor::sandbox::{ExitReason, HelperImage, Program, Role};

/// Scenario: a driver host whose program is a sealed memfd copy of the probe (as the
/// supervisor hands over approved plugin bytes) connects to a listener on the host's
/// loopback, calls `lock_down_driver_host()`, then attacks.
/// Promise: the driver host reaches the host network; after lock-down it cannot exec,
/// open anything for writing, create, link, rename or remove files, or create memfds,
/// and the base profile and dropped privileges still hold.
#[test]
fn driver_host_network_and_lock_down() {
    let spawner = common::spawner("driverhost");
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port().to_string();
    let probe = std::fs::read(common::workspace_bin("capnet-probe")).unwrap();
    let image = HelperImage::from_bytes(&probe).unwrap();
    let (mut spec, _rpc) =
        common::grain_spec("driverhost", "/unused", &["driver-host", "--port", &port]);
    spec.role = Role::DriverHost;
    spec.program = Program::Fd(OwnedFd::from(image));
    let (mut log, fd) = common::Log::new();
    spec.log_fd = Some(fd);
    let sb = spawner.spawn(spec).unwrap();
    let (conn, _) = listener.accept().unwrap();
    drop(conn);
    let exit = sb.wait_blocking().unwrap();
    let text = log.read();
    eprintln!("{text}");
    assert_eq!(exit.reason, ExitReason::Exited(0));
    let r = common::parse_probe(&text);
    assert!(r.contains_key("done"));
    for c in [
        "control:connect_host_loopback",
        "control:write_tmp_before_lockdown",
        "control:lock_down",
    ] {
        assert_eq!(r[c].outcome, "succeeded", "{c}: {:?}", r[c]);
    }
    if std::path::Path::new("/etc/resolv.conf").exists() {
        assert_eq!(r["control:read_resolv_conf"].outcome, "succeeded");
    }
    assert_eq!(r["read_etc_shadow"].errno, Some(libc::ENOENT));
    common::assert_lockdown_walls(&r);
    common::assert_syscall_walls(&r);
    common::assert_privileges_dropped(&r);
    common::assert_only_fds_0_to_3(&r);
    sb.teardown().unwrap();
    let _ = std::io::stderr().flush();
}
