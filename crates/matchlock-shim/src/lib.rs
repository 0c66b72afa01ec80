//! `containerd-shim-matchlock-v1`: containerd's runtime v2 ("shim") contract over the
//! sandbox API, so that `ctr run --runtime io.containerd.matchlock.v1` (and Kubernetes
//! through containerd's CRI) runs each container in a matchlock micro-VM.
//!
//! A front end like `matchlock run` and `matchlock rpc`: the VM is a
//! [`matchlock_sandbox::Sandbox`], owned by the shim process; nothing here talks to a VMM.
//! - [`spec`]: the OCI spec and our annotations → sandbox configuration and processes;
//! - [`rootfs`]: containerd's prepared rootfs → an image of our store (cached by snapshot chain);
//! - [`stdio`]: FIFOs and `file://` URIs;
//! - [`guest`]: pids and cgroup v2 metrics read from the guest;
//! - [`ingress`]: the guest's listening ports mirrored into the spec's network namespace;
//! - [`service`]: the Task service (every method) and its events.

pub mod guest;
pub mod ingress;
pub mod rootfs;
pub mod service;
pub mod spec;
pub mod stdio;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use containerd_shim::asynchronous::publisher::RemotePublisher;
use containerd_shim::asynchronous::{spawn, ExitSignal, Shim};
use containerd_shim::{Config, Error, Flags, StartOpts};
use containerd_shim_protos::api::DeleteResponse;
use containerd_shim_protos::protobuf::MessageField;

pub use service::{Publisher, Service};

/// The runtime name containerd knows us by.
pub const RUNTIME_ID: &str = "io.containerd.matchlock.v1";

/// The image store the shim converts root file systems into (the CLI's).
pub fn store_root() -> PathBuf {
    matchlock_api::paths::cache_dir().join("images")
}

/// The shim's process-level side: `start`, `delete`, and the server's lifetime.
pub struct MatchlockShim {
    namespace: String,
    id: String,
    bundle: PathBuf,
    exit: Arc<ExitSignal>,
}

impl std::fmt::Debug for MatchlockShim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MatchlockShim")
            .field("namespace", &self.namespace)
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl Shim for MatchlockShim {
    type T = Service;

    async fn new(_runtime_id: &str, args: &Flags, _config: &mut Config) -> Self {
        let bundle = if args.bundle.is_empty() {
            std::env::current_dir().unwrap_or_default()
        } else {
            PathBuf::from(&args.bundle)
        };
        Self { namespace: args.namespace.clone(), id: args.id.clone(), bundle, exit: Arc::new(ExitSignal::default()) }
    }

    async fn start_shim(&mut self, opts: StartOpts) -> Result<String, Error> {
        // One shim process per container, or per pod: a pod's containers (CRI's sandbox id)
        // reach the shim process that owns the pod's VM.
        let pod = spec::load(Path::new(".")).ok().and_then(|spec| spec::pod_of(&spec));
        let grouping = pod.unwrap_or_else(|| opts.id.clone());
        let address = spawn(opts, &grouping, Vec::new()).await?;
        // containerd reconnects through the bundle's `address` after a restart; the shim
        // writes it (cwd is the bundle), as containerd's own shims do.
        std::fs::write("address", &address).map_err(|e| Error::Other(format!("writing the bundle's address: {e}")))?;
        Ok(address)
    }

    async fn delete_shim(&mut self) -> Result<DeleteResponse, Error> {
        cleanup_after_crash(&self.bundle, &self.id);
        Ok(DeleteResponse {
            pid: 0,
            exit_status: 128 + 9,
            exited_at: MessageField::some(containerd_shim::util::timestamp()?),
            ..Default::default()
        })
    }

    async fn wait(&mut self) {
        self.exit.wait().await;
    }

    async fn create_task_service(&self, publisher: RemotePublisher) -> Self::T {
        Service::new(&self.namespace, Publisher::Remote(Arc::new(publisher)), Arc::clone(&self.exit), store_root())
    }
}

/// `containerd-shim-matchlock-v1 … delete`: containerd's cleanup when the shim is gone
/// (killed, crashed): the container's VM (processes, disk, state row), a rootfs still
/// mounted, and a rootfs image only it used. Each step is best effort and logged.
pub fn cleanup_after_crash(bundle: &Path, id: &str) {
    if let Ok(vm_id) = std::fs::read_to_string(bundle.join(service::VM_ID_FILE)) {
        let vm_id = vm_id.trim();
        match matchlock_sandbox::open_state().and_then(|mut state| {
            let vm = state.reconciled(vm_id)?;
            match vm {
                // containerd gave the shim up (it may still run, unreachable): its VM goes.
                Some(vm) => matchlock_sandbox::gc::remove(&mut state, &vm, true),
                None => Ok(()),
            }
        }) {
            Ok(()) => tracing::info!("container {id}: sandbox {vm_id} removed"),
            Err(e) => tracing::warn!("container {id}: cannot remove sandbox {vm_id}: {e}"),
        }
        let _ = std::fs::remove_file(bundle.join(service::VM_ID_FILE));
    }
    let rootfs = bundle.join("rootfs");
    // Mounted only while it is copied; a crash then leaves it mounted.
    let _ = nix::mount::umount2(&rootfs, nix::mount::MntFlags::MNT_DETACH);
    if let Ok(tag) = std::fs::read_to_string(bundle.join(service::PRIVATE_ROOTFS_FILE)) {
        let image = rootfs::Rootfs { tag: tag.trim().to_owned(), private: true };
        if let Err(e) = rootfs::remove(&store_root(), &image) {
            tracing::warn!("container {id}: cannot remove the rootfs image {}: {e}", image.tag);
        }
        let _ = std::fs::remove_file(bundle.join(service::PRIVATE_ROOTFS_FILE));
    }
}

/// Logs to containerd: the server writes to the bundle's `log` FIFO (containerd copies it
/// into its own log), `start` and `delete` to stderr (containerd quotes it on failure).
fn init_logging() {
    let debug = std::env::args().any(|a| a == "-debug");
    let action = std::env::args().any(|a| a == "start" || a == "delete");
    // containerd shows what `delete` prints as warnings: only warnings go there.
    let level = match (debug, action) {
        (true, _) => "debug",
        (false, true) => "warn",
        (false, false) => "info",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("MATCHLOCK_SHIM_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(false);
    let log_fifo = (!action).then(|| std::fs::OpenOptions::new().write(true).open("log").ok()).flatten();
    match log_fifo {
        Some(fifo) => builder.with_writer(std::sync::Mutex::new(fifo)).init(),
        None => builder.with_writer(std::io::stderr).init(),
    }
}

/// The shim's `main`.
pub async fn main() {
    if std::env::args().skip(1).any(|a| a == "-v" || a == "-version" || a == "--version") {
        println!("containerd-shim-matchlock-v1 {} (runtime {RUNTIME_ID})", env!("CARGO_PKG_VERSION"));
        return;
    }
    init_logging();
    // We wait for our own children (QEMU's exit status is ours to read): no reaper.
    let config = Config { no_reaper: true, no_sub_reaper: true, no_setup_logger: true, ..Default::default() };
    containerd_shim::asynchronous::run::<MatchlockShim>(RUNTIME_ID, Some(config)).await;
}
