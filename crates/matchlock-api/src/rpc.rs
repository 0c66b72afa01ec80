//! The JSON-RPC wire types (reference §2): the `create` parameters (`api.Config`), the
//! other methods' parameters and results, and the `event` notification bodies. Shared by
//! the server (`matchlock rpc`) and the Rust SDK, so both speak the same JSON.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::config::{
    is_valid_workspace, is_within_workspace, HookRule, Interception, NetworkConfig, SandboxConfig, Secret,
    VfsInterception, VfsMode, VfsMount, DEFAULT_MTU,
};

/// JSON-RPC error codes.
pub mod code {
    /// Unparsable request line.
    pub const PARSE: i64 = -32700;
    /// A request that is not valid for its method.
    pub const INVALID_REQUEST: i64 = -32600;
    /// Unknown method.
    pub const METHOD_NOT_FOUND: i64 = -32601;
    /// Bad params.
    pub const INVALID_PARAMS: i64 = -32602;
    /// Internal error.
    pub const INTERNAL: i64 = -32603;
    /// The VM failed, or none was created.
    pub const VM_FAILED: i64 = -32000;
    /// A command failed.
    pub const EXEC_FAILED: i64 = -32001;
    /// A file operation failed.
    pub const FILE_FAILED: i64 = -32002;
    /// The request was cancelled.
    pub const CANCELLED: i64 = -32003;
}

/// `create` params: the original `api.Config`. Unknown fields are ignored, as Go does.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct CreateParams {
    /// Image reference (required).
    pub image: String,
    /// Internal; setting it is an error.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub id: String,
    /// Skip the in-guest command hardening.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub privileged: bool,
    /// Run the image's ENTRYPOINT + CMD after boot.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub launch_entrypoint: bool,
    /// Machine size.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resources: Option<Resources>,
    /// Network; replaces the defaults wholesale.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub network: Option<NetworkParams>,
    /// Workspace file system.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vfs: Option<VfsParams>,
    /// Environment over the image's.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Extra ext4 disks.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub extra_disks: Vec<ExtraDisk>,
    /// Overrides of the image's OCI config, field by field.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_config: Option<ImageConfigParams>,
}

/// `resources`: fields ≤ 0 keep the defaults.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Resources {
    /// CPUs.
    pub cpus: f64,
    /// Memory in MB.
    pub memory_mb: i64,
    /// Writable disk in MB.
    pub disk_size_mb: i64,
    /// Accepted for compatibility; the sandbox lives until `close`.
    pub timeout_seconds: i64,
}

/// `network`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct NetworkParams {
    /// Host globs the guest may reach (empty: all).
    pub allowed_hosts: Vec<String>,
    /// Extra /etc/hosts entries.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub add_hosts: Vec<HostEntry>,
    /// Block private, link-local and reserved addresses.
    pub block_private_ips: bool,
    /// No NIC at all.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub no_network: bool,
    /// Force interception.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub intercept: bool,
    /// Interception rules and the SDK's callback socket.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interception: Option<Interception>,
    /// Secrets by environment variable name.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub secrets: BTreeMap<String, SecretParams>,
    /// Our extension: let `Range` requests carry a secret (refused by default).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub allow_secret_ranges: bool,
    /// Unused (accepted for compatibility).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub policy_script: String,
    /// Name servers.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub dns_servers: Vec<IpAddr>,
    /// Hostname.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub hostname: String,
    /// Guest MTU (0: default).
    #[serde(skip_serializing_if = "is_zero")]
    pub mtu: u32,
    /// Our extension: budgets and rate limits the host enforces.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limits: Option<crate::config::NetworkLimits>,
    /// Our extension: the egress audit's bound, bytes (0: no audit file); the default when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub audit_max_bytes: Option<u64>,
    /// Our extension: bytes of each intercepted body (and the query values) the audit keeps.
    #[serde(skip_serializing_if = "is_zero_u64")]
    pub audit_bodies: u64,
}

#[allow(clippy::trivially_copy_pass_by_ref)]
fn is_zero_u64(v: &u64) -> bool {
    *v == 0
}

#[allow(clippy::trivially_copy_pass_by_ref)]
fn is_zero(v: &u32) -> bool {
    *v == 0
}

/// An /etc/hosts entry.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HostEntry {
    /// Name.
    pub host: String,
    /// Address.
    pub ip: IpAddr,
}

/// A secret as the SDKs send it.
#[derive(Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct SecretParams {
    /// The real value (kept on the host).
    pub value: String,
    /// Placeholder the guest sees (generated when empty).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub placeholder: String,
    /// Hosts the value may go to.
    pub hosts: Vec<String>,
}

impl std::fmt::Debug for SecretParams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretParams").field("value", &"<redacted>").field("hosts", &self.hosts).finish()
    }
}

/// `vfs`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct VfsParams {
    /// Mount point of the workspace.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub workspace: String,
    /// Mounts by guest path.
    pub mounts: BTreeMap<String, MountParams>,
    /// Rules and events.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interception: Option<VfsInterception>,
}

/// One VFS mount.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct MountParams {
    /// `memory`, `host_fs` or `overlay`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Host path (`host_fs`, `overlay`).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub host_path: String,
    /// Read-only (`host_fs`).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub readonly: bool,
    /// Not supported (rejected).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upper: Option<serde_json::Value>,
    /// Not supported (rejected).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lower: Option<serde_json::Value>,
    /// Not supported (rejected when set).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owner_uid: Option<u32>,
    /// Not supported (rejected when set).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owner_gid: Option<u32>,
}

/// An extra disk.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct ExtraDisk {
    /// ext4 image path, or `@volume`.
    pub host_path: String,
    /// Guest mount point.
    pub guest_mount: String,
    /// Mount read-only.
    pub readonly: bool,
}

/// `image_config`: non-empty fields override the image's.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct ImageConfigParams {
    /// USER.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub user: String,
    /// WORKDIR.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub working_dir: String,
    /// ENTRYPOINT.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub entrypoint: Vec<String>,
    /// CMD.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub cmd: Vec<String>,
    /// ENV.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
}

impl CreateParams {
    /// Validates the params and merges them over the defaults, as the reference does:
    /// resources field by field, `network`/`vfs`/`env`/`image_config` wholesale. Errors are
    /// the reference's invalid-params messages.
    pub fn to_config(&self) -> Result<SandboxConfig, String> {
        if self.image.is_empty() {
            return Err("image is required (e.g., alpine:latest)".into());
        }
        if !self.id.is_empty() {
            return Err("id is internal-only and cannot be set".into());
        }
        let mut config = SandboxConfig::new(&self.image);
        config.privileged = self.privileged;
        if let Some(r) = &self.resources {
            if r.cpus > 0.0 {
                config.cpus = r.cpus;
            }
            if r.memory_mb > 0 {
                config.memory_mb = r.memory_mb.unsigned_abs();
            }
            if r.disk_size_mb > 0 {
                config.disk_size_mb = r.disk_size_mb.unsigned_abs();
            }
        }
        if let Some(net) = &self.network {
            self.apply_network(net, &mut config)?;
        } else {
            config.network =
                Some(NetworkConfig { block_private_ips: true, mtu: DEFAULT_MTU, ..NetworkConfig::default() });
        }
        if let Some(vfs) = &self.vfs {
            apply_vfs(vfs, &mut config)?;
        }
        for disk in &self.extra_disks {
            let spec = format!("{}:{}{}", disk.host_path, disk.guest_mount, if disk.readonly { ":ro" } else { "" });
            config.disks.push(crate::config::parse_disk(&spec).map_err(|e| e.to_string())?);
        }
        if let Some(ic) = &self.image_config {
            let non_empty = |s: &str| (!s.is_empty()).then(|| s.to_owned());
            config.user = non_empty(&ic.user);
            config.workdir = non_empty(&ic.working_dir);
            if !ic.entrypoint.is_empty() {
                config.entrypoint = Some(ic.entrypoint.clone());
            }
            config.command.clone_from(&ic.cmd);
            config.env.clone_from(&ic.env);
        }
        config.env.extend(self.env.iter().map(|(k, v)| (k.clone(), v.clone())));
        Ok(config)
    }

    fn apply_network(&self, net: &NetworkParams, config: &mut SandboxConfig) -> Result<(), String> {
        if !net.hostname.is_empty() {
            config.hostname = Some(net.hostname.clone());
        }
        if !net.dns_servers.is_empty() {
            config.dns_servers.clone_from(&net.dns_servers);
        }
        config.add_hosts = net.add_hosts.iter().map(|h| (h.host.clone(), h.ip)).collect();
        for (host, _) in &config.add_hosts {
            if host.is_empty() || host.contains(char::is_whitespace) {
                return Err(format!("invalid add-host mapping: {host:?}"));
            }
        }
        if net.no_network {
            if !net.allowed_hosts.is_empty() || !net.secrets.is_empty() || net.intercept || net.interception.is_some() {
                return Err(
                    "no_network cannot be combined with allowed_hosts, secrets, intercept, or interception".into()
                );
            }
            config.network = None;
            return Ok(());
        }
        let mut secrets = Vec::new();
        for (name, s) in &net.secrets {
            let mut secret = Secret::new(name.clone(), s.value.clone(), s.hosts.clone());
            if !s.placeholder.is_empty() {
                secret.placeholder.clone_from(&s.placeholder);
            }
            secrets.push(secret);
        }
        let interception = net.interception.clone().map(|mut i| {
            let rules: Vec<HookRule> = std::mem::take(&mut i.rules);
            Interception { rules, ..i }
        });
        config.network = Some(NetworkConfig {
            allowed_hosts: net.allowed_hosts.clone(),
            block_private_ips: net.block_private_ips,
            intercept: net.intercept,
            mtu: if net.mtu == 0 { DEFAULT_MTU } else { net.mtu },
            secrets,
            interception,
            allow_secret_ranges: net.allow_secret_ranges,
            netns: None,
            limits: net.limits.clone().unwrap_or_default(),
            audit_max_bytes: net.audit_max_bytes.unwrap_or(crate::audit::DEFAULT_AUDIT_MAX_BYTES),
            audit_bodies: net.audit_bodies,
        });
        Ok(())
    }
}

fn apply_vfs(vfs: &VfsParams, config: &mut SandboxConfig) -> Result<(), String> {
    match (vfs.workspace.is_empty(), vfs.mounts.is_empty()) {
        (false, true) => return Err("vfs.workspace requires at least one mount".into()),
        (true, false) => return Err("vfs.mounts require vfs.workspace".into()),
        (true, true) if vfs.interception.is_some() => return Err("vfs.interception requires vfs.mounts".into()),
        (true, true) => return Ok(()),
        (false, false) => {}
    }
    let workspace = vfs.workspace.trim_end_matches('/');
    if !is_valid_workspace(workspace) {
        return Err(format!("invalid workspace path {:?}: must match ^/[a-zA-Z0-9/_.-]+$", vfs.workspace));
    }
    for (guest, mount) in &vfs.mounts {
        let guest_path = guest.trim_end_matches('/');
        if !is_within_workspace(guest_path, workspace) {
            return Err(format!("mount path {guest:?} must be within workspace {workspace:?}"));
        }
        if mount.upper.is_some() || mount.lower.is_some() {
            return Err(format!("mount {guest:?}: upper/lower overlay configs are not supported"));
        }
        if mount.owner_uid.is_some() || mount.owner_gid.is_some() {
            return Err(format!("mount {guest:?}: owner_uid/owner_gid are not supported"));
        }
        let mode = match (mount.kind.as_str(), mount.readonly) {
            ("memory" | "", _) => VfsMode::Memory,
            ("host_fs", false) => VfsMode::HostFs,
            ("host_fs", true) => VfsMode::Readonly,
            ("overlay", _) => VfsMode::Overlay,
            (other, _) => return Err(format!("mount {guest:?}: unknown type {other:?}")),
        };
        let host_path = if mode == VfsMode::Memory {
            String::new()
        } else {
            let p = std::path::Path::new(&mount.host_path);
            if !p.is_absolute() {
                return Err(format!("mount {guest:?}: host_path must be absolute"));
            }
            p.canonicalize()
                .map_err(|_| format!("host path does not exist: {}", mount.host_path))?
                .display()
                .to_string()
        };
        config.volumes.push(VfsMount { host_path, guest_path: guest_path.to_owned(), mode });
    }
    config.workspace = Some(workspace.to_owned());
    config.vfs_interception.clone_from(&vfs.interception);
    Ok(())
}

/// `exec`, `exec_stream`, `exec_pipe` and `exec_tty` params.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct ExecParams {
    /// Run as `sh -c <command>`.
    pub command: String,
    /// Working directory.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub working_dir: String,
    /// User (`name`, `uid`, `uid:gid`).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub user: String,
    /// Terminal rows (`exec_tty`, default 24).
    #[serde(skip_serializing_if = "is_zero_u16")]
    pub rows: u16,
    /// Terminal columns (`exec_tty`, default 80).
    #[serde(skip_serializing_if = "is_zero_u16")]
    pub cols: u16,
}

#[allow(clippy::trivially_copy_pass_by_ref)]
fn is_zero_u16(v: &u16) -> bool {
    *v == 0
}

/// `exec` result.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecResult {
    /// Exit code.
    pub exit_code: i32,
    /// Standard output, base64.
    pub stdout: String,
    /// Standard error, base64.
    pub stderr: String,
    /// Wall time.
    pub duration_ms: u64,
}

/// Result of the streaming exec methods.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitResult {
    /// Exit code.
    pub exit_code: i32,
    /// Wall time.
    pub duration_ms: u64,
}

/// A `list_files` entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileInfo {
    /// Name.
    pub name: String,
    /// Size.
    pub size: u64,
    /// Go `os.FileMode` bits.
    pub mode: u32,
    /// Always the zero time (as the reference).
    pub mod_time: String,
    /// Directory?
    pub is_dir: bool,
}

/// A port-forward request entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForwardSpec {
    /// Host port (0: any free port).
    pub local_port: u16,
    /// Guest port.
    pub remote_port: u16,
}

/// A realized port-forward listener.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Binding {
    /// Host address.
    pub address: String,
    /// Host port.
    pub local_port: u16,
    /// Guest port.
    pub remote_port: u16,
}

/// The body of a `file` event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEvent {
    /// Operation name (`create`, `write`, …).
    pub op: String,
    /// Absolute guest path.
    pub path: String,
    /// Bytes (write/read) or the file size.
    pub size: u64,
    /// Permission bits, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<u32>,
    /// Caller uid, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    /// Caller gid, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gid: Option<u32>,
}

/// The body of a `network` event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkEvent {
    /// HTTP method.
    pub method: String,
    /// Full URL.
    pub url: String,
    /// Host.
    pub host: String,
    /// Response status (0 when blocked before a response).
    pub status_code: u16,
    /// Request body bytes.
    pub request_bytes: u64,
    /// Response body bytes.
    pub response_bytes: u64,
    /// Wall time.
    pub duration_ms: u64,
    /// Whether policy blocked it.
    pub blocked: bool,
    /// Why.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub block_reason: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<SandboxConfig, String> {
        serde_json::from_str::<CreateParams>(json).unwrap().to_config()
    }

    #[test]
    fn defaults_and_resources_merge() {
        let c = parse(r#"{"image":"alpine","resources":{"cpus":0.5,"memory_mb":0}}"#).unwrap();
        assert_eq!((c.cpus, c.memory_mb, c.disk_size_mb), (0.5, 512, 5120));
        let net = c.network.unwrap();
        assert!(net.block_private_ips && !net.intercepts());
        assert_eq!(net.mtu, 1500);
    }

    #[test]
    fn validation_messages() {
        assert_eq!(parse("{}").unwrap_err(), "image is required (e.g., alpine:latest)");
        assert_eq!(parse(r#"{"image":"a","id":"vm-1"}"#).unwrap_err(), "id is internal-only and cannot be set");
        assert!(parse(r#"{"image":"a","network":{"no_network":true,"allowed_hosts":["x"]}}"#)
            .unwrap_err()
            .contains("no_network cannot be combined"));
        assert!(parse(r#"{"image":"a","vfs":{"workspace":"/w"}}"#).unwrap_err().contains("at least one mount"));
        assert!(parse(r#"{"image":"a","vfs":{"mounts":{"/w":{"type":"memory"}}}}"#).unwrap_err().contains("workspace"));
        assert!(parse(r#"{"image":"a","vfs":{"workspace":"/w","mounts":{"/x":{"type":"memory"}}}}"#)
            .unwrap_err()
            .contains("within workspace"));
        assert!(parse(r#"{"image":"a","vfs":{"workspace":"/w w","mounts":{"/w w":{}}}}"#)
            .unwrap_err()
            .contains("invalid workspace"));
    }

    #[test]
    fn network_secrets_and_vfs() {
        let c = parse(
            r#"{"image":"a","network":{"allowed_hosts":["api.test"],"block_private_ips":true,
                "secrets":{"KEY":{"value":"v","hosts":["api.test"]}}},
                "vfs":{"workspace":"/workspace","mounts":{"/workspace":{"type":"memory"}},
                "interception":{"emit_events":true}},
                "env":{"A":"1"},"image_config":{"user":"nobody","env":{"A":"0","B":"2"}}}"#,
        )
        .unwrap();
        let net = c.network.unwrap();
        assert_eq!(net.secrets[0].value, "v");
        assert!(net.secrets[0].placeholder.starts_with("SANDBOX_SECRET_"));
        assert_eq!(c.volumes[0].mode, VfsMode::Memory);
        assert!(c.vfs_interception.unwrap().emit_events);
        assert_eq!(c.env.get("A").map(String::as_str), Some("1"));
        assert_eq!(c.env.get("B").map(String::as_str), Some("2"));
        assert_eq!(c.user.as_deref(), Some("nobody"));
        let none = parse(r#"{"image":"a","network":{"no_network":true}}"#).unwrap();
        assert!(none.network.is_none());
    }

    #[test]
    fn secret_values_are_not_in_debug_output() {
        let p: CreateParams =
            serde_json::from_str(r#"{"image":"a","network":{"secrets":{"K":{"value":"hunter2"}}}}"#).unwrap();
        assert!(!format!("{p:?}").contains("hunter2"));
    }
}
