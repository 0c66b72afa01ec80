//! One build step's layer from two commits of the same VM: a guest commits everything its
//! root changed since boot, so the layer of a step is what changed between the commit
//! before it and the commit after it — new or modified entries, whiteouts for what went
//! away, and whole directories that became opaque.
//!
//! The commits come from the guest: the index kept of each is bounded (entries, bytes of
//! paths) and holds digests, not contents or xattr values.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use tar::EntryType;

use crate::layer::{clean_path, LayerError, OPAQUE_MARKER, WHITEOUT_PREFIX};

/// Most entries a commit may have.
pub const MAX_ENTRIES: usize = 1 << 20;
/// Most bytes of paths and link targets a commit may have.
pub const MAX_PATH_BYTES: usize = 256 << 20;

/// What a diff's inputs may hold.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Entries per commit.
    pub entries: usize,
    /// Bytes of paths and link targets per commit.
    pub path_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self { entries: MAX_ENTRIES, path_bytes: MAX_PATH_BYTES }
    }
}

/// What identifies an entry's version: metadata, link target, xattrs and content digest.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Signature {
    kind: u8,
    mode: u32,
    uid: u64,
    gid: u64,
    mtime: u64,
    link: Option<PathBuf>,
    device: (u32, u32),
    /// sha256 of the content, then of each xattr's name and value.
    content: [u8; 32],
}

type Index = BTreeMap<PathBuf, Signature>;

fn index(tar: &mut dyn Read, limits: Limits) -> Result<Index, LayerError> {
    let mut archive = tar::Archive::new(tar);
    let mut index = Index::new();
    let mut path_bytes = 0usize;
    for entry in archive.entries().map_err(LayerError::Read)? {
        let mut entry = entry.map_err(LayerError::Read)?;
        let path = clean_path(&entry.path().map_err(LayerError::Read)?)?;
        if path.as_os_str().is_empty() {
            continue;
        }
        let header = entry.header().clone();
        let link = entry.link_name().map_err(LayerError::Read)?.map(|l| l.into_owned());
        path_bytes += path.as_os_str().len() + link.as_ref().map_or(0, |l| l.as_os_str().len());
        if index.len() >= limits.entries || path_bytes > limits.path_bytes {
            return Err(LayerError::Read(io::Error::other(format!(
                "the commit has more than {} entries or {} MiB of paths",
                limits.entries,
                limits.path_bytes >> 20
            ))));
        }
        let mut hasher = Sha256::new();
        if let Some(exts) = entry.pax_extensions().map_err(LayerError::Read)? {
            for ext in exts {
                let ext = ext.map_err(LayerError::Read)?;
                if let Ok(key) = ext.key() {
                    if key.starts_with("SCHILY.xattr.") {
                        hasher.update((key.len() as u64).to_be_bytes());
                        hasher.update(key.as_bytes());
                        hasher.update((ext.value_bytes().len() as u64).to_be_bytes());
                        hasher.update(ext.value_bytes());
                    }
                }
            }
        }
        let signature = Signature {
            kind: header.entry_type().as_byte(),
            mode: header.mode().unwrap_or(0),
            uid: header.uid().unwrap_or(0),
            gid: header.gid().unwrap_or(0),
            mtime: header.mtime().unwrap_or(0),
            link,
            device: (
                header.device_major().ok().flatten().unwrap_or(0),
                header.device_minor().ok().flatten().unwrap_or(0),
            ),
            content: {
                hasher.update(b"content");
                io::copy(&mut entry, &mut hasher).map_err(LayerError::Read)?;
                hasher.finalize().into()
            },
        };
        index.insert(path, signature);
    }
    Ok(index)
}

fn name_of(path: &Path) -> String {
    path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

/// What went into a diff layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diff {
    /// Entries written (whiteouts included); 0 means the step changed nothing.
    pub entries: u64,
    /// `sha256:` of the tar written.
    pub diff_id: String,
}

/// Writes to `out` the layer that takes a root from `before` (the earlier commit, none for
/// a fresh machine) to `after`, both read from their start.
pub fn diff(
    before: Option<&mut dyn Read>,
    after: &mut dyn FnMut() -> io::Result<Box<dyn Read>>,
    out: &mut dyn Write,
    limits: Limits,
) -> Result<Diff, LayerError> {
    let old = match before {
        Some(tar) => index(tar, limits)?,
        None => Index::new(),
    };
    let new = index(&mut *after().map_err(LayerError::Read)?, limits)?;
    // Directories that became opaque: everything of theirs is written again.
    let opaque: Vec<PathBuf> = new
        .keys()
        .filter(|p| name_of(p) == OPAQUE_MARKER && !old.contains_key(*p))
        .filter_map(|p| p.parent().map(Path::to_path_buf))
        .collect();
    let mut emit: BTreeSet<PathBuf> = new
        .iter()
        .filter(|(path, sig)| old.get(*path) != Some(sig) || opaque.iter().any(|d| path.starts_with(d) && *path != d))
        .map(|(path, _)| path.clone())
        .collect();
    // Whiteouts for what the step removed, at the top of each removed tree.
    let mut whiteouts = Vec::new();
    for path in old.keys().filter(|p| !new.contains_key(*p) && !name_of(p).starts_with(WHITEOUT_PREFIX)) {
        let parent = path.parent().unwrap_or(Path::new(""));
        let parent_is_dir =
            parent.as_os_str().is_empty() || new.get(parent).is_some_and(|s| s.kind == EntryType::Directory.as_byte());
        let marker = parent.join(format!("{WHITEOUT_PREFIX}{}", name_of(path)));
        if parent_is_dir && !new.contains_key(&marker) {
            whiteouts.push(marker);
        }
    }
    emit.retain(|p| new.contains_key(p));
    let mut builder = tar::Builder::new(HashingWriter { out, hasher: Sha256::new() });
    let mut entries = 0;
    let mut archive = tar::Archive::new(after().map_err(LayerError::Read)?);
    for entry in archive.entries().map_err(LayerError::Read)? {
        let mut entry = entry.map_err(LayerError::Read)?;
        let path = clean_path(&entry.path().map_err(LayerError::Read)?)?;
        if !emit.remove(&path) {
            continue;
        }
        let mut header = entry.header().clone();
        if let Some(exts) = entry.pax_extensions().map_err(LayerError::Read)? {
            let kept: Vec<(String, Vec<u8>)> = exts
                .filter_map(Result::ok)
                .filter_map(|e| Some((e.key().ok()?.to_owned(), e.value_bytes().to_vec())))
                .filter(|(k, _)| k.starts_with("SCHILY.xattr."))
                .collect();
            if !kept.is_empty() {
                builder
                    .append_pax_extensions(kept.iter().map(|(k, v)| (k.as_str(), v.as_slice())))
                    .map_err(LayerError::Temp)?;
            }
        }
        match header.entry_type() {
            EntryType::Symlink | EntryType::Link => {
                let target = entry.link_name().map_err(LayerError::Read)?.unwrap_or_default().into_owned();
                builder.append_link(&mut header, &path, &target).map_err(LayerError::Temp)?;
            }
            _ => builder.append_data(&mut header, &path, &mut entry).map_err(LayerError::Temp)?,
        }
        entries += 1;
    }
    for marker in whiteouts {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(EntryType::Regular);
        header.set_mode(0o644);
        header.set_size(0);
        builder.append_data(&mut header, &marker, io::empty()).map_err(LayerError::Temp)?;
        entries += 1;
    }
    let mut sink = builder.into_inner().map_err(LayerError::Temp)?;
    sink.flush().map_err(LayerError::Temp)?;
    Ok(Diff { entries, diff_id: format!("sha256:{}", hex::encode(sink.hasher.finalize())) })
}

/// Writes through and hashes what it wrote.
pub(crate) struct HashingWriter<'a> {
    pub(crate) out: &'a mut dyn Write,
    pub(crate) hasher: Sha256,
}

impl Write for HashingWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.out.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    enum E<'a> {
        File(&'a str, &'a [u8]),
        Dir(&'a str),
    }

    fn tar_of(entries: &[E<'_>]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for e in entries {
            let mut h = tar::Header::new_gnu();
            match e {
                E::File(name, data) => {
                    h.set_mode(0o644);
                    h.set_size(data.len() as u64);
                    b.append_data(&mut h, name, *data).unwrap();
                }
                E::Dir(name) => {
                    h.set_entry_type(EntryType::Directory);
                    h.set_mode(0o755);
                    h.set_size(0);
                    b.append_data(&mut h, name, io::empty()).unwrap();
                }
            }
        }
        b.into_inner().unwrap()
    }

    fn names(tar: &[u8]) -> Vec<String> {
        let mut archive = tar::Archive::new(tar);
        let mut names: Vec<String> =
            archive.entries().unwrap().map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned()).collect();
        names.sort();
        names
    }

    fn diff_of(before: Option<&[u8]>, after: &[u8]) -> (Vec<u8>, Diff) {
        let mut out = Vec::new();
        let after = after.to_vec();
        let mut open = || -> io::Result<Box<dyn Read>> { Ok(Box::new(io::Cursor::new(after.clone()))) };
        let mut before = before;
        let d = diff(before.as_mut().map(|b| b as &mut dyn Read), &mut open, &mut out, Limits::default()).unwrap();
        (out, d)
    }

    #[test]
    fn a_step_layer_holds_only_what_the_step_changed() {
        let before =
            tar_of(&[E::Dir("app"), E::File("app/keep", b"1"), E::File("app/edit", b"2"), E::File("gone", b"3")]);
        let after = tar_of(&[
            E::Dir("app"),
            E::File("app/keep", b"1"),
            E::File("app/edit", b"changed"),
            E::File("app/new", b"4"),
            E::File(".wh.lower", b""),
        ]);
        let (layer, d) = diff_of(Some(&before), &after);
        assert_eq!(names(&layer), [".wh.gone", ".wh.lower", "app/edit", "app/new"]);
        assert_eq!(d.entries, 4);
        assert_eq!(d.diff_id, format!("sha256:{}", hex::encode(Sha256::digest(&layer))));
        // Nothing changed: an empty layer.
        let (_, same) = diff_of(Some(&after), &after);
        assert_eq!(same.entries, 0);
        // The first commit of a machine is its own layer.
        let (layer, _) = diff_of(None, &before);
        assert_eq!(names(&layer), ["app", "app/edit", "app/keep", "gone"]);
    }

    #[test]
    fn a_commit_over_its_bounds_is_refused() {
        let many: Vec<String> = (0..50).map(|i| format!("f{i}")).collect();
        let entries: Vec<E<'_>> = many.iter().map(|n| E::File(n, b"x")).collect();
        let tar = tar_of(&entries);
        let mut open = || -> io::Result<Box<dyn Read>> { Ok(Box::new(io::Cursor::new(tar.clone()))) };
        // Positive control: within the bounds it diffs.
        let fits = Limits { entries: 50, path_bytes: 1024 };
        assert_eq!(diff(None, &mut open, &mut Vec::new(), fits).unwrap().entries, 50);
        for limits in [Limits { entries: 49, path_bytes: 1024 }, Limits { entries: 50, path_bytes: 100 }] {
            let e = diff(None, &mut open, &mut Vec::new(), limits).unwrap_err();
            assert!(matches!(e, LayerError::Read(_)), "{e}");
        }
    }

    #[test]
    fn a_removed_tree_gets_one_whiteout_and_a_new_opaque_dir_is_written_whole() {
        let before = tar_of(&[E::Dir("d"), E::File("d/x", b"1"), E::Dir("o"), E::File("o/old", b"2")]);
        let after = tar_of(&[E::Dir("o"), E::File("o/.wh..wh..opq", b""), E::File("o/old", b"2")]);
        let (layer, _) = diff_of(Some(&before), &after);
        assert_eq!(names(&layer), [".wh.d", "o/.wh..wh..opq", "o/old"]);
    }
}
