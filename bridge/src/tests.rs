//! The proxies end to end in one process: real loopback sockets on the client side, the
//! fake grain API and driver of [`crate::testing`] on the capability side.

use std::future::Future;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

use crate::router::{Cap, Grant, Router};
use crate::setup::{self, GrantSpec, StateFile};
use crate::target::{GrantKind, Target};
use crate::testing::{FakeApi, network};
use crate::{Bridge, Listening, listen};

fn local<F: Future>(f: F) -> F::Output {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    tokio::task::LocalSet::new().block_on(&rt, f)
}

fn grant(spec: &str) -> Grant {
    let kind = GrantKind::parse(spec).expect("spec");
    let cap = match &kind {
        GrantKind::Network | GrantKind::RemoteHost(_) => network(None),
        // A narrow grant in the fake world: a network limited to nothing else is not
        // needed, the router never asks a TcpPort for another target.
        GrantKind::TcpPort(t) => {
            let net: capnet_schemas::ip_capnp::ip_network::Client =
                capnp::capability::FromClientHook::new(network(None).hook);
            let mut req = net.get_remote_host_by_name_request();
            req.get().set_address(t.host.text());
            let h = req.send().pipeline.get_host();
            let mut req = h.get_tcp_port_request();
            req.get().set_port_num(t.port);
            req.send().pipeline.get_port().client
        }
        GrantKind::UdpPort(_) => network(None),
    };
    Grant::new(kind.clone(), Cap::cast(&kind, &cap), spec.to_string())
}

async fn start(grants: &[&str]) -> (Rc<Bridge>, Listening) {
    let bridge = Bridge::new(Router::new(grants.iter().map(|s| grant(s)).collect()));
    let l = listen(
        &bridge,
        Some("127.0.0.1:0".parse().expect("addr")),
        Some("127.0.0.1:0".parse().expect("addr")),
    )
    .await
    .expect("listen");
    (bridge, l)
}

/// An echo server that half-closes back after EOF.
async fn echo_server() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = l.local_addr().expect("addr").port();
    tokio::task::spawn_local(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::task::spawn_local(async move {
                let (mut r, mut w) = s.into_split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    port
}

async fn socks_request(proxy: SocketAddr, req: &[u8]) -> (TcpStream, Vec<u8>) {
    let mut s = TcpStream::connect(proxy).await.expect("connect");
    s.write_all(&[5, 1, 0]).await.expect("greeting");
    let mut m = [0u8; 2];
    s.read_exact(&mut m).await.expect("method");
    assert_eq!(m, [5, 0]);
    s.write_all(req).await.expect("request");
    let mut head = [0u8; 4];
    s.read_exact(&mut head).await.expect("reply");
    let rest = if head[3] == 4 { 18 } else { 6 };
    let mut b = vec![0u8; rest];
    s.read_exact(&mut b).await.expect("bound address");
    (s, head.to_vec())
}

fn name_request(cmd: u8, name: &str, port: u16) -> Vec<u8> {
    let mut v = vec![5, cmd, 0, 3, name.len() as u8];
    v.extend_from_slice(name.as_bytes());
    v.extend_from_slice(&port.to_be_bytes());
    v
}

fn ip_request(ip: std::net::IpAddr, port: u16) -> Vec<u8> {
    let mut v = vec![5, 1, 0];
    match ip {
        std::net::IpAddr::V4(a) => {
            v.push(1);
            v.extend_from_slice(&a.octets());
        }
        std::net::IpAddr::V6(a) => {
            v.push(4);
            v.extend_from_slice(&a.octets());
        }
    }
    v.extend_from_slice(&port.to_be_bytes());
    v
}

/// SOCKS5 through an IpNetwork grant: a name and an IPv6 address connect and echo with
/// half-close both ways; a name the policy hides gets 0x04, a private address 0x02, a
/// closed port 0x05, BIND 0x07, an unknown address type 0x08, a client without the
/// no-auth method 0xFF.
#[test]
fn socks_connects_and_refuses() {
    local(async {
        let echo = echo_server().await;
        let (_b, l) = start(&["network"]).await;
        let proxy = l.socks.expect("socks");
        for req in [
            name_request(1, "web.test", echo),
            ip_request("::1".parse().expect("v6"), echo),
        ] {
            let (mut s, head) = socks_request(proxy, &req).await;
            assert_eq!(head[1], 0, "{req:?}");
            s.write_all(b"hello bridge").await.expect("write");
            s.shutdown().await.expect("half-close");
            let mut got = Vec::new();
            s.read_to_end(&mut got).await.expect("read");
            assert_eq!(got, b"hello bridge");
        }
        let closed = TcpListener::bind("127.0.0.1:0")
            .await
            .and_then(|l| l.local_addr())
            .expect("port")
            .port();
        for (req, code) in [
            (name_request(1, "denied.test", 80), 4),
            (ip_request("10.0.0.1".parse().expect("ip"), 80), 2),
            (name_request(1, "web.test", closed), 5),
            (name_request(2, "web.test", 80), 7),
            (vec![5, 1, 0, 9, 1, 2, 3, 4, 0, 80], 8),
        ] {
            let (_, head) = socks_request(proxy, &req).await;
            assert_eq!(head[1], code, "{req:?}");
        }
        let mut s = TcpStream::connect(proxy).await.expect("connect");
        s.write_all(&[5, 1, 2]).await.expect("greeting");
        let mut m = [0u8; 2];
        s.read_exact(&mut m).await.expect("method");
        assert_eq!(m, [5, 0xff]);
    });
}

/// With only a TcpPort grant, exactly its host and port connect; the same host on another
/// port, and UDP ASSOCIATE, are refused with 0x02 (no grant).
#[test]
fn narrow_grants_serve_only_their_target() {
    local(async {
        let echo = echo_server().await;
        let (_b, l) = start(&[&format!("tcp:web.test:{echo}")]).await;
        let proxy = l.socks.expect("socks");
        let (_, head) = socks_request(proxy, &name_request(1, "web.test", echo)).await;
        assert_eq!(head[1], 0);
        let (_, head) = socks_request(proxy, &name_request(1, "web.test", echo ^ 1)).await;
        assert_eq!(head[1], 2);
        let (_, head) = socks_request(proxy, &name_request(1, "other.test", echo)).await;
        assert_eq!(head[1], 2);
        let (_, head) = socks_request(proxy, &[5, 3, 0, 1, 0, 0, 0, 0, 0, 0]).await;
        assert_eq!(head[1], 2);
    });
}

/// UDP ASSOCIATE: datagrams to a name go out through `UdpPort.send`; the answer the
/// fake driver sends to the returnPort comes back with the destination in the SOCKS
/// header. Fragments are dropped, and the association ends with its TCP connection.
#[test]
fn udp_associate_relays_datagrams() {
    local(async {
        let (_b, l) = start(&["network"]).await;
        let proxy = l.socks.expect("socks");
        let udp = UdpSocket::bind("127.0.0.1:0").await.expect("udp");
        let mut s = TcpStream::connect(proxy).await.expect("connect");
        s.write_all(&[5, 1, 0]).await.expect("greeting");
        let mut m = [0u8; 2];
        s.read_exact(&mut m).await.expect("method");
        s.write_all(&[5, 3, 0, 1, 0, 0, 0, 0, 0, 0])
            .await
            .expect("request");
        let mut reply = [0u8; 10];
        s.read_exact(&mut reply).await.expect("reply");
        let relay = crate::udp::relay_addr(&reply).expect("relay address");
        let mut fragment =
            crate::socks::udp_header(&crate::socks::SocksAddr::Name(b"dns.test".to_vec()), 53);
        fragment[2] = 1;
        fragment.extend_from_slice(b"dropped");
        udp.send_to(&fragment, relay).await.expect("send");
        let mut d =
            crate::socks::udp_header(&crate::socks::SocksAddr::Name(b"dns.test".to_vec()), 53);
        d.extend_from_slice(b"ping");
        udp.send_to(&d, relay).await.expect("send");
        let mut buf = [0u8; 512];
        let (n, from) = tokio::time::timeout(Duration::from_secs(10), udp.recv_from(&mut buf))
            .await
            .expect("an answer within 10s")
            .expect("recv");
        assert_eq!(from, relay);
        let (addr, port, payload) = crate::socks::parse_udp(&buf[..n]).expect("header");
        assert_eq!(addr, crate::socks::SocksAddr::Name(b"dns.test".to_vec()));
        assert_eq!(port, 53);
        assert_eq!(payload, b"gnip");
        drop(s);
    });
}

async fn origin_server() -> (u16, tokio::sync::mpsc::UnboundedReceiver<String>) {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = l.local_addr().expect("addr").port();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::task::spawn_local(async move {
        let mut conn = 0;
        while let Ok((mut s, _)) = l.accept().await {
            conn += 1;
            let tx = tx.clone();
            tokio::task::spawn_local(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    while let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..i]).into_owned();
                        buf.drain(..i + 4);
                        let _ = tx.send(format!("conn {conn}\n{head}"));
                        let _ = s
                            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nKeep-Alive: timeout=5\r\nConnection: keep-alive\r\n\r\nok")
                            .await;
                    }
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
            });
        }
    });
    (port, rx)
}

async fn read_response(s: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..i]).to_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            while buf.len() < i + 4 + len {
                let n = s.read(&mut chunk).await.expect("read");
                assert!(n > 0, "eof in body");
                buf.extend_from_slice(&chunk[..n]);
            }
            return String::from_utf8_lossy(&buf[..i + 4 + len]).into_owned();
        }
        let n = s.read(&mut chunk).await.expect("read");
        if n == 0 {
            return String::from_utf8_lossy(&buf).into_owned();
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Absolute-form requests are rewritten for the origin (origin-form, Host from the URI,
/// Via added, hop-by-hop and Connection-named headers and Proxy-Authorization removed),
/// and two requests on one client connection reuse one upstream connection.
#[test]
fn http_forwarding_rewrites_and_keeps_alive() {
    local(async {
        let (origin, mut heads) = origin_server().await;
        let (_b, l) = start(&["network"]).await;
        let mut s = TcpStream::connect(l.http.expect("http"))
            .await
            .expect("connect");
        for path in ["/a?x=1", "/b"] {
            let req = format!(
                "GET http://user:pw@web.test:{origin}{path} HTTP/1.1\r\nHost: wrong.test\r\n\
                 Proxy-Authorization: Basic eDp5\r\nConnection: keep-alive, X-Hop\r\n\
                 X-Hop: secret\r\nX-Keep: yes\r\n\r\n"
            );
            s.write_all(req.as_bytes()).await.expect("write");
            let resp = read_response(&mut s).await;
            assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
            assert!(resp.ends_with("ok"), "{resp}");
            assert!(
                resp.to_lowercase().contains("via: 1.1 capnet-bridge"),
                "{resp}"
            );
            assert!(
                !resp.to_lowercase().contains("keep-alive: timeout"),
                "{resp}"
            );
            let head = heads.recv().await.expect("origin saw the request");
            let lower = head.to_lowercase();
            assert!(
                head.starts_with("conn 1\n"),
                "a new upstream connection: {head}"
            );
            assert!(lower.contains(&format!("get {path} http/1.1")), "{head}");
            assert!(
                lower.contains(&format!("host: web.test:{origin}")),
                "{head}"
            );
            assert!(lower.contains("via: 1.1 capnet-bridge"), "{head}");
            assert!(lower.contains("x-keep: yes"), "{head}");
            for gone in ["proxy-authorization", "x-hop", "connection:", "wrong.test"] {
                assert!(!lower.contains(gone), "{gone} was forwarded: {head}");
            }
        }
    });
}

/// Hostile or unserviceable requests get a status and never reach a capability: an
/// oversized head (431), garbage (400), origin-form (400, naming the problem), https://
/// in absolute form (501), CONNECT to a hidden name (502), to a private address (403),
/// without a port (400).
#[test]
fn http_refuses_bad_requests() {
    local(async {
        let (_b, l) = start(&["network"]).await;
        let http = l.http.expect("http");
        let big = format!(
            "GET http://web.test/ HTTP/1.1\r\nX-Big: {}\r\n\r\n",
            "a".repeat(70 * 1024)
        );
        let cases: [(&str, &str, &str); 7] = [
            (&big, "431", ""),
            ("GARBAGE\r\n\r\n", "400", ""),
            (
                "GET /index.html HTTP/1.1\r\nHost: x\r\n\r\n",
                "400",
                "is a proxy",
            ),
            (
                "GET https://web.test/ HTTP/1.1\r\nHost: web.test\r\n\r\n",
                "501",
                "CONNECT",
            ),
            (
                "CONNECT denied.test:80 HTTP/1.1\r\nHost: denied.test:80\r\n\r\n",
                "502",
                "not found:",
            ),
            (
                "CONNECT 10.0.0.1:80 HTTP/1.1\r\nHost: 10.0.0.1:80\r\n\r\n",
                "403",
                "refused:",
            ),
            (
                "CONNECT web.test HTTP/1.1\r\nHost: web.test\r\n\r\n",
                "400",
                "",
            ),
        ];
        for (req, status, body) in cases {
            let mut s = TcpStream::connect(http).await.expect("connect");
            let _ = s.write_all(req.as_bytes()).await;
            let resp = read_response(&mut s).await;
            assert!(
                resp.starts_with(&format!("HTTP/1.1 {status}")),
                "{:?} -> {resp}",
                &req[..req.len().min(40)]
            );
            assert!(resp.contains(body), "{resp}");
        }
    });
}

/// Hundreds of connections of random bytes to both proxies neither panic nor stall the
/// bridge: a well-formed request afterwards is served.
#[test]
fn hostile_bytes_never_take_the_bridge_down() {
    local(async {
        let echo = echo_server().await;
        let (_b, l) = start(&["network"]).await;
        let (socks, http) = (l.socks.expect("socks"), l.http.expect("http"));
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut tasks = Vec::new();
        for i in 0..300u32 {
            let mut bytes = Vec::new();
            let len = 1 + (i as usize * 37) % 700;
            for _ in 0..len {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                bytes.push(x as u8);
            }
            if i % 3 == 0 {
                bytes[0] = 5;
            }
            let to = if i % 2 == 0 { socks } else { http };
            tasks.push(tokio::task::spawn_local(async move {
                if let Ok(mut s) = TcpStream::connect(to).await {
                    let _ = s.write_all(&bytes).await;
                    let _ = s.shutdown().await;
                    let mut sink = Vec::new();
                    let _ = tokio::time::timeout(Duration::from_secs(15), s.read_to_end(&mut sink))
                        .await;
                }
            }));
        }
        for t in tasks {
            t.await.expect("client task");
        }
        let (mut s, head) = socks_request(socks, &name_request(1, "web.test", echo)).await;
        assert_eq!(head[1], 0);
        s.write_all(b"still here").await.expect("write");
        s.shutdown().await.expect("shutdown");
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.expect("read");
        assert_eq!(got, b"still here");
    });
}

fn network_spec() -> GrantSpec {
    GrantSpec {
        kind: GrantKind::Network,
        label: "test".into(),
        token: None,
        request: true,
    }
}

/// A requested grant is saved and its token written to the state file; the next start
/// restores it from there without asking the powerbox. A bad configured token falls back
/// to the saved one.
#[test]
fn grants_are_saved_then_restored() {
    local(async {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("state");
        let api = FakeApi::new(true);
        let client = api.client();
        let mut state = StateFile::load(Some(path.clone()));
        let g = setup::establish_all(&client, &[network_spec()], &mut state).await;
        assert_eq!(g.len(), 1);
        assert_eq!(api.requests.borrow().len(), 1);
        let text = std::fs::read_to_string(&path).expect("state written");
        assert!(text.contains(&hex::encode("token-0")), "{text}");

        let mut state = StateFile::load(Some(path.clone()));
        let mut spec = network_spec();
        spec.token = Some(b"not-a-token".to_vec());
        let g = setup::establish_all(&client, &[spec], &mut state).await;
        assert_eq!(g.len(), 1);
        assert_eq!(api.requests.borrow().len(), 1, "restored, not requested");
        assert_eq!(api.restores.get(), 1);
        // The restored network works.
        let echo = echo_server().await;
        let router = Router::new(g);
        let (w, _rx) =
            capnet_schemas::bytestream::WriterStream::<tokio::io::DuplexStream>::pending();
        let down: capnet_schemas::util_capnp::byte_stream::Client = capnp_rpc::new_client(w);
        let t = Target::parse(&format!("web.test:{echo}")).expect("target");
        assert!(router.connect(&t, &down).await.is_ok());
    });
}

/// When save() is unsupported the live capability is still used, nothing is written, and
/// the next start asks again; a grant that may not be requested and has no token is
/// skipped.
#[test]
fn unsaveable_grants_are_asked_for_each_run() {
    local(async {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("state");
        let api = FakeApi::new(false);
        let client = api.client();
        for run in 1..=2 {
            let mut state = StateFile::load(Some(path.clone()));
            let g = setup::establish_all(&client, &[network_spec()], &mut state).await;
            assert_eq!(g.len(), 1);
            assert_eq!(api.requests.borrow().len(), run);
            assert!(!path.exists());
        }
        let mut spec = network_spec();
        spec.request = false;
        let mut state = StateFile::load(None);
        assert!(
            setup::establish_all(&client, &[spec], &mut state)
                .await
                .is_empty()
        );
    });
}
