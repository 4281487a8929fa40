//! Helpers shared by test grains: deterministic data and checksums.

use sha2::{Digest, Sha256};

/// Deterministic pseudo-random bytes (xorshift), `len` of them.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// Hex SHA-256.
pub fn sha256_hex(data: &[u8]) -> String {
    let d = Sha256::digest(data);
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// A grain-side `UdpPort` that hands every datagram it receives (with the port that
/// answers its sender) to a channel.
pub struct UdpInbox(tokio::sync::mpsc::UnboundedSender<(Vec<u8>, UdpPortClient)>);

/// The `UdpPort` client type.
pub type UdpPortClient = capnet_schemas::ip_capnp::udp_port::Client;

/// What a [`UdpInbox`] receives.
pub type UdpReceived = tokio::sync::mpsc::UnboundedReceiver<(Vec<u8>, UdpPortClient)>;

impl UdpInbox {
    /// A new inbox as a `UdpPort` capability, and the channel it fills.
    pub fn channel() -> (UdpPortClient, UdpReceived) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        (capnp_rpc::new_client(UdpInbox(tx)), rx)
    }
}

impl capnet_schemas::ip_capnp::udp_port::Server for UdpInbox {
    async fn send(
        self: std::rc::Rc<Self>,
        params: capnet_schemas::ip_capnp::udp_port::SendParams,
        _: capnet_schemas::ip_capnp::udp_port::SendResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let _ = self
            .0
            .send((p.get_message()?.to_vec(), p.get_return_port()?));
        Ok(())
    }
}

/// Sends one datagram through `port` with `ret` as the return port.
pub async fn udp_send(
    port: &UdpPortClient,
    data: &[u8],
    ret: &UdpPortClient,
) -> Result<(), capnp::Error> {
    let mut req = port.send_request();
    req.get().set_message(data);
    req.get().set_return_port(ret.clone());
    req.send().promise.await.map(|_| ())
}
