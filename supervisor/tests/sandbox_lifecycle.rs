//! Lifecycle: stop, async wait, supervisor death, churn without leaks.
mod common;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::os::fd::AsFd;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use capnet_supervisor::sandbox::ExitReason;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

/// Scenario: a grain that blocks forever gets `terminate()`.
/// Promise: SIGTERM travels helper → init → app, and the exit reason is the app's death
/// by SIGTERM (mirrored exactly, not as an exit code).
#[test]
fn terminate_forwards_sigterm_to_the_app() {
    let spawner = common::spawner("terminate");
    let (spec, _rpc, _log, _app) = common::probe_grain("terminate", &["hold"]);
    let sb = spawner.spawn(spec).unwrap();
    assert!(sb.try_wait().unwrap().is_none());
    sb.terminate();
    let exit = sb.wait_blocking().unwrap();
    assert_eq!(exit.reason, ExitReason::Signaled(libc::SIGTERM));
    sb.teardown().unwrap();
}

/// Scenario: the supervisor awaits a grain's exit from a tokio runtime.
/// Promise: `Sandboxed::wait` resolves through the pidfd without blocking the runtime.
#[test]
fn async_wait_reports_exit() {
    let spawner = common::spawner("asyncwait");
    let (spec, _rpc) = common::grain_spec("asyncwait", "/bin/sh", &["-c", "exit 3"]);
    let sb = spawner.spawn(spec).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let exit = rt.block_on(sb.wait()).unwrap();
    assert_eq!(exit.reason, ExitReason::Exited(3));
    sb.teardown().unwrap();
}

/// Scenario: a grain closes its fd 3 and keeps running; a driver-host-like sandbox
/// closes an extra fd (its status pipe) and keeps running.
/// Promise: the supervisor sees end-of-file on its ends at once — only the program holds
/// the fds handed to it (the helper and the init close their copies), so a closed status
/// pipe or RPC socket is never hidden by the sandbox's own stages.
#[test]
fn only_the_app_holds_its_fds() {
    use std::io::Read;
    let spawner = common::spawner("appfds");
    let (mut spec, rpc) = common::grain_spec(
        "appfds",
        "/bin/sh",
        &["-c", "exec 3>&- 5>&-; read x </dev/zero; sleep 30"],
    );
    let (pipe_r, pipe_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
    spec.extra_fds = vec![(pipe_w, 5)];
    let sb = spawner.spawn(spec).unwrap();
    let deadline = Duration::from_secs(5);
    rpc.set_read_timeout(Some(deadline)).unwrap();
    let t0 = Instant::now();
    let mut buf = [0u8; 1];
    assert_eq!((&rpc).read(&mut buf).expect("EOF, not a timeout"), 0);
    let mut fds = [PollFd::new(pipe_r.as_fd(), PollFlags::POLLIN)];
    assert_eq!(
        poll(&mut fds, PollTimeout::from(5000u16)).unwrap(),
        1,
        "pipe EOF"
    );
    let mut f = std::fs::File::from(pipe_r);
    assert_eq!(f.read(&mut buf).unwrap(), 0);
    assert!(t0.elapsed() < deadline);
    assert!(sb.try_wait().unwrap().is_none(), "the sandbox still runs");
    sb.teardown().unwrap();
}

/// Scenario: `kill -9` of a process that owns a Spawner (the capnet-sandbox-tool, a
/// stand-in supervisor) while its grain runs forever.
/// Promise: every process of the sandbox (helper, init, app) dies with it, and its
/// cgroups end up empty — PR_SET_PDEATHSIG on each stage plus PID-1 semantics.
#[test]
fn supervisor_sigkill_takes_the_sandbox_down() {
    let app = common::probe_app_dir();
    let parent = format!("capnet/test-kill9-{}", std::process::id());
    let mut sup = Command::new(env!("CARGO_BIN_EXE_capnet-sandbox-tool"))
        .args(["run", "--cgroup-parent", &parent, "--app-dir"])
        .arg(app.path())
        .args(["--", "/app/capnet-probe", "hold"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(sup.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&line).expect("tool prints its sandbox");
    let procs: Vec<String> = v["cgroup_procs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap().to_string())
        .collect();
    let pids: BTreeSet<i32> = procs
        .iter()
        .flat_map(|p| {
            std::fs::read_to_string(p)
                .unwrap()
                .lines()
                .map(|l| l.parse().unwrap())
                .collect::<Vec<i32>>()
        })
        .collect();
    assert_eq!(pids.len(), 3, "helper, init and app: {pids:?}");
    let pidfds: Vec<_> = pids
        .iter()
        .map(|&p| capnet_supervisor::sys::pidfd_open(p).unwrap())
        .collect();

    sup.kill().unwrap(); // SIGKILL
    sup.wait().unwrap();

    let deadline = Instant::now() + Duration::from_secs(10);
    for (pid, fd) in pids.iter().zip(&pidfds) {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
        let n = poll(&mut fds, PollTimeout::try_from(left).unwrap()).unwrap();
        assert_eq!(
            n, 1,
            "sandbox process {pid} survived the supervisor's death"
        );
    }
    for p in &procs {
        let left = std::fs::read_to_string(p).unwrap();
        assert!(left.trim().is_empty(), "{p} still has {left}");
        let dir = std::path::Path::new(p).parent().unwrap();
        std::fs::remove_dir(dir).unwrap();
        let parent = dir.parent().unwrap();
        std::fs::remove_dir(parent).unwrap();
        // The shared `capnet` level goes too unless another test still uses it.
        let _ = std::fs::remove_dir(parent.parent().unwrap());
    }
}

/// Scenario: a supervisor with a nested cgroup parent (`capnet/<test>/inner`, as several
/// capnetd on one host use) spawns a sandbox, then shuts down.
/// Promise: every level is created beneath the supervisor's own cgroup and holds the
/// sandbox's cgroup; at shutdown the levels this supervisor alone used are removed.
#[test]
fn nested_cgroup_parent_is_created_and_removed() {
    let name = format!("capnet/test-nested-{}/inner", std::process::id());
    let spawner = capnet_supervisor::sandbox::Spawner::new(&common::helper_path(), &name)
        .expect("spawner with a nested parent");
    let dirs = spawner.cgroup_parent_dirs();
    assert!(!dirs.is_empty());
    for d in &dirs {
        assert!(d.is_dir(), "{} was not created", d.display());
        assert!(d.ends_with(&name), "{}", d.display());
    }
    let (spec, _rpc, _log, _app) = common::probe_grain("nested", &["hold"]);
    let sb = spawner.spawn(spec).unwrap();
    for d in &dirs {
        assert!(
            d.join("grain-nested").is_dir(),
            "no sandbox cgroup in {}",
            d.display()
        );
    }
    sb.kill();
    sb.wait_blocking().unwrap();
    sb.teardown().unwrap();
    drop(spawner);
    for d in &dirs {
        assert!(!d.exists(), "{} is left", d.display());
        let middle = d.parent().unwrap();
        assert!(!middle.exists(), "{} is left", middle.display());
    }
}

/// Scenario: a grain that started background processes is killed and torn down while
/// running.
/// Promise: `kill()` ends it (reported as SIGKILL), and `teardown()` leaves no process
/// and no cgroup directory behind.
#[test]
fn teardown_of_a_busy_sandbox_leaves_nothing() {
    let spawner = common::spawner("busy");
    let (spec, _rpc) = common::grain_spec(
        "busy",
        "/bin/sh",
        &["-c", "sleep 1000 & sleep 1000 & exec sleep 1000"],
    );
    let sb = spawner.spawn(spec).unwrap();
    let dirs = sb.cgroup.dirs();
    // Wait (through the cgroup's own accounting) until the shell has started both
    // background sleeps: helper + init + 3 sleeps.
    let deadline = Instant::now() + Duration::from_secs(10);
    while sb.cgroup.pids().unwrap().len() < 5 {
        assert!(Instant::now() < deadline, "{:?}", sb.cgroup.pids());
        std::thread::yield_now();
    }
    let pids = sb.cgroup.pids().unwrap();
    let pidfds: Vec<_> = pids
        .iter()
        .map(|&p| capnet_supervisor::sys::pidfd_open(p).unwrap())
        .collect();
    sb.kill();
    let exit = sb.wait_blocking().unwrap();
    assert_eq!(exit.reason, ExitReason::Signaled(libc::SIGKILL));
    sb.teardown().unwrap();
    // A task leaves its cgroup slightly before the kernel marks it exited for pidfd
    // readers, so wait on the pidfds (bounded) rather than poll them once.
    let deadline = Instant::now() + Duration::from_secs(10);
    for (pid, fd) in pids.iter().zip(&pidfds) {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
        assert_eq!(
            poll(&mut fds, PollTimeout::try_from(left).unwrap()).unwrap(),
            1,
            "process {pid} survived teardown"
        );
    }
    for d in dirs {
        assert!(!d.exists(), "{} left behind", d.display());
    }
}

/// Scenario: supervisors sharing an outer cgroup level start and stop at the same time, so
/// one removes the shared level, empty, just as another creates its own parent inside it.
/// Promise: creating a nested parent never fails for that; it starts over.
#[test]
fn shared_cgroup_level_survives_concurrent_start_and_stop() {
    use capnet_supervisor::sandbox::cgroups::CgroupRoot;
    let shared = format!("capnet/test-race-{}", std::process::id());
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let name = format!("{shared}/t{t}");
            std::thread::spawn(move || {
                for round in 0..300 {
                    let root = CgroupRoot::detect(&name)
                        .unwrap_or_else(|e| panic!("{name}, round {round}: {e}"));
                    root.remove_if_empty();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("a supervisor thread failed");
    }
}
