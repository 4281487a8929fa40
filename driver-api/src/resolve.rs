//! Name resolution inside the driver, and vetting of every resolved address.
//!
//! Drivers resolve names themselves with [`Resolver`] (hickory, no NSS, no `getaddrinfo`),
//! from the system's `/etc/resolv.conf` and `/etc/hosts` or from explicit name servers
//! and static entries. Names are always looked up as fully qualified (no search domains),
//! so what a grain asks for is what is resolved.
//!
//! [`resolve_vetted`] is the only way a driver should turn a grain's host into addresses:
//!
//! 1. an address given literally is decided by the [`Policy`] as it is;
//! 2. a name is first checked with [`Policy::decide_name`], so a name denied by a rule is
//!    never sent to a name server;
//! 3. otherwise the name is resolved **once**, and every address in that one answer is
//!    decided on its own; the allowed ones are returned in resolver order as
//!    [`VettedAddr`]s, with their decisions, and the refused ones are kept for the audit
//!    log;
//! 4. a name whose addresses are all refused fails with [`VetError::NotFound`], whose
//!    message is exactly the one for a name that does not exist, so a grain cannot use
//!    the driver to probe which internal names exist. The refusals stay available to the
//!    driver through [`VetError::refused`].
//!
//! The driver then connects to a [`VettedAddr`], never to the name: there is no second
//! lookup, so a name that changes its answer (DNS rebinding) cannot slip an address past
//! the policy. Answers are cached by hickory for at most
//! [`ResolverOptions::cache_max_ttl`]; a cached answer is vetted again on every use.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{
    ConnectionConfig, NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts,
};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::Name;

pub use crate::policy::HostSpec;
use crate::policy::{Decision, Direction, HostName, Policy, Target, Transport, canonical_ip};

/// How a [`Resolver`] finds names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResolverOptions {
    /// Name servers to ask. Empty: those of `/etc/resolv.conf` (the default).
    pub nameservers: Vec<SocketAddr>,
    /// Whether `/etc/hosts` is consulted before DNS (default: true).
    pub system_hosts: bool,
    /// Static entries, consulted before everything else; a name listed here resolves to
    /// exactly the addresses listed for it.
    pub hosts: Vec<(HostName, IpAddr)>,
    /// How long to wait for one answer; `None`: the system's or hickory's default (5 s).
    pub timeout: Option<Duration>,
    /// How many times to retry a failed query; `None`: the system's or hickory's default.
    pub attempts: Option<usize>,
    /// The longest time an answer is cached, whatever its TTL; zero disables the cache
    /// (default: 30 s).
    pub cache_max_ttl: Duration,
}

impl Default for ResolverOptions {
    fn default() -> Self {
        Self {
            nameservers: Vec::new(),
            system_hosts: true,
            hosts: Vec::new(),
            timeout: None,
            attempts: None,
            cache_max_ttl: Duration::from_secs(30),
        }
    }
}

impl ResolverOptions {
    /// The system configuration: `/etc/resolv.conf` and `/etc/hosts`.
    pub fn system() -> Self {
        Self::default()
    }

    /// Explicit name servers only: neither `/etc/resolv.conf` nor `/etc/hosts` is read.
    pub fn with_nameservers(nameservers: Vec<SocketAddr>) -> Self {
        Self {
            nameservers,
            system_hosts: false,
            ..Self::default()
        }
    }

    /// Adds a static entry.
    pub fn host(mut self, name: HostName, addr: IpAddr) -> Self {
        self.hosts.push((name, addr));
        self
    }
}

/// Parses a name server address: `127.0.0.1:5353`, `[::1]:53`, or an address alone for
/// port 53. The address must be in strict canonical form.
pub fn parse_nameserver(text: &str) -> Result<SocketAddr, BuildResolverError> {
    let err = || BuildResolverError::Nameserver {
        value: text.to_owned(),
    };
    if let Some(addr) = crate::policy::parse_ip_strict(text) {
        return Ok(SocketAddr::new(addr, 53));
    }
    let (host, port) = text.rsplit_once(':').ok_or_else(err)?;
    let addr = match host.strip_prefix('[') {
        Some(_) => crate::policy::parse_ip_strict(host).filter(IpAddr::is_ipv6),
        None => crate::policy::parse_ip_strict(host).filter(IpAddr::is_ipv4),
    }
    .ok_or_else(err)?;
    let canonical_port = !port.is_empty()
        && port.bytes().all(|b| b.is_ascii_digit())
        && (port.len() == 1 || !port.starts_with('0'));
    if !canonical_port {
        return Err(err());
    }
    let port = port.parse().map_err(|_| err())?;
    Ok(SocketAddr::new(addr, port))
}

/// Why a [`Resolver`] could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BuildResolverError {
    /// The system configuration could not be read.
    #[error("reading the system resolver configuration (/etc/resolv.conf): {0}")]
    SystemConfig(String),
    /// hickory refused the configuration.
    #[error("building the resolver: {0}")]
    Build(String),
    /// A name server address is not valid.
    #[error(
        "invalid name server {value:?}: expected an address with an optional port, such as \
         127.0.0.1:5353, [::1]:53 or 192.0.2.53"
    )]
    Nameserver {
        /// The text as written.
        value: String,
    },
}

/// Why a name could not be resolved.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LookupError {
    /// The name does not exist or has no address records.
    #[error("host {name} not found")]
    NotFound {
        /// The name.
        name: HostName,
    },
    /// The lookup failed (timeout, server failure, network error).
    #[error("looking up host {name} failed: {reason}")]
    Failed {
        /// The name.
        name: HostName,
        /// The resolver's explanation.
        reason: String,
    },
}

/// A name resolver for drivers, built on hickory. Cheap to clone; clones share the cache.
#[derive(Clone)]
pub struct Resolver {
    inner: TokioResolver,
    static_hosts: Arc<HashMap<HostName, Vec<IpAddr>>>,
}

impl fmt::Debug for Resolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Resolver")
            .field("static_hosts", &self.static_hosts)
            .finish_non_exhaustive()
    }
}

impl Resolver {
    /// A resolver with the system configuration (`/etc/resolv.conf`, `/etc/hosts`).
    pub fn system() -> Result<Self, BuildResolverError> {
        Self::new(&ResolverOptions::system())
    }

    /// A resolver with the given options.
    pub fn new(options: &ResolverOptions) -> Result<Self, BuildResolverError> {
        let mut builder = if options.nameservers.is_empty() {
            TokioResolver::builder_tokio()
                .map_err(|e| BuildResolverError::SystemConfig(e.to_string()))?
        } else {
            let servers = options
                .nameservers
                .iter()
                .map(|server| {
                    let mut udp = ConnectionConfig::udp();
                    udp.port = server.port();
                    let mut tcp = ConnectionConfig::tcp();
                    tcp.port = server.port();
                    NameServerConfig::new(server.ip(), true, vec![udp, tcp])
                })
                .collect();
            TokioResolver::builder_with_config(
                ResolverConfig::from_name_servers(servers),
                TokioRuntimeProvider::default(),
            )
        };
        let opts: &mut ResolverOpts = builder.options_mut();
        opts.use_hosts_file = if options.system_hosts {
            ResolveHosts::Always
        } else {
            ResolveHosts::Never
        };
        if let Some(timeout) = options.timeout {
            opts.timeout = timeout;
        }
        if let Some(attempts) = options.attempts {
            opts.attempts = attempts;
        }
        opts.positive_max_ttl = Some(options.cache_max_ttl);
        opts.negative_max_ttl = Some(options.cache_max_ttl);
        if options.cache_max_ttl.is_zero() {
            opts.cache_size = 0;
        }
        let inner = builder
            .build()
            .map_err(|e| BuildResolverError::Build(e.to_string()))?;
        let mut static_hosts: HashMap<HostName, Vec<IpAddr>> = HashMap::new();
        for (name, addr) in &options.hosts {
            let addrs = static_hosts.entry(name.clone()).or_default();
            if !addrs.contains(addr) {
                addrs.push(*addr);
            }
        }
        Ok(Self {
            inner,
            static_hosts: Arc::new(static_hosts),
        })
    }

    /// Resolves a name to its addresses (A and AAAA), in the resolver's order, each
    /// converted with [`canonical_ip`] and without duplicates. Static entries answer
    /// first; `localhost` and its subdomains resolve to loopback without a query.
    pub async fn lookup(&self, name: &HostName) -> Result<Vec<IpAddr>, LookupError> {
        if let Some(addrs) = self.static_hosts.get(name) {
            return Ok(addrs.clone());
        }
        let failed = |reason: String| LookupError::Failed {
            name: name.clone(),
            reason,
        };
        let fqdn = Name::from_ascii(format!("{name}.")).map_err(|e| failed(e.to_string()))?;
        match self.inner.lookup_ip(fqdn).await {
            Ok(answer) => {
                let mut addrs: Vec<IpAddr> = Vec::new();
                for addr in answer.iter().map(canonical_ip) {
                    if !addrs.contains(&addr) {
                        addrs.push(addr);
                    }
                }
                if addrs.is_empty() {
                    return Err(LookupError::NotFound { name: name.clone() });
                }
                Ok(addrs)
            }
            Err(e) if e.is_no_records_found() => Err(LookupError::NotFound { name: name.clone() }),
            Err(e) => Err(failed(e.to_string())),
        }
    }
}

/// An address that the policy allowed, with the decision. Only [`resolve_vetted`] makes
/// these, so holding one proves the address was vetted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VettedAddr {
    addr: IpAddr,
    port: u16,
    decision: Decision,
}

impl VettedAddr {
    /// The address (canonical: IPv4-mapped addresses are IPv4).
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The address and port to connect to.
    pub fn socket_addr(&self) -> SocketAddr {
        SocketAddr::new(self.addr, self.port)
    }

    /// The policy's decision for this address.
    pub fn decision(&self) -> &Decision {
        &self.decision
    }
}

/// An address that the policy refused, with the decision (for the audit log).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RefusedAddr {
    /// The address (canonical).
    pub addr: IpAddr,
    /// The policy's decision.
    pub decision: Decision,
}

/// The result of one lookup, vetted: at least one allowed address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Vetted {
    host: HostSpec,
    allowed: Vec<VettedAddr>,
    refused: Vec<RefusedAddr>,
}

impl Vetted {
    /// The host as the grain gave it.
    pub fn host(&self) -> &HostSpec {
        &self.host
    }

    /// The allowed addresses in resolver order; never empty.
    pub fn allowed(&self) -> &[VettedAddr] {
        &self.allowed
    }

    /// The addresses of the same answer that the policy refused.
    pub fn refused(&self) -> &[RefusedAddr] {
        &self.refused
    }
}

/// Why [`resolve_vetted`] produced no address.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum VetError {
    /// The name does not exist, has no addresses, or all its addresses were refused. The
    /// message is the same in all three cases; [`VetError::refused`] tells them apart.
    #[error("host {name} not found")]
    NotFound {
        /// The name.
        name: HostName,
        /// The refused addresses, empty if the name really did not resolve.
        refused: Vec<RefusedAddr>,
    },
    /// An address given literally, or a name, was denied by a rule.
    #[error("connection to {host} port {port} is not allowed by the egress policy")]
    Denied {
        /// The host as given.
        host: HostSpec,
        /// The port.
        port: u16,
        /// The decision, for the audit log.
        decision: Decision,
    },
    /// The lookup failed for another reason (timeout, server failure).
    #[error(transparent)]
    Lookup(LookupError),
}

impl VetError {
    /// The refused addresses behind a [`VetError::NotFound`] (empty otherwise).
    pub fn refused(&self) -> &[RefusedAddr] {
        match self {
            Self::NotFound { refused, .. } => refused,
            _ => &[],
        }
    }
}

/// Resolves `host` once and vets every address with `policy`; see the module
/// documentation.
pub async fn resolve_vetted(
    policy: &Policy,
    resolver: &Resolver,
    host: &HostSpec,
    port: u16,
    direction: Direction,
    transport: Transport,
) -> Result<Vetted, VetError> {
    let target = |addr, name| Target {
        name,
        addr,
        port,
        direction,
        transport,
    };
    let name = match host {
        HostSpec::Addr(addr) => {
            let addr = canonical_ip(*addr);
            let decision = policy.decide(&target(addr, None));
            if !decision.allowed {
                return Err(VetError::Denied {
                    host: host.clone(),
                    port,
                    decision,
                });
            }
            return Ok(Vetted {
                host: host.clone(),
                allowed: vec![VettedAddr {
                    addr,
                    port,
                    decision,
                }],
                refused: Vec::new(),
            });
        }
        HostSpec::Name(name) => name,
    };
    if let Some(decision) = policy.decide_name(name, Some(port), direction) {
        return Err(VetError::Denied {
            host: host.clone(),
            port,
            decision,
        });
    }
    let addrs = match resolver.lookup(name).await {
        Ok(addrs) => addrs,
        Err(LookupError::NotFound { name }) => {
            return Err(VetError::NotFound {
                name,
                refused: Vec::new(),
            });
        }
        Err(e) => return Err(VetError::Lookup(e)),
    };
    let mut allowed = Vec::new();
    let mut refused = Vec::new();
    for addr in addrs {
        let decision = policy.decide(&target(addr, Some(name)));
        if decision.allowed {
            allowed.push(VettedAddr {
                addr,
                port,
                decision,
            });
        } else {
            refused.push(RefusedAddr { addr, decision });
        }
    }
    if allowed.is_empty() {
        return Err(VetError::NotFound {
            name: name.clone(),
            refused,
        });
    }
    Ok(Vetted {
        host: host.clone(),
        allowed,
        refused,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nameservers_parse_strictly() {
        assert_eq!(
            parse_nameserver("127.0.0.1:5353").unwrap(),
            "127.0.0.1:5353".parse().unwrap()
        );
        assert_eq!(
            parse_nameserver("[::1]:53").unwrap(),
            "[::1]:53".parse().unwrap()
        );
        assert_eq!(
            parse_nameserver("192.0.2.53").unwrap(),
            "192.0.2.53:53".parse().unwrap()
        );
        assert_eq!(
            parse_nameserver("::1").unwrap(),
            "[::1]:53".parse().unwrap()
        );
        for bad in [
            "127.1:53",
            "localhost:53",
            "127.0.0.1:",
            "127.0.0.1:053",
            "127.0.0.1:65536",
            "::1:53x",
            "[127.0.0.1]:53",
            "",
        ] {
            let err = parse_nameserver(bad).unwrap_err();
            assert!(
                err.to_string().contains(&format!("{bad:?}")),
                "{bad}: {err}"
            );
        }
    }

    /// Static entries answer without any name server, and literal addresses are decided
    /// without a lookup.
    #[tokio::test]
    async fn static_hosts_and_literals() {
        let options = ResolverOptions::with_nameservers(vec!["127.0.0.1:9".parse().unwrap()])
            .host(
                HostName::parse("db.test").unwrap(),
                "11.0.0.7".parse().unwrap(),
            )
            .host(
                HostName::parse("db.test").unwrap(),
                "10.0.0.7".parse().unwrap(),
            )
            .host(
                HostName::parse("db.test").unwrap(),
                "11.0.0.7".parse().unwrap(),
            );
        let resolver = Resolver::new(&options).unwrap();
        let policy = Policy::default();
        let host = HostSpec::parse("DB.test.").unwrap();
        let vetted = resolve_vetted(
            &policy,
            &resolver,
            &host,
            5432,
            Direction::Outbound,
            Transport::Tcp,
        )
        .await
        .unwrap();
        let allowed: Vec<_> = vetted
            .allowed()
            .iter()
            .map(VettedAddr::socket_addr)
            .collect();
        assert_eq!(allowed, ["11.0.0.7:5432".parse().unwrap()]);
        assert_eq!(vetted.refused().len(), 1);
        assert_eq!(
            &*vetted.refused()[0].decision.rule,
            "default: private 10.0.0.0/8"
        );

        let literal = HostSpec::parse("::ffff:127.0.0.1").unwrap();
        let err = resolve_vetted(
            &policy,
            &resolver,
            &literal,
            80,
            Direction::Outbound,
            Transport::Tcp,
        )
        .await
        .unwrap_err();
        let VetError::Denied { decision, .. } = &err else {
            panic!("{err:?}");
        };
        assert_eq!(&*decision.rule, "default: loopback 127.0.0.0/8");
        assert_eq!(
            err.to_string(),
            "connection to ::ffff:127.0.0.1 port 80 is not allowed by the egress policy"
        );
        let public = HostSpec::parse("::ffff:11.1.1.1").unwrap();
        let vetted = resolve_vetted(
            &policy,
            &resolver,
            &public,
            80,
            Direction::Outbound,
            Transport::Tcp,
        )
        .await
        .unwrap();
        assert_eq!(
            vetted.allowed()[0].addr(),
            "11.1.1.1".parse::<IpAddr>().unwrap()
        );
    }
}
