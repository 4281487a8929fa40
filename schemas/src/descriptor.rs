//! Powerbox descriptors: what a grain asks for, in Sandstorm's `PowerboxDescriptor` form.
//!
//! The first tag names the interface by type ID. Its value narrows the request:
//! `IpNetwork.PowerboxTag` (encryption) for IpNetwork, `IpPortPowerboxMetadata`
//! (preferredHost, preferredPortNum) for IpRemoteHost, TcpPort and UdpPort.

use std::fmt;

use crate::ids;
use crate::ip_capnp::{ip_network, ip_port_powerbox_metadata};
use crate::powerbox_capnp::powerbox_descriptor;

/// How connections through a granted IpNetwork are protected.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Encryption {
    /// Plain connections.
    #[default]
    None,
    /// Every TCP connection is wrapped in TLS by the driver, verified against the system CAs.
    Tls,
}

impl fmt::Display for Encryption {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Encryption::None => "none",
            Encryption::Tls => "tls",
        })
    }
}

/// The kind of capability a grain asks for, with the narrowing it asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Requested {
    /// Outbound access to any host the policy allows.
    IpNetwork {
        /// Whether the driver wraps connections in TLS.
        encryption: Encryption,
    },
    /// Inbound access: listening on ports.
    IpInterface,
    /// One host, any port the policy allows.
    IpRemoteHost {
        /// The preferred host (name or address), if the grain said.
        host: Option<String>,
    },
    /// One TCP host and port.
    TcpPort {
        /// The preferred host, if the grain said.
        host: Option<String>,
        /// The preferred port, if the grain said.
        port: Option<u16>,
    },
    /// One UDP host and port.
    UdpPort {
        /// The preferred host, if the grain said.
        host: Option<String>,
        /// The preferred port, if the grain said.
        port: Option<u16>,
    },
}

impl Requested {
    /// The type ID of the requested interface.
    pub fn interface_id(&self) -> u64 {
        match self {
            Requested::IpNetwork { .. } => ids::IP_NETWORK,
            Requested::IpInterface => ids::IP_INTERFACE,
            Requested::IpRemoteHost { .. } => ids::IP_REMOTE_HOST,
            Requested::TcpPort { .. } => ids::TCP_PORT,
            Requested::UdpPort { .. } => ids::UDP_PORT,
        }
    }

    /// The interface name, such as "TcpPort".
    pub fn interface_name(&self) -> &'static str {
        ids::interface_name(self.interface_id()).unwrap_or("unknown")
    }

    /// The preferred host, for the kinds that have one.
    pub fn host(&self) -> Option<&str> {
        match self {
            Requested::IpRemoteHost { host }
            | Requested::TcpPort { host, .. }
            | Requested::UdpPort { host, .. } => host.as_deref(),
            _ => None,
        }
    }

    /// The preferred port, for the kinds that have one.
    pub fn port(&self) -> Option<u16> {
        match self {
            Requested::TcpPort { port, .. } | Requested::UdpPort { port, .. } => *port,
            _ => None,
        }
    }
}

/// A descriptor a grain sent that capnet cannot serve.
#[derive(Debug, thiserror::Error)]
pub enum DescriptorError {
    /// No tags at all.
    #[error("the powerbox descriptor has no tags; its first tag must name the interface wanted")]
    NoTags,
    /// The first tag names an interface capnet does not grant.
    #[error(
        "the powerbox descriptor asks for interface {0:#x}, which capnet does not grant; ask for \
         IpNetwork, IpInterface, IpRemoteHost, TcpPort or UdpPort"
    )]
    UnknownInterface(u64),
    /// The tag value did not parse.
    #[error("the powerbox descriptor's tag value is malformed: {0}")]
    Malformed(#[from] capnp::Error),
}

/// Fills `builder` with a descriptor asking for `req`.
pub fn build(builder: powerbox_descriptor::Builder<'_>, req: &Requested) {
    let mut tags = builder.init_tags(1);
    let mut tag = tags.reborrow().get(0);
    tag.set_id(req.interface_id());
    match req {
        Requested::IpNetwork { encryption } => {
            let value: ip_network::powerbox_tag::Builder<'_> = tag.init_value().init_as();
            let mut enc = value.init_encryption();
            match encryption {
                Encryption::None => enc.set_none(()),
                Encryption::Tls => enc.set_tls(()),
            }
        }
        Requested::IpInterface => {}
        Requested::IpRemoteHost { host } => {
            let mut meta: ip_port_powerbox_metadata::Builder<'_> = tag.init_value().init_as();
            if let Some(h) = host {
                meta.set_preferred_host(h);
            }
        }
        Requested::TcpPort { host, port } | Requested::UdpPort { host, port } => {
            let mut meta: ip_port_powerbox_metadata::Builder<'_> = tag.init_value().init_as();
            if let Some(h) = host {
                meta.set_preferred_host(h);
            }
            meta.set_preferred_port_num(port.unwrap_or(0));
        }
    }
}

/// Reads what a descriptor asks for. Only the first tag is interpreted; capnet grants one
/// interface per request.
pub fn parse(reader: powerbox_descriptor::Reader<'_>) -> Result<Requested, DescriptorError> {
    let tags = reader.get_tags()?;
    if tags.is_empty() {
        return Err(DescriptorError::NoTags);
    }
    let tag = tags.get(0);
    let id = tag.get_id();
    let value = tag.get_value();
    let meta = |value: capnp::any_pointer::Reader<'_>| -> Result<(Option<String>, Option<u16>), DescriptorError> {
        if value.is_null() {
            return Ok((None, None));
        }
        let m: ip_port_powerbox_metadata::Reader<'_> = value.get_as()?;
        let host = if m.has_preferred_host() {
            let h = m.get_preferred_host()?.to_string().map_err(capnp::Error::from)?;
            (!h.is_empty()).then_some(h)
        } else {
            None
        };
        let port = match m.get_preferred_port_num() {
            0 => None,
            p => Some(p),
        };
        Ok((host, port))
    };
    Ok(match id {
        ids::IP_NETWORK | ids::PERSISTENT_IP_NETWORK => {
            let encryption = if value.is_null() {
                Encryption::None
            } else {
                let t: ip_network::powerbox_tag::Reader<'_> = value.get_as()?;
                if t.has_encryption() {
                    match t.get_encryption()?.which() {
                        Ok(ip_network::powerbox_tag::encryption::Which::Tls(())) => Encryption::Tls,
                        Ok(ip_network::powerbox_tag::encryption::Which::None(())) => {
                            Encryption::None
                        }
                        Err(capnp::NotInSchema(n)) => {
                            return Err(DescriptorError::Malformed(capnp::Error::failed(format!(
                                "unknown encryption variant {n}"
                            ))));
                        }
                    }
                } else {
                    Encryption::None
                }
            };
            Requested::IpNetwork { encryption }
        }
        ids::IP_INTERFACE | ids::PERSISTENT_IP_INTERFACE => Requested::IpInterface,
        ids::IP_REMOTE_HOST => Requested::IpRemoteHost {
            host: meta(value)?.0,
        },
        ids::TCP_PORT => {
            let (host, port) = meta(value)?;
            Requested::TcpPort { host, port }
        }
        ids::UDP_PORT => {
            let (host, port) = meta(value)?;
            Requested::UdpPort { host, port }
        }
        other => return Err(DescriptorError::UnknownInterface(other)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(req: Requested) -> Requested {
        let mut msg = capnp::message::Builder::new_default();
        build(msg.init_root(), &req);
        let reader = msg
            .get_root_as_reader::<powerbox_descriptor::Reader<'_>>()
            .expect("root");
        parse(reader).expect("parse")
    }

    /// Every kind a grain can ask for survives build → parse unchanged.
    #[test]
    fn descriptors_roundtrip() {
        for req in [
            Requested::IpNetwork {
                encryption: Encryption::None,
            },
            Requested::IpNetwork {
                encryption: Encryption::Tls,
            },
            Requested::IpInterface,
            Requested::IpRemoteHost {
                host: Some("mail.example.test".into()),
            },
            Requested::TcpPort {
                host: Some("smtp.example.test".into()),
                port: Some(587),
            },
            Requested::UdpPort {
                host: None,
                port: Some(53),
            },
        ] {
            assert_eq!(roundtrip(req.clone()), req);
        }
    }

    /// An empty descriptor and an unknown interface are refused with a message.
    #[test]
    fn bad_descriptors_are_refused() {
        let mut msg = capnp::message::Builder::new_default();
        let root: powerbox_descriptor::Builder<'_> = msg.init_root();
        root.init_tags(0);
        let r = msg.get_root_as_reader().expect("root");
        assert!(matches!(parse(r), Err(DescriptorError::NoTags)));

        let mut msg = capnp::message::Builder::new_default();
        let root: powerbox_descriptor::Builder<'_> = msg.init_root();
        root.init_tags(1).get(0).set_id(0x1234);
        let r = msg.get_root_as_reader().expect("root");
        let err = parse(r).expect_err("unknown id");
        assert!(err.to_string().contains("0x1234"), "{err}");
    }
}
