//! The sandbox's NIC: the host-side network engine, its CA and the guest's addressing.

use std::io::Write;
use std::sync::Arc;

use matchlock_api::config::NetworkConfig;
use matchlock_api::paths::VmDir;
use matchlock_net::{CertAuthority, Engine, Options, Policy};
use matchlock_vm::Nic;

use crate::{io_err, SandboxError};

/// Environment variable naming a PEM bundle of extra CAs trusted for upstream TLS.
pub const UPSTREAM_CA_ENV: &str = "MATCHLOCK_UPSTREAM_CA";

/// Benchmarks only: QEMU's user networking instead of matchlock's stack, for sandboxes
/// without interception (which have unrestricted egress anyway).
pub const BENCH_QEMU_USERNET_ENV: &str = "MATCHLOCK_BENCH_QEMU_USERNET";

/// A running sandbox network.
#[derive(Debug)]
pub struct Network {
    /// Drops (and stops) with the sandbox; `None` under QEMU user networking.
    _engine: Option<Engine>,
    /// The live policy, changed by `allow-list add|delete`.
    pub policy: Arc<Policy>,
    /// Whether HTTP/TLS interception (and so the allow-list) is on.
    pub intercepts: bool,
    /// The live budgets, changed by `matchlock limits`.
    pub budget: Arc<matchlock_net::budget::Budget>,
}

/// The guest-side kernel parameter configuring `eth0`.
pub fn kernel_ip_param() -> String {
    let mask = u32::MAX << (32 - u32::from(matchlock_net::PREFIX_LEN));
    format!("ip={}::{}:{}::eth0:off", matchlock_net::GUEST, matchlock_net::GATEWAY, std::net::Ipv4Addr::from(mask))
}

/// Generates the sandbox CA when `config` intercepts, and writes the tar that seeds the
/// writable disk with it (`matchlock/ca.crt`, outside the overlay, read by guest-init).
pub fn prepare_ca(
    config: &NetworkConfig,
    dir: &VmDir,
) -> Result<Option<(Arc<CertAuthority>, std::path::PathBuf)>, SandboxError> {
    if !config.intercepts() {
        return Ok(None);
    }
    let ca = CertAuthority::generate().map_err(|e| SandboxError::Network(Box::new(e)))?;
    let pem = ca.certificate_pem();
    let tar_path = dir.upper_seed();
    let file = matchlock_api::paths::create_private(&tar_path)
        .map_err(io_err(format!("cannot create {}", tar_path.display())))?;
    let mut tar = tar::Builder::new(file);
    let mut add = |path: &str, data: &[u8], mode: u32, kind: tar::EntryType| {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(kind);
        header.set_mode(mode);
        header.set_uid(0);
        header.set_gid(0);
        header.set_size(data.len() as u64);
        header.set_cksum();
        tar.append_data(&mut header, path, data)
    };
    add("matchlock/", &[], 0o700, tar::EntryType::Directory)
        .and_then(|()| add("matchlock/ca.crt", pem.as_bytes(), 0o644, tar::EntryType::Regular))
        .and_then(|()| tar.into_inner()?.flush())
        .map_err(io_err(format!("cannot write {}", tar_path.display())))?;
    Ok(Some((Arc::new(ca), tar_path)))
}

/// The policy a sandbox with `config` and the user's `add_hosts` is held to: its network
/// engine's, and that of a build's `ADD <url>` fetches.
pub(crate) fn policy(config: &NetworkConfig, add_hosts: &[(String, std::net::IpAddr)]) -> Policy {
    Policy::new(config.allowed_hosts.clone(), config.block_private_ips, config.secrets.clone())
        .with_pinned(pinned(add_hosts).map(|(name, ip)| (name.to_owned(), ip)))
        .with_secret_ranges(config.allow_secret_ranges)
}

/// The IPv4 entries of `add_hosts` (the guest link is IPv4 only).
pub(crate) fn pinned(add_hosts: &[(String, std::net::IpAddr)]) -> impl Iterator<Item = (&str, std::net::Ipv4Addr)> {
    add_hosts.iter().filter_map(|(name, ip)| match ip {
        std::net::IpAddr::V4(ip) => Some((name.as_str(), *ip)),
        std::net::IpAddr::V6(_) => None,
    })
}

/// The trust for upstream TLS: the host's roots and the bundle [`UPSTREAM_CA_ENV`] names.
pub(crate) fn upstream_tls() -> Result<rustls::ClientConfig, matchlock_net::NetError> {
    let extra_ca = std::env::var_os(UPSTREAM_CA_ENV).filter(|v| !v.is_empty()).map(std::path::PathBuf::from);
    matchlock_net::upstream_tls_config(extra_ca.as_deref())
}

/// Starts the engine listening at [`VmDir::net_socket`] and returns it with the NIC for the VM;
/// `events` receives the intercepted requests and the audit records.
pub fn start(
    id: &str,
    dir: &VmDir,
    config: &NetworkConfig,
    dns_servers: &[std::net::IpAddr],
    add_hosts: &[(String, std::net::IpAddr)],
    ca: Option<Arc<CertAuthority>>,
    events: crate::Events,
) -> Result<(Network, Nic), SandboxError> {
    let crate::Events { network: events, audit: audit_events, .. } = events;
    let hash = id.bytes().fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b))).to_be_bytes();
    let mac = [0x02, 0x4d, hash[0], hash[1], hash[2], hash[3]];
    let policy = Arc::new(policy(config, add_hosts));
    let intercepts = config.intercepts();
    let budget = Arc::new(matchlock_net::budget::Budget::new(config.limits.clone()));
    if std::env::var_os(BENCH_QEMU_USERNET_ENV).is_some() && !intercepts {
        tracing::warn!("{BENCH_QEMU_USERNET_ENV} is set: QEMU user networking, no address blocking");
        let nic = Nic { socket: None, mac, mtu: config.mtu };
        return Ok((Network { _engine: None, policy, intercepts, budget }, nic));
    }
    let socket = dir.net_socket();
    let _ = std::fs::remove_file(&socket);
    let listener = std::os::unix::net::UnixListener::bind(&socket)
        .map_err(io_err(format!("cannot listen on {}", socket.display())))?;
    let upstream_tls = upstream_tls().map_err(|e| SandboxError::Network(Box::new(e)))?;
    let hooks = matchlock_net::hooks::Hooks::new(config.interception.as_ref())
        .map_err(|e| SandboxError::Network(Box::new(e)))?;
    let audit = match (config.audit_max_bytes, audit_events) {
        (0, None) => None,
        (0, Some(sink)) => Some(matchlock_net::audit::Audit::to_sink(sink)),
        (max, sink) => Some(
            matchlock_net::audit::Audit::start(&dir.audit_log(), max)
                .map_err(io_err(format!("cannot start the audit {}", dir.audit_log().display())))?
                .with_sink(sink),
        ),
    };
    let options = Options {
        hooks,
        policy: policy.clone(),
        intercept: intercepts,
        ca,
        dns_servers: dns_servers.to_vec(),
        mtu: config.mtu as usize,
        gateway_mac: [0x02, 0x4d, 0x4c, 0x00, 0x00, 0x01],
        upstream_tls: Arc::new(upstream_tls),
        events,
        audit,
        budget: budget.clone(),
        audit_bodies: usize::try_from(config.audit_bodies).unwrap_or(usize::MAX),
    };
    let netns = config.netns.as_deref().map(std::path::Path::new);
    let engine = Engine::start(listener, options, netns).map_err(|e| SandboxError::Network(Box::new(e)))?;
    let nic = Nic { socket: Some(socket), mac, mtu: config.mtu };
    Ok((Network { _engine: Some(engine), policy, intercepts, budget }, nic))
}
