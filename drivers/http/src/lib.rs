//! capnet's HTTP driver: HTTP and HTTPS egress where every request names the host it was
//! granted.
//!
//! A grain connects through an `IpNetwork` (or a narrower grant) from this driver as with
//! the TCP driver; the connection is vetted by the egress policy as usual, and then:
//!
//! * only the allowed ports work (`ports`, default 80 and 443);
//! * on a TLS port (`tls_ports`, default 443) the driver reads the grain's TLS
//!   ClientHello **without terminating TLS** and lets the connection through only if its
//!   server name (SNI) is allowed; otherwise it closes the connection. After the
//!   ClientHello the bytes pass through unchanged;
//! * on any other allowed port the grain speaks plain HTTP/1.x and **every request** on
//!   the connection (keep-alive included) must carry a Host header that is allowed;
//!   otherwise it gets `403 Forbidden` (or `400` for a missing Host) and the connection
//!   closes. Request heads above `max_header_bytes` get `431`, bodies above
//!   `max_body_bytes` get `413`, a server that does not answer within
//!   `response_timeout_secs` gives `504`, and a connection that moves more than
//!   `max_total_bytes` is cut.
//!
//! A network granted with `encryption = tls` makes the driver the TLS client (verified
//! against the CA set): the grain speaks plain HTTP, inspected as above, on any allowed
//! port.
//!
//! # Which names are allowed
//!
//! A Host header or SNI is allowed when it names **the host the grain connected to**: the
//! same DNS name (compared after IDNA normalisation, case-insensitively, without a
//! trailing dot) or, for a connection made to an address, that same address. A Host
//! header's port, if given, must be the connection's port. The name must also be allowed
//! by the grant's policy for the address actually connected (so host deny rules such as
//! `*.internal.example` apply to Host and SNI as well). Virtual hosting cannot be used
//! to reach a name the grain did not ask for.

#![warn(missing_docs)]

pub mod mediate;
pub mod sni;

use std::net::IpAddr;
use std::rc::Rc;
use std::time::Duration;

use capnet_driver_api::capnet_schemas::descriptor::Encryption;
use capnet_driver_api::capnet_schemas::ids;
use capnet_driver_api::policy::{HostSpec, Target as PolicyTarget, Transport, canonical_ip};
use capnet_driver_api::{
    ConnectContext, Connection, Driver, DriverError, DriverHost, EventKind, Manifest, Privileges,
    Provided,
};
use serde::Deserialize;

use crate::mediate::{HostCheck, HttpLimits, MediateError};

/// `[drivers.NAME.options]` of the HTTP driver.
///
/// ```toml
/// [drivers.http.options]
/// ports = [80, 443]              # destination ports allowed
/// tls_ports = [443]              # of those, the ones where TLS (SNI) is expected
/// max_header_bytes = 16384       # request line and header fields
/// max_body_bytes = 10485760      # request body
/// response_timeout_secs = 30     # from a complete request to the response head
/// idle_timeout_secs = 60         # between requests on a kept-alive connection
/// max_total_bytes = 0            # per connection, both directions; 0: no limit
/// ```
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpOptions {
    /// Destination ports allowed (default 80 and 443).
    pub ports: Option<Vec<u16>>,
    /// Ports where the grain speaks TLS (default 443).
    pub tls_ports: Option<Vec<u16>>,
    /// Longest request head in bytes (default 16 KiB).
    pub max_header_bytes: Option<usize>,
    /// Longest request body in bytes (default 10 MiB).
    pub max_body_bytes: Option<u64>,
    /// Seconds from a complete request to the response head (default 30).
    pub response_timeout_secs: Option<u64>,
    /// Seconds a connection may sit idle (default 60).
    pub idle_timeout_secs: Option<u64>,
    /// Bytes per connection, both directions; 0 means no limit (default 0).
    pub max_total_bytes: Option<u64>,
}

/// The HTTP driver.
pub struct HttpDriver {
    ports: Vec<u16>,
    tls_ports: Vec<u16>,
    limits: HttpLimits,
}

impl Driver for HttpDriver {
    type Options = HttpOptions;

    fn manifest() -> Manifest {
        Manifest {
            name: "http".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            description: "HTTP and HTTPS egress; every Host header and TLS SNI is checked".into(),
            author: "capnet".into(),
            provides: vec![Provided {
                interface_id: ids::IP_NETWORK,
                name: "IpNetwork".into(),
                protocols: vec!["http".into(), "https".into()],
            }],
            privileges: Privileges {
                outbound_tcp: true,
                dns: true,
                ..Default::default()
            },
        }
    }

    fn start(o: HttpOptions, _host: &DriverHost) -> Result<Self, DriverError> {
        let ports = o.ports.unwrap_or_else(|| vec![80, 443]);
        let tls_ports = o.tls_ports.unwrap_or_else(|| vec![443]);
        if ports.is_empty() || ports.contains(&0) {
            return Err(DriverError::Options(
                "ports must list at least one port, and not 0".into(),
            ));
        }
        Ok(Self {
            ports,
            tls_ports,
            limits: HttpLimits {
                max_header_bytes: o.max_header_bytes.unwrap_or(16 * 1024).max(256),
                max_body_bytes: o.max_body_bytes.unwrap_or(10 * 1024 * 1024),
                response_timeout: Duration::from_secs(o.response_timeout_secs.unwrap_or(30).max(1)),
                idle_timeout: Duration::from_secs(o.idle_timeout_secs.unwrap_or(60).max(1)),
                max_total_bytes: o.max_total_bytes.unwrap_or(0),
            },
        })
    }

    async fn connect(self: Rc<Self>, cx: ConnectContext) -> Result<Connection, DriverError> {
        let port = cx.target().port;
        if !self.ports.contains(&port) {
            let e = DriverError::Refused {
                what: format!("connect to {}", cx.target()),
                rule: format!(
                    "http: port {port} is not an HTTP port (options.ports {:?})",
                    self.ports
                ),
            };
            cx.report(EventKind::MediationRefused, e.to_string());
            return Err(e);
        }
        let socket = cx.dial().await?;
        let peer_ip = socket
            .peer_addr()
            .map(|a| canonical_ip(a.ip()))
            .map_err(|e| DriverError::io("reading the peer address", e))?;
        let driver_tls = cx.encryption() == Encryption::Tls;
        let upstream = cx.finish_outbound(socket).await?;
        let peer = upstream.peer.clone();
        let (ours, theirs) = tokio::io::duplex(64 * 1024);
        let tls_mode = !driver_tls && self.tls_ports.contains(&port);
        let limits = self.limits;
        tokio::task::spawn_local(async move {
            let check = Check { cx, peer: peer_ip };
            let r = if tls_mode {
                mediate::tls(theirs, upstream.stream, limits, &check).await
            } else {
                mediate::http(theirs, upstream.stream, limits, &check).await
            };
            match r {
                Ok(()) | Err(MediateError::Io(_)) => {}
                Err(e) => check.refused(&format!("connection closed: {e}")),
            }
        });
        Ok(Connection::new(ours, peer))
    }
}

/// Checks names against the connection's target and the grant's policy.
struct Check {
    cx: ConnectContext,
    peer: IpAddr,
}

/// Splits `host[:port]` / `[v6][:port]` into host and optional port.
fn split_authority(a: &str) -> Result<(&str, Option<u16>), String> {
    let bad = || format!("{a:?} is not a host[:port]");
    if let Some(rest) = a.strip_prefix('[') {
        let (host, after) = rest.split_once(']').ok_or_else(bad)?;
        return match after {
            "" => Ok((host, None)),
            p => Ok((
                host,
                Some(
                    p.strip_prefix(':')
                        .and_then(|p| p.parse().ok())
                        .ok_or_else(bad)?,
                ),
            )),
        };
    }
    match a.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => Ok((h, Some(p.parse().map_err(|_| bad())?))),
        Some(_) => Err(bad()),
        None => Ok((a, None)),
    }
}

impl HostCheck for Check {
    fn check(&self, authority: &str) -> Result<(), String> {
        let (host, port) = split_authority(authority.trim())?;
        let target = self.cx.target();
        if let Some(p) = port
            && p != target.port
        {
            return Err(format!(
                "port {p} is not the connection's port {}",
                target.port
            ));
        }
        let named = HostSpec::parse(host).map_err(|e| format!("{host:?}: {e}"))?;
        let same = match (&named, &target.host) {
            (HostSpec::Name(a), HostSpec::Name(b)) => a == b,
            (HostSpec::Addr(a), HostSpec::Addr(b)) => canonical_ip(*a) == canonical_ip(*b),
            _ => false,
        };
        if !same {
            return Err(format!("the connection was granted for {}", target.host));
        }
        if let HostSpec::Name(n) = &named {
            let d = self.cx.policy().decide(
                &PolicyTarget::outbound(self.peer, target.port, Transport::Tcp).with_name(n),
            );
            if !d.allowed {
                return Err(format!("denied by rule {:?}", &*d.rule));
            }
        }
        Ok(())
    }

    fn refused(&self, what: &str) {
        self.cx
            .report(EventKind::MediationRefused, format!("http: {what}"));
    }

    fn allowed(&self, what: &str) {
        self.cx.report(EventKind::Other, format!("http: {what}"));
    }
}

capnet_driver_api::export_driver!(HttpDriver);

#[cfg(test)]
mod tests {
    use super::split_authority;

    /// Authorities split into host and port; junk is refused.
    #[test]
    fn authorities() {
        assert_eq!(split_authority("a.test"), Ok(("a.test", None)));
        assert_eq!(split_authority("a.test:8080"), Ok(("a.test", Some(8080))));
        assert_eq!(split_authority("[::1]:80"), Ok(("::1", Some(80))));
        assert_eq!(split_authority("[::1]"), Ok(("::1", None)));
        assert!(split_authority("a.test:x").is_err());
        assert!(split_authority("::1").is_err());
        assert!(split_authority("[::1]x").is_err());
    }
}
