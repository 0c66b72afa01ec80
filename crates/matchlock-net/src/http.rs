//! HTTP and HTTPS interception: the guest's requests are parsed, checked, rewritten (secrets)
//! and re-sent by the host; responses stream back unbuffered.
//!
//! Each request has exactly one [`Destination`], decided before any policy or secret step from
//! everything that names a host (SNI, absolute-form or HTTP/2 authority, the `Host` header):
//! they must all agree, on the port the guest dialled. The upstream connection goes to the
//! address and port the guest dialled, only if that address is one of the decided name's, and
//! the upstream `Host`/`:authority` is written from the decision, never copied from the guest.
//! Responses from a secret's hosts are decoded if compressed and scrubbed of the values
//! (headers, body, trailers, WebSocket messages); what cannot be scrubbed is refused.
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
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::sync::Mutex;

use crate::budget::Exceeded;
use crate::hooks::is_event_stream;
#[cfg(test)]
use crate::secrets::Secret;
use crate::secrets::{self, BodyTransform, Replacements, Scrubber, SseDataReplacer};
use crate::{Metered, Shared, CONNECT_TIMEOUT};
use matchlock_api::audit::{Decision, Kind, Record};

type Body = BoxBody<Bytes, BoxError>;
type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Largest response body buffered for a body replacement.
const MAX_REWRITTEN_BODY: usize = 32 * 1024 * 1024;
/// Largest request or response header block accepted from the guest.
const MAX_HEADER_BYTES: usize = 64 * 1024;
/// Largest WebSocket message relayed from an upstream whose messages are scrubbed.
const MAX_SCRUBBED_MESSAGE: usize = 16 * 1024 * 1024;

/// Headers that belong to one connection, never forwarded (`Trailer` is end to end: it
/// announces trailers, which are forwarded, scrubbed).
const HOP_BY_HOP: [&str; 7] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "transfer-encoding",
];

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Scheme {
    Http,
    Https,
}

impl Scheme {
    fn name(self) -> &'static str {
        match self {
            Self::Http => "http",
            Self::Https => "https",
        }
    }

    fn default_port(self) -> u16 {
        match self {
            Self::Http => 80,
            Self::Https => 443,
        }
    }
}

/// Where one request goes, decided once: the one host every claim of the request names,
/// reached at the address and port the guest dialled.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Destination {
    scheme: Scheme,
    /// Lowercase name without a trailing dot, or an IPv4 literal.
    host: String,
    /// The address and port the guest dialled.
    addr: SocketAddrV4,
}

impl Destination {
    /// `host[:port]` as the upstream sees it (the port only when not the scheme's default).
    fn authority(&self) -> String {
        if self.addr.port() == self.scheme.default_port() {
            self.host.clone()
        } else {
            format!("{}:{}", self.host, self.addr.port())
        }
    }
}

/// Why a request names no single destination; answered before any policy or secret step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    /// Malformed: `400 Bad Request`.
    Bad(&'static str),
    /// Names another host or port than the connection's: `421 Misdirected Request`.
    Misdirected(&'static str),
}

impl Refusal {
    fn reason(self) -> &'static str {
        match self {
            Self::Bad(r) | Self::Misdirected(r) => r,
        }
    }

    fn response(self) -> Response<Body> {
        let status = match self {
            Self::Bad(_) => StatusCode::BAD_REQUEST,
            Self::Misdirected(_) => StatusCode::MISDIRECTED_REQUEST,
        };
        refused(status, self.reason())
    }
}

/// Decides the destination of a request on a connection the guest dialled to `dst` (with
/// `tls_name` from the ClientHello over TLS). Every `Host` header, the request target's
/// authority and the server name must name the same host (ASCII case and one trailing dot
/// ignored), on the dialled port (the scheme's default when none is given); exactly one `Host`
/// in HTTP/1.1, at most one otherwise; no userinfo; no CONNECT.
fn decide<B>(
    scheme: Scheme,
    dst: SocketAddrV4,
    tls_name: Option<&str>,
    req: &Request<B>,
) -> Result<Destination, Refusal> {
    if req.method() == Method::CONNECT {
        return Err(Refusal::Bad("CONNECT is not supported: connections go where the guest dials"));
    }
    let hosts: Vec<&HeaderValue> = req.headers().get_all(header::HOST).iter().collect();
    let required = usize::from(req.version() == Version::HTTP_11);
    if hosts.len() > 1 || hosts.len() < required {
        return Err(Refusal::Bad("exactly one Host header is required"));
    }
    let mut names: Vec<String> = Vec::new();
    if let Some(name) = tls_name {
        names.push(normalise(name).ok_or(Refusal::Bad("malformed TLS server name"))?);
    }
    if let Some(authority) = req.uri().authority() {
        if req.uri().scheme_str().is_some_and(|s| !s.eq_ignore_ascii_case(scheme.name())) {
            return Err(Refusal::Misdirected("the request's scheme differs from the connection's"));
        }
        names.push(claimed(authority.as_str(), scheme, dst.port())?);
    }
    for host in hosts {
        let host = host.to_str().map_err(|_| Refusal::Bad("malformed Host header"))?;
        names.push(claimed(host, scheme, dst.port())?);
    }
    match names.split_first() {
        None => Ok(Destination { scheme, host: dst.ip().to_string(), addr: dst }),
        Some((first, rest)) if rest.iter().all(|n| n == first) => {
            Ok(Destination { scheme, host: first.clone(), addr: dst })
        }
        Some(_) => Err(Refusal::Misdirected("the request names more than one host")),
    }
}

/// The host an authority (`Host` value or request-target authority) names, if it is on the
/// dialled port and carries no userinfo.
fn claimed(raw: &str, scheme: Scheme, dialled_port: u16) -> Result<String, Refusal> {
    if raw.contains('@') {
        return Err(Refusal::Bad("userinfo is not allowed in the authority"));
    }
    let authority: http::uri::Authority = raw.parse().map_err(|_| Refusal::Bad("malformed authority"))?;
    let port = match authority.port() {
        Some(port) => port.as_u16(),
        None if authority.as_str().ends_with(':') => return Err(Refusal::Bad("malformed authority")),
        None => scheme.default_port(),
    };
    if port != dialled_port {
        return Err(Refusal::Misdirected("the request names another port than the connection's"));
    }
    normalise(authority.host()).ok_or(Refusal::Bad("malformed authority"))
}

/// A host name compared as DNS compares it: ASCII lowercase, one trailing dot dropped.
fn normalise(name: &str) -> Option<String> {
    let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
    let valid = !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b));
    valid.then_some(name)
}

/// Upstream connections of one guest connection, by host (the address is the connection's).
#[derive(Default)]
struct Upstreams(Mutex<HashMap<String, Sender>>);

#[derive(Clone)]
enum Sender {
    Http1(Arc<Mutex<hyper::client::conn::http1::SendRequest<Body>>>),
    Http2(hyper::client::conn::http2::SendRequest<Body>),
}

/// Serves a guest connection to port 80.
pub(crate) async fn serve_http(shared: Arc<Shared>, dst: SocketAddrV4, stream: Metered) {
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
pub(crate) async fn serve_https(shared: Arc<Shared>, dst: SocketAddrV4, stream: Metered) {
    let Some(ca) = shared.ca.clone() else { return };
    let Ok(start) = tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), stream).await else {
        return;
    };
    let server_name = match start.client_hello().server_name() {
        Some(name) => match normalise(name) {
            Some(name) => name,
            None => return,
        },
        None => dst.ip().to_string(),
    };
    if let Err(refusal) = shared.policy.check_host(&server_name) {
        if let Some(audit) = &shared.audit {
            let ip = dst.ip().to_string();
            audit.record(Record {
                kind: Kind::Http,
                addr: if server_name == ip { String::new() } else { ip },
                host: server_name,
                port: dst.port(),
                scheme: Scheme::Https.name().to_owned(),
                decision: Decision::Blocked,
                reason: refusal.to_string(),
                ..Record::default()
            });
        }
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

/// Why the host refused a request; carried on the response for the event.
#[derive(Debug, Clone)]
struct BlockReason(String);

/// A refusal with `status`; the connection is closed after it.
fn refused(status: StatusCode, reason: &str) -> Response<Body> {
    let body =
        if status == StatusCode::FORBIDDEN { "Blocked by policy".to_owned() } else { format!("matchlock: {reason}\n") };
    let mut response = Response::new(full(body));
    response.extensions_mut().insert(BlockReason(reason.to_owned()));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// The `429` of a spent budget or a rate limit (with `Retry-After`).
fn over_budget(exceeded: &Exceeded) -> Response<Body> {
    let mut response = refused(StatusCode::TOO_MANY_REQUESTS, &exceeded.to_string());
    if let Exceeded::Rate { retry_after, .. } = exceeded {
        response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(*retry_after));
    }
    response
}

/// The `403 Blocked by policy` answer.
fn blocked(reason: &str) -> Response<Body> {
    refused(StatusCode::FORBIDDEN, reason)
}

fn bad_gateway(reason: &str) -> Response<Body> {
    let mut response = Response::new(full(format!("matchlock: upstream unavailable: {reason}")));
    *response.status_mut() = StatusCode::BAD_GATEWAY;
    response
}

fn full(body: impl Into<Bytes>) -> Body {
    Full::new(body.into()).map_err(|never| match never {}).boxed()
}

/// What the audit learns of a request while it is forwarded (it travels in the request's
/// extensions): bytes each way and the secrets substituted.
#[derive(Default)]
struct Tally {
    up: std::sync::atomic::AtomicU64,
    down: std::sync::atomic::AtomicU64,
    secrets: std::sync::Mutex<Vec<String>>,
    /// The first bytes of each body, kept for the record (`--audit-bodies`): (up, down).
    bodies: std::sync::Mutex<(Vec<u8>, Vec<u8>)>,
    /// How many bytes of each body to keep.
    keep: usize,
    /// A body was longer than what was kept.
    cut: std::sync::atomic::AtomicBool,
    /// An upgraded (WebSocket) request's record waits for its relay to end.
    upgrade: std::sync::Mutex<Upgrade>,
}

/// Where an upgraded request's record stands.
#[derive(Default)]
enum Upgrade {
    /// Neither the record nor the relay's end yet.
    #[default]
    Pending,
    /// The record, to write when the relay ends.
    Record(Box<dyn FnOnce() + Send + Sync>),
    /// The relay ended first.
    Ended,
}

impl Tally {
    /// Keeps what fits of `data`, a chunk of the request (`up`) or response body.
    fn keep(&self, up: bool, data: &[u8]) {
        if self.keep == 0 {
            return;
        }
        let mut bodies = self.bodies.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let body = if up { &mut bodies.0 } else { &mut bodies.1 };
        let room = self.keep.saturating_sub(body.len());
        if data.len() > room {
            self.cut.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        body.extend_from_slice(&data[..data.len().min(room)]);
    }

    fn upgrade_state(&self) -> std::sync::MutexGuard<'_, Upgrade> {
        self.upgrade.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Writes `record` once the upgraded connection's relay ended (its bytes counted).
    fn after_relay(&self, record: Box<dyn FnOnce() + Send + Sync>) {
        let mut state = self.upgrade_state();
        if matches!(*state, Upgrade::Ended) {
            drop(state);
            record();
        } else {
            *state = Upgrade::Record(record);
        }
    }

    /// The upgraded connection's relay ended, having carried `up` and `down` bytes.
    fn relay_ended(&self, up: u64, down: u64) {
        self.up.fetch_add(up, std::sync::atomic::Ordering::Relaxed);
        self.down.fetch_add(down, std::sync::atomic::Ordering::Relaxed);
        let previous = std::mem::replace(&mut *self.upgrade_state(), Upgrade::Ended);
        if let Upgrade::Record(record) = previous {
            record();
        }
    }
}

/// A body whose data bytes are added to `counter`; a request body's (`up`) are spent from
/// the egress budget, and the chunk that does not fit ends it with an error (the upstream
/// request is cut). Bytes to the guest are spent on its connection ([`Metered`]). `done` runs
/// when it is dropped (finished, or abandoned by the guest).
struct Counted {
    inner: Body,
    counter: Arc<Tally>,
    up: Option<Arc<crate::budget::Budget>>,
    done: Option<Box<dyn FnOnce() + Send + Sync>>,
}

impl hyper::body::Body for Counted {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        if let std::task::Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(data) = frame.data_ref() {
                let n = data.len() as u64;
                let counter = if self.up.is_some() { &self.counter.up } else { &self.counter.down };
                counter.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
                self.counter.keep(self.up.is_some(), data);
                if let Some(Err(exceeded)) = self.up.as_ref().map(|budget| budget.send(n)) {
                    return std::task::Poll::Ready(Some(Err(Box::new(exceeded))));
                }
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        if let Some(done) = self.done.take() {
            done();
        }
    }
}

/// Proxies one request, reported as a `network` event when someone listens and as an audit
/// record (when the response body ends) when the sandbox keeps one.
async fn proxy(
    shared: &Shared,
    upstreams: &Upstreams,
    scheme: Scheme,
    dst: SocketAddrV4,
    tls_name: Option<&str>,
    mut req: Request<Incoming>,
) -> Response<Body> {
    let decided = decide(scheme, dst, tls_name, &req);
    let started = std::time::Instant::now();
    let time_ms = crate::audit::now_ms();
    let host = match &decided {
        Ok(dest) => dest.authority(),
        Err(_) => tls_name.map_or_else(|| dst.ip().to_string(), str::to_owned),
    };
    let method = req.method().to_string();
    let http_version = format!("{:?}", req.version());
    let path = req.uri().path_and_query().map_or("/", http::uri::PathAndQuery::as_str).to_owned();
    let length = |headers: &HeaderMap| {
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok()).unwrap_or(0)
    };
    let request_bytes = length(req.headers());
    let tally = Arc::new(Tally { keep: shared.audit_bodies, ..Tally::default() });
    req.extensions_mut().insert(tally.clone());
    let response = match decided {
        Ok(dest) => forward(shared, upstreams, &dest, req).await,
        Err(refusal) => refusal.response(),
    };
    let reason = response.extensions().get::<BlockReason>().map(|r| r.0.clone());
    let name = host.split(':').next().unwrap_or_default().to_owned();
    if let Some(events) = &shared.events {
        (events.0)(matchlock_api::rpc::NetworkEvent {
            method: method.clone(),
            url: format!("{}://{host}{path}", scheme.name()),
            host: name.clone(),
            status_code: response.status().as_u16(),
            request_bytes,
            response_bytes: length(response.headers()),
            duration_ms: started.elapsed().as_millis() as u64,
            blocked: reason.is_some(),
            block_reason: reason.clone(),
        });
    }
    let Some(audit) = shared.audit.clone() else { return response };
    let ip = dst.ip().to_string();
    let mut record = Record {
        time_ms,
        kind: Kind::Http,
        addr: if name == ip { String::new() } else { ip },
        host: name,
        port: dst.port(),
        scheme: scheme.name().to_owned(),
        method,
        http_version,
        // The guest's own path (placeholders, never values); query values only when asked.
        path: if shared.audit_bodies > 0 {
            path.chars().take(matchlock_api::audit::MAX_AUDIT_PATH).collect()
        } else {
            matchlock_api::audit::audited_path(&path)
        },
        status: Some(response.status().as_u16()),
        tls_intercepted: scheme == Scheme::Https,
        decision: if reason.is_some() { Decision::Blocked } else { Decision::Allowed },
        reason: reason.unwrap_or_default(),
        ..Record::default()
    };
    let upgraded = response.status() == StatusCode::SWITCHING_PROTOCOLS;
    let (parts, body) = response.into_parts();
    let counter = tally.clone();
    let done = move || {
        use std::sync::atomic::Ordering::Relaxed;
        record.bytes_up = tally.up.load(Relaxed);
        record.bytes_down = tally.down.load(Relaxed);
        record.secrets = std::mem::take(&mut *tally.secrets.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
        if tally.keep > 0 {
            use base64::Engine as _;
            let bodies = tally.bodies.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            record.request_body = base64::engine::general_purpose::STANDARD.encode(&bodies.0);
            record.response_body = base64::engine::general_purpose::STANDARD.encode(&bodies.1);
            record.bodies_cut = tally.cut.load(Relaxed);
        }
        record.duration_ms = started.elapsed().as_millis() as u64;
        audit.record(record);
    };
    if upgraded {
        // Its bytes are the relay's, counted when it ends.
        counter.after_relay(Box::new(done));
        return Response::from_parts(parts, body);
    }
    let body = Counted { inner: body, counter, up: None, done: Some(Box::new(done)) };
    Response::from_parts(parts, body.boxed())
}

/// Whether the guest asks for a WebSocket (the only upgrade relayed; others are dropped and
/// the request is served as plain HTTP/1.1).
fn is_websocket_upgrade<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11
        && req
            .headers()
            .get_all(header::UPGRADE)
            .iter()
            .any(|v| v.to_str().is_ok_and(|v| v.split(',').any(|p| p.trim().eq_ignore_ascii_case("websocket"))))
}

async fn forward(
    shared: &Shared,
    upstreams: &Upstreams,
    dest: &Destination,
    mut req: Request<Incoming>,
) -> Response<Body> {
    if shared.policy.check_host(&dest.host).is_err() {
        return blocked("host not in the allow-list");
    }
    if let Err(exceeded) = shared.budget.take_request(&dest.host) {
        return over_budget(&exceeded);
    }
    let upgrade = is_websocket_upgrade(&req);
    let guest_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    if shared.hooks.before(&dest.host, &mut parts).await.is_err() {
        return blocked("blocked by an interception rule");
    }
    let (method, path, request_headers) = (parts.method.clone(), parts.uri.path().to_owned(), parts.headers.clone());
    let sandbox_secrets = shared.policy.secrets();
    let Ok(injected) = secrets::apply_to_request(&mut parts, &dest.host, &sandbox_secrets) else {
        return blocked("secret placeholder sent to a host the secret is not for");
    };
    let tally = parts.extensions.get::<Arc<Tally>>().cloned();
    if let Some(tally) = &tally {
        *tally.secrets.lock().unwrap_or_else(std::sync::PoisonError::into_inner) =
            injected.iter().map(|s| s.name.clone()).collect();
    }
    // An echoing server could hand a value back a few bytes per request, each piece too
    // short for scrubbing to recognise.
    if !injected.is_empty() && parts.headers.contains_key(header::RANGE) && !shared.policy.secret_ranges_allowed() {
        return blocked("a Range request carrying a secret (allow with --allow-secret-ranges)");
    }
    // Everything this host sends back is scrubbed of the values it may have been given.
    let scrubbed = secrets::for_destination(&dest.host, &sandbox_secrets);
    if !scrubbed.is_empty() {
        parts.headers.insert(header::ACCEPT_ENCODING, HeaderValue::from_static("identity"));
        parts.headers.remove(header::SEC_WEBSOCKET_EXTENSIONS);
    }
    let sender = match upstreams.get(shared, dest).await {
        Ok(sender) => sender,
        Err(UpstreamError::Blocked) => {
            return blocked("address blocked (the host's own, private, reserved or loopback)")
        }
        Err(UpstreamError::Misdirected) => {
            return Refusal::Misdirected("the dialled address is not one of the host's addresses").response()
        }
        Err(UpstreamError::Failed(reason)) => return bad_gateway(&reason),
    };
    let http2 = matches!(sender, Sender::Http2(_));
    let relay_tally = tally.clone();
    let counter = tally.unwrap_or_default();
    let body =
        Counted { inner: body.map_err(BoxError::from).boxed(), counter, up: Some(shared.budget.clone()), done: None };
    let body = body.boxed();
    let upstream_req = rewrite_request(parts, body, dest, http2, upgrade);
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
            upstreams.forget(&dest.host).await;
            return bad_gateway(&e.to_string());
        }
    };
    // A reason phrase the guest would see verbatim: never copied.
    response.extensions_mut().remove::<hyper::ext::ReasonPhrase>();
    // One scrubber for the whole response: headers, body, trailers or WebSocket messages.
    let scrubber = (!scrubbed.is_empty()).then(|| Scrubber::new(&scrubbed));
    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        let Some(guest_upgrade) = guest_upgrade else {
            return bad_gateway("upstream switched protocols without being asked");
        };
        upstreams.forget(&dest.host).await;
        if scrubber.is_some() && response.headers().contains_key(header::SEC_WEBSOCKET_EXTENSIONS) {
            return bad_gateway("upstream WebSocket extensions cannot be scrubbed");
        }
        let upstream_upgrade = hyper::upgrade::on(&mut response);
        let (mut parts, _) = response.into_parts();
        if let Some(scrubber) = &scrubber {
            scrubber.scrub_headers(&mut parts.headers);
        }
        tokio::spawn(async move {
            let mut carried = (0, 0);
            if let (Ok(guest), Ok(upstream)) = (guest_upgrade.await, upstream_upgrade.await) {
                let (mut guest, mut upstream) = (TokioIo::new(guest), TokioIo::new(upstream));
                carried = match scrubber {
                    None => tokio::io::copy_bidirectional(&mut guest, &mut upstream).await.unwrap_or((0, 0)),
                    Some(scrubber) => relay_websocket(guest, upstream, scrubber).await,
                };
            }
            if let Some(tally) = relay_tally {
                tally.relay_ended(carried.0, carried.1);
            }
        });
        return Response::from_parts(parts, full(Bytes::new()));
    }
    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    let mut body = body.map_err(BoxError::from).boxed();
    if let Some(scrubber) = &scrubber {
        scrubber.scrub_headers(&mut parts.headers);
        match decoded(body, &parts.headers) {
            Ok(plain) => body = plain,
            Err(encoding) => return bad_gateway(&format!("a response in {encoding:?} encoding cannot be scrubbed")),
        }
        if parts.headers.remove(header::CONTENT_ENCODING).is_some() {
            parts.headers.remove(header::CONTENT_LENGTH);
        }
    }
    match shared.hooks.after(&dest.host, method.as_str(), &path, &request_headers, &mut parts).await {
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
                    let rewritten = Replacements::new(changes.replacements).apply(&collected);
                    parts.headers.insert(header::CONTENT_LENGTH, HeaderValue::from(rewritten.len()));
                    body = full(rewritten);
                }
            }
        }
    }
    if let Some(scrubber) = scrubber {
        // After the rules too: a rule's headers or body may not bring a value back either.
        scrubber.scrub_headers(&mut parts.headers);
        parts.headers.remove(header::CONTENT_LENGTH);
        body = replace_in_body(body, scrubber);
    }
    Response::from_parts(parts, body)
}

/// The body with its `Content-Encoding` undone (the codings in reverse order), so it can be
/// scrubbed; `Err` names a coding this host cannot decode.
fn decoded(body: Body, headers: &HeaderMap) -> Result<Body, String> {
    use async_compression::tokio::bufread::{BrotliDecoder, GzipDecoder, ZlibDecoder, ZstdDecoder};
    use futures_util::TryStreamExt;
    use tokio::io::{AsyncRead, BufReader};
    let mut codings = Vec::new();
    for value in headers.get_all(header::CONTENT_ENCODING) {
        let value = value.to_str().map_err(|_| "unreadable".to_owned())?;
        for coding in value.split(',').map(|c| c.trim().to_ascii_lowercase()).filter(|c| !c.is_empty()) {
            if coding != "identity" {
                codings.push(coding);
            }
        }
    }
    if codings.is_empty() {
        return Ok(body);
    }
    let stream = body.into_data_stream().map_err(std::io::Error::other);
    let mut reader: Box<dyn AsyncRead + Send + Sync + Unpin> = Box::new(tokio_util::io::StreamReader::new(stream));
    for coding in codings.iter().rev() {
        let buffered = BufReader::new(reader);
        reader = match coding.as_str() {
            "gzip" | "x-gzip" => Box::new(GzipDecoder::new(buffered)),
            "deflate" => Box::new(ZlibDecoder::new(buffered)),
            "br" => Box::new(BrotliDecoder::new(buffered)),
            "zstd" => Box::new(ZstdDecoder::new(buffered)),
            other => return Err(other.to_owned()),
        };
    }
    let frames = tokio_util::io::ReaderStream::new(reader).map_ok(Frame::data).map_err(BoxError::from);
    Ok(BodyExt::boxed(http_body_util::StreamBody::new(frames)))
}

/// A WebSocket whose upstream may echo secret values: both sides are spoken as WebSocket
/// (no extensions: compression was refused), each upstream message is scrubbed whole before
/// it reaches the guest; the guest's messages pass as they are. Messages are bounded.
async fn relay_websocket<G, U>(guest: G, upstream: U, scrubber: Scrubber) -> (u64, u64)
where
    G: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    U: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::WebSocketStream;
    let config = WebSocketConfig::default()
        .max_message_size(Some(MAX_SCRUBBED_MESSAGE))
        .max_frame_size(Some(MAX_SCRUBBED_MESSAGE));
    let guest = WebSocketStream::from_raw_socket(guest, Role::Server, Some(config)).await;
    let upstream = WebSocketStream::from_raw_socket(upstream, Role::Client, Some(config)).await;
    let (mut to_guest, mut from_guest) = guest.split();
    let (mut to_upstream, mut from_upstream) = upstream.split();
    let outbound = async {
        let mut sent = 0u64;
        while let Some(Ok(message)) = from_guest.next().await {
            sent += message.len() as u64;
            if to_upstream.send(message).await.is_err() {
                break;
            }
        }
        let _ = to_upstream.close().await;
        sent
    };
    let inbound = async {
        let mut received = 0u64;
        while let Some(Ok(message)) = from_upstream.next().await {
            let scrub = |data: &[u8]| Bytes::from(scrubber.scrub(data));
            let message = match message {
                Message::Text(text) => match String::from_utf8(scrubber.scrub(text.as_bytes())) {
                    Ok(text) => Message::text(text),
                    Err(_) => break,
                },
                Message::Binary(data) => Message::Binary(scrub(&data)),
                Message::Ping(data) => Message::Ping(scrub(&data)),
                Message::Pong(data) => Message::Pong(scrub(&data)),
                Message::Close(frame) => Message::Close(frame.map(|f| CloseFrame {
                    code: f.code,
                    reason: String::from_utf8(scrubber.scrub(f.reason.as_bytes())).unwrap_or_default().into(),
                })),
                Message::Frame(_) => break,
            };
            received += message.len() as u64;
            if to_guest.send(message).await.is_err() {
                break;
            }
        }
        let _ = to_guest.close().await;
        received
    };
    tokio::join!(outbound, inbound)
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
    ReplacingBody { inner: body, replacer: Box::new(replacer), finished: false, trailers: None }.boxed()
}

struct ReplacingBody {
    inner: Body,
    replacer: Box<dyn BodyTransform>,
    finished: bool,
    /// Trailers waiting behind the released tail.
    trailers: Option<HeaderMap>,
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
                return Poll::Ready(self.trailers.take().map(|t| Ok(Frame::trailers(t))));
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
                    Err(frame) => {
                        // Held-back data goes out before the trailers, which end the stream.
                        let Ok(mut trailers) = frame.into_trailers() else { continue };
                        self.replacer.trailers(&mut trailers);
                        self.finished = true;
                        let tail = self.replacer.finish();
                        if tail.is_empty() {
                            return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                        }
                        self.trailers = Some(trailers);
                        return Poll::Ready(Some(Ok(Frame::data(tail))));
                    }
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

/// The request as the upstream should see it: `Host` (HTTP/1.1, origin-form) or the
/// authority (HTTP/2) written from the decided destination, whatever the guest sent;
/// connection headers dropped (kept for a WebSocket upgrade).
fn rewrite_request(
    mut parts: http::request::Parts,
    body: Body,
    dest: &Destination,
    http2: bool,
    upgrade: bool,
) -> Request<Body> {
    let authority = dest.authority();
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
    let upgrade_headers =
        upgrade.then(|| (parts.headers.get(header::UPGRADE).cloned(), parts.headers.get(header::CONNECTION).cloned()));
    strip_hop_by_hop(&mut parts.headers);
    parts.headers.remove(header::HOST);
    if http2 {
        parts.uri =
            format!("{}://{authority}{path}", dest.scheme.name()).parse().unwrap_or_else(|_| Uri::from_static("/"));
        parts.version = Version::HTTP_2;
    } else {
        if let Ok(v) = HeaderValue::from_str(&authority) {
            parts.headers.insert(header::HOST, v);
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
    Misdirected,
    Failed(String),
}

impl Upstreams {
    async fn get(&self, shared: &Shared, dest: &Destination) -> Result<Sender, UpstreamError> {
        if let Some(sender) = self.0.lock().await.get(&dest.host) {
            let alive = match sender {
                Sender::Http1(s) => !s.lock().await.is_closed(),
                Sender::Http2(s) => !s.is_closed(),
            };
            if alive {
                return Ok(sender.clone());
            }
        }
        let sender = connect(shared, dest).await?;
        self.0.lock().await.insert(dest.host.clone(), sender.clone());
        Ok(sender)
    }

    async fn forget(&self, host: &str) {
        self.0.lock().await.remove(host);
    }
}

/// Whether `ip` is an address of `host`: the literal itself, an answer the sandbox's DNS gave
/// the guest for it, or one the host's own lookup (same servers) finds.
async fn has_address(shared: &Shared, host: &str, ip: Ipv4Addr) -> bool {
    if let Ok(literal) = host.parse::<Ipv4Addr>() {
        return literal == ip;
    }
    if shared.policy.answered(ip, host) {
        return true;
    }
    shared.resolver.lookup_ipv4(host).await.is_ok_and(|ips| ips.contains(&ip))
}

/// Dials what the guest dialled, under the decided name: the address must pass the policy and
/// be one of that name's addresses.
async fn dial(shared: &Shared, dest: &Destination) -> Result<TcpStream, UpstreamError> {
    let ip = *dest.addr.ip();
    if shared.policy.check_address(ip).is_err() {
        return Err(UpstreamError::Blocked);
    }
    if !has_address(shared, &dest.host, ip).await {
        return Err(UpstreamError::Misdirected);
    }
    match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(dest.addr)).await {
        Ok(Ok(stream)) => {
            let _ = stream.set_nodelay(true);
            Ok(stream)
        }
        Ok(Err(e)) => Err(UpstreamError::Failed(e.to_string())),
        Err(_) => Err(UpstreamError::Failed("connect timed out".into())),
    }
}

async fn connect(shared: &Shared, dest: &Destination) -> Result<Sender, UpstreamError> {
    let tcp = dial(shared, dest).await?;
    let failed = |e: &dyn std::fmt::Display| UpstreamError::Failed(e.to_string());
    match dest.scheme {
        Scheme::Http => handshake_http1(TokioIo::new(tcp)).await.map_err(|e| failed(&e)),
        Scheme::Https => {
            let name = ServerName::try_from(dest.host.clone()).map_err(|e| failed(&e))?;
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

#[cfg(test)]
mod tests {
    use super::*;

    const DIALLED: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, 10), 80);
    const DIALLED_TLS: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, 10), 443);

    fn request(version: Version, target: &str, hosts: &[&str]) -> Request<()> {
        let mut builder = Request::builder().version(version).uri(target);
        for host in hosts {
            builder = builder.header(header::HOST, *host);
        }
        builder.body(()).unwrap()
    }

    fn plain(target: &str, hosts: &[&str]) -> Result<Destination, Refusal> {
        decide(Scheme::Http, DIALLED, None, &request(Version::HTTP_11, target, hosts))
    }

    fn tls(sni: &str, version: Version, target: &str, hosts: &[&str]) -> Result<Destination, Refusal> {
        decide(Scheme::Https, DIALLED_TLS, Some(sni), &request(version, target, hosts))
    }

    #[test]
    fn one_destination_from_every_claim() {
        let api = |addr| {
            Ok(Destination {
                scheme: if addr == DIALLED { Scheme::Http } else { Scheme::Https },
                host: "api.test".into(),
                addr,
            })
        };
        assert_eq!(plain("/x", &["api.test"]), api(DIALLED));
        assert_eq!(plain("/x", &["API.Test."]), api(DIALLED), "case and a trailing dot are DNS-equal");
        assert_eq!(plain("/x", &["api.test:80"]), api(DIALLED), "the default port is the dialled one");
        assert_eq!(plain("http://api.test/x", &["api.test"]), api(DIALLED));
        assert_eq!(tls("api.test", Version::HTTP_11, "/x", &["api.test"]), api(DIALLED_TLS));
        assert_eq!(tls("api.test", Version::HTTP_2, "https://api.test/x", &[]), api(DIALLED_TLS));
        assert_eq!(tls("api.test", Version::HTTP_2, "https://api.test:443/x", &["api.test"]), api(DIALLED_TLS));
        let bare = decide(Scheme::Http, DIALLED, None, &request(Version::HTTP_10, "/x", &[])).unwrap();
        assert_eq!(bare.host, "198.51.100.10", "HTTP/1.0 without Host: the dialled address is the name");
        assert_eq!(api(DIALLED_TLS).unwrap().authority(), "api.test");
    }

    #[test]
    fn a_request_naming_another_host_or_port_is_refused() {
        let misdirected = |r: Result<Destination, Refusal>| assert!(matches!(r, Err(Refusal::Misdirected(_))), "{r:?}");
        let bad = |r: Result<Destination, Refusal>| assert!(matches!(r, Err(Refusal::Bad(_))), "{r:?}");
        // Foreign Host behind an approved authority, every shape of it.
        misdirected(tls("api.test", Version::HTTP_11, "/t1", &["evil.test"]));
        misdirected(tls("api.test", Version::HTTP_11, "https://api.test/t1", &["evil.test"]));
        misdirected(plain("http://api.test/t2", &["evil.test"]));
        misdirected(tls("api.test", Version::HTTP_2, "https://api.test/x", &["evil.test"]));
        misdirected(tls("api.test", Version::HTTP_2, "https://evil.test/x", &[]));
        bad(plain("/x", &["api.test", "evil.test"]));
        bad(plain("/x", &["api.test", "api.test"]));
        bad(tls("api.test", Version::HTTP_2, "https://api.test/x", &["api.test", "api.test"]));
        bad(plain("/x", &["evil.test@api.test"]));
        bad(plain("http://user@api.test/x", &["api.test"]));
        // Proxy-form (or Host) to another port than the dialled one.
        misdirected(plain("http://api.test:7779/x", &["api.test:7779"]));
        misdirected(plain("http://api.test:7779/x", &["api.test"]));
        misdirected(plain("/x", &["api.test:7779"]));
        misdirected(tls("api.test", Version::HTTP_11, "/x", &["api.test:80"]));
        misdirected(plain("https://api.test/x", &["api.test"]));
        // HTTP/1.1 needs its one Host; malformed claims; CONNECT.
        bad(plain("/x", &[]));
        bad(plain("/x", &["api.test:"]));
        bad(plain("/x", &["api test"]));
        let connect = Request::builder().method(Method::CONNECT).uri("api.test:443").body(()).unwrap();
        bad(decide(Scheme::Http, DIALLED, None, &connect));
    }

    async fn read_all(body: Body) -> Vec<u8> {
        body.collect().await.unwrap().to_bytes().to_vec()
    }

    #[tokio::test]
    async fn compressed_responses_are_decoded_for_scrubbing() {
        use async_compression::tokio::bufread::{BrotliEncoder, GzipEncoder, ZlibEncoder, ZstdEncoder};
        use tokio::io::AsyncReadExt;
        let plain = b"Authorization: Bearer real-value".repeat(100);
        let mut encoded: Vec<(&str, Vec<u8>)> = Vec::new();
        let mut buf = Vec::new();
        GzipEncoder::new(&plain[..]).read_to_end(&mut buf).await.unwrap();
        encoded.push(("gzip", std::mem::take(&mut buf)));
        ZlibEncoder::new(&plain[..]).read_to_end(&mut buf).await.unwrap();
        encoded.push(("deflate", std::mem::take(&mut buf)));
        BrotliEncoder::new(&plain[..]).read_to_end(&mut buf).await.unwrap();
        encoded.push(("br", std::mem::take(&mut buf)));
        ZstdEncoder::new(&plain[..]).read_to_end(&mut buf).await.unwrap();
        encoded.push(("zstd", std::mem::take(&mut buf)));
        let mut twice = Vec::new();
        GzipEncoder::new(&encoded[3].1[..]).read_to_end(&mut twice).await.unwrap();
        encoded.push(("zstd, gzip", twice));
        for (coding, bytes) in encoded {
            assert_ne!(bytes, plain, "{coding} encodes");
            let mut headers = HeaderMap::new();
            headers.insert(header::CONTENT_ENCODING, HeaderValue::from_str(coding).unwrap());
            let body = decoded(full(bytes), &headers).unwrap_or_else(|e| panic!("{coding}: {e}"));
            assert_eq!(read_all(body).await, plain, "{coding}");
        }
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static("compress"));
        assert_eq!(decoded(full("x"), &headers).err().as_deref(), Some("compress"), "unknown codings are refused");
    }

    #[tokio::test]
    async fn trailers_are_scrubbed_after_the_held_back_tail() {
        let secret = Secret::new("K", "real-value", vec!["api.test".into()]);
        let mut trailers = HeaderMap::new();
        trailers.insert("x-echo", HeaderValue::from_static("real-value"));
        let frames: Vec<Result<Frame<Bytes>, BoxError>> =
            vec![Ok(Frame::data(Bytes::from_static(b"tail real-"))), Ok(Frame::trailers(trailers))];
        let body = BodyExt::boxed(http_body_util::StreamBody::new(futures_util::stream::iter(frames)));
        let collected = replace_in_body(body, Scrubber::new(&[&secret])).collect().await.unwrap();
        let trailers = collected.trailers().cloned().expect("trailers kept");
        assert_eq!(trailers["x-echo"], secret.placeholder.as_str());
        assert_eq!(collected.to_bytes(), Bytes::from_static(b"tail real-"));
    }
}
