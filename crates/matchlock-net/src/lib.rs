//! The sandbox's network, one engine for every VMM: guest Ethernet frames enter a userspace
//! TCP/IP stack on the host ([`stack`]), and every flow is re-originated by the host under the
//! sandbox's [`policy`]: HTTP and HTTPS through the intercepting proxy ([`http`], with the
//! sandbox [`ca`] and [`secrets`]), DNS answered by the host ([`dns`]), other TCP spliced to a
//! host socket when allowed. No root, no TAP, no firewall rules: nothing on the host changes.
#![forbid(unsafe_code)]

pub mod audit;
pub mod budget;
pub mod ca;
pub mod dns;
pub mod hooks;
mod http;
pub mod policy;
pub mod secrets;
pub mod stack;

use std::net::{IpAddr, Ipv4Addr, SocketAddrV4};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::Semaphore;

use matchlock_api::audit::{Decision, Kind, Record};

pub use ca::CertAuthority;
pub use policy::Policy;
use stack::{FlowHandler, Stack, StackConfig, UdpReply};

/// Errors starting the network.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The upstream CA file cannot be read.
    #[error("cannot read upstream CA bundle {path}")]
    UpstreamCa {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    /// rustls rejected the trust store.
    #[error("cannot build the upstream TLS configuration")]
    Tls(#[from] rustls::Error),
    /// The engine's thread or runtime could not start.
    #[error("cannot start the network engine")]
    Start(#[source] std::io::Error),
    /// The network namespace to connect from cannot be opened or joined.
    #[error("cannot enter the network namespace {}", .0.display())]
    Namespace(std::path::PathBuf, #[source] std::io::Error),
}

/// Guest addressing (the same for every sandbox: each has its own stack, nothing is shared).
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(192, 168, 100, 1);
/// The guest's address.
pub const GUEST: Ipv4Addr = Ipv4Addr::new(192, 168, 100, 2);
/// Prefix length of the guest link.
pub const PREFIX_LEN: u8 = 24;

/// How one sandbox's network behaves.
#[derive(Debug)]
pub struct Options {
    /// Allow-list, private-address blocking and secrets.
    pub policy: Arc<Policy>,
    /// HTTP/TLS interception (otherwise TCP is spliced through, UDP forwarded).
    pub intercept: bool,
    /// The sandbox CA (required for interception).
    pub ca: Option<Arc<CertAuthority>>,
    /// Upstream name servers.
    pub dns_servers: Vec<IpAddr>,
    /// Guest NIC MTU.
    pub mtu: usize,
    /// The gateway's MAC.
    pub gateway_mac: [u8; 6],
    /// Trust for upstream TLS.
    pub upstream_tls: Arc<rustls::ClientConfig>,
    /// Request/response rules.
    pub hooks: hooks::Hooks,
    /// Receives one `network` event per intercepted HTTP request.
    pub events: Option<EventSink>,
    /// Receives an audit record per HTTP request, TCP flow, UDP exchange and DNS question.
    pub audit: Option<audit::Audit>,
    /// The budgets and rate limits the flows spend from.
    pub budget: Arc<budget::Budget>,
    /// Bytes of each intercepted body (and the query values) audit records keep; 0: none.
    pub audit_bodies: usize,
}

/// Where `network` events go (the JSON-RPC `event` notification).
#[derive(Clone)]
pub struct EventSink(pub Arc<dyn Fn(matchlock_api::rpc::NetworkEvent) + Send + Sync>);

impl std::fmt::Debug for EventSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EventSink")
    }
}

/// The upstream TLS configuration: the host's trust store plus, for private CAs, a PEM bundle.
pub fn upstream_tls_config(extra_ca: Option<&Path>) -> Result<rustls::ClientConfig, NetError> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    roots.add_parsable_certificates(native.certs);
    if let Some(path) = extra_ca {
        let certs = rustls_pki_types::CertificateDer::pem_file_iter(path)
            .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
            .map_err(|source| NetError::UpstreamCa { path: path.display().to_string(), source })?;
        roots.add_parsable_certificates(certs);
    }
    let mut config = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// State shared by every flow of one sandbox.
pub(crate) struct Shared {
    policy: Arc<Policy>,
    resolver: dns::Resolver,
    ca: Option<Arc<CertAuthority>>,
    upstream_tls: Arc<rustls::ClientConfig>,
    intercept: bool,
    hooks: hooks::Hooks,
    udp_flows: Arc<Semaphore>,
    events: Option<EventSink>,
    audit: Option<audit::Audit>,
    budget: Arc<budget::Budget>,
    audit_bodies: usize,
}

/// How long dialling an upstream may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on concurrent forwarded UDP exchanges (DNS included).
const MAX_UDP_FLOWS: usize = 64;
/// How long a forwarded UDP exchange waits for answers.
const UDP_IDLE: Duration = Duration::from_secs(30);

/// Where one sandbox's guest flows go: DNS answered, HTTP(S) intercepted, other TCP spliced and
/// UDP forwarded, each under the sandbox's policy. The [`Stack`] hands it every flow; the fuzz
/// targets drive it directly.
#[derive(Clone)]
pub struct Flows(Arc<Shared>);

impl std::fmt::Debug for Flows {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Flows").field("intercept", &self.0.intercept).finish_non_exhaustive()
    }
}

impl Flows {
    /// The flow handler of a sandbox with `options` (its network settings).
    pub fn new(options: Options) -> Self {
        Self(Arc::new(Shared {
            policy: options.policy,
            resolver: dns::Resolver::new(&options.dns_servers),
            ca: options.ca,
            upstream_tls: options.upstream_tls,
            intercept: options.intercept,
            hooks: options.hooks,
            udp_flows: Arc::new(Semaphore::new(MAX_UDP_FLOWS)),
            events: options.events,
            audit: options.audit,
            budget: options.budget,
            audit_bodies: options.audit_bodies,
        }))
    }
}

impl FlowHandler for Flows {
    fn accept_tcp(&self, dst: SocketAddrV4) -> bool {
        let shared = &self.0;
        let intercepted = shared.intercept && matches!(dst.port(), 80 | 443);
        let checked = match dst.port() {
            53 => return true,
            _ if intercepted => Ok(()),
            _ if shared.intercept => shared.policy.check_passthrough(*dst.ip()).map_err(|e| e.to_string()),
            _ => shared.policy.check_address(*dst.ip()).map_err(|e| e.to_string()),
        };
        let checked = checked.and_then(|()| shared.budget.take_connection(!intercepted).map_err(|e| e.to_string()));
        if let Err(refusal) = &checked {
            shared.audit_flow(
                dst,
                Record { kind: Kind::Tcp, decision: Decision::Blocked, reason: refusal.clone(), ..Record::default() },
            );
        }
        checked.is_ok()
    }

    fn tcp(&self, _src: SocketAddrV4, dst: SocketAddrV4, stream: DuplexStream) {
        let shared = self.0.clone();
        tokio::spawn(async move {
            if dst.port() == 53 {
                return dns_over_tcp(&shared, stream).await;
            }
            // Every byte to the guest is spent from the ingress budget, headers and TLS
            // included; from the guest, every byte of a spliced flow and the request bodies of
            // intercepted ones (their heads are read, so that a spent budget is answered 429).
            let intercepted = shared.intercept && matches!(dst.port(), 80 | 443);
            let mut guest = Metered {
                inner: stream,
                budget: shared.budget.clone(),
                meter_reads: !intercepted,
                up: 0,
                down: 0,
                over: None,
                // A spliced flow's first bytes, for the TLS server name they may ask for.
                hello: (!intercepted).then(Vec::new),
            };
            match dst.port() {
                80 if shared.intercept => http::serve_http(shared, dst, guest).await,
                443 if shared.intercept => http::serve_https(shared, dst, guest).await,
                _ => {
                    let time_ms = audit::now_ms();
                    let reason = match splice(dst, &mut guest).await {
                        Ok(_) => String::new(),
                        Err(e) => format!("ended: {e}"),
                    };
                    let sni = guest.hello.as_deref().and_then(client_hello_server_name).unwrap_or_default();
                    let (bytes_up, bytes_down) = (guest.up, guest.down);
                    let record =
                        Record { kind: Kind::Tcp, time_ms, reason, sni, bytes_up, bytes_down, ..Record::default() };
                    shared.audit_flow(dst, record);
                }
            }
        });
    }

    fn udp(&self, src: SocketAddrV4, dst: SocketAddrV4, payload: Vec<u8>, reply: UdpReply) {
        let shared = self.0.clone();
        let Ok(permit) = shared.udp_flows.clone().try_acquire_owned() else { return };
        if dst.port() == 53 {
            tokio::spawn(async move {
                if let Some(answer) = answer_dns(&shared, &payload).await {
                    reply.send(dst, src, answer);
                }
                drop(permit);
            });
            return;
        }
        let refusal = match shared.policy.check_address(*dst.ip()) {
            // Interception allows only DNS over UDP.
            Ok(()) if shared.intercept => Some("UDP other than DNS is refused under interception".to_owned()),
            Ok(()) => shared.budget.send(payload.len() as u64).err().map(|e| e.to_string()),
            Err(refusal) => Some(refusal.to_string()),
        };
        if let Some(reason) = refusal {
            let bytes_up = payload.len() as u64;
            let record = Record { kind: Kind::Udp, decision: Decision::Blocked, reason, bytes_up, ..Record::default() };
            shared.audit_flow(dst, record);
            return;
        }
        // Without interception the guest has plain UDP egress.
        tokio::spawn(async move {
            let time_ms = audit::now_ms();
            let (reason, bytes) = match forward_udp(src, dst, &payload, &reply, &shared.budget).await {
                Ok((down, None)) => (String::new(), (payload.len() as u64, down)),
                Ok((down, Some(exceeded))) => (format!("ended: {exceeded}"), (payload.len() as u64, down)),
                Err(e) => (format!("upstream: {e}"), (payload.len() as u64, 0)),
            };
            let (bytes_up, bytes_down) = bytes;
            shared.audit_flow(
                dst,
                Record { kind: Kind::Udp, time_ms, reason, bytes_up, bytes_down, ..Record::default() },
            );
            drop(permit);
        });
    }
}

impl Shared {
    /// Records a TCP or UDP flow to `dst`, named by what the sandbox's DNS answered for its
    /// address; `record.time_ms` 0 (a refusal) is now, else the duration runs from it.
    fn audit_flow(&self, dst: SocketAddrV4, mut record: Record) {
        let Some(audit) = &self.audit else { return };
        let addr = dst.ip().to_string();
        (record.host, record.addr) = match self.policy.name_of(*dst.ip()) {
            Some(name) => (name, addr),
            None => (addr, String::new()),
        };
        record.port = dst.port();
        if record.time_ms != 0 {
            record.duration_ms = audit::now_ms().saturating_sub(record.time_ms);
        }
        audit.record(record);
    }
}

/// At most this many of a spliced flow's first bytes are kept to look for a TLS ClientHello.
const HELLO_BYTES: usize = 16 << 10;

/// The server name a TLS ClientHello at the start of `bytes` asks for (parsed by rustls).
fn client_hello_server_name(bytes: &[u8]) -> Option<String> {
    let mut acceptor = rustls::server::Acceptor::default();
    let mut rest = bytes;
    while !rest.is_empty() {
        if acceptor.read_tls(&mut rest).ok()? == 0 {
            return None;
        }
        match acceptor.accept() {
            Ok(Some(accepted)) => return accepted.client_hello().server_name().map(str::to_owned),
            Ok(None) => {}
            Err(_) => return None,
        }
    }
    None
}

/// Sends one datagram and relays the answers until [`UDP_IDLE`] passes without one or the
/// ingress budget is spent; the bytes received, and the budget that ended it.
async fn forward_udp(
    src: SocketAddrV4,
    dst: SocketAddrV4,
    payload: &[u8],
    reply: &UdpReply,
    budget: &budget::Budget,
) -> std::io::Result<(u64, Option<budget::Exceeded>)> {
    let socket = UdpSocket::bind("0.0.0.0:0").await?;
    socket.connect(dst).await?;
    socket.send(payload).await?;
    let mut buf = vec![0u8; 65_536];
    let mut received = 0;
    while let Ok(Ok(n)) = tokio::time::timeout(UDP_IDLE, socket.recv(&mut buf)).await {
        received += n as u64;
        if let Err(exceeded) = budget.receive(n as u64) {
            return Ok((received, Some(exceeded)));
        }
        reply.send(dst, src, buf[..n].to_vec());
    }
    Ok((received, None))
}

/// A guest DNS query's answer: once a byte budget is spent, `REFUSED` (recorded) for a name
/// not answered before (a known one still resolves, so that its requests get the 429 that
/// says why); else the resolver's under the policy (when intercepting).
async fn answer_dns(shared: &Shared, query: &[u8]) -> Option<Vec<u8>> {
    if let Err(exceeded) = shared.budget.bytes_left() {
        let (answer, name) = dns::refuse(query)?;
        if shared.intercept && shared.policy.has_answered(&name) {
            let policy = Some(&*shared.policy);
            return dns::answer_guest(query, &shared.resolver, policy, shared.audit.as_ref()).await;
        }
        if let Some(audit) = &shared.audit {
            audit.record(Record {
                kind: Kind::Dns,
                host: name,
                answer: "REFUSED".into(),
                decision: Decision::Blocked,
                reason: exceeded.to_string(),
                ..Record::default()
            });
        }
        return Some(answer);
    }
    let policy = shared.intercept.then_some(&*shared.policy);
    dns::answer_guest(query, &shared.resolver, policy, shared.audit.as_ref()).await
}

async fn dns_over_tcp(shared: &Shared, mut stream: DuplexStream) {
    loop {
        let Ok(len) = stream.read_u16().await else { return };
        let mut query = vec![0u8; usize::from(len)];
        if stream.read_exact(&mut query).await.is_err() {
            return;
        }
        let Some(answer) = answer_dns(shared, &query).await else { return };
        let Ok(len) = u16::try_from(answer.len()) else { return };
        if stream.write_u16(len).await.is_err() || stream.write_all(&answer).await.is_err() {
            return;
        }
    }
}

/// Non-HTTP TCP: a host socket to the destination, bytes both ways, half-close passed on.
async fn splice(dst: SocketAddrV4, guest: &mut Metered) -> std::io::Result<(u64, u64)> {
    let mut upstream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(dst))
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    let _ = upstream.set_nodelay(true);
    tokio::io::copy_bidirectional(guest, &mut upstream).await
}

/// The guest's end of a TCP flow: what is read from it (the guest's bytes) is spent from the
/// egress budget (when `meter_reads`), what is written to it from the ingress one. The chunk that does not fit
/// ends the flow: one read from the guest is dropped, one write to it is the last (what was
/// written before still reaches the guest, then the connection ends).
pub(crate) struct Metered {
    inner: DuplexStream,
    budget: Arc<budget::Budget>,
    /// Whether reads are spent from the egress budget.
    meter_reads: bool,
    /// Bytes from the guest.
    up: u64,
    /// Bytes to the guest.
    down: u64,
    /// The budget that ended the flow.
    over: Option<budget::Exceeded>,
    /// The first [`HELLO_BYTES`] from the guest, when kept.
    hello: Option<Vec<u8>>,
}

impl Metered {
    fn ended(&self) -> Option<std::io::Error> {
        self.over.as_ref().map(|e| std::io::Error::other(e.clone()))
    }
}

impl tokio::io::AsyncRead for Metered {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if let Some(e) = self.ended() {
            return std::task::Poll::Ready(Err(e));
        }
        let before = buf.filled().len();
        std::task::ready!(std::pin::Pin::new(&mut self.inner).poll_read(cx, buf))?;
        let n = (buf.filled().len() - before) as u64;
        self.up += n;
        let read = &buf.filled()[before..];
        if let Some(hello) = self.hello.as_mut().filter(|h| h.len() < HELLO_BYTES) {
            hello.extend_from_slice(&read[..read.len().min(HELLO_BYTES - hello.len())]);
        }
        if !self.meter_reads {
            return std::task::Poll::Ready(Ok(()));
        }
        if let Err(exceeded) = self.budget.send(n) {
            // Not passed on: the upstream never gets more than the budget.
            self.over = Some(exceeded.clone());
            return std::task::Poll::Ready(Err(std::io::Error::other(exceeded)));
        }
        std::task::Poll::Ready(Ok(()))
    }
}

impl tokio::io::AsyncWrite for Metered {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        if let Some(e) = self.ended() {
            return std::task::Poll::Ready(Err(e));
        }
        let n = std::task::ready!(std::pin::Pin::new(&mut self.inner).poll_write(cx, buf))?;
        self.down += n as u64;
        if let Err(exceeded) = self.budget.receive(n as u64) {
            self.over = Some(exceeded);
        }
        std::task::Poll::Ready(Ok(n))
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A running network engine (its own thread and runtime). Dropping it stops the engine.
#[derive(Debug)]
pub struct Engine {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Engine {
    /// Starts the engine: it accepts the VMM's frame connection on `listener` and serves it
    /// until the VMM goes away or the engine is dropped. With `netns`, the engine's thread
    /// joins that network namespace first: every socket it opens upstream (TCP, UDP, DNS,
    /// TLS) is that namespace's. The engine runs on that one thread only.
    pub fn start(listener: UnixListener, options: Options, netns: Option<&Path>) -> Result<Self, NetError> {
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(NetError::Start)?;
        let netns_path = netns.map(Path::to_owned);
        let netns = netns
            .map(|path| std::fs::File::open(path).map_err(|e| NetError::Namespace(path.to_owned(), e)))
            .transpose()?;
        let (joined_tx, joined) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("matchlock-net".into())
            .spawn(move || {
                if let Some(ns) = netns {
                    let joined = nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET);
                    let failed = joined.is_err();
                    let _ = joined_tx.send(joined.map_err(std::io::Error::from));
                    if failed {
                        return;
                    }
                } else {
                    let _ = joined_tx.send(Ok(()));
                }
                runtime.block_on(async move {
                    tokio::select! {
                        _ = serve(listener, options) => {}
                        _ = stopped => {}
                    }
                });
                runtime.shutdown_background();
            })
            .map_err(NetError::Start)?;
        let joined = joined.recv().unwrap_or_else(|_| Err(std::io::Error::other("the network thread ended")));
        if let Err(e) = joined {
            let _ = thread.join();
            return Err(NetError::Namespace(netns_path.unwrap_or_default(), e));
        }
        Ok(Self { stop: Some(stop), thread: Some(thread) })
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn serve(listener: UnixListener, options: Options) {
    let listener = match listener.set_nonblocking(true).and_then(|()| tokio::net::UnixListener::from_std(listener)) {
        Ok(listener) => listener,
        Err(e) => return tracing::error!("network: cannot listen for the VMM: {e}"),
    };
    let link = match listener.accept().await {
        Ok((link, _)) => link,
        Err(e) => return tracing::error!("network: the VMM's link failed: {e}"),
    };
    drop(listener);
    let config = StackConfig {
        gateway: GATEWAY,
        guest: GUEST,
        prefix_len: PREFIX_LEN,
        mtu: options.mtu,
        gateway_mac: options.gateway_mac,
    };
    match Stack::new(link, Flows::new(options), config).run().await {
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => tracing::debug!("network: the VMM closed the link"),
        Err(e) => tracing::warn!("network: the engine stopped: {e}"),
        Ok(()) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_hellos_server_name_is_read_and_anything_else_is_not() {
        let config = upstream_tls_config(None).expect("TLS config");
        let name = rustls::pki_types::ServerName::try_from("spliced.example.test").unwrap();
        let mut client = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
        let mut hello = Vec::new();
        client.write_tls(&mut hello).unwrap();
        assert_eq!(client_hello_server_name(&hello).as_deref(), Some("spliced.example.test"));
        // Split across reads, as the guest may send it.
        assert_eq!(client_hello_server_name(&hello[..hello.len() / 2]), None, "a cut hello names nothing");
        assert_eq!(client_hello_server_name(b"SSH-2.0-OpenSSH_9.2\r\n"), None);
        assert_eq!(client_hello_server_name(b""), None);
    }
}
