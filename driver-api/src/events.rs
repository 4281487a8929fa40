//! Audit events from a driver to the supervisor.
//!
//! Every connection decision (allowed or refused, with the deciding rule), every closed
//! connection (bytes each way, duration), every listener and every limit hit is reported
//! through the supervisor's `EventSink`. Reporting never blocks the data path: events queue
//! in memory and one task streams them out in order. If the supervisor stops draining, the
//! queue is capped and the number of dropped events is reported once it drains again.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;

use capnet_schemas::driver_capnp::{driver_event, event_sink};
use tokio::sync::Notify;

/// Most events kept while the supervisor is not draining them.
const QUEUE_CAP: usize = 16 * 1024;

/// What happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// A connection was allowed by the policy.
    ConnectAllowed,
    /// A connection was refused by the policy.
    ConnectRefused,
    /// A connection ended.
    ConnectionClosed,
    /// A listener started.
    ListenStarted,
    /// A listener stopped.
    ListenStopped,
    /// A per-grant limit refused something.
    LimitHit,
    /// A datagram was refused by the policy.
    DatagramRefused,
    /// A protocol mediator (SMTP, HTTP) refused what the grain said.
    MediationRefused,
    /// Anything else worth auditing.
    Other,
}

impl EventKind {
    fn to_capnp(self) -> driver_event::Kind {
        match self {
            EventKind::ConnectAllowed => driver_event::Kind::ConnectAllowed,
            EventKind::ConnectRefused => driver_event::Kind::ConnectRefused,
            EventKind::ConnectionClosed => driver_event::Kind::ConnectionClosed,
            EventKind::ListenStarted => driver_event::Kind::ListenStarted,
            EventKind::ListenStopped => driver_event::Kind::ListenStopped,
            EventKind::LimitHit => driver_event::Kind::LimitHit,
            EventKind::DatagramRefused => driver_event::Kind::DatagramRefused,
            EventKind::MediationRefused => driver_event::Kind::MediationRefused,
            EventKind::Other => driver_event::Kind::Other,
        }
    }

    fn from_capnp(k: driver_event::Kind) -> Self {
        match k {
            driver_event::Kind::ConnectAllowed => EventKind::ConnectAllowed,
            driver_event::Kind::ConnectRefused => EventKind::ConnectRefused,
            driver_event::Kind::ConnectionClosed => EventKind::ConnectionClosed,
            driver_event::Kind::ListenStarted => EventKind::ListenStarted,
            driver_event::Kind::ListenStopped => EventKind::ListenStopped,
            driver_event::Kind::LimitHit => EventKind::LimitHit,
            driver_event::Kind::DatagramRefused => EventKind::DatagramRefused,
            driver_event::Kind::MediationRefused => EventKind::MediationRefused,
            driver_event::Kind::Other => EventKind::Other,
        }
    }

    /// A stable lower-case name, as stored in the audit trail.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::ConnectAllowed => "connect_allowed",
            EventKind::ConnectRefused => "connect_refused",
            EventKind::ConnectionClosed => "connection_closed",
            EventKind::ListenStarted => "listen_started",
            EventKind::ListenStopped => "listen_stopped",
            EventKind::LimitHit => "limit_hit",
            EventKind::DatagramRefused => "datagram_refused",
            EventKind::MediationRefused => "mediation_refused",
            EventKind::Other => "other",
        }
    }
}

/// One audit event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// The grant it happened under.
    pub grant_id: String,
    /// What happened.
    pub kind: EventKind,
    /// `host:port` or `address:port`.
    pub destination: String,
    /// The deciding rule, if a policy decided.
    pub rule: String,
    /// Bytes received from the network.
    pub bytes_in: u64,
    /// Bytes sent to the network.
    pub bytes_out: u64,
    /// How long the connection lasted.
    pub duration_ms: u64,
    /// Anything else, in words.
    pub detail: String,
}

impl Event {
    /// An event of `kind` for `grant_id` about `destination`; fill in the rest as needed.
    pub fn new(grant_id: &str, kind: EventKind, destination: impl Into<String>) -> Self {
        Self {
            grant_id: grant_id.to_string(),
            kind,
            destination: destination.into(),
            rule: String::new(),
            bytes_in: 0,
            bytes_out: 0,
            duration_ms: 0,
            detail: String::new(),
        }
    }

    /// Sets the deciding rule.
    pub fn rule(mut self, rule: impl Into<String>) -> Self {
        self.rule = rule.into();
        self
    }

    /// Sets the detail text.
    pub fn detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = detail.into();
        self
    }

    /// Reads an event a driver reported (the supervisor's side).
    pub fn read(r: driver_event::Reader<'_>) -> capnp::Result<Self> {
        let text = |t: capnp::Result<capnp::text::Reader<'_>>| -> capnp::Result<String> {
            Ok(t?.to_string()?)
        };
        Ok(Self {
            grant_id: text(r.get_grant_id())?,
            kind: r
                .get_kind()
                .map(EventKind::from_capnp)
                .unwrap_or(EventKind::Other),
            destination: text(r.get_destination())?,
            rule: text(r.get_rule())?,
            bytes_in: r.get_bytes_in(),
            bytes_out: r.get_bytes_out(),
            duration_ms: r.get_duration_ms(),
            detail: text(r.get_detail())?,
        })
    }

    /// Writes into a capnp builder.
    pub fn write(&self, mut b: driver_event::Builder<'_>) {
        b.set_grant_id(&self.grant_id);
        b.set_kind(self.kind.to_capnp());
        b.set_destination(&self.destination);
        b.set_rule(&self.rule);
        b.set_bytes_in(self.bytes_in);
        b.set_bytes_out(self.bytes_out);
        b.set_duration_ms(self.duration_ms);
        b.set_detail(&self.detail);
    }
}

/// Queues events and streams them to the supervisor.
#[derive(Clone, Default)]
pub struct EventReporter {
    inner: Rc<Inner>,
}

#[derive(Default)]
struct Inner {
    queue: RefCell<VecDeque<Event>>,
    dropped: Cell<u64>,
    notify: Notify,
}

impl EventReporter {
    /// A reporter that streams to `sink` from a local task. Must be called inside a
    /// `LocalSet`.
    pub(crate) fn start(sink: event_sink::Client) -> Self {
        let reporter = Self::default();
        let inner = reporter.inner.clone();
        tokio::task::spawn_local(async move {
            loop {
                let next = inner.queue.borrow_mut().pop_front();
                let Some(event) = next else {
                    // Holding only a weak interest: stop when every reporter is gone.
                    if Rc::strong_count(&inner) == 1 {
                        return;
                    }
                    inner.notify.notified().await;
                    continue;
                };
                let dropped = inner.dropped.replace(0);
                if dropped > 0 {
                    let note = Event::new(&event.grant_id, EventKind::Other, "")
                        .detail(format!("{dropped} audit events were dropped: queue full"));
                    if send(&sink, &note).await.is_err() {
                        return;
                    }
                }
                if send(&sink, &event).await.is_err() {
                    // The supervisor is gone; the process will end with the connection.
                    return;
                }
            }
        });
        reporter
    }

    /// Reports an event. Never blocks; also logs it through `tracing`.
    pub fn report(&self, event: Event) {
        tracing::info!(
            target: "capnet::audit",
            grant = %event.grant_id,
            kind = event.kind.as_str(),
            destination = %event.destination,
            rule = %event.rule,
            bytes_in = event.bytes_in,
            bytes_out = event.bytes_out,
            duration_ms = event.duration_ms,
            detail = %event.detail,
        );
        let mut q = self.inner.queue.borrow_mut();
        if q.len() >= QUEUE_CAP {
            self.inner.dropped.set(self.inner.dropped.get() + 1);
            return;
        }
        q.push_back(event);
        drop(q);
        self.inner.notify.notify_one();
    }

    /// Events waiting to be sent (for tests).
    pub fn pending(&self) -> usize {
        self.inner.queue.borrow().len()
    }
}

async fn send(sink: &event_sink::Client, event: &Event) -> Result<(), capnp::Error> {
    let mut req = sink.report_request();
    event.write(req.get().init_event());
    req.send().await
}
