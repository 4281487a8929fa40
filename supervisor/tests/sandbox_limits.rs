//! Resource attacks: a grain's cgroup limits hold and their hits are reported.
mod common;

use std::time::Instant;

use capnet_supervisor::sandbox::ExitReason;

/// Scenario: a grain with pids limit 32 forks until fork fails.
/// Promise: the fork bomb stops at the pids limit (EAGAIN, fewer than 32 forks), the
/// sandbox's accounting reports the pids-limit hit, and the host is unaffected.
#[test]
fn fork_bomb_stops_at_pids_limit() {
    let spawner = common::spawner("forkbomb");
    let (mut spec, _rpc, mut log, _app) = common::probe_grain("forkbomb", &["fork-bomb"]);
    spec.limits.pids = 32;
    let sb = spawner.spawn(spec).unwrap();
    let exit = sb.wait_blocking().unwrap();
    let text = log.read();
    let r = common::parse_probe(&text);
    let fb = &r["fork_bomb"];
    assert_eq!(fb.outcome, "limited", "{text}");
    assert_eq!(fb.errno, Some(libc::EAGAIN));
    let forks: u64 = fb.detail["forks=".len()..]
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(forks < 32, "{forks} forks with a limit of 32");
    assert!(exit.pids_limit_hit, "{exit:?}");
    assert!(exit.stats.unwrap().pids_max_hits > 0);
    assert_eq!(exit.reason, ExitReason::Exited(0));
    sb.teardown().unwrap();
}

/// Scenario: a grain with a 64 MiB memory limit allocates without bound.
/// Promise: the kernel OOM-kills it inside its own cgroup and the supervisor reports
/// the exit reason as OomKilled (with the cgroup's oom_kill counter).
#[test]
fn memory_hog_is_oom_killed_and_reported() {
    let spawner = common::spawner("memhog");
    let (mut spec, _rpc, _log, _app) = common::probe_grain("memhog", &["mem-hog"]);
    spec.limits.memory_bytes = 64 << 20;
    let sb = spawner.spawn(spec).unwrap();
    let exit = sb.wait_blocking().unwrap();
    assert_eq!(exit.reason, ExitReason::OomKilled, "{exit:?}");
    let stats = exit.stats.unwrap();
    assert!(stats.oom_kills >= 1, "{stats:?}");
    assert_eq!(stats.memory_limit, 64 << 20);
    sb.teardown().unwrap();
}

/// Scenario: a grain limited to a quarter core spins two threads for two seconds, while
/// the supervisor keeps spawning other grains.
/// Promise: the grain's CPU time measured by the cgroup stays near its quota (well under
/// the two cores it asks for), and other grains still start and finish meanwhile.
#[test]
fn cpu_hog_is_held_to_quota() {
    let spawner = common::spawner("cpuhog");
    let (mut spec, _rpc, mut log, _app) = common::probe_grain("cpuhog", &["cpu-hog", "2", "2"]);
    spec.limits.cpu_millis = 250;
    let sb = spawner.spawn(spec).unwrap();
    // The supervisor stays responsive: other grains run to completion meanwhile.
    let t = Instant::now();
    for i in 0..5 {
        let (spec, _rpc) = common::grain_spec(&format!("cpuhog-neighbour-{i}"), "/bin/true", &[]);
        let other = spawner.spawn(spec).unwrap();
        assert_eq!(other.wait_blocking().unwrap().reason, ExitReason::Exited(0));
        other.teardown().unwrap();
    }
    let neighbours = t.elapsed();
    let exit = sb.wait_blocking().unwrap();
    assert_eq!(exit.reason, ExitReason::Exited(0), "{}", log.read());
    let cpu = exit.stats.unwrap().cpu_usage_ns as f64 / 1e9;
    let wall = exit.runtime.as_secs_f64();
    let share = cpu / wall;
    eprintln!("cpu {cpu:.3}s over {wall:.3}s = {share:.3} cores; neighbours {neighbours:?}");
    assert!(wall >= 2.0, "the hog ran for its two seconds");
    assert!(share < 0.40, "quota 0.25 core, measured {share:.3} cores");
    assert!(share > 0.10, "the hog did run ({share:.3} cores)");
    assert!(neighbours.as_secs() < 10, "neighbours took {neighbours:?}");
    sb.teardown().unwrap();
}
