//! Serving the `Driver` capability on the socket the host hands over.

use std::os::fd::OwnedFd;

use capnet_schemas::driver_capnp::driver;
use capnet_schemas::rpc::two_party;
use capnp_rpc::rpc_twoparty_capnp::Side;

use crate::driver::Driver;
use crate::servers::DriverImpl;

/// Serving failed.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The runtime or the socket could not be set up.
    #[error("setting up the driver runtime failed: {0}")]
    Setup(#[from] std::io::Error),
    /// The RPC connection failed.
    #[error("the connection to the supervisor failed: {0}")]
    Rpc(#[from] capnp::Error),
}

/// Runs driver `D` on `fd` until the supervisor disconnects.
pub(crate) fn run<D: Driver>(fd: OwnedFd) -> Result<(), ServeError> {
    init_logging();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, async move {
        let std_stream = std::os::unix::net::UnixStream::from(fd);
        std_stream.set_nonblocking(true)?;
        let stream = tokio::net::UnixStream::from_std(std_stream)?;
        let client: driver::Client = capnp_rpc::new_client(DriverImpl::<D>::new());
        let rpc = two_party(stream, Side::Server, Some(client.client));
        rpc.await?;
        Ok(())
    })
}

/// Logs go to stderr, which the driver host forwards to the supervisor's driver log.
/// `CAPNET_LOG` sets the filter (default `info`).
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CAPNET_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .try_init();
}
