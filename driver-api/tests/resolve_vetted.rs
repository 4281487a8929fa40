//! Resolution and vetting against a DNS server the test runs on 127.0.0.1. The
//! public-looking addresses in the answers are never contacted: these tests only resolve.

// Test helpers outside #[test] functions may unwrap too.
#![allow(clippy::unwrap_used)]

mod support;

use std::net::IpAddr;

use capnet_driver_api::policy::{Direction, HostSpec, Policy, Rule, Transport};
use capnet_driver_api::resolve::{
    LookupError, Resolver, ResolverOptions, VetError, Vetted, VettedAddr, resolve_vetted,
};
use support::dns::TestDns;

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

fn host(text: &str) -> HostSpec {
    HostSpec::parse(text).unwrap()
}

async fn vet(policy: &Policy, resolver: &Resolver, name: &str) -> Result<Vetted, VetError> {
    resolve_vetted(
        policy,
        resolver,
        &host(name),
        443,
        Direction::Outbound,
        Transport::Tcp,
    )
    .await
}

fn addrs(vetted: &Vetted) -> Vec<IpAddr> {
    vetted.allowed().iter().map(VettedAddr::addr).collect()
}

/// A name with public and private addresses yields only the public ones, in the
/// resolver's order, and the refused ones with the ranges that refused them.
#[tokio::test]
async fn mixed_answers_keep_only_public_addresses() {
    let dns = TestDns::start();
    dns.set(
        "mixed.capnet.test",
        &[
            "11.1.1.1",
            "10.0.0.1",
            "169.254.169.254",
            "11.2.2.2",
            "::1",
            "2600::1",
            "::ffff:127.0.0.1",
        ],
    );
    let resolver = dns.resolver();
    let vetted = vet(&Policy::default(), &resolver, "mixed.capnet.test")
        .await
        .unwrap();
    let allowed = addrs(&vetted);
    assert_eq!(allowed.len(), 3, "{allowed:?}");
    for a in ["11.1.1.1", "11.2.2.2", "2600::1"] {
        assert!(allowed.contains(&ip(a)), "{a} missing from {allowed:?}");
    }
    let pos = |a| allowed.iter().position(|x| *x == ip(a)).unwrap();
    assert!(
        pos("11.1.1.1") < pos("11.2.2.2"),
        "resolver order kept within a family"
    );
    for v in vetted.allowed() {
        assert_eq!(&*v.decision().rule, "default: public unicast");
        assert_eq!(v.socket_addr().port(), 443);
    }
    let mut refused: Vec<(IpAddr, String)> = vetted
        .refused()
        .iter()
        .map(|r| (r.addr, r.decision.rule.to_string()))
        .collect();
    refused.sort();
    assert_eq!(
        refused,
        [
            (ip("10.0.0.1"), "default: private 10.0.0.0/8".to_owned()),
            (ip("127.0.0.1"), "default: loopback 127.0.0.0/8".to_owned()),
            (
                ip("169.254.169.254"),
                "default: cloud metadata 169.254.169.254/32".to_owned()
            ),
            (ip("::1"), "default: loopback ::1/128".to_owned()),
        ]
    );
}

/// A name whose addresses are all refused fails exactly like a name that does not exist,
/// while the refusals remain available to the driver for the audit log.
#[tokio::test]
async fn all_private_is_indistinguishable_from_nxdomain() {
    let dns = TestDns::start();
    dns.set(
        "internal.capnet.test",
        &["10.1.2.3", "192.168.1.1", "fd00::1", "100.64.0.1"],
    );
    let resolver = dns.resolver();
    let policy = Policy::default();
    let hidden = vet(&policy, &resolver, "internal.capnet.test")
        .await
        .unwrap_err();
    let missing = vet(&policy, &resolver, "missing.capnet.test")
        .await
        .unwrap_err();
    assert!(matches!(hidden, VetError::NotFound { .. }), "{hidden:?}");
    assert!(matches!(missing, VetError::NotFound { .. }), "{missing:?}");
    assert_eq!(hidden.to_string(), "host internal.capnet.test not found");
    assert_eq!(missing.to_string(), "host missing.capnet.test not found");
    assert_eq!(
        hidden.to_string().replace("internal", "missing"),
        missing.to_string(),
        "same message shape"
    );
    assert_eq!(hidden.refused().len(), 4);
    assert!(missing.refused().is_empty());
    assert_eq!(
        dns.queries("missing.capnet.test"),
        2,
        "A and AAAA, once each"
    );

    let lookup = resolver
        .lookup(&capnet_driver_api::policy::HostName::parse("missing.capnet.test").unwrap())
        .await
        .unwrap_err();
    assert_eq!(
        lookup.to_string(),
        missing.to_string(),
        "resolver says the same"
    );
}

/// DNS rebinding: the name's answer changes between lookups. Each vetting is made from
/// one lookup (A and AAAA queries, once each) and holds only that lookup's addresses, so
/// an address from a later answer never appears under an earlier vetting, and a vetting
/// never mixes answers.
#[tokio::test]
async fn changing_answers_are_vetted_per_lookup() {
    let dns = TestDns::start();
    let resolver = dns.resolver();
    let policy = Policy::default();
    let name = "rebind.capnet.test";

    dns.set(name, &["11.1.1.1"]);
    let first = vet(&policy, &resolver, name).await.unwrap();
    assert_eq!(dns.queries(name), 2, "one lookup for the first vetting");
    assert_eq!(addrs(&first), [ip("11.1.1.1")]);

    dns.set(name, &["127.0.0.1", "::1"]);
    let second = vet(&policy, &resolver, name).await.unwrap_err();
    assert_eq!(dns.queries(name), 4, "one lookup for the second vetting");
    let refused: Vec<IpAddr> = second.refused().iter().map(|r| r.addr).collect();
    assert_eq!(refused.len(), 2);
    assert!(refused.contains(&ip("127.0.0.1")) && refused.contains(&ip("::1")));

    dns.set(name, &["11.3.3.3"]);
    let third = vet(&policy, &resolver, name).await.unwrap();
    assert_eq!(dns.queries(name), 6);
    assert_eq!(addrs(&third), [ip("11.3.3.3")]);

    // The first vetting still names only its own answer; holding it across the changes
    // neither revised it nor added later addresses.
    assert_eq!(addrs(&first), [ip("11.1.1.1")]);
    assert!(first.refused().is_empty());
    assert!(!addrs(&third).contains(&ip("11.1.1.1")));
}

/// A name denied by a host rule is refused before any query is sent, with the rule named.
#[tokio::test]
async fn names_denied_by_rule_are_never_queried() {
    let dns = TestDns::start();
    dns.set("ads.tracker.capnet.test", &["11.9.9.9"]);
    let resolver = dns.resolver();
    let policy = Policy::new(
        Vec::new(),
        vec![
            Rule::deny()
                .host("*.tracker.capnet.test")
                .unwrap()
                .label("trackers"),
        ],
        false,
    );
    let err = vet(&policy, &resolver, "ADS.tracker.capnet.test.")
        .await
        .unwrap_err();
    let VetError::Denied { decision, .. } = &err else {
        panic!("{err:?}");
    };
    assert_eq!(&*decision.rule, "trackers");
    assert_eq!(
        err.to_string(),
        "connection to ads.tracker.capnet.test port 443 is not allowed by the egress policy"
    );
    assert_eq!(dns.queries("ads.tracker.capnet.test"), 0);
}

/// Server failures are reported as lookup failures, not as "not found".
#[tokio::test]
async fn server_failure_is_a_lookup_error() {
    let dns = TestDns::start();
    dns.set_servfail("broken.capnet.test");
    let resolver = dns.resolver();
    let err = vet(&Policy::default(), &resolver, "broken.capnet.test")
        .await
        .unwrap_err();
    assert!(
        matches!(&err, VetError::Lookup(LookupError::Failed { .. })),
        "{err:?}"
    );
    assert!(
        err.to_string()
            .starts_with("looking up host broken.capnet.test failed"),
        "{err}"
    );
}

/// An internationalised name is normalised before it is queried, and `localhost` never
/// leaves the resolver and is refused like any loopback answer.
#[tokio::test]
async fn idna_names_and_localhost() {
    let dns = TestDns::start();
    dns.set("xn--bcher-kva.capnet.test", &["11.4.4.4"]);
    let resolver = dns.resolver();
    let policy = Policy::default();
    let vetted = vet(&policy, &resolver, "BÜCHER.capnet.test").await.unwrap();
    assert_eq!(addrs(&vetted), [ip("11.4.4.4")]);
    assert_eq!(dns.queries("xn--bcher-kva.capnet.test"), 2);

    let err = vet(&policy, &resolver, "LOCALHOST.").await.unwrap_err();
    assert_eq!(err.to_string(), "host localhost not found");
    assert!(!err.refused().is_empty());
    assert!(err.refused().iter().all(|r| r.addr.is_loopback()));
    assert_eq!(dns.queries("localhost"), 0);
}

/// The cache: an answer with a long TTL is reused for at most `cache_max_ttl`, and a
/// cached answer is vetted again on every use, under the policy of that use.
#[tokio::test]
async fn cached_answers_are_vetted_on_every_use() {
    let dns = TestDns::start();
    let name = "cached.capnet.test";
    // Both families have records, so both queries are cacheable positive answers.
    dns.set_with_ttl(name, &["11.5.5.5", "10.5.5.5", "2600::5"], 300);
    let options = ResolverOptions {
        cache_max_ttl: std::time::Duration::from_secs(60),
        ..dns.options()
    };
    let resolver = Resolver::new(&options).unwrap();
    let first = vet(&Policy::default(), &resolver, name).await.unwrap();
    assert_eq!(addrs(&first).len(), 2);
    assert!(!addrs(&first).contains(&ip("10.5.5.5")));
    let queries = dns.queries(name);
    assert_eq!(queries, 2);

    let lan = Policy::new(
        Vec::new(),
        vec![Rule::allow().cidr("10.0.0.0/8").unwrap()],
        false,
    );
    let second = vet(&lan, &resolver, name).await.unwrap();
    assert_eq!(dns.queries(name), queries, "answered from the cache");
    assert_eq!(addrs(&second).len(), 3);
    assert!(
        addrs(&second).contains(&ip("10.5.5.5")),
        "allowed under this use's policy"
    );

    let uncached = dns.resolver();
    vet(&Policy::default(), &uncached, name).await.unwrap();
    vet(&Policy::default(), &uncached, name).await.unwrap();
    assert_eq!(
        dns.queries(name),
        queries + 4,
        "cache_max_ttl = 0 disables the cache"
    );
}

/// UDP to an amplifier port is refused for every address, so the name fails as not found
/// while the refusals name the port rule; an explicit allow for the port opens it.
#[tokio::test]
async fn udp_amplifier_ports_by_name() {
    let dns = TestDns::start();
    dns.set("ntp.capnet.test", &["11.6.6.6"]);
    let resolver = dns.resolver();
    let ntp = host("ntp.capnet.test");
    let err = resolve_vetted(
        &Policy::default(),
        &resolver,
        &ntp,
        123,
        Direction::Outbound,
        Transport::Udp,
    )
    .await
    .unwrap_err();
    assert_eq!(
        &*err.refused()[0].decision.rule,
        "default: udp amplifier port 123 (ntp)"
    );
    let tcp = resolve_vetted(
        &Policy::default(),
        &resolver,
        &ntp,
        123,
        Direction::Outbound,
        Transport::Tcp,
    )
    .await
    .unwrap();
    assert_eq!(addrs(&tcp), [ip("11.6.6.6")]);
    let allow_ntp = Policy::new(
        vec![Rule::allow().host("ntp.capnet.test").unwrap().port(123)],
        Vec::new(),
        false,
    );
    let udp = resolve_vetted(
        &allow_ntp,
        &resolver,
        &ntp,
        123,
        Direction::Outbound,
        Transport::Udp,
    )
    .await
    .unwrap();
    assert_eq!(addrs(&udp), [ip("11.6.6.6")]);
}
