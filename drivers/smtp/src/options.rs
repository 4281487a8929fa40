//! The SMTP driver's options (`[drivers.NAME.options]`) and per-grain mail profiles.
//!
//! ```toml
//! [drivers.smtp.options]
//! relay = "smtp.example.net:587"       # required: where accepted mail goes
//! relay_tls = "starttls"                # "starttls" (default), "tls" (port 465), "none"
//! relay_server_name = "smtp.example.net" # the name its certificate must have
//! helo_name = "capnet.example.org"     # what the driver says in EHLO to the relay
//! extra_ca_files = ["/etc/capnet/relay-ca.pem"]   # standard option
//!
//! # One profile per grain id; "*" is the profile of every other grain. A grain without a
//! # profile cannot send mail.
//! [drivers.smtp.options.grains."*"]
//! allowed_senders = ["*@apps.example.org"]
//!
//! [drivers.smtp.options.grains.newsletter]
//! envelope_sender = "news@example.org" # the only MAIL FROM allowed
//! allowed_from = ["news@example.org", "*@lists.example.org"]  # From: header
//! allowed_recipients = []              # empty: anyone
//! max_recipients = 50
//! max_message_bytes = 1048576
//! messages_per_window = 200
//! window_secs = 3600
//!
//! [drivers.smtp.options.inbound]       # mail received through listenTcp
//! max_message_bytes = 10485760
//! max_recipients = 100
//! domains = ["example.org"]            # empty: any recipient domain
//! ```

use std::collections::BTreeMap;
use std::time::Duration;

use capnet_driver_api::HostSpec;
use serde::Deserialize;

/// Default largest message, 10 MiB.
pub const DEFAULT_MAX_MESSAGE_BYTES: u64 = 10 * 1024 * 1024;
/// Default recipients per message.
pub const DEFAULT_MAX_RECIPIENTS: u32 = 20;
/// Default messages per window.
pub const DEFAULT_MESSAGES_PER_WINDOW: u32 = 100;
/// Default window, one hour.
pub const DEFAULT_WINDOW_SECS: u64 = 3600;
/// Default time to wait for each line from a client, and for each reply of the relay.
pub const DEFAULT_TIMEOUT_SECS: u64 = 60;

/// How the driver talks to the relay.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RelayTls {
    /// Plain SMTP upgraded with STARTTLS, certificate verified; a relay that does not
    /// offer STARTTLS is not used.
    #[default]
    Starttls,
    /// TLS from the first byte (submissions port 465), certificate verified.
    Tls,
    /// No encryption: only for a relay on the same host or a trusted link.
    None,
}

/// `[drivers.NAME.options]`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SmtpOptions {
    /// `host:port` of the relay (a name, an IPv4 address, or `[IPv6]`).
    pub relay: Option<String>,
    /// Encryption to the relay.
    #[serde(default)]
    pub relay_tls: RelayTls,
    /// The TLS name the relay's certificate must carry (default: the relay's host).
    pub relay_server_name: Option<String>,
    /// The name the driver gives in EHLO to the relay and in its own greeting.
    pub helo_name: Option<String>,
    /// Seconds to wait for each line from a client and each reply from the relay.
    pub timeout_secs: Option<u64>,
    /// Per-grain profiles; `"*"` is everyone else.
    #[serde(default)]
    pub grains: BTreeMap<String, MailProfile>,
    /// Inbound mail through `listenTcp`.
    #[serde(default)]
    pub inbound: InboundOptions,
}

/// What one grain may send.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MailProfile {
    /// The fixed envelope sender: `MAIL FROM` must be exactly this.
    pub envelope_sender: Option<String>,
    /// Envelope senders allowed besides it (patterns: `user@domain` or `*@domain`).
    #[serde(default)]
    pub allowed_senders: Vec<String>,
    /// Addresses allowed in the `From:` header (patterns). Default: the envelope sender
    /// and the allowed senders.
    #[serde(default)]
    pub allowed_from: Vec<String>,
    /// Recipients allowed (patterns); empty means anyone.
    #[serde(default)]
    pub allowed_recipients: Vec<String>,
    /// Recipients per message (default 20).
    pub max_recipients: Option<u32>,
    /// Largest message in bytes (default 10 MiB).
    pub max_message_bytes: Option<u64>,
    /// Messages relayed per window per grant (default 100).
    pub messages_per_window: Option<u32>,
    /// The window in seconds (default 3600).
    pub window_secs: Option<u64>,
}

/// `[drivers.NAME.options.inbound]`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InboundOptions {
    /// Largest message in bytes (default 10 MiB).
    pub max_message_bytes: Option<u64>,
    /// Recipients per message (default 20).
    pub max_recipients: Option<u32>,
    /// Recipient domains accepted; empty means any.
    #[serde(default)]
    pub domains: Vec<String>,
}

/// An address pattern: `user@domain` (exact, case-insensitive) or `*@domain`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AddressPattern {
    local: Option<String>,
    domain: String,
}

/// An option value that is not valid.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct OptionError(pub String);

impl AddressPattern {
    /// Parses `user@domain` or `*@domain`.
    pub fn parse(text: &str) -> Result<Self, OptionError> {
        let (local, domain) = text.rsplit_once('@').ok_or_else(|| {
            OptionError(format!(
                "{text:?} is not an address pattern (user@domain or *@domain)"
            ))
        })?;
        if domain.is_empty() || local.is_empty() || domain.contains(char::is_whitespace) {
            return Err(OptionError(format!(
                "{text:?} is not an address pattern (user@domain or *@domain)"
            )));
        }
        Ok(Self {
            local: (local != "*").then(|| local.to_lowercase()),
            domain: domain.trim_end_matches('.').to_lowercase(),
        })
    }

    /// Whether `addr` matches (case-insensitively).
    pub fn matches(&self, addr: &str) -> bool {
        let Some((local, domain)) = addr.rsplit_once('@') else {
            return false;
        };
        domain.trim_end_matches('.').to_lowercase() == self.domain
            && self
                .local
                .as_ref()
                .is_none_or(|l| *l == local.to_lowercase())
    }
}

fn patterns(list: &[String], what: &str) -> Result<Vec<AddressPattern>, OptionError> {
    list.iter()
        .map(|p| AddressPattern::parse(p).map_err(|e| OptionError(format!("{what}: {}", e.0))))
        .collect()
}

/// A mail profile, validated.
#[derive(Clone, Debug)]
pub struct Profile {
    /// Allowed envelope senders (the fixed one first).
    pub senders: Vec<AddressPattern>,
    /// Allowed `From:` addresses.
    pub from: Vec<AddressPattern>,
    /// Allowed recipients; empty means anyone.
    pub recipients: Vec<AddressPattern>,
    /// Recipients per message.
    pub max_recipients: u32,
    /// Largest message.
    pub max_message_bytes: u64,
    /// Messages per window.
    pub messages_per_window: u32,
    /// The window.
    pub window: Duration,
}

impl Profile {
    /// Validates a profile; `grain` names it in errors.
    pub fn new(grain: &str, p: &MailProfile) -> Result<Self, OptionError> {
        let what = |field: &str| format!("grains.{grain:?}.{field}");
        let mut senders = Vec::new();
        if let Some(s) = &p.envelope_sender {
            if s.starts_with("*@") {
                return Err(OptionError(format!(
                    "{}: must be one address, not a pattern",
                    what("envelope_sender")
                )));
            }
            senders.push(
                AddressPattern::parse(s)
                    .map_err(|e| OptionError(format!("{}: {}", what("envelope_sender"), e.0)))?,
            );
        }
        senders.extend(patterns(&p.allowed_senders, &what("allowed_senders"))?);
        if senders.is_empty() {
            return Err(OptionError(format!(
                "{}: set envelope_sender or allowed_senders, or the grain can send nothing",
                what("")
            )));
        }
        let from = if p.allowed_from.is_empty() {
            senders.clone()
        } else {
            patterns(&p.allowed_from, &what("allowed_from"))?
        };
        Ok(Self {
            senders,
            from,
            recipients: patterns(&p.allowed_recipients, &what("allowed_recipients"))?,
            max_recipients: p.max_recipients.unwrap_or(DEFAULT_MAX_RECIPIENTS).max(1),
            max_message_bytes: p.max_message_bytes.unwrap_or(DEFAULT_MAX_MESSAGE_BYTES),
            messages_per_window: p.messages_per_window.unwrap_or(DEFAULT_MESSAGES_PER_WINDOW),
            window: Duration::from_secs(p.window_secs.unwrap_or(DEFAULT_WINDOW_SECS).max(1)),
        })
    }
}

/// Splits `host:port` (with `[v6]:port` for IPv6) into a host and port.
pub fn parse_relay(text: &str) -> Result<(HostSpec, u16), OptionError> {
    let err = || {
        OptionError(format!(
            "relay {text:?}: expected host:port, such as smtp.example.net:587 or [2001:db8::25]:25"
        ))
    };
    let (host, port) = text.rsplit_once(':').ok_or_else(err)?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    let port: u16 = port.parse().map_err(|_| err())?;
    if port == 0 {
        return Err(err());
    }
    let host = HostSpec::parse(host).map_err(|e| OptionError(format!("relay {text:?}: {e}")))?;
    Ok((host, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Patterns match exactly or by domain, case-insensitively; bad ones are refused.
    #[test]
    fn address_patterns() {
        let exact = AddressPattern::parse("App@Example.test").expect("exact");
        assert!(exact.matches("app@example.test"));
        assert!(!exact.matches("other@example.test"));
        let domain = AddressPattern::parse("*@example.test").expect("domain");
        assert!(domain.matches("any@EXAMPLE.test."));
        assert!(!domain.matches("any@sub.example.test"));
        assert!(!domain.matches("no-at-sign"));
        assert!(AddressPattern::parse("example.test").is_err());
        assert!(AddressPattern::parse("@example.test").is_err());
    }

    /// A profile needs a sender; From: defaults to the senders.
    #[test]
    fn profiles() {
        assert!(Profile::new("g", &MailProfile::default()).is_err());
        let p = Profile::new(
            "g",
            &MailProfile {
                envelope_sender: Some("a@b.test".into()),
                ..MailProfile::default()
            },
        )
        .expect("profile");
        assert!(p.from[0].matches("a@b.test"));
        assert_eq!(p.max_recipients, DEFAULT_MAX_RECIPIENTS);
    }

    /// Relay addresses parse for names, IPv4 and bracketed IPv6.
    #[test]
    fn relays() {
        assert_eq!(parse_relay("127.0.0.1:25").expect("v4").1, 25);
        assert_eq!(parse_relay("[::1]:2525").expect("v6").1, 2525);
        assert!(parse_relay("smtp.example.test:587").is_ok());
        assert!(parse_relay("smtp.example.test").is_err());
        assert!(parse_relay("x:0").is_err());
    }
}
