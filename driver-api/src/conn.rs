//! One live connection: the stream shared by both directions, the pump from the network to
//! the grain, the grain's writes into the network, accounting and the kill switch.
//!
//! Both directions share one [`ConnShared`] holding the stream. Killing it (revocation, the
//! grain releasing its stream without `done()`, a failed downstream) drops the stream at
//! once, so the socket closes even while the grain still holds capabilities, and wakes any
//! pending read or write so they fail.

use std::cell::{Cell, RefCell};
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use capnet_schemas::bytestream::{WriteGate, WriterStream, write_request};
use capnet_schemas::rpc::CHUNK_BYTES;
use capnet_schemas::util_capnp::byte_stream;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::task::AbortHandle;

use crate::driver::{BoxStream, Connection};
use crate::events::{Event, EventKind};
use crate::grant::GrantState;
use crate::limits::ConnectionPermit;

pub(crate) struct ConnShared {
    stream: RefCell<Option<BoxStream>>,
    killed: RefCell<Option<String>>,
    read_waker: RefCell<Option<Waker>>,
    write_waker: RefCell<Option<Waker>>,
    pump: RefCell<Option<AbortHandle>>,
    bytes_in: Cell<u64>,
    bytes_out: Cell<u64>,
    started: Instant,
    peer: String,
    grant: Rc<GrantState>,
    _permit: ConnectionPermit,
}

impl ConnShared {
    /// Wraps an established connection and registers it with its grant.
    pub(crate) fn new(
        conn: Connection,
        grant: Rc<GrantState>,
        permit: ConnectionPermit,
    ) -> Rc<Self> {
        grant.open_connections.set(grant.open_connections.get() + 1);
        grant
            .connections_total
            .set(grant.connections_total.get() + 1);
        let hs = &grant.host.state;
        hs.open_connections.set(hs.open_connections.get() + 1);
        let shared = Rc::new(Self {
            stream: RefCell::new(Some(conn.stream)),
            killed: RefCell::new(None),
            read_waker: RefCell::new(None),
            write_waker: RefCell::new(None),
            pump: RefCell::new(None),
            bytes_in: Cell::new(0),
            bytes_out: Cell::new(0),
            started: Instant::now(),
            peer: conn.peer,
            grant: grant.clone(),
            _permit: permit,
        });
        grant.register_conn(&shared);
        shared
    }

    /// Closes the connection now: drops the stream, stops the pump, fails pending I/O.
    pub(crate) fn kill(&self, reason: &str) {
        if self.killed.borrow().is_some() {
            return;
        }
        *self.killed.borrow_mut() = Some(reason.to_string());
        let stream = self.stream.borrow_mut().take();
        drop(stream);
        if let Some(pump) = self.pump.borrow_mut().take() {
            pump.abort();
        }
        for w in [&self.read_waker, &self.write_waker] {
            if let Some(w) = w.borrow_mut().take() {
                w.wake();
            }
        }
    }

    fn closed_error(&self) -> io::Error {
        let reason = self
            .killed
            .borrow()
            .clone()
            .unwrap_or_else(|| "connection closed".into());
        io::Error::new(io::ErrorKind::ConnectionAborted, reason)
    }

    /// Splits into the read and write sides.
    pub(crate) fn halves(self: &Rc<Self>) -> (ReadHalf, WriteHalf) {
        (ReadHalf(self.clone()), WriteHalf(self.clone()))
    }

    /// Serves the grain-to-network direction as a `ByteStream`: writes go to the network,
    /// `done()` half-closes, releasing it without `done()` aborts the connection.
    pub(crate) fn writer_stream(self: &Rc<Self>) -> WriterStream<WriteHalf> {
        let weak = Rc::downgrade(self);
        let w = WriterStream::new(WriteHalf(self.clone())).on_abort(move || {
            if let Some(c) = weak.upgrade() {
                c.kill("the grain released the stream without done()");
            }
        });
        match outbound_gate(&self.grant) {
            Some(g) => w.gate(g),
            None => w,
        }
    }

    /// Starts the network-to-grain pump into `downstream`.
    pub(crate) fn start_pump(self: &Rc<Self>, downstream: byte_stream::Client) {
        let (mut reader, _) = self.halves();
        let conn = Rc::downgrade(self);
        let task = tokio::task::spawn_local(async move {
            let mut buf = vec![0u8; CHUNK_BYTES];
            loop {
                let n = match reader.read(&mut buf).await {
                    Ok(n) => n,
                    Err(_) => return,
                };
                if n == 0 {
                    let _ = downstream.done_request().send().promise.await;
                    return;
                }
                if let Some(c) = conn.upgrade() {
                    let throttle = c.grant.limiter.inbound_bytes();
                    if throttle.per_second() > 0 {
                        throttle.acquire(n).await;
                    }
                }
                if write_request(&downstream, &buf[..n]).send().await.is_err() {
                    if let Some(c) = conn.upgrade() {
                        c.kill("the grain's receiving stream failed");
                    }
                    return;
                }
            }
        });
        *self.pump.borrow_mut() = Some(task.abort_handle());
    }
}

/// The per-grant outbound byte-rate limit as a write gate (none when unlimited).
pub(crate) fn outbound_gate(grant: &Rc<GrantState>) -> Option<WriteGate> {
    if grant.limiter.outbound_bytes().per_second() == 0 {
        return None;
    }
    let g = grant.clone();
    Some(Rc::new(move |n| {
        let g = g.clone();
        Box::pin(async move { g.limiter.outbound_bytes().acquire(n).await })
    }))
}

impl Drop for ConnShared {
    fn drop(&mut self) {
        let g = &self.grant;
        g.open_connections
            .set(g.open_connections.get().saturating_sub(1));
        let hs = &g.host.state;
        hs.open_connections
            .set(hs.open_connections.get().saturating_sub(1));
        let mut ev = Event::new(&g.id, EventKind::ConnectionClosed, self.peer.clone());
        ev.bytes_in = self.bytes_in.get();
        ev.bytes_out = self.bytes_out.get();
        ev.duration_ms = self.started.elapsed().as_millis() as u64;
        if let Some(reason) = self.killed.borrow().as_ref() {
            ev.detail = reason.clone();
        }
        g.host.report(ev);
    }
}

/// The read side of a connection.
pub(crate) struct ReadHalf(Rc<ConnShared>);

impl AsyncRead for ReadHalf {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let c = &self.0;
        let mut guard = c.stream.borrow_mut();
        let Some(stream) = guard.as_mut() else {
            return Poll::Ready(Err(c.closed_error()));
        };
        let before = buf.filled().len();
        match Pin::new(stream).poll_read(cx, buf) {
            Poll::Pending => {
                *c.read_waker.borrow_mut() = Some(cx.waker().clone());
                Poll::Pending
            }
            Poll::Ready(Ok(())) => {
                let n = (buf.filled().len() - before) as u64;
                c.bytes_in.set(c.bytes_in.get() + n);
                c.grant.bytes_in.set(c.grant.bytes_in.get() + n);
                Poll::Ready(Ok(()))
            }
            other => other,
        }
    }
}

/// The write side of a connection.
pub(crate) struct WriteHalf(Rc<ConnShared>);

impl WriteHalf {
    fn with_stream<T>(
        &self,
        cx: &mut Context<'_>,
        f: impl FnOnce(Pin<&mut BoxStream>, &mut Context<'_>) -> Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        let c = &self.0;
        let mut guard = c.stream.borrow_mut();
        let Some(stream) = guard.as_mut() else {
            return Poll::Ready(Err(c.closed_error()));
        };
        let r = f(Pin::new(stream), cx);
        if r.is_pending() {
            *c.write_waker.borrow_mut() = Some(cx.waker().clone());
        }
        r
    }
}

impl AsyncWrite for WriteHalf {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = self.with_stream(cx, |s, cx| s.poll_write(cx, buf));
        if let Poll::Ready(Ok(n)) = r {
            let c = &self.0;
            c.bytes_out.set(c.bytes_out.get() + n as u64);
            c.grant.bytes_out.set(c.grant.bytes_out.get() + n as u64);
        }
        r
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.with_stream(cx, |s, cx| s.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.with_stream(cx, |s, cx| s.poll_shutdown(cx))
    }
}
