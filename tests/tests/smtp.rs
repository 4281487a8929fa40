//! End-to-end test of the SMTP driver: a real capnetd, the SMTP driver in its host
//! process, a grain speaking SMTP to its granted TcpPort, and a real SMTP server
//! (python3-aiosmtpd with STARTTLS and a test CA) as the relay.

use std::time::Duration;

use capnet_tests::peers::{SmtpSink, TestCa};
use capnet_tests::{Daemon, approval, artifact, grain_result};

/// A grain granted a TcpPort by the SMTP driver sends one mail through the daemon; the
/// relay receives it over verified STARTTLS with the envelope and body the grain sent. A
/// second grain, whose From: header is not allowed, gets 550 and the relay receives
/// nothing more. Protects mediated mail egress end to end through the membrane.
#[test]
fn grain_mail_is_relayed_and_a_forged_from_is_refused() {
    let ca = TestCa::new(&["localhost", "127.0.0.1"]).expect("CA");
    let sink = SmtpSink::start(&ca).expect("smtp sink (python3-aiosmtpd)");
    let config = format!(
        r#"
[drivers.smtp]
plugin = {plugin:?}
{approval}
listen_addresses = ["127.0.0.1"]

[[drivers.smtp.rules]]
action = "allow"
cidrs = ["127.0.0.1/32"]
ports = [{port}]
label = "tests: the relay on loopback"

[drivers.smtp.options]
relay = "127.0.0.1:{port}"
relay_server_name = "localhost"
extra_ca_files = [{ca:?}]

[drivers.smtp.options.grains."*"]
envelope_sender = "app@example.test"
"#,
        plugin = artifact("libcapnet_driver_smtp.so").display().to_string(),
        approval = approval(&artifact("libcapnet_driver_smtp.so")),
        port = sink.port,
        ca = ca.ca_file().display().to_string(),
    );
    let d = Daemon::start(&config).expect("daemon");
    let send = |id: &str, from_header: &str| {
        d.start_test_grain(
            id,
            &[
                "smtp-send",
                "--host",
                "submission.example.test",
                "--port",
                "587",
                "--from",
                "app@example.test",
                "--to",
                "bob@example.net",
                "--from-header",
                from_header,
                "--body",
                "sent through capnet",
            ],
        )
        .expect("grain");
        let (req, _) = d.grant_next("smtp", &[]).expect("grant");
        assert_eq!(req["interface"], "TcpPort");
        d.wait_grain(id, Duration::from_secs(30)).expect("wait");
        let log = d.grain_log(id);
        grain_result(&log).unwrap_or_else(|| panic!("no result: {log}\n{}", d.log()))
    };
    let r = send("mailer", "App <app@example.test>");
    assert_eq!(r["ok"], true, "{r}");
    let got = sink.messages().expect("sink");
    assert_eq!(got.len(), 1, "{got:?}");
    assert!(got[0].tls);
    assert_eq!(got[0].mail_from, "app@example.test");
    assert_eq!(got[0].rcpt_tos, vec!["bob@example.net"]);
    let data = String::from_utf8_lossy(&got[0].data);
    assert!(
        data.starts_with("From: App <app@example.test>\r\n"),
        "{data}"
    );
    assert!(data.ends_with("\r\n\r\nsent through capnet\r\n"), "{data}");

    let r = send("forger", "CEO <ceo@example.test>");
    assert_eq!(r["code"], 550, "{r}");
    assert!(r["reply"].as_str().unwrap_or("").contains("5.7.1"), "{r}");
    assert_eq!(sink.messages().expect("sink").len(), 1);
}
