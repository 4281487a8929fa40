//! The membrane for UDP: proxies for `UdpPort` in both directions and for `listenUdp`.
//!
//! * [`UdpPortProxy`] is the `UdpPort` a grain holds (from `getUdpPort` or a `UdpPort`
//!   grant). Like the TCP port proxy it holds no driver object across driver restarts: it
//!   re-derives the driver's port per driver generation.
//! * [`ReturnPortProxy`] wraps the `returnPort` a grain passes to `send`, so the driver
//!   never holds a grain capability. The driver keeps one NAT-like mapping per
//!   (grant, returnPort) and recognises a returnPort by capability identity, so every copy
//!   of one grain port must reach it as **one** proxy: a per-thread registry maps
//!   (grant, identity of the grain's resolved port) to the live proxy. Handing the driver a
//!   client for the same proxy object again makes the RPC system reuse the same export, so
//!   the driver sees the same import. The registry holds the proxy weakly: it lives exactly
//!   as long as the driver holds it (the driver drops it when the mapping expires), and
//!   the proxy holds the grain's port, so the identity cannot be reused meanwhile.
//! * [`GrainUdpPortProxy`] wraps the grain's own `UdpPort` given to `listenUdp`.
//! * [`DriverPeerProxy`] wraps the per-peer ports the driver delivers with each datagram,
//!   which the grain uses to answer that peer.
//!
//! Every proxy checks the grant on each call and registers with it, so revocation cuts
//! every direction at once. Bytes are counted here: to the grain as `bytes_in`, from the
//! grain as `bytes_out`.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::{Rc, Weak};
use std::time::Duration;

use capnet_schemas::ip_capnp::{ip_interface, udp_port};
use capnp::Error;

use crate::grants::Grant;
use crate::membrane::{DriverPort, HandleProxy, HostRef, Link};

/// How long `send` waits for a grain's `returnPort` promise to resolve.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

thread_local! {
    /// Live return-port proxies by (grant id, identity of the grain's port).
    static RETURN_PORTS: RefCell<HashMap<(String, usize), Weak<ReturnPortProxy>>> =
        RefCell::new(HashMap::new());
}

/// The `UdpPort` for `host:port` under `grant`.
/// It implements `SystemPersistent`, so a grain can save it.
pub(crate) fn udp_port_proxy(grant: &Rc<Grant>, host: HostRef, port: u16) -> udp_port::Client {
    let c: capnet_schemas::grain_capnp::persistent_udp_port::Client =
        capnp_rpc::new_client(UdpPortProxy {
            grant: grant.clone(),
            host,
            port,
            driver: DriverPort::new(),
        });
    udp_port::Client { client: c.client }
}

/// `UdpPort` proxy: one host and port under a grant.
pub(crate) struct UdpPortProxy {
    pub(crate) grant: Rc<Grant>,
    pub(crate) host: HostRef,
    pub(crate) port: u16,
    driver: DriverPort<udp_port::Client>,
}

impl udp_port::Server for UdpPortProxy {
    async fn send(
        self: Rc<Self>,
        params: udp_port::SendParams,
        _: udp_port::SendResults,
    ) -> Result<(), Error> {
        let g = &self.grant;
        g.check_live()?;
        g.touch();
        let p = params.get()?;
        let message = p.get_message()?;
        // No returnPort: the grain does not want replies; the driver drops them.
        let wrapped = if p.has_return_port() {
            Some(return_port_for(g, p.get_return_port()?).await?)
        } else {
            None
        };
        let port = self
            .driver
            .get(g, &self.host, |host| {
                let mut req = host.get_udp_port_request();
                req.get().set_port_num(self.port);
                req.send().pipeline.get_port()
            })
            .await?;
        let mut req = port.send_request();
        req.get().set_message(message);
        if let Some(w) = wrapped {
            req.get().set_return_port(w);
        }
        g.bytes_out.set(g.bytes_out.get() + message.len() as u64);
        req.send().promise.await?;
        Ok(())
    }
}

/// The one proxy for the grain's `return_port` under `grant`, created if needed.
async fn return_port_for(
    grant: &Rc<Grant>,
    return_port: udp_port::Client,
) -> Result<udp_port::Client, Error> {
    let resolved = tokio::time::timeout(
        RESOLVE_TIMEOUT,
        capnp::capability::get_resolved_cap(return_port),
    )
    .await
    .map_err(|_| {
        Error::failed(format!(
            "failed: the returnPort did not resolve within {}s",
            RESOLVE_TIMEOUT.as_secs()
        ))
    })?;
    let key = (grant.id.clone(), resolved.client.hook.get_ptr());
    let existing = RETURN_PORTS.with(|r| r.borrow().get(&key).and_then(Weak::upgrade));
    let proxy = match existing {
        Some(p) => p,
        None => {
            let p = Rc::new(ReturnPortProxy {
                key: key.clone(),
                grain: Link::new(grant, resolved),
            });
            RETURN_PORTS.with(|r| {
                let mut r = r.borrow_mut();
                r.retain(|_, w| w.strong_count() > 0);
                r.insert(key, Rc::downgrade(&p));
            });
            p
        }
    };
    Ok(capnp_rpc::new_client_from_rc(proxy))
}

/// A grain's `returnPort` as the driver sees it: replies from the network.
pub(crate) struct ReturnPortProxy {
    key: (String, usize),
    grain: Rc<Link<udp_port::Client>>,
}

impl Drop for ReturnPortProxy {
    fn drop(&mut self) {
        // `try_with`: the registry may already be gone when the thread ends.
        let _ = RETURN_PORTS.try_with(|r| {
            let mut r = r.borrow_mut();
            if r.get(&self.key).is_some_and(|w| w.strong_count() == 0) {
                r.remove(&self.key);
            }
        });
    }
}

impl udp_port::Server for ReturnPortProxy {
    async fn send(
        self: Rc<Self>,
        params: udp_port::SendParams,
        _: udp_port::SendResults,
    ) -> Result<(), Error> {
        deliver_to_grain(&self.grain, params).await
    }
}

/// Forwards a datagram from the driver to a grain port, wrapping the driver's peer port.
async fn deliver_to_grain(
    grain: &Link<udp_port::Client>,
    params: udp_port::SendParams,
) -> Result<(), Error> {
    let target = grain.get()?;
    let grant = &grain.grant;
    let p = params.get()?;
    let message = p.get_message()?;
    let peer = DriverPeerProxy::client(grant, p.get_return_port()?);
    grant
        .bytes_in
        .set(grant.bytes_in.get() + message.len() as u64);
    let mut req = target.send_request();
    req.get().set_message(message);
    req.get().set_return_port(peer);
    req.send().promise.await?;
    Ok(())
}

/// A driver port that answers one peer, as the grain holds it.
pub(crate) struct DriverPeerProxy {
    driver: Rc<Link<udp_port::Client>>,
}

impl DriverPeerProxy {
    fn client(grant: &Rc<Grant>, target: udp_port::Client) -> udp_port::Client {
        capnp_rpc::new_client(Self {
            driver: Link::new(grant, target),
        })
    }
}

impl udp_port::Server for DriverPeerProxy {
    async fn send(
        self: Rc<Self>,
        params: udp_port::SendParams,
        _: udp_port::SendResults,
    ) -> Result<(), Error> {
        let target = self.driver.get()?;
        let g = &self.driver.grant;
        g.touch();
        // Answers to a peer arrive where that peer's datagrams arrive; the grain's own
        // returnPort is not passed on, so the driver never holds a grain capability here.
        let message = params.get()?.get_message()?;
        let mut req = target.send_request();
        req.get().set_message(message);
        g.bytes_out.set(g.bytes_out.get() + message.len() as u64);
        req.send().promise.await?;
        Ok(())
    }
}

/// The grain's own `UdpPort` given to `listenUdp`, as the driver sees it.
pub(crate) struct GrainUdpPortProxy {
    grain: Rc<Link<udp_port::Client>>,
}

impl udp_port::Server for GrainUdpPortProxy {
    async fn send(
        self: Rc<Self>,
        params: udp_port::SendParams,
        _: udp_port::SendResults,
    ) -> Result<(), Error> {
        deliver_to_grain(&self.grain, params).await
    }
}

/// `IpInterface.listenUdp` through the membrane.
pub(crate) async fn listen_udp(
    grant: &Rc<Grant>,
    params: ip_interface::ListenUdpParams,
    mut results: ip_interface::ListenUdpResults,
) -> Result<(), Error> {
    grant.check_live()?;
    grant.touch();
    let p = params.get()?;
    let port_num = p.get_port_num();
    let grain_port = p.get_port()?;
    let wrapped = capnp_rpc::new_client(GrainUdpPortProxy {
        grain: Link::new(grant, grain_port),
    });
    let iface = grant.interface().await?;
    let mut req = iface.listen_udp_request();
    req.get().set_port_num(port_num);
    req.get().set_port(wrapped);
    let driver_handle = req.send().promise.await?.get()?.get_handle()?;
    results
        .get()
        .set_handle(HandleProxy::client(grant, driver_handle)?);
    Ok(())
}
