//! Why a connection could not be made, and how each proxy protocol says so.
//!
//! Drivers and the supervisor fail calls with messages that start with a stable word
//! (`refused:`, `not found:`, `limit:`, `revoked:`, `denied:`, `unsupported:`, `failed:`;
//! see `docs/architecture.md`). [`Refusal::from_capnp`] sorts them into classes, and each
//! class has one SOCKS5 reply code (RFC 1928 §6) and one HTTP status:
//!
//! | class | SOCKS5 | HTTP |
//! |---|---|---|
//! | no grant, policy (`refused:`, `denied:`, `revoked:`) | 0x02 not allowed by ruleset | 403 |
//! | `not found:` (no such name, or the policy refuses every address it has) | 0x04 host unreachable | 502 |
//! | TCP connection refused by the peer | 0x05 connection refused | 502 |
//! | timed out | 0x06 TTL expired | 504 |
//! | `limit:` | 0x01 general failure | 429 |
//! | anything else (`unsupported:`, `failed:`, a driver that went away) | 0x01 general failure | 502 |

use hyper::StatusCode;

use crate::target::Target;

/// SOCKS5 reply codes (RFC 1928 §6).
pub mod reply {
    /// Succeeded.
    pub const SUCCEEDED: u8 = 0x00;
    /// General SOCKS server failure.
    pub const GENERAL_FAILURE: u8 = 0x01;
    /// Connection not allowed by ruleset.
    pub const NOT_ALLOWED: u8 = 0x02;
    /// Network unreachable.
    pub const NETWORK_UNREACHABLE: u8 = 0x03;
    /// Host unreachable.
    pub const HOST_UNREACHABLE: u8 = 0x04;
    /// Connection refused.
    pub const CONNECTION_REFUSED: u8 = 0x05;
    /// TTL expired (used for time-outs).
    pub const TTL_EXPIRED: u8 = 0x06;
    /// Command not supported.
    pub const COMMAND_NOT_SUPPORTED: u8 = 0x07;
    /// Address type not supported.
    pub const ADDRESS_TYPE_NOT_SUPPORTED: u8 = 0x08;
}

/// Why the bridge could not connect a client to its target.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// No grant of the bridge can reach the target. Only the bridge knows this, so only
    /// its log (the grain's log) records it.
    #[error(
        "no grant: capnet-bridge holds no capability that reaches {0}; ask the administrator \
         for one (see docs/grain-guide.md)"
    )]
    NoGrant(String),
    /// The driver's egress policy, the administrator, or a revocation said no.
    #[error("{0}")]
    Policy(String),
    /// The name does not exist, or every address it has is refused by the policy.
    #[error("{0}")]
    NotFound(String),
    /// The remote host refused the TCP connection.
    #[error("{0}")]
    ConnectionRefused(String),
    /// Connecting or resolving took too long.
    #[error("{0}")]
    TimedOut(String),
    /// A per-grant limit was hit.
    #[error("{0}")]
    Limit(String),
    /// The grant's driver does not offer this (for example UDP through a TCP driver).
    #[error("{0}")]
    Unsupported(String),
    /// Anything else.
    #[error("{0}")]
    Failed(String),
}

/// The message of a capnp error without the `remote exception: ` prefixes that every
/// hop adds.
pub fn clean_message(e: &capnp::Error) -> String {
    let mut m = e.extra.trim();
    while let Some(rest) = m.strip_prefix("remote exception:") {
        m = rest.trim_start();
    }
    m.to_string()
}

impl Refusal {
    /// Sorts an error from a capability call.
    pub fn from_capnp(e: &capnp::Error) -> Self {
        let m = clean_message(e);
        let lower = m.to_ascii_lowercase();
        let starts = |w: &str| lower.starts_with(w);
        if starts("refused:") || starts("denied:") || starts("revoked:") {
            Refusal::Policy(m)
        } else if starts("not found:") {
            Refusal::NotFound(m)
        } else if starts("limit:") {
            Refusal::Limit(m)
        } else if starts("unsupported:") || e.kind == capnp::ErrorKind::Unimplemented {
            Refusal::Unsupported(m)
        } else if lower.contains("connection refused") || lower.contains("os error 111") {
            Refusal::ConnectionRefused(m)
        } else if lower.contains("timed out") || lower.contains("no answer within") {
            Refusal::TimedOut(m)
        } else {
            Refusal::Failed(m)
        }
    }

    /// A missing grant for `target` (TCP) or `what`.
    pub fn no_grant(what: impl std::fmt::Display) -> Self {
        Refusal::NoGrant(what.to_string())
    }

    /// A missing grant for a TCP connection to `t`.
    pub fn no_tcp_grant(t: &Target) -> Self {
        Refusal::NoGrant(format!("TCP {t}"))
    }

    /// Whether a less specific grant may still be tried after this failure: the grant
    /// said no, but another grant the grain holds may say yes.
    pub fn try_next_grant(&self) -> bool {
        matches!(
            self,
            Refusal::Policy(_) | Refusal::NotFound(_) | Refusal::Unsupported(_) | Refusal::Limit(_)
        )
    }

    /// The SOCKS5 reply code for this refusal.
    pub fn socks_reply(&self) -> u8 {
        match self {
            Refusal::NoGrant(_) | Refusal::Policy(_) => reply::NOT_ALLOWED,
            Refusal::NotFound(_) => reply::HOST_UNREACHABLE,
            Refusal::ConnectionRefused(_) => reply::CONNECTION_REFUSED,
            Refusal::TimedOut(_) => reply::TTL_EXPIRED,
            Refusal::Limit(_) | Refusal::Unsupported(_) | Refusal::Failed(_) => {
                reply::GENERAL_FAILURE
            }
        }
    }

    /// The HTTP status for this refusal.
    pub fn http_status(&self) -> StatusCode {
        match self {
            Refusal::NoGrant(_) | Refusal::Policy(_) => StatusCode::FORBIDDEN,
            Refusal::TimedOut(_) => StatusCode::GATEWAY_TIMEOUT,
            Refusal::Limit(_) => StatusCode::TOO_MANY_REQUESTS,
            Refusal::NotFound(_)
            | Refusal::ConnectionRefused(_)
            | Refusal::Unsupported(_)
            | Refusal::Failed(_) => StatusCode::BAD_GATEWAY,
        }
    }

    /// A short name for logs.
    pub fn class(&self) -> &'static str {
        match self {
            Refusal::NoGrant(_) => "no_grant",
            Refusal::Policy(_) => "policy",
            Refusal::NotFound(_) => "not_found",
            Refusal::ConnectionRefused(_) => "connection_refused",
            Refusal::TimedOut(_) => "timed_out",
            Refusal::Limit(_) => "limit",
            Refusal::Unsupported(_) => "unsupported",
            Refusal::Failed(_) => "failed",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The stable words of driver and supervisor errors map to the reply codes and
    /// statuses of the table in the module doc, through any number of RPC hops.
    #[test]
    fn errors_map_to_codes() {
        let cases = [
            (
                capnp::Error::failed(
                    "remote exception: remote exception: refused: connect to 10.0.0.1:80 is not \
                     allowed by the policy (rule: default)"
                        .into(),
                ),
                reply::NOT_ALLOWED,
                403,
            ),
            (
                capnp::Error::failed("remote exception: not found: host x does not exist".into()),
                reply::HOST_UNREACHABLE,
                502,
            ),
            (
                capnp::Error::disconnected(
                    "remote exception: failed: connecting to 127.0.0.1:9: Connection refused (os \
                     error 111)"
                        .into(),
                ),
                reply::CONNECTION_REFUSED,
                502,
            ),
            (
                capnp::Error::disconnected(
                    "failed: connecting to 1.2.3.4:80: no answer within 10s".into(),
                ),
                reply::TTL_EXPIRED,
                504,
            ),
            (
                capnp::Error::overloaded("limit: too many connections".into()),
                reply::GENERAL_FAILURE,
                429,
            ),
            (
                capnp::Error::failed("revoked: grant grant-1 was revoked".into()),
                reply::NOT_ALLOWED,
                403,
            ),
            (
                capnp::Error::unimplemented("UDP grants are not served yet".into()),
                reply::GENERAL_FAILURE,
                502,
            ),
        ];
        for (e, code, status) in cases {
            let r = Refusal::from_capnp(&e);
            assert_eq!(r.socks_reply(), code, "{r:?}");
            assert_eq!(r.http_status().as_u16(), status, "{r:?}");
            assert!(!r.to_string().starts_with("remote exception"), "{r}");
        }
        let t = Target::parse("a.test:1").unwrap();
        assert_eq!(Refusal::no_tcp_grant(&t).socks_reply(), reply::NOT_ALLOWED);
        assert_eq!(Refusal::no_tcp_grant(&t).http_status().as_u16(), 403);
    }
}
