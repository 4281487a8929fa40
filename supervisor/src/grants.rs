//! Grants: what an administrator (or a rule) gave a grain, and the supervisor's side of it.
//!
//! A grant names a driver, a kind (IpNetwork, IpInterface, IpRemoteHost, TcpPort,
//! UdpPort), the narrowing the grain asked for and the administrator's constraints. Its
//! driver session is opened lazily and re-opened after a driver restart, so the
//! capabilities a grain holds keep working across restarts; only live connections and
//! listeners of the old driver instance end. Revoking a grant fails every later call on
//! anything derived from it, releases every driver object the grain could still reach, and
//! tells the driver to close the grant's connections and listeners at once.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::rc::{Rc, Weak};
use std::time::Duration;

use capnet_driver_api::Limits as GrantLimits;
use capnet_driver_api::policy::{RuleConfig, write_rule_configs};
use capnet_schemas::descriptor::{Encryption, Requested};
use capnet_schemas::driver_capnp::{grant_session, grant_spec};
use capnet_schemas::ip_capnp::{ip_interface, ip_network};
use capnp::Error;

use crate::audit::{Audit, AuditRecord, now_ms};
use crate::drivers::DriverManager;
use crate::state::{GrantRow, State, StateError};

/// How long a call waits for a restarting driver before failing.
const DRIVER_WAIT: Duration = Duration::from_secs(10);

/// What a grant gives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GrantKind {
    /// Outbound access.
    IpNetwork {
        /// TLS on every connection.
        encryption: Encryption,
    },
    /// Inbound access.
    IpInterface,
    /// One host, any port the policy allows.
    IpRemoteHost {
        /// The host.
        host: String,
    },
    /// One TCP host and port.
    TcpPort {
        /// The host.
        host: String,
        /// The port.
        port: u16,
    },
    /// One UDP host and port.
    UdpPort {
        /// The host.
        host: String,
        /// The port.
        port: u16,
    },
}

impl GrantKind {
    /// The interface name, such as "TcpPort".
    pub fn name(&self) -> &'static str {
        match self {
            GrantKind::IpNetwork { .. } => "IpNetwork",
            GrantKind::IpInterface => "IpInterface",
            GrantKind::IpRemoteHost { .. } => "IpRemoteHost",
            GrantKind::TcpPort { .. } => "TcpPort",
            GrantKind::UdpPort { .. } => "UdpPort",
        }
    }

    /// A short description, such as "TcpPort smtp.example.test:587".
    pub fn describe(&self) -> String {
        match self {
            GrantKind::IpNetwork { encryption } => format!("IpNetwork (encryption {encryption})"),
            GrantKind::IpInterface => "IpInterface".into(),
            GrantKind::IpRemoteHost { host } => format!("IpRemoteHost {host}"),
            GrantKind::TcpPort { host, port } => format!("TcpPort {host}:{port}"),
            GrantKind::UdpPort { host, port } => format!("UdpPort {host}:{port}"),
        }
    }

    /// The grant kind that answers `req`, with the host and port given by the administrator
    /// overriding the grain's preferences. Fails if a narrow request lacks a host or port.
    pub fn for_request(
        req: &Requested,
        host: Option<&str>,
        port: Option<u16>,
    ) -> Result<Self, String> {
        let need_host = |h: Option<&str>| {
            h.map(str::to_string).ok_or_else(|| {
                format!(
                    "the {} request names no host; give one with --host",
                    req.interface_name()
                )
            })
        };
        let need_port = |p: Option<u16>| {
            p.ok_or_else(|| {
                format!(
                    "the {} request names no port; give one with --port",
                    req.interface_name()
                )
            })
        };
        Ok(match req {
            Requested::IpNetwork { encryption } => GrantKind::IpNetwork {
                encryption: *encryption,
            },
            Requested::IpInterface => GrantKind::IpInterface,
            Requested::IpRemoteHost { host: h } => GrantKind::IpRemoteHost {
                host: need_host(host.or(h.as_deref()))?,
            },
            Requested::TcpPort { host: h, port: p } => GrantKind::TcpPort {
                host: need_host(host.or(h.as_deref()))?,
                port: need_port(port.or(*p))?,
            },
            Requested::UdpPort { host: h, port: p } => GrantKind::UdpPort {
                host: need_host(host.or(h.as_deref()))?,
                port: need_port(port.or(*p))?,
            },
        })
    }

    fn scope(&self) -> (&str, u16) {
        match self {
            GrantKind::IpNetwork { .. } | GrantKind::IpInterface => ("", 0),
            GrantKind::IpRemoteHost { host } => (host, 0),
            GrantKind::TcpPort { host, port } | GrantKind::UdpPort { host, port } => (host, *port),
        }
    }
}

/// The stored (JSON) form of a grant kind.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(tag = "type")]
enum StoredKind {
    IpNetwork { tls: bool },
    IpInterface,
    IpRemoteHost { host: String },
    TcpPort { host: String, port: u16 },
    UdpPort { host: String, port: u16 },
}

impl GrantKind {
    /// The JSON stored in the state database.
    pub fn to_json(&self) -> String {
        let k = match self {
            GrantKind::IpNetwork { encryption } => StoredKind::IpNetwork {
                tls: *encryption == Encryption::Tls,
            },
            GrantKind::IpInterface => StoredKind::IpInterface,
            GrantKind::IpRemoteHost { host } => StoredKind::IpRemoteHost { host: host.clone() },
            GrantKind::TcpPort { host, port } => StoredKind::TcpPort {
                host: host.clone(),
                port: *port,
            },
            GrantKind::UdpPort { host, port } => StoredKind::UdpPort {
                host: host.clone(),
                port: *port,
            },
        };
        serde_json::to_string(&k).unwrap_or_default()
    }

    /// Parses the stored JSON.
    pub fn from_json(text: &str) -> Result<Self, String> {
        let k: StoredKind = serde_json::from_str(text).map_err(|e| e.to_string())?;
        Ok(match k {
            StoredKind::IpNetwork { tls } => GrantKind::IpNetwork {
                encryption: if tls {
                    Encryption::Tls
                } else {
                    Encryption::None
                },
            },
            StoredKind::IpInterface => GrantKind::IpInterface,
            StoredKind::IpRemoteHost { host } => GrantKind::IpRemoteHost { host },
            StoredKind::TcpPort { host, port } => GrantKind::TcpPort { host, port },
            StoredKind::UdpPort { host, port } => GrantKind::UdpPort { host, port },
        })
    }
}

/// Something derived from a grant that must let go of driver objects on revocation.
pub trait Revocable {
    /// Releases everything the object holds from the driver.
    fn revoke(&self);
}

/// One grant.
pub struct Grant {
    /// Grant id.
    pub id: String,
    /// The grain it was given to.
    pub grain: String,
    /// The driver serving it.
    pub driver: String,
    /// What it gives.
    pub kind: GrantKind,
    /// The grain's label for the request.
    pub label: String,
    /// The administrator's extra rules.
    pub rules: Vec<RuleConfig>,
    /// Limits.
    pub limits: GrantLimits,
    /// Who granted it: `admin` or `rule:<name>`.
    pub source: String,
    /// Creation time (ms since the epoch).
    pub created_ms: u64,
    /// Last use (ms since the epoch).
    pub last_used_ms: Cell<u64>,
    /// Bytes from the network to the grain.
    pub bytes_in: Cell<u64>,
    /// Bytes from the grain to the network.
    pub bytes_out: Cell<u64>,
    /// Open connections.
    pub open_connections: Cell<u32>,
    revoked: RefCell<Option<String>>,
    session: RefCell<Option<(u64, grant_session::Client)>>,
    opening: tokio::sync::Mutex<()>,
    network: RefCell<Option<(u64, ip_network::Client)>>,
    live: RefCell<Vec<Weak<dyn Revocable>>>,
    drivers: DriverManager,
    audit: Audit,
    state: State,
}

impl Grant {
    /// Fails with a `revoked:` error once the grant is revoked.
    pub fn check_live(&self) -> Result<(), Error> {
        match &*self.revoked.borrow() {
            Some(reason) => Err(revoked_error(&self.id, reason)),
            None => Ok(()),
        }
    }

    /// Whether it was revoked.
    pub fn is_revoked(&self) -> bool {
        self.revoked.borrow().is_some()
    }

    /// Marks a use.
    pub fn touch(&self) {
        self.last_used_ms.set(now_ms());
    }

    /// Registers an object to be cut off on revocation.
    pub fn register(&self, r: Weak<dyn Revocable>) {
        let mut live = self.live.borrow_mut();
        live.retain(|w| w.strong_count() > 0);
        live.push(r);
    }

    /// The driver's session for this grant, opened (again) if the driver restarted.
    pub async fn session(&self) -> Result<grant_session::Client, Error> {
        self.check_live()?;
        let (client, generation) = self
            .drivers
            .client(&self.driver, DRIVER_WAIT)
            .await
            .map_err(|e| Error::disconnected(e.to_string()))?;
        if let Some((g, s)) = &*self.session.borrow()
            && *g == generation
        {
            return Ok(s.clone());
        }
        // One opening at a time: concurrent first uses (a burst of connections) share the
        // session the first one opens instead of each opening (and replacing) their own.
        let _opening = self.opening.lock().await;
        if let Some((g, s)) = &*self.session.borrow()
            && *g == generation
        {
            return Ok(s.clone());
        }
        let mut req = client.open_grant_request();
        {
            let mut spec = req.get().init_spec();
            spec.set_grant_id(&self.id);
            spec.set_grain_id(&self.grain);
            spec.set_encryption(match self.kind {
                GrantKind::IpNetwork {
                    encryption: Encryption::Tls,
                } => grant_spec::Encryption::Tls,
                _ => grant_spec::Encryption::None,
            });
            write_rule_configs(&self.rules, spec.reborrow().init_policy())
                .map_err(|e| Error::failed(e.to_string()))?;
            self.limits.write_capnp(spec.reborrow().init_limits());
            let (host, port) = self.kind.scope();
            spec.set_scope_host(host);
            spec.set_scope_port(port);
        }
        let session = req.send().promise.await?.get()?.get_session()?;
        self.check_live()?;
        *self.session.borrow_mut() = Some((generation, session.clone()));
        Ok(session)
    }

    /// The driver generation the cached session belongs to, if any.
    pub fn session_generation(&self) -> Option<u64> {
        self.session.borrow().as_ref().map(|(g, _)| *g)
    }

    /// The driver's `IpNetwork` for this grant, and the driver generation it belongs to.
    /// Cached per generation, so steady-state connects cost no extra calls.
    pub async fn network(&self) -> Result<(ip_network::Client, u64), Error> {
        let s = self.session().await?;
        let generation = self.session_generation().unwrap_or(0);
        if let Some((g, n)) = &*self.network.borrow()
            && *g == generation
        {
            return Ok((n.clone(), generation));
        }
        let n = s.network_request().send().pipeline.get_network();
        *self.network.borrow_mut() = Some((generation, n.clone()));
        Ok((n, generation))
    }

    /// The driver's `IpInterface` for this grant.
    pub async fn interface(&self) -> Result<ip_interface::Client, Error> {
        let s = self.session().await?;
        Ok(s.interface_request().send().pipeline.get_interface())
    }

    /// The state database.
    pub fn state(&self) -> &State {
        &self.state
    }

    /// Revokes the grant now — later calls fail, driver objects are released, the driver
    /// closes the grant's connections and listeners — and records it durably.
    pub async fn revoke(&self, reason: &str) -> Result<(), StateError> {
        // Stamped before anything is cut, so the record's time bounds the cut-off delay.
        let audit = AuditRecord::new("revoke")
            .grain(&self.grain)
            .grant(&self.id)
            .driver(&self.driver)
            .detail(reason.to_string());
        self.revoke_live(reason);
        self.audit.note(&audit);
        let (id, reason) = (self.id.clone(), reason.to_string());
        self.state
            .call(move |db| db.revoke_grant(&id, now_ms(), &reason, &audit))
            .await?;
        Ok(())
    }

    /// Closes the grant's live connections and listeners without revoking it: the grain
    /// that held them is gone. Its saved tokens keep working.
    pub fn release_live(&self) {
        let live = std::mem::take(&mut *self.live.borrow_mut());
        for r in live.iter().filter_map(Weak::upgrade) {
            r.revoke();
        }
    }

    /// Cuts off everything live at once (no database write).
    pub fn revoke_live(&self, reason: &str) {
        if self.revoked.borrow().is_some() {
            return;
        }
        *self.revoked.borrow_mut() = Some(reason.to_string());
        let live = std::mem::take(&mut *self.live.borrow_mut());
        for r in live.iter().filter_map(Weak::upgrade) {
            r.revoke();
        }
        self.network.borrow_mut().take();
        if let Some((_, session)) = self.session.borrow_mut().take() {
            let mut req = session.revoke_request();
            req.get().set_reason(reason);
            tokio::task::spawn_local(async move {
                let _ = req.send().promise.await;
            });
        }
    }
}

/// The error every call on a revoked grant fails with.
pub fn revoked_error(grant: &str, reason: &str) -> Error {
    Error::failed(format!("revoked: grant {grant} was revoked ({reason})"))
}

/// What the administrator decided for a new grant.
pub struct NewGrant {
    /// The grain.
    pub grain: String,
    /// The driver.
    pub driver: String,
    /// What it gives.
    pub kind: GrantKind,
    /// The grain's label.
    pub label: String,
    /// Extra rules.
    pub rules: Vec<RuleConfig>,
    /// Limits.
    pub limits: GrantLimits,
    /// Who granted it: `admin` or `rule:<name>`.
    pub source: String,
}

/// All grants: the live ones in memory, every one (revoked too) in the state database.
#[derive(Clone)]
pub struct GrantTable {
    inner: Rc<RefCell<BTreeMap<String, Rc<Grant>>>>,
    drivers: DriverManager,
    audit: Audit,
    state: State,
}

/// A grant as `capnet grants list` shows it.
#[derive(Clone, Debug)]
pub struct GrantListing {
    /// The stored row.
    pub row: GrantRow,
    /// Open connections now (0 if the grant is not live).
    pub open_connections: u32,
}

impl GrantTable {
    /// The table, with the grants that are not revoked loaded from the database.
    pub async fn load(
        drivers: DriverManager,
        audit: Audit,
        state: State,
    ) -> Result<Self, StateError> {
        let table = Self {
            inner: Rc::default(),
            drivers,
            audit,
            state,
        };
        let rows = table.state.call(|db| db.grants()).await?;
        for row in rows.into_iter().filter(|r| r.revoked_ms.is_none()) {
            match table.grant_of_row(&row) {
                Ok(g) => {
                    table.inner.borrow_mut().insert(row.id.clone(), g);
                }
                Err(e) => tracing::error!(grant = %row.id, error = %e, "skipping a stored grant"),
            }
        }
        Ok(table)
    }

    fn grant_of_row(&self, row: &GrantRow) -> Result<Rc<Grant>, String> {
        let kind = GrantKind::from_json(&row.kind)?;
        let rules: Vec<RuleConfig> = serde_json::from_str(&row.rules).map_err(|e| e.to_string())?;
        let limits: GrantLimits = serde_json::from_str(&row.limits).map_err(|e| e.to_string())?;
        Ok(self.make(
            row.id.clone(),
            NewGrant {
                grain: row.grain.clone(),
                driver: row.driver.clone(),
                kind,
                label: row.label.clone(),
                rules,
                limits,
                source: row.source.clone(),
            },
            row.created_ms,
            (row.last_used_ms, row.bytes_in, row.bytes_out),
        ))
    }

    fn make(&self, id: String, g: NewGrant, created_ms: u64, usage: (u64, u64, u64)) -> Rc<Grant> {
        Rc::new(Grant {
            id,
            grain: g.grain,
            driver: g.driver,
            kind: g.kind,
            label: g.label,
            rules: g.rules,
            limits: g.limits,
            source: g.source,
            created_ms,
            last_used_ms: Cell::new(usage.0),
            bytes_in: Cell::new(usage.1),
            bytes_out: Cell::new(usage.2),
            open_connections: Cell::new(0),
            revoked: RefCell::new(None),
            session: RefCell::new(None),
            opening: tokio::sync::Mutex::new(()),
            network: RefCell::new(None),
            live: RefCell::new(Vec::new()),
            drivers: self.drivers.clone(),
            audit: self.audit.clone(),
            state: self.state.clone(),
        })
    }

    /// Creates a grant and stores it (with its audit record) before returning.
    pub async fn create(&self, g: NewGrant, audit_detail: String) -> Result<Rc<Grant>, StateError> {
        let id = new_id("grant");
        let row = GrantRow {
            id: id.clone(),
            grain: g.grain.clone(),
            driver: g.driver.clone(),
            kind: g.kind.to_json(),
            label: g.label.clone(),
            rules: serde_json::to_string(&g.rules).unwrap_or_else(|_| "[]".into()),
            limits: serde_json::to_string(&g.limits).unwrap_or_else(|_| "{}".into()),
            source: g.source.clone(),
            created_ms: now_ms(),
            last_used_ms: 0,
            bytes_in: 0,
            bytes_out: 0,
            revoked_ms: None,
            revoke_reason: None,
        };
        let audit = AuditRecord::new("grant")
            .grain(&g.grain)
            .grant(&id)
            .driver(&g.driver)
            .detail(audit_detail);
        self.audit.note(&audit);
        let created = row.created_ms;
        self.state
            .call(move |db| db.insert_grant(&row, &audit))
            .await?;
        let grant = self.make(id.clone(), g, created, (0, 0, 0));
        self.inner.borrow_mut().insert(id, grant.clone());
        Ok(grant)
    }

    /// The audit sink.
    pub fn audit(&self) -> &Audit {
        &self.audit
    }

    /// The state database.
    pub fn state(&self) -> &State {
        &self.state
    }

    /// A live grant by id.
    pub fn get(&self, id: &str) -> Option<Rc<Grant>> {
        self.inner.borrow().get(id).cloned()
    }

    /// Every live grant.
    pub fn list(&self) -> Vec<Rc<Grant>> {
        self.inner.borrow().values().cloned().collect()
    }

    /// Every grant ever made (revoked ones too), with live counters where the grant is
    /// live, filtered by grain and driver.
    pub async fn listing(
        &self,
        grain: Option<&str>,
        driver: Option<&str>,
    ) -> Result<Vec<GrantListing>, StateError> {
        self.flush_usage().await?;
        let rows = self.state.call(|db| db.grants()).await?;
        Ok(rows
            .into_iter()
            .filter(|r| grain.is_none_or(|g| r.grain == g) && driver.is_none_or(|d| r.driver == d))
            .map(|mut row| {
                let open = match self.get(&row.id) {
                    Some(g) => {
                        row.bytes_in = g.bytes_in.get();
                        row.bytes_out = g.bytes_out.get();
                        row.last_used_ms = g.last_used_ms.get();
                        g.open_connections.get()
                    }
                    None => 0,
                };
                GrantListing {
                    row,
                    open_connections: open,
                }
            })
            .collect())
    }

    /// Revokes a grant by id (live effects at once, then the durable record).
    pub async fn revoke(&self, id: &str, reason: &str) -> Result<bool, StateError> {
        let grant = self.inner.borrow_mut().remove(id);
        match grant {
            Some(g) => {
                g.revoke(reason).await?;
                Ok(true)
            }
            None => {
                // Not live: perhaps already revoked; record nothing twice.
                let id2 = id.to_string();
                let row = self.state.call(move |db| db.grant(&id2)).await?;
                Ok(row.is_some_and(|r| r.revoked_ms.is_none()))
            }
        }
    }

    /// Revokes every live grant served by `driver`.
    pub async fn revoke_driver(&self, driver: &str, reason: &str) -> Result<usize, StateError> {
        let ids: Vec<String> = self
            .list()
            .into_iter()
            .filter(|g| g.driver == driver)
            .map(|g| g.id.clone())
            .collect();
        for id in &ids {
            self.revoke(id, reason).await?;
        }
        Ok(ids.len())
    }

    /// Revokes a grain's live grants and deletes all its grants and tokens.
    pub async fn delete_grain(&self, grain: &str) -> Result<(usize, usize), StateError> {
        let live: Vec<Rc<Grant>> = self
            .list()
            .into_iter()
            .filter(|g| g.grain == grain)
            .collect();
        for g in &live {
            self.inner.borrow_mut().remove(&g.id);
            g.revoke_live("the grain was deleted");
        }
        let audit = AuditRecord::new("grain_deleted").grain(grain);
        self.audit.note(&audit);
        let grain = grain.to_string();
        self.state
            .call(move |db| db.delete_grain(&grain, &audit))
            .await
    }

    /// The grain's process ended: close the connections and listeners its grants had open
    /// (nothing can read or answer them any more). Grants and tokens stay.
    pub fn grain_exited(&self, grain: &str) {
        for g in self.list().into_iter().filter(|g| g.grain == grain) {
            g.release_live();
        }
    }

    /// Writes usage counters (last use, bytes) of live grants to the database.
    pub async fn flush_usage(&self) -> Result<(), StateError> {
        let usage: Vec<(String, u64, u64, u64)> = self
            .list()
            .iter()
            .map(|g| {
                (
                    g.id.clone(),
                    g.last_used_ms.get(),
                    g.bytes_in.get(),
                    g.bytes_out.get(),
                )
            })
            .collect();
        if usage.is_empty() {
            return Ok(());
        }
        self.state.call(move |db| db.update_usage(&usage)).await
    }
}

/// A fresh identifier: `prefix-` and 16 random hex digits.
pub fn new_id(prefix: &str) -> String {
    let mut b = [0u8; 8];
    if getrandom::fill(&mut b).is_err() {
        // The OS RNG is unavailable: fall back to time and a counter, still unique.
        static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        b = (now_ms() ^ (n << 48)).to_be_bytes();
    }
    format!("{prefix}-{}", hex::encode(b))
}
