//! The generic Cap'n Proto servers every driver gets: `Driver`, `GrantSession`,
//! `IpNetwork`, `IpRemoteHost`, `TcpPort` and `IpInterface`.
//!
//! Each object holds its grant's state and checks, on every call, that the grant is live,
//! that the approved privileges allow the operation, the limits, and the policy, before
//! calling into the plugin's [`Driver`] implementation.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::net::IpAddr;
use std::rc::Rc;

use capnet_schemas::bytestream::WriterStream;
use capnet_schemas::descriptor::Encryption;
use capnet_schemas::driver_capnp::{driver, grant_session, grant_spec};
use capnet_schemas::ip_capnp::{ip_interface, ip_network, ip_remote_host, tcp_port, udp_port};
use capnet_schemas::policy_capnp::policy;
use capnp::Error;
use futures::future::LocalBoxFuture;

use crate::conn::ConnShared;
use crate::context::{ConnectContext, HostSpec, ListenContext, Target};
use crate::driver::{Connection, Driver, DriverError, Listener};
use crate::events::{Event, EventKind, EventReporter};
use crate::grant::{GrantState, GrantTerms};
use crate::host::{DriverHost, split_options};
use crate::limits::{Limits, ListenerPermit};
use crate::listen::{ListenHandleImpl, ListenerShared};
use crate::manifest::Privileges;
use crate::policy::{Policy, Target as PolicyTarget, Transport};
use crate::udp::{Datagram, UdpBindContext, UdpListenHandleImpl, UdpListener, UdpPortImpl};

/// The plugin's `Driver`, without its type.
pub(crate) trait DynDriver {
    fn connect(
        &self,
        cx: ConnectContext,
    ) -> LocalBoxFuture<'static, Result<Connection, DriverError>>;
    fn listen(
        &self,
        cx: ListenContext,
    ) -> LocalBoxFuture<'static, Result<Box<dyn Listener>, DriverError>>;
    fn bind_udp(
        &self,
        cx: UdpBindContext,
    ) -> LocalBoxFuture<'static, Result<tokio::net::UdpSocket, DriverError>>;
    fn listen_udp(
        &self,
        cx: ListenContext,
    ) -> LocalBoxFuture<'static, Result<Vec<tokio::net::UdpSocket>, DriverError>>;
    fn inspect_datagram(&self, datagram: &Datagram<'_>) -> Result<(), DriverError>;
}

struct Erased<D>(Rc<D>);

impl<D: Driver> DynDriver for Erased<D> {
    fn connect(
        &self,
        cx: ConnectContext,
    ) -> LocalBoxFuture<'static, Result<Connection, DriverError>> {
        Box::pin(self.0.clone().connect(cx))
    }

    fn listen(
        &self,
        cx: ListenContext,
    ) -> LocalBoxFuture<'static, Result<Box<dyn Listener>, DriverError>> {
        Box::pin(self.0.clone().listen(cx))
    }

    fn bind_udp(
        &self,
        cx: UdpBindContext,
    ) -> LocalBoxFuture<'static, Result<tokio::net::UdpSocket, DriverError>> {
        Box::pin(self.0.clone().bind_udp(cx))
    }

    fn listen_udp(
        &self,
        cx: ListenContext,
    ) -> LocalBoxFuture<'static, Result<Vec<tokio::net::UdpSocket>, DriverError>> {
        Box::pin(self.0.clone().listen_udp(cx))
    }

    fn inspect_datagram(&self, datagram: &Datagram<'_>) -> Result<(), DriverError> {
        self.0.inspect_datagram(datagram)
    }
}

struct Started {
    driver: Rc<dyn DynDriver>,
    host: DriverHost,
    policy: capnp::message::Builder<capnp::message::HeapAllocator>,
}

/// The bootstrap `Driver` capability of a plugin.
pub(crate) struct DriverImpl<D> {
    started: RefCell<Option<Started>>,
    _driver: std::marker::PhantomData<D>,
}

impl<D: Driver> DriverImpl<D> {
    pub(crate) fn new() -> Self {
        Self {
            started: RefCell::new(None),
            _driver: std::marker::PhantomData,
        }
    }

    fn start_inner(&self, params: driver::StartParams) -> Result<(), Error> {
        if self.started.borrow().is_some() {
            return Err(Error::failed("the driver was already started".into()));
        }
        let p = params.get()?;
        let config = p.get_config()?;
        let events = EventReporter::start(p.get_events()?);
        let name = config.get_name()?.to_str()?.to_string();
        let (standard, own) = split_options(config.get_options_toml()?.to_str()?)?;
        let options: D::Options = own.try_into().map_err(|e: toml::de::Error| {
            Error::failed(format!("invalid driver options for {name}: {e}"))
        })?;
        let privileges = Privileges::read(config.get_privileges()?);
        let mut listen = Vec::new();
        for a in config.get_listen_addresses()? {
            let a = a?.to_str()?;
            let ip: IpAddr = a
                .parse()
                .map_err(|_| Error::failed(format!("listen address {a:?} is not an IP address")))?;
            listen.push(ip);
        }
        let host = DriverHost::new(name, privileges, listen, standard, events)?;
        let driver = D::start(options, &host)?;
        let mut policy = capnp::message::Builder::new_default();
        policy.set_root(config.get_policy()?)?;
        *self.started.borrow_mut() = Some(Started {
            driver: Rc::new(Erased(Rc::new(driver))),
            host,
            policy,
        });
        Ok(())
    }
}

fn not_started() -> Error {
    Error::failed("the driver has not been started; call Driver.start first".into())
}

impl<D: Driver> driver::Server for DriverImpl<D> {
    fn start(
        self: Rc<Self>,
        params: driver::StartParams,
        mut results: driver::StartResults,
    ) -> impl Future<Output = Result<(), Error>> + 'static {
        let r = self.start_inner(params).map(|()| {
            D::manifest().write(results.get().init_manifest());
        });
        std::future::ready(r)
    }

    fn health(
        self: Rc<Self>,
        _: driver::HealthParams,
        mut results: driver::HealthResults,
    ) -> impl Future<Output = Result<(), Error>> + 'static {
        let r = match &*self.started.borrow() {
            None => Err(not_started()),
            Some(s) => {
                let hs = &s.host.state;
                let mut h = results.get().init_status();
                h.set_uptime_ms(hs.started.elapsed().as_millis() as u64);
                h.set_open_connections(hs.open_connections.get());
                h.set_open_listeners(hs.open_listeners.get());
                h.set_grants(hs.grants.get());
                Ok(())
            }
        };
        std::future::ready(r)
    }

    fn open_grant(
        self: Rc<Self>,
        params: driver::OpenGrantParams,
        mut results: driver::OpenGrantResults,
    ) -> impl Future<Output = Result<(), Error>> + 'static {
        let r = (|| {
            let started = self.started.borrow();
            let s = started.as_ref().ok_or_else(not_started)?;
            let spec = params.get()?.get_spec()?;
            let driver_policy: policy::Reader<'_> = s.policy.get_root_as_reader()?;
            let policy = Policy::from_capnp(
                driver_policy,
                spec.get_policy()?,
                s.host.privileges().low_ports,
            )
            .map_err(|e| Error::failed(format!("invalid policy for grant: {e}")))?;
            let encryption = match spec.get_encryption()? {
                grant_spec::Encryption::None => Encryption::None,
                grant_spec::Encryption::Tls => Encryption::Tls,
            };
            let scope_host = spec.get_scope_host()?.to_str()?;
            let scope = crate::grant::Scope {
                host: if scope_host.is_empty() {
                    None
                } else {
                    Some(parse_host(scope_host)?)
                },
                port: spec.get_scope_port(),
            };
            let grant = GrantState::new(
                GrantTerms {
                    id: spec.get_grant_id()?.to_str()?.to_string(),
                    grain: spec.get_grain_id()?.to_str()?.to_string(),
                    encryption,
                    limits: Limits::read_capnp(spec.get_limits()?),
                    scope,
                },
                policy,
                s.host.clone(),
                s.driver.clone(),
            );
            let session: grant_session::Client = capnp_rpc::new_client(GrantSessionImpl { grant });
            results.get().set_session(session);
            Ok(())
        })();
        std::future::ready(r)
    }
}

/// The driver side of one grant. Releasing it revokes the grant.
pub(crate) struct GrantSessionImpl {
    grant: Rc<GrantState>,
}

impl Drop for GrantSessionImpl {
    fn drop(&mut self) {
        self.grant.revoke("the supervisor released the grant");
    }
}

impl grant_session::Server for GrantSessionImpl {
    fn network(
        self: Rc<Self>,
        _: grant_session::NetworkParams,
        mut results: grant_session::NetworkResults,
    ) -> impl Future<Output = Result<(), Error>> + 'static {
        let r = self.grant.check_live().map(|()| {
            let n: ip_network::Client = capnp_rpc::new_client(NetworkImpl {
                grant: self.grant.clone(),
            });
            results.get().set_network(n);
        });
        std::future::ready(r)
    }

    fn interface(
        self: Rc<Self>,
        _: grant_session::InterfaceParams,
        mut results: grant_session::InterfaceResults,
    ) -> impl Future<Output = Result<(), Error>> + 'static {
        let r = self.grant.check_live().map(|()| {
            let i: ip_interface::Client = capnp_rpc::new_client(InterfaceImpl {
                grant: self.grant.clone(),
            });
            results.get().set_interface(i);
        });
        std::future::ready(r)
    }

    fn revoke(
        self: Rc<Self>,
        params: grant_session::RevokeParams,
        _: grant_session::RevokeResults,
    ) -> impl Future<Output = Result<(), Error>> + 'static {
        let r = (|| {
            let reason = params.get()?.get_reason()?.to_str()?.to_string();
            self.grant.revoke(if reason.is_empty() {
                "revoked by the administrator"
            } else {
                &reason
            });
            Ok(())
        })();
        std::future::ready(r)
    }

    fn stats(
        self: Rc<Self>,
        _: grant_session::StatsParams,
        mut results: grant_session::StatsResults,
    ) -> impl Future<Output = Result<(), Error>> + 'static {
        let g = &self.grant;
        let mut s = results.get().init_stats();
        s.set_bytes_in(g.bytes_in.get());
        s.set_bytes_out(g.bytes_out.get());
        s.set_open_connections(g.open_connections.get());
        s.set_open_listeners(g.open_listeners.get());
        s.set_connections_total(g.connections_total.get());
        s.set_refusals(g.refusals.get());
        std::future::ready(Ok(()))
    }
}

/// Parses what a grain passed to `getRemoteHostByName`: a textual IP address (strict
/// syntax) or a DNS name (IDNA-normalised).
pub(crate) fn parse_host(text: &str) -> Result<HostSpec, DriverError> {
    HostSpec::parse(text.trim()).map_err(|e| DriverError::Other(format!("{text:?}: {e}")))
}

/// `IpNetwork` under one grant.
pub(crate) struct NetworkImpl {
    grant: Rc<GrantState>,
}

impl NetworkImpl {
    fn host(&self, spec: HostSpec) -> Result<ip_remote_host::Client, Error> {
        self.grant.check_live()?;
        self.grant.scope.check_host(&self.grant.id, &spec)?;
        Ok(capnp_rpc::new_client(RemoteHostImpl {
            grant: self.grant.clone(),
            host: spec,
        }))
    }
}

impl ip_network::Server for NetworkImpl {
    fn get_remote_host(
        self: Rc<Self>,
        params: ip_network::GetRemoteHostParams,
        mut results: ip_network::GetRemoteHostResults,
    ) -> impl Future<Output = Result<(), Error>> + 'static {
        let r = (|| {
            let addr = capnet_schemas::ip::read(params.get()?.get_address()?);
            let host = self.host(HostSpec::Addr(addr))?;
            results.get().set_host(host);
            Ok(())
        })();
        std::future::ready(r)
    }

    fn get_remote_host_by_name(
        self: Rc<Self>,
        params: ip_network::GetRemoteHostByNameParams,
        mut results: ip_network::GetRemoteHostByNameResults,
    ) -> impl Future<Output = Result<(), Error>> + 'static {
        let r = (|| {
            let text = params.get()?.get_address()?.to_str()?;
            let spec = parse_host(text)?;
            let host = self.host(spec)?;
            results.get().set_host(host);
            Ok(())
        })();
        std::future::ready(r)
    }
}

/// `IpRemoteHost` under one grant.
pub(crate) struct RemoteHostImpl {
    grant: Rc<GrantState>,
    host: HostSpec,
}

impl RemoteHostImpl {
    /// This host at `port`, if the grant is live and its scope allows the port (port 0 is
    /// never a destination).
    fn target(&self, port: u16) -> Result<Target, Error> {
        self.grant.check_live()?;
        if port == 0 {
            return Err(Error::failed("port 0 is not a valid destination".into()));
        }
        self.grant.scope.check_port(&self.grant.id, port)?;
        Ok(Target {
            host: self.host.clone(),
            port,
        })
    }
}

impl ip_remote_host::Server for RemoteHostImpl {
    fn get_tcp_port(
        self: Rc<Self>,
        params: ip_remote_host::GetTcpPortParams,
        mut results: ip_remote_host::GetTcpPortResults,
    ) -> impl Future<Output = Result<(), Error>> + 'static {
        let r = (|| {
            let target = self.target(params.get()?.get_port_num())?;
            let p: tcp_port::Client = capnp_rpc::new_client(TcpPortImpl {
                grant: self.grant.clone(),
                target,
            });
            results.get().set_port(p);
            Ok(())
        })();
        std::future::ready(r)
    }

    fn get_udp_port(
        self: Rc<Self>,
        params: ip_remote_host::GetUdpPortParams,
        mut results: ip_remote_host::GetUdpPortResults,
    ) -> impl Future<Output = Result<(), Error>> + 'static {
        let r = (|| {
            let target = self.target(params.get()?.get_port_num())?;
            let p: udp_port::Client = capnp_rpc::new_client(UdpPortImpl {
                grant: self.grant.clone(),
                target,
                vetted: RefCell::new(None),
            });
            results.get().set_port(p);
            Ok(())
        })();
        std::future::ready(r)
    }
}

/// `TcpPort` under one grant: one host and port.
pub(crate) struct TcpPortImpl {
    grant: Rc<GrantState>,
    target: Target,
}

impl tcp_port::Server for TcpPortImpl {
    async fn connect(
        self: Rc<Self>,
        params: tcp_port::ConnectParams,
        mut results: tcp_port::ConnectResults,
    ) -> Result<(), Error> {
        let g = &self.grant;
        g.check_live()?;
        let downstream = params.get()?.get_downstream()?;
        if !g.host.privileges().outbound_tcp {
            return Err(DriverError::Refused {
                what: format!("connect to {}", self.target),
                rule: "the driver was not approved for outbound TCP".into(),
            }
            .into());
        }
        let permit = match g.admit_connection() {
            Ok(p) => p,
            Err(e) => {
                g.host.report(
                    Event::new(&g.id, EventKind::LimitHit, self.target.to_string())
                        .detail(e.to_string()),
                );
                return Err(DriverError::Limit(e.to_string()).into());
            }
        };
        // The grain may pipeline writes on `upstream` before the connection exists:
        // they wait inside the pending stream until it is made (or fail with its error).
        let slot: Rc<RefCell<std::rc::Weak<ConnShared>>> = Rc::default();
        let aborted = Rc::new(Cell::new(false));
        let (upstream, writer_tx) = WriterStream::pending();
        let upstream = match crate::conn::outbound_gate(g) {
            Some(gate) => upstream.gate(gate),
            None => upstream,
        };
        let (slot2, aborted2) = (slot.clone(), aborted.clone());
        let upstream = upstream.on_abort(move || {
            aborted2.set(true);
            if let Some(c) = slot2.borrow().upgrade() {
                c.kill("the grain released the stream without done()");
            }
        });
        results.get().set_upstream(capnp_rpc::new_client::<
            capnet_schemas::util_capnp::byte_stream::Client,
            _,
        >(upstream));
        results.set_pipeline()?;
        let cx = ConnectContext {
            grant: g.clone(),
            target: self.target.clone(),
        };
        let conn = match g.driver.connect(cx).await {
            Ok(c) => c,
            Err(e) => {
                let msg = e.to_string();
                let _ = writer_tx.send(Err(msg));
                return Err(e.into());
            }
        };
        if let Err(e) = g.check_live() {
            let _ = writer_tx.send(Err(e.to_string()));
            return Err(e);
        }
        let shared = ConnShared::new(conn, g.clone(), permit);
        *slot.borrow_mut() = Rc::downgrade(&shared);
        let (_, writer) = shared.halves();
        let _ = writer_tx.send(Ok(writer));
        shared.start_pump(downstream);
        if aborted.get() {
            shared.kill("the grain released the stream without done()");
        }
        Ok(())
    }
}

/// `IpInterface` under one grant.
pub(crate) struct InterfaceImpl {
    grant: Rc<GrantState>,
}

impl ip_interface::Server for InterfaceImpl {
    async fn listen_tcp(
        self: Rc<Self>,
        params: ip_interface::ListenTcpParams,
        mut results: ip_interface::ListenTcpResults,
    ) -> Result<(), Error> {
        let g = &self.grant;
        g.check_live()?;
        let p = params.get()?;
        let port_num = p.get_port_num();
        let port = p.get_port()?;
        let (cx, permit) = admit_listen(g, port_num, Transport::Tcp)?;
        let listener = g.driver.listen(cx).await?;
        g.check_live()?;
        let shared = ListenerShared::start(g.clone(), port_num, listener, port, permit);
        let h: capnet_schemas::util_capnp::handle::Client =
            capnp_rpc::new_client(ListenHandleImpl { listener: shared });
        results.get().set_handle(h);
        Ok(())
    }

    async fn listen_udp(
        self: Rc<Self>,
        params: ip_interface::ListenUdpParams,
        mut results: ip_interface::ListenUdpResults,
    ) -> Result<(), Error> {
        let g = &self.grant;
        g.check_live()?;
        let p = params.get()?;
        let port_num = p.get_port_num();
        let port: udp_port::Client = p.get_port()?;
        let (cx, permit) = admit_listen(g, port_num, Transport::Udp)?;
        let sockets = g.driver.listen_udp(cx).await?;
        g.check_live()?;
        let listener = UdpListener::start(g, port_num, sockets, port, permit);
        let h: capnet_schemas::util_capnp::handle::Client =
            capnp_rpc::new_client(UdpListenHandleImpl { listener });
        results.get().set_handle(h);
        Ok(())
    }
}

/// Admits a listener on `port_num`: the driver must be approved for inbound `transport`,
/// the policy must allow the port on every listen address, and the grant must be under its
/// listener limit. Refusals and limit hits are audited.
fn admit_listen(
    g: &Rc<GrantState>,
    port_num: u16,
    transport: Transport,
) -> Result<(ListenContext, ListenerPermit), Error> {
    let (approved, what, name) = match transport {
        Transport::Tcp => (
            g.host.privileges().inbound_tcp,
            format!("listen on port {port_num}"),
            "TCP",
        ),
        Transport::Udp => (
            g.host.privileges().inbound_udp,
            format!("listen for UDP on port {port_num}"),
            "UDP",
        ),
    };
    if !approved {
        return Err(DriverError::Refused {
            what,
            rule: format!("the driver was not approved for inbound {name}"),
        }
        .into());
    }
    check_listen_policy(g, port_num, transport)?;
    let permit = g.admit_listener().map_err(|e| {
        g.host.report(
            Event::new(
                &g.id,
                EventKind::LimitHit,
                listen_target(port_num, transport),
            )
            .detail(e.to_string()),
        );
        Error::from(DriverError::Limit(e.to_string()))
    })?;
    let cx = ListenContext {
        grant: g.clone(),
        port: port_num,
    };
    Ok((cx, permit))
}

/// How audit events name a listening port.
fn listen_target(port_num: u16, transport: Transport) -> String {
    match transport {
        Transport::Tcp => format!("port {port_num}"),
        Transport::Udp => format!("udp port {port_num}"),
    }
}

/// Vets listening on `port_num` on every listen address; audits and fails on a refusal.
fn check_listen_policy(g: &GrantState, port_num: u16, transport: Transport) -> Result<(), Error> {
    let mut d = None;
    for addr in g.host.listen_addresses() {
        let decision = g
            .policy
            .decide(&PolicyTarget::inbound(*addr, port_num, transport));
        if d.is_none() || !decision.allowed {
            d = Some(decision);
        }
    }
    let Some(d) = d else {
        return Err(
            DriverError::Other("the driver has no listen addresses configured".into()).into(),
        );
    };
    if !d.allowed {
        g.refusals.set(g.refusals.get() + 1);
        let kind = match transport {
            Transport::Tcp => EventKind::ConnectRefused,
            Transport::Udp => EventKind::DatagramRefused,
        };
        g.host.report(
            Event::new(&g.id, kind, listen_target(port_num, transport))
                .rule(d.rule.to_string())
                .detail("listen refused"),
        );
        return Err(DriverError::Refused {
            what: format!("listen on port {port_num}"),
            rule: d.rule.to_string(),
        }
        .into());
    }
    Ok(())
}
