//! Where a client wants to go ([`Target`]) and which grant kinds can take it there
//! ([`GrantKind`]), with their textual forms.
//!
//! Host names are never resolved here: a name travels to the driver as text
//! (`IpNetwork.getRemoteHostByName`), which resolves it under its policy. The bridge only
//! checks that a name is a syntactically plausible DNS name, so that hostile input from a
//! client never reaches a capability call as arbitrary bytes.

use std::fmt;
use std::net::IpAddr;

/// Longest DNS name accepted (without a trailing dot).
pub const MAX_NAME: usize = 253;

/// A host as a client named it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Host {
    /// A DNS name, lower-cased, without a trailing dot.
    Name(String),
    /// An address; IPv4-mapped IPv6 addresses are kept as IPv4.
    Ip(IpAddr),
}

/// A host or `host:port` text that is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    /// Empty, too long, or characters a DNS name cannot have.
    #[error("{0:?} is not a host name or IP address")]
    BadHost(String),
    /// No port, or not a number from 1 to 65535.
    #[error("{0:?} is not host:port with a port from 1 to 65535")]
    BadPort(String),
    /// A grant spec that does not parse.
    #[error(
        "{0:?} is not a grant: use network, host:HOST, tcp:HOST:PORT or udp:HOST:PORT \
         (IPv6 addresses in brackets)"
    )]
    BadGrant(String),
}

impl Host {
    /// Parses a host: an IP literal (IPv6 with or without brackets) or a DNS name.
    pub fn parse(text: &str) -> Result<Self, TargetError> {
        let bad = || TargetError::BadHost(text.chars().take(300).collect());
        let inner = text
            .strip_prefix('[')
            .and_then(|t| t.strip_suffix(']'))
            .unwrap_or(text);
        if let Ok(ip) = inner.parse::<IpAddr>() {
            return Ok(Host::Ip(ip.to_canonical()));
        }
        if inner.len() != text.len() {
            return Err(bad());
        }
        let name = text.strip_suffix('.').unwrap_or(text);
        if name.is_empty() || name.len() > MAX_NAME {
            return Err(bad());
        }
        for label in name.split('.') {
            let ok = !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
            if !ok {
                return Err(bad());
            }
        }
        Ok(Host::Name(name.to_ascii_lowercase()))
    }

    /// Whether two hosts are the same as far as the bridge can tell without resolving:
    /// equal names (case-insensitive) or equal addresses.
    pub fn same_as(&self, other: &Host) -> bool {
        self == other
    }

    /// The host as text for `getRemoteHostByName` or a powerbox request.
    pub fn text(&self) -> String {
        match self {
            Host::Name(n) => n.clone(),
            Host::Ip(ip) => ip.to_string(),
        }
    }
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Name(n) => f.write_str(n),
            Host::Ip(IpAddr::V6(v6)) => write!(f, "[{v6}]"),
            Host::Ip(IpAddr::V4(v4)) => write!(f, "{v4}"),
        }
    }
}

/// A host and a port.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Target {
    /// The host.
    pub host: Host,
    /// The port (never 0 for a connection).
    pub port: u16,
}

impl Target {
    /// Parses `host:port`, `[v6]:port`.
    pub fn parse(text: &str) -> Result<Self, TargetError> {
        let (host, port) = split_host_port(text)?;
        Ok(Target {
            host: Host::parse(host)?,
            port,
        })
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

/// Splits `host:port` or `[v6]:port`; the port must be 1-65535.
pub fn split_host_port(text: &str) -> Result<(&str, u16), TargetError> {
    let bad = || TargetError::BadPort(text.chars().take(300).collect());
    let (host, port) = if let Some(rest) = text.strip_prefix('[') {
        let (h, p) = rest.split_once("]:").ok_or_else(bad)?;
        (h, p)
    } else {
        text.rsplit_once(':').ok_or_else(bad)?
    };
    if host.contains(':') && !text.starts_with('[') {
        return Err(bad());
    }
    if port.is_empty() || port.len() > 5 || !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    match port.parse::<u16>() {
        Ok(p) if p != 0 => Ok((host, p)),
        _ => Err(bad()),
    }
}

/// What one grant lets the bridge reach.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum GrantKind {
    /// An `IpNetwork` (plain, `encryption = none`): any host the driver's policy allows.
    Network,
    /// An `IpRemoteHost`: one host, any port the policy allows.
    RemoteHost(Host),
    /// A `TcpPort`: exactly one host and port.
    TcpPort(Target),
    /// A `UdpPort`: exactly one host and port, datagrams only.
    UdpPort(Target),
}

impl GrantKind {
    /// Parses `network`, `host:HOST`, `tcp:HOST:PORT`, `udp:HOST:PORT`.
    pub fn parse(text: &str) -> Result<Self, TargetError> {
        let bad = || TargetError::BadGrant(text.chars().take(300).collect());
        if text == "network" {
            return Ok(GrantKind::Network);
        }
        let (kind, rest) = text.split_once(':').ok_or_else(bad)?;
        match kind {
            "host" => Ok(GrantKind::RemoteHost(Host::parse(rest).map_err(|_| bad())?)),
            "tcp" => Ok(GrantKind::TcpPort(Target::parse(rest).map_err(|_| bad())?)),
            "udp" => Ok(GrantKind::UdpPort(Target::parse(rest).map_err(|_| bad())?)),
            _ => Err(bad()),
        }
    }

    /// How specifically this grant matches a TCP connection to `t` (higher is more
    /// specific), or `None` if it cannot carry it.
    pub fn tcp_score(&self, t: &Target) -> Option<u8> {
        match self {
            GrantKind::TcpPort(g) if g.port == t.port && g.host.same_as(&t.host) => Some(3),
            GrantKind::RemoteHost(h) if h.same_as(&t.host) => Some(2),
            GrantKind::Network => Some(1),
            _ => None,
        }
    }

    /// Like [`tcp_score`](Self::tcp_score) for UDP datagrams to `t`.
    pub fn udp_score(&self, t: &Target) -> Option<u8> {
        match self {
            GrantKind::UdpPort(g) if g.port == t.port && g.host.same_as(&t.host) => Some(3),
            GrantKind::RemoteHost(h) if h.same_as(&t.host) => Some(2),
            GrantKind::Network => Some(1),
            _ => None,
        }
    }

    /// Whether this grant can carry UDP at all.
    pub fn carries_udp(&self) -> bool {
        !matches!(self, GrantKind::TcpPort(_))
    }
}

impl fmt::Display for GrantKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GrantKind::Network => f.write_str("network"),
            GrantKind::RemoteHost(h) => write!(f, "host:{h}"),
            GrantKind::TcpPort(t) => write!(f, "tcp:{t}"),
            GrantKind::UdpPort(t) => write!(f, "udp:{t}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Names are lower-cased and lose a trailing dot; IP literals (bracketed or not) and
    /// IPv4-mapped IPv6 become plain addresses; anything else is refused.
    #[test]
    fn hosts_parse_strictly() {
        assert_eq!(
            Host::parse("Web.Example.TEST.").unwrap(),
            Host::Name("web.example.test".into())
        );
        assert_eq!(
            Host::parse("[::1]").unwrap(),
            Host::Ip("::1".parse().unwrap())
        );
        assert_eq!(
            Host::parse("::ffff:10.0.0.1").unwrap(),
            Host::Ip("10.0.0.1".parse().unwrap())
        );
        for bad in [
            "",
            ".",
            "a..b",
            "a b",
            "a/b",
            "[example.com]",
            "exa\u{e9}mple.com",
            "a\0b",
            &"a".repeat(64),
            &format!("{}.com", "a.".repeat(130)),
        ] {
            assert!(Host::parse(bad).is_err(), "{bad:?} was accepted");
        }
    }

    /// host:port splitting handles IPv6 brackets and refuses port 0, signs, overflow and
    /// unbracketed IPv6.
    #[test]
    fn targets_parse_strictly() {
        assert_eq!(
            Target::parse("[::1]:8080").unwrap().to_string(),
            "[::1]:8080"
        );
        assert_eq!(Target::parse("a.b:1").unwrap().to_string(), "a.b:1");
        for bad in [
            "a.b",
            "a.b:",
            "a.b:0",
            "a.b:+1",
            "a.b:65536",
            "::1:80",
            "[::1]80",
            ":80",
        ] {
            assert!(Target::parse(bad).is_err(), "{bad:?} was accepted");
        }
    }

    /// Grant specs round-trip, and the most specific kind scores highest.
    #[test]
    fn grant_specs_and_scores() {
        for s in ["network", "host:a.test", "tcp:a.test:80", "udp:[::1]:53"] {
            assert_eq!(GrantKind::parse(s).unwrap().to_string(), s);
        }
        for bad in ["", "net", "tcp:a.test", "tcp::80", "udp:a.test:0", "x:a:1"] {
            assert!(GrantKind::parse(bad).is_err(), "{bad:?}");
        }
        let t = Target::parse("a.test:80").unwrap();
        let tcp = GrantKind::parse("tcp:A.test:80").unwrap();
        assert_eq!(tcp.tcp_score(&t), Some(3));
        assert_eq!(
            GrantKind::parse("tcp:a.test:81").unwrap().tcp_score(&t),
            None
        );
        assert_eq!(
            GrantKind::parse("host:a.test").unwrap().tcp_score(&t),
            Some(2)
        );
        assert_eq!(GrantKind::Network.tcp_score(&t), Some(1));
        assert_eq!(tcp.udp_score(&t), None);
        // A name and an address never match each other: the bridge does not resolve.
        let ip = Target::parse("127.0.0.1:80").unwrap();
        assert_eq!(tcp.tcp_score(&ip), None);
    }
}
