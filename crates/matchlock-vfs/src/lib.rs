//! The host side of the workspace file system (reference §3.5 and §5): guest requests name
//! absolute guest paths; the [`Router`] picks the mount with the longest prefix and hands its
//! provider a path relative to the mount; [`serve`] answers one guest connection.
//! Providers: [`HostFs`] (`host_fs`, `readonly`), [`Overlay`] (copy-on-write) and
//! [`SingleFile`] (one host file as a mount). The guest side is `fused` in guest-init.
#![forbid(unsafe_code)]

pub mod hostfs;
pub mod overlay;
pub mod single;

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use matchlock_api::config::{RulePhase, VfsAction};
use matchlock_api::rpc::FileEvent;
use rustix::fs::OFlags;
use rustix::io::Errno;

pub use hostfs::HostFs;
pub use overlay::Overlay;
pub use single::SingleFile;

/// A file tree served at a mount (paths are relative to the mount root, `""` is the root).
pub trait Provider: Send + Sync + std::fmt::Debug {
    /// Attributes (symlinks inside the provider are followed).
    fn stat(&self, rel: &str) -> Result<Stat, Errno>;
    /// Attributes of the path itself: a symlink is reported as a symlink (the guest kernel
    /// resolves it, in the guest's own namespace).
    fn lstat(&self, rel: &str) -> Result<Stat, Errno>;
    /// Opens (with `O_CREAT`, creates) a file or directory.
    fn open(&self, rel: &str, flags: OFlags, mode: u32) -> Result<File, Errno>;
    /// Makes a directory.
    fn mkdir(&self, rel: &str, mode: u32) -> Result<(), Errno>;
    /// Removes a file or, with `dir`, an empty directory.
    fn remove(&self, rel: &str, dir: bool) -> Result<(), Errno>;
    /// Renames, replacing the target.
    fn rename(&self, from: &str, to: &str) -> Result<(), Errno>;
    /// Lists a directory, sorted by name.
    fn readdir(&self, rel: &str) -> Result<Vec<DirEntry>, Errno>;
    /// Changes permission bits.
    fn chmod(&self, rel: &str, mode: u32) -> Result<(), Errno>;
    /// Sets a file's size.
    fn truncate(&self, rel: &str, size: u64) -> Result<(), Errno>;
    /// Creates a symlink at `rel` containing `target`.
    fn symlink(&self, target: &str, rel: &str) -> Result<(), Errno>;
    /// Reads a symlink.
    fn readlink(&self, rel: &str) -> Result<String, Errno>;
    /// Hard-links `from` to `to`.
    fn link(&self, from: &str, to: &str) -> Result<(), Errno>;
    /// Sets the access and/or modification time (nanoseconds since the epoch; `None`
    /// leaves that time unchanged).
    fn set_times(&self, rel: &str, atime_ns: Option<i64>, mtime_ns: Option<i64>) -> Result<(), Errno>;
    /// Statistics of the file system holding the tree.
    fn statfs(&self) -> Result<FsStats, Errno>;
    /// Bytes of host storage that removing (or truncating to nothing) `rel` frees: a regular
    /// file's size when it is its only link.
    fn stored_bytes(&self, rel: &str) -> u64 {
        match self.lstat(rel) {
            Ok(stat) if stat.mode & 0o170_000 == 0o100_000 && stat.nlink == Some(1) => stat.size,
            _ => 0,
        }
    }
    /// Bytes a change to `rel` (a write, truncation, attribute change or link; with `deep`, a
    /// rename) makes the provider copy into host storage before it happens: none unless the
    /// provider copies on write.
    fn copy_up_bytes(&self, _rel: &str, _deep: bool) -> u64 {
        0
    }
    /// Whether removing the name `rel` frees a name the host stores (an overlay's lower
    /// names are not the guest's to free).
    fn frees_entry(&self, _rel: &str) -> bool {
        true
    }
}

pub use matchlock_protocol::vfs as wire;
use wire::{DirEntry, FsStats, Op, Request, Response, Stat, WireError};

/// Most handles a sandbox's guest may hold open at once, across all its connections (each
/// is an open file in the owner): beyond it, opens fail with `EMFILE` in the guest.
pub const MAX_HANDLES: usize = 4096;

/// Bytes the guest may make the host store through the workspace unless configured
/// otherwise (`--workspace-quota`): 10 GiB.
pub const DEFAULT_QUOTA: u64 = 10 << 30;

/// What each name the guest creates (file, directory, symlink, hard link) costs against the
/// quota: one block of the host's file system, what an empty directory or symlink takes
/// there. Without it, names cost nothing and 1 MB of quota stored 24 MB of directories.
pub const ENTRY_COST: u64 = 4096;

/// The sandbox's budget of bytes stored on the host through the workspace: what its writes
/// and truncations grow files by and [`ENTRY_COST`] per name it creates, less what its
/// truncations and removals free. Beyond it, writes and creations fail with `ENOSPC` in the
/// guest, and `statfs` reports the budget as the size (and as the free inodes).
#[derive(Debug)]
struct Storage {
    quota: u64,
    stored: AtomicU64,
}

impl Default for Storage {
    fn default() -> Self {
        Self { quota: DEFAULT_QUOTA, stored: AtomicU64::new(0) }
    }
}

impl Storage {
    /// Takes `bytes` from the budget, or fails with `ENOSPC` and takes nothing.
    fn charge(&self, bytes: u64) -> Result<(), Errno> {
        self.stored
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |stored| {
                stored.checked_add(bytes).filter(|total| *total <= self.quota)
            })
            .map(|_| ())
            .map_err(|_| Errno::NOSPC)
    }

    /// Gives `bytes` back.
    fn credit(&self, bytes: u64) {
        let _ = self.stored.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |s| Some(s.saturating_sub(bytes)));
    }

    /// `stats` of the host file system, no larger than the budget and its free part.
    fn bound(&self, mut stats: FsStats) -> FsStats {
        let unit = u64::from(stats.frsize.max(1));
        let total = self.quota / unit;
        let free = self.quota.saturating_sub(self.stored.load(Ordering::Relaxed)) / unit;
        stats.blocks = stats.blocks.min(total);
        stats.bfree = stats.bfree.min(free);
        stats.bavail = stats.bavail.min(free);
        stats.files = stats.files.min(self.quota / ENTRY_COST);
        stats.ffree = stats.ffree.min(self.quota.saturating_sub(self.stored.load(Ordering::Relaxed)) / ENTRY_COST);
        stats
    }
}

/// Where a guest path leads.
enum Route {
    /// Into a mount: the provider and the path relative to its root (`""` for the root).
    Mount(Arc<dyn Provider>, String),
    /// A directory that exists only because mounts lie beneath it.
    Synthetic(Vec<String>),
}

/// Receives a `file` event after each operation (see [`Router::set_event_sink`]).
pub type EventSink = Box<dyn Fn(FileEvent) + Send + Sync>;

/// Mounts by guest path, and the rules on operations through them.
#[derive(Default)]
pub struct Router {
    /// By guest path; mounts may be added and removed while the guest is served
    /// ([`Router::mount_boxed`], [`Router::unmount`]).
    mounts: RwLock<BTreeMap<String, Arc<dyn Provider>>>,
    blocks: Vec<BlockRule>,
    events: Option<EventSink>,
    /// Handles open across every connection served from this router (reserved before the
    /// file is opened, so the budget holds under concurrent opens).
    open_handles: AtomicUsize,
    /// The files behind them: a handle opened on one connection works on every other (the
    /// guest's FUSE workers each have a connection), and goes with the one that opened it.
    handles: Mutex<HashMap<u64, OpenFile>>,
    next_handle: AtomicU64,
    next_connection: AtomicU64,
    /// The directory the guest mounts (see [`Router::set_root`]).
    root: Option<String>,
    /// Bytes stored on the host through this router.
    storage: Storage,
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Router")
            .field("mounts", &self.mounts)
            .field("blocks", &self.blocks)
            .field("events", &self.events.is_some())
            .field("open_handles", &self.open_handles.load(Ordering::Relaxed))
            .field("handles", &self.handles)
            .field("storage", &self.storage)
            .finish()
    }
}

/// A file the guest holds open.
#[derive(Debug)]
struct OpenFile {
    file: Arc<File>,
    /// The guest path it was opened by (rules and events of handle operations name it).
    path: String,
    /// The connection that opened it.
    connection: u64,
}

/// A before-phase `block` rule: matching operations fail with EPERM in the guest.
#[derive(Debug, Clone)]
struct BlockRule {
    ops: Vec<String>,
    path: String,
}

/// Operation names rules match on.
const RULE_OPS: [&str; 16] = [
    "stat", "open", "read", "write", "create", "mkdir", "remove", "rename", "readdir", "chmod", "truncate", "symlink",
    "readlink", "link", "close", "sync",
];

/// Errors in VFS rules.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VfsRuleError {
    /// A field has a value the rules do not know.
    #[error("VFS rule {rule:?}: invalid {field} {value:?}")]
    Invalid {
        /// The rule.
        rule: String,
        /// The field.
        field: &'static str,
        /// The value.
        value: String,
    },
}

/// The rule name of a wire operation (`None`: never blocked, e.g. release).
fn rule_op(op: Op) -> Option<&'static str> {
    Some(match op {
        Op::Lookup | Op::Getattr => "stat",
        Op::Setattr | Op::Utimens => "chmod",
        Op::Read => "read",
        Op::Write => "write",
        Op::Create => "create",
        Op::Mkdir | Op::MkdirAll => "mkdir",
        Op::Unlink | Op::Rmdir => "remove",
        Op::Rename => "rename",
        Op::Open => "open",
        Op::Readdir | Op::List => "readdir",
        Op::Truncate => "truncate",
        Op::Symlink => "symlink",
        Op::Readlink => "readlink",
        Op::Link => "link",
        Op::Release | Op::Fsync | Op::Statfs | Op::Change => return None,
    })
}

/// The rule name for an op spelling, with the reference's aliases.
fn canonical_op(op: &str) -> String {
    match op.to_ascii_lowercase().as_str() {
        "read_dir" => "readdir".to_owned(),
        "removeall" | "remove_all" => "remove".to_owned(),
        other => other.to_owned(),
    }
}

/// Normalizes an absolute guest path: no `.`/`..`/empty components, no NUL.
pub fn clean_path(path: &str) -> Result<String, Errno> {
    if !path.starts_with('/') || path.contains('\0') {
        return Err(Errno::INVAL);
    }
    let mut parts = Vec::new();
    for part in path.split('/').filter(|p| !p.is_empty()) {
        if part == "." || part == ".." {
            return Err(Errno::ACCESS);
        }
        parts.push(part);
    }
    Ok(format!("/{}", parts.join("/")))
}

impl Router {
    /// Adds a mount at an absolute guest path.
    pub fn mount(&self, guest_path: &str, provider: impl Provider + 'static) -> Result<(), Errno> {
        self.mount_boxed(guest_path, Box::new(provider))
    }

    /// Adds a mount of an already boxed provider, also while the guest is served (a new
    /// mount point is seen at once: listings of the synthesized directories above mounts are
    /// never cached by the guest).
    pub fn mount_boxed(&self, guest_path: &str, provider: Box<dyn Provider>) -> Result<(), Errno> {
        self.write_mounts().insert(clean_path(guest_path)?, Arc::from(provider));
        Ok(())
    }

    /// Removes the mount at `guest_path` (handles already open on it keep working until
    /// released); whether there was one.
    pub fn unmount(&self, guest_path: &str) -> bool {
        clean_path(guest_path).is_ok_and(|path| self.write_mounts().remove(&path).is_some())
    }

    fn read_mounts(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Arc<dyn Provider>>> {
        // The map is changed by single inserts and removes: never left half-changed.
        self.mounts.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write_mounts(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, Arc<dyn Provider>>> {
        self.mounts.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// The guest path the guest mounts: a directory even while nothing is mounted under it
    /// (volumes may be added later).
    pub fn set_root(&mut self, guest_path: &str) -> Result<(), Errno> {
        self.root = Some(clean_path(guest_path)?);
        Ok(())
    }

    /// Installs interception rules: before-phase `block` rules are enforced; `allow` rules
    /// and after-phase rules block nothing (after-phase work happens on the `file` events).
    pub fn set_rules(&mut self, config: &matchlock_api::config::VfsInterception) -> Result<(), VfsRuleError> {
        for rule in &config.rules {
            let invalid =
                |field, value: &str| VfsRuleError::Invalid { rule: rule.name.clone(), field, value: value.to_owned() };
            let ops: Vec<String> = rule.ops.iter().map(|op| canonical_op(op)).collect();
            if let Some(op) = ops.iter().find(|op| !RULE_OPS.contains(&op.as_str())) {
                return Err(invalid("op", op));
            }
            if (rule.phase, rule.action) == (RulePhase::Before, VfsAction::Block) {
                self.blocks.push(BlockRule { ops, path: rule.path.clone() });
            }
        }
        Ok(())
    }

    /// Sets the budget of bytes the guest may make the host store through this router
    /// (default [`DEFAULT_QUOTA`]).
    pub fn set_quota(&mut self, bytes: u64) {
        self.storage.quota = bytes;
    }

    /// Bytes the guest stores on the host through this router now (what the quota counts).
    pub fn stored_bytes(&self) -> u64 {
        self.storage.stored.load(Ordering::Relaxed)
    }

    /// Sends a `file` event to `sink` after every operation that succeeded.
    pub fn set_event_sink(&mut self, sink: EventSink) {
        self.events = Some(sink);
    }

    fn blocked(&self, op: Op, path: &str) -> bool {
        let Some(name) = rule_op(op) else { return false };
        self.blocks.iter().any(|r| {
            (r.ops.is_empty() || r.ops.iter().any(|o| o == name))
                && (r.path.is_empty() || matchlock_api::config::path_matches(&r.path, path))
        })
    }

    fn route(&self, path: &str) -> Result<Route, Errno> {
        let path = clean_path(path)?;
        let mounts = self.read_mounts();
        let best = mounts
            .iter()
            .filter(|(mount, _)| path == **mount || mount.as_str() == "/" || path.starts_with(&format!("{mount}/")))
            .max_by_key(|(mount, _)| mount.len());
        if let Some((mount, provider)) = best {
            let rel = path[mount.len()..].trim_start_matches('/').to_owned();
            return Ok(Route::Mount(provider.clone(), rel));
        }
        let prefix = if path == "/" { "/".to_owned() } else { format!("{path}/") };
        let mut children: Vec<String> = mounts
            .keys()
            .filter_map(|m| m.strip_prefix(&prefix))
            .map(|rest| rest.split('/').next().unwrap_or(rest).to_owned())
            .collect();
        if children.is_empty() && self.root.as_deref() != Some(path.as_str()) {
            return Err(Errno::NOENT);
        }
        children.dedup();
        Ok(Route::Synthetic(children))
    }
}

/// Makes a new name with `make`, charged [`ENTRY_COST`] first (given back if it fails).
fn new_entry(router: &Router, make: impl FnOnce() -> Result<(), Errno>) -> Result<(), Errno> {
    charged(router, ENTRY_COST, make)
}

/// Runs `change` with `bytes` taken from the budget first, given back if it fails.
fn charged(router: &Router, bytes: u64, change: impl FnOnce() -> Result<(), Errno>) -> Result<(), Errno> {
    router.storage.charge(bytes)?;
    change().inspect_err(|_| router.storage.credit(bytes))
}

/// The attributes of a synthesized directory.
fn synthetic_dir(path: &str) -> Stat {
    Stat { size: 4096, mode: 0o040_755, is_dir: true, ino: Some(hostfs::inode_hash(path.bytes())), ..Stat::default() }
}

/// Answers requests on one guest connection until it closes. Several connections may be
/// served at once (each on its own thread); handles are shared between them.
pub fn serve(stream: &mut (impl Read + Write), router: &Router) -> Result<(), WireError> {
    let connection = router.next_connection.fetch_add(1, Ordering::Relaxed);
    let served = serve_requests(stream, router, connection);
    // Whatever the guest left open goes back to the sandbox's budget with the connection.
    let mut handles = router.lock_handles();
    let before = handles.len();
    handles.retain(|_, open| open.connection != connection);
    router.open_handles.fetch_sub(before - handles.len(), Ordering::Relaxed);
    served
}

impl Router {
    fn lock_handles(&self) -> std::sync::MutexGuard<'_, HashMap<u64, OpenFile>> {
        self.handles.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The file behind handle `fh` and the path it was opened by.
    fn open_file(&self, fh: u64) -> Result<(Arc<File>, String), Errno> {
        let handles = self.lock_handles();
        let open = handles.get(&fh).ok_or(Errno::BADF)?;
        Ok((Arc::clone(&open.file), open.path.clone()))
    }
}

fn serve_requests(stream: &mut (impl Read + Write), router: &Router, connection: u64) -> Result<(), WireError> {
    while let Some(request) = wire::read_message::<Request>(stream)? {
        let response = if request.op == Op::Change as u8 {
            // One request for what `setattr` changes: each part is the operation it stands
            // for, with its rules, budget and event; the first failure ends it.
            change_parts(&request)
                .iter()
                .try_for_each(|part| handle_reporting(router, connection, part).map(drop))
                .and_then(|()| {
                    handle_reporting(router, connection, &Request { op: Op::Getattr as u8, ..request.clone() })
                })
        } else {
            handle_reporting(router, connection, &request)
        };
        if request.quiet {
            continue;
        }
        let response = response.unwrap_or_else(|e| Response::error(e.raw_os_error()));
        match wire::write_message(stream, &response) {
            // An answer beyond the message bound (a whole huge directory asked for at once)
            // fails that request, not the connection and the handles it holds.
            Err(WireError::TooLarge(_)) => wire::write_message(stream, &Response::error(Errno::FBIG.raw_os_error()))?,
            written => written?,
        }
    }
    Ok(())
}

/// The operations a `Change` stands for.
fn change_parts(req: &Request) -> Vec<Request> {
    let base = Request { path: req.path.clone(), uid: req.uid, gid: req.gid, ..Request::default() };
    let mut parts = Vec::new();
    if let Some(mode) = req.new_mode {
        parts.push(Request { op: Op::Setattr as u8, mode, ..base.clone() });
    }
    if let Some(size) = req.new_size {
        parts.push(Request { op: Op::Truncate as u8, off: i64::try_from(size).unwrap_or(i64::MAX), ..base.clone() });
    }
    if req.atime_ns.is_some() || req.mtime_ns.is_some() {
        parts.push(Request { op: Op::Utimens as u8, atime_ns: req.atime_ns, mtime_ns: req.mtime_ns, ..base });
    }
    parts
}

/// Handles one request and reports its `file` event.
fn handle_reporting(router: &Router, connection: u64, request: &Request) -> Result<Response, Errno> {
    // The handle's path, for events on handle operations (gone after a release); only
    // looked up when someone listens.
    let handle_path = router.events.as_ref().and_then(|_| router.open_file(request.fh).ok()).map(|(_, path)| path);
    let response = handle(router, connection, request);
    if let (Some(sink), Ok(response)) = (&router.events, &response) {
        if let Some(event) = file_event(request, response, handle_path) {
            sink(event);
        }
        // An open that truncates is a truncation too (the guest's kernel asks for both in one
        // open): reported as one, as a separate truncation would be.
        if truncating_open(request) {
            if let Some(event) = file_event(&Request { op: Op::Truncate as u8, ..request.clone() }, response, None) {
                sink(event);
            }
        }
    }
    response
}

/// Whether `req` opens an existing file and truncates it (`O_TRUNC`).
fn truncating_open(req: &Request) -> bool {
    req.op == Op::Open as u8 && OFlags::from_bits_retain(req.flags).contains(OFlags::TRUNC)
}

fn handle(router: &Router, connection: u64, req: &Request) -> Result<Response, Errno> {
    let op = Op::from_code(req.op).ok_or(Errno::NOSYS)?;
    // Rules see the path of the handle for handle operations.
    let file = match op {
        Op::Read | Op::Write | Op::Fsync => Some(router.open_file(req.fh)?),
        _ => None,
    };
    let rule_path = file.as_ref().map_or(req.path.as_str(), |(_, path)| path.as_str());
    if router.blocked(op, rule_path)
        || (op == Op::Rename || op == Op::Link) && router.blocked(op, &req.new_path)
        || truncating_open(req) && router.blocked(Op::Truncate, rule_path)
    {
        return Err(Errno::PERM);
    }
    let ok = Response::default;
    // Handle operations do not look at paths.
    match (op, file) {
        (Op::Read, Some((file, _))) => {
            let size = req.sz.min(wire::MAX_IO) as usize;
            let mut data = vec![0u8; size];
            let offset = u64::try_from(req.off).map_err(|_| Errno::INVAL)?;
            let n = file.read_at(&mut data, offset).map_err(|e| io_errno(&e))?;
            data.truncate(n);
            return Ok(Response { data, ..ok() });
        }
        (Op::Write, Some((file, _))) => {
            let offset = u64::try_from(req.off).map_err(|_| Errno::INVAL)?;
            let size = file.metadata().map_err(|e| io_errno(&e))?.len();
            let growth = offset.saturating_add(req.data.len() as u64).saturating_sub(size);
            router.storage.charge(growth)?;
            if let Err(e) = file.write_all_at(&req.data, offset) {
                router.storage.credit(growth);
                return Err(io_errno(&e));
            }
            // The size and time after it, for the guest's listing of the file.
            let after = file.metadata().ok().map(|m| Stat {
                size: m.len(),
                mtime: m.mtime(),
                mtime_nsec: u32::try_from(m.mtime_nsec()).unwrap_or(0),
                ..Stat::default()
            });
            return Ok(Response { written: u32::try_from(req.data.len()).unwrap_or(u32::MAX), stat: after, ..ok() });
        }
        (Op::Fsync, Some((file, _))) => {
            file.sync_all().map_err(|e| io_errno(&e))?;
            return Ok(ok());
        }
        (Op::Release, _) => {
            router.lock_handles().remove(&req.fh).ok_or(Errno::BADF)?;
            router.open_handles.fetch_sub(1, Ordering::Relaxed);
            return Ok(ok());
        }
        _ => {}
    }
    let route = router.route(&req.path)?;
    let (provider, rel) = match route {
        Route::Synthetic(children) => {
            return match op {
                Op::Lookup | Op::Getattr => Ok(Response { stat: Some(synthetic_dir(&req.path)), ..ok() }),
                // `df` asks about the FUSE mount point, often a synthesized directory:
                // answer for the first mount beneath it.
                Op::Statfs => {
                    let base = clean_path(&req.path)?;
                    let prefix = if base == "/" { "/".to_owned() } else { format!("{base}/") };
                    let first =
                        router.read_mounts().iter().find(|(m, _)| m.starts_with(&prefix)).map(|(_, fs)| fs.clone());
                    let statfs = router.storage.bound(first.ok_or(Errno::NOENT)?.statfs()?);
                    Ok(Response { statfs: Some(statfs), ..ok() })
                }
                // Never complete: mounts may be added beneath it at any time, and the guest
                // must ask again rather than answer a lookup of a new one from its cache.
                Op::Readdir | Op::List => {
                    let base = clean_path(&req.path)?;
                    let entries = children
                        .into_iter()
                        .map(|name| {
                            let child = if base == "/" { format!("/{name}") } else { format!("{base}/{name}") };
                            // A mount point shows what is mounted there (a single file is a file).
                            match router.route(&child) {
                                Ok(Route::Mount(fs, rel)) if rel.is_empty() => match fs.lstat("") {
                                    Ok(st) => DirEntry::new(name, &st),
                                    Err(_) => DirEntry::new(name, &synthetic_dir(&child)),
                                },
                                _ => DirEntry::new(name, &synthetic_dir(&child)),
                            }
                        })
                        .collect();
                    Ok(Response { complete: false, ..listing_page(router, entries, req) })
                }
                _ => Err(Errno::ACCESS),
            };
        }
        Route::Mount(fs, rel) => (fs, rel),
    };
    let fs: &dyn Provider = provider.as_ref();
    let second = || -> Result<String, Errno> {
        match router.route(&req.new_path)? {
            Route::Mount(other, rel) if Arc::ptr_eq(&other, &provider) => Ok(rel),
            Route::Mount(..) => Err(Errno::XDEV),
            Route::Synthetic(_) => Err(Errno::ACCESS),
        }
    };
    let open = |flags: OFlags, mode: u32| -> Result<Response, Errno> {
        if router.open_handles.fetch_add(1, Ordering::Relaxed) >= MAX_HANDLES {
            router.open_handles.fetch_sub(1, Ordering::Relaxed);
            return Err(Errno::MFILE);
        }
        let writes = flags.intersects(OFlags::WRONLY | OFlags::RDWR | OFlags::TRUNC | OFlags::APPEND);
        let copied = if writes { fs.copy_up_bytes(&rel, false) } else { 0 };
        let new_name =
            if flags.contains(OFlags::CREATE) && fs.lstat(&rel) == Err(Errno::NOENT) { ENTRY_COST } else { 0 };
        if let Err(e) = router.storage.charge(copied + new_name) {
            router.open_handles.fetch_sub(1, Ordering::Relaxed);
            return Err(e);
        }
        // Truncation frees what was stored, and what a copy-up just copied.
        let truncated = if flags.contains(OFlags::TRUNC) { fs.stored_bytes(&rel) + copied } else { 0 };
        let opened = fs.open(&rel, flags, mode).and_then(|file| Ok((file, fs.stat(&rel)?)));
        let (file, stat) = match opened {
            Ok(opened) => opened,
            Err(e) => {
                router.storage.credit(copied + new_name);
                router.open_handles.fetch_sub(1, Ordering::Relaxed);
                return Err(e);
            }
        };
        router.storage.credit(truncated);
        // What the guest cached of the file may serve its reads only while no read has to
        // meet a rule or be reported.
        let cacheable = router.events.is_none() && !router.blocked(Op::Read, &req.path);
        let version = if cacheable { content_version(&file, SystemTime::now()) } else { None };
        let fh = router.next_handle.fetch_add(1, Ordering::Relaxed) + 1;
        router.lock_handles().insert(fh, OpenFile { file: Arc::new(file), path: req.path.clone(), connection });
        Ok(Response { fh, stat: Some(stat), version, ..ok() })
    };
    match op {
        Op::Lookup | Op::Getattr => Ok(Response { stat: Some(fs.lstat(&rel)?), ..ok() }),
        Op::Setattr => {
            copying_up(router, fs, &rel, false, || fs.chmod(&rel, req.mode))?;
            Ok(Response { stat: Some(fs.stat(&rel)?), ..ok() })
        }
        Op::Open => open(OFlags::from_bits_retain(req.flags) - OFlags::CREATE, req.mode),
        Op::Create => open(OFlags::from_bits_retain(req.flags) | OFlags::CREATE, req.mode),
        Op::Mkdir => {
            new_entry(router, || fs.mkdir(&rel, req.mode))?;
            Ok(Response { stat: Some(fs.lstat(&rel)?), ..ok() })
        }
        Op::MkdirAll => {
            let mut prefix = String::new();
            for part in rel.split('/').filter(|p| !p.is_empty()) {
                prefix = if prefix.is_empty() { part.to_owned() } else { format!("{prefix}/{part}") };
                match new_entry(router, || fs.mkdir(&prefix, req.mode)) {
                    Ok(()) | Err(Errno::EXIST) => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(ok())
        }
        Op::Unlink | Op::Rmdir => {
            let freed = fs.stored_bytes(&rel) + if fs.frees_entry(&rel) { ENTRY_COST } else { 0 };
            fs.remove(&rel, op == Op::Rmdir)?;
            router.storage.credit(freed);
            Ok(ok())
        }
        Op::Rename => {
            let to = second()?;
            let replaced = match fs.lstat(&to) {
                Ok(_) => fs.stored_bytes(&to) + if fs.frees_entry(&to) { ENTRY_COST } else { 0 },
                Err(_) => 0,
            };
            copying_up(router, fs, &rel, true, || fs.rename(&rel, &to))?;
            router.storage.credit(replaced);
            Ok(ok())
        }
        Op::Link => {
            let to = second()?;
            new_entry(router, || copying_up(router, fs, &rel, false, || fs.link(&rel, &to))).map(|()| ok())
        }
        Op::Readdir | Op::List => Ok(listing_page(router, fs.readdir(&rel)?, req)),
        Op::Truncate => {
            let size = u64::try_from(req.off).map_err(|_| Errno::INVAL)?;
            let before = fs.stat(&rel)?.size;
            // A copy-up stores `before` bytes first; growth beyond them is stored too.
            let copied = fs.copy_up_bytes(&rel, false);
            let charged = copied + size.saturating_sub(before);
            router.storage.charge(charged)?;
            if let Err(e) = fs.truncate(&rel, size) {
                router.storage.credit(charged);
                return Err(e);
            }
            // Shrinking frees what was stored (or just copied) beyond `size`.
            router.storage.credit(before.saturating_sub(size));
            Ok(ok())
        }
        Op::Symlink => {
            // `path` is where the link goes; `new_path` carries the target text.
            new_entry(router, || fs.symlink(&req.new_path, &rel))?;
            Ok(ok())
        }
        Op::Readlink => Ok(Response { data: fs.readlink(&rel)?.into_bytes(), ..ok() }),
        Op::Utimens => {
            copying_up(router, fs, &rel, false, || fs.set_times(&rel, req.atime_ns, req.mtime_ns))?;
            Ok(Response { stat: Some(fs.lstat(&rel)?), ..ok() })
        }
        Op::Statfs => Ok(Response { statfs: Some(router.storage.bound(fs.statfs()?)), ..ok() }),
        Op::Read | Op::Write | Op::Release | Op::Fsync => Err(Errno::BADF),
        // Split by `serve_requests`.
        Op::Change => Err(Errno::INVAL),
    }
}

/// The page of a directory listing a request asks for (`sz` entries from `off`; all without
/// `sz`). Complete unless a rule could hide something in it: then every name is looked up
/// (and checked against the rules) on its own.
fn listing_page(router: &Router, mut entries: Vec<DirEntry>, req: &Request) -> Response {
    let mut more = false;
    if req.sz > 0 {
        let start = usize::try_from(req.off).unwrap_or(0).min(entries.len());
        let end = start.saturating_add(req.sz as usize).min(entries.len());
        more = end < entries.len();
        entries.truncate(end);
        entries.drain(..start);
    }
    Response { entries, complete: router.blocks.is_empty(), more, ..Response::default() }
}

/// Runs `change` on `rel` with its copy-up charged to the sandbox's budget first (`ENOSPC`,
/// and nothing done, when it does not fit); a failed change gives the charge back.
fn copying_up(
    router: &Router,
    fs: &dyn Provider,
    rel: &str,
    deep: bool,
    change: impl FnOnce() -> Result<(), Errno>,
) -> Result<(), Errno> {
    charged(router, fs.copy_up_bytes(rel, deep), change)
}

/// The event for a successful operation; lookups, attribute reads and listings for the
/// guest's lookup cache, which the guest kernel issues constantly, and releases are not
/// reported.
fn file_event(req: &Request, response: &Response, handle_path: Option<String>) -> Option<FileEvent> {
    let op = Op::from_code(req.op)?;
    let name = match op {
        Op::Lookup | Op::Getattr | Op::Release | Op::List | Op::Change => return None,
        Op::Fsync => "sync",
        other => rule_op(other)?,
    };
    let path = match op {
        Op::Read | Op::Write | Op::Fsync => handle_path?,
        _ => req.path.clone(),
    };
    let size = match op {
        Op::Write => u64::from(response.written),
        Op::Read => response.data.len() as u64,
        _ => response.stat.as_ref().map_or(0, |s| s.size),
    };
    let mode = match op {
        Op::Create | Op::Mkdir | Op::MkdirAll | Op::Setattr => Some(req.mode & 0o7777),
        _ => response.stat.as_ref().map(|s| s.mode & 0o7777),
    };
    Some(FileEvent { op: name.to_owned(), path, size, mode, uid: Some(req.uid), gid: Some(req.gid) })
}

/// How long after a file's last change its timestamps are taken to set its content apart:
/// far above the kernel's clock tick for file times, so a later change cannot share them.
const SETTLED_AFTER: Duration = Duration::from_millis(100);

/// [`Response::version`] of open `file` at `now`: a hash of its identity, size and times,
/// which any write, truncation, rename or attribute change moves on (the change time cannot
/// be set back); `None` while its last change is too recent to tell from a next one within
/// the same clock tick.
fn content_version(file: &File, now: SystemTime) -> Option<u64> {
    let meta = file.metadata().ok()?;
    let changed = UNIX_EPOCH + Duration::new(u64::try_from(meta.ctime()).ok()?, u32::try_from(meta.ctime_nsec()).ok()?);
    if now.duration_since(changed).ok()? < SETTLED_AFTER {
        return None;
    }
    let parts = [
        meta.dev().to_le_bytes(),
        meta.ino().to_le_bytes(),
        meta.size().to_le_bytes(),
        meta.mtime().to_le_bytes(),
        meta.mtime_nsec().to_le_bytes(),
        meta.ctime().to_le_bytes(),
        meta.ctime_nsec().to_le_bytes(),
    ];
    Some(hostfs::inode_hash(parts.into_iter().flatten()))
}

fn io_errno(e: &std::io::Error) -> Errno {
    e.raw_os_error().map_or(Errno::IO, Errno::from_raw_os_error)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Pipe {
        input: std::io::Cursor<Vec<u8>>,
        output: Vec<u8>,
    }

    impl Read for Pipe {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            self.input.read(buf)
        }
    }

    impl Write for Pipe {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.output.write(buf)
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn exchange(router: &Router, requests: &[Request]) -> Vec<Response> {
        let mut input = Vec::new();
        for r in requests {
            wire::write_message(&mut input, r).unwrap();
        }
        let mut pipe = Pipe { input: std::io::Cursor::new(input), output: Vec::new() };
        serve(&mut pipe, router).unwrap();
        let mut out = pipe.output.as_slice();
        std::iter::from_fn(|| wire::read_message::<Response>(&mut out).unwrap()).collect()
    }

    fn req(op: Op, path: &str) -> Request {
        Request { op: op as u8, path: path.into(), ..Request::default() }
    }

    #[test]
    fn the_quota_bounds_what_the_guest_stores_and_statfs_tells_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut router = Router::default();
        router.mount("/w", HostFs::new(dir.path(), false).unwrap()).unwrap();
        router.set_quota(1 << 20);
        let call = |r: Request| handle(&router, 1, &r);
        let create = |path: &str| Request { flags: (OFlags::RDWR).bits(), mode: 0o644, ..req(Op::Create, path) };
        let write = |fh, off: i64, len: usize| Request { fh, off, data: vec![7; len], ..req(Op::Write, "") };
        let a = call(create("/w/a")).unwrap().fh;
        call(write(a, 0, 600 << 10)).unwrap();
        call(write(a, 0, 600 << 10)).expect("rewriting what is stored takes nothing more");
        let b = call(create("/w/b")).unwrap().fh;
        assert_eq!(call(write(b, 0, 600 << 10)).unwrap_err(), Errno::NOSPC);
        assert_eq!(std::fs::metadata(dir.path().join("b")).unwrap().len(), 0, "nothing of a refused write is stored");
        assert_eq!(call(Request { off: 10 << 20, ..req(Op::Truncate, "/w/b") }).unwrap_err(), Errno::NOSPC);
        let stats = call(req(Op::Statfs, "/w")).unwrap().statfs.unwrap();
        let unit = u64::from(stats.frsize);
        assert_eq!(stats.blocks, (1 << 20) / unit, "df shows the quota");
        assert_eq!(stats.bavail, ((1 << 20) - (600 << 10) - 2 * ENTRY_COST) / unit, "and what is left of it");
        // A second link freed is not space freed; the last link is.
        call(Request { new_path: "/w/a2".into(), ..req(Op::Link, "/w/a") }).unwrap();
        call(req(Op::Unlink, "/w/a2")).unwrap();
        assert_eq!(call(write(b, 0, 600 << 10)).unwrap_err(), Errno::NOSPC);
        call(req(Op::Unlink, "/w/a")).unwrap();
        call(write(b, 0, 600 << 10)).expect("space freed by the removal");
        call(Request { off: 0, ..req(Op::Truncate, "/w/b") }).unwrap();
        let c = call(create("/w/c")).unwrap().fh;
        call(write(c, 0, 900 << 10)).expect("space freed by the truncation");
    }

    #[test]
    fn every_name_the_guest_creates_is_charged_so_empty_files_stop_at_the_quota() {
        let dir = tempfile::tempdir().unwrap();
        let mut router = Router::default();
        router.mount("/w", HostFs::new(dir.path(), false).unwrap()).unwrap();
        router.set_quota(1 << 20);
        let call = |r: Request| handle(&router, 1, &r);
        let make = |i: usize| match i % 4 {
            // As `>` and dd create: with O_TRUNC, which frees what the file held, not its name.
            0 => Request {
                flags: (OFlags::WRONLY | OFlags::TRUNC).bits(),
                mode: 0o644,
                ..req(Op::Create, &format!("/w/f{i}"))
            },
            1 => Request { mode: 0o755, ..req(Op::Mkdir, &format!("/w/d{i}")) },
            2 => Request { new_path: "target".into(), ..req(Op::Symlink, &format!("/w/s{i}")) },
            _ => Request { new_path: format!("/w/l{i}"), ..req(Op::Link, "/w/f0") },
        };
        // Empty files, directories, symlinks and hard links: 100 000 asked, the quota's worth made.
        let mut made = 0;
        let mut refused = 0;
        for i in 0..100_000 {
            match call(make(i)) {
                Ok(r) => {
                    made += 1;
                    if r.fh != 0 {
                        call(Request { fh: r.fh, ..req(Op::Release, "") }).unwrap();
                    }
                }
                Err(e) => {
                    assert_eq!(e, Errno::NOSPC, "{i}");
                    refused += 1;
                }
            }
        }
        let budget = ((1 << 20) / ENTRY_COST) as usize;
        assert_eq!(made, budget);
        assert_eq!(refused, 100_000 - budget);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), budget, "what the host holds");
        let stats = call(req(Op::Statfs, "/w")).unwrap().statfs.unwrap();
        assert_eq!((stats.files, stats.ffree), (budget as u64, 0), "df -i tells the budget");
        // A creation that fails (it exists) costs nothing; a removal gives its name back.
        assert_eq!(call(Request { mode: 0o755, ..req(Op::Rmdir, "/w/d1") }).map(|_| ()), Ok(()));
        assert_eq!(call(Request { mode: 0o755, ..req(Op::Mkdir, "/w/d5") }).unwrap_err(), Errno::EXIST);
        call(Request { mode: 0o755, ..req(Op::Mkdir, "/w/again") }).expect("the freed name");
        assert_eq!(call(Request { mode: 0o755, ..req(Op::Mkdir, "/w/more") }).unwrap_err(), Errno::NOSPC);
    }

    #[test]
    fn overlay_copy_ups_are_charged_and_lower_files_free_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (lower, upper) = (dir.path().join("lower"), dir.path().join("upper"));
        std::fs::create_dir_all(lower.join("tree")).unwrap();
        std::fs::create_dir(&upper).unwrap();
        std::fs::write(lower.join("big"), vec![1; 700 << 10]).unwrap();
        std::fs::write(lower.join("tree/x"), vec![1; 200 << 10]).unwrap();
        std::fs::write(lower.join("tree/y"), vec![1; 200 << 10]).unwrap();
        let mut router = Router::default();
        router.mount("/w", Overlay::new(&lower, &upper).unwrap()).unwrap();
        router.set_quota(1 << 20);
        let mut call = |r: Request| handle(&router, 1, &r);
        let open = |path: &str, flags: OFlags| Request { flags: flags.bits(), ..req(Op::Open, path) };
        let write = |fh, off: i64, len: usize| Request { fh, off, data: vec![7; len], ..req(Op::Write, "") };
        let used = |call: &mut dyn FnMut(Request) -> Result<Response, Errno>| {
            let stats = call(req(Op::Statfs, "/w")).unwrap().statfs.unwrap();
            (stats.blocks - stats.bavail) * u64::from(stats.frsize)
        };
        // Reading stores nothing; opening for writing copies the file up, and that is charged.
        call(open("/w/big", OFlags::RDONLY)).unwrap();
        assert_eq!(used(&mut call), 0);
        let big = call(open("/w/big", OFlags::WRONLY)).unwrap().fh;
        assert_eq!(used(&mut call), 700 << 10, "the copy-up is charged");
        assert_eq!(call(write(big, 700 << 10, 400 << 10)).unwrap_err(), Errno::NOSPC);
        // Renaming a directory not up yet copies all of it: 400 KiB more than fits.
        assert_eq!(
            call(Request { new_path: "/w/moved".into(), ..req(Op::Rename, "/w/tree") }).unwrap_err(),
            Errno::NOSPC
        );
        assert!(!upper.join("moved").exists() && !upper.join("tree").exists(), "a refused copy-up copies nothing");
        // Deleting a file only the lower layer has frees nothing (a whiteout is written).
        call(req(Op::Unlink, "/w/tree/x")).unwrap();
        assert_eq!(used(&mut call), 700 << 10);
        // Truncating what was copied up frees it; removing the copy frees the rest.
        call(open("/w/big", OFlags::WRONLY | OFlags::TRUNC)).unwrap();
        assert_eq!(used(&mut call), 0, "a truncating open frees what its copy-up stored");
        call(write(big, 0, 100 << 10)).unwrap();
        call(Request { new_path: "/w/moved".into(), ..req(Op::Rename, "/w/tree") }).expect("now it fits");
        assert_eq!(used(&mut call), 300 << 10, "the rename copied tree/y (x is deleted)");
        call(req(Op::Unlink, "/w/big")).unwrap();
        assert_eq!(used(&mut call), 200 << 10);
    }

    #[test]
    fn open_handles_share_one_budget_across_connections() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f"), b"x").unwrap();
        let router = Router::default();
        router.mount("/w", HostFs::new(dir.path(), false).unwrap()).unwrap();
        let open = Request { flags: OFlags::RDONLY.bits(), ..req(Op::Open, "/w/f") };
        // Two connections that hold what they open (no release): together, at most the budget.
        let (first, second) = (1, 2);
        let mut opened = Vec::new();
        for _ in 0..MAX_HANDLES / 2 {
            opened.push(handle(&router, first, &open).unwrap().fh);
            handle(&router, second, &open).unwrap();
        }
        assert_eq!(handle(&router, second, &open).unwrap_err(), Errno::MFILE);
        assert_eq!(
            exchange(&router, std::slice::from_ref(&open))[0].err,
            -Errno::MFILE.raw_os_error(),
            "a new connection too"
        );
        // A release gives one back (on any connection); a missing file does not take one.
        handle(&router, second, &Request { fh: opened[0], ..req(Op::Release, "") }).unwrap();
        assert_eq!(handle(&router, first, &req(Op::Open, "/w/missing")).unwrap_err(), Errno::NOENT);
        handle(&router, first, &open).unwrap();
        // The two connections end (as `serve` ends them), then a new one opens and leaves.
        router.lock_handles().clear();
        router.open_handles.store(0, Ordering::Relaxed);
        let responses = exchange(&router, &vec![open; 10]);
        assert!(responses.iter().all(|r| r.err == 0), "{responses:?}");
        assert_eq!(router.open_handles.load(Ordering::Relaxed), 0, "serve gave back what the connection left open");
    }

    #[test]
    fn routes_by_longest_prefix_with_synthesized_parents() {
        let dir = tempfile::tempdir().unwrap();
        for sub in ["src", "data"] {
            std::fs::create_dir(dir.path().join(sub)).unwrap();
        }
        std::fs::write(dir.path().join("data/f"), "data").unwrap();
        let router = Router::default();
        router.mount("/workspace/src", HostFs::new(&dir.path().join("src"), false).unwrap()).unwrap();
        router.mount("/workspace/deep/data", HostFs::new(&dir.path().join("data"), true).unwrap()).unwrap();
        let create = Request { flags: OFlags::WRONLY.bits(), mode: 0o644, ..req(Op::Create, "/workspace/src/a.txt") };
        let responses = exchange(
            &router,
            &[
                create,
                Request { fh: 1, data: b"written".to_vec(), ..req(Op::Write, "") },
                req(Op::Release, ""),
                Request { fh: 1, ..req(Op::Release, "") },
                req(Op::Readdir, "/workspace"),
                req(Op::Getattr, "/workspace/deep"),
                req(Op::Getattr, "/workspace/deep/data/f"),
                Request { flags: OFlags::WRONLY.bits(), ..req(Op::Open, "/workspace/deep/data/f") },
                req(Op::Getattr, "/workspace/nothing"),
                req(Op::Getattr, "/workspace/src/../../etc"),
                Request { new_path: "/workspace/deep/data/moved".into(), ..req(Op::Rename, "/workspace/src/a.txt") },
                Request { op: 200, ..Request::default() },
            ],
        );
        assert_eq!(responses[0].err, 0);
        assert_eq!(responses[1].written, 7);
        assert_eq!(responses[2].err, -libc_errno(Errno::BADF), "handle 0 was never opened");
        assert_eq!(responses[3].err, 0);
        let names: Vec<&str> = responses[4].entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["deep", "src"]);
        assert!(responses[5].stat.as_ref().unwrap().is_dir);
        assert_eq!(responses[6].stat.as_ref().unwrap().size, 4);
        assert_eq!(responses[7].err, -libc_errno(Errno::ROFS));
        assert_eq!(responses[8].err, -libc_errno(Errno::NOENT));
        assert_eq!(responses[9].err, -libc_errno(Errno::ACCESS));
        assert_eq!(responses[10].err, -libc_errno(Errno::XDEV), "no rename across mounts");
        assert_eq!(responses[11].err, -libc_errno(Errno::NOSYS));
        assert_eq!(std::fs::read_to_string(dir.path().join("src/a.txt")).unwrap(), "written");
    }

    #[test]
    fn a_read_only_mount_nested_in_a_writable_one_cannot_be_written_through_a_symlink() {
        // The host directory of the read-only mount lies inside the writable one's.
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("ro")).unwrap();
        std::fs::write(dir.path().join("ro/f"), "original").unwrap();
        let router = Router::default();
        router.mount("/w", HostFs::new(dir.path(), false).unwrap()).unwrap();
        router.mount("/w/ro", HostFs::new(&dir.path().join("ro"), true).unwrap()).unwrap();
        let write =
            |path: &str, flags: OFlags| Request { flags: (OFlags::WRONLY | flags).bits(), ..req(Op::Open, path) };
        let responses = exchange(
            &router,
            &[
                // Forged: a relative symlink in the writable mount to the read-only one's
                // directory (and one to its file), then writes through them.
                Request { new_path: "ro".into(), ..req(Op::Symlink, "/w/link") },
                Request { new_path: "ro/f".into(), ..req(Op::Symlink, "/w/flink") },
                write("/w/link/f", OFlags::TRUNC),
                write("/w/flink", OFlags::TRUNC),
                Request { flags: OFlags::WRONLY.bits(), mode: 0o644, ..req(Op::Create, "/w/link/new") },
                Request { off: 0, ..req(Op::Truncate, "/w/link/f") },
                req(Op::Unlink, "/w/link/f"),
                Request { new_path: "/w/stolen".into(), ..req(Op::Rename, "/w/link/f") },
                // Positive controls: the read-only mount by its own path refuses, the
                // writable mount's own files are written.
                write("/w/ro/f", OFlags::TRUNC),
                Request { flags: OFlags::WRONLY.bits(), mode: 0o644, ..req(Op::Create, "/w/mine") },
            ],
        );
        let symlinks_made = [&responses[0], &responses[1]].iter().filter(|r| r.err == 0).count();
        for (i, r) in responses[2..8].iter().enumerate() {
            assert_ne!(r.err, 0, "forged request {i} through a symlink succeeded");
        }
        assert_eq!(responses[8].err, -libc_errno(Errno::ROFS));
        assert_eq!(responses[9].err, 0);
        assert_eq!(std::fs::read_to_string(dir.path().join("ro/f")).unwrap(), "original");
        assert!(!dir.path().join("ro/new").exists() && !dir.path().join("stolen").exists());
        assert!(dir.path().join("mine").exists());
        // The symlinks themselves were allowed (their targets are text): the attack was real.
        assert_eq!(symlinks_made, 2, "{responses:?}");
    }

    #[test]
    fn block_rules_refuse_matching_operations() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("secret.env"), "x").unwrap();
        std::fs::write(dir.path().join("ok.txt"), "y").unwrap();
        let mut router = Router::default();
        router.mount("/workspace", HostFs::new(dir.path(), false).unwrap()).unwrap();
        let rules = block_rule("no-env", &["open", "write"], "/workspace/*.env");
        router.set_rules(&rules).unwrap();
        let open = |path: &str| Request { flags: OFlags::RDONLY.bits(), ..req(Op::Open, path) };
        let responses = exchange(
            &router,
            &[open("/workspace/secret.env"), open("/workspace/ok.txt"), req(Op::Getattr, "/workspace/secret.env")],
        );
        assert_eq!(responses[0].err, -libc_errno(Errno::PERM));
        assert_eq!(responses[1].err, 0);
        assert_eq!(responses[2].err, 0, "stat is not in the rule's ops");
        let mut bad = rules;
        bad.rules[0].ops = vec!["explode".into()];
        assert!(Router::default().set_rules(&bad).is_err());
    }

    #[test]
    fn times_and_statfs() {
        let dir = tempfile::tempdir().unwrap();
        let upper = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f"), "x").unwrap();
        let router = Router::default();
        router.mount("/w/host", HostFs::new(dir.path(), false).unwrap()).unwrap();
        router.mount("/w/over", Overlay::new(dir.path(), upper.path()).unwrap()).unwrap();
        router.mount("/w/ro", HostFs::new(dir.path(), true).unwrap()).unwrap();
        let utimens = |path: &str, mtime_ns| Request { mtime_ns: Some(mtime_ns), ..req(Op::Utimens, path) };
        let responses = exchange(
            &router,
            &[
                utimens("/w/host/f", 1_577_934_245_123_456_789),
                utimens("/w/over/f", 86_400_000_000_000),
                utimens("/w/ro/f", 0),
                req(Op::Statfs, "/w/host"),
                req(Op::Statfs, "/w"),
            ],
        );
        let stat = responses[0].stat.as_ref().unwrap();
        assert_eq!((stat.mtime, stat.mtime_nsec), (1_577_934_245, 123_456_789));
        assert_eq!(responses[1].stat.as_ref().unwrap().mtime, 86_400, "the overlay copy changed");
        let host_mtime = std::fs::metadata(dir.path().join("f")).unwrap().modified().unwrap();
        assert_eq!(host_mtime.duration_since(UNIX_EPOCH).unwrap().as_secs(), 1_577_934_245);
        assert_eq!(responses[2].err, -libc_errno(Errno::ROFS));
        let st = responses[3].statfs.as_ref().unwrap();
        assert!(st.blocks > 0 && st.bsize > 0 && st.namelen > 0, "{st:?}");
        let synthesized = responses[4].statfs.as_ref().unwrap();
        // Free counts move with the rest of the machine; the size does not.
        assert_eq!((synthesized.blocks, synthesized.bsize), (st.blocks, st.bsize), "answers for a mount beneath it");
    }

    #[test]
    fn events_follow_successful_operations() {
        let dir = tempfile::tempdir().unwrap();
        let mut router = Router::default();
        router.mount("/workspace", HostFs::new(dir.path(), false).unwrap()).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let tx = Mutex::new(tx);
        router.set_event_sink(Box::new(move |e| tx.lock().unwrap().send(e).unwrap()));
        let create = Request { flags: OFlags::WRONLY.bits(), mode: 0o600, uid: 7, ..req(Op::Create, "/workspace/a") };
        exchange(
            &router,
            &[
                create,
                Request { fh: 1, data: b"12345".to_vec(), ..req(Op::Write, "") },
                Request { fh: 1, ..req(Op::Release, "") },
                req(Op::Getattr, "/workspace/a"),
                req(Op::Unlink, "/workspace/missing"),
            ],
        );
        let events: Vec<FileEvent> = rx.try_iter().collect();
        let summary: Vec<(&str, &str, u64)> = events.iter().map(|e| (e.op.as_str(), e.path.as_str(), e.size)).collect();
        assert_eq!(summary, [("create", "/workspace/a", 0), ("write", "/workspace/a", 5)]);
        assert_eq!((events[0].mode, events[0].uid), (Some(0o600), Some(7)));
    }

    #[test]
    fn handles_work_across_connections_and_quiet_requests_get_no_answer() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f"), b"shared").unwrap();
        let router = Router::default();
        router.mount("/w", HostFs::new(dir.path(), false).unwrap()).unwrap();
        // One FUSE worker opens, another reads and releases without waiting for the answer.
        let fh = handle(&router, 1, &Request { flags: OFlags::RDONLY.bits(), ..req(Op::Open, "/w/f") }).unwrap().fh;
        let responses = exchange(
            &router,
            &[
                Request { fh, sz: 100, ..req(Op::Read, "") },
                Request { fh, quiet: true, ..req(Op::Release, "") },
                req(Op::Getattr, "/w/f"),
            ],
        );
        assert_eq!(responses.len(), 2, "the quiet release is not answered: {responses:?}");
        assert_eq!(responses[0].data, b"shared");
        assert_eq!(responses[1].stat.as_ref().unwrap().size, 6);
        assert_eq!(router.open_handles.load(Ordering::Relaxed), 0, "the quiet release was done");
        assert!(router.lock_handles().is_empty());
    }

    #[test]
    fn listings_carry_attributes_and_are_complete_only_without_rules() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a"), b"12345").unwrap();
        std::fs::create_dir(dir.path().join("d")).unwrap();
        let mut router = Router::default();
        router.mount("/w/src", HostFs::new(dir.path(), false).unwrap()).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let tx = Mutex::new(tx);
        router.set_event_sink(Box::new(move |e| tx.lock().unwrap().send(e).unwrap()));
        let responses = exchange(&router, &[req(Op::List, "/w/src"), req(Op::List, "/w")]);
        assert!(responses[0].complete);
        let a = &responses[0].entries[0];
        let host = std::fs::metadata(dir.path().join("a")).unwrap();
        assert_eq!(a.stat(), exchange(&router, &[req(Op::Getattr, "/w/src/a")])[0].stat.clone().unwrap());
        assert_eq!((a.size, a.mtime), (5, MetadataExt::mtime(&host)));
        assert!(responses[0].entries[1].is_dir);
        assert!(!responses[1].complete, "mounts may appear under a synthesized directory: never cached");
        let src = responses[1].entries.iter().find(|e| e.name == "src").unwrap();
        assert_eq!(Some(src.stat()), exchange(&router, &[req(Op::Lookup, "/w/src")])[0].stat);
        assert!(rx.try_iter().next().is_none(), "listings for the lookup cache are not events");
        // With a rule in force a listing is never complete: lookups must meet the rules.
        let rules = block_rule("hide", &["stat"], "/w/src/a");
        router.set_rules(&rules).unwrap();
        assert!(!exchange(&router, &[req(Op::List, "/w/src")])[0].complete);
    }

    #[test]
    fn mounts_come_and_go_while_served() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("token"), b"t0k3n").unwrap();
        let mut router = Router::default();
        assert_eq!(exchange(&router, &[req(Op::Getattr, "/vol")])[0].err, -libc_errno(Errno::NOENT));
        router.set_root("/vol").unwrap();
        let empty = exchange(&router, &[req(Op::Getattr, "/vol"), req(Op::List, "/vol")]);
        assert!(empty[0].stat.as_ref().is_some_and(|s| s.is_dir), "the root is a directory with nothing under it");
        assert!(empty[1].entries.is_empty() && !empty[1].complete);
        router.mount("/vol/a", HostFs::new(dir.path(), true).unwrap()).unwrap();
        let before = exchange(&router, &[req(Op::Getattr, "/vol/b/token"), req(Op::Getattr, "/vol/a/token")]);
        assert_eq!(before[0].err, -libc_errno(Errno::NOENT));
        assert_eq!(before[1].err, 0);
        router.mount("/vol/b", HostFs::new(dir.path(), false).unwrap()).unwrap();
        let listed = exchange(&router, &[req(Op::List, "/vol"), req(Op::Getattr, "/vol/b/token")]);
        let names: Vec<&str> = listed[0].entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(listed[1].stat.as_ref().map(|s| s.size), Some(5));
        assert!(router.unmount("/vol/a/"));
        assert!(!router.unmount("/vol/a"), "gone already");
        let after = exchange(&router, &[req(Op::Getattr, "/vol/a/token"), req(Op::Getattr, "/vol/b/token")]);
        assert_eq!(after[0].err, -libc_errno(Errno::NOENT));
        assert_eq!(after[1].err, 0, "the other mount stays");
    }

    #[test]
    fn a_change_is_its_parts_with_their_rules_events_and_budget() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f"), b"12345").unwrap();
        let mut router = Router::default();
        router.mount("/w", HostFs::new(dir.path(), false).unwrap()).unwrap();
        router.set_quota(1 << 20);
        let (tx, rx) = std::sync::mpsc::channel();
        let tx = Mutex::new(tx);
        router.set_event_sink(Box::new(move |e| tx.lock().unwrap().send(e).unwrap()));
        let change = |size: u64| Request {
            new_mode: Some(0o600),
            new_size: Some(size),
            mtime_ns: Some(86_400_000_000_000),
            ..req(Op::Change, "/w/f")
        };
        let responses = exchange(&router, &[change(2), change(2 << 20)]);
        let stat = responses[0].stat.as_ref().unwrap();
        assert_eq!((stat.mode & 0o777, stat.size, stat.mtime), (0o600, 2, 86_400), "{responses:?}");
        assert_eq!(responses[1].err, -libc_errno(Errno::NOSPC), "the budget holds for a change's truncation");
        let ops: Vec<String> = rx.try_iter().map(|e| e.op).collect();
        assert_eq!(ops, ["chmod", "truncate", "chmod", "chmod"], "one event per part done, none after a failure");
        assert_eq!(std::fs::metadata(dir.path().join("f")).unwrap().len(), 2);
        // An open that truncates (the guest's kernel sends O_TRUNC with the open) is a
        // truncation for events and rules; a plain open for writing is not.
        let open = |flags: OFlags| Request { flags: flags.bits(), ..req(Op::Open, "/w/f") };
        let responses = exchange(&router, &[open(OFlags::WRONLY), open(OFlags::WRONLY | OFlags::TRUNC)]);
        assert!(responses.iter().all(|r| r.err == 0), "{responses:?}");
        assert_eq!(responses[1].stat.as_ref().unwrap().size, 0, "the open's answer has the size after");
        let ops: Vec<String> = rx.try_iter().map(|e| e.op).collect();
        assert_eq!(ops, ["open", "open", "truncate"]);
        std::fs::write(dir.path().join("f"), b"12").unwrap();
        let rules = block_rule("no-truncate", &["truncate"], "/w/f");
        router.set_rules(&rules).unwrap();
        assert_eq!(exchange(&router, &[change(0)])[0].err, -libc_errno(Errno::PERM));
        assert_eq!(std::fs::metadata(dir.path().join("f")).unwrap().len(), 2, "a blocked part is not done");
        let responses = exchange(&router, &[open(OFlags::WRONLY | OFlags::TRUNC), open(OFlags::WRONLY)]);
        assert_eq!(responses[0].err, -libc_errno(Errno::PERM), "a truncating open meets the truncate rule");
        assert_eq!(responses[1].err, 0, "an open that does not truncate does not");
        assert_eq!(std::fs::metadata(dir.path().join("f")).unwrap().len(), 2);
    }

    #[test]
    fn listings_come_in_pages_and_an_oversized_answer_fails_only_its_request() {
        let dir = tempfile::tempdir().unwrap();
        let long = "n".repeat(200);
        for i in 0..6000 {
            std::fs::write(dir.path().join(format!("{long}{i:05}")), b"").unwrap();
        }
        let router = Router::default();
        router.mount("/w", HostFs::new(dir.path(), false).unwrap()).unwrap();
        let page = |off: i64, sz: u32| Request { off, sz, ..req(Op::Readdir, "/w") };
        let responses =
            exchange(&router, &[page(0, 1024), page(5000, 1024), req(Op::Readdir, "/w"), req(Op::Getattr, "/w")]);
        assert_eq!((responses[0].entries.len(), responses[0].more), (1024, true));
        assert_eq!(responses[0].entries[0].name, format!("{long}00000"));
        assert_eq!((responses[1].entries.len(), responses[1].more), (1000, false));
        assert_eq!(responses[1].entries[999].name, format!("{long}05999"));
        // The whole listing at once is beyond the message bound: that request fails...
        assert_eq!(responses[2].err, -libc_errno(Errno::FBIG));
        // ...and the connection (with its handles) goes on.
        assert!(responses[3].stat.as_ref().unwrap().is_dir);
    }

    #[test]
    fn an_open_tells_the_content_version_only_when_reads_may_be_cached() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, "one\n").unwrap();
        let file = File::open(&path).unwrap();
        let changed = std::fs::metadata(&path).unwrap().modified().unwrap();
        let settled = changed + Duration::from_secs(1);
        // A change within the clock tick of the last one could keep its timestamps.
        assert_eq!(content_version(&file, changed + Duration::from_millis(50)), None);
        let one = content_version(&file, settled).unwrap();
        assert_eq!(content_version(&File::open(&path).unwrap(), settled), Some(one), "unchanged");
        // The same size and modification time set back (`cp -p`, `touch -r`): still a change.
        std::fs::write(&path, "two\n").unwrap();
        File::options().write(true).open(&path).unwrap().set_modified(changed).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().modified().unwrap(), changed);
        let later = SystemTime::now() + Duration::from_secs(1);
        let two = content_version(&File::open(&path).unwrap(), later).unwrap();
        assert_ne!(one, two);
        // Through the server: given without rules or events, never with them.
        let open = Request { flags: OFlags::RDONLY.bits(), ..req(Op::Open, "/w/f") };
        let mut router = Router::default();
        router.mount("/w", HostFs::new(dir.path(), false).unwrap()).unwrap();
        std::thread::sleep(SETTLED_AFTER);
        assert_eq!(exchange(&router, std::slice::from_ref(&open))[0].version, Some(two));
        router.set_rules(&block_rule("no reads", &["read"], "/w/secret*")).unwrap();
        assert_eq!(exchange(&router, std::slice::from_ref(&open))[0].version, Some(two), "a rule elsewhere");
        router.set_rules(&block_rule("no reads", &["read"], "/w/f")).unwrap();
        assert_eq!(exchange(&router, std::slice::from_ref(&open))[0].version, None);
        let mut router = Router::default();
        router.mount("/w", HostFs::new(dir.path(), false).unwrap()).unwrap();
        router.set_event_sink(Box::new(drop));
        assert_eq!(exchange(&router, &[open])[0].version, None);
    }

    /// Rules with one before-phase `block` rule.
    fn block_rule(name: &str, ops: &[&str], path: &str) -> matchlock_api::config::VfsInterception {
        matchlock_api::config::VfsInterception {
            emit_events: false,
            rules: vec![matchlock_api::config::VfsRule {
                name: name.into(),
                ops: ops.iter().map(|op| (*op).to_owned()).collect(),
                path: path.into(),
                action: VfsAction::Block,
                ..Default::default()
            }],
        }
    }

    fn libc_errno(e: Errno) -> i32 {
        e.raw_os_error()
    }
}
