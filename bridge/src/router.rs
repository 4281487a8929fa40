//! The grants the bridge holds, and how a target is mapped onto them.
//!
//! For each connection the bridge ranks its grants by how specifically they match the
//! target: a `TcpPort` (or `UdpPort`) grant whose host and port equal the target's, then an
//! `IpRemoteHost` grant for the same host, then any `IpNetwork`. It tries them in that
//! order (ties in configuration order) and moves on to the next only when a grant says no
//! (policy, not found, limit, unsupported): once a connection attempt reached the network,
//! its failure is the answer. A name is passed to `getRemoteHostByName`, an address to
//! `getRemoteHost`, so name resolution happens in the driver under its policy.

use std::rc::Rc;
use std::time::Duration;

use capnet_schemas::ip_capnp::{ip_network, ip_remote_host, tcp_port, udp_port};
use capnet_schemas::util_capnp::byte_stream;

use crate::refusal::Refusal;
use crate::target::{GrantKind, Host, Target};

/// How long the bridge waits for `TcpPort.connect` (drivers give up on their own after
/// about 10 s; this bounds a supervisor or driver that does not answer at all).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// A live capability of one of the kinds the bridge uses.
#[derive(Clone)]
pub enum Cap {
    /// `IpNetwork`.
    Network(ip_network::Client),
    /// `IpRemoteHost`.
    RemoteHost(ip_remote_host::Client),
    /// `TcpPort`.
    TcpPort(tcp_port::Client),
    /// `UdpPort`.
    UdpPort(udp_port::Client),
}

impl Cap {
    /// Casts an untyped capability to the interface `kind` names.
    pub fn cast(kind: &GrantKind, c: &capnp::capability::Client) -> Self {
        let hook = || c.hook.add_ref();
        match kind {
            GrantKind::Network => Cap::Network(capnp::capability::FromClientHook::new(hook())),
            GrantKind::RemoteHost(_) => {
                Cap::RemoteHost(capnp::capability::FromClientHook::new(hook()))
            }
            GrantKind::TcpPort(_) => Cap::TcpPort(capnp::capability::FromClientHook::new(hook())),
            GrantKind::UdpPort(_) => Cap::UdpPort(capnp::capability::FromClientHook::new(hook())),
        }
    }

    /// The untyped capability.
    pub fn untyped(&self) -> capnp::capability::Client {
        match self {
            Cap::Network(c) => c.client.clone(),
            Cap::RemoteHost(c) => c.client.clone(),
            Cap::TcpPort(c) => c.client.clone(),
            Cap::UdpPort(c) => c.client.clone(),
        }
    }
}

/// One usable grant.
#[derive(Clone)]
pub struct Grant {
    /// What it reaches.
    pub kind: GrantKind,
    /// The capability.
    pub cap: Cap,
    /// How the grant is named in logs (the supervisor's grant id when known).
    pub name: String,
    /// Held by the first connection attempt through this grant; see [`Grant::first_use`].
    first: Rc<tokio::sync::Mutex<bool>>,
}

impl Grant {
    /// A grant of `kind` served by `cap`, named `name` in logs.
    pub fn new(kind: GrantKind, cap: Cap, name: String) -> Self {
        Self {
            kind,
            cap,
            name,
            first: Rc::new(tokio::sync::Mutex::new(false)),
        }
    }

    /// Until one connection attempt through this grant has finished, further attempts wait
    /// for it. The supervisor opens a grant's driver session lazily on first use, and
    /// concurrent first uses race there (each opens a session, and the ones replaced
    /// revoke what was derived from them), so a burst of first connections is let through
    /// one at a time until the session exists.
    async fn first_use(&self) -> Option<tokio::sync::MutexGuard<'_, bool>> {
        let guard = self.first.lock().await;
        if *guard { None } else { Some(guard) }
    }
}

fn remote_host(net: &ip_network::Client, host: &Host) -> ip_remote_host::Client {
    match host {
        Host::Ip(ip) => {
            let mut req = net.get_remote_host_request();
            capnet_schemas::ip::write(req.get().init_address(), *ip);
            req.send().pipeline.get_host()
        }
        Host::Name(n) => {
            let mut req = net.get_remote_host_by_name_request();
            req.get().set_address(n);
            req.send().pipeline.get_host()
        }
    }
}

/// Maps targets onto grants.
#[derive(Clone, Default)]
pub struct Router {
    grants: Vec<Grant>,
}

impl Router {
    /// A router over `grants` (their order breaks ties).
    pub fn new(grants: Vec<Grant>) -> Self {
        Self { grants }
    }

    /// The grants, in configuration order.
    pub fn grants(&self) -> &[Grant] {
        &self.grants
    }

    fn ranked(&self, score: impl Fn(&GrantKind) -> Option<u8>) -> Vec<&Grant> {
        let mut v: Vec<(u8, &Grant)> = self
            .grants
            .iter()
            .filter_map(|g| score(&g.kind).map(|s| (s, g)))
            .collect();
        // Stable: equal scores keep configuration order.
        v.sort_by_key(|(s, _)| std::cmp::Reverse(*s));
        v.into_iter().map(|(_, g)| g).collect()
    }

    /// The `TcpPort` a grant offers for `t` (pipelined: no round trip yet).
    fn tcp_port(grant: &Grant, t: &Target) -> Option<tcp_port::Client> {
        let host = match &grant.cap {
            Cap::TcpPort(p) => return Some(p.clone()),
            Cap::Network(net) => remote_host(net, &t.host),
            Cap::RemoteHost(h) => h.clone(),
            Cap::UdpPort(_) => return None,
        };
        let mut req = host.get_tcp_port_request();
        req.get().set_port_num(t.port);
        Some(req.send().pipeline.get_port())
    }

    /// Opens a TCP connection to `t` through the most specific grant that accepts it.
    /// `downstream` receives what the remote end sends; the result is where to write.
    pub async fn connect(
        &self,
        t: &Target,
        downstream: &byte_stream::Client,
    ) -> Result<(byte_stream::Client, String), Refusal> {
        let candidates = self.ranked(|k| k.tcp_score(t));
        let mut first: Option<Refusal> = None;
        for grant in candidates {
            let Some(port) = Self::tcp_port(grant, t) else {
                continue;
            };
            let mut gate = grant.first_use().await;
            let mut req = port.connect_request();
            req.get().set_downstream(downstream.clone());
            let attempt = async {
                let resp = req.send().promise.await?;
                resp.get()?.get_upstream()
            };
            let outcome = tokio::time::timeout(CONNECT_TIMEOUT, attempt).await;
            if let Some(done) = gate.as_mut() {
                **done = true;
            }
            drop(gate);
            let refusal = match outcome {
                Ok(Ok(upstream)) => return Ok((upstream, grant.name.clone())),
                Ok(Err(e)) => Refusal::from_capnp(&e),
                Err(_) => Refusal::TimedOut(format!(
                    "connecting to {t} through {} took more than {}s",
                    grant.name,
                    CONNECT_TIMEOUT.as_secs()
                )),
            };
            tracing::debug!(target: "capnet_bridge", grant = %grant.name, %t, %refusal, "grant did not connect");
            let next = refusal.try_next_grant();
            first.get_or_insert(refusal);
            if !next {
                break;
            }
        }
        Err(first.unwrap_or_else(|| Refusal::no_tcp_grant(t)))
    }

    /// The `UdpPort`s that may carry datagrams to `t`, most specific first.
    pub fn udp_ports(&self, t: &Target) -> Vec<(udp_port::Client, String)> {
        self.ranked(|k| k.udp_score(t))
            .into_iter()
            .filter_map(|g| {
                let host = match &g.cap {
                    Cap::UdpPort(p) => return Some((p.clone(), g.name.clone())),
                    Cap::Network(net) => remote_host(net, &t.host),
                    Cap::RemoteHost(h) => h.clone(),
                    Cap::TcpPort(_) => return None,
                };
                let mut req = host.get_udp_port_request();
                req.get().set_port_num(t.port);
                Some((req.send().pipeline.get_port(), g.name.clone()))
            })
            .collect()
    }

    /// Whether any grant could carry UDP (decides whether UDP ASSOCIATE is offered).
    pub fn carries_udp(&self) -> bool {
        self.grants.iter().any(|g| g.kind.carries_udp())
    }
}
