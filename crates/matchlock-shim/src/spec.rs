//! From an OCI runtime spec (the bundle's `config.json`) to a sandbox configuration and the
//! container's first process: what the VM is, what runs in it, and what we refuse.

use std::collections::BTreeMap;
use std::path::Path;

use matchlock_api::config::{parse_secret, Interception, VfsMode, VfsMount};
use matchlock_api::SandboxConfig;
use matchlock_protocol::exec::{Bind, ExecMode, ExecRequest, Rlimit, MAX_RLIMITS};
use oci_spec::runtime::{Mount, Process, Spec};

/// The prefix of the annotations that select a container's sandbox policy.
pub const ANNOTATION_PREFIX: &str = "dev.matchlock.";
/// Allow-list of hosts (comma-separated globs), as `run --allow-host`.
pub const ALLOW_HOSTS: &str = "dev.matchlock.allow-hosts";
/// Secrets, `NAME@host[,host]` entries separated by `;`, as `run --secret NAME@hosts`: the
/// value is the spec's environment variable `NAME`, which the VM never sees.
pub const SECRETS: &str = "dev.matchlock.secrets";
/// `true`: the VM gets no network device at all, as `run --no-network`.
pub const NO_NETWORK: &str = "dev.matchlock.no-network";
/// Guest memory in MB (`512`, or `1G`/`512M`), as `run --memory`.
pub const MEMORY: &str = "dev.matchlock.memory";
/// CPUs (`2`, `0.5`), as `run --cpus`.
pub const CPUS: &str = "dev.matchlock.cpus";
/// Size of the VM's writable disk in MB, as `run --disk-size`.
pub const DISK_SIZE: &str = "dev.matchlock.disk-size";
/// `true`: private ranges reachable (the RPC's `block_private_ips: false`); `false`: refused.
/// A pod's default is `true` (it reaches its cluster as on runc), a lone container's `false`.
pub const ALLOW_PRIVATE_IPS: &str = "dev.matchlock.allow-private-ips";

/// Request/response interception rules: the JSON of `run --network-rules`
/// (`{"rules": [...]}`, the RPC's `network.interception`), without a callback socket (the
/// shim runs as root: a pod's author must not have it dial the node's sockets).
pub const NETWORK_RULES: &str = "dev.matchlock.network-rules";

/// CRI's annotation telling a pod's sandbox container (`sandbox`) from its containers.
pub const CRI_CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
/// CRI's memory limit of a pod (bytes), on its sandbox container.
pub const CRI_SANDBOX_MEMORY: &str = "io.kubernetes.cri.sandbox-memory";
/// CRI's CPU quota of a pod (CFS µs per period), on its sandbox container.
pub const CRI_SANDBOX_CPU_QUOTA: &str = "io.kubernetes.cri.sandbox-cpu-quota";
/// CRI's CPU period of a pod (CFS µs), on its sandbox container.
pub const CRI_SANDBOX_CPU_PERIOD: &str = "io.kubernetes.cri.sandbox-cpu-period";
/// CRI's annotation naming the pod (its sandbox container's id).
pub const CRI_SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";

/// What a container is: alone in its VM, a pod's sandbox (its VM is the pod's), or a
/// container of a pod (it runs in the pod's VM).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// Its own VM.
    Alone,
    /// The pod's sandbox container: it boots the pod's VM.
    Pod,
    /// A container of the pod whose sandbox container has this id.
    Member(String),
}

/// The role the spec's CRI annotations give.
pub fn role(spec: &Spec) -> Role {
    let annotations = spec.annotations().clone().unwrap_or_default();
    match (annotations.get(CRI_CONTAINER_TYPE).map(String::as_str), annotations.get(CRI_SANDBOX_ID)) {
        (Some("sandbox"), _) => Role::Pod,
        (Some("container"), Some(pod)) if !pod.is_empty() => Role::Member(pod.clone()),
        _ => Role::Alone,
    }
}

/// The pod a spec's container belongs to (its sandbox id), for grouping a pod's containers
/// in one shim process.
pub fn pod_of(spec: &Spec) -> Option<String> {
    spec.annotations().as_ref()?.get(CRI_SANDBOX_ID).filter(|id| !id.is_empty()).cloned()
}

/// Our annotations of a spec (containerd's CRI passes a pod's to each of its containers when
/// its runtime lists them in `pod_annotations`).
pub fn policy_annotations(spec: &Spec) -> BTreeMap<String, String> {
    spec.annotations()
        .as_ref()
        .map(|a| {
            a.iter().filter(|(k, _)| k.starts_with(ANNOTATION_PREFIX)).map(|(k, v)| (k.clone(), v.clone())).collect()
        })
        .unwrap_or_default()
}

/// Where a pod's VM serves its containers' volumes (its workspace): container `c`'s `n`th
/// volume is served at `<POD_VOLUMES>/c/n` and bound from there into its root.
pub const POD_VOLUMES: &str = "/run/matchlock/volumes";

/// A pod's container, as it runs in the pod's VM.
#[derive(Debug)]
pub struct MemberPlan {
    /// Its init, run with its own root file system and its volumes bound into it.
    pub init: ProcessPlan,
    /// Its volumes (binds of host paths), to serve in the pod's workspace before it starts.
    pub volumes: Vec<VfsMount>,
    /// Values of the pod's secrets this container's environment holds (name, value): the
    /// host substitutes them; the container sees placeholders.
    pub secret_values: Vec<(String, String)>,
}

/// The init of pod container `id`, under the pod's sandbox `pod` (whose policy annotations
/// are `pod_policy`), run with its own root file system at `root` in the pod's VM.
pub fn member_plan(
    id: &str,
    spec: &Spec,
    pod: &SandboxConfig,
    pod_policy: &BTreeMap<String, String>,
    root: &str,
) -> Result<MemberPlan, SpecError> {
    let own = policy_annotations(spec);
    if !own.is_empty() && own != *pod_policy {
        let key = own.keys().find(|k| own.get(*k) != pod_policy.get(*k)).cloned().unwrap_or_default();
        return Err(SpecError::Unsupported(format!(
            "the annotation {key} on a pod's container: a pod's policy is set on the pod (its sandbox)"
        )));
    }
    // The DNS servers of its resolv.conf are the pod's, set by the pod's sandbox.
    let binds = mounts(spec.mounts().as_deref().unwrap_or_default(), &mut SandboxConfig::new(""))?;
    let mut volumes = Vec::new();
    let mut bound = Vec::new();
    for (n, bind) in binds.into_iter().enumerate() {
        let served = format!("{POD_VOLUMES}/{id}/{n}");
        bound.push(Bind {
            source: served.clone(),
            target: bind.guest_path.clone(),
            read_only: bind.mode == VfsMode::Readonly,
        });
        volumes.push(VfsMount { guest_path: served, ..bind });
    }
    let process = spec.process().as_ref().ok_or(SpecError::NoProcess)?;
    let env = env_of(process)?;
    let secrets: Vec<&str> = pod.network.iter().flat_map(|n| &n.secrets).map(|s| s.name.as_str()).collect();
    let secret_values: Vec<(String, String)> = env
        .iter()
        .filter(|(k, v)| secrets.contains(&k.as_str()) && !v.is_empty())
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let mut init = process_plan(process, pod)?;
    // Placeholders only for the secrets this container has.
    init.request.env.retain(|(k, _)| !secrets.contains(&k.as_str()) || env.iter().any(|(e, _)| e == k));
    init.request.root = Some(root.to_owned());
    init.request.binds = bound;
    Ok(MemberPlan { init, volumes, secret_values })
}

/// Every annotation we read; any other under [`ANNOTATION_PREFIX`] is refused as a typo.
const KNOWN: [&str; 8] = [ALLOW_HOSTS, SECRETS, NO_NETWORK, NETWORK_RULES, MEMORY, CPUS, DISK_SIZE, ALLOW_PRIVATE_IPS];

/// Mount points the guest sets up itself for every command (a spec asks for them as a
/// matter of course).
const GUEST_MOUNTS: [(&str, &str); 9] = [
    ("/proc", "proc"),
    ("/sys", "sysfs"),
    ("/sys/fs/cgroup", "cgroup"),
    ("/dev", "tmpfs"),
    ("/dev/pts", "devpts"),
    ("/dev/shm", "tmpfs"),
    ("/dev/mqueue", "mqueue"),
    ("/run", "tmpfs"),
    ("/tmp", "tmpfs"),
];

/// Binds CRI adds that the guest answers itself: the pod's shared memory (the VM's own
/// `/dev/shm`, shared by the pod's containers) and the termination-message file (not read
/// back from the VM).
const GUEST_OWN_BINDS: [&str; 2] = ["/dev/shm", "/dev/termination-log"];

/// Files the guest writes itself from the sandbox's configuration (CRI binds them in).
const GUEST_FILES: [&str; 3] = ["/etc/hosts", "/etc/hostname", "/etc/resolv.conf"];

/// Why a bundle cannot run in a VM.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// config.json is missing or unreadable.
    #[error("cannot read the bundle's config.json")]
    Load(#[source] oci_spec::OciSpecError),
    /// The spec has no process.
    #[error("the spec has no process to run")]
    NoProcess,
    /// The process has no arguments.
    #[error("the spec's process has no args")]
    NoArgs,
    /// A value we cannot pass on.
    #[error("{0}")]
    Invalid(String),
    /// A feature we do not support.
    #[error("not supported by the matchlock runtime: {0}")]
    Unsupported(String),
}

/// A process of the container, as the guest runs it.
#[derive(Debug, Clone)]
pub struct ProcessPlan {
    /// Terminal or pipes.
    pub mode: ExecMode,
    /// What the guest's agent is asked to run.
    pub request: ExecRequest,
}

/// What Create boots and Start runs.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The sandbox, but for its image (the rootfs is converted separately).
    pub config: SandboxConfig,
    /// The container's init.
    pub init: ProcessPlan,
}

/// Reads `bundle/config.json`.
pub fn load(bundle: &Path) -> Result<Spec, SpecError> {
    Spec::load(bundle.join("config.json")).map_err(SpecError::Load)
}

/// The sandbox and init of container `id` from its spec; the sandbox's image (the
/// converted rootfs) is left for the caller to name.
pub fn plan(id: &str, spec: &Spec) -> Result<Plan, SpecError> {
    let annotations = spec.annotations().clone().unwrap_or_default();
    if let Some(unknown) = annotations.keys().find(|k| k.starts_with(ANNOTATION_PREFIX) && !KNOWN.contains(&k.as_str()))
    {
        return Err(SpecError::Invalid(format!("unknown annotation {unknown} (known: {})", KNOWN.join(", "))));
    }
    let process = spec.process().as_ref().ok_or(SpecError::NoProcess)?;
    let mut env = env_of(process)?;

    let mut config = SandboxConfig::new("");
    // The VM's boot disk is its own; nothing from the process is implied by the image.
    config.entrypoint = Some(Vec::new());
    config.hostname = Some(spec.hostname().clone().filter(|h| !h.is_empty()).unwrap_or_else(|| hostname_from(id)));
    resources(spec, &annotations, &mut config)?;
    let binds = mounts(spec.mounts().as_deref().unwrap_or_default(), &mut config)?;
    if role(spec) == Role::Pod {
        // The pod's containers bring their volumes later; the pod's sandbox has none.
        if let Some(bind) = binds.first() {
            return Err(SpecError::Unsupported(format!("a volume at {} on a pod's sandbox", bind.guest_path)));
        }
        config.workspace = Some(POD_VOLUMES.to_owned());
    } else if !binds.is_empty() {
        let workspace = common_parent(binds.iter().map(|b| b.guest_path.as_str()));
        if workspace == "/" {
            return Err(SpecError::Unsupported(format!(
                "bind mounts at {}: they must share a directory below / (they are served as one file system)",
                binds.iter().map(|b| b.guest_path.as_str()).collect::<Vec<_>>().join(", ")
            )));
        }
        config.workspace = Some(workspace);
        config.volumes = binds;
    }
    network(&annotations, role(spec) == Role::Pod, network_namespace(spec), &mut env, &mut config)?;
    config.env = env.iter().cloned().collect::<BTreeMap<_, _>>();

    let init = process_plan(process, &config)?;
    config.command.clone_from(&init.request.argv);
    Ok(Plan { config, init })
}

/// A process of the container (its init, or one `ctr task exec` adds) under `config`.
pub fn process_plan(process: &Process, config: &SandboxConfig) -> Result<ProcessPlan, SpecError> {
    let argv = process.args().clone().unwrap_or_default();
    if argv.is_empty() {
        return Err(SpecError::NoArgs);
    }
    if argv.iter().any(|a| a.contains('\0')) {
        return Err(SpecError::Invalid("an argument contains a NUL byte".into()));
    }
    // The secrets' values never reach the guest: their names get placeholders instead.
    let secret_names: Vec<&str> = config.network.iter().flat_map(|n| &n.secrets).map(|s| s.name.as_str()).collect();
    let mut with_env = config.clone();
    with_env.env = env_of(process)?.into_iter().filter(|(k, _)| !secret_names.contains(&k.as_str())).collect();
    let user = process.user();
    with_env.user = Some(format!("{}:{}", user.uid(), user.gid()));
    let cwd = process.cwd().to_string_lossy().into_owned();
    with_env.workdir = Some(if cwd.is_empty() { "/".into() } else { cwd });
    let composed = matchlock_sandbox::compose_command(&Default::default(), &with_env, argv)
        .map_err(|e| SpecError::Invalid(e.to_string()))?;
    let terminal = process.terminal().unwrap_or(false);
    let window = process.console_size().as_ref().map(|b| matchlock_protocol::exec::WindowSize {
        rows: u16::try_from(b.height()).unwrap_or(u16::MAX),
        cols: u16::try_from(b.width()).unwrap_or(u16::MAX),
    });
    let mode = if terminal { ExecMode::Tty } else { ExecMode::Pipe };
    let mut request = composed.into_request(if terminal { window } else { None });
    request.rlimits = rlimits(process)?;
    Ok(ProcessPlan { mode, request })
}

/// The spec's `rlimits`, as the guest applies them before the command runs.
fn rlimits(process: &Process) -> Result<Vec<Rlimit>, SpecError> {
    let limits = process.rlimits().as_deref().unwrap_or_default();
    if limits.len() > MAX_RLIMITS {
        return Err(SpecError::Invalid(format!("{} rlimits (at most {MAX_RLIMITS})", limits.len())));
    }
    limits
        .iter()
        .map(|l| {
            // Both use the spec's names (`RLIMIT_NOFILE`).
            let name = serde_json::to_value(l.typ()).map_err(|e| SpecError::Invalid(e.to_string()))?;
            let resource = serde_json::from_value(name.clone())
                .map_err(|_| SpecError::Unsupported(format!("the rlimit {name}")))?;
            if l.soft() > l.hard() {
                return Err(SpecError::Invalid(format!("rlimit {name}: soft {} above hard {}", l.soft(), l.hard())));
            }
            Ok(Rlimit { resource, soft: l.soft(), hard: l.hard() })
        })
        .collect()
}

/// The spec's `KEY=VALUE` environment, in order.
fn env_of(process: &Process) -> Result<Vec<(String, String)>, SpecError> {
    let mut out = Vec::new();
    for entry in process.env().as_deref().unwrap_or_default() {
        let (k, v) = entry.split_once('=').unwrap_or((entry.as_str(), ""));
        if k.is_empty() || entry.contains('\0') {
            return Err(SpecError::Invalid(format!("invalid environment entry {entry:?}")));
        }
        out.push((k.to_owned(), v.to_owned()));
    }
    Ok(out)
}

/// A hostname from a container id: letters, digits and `-`, at most 63 characters.
fn hostname_from(id: &str) -> String {
    let name: String = id.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '-' }).take(63).collect();
    let name = name.trim_matches('-');
    if name.is_empty() {
        "matchlock".into()
    } else {
        name.to_owned()
    }
}

fn flag(annotations: &std::collections::HashMap<String, String>, key: &str) -> Result<bool, SpecError> {
    match annotations.get(key).map(|v| v.trim()) {
        None | Some("false") => Ok(false),
        Some("true") => Ok(true),
        Some(other) => Err(SpecError::Invalid(format!("annotation {key}: expected true or false, got {other:?}"))),
    }
}

/// Memory, CPUs and disk: our annotations first, then the spec's limits.
fn resources(
    spec: &Spec,
    annotations: &std::collections::HashMap<String, String>,
    config: &mut SandboxConfig,
) -> Result<(), SpecError> {
    let limits = spec.linux().as_ref().and_then(|l| l.resources().clone());
    // CRI's sizing of a pod (the sum of its containers' limits), in bytes and CFS units.
    let cri = |key: &str| annotations.get(key).and_then(|v| v.trim().parse::<i64>().ok()).filter(|v| *v > 0);
    if let Some(v) = annotations.get(MEMORY) {
        config.memory_mb = parse_mb(v).ok_or_else(|| SpecError::Invalid(format!("annotation {MEMORY}: {v:?}")))?;
    } else if let Some(bytes) = cri(CRI_SANDBOX_MEMORY) {
        config.memory_mb = (bytes as u64).div_ceil(1 << 20).max(64);
    } else if let Some(bytes) = limits.as_ref().and_then(|r| r.memory().as_ref()).and_then(|m| m.limit()) {
        if bytes > 0 {
            config.memory_mb = (bytes as u64).div_ceil(1 << 20).max(64);
        }
    }
    if let Some(v) = annotations.get(CPUS) {
        config.cpus = v
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|c| *c > 0.0 && c.is_finite())
            .ok_or_else(|| SpecError::Invalid(format!("annotation {CPUS}: {v:?}")))?;
    } else if let (Some(quota), Some(period)) = (cri(CRI_SANDBOX_CPU_QUOTA), cri(CRI_SANDBOX_CPU_PERIOD)) {
        config.cpus = quota as f64 / period as f64;
    } else if let Some(cpu) = limits.as_ref().and_then(|r| r.cpu().as_ref()) {
        if let (Some(quota), Some(period)) = (cpu.quota(), cpu.period()) {
            if quota > 0 && period > 0 {
                config.cpus = quota as f64 / period as f64;
            }
        }
    }
    if let Some(v) = annotations.get(DISK_SIZE) {
        config.disk_size_mb =
            parse_mb(v).ok_or_else(|| SpecError::Invalid(format!("annotation {DISK_SIZE}: {v:?}")))?;
    }
    Ok(())
}

/// `512`, `512M`, `2G` → MB.
fn parse_mb(v: &str) -> Option<u64> {
    let v = v.trim();
    let (digits, factor) = match v.strip_suffix(['G', 'g']) {
        Some(d) => (d, 1024),
        None => (v.strip_suffix(['M', 'm']).unwrap_or(v), 1),
    };
    digits.parse::<u64>().ok().filter(|n| *n > 0).and_then(|n| n.checked_mul(factor))
}

/// The spec's binds of host paths (to serve through the workspace, at their destination);
/// what the guest provides anyway is accepted, anything else is refused. A resolv.conf
/// given sets `config`'s DNS servers.
fn mounts(mounts: &[Mount], config: &mut SandboxConfig) -> Result<Vec<VfsMount>, SpecError> {
    let mut binds = Vec::new();
    for m in mounts {
        let dest = m.destination().to_string_lossy().into_owned();
        let typ = m.typ().clone().unwrap_or_default();
        let options = m.options().clone().unwrap_or_default();
        let is_bind = typ == "bind" || options.iter().any(|o| o == "bind" || o == "rbind");
        if !is_bind {
            let provided =
                GUEST_MOUNTS.iter().any(|(d, t)| *d == dest && (*t == typ || (*t == "cgroup" && typ == "cgroup2")));
            if provided {
                continue;
            }
            return Err(SpecError::Unsupported(format!(
                "a {typ:?} mount at {dest} (the guest provides /proc, /sys, /dev, /dev/pts, /dev/shm, /dev/mqueue, /run \
                 and /tmp; other mounts must be binds of host paths)"
            )));
        }
        let source = m.source().as_ref().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        if GUEST_OWN_BINDS.contains(&dest.as_str()) {
            // The guest's own (a pod's shared memory is the VM's); nothing to serve.
            continue;
        }
        if GUEST_FILES.contains(&dest.as_str()) {
            // The sandbox writes these from its own configuration (hostname, DNS, hosts);
            // the name servers of a resolv.conf given (CRI writes the pod's) become its DNS.
            if dest == "/etc/resolv.conf" {
                let servers = name_servers(&std::fs::read_to_string(&source).unwrap_or_default());
                if !servers.is_empty() {
                    config.dns_servers = servers;
                }
            }
            continue;
        }
        if !source.starts_with('/') || !dest.starts_with('/') || dest == "/" {
            return Err(SpecError::Invalid(format!("bind mount {source:?} at {dest:?}: paths must be absolute")));
        }
        let read_only = options.iter().any(|o| o == "ro");
        let mode = if read_only { VfsMode::Readonly } else { VfsMode::HostFs };
        binds.push(VfsMount { host_path: source, guest_path: dest.trim_end_matches('/').to_owned(), mode });
    }
    Ok(binds)
}

/// The `nameserver` addresses of a resolv.conf.
fn name_servers(resolv_conf: &str) -> Vec<std::net::IpAddr> {
    resolv_conf
        .lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|rest| rest.trim().parse().ok())
        .collect()
}

/// The deepest directory containing every path (a single path is its own parent).
fn common_parent<'a>(mut paths: impl Iterator<Item = &'a str>) -> String {
    let first: Vec<&str> = paths.next().unwrap_or("/").split('/').filter(|c| !c.is_empty()).collect();
    let mut common = first.len();
    for p in paths {
        let parts: Vec<&str> = p.split('/').filter(|c| !c.is_empty()).collect();
        common = common.min(first.iter().zip(&parts).take_while(|(a, b)| a == b).count());
    }
    format!("/{}", first[..common].join("/"))
}

/// The network namespace the spec joins (`ctr run --with-ns network:PATH`, a CRI pod's):
/// the sandbox's upstream traffic leaves from it.
fn network_namespace(spec: &Spec) -> Option<String> {
    let namespaces = spec.linux().as_ref()?.namespaces().clone()?;
    namespaces
        .iter()
        .find(|ns| ns.typ() == oci_spec::runtime::LinuxNamespaceType::Network)
        .and_then(|ns| ns.path().as_ref())
        .map(|p| p.to_string_lossy().into_owned())
}

/// Network policy from the annotations and the spec's network namespace; secrets take their
/// values out of `env`.
fn network(
    annotations: &std::collections::HashMap<String, String>,
    pod: bool,
    netns: Option<String>,
    env: &mut Vec<(String, String)>,
    config: &mut SandboxConfig,
) -> Result<(), SpecError> {
    let no_network = flag(annotations, NO_NETWORK)?;
    // A pod reaches its cluster (services, the node) as on runc unless told otherwise; a
    // container alone gets `matchlock run`'s default.
    let allow_private = match annotations.get(ALLOW_PRIVATE_IPS) {
        None => pod,
        Some(_) => flag(annotations, ALLOW_PRIVATE_IPS)?,
    };
    let hosts: Vec<String> = annotations
        .get(ALLOW_HOSTS)
        .map(|v| v.split(',').map(str::trim).filter(|h| !h.is_empty()).map(str::to_owned).collect())
        .unwrap_or_default();
    let secret_specs: Vec<&str> = annotations
        .get(SECRETS)
        .map(|v| v.split(';').map(str::trim).filter(|s| !s.is_empty()).collect())
        .unwrap_or_default();
    let rules = annotations
        .get(NETWORK_RULES)
        .map(|json| {
            let rules: Interception = serde_json::from_str(json)
                .map_err(|e| SpecError::Invalid(format!("annotation {NETWORK_RULES}: {e}")))?;
            if rules.callback_socket.is_some() || rules.rules.iter().any(|r| !r.callback_id.is_empty()) {
                return Err(SpecError::Unsupported(format!(
                    "callbacks in annotation {NETWORK_RULES} (the rules' own edits and blocks are)"
                )));
            }
            Ok(rules)
        })
        .transpose()?;
    if no_network {
        if !hosts.is_empty() || !secret_specs.is_empty() || rules.is_some() {
            return Err(SpecError::Invalid(format!(
                "{NO_NETWORK} conflicts with {ALLOW_HOSTS}, {SECRETS} and {NETWORK_RULES}"
            )));
        }
        config.network = None;
        return Ok(());
    }
    let network = config.network.get_or_insert_with(Default::default);
    network.interception = rules;
    network.netns = netns;
    network.allowed_hosts = hosts;
    network.block_private_ips = !allow_private;
    for spec in secret_specs {
        // A pod's secret gets its value from the pod's containers (their env), later.
        let lookup =
            |name: &str| env.iter().rev().find(|(k, _)| k == name).map(|(_, v)| v.clone()).or(pod.then(String::new));
        let secret =
            parse_secret(spec, lookup).map_err(|e| SpecError::Invalid(format!("annotation {SECRETS}: {e}")))?;
        if secret.value.is_empty() && !pod {
            return Err(SpecError::Invalid(format!(
                "annotation {SECRETS}: the container's environment has no value for {}",
                secret.name
            )));
        }
        env.retain(|(k, _)| *k != secret.name);
        network.secrets.push(secret);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: serde_json::Value) -> Spec {
        serde_json::from_value(json).expect("spec")
    }

    fn base(extra: serde_json::Value) -> Spec {
        let mut v = serde_json::json!({
            "ociVersion": "1.0.2",
            "process": {"args": ["sh", "-c", "echo hi"], "env": ["PATH=/bin", "TOKEN=s3cret"], "cwd": "/srv",
                        "user": {"uid": 1000, "gid": 100}, "terminal": false},
            "root": {"path": "rootfs"},
            "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"},
                       {"destination": "/dev", "type": "tmpfs", "source": "tmpfs"}],
        });
        let serde_json::Value::Object(extra) = extra else { panic!("an object") };
        for (k, x) in extra {
            v[k] = x;
        }
        spec(v)
    }

    #[test]
    fn a_plain_spec_runs_its_process_with_the_run_defaults() {
        let plan = plan("web", &base(serde_json::json!({}))).expect("plan");
        assert_eq!(plan.init.request.argv, ["sh", "-c", "echo hi"]);
        assert_eq!(plan.init.request.working_dir.as_deref(), Some("/srv"));
        assert_eq!(plan.init.request.user.as_deref(), Some("1000:100"));
        assert!(plan.init.request.env.contains(&("TOKEN".into(), "s3cret".into())));
        assert_eq!(plan.init.mode, ExecMode::Pipe);
        assert!(plan.init.request.rlimits.is_empty());
        assert_eq!(plan.config.hostname.as_deref(), Some("web"));
        let net = plan.config.network.expect("network on by default");
        assert_eq!(net.netns, None, "the host's own network namespace by default");
        assert!(net.allowed_hosts.is_empty() && !net.intercepts(), "interception off by default");
    }

    #[test]
    fn a_secret_value_is_replaced_by_its_placeholder_and_kept_on_the_host() {
        let s = base(serde_json::json!({"annotations": {
            ALLOW_HOSTS: "api.example.com", SECRETS: "TOKEN@api.example.com"}}));
        let plan = plan("c", &s).expect("plan");
        let net = plan.config.network.as_ref().expect("network");
        assert_eq!(net.secrets[0].value, "s3cret");
        let env = &plan.init.request.env;
        let token = env.iter().find(|(k, _)| k == "TOKEN").expect("TOKEN set");
        assert_eq!(token.1, net.secrets[0].placeholder);
        assert!(!format!("{:?}{:?}", env, plan.config.env).contains("s3cret"), "the value never goes to the guest");
        // An exec'd process that names the variable gets the placeholder too.
        let exec = process_plan(s.process().as_ref().expect("process"), &plan.config).expect("exec plan");
        assert!(!format!("{:?}", exec.request.env).contains("s3cret"));
    }

    #[test]
    fn a_secret_without_a_value_or_an_unknown_annotation_fails() {
        let s = base(serde_json::json!({"annotations": {SECRETS: "MISSING@h"}}));
        assert!(plan("c", &s).unwrap_err().to_string().contains("MISSING"));
        let s = base(serde_json::json!({"annotations": {"dev.matchlock.alow-hosts": "x"}}));
        assert!(plan("c", &s).unwrap_err().to_string().contains("unknown annotation"));
    }

    #[test]
    fn interception_rules_come_from_their_annotation_without_callbacks() {
        let rules = r#"{"rules": [{"name": "tag", "hosts": ["api.example.com"], "action": "mutate",
            "set_headers": {"X-Pod": "agent"}}]}"#;
        let s = base(serde_json::json!({"annotations": {NETWORK_RULES: rules}}));
        let net = plan("c", &s).expect("plan").config.network.expect("network");
        let interception = net.interception.as_ref().expect("rules");
        assert_eq!(interception.rules[0].set_headers["X-Pod"], "agent");
        assert!(net.intercepts(), "rules turn interception on");
        for (value, wanted) in [
            (r#"{"rules": [], "callback_socket": "/run/containerd/containerd.sock"}"#, "callbacks"),
            (r#"{"rules": [{"name": "ask", "callback_id": "x"}]}"#, "callbacks"),
            (r#"{"rules": [{"name": "typo", "acton": "block"}]}"#, "acton"),
        ] {
            let s = base(serde_json::json!({"annotations": {NETWORK_RULES: value}}));
            let err = plan_err(&s).to_string();
            assert!(err.contains(wanted), "{value}: {err}");
        }
        let s = base(serde_json::json!({"annotations": {NETWORK_RULES: rules, NO_NETWORK: "true"}}));
        assert!(plan_err(&s).to_string().contains("conflicts"));
    }

    #[test]
    fn binds_are_served_through_the_workspace_and_other_mounts_are_refused() {
        let s = base(serde_json::json!({"mounts": [
            {"destination": "/data/in", "type": "bind", "source": "/srv/in", "options": ["rbind", "ro"]},
            {"destination": "/data/out", "type": "bind", "source": "/srv/out", "options": ["rbind", "rw"]},
            {"destination": "/etc/resolv.conf", "type": "bind", "source": "/x/resolv.conf", "options": ["rbind"]},
        ]}));
        let plan = plan("c", &s).expect("plan");
        assert_eq!(plan.config.workspace.as_deref(), Some("/data"));
        assert_eq!(plan.config.volumes.len(), 2);
        assert_eq!(plan.config.volumes[0].mode, VfsMode::Readonly);
        assert_eq!(plan.config.volumes[1].mode, VfsMode::HostFs);
        let s = base(serde_json::json!({"mounts": [{"destination": "/cache", "type": "tmpfs", "source": "tmpfs"}]}));
        assert!(matches!(plan_err(&s), SpecError::Unsupported(_)));
        let s = base(serde_json::json!({"mounts": [
            {"destination": "/a", "type": "bind", "source": "/x", "options": ["rbind"]},
            {"destination": "/b", "type": "bind", "source": "/y", "options": ["rbind"]}]}));
        assert!(matches!(plan_err(&s), SpecError::Unsupported(_)));
    }

    fn plan_err(s: &Spec) -> SpecError {
        plan("c", s).expect_err("refused")
    }

    #[test]
    fn resources_come_from_annotations_then_from_the_spec() {
        let s = base(
            serde_json::json!({"linux": {"resources": {"memory": {"limit": 268435456}, "cpu": {"quota": 50000, "period": 100000}}}}),
        );
        let p = plan("c", &s).expect("plan");
        assert_eq!((p.config.memory_mb, p.config.cpus), (256, 0.5));
        let s = base(serde_json::json!({"annotations": {MEMORY: "1G", CPUS: "2"}}));
        let p = plan("c", &s).expect("plan");
        assert_eq!((p.config.memory_mb, p.config.cpus), (1024, 2.0));
        assert!(plan("c", &base(serde_json::json!({"annotations": {MEMORY: "lots"}}))).is_err());
        let s = base(serde_json::json!({"annotations": {CRI_SANDBOX_MEMORY: "805306368",
            CRI_SANDBOX_CPU_QUOTA: "150000", CRI_SANDBOX_CPU_PERIOD: "100000"}}));
        let p = plan("c", &s).expect("plan");
        assert_eq!((p.config.memory_mb, p.config.cpus), (768, 1.5), "a pod sized by CRI");
    }

    #[test]
    fn the_specs_network_namespace_carries_the_upstream_traffic() {
        let s = base(serde_json::json!({"linux": {"namespaces": [{"type": "pid"},
            {"type": "network", "path": "/var/run/netns/pod1"}]}}));
        let net = plan("c", &s).expect("plan").config.network.expect("network");
        assert_eq!(net.netns.as_deref(), Some("/var/run/netns/pod1"));
        let s = base(serde_json::json!({"linux": {"namespaces": [{"type": "network"}]}}));
        assert_eq!(plan("c", &s).expect("plan").config.network.expect("network").netns, None, "a new namespace: ours");
    }

    #[test]
    fn rlimits_are_passed_by_their_spec_names() {
        let s = base(serde_json::json!({"process": {"args": ["x"], "cwd": "/", "user": {"uid": 0, "gid": 0},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 512}]}}));
        let p = plan("c", &s).expect("plan");
        let r = p.init.request.rlimits[0];
        assert_eq!((r.resource, r.soft, r.hard), (matchlock_protocol::exec::RlimitResource::RlimitNofile, 512, 1024));
        let s = base(serde_json::json!({"process": {"args": ["x"], "cwd": "/", "user": {"uid": 0, "gid": 0},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1, "soft": 2}]}}));
        assert!(plan("c", &s).is_err());
    }

    #[test]
    fn no_process_or_no_args_fail_with_what_is_missing() {
        let mut s = base(serde_json::json!({}));
        s.set_process(None);
        assert!(matches!(plan_err(&s), SpecError::NoProcess));
        let s = base(serde_json::json!({"process": {"args": [], "cwd": "/", "user": {"uid": 0, "gid": 0}}}));
        assert!(matches!(plan_err(&s), SpecError::NoArgs));
    }

    #[test]
    fn cri_annotations_give_the_pod_roles() {
        assert_eq!(role(&base(serde_json::json!({}))), Role::Alone);
        let pod = base(serde_json::json!({"annotations": {CRI_CONTAINER_TYPE: "sandbox", CRI_SANDBOX_ID: "p1"}}));
        assert_eq!(role(&pod), Role::Pod);
        assert_eq!(pod_of(&pod).as_deref(), Some("p1"));
        let member = base(serde_json::json!({"annotations": {CRI_CONTAINER_TYPE: "container", CRI_SANDBOX_ID: "p1"}}));
        assert_eq!(role(&member), Role::Member("p1".into()));
        let pod_config = plan("p1", &pod).expect("plan").config;
        assert!(!pod_config.network.as_ref().expect("network").block_private_ips, "a pod reaches its cluster");
        let none = BTreeMap::new();
        let p =
            member_plan("c", &member, &pod_config, &none, "/run/matchlock/containers/c/rootfs").expect("member plan");
        assert_eq!(p.init.request.root.as_deref(), Some("/run/matchlock/containers/c/rootfs"));
        let with_policy =
            base(serde_json::json!({"annotations": {CRI_CONTAINER_TYPE: "container", CRI_SANDBOX_ID: "p1",
            ALLOW_HOSTS: "x"}}));
        assert!(matches!(member_plan("c", &with_policy, &pod_config, &none, "/r"), Err(SpecError::Unsupported(_))));
        let passed_through = policy_annotations(&with_policy);
        member_plan("c", &with_policy, &pod_config, &passed_through, "/r")
            .expect("the pod's own annotations, passed through");
        let mut with_volume = member;
        let cri_binds: Vec<Mount> = serde_json::from_value(serde_json::json!([
            {"destination": "/dev/shm", "type": "bind", "source": "/run/x/shm", "options": ["rbind", "ro"]},
            {"destination": "/dev/termination-log", "type": "bind", "source": "/var/lib/x/t", "options": ["rbind"]},
            {"destination": "/etc/hosts", "type": "bind", "source": "/var/lib/x/hosts", "options": ["rbind"]},
        ]))
        .unwrap();
        with_volume.set_mounts(Some(cri_binds.clone()));
        member_plan("c", &with_volume, &pod_config, &none, "/r").expect("CRI's own binds are the guest's");
        let mut binds = cri_binds;
        binds.push(
            serde_json::from_value(serde_json::json!(
            {"destination": "/config", "type": "bind", "source": "/var/lib/kubelet/x", "options": ["rbind", "ro"]}))
            .unwrap(),
        );
        with_volume.set_mounts(Some(binds));
        let m = member_plan("c", &with_volume, &pod_config, &none, "/r").expect("a volume is served");
        assert_eq!(m.volumes.len(), 1, "CRI's own binds are not served: {:?}", m.volumes);
        let served = &m.volumes[0];
        assert_eq!(
            (served.host_path.as_str(), served.guest_path.as_str(), served.mode),
            ("/var/lib/kubelet/x", "/run/matchlock/volumes/c/0", VfsMode::Readonly)
        );
        let bind = &m.init.request.binds[0];
        assert_eq!(
            (bind.source.as_str(), bind.target.as_str(), bind.read_only),
            (served.guest_path.as_str(), "/config", true)
        );
        assert_eq!(pod_config.workspace.as_deref(), Some(POD_VOLUMES), "the pod's VM serves its containers' volumes");
    }

    #[test]
    fn a_pods_secret_takes_its_value_from_the_container_that_has_it() {
        let pod_spec =
            base(serde_json::json!({"process": {"args": ["sleep", "1"], "cwd": "/", "user": {"uid": 0, "gid": 0}},
            "annotations": {CRI_CONTAINER_TYPE: "sandbox", CRI_SANDBOX_ID: "p", SECRETS: "KEY@api.test"}}));
        let pod = plan("p", &pod_spec).expect("a pod's secret needs no value of its own").config;
        let secret = &pod.network.as_ref().expect("network").secrets[0];
        assert!(secret.value.is_empty() && secret.placeholder.starts_with("SANDBOX_SECRET_"));
        let policy = policy_annotations(&pod_spec);
        let member = base(serde_json::json!({"annotations": {CRI_CONTAINER_TYPE: "container", CRI_SANDBOX_ID: "p",
            SECRETS: "KEY@api.test"}, "process": {"args": ["sh"], "cwd": "/", "user": {"uid": 0, "gid": 0},
            "env": ["PATH=/bin", "KEY=the-value"]}}));
        let m = member_plan("c", &member, &pod, &policy, "/r").expect("member");
        assert_eq!(m.secret_values, [("KEY".to_owned(), "the-value".to_owned())]);
        let env = &m.init.request.env;
        assert!(env.contains(&("KEY".into(), secret.placeholder.clone())), "{env:?}");
        assert!(!format!("{env:?}").contains("the-value"));
        let other = base(serde_json::json!({"annotations": {CRI_CONTAINER_TYPE: "container", CRI_SANDBOX_ID: "p"},
            "process": {"args": ["sh"], "cwd": "/", "user": {"uid": 0, "gid": 0}, "env": ["PATH=/bin"]}}));
        let o = member_plan("c", &other, &pod, &policy, "/r").expect("member");
        assert!(
            o.secret_values.is_empty() && !o.init.request.env.iter().any(|(k, _)| k == "KEY"),
            "no placeholder without the secret"
        );
    }

    #[test]
    fn hostnames_from_ids_are_valid() {
        assert_eq!(hostname_from("my_container.1"), "my-container-1");
        assert_eq!(hostname_from("__"), "matchlock");
        assert_eq!(common_parent(["/data/a", "/data/b/c"].into_iter()), "/data");
        assert_eq!(common_parent(["/data"].into_iter()), "/data");
        let servers =
            name_servers("# pod\nsearch ns.svc\nnameserver 10.96.0.10\nnameserver bogus\n nameserver 1.1.1.1\n");
        assert_eq!(servers, ["10.96.0.10".parse::<std::net::IpAddr>().unwrap(), "1.1.1.1".parse().unwrap()]);
    }
}
