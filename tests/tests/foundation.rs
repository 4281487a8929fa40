//! End-to-end tests of the foundation: a real capnetd, the real CLI, real driver hosts and
//! grains talking TCP through granted capabilities on loopback.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::Duration;

use capnet_tests::{Daemon, EchoServer, artifact, driver_config, free_port, wait_refused};

fn tcp_daemon() -> Daemon {
    Daemon::start(&driver_config("tcp", "libcapnet_driver_tcp.so", "")).expect("daemon")
}

fn log_json(log: &str) -> Vec<serde_json::Value> {
    log.lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// A grain requests IpNetwork, is granted through the CLI, sends 64 MiB of pseudo-random
/// data to a loopback echo server through the granted capability, gets exactly the same
/// bytes back (SHA-256), half-closes and sees EOF. Protects the whole capability data
/// path: grain → supervisor membrane → driver host → TCP and back.
#[test]
fn grain_echoes_64_mib_through_a_granted_network() {
    let d = tcp_daemon();
    let echo = EchoServer::start().expect("echo");
    let port = echo.addr.port().to_string();
    d.start_test_grain("echo64", &["echo", "--port", &port, "--bytes", "67108864"])
        .expect("start grain");
    let (req, grant) = d.grant_next("tcp", &[]).expect("grant");
    assert_eq!(req["interface"], "IpNetwork");
    assert_eq!(req["grain"], "echo64");
    assert!(grant.starts_with("grant-"), "{grant}");
    let st = d
        .wait_grain("echo64", Duration::from_secs(120))
        .expect("wait");
    let log = d.grain_log("echo64");
    assert_eq!(st["exit_status"], 0, "grain failed: {log}");
    let result = log_json(&log)
        .into_iter()
        .find(|v| v["ok"] == true)
        .unwrap_or_else(|| panic!("no result in log: {log}"));
    assert_eq!(result["bytes"], 67108864);
    assert_eq!(result["eof"], true);
}

/// A grain listens with listenTcp; a client outside connects and exchanges data both
/// ways; after the grain drops the Handle, new connections are refused while the open one
/// keeps working.
#[test]
fn grain_listens_until_it_drops_the_handle() {
    let d = tcp_daemon();
    let port = free_port();
    let p = port.to_string();
    d.start_test_grain("listener", &["listen", "--port", &p])
        .expect("start grain");
    let (req, _) = d.grant_next("tcp", &[]).expect("grant");
    assert_eq!(req["interface"], "IpInterface");
    d.wait_log(
        "listener",
        &format!("LISTENING {port}"),
        Duration::from_secs(10),
    )
    .expect("listening");

    let mut client = TcpStream::connect(("127.0.0.1", port)).expect("connect to the grain");
    client
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut reader = BufReader::new(client.try_clone().expect("clone"));
    client.write_all(b"hello grain\n").expect("write");
    let mut line = String::new();
    reader.read_line(&mut line).expect("read");
    assert_eq!(line, "echo: hello grain\n");

    client.write_all(b"drop\n").expect("write");
    line.clear();
    reader.read_line(&mut line).expect("read");
    assert_eq!(line, "dropped\n");
    wait_refused(port, Duration::from_secs(5)).expect("listener stopped");

    // The connection accepted before the drop still works.
    client.write_all(b"still here\n").expect("write");
    line.clear();
    reader.read_line(&mut line).expect("read");
    assert_eq!(line, "echo: still here\n");
    client.write_all(b"quit\n").expect("write");
    let st = d
        .wait_grain("listener", Duration::from_secs(10))
        .expect("wait");
    assert_eq!(st["exit_status"], 0, "{}", d.grain_log("listener"));
}

/// A denied request fails in the grain with the administrator's reason.
#[test]
fn denied_request_fails_in_the_grain_with_the_reason() {
    let d = tcp_daemon();
    d.start_test_grain(
        "asker",
        &["request", "--kind", "network", "--label", "wants the world"],
    )
    .expect("start grain");
    let req = d.next_request().expect("request");
    assert_eq!(req["label"], "wants the world");
    let id = req["id"].to_string();
    d.capnet_json(&["powerbox", "deny", &id, "--reason", "not on this server"])
        .expect("deny");
    let st = d
        .wait_grain("asker", Duration::from_secs(10))
        .expect("wait");
    assert_eq!(st["exit_status"], 3);
    let log = d.grain_log("asker");
    let v = log_json(&log).into_iter().next().expect("result line");
    let refused = v["refused"].as_str().unwrap_or("");
    assert!(refused.starts_with("denied:"), "{refused}");
    assert!(refused.contains("not on this server"), "{refused}");
}

/// Granting with a driver that is not configured is refused and leaves the request
/// pending; an unknown request id is refused.
#[test]
fn grant_errors_are_clear_and_lose_nothing() {
    let d = tcp_daemon();
    d.start_test_grain("asker", &["request", "--kind", "network"])
        .expect("start grain");
    let req = d.next_request().expect("request");
    let id = req["id"].to_string();
    let out = d.capnet(&["powerbox", "grant", &id, "--driver", "nope"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no driver named \"nope\""), "{err}");
    let out = d.capnet(&["powerbox", "grant", "999", "--driver", "tcp"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("no pending request 999"));
    // The request is still there and can be granted.
    d.capnet_json(&["powerbox", "grant", &id, "--driver", "tcp"])
        .expect("grant");
    let st = d
        .wait_grain("asker", Duration::from_secs(10))
        .expect("wait");
    assert_eq!(st["exit_status"], 0, "{}", d.grain_log("asker"));
}

fn crash_test(mode: &str) {
    let echo = EchoServer::start().expect("echo");
    let crash_port = free_port();
    let config = format!(
        "{}{}",
        driver_config("tcp", "libcapnet_driver_tcp.so", ""),
        driver_config(
            "crashy",
            "libcapnet_test_plugin_crashy.so",
            &format!("mode = {mode:?}\ncrash_port = {crash_port}")
        )
    );
    let d = Daemon::start(&config).expect("daemon");
    d.wait_driver("crashy", Duration::from_secs(10), |v| {
        v["state"] == "running"
    })
    .expect("crashy up");
    let (cp, ep) = (crash_port.to_string(), echo.addr.port().to_string());
    d.start_test_grain(
        "victim",
        &["crash-recover", "--crash-port", &cp, "--echo-port", &ep],
    )
    .expect("start grain");
    d.grant_next("crashy", &[]).expect("grant");
    let st = d
        .wait_grain("victim", Duration::from_secs(60))
        .expect("wait");
    let log = d.grain_log("victim");
    assert_eq!(st["exit_status"], 0, "grain failed: {log}\n{}", d.log());
    let lines = log_json(&log);
    let crash = lines
        .iter()
        .find(|v| v["event"] == "crash_error")
        .unwrap_or_else(|| panic!("no crash error in {log}"));
    let err = crash["error"].as_str().unwrap_or("");
    assert!(!err.is_empty());
    let done = lines.iter().find(|v| v["ok"] == true).expect("recovered");
    assert!(
        done["recovered_after_ms"].as_u64().unwrap_or(u64::MAX) < 10_000,
        "took too long: {done}"
    );
    // The supervisor survived, restarted the driver, and the other driver never noticed.
    let crashy = d.driver("crashy").expect("crashy");
    assert_eq!(crashy["state"], "running", "{crashy}");
    assert!(crashy["restarts"].as_u64().unwrap_or(0) >= 1, "{crashy}");
    let tcp = d.driver("tcp").expect("tcp");
    assert_eq!(tcp["state"], "running");
    assert_eq!(tcp["restarts"], 0);
}

/// A plugin that panics mid-call takes down only its host process: the supervisor stays
/// up, the grain's call fails with an error, and the restarted driver serves the grain's
/// (unchanged) capability again within seconds.
#[test]
fn panicking_plugin_is_isolated_and_restarted() {
    crash_test("panic");
}

/// Same for a plugin that calls abort().
#[test]
fn aborting_plugin_is_isolated_and_restarted() {
    crash_test("abort");
}

/// Same for a plugin that dies of SIGSEGV.
#[test]
fn segfaulting_plugin_is_isolated_and_restarted() {
    crash_test("segfault");
}

/// A plugin built for another ABI major, a file that is not a plugin at all, and a shared
/// object without the capnet symbols are each refused with a message naming the file and
/// what was expected; the supervisor keeps serving the good driver.
#[test]
fn bad_plugins_are_refused_with_clear_messages() {
    let dir = tempfile::tempdir().expect("tmp");
    let text = dir.path().join("not-a-plugin.so");
    std::fs::write(&text, "this is not an ELF file\n").expect("write");
    let libc = [
        "/lib/x86_64-linux-gnu/libc.so.6",
        "/usr/lib/x86_64-linux-gnu/libc.so.6",
    ]
    .iter()
    .find(|p| std::path::Path::new(p).exists())
    .expect("libc.so.6 (any shared object without capnet symbols)");
    // Each is approved by hash, so the refusal comes from loading it, not from approval.
    let approved = |p: &std::path::Path| {
        format!(
            "plugin = {:?}\nsha256 = {:?}\n",
            p.display().to_string(),
            capnet_tests::file_sha256(p)
        )
    };
    let config = format!(
        "{}\n[drivers.badabi]\n{}\n[drivers.text]\n{}\n[drivers.nosym]\n{}",
        driver_config("tcp", "libcapnet_driver_tcp.so", ""),
        approved(&artifact("libcapnet_test_plugin_bad_abi.so")),
        approved(&text),
        approved(std::path::Path::new(libc)),
    );
    let d = Daemon::start(&config).expect("daemon");
    let failed = |name: &str| {
        d.wait_driver(name, Duration::from_secs(10), |v| v["state"] == "failed")
            .expect("failed state")["last_error"]
            .as_str()
            .unwrap_or("")
            .to_string()
    };
    let e = failed("badabi");
    assert!(e.contains("libcapnet_test_plugin_bad_abi.so"), "{e}");
    assert!(
        e.contains("ABI 99.0") && e.contains("supports ABI 1.x"),
        "{e}"
    );
    let e = failed("text");
    assert!(
        e.contains("not-a-plugin.so") && e.contains("cannot be loaded as a shared object"),
        "{e}"
    );
    let e = failed("nosym");
    assert!(
        e.contains("libc.so.6") && e.contains("does not export capnet_driver_magic"),
        "{e}"
    );
    // A refused plugin is not restarted in a loop.
    assert_eq!(d.driver("badabi").expect("badabi")["restarts"], 0);

    // The good driver serves a grain as usual.
    let echo = EchoServer::start().expect("echo");
    let port = echo.addr.port().to_string();
    d.start_test_grain("ok", &["echo", "--port", &port, "--bytes", "100000"])
        .expect("grain");
    d.grant_next("tcp", &[]).expect("grant");
    let st = d.wait_grain("ok", Duration::from_secs(30)).expect("wait");
    assert_eq!(st["exit_status"], 0, "{}", d.grain_log("ok"));
}

/// A narrow TcpPort grant reaches exactly its host and port.
#[test]
fn tcpport_grant_is_narrow() {
    let d = tcp_daemon();
    let echo = EchoServer::start().expect("echo");
    let port = echo.addr.port().to_string();
    d.start_test_grain(
        "narrow",
        &[
            "request",
            "--kind",
            "tcpport",
            "--host",
            "127.0.0.1",
            "--port",
            &port,
        ],
    )
    .expect("grain");
    let (req, grant) = d.grant_next("tcp", &[]).expect("grant");
    assert_eq!(req["interface"], "TcpPort");
    assert_eq!(req["preferred_host"], "127.0.0.1");
    assert!(grant.starts_with("grant-"));
    let st = d
        .wait_grain("narrow", Duration::from_secs(10))
        .expect("wait");
    assert_eq!(st["exit_status"], 0, "{}", d.grain_log("narrow"));
}

/// Only root (or capnetd's own user) may use the admin socket: the socket is 0600, and even
/// when it is opened to everyone, a connection from another uid is dropped after the
/// `SO_PEERCRED` check and logged; root keeps working. Protects the administrator
/// boundary (threat model: Administrator → capnetd).
#[test]
fn admin_socket_refuses_other_users() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;

    let d = Daemon::start("").expect("daemon");
    let nobody = 65534;
    let as_nobody = || {
        std::process::Command::new(artifact("capnet"))
            .arg("--socket")
            .arg(d.socket())
            .args(["grain", "list"])
            .uid(nobody)
            .gid(nobody)
            .stdin(std::process::Stdio::null())
            .output()
            .expect("run capnet as nobody")
    };
    let mode =
        |p: &std::path::Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
    assert_eq!(mode(d.socket()), 0o600, "the admin socket's mode");

    // Let nobody reach the socket at all, so the peer-credential check is what refuses.
    let mut p = d.socket().to_path_buf();
    while p.pop() && p.starts_with(d.dir()) {
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o711)).expect("chmod dir");
    }
    std::fs::set_permissions(d.socket(), std::fs::Permissions::from_mode(0o666))
        .expect("chmod socket");
    let out = as_nobody();
    assert!(
        !out.status.success(),
        "nobody administered capnetd: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("run capnet as root"), "{err}");
    d.wait_daemon_log(
        "refused an admin connection from a non-root user",
        Duration::from_secs(10),
    )
    .expect("the refusal is logged");
    assert!(
        d.capnet_json(&["grain", "list"]).is_ok(),
        "root still administers"
    );
}
