//! capnet's wire formats: the Cap'n Proto schemas and the helpers every process shares.
//!
//! This crate is an API boundary. It is the only crate that knows the layout of generated
//! code; the rest of capnet uses the re-exported modules below and the helpers in [`ip`],
//! [`descriptor`], [`rpc`] and [`bytestream`].
//!
//! * Sandstorm-compatible schemas (type IDs, names, ordinals and parameter types kept):
//!   [`util_capnp`], [`ip_capnp`], [`powerbox_capnp`], [`persistent_capnp`],
//!   [`system_persistent_capnp`]. The IDs are listed in [`ids`] and checked by a test.
//! * capnet's own: [`grain_capnp`] (the grain API on fd 3), [`driver_capnp`] (supervisor ↔
//!   driver plugin), [`admin_capnp`] (the administrator's socket), [`manifest_capnp`] and
//!   [`policy_capnp`].

macro_rules! schema_module {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[allow(
            clippy::all,
            clippy::pedantic,
            clippy::undocumented_unsafe_blocks,
            clippy::unwrap_used,
            missing_docs,
            unused_qualifications
        )]
        pub mod $name {
            include!(concat!(env!("OUT_DIR"), "/", stringify!($name), ".rs"));
        }
    };
}

schema_module!(
    /// Sandstorm's `util.capnp`: `ByteStream`, `Handle`, `LocalizedText`.
    util_capnp
);
schema_module!(
    /// Sandstorm's `powerbox.capnp`: `PowerboxDescriptor`.
    powerbox_capnp
);
schema_module!(
    /// Cap'n Proto's `Persistent` interface with its upstream IDs.
    persistent_capnp
);
schema_module!(
    /// Sandstorm's `SystemPersistent` and the types of its parameters.
    system_persistent_capnp
);
schema_module!(
    /// Sandstorm's `ip.capnp`: `IpNetwork`, `IpInterface`, `IpRemoteHost`, `TcpPort`, `UdpPort`.
    ip_capnp
);
schema_module!(
    /// capnet: a driver plugin's manifest and privileges.
    manifest_capnp
);
schema_module!(
    /// capnet: egress policy rules and per-grant limits.
    policy_capnp
);
schema_module!(
    /// capnet: the supervisor ↔ driver protocol.
    driver_capnp
);
schema_module!(
    /// capnet: the grain API served on fd 3.
    grain_capnp
);
schema_module!(
    /// capnet: the administrator's API.
    admin_capnp
);

pub mod bytestream;
pub mod descriptor;
pub mod grain;
pub mod ids;
pub mod ip;
pub mod rpc;

/// The driver protocol schema ID that every plugin's magic block must carry: the file ID
/// of `driver.capnp`. Changing the Driver protocol incompatibly means a new file ID.
pub const DRIVER_PROTOCOL_SCHEMA_ID: u64 = 0xe7c3_a95b_1d4f_2086;
