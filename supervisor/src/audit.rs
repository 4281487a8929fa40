//! The audit trail: one structured record for every security-relevant event.
//!
//! Records go to the `capnet::audit` tracing target as structured fields and to the state
//! database, where `capnet audit` reads them. Records that accompany a state change (a
//! grant, a revocation, a saved or dropped token) are written in the same transaction as
//! the change; the rest (connection events, mostly) are batched every few milliseconds.
//! The store is bounded by `daemon.audit_retention_days` and `daemon.audit_max_records`.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

/// Records kept in memory.
const RING: usize = 10_000;

/// One audit record.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct AuditRecord {
    /// Milliseconds since the Unix epoch.
    pub time_ms: u64,
    /// What happened, such as `grant`, `deny`, `connect_refused`, `driver_crashed`.
    pub kind: String,
    /// The grain involved, if any.
    pub grain: String,
    /// The grant involved, if any.
    pub grant: String,
    /// The driver involved, if any.
    pub driver: String,
    /// Destination (host:port), if any.
    pub destination: String,
    /// The deciding rule, if any.
    pub rule: String,
    /// Bytes from the network.
    pub bytes_in: u64,
    /// Bytes to the network.
    pub bytes_out: u64,
    /// Duration, for closed connections.
    pub duration_ms: u64,
    /// Free text.
    pub detail: String,
}

impl AuditRecord {
    /// A record of `kind` stamped now.
    pub fn new(kind: &str) -> Self {
        Self {
            time_ms: now_ms(),
            kind: kind.to_string(),
            ..Default::default()
        }
    }

    /// Sets the grain.
    pub fn grain(mut self, g: &str) -> Self {
        self.grain = g.to_string();
        self
    }

    /// Sets the grant.
    pub fn grant(mut self, g: &str) -> Self {
        self.grant = g.to_string();
        self
    }

    /// Sets the driver.
    pub fn driver(mut self, d: &str) -> Self {
        self.driver = d.to_string();
        self
    }

    /// Sets the detail.
    pub fn detail(mut self, d: impl Into<String>) -> Self {
        self.detail = d.into();
        self
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// How long batched records may wait before they are written.
const BATCH_DELAY: std::time::Duration = std::time::Duration::from_millis(20);

/// The audit sink. Cheap to clone.
#[derive(Clone, Default)]
pub struct Audit {
    ring: Rc<RefCell<VecDeque<AuditRecord>>>,
    state: Option<crate::state::State>,
    pending: Rc<RefCell<Vec<AuditRecord>>>,
    flush_scheduled: Rc<std::cell::Cell<bool>>,
}

impl Audit {
    /// An audit sink that stores records in `state`.
    pub fn with_state(state: crate::state::State) -> Self {
        Self {
            state: Some(state),
            ..Default::default()
        }
    }

    /// Records an event: logged now, stored within a few milliseconds.
    pub fn record(&self, r: AuditRecord) {
        self.note(&r);
        let Some(_) = &self.state else { return };
        self.pending.borrow_mut().push(r);
        if !self.flush_scheduled.replace(true) {
            let me = self.clone();
            tokio::task::spawn_local(async move {
                tokio::time::sleep(BATCH_DELAY).await;
                me.flush();
            });
        }
    }

    /// Hands batched records to the state thread now. Queries queued after this see them.
    pub fn flush(&self) {
        self.flush_scheduled.set(false);
        let batch = std::mem::take(&mut *self.pending.borrow_mut());
        if batch.is_empty() {
            return;
        }
        if let Some(state) = &self.state {
            state.post(move |db| {
                if let Err(e) = db.insert_audit(&batch) {
                    tracing::error!(error = %e, "cannot store audit records");
                }
            });
        }
    }

    /// Logs an event whose record is stored by the caller (in the transaction of the
    /// state change it belongs to).
    pub fn note(&self, r: &AuditRecord) {
        let r = r.clone();
        tracing::info!(
            target: "capnet::audit",
            kind = %r.kind,
            grain = %r.grain,
            grant = %r.grant,
            driver = %r.driver,
            destination = %r.destination,
            rule = %r.rule,
            bytes_in = r.bytes_in,
            bytes_out = r.bytes_out,
            duration_ms = r.duration_ms,
            detail = %r.detail,
        );
        let mut ring = self.ring.borrow_mut();
        if ring.len() >= RING {
            ring.pop_front();
        }
        ring.push_back(r);
    }

    /// The records kept in memory, oldest first.
    pub fn recent(&self) -> Vec<AuditRecord> {
        self.ring.borrow().iter().cloned().collect()
    }
}
