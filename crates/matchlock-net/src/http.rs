//! HTTP and HTTPS interception: the guest's requests are parsed, checked, rewritten (secrets)
//! and re-sent by the host; responses stream back unbuffered.
//!
//! Port 80 is served as HTTP/1.1; port 443 is TLS terminated with a certificate from the
//! sandbox CA for the ClientHello's server name, then HTTP/2 or HTTP/1.1 by ALPN. Upstream
//! connections are verified against the host's trust store, negotiate HTTP/2 where the server
//! offers it, and are kept per guest connection.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Request, Response, StatusCode, Uri, Version};
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::ServerName;
use tokio::io::DuplexStream;
use tokio::net::TcpStream;
use tokio::sync::Mutex;

use crate::hooks::is_event_stream;
use crate::secrets::{self, BodyTransform, SseDataReplacer, StreamReplacer};
use crate::{Shared, CONNECT_TIMEOUT};

type Body = BoxBody<Bytes, BoxError>;
type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Largest response body buffered for a body replacement.
const MAX_REWRITTEN_BODY: usize = 32 * 1024 * 1024;
/// Largest request or response header block accepted from the guest.
const MAX_HEADER_BYTES: usize = 64 * 1024;

/// Headers that belong to one connection, never forwarded.
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
];

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Scheme {
    Http,
    Https,
}

/// Upstream connections of one guest connection.
#[derive(Default)]
struct Upstreams(Mutex<HashMap<(String, u16), Sender>>);

#[derive(Clone)]
enum Sender {
    Http1(Arc<Mutex<hyper::client::conn::http1::SendRequest<Body>>>),
    Http2(hyper::client::conn::http2::SendRequest<Body>),
}

/// Serves a guest connection to port 80.
pub(crate) async fn serve_http(shared: Arc<Shared>, dst: SocketAddrV4, stream: DuplexStream) {
    let upstreams = Arc::new(Upstreams::default());
    let service = service_fn(move |req| {
        let (shared, upstreams) = (shared.clone(), upstreams.clone());
        async move { Ok::<_, std::convert::Infallible>(proxy(&shared, &upstreams, Scheme::Http, dst, None, req).await) }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .max_buf_size(MAX_HEADER_BYTES)
        // A client may shut down its sending side right after the request.
        .half_close(true)
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades()
        .await;
}

/// Serves a guest connection to port 443: TLS with a certificate for the requested name.
pub(crate) async fn serve_https(shared: Arc<Shared>, dst: SocketAddrV4, stream: DuplexStream) {
    let Some(ca) = shared.ca.clone() else { return };
    let Ok(start) = tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), stream).await else {
        return;
    };
    let server_name = start.client_hello().server_name().map_or_else(|| dst.ip().to_string(), str::to_owned);
    if shared.policy.check_host(&server_name).is_err() {
        return; // closes the handshake: no certificate for hosts the guest may not reach
    }
    let Ok(config) = ca.server_config(&server_name) else { return };
    let Ok(tls) = start.into_stream(config).await else { return };
    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
    let upstreams = Arc::new(Upstreams::default());
    let service = service_fn(move |req| {
        let (shared, upstreams, name) = (shared.clone(), upstreams.clone(), server_name.clone());
        async move {
            Ok::<_, std::convert::Infallible>(proxy(&shared, &upstreams, Scheme::Https, dst, Some(&name), req).await)
        }
    });
    let io = TokioIo::new(tls);
    if h2 {
        let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .max_header_list_size(u32::try_from(MAX_HEADER_BYTES).unwrap_or(u32::MAX))
            .serve_connection(io, service)
            .await;
    } else {
        let _ = hyper::server::conn::http1::Builder::new()
            .max_buf_size(MAX_HEADER_BYTES)
            .half_close(true)
            .serve_connection(io, service)
            .with_upgrades()
            .await;
    }
}

/// Why policy refused a request; carried on the `403` response for the event.
#[derive(Debug, Clone, Copy)]
struct BlockReason(&'static str);

/// The `403 Blocked by policy` answer.
fn blocked(reason: &'static str) -> Response<Body> {
    let mut response = Response::new(full("Blocked by policy"));
    response.extensions_mut().insert(BlockReason(reason));
    *response.status_mut() = StatusCode::FORBIDDEN;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

fn bad_gateway(reason: &str) -> Response<Body> {
    let mut response = Response::new(full(format!("matchlock: upstream unavailable: {reason}")));
    *response.status_mut() = StatusCode::BAD_GATEWAY;
    response
}

fn full(body: impl Into<Bytes>) -> Body {
    Full::new(body.into()).map_err(|never| match never {}).boxed()
}

/// Host and port a request is for.
fn target(scheme: Scheme, dst: SocketAddrV4, tls_name: Option<&str>, req: &Request<Incoming>) -> (String, u16) {
    if let Some(name) = tls_name {
        return (name.to_owned(), dst.port());
    }
    let authority = req
        .uri()
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| req.headers().get(header::HOST).and_then(|h| h.to_str().ok()).map(str::to_owned));
    let default_port = if scheme == Scheme::Https { 443 } else { dst.port() };
    match authority {
        Some(authority) => match authority.parse::<http::uri::Authority>() {
            Ok(a) => (a.host().to_owned(), a.port_u16().unwrap_or(default_port)),
            Err(_) => (authority, default_port),
        },
        None => (dst.ip().to_string(), dst.port()),
    }
}

/// The name the request claims (Host header or HTTP/2 authority), without port.
fn claimed_host(req: &Request<Incoming>) -> Option<String> {
    let raw = req.uri().authority().map(|a| a.host().to_owned()).or_else(|| {
        let host = req.headers().get(header::HOST)?.to_str().ok()?;
        Some(host.parse::<http::uri::Authority>().map_or_else(|_| host.to_owned(), |a| a.host().to_owned()))
    })?;
    Some(raw)
}

/// Proxies one request and reports it as a `network` event when someone listens.
async fn proxy(
    shared: &Shared,
    upstreams: &Upstreams,
    scheme: Scheme,
    dst: SocketAddrV4,
    tls_name: Option<&str>,
    req: Request<Incoming>,
) -> Response<Body> {
    let Some(events) = shared.events.clone() else {
        return forward(shared, upstreams, scheme, dst, tls_name, req).await;
    };
    let started = std::time::Instant::now();
    let (host, _) = target(scheme, dst, tls_name, &req);
    let method = req.method().to_string();
    let scheme_name = if scheme == Scheme::Https { "https" } else { "http" };
    let path = req.uri().path_and_query().map_or("/", http::uri::PathAndQuery::as_str).to_owned();
    let url = format!("{scheme_name}://{host}{path}");
    let length = |headers: &HeaderMap| {
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok()).unwrap_or(0)
    };
    let request_bytes = length(req.headers());
    let response = forward(shared, upstreams, scheme, dst, tls_name, req).await;
    let reason = response.extensions().get::<BlockReason>().map(|r| r.0.to_owned());
    (events.0)(matchlock_api::rpc::NetworkEvent {
        method,
        url,
        host,
        status_code: response.status().as_u16(),
        request_bytes,
        response_bytes: length(response.headers()),
        duration_ms: started.elapsed().as_millis() as u64,
        blocked: reason.is_some(),
        block_reason: reason,
    });
    response
}

async fn forward(
    shared: &Shared,
    upstreams: &Upstreams,
    scheme: Scheme,
    dst: SocketAddrV4,
    tls_name: Option<&str>,
    mut req: Request<Incoming>,
) -> Response<Body> {
    let (host, port) = target(scheme, dst, tls_name, &req);
    // Over TLS the server name decided the policy: a different Host would smuggle past it.
    if let (Some(name), Some(claimed)) = (tls_name, claimed_host(&req)) {
        if !claimed.eq_ignore_ascii_case(name) {
            return blocked("Host header does not match the TLS server name");
        }
    }
    if shared.policy.check_host(&host).is_err() {
        return blocked("host not in the allow-list");
    }
    let upgrade = req.headers().contains_key(header::UPGRADE) && req.version() == Version::HTTP_11;
    let guest_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    if shared.hooks.before(&host, &mut parts).await.is_err() {
        return blocked("blocked by an interception rule");
    }
    let (method, path, request_headers) = (parts.method.clone(), parts.uri.path().to_owned(), parts.headers.clone());
    let injected = match secrets::apply_to_request(&mut parts, &host, shared.policy.secrets()) {
        Ok(injected) => injected,
        Err(_) => return blocked("secret placeholder sent to a host the secret is not for"),
    };
    let sender = match upstreams.get(shared, scheme, &host, port).await {
        Ok(sender) => sender,
        Err(UpstreamError::Blocked) => return blocked("address blocked (private, reserved or loopback)"),
        Err(UpstreamError::Failed(reason)) => return bad_gateway(&reason),
    };
    let http2 = matches!(sender, Sender::Http2(_));
    let upstream_req =
        rewrite_request(parts, body.map_err(BoxError::from).boxed(), scheme, &host, port, http2, upgrade);
    let response = match sender {
        Sender::Http1(sender) => {
            let mut sender = sender.lock().await;
            if sender.ready().await.is_err() {
                return bad_gateway("connection closed");
            }
            sender.send_request(upstream_req).await
        }
        Sender::Http2(mut sender) => sender.send_request(upstream_req).await,
    };
    let mut response = match response {
        Ok(r) => r,
        Err(e) => {
            upstreams.forget(&host, port).await;
            return bad_gateway(&e.to_string());
        }
    };
    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        if let Some(guest_upgrade) = guest_upgrade {
            let upstream_upgrade = hyper::upgrade::on(&mut response);
            tokio::spawn(async move {
                if let (Ok(guest), Ok(upstream)) = (guest_upgrade.await, upstream_upgrade.await) {
                    let _ = tokio::io::copy_bidirectional(&mut TokioIo::new(guest), &mut TokioIo::new(upstream)).await;
                }
            });
            upstreams.forget(&host, port).await;
            let (parts, _) = response.into_parts();
            return Response::from_parts(parts, full(Bytes::new()));
        }
    }
    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    secrets::scrub_headers(&mut parts.headers, &injected);
    let mut body = body.map_err(BoxError::from).boxed();
    match shared.hooks.after(&host, method.as_str(), &path, &request_headers, &mut parts).await {
        Err(_) => return blocked("blocked by an interception rule"),
        Ok(changes) => {
            if let Some(new_body) = changes.body {
                parts.headers.insert(header::CONTENT_LENGTH, HeaderValue::from(new_body.len()));
                body = full(new_body);
            } else if !changes.replacements.is_empty() {
                if is_event_stream(&parts.headers) {
                    parts.headers.remove(header::CONTENT_LENGTH);
                    body = replace_in_body(body, SseDataReplacer::new(changes.replacements));
                } else {
                    let Some(collected) = collect_limited(body, MAX_REWRITTEN_BODY).await else {
                        return bad_gateway("response too large or broken for body replacement");
                    };
                    let rewritten = StreamReplacer::new(changes.replacements).replace(&collected);
                    parts.headers.insert(header::CONTENT_LENGTH, HeaderValue::from(rewritten.len()));
                    body = full(rewritten);
                }
            }
        }
    }
    let pairs: Vec<(Vec<u8>, Vec<u8>)> =
        injected.iter().map(|s| (s.value.as_bytes().to_vec(), s.placeholder.as_bytes().to_vec())).collect();
    let body = if pairs.is_empty() {
        body
    } else {
        parts.headers.remove(header::CONTENT_LENGTH);
        replace_in_body(body, StreamReplacer::new(pairs))
    };
    Response::from_parts(parts, body)
}

/// The whole body, unless it fails or exceeds `max` bytes.
async fn collect_limited(mut body: Body, max: usize) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.ok()?.into_data() {
            if out.len() + data.len() > max {
                return None;
            }
            out.extend_from_slice(&data);
        }
    }
    Some(out)
}

/// A streaming body with literal replacements applied.
fn replace_in_body(body: Body, replacer: impl BodyTransform + 'static) -> Body {
    ReplacingBody { inner: body, replacer: Box::new(replacer), finished: false }.boxed()
}

struct ReplacingBody {
    inner: Body,
    replacer: Box<dyn BodyTransform>,
    finished: bool,
}

impl hyper::body::Body for ReplacingBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        use std::task::Poll;
        loop {
            if self.finished {
                return Poll::Ready(None);
            }
            match std::pin::Pin::new(&mut self.inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        let out = self.replacer.push(&data);
                        if !out.is_empty() {
                            return Poll::Ready(Some(Ok(Frame::data(out))));
                        }
                    }
                    Err(trailers) => return Poll::Ready(Some(Ok(trailers))),
                },
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(None) => {
                    self.finished = true;
                    let tail = self.replacer.finish();
                    if !tail.is_empty() {
                        return Poll::Ready(Some(Ok(Frame::data(tail))));
                    }
                }
            }
        }
    }
}

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
    headers.remove(header::UPGRADE);
}

/// The request as the upstream should see it: origin-form and Host for HTTP/1.1, absolute URI
/// for HTTP/2, connection headers dropped (kept for an upgrade).
fn rewrite_request(
    mut parts: http::request::Parts,
    body: Body,
    scheme: Scheme,
    host: &str,
    port: u16,
    http2: bool,
    upgrade: bool,
) -> Request<Body> {
    let default_port = if scheme == Scheme::Https { 443 } else { 80 };
    let authority = if port == default_port { host.to_owned() } else { format!("{host}:{port}") };
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
    let upgrade_headers =
        upgrade.then(|| (parts.headers.get(header::UPGRADE).cloned(), parts.headers.get(header::CONNECTION).cloned()));
    strip_hop_by_hop(&mut parts.headers);
    if http2 {
        parts.headers.remove(header::HOST);
        let scheme = if scheme == Scheme::Https { "https" } else { "http" };
        parts.uri = format!("{scheme}://{authority}{path}").parse().unwrap_or_else(|_| Uri::from_static("/"));
        parts.version = Version::HTTP_2;
    } else {
        if !parts.headers.contains_key(header::HOST) {
            if let Ok(v) = HeaderValue::from_str(&authority) {
                parts.headers.insert(header::HOST, v);
            }
        }
        parts.uri = path.parse().unwrap_or_else(|_| Uri::from_static("/"));
        parts.version = Version::HTTP_11;
        if let Some((Some(up), connection)) = upgrade_headers {
            parts.headers.insert(header::UPGRADE, up);
            parts.headers.insert(header::CONNECTION, connection.unwrap_or(HeaderValue::from_static("upgrade")));
        }
    }
    Request::from_parts(parts, body)
}

enum UpstreamError {
    Blocked,
    Failed(String),
}

impl Upstreams {
    async fn get(&self, shared: &Shared, scheme: Scheme, host: &str, port: u16) -> Result<Sender, UpstreamError> {
        let key = (host.to_owned(), port);
        if let Some(sender) = self.0.lock().await.get(&key) {
            let alive = match sender {
                Sender::Http1(s) => !s.lock().await.is_closed(),
                Sender::Http2(s) => !s.is_closed(),
            };
            if alive {
                return Ok(sender.clone());
            }
        }
        let sender = connect(shared, scheme, host, port).await?;
        self.0.lock().await.insert(key, sender.clone());
        Ok(sender)
    }

    async fn forget(&self, host: &str, port: u16) {
        self.0.lock().await.remove(&(host.to_owned(), port));
    }
}

/// Dials `host:port`: resolved on the host, every address checked before it is dialled.
async fn dial(shared: &Shared, host: &str, port: u16) -> Result<TcpStream, UpstreamError> {
    let ips: Vec<Ipv4Addr> =
        shared.resolver.lookup_ipv4(host).await.map_err(|e| UpstreamError::Failed(e.to_string()))?;
    let allowed: Vec<Ipv4Addr> = ips.into_iter().filter(|ip| shared.policy.check_address(*ip).is_ok()).collect();
    if allowed.is_empty() {
        return Err(UpstreamError::Blocked);
    }
    let mut last = String::from("no address");
    for ip in allowed {
        match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect((ip, port))).await {
            Ok(Ok(stream)) => {
                let _ = stream.set_nodelay(true);
                return Ok(stream);
            }
            Ok(Err(e)) => last = e.to_string(),
            Err(_) => last = "connect timed out".into(),
        }
    }
    Err(UpstreamError::Failed(last))
}

async fn connect(shared: &Shared, scheme: Scheme, host: &str, port: u16) -> Result<Sender, UpstreamError> {
    let tcp = dial(shared, host, port).await?;
    let failed = |e: &dyn std::fmt::Display| UpstreamError::Failed(e.to_string());
    match scheme {
        Scheme::Http => handshake_http1(TokioIo::new(tcp)).await.map_err(|e| failed(&e)),
        Scheme::Https => {
            let name = ServerName::try_from(host.to_owned()).map_err(|e| failed(&e))?;
            let connector = tokio_rustls::TlsConnector::from(shared.upstream_tls.clone());
            let tls = tokio::time::timeout(CONNECT_TIMEOUT, connector.connect(name, tcp))
                .await
                .map_err(|_| UpstreamError::Failed("TLS handshake timed out".into()))?
                .map_err(|e| failed(&e))?;
            let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
            let tls = CloseNotifyOptional(tls);
            if h2 {
                let (sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                    .await
                    .map_err(|e| failed(&e))?;
                tokio::spawn(conn);
                Ok(Sender::Http2(sender))
            } else {
                handshake_http1(TokioIo::new(tls)).await.map_err(|e| failed(&e))
            }
        }
    }
}

async fn handshake_http1<T>(io: TokioIo<T>) -> Result<Sender, hyper::Error>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(io).await?;
    tokio::spawn(conn.with_upgrades());
    Ok(Sender::Http1(Arc::new(Mutex::new(sender))))
}

/// Upstream TLS where a peer closing without `close_notify` ends the stream instead of failing
/// it: many servers do this, and close-delimited HTTP/1.x bodies would otherwise end in error.
struct CloseNotifyOptional<T>(T);

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for CloseNotifyOptional<T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match std::pin::Pin::new(&mut self.0).poll_read(cx, buf) {
            std::task::Poll::Ready(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                std::task::Poll::Ready(Ok(()))
            }
            other => other,
        }
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for CloseNotifyOptional<T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_shutdown(cx)
    }
}
