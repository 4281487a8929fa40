//! Type IDs that must stay equal to Sandstorm's, so clients compiled from Sandstorm's
//! schema files interoperate. `tests::sandstorm_type_ids` checks each against the
//! generated code.

/// `IpNetwork` (ip.capnp).
pub const IP_NETWORK: u64 = 0xa982_576b_7a2a_2040;
/// `IpNetwork.PowerboxTag`.
pub const IP_NETWORK_POWERBOX_TAG: u64 = 0xcf9e_3f33_950d_f819;
/// `IpNetwork.PowerboxTag.Encryption`.
pub const IP_NETWORK_ENCRYPTION: u64 = 0xe2d9_4cf9_0fe4_078d;
/// `IpInterface`.
pub const IP_INTERFACE: u64 = 0xe32c_506e_e93e_d6fa;
/// `IpRemoteHost`.
pub const IP_REMOTE_HOST: u64 = 0x905d_d76b_298b_3130;
/// `TcpPort`.
pub const TCP_PORT: u64 = 0xeab2_0e1a_f078_06b4;
/// `UdpPort`.
pub const UDP_PORT: u64 = 0xc621_2e12_17d0_01ce;
/// `IpAddress`.
pub const IP_ADDRESS: u64 = 0xeeb9_8f99_37d3_2c0b;
/// `IpPortPowerboxMetadata`.
pub const IP_PORT_POWERBOX_METADATA: u64 = 0x856e_71a6_a4f2_2bba;
/// `PersistentIpNetwork`.
pub const PERSISTENT_IP_NETWORK: u64 = 0xa5b3_2156_60e0_38f2;
/// `PersistentIpInterface`.
pub const PERSISTENT_IP_INTERFACE: u64 = 0xcf43_ebe6_a5a6_f1b4;
/// `ByteStream` (util.capnp).
pub const BYTE_STREAM: u64 = 0xcd57_3877_29cf_e35f;
/// `Handle` (util.capnp).
pub const HANDLE: u64 = 0x98f4_24ac_6060_42e0;
/// `LocalizedText` (util.capnp).
pub const LOCALIZED_TEXT: u64 = 0x8b5d_b772_377b_e249;
/// `SystemPersistent` (Sandstorm's supervisor.capnp).
pub const SYSTEM_PERSISTENT: u64 = 0xc38c_edd7_7cbe_d5b4;
/// `ApiTokenOwner` (Sandstorm's supervisor.capnp).
pub const API_TOKEN_OWNER: u64 = 0xda97_0537_e2a8_a9a9;
/// `Persistent` (capnp/persistent.capnp).
pub const PERSISTENT: u64 = 0xc8cb_212f_cd9f_5691;
/// `PowerboxDescriptor` (powerbox.capnp).
pub const POWERBOX_DESCRIPTOR: u64 = 0xedcf_0fa3_bfc7_1c58;
/// `PowerboxDescriptor.Tag`.
pub const POWERBOX_DESCRIPTOR_TAG: u64 = 0xbe3d_16a8_df03_c418;

/// A readable name for the interface IDs a grain may request.
pub fn interface_name(id: u64) -> Option<&'static str> {
    Some(match id {
        IP_NETWORK => "IpNetwork",
        IP_INTERFACE => "IpInterface",
        IP_REMOTE_HOST => "IpRemoteHost",
        TCP_PORT => "TcpPort",
        UDP_PORT => "UdpPort",
        PERSISTENT_IP_NETWORK => "PersistentIpNetwork",
        PERSISTENT_IP_INTERFACE => "PersistentIpInterface",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use capnp::traits::HasTypeId;

    use super::*;
    use crate::{ip_capnp, persistent_capnp, powerbox_capnp, system_persistent_capnp, util_capnp};

    /// Every Sandstorm-compatible type keeps Sandstorm's type ID; a client built from
    /// Sandstorm's schema files would otherwise call methods we do not recognise.
    #[test]
    fn sandstorm_type_ids() {
        let cases: &[(&str, u64, u64)] =
            &[
                (
                    "IpNetwork",
                    ip_capnp::ip_network::Client::TYPE_ID,
                    IP_NETWORK,
                ),
                (
                    "IpNetwork.PowerboxTag",
                    ip_capnp::ip_network::powerbox_tag::Builder::TYPE_ID,
                    IP_NETWORK_POWERBOX_TAG,
                ),
                (
                    "IpNetwork.PowerboxTag.Encryption",
                    ip_capnp::ip_network::powerbox_tag::encryption::Builder::TYPE_ID,
                    IP_NETWORK_ENCRYPTION,
                ),
                (
                    "IpInterface",
                    ip_capnp::ip_interface::Client::TYPE_ID,
                    IP_INTERFACE,
                ),
                (
                    "IpRemoteHost",
                    ip_capnp::ip_remote_host::Client::TYPE_ID,
                    IP_REMOTE_HOST,
                ),
                ("TcpPort", ip_capnp::tcp_port::Client::TYPE_ID, TCP_PORT),
                ("UdpPort", ip_capnp::udp_port::Client::TYPE_ID, UDP_PORT),
                (
                    "IpAddress",
                    ip_capnp::ip_address::Builder::TYPE_ID,
                    IP_ADDRESS,
                ),
                (
                    "IpPortPowerboxMetadata",
                    ip_capnp::ip_port_powerbox_metadata::Builder::TYPE_ID,
                    IP_PORT_POWERBOX_METADATA,
                ),
                (
                    "PersistentIpNetwork",
                    ip_capnp::persistent_ip_network::Client::TYPE_ID,
                    PERSISTENT_IP_NETWORK,
                ),
                (
                    "PersistentIpInterface",
                    ip_capnp::persistent_ip_interface::Client::TYPE_ID,
                    PERSISTENT_IP_INTERFACE,
                ),
                (
                    "ByteStream",
                    util_capnp::byte_stream::Client::TYPE_ID,
                    BYTE_STREAM,
                ),
                ("Handle", util_capnp::handle::Client::TYPE_ID, HANDLE),
                (
                    "LocalizedText",
                    util_capnp::localized_text::Builder::TYPE_ID,
                    LOCALIZED_TEXT,
                ),
                (
                    "SystemPersistent",
                    system_persistent_capnp::system_persistent::Client::TYPE_ID,
                    SYSTEM_PERSISTENT,
                ),
                (
                    "ApiTokenOwner",
                    system_persistent_capnp::api_token_owner::Builder::TYPE_ID,
                    API_TOKEN_OWNER,
                ),
                (
                    "Persistent",
                    persistent_capnp::persistent::Client::<
                        capnp::data::Owned,
                        capnp::any_pointer::Owned,
                    >::TYPE_ID,
                    PERSISTENT,
                ),
                (
                    "PowerboxDescriptor",
                    powerbox_capnp::powerbox_descriptor::Builder::TYPE_ID,
                    POWERBOX_DESCRIPTOR,
                ),
                (
                    "PowerboxDescriptor.Tag",
                    powerbox_capnp::powerbox_descriptor::tag::Builder::TYPE_ID,
                    POWERBOX_DESCRIPTOR_TAG,
                ),
            ];
        for (name, generated, expected) in cases {
            assert_eq!(
                generated, expected,
                "{name}: generated type ID {generated:#x} differs from Sandstorm's {expected:#x}"
            );
        }
    }
}
