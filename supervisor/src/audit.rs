//! The audit trail: one structured record for every security-relevant event.
//!
//! Records go to the `capnet::audit` tracing target as structured fields, and to an
//! in-memory ring that the admin API reads. (Persistent storage in the state database and
//! retention come with the persistence layer.)

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

/// The audit sink. Cheap to clone.
#[derive(Clone, Default)]
pub struct Audit {
    ring: Rc<RefCell<VecDeque<AuditRecord>>>,
}

impl Audit {
    /// Records an event.
    pub fn record(&self, r: AuditRecord) {
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
