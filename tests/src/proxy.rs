//! Minimal proxy clients for test grains and the benchmark: SOCKS5 CONNECT, HTTP CONNECT
//! and absolute-form GET, reporting the proxy's exact reply code or status (which curl and
//! Python only show in their own words).

use std::net::{IpAddr, SocketAddr};

use anyhow::{Context, Result, anyhow, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The proxy address in the first of `vars` that is set, such as `ALL_PROXY` =
/// `socks5h://127.0.0.1:1080` or `http_proxy` = `http://127.0.0.1:3128`.
pub fn proxy_from_env(vars: &[&str]) -> Result<SocketAddr> {
    for v in vars {
        if let Ok(val) = std::env::var(v) {
            let rest = val
                .split_once("://")
                .map_or(val.as_str(), |(_, r)| r)
                .trim_end_matches('/');
            return rest
                .parse()
                .with_context(|| format!("{v}={val:?} is not scheme://ip:port"));
        }
    }
    bail!("none of {vars:?} is set: run under capnet-bridge")
}

/// SOCKS5 CONNECT to `host:port` (a name is sent as a name, an address as an address).
/// Returns the stream and the reply code; the stream is usable only if the code is 0.
pub async fn socks_connect(proxy: SocketAddr, host: &str, port: u16) -> Result<(TcpStream, u8)> {
    let mut s = TcpStream::connect(proxy)
        .await
        .with_context(|| format!("connecting to the SOCKS5 proxy at {proxy}"))?;
    s.set_nodelay(true)?;
    s.write_all(&[5, 1, 0]).await?;
    let mut m = [0u8; 2];
    s.read_exact(&mut m).await.context("SOCKS5 method reply")?;
    if m != [5, 0] {
        bail!("SOCKS5 method negotiation failed: {m:?}");
    }
    let mut req = vec![5, 1, 0];
    match host
        .trim_matches(|c| c == '[' || c == ']')
        .parse::<IpAddr>()
    {
        Ok(IpAddr::V4(v4)) => {
            req.push(1);
            req.extend_from_slice(&v4.octets());
        }
        Ok(IpAddr::V6(v6)) => {
            req.push(4);
            req.extend_from_slice(&v6.octets());
        }
        Err(_) => {
            req.push(3);
            req.push(u8::try_from(host.len()).map_err(|_| anyhow!("name too long"))?);
            req.extend_from_slice(host.as_bytes());
        }
    }
    req.extend_from_slice(&port.to_be_bytes());
    s.write_all(&req).await?;
    let mut head = [0u8; 4];
    s.read_exact(&mut head).await.context("SOCKS5 reply")?;
    let rest = match head[3] {
        1 => 4 + 2,
        4 => 16 + 2,
        3 => {
            let mut n = [0u8; 1];
            s.read_exact(&mut n).await?;
            usize::from(n[0]) + 2
        }
        t => bail!("SOCKS5 reply with address type {t}"),
    };
    let mut bound = vec![0u8; rest];
    s.read_exact(&mut bound).await?;
    Ok((s, head[1]))
}

/// Reads an HTTP response head (up to 64 KiB) and returns the status and the head text.
async fn read_head(s: &mut TcpStream) -> Result<(u16, String, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..i]).into_owned();
            let rest = buf[i + 4..].to_vec();
            let status = head
                .split_whitespace()
                .nth(1)
                .and_then(|c| c.parse().ok())
                .ok_or_else(|| anyhow!("no status in {head:?}"))?;
            return Ok((status, head, rest));
        }
        if buf.len() > 64 * 1024 {
            bail!("response head larger than 64 KiB");
        }
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            bail!("the proxy closed the connection before a full response head");
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// HTTP CONNECT through the proxy. Returns the stream (usable only on 200), the status
/// and the body of a refusal (read to the end of its Content-Length).
pub async fn http_connect(
    proxy: SocketAddr,
    host: &str,
    port: u16,
) -> Result<(TcpStream, u16, String)> {
    let mut s = TcpStream::connect(proxy).await?;
    s.set_nodelay(true)?;
    let authority = if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    s.write_all(format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n").as_bytes())
        .await?;
    let (status, head, mut rest) = read_head(&mut s).await?;
    if status == 200 {
        if !rest.is_empty() {
            bail!("the proxy sent bytes after 200 before the server did");
        }
        return Ok((s, status, String::new()));
    }
    let len = content_length(&head).unwrap_or(0);
    while rest.len() < len {
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        rest.extend_from_slice(&chunk[..n]);
    }
    Ok((s, status, String::from_utf8_lossy(&rest).into_owned()))
}

fn content_length(head: &str) -> Option<usize> {
    head.lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse().ok())
}

/// `GET url` (absolute form) through the HTTP proxy with `Connection: close`; returns
/// the status and the body (read to end of file).
pub async fn http_get(proxy: SocketAddr, url: &str) -> Result<(u16, String)> {
    let mut s = TcpStream::connect(proxy).await?;
    let host = url
        .split_once("://")
        .map_or(url, |(_, r)| r)
        .split('/')
        .next()
        .unwrap_or("");
    s.write_all(
        format!("GET {url} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let (status, _head, mut body) = read_head(&mut s).await?;
    s.read_to_end(&mut body).await?;
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}
