//! Churn: 500 grains started and torn down leave nothing behind. (Its own test binary:
//! the fd and child-process counts are process-wide, so no other test may run beside it.)
mod common;

use std::collections::BTreeSet;
use std::time::Instant;

use capnet_supervisor::sandbox::ExitReason;

fn children_of_self() -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for t in std::fs::read_dir("/proc/self/task").expect("/proc/self/task") {
        let p = t.expect("task entry").path().join("children");
        for c in std::fs::read_to_string(p)
            .unwrap_or_default()
            .split_whitespace()
        {
            out.insert(c.to_string());
        }
    }
    out
}

fn fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .count()
}

/// Scenario: 500 grains running /bin/true are started and torn down one after another.
/// Promise: nothing leaks — no cgroup directory under capnet's parent, no change to the
/// host's mount table, no child process, no fd.
#[test]
fn churn_500_grains_leaks_nothing() {
    let spawner = common::spawner("churn");
    // Warm up lazily allocated fds (e.g. the spawner thread's first use).
    let (spec, _rpc) = common::grain_spec("churn-warmup", "/bin/true", &[]);
    spawner.spawn(spec).unwrap().teardown().unwrap();

    let mounts_before = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let fds_before = fd_count();
    let children_before = children_of_self();
    let t = Instant::now();
    for i in 0..500 {
        let (spec, rpc) = common::grain_spec(&format!("churn-{i}"), "/bin/true", &[]);
        let sb = spawner.spawn(spec).unwrap();
        let exit = sb.teardown().unwrap();
        assert!(
            matches!(exit.reason, ExitReason::Exited(0) | ExitReason::Signaled(9)),
            "{exit:?}"
        );
        drop(rpc);
    }
    eprintln!("500 grains in {:?}", t.elapsed());
    assert_eq!(
        std::fs::read_to_string("/proc/self/mountinfo").unwrap(),
        mounts_before,
        "host mount table changed"
    );
    assert_eq!(fd_count(), fds_before, "fds leaked");
    assert_eq!(
        children_of_self(),
        children_before,
        "child processes leaked"
    );
    for dir in spawner.cgroup_parent_dirs() {
        let left: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
            .map(|e| e.file_name())
            .collect();
        assert!(
            left.is_empty(),
            "{} has leftover cgroups {left:?}",
            dir.display()
        );
    }
}
