//! Typed builders for `create` and exec options.

use std::collections::BTreeMap;

use matchlock_api::config::{HookRule, Interception, VfsInterception};
use matchlock_api::rpc::{
    CreateParams, ImageConfigParams, MountParams, NetworkParams, Resources, SecretParams, VfsParams,
};
use serde_json::{json, Value};

/// What sandbox to create: an image plus settings, built fluently.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    params: CreateParams,
    /// Set when any network option was given (the server's defaults apply otherwise).
    network: Option<NetworkParams>,
}

impl CreateOptions {
    /// A sandbox from `image` (pulled if not in the local store) with default settings.
    pub fn new(image: impl Into<String>) -> Self {
        Self { params: CreateParams { image: image.into(), ..CreateParams::default() }, network: None }
    }

    fn resources(&mut self) -> &mut Resources {
        self.params.resources.get_or_insert_with(Resources::default)
    }

    fn net(&mut self) -> &mut NetworkParams {
        self.network.get_or_insert_with(|| NetworkParams { block_private_ips: true, ..NetworkParams::default() })
    }

    fn vfs(&mut self) -> &mut VfsParams {
        self.params.vfs.get_or_insert_with(VfsParams::default)
    }

    fn image_config(&mut self) -> &mut ImageConfigParams {
        self.params.image_config.get_or_insert_with(ImageConfigParams::default)
    }

    /// CPUs (fractions are a quota).
    #[must_use]
    pub fn cpus(mut self, cpus: f64) -> Self {
        self.resources().cpus = cpus;
        self
    }

    /// Memory in MB.
    #[must_use]
    pub fn memory_mb(mut self, mb: u32) -> Self {
        self.resources().memory_mb = i64::from(mb);
        self
    }

    /// Writable disk size in MB.
    #[must_use]
    pub fn disk_size_mb(mut self, mb: u32) -> Self {
        self.resources().disk_size_mb = i64::from(mb);
        self
    }

    /// Skips the in-guest hardening of commands.
    #[must_use]
    pub fn privileged(mut self) -> Self {
        self.params.privileged = true;
        self
    }

    /// An environment variable for every command.
    #[must_use]
    pub fn env(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.params.env.insert(name.into(), value.into());
        self
    }

    /// Hosts (globs) the sandbox may reach; turns on HTTP(S) interception.
    #[must_use]
    pub fn allow_host(mut self, host: impl Into<String>) -> Self {
        self.net().allowed_hosts.push(host.into());
        self
    }

    /// A secret: the guest sees a placeholder in `$name`; the host substitutes `value` in
    /// requests to `hosts` only.
    #[must_use]
    pub fn secret(mut self, name: impl Into<String>, value: impl Into<String>, hosts: &[&str]) -> Self {
        let secret = SecretParams {
            value: value.into(),
            placeholder: String::new(),
            hosts: hosts.iter().map(|h| (*h).to_owned()).collect(),
        };
        self.net().secrets.insert(name.into(), secret);
        self
    }

    /// Whether private, link-local and reserved addresses are blocked (default true).
    #[must_use]
    pub fn block_private_ips(mut self, block: bool) -> Self {
        self.net().block_private_ips = block;
        self
    }

    /// Intercept HTTP(S) even with an empty allow-list.
    #[must_use]
    pub fn intercept(mut self) -> Self {
        self.net().intercept = true;
        self
    }

    /// Request/response rules (and the callback socket) for intercepted traffic.
    #[must_use]
    pub fn network_rules(mut self, rules: Vec<HookRule>, callback_socket: Option<String>) -> Self {
        let net = self.net();
        net.intercept = true;
        net.interception = Some(Interception { rules, callback_socket });
        self
    }

    /// Budgets and rate limits the host enforces on the sandbox's traffic (our extension).
    #[must_use]
    pub fn limits(mut self, limits: matchlock_api::config::NetworkLimits) -> Self {
        self.net().limits = Some(limits);
        self
    }

    /// Name servers for the guest.
    #[must_use]
    pub fn dns_servers(mut self, servers: &[std::net::IpAddr]) -> Self {
        self.net().dns_servers = servers.to_vec();
        self
    }

    /// The guest's hostname.
    #[must_use]
    pub fn hostname(mut self, hostname: impl Into<String>) -> Self {
        self.net().hostname = hostname.into();
        self
    }

    /// No network device at all.
    #[must_use]
    pub fn no_network(mut self) -> Self {
        self.network = Some(NetworkParams { no_network: true, ..NetworkParams::default() });
        self
    }

    /// Where the workspace file system is mounted (default `/workspace` once a mount is added).
    #[must_use]
    pub fn workspace(mut self, path: impl Into<String>) -> Self {
        self.vfs().workspace = path.into();
        self
    }

    fn mount(mut self, guest_path: impl Into<String>, mount: MountParams) -> Self {
        let vfs = self.vfs();
        if vfs.workspace.is_empty() {
            vfs.workspace = matchlock_api::config::DEFAULT_WORKSPACE.to_owned();
        }
        vfs.mounts.insert(guest_path.into(), mount);
        self
    }

    /// An empty, private directory tree at `guest_path` (inside the workspace).
    #[must_use]
    pub fn mount_memory(self, guest_path: impl Into<String>) -> Self {
        self.mount(guest_path, MountParams { kind: "memory".into(), ..MountParams::default() })
    }

    /// The host directory `host_path`, read-write, at `guest_path`.
    #[must_use]
    pub fn mount_host_dir(self, guest_path: impl Into<String>, host_path: impl Into<String>) -> Self {
        self.mount(
            guest_path,
            MountParams { kind: "host_fs".into(), host_path: host_path.into(), ..MountParams::default() },
        )
    }

    /// The host directory `host_path`, read-only, at `guest_path`.
    #[must_use]
    pub fn mount_host_dir_readonly(self, guest_path: impl Into<String>, host_path: impl Into<String>) -> Self {
        let mount = MountParams {
            kind: "host_fs".into(),
            host_path: host_path.into(),
            readonly: true,
            ..MountParams::default()
        };
        self.mount(guest_path, mount)
    }

    /// A copy-on-write view of `host_path` at `guest_path` (the host never changes).
    #[must_use]
    pub fn mount_overlay(self, guest_path: impl Into<String>, host_path: impl Into<String>) -> Self {
        self.mount(
            guest_path,
            MountParams { kind: "overlay".into(), host_path: host_path.into(), ..MountParams::default() },
        )
    }

    /// Rules on workspace operations, and whether to emit `file` events.
    #[must_use]
    pub fn vfs_interception(mut self, interception: VfsInterception) -> Self {
        self.vfs().interception = Some(interception);
        self
    }

    /// The user commands run as (`name`, `uid` or `uid:gid`).
    #[must_use]
    pub fn user(mut self, user: impl Into<String>) -> Self {
        self.image_config().user = user.into();
        self
    }

    /// The default working directory of commands.
    #[must_use]
    pub fn working_dir(mut self, dir: impl Into<String>) -> Self {
        self.image_config().working_dir = dir.into();
        self
    }

    /// Replaces the image's ENTRYPOINT (and drops its CMD unless [`Self::cmd`] is given).
    #[must_use]
    pub fn entrypoint(mut self, argv: &[&str]) -> Self {
        self.image_config().entrypoint = argv.iter().map(|a| (*a).to_owned()).collect();
        self
    }

    /// Replaces the image's CMD.
    #[must_use]
    pub fn cmd(mut self, argv: &[&str]) -> Self {
        self.image_config().cmd = argv.iter().map(|a| (*a).to_owned()).collect();
        self
    }

    /// Runs ENTRYPOINT + CMD after boot ([`crate::Client::launch`] sets it).
    #[must_use]
    pub fn launch_entrypoint(mut self, launch: bool) -> Self {
        self.params.launch_entrypoint = launch;
        self
    }

    /// The `create` params.
    pub fn to_params(&self) -> Value {
        let mut params = self.params.clone();
        params.network.clone_from(&self.network);
        serde_json::to_value(params).expect("params serialize")
    }
}

/// Per-command options.
#[derive(Debug, Clone, Default)]
pub struct ExecOptions {
    /// Working directory (default: the image's, else the workspace, else `/`).
    pub working_dir: Option<String>,
    /// User (default: the sandbox's).
    pub user: Option<String>,
    /// Extra variables for this command only (`KEY=value` set before the command).
    pub env: BTreeMap<String, String>,
}

impl ExecOptions {
    pub(crate) fn params(&self, command: &str) -> Value {
        let mut command = command.to_owned();
        if !self.env.is_empty() {
            let prefix: Vec<String> = self.env.iter().map(|(k, v)| format!("{k}={}", shell_quote(v))).collect();
            command = format!("export {}; {command}", prefix.join(" "));
        }
        let mut params = json!({"command": command});
        if let Some(dir) = &self.working_dir {
            params["working_dir"] = json!(dir);
        }
        if let Some(user) = &self.user {
            params["user"] = json!(user);
        }
        params
    }
}

fn shell_quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_follow_the_wire_format() {
        let p = CreateOptions::new("alpine")
            .cpus(0.5)
            .allow_host("api.test")
            .secret("KEY", "v", &["api.test"])
            .mount_memory("/workspace")
            .user("nobody")
            .to_params();
        assert_eq!(p["image"], "alpine");
        assert_eq!(p["resources"]["cpus"], 0.5);
        assert_eq!(p["network"]["allowed_hosts"], json!(["api.test"]));
        assert_eq!(p["network"]["block_private_ips"], true);
        assert_eq!(p["network"]["secrets"]["KEY"], json!({"value": "v", "hosts": ["api.test"]}));
        assert_eq!(p["vfs"], json!({"workspace": "/workspace", "mounts": {"/workspace": {"type": "memory"}}}));
        assert_eq!(p["image_config"], json!({"user": "nobody"}));
        let none = CreateOptions::new("a").no_network().to_params();
        assert_eq!(none["network"], json!({"allowed_hosts": [], "block_private_ips": false, "no_network": true}));
        // The server accepts what the SDK sends.
        let parsed: CreateParams = serde_json::from_value(p).unwrap();
        assert!(parsed.to_config().is_ok());
    }

    #[test]
    fn exec_env_is_quoted() {
        let mut o = ExecOptions::default();
        o.env.insert("A".into(), "it's".into());
        assert_eq!(o.params("echo $A")["command"], r#"export A='it'\''s'; echo $A"#);
    }
}
