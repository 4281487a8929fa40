//! End-to-end tests of capnet-bridge: unmodified programs (curl, Python's standard
//! library) and the test grain's proxy clients run inside a grain started with
//! `capnet grain start -- capnet-bridge … -- app`, and reach loopback peers only through the
//! bridge, the supervisor's membrane and the TCP driver.
//!
//! Peers are addressed by names only the driver knows (its `static_hosts` option), so a
//! client that bypassed the bridge could not even resolve them. Everything a grain needs
//! is passed by argument (no files of the test are read from inside the grain), so the
//! tests keep working once grains run in sandboxes that see only `/usr`, `/bin`, `/lib`
//! and their app tree.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use capnet_tests::grain::{pseudo_random, sha256_hex};
use capnet_tests::{Daemon, EchoServer, artifact, driver_config, free_port};
use serde_json::Value;

/// The driver that serves the generic fetches (pages, the 100 MiB file, parallel
/// connections); `curl_and_python_fetch_pages_through_the_http_driver` uses the HTTP
/// egress driver instead.
const PAGE_DRIVER: &str = "tcp";

/// Names the driver resolves itself: the test peers on loopback, and a name whose only
/// address the default egress policy refuses.
const STATIC_HOSTS: &str = r#"static_hosts = { "web.capnet.test" = ["127.0.0.1"], "v6.capnet.test" = ["::1"], "denied.capnet.test" = ["10.0.0.1"] }"#;

fn daemon() -> Daemon {
    Daemon::start(&driver_config(
        "tcp",
        "libcapnet_driver_tcp.so",
        STATIC_HOSTS,
    ))
    .expect("daemon")
}

/// Starts grain `id` as `capnet-bridge --grant G… -- app…` with ephemeral proxy ports
/// (grains share the host's loopback until they get their own network namespace; then the
/// default ports work too) and no state file.
fn start_bridged(d: &Daemon, id: &str, grants: &[String], app: &[&str]) -> Value {
    let bridge = artifact("capnet-bridge").display().to_string();
    let mut args = vec![
        "grain",
        "start",
        "--id",
        id,
        "--",
        bridge.as_str(),
        "--socks",
        "127.0.0.1:0",
        "--http",
        "127.0.0.1:0",
        "--state",
        "off",
    ];
    for g in grants {
        args.push("--grant");
        args.push(g);
    }
    args.push("--");
    args.extend_from_slice(app);
    d.capnet_json(&args).expect("grain start")
}

/// Grants the next `n` powerbox requests from `driver`, checking each is the bridge's.
fn grant_requests(d: &Daemon, driver: &str, n: usize) {
    for _ in 0..n {
        let (req, _) = d.grant_next(driver, &[]).expect("grant");
        let label = req["label"].as_str().unwrap_or("");
        assert!(label.starts_with("capnet-bridge"), "{req}");
    }
}

fn finish(d: &Daemon, id: &str, timeout: Duration) -> String {
    let st = d.wait_grain(id, timeout).expect("wait");
    let log = d.grain_log(id);
    assert_eq!(st["exit_status"], 0, "grain {id} failed: {log}");
    log
}

/// The value after `KEY ` on the line that starts with it.
fn field<'a>(log: &'a str, key: &str) -> &'a str {
    log.lines()
        .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("no {key} line in:\n{log}"))
}

fn json_lines(log: &str) -> Vec<Value> {
    log.lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

const PAGE: &str = "hello from nginx through capnet";
const BIG: usize = 100 << 20;

/// nginx serving a page and a 100 MiB file on 127.0.0.1 and [::1] (one process, no
/// daemon, files in a temporary directory).
struct Nginx {
    child: Child,
    port: u16,
    big_sha: String,
    _dir: tempfile::TempDir,
}

impl Nginx {
    fn start() -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("capnet-nginx-").tempdir()?;
        let p = dir.path().to_path_buf();
        let p = p.as_path();
        std::fs::create_dir_all(p.join("www"))?;
        std::fs::create_dir_all(p.join("tmp"))?;
        std::fs::write(p.join("www/index.html"), format!("{PAGE}\n"))?;
        let big = pseudo_random(BIG, 1234);
        std::fs::write(p.join("www/big.bin"), &big)?;
        let big_sha = sha256_hex(&big);
        drop(big);
        let port = free_port();
        let d = p.display();
        let conf = format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\n\
             error_log {d}/error.log;\nevents {{ worker_connections 1024; }}\n\
             http {{\n  access_log {d}/access.log;\n  client_body_temp_path {d}/tmp/body;\n\
             proxy_temp_path {d}/tmp/proxy;\n  fastcgi_temp_path {d}/tmp/fcgi;\n\
             uwsgi_temp_path {d}/tmp/uwsgi;\n  scgi_temp_path {d}/tmp/scgi;\n\
             default_type application/octet-stream;\n  keepalive_timeout 65;\n\
             server {{ listen 127.0.0.1:{port}; listen [::1]:{port}; root {d}/www; }}\n}}\n"
        );
        std::fs::write(p.join("nginx.conf"), conf)?;
        let child = Command::new("nginx")
            .arg("-p")
            .arg(p)
            .arg("-e")
            .arg(p.join("error.log"))
            .arg("-c")
            .arg(p.join("nginx.conf"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting nginx (Debian package nginx; `make deps` installs it)")?;
        let mut n = Self {
            child,
            port,
            big_sha,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(st) = n.child.try_wait()? {
                let log = std::fs::read_to_string(p.join("error.log")).unwrap_or_default();
                bail!("nginx exited with {st}: {log}");
            }
            if Instant::now() > deadline {
                bail!("nginx did not listen on port {port} within 10s");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(n)
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Unmodified curl inside a grain, with only the proxy variables the bridge set, fetches
/// a page from nginx through the HTTP proxy (absolute-form GET), through an HTTP CONNECT
/// tunnel and through SOCKS5 with remote name resolution; reuses one proxy connection for
/// two requests (keep-alive); and downloads 100 MiB with the right SHA-256. The app does
/// not inherit the grain API's fd 3. Protects the bridge's whole data path for real
/// clients.
#[test]
fn curl_fetches_pages_and_100_mib_through_the_bridge() {
    let d = daemon();
    let web = Nginx::start().expect("nginx");
    let url = format!("http://web.capnet.test:{}", web.port);
    let script = format!(
        r#"set -eu -o pipefail
echo "PAGE_HTTP $(curl -sS --fail {url}/index.html)"
echo "PAGE_CONNECT $(curl -sS --fail -p -x "$http_proxy" {url}/index.html)"
echo "PAGE_SOCKS $(curl -sS --fail -x "$ALL_PROXY" {url}/index.html)"
echo "REUSED $(curl -sS -v --fail -o /dev/null -o /dev/null {url}/index.html {url}/index.html 2>&1 | grep -c 'Re-using existing connection')"
echo "BIG $(curl -sS --fail {url}/big.bin | sha256sum | cut -d' ' -f1)"
echo "FD3 $(ls /proc/self/fd/3 2>/dev/null || echo closed)""#
    );
    start_bridged(
        &d,
        "curl",
        &["network".into()],
        &["/bin/bash", "-c", &script],
    );
    grant_requests(&d, PAGE_DRIVER, 1);
    let log = finish(&d, "curl", Duration::from_secs(120));
    assert_eq!(field(&log, "PAGE_HTTP"), PAGE, "{log}");
    assert_eq!(field(&log, "PAGE_CONNECT"), PAGE, "{log}");
    assert_eq!(field(&log, "PAGE_SOCKS"), PAGE, "{log}");
    assert_eq!(field(&log, "REUSED"), "1", "{log}");
    assert_eq!(field(&log, "BIG"), web.big_sha, "{log}");
    assert_eq!(field(&log, "FD3"), "closed", "{log}");
    // The driver made the connections, to the address it resolved the name to.
    let dlog = d.log();
    assert!(
        dlog.contains(&format!("127.0.0.1:{}", web.port)) && dlog.contains("connect_allowed"),
        "{dlog}"
    );
}

/// Unmodified curl (HTTP proxy and SOCKS5) and Python's urllib in a sandboxed grain fetch
/// a page from nginx through a network grant of the HTTP egress driver; a request whose
/// Host header names another site on the same connection is answered 403 by the driver.
/// Protects the bridge over the HTTP driver: its Host check applies to bridged clients.
#[test]
fn curl_and_python_fetch_pages_through_the_http_driver() {
    let web = Nginx::start().expect("nginx");
    let d = Daemon::start(&driver_config(
        "http",
        "libcapnet_driver_http.so",
        &format!("ports = [{}]\ntls_ports = []\n{STATIC_HOSTS}", web.port),
    ))
    .expect("daemon");
    let url = format!("http://web.capnet.test:{}", web.port);
    let script = format!(
        r#"set -eu -o pipefail
echo "PAGE_HTTP $(curl -sS --fail {url}/index.html)"
echo "PAGE_SOCKS $(curl -sS --fail -x "$ALL_PROXY" {url}/index.html)"
echo "OTHER_HOST $(curl -sS -o /dev/null -w '%{{http_code}}' -x "$ALL_PROXY" -H 'Host: other.capnet.test' {url}/index.html)"
echo "PAGE_PY $(python3 -c 'import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=60).read().decode().strip())' {url}/index.html)""#
    );
    start_bridged(
        &d,
        "curl-http",
        &["network".into()],
        &["/bin/bash", "-c", &script],
    );
    grant_requests(&d, "http", 1);
    let log = finish(&d, "curl-http", Duration::from_secs(60));
    assert_eq!(field(&log, "PAGE_HTTP"), PAGE, "{log}");
    assert_eq!(field(&log, "PAGE_SOCKS"), PAGE, "{log}");
    assert_eq!(field(&log, "OTHER_HOST"), "403", "{log}");
    assert_eq!(field(&log, "PAGE_PY"), PAGE, "{log}");
}

/// A Python script using only the standard library (`urllib.request`, which reads the
/// proxy variables) inside a grain fetches the page and the 100 MiB file through the
/// bridge with the right SHA-256, and sees no fd 3.
#[test]
fn python_urllib_fetches_through_the_bridge() {
    let d = daemon();
    let web = Nginx::start().expect("nginx");
    let url = format!("http://web.capnet.test:{}", web.port);
    let script = r#"
import hashlib, os, sys, urllib.request
base = sys.argv[1]
with urllib.request.urlopen(base + "/index.html", timeout=60) as r:
    print("PAGE", r.read().decode().strip())
h, n = hashlib.sha256(), 0
with urllib.request.urlopen(base + "/big.bin", timeout=60) as r:
    while True:
        b = r.read(1 << 20)
        if not b:
            break
        h.update(b)
        n += len(b)
print("BIG", n, h.hexdigest())
print("FD3", os.path.exists("/proc/self/fd/3"))
"#;
    start_bridged(
        &d,
        "python",
        &["network".into()],
        &["/usr/bin/python3", "-c", script, &url],
    );
    grant_requests(&d, PAGE_DRIVER, 1);
    let log = finish(&d, "python", Duration::from_secs(120));
    assert_eq!(field(&log, "PAGE"), PAGE, "{log}");
    assert_eq!(
        field(&log, "BIG"),
        format!("{BIG} {}", web.big_sha),
        "{log}"
    );
    assert_eq!(field(&log, "FD3"), "False", "{log}");
}

/// With narrow grants only (TcpPort to the web server and to a closed port, IpRemoteHost
/// for a name the policy denies and for 10.0.0.1, TcpPort to [::1]), each target gets
/// the right SOCKS5 reply code and HTTP statuses: allowed (0, 200), no grant (0x02, 403
/// naming "no grant"), a literal address the policy refuses (0x02, 403 naming the
/// driver's `refused:`), a name whose only address the policy refuses (0x04, 502: the
/// driver reports it as not found), a closed port (0x05, 502). curl sees the 403 too. The
/// driver audits the policy refusals; the bridge logs the missing grant in the grain log.
/// No packet leaves loopback: refused addresses are never connected to.
#[test]
fn refusals_get_the_right_codes_and_statuses() {
    let d = daemon();
    let web = Nginx::start().expect("nginx");
    let closed = free_port();
    let grants = vec![
        format!("tcp:web.capnet.test:{}", web.port),
        format!("tcp:web.capnet.test:{closed}"),
        "host:denied.capnet.test".to_string(),
        "host:10.0.0.1".to_string(),
        format!("tcp:[::1]:{}", web.port),
    ];
    let targets = [
        format!("web.capnet.test:{}", web.port),
        format!("[::1]:{}", web.port),
        "other.capnet.test:80".to_string(),
        "10.0.0.1:80".to_string(),
        "denied.capnet.test:80".to_string(),
        format!("web.capnet.test:{closed}"),
    ];
    // Inside the grain: the bridge's directory (target/<profile>) is the app tree at /app.
    let probe = "/app/capnet-test-grain".to_string();
    let script = format!(
        r#"set -eu
"$0" proxy-probe {}
echo "CURL_NO_GRANT $(curl -s -o /dev/null -w '%{{http_code}}' http://other.capnet.test/)""#,
        targets.join(" ")
    );
    start_bridged(
        &d,
        "refusals",
        &grants,
        &["/bin/bash", "-c", &script, &probe],
    );
    grant_requests(&d, "tcp", grants.len());
    let log = finish(&d, "refusals", Duration::from_secs(60));
    let lines = json_lines(&log);
    let result = |t: &str| {
        lines
            .iter()
            .find(|v| v["target"] == t)
            .unwrap_or_else(|| panic!("no probe result for {t} in:\n{log}"))
            .clone()
    };
    let expect = [
        (targets[0].as_str(), 0, 200, 200, ""),
        (targets[1].as_str(), 0, 200, 200, ""),
        (targets[2].as_str(), 2, 403, 403, "no grant"),
        (targets[3].as_str(), 2, 403, 403, "refused:"),
        (targets[4].as_str(), 4, 502, 502, "not found:"),
        (targets[5].as_str(), 5, 502, 502, "onnection refused"),
    ];
    for (t, socks, connect, get, reason) in expect {
        let r = result(t);
        assert_eq!(r["socks"], socks, "SOCKS5 reply for {t}: {r}");
        assert_eq!(r["connect"], connect, "HTTP CONNECT for {t}: {r}");
        assert_eq!(r["get"], get, "GET for {t}: {r}");
        if !reason.is_empty() {
            for body in [&r["connect_body"], &r["get_body"]] {
                let body = body.as_str().unwrap_or("");
                assert!(
                    body.contains(reason),
                    "{t}: {body:?} should name {reason:?}"
                );
            }
        }
    }
    assert_eq!(field(&log, "CURL_NO_GRANT"), "403", "{log}");
    // The bridge's own record of the missing grant (it has no audit channel).
    assert!(
        log.contains("capnet_bridge::refusal") && log.contains("other.capnet.test:80"),
        "{log}"
    );
    // The driver's audit records of the policy refusals.
    let dlog = d.log();
    assert!(dlog.contains("connect_refused"), "{dlog}");
    assert!(dlog.contains("10.0.0.1:80"), "{dlog}");
}

/// A server for close semantics, seen from the server's side.
struct Hold {
    port: u16,
    /// (mode, what happened) for each connection.
    events: mpsc::Receiver<(String, String)>,
    /// Sockets the server keeps open on purpose.
    held: Arc<Mutex<Vec<TcpStream>>>,
    /// Lets `wait` connections finish.
    release: mpsc::Sender<()>,
}

/// Starts a hold server. The client's first line picks the mode: `abort` (read to the
/// end, report it, keep the socket open), `half` (read to the end, then answer `bye` and
/// close), `serverclose` (close at once), `stream` (write until writing fails, at most
/// 60 s), `wait` (answer `go` once the test releases it).
fn hold_server() -> Result<Hold> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let port = l.local_addr()?.port();
    let (tx, rx) = mpsc::channel();
    let (release, released) = mpsc::channel::<()>();
    let released = Arc::new(Mutex::new(released));
    let held = Arc::new(Mutex::new(Vec::new()));
    let keep = held.clone();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            let tx = tx.clone();
            let keep = keep.clone();
            let released = released.clone();
            std::thread::spawn(move || {
                let Ok(mut w) = s.try_clone() else { return };
                let mut r = BufReader::new(s);
                let mut mode = String::new();
                if r.read_line(&mut mode).is_err() || w.write_all(b"ok\n").is_err() {
                    return;
                }
                let mode = mode.trim().to_string();
                let to_end = |r: &mut BufReader<TcpStream>| {
                    let mut sink = Vec::new();
                    match r.read_to_end(&mut sink) {
                        Ok(_) => "eof".to_string(),
                        Err(e) => format!("error: {e}"),
                    }
                };
                let what = match mode.as_str() {
                    "abort" => {
                        let what = to_end(&mut r);
                        if let Ok(mut k) = keep.lock() {
                            k.push(w);
                        }
                        what
                    }
                    "half" => {
                        let what = to_end(&mut r);
                        let _ = w.write_all(b"bye\n");
                        what
                    }
                    "serverclose" => "closed".to_string(),
                    "stream" => {
                        let chunk = vec![7u8; 64 * 1024];
                        let t0 = Instant::now();
                        loop {
                            if let Err(e) = w.write_all(&chunk) {
                                break format!("write failed: {e}");
                            }
                            if t0.elapsed() > Duration::from_secs(60) {
                                break "still writing after 60s".to_string();
                            }
                        }
                    }
                    "wait" => {
                        let ok = released
                            .lock()
                            .map(|r| r.recv_timeout(Duration::from_secs(60)).is_ok())
                            .unwrap_or(false);
                        let _ = w.write_all(b"go\n");
                        if ok { "released" } else { "not released" }.to_string()
                    }
                    other => format!("unknown mode {other}"),
                };
                let _ = tx.send((mode, what));
            });
        }
    });
    Ok(Hold {
        port,
        events: rx,
        held,
        release,
    })
}

/// One bridge carries 200 SOCKS5 and 50 HTTP CONNECT connections at once, each echoing
/// 64 KiB with the right checksum and EOF. Then, while the bridge keeps running, close
/// semantics: a client reset aborts the capability connection (the server sees the end,
/// and the driver's open-connection count drops although the server still holds its
/// socket); a client half-close reaches the server, which can still answer; a server close
/// reaches the client; a client that drops mid-download makes the server's writes fail.
/// When the grain ends, nothing stays open, and the driver has audited every connection.
#[test]
fn many_parallel_connections_and_closing_propagates() {
    let d = daemon();
    let echo = EchoServer::start().expect("echo");
    let hold = hold_server().expect("hold server");
    // Inside the grain: the bridge's directory (target/<profile>) is the app tree at /app.
    let tg = "/app/capnet-test-grain".to_string();
    let script = format!(
        r#"set -eu
"$0" proxy-swarm --host web.capnet.test --port {} --count 200 --http-count 50
"$0" proxy-close --host web.capnet.test --port {}"#,
        echo.addr.port(),
        hold.port
    );
    start_bridged(
        &d,
        "swarm",
        &["network".into()],
        &["/bin/bash", "-c", &script, &tg],
    );
    grant_requests(&d, "tcp", 1);

    let mut seen = std::collections::BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while seen.len() < 4 {
        let left = deadline.saturating_duration_since(Instant::now());
        match hold.events.recv_timeout(left) {
            Ok((mode, what)) => {
                seen.insert(mode, what);
            }
            Err(_) => panic!(
                "the hold server saw only {seen:?}\n{}",
                d.grain_log("swarm")
            ),
        }
    }
    assert_eq!(seen["abort"], "eof", "{seen:?}");
    assert_eq!(seen["half"], "eof", "{seen:?}");
    assert_eq!(seen["serverclose"], "closed", "{seen:?}");
    assert!(seen["stream"].starts_with("write failed"), "{seen:?}");
    // Only the waiting connection is left on the capability side, although the server
    // still holds the reset connection's socket open.
    d.wait_driver("tcp", Duration::from_secs(10), |v| {
        v["open_connections"] == 1
    })
    .expect("only the waiting connection is open");
    assert_eq!(hold.held.lock().map(|h| h.len()).unwrap_or(0), 1);
    hold.release.send(()).expect("release");

    let log = finish(&d, "swarm", Duration::from_secs(60));
    let lines = json_lines(&log);
    let swarm = lines
        .iter()
        .find(|v| v["connections"].is_number())
        .unwrap_or_else(|| panic!("no swarm result in:\n{log}"));
    assert_eq!(swarm["connections"], 250, "{swarm}");
    assert_eq!(swarm["failed"], 0, "{swarm}");
    let half = lines
        .iter()
        .find(|v| v["event"] == "half_close")
        .unwrap_or_else(|| panic!("no half-close result in:\n{log}"));
    assert_eq!(half["after_fin"], "bye\n", "{half}");
    assert!(log.contains(r#""released":"go\n""#), "{log}");
    d.wait_driver("tcp", Duration::from_secs(10), |v| {
        v["open_connections"] == 0
    })
    .expect("every capability connection closed");
    let closed = d.log().matches("connection_closed").count();
    assert!(
        closed >= 255,
        "only {closed} connection_closed audit records"
    );
}

/// A grant the bridge asked for is saved with `SystemPersistent.save()` (the token kept
/// in the bridge's state file in the grain's own `/var`) and restored on the next start
/// instead of asking the administrator again; the page is fetched both times.
#[test]
fn bridge_saves_and_restores_its_grants() {
    let d = daemon();
    let web = Nginx::start().expect("nginx");
    let url = format!("http://web.capnet.test:{}/index.html", web.port);
    let bridge = artifact("capnet-bridge").display().to_string();
    let run = |id: &str| {
        d.capnet_json(&[
            "grain",
            "start",
            "--id",
            id,
            "--",
            &bridge,
            "--socks",
            "off",
            "--http",
            "127.0.0.1:0",
            "--grant",
            "network",
            "--",
            "/usr/bin/curl",
            "-sS",
            "--fail",
            &url,
        ])
        .expect("grain start");
    };
    run("persist");
    grant_requests(&d, "tcp", 1);
    let log1 = finish(&d, "persist", Duration::from_secs(30));
    assert_eq!(log1.matches(PAGE).count(), 1, "{log1}");
    assert!(log1.contains("saved; later runs restore it"), "{log1}");
    let state = d.dir().join("state/grains/persist/var/capnet-bridge.state");
    assert!(state.exists(), "no state file at {}", state.display());
    run("persist");
    let log2 = finish(&d, "persist", Duration::from_secs(30));
    assert!(log2.contains("restored from the saved token"), "{log2}");
    assert_eq!(log2.matches(PAGE).count(), 2, "{log2}");
    let pending = d.capnet_json(&["powerbox", "list"]).expect("list");
    assert_eq!(pending, serde_json::json!([]), "the restart asked again");
}

/// A grain defined in the config with `bridge = [bridge arguments]` runs its command
/// under capnet-bridge: `capnet grain start NAME` makes the bridge ask for its grant, and
/// the unmodified curl in it fetches the page through the proxy variables.
#[test]
fn grain_config_bridge_key_wraps_the_command() {
    let web = Nginx::start().expect("nginx");
    let url = format!("http://web.capnet.test:{}/index.html", web.port);
    let config = format!(
        "{}\n[grains.web]\ncommand = [\"/usr/bin/curl\", \"-sS\", \"--fail\", {url:?}]\n\
         bridge = [\"--socks\", \"off\", \"--http\", \"127.0.0.1:0\", \"--state\", \"off\", \
         \"--grant\", \"network\"]\n",
        driver_config("tcp", "libcapnet_driver_tcp.so", STATIC_HOSTS)
    );
    let d = Daemon::start(&config).expect("daemon");
    let started = d.capnet_json(&["grain", "start", "web"]).expect("start");
    let command = started["command"].to_string();
    assert!(command.contains("capnet-bridge"), "{started}");
    grant_requests(&d, "tcp", 1);
    let log = finish(&d, "web", Duration::from_secs(30));
    assert!(log.contains(PAGE), "{log}");
}
