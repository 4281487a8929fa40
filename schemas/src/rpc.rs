//! Two-party Cap'n Proto connections as every capnet process opens them.
//!
//! Reader limits are tightened for every peer that is not trusted (grains and drivers): a
//! message may not nest deeper than [`NESTING_LIMIT`] or traverse more than
//! [`TRAVERSAL_LIMIT_WORDS`] words. ByteStream writes are chunked far below that.

use capnp::message::ReaderOptions;
use capnp_rpc::{RpcSystem, rpc_twoparty_capnp::Side, twoparty};
use futures::AsyncReadExt;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::compat::{TokioAsyncReadCompatExt, TokioAsyncWriteCompatExt};

/// Largest message (in 8-byte words) accepted from an untrusted peer: 32 MiB.
pub const TRAVERSAL_LIMIT_WORDS: usize = 4 * 1024 * 1024;

/// Deepest pointer nesting accepted from an untrusted peer.
pub const NESTING_LIMIT: i32 = 32;

/// Flow-control window for streaming calls (`ByteStream.write`) on each connection. Large
/// enough to keep a loopback link busy, small enough to bound memory per stream.
pub const STREAM_WINDOW_BYTES: usize = 4 * 1024 * 1024;

/// Largest `ByteStream.write` payload capnet sends, and the read size of its pumps.
pub const CHUNK_BYTES: usize = 256 * 1024;

/// Reader options for connections from grains and drivers.
pub fn untrusted_reader_options() -> ReaderOptions {
    let mut options = ReaderOptions::new();
    options.traversal_limit_in_words(Some(TRAVERSAL_LIMIT_WORDS));
    options.nesting_limit(NESTING_LIMIT);
    options
}

/// Builds an RPC system over `stream`. `bootstrap` is what this side offers; the peer's
/// bootstrap is obtained with [`RpcSystem::bootstrap`]. Spawn the returned system on a
/// `LocalSet`; it resolves when the connection ends.
pub fn two_party<S>(
    stream: S,
    side: Side,
    bootstrap: Option<capnp::capability::Client>,
) -> RpcSystem<Side>
where
    S: AsyncRead + AsyncWrite + Unpin + 'static,
{
    let (reader, writer) = tokio::io::split(stream);
    let mut network = twoparty::VatNetwork::new(
        futures::io::BufReader::with_capacity(256 * 1024, reader.compat()),
        futures::io::BufWriter::with_capacity(256 * 1024, writer.compat_write()),
        side,
        untrusted_reader_options(),
    );
    network.set_window_size(STREAM_WINDOW_BYTES);
    RpcSystem::new(Box::new(network), bootstrap)
}

/// Like [`two_party`] for a stream that already implements the `futures` I/O traits.
pub fn two_party_futures<S>(
    stream: S,
    side: Side,
    bootstrap: Option<capnp::capability::Client>,
) -> RpcSystem<Side>
where
    S: futures::AsyncRead + futures::AsyncWrite + Unpin + 'static,
{
    let (reader, writer) = stream.split();
    let mut network = twoparty::VatNetwork::new(
        futures::io::BufReader::with_capacity(256 * 1024, reader),
        futures::io::BufWriter::with_capacity(256 * 1024, writer),
        side,
        untrusted_reader_options(),
    );
    network.set_window_size(STREAM_WINDOW_BYTES);
    RpcSystem::new(Box::new(network), bootstrap)
}
