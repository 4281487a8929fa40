//! Outbound UDP: `UdpPort.send` and the NAT-like mappings behind it.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::rc::{Rc, Weak};
use std::time::{Duration, Instant};

use capnet_schemas::ip_capnp::udp_port;
use capnp::Error;
use tokio::net::UdpSocket;
use tokio::task::AbortHandle;

use super::{
    Datagram, MAX_DELIVERIES_IN_FLIGHT, MAX_MAPPINGS_PER_GRANT, MAX_PEERS_PER_MAPPING, RECV_BUFFER,
    RefusalAudit, UdpBindContext, VET_CACHE, admit_from_network, check_limits, deliver, identity,
};
use crate::context::{Target, vet_target};
use crate::driver::DriverError;
use crate::events::{Event, EventKind};
use crate::grant::GrantState;
use crate::host::DriverHost;
use crate::policy::{Direction, Transport};
use crate::resolve::Vetted;

/// The grant's outbound mappings, keyed by (return port identity, IPv6).
#[derive(Default)]
pub(crate) struct Mappings {
    map: RefCell<HashMap<(usize, bool), Rc<Mapping>>>,
}

impl Mappings {
    pub(crate) fn close_all(&self, why: &str) {
        let all: Vec<_> = self.map.borrow_mut().drain().map(|(_, m)| m).collect();
        for m in all {
            m.close(why);
        }
    }

    fn remove(&self, key: (usize, bool)) {
        let removed = self.map.borrow_mut().remove(&key);
        drop(removed);
    }
}

/// One NAT-like mapping: a local socket for one (grant, return port, family).
pub(crate) struct Mapping {
    key: (usize, bool),
    socket: Rc<UdpSocket>,
    local: SocketAddr,
    return_port: udp_port::Client,
    peers: RefCell<VecDeque<SocketAddr>>,
    peer_ports: RefCell<HashMap<SocketAddr, udp_port::Client>>,
    grant: Weak<GrantState>,
    host: DriverHost,
    grant_id: String,
    last_active: Cell<Instant>,
    started: Instant,
    bytes_in: Cell<u64>,
    bytes_out: Cell<u64>,
    in_flight: Rc<Cell<usize>>,
    refusals: RefusalAudit,
    task: RefCell<Option<AbortHandle>>,
    closed: RefCell<Option<String>>,
}

impl Mapping {
    fn close(&self, why: &str) {
        if self.closed.borrow().is_some() {
            return;
        }
        *self.closed.borrow_mut() = Some(why.to_string());
        if let Some(t) = self.task.borrow_mut().take() {
            t.abort();
        }
        self.peer_ports.borrow_mut().clear();
    }

    fn is_closed(&self) -> bool {
        self.closed.borrow().is_some()
    }

    fn remember_peer(&self, peer: SocketAddr) -> bool {
        let mut peers = self.peers.borrow_mut();
        if peers.contains(&peer) {
            return false;
        }
        if peers.len() >= MAX_PEERS_PER_MAPPING
            && let Some(old) = peers.pop_front()
        {
            self.peer_ports.borrow_mut().remove(&old);
        }
        peers.push_back(peer);
        true
    }

    /// Sends one datagram that was already checked against the policy and the limits.
    async fn send_to(&self, payload: &[u8], peer: SocketAddr) -> Result<(), Error> {
        if let Some(why) = &*self.closed.borrow() {
            return Err(Error::failed(format!(
                "failed: the UDP mapping was closed ({why})"
            )));
        }
        let n = self
            .socket
            .send_to(payload, peer)
            .await
            .map_err(|e| Error::from(DriverError::io(format!("sending to {peer}"), e)))?;
        self.last_active.set(Instant::now());
        self.bytes_out.set(self.bytes_out.get() + n as u64);
        if let Some(g) = self.grant.upgrade() {
            g.bytes_out.set(g.bytes_out.get() + n as u64);
        }
        Ok(())
    }

    /// The port that answers `peer` from this mapping (one per peer, reused).
    fn peer_port(self: &Rc<Self>, peer: SocketAddr) -> udp_port::Client {
        if let Some(p) = self.peer_ports.borrow().get(&peer) {
            return p.clone();
        }
        let p: udp_port::Client = capnp_rpc::new_client(MappingPeerPort {
            mapping: Rc::downgrade(self),
            peer,
        });
        self.peer_ports.borrow_mut().insert(peer, p.clone());
        p
    }

    fn start(self: &Rc<Self>, idle: Duration) {
        let weak = Rc::downgrade(self);
        let socket = self.socket.clone();
        let task = tokio::task::spawn_local(async move {
            let mut buf = vec![0u8; RECV_BUFFER];
            loop {
                let deadline = match weak.upgrade() {
                    Some(m) => m.last_active.get() + idle,
                    None => return,
                };
                let received = tokio::select! {
                    r = socket.recv_from(&mut buf) => r,
                    () = tokio::time::sleep_until(deadline.into()) => {
                        let Some(m) = weak.upgrade() else { return };
                        if m.last_active.get() + idle <= Instant::now() {
                            m.expire(&format!("idle for {}s", idle.as_secs()));
                            return;
                        }
                        continue;
                    }
                };
                let Some(m) = weak.upgrade() else { return };
                match received {
                    Ok((n, peer)) => m.on_datagram(&buf[..n], peer).await,
                    Err(e) => {
                        // ICMP errors (port unreachable) surface here on Linux; they do not
                        // end the mapping.
                        tracing::debug!(grant = %m.grant_id, error = %e, "udp receive error");
                    }
                }
            }
        });
        *self.task.borrow_mut() = Some(task.abort_handle());
    }

    fn expire(&self, why: &str) {
        self.close(why);
        if let Some(g) = self.grant.upgrade() {
            g.udp_mappings.remove(self.key);
        }
    }

    async fn on_datagram(self: &Rc<Self>, payload: &[u8], peer: SocketAddr) {
        let peer = SocketAddr::new(crate::policy::canonical_ip(peer.ip()), peer.port());
        let Some(g) = self.grant.upgrade() else {
            return;
        };
        if !self.peers.borrow().contains(&peer) {
            g.refusals.set(g.refusals.get() + 1);
            self.refusals.report(
                &self.host,
                Event::new(&self.grant_id, EventKind::DatagramRefused, peer.to_string()).detail(
                    format!(
                        "reply to local port {} from a peer it never sent to: dropped",
                        self.local.port()
                    ),
                ),
            );
            return;
        }
        if !admit_from_network(
            &g,
            &self.refusals,
            peer,
            self.local.port(),
            payload,
            "reply",
        )
        .await
        {
            return;
        }
        self.last_active.set(Instant::now());
        self.bytes_in
            .set(self.bytes_in.get() + payload.len() as u64);
        let weak = Rc::downgrade(self);
        let delivered = deliver(
            &self.return_port,
            self.peer_port(peer),
            payload,
            &self.in_flight,
            move |e| {
                if e.kind == capnp::ErrorKind::Disconnected
                    && let Some(m) = weak.upgrade()
                {
                    m.expire(&format!("the grain's returnPort failed: {e}"));
                }
            },
        );
        if !delivered {
            self.refusals.report(
                &self.host,
                Event::new(&self.grant_id, EventKind::LimitHit, peer.to_string()).detail(format!(
                    "reply dropped: {MAX_DELIVERIES_IN_FLIGHT} deliveries to the grain in flight"
                )),
            );
        }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        self.close("released");
        let mut ev = Event::new(
            &self.grant_id,
            EventKind::ConnectionClosed,
            format!("udp {}", self.local),
        );
        ev.bytes_in = self.bytes_in.get();
        ev.bytes_out = self.bytes_out.get();
        ev.duration_ms = self.started.elapsed().as_millis() as u64;
        ev.detail = format!(
            "udp mapping closed: {}",
            self.closed.borrow().as_deref().unwrap_or("released")
        );
        self.host.report(ev);
        let hs = &self.host.state;
        hs.open_connections
            .set(hs.open_connections.get().saturating_sub(1));
    }
}

/// The grant's mapping for `return_port` and family, opened if needed.
async fn mapping_for(
    g: &Rc<GrantState>,
    return_port: Option<udp_port::Client>,
    ipv6: bool,
) -> Result<Rc<Mapping>, Error> {
    let (ptr, return_port) = identity(return_port).await?;
    let key = (ptr, ipv6);
    if let Some(m) = g.udp_mappings.map.borrow().get(&key)
        && !m.is_closed()
    {
        return Ok(m.clone());
    }
    if g.udp_mappings.map.borrow().len() >= MAX_MAPPINGS_PER_GRANT {
        let msg = format!(
            "too many UDP mappings: a grant may hold {MAX_MAPPINGS_PER_GRANT} return ports at once"
        );
        g.host
            .report(Event::new(&g.id, EventKind::LimitHit, "udp").detail(msg.clone()));
        return Err(DriverError::Limit(msg).into());
    }
    let socket = g
        .driver
        .bind_udp(UdpBindContext {
            grant: g.clone(),
            ipv6,
        })
        .await?;
    g.check_live()?;
    // Another send with the same port may have won the race while we were binding.
    if let Some(m) = g.udp_mappings.map.borrow().get(&key)
        && !m.is_closed()
    {
        return Ok(m.clone());
    }
    let local = socket
        .local_addr()
        .map_err(|e| Error::from(DriverError::io("reading a UDP socket's address", e)))?;
    let hs = &g.host.state;
    hs.open_connections.set(hs.open_connections.get() + 1);
    let m = Rc::new(Mapping {
        key,
        socket: Rc::new(socket),
        local,
        return_port,
        peers: RefCell::new(VecDeque::new()),
        peer_ports: RefCell::new(HashMap::new()),
        grant: Rc::downgrade(g),
        host: g.host.clone(),
        grant_id: g.id.clone(),
        last_active: Cell::new(Instant::now()),
        started: Instant::now(),
        bytes_in: Cell::new(0),
        bytes_out: Cell::new(0),
        in_flight: Rc::new(Cell::new(0)),
        refusals: RefusalAudit::default(),
        task: RefCell::new(None),
        closed: RefCell::new(None),
    });
    m.start(g.host.udp_idle());
    g.udp_mappings.map.borrow_mut().insert(key, m.clone());
    Ok(m)
}

/// `UdpPort` under one grant: one host and port.
pub(crate) struct UdpPortImpl {
    pub(crate) grant: Rc<GrantState>,
    pub(crate) target: Target,
    pub(crate) vetted: RefCell<Option<(Instant, Vetted)>>,
}

impl UdpPortImpl {
    async fn destination(&self) -> Result<SocketAddr, Error> {
        if let Some((at, v)) = &*self.vetted.borrow()
            && at.elapsed() < VET_CACHE
            && let Some(a) = v.allowed().first()
        {
            return Ok(a.socket_addr());
        }
        let v = vet_target(
            &self.grant,
            &self.target.host,
            self.target.port,
            Transport::Udp,
        )
        .await?;
        let Some(first) = v.allowed().first() else {
            return Err(DriverError::NotFound(self.target.host.to_string()).into());
        };
        let dest = first.socket_addr();
        *self.vetted.borrow_mut() = Some((Instant::now(), v));
        Ok(dest)
    }
}

impl udp_port::Server for UdpPortImpl {
    async fn send(
        self: Rc<Self>,
        params: udp_port::SendParams,
        _: udp_port::SendResults,
    ) -> Result<(), Error> {
        let g = &self.grant;
        g.check_live()?;
        if !g.host.privileges().outbound_udp {
            return Err(DriverError::Refused {
                what: format!("send a datagram to {}", self.target),
                rule: "the driver was not approved for outbound UDP".into(),
            }
            .into());
        }
        let p = params.get()?;
        let payload = p.get_message()?;
        let return_port = if p.has_return_port() {
            Some(p.get_return_port()?)
        } else {
            None
        };
        check_limits(g, &self.target.to_string(), payload.len())?;
        let dest = self.destination().await?;
        let mapping = mapping_for(g, return_port, dest.is_ipv6()).await?;
        if let Err(e) = g.driver.inspect_datagram(&Datagram {
            grant_id: &g.id,
            direction: Direction::Outbound,
            peer: dest,
            local_port: mapping.local.port(),
            payload,
        }) {
            g.refusals.set(g.refusals.get() + 1);
            mapping.refusals.report(
                &g.host,
                Event::new(&g.id, EventKind::DatagramRefused, dest.to_string())
                    .detail(format!("refused by the driver: {e}")),
            );
            return Err(e.into());
        }
        if mapping.remember_peer(dest) {
            let rule = self
                .vetted
                .borrow()
                .as_ref()
                .and_then(|(_, v)| v.allowed().first().map(|a| a.decision().rule.to_string()))
                .unwrap_or_default();
            g.host.report(
                Event::new(&g.id, EventKind::ConnectAllowed, dest.to_string())
                    .rule(rule)
                    .detail(format!("udp from local port {}", mapping.local.port())),
            );
        }
        mapping.send_to(payload, dest).await
    }
}

/// The port that answers one peer of a mapping (given to the grain with each reply).
struct MappingPeerPort {
    mapping: Weak<Mapping>,
    peer: SocketAddr,
}

impl udp_port::Server for MappingPeerPort {
    async fn send(
        self: Rc<Self>,
        params: udp_port::SendParams,
        _: udp_port::SendResults,
    ) -> Result<(), Error> {
        let m = self.mapping.upgrade().ok_or_else(|| {
            Error::failed("failed: the UDP mapping of this peer has expired".into())
        })?;
        let g = m
            .grant
            .upgrade()
            .ok_or_else(|| Error::failed("revoked: the grant is gone".into()))?;
        g.check_live()?;
        let payload = params.get()?.get_message()?;
        check_limits(&g, &self.peer.to_string(), payload.len())?;
        m.send_to(payload, self.peer).await
    }
}
