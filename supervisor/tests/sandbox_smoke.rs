//! Smoke tests: the simplest sandboxes start, run and report their exit.
mod common;

use capnet_supervisor::sandbox::ExitReason;

/// Scenario: `/bin/true` and `/bin/false` run in fully confined grains.
/// Promise: spawn returns only after the app was exec'd, and the exit code of the app is
/// what the supervisor sees.
#[test]
fn true_and_false_exit_codes() {
    let spawner = common::spawner("smoke");
    let (spec, _rpc) = common::grain_spec("smoke-true", "/bin/true", &[]);
    let sb = spawner.spawn(spec).expect("spawn /bin/true");
    let exit = sb.wait_blocking().unwrap();
    assert_eq!(exit.reason, ExitReason::Exited(0));
    sb.teardown().unwrap();

    let (spec, _rpc) = common::grain_spec("smoke-false", "/bin/sh", &["-c", "exit 7"]);
    let sb = spawner.spawn(spec).expect("spawn sh");
    assert_eq!(sb.wait_blocking().unwrap().reason, ExitReason::Exited(7));
    sb.teardown().unwrap();
}

/// Scenario: the program does not exist inside the sandbox.
/// Promise: the failure is reported synchronously by spawn, naming the exec stage.
#[test]
fn missing_program_is_a_spawn_error() {
    let spawner = common::spawner("smoke-missing");
    let (spec, _rpc) = common::grain_spec("smoke-missing", "/nonexistent", &[]);
    let err = spawner.spawn(spec).unwrap_err().to_string();
    assert!(err.contains("app: exec"), "{err}");
}

/// Scenario: a grain writes to /var twice, in two successive sandboxes; its /var lives
/// under a root-owned 0700 directory, as in capnetd's state directory.
/// Promise: /var is the grain's persistent, writable host directory (it survives a
/// restart) even though the sandbox user cannot search the path leading to it, while
/// the rest of the tree stays read-only.
#[test]
fn var_is_writable_and_persistent() {
    use std::os::unix::fs::{PermissionsExt, chown};
    let spawner = common::spawner("var");
    let private = tempfile::tempdir().unwrap();
    std::fs::set_permissions(private.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let var = private.path().join("grains/var/var");
    std::fs::create_dir_all(&var).unwrap();
    std::fs::set_permissions(
        private.path().join("grains"),
        std::fs::Permissions::from_mode(0o700),
    )
    .unwrap();
    let mut uid = 0;
    for round in 0..2 {
        let (mut spec, _rpc) = common::grain_spec(
            "var",
            "/bin/sh",
            &[
                "-c",
                "echo run >> /var/log.txt && ! touch /etc/x 2>/dev/null",
            ],
        );
        if round == 0 {
            uid = spec.host_uid;
            chown(&var, Some(uid), Some(uid)).unwrap();
        }
        spec.host_uid = uid;
        spec.host_gid = uid;
        spec.var_dir = Some(var.clone());
        let sb = spawner.spawn(spec).unwrap();
        assert_eq!(sb.wait_blocking().unwrap().reason, ExitReason::Exited(0));
        sb.teardown().unwrap();
    }
    let text = std::fs::read_to_string(var.join("log.txt")).unwrap();
    assert_eq!(text, "run\nrun\n");
    use std::os::unix::fs::MetadataExt;
    assert_eq!(std::fs::metadata(var.join("log.txt")).unwrap().uid(), uid);
}

/// Scenario: an administrator grants a driver host CAP_NET_BIND_SERVICE.
/// Promise: exactly that capability survives exec as an ambient capability; every other
/// capability is gone from every set. (Grains cannot be granted any.)
#[test]
fn driver_host_ambient_capability() {
    use capnet_supervisor::sandbox::{Capability, Role};
    let spawner = common::spawner("ambient");
    let (mut spec, _rpc) = common::grain_spec(
        "ambient",
        "/bin/sh",
        &["-c", "grep -E '^Cap(Eff|Prm|Amb|Bnd)' /proc/self/status"],
    );
    spec.role = Role::DriverHost;
    spec.ambient_caps = vec![Capability::CAP_NET_BIND_SERVICE];
    let (mut log, fd) = common::Log::new();
    spec.log_fd = Some(fd);
    let sb = spawner.spawn(spec).unwrap();
    assert_eq!(sb.wait_blocking().unwrap().reason, ExitReason::Exited(0));
    let text = log.read();
    let bit = format!("{:016x}", 1u64 << 10); // CAP_NET_BIND_SERVICE = 10
    for set in ["CapEff", "CapPrm", "CapAmb", "CapBnd"] {
        assert!(text.contains(&format!("{set}:\t{bit}")), "{set}: {text}");
    }
    sb.teardown().unwrap();

    let (mut spec, _rpc) = common::grain_spec("ambient-grain", "/bin/true", &[]);
    spec.ambient_caps = vec![Capability::CAP_NET_BIND_SERVICE];
    assert!(
        spawner.spawn(spec).is_err(),
        "grains cannot be granted capabilities"
    );
}
