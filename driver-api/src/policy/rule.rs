//! Policy rules: the validated [`Rule`], its TOML form [`RuleConfig`], and their
//! conversions to and from `policy.capnp`.

use std::fmt;
use std::net::IpAddr;
use std::ops::RangeInclusive;

use capnet_schemas::policy_capnp;
use ipnet::IpNet;
use serde::{Deserialize, Deserializer, Serialize};

use super::addr::{canonical_net, parse_ip_strict};
use super::host::{HostError, HostPattern};

/// What a rule does to the connections it matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Let the connection through.
    Allow,
    /// Refuse it.
    Deny,
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Allow => "allow",
            Self::Deny => "deny",
        })
    }
}

/// Which connections a rule applies to: those a grain makes (outbound), those a grain
/// accepts on a listening port (inbound), or both.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RuleDirection {
    /// Connections and datagrams the grain sends (the default).
    #[default]
    Outbound,
    /// Listening, and the connections and datagrams the grain receives there.
    Inbound,
    /// Both.
    Both,
}

impl fmt::Display for RuleDirection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Outbound => "outbound",
            Self::Inbound => "inbound",
            Self::Both => "both",
        })
    }
}

/// Why a rule was refused. Each message names the offending value and what was expected.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RuleError {
    /// A host pattern is not valid.
    #[error("invalid host pattern: {0}")]
    Host(#[from] HostError),
    /// A CIDR is not valid.
    #[error(
        "invalid cidr {value:?}: {reason}; expected an address or address/prefix such as \
         10.0.0.0/8, 192.0.2.7 or 2001:db8::/32"
    )]
    Cidr {
        /// The text as written.
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A CIDR has bits set after its prefix, which usually means a typo.
    #[error("cidr {value:?} has host bits set: expected the network address {network}")]
    CidrHostBits {
        /// The text as written.
        value: String,
        /// The network it would denote.
        network: IpNet,
    },
    /// A port or port range is not valid.
    #[error(
        "invalid port range {value:?}: {reason}; expected a port such as 443 or a range \
         such as 8000-8100, within 0-65535 and with first <= last"
    )]
    Port {
        /// The text as written.
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A Cap'n Proto port range whose first port is greater than its last.
    #[error("port range {first}-{last} is empty: expected first <= last")]
    EmptyPortRange {
        /// The first port.
        first: u16,
        /// The last port.
        last: u16,
    },
    /// A Cap'n Proto rule with an action this version does not know.
    #[error("unknown rule action {0}: expected allow (0) or deny (1)")]
    UnknownAction(u16),
    /// A Cap'n Proto rule with a direction this version does not know.
    #[error("unknown rule direction {0}: expected outbound (0), inbound (1) or both (2)")]
    UnknownDirection(u16),
    /// A Cap'n Proto text field that is not UTF-8.
    #[error("the rule's {field} contain text that is not utf-8")]
    NotUtf8 {
        /// `hosts`, `cidrs` or `label`.
        field: &'static str,
    },
    /// The Cap'n Proto message could not be read.
    #[error("reading the rule message: {0}")]
    Capnp(#[from] capnp::Error),
}

/// Parses a CIDR such as `10.0.0.0/8` or `2001:db8::/32`, or a single address (`/32` or
/// `/128` implied).
///
/// The address must be in strict canonical form ([`parse_ip_strict`]), the prefix a
/// decimal number without leading zeros, and no bits may be set after the prefix
/// (`10.0.0.1/8` is refused: write `10.0.0.0/8`). A network inside `::ffff:0:0/96` is
/// converted to the IPv4 network it denotes, as addresses are.
pub fn parse_cidr(text: &str) -> Result<IpNet, RuleError> {
    let err = |reason| RuleError::Cidr {
        value: text.to_owned(),
        reason,
    };
    let (addr_text, prefix_text) = match text.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (text, None),
    };
    let addr = parse_ip_strict(addr_text).ok_or_else(|| err("the address is not valid"))?;
    let max = match addr {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    };
    let prefix = match prefix_text {
        None => max,
        Some(p) => {
            let canonical = !p.is_empty()
                && p.len() <= 3
                && p.bytes().all(|b| b.is_ascii_digit())
                && (p.len() == 1 || !p.starts_with('0'));
            if !canonical {
                return Err(err("the prefix length is not a decimal number"));
            }
            match p.parse::<u8>() {
                Ok(n) if n <= max => n,
                _ => return Err(err("the prefix length is too long for the address")),
            }
        }
    };
    let net = IpNet::new(addr, prefix).map_err(|_| err("the prefix length is too long"))?;
    if net.trunc() != net {
        return Err(RuleError::CidrHostBits {
            value: text.to_owned(),
            network: net.trunc(),
        });
    }
    Ok(canonical_net(net))
}

/// Parses a port (`443`) or an inclusive port range (`8000-8100`).
pub fn parse_port_range(text: &str) -> Result<RangeInclusive<u16>, RuleError> {
    let err = |reason| RuleError::Port {
        value: text.to_owned(),
        reason,
    };
    let port = |p: &str| -> Result<u16, RuleError> {
        let canonical = !p.is_empty()
            && p.len() <= 5
            && p.bytes().all(|b| b.is_ascii_digit())
            && (p.len() == 1 || !p.starts_with('0'));
        if !canonical {
            return Err(err("a port is not a decimal number"));
        }
        p.parse().map_err(|_| err("a port is greater than 65535"))
    };
    match text.split_once('-') {
        None => {
            let p = port(text)?;
            Ok(p..=p)
        }
        Some((first, last)) => {
            let (first, last) = (port(first)?, port(last)?);
            if first > last {
                return Err(err("the first port is greater than the last"));
            }
            Ok(first..=last)
        }
    }
}

/// One validated rule. An empty list of hosts, CIDRs or ports means "any".
///
/// A connection matches the rule when its direction is covered, its host name matches one
/// of `hosts` (a rule with hosts never matches a connection made to a bare address), its
/// address is in one of `cidrs`, and its port is in one of `ports`. See the
/// [module documentation](super) for how matching rules are ranked.
///
/// The fields are public for convenience; [`Policy::new`](super::Policy::new) converts
/// IPv4-mapped networks to IPv4 and drops host bits, and a range with `start > end`
/// matches nothing. Use the builders, [`parse_cidr`], [`parse_port_range`] or
/// [`RuleConfig`] to get validation with useful errors.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    /// Allow or deny.
    pub action: Action,
    /// Host patterns; empty means any host, including connections by address.
    pub hosts: Vec<HostPattern>,
    /// Address ranges; empty means any address.
    pub cidrs: Vec<IpNet>,
    /// Port ranges; empty means any port.
    pub ports: Vec<RangeInclusive<u16>>,
    /// Which direction the rule covers.
    pub direction: RuleDirection,
    /// Shown in decisions and audit events; if empty, the policy generates one from the
    /// rule's text.
    pub label: String,
}

impl Rule {
    /// A rule with the given action that matches every outbound connection, to be narrowed
    /// with the builder methods.
    pub fn new(action: Action) -> Self {
        Self {
            action,
            hosts: Vec::new(),
            cidrs: Vec::new(),
            ports: Vec::new(),
            direction: RuleDirection::Outbound,
            label: String::new(),
        }
    }

    /// `Rule::new(Action::Allow)`.
    pub fn allow() -> Self {
        Self::new(Action::Allow)
    }

    /// `Rule::new(Action::Deny)`.
    pub fn deny() -> Self {
        Self::new(Action::Deny)
    }

    /// Adds a host pattern (`mail.example.com` or `*.example.com`).
    pub fn host(mut self, pattern: &str) -> Result<Self, RuleError> {
        self.hosts.push(HostPattern::parse(pattern)?);
        Ok(self)
    }

    /// Adds an address range (see [`parse_cidr`]).
    pub fn cidr(mut self, cidr: &str) -> Result<Self, RuleError> {
        self.cidrs.push(parse_cidr(cidr)?);
        Ok(self)
    }

    /// Adds a port or port range written as text (see [`parse_port_range`]).
    pub fn ports(mut self, range: &str) -> Result<Self, RuleError> {
        self.ports.push(parse_port_range(range)?);
        Ok(self)
    }

    /// Adds a single port.
    pub fn port(mut self, port: u16) -> Self {
        self.ports.push(port..=port);
        self
    }

    /// Sets the direction.
    pub fn direction(mut self, direction: RuleDirection) -> Self {
        self.direction = direction;
        self
    }

    /// Sets the label.
    pub fn label(mut self, label: impl Into<String>) -> Self {
        self.label = label.into();
        self
    }

    /// Validates a rule written in the configuration form.
    pub fn from_config(config: &RuleConfig) -> Result<Self, RuleError> {
        Ok(Self {
            action: config.action,
            hosts: config
                .hosts
                .iter()
                .map(|h| HostPattern::parse(h))
                .collect::<Result<_, _>>()?,
            cidrs: config
                .cidrs
                .iter()
                .map(|c| parse_cidr(c))
                .collect::<Result<_, _>>()?,
            ports: config
                .ports
                .iter()
                .map(|p| parse_port_range(p))
                .collect::<Result<_, _>>()?,
            direction: config.direction,
            label: config.label.clone(),
        })
    }

    /// The configuration form of this rule, in normalised text.
    pub fn to_config(&self) -> RuleConfig {
        RuleConfig {
            action: self.action,
            hosts: self.hosts.iter().map(ToString::to_string).collect(),
            cidrs: self.cidrs.iter().map(ToString::to_string).collect(),
            ports: self.ports.iter().map(port_range_text).collect(),
            direction: self.direction,
            label: self.label.clone(),
        }
    }

    /// Writes the rule into a `policy.capnp` `Rule`.
    pub fn write_capnp(&self, mut builder: policy_capnp::rule::Builder<'_>) {
        builder.set_action(match self.action {
            Action::Allow => policy_capnp::rule::Action::Allow,
            Action::Deny => policy_capnp::rule::Action::Deny,
        });
        builder.set_direction(match self.direction {
            RuleDirection::Outbound => policy_capnp::rule::Direction::Outbound,
            RuleDirection::Inbound => policy_capnp::rule::Direction::Inbound,
            RuleDirection::Both => policy_capnp::rule::Direction::Both,
        });
        builder.set_label(self.label.as_str());
        {
            let mut hosts = builder.reborrow().init_hosts(list_len(self.hosts.len()));
            for (i, host) in (0..).zip(&self.hosts) {
                hosts.set(i, host.to_string().as_str());
            }
        }
        {
            let mut cidrs = builder.reborrow().init_cidrs(list_len(self.cidrs.len()));
            for (i, cidr) in (0..).zip(&self.cidrs) {
                cidrs.set(i, cidr.to_string().as_str());
            }
        }
        let mut ports = builder.init_ports(list_len(self.ports.len()));
        for (i, range) in (0..).zip(&self.ports) {
            let mut port = ports.reborrow().get(i);
            port.set_first(*range.start());
            port.set_last(*range.end());
        }
    }

    /// Reads and validates a `policy.capnp` `Rule`.
    pub fn read_capnp(reader: policy_capnp::rule::Reader<'_>) -> Result<Self, RuleError> {
        let action = match reader.get_action() {
            Ok(policy_capnp::rule::Action::Allow) => Action::Allow,
            Ok(policy_capnp::rule::Action::Deny) => Action::Deny,
            Err(capnp::NotInSchema(n)) => return Err(RuleError::UnknownAction(n)),
        };
        let direction = match reader.get_direction() {
            Ok(policy_capnp::rule::Direction::Outbound) => RuleDirection::Outbound,
            Ok(policy_capnp::rule::Direction::Inbound) => RuleDirection::Inbound,
            Ok(policy_capnp::rule::Direction::Both) => RuleDirection::Both,
            Err(capnp::NotInSchema(n)) => return Err(RuleError::UnknownDirection(n)),
        };
        let mut rule = Self::new(action).direction(direction);
        for host in reader.get_hosts()?.iter() {
            let host = host?
                .to_str()
                .map_err(|_| RuleError::NotUtf8 { field: "hosts" })?;
            rule.hosts.push(HostPattern::parse(host)?);
        }
        for cidr in reader.get_cidrs()?.iter() {
            let cidr = cidr?
                .to_str()
                .map_err(|_| RuleError::NotUtf8 { field: "cidrs" })?;
            rule.cidrs.push(parse_cidr(cidr)?);
        }
        for range in reader.get_ports()?.iter() {
            let (first, last) = (range.get_first(), range.get_last());
            if first > last {
                return Err(RuleError::EmptyPortRange { first, last });
            }
            rule.ports.push(first..=last);
        }
        rule.label = reader
            .get_label()?
            .to_str()
            .map_err(|_| RuleError::NotUtf8 { field: "label" })?
            .to_owned();
        Ok(rule)
    }
}

/// Cap'n Proto list lengths are `u32`; a rule never has anywhere near that many entries.
fn list_len(len: usize) -> u32 {
    u32::try_from(len).unwrap_or(u32::MAX)
}

fn port_range_text(range: &RangeInclusive<u16>) -> String {
    if range.start() == range.end() {
        range.start().to_string()
    } else {
        format!("{}-{}", range.start(), range.end())
    }
}

impl fmt::Display for Rule {
    /// The rule in one line, as used for generated labels:
    /// `allow hosts=*.example.com cidrs=any ports=443,8000-8100 outbound`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fn list<T>(
            f: &mut fmt::Formatter<'_>,
            items: &[T],
            show: impl Fn(&T) -> String,
        ) -> fmt::Result {
            if items.is_empty() {
                return f.write_str("any");
            }
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    f.write_str(",")?;
                }
                f.write_str(&show(item))?;
            }
            Ok(())
        }
        write!(f, "{} hosts=", self.action)?;
        list(f, &self.hosts, ToString::to_string)?;
        f.write_str(" cidrs=")?;
        list(f, &self.cidrs, ToString::to_string)?;
        f.write_str(" ports=")?;
        list(f, &self.ports, port_range_text)?;
        write!(f, " {}", self.direction)
    }
}

impl TryFrom<&RuleConfig> for Rule {
    type Error = RuleError;

    fn try_from(config: &RuleConfig) -> Result<Self, Self::Error> {
        Self::from_config(config)
    }
}

impl TryFrom<RuleConfig> for Rule {
    type Error = RuleError;

    fn try_from(config: RuleConfig) -> Result<Self, Self::Error> {
        Self::from_config(&config)
    }
}

/// A rule as written in TOML (and other serde formats). Validate it with
/// [`Rule::from_config`] (or `Rule::try_from`).
///
/// ```toml
/// [[rule]]
/// action = "allow"                      # "allow" or "deny"
/// hosts = ["api.example.com", "*.cdn.example.com"]
/// cidrs = ["192.0.2.0/24"]              # optional
/// ports = [443, "8000-8100"]            # numbers or "FIRST-LAST" strings
/// direction = "outbound"                # "outbound" (default), "inbound" or "both"
/// label = "example api"
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// `"allow"` or `"deny"`.
    pub action: Action,
    /// Host patterns: exact names or `*.suffix`. Empty or absent means any host.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    /// Address ranges. Empty or absent means any address.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cidrs: Vec<String>,
    /// Ports (`"443"`) and port ranges (`"8000-8100"`); in TOML a port may also be written
    /// as a number. Empty or absent means any port.
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "deserialize_ports"
    )]
    pub ports: Vec<String>,
    /// `"outbound"` (the default), `"inbound"` or `"both"`.
    #[serde(default)]
    pub direction: RuleDirection,
    /// Shown in audit events as the deciding rule.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub label: String,
}

impl RuleConfig {
    /// Validates the rule and writes it into a `policy.capnp` `Rule` in normalised form.
    pub fn write_capnp(&self, builder: policy_capnp::rule::Builder<'_>) -> Result<(), RuleError> {
        Rule::from_config(self)?.write_capnp(builder);
        Ok(())
    }

    /// Reads and validates a `policy.capnp` `Rule` into the configuration form.
    pub fn read_capnp(reader: policy_capnp::rule::Reader<'_>) -> Result<Self, RuleError> {
        Rule::read_capnp(reader).map(|rule| rule.to_config())
    }
}

/// Accepts each port as a number or a string.
fn deserialize_ports<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<String>, D::Error> {
    struct PortText(String);

    impl<'de> Deserialize<'de> for PortText {
        fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            struct Visitor;
            impl serde::de::Visitor<'_> for Visitor {
                type Value = PortText;

                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str("a port number such as 443 or a range such as \"8000-8100\"")
                }

                fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<PortText, E> {
                    Ok(PortText(v.to_string()))
                }

                fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<PortText, E> {
                    Ok(PortText(v.to_string()))
                }

                fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<PortText, E> {
                    Ok(PortText(v.to_owned()))
                }
            }
            deserializer.deserialize_any(Visitor)
        }
    }

    Ok(Vec::<PortText>::deserialize(deserializer)?
        .into_iter()
        .map(|p| p.0)
        .collect())
}

/// Writes rules into a `policy.capnp` `Policy`.
pub fn write_policy(rules: &[Rule], builder: policy_capnp::policy::Builder<'_>) {
    let mut list = builder.init_rules(list_len(rules.len()));
    for (i, rule) in (0..).zip(rules) {
        rule.write_capnp(list.reborrow().get(i));
    }
}

/// Validates `rules` and writes them into a `policy.capnp` `Policy`.
pub fn write_rule_configs(
    rules: &[RuleConfig],
    builder: policy_capnp::policy::Builder<'_>,
) -> Result<(), RuleError> {
    let parsed = rules
        .iter()
        .map(Rule::from_config)
        .collect::<Result<Vec<_>, _>>()?;
    write_policy(&parsed, builder);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs_parse_strictly() {
        for (text, want) in [
            ("10.0.0.0/8", "10.0.0.0/8"),
            ("0.0.0.0/0", "0.0.0.0/0"),
            ("127.0.0.1", "127.0.0.1/32"),
            ("2001:db8::/32", "2001:db8::/32"),
            ("::1", "::1/128"),
            ("::ffff:10.0.0.0/104", "10.0.0.0/8"),
            ("::ffff:0:0/96", "0.0.0.0/0"),
            ("[fe80::]/10", "fe80::/10"),
        ] {
            assert_eq!(parse_cidr(text).unwrap().to_string(), want, "{text}");
        }
        for bad in [
            "10.0.0.0/33",
            "10.0.0.0/",
            "10.0.0.0/08",
            "10.0.0.0/+8",
            "010.0.0.0/8",
            "10.0/8",
            "::/129",
            "example.com/8",
            "",
            "10.0.0.0/8/8",
        ] {
            assert!(
                matches!(parse_cidr(bad), Err(RuleError::Cidr { .. })),
                "{bad:?}: {:?}",
                parse_cidr(bad)
            );
        }
        let err = parse_cidr("10.0.0.1/8").unwrap_err();
        assert_eq!(
            err.to_string(),
            "cidr \"10.0.0.1/8\" has host bits set: expected the network address 10.0.0.0/8"
        );
    }

    #[test]
    fn port_ranges_parse_strictly() {
        assert_eq!(parse_port_range("80").unwrap(), 80..=80);
        assert_eq!(parse_port_range("0").unwrap(), 0..=0);
        assert_eq!(parse_port_range("8000-8100").unwrap(), 8000..=8100);
        assert_eq!(parse_port_range("0-65535").unwrap(), 0..=65535);
        for bad in [
            "", "65536", "-1", "80-", "-80", "9000-80", "080", "8 0", "http", "1-2-3",
        ] {
            assert!(
                matches!(parse_port_range(bad), Err(RuleError::Port { .. })),
                "{bad:?}"
            );
        }
        assert_eq!(
            parse_port_range("9000-80").unwrap_err().to_string(),
            "invalid port range \"9000-80\": the first port is greater than the last; expected \
             a port such as 443 or a range such as 8000-8100, within 0-65535 and with first <= \
             last"
        );
    }

    #[test]
    fn toml_rules_validate_and_name_the_bad_value() {
        let toml_text = r#"
            action = "allow"
            hosts = ["API.Example.com", "*.cdn.example.com"]
            cidrs = ["192.0.2.0/24"]
            ports = [443, "8000-8100"]
            direction = "both"
            label = "example api"
        "#;
        let config: RuleConfig = toml::from_str(toml_text).unwrap();
        assert_eq!(config.ports, ["443", "8000-8100"]);
        let rule = Rule::try_from(&config).unwrap();
        assert_eq!(rule.hosts[0].to_string(), "api.example.com");
        assert_eq!(rule.ports, [443..=443, 8000..=8100]);
        assert_eq!(rule.direction, RuleDirection::Both);
        assert_eq!(
            rule.to_string(),
            "allow hosts=api.example.com,*.cdn.example.com cidrs=192.0.2.0/24 \
             ports=443,8000-8100 both"
        );
        let back = rule.to_config();
        assert_eq!(back.hosts, ["api.example.com", "*.cdn.example.com"]);
        assert_eq!(
            toml::from_str::<RuleConfig>(&toml::to_string(&back).unwrap()).unwrap(),
            back
        );

        let minimal: RuleConfig = toml::from_str("action = \"deny\"").unwrap();
        let rule = Rule::try_from(minimal).unwrap();
        assert_eq!(rule, Rule::deny());

        let err = toml::from_str::<RuleConfig>("action = \"alow\"").unwrap_err();
        assert!(err.to_string().contains("alow"), "{err}");
        let err = toml::from_str::<RuleConfig>("action = \"allow\"\nport = [1]").unwrap_err();
        assert!(err.to_string().contains("port"), "{err}");
        let err = toml::from_str::<RuleConfig>("action = \"allow\"\nports = [true]").unwrap_err();
        assert!(err.to_string().contains("a port number"), "{err}");

        let bad: RuleConfig =
            toml::from_str("action = \"allow\"\nports = [70000]\nhosts = [\"a\"]").unwrap();
        let err = Rule::try_from(&bad).unwrap_err();
        assert!(
            err.to_string().starts_with("invalid port range \"70000\""),
            "{err}"
        );
        let bad: RuleConfig = toml::from_str("action = \"allow\"\nhosts = [\"a_b\"]").unwrap();
        let err = Rule::try_from(&bad).unwrap_err();
        assert!(err.to_string().contains("\"a_b\""), "{err}");
    }

    #[test]
    fn rules_round_trip_through_capnp() {
        let rule = Rule::allow()
            .host("*.Example.com")
            .unwrap()
            .host("bücher.example")
            .unwrap()
            .cidr("10.1.0.0/16")
            .unwrap()
            .cidr("2001:db8::/48")
            .unwrap()
            .port(443)
            .ports("8000-8100")
            .unwrap()
            .direction(RuleDirection::Inbound)
            .label("round trip");
        let mut message = capnp::message::Builder::new_default();
        rule.write_capnp(message.init_root());
        let reader = message
            .get_root_as_reader::<policy_capnp::rule::Reader<'_>>()
            .unwrap();
        assert_eq!(Rule::read_capnp(reader).unwrap(), rule);
        let config = RuleConfig::read_capnp(reader).unwrap();
        assert_eq!(config, rule.to_config());
        assert_eq!(config.hosts, ["*.example.com", "xn--bcher-kva.example"]);

        let mut message = capnp::message::Builder::new_default();
        config.write_capnp(message.init_root()).unwrap();
        let reader = message
            .get_root_as_reader::<policy_capnp::rule::Reader<'_>>()
            .unwrap();
        assert_eq!(Rule::read_capnp(reader).unwrap(), rule);

        let bad = RuleConfig {
            cidrs: vec!["10.0.0.0/40".into()],
            ..rule.to_config()
        };
        let mut message = capnp::message::Builder::new_default();
        assert!(matches!(
            bad.write_capnp(message.init_root()),
            Err(RuleError::Cidr { .. })
        ));
    }

    #[test]
    fn capnp_rules_are_validated_on_read() {
        let mut message = capnp::message::Builder::new_default();
        {
            let mut rule = message.init_root::<policy_capnp::rule::Builder<'_>>();
            rule.reborrow().init_hosts(1).set(0, "0x7f.1");
        }
        let reader = message
            .get_root_as_reader::<policy_capnp::rule::Reader<'_>>()
            .unwrap();
        assert!(matches!(
            Rule::read_capnp(reader),
            Err(RuleError::Host(HostError::Numeric { .. }))
        ));

        let mut message = capnp::message::Builder::new_default();
        {
            let rule = message.init_root::<policy_capnp::rule::Builder<'_>>();
            let mut port = rule.init_ports(1).get(0);
            port.set_first(90);
            port.set_last(80);
        }
        let reader = message
            .get_root_as_reader::<policy_capnp::rule::Reader<'_>>()
            .unwrap();
        assert!(matches!(
            Rule::read_capnp(reader),
            Err(RuleError::EmptyPortRange {
                first: 90,
                last: 80
            })
        ));
    }
}
