//! In-process stand-ins for the grain API and a driver, for the bridge's unit tests: a
//! grain API whose grants can be saved and restored, and an `IpNetwork` that connects to
//! real loopback sockets, refuses like the egress policy does, and echoes UDP datagrams
//! (reversed) to their `returnPort`.

use std::cell::{Cell, RefCell};
use std::net::IpAddr;
use std::rc::Rc;

use capnet_schemas::bytestream::{WriterStream, pump};
use capnet_schemas::grain_capnp::grain_api;
use capnet_schemas::ip_capnp::{
    ip_network, ip_remote_host, persistent_ip_network, tcp_port, udp_port,
};
use capnet_schemas::persistent_capnp::persistent;
use capnet_schemas::system_persistent_capnp::{api_token_owner, system_persistent};
use capnet_schemas::util_capnp::byte_stream;
use capnp::Error;

use crate::target::Host;

/// How the fake driver treats a host.
fn verdict(host: &Host, port: u16) -> Result<(), Error> {
    match host {
        Host::Name(n) if n == "denied.test" => Err(Error::failed(
            "not found: host denied.test does not exist".into(),
        )),
        Host::Ip(IpAddr::V4(v4)) if v4.is_private() => Err(Error::failed(format!(
            "refused: connect to {v4}:{port} is not allowed by the policy (rule: default: \
             private)"
        ))),
        _ => Ok(()),
    }
}

/// A fake `IpNetwork`: every allowed host is 127.0.0.1.
pub struct FakeNetwork {
    /// Token `save()` returns, if saving is supported.
    pub token: Option<Vec<u8>>,
}

impl ip_network::Server for FakeNetwork {
    async fn get_remote_host(
        self: Rc<Self>,
        params: ip_network::GetRemoteHostParams,
        mut results: ip_network::GetRemoteHostResults,
    ) -> Result<(), Error> {
        let ip = capnet_schemas::ip::read(params.get()?.get_address()?);
        results
            .get()
            .set_host(capnp_rpc::new_client(FakeHost(Host::Ip(ip))));
        Ok(())
    }

    async fn get_remote_host_by_name(
        self: Rc<Self>,
        params: ip_network::GetRemoteHostByNameParams,
        mut results: ip_network::GetRemoteHostByNameResults,
    ) -> Result<(), Error> {
        let name = params.get()?.get_address()?.to_str()?;
        let host = Host::parse(name).map_err(|e| Error::failed(e.to_string()))?;
        results
            .get()
            .set_host(capnp_rpc::new_client(FakeHost(host)));
        Ok(())
    }
}

impl persistent::Server<capnp::data::Owned, api_token_owner::Owned> for FakeNetwork {
    async fn save(
        self: Rc<Self>,
        _: capnp::capability::Params<
            persistent::save_params::Owned<capnp::data::Owned, api_token_owner::Owned>,
        >,
        mut results: capnp::capability::Results<
            persistent::save_results::Owned<capnp::data::Owned, api_token_owner::Owned>,
        >,
    ) -> Result<(), Error> {
        match &self.token {
            Some(t) => {
                results.get().set_sturdy_ref(&t[..])?;
                Ok(())
            }
            None => Err(Error::unimplemented("saving is not available".into())),
        }
    }
}

impl system_persistent::Server for FakeNetwork {}
impl persistent_ip_network::Server for FakeNetwork {}

struct FakeHost(Host);

impl ip_remote_host::Server for FakeHost {
    async fn get_tcp_port(
        self: Rc<Self>,
        params: ip_remote_host::GetTcpPortParams,
        mut results: ip_remote_host::GetTcpPortResults,
    ) -> Result<(), Error> {
        let port = params.get()?.get_port_num();
        results.get().set_port(capnp_rpc::new_client(FakeTcp {
            host: self.0.clone(),
            port,
        }));
        Ok(())
    }

    async fn get_udp_port(
        self: Rc<Self>,
        params: ip_remote_host::GetUdpPortParams,
        mut results: ip_remote_host::GetUdpPortResults,
    ) -> Result<(), Error> {
        let port = params.get()?.get_port_num();
        verdict(&self.0, port)?;
        results.get().set_port(capnp_rpc::new_client(FakeUdp));
        Ok(())
    }
}

struct FakeTcp {
    host: Host,
    port: u16,
}

impl tcp_port::Server for FakeTcp {
    async fn connect(
        self: Rc<Self>,
        params: tcp_port::ConnectParams,
        mut results: tcp_port::ConnectResults,
    ) -> Result<(), Error> {
        verdict(&self.host, self.port)?;
        let downstream = params.get()?.get_downstream()?;
        let s = tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .map_err(|e| {
                Error::disconnected(format!(
                    "failed: connecting to 127.0.0.1:{}: {e}",
                    self.port
                ))
            })?;
        let (r, w) = s.into_split();
        tokio::task::spawn_local(async move {
            let _ = pump(r, downstream, |_| ()).await;
        });
        let up: byte_stream::Client = capnp_rpc::new_client(WriterStream::new(w));
        results.get().set_upstream(up);
        Ok(())
    }
}

/// Answers every datagram, reversed, to its `returnPort`.
struct FakeUdp;

impl udp_port::Server for FakeUdp {
    async fn send(
        self: Rc<Self>,
        params: udp_port::SendParams,
        _: udp_port::SendResults,
    ) -> Result<(), Error> {
        let p = params.get()?;
        let mut m = p.get_message()?.to_vec();
        m.reverse();
        let back = p.get_return_port()?;
        let mut req = back.send_request();
        req.get().set_message(&m);
        req.get().set_return_port(capnp_rpc::new_client(FakeUdp));
        req.send().promise.await?;
        Ok(())
    }
}

/// A fake grain API: grants `IpNetwork` requests with a [`FakeNetwork`] that saves as
/// `token-N` (or cannot save), and restores the tokens it handed out.
pub struct FakeApi {
    /// Whether granted capabilities can be saved.
    pub can_save: bool,
    /// Requests seen (labels).
    pub requests: RefCell<Vec<String>>,
    /// Restores seen.
    pub restores: Cell<u32>,
    issued: RefCell<Vec<Vec<u8>>>,
}

impl FakeApi {
    /// A fake API.
    pub fn new(can_save: bool) -> Rc<Self> {
        Rc::new(Self {
            can_save,
            requests: RefCell::new(Vec::new()),
            restores: Cell::new(0),
            issued: RefCell::new(Vec::new()),
        })
    }

    /// A client for it.
    pub fn client(self: &Rc<Self>) -> grain_api::Client {
        capnp_rpc::new_client_from_rc(self.clone())
    }
}

/// A network capability, saveable or not.
pub fn network(token: Option<Vec<u8>>) -> capnp::capability::Client {
    let saveable = token.is_some();
    let n = FakeNetwork { token };
    if saveable {
        capnp_rpc::new_client::<persistent_ip_network::Client, _>(n).client
    } else {
        capnp_rpc::new_client::<ip_network::Client, _>(n).client
    }
}

impl grain_api::Server for FakeApi {
    async fn request(
        self: Rc<Self>,
        params: grain_api::RequestParams,
        mut results: grain_api::RequestResults,
    ) -> Result<(), Error> {
        let label = params.get()?.get_label()?.to_string()?;
        self.requests.borrow_mut().push(label);
        let token = self.can_save.then(|| {
            let t = format!("token-{}", self.issued.borrow().len()).into_bytes();
            self.issued.borrow_mut().push(t.clone());
            t
        });
        let mut r = results.get();
        r.reborrow()
            .get_cap()
            .set_as_capability(network(token).hook);
        r.set_grant_id("grant-fake");
        Ok(())
    }

    async fn restore(
        self: Rc<Self>,
        params: grain_api::RestoreParams,
        mut results: grain_api::RestoreResults,
    ) -> Result<(), Error> {
        let token = params.get()?.get_token()?.to_vec();
        if !self.issued.borrow().contains(&token) {
            return Err(Error::failed("failed: unknown token".into()));
        }
        self.restores.set(self.restores.get() + 1);
        results
            .get()
            .get_cap()
            .set_as_capability(network(Some(token)).hook);
        Ok(())
    }
}
