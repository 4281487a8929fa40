//! The `Driver` trait: the protocol part a plugin implements.
//!
//! driver-api serves the ip.capnp objects (IpNetwork, IpRemoteHost, TcpPort, IpInterface,
//! ByteStream, Handle) once, generically, and calls into the driver only where protocols
//! differ: how to open an outbound connection and how to accept inbound ones. Policy checks,
//! limits, accounting, audit events and revocation happen around those calls, so a driver
//! cannot forget them.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::rc::Rc;

use futures::future::LocalBoxFuture;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::context::{ConnectContext, ListenContext};
use crate::host::DriverHost;
use crate::manifest::Manifest;
use crate::udp::{Datagram, UdpBindContext};

/// A bidirectional byte stream: a socket, a TLS session, or one end of an in-memory pipe
/// whose other end a protocol mediator serves.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + 'static> Stream for T {}

/// A boxed [`Stream`].
pub type BoxStream = Box<dyn Stream>;

/// An established connection, outbound or accepted.
pub struct Connection {
    /// The bytes of the connection.
    pub stream: BoxStream,
    /// The remote end as the audit log should name it, such as `93.184.216.34:443`.
    pub peer: String,
}

impl Connection {
    /// Wraps a stream and names its peer.
    pub fn new(stream: impl Stream, peer: impl Into<String>) -> Self {
        Self {
            stream: Box::new(stream),
            peer: peer.into(),
        }
    }
}

/// A source of inbound connections returned by [`Driver::listen`].
pub trait Listener {
    /// Waits for the next connection.
    fn accept(&mut self) -> LocalBoxFuture<'_, io::Result<Connection>>;

    /// The local addresses listened on, for the audit log.
    fn local_addrs(&self) -> Vec<SocketAddr>;
}

/// Why a driver operation failed. Each variant becomes a Cap'n Proto error whose message
/// starts with a stable word (`refused:`, `not found:`, `limit:`, `unsupported:`,
/// `failed:`), so grains can tell the cases apart.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// The egress policy forbids it.
    #[error("refused: {what} is not allowed by the policy (rule: {rule})")]
    Refused {
        /// What was refused, such as `connect to 10.0.0.1:22`.
        what: String,
        /// The deciding rule.
        rule: String,
    },
    /// The host name does not exist (or every address it has is forbidden).
    #[error("not found: host {0} does not exist")]
    NotFound(String),
    /// A per-grant limit was hit.
    #[error("limit: {0}")]
    Limit(String),
    /// The driver does not offer this operation.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// The driver's options are invalid.
    #[error("invalid driver options: {0}")]
    Options(String),
    /// A network or protocol failure.
    #[error("failed: {what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The I/O error.
        source: io::Error,
    },
    /// Any other failure, with a message for the grain.
    #[error("failed: {0}")]
    Other(String),
}

impl DriverError {
    /// An I/O failure while doing `what`.
    pub fn io(what: impl Into<String>, source: io::Error) -> Self {
        Self::Io {
            what: what.into(),
            source,
        }
    }
}

impl From<DriverError> for capnp::Error {
    fn from(e: DriverError) -> Self {
        match e {
            DriverError::Io { .. } => capnp::Error::disconnected(e.to_string()),
            DriverError::Unsupported(_) => capnp::Error::unimplemented(e.to_string()),
            DriverError::Limit(_) => capnp::Error::overloaded(e.to_string()),
            _ => capnp::Error::failed(e.to_string()),
        }
    }
}

/// A network driver plugin. Implement it, then export it with
/// [`export_driver!`](crate::export_driver).
///
/// All methods run on the plugin's single RPC thread (a current-thread tokio runtime in a
/// `LocalSet`): futures need not be `Send`, and `tokio::task::spawn_local` works.
pub trait Driver: Sized + 'static {
    /// The driver's own settings, parsed from the administrator's
    /// `[drivers.NAME.options]` table (minus the standard keys driver-api handles itself,
    /// see [`crate::host::StandardOptions`]). Use `#[serde(deny_unknown_fields)]` so typos
    /// are reported.
    type Options: DeserializeOwned + Default;

    /// The manifest: name, version, interfaces provided, privileges needed. Must be
    /// deterministic; it is read before the driver starts, in a sandboxed helper.
    fn manifest() -> Manifest;

    /// Creates the driver from its options. Called once, before any grant is opened.
    fn start(options: Self::Options, host: &DriverHost) -> Result<Self, DriverError>;

    /// Opens an outbound TCP connection for a grain.
    ///
    /// driver-api has already checked the grant is live, the connection limits and the
    /// name-level policy. The default implementation is plain TCP:
    /// [`ConnectContext::dial`] resolves the target once, vets every address against the
    /// policy and connects to a vetted one, then wraps it in TLS when the grant asks for it.
    /// A protocol driver (SMTP, HTTP) returns a mediated stream instead.
    fn connect(
        self: Rc<Self>,
        cx: ConnectContext,
    ) -> impl Future<Output = Result<Connection, DriverError>> + 'static {
        async move {
            let stream = cx.dial().await?;
            cx.finish_outbound(stream).await
        }
    }

    /// Starts listening for a grain's `IpInterface.listenTcp`.
    ///
    /// driver-api has already checked the grant, the inbound policy for the port and the
    /// listener limit. The default binds the port on every configured listen address and
    /// hands out accepted sockets as they are.
    fn listen(
        self: Rc<Self>,
        cx: ListenContext,
    ) -> impl Future<Output = Result<Box<dyn Listener>, DriverError>> + 'static {
        async move {
            cx.bind_tcp()
                .await
                .map(|l| Box::new(l) as Box<dyn Listener>)
        }
    }

    /// Opens the local socket of a new outbound UDP mapping (one per grant, `returnPort`
    /// and address family; see [`crate::udp`]).
    ///
    /// driver-api has already checked the grant, the outbound policy for the destination
    /// and the datagram limits. The default binds an ephemeral port on the unspecified
    /// address of the family.
    fn bind_udp(
        self: Rc<Self>,
        cx: UdpBindContext,
    ) -> impl Future<Output = Result<tokio::net::UdpSocket, DriverError>> + 'static {
        async move { cx.bind_ephemeral().await }
    }

    /// Opens the sockets of a grain's `IpInterface.listenUdp`.
    ///
    /// driver-api has already checked the grant, the inbound policy for the port and the
    /// listener limit. The default binds the port on every configured listen address.
    fn listen_udp(
        self: Rc<Self>,
        cx: ListenContext,
    ) -> impl Future<Output = Result<Vec<tokio::net::UdpSocket>, DriverError>> + 'static {
        async move { cx.bind_udp().await }
    }

    /// Inspects one datagram after the policy and the limits admitted it: outbound before
    /// it is sent, inbound before it is delivered to the grain. An error refuses it (an
    /// outbound send fails with the error; an inbound datagram is dropped); both are
    /// audited. The default admits everything.
    fn inspect_datagram(&self, datagram: &Datagram<'_>) -> Result<(), DriverError> {
        let _ = datagram;
        Ok(())
    }
}

/// Options type for drivers that have no options of their own (unknown keys are errors).
#[derive(Clone, Copy, Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoOptions {}
