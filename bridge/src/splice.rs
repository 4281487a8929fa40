//! Joining a client's socket to a capability connection.
//!
//! Client → network: [`pump`] reads the client in `CHUNK_BYTES` pieces and sends each as
//! one streaming `ByteStream.write` (one copy, into the request message). At end of file it
//! calls `done()`, which half-closes the remote side. If reading the client fails (a reset)
//! the upstream stream is released without `done()`, which aborts the remote connection.
//!
//! Network → client: the downstream `ByteStream` is a [`WriterStream`] writing straight into
//! the client's socket; a `write` returns once the socket took the bytes, which is the
//! backpressure the driver waits for. `done()` half-closes the client; a failed write (the
//! client went away) fails the call, and the driver then closes the remote connection.
//!
//! The downstream writer is created *pending* and handed its socket only after the proxy
//! answered the client (SOCKS reply, `200 Connection established`), so that bytes the
//! server sends first (a banner) never overtake the proxy's reply.

use capnet_schemas::bytestream::{WriterStream, pump};
use capnet_schemas::util_capnp::byte_stream;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::oneshot;

use crate::refusal::Refusal;
use crate::router::Router;
use crate::target::Target;

/// A capability connection whose client side is not attached yet.
pub struct Opened<W: AsyncWrite + Unpin + 'static> {
    /// Where to write what the client sends.
    pub upstream: byte_stream::Client,
    /// Hands the downstream writer its destination.
    attach: oneshot::Sender<Result<W, String>>,
    /// The grant that carries it (for logs).
    pub grant: String,
}

/// Opens a connection to `t` through `router`. The result waits for [`Opened::run`].
pub async fn open<W: AsyncWrite + Unpin + 'static>(
    router: &Router,
    t: &Target,
) -> Result<Opened<W>, Refusal> {
    let (writer, attach) = WriterStream::<W>::pending();
    let downstream: byte_stream::Client = capnp_rpc::new_client(writer);
    let (upstream, grant) = router.connect(t, &downstream).await?;
    Ok(Opened {
        upstream,
        attach,
        grant,
    })
}

/// How the client → network direction of a spliced connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// The client half-closed; `done()` was passed on. Carries the bytes sent.
    HalfClosed(u64),
    /// The client reset the connection; the remote connection was aborted.
    ClientFailed(u64),
    /// The remote side or the capability failed.
    UpstreamFailed(u64),
}

impl<W: AsyncWrite + Unpin + 'static> Opened<W> {
    /// Attaches the client: `writer` receives what the remote end sends, `reader` is
    /// copied to the remote end. Returns when the client → network direction has ended
    /// (the other direction goes on inside the downstream stream until the driver ends
    /// it).
    pub async fn run<R: AsyncRead + Unpin>(self, reader: R, writer: W) -> Ended {
        if self.attach.send(Ok(writer)).is_err() {
            // The driver already released the downstream stream: the connection is gone.
            return Ended::UpstreamFailed(0);
        }
        match pump(reader, self.upstream, |_| ()).await {
            Ok(n) => Ended::HalfClosed(n),
            Err(capnet_schemas::bytestream::PumpError::Read { bytes, .. }) => {
                Ended::ClientFailed(bytes)
            }
            Err(capnet_schemas::bytestream::PumpError::Sink { bytes, .. }) => {
                Ended::UpstreamFailed(bytes)
            }
        }
    }

    /// Gives up on the connection without attaching a client: the upstream stream is
    /// released without `done()`, which aborts the remote connection.
    pub fn abort(self, why: &str) {
        let _ = self.attach.send(Err(why.to_string()));
    }
}
