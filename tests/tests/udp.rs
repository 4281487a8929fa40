//! End-to-end tests of the UDP driver: a real capnetd, the real CLI, the UDP driver in its
//! host process and grains sending and receiving datagrams through granted capabilities on
//! IPv4 and IPv6 loopback.

use std::net::UdpSocket;
use std::time::{Duration, Instant};

use capnet_tests::{Daemon, UdpEchoServer, approval, artifact, grain_result, now_ms};

fn udp_daemon() -> Daemon {
    let config = format!(
        r#"
[drivers.udp]
plugin = {:?}
{}
listen_addresses = ["127.0.0.1", "::1"]

[[drivers.udp.rules]]
action = "allow"
cidrs = ["127.0.0.0/8", "::1/128"]
direction = "both"
label = "tests: loopback only"
"#,
        artifact("libcapnet_driver_udp.so").display().to_string(),
        approval(&artifact("libcapnet_driver_udp.so"))
    );
    Daemon::start(&config).expect("daemon")
}

fn echo_through(d: &Daemon, grain: &str, host: &str, port: u16, narrow: bool) -> serde_json::Value {
    let p = port.to_string();
    let mut args = vec!["udp-echo", "--host", host, "--port", &p, "--count", "3"];
    if narrow {
        args.push("--narrow");
    }
    d.start_test_grain(grain, &args).expect("start grain");
    let (req, _) = d.grant_next("udp", &[]).expect("grant");
    let st = d.wait_grain(grain, Duration::from_secs(30)).expect("wait");
    let log = d.grain_log(grain);
    assert_eq!(st["exit_status"], 0, "grain failed: {log}\n{}", d.log());
    let r = grain_result(&log).unwrap_or_else(|| panic!("no result: {log}"));
    assert_eq!(r["ok"], true, "{r}");
    let replies = r["replies"].as_array().expect("replies");
    assert_eq!(replies.len(), 3, "{r}");
    for (i, reply) in replies.iter().enumerate() {
        let reply = reply.as_str().unwrap_or("");
        assert!(reply.ends_with(&format!(": datagram {i}")), "{reply}");
    }
    assert_eq!(
        r["source_ports"].as_array().map(Vec::len),
        Some(1),
        "one returnPort, one source port through the membrane: {r}"
    );
    req
}

/// A grain granted IpNetwork by the UDP driver exchanges datagrams with loopback echo
/// servers on IPv4 and IPv6; every datagram sent with its one returnPort leaves from the
/// same source port, also through the supervisor's membrane, and every reply comes back.
/// Protects the UDP data path grain → membrane → driver host → network and the NAT-like
/// return-port identity across the membrane.
#[test]
fn grain_exchanges_datagrams_over_ipv4_and_ipv6() {
    let d = udp_daemon();
    let echo4 = UdpEchoServer::start("127.0.0.1:0").expect("echo4");
    let echo6 = UdpEchoServer::start("[::1]:0").expect("echo6");
    let req = echo_through(&d, "udp4", "127.0.0.1", echo4.addr.port(), false);
    assert_eq!(req["interface"], "IpNetwork");
    echo_through(&d, "udp6", "::1", echo6.addr.port(), false);
}

/// A narrow UdpPort grant works: the grain's capability is the port itself.
#[test]
fn udpport_grant_sends_and_receives() {
    let d = udp_daemon();
    let echo = UdpEchoServer::start("127.0.0.1:0").expect("echo");
    let req = echo_through(&d, "narrow", "127.0.0.1", echo.addr.port(), true);
    assert_eq!(req["interface"], "UdpPort");
}

/// A grain listens with listenUdp on IPv4 and IPv6 loopback; outside peers send, each gets
/// its own answer through the per-peer port the grain received. Protects inbound UDP
/// through the membrane.
#[test]
fn grain_listens_for_udp_on_both_families() {
    let d = udp_daemon();
    let port = UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("free port")
        .port();
    d.start_test_grain("udpl", &["udp-listen", "--port", &port.to_string()])
        .expect("grain");
    let (req, _) = d.grant_next("udp", &[]).expect("grant");
    assert_eq!(req["interface"], "IpInterface");
    d.wait_log(
        "udpl",
        &format!("LISTENING {port}"),
        Duration::from_secs(10),
    )
    .expect("listening");
    let mut buf = [0u8; 128];
    for (bind, target) in [("127.0.0.1:0", "127.0.0.1"), ("[::1]:0", "::1")] {
        let c = UdpSocket::bind(bind).expect("client");
        c.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        c.send_to(format!("hi from {target}").as_bytes(), (target, port))
            .expect("send");
        let (n, from) = c.recv_from(&mut buf).expect("answer");
        assert_eq!(
            std::str::from_utf8(&buf[..n]).expect("utf8"),
            format!("echo: hi from {target}")
        );
        assert_eq!(from.port(), port);
    }
    let c = UdpSocket::bind("127.0.0.1:0").expect("client");
    c.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    c.send_to(b"quit", ("127.0.0.1", port)).expect("send");
    let (n, _) = c.recv_from(&mut buf).expect("bye");
    assert_eq!(&buf[..n], b"bye");
    let st = d.wait_grain("udpl", Duration::from_secs(10)).expect("wait");
    assert_eq!(st["exit_status"], 0, "{}", d.grain_log("udpl"));
}

/// Polls until `addr` can be bound again, i.e. the driver host closed its socket there;
/// returns when that happened, in ms since the epoch.
fn freed_at_ms(addr: (&str, u16), what: &str) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match UdpSocket::bind(addr) {
            Ok(_) => return now_ms(),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                assert!(
                    Instant::now() < deadline,
                    "{what} still open 2 s after revocation"
                );
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) => panic!("binding {addr:?}: {e}"),
        }
    }
}

/// Revoking UDP grants through the CLI is live: the driver host closes the outbound
/// mapping's socket and the inbound listener within 100 ms, the grain's next send fails
/// with `revoked:`, and outside peers can no longer reach the listener. Protects live
/// revocation of UDP end to end (grant → membrane → driver session).
#[test]
fn revoking_udp_grants_closes_mappings_and_listeners() {
    let d = udp_daemon();
    let echo = UdpEchoServer::start("127.0.0.1:0").expect("echo");
    let p = echo.addr.port().to_string();
    d.start_test_grain("sender", &["udp-echo", "--port", &p, "--until-refused"])
        .expect("sender");
    let (_, send_grant) = d.grant_next("udp", &[]).expect("grant sender");
    let ready = d
        .wait_log("sender", "READY ", Duration::from_secs(10))
        .expect("sender ready");
    let source: u16 = ready
        .lines()
        .find_map(|l| l.strip_prefix("READY "))
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("no source port in {ready}"));
    assert!(
        UdpSocket::bind(("127.0.0.1", source)).is_err(),
        "the mapping's source port {source} should be held by the driver"
    );

    let listen = UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("free port")
        .port();
    d.start_test_grain("listener", &["udp-listen", "--port", &listen.to_string()])
        .expect("listener");
    let (_, listen_grant) = d.grant_next("udp", &[]).expect("grant listener");
    d.wait_log(
        "listener",
        &format!("LISTENING {listen}"),
        Duration::from_secs(10),
    )
    .expect("listening");
    let client = UdpSocket::bind("127.0.0.1:0").expect("client");
    client
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut buf = [0u8; 64];
    client
        .send_to(b"before", ("127.0.0.1", listen))
        .expect("send");
    let (n, _) = client
        .recv_from(&mut buf)
        .expect("answer before revocation");
    assert_eq!(&buf[..n], b"echo: before");

    d.capnet_json(&["grants", "revoke", &send_grant, "--reason", "udp flood"])
        .expect("revoke sender");
    d.capnet_json(&["grants", "revoke", &listen_grant])
        .expect("revoke listener");
    let mapping_ms = freed_at_ms(("127.0.0.1", source), "the outbound mapping")
        .saturating_sub(d.revoked_at_ms(&send_grant).expect("audit"));
    let listener_ms = freed_at_ms(("127.0.0.1", listen), "the listener")
        .saturating_sub(d.revoked_at_ms(&listen_grant).expect("audit"));
    eprintln!(
        "udp revocation: mapping closed after {mapping_ms} ms, listener after {listener_ms} ms"
    );
    assert!(
        mapping_ms <= 100,
        "mapping closed {mapping_ms} ms after revocation"
    );
    assert!(
        listener_ms <= 100,
        "listener closed {listener_ms} ms after revocation"
    );

    let st = d
        .wait_grain("sender", Duration::from_secs(10))
        .expect("sender exit");
    let log = d.grain_log("sender");
    let r = grain_result(&log).unwrap_or_else(|| panic!("no result: {log}"));
    assert_eq!(st["exit_status"], 0, "{r}");
    let stopped = r["stopped"].as_str().unwrap_or("");
    assert!(stopped.contains("udp flood"), "{r}");

    // Nothing answers at the listener's port any more.
    client
        .set_read_timeout(Some(Duration::from_millis(300)))
        .expect("timeout");
    let _ = client.send_to(b"after", ("127.0.0.1", listen));
    assert!(
        client.recv_from(&mut buf).is_err(),
        "the revoked listener still answered"
    );
}
