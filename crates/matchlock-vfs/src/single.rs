//! A single host file mounted at a guest path (`-v ./notes.txt:notes.txt`): the provider of
//! its parent directory, restricted to that one name.

use std::fs::File;

use rustix::fs::OFlags;
use rustix::io::Errno;

use crate::Provider;
use matchlock_protocol::vfs::{DirEntry, FsStats, Stat};

/// One file of `parent`, served as the mount root.
#[derive(Debug)]
pub struct SingleFile {
    parent: Box<dyn Provider>,
    name: String,
}

impl SingleFile {
    /// Serves `name` (a file in `parent`) as the whole mount.
    pub fn new(parent: Box<dyn Provider>, name: &str) -> Result<Self, Errno> {
        if name.is_empty() || name.contains('/') || name == "." || name == ".." {
            return Err(Errno::INVAL);
        }
        let single = Self { parent, name: name.to_owned() };
        if single.parent.lstat(name)?.is_dir {
            return Err(Errno::ISDIR);
        }
        Ok(single)
    }

    fn target(&self, rel: &str) -> Result<&str, Errno> {
        if rel.is_empty() {
            Ok(&self.name)
        } else {
            Err(Errno::NOTDIR)
        }
    }
}

impl Provider for SingleFile {
    fn stat(&self, rel: &str) -> Result<Stat, Errno> {
        self.parent.stat(self.target(rel)?)
    }
    fn lstat(&self, rel: &str) -> Result<Stat, Errno> {
        self.parent.stat(self.target(rel)?)
    }
    fn open(&self, rel: &str, flags: OFlags, mode: u32) -> Result<File, Errno> {
        self.parent.open(self.target(rel)?, flags - OFlags::CREATE - OFlags::EXCL, mode)
    }
    fn mkdir(&self, rel: &str, _mode: u32) -> Result<(), Errno> {
        self.target(rel).and(Err(Errno::EXIST))
    }
    fn remove(&self, _rel: &str, _dir: bool) -> Result<(), Errno> {
        Err(Errno::BUSY)
    }
    fn rename(&self, _from: &str, _to: &str) -> Result<(), Errno> {
        Err(Errno::BUSY)
    }
    fn readdir(&self, _rel: &str) -> Result<Vec<DirEntry>, Errno> {
        Err(Errno::NOTDIR)
    }
    fn chmod(&self, rel: &str, mode: u32) -> Result<(), Errno> {
        self.parent.chmod(self.target(rel)?, mode)
    }
    fn truncate(&self, rel: &str, size: u64) -> Result<(), Errno> {
        self.parent.truncate(self.target(rel)?, size)
    }
    fn set_times(&self, rel: &str, atime_ns: Option<i64>, mtime_ns: Option<i64>) -> Result<(), Errno> {
        self.parent.set_times(self.target(rel)?, atime_ns, mtime_ns)
    }
    fn statfs(&self) -> Result<FsStats, Errno> {
        self.parent.statfs()
    }
    fn symlink(&self, _target: &str, _rel: &str) -> Result<(), Errno> {
        Err(Errno::NOTDIR)
    }
    fn readlink(&self, _rel: &str) -> Result<String, Errno> {
        Err(Errno::INVAL)
    }
    fn link(&self, _from: &str, _to: &str) -> Result<(), Errno> {
        Err(Errno::NOTDIR)
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use super::*;
    use crate::HostFs;

    #[test]
    fn only_the_one_file_is_reachable() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("notes.txt"), "notes").unwrap();
        std::fs::write(dir.path().join("other.txt"), "other").unwrap();
        let single = SingleFile::new(Box::new(HostFs::new(dir.path(), false).unwrap()), "notes.txt").unwrap();
        let mut s = String::new();
        single.open("", OFlags::RDONLY, 0).unwrap().read_to_string(&mut s).unwrap();
        assert_eq!(s, "notes");
        single.open("", OFlags::WRONLY | OFlags::TRUNC, 0).unwrap().write_all(b"new").unwrap();
        assert_eq!(std::fs::read_to_string(dir.path().join("notes.txt")).unwrap(), "new");
        assert_eq!(single.stat("other.txt").unwrap_err(), Errno::NOTDIR);
        assert_eq!(single.remove("", false).unwrap_err(), Errno::BUSY);
        assert!(SingleFile::new(Box::new(HostFs::new(dir.path(), false).unwrap()), "../x").is_err());
    }
}
