//! A test harness for driver authors: runs a [`Driver`] over an in-memory Cap'n Proto
//! connection exactly as the supervisor would (start, open grants, collect audit events),
//! so a driver can be tested with `cargo test` and no daemon.
//!
//! ```no_run
//! # async fn demo() -> Result<(), capnp::Error> {
//! # struct MyDriver;
//! # impl capnet_driver_api::Driver for MyDriver {
//! #   type Options = capnet_driver_api::NoOptions;
//! #   fn manifest() -> capnet_driver_api::Manifest { unimplemented!() }
//! #   fn start(_: capnet_driver_api::NoOptions, _: &capnet_driver_api::DriverHost) -> Result<Self, capnet_driver_api::DriverError> { Ok(MyDriver) }
//! # }
//! use capnet_driver_api::testing::{Harness, HarnessConfig, GrantConfig};
//! // Inside a tokio LocalSet:
//! let harness = Harness::start::<MyDriver>(HarnessConfig::default()).await?;
//! let grant = harness.open_grant(GrantConfig::default()).await?;
//! let network = grant.network().await?;
//! # Ok(()) }
//! ```

use std::cell::RefCell;
use std::future::Future;
use std::rc::Rc;

use capnet_schemas::driver_capnp::{driver, event_sink, grant_session, grant_spec};
use capnet_schemas::ip_capnp::{ip_interface, ip_network};
use capnet_schemas::rpc::two_party;
use capnp_rpc::rpc_twoparty_capnp::Side;

use crate::driver::Driver;
use crate::events::Event;
use crate::limits::Limits;
use crate::manifest::{Manifest, Privileges};
use crate::policy::{Action, RuleConfig, RuleDirection, write_rule_configs};
use crate::servers::DriverImpl;

/// How to start the driver under test.
#[derive(Clone, Debug)]
pub struct HarnessConfig {
    /// The driver's instance name.
    pub name: String,
    /// `[drivers.NAME.options]` as TOML text.
    pub options_toml: String,
    /// Approved privileges (default: everything but low ports).
    pub privileges: Privileges,
    /// Listen addresses (default 127.0.0.1).
    pub listen_addresses: Vec<String>,
    /// Driver-wide rules (default: allow loopback, so tests can reach local servers).
    pub rules: Vec<RuleConfig>,
}

impl Default for HarnessConfig {
    fn default() -> Self {
        Self {
            name: "test".into(),
            options_toml: String::new(),
            privileges: Privileges {
                outbound_tcp: true,
                outbound_udp: true,
                inbound_tcp: true,
                inbound_udp: true,
                low_ports: false,
                dns: true,
            },
            listen_addresses: vec!["127.0.0.1".into()],
            rules: vec![RuleConfig {
                action: Action::Allow,
                hosts: Vec::new(),
                cidrs: vec!["127.0.0.0/8".into(), "::1/128".into()],
                ports: Vec::new(),
                direction: RuleDirection::Both,
                label: "test: loopback".into(),
            }],
        }
    }
}

/// One grant to open.
#[derive(Clone, Debug, Default)]
pub struct GrantConfig {
    /// Grant ID (default "grant-1").
    pub id: Option<String>,
    /// Grain ID (default "grain-1").
    pub grain: Option<String>,
    /// Whether connections are wrapped in TLS.
    pub tls: bool,
    /// The grant's own rules.
    pub rules: Vec<RuleConfig>,
    /// Limits.
    pub limits: Limits,
    /// The only host reachable (narrow grants).
    pub scope_host: Option<String>,
    /// The only port reachable (narrow grants).
    pub scope_port: u16,
}

/// A driver running in-process.
pub struct Harness {
    driver: driver::Client,
    manifest: Manifest,
    events: Rc<RefCell<Vec<Event>>>,
    new_event: Rc<tokio::sync::Notify>,
}

struct Recorder(Rc<RefCell<Vec<Event>>>, Rc<tokio::sync::Notify>);

impl event_sink::Server for Recorder {
    fn report(
        self: Rc<Self>,
        params: event_sink::ReportParams,
    ) -> impl Future<Output = Result<(), capnp::Error>> + 'static {
        let r = params
            .get()
            .and_then(|p| p.get_event())
            .and_then(Event::read)
            .map(|e| {
                self.0.borrow_mut().push(e);
                self.1.notify_waiters();
            });
        std::future::ready(r)
    }
}

impl Harness {
    /// Starts driver `D` over an in-memory connection. Must run inside a tokio `LocalSet`.
    pub async fn start<D: Driver>(config: HarnessConfig) -> Result<Self, capnp::Error> {
        let (ours, theirs) = tokio::io::duplex(1 << 20);
        let server: driver::Client = capnp_rpc::new_client(DriverImpl::<D>::new());
        tokio::task::spawn_local(two_party(theirs, Side::Server, Some(server.client)));
        let mut rpc = two_party(ours, Side::Client, None);
        let driver: driver::Client = rpc.bootstrap(Side::Server);
        tokio::task::spawn_local(rpc);

        let events = Rc::new(RefCell::new(Vec::new()));
        let new_event = Rc::new(tokio::sync::Notify::new());
        let sink: event_sink::Client =
            capnp_rpc::new_client(Recorder(events.clone(), new_event.clone()));
        let mut req = driver.start_request();
        {
            let mut p = req.get();
            p.set_events(sink);
            let mut c = p.init_config();
            c.set_name(&config.name);
            c.set_options_toml(&config.options_toml);
            config.privileges.write(c.reborrow().init_privileges());
            let mut la = c
                .reborrow()
                .init_listen_addresses(config.listen_addresses.len() as u32);
            for (i, a) in config.listen_addresses.iter().enumerate() {
                la.set(i as u32, a);
            }
            write_rule_configs(&config.rules, c.init_policy())
                .map_err(|e| capnp::Error::failed(e.to_string()))?;
        }
        let resp = req.send().promise.await?;
        let manifest = Manifest::read(resp.get()?.get_manifest()?)
            .map_err(|e| capnp::Error::failed(e.to_string()))?;
        Ok(Self {
            driver,
            manifest,
            events,
            new_event,
        })
    }

    /// The manifest the driver returned from `start`.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The `Driver` capability, as the supervisor holds it.
    pub fn driver(&self) -> &driver::Client {
        &self.driver
    }

    /// Opens a grant.
    pub async fn open_grant(&self, grant: GrantConfig) -> Result<TestGrant, capnp::Error> {
        let mut req = self.driver.open_grant_request();
        {
            let mut s = req.get().init_spec();
            s.set_grant_id(grant.id.as_deref().unwrap_or("grant-1"));
            s.set_grain_id(grant.grain.as_deref().unwrap_or("grain-1"));
            s.set_encryption(if grant.tls {
                grant_spec::Encryption::Tls
            } else {
                grant_spec::Encryption::None
            });
            write_rule_configs(&grant.rules, s.reborrow().init_policy())
                .map_err(|e| capnp::Error::failed(e.to_string()))?;
            s.set_scope_host(grant.scope_host.as_deref().unwrap_or(""));
            s.set_scope_port(grant.scope_port);
            grant.limits.write_capnp(s.init_limits());
        }
        let session = req.send().promise.await?.get()?.get_session()?;
        Ok(TestGrant { session })
    }

    /// The audit events the driver has reported so far.
    pub fn events(&self) -> Vec<Event> {
        self.events.borrow().clone()
    }

    /// Waits until the driver has reported an event for which `matches` holds (or one
    /// already was), and returns it; `None` if none arrives within `timeout`.
    pub async fn wait_event(
        &self,
        timeout: std::time::Duration,
        matches: impl Fn(&Event) -> bool,
    ) -> Option<Event> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.new_event.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(e) = self.events.borrow().iter().find(|e| matches(e)) {
                return Some(e.clone());
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return None;
            }
        }
    }
}

/// An open grant.
pub struct TestGrant {
    /// The grant session.
    pub session: grant_session::Client,
}

impl TestGrant {
    /// The grant's `IpNetwork`.
    pub async fn network(&self) -> Result<ip_network::Client, capnp::Error> {
        self.session
            .network_request()
            .send()
            .promise
            .await?
            .get()?
            .get_network()
    }

    /// The grant's `IpInterface`.
    pub async fn interface(&self) -> Result<ip_interface::Client, capnp::Error> {
        self.session
            .interface_request()
            .send()
            .promise
            .await?
            .get()?
            .get_interface()
    }

    /// Revokes the grant.
    pub async fn revoke(&self, reason: &str) -> Result<(), capnp::Error> {
        let mut req = self.session.revoke_request();
        req.get().set_reason(reason);
        req.send().promise.await?;
        Ok(())
    }
}

/// A driver with nothing of its own: the crate's default TCP and UDP behaviour under the
/// grant's policy and limits. Useful to test the generic servers, or as a baseline.
pub struct PlainDriver;

impl Driver for PlainDriver {
    type Options = crate::NoOptions;

    fn manifest() -> Manifest {
        Manifest {
            name: "plain".into(),
            version: "0.0.0".into(),
            description: "the driver-api defaults, for tests".into(),
            author: "capnet".into(),
            provides: vec![],
            privileges: Privileges::default(),
        }
    }

    fn start(_: crate::NoOptions, _: &crate::DriverHost) -> Result<Self, crate::DriverError> {
        Ok(PlainDriver)
    }
}

/// Runs `f` to completion on a current-thread tokio runtime inside a `LocalSet`, as the
/// driver host does (Cap'n Proto objects are not `Send`). Panics if the runtime cannot be
/// built, which only a test should call this for.
pub fn run_local<T>(f: impl Future<Output = T>) -> T {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime for the test");
    tokio::task::LocalSet::new().block_on(&rt, f)
}
