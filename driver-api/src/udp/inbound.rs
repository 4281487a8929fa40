//! Inbound UDP: `IpInterface.listenUdp`, its per-peer reply ports and its `Handle`.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::{Rc, Weak};

use capnet_schemas::ip_capnp::udp_port;
use capnet_schemas::util_capnp::handle;
use capnp::Error;
use tokio::net::UdpSocket;
use tokio::task::AbortHandle;

use super::{
    MAX_DELIVERIES_IN_FLIGHT, MAX_LISTENER_PEERS, RECV_BUFFER, RefusalAudit, admit_from_network,
    check_limits, deliver,
};
use crate::driver::DriverError;
use crate::events::{Event, EventKind};
use crate::grant::GrantState;
use crate::host::DriverHost;
use crate::limits::ListenerPermit;
use crate::policy::{Target as PolicyTarget, Transport};

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
        if !admit_from_network(&g, &self.refusals, peer, self.port_num, payload, "datagram").await {
            return;
        }
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
