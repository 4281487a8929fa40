//! Unit tests of the decision procedure. The table of addresses and names against the
//! defaults is in `driver-api/tests/policy_table.rs`.

use super::*;

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

fn name(text: &str) -> HostName {
    HostName::parse(text).unwrap()
}

fn out(addr: &str, port: u16) -> Target<'static> {
    Target::outbound(ip(addr), port, Transport::Tcp)
}

fn grant(rules: Vec<Rule>) -> Policy {
    Policy::new(Vec::new(), rules, false)
}

/// The overrides relation is a strict partial order: irreflexive and antisymmetric, and
/// an explicit rule overrides an equal default but not the other way round.
#[test]
fn overrides_is_a_strict_partial_order() {
    let s = |host, prefix, port_width, explicit| Specificity {
        host,
        prefix,
        port_width,
        explicit,
    };
    let all = [
        s(0, 0, 65536, false),
        s(0, 0, 65536, true),
        s(1000, 0, 65536, true),
        s(2, 24, 1, true),
        s(0, 32, 65536, false),
        s(0, 16, 65536, true),
        s(3, 0, 100, true),
    ];
    for a in &all {
        assert!(!a.overrides(a), "{a:?} overrides itself");
        for b in &all {
            assert!(!(a.overrides(b) && b.overrides(a)), "{a:?} and {b:?}");
            for c in &all {
                if a.overrides(b) && b.overrides(c) {
                    assert!(a.overrides(c), "transitivity {a:?} {b:?} {c:?}");
                }
            }
        }
    }
    assert!(s(0, 32, 65536, true).overrides(&s(0, 32, 65536, false)));
    assert!(!s(0, 16, 65536, true).overrides(&s(0, 32, 65536, false)));
    assert!(!s(1000, 0, 65536, true).overrides(&s(0, 8, 65536, false)));
}

/// A connection is denied if a matching deny is not overridden, so a broad allow and a
/// host-only allow leave loopback denied, while an exact allow opens one address.
#[test]
fn explicit_rules_override_defaults_only_when_more_specific() {
    let p = grant(vec![
        Rule::allow().cidr("0.0.0.0/0").unwrap(),
        Rule::allow().host("*.example.com").unwrap(),
        Rule::allow().cidr("127.0.0.1/32").unwrap(),
    ]);
    let loopback_name = name("evil.example.com");
    let named = out("127.0.0.2", 80).with_name(&loopback_name);
    let d = p.decide(&named);
    assert!(!d.allowed);
    assert_eq!(&*d.rule, "default: loopback 127.0.0.0/8");
    assert_eq!(d.source, RuleSource::Default);
    let d = p.decide(&out("127.0.0.1", 80));
    assert!(d.allowed, "{d}");
    assert_eq!(
        &*d.rule,
        "grant rule 2: allow hosts=any cidrs=127.0.0.1/32 ports=any outbound"
    );
    assert!(!p.decide(&out("10.0.0.1", 80)).allowed);
}

/// An explicit rule that names exactly a built-in range overrides it (the administrator
/// meant it), and deny rules keep their force against such an allow.
#[test]
fn naming_a_default_range_exactly_overrides_it() {
    let p = grant(vec![Rule::allow().cidr("10.0.0.0/8").unwrap().label("lan")]);
    let d = p.decide(&out("10.9.8.7", 5432));
    assert!(d.allowed);
    assert_eq!(&*d.rule, "lan");
    assert_eq!(d.source, RuleSource::Grant);

    let p = Policy::new(
        vec![Rule::allow().cidr("10.0.0.0/8").unwrap()],
        vec![Rule::deny().cidr("10.0.0.0/8").unwrap().label("no lan")],
        false,
    );
    let d = p.decide(&out("10.9.8.7", 5432));
    assert!(!d.allowed, "deny wins a tie between explicit rules");
    assert_eq!(&*d.rule, "no lan");
}

/// Deny wins conflicts: an allow that is more specific in one respect but less in another
/// does not override.
#[test]
fn deny_wins_conflicts() {
    let p = grant(vec![
        Rule::allow().cidr("11.0.0.0/8").unwrap(),
        Rule::deny().host("db.example.com").unwrap(),
    ]);
    let db = name("db.example.com");
    assert!(!p.decide(&out("11.1.1.1", 5432).with_name(&db)).allowed);
    assert!(
        p.decide(&out("11.1.1.1", 5432)).allowed,
        "by address the allow applies"
    );
}

/// The grant's catch-all deny ties the public default and wins, and more specific allows
/// still punch through it.
#[test]
fn catch_all_deny_with_specific_allows() {
    let p = grant(vec![
        Rule::deny().label("nothing else"),
        Rule::allow().host("*.example.com").unwrap().port(443),
    ]);
    let www = name("www.example.com");
    let other = name("www.example.org");
    assert!(p.decide(&out("11.1.1.1", 443).with_name(&www)).allowed);
    let d = p.decide(&out("11.1.1.1", 80).with_name(&www));
    assert!(!d.allowed);
    assert_eq!(&*d.rule, "nothing else");
    assert!(!p.decide(&out("11.1.1.1", 443).with_name(&other)).allowed);
    assert!(
        !p.decide(&out("11.1.1.1", 443)).allowed,
        "no name, no host rule"
    );
}

/// Early name verdicts are consistent with decide: a denial by name means every address
/// is denied; `None` whenever some allow could override for some address.
#[test]
fn decide_name_agrees_with_decide() {
    let p = grant(vec![
        Rule::deny().host("*.tracker.example").unwrap(),
        Rule::allow().host("ok.tracker.example").unwrap().port(443),
        Rule::deny().host("blocked.example").unwrap().port(25),
        Rule::allow()
            .host("*.tracker.example")
            .unwrap()
            .cidr("11.5.0.0/16")
            .unwrap(),
    ]);
    let cases = [
        ("a.tracker.example", Some(80), false),
        ("ok.tracker.example", Some(443), false),
        ("ok.tracker.example", Some(80), false),
        ("blocked.example", Some(25), true),
        ("blocked.example", Some(26), false),
        ("blocked.example", None, false),
        ("free.example", Some(80), false),
    ];
    for (host, port, expect_deny) in cases {
        let n = name(host);
        let early = p.decide_name(&n, port, Direction::Outbound);
        assert_eq!(early.is_some(), expect_deny, "{host} {port:?}: {early:?}");
    }
    // *.tracker.example is overridable by the CIDR allow (host 2, prefix 16), so no early
    // denial; decide denies outside that range and allows inside it.
    let n = name("a.tracker.example");
    assert!(!p.decide(&out("11.6.0.1", 80).with_name(&n)).allowed);
    assert!(p.decide(&out("11.5.0.1", 80).with_name(&n)).allowed);

    let p = grant(vec![
        Rule::deny()
            .host("*.tracker.example")
            .unwrap()
            .label("trackers"),
    ]);
    let n = name("x.tracker.example");
    let early = p.decide_name(&n, Some(80), Direction::Outbound).unwrap();
    assert_eq!(&*early.rule, "trackers");
    for addr in ["11.1.1.1", "2600::1", "127.0.0.1", "10.0.0.1"] {
        for port in [1, 80, 443, 65535] {
            assert!(
                !p.decide(&Target::outbound(ip(addr), port, Transport::Udp).with_name(&n))
                    .allowed
            );
        }
    }
    assert!(
        p.decide_name(&n, Some(80), Direction::Inbound).is_none(),
        "outbound rule"
    );
}

/// Inbound: ports from 1024 are allowed by default; below, the privilege and a rule are
/// both needed; address classes do not apply.
#[test]
fn inbound_ports() {
    let peer = ip("127.0.0.1");
    let inbound = |port| Target::inbound(peer, port, Transport::Tcp);
    let p = Policy::default();
    assert!(p.decide(&inbound(8080)).allowed, "loopback peer, high port");
    let d = p.decide(&inbound(80));
    assert!(!d.allowed);
    assert_eq!(&*d.rule, LOW_PORTS_UNPRIVILEGED);

    let rule = Rule::allow().port(80).direction(RuleDirection::Inbound);
    let unprivileged = grant(vec![rule.clone()]);
    assert!(
        !unprivileged.decide(&inbound(80)).allowed,
        "rule without privilege"
    );
    let privileged_no_rule = Policy::new(Vec::new(), Vec::new(), true);
    let d = privileged_no_rule.decide(&inbound(80));
    assert!(!d.allowed, "privilege without rule");
    assert_eq!(&*d.rule, "default: inbound ports 0-1023 are privileged");
    let both = Policy::new(Vec::new(), vec![rule], true);
    assert!(both.decide(&inbound(80)).allowed);
    assert!(!both.decide(&inbound(81)).allowed);
    assert!(
        !both.decide(&inbound(0)).allowed,
        "port 0 counts as privileged"
    );

    let wide = Policy::new(
        Vec::new(),
        vec![Rule::allow().direction(RuleDirection::Both)],
        true,
    );
    assert!(
        !wide.decide(&inbound(80)).allowed,
        "an any-port allow is not explicit enough"
    );

    let no_inbound = grant(vec![Rule::deny().direction(RuleDirection::Inbound)]);
    assert!(!no_inbound.decide(&inbound(8080)).allowed);
    assert!(no_inbound.decide(&out("11.1.1.1", 80)).allowed);
}

/// Labels are generated for unlabelled rules and name their source and position.
#[test]
fn generated_labels() {
    let p = Policy::new(
        vec![Rule::deny().cidr("11.0.0.0/8").unwrap()],
        vec![
            Rule::allow()
                .host("a.example")
                .unwrap()
                .cidr("11.1.0.0/16")
                .unwrap()
                .ports("80-81")
                .unwrap(),
        ],
        false,
    );
    let d = p.decide(&out("11.2.0.1", 80));
    assert_eq!(
        &*d.rule,
        "driver rule 0: deny hosts=any cidrs=11.0.0.0/8 ports=any outbound"
    );
    assert_eq!(d.source, RuleSource::Driver);
    let a = name("a.example");
    let d = p.decide(&out("11.1.0.1", 80).with_name(&a));
    assert!(d.allowed);
    assert_eq!(
        &*d.rule,
        "grant rule 0: allow hosts=a.example cidrs=11.1.0.0/16 ports=80-81 outbound"
    );
    assert_eq!(
        d.to_string(),
        format!("allowed by grant rule {:?}", &*d.rule)
    );
}

/// Hand-built rules with IPv4-mapped networks or host bits are normalised by the policy.
#[test]
fn hand_built_rules_are_normalised() {
    let mut rule = Rule::allow();
    rule.cidrs.push("::ffff:127.0.0.1/128".parse().unwrap());
    rule.cidrs.push("10.1.2.3/16".parse().unwrap());
    #[allow(clippy::reversed_empty_ranges)]
    rule.ports.push(90..=80);
    let p = grant(vec![rule]);
    assert!(
        !p.decide(&out("127.0.0.1", 85)).allowed,
        "empty range matches nothing"
    );
    let mut rule = Rule::allow();
    rule.cidrs.push("::ffff:127.0.0.1/128".parse().unwrap());
    rule.cidrs.push("10.1.2.3/16".parse().unwrap());
    let p = grant(vec![rule]);
    assert!(p.decide(&out("127.0.0.1", 85)).allowed);
    assert!(p.decide(&out("::ffff:127.0.0.1", 85)).allowed);
    assert!(p.decide(&out("10.1.200.1", 85)).allowed);
    assert!(!p.decide(&out("10.2.0.1", 85)).allowed);
}

/// A target that matches more rules than the inline buffer holds is still decided right.
#[test]
fn many_matching_rules() {
    let mut rules: Vec<Rule> = (0..40)
        .map(|i| {
            Rule::allow()
                .ports(&format!("{}-{}", 100 - i, 100 + i))
                .unwrap()
        })
        .collect();
    rules.push(Rule::deny().port(100).label("exact deny"));
    let p = grant(rules);
    let d = p.decide(&out("11.1.1.1", 100));
    assert!(!d.allowed);
    assert_eq!(&*d.rule, "exact deny");
    let d = p.decide(&out("11.1.1.1", 99));
    assert!(d.allowed);
    assert_eq!(
        &*d.rule,
        "grant rule 1: allow hosts=any cidrs=any ports=99-101 outbound"
    );
}

/// `from_capnp` validates every rule and names the bad one.
#[test]
fn policy_from_capnp() {
    let mut driver = capnp::message::Builder::new_default();
    write_policy(
        &[Rule::allow().cidr("127.0.0.1").unwrap().port(8080)],
        driver.init_root(),
    );
    let mut grant_msg = capnp::message::Builder::new_default();
    write_policy(
        &[Rule::deny().port(8080).label("no 8080")],
        grant_msg.init_root(),
    );
    let p = Policy::from_capnp(
        driver.get_root_as_reader().unwrap(),
        grant_msg.get_root_as_reader().unwrap(),
        false,
    )
    .unwrap();
    assert!(!p.decide(&out("11.1.1.1", 8080)).allowed);
    assert!(
        p.decide(&out("127.0.0.1", 8080)).allowed,
        "cidr + port beats port"
    );

    let mut bad = capnp::message::Builder::new_default();
    {
        let root = bad.init_root::<policy_capnp::policy::Builder<'_>>();
        let mut rules = root.init_rules(2);
        rules.reborrow().get(1).init_cidrs(1).set(0, "10.0.0.0/33");
    }
    let err = Policy::from_capnp(
        driver.get_root_as_reader().unwrap(),
        bad.get_root_as_reader().unwrap(),
        false,
    )
    .unwrap_err();
    assert!(
        err.to_string()
            .starts_with("grant rule 1: invalid cidr \"10.0.0.0/33\""),
        "{err}"
    );
}

/// Policies are shared between tasks and threads.
#[test]
fn policy_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<Policy>();
    check::<Decision>();
}
