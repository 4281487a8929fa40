//! The driver side of one grant: its policy, limits, live connections and listeners, and
//! revocation.
//!
//! Every object derived from a grant (network, remote host, port, connection, listener)
//! holds the grant's state. Revoking the grant (an explicit `revoke` or the supervisor
//! releasing the session) closes every connection, listener and UDP mapping at once and makes every
//! later call fail with a `revoked:` error.

use std::cell::{Cell, RefCell};
use std::rc::{Rc, Weak};

use capnet_schemas::descriptor::Encryption;

use crate::conn::ConnShared;
use crate::host::DriverHost;
use crate::limits::{ConnectionPermit, GrantLimiter, LimitError, Limits, ListenerPermit};
use crate::listen::ListenerShared;
use crate::policy::{HostSpec, Policy, canonical_ip};
use crate::servers::DynDriver;
use crate::udp::{Mappings, UdpListener};

/// What a narrow grant may reach at most (empty/zero: anything the policy allows).
#[derive(Clone, Debug, Default)]
pub(crate) struct Scope {
    pub(crate) host: Option<HostSpec>,
    pub(crate) port: u16,
}

impl Scope {
    pub(crate) fn check_host(&self, grant: &str, h: &HostSpec) -> Result<(), capnp::Error> {
        let same = |a: &HostSpec, b: &HostSpec| match (a, b) {
            (HostSpec::Addr(x), HostSpec::Addr(y)) => canonical_ip(*x) == canonical_ip(*y),
            (HostSpec::Name(x), HostSpec::Name(y)) => x == y,
            _ => false,
        };
        match &self.host {
            Some(only) if !same(only, h) => Err(capnp::Error::failed(format!(
                "refused: grant {grant} reaches only host {only}, not {h}"
            ))),
            _ => Ok(()),
        }
    }

    pub(crate) fn check_port(&self, grant: &str, port: u16) -> Result<(), capnp::Error> {
        if self.port != 0 && self.port != port {
            return Err(capnp::Error::failed(format!(
                "refused: grant {grant} reaches only port {}, not {port}",
                self.port
            )));
        }
        Ok(())
    }
}

/// What a grant is, as the supervisor's `GrantSpec` says.
pub(crate) struct GrantTerms {
    pub(crate) id: String,
    pub(crate) grain: String,
    pub(crate) encryption: Encryption,
    pub(crate) limits: Limits,
    pub(crate) scope: Scope,
}

pub(crate) struct GrantState {
    pub(crate) id: String,
    pub(crate) grain: String,
    pub(crate) encryption: Encryption,
    pub(crate) policy: Policy,
    pub(crate) limiter: GrantLimiter,
    pub(crate) host: DriverHost,
    pub(crate) driver: Rc<dyn DynDriver>,
    pub(crate) scope: Scope,
    revoked: RefCell<Option<String>>,
    conns: RefCell<Vec<Weak<ConnShared>>>,
    listeners: RefCell<Vec<Weak<ListenerShared>>>,
    udp_listeners: RefCell<Vec<Weak<UdpListener>>>,
    pub(crate) udp_mappings: Mappings,
    pub(crate) bytes_in: Cell<u64>,
    pub(crate) bytes_out: Cell<u64>,
    pub(crate) open_connections: Cell<u32>,
    pub(crate) open_listeners: Cell<u32>,
    pub(crate) connections_total: Cell<u64>,
    pub(crate) refusals: Cell<u64>,
}

impl GrantState {
    pub(crate) fn new(
        terms: GrantTerms,
        policy: Policy,
        host: DriverHost,
        driver: Rc<dyn DynDriver>,
    ) -> Rc<Self> {
        let GrantTerms {
            id,
            grain,
            encryption,
            limits,
            scope,
        } = terms;
        host.state.grants.set(host.state.grants.get() + 1);
        Rc::new(Self {
            id,
            grain,
            encryption,
            policy,
            limiter: GrantLimiter::new(limits),
            host,
            driver,
            scope,
            revoked: RefCell::new(None),
            conns: RefCell::new(Vec::new()),
            listeners: RefCell::new(Vec::new()),
            udp_listeners: RefCell::new(Vec::new()),
            udp_mappings: Mappings::default(),
            bytes_in: Cell::new(0),
            bytes_out: Cell::new(0),
            open_connections: Cell::new(0),
            open_listeners: Cell::new(0),
            connections_total: Cell::new(0),
            refusals: Cell::new(0),
        })
    }

    /// Fails with a `revoked:` error once the grant is revoked.
    pub(crate) fn check_live(&self) -> Result<(), capnp::Error> {
        match &*self.revoked.borrow() {
            Some(reason) => Err(capnp::Error::failed(format!(
                "revoked: grant {} was revoked ({reason})",
                self.id
            ))),
            None => Ok(()),
        }
    }

    pub(crate) fn is_revoked(&self) -> bool {
        self.revoked.borrow().is_some()
    }

    /// Closes everything and refuses every later call.
    pub(crate) fn revoke(&self, reason: &str) {
        if self.revoked.borrow().is_some() {
            return;
        }
        *self.revoked.borrow_mut() = Some(reason.to_string());
        let conns = std::mem::take(&mut *self.conns.borrow_mut());
        for c in conns.iter().filter_map(Weak::upgrade) {
            c.kill(&format!("revoked: {reason}"));
        }
        let listeners = std::mem::take(&mut *self.listeners.borrow_mut());
        for l in listeners.iter().filter_map(Weak::upgrade) {
            l.stop("revoked");
        }
        let udp = std::mem::take(&mut *self.udp_listeners.borrow_mut());
        for l in udp.iter().filter_map(Weak::upgrade) {
            l.stop("revoked");
        }
        self.udp_mappings.close_all(&format!("revoked: {reason}"));
    }

    pub(crate) fn register_conn(&self, c: &Rc<ConnShared>) {
        let mut conns = self.conns.borrow_mut();
        conns.retain(|w| w.strong_count() > 0);
        conns.push(Rc::downgrade(c));
    }

    pub(crate) fn register_listener(&self, l: &Rc<ListenerShared>) {
        let mut ls = self.listeners.borrow_mut();
        ls.retain(|w| w.strong_count() > 0);
        ls.push(Rc::downgrade(l));
    }

    pub(crate) fn register_udp_listener(&self, l: &Rc<UdpListener>) {
        let mut ls = self.udp_listeners.borrow_mut();
        ls.retain(|w| w.strong_count() > 0);
        ls.push(Rc::downgrade(l));
    }

    /// Admits a new connection under the grant's limits; the permit counts it while held.
    pub(crate) fn admit_connection(&self) -> Result<ConnectionPermit, LimitError> {
        self.limiter.open_connection()
    }

    /// Admits a new listener under the grant's limits.
    pub(crate) fn admit_listener(&self) -> Result<ListenerPermit, LimitError> {
        self.limiter.open_listener()
    }
}

impl Drop for GrantState {
    fn drop(&mut self) {
        let s = &self.host.state;
        s.grants.set(s.grants.get().saturating_sub(1));
    }
}
