//! capnet-bridge: lets unmodified programs inside a grain use the grain's granted
//! capabilities through the socket API.
//!
//! The bridge runs inside the grain. It takes the grain API on fd 3, sets up its grants
//! (restoring saved tokens or asking the powerbox, see [`setup`]), and listens on the
//! grain's own loopback:
//! * a SOCKS5 proxy ([`socks`], [`udp`]; default `127.0.0.1:1080`): CONNECT to names,
//!   IPv4 and IPv6 addresses, and UDP ASSOCIATE;
//! * an HTTP proxy ([`http`]; default `127.0.0.1:3128`): CONNECT tunnels and absolute-form
//!   `http://` requests with keep-alive.
//!
//! Every connection is mapped onto the most specific grant that reaches it ([`router`]): a
//! name goes to `IpNetwork.getRemoteHostByName` (the driver resolves it under its policy),
//! an address to `getRemoteHost`, a narrow `TcpPort` grant serves exactly its host and
//! port. Bytes flow as `ByteStream` writes both ways ([`splice`]) with half-close and abort
//! propagated. Refusals become SOCKS5 reply codes and HTTP statuses ([`refusal`]).
//!
//! As a wrapper (`capnet-bridge [options] -- app args…`) it then starts the app with
//! `ALL_PROXY`, `HTTP_PROXY`, `HTTPS_PROXY` and `NO_PROXY` set ([`app`]) and ends with its
//! status; without an app it serves until SIGTERM or SIGINT.
//!
//! Invariants: the bridge never opens a network connection of its own (it has no
//! network but loopback, and only accepts on it); it never resolves a name; all of its
//! Cap'n Proto objects live on one thread.

pub mod app;
pub mod http;
pub mod refusal;
pub mod router;
pub mod setup;
pub mod socks;
pub mod splice;
mod sys;
pub mod target;
#[cfg(test)]
mod testing;
#[cfg(test)]
mod tests;
pub mod udp;

use std::cell::Cell;
use std::ffi::OsString;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use capnet_schemas::grain_capnp::grain_api;
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::refusal::Refusal;
use crate::router::Router;
use crate::setup::{GrantSpec, StateFile};

/// Exit codes of `capnet-bridge` (in wrapper mode, the app's own status is returned
/// instead once the app has started).
pub mod exit {
    /// Bad arguments or config (EX_USAGE).
    pub const USAGE: i32 = 64;
    /// No grain API on fd 3: not started as a capnet grain (EX_UNAVAILABLE).
    pub const NOT_A_GRAIN: i32 = 69;
    /// A listener or the app could not be started (EX_OSERR).
    pub const OS: i32 = 71;
}

/// Clients served at once per proxy; further clients wait in the listen backlog.
pub const MAX_CLIENTS: usize = 4096;

/// What the bridge runs with.
#[derive(Debug, Clone)]
pub struct Settings {
    /// SOCKS5 listen address (`None`: no SOCKS proxy).
    pub socks: Option<SocketAddr>,
    /// HTTP proxy listen address (`None`: no HTTP proxy).
    pub http: Option<SocketAddr>,
    /// The state file for saved tokens (`None`: tokens are kept in memory only).
    pub state: Option<PathBuf>,
    /// The grants to use.
    pub grants: Vec<GrantSpec>,
    /// The app to start (wrapper mode), or empty.
    pub app: Vec<OsString>,
}

/// Running the bridge failed.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// No grain API.
    #[error(transparent)]
    NotAGrain(#[from] capnet_schemas::grain::GrainConnectError),
    /// A listener could not be bound.
    #[error("cannot listen for {what} on {addr}: {source}")]
    Listen {
        /// SOCKS5 or HTTP.
        what: &'static str,
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The app could not be run.
    #[error(transparent)]
    App(#[from] app::AppError),
}

impl RunError {
    /// The exit code for this error.
    pub fn exit_code(&self) -> i32 {
        match self {
            RunError::NotAGrain(_) => exit::NOT_A_GRAIN,
            RunError::Listen { .. } | RunError::App(_) => exit::OS,
        }
    }
}

/// State shared by every proxy connection.
pub struct Bridge {
    /// Where connections go.
    pub router: Router,
    clients: Arc<Semaphore>,
    aborts: Cell<u64>,
}

impl Bridge {
    /// A bridge over `router`.
    pub fn new(router: Router) -> Rc<Self> {
        Rc::new(Self {
            router,
            clients: Arc::new(Semaphore::new(MAX_CLIENTS)),
            aborts: Cell::new(0),
        })
    }

    /// Waits for room for one more client.
    pub async fn client_permit(&self) -> Option<OwnedSemaphorePermit> {
        self.clients.clone().acquire_owned().await.ok()
    }

    /// Counts a connection the client reset (the remote side was aborted).
    pub fn note_abort(&self) {
        self.aborts.set(self.aborts.get() + 1);
    }

    /// Connections the clients reset so far.
    pub fn aborts(&self) -> u64 {
        self.aborts.get()
    }
}

/// Logs a refusal to the bridge's stderr (the grain's log). Policy refusals are also
/// audited by the driver; a missing grant is known only to the bridge, so this line is its
/// only record.
pub fn log_refusal(proto: &str, client: SocketAddr, destination: &str, r: &Refusal) {
    tracing::warn!(
        target: "capnet_bridge::refusal",
        proto,
        %client,
        destination,
        class = r.class(),
        "refused: {r}"
    );
}

/// Backs off briefly after a failed `accept` (out of descriptors, for example) so the
/// loop does not spin.
async fn accept_failed(what: &str, e: std::io::Error) {
    tracing::warn!(target: "capnet_bridge", "accepting a {what} client failed: {e}");
    tokio::time::sleep(Duration::from_millis(100)).await;
}

/// Proxies listening on their addresses.
pub struct Listening {
    /// The SOCKS5 address, if any.
    pub socks: Option<SocketAddr>,
    /// The HTTP address, if any.
    pub http: Option<SocketAddr>,
    _tasks: Vec<TaskGuard>,
}

/// Aborts a task when dropped.
struct TaskGuard(tokio::task::JoinHandle<()>);

impl Drop for TaskGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Binds the listeners and serves `bridge` on them (inside a `LocalSet`) until the
/// returned value is dropped.
pub async fn listen(
    bridge: &Rc<Bridge>,
    socks: Option<SocketAddr>,
    http: Option<SocketAddr>,
) -> Result<Listening, RunError> {
    let mut tasks = Vec::new();
    let bind = async |what: &'static str, addr: Option<SocketAddr>| {
        let Some(addr) = addr else {
            return Ok(None);
        };
        let l = TcpListener::bind(addr)
            .await
            .map_err(|source| RunError::Listen { what, addr, source })?;
        let local = l
            .local_addr()
            .map_err(|source| RunError::Listen { what, addr, source })?;
        Ok::<_, RunError>(Some((l, local)))
    };
    let socks = bind("SOCKS5", socks).await?;
    let http = bind("HTTP", http).await?;
    let mut out = Listening {
        socks: None,
        http: None,
        _tasks: Vec::new(),
    };
    if let Some((l, a)) = socks {
        tasks.push(TaskGuard(tokio::task::spawn_local(socks::serve(
            l,
            bridge.clone(),
        ))));
        out.socks = Some(a);
    }
    if let Some((l, a)) = http {
        tasks.push(TaskGuard(tokio::task::spawn_local(http::serve(
            l,
            bridge.clone(),
        ))));
        out.http = Some(a);
    }
    out._tasks = tasks;
    Ok(out)
}

/// Runs the bridge on the grain API `api` (inside a `LocalSet`): sets up the grants,
/// listens, then runs the app (returning its exit code) or waits for `shutdown`
/// (returning 0).
pub async fn run_with(
    api: grain_api::Client,
    settings: Settings,
    shutdown: impl Future<Output = ()>,
) -> Result<i32, RunError> {
    let mut state = StateFile::load(settings.state.clone());
    let grants = setup::establish_all(&api, &settings.grants, &mut state).await;
    let names: Vec<String> = grants
        .iter()
        .map(|g| format!("{} [{}]", g.kind, g.name))
        .collect();
    let bridge = Bridge::new(Router::new(grants));
    let l = listen(&bridge, settings.socks, settings.http).await?;
    let show = |a: Option<SocketAddr>| a.map_or_else(|| "off".to_string(), |a| a.to_string());
    tracing::info!(
        target: "capnet_bridge",
        socks = %show(l.socks),
        http = %show(l.http),
        grants = %names.join(", "),
        "ready"
    );
    if names.is_empty() {
        tracing::warn!(target: "capnet_bridge", "no grant is usable: every connection will be refused");
    }
    if settings.app.is_empty() {
        shutdown.await;
        return Ok(0);
    }
    let env = app::proxy_env(l.socks, l.http);
    let code = app::run(&settings.app, &env).await?;
    tracing::debug!(target: "capnet_bridge", code, "the app ended");
    Ok(code)
}

/// Runs the bridge as a grain's process: marks fd 3 close-on-exec, connects to the grain
/// API, then [`run_with`].
pub async fn run(settings: Settings, shutdown: impl Future<Output = ()>) -> Result<i32, RunError> {
    if let Err(e) = sys::cloexec_grain_api() {
        tracing::warn!(target: "capnet_bridge", "cannot mark fd 3 close-on-exec: {e}");
    }
    let api = capnet_schemas::grain::connect()?;
    run_with(api, settings, shutdown).await
}
