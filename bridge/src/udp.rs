//! SOCKS5 UDP ASSOCIATE onto `UdpPort` capabilities.
//!
//! The bridge binds a UDP socket on the loopback address the client reached it on and
//! tells the client its port. Each datagram the client sends there carries a SOCKS header
//! naming its destination; the bridge maps the destination onto a grant (a `UdpPort` for
//! exactly that host and port, else an `IpRemoteHost`, else an `IpNetwork`) and calls
//! `UdpPort.send(message, returnPort)`. Each destination gets one `returnPort` for the
//! life of the association, so the driver keeps one source port for it (its NAT-like
//! mapping); what the peer answers arrives at that `returnPort` and goes back to the client
//! with the destination in the header.
//!
//! Bounds: only datagrams from the client's address are accepted (the address it declared,
//! or the first that came from the client's IP), fragments are dropped, at most
//! [`MAX_DESTINATIONS`] destinations and [`MAX_IN_FLIGHT`] unanswered sends per
//! association (more are dropped, as UDP may). The association ends when the client closes
//! its TCP connection; the bridge then releases every `returnPort`, which ends the
//! driver's mappings.

use std::cell::Cell;
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::rc::Rc;

use capnet_schemas::ip_capnp::udp_port;
use capnp::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

use crate::Bridge;
use crate::refusal::{Refusal, reply};
use crate::socks::{SocksAddr, SocksError, encode_reply, parse_udp, udp_header};
use crate::target::{Host, Target};

/// Destinations (and so `returnPort`s) one association may use at once.
pub const MAX_DESTINATIONS: usize = 256;
/// `UdpPort.send` calls one association may have unanswered; more datagrams are dropped.
pub const MAX_IN_FLIGHT: usize = 64;
/// Largest UDP payload over IPv4.
const MAX_DATAGRAM: usize = 65_507;

/// Where replies from one destination go: the client, with the destination's header.
struct ReturnPort {
    socket: Rc<UdpSocket>,
    client: Rc<Cell<Option<SocketAddr>>>,
    header: Vec<u8>,
    closed: Rc<Cell<bool>>,
}

impl udp_port::Server for ReturnPort {
    async fn send(
        self: Rc<Self>,
        params: udp_port::SendParams,
        _: udp_port::SendResults,
    ) -> Result<(), Error> {
        if self.closed.get() {
            return Err(Error::disconnected(
                "the SOCKS UDP association has ended".into(),
            ));
        }
        let message = params.get()?.get_message()?;
        let Some(client) = self.client.get() else {
            return Ok(());
        };
        if self.header.len() + message.len() > MAX_DATAGRAM {
            return Ok(());
        }
        let mut d = Vec::with_capacity(self.header.len() + message.len());
        d.extend_from_slice(&self.header);
        d.extend_from_slice(message);
        // A full socket buffer drops the datagram, as UDP would.
        let _ = self.socket.try_send_to(&d, client);
        Ok(())
    }
}

/// One destination: its candidate ports (most specific first) and the one in use.
struct Route {
    candidates: Vec<(udp_port::Client, String)>,
    current: Cell<usize>,
    return_port: udp_port::Client,
    reported: Cell<bool>,
}

/// Serves one UDP ASSOCIATE request on `control` (the client's TCP connection).
pub async fn associate(
    mut control: TcpStream,
    peer: SocketAddr,
    declared_host: Host,
    declared_port: u16,
    bridge: &Rc<Bridge>,
) -> Result<(), SocksError> {
    let unspecified: SocketAddr = ([0, 0, 0, 0], 0).into();
    if !bridge.router.carries_udp() {
        let refusal = Refusal::no_grant("UDP (no UdpPort, IpRemoteHost or IpNetwork grant)");
        crate::log_refusal("socks5-udp", peer, "UDP ASSOCIATE", &refusal);
        control
            .write_all(&encode_reply(reply::NOT_ALLOWED, unspecified))
            .await?;
        return Ok(());
    }
    let local = control.local_addr()?;
    let socket = match UdpSocket::bind(SocketAddr::new(local.ip(), 0)).await {
        Ok(s) => Rc::new(s),
        Err(e) => {
            control
                .write_all(&encode_reply(reply::GENERAL_FAILURE, unspecified))
                .await?;
            return Err(e.into());
        }
    };
    control
        .write_all(&encode_reply(reply::SUCCEEDED, socket.local_addr()?))
        .await?;
    // The client said where it will send from; a zero port (or address) means "unknown".
    let client: Rc<Cell<Option<SocketAddr>>> = Rc::new(Cell::new(match declared_host {
        Host::Ip(ip) if declared_port != 0 && !ip.is_unspecified() => {
            Some(SocketAddr::new(ip, declared_port))
        }
        _ if declared_port != 0 => Some(SocketAddr::new(peer.ip(), declared_port)),
        _ => None,
    }));
    let closed = Rc::new(Cell::new(false));
    let in_flight = Rc::new(Cell::new(0usize));
    let mut routes: HashMap<Target, Rc<Route>> = HashMap::new();
    let mut order: VecDeque<Target> = VecDeque::new();
    let mut buf = vec![0u8; 65_536];
    let mut control_buf = [0u8; 64];
    let result = loop {
        tokio::select! {
            r = control.read(&mut control_buf) => match r {
                Ok(0) => break Ok(()),
                Ok(_) => {}
                Err(e) => break Err(SocksError::Io(e)),
            },
            r = socket.recv_from(&mut buf) => {
                let (n, from) = match r {
                    Ok(x) => x,
                    Err(e) => break Err(SocksError::Io(e)),
                };
                if from.ip() != peer.ip() && from.ip().to_canonical() != peer.ip().to_canonical() {
                    continue;
                }
                match client.get() {
                    Some(c) if c != from => continue,
                    Some(_) => {}
                    None => client.set(Some(from)),
                }
                let Ok((addr, port, payload)) = parse_udp(&buf[..n]) else {
                    continue;
                };
                let Ok(host) = addr.host() else { continue };
                let target = Target { host, port };
                if port == 0 {
                    continue;
                }
                let route = match routes.get(&target) {
                    Some(r) => r.clone(),
                    None => {
                        let candidates = bridge.router.udp_ports(&target);
                        if candidates.is_empty() {
                            crate::log_refusal("socks5-udp", peer, &target.to_string(),
                                &Refusal::no_grant(format!("UDP {target}")));
                            continue;
                        }
                        if order.len() >= MAX_DESTINATIONS
                            && let Some(old) = order.pop_front()
                        {
                            routes.remove(&old);
                        }
                        let rp: udp_port::Client = capnp_rpc::new_client(ReturnPort {
                            socket: socket.clone(),
                            client: client.clone(),
                            header: udp_header(&addr, port),
                            closed: closed.clone(),
                        });
                        let r = Rc::new(Route {
                            candidates,
                            current: Cell::new(0),
                            return_port: rp,
                            reported: Cell::new(false),
                        });
                        routes.insert(target.clone(), r.clone());
                        order.push_back(target.clone());
                        r
                    }
                };
                if in_flight.get() >= MAX_IN_FLIGHT {
                    continue;
                }
                send(route, target, payload, &in_flight, peer);
            }
        }
    };
    closed.set(true);
    result
}

/// Sends one datagram on the route's current port without waiting for the answer.
fn send(
    route: Rc<Route>,
    target: Target,
    payload: &[u8],
    in_flight: &Rc<Cell<usize>>,
    peer: SocketAddr,
) {
    let i = route.current.get();
    let Some((port, grant)) = route.candidates.get(i).cloned() else {
        return;
    };
    let mut req = port.send_request();
    req.get().set_message(payload);
    req.get().set_return_port(route.return_port.clone());
    in_flight.set(in_flight.get() + 1);
    let in_flight = in_flight.clone();
    tokio::task::spawn_local(async move {
        let r = req.send().promise.await;
        in_flight.set(in_flight.get().saturating_sub(1));
        if let Err(e) = r {
            let refusal = Refusal::from_capnp(&e);
            if refusal.try_next_grant() && i + 1 < route.candidates.len() {
                route.current.set(i + 1);
                tracing::debug!(target: "capnet_bridge", %target, %grant, %refusal, "trying the next grant for UDP");
            } else if !route.reported.replace(true) {
                crate::log_refusal("socks5-udp", peer, &target.to_string(), &refusal);
            }
        }
    });
}

/// Reads the reply to a UDP ASSOCIATE request and the relay's address (test helper for
/// clients written against this module).
pub fn relay_addr(reply_bytes: &[u8]) -> Option<SocketAddr> {
    if reply_bytes.len() < 4 || reply_bytes[1] != reply::SUCCEEDED {
        return None;
    }
    match crate::socks::parse_udp(&[&[0, 0, 0][..], &reply_bytes[3..]].concat()) {
        Ok((SocksAddr::Ip(ip), port, _)) => Some(SocketAddr::new(ip, port)),
        _ => None,
    }
}
