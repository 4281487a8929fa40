//! The policy table: addresses and names against expected decisions, through the same
//! path a driver takes (`HostSpec::parse`, then `resolve_vetted`). Names are served by a
//! DNS responder on 127.0.0.1; no other address is ever contacted.
//!
//! Each row states the host text, port, direction, transport, policy and the expected
//! outcome, including the label of the deciding rule, so a change in any default range,
//! in specificity or in parsing fails a row by name. All rows run; the failures are
//! reported together.

// Test helpers outside #[test] functions may unwrap too.
#![allow(clippy::unwrap_used)]

mod support;

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;

use capnet_driver_api::policy::{Direction, HostSpec, Policy, Rule, RuleDirection, Transport};
use capnet_driver_api::resolve::{VetError, resolve_vetted};
use support::dns::TestDns;

/// The policies the rows refer to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum P {
    /// Built-in defaults only.
    Default,
    /// `allow 127.0.0.1/32`.
    Loop1,
    /// `allow 0.0.0.0/0` and `allow ::/0`.
    AllowAll,
    /// `allow 169.254.0.0/16`.
    Meta16,
    /// `allow 169.254.169.254/32` and `allow fd00:ec2::254/128`.
    Meta32,
    /// `allow 64:ff9b::/96`.
    Nat64,
    /// `allow port 123`.
    Ntp,
    /// Specificity cases, see `policies()`.
    Spec,
    /// A grant's catch-all deny with one allow.
    CatchAll,
    /// Low-ports privilege and `allow inbound port 80`.
    LowPriv,
    /// The same rule without the privilege.
    LowUnpriv,
}

/// What a row expects.
#[derive(Clone, Copy, Debug)]
enum Expect {
    /// Allowed; every allowed address was allowed by the rule with this label.
    Allow(&'static str),
    /// Refused up front (a literal address, or a name denied by a host rule) by this rule.
    Deny(&'static str),
    /// The text is not a valid address or host name.
    Invalid,
    /// The name fails as not found; if a label is given, a refused address names it.
    NotFound(Option<&'static str>),
    /// The name resolves to exactly these allowed addresses.
    Addrs(&'static [&'static str]),
}

use Expect::*;

const OUT: Direction = Direction::Outbound;
const IN: Direction = Direction::Inbound;
const TCP: Transport = Transport::Tcp;
const UDP: Transport = Transport::Udp;

struct Row {
    host: &'static str,
    port: u16,
    direction: Direction,
    transport: Transport,
    policy: P,
    expect: Expect,
}

const fn row(host: &'static str, policy: P, expect: Expect) -> Row {
    Row {
        host,
        port: 443,
        direction: OUT,
        transport: TCP,
        policy,
        expect,
    }
}

const fn port(
    host: &'static str,
    port: u16,
    direction: Direction,
    transport: Transport,
    policy: P,
    expect: Expect,
) -> Row {
    Row {
        host,
        port,
        direction,
        transport,
        policy,
        expect,
    }
}

const PUBLIC: &str = "default: public unicast";
const LOOPBACK4: &str = "default: loopback 127.0.0.0/8";
const LOOPBACK6: &str = "default: loopback ::1/128";
const PRIVATE10: &str = "default: private 10.0.0.0/8";
const METADATA: &str = "default: cloud metadata 169.254.169.254/32";
const LINK_LOCAL4: &str = "default: link-local 169.254.0.0/16";
const LOW_PORTS: &str = "default: inbound ports 0-1023 need the low-ports privilege";

use P::*;

#[rustfmt::skip]
const ROWS: &[Row] = &[
    // Loopback and unspecified.
    row("127.0.0.1", Default, Deny(LOOPBACK4)),
    row("127.255.255.254", Default, Deny(LOOPBACK4)),
    row("::1", Default, Deny(LOOPBACK6)),
    row("[::1]", Default, Deny(LOOPBACK6)),
    row("0.0.0.0", Default, Deny("default: unspecified 0.0.0.0/32")),
    row("::", Default, Deny("default: unspecified ::/128")),
    row("0.1.2.3", Default, Deny("default: this network 0.0.0.0/8")),
    // Private, shared, link-local, metadata.
    row("10.0.0.1", Default, Deny(PRIVATE10)),
    row("10.255.255.255", Default, Deny(PRIVATE10)),
    row("172.16.0.1", Default, Deny("default: private 172.16.0.0/12")),
    row("172.31.255.255", Default, Deny("default: private 172.16.0.0/12")),
    row("172.15.255.255", Default, Allow(PUBLIC)),
    row("172.32.0.1", Default, Allow(PUBLIC)),
    row("192.168.1.1", Default, Deny("default: private 192.168.0.0/16")),
    row("100.64.0.1", Default, Deny("default: shared address space (cgnat) 100.64.0.0/10")),
    row("100.127.255.255", Default, Deny("default: shared address space (cgnat) 100.64.0.0/10")),
    row("100.128.0.1", Default, Allow(PUBLIC)),
    row("169.254.1.1", Default, Deny(LINK_LOCAL4)),
    row("169.254.169.254", Default, Deny(METADATA)),
    row("fe80::1", Default, Deny("default: link-local fe80::/10")),
    row("fd00:ec2::254", Default, Deny("default: cloud metadata fd00:ec2::254/128")),
    // Multicast, broadcast, reserved, benchmarking.
    row("224.0.0.1", Default, Deny("default: multicast 224.0.0.0/4")),
    row("239.255.255.250", Default, Deny("default: multicast 224.0.0.0/4")),
    row("ff02::1", Default, Deny("default: multicast ff00::/8")),
    row("255.255.255.255", Default, Deny("default: broadcast 255.255.255.255/32")),
    row("240.0.0.1", Default, Deny("default: reserved 240.0.0.0/4")),
    row("192.0.0.1", Default, Deny("default: ietf protocol assignments 192.0.0.0/24")),
    row("198.18.0.1", Default, Deny("default: benchmarking 198.18.0.0/15")),
    row("198.19.255.255", Default, Deny("default: benchmarking 198.18.0.0/15")),
    row("4000::1", Default, Deny("default: not global unicast 4000::/2")),
    // Documentation.
    row("192.0.2.1", Default, Deny("default: documentation 192.0.2.0/24")),
    row("198.51.100.1", Default, Deny("default: documentation 198.51.100.0/24")),
    row("203.0.113.1", Default, Deny("default: documentation 203.0.113.0/24")),
    row("2001:db8::1", Default, Deny("default: documentation 2001:db8::/32")),
    row("3fff::1", Default, Deny("default: documentation 3fff::/20")),
    // IPv6 special ranges.
    row("fc00::1", Default, Deny("default: unique local fc00::/7")),
    row("fd12:3456::1", Default, Deny("default: unique local fc00::/7")),
    row("fec0::1", Default, Deny("default: site-local fec0::/10")),
    row("100::1", Default, Deny("default: discard-only 100::/64")),
    // IPv6 forms that embed IPv4.
    row("::ffff:127.0.0.1", Default, Deny(LOOPBACK4)),
    row("::ffff:7f00:1", Default, Deny(LOOPBACK4)),
    row("[::ffff:127.0.0.1]", Default, Deny(LOOPBACK4)),
    row("::ffff:10.0.0.1", Default, Deny(PRIVATE10)),
    row("::ffff:169.254.169.254", Default, Deny(METADATA)),
    row("::ffff:11.1.1.1", Default, Allow(PUBLIC)),
    row("::127.0.0.1", Default, Deny("default: ipv4-compatible ::/96")),
    row("64:ff9b::7f00:1", Default, Deny("default: nat64 64:ff9b::/96")),
    row("64:ff9b:1::1", Default, Deny("default: nat64 local-use 64:ff9b:1::/48")),
    row("2002:7f00:1::1", Default, Deny("default: 6to4 2002::/16")),
    row("2001:0:4136:e378:8000:63bf:3fff:fdd2", Default, Deny("default: teredo 2001::/32")),
    // Public unicast.
    row("11.1.1.1", Default, Allow(PUBLIC)),
    row("1.1.1.1", Default, Allow(PUBLIC)),
    row("2600::1", Default, Allow(PUBLIC)),
    row("2a00:1450:4001::1", Default, Allow(PUBLIC)),
    // Odd encodings never reach a resolver.
    row("0177.0.0.1", Default, Invalid),
    row("0x7f.0.0.1", Default, Invalid),
    row("2130706433", Default, Invalid),
    row("127.1", Default, Invalid),
    row("017700000001", Default, Invalid),
    row("0x7f.1", Default, Invalid),
    row("127.0.0.1:80", Default, Invalid),
    row("[127.0.0.1]", Default, Invalid),
    row("fe80::1%eth0", Default, Invalid),
    row("１２７.０.０.１", Default, Invalid),
    row("", Default, Invalid),
    row("a_b.capnet.test", Default, Invalid),
    // Ports and UDP amplifiers.
    port("11.1.1.1", 0, OUT, TCP, Default, Deny("default: destination port 0")),
    port("11.1.1.1", 123, OUT, UDP, Default, Deny("default: udp amplifier port 123 (ntp)")),
    port("11.1.1.1", 11211, OUT, UDP, Default, Deny("default: udp amplifier port 11211 (memcached)")),
    port("11.1.1.1", 19, OUT, UDP, Default, Deny("default: udp amplifier port 19 (chargen)")),
    port("2600::1", 1900, OUT, UDP, Default, Deny("default: udp amplifier port 1900 (ssdp)")),
    port("11.1.1.1", 53, OUT, UDP, Default, Allow(PUBLIC)),
    port("11.1.1.1", 123, OUT, TCP, Default, Allow(PUBLIC)),
    port("11.1.1.1", 123, OUT, UDP, Ntp, Allow("ntp")),
    port("11.1.1.1", 123, OUT, UDP, AllowAll, Deny("default: udp amplifier port 123 (ntp)")),
    // Explicit rules against the defaults.
    row("127.0.0.1", Loop1, Allow("loop1")),
    row("::ffff:127.0.0.1", Loop1, Allow("loop1")),
    row("127.0.0.2", Loop1, Deny(LOOPBACK4)),
    row("11.1.1.1", AllowAll, Allow("everything")),
    row("10.0.0.1", AllowAll, Deny(PRIVATE10)),
    row("::1", AllowAll, Deny(LOOPBACK6)),
    row("fd00::1", AllowAll, Deny("default: unique local fc00::/7")),
    row("169.254.169.254", Meta16, Deny(METADATA)),
    row("169.254.1.1", Meta16, Allow("link-local")),
    row("169.254.169.254", Meta32, Allow("metadata")),
    row("::ffff:169.254.169.254", Meta32, Allow("metadata")),
    row("fd00:ec2::254", Meta32, Allow("metadata6")),
    row("169.254.1.1", Meta32, Deny(LINK_LOCAL4)),
    row("64:ff9b::b01:101", Nat64, Allow("nat64")),
    // Specificity.
    row("11.20.1.1", Spec, Deny("deny /16")),
    row("11.20.30.1", Spec, Allow("allow /24")),
    row("11.21.0.1", Spec, Deny("deny tie")),
    port("11.1.1.1", 9443, OUT, TCP, Spec, Allow("allow narrow port")),
    port("11.1.1.1", 9444, OUT, TCP, Spec, Deny("deny wide ports")),
    port("11.1.1.1", 8050, OUT, TCP, Spec, Deny("deny narrow port")),
    port("11.1.1.1", 8051, OUT, TCP, Spec, Allow("allow 8000-8100")),
    row("x.spec.capnet.test", Spec, Deny("deny suffix")),
    row("ok.spec.capnet.test", Spec, Allow("allow exact")),
    row("a.deep.spec.capnet.test", Spec, Allow("allow longer suffix")),
    row("same.capnet.test", Spec, Deny("deny same")),
    row("lan.capnet.test", Spec, Allow("lan by name")),
    row("lan2.capnet.test", Spec, NotFound(Some(PRIVATE10))),
    row("evil.cdn.capnet.test", Spec, NotFound(Some(LOOPBACK4))),
    // Names against the defaults.
    row("public.capnet.test", Default, Addrs(&["11.1.1.1", "2600::1"])),
    row("PUBLIC.CAPNET.TEST.", Default, Addrs(&["11.1.1.1", "2600::1"])),
    row("mixed.capnet.test", Default, Addrs(&["11.1.1.1"])),
    row("private.capnet.test", Default, NotFound(Some("default: private 172.16.0.0/12"))),
    row("missing.capnet.test", Default, NotFound(None)),
    row("mapped.capnet.test", Default, NotFound(Some(LOOPBACK4))),
    row("nat64.capnet.test", Default, NotFound(Some("default: nat64 64:ff9b::/96"))),
    row("LOCALHOST.", Default, NotFound(Some(LOOPBACK4))),
    row("localhost", Default, NotFound(Some(LOOPBACK6))),
    row("BÜCHER.capnet.test", Default, Addrs(&["11.3.3.3"])),
    row("xn--bcher-kva.capnet.test", Default, Addrs(&["11.3.3.3"])),
    row("metadata.capnet.test", Meta16, NotFound(Some(METADATA))),
    row("metadata.capnet.test", Meta32, Addrs(&["169.254.169.254"])),
    // A grant's catch-all deny.
    row("www.ok.capnet.test", CatchAll, Allow("ok-443")),
    port("www.ok.capnet.test", 80, OUT, TCP, CatchAll, NotFound(Some("nothing else"))),
    row("public.capnet.test", CatchAll, NotFound(Some("nothing else"))),
    row("11.1.1.1", CatchAll, Deny("nothing else")),
    // Inbound (the host is the peer).
    port("127.0.0.1", 8080, IN, TCP, Default, Allow("default: inbound ports 1024-65535")),
    port("11.1.1.1", 1024, IN, UDP, Default, Allow("default: inbound ports 1024-65535")),
    port("11.1.1.1", 80, IN, TCP, Default, Deny(LOW_PORTS)),
    port("11.1.1.1", 80, IN, TCP, LowUnpriv, Deny(LOW_PORTS)),
    port("11.1.1.1", 80, IN, TCP, LowPriv, Allow("http in")),
    port("11.1.1.1", 443, IN, TCP, LowPriv, Deny("default: inbound ports 0-1023 are privileged")),
    port("11.1.1.1", 1023, IN, TCP, LowPriv, Deny("default: inbound ports 0-1023 are privileged")),
    port("11.1.1.1", 1024, IN, TCP, LowPriv, Allow("default: inbound ports 1024-65535")),
];

fn policies() -> HashMap<P, Policy> {
    let grant = |rules: Vec<Rule>| Policy::new(Vec::new(), rules, false);
    let spec = vec![
        Rule::deny()
            .host("*.spec.capnet.test")
            .unwrap()
            .label("deny suffix"),
        Rule::allow()
            .host("ok.spec.capnet.test")
            .unwrap()
            .label("allow exact"),
        Rule::allow()
            .host("*.deep.spec.capnet.test")
            .unwrap()
            .label("allow longer suffix"),
        Rule::deny().cidr("11.20.0.0/16").unwrap().label("deny /16"),
        Rule::allow()
            .cidr("11.20.30.0/24")
            .unwrap()
            .label("allow /24"),
        Rule::allow()
            .cidr("11.21.0.0/16")
            .unwrap()
            .label("allow tie"),
        Rule::deny().cidr("11.21.0.0/16").unwrap().label("deny tie"),
        Rule::deny()
            .ports("9000-9999")
            .unwrap()
            .label("deny wide ports"),
        Rule::allow().port(9443).label("allow narrow port"),
        Rule::allow()
            .ports("8000-8100")
            .unwrap()
            .label("allow 8000-8100"),
        Rule::deny().port(8050).label("deny narrow port"),
        Rule::allow()
            .host("same.capnet.test")
            .unwrap()
            .label("allow same"),
        Rule::deny()
            .host("same.capnet.test")
            .unwrap()
            .label("deny same"),
        Rule::allow()
            .host("lan.capnet.test")
            .unwrap()
            .cidr("10.0.0.0/8")
            .unwrap()
            .label("lan by name"),
        Rule::allow()
            .host("*.cdn.capnet.test")
            .unwrap()
            .label("cdn by name only"),
    ];
    let inbound_80 = || {
        vec![
            Rule::allow()
                .port(80)
                .direction(RuleDirection::Inbound)
                .label("http in"),
        ]
    };
    HashMap::from([
        (Default, Policy::default()),
        (
            Loop1,
            grant(vec![
                Rule::allow().cidr("127.0.0.1/32").unwrap().label("loop1"),
            ]),
        ),
        (
            AllowAll,
            grant(vec![
                Rule::allow().cidr("0.0.0.0/0").unwrap().label("everything"),
                Rule::allow().cidr("::/0").unwrap().label("everything"),
            ]),
        ),
        (
            Meta16,
            grant(vec![
                Rule::allow()
                    .cidr("169.254.0.0/16")
                    .unwrap()
                    .label("link-local"),
            ]),
        ),
        (
            Meta32,
            grant(vec![
                Rule::allow()
                    .cidr("169.254.169.254/32")
                    .unwrap()
                    .label("metadata"),
                Rule::allow()
                    .cidr("fd00:ec2::254/128")
                    .unwrap()
                    .label("metadata6"),
            ]),
        ),
        (
            Nat64,
            grant(vec![
                Rule::allow().cidr("64:ff9b::/96").unwrap().label("nat64"),
            ]),
        ),
        (Ntp, grant(vec![Rule::allow().port(123).label("ntp")])),
        (Spec, grant(spec)),
        (
            CatchAll,
            grant(vec![
                Rule::deny().label("nothing else"),
                Rule::allow()
                    .host("*.ok.capnet.test")
                    .unwrap()
                    .port(443)
                    .label("ok-443"),
            ]),
        ),
        (LowPriv, Policy::new(Vec::new(), inbound_80(), true)),
        (LowUnpriv, Policy::new(Vec::new(), inbound_80(), false)),
    ])
}

fn zone(dns: &TestDns) {
    dns.set("public.capnet.test", &["11.1.1.1", "2600::1"]);
    dns.set(
        "mixed.capnet.test",
        &["11.1.1.1", "10.0.0.1", "169.254.169.254", "::1"],
    );
    dns.set(
        "private.capnet.test",
        &["10.1.2.3", "172.16.5.4", "192.168.9.9", "fd00::9"],
    );
    dns.set("mapped.capnet.test", &["::ffff:127.0.0.1"]);
    dns.set("nat64.capnet.test", &["64:ff9b::7f00:1"]);
    dns.set("xn--bcher-kva.capnet.test", &["11.3.3.3"]);
    dns.set("metadata.capnet.test", &["169.254.169.254"]);
    for name in ["x.spec", "ok.spec", "a.deep.spec"] {
        dns.set(&format!("{name}.capnet.test"), &["11.7.7.7"]);
    }
    dns.set("same.capnet.test", &["11.7.7.8"]);
    dns.set("lan.capnet.test", &["10.1.1.1"]);
    dns.set("lan2.capnet.test", &["10.1.1.1"]);
    dns.set("evil.cdn.capnet.test", &["127.0.0.1"]);
    dns.set("www.ok.capnet.test", &["11.8.8.8"]);
}

/// Checks one row; returns what went wrong, if anything.
async fn check(
    row: &Row,
    policy: &Policy,
    resolver: &capnet_driver_api::resolve::Resolver,
) -> Option<String> {
    let host = match (HostSpec::parse(row.host), row.expect) {
        (Err(_), Invalid) => return None,
        (Err(e), _) => return Some(format!("refused as invalid: {e}")),
        (Ok(h), Invalid) => return Some(format!("parsed as {h:?}, expected invalid")),
        (Ok(h), _) => h,
    };
    let result = resolve_vetted(
        policy,
        resolver,
        &host,
        row.port,
        row.direction,
        row.transport,
    )
    .await;
    let labels = |v: &capnet_driver_api::resolve::Vetted| -> BTreeSet<String> {
        v.allowed()
            .iter()
            .map(|a| a.decision().rule.to_string())
            .collect()
    };
    match (row.expect, result) {
        (Allow(want), Ok(v)) => {
            let got = labels(&v);
            (got != BTreeSet::from([want.to_owned()])).then(|| format!("allowed by {got:?}"))
        }
        (Addrs(want), Ok(v)) => {
            let got: BTreeSet<IpAddr> = v.allowed().iter().map(|a| a.addr()).collect();
            let want: BTreeSet<IpAddr> = want.iter().map(|a| a.parse().unwrap()).collect();
            (got != want).then(|| format!("allowed {got:?}"))
        }
        (Deny(want), Err(VetError::Denied { decision, .. })) => {
            (&*decision.rule != want).then(|| format!("denied by {:?}", &*decision.rule))
        }
        (NotFound(want), Err(e @ VetError::NotFound { .. })) => {
            let refused: Vec<&str> = e.refused().iter().map(|r| &*r.decision.rule).collect();
            match want {
                None if refused.is_empty() => None,
                None => Some(format!("not found, but refused by {refused:?}")),
                Some(want) if refused.contains(&want) => None,
                Some(_) => Some(format!("not found, refused by {refused:?}")),
            }
        }
        (_, Ok(v)) => Some(format!("allowed {:?} by {:?}", v.allowed(), labels(&v))),
        (_, Err(e)) => Some(format!("failed: {e:?}")),
    }
}

/// Every row of the table gives its expected outcome, and the table covers at least 70
/// rows of addresses and names.
#[tokio::test]
async fn policy_table() {
    assert!(ROWS.len() >= 70, "the table has {} rows", ROWS.len());
    let dns = TestDns::start();
    zone(&dns);
    let resolver = dns.resolver();
    let policies = policies();
    let mut failures = Vec::new();
    for row in ROWS {
        if let Some(problem) = check(row, &policies[&row.policy], &resolver).await {
            failures.push(format!(
                "{:?} port {} {:?} {:?} under {:?}: expected {:?}, {problem}",
                row.host, row.port, row.direction, row.transport, row.policy, row.expect
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} rows failed:\n{}",
        failures.len(),
        ROWS.len(),
        failures.join("\n")
    );
    // Names denied by a host rule were never queried.
    assert_eq!(dns.queries("x.spec.capnet.test"), 0);
    assert_eq!(dns.queries("same.capnet.test"), 0);
    assert!(dns.queries("public.capnet.test") > 0);
}
