//! `IpAddress` conversions: two big-endian 64-bit halves, IPv4 as `::ffff:a.b.c.d`.

use std::net::{IpAddr, Ipv6Addr};

use crate::ip_capnp::ip_address;

/// Splits an address into (upper64, lower64) as `IpAddress` carries it. IPv4 addresses
/// become IPv4-mapped IPv6 addresses.
pub fn to_halves(addr: IpAddr) -> (u64, u64) {
    let v6 = match addr {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    let bits = u128::from(v6);
    ((bits >> 64) as u64, bits as u64)
}

/// Joins (upper64, lower64) into an address. IPv4-mapped addresses come back as IPv4, so
/// that policy checks see the address the kernel would really use.
pub fn from_halves(upper: u64, lower: u64) -> IpAddr {
    let v6 = Ipv6Addr::from((u128::from(upper) << 64) | u128::from(lower));
    v6.to_canonical()
}

/// Writes `addr` into an `IpAddress` builder.
pub fn write(mut builder: ip_address::Builder<'_>, addr: IpAddr) {
    let (upper, lower) = to_halves(addr);
    builder.set_upper64(upper);
    builder.set_lower64(lower);
}

/// Reads an `IpAddress`.
pub fn read(reader: ip_address::Reader<'_>) -> IpAddr {
    from_halves(reader.get_upper64(), reader.get_lower64())
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    /// The example from Sandstorm's schema: "1:2:3:4:5:6:7:8".
    #[test]
    fn halves_follow_sandstorm_bit_order() {
        let addr: IpAddr = "1:2:3:4:5:6:7:8".parse().expect("literal");
        assert_eq!(
            to_halves(addr),
            (0x0001_0002_0003_0004, 0x0005_0006_0007_0008)
        );
        assert_eq!(
            from_halves(0x0001_0002_0003_0004, 0x0005_0006_0007_0008),
            addr
        );
    }

    /// IPv4 travels as ::ffff:a.b.c.d and comes back as IPv4.
    #[test]
    fn ipv4_is_mapped() {
        let addr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7));
        assert_eq!(to_halves(addr), (0, 0x0000_ffff_c000_0207));
        assert_eq!(from_halves(0, 0x0000_ffff_c000_0207), addr);
    }
}
