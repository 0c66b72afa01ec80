//! What a sandbox is asked to be, and the parsers for the user's spellings of it.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// Default CPU count.
pub const DEFAULT_CPUS: f64 = 1.0;
/// Default guest memory in MB.
pub const DEFAULT_MEMORY_MB: u64 = 512;
/// Default size of the writable upper disk in MB.
pub const DEFAULT_DISK_SIZE_MB: u64 = 5120;
/// Default name servers.
pub const DEFAULT_DNS: [&str; 2] = ["8.8.8.8", "8.8.4.4"];

/// A sandbox: the image, the machine, and how its command runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SandboxConfig {
    /// Image reference, resolved in the local image store.
    pub image: String,
    /// CPUs; fractions are enforced with a cgroup quota in the guest.
    pub cpus: f64,
    /// Guest memory in MB.
    pub memory_mb: u64,
    /// Size of the writable upper disk in MB (sparse).
    pub disk_size_mb: u64,
    /// Hostname; the VM id when absent.
    pub hostname: Option<String>,
    /// Name servers for /etc/resolv.conf.
    pub dns_servers: Vec<IpAddr>,
    /// Extra /etc/hosts entries.
    pub add_hosts: Vec<(String, IpAddr)>,
    /// Environment over the image's ENV.
    pub env: BTreeMap<String, String>,
    /// User (`name`, `uid`, `uid:gid`); the image's USER when absent.
    pub user: Option<String>,
    /// Working directory; the image's WORKDIR, else `/`, when absent.
    pub workdir: Option<String>,
    /// Replacement ENTRYPOINT; `Some(vec![])` clears the image's.
    pub entrypoint: Option<Vec<String>>,
    /// Arguments (replace the image's CMD when non-empty).
    pub command: Vec<String>,
    /// Skip the in-guest hardening of commands (capability drop, no_new_privs, seccomp).
    #[serde(default)]
    pub privileged: bool,
    /// Extra ext4 disks (`--disk`).
    #[serde(default)]
    pub disks: Vec<DiskMount>,
    /// Mount point of the host-served workspace file system (with [`Self::volumes`]).
    #[serde(default)]
    pub workspace: Option<String>,
    /// Host directories served under the workspace (`-v`).
    #[serde(default)]
    pub volumes: Vec<VfsMount>,
    /// Rules on workspace operations.
    #[serde(default)]
    pub vfs_interception: Option<VfsInterception>,
    /// Bytes (in MB) the guest may make the host store through the workspace; the VFS
    /// default (10 GiB) when absent.
    #[serde(default)]
    pub workspace_quota_mb: Option<u64>,
    /// The network; `None` means no NIC at all (`--no-network`).
    #[serde(default = "default_network")]
    pub network: Option<NetworkConfig>,
    /// Boot from scratch: neither resume nor save a warm template (`--cold`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cold: bool,
    /// Keep `/tmp` on the root file system rather than a tmpfs, so commits include it
    /// (`matchlock build` steps, as in Docker).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub image_tmp: bool,
}

#[allow(clippy::unnecessary_wraps)]
fn default_network() -> Option<NetworkConfig> {
    Some(NetworkConfig::default())
}

/// Default MTU of the guest NIC.
pub const DEFAULT_MTU: u32 = 1500;

/// The sandbox's network: what it may reach and which secrets it may send where.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkConfig {
    /// Allow-list globs; empty allows every host.
    pub allowed_hosts: Vec<String>,
    /// Refuse private, loopback, link-local and CGNAT destinations.
    pub block_private_ips: bool,
    /// Force HTTP/TLS interception even with an empty allow-list and no secrets.
    pub intercept: bool,
    /// MTU of the guest NIC.
    pub mtu: u32,
    /// Secrets the host substitutes for their placeholders on the way out.
    pub secrets: Vec<Secret>,
    /// Request/response rules and the callback socket of programmable hooks.
    #[serde(default)]
    pub interception: Option<Interception>,
    /// Let `Range` requests carry a secret: a server echoing the value could otherwise hand
    /// it back a few bytes at a time, each piece too short for scrubbing to recognise.
    #[serde(default)]
    pub allow_secret_ranges: bool,
    /// The network namespace (a path: `/var/run/netns/NAME`, `/proc/PID/ns/net`) in which the
    /// host makes the sandbox's upstream connections and DNS queries, so they leave with that
    /// namespace's addresses and routes (a Kubernetes pod's, say); the host's own when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<String>,
    /// Bound on the egress audit's files, bytes (0: no audit); see [`crate::audit`].
    #[serde(default = "default_audit_max_bytes")]
    pub audit_max_bytes: u64,
    /// Budgets and rate limits the host enforces on the sandbox's traffic.
    #[serde(default)]
    pub limits: NetworkLimits,
    /// Bytes of each intercepted request and response body the audit keeps (0: none, and
    /// query values are not kept either).
    #[serde(default)]
    pub audit_bodies: u64,
}

/// Budgets and rate limits on a sandbox's network, enforced by the host (none by default).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NetworkLimits {
    /// Bytes the guest may send out: request bodies, TCP and UDP payloads, all flows together.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub egress_bytes: Option<u64>,
    /// Bytes the guest may receive the same way.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ingress_bytes: Option<u64>,
    /// HTTP requests through interception.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_requests: Option<u64>,
    /// TCP connections the guest may open (DNS over TCP aside).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u64>,
    /// Request rates per host (the first rule whose glob matches applies).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rate_limits: Vec<RateLimit>,
}

/// At most `requests` HTTP requests per `seconds` to hosts matching `host` (a burst of
/// `requests`, then one each `seconds / requests`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    /// Host glob, as in the allow-list.
    pub host: String,
    /// Requests per period.
    pub requests: u32,
    /// The period, seconds.
    pub seconds: u32,
}

/// A malformed size or rate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct LimitSpecError(pub String);

/// `200MB`, `1.5G`, `512K`, `4096` (bytes; K/M/G/T are powers of 1024, a trailing `B` or `iB`
/// optional); `none` for no limit.
pub fn parse_size(spec: &str) -> Result<Option<u64>, LimitSpecError> {
    let s = spec.trim();
    if s.eq_ignore_ascii_case("none") {
        return Ok(None);
    }
    let bad = || LimitSpecError(format!("invalid size {spec:?} (e.g. 200MB, 1G, 4096, none)"));
    let upper = s.to_ascii_uppercase();
    let digits = upper.trim_end_matches('B').trim_end_matches('I');
    let unit = match digits.chars().last() {
        Some('K') => 1u64 << 10,
        Some('M') => 1 << 20,
        Some('G') => 1 << 30,
        Some('T') => 1 << 40,
        _ => 1,
    };
    let number = if unit == 1 { digits } else { &digits[..digits.len() - 1] };
    let value: f64 = number.trim().parse().map_err(|_| bad())?;
    let bytes = value * unit as f64;
    if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
        return Err(bad());
    }
    Ok(Some(bytes as u64))
}

/// `api.openai.com=10/s`, `*.github.com=100/m`, `pypi.org=1000/h`.
pub fn parse_rate_limit(spec: &str) -> Result<RateLimit, LimitSpecError> {
    let bad = || LimitSpecError(format!("invalid rate limit {spec:?} (HOST=N/s, N/m or N/h)"));
    let (host, rate) = spec.trim().split_once('=').ok_or_else(bad)?;
    let (count, unit) = rate.split_once('/').ok_or_else(bad)?;
    let requests: u32 = count.trim().parse().map_err(|_| bad())?;
    let seconds = match unit.trim() {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        _ => return Err(bad()),
    };
    let host = host.trim();
    if host.is_empty() || requests == 0 {
        return Err(bad());
    }
    Ok(RateLimit { host: host.to_ascii_lowercase(), requests, seconds })
}

fn default_audit_max_bytes() -> u64 {
    crate::audit::DEFAULT_AUDIT_MAX_BYTES
}

/// Programmable interception (reference §4 "Network hooks"): rules matched per request.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Interception {
    /// The rules, in order.
    #[serde(default)]
    pub rules: Vec<HookRule>,
    /// Unix socket that rules with a `callback_id` consult (one JSON line each way).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub callback_socket: Option<String>,
}

/// When a rule applies: to the request (`before`, the default; `""` too, as the SDKs send
/// it) or to the response / after the operation (`after`). Anything else is refused when
/// the configuration is read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RulePhase {
    /// On the request, before it is sent (or before the file operation).
    #[default]
    #[serde(alias = "")]
    Before,
    /// On the response (or after the file operation).
    After,
}

/// What a network interception rule does: `allow` (the default, `""` too), `block`, or
/// `mutate` (edits only; the same as `allow` for whether the request goes out).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RuleAction {
    /// Let it through (with the rule's edits).
    #[default]
    #[serde(alias = "")]
    Allow,
    /// Refuse it.
    Block,
    /// Let it through with the rule's edits.
    Mutate,
}

/// What a VFS rule does: `allow` (the default, `""` too) or `block` (`EPERM`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VfsAction {
    /// Let the operation happen.
    #[default]
    #[serde(alias = "")]
    Allow,
    /// Refuse it with `EPERM`.
    Block,
}

/// One interception rule (the JSON shape the SDKs send).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HookRule {
    /// Name, for events and errors.
    pub name: String,
    /// `before` (request) or `after` (response); default `before`.
    pub phase: RulePhase,
    /// Host globs; empty matches every host.
    pub hosts: Vec<String>,
    /// Methods; empty matches every method.
    pub methods: Vec<String>,
    /// `path.Match`-style pattern on the URL path; empty matches every path.
    pub path: String,
    /// `allow`, `block` or `mutate`; default `allow`.
    pub action: RuleAction,
    /// Consult the callback socket with this id.
    pub callback_id: String,
    /// Callback timeout in milliseconds (default 2000).
    pub timeout_ms: u64,
    /// Before: headers to set.
    pub set_headers: BTreeMap<String, String>,
    /// Before: headers to delete.
    pub delete_headers: Vec<String>,
    /// Before: query parameters to set.
    pub set_query: BTreeMap<String, String>,
    /// Before: query parameters to delete.
    pub delete_query: Vec<String>,
    /// Before: replacement URL path.
    pub rewrite_path: String,
    /// After: response headers to set.
    pub set_response_headers: BTreeMap<String, String>,
    /// After: response headers to delete.
    pub delete_response_headers: Vec<String>,
    /// After: literal replacements in the response body (per `data:` line for SSE).
    pub body_replacements: Vec<BodyReplacement>,
}

/// A literal body replacement.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BodyReplacement {
    /// Bytes to find.
    pub find: String,
    /// What replaces them.
    #[serde(default)]
    pub replace: String,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        Self {
            allowed_hosts: Vec::new(),
            block_private_ips: true,
            intercept: false,
            mtu: DEFAULT_MTU,
            secrets: Vec::new(),
            interception: None,
            allow_secret_ranges: false,
            netns: None,
            audit_max_bytes: crate::audit::DEFAULT_AUDIT_MAX_BYTES,
            limits: NetworkLimits::default(),
            audit_bodies: 0,
        }
    }
}

impl NetworkConfig {
    /// Whether traffic goes through the intercepting proxy (reference: allow-list, secrets or forced).
    pub fn intercepts(&self) -> bool {
        self.intercept || self.interception.is_some() || !self.allowed_hosts.is_empty() || !self.secrets.is_empty()
    }
}

/// A secret: the guest sees `placeholder` in `$name`; the host sends `value` in its place, and
/// only to `hosts`. The value is never serialized (stored configurations hold placeholders only).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Secret {
    /// Environment variable name in the guest.
    pub name: String,
    /// The real value; host memory only.
    #[serde(skip)]
    pub value: String,
    /// What the guest sees instead: `SANDBOX_SECRET_` + 32 hex digits.
    pub placeholder: String,
    /// Host globs the value may be sent to (empty = any allowed host).
    pub hosts: Vec<String>,
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Secret")
            .field("name", &self.name)
            .field("value", &"<redacted>")
            .field("placeholder", &self.placeholder)
            .field("hosts", &self.hosts)
            .finish()
    }
}

impl Secret {
    /// A secret with a fresh random placeholder.
    pub fn new(name: impl Into<String>, value: impl Into<String>, hosts: Vec<String>) -> Self {
        let bytes: [u8; 16] = rand::random();
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        Self { name: name.into(), value: value.into(), placeholder: format!("SANDBOX_SECRET_{hex}"), hosts }
    }
}

/// Errors in `--secret` specs. They never include the value.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SecretSpecError {
    /// No `@hosts` part.
    #[error("invalid secret {0:?}: missing @hosts (expected NAME=VALUE@host1,host2 or NAME@host1,host2)")]
    MissingHosts(String),
    /// Empty or malformed name.
    #[error("invalid secret: bad name {0:?}")]
    BadName(String),
    /// `NAME@hosts` but `$NAME` is not set on the host.
    #[error("invalid secret {0}: environment variable is not set ${0}")]
    NotSet(String),
}

/// Parses `--secret`: `NAME=VALUE@h1,h2` or `NAME@h1,h2` (value from the host's `$NAME`).
/// The split is on the last `@`, so values may contain `@`; commas separate hosts.
pub fn parse_secret(spec: &str, host: impl Fn(&str) -> Option<String>) -> Result<Secret, SecretSpecError> {
    let (left, hosts) = spec
        .rsplit_once('@')
        .ok_or_else(|| SecretSpecError::MissingHosts(spec.split_once('=').map_or(spec, |(name, _)| name).to_owned()))?;
    let (name, value) = match left.split_once('=') {
        Some((name, value)) => (name, Some(value.to_owned())),
        None => (left, None),
    };
    let valid_name = !name.is_empty()
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if !valid_name {
        return Err(SecretSpecError::BadName(name.to_owned()));
    }
    let hosts: Vec<String> = hosts.split(',').map(str::trim).filter(|h| !h.is_empty()).map(str::to_owned).collect();
    if hosts.is_empty() {
        return Err(SecretSpecError::MissingHosts(name.to_owned()));
    }
    let value = match value {
        Some(v) => v,
        None => host(name).ok_or_else(|| SecretSpecError::NotSet(name.to_owned()))?,
    };
    Ok(Secret::new(name, value, hosts))
}

/// Go's `path.Match` without character classes: `*` is any run of non-`/` characters and
/// `?` one non-`/` character (rule `path` patterns of network and VFS interception).
pub fn path_matches(pattern: &str, path: &str) -> bool {
    fn go(p: &[u8], s: &[u8]) -> bool {
        match p.first() {
            None => s.is_empty(),
            Some(b'*') => (0..=s.len()).take_while(|&i| i == 0 || s[i - 1] != b'/').any(|i| go(&p[1..], &s[i..])),
            Some(b'?') => s.first().is_some_and(|&c| c != b'/') && go(&p[1..], &s[1..]),
            Some(&c) => s.first() == Some(&c) && go(&p[1..], &s[1..]),
        }
    }
    go(pattern.as_bytes(), path.as_bytes())
}

/// VFS interception (reference `vfs.interception`): rules on workspace operations.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VfsInterception {
    /// Emit `file` events (needs the JSON-RPC API).
    #[serde(default)]
    pub emit_events: bool,
    /// The rules, in order.
    #[serde(default)]
    pub rules: Vec<VfsRule>,
}

/// One VFS rule.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VfsRule {
    /// Name, for errors.
    pub name: String,
    /// `before` (default) or `after`.
    pub phase: RulePhase,
    /// Operations (`stat open read write create mkdir remove rename readdir chmod truncate
    /// symlink readlink link`); empty matches all.
    pub ops: Vec<String>,
    /// `path.Match` pattern on the absolute guest path; empty matches all.
    pub path: String,
    /// `allow` (default) or `block` (EPERM in the guest).
    pub action: VfsAction,
    /// Callback timeout (callbacks need the JSON-RPC API).
    pub timeout_ms: u64,
}

/// Default workspace mount point when `-v` is given without `--workspace`.
pub const DEFAULT_WORKSPACE: &str = "/workspace";

/// How a host directory is served into the workspace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VfsMode {
    /// Copy-on-write: the guest changes its own view; the host directory never changes.
    Overlay,
    /// Reads and writes go to the host directory.
    HostFs,
    /// Read-only (EROFS in the guest).
    Readonly,
    /// A private, initially empty tree (no host directory), discarded with the sandbox.
    Memory,
}

/// A host directory served at a guest path under the workspace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VfsMount {
    /// Absolute host path (empty for [`VfsMode::Memory`]).
    pub host_path: String,
    /// Absolute guest path, inside the workspace.
    pub guest_path: String,
    /// How it is served.
    pub mode: VfsMode,
}

/// Errors in `-v` specs (the reference's wording).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VolumeSpecError {
    /// Not `host:guest[:mode]`.
    #[error("invalid volume {0:?}: expected host:guest[:overlay|host_fs|ro|readonly]")]
    Syntax(String),
    /// The host path is missing.
    #[error("host path does not exist: {0}")]
    HostMissing(String),
    /// The guest path is outside the workspace.
    #[error("guest path must be within workspace: {0:?} not in {1:?}")]
    OutsideWorkspace(String, String),
    /// The workspace path is not usable.
    #[error("invalid workspace {0:?}: must be an absolute path of letters, digits, /, _, . and -")]
    Workspace(String),
}

/// Whether a workspace path is acceptable (`^/[a-zA-Z0-9/_.-]+$`, normalized, not `/`).
pub fn is_valid_workspace(path: &str) -> bool {
    matchlock_protocol::boot::is_valid_mount_path(path)
        && path.bytes().all(|b| b.is_ascii_alphanumeric() || b"/_.-".contains(&b))
}

/// Whether `path` is `workspace` or lies beneath it, and is itself a valid mount path.
pub fn is_within_workspace(path: &str, workspace: &str) -> bool {
    path.strip_prefix(workspace).is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
        && is_valid_workspace(path)
}

/// Parses `-v host:guest[:mode]`: the host path is made absolute and must exist; a relative
/// guest path is joined onto `workspace`, an absolute one must lie inside it.
pub fn parse_volume(spec: &str, workspace: &str, cwd: &std::path::Path) -> Result<VfsMount, VolumeSpecError> {
    if !is_valid_workspace(workspace) {
        return Err(VolumeSpecError::Workspace(workspace.to_owned()));
    }
    let (rest, mode) = match spec.rsplit_once(':') {
        Some((rest, "overlay")) => (rest, VfsMode::Overlay),
        Some((rest, "host_fs")) => (rest, VfsMode::HostFs),
        Some((rest, "ro" | "readonly")) => (rest, VfsMode::Readonly),
        _ => (spec, VfsMode::Overlay),
    };
    let (host, guest) = rest.rsplit_once(':').ok_or_else(|| VolumeSpecError::Syntax(spec.to_owned()))?;
    if host.is_empty() || guest.is_empty() {
        return Err(VolumeSpecError::Syntax(spec.to_owned()));
    }
    let host_path = cwd.join(host);
    let host_path =
        host_path.canonicalize().map_err(|_| VolumeSpecError::HostMissing(host_path.display().to_string()))?;
    let guest_path = if guest.starts_with('/') { guest.to_owned() } else { format!("{workspace}/{guest}") };
    let guest_path = guest_path.trim_end_matches('/').to_owned();
    if !is_within_workspace(&guest_path, workspace) {
        return Err(VolumeSpecError::OutsideWorkspace(guest_path, workspace.to_owned()));
    }
    Ok(VfsMount { host_path: host_path.display().to_string(), guest_path, mode })
}

/// Errors in `-p/--publish` specs.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid port mapping {0:?}: expected [LOCAL:]REMOTE with ports 1-65535")]
pub struct PublishSpecError(pub String);

/// A port forward: host `local` to guest `remote`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortForward {
    /// Host port.
    pub local: u16,
    /// Guest port.
    pub remote: u16,
}

/// Parses `[LOCAL:]REMOTE`.
pub fn parse_publish(spec: &str) -> Result<PortForward, PublishSpecError> {
    let port = |s: &str| s.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(|| PublishSpecError(spec.to_owned()));
    match spec.split_once(':') {
        Some((local, remote)) => Ok(PortForward { local: port(local)?, remote: port(remote)? }),
        None => {
            let p = port(spec)?;
            Ok(PortForward { local: p, remote: p })
        }
    }
}

/// An ext4 disk image mounted in the guest (`--disk source:/guest/path[:ro]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskMount {
    /// A host path to an ext4 image, or `@name` for a named volume.
    pub source: String,
    /// Absolute mount point in the guest.
    pub guest_path: String,
    /// Mount read-only.
    pub read_only: bool,
}

/// Errors in `--disk` specs.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid disk {0:?}: expected host_path:/guest/path[:ro] or @volume:/guest/path[:ro]")]
pub struct DiskSpecError(pub String);

/// Parses `--disk`: `host_path:/guest/path[:ro]` or `@volume:/guest/path[:ro]`.
pub fn parse_disk(spec: &str) -> Result<DiskMount, DiskSpecError> {
    let err = || DiskSpecError(spec.to_owned());
    let (rest, read_only) = match spec.strip_suffix(":ro") {
        Some(r) => (r, true),
        None => (spec, false),
    };
    let (source, guest) = rest.rsplit_once(':').ok_or_else(err)?;
    if source.is_empty() || !matchlock_protocol::boot::is_valid_mount_path(guest) {
        return Err(err());
    }
    if let Some(name) = source.strip_prefix('@') {
        if !is_valid_volume_name(name) {
            return Err(err());
        }
    }
    Ok(DiskMount { source: source.to_owned(), guest_path: guest.to_owned(), read_only })
}

/// Volume names: `^[a-zA-Z0-9][a-zA-Z0-9_.-]*$`, at most 128 characters.
pub fn is_valid_volume_name(name: &str) -> bool {
    name.len() <= 128
        && name.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
}

impl SandboxConfig {
    /// A configuration with the documented defaults for `image`.
    pub fn new(image: impl Into<String>) -> Self {
        Self {
            image: image.into(),
            cpus: DEFAULT_CPUS,
            memory_mb: DEFAULT_MEMORY_MB,
            disk_size_mb: DEFAULT_DISK_SIZE_MB,
            hostname: None,
            dns_servers: DEFAULT_DNS.iter().map(|s| s.parse().expect("valid default DNS")).collect(),
            add_hosts: Vec::new(),
            env: BTreeMap::new(),
            user: None,
            workdir: None,
            entrypoint: None,
            command: Vec::new(),
            privileged: false,
            disks: Vec::new(),
            network: Some(NetworkConfig::default()),
            workspace: None,
            volumes: Vec::new(),
            vfs_interception: None,
            workspace_quota_mb: None,
            cold: false,
            image_tmp: false,
        }
    }
}

/// Errors in environment specs.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EnvError {
    /// `-e KEY` named a variable the host does not have.
    #[error("invalid environment variable: environment variable is not set ${0}")]
    NotSet(String),
    /// The key is empty or contains `=` or NUL.
    #[error("invalid environment variable: bad name {0:?}")]
    BadName(String),
    /// An env file line does not parse.
    #[error("invalid environment variable: {file}:{line}: {reason}")]
    BadLine {
        /// The file.
        file: String,
        /// 1-based line number.
        line: usize,
        /// Why.
        reason: String,
    },
}

/// Parses one `-e` value: `KEY=VALUE`, or `KEY` to take the host's value.
pub fn parse_env(spec: &str, host: impl Fn(&str) -> Option<String>) -> Result<(String, String), EnvError> {
    let (key, value) = match spec.split_once('=') {
        Some((k, v)) => (k, Some(v.to_owned())),
        None => (spec, None),
    };
    if key.is_empty() || key.contains('\0') || value.as_deref().is_some_and(|v| v.contains('\0')) {
        return Err(EnvError::BadName(key.to_owned()));
    }
    let value = match value {
        Some(v) => v,
        None => host(key).ok_or_else(|| EnvError::NotSet(key.to_owned()))?,
    };
    Ok((key.to_owned(), value))
}

/// Parses an env file: one `KEY=VALUE` or `KEY` per line; `#` comments and blank lines skipped.
pub fn parse_env_file(
    file: &str,
    contents: &str,
    host: impl Fn(&str) -> Option<String>,
) -> Result<Vec<(String, String)>, EnvError> {
    let mut out = Vec::new();
    for (i, raw) in contents.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        out.push(parse_env(line, &host).map_err(|e| match e {
            EnvError::NotSet(k) => EnvError::NotSet(k),
            other => EnvError::BadLine { file: file.to_owned(), line: i + 1, reason: other.to_string() },
        })?);
    }
    Ok(out)
}

/// Errors in `--add-host` specs.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid add-host mapping: {0:?} (expected host:ip)")]
pub struct AddHostError(pub String);

/// Parses `host:ip` (the IP may be IPv6: the split is on the first colon).
pub fn parse_add_host(spec: &str) -> Result<(String, IpAddr), AddHostError> {
    let err = || AddHostError(spec.to_owned());
    let (host, ip) = spec.split_once(':').ok_or_else(err)?;
    let ip: IpAddr = ip.parse().map_err(|_| err())?;
    let valid_host = !host.is_empty()
        && host.len() <= 253
        && host.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        && !host.starts_with(['-', '.']);
    if !valid_host {
        return Err(err());
    }
    Ok((host.to_owned(), ip))
}

#[cfg(test)]
mod limit_tests {
    use super::*;

    #[test]
    fn sizes_and_rates_parse_as_documented() {
        assert_eq!(parse_size("200MB"), Ok(Some(200 << 20)));
        assert_eq!(parse_size("1.5G"), Ok(Some(3 << 29)));
        assert_eq!(parse_size("512k"), Ok(Some(512 << 10)));
        assert_eq!(parse_size("4096"), Ok(Some(4096)));
        assert_eq!(parse_size("2MiB"), Ok(Some(2 << 20)));
        assert_eq!(parse_size("none"), Ok(None));
        for bad in ["", "MB", "-1M", "ten", "1X"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
        assert_eq!(
            parse_rate_limit("API.openai.com=10/s"),
            Ok(RateLimit { host: "api.openai.com".into(), requests: 10, seconds: 1 })
        );
        assert_eq!(parse_rate_limit("*.github.com=100/m").map(|r| r.seconds), Ok(60));
        for bad in ["x", "x=10", "x=10/d", "=1/s", "x=0/s"] {
            assert!(parse_rate_limit(bad).is_err(), "{bad}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(k: &str) -> Option<String> {
        (k == "FROM_HOST").then(|| "from-host".to_owned())
    }

    #[test]
    fn env_flags() {
        assert_eq!(parse_env("A=b=c", host), Ok(("A".into(), "b=c".into())));
        assert_eq!(parse_env("A=", host), Ok(("A".into(), String::new())));
        assert_eq!(parse_env("FROM_HOST", host), Ok(("FROM_HOST".into(), "from-host".into())));
        let err = parse_env("MISSING_VAR", host).unwrap_err();
        assert_eq!(err.to_string(), "invalid environment variable: environment variable is not set $MISSING_VAR");
        assert!(matches!(parse_env("=x", host), Err(EnvError::BadName(_))));
    }

    #[test]
    fn env_file() {
        let parsed = parse_env_file("f", "# comment\n\nFILE_ONLY=from-file\n  FROM_HOST  \n", host).unwrap();
        assert_eq!(parsed, vec![("FILE_ONLY".into(), "from-file".into()), ("FROM_HOST".into(), "from-host".into())]);
        assert_eq!(parse_env_file("f", "NOPE\n", host), Err(EnvError::NotSet("NOPE".into())));
    }

    #[test]
    fn disks() {
        assert_eq!(
            parse_disk("@cache:/cache"),
            Ok(DiskMount { source: "@cache".into(), guest_path: "/cache".into(), read_only: false })
        );
        assert!(parse_disk("/tmp/d.ext4:/data:ro").unwrap().read_only);
        for bad in ["@cache", "@-x:/a", "/x.ext4:relative", "/x.ext4:/a/../b", "/x.ext4:/", ":/a", "/x:/a b"] {
            assert!(parse_disk(bad).is_err(), "{bad}");
        }
        assert!(is_valid_volume_name("my.vol_1-x"));
        assert!(!is_valid_volume_name("../x"));
    }

    #[test]
    fn secrets() {
        let s = parse_secret("KEY=a@b,c@api.test,*.x.test", host).unwrap();
        assert_eq!((s.name.as_str(), s.value.as_str()), ("KEY", "a@b,c"));
        assert_eq!(s.hosts, ["api.test", "*.x.test"]);
        assert!(s.placeholder.starts_with("SANDBOX_SECRET_") && s.placeholder.len() == 15 + 32);
        assert_ne!(s.placeholder, parse_secret("KEY=a@h", host).unwrap().placeholder);
        assert_eq!(parse_secret("FROM_HOST@h", host).unwrap().value, "from-host");
        assert_eq!(parse_secret("NOPE@h", host), Err(SecretSpecError::NotSet("NOPE".into())));
        let missing = parse_secret("KEY=topsecret", host).unwrap_err();
        assert!(!missing.to_string().contains("topsecret"), "{missing}");
        assert!(parse_secret("KEY=v@", host).is_err());
        assert!(parse_secret("1X=v@h", host).is_err());
        assert!(!format!("{s:?}").contains("a@b,c"));
        let stored = serde_json::to_string(&s).unwrap();
        assert!(!stored.contains("a@b,c") && stored.contains(&s.placeholder), "{stored}");
    }

    #[test]
    fn volumes() {
        let dir = std::env::temp_dir();
        let v = parse_volume("src:/workspace/src:host_fs", "/workspace", &dir).unwrap_err();
        assert!(v.to_string().starts_with("host path does not exist: "), "{v}");
        let v = parse_volume(".:code", "/workspace", &dir).unwrap();
        assert_eq!((v.guest_path.as_str(), v.mode), ("/workspace/code", VfsMode::Overlay));
        let v = parse_volume(".:/workspace/data:ro", "/workspace", &dir).unwrap();
        assert_eq!(v.mode, VfsMode::Readonly);
        assert_eq!(
            parse_volume(".:/etc", "/workspace", &dir).unwrap_err().to_string(),
            r#"guest path must be within workspace: "/etc" not in "/workspace""#
        );
        assert!(parse_volume(".:/workspacex", "/workspace", &dir).is_err());
        assert!(parse_volume(".:../x", "/workspace", &dir).is_err());
        assert!(parse_volume("nocolon", "/workspace", &dir).is_err());
    }

    #[test]
    fn path_patterns() {
        assert!(path_matches("/v1/*", "/v1/chat"));
        assert!(!path_matches("/v1/*", "/v1/chat/completions"));
        assert!(path_matches("/v1/*/completions", "/v1/chat/completions"));
        assert!(path_matches("/item?", "/item1"));
        assert!(!path_matches("/item?", "/item/"));
    }

    #[test]
    fn publish() {
        assert_eq!(parse_publish("8080:80"), Ok(PortForward { local: 8080, remote: 80 }));
        assert_eq!(parse_publish("9000"), Ok(PortForward { local: 9000, remote: 9000 }));
        for bad in ["0", "70000", "a:1", "1:", ":1", "1:2:3"] {
            assert!(parse_publish(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn add_host() {
        assert_eq!(parse_add_host("api.internal:10.0.0.10"), Ok(("api.internal".into(), "10.0.0.10".parse().unwrap())));
        assert_eq!(parse_add_host("v6.internal:fd00::1").unwrap().1, "fd00::1".parse::<IpAddr>().unwrap());
        for bad in ["invalid-spec", "bad host:1.2.3.4", ":1.2.3.4", "h:999.1.1.1"] {
            let e = parse_add_host(bad).unwrap_err();
            assert!(e.to_string().starts_with("invalid add-host mapping"), "{bad}");
        }
    }
}
