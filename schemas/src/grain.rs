//! The grain side of capnet: reach the grain API on fd 3 and ask for capabilities.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use capnet_schemas::descriptor::{Encryption, Requested};
//! use capnet_schemas::ip_capnp::ip_network;
//! // Inside a tokio LocalSet:
//! let api = capnet_schemas::grain::connect()?;
//! let granted = capnet_schemas::grain::request(
//!     &api,
//!     &Requested::IpNetwork { encryption: Encryption::None },
//!     "fetch feeds",
//! )
//! .await?;
//! let network: ip_network::Client = granted.cast();
//! # Ok(()) }
//! ```

use std::os::fd::{FromRawFd, OwnedFd};

use capnp_rpc::rpc_twoparty_capnp::Side;

use crate::descriptor::{self, Requested};
use crate::grain_capnp::grain_api;
use crate::rpc::two_party;

/// The descriptor number the grain API is on.
pub const API_FD: i32 = 3;

/// Reaching the grain API failed.
#[derive(Debug, thiserror::Error)]
pub enum GrainConnectError {
    /// fd 3 is not open: the program was not started as a capnet grain.
    #[error("fd 3 is not open: this program must run as a capnet grain (capnet grain start)")]
    NotAGrain,
    /// Setting up the connection failed.
    #[error("cannot use fd 3: {0}")]
    Io(#[from] std::io::Error),
}

/// Connects to the grain API on fd 3. Call once per process, inside a tokio `LocalSet`.
pub fn connect() -> Result<grain_api::Client, GrainConnectError> {
    // /proc/self/fd tells whether fd 3 is open before we take ownership of it.
    if std::fs::metadata(format!("/proc/self/fd/{API_FD}")).is_err() {
        return Err(GrainConnectError::NotAGrain);
    }
    take_fd3()
}

fn take_fd3() -> Result<grain_api::Client, GrainConnectError> {
    static TAKEN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if TAKEN.swap(true, std::sync::atomic::Ordering::SeqCst) {
        return Err(GrainConnectError::Io(std::io::Error::other(
            "the grain API on fd 3 was already taken by this process",
        )));
    }
    // SAFETY: fd 3 is open (checked by the caller) and, by the grain contract, is the
    // grain API socket owned by this process; the TAKEN flag ensures ownership is taken
    // only once.
    let fd = unsafe { OwnedFd::from_raw_fd(API_FD) };
    let std_stream = std::os::unix::net::UnixStream::from(fd);
    std_stream.set_nonblocking(true)?;
    let stream = tokio::net::UnixStream::from_std(std_stream)?;
    let mut rpc = two_party(stream, Side::Client, None);
    let api: grain_api::Client = rpc.bootstrap(Side::Server);
    tokio::task::spawn_local(async move {
        let _ = rpc.await;
    });
    Ok(api)
}

/// A granted capability.
pub struct Granted {
    /// The capability; cast it to the requested interface.
    pub cap: capnp::capability::Client,
    /// The grant's id (what the administrator sees).
    pub grant_id: String,
}

impl Granted {
    /// The capability as the interface that was requested.
    pub fn cast<T: capnp::capability::FromClientHook>(&self) -> T {
        capnp::capability::FromClientHook::new(self.cap.hook.add_ref())
    }
}

/// Asks the administrator for a capability and waits for the answer. A denial or an
/// expired request fails with the administrator's reason.
pub async fn request(
    api: &grain_api::Client,
    what: &Requested,
    label: &str,
) -> Result<Granted, capnp::Error> {
    let mut req = api.request_request();
    descriptor::build(req.get().init_descriptor(), what);
    req.get().set_label(label);
    let resp = req.send().promise.await?;
    let r = resp.get()?;
    Ok(Granted {
        cap: r.get_cap().get_as_capability()?,
        grant_id: r.get_grant_id()?.to_string()?,
    })
}
