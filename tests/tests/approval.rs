//! Administrator approval of drivers and a lifecycle that survives misbehaving plugins:
//! inspect, approve (pinned to the SHA-256 and privileges shown), refusals with the command
//! that fixes them, upgrade, revoke, crash loops, hung plugins, and config reloads.

use std::time::{Duration, Instant};

use capnet_tests::{
    Daemon, EchoServer, approval, artifact, driver_config, file_sha256, inspect_plugin,
};
use serde_json::Value;

fn last_json(log: &str) -> Value {
    log.lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| panic!("no JSON line in {log}"))
}

/// Inspecting a shipped driver and a test plugin shows name, version, ABI, what they
/// provide, the privileges they ask for, size and SHA-256 — without loading anything into
/// capnetd — and approving writes exactly that into the config (comments kept) and starts
/// the driver.
#[test]
fn inspect_and_approve() {
    let d = Daemon::start("# the administrator's own comment\n[daemon]\n").expect("daemon");
    let tcp = artifact("libcapnet_driver_tcp.so");
    let tcp_s = tcp.display().to_string();
    let v = d
        .capnet_json(&["driver", "inspect", &tcp_s])
        .expect("inspect");
    assert_eq!(v["name"], "tcp");
    assert_eq!(v["abi"], "1.0");
    assert_eq!(v["sha256"], file_sha256(&tcp));
    assert_eq!(v["size"], std::fs::metadata(&tcp).expect("stat").len());
    assert_eq!(v["manifest"]["privileges"]["outbound_tcp"], true);
    assert_eq!(v["manifest"]["privileges"]["low_ports"], false);
    let provides: Vec<&str> = v["manifest"]["provides"]
        .as_array()
        .expect("provides")
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    assert_eq!(provides, vec!["IpNetwork", "IpInterface"]);
    let text = d.capnet(&["driver", "inspect", &tcp_s]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("sha256") && text.contains("outbound_tcp"),
        "{text}"
    );

    // Without a terminal and without --yes, nothing is approved.
    let out = d.capnet(&["driver", "approve", &tcp_s]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--yes"));

    d.capnet_json(&["driver", "approve", &tcp_s, "--yes"])
        .expect("approve");
    d.wait_driver("tcp", Duration::from_secs(15), |v| v["state"] == "running")
        .expect("running");
    let config = std::fs::read_to_string(d.config_path()).expect("config");
    assert!(
        config.contains("# the administrator's own comment"),
        "{config}"
    );
    assert!(config.contains(&file_sha256(&tcp)), "{config}");
    assert!(config.contains("outbound_tcp = true"), "{config}");
    assert!(!config.contains("low_ports"), "{config}");

    // A test plugin: approved as shown; it then refuses to start without its options.
    let crashy = artifact("libcapnet_test_plugin_crashy.so");
    let crashy_s = crashy.display().to_string();
    let v = d
        .capnet_json(&["driver", "inspect", &crashy_s])
        .expect("inspect");
    assert_eq!(v["name"], "crashy");
    d.capnet_json(&["driver", "approve", &crashy_s, "--yes", "--name", "crashy"])
        .expect("approve");
    let c = d
        .wait_driver("crashy", Duration::from_secs(15), |v| {
            v["state"] == "failed"
        })
        .expect("refused without options");
    assert!(
        c["last_error"].as_str().unwrap_or("").contains("mode"),
        "{c}"
    );
    let kinds = d.audit(&[]).expect("audit");
    assert_eq!(
        kinds
            .iter()
            .filter(|r| r["kind"] == "driver_approved")
            .count(),
        2,
        "{kinds:?}"
    );
}

/// An unapproved plugin, a one-byte change after approval, and a manifest asking for more
/// than was approved are each refused with the file, the expected and found values and
/// the command that fixes it; refusals are audited and the good driver keeps serving.
#[test]
fn refusals_name_the_fix() {
    let dir = tempfile::tempdir().expect("tmp");
    let tcp = artifact("libcapnet_driver_tcp.so");
    let changed = dir.path().join("changed.so");
    std::fs::copy(&tcp, &changed).expect("copy");
    let approved_sha = file_sha256(&changed);
    let mut bytes = std::fs::read(&changed).expect("read");
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    std::fs::write(&changed, &bytes).expect("flip a byte");
    let config = format!(
        "{}\n[drivers.unapproved]\nplugin = {:?}\n\n[drivers.changed]\nplugin = {:?}\nsha256 = {:?}\nprivileges = {{ outbound_tcp = true, inbound_tcp = true, dns = true }}\n\n[drivers.grown]\nplugin = {:?}\nsha256 = {:?}\nprivileges = {{ outbound_tcp = true }}\n",
        driver_config("tcp", "libcapnet_driver_tcp.so", ""),
        tcp.display().to_string(),
        changed.display().to_string(),
        approved_sha,
        tcp.display().to_string(),
        file_sha256(&tcp),
    );
    let d = Daemon::start(&config).expect("daemon");
    let failed = |name: &str| {
        d.wait_driver(name, Duration::from_secs(15), |v| v["state"] == "failed")
            .expect("failed")["last_error"]
            .as_str()
            .unwrap_or("")
            .to_string()
    };
    let e = failed("unapproved");
    assert!(
        e.contains("libcapnet_driver_tcp.so") && e.contains("not approved"),
        "{e}"
    );
    assert!(e.contains("capnet driver approve"), "{e}");
    let e = failed("changed");
    assert!(e.contains("changed.so") && e.contains(&approved_sha), "{e}");
    assert!(
        e.contains(&file_sha256(&changed)) && e.contains("capnet driver upgrade"),
        "{e}"
    );
    let e = failed("grown");
    assert!(
        e.contains("not approved: inbound_tcp, dns") && e.contains("approved: outbound_tcp"),
        "{e}"
    );
    assert!(e.contains("capnet driver upgrade"), "{e}");
    let refusals = d
        .audit(&[])
        .expect("audit")
        .into_iter()
        .filter(|r| r["kind"] == "driver_refused")
        .count();
    assert_eq!(refusals, 3);
    assert_eq!(d.driver("tcp").expect("tcp")["state"], "running");
}

/// A plugin that crashes on every call is restarted with backoff and marked failed after
/// the configured number of crashes, with the reason shown and audited; the other driver
/// and its grants keep working.
#[test]
fn crash_loop_is_marked_failed() {
    let echo = EchoServer::start().expect("echo");
    let config = format!(
        "[daemon]\nmax_driver_crashes = 2\ncrash_window_secs = 60\n{}{}",
        driver_config("tcp", "libcapnet_driver_tcp.so", ""),
        driver_config(
            "crashy",
            "libcapnet_test_plugin_crashy.so",
            "mode = \"panic\"\ncrash_port = 0"
        ),
    );
    let d = Daemon::start(&config).expect("daemon");
    d.wait_driver("crashy", Duration::from_secs(15), |v| {
        v["state"] == "running"
    })
    .expect("up");
    let p = echo.addr.port().to_string();
    d.start_test_grain("hammer", &["hammer", "--port", &p, "--count", "60"])
        .expect("hammer");
    d.grant_next("crashy", &[]).expect("grant");
    d.start_test_grain("steady", &["echo", "--port", &p, "--bytes", "100000"])
        .expect("steady");
    d.grant_next("tcp", &[]).expect("grant");
    let c = d
        .wait_driver("crashy", Duration::from_secs(30), |v| {
            v["state"] == "failed"
        })
        .expect("marked failed");
    let reason = c["last_error"].as_str().unwrap_or("");
    assert!(reason.contains("crashed 3 times within 60s"), "{c}");
    assert_eq!(c["restarts"], 3);
    assert!(
        d.audit(&[])
            .expect("audit")
            .iter()
            .any(|r| r["kind"] == "driver_failed")
    );
    let st = d
        .wait_grain("steady", Duration::from_secs(30))
        .expect("steady");
    assert_eq!(st["exit_status"], 0, "{}", d.grain_log("steady"));
    let tcp = d.driver("tcp").expect("tcp");
    assert_eq!(
        (tcp["state"].as_str(), tcp["restarts"].as_u64()),
        (Some("running"), Some(0))
    );
    // The failed driver's callers get a clear error.
    let st = d
        .wait_grain("hammer", Duration::from_secs(60))
        .expect("hammer");
    let log = d.grain_log("hammer");
    assert_eq!(st["exit_status"], 0, "{log}");
    assert!(log.contains("driver crashy has failed"), "{log}");
    // `capnet reload`, as the failure message says, gives it a fresh start even though its
    // table did not change; the healthy driver is left alone.
    let tcp_pid = d.driver("tcp").expect("tcp")["pid"].clone();
    let v = d.capnet_json(&["reload"]).expect("reload");
    let summary = v["summary"].as_str().unwrap_or("");
    assert!(summary.contains("restarted: crashy"), "{v}");
    d.wait_driver("crashy", Duration::from_secs(15), |v| {
        v["state"] == "running" && v["restarts"] == 0
    })
    .expect("crashy back after reload");
    assert_eq!(d.driver("tcp").expect("tcp")["pid"], tcp_pid);
}

/// A plugin that stops answering is detected by the health check within the configured
/// deadline, killed and restarted.
#[test]
fn hung_plugin_is_restarted() {
    let echo = EchoServer::start().expect("echo");
    let hang_port = capnet_tests::free_port();
    let config = format!(
        "[daemon]\nhealth_interval_ms = 200\nhealth_timeout_ms = 300\n{}",
        driver_config(
            "crashy",
            "libcapnet_test_plugin_crashy.so",
            &format!("mode = \"hang\"\ncrash_port = {hang_port}")
        ),
    );
    let d = Daemon::start(&config).expect("daemon");
    d.wait_driver("crashy", Duration::from_secs(15), |v| {
        v["state"] == "running"
    })
    .expect("up");
    let (hp, ep) = (hang_port.to_string(), echo.addr.port().to_string());
    d.start_test_grain(
        "hanger",
        &["crash-recover", "--crash-port", &hp, "--echo-port", &ep],
    )
    .expect("grain");
    d.grant_next("crashy", &[]).expect("grant");
    let t0 = Instant::now();
    let c = d
        .wait_driver("crashy", Duration::from_secs(10), |v| {
            v["restarts"].as_u64().unwrap_or(0) >= 1
        })
        .expect("restarted");
    let took = t0.elapsed();
    assert!(
        c["last_error"]
            .as_str()
            .unwrap_or("")
            .contains("health check within 300 ms"),
        "{c}"
    );
    // interval + timeout + the restart itself, with room for a loaded machine.
    assert!(took < Duration::from_secs(3), "detected after {took:?}");
    let st = d
        .wait_grain("hanger", Duration::from_secs(30))
        .expect("grain");
    assert_eq!(st["exit_status"], 0, "{}", d.grain_log("hanger"));
}

/// A broken config on reload is refused with its line and column and nothing running
/// changes; a good one starts new drivers without restarting unaffected ones.
#[test]
fn reload_applies_or_refuses_whole() {
    let d = Daemon::start(&driver_config("tcp", "libcapnet_driver_tcp.so", "")).expect("daemon");
    let before = d
        .wait_driver("tcp", Duration::from_secs(15), |v| v["state"] == "running")
        .expect("up");
    let original = std::fs::read_to_string(d.config_path()).expect("config");
    std::fs::write(
        d.config_path(),
        format!("{original}\n[drivers.oops\nplugin = 1\n"),
    )
    .expect("break it");
    let out = d.capnet(&["reload"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let line = original.lines().count() + 2;
    assert!(err.contains(&format!("capnet.toml:{line}:")), "{err}");
    assert!(err.contains("nothing changed"), "{err}");
    // SIGHUP with the same broken file changes nothing either.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(d.pid() as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .expect("sighup");
    let deadline = Instant::now() + Duration::from_secs(10);
    while d
        .audit(&[])
        .expect("audit")
        .iter()
        .filter(|r| r["kind"] == "reload_refused")
        .count()
        < 2
    {
        assert!(Instant::now() < deadline, "SIGHUP did not attempt a reload");
        std::thread::sleep(Duration::from_millis(20));
    }
    let after = d.driver("tcp").expect("tcp");
    assert_eq!(after["pid"], before["pid"]);
    assert_eq!(after["restarts"], 0);

    let crashy = artifact("libcapnet_test_plugin_crashy.so");
    std::fs::write(
        d.config_path(),
        format!(
            "{original}\n[drivers.second]\nplugin = {:?}\n{}\n[drivers.second.options]\nmode = \"panic\"\ncrash_port = 1\n",
            crashy.display().to_string(),
            approval(&crashy)
        ),
    )
    .expect("fix it");
    let v = d.capnet_json(&["reload"]).expect("reload");
    let summary = v["summary"].as_str().unwrap_or("");
    assert!(summary.contains("added: second"), "{v}");
    // capnetd's --state-dir, --socket and --cgroup-parent still win over the file.
    assert!(!summary.contains("[daemon]"), "{v}");
    d.wait_driver("second", Duration::from_secs(15), |v| {
        v["state"] == "running"
    })
    .expect("second up");
    let after = d.driver("tcp").expect("tcp");
    assert_eq!(
        after["pid"], before["pid"],
        "an unaffected driver was restarted"
    );
    // A [daemon] key a reload cannot apply is named, and keeps its running value.
    let with_daemon = std::fs::read_to_string(d.config_path()).expect("config");
    assert!(with_daemon.contains("[daemon]\n"), "{with_daemon}");
    std::fs::write(
        d.config_path(),
        with_daemon.replacen("[daemon]\n", "[daemon]\nhealth_interval_ms = 1234\n", 1),
    )
    .expect("daemon key");
    let v = d.capnet_json(&["reload"]).expect("reload");
    assert!(
        v["summary"]
            .as_str()
            .unwrap_or("")
            .contains("changed in [daemon], effective after capnetd restarts: health_interval_ms"),
        "{v}"
    );
    let kinds = d.audit(&[]).expect("audit");
    assert!(kinds.iter().any(|r| r["kind"] == "reload_refused"));
    assert!(kinds.iter().any(|r| r["kind"] == "reload"));
}

/// Upgrading a driver swaps its plugin and the grants it served restore against the new
/// instance; revoking it stops it, revokes its grants and removes its approval.
#[test]
fn upgrade_keeps_grants_and_revoke_ends_them() {
    let echo = EchoServer::start().expect("echo");
    let p = echo.addr.port().to_string();
    let d = Daemon::start(&driver_config("tcp", "libcapnet_driver_tcp.so", "")).expect("daemon");
    d.start_test_grain("keeper", &["save"]).expect("grain");
    d.grant_next("tcp", &[]).expect("grant");
    d.wait_grain("keeper", Duration::from_secs(20))
        .expect("saved");
    let token = last_json(&d.grain_log("keeper"))["token"]
        .as_str()
        .expect("token")
        .to_string();

    let dir = tempfile::tempdir().expect("tmp");
    let newer = dir.path().join("tcp-v2.so");
    std::fs::copy(artifact("libcapnet_driver_tcp.so"), &newer).expect("copy");
    let newer_s = newer.display().to_string();
    let v = d
        .capnet_json(&["driver", "upgrade", "tcp", &newer_s, "--yes"])
        .expect("upgrade");
    assert_eq!(
        v["privileges_added"].as_array().map(Vec::len),
        Some(0),
        "{v}"
    );
    let identity = inspect_plugin(&newer).expect("inspect");
    assert_eq!(identity["ok"], true);
    d.wait_driver("tcp", Duration::from_secs(15), |v| {
        v["state"] == "running" && v["plugin"].as_str() == Some(newer_s.as_str())
    })
    .expect("running the new plugin");
    d.start_test_grain("keeper", &["restore", "--token", &token, "--echo-port", &p])
        .expect("restore");
    let st = d
        .wait_grain("keeper", Duration::from_secs(20))
        .expect("restored");
    assert_eq!(st["exit_status"], 0, "{}", d.grain_log("keeper"));

    // A powerbox rule still names tcp: revoking is refused before anything changes.
    let before = std::fs::read_to_string(d.config_path()).expect("config");
    let with_rule = format!(
        "{before}\n[[powerbox.rules]]\nname = \"web\"\ngrain = \"nobody\"\ninterface = \"IpNetwork\"\ndriver = \"tcp\"\n"
    );
    std::fs::write(d.config_path(), &with_rule).expect("add rule");
    d.capnet_json(&["reload"]).expect("reload with the rule");
    let out = d.capnet(&["driver", "revoke", "tcp", "--reason", "too early"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("nothing changed") && err.contains("powerbox.rules"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(d.config_path()).expect("config"),
        with_rule
    );
    let grants = d.capnet_json(&["grants", "list"]).expect("grants");
    assert!(
        grants
            .as_array()
            .is_some_and(|g| g.iter().any(|g| g["revoked"].is_null())),
        "the refused revocation revoked grants: {grants}"
    );
    std::fs::write(d.config_path(), &before).expect("remove rule");
    d.capnet_json(&["reload"]).expect("reload without the rule");

    let v = d
        .capnet_json(&["driver", "revoke", "tcp", "--reason", "retired"])
        .expect("revoke");
    assert_eq!(v["grants_revoked"], 1);
    assert!(d.drivers().expect("list").is_empty());
    let config = std::fs::read_to_string(d.config_path()).expect("config");
    assert!(!config.contains("[drivers.tcp]"), "{config}");
    d.start_test_grain("keeper", &["restore", "--token", &token])
        .expect("restore");
    d.wait_grain("keeper", Duration::from_secs(20))
        .expect("refused");
    let v = last_json(&d.grain_log("keeper"));
    assert!(
        v["refused"].as_str().unwrap_or("").contains("retired"),
        "{v}"
    );
}

/// Driver authors can sign a plugin; administrators who trust the author's key see it named
/// on inspect, the approval records the key, an upgrade signed by the same key says so, and
/// a signature that does not match the bytes is refused.
#[test]
fn signed_plugins_name_their_author() {
    let dir = tempfile::tempdir().expect("tmp");
    let key = dir.path().join("author.key");
    let d0 = Daemon::start("").expect("daemon");
    let kg = d0
        .capnet_json(&["sign", "keygen", "--out", &key.display().to_string()])
        .expect("keygen");
    let public = kg["public_key"].as_str().expect("public key").to_string();
    drop(d0);
    let v1 = dir.path().join("tcp-v1.so");
    let v2 = dir.path().join("tcp-v2.so");
    for p in [&v1, &v2] {
        std::fs::copy(artifact("libcapnet_driver_tcp.so"), p).expect("copy");
    }
    let d = Daemon::start(&format!("[trust.authors]\nacme = {public:?}\n")).expect("daemon");
    for p in [&v1, &v2] {
        d.capnet_json(&[
            "sign",
            "plugin",
            &p.display().to_string(),
            "--key",
            &key.display().to_string(),
        ])
        .expect("sign");
    }
    let v = d
        .capnet_json(&["driver", "inspect", &v1.display().to_string()])
        .expect("inspect");
    assert!(
        v["signature"]
            .as_str()
            .unwrap_or("")
            .contains("signed by acme"),
        "{v}"
    );
    assert_eq!(v["signer_key"], public.as_str());
    d.capnet_json(&[
        "driver",
        "approve",
        &v1.display().to_string(),
        "--name",
        "tcp",
        "--yes",
    ])
    .expect("approve");
    let config = std::fs::read_to_string(d.config_path()).expect("config");
    assert!(
        config.contains(&format!("signer_key = {public:?}")),
        "{config}"
    );
    let up = d
        .capnet_json(&[
            "driver",
            "upgrade",
            "tcp",
            &v2.display().to_string(),
            "--yes",
        ])
        .expect("upgrade");
    assert_eq!(up["same_signer"], true, "{up}");

    // A signature that does not match the bytes: inspect says so, approve refuses.
    let v3 = dir.path().join("tcp-v3.so");
    std::fs::copy(artifact("libcapnet_driver_tcp.so"), &v3).expect("copy");
    std::fs::copy(capnet_supervisor_sig(&v1), capnet_supervisor_sig(&v3)).expect("copy signature");
    let mut bytes = std::fs::read(&v3).expect("read");
    bytes.push(0);
    std::fs::write(&v3, bytes).expect("append");
    let v = d
        .capnet_json(&["driver", "inspect", &v3.display().to_string()])
        .expect("inspect");
    assert!(
        v["signature"].as_str().unwrap_or("").starts_with("INVALID"),
        "{v}"
    );
    let out = d.capnet(&[
        "driver",
        "approve",
        &v3.display().to_string(),
        "--name",
        "other",
        "--yes",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not verify"));
}

fn capnet_supervisor_sig(plugin: &std::path::Path) -> std::path::PathBuf {
    let mut s = plugin.as_os_str().to_owned();
    s.push(".sig");
    s.into()
}
