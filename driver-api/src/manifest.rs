//! What a plugin says about itself: name, version, what it provides, what it needs.
//!
//! The manifest travels in the magic block as a flat Cap'n Proto message (`Manifest` in
//! `manifest.capnp`), is shown by `capnet driver inspect`, and the administrator's approval
//! is pinned to its privileges: the supervisor never gives a driver a privilege that was
//! not approved.

use capnet_schemas::manifest_capnp::{manifest, privileges};
use serde::{Deserialize, Serialize};

/// One interface a plugin serves.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Provided {
    /// Type ID of the interface, such as `capnet_schemas::ids::IP_NETWORK`.
    pub interface_id: u64,
    /// Display name, such as "IpNetwork".
    pub name: String,
    /// Protocols spoken through it, such as `["tcp"]`.
    pub protocols: Vec<String>,
}

/// Host privileges a plugin may ask for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Privileges {
    /// Open TCP connections to hosts the policy allows.
    pub outbound_tcp: bool,
    /// Send UDP datagrams to hosts the policy allows.
    pub outbound_udp: bool,
    /// Listen for TCP connections.
    pub inbound_tcp: bool,
    /// Receive UDP datagrams on bound ports.
    pub inbound_udp: bool,
    /// Bind ports below 1024.
    pub low_ports: bool,
    /// Resolve host names.
    pub dns: bool,
}

impl Privileges {
    /// The privileges in `self` that `approved` lacks, by name; empty if `self` asks for
    /// nothing more than was approved.
    pub fn exceeding(&self, approved: &Privileges) -> Vec<&'static str> {
        let mut out = Vec::new();
        for (name, asked, ok) in [
            ("outbound_tcp", self.outbound_tcp, approved.outbound_tcp),
            ("outbound_udp", self.outbound_udp, approved.outbound_udp),
            ("inbound_tcp", self.inbound_tcp, approved.inbound_tcp),
            ("inbound_udp", self.inbound_udp, approved.inbound_udp),
            ("low_ports", self.low_ports, approved.low_ports),
            ("dns", self.dns, approved.dns),
        ] {
            if asked && !ok {
                out.push(name);
            }
        }
        out
    }

    /// The privileges that are set, by name.
    pub fn names(&self) -> Vec<&'static str> {
        self.exceeding(&Privileges::default())
    }

    /// Writes into a capnp builder.
    pub fn write(&self, mut b: privileges::Builder<'_>) {
        b.set_outbound_tcp(self.outbound_tcp);
        b.set_outbound_udp(self.outbound_udp);
        b.set_inbound_tcp(self.inbound_tcp);
        b.set_inbound_udp(self.inbound_udp);
        b.set_low_ports(self.low_ports);
        b.set_dns(self.dns);
    }

    /// Reads from a capnp reader.
    pub fn read(r: privileges::Reader<'_>) -> Self {
        Self {
            outbound_tcp: r.get_outbound_tcp(),
            outbound_udp: r.get_outbound_udp(),
            inbound_tcp: r.get_inbound_tcp(),
            inbound_udp: r.get_inbound_udp(),
            low_ports: r.get_low_ports(),
            dns: r.get_dns(),
        }
    }
}

/// A plugin's manifest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Short name: lower-case letters, digits and '-'.
    pub name: String,
    /// Semantic version.
    pub version: String,
    /// One line for the administrator.
    pub description: String,
    /// Who wrote it.
    pub author: String,
    /// The interfaces it serves.
    pub provides: Vec<Provided>,
    /// What it needs from the host.
    pub privileges: Privileges,
}

/// A manifest that could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The bytes are not a valid Cap'n Proto message of the expected shape.
    #[error("the manifest is not a valid Cap'n Proto message: {0}")]
    Decode(#[from] capnp::Error),
    /// A text field is not UTF-8.
    #[error("the manifest has a field that is not UTF-8: {0}")]
    Utf8(#[from] std::str::Utf8Error),
}

impl Manifest {
    /// Writes into a capnp builder.
    pub fn write(&self, mut b: manifest::Builder<'_>) {
        b.set_name(&self.name);
        b.set_version(&self.version);
        b.set_description(&self.description);
        b.set_author(&self.author);
        let mut list = b.reborrow().init_provides(self.provides.len() as u32);
        for (i, p) in self.provides.iter().enumerate() {
            let mut e = list.reborrow().get(i as u32);
            e.set_interface_id(p.interface_id);
            e.set_name(&p.name);
            let mut protos = e.init_protocols(p.protocols.len() as u32);
            for (j, proto) in p.protocols.iter().enumerate() {
                protos.set(j as u32, proto);
            }
        }
        self.privileges.write(b.init_privileges());
    }

    /// Reads from a capnp reader.
    pub fn read(r: manifest::Reader<'_>) -> Result<Self, ManifestError> {
        let text = |t: capnp::Result<capnp::text::Reader<'_>>| -> Result<String, ManifestError> {
            Ok(t?.to_str()?.to_string())
        };
        let mut provides = Vec::new();
        for p in r.get_provides()? {
            let mut protocols = Vec::new();
            for proto in p.get_protocols()? {
                protocols.push(proto?.to_str()?.to_string());
            }
            provides.push(Provided {
                interface_id: p.get_interface_id(),
                name: text(p.get_name())?,
                protocols,
            });
        }
        Ok(Self {
            name: text(r.get_name())?,
            version: text(r.get_version())?,
            description: text(r.get_description())?,
            author: text(r.get_author())?,
            provides,
            privileges: Privileges::read(r.get_privileges()?),
        })
    }

    /// Serialises to a flat Cap'n Proto message, as carried in the magic block.
    pub fn to_message(&self) -> Vec<u8> {
        let mut msg = capnp::message::Builder::new_default();
        self.write(msg.init_root());
        capnp::serialize::write_message_to_words(&msg)
    }

    /// Parses a flat message from a magic block, with tight reader limits (the bytes come
    /// from a plugin).
    pub fn from_message(bytes: &[u8]) -> Result<Self, ManifestError> {
        let mut options = capnp::message::ReaderOptions::new();
        options.traversal_limit_in_words(Some(64 * 1024));
        options.nesting_limit(16);
        let mut slice = bytes;
        let msg = capnp::serialize::read_message_from_flat_slice(&mut slice, options)?;
        Self::read(msg.get_root()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        Manifest {
            name: "tcp".into(),
            version: "1.0.0".into(),
            description: "TCP".into(),
            author: "capnet".into(),
            provides: vec![Provided {
                interface_id: capnet_schemas::ids::IP_NETWORK,
                name: "IpNetwork".into(),
                protocols: vec!["tcp".into()],
            }],
            privileges: Privileges {
                outbound_tcp: true,
                dns: true,
                ..Default::default()
            },
        }
    }

    /// A manifest survives the trip through the magic block's flat message.
    #[test]
    fn manifest_roundtrip() {
        let m = sample();
        assert_eq!(Manifest::from_message(&m.to_message()).expect("decode"), m);
    }

    /// Garbage is refused with an error, not a panic.
    #[test]
    fn garbage_manifest_is_refused() {
        assert!(Manifest::from_message(b"not a capnp message at all").is_err());
        assert!(Manifest::from_message(&[]).is_err());
    }

    /// Privileges beyond the approval are named.
    #[test]
    fn exceeding_privileges_are_named() {
        let asked = Privileges {
            outbound_tcp: true,
            low_ports: true,
            ..Default::default()
        };
        let approved = Privileges {
            outbound_tcp: true,
            ..Default::default()
        };
        assert_eq!(asked.exceeding(&approved), vec!["low_ports"]);
        assert!(approved.exceeding(&asked).is_empty());
    }
}
