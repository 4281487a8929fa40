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
    network: RefCell<Option<(u64, ip_network::Client)>>,
    live: RefCell<Vec<Weak<dyn Revocable>>>,
    drivers: DriverManager,
    audit: Audit,
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

    /// Revokes the grant now: later calls fail, driver objects are released, the driver
    /// closes the grant's connections and listeners.
    pub fn revoke(&self, reason: &str) {
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
        self.audit.record(
            AuditRecord::new("revoke")
                .grain(&self.grain)
                .grant(&self.id)
                .driver(&self.driver)
                .detail(reason.to_string()),
        );
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
}

/// All live grants.
#[derive(Clone)]
pub struct GrantTable {
    inner: Rc<RefCell<BTreeMap<String, Rc<Grant>>>>,
    drivers: DriverManager,
    audit: Audit,
}

impl GrantTable {
    /// An empty table.
    pub fn new(drivers: DriverManager, audit: Audit) -> Self {
        Self {
            inner: Rc::default(),
            drivers,
            audit,
        }
    }

    /// Creates a grant.
    pub fn create(&self, g: NewGrant) -> Rc<Grant> {
        let id = new_id("grant");
        let grant = Rc::new(Grant {
            id: id.clone(),
            grain: g.grain,
            driver: g.driver,
            kind: g.kind,
            label: g.label,
            rules: g.rules,
            limits: g.limits,
            created_ms: now_ms(),
            last_used_ms: Cell::new(0),
            bytes_in: Cell::new(0),
            bytes_out: Cell::new(0),
            open_connections: Cell::new(0),
            revoked: RefCell::new(None),
            session: RefCell::new(None),
            network: RefCell::new(None),
            live: RefCell::new(Vec::new()),
            drivers: self.drivers.clone(),
            audit: self.audit.clone(),
        });
        self.inner.borrow_mut().insert(id, grant.clone());
        grant
    }

    /// A grant by id.
    pub fn get(&self, id: &str) -> Option<Rc<Grant>> {
        self.inner.borrow().get(id).cloned()
    }

    /// Every grant, by id.
    pub fn list(&self) -> Vec<Rc<Grant>> {
        self.inner.borrow().values().cloned().collect()
    }

    /// Forgets a grant (after revocation).
    pub fn remove(&self, id: &str) -> Option<Rc<Grant>> {
        self.inner.borrow_mut().remove(id)
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
