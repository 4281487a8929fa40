//! Churn through the daemon: 500 grains started and stopped with the real CLI leave
//! nothing behind in capnetd or on the host. (Its own test binary, so that the host's
//! mount table is not changed by other tests of this binary meanwhile.)

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use capnet_tests::{Daemon, artifact};

/// The daemon's cgroup parent directories, one per hierarchy it uses.
fn parent_dirs(daemon_pid: u32, parent: &str) -> Vec<PathBuf> {
    let text = std::fs::read_to_string(format!("/proc/{daemon_pid}/cgroup")).unwrap_or_default();
    let mut out = Vec::new();
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(ctrls), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        let rel = path.trim_start_matches('/');
        let base = if ctrls.is_empty() {
            PathBuf::from("/sys/fs/cgroup")
        } else {
            PathBuf::from("/sys/fs/cgroup").join(ctrls)
        };
        let d = base.join(rel).join(parent);
        if d.is_dir() && !out.contains(&d) {
            out.push(d);
        }
    }
    out
}

fn subdirs(dirs: &[PathBuf]) -> BTreeSet<String> {
    dirs.iter()
        .flat_map(|d| std::fs::read_dir(d).into_iter().flatten().flatten())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path().display().to_string())
        .collect()
}

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

fn children(pid: u32) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let text = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
        out.extend(text.split_whitespace().map(str::to_string));
    }
    out
}

/// Polls `f` until it holds or `timeout` passes (the kernel frees some resources, such
/// as a task's cgroup membership, a moment after the task is reaped).
fn settles(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Scenario: four administrators concurrently start and stop 500 grains through
/// `capnet grain start` / `capnet grain stop` (the probe holding until SIGTERM; every
/// tenth grain `/bin/true`, awaited with `capnet grain wait`).
/// Promise: nothing leaks — capnetd holds as many fds and child processes as before, the
/// host's mount table is unchanged, no sandbox cgroup directory and no process is left
/// under the daemon's cgroup parent.
#[test]
fn churn_500_grains_through_the_daemon_leaks_nothing() {
    let d = Daemon::start("").expect("daemon");
    let pid = d.pid();
    let probe = artifact("capnet-probe").display().to_string();
    // Warm up, and check that the cgroup directories are where this test looks.
    d.start_probe("warmup", &[], &["hold"]).expect("warm-up");
    let dirs = parent_dirs(pid, d.cgroup_parent());
    assert!(
        !dirs.is_empty(),
        "no cgroup parent found for {}",
        d.cgroup_parent()
    );
    assert!(
        subdirs(&dirs).iter().any(|s| s.ends_with("/grain-warmup")),
        "{:?}",
        subdirs(&dirs)
    );
    d.capnet_json(&["grain", "stop", "warmup"]).expect("stop");

    let mounts_before = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let fds_before = fd_count(pid);
    let children_before = children(pid);
    assert!(fds_before > 0);
    let t = Instant::now();
    std::thread::scope(|s| {
        for w in 0..4 {
            let (d, probe) = (&d, &probe);
            s.spawn(move || {
                for i in 0..125 {
                    let id = format!("churn-{w}-{i}");
                    if i % 10 == 0 {
                        d.capnet_json(&["grain", "start", "--id", &id, "--", "/bin/true"])
                            .expect("start true");
                        let st = d.wait_grain(&id, Duration::from_secs(30)).expect("wait");
                        assert_eq!(st["exit_status"], 0, "{st}");
                    } else {
                        d.capnet_json(&["grain", "start", "--id", &id, "--", probe, "hold"])
                            .expect("start probe");
                        let st = d.capnet_json(&["grain", "stop", &id]).expect("stop");
                        assert_eq!(st["state"], "exited", "{st}");
                    }
                }
            });
        }
    });
    let elapsed = t.elapsed();
    eprintln!("500 grains started and stopped through capnetd in {elapsed:?}");

    let list = d.capnet_json(&["grain", "list"]).expect("list");
    let list = list.as_array().expect("array");
    assert_eq!(list.len(), 501);
    assert!(
        list.iter().all(|g| g["state"] == "exited"),
        "a grain still runs"
    );
    assert!(
        settles(Duration::from_secs(10), || subdirs(&dirs).is_empty()),
        "leftover cgroups: {:?}",
        subdirs(&dirs)
    );
    assert_eq!(
        std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo"),
        mounts_before,
        "the host mount table changed"
    );
    assert!(
        settles(Duration::from_secs(10), || fd_count(pid) == fds_before),
        "capnetd had {fds_before} fds, now {}",
        fd_count(pid)
    );
    assert!(
        settles(Duration::from_secs(10), || children(pid) == children_before),
        "capnetd's children were {children_before:?}, now {:?}",
        children(pid)
    );
    let procs: Vec<i32> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse::<i32>().ok())
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/cgroup"))
                .is_ok_and(|c| c.contains(&format!("/{}/", d.cgroup_parent())))
        })
        .collect();
    assert!(
        procs.is_empty(),
        "processes left in sandbox cgroups: {procs:?}"
    );
    assert!(elapsed < Duration::from_secs(120), "churn took {elapsed:?}");
}
