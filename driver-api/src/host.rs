//! What the plugin gets from driver-api at start: its name, its approved privileges, its
//! listen addresses, name resolution, TLS, and the audit event reporter.

use std::cell::{Cell, OnceCell};
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use serde::Deserialize;

use crate::driver::DriverError;
use crate::events::{Event, EventReporter};
use crate::manifest::Privileges;
use crate::policy::HostName;
use crate::resolve::{Resolver, ResolverOptions};

/// Keys of `[drivers.NAME.options]` that driver-api handles for every driver; the rest is
/// given to the driver's own `Options` type.
pub const STANDARD_OPTION_KEYS: &[&str] = &[
    "nameservers",
    "static_hosts",
    "extra_ca_files",
    "system_ca",
    "udp_idle_secs",
];

/// Options every driver accepts in `[drivers.NAME.options]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StandardOptions {
    /// DNS servers to ask instead of those in `/etc/resolv.conf`, as `address:port`.
    #[serde(default)]
    pub nameservers: Vec<SocketAddr>,
    /// Fixed answers for host names, consulted before DNS (like `/etc/hosts`).
    #[serde(default)]
    pub static_hosts: BTreeMap<String, Vec<IpAddr>>,
    /// Extra PEM files of CA certificates to trust for TLS.
    #[serde(default)]
    pub extra_ca_files: Vec<PathBuf>,
    /// Whether to trust the system CA certificates (default true).
    #[serde(default = "yes")]
    pub system_ca: bool,
    /// Seconds a UDP mapping lives without a datagram in either direction (default 60).
    #[serde(default)]
    pub udp_idle_secs: Option<u64>,
}

fn yes() -> bool {
    true
}

impl Default for StandardOptions {
    fn default() -> Self {
        Self {
            nameservers: Vec::new(),
            static_hosts: BTreeMap::new(),
            extra_ca_files: Vec::new(),
            system_ca: true,
            udp_idle_secs: None,
        }
    }
}

/// Splits the administrator's options table into the standard part and the driver's part.
pub fn split_options(toml_text: &str) -> Result<(StandardOptions, toml::Table), DriverError> {
    let mut table: toml::Table = toml::from_str(toml_text)
        .map_err(|e| DriverError::Options(format!("options are not valid TOML: {e}")))?;
    let mut standard = toml::Table::new();
    for key in STANDARD_OPTION_KEYS {
        if let Some(v) = table.remove(*key) {
            standard.insert((*key).to_string(), v);
        }
    }
    let standard: StandardOptions = standard
        .try_into()
        .map_err(|e| DriverError::Options(format!("standard options: {e}")))?;
    Ok((standard, table))
}

pub(crate) struct HostState {
    pub(crate) name: String,
    pub(crate) privileges: Privileges,
    pub(crate) listen_addresses: Vec<IpAddr>,
    pub(crate) options: StandardOptions,
    pub(crate) events: EventReporter,
    resolver: Resolver,
    pub(crate) started: Instant,
    pub(crate) open_connections: Cell<u32>,
    pub(crate) open_listeners: Cell<u32>,
    pub(crate) grants: Cell<u32>,
    tls: OnceCell<Arc<rustls::ClientConfig>>,
}

/// The driver's view of its host. Cheap to clone.
#[derive(Clone)]
pub struct DriverHost {
    pub(crate) state: Rc<HostState>,
}

impl DriverHost {
    pub(crate) fn new(
        name: String,
        privileges: Privileges,
        listen_addresses: Vec<IpAddr>,
        options: StandardOptions,
        events: EventReporter,
    ) -> Result<Self, DriverError> {
        let mut ropts = if options.nameservers.is_empty() {
            ResolverOptions::system()
        } else {
            ResolverOptions::with_nameservers(options.nameservers.clone())
        };
        for (name, addrs) in &options.static_hosts {
            let host = HostName::parse(name).map_err(|e| {
                DriverError::Options(format!("static_hosts: {name:?} is not a host name: {e}"))
            })?;
            for a in addrs {
                ropts = ropts.host(host.clone(), *a);
            }
        }
        let resolver = Resolver::new(&ropts)
            .map_err(|e| DriverError::Options(format!("cannot set up name resolution: {e}")))?;
        Ok(Self {
            state: Rc::new(HostState {
                name,
                privileges,
                listen_addresses,
                options,
                events,
                resolver,
                started: Instant::now(),
                open_connections: Cell::new(0),
                open_listeners: Cell::new(0),
                grants: Cell::new(0),
                tls: OnceCell::new(),
            }),
        })
    }

    /// The administrator's name for this driver instance.
    pub fn name(&self) -> &str {
        &self.state.name
    }

    /// The privileges the administrator approved. Never use others.
    pub fn privileges(&self) -> Privileges {
        self.state.privileges
    }

    /// Addresses that listeners bind to.
    pub fn listen_addresses(&self) -> &[IpAddr] {
        &self.state.listen_addresses
    }

    /// The standard options (resolver, CA files).
    pub fn standard_options(&self) -> &StandardOptions {
        &self.state.options
    }

    /// How long a UDP mapping lives without traffic (`udp_idle_secs`).
    pub fn udp_idle(&self) -> std::time::Duration {
        match self.state.options.udp_idle_secs {
            Some(s) if s > 0 => std::time::Duration::from_secs(s),
            _ => crate::udp::DEFAULT_UDP_IDLE,
        }
    }

    /// Reports an audit event.
    pub fn report(&self, event: Event) {
        self.state.events.report(event);
    }

    /// The TLS client configuration (system CAs plus `extra_ca_files`), built on first use.
    pub fn tls_config(&self) -> Result<Arc<rustls::ClientConfig>, DriverError> {
        if let Some(c) = self.state.tls.get() {
            return Ok(c.clone());
        }
        let o = &self.state.options;
        let config = crate::tls::client_config(o.system_ca, &o.extra_ca_files)
            .map_err(|e| DriverError::Other(e.to_string()))?;
        let _ = self.state.tls.set(config.clone());
        Ok(config)
    }

    /// The resolver: static hosts from the options, then `/etc/hosts` and the system's
    /// (or the configured) name servers. Vet what it returns with the policy, or better,
    /// use [`ConnectContext::dial`](crate::ConnectContext::dial) or
    /// [`resolve_vetted`](crate::resolve::resolve_vetted).
    pub fn resolver(&self) -> &Resolver {
        &self.state.resolver
    }

    /// Whether the options list `name` as a static host.
    pub fn has_static_host(&self, name: &str) -> bool {
        self.state.options.static_hosts.keys().any(|k| {
            k.trim_end_matches('.')
                .eq_ignore_ascii_case(name.trim_end_matches('.'))
        })
    }
}
