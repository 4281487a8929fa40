//! UDP for every driver: `IpRemoteHost.getUdpPort` → `UdpPort.send` with NAT-like
//! mappings, and `IpInterface.listenUdp`.
//!
//! # Outbound: mappings
//!
//! `UdpPort.send(message, returnPort)` sends one datagram from a local socket that belongs
//! to the pair (grant, `returnPort`): the first send with a given `returnPort` opens a
//! *mapping* (a fresh socket on an ephemeral port, one per address family, opened through
//! [`Driver::bind_udp`](crate::Driver::bind_udp)); later sends with the same `returnPort`
//! reuse it, so the remote peer sees the same source port, as behind a NAT.
//!
//! `returnPort` is recognised by **capability identity**: the RPC system hands a callee the
//! same import for every copy of one capability the caller passes, so the key is the
//! pointer identity of the resolved client hook ([`capnp::capability::get_resolved_cap`],
//! bounded by [`RESOLVE_TIMEOUT`] so a never-resolving promise cannot stall the call). The
//! mapping holds that client, so the identity cannot be reused while the mapping lives.
//! A send without a `returnPort` uses one mapping per grant and family whose replies are
//! dropped.
//! The supervisor's membrane forwards every copy of one grain port as one proxy, so the
//! identity survives the extra hop.
//!
//! Replies are accepted **only from peers the mapping has sent to** (address and port);
//! anything else is dropped and audited as `DatagramRefused`. Each accepted reply is
//! delivered with `returnPort.send(reply, peerPort)`, where `peerPort` is a `UdpPort` that
//! answers that peer from the mapping's socket. A mapping expires after the driver's idle
//! time (`udp_idle_secs`, default 60 s) without a datagram in either direction; expiry,
//! revocation and a failed delivery close its socket at once.
//!
//! # Inbound: listeners
//!
//! `IpInterface.listenUdp(portNum, port)` binds the port on the driver's listen addresses
//! (through [`Driver::listen_udp`](crate::Driver::listen_udp)) and delivers each datagram
//! that the inbound policy admits with `port.send(datagram, peerPort)`; `peerPort` answers
//! that one peer from the listening socket. Answers to a peer that wrote first are not
//! vetted by the outbound policy (like a stateful firewall), only by the limits. Dropping
//! the returned `Handle` (or revoking the grant) closes the sockets at once.
//!
//! # Limits and audit
//!
//! Every datagram the grain sends is checked with
//! [`GrantLimiter::check_datagram`](crate::limits::GrantLimiter::check_datagram) (size
//! and rate) and refused with a `limit:` error; datagrams to the grain larger than the
//! grant's size limit are dropped. Deliveries in flight to the grain are capped per mapping
//! and listener; datagrams beyond that are dropped (UDP promises no delivery). Refusals are
//! audited, at most one event per second per mapping or listener with a count of the rest,
//! so a flood cannot flood the audit trail too.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::rc::{Rc, Weak};
use std::time::{Duration, Instant};

use capnet_schemas::ip_capnp::udp_port;
use capnet_schemas::util_capnp::handle;
use capnp::Error;
use tokio::net::UdpSocket;
use tokio::task::AbortHandle;

use crate::context::{ListenContext, Target, vet_target};
use crate::driver::DriverError;
use crate::events::{Event, EventKind};
use crate::grant::GrantState;
use crate::host::DriverHost;
use crate::limits::ListenerPermit;
use crate::policy::{Direction, Target as PolicyTarget, Transport};
use crate::resolve::Vetted;

/// How long a mapping lives without a datagram in either direction, unless the driver's
/// `udp_idle_secs` option says otherwise.
pub const DEFAULT_UDP_IDLE: Duration = Duration::from_secs(60);
/// How long `send` waits for a `returnPort` promise to resolve before failing.
pub const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);
/// Most mappings (distinct return ports and families) one grant may hold at once.
pub const MAX_MAPPINGS_PER_GRANT: usize = 256;
/// Most peers one mapping remembers as "sent to"; the oldest is forgotten first.
pub const MAX_PEERS_PER_MAPPING: usize = 64;
/// Most deliveries to the grain in flight per mapping or listener; more are dropped.
pub const MAX_DELIVERIES_IN_FLIGHT: usize = 64;
/// How long a vetted lookup of a `UdpPort`'s host is reused before resolving again.
const VET_CACHE: Duration = Duration::from_secs(30);
/// Receive buffer: the largest UDP payload.
const RECV_BUFFER: usize = 65536;
/// Most peer ports a listener keeps for reuse.
const MAX_LISTENER_PEERS: usize = 1024;

/// One datagram, as [`Driver::inspect_datagram`](crate::Driver::inspect_datagram) sees it.
#[derive(Debug)]
pub struct Datagram<'a> {
    /// The grant it travels under.
    pub grant_id: &'a str,
    /// Outbound (the grain sends) or inbound (to the grain).
    pub direction: Direction,
    /// The remote end.
    pub peer: SocketAddr,
    /// The local port (the mapping's or the listener's).
    pub local_port: u16,
    /// The payload.
    pub payload: &'a [u8],
}

/// A request to open the local socket of a new outbound mapping, passed to
/// [`Driver::bind_udp`](crate::Driver::bind_udp).
pub struct UdpBindContext {
    pub(crate) grant: Rc<GrantState>,
    pub(crate) ipv6: bool,
}

impl UdpBindContext {
    /// The grant the mapping belongs to.
    pub fn grant_id(&self) -> &str {
        &self.grant.id
    }

    /// Whether the mapping is for IPv6 peers (else IPv4).
    pub fn is_ipv6(&self) -> bool {
        self.ipv6
    }

    /// The driver's host services.
    pub fn host(&self) -> &DriverHost {
        &self.grant.host
    }

    /// Binds an ephemeral port on the unspecified address of the mapping's family.
    pub async fn bind_ephemeral(&self) -> Result<UdpSocket, DriverError> {
        let addr = if self.ipv6 {
            SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0)
        } else {
            SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0)
        };
        UdpSocket::bind(addr)
            .await
            .map_err(|e| DriverError::io(format!("binding a UDP socket on {addr}"), e))
    }
}

impl ListenContext {
    /// Binds the UDP port on every configured listen address.
    pub async fn bind_udp(&self) -> Result<Vec<UdpSocket>, DriverError> {
        let mut sockets = Vec::new();
        for addr in self.grant.host.listen_addresses() {
            let sa = SocketAddr::new(*addr, self.port);
            let s = UdpSocket::bind(sa)
                .await
                .map_err(|e| DriverError::io(format!("listening for UDP on {sa}"), e))?;
            sockets.push(s);
        }
        if sockets.is_empty() {
            return Err(DriverError::Other(
                "the driver has no listen addresses configured".into(),
            ));
        }
        Ok(sockets)
    }
}

/// Reports refusals of one mapping or listener: the first at once, then at most one event
/// per second carrying the number of refusals in between.
#[derive(Default)]
struct RefusalAudit {
    last: Cell<Option<Instant>>,
    suppressed: Cell<u64>,
}

impl RefusalAudit {
    fn report(&self, host: &DriverHost, event: Event) {
        let now = Instant::now();
        if let Some(last) = self.last.get()
            && now.duration_since(last) < Duration::from_secs(1)
        {
            self.suppressed.set(self.suppressed.get() + 1);
            return;
        }
        self.last.set(Some(now));
        let suppressed = self.suppressed.replace(0);
        let event = if suppressed > 0 {
            let detail = format!(
                "{}; {suppressed} similar refusals in the last second not reported one by one",
                event.detail
            );
            event.detail(detail)
        } else {
            event
        };
        host.report(event);
    }
}

/// The return port of datagrams sent without one: replies are dropped.
struct Discard;

impl udp_port::Server for Discard {
    async fn send(
        self: Rc<Self>,
        _: udp_port::SendParams,
        _: udp_port::SendResults,
    ) -> Result<(), Error> {
        Ok(())
    }
}

/// Resolves `port` to its final capability and returns its identity (see the module doc).
/// No port (a null capability) is identity 0, which no real capability has: such sends
/// share one mapping per grant and family whose replies are dropped.
async fn identity(port: Option<udp_port::Client>) -> Result<(usize, udp_port::Client), Error> {
    let Some(port) = port else {
        return Ok((0, capnp_rpc::new_client(Discard)));
    };
    let resolved = tokio::time::timeout(RESOLVE_TIMEOUT, async {
        capnp::capability::get_resolved_cap(port).await
    })
    .await
    .map_err(|_| {
        Error::failed(format!(
            "failed: the returnPort did not resolve within {}s",
            RESOLVE_TIMEOUT.as_secs()
        ))
    })?;
    Ok((resolved.client.hook.get_ptr(), resolved))
}

/// Sends `payload` to the grain's `port`, with `reply` as the port that answers the peer,
/// unless too many deliveries are in flight. Returns `false` if the datagram was dropped.
fn deliver(
    port: &udp_port::Client,
    reply: udp_port::Client,
    payload: &[u8],
    in_flight: &Rc<Cell<usize>>,
    on_failure: impl FnOnce(Error) + 'static,
) -> bool {
    if in_flight.get() >= MAX_DELIVERIES_IN_FLIGHT {
        return false;
    }
    let mut req = port.send_request();
    req.get().set_message(payload);
    req.get().set_return_port(reply);
    in_flight.set(in_flight.get() + 1);
    let in_flight = in_flight.clone();
    tokio::task::spawn_local(async move {
        let r = req.send().promise.await;
        in_flight.set(in_flight.get().saturating_sub(1));
        if let Err(e) = r {
            on_failure(e);
        }
    });
    true
}

// ---------------------------------------------------------------------------------------
// Outbound
// ---------------------------------------------------------------------------------------

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
        let max = g.limiter.limits().udp_max_packet_size;
        if max > 0 && payload.len() > max as usize {
            self.refusals.report(
                &self.host,
                Event::new(&self.grant_id, EventKind::LimitHit, peer.to_string()).detail(format!(
                    "reply of {} bytes dropped: the grant allows at most {max} bytes",
                    payload.len()
                )),
            );
            return;
        }
        if let Err(e) = g.driver.inspect_datagram(&Datagram {
            grant_id: &self.grant_id,
            direction: Direction::Inbound,
            peer,
            local_port: self.local.port(),
            payload,
        }) {
            g.refusals.set(g.refusals.get() + 1);
            self.refusals.report(
                &self.host,
                Event::new(&self.grant_id, EventKind::DatagramRefused, peer.to_string())
                    .detail(format!("reply refused by the driver: {e}")),
            );
            return;
        }
        let throttle = g.limiter.inbound_bytes();
        if throttle.per_second() > 0 {
            throttle.acquire(payload.len()).await;
        }
        self.last_active.set(Instant::now());
        let n = payload.len() as u64;
        self.bytes_in.set(self.bytes_in.get() + n);
        g.bytes_in.set(g.bytes_in.get() + n);
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

/// Checks an outgoing datagram against the grant's size and rate limits, auditing a hit.
fn check_limits(g: &GrantState, dest: &str, size: usize) -> Result<(), Error> {
    if let Err(e) = g.limiter.check_datagram(size) {
        g.host
            .report(Event::new(&g.id, EventKind::LimitHit, dest).detail(e.to_string()));
        return Err(DriverError::Limit(e.to_string()).into());
    }
    Ok(())
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

// ---------------------------------------------------------------------------------------
// Inbound
// ---------------------------------------------------------------------------------------

/// A `listenUdp` listener: its sockets, receive tasks and peer ports.
pub(crate) struct UdpListener {
    grant: Weak<GrantState>,
    host: DriverHost,
    grant_id: String,
    port_num: u16,
    addrs: Vec<SocketAddr>,
    grain_port: RefCell<Option<udp_port::Client>>,
    peer_ports: RefCell<HashMap<SocketAddr, udp_port::Client>>,
    tasks: RefCell<Vec<AbortHandle>>,
    stopped: Cell<bool>,
    permit: RefCell<Option<ListenerPermit>>,
    in_flight: Rc<Cell<usize>>,
    refusals: RefusalAudit,
}

impl UdpListener {
    pub(crate) fn start(
        g: &Rc<GrantState>,
        port_num: u16,
        sockets: Vec<UdpSocket>,
        grain_port: udp_port::Client,
        permit: ListenerPermit,
    ) -> Rc<Self> {
        let addrs: Vec<SocketAddr> = sockets.iter().filter_map(|s| s.local_addr().ok()).collect();
        g.open_listeners.set(g.open_listeners.get() + 1);
        let hs = &g.host.state;
        hs.open_listeners.set(hs.open_listeners.get() + 1);
        let l = Rc::new(Self {
            grant: Rc::downgrade(g),
            host: g.host.clone(),
            grant_id: g.id.clone(),
            port_num,
            addrs,
            grain_port: RefCell::new(Some(grain_port)),
            peer_ports: RefCell::new(HashMap::new()),
            tasks: RefCell::new(Vec::new()),
            stopped: Cell::new(false),
            permit: RefCell::new(Some(permit)),
            in_flight: Rc::new(Cell::new(0)),
            refusals: RefusalAudit::default(),
        });
        for socket in sockets {
            let socket = Rc::new(socket);
            let weak = Rc::downgrade(&l);
            let s = socket.clone();
            let task = tokio::task::spawn_local(async move {
                let mut buf = vec![0u8; RECV_BUFFER];
                loop {
                    let r = s.recv_from(&mut buf).await;
                    let Some(l) = weak.upgrade() else { return };
                    match r {
                        Ok((n, peer)) => l.on_datagram(&s, &buf[..n], peer).await,
                        Err(e) => {
                            tracing::debug!(grant = %l.grant_id, error = %e, "udp receive error")
                        }
                    }
                }
            });
            l.tasks.borrow_mut().push(task.abort_handle());
        }
        g.register_udp_listener(&l);
        g.host.report(
            Event::new(&g.id, EventKind::ListenStarted, l.describe())
                .detail(format!("listening for UDP on port {port_num}")),
        );
        l
    }

    fn describe(&self) -> String {
        if self.addrs.is_empty() {
            format!("udp port {}", self.port_num)
        } else {
            let list: Vec<String> = self.addrs.iter().map(|a| a.to_string()).collect();
            format!("udp {}", list.join(","))
        }
    }

    async fn on_datagram(
        self: &Rc<Self>,
        socket: &Rc<UdpSocket>,
        payload: &[u8],
        peer: SocketAddr,
    ) {
        let peer = SocketAddr::new(crate::policy::canonical_ip(peer.ip()), peer.port());
        let Some(g) = self.grant.upgrade() else {
            return;
        };
        if self.stopped.get() || g.is_revoked() {
            return;
        }
        let decision = g.policy.decide(&PolicyTarget::inbound(
            peer.ip(),
            self.port_num,
            Transport::Udp,
        ));
        if !decision.allowed {
            g.refusals.set(g.refusals.get() + 1);
            self.refusals.report(
                &self.host,
                Event::new(&self.grant_id, EventKind::DatagramRefused, peer.to_string())
                    .rule(decision.rule.to_string())
                    .detail(format!("datagram to udp port {} dropped", self.port_num)),
            );
            return;
        }
        let max = g.limiter.limits().udp_max_packet_size;
        if max > 0 && payload.len() > max as usize {
            self.refusals.report(
                &self.host,
                Event::new(&self.grant_id, EventKind::LimitHit, peer.to_string()).detail(format!(
                    "datagram of {} bytes dropped: the grant allows at most {max} bytes",
                    payload.len()
                )),
            );
            return;
        }
        if let Err(e) = g.driver.inspect_datagram(&Datagram {
            grant_id: &self.grant_id,
            direction: Direction::Inbound,
            peer,
            local_port: self.port_num,
            payload,
        }) {
            g.refusals.set(g.refusals.get() + 1);
            self.refusals.report(
                &self.host,
                Event::new(&self.grant_id, EventKind::DatagramRefused, peer.to_string())
                    .detail(format!("refused by the driver: {e}")),
            );
            return;
        }
        let throttle = g.limiter.inbound_bytes();
        if throttle.per_second() > 0 {
            throttle.acquire(payload.len()).await;
        }
        let n = payload.len() as u64;
        g.bytes_in.set(g.bytes_in.get() + n);
        let Some(port) = self.grain_port.borrow().clone() else {
            return;
        };
        let reply = self.peer_port(socket, peer);
        let delivered = deliver(&port, reply, payload, &self.in_flight, |_| {});
        if !delivered {
            self.refusals.report(
                &self.host,
                Event::new(&self.grant_id, EventKind::LimitHit, peer.to_string()).detail(format!(
                    "datagram dropped: {MAX_DELIVERIES_IN_FLIGHT} deliveries to the grain in flight"
                )),
            );
        }
    }

    fn peer_port(self: &Rc<Self>, socket: &Rc<UdpSocket>, peer: SocketAddr) -> udp_port::Client {
        if let Some(p) = self.peer_ports.borrow().get(&peer) {
            return p.clone();
        }
        let p: udp_port::Client = capnp_rpc::new_client(ListenerPeerPort {
            listener: Rc::downgrade(self),
            socket: Rc::downgrade(socket),
            peer,
        });
        let mut ports = self.peer_ports.borrow_mut();
        if ports.len() >= MAX_LISTENER_PEERS {
            ports.clear();
        }
        ports.insert(peer, p.clone());
        p
    }

    /// Stops receiving and closes the sockets.
    pub(crate) fn stop(&self, why: &str) {
        if self.stopped.replace(true) {
            return;
        }
        for t in self.tasks.borrow_mut().drain(..) {
            t.abort();
        }
        self.grain_port.borrow_mut().take();
        self.peer_ports.borrow_mut().clear();
        self.permit.borrow_mut().take();
        if let Some(g) = self.grant.upgrade() {
            g.open_listeners
                .set(g.open_listeners.get().saturating_sub(1));
        }
        let hs = &self.host.state;
        hs.open_listeners
            .set(hs.open_listeners.get().saturating_sub(1));
        self.host.report(
            Event::new(&self.grant_id, EventKind::ListenStopped, self.describe())
                .detail(why.to_string()),
        );
    }
}

impl Drop for UdpListener {
    fn drop(&mut self) {
        self.stop("the handle was released");
    }
}

/// The port that answers one peer of a listener.
struct ListenerPeerPort {
    listener: Weak<UdpListener>,
    socket: Weak<UdpSocket>,
    peer: SocketAddr,
}

impl udp_port::Server for ListenerPeerPort {
    async fn send(
        self: Rc<Self>,
        params: udp_port::SendParams,
        _: udp_port::SendResults,
    ) -> Result<(), Error> {
        let gone = || Error::failed("failed: the UDP listener was stopped".into());
        let l = self.listener.upgrade().ok_or_else(gone)?;
        if l.stopped.get() {
            return Err(gone());
        }
        let socket = self.socket.upgrade().ok_or_else(gone)?;
        let g = l.grant.upgrade().ok_or_else(gone)?;
        g.check_live()?;
        let payload = params.get()?.get_message()?;
        check_limits(&g, &self.peer.to_string(), payload.len())?;
        let n = socket
            .send_to(payload, self.peer)
            .await
            .map_err(|e| Error::from(DriverError::io(format!("sending to {}", self.peer), e)))?;
        g.bytes_out.set(g.bytes_out.get() + n as u64);
        Ok(())
    }
}

/// The `Handle` returned by `listenUdp`: the listener lives exactly as long as it.
pub(crate) struct UdpListenHandleImpl {
    pub(crate) listener: Rc<UdpListener>,
}

impl handle::Server for UdpListenHandleImpl {
    async fn ping(
        self: Rc<Self>,
        _: handle::PingParams,
        _: handle::PingResults,
    ) -> Result<(), Error> {
        if self.listener.stopped.get() {
            if let Some(g) = self.listener.grant.upgrade() {
                g.check_live()?;
            }
            return Err(Error::disconnected("the listener was stopped".into()));
        }
        Ok(())
    }
}
