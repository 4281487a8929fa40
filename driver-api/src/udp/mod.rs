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

mod inbound;
mod outbound;

use std::cell::Cell;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::rc::Rc;
use std::time::{Duration, Instant};

use capnet_schemas::ip_capnp::udp_port;
use capnp::Error;
use tokio::net::UdpSocket;

use crate::context::ListenContext;
use crate::driver::DriverError;
use crate::events::{Event, EventKind};
use crate::grant::GrantState;
use crate::host::DriverHost;
use crate::policy::Direction;

pub(crate) use inbound::{UdpListenHandleImpl, UdpListener};
pub(crate) use outbound::{Mappings, UdpPortImpl};

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

/// Checks a datagram from the network on its way to the grain: the grant's size cap, then
/// the driver's [`Driver::inspect_datagram`](crate::Driver::inspect_datagram). A refusal
/// is audited through `audit`, naming the datagram `what` ("datagram", "reply"), and
/// returns `false`. An admitted datagram waits for the grant's inbound byte budget and is
/// counted in the grant's `bytes_in`.
async fn admit_from_network(
    g: &GrantState,
    audit: &RefusalAudit,
    peer: SocketAddr,
    local_port: u16,
    payload: &[u8],
    what: &str,
) -> bool {
    let max = g.limiter.limits().udp_max_packet_size;
    if max > 0 && payload.len() > max as usize {
        audit.report(
            &g.host,
            Event::new(&g.id, EventKind::LimitHit, peer.to_string()).detail(format!(
                "{what} of {} bytes dropped: the grant allows at most {max} bytes",
                payload.len()
            )),
        );
        return false;
    }
    if let Err(e) = g.driver.inspect_datagram(&Datagram {
        grant_id: &g.id,
        direction: Direction::Inbound,
        peer,
        local_port,
        payload,
    }) {
        g.refusals.set(g.refusals.get() + 1);
        audit.report(
            &g.host,
            Event::new(&g.id, EventKind::DatagramRefused, peer.to_string())
                .detail(format!("{what} refused by the driver: {e}")),
        );
        return false;
    }
    let throttle = g.limiter.inbound_bytes();
    if throttle.per_second() > 0 {
        throttle.acquire(payload.len()).await;
    }
    g.bytes_in.set(g.bytes_in.get() + payload.len() as u64);
    true
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

/// Checks an outgoing datagram against the grant's size and rate limits, auditing a hit.
pub(super) fn check_limits(g: &GrantState, dest: &str, size: usize) -> Result<(), Error> {
    if let Err(e) = g.limiter.check_datagram(size) {
        g.host
            .report(Event::new(&g.id, EventKind::LimitHit, dest).detail(e.to_string()));
        return Err(DriverError::Limit(e.to_string()).into());
    }
    Ok(())
}
