//! The egress policy engine that every driver uses to decide which connections a grant
//! may make (outbound) or accept (inbound).
//!
//! # What is decided
//!
//! A [`Policy`] decides one connection (or datagram) at a time, described by a [`Target`]:
//! the destination address, port, direction (outbound or inbound), transport (TCP or
//! UDP) and, when the grain named the host, the validated host name. Names are resolved
//! once in the driver and every returned address is decided on its own (see
//! [`crate::resolve`]); the driver then connects to an address that was allowed, never to
//! the name, so there is no window for DNS rebinding.
//!
//! Before anything is matched, an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`) is converted
//! to the IPv4 address it denotes ([`canonical_ip`]), in targets and in rules alike.
//!
//! # Rules
//!
//! A policy is one pool of rules: the administrator's rules for the driver, the rules of
//! the grant, and the built-in defaults below. A [`Rule`] has an action (allow or deny),
//! a direction (outbound, inbound or both) and three optional conditions; an empty
//! condition matches anything:
//!
//! * **hosts**: exact names (`mail.example.com`) or suffix patterns (`*.example.com`,
//!   which matches `a.example.com` and `a.b.example.com` but not `example.com`). Names are
//!   compared after IDNA normalisation, case-insensitively, without a trailing dot. A rule
//!   with hosts never matches a connection the grain made to a bare address.
//! * **cidrs**: address ranges (`10.0.0.0/8`, `2001:db8::/32`, or a single address).
//!   IPv4 is always matched as IPv4, even when reached as `::ffff:a.b.c.d`, so `::/0`
//!   covers IPv6 only (write `0.0.0.0/0` as well) and `::ffff:10.0.0.0/104` means
//!   `10.0.0.0/8`.
//! * **ports**: ports and inclusive port ranges (`443`, `8000-8100`).
//!
//! Rules do not depend on the transport: a rule for port 53 covers TCP and UDP.
//!
//! # Which rule wins: specificity
//!
//! Each matching rule has a specificity in three respects, measured against the target:
//!
//! 1. **host**: an exact name is more specific than any suffix pattern, a suffix with
//!    more labels (`*.a.example.com`) is more specific than one with fewer
//!    (`*.example.com`), and any pattern is more specific than no host condition;
//! 2. **address**: the longest prefix among the rule's CIDRs that contain the address
//!    (`/32` beats `/24` beats `/8`); no CIDR condition counts as prefix 0;
//! 3. **port**: the narrowest of the rule's port ranges that contain the port (`443` beats
//!    `1-1024`); no port condition counts as the full range of 65536 ports.
//!
//! Rule A **overrides** rule B when A is at least as specific as B in all three respects
//! and more specific in at least one, or when they are equally specific in all three and A
//! is an administrator's rule while B is a built-in default.
//!
//! **A connection is denied when some matching deny rule is not overridden by any matching
//! allow rule**; otherwise it is allowed if at least one allow rule matches, and denied if
//! nothing matches at all. Consequences:
//!
//! * deny wins ties: an allow and a deny that are equally specific give deny;
//! * deny wins conflicts: an allow that is more specific in one respect but less specific
//!   in another does not override a deny (`allow 10.0.0.0/8` does not override
//!   `deny db.example.com`, and `allow *.example.com` does not override the default denial
//!   of loopback);
//! * an exact host beats a suffix, a longer suffix beats a shorter one, a longer prefix
//!   beats a shorter one, a narrower port range beats a wider one, when the rules are
//!   otherwise alike.
//!
//! The [`Decision`] names the rule that decided: for a denial, the most specific deny rule
//! that was not overridden; for an allow, the most specific matching allow rule. "Most
//! specific" here orders by prefix length, then host, then port-range width.
//!
//! # Built-in defaults
//!
//! The defaults are rules in the same pool, so explicit rules override them by the same
//! specificity rules:
//!
//! * **public unicast is allowed** outbound: `allow` with no conditions (the least
//!   specific rule possible), labelled `default: public unicast`. A grant's catch-all
//!   `deny` with no conditions therefore overrides it and denies everything that no more
//!   specific allow rule lets through;
//! * **every special-purpose range is denied** outbound ([`special_ranges`]): loopback,
//!   unspecified, private, shared (CGNAT), link-local, multicast, broadcast, reserved,
//!   benchmarking, documentation, unique local, site-local, discard-only, IPv6 outside
//!   `2000::/3`, and the IPv6 forms that embed IPv4 (IPv4-compatible `::/96`, NAT64,
//!   6to4, Teredo). Each is a `deny` whose CIDR is the range, labelled with the range, such
//!   as `default: loopback 127.0.0.0/8`. So `allow 127.0.0.1/32` overrides it for that one
//!   address, `allow 10.0.0.0/8` overrides `default: private 10.0.0.0/8`, but
//!   `allow 0.0.0.0/0` does not (prefix 0 is less specific than 8), and neither does a rule
//!   with only hosts;
//! * the **cloud metadata** addresses `169.254.169.254` and `fd00:ec2::254` are denied by
//!   `/32` and `/128` defaults, so only an allow rule whose CIDR is exactly that address
//!   overrides them: `allow 169.254.0.0/16` opens the rest of link-local but not metadata;
//! * **destination port 0** is denied outbound (`default: destination port 0`);
//! * **UDP amplifier ports** ([`UDP_AMPLIFIER_PORTS`]) are denied for UDP targets, each as
//!   a single-port deny, so only an allow rule for that exact port (and, unless the rule
//!   has no CIDR, a matching address range) overrides it;
//! * **inbound**: listening on and accepting at ports 1024–65535 is allowed (an `allow`
//!   with no conditions, labelled `default: inbound ports 1024-65535`, so any explicit
//!   inbound deny overrides it), ports 0–1023 are denied (a `deny` for ports 0–1023).
//!   Without the low-ports privilege no rule can open a port below 1024; with it, an allow
//!   rule whose matching port range lies within 0–1023 overrides the default. Address
//!   classes are not applied to inbound targets.
//!
//! # Host names
//!
//! Host names are validated by [`HostName`] (LDH labels after IDNA, length limits) and
//! must not look numeric, and addresses are parsed by [`parse_ip_strict`], which accepts
//! only canonical dotted quads and standard IPv6 text. Text such as `0177.0.0.1`,
//! `0x7f.1`, `127.1` or `2130706433` is neither, so it is refused before any resolver sees
//! it.

mod addr;
mod host;
mod rule;

use std::fmt;
use std::net::IpAddr;
use std::ops::RangeInclusive;
use std::sync::{Arc, LazyLock};

use capnet_schemas::policy_capnp;
use ipnet::IpNet;

pub use addr::{
    RangeKind, SpecialRange, canonical_ip, classify, is_public_unicast, parse_ip_strict,
    special_ranges,
};
pub use host::{HostError, HostName, HostPattern, HostSpec};
pub use rule::{
    Action, Rule, RuleConfig, RuleDirection, RuleError, parse_cidr, parse_port_range, write_policy,
    write_rule_configs,
};

use addr::canonical_net;

/// UDP destination ports that are denied by default because services on them answer small
/// requests with much larger replies and are abused for reflection and amplification
/// attacks (the port list of CISA's alert TA14-017A and later advisories, less DNS).
/// Each entry is the port and the service's name.
pub const UDP_AMPLIFIER_PORTS: &[(u16, &str)] = &[
    (7, "echo"),
    (17, "qotd"),
    (19, "chargen"),
    (69, "tftp"),
    (111, "portmap"),
    (123, "ntp"),
    (137, "netbios-ns"),
    (161, "snmp"),
    (389, "cldap"),
    (427, "slp"),
    (520, "rip"),
    (1434, "ms-sql browser"),
    (1604, "citrix ica browser"),
    (1900, "ssdp"),
    (3283, "apple remote desktop"),
    (3702, "ws-discovery"),
    (5353, "mdns"),
    (5683, "coap"),
    (10001, "ubiquiti discovery"),
    (11211, "memcached"),
    (27015, "steam"),
    (27960, "quake 3"),
    (32414, "plex gdm"),
    (33848, "jenkins discovery"),
    (37810, "dvr dhcpdiscover"),
    (53413, "netis"),
];

/// Inbound ports below this one are privileged: they need the low-ports privilege and an
/// allow rule.
pub const FIRST_UNPRIVILEGED_PORT: u16 = 1024;

/// The label of the decision that refuses a low inbound port without the privilege.
const LOW_PORTS_UNPRIVILEGED: &str = "default: inbound ports 0-1023 need the low-ports privilege";

/// Which way a connection or datagram goes, seen from the grain.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// The grain connects or sends.
    Outbound,
    /// The grain listens, accepts or receives.
    Inbound,
}

/// The transport protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Transport {
    /// TCP (and protocols on top of it).
    Tcp,
    /// UDP.
    Udp,
}

/// Where a deciding rule came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RuleSource {
    /// A built-in default.
    Default,
    /// The administrator's rules for the driver.
    Driver,
    /// The rules of the grant.
    Grant,
}

impl fmt::Display for RuleSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Default => "default",
            Self::Driver => "driver",
            Self::Grant => "grant",
        })
    }
}

/// One connection or datagram to decide.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Target<'a> {
    /// The host name the grain asked for, if it named one (rules with hosts need it).
    pub name: Option<&'a HostName>,
    /// Outbound: the destination. Inbound: the peer for an accepted connection or datagram,
    /// or the local address when vetting the listen itself.
    pub addr: IpAddr,
    /// Outbound: the destination port. Inbound: the local (listening) port; vet the port
    /// actually bound, as port 0 counts as a privileged port.
    pub port: u16,
    /// Outbound or inbound.
    pub direction: Direction,
    /// TCP or UDP.
    pub transport: Transport,
}

impl<'a> Target<'a> {
    /// An outbound target without a host name.
    pub fn outbound(addr: IpAddr, port: u16, transport: Transport) -> Self {
        Self {
            name: None,
            addr,
            port,
            direction: Direction::Outbound,
            transport,
        }
    }

    /// An inbound target: `port` is the local port, `addr` the peer (or local) address.
    pub fn inbound(addr: IpAddr, port: u16, transport: Transport) -> Self {
        Self {
            name: None,
            addr,
            port,
            direction: Direction::Inbound,
            transport,
        }
    }

    /// The same target, named.
    pub fn with_name(self, name: &'a HostName) -> Self {
        Self {
            name: Some(name),
            ..self
        }
    }
}

/// The verdict for one target, with the rule that decided it (for audit events).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    /// Whether the connection may go ahead.
    pub allowed: bool,
    /// The deciding rule's label, such as `default: loopback 127.0.0.0/8` or an
    /// administrator's label. Shared, so a decision does not allocate.
    pub rule: Arc<str>,
    /// Where the deciding rule came from.
    pub source: RuleSource,
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verdict = if self.allowed { "allowed" } else { "denied" };
        write!(f, "{verdict} by {} rule {:?}", self.source, &*self.rule)
    }
}

/// Why a policy could not be built from `policy.capnp` messages.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    /// The message could not be read.
    #[error("reading the {source_kind} policy: {error}")]
    Capnp {
        /// Whose policy.
        source_kind: RuleSource,
        /// The Cap'n Proto error.
        error: capnp::Error,
    },
    /// A rule is not valid.
    #[error("{source_kind} rule {index}: {error}")]
    Rule {
        /// Whose rule.
        source_kind: RuleSource,
        /// Its position in the list, from 0.
        index: usize,
        /// What is wrong with it.
        error: RuleError,
    },
}

/// How specific one matching rule is for one target; see the module documentation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Specificity {
    /// 0: no host condition; 1..=999: suffix label count; 1000: exact.
    host: u16,
    /// CIDR prefix length; 0 without a CIDR condition.
    prefix: u8,
    /// Number of ports in the matching range; 65536 without a port condition.
    port_width: u32,
    /// An administrator's rule (not a built-in default).
    explicit: bool,
}

impl Specificity {
    /// Whether `self` overrides `other`: at least as specific in every respect and more
    /// specific in one, or equal and explicit against a default.
    fn overrides(&self, other: &Self) -> bool {
        let at_least = self.host >= other.host
            && self.prefix >= other.prefix
            && self.port_width <= other.port_width;
        let more = self.host > other.host
            || self.prefix > other.prefix
            || self.port_width < other.port_width;
        at_least && (more || (self.explicit && !other.explicit))
    }

    /// The key that picks the rule named in a decision among several candidates.
    fn rank(&self) -> (u8, u16, std::cmp::Reverse<u32>, bool) {
        (
            self.prefix,
            self.host,
            std::cmp::Reverse(self.port_width),
            self.explicit,
        )
    }
}

/// A rule ready for matching.
#[derive(Debug)]
struct CompiledRule {
    action: Action,
    hosts: Vec<HostPattern>,
    nets: Vec<IpNet>,
    ports: Vec<RangeInclusive<u16>>,
    direction: RuleDirection,
    /// Built-in defaults may be limited to one transport; explicit rules never are.
    transport: Option<Transport>,
    label: Arc<str>,
    source: RuleSource,
}

const FULL_PORT_WIDTH: u32 = 65536;

fn port_width(range: &RangeInclusive<u16>) -> u32 {
    u32::from(*range.end()) - u32::from(*range.start()) + 1
}

impl CompiledRule {
    fn explicit(rule: Rule, source: RuleSource, index: usize) -> Self {
        let label: Arc<str> = if rule.label.is_empty() {
            format!("{source} rule {index}: {rule}").into()
        } else {
            rule.label.as_str().into()
        };
        Self {
            action: rule.action,
            hosts: rule.hosts,
            nets: rule.cidrs.into_iter().map(canonical_net).collect(),
            ports: rule.ports,
            direction: rule.direction,
            transport: None,
            label,
            source,
        }
    }

    fn default_rule(
        action: Action,
        nets: Vec<IpNet>,
        ports: Vec<RangeInclusive<u16>>,
        direction: RuleDirection,
        transport: Option<Transport>,
        label: &str,
    ) -> Self {
        Self {
            action,
            hosts: Vec::new(),
            nets,
            ports,
            direction,
            transport,
            label: label.into(),
            source: RuleSource::Default,
        }
    }

    fn covers(&self, direction: Direction) -> bool {
        matches!(
            (self.direction, direction),
            (RuleDirection::Both, _)
                | (RuleDirection::Outbound, Direction::Outbound)
                | (RuleDirection::Inbound, Direction::Inbound)
        )
    }

    /// The rule's best host specificity for `name`, if it matches.
    fn host_specificity(&self, name: Option<&HostName>) -> Option<u16> {
        if self.hosts.is_empty() {
            return Some(0);
        }
        let name = name?;
        self.hosts.iter().filter_map(|h| h.specificity(name)).max()
    }

    /// The narrowest matching port range's width, if the port matches.
    fn port_specificity(&self, port: u16) -> Option<u32> {
        if self.ports.is_empty() {
            return Some(FULL_PORT_WIDTH);
        }
        self.ports
            .iter()
            .filter(|r| r.contains(&port))
            .map(port_width)
            .min()
    }

    /// How specifically the rule matches the (canonical) target, if it matches.
    fn specificity(&self, t: &Target<'_>, addr: IpAddr) -> Option<Specificity> {
        if !self.covers(t.direction) || self.transport.is_some_and(|tr| tr != t.transport) {
            return None;
        }
        let port_width = self.port_specificity(t.port)?;
        let prefix = if self.nets.is_empty() {
            0
        } else {
            self.nets
                .iter()
                .filter(|n| n.contains(&addr))
                .map(IpNet::prefix_len)
                .max()?
        };
        let host = self.host_specificity(t.name)?;
        Some(Specificity {
            host,
            prefix,
            port_width,
            explicit: self.source != RuleSource::Default,
        })
    }

    fn decision(&self, allowed: bool) -> Decision {
        Decision {
            allowed,
            rule: Arc::clone(&self.label),
            source: self.source,
        }
    }
}

/// The built-in default rules, built once per process.
static DEFAULT_RULES: LazyLock<Vec<CompiledRule>> = LazyLock::new(|| {
    let mut rules = Vec::new();
    rules.push(CompiledRule::default_rule(
        Action::Allow,
        Vec::new(),
        Vec::new(),
        RuleDirection::Outbound,
        None,
        "default: public unicast",
    ));
    for range in special_ranges() {
        rules.push(CompiledRule::default_rule(
            Action::Deny,
            vec![range.net],
            Vec::new(),
            RuleDirection::Outbound,
            None,
            range.label,
        ));
    }
    rules.push(CompiledRule::default_rule(
        Action::Deny,
        Vec::new(),
        vec![0..=0],
        RuleDirection::Outbound,
        None,
        "default: destination port 0",
    ));
    for (port, service) in UDP_AMPLIFIER_PORTS {
        rules.push(CompiledRule::default_rule(
            Action::Deny,
            Vec::new(),
            vec![*port..=*port],
            RuleDirection::Outbound,
            Some(Transport::Udp),
            &format!("default: udp amplifier port {port} ({service})"),
        ));
    }
    // Like public unicast, the inbound allow has no condition at all, so that it is the
    // least specific rule and any explicit inbound deny overrides it; the privileged-port
    // deny below overrides it for ports 0-1023.
    rules.push(CompiledRule::default_rule(
        Action::Allow,
        Vec::new(),
        Vec::new(),
        RuleDirection::Inbound,
        None,
        "default: inbound ports 1024-65535",
    ));
    rules.push(CompiledRule::default_rule(
        Action::Deny,
        Vec::new(),
        vec![0..=FIRST_UNPRIVILEGED_PORT - 1],
        RuleDirection::Inbound,
        None,
        "default: inbound ports 0-1023 are privileged",
    ));
    rules
});

static LOW_PORTS_RULE: LazyLock<CompiledRule> = LazyLock::new(|| {
    CompiledRule::default_rule(
        Action::Deny,
        Vec::new(),
        vec![0..=FIRST_UNPRIVILEGED_PORT - 1],
        RuleDirection::Inbound,
        None,
        LOW_PORTS_UNPRIVILEGED,
    )
});

/// A matching rule and how specific it is.
#[derive(Clone, Copy)]
struct Hit<'a> {
    spec: Specificity,
    rule: &'a CompiledRule,
}

/// A list of hits that lives on the stack unless a target matches unusually many rules.
struct Hits<'a> {
    inline: [Option<Hit<'a>>; 16],
    len: usize,
    spill: Vec<Hit<'a>>,
}

impl<'a> Hits<'a> {
    fn new() -> Self {
        Self {
            inline: [None; 16],
            len: 0,
            spill: Vec::new(),
        }
    }

    fn push(&mut self, hit: Hit<'a>) {
        match self.inline.get_mut(self.len) {
            Some(slot) => {
                *slot = Some(hit);
                self.len += 1;
            }
            None => self.spill.push(hit),
        }
    }

    fn iter(&self) -> impl Iterator<Item = &Hit<'a>> {
        self.inline.iter().flatten().chain(self.spill.iter())
    }
}

/// An immutable, compiled policy: the driver's rules, a grant's rules and the built-in
/// defaults. Cheap to share (`Arc<Policy>`); [`Policy::decide`] allocates nothing unless more
/// than 16 allow rules match one target.
#[derive(Debug)]
pub struct Policy {
    rules: Vec<CompiledRule>,
    low_ports_privilege: bool,
}

impl Default for Policy {
    /// The built-in defaults alone, without the low-ports privilege.
    fn default() -> Self {
        Self::new(Vec::new(), Vec::new(), false)
    }
}

impl Policy {
    /// Builds a policy from the driver's rules, the grant's rules and whether the grant
    /// holds the low-ports privilege (listening below port 1024).
    ///
    /// Rules without a label get one generated from their text, such as
    /// `grant rule 0: deny hosts=any cidrs=any ports=any outbound`.
    pub fn new(driver_rules: Vec<Rule>, grant_rules: Vec<Rule>, low_ports_privilege: bool) -> Self {
        let driver = driver_rules
            .into_iter()
            .enumerate()
            .map(|(i, r)| CompiledRule::explicit(r, RuleSource::Driver, i));
        let grant = grant_rules
            .into_iter()
            .enumerate()
            .map(|(i, r)| CompiledRule::explicit(r, RuleSource::Grant, i));
        Self {
            rules: driver.chain(grant).collect(),
            low_ports_privilege,
        }
    }

    /// Builds a policy from the `policy.capnp` messages the supervisor sends: the driver's
    /// policy and the grant's. Every rule is validated.
    pub fn from_capnp(
        driver: policy_capnp::policy::Reader<'_>,
        grant: policy_capnp::policy::Reader<'_>,
        low_ports_privilege: bool,
    ) -> Result<Self, PolicyError> {
        Ok(Self::new(
            read_rules(driver, RuleSource::Driver)?,
            read_rules(grant, RuleSource::Grant)?,
            low_ports_privilege,
        ))
    }

    /// Whether the grant holds the low-ports privilege.
    pub fn low_ports_privilege(&self) -> bool {
        self.low_ports_privilege
    }

    /// Decides one connection or datagram; see the module documentation for the rules.
    pub fn decide(&self, target: &Target<'_>) -> Decision {
        if target.direction == Direction::Inbound
            && target.port < FIRST_UNPRIVILEGED_PORT
            && !self.low_ports_privilege
        {
            return LOW_PORTS_RULE.decision(false);
        }
        let addr = canonical_ip(target.addr);
        let mut allows = Hits::new();
        let pool = || DEFAULT_RULES.iter().chain(self.rules.iter());
        for rule in pool().filter(|r| r.action == Action::Allow) {
            if let Some(spec) = rule.specificity(target, addr) {
                allows.push(Hit { spec, rule });
            }
        }
        // A deny rule decides unless some matching allow rule overrides it.
        let mut denied_by: Option<Hit<'_>> = None;
        for rule in pool().filter(|r| r.action == Action::Deny) {
            let Some(spec) = rule.specificity(target, addr) else {
                continue;
            };
            if allows.iter().any(|a| a.spec.overrides(&spec)) {
                continue;
            }
            if denied_by.is_none_or(|d| spec.rank() > d.spec.rank()) {
                denied_by = Some(Hit { spec, rule });
            }
        }
        if let Some(deny) = denied_by {
            return deny.rule.decision(false);
        }
        let mut allowed_by: Option<&Hit<'_>> = None;
        for hit in allows.iter() {
            if allowed_by.is_none_or(|a| hit.spec.rank() > a.spec.rank()) {
                allowed_by = Some(hit);
            }
        }
        match allowed_by {
            Some(allow) => allow.rule.decision(true),
            None => NO_RULE.decision(false),
        }
    }

    /// An early verdict on a host name before it is resolved: `Some(denial)` when a deny
    /// rule that names this host (and has no CIDR condition) would deny every address the
    /// name could resolve to, because no allow rule could override it. `None` means the
    /// addresses must be resolved and decided one by one.
    ///
    /// `port: None` asks about every port: only deny rules without a port condition count.
    /// Whenever this returns a denial, [`Policy::decide`] denies every address with this
    /// name, port and direction, so a driver can skip the DNS query.
    pub fn decide_name(
        &self,
        name: &HostName,
        port: Option<u16>,
        direction: Direction,
    ) -> Option<Decision> {
        let mut denied_by: Option<Hit<'_>> = None;
        for deny in self.rules.iter().filter(|r| r.action == Action::Deny) {
            if !deny.covers(direction) || deny.hosts.is_empty() || !deny.nets.is_empty() {
                continue;
            }
            let Some(host) = deny.host_specificity(Some(name)) else {
                continue;
            };
            let deny_width = match port {
                Some(p) => match deny.port_specificity(p) {
                    Some(w) => w,
                    None => continue,
                },
                None if deny.ports.is_empty() => FULL_PORT_WIDTH,
                None => continue,
            };
            let spec = Specificity {
                host,
                prefix: 0,
                port_width: deny_width,
                explicit: true,
            };
            // Could any allow rule override this deny for some address? Assume the best
            // case for the allow rule: its longest prefix, its narrowest matching range.
            let overridable = self
                .rules
                .iter()
                .filter(|a| a.action == Action::Allow && a.covers(direction))
                .filter_map(|a| {
                    let host = a.host_specificity(Some(name))?;
                    let width = match port {
                        Some(p) => a.port_specificity(p)?,
                        None => a
                            .ports
                            .iter()
                            .map(port_width)
                            .min()
                            .unwrap_or(FULL_PORT_WIDTH),
                    };
                    let prefix = a.nets.iter().map(IpNet::prefix_len).max().unwrap_or(0);
                    Some(Specificity {
                        host,
                        prefix,
                        port_width: width,
                        explicit: true,
                    })
                })
                .any(|a| a.overrides(&spec));
            if !overridable && denied_by.is_none_or(|d| spec.rank() > d.spec.rank()) {
                denied_by = Some(Hit { spec, rule: deny });
            }
        }
        denied_by.map(|d| d.rule.decision(false))
    }
}

static NO_RULE: LazyLock<CompiledRule> = LazyLock::new(|| {
    CompiledRule::default_rule(
        Action::Deny,
        Vec::new(),
        Vec::new(),
        RuleDirection::Both,
        None,
        "default: no rule matched",
    )
});

/// Reads and validates the rules of one `policy.capnp` `Policy`.
fn read_rules(
    reader: policy_capnp::policy::Reader<'_>,
    source_kind: RuleSource,
) -> Result<Vec<Rule>, PolicyError> {
    let list = reader
        .get_rules()
        .map_err(|error| PolicyError::Capnp { source_kind, error })?;
    list.iter()
        .enumerate()
        .map(|(index, r)| {
            Rule::read_capnp(r).map_err(|error| PolicyError::Rule {
                source_kind,
                index,
                error,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests;
