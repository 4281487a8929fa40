//! The SOCKS5 proxy (RFC 1928): no authentication, CONNECT with domain names, IPv4 and
//! IPv6 addresses, and UDP ASSOCIATE (see [`crate::udp`]).
//!
//! The parsers are pure functions over byte slices that say how many bytes they still
//! need, so the server reads exactly the handshake and never a byte of the payload that
//! may follow it. Every message has a size bound fixed by the protocol (a greeting is at
//! most 257 bytes, a request at most 262), and the whole handshake has a deadline
//! ([`HANDSHAKE_TIMEOUT`]); a client that sends garbage or nothing is answered (when the
//! protocol has an answer) and dropped.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::rc::Rc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::Bridge;
use crate::refusal::{Refusal, reply};
use crate::splice::{self, Ended};
use crate::target::{Host, Target};

/// The SOCKS protocol version this server speaks.
pub const VERSION: u8 = 5;
/// "No authentication required".
pub const METHOD_NO_AUTH: u8 = 0x00;
/// "No acceptable methods".
pub const METHOD_NONE_ACCEPTABLE: u8 = 0xff;
/// CONNECT.
pub const CMD_CONNECT: u8 = 1;
/// BIND (not supported: capnet listens through `IpInterface`, not through the bridge).
pub const CMD_BIND: u8 = 2;
/// UDP ASSOCIATE.
pub const CMD_UDP_ASSOCIATE: u8 = 3;
/// Address types.
pub const ATYP_IPV4: u8 = 1;
/// A domain name, length-prefixed.
pub const ATYP_DOMAIN: u8 = 3;
/// IPv6.
pub const ATYP_IPV6: u8 = 4;

/// How long a client may take for the greeting and the request together.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest handshake message (a request with a 255-byte name).
const MAX_MESSAGE: usize = 4 + 1 + 255 + 2;

/// A parse that may need more bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed<T> {
    /// At least this many bytes (in total) are needed.
    Incomplete(usize),
    /// The value and the number of bytes it took.
    Done(T, usize),
}

/// A malformed or unacceptable SOCKS message.
#[derive(Debug, thiserror::Error)]
pub enum SocksError {
    /// Not SOCKS5.
    #[error("the client speaks SOCKS version {0}, not 5")]
    Version(u8),
    /// A greeting offering no methods at all.
    #[error("the client offered no authentication methods")]
    NoMethods,
    /// An address type other than 1, 3 or 4.
    #[error("address type {0} is not supported")]
    AddressType(u8),
    /// A zero-length or non-ASCII name, or one that is not a DNS name.
    #[error("the requested host is not a valid name: {0}")]
    BadName(String),
    /// A UDP datagram that is a fragment (FRAG != 0), which the bridge does not reassemble.
    #[error("fragmented SOCKS UDP datagrams are not supported")]
    Fragmented,
    /// A UDP datagram shorter than its header.
    #[error("the datagram is shorter than its SOCKS header")]
    Truncated,
    /// The client closed the connection mid-handshake.
    #[error("the client closed the connection during the handshake")]
    Closed,
    /// The client did not finish the handshake in time.
    #[error("the client did not finish the handshake within {}s", HANDSHAKE_TIMEOUT.as_secs())]
    TimedOut,
    /// Reading or writing the client failed.
    #[error("talking to the client failed: {0}")]
    Io(#[from] std::io::Error),
}

/// A method-selection message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Greeting {
    /// Whether "no authentication" is among the methods offered.
    pub no_auth: bool,
}

/// Parses the client's greeting: VER NMETHODS METHODS...
pub fn parse_greeting(buf: &[u8]) -> Result<Parsed<Greeting>, SocksError> {
    let [ver, n, ..] = *buf else {
        return Ok(Parsed::Incomplete(2));
    };
    if ver != VERSION {
        return Err(SocksError::Version(ver));
    }
    if n == 0 {
        return Err(SocksError::NoMethods);
    }
    let len = 2 + usize::from(n);
    let Some(methods) = buf.get(2..len) else {
        return Ok(Parsed::Incomplete(len));
    };
    Ok(Parsed::Done(
        Greeting {
            no_auth: methods.contains(&METHOD_NO_AUTH),
        },
        len,
    ))
}

/// An address as SOCKS carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SocksAddr {
    /// ATYP 1 or 4.
    Ip(IpAddr),
    /// ATYP 3: the raw name bytes (1-255 of them).
    Name(Vec<u8>),
}

impl SocksAddr {
    /// The target as the bridge routes it. A name that is an IP literal counts as the
    /// address (so address grants match it).
    pub fn host(&self) -> Result<Host, SocksError> {
        match self {
            SocksAddr::Ip(ip) => Ok(Host::Ip(ip.to_canonical())),
            SocksAddr::Name(raw) => {
                let text = std::str::from_utf8(raw)
                    .map_err(|_| SocksError::BadName(String::from_utf8_lossy(raw).into()))?;
                Host::parse(text).map_err(|e| SocksError::BadName(e.to_string()))
            }
        }
    }
}

/// Parses ATYP ADDR PORT at the start of `buf`.
fn parse_addr(buf: &[u8]) -> Result<Parsed<(SocksAddr, u16)>, SocksError> {
    let Some(&atyp) = buf.first() else {
        return Ok(Parsed::Incomplete(1));
    };
    let (addr_len, start) = match atyp {
        ATYP_IPV4 => (4, 1),
        ATYP_IPV6 => (16, 1),
        ATYP_DOMAIN => {
            let Some(&n) = buf.get(1) else {
                return Ok(Parsed::Incomplete(2));
            };
            if n == 0 {
                return Err(SocksError::BadName(String::new()));
            }
            (usize::from(n), 2)
        }
        other => return Err(SocksError::AddressType(other)),
    };
    let end = start + addr_len + 2;
    let Some(bytes) = buf.get(start..end) else {
        return Ok(Parsed::Incomplete(end));
    };
    let (a, p) = bytes.split_at(addr_len);
    let port = u16::from_be_bytes([p[0], p[1]]);
    let addr = match atyp {
        ATYP_IPV4 => SocksAddr::Ip(IpAddr::V4(Ipv4Addr::new(a[0], a[1], a[2], a[3]))),
        ATYP_IPV6 => {
            let mut o = [0u8; 16];
            o.copy_from_slice(a);
            SocksAddr::Ip(IpAddr::V6(Ipv6Addr::from(o)))
        }
        _ => SocksAddr::Name(a.to_vec()),
    };
    Ok(Parsed::Done((addr, port), end))
}

/// A request: VER CMD RSV ATYP DST.ADDR DST.PORT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The command byte (CONNECT, BIND, UDP ASSOCIATE or anything else).
    pub cmd: u8,
    /// The destination.
    pub addr: SocksAddr,
    /// The destination port.
    pub port: u16,
}

/// Parses a request. The reserved byte is ignored, as most servers do.
pub fn parse_request(buf: &[u8]) -> Result<Parsed<Request>, SocksError> {
    let [ver, cmd, _rsv, ..] = *buf else {
        return Ok(Parsed::Incomplete(4));
    };
    if ver != VERSION {
        return Err(SocksError::Version(ver));
    }
    Ok(match parse_addr(&buf[3..])? {
        Parsed::Incomplete(n) => Parsed::Incomplete(3 + n),
        Parsed::Done((addr, port), n) => Parsed::Done(Request { cmd, addr, port }, 3 + n),
    })
}

/// A UDP datagram's header: RSV(2) FRAG ATYP DST.ADDR DST.PORT, then the payload.
pub fn parse_udp(buf: &[u8]) -> Result<(SocksAddr, u16, &[u8]), SocksError> {
    let [_, _, frag, ..] = *buf else {
        return Err(SocksError::Truncated);
    };
    if frag != 0 {
        return Err(SocksError::Fragmented);
    }
    match parse_addr(&buf[3..])? {
        Parsed::Incomplete(_) => Err(SocksError::Truncated),
        Parsed::Done((addr, port), n) => Ok((addr, port, &buf[3 + n..])),
    }
}

fn push_addr(out: &mut Vec<u8>, addr: &SocksAddr, port: u16) {
    match addr {
        SocksAddr::Ip(IpAddr::V4(v4)) => {
            out.push(ATYP_IPV4);
            out.extend_from_slice(&v4.octets());
        }
        SocksAddr::Ip(IpAddr::V6(v6)) => {
            out.push(ATYP_IPV6);
            out.extend_from_slice(&v6.octets());
        }
        SocksAddr::Name(n) => {
            out.push(ATYP_DOMAIN);
            // Names come from parse_addr, so they are 1-255 bytes long.
            let n = &n[..n.len().min(255)];
            out.push(n.len() as u8);
            out.extend_from_slice(n);
        }
    }
    out.extend_from_slice(&port.to_be_bytes());
}

/// The UDP header for a datagram from `addr:port`.
pub fn udp_header(addr: &SocksAddr, port: u16) -> Vec<u8> {
    let mut out = vec![0, 0, 0];
    push_addr(&mut out, addr, port);
    out
}

/// A reply: VER REP RSV ATYP BND.ADDR BND.PORT.
pub fn encode_reply(code: u8, bound: SocketAddr) -> Vec<u8> {
    let mut out = vec![VERSION, code, 0];
    push_addr(&mut out, &SocksAddr::Ip(bound.ip()), bound.port());
    out
}

const UNSPECIFIED: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0);

/// Reads one message with `parse`, never more bytes than it needs.
async fn read_message<T>(
    stream: &mut TcpStream,
    parse: impl Fn(&[u8]) -> Result<Parsed<T>, SocksError>,
) -> Result<T, SocksError> {
    let mut buf = [0u8; MAX_MESSAGE];
    let mut len = 0;
    loop {
        match parse(&buf[..len])? {
            Parsed::Done(v, _) => return Ok(v),
            Parsed::Incomplete(need) => {
                // Every parser's need is bounded by MAX_MESSAGE (protocol maxima).
                let need = need.min(MAX_MESSAGE);
                let n = stream.read(&mut buf[len..need]).await?;
                if n == 0 {
                    return Err(SocksError::Closed);
                }
                len += n;
            }
        }
    }
}

/// The handshake up to the request.
async fn handshake(stream: &mut TcpStream) -> Result<Option<Request>, SocksError> {
    let greeting = read_message(stream, parse_greeting).await?;
    if !greeting.no_auth {
        stream.write_all(&[VERSION, METHOD_NONE_ACCEPTABLE]).await?;
        return Ok(None);
    }
    stream.write_all(&[VERSION, METHOD_NO_AUTH]).await?;
    match read_message(stream, parse_request).await {
        Ok(r) => Ok(Some(r)),
        Err(SocksError::AddressType(t)) => {
            stream
                .write_all(&encode_reply(
                    reply::ADDRESS_TYPE_NOT_SUPPORTED,
                    UNSPECIFIED,
                ))
                .await?;
            Err(SocksError::AddressType(t))
        }
        Err(e) => Err(e),
    }
}

/// Accepts SOCKS5 clients on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, bridge: Rc<Bridge>) {
    loop {
        let permit = bridge.client_permit().await;
        match listener.accept().await {
            Ok((stream, peer)) => {
                let b = bridge.clone();
                tokio::task::spawn_local(async move {
                    let _permit = permit;
                    let _ = stream.set_nodelay(true);
                    if let Err(e) = handle(stream, peer, &b).await {
                        tracing::debug!(target: "capnet_bridge", %peer, "socks5 client: {e}");
                    }
                });
            }
            Err(e) => crate::accept_failed("SOCKS5", e).await,
        }
    }
}

/// Serves one client.
pub async fn handle(
    mut stream: TcpStream,
    peer: SocketAddr,
    bridge: &Rc<Bridge>,
) -> Result<(), SocksError> {
    let req = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(&mut stream)).await {
        Ok(r) => r?,
        Err(_) => return Err(SocksError::TimedOut),
    };
    let Some(req) = req else {
        return Ok(());
    };
    let host = match req.addr.host() {
        Ok(h) => h,
        Err(e) => {
            stream
                .write_all(&encode_reply(reply::HOST_UNREACHABLE, UNSPECIFIED))
                .await?;
            return Err(e);
        }
    };
    match req.cmd {
        CMD_CONNECT => {
            let target = Target {
                host,
                port: req.port,
            };
            connect(stream, peer, target, bridge).await
        }
        CMD_UDP_ASSOCIATE => crate::udp::associate(stream, peer, host, req.port, bridge).await,
        _ => {
            stream
                .write_all(&encode_reply(reply::COMMAND_NOT_SUPPORTED, UNSPECIFIED))
                .await?;
            Ok(())
        }
    }
}

async fn connect(
    mut stream: TcpStream,
    peer: SocketAddr,
    target: Target,
    bridge: &Rc<Bridge>,
) -> Result<(), SocksError> {
    let opened = if target.port == 0 {
        Err(Refusal::Failed(format!(
            "port 0 of {} cannot be connected to",
            target.host
        )))
    } else {
        splice::open(&bridge.router, &target).await
    };
    let opened = match opened {
        Ok(o) => o,
        Err(refusal) => {
            crate::log_refusal("socks5", peer, &target.to_string(), &refusal);
            stream
                .write_all(&encode_reply(refusal.socks_reply(), UNSPECIFIED))
                .await?;
            return Ok(());
        }
    };
    if let Err(e) = stream
        .write_all(&encode_reply(reply::SUCCEEDED, UNSPECIFIED))
        .await
    {
        opened.abort("the client went away before the connection was established");
        return Err(e.into());
    }
    tracing::debug!(target: "capnet_bridge", %peer, %target, grant = %opened.grant, "socks5 connected");
    let (r, w) = stream.into_split();
    let ended = opened.run(r, w).await;
    tracing::debug!(target: "capnet_bridge", %peer, %target, ?ended, "socks5 client side ended");
    if let Ended::ClientFailed(_) = ended {
        bridge.note_abort();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Greetings: complete, incomplete at every length, wrong version, no methods, and no
    /// acceptable method.
    #[test]
    fn greeting_parser() {
        assert_eq!(
            parse_greeting(&[5, 2, 2, 0]).unwrap(),
            Parsed::Done(Greeting { no_auth: true }, 4)
        );
        assert_eq!(
            parse_greeting(&[5, 1, 2]).unwrap(),
            Parsed::Done(Greeting { no_auth: false }, 3)
        );
        assert_eq!(parse_greeting(&[]).unwrap(), Parsed::Incomplete(2));
        assert_eq!(parse_greeting(&[5, 3, 0]).unwrap(), Parsed::Incomplete(5));
        assert!(matches!(
            parse_greeting(&[4, 1, 0]),
            Err(SocksError::Version(4))
        ));
        assert!(matches!(
            parse_greeting(&[5, 0]),
            Err(SocksError::NoMethods)
        ));
    }

    /// Requests of every address type, the bytes each takes, and hostile forms: unknown
    /// address types, empty and non-DNS names, IP literals sent as names.
    #[test]
    fn request_parser() {
        let r = parse_request(&[5, 1, 0, 1, 10, 0, 0, 1, 0, 80]).unwrap();
        assert_eq!(
            r,
            Parsed::Done(
                Request {
                    cmd: 1,
                    addr: SocksAddr::Ip("10.0.0.1".parse().unwrap()),
                    port: 80
                },
                10
            )
        );
        let mut v6 = vec![5, 1, 0, 4];
        v6.extend_from_slice(&"::1".parse::<Ipv6Addr>().unwrap().octets());
        v6.extend_from_slice(&[1, 187]);
        let Parsed::Done(r, 22) = parse_request(&v6).unwrap() else {
            panic!("v6")
        };
        assert_eq!(r.port, 443);
        let mut name = vec![5, 1, 0, 3, 9];
        name.extend_from_slice(b"Web.TEST.");
        name.extend_from_slice(&[0x1f, 0x90, 0xAA]);
        let Parsed::Done(r, n) = parse_request(&name).unwrap() else {
            panic!("name")
        };
        assert_eq!(
            n,
            name.len() - 1,
            "the trailing payload byte is not consumed"
        );
        assert_eq!(r.addr.host().unwrap(), Host::Name("web.test".into()));
        assert_eq!(r.port, 8080);
        assert_eq!(parse_request(&[5, 1, 0]).unwrap(), Parsed::Incomplete(4));
        assert_eq!(parse_request(&[5, 1, 0, 3]).unwrap(), Parsed::Incomplete(5));
        assert_eq!(
            parse_request(&[5, 1, 0, 3, 4, b'a']).unwrap(),
            Parsed::Incomplete(11)
        );
        assert!(matches!(
            parse_request(&[5, 1, 0, 9, 1, 2, 3, 4, 0, 80]),
            Err(SocksError::AddressType(9))
        ));
        assert!(matches!(
            parse_request(&[5, 1, 0, 3, 0, 0, 80]),
            Err(SocksError::BadName(_))
        ));
        let literal = SocksAddr::Name(b"127.0.0.1".to_vec());
        assert_eq!(
            literal.host().unwrap(),
            Host::Ip("127.0.0.1".parse().unwrap())
        );
        for bad in [&b"a b"[..], b"a\0b", b"\xff\xfe", b"..", b"a/b"] {
            assert!(SocksAddr::Name(bad.to_vec()).host().is_err(), "{bad:?}");
        }
    }

    /// UDP headers round-trip; fragments and truncated headers are refused.
    #[test]
    fn udp_headers() {
        let addr = SocksAddr::Name(b"dns.test".to_vec());
        let mut d = udp_header(&addr, 53);
        d.extend_from_slice(b"payload");
        let (a, p, payload) = parse_udp(&d).unwrap();
        assert_eq!((a, p, payload), (addr, 53, &b"payload"[..]));
        let mut frag = d.clone();
        frag[2] = 1;
        assert!(matches!(parse_udp(&frag), Err(SocksError::Fragmented)));
        assert!(matches!(parse_udp(&d[..6]), Err(SocksError::Truncated)));
        assert!(matches!(parse_udp(&[0, 0]), Err(SocksError::Truncated)));
    }

    /// Thousands of random and mutated inputs never panic and never ask for more bytes
    /// than the protocol maximum.
    #[test]
    fn hostile_inputs_never_panic() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let seeds: [&[u8]; 3] = [
            &[5, 1, 0, 3, 4, b'a', b'.', b'b', b'c', 0, 80],
            &[5, 3, 0, 1, 2],
            &[
                0, 0, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 53, 1,
            ],
        ];
        for i in 0..20_000 {
            let mut v: Vec<u8> = if i % 2 == 0 {
                let len = (next() % 300) as usize;
                (0..len).map(|_| next() as u8).collect()
            } else {
                seeds[i % 3].to_vec()
            };
            if !v.is_empty() {
                let k = (next() as usize) % v.len();
                v[k] = next() as u8;
                v.truncate((next() as usize) % (v.len() + 1));
            }
            for r in [
                parse_greeting(&v).map(|p| matches!(p, Parsed::Incomplete(n) if n > MAX_MESSAGE)),
                parse_request(&v).map(|p| matches!(p, Parsed::Incomplete(n) if n > MAX_MESSAGE)),
            ] {
                assert!(!r.unwrap_or(false), "asks for too much on {v:?}");
            }
            if let Ok(Parsed::Done(r, _)) = parse_request(&v) {
                let _ = r.addr.host();
            }
            let _ = parse_udp(&v);
        }
    }

    /// Replies carry the code and the bound address in the right address type.
    #[test]
    fn replies() {
        assert_eq!(
            encode_reply(reply::NOT_ALLOWED, UNSPECIFIED),
            vec![5, 2, 0, 1, 0, 0, 0, 0, 0, 0]
        );
        let r = encode_reply(0, "[::1]:1080".parse().unwrap());
        assert_eq!(r.len(), 22);
        assert_eq!(r[3], ATYP_IPV6);
    }
}
