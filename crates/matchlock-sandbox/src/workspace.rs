//! The host side of the workspace: the VFS server the guest's FUSE daemon connects to
//! (guest-initiated vsock port 5001, i.e. `<vm dir>/vsock.sock_5001`).

use std::path::Path;
use std::sync::Arc;

use matchlock_api::config::{VfsInterception, VfsMode, VfsMount};
use matchlock_api::paths::VmDir;
use matchlock_vfs::{EventSink, HostFs, Overlay, Provider, Router, SingleFile};

use crate::relay::AcceptBackoff;
use crate::sampled::Sampled;
use crate::{io_err, SandboxError};

fn vfs_error(what: String) -> impl FnOnce(rustix::io::Errno) -> SandboxError {
    move |e| SandboxError::Io { context: what, source: std::io::Error::from_raw_os_error(e.raw_os_error()) }
}

/// Builds the mount router of the workspace at guest path `root`: overlay mounts get an
/// empty upper directory in the VM directory.
pub(crate) fn router(
    dir: &VmDir,
    root: &str,
    mounts: &[VfsMount],
    rules: Option<&VfsInterception>,
    events: Option<EventSink>,
    quota_mb: Option<u64>,
) -> Result<Router, SandboxError> {
    let mut router = Router::default();
    router.set_root(root).map_err(vfs_error(format!("invalid workspace {root}")))?;
    if let Some(mb) = quota_mb {
        router.set_quota(mb.saturating_mul(1 << 20));
    }
    if let Some(rules) = rules {
        router.set_rules(rules).map_err(|e| SandboxError::Config(e.to_string()))?;
    }
    if let Some(sink) = events {
        router.set_event_sink(sink);
    }
    for (slot, mount) in mounts.iter().enumerate() {
        add(&router, dir, slot, mount)?;
    }
    Ok(router)
}

/// Serves `mount` through `router` (also while the guest is served); `slot` names its
/// scratch directory in the VM directory (overlay upper, memory tree), unique per mount.
pub(crate) fn add(router: &Router, dir: &VmDir, slot: usize, mount: &VfsMount) -> Result<(), SandboxError> {
    let opened = format!("cannot serve {} at {}", mount.host_path, mount.guest_path);
    let scratch = |kind: &str| -> Result<std::path::PathBuf, SandboxError> {
        let path = dir.workspace_data(kind, slot);
        std::fs::create_dir_all(&path).map_err(io_err(format!("cannot create {}", path.display())))?;
        Ok(path)
    };
    if mount.mode == VfsMode::Memory {
        // A private, empty tree in the VM directory, gone with the sandbox.
        let root = scratch("memory")?;
        return router
            .mount(&mount.guest_path, HostFs::new(&root, false).map_err(vfs_error(opened.clone()))?)
            .map_err(vfs_error(opened));
    }
    let host = Path::new(&mount.host_path);
    // A single file is served as the one visible name of its parent directory.
    let (root, file) = if host.is_dir() {
        (host, None)
    } else {
        let name = host.file_name().and_then(|n| n.to_str()).ok_or_else(|| {
            SandboxError::Config(format!("cannot mount {}: not a directory or a file", mount.host_path))
        })?;
        (host.parent().unwrap_or(Path::new("/")), Some(name))
    };
    let provider: Box<dyn Provider> = match mount.mode {
        VfsMode::HostFs | VfsMode::Memory => Box::new(HostFs::new(root, false).map_err(vfs_error(opened.clone()))?),
        VfsMode::Readonly => Box::new(HostFs::new(root, true).map_err(vfs_error(opened.clone()))?),
        VfsMode::Overlay => Box::new(Overlay::new(root, &scratch("overlay")?).map_err(vfs_error(opened.clone()))?),
    };
    let result = match file {
        Some(name) => {
            router.mount(&mount.guest_path, SingleFile::new(provider, name).map_err(vfs_error(opened.clone()))?)
        }
        None => router.mount_boxed(&mount.guest_path, provider),
    };
    result.map_err(vfs_error(opened))
}

/// Most guest connections to the VFS server served at once (the guest's FUSE daemon opens
/// one per worker, four; reconnects may briefly need more). Each is served on its own thread
/// (blocking file I/O), so this also bounds the owner's threads: connections beyond it are
/// closed at once, and the guest sees them reset.
pub const MAX_VFS_CONNECTIONS: usize = 8;

/// Serves guest VFS connections to host port [`matchlock_protocol::VFS_PORT`] until the task
/// is aborted.
pub(crate) fn serve(dir: &VmDir, router: Arc<Router>) -> Result<tokio::task::JoinHandle<()>, SandboxError> {
    let path = dir.port_listener(matchlock_protocol::VFS_PORT);
    let _ = std::fs::remove_file(&path);
    let listener =
        tokio::net::UnixListener::bind(&path).map_err(io_err(format!("cannot listen on {}", path.display())))?;
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_VFS_CONNECTIONS));
    Ok(tokio::spawn(async move {
        let mut backoff = AcceptBackoff::default();
        let refused = Sampled::default();
        let failures = Arc::new(Sampled::default());
        loop {
            let (conn, _) = backoff.accept("the workspace server", || listener.accept()).await;
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                if let Some(n) = refused.record() {
                    tracing::warn!("workspace: refused {n} guest connection(s) beyond {MAX_VFS_CONNECTIONS}");
                }
                continue; // dropped: closed
            };
            let Ok(conn) = conn.into_std() else { continue };
            if conn.set_nonblocking(false).is_err() {
                continue;
            }
            let (router, failures) = (router.clone(), failures.clone());
            let spawned = std::thread::Builder::new().name("matchlock-vfs".into()).spawn(move || {
                let mut conn = conn;
                if let Err(e) = matchlock_vfs::serve(&mut conn, &router) {
                    // The guest decides how often this happens.
                    if let Some(n) = failures.record() {
                        tracing::warn!("workspace connection failed ({n} so far): {e}");
                    }
                }
                drop(slot);
            });
            if let Err(e) = spawned {
                tracing::error!("workspace: cannot start a connection thread: {e}");
            }
        }
    }))
}
