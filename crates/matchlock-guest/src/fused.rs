//! The workspace: a FUSE file system whose every operation is a request to the host's VFS
//! server (host port 5001, [`matchlock_protocol::vfs`]). The kernel speaks inodes; the host
//! speaks absolute guest paths, so this keeps the inode ↔ path table, and moves whole subtrees
//! in it on rename (open files and working directories keep working: git's `HEAD.lock`
//! dance, `pwd -P`).
//!
//! Several FUSE workers serve the kernel at once ([`WORKERS`]), each request on a
//! connection of its own from a small pool, so reads ahead and parallel lookups overlap
//! their round trips; releases are not waited for; lookups in a directory listed a moment
//! ago are answered from [`Listings`]; a file opened again unchanged is read from the page
//! cache ([`Versions`]).

use crate::listings::{Cached, Listings};
use crate::mux::Stream;
use crate::relock;
use std::collections::HashMap;
use std::ffi::OsStr;
use std::path::Path;
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fuser::{
    Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, MountOption, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory,
    ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request as FuseRequest, SessionACL,
    TimeOrNow, WriteFlags,
};
use matchlock_protocol::vfs::{read_message, write_message, write_with_data, Op, Request, Response, Stat, MAX_IO};

use matchlock_protocol::VFS_PORT;

/// How long the kernel may cache attributes and names.
const TTL: Duration = Duration::from_secs(1);
/// FUSE worker threads, and connections to the host's VFS server (it serves up to
/// `MAX_VFS_CONNECTIONS`, 8: the rest is room for reconnects).
const WORKERS: usize = 4;

/// Inodes ↔ absolute guest paths.
struct Inodes {
    paths: HashMap<u64, String>,
    inodes: HashMap<String, u64>,
    next: u64,
}

impl Inodes {
    fn path(&self, ino: INodeNo) -> Result<String, Errno> {
        self.paths.get(&ino.0).cloned().ok_or(Errno::ENOENT)
    }

    fn inode(&mut self, path: &str) -> u64 {
        if let Some(ino) = self.inodes.get(path) {
            return *ino;
        }
        let ino = self.next;
        self.next += 1;
        self.paths.insert(ino, path.to_owned());
        self.inodes.insert(path.to_owned(), ino);
        ino
    }

    /// Moves `from` and everything under it to `to`.
    fn rename(&mut self, from: &str, to: &str) {
        if let Some(old) = self.inodes.remove(to) {
            self.paths.remove(&old);
        }
        let prefix = format!("{from}/");
        let moved: Vec<(String, u64)> = self
            .inodes
            .iter()
            .filter(|(p, _)| *p == from || p.starts_with(&prefix))
            .map(|(p, i)| (p.clone(), *i))
            .collect();
        for (path, ino) in moved {
            let new_path = format!("{to}{}", &path[from.len()..]);
            self.inodes.remove(&path);
            self.inodes.insert(new_path.clone(), ino);
            self.paths.insert(ino, new_path);
        }
    }
}

/// One entry of a directory listing as the kernel gets it.
struct DirItem {
    ino: u64,
    name: String,
    stat: Stat,
}

/// Listings of open directory handles: fetched from the host when a handle reads from the
/// start, then served from here as the kernel asks for the rest page by page.
#[derive(Default)]
struct OpenDirs {
    /// The entries and whether the host called the listing complete.
    open: HashMap<u64, (std::sync::Arc<Vec<DirItem>>, bool)>,
    next: u64,
}

/// Entries asked for per listing request (a message of at most ~0.5 MiB even with
/// 255-byte names); directories larger than one page are not kept for lookups.
const LIST_PAGE: u32 = 1024;
/// Most entries of one directory handed to the kernel.
const MAX_LISTED: usize = 1 << 20;

/// Most directory handles whose listings are kept (beyond it, a listing is fetched for
/// every page the kernel asks for).
const MAX_OPEN_DIRS: usize = 1024;

/// Connections to the host's VFS server: idle ones, and how many exist.
struct Pool {
    idle: Mutex<(Vec<Stream>, usize)>,
    returned: Condvar,
}

impl Pool {
    /// An idle connection, a new one while fewer than [`WORKERS`] exist, else the next
    /// one returned.
    fn take(&self) -> Result<Stream, Errno> {
        let mut idle = relock(&self.idle);
        loop {
            if let Some(conn) = idle.0.pop() {
                return Ok(conn);
            }
            if idle.1 < WORKERS {
                idle.1 += 1;
                drop(idle);
                return crate::mux::connect(VFS_PORT).map_err(|_| {
                    relock(&self.idle).1 -= 1;
                    self.returned.notify_one();
                    Errno::EIO
                });
            }
            idle = self.returned.wait(idle).unwrap_or_else(PoisonError::into_inner);
        }
    }

    fn give_back(&self, conn: Option<Stream>) {
        let mut idle = relock(&self.idle);
        match conn {
            Some(conn) => idle.0.push(conn),
            None => idle.1 -= 1,
        }
        drop(idle);
        self.returned.notify_one();
    }
}

/// Most inodes whose content versions are kept (beyond it they are all forgotten: a cache
/// miss at their next open, never a stale read).
const MAX_VERSIONS: usize = 1 << 14;

/// The content version ([`Response::version`]) each inode had at its last open. An open
/// finding the same one keeps the kernel's cached pages of the file; any other open has the
/// kernel drop them, so a file changed on the host is read afresh from its next open on
/// (close-to-open coherence, as before caching across opens).
#[derive(Default)]
struct Versions(HashMap<u64, u64>);

impl Versions {
    /// Records the version an open of `ino` got, and tells whether its last open got the
    /// same one.
    fn opened(&mut self, ino: u64, version: Option<u64>) -> bool {
        let Some(version) = version else {
            self.0.remove(&ino);
            return false;
        };
        if self.0.len() >= MAX_VERSIONS && !self.0.contains_key(&ino) {
            self.0.clear();
        }
        self.0.insert(ino, version) == Some(version)
    }
}

/// The workspace file system.
pub(crate) struct Workspace {
    pool: Pool,
    inodes: Mutex<Inodes>,
    listings: Mutex<Listings>,
    dirs: Mutex<OpenDirs>,
    versions: Mutex<Versions>,
}

fn join(parent: &str, name: &OsStr) -> Result<String, Errno> {
    let name = name.to_str().ok_or(Errno::EINVAL)?;
    if name.is_empty() || name.contains('/') || name == "." || name == ".." {
        return Err(Errno::EINVAL);
    }
    Ok(if parent == "/" { format!("/{name}") } else { format!("{parent}/{name}") })
}

fn attr(ino: u64, stat: &Stat, req: &FuseRequest) -> FileAttr {
    let kind = match stat.mode & 0o170_000 {
        0o120_000 => FileType::Symlink,
        _ if stat.is_dir => FileType::Directory,
        _ => FileType::RegularFile,
    };
    let mtime = UNIX_EPOCH + Duration::new(u64::try_from(stat.mtime).unwrap_or(0), stat.mtime_nsec.min(999_999_999));
    FileAttr {
        ino: INodeNo(ino),
        size: stat.size,
        blocks: stat.size.div_ceil(512),
        atime: mtime,
        mtime,
        ctime: mtime,
        crtime: mtime,
        kind,
        perm: u16::try_from(stat.mode & 0o7777).unwrap_or(0o644),
        nlink: if stat.is_dir { 2 } else { 1 },
        // The host owns the files; in the guest they belong to whoever looks at them.
        uid: req.uid(),
        gid: req.gid(),
        rdev: 0,
        blksize: 128 * 1024,
        flags: 0,
    }
}

/// A FUSE time as nanoseconds since the epoch (`Now` is the guest's clock, which
/// guest-init set from the host's).
fn epoch_ns(time: TimeOrNow) -> i64 {
    let at = match time {
        TimeOrNow::SpecificTime(t) => t,
        TimeOrNow::Now => SystemTime::now(),
    };
    match at.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_nanos()).unwrap_or(i64::MAX),
        Err(before) => -i64::try_from(before.duration().as_nanos()).unwrap_or(i64::MAX),
    }
}

fn kind_of(mode: u32, is_dir: bool) -> FileType {
    match mode & 0o170_000 {
        0o120_000 => FileType::Symlink,
        _ if is_dir => FileType::Directory,
        _ => FileType::RegularFile,
    }
}

impl Workspace {
    /// Connects to the host's VFS server.
    pub(crate) fn connect(root: &str) -> std::io::Result<Self> {
        let mut last = None;
        for _ in 0..30 {
            match crate::mux::connect(VFS_PORT) {
                Ok(conn) => {
                    let mut inodes = Inodes { paths: HashMap::new(), inodes: HashMap::new(), next: 2 };
                    inodes.paths.insert(1, root.to_owned());
                    inodes.inodes.insert(root.to_owned(), 1);
                    let pool = Pool { idle: Mutex::new((vec![conn], 1)), returned: Condvar::new() };
                    return Ok(Self {
                        pool,
                        inodes: Mutex::new(inodes),
                        listings: Mutex::new(Listings::default()),
                        dirs: Mutex::new(OpenDirs::default()),
                        versions: Mutex::new(Versions::default()),
                    });
                }
                Err(e) => last = Some(e),
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(last.unwrap_or_else(|| std::io::ErrorKind::NotConnected.into()))
    }

    /// One request and its response, on a connection of the pool. A broken connection
    /// (the host of a VM restored from a snapshot is a new process) is re-opened once:
    /// requests name paths, not handles, so the new server answers them the same.
    fn call(&self, request: &Request) -> Result<Response, Errno> {
        self.call_with_data(request, &request.data)
    }

    /// [`Self::call`] with `data` as the request's data (not copied into it first).
    fn call_with_data(&self, request: &Request, data: &[u8]) -> Result<Response, Errno> {
        let mut conn = self.pool.take()?;
        let exchange = |conn: &mut Stream| -> Option<Response> {
            write_with_data(&mut *conn, request, data).ok()?;
            read_message(&mut *conn).ok()?
        };
        let response = match exchange(&mut conn) {
            Some(response) => Some(response),
            None => match crate::mux::connect(VFS_PORT) {
                Ok(new) => {
                    conn = new;
                    exchange(&mut conn)
                }
                Err(_) => None,
            },
        };
        let Some(response) = response else {
            self.pool.give_back(None);
            return Err(Errno::EIO);
        };
        self.pool.give_back(Some(conn));
        if response.err < 0 {
            return Err(Errno::from_i32(-response.err));
        }
        Ok(response)
    }

    /// Sends a request the host does not answer (a release).
    fn send_quiet(&self, request: Request) {
        let Ok(mut conn) = self.pool.take() else { return };
        let sent = write_message(&mut conn, &Request { quiet: true, ..request }).is_ok();
        self.pool.give_back(sent.then_some(conn));
    }

    /// The listing of directory `ino` open as `fh` (`.` and `..` first) and whether the
    /// host called it complete: from the host when reading from the start, else what this
    /// handle fetched then.
    fn dir_entries(
        &self,
        req: &FuseRequest,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
    ) -> Result<(std::sync::Arc<Vec<DirItem>>, bool), Errno> {
        if offset > 0 {
            if let Some((entries, complete)) = relock(&self.dirs).open.get(&fh.0) {
                return Ok((std::sync::Arc::clone(entries), *complete));
            }
        }
        let path = self.path(ino)?;
        let (now, generation) = (Instant::now(), self.listings().generation());
        // Page by page: a message holds at most ~1 MiB, a directory may hold far more.
        let mut response = self.call(&Request { sz: LIST_PAGE, ..self.op(Op::Readdir, &path, req) })?;
        while response.more && response.entries.len() < MAX_LISTED {
            let off = i64::try_from(response.entries.len()).unwrap_or(i64::MAX);
            let page = self.call(&Request { off, sz: LIST_PAGE, ..self.op(Op::Readdir, &path, req) })?;
            response.entries.extend(page.entries);
            (response.more, response.complete) = (page.more, response.complete && page.complete);
        }
        if response.complete && response.entries.len() <= LIST_PAGE as usize {
            self.listings().install(&path, generation, &response.entries, now);
        }
        // `.` and `..`: the kernel takes only their names and types.
        let dir = Stat { mode: 0o040_755, is_dir: true, ..Stat::default() };
        let mut entries = vec![
            DirItem { ino: ino.0, name: ".".to_owned(), stat: dir.clone() },
            DirItem { ino: 1, name: "..".to_owned(), stat: dir },
        ];
        {
            let mut inodes = relock(&self.inodes);
            for e in response.entries {
                let Ok(child) = join(&path, OsStr::new(&e.name)) else { continue };
                entries.push(DirItem { ino: inodes.inode(&child), stat: e.stat(), name: e.name });
            }
        }
        let entries = std::sync::Arc::new(entries);
        let mut dirs = relock(&self.dirs);
        if dirs.open.len() < MAX_OPEN_DIRS || dirs.open.contains_key(&fh.0) {
            dirs.open.insert(fh.0, (std::sync::Arc::clone(&entries), response.complete));
        }
        Ok((entries, response.complete))
    }

    fn listings(&self) -> MutexGuard<'_, Listings> {
        relock(&self.listings)
    }

    /// Looks `name` up in `dir`: from a fresh listing if there is one, else (listing the
    /// directory first when that is worth it) from the host.
    fn lookup_in(&self, dir: &str, path: &str, name: &str, req: &FuseRequest) -> Result<Stat, Errno> {
        let now = Instant::now();
        let (cached, worth, generation) = {
            let mut listings = self.listings();
            let cached = listings.lookup(dir, name, now);
            let worth = cached == Cached::Unknown && listings.worth_listing(dir, now);
            (cached, worth, listings.generation())
        };
        let cached = match (cached, worth) {
            (Cached::Unknown, true) => match self.call(&Request { sz: LIST_PAGE, ..self.op(Op::List, dir, req) }) {
                Ok(response) if response.complete && !response.more => {
                    let mut listings = self.listings();
                    listings.install(dir, generation, &response.entries, now);
                    listings.lookup(dir, name, now)
                }
                // Too large to keep: names there are looked up one by one for a while.
                Ok(response) if response.more => {
                    self.listings().too_large(dir, now);
                    Cached::Unknown
                }
                _ => Cached::Unknown,
            },
            (cached, _) => cached,
        };
        match cached {
            Cached::Found(stat) => Ok(stat),
            Cached::Missing => Err(Errno::ENOENT),
            Cached::Unknown => self.stat(path, req),
        }
    }

    fn op(&self, op: Op, path: &str, req: &FuseRequest) -> Request {
        Request { op: op as u8, path: path.to_owned(), uid: req.uid(), gid: req.gid(), ..Request::default() }
    }

    fn path(&self, ino: INodeNo) -> Result<String, Errno> {
        relock(&self.inodes).path(ino)
    }

    fn entry_of(&self, path: &str, stat: &Stat, req: &FuseRequest) -> FileAttr {
        let ino = relock(&self.inodes).inode(path);
        attr(ino, stat, req)
    }

    fn stat(&self, path: &str, req: &FuseRequest) -> Result<Stat, Errno> {
        self.call(&self.op(Op::Getattr, path, req))?.stat.ok_or(Errno::EIO)
    }

    fn new_entry(&self, path: &str, req: &FuseRequest, reply: ReplyEntry) {
        match self.stat(path, req) {
            Ok(stat) => reply.entry(&TTL, &self.entry_of(path, &stat, req), Generation(0)),
            Err(e) => reply.error(e),
        }
    }
}

macro_rules! tri {
    ($reply:ident, $e:expr) => {
        match $e {
            Ok(v) => v,
            Err(e) => return $reply.error(e),
        }
    };
}

impl Filesystem for Workspace {
    fn init(&mut self, _req: &FuseRequest, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_write(MAX_IO);
        let _ = config.set_max_readahead(MAX_IO);
        // An open with O_TRUNC reaches the host as one request (it truncates, with the
        // truncate rules, event and budget) instead of an open and then a setattr.
        let _ = config.add_capabilities(InitFlags::FUSE_ATOMIC_O_TRUNC);
        // Listings carry every entry's attributes: the kernel takes them with the names
        // (as if each were looked up) when a directory is read and then stat'ed — unless a
        // VFS rule is in force (rules are fixed when the sandbox starts, and the host then
        // never calls a listing complete): every lookup must meet the rules.
        let root = relock(&self.inodes).path(INodeNo(1)).unwrap_or_default();
        let probe = Request { op: Op::List as u8, path: root, ..Request::default() };
        if self.call(&probe).is_ok_and(|listing| listing.complete) {
            let _ = config.add_capabilities(InitFlags::FUSE_DO_READDIRPLUS | InitFlags::FUSE_READDIRPLUS_AUTO);
        }
        Ok(())
    }

    fn lookup(&self, req: &FuseRequest, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let dir = tri!(reply, self.path(parent));
        let path = tri!(reply, join(&dir, name));
        let name = &path[path.len() - name.len()..];
        match self.lookup_in(&dir, &path, name, req) {
            Ok(stat) => reply.entry(&TTL, &self.entry_of(&path, &stat, req), Generation(0)),
            // A negative entry (inode 0): the kernel remembers the name is missing for the
            // TTL, as it remembers names that exist.
            Err(e) if i32::from(e) == libc::ENOENT => reply.entry(&TTL, &attr(0, &Stat::default(), req), Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, req: &FuseRequest, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let path = tri!(reply, self.path(ino));
        // A fresh listing knows the attributes as a lookup would (the kernel asks again
        // after every write, and extracting a file made two such round trips). Its lock is
        // let go before any round trip to the host.
        let known = self.listings().known(&path, Instant::now());
        let stat = match known {
            Some(stat) => stat,
            None => tri!(reply, self.stat(&path, req)),
        };
        reply.attr(&TTL, &attr(ino.0, &stat, req));
    }

    fn setattr(
        &self,
        req: &FuseRequest,
        ino: INodeNo,
        mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let path = tri!(reply, self.path(ino));
        let (atime_ns, mtime_ns) = (atime.map(epoch_ns), mtime.map(epoch_ns));
        // uid/gid changes are not applied: the host owns the files (see `attr`).
        let change = mode.is_some() || size.is_some() || atime_ns.is_some() || mtime_ns.is_some();
        let request = if change {
            self.listings().changed(&path, None);
            Request { new_mode: mode, new_size: size, atime_ns, mtime_ns, ..self.op(Op::Change, &path, req) }
        } else if let Some(stat) = self.listings().known(&path, Instant::now()) {
            // Nothing the host applies (a chown): the attributes are what a fresh listing says.
            return reply.attr(&TTL, &attr(ino.0, &stat, req));
        } else {
            self.op(Op::Getattr, &path, req)
        };
        let response = tri!(reply, self.call(&request));
        let stat = tri!(reply, response.stat.ok_or(Errno::EIO));
        if change {
            self.listings().changed(&path, Some(&stat));
        }
        reply.attr(&TTL, &attr(ino.0, &stat, req));
    }

    fn statfs(&self, req: &FuseRequest, ino: INodeNo, reply: ReplyStatfs) {
        let path = tri!(reply, self.path(ino));
        let response = tri!(reply, self.call(&self.op(Op::Statfs, &path, req)));
        let st = response.statfs.unwrap_or_default();
        reply.statfs(st.blocks, st.bfree, st.bavail, st.files, st.ffree, st.bsize, st.namelen, st.frsize);
    }

    fn readlink(&self, req: &FuseRequest, ino: INodeNo, reply: ReplyData) {
        let path = tri!(reply, self.path(ino));
        let response = tri!(reply, self.call(&self.op(Op::Readlink, &path, req)));
        reply.data(&response.data);
    }

    fn mkdir(&self, req: &FuseRequest, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, reply: ReplyEntry) {
        let path = tri!(reply, self.path(parent).and_then(|p| join(&p, name)));
        let made = tri!(reply, self.call(&Request { mode: mode & !umask, ..self.op(Op::Mkdir, &path, req) }));
        let stat = tri!(reply, made.stat.ok_or(Errno::EIO));
        self.listings().created(&path, Some(stat.clone()), Instant::now());
        reply.entry(&TTL, &self.entry_of(&path, &stat, req), Generation(0));
    }

    fn unlink(&self, req: &FuseRequest, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let path = tri!(reply, self.path(parent).and_then(|p| join(&p, name)));
        tri!(reply, self.call(&self.op(Op::Unlink, &path, req)));
        self.listings().removed(&path);
        reply.ok();
    }

    fn rmdir(&self, req: &FuseRequest, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let path = tri!(reply, self.path(parent).and_then(|p| join(&p, name)));
        tri!(reply, self.call(&self.op(Op::Rmdir, &path, req)));
        self.listings().removed(&path);
        reply.ok();
    }

    fn symlink(&self, req: &FuseRequest, parent: INodeNo, link_name: &OsStr, target: &Path, reply: ReplyEntry) {
        let path = tri!(reply, self.path(parent).and_then(|p| join(&p, link_name)));
        let target = tri!(reply, target.to_str().ok_or(Errno::EINVAL));
        tri!(reply, self.call(&Request { new_path: target.to_owned(), ..self.op(Op::Symlink, &path, req) }));
        self.listings().created(&path, None, Instant::now());
        self.new_entry(&path, req, reply);
    }

    fn rename(
        &self,
        req: &FuseRequest,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        if !flags.is_empty() {
            return reply.error(Errno::EINVAL);
        }
        let from = tri!(reply, self.path(parent).and_then(|p| join(&p, name)));
        let to = tri!(reply, self.path(newparent).and_then(|p| join(&p, newname)));
        tri!(reply, self.call(&Request { new_path: to.clone(), ..self.op(Op::Rename, &from, req) }));
        self.listings().renamed(&from, &to);
        relock(&self.inodes).rename(&from, &to);
        reply.ok();
    }

    fn link(&self, req: &FuseRequest, ino: INodeNo, newparent: INodeNo, newname: &OsStr, reply: ReplyEntry) {
        let from = tri!(reply, self.path(ino));
        let to = tri!(reply, self.path(newparent).and_then(|p| join(&p, newname)));
        tri!(reply, self.call(&Request { new_path: to.clone(), ..self.op(Op::Link, &from, req) }));
        // Both names now count one more link.
        self.listings().changed(&from, None);
        self.listings().created(&to, None, Instant::now());
        self.new_entry(&to, req, reply);
    }

    fn open(&self, req: &FuseRequest, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let path = tri!(reply, self.path(ino));
        let flags = u32::try_from(flags.0).unwrap_or(0);
        let truncates = flags & libc::O_TRUNC as u32 != 0;
        if truncates {
            self.listings().changed(&path, None);
        }
        let response = tri!(reply, self.call(&Request { flags, ..self.op(Op::Open, &path, req) }));
        if truncates {
            self.listings().changed(&path, response.stat.as_ref());
        }
        let unchanged = relock(&self.versions).opened(ino.0, response.version);
        let flags = if unchanged { FopenFlags::FOPEN_KEEP_CACHE } else { FopenFlags::empty() };
        reply.opened(FileHandle(response.fh), flags);
    }

    fn read(
        &self,
        req: &FuseRequest,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let off = tri!(reply, i64::try_from(offset).map_err(|_| Errno::EINVAL));
        let response = tri!(reply, self.call(&Request { fh: fh.0, off, sz: size, ..self.op(Op::Read, "", req) }));
        reply.data(&response.data);
    }

    fn write(
        &self,
        req: &FuseRequest,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let path = self.path(ino);
        let off = tri!(reply, i64::try_from(offset).map_err(|_| Errno::EINVAL));
        let request = Request { fh: fh.0, off, ..self.op(Op::Write, "", req) };
        let response = self.call_with_data(&request, data);
        if let Ok(path) = path {
            match response.as_ref().ok().and_then(|r| r.stat.as_ref()) {
                Some(after) => self.listings().wrote(&path, after),
                None => self.listings().changed(&path, None),
            }
        }
        let written = tri!(reply, response).written;
        reply.written(written);
    }

    fn release(
        &self,
        req: &FuseRequest,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        // Nothing to wait for: the guest's close has nothing to learn from the host.
        self.send_quiet(Request { fh: fh.0, ..self.op(Op::Release, "", req) });
        reply.ok();
    }

    fn fsync(&self, req: &FuseRequest, _ino: INodeNo, fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        tri!(reply, self.call(&Request { fh: fh.0, ..self.op(Op::Fsync, "", req) }));
        reply.ok();
    }

    fn opendir(&self, _req: &FuseRequest, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let mut dirs = relock(&self.dirs);
        dirs.next += 1;
        reply.opened(FileHandle(dirs.next), FopenFlags::empty());
    }

    fn releasedir(&self, _req: &FuseRequest, _ino: INodeNo, fh: FileHandle, _flags: OpenFlags, reply: ReplyEmpty) {
        relock(&self.dirs).open.remove(&fh.0);
        reply.ok();
    }

    fn readdir(&self, req: &FuseRequest, ino: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let (entries, _) = tri!(reply, self.dir_entries(req, ino, fh, offset));
        for (i, entry) in entries.iter().enumerate().skip(usize::try_from(offset).unwrap_or(usize::MAX)) {
            let kind = kind_of(entry.stat.mode, entry.stat.is_dir);
            if reply.add(INodeNo(entry.ino), (i + 1) as u64, kind, &entry.name) {
                break;
            }
        }
        reply.ok();
    }

    fn readdirplus(&self, req: &FuseRequest, ino: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectoryPlus) {
        let (entries, complete) = tri!(reply, self.dir_entries(req, ino, fh, offset));
        if !complete {
            // Only enabled without rules (see `init`); attributes never go past a rule.
            return reply.error(Errno::EIO);
        }
        for (i, entry) in entries.iter().enumerate().skip(usize::try_from(offset).unwrap_or(usize::MAX)) {
            let attr = attr(entry.ino, &entry.stat, req);
            if reply.add(INodeNo(entry.ino), (i + 1) as u64, &entry.name, &TTL, &attr, Generation(0)) {
                break;
            }
        }
        reply.ok();
    }

    fn create(
        &self,
        req: &FuseRequest,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let path = tri!(reply, self.path(parent).and_then(|p| join(&p, name)));
        let flags = u32::try_from(flags).unwrap_or(0);
        let request = Request { flags, mode: mode & !umask, ..self.op(Op::Create, &path, req) };
        let response = tri!(reply, self.call(&request));
        let stat = tri!(reply, response.stat.ok_or(Errno::EIO));
        self.listings().created(&path, Some(stat.clone()), Instant::now());
        reply.created(
            &TTL,
            &self.entry_of(&path, &stat, req),
            Generation(0),
            FileHandle(response.fh),
            FopenFlags::empty(),
        );
    }
}

/// Where the workspace is mounted, once it is (at most once per VM).
static MOUNTED: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Where the workspace is mounted, if it is.
pub(crate) fn mounted() -> Option<&'static str> {
    MOUNTED.get().map(String::as_str)
}

/// Mounts the workspace at `mountpoint` and serves it on a background thread for the life
/// of the VM.
pub(crate) fn mount(mountpoint: &str) -> std::io::Result<()> {
    if let Some(there) = mounted() {
        return Err(std::io::Error::other(format!("the workspace is already mounted at {there}")));
    }
    std::fs::create_dir_all(mountpoint)?;
    let fs = Workspace::connect(mountpoint)?;
    let mut config = Config::default();
    config.mount_options = vec![MountOption::FSName("matchlock".into()), MountOption::Subtype("matchlock".into())];
    config.acl = SessionACL::All;
    config.n_threads = Some(WORKERS);
    config.clone_fd = true;
    let session = fuser::spawn_mount2(fs, mountpoint, &config)?;
    // The session lives as long as the VM: PID 1 never unmounts it.
    std::mem::forget(session);
    let _ = MOUNTED.set(mountpoint.to_owned());
    raise_readahead(mountpoint);
    Ok(())
}

/// Sequential reads through FUSE go at the pace of the readahead window (128 KiB by
/// default); each request is a round trip to the host, so a window as large as one
/// request may carry ([`MAX_IO`]) makes large reads ~1.5x faster. Best effort.
fn raise_readahead(mountpoint: &str) {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(mountpoint) else { return };
    let dev = meta.dev();
    let bdi = format!("/sys/class/bdi/{}:{}/read_ahead_kb", nix::sys::stat::major(dev), nix::sys::stat::minor(dev));
    if let Err(e) = std::fs::write(&bdi, (MAX_IO / 1024).to_string()) {
        eprintln!("guest-init: cannot raise the workspace readahead ({bdi}): {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_open_of_the_same_version_keeps_the_cache() {
        let mut versions = Versions::default();
        assert!(!versions.opened(5, Some(1)), "a first open has nothing to keep");
        assert!(versions.opened(5, Some(1)));
        assert!(!versions.opened(5, Some(2)), "changed since");
        assert!(versions.opened(5, Some(2)));
        assert!(!versions.opened(6, Some(2)), "versions are per inode");
        // An open without a version (a change just now) forgets the last one.
        assert!(!versions.opened(5, None));
        assert!(!versions.opened(5, Some(2)));
        // Beyond the bound everything is forgotten: misses, never stale hits.
        for ino in 0..MAX_VERSIONS as u64 {
            versions.opened(100 + ino, Some(ino));
        }
        assert!(versions.0.len() <= MAX_VERSIONS);
        assert!(!versions.opened(100, Some(0)));
    }
}
