//! The two mediators: plain HTTP/1.x, where every request's Host is checked, and TLS,
//! where the ClientHello's SNI is checked and the rest passes through untouched.
//!
//! Both run as one task per connection between the grain's end of an in-memory pipe and
//! the upstream socket, with bounded buffers and timeouts. A refusal in plain HTTP is an
//! HTTP error response followed by closing the connection; in TLS, closing it.

use std::io;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::sni::{MAX_CLIENT_HELLO, Sni, client_hello_sni};

/// The limits of one connection.
#[derive(Clone, Copy, Debug)]
pub struct HttpLimits {
    /// Longest request head (request line and header fields).
    pub max_header_bytes: usize,
    /// Longest request body.
    pub max_body_bytes: u64,
    /// Longest wait from a complete request to the start of the response.
    pub response_timeout: Duration,
    /// Most bytes through the connection, both directions together.
    pub max_total_bytes: u64,
    /// Longest wait for the grain's next request (or any byte in TLS mode).
    pub idle_timeout: Duration,
}

/// Longest response head from the server.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;
/// Most header fields in a head.
const MAX_FIELDS: usize = 128;
/// Longest chunk-size line or trailer line.
const MAX_CHUNK_LINE: usize = 4096;

/// Decides whether a name from a Host header or SNI may be reached on this connection.
pub trait HostCheck {
    /// `Ok` if allowed, else the reason (for the refusal and the audit event).
    fn check(&self, authority: &str) -> Result<(), String>;
    /// Reports a refusal.
    fn refused(&self, what: &str);
    /// Reports a request (or a TLS connection) that was allowed through.
    fn allowed(&self, what: &str);
}

/// Why a connection ended early.
#[derive(Debug, thiserror::Error)]
pub enum MediateError {
    /// Reading or writing failed.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The connection used up its byte allowance.
    #[error("the connection exceeded its limit of {0} bytes")]
    TotalBytes(u64),
    /// Nothing arrived in time.
    #[error("timed out")]
    Timeout,
}

/// Bytes read from one side and not yet used.
struct Input<R> {
    r: R,
    buf: Vec<u8>,
    eof: bool,
    /// Longest wait for one read: a peer that stops sending mid-message times out.
    idle: Duration,
}

impl<R: AsyncRead + Unpin> Input<R> {
    fn new(r: R, idle: Duration) -> Self {
        Self {
            r,
            buf: Vec::new(),
            eof: false,
            idle,
        }
    }

    /// Reads more bytes; returns how many (0 at end of stream).
    async fn fill(&mut self, counter: &mut Counter) -> Result<usize, MediateError> {
        let mut chunk = [0u8; 16 * 1024];
        let n = tokio::time::timeout(self.idle, self.r.read(&mut chunk))
            .await
            .map_err(|_| MediateError::Timeout)??;
        if n == 0 {
            self.eof = true;
        }
        counter.add(n)?;
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(n)
    }

    fn take(&mut self, n: usize) -> Vec<u8> {
        let n = n.min(self.buf.len());
        self.buf.drain(..n).collect()
    }

    /// Reads until the buffer holds a line (up to `max` bytes); returns its length with
    /// the LF, or `None` if the line is too long or the stream ended first.
    async fn line(
        &mut self,
        max: usize,
        counter: &mut Counter,
    ) -> Result<Option<usize>, MediateError> {
        loop {
            if let Some(i) = self.buf.iter().take(max).position(|b| *b == b'\n') {
                return Ok(Some(i + 1));
            }
            if self.buf.len() >= max || self.eof {
                return Ok(None);
            }
            self.fill(counter).await?;
        }
    }
}

/// Counts the bytes of a connection against its allowance.
pub struct Counter {
    total: u64,
    max: u64,
}

impl Counter {
    fn add(&mut self, n: usize) -> Result<(), MediateError> {
        self.total = self.total.saturating_add(n as u64);
        if self.max > 0 && self.total > self.max {
            return Err(MediateError::TotalBytes(self.max));
        }
        Ok(())
    }
}

async fn timed<T>(
    d: Duration,
    f: impl std::future::Future<Output = Result<T, MediateError>>,
) -> Result<T, MediateError> {
    tokio::time::timeout(d, f)
        .await
        .map_err(|_| MediateError::Timeout)?
}

/// An HTTP error response that closes the connection.
fn error_response(status: u16, reason: &str, detail: &str) -> Vec<u8> {
    let body = format!("capnet http driver: {detail}\n");
    format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// How a message body is delimited.
enum Framing {
    None,
    Length(u64),
    Chunked,
    UntilClose,
}

/// What a request head says.
struct RequestHead {
    method: String,
    authority: String,
    framing: Framing,
    expect_continue: bool,
    upgrade: bool,
    /// The grain asked to close after this request (`Connection: close`, or HTTP/1.0
    /// without keep-alive).
    close: bool,
    /// The head to forward (with `Expect: 100-continue` removed).
    bytes: Vec<u8>,
}

/// A refusal of a request: status, reason phrase, detail.
struct Refusal(u16, &'static str, String);

fn header_eq(name: &str, want: &str) -> bool {
    name.eq_ignore_ascii_case(want)
}

fn parse_request(head: &[u8]) -> Result<RequestHead, Refusal> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_FIELDS];
    let mut req = httparse::Request::new(&mut fields);
    match req.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => {
            return Err(Refusal(
                400,
                "Bad Request",
                "incomplete request head".into(),
            ));
        }
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Refusal(
                431,
                "Request Header Fields Too Large",
                format!("more than {MAX_FIELDS} header fields"),
            ));
        }
        Err(e) => {
            return Err(Refusal(
                400,
                "Bad Request",
                format!("malformed request: {e}"),
            ));
        }
    }
    let method = req.method.unwrap_or("").to_string();
    let target = req.path.unwrap_or("");
    if method.eq_ignore_ascii_case("CONNECT") {
        return Err(Refusal(
            405,
            "Method Not Allowed",
            "CONNECT is not allowed".into(),
        ));
    }
    let mut hosts = Vec::new();
    let mut lengths = Vec::new();
    let mut chunked = false;
    let mut other_coding = false;
    let mut expect_continue = false;
    let mut upgrade = false;
    let mut close = req.version == Some(0);
    let mut keep = Vec::with_capacity(head.len());
    let first_line_end = head.iter().position(|b| *b == b'\n').map_or(0, |i| i + 1);
    keep.extend_from_slice(&head[..first_line_end]);
    for f in req.headers.iter() {
        let value = String::from_utf8_lossy(f.value).trim().to_string();
        if header_eq(f.name, "host") {
            hosts.push(value.clone());
        } else if header_eq(f.name, "content-length") {
            lengths.push(value.clone());
        } else if header_eq(f.name, "transfer-encoding") {
            for coding in value.split(',').map(str::trim) {
                if coding.eq_ignore_ascii_case("chunked") {
                    chunked = true;
                } else if !coding.is_empty() {
                    other_coding = true;
                }
            }
        } else if header_eq(f.name, "expect") {
            if value.eq_ignore_ascii_case("100-continue") {
                expect_continue = true;
                continue;
            }
            return Err(Refusal(
                417,
                "Expectation Failed",
                format!("Expect: {value}"),
            ));
        } else if header_eq(f.name, "upgrade") {
            upgrade = true;
        } else if header_eq(f.name, "connection") {
            for option in value.split(',').map(str::trim) {
                if option.eq_ignore_ascii_case("close") {
                    close = true;
                } else if option.eq_ignore_ascii_case("keep-alive") {
                    close = false;
                }
            }
        }
        keep.extend_from_slice(f.name.as_bytes());
        keep.extend_from_slice(b": ");
        keep.extend_from_slice(f.value);
        keep.extend_from_slice(b"\r\n");
    }
    keep.extend_from_slice(b"\r\n");
    let authority = match hosts.as_slice() {
        [one] => one.clone(),
        [] => {
            return Err(Refusal(
                400,
                "Bad Request",
                "the request has no Host header".into(),
            ));
        }
        _ => {
            return Err(Refusal(
                400,
                "Bad Request",
                "the request has several Host headers".into(),
            ));
        }
    };
    // An absolute-form target names the host too; it must be the same one.
    if let Some(rest) = target
        .strip_prefix("http://")
        .or_else(|| target.strip_prefix("https://"))
    {
        let target_authority = rest.split(['/', '?', '#']).next().unwrap_or("");
        if !target_authority.eq_ignore_ascii_case(&authority) {
            return Err(Refusal(
                400,
                "Bad Request",
                format!("the request target names {target_authority:?} but Host is {authority:?}"),
            ));
        }
    }
    if other_coding || (chunked && !lengths.is_empty()) {
        return Err(Refusal(
            400,
            "Bad Request",
            "ambiguous or unsupported Transfer-Encoding".into(),
        ));
    }
    let framing = if chunked {
        Framing::Chunked
    } else {
        match lengths.as_slice() {
            [] => Framing::None,
            [one] => match one.parse::<u64>() {
                Ok(n) => Framing::Length(n),
                Err(_) => return Err(Refusal(400, "Bad Request", "bad Content-Length".into())),
            },
            _ => {
                return Err(Refusal(
                    400,
                    "Bad Request",
                    "several Content-Length headers".into(),
                ));
            }
        }
    };
    Ok(RequestHead {
        method,
        authority,
        framing,
        expect_continue,
        upgrade,
        close,
        bytes: keep,
    })
}

/// Reads a head (up to the empty line) of at most `max` bytes; `Ok(None)` at a clean end
/// of stream before any byte, `Err(len)` if it is longer than `max`.
async fn read_head<R: AsyncRead + Unpin>(
    input: &mut Input<R>,
    max: usize,
    counter: &mut Counter,
) -> Result<Result<Option<Vec<u8>>, usize>, MediateError> {
    loop {
        if let Some(end) = find_head_end(&input.buf) {
            if end > max {
                return Ok(Err(end));
            }
            return Ok(Ok(Some(input.take(end))));
        }
        if input.buf.len() > max {
            return Ok(Err(input.buf.len()));
        }
        if input.eof {
            return if input.buf.is_empty() {
                Ok(Ok(None))
            } else {
                Err(MediateError::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the stream ended inside a head",
                )))
            };
        }
        input.fill(counter).await?;
    }
}

fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

/// Copies `n` bytes of body from `input` to `out`.
async fn copy_exact<R, W>(
    input: &mut Input<R>,
    out: &mut W,
    mut n: u64,
    counter: &mut Counter,
) -> Result<(), MediateError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    while n > 0 {
        if input.buf.is_empty() && input.fill(counter).await? == 0 {
            return Err(MediateError::Io(io::ErrorKind::UnexpectedEof.into()));
        }
        let k = usize::try_from(n)
            .unwrap_or(usize::MAX)
            .min(input.buf.len());
        let chunk = input.take(k);
        out.write_all(&chunk).await?;
        n -= k as u64;
    }
    Ok(())
}

/// Copies a chunked body (chunks and trailers) as it is; `max` bounds the chunk data.
/// Returns `Ok(false)` if the body is larger than `max`.
async fn copy_chunked<R, W>(
    input: &mut Input<R>,
    out: &mut W,
    max: u64,
    counter: &mut Counter,
) -> Result<bool, MediateError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let bad =
        |what: &str| MediateError::Io(io::Error::new(io::ErrorKind::InvalidData, what.to_string()));
    let mut total = 0u64;
    loop {
        let len = input
            .line(MAX_CHUNK_LINE, counter)
            .await?
            .ok_or_else(|| bad("bad chunk size line"))?;
        let line = input.take(len);
        let text = String::from_utf8_lossy(&line);
        let size_text = text.trim().split(';').next().unwrap_or("").trim();
        let size = u64::from_str_radix(size_text, 16).map_err(|_| bad("bad chunk size"))?;
        total = total.saturating_add(size);
        if total > max {
            return Ok(false);
        }
        out.write_all(&line).await?;
        if size == 0 {
            // Trailers, then the empty line.
            loop {
                let len = input
                    .line(MAX_CHUNK_LINE, counter)
                    .await?
                    .ok_or_else(|| bad("bad trailer"))?;
                let line = input.take(len);
                out.write_all(&line).await?;
                if line == b"\r\n" || line == b"\n" {
                    return Ok(true);
                }
            }
        }
        copy_exact(input, out, size, counter).await?;
        let len = input
            .line(MAX_CHUNK_LINE, counter)
            .await?
            .ok_or_else(|| bad("missing CRLF after a chunk"))?;
        let crlf = input.take(len);
        if crlf.iter().any(|b| !b.is_ascii_whitespace()) {
            return Err(bad("data after a chunk"));
        }
        out.write_all(&crlf).await?;
    }
}

/// What a response head says.
struct ResponseHead {
    status: u16,
    framing: Framing,
    /// The server will close after this response.
    close: bool,
}

fn parse_response(head: &[u8], method: &str) -> Result<ResponseHead, String> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_FIELDS];
    let mut resp = httparse::Response::new(&mut fields);
    match resp.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Err("incomplete response head".into()),
        Err(e) => return Err(format!("malformed response: {e}")),
    }
    let status = resp.code.unwrap_or(0);
    let mut chunked = false;
    let mut length = None;
    let mut close = resp.version == Some(0);
    for f in resp.headers.iter() {
        let value = String::from_utf8_lossy(f.value);
        if header_eq(f.name, "connection") {
            for option in value.split(',').map(str::trim) {
                if option.eq_ignore_ascii_case("close") {
                    close = true;
                } else if option.eq_ignore_ascii_case("keep-alive") {
                    close = false;
                }
            }
        } else if header_eq(f.name, "transfer-encoding") {
            chunked = value
                .split(',')
                .any(|c| c.trim().eq_ignore_ascii_case("chunked"));
        } else if header_eq(f.name, "content-length") {
            length = Some(
                value
                    .trim()
                    .parse::<u64>()
                    .map_err(|_| "bad Content-Length in the response".to_string())?,
            );
        }
    }
    let framing = if method.eq_ignore_ascii_case("HEAD")
        || (100..200).contains(&status)
        || status == 204
        || status == 304
    {
        Framing::None
    } else if chunked {
        Framing::Chunked
    } else if let Some(n) = length {
        Framing::Length(n)
    } else {
        Framing::UntilClose
    };
    Ok(ResponseHead {
        status,
        framing,
        close,
    })
}

/// Mediates plain HTTP/1.x between the grain and the server: every request's Host is
/// checked, then the request and its response are relayed; repeat while the connection
/// lives.
pub async fn http<G, U>(
    grain: G,
    upstream: U,
    limits: HttpLimits,
    check: &dyn HostCheck,
) -> Result<(), MediateError>
where
    G: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let (gr, mut gw) = tokio::io::split(grain);
    let (ur, mut uw) = tokio::io::split(upstream);
    let mut gin = Input::new(gr, limits.idle_timeout);
    let mut uin = Input::new(ur, limits.idle_timeout);
    let mut counter = Counter {
        total: 0,
        max: limits.max_total_bytes,
    };
    loop {
        let head = timed(
            limits.idle_timeout,
            read_head(&mut gin, limits.max_header_bytes, &mut counter),
        )
        .await;
        let head = match head {
            Err(MediateError::Timeout) => return Ok(()),
            Err(e) => return Err(e),
            Ok(Ok(None)) => return Ok(()),
            Ok(Err(len)) => {
                let detail = format!(
                    "request head of {len} bytes or more; at most {} allowed",
                    limits.max_header_bytes
                );
                check.refused(&detail);
                gw.write_all(&error_response(
                    431,
                    "Request Header Fields Too Large",
                    &detail,
                ))
                .await?;
                return Ok(());
            }
            Ok(Ok(Some(h))) => h,
        };
        let req = match parse_request(&head) {
            Ok(r) => r,
            Err(Refusal(status, reason, detail)) => {
                check.refused(&detail);
                gw.write_all(&error_response(status, reason, &detail))
                    .await?;
                return Ok(());
            }
        };
        if let Err(why) = check.check(&req.authority) {
            check.refused(&format!("Host {:?}: {why}", req.authority));
            gw.write_all(&error_response(
                403,
                "Forbidden",
                &format!("Host {:?} is not allowed: {why}", req.authority),
            ))
            .await?;
            return Ok(());
        }
        if let Framing::Length(n) = req.framing
            && n > limits.max_body_bytes
        {
            let detail = format!(
                "request body of {n} bytes; at most {} allowed",
                limits.max_body_bytes
            );
            check.refused(&detail);
            gw.write_all(&error_response(413, "Content Too Large", &detail))
                .await?;
            return Ok(());
        }
        check.allowed(&format!("{} Host {}", req.method, req.authority));
        if req.expect_continue {
            gw.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await?;
        }
        uw.write_all(&req.bytes).await?;
        match req.framing {
            Framing::Length(n) => copy_exact(&mut gin, &mut uw, n, &mut counter).await?,
            Framing::Chunked => {
                if !copy_chunked(&mut gin, &mut uw, limits.max_body_bytes, &mut counter).await? {
                    let detail =
                        format!("chunked request body above {} bytes", limits.max_body_bytes);
                    check.refused(&detail);
                    gw.write_all(&error_response(413, "Content Too Large", &detail))
                        .await?;
                    return Ok(());
                }
            }
            Framing::None | Framing::UntilClose => {}
        }
        uw.flush().await?;
        // The response: informational heads first, then the final one and its body.
        let final_head = loop {
            let head = timed(
                limits.response_timeout,
                read_head(&mut uin, MAX_RESPONSE_HEAD, &mut counter),
            )
            .await;
            let head = match head {
                Err(MediateError::Timeout) => {
                    let detail =
                        format!("no response within {}s", limits.response_timeout.as_secs());
                    check.refused(&detail);
                    gw.write_all(&error_response(504, "Gateway Timeout", &detail))
                        .await?;
                    return Ok(());
                }
                Err(e) => return Err(e),
                Ok(Ok(Some(h))) => h,
                Ok(Ok(None)) | Ok(Err(_)) => {
                    gw.write_all(&error_response(
                        502,
                        "Bad Gateway",
                        "the server sent no valid response",
                    ))
                    .await?;
                    return Ok(());
                }
            };
            let parsed = match parse_response(&head, &req.method) {
                Ok(p) => p,
                Err(detail) => {
                    gw.write_all(&error_response(502, "Bad Gateway", &detail))
                        .await?;
                    return Ok(());
                }
            };
            gw.write_all(&head).await?;
            if parsed.status == 101 && req.upgrade {
                // The protocol changes (WebSocket, for example): from here on the bytes
                // pass through as they are, still counted.
                gw.write_all(&take_buffered(&mut uin)).await?;
                uw.write_all(&take_buffered(&mut gin)).await?;
                return splice(gin.r, gw, uin.r, uw, counter, limits.idle_timeout).await;
            }
            if (100..200).contains(&parsed.status) {
                continue;
            }
            break parsed;
        };
        match final_head.framing {
            Framing::None => {}
            Framing::Length(n) => copy_exact(&mut uin, &mut gw, n, &mut counter).await?,
            Framing::Chunked => {
                copy_chunked(&mut uin, &mut gw, u64::MAX, &mut counter).await?;
            }
            Framing::UntilClose => {
                let buffered = uin.buf.len();
                gw.write_all(&uin.take(buffered)).await?;
                loop {
                    if uin.fill(&mut counter).await? == 0 {
                        break;
                    }
                    let buffered = uin.buf.len();
                    gw.write_all(&uin.take(buffered)).await?;
                }
                gw.shutdown().await?;
                return Ok(());
            }
        }
        if req.close || final_head.close {
            gw.shutdown().await?;
            return Ok(());
        }
        gw.flush().await?;
    }
}

fn take_buffered<R>(input: &mut Input<R>) -> Vec<u8> {
    std::mem::take(&mut input.buf)
}

/// Passes bytes both ways until either side ends, counting them.
async fn splice<GR, GW, UR, UW>(
    mut gr: GR,
    mut gw: GW,
    mut ur: UR,
    mut uw: UW,
    mut counter: Counter,
    idle: Duration,
) -> Result<(), MediateError>
where
    GR: AsyncRead + Unpin,
    GW: AsyncWrite + Unpin,
    UR: AsyncRead + Unpin,
    UW: AsyncWrite + Unpin,
{
    let mut a = [0u8; 16 * 1024];
    let mut b = [0u8; 16 * 1024];
    let mut grain_open = true;
    let mut server_open = true;
    while grain_open || server_open {
        tokio::select! {
            r = gr.read(&mut a), if grain_open => {
                let n = r?;
                if n == 0 {
                    grain_open = false;
                    uw.shutdown().await?;
                } else {
                    counter.add(n)?;
                    uw.write_all(&a[..n]).await?;
                }
            }
            r = ur.read(&mut b), if server_open => {
                let n = r?;
                if n == 0 {
                    server_open = false;
                    gw.shutdown().await?;
                } else {
                    counter.add(n)?;
                    gw.write_all(&b[..n]).await?;
                }
            }
            () = tokio::time::sleep(idle) => return Err(MediateError::Timeout),
        }
    }
    Ok(())
}

/// Mediates TLS: reads the grain's ClientHello, checks its SNI, then passes everything
/// through unchanged (the driver never decrypts).
pub async fn tls<G, U>(
    grain: G,
    upstream: U,
    limits: HttpLimits,
    check: &dyn HostCheck,
) -> Result<(), MediateError>
where
    G: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let (gr, gw) = tokio::io::split(grain);
    let (ur, mut uw) = tokio::io::split(upstream);
    let mut gin = Input::new(gr, limits.idle_timeout);
    let mut counter = Counter {
        total: 0,
        max: limits.max_total_bytes,
    };
    let sni = timed(limits.idle_timeout, async {
        loop {
            match client_hello_sni(&gin.buf) {
                Sni::Incomplete if gin.eof => return Ok(None),
                Sni::Incomplete if gin.buf.len() > MAX_CLIENT_HELLO + 1024 => {
                    return Ok(Some(Err("the ClientHello is too large".to_string())));
                }
                Sni::Incomplete => {
                    gin.fill(&mut counter).await?;
                }
                Sni::Name(n) => return Ok(Some(Ok(n))),
                Sni::Missing => {
                    return Ok(Some(Err(
                        "the ClientHello has no server name (SNI)".to_string()
                    )));
                }
                Sni::Invalid(why) => return Ok(Some(Err(why.to_string()))),
            }
        }
    })
    .await;
    let name = match sni {
        Err(MediateError::Timeout) => {
            check.refused("no TLS ClientHello in time");
            return Ok(());
        }
        Err(e) => return Err(e),
        Ok(None) => return Ok(()),
        Ok(Some(Err(why))) => {
            check.refused(&why);
            return Ok(());
        }
        Ok(Some(Ok(n))) => n,
    };
    if let Err(why) = check.check(&name) {
        check.refused(&format!("SNI {name:?}: {why}"));
        return Ok(());
    }
    check.allowed(&format!("TLS SNI {name}"));
    uw.write_all(&gin.buf).await?;
    splice(gin.r, gw, ur, uw, counter, limits.idle_timeout).await
}
