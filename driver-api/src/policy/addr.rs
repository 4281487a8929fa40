//! Addresses: strict textual parsing and the built-in table of special-purpose ranges.
//!
//! The table is the source of the policy's default denials: every range in
//! [`special_ranges`] is denied by default, each with a label that names the range, and
//! every other address is public unicast. IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`)
//! are converted to IPv4 by [`canonical_ip`] before anything is matched, so
//! `::ffff:127.0.0.1` is loopback.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

/// Parses an IP address written in its canonical text form, and nothing else.
///
/// Accepted:
/// * IPv4 as exactly four decimal numbers 0–255 separated by dots, without leading zeros
///   (`192.0.2.1`; `0.0.0.0`);
/// * IPv6 in the standard text form of RFC 4291 section 2.2, including `::` compression
///   and a trailing dotted quad (`2001:db8::1`, `::ffff:192.0.2.1`), optionally enclosed
///   in brackets (`[::1]`).
///
/// Rejected (returns `None`): the forms that `inet_aton` and some URL parsers accept and
/// that have been used to smuggle loopback past filters, such as octal or leading zeros
/// (`0177.0.0.1`, `010.0.0.1`), hexadecimal (`0x7f.0.0.1`), fewer than four parts
/// (`127.1`), a single 32-bit number (`2130706433`), surrounding white space, zone
/// indices (`fe80::1%eth0`), and brackets around IPv4.
///
/// Whatever is not an address is a host name candidate; [`HostName`] rejects names that
/// look numeric, so such text never reaches a resolver either.
///
/// [`HostName`]: super::HostName
pub fn parse_ip_strict(text: &str) -> Option<IpAddr> {
    if let Some(inner) = text.strip_prefix('[') {
        let inner = inner.strip_suffix(']')?;
        return parse_ipv6_strict(inner).map(IpAddr::V6);
    }
    if text.contains(':') {
        return parse_ipv6_strict(text).map(IpAddr::V6);
    }
    parse_ipv4_strict(text).map(IpAddr::V4)
}

/// Parses a dotted quad: four decimal octets, no leading zeros, nothing else.
fn parse_ipv4_strict(text: &str) -> Option<Ipv4Addr> {
    let mut octets = [0u8; 4];
    let mut parts = text.split('.');
    for octet in &mut octets {
        let part = parts.next()?;
        let bytes = part.as_bytes();
        if bytes.is_empty()
            || bytes.len() > 3
            || !bytes.iter().all(u8::is_ascii_digit)
            || (bytes.len() > 1 && bytes[0] == b'0')
        {
            return None;
        }
        *octet = part.parse().ok()?;
    }
    if parts.next().is_some() {
        return None;
    }
    Some(Ipv4Addr::from(octets))
}

/// Parses the standard IPv6 text form. The standard library's parser implements RFC 4291
/// section 2.2 (groups of one to four hex digits, one `::`, an optional trailing dotted
/// quad that itself must be canonical) and rejects zone indices.
fn parse_ipv6_strict(text: &str) -> Option<Ipv6Addr> {
    // Guard the embedded dotted quad ourselves too: our IPv4 rules must not depend on how
    // lenient a future standard library is.
    if let Some(last_colon) = text.rfind(':') {
        let tail = &text[last_colon + 1..];
        if tail.contains('.') && parse_ipv4_strict(tail).is_none() {
            return None;
        }
    }
    text.parse().ok()
}

/// Converts an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`, `::ffff:0:0/96`) to the IPv4
/// address it denotes; returns every other address unchanged.
///
/// The policy matches only canonical addresses, so a mapped address is subject to exactly
/// the same defaults and rules as the IPv4 address it reaches. Other IPv6 forms that embed
/// IPv4 (IPv4-compatible, NAT64, 6to4, Teredo) are not converted: they are denied by
/// default as whole ranges, see [`special_ranges`].
pub fn canonical_ip(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        IpAddr::V4(_) => addr,
    }
}

/// Converts a network inside `::ffff:0:0/96` (prefix length 96 or more) to the IPv4
/// network it denotes; returns every other network unchanged (truncated to its prefix).
pub(crate) fn canonical_net(net: IpNet) -> IpNet {
    match net {
        IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.network().to_ipv4_mapped() {
            Some(v4) => {
                // prefix_len() - 96 is at most 32, so this cannot fail.
                Ipv4Net::new(v4, v6.prefix_len() - 96)
                    .map(|n| IpNet::V4(n.trunc()))
                    .unwrap_or(IpNet::V6(v6.trunc()))
            }
            None => IpNet::V6(v6.trunc()),
        },
        other => other.trunc(),
    }
}

/// What kind of special-purpose range an address belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RangeKind {
    /// `0.0.0.0/8`: "this network"; only valid as a source address.
    ThisNetwork,
    /// `0.0.0.0/32`, `::/128`: the unspecified address.
    Unspecified,
    /// `127.0.0.0/8`, `::1/128`.
    Loopback,
    /// RFC 1918: `10.0.0.0/8`, `172.16.0.0/12`, `192.168.0.0/16`.
    Private,
    /// `100.64.0.0/10`: shared address space for carrier-grade NAT.
    SharedCgnat,
    /// `169.254.0.0/16`, `fe80::/10`.
    LinkLocal,
    /// Cloud instance metadata services: `169.254.169.254/32`, `fd00:ec2::254/128`.
    /// Allowed only by a rule that names the exact address (`/32`, `/128`).
    CloudMetadata,
    /// `224.0.0.0/4`, `ff00::/8`.
    Multicast,
    /// `255.255.255.255/32`.
    Broadcast,
    /// Ranges reserved by IANA or for protocol use: `192.0.0.0/24`, `240.0.0.0/4`,
    /// `192.88.99.0/24`, ORCHID, SRv6 SIDs, and IPv6 outside `2000::/3`.
    Reserved,
    /// `198.18.0.0/15`, `2001:2::/48`: benchmarking (RFC 2544, RFC 5180).
    Benchmarking,
    /// `192.0.2.0/24`, `198.51.100.0/24`, `203.0.113.0/24`, `2001:db8::/32`, `3fff::/20`.
    Documentation,
    /// `fc00::/7`: unique local addresses.
    UniqueLocal,
    /// `fec0::/10`: deprecated site-local addresses.
    SiteLocal,
    /// `100::/64`: discard-only (RFC 6666).
    DiscardOnly,
    /// `::/96`: deprecated IPv4-compatible IPv6 addresses.
    Ipv4Compatible,
    /// `64:ff9b::/96`, `64:ff9b:1::/48`: NAT64 (RFC 6052, RFC 8215).
    Nat64,
    /// `2002::/16`: 6to4 (RFC 3056).
    SixToFour,
    /// `2001::/32`: Teredo (RFC 4380).
    Teredo,
}

/// A special-purpose address range that the policy denies by default.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpecialRange {
    /// The range.
    pub net: IpNet,
    /// What it is.
    pub kind: RangeKind,
    /// The rule label that decisions carry, `default: <what> <range>`.
    pub label: &'static str,
}

const fn v4(a: u8, b: u8, c: u8, d: u8, len: u8) -> IpNet {
    IpNet::V4(Ipv4Net::new_assert(Ipv4Addr::new(a, b, c, d), len))
}

const fn v6(segments: [u16; 8], len: u8) -> IpNet {
    let [a, b, c, d, e, f, g, h] = segments;
    IpNet::V6(Ipv6Net::new_assert(
        Ipv6Addr::new(a, b, c, d, e, f, g, h),
        len,
    ))
}

const fn range(net: IpNet, kind: RangeKind, label: &'static str) -> SpecialRange {
    SpecialRange { net, kind, label }
}

use RangeKind as K;

/// The built-in special-purpose ranges (IANA IPv4 and IPv6 Special-Purpose Address
/// Registries, plus cloud metadata services), every one denied by default.
#[rustfmt::skip]
const SPECIAL_RANGES: &[SpecialRange] = &[
    // IPv4
    range(v4(0, 0, 0, 0, 8), K::ThisNetwork, "default: this network 0.0.0.0/8"),
    range(v4(0, 0, 0, 0, 32), K::Unspecified, "default: unspecified 0.0.0.0/32"),
    range(v4(10, 0, 0, 0, 8), K::Private, "default: private 10.0.0.0/8"),
    range(v4(100, 64, 0, 0, 10), K::SharedCgnat, "default: shared address space (cgnat) 100.64.0.0/10"),
    range(v4(127, 0, 0, 0, 8), K::Loopback, "default: loopback 127.0.0.0/8"),
    range(v4(169, 254, 0, 0, 16), K::LinkLocal, "default: link-local 169.254.0.0/16"),
    range(v4(169, 254, 169, 254, 32), K::CloudMetadata, "default: cloud metadata 169.254.169.254/32"),
    range(v4(172, 16, 0, 0, 12), K::Private, "default: private 172.16.0.0/12"),
    range(v4(192, 0, 0, 0, 24), K::Reserved, "default: ietf protocol assignments 192.0.0.0/24"),
    range(v4(192, 0, 2, 0, 24), K::Documentation, "default: documentation 192.0.2.0/24"),
    range(v4(192, 88, 99, 0, 24), K::Reserved, "default: 6to4 relay anycast 192.88.99.0/24"),
    range(v4(192, 168, 0, 0, 16), K::Private, "default: private 192.168.0.0/16"),
    range(v4(198, 18, 0, 0, 15), K::Benchmarking, "default: benchmarking 198.18.0.0/15"),
    range(v4(198, 51, 100, 0, 24), K::Documentation, "default: documentation 198.51.100.0/24"),
    range(v4(203, 0, 113, 0, 24), K::Documentation, "default: documentation 203.0.113.0/24"),
    range(v4(224, 0, 0, 0, 4), K::Multicast, "default: multicast 224.0.0.0/4"),
    range(v4(240, 0, 0, 0, 4), K::Reserved, "default: reserved 240.0.0.0/4"),
    range(v4(255, 255, 255, 255, 32), K::Broadcast, "default: broadcast 255.255.255.255/32"),
    // IPv6: everything outside global unicast 2000::/3 ...
    range(v6([0, 0, 0, 0, 0, 0, 0, 0], 3), K::Reserved, "default: not global unicast ::/3"),
    range(v6([0x4000, 0, 0, 0, 0, 0, 0, 0], 2), K::Reserved, "default: not global unicast 4000::/2"),
    range(v6([0x8000, 0, 0, 0, 0, 0, 0, 0], 1), K::Reserved, "default: not global unicast 8000::/1"),
    // ... with the ranges inside it named more precisely,
    range(v6([0, 0, 0, 0, 0, 0, 0, 0], 128), K::Unspecified, "default: unspecified ::/128"),
    range(v6([0, 0, 0, 0, 0, 0, 0, 1], 128), K::Loopback, "default: loopback ::1/128"),
    range(v6([0, 0, 0, 0, 0, 0, 0, 0], 96), K::Ipv4Compatible, "default: ipv4-compatible ::/96"),
    range(v6([0x64, 0xff9b, 0, 0, 0, 0, 0, 0], 96), K::Nat64, "default: nat64 64:ff9b::/96"),
    range(v6([0x64, 0xff9b, 1, 0, 0, 0, 0, 0], 48), K::Nat64, "default: nat64 local-use 64:ff9b:1::/48"),
    range(v6([0x100, 0, 0, 0, 0, 0, 0, 0], 64), K::DiscardOnly, "default: discard-only 100::/64"),
    range(v6([0xfc00, 0, 0, 0, 0, 0, 0, 0], 7), K::UniqueLocal, "default: unique local fc00::/7"),
    range(v6([0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254], 128), K::CloudMetadata, "default: cloud metadata fd00:ec2::254/128"),
    range(v6([0xfe80, 0, 0, 0, 0, 0, 0, 0], 10), K::LinkLocal, "default: link-local fe80::/10"),
    range(v6([0xfec0, 0, 0, 0, 0, 0, 0, 0], 10), K::SiteLocal, "default: site-local fec0::/10"),
    range(v6([0xff00, 0, 0, 0, 0, 0, 0, 0], 8), K::Multicast, "default: multicast ff00::/8"),
    // and the special-purpose ranges inside 2000::/3.
    range(v6([0x2001, 0, 0, 0, 0, 0, 0, 0], 32), K::Teredo, "default: teredo 2001::/32"),
    range(v6([0x2001, 2, 0, 0, 0, 0, 0, 0], 48), K::Benchmarking, "default: benchmarking 2001:2::/48"),
    range(v6([0x2001, 0x10, 0, 0, 0, 0, 0, 0], 28), K::Reserved, "default: orchid 2001:10::/28"),
    range(v6([0x2001, 0x20, 0, 0, 0, 0, 0, 0], 28), K::Reserved, "default: orchidv2 2001:20::/28"),
    range(v6([0x2001, 0xdb8, 0, 0, 0, 0, 0, 0], 32), K::Documentation, "default: documentation 2001:db8::/32"),
    range(v6([0x2002, 0, 0, 0, 0, 0, 0, 0], 16), K::SixToFour, "default: 6to4 2002::/16"),
    range(v6([0x3fff, 0, 0, 0, 0, 0, 0, 0], 20), K::Documentation, "default: documentation 3fff::/20"),
    range(v6([0x5f00, 0, 0, 0, 0, 0, 0, 0], 16), K::Reserved, "default: srv6 sids 5f00::/16"),
];

/// The built-in special-purpose ranges, each denied by default (see the module docs of
/// [`policy`](super) for how rules override them). IPv4-mapped IPv6 (`::ffff:0:0/96`) is
/// not listed because such addresses are matched as the IPv4 address they denote.
pub fn special_ranges() -> &'static [SpecialRange] {
    SPECIAL_RANGES
}

/// Returns the most specific special-purpose range that contains the (canonicalised)
/// address, or `None` if the address is public unicast.
pub fn classify(addr: IpAddr) -> Option<&'static SpecialRange> {
    let addr = canonical_ip(addr);
    SPECIAL_RANGES
        .iter()
        .filter(|r| r.net.contains(&addr))
        .max_by_key(|r| r.net.prefix_len())
}

/// Whether the address is public unicast: not in any of the [`special_ranges`] after
/// IPv4-mapped addresses are converted to IPv4.
pub fn is_public_unicast(addr: IpAddr) -> bool {
    classify(addr).is_none()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strict_parser_accepts_canonical_forms() {
        for (text, want) in [
            ("192.0.2.1", "192.0.2.1"),
            ("0.0.0.0", "0.0.0.0"),
            ("255.255.255.255", "255.255.255.255"),
            ("::1", "::1"),
            ("[::1]", "::1"),
            ("2001:db8::1", "2001:db8::1"),
            ("::ffff:127.0.0.1", "::ffff:127.0.0.1"),
            ("::ffff:7f00:1", "::ffff:127.0.0.1"),
            ("[2001:DB8:0:0:0:0:0:1]", "2001:db8::1"),
        ] {
            let want: IpAddr = want.parse().unwrap();
            assert_eq!(parse_ip_strict(text), Some(want), "{text}");
        }
    }

    #[test]
    fn strict_parser_rejects_odd_encodings() {
        for text in [
            "0177.0.0.1",
            "0x7f.0.0.1",
            "0x7f000001",
            "2130706433",
            "017700000001",
            "127.1",
            "127.0.1",
            "127.0.0.1.",
            "127.0.0.01",
            "127.0.0.256",
            "1.2.3.4.5",
            " 127.0.0.1",
            "127.0.0.1 ",
            "+1.2.3.4",
            "[127.0.0.1]",
            "[::1",
            "::1]",
            "fe80::1%eth0",
            "::ffff:0177.0.0.1",
            "::ffff:127.1",
            "1:2:3:4:5:6:7:8:9",
            "12345::",
            "",
            "localhost",
            "１２７.０.０.１",
        ] {
            assert_eq!(parse_ip_strict(text), None, "{text:?} must not parse");
        }
    }

    #[test]
    fn mapped_addresses_are_canonicalised() {
        let mapped: IpAddr = "::ffff:10.1.2.3".parse().unwrap();
        assert_eq!(canonical_ip(mapped), "10.1.2.3".parse::<IpAddr>().unwrap());
        let compat: IpAddr = "::10.1.2.3".parse().unwrap();
        assert_eq!(canonical_ip(compat), compat, "ipv4-compatible stays ipv6");
        let net: IpNet = "::ffff:10.0.0.0/104".parse().unwrap();
        assert_eq!(canonical_net(net), "10.0.0.0/8".parse::<IpNet>().unwrap());
        let wide: IpNet = "::/64".parse().unwrap();
        assert_eq!(canonical_net(wide), wide);
    }

    #[test]
    fn every_label_names_its_range() {
        for r in SPECIAL_RANGES {
            assert!(
                r.label.starts_with("default: ") && r.label.ends_with(&format!(" {}", r.net)),
                "label {:?} does not end with {}",
                r.label,
                r.net
            );
            assert_eq!(r.net, r.net.trunc(), "{} has host bits set", r.net);
        }
    }

    #[test]
    fn classification_picks_the_most_specific_range() {
        let cases = [
            ("169.254.169.254", K::CloudMetadata),
            ("169.254.1.1", K::LinkLocal),
            ("0.0.0.0", K::Unspecified),
            ("0.1.2.3", K::ThisNetwork),
            ("::", K::Unspecified),
            ("::1", K::Loopback),
            ("::7f00:1", K::Ipv4Compatible),
            ("::ffff:127.0.0.1", K::Loopback),
            ("fd00:ec2::254", K::CloudMetadata),
            ("fd00::1", K::UniqueLocal),
            ("4000::1", K::Reserved),
            ("2001:db8::1", K::Documentation),
            ("2001:0:4136:e378::1", K::Teredo),
        ];
        for (text, kind) in cases {
            let addr: IpAddr = text.parse().unwrap();
            assert_eq!(classify(addr).map(|r| r.kind), Some(kind), "{text}");
        }
        for text in [
            "1.1.1.1",
            "11.0.0.1",
            "2600::1",
            "2a00:1450::1",
            "100.63.255.255",
        ] {
            assert!(is_public_unicast(text.parse().unwrap()), "{text}");
        }
    }
}
