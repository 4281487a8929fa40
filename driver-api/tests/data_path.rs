//! The generic ip.capnp objects, driven through the in-process harness exactly as the
//! supervisor drives a plugin: bulk data with checksums, half-close, listeners, policy
//! refusals and revocation.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use capnet_driver_api::capnet_schemas::bytestream;
use capnet_driver_api::capnet_schemas::ip_capnp::{ip_network, tcp_port};
use capnet_driver_api::testing::{GrantConfig, Harness, HarnessConfig, PlainDriver, run_local};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

async fn echo_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::task::spawn_local(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::task::spawn_local(async move {
                let (mut r, mut w) = s.into_split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

async fn port_to(network: &ip_network::Client, host: &str, port: u16) -> tcp_port::Client {
    let mut req = network.get_remote_host_by_name_request();
    req.get().set_address(host);
    let host = req.send().pipeline.get_host();
    let mut req = host.get_tcp_port_request();
    req.get().set_port_num(port);
    req.send().pipeline.get_port()
}

fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// 64 MiB through connect() comes back byte for byte, and a half-close reaches the echo
/// server, whose own close reaches us as EOF.
#[test]
fn bulk_echo_with_half_close() {
    run_local(async {
        let addr = echo_server().await;
        let h = Harness::start::<PlainDriver>(HarnessConfig::default())
            .await
            .expect("start");
        let grant = h.open_grant(GrantConfig::default()).await.expect("grant");
        let net = grant.network().await.expect("network");
        let port = port_to(&net, "127.0.0.1", addr.port()).await;
        let stream = bytestream::connect(&port).await.expect("connect");
        let (mut r, mut w) = tokio::io::split(stream);
        let data = pseudo_random(64 << 20, 7);
        let expected = Sha256::digest(&data);
        let writer = tokio::task::spawn_local(async move {
            for chunk in data.chunks(1 << 20) {
                w.write_all(chunk).await.expect("write");
            }
            w.shutdown().await.expect("half-close");
        });
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 16];
        let mut total = 0usize;
        loop {
            let n = r.read(&mut buf).await.expect("read");
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            total += n;
        }
        writer.await.expect("writer");
        assert_eq!(total, 64 << 20);
        assert_eq!(hasher.finalize(), expected, "echoed bytes differ");
    });
}

/// A connection to a private address is refused by the default policy before any packet
/// is sent, with a message naming the rule; the refusal is audited.
#[test]
fn private_address_is_refused() {
    run_local(async {
        let h = Harness::start::<PlainDriver>(HarnessConfig::default())
            .await
            .expect("start");
        let grant = h.open_grant(GrantConfig::default()).await.expect("grant");
        let net = grant.network().await.expect("network");
        let port = port_to(&net, "10.1.2.3", 22).await;
        let err = bytestream::connect(&port)
            .await
            .expect_err("must be refused");
        let msg = err.to_string();
        assert!(msg.contains("refused"), "{msg}");
        assert!(msg.contains("10.1.2.3"), "{msg}");
        let events = h.events();
        assert!(
            events
                .iter()
                .any(|e| e.kind == capnet_driver_api::EventKind::ConnectRefused
                    && e.destination.starts_with("10.1.2.3")),
            "no refusal event in {events:?}"
        );
    });
}

/// listenTcp delivers an outside connection to the grain's TcpPort with data both ways;
/// after the handle is released, new connections are refused.
#[test]
fn listen_and_stop_by_dropping_handle() {
    run_local(async {
        let h = Harness::start::<PlainDriver>(HarnessConfig::default())
            .await
            .expect("start");
        let grant = h.open_grant(GrantConfig::default()).await.expect("grant");
        let iface = grant.interface().await.expect("interface");
        let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("probe");
        let port_num = probe.local_addr().expect("addr").port();
        drop(probe);
        let (port, mut incoming) = bytestream::listener();
        let mut req = iface.listen_tcp_request();
        req.get().set_port_num(port_num);
        req.get().set_port(port);
        let handle = req
            .send()
            .promise
            .await
            .expect("listen")
            .get()
            .expect("r")
            .get_handle()
            .expect("h");

        let mut client = TcpStream::connect(("127.0.0.1", port_num))
            .await
            .expect("connect");
        let mut server = incoming.recv().await.expect("accepted");
        client.write_all(b"ping from outside").await.expect("w");
        let mut buf = [0u8; 17];
        server.read_exact(&mut buf).await.expect("r");
        assert_eq!(&buf, b"ping from outside");
        server.write_all(b"pong").await.expect("w");
        let mut buf = [0u8; 4];
        client.read_exact(&mut buf).await.expect("r");
        assert_eq!(&buf, b"pong");

        drop(handle);
        // The release travels in order with this call; the listener closes right after.
        grant
            .session
            .stats_request()
            .send()
            .promise
            .await
            .expect("stats");
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            match TcpStream::connect(("127.0.0.1", port_num)).await {
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => break,
                _ if Instant::now() > deadline => {
                    panic!("still listening 2s after the handle was dropped")
                }
                _ => tokio::task::yield_now().await,
            }
        }
        // The connection accepted before still works.
        client.write_all(b"still open").await.expect("w");
        let mut buf = [0u8; 10];
        server.read_exact(&mut buf).await.expect("r");
        assert_eq!(&buf, b"still open");
    });
}

/// Revoking the grant closes an open connection at once and makes later calls fail with a
/// `revoked` error.
#[test]
fn revocation_closes_connections() {
    run_local(async {
        let addr = echo_server().await;
        let h = Harness::start::<PlainDriver>(HarnessConfig::default())
            .await
            .expect("start");
        let grant = h.open_grant(GrantConfig::default()).await.expect("grant");
        let net = grant.network().await.expect("network");
        let port = port_to(&net, "127.0.0.1", addr.port()).await;
        let mut stream = bytestream::connect(&port).await.expect("connect");
        stream.write_all(b"hello").await.expect("w");
        let mut buf = [0u8; 5];
        stream.read_exact(&mut buf).await.expect("r");

        let t0 = Instant::now();
        grant.revoke("test").await.expect("revoke");
        // The connection ends: reading sees the end of the stream (or an error).
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(2), stream.read_to_end(&mut rest))
            .await
            .expect("connection still open 2s after revocation");
        assert!(
            t0.elapsed() < Duration::from_millis(500),
            "took {:?}",
            t0.elapsed()
        );

        let err = bytestream::connect(&port).await.expect_err("revoked");
        assert!(err.to_string().contains("revoked"), "{err}");
    });
}

/// A host name in an odd numeric encoding is not accepted as a name.
#[test]
fn odd_address_encodings_are_refused() {
    run_local(async {
        let h = Harness::start::<PlainDriver>(HarnessConfig::default())
            .await
            .expect("start");
        let grant = h.open_grant(GrantConfig::default()).await.expect("grant");
        let net = grant.network().await.expect("network");
        for odd in ["0177.0.0.1", "0x7f.0.0.1", "2130706433", "127.1"] {
            let mut req = net.get_remote_host_by_name_request();
            req.get().set_address(odd);
            let err = req.send().promise.await.err();
            assert!(err.is_some(), "{odd} was accepted");
        }
    });
}

/// A grant scoped to one host and port cannot be used to reach another port or host, even
/// where the policy would allow it.
#[test]
fn scoped_grant_reaches_only_its_host_and_port() {
    run_local(async {
        let addr = echo_server().await;
        let other = echo_server().await;
        let h = Harness::start::<PlainDriver>(HarnessConfig::default())
            .await
            .expect("start");
        let grant = h
            .open_grant(GrantConfig {
                scope_host: Some("127.0.0.1".into()),
                scope_port: addr.port(),
                ..Default::default()
            })
            .await
            .expect("grant");
        let net = grant.network().await.expect("network");
        let ok = port_to(&net, "127.0.0.1", addr.port()).await;
        let mut s = bytestream::connect(&ok).await.expect("granted port");
        s.write_all(b"x").await.expect("w");
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.expect("r");

        let wrong_port = port_to(&net, "127.0.0.1", other.port()).await;
        let err = bytestream::connect(&wrong_port)
            .await
            .expect_err("other port");
        assert!(err.to_string().contains("reaches only port"), "{err}");
        let wrong_host = port_to(&net, "localhost", addr.port()).await;
        let err = bytestream::connect(&wrong_host)
            .await
            .expect_err("other host");
        assert!(err.to_string().contains("reaches only host"), "{err}");
    });
}
