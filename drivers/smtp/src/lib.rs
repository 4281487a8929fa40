//! capnet's SMTP driver: relay-only mail egress, mediated per grant, and optional inbound
//! mail.
//!
//! # Outbound
//!
//! A grain is granted a `TcpPort` (or an `IpNetwork`) from this driver and speaks SMTP on
//! it. Whatever host and port the grant names, every connection reaches the driver itself
//! ([`Driver::connect`] returns one end of an in-memory pipe whose other end an SMTP
//! session serves): the grain never reaches a mail server directly. The session checks
//! what the grain says against the grain's mail profile (see [`options`]):
//!
//! * `MAIL FROM` must be the profile's fixed `envelope_sender` or match `allowed_senders`
//!   (553 5.7.1 otherwise);
//! * every `RCPT TO` must match `allowed_recipients` when that is set (550 5.7.1), and at
//!   most `max_recipients` are accepted (452 4.5.3);
//! * the message may be at most `max_message_bytes` (552 5.3.4), and at most
//!   `messages_per_window` messages per `window_secs` are relayed per grant (450 4.7.1);
//! * the message must have exactly one `From:` header whose every address matches
//!   `allowed_from` (550 5.7.1 or 550 5.6.0).
//!
//! An accepted message is relayed at once to the administrator's relay (`relay`, verified
//! STARTTLS by default, see [`relay`]) and the relay's verdict is the grain's reply to
//! `DATA`. `8BITMIME` and `SMTPUTF8` are advertised and passed through (a relay that lacks
//! them refuses the message with 554 5.6.3 / 553 5.6.7). Every refusal is audited as a
//! `MediationRefused` event; every relayed message as an `Other` event naming sender,
//! recipients and size.
//!
//! # Inbound
//!
//! With an `IpInterface` grant the grain calls `listenTcp`; the driver serves SMTP on the
//! port and delivers each accepted message to the grain's `TcpPort` as one stream (see
//! [`inbound`] for the framing), with `[inbound]` size and recipient limits.

#![warn(missing_docs)]

pub mod inbound;
pub mod message;
pub mod options;
pub mod relay;
pub mod server;

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::rc::Rc;
use std::time::{Duration, Instant};

use capnet_driver_api::capnet_schemas::ids;
use capnet_driver_api::{
    ConnectContext, Connection, Driver, DriverError, DriverHost, EventKind, ListenContext,
    Listener, Manifest, Privileges, Provided,
};
use futures::future::LocalBoxFuture;

use crate::inbound::InboundConfig;
use crate::options::{
    AddressPattern, DEFAULT_MAX_MESSAGE_BYTES, DEFAULT_MAX_RECIPIENTS, DEFAULT_TIMEOUT_SECS,
    Profile, RelayTls, SmtpOptions, parse_relay,
};
use crate::relay::RelayConfig;
use crate::server::{Envelope, Handler, Reply, SessionLimits};

pub use crate::options::SmtpOptions as Options;

/// The SMTP driver.
pub struct SmtpDriver {
    relay: RelayConfig,
    profiles: BTreeMap<String, Rc<Profile>>,
    inbound: InboundConfig,
    timeout: Duration,
    /// Times of messages relayed recently, per grant.
    sent: RefCell<HashMap<String, VecDeque<Instant>>>,
}

impl SmtpDriver {
    fn profile(&self, grain: &str) -> Option<Rc<Profile>> {
        self.profiles
            .get(grain)
            .or_else(|| self.profiles.get("*"))
            .cloned()
    }

    /// Whether `grant` may relay one more message now under `profile`.
    fn window_has_room(&self, grant: &str, profile: &Profile) -> bool {
        if profile.messages_per_window == 0 {
            return true;
        }
        let mut sent = self.sent.borrow_mut();
        let q = sent.entry(grant.to_string()).or_default();
        let now = Instant::now();
        while q
            .front()
            .is_some_and(|t| now.duration_since(*t) >= profile.window)
        {
            q.pop_front();
        }
        q.len() < profile.messages_per_window as usize
    }

    fn record_sent(&self, grant: &str) {
        self.sent
            .borrow_mut()
            .entry(grant.to_string())
            .or_default()
            .push_back(Instant::now());
    }
}

impl Driver for SmtpDriver {
    type Options = SmtpOptions;

    fn manifest() -> Manifest {
        Manifest {
            name: "smtp".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            description: "Relay-only mail egress mediated per grant, and inbound mail".into(),
            author: "capnet".into(),
            provides: vec![
                Provided {
                    interface_id: ids::TCP_PORT,
                    name: "TcpPort".into(),
                    protocols: vec!["smtp".into()],
                },
                Provided {
                    interface_id: ids::IP_NETWORK,
                    name: "IpNetwork".into(),
                    protocols: vec!["smtp".into()],
                },
                Provided {
                    interface_id: ids::IP_INTERFACE,
                    name: "IpInterface".into(),
                    protocols: vec!["smtp".into()],
                },
            ],
            privileges: Privileges {
                outbound_tcp: true,
                inbound_tcp: true,
                dns: true,
                ..Default::default()
            },
        }
    }

    fn start(o: SmtpOptions, host: &DriverHost) -> Result<Self, DriverError> {
        let opt = |e: options::OptionError| DriverError::Options(e.0);
        let relay_text = o.relay.as_deref().ok_or_else(|| {
            DriverError::Options(
                "relay is required: the host:port of the mail relay to hand mail to".into(),
            )
        })?;
        let (relay_host, relay_port) = parse_relay(relay_text).map_err(opt)?;
        let server_name = o
            .relay_server_name
            .clone()
            .unwrap_or_else(|| relay_host.to_string());
        let timeout = Duration::from_secs(o.timeout_secs.unwrap_or(DEFAULT_TIMEOUT_SECS).max(1));
        let helo = o
            .helo_name
            .clone()
            .unwrap_or_else(|| format!("{}.capnet.invalid", host.name()));
        if o.relay_tls != RelayTls::None {
            // Fail at start, not at the first message, if the CA files are unusable.
            host.tls_config()?;
        }
        let mut profiles = BTreeMap::new();
        for (grain, p) in &o.grains {
            profiles.insert(grain.clone(), Rc::new(Profile::new(grain, p).map_err(opt)?));
        }
        let domains = o
            .inbound
            .domains
            .iter()
            .map(|d| AddressPattern::parse(&format!("*@{d}")))
            .collect::<Result<Vec<_>, _>>()
            .map_err(opt)?;
        Ok(Self {
            relay: RelayConfig {
                host: relay_host,
                port: relay_port,
                tls: o.relay_tls,
                server_name,
                helo: helo.clone(),
                timeout,
            },
            profiles,
            inbound: InboundConfig {
                name: helo,
                limits: SessionLimits {
                    max_message_bytes: o
                        .inbound
                        .max_message_bytes
                        .unwrap_or(DEFAULT_MAX_MESSAGE_BYTES),
                    max_recipients: o
                        .inbound
                        .max_recipients
                        .unwrap_or(DEFAULT_MAX_RECIPIENTS)
                        .max(1),
                    line_timeout: timeout,
                },
                domains,
            },
            timeout,
            sent: RefCell::new(HashMap::new()),
        })
    }

    async fn connect(self: Rc<Self>, cx: ConnectContext) -> Result<Connection, DriverError> {
        let Some(profile) = self.profile(cx.grain_id()) else {
            let e = DriverError::Refused {
                what: format!("mail from grain {}", cx.grain_id()),
                rule: "smtp: no mail profile for this grain (options.grains)".into(),
            };
            cx.report(EventKind::MediationRefused, e.to_string());
            return Err(e);
        };
        let limits = SessionLimits {
            max_message_bytes: profile.max_message_bytes,
            max_recipients: profile.max_recipients,
            line_timeout: self.timeout,
        };
        let peer = format!(
            "smtp session (relay {}:{})",
            self.relay.host, self.relay.port
        );
        let (ours, theirs) = tokio::io::duplex(64 * 1024);
        let handler = Rc::new(Outbound {
            driver: self.clone(),
            cx,
            profile,
        });
        tokio::task::spawn_local(server::serve(theirs, handler, limits));
        Ok(Connection::new(ours, peer))
    }

    async fn listen(self: Rc<Self>, cx: ListenContext) -> Result<Box<dyn Listener>, DriverError> {
        let l = inbound::listen(cx, self.inbound.clone()).await?;
        Ok(Box::new(l))
    }
}

/// The outbound session's policy: one grain's profile and the relay.
struct Outbound {
    driver: Rc<SmtpDriver>,
    cx: ConnectContext,
    profile: Rc<Profile>,
}

impl Handler for Outbound {
    fn server_name(&self) -> String {
        self.driver.relay.helo.clone()
    }

    fn mail_from(&self, env: &Envelope, _size: Option<u64>) -> Result<(), Reply> {
        if self.cx.is_revoked() {
            return Err(Reply::new(421, "4.7.0 revoked: the grant was revoked"));
        }
        if !self.profile.senders.iter().any(|p| p.matches(&env.from)) {
            return Err(Reply::new(
                553,
                format!("5.7.1 sender <{}> is not allowed for this grain", env.from),
            ));
        }
        if !self
            .driver
            .window_has_room(self.cx.grant_id(), &self.profile)
        {
            return Err(Reply::new(
                450,
                format!(
                    "4.7.1 limit: at most {} messages per {}s; try later",
                    self.profile.messages_per_window,
                    self.profile.window.as_secs()
                ),
            ));
        }
        Ok(())
    }

    fn rcpt_to(&self, _env: &Envelope, rcpt: &str) -> Result<(), Reply> {
        let allowed = &self.profile.recipients;
        if !allowed.is_empty() && !allowed.iter().any(|p| p.matches(rcpt)) {
            return Err(Reply::new(
                550,
                format!("5.7.1 recipient <{rcpt}> is not allowed for this grain"),
            ));
        }
        Ok(())
    }

    fn message(self: Rc<Self>, env: Envelope, data: Vec<u8>) -> LocalBoxFuture<'static, Reply> {
        Box::pin(async move {
            match message::from_addresses(&data) {
                Err(e) => return Reply::new(550, format!("5.6.0 {e}")),
                Ok(addrs) => {
                    if let Some(bad) = addrs
                        .iter()
                        .find(|a| !self.profile.from.iter().any(|p| p.matches(a)))
                    {
                        return Reply::new(
                            550,
                            format!("5.7.1 From: address <{bad}> is not allowed for this grain"),
                        );
                    }
                }
            }
            if self.cx.is_revoked() {
                return Reply::new(421, "4.7.0 revoked: the grant was revoked");
            }
            if !self
                .driver
                .window_has_room(self.cx.grant_id(), &self.profile)
            {
                return Reply::new(450, "4.7.1 limit: message rate exceeded; try later");
            }
            let reply = relay::relay(&self.cx, &self.driver.relay, &env, &data).await;
            if reply.code == 250 {
                self.driver.record_sent(self.cx.grant_id());
                self.cx.report(
                    EventKind::Other,
                    format!(
                        "mail relayed: from <{}> to {} recipient(s) <{}>, {} bytes",
                        env.from,
                        env.rcpts.len(),
                        env.rcpts.join(">, <"),
                        data.len()
                    ),
                );
            }
            reply
        })
    }

    fn refused(&self, command: &str, reply: &Reply) {
        self.cx.report(
            EventKind::MediationRefused,
            format!("smtp {command}: {reply}"),
        );
    }
}

capnet_driver_api::export_driver!(SmtpDriver);
