//! capnet's TCP driver.
//!
//! Serves `IpNetwork` (outbound TCP: `getRemoteHost`, `getRemoteHostByName`, `getTcpPort`,
//! `connect`) and `IpInterface.listenTcp` (inbound TCP; dropping the returned `Handle` stops
//! listening). Everything protocol-independent — the egress policy, name resolution inside
//! the driver, limits, accounting, audit events, revocation and optional TLS for networks
//! granted with `encryption = tls` — comes from `capnet-driver-api`; plain TCP needs no
//! protocol code of its own, so this crate is its manifest.

use capnet_driver_api::capnet_schemas::ids;
use capnet_driver_api::{Driver, DriverError, DriverHost, Manifest, Privileges, Provided};

/// The TCP driver. It has no options of its own; the standard options (resolver, CA files)
/// apply.
#[derive(Debug)]
pub struct TcpDriver;

/// Options of the TCP driver: none beyond the standard ones.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TcpOptions {}

impl Driver for TcpDriver {
    type Options = TcpOptions;

    fn manifest() -> Manifest {
        Manifest {
            name: "tcp".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            description: "Outbound TCP connections and TCP listeners, with optional TLS".into(),
            author: "capnet".into(),
            provides: vec![
                Provided {
                    interface_id: ids::IP_NETWORK,
                    name: "IpNetwork".into(),
                    protocols: vec!["tcp".into(), "tls".into()],
                },
                Provided {
                    interface_id: ids::IP_INTERFACE,
                    name: "IpInterface".into(),
                    protocols: vec!["tcp".into()],
                },
            ],
            privileges: Privileges {
                outbound_tcp: true,
                inbound_tcp: true,
                dns: true,
                ..Default::default()
            },
        }
    }

    fn start(_options: TcpOptions, _host: &DriverHost) -> Result<Self, DriverError> {
        Ok(TcpDriver)
    }
}

capnet_driver_api::export_driver!(TcpDriver);
