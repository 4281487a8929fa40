//! What a driver gets with each request: the grant it acts for, the target, and helpers
//! that do the security-relevant parts (resolve once, vet every address, connect only to a
//! vetted one, report each decision).

use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::time::Duration;

use capnet_schemas::descriptor::Encryption;
use tokio::net::{TcpListener, TcpStream};

use crate::driver::{Connection, DriverError, Listener};
use crate::events::{Event, EventKind};
use crate::grant::GrantState;
use crate::host::DriverHost;
use crate::policy::{Direction, RuleSource, Transport};
use crate::resolve::{VetError, Vetted, resolve_vetted};

/// How long an outbound TCP connect may take before it fails.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

pub use crate::policy::HostSpec;

/// Where a grain wants to connect.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// The host.
    pub host: HostSpec,
    /// The port.
    pub port: u16,
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.host {
            HostSpec::Addr(IpAddr::V6(a)) => write!(f, "[{a}]:{}", self.port),
            host => write!(f, "{host}:{}", self.port),
        }
    }
}

/// An outbound connection request, passed to [`Driver::connect`](crate::Driver::connect).
pub struct ConnectContext {
    pub(crate) grant: Rc<GrantState>,
    pub(crate) target: Target,
}

impl ConnectContext {
    /// The grant this connection is made under.
    pub fn grant_id(&self) -> &str {
        &self.grant.id
    }

    /// The grain that asked.
    pub fn grain_id(&self) -> &str {
        &self.grant.grain
    }

    /// Where the grain wants to go.
    pub fn target(&self) -> &Target {
        &self.target
    }

    /// Whether the grant asks for TLS on every connection.
    pub fn encryption(&self) -> Encryption {
        self.grant.encryption
    }

    /// The driver's host services.
    pub fn host(&self) -> &DriverHost {
        &self.grant.host
    }

    /// Whether the grant has been revoked since (a protocol driver checks this before
    /// acting on what the grain said, such as relaying a message).
    pub fn is_revoked(&self) -> bool {
        self.grant.is_revoked()
    }

    /// The grant's egress policy (driver and grant rules over the defaults), for protocol
    /// drivers that check names the grain gives inside the protocol (an HTTP Host header,
    /// a TLS SNI) against the same rules.
    pub fn policy(&self) -> &crate::policy::Policy {
        &self.grant.policy
    }

    /// The grant's limits, for protocol drivers that enforce their own on top.
    pub fn limits(&self) -> crate::Limits {
        self.grant.limiter.limits()
    }

    /// Reports an audit event about this connection.
    pub fn report(&self, kind: EventKind, detail: impl Into<String>) {
        self.grant
            .host
            .report(Event::new(&self.grant.id, kind, self.target.to_string()).detail(detail));
    }

    /// Resolves the target once, vets every address against the grant's policy, and
    /// connects to the first vetted address that answers (never to an address that was not
    /// vetted, and without a second lookup). Each decision is reported. A name whose
    /// addresses are all refused fails as [`DriverError::NotFound`].
    pub async fn dial(&self) -> Result<TcpStream, DriverError> {
        self.dial_port(self.target.port).await
    }

    /// Like [`dial`](Self::dial) but to another port of the same host (protocol drivers
    /// that map a port, for example).
    pub async fn dial_port(&self, port: u16) -> Result<TcpStream, DriverError> {
        self.dial_host(&self.target.host, port).await
    }

    /// Like [`dial`](Self::dial) but to another host, for protocol drivers that connect
    /// somewhere other than where the grain pointed (an SMTP driver's configured relay,
    /// for example). The grant's policy still vets every address, so an administrator
    /// allows a relay on a private address with a rule, like any other destination.
    pub async fn dial_host(&self, host: &HostSpec, port: u16) -> Result<TcpStream, DriverError> {
        let g = &self.grant;
        let hs = &g.host;
        let vetted = vet_target(g, host, port, Transport::Tcp).await?;
        let mut last = None;
        for a in vetted.allowed() {
            let dest = a.socket_addr();
            let rule = &a.decision().rule;
            match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(dest)).await {
                Ok(Ok(stream)) => {
                    let _ = stream.set_nodelay(true);
                    let source = match a.decision().source {
                        RuleSource::Default => "default",
                        RuleSource::Driver => "driver rule",
                        RuleSource::Grant => "grant rule",
                    };
                    hs.report(
                        Event::new(&g.id, EventKind::ConnectAllowed, dest.to_string())
                            .rule(rule.to_string())
                            .detail(match host {
                                HostSpec::Name(n) => format!("name {n}; {source}"),
                                HostSpec::Addr(_) => source.to_string(),
                            }),
                    );
                    return Ok(stream);
                }
                Ok(Err(e)) => last = Some(DriverError::io(format!("connecting to {dest}"), e)),
                Err(_) => {
                    last = Some(DriverError::io(
                        format!("connecting to {dest}"),
                        std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            format!("no answer within {}s", CONNECT_TIMEOUT.as_secs()),
                        ),
                    ))
                }
            }
        }
        Err(last.unwrap_or_else(|| DriverError::NotFound(host.to_string())))
    }

    /// Turns a dialled socket into the grain's connection, wrapping it in verified TLS when
    /// the grant asks for `encryption = tls` (the server name is the target's host).
    pub async fn finish_outbound(&self, stream: TcpStream) -> Result<Connection, DriverError> {
        let peer = stream
            .peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|_| self.target.to_string());
        match self.grant.encryption {
            Encryption::None => Ok(Connection::new(stream, peer)),
            Encryption::Tls => {
                let config = self.grant.host.tls_config()?;
                let server_name = self.target.host.to_string();
                let tls = crate::tls::connect(config, &server_name, stream)
                    .await
                    .map_err(|e| DriverError::io(format!("TLS handshake with {server_name}"), e))?;
                Ok(Connection::new(tls, format!("{peer} (tls)")))
            }
        }
    }
}

/// Resolves `host` once for the grant and vets every address for `transport`, reporting
/// each refused address (`ConnectRefused` for TCP, `DatagramRefused` for UDP) and
/// counting it as a refusal. Names need the DNS privilege (or a static host entry).
pub(crate) async fn vet_target(
    g: &GrantState,
    host: &HostSpec,
    port: u16,
    transport: Transport,
) -> Result<Vetted, DriverError> {
    let hs = &g.host;
    let refused_kind = match transport {
        Transport::Tcp => EventKind::ConnectRefused,
        Transport::Udp => EventKind::DatagramRefused,
    };
    if let HostSpec::Name(n) = host
        && !hs.privileges().dns
        && !hs.has_static_host(n.as_str())
    {
        return Err(DriverError::Refused {
            what: format!("resolving {n}"),
            rule: "the driver was not approved for DNS".into(),
        });
    }
    let vetted = resolve_vetted(
        &g.policy,
        hs.resolver(),
        host,
        port,
        Direction::Outbound,
        transport,
    )
    .await;
    let refused = match &vetted {
        Ok(v) => v.refused(),
        Err(e) => e.refused(),
    };
    for r in refused {
        g.refusals.set(g.refusals.get() + 1);
        hs.report(
            Event::new(
                &g.id,
                refused_kind,
                SocketAddr::new(r.addr, port).to_string(),
            )
            .rule(r.decision.rule.to_string())
            .detail(format!("{host} resolved to a refused address")),
        );
    }
    match vetted {
        Ok(v) => Ok(v),
        Err(VetError::Denied {
            host,
            port,
            decision,
        }) => {
            g.refusals.set(g.refusals.get() + 1);
            hs.report(
                Event::new(
                    &g.id,
                    refused_kind,
                    format!(
                        "{}",
                        Target {
                            host: host.clone(),
                            port
                        }
                    ),
                )
                .rule(decision.rule.to_string()),
            );
            let verb = match transport {
                Transport::Tcp => "connect to",
                Transport::Udp => "send a datagram to",
            };
            Err(DriverError::Refused {
                what: format!("{verb} {}", Target { host, port }),
                rule: decision.rule.to_string(),
            })
        }
        Err(VetError::NotFound { name, .. }) => Err(DriverError::NotFound(name.to_string())),
        Err(e) => Err(DriverError::Other(format!("resolving {host}: {e}"))),
    }
}

/// A listen request, passed to [`Driver::listen`](crate::Driver::listen).
pub struct ListenContext {
    pub(crate) grant: Rc<GrantState>,
    pub(crate) port: u16,
}

impl ListenContext {
    /// The grant this listener belongs to.
    pub fn grant_id(&self) -> &str {
        &self.grant.id
    }

    /// The grain the listener is for.
    pub fn grain_id(&self) -> &str {
        &self.grant.grain
    }

    /// Whether the grant has been revoked since.
    pub fn is_revoked(&self) -> bool {
        self.grant.is_revoked()
    }

    /// Reports an audit event about this listener (destination: the peer or the port).
    pub fn report(
        &self,
        kind: EventKind,
        destination: impl Into<String>,
        detail: impl Into<String>,
    ) {
        self.grant
            .host
            .report(Event::new(&self.grant.id, kind, destination).detail(detail));
    }

    /// The port to listen on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The driver's host services.
    pub fn host(&self) -> &DriverHost {
        &self.grant.host
    }

    /// Binds the port on every configured listen address.
    pub async fn bind_tcp(&self) -> Result<TcpListeners, DriverError> {
        let mut listeners = Vec::new();
        for addr in self.grant.host.listen_addresses() {
            let sa = SocketAddr::new(*addr, self.port);
            let l = TcpListener::bind(sa)
                .await
                .map_err(|e| DriverError::io(format!("listening on {sa}"), e))?;
            listeners.push(l);
        }
        if listeners.is_empty() {
            return Err(DriverError::Other(
                "the driver has no listen addresses configured".into(),
            ));
        }
        Ok(TcpListeners { listeners })
    }
}

/// Plain TCP listeners on one port of several addresses.
pub struct TcpListeners {
    listeners: Vec<TcpListener>,
}

impl Listener for TcpListeners {
    fn accept(&mut self) -> futures::future::LocalBoxFuture<'_, std::io::Result<Connection>> {
        Box::pin(async move {
            let futs = self.listeners.iter().map(|l| Box::pin(l.accept()));
            let (res, _, _) = futures::future::select_all(futs).await;
            let (stream, peer) = res?;
            let _ = stream.set_nodelay(true);
            Ok(Connection::new(stream, peer.to_string()))
        })
    }

    fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listeners
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect()
    }
}
