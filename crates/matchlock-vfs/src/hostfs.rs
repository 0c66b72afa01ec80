//! A host directory served to the guest, confined to it.
//!
//! Every access starts from the root directory's descriptor and resolves with `openat2`
//! `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`: `..` and every symlink fail in the kernel, at use
//! time, so swapping a symlink in between a check and a use gains nothing. The host never
//! follows a symlink for the guest: the guest's kernel resolves symlinks itself (reading
//! them and looking up what they name), so a path from the guest names each directory by
//! its own name, and the mount router's longest prefix picks the mount that owns the file.
//! Following a symlink on the host would let a forged request reach, through an outer
//! mount, a file a nested read-only mount serves. Operations on a final component work on a
//! descriptor of its parent (opened the same way) and never follow a symlink there. Modes lose setuid/setgid bits; only
//! regular files and directories can be opened (no device nodes, no FIFOs).

use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;

use rustix::fs::{self as rfs, AtFlags, FileType, Mode, OFlags, ResolveFlags};
use rustix::io::Errno;

use matchlock_protocol::vfs::{DirEntry, FsStats, Stat};

use crate::Provider;

/// Permission bits a guest may set (no setuid, setgid).
const ALLOWED_MODE: u32 = 0o1777;

fn resolve() -> ResolveFlags {
    ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS
}

/// A stable inode number from `bytes`: FNV-1a 64, never 0 or 1 (reserved by FUSE). Also
/// the hash behind an open's content version.
pub fn inode_hash(bytes: impl IntoIterator<Item = u8>) -> u64 {
    let hash =
        bytes.into_iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3));
    if hash < 2 {
        hash + 2
    } else {
        hash
    }
}

/// Inode numbers the guest sees for host files: [`inode_hash`] of (dev, ino).
pub fn inode_number(dev: u64, ino: u64) -> u64 {
    inode_hash(dev.to_le_bytes().into_iter().chain(ino.to_le_bytes()))
}

/// `rel` as a path `openat2` accepts for the root itself.
fn dot(rel: &str) -> &str {
    if rel.is_empty() {
        "."
    } else {
        rel
    }
}

fn to_stat(st: &rfs::Stat) -> Stat {
    let kind = FileType::from_raw_mode(st.st_mode);
    Stat {
        size: u64::try_from(st.st_size).unwrap_or(0),
        mode: st.st_mode,
        mtime: st.st_mtime,
        mtime_nsec: u32::try_from(st.st_mtime_nsec).unwrap_or(0),
        is_dir: kind == FileType::Directory,
        ino: Some(inode_number(st.st_dev, st.st_ino)),
        nlink: Some(st.st_nlink),
    }
}

/// A provider over a host directory.
#[derive(Debug)]
pub struct HostFs {
    root: OwnedFd,
    read_only: bool,
}

impl HostFs {
    /// Serves `root` (a directory), read-only or not.
    pub fn new(root: &Path, read_only: bool) -> Result<Self, Errno> {
        let root = rfs::open(root, OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())?;
        Ok(Self { root, read_only })
    }

    /// A descriptor of `rel` itself (never a symlink's target) for changing its metadata;
    /// fails on a read-only mount.
    fn node_for_metadata(&self, rel: &str) -> Result<OwnedFd, Errno> {
        self.writable()?;
        rfs::openat2(
            &self.root,
            dot(rel),
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK,
            Mode::empty(),
            resolve(),
        )
    }

    fn writable(&self) -> Result<(), Errno> {
        if self.read_only {
            Err(Errno::ROFS)
        } else {
            Ok(())
        }
    }

    /// `rel` split into a descriptor of its parent and its last component.
    fn parent(&self, rel: &str) -> Result<(OwnedFd, String), Errno> {
        let (dir, name) = match rel.rsplit_once('/') {
            Some((dir, name)) => (dir, name),
            None => ("", rel),
        };
        if name.is_empty() {
            return Err(Errno::INVAL);
        }
        let dir = if dir.is_empty() { "." } else { dir };
        let fd = rfs::openat2(
            &self.root,
            dir,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
            resolve(),
        )?;
        Ok((fd, name.to_owned()))
    }

    /// An `O_PATH` descriptor of `rel` itself (a final symlink is the link).
    fn path_fd(&self, rel: &str) -> Result<OwnedFd, Errno> {
        rfs::openat2(&self.root, dot(rel), OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC, Mode::empty(), resolve())
    }
}

impl Provider for HostFs {
    /// Attributes of the path itself (no symlink is followed: the guest resolves them).
    fn stat(&self, rel: &str) -> Result<Stat, Errno> {
        Ok(to_stat(&rfs::fstat(self.path_fd(rel)?)?))
    }

    /// Attributes of the path itself (a symlink is not followed).
    fn lstat(&self, rel: &str) -> Result<Stat, Errno> {
        if rel.is_empty() {
            return self.stat(rel);
        }
        let (dir, name) = self.parent(rel)?;
        Ok(to_stat(&rfs::statat(&dir, name.as_str(), AtFlags::SYMLINK_NOFOLLOW)?))
    }

    /// Opens (with `O_CREAT`, creates) a regular file or directory.
    fn open(&self, rel: &str, flags: OFlags, mode: u32) -> Result<File, Errno> {
        let writes = flags.intersects(OFlags::WRONLY | OFlags::RDWR | OFlags::CREATE | OFlags::TRUNC | OFlags::APPEND);
        if writes {
            self.writable()?;
        }
        let keep = OFlags::RDONLY
            | OFlags::WRONLY
            | OFlags::RDWR
            | OFlags::CREATE
            | OFlags::EXCL
            | OFlags::TRUNC
            | OFlags::APPEND
            | OFlags::DIRECTORY;
        let flags = (flags & keep) | OFlags::CLOEXEC | OFlags::NONBLOCK | OFlags::NOCTTY;
        let fd = rfs::openat2(&self.root, dot(rel), flags, Mode::from_raw_mode(mode & 0o777), resolve())?;
        let kind = FileType::from_raw_mode(rfs::fstat(&fd)?.st_mode);
        if kind != FileType::RegularFile && kind != FileType::Directory {
            return Err(Errno::ACCESS);
        }
        rfs::fcntl_setfl(&fd, rfs::fcntl_getfl(&fd)? - OFlags::NONBLOCK)?;
        Ok(File::from(fd))
    }

    /// Makes a directory.
    fn mkdir(&self, rel: &str, mode: u32) -> Result<(), Errno> {
        self.writable()?;
        let (dir, name) = self.parent(rel)?;
        rfs::mkdirat(&dir, name.as_str(), Mode::from_raw_mode(mode & 0o777))
    }

    /// Removes a file (or, with `dir`, an empty directory).
    fn remove(&self, rel: &str, dir: bool) -> Result<(), Errno> {
        self.writable()?;
        let (parent, name) = self.parent(rel)?;
        rfs::unlinkat(&parent, name.as_str(), if dir { AtFlags::REMOVEDIR } else { AtFlags::empty() })
    }

    /// Renames, replacing the target.
    fn rename(&self, from: &str, to: &str) -> Result<(), Errno> {
        self.writable()?;
        let (from_dir, from_name) = self.parent(from)?;
        let (to_dir, to_name) = self.parent(to)?;
        rfs::renameat(&from_dir, from_name.as_str(), &to_dir, to_name.as_str())
    }

    /// Lists a directory.
    fn readdir(&self, rel: &str) -> Result<Vec<DirEntry>, Errno> {
        let fd = rfs::openat2(
            &self.root,
            dot(rel),
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
            resolve(),
        )?;
        let mut entries = Vec::new();
        for entry in rfs::Dir::read_from(&fd)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name == "." || name == ".." {
                continue;
            }
            let Ok(st) = rfs::statat(&fd, entry.file_name(), AtFlags::SYMLINK_NOFOLLOW) else { continue };
            entries.push(DirEntry::new(name, &to_stat(&st)));
        }
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(entries)
    }

    /// Changes permission bits (never setuid/setgid).
    fn chmod(&self, rel: &str, mode: u32) -> Result<(), Errno> {
        rfs::fchmod(self.node_for_metadata(rel)?, Mode::from_raw_mode(mode & ALLOWED_MODE))
    }

    fn set_times(&self, rel: &str, atime_ns: Option<i64>, mtime_ns: Option<i64>) -> Result<(), Errno> {
        let fd = self.node_for_metadata(rel)?;
        let time = |ns: Option<i64>| match ns {
            Some(ns) => rfs::Timespec { tv_sec: ns.div_euclid(1_000_000_000), tv_nsec: ns.rem_euclid(1_000_000_000) },
            None => rfs::Timespec { tv_sec: 0, tv_nsec: rfs::UTIME_OMIT },
        };
        rfs::futimens(&fd, &rfs::Timestamps { last_access: time(atime_ns), last_modification: time(mtime_ns) })
    }

    fn statfs(&self) -> Result<FsStats, Errno> {
        let st = rfs::fstatvfs(&self.root)?;
        let small = |v: u64| u32::try_from(v).unwrap_or(u32::MAX);
        Ok(FsStats {
            blocks: st.f_blocks,
            bfree: st.f_bfree,
            bavail: st.f_bavail,
            files: st.f_files,
            ffree: st.f_ffree,
            bsize: small(st.f_bsize),
            namelen: small(st.f_namemax),
            frsize: small(st.f_frsize),
        })
    }

    /// Sets a regular file's size.
    fn truncate(&self, rel: &str, size: u64) -> Result<(), Errno> {
        let file = self.open(rel, OFlags::WRONLY, 0)?;
        rfs::ftruncate(file.as_fd(), size)
    }

    /// Creates a symlink at `rel` with `target` as its contents.
    fn symlink(&self, target: &str, rel: &str) -> Result<(), Errno> {
        self.writable()?;
        let (dir, name) = self.parent(rel)?;
        rfs::symlinkat(target, &dir, name.as_str())
    }

    /// A symlink's contents.
    fn readlink(&self, rel: &str) -> Result<String, Errno> {
        let (dir, name) = self.parent(rel)?;
        Ok(rfs::readlinkat(&dir, name.as_str(), Vec::new())?.to_string_lossy().into_owned())
    }

    /// Hard-links `from` (inside the root) to `to`.
    fn link(&self, from: &str, to: &str) -> Result<(), Errno> {
        self.writable()?;
        let (from_dir, from_name) = self.parent(from)?;
        let (to_dir, to_name) = self.parent(to)?;
        rfs::linkat(&from_dir, from_name.as_str(), &to_dir, to_name.as_str(), AtFlags::empty())
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn setup() -> (tempfile::TempDir, HostFs) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("root")).unwrap();
        std::fs::write(dir.path().join("secret.txt"), "outside").unwrap();
        std::fs::write(dir.path().join("root/inside.txt"), "inside").unwrap();
        let fs = HostFs::new(&dir.path().join("root"), false).unwrap();
        (dir, fs)
    }

    #[test]
    fn reads_writes_and_renames_inside() {
        let (dir, fs) = setup();
        let mut f = fs.open("new.txt", OFlags::CREATE | OFlags::WRONLY, 0o6755).unwrap();
        f.write_all(b"hello").unwrap();
        drop(f);
        let mode = std::fs::metadata(dir.path().join("root/new.txt")).unwrap().permissions().mode();
        assert_eq!(mode & 0o7777, 0o755, "setuid/setgid are never created");
        fs.mkdir("d", 0o755).unwrap();
        fs.rename("new.txt", "d/moved.txt").unwrap();
        let mut s = String::new();
        fs.open("d/moved.txt", OFlags::RDONLY, 0).unwrap().read_to_string(&mut s).unwrap();
        assert_eq!(s, "hello");
        let names: Vec<String> = fs.readdir("").unwrap().into_iter().map(|e| e.name).collect();
        assert_eq!(names, ["d", "inside.txt"]);
        fs.truncate("d/moved.txt", 2).unwrap();
        assert_eq!(fs.stat("d/moved.txt").unwrap().size, 2);
        fs.chmod("d/moved.txt", 0o4777).unwrap();
        assert_eq!(fs.stat("d/moved.txt").unwrap().mode & 0o7777, 0o777);
        fs.link("d/moved.txt", "hard").unwrap();
        fs.remove("d/moved.txt", false).unwrap();
        fs.remove("d", true).unwrap();
        assert_eq!(fs.stat("hard").unwrap().size, 2);
    }

    #[test]
    fn nothing_outside_the_root_is_reachable() {
        let (dir, fs) = setup();
        let outside = dir.path().join("secret.txt");
        std::os::unix::fs::symlink(&outside, dir.path().join("root/abs")).unwrap();
        std::os::unix::fs::symlink("../secret.txt", dir.path().join("root/rel")).unwrap();
        std::os::unix::fs::symlink("..", dir.path().join("root/up")).unwrap();
        for path in ["../secret.txt", "abs", "rel", "up/secret.txt", "up"] {
            assert!(fs.open(path, OFlags::RDONLY, 0).is_err(), "{path} opened");
            assert!(fs.open(path, OFlags::WRONLY | OFlags::TRUNC, 0).is_err(), "{path} opened for writing");
        }
        // A symlink's own attributes are the link's, never what it names.
        for path in ["abs", "rel", "up"] {
            assert_eq!(fs.stat(path).unwrap().mode & 0o170000, 0o120000, "{path}");
        }
        for path in ["../secret.txt", "up/secret.txt", "up/root"] {
            assert!(fs.stat(path).is_err(), "{path} stat");
        }
        assert!(fs.chmod("abs", 0o777).is_err());
        assert!(fs.truncate("rel", 0).is_err());
        assert!(fs.readdir("up").is_err());
        assert!(fs.mkdir("up/escaped", 0o755).is_err());
        assert!(fs.rename("inside.txt", "up/stolen").is_err());
        assert!(fs.link("up/secret.txt", "linked").is_err());
        // Renaming a symlink over a directory the guest uses does not redirect later access.
        assert_eq!(std::fs::read_to_string(&outside).unwrap(), "outside");
        assert!(!dir.path().join("escaped").exists() && !dir.path().join("stolen").exists());
        // Creating a symlink is allowed (its target is just text); following it out is not.
        fs.symlink("/etc/passwd", "to-passwd").unwrap();
        assert_eq!(fs.readlink("to-passwd").unwrap(), "/etc/passwd");
        assert!(fs.open("to-passwd", OFlags::RDONLY, 0).is_err());
    }

    #[test]
    fn symlinks_inside_the_root_are_not_followed_either() {
        let (dir, fs) = setup();
        std::fs::create_dir(dir.path().join("root/d")).unwrap();
        std::fs::write(dir.path().join("root/d/f"), "in d").unwrap();
        std::os::unix::fs::symlink("d", dir.path().join("root/to-d")).unwrap();
        std::os::unix::fs::symlink("d/f", dir.path().join("root/to-f")).unwrap();
        // Through a link, as a directory on the way or as the final file: refused.
        assert_eq!(fs.open("to-d/f", OFlags::WRONLY, 0).unwrap_err(), Errno::LOOP);
        assert_eq!(fs.open("to-f", OFlags::WRONLY | OFlags::TRUNC, 0).unwrap_err(), Errno::LOOP);
        assert!(fs.mkdir("to-d/new", 0o755).is_err());
        assert!(fs.remove("to-d/f", false).is_err());
        assert!(fs.rename("inside.txt", "to-d/moved").is_err());
        assert!(fs.truncate("to-f", 0).is_err());
        assert_eq!(std::fs::read_to_string(dir.path().join("root/d/f")).unwrap(), "in d");
        // Positive control: the same files by their own names, and the links themselves.
        fs.open("d/f", OFlags::WRONLY | OFlags::APPEND, 0).unwrap().write_all(b"!").unwrap();
        assert_eq!(std::fs::read_to_string(dir.path().join("root/d/f")).unwrap(), "in d!");
        assert_eq!(fs.readlink("to-d").unwrap(), "d");
        assert_eq!(fs.lstat("to-f").unwrap().mode & 0o170000, 0o120000);
        fs.remove("to-f", false).unwrap();
    }

    #[test]
    fn read_only_and_special_files() {
        let (dir, _) = setup();
        let fs = HostFs::new(&dir.path().join("root"), true).unwrap();
        assert_eq!(fs.open("inside.txt", OFlags::WRONLY, 0).unwrap_err(), Errno::ROFS);
        assert_eq!(fs.mkdir("x", 0o755).unwrap_err(), Errno::ROFS);
        assert_eq!(fs.remove("inside.txt", false).unwrap_err(), Errno::ROFS);
        assert!(fs.open("inside.txt", OFlags::RDONLY, 0).is_ok());
        rustix::fs::mknodat(
            rustix::fs::CWD,
            dir.path().join("root/fifo"),
            FileType::Fifo,
            Mode::from_raw_mode(0o666),
            0,
        )
        .unwrap();
        assert_eq!(
            fs.open("fifo", OFlags::RDONLY, 0).unwrap_err(),
            Errno::ACCESS,
            "FIFOs are not opened (or waited on)"
        );
    }
}
