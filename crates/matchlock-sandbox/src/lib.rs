//! Sandbox orchestration: resolve the image, prepare the VM's disks, boot it, run
//! commands in it over the guest protocol, and tear everything down.

mod boot_disk;
pub mod build;
mod command;
pub mod commit;
mod exec;
pub mod fetch;
mod files;
pub mod forward;
pub mod gc;
pub mod logfile;
pub mod network;
pub mod relay;
mod sampled;
pub mod snapshot;
pub mod stats;
pub mod template;
pub mod volumes;
mod workspace;

use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use matchlock_api::config::VfsMount;
use matchlock_api::paths::{cache_dir, state_dir, VmDir};
use matchlock_api::SandboxConfig;
use matchlock_image::{ImageRecord, Store, StoreError};
use matchlock_protocol::boot::BootParams;
use matchlock_protocol::exec::GuestMessage;
use matchlock_protocol::frame::tokio_io::{read_frame, write_frame};
use matchlock_protocol::frame::FrameType;
use matchlock_protocol::EXEC_PORT;
use matchlock_state::{Phase, StateDb, StateError, Status, Vm};
use matchlock_vm::{device_name, kernel, tools, Backend, Disk, Machine, MachineSpec, VmError};
use snapshot::SnapshotMeta;

pub use command::{compose, compose_command, compose_exec, ComposeError, Composed};
pub use exec::{exec_via_relay, Control, ExecIo};
pub use workspace::MAX_VFS_CONNECTIONS;

/// Most of the guest's error output kept when quiescing fails.
const MAX_QUIESCE_ERROR: usize = 4096;
/// How long a guest may take to signal readiness (TCG boots take ~2 s here).
const BOOT_TIMEOUT: Duration = Duration::from_secs(60);

/// Errors creating or using a sandbox.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// The image is not in the local store.
    #[error("image not found: {0} (pull it, or import it with `matchlock image import {0} < image.tar`)")]
    ImageNotFound(String),
    /// The image store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The VM failed.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// Preparing a disk failed.
    #[error("cannot prepare {what}")]
    Disk {
        /// Which disk.
        what: String,
        /// Why.
        #[source]
        source: matchlock_image::ext4::Ext4Error,
    },
    /// The command cannot be composed.
    #[error(transparent)]
    Compose(#[from] ComposeError),
    /// The configuration is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// Talking to the guest failed.
    #[error("guest protocol error")]
    Protocol(#[from] matchlock_protocol::frame::FrameError),
    /// The VM stopped while a command was running.
    #[error("the sandbox VM stopped while the command was running ({0})")]
    VmStopped(String),
    /// The state database failed.
    #[error(transparent)]
    State(#[from] StateError),
    /// A named volume operation failed (`named volume not found: x`, …).
    #[error("{0}")]
    Volume(String),
    /// A guest file operation failed (the guest's message).
    #[error("{0}")]
    File(String),
    /// The exec relay of another process's sandbox failed.
    #[error("{0}")]
    Relay(String),
    /// The sandbox network could not start.
    #[error("cannot start the sandbox network")]
    Network(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// A warm template did not resume (it was discarded: the next run boots cold).
    #[error("cannot resume the warm template of this image (discarded: run again, or pass --cold)")]
    Template(#[source] Box<VmError>),
    /// Host-side I/O failed.
    #[error("{context}")]
    Io {
        /// What was being done.
        context: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> SandboxError {
    let context = context.into();
    move |source| SandboxError::Io { context, source }
}

/// Logs the error of a step whose failure must not stop what follows (cleanup, recording).
fn logged<T, E: std::error::Error>(result: Result<T, E>, step: &str) {
    if let Err(e) = result {
        tracing::warn!("{step} failed: {}", error_chain(&e));
    }
}

/// `e` and its sources, `: `-separated (how front ends print an error).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// A new random VM id: `vm-` and 8 hex digits.
pub fn new_vm_id() -> Result<String, SandboxError> {
    Ok(format!("vm-{}", hex::encode(random_bytes(4)?)))
}

/// `n` bytes from the kernel's generator.
fn random_bytes(n: usize) -> Result<Vec<u8>, SandboxError> {
    let mut bytes = vec![0u8; n];
    matchlock_vm::host_random(&mut bytes).map_err(io_err("cannot read /dev/urandom"))?;
    Ok(bytes)
}

/// A running sandbox.
#[derive(Debug)]
pub struct Sandbox {
    id: String,
    dir: VmDir,
    image: ImageRecord,
    config: SandboxConfig,
    machine: Option<Box<dyn Machine>>,
    /// Behind a mutex only so that a sandbox can be shared between tasks (`Sync`).
    state: std::sync::Mutex<StateDb>,
    relay: Option<tokio::task::JoinHandle<()>>,
    network: Option<Arc<network::Network>>,
    vfs: Option<tokio::task::JoinHandle<()>>,
    /// The workspace's mounts (volumes may be added while the sandbox runs).
    workspace: Option<Arc<matchlock_vfs::Router>>,
    /// The scratch slot of the next volume added while running (boot's come first).
    next_volume_slot: std::sync::atomic::AtomicUsize,
    /// Commands started (here and through the relay).
    execs: Arc<std::sync::atomic::AtomicU64>,
    timings: Vec<(&'static str, Duration)>,
    /// The metadata of this sandbox's snapshots, but for their name.
    snapshot_base: SnapshotMeta,
}

/// Observers of what a sandbox does (the JSON-RPC `event` notifications).
#[derive(Default)]
pub struct Events {
    /// Workspace operations, when the configuration sets `vfs_interception.emit_events`.
    pub file: Option<matchlock_vfs::EventSink>,
    /// Intercepted HTTP requests.
    pub network: Option<matchlock_net::EventSink>,
    /// Every record of the egress audit (HTTP, TCP, UDP, DNS).
    pub audit: Option<matchlock_net::audit::RecordSink>,
}

impl std::fmt::Debug for Events {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Events")
            .field("file", &self.file.is_some())
            .field("network", &self.network.is_some())
            .field("audit", &self.audit.is_some())
            .finish()
    }
}

/// Opens the state database at `~/.matchlock/state.db`.
pub fn open_state() -> Result<StateDb, SandboxError> {
    Ok(StateDb::open(&state_dir().join("state.db"))?)
}

/// Aborts a task unless disarmed: a failed boot leaves no server behind.
struct AbortOnDrop(Option<tokio::task::JoinHandle<()>>);

impl AbortOnDrop {
    fn disarm(mut self) -> Option<tokio::task::JoinHandle<()>> {
        self.0.take()
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(task) = self.0.take() {
            task.abort();
        }
    }
}

/// Removes a VM directory unless disarmed: a failed create leaves nothing behind.
struct DirGuard(Option<VmDir>);

impl Drop for DirGuard {
    fn drop(&mut self) {
        if let Some(dir) = self.0.take() {
            logged(std::fs::remove_dir_all(dir.path()), "removing the directory of a failed create");
        }
    }
}

impl Sandbox {
    /// Boots a sandbox for `config`, owned by this process: it is registered in `state`
    /// as running with this process as its owner. On any failure nothing is left behind.
    pub async fn create(config: SandboxConfig, store: &Store, state: StateDb) -> Result<Self, SandboxError> {
        Self::create_with_events(config, store, state, Events::default()).await
    }

    /// As [`Sandbox::create`], reporting what the sandbox does to `events`.
    pub async fn create_with_events(
        config: SandboxConfig,
        store: &Store,
        state: StateDb,
        events: Events,
    ) -> Result<Self, SandboxError> {
        let image = resolve(&config, store)?;
        Self::start(config, image, state, events, None, None).await
    }

    /// As [`Sandbox::create`] with the image already resolved from the store (the future
    /// holds no store, so it may move between threads).
    pub async fn create_from(config: SandboxConfig, image: ImageRecord, state: StateDb) -> Result<Self, SandboxError> {
        validate(&config)?;
        Self::start(config, image, state, Events::default(), None, None).await
    }

    /// The record of `config`'s image in `store`, once `config` is valid.
    pub fn resolve_image(config: &SandboxConfig, store: &Store) -> Result<ImageRecord, SandboxError> {
        resolve(config, store)
    }

    /// Boots `config` on a copy of `disk`, the writable disk a stopped sandbox kept (cold:
    /// no template, no snapshot), e.g. to commit what that sandbox wrote.
    pub async fn start_on_disk(
        config: SandboxConfig,
        store: &Store,
        state: StateDb,
        disk: &Path,
    ) -> Result<Self, SandboxError> {
        let config = SandboxConfig { cold: true, ..config };
        let image = resolve(&config, store)?;
        Self::start(config, image, state, Events::default(), None, Some(disk)).await
    }

    /// A new sandbox from the snapshot `name` ([`Sandbox::snapshot`]): the saved machine
    /// resumes with its processes, under a new id with its own writable disk, network stack
    /// (connections of the saved one are gone), clock and entropy. Secret values are never
    /// saved: `secret_values` gives them by name, and every secret of the snapshot needs one.
    pub async fn restore(
        name: &str,
        store: &Store,
        state: StateDb,
        events: Events,
        secret_values: &std::collections::HashMap<String, String>,
    ) -> Result<Self, SandboxError> {
        let (dir, meta) = snapshot::load(name)?;
        let mut config = meta.config.clone();
        for secret in config.network.iter_mut().flat_map(|n| n.secrets.iter_mut()) {
            let given = secret_values.get(&secret.name).filter(|v| !v.is_empty()).cloned();
            secret.value = given.ok_or_else(|| {
                SandboxError::Config(format!(
                    "snapshot {name} sends the secret {0}, whose value is not saved: pass --secret {0}@{1} \
                     (the value from ${0}) or --secret {0}=VALUE@{1}",
                    secret.name,
                    secret.hosts.join(",")
                ))
            })?;
        }
        let image = resolve(&config, store)?;
        Self::start(config, image, state, events, Some((dir, meta)), None).await
    }

    async fn start(
        config: SandboxConfig,
        image: ImageRecord,
        mut state: StateDb,
        events: Events,
        from: Option<(PathBuf, SnapshotMeta)>,
        upper_from: Option<&Path>,
    ) -> Result<Self, SandboxError> {
        let started = Instant::now();
        let kernel = kernel::locate()?;
        let guest_init = tools::guest_init()?;
        let backend = matchlock_vm::host_backend(&kernel).await?;
        let backend_build = backend.build_id();
        tracing::debug!(
            "create: image, kernel and the {} backend found after {} ms",
            backend.name(),
            started.elapsed().as_millis()
        );
        let max_disks = backend.capabilities().max_disks.saturating_sub(FIXED_DISKS);
        if config.disks.len() > max_disks {
            return Err(SandboxError::Config(format!(
                "at most {max_disks} --disk mounts are supported by the {} backend",
                backend.name()
            )));
        }
        let boot_disk = boot_disk::ensure(&guest_init, &cache_dir().join("boot"))?;
        if let Some((_, meta)) = &from {
            check_restorable(meta, &backend_build, &image, &kernel, &boot_disk)?;
        }
        let warm = match from {
            None if backend.capabilities().snapshots && template::applies_to(&config) => {
                let machine = template::Boot {
                    backend: backend.name(),
                    backend_build: &backend_build,
                    kernel: &kernel,
                    boot_disk: &boot_disk,
                    image_rootfs: &image.rootfs,
                };
                let key = template::key(&config, &machine)?;
                let found = template::find(&key.name);
                Some(Warm { key, found })
            }
            _ => None,
        };

        let id = new_vm_id()?;
        let dir = VmDir::of(&id);
        let create = |d: &Path| matchlock_api::paths::create_private_dir(d);
        create(dir.path())
            .and_then(|()| create(&dir.logs()))
            .map_err(io_err(format!("cannot create {}", dir.path().display())))?;
        let mut guard = DirGuard(Some(dir.clone()));
        let upper = dir.upper_disk();
        let me = std::process::id() as i32;
        let row = Vm {
            id: id.clone(),
            pid: me,
            pid_start: matchlock_state::process::start_time(me).unwrap_or(0),
            status: Status::Running,
            image: image.tag.clone(),
            config_json: serde_json::to_string(&config).expect("config serializes"),
            created_at: String::new(),
            updated_at: String::new(),
        };
        let resources = serde_json::json!({
            "state_dir": dir.path(),
            "rootfs_path": upper,
            "vsock_path": dir.backend_socket("mux"),
            "exec_socket": dir.exec_socket(),
            "image_rootfs": image.rootfs,
            "started_from": started_from(from.as_ref().map(|(_, meta)| meta), warm.as_ref()),
        });
        state.register(&row, backend.name(), &resources)?;
        let start = Start {
            backend: &*backend,
            backend_build: &backend_build,
            id: &id,
            dir: &dir,
            config: &config,
            image: &image,
            kernel: &kernel,
            boot_disk: &boot_disk,
            from: from.as_ref(),
            warm: warm.as_ref(),
            upper_from,
        };
        // Boxed: the boot future is large (clippy::large_futures in every caller).
        let booted = Box::pin(start.boot(&upper, &mut state, events)).await;
        let (machine, machine_id, network, (vfs, workspace), prepared) = match booted {
            Ok(ok) => ok,
            Err((phase, e)) => {
                logged(state.transition(&id, phase, Some(&e.to_string())), "recording the failed create");
                // The directory goes with the guard; a failed create leaves no row either.
                logged(state.delete(&id), "deleting the state rows of a failed create");
                return Err(e);
            }
        };
        guard.0 = None;
        let timings = vec![("prepare", prepared - started), ("boot", prepared.elapsed())];
        let network = network.map(Arc::new);
        let snapshot_base = start.meta(&machine_id, &config);
        let next_volume_slot = config.volumes.len().into();
        let mut sandbox = Self {
            id,
            dir,
            image,
            config,
            machine: Some(machine),
            state: std::sync::Mutex::new(state),
            relay: None,
            network: network.clone(),
            vfs,
            workspace,
            next_volume_slot,
            execs: Arc::default(),
            timings,
            snapshot_base,
        };
        let machine = sandbox.machine.as_ref().expect("just booted");
        let snapshots = relay::Snapshots::new(machine.snapshotter(), sandbox.snapshot_base.clone());
        let stats = sandbox.stats_source();
        match relay::serve(&sandbox.dir, machine.connector(), network, snapshots, stats) {
            Ok(task) => sandbox.relay = Some(task),
            Err(e) => {
                logged(sandbox.close(true).await, "closing a sandbox whose relay failed");
                return Err(e);
            }
        }
        Ok(sandbox)
    }
}

/// What [`Start::boot`] started: the machine, its machine id, the network stack, the
/// workspace server and its router, and when preparation ended.
type Booted = (
    Box<dyn Machine>,
    String,
    Option<network::Network>,
    (Option<tokio::task::JoinHandle<()>>, Option<Arc<matchlock_vfs::Router>>),
    Instant,
);

/// What a sandbox starts from, for [`Start::boot`].
struct Start<'a> {
    backend: &'a dyn Backend,
    backend_build: &'a str,
    id: &'a str,
    dir: &'a VmDir,
    config: &'a SandboxConfig,
    image: &'a ImageRecord,
    kernel: &'a Path,
    boot_disk: &'a Path,
    /// The snapshot to resume instead of a cold boot.
    from: Option<&'a (PathBuf, SnapshotMeta)>,
    /// The warm template of this machine: resumed when found, else saved after the boot.
    warm: Option<&'a Warm>,
    /// A writable disk to boot a copy of, instead of a fresh one.
    upper_from: Option<&'a Path>,
}

/// What `inspect` tells a sandbox was started from: `{"kind": "boot" | "template" |
/// "snapshot", "name": …}` (a boot that saves a template names it).
fn started_from(snapshot: Option<&SnapshotMeta>, warm: Option<&Warm>) -> serde_json::Value {
    match (snapshot, warm) {
        (Some(meta), _) => serde_json::json!({"kind": "snapshot", "name": meta.name}),
        (None, Some(Warm { key, found: Some(_) })) => serde_json::json!({"kind": "template", "name": key.name}),
        (None, Some(Warm { key, found: None })) => serde_json::json!({"kind": "boot", "saves_template": key.name}),
        (None, None) => serde_json::json!({"kind": "boot"}),
    }
}

/// A sandbox's warm template ([`template`]).
struct Warm {
    key: template::Key,
    /// Its directory and metadata, when it has been saved.
    found: Option<(PathBuf, SnapshotMeta)>,
}

/// Gives a restored guest its new identity, clock and entropy before anything else runs.
async fn tell_restored(
    machine: &dyn Machine,
    config: &SandboxConfig,
    hostname: String,
    ca_pem: Option<String>,
) -> Result<(), SandboxError> {
    let entropy = random_bytes(matchlock_protocol::boot::RESTORED_ENTROPY)?;
    let epoch_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    let message = matchlock_protocol::boot::Restored {
        hostname,
        epoch_ms,
        entropy,
        ca_pem,
        dns: config.dns_servers.clone(),
        add_hosts: config.add_hosts.clone(),
        workspace: config.workspace.clone(),
    };
    let payload = serde_json::to_vec(&message).expect("the message serializes");
    let conn = machine.connect(EXEC_PORT).await?;
    agent_control(conn, FrameType::Restored, &payload)
        .await?
        .map_err(|errors| SandboxError::VmStopped(format!("the restored guest refused its new identity: {errors}")))
}

/// Sends one control request (`Quiesce`, `Restored`) to the agent on `conn`: `Ok(Ok)` when
/// it answers `Exit(0)`, else the first few KiB of what it said went wrong.
async fn agent_control(
    mut conn: tokio::net::UnixStream,
    kind: FrameType,
    payload: &[u8],
) -> Result<Result<(), String>, SandboxError> {
    write_frame(&mut conn, kind, payload).await?;
    let mut errors = String::new();
    while let Some(frame) = read_frame(&mut conn).await? {
        match GuestMessage::from_frame(frame)? {
            GuestMessage::Exit(0) => return Ok(Ok(())),
            GuestMessage::Exit(_) => break,
            // The guest's words for the failure: the first few KiB are enough.
            GuestMessage::Stderr(e) if errors.len() < MAX_QUIESCE_ERROR => {
                errors.push_str(&String::from_utf8_lossy(&e[..e.len().min(MAX_QUIESCE_ERROR - errors.len())]));
            }
            GuestMessage::Stderr(_) | GuestMessage::Stdout(_) => {}
        }
    }
    Ok(Err(errors.trim().to_owned()))
}

/// A snapshot resumes only on the machine it was saved from: same backend build, and the
/// image, kernel and guest-init it has in memory and mounted.
/// `config` validated, and its image's record in `store`.
fn resolve(config: &SandboxConfig, store: &Store) -> Result<ImageRecord, SandboxError> {
    validate(config)?;
    store.resolve(&config.image)?.ok_or_else(|| SandboxError::ImageNotFound(config.image.clone()))
}

fn check_restorable(
    meta: &SnapshotMeta,
    backend_build: &str,
    image: &ImageRecord,
    kernel: &Path,
    boot_disk: &Path,
) -> Result<(), SandboxError> {
    let changed = |what: &str| {
        Err(SandboxError::Config(format!(
            "snapshot {} cannot be restored: {what} changed since it was taken",
            meta.name
        )))
    };
    if meta.backend_build != backend_build {
        return changed("the VM backend (its binary or accelerator)");
    }
    if meta.image_rootfs != image.rootfs {
        return changed(&format!("the image {}", meta.image));
    }
    if meta.kernel != kernel {
        return changed("the guest kernel");
    }
    if meta.boot_disk != boot_disk {
        return changed("guest-init");
    }
    Ok(())
}

impl Start<'_> {
    /// Creates the VM's writable disk (with the CA seeded); mke2fs runs for tens of
    /// milliseconds: not on the runtime's thread.
    async fn create_upper(&self, upper: &Path, seed: Option<&Path>) -> Result<(), SandboxError> {
        let disk_started = Instant::now();
        let (upper_path, seed_path, size) =
            (upper.to_owned(), seed.map(Path::to_owned), self.config.disk_size_mb << 20);
        let created = tokio::task::spawn_blocking(move || {
            matchlock_image::ext4::create_empty(&upper_path, size, seed_path.as_deref())
        })
        .await
        .map_err(|e| SandboxError::Io { context: "creating the writable disk".into(), source: e.into() })?;
        tracing::debug!(
            "create: writable disk ({} MB) in {} ms",
            self.config.disk_size_mb,
            disk_started.elapsed().as_millis()
        );
        created.map_err(|source| SandboxError::Disk { what: "the writable disk".into(), source })
    }

    /// The metadata of snapshots of this machine (first booted as `machine_id`) running
    /// `config`, but for the name.
    fn meta(&self, machine_id: &str, config: &SandboxConfig) -> SnapshotMeta {
        SnapshotMeta {
            name: String::new(),
            source: self.id.to_owned(),
            machine_id: machine_id.to_owned(),
            created_at: 0,
            backend: self.backend.name().to_owned(),
            backend_build: self.backend_build.to_owned(),
            config: config.clone(),
            image: self.image.tag.clone(),
            image_rootfs: self.image.rootfs.clone(),
            kernel: self.kernel.to_owned(),
            boot_disk: self.boot_disk.to_owned(),
            size: 0,
        }
    }

    /// The saved machine to resume instead of booting: a snapshot, or a found template.
    fn resumed(&self) -> Option<&(PathBuf, SnapshotMeta)> {
        self.from.or_else(|| self.warm.and_then(|warm| warm.found.as_ref()))
    }

    /// Creates the upper disk and boots (or resumes the snapshot or template); on error,
    /// says which failure phase applies. Returns the machine and its first id.
    async fn boot(&self, upper: &Path, state: &mut StateDb, events: Events) -> Result<Booted, (Phase, SandboxError)> {
        let (id, dir, config, image) = (self.id, self.dir, self.config, self.image);
        let create_failed = |e: SandboxError| (Phase::CreateFailed, e);
        let resumed = self.resumed();
        // A template to save: booted without the sandbox's identity, which comes after.
        let saving = self.warm.filter(|warm| warm.found.is_none());
        let identity_later = resumed.is_some() || saving.is_some();
        let booted_config = match saving {
            Some(_) => template::neutral(config),
            None => config.clone(),
        };
        let ca = match &config.network {
            Some(net) => network::prepare_ca(net, dir).map_err(create_failed)?,
            None => None,
        };
        // A resumed machine has its disk from the snapshot; it learns its CA (like the
        // rest of its identity) once running.
        let seed = ca.as_ref().map(|(_, tar)| tar.as_path()).filter(|_| !identity_later);
        match (resumed, self.upper_from) {
            (Some(_), _) => {}
            (None, Some(from)) => {
                let (from, to) = (from.to_owned(), upper.to_owned());
                tokio::task::spawn_blocking(move || {
                    std::fs::File::open(&from).and_then(|f| matchlock_vm::qemu::copy_sparse(&f, &to))
                })
                .await
                .expect("the copy does not panic")
                .map_err(io_err("cannot copy the stopped sandbox's disk"))
                .map_err(create_failed)?;
            }
            (None, None) => self.create_upper(upper, seed).await.map_err(create_failed)?,
        }
        if let Some((_, tar)) = &ca {
            let _ = std::fs::remove_file(tar);
        }
        let mut disks = vec![Disk { path: self.boot_disk.to_owned(), read_only: true, persistent: false }];
        // The image's layers, squashed once into one read-only disk shared by every VM.
        disks.push(Disk { path: image.rootfs.clone(), read_only: true, persistent: false });
        disks.push(Disk { path: upper.to_owned(), read_only: false, persistent: false });
        let mut mounts = Vec::new();
        for mount in &config.disks {
            let path = resolve_disk(&mount.source).map_err(create_failed)?;
            mounts.push((device_name(disks.len()), mount.guest_path.clone(), mount.read_only));
            disks.push(Disk { path, read_only: mount.read_only, persistent: true });
        }
        let params = BootParams {
            hostname: booted_config.hostname.clone().unwrap_or_else(|| id.to_owned()),
            dns: booted_config.dns_servers.clone(),
            cpus: config.cpus,
            lowers: vec![device_name(1)],
            upper: device_name(2),
            add_hosts: booted_config.add_hosts.clone(),
            epoch_ms: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64),
            privileged: config.privileged,
            disks: mounts,
            workspace: booted_config.workspace.clone(),
            image_tmp: config.image_tmp,
        };
        let (vfs, router) = match &config.workspace {
            Some(root) => {
                let rules = config.vfs_interception.as_ref();
                let file_events = events.file.filter(|_| rules.is_some_and(|r| r.emit_events));
                let router =
                    workspace::router(dir, root, &config.volumes, rules, file_events, config.workspace_quota_mb)
                        .map(Arc::new)
                        .map_err(create_failed)?;
                (Some(workspace::serve(dir, router.clone()).map_err(create_failed)?), Some(router))
            }
            None => (None, None),
        };
        let vfs_guard = AbortOnDrop(vfs);
        let mut cmdline = params.to_cmdline();
        // A resumed guest keeps the NIC address it has in memory.
        let machine_id = resumed.map_or(id, |(_, meta)| meta.machine_id.as_str()).to_owned();
        let (network, nic) = match &config.network {
            Some(net) => {
                let (network, nic) = network::start(
                    &machine_id,
                    dir,
                    net,
                    &config.dns_servers,
                    &config.add_hosts,
                    ca.as_ref().map(|(ca, _)| Arc::clone(ca)),
                    Events { file: None, network: events.network, audit: events.audit },
                )
                .map_err(create_failed)?;
                cmdline.push(' ');
                cmdline.push_str(&network::kernel_ip_param());
                (Some(network), Some(nic))
            }
            None => (None, None),
        };
        let spec = MachineSpec {
            dir: dir.clone(),
            kernel: self.kernel.to_owned(),
            cmdline,
            disks,
            vcpus: config.cpus.ceil() as u32,
            memory_mb: config.memory_mb,
            boot_timeout: BOOT_TIMEOUT,
            nic,
        };
        state.transition(id, Phase::Created, None).map_err(|e| create_failed(e.into()))?;
        state.transition(id, Phase::Starting, None).map_err(|e| create_failed(e.into()))?;
        let prepared = Instant::now();
        tracing::debug!("create: disks, workspace and network ready; launching the VM");
        let start_failed = |e: SandboxError| (Phase::StartFailed, e);
        let machine = match resumed {
            None => self.backend.launch(spec).await.map_err(|e| start_failed(e.into()))?,
            // A template's machine gets a memory copy of its own: it is the usual source of
            // snapshots and forks, which then stay as cheap as of a booted machine.
            Some((from, _)) => match self.backend.restore(spec, from.clone(), self.restored_memory()).await {
                Ok(machine) => machine,
                Err(e) => return Err(start_failed(self.resume_failed(e))),
            },
        };
        tracing::debug!("create: VM {id} started in {} ms", prepared.elapsed().as_millis());
        // Recorded at once: a crash from here on leaves helpers that gc finds by identity.
        if let Err(e) = gc::record_helpers(dir, &machine.helper_pids()) {
            logged(machine.shutdown().await, "stopping a VM whose helpers cannot be recorded");
            return Err(start_failed(e));
        }
        if let Some(warm) = saving {
            let saved_at = Instant::now();
            match template::save(&machine.snapshotter(), &warm.key, self.meta(id, &booted_config)).await {
                Ok(()) => tracing::debug!("create: warm template saved in {} ms", saved_at.elapsed().as_millis()),
                // Only later runs lose: they boot cold and try again.
                Err(e) => logged(Err::<(), _>(e), &format!("saving the warm template of {}", image.tag)),
            }
        }
        if identity_later {
            let told_at = Instant::now();
            let hostname = config.hostname.clone().unwrap_or_else(|| id.to_owned());
            let ca_pem = ca.as_ref().map(|(ca, _)| ca.certificate_pem());
            if let Err(e) = tell_restored(&*machine, config, hostname, ca_pem).await {
                logged(machine.shutdown().await, "stopping a resumed VM that refused its identity");
                return Err(start_failed(e));
            }
            tracing::debug!("create: the guest took on its identity in {} ms", told_at.elapsed().as_millis());
        }
        state.transition(id, Phase::Running, None).map_err(|e| (Phase::StartFailed, e.into()))?;
        Ok((machine, machine_id, network, (vfs_guard.disarm(), router), prepared))
    }

    /// How a resumed machine holds its memory: copied from a template, copy-on-write from
    /// a snapshot (its forks share what they do not write).
    fn restored_memory(&self) -> matchlock_vm::RestoredMemory {
        match self.from {
            Some(_) => matchlock_vm::RestoredMemory::CopyOnWrite,
            None => matchlock_vm::RestoredMemory::Copied,
        }
    }

    /// What a failed resume reports; a template that does not resume is discarded, so the
    /// next run boots cold and saves a new one.
    fn resume_failed(&self, e: VmError) -> SandboxError {
        match self.warm.filter(|_| self.from.is_none()) {
            Some(warm) => {
                template::discard(&warm.key.name);
                SandboxError::Template(Box::new(e))
            }
            None => e.into(),
        }
    }
}

impl Sandbox {
    /// The VM id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The VM directory.
    pub fn dir(&self) -> &VmDir {
        &self.dir
    }

    /// The image the sandbox runs.
    pub fn image(&self) -> &ImageRecord {
        &self.image
    }

    /// The configuration it was created with.
    pub fn config(&self) -> &SandboxConfig {
        &self.config
    }

    /// Resolves when the VM exits on its own (e.g. the guest powered off or crashed).
    pub async fn exited(&mut self) -> String {
        match self.machine.as_mut() {
            Some(m) => m.exited().await,
            None => std::future::pending().await,
        }
    }

    /// The live network policy, if the sandbox has a NIC.
    pub fn network(&self) -> Option<&network::Network> {
        self.network.as_deref()
    }

    /// Opens a raw connection to a guest vsock port.
    pub async fn connect(&self, port: u32) -> Result<tokio::net::UnixStream, SandboxError> {
        let machine = self.machine.as_ref().expect("a live sandbox has a machine");
        Ok(machine.connect(port).await?)
    }

    /// Asks the guest agent to sync and remount the extra disks read-only, so volumes
    /// are clean on the host (bounded by a few seconds).
    async fn quiesce_guest(&self) -> Result<(), SandboxError> {
        let work = async {
            let conn = self.connect(EXEC_PORT).await?;
            agent_control(conn, FrameType::Quiesce, &[])
                .await?
                .map_err(|errors| SandboxError::VmStopped(format!("quiescing the guest failed: {errors}")))
        };
        tokio::time::timeout(Duration::from_secs(10), work)
            .await
            .unwrap_or_else(|_| Err(SandboxError::VmStopped("quiescing the guest timed out".into())))
    }

    /// Saves the running sandbox as snapshot `name`: its memory, devices and writable disk,
    /// while the guest is paused for a moment; the sandbox then runs on as before. Sandboxes
    /// with writable `--disk` volumes cannot be saved (the volume is not theirs to copy).
    pub async fn snapshot(&self, name: &str) -> Result<SnapshotMeta, SandboxError> {
        let machine = self.machine.as_ref().expect("a live sandbox has a machine");
        snapshot::take(&machine.snapshotter(), self.snapshot_base.clone(), name).await
    }

    /// Gives the secret `name` (declared without a value: a pod's, whose containers bring the
    /// values) its value; the host substitutes it from now on. A second, different value is
    /// refused.
    pub fn set_secret_value(&self, name: &str, value: &str) -> Result<(), SandboxError> {
        let network = self.network.as_ref().ok_or_else(|| SandboxError::Config("the sandbox has no network".into()))?;
        network.policy.set_secret_value(name, value).map_err(|e| SandboxError::Config(e.to_string()))
    }

    /// The network budgets in force and what was spent (`None` without a network).
    pub fn limits(&self) -> Option<(matchlock_api::config::NetworkLimits, matchlock_net::budget::Usage)> {
        self.network.as_ref().map(|n| (n.budget.limits(), n.budget.usage()))
    }

    /// Replaces the network budgets while the sandbox runs (what was spent stays spent).
    pub fn set_limits(&self, limits: matchlock_api::config::NetworkLimits) -> Result<(), SandboxError> {
        let network = self.network.as_ref().ok_or_else(|| SandboxError::Config("the sandbox has no network".into()))?;
        network.budget.set(limits);
        Ok(())
    }

    /// The sandbox's resource use now.
    pub async fn stats(&self) -> stats::Stats {
        self.stats_source().collect().await
    }

    fn stats_source(&self) -> stats::Source {
        let machine = self.machine.as_ref().expect("a live sandbox has a machine");
        stats::Source {
            guest: machine.connector(),
            dir: self.dir.clone(),
            helpers: machine.helper_pids(),
            network: self.network.clone(),
            workspace: self.workspace.clone(),
            execs: self.execs.clone(),
        }
    }

    /// Serves `volume` (a host directory or file) into the running guest at its guest path,
    /// which must lie under the sandbox's workspace: a pod's container brings its volumes
    /// after the pod's VM booted. [`Sandbox::remove_volume`] takes it away again.
    pub fn add_volume(&self, volume: &VfsMount) -> Result<(), SandboxError> {
        let (Some(router), Some(root)) = (&self.workspace, &self.config.workspace) else {
            return Err(SandboxError::Config("the sandbox has no workspace to serve a volume in".into()));
        };
        if !volume.guest_path.strip_prefix(root.as_str()).is_some_and(|rest| rest.starts_with('/') && rest.len() > 1) {
            return Err(SandboxError::Config(format!(
                "volume at {}: not under the workspace {root}",
                volume.guest_path
            )));
        }
        let slot = self.next_volume_slot.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        workspace::add(router, &self.dir, slot, volume)
    }

    /// Stops serving the volume at `guest_path` (added by [`Sandbox::add_volume`]); whether
    /// there was one.
    pub fn remove_volume(&self, guest_path: &str) -> bool {
        self.workspace.as_ref().is_some_and(|router| router.unmount(guest_path))
    }

    /// Freezes the guest (every vCPU stops; commands, timers and the network stall) until
    /// [`Sandbox::resume`].
    pub async fn pause(&self) -> Result<(), SandboxError> {
        let machine = self.machine.as_ref().expect("a live sandbox has a machine");
        Ok(machine.set_running(false).await?)
    }

    /// Kills the VM's processes at once (for a guest that no longer answers): every command
    /// in it ends with [`SandboxError::VmStopped`]; [`Sandbox::close`] then cleans up.
    pub fn kill_machine(&self) {
        let machine = self.machine.as_ref().expect("a live sandbox has a machine");
        for pid in machine.helper_pids() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL);
        }
    }

    /// Thaws a guest frozen by [`Sandbox::pause`].
    pub async fn resume(&self) -> Result<(), SandboxError> {
        let machine = self.machine.as_ref().expect("a live sandbox has a machine");
        Ok(machine.set_running(true).await?)
    }

    /// How long creation took, by phase: `prepare` (image, disks, accelerator) and
    /// `boot` (VMM start to the guest agent's ready signal).
    pub fn timings(&self) -> &[(&'static str, Duration)] {
        &self.timings
    }

    /// Stops the VM and releases its resources, recording each step. With `remove`, the
    /// VM directory and its state rows go too (`--rm`); otherwise the VM stays listed as
    /// `stopped` with its logs until `matchlock rm`.
    pub async fn close(mut self, remove: bool) -> Result<(), SandboxError> {
        let id = self.id.clone();
        logged(
            self.state.get_mut().unwrap_or_else(PoisonError::into_inner).transition(&id, Phase::Stopping, None),
            "recording stopping",
        );
        if let Some(relay) = self.relay.take() {
            relay.abort();
        }
        if let Some(vfs) = self.vfs.take() {
            vfs.abort();
        }
        let _ = std::fs::remove_file(self.dir.exec_socket());
        if !remove || self.config.disks.iter().any(|d| !d.read_only) {
            // Writes to volumes, and to the writable disk a stopped sandbox keeps, must reach
            // their files before the VM goes.
            let synced = self.quiesce_guest().await;
            let state = self.state.get_mut().unwrap_or_else(PoisonError::into_inner);
            logged(
                state.record_cleanup(&id, "guest_sync", synced.as_ref().err().map(ToString::to_string).as_deref()),
                "recording the guest sync",
            );
        }
        let machine_result = match self.machine.take() {
            Some(machine) => machine.shutdown().await.map_err(SandboxError::from),
            None => Ok(()),
        };
        let state = self.state.get_mut().unwrap_or_else(PoisonError::into_inner);
        let _ =
            state.record_cleanup(&id, "machine_close", machine_result.as_ref().err().map(|e| e.to_string()).as_deref());
        if self.network.take().is_some() {
            logged(state.record_cleanup(&id, "network_close", None), "recording the network close");
        }
        logged(state.transition(&id, Phase::Stopped, None), "recording stopped");
        logged(state.set_status(&id, Status::Stopped), "recording the stopped status");
        logged(state.transition(&id, Phase::Cleaning, None), "recording cleaning");
        let cleaned = gc::release_disks(state, &id, &self.dir, !remove);
        logged(
            state.transition(&id, if cleaned.is_ok() { Phase::Cleaned } else { Phase::CleanupFailed }, None),
            "recording the cleanup",
        );
        if remove {
            let path = self.dir.path();
            std::fs::remove_dir_all(path).map_err(io_err(format!("cannot remove {}", path.display())))?;
            state.delete(&id)?;
        }
        machine_result?;
        cleaned
    }
}

/// Disks every VM has before its `--disk`s: the boot disk, the image, the writable disk.
const FIXED_DISKS: usize = 3;

/// The host file behind a `--disk` source (`@name` or a path to an ext4 image).
fn resolve_disk(source: &str) -> Result<PathBuf, SandboxError> {
    let path = match source.strip_prefix('@') {
        Some(name) => volumes::path(name)?,
        None => PathBuf::from(source),
    };
    if !path.is_file() {
        return Err(SandboxError::Config(format!("disk image not found: {source}")));
    }
    path.canonicalize().map_err(io_err(format!("cannot resolve {}", path.display())))
}

fn validate(config: &SandboxConfig) -> Result<(), SandboxError> {
    let host_cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    if !(config.cpus.is_finite() && config.cpus > 0.0) {
        return Err(SandboxError::Config(format!("--cpus must be positive, got {}", config.cpus)));
    }
    if config.cpus.ceil() as usize > host_cpus {
        return Err(SandboxError::Config(format!("--cpus {} exceeds the {host_cpus} CPUs of this host", config.cpus)));
    }
    if config.memory_mb < 64 {
        return Err(SandboxError::Config(format!("--memory must be at least 64 MB, got {}", config.memory_mb)));
    }
    if config.disk_size_mb < 16 {
        return Err(SandboxError::Config(format!("--disk-size must be at least 16 MB, got {}", config.disk_size_mb)));
    }
    // A workspace without volumes is an empty directory (volumes may be added while it runs).
    match (&config.workspace, config.volumes.is_empty()) {
        (None, false) => return Err(SandboxError::Config("-v mounts require a workspace".into())),
        (None, true) if config.vfs_interception.is_some() => {
            return Err(SandboxError::Config("VFS rules require -v mounts".into()))
        }
        _ => {}
    }
    if let Some(h) = &config.hostname {
        if !matchlock_protocol::boot::is_valid_hostname(h) {
            return Err(SandboxError::Config(format!("invalid hostname {h:?}")));
        }
    }
    Ok(())
}
