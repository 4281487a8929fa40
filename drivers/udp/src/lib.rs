//! capnet's UDP driver.
//!
//! Serves `IpNetwork` for UDP (`getRemoteHost`, `getRemoteHostByName`, `getUdpPort`,
//! `UdpPort.send` with NAT-like return-port mappings) and `IpInterface.listenUdp`
//! (inbound datagrams; each remote peer appears to the grain as its own `UdpPort` for
//! replies). Everything — the egress policy with the UDP amplifier-port defaults, name
//! resolution inside the driver, datagram size and rate limits, mappings that expire when
//! idle, audit events and revocation — comes from `capnet-driver-api` (see its `udp`
//! module), so this crate is its manifest.
//!
//! Options: only the standard ones; `udp_idle_secs` sets how long a mapping lives without
//! traffic (default 60).

#![warn(missing_docs)]

use capnet_driver_api::capnet_schemas::ids;
use capnet_driver_api::{Driver, DriverError, DriverHost, Manifest, Privileges, Provided};

/// The UDP driver.
#[derive(Debug)]
pub struct UdpDriver;

/// Options of the UDP driver: none beyond the standard ones.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UdpOptions {}

impl Driver for UdpDriver {
    type Options = UdpOptions;

    fn manifest() -> Manifest {
        Manifest {
            name: "udp".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            description: "UDP datagrams with NAT-like return ports, and UDP listeners".into(),
            author: "capnet".into(),
            provides: vec![
                Provided {
                    interface_id: ids::IP_NETWORK,
                    name: "IpNetwork".into(),
                    protocols: vec!["udp".into()],
                },
                Provided {
                    interface_id: ids::IP_INTERFACE,
                    name: "IpInterface".into(),
                    protocols: vec!["udp".into()],
                },
            ],
            privileges: Privileges {
                outbound_udp: true,
                inbound_udp: true,
                dns: true,
                ..Default::default()
            },
        }
    }

    fn start(_options: UdpOptions, _host: &DriverHost) -> Result<Self, DriverError> {
        Ok(UdpDriver)
    }
}

capnet_driver_api::export_driver!(UdpDriver);
