//! The HTTP proxy: `CONNECT host:port` tunnels and absolute-form requests
//! (`GET http://host/path`), HTTP/1.1 with keep-alive on both sides.
//!
//! hyper parses and frames everything (request heads bounded by [`MAX_HEAD`] bytes and
//! [`MAX_HEADERS`] headers, a deadline of [`HEAD_TIMEOUT`] for each request head, chunked
//! and length-delimited bodies, `100-continue`). This module decides where a request goes
//! and rewrites it as a proxy must (RFC 9110 §7.6): the target becomes origin-form, `Host`
//! is set from the absolute URI, hop-by-hop headers (`Connection` and the headers it names,
//! `Keep-Alive`, `Proxy-Connection`, `Proxy-Authorization`, `Proxy-Authenticate`, `TE`,
//! `Trailer`, `Transfer-Encoding`, `Upgrade`) are removed in both directions, and `Via` is
//! added. A client connection keeps its last upstream connection and reuses it for the
//! next request to the same host and port.
//!
//! Refusals are answered with the status from [`Refusal::http_status`], a `Proxy-Status`
//! header (RFC 9209) and a plain-text body that names the reason.

use std::cell::RefCell;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Request, Response, StatusCode, Uri, Version};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{DuplexStream, WriteHalf};
use tokio::net::{TcpListener, TcpStream};

use crate::Bridge;
use crate::refusal::Refusal;
use crate::splice;
use crate::target::{Host, Target, TargetError};

/// Largest request or response head (start line and headers).
pub const MAX_HEAD: usize = 64 * 1024;
/// Most headers in one head.
pub const MAX_HEADERS: usize = 128;
/// How long a client may take to send a request head (also the keep-alive idle limit).
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(30);
/// The in-memory pipe between hyper's client and a capability connection.
const PIPE_BYTES: usize = 512 * 1024;

/// The body of a response the proxy sends: the upstream's, or its own.
pub type ProxyBody = Either<Incoming, Full<Bytes>>;

/// What a proxy request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wanted {
    /// `CONNECT host:port`.
    Tunnel(Target),
    /// An absolute-form `http://` request to forward.
    Forward(Target),
}

/// A request the proxy cannot serve, with the status to answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadRequest {
    /// `GET /path`: the client talks to the proxy as if it were the server.
    #[error(
        "capnet-bridge is a proxy: ask for an absolute URL (GET http://host/path) or use CONNECT"
    )]
    OriginForm,
    /// `GET https://...`: TLS must be tunnelled.
    #[error("capnet-bridge forwards only http:// URLs; use CONNECT for {0}")]
    Scheme(String),
    /// CONNECT without host:port.
    #[error("CONNECT needs host:port, not {0:?}")]
    ConnectTarget(String),
    /// A host or port that does not parse.
    #[error("{0}")]
    Target(#[from] TargetError),
}

impl BadRequest {
    /// The status to answer with.
    pub fn status(&self) -> StatusCode {
        match self {
            BadRequest::Scheme(_) => StatusCode::NOT_IMPLEMENTED,
            _ => StatusCode::BAD_REQUEST,
        }
    }
}

/// Decides what a request asks for from its method and target.
pub fn wanted(method: &Method, uri: &Uri) -> Result<Wanted, BadRequest> {
    if method == Method::CONNECT {
        let auth = uri
            .authority()
            .ok_or_else(|| BadRequest::ConnectTarget(uri.to_string()))?;
        let port = auth
            .port_u16()
            .ok_or_else(|| BadRequest::ConnectTarget(uri.to_string()))?;
        if port == 0 {
            return Err(BadRequest::ConnectTarget(uri.to_string()));
        }
        return Ok(Wanted::Tunnel(Target {
            host: Host::parse(auth.host())?,
            port,
        }));
    }
    let Some(scheme) = uri.scheme_str() else {
        return Err(BadRequest::OriginForm);
    };
    if !scheme.eq_ignore_ascii_case("http") {
        return Err(BadRequest::Scheme(uri.to_string()));
    }
    let auth = uri.authority().ok_or(BadRequest::OriginForm)?;
    let port = match auth.port_u16() {
        Some(0) => return Err(TargetError::BadPort(auth.to_string()).into()),
        Some(p) => p,
        None => 80,
    };
    Ok(Wanted::Forward(Target {
        host: Host::parse(auth.host())?,
        port,
    }))
}

/// Removes hop-by-hop headers (RFC 9110 §7.6.1), including those `Connection` names.
pub fn strip_hop_by_hop(h: &mut HeaderMap) {
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .chain(h.get_all("proxy-connection").iter())
        .filter_map(|v| v.to_str().ok())
        .flat_map(|s| s.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for n in named {
        h.remove(n);
    }
    for n in [
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authorization",
        "proxy-authenticate",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    ] {
        h.remove(n);
    }
}

const VIA: HeaderValue = HeaderValue::from_static("1.1 capnet-bridge");

/// Rewrites an absolute-form request for the origin server.
pub fn to_origin_form(req: &mut Request<Incoming>) -> Result<(), BadRequest> {
    let uri = req.uri().clone();
    let auth = uri.authority().ok_or(BadRequest::OriginForm)?;
    // The authority without user information, as the Host header wants it.
    let host = match auth.as_str().rsplit_once('@') {
        Some((_, h)) => h,
        None => auth.as_str(),
    };
    let host = HeaderValue::from_str(host)
        .map_err(|_| TargetError::BadHost(host.chars().take(300).collect()))?;
    let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_string();
    *req.uri_mut() = path
        .parse()
        .map_err(|_| BadRequest::Target(TargetError::BadHost(path)))?;
    *req.version_mut() = Version::HTTP_11;
    let h = req.headers_mut();
    strip_hop_by_hop(h);
    h.insert(header::HOST, host);
    h.append(header::VIA, VIA);
    Ok(())
}

/// A response the proxy makes itself.
pub fn own_response(status: StatusCode, proxy_status: &str, text: &str) -> Response<ProxyBody> {
    let body = format!(
        "capnet-bridge: {} {}: {text}\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or("")
    );
    let mut r = Response::new(Either::Right(Full::new(Bytes::from(body))));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if let Ok(v) = HeaderValue::from_str(&format!("capnet-bridge; error={proxy_status}")) {
        h.insert("proxy-status", v);
    }
    r
}

/// The RFC 9209 error type for a refusal.
fn proxy_status(r: &Refusal) -> &'static str {
    match r {
        Refusal::NoGrant(_) | Refusal::Policy(_) => "destination_ip_prohibited",
        Refusal::NotFound(_) => "dns_error",
        Refusal::ConnectionRefused(_) => "connection_refused",
        Refusal::TimedOut(_) => "connection_timeout",
        Refusal::Limit(_) | Refusal::Unsupported(_) | Refusal::Failed(_) => "proxy_internal_error",
    }
}

fn refused(r: &Refusal) -> Response<ProxyBody> {
    own_response(r.http_status(), proxy_status(r), &r.to_string())
}

/// One client connection's upstream (kept for keep-alive).
#[derive(Default)]
struct ClientState {
    upstream: Option<(Target, SendRequest<Incoming>)>,
}

/// Accepts HTTP proxy clients on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, bridge: Rc<Bridge>) {
    loop {
        let permit = bridge.client_permit().await;
        match listener.accept().await {
            Ok((stream, peer)) => {
                let b = bridge.clone();
                tokio::task::spawn_local(async move {
                    let _permit = permit;
                    let _ = stream.set_nodelay(true);
                    handle(stream, peer, b).await;
                });
            }
            Err(e) => crate::accept_failed("HTTP", e).await,
        }
    }
}

/// Serves one client connection.
pub async fn handle(stream: TcpStream, peer: SocketAddr, bridge: Rc<Bridge>) {
    let state = Rc::new(RefCell::new(ClientState::default()));
    let service = hyper::service::service_fn(move |req| {
        let bridge = bridge.clone();
        let state = state.clone();
        async move { Ok::<_, Infallible>(proxy(req, peer, &bridge, &state).await) }
    });
    let r = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEAD_TIMEOUT)
        .max_header_size(MAX_HEAD)
        .max_headers(MAX_HEADERS)
        .half_close(true)
        .preserve_header_case(true)
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades()
        .await;
    if let Err(e) = r {
        tracing::debug!(target: "capnet_bridge", %peer, "http client: {e}");
    }
}

async fn proxy(
    mut req: Request<Incoming>,
    peer: SocketAddr,
    bridge: &Rc<Bridge>,
    state: &Rc<RefCell<ClientState>>,
) -> Response<ProxyBody> {
    let want = match wanted(req.method(), req.uri()) {
        Ok(w) => w,
        Err(e) => return own_response(e.status(), "http_request_error", &e.to_string()),
    };
    match want {
        Wanted::Tunnel(target) => tunnel(req, peer, target, bridge).await,
        Wanted::Forward(target) => {
            if let Err(e) = to_origin_form(&mut req) {
                return own_response(e.status(), "http_request_error", &e.to_string());
            }
            forward(req, peer, target, bridge, state).await
        }
    }
}

async fn tunnel(
    req: Request<Incoming>,
    peer: SocketAddr,
    target: Target,
    bridge: &Rc<Bridge>,
) -> Response<ProxyBody> {
    type W = WriteHalf<TokioIo<hyper::upgrade::Upgraded>>;
    let opened = match splice::open::<W>(&bridge.router, &target).await {
        Ok(o) => o,
        Err(r) => {
            crate::log_refusal("http-connect", peer, &target.to_string(), &r);
            return refused(&r);
        }
    };
    let b = bridge.clone();
    tokio::task::spawn_local(async move {
        match hyper::upgrade::on(req).await {
            Ok(upgraded) => {
                let (r, w) = tokio::io::split(TokioIo::new(upgraded));
                let ended = opened.run(r, w).await;
                if let splice::Ended::ClientFailed(_) = ended {
                    b.note_abort();
                }
                tracing::debug!(target: "capnet_bridge", %peer, %target, ?ended, "tunnel client side ended");
            }
            Err(e) => opened.abort(&format!("the client connection was not upgraded: {e}")),
        }
    });
    let mut r = Response::new(Either::Right(Full::new(Bytes::new())));
    r.headers_mut().insert(header::VIA, VIA);
    r
}

/// Opens a capability connection and an HTTP/1.1 client on it.
async fn open_upstream(
    bridge: &Rc<Bridge>,
    target: &Target,
) -> Result<SendRequest<Incoming>, Refusal> {
    let opened = splice::open::<WriteHalf<DuplexStream>>(&bridge.router, target).await?;
    let (ours, theirs) = tokio::io::duplex(PIPE_BYTES);
    let (r, w) = tokio::io::split(theirs);
    tokio::task::spawn_local(async move {
        let _ = opened.run(r, w).await;
    });
    let (sender, conn) = hyper::client::conn::http1::Builder::new()
        .max_header_size(MAX_HEAD)
        .max_headers(MAX_HEADERS)
        .preserve_header_case(true)
        .handshake::<_, Incoming>(TokioIo::new(ours))
        .await
        .map_err(|e| Refusal::Failed(format!("starting HTTP/1.1 to {target}: {e}")))?;
    tokio::task::spawn_local(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

async fn forward(
    req: Request<Incoming>,
    peer: SocketAddr,
    target: Target,
    bridge: &Rc<Bridge>,
    state: &Rc<RefCell<ClientState>>,
) -> Response<ProxyBody> {
    let reuse = state.borrow_mut().upstream.take();
    let mut sender = match reuse {
        Some((t, s)) if t == target && !s.is_closed() => Some(s),
        _ => None,
    };
    if let Some(s) = sender.as_mut()
        && s.ready().await.is_err()
    {
        sender = None;
    }
    let mut sender = match sender {
        Some(s) => s,
        None => match open_upstream(bridge, &target).await {
            Ok(s) => s,
            Err(r) => {
                crate::log_refusal("http", peer, &target.to_string(), &r);
                return refused(&r);
            }
        },
    };
    let resp = match sender.send_request(req).await {
        Ok(r) => r,
        Err(e) => {
            let r = Refusal::Failed(format!("the server at {target} did not answer: {e}"));
            return refused(&r);
        }
    };
    state.borrow_mut().upstream = Some((target, sender));
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    parts.headers.append(header::VIA, VIA);
    Response::from_parts(parts, Either::Left(body))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn want(method: &str, uri: &str) -> Result<Wanted, BadRequest> {
        let m = Method::from_bytes(method.as_bytes()).unwrap();
        wanted(&m, &uri.parse().unwrap())
    }

    /// CONNECT and absolute-form targets parse to the right host and port; origin-form,
    /// https:// and CONNECT without a port are refused with the right status.
    #[test]
    fn targets_of_requests() {
        assert_eq!(
            want("CONNECT", "Example.test:443").unwrap(),
            Wanted::Tunnel(Target::parse("example.test:443").unwrap())
        );
        assert_eq!(
            want("CONNECT", "[::1]:8443").unwrap(),
            Wanted::Tunnel(Target::parse("[::1]:8443").unwrap())
        );
        assert_eq!(
            want("GET", "http://user:pw@a.test/x?y").unwrap(),
            Wanted::Forward(Target::parse("a.test:80").unwrap())
        );
        assert_eq!(
            want("POST", "http://10.0.0.1:8080/").unwrap(),
            Wanted::Forward(Target::parse("10.0.0.1:8080").unwrap())
        );
        assert_eq!(
            want("GET", "/index.html").unwrap_err(),
            BadRequest::OriginForm
        );
        assert_eq!(
            want("GET", "https://a.test/").unwrap_err().status(),
            StatusCode::NOT_IMPLEMENTED
        );
        assert!(matches!(
            want("CONNECT", "a.test"),
            Err(BadRequest::ConnectTarget(_))
        ));
        assert!(want("CONNECT", "a.test:0").is_err());
        assert!(want("GET", "http://a_b..c/").is_err());
    }

    /// Hop-by-hop headers, and every header that Connection names, are removed;
    /// end-to-end headers stay.
    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("connection", "keep-alive, X-Secret , close"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("proxy-authorization", "Basic Zm9vOmJhcg=="),
            ("proxy-connection", "x-other"),
            ("x-other", "2"),
            ("te", "trailers"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("accept", "*/*"),
            ("content-length", "3"),
        ] {
            h.append(k, HeaderValue::from_static(v));
        }
        strip_hop_by_hop(&mut h);
        let mut left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        left.sort_unstable();
        assert_eq!(left, ["accept", "content-length"]);
    }

    /// The proxy's own answers carry the status, Proxy-Status and a body naming the
    /// reason.
    #[test]
    fn refusal_responses_name_the_reason() {
        let r = refused(&Refusal::no_tcp_grant(&Target::parse("a.test:25").unwrap()));
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
        assert_eq!(
            r.headers()["proxy-status"],
            "capnet-bridge; error=destination_ip_prohibited"
        );
        let Either::Right(body) = r.into_body() else {
            panic!("own body")
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let bytes = rt
            .block_on(http_body_util::BodyExt::collect(body))
            .expect("body")
            .to_bytes();
        let text = String::from_utf8_lossy(&bytes);
        assert!(
            text.starts_with("capnet-bridge: 403 Forbidden: no grant"),
            "{text}"
        );
        assert!(text.contains("a.test:25"), "{text}");
    }
}
