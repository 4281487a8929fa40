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
