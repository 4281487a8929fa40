//! # capnet driver API
//!
//! The stable API for writing capnet network driver plugins. A driver is a `cdylib` that
//! an administrator approves; capnet loads it inside a sandboxed driver host process and
//! exposes what it serves to grains as Sandstorm's `ip.capnp` capabilities. This crate is
//! an API boundary: everything a plugin needs is here, and the only binary contract with
//! the host is the small C ABI in [`abi`].
//!
//! ## What you write and what you get
//!
//! You implement the protocol part, as the [`Driver`] trait: how to open an outbound
//! connection ([`Driver::connect`]) and how to listen ([`Driver::listen`]), both with
//! defaults that do plain TCP, and for UDP how to open a mapping's socket
//! ([`Driver::bind_udp`]), how to listen ([`Driver::listen_udp`]) and which datagrams to
//! let through ([`Driver::inspect_datagram`]), with defaults that do plain UDP. A pure
//! TCP or UDP driver is a manifest and nothing else. A protocol driver (SMTP, HTTP)
//! returns from `connect` a stream it mediates, such as one end of a
//! `tokio::io::duplex` whose other end its protocol task serves, and uses
//! [`ConnectContext::dial`] or [`ConnectContext::dial_host`] for the real connection.
//!
//! The crate gives you, generically and once for every driver:
//! * the ABI exports and the Cap'n Proto plumbing ([`export_driver!`]);
//! * the `IpNetwork`, `IpRemoteHost`, `TcpPort`, `UdpPort`, `IpInterface`, `ByteStream`
//!   and `Handle` server objects, with flow control, half-close and clean teardown, and
//!   NAT-like UDP mappings per return port ([`udp`]);
//! * the egress policy (deny by default all but public unicast; the administrator's rules
//!   and the grant's narrowing), name resolution that vets every address
//!   ([`ConnectContext::dial`]);
//! * per-grant limits, byte accounting, audit events ([`events`]) and live revocation.
//!
//! ## Walkthrough: a driver in five steps
//!
//! 1. Create a library crate with `crate-type = ["cdylib", "rlib"]` that depends on
//!    `capnet-driver-api`.
//! 2. Define your options type. It is parsed from the administrator's
//!    `[drivers.NAME.options]` table; unknown keys should be errors:
//!    ```
//!    #[derive(serde::Deserialize, Default)]
//!    #[serde(deny_unknown_fields)]
//!    struct Options {
//!        /// Refuse connections to ports above this one.
//!        #[serde(default)]
//!        max_port: Option<u16>,
//!    }
//!    ```
//! 3. Implement [`Driver`]. `manifest()` says who you are and which privileges you need;
//!    the administrator approves exactly these, and the host never grants more.
//!    ```
//!    use std::rc::Rc;
//!    use capnet_driver_api::{
//!        ConnectContext, Connection, Driver, DriverError, DriverHost, Manifest, Privileges,
//!        Provided,
//!    };
//!    # #[derive(serde::Deserialize, Default)] struct Options { max_port: Option<u16> }
//!
//!    struct PortCapped { max_port: u16 }
//!
//!    impl Driver for PortCapped {
//!        type Options = Options;
//!
//!        fn manifest() -> Manifest {
//!            Manifest {
//!                name: "port-capped".into(),
//!                version: "0.1.0".into(),
//!                description: "TCP, but only to low-numbered ports".into(),
//!                author: "Example Author".into(),
//!                provides: vec![Provided {
//!                    interface_id: capnet_schemas::ids::IP_NETWORK,
//!                    name: "IpNetwork".into(),
//!                    protocols: vec!["tcp".into()],
//!                }],
//!                privileges: Privileges { outbound_tcp: true, dns: true, ..Default::default() },
//!            }
//!        }
//!
//!        fn start(options: Options, _host: &DriverHost) -> Result<Self, DriverError> {
//!            Ok(Self { max_port: options.max_port.unwrap_or(1024) })
//!        }
//!
//!        // The protocol part. Policy, limits and the grant's liveness were checked before
//!        // this runs; `dial` resolves once and connects only to a vetted address.
//!        async fn connect(self: Rc<Self>, cx: ConnectContext) -> Result<Connection, DriverError> {
//!            if cx.target().port > self.max_port {
//!                return Err(DriverError::Refused {
//!                    what: format!("connect to {}", cx.target()),
//!                    rule: format!("port-capped: ports above {}", self.max_port),
//!                });
//!            }
//!            let socket = cx.dial().await?;
//!            cx.finish_outbound(socket).await
//!        }
//!    }
//!    ```
//! 4. Export it: `capnet_driver_api::export_driver!(PortCapped);`
//! 5. Test it in-process with [`testing::Harness`], which runs your driver over an
//!    in-memory connection exactly as the supervisor would, then `cargo build --release`
//!    and give the `.so` to your administrator (`capnet driver inspect` shows them what
//!    you asked for).
//!
//! ## Rules for plugin code
//! * Everything runs on one thread (a current-thread tokio runtime inside a `LocalSet`):
//!   use `Rc`, `RefCell` and `tokio::task::spawn_local`; never block the thread.
//! * A panic ends the whole driver host process (it is caught at the ABI boundary, never
//!   unwinds into the host); the supervisor restarts it and grains restore their
//!   capabilities. Return [`DriverError`] for anything a grain or the network can cause.
//! * Errors reach grains as Cap'n Proto exceptions whose message starts with a stable word:
//!   `refused:`, `not found:`, `limit:`, `revoked:`, `unsupported:` or `failed:`.
//! * After loading, the host forbids `exec` and opening files for writing; read what you
//!   need in `start`.

#![warn(missing_docs)]

pub mod abi;
mod conn;
mod context;
mod driver;
pub mod events;
mod grant;
mod host;
pub mod limits;
mod listen;
pub mod manifest;
pub mod policy;
pub mod resolve;
mod serve;
mod servers;
mod sys;
pub mod testing;
pub mod tls;
pub mod udp;

pub use capnet_schemas;
pub use context::{CONNECT_TIMEOUT, ConnectContext, HostSpec, ListenContext, Target, TcpListeners};
pub use driver::{BoxStream, Connection, Driver, DriverError, Listener, NoOptions, Stream};
pub use events::{Event, EventKind};
pub use host::{DriverHost, STANDARD_OPTION_KEYS, StandardOptions, split_options};
pub use limits::Limits;
pub use manifest::{Manifest, Privileges, Provided};
pub use serve::ServeError;
pub use udp::{Datagram, UdpBindContext};
