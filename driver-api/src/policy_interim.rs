//! Interim address policy used until the full engine (`policy`) lands: CIDR and port rules,
//! default deny for non-public addresses, most specific prefix wins, deny wins ties.

use std::net::IpAddr;

use capnet_schemas::policy_capnp::{policy, rule};
use ipnet::IpNet;

/// Connection direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Connecting out.
    Outbound,
    /// Listening.
    Inbound,
}

/// One rule.
#[derive(Clone, Debug)]
pub struct Rule {
    allow: bool,
    cidrs: Vec<IpNet>,
    hosts: Vec<String>,
    ports: Vec<(u16, u16)>,
    label: String,
    direction: Option<Direction>,
}

/// A verdict.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    /// Whether it is allowed.
    pub allowed: bool,
    /// The deciding rule.
    pub rule: String,
}

/// A compiled policy.
#[derive(Clone, Debug, Default)]
pub struct Policy {
    rules: Vec<Rule>,
    low_ports: bool,
}

fn read_rules(p: policy::Reader<'_>, out: &mut Vec<Rule>) -> capnp::Result<()> {
    for r in p.get_rules()? {
        let mut cidrs = Vec::new();
        for c in r.get_cidrs()? {
            let c = c?.to_str()?;
            let net: IpNet = c
                .parse()
                .or_else(|_| c.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| capnp::Error::failed(format!("invalid CIDR {c:?}")))?;
            cidrs.push(net);
        }
        let mut hosts = Vec::new();
        for h in r.get_hosts()? {
            hosts.push(h?.to_str()?.to_ascii_lowercase());
        }
        let ports = r
            .get_ports()?
            .iter()
            .map(|p| (p.get_first(), p.get_last()))
            .collect();
        let direction = match r.get_direction()? {
            rule::Direction::Outbound => Some(Direction::Outbound),
            rule::Direction::Inbound => Some(Direction::Inbound),
            rule::Direction::Both => None,
        };
        out.push(Rule {
            allow: r.get_action()? == rule::Action::Allow,
            cidrs,
            hosts,
            ports,
            label: r.get_label()?.to_str()?.to_string(),
            direction,
        });
    }
    Ok(())
}

fn default_class(addr: IpAddr) -> Option<(&'static str, u8)> {
    match addr {
        IpAddr::V4(a) => {
            if a.is_loopback() {
                Some(("default: loopback 127.0.0.0/8", 8))
            } else if a.is_private() {
                Some(("default: private address", 8))
            } else if a.is_link_local() {
                Some(("default: link-local 169.254.0.0/16", 16))
            } else if a.is_unspecified()
                || a.is_broadcast()
                || a.is_multicast()
                || a.is_documentation()
            {
                Some(("default: not public unicast", 8))
            } else {
                None
            }
        }
        IpAddr::V6(a) => {
            if a.is_loopback() {
                Some(("default: loopback ::1/128", 128))
            } else if a.is_unspecified()
                || a.is_multicast()
                || (a.segments()[0] & 0xfe00) == 0xfc00
                || (a.segments()[0] & 0xffc0) == 0xfe80
            {
                Some(("default: not public unicast", 7))
            } else {
                None
            }
        }
    }
}

impl Policy {
    /// Compiles the driver-wide and the grant's rules.
    pub fn from_capnp(
        driver: policy::Reader<'_>,
        grant: policy::Reader<'_>,
        low_ports: bool,
    ) -> capnp::Result<Self> {
        let mut rules = Vec::new();
        read_rules(driver, &mut rules)?;
        read_rules(grant, &mut rules)?;
        Ok(Self { rules, low_ports })
    }

    /// Decides a connection to (or a listener on) `addr:port`, known by `name` if any.
    pub fn decide(
        &self,
        name: Option<&str>,
        addr: Option<IpAddr>,
        port: u16,
        dir: Direction,
    ) -> Decision {
        // (specificity, allow, label)
        let mut best: Option<(u32, bool, String)> = None;
        let mut consider = |spec: u32, allow: bool, label: &str| {
            let better = match &best {
                None => true,
                Some((s, a, _)) => spec > *s || (spec == *s && *a && !allow),
            };
            if better {
                best = Some((spec, allow, label.to_string()));
            }
        };
        match dir {
            Direction::Outbound => {
                if let Some(addr) = addr {
                    match default_class(addr) {
                        Some((label, prefix)) => {
                            consider((u32::from(prefix) * 4).saturating_sub(1), false, label)
                        }
                        None => consider(0, true, "default: public unicast"),
                    }
                }
            }
            Direction::Inbound => {
                if port < 1024 && !self.low_ports {
                    consider(
                        u32::MAX,
                        false,
                        "default: low ports need the low_ports privilege",
                    );
                } else if port < 1024 {
                    consider(1, false, "default: low port");
                } else {
                    consider(0, true, "default: unprivileged port");
                }
            }
        }
        for r in &self.rules {
            if r.direction.is_some_and(|d| d != dir) {
                continue;
            }
            if !r.ports.is_empty() && !r.ports.iter().any(|(a, b)| (*a..=*b).contains(&port)) {
                continue;
            }
            let mut spec = 0u32;
            if !r.hosts.is_empty() {
                let Some(n) = name else { continue };
                let n = n.to_ascii_lowercase();
                if !r.hosts.iter().any(|h| {
                    h == &n
                        || h.strip_prefix("*.")
                            .is_some_and(|s| n.ends_with(&format!(".{s}")))
                }) {
                    continue;
                }
                spec += 1000;
            }
            if !r.cidrs.is_empty() {
                let Some(a) = addr else { continue };
                let Some(m) = r
                    .cidrs
                    .iter()
                    .filter(|c| c.contains(&a))
                    .map(|c| c.prefix_len())
                    .max()
                else {
                    continue;
                };
                spec += u32::from(m) * 4;
            }
            if !r.ports.is_empty() {
                spec += 1;
            }
            let label = if r.label.is_empty() {
                "unnamed rule"
            } else {
                &r.label
            };
            consider(spec, r.allow, label);
        }
        match best {
            Some((_, allowed, rule)) => Decision { allowed, rule },
            None => Decision {
                allowed: false,
                rule: "default: deny".into(),
            },
        }
    }
}

/// A rule as written in TOML configuration.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// "allow" or "deny".
    pub action: String,
    /// Host patterns.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// CIDRs.
    #[serde(default)]
    pub cidrs: Vec<String>,
    /// Port ranges such as "80" or "8000-8100".
    #[serde(default)]
    pub ports: Vec<String>,
    /// "outbound", "inbound" or "both".
    #[serde(default)]
    pub direction: Option<String>,
    /// Label for the audit log.
    #[serde(default)]
    pub label: String,
}

impl RuleConfig {
    /// Writes into a capnp rule builder.
    pub fn write(&self, mut b: rule::Builder<'_>) -> Result<(), String> {
        b.set_action(match self.action.as_str() {
            "allow" => rule::Action::Allow,
            "deny" => rule::Action::Deny,
            other => {
                return Err(format!(
                    "rule action {other:?} must be \"allow\" or \"deny\""
                ));
            }
        });
        b.set_direction(match self.direction.as_deref() {
            None | Some("outbound") => rule::Direction::Outbound,
            Some("inbound") => rule::Direction::Inbound,
            Some("both") => rule::Direction::Both,
            Some(other) => {
                return Err(format!(
                    "rule direction {other:?} must be outbound, inbound or both"
                ));
            }
        });
        b.set_label(&self.label);
        let mut hosts = b.reborrow().init_hosts(self.hosts.len() as u32);
        for (i, h) in self.hosts.iter().enumerate() {
            hosts.set(i as u32, h);
        }
        let mut cidrs = b.reborrow().init_cidrs(self.cidrs.len() as u32);
        for (i, c) in self.cidrs.iter().enumerate() {
            cidrs.set(i as u32, c);
        }
        let mut ports = b.init_ports(self.ports.len() as u32);
        for (i, p) in self.ports.iter().enumerate() {
            let (a, z) = match p.split_once('-') {
                Some((a, z)) => (a.trim().parse::<u16>(), z.trim().parse::<u16>()),
                None => (p.trim().parse::<u16>(), p.trim().parse::<u16>()),
            };
            let (Ok(a), Ok(z)) = (a, z) else {
                return Err(format!(
                    "port range {p:?} must be N or N-M with 0 <= N <= M <= 65535"
                ));
            };
            let mut e = ports.reborrow().get(i as u32);
            e.set_first(a);
            e.set_last(z);
        }
        Ok(())
    }
}

/// Writes `rules` into a capnp policy builder.
pub fn write_rules(rules: &[RuleConfig], b: policy::Builder<'_>) -> Result<(), String> {
    let mut list = b.init_rules(rules.len() as u32);
    for (i, r) in rules.iter().enumerate() {
        r.write(list.reborrow().get(i as u32))?;
    }
    Ok(())
}

impl RuleConfig {
    /// Reads a capnp rule back into its configuration form.
    pub fn read(r: rule::Reader<'_>) -> capnp::Result<Self> {
        let mut hosts = Vec::new();
        for h in r.get_hosts()? {
            hosts.push(h?.to_string()?);
        }
        let mut cidrs = Vec::new();
        for c in r.get_cidrs()? {
            cidrs.push(c?.to_string()?);
        }
        let ports = r
            .get_ports()?
            .iter()
            .map(|p| {
                if p.get_first() == p.get_last() {
                    p.get_first().to_string()
                } else {
                    format!("{}-{}", p.get_first(), p.get_last())
                }
            })
            .collect();
        Ok(Self {
            action: match r.get_action()? {
                rule::Action::Allow => "allow".into(),
                rule::Action::Deny => "deny".into(),
            },
            hosts,
            cidrs,
            ports,
            direction: Some(
                match r.get_direction()? {
                    rule::Direction::Outbound => "outbound",
                    rule::Direction::Inbound => "inbound",
                    rule::Direction::Both => "both",
                }
                .into(),
            ),
            label: r.get_label()?.to_string()?,
        })
    }
}
