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
use capnet_schemas::util_capnp::handle;
use capnp::Error;

use crate::grants::{Grant, Revocable, revoked_error};
use crate::membrane::HostRef;

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
            cached: RefCell::new(None),
        });
    udp_port::Client { client: c.client }
}

/// `UdpPort` proxy: one host and port under a grant.
pub(crate) struct UdpPortProxy {
    pub(crate) grant: Rc<Grant>,
    pub(crate) host: HostRef,
    pub(crate) port: u16,
    /// The driver's port object for one driver generation.
    cached: RefCell<Option<(u64, udp_port::Client)>>,
}

impl UdpPortProxy {
    async fn driver_port(&self) -> Result<udp_port::Client, Error> {
        let (net, generation) = self.grant.network().await?;
        if let Some((g, p)) = &*self.cached.borrow()
            && *g == generation
        {
            return Ok(p.clone());
        }
        let host = match &self.host {
            HostRef::Addr(a) => {
                let mut req = net.get_remote_host_request();
                capnet_schemas::ip::write(req.get().init_address(), *a);
                req.send().pipeline.get_host()
            }
            HostRef::Name(n) => {
                let mut req = net.get_remote_host_by_name_request();
                req.get().set_address(n);
                req.send().pipeline.get_host()
            }
        };
        let mut req = host.get_udp_port_request();
        req.get().set_port_num(self.port);
        let port = req.send().pipeline.get_port();
        *self.cached.borrow_mut() = Some((generation, port.clone()));
        Ok(port)
    }
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
        let port = self.driver_port().await?;
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
                target: RefCell::new(Some(resolved)),
                grant: grant.clone(),
            });
            grant.register(Rc::downgrade(&p) as Weak<dyn Revocable>);
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
    target: RefCell<Option<udp_port::Client>>,
    grant: Rc<Grant>,
}

impl Revocable for ReturnPortProxy {
    fn revoke(&self) {
        self.target.borrow_mut().take();
    }
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
        deliver_to_grain(&self.grant, &self.target, params).await
    }
}

/// Forwards a datagram from the driver to a grain port, wrapping the driver's peer port.
async fn deliver_to_grain(
    grant: &Rc<Grant>,
    target: &RefCell<Option<udp_port::Client>>,
    params: udp_port::SendParams,
) -> Result<(), Error> {
    grant.check_live()?;
    let target = target
        .borrow()
        .clone()
        .ok_or_else(|| revoked_error(&grant.id, "port released"))?;
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
    target: RefCell<Option<udp_port::Client>>,
    grant: Rc<Grant>,
}

impl DriverPeerProxy {
    fn client(grant: &Rc<Grant>, target: udp_port::Client) -> udp_port::Client {
        let p = Rc::new(Self {
            target: RefCell::new(Some(target)),
            grant: grant.clone(),
        });
        grant.register(Rc::downgrade(&p) as Weak<dyn Revocable>);
        capnp_rpc::new_client_from_rc(p)
    }
}

impl Revocable for DriverPeerProxy {
    fn revoke(&self) {
        self.target.borrow_mut().take();
    }
}

impl udp_port::Server for DriverPeerProxy {
    async fn send(
        self: Rc<Self>,
        params: udp_port::SendParams,
        _: udp_port::SendResults,
    ) -> Result<(), Error> {
        let g = &self.grant;
        g.check_live()?;
        g.touch();
        let target = self
            .target
            .borrow()
            .clone()
            .ok_or_else(|| revoked_error(&g.id, "port released"))?;
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
    target: RefCell<Option<udp_port::Client>>,
    grant: Rc<Grant>,
}

impl Revocable for GrainUdpPortProxy {
    fn revoke(&self) {
        self.target.borrow_mut().take();
    }
}

impl udp_port::Server for GrainUdpPortProxy {
    async fn send(
        self: Rc<Self>,
        params: udp_port::SendParams,
        _: udp_port::SendResults,
    ) -> Result<(), Error> {
        deliver_to_grain(&self.grant, &self.target, params).await
    }
}

/// A driver's UDP listener `Handle` held for a grain.
struct UdpHandleProxy {
    target: RefCell<Option<handle::Client>>,
    grant: Rc<Grant>,
}

impl Revocable for UdpHandleProxy {
    fn revoke(&self) {
        self.target.borrow_mut().take();
    }
}

impl handle::Server for UdpHandleProxy {
    async fn ping(
        self: Rc<Self>,
        _: handle::PingParams,
        _: handle::PingResults,
    ) -> Result<(), Error> {
        self.grant.check_live()?;
        let target = self
            .target
            .borrow()
            .clone()
            .ok_or_else(|| Error::disconnected("the handle was released".into()))?;
        target.ping_request().send().promise.await?;
        Ok(())
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
    let wrapped = Rc::new(GrainUdpPortProxy {
        target: RefCell::new(Some(grain_port)),
        grant: grant.clone(),
    });
    grant.register(Rc::downgrade(&wrapped) as Weak<dyn Revocable>);
    let iface = grant.interface().await?;
    let mut req = iface.listen_udp_request();
    req.get().set_port_num(port_num);
    req.get()
        .set_port(capnp_rpc::new_client_from_rc::<udp_port::Client, _>(
            wrapped,
        ));
    let driver_handle = req.send().promise.await?.get()?.get_handle()?;
    grant.check_live()?;
    let h = Rc::new(UdpHandleProxy {
        target: RefCell::new(Some(driver_handle)),
        grant: grant.clone(),
    });
    grant.register(Rc::downgrade(&h) as Weak<dyn Revocable>);
    results
        .get()
        .set_handle(capnp_rpc::new_client_from_rc::<handle::Client, _>(h));
    Ok(())
}
