//! OCI layers: verifying them, and squashing a stack of them into one read-only ext4
//! image with whiteouts applied.

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::io::{self, BufReader, Read};
use std::path::{Component, Path, PathBuf};

use sha2::{Digest, Sha256};
use tar::{EntryType, Header};

use crate::ext4::{self, Ext4Error, Xattr, XattrError};

pub(crate) const WHITEOUT_PREFIX: &str = ".wh.";
pub(crate) const OPAQUE_MARKER: &str = ".wh..wh..opq";

/// Errors converting a layer.
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    /// Reading the layer failed (truncated or corrupt compression, bad tar).
    #[error("cannot read layer")]
    Read(#[source] io::Error),
    /// The layer's content does not match the digest the image declares.
    #[error("layer digest mismatch: expected {expected}, got {actual}")]
    DigestMismatch {
        /// Declared diff-id.
        expected: String,
        /// Computed diff-id.
        actual: String,
    },
    /// An entry has a path that leaves the layer root.
    #[error("layer entry has an unsafe path {0:?}")]
    UnsafePath(String),
    /// An entry has a path component longer than the kernel allows.
    #[error("layer entry {path:?} has a name of {len} bytes, longer than {max}", max = ext4::MAX_NAME)]
    NameTooLong {
        /// The entry's path (cut to 200 characters).
        path: String,
        /// The long component's length.
        len: usize,
    },
    /// An entry carries an extended attribute the kernel would refuse.
    #[error("layer entry {path:?} has a bad extended attribute")]
    BadXattr {
        /// The entry's path.
        path: String,
        /// What is wrong with it.
        #[source]
        source: XattrError,
    },
    /// The layers carry more extended attribute bytes than a squash keeps in memory.
    #[error("the layers carry more than {} MiB of extended attributes", MAX_XATTR_BYTES >> 20)]
    TooManyXattrs,
    /// Writing the normalised tar failed.
    #[error("cannot write temporary file")]
    Temp(#[source] io::Error),
    /// Building the file system failed.
    #[error("cannot build the layer file system")]
    Ext4(#[from] Ext4Error),
}

/// Opens the layer's bytes from the start, each time it is called.
pub trait LayerSource {
    /// A fresh reader over the (possibly compressed) layer.
    fn open(&self) -> io::Result<Box<dyn Read + '_>>;
}

/// Wraps `raw` in the decompressor its magic bytes call for (gzip, zstd, or none).
pub fn decompress<'a>(raw: Box<dyn Read + 'a>) -> io::Result<Box<dyn Read + 'a>> {
    let mut buffered = BufReader::with_capacity(256 * 1024, raw);
    let magic = io::BufRead::fill_buf(&mut buffered)?;
    Ok(if magic.starts_with(&[0x1f, 0x8b]) {
        Box::new(flate2::bufread::MultiGzDecoder::new(buffered))
    } else if magic.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Box::new(zstd::stream::read::Decoder::with_buffer(buffered)?)
    } else {
        Box::new(buffered)
    })
}

struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// Extended attribute bytes (names and values) one squash keeps in memory to write.
pub const MAX_XATTR_BYTES: usize = 64 << 20;

/// Normalises a tar path to a relative path without `.` components; rejects `..` and
/// components longer than the kernel's `NAME_MAX`.
pub(crate) fn clean_path(raw: &Path) -> Result<PathBuf, LayerError> {
    let mut out = PathBuf::new();
    for c in raw.components() {
        match c {
            Component::Normal(p) if p.len() > ext4::MAX_NAME => {
                let path: String = raw.to_string_lossy().chars().take(200).collect();
                return Err(LayerError::NameTooLong { path, len: p.len() });
            }
            Component::Normal(p) => out.push(p),
            Component::CurDir | Component::RootDir => {}
            Component::ParentDir | Component::Prefix(_) => {
                return Err(LayerError::UnsafePath(raw.to_string_lossy().into_owned()))
            }
        }
    }
    Ok(out)
}

/// What reading a layer once tells us.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerStats {
    /// sha256 of the uncompressed tar.
    pub diff_id: String,
    /// Bytes of file content.
    pub content_bytes: u64,
    /// Number of tar entries.
    pub entries: u64,
}

/// Reads a whole layer, checking that it is a well-formed tar with safe paths, and
/// computes its diff-id; with `expected`, a different digest is an error.
pub fn verify(source: &dyn LayerSource, expected: Option<&str>) -> Result<LayerStats, LayerError> {
    let raw = decompress(source.open().map_err(LayerError::Read)?).map_err(LayerError::Read)?;
    let mut reader = HashingReader { inner: raw, hasher: Sha256::new() };
    let mut content_bytes = 0;
    let mut entries = 0;
    {
        let mut archive = tar::Archive::new(&mut reader);
        for entry in archive.entries().map_err(LayerError::Read)? {
            let mut entry = entry.map_err(LayerError::Read)?;
            let path = clean_path(&entry.path().map_err(LayerError::Read)?)?;
            if let EntryType::Link = entry.header().entry_type() {
                clean_path(&entry.link_name().map_err(LayerError::Read)?.unwrap_or_default())?;
            }
            for (name, value) in xattrs(&mut entry, &path)? {
                ext4::check_xattr(&name, &value)
                    .map_err(|source| LayerError::BadXattr { path: path.to_string_lossy().into_owned(), source })?;
            }
            entries += 1;
            content_bytes += entry.header().entry_size().unwrap_or(0);
        }
    }
    // The digest covers the whole stream, including the end-of-archive padding.
    io::copy(&mut reader, &mut io::sink()).map_err(LayerError::Read)?;
    let diff_id = format!("sha256:{}", hex::encode(reader.hasher.finalize()));
    if let Some(expected) = expected {
        if expected != diff_id {
            return Err(LayerError::DigestMismatch { expected: expected.to_owned(), actual: diff_id });
        }
    }
    Ok(LayerStats { diff_id, content_bytes, entries })
}

/// Which layer provides the final version of each path, after whiteouts.
#[derive(Debug, Default)]
struct Merge {
    live: BTreeMap<PathBuf, usize>,
    content_bytes: u64,
    entries: u64,
}

impl Merge {
    /// Drops `path`'s descendants provided by layers below `layer`.
    fn hide_below(&mut self, path: &Path, layer: usize) {
        let doomed: Vec<PathBuf> = self
            .live
            .range::<Path, _>((std::ops::Bound::Excluded(path), std::ops::Bound::Unbounded))
            .take_while(|(p, _)| p.starts_with(path))
            .filter(|(_, l)| **l < layer)
            .map(|(p, _)| p.clone())
            .collect();
        for p in doomed {
            self.live.remove(&p);
        }
    }

    fn add_layer(&mut self, layer: usize, source: &dyn LayerSource) -> Result<(), LayerError> {
        let raw = decompress(source.open().map_err(LayerError::Read)?).map_err(LayerError::Read)?;
        let mut archive = tar::Archive::new(raw);
        for entry in archive.entries().map_err(LayerError::Read)? {
            let entry = entry.map_err(LayerError::Read)?;
            let path = clean_path(&entry.path().map_err(LayerError::Read)?)?;
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let parent = path.parent().map(Path::to_path_buf).unwrap_or_default();
            if name == OPAQUE_MARKER {
                // Everything below this directory from lower layers disappears.
                self.hide_below(&parent, layer);
                continue;
            }
            if let Some(hidden) = name.strip_prefix(WHITEOUT_PREFIX) {
                let target = parent.join(hidden);
                self.live.remove(&target);
                self.hide_below(&target, layer + 1);
                continue;
            }
            if path.as_os_str().is_empty() {
                continue;
            }
            self.entries += 1;
            self.content_bytes += entry.header().entry_size().unwrap_or(0);
            if entry.header().entry_type() != EntryType::Directory {
                // A file replacing a directory hides what was below it.
                self.hide_below(&path, layer);
            }
            self.live.insert(path, layer);
        }
        Ok(())
    }
}

/// What a squash produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SquashStats {
    /// Bytes of file content in the merged tree.
    pub content_bytes: u64,
    /// Hard links dropped because their target did not survive the merge.
    pub dropped_links: u64,
}

/// Merges `layers` (bottom first) into one read-only ext4 image at `out`, applying OCI
/// whiteouts and opaque directories the way a container runtime stacks layers. The
/// image is written to a temporary file beside `out` and renamed.
pub fn squash(layers: &[&dyn LayerSource], out: &Path) -> Result<SquashStats, LayerError> {
    let mut merge = Merge::default();
    for (i, layer) in layers.iter().enumerate() {
        merge.add_layer(i, *layer)?;
    }
    let dir = out.parent().unwrap_or(Path::new("."));
    let merged =
        tempfile::Builder::new().prefix(".layer-").suffix(".tar").tempfile_in(dir).map_err(LayerError::Temp)?;
    let (xattrs, dropped_links) = write_merged(layers, &merge, merged.as_file())?;
    let image =
        tempfile::Builder::new().prefix(".layer-").suffix(".ext4").tempfile_in(dir).map_err(LayerError::Temp)?;
    let size = ext4::estimate_size(merge.content_bytes, merge.entries);
    ext4::build_from_tar(merged.path(), image.path(), size, merge.entries, &xattrs)?;
    image.persist(out).map_err(|e| LayerError::Temp(e.error))?;
    Ok(SquashStats { content_bytes: merge.content_bytes, dropped_links })
}

/// Merges `layers` (bottom first) into one tar at `out`, whiteouts applied: the root file
/// system they make, as `COPY --from` reads it.
pub fn merge_to_tar(layers: &[&dyn LayerSource], out: &File) -> Result<(), LayerError> {
    let mut merge = Merge::default();
    for (i, layer) in layers.iter().enumerate() {
        merge.add_layer(i, *layer)?;
    }
    write_merged(layers, &merge, out)?;
    Ok(())
}

/// Second pass: writes the entries that survived the merge, bottom layer first, into
/// one tar mke2fs can take as is; returns the extended attributes to write after it.
fn write_merged(layers: &[&dyn LayerSource], merge: &Merge, out: &File) -> Result<(Vec<Xattr>, u64), LayerError> {
    let mut builder = tar::Builder::new(io::BufWriter::new(out));
    let mut xattrs = Vec::new();
    let mut xattr_bytes = 0;
    let mut seen_dirs: HashSet<PathBuf> = HashSet::new();
    let mut written: HashSet<PathBuf> = HashSet::new();
    let mut dropped_links = 0;
    for (i, layer) in layers.iter().enumerate() {
        let raw = decompress(layer.open().map_err(LayerError::Read)?).map_err(LayerError::Read)?;
        let mut archive = tar::Archive::new(raw);
        for entry in archive.entries().map_err(LayerError::Read)? {
            let mut entry = entry.map_err(LayerError::Read)?;
            let path = clean_path(&entry.path().map_err(LayerError::Read)?)?;
            if merge.live.get(&path) != Some(&i) {
                continue;
            }
            let kind = entry.header().entry_type();
            let mut header = entry.header().clone();
            let link_target = match kind {
                EntryType::Symlink | EntryType::Link => {
                    let target = entry.link_name().map_err(LayerError::Read)?.unwrap_or_default().into_owned();
                    Some(if kind == EntryType::Link { clean_path(&target)? } else { target })
                }
                _ => None,
            };
            if kind == EntryType::Link && !link_target.as_ref().is_some_and(|t| written.contains(t)) {
                // The file it linked to was replaced or deleted by a later layer.
                dropped_links += 1;
                continue;
            }
            add_missing_parents(&mut builder, &mut seen_dirs, path.parent().unwrap_or(Path::new("")))?;
            for (name, value) in self::xattrs(&mut entry, &path)? {
                xattr_bytes += name.len() + value.len();
                if xattr_bytes > MAX_XATTR_BYTES {
                    return Err(LayerError::TooManyXattrs);
                }
                xattrs.push(Xattr { path: Path::new("/").join(&path), name, value });
            }
            match kind {
                EntryType::Regular | EntryType::Continuous => {
                    header.set_entry_type(EntryType::Regular);
                    builder.append_data(&mut header, &path, &mut entry).map_err(LayerError::Temp)?;
                }
                EntryType::Directory => {
                    seen_dirs.insert(path.clone());
                    builder.append_data(&mut header, &path, io::empty()).map_err(LayerError::Temp)?;
                }
                EntryType::Symlink | EntryType::Link => {
                    header.set_size(0);
                    let target = link_target.expect("links have targets");
                    builder.append_link(&mut header, &path, &target).map_err(LayerError::Temp)?;
                }
                EntryType::Char | EntryType::Block | EntryType::Fifo => {
                    header.set_size(0);
                    builder.append_data(&mut header, &path, io::empty()).map_err(LayerError::Temp)?;
                }
                // PAX/GNU metadata records are consumed by the tar reader; sockets and
                // unknown kinds have no place in an image.
                _ => continue,
            }
            written.insert(path);
        }
    }
    builder.into_inner().and_then(|mut w| io::Write::flush(&mut w)).map_err(LayerError::Temp)?;
    Ok((xattrs, dropped_links))
}

/// The extended attributes (`SCHILY.xattr.<name>` PAX records) of `entry`, whose clean
/// path is `path`; a name that is not UTF-8 is an error.
fn xattrs<R: Read>(entry: &mut tar::Entry<'_, R>, path: &Path) -> Result<Vec<(String, Vec<u8>)>, LayerError> {
    let mut found = Vec::new();
    let Some(exts) = entry.pax_extensions().map_err(LayerError::Read)? else { return Ok(found) };
    for ext in exts {
        let ext = ext.map_err(LayerError::Read)?;
        if let Some(name) = ext.key_bytes().strip_prefix(b"SCHILY.xattr.") {
            let name = String::from_utf8(name.to_vec()).map_err(|_| LayerError::BadXattr {
                path: path.to_string_lossy().into_owned(),
                source: XattrError::NotUtf8,
            })?;
            found.push((name, ext.value_bytes().to_vec()));
        }
    }
    Ok(found)
}

/// Layers may omit directory entries for the parents of their files; mke2fs needs
/// them, so they are added as root-owned 0755 directories (as container runtimes do).
/// A real entry for the same directory later in the stream updates its metadata.
fn add_missing_parents<W: io::Write>(
    builder: &mut tar::Builder<W>,
    seen_dirs: &mut HashSet<PathBuf>,
    dir: &Path,
) -> Result<(), LayerError> {
    let missing: Vec<&Path> =
        dir.ancestors().filter(|a| !a.as_os_str().is_empty()).take_while(|a| !seen_dirs.contains(*a)).collect();
    for ancestor in missing.into_iter().rev() {
        let mut h = Header::new_gnu();
        h.set_entry_type(EntryType::Directory);
        h.set_mode(0o755);
        h.set_size(0);
        builder.append_data(&mut h, ancestor, io::empty()).map_err(LayerError::Temp)?;
        seen_dirs.insert(ancestor.to_path_buf());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_paths() {
        assert_eq!(clean_path(Path::new("./etc/passwd")).unwrap(), PathBuf::from("etc/passwd"));
        assert_eq!(clean_path(Path::new("/abs/x")).unwrap(), PathBuf::from("abs/x"));
        assert!(clean_path(Path::new("a/../../etc")).is_err());
    }

    struct Bytes(Vec<u8>);
    impl LayerSource for Bytes {
        fn open(&self) -> io::Result<Box<dyn Read + '_>> {
            Ok(Box::new(self.0.as_slice()))
        }
    }

    fn tar_with(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, data) in entries {
            let mut h = Header::new_gnu();
            h.set_mode(0o644);
            h.set_size(data.len() as u64);
            b.append_data(&mut h, name, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn verify_hashes_the_whole_stream() {
        let raw = tar_with(&[("etc/a", b"hello")]);
        let s = verify(&Bytes(raw.clone()), None).unwrap();
        assert_eq!(s.diff_id, format!("sha256:{}", hex::encode(Sha256::digest(&raw))));
        assert_eq!(s.content_bytes, 5);
        assert!(matches!(verify(&Bytes(raw), Some("sha256:00")), Err(LayerError::DigestMismatch { .. })));
    }

    #[test]
    fn merge_applies_whiteouts_opaque_dirs_and_replacements() {
        let bottom = tar_with(&[("a/keep", b"1"), ("a/gone", b"2"), ("o/old", b"3"), ("d/x", b"4"), ("f", b"5")]);
        let top = tar_with(&[("a/.wh.gone", b""), ("o/.wh..wh..opq", b""), ("o/new", b"6"), ("d", b"file now")]);
        let mut merge = Merge::default();
        merge.add_layer(0, &Bytes(bottom)).unwrap();
        merge.add_layer(1, &Bytes(top)).unwrap();
        let live: Vec<(String, usize)> =
            merge.live.iter().map(|(p, l)| (p.to_string_lossy().into_owned(), *l)).collect();
        let expected: Vec<(String, usize)> =
            [("a/keep", 0), ("d", 1), ("f", 0), ("o/new", 1)].iter().map(|(p, l)| ((*p).to_owned(), *l)).collect();
        assert_eq!(live, expected);
    }

    #[test]
    fn gzip_and_zstd_are_detected() {
        let raw = tar_with(&[("a", b"x")]);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        io::Write::write_all(&mut gz, &raw).unwrap();
        let gz = gz.finish().unwrap();
        let zst = zstd::encode_all(raw.as_slice(), 1).unwrap();
        let plain = verify(&Bytes(raw), None).unwrap().diff_id;
        assert_eq!(verify(&Bytes(gz), None).unwrap().diff_id, plain);
        assert_eq!(verify(&Bytes(zst), None).unwrap().diff_id, plain);
    }

    #[test]
    fn corrupt_compression_is_an_error() {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        io::Write::write_all(&mut gz, &tar_with(&[("a", &[7u8; 10000])])).unwrap();
        let mut gz = gz.finish().unwrap();
        gz.truncate(gz.len() / 2);
        assert!(matches!(verify(&Bytes(gz), None), Err(LayerError::Read(_))));
    }
}
