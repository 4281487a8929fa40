//! Adapters between `ByteStream` capabilities and tokio I/O.
//!
//! * [`WriterStream`] serves `ByteStream` by writing into any `AsyncWrite` (a socket, one half
//!   of an in-memory pipe). `write` completes when the bytes are accepted by the writer, which
//!   is what carries backpressure back to the sender. `done` half-closes. Releasing it
//!   without `done` runs the abort hook, so the owner can tear the connection down.
//! * [`pump`] reads an `AsyncRead` and writes it into a `ByteStream` client with streaming
//!   calls, then calls `done` at end of file.
//! * [`connect`] and [`listener`] turn `TcpPort`s into ordinary duplex byte streams, for grains
//!   and tests.

use std::cell::RefCell;
use std::future::Future;
use std::rc::Rc;

use capnp::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream};
use tokio::sync::{mpsc, oneshot};

use crate::ip_capnp::tcp_port;
use crate::rpc::CHUNK_BYTES;
use crate::util_capnp::byte_stream;

enum WriterState<W> {
    /// The destination is not ready yet (a connection still being made); writes wait.
    Pending(oneshot::Receiver<Result<W, String>>),
    Ready(W),
    /// A write or `done` is in progress (calls on one stream are serialised by capnp-rpc).
    Busy,
    Done,
    Failed(String),
}

type AbortHook = Box<dyn FnOnce()>;

/// An asynchronous admission check run before each write with the write's size (a rate
/// limiter, for example).
pub type WriteGate = Rc<dyn Fn(usize) -> std::pin::Pin<Box<dyn Future<Output = ()>>>>;

/// A `ByteStream` server that writes into an `AsyncWrite`.
pub struct WriterStream<W: AsyncWrite + Unpin + 'static> {
    state: RefCell<WriterState<W>>,
    on_abort: RefCell<Option<AbortHook>>,
    gate: Option<WriteGate>,
}

impl<W: AsyncWrite + Unpin + 'static> WriterStream<W> {
    /// Serves `ByteStream` on top of `writer`.
    pub fn new(writer: W) -> Self {
        Self {
            state: RefCell::new(WriterState::Ready(writer)),
            on_abort: RefCell::new(None),
            gate: None,
        }
    }

    /// Serves `ByteStream` on a writer that arrives later: writes made before the sender
    /// fires wait for it (this is what lets a caller pipeline writes on a connection that is
    /// still being made). If the sender sends an error or is dropped, writes fail with it.
    pub fn pending() -> (Self, oneshot::Sender<Result<W, String>>) {
        let (tx, rx) = oneshot::channel();
        let s = Self {
            state: RefCell::new(WriterState::Pending(rx)),
            on_abort: RefCell::new(None),
            gate: None,
        };
        (s, tx)
    }

    /// Runs `hook` if the stream is released without `done()` (the sender gave up or
    /// disconnected), so the owner can abort the connection.
    pub fn on_abort(self, hook: impl FnOnce() + 'static) -> Self {
        *self.on_abort.borrow_mut() = Some(Box::new(hook));
        self
    }

    /// Runs `gate` before every write, with the write's size; the write waits for it.
    pub fn gate(mut self, gate: WriteGate) -> Self {
        self.gate = Some(gate);
        self
    }

    async fn take(&self) -> Result<W, Error> {
        let state = std::mem::replace(&mut *self.state.borrow_mut(), WriterState::Busy);
        match state {
            WriterState::Ready(w) => Ok(w),
            WriterState::Pending(rx) => match rx.await {
                Ok(Ok(w)) => Ok(w),
                Ok(Err(msg)) => {
                    *self.state.borrow_mut() = WriterState::Failed(msg.clone());
                    Err(Error::disconnected(msg))
                }
                Err(_) => {
                    let msg = "the connection was closed before it was established".to_string();
                    *self.state.borrow_mut() = WriterState::Failed(msg.clone());
                    Err(Error::disconnected(msg))
                }
            },
            WriterState::Busy => Err(Error::failed(
                "concurrent call on a ByteStream that is busy".into(),
            )),
            WriterState::Done => {
                *self.state.borrow_mut() = WriterState::Done;
                Err(Error::failed("write after done() on a ByteStream".into()))
            }
            WriterState::Failed(msg) => {
                *self.state.borrow_mut() = WriterState::Failed(msg.clone());
                Err(Error::disconnected(msg))
            }
        }
    }

    fn fail(&self, what: &str, e: std::io::Error) -> Error {
        let msg = format!("{what}: {e}");
        *self.state.borrow_mut() = WriterState::Failed(msg.clone());
        Error::disconnected(msg)
    }
}

impl<W: AsyncWrite + Unpin + 'static> Drop for WriterStream<W> {
    fn drop(&mut self) {
        let finished = matches!(
            *self.state.borrow(),
            WriterState::Done | WriterState::Failed(_)
        );
        if finished {
            return;
        }
        if let Some(hook) = self.on_abort.borrow_mut().take() {
            hook();
        }
        if let WriterState::Ready(w) = &mut *self.state.borrow_mut() {
            close_on_abort(w);
        }
    }
}

/// Closes what a [`WriterStream`] writes into when the stream is released without
/// `done()`: one non-blocking shutdown attempt, so that an in-memory pipe's reader sees the
/// end at once instead of waiting for a writer that will never write again.
fn close_on_abort<W: AsyncWrite + Unpin>(w: &mut W) {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    let _ = std::pin::Pin::new(w).poll_shutdown(&mut cx);
}

impl<W: AsyncWrite + Unpin + 'static> byte_stream::Server for WriterStream<W> {
    async fn write(self: Rc<Self>, params: byte_stream::WriteParams) -> Result<(), Error> {
        let data = params.get()?.get_data()?;
        if let Some(gate) = &self.gate {
            gate(data.len()).await;
        }
        let mut w = self.take().await?;
        match w.write_all(data).await {
            Ok(()) => {
                *self.state.borrow_mut() = WriterState::Ready(w);
                Ok(())
            }
            Err(e) => Err(self.fail("writing to the connection failed", e)),
        }
    }

    async fn done(
        self: Rc<Self>,
        _: byte_stream::DoneParams,
        _: byte_stream::DoneResults,
    ) -> Result<(), Error> {
        let mut w = self.take().await?;
        let r = async {
            w.flush().await?;
            w.shutdown().await
        }
        .await;
        match r {
            Ok(()) => {
                *self.state.borrow_mut() = WriterState::Done;
                Ok(())
            }
            Err(e) => Err(self.fail("closing the connection failed", e)),
        }
    }

    fn expect_size(
        self: Rc<Self>,
        _: byte_stream::ExpectSizeParams,
        _: byte_stream::ExpectSizeResults,
    ) -> impl Future<Output = Result<(), Error>> + 'static {
        std::future::ready(Ok(()))
    }
}

/// How a [`pump`] ended.
#[derive(Debug, thiserror::Error)]
pub enum PumpError {
    /// Reading the source failed.
    #[error("reading the source failed after {bytes} bytes: {source}")]
    Read {
        /// Bytes delivered before the failure.
        bytes: u64,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The receiving `ByteStream` failed or went away.
    #[error("the receiving stream failed after {bytes} bytes: {source}")]
    Sink {
        /// Bytes delivered before the failure.
        bytes: u64,
        /// The RPC error.
        source: Error,
    },
}

/// Builds a `write` request with room for `data` in its first segment, so large writes are
/// one contiguous allocation.
pub fn write_request(
    sink: &byte_stream::Client,
    data: &[u8],
) -> capnp::capability::StreamingRequest<byte_stream::write_params::Owned> {
    let words = data.len().div_ceil(8) as u64 + 8;
    let mut req = sink
        .client
        .new_streaming_call::<byte_stream::write_params::Owned>(
            crate::ids::BYTE_STREAM,
            0,
            Some(capnp::MessageSize {
                word_count: words,
                cap_count: 0,
            }),
        );
    req.get().set_data(data);
    req
}

/// Copies `reader` into `sink` until end of file, then calls `done()`. Returns the number of
/// bytes copied. `observe` sees every chunk's size (for accounting) before it is sent.
pub async fn pump<R>(
    mut reader: R,
    sink: byte_stream::Client,
    mut observe: impl FnMut(usize),
) -> Result<u64, PumpError>
where
    R: AsyncRead + Unpin,
{
    let mut buf = vec![0u8; CHUNK_BYTES];
    let mut total = 0u64;
    loop {
        let n = match reader.read(&mut buf).await {
            Ok(n) => n,
            Err(source) => {
                return Err(PumpError::Read {
                    bytes: total,
                    source,
                });
            }
        };
        if n == 0 {
            sink.done_request()
                .send()
                .promise
                .await
                .map_err(|source| PumpError::Sink {
                    bytes: total,
                    source,
                })?;
            return Ok(total);
        }
        observe(n);
        write_request(&sink, &buf[..n])
            .send()
            .await
            .map_err(|source| PumpError::Sink {
                bytes: total,
                source,
            })?;
        total += n as u64;
    }
}

/// Size of the in-memory pipe behind [`connect`] and [`listener`] streams.
const PIPE_BYTES: usize = 2 * CHUNK_BYTES;

/// Opens a connection through `port` and returns it as an ordinary byte stream: what is
/// written to it goes to `upstream`, what the remote end sends can be read from it, and
/// shutting down its write side calls `done()`. Must run inside a tokio `LocalSet`.
pub async fn connect(port: &tcp_port::Client) -> Result<DuplexStream, Error> {
    let (app_side, our_side) = tokio::io::duplex(PIPE_BYTES);
    let (our_read, our_write) = tokio::io::split(our_side);
    let downstream: byte_stream::Client = capnp_rpc::new_client(WriterStream::new(our_write));
    let mut req = port.connect_request();
    req.get().set_downstream(downstream);
    let response = req.send().promise.await?;
    let upstream = response.get()?.get_upstream()?;
    tokio::task::spawn_local(async move {
        let _ = pump(our_read, upstream, |_| ()).await;
    });
    Ok(app_side)
}

/// A `TcpPort` server for `IpInterface.listenTcp`: every incoming connection arrives on the
/// returned channel as an ordinary byte stream. Must run inside a tokio `LocalSet`.
pub fn listener() -> (tcp_port::Client, mpsc::UnboundedReceiver<DuplexStream>) {
    let (tx, rx) = mpsc::unbounded_channel();
    (capnp_rpc::new_client(Listener { tx }), rx)
}

struct Listener {
    tx: mpsc::UnboundedSender<DuplexStream>,
}

impl tcp_port::Server for Listener {
    fn connect(
        self: Rc<Self>,
        params: tcp_port::ConnectParams,
        mut results: tcp_port::ConnectResults,
    ) -> impl Future<Output = Result<(), Error>> + 'static {
        let r = (|| {
            let downstream = params.get()?.get_downstream()?;
            let (app_side, our_side) = tokio::io::duplex(PIPE_BYTES);
            let (our_read, our_write) = tokio::io::split(our_side);
            self.tx.send(app_side).map_err(|_| {
                Error::disconnected("the listening grain stopped accepting connections".into())
            })?;
            tokio::task::spawn_local(async move {
                let _ = pump(our_read, downstream, |_| ()).await;
            });
            let upstream: byte_stream::Client = capnp_rpc::new_client(WriterStream::new(our_write));
            results.get().set_upstream(upstream);
            Ok(())
        })();
        std::future::ready(r)
    }
}
