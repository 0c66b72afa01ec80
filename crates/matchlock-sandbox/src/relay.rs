//! The exec relay: a Unix socket (`<vm dir>/exec.sock`) through which other processes
//! reach the guest of a sandbox this process owns.
//!
//! A client writes `CONNECT <port>\n` — the same handshake as the hybrid vsock — and,
//! once the owner answers `OK <port>\n`, speaks the guest protocol of that port; the
//! owner splices bytes both ways. Only the exec, echo and port-forward ports are reachable.
//! `ALLOW ADD <h1,h2>\n` and `ALLOW DEL <h1,h2>\n` change the network allow-list and are
//! answered with one JSON line ([`AllowListReply`]); `SNAPSHOT <name>\n` saves the sandbox
//! and is answered with one JSON line ([`SnapshotReply`]); `LIMITS [<json>]\n` sets the
//! network budgets (a `NetworkLimits` object) when given, and is answered with the limits and
//! what was spent ([`LimitsReply`]); `STATS\n` is answered with the sandbox's resource use
//! ([`crate::stats::Stats`]). The socket is created with mode 0600:
//! only the sandbox's user may use it.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use matchlock_api::paths::VmDir;
use matchlock_vm::Connector;

use std::sync::Arc;

use matchlock_protocol::{ECHO_PORT, EXEC_PORT, FORWARD_PORT};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::network::Network;
use crate::{io_err, SandboxError};

/// The answer to an allow-list change.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AllowListReply {
    /// The allow-list after the change.
    pub allowed_hosts: Vec<String>,
    /// Hosts that were added.
    pub added: Vec<String>,
    /// Hosts that were removed.
    pub removed: Vec<String>,
    /// Why the change could not be made.
    pub error: Option<String>,
}

/// The answer to a limits request.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LimitsReply {
    /// The limits in force (after the change).
    pub limits: matchlock_api::config::NetworkLimits,
    /// What the sandbox spent so far.
    pub usage: matchlock_net::budget::Usage,
    /// Why the change could not be made.
    pub error: Option<String>,
}

/// The answer to a snapshot request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapshotReply {
    /// The snapshot, once saved.
    pub snapshot: Option<crate::snapshot::SnapshotMeta>,
    /// Why it was not.
    pub error: Option<String>,
}

/// Takes snapshots of the relay's sandbox.
#[derive(Clone)]
pub struct Snapshots {
    machine: matchlock_vm::Snapshotter,
    template: crate::snapshot::SnapshotMeta,
}

impl std::fmt::Debug for Snapshots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshots").field("source", &self.template.source).finish_non_exhaustive()
    }
}

impl Snapshots {
    /// Snapshots through `machine`, described by `template` but for the name.
    pub(crate) fn new(machine: matchlock_vm::Snapshotter, template: crate::snapshot::SnapshotMeta) -> Self {
        Self { machine, template }
    }

    async fn take(&self, name: &str) -> SnapshotReply {
        match crate::snapshot::take(&self.machine, self.template.clone(), name).await {
            Ok(meta) => SnapshotReply { snapshot: Some(meta), error: None },
            Err(e) => {
                let mut chain = e.to_string();
                let mut cause = std::error::Error::source(&e);
                while let Some(c) = cause {
                    chain.push_str(&format!(": {c}"));
                    cause = c.source();
                }
                SnapshotReply { snapshot: None, error: Some(chain) }
            }
        }
    }
}

/// Saves the sandbox in `vm_dir` as snapshot `name`, through its relay.
pub async fn snapshot(vm_dir: &VmDir, name: &str) -> Result<crate::snapshot::SnapshotMeta, SandboxError> {
    let path = vm_dir.exec_socket();
    let relay_err = |e: std::io::Error| {
        SandboxError::Relay(format!("cannot reach the sandbox's exec relay {}: {e}", path.display()))
    };
    let mut stream = UnixStream::connect(&path).await.map_err(relay_err)?;
    stream.write_all(format!("SNAPSHOT {name}\n").as_bytes()).await.map_err(relay_err)?;
    let mut line = String::new();
    BufReader::new(stream).take(1024 * 1024).read_line(&mut line).await.map_err(relay_err)?;
    let reply: SnapshotReply = serde_json::from_str(&line)
        .map_err(|e| SandboxError::Relay(format!("bad snapshot reply from the sandbox: {e}")))?;
    match (reply.snapshot, reply.error) {
        (Some(meta), None) => Ok(meta),
        (_, error) => Err(SandboxError::Relay(error.unwrap_or_else(|| "the snapshot failed".into()))),
    }
}

/// Ports a relay client may reach.
const RELAYED_PORTS: [u32; 3] = [EXEC_PORT, ECHO_PORT, FORWARD_PORT];

/// Binds the relay socket and serves it until the returned task is aborted.
pub(crate) fn serve(
    vm_dir: &VmDir,
    guest: Connector,
    network: Option<Arc<Network>>,
    snapshots: Snapshots,
    stats: crate::stats::Source,
) -> Result<tokio::task::JoinHandle<()>, SandboxError> {
    let path = vm_dir.exec_socket();
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).map_err(io_err(format!("cannot listen on {}", path.display())))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .map_err(io_err(format!("cannot restrict {}", path.display())))?;
    Ok(tokio::spawn(async move {
        let mut backoff = AcceptBackoff::default();
        loop {
            let (client, _) = backoff.accept("the exec relay", || listener.accept()).await;
            let guest = guest.clone();
            let network = network.clone();
            let snapshots = snapshots.clone();
            let stats = stats.clone();
            tokio::spawn(async move {
                let _ = splice(client, &guest, network.as_deref(), &snapshots, &stats).await;
            });
        }
    }))
}

fn change_allow_list(network: Option<&Network>, request: &str) -> AllowListReply {
    let mut reply = AllowListReply { allowed_hosts: Vec::new(), added: Vec::new(), removed: Vec::new(), error: None };
    let Some(network) = network.filter(|n| n.intercepts) else {
        reply.error = Some("allow-list updates unavailable: sandbox was started without network interception".into());
        return reply;
    };
    let (op, hosts) = request.split_once(' ').unwrap_or((request, ""));
    let hosts: Vec<String> = hosts.split(',').map(str::trim).filter(|h| !h.is_empty()).map(str::to_owned).collect();
    match op {
        "ADD" => reply.added = network.policy.add_hosts(&hosts),
        "DEL" => reply.removed = network.policy.remove_hosts(&hosts),
        _ => reply.error = Some(format!("unknown allow-list operation {op:?}")),
    }
    reply.allowed_hosts = network.policy.allowed_hosts();
    reply
}

fn change_limits(network: Option<&Network>, request: &str) -> LimitsReply {
    let Some(network) = network else {
        return LimitsReply {
            limits: Default::default(),
            usage: Default::default(),
            error: Some("the sandbox has no network".into()),
        };
    };
    let error = (!request.is_empty())
        .then(|| serde_json::from_str(request).map(|limits| network.budget.set(limits)).err())
        .flatten()
        .map(|e| format!("invalid limits: {e}"));
    LimitsReply { limits: network.budget.limits(), usage: network.budget.usage(), error }
}

async fn splice(
    client: UnixStream,
    guest: &Connector,
    network: Option<&Network>,
    snapshots: &Snapshots,
    stats: &crate::stats::Source,
) -> std::io::Result<()> {
    let mut client = BufReader::new(client);
    let mut line = String::new();
    let read = tokio::time::timeout(Duration::from_secs(5), (&mut client).take(64 * 1024).read_line(&mut line)).await;
    if let Some(request) = line.strip_prefix("ALLOW ") {
        let reply = change_allow_list(network, request.trim_end());
        let mut json = serde_json::to_vec(&reply).expect("reply serializes");
        json.push(b'\n');
        return client.get_mut().write_all(&json).await;
    }
    if line.trim_end() == "STATS" {
        let mut json = serde_json::to_vec(&stats.collect().await).expect("stats serialize");
        json.push(b'\n');
        return client.get_mut().write_all(&json).await;
    }
    if let Some(request) = line.strip_prefix("LIMITS") {
        let reply = change_limits(network, request.trim());
        let mut json = serde_json::to_vec(&reply).expect("reply serializes");
        json.push(b'\n');
        return client.get_mut().write_all(&json).await;
    }
    if let Some(name) = line.strip_prefix("SNAPSHOT ") {
        let reply = snapshots.take(name.trim_end()).await;
        let mut json = serde_json::to_vec(&reply).expect("reply serializes");
        json.push(b'\n');
        return client.get_mut().write_all(&json).await;
    }
    let port = match read {
        Ok(Ok(_)) => line.strip_prefix("CONNECT ").and_then(|p| p.trim_end().parse::<u32>().ok()),
        _ => None,
    };
    let Some(port) = port.filter(|p| RELAYED_PORTS.contains(p)) else {
        client.get_mut().write_all(b"ERR unsupported request\n").await?;
        return Ok(());
    };
    // Bytes the client sent right behind the handshake (an exec request) are already
    // buffered: they go with the guest connection's Open.
    let buffered = client.buffer().to_vec();
    if port == EXEC_PORT && starts_a_command(&buffered) {
        stats.execs.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    let mut guest = match guest(port, buffered).await {
        Ok(g) => g,
        Err(e) => {
            client.get_mut().write_all(format!("ERR {e}\n").as_bytes()).await?;
            return Ok(());
        }
    };
    client.get_mut().write_all(format!("OK {port}\n").as_bytes()).await?;
    let mut client = client.into_inner();
    tokio::io::copy_bidirectional(&mut client, &mut guest).await?;
    Ok(())
}

/// Whether `bytes` begin with an exec request frame (a command, not a file request).
fn starts_a_command(bytes: &[u8]) -> bool {
    let Some(header) = bytes.get(..matchlock_protocol::frame::HEADER_LEN) else { return false };
    let header: [u8; matchlock_protocol::frame::HEADER_LEN] = header.try_into().expect("sliced to its length");
    matchlock_protocol::frame::parse_header(header)
        .is_ok_and(|(kind, _)| matchlock_protocol::exec::ExecMode::from_frame_type(kind).is_some())
}

/// The resource use of the sandbox in `vm_dir`, read by its owner (through its relay).
pub async fn stats(vm_dir: &VmDir) -> Result<crate::stats::Stats, SandboxError> {
    let path = vm_dir.exec_socket();
    let relay_err = |e: std::io::Error| {
        SandboxError::Relay(format!("cannot reach the sandbox's exec relay {}: {e}", path.display()))
    };
    let mut stream = UnixStream::connect(&path).await.map_err(relay_err)?;
    stream.write_all(b"STATS\n").await.map_err(relay_err)?;
    let mut line = String::new();
    BufReader::new(stream).take(1024 * 1024).read_line(&mut line).await.map_err(relay_err)?;
    serde_json::from_str(&line).map_err(|e| SandboxError::Relay(format!("bad stats reply from the sandbox: {e}")))
}

/// Changes the allow-list of the sandbox in `vm_dir` through its relay (`add` or delete).
pub async fn allow_list(vm_dir: &VmDir, add: bool, hosts: &[String]) -> Result<AllowListReply, SandboxError> {
    let path = vm_dir.exec_socket();
    let relay_err = |e: std::io::Error| {
        SandboxError::Relay(format!("cannot reach the sandbox's exec relay {}: {e}", path.display()))
    };
    let mut stream = UnixStream::connect(&path).await.map_err(relay_err)?;
    let op = if add { "ADD" } else { "DEL" };
    stream.write_all(format!("ALLOW {op} {}\n", hosts.join(",")).as_bytes()).await.map_err(relay_err)?;
    let mut line = String::new();
    BufReader::new(stream).take(1024 * 1024).read_line(&mut line).await.map_err(relay_err)?;
    serde_json::from_str(&line).map_err(|e| SandboxError::Relay(format!("bad allow-list reply from the sandbox: {e}")))
}

/// Reads, and with `limits` replaces, the network budgets of the sandbox in `vm_dir` through
/// its relay.
pub async fn limits(
    vm_dir: &VmDir,
    limits: Option<&matchlock_api::config::NetworkLimits>,
) -> Result<LimitsReply, SandboxError> {
    let path = vm_dir.exec_socket();
    let relay_err = |e: std::io::Error| {
        SandboxError::Relay(format!("cannot reach the sandbox's exec relay {}: {e}", path.display()))
    };
    let mut stream = UnixStream::connect(&path).await.map_err(relay_err)?;
    let request = match limits {
        Some(limits) => format!("LIMITS {}\n", serde_json::to_string(limits).expect("limits serialize")),
        None => "LIMITS\n".to_owned(),
    };
    stream.write_all(request.as_bytes()).await.map_err(relay_err)?;
    let mut line = String::new();
    BufReader::new(stream).take(1024 * 1024).read_line(&mut line).await.map_err(relay_err)?;
    serde_json::from_str(&line).map_err(|e| SandboxError::Relay(format!("bad limits reply from the sandbox: {e}")))
}

/// Relays `client` to `127.0.0.1:<port>` inside the guest of the sandbox in `vm_dir`, each
/// direction's end passed on as a half-close (chunked, see [`FORWARD_PORT`]).
pub async fn forward<S>(vm_dir: &VmDir, port: u16, client: S) -> Result<(), SandboxError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let guest = open_forward(vm_dir, port).await?;
    let (mut guest_reader, mut guest_writer) = guest.into_split();
    let (mut client_reader, mut client_writer) = tokio::io::split(client);
    let to_guest = async {
        let mut buf = vec![0u8; matchlock_protocol::FORWARD_MAX_CHUNK];
        loop {
            let n = client_reader.read(&mut buf).await.unwrap_or(0);
            let header = u32::try_from(n).unwrap_or(0).to_be_bytes();
            if guest_writer.write_all(&header).await.is_err() || n == 0 {
                break;
            }
            if guest_writer.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
    };
    let to_client = async {
        let mut chunk = vec![0u8; matchlock_protocol::FORWARD_MAX_CHUNK];
        while let Ok(n) = guest_reader.read_u32().await {
            let n = n as usize;
            if n == 0 || n > chunk.len() {
                break;
            }
            if guest_reader.read_exact(&mut chunk[..n]).await.is_err()
                || client_writer.write_all(&chunk[..n]).await.is_err()
            {
                break;
            }
        }
        let _ = client_writer.shutdown().await;
    };
    tokio::join!(to_guest, to_client);
    Ok(())
}

async fn open_forward(vm_dir: &VmDir, port: u16) -> Result<UnixStream, SandboxError> {
    let mut stream = connect(vm_dir, FORWARD_PORT, &[]).await?;
    let failed = |e: std::io::Error| SandboxError::Relay(format!("port forward to sandbox port {port} failed: {e}"));
    stream.write_all(&port.to_be_bytes()).await.map_err(failed)?;
    let mut status = [0u8; 1];
    stream.read_exact(&mut status).await.map_err(failed)?;
    if status[0] != matchlock_protocol::FORWARD_OK {
        return Err(SandboxError::Relay(format!("nothing listens on port {port} in the sandbox")));
    }
    Ok(stream)
}

/// Connects to `port` of the guest through the relay of the sandbox in `vm_dir`, sending
/// `first` right behind the handshake (the owner passes what it has of them with the
/// guest connection's Open).
pub async fn connect(vm_dir: &VmDir, port: u32, first: &[u8]) -> Result<UnixStream, SandboxError> {
    let path = vm_dir.exec_socket();
    let connect_err = |e| SandboxError::Relay(format!("cannot reach the sandbox's exec relay {}: {e}", path.display()));
    let mut stream = UnixStream::connect(&path).await.map_err(connect_err)?;
    let mut handshake = format!("CONNECT {port}\n").into_bytes();
    handshake.extend_from_slice(first);
    stream.write_all(&handshake).await.map_err(connect_err)?;
    let mut reply = Vec::with_capacity(16);
    loop {
        let mut b = [0u8; 1];
        if stream.read(&mut b).await.map_err(connect_err)? == 0 {
            return Err(SandboxError::Relay("the sandbox's owner closed the relay connection".into()));
        }
        if b[0] == b'\n' || reply.len() > 256 {
            break;
        }
        reply.push(b[0]);
    }
    let reply = String::from_utf8_lossy(&reply);
    if !reply.starts_with("OK ") {
        return Err(SandboxError::Relay(format!("the sandbox refused the connection: {reply}")));
    }
    Ok(stream)
}

/// How an accept loop lives through failed `accept`s (EMFILE, ECONNABORTED, …): it keeps
/// serving, after a pause that grows while the failures last (so a flood cannot spin the
/// loop or the log), and says so once per run of failures.
#[derive(Debug, Default)]
pub struct AcceptBackoff {
    failures: u32,
    /// Runs of failures, logged sampled (a guest can make them come and go).
    runs: crate::sampled::Sampled,
}

impl AcceptBackoff {
    /// Longest pause between two attempts.
    const MAX_PAUSE: Duration = Duration::from_millis(500);

    /// Calls `accept` until it succeeds, pausing after each failure; `what` names the
    /// listener in the one report of a run of failures.
    pub async fn accept<T, F, Fut>(&mut self, what: &str, mut accept: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = std::io::Result<T>>,
    {
        loop {
            match accept().await {
                Ok(accepted) => {
                    self.failures = 0;
                    return accepted;
                }
                Err(error) => {
                    if self.failures == 0 {
                        if let Some(n) = self.runs.record() {
                            tracing::warn!("cannot accept a connection on {what} (still serving; {n} times): {error}");
                        }
                    }
                    self.failures = self.failures.saturating_add(1);
                    let pause = Duration::from_millis(10).saturating_mul(self.failures.min(64)).min(Self::MAX_PAUSE);
                    tokio::time::sleep(pause).await;
                }
            }
        }
    }
}
