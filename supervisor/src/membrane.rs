//! The membrane: supervisor objects standing between a grain and a driver.
//!
//! Every capability a grain holds is one of these proxies; the grain never holds a driver
//! capability (capnp-rpc-rust has no three-party handoff, and we would not want one). Each
//! proxy checks its grant on every call, so a revoked grant fails at once with a `revoked:`
//! error. Proxies that hold objects of the other side (driver streams, listener handles,
//! the grain's own ports handed to a driver) hold them in a [`Link`], which the grant cuts
//! on revocation.
//! Bytes are counted here, where a driver cannot misreport them.
//!
//! Network, host and port proxies hold no driver objects at all: they remember what they
//! name and re-derive the driver side on use, which is what lets them survive a driver
//! restart.

use std::cell::RefCell;
use std::net::IpAddr;
use std::rc::Rc;

use capnet_schemas::bytestream::write_request;
use capnet_schemas::grain_capnp::{persistent_ip_remote_host, persistent_tcp_port};
use capnet_schemas::ip_capnp::{
    ip_interface, ip_network, ip_remote_host, persistent_ip_interface, persistent_ip_network,
    tcp_port,
};
use capnet_schemas::persistent_capnp::persistent;
use capnet_schemas::system_persistent_capnp::{api_token_owner, system_persistent};
use capnet_schemas::util_capnp::{byte_stream, handle};
use capnp::Error;

use crate::grants::{Grant, GrantKind, Revocable, revoked_error};
use crate::persist::SavedObject;

/// How a proxy names a host.
#[derive(Clone, Debug)]
pub(crate) enum HostRef {
    Addr(IpAddr),
    Name(String),
}

impl HostRef {
    fn from_text(t: &str) -> Self {
        match t.parse::<IpAddr>() {
            Ok(a) => HostRef::Addr(a),
            Err(_) => HostRef::Name(t.to_string()),
        }
    }

    fn text(&self) -> String {
        match self {
            HostRef::Addr(a) => a.to_string(),
            HostRef::Name(n) => n.clone(),
        }
    }

    /// This host as the driver's `net` names it (pipelined: no round trip here).
    fn on(&self, net: &ip_network::Client) -> ip_remote_host::Client {
        match self {
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
        }
    }
}

/// A driver port (`TcpPort` or `UdpPort`) a port proxy forwards to, derived from the
/// grant's network and kept for one driver generation: after a driver restart it is
/// derived again from the new instance.
pub(crate) struct DriverPort<C> {
    cached: RefCell<Option<(u64, C)>>,
}

impl<C: Clone> DriverPort<C> {
    pub(crate) fn new() -> Self {
        Self {
            cached: RefCell::new(None),
        }
    }

    /// The port for the driver's current generation; `derive` names it on a remote host
    /// of the driver's network.
    pub(crate) async fn get(
        &self,
        grant: &Grant,
        host: &HostRef,
        derive: impl FnOnce(ip_remote_host::Client) -> C,
    ) -> Result<C, Error> {
        let (net, generation) = grant.network().await?;
        if let Some((g, p)) = &*self.cached.borrow()
            && *g == generation
        {
            return Ok(p.clone());
        }
        let port = derive(host.on(&net));
        *self.cached.borrow_mut() = Some((generation, port.clone()));
        Ok(port)
    }
}

/// A capability on the other side of the membrane (a driver's stream, handle or port, or a
/// grain's port handed to a driver), held for one grant and let go of when the grant is
/// revoked. The proxy holding it is its only owner; the grant holds it weakly.
pub(crate) struct Link<T> {
    target: RefCell<Option<T>>,
    pub(crate) grant: Rc<Grant>,
}

impl<T: Clone + 'static> Link<T> {
    /// Holds `target` for `grant` and registers it for revocation.
    pub(crate) fn new(grant: &Rc<Grant>, target: T) -> Rc<Self> {
        let link = Rc::new(Self {
            target: RefCell::new(Some(target)),
            grant: grant.clone(),
        });
        grant.register(Rc::downgrade(&link) as std::rc::Weak<dyn Revocable>);
        link
    }

    /// The target while the grant is live; a `revoked:` error otherwise.
    pub(crate) fn get(&self) -> Result<T, Error> {
        self.grant.check_live()?;
        self.target
            .borrow()
            .clone()
            .ok_or_else(|| revoked_error(&self.grant.id, "released"))
    }
}

impl<T> Revocable for Link<T> {
    fn revoke(&self) {
        self.target.borrow_mut().take();
    }
}

/// The capability a grain receives for a grant.
pub fn root_capability(grant: &Rc<Grant>) -> capnp::capability::Client {
    restore_capability(grant, &SavedObject::Root)
}

fn remote_host(grant: &Rc<Grant>, host: HostRef) -> ip_remote_host::Client {
    let c: persistent_ip_remote_host::Client = capnp_rpc::new_client(RemoteHostProxy {
        grant: grant.clone(),
        host,
    });
    ip_remote_host::Client { client: c.client }
}

fn tcp_port(grant: &Rc<Grant>, host: HostRef, port: u16) -> tcp_port::Client {
    let c: persistent_tcp_port::Client = capnp_rpc::new_client(TcpPortProxy {
        grant: grant.clone(),
        host,
        port,
        driver: DriverPort::new(),
    });
    tcp_port::Client { client: c.client }
}

/// The capability a saved `object` of `grant` names. Every capability of a grant
/// implements `SystemPersistent`, so the grain can save it again.
pub fn restore_capability(grant: &Rc<Grant>, object: &SavedObject) -> capnp::capability::Client {
    match (object, &grant.kind) {
        (SavedObject::Root, GrantKind::IpNetwork { .. }) => {
            let c: persistent_ip_network::Client = capnp_rpc::new_client(NetworkProxy {
                grant: grant.clone(),
            });
            c.client
        }
        (SavedObject::Root, GrantKind::IpInterface) => {
            let c: persistent_ip_interface::Client = capnp_rpc::new_client(InterfaceProxy {
                grant: grant.clone(),
            });
            c.client
        }
        (SavedObject::Root, GrantKind::IpRemoteHost { host })
        | (SavedObject::RemoteHost { host }, _) => {
            remote_host(grant, HostRef::from_text(host)).client
        }
        (SavedObject::Root, GrantKind::TcpPort { host, port })
        | (SavedObject::TcpPort { host, port }, _) => {
            tcp_port(grant, HostRef::from_text(host), *port).client
        }
        (SavedObject::Root, GrantKind::UdpPort { host, port })
        | (SavedObject::UdpPort { host, port }, _) => {
            crate::membrane_udp::udp_port_proxy(grant, HostRef::from_text(host), *port).client
        }
    }
}

/// Implements `Persistent.save()` (and the empty `SystemPersistent`, and the combined
/// persistent interface) for a proxy, saving the object `$object` names.
macro_rules! persistent {
    ($ty:ty, $iface:path, |$this:ident| $object:expr) => {
        impl persistent::Server<capnp::data::Owned, api_token_owner::Owned> for $ty {
            async fn save(
                self: Rc<Self>,
                // The generated SaveParams/SaveResults aliases order their generic parameters
                // nondeterministically (capnpc 0.27), so the full types are spelled out.
                _: capnp::capability::Params<
                    persistent::save_params::Owned<capnp::data::Owned, api_token_owner::Owned>,
                >,
                mut results: capnp::capability::Results<
                    persistent::save_results::Owned<capnp::data::Owned, api_token_owner::Owned>,
                >,
            ) -> Result<(), Error> {
                let $this = &self;
                let object = $object;
                let token = crate::persist::save(&self.grant, object).await?;
                results.get().set_sturdy_ref(&token[..])?;
                Ok(())
            }
        }
        impl system_persistent::Server for $ty {}
        impl $iface for $ty {}
    };
}

persistent!(NetworkProxy, persistent_ip_network::Server, |_p| {
    SavedObject::Root
});
persistent!(InterfaceProxy, persistent_ip_interface::Server, |_p| {
    SavedObject::Root
});
persistent!(RemoteHostProxy, persistent_ip_remote_host::Server, |p| {
    SavedObject::RemoteHost {
        host: p.host.text(),
    }
});
persistent!(
    crate::membrane_udp::UdpPortProxy,
    capnet_schemas::grain_capnp::persistent_udp_port::Server,
    |p| SavedObject::UdpPort {
        host: p.host.text(),
        port: p.port,
    }
);
persistent!(TcpPortProxy, persistent_tcp_port::Server, |p| {
    SavedObject::TcpPort {
        host: p.host.text(),
        port: p.port,
    }
});

/// `IpNetwork` proxy.
struct NetworkProxy {
    grant: Rc<Grant>,
}

impl ip_network::Server for NetworkProxy {
    async fn get_remote_host(
        self: Rc<Self>,
        params: ip_network::GetRemoteHostParams,
        mut results: ip_network::GetRemoteHostResults,
    ) -> Result<(), Error> {
        self.grant.check_live()?;
        let addr = capnet_schemas::ip::read(params.get()?.get_address()?);
        results
            .get()
            .set_host(remote_host(&self.grant, HostRef::Addr(addr)));
        Ok(())
    }

    async fn get_remote_host_by_name(
        self: Rc<Self>,
        params: ip_network::GetRemoteHostByNameParams,
        mut results: ip_network::GetRemoteHostByNameResults,
    ) -> Result<(), Error> {
        self.grant.check_live()?;
        let name = params.get()?.get_address()?.to_str()?;
        if name.is_empty() || name.len() > 255 {
            return Err(Error::failed(format!(
                "{name:?} is not a host name or address"
            )));
        }
        // The driver parses and vets the name strictly when it is used.
        results
            .get()
            .set_host(remote_host(&self.grant, HostRef::Name(name.to_string())));
        Ok(())
    }
}

/// `IpRemoteHost` proxy.
struct RemoteHostProxy {
    grant: Rc<Grant>,
    host: HostRef,
}

impl ip_remote_host::Server for RemoteHostProxy {
    async fn get_tcp_port(
        self: Rc<Self>,
        params: ip_remote_host::GetTcpPortParams,
        mut results: ip_remote_host::GetTcpPortResults,
    ) -> Result<(), Error> {
        self.grant.check_live()?;
        let port = params.get()?.get_port_num();
        results
            .get()
            .set_port(tcp_port(&self.grant, self.host.clone(), port));
        Ok(())
    }

    async fn get_udp_port(
        self: Rc<Self>,
        params: ip_remote_host::GetUdpPortParams,
        mut results: ip_remote_host::GetUdpPortResults,
    ) -> Result<(), Error> {
        self.grant.check_live()?;
        let port = params.get()?.get_port_num();
        let p = crate::membrane_udp::udp_port_proxy(&self.grant, self.host.clone(), port);
        results.get().set_port(p);
        Ok(())
    }
}

/// `TcpPort` proxy: one host and port under a grant.
struct TcpPortProxy {
    grant: Rc<Grant>,
    host: HostRef,
    port: u16,
    driver: DriverPort<tcp_port::Client>,
}

impl tcp_port::Server for TcpPortProxy {
    async fn connect(
        self: Rc<Self>,
        params: tcp_port::ConnectParams,
        results: tcp_port::ConnectResults,
    ) -> Result<(), Error> {
        let g = &self.grant;
        g.check_live()?;
        g.touch();
        let downstream = params.get()?.get_downstream()?;
        let port = self
            .driver
            .get(g, &self.host, |host| {
                let mut req = host.get_tcp_port_request();
                req.get().set_port_num(self.port);
                req.send().pipeline.get_port()
            })
            .await?;
        forward_connect(g, &port, downstream, Direction::ToGrain, results).await
    }
}

/// Forwards a `TcpPort.connect` to `port` through the membrane. The caller's `downstream`
/// carries bytes `toward_caller`; both directions are counted, tracked as one open
/// connection and cut on revocation.
async fn forward_connect(
    g: &Rc<Grant>,
    port: &tcp_port::Client,
    downstream: byte_stream::Client,
    toward_caller: Direction,
    mut results: tcp_port::ConnectResults,
) -> Result<(), Error> {
    let conn = ConnTrack::new(g);
    let down = ByteStreamProxy::client(downstream, g, toward_caller, conn.clone());
    let mut req = port.connect_request();
    req.get().set_downstream(down);
    let response = req.send();
    let up = ByteStreamProxy::client(
        response.pipeline.get_upstream(),
        g,
        toward_caller.reverse(),
        conn,
    );
    results.get().set_upstream(up);
    results.set_pipeline()?;
    response.promise.await?;
    Ok(())
}

/// `IpInterface` proxy.
struct InterfaceProxy {
    grant: Rc<Grant>,
}

impl ip_interface::Server for InterfaceProxy {
    async fn listen_tcp(
        self: Rc<Self>,
        params: ip_interface::ListenTcpParams,
        mut results: ip_interface::ListenTcpResults,
    ) -> Result<(), Error> {
        let g = &self.grant;
        g.check_live()?;
        g.touch();
        let p = params.get()?;
        let port_num = p.get_port_num();
        let grain_port = p.get_port()?;
        let wrapped = capnp_rpc::new_client(GrainPortProxy {
            grain: Link::new(g, grain_port),
        });
        let iface = g.interface().await?;
        let mut req = iface.listen_tcp_request();
        req.get().set_port_num(port_num);
        req.get().set_port(wrapped);
        let driver_handle = req.send().promise.await?.get()?.get_handle()?;
        results
            .get()
            .set_handle(HandleProxy::client(g, driver_handle)?);
        Ok(())
    }

    async fn listen_udp(
        self: Rc<Self>,
        params: ip_interface::ListenUdpParams,
        results: ip_interface::ListenUdpResults,
    ) -> Result<(), Error> {
        crate::membrane_udp::listen_udp(&self.grant, params, results).await
    }
}

/// The grain's own `TcpPort` as a driver sees it (inbound connections).
struct GrainPortProxy {
    grain: Rc<Link<tcp_port::Client>>,
}

impl tcp_port::Server for GrainPortProxy {
    async fn connect(
        self: Rc<Self>,
        params: tcp_port::ConnectParams,
        results: tcp_port::ConnectResults,
    ) -> Result<(), Error> {
        let target = self.grain.get()?;
        let g = &self.grain.grant;
        g.touch();
        let to_network = params.get()?.get_downstream()?;
        forward_connect(g, &target, to_network, Direction::ToNetwork, results).await
    }
}

/// A driver listener's `Handle` held for a grain (TCP and UDP).
pub(crate) struct HandleProxy {
    driver: Rc<Link<handle::Client>>,
}

impl HandleProxy {
    /// The grain's handle for `driver_handle`, unless the grant was revoked meanwhile.
    pub(crate) fn client(
        grant: &Rc<Grant>,
        driver_handle: handle::Client,
    ) -> Result<handle::Client, Error> {
        grant.check_live()?;
        Ok(capnp_rpc::new_client(HandleProxy {
            driver: Link::new(grant, driver_handle),
        }))
    }
}

impl handle::Server for HandleProxy {
    async fn ping(
        self: Rc<Self>,
        _: handle::PingParams,
        _: handle::PingResults,
    ) -> Result<(), Error> {
        let target = self.driver.get()?;
        target.ping_request().send().promise.await?;
        Ok(())
    }
}

/// Counts one open connection of a grant for as long as either direction lives.
struct ConnTrack {
    grant: Rc<Grant>,
}

impl ConnTrack {
    fn new(grant: &Rc<Grant>) -> Rc<Self> {
        grant.open_connections.set(grant.open_connections.get() + 1);
        Rc::new(Self {
            grant: grant.clone(),
        })
    }
}

impl Drop for ConnTrack {
    fn drop(&mut self) {
        let g = &self.grant;
        g.open_connections
            .set(g.open_connections.get().saturating_sub(1));
    }
}

#[derive(Clone, Copy)]
enum Direction {
    ToGrain,
    ToNetwork,
}

impl Direction {
    fn reverse(self) -> Self {
        match self {
            Direction::ToGrain => Direction::ToNetwork,
            Direction::ToNetwork => Direction::ToGrain,
        }
    }
}

/// A `ByteStream` forwarded through the membrane, counting bytes.
struct ByteStreamProxy {
    target: Rc<Link<byte_stream::Client>>,
    direction: Direction,
    _conn: Rc<ConnTrack>,
}

impl ByteStreamProxy {
    fn client(
        target: byte_stream::Client,
        grant: &Rc<Grant>,
        direction: Direction,
        conn: Rc<ConnTrack>,
    ) -> byte_stream::Client {
        capnp_rpc::new_client(Self {
            target: Link::new(grant, target),
            direction,
            _conn: conn,
        })
    }

    fn target(&self) -> Result<byte_stream::Client, Error> {
        self.target.get()
    }
}

impl byte_stream::Server for ByteStreamProxy {
    async fn write(self: Rc<Self>, params: byte_stream::WriteParams) -> Result<(), Error> {
        let target = self.target()?;
        let data = params.get()?.get_data()?;
        let n = data.len() as u64;
        let grant = &self.target.grant;
        let counter = match self.direction {
            Direction::ToGrain => &grant.bytes_in,
            Direction::ToNetwork => &grant.bytes_out,
        };
        counter.set(counter.get() + n);
        write_request(&target, data).send().await
    }

    async fn done(
        self: Rc<Self>,
        _: byte_stream::DoneParams,
        _: byte_stream::DoneResults,
    ) -> Result<(), Error> {
        let target = self.target()?;
        target.done_request().send().promise.await?;
        Ok(())
    }

    async fn expect_size(
        self: Rc<Self>,
        params: byte_stream::ExpectSizeParams,
        _: byte_stream::ExpectSizeResults,
    ) -> Result<(), Error> {
        let target = self.target()?;
        let mut req = target.expect_size_request();
        req.get().set_size(params.get()?.get_size());
        req.send().promise.await?;
        Ok(())
    }
}
