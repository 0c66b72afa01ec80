//! `matchlock run`: this process owns the sandbox for its whole life.

use std::collections::HashMap;
use std::io::{BufRead, Read, Write};
use std::net::IpAddr;
use std::os::unix::process::CommandExt;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{ArgAction, Args};
use matchlock_api::config::{
    parse_add_host, parse_env, parse_env_file, parse_secret, parse_volume, DEFAULT_CPUS, DEFAULT_DISK_SIZE_MB,
    DEFAULT_MEMORY_MB, DEFAULT_WORKSPACE,
};
use matchlock_api::SandboxConfig;
use matchlock_sandbox::{compose, ComposeError, Sandbox};

use crate::images::open_store;
use crate::session::{self, Output, StopSignals};

/// Arguments of `matchlock run`.
#[derive(Debug, Args, serde::Serialize, serde::Deserialize)]
pub(crate) struct RunArgs {
    /// What the sandbox boots with.
    #[command(flatten)]
    #[serde(flatten)]
    pub(crate) sandbox: SandboxArgs,
    /// Replace the image's ENTRYPOINT (an empty string clears it).
    #[arg(long, env = "MATCHLOCK_RUN_ENTRYPOINT")]
    entrypoint: Option<String>,
    /// Keep stdin open and forward it to the command.
    #[arg(short = 'i', long)]
    interactive: bool,
    /// With -i: allocate a pseudo-terminal.
    #[arg(short = 't', long)]
    tty: bool,
    /// Return once the sandbox is ready, printing its id (implies --rm=false).
    #[arg(short = 'd', long)]
    detach: bool,
    /// Remove the sandbox when the command exits; `--rm=false` keeps it until killed.
    #[arg(long, env = "MATCHLOCK_RUN_RM", default_value_t = true, action = ArgAction::Set,
          num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    rm: bool,
    /// Kill the sandbox after this many seconds (exit code 124).
    #[arg(long, env = "MATCHLOCK_RUN_TIMEOUT", value_name = "SECONDS")]
    timeout: Option<u64>,
    /// Publish a guest port on the host: `[LOCAL:]REMOTE` (repeatable).
    #[arg(short = 'p', long = "publish", value_name = "[LOCAL:]REMOTE")]
    publish: Vec<String>,
    /// Host addresses for --publish (IP literals or `localhost`).
    #[arg(long = "address", value_delimiter = ',', default_value = "127.0.0.1", value_name = "IP")]
    address: Vec<String>,
    /// Set in the owner of a detached sandbox (`detached-owner`), never on the command line.
    #[arg(skip)]
    #[serde(skip)]
    detached_child: bool,
    /// The snapshot a detached owner resumes instead of booting (`restore`, `fork`).
    #[arg(skip)]
    restore: Option<String>,
    /// Command and arguments (default: the image's CMD).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    command: Vec<String>,
}

/// The sandbox's image, resources, files and network policy: `run`'s options that `mcp`
/// shares.
#[derive(Debug, Args, serde::Serialize, serde::Deserialize)]
pub(crate) struct SandboxArgs {
    /// Image to boot (as imported: `name[:tag]`).
    #[arg(long, env = "MATCHLOCK_RUN_IMAGE")]
    pub(crate) image: String,
    /// Set an environment variable (`KEY=VALUE`, or `KEY` to pass the host's value).
    #[arg(short = 'e', long = "env", value_name = "KEY[=VALUE]")]
    pub(crate) env: Vec<String>,
    /// Read environment variables from a file (applied before --env).
    #[arg(long = "env-file", value_name = "FILE")]
    pub(crate) env_file: Vec<String>,
    /// Run as this user: `name`, `uid`, or `uid:gid` (default: the image's USER).
    #[arg(short = 'u', long, env = "MATCHLOCK_RUN_USER")]
    pub(crate) user: Option<String>,
    /// Working directory (default: the image's WORKDIR, else /).
    #[arg(short = 'w', long, env = "MATCHLOCK_RUN_WORKDIR")]
    pub(crate) workdir: Option<String>,
    /// Pull the image even if it is stored.
    #[arg(long, env = "MATCHLOCK_RUN_PULL")]
    pub(crate) pull: bool,
    /// Number of CPUs (fractions are enforced as a CPU quota).
    #[arg(long, env = "MATCHLOCK_RUN_CPUS", default_value_t = DEFAULT_CPUS)]
    pub(crate) cpus: f64,
    /// Memory in MB.
    #[arg(long, env = "MATCHLOCK_RUN_MEMORY", default_value_t = DEFAULT_MEMORY_MB)]
    pub(crate) memory: u64,
    /// Size of the writable disk in MB (sparse).
    #[arg(long = "disk-size", env = "MATCHLOCK_RUN_DISK_SIZE", default_value_t = DEFAULT_DISK_SIZE_MB)]
    pub(crate) disk_size: u64,
    /// Hostname (default: the VM id).
    #[arg(long, env = "MATCHLOCK_RUN_HOSTNAME")]
    pub(crate) hostname: Option<String>,
    /// DNS servers for /etc/resolv.conf (comma-separated).
    #[arg(long = "dns-servers", env = "MATCHLOCK_RUN_DNS_SERVERS", value_delimiter = ',', value_name = "IP[,IP]")]
    pub(crate) dns_servers: Vec<IpAddr>,
    /// Serve a host directory in the workspace: `host:guest[:overlay|host_fs|ro]` (overlay,
    /// the default, never changes the host; host_fs reads and writes it; ro is read-only).
    #[arg(short = 'v', long = "volume", value_name = "HOST:GUEST[:MODE]")]
    pub(crate) volume: Vec<String>,
    /// Where the workspace is mounted in the guest (default /workspace with -v).
    #[arg(long, env = "MATCHLOCK_RUN_WORKSPACE", value_name = "PATH")]
    pub(crate) workspace: Option<String>,
    /// Most MB the guest may store on the host through the workspace (file growth, less what
    /// it deletes); writes beyond fail with ENOSPC, and df shows it as the size.
    #[arg(long, value_name = "MB", default_value_t = matchlock_vfs::DEFAULT_QUOTA >> 20)]
    pub(crate) workspace_quota: u64,
    /// Rules on workspace operations: a JSON file `{"rules": [{"name", "ops", "path",
    /// "action": "block"}]}` (the JSON-RPC `vfs.interception` object); blocked → EPERM.
    #[arg(long = "vfs-rules", value_name = "FILE")]
    pub(crate) vfs_rules: Option<std::path::PathBuf>,
    /// Mount an ext4 disk image: `host_path:/guest/path[:ro]` or `@volume:/guest/path[:ro]`.
    #[arg(long = "disk", value_name = "SOURCE:PATH[:ro]")]
    pub(crate) disk: Vec<String>,
    /// Extra /etc/hosts entry `host:ip` (repeatable).
    #[arg(long = "add-host", value_name = "HOST:IP")]
    pub(crate) add_host: Vec<String>,
    /// Allow-list of hosts the sandbox may reach over HTTP(S): globs, comma lists accepted
    /// (`api.openai.com,*.github.com`). Turns on interception.
    #[arg(long = "allow-host", value_delimiter = ',', value_name = "HOST[,HOST]")]
    pub(crate) allow_host: Vec<String>,
    /// A secret the guest only sees as a placeholder: `NAME=VALUE@host1,host2`, or `NAME@hosts`
    /// to take the value from the host's `$NAME`. Turns on interception.
    #[arg(long = "secret", value_name = "NAME[=VALUE]@HOSTS")]
    pub(crate) secret: Vec<String>,
    /// No network interface at all.
    #[arg(long = "no-network", conflicts_with_all = ["allow_host", "secret", "network_intercept", "network_rules"])]
    pub(crate) no_network: bool,
    /// Request/response interception rules: a JSON file `{"rules": [...], "callback_socket": "..."}`
    /// with the rule fields of the JSON-RPC `network.interception` object. Turns on interception.
    #[arg(long = "network-rules", value_name = "FILE")]
    pub(crate) network_rules: Option<std::path::PathBuf>,
    /// Network budgets and rate limits.
    #[command(flatten)]
    #[serde(default)]
    pub(crate) limits: LimitArgs,
    /// Most MB the egress audit (`matchlock audit`) keeps for this sandbox: older records are
    /// rotated out beyond it (and counted); 0 keeps no audit.
    #[arg(long = "audit-max-size", value_name = "MB", default_value_t = matchlock_api::audit::DEFAULT_AUDIT_MAX_BYTES >> 20)]
    pub(crate) audit_max_size: u64,
    /// Keep the first BYTES (default 4096) of every intercepted request and response body in
    /// the audit, base64, and the query values: the request as the guest sent it
    /// (placeholders, never secret values), the response as it got it (scrubbed).
    #[arg(long = "audit-bodies", value_name = "BYTES", num_args = 0..=1, default_missing_value = "4096")]
    #[serde(default)]
    pub(crate) audit_bodies: Option<u64>,
    /// Intercept HTTP(S) even without an allow-list or secrets.
    #[arg(long = "network-intercept")]
    pub(crate) network_intercept: bool,
    /// Let `Range` requests carry a secret (refused by default: an echoing server could hand
    /// the value back a few bytes at a time).
    #[arg(long = "allow-secret-ranges")]
    pub(crate) allow_secret_ranges: bool,
    /// MTU of the guest's network interface.
    #[arg(long, default_value_t = matchlock_api::config::DEFAULT_MTU,
          value_parser = clap::value_parser!(u32).range(576..=65_535))]
    pub(crate) mtu: u32,
    /// Let commands keep every capability: no capability drop, no_new_privs or seccomp, and
    /// /proc/sys and /sys writable (a privileged workload can take over the guest's agent).
    #[arg(long, env = "MATCHLOCK_RUN_PRIVILEGED")]
    pub(crate) privileged: bool,
    /// Boot from scratch: neither resume nor save a warm template of the image (also
    /// `MATCHLOCK_COLD=1` for every sandbox).
    #[arg(long)]
    pub(crate) cold: bool,
}

fn host_env(key: &str) -> Option<String> {
    std::env::var(key).ok()
}

/// `args` as a sandbox configuration. Secret values come from `handed` (what a detached
/// owner's parent gave it), else from the host environment.
fn build_config(args: &RunArgs, handed: &HashMap<String, String>) -> Result<SandboxConfig> {
    if args.sandbox.no_network && !args.publish.is_empty() {
        bail!("--no-network cannot be combined with -p/--publish");
    }
    let mut config = args.sandbox.config(handed)?;
    config.entrypoint = args.entrypoint.as_ref().map(|e| if e.is_empty() { Vec::new() } else { vec![e.clone()] });
    config.command.clone_from(&args.command);
    Ok(config)
}

impl SandboxArgs {
    /// The sandbox configuration these options give (no command). Secret values come from
    /// `handed`, else from the host environment.
    pub(crate) fn config(&self, handed: &HashMap<String, String>) -> Result<SandboxConfig> {
        let mut config = SandboxConfig::new(self.image.clone());
        for file in &self.env_file {
            let contents = std::fs::read_to_string(file).with_context(|| format!("cannot read env file {file}"))?;
            config.env.extend(parse_env_file(file, &contents, host_env)?);
        }
        for spec in &self.env {
            let (key, value) = parse_env(spec, host_env)?;
            config.env.insert(key, value);
        }
        for spec in &self.add_host {
            config.add_hosts.push(parse_add_host(spec)?);
        }
        for spec in &self.disk {
            config.disks.push(matchlock_api::config::parse_disk(spec)?);
        }
        if self.volume.is_empty() && self.workspace.is_some() {
            bail!("--workspace requires at least one -v mount");
        }
        if !self.volume.is_empty() {
            let workspace = self.workspace.clone().unwrap_or_else(|| DEFAULT_WORKSPACE.to_owned());
            let cwd = std::env::current_dir().context("cannot read the current directory")?;
            for spec in &self.volume {
                config.volumes.push(parse_volume(spec, &workspace, &cwd)?);
            }
            config.workspace = Some(workspace);
            config.workspace_quota_mb = Some(self.workspace_quota);
        }
        if let Some(file) = &self.vfs_rules {
            let text =
                std::fs::read_to_string(file).with_context(|| format!("cannot read VFS rules {}", file.display()))?;
            let rules: matchlock_api::config::VfsInterception =
                serde_json::from_str(&text).with_context(|| format!("invalid VFS rules in {}", file.display()))?;
            if rules.emit_events {
                bail!("invalid VFS rules in {}: emit_events needs a JSON-RPC client (matchlock rpc)", file.display());
            }
            config.vfs_interception = Some(rules);
        }
        if !self.dns_servers.is_empty() {
            config.dns_servers.clone_from(&self.dns_servers);
        }
        config.cpus = self.cpus;
        config.memory_mb = self.memory;
        config.disk_size_mb = self.disk_size;
        config.hostname.clone_from(&self.hostname);
        config.user.clone_from(&self.user);
        config.workdir.clone_from(&self.workdir);
        config.privileged = self.privileged;
        config.cold = self.cold;
        if self.no_network {
            config.network = None;
        } else if let Some(network) = config.network.as_mut() {
            network.allowed_hosts =
                self.allow_host.iter().map(|h| h.trim().to_owned()).filter(|h| !h.is_empty()).collect();
            network.intercept = self.network_intercept;
            network.allow_secret_ranges = self.allow_secret_ranges;
            if let Some(file) = &self.network_rules {
                let text = std::fs::read_to_string(file)
                    .with_context(|| format!("cannot read network rules {}", file.display()))?;
                network.interception = Some(
                    serde_json::from_str(&text)
                        .with_context(|| format!("invalid network rules in {}", file.display()))?,
                );
            }
            network.mtu = self.mtu;
            network.audit_max_bytes = self.audit_max_size.saturating_mul(1 << 20);
            network.audit_bodies = self.audit_bodies.unwrap_or(0);
            self.limits.apply(&mut network.limits)?;
            add_secrets(network, &self.secret, handed)?;
        }
        Ok(config)
    }
}

/// Budgets and rate limits on a sandbox's network, enforced by the host (`run` and `limits`).
#[derive(Debug, Default, Args, serde::Serialize, serde::Deserialize)]
pub(crate) struct LimitArgs {
    /// Bytes the guest may send out in all (request bodies, TCP and UDP payloads): `200MB`,
    /// `1G`, `none`. Past it: HTTP 429, new connections refused, transfers cut.
    #[arg(long = "egress-budget", value_name = "SIZE")]
    egress_budget: Option<String>,
    /// Bytes the guest may receive in all, the same way.
    #[arg(long = "ingress-budget", value_name = "SIZE")]
    ingress_budget: Option<String>,
    /// HTTP requests through interception in all (`none`: no limit); past it: 429.
    #[arg(long = "max-requests", value_name = "N")]
    max_requests: Option<String>,
    /// TCP connections the guest may open in all (`none`: no limit); past it: refused.
    #[arg(long = "max-connections", value_name = "N")]
    max_connections: Option<String>,
    /// Request rate to matching hosts: `HOST=N/s`, `N/m` or `N/h` (repeatable; HOST is a
    /// glob); past it: 429 with Retry-After.
    #[arg(long = "rate-limit", value_name = "HOST=N/s")]
    rate_limit: Vec<String>,
}

impl LimitArgs {
    /// Whether any limit is given.
    pub(crate) fn is_empty(&self) -> bool {
        self.egress_budget.is_none()
            && self.ingress_budget.is_none()
            && self.max_requests.is_none()
            && self.max_connections.is_none()
            && self.rate_limit.is_empty()
    }

    /// Sets the limits given in `limits` (rate limits replace the ones there).
    pub(crate) fn apply(&self, limits: &mut matchlock_api::config::NetworkLimits) -> Result<()> {
        use matchlock_api::config::{parse_rate_limit, parse_size};
        let count = |flag: &str, v: &str| -> Result<Option<u64>> {
            if v.eq_ignore_ascii_case("none") {
                return Ok(None);
            }
            v.parse().map(Some).map_err(|_| anyhow::anyhow!("invalid {flag} {v:?}: a number or none"))
        };
        if let Some(v) = &self.egress_budget {
            limits.egress_bytes = parse_size(v).context("invalid --egress-budget")?;
        }
        if let Some(v) = &self.ingress_budget {
            limits.ingress_bytes = parse_size(v).context("invalid --ingress-budget")?;
        }
        if let Some(v) = &self.max_requests {
            limits.max_requests = count("--max-requests", v)?;
        }
        if let Some(v) = &self.max_connections {
            limits.max_connections = count("--max-connections", v)?;
        }
        if !self.rate_limit.is_empty() {
            limits.rate_limits = self
                .rate_limit
                .iter()
                .map(|r| parse_rate_limit(r))
                .collect::<Result<_, _>>()
                .context("invalid --rate-limit")?;
        }
        Ok(())
    }
}

/// Adds `--secret` specs to `network`; values from `handed`, else the host environment.
pub(crate) fn add_secrets(
    network: &mut matchlock_api::config::NetworkConfig,
    specs: &[String],
    handed: &HashMap<String, String>,
) -> Result<()> {
    for spec in specs {
        let secret = parse_secret(spec, |name| handed.get(name).cloned().or_else(|| host_env(name)))?;
        if network.secrets.iter().any(|s| s.name == secret.name) {
            bail!("secret {} given twice", secret.name);
        }
        network.secrets.push(secret);
    }
    Ok(())
}

/// Boots the sandbox, runs the command, and tears down (or, with `--rm=false`, keeps the
/// sandbox until a stop signal). Returns the exit code. With `MATCHLOCK_TIMING` set,
/// prints how long each phase took on stderr.
pub(crate) async fn run(args: RunArgs) -> Result<u8> {
    if args.detach && (args.interactive || args.tty) {
        bail!("--detach cannot be combined with -t/--tty or -i/--interactive");
    }
    if args.timeout == Some(0) {
        bail!("--timeout must be at least 1 second");
    }
    if args.detach {
        return spawn_detached(&args);
    }
    Box::pin(run_sandbox(args, &HashMap::new())).await
}

/// `matchlock detached-owner` (hidden): the owner of a `run -d` sandbox. Its parsed `run`
/// arguments and the secret values arrive on stdin (see [`spawn_detached`]).
pub(crate) async fn detached_owner() -> Result<u8> {
    use tokio::io::AsyncReadExt;
    let mut text = Vec::new();
    tokio::io::stdin().take(16 << 20).read_to_end(&mut text).await.context("cannot read the run from the parent")?;
    let handed: DetachedRun = serde_json::from_slice(&text).context("malformed run from the parent")?;
    let mut args = handed.args;
    args.detached_child = true;
    Box::pin(run_sandbox(args, &handed.secrets)).await
}

/// What a `run -d` hands its detached owner, on the owner's stdin.
#[derive(serde::Deserialize)]
struct DetachedRun {
    args: RunArgs,
    /// Values of secrets given as `NAME@hosts` (taken from the parent's environment).
    secrets: HashMap<String, String>,
}

/// Boots the sandbox of `args` and runs its command (as the owner of a detached sandbox
/// too); `handed` holds the secret values a detached owner's parent gave it.
async fn run_sandbox(args: RunArgs, handed: &HashMap<String, String>) -> Result<u8> {
    let remove = args.rm && !args.detach && !args.detached_child;
    let mode = session::exec_mode(args.interactive, args.tty)?;
    let deadline = args.timeout.map(|s| Instant::now() + Duration::from_secs(s));
    let config = build_config(&args, handed)?;
    let forwards = matchlock_sandbox::forward::parse(&args.publish, &args.address)?;
    let listeners = matchlock_sandbox::forward::bind(&forwards).await?;
    let mut store = open_store()?;
    // Resolve the image and the command before booting: bad input fails fast.
    let image = crate::images::image_for_run(&mut store, &config.image, args.sandbox.pull).await?;
    let composed = match compose(&image.config, &config) {
        Ok(c) => Some(c),
        Err(ComposeError::NoCommand) if !remove => None,
        Err(e) => return Err(e.into()),
    };

    let mut signals = StopSignals::new()?;
    let state = matchlock_sandbox::open_state()?;
    let mut sandbox = tokio::select! {
        created = start_sandbox(args.restore.as_deref(), config, &store, state) => created?,
        () = signals.recv() => bail!("interrupted while booting"),
        () = session::until(deadline) => {
            eprintln!("matchlock: timed out after {} s (while booting)", args.timeout.unwrap_or_default());
            return Ok(124);
        }
    };
    let output = if args.detached_child {
        detach_from_parent(&sandbox)?;
        Output::Log(sandbox.dir().console_log())
    } else {
        if !remove {
            let id = sandbox.id();
            eprintln!("Sandbox {id} is running\n  Connect: matchlock exec {id} -it sh\n  Stop:    matchlock kill {id}");
        }
        Output::Terminal
    };

    crate::vms::announce_forwards(&listeners);
    let _forwarding = matchlock_sandbox::forward::start(sandbox.dir(), listeners);
    let mut timings = sandbox.timings().to_vec();
    let mut code = 0;
    let mut interrupted = session::Interruptions::default();
    let mut failure = None;
    if let Some(composed) = composed {
        let request = composed.into_request(session::initial_window(mode));
        let exec_started = Instant::now();
        let (result, why) =
            session::run(mode, &output, &mut signals, deadline, |io| async { sandbox.exec(mode, &request, io).await })
                .await?;
        timings.push(("exec", exec_started.elapsed()));
        interrupted = why;
        match result {
            Ok(c) => code = c,
            Err(e) => failure = Some(e),
        }
    }
    if !remove && failure.is_none() && !interrupted.stopped && !interrupted.timed_out {
        // Keep the sandbox until asked to stop, the deadline, or the VM's own end.
        tokio::select! {
            () = signals.recv() => {}
            () = session::until(deadline) => interrupted.timed_out = true,
            how = sandbox.exited() => failure = Some(matchlock_sandbox::SandboxError::VmStopped(how)),
        }
    }
    let close_started = Instant::now();
    let closed = sandbox.close(remove).await;
    timings.push(("teardown", close_started.elapsed()));
    if std::env::var_os("MATCHLOCK_TIMING").is_some() {
        let phases: Vec<String> = timings.iter().map(|(name, d)| format!("{name}={}ms", d.as_millis())).collect();
        eprintln!("matchlock: timing {}", phases.join(" "));
    }
    if let Some(e) = failure {
        return Err(e.into());
    }
    closed?;
    if interrupted.timed_out {
        eprintln!("matchlock: timed out after {} s", args.timeout.unwrap_or_default());
        return Ok(124);
    }
    Ok(if remove { u8::try_from(code).unwrap_or(255) } else { 0 })
}

/// A cold boot of `config`, or the snapshot `restore` resumed with `config`'s secret values.
async fn start_sandbox(
    restore: Option<&str>,
    config: SandboxConfig,
    store: &matchlock_image::Store,
    state: matchlock_state::StateDb,
) -> Result<Sandbox, matchlock_sandbox::SandboxError> {
    match restore {
        None => Sandbox::create(config, store, state).await,
        Some(name) => {
            let values: HashMap<String, String> = config
                .network
                .iter()
                .flat_map(|n| n.secrets.iter())
                .map(|s| (s.name.clone(), s.value.clone()))
                .collect();
            Sandbox::restore(name, store, state, matchlock_sandbox::Events::default(), &values).await
        }
    }
}

/// `restore NAME` (and each child of `fork`): a detached owner resuming the snapshot `name`
/// under a new id, printed on stdout. `secrets` are `--secret` specs giving the values of
/// the secrets the snapshot's sandbox sent.
pub(crate) fn restore_detached(name: &str, image: &str, secrets: &[String]) -> Result<u8> {
    await_owner(start_restore_owner(name, image, secrets)?)
}

/// Starts the owner of a sandbox restored from snapshot `name` ([`await_owner`] waits for
/// it): several can resume one snapshot at once (`fork`).
pub(crate) fn start_restore_owner(name: &str, image: &str, secrets: &[String]) -> Result<std::process::Child> {
    use clap::Parser;
    let mut argv = vec!["run".to_owned(), "-d".into(), "--image".into(), image.to_owned()];
    for spec in secrets {
        argv.extend(["--secret".to_owned(), spec.clone()]);
    }
    #[derive(clap::Parser)]
    struct Wrapper {
        #[command(flatten)]
        run: RunArgs,
    }
    let mut args = Wrapper::try_parse_from(argv)?.run;
    args.restore = Some(name.to_owned());
    start_owner(&args)
}

/// `run -d`: starts the sandbox's owner and returns its id once the sandbox is ready.
fn spawn_detached(args: &RunArgs) -> Result<u8> {
    await_owner(start_owner(args)?)
}

/// Starts `matchlock detached-owner` as a session leader that owns the sandbox. The parsed
/// arguments go to the owner on its stdin, with the values of `NAME@hosts` secrets: no
/// secret value sits in the long-lived owner's command line (world-readable in /proc) or
/// its environment (/proc/<pid>/environ, inherited by anything it starts), which loses
/// those variables.
fn start_owner(args: &RunArgs) -> Result<std::process::Child> {
    let mut cmd = std::process::Command::new("/proc/self/exe");
    let mut secrets = HashMap::new();
    for spec in &args.sandbox.secret {
        let Some((left, _hosts)) = spec.rsplit_once('@') else { continue };
        let name = left.split_once('=').map_or(left, |(name, _)| name);
        if name == left {
            if let Some(value) = host_env(name) {
                secrets.insert(name.to_owned(), value);
            }
        }
        cmd.env_remove(name);
    }
    if let Some(filter) = crate::log_filter() {
        cmd.env("RUST_LOG", filter);
    }
    cmd.arg0("matchlock").arg("detached-owner").stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    // SAFETY: setsid is async-signal-safe; it detaches the owner from our terminal.
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid()?;
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("cannot start the sandbox owner")?;
    let mut stdin = child.stdin.take().expect("piped");
    // The shape of [`DetachedRun`].
    let handed = serde_json::to_vec(&serde_json::json!({"args": args, "secrets": secrets}))?;
    // If the owner died at once, its stderr ([`await_owner`]) says why.
    let _ = stdin.write_all(&handed);
    drop(stdin);
    Ok(child)
}

/// Waits for an owner from [`start_owner`]: prints the sandbox id once it is ready, or the
/// owner's error; returns the exit code.
pub(crate) fn await_owner(mut child: std::process::Child) -> Result<u8> {
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().expect("piped")).read_line(&mut line)?;
    let id = line.trim();
    if id.starts_with("vm-") {
        println!("{id}");
        return Ok(0);
    }
    let mut err = String::new();
    child.stderr.take().expect("piped").read_to_string(&mut err)?;
    let status = child.wait()?;
    eprint!("{err}");
    Ok(status.code().and_then(|c| u8::try_from(c).ok()).filter(|c| *c != 0).unwrap_or(1))
}

/// In the detached owner: hand the id to the waiting parent, then let go of its pipes
/// (later messages go to `logs/owner.log`).
fn detach_from_parent(sandbox: &Sandbox) -> Result<()> {
    use std::os::fd::AsRawFd;
    println!("{}", sandbox.id());
    let log_path = sandbox.dir().owner_log();
    let log = matchlock_api::paths::append_private(&log_path)?;
    let null = std::fs::OpenOptions::new().write(true).open("/dev/null")?;
    nix::unistd::dup2(null.as_raw_fd(), 1)?;
    nix::unistd::dup2(log.as_raw_fd(), 2)?;
    Ok(())
}
