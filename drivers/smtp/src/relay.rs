//! The SMTP client side: hands one accepted message to the administrator's relay, with
//! verified TLS (STARTTLS or implicit), and turns every outcome into a reply for the grain.
//!
//! The connection goes through [`ConnectContext::dial_host`], so the grant's policy vets
//! the relay's addresses like any destination. Replies from the relay are read with
//! bounded lines and a bounded number of lines, each within the timeout.

use std::time::Duration;

use capnet_driver_api::{BoxStream, ConnectContext, HostSpec};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

use crate::options::RelayTls;
use crate::server::{Envelope, Reply, dot_stuff};

/// Longest reply line from the relay.
const MAX_REPLY_LINE: usize = 4096;
/// Most lines in one reply.
const MAX_REPLY_LINES: usize = 64;

/// Where and how to relay.
#[derive(Clone, Debug)]
pub struct RelayConfig {
    /// The relay's host.
    pub host: HostSpec,
    /// Its port.
    pub port: u16,
    /// Encryption.
    pub tls: RelayTls,
    /// The name the certificate must carry.
    pub server_name: String,
    /// Our EHLO name.
    pub helo: String,
    /// Per-reply timeout.
    pub timeout: Duration,
}

/// A failure talking to the relay (becomes a 4xx reply: the grain may try again later).
#[derive(Debug, thiserror::Error)]
enum RelayError {
    #[error("{0}")]
    Io(String),
    #[error("the relay's reply was malformed: {0}")]
    Protocol(String),
    #[error("the relay does not offer STARTTLS, and relay_tls = \"starttls\" requires it")]
    NoStarttls,
    #[error("no reply from the relay within {0}s")]
    Timeout(u64),
}

struct Client {
    io: BufReader<BoxStream>,
    timeout: Duration,
}

impl Client {
    async fn reply(&mut self) -> Result<Reply, RelayError> {
        match tokio::time::timeout(self.timeout, read_reply(&mut self.io)).await {
            Ok(r) => r,
            Err(_) => Err(RelayError::Timeout(self.timeout.as_secs())),
        }
    }

    async fn command(&mut self, line: &str) -> Result<Reply, RelayError> {
        self.write(format!("{line}\r\n").as_bytes()).await?;
        self.reply().await
    }

    async fn write(&mut self, data: &[u8]) -> Result<(), RelayError> {
        let w = self.io.get_mut();
        let r = tokio::time::timeout(self.timeout, async {
            w.write_all(data).await?;
            w.flush().await
        })
        .await;
        match r {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(RelayError::Io(format!("writing to the relay: {e}"))),
            Err(_) => Err(RelayError::Timeout(self.timeout.as_secs())),
        }
    }
}

async fn read_reply(r: &mut BufReader<BoxStream>) -> Result<Reply, RelayError> {
    let mut code = None;
    let mut text = Vec::new();
    for _ in 0..MAX_REPLY_LINES {
        let mut line = Vec::new();
        let n = (&mut *r)
            .take(MAX_REPLY_LINE as u64)
            .read_until(b'\n', &mut line)
            .await
            .map_err(|e| RelayError::Io(format!("reading from the relay: {e}")))?;
        if n == 0 {
            return Err(RelayError::Io("the relay closed the connection".into()));
        }
        if !line.ends_with(b"\n") {
            return Err(RelayError::Protocol("reply line too long".into()));
        }
        let line = String::from_utf8_lossy(&line);
        let line = line.trim_end_matches(['\r', '\n']);
        let this: u16 = line
            .get(..3)
            .and_then(|c| c.parse().ok())
            .filter(|c| (200..600).contains(c))
            .ok_or_else(|| RelayError::Protocol(format!("{line:?}")))?;
        if code.is_some_and(|c| c != this) {
            return Err(RelayError::Protocol(format!("mixed codes in {line:?}")));
        }
        code = Some(this);
        text.push(line.get(4..).unwrap_or("").to_string());
        match line.as_bytes().get(3) {
            Some(b'-') => continue,
            Some(b' ') | None => {
                return Ok(Reply::new(this, text.join("\n")));
            }
            Some(_) => return Err(RelayError::Protocol(format!("{line:?}"))),
        }
    }
    Err(RelayError::Protocol("too many reply lines".into()))
}

/// What the relay's EHLO reply says it supports.
#[derive(Default)]
struct Extensions {
    starttls: bool,
    eight_bit: bool,
    smtputf8: bool,
    size: bool,
}

fn extensions(ehlo: &Reply) -> Extensions {
    let mut x = Extensions::default();
    for line in ehlo.text.lines().skip(1) {
        let kw = line
            .split_whitespace()
            .next()
            .unwrap_or("")
            .to_ascii_uppercase();
        match kw.as_str() {
            "STARTTLS" => x.starttls = true,
            "8BITMIME" => x.eight_bit = true,
            "SMTPUTF8" => x.smtputf8 = true,
            "SIZE" => x.size = true,
            _ => {}
        }
    }
    x
}

fn relay_said(step: &str, r: &Reply) -> Reply {
    Reply::new(
        r.code,
        format!(
            "{} the relay refused {step}: {}",
            if r.code >= 500 { "5.0.0" } else { "4.0.0" },
            strip_enhanced(&r.text.replace('\n', " "))
        ),
    )
}

fn unavailable(e: impl std::fmt::Display) -> Reply {
    Reply::new(451, format!("4.4.1 the relay is unavailable: {e}"))
}

/// Relays one message; the reply is for the grain.
pub async fn relay(cx: &ConnectContext, cfg: &RelayConfig, env: &Envelope, data: &[u8]) -> Reply {
    let socket = match cx.dial_host(&cfg.host, cfg.port).await {
        Ok(s) => s,
        Err(e) => return unavailable(e),
    };
    let tls_config = match cfg.tls {
        RelayTls::None => None,
        _ => match cx.host().tls_config() {
            Ok(c) => Some(c),
            Err(e) => return unavailable(e),
        },
    };
    let stream: BoxStream = match (cfg.tls, &tls_config) {
        (RelayTls::Tls, Some(c)) => {
            match capnet_driver_api::tls::connect(c.clone(), &cfg.server_name, socket).await {
                Ok(t) => Box::new(t),
                Err(e) => return unavailable(format!("TLS with {}: {e}", cfg.server_name)),
            }
        }
        _ => Box::new(socket),
    };
    let mut client = Client {
        io: BufReader::new(stream),
        timeout: cfg.timeout,
    };
    match transact(&mut client, cfg, tls_config, env, data).await {
        Ok(reply) => reply,
        Err(e) => unavailable(e),
    }
}

async fn transact(
    c: &mut Client,
    cfg: &RelayConfig,
    tls_config: Option<std::sync::Arc<capnet_driver_api::tls::ClientConfig>>,
    env: &Envelope,
    data: &[u8],
) -> Result<Reply, RelayError> {
    let greeting = c.reply().await?;
    if greeting.code != 220 {
        return Ok(relay_said("the connection", &greeting));
    }
    let mut ehlo = c.command(&format!("EHLO {}", cfg.helo)).await?;
    if ehlo.code != 250 {
        return Ok(relay_said("EHLO", &ehlo));
    }
    if cfg.tls == RelayTls::Starttls {
        if !extensions(&ehlo).starttls {
            return Err(RelayError::NoStarttls);
        }
        let r = c.command("STARTTLS").await?;
        if r.code != 220 {
            return Ok(relay_said("STARTTLS", &r));
        }
        if !c.io.buffer().is_empty() {
            return Err(RelayError::Protocol(
                "the relay sent data before the TLS handshake".into(),
            ));
        }
        let Some(config) = tls_config else {
            return Err(RelayError::Io("no TLS configuration".into()));
        };
        let placeholder = BufReader::new(Box::new(tokio::io::empty()) as BoxStream);
        let plain = std::mem::replace(&mut c.io, placeholder).into_inner();
        let tls = capnet_driver_api::tls::connect(config, &cfg.server_name, plain)
            .await
            .map_err(|e| RelayError::Io(format!("TLS with {}: {e}", cfg.server_name)))?;
        c.io = BufReader::new(Box::new(tls));
        ehlo = c.command(&format!("EHLO {}", cfg.helo)).await?;
        if ehlo.code != 250 {
            return Ok(relay_said("EHLO after STARTTLS", &ehlo));
        }
    }
    let x = extensions(&ehlo);
    let mut mail = format!("MAIL FROM:<{}>", env.from);
    if env.body_8bit {
        if !x.eight_bit {
            return Ok(Reply::new(
                554,
                "5.6.3 the relay does not accept 8BITMIME; send 7-bit content",
            ));
        }
        mail.push_str(" BODY=8BITMIME");
    }
    if env.smtputf8 {
        if !x.smtputf8 {
            return Ok(Reply::new(
                553,
                "5.6.7 the relay does not accept SMTPUTF8 addresses",
            ));
        }
        mail.push_str(" SMTPUTF8");
    }
    if x.size {
        mail.push_str(&format!(" SIZE={}", data.len()));
    }
    let r = c.command(&mail).await?;
    if r.code != 250 {
        return Ok(relay_said("the sender", &r));
    }
    for rcpt in &env.rcpts {
        let r = c.command(&format!("RCPT TO:<{rcpt}>")).await?;
        if r.code != 250 && r.code != 251 {
            let _ = c.command("RSET").await;
            return Ok(relay_said(&format!("recipient <{rcpt}>"), &r));
        }
    }
    let r = c.command("DATA").await?;
    if r.code != 354 {
        return Ok(relay_said("DATA", &r));
    }
    c.write(&dot_stuff(data)).await?;
    let r = c.reply().await?;
    let _ = c.command("QUIT").await;
    if r.code != 250 {
        return Ok(relay_said("the message", &r));
    }
    Ok(Reply::new(
        250,
        format!(
            "2.0.0 relayed: {}",
            strip_enhanced(&r.text.replace('\n', " "))
        ),
    ))
}

/// The text of a reply without its leading enhanced status code (`2.0.0 `), if any.
fn strip_enhanced(text: &str) -> &str {
    let mut parts = text.splitn(2, ' ');
    let first = parts.next().unwrap_or("");
    let is_code = first.split('.').count() == 3
        && first
            .split('.')
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
    match parts.next() {
        Some(rest) if is_code => rest,
        _ => text,
    }
}
