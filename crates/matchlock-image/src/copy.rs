//! The layers of `COPY` and `ADD`, made on the host as tars: from the build context (with
//! `.dockerignore`), or from another stage's or image's merged root file system.
//!
//! The context is the user's directory, maybe a stranger's repository: nothing outside it
//! is read. A source that leaves it (`..`) or passes through a symlink is refused, and
//! symlinks inside it are copied as symlinks, never followed.

use std::fs;
use std::io::{self, Read, Seek, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

use globset::{Glob, GlobBuilder, GlobMatcher};
use sha2::{Digest, Sha256};
use tar::{EntryType, Header};

use crate::diff::{Diff, HashingWriter};
use crate::dockerfile::CopyStep;
use crate::layer::{clean_path, decompress};

/// Why a `COPY`/`ADD` layer could not be made.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    /// A source matched nothing.
    #[error("{0}: not found in the build context (or excluded by .dockerignore)")]
    NotInContext(String),
    /// A source matched nothing in the stage or image it is copied from.
    #[error("{source_path}: not found in {from}")]
    NotInImage {
        /// The source.
        source_path: String,
        /// The stage or image.
        from: String,
    },
    /// A source leaves the context.
    #[error("{0}: outside the build context")]
    Outside(String),
    /// A source passes through a symlink.
    #[error("{0}: the path passes through a symlink ({1}), which a build does not follow")]
    Symlink(String, String),
    /// A bad `.dockerignore` or source pattern.
    #[error("invalid pattern {0:?}: {1}")]
    Pattern(String, String),
    /// An archive `ADD` cannot unpack.
    #[error("{0}: {1}")]
    Archive(String, String),
    /// Reading the context or writing the layer failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// What was read or written.
        path: PathBuf,
        /// The failure.
        #[source]
        source: io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> CopyError + '_ {
    move |source| CopyError::Io { path: path.to_owned(), source }
}

/// The `.dockerignore` of a context: `(pattern, excludes?)`, the last match wins; a
/// pattern excludes what it matches and everything below.
#[derive(Debug)]
struct Ignore(Vec<(GlobMatcher, bool)>);

impl Ignore {
    fn parse(text: &str) -> Result<Self, CopyError> {
        let mut rules = Vec::new();
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
            let (pattern, excludes) = match line.strip_prefix('!') {
                Some(p) => (p.trim(), false),
                None => (line, true),
            };
            let cleaned = clean_path(Path::new(pattern))
                .map_err(|_| CopyError::Pattern(line.into(), "leaves the context".into()))?;
            rules.push((glob(&cleaned.to_string_lossy()).map_err(|e| CopyError::Pattern(line.into(), e))?, excludes));
        }
        Ok(Self(rules))
    }

    fn excludes(&self, rel: &Path) -> bool {
        let mut excluded = false;
        for (glob, excludes) in &self.0 {
            if rel.ancestors().filter(|a| !a.as_os_str().is_empty()).any(|a| glob.is_match(a)) {
                excluded = *excludes;
            }
        }
        excluded
    }
}

fn glob(pattern: &str) -> Result<GlobMatcher, String> {
    let glob: Glob = GlobBuilder::new(pattern).literal_separator(true).build().map_err(|e| e.to_string())?;
    Ok(glob.compile_matcher())
}

fn has_wildcards(s: &str) -> bool {
    s.contains(['*', '?', '['])
}

/// A build context directory.
#[derive(Debug)]
pub struct Context {
    root: PathBuf,
    ignore: Ignore,
}

/// Who owns what a `COPY` writes, and its mode override.
#[derive(Debug, Clone, Copy, Default)]
pub struct Ownership {
    /// `--chown` ids, `None` to keep (context files: root).
    pub owner: Option<(u64, u64)>,
    /// `--chmod`.
    pub chmod: Option<u32>,
}

/// A tar being written, hashed as it goes.
struct LayerTar<'a> {
    builder: tar::Builder<HashingWriter<'a>>,
    entries: u64,
    ownership: Ownership,
}

impl<'a> LayerTar<'a> {
    fn new(out: &'a mut dyn Write, ownership: Ownership) -> Self {
        Self { builder: tar::Builder::new(HashingWriter { out, hasher: Sha256::new() }), entries: 0, ownership }
    }

    fn apply(&self, header: &mut Header) {
        if let Some((uid, gid)) = self.ownership.owner {
            header.set_uid(uid);
            header.set_gid(gid);
            header.set_username("").ok();
            header.set_groupname("").ok();
        }
        if let Some(mode) = self.ownership.chmod {
            if header.entry_type() != EntryType::Symlink {
                header.set_mode(mode);
            }
        }
    }

    fn data(&mut self, header: &mut Header, path: &Path, data: &mut dyn Read) -> io::Result<()> {
        self.apply(header);
        self.builder.append_data(header, path, data)?;
        self.entries += 1;
        Ok(())
    }

    fn link(&mut self, header: &mut Header, path: &Path, target: &Path) -> io::Result<()> {
        self.apply(header);
        self.builder.append_link(header, path, target)?;
        self.entries += 1;
        Ok(())
    }

    fn finish(self) -> io::Result<Diff> {
        let entries = self.entries;
        let mut sink = self.builder.into_inner()?;
        sink.flush()?;
        Ok(Diff { entries, diff_id: format!("sha256:{}", hex::encode(sink.hasher.finalize())) })
    }
}

/// The names in the directory `dir`, sorted (layers do not depend on readdir order).
fn sorted_names(dir: &Path) -> Result<Vec<std::ffi::OsString>, CopyError> {
    let mut names: Vec<_> = fs::read_dir(dir)
        .map_err(io_err(dir))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<io::Result<_>>()
        .map_err(io_err(dir))?;
    names.sort();
    Ok(names)
}

/// Where a source lands: `dest/name` when the destination is a directory.
fn landing(dest: &str, name: &Path, into_dir: bool) -> PathBuf {
    let dest = clean_path(Path::new(dest)).unwrap_or_default();
    if into_dir {
        dest.join(name)
    } else {
        dest
    }
}

impl Context {
    /// The context at `root`, with its `.dockerignore` if it has one.
    pub fn open(root: &Path) -> Result<Self, CopyError> {
        let meta = fs::metadata(root).map_err(io_err(root))?;
        if !meta.is_dir() {
            return Err(CopyError::Io { path: root.to_owned(), source: io::Error::other("not a directory") });
        }
        let ignore_file = root.join(".dockerignore");
        let ignore = match fs::read_to_string(&ignore_file) {
            Ok(text) => Ignore::parse(&text)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ignore(Vec::new()),
            Err(e) => return Err(CopyError::Io { path: ignore_file, source: e }),
        };
        Ok(Self { root: root.to_owned(), ignore })
    }

    /// A context-relative path for `source`, checked: inside the context, no symlink on
    /// the way (the last component may be one: it is copied as a link).
    fn checked(&self, source: &str) -> Result<PathBuf, CopyError> {
        let mut rel = PathBuf::new();
        for c in Path::new(source).components() {
            match c {
                Component::Normal(p) => rel.push(p),
                Component::ParentDir if rel.pop() => {}
                Component::ParentDir => return Err(CopyError::Outside(source.to_owned())),
                _ => {}
            }
        }
        for ancestor in rel.ancestors().skip(1).filter(|a| !a.as_os_str().is_empty()) {
            let meta = fs::symlink_metadata(self.root.join(ancestor));
            if meta.is_ok_and(|m| m.file_type().is_symlink()) {
                return Err(CopyError::Symlink(source.to_owned(), ancestor.display().to_string()));
            }
        }
        Ok(rel)
    }

    /// Every context path (relative, sorted, `.dockerignore` applied) matching `pattern`.
    fn matching(&self, pattern: &str) -> Result<Vec<PathBuf>, CopyError> {
        let cleaned = clean_path(Path::new(pattern)).map_err(|_| CopyError::Outside(pattern.to_owned()))?;
        let matcher = glob(&cleaned.to_string_lossy()).map_err(|e| CopyError::Pattern(pattern.to_owned(), e))?;
        let mut found = Vec::new();
        let mut stack = vec![PathBuf::new()];
        while let Some(dir) = stack.pop() {
            let abs = self.root.join(&dir);
            let names = sorted_names(&abs)?;
            for name in names {
                let rel = dir.join(name);
                if matcher.is_match(&rel) {
                    if !self.ignore.excludes(&rel) {
                        found.push(rel);
                    }
                } else if fs::symlink_metadata(self.root.join(&rel)).is_ok_and(|m| m.is_dir()) {
                    stack.push(rel);
                }
            }
        }
        found.sort();
        Ok(found)
    }

    /// Writes to `out` the layer of `step` (its sources in this context) and returns it.
    pub fn layer(&self, step: &CopyStep, ownership: Ownership, out: &mut dyn Write) -> Result<Diff, CopyError> {
        let mut sources = Vec::new();
        for source in &step.sources {
            if has_wildcards(source) {
                let found = self.matching(source)?;
                if found.is_empty() {
                    return Err(CopyError::NotInContext(source.clone()));
                }
                sources.extend(found);
            } else {
                let rel = self.checked(source)?;
                let exists = fs::symlink_metadata(self.root.join(&rel)).is_ok();
                if !exists || (!rel.as_os_str().is_empty() && self.ignore.excludes(&rel)) {
                    return Err(CopyError::NotInContext(source.clone()));
                }
                sources.push(rel);
            }
        }
        let into_dir = step.dest.ends_with('/') || sources.len() > 1;
        let owner = Ownership { owner: Some(ownership.owner.unwrap_or((0, 0))), chmod: ownership.chmod };
        let mut tar = LayerTar::new(out, owner);
        for rel in &sources {
            let abs = self.root.join(rel);
            let meta = fs::symlink_metadata(&abs).map_err(io_err(&abs))?;
            let name = rel.file_name().map(PathBuf::from).unwrap_or_default();
            if meta.is_dir() {
                self.add_tree(&mut tar, rel, &landing(&step.dest, Path::new(""), false))?;
            } else if step.unpack_archives && meta.is_file() {
                let target = landing(&step.dest, &name, into_dir);
                match unpack(&abs, &mut tar, &clean_path(Path::new(&step.dest)).unwrap_or_default())? {
                    true => {}
                    false => self.add_one(&mut tar, rel, &target)?,
                }
            } else {
                self.add_one(&mut tar, rel, &landing(&step.dest, &name, into_dir))?;
            }
        }
        tar.finish().map_err(io_err(&self.root))
    }

    /// The contents of the directory `rel` (not itself), under `dest`.
    fn add_tree(&self, tar: &mut LayerTar<'_>, rel: &Path, dest: &Path) -> Result<(), CopyError> {
        let abs = self.root.join(rel);
        let names = sorted_names(&abs)?;
        for name in names {
            let child = rel.join(&name);
            let meta = fs::symlink_metadata(self.root.join(&child)).map_err(io_err(&abs))?;
            let excluded = self.ignore.excludes(&child);
            if !excluded {
                self.add_one(tar, &child, &dest.join(&name))?;
            }
            // An excluded directory may still hold an exception (`!dir/keep`).
            if meta.is_dir() && (!excluded || self.ignore.0.iter().any(|(_, e)| !e)) {
                self.add_tree(tar, &child, &dest.join(&name))?;
            }
        }
        Ok(())
    }

    /// One context entry (a directory without its contents) at `target`.
    fn add_one(&self, tar: &mut LayerTar<'_>, rel: &Path, target: &Path) -> Result<(), CopyError> {
        let abs = self.root.join(rel);
        let meta = fs::symlink_metadata(&abs).map_err(io_err(&abs))?;
        let mut header = Header::new_gnu();
        header.set_mode(meta.mode() & 0o7777);
        header.set_mtime(u64::try_from(meta.mtime()).unwrap_or(0));
        header.set_size(0);
        let kind = meta.file_type();
        let written = if kind.is_dir() {
            header.set_entry_type(EntryType::Directory);
            tar.data(&mut header, target, &mut io::empty())
        } else if kind.is_symlink() {
            header.set_entry_type(EntryType::Symlink);
            let link = fs::read_link(&abs).map_err(io_err(&abs))?;
            tar.link(&mut header, target, &link)
        } else if kind.is_file() {
            header.set_entry_type(EntryType::Regular);
            header.set_size(meta.len());
            let mut file = fs::File::open(&abs).map_err(io_err(&abs))?;
            tar.data(&mut header, target, &mut file)
        } else {
            // Sockets, fifos and devices have no place in an image built from files.
            tracing::debug!("COPY skips {} (not a file, directory or symlink)", abs.display());
            return Ok(());
        };
        written.map_err(io_err(&abs))
    }
}

/// `ADD`: unpacks `archive` under `dest` if it is a tar (plain, gzip or zstd); returns
/// whether it was one.
fn unpack(archive: &Path, tar: &mut LayerTar<'_>, dest: &Path) -> Result<bool, CopyError> {
    let mut file = fs::File::open(archive).map_err(io_err(archive))?;
    let mut magic = [0u8; 512];
    let n = read_up_to(&mut file, &mut magic).map_err(io_err(archive))?;
    let magic = &magic[..n];
    let shown = archive.display().to_string();
    if magic.starts_with(b"BZh") || magic.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
        return Err(CopyError::Archive(
            shown,
            "bzip2 and xz archives are not supported (use gzip, zstd or plain tar)".into(),
        ));
    }
    let compressed = magic.starts_with(&[0x1f, 0x8b]) || magic.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]);
    let plain_tar = magic.len() >= 262 && &magic[257..262] == b"ustar";
    if !compressed && !plain_tar {
        return Ok(false);
    }
    file.rewind().map_err(io_err(archive))?;
    let reader = decompress(Box::new(file)).map_err(io_err(archive))?;
    let mut entries_of = tar::Archive::new(reader);
    let bad = |e: io::Error| CopyError::Archive(shown.clone(), e.to_string());
    for entry in entries_of.entries().map_err(bad)? {
        let mut entry = entry.map_err(bad)?;
        let path =
            clean_path(&entry.path().map_err(bad)?).map_err(|e| CopyError::Archive(shown.clone(), e.to_string()))?;
        if path.as_os_str().is_empty() {
            continue;
        }
        let mut header = entry.header().clone();
        let target = dest.join(&path);
        match header.entry_type() {
            EntryType::Symlink => {
                let link = entry.link_name().map_err(bad)?.unwrap_or_default().into_owned();
                tar.link(&mut header, &target, &link)
            }
            EntryType::Link => {
                let link = entry.link_name().map_err(bad)?.unwrap_or_default();
                let link = clean_path(&link).map_err(|e| CopyError::Archive(shown.clone(), e.to_string()))?;
                tar.link(&mut header, &target, &dest.join(link))
            }
            EntryType::Regular | EntryType::Continuous | EntryType::Directory => {
                tar.data(&mut header, &target, &mut entry)
            }
            _ => continue,
        }
        .map_err(io_err(archive))?;
    }
    Ok(true)
}

fn read_up_to(file: &mut fs::File, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Writes to `out` the layer of `step` taken from `merged` (the merged root file system
/// of the stage or image `from`, as [`crate::layer::merge_to_tar`] writes it).
pub fn layer_from_image(
    step: &CopyStep,
    from: &str,
    merged: &mut dyn Read,
    ownership: Ownership,
    out: &mut dyn Write,
    mut rewind: impl FnMut() -> io::Result<Box<dyn Read>>,
) -> Result<Diff, CopyError> {
    let io_fail = |e| CopyError::Io { path: PathBuf::from(from), source: e };
    let patterns: Vec<(PathBuf, Option<GlobMatcher>)> = step
        .sources
        .iter()
        .map(|s| {
            let cleaned = clean_path(Path::new(s)).map_err(|_| CopyError::Outside(s.clone()))?;
            let matcher = if has_wildcards(s) {
                Some(glob(&cleaned.to_string_lossy()).map_err(|e| CopyError::Pattern(s.clone(), e))?)
            } else {
                None
            };
            Ok((cleaned, matcher))
        })
        .collect::<Result<_, CopyError>>()?;
    // First pass: which sources exist and are directories.
    let mut roots: Vec<Vec<(PathBuf, bool)>> = vec![Vec::new(); patterns.len()];
    let mut archive = tar::Archive::new(merged);
    for entry in archive.entries().map_err(io_fail)? {
        let entry = entry.map_err(io_fail)?;
        let path = clean_path(&entry.path().map_err(io_fail)?)
            .map_err(|e| CopyError::Io { path: from.into(), source: io::Error::other(e) })?;
        let is_dir = entry.header().entry_type() == EntryType::Directory;
        for (i, (literal, matcher)) in patterns.iter().enumerate() {
            let hit = match matcher {
                Some(m) => m.is_match(&path),
                None => path == *literal,
            };
            if hit {
                roots[i].push((path.clone(), is_dir));
            }
        }
    }
    for (i, found) in roots.iter_mut().enumerate() {
        if found.is_empty() {
            // `/` itself (or a directory the merge only implies) has no entry of its own.
            let literal = &patterns[i].0;
            if patterns[i].1.is_none() {
                found.push((literal.clone(), true));
            }
        }
    }
    let sources: Vec<(PathBuf, bool)> = roots.into_iter().flatten().collect();
    let into_dir = step.dest.ends_with('/') || sources.len() > 1;
    let dest = clean_path(Path::new(&step.dest)).unwrap_or_default();
    let place = |path: &Path| -> Option<PathBuf> {
        for (root, is_dir) in &sources {
            if *is_dir {
                if let Ok(rest) = path.strip_prefix(root) {
                    if !rest.as_os_str().is_empty() {
                        return Some(dest.join(rest));
                    }
                }
            } else if path == root {
                return Some(if into_dir { dest.join(root.file_name().unwrap_or_default()) } else { dest.clone() });
            }
        }
        None
    };
    let mut tar = LayerTar::new(out, ownership);
    let mut archive = tar::Archive::new(rewind().map_err(io_fail)?);
    for entry in archive.entries().map_err(io_fail)? {
        let mut entry = entry.map_err(io_fail)?;
        let path = clean_path(&entry.path().map_err(io_fail)?)
            .map_err(|e| CopyError::Io { path: from.into(), source: io::Error::other(e) })?;
        let Some(target) = place(&path) else { continue };
        let mut header = entry.header().clone();
        match header.entry_type() {
            EntryType::Symlink => {
                let link = entry.link_name().map_err(io_fail)?.unwrap_or_default().into_owned();
                tar.link(&mut header, &target, &link).map_err(io_fail)?;
            }
            EntryType::Link => {
                let link = entry.link_name().map_err(io_fail)?.unwrap_or_default().into_owned();
                match place(&link) {
                    Some(moved) => tar.link(&mut header, &target, &moved).map_err(io_fail)?,
                    None => tracing::debug!("COPY --from={from}: {} links outside what is copied", path.display()),
                }
            }
            _ => tar.data(&mut header, &target, &mut entry).map_err(io_fail)?,
        }
    }
    let diff = tar.finish().map_err(io_fail)?;
    if diff.entries == 0 {
        return Err(CopyError::NotInImage { source_path: step.sources.join(" "), from: from.to_owned() });
    }
    Ok(diff)
}

/// A file `ADD <url>` fetched, on the host.
#[derive(Debug, Clone)]
pub struct Download {
    /// The URL as the Dockerfile gives it (it names the file in a directory destination).
    pub url: String,
    /// The fetched bytes.
    pub file: PathBuf,
    /// Its modification time (seconds since the epoch): the response's `Last-Modified`, or 0.
    pub mtime: u64,
}

/// Writes to `out` the layer of `step` (an `ADD` of URLs) holding `downloads`, one per
/// source in order: mode 0600 unless `--chmod` (as Docker), owned by root unless `--chown`,
/// never unpacked.
pub fn layer_from_downloads(
    step: &CopyStep,
    downloads: &[Download],
    ownership: Ownership,
    out: &mut dyn Write,
) -> Result<Diff, CopyError> {
    let into_dir = step.dest.ends_with('/') || downloads.len() > 1;
    let owner = Ownership { owner: Some(ownership.owner.unwrap_or((0, 0))), chmod: ownership.chmod };
    let mut tar = LayerTar::new(out, owner);
    for download in downloads {
        let name = crate::dockerfile::remote_file_name(&download.url).unwrap_or_default();
        let target = landing(&step.dest, Path::new(&name), into_dir);
        let mut file = fs::File::open(&download.file).map_err(io_err(&download.file))?;
        let size = file.metadata().map_err(io_err(&download.file))?.len();
        let mut header = Header::new_gnu();
        header.set_entry_type(EntryType::Regular);
        header.set_mode(0o600);
        header.set_mtime(download.mtime);
        header.set_size(size);
        tar.data(&mut header, &target, &mut file).map_err(io_err(&download.file))?;
    }
    tar.finish().map_err(|source| CopyError::Io { path: PathBuf::from(&step.dest), source })
}

/// `--chown` ids: numbers, or names looked up in the image's `/etc/passwd` and `/etc/group`.
pub fn resolve_owner(spec: &str, passwd: Option<&str>, group: Option<&str>) -> Result<(u64, u64), String> {
    let (user, grp) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let find = |table: Option<&str>, name: &str, field: usize| -> Option<(u64, Option<u64>)> {
        table?
            .lines()
            .map(|l| l.split(':').collect::<Vec<_>>())
            .find(|f| f.first() == Some(&name))
            .and_then(|f| Some((f.get(field)?.parse().ok()?, f.get(field + 1).and_then(|g| g.parse().ok()))))
    };
    let (uid, primary) = match user.parse::<u64>() {
        Ok(uid) => (uid, None),
        Err(_) => find(passwd, user, 2)
            .ok_or_else(|| format!("--chown={spec}: no user {user:?} in the image's /etc/passwd"))?,
    };
    let gid = match grp {
        None => primary.unwrap_or(uid),
        Some(g) => match g.parse::<u64>() {
            Ok(gid) => gid,
            Err(_) => find(group, g, 2)
                .map(|(gid, _)| gid)
                .ok_or_else(|| format!("--chown={spec}: no group {g:?} in the image's /etc/group"))?,
        },
    };
    Ok((uid, gid))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dockerfile::CopyFrom;

    fn step(sources: &[&str], dest: &str) -> CopyStep {
        CopyStep {
            sources: sources.iter().map(|s| (*s).to_owned()).collect(),
            from: CopyFrom::Context,
            dest: dest.to_owned(),
            chown: None,
            chmod: None,
            unpack_archives: false,
            checksum: None,
        }
    }

    fn listing(tar: &[u8]) -> Vec<(String, u64, u32)> {
        let mut archive = tar::Archive::new(tar);
        archive
            .entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (
                    e.path().unwrap().to_string_lossy().into_owned(),
                    e.header().uid().unwrap(),
                    e.header().mode().unwrap(),
                )
            })
            .collect()
    }

    fn context() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir_all(root.join("src/sub")).unwrap();
        fs::create_dir_all(root.join("node_modules/x")).unwrap();
        fs::write(root.join("src/a.rs"), "a").unwrap();
        fs::write(root.join("src/sub/b.rs"), "b").unwrap();
        fs::write(root.join("src/secret.key"), "k").unwrap();
        fs::write(root.join("node_modules/x/index.js"), "x").unwrap();
        fs::write(root.join("README.md"), "r").unwrap();
        fs::write(root.join(".dockerignore"), "# deps\nnode_modules\n**/*.key\n*.md\n!README.md\n").unwrap();
        std::os::unix::fs::symlink("/etc", root.join("etc-link")).unwrap();
        dir
    }

    #[test]
    fn context_copies_follow_dockerignore_and_destinations() {
        let dir = context();
        let ctx = Context::open(dir.path()).unwrap();
        let mut out = Vec::new();
        ctx.layer(&step(&["src"], "/app"), Ownership::default(), &mut out).unwrap();
        let names: Vec<String> = listing(&out).into_iter().map(|(n, _, _)| n).collect();
        assert_eq!(names, ["app/a.rs", "app/sub", "app/sub/b.rs"], "secret.key is ignored, src/ itself is not copied");
        let mut out = Vec::new();
        let d = ctx
            .layer(&step(&["."], "/w/"), Ownership { owner: Some((1000, 1000)), chmod: Some(0o600) }, &mut out)
            .unwrap();
        let all = listing(&out);
        let names: Vec<&str> = all.iter().map(|(n, _, _)| n.as_str()).collect();
        assert!(names.contains(&"w/README.md"), "an exception re-includes: {names:?}");
        assert!(!names.iter().any(|n| n.contains("node_modules") || n.ends_with(".key")), "{names:?}");
        assert!(names.contains(&"w/etc-link"), "a symlink is copied as a link");
        assert!(all.iter().filter(|(n, _, _)| n != "w/etc-link").all(|(_, uid, mode)| *uid == 1000 && *mode == 0o600));
        assert_eq!(d.diff_id, format!("sha256:{}", hex::encode(Sha256::digest(&out))));
        let mut out = Vec::new();
        ctx.layer(&step(&["src/*.rs", "README.md"], "/d/"), Ownership::default(), &mut out).unwrap();
        let names: Vec<String> = listing(&out).into_iter().map(|(n, _, _)| n).collect();
        assert_eq!(names, ["d/a.rs", "d/README.md"]);
        let mut out = Vec::new();
        ctx.layer(&step(&["README.md"], "/opt/readme.txt"), Ownership::default(), &mut out).unwrap();
        assert_eq!(listing(&out)[0].0, "opt/readme.txt");
    }

    #[test]
    fn nothing_outside_the_context_is_read() {
        let dir = context();
        let ctx = Context::open(dir.path()).unwrap();
        for (source, want) in [
            ("../outside", "outside the build context"),
            ("etc-link/passwd", "passes through a symlink"),
            ("node_modules/x/index.js", "not found in the build context"),
            ("missing.txt", "not found"),
            ("*.nothing", "not found"),
        ] {
            let e = ctx.layer(&step(&[source], "/x"), Ownership::default(), &mut Vec::new()).unwrap_err();
            assert!(e.to_string().contains(want), "{source}: {e}");
        }
    }

    #[test]
    fn add_unpacks_a_tarball_and_copy_from_an_image_selects_a_tree() {
        let dir = tempfile::tempdir().unwrap();
        let mut b = tar::Builder::new(flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast()));
        for (name, data) in [("pkg/bin/tool", b"t".as_slice()), ("pkg/README", b"r")] {
            let mut h = Header::new_gnu();
            h.set_mode(0o755);
            h.set_size(data.len() as u64);
            b.append_data(&mut h, name, data).unwrap();
        }
        let gz = b.into_inner().unwrap().finish().unwrap();
        fs::write(dir.path().join("pkg.tar.gz"), &gz).unwrap();
        let ctx = Context::open(dir.path()).unwrap();
        let mut add = step(&["pkg.tar.gz"], "/opt/");
        add.unpack_archives = true;
        let mut out = Vec::new();
        ctx.layer(&add, Ownership::default(), &mut out).unwrap();
        let names: Vec<String> = listing(&out).into_iter().map(|(n, _, _)| n).collect();
        assert_eq!(names, ["opt/pkg/bin/tool", "opt/pkg/README"]);
        // The unpacked tree as an image's merged root: copy one directory out of it.
        let merged = out.clone();
        let mut from = step(&["/opt/pkg/bin"], "/usr/local/bin/");
        from.from = CopyFrom::Stage(0);
        let mut layer = Vec::new();
        let rewind = || -> io::Result<Box<dyn Read>> { Ok(Box::new(io::Cursor::new(merged.clone()))) };
        layer_from_image(&from, "build", &mut merged.as_slice(), Ownership::default(), &mut layer, rewind).unwrap();
        let names: Vec<String> = listing(&layer).into_iter().map(|(n, _, _)| n).collect();
        assert_eq!(names, ["usr/local/bin/tool"]);
        let mut missing = step(&["/nope"], "/x");
        missing.from = CopyFrom::Stage(0);
        let rewind = || -> io::Result<Box<dyn Read>> { Ok(Box::new(io::Cursor::new(merged.clone()))) };
        let e =
            layer_from_image(&missing, "build", &mut merged.as_slice(), Ownership::default(), &mut Vec::new(), rewind)
                .unwrap_err();
        assert!(e.to_string().contains("/nope: not found in build"), "{e}");
    }

    #[test]
    fn downloads_land_like_dockers_remote_add() {
        let dir = tempfile::tempdir().unwrap();
        let gz = dir.path().join("dl");
        let mut b = tar::Builder::new(flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast()));
        b.append_data(&mut Header::new_gnu(), "inside", io::empty()).unwrap();
        fs::write(&gz, b.into_inner().unwrap().finish().unwrap()).unwrap();
        let download = |url: &str| Download { url: url.to_owned(), file: gz.clone(), mtime: 1_700_000_000 };
        let mut add = step(&["https://h.test/pkg.tar.gz?v=1"], "/opt/");
        add.from = CopyFrom::Remote;
        let mut out = Vec::new();
        layer_from_downloads(&add, &[download(&add.sources[0])], Ownership::default(), &mut out).unwrap();
        assert_eq!(listing(&out), [("opt/pkg.tar.gz".to_owned(), 0, 0o600)], "named from the URL, not unpacked");
        let mut entries = tar::Archive::new(out.as_slice());
        let entry = entries.entries().unwrap().next().unwrap().unwrap();
        assert_eq!((entry.header().mtime().unwrap(), entry.size()), (1_700_000_000, fs::metadata(&gz).unwrap().len()));
        add.dest = "/usr/bin/tool".into();
        let mut out = Vec::new();
        let owned = Ownership { owner: Some((7, 8)), chmod: Some(0o755) };
        layer_from_downloads(&add, &[download(&add.sources[0])], owned, &mut out).unwrap();
        assert_eq!(listing(&out), [("usr/bin/tool".to_owned(), 7, 0o755)]);
    }

    #[test]
    fn owners_resolve_from_the_image() {
        let passwd = "root:x:0:0::/root:/bin/sh\napp:x:1000:1001::/home/app:/bin/sh\n";
        let group = "root:x:0:\nstaff:x:50:\n";
        assert_eq!(resolve_owner("app", Some(passwd), Some(group)), Ok((1000, 1001)));
        assert_eq!(resolve_owner("app:staff", Some(passwd), Some(group)), Ok((1000, 50)));
        assert_eq!(resolve_owner("12:34", None, None), Ok((12, 34)));
        assert_eq!(resolve_owner("7", None, None), Ok((7, 7)));
        assert!(resolve_owner("ghost", Some(passwd), Some(group)).unwrap_err().contains("no user"));
    }
}
