//! The powerbox: grains' requests for capabilities, waiting for an administrator.
//!
//! A request names what the grain wants (a parsed `PowerboxDescriptor`) and why (its
//! label). It waits until `capnet powerbox grant` or `deny` answers it, or until it expires
//! (`daemon.request_timeout_secs`). A request whose grain stopped waiting (it exited or
//! dropped the call) disappears from the list.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::{Duration, Instant};

use capnet_schemas::descriptor::Requested;
use capnp::Error;
use tokio::sync::{Notify, oneshot};

use crate::audit::{Audit, AuditRecord};
use crate::grants::Grant;

/// How a request was answered.
pub enum Answer {
    /// Granted: here is the grant.
    Granted(Rc<Grant>),
    /// Denied, with the administrator's reason.
    Denied(String),
}

/// A pending request as the administrator sees it.
#[derive(Clone, Debug)]
pub struct RequestInfo {
    /// Request id.
    pub id: u64,
    /// The grain asking.
    pub grain: String,
    /// What it asks for.
    pub requested: Requested,
    /// Why, in the grain's words.
    pub label: String,
    /// How long it has been waiting.
    pub age: Duration,
}

/// A request taken out of the queue to be answered.
pub struct Taken {
    /// What was asked.
    pub info: RequestInfo,
    answer: oneshot::Sender<Answer>,
}

impl Taken {
    /// Answers the request. Returns the answer back if the grain stopped waiting.
    pub fn answer(self, a: Answer) -> Result<(), Answer> {
        self.answer.send(a)
    }
}

struct Pending {
    grain: String,
    requested: Requested,
    label: String,
    created: Instant,
    answer: oneshot::Sender<Answer>,
}

/// The queue of pending requests.
#[derive(Clone)]
pub struct Powerbox {
    inner: Rc<Inner>,
}

struct Inner {
    next: Cell<u64>,
    pending: RefCell<BTreeMap<u64, Pending>>,
    arrived: Notify,
    timeout: Duration,
    audit: Audit,
}

impl Powerbox {
    /// An empty queue whose requests expire after `timeout`.
    pub fn new(timeout: Duration, audit: Audit) -> Self {
        Self {
            inner: Rc::new(Inner {
                next: Cell::new(1),
                pending: RefCell::new(BTreeMap::new()),
                arrived: Notify::new(),
                timeout,
                audit,
            }),
        }
    }

    /// Files a request and waits for its answer.
    pub async fn request(
        &self,
        grain: &str,
        requested: Requested,
        label: &str,
    ) -> Result<Rc<Grant>, Error> {
        let id = self.inner.next.get();
        self.inner.next.set(id + 1);
        let (tx, rx) = oneshot::channel();
        let what = describe(&requested);
        self.inner.pending.borrow_mut().insert(
            id,
            Pending {
                grain: grain.to_string(),
                requested,
                label: label.to_string(),
                created: Instant::now(),
                answer: tx,
            },
        );
        self.inner.audit.record(
            AuditRecord::new("request")
                .grain(grain)
                .detail(format!("request {id}: {what}, label {label:?}")),
        );
        self.inner.arrived.notify_waiters();
        let _cleanup = RemoveOnDrop {
            inner: self.inner.clone(),
            id,
        };
        match tokio::time::timeout(self.inner.timeout, rx).await {
            Ok(Ok(Answer::Granted(g))) => Ok(g),
            Ok(Ok(Answer::Denied(reason))) => Err(Error::failed(format!(
                "denied: the administrator denied the request for {what}{}",
                if reason.is_empty() {
                    String::new()
                } else {
                    format!(": {reason}")
                }
            ))),
            Ok(Err(_)) => Err(Error::failed(format!(
                "failed: the request for {what} was dropped by the supervisor"
            ))),
            Err(_) => {
                self.inner.audit.record(
                    AuditRecord::new("request_expired")
                        .grain(grain)
                        .detail(format!("request {id}: {what}")),
                );
                Err(Error::failed(format!(
                    "expired: nobody answered the request for {what} within {}s; ask the \
                     administrator to answer it with `capnet powerbox grant`",
                    self.inner.timeout.as_secs()
                )))
            }
        }
    }

    /// Pending requests, oldest first (requests whose grain stopped waiting are dropped).
    pub fn list(&self) -> Vec<RequestInfo> {
        let mut pending = self.inner.pending.borrow_mut();
        pending.retain(|_, p| !p.answer.is_closed());
        pending
            .iter()
            .map(|(id, p)| RequestInfo {
                id: *id,
                grain: p.grain.clone(),
                requested: p.requested.clone(),
                label: p.label.clone(),
                age: p.created.elapsed(),
            })
            .collect()
    }

    /// Takes a request out of the queue to answer it.
    pub fn take(&self, id: u64) -> Option<Taken> {
        let p = self.inner.pending.borrow_mut().remove(&id)?;
        if p.answer.is_closed() {
            return None;
        }
        Some(Taken {
            info: RequestInfo {
                id,
                grain: p.grain,
                requested: p.requested,
                label: p.label,
                age: p.created.elapsed(),
            },
            answer: p.answer,
        })
    }

    /// Waits until a request is pending (or `timeout` passes) and returns the oldest.
    pub async fn wait(&self, timeout: Duration) -> Option<RequestInfo> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.inner.arrived.notified();
            if let Some(first) = self.list().into_iter().next() {
                return Some(first);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return None;
            }
        }
    }
}

struct RemoveOnDrop {
    inner: Rc<Inner>,
    id: u64,
}

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        self.inner.pending.borrow_mut().remove(&self.id);
    }
}

/// "TcpPort smtp.example.test:587" and the like.
pub fn describe(r: &Requested) -> String {
    match r {
        Requested::IpNetwork { encryption } => format!("IpNetwork (encryption {encryption})"),
        Requested::IpInterface => "IpInterface".into(),
        Requested::IpRemoteHost { host } => {
            format!("IpRemoteHost {}", host.as_deref().unwrap_or("(any host)"))
        }
        Requested::TcpPort { host, port } | Requested::UdpPort { host, port } => format!(
            "{} {}:{}",
            r.interface_name(),
            host.as_deref().unwrap_or("(host unset)"),
            port.map_or_else(|| "(port unset)".to_string(), |p| p.to_string())
        ),
    }
}
