//! Copy-on-write view of a host directory: the guest sees and changes it freely, the host
//! directory never changes.
//!
//! Reads go to the host directory (the read-only lower layer) until a path is written: then
//! it, and its parent directories, are copied up into a per-VM upper directory first, lazily,
//! one file at a time. Deletions are remembered as whiteouts; a directory re-created over a
//! deleted one is opaque (nothing of the lower one shows through).

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::io::{Read, Write};
use std::path::Path;
use std::sync::Mutex;

use rustix::fs::OFlags;
use rustix::io::Errno;

use crate::{HostFs, Provider};
use matchlock_protocol::vfs::{DirEntry, FsStats, Stat};

/// Mode bits of a file type.
const TYPE_MASK: u32 = 0o170_000;
const SYMLINK: u32 = 0o120_000;

/// An overlay of `upper` (per VM, writable) over `lower` (the host directory, read-only).
#[derive(Debug)]
pub struct Overlay {
    lower: HostFs,
    upper: HostFs,
    /// Paths deleted from the merged view.
    whiteouts: Mutex<HashSet<String>>,
    /// Directories whose lower contents are hidden.
    opaque: Mutex<HashSet<String>>,
}

fn ancestors(rel: &str) -> impl Iterator<Item = &str> {
    let mut cut: Vec<&str> = rel.match_indices('/').map(|(i, _)| &rel[..i]).collect();
    cut.push(rel);
    cut.into_iter().filter(|p| !p.is_empty())
}

fn parent_of(rel: &str) -> &str {
    rel.rsplit_once('/').map_or("", |(dir, _)| dir)
}

impl Overlay {
    /// Serves `lower` copy-on-write, keeping changes in the empty directory `upper`.
    pub fn new(lower: &Path, upper: &Path) -> Result<Self, Errno> {
        Ok(Self {
            lower: HostFs::new(lower, true)?,
            upper: HostFs::new(upper, false)?,
            whiteouts: Mutex::default(),
            opaque: Mutex::default(),
        })
    }

    /// Whether the lower layer is hidden at `rel` (deleted, or under an opaque directory).
    fn lower_hidden(&self, rel: &str) -> bool {
        let whiteouts = self.whiteouts.lock().unwrap_or_else(|e| e.into_inner());
        let opaque = self.opaque.lock().unwrap_or_else(|e| e.into_inner());
        ancestors(rel).any(|p| whiteouts.contains(p) || (p != rel && opaque.contains(p)))
    }

    fn in_upper(&self, rel: &str) -> bool {
        self.upper.lstat(rel).is_ok()
    }

    fn in_lower(&self, rel: &str) -> bool {
        !self.lower_hidden(rel) && self.lower.lstat(rel).is_ok()
    }

    fn exists(&self, rel: &str) -> bool {
        rel.is_empty() || self.in_upper(rel) || self.in_lower(rel)
    }

    /// Makes the parent directories of `rel` exist in the upper layer.
    fn copy_up_parents(&self, rel: &str) -> Result<(), Errno> {
        let parent = parent_of(rel);
        if parent.is_empty() {
            return Ok(());
        }
        for dir in ancestors(parent) {
            if self.in_upper(dir) {
                continue;
            }
            let mode = if self.in_lower(dir) { self.lower.stat(dir)?.mode & 0o7777 } else { return Err(Errno::NOENT) };
            self.upper.mkdir(dir, mode)?;
        }
        Ok(())
    }

    /// Copies `rel` (a file, symlink or, recursively, a directory) into the upper layer.
    fn copy_up(&self, rel: &str) -> Result<(), Errno> {
        if rel.is_empty() || self.in_upper(rel) {
            return Ok(());
        }
        if !self.in_lower(rel) {
            return Err(Errno::NOENT);
        }
        self.copy_up_parents(rel)?;
        self.copy_tree(rel)
    }

    /// Like [`Self::copy_up`], but a directory already partly in the upper layer gets the rest
    /// of its lower contents too (before a rename moves it away from its lower twin).
    fn copy_up_deep(&self, rel: &str) -> Result<(), Errno> {
        self.copy_up(rel)?;
        let opaque = self.opaque.lock().unwrap_or_else(|e| e.into_inner()).contains(rel);
        if opaque || !self.in_lower(rel) || !self.lower.lstat(rel)?.is_dir {
            return Ok(());
        }
        for entry in self.lower.readdir(rel)? {
            let child = format!("{rel}/{}", entry.name);
            if self.lower_hidden(&child) {
                continue;
            }
            if self.in_upper(&child) {
                self.copy_up_deep(&child)?;
            } else {
                self.copy_tree(&child)?;
            }
        }
        Ok(())
    }

    fn copy_tree(&self, rel: &str) -> Result<(), Errno> {
        let stat = self.lower.lstat(rel)?;
        match stat.mode & TYPE_MASK {
            SYMLINK => self.upper.symlink(&self.lower.readlink(rel)?, rel),
            _ if stat.is_dir => {
                self.upper.mkdir(rel, stat.mode & 0o7777)?;
                for entry in self.lower.readdir(rel)? {
                    let child = format!("{rel}/{}", entry.name);
                    if !self.lower_hidden(&child) {
                        self.copy_tree(&child)?;
                    }
                }
                Ok(())
            }
            _ => {
                let mut from = self.lower.open(rel, OFlags::RDONLY, 0)?;
                let mut to = self.upper.open(rel, OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL, stat.mode & 0o777)?;
                let mut buf = vec![0u8; 256 * 1024];
                loop {
                    let n = from.read(&mut buf).map_err(|_| Errno::IO)?;
                    if n == 0 {
                        return Ok(());
                    }
                    to.write_all(&buf[..n]).map_err(|_| Errno::IO)?;
                }
            }
        }
    }

    /// A new name in the merged view: its parents exist up, no whiteout hides it any more.
    fn prepare_new(&self, rel: &str, replaces_dir: bool) -> Result<(), Errno> {
        self.copy_up_parents(rel)?;
        let was_deleted = self.whiteouts.lock().unwrap_or_else(|e| e.into_inner()).remove(rel);
        if was_deleted || replaces_dir {
            self.opaque.lock().unwrap_or_else(|e| e.into_inner()).insert(rel.to_owned());
        }
        Ok(())
    }

    /// The layer `rel` is read from: the upper one once it is there, else the lower one unless
    /// a deletion hides it.
    fn layer(&self, rel: &str) -> Result<&HostFs, Errno> {
        if self.in_upper(rel) {
            Ok(&self.upper)
        } else if self.lower_hidden(rel) {
            Err(Errno::NOENT)
        } else {
            Ok(&self.lower)
        }
    }

    fn whiteout(&self, rel: &str) {
        self.whiteouts.lock().unwrap_or_else(|e| e.into_inner()).insert(rel.to_owned());
    }
}

impl Provider for Overlay {
    fn stat(&self, rel: &str) -> Result<Stat, Errno> {
        self.layer(rel)?.stat(rel)
    }

    fn lstat(&self, rel: &str) -> Result<Stat, Errno> {
        self.layer(rel)?.lstat(rel)
    }

    fn open(&self, rel: &str, flags: OFlags, mode: u32) -> Result<File, Errno> {
        let writes = flags.intersects(OFlags::WRONLY | OFlags::RDWR | OFlags::TRUNC | OFlags::APPEND);
        if flags.contains(OFlags::CREATE) && !self.exists(rel) {
            self.prepare_new(rel, false)?;
            return self.upper.open(rel, flags, mode);
        }
        if flags.contains(OFlags::CREATE | OFlags::EXCL) {
            return Err(Errno::EXIST);
        }
        if writes {
            self.copy_up(rel)?;
        }
        if self.in_upper(rel) {
            self.upper.open(rel, flags - OFlags::CREATE, mode)
        } else if self.in_lower(rel) {
            self.lower.open(rel, flags - OFlags::CREATE, mode)
        } else {
            Err(Errno::NOENT)
        }
    }

    fn mkdir(&self, rel: &str, mode: u32) -> Result<(), Errno> {
        if self.exists(rel) {
            return Err(Errno::EXIST);
        }
        self.prepare_new(rel, false)?;
        self.upper.mkdir(rel, mode)
    }

    fn remove(&self, rel: &str, dir: bool) -> Result<(), Errno> {
        if rel.is_empty() {
            return Err(Errno::BUSY);
        }
        let stat =
            self.stat(rel).or_else(|_| if self.in_upper(rel) { self.upper.lstat(rel) } else { Err(Errno::NOENT) })?;
        match (dir, stat.is_dir) {
            (true, false) => return Err(Errno::NOTDIR),
            (false, true) => return Err(Errno::ISDIR),
            (true, true) if !self.readdir(rel)?.is_empty() => return Err(Errno::NOTEMPTY),
            _ => {}
        }
        if self.in_upper(rel) {
            self.upper.remove(rel, dir)?;
        }
        if self.lower.lstat(rel).is_ok() {
            self.whiteout(rel);
        }
        Ok(())
    }

    fn rename(&self, from: &str, to: &str) -> Result<(), Errno> {
        if from.is_empty() || to.is_empty() || to.starts_with(&format!("{from}/")) {
            return Err(Errno::INVAL);
        }
        let source = self.stat(from)?;
        if let Ok(target) = self.stat(to) {
            match (source.is_dir, target.is_dir) {
                (true, false) => return Err(Errno::NOTDIR),
                (false, true) => return Err(Errno::ISDIR),
                (true, true) if !self.readdir(to)?.is_empty() => return Err(Errno::NOTEMPTY),
                _ => {}
            }
            if target.is_dir && self.in_upper(to) {
                self.upper.remove(to, true)?;
            }
        }
        self.copy_up_deep(from)?;
        let replaces_lower_dir = source.is_dir || self.lower.lstat(to).is_ok();
        self.prepare_new(to, replaces_lower_dir)?;
        self.upper.rename(from, to)?;
        if self.lower.lstat(from).is_ok() {
            self.whiteout(from);
        }
        Ok(())
    }

    fn readdir(&self, rel: &str) -> Result<Vec<DirEntry>, Errno> {
        let mut merged = BTreeMap::new();
        let opaque = self.opaque.lock().unwrap_or_else(|e| e.into_inner()).contains(rel);
        let mut found = false;
        if !opaque && !self.lower_hidden(rel) {
            if let Ok(entries) = self.lower.readdir(rel) {
                found = true;
                for entry in entries {
                    let child = if rel.is_empty() { entry.name.clone() } else { format!("{rel}/{}", entry.name) };
                    if !self.lower_hidden(&child) {
                        merged.insert(entry.name.clone(), entry);
                    }
                }
            }
        }
        if let Ok(entries) = self.upper.readdir(rel) {
            found = true;
            merged.extend(entries.into_iter().map(|e| (e.name.clone(), e)));
        }
        if found {
            Ok(merged.into_values().collect())
        } else {
            Err(Errno::NOENT)
        }
    }

    fn chmod(&self, rel: &str, mode: u32) -> Result<(), Errno> {
        self.copy_up(rel)?;
        self.upper.chmod(rel, mode)
    }

    fn truncate(&self, rel: &str, size: u64) -> Result<(), Errno> {
        self.copy_up(rel)?;
        self.upper.truncate(rel, size)
    }

    fn set_times(&self, rel: &str, atime_ns: Option<i64>, mtime_ns: Option<i64>) -> Result<(), Errno> {
        self.copy_up(rel)?;
        self.upper.set_times(rel, atime_ns, mtime_ns)
    }

    /// The writable layer's file system: where the guest's writes go.
    fn statfs(&self) -> Result<FsStats, Errno> {
        self.upper.statfs()
    }

    fn symlink(&self, target: &str, rel: &str) -> Result<(), Errno> {
        if self.exists(rel) {
            return Err(Errno::EXIST);
        }
        self.prepare_new(rel, false)?;
        self.upper.symlink(target, rel)
    }

    fn readlink(&self, rel: &str) -> Result<String, Errno> {
        self.layer(rel)?.readlink(rel)
    }

    /// Only what the upper layer holds: removing a lower file writes a whiteout, frees nothing.
    fn frees_entry(&self, rel: &str) -> bool {
        self.in_upper(rel) && !self.in_lower(rel)
    }

    fn stored_bytes(&self, rel: &str) -> u64 {
        if self.in_upper(rel) {
            self.upper.stored_bytes(rel)
        } else {
            0
        }
    }

    /// What [`Self::copy_up`] (or, with `deep`, [`Self::copy_up_deep`]) would copy: a file
    /// not up yet, a directory not up yet with all its lower files, and with `deep` the lower
    /// files of a directory already partly up.
    fn copy_up_bytes(&self, rel: &str, deep: bool) -> u64 {
        if rel.is_empty() || !self.in_lower(rel) {
            return 0;
        }
        let Ok(stat) = self.lower.lstat(rel) else { return 0 };
        let up = self.in_upper(rel);
        if !stat.is_dir {
            return if !up && stat.mode & TYPE_MASK == 0o100_000 { stat.size } else { 0 };
        }
        if up && (!deep || self.opaque.lock().unwrap_or_else(|e| e.into_inner()).contains(rel)) {
            return 0;
        }
        let children = self.lower.readdir(rel).unwrap_or_default();
        children.iter().map(|entry| self.copy_up_bytes(&format!("{rel}/{}", entry.name), deep)).sum()
    }

    fn link(&self, from: &str, to: &str) -> Result<(), Errno> {
        if self.exists(to) {
            return Err(Errno::EXIST);
        }
        self.copy_up(from)?;
        self.prepare_new(to, false)?;
        self.upper.link(from, to)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree() -> (tempfile::TempDir, Overlay) {
        let dir = tempfile::tempdir().unwrap();
        let lower = dir.path().join("lower");
        std::fs::create_dir_all(lower.join("src/nested")).unwrap();
        std::fs::write(lower.join("README"), "readme").unwrap();
        std::fs::write(lower.join("src/main.rs"), "fn main() {}").unwrap();
        std::fs::write(lower.join("src/nested/deep.txt"), "deep").unwrap();
        std::os::unix::fs::symlink("main.rs", lower.join("src/link")).unwrap();
        std::fs::create_dir(dir.path().join("upper")).unwrap();
        let overlay = Overlay::new(&lower, &dir.path().join("upper")).unwrap();
        (dir, overlay)
    }

    fn read(o: &Overlay, rel: &str) -> String {
        let mut s = String::new();
        o.open(rel, OFlags::RDONLY, 0).unwrap().read_to_string(&mut s).unwrap();
        s
    }

    fn names(o: &Overlay, rel: &str) -> Vec<String> {
        o.readdir(rel).unwrap().into_iter().map(|e| e.name).collect()
    }

    fn snapshot(dir: &Path) -> Vec<(String, Vec<u8>)> {
        let mut out = Vec::new();
        let mut stack = vec![dir.to_owned()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap().flatten() {
                let p = e.path();
                let meta = std::fs::symlink_metadata(&p).unwrap();
                if meta.is_dir() {
                    stack.push(p.clone());
                }
                let data = if meta.is_file() { std::fs::read(&p).unwrap() } else { Vec::new() };
                out.push((p.to_string_lossy().into_owned(), data));
            }
        }
        out.sort();
        out
    }

    #[test]
    fn writes_copy_up_lazily_and_never_touch_the_host() {
        let (dir, o) = tree();
        let before = snapshot(&dir.path().join("lower"));
        // The guest resolves symlinks itself: the host reads the link, never through it.
        assert_eq!(o.readlink("src/link").unwrap(), "main.rs");
        assert_eq!(o.open("src/link", OFlags::RDONLY, 0).unwrap_err(), Errno::LOOP);
        assert_eq!(read(&o, "src/main.rs"), "fn main() {}");
        assert!(snapshot(&dir.path().join("upper")).is_empty(), "reads copy nothing");
        o.open("src/main.rs", OFlags::WRONLY | OFlags::TRUNC, 0).unwrap().write_all(b"changed").unwrap();
        assert_eq!(read(&o, "src/main.rs"), "changed");
        let upper = snapshot(&dir.path().join("upper"));
        assert_eq!(upper.len(), 2, "only the written file and its directory were copied: {upper:?}");
        o.open("new.txt", OFlags::WRONLY | OFlags::CREATE, 0o644).unwrap().write_all(b"new").unwrap();
        o.mkdir("src/nested/more", 0o755).unwrap();
        o.rename("src/nested", "moved").unwrap();
        assert_eq!(read(&o, "moved/deep.txt"), "deep");
        assert!(o.stat("src/nested").is_err());
        assert_eq!(names(&o, "moved"), ["deep.txt", "more"]);
        o.remove("README", false).unwrap();
        assert!(o.stat("README").is_err());
        assert_eq!(names(&o, ""), ["moved", "new.txt", "src"]);
        o.chmod("src/main.rs", 0o600).unwrap();
        assert_eq!(o.stat("src/main.rs").unwrap().mode & 0o777, 0o600);
        o.truncate("moved/deep.txt", 1).unwrap();
        assert_eq!(read(&o, "moved/deep.txt"), "d");
        assert_eq!(snapshot(&dir.path().join("lower")), before, "the host directory is unchanged");
    }

    #[test]
    fn deleted_then_recreated_directories_are_opaque() {
        let (_dir, o) = tree();
        for f in ["src/main.rs", "src/link", "src/nested/deep.txt"] {
            o.remove(f, false).unwrap();
        }
        assert_eq!(o.remove("src", true).unwrap_err(), Errno::NOTEMPTY);
        o.remove("src/nested", true).unwrap();
        o.remove("src", true).unwrap();
        o.mkdir("src", 0o755).unwrap();
        assert!(names(&o, "src").is_empty(), "nothing of the old directory shows through");
        assert!(o.open("src/main.rs", OFlags::RDONLY, 0).is_err());
        assert_eq!(o.mkdir("src", 0o755).unwrap_err(), Errno::EXIST);
        assert_eq!(o.rename("src", "src/inside").unwrap_err(), Errno::INVAL);
    }
}
