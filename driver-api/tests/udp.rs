//! UDP through the generic driver-api objects, driven by the in-process harness as the
//! supervisor would: NAT-like mappings, reply filtering, listeners, limits, the amplifier
//! defaults, idle expiry and revocation, over IPv4 and IPv6 loopback.

use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

use capnet_driver_api::capnet_schemas::ip_capnp::{ip_interface, ip_network, udp_port};
use capnet_driver_api::events::{Event, EventKind};
use capnet_driver_api::policy::{Action, RuleConfig, RuleDirection};
use capnet_driver_api::testing::{GrantConfig, Harness, HarnessConfig, PlainDriver, run_local};
use capnet_driver_api::{Driver, DriverError, DriverHost, Limits, Manifest};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;

const WAIT: Duration = Duration::from_secs(10);

/// A UDP echo server that answers each datagram with `from <port>: <payload>`, so the
/// test sees which source port the driver used.
async fn echo_server(bind: &str) -> SocketAddr {
    let s = UdpSocket::bind(bind).await.expect("bind echo");
    let addr = s.local_addr().expect("addr");
    tokio::task::spawn_local(async move {
        let mut buf = vec![0u8; 65536];
        while let Ok((n, peer)) = s.recv_from(&mut buf).await {
            let mut reply = format!("from {}: ", peer.port()).into_bytes();
            reply.extend_from_slice(&buf[..n]);
            let _ = s.send_to(&reply, peer).await;
        }
    });
    addr
}

/// The grain's side of a UdpPort: collects what the driver delivers.
struct Inbox(mpsc::UnboundedSender<(Vec<u8>, udp_port::Client)>);

impl udp_port::Server for Inbox {
    async fn send(
        self: Rc<Self>,
        params: udp_port::SendParams,
        _: udp_port::SendResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let _ = self
            .0
            .send((p.get_message()?.to_vec(), p.get_return_port()?));
        Ok(())
    }
}

type Received = mpsc::UnboundedReceiver<(Vec<u8>, udp_port::Client)>;

fn inbox() -> (udp_port::Client, Received) {
    let (tx, rx) = mpsc::unbounded_channel();
    (capnp_rpc::new_client(Inbox(tx)), rx)
}

async fn next(rx: &mut Received) -> (String, udp_port::Client) {
    let (data, port) = tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("a datagram within 10 s")
        .expect("inbox open");
    (String::from_utf8_lossy(&data).into_owned(), port)
}

async fn udp_port_to(network: &ip_network::Client, host: &str, port: u16) -> udp_port::Client {
    let mut req = network.get_remote_host_by_name_request();
    req.get().set_address(host);
    let host = req.send().pipeline.get_host();
    let mut req = host.get_udp_port_request();
    req.get().set_port_num(port);
    req.send().pipeline.get_port()
}

async fn send(
    port: &udp_port::Client,
    data: &[u8],
    ret: &udp_port::Client,
) -> Result<(), capnp::Error> {
    let mut req = port.send_request();
    req.get().set_message(data);
    req.get().set_return_port(ret.clone());
    req.send().promise.await.map(|_| ())
}

fn source_port(reply: &str) -> u16 {
    reply
        .strip_prefix("from ")
        .and_then(|r| r.split(':').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("not an echo reply: {reply:?}"))
}

async fn harness(options: &str, listen: &[&str]) -> Harness {
    Harness::start::<PlainDriver>(HarnessConfig {
        options_toml: options.into(),
        listen_addresses: listen.iter().map(|s| s.to_string()).collect(),
        ..HarnessConfig::default()
    })
    .await
    .expect("start")
}

/// Waits until the harness has recorded an event matching `f`.
async fn wait_event(h: &Harness, what: &str, f: impl Fn(&Event) -> bool) -> Event {
    match h.wait_event(WAIT, f).await {
        Some(e) => e,
        None => panic!("no {what} event within 10 s; events: {:#?}", h.events()),
    }
}

fn echo_with_nat(bind: &'static str) {
    run_local(async move {
        let echo = echo_server(bind).await;
        let h = harness("", &["127.0.0.1"]).await;
        let grant = h.open_grant(GrantConfig::default()).await.expect("grant");
        let net = grant.network().await.expect("network");
        let port = udp_port_to(&net, &echo.ip().to_string(), echo.port()).await;
        let (ret_a, mut rx_a) = inbox();
        let (ret_b, mut rx_b) = inbox();
        let mut ports_a = Vec::new();
        for i in 0..3 {
            send(&port, format!("a{i}").as_bytes(), &ret_a)
                .await
                .expect("send a");
            let (reply, _) = next(&mut rx_a).await;
            assert!(reply.ends_with(&format!(": a{i}")), "{reply}");
            ports_a.push(source_port(&reply));
        }
        assert!(
            ports_a.iter().all(|p| *p == ports_a[0]),
            "one returnPort, one source port: {ports_a:?}"
        );
        send(&port, b"b0", &ret_b).await.expect("send b");
        let (reply, _) = next(&mut rx_b).await;
        assert_ne!(
            source_port(&reply),
            ports_a[0],
            "another returnPort, another mapping"
        );
        // A copy of the same capability is the same returnPort.
        send(&port, b"a3", &ret_a.clone())
            .await
            .expect("send a again");
        let (reply, peer) = next(&mut rx_a).await;
        assert_eq!(source_port(&reply), ports_a[0]);
        // The port delivered with a reply answers that peer from the same mapping.
        send(&peer, b"via peer", &ret_b)
            .await
            .expect("reply through the peer port");
        let (reply, _) = next(&mut rx_a).await;
        assert_eq!(reply, format!("from {}: via peer", ports_a[0]));
        assert!(
            rx_b.try_recv().is_err(),
            "nothing was delivered to the other returnPort"
        );
        let allowed = h
            .events()
            .into_iter()
            .filter(|e| e.kind == EventKind::ConnectAllowed)
            .count();
        assert_eq!(
            allowed,
            2,
            "one audit event per new (mapping, peer): {:#?}",
            h.events()
        );
    });
}

/// Over IPv4: datagrams sent with the same returnPort (or a copy of it) leave from the same
/// local port, another returnPort gets another port, replies reach the returnPort used, and
/// the peer port delivered with a reply answers from the same mapping. Protects the
/// NAT-like mapping per (grant, returnPort).
#[test]
fn udp_echo_keeps_the_source_port_per_return_port_ipv4() {
    echo_with_nat("127.0.0.1:0");
}

/// The same over IPv6 loopback (`::1`).
#[test]
fn udp_echo_keeps_the_source_port_per_return_port_ipv6() {
    echo_with_nat("[::1]:0");
}

/// A datagram to a mapping's local port from a peer it never sent to is dropped and
/// audited as `DatagramRefused`; the real peer's reply still arrives. Protects "replies
/// only from the peer sent to".
#[test]
fn replies_are_accepted_only_from_the_peer_sent_to() {
    run_local(async {
        let echo = echo_server("127.0.0.1:0").await;
        let h = harness("", &["127.0.0.1"]).await;
        let grant = h.open_grant(GrantConfig::default()).await.expect("grant");
        let net = grant.network().await.expect("network");
        let port = udp_port_to(&net, "127.0.0.1", echo.port()).await;
        let (ret, mut rx) = inbox();
        send(&port, b"hello", &ret).await.expect("send");
        let (reply, _) = next(&mut rx).await;
        let mapped = source_port(&reply);
        let stranger = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        stranger
            .send_to(b"spoofed", ("127.0.0.1", mapped))
            .await
            .expect("send spoof");
        let refused = wait_event(&h, "datagram_refused", |e| {
            e.kind == EventKind::DatagramRefused
        })
        .await;
        assert_eq!(
            refused.destination,
            stranger.local_addr().expect("addr").to_string()
        );
        send(&port, b"again", &ret).await.expect("send");
        let (reply, _) = next(&mut rx).await;
        assert!(reply.ends_with(": again"), "{reply}");
        assert!(
            rx.try_recv().is_err(),
            "the stranger's datagram was delivered"
        );
    });
}

/// A grain listens with listenUdp on IPv4 and IPv6 loopback; outside peers on both
/// families send; each appears as its own UdpPort and the grain's answer reaches exactly
/// that peer. Dropping the Handle closes the sockets (the port can be bound again).
/// Protects listenUdp, per-peer reply ports and handle ownership.
#[test]
fn listen_udp_on_both_families_answers_each_peer() {
    run_local(async {
        let h = harness("", &["127.0.0.1", "::1"]).await;
        let grant = h.open_grant(GrantConfig::default()).await.expect("grant");
        let iface: ip_interface::Client = grant.interface().await.expect("interface");
        let probe = std::net::UdpSocket::bind("127.0.0.1:0").expect("probe");
        let port_num = probe.local_addr().expect("addr").port();
        drop(probe);
        let (grain_port, mut rx) = inbox();
        let mut req = iface.listen_udp_request();
        req.get().set_port_num(port_num);
        req.get().set_port(grain_port);
        let handle = req
            .send()
            .promise
            .await
            .expect("listenUdp")
            .get()
            .expect("results")
            .get_handle()
            .expect("handle");
        let v4 = UdpSocket::bind("127.0.0.1:0").await.expect("v4");
        let v6 = UdpSocket::bind("[::1]:0").await.expect("v6");
        v4.send_to(b"ping4", ("127.0.0.1", port_num))
            .await
            .expect("send4");
        let (msg, peer4) = next(&mut rx).await;
        assert_eq!(msg, "ping4");
        v6.send_to(b"ping6", ("::1", port_num))
            .await
            .expect("send6");
        let (msg, peer6) = next(&mut rx).await;
        assert_eq!(msg, "ping6");
        let (unused, _rx) = inbox();
        send(&peer6, b"pong6", &unused).await.expect("answer v6");
        send(&peer4, b"pong4", &unused).await.expect("answer v4");
        let mut buf = [0u8; 64];
        let (n, from) = tokio::time::timeout(WAIT, v4.recv_from(&mut buf))
            .await
            .expect("v4 answer in time")
            .expect("recv");
        assert_eq!(&buf[..n], b"pong4");
        assert_eq!(from, SocketAddr::from(([127, 0, 0, 1], port_num)));
        let (n, from) = tokio::time::timeout(WAIT, v6.recv_from(&mut buf))
            .await
            .expect("v6 answer in time")
            .expect("recv");
        assert_eq!(&buf[..n], b"pong6");
        assert_eq!(from.port(), port_num);
        drop(handle);
        wait_event(&h, "listen_stopped", |e| e.kind == EventKind::ListenStopped).await;
        UdpSocket::bind(("127.0.0.1", port_num))
            .await
            .expect("the listener's IPv4 socket was closed");
        UdpSocket::bind(("::1", port_num))
            .await
            .expect("the listener's IPv6 socket was closed");
    });
}

/// Datagrams above the grant's size limit and beyond its rate are refused with `limit:`
/// errors and audited. Protects the datagram caps from the grant limits.
#[test]
fn datagram_size_and_rate_limits_are_enforced() {
    run_local(async {
        let echo = echo_server("127.0.0.1:0").await;
        let h = harness("", &["127.0.0.1"]).await;
        let grant = h
            .open_grant(GrantConfig {
                limits: Limits {
                    udp_max_packet_size: 100,
                    udp_packets_per_second: 3,
                    ..Limits::UNLIMITED
                },
                ..GrantConfig::default()
            })
            .await
            .expect("grant");
        let net = grant.network().await.expect("network");
        let port = udp_port_to(&net, "127.0.0.1", echo.port()).await;
        let (ret, _rx) = inbox();
        let err = send(&port, &[0u8; 101], &ret).await.expect_err("too large");
        assert!(
            err.to_string().contains("limit: datagram of 101 bytes"),
            "{err}"
        );
        for _ in 0..3 {
            send(&port, &[0u8; 100], &ret)
                .await
                .expect("within the limits");
        }
        let err = send(&port, b"x", &ret).await.expect_err("too fast");
        assert!(
            err.to_string().contains("limit: too many datagrams"),
            "{err}"
        );
        let hits = h
            .events()
            .into_iter()
            .filter(|e| e.kind == EventKind::LimitHit)
            .count();
        assert!(hits >= 1, "limit hits are audited: {:#?}", h.events());
    });
}

/// A well-known amplifier port (NTP, 123) is refused for UDP even where the driver allows
/// the address, and audited; a grant rule for exactly that port opens it. Protects the
/// amplifier defaults of the policy for UDP.
#[test]
fn amplifier_ports_are_denied_unless_a_rule_allows_them() {
    run_local(async {
        let h = harness("", &["127.0.0.1"]).await;
        let grant = h.open_grant(GrantConfig::default()).await.expect("grant");
        let net = grant.network().await.expect("network");
        let port = udp_port_to(&net, "127.0.0.1", 123).await;
        let (ret, _rx) = inbox();
        let err = send(&port, b"ntp?", &ret).await.expect_err("amplifier");
        let msg = err.to_string();
        assert!(msg.contains("refused:"), "{msg}");
        assert!(msg.contains("udp amplifier port 123 (ntp)"), "{msg}");
        wait_event(&h, "datagram_refused", |e| {
            e.kind == EventKind::DatagramRefused && e.rule.contains("amplifier port 123")
        })
        .await;

        let allowed = h
            .open_grant(GrantConfig {
                id: Some("grant-ntp".into()),
                rules: vec![RuleConfig {
                    action: Action::Allow,
                    hosts: vec![],
                    cidrs: vec!["127.0.0.1/32".into()],
                    ports: vec!["123".into()],
                    direction: RuleDirection::Outbound,
                    label: "test: local ntp".into(),
                }],
                ..GrantConfig::default()
            })
            .await
            .expect("grant");
        let net = allowed.network().await.expect("network");
        let port = udp_port_to(&net, "127.0.0.1", 123).await;
        send(&port, b"ntp?", &ret)
            .await
            .expect("an exact rule allows the amplifier port");
    });
}

/// Revoking the grant closes its mappings and listeners at once (their ports can be bound
/// again, close events are audited) and every later send fails with `revoked:`. Protects
/// live revocation for UDP.
#[test]
fn revocation_closes_mappings_and_listeners_at_once() {
    run_local(async {
        let echo = echo_server("127.0.0.1:0").await;
        let h = harness("", &["127.0.0.1"]).await;
        let grant = h.open_grant(GrantConfig::default()).await.expect("grant");
        let net = grant.network().await.expect("network");
        let iface = grant.interface().await.expect("interface");
        let port = udp_port_to(&net, "127.0.0.1", echo.port()).await;
        let (ret, mut rx) = inbox();
        send(&port, b"one", &ret).await.expect("send");
        let (reply, _) = next(&mut rx).await;
        let mapped = source_port(&reply);
        let probe = std::net::UdpSocket::bind("127.0.0.1:0").expect("probe");
        let listen_port = probe.local_addr().expect("addr").port();
        drop(probe);
        let (grain_port, _lrx) = inbox();
        let mut req = iface.listen_udp_request();
        req.get().set_port_num(listen_port);
        req.get().set_port(grain_port);
        let _handle = req.send().promise.await.expect("listen");

        grant.revoke("test revocation").await.expect("revoke");
        UdpSocket::bind(("0.0.0.0", mapped))
            .await
            .expect("the mapping's socket is closed");
        UdpSocket::bind(("127.0.0.1", listen_port))
            .await
            .expect("the listener's socket is closed");
        let err = send(&port, b"two", &ret).await.expect_err("revoked");
        assert!(err.to_string().contains("revoked:"), "{err}");
        wait_event(&h, "connection_closed", |e| {
            e.kind == EventKind::ConnectionClosed && e.detail.contains("revoked")
        })
        .await;
    });
}

/// A mapping idle for longer than `udp_idle_secs` is closed and audited; the next send
/// with the same returnPort opens a new mapping. Protects idle expiry.
#[test]
fn idle_mappings_expire() {
    run_local(async {
        let echo = echo_server("127.0.0.1:0").await;
        let h = harness("udp_idle_secs = 1", &["127.0.0.1"]).await;
        let grant = h.open_grant(GrantConfig::default()).await.expect("grant");
        let net = grant.network().await.expect("network");
        let port = udp_port_to(&net, "127.0.0.1", echo.port()).await;
        let (ret, mut rx) = inbox();
        send(&port, b"one", &ret).await.expect("send");
        let (reply, _) = next(&mut rx).await;
        let closed = wait_event(&h, "connection_closed", |e| {
            e.kind == EventKind::ConnectionClosed && e.detail.contains("idle")
        })
        .await;
        assert_eq!(closed.bytes_out, 3);
        assert_eq!(closed.bytes_in as usize, reply.len());
        send(&port, b"two", &ret).await.expect("send after expiry");
        let (reply, _) = next(&mut rx).await;
        assert!(reply.ends_with(": two"), "{reply}");
    });
}

/// A protocol driver that refuses datagrams whose payload starts with `bad`, through
/// the `inspect_datagram` hook.
struct Picky;

impl Driver for Picky {
    type Options = capnet_driver_api::NoOptions;

    fn manifest() -> Manifest {
        PlainDriver::manifest()
    }

    fn start(_: capnet_driver_api::NoOptions, _: &DriverHost) -> Result<Self, DriverError> {
        Ok(Picky)
    }

    fn inspect_datagram(
        &self,
        datagram: &capnet_driver_api::Datagram<'_>,
    ) -> Result<(), DriverError> {
        if datagram.payload.starts_with(b"bad") {
            return Err(DriverError::Refused {
                what: format!("datagram to {}", datagram.peer),
                rule: "picky: no bad datagrams".into(),
            });
        }
        Ok(())
    }
}

/// A driver's `inspect_datagram` hook sees every outbound datagram after the policy and
/// limits: a refused one fails the send and is audited, the others go out. Protects the
/// UDP hook protocol drivers build on.
#[test]
fn the_inspect_hook_refuses_datagrams() {
    run_local(async {
        let echo = echo_server("127.0.0.1:0").await;
        let h = Harness::start::<Picky>(HarnessConfig::default())
            .await
            .expect("start");
        let grant = h.open_grant(GrantConfig::default()).await.expect("grant");
        let net = grant.network().await.expect("network");
        let port = udp_port_to(&net, "127.0.0.1", echo.port()).await;
        let (ret, mut rx) = inbox();
        let err = send(&port, b"bad idea", &ret).await.expect_err("refused");
        assert!(err.to_string().contains("picky: no bad datagrams"), "{err}");
        send(&port, b"good idea", &ret).await.expect("allowed");
        let (reply, _) = next(&mut rx).await;
        assert!(reply.ends_with(": good idea"), "{reply}");
        wait_event(&h, "datagram_refused", |e| {
            e.kind == EventKind::DatagramRefused && e.detail.contains("picky")
        })
        .await;
    });
}

/// A send without a returnPort (a null capability, as some clients send when they want no
/// answer) still goes out; the reply is dropped. Protects interoperability with clients
/// that leave returnPort empty.
#[test]
fn a_send_without_a_return_port_goes_out() {
    run_local(async {
        let echo = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let h = harness("", &["127.0.0.1"]).await;
        let grant = h.open_grant(GrantConfig::default()).await.expect("grant");
        let net = grant.network().await.expect("network");
        let port = udp_port_to(&net, "127.0.0.1", echo.local_addr().expect("addr").port()).await;
        let mut req = port.send_request();
        req.get().set_message(b"fire and forget");
        req.send().promise.await.expect("send without a returnPort");
        let mut buf = [0u8; 64];
        let (n, _) = tokio::time::timeout(WAIT, echo.recv_from(&mut buf))
            .await
            .expect("in time")
            .expect("recv");
        assert_eq!(&buf[..n], b"fire and forget");
    });
}
