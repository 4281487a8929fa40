//! Powerbox, persistence and live revocation, end to end: saved capabilities that survive
//! grain, driver-host and supervisor restarts; tokens bound to their grain; revocation that
//! cuts live connections at once; narrow grants; rules; expiry; the audit trail.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use capnet_tests::{Daemon, EchoServer, driver_config, free_port, now_ms};
use serde_json::Value;

fn tcp_daemon(extra: &str) -> Daemon {
    Daemon::start(&format!(
        "{extra}\n{}",
        driver_config("tcp", "libcapnet_driver_tcp.so", "")
    ))
    .expect("daemon")
}

fn last_json(log: &str) -> Value {
    log.lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| panic!("no JSON line in {log}"))
}

/// Runs a test grain to completion and returns (exit status, last JSON line).
fn run_grain(d: &Daemon, id: &str, args: &[&str]) -> (i64, Value) {
    d.start_test_grain(id, args).expect("start grain");
    let st = d.wait_grain(id, Duration::from_secs(60)).expect("wait");
    let log = d.grain_log(id);
    (st["exit_status"].as_i64().unwrap_or(-1), last_json(&log))
}

fn save(d: &Daemon, id: &str, args: &[&str], driver: &str) -> String {
    let mut all = vec!["save"];
    all.extend_from_slice(args);
    d.start_test_grain(id, &all).expect("start");
    d.grant_next(driver, &[]).expect("grant");
    let st = d.wait_grain(id, Duration::from_secs(30)).expect("wait");
    let v = last_json(&d.grain_log(id));
    assert_eq!(st["exit_status"], 0, "{v}");
    v["token"].as_str().expect("token").to_string()
}

/// save → grain restart → restore → the capability works; the same after the driver host
/// is killed and after `kill -9` of capnetd (a network token and a port token).
#[test]
fn saved_capabilities_survive_every_restart() {
    let mut d = tcp_daemon("");
    let echo = EchoServer::start().expect("echo");
    let p = echo.addr.port().to_string();
    let net_token = save(&d, "keeper", &["--kind", "network"], "tcp");
    let port_token = save(
        &d,
        "keeper",
        &["--kind", "tcpport", "--host", "127.0.0.1", "--port", &p],
        "tcp",
    );
    let check = |d: &Daemon, when: &str| {
        let (st, v) = run_grain(
            d,
            "keeper",
            &["restore", "--token", &net_token, "--echo-port", &p],
        );
        assert_eq!(st, 0, "network token after {when}: {v}");
        let (st, v) = run_grain(
            d,
            "keeper",
            &[
                "restore",
                "--token",
                &port_token,
                "--kind",
                "tcpport",
                "--echo-port",
                &p,
            ],
        );
        assert_eq!(st, 0, "port token after {when}: {v}");
    };
    check(&d, "a grain restart");

    let pid = d.driver("tcp").expect("tcp")["pid"].as_i64().expect("pid");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill driver host");
    d.wait_driver("tcp", Duration::from_secs(15), |v| {
        v["state"] == "running" && v["restarts"].as_u64().unwrap_or(0) >= 1
    })
    .expect("driver back");
    check(&d, "a driver host kill");

    d.kill9();
    d.restart().expect("restart");
    d.wait_driver("tcp", Duration::from_secs(15), |v| v["state"] == "running")
        .expect("driver up");
    check(&d, "kill -9 of capnetd");
    let kinds: Vec<String> = d
        .audit(&["--grain", "keeper"])
        .expect("audit")
        .iter()
        .map(|r| r["kind"].as_str().unwrap_or("").to_string())
        .collect();
    for k in ["request", "grant", "save", "restore"] {
        assert!(kinds.iter().any(|x| x == k), "no {k} record in {kinds:?}");
    }
}

/// Only the grain that saved a token can restore it; a random token, a dropped token and a
/// token of a revoked grant are refused with clear errors; each refusal is audited.
#[test]
fn tokens_are_bound_to_their_grain_and_die() {
    let d = tcp_daemon("");
    let token = save(&d, "owner", &[], "tcp");

    let (st, v) = run_grain(&d, "thief", &["restore", "--token", &token]);
    assert_eq!(st, 3);
    assert!(
        v["refused"]
            .as_str()
            .unwrap_or("")
            .contains("belongs to another grain"),
        "{v}"
    );

    let random = "ab".repeat(32);
    let (st, v) = run_grain(&d, "owner", &["restore", "--token", &random]);
    assert_eq!(st, 3);
    assert!(
        v["refused"]
            .as_str()
            .unwrap_or("")
            .contains("unknown token"),
        "{v}"
    );

    let (st, v) = run_grain(&d, "thief", &["drop", "--token", &token]);
    assert_eq!(st, 3, "another grain must not drop it: {v}");
    let (st, _) = run_grain(&d, "owner", &["drop", "--token", &token]);
    assert_eq!(st, 0);
    let (st, v) = run_grain(&d, "owner", &["restore", "--token", &token]);
    assert_eq!(st, 3);
    assert!(
        v["refused"].as_str().unwrap_or("").contains("dropped"),
        "{v}"
    );

    let token2 = save(&d, "owner", &[], "tcp");
    let grants = d
        .capnet_json(&["grants", "list", "--grain", "owner"])
        .expect("list");
    let live: Vec<&Value> = grants
        .as_array()
        .expect("array")
        .iter()
        .filter(|g| g["revoked"].is_null())
        .collect();
    let gid = live.last().expect("a live grant")["id"]
        .as_str()
        .expect("id")
        .to_string();
    d.capnet_json(&["grants", "revoke", &gid, "--reason", "test over"])
        .expect("revoke");
    let (st, v) = run_grain(&d, "owner", &["restore", "--token", &token2]);
    assert_eq!(st, 3);
    let refused = v["refused"].as_str().unwrap_or("");
    assert!(
        refused.starts_with("revoked:") && refused.contains("test over"),
        "{v}"
    );

    let refusals: Vec<Value> = d.audit(&["--kind", "restore_refused"]).expect("audit");
    assert!(refusals.len() >= 4, "{refusals:?}");
    assert!(refusals.iter().any(|r| r["grain"] == "thief"));
    for k in ["drop", "revoke", "drop_refused"] {
        assert!(
            !d.audit(&["--kind", k]).expect("audit").is_empty(),
            "no {k} record"
        );
    }
}

/// Deleting a grain removes its grants and tokens.
#[test]
fn deleting_a_grain_removes_its_grants_and_tokens() {
    let d = tcp_daemon("");
    let token = save(&d, "doomed", &[], "tcp");
    let v = d
        .capnet_json(&["grain", "delete", "doomed"])
        .expect("delete");
    assert_eq!(v["grants"], 1);
    assert_eq!(v["tokens"], 1);
    let grants = d
        .capnet_json(&["grants", "list", "--grain", "doomed"])
        .expect("list");
    assert_eq!(grants.as_array().map(Vec::len), Some(0), "{grants}");
    let (st, v) = run_grain(&d, "doomed", &["restore", "--token", &token]);
    assert_eq!(st, 3);
    assert!(
        v["refused"]
            .as_str()
            .unwrap_or("")
            .contains("unknown token"),
        "{v}"
    );
    assert!(
        !d.audit(&["--kind", "grain_deleted"])
            .expect("audit")
            .is_empty()
    );
}

/// A server socket that records when its peer's connection ended.
/// (close time in ms since the epoch, bytes received) per ended connection.
type Closes = Arc<Mutex<Vec<(u64, u64)>>>;

fn closing_server(read_everything: bool) -> (u16, Closes) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().expect("addr").port();
    let closes = Arc::new(Mutex::new(Vec::new()));
    let c2 = closes.clone();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            let closes = c2.clone();
            std::thread::spawn(move || {
                let mut s = s;
                let mut buf = vec![0u8; 1 << 20];
                let mut total = 0u64;
                loop {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            total += n as u64;
                            if !read_everything {
                                let _ = s.write_all(&buf[..n]);
                            }
                        }
                    }
                }
                if let Ok(mut c) = closes.lock() {
                    c.push((now_ms(), total));
                }
            });
        }
    });
    (port, closes)
}

/// Revocation closes an active bulk transfer (meant to be 1 GiB) and an idle connection
/// within 100 ms of the revocation, stops a listener, and later calls fail with `revoked`.
#[test]
fn revocation_is_live_within_100_ms() {
    let d = tcp_daemon("");
    let (sink, sink_closes) = closing_server(true);
    let (echo, echo_closes) = closing_server(false);
    let listen = free_port();
    d.start_test_grain(
        "victim",
        &[
            "revoke-victim",
            "--sink-port",
            &sink.to_string(),
            "--echo-port",
            &echo.to_string(),
            "--listen-port",
            &listen.to_string(),
        ],
    )
    .expect("grain");
    let (_, net_grant) = d.grant_next("tcp", &[]).expect("network");
    let (_, if_grant) = d.grant_next("tcp", &[]).expect("interface");
    d.wait_log("victim", "READY", Duration::from_secs(10))
        .expect("ready");
    TcpStream::connect(("127.0.0.1", listen)).expect("listener up before revocation");
    // The transfer is under way.
    let deadline = Instant::now() + Duration::from_secs(10);
    while d
        .capnet_json(&["grants", "list", "--grain", "victim"])
        .expect("list")
        .as_array()
        .and_then(|a| a.iter().find(|g| g["id"] == net_grant.as_str()).cloned())
        .is_none_or(|g| g["bytes_out"].as_u64().unwrap_or(0) < 16 << 20)
    {
        assert!(Instant::now() < deadline, "the bulk transfer did not start");
        std::thread::sleep(Duration::from_millis(20));
    }

    d.capnet_json(&[
        "grants",
        "revoke",
        &net_grant,
        "--reason",
        "bandwidth abuse",
    ])
    .expect("revoke network");
    d.capnet_json(&["grants", "revoke", &if_grant])
        .expect("revoke interface");
    let refused_at = {
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            match TcpStream::connect(("127.0.0.1", listen)) {
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => break now_ms(),
                _ if Instant::now() > deadline => panic!("listener still open after revocation"),
                _ => std::thread::sleep(Duration::from_millis(2)),
            }
        }
    };
    let deadline = Instant::now() + Duration::from_secs(2);
    let (sink_close, echo_close) = loop {
        let s = sink_closes.lock().expect("lock").first().copied();
        let e = echo_closes.lock().expect("lock").first().copied();
        if let (Some(s), Some(e)) = (s, e) {
            break (s, e);
        }
        assert!(
            Instant::now() < deadline,
            "connections still open 2 s after revocation"
        );
        std::thread::sleep(Duration::from_millis(2));
    };
    let at = |g: &str| d.revoked_at_ms(g).expect("revoke record");
    let (t_net, t_if) = (at(&net_grant), at(&if_grant));
    let bulk_ms = sink_close.0.saturating_sub(t_net);
    let idle_ms = echo_close.0.saturating_sub(t_net);
    let listen_ms = refused_at.saturating_sub(t_if);
    eprintln!(
        "revocation: bulk closed after {bulk_ms} ms ({} MiB moved), idle after {idle_ms} ms, \
         listener after {listen_ms} ms",
        sink_close.1 >> 20
    );
    assert!(
        sink_close.1 < 1 << 30,
        "the transfer finished before it was revoked"
    );
    assert!(
        bulk_ms <= 100,
        "bulk transfer closed {bulk_ms} ms after revocation"
    );
    assert!(
        idle_ms <= 100,
        "idle connection closed {idle_ms} ms after revocation"
    );
    assert!(
        listen_ms <= 100,
        "listener stopped {listen_ms} ms after revocation"
    );

    let st = d
        .wait_grain("victim", Duration::from_secs(10))
        .expect("victim ends");
    let v = last_json(&d.grain_log("victim"));
    assert_eq!(st["exit_status"], 0, "{v}");
    for key in ["connect_error", "host_error"] {
        let e = v[key].as_str().unwrap_or("");
        assert!(
            e.starts_with("revoked:") && e.contains("bandwidth abuse"),
            "{key}: {v}"
        );
    }
}

/// A TcpPort grant reaches its host and port and nothing else, whatever interface the
/// grain tries to use it as.
#[test]
fn narrow_tcpport_grant_reaches_only_its_port() {
    let d = tcp_daemon("");
    let echo = EchoServer::start().expect("echo");
    let other = EchoServer::start().expect("other");
    let (p, q) = (echo.addr.port().to_string(), other.addr.port().to_string());
    d.start_test_grain(
        "narrow",
        &["narrow-probe", "--port", &p, "--other-port", &q],
    )
    .expect("grain");
    let (req, _) = d.grant_next("tcp", &[]).expect("grant");
    assert_eq!(req["interface"], "TcpPort");
    let st = d
        .wait_grain("narrow", Duration::from_secs(20))
        .expect("wait");
    let v = last_json(&d.grain_log("narrow"));
    assert_eq!(st["exit_status"], 0, "{v}");
    assert_eq!(v["ok"], true, "{v}");
}

/// Rules in the config answer kinds of requests in advance, and are audited as such;
/// unanswered requests expire with a clear error.
#[test]
fn rules_answer_in_advance_and_requests_expire() {
    let echo = EchoServer::start().expect("echo");
    let p = echo.addr.port();
    let d = tcp_daemon(&format!(
        r#"
[daemon]
request_timeout_secs = 1

[[powerbox.rules]]
name = "ruled-echo"
grain = "ruled"
interface = "TcpPort"
host = "127.0.0.1"
port = {p}
driver = "tcp"

[[powerbox.rules]]
name = "no-listening"
interface = "IpInterface"
action = "deny"
"#
    ));
    let (st, v) = run_grain(
        &d,
        "ruled",
        &[
            "request",
            "--kind",
            "tcpport",
            "--host",
            "127.0.0.1",
            "--port",
            &p.to_string(),
        ],
    );
    assert_eq!(st, 0, "{v}");
    let grants = d
        .capnet_json(&["grants", "list", "--grain", "ruled"])
        .expect("list");
    assert_eq!(grants[0]["source"], "rule:ruled-echo", "{grants}");
    assert_eq!(grants[0]["kind"], format!("TcpPort 127.0.0.1:{p}"));

    let (st, v) = run_grain(&d, "listener", &["request", "--kind", "interface"]);
    assert_eq!(st, 3);
    assert!(
        v["refused"].as_str().unwrap_or("").contains("no-listening"),
        "{v}"
    );

    let (st, v) = run_grain(&d, "patient", &["request", "--kind", "network"]);
    assert_eq!(st, 3);
    assert!(
        v["refused"].as_str().unwrap_or("").starts_with("expired:"),
        "{v}"
    );
    assert!(
        !d.audit(&["--kind", "request_expired", "--grain", "patient"])
            .expect("audit")
            .is_empty()
    );
    let grant_records = d
        .audit(&["--kind", "grant", "--grain", "ruled"])
        .expect("audit");
    assert!(
        grant_records[0]["detail"]
            .as_str()
            .unwrap_or("")
            .contains("ruled-echo")
    );
}
