//! Listeners: a grain's `IpInterface.listenTcp` on the driver side.
//!
//! The accept loop hands every accepted connection to the grain's `TcpPort.connect`. The
//! returned `Handle` owns the listener: releasing it (or revoking the grant) stops the
//! accept loop and closes the listening sockets at once. Connections already accepted stay
//! open until either side closes them, or the grant is revoked.

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::rc::Rc;

use capnet_schemas::ip_capnp::tcp_port;
use capnet_schemas::util_capnp::{byte_stream, handle};
use tokio::task::AbortHandle;

use crate::conn::ConnShared;
use crate::driver::Listener;
use crate::events::{Event, EventKind};
use crate::grant::GrantState;
use crate::limits::ListenerPermit;

pub(crate) struct ListenerShared {
    grant: Rc<GrantState>,
    port: u16,
    addrs: Vec<SocketAddr>,
    task: RefCell<Option<AbortHandle>>,
    stopped: Cell<bool>,
    permit: RefCell<Option<ListenerPermit>>,
}

impl ListenerShared {
    /// Starts accepting on `listener`, delivering connections to `port`.
    pub(crate) fn start(
        grant: Rc<GrantState>,
        port_num: u16,
        mut listener: Box<dyn Listener>,
        port: tcp_port::Client,
        permit: ListenerPermit,
    ) -> Rc<Self> {
        let addrs = listener.local_addrs();
        grant.open_listeners.set(grant.open_listeners.get() + 1);
        let hs = &grant.host.state;
        hs.open_listeners.set(hs.open_listeners.get() + 1);
        let g = grant.clone();
        let task = tokio::task::spawn_local(async move {
            loop {
                let conn = match listener.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(grant = %g.id, port = port_num, error = %e, "accept failed");
                        // Out of descriptors and similar: back off instead of spinning.
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                };
                if g.is_revoked() {
                    return;
                }
                let permit = match g.admit_connection() {
                    Ok(p) => p,
                    Err(e) => {
                        g.host.report(
                            Event::new(&g.id, EventKind::LimitHit, conn.peer.clone()).detail(
                                format!("inbound connection on port {port_num} dropped: {e}"),
                            ),
                        );
                        continue;
                    }
                };
                let shared = ConnShared::new(conn, g.clone(), permit);
                let port = port.clone();
                tokio::task::spawn_local(async move {
                    let downstream: byte_stream::Client =
                        capnp_rpc::new_client(shared.writer_stream());
                    let mut req = port.connect_request();
                    req.get().set_downstream(downstream);
                    let upstream = match req.send().promise.await {
                        Ok(resp) => resp.get().and_then(|r| r.get_upstream()),
                        Err(e) => Err(e),
                    };
                    match upstream {
                        Ok(up) => shared.start_pump(up),
                        Err(e) => {
                            shared.kill(&format!("the grain did not take the connection: {e}"))
                        }
                    }
                });
            }
        });
        let shared = Rc::new(Self {
            grant: grant.clone(),
            port: port_num,
            addrs,
            task: RefCell::new(Some(task.abort_handle())),
            stopped: Cell::new(false),
            permit: RefCell::new(Some(permit)),
        });
        grant.register_listener(&shared);
        grant.host.report(
            Event::new(&grant.id, EventKind::ListenStarted, shared.describe())
                .detail(format!("listening on port {port_num}")),
        );
        shared
    }

    fn describe(&self) -> String {
        if self.addrs.is_empty() {
            format!("port {}", self.port)
        } else {
            self.addrs
                .iter()
                .map(|a| a.to_string())
                .collect::<Vec<_>>()
                .join(",")
        }
    }

    /// Stops accepting and closes the listening sockets.
    pub(crate) fn stop(&self, why: &str) {
        if self.stopped.replace(true) {
            return;
        }
        if let Some(t) = self.task.borrow_mut().take() {
            t.abort();
        }
        self.permit.borrow_mut().take();
        let g = &self.grant;
        g.open_listeners
            .set(g.open_listeners.get().saturating_sub(1));
        let hs = &g.host.state;
        hs.open_listeners
            .set(hs.open_listeners.get().saturating_sub(1));
        g.host.report(
            Event::new(&g.id, EventKind::ListenStopped, self.describe()).detail(why.to_string()),
        );
    }
}

impl Drop for ListenerShared {
    fn drop(&mut self) {
        self.stop("the handle was released");
    }
}

/// The `Handle` returned by `listenTcp`: the listener lives exactly as long as it.
pub(crate) struct ListenHandleImpl {
    pub(crate) listener: Rc<ListenerShared>,
}

impl handle::Server for ListenHandleImpl {
    fn ping(
        self: Rc<Self>,
        _: handle::PingParams,
        _: handle::PingResults,
    ) -> impl std::future::Future<Output = Result<(), capnp::Error>> + 'static {
        let l = &self.listener;
        let r = if l.stopped.get() {
            l.grant.check_live().and(Err(capnp::Error::disconnected(
                "the listener was stopped".into(),
            )))
        } else {
            Ok(())
        };
        std::future::ready(r)
    }
}
