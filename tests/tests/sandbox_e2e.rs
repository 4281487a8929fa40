//! The hostile corpus through the daemon: the real `capnetd` sandboxes the real
//! `capnet-probe` as a grain (started with `capnet grain start`) and a hostile plugin
//! inside a driver host; the tests read the attacks' outcomes from the logs capnetd keeps
//! and check the limits and exit reasons `capnet grain status` reports.

use std::collections::BTreeSet;
use std::net::TcpListener;
use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use capnet_probe::expect;
use capnet_tests::{Daemon, artifact, driver_config};

fn probe_report(d: &Daemon, id: &str) -> expect::Report {
    expect::parse_probe(&d.grain_log(id))
}

/// Every pid whose cgroup (any hierarchy) lies beneath the daemon's cgroup parent.
fn pids_under(parent: &str) -> BTreeSet<i32> {
    let needle = format!("/{parent}/");
    let mut out = BTreeSet::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cg = std::fs::read_to_string(e.path().join("cgroup")).unwrap_or_default();
        if cg.lines().any(|l| l.contains(&needle)) {
            out.insert(pid);
        }
    }
    out
}

/// A pidfd for `pid` (any process), to watch it exit without racing pid reuse.
fn pidfd(pid: i32) -> Option<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    // SAFETY: a non-negative return is a fresh fd that nothing else owns.
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Waits until the process behind `fd` has exited.
fn exited(fd: &OwnedFd, timeout: Duration) -> bool {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let ms = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
        let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(ms)) {
            Ok(n) if n > 0 => return true,
            Err(nix::Error::EINTR) => continue,
            _ if left.is_zero() => return false,
            _ => continue,
        }
    }
}

fn uid_of(pid: i32) -> Option<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn status_text(d: &Daemon, id: &str) -> String {
    String::from_utf8_lossy(&d.capnet(&["grain", "status", id]).stdout).into_owned()
}

/// Scenario: `capnet grain start` runs the probe's whole attack corpus as a grain, told
/// the state directory, capnetd's own pid and a listener on the host's 127.0.0.1.
/// Promise: through the daemon, every attack is refused exactly as the sandbox library's
/// own corpus test expects (seccomp errnos, SIGSYS for foreign ABIs, ENOENT for host
/// files and the state directory, EROFS, EACCES for noexec, ESRCH for capnetd and every
/// other host pid, ECONNREFUSED for the host's loopback, no capability, fds 0-3 only);
/// the grain runs as its own unprivileged host uid and its exit is reported.
#[test]
fn probe_grain_refuses_every_attack_through_the_daemon() {
    let d = Daemon::start("").expect("daemon");
    let listener = TcpListener::bind("127.0.0.1:0").expect("listener");
    let port = listener.local_addr().expect("addr").port().to_string();
    let state = d.state_dir().display().to_string();
    let pid = d.pid().to_string();
    let started = d
        .start_probe(
            "probe",
            &[],
            &[
                "attacks",
                "--state-dir",
                &state,
                "--supervisor-pid",
                &pid,
                "--host-port",
                &port,
            ],
        )
        .expect("start");
    assert_eq!(started["state"], "running", "{started}");
    assert!(
        started["host_uid"].as_u64().unwrap_or(0) >= 100_000,
        "{started}"
    );
    let st = d
        .wait_grain("probe", Duration::from_secs(60))
        .expect("wait");
    let log = d.grain_log("probe");
    assert_eq!(st["exit_status"], 0, "{st}\n{log}");
    assert_eq!(st["exit_cause"], "exited", "{st}");
    let r = probe_report(&d, "probe");
    expect::assert_syscall_walls(&r);
    expect::assert_privileges_dropped(&r);
    expect::assert_only_fds_0_to_3(&r);
    expect::assert_grain_walls(&r, "probe");
    assert!(
        r["privileges"].detail.contains("Uid=1000"),
        "{:?}",
        r["privileges"]
    );
}

/// Scenario: a grain started with `--pids 32` forks until fork fails.
/// Promise: the fork bomb stops at the limit (EAGAIN after fewer than 32 forks) and
/// `capnet grain status` reports the pids-limit hit (flag, counter, reason and text).
#[test]
fn fork_bomb_stops_at_the_pids_limit_and_status_reports_it() {
    let d = Daemon::start("").expect("daemon");
    d.start_probe("bomb", &["--pids", "32"], &["fork-bomb"])
        .expect("start");
    let st = d.wait_grain("bomb", Duration::from_secs(60)).expect("wait");
    let r = probe_report(&d, "bomb");
    let fb = r.get("fork_bomb").expect("fork_bomb line");
    assert_eq!(
        (fb.outcome.as_str(), fb.errno),
        ("limited", Some(libc::EAGAIN)),
        "{fb:?}"
    );
    let forks: u64 = fb
        .detail
        .trim_start_matches("forks=")
        .split(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .expect("fork count");
    assert!(forks < 32, "{forks} forks with a limit of 32");
    assert_eq!(st["pids_limit_hit"], true, "{st}");
    assert_eq!(st["limits"]["pids"], 32, "{st}");
    assert!(
        st["usage"]["pids_limit_hits"].as_u64().unwrap_or(0) > 0,
        "{st}"
    );
    let reason = st["exit_reason"].as_str().unwrap_or("");
    assert!(reason.contains("hit its pids limit of 32"), "{reason}");
    let text = status_text(&d, "bomb");
    assert!(text.contains("limit hit"), "{text}");
}

/// Scenario: a grain started with `--memory 48MiB` allocates without bound.
/// Promise: the kernel OOM-kills it inside its own cgroup, and `capnet grain status`
/// says so: exit cause "oom", the OOM flag, status -9, and "oom" in the text view.
#[test]
fn memory_hog_is_oom_killed_and_status_reports_oom() {
    let d = Daemon::start("").expect("daemon");
    d.start_probe("hog", &["--memory", "48MiB"], &["mem-hog"])
        .expect("start");
    let st = d.wait_grain("hog", Duration::from_secs(60)).expect("wait");
    assert_eq!(st["exit_cause"], "oom", "{st}\n{}", d.grain_log("hog"));
    assert_eq!(st["oom_killed"], true, "{st}");
    assert_eq!(st["exit_status"], -9, "{st}");
    assert_eq!(st["limits"]["memory_bytes"], 48 << 20, "{st}");
    let r = probe_report(&d, "hog");
    assert!(
        !r.contains_key("mem_hog"),
        "the hog finished its allocation: {r:?}"
    );
    let text = status_text(&d, "hog");
    assert!(text.contains("(oom"), "{text}");
    assert!(text.contains("OOM killer"), "{text}");
}

/// Scenario: a grain with `--cpu 0.25` spins two threads for three seconds while an
/// administrator lists drivers and starts another grain to completion.
/// Promise: the hog's CPU time from its cgroup accounting stays near its quota (well
/// under the two cores it tries to use), while capnetd answers and other grains run
/// normally.
#[test]
fn cpu_hog_is_held_to_its_quota_while_the_daemon_stays_responsive() {
    let d = Daemon::start(&driver_config("tcp", "libcapnet_driver_tcp.so", "")).expect("daemon");
    d.wait_driver("tcp", Duration::from_secs(20), |v| v["state"] == "running")
        .expect("tcp up");
    d.start_probe("spin", &["--cpu", "0.25"], &["cpu-hog", "3", "2"])
        .expect("start");
    let t = Instant::now();
    let drivers = d.drivers().expect("driver list");
    let list_latency = t.elapsed();
    assert_eq!(drivers.len(), 1);
    let t = Instant::now();
    d.capnet_json(&["grain", "start", "--id", "neighbour", "--", "/bin/true"])
        .expect("neighbour starts");
    let n = d
        .wait_grain("neighbour", Duration::from_secs(30))
        .expect("neighbour ends");
    let neighbour = t.elapsed();
    assert_eq!(n["exit_status"], 0, "{n}");
    let running = d.grain_status("spin").expect("status");
    assert_eq!(
        running["state"], "running",
        "the hog still spins: {running}"
    );
    let st = d.wait_grain("spin", Duration::from_secs(60)).expect("wait");
    assert_eq!(st["exit_status"], 0, "{st}\n{}", d.grain_log("spin"));
    let cpu = st["usage"]["cpu_usage_ns"].as_u64().unwrap_or(0) as f64 / 1e9;
    let wall = st["uptime_ms"].as_u64().unwrap_or(1) as f64 / 1000.0;
    let share = cpu / wall;
    eprintln!(
        "hog: {cpu:.3}s CPU over {wall:.3}s = {share:.3} cores; driver list {list_latency:?}, \
         neighbour grain {neighbour:?}"
    );
    assert!(wall >= 3.0, "the hog ran its three seconds ({wall:.3}s)");
    assert!(share < 0.40, "quota 0.25 core, measured {share:.3} cores");
    assert!(share > 0.05, "the hog did run ({share:.3} cores)");
    assert!(list_latency < Duration::from_secs(5), "{list_latency:?}");
    assert!(neighbour < Duration::from_secs(10), "{neighbour:?}");
}

/// Scenario: with two grains and a driver host running, capnetd is killed with SIGKILL;
/// then it is started again on the same state directory and cgroup parent.
/// Promise: every process of every sandbox (helpers, inits, programs, their children)
/// dies with capnetd — watched through pidfds, and no process is left in any of the
/// daemon's cgroups; the restarted daemon removes the stale cgroups and the same grain
/// starts again under the same host uid.
#[test]
fn kill_9_of_capnetd_takes_every_sandbox_down() {
    let mut d =
        Daemon::start(&driver_config("tcp", "libcapnet_driver_tcp.so", "")).expect("daemon");
    let drv = d
        .wait_driver("tcp", Duration::from_secs(20), |v| v["state"] == "running")
        .expect("tcp up");
    let a = d.start_probe("a", &[], &["hold"]).expect("a");
    let b = d.start_probe("b", &["--pids", "8"], &["hold"]).expect("b");
    let parent = d.cgroup_parent().to_string();
    let pids = pids_under(&parent);
    // Helper + init + program for each of the three sandboxes.
    assert!(pids.len() >= 9, "{pids:?}");
    for v in [&a, &b, &drv] {
        let pid = v["pid"].as_i64().unwrap_or(0) as i32;
        assert!(pids.contains(&pid), "{v} not among {pids:?}");
    }
    let fds: Vec<(i32, OwnedFd)> = pids
        .iter()
        .filter_map(|&p| pidfd(p).map(|f| (p, f)))
        .collect();
    assert_eq!(fds.len(), pids.len(), "all of them were alive");
    let sandbox_uids: BTreeSet<u32> = pids.iter().filter_map(|&p| uid_of(p)).collect();
    assert!(
        sandbox_uids.contains(&0),
        "helpers run as root: {sandbox_uids:?}"
    );
    assert!(
        sandbox_uids.iter().filter(|&&u| u >= 100_000).count() >= 3,
        "three sandboxes, three unprivileged host ids: {sandbox_uids:?}"
    );

    d.kill9();
    for (pid, fd) in &fds {
        assert!(
            exited(fd, Duration::from_secs(10)),
            "pid {pid} survived the death of capnetd"
        );
    }
    assert!(
        pids_under(&parent).is_empty(),
        "processes left in {parent}: {:?}",
        pids_under(&parent)
    );

    let stale = |name: &str| {
        own_parent_dirs(&parent)
            .iter()
            .any(|p| p.join(name).is_dir())
    };
    assert!(
        stale("grain-b"),
        "the dead daemon's cgroups are still there"
    );
    d.restart().expect("restart");
    assert!(
        !stale("grain-b"),
        "the restarted daemon removed the stale cgroups"
    );
    let again = d.start_probe("a", &[], &["hold"]).expect("a again");
    assert_eq!(again["host_uid"], a["host_uid"], "a keeps its host id");
    d.capnet_json(&["grain", "stop", "a"]).expect("stop");
}

/// Scenario: a hostile plugin, on `Driver.start` (after the host loaded it and locked
/// itself down), attacks its driver host: the syscall corpus, host files, the state
/// directory, its own plugin file and memfd, host processes, writes anywhere, exec,
/// memfds, device nodes.
/// Promise: every wall of the driver-host sandbox holds — the base seccomp profile, no
/// capabilities, an invisible host and state directory, no host process reachable, and
/// the lock-down (no exec, no open for writing) — while what a driver needs still works
/// (the host's loopback network, /etc/resolv.conf); its processes run as an
/// unprivileged host id under the `[drivers.NAME]` memory and pids limits, and capnetd
/// keeps the driver running.
#[test]
fn hostile_plugin_cannot_break_out_of_its_driver_host() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("listener");
    let port = listener.local_addr().expect("addr").port();
    let plugin = artifact("libcapnet_test_plugin_hostile.so");
    let d = Daemon::start_with_state(|state| {
        driver_config(
            "hostile",
            "libcapnet_test_plugin_hostile.so",
            &format!(
                "state_dir = {:?}\nsupervisor_pid = {}\nplugin_path = {:?}\nhost_port = {port}",
                state.display().to_string(),
                std::process::id(),
                plugin.display().to_string()
            ),
        )
        .replacen(
            "listen_addresses = [\"127.0.0.1\"]",
            "listen_addresses = [\"127.0.0.1\"]\nmemory = \"200MiB\"\npids = 100",
            1,
        )
    })
    .expect("daemon");
    let drv = d
        .wait_driver("hostile", Duration::from_secs(30), |v| {
            v["state"] == "running" || v["state"] == "failed"
        })
        .expect("hostile settles");
    assert_eq!(drv["state"], "running", "{drv}\n{}", d.log());
    let log_path = d.state_dir().join("drivers/hostile.log");
    let text = std::fs::read_to_string(&log_path).expect("driver log");
    let r = expect::parse_probe(&text);
    assert!(
        r.contains_key("done"),
        "the attacks did not finish:\n{text}"
    );
    expect::assert_syscall_walls(&r);
    expect::assert_privileges_dropped(&r);
    expect::assert_lockdown_walls(&r);
    for a in [
        "read_etc_shadow",
        "list_root_home",
        "read_sys",
        "list_supervisor_state_dir",
        "open_plugin_path",
    ] {
        let o = &r[a];
        assert_eq!(
            (o.outcome.as_str(), o.errno),
            ("refused", Some(libc::ENOENT)),
            "{a}: {o:?}"
        );
    }
    assert_eq!(
        r["reach_plugin_memfd"].outcome, "refused",
        "{:?}",
        r["reach_plugin_memfd"]
    );
    for a in ["write_root", "write_tmp"] {
        assert_eq!(r[a].errno, Some(libc::EPERM), "{a}: {:?}", r[a]);
    }
    assert_eq!(
        r["see_host_processes"].outcome, "refused",
        "{:?}",
        r["see_host_processes"]
    );
    assert_eq!(r["signal_supervisor"].errno, Some(libc::ESRCH));
    assert_eq!(
        r["signal_any_host_pid"].outcome, "refused",
        "{:?}",
        r["signal_any_host_pid"]
    );
    assert_eq!(r["info:hostname"].detail, "hostile");
    assert_eq!(r["control:connect_host_loopback"].outcome, "succeeded");
    if std::path::Path::new("/etc/resolv.conf").exists() {
        assert_eq!(r["control:read_resolv_conf"].outcome, "succeeded");
    }
    // From outside: everything in the driver's cgroup but its setup helper runs as an
    // unprivileged host id.
    let parent = d.cgroup_parent().to_string();
    let helper = drv["pid"].as_i64().unwrap_or(0) as i32;
    let others: Vec<(i32, Option<u32>)> = pids_under(&parent)
        .into_iter()
        .filter(|&p| p != helper)
        .map(|p| (p, uid_of(p)))
        .collect();
    assert!(others.len() >= 2, "init and host: {others:?}");
    for (pid, uid) in &others {
        assert!(
            uid.is_some_and(|u| u >= 100_000),
            "pid {pid} runs as {uid:?}"
        );
    }
    // The [drivers.hostile] limits are the host's cgroup limits.
    let (memory, pids) = cgroup_limits(helper);
    assert_eq!(memory, Some(200 << 20), "memory limit of the driver host");
    assert_eq!(pids, Some(102), "pids limit: 100 + the helper and the init");
}

/// The memory and pids limits of the cgroups `pid` is in (v1 or v2).
fn cgroup_limits(pid: i32) -> (Option<u64>, Option<u64>) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
    let read = |p: std::path::PathBuf| -> Option<u64> {
        std::fs::read_to_string(p).ok()?.trim().parse().ok()
    };
    let (mut memory, mut pids) = (None, None);
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(ctrls), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        let rel = path.trim_start_matches('/');
        if ctrls.is_empty() {
            let dir = std::path::Path::new("/sys/fs/cgroup").join(rel);
            memory = memory.or_else(|| read(dir.join("memory.max")));
            pids = pids.or_else(|| read(dir.join("pids.max")));
        }
        for c in ctrls.split(',') {
            let dir = std::path::Path::new("/sys/fs/cgroup").join(ctrls).join(rel);
            match c {
                "memory" => memory = read(dir.join("memory.limit_in_bytes")).or(memory),
                "pids" => pids = read(dir.join("pids.max")).or(pids),
                _ => {}
            }
        }
    }
    (memory, pids)
}

/// Scenario: a grain whose app tree does not exist, an ad-hoc program given by a
/// relative path, and an id that tries to climb out of the state directory.
/// Promise: each is refused with a message naming the problem and what to do; the
/// failed start is recorded as the grain's exit ("failed"), nothing is created outside
/// the state directory, and nothing is left running.
#[test]
fn bad_programs_are_refused_with_clear_messages() {
    let d = Daemon::start(
        "[grains.ghost]\napp = \"/nonexistent-capnet-app\"\ncommand = [\"bin/ghost\"]\n",
    )
    .expect("daemon");
    let out = d.capnet(&["grain", "start", "ghost"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("/nonexistent-capnet-app") && err.contains("ghost"),
        "{err}"
    );
    let st = d.grain_status("ghost").expect("status");
    assert_eq!(st["exit_cause"], "failed", "{st}");
    let out = d.capnet(&["grain", "start", "--id", "rel", "--", "capnet-probe"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not an absolute host path"), "{err}");
    // An id is a directory name under the state directory: no way out of it.
    let out = d.capnet(&[
        "grain",
        "start",
        "--id",
        "grain-/../../x",
        "--",
        "/bin/true",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("must be 1-32 lower-case letters"), "{err}");
    assert!(!d.state_dir().join("x").exists());
    let left = pids_under(d.cgroup_parent());
    assert!(
        left.is_empty(),
        "processes left in the daemon's cgroups: {left:?}"
    );
}

/// The capnet cgroup parent directories of this test process's cgroups (capnetd runs in
/// the same ones), whether they exist or not.
fn own_parent_dirs(parent: &str) -> Vec<std::path::PathBuf> {
    let text = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let mut out = Vec::new();
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(ctrls), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        if !(ctrls.is_empty() || ["memory", "pids", "cpu", "cpuacct"].contains(&ctrls)) {
            continue;
        }
        let base = std::path::Path::new("/sys/fs/cgroup").join(ctrls);
        out.push(base.join(path.trim_start_matches('/')).join(parent));
    }
    out
}

/// Scenario: capnetd is told to stop right after it came up, while its driver host is
/// still starting.
/// Promise: shutdown waits for the driver's sandbox and tears it down; afterwards not
/// even capnet's cgroup parent is left (a stop request that arrives mid-start is not
/// lost).
#[test]
fn shutdown_during_driver_start_leaves_no_cgroup() {
    let mut d =
        Daemon::start(&driver_config("tcp", "libcapnet_driver_tcp.so", "")).expect("daemon");
    let parent = d.cgroup_parent().to_string();
    let dirs = own_parent_dirs(&parent);
    assert!(dirs.iter().any(|p| p.is_dir()), "{dirs:?}");
    d.stop().expect("stop");
    let left: Vec<_> = dirs.iter().filter(|p| p.exists()).collect();
    assert!(left.is_empty(), "left behind: {left:?}\n{}", d.log());
}
