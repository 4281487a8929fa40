//! Host names, host patterns and the parsed form of a grain's "host" text.

use std::fmt;
use std::net::IpAddr;

use idna::uts46::{AsciiDenyList, DnsLength, Hyphens, Uts46};

use super::addr::parse_ip_strict;

/// The longest host name text accepted before normalisation, in bytes. Longer input is
/// refused without running IDNA on it.
const MAX_INPUT_LEN: usize = 1024;
/// The longest normalised host name (RFC 1035: 255 octets on the wire, which is 253
/// characters of text without the trailing dot).
const MAX_NAME_LEN: usize = 253;
/// The longest label (RFC 1035).
const MAX_LABEL_LEN: usize = 63;
/// How much of an offending input an error message repeats.
const MAX_EXCERPT: usize = 100;

/// Why a host name, host pattern or host text was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HostError {
    /// The text is empty (or only a dot).
    #[error("host name is empty: expected a name such as example.com")]
    Empty,
    /// The name is too long.
    #[error("host name {name:?} is {len} characters long: expected at most 253")]
    TooLong {
        /// The name (shortened).
        name: String,
        /// Its length.
        len: usize,
    },
    /// Two dots in a row, or a leading dot.
    #[error("host name {name:?} has an empty label: expected labels separated by single dots")]
    EmptyLabel {
        /// The name (shortened).
        name: String,
    },
    /// A label is longer than 63 characters.
    #[error("label {label:?} of host name {name:?} is {len} characters long: expected at most 63")]
    LabelTooLong {
        /// The name (shortened).
        name: String,
        /// The label (shortened).
        label: String,
        /// Its length.
        len: usize,
    },
    /// A character that is not a letter, digit, hyphen or dot.
    #[error("host name {name:?} contains {ch:?}: expected letters, digits, hyphens and dots")]
    InvalidChar {
        /// The name (shortened).
        name: String,
        /// The first offending character.
        ch: char,
    },
    /// A label starts or ends with a hyphen.
    #[error("label {label:?} of host name {name:?} starts or ends with a hyphen")]
    Hyphen {
        /// The name (shortened).
        name: String,
        /// The label (shortened).
        label: String,
    },
    /// Unicode text that IDNA (UTS 46) cannot map to an ASCII name.
    #[error(
        "host name {name:?} is not a valid internationalised domain name: expected text that \
         UTS 46 maps to letters, digits and hyphens"
    )]
    Idna {
        /// The name (shortened).
        name: String,
    },
    /// The name looks like a number, which some resolvers would read as an address.
    #[error(
        "host name {name:?} looks like a numeric address: write an address as a dotted quad \
         such as 192.0.2.1, and use names whose last label is not a number and no label is \
         a 0x number"
    )]
    Numeric {
        /// The name as normalised (shortened).
        name: String,
    },
    /// An IP address was given where a host name is needed.
    #[error("{text:?} is an ip address, not a host name")]
    Address {
        /// The text (shortened).
        text: String,
    },
    /// Text that looks like an IPv6 address (it has a colon or brackets) but is not one.
    #[error(
        "{text:?} is not a valid ip address: expected a dotted quad such as 192.0.2.1 or ipv6 \
         in standard form such as 2001:db8::1 or [2001:db8::1], without a port"
    )]
    InvalidAddress {
        /// The text (shortened).
        text: String,
    },
    /// A host pattern with a misplaced wildcard.
    #[error(
        "host pattern {pattern:?} is not valid: expected an exact name (mail.example.com) or \
         a suffix pattern (*.example.com)"
    )]
    Wildcard {
        /// The pattern (shortened).
        pattern: String,
    },
}

/// Shortens untrusted text before it is repeated in an error message.
fn excerpt(text: &str) -> String {
    if text.len() <= MAX_EXCERPT {
        return text.to_owned();
    }
    let mut end = MAX_EXCERPT;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// A validated, normalised DNS host name.
///
/// Normalisation: Unicode is mapped to ASCII with IDNA (UTS 46, non-transitional, STD3
/// rules), so `BÜCHER.example` becomes `xn--bcher-kva.example`; letters are lower-cased;
/// one trailing dot is removed. The result has 1 to 253 characters, labels of 1 to 63
/// letters, digits and hyphens, no label starting or ending with a hyphen, and does not
/// look numeric: its last label is not all digits and no label is a `0x` number, so text
/// like `127.1`, `2130706433`, `0177.0.0.1` or `0x7f.1` is refused instead of reaching a
/// resolver that might read it as an address.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HostName(String);

impl HostName {
    /// Validates and normalises a host name; see the type's documentation for the rules.
    pub fn parse(text: &str) -> Result<Self, HostError> {
        if text.is_empty() {
            return Err(HostError::Empty);
        }
        if text.len() > MAX_INPUT_LEN {
            return Err(HostError::TooLong {
                name: excerpt(text),
                len: text.len(),
            });
        }
        if parse_ip_strict(text).is_some() {
            return Err(HostError::Address {
                text: excerpt(text),
            });
        }
        if text.is_ascii()
            && let Some(ch) = text
                .chars()
                .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '.'))
        {
            return Err(HostError::InvalidChar {
                name: excerpt(text),
                ch,
            });
        }
        let ascii = Uts46::new()
            .to_ascii(
                text.as_bytes(),
                AsciiDenyList::STD3,
                Hyphens::Allow,
                DnsLength::Ignore,
            )
            .map_err(|_| HostError::Idna {
                name: excerpt(text),
            })?;
        let name = ascii.strip_suffix('.').unwrap_or(&ascii);
        Self::check_ascii(name, text)?;
        Ok(Self(name.to_owned()))
    }

    /// Checks the normalised ASCII form; `original` is what the caller wrote.
    fn check_ascii(name: &str, original: &str) -> Result<(), HostError> {
        if name.is_empty() {
            return Err(HostError::Empty);
        }
        if name.len() > MAX_NAME_LEN {
            return Err(HostError::TooLong {
                name: excerpt(original),
                len: name.len(),
            });
        }
        let mut last = "";
        for label in name.split('.') {
            if label.is_empty() {
                return Err(HostError::EmptyLabel {
                    name: excerpt(original),
                });
            }
            if label.len() > MAX_LABEL_LEN {
                return Err(HostError::LabelTooLong {
                    name: excerpt(original),
                    label: excerpt(label),
                    len: label.len(),
                });
            }
            if let Some(ch) = label
                .chars()
                .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
            {
                return Err(HostError::InvalidChar {
                    name: excerpt(original),
                    ch,
                });
            }
            if label.starts_with('-') || label.ends_with('-') {
                return Err(HostError::Hyphen {
                    name: excerpt(original),
                    label: excerpt(label),
                });
            }
            if is_hex_number(label) {
                return Err(HostError::Numeric {
                    name: excerpt(name),
                });
            }
            last = label;
        }
        if last.bytes().all(|b| b.is_ascii_digit()) {
            return Err(HostError::Numeric {
                name: excerpt(name),
            });
        }
        Ok(())
    }

    /// The normalised name: lower-case ASCII, no trailing dot.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The number of labels (`www.example.com` has 3).
    pub fn label_count(&self) -> usize {
        self.0.split('.').count()
    }

    /// Whether this name is `suffix` itself or ends with `.suffix`.
    fn is_within(&self, suffix: &HostName) -> bool {
        let name = self.0.as_bytes();
        let suffix = suffix.0.as_bytes();
        name.ends_with(suffix)
            && name.len() > suffix.len()
            && name[name.len() - suffix.len() - 1] == b'.'
    }
}

/// A `0x` number: `0x` or `0X` followed by hex digits only (possibly none), as inet_aton
/// reads it.
fn is_hex_number(label: &str) -> bool {
    let bytes = label.as_bytes();
    bytes.len() >= 2
        && bytes[0] == b'0'
        && (bytes[1] == b'x' || bytes[1] == b'X')
        && bytes[2..].iter().all(u8::is_ascii_hexdigit)
}

impl fmt::Display for HostName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for HostName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HostName({:?})", self.0)
    }
}

impl std::str::FromStr for HostName {
    type Err = HostError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// The host specificity of an exact-name match; every suffix pattern ranks below it.
pub(crate) const EXACT_HOST_SPECIFICITY: u16 = 1000;

/// A host pattern in a rule: an exact name or `*.suffix`.
#[derive(Clone, PartialEq, Eq, Hash)]
pub enum HostPattern {
    /// Matches exactly this name.
    Exact(HostName),
    /// `*.example.com`: matches every name below `example.com` (`a.example.com`,
    /// `a.b.example.com`), not `example.com` itself.
    Suffix(HostName),
}

impl HostPattern {
    /// Parses `name` or `*.name`. The name part is validated and normalised like
    /// [`HostName::parse`]; any other use of `*` is refused.
    pub fn parse(text: &str) -> Result<Self, HostError> {
        if let Some(suffix) = text.strip_prefix("*.") {
            if suffix.contains('*') {
                return Err(HostError::Wildcard {
                    pattern: excerpt(text),
                });
            }
            return HostName::parse(suffix).map(Self::Suffix);
        }
        if text.contains('*') {
            return Err(HostError::Wildcard {
                pattern: excerpt(text),
            });
        }
        HostName::parse(text).map(Self::Exact)
    }

    /// If the pattern matches `name`, how specifically: an exact match ranks above every
    /// suffix match, and a suffix with more labels ranks above one with fewer.
    pub(crate) fn specificity(&self, name: &HostName) -> Option<u16> {
        match self {
            Self::Exact(exact) => (exact == name).then_some(EXACT_HOST_SPECIFICITY),
            Self::Suffix(suffix) => name
                .is_within(suffix)
                // At most 127 labels fit in 253 characters, far below the exact rank.
                .then(|| u16::try_from(suffix.label_count()).map_or(999, |n| n.min(999))),
        }
    }

    /// Whether the pattern matches `name`.
    pub fn matches(&self, name: &HostName) -> bool {
        self.specificity(name).is_some()
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Exact(name) => write!(f, "{name}"),
            Self::Suffix(name) => write!(f, "*.{name}"),
        }
    }
}

impl fmt::Debug for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HostPattern({self})")
    }
}

impl std::str::FromStr for HostPattern {
    type Err = HostError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// What a grain names as a remote host: a host name to resolve, or an address.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum HostSpec {
    /// A validated host name.
    Name(HostName),
    /// An address given literally (kept as written; the policy matches its canonical form).
    Addr(IpAddr),
}

impl HostSpec {
    /// Parses a grain's host text (`IpNetwork.getRemoteHostByName`): an address in strict
    /// canonical form ([`parse_ip_strict`]), else a host name ([`HostName::parse`]). Text
    /// with a colon or brackets that is not a valid IPv6 address is refused rather than
    /// treated as a name.
    pub fn parse(text: &str) -> Result<Self, HostError> {
        if let Some(addr) = parse_ip_strict(text) {
            return Ok(Self::Addr(addr));
        }
        if text.contains(':') || text.contains('[') || text.contains(']') {
            return Err(HostError::InvalidAddress {
                text: excerpt(text),
            });
        }
        HostName::parse(text).map(Self::Name)
    }
}

impl fmt::Display for HostSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Name(name) => write!(f, "{name}"),
            Self::Addr(addr) => write!(f, "{addr}"),
        }
    }
}

impl From<HostName> for HostSpec {
    fn from(name: HostName) -> Self {
        Self::Name(name)
    }
}

impl From<IpAddr> for HostSpec {
    fn from(addr: IpAddr) -> Self {
        Self::Addr(addr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(text: &str) -> Result<String, HostError> {
        HostName::parse(text).map(|n| n.as_str().to_owned())
    }

    #[test]
    fn names_are_normalised() {
        for (text, want) in [
            ("example.com", "example.com"),
            ("Example.COM.", "example.com"),
            ("LOCALHOST.", "localhost"),
            ("BÜCHER.example", "xn--bcher-kva.example"),
            ("bücher.example", "xn--bcher-kva.example"),
            ("xn--bcher-kva.example", "xn--bcher-kva.example"),
            ("ｅｘａｍｐｌｅ．com", "example.com"),
            ("a-b.c0", "a-b.c0"),
            ("1.2.3.4.example", "1.2.3.4.example"),
            ("123.example.com", "123.example.com"),
            ("xn--ls8h.la", "xn--ls8h.la"),
        ] {
            assert_eq!(name(text).as_deref(), Ok(want), "{text}");
        }
        let longest = format!("{0}.{0}.{0}.{1}", "a".repeat(63), "b".repeat(61));
        assert_eq!(longest.len(), 253);
        assert!(HostName::parse(&longest).is_ok());
        assert!(
            HostName::parse(&format!("{longest}.")).is_ok(),
            "trailing dot"
        );
    }

    #[test]
    fn numeric_looking_names_are_refused() {
        for text in [
            "0177.0.0.1",
            "0x7f.0.0.1",
            "0x7f.1",
            "2130706433",
            "017700000001",
            "127.1",
            "127.0.0.1.",
            "0x7f000001",
            "example.0x10",
            "0x.example",
            "1.2.3.4.5",
            "１２７.０.０.１",
            "１２７。０。０。１",
            "example.123",
        ] {
            assert!(
                matches!(HostName::parse(text), Err(HostError::Numeric { .. })),
                "{text:?} gave {:?}",
                HostName::parse(text)
            );
        }
    }

    #[test]
    fn malformed_names_are_refused_with_the_reason() {
        type Check = fn(&HostError) -> bool;
        let cases: &[(&str, Check)] = &[
            ("", |e| matches!(e, HostError::Empty)),
            (".", |e| matches!(e, HostError::Empty)),
            ("a..b", |e| matches!(e, HostError::EmptyLabel { .. })),
            (".a", |e| matches!(e, HostError::EmptyLabel { .. })),
            ("a.b..", |e| matches!(e, HostError::EmptyLabel { .. })),
            ("a_b.example", |e| {
                matches!(e, HostError::InvalidChar { ch: '_', .. })
            }),
            ("a b", |e| {
                matches!(e, HostError::InvalidChar { ch: ' ', .. })
            }),
            ("a/b", |e| {
                matches!(e, HostError::InvalidChar { ch: '/', .. })
            }),
            ("-a.example", |e| matches!(e, HostError::Hyphen { .. })),
            ("a-.example", |e| matches!(e, HostError::Hyphen { .. })),
            ("127.0.0.1", |e| matches!(e, HostError::Address { .. })),
            ("xn--zz--.example", |e| {
                matches!(e, HostError::Idna { .. } | HostError::Hyphen { .. })
            }),
            ("a\u{0}b", |e| matches!(e, HostError::InvalidChar { .. })),
            ("exa\u{200b}mple.com\u{fffd}", |e| {
                matches!(e, HostError::Idna { .. })
            }),
        ];
        for (text, ok) in cases {
            let err = HostName::parse(text).expect_err(text);
            assert!(ok(&err), "{text:?} gave {err:?}");
        }
        let long_label = format!("{}.example", "a".repeat(64));
        assert!(matches!(
            HostName::parse(&long_label),
            Err(HostError::LabelTooLong { len: 64, .. })
        ));
        let long_name = format!("{0}.{0}.{0}.{1}", "a".repeat(63), "b".repeat(62));
        assert!(matches!(
            HostName::parse(&long_name),
            Err(HostError::TooLong { len: 254, .. })
        ));
        let huge = "a".repeat(100_000);
        let err = HostName::parse(&huge).unwrap_err();
        assert!(
            err.to_string().len() < 300,
            "messages repeat a short excerpt"
        );
    }

    #[test]
    fn error_messages_say_what_is_expected() {
        let err = HostName::parse("a_b.example").unwrap_err();
        assert_eq!(
            err.to_string(),
            "host name \"a_b.example\" contains '_': expected letters, digits, hyphens and dots"
        );
        let err = HostName::parse("127.1").unwrap_err();
        assert!(
            err.to_string()
                .starts_with("host name \"127.1\" looks like a numeric address")
        );
    }

    #[test]
    fn patterns_match_by_specificity() {
        let n = |t: &str| HostName::parse(t).unwrap();
        let exact = HostPattern::parse("WWW.Example.com.").unwrap();
        let short = HostPattern::parse("*.example.com").unwrap();
        let long = HostPattern::parse("*.www.example.com").unwrap();
        assert_eq!(exact.to_string(), "www.example.com");
        assert_eq!(short.to_string(), "*.example.com");
        assert!(exact.matches(&n("www.example.com")));
        assert!(!exact.matches(&n("a.www.example.com")));
        assert!(short.matches(&n("www.example.com")));
        assert!(short.matches(&n("a.b.example.com")));
        assert!(
            !short.matches(&n("example.com")),
            "suffix excludes the apex"
        );
        assert!(
            !short.matches(&n("badexample.com")),
            "suffix is label-aligned"
        );
        let target = n("a.www.example.com");
        assert!(long.specificity(&target) > short.specificity(&target));
        assert!(
            exact.specificity(&n("www.example.com")) > long.specificity(&target),
            "exact beats every suffix"
        );
        for bad in [
            "*",
            "*example.com",
            "a.*.example.com",
            "*.*.example.com",
            "ex*ample.com",
        ] {
            assert!(
                matches!(HostPattern::parse(bad), Err(HostError::Wildcard { .. })),
                "{bad}"
            );
        }
        assert!(matches!(
            HostPattern::parse("*.0x7f.1"),
            Err(HostError::Numeric { .. })
        ));
    }

    #[test]
    fn host_spec_separates_addresses_from_names() {
        assert_eq!(
            HostSpec::parse("[::1]").unwrap(),
            HostSpec::Addr("::1".parse().unwrap())
        );
        assert_eq!(
            HostSpec::parse("192.0.2.1").unwrap(),
            HostSpec::Addr("192.0.2.1".parse().unwrap())
        );
        assert_eq!(
            HostSpec::parse("Example.com").unwrap(),
            HostSpec::Name(HostName::parse("example.com").unwrap())
        );
        for bad in ["example.com:80", "[127.0.0.1]", "fe80::1%eth0", "[::1]:80"] {
            assert!(
                matches!(HostSpec::parse(bad), Err(HostError::InvalidAddress { .. })),
                "{bad}"
            );
        }
        for numeric in ["0177.0.0.1", "2130706433", "127.1", "0x7f.0.0.1"] {
            assert!(
                matches!(HostSpec::parse(numeric), Err(HostError::Numeric { .. })),
                "{numeric}"
            );
        }
    }
}
