//! The HTTP driver in-process (driver-api's harness) against nginx on loopback, plain and
//! TLS with a test CA made at run time: allowed Host and SNI work, other names are
//! refused, every kept-alive request is checked, and the size and time limits hold.

use std::time::Duration;

use capnet_driver_api::capnet_schemas::bytestream;
use capnet_driver_api::capnet_schemas::ip_capnp::tcp_port;
use capnet_driver_api::events::EventKind;
use capnet_driver_api::testing::{GrantConfig, Harness, HarnessConfig, TestGrant, run_local};
use capnet_driver_http::HttpDriver;
use capnet_tests::peers::{Nginx, TestCa};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};

const WAIT: Duration = Duration::from_secs(20);

struct Setup {
    harness: Harness,
    grant: TestGrant,
    nginx: Nginx,
    ca: TestCa,
}

async fn setup(extra_options: &str, extra_ports: &[u16]) -> Setup {
    let ca = TestCa::new(&["allowed.test", "other.test", "localhost", "127.0.0.1"]).expect("CA");
    let nginx = Nginx::start(&ca, &["allowed.test", "other.test"]).expect("nginx");
    let mut ports = vec![nginx.http_port, nginx.https_port];
    ports.extend_from_slice(extra_ports);
    let options = format!(
        r#"
ports = {ports:?}
tls_ports = [{https}]
max_header_bytes = 4096
max_body_bytes = 100000
response_timeout_secs = 2
static_hosts = {{ "allowed.test" = ["127.0.0.1"], "other.test" = ["127.0.0.1"] }}
{extra_options}
"#,
        https = nginx.https_port
    );
    let harness = Harness::start::<HttpDriver>(HarnessConfig {
        name: "http".into(),
        options_toml: options,
        ..HarnessConfig::default()
    })
    .await
    .expect("start the http driver");
    let grant = harness
        .open_grant(GrantConfig::default())
        .await
        .expect("grant");
    Setup {
        harness,
        grant,
        nginx,
        ca,
    }
}

async fn port(grant: &TestGrant, host: &str, port: u16) -> tcp_port::Client {
    let net = grant.network().await.expect("network");
    let mut req = net.get_remote_host_by_name_request();
    req.get().set_address(host);
    let h = req.send().pipeline.get_host();
    let mut req = h.get_tcp_port_request();
    req.get().set_port_num(port);
    req.send().pipeline.get_port()
}

async fn open(grant: &TestGrant, host: &str, p: u16) -> tokio::io::DuplexStream {
    bytestream::connect(&port(grant, host, p).await)
        .await
        .expect("connect")
}

/// Reads one response with a Content-Length body: (status, body).
async fn response<S: AsyncRead + Unpin>(r: &mut BufReader<S>) -> (u16, String) {
    let mut status_line = String::new();
    tokio::time::timeout(WAIT, r.read_line(&mut status_line))
        .await
        .expect("a response in time")
        .expect("read");
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not a status line: {status_line:?}"));
    let mut length = 0usize;
    loop {
        let mut line = String::new();
        r.read_line(&mut line).await.expect("header");
        if line == "\r\n" || line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':')
            && k.eq_ignore_ascii_case("content-length")
        {
            length = v.trim().parse().expect("length");
        }
    }
    let mut body = vec![0u8; length];
    r.read_exact(&mut body).await.expect("body");
    (status, String::from_utf8_lossy(&body).into_owned())
}

async fn get<S: AsyncRead + AsyncWrite + Unpin>(c: &mut BufReader<S>, host: &str) -> (u16, String) {
    let req = format!("GET / HTTP/1.1\r\nHost: {host}\r\nUser-Agent: capnet-test\r\n\r\n");
    c.get_mut().write_all(req.as_bytes()).await.expect("write");
    response(c).await
}

async fn assert_closed<S: AsyncRead + Unpin>(c: &mut BufReader<S>) {
    let mut rest = Vec::new();
    tokio::time::timeout(WAIT, c.read_to_end(&mut rest))
        .await
        .expect("closed in time")
        .expect("read to end");
    assert!(rest.is_empty(), "nothing more after a refusal: {rest:?}");
}

/// On one kept-alive plain HTTP connection to allowed.test, two requests with the allowed
/// Host are answered by nginx; the third, with Host other.test (a name nginx also serves
/// on the same address), gets 403 from the driver, the connection closes, and the refusal
/// is audited. Protects the per-request Host check and keep-alive handling.
#[test]
fn every_kept_alive_request_is_checked() {
    run_local(async {
        let s = setup("", &[]).await;
        let mut c = BufReader::new(open(&s.grant, "allowed.test", s.nginx.http_port).await);
        for _ in 0..2 {
            let (status, body) = get(&mut c, "allowed.test").await;
            assert_eq!((status, body.as_str()), (200, "hello from allowed.test\n"));
        }
        let (status, body) = get(&mut c, &format!("allowed.test:{}", s.nginx.http_port)).await;
        assert_eq!(
            status, 200,
            "a Host with the connection's port is the same host: {body}"
        );
        let (status, body) = get(&mut c, "other.test").await;
        assert_eq!(status, 403, "{body}");
        assert!(body.contains("other.test"), "{body}");
        assert_closed(&mut c).await;
        s.harness
            .wait_event(WAIT, |e| {
                e.kind == EventKind::MediationRefused && e.detail.contains("other.test")
            })
            .await
            .expect("the refusal is audited");
    });
}

/// Requests without a Host, with two Hosts, with a Host on another port, with a request
/// target naming another host, with headers above the limit, with a body above the limit,
/// and CONNECT, are each refused with their HTTP status (400, 400, 403, 400, 431, 413,
/// 405) before anything reaches the server. Protects the plain-HTTP parser's strictness
/// and the size limits.
#[test]
fn malformed_and_oversized_requests_are_refused() {
    run_local(async {
        let s = setup("", &[]).await;
        let big_header = format!("X-Big: {}\r\n", "a".repeat(5000));
        let cases = [
            ("GET / HTTP/1.0\r\n\r\n".to_string(), 400),
            (
                "GET / HTTP/1.1\r\nHost: allowed.test\r\nHost: other.test\r\n\r\n".to_string(),
                400,
            ),
            (
                "GET / HTTP/1.1\r\nHost: allowed.test:81\r\n\r\n".to_string(),
                403,
            ),
            (
                "GET http://other.test/ HTTP/1.1\r\nHost: allowed.test\r\n\r\n".to_string(),
                400,
            ),
            (
                format!("GET / HTTP/1.1\r\nHost: allowed.test\r\n{big_header}\r\n"),
                431,
            ),
            (
                "POST / HTTP/1.1\r\nHost: allowed.test\r\nContent-Length: 200000\r\n\r\n"
                    .to_string(),
                413,
            ),
            (
                "CONNECT other.test:443 HTTP/1.1\r\nHost: other.test:443\r\n\r\n".to_string(),
                405,
            ),
        ];
        for (request, want) in cases {
            let mut c = BufReader::new(open(&s.grant, "allowed.test", s.nginx.http_port).await);
            c.get_mut()
                .write_all(request.as_bytes())
                .await
                .expect("write");
            let (status, body) = response(&mut c).await;
            assert_eq!(status, want, "{request:?}: {body}");
            assert_closed(&mut c).await;
        }
    });
}

/// A request body within the limit goes through (chunked and with a length).
#[test]
fn request_bodies_within_the_limit_pass() {
    run_local(async {
        let s = setup("", &[]).await;
        let mut c = BufReader::new(open(&s.grant, "allowed.test", s.nginx.http_port).await);
        let req = "POST / HTTP/1.1\r\nHost: allowed.test\r\nContent-Length: 5\r\n\r\nhello";
        c.get_mut().write_all(req.as_bytes()).await.expect("write");
        let (status, _) = response(&mut c).await;
        // nginx answers `return 200` for POST as for GET.
        assert_eq!(status, 200);
        let req = "POST / HTTP/1.1\r\nHost: allowed.test\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n";
        c.get_mut().write_all(req.as_bytes()).await.expect("write");
        assert_eq!(response(&mut c).await.0, 200);
    });
}

async fn tls_client(
    ca: &TestCa,
    sni: &str,
    stream: tokio::io::DuplexStream,
) -> std::io::Result<impl AsyncRead + AsyncWrite + Unpin> {
    let config = capnet_driver_api::tls::client_config(false, &[ca.ca_file()]).expect("config");
    capnet_driver_api::tls::connect(config, sni, stream).await
}

/// TLS to allowed.test with SNI allowed.test is passed through untouched (the grain's own
/// TLS session, verified against the test CA, reaches nginx); SNI other.test on the same
/// connection target is refused by closing the connection, and audited. Protects SNI
/// checking without terminating TLS.
#[test]
fn tls_sni_is_checked_without_terminating_tls() {
    run_local(async {
        let s = setup("", &[]).await;
        let stream = open(&s.grant, "allowed.test", s.nginx.https_port).await;
        let tls = tls_client(&s.ca, "allowed.test", stream)
            .await
            .expect("handshake");
        let mut c = BufReader::new(tls);
        let (status, body) = get(&mut c, "allowed.test").await;
        assert_eq!((status, body.as_str()), (200, "hello from allowed.test\n"));
        // Inside TLS the driver sees nothing: a second request on the session works too.
        assert_eq!(get(&mut c, "allowed.test").await.0, 200);

        let stream = open(&s.grant, "allowed.test", s.nginx.https_port).await;
        // The driver closes the connection: the handshake fails (how exactly depends on
        // where rustls notices), and nothing from nginx ever arrives.
        assert!(
            tls_client(&s.ca, "other.test", stream).await.is_err(),
            "a handshake with SNI other.test must not complete"
        );
        s.harness
            .wait_event(WAIT, |e| {
                e.kind == EventKind::MediationRefused && e.detail.contains("SNI \"other.test\"")
            })
            .await
            .expect("the SNI refusal is audited");
    });
}

/// Ports outside `ports` are refused at connect, and audited.
#[test]
fn only_allowed_ports() {
    run_local(async {
        let s = setup("", &[]).await;
        let p = port(&s.grant, "allowed.test", 22).await;
        let err = bytestream::connect(&p).await.expect_err("refused");
        assert!(err.to_string().contains("is not an HTTP port"), "{err}");
    });
}

/// A server that accepts but never answers gives the grain 504 after
/// `response_timeout_secs`. Protects the response-time limit.
#[test]
fn a_silent_server_gives_504() {
    run_local(async {
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let silent_port = silent.local_addr().expect("addr").port();
        tokio::task::spawn_local(async move {
            let mut held = Vec::new();
            while let Ok((sock, _)) = silent.accept().await {
                held.push(sock);
            }
        });
        let s = setup("", &[silent_port]).await;
        let mut c = BufReader::new(open(&s.grant, "allowed.test", silent_port).await);
        let (status, body) = get(&mut c, "allowed.test").await;
        assert_eq!(status, 504, "{body}");
    });
}

/// With `max_total_bytes = 65536`, fetching 1 MiB is cut short and audited. Protects the
/// per-connection byte limit.
#[test]
fn total_bytes_are_capped() {
    run_local(async {
        let s = setup("max_total_bytes = 65536", &[]).await;
        let mut c = BufReader::new(open(&s.grant, "allowed.test", s.nginx.http_port).await);
        let req = "GET /big HTTP/1.1\r\nHost: allowed.test\r\n\r\n";
        c.get_mut().write_all(req.as_bytes()).await.expect("write");
        let mut got = Vec::new();
        tokio::time::timeout(WAIT, c.read_to_end(&mut got))
            .await
            .expect("cut in time")
            .expect("read");
        assert!(got.len() <= 65536, "got {} bytes", got.len());
        assert!(
            got.starts_with(b"HTTP/1.1 200"),
            "{:?}",
            String::from_utf8_lossy(&got[..got.len().min(100)])
        );
        s.harness
            .wait_event(WAIT, |e| {
                e.kind == EventKind::MediationRefused && e.detail.contains("65536 bytes")
            })
            .await
            .expect("the cut is audited");
    });
}

/// A network granted with `encryption = tls` makes the driver the TLS client (verified
/// against the test CA): the grain speaks plain HTTP to the TLS port, each request's Host
/// is still checked, and nginx answers over TLS. Protects Host inspection when the driver
/// encrypts.
#[test]
fn driver_tls_still_checks_every_host() {
    run_local(async {
        let ca = TestCa::new(&["allowed.test", "other.test"]).expect("CA");
        let nginx = Nginx::start(&ca, &["allowed.test", "other.test"]).expect("nginx");
        let options = format!(
            r#"
ports = [{https}]
tls_ports = [{https}]
static_hosts = {{ "allowed.test" = ["127.0.0.1"] }}
extra_ca_files = [{ca:?}]
system_ca = false
"#,
            https = nginx.https_port,
            ca = ca.ca_file().display().to_string()
        );
        let harness = Harness::start::<HttpDriver>(HarnessConfig {
            name: "http".into(),
            options_toml: options,
            ..HarnessConfig::default()
        })
        .await
        .expect("start");
        let grant = harness
            .open_grant(GrantConfig {
                tls: true,
                ..GrantConfig::default()
            })
            .await
            .expect("grant");
        let mut c = BufReader::new(open(&grant, "allowed.test", nginx.https_port).await);
        let (status, body) = get(&mut c, "allowed.test").await;
        assert_eq!((status, body.as_str()), (200, "hello from allowed.test\n"));
        let (status, _) = get(&mut c, "other.test").await;
        assert_eq!(status, 403);
        assert_closed(&mut c).await;
    });
}

/// The `[drivers.http.options]` of `config/demo.toml` start the driver, so the shipped
/// demo configuration cannot drift from what the driver accepts.
#[test]
fn the_demo_configuration_starts_the_driver() {
    run_local(async {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../config/demo.toml");
        let text = std::fs::read_to_string(path).expect("config/demo.toml");
        let config: toml::Table = toml::from_str(&text).expect("demo.toml is TOML");
        let options = toml::to_string(&config["drivers"]["http"]["options"]).expect("options");
        Harness::start::<HttpDriver>(HarnessConfig {
            name: "http".into(),
            options_toml: options,
            ..HarnessConfig::default()
        })
        .await
        .expect("the demo's http options are valid");
    });
}
