//! End-to-end test of the HTTP driver: a real capnetd, the HTTP driver in its host
//! process, grains fetching from nginx on loopback through granted capabilities.

use std::time::Duration;

use capnet_tests::peers::{Nginx, TestCa};
use capnet_tests::{Daemon, approval, artifact, grain_result};

/// A grain granted IpNetwork by the HTTP driver fetches a page from nginx with the Host it
/// connected to; another grain that connects to the same name but sends another Host
/// (a name nginx also serves on that address) gets 403 from the driver. Protects the Host
/// check end to end through the membrane.
#[test]
fn grain_fetches_with_its_host_and_is_refused_another() {
    let ca = TestCa::new(&["allowed.test", "other.test"]).expect("CA");
    let nginx = Nginx::start(&ca, &["allowed.test", "other.test"]).expect("nginx");
    let config = format!(
        r#"
[drivers.http]
plugin = {plugin:?}
{approval}

[[drivers.http.rules]]
action = "allow"
cidrs = ["127.0.0.1/32"]
label = "tests: nginx on loopback"

[drivers.http.options]
ports = [{port}]
tls_ports = []
static_hosts = {{ "allowed.test" = ["127.0.0.1"] }}
"#,
        plugin = artifact("libcapnet_driver_http.so").display().to_string(),
        approval = approval(&artifact("libcapnet_driver_http.so")),
        port = nginx.http_port,
    );
    let d = Daemon::start(&config).expect("daemon");
    let port = nginx.http_port.to_string();
    let fetch = |id: &str, host_header: &str| {
        d.start_test_grain(
            id,
            &[
                "http-get",
                "--host",
                "allowed.test",
                "--port",
                &port,
                "--host-header",
                host_header,
            ],
        )
        .expect("grain");
        d.grant_next("http", &[]).expect("grant");
        d.wait_grain(id, Duration::from_secs(30)).expect("wait");
        let log = d.grain_log(id);
        grain_result(&log).unwrap_or_else(|| panic!("no result: {log}\n{}", d.log()))
    };
    let r = fetch("fetcher", "allowed.test");
    assert_eq!(r["status"], 200, "{r}");
    assert_eq!(r["body"], "hello from allowed.test\n");
    let r = fetch("sneaky", "other.test");
    assert_eq!(r["status"], 403, "{r}");
    assert!(
        r["body"].as_str().unwrap_or("").contains("other.test"),
        "{r}"
    );
}
