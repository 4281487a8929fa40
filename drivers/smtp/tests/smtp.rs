//! The SMTP driver in-process (driver-api's harness) against a real SMTP server on
//! loopback (python3-aiosmtpd requiring STARTTLS with a test CA made at run time):
//! relaying, per-grain checks with their reply codes, audit, hostile input and inbound
//! mail.

use std::time::Duration;

use capnet_driver_api::capnet_schemas::bytestream;
use capnet_driver_api::capnet_schemas::ip_capnp::tcp_port;
use capnet_driver_api::events::EventKind;
use capnet_driver_api::testing::{GrantConfig, Harness, HarnessConfig, TestGrant, run_local};
use capnet_driver_smtp::SmtpDriver;
use capnet_tests::peers::{SmtpSink, TestCa};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};

const WAIT: Duration = Duration::from_secs(20);

/// A minimal SMTP client for the tests.
struct Client<S> {
    io: BufReader<S>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Client<S> {
    async fn new(stream: S) -> (Self, u16) {
        let mut c = Self {
            io: BufReader::new(stream),
        };
        let (code, _) = c.reply().await;
        (c, code)
    }

    async fn reply(&mut self) -> (u16, String) {
        let mut text = String::new();
        loop {
            let mut line = String::new();
            let n = tokio::time::timeout(WAIT, self.io.read_line(&mut line))
                .await
                .expect("a reply in time")
                .expect("read");
            assert!(n > 0, "the server closed the session; so far: {text:?}");
            text.push_str(&line);
            if line.as_bytes().get(3) != Some(&b'-') {
                let code = line.get(..3).and_then(|c| c.parse().ok()).unwrap_or(0);
                return (code, text);
            }
        }
    }

    async fn cmd(&mut self, line: &str) -> (u16, String) {
        self.send_raw(format!("{line}\r\n").as_bytes()).await;
        self.reply().await
    }

    async fn send_raw(&mut self, data: &[u8]) {
        self.io.get_mut().write_all(data).await.expect("write");
        self.io.get_mut().flush().await.expect("flush");
    }

    /// MAIL, RCPTs and DATA; returns the reply to the end of data (or the first refusal).
    async fn mail(
        &mut self,
        from: &str,
        params: &str,
        rcpts: &[&str],
        data: &[u8],
    ) -> (u16, String) {
        let r = self.cmd(&format!("MAIL FROM:<{from}>{params}")).await;
        if r.0 != 250 {
            return r;
        }
        for rcpt in rcpts {
            let r = self.cmd(&format!("RCPT TO:<{rcpt}>")).await;
            if r.0 != 250 {
                self.cmd("RSET").await;
                return r;
            }
        }
        let r = self.cmd("DATA").await;
        assert_eq!(r.0, 354, "{r:?}");
        let mut wire = Vec::new();
        for line in data.split_inclusive(|b| *b == b'\n') {
            if line.starts_with(b".") {
                wire.push(b'.');
            }
            wire.extend_from_slice(line);
        }
        if !wire.ends_with(b"\r\n") {
            wire.extend_from_slice(b"\r\n");
        }
        wire.extend_from_slice(b".\r\n");
        self.send_raw(&wire).await;
        self.reply().await
    }
}

struct Setup {
    harness: Harness,
    grant: TestGrant,
    sink: SmtpSink,
    _ca: TestCa,
}

fn options(ca: &TestCa, sink_port: u16, server_name: &str, profile: &str) -> String {
    format!(
        r#"
relay = "127.0.0.1:{sink_port}"
relay_server_name = "{server_name}"
extra_ca_files = [{ca:?}]
system_ca = false
timeout_secs = 10

[grains.grain-1]
{profile}

[inbound]
max_message_bytes = 2000
domains = ["inbox.test"]
"#,
        ca = ca.ca_file().display().to_string()
    )
}

const PROFILE: &str = r#"
envelope_sender = "app@example.test"
allowed_from = ["app@example.test", "*@team.example.test"]
allowed_recipients = ["*@example.net", "*@ëxample.net"]
max_recipients = 2
max_message_bytes = 4096
"#;

async fn setup(server_name: &str, profile: &str) -> Setup {
    let ca = TestCa::new(&["localhost", "127.0.0.1"]).expect("test CA");
    let sink = SmtpSink::start(&ca).expect("smtp sink (python3-aiosmtpd)");
    let harness = Harness::start::<SmtpDriver>(HarnessConfig {
        name: "smtp".into(),
        options_toml: options(&ca, sink.port, server_name, profile),
        ..HarnessConfig::default()
    })
    .await
    .expect("start the smtp driver");
    let grant = harness
        .open_grant(GrantConfig::default())
        .await
        .expect("grant");
    Setup {
        harness,
        grant,
        sink,
        _ca: ca,
    }
}

async fn session(grant: &TestGrant) -> Client<tokio::io::DuplexStream> {
    let net = grant.network().await.expect("network");
    let mut req = net.get_remote_host_by_name_request();
    req.get().set_address("submission.example.test");
    let host = req.send().pipeline.get_host();
    let mut req = host.get_tcp_port_request();
    req.get().set_port_num(587);
    let port: tcp_port::Client = req.send().pipeline.get_port();
    let stream = bytestream::connect(&port).await.expect("connect");
    let (mut c, code) = Client::new(stream).await;
    assert_eq!(code, 220);
    let (code, text) = c.cmd("EHLO grain.test").await;
    assert_eq!(code, 250, "{text}");
    for ext in ["8BITMIME", "SMTPUTF8", "SIZE ", "ENHANCEDSTATUSCODES"] {
        assert!(text.contains(ext), "EHLO must advertise {ext}: {text}");
    }
    c
}

/// A grain's message with 8-bit content, an SMTPUTF8 recipient and a line starting with a
/// dot is relayed over verified STARTTLS; the relay receives exactly the envelope, the
/// parameters and the bytes the grain sent, and the grain gets 250. Protects relay-only
/// egress, 8BITMIME/SMTPUTF8 pass-through and byte-exact relaying.
#[test]
fn relays_a_message_byte_for_byte_over_verified_starttls() {
    run_local(async {
        let s = setup("localhost", PROFILE).await;
        let mut c = session(&s.grant).await;
        let message = "From: App <app@example.test>\r\nTo: bob@example.net\r\nSubject: caf\u{e9}\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\nBonjour, \u{e7}a va ?\r\n.a line that starts with a dot\r\n\r\nbye\r\n";
        let (code, text) = c
            .mail(
                "app@example.test",
                " BODY=8BITMIME SMTPUTF8",
                &["bob@example.net", "zo\u{eb}@\u{eb}xample.net"],
                message.as_bytes(),
            )
            .await;
        assert_eq!(code, 250, "{text}");
        assert!(text.contains("relayed"), "{text}");
        assert_eq!(c.cmd("QUIT").await.0, 221);
        let got = s.sink.messages().expect("sink");
        assert_eq!(got.len(), 1, "{got:?}");
        let m = &got[0];
        assert!(m.tls, "the relay session was not encrypted");
        assert_eq!(m.mail_from, "app@example.test");
        assert_eq!(
            m.rcpt_tos,
            vec!["bob@example.net", "zo\u{eb}@\u{eb}xample.net"]
        );
        assert!(
            m.mail_options.iter().any(|o| o == "BODY=8BITMIME"),
            "{:?}",
            m.mail_options
        );
        assert!(
            m.mail_options.iter().any(|o| o == "SMTPUTF8"),
            "{:?}",
            m.mail_options
        );
        assert_eq!(
            String::from_utf8_lossy(&m.data),
            message,
            "the relay must receive the grain's bytes unchanged"
        );
        s.harness
            .wait_event(WAIT, |e| {
                e.kind == EventKind::Other && e.detail.contains("mail relayed")
            })
            .await
            .expect("the relayed message is audited");
    });
}

/// Each per-grain check refuses with its own SMTP code and audits a MediationRefused
/// event, and nothing refused reaches the relay: wrong envelope sender (553 5.7.1), a
/// recipient outside the allowed ones (550 5.7.1), one recipient too many (452 4.5.3), a
/// From: header not allowed (550 5.7.1), no From: header (550 5.6.0), a SIZE above the
/// limit (552 5.3.4) and a body above it (552 5.3.4). Protects the mediation of the
/// dialogue and clear reply codes on every refusal.
#[test]
fn refusals_have_clear_codes_and_reach_no_relay() {
    run_local(async {
        let s = setup("localhost", PROFILE).await;
        let mut c = session(&s.grant).await;
        let ok_msg = b"From: app@example.test\r\nSubject: x\r\n\r\nhi\r\n";
        // (sender, MAIL parameters, recipients, message, expected code, enhanced code)
        type Case<'a> = (&'a str, &'a str, Vec<&'a str>, Vec<u8>, u16, &'a str);
        let cases: Vec<Case<'_>> = vec![
            (
                "other@example.test",
                "",
                vec!["bob@example.net"],
                ok_msg.to_vec(),
                553,
                "5.7.1",
            ),
            (
                "app@example.test",
                "",
                vec!["eve@elsewhere.test"],
                ok_msg.to_vec(),
                550,
                "5.7.1",
            ),
            (
                "app@example.test",
                "",
                vec!["a@example.net", "b@example.net", "c@example.net"],
                ok_msg.to_vec(),
                452,
                "4.5.3",
            ),
            (
                "app@example.test",
                "",
                vec!["bob@example.net"],
                b"From: Boss <ceo@example.test>\r\n\r\nwire money\r\n".to_vec(),
                550,
                "5.7.1",
            ),
            (
                "app@example.test",
                "",
                vec!["bob@example.net"],
                b"Subject: x\r\n\r\nhi\r\n".to_vec(),
                550,
                "5.6.0",
            ),
            (
                "app@example.test",
                " SIZE=999999",
                vec!["bob@example.net"],
                ok_msg.to_vec(),
                552,
                "5.3.4",
            ),
            (
                "app@example.test",
                "",
                vec!["bob@example.net"],
                [&b"From: app@example.test\r\n\r\n"[..], &vec![b'a'; 5000]].concat(),
                552,
                "5.3.4",
            ),
        ];
        let n = cases.len();
        for (from, params, rcpts, data, code, enhanced) in cases {
            let (got, text) = c.mail(from, params, &rcpts, &data).await;
            assert_eq!(got, code, "{from} {rcpts:?}: {text}");
            assert!(text.contains(enhanced), "{text}");
        }
        // The session still works after the refusals.
        let (code, text) = c
            .mail("app@example.test", "", &["bob@example.net"], ok_msg)
            .await;
        assert_eq!(code, 250, "{text}");
        let got = s.sink.messages().expect("sink");
        assert_eq!(
            got.len(),
            1,
            "only the allowed message reached the relay: {got:?}"
        );
        let refusals = s
            .harness
            .events()
            .into_iter()
            .filter(|e| e.kind == EventKind::MediationRefused)
            .count();
        assert!(
            refusals >= n,
            "every refusal is audited: {:#?}",
            s.harness.events()
        );
    });
}

/// With `messages_per_window = 1`, the second message in the window is refused with
/// 450 4.7.1 at MAIL FROM. Protects the per-grant message rate.
#[test]
fn messages_per_window_is_enforced() {
    run_local(async {
        let profile =
            "envelope_sender = \"app@example.test\"\nmessages_per_window = 1\nwindow_secs = 3600\n";
        let s = setup("localhost", profile).await;
        let mut c = session(&s.grant).await;
        let msg = b"From: app@example.test\r\n\r\none\r\n";
        assert_eq!(
            c.mail("app@example.test", "", &["x@example.net"], msg)
                .await
                .0,
            250
        );
        let (code, text) = c
            .mail("app@example.test", "", &["x@example.net"], msg)
            .await;
        assert_eq!(code, 450, "{text}");
        assert!(text.contains("4.7.1"), "{text}");
        assert_eq!(s.sink.messages().expect("sink").len(), 1);
    });
}

/// A relay whose certificate does not carry the configured name is not used: the grain
/// gets 451 4.4.1 and nothing is delivered. Protects certificate verification of
/// STARTTLS (the test CA is trusted, the name is wrong).
#[test]
fn relay_certificate_is_verified() {
    run_local(async {
        let s = setup("wrong-name.test", PROFILE).await;
        let mut c = session(&s.grant).await;
        let (code, text) = c
            .mail(
                "app@example.test",
                "",
                &["bob@example.net"],
                b"From: app@example.test\r\n\r\nx\r\n",
            )
            .await;
        assert_eq!(code, 451, "{text}");
        assert!(text.contains("4.4.1") && text.contains("TLS"), "{text}");
        assert!(s.sink.messages().expect("sink").is_empty());
    });
}

/// Hostile input does not break the session or the driver: an over-long command line is
/// refused with 500 5.5.6 without being buffered, bytes that are not UTF-8 get 500, a
/// command out of order gets 503, STARTTLS and AUTH are not offered, and after too many
/// errors the session ends with 421. Protects the parser's bounds.
#[test]
fn hostile_input_is_bounded() {
    run_local(async {
        let s = setup("localhost", PROFILE).await;
        let mut c = session(&s.grant).await;
        let long = vec![b'A'; 200_000];
        c.send_raw(&long).await;
        c.send_raw(b"\r\n").await;
        let (code, text) = c.reply().await;
        assert_eq!(code, 500, "{text}");
        assert!(text.contains("5.5.6"), "{text}");
        c.send_raw(b"\xff\xfe\r\n").await;
        assert_eq!(c.reply().await.0, 500);
        assert_eq!(c.cmd("RCPT TO:<bob@example.net>").await.0, 503);
        assert_eq!(c.cmd("DATA").await.0, 503);
        assert_eq!(c.cmd("STARTTLS").await.0, 502);
        assert_eq!(c.cmd("AUTH PLAIN AAAA").await.0, 502);
        assert_eq!(c.cmd("MAIL FROM:app@example.test").await.0, 501);
        assert_eq!(c.cmd("NOOP").await.0, 250);
        let mut last = (0, String::new());
        for _ in 0..30 {
            last = c.cmd("BOGUS").await;
            if last.0 == 421 || last.1.contains("421") {
                break;
            }
        }
        assert!(
            last.1.contains("421"),
            "the session closes after too many errors: {last:?}"
        );
        // The driver still serves new sessions.
        let mut c = session(&s.grant).await;
        assert_eq!(c.cmd("NOOP").await.0, 250);
    });
}

/// A grain without a mail profile cannot open a session: the connect is refused and
/// audited. Protects the per-grain configuration being required.
#[test]
fn a_grain_without_a_profile_cannot_send() {
    run_local(async {
        let s = setup("localhost", PROFILE).await;
        let stranger = s
            .harness
            .open_grant(GrantConfig {
                id: Some("grant-2".into()),
                grain: Some("someone-else".into()),
                ..GrantConfig::default()
            })
            .await
            .expect("grant");
        let net = stranger.network().await.expect("network");
        let mut req = net.get_remote_host_by_name_request();
        req.get().set_address("submission.example.test");
        let host = req.send().pipeline.get_host();
        let mut req = host.get_tcp_port_request();
        req.get().set_port_num(587);
        let port = req.send().pipeline.get_port();
        let err = bytestream::connect(&port).await.expect_err("refused");
        assert!(err.to_string().contains("no mail profile"), "{err}");
    });
}

/// Inbound: the grain listens with listenTcp; a peer on the network delivers a message by
/// SMTP; the grain receives it as one stream (envelope trace fields, then the message) and
/// the peer gets 250 when the grain closes without objecting. A message above the inbound
/// size limit is refused with 552 and never reaches the grain; a recipient outside the
/// inbound domains gets 550. Protects inbound mail and its limits.
#[test]
fn inbound_mail_reaches_the_grain_within_limits() {
    run_local(async {
        let s = setup("localhost", PROFILE).await;
        let iface = s.grant.interface().await.expect("interface");
        let (port, mut incoming) = bytestream::listener();
        let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("probe");
        let port_num = probe.local_addr().expect("addr").port();
        drop(probe);
        let mut req = iface.listen_tcp_request();
        req.get().set_port_num(port_num);
        req.get().set_port(port);
        let _handle = req.send().promise.await.expect("listenTcp");

        let grain = tokio::task::spawn_local(async move {
            let stream = incoming.recv().await.expect("a message");
            let (r, mut w) = tokio::io::split(stream);
            let mut text = String::new();
            let mut r = BufReader::new(r);
            tokio::io::AsyncReadExt::read_to_string(&mut r, &mut text)
                .await
                .expect("read the message");
            w.shutdown().await.expect("accept by closing");
            text
        });

        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port_num))
            .await
            .expect("connect to the listener");
        let (mut c, code) = Client::new(tcp).await;
        assert_eq!(code, 220);
        assert_eq!(c.cmd("EHLO peer.test").await.0, 250);
        let (code, text) = c
            .mail("alice@peer.test", "", &["someone@elsewhere.test"], b"x\r\n")
            .await;
        assert_eq!(code, 550, "{text}");
        let big = [&b"Subject: big\r\n\r\n"[..], &vec![b'b'; 3000]].concat();
        let (code, text) = c
            .mail("alice@peer.test", "", &["app@inbox.test"], &big)
            .await;
        assert_eq!(code, 552, "{text}");
        let body = b"From: alice@peer.test\r\nSubject: hello\r\n\r\nhello grain\r\n";
        let (code, text) = c
            .mail("alice@peer.test", "", &["app@inbox.test"], body)
            .await;
        assert_eq!(code, 250, "{text}");
        let got = tokio::time::timeout(WAIT, grain)
            .await
            .expect("the grain got it in time")
            .expect("grain task");
        assert!(
            got.contains("X-Capnet-Envelope-From: <alice@peer.test>\r\n"),
            "{got}"
        );
        assert!(
            got.contains("X-Capnet-Envelope-To: <app@inbox.test>\r\n"),
            "{got}"
        );
        assert!(
            got.ends_with(std::str::from_utf8(body).expect("utf8")),
            "{got}"
        );
        assert_eq!(c.cmd("QUIT").await.0, 221);
    });
}

/// The `[drivers.smtp.options]` of `config/demo.toml` start the driver (profiles, relay,
/// CA file), so the shipped demo configuration cannot drift from what the driver accepts.
#[test]
fn the_demo_configuration_starts_the_driver() {
    run_local(async {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../config/demo.toml");
        let text = std::fs::read_to_string(path).expect("config/demo.toml");
        let ca = TestCa::new(&["localhost"]).expect("CA");
        let dir = ca
            .ca_file()
            .parent()
            .expect("the CA's directory")
            .to_path_buf();
        let text = text.replace("${DEMO_DIR}", &dir.display().to_string());
        let config: toml::Table = toml::from_str(&text).expect("demo.toml is TOML");
        let options = config["drivers"]["smtp"]["options"].clone();
        let options = toml::to_string(&options).expect("options");
        Harness::start::<SmtpDriver>(HarnessConfig {
            name: "smtp".into(),
            options_toml: options,
            ..HarnessConfig::default()
        })
        .await
        .expect("the demo's smtp options are valid");
    });
}
