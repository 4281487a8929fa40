//! The SMTP server side: one session with a client that may be hostile (a grain, or a
//! peer on the network for inbound mail).
//!
//! Supported: `EHLO`, `HELO`, `MAIL FROM` (parameters `SIZE`, `BODY=7BIT|8BITMIME`,
//! `SMTPUTF8`), `RCPT TO`, `DATA`, `RSET`, `NOOP`, `VRFY` (always 252), `QUIT`. Advertised:
//! `8BITMIME`, `SMTPUTF8`, `SIZE`, `ENHANCEDSTATUSCODES`. Not offered: `STARTTLS` (the
//! grain's side is a capability, not a network path), `AUTH` (the grant is the
//! authority), `PIPELINING`, `CHUNKING`.
//!
//! Robustness: command lines are bounded by [`MAX_COMMAND_LINE`] and message lines by
//! [`MAX_DATA_LINE`]; a longer line is refused without being buffered. The message is
//! buffered up to the size limit only; past it the rest is read and discarded, then
//! refused. Every read has a timeout. Too many errors or messages in one session close it
//! with 421. Nothing a client sends can make the session panic.

use std::io;
use std::rc::Rc;
use std::time::Duration;

use futures::future::LocalBoxFuture;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};

/// Longest command line, including CRLF (RFC 5321 allows 512; addresses in UTF-8 and
/// parameters need more room).
pub const MAX_COMMAND_LINE: usize = 2048;
/// Longest line of a message, including CRLF (RFC 5322 says 998 + CRLF; some mailers
/// write longer, so a little more is accepted).
pub const MAX_DATA_LINE: usize = 8192;
/// Errors (4xx/5xx replies to commands) after which a session is closed.
pub const MAX_ERRORS: u32 = 20;
/// Messages in one session.
pub const MAX_MESSAGES_PER_SESSION: u32 = 100;
/// Longest time for one message's DATA phase, however steadily lines arrive.
pub const MAX_DATA_TIME: Duration = Duration::from_secs(600);

/// An SMTP reply: a code and text (which starts with an enhanced status code).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    /// The three-digit code.
    pub code: u16,
    /// The text; several lines for a multi-line reply.
    pub text: String,
}

impl Reply {
    /// A reply.
    pub fn new(code: u16, text: impl Into<String>) -> Self {
        Self {
            code,
            text: text.into(),
        }
    }

    /// 2xx or 3xx.
    pub fn is_positive(&self) -> bool {
        self.code < 400
    }

    /// The reply as it goes on the wire.
    pub fn to_wire(&self) -> Vec<u8> {
        let lines: Vec<&str> = self.text.lines().collect();
        let mut out = Vec::new();
        if lines.is_empty() {
            out.extend_from_slice(format!("{}\r\n", self.code).as_bytes());
        }
        for (i, line) in lines.iter().enumerate() {
            let sep = if i + 1 == lines.len() { ' ' } else { '-' };
            // Never let reply text (which may quote a relay) break the framing.
            let clean: String = line.chars().filter(|c| *c != '\r').collect();
            out.extend_from_slice(format!("{}{sep}{clean}\r\n", self.code).as_bytes());
        }
        out
    }
}

impl std::fmt::Display for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.code, self.text.replace('\n', " / "))
    }
}

/// The envelope of one message.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Envelope {
    /// `MAIL FROM` address (empty for the null sender).
    pub from: String,
    /// `RCPT TO` addresses.
    pub rcpts: Vec<String>,
    /// `BODY=8BITMIME` was given.
    pub body_8bit: bool,
    /// `SMTPUTF8` was given.
    pub smtputf8: bool,
}

/// Limits of one session.
#[derive(Clone, Copy, Debug)]
pub struct SessionLimits {
    /// Largest message (bytes, after dot-unstuffing).
    pub max_message_bytes: u64,
    /// Most recipients per message.
    pub max_recipients: u32,
    /// How long to wait for each line.
    pub line_timeout: Duration,
}

/// What decides on a session's commands: the outbound relay policy or inbound delivery.
pub trait Handler {
    /// The name in the greeting and EHLO reply.
    fn server_name(&self) -> String;
    /// Checks the sender; an error is sent to the client.
    fn mail_from(&self, env: &Envelope, size: Option<u64>) -> Result<(), Reply>;
    /// Checks one more recipient (not yet in `env.rcpts`).
    fn rcpt_to(&self, env: &Envelope, rcpt: &str) -> Result<(), Reply>;
    /// Takes a complete message; the reply goes to the client.
    fn message(self: Rc<Self>, env: Envelope, data: Vec<u8>) -> LocalBoxFuture<'static, Reply>;
    /// Told about every 4xx/5xx reply sent, with the command that caused it (for audit).
    fn refused(&self, command: &str, reply: &Reply);
}

/// A bounded line read.
enum Line {
    /// A line, with its terminator stripped.
    Text(Vec<u8>),
    /// The line was longer than allowed; it was read and discarded.
    TooLong,
    /// End of input.
    Eof,
}

/// Reads one line of at most `max` bytes (LF or CRLF terminated); never buffers more.
async fn read_line<R: AsyncBufRead + Unpin>(r: &mut R, max: usize) -> io::Result<Line> {
    let mut line = Vec::new();
    let mut too_long = false;
    loop {
        let buf = r.fill_buf().await?;
        if buf.is_empty() {
            return Ok(if line.is_empty() && !too_long {
                Line::Eof
            } else if too_long {
                Line::TooLong
            } else {
                Line::Text(line)
            });
        }
        let (chunk, done) = match buf.iter().position(|b| *b == b'\n') {
            Some(i) => (&buf[..=i], true),
            None => (buf, false),
        };
        let n = chunk.len();
        if !too_long {
            if line.len() + n > max {
                too_long = true;
                line.clear();
            } else {
                line.extend_from_slice(chunk);
            }
        }
        r.consume(n);
        if done {
            if too_long {
                return Ok(Line::TooLong);
            }
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            return Ok(Line::Text(line));
        }
    }
}

/// Splits `MAIL FROM:<a> PARAMS` style arguments: `prefix` is `FROM:` or `TO:`.
/// Returns the address (without brackets) and the parameters.
pub fn parse_path<'a>(arg: &'a str, prefix: &str) -> Result<(&'a str, Vec<&'a str>), Reply> {
    let syntax = || Reply::new(501, format!("5.5.4 syntax: expected {prefix}<address>"));
    let head = arg.get(..prefix.len()).ok_or_else(syntax)?;
    if !head.eq_ignore_ascii_case(prefix) {
        return Err(syntax());
    }
    let rest = arg[prefix.len()..].trim_start();
    let rest = rest.strip_prefix('<').ok_or_else(syntax)?;
    let end = rest.find('>').ok_or_else(syntax)?;
    let addr = &rest[..end];
    let params = rest[end + 1..].split_whitespace().collect();
    // Source routes (@a,@b:user@c) are obsolete; take the mailbox after the colon.
    let addr = match addr.strip_prefix('@') {
        Some(route) => route.split_once(':').map(|(_, a)| a).ok_or_else(syntax)?,
        None => addr,
    };
    if addr
        .chars()
        .any(|c| c.is_control() || c == ' ' || c == '<' || c == '>')
    {
        return Err(syntax());
    }
    Ok((addr, params))
}

/// Whether `addr` is a plausible mailbox: `local@domain`, both parts non-empty.
pub fn is_mailbox(addr: &str) -> bool {
    match addr.rsplit_once('@') {
        Some((local, domain)) => !local.is_empty() && !domain.is_empty() && !domain.contains('@'),
        None => false,
    }
}

struct Transaction {
    env: Envelope,
}

/// Serves one SMTP session on `stream` until QUIT, EOF, a timeout or too many errors.
pub async fn serve<S>(stream: S, handler: Rc<dyn Handler>, limits: SessionLimits)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (r, mut w) = tokio::io::split(stream);
    let mut r = BufReader::with_capacity(16 * 1024, r);
    if let Err(e) = session(&mut r, &mut w, handler, limits).await {
        tracing::debug!(error = %e, "smtp session ended");
    }
    let _ = w.shutdown().await;
}

async fn send<W: AsyncWrite + Unpin>(w: &mut W, reply: &Reply) -> io::Result<()> {
    w.write_all(&reply.to_wire()).await?;
    w.flush().await
}

async fn session<R, W>(
    r: &mut R,
    w: &mut W,
    handler: Rc<dyn Handler>,
    limits: SessionLimits,
) -> io::Result<()>
where
    R: AsyncBufRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let name = handler.server_name();
    send(
        w,
        &Reply::new(220, format!("{name} ESMTP capnet mail mediator")),
    )
    .await?;
    let mut greeted = false;
    let mut txn: Option<Transaction> = None;
    let mut errors = 0u32;
    let mut messages = 0u32;
    loop {
        let line =
            match tokio::time::timeout(limits.line_timeout, read_line(r, MAX_COMMAND_LINE)).await {
                Err(_) => {
                    let reply = Reply::new(421, "4.4.2 timeout waiting for a command; closing");
                    handler.refused("(idle)", &reply);
                    return send(w, &reply).await;
                }
                Ok(line) => line?,
            };
        let line = match line {
            Line::Eof => return Ok(()),
            Line::TooLong => {
                errors += 1;
                let reply = Reply::new(
                    500,
                    format!("5.5.6 command line longer than {MAX_COMMAND_LINE} bytes"),
                );
                handler.refused("(long line)", &reply);
                send(w, &reply).await?;
                if errors >= MAX_ERRORS {
                    return send(w, &Reply::new(421, "4.7.0 too many errors; closing")).await;
                }
                continue;
            }
            Line::Text(l) => l,
        };
        let text = match std::str::from_utf8(&line) {
            Ok(t) => t,
            Err(_) => {
                errors += 1;
                let reply = Reply::new(500, "5.5.2 command is not valid UTF-8");
                handler.refused("(binary)", &reply);
                send(w, &reply).await?;
                continue;
            }
        };
        let (verb, arg) = match text.split_once(' ') {
            Some((v, a)) => (v, a.trim()),
            None => (text.trim(), ""),
        };
        let verb = verb.to_ascii_uppercase();
        let reply = match verb.as_str() {
            "EHLO" | "HELO" if arg.is_empty() => {
                Reply::new(501, "5.5.4 a domain or address is required")
            }
            "EHLO" => {
                greeted = true;
                txn = None;
                Reply::new(
                    250,
                    format!(
                        "{name} greets {arg}\n8BITMIME\nSMTPUTF8\nSIZE {}\nENHANCEDSTATUSCODES",
                        limits.max_message_bytes
                    ),
                )
            }
            "HELO" => {
                greeted = true;
                txn = None;
                Reply::new(250, format!("{name} greets {arg}"))
            }
            "MAIL" if !greeted => Reply::new(503, "5.5.1 say EHLO first"),
            "MAIL" if txn.is_some() => Reply::new(
                503,
                "5.5.1 a transaction is already in progress; RSET first",
            ),
            "MAIL" if messages >= MAX_MESSAGES_PER_SESSION => {
                let reply = Reply::new(
                    421,
                    format!(
                        "4.7.0 at most {MAX_MESSAGES_PER_SESSION} messages per session; closing"
                    ),
                );
                handler.refused("MAIL", &reply);
                return send(w, &reply).await;
            }
            "MAIL" => match mail(arg, &*handler, limits) {
                Ok(env) => {
                    txn = Some(Transaction { env });
                    Reply::new(250, "2.1.0 sender ok")
                }
                Err(reply) => reply,
            },
            "RCPT" => match txn.as_mut() {
                None => Reply::new(503, "5.5.1 need MAIL first"),
                Some(t) => match rcpt(arg, &t.env, &*handler, limits) {
                    Ok(addr) => {
                        t.env.rcpts.push(addr);
                        Reply::new(250, "2.1.5 recipient ok")
                    }
                    Err(reply) => reply,
                },
            },
            "DATA" if !arg.is_empty() => Reply::new(501, "5.5.4 DATA takes no arguments"),
            "DATA" => match txn.take() {
                None => Reply::new(503, "5.5.1 need MAIL first"),
                Some(t) if t.env.rcpts.is_empty() => {
                    txn = Some(t);
                    Reply::new(503, "5.5.1 need RCPT first")
                }
                Some(t) => {
                    send(
                        w,
                        &Reply::new(354, "start mail input; end with <CRLF>.<CRLF>"),
                    )
                    .await?;
                    messages += 1;
                    let data = match tokio::time::timeout(MAX_DATA_TIME, read_data(r, limits)).await
                    {
                        Ok(d) => d?,
                        Err(_) => Data::Timeout,
                    };
                    match data {
                        Data::Eof => return Ok(()),
                        Data::Timeout => {
                            let reply =
                                Reply::new(421, "4.4.2 timeout while reading the message; closing");
                            handler.refused("DATA", &reply);
                            return send(w, &reply).await;
                        }
                        Data::TooLarge => Reply::new(
                            552,
                            format!(
                                "5.3.4 message larger than {} bytes",
                                limits.max_message_bytes
                            ),
                        ),
                        Data::LineTooLong => Reply::new(
                            554,
                            format!("5.6.0 message line longer than {MAX_DATA_LINE} bytes"),
                        ),
                        Data::Message(data) => handler.clone().message(t.env, data).await,
                    }
                }
            },
            "RSET" => {
                txn = None;
                Reply::new(250, "2.0.0 reset")
            }
            "NOOP" => Reply::new(250, "2.0.0 ok"),
            "VRFY" => Reply::new(252, "2.5.0 cannot verify; send the message and see"),
            "QUIT" => return send(w, &Reply::new(221, "2.0.0 bye")).await,
            "STARTTLS" => Reply::new(
                502,
                "5.5.1 STARTTLS is not offered: the driver encrypts the way to the relay",
            ),
            "AUTH" => Reply::new(502, "5.5.1 AUTH is not offered: the grant is the authority"),
            _ => Reply::new(500, "5.5.2 command not recognised"),
        };
        if !reply.is_positive() {
            errors += 1;
            handler.refused(&verb, &reply);
        }
        send(w, &reply).await?;
        if errors >= MAX_ERRORS {
            return send(w, &Reply::new(421, "4.7.0 too many errors; closing")).await;
        }
    }
}

fn mail(arg: &str, handler: &dyn Handler, limits: SessionLimits) -> Result<Envelope, Reply> {
    let (addr, params) = parse_path(arg, "FROM:")?;
    let mut env = Envelope {
        from: addr.to_string(),
        ..Envelope::default()
    };
    let mut size = None;
    for p in params {
        let (key, value) = match p.split_once('=') {
            Some((k, v)) => (k.to_ascii_uppercase(), Some(v)),
            None => (p.to_ascii_uppercase(), None),
        };
        match (key.as_str(), value) {
            ("SIZE", Some(v)) => {
                let n: u64 = v
                    .parse()
                    .map_err(|_| Reply::new(501, "5.5.4 SIZE must be a number"))?;
                if n > limits.max_message_bytes {
                    return Err(Reply::new(
                        552,
                        format!(
                            "5.3.4 message larger than {} bytes",
                            limits.max_message_bytes
                        ),
                    ));
                }
                size = Some(n);
            }
            ("BODY", Some(v)) if v.eq_ignore_ascii_case("8BITMIME") => env.body_8bit = true,
            ("BODY", Some(v)) if v.eq_ignore_ascii_case("7BIT") => env.body_8bit = false,
            ("SMTPUTF8", None) => env.smtputf8 = true,
            _ => {
                return Err(Reply::new(
                    555,
                    format!("5.5.4 MAIL parameter {p} is not supported"),
                ));
            }
        }
    }
    if !env.smtputf8 && !addr.is_ascii() {
        return Err(Reply::new(553, "5.6.7 a UTF-8 address needs SMTPUTF8"));
    }
    if !addr.is_empty() && !is_mailbox(addr) {
        return Err(Reply::new(553, format!("5.1.7 {addr:?} is not a mailbox")));
    }
    handler.mail_from(&env, size)?;
    Ok(env)
}

fn rcpt(
    arg: &str,
    env: &Envelope,
    handler: &dyn Handler,
    limits: SessionLimits,
) -> Result<String, Reply> {
    let (addr, params) = parse_path(arg, "TO:")?;
    if let Some(p) = params.first() {
        return Err(Reply::new(
            555,
            format!("5.5.4 RCPT parameter {p} is not supported"),
        ));
    }
    if !env.smtputf8 && !addr.is_ascii() {
        return Err(Reply::new(553, "5.6.7 a UTF-8 address needs SMTPUTF8"));
    }
    if !is_mailbox(addr) {
        return Err(Reply::new(553, format!("5.1.3 {addr:?} is not a mailbox")));
    }
    if env.rcpts.len() as u64 >= u64::from(limits.max_recipients) {
        return Err(Reply::new(
            452,
            format!(
                "4.5.3 too many recipients: at most {} per message",
                limits.max_recipients
            ),
        ));
    }
    handler.rcpt_to(env, addr)?;
    Ok(addr.to_string())
}

enum Data {
    Message(Vec<u8>),
    TooLarge,
    LineTooLong,
    Timeout,
    Eof,
}

/// Reads a message up to the lone dot, un-stuffing dots and normalising line ends to CRLF.
async fn read_data<R: AsyncBufRead + Unpin>(r: &mut R, limits: SessionLimits) -> io::Result<Data> {
    let mut data = Vec::new();
    let mut too_large = false;
    let mut too_long = false;
    loop {
        let line =
            match tokio::time::timeout(limits.line_timeout, read_line(r, MAX_DATA_LINE)).await {
                Err(_) => return Ok(Data::Timeout),
                Ok(line) => line?,
            };
        let line = match line {
            Line::Eof => return Ok(Data::Eof),
            Line::TooLong => {
                too_long = true;
                continue;
            }
            Line::Text(l) => l,
        };
        if line == b"." {
            break;
        }
        let body = line.strip_prefix(b".").unwrap_or(&line);
        if !too_large {
            if (data.len() + body.len() + 2) as u64 > limits.max_message_bytes {
                too_large = true;
                data = Vec::new();
            } else {
                data.extend_from_slice(body);
                data.extend_from_slice(b"\r\n");
            }
        }
    }
    Ok(if too_large {
        Data::TooLarge
    } else if too_long {
        Data::LineTooLong
    } else {
        Data::Message(data)
    })
}

/// Dot-stuffs a CRLF-normalised message for the wire and appends the final dot.
pub fn dot_stuff(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + 64);
    let mut at_line_start = true;
    for &b in data {
        if at_line_start && b == b'.' {
            out.push(b'.');
        }
        out.push(b);
        at_line_start = b == b'\n';
    }
    if !out.is_empty() && !out.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b".\r\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Paths parse with and without a space, parameters are split, junk is refused.
    #[test]
    fn paths() {
        assert_eq!(
            parse_path("FROM:<a@b.test> SIZE=10 BODY=8BITMIME", "FROM:").ok(),
            Some(("a@b.test", vec!["SIZE=10", "BODY=8BITMIME"]))
        );
        assert_eq!(
            parse_path("from: <a@b>", "FROM:").ok(),
            Some(("a@b", vec![]))
        );
        assert_eq!(parse_path("FROM:<>", "FROM:").ok(), Some(("", vec![])));
        assert_eq!(
            parse_path("TO:<@r.test:u@d.test>", "TO:").ok(),
            Some(("u@d.test", vec![]))
        );
        assert!(parse_path("FROM:a@b", "FROM:").is_err());
        assert!(parse_path("FROM:<a@b", "FROM:").is_err());
        assert!(parse_path("TO:<a b@c>", "TO:").is_err());
        assert!(parse_path("", "TO:").is_err());
        assert!(parse_path("é", "FROM:").is_err());
    }

    /// Dot-stuffing doubles leading dots and ends with the lone dot.
    #[test]
    fn stuffing() {
        assert_eq!(dot_stuff(b".a\r\nb\r\n"), b"..a\r\nb\r\n.\r\n".to_vec());
        assert_eq!(dot_stuff(b"x"), b"x\r\n.\r\n".to_vec());
    }

    /// Multi-line replies use the dash form and never carry a bare CR.
    #[test]
    fn replies() {
        assert_eq!(
            Reply::new(250, "a\nb\r").to_wire(),
            b"250-a\r\n250 b\r\n".to_vec()
        );
    }
}
