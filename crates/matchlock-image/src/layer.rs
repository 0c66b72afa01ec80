//! Converting one OCI layer (a possibly compressed tar) into a read-only ext4 image.

use std::collections::{BTreeSet, HashSet};
use std::fs::File;
use std::io::{self, BufReader, Read};
use std::path::{Component, Path, PathBuf};

use sha2::{Digest, Sha256};
use tar::{EntryType, Header};

use crate::ext4::{self, Ext4Error, Xattr};

const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE_MARKER: &str = ".wh..wh..opq";

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

/// Normalises a tar path to a relative path without `.` components; rejects `..`.
fn clean_path(raw: &Path) -> Result<PathBuf, LayerError> {
    let mut out = PathBuf::new();
    for c in raw.components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::CurDir | Component::RootDir => {}
            Component::ParentDir | Component::Prefix(_) => {
                return Err(LayerError::UnsafePath(raw.to_string_lossy().into_owned()))
            }
        }
    }
    Ok(out)
}

/// What the first pass learns about a layer.
#[derive(Debug, Default)]
struct Scan {
    diff_id: String,
    content_bytes: u64,
    entries: u64,
    /// Directories marked opaque by `.wh..wh..opq`.
    opaque: BTreeSet<PathBuf>,
}

fn scan(source: &dyn LayerSource) -> Result<Scan, LayerError> {
    let raw = decompress(source.open().map_err(LayerError::Read)?).map_err(LayerError::Read)?;
    let mut reader = HashingReader { inner: raw, hasher: Sha256::new() };
    let mut scan = Scan::default();
    {
        let mut archive = tar::Archive::new(&mut reader);
        for entry in archive.entries().map_err(LayerError::Read)? {
            let entry = entry.map_err(LayerError::Read)?;
            let path = clean_path(&entry.path().map_err(LayerError::Read)?)?;
            scan.entries += 1;
            scan.content_bytes += entry.header().entry_size().unwrap_or(0);
            if path.file_name().is_some_and(|n| n == OPAQUE_MARKER) {
                scan.opaque.insert(path.parent().map(Path::to_path_buf).unwrap_or_default());
            }
        }
    }
    // The digest covers the whole stream, including the end-of-archive padding.
    io::copy(&mut reader, &mut io::sink()).map_err(LayerError::Read)?;
    scan.diff_id = format!("sha256:{}", hex::encode(reader.hasher.finalize()));
    Ok(scan)
}

/// Summary of a converted layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConvertedLayer {
    /// sha256 of the uncompressed tar.
    pub diff_id: String,
    /// Bytes of file content in the layer.
    pub content_bytes: u64,
}

/// Converts a layer into an ext4 image at `out` (written to a temporary file in the
/// same directory, then renamed). When `expected_diff_id` is given, the content must
/// hash to it.
pub fn convert(
    source: &dyn LayerSource,
    expected_diff_id: Option<&str>,
    out: &Path,
) -> Result<ConvertedLayer, LayerError> {
    let scan = scan(source)?;
    if let Some(expected) = expected_diff_id {
        if expected != scan.diff_id {
            return Err(LayerError::DigestMismatch { expected: expected.to_owned(), actual: scan.diff_id });
        }
    }
    let dir = out.parent().unwrap_or(Path::new("."));
    let normalised =
        tempfile::Builder::new().prefix(".layer-").suffix(".tar").tempfile_in(dir).map_err(LayerError::Temp)?;
    let xattrs = normalise(source, &scan, normalised.as_file())?;
    let image =
        tempfile::Builder::new().prefix(".layer-").suffix(".ext4").tempfile_in(dir).map_err(LayerError::Temp)?;
    let size = ext4::estimate_size(scan.content_bytes, scan.entries);
    ext4::build_from_tar(normalised.path(), image.path(), size, scan.entries, &xattrs)?;
    image.persist(out).map_err(|e| LayerError::Temp(e.error))?;
    Ok(ConvertedLayer { diff_id: scan.diff_id, content_bytes: scan.content_bytes })
}

/// Layers may omit directory entries for the parents of their files; mke2fs needs
/// them, so they are added as root-owned 0755 directories (as container runtimes do).
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

fn xattr_path(path: &Path) -> String {
    format!("/{}", path.to_string_lossy())
}

/// Second pass: rewrites the layer into a tar mke2fs can take as is. OCI whiteouts
/// become overlayfs whiteouts; extended attributes are returned for debugfs.
fn normalise(source: &dyn LayerSource, scan: &Scan, out: &File) -> Result<Vec<Xattr>, LayerError> {
    let raw = decompress(source.open().map_err(LayerError::Read)?).map_err(LayerError::Read)?;
    let mut archive = tar::Archive::new(raw);
    let mut builder = tar::Builder::new(io::BufWriter::new(out));
    let mut xattrs = Vec::new();
    let mut seen_dirs: HashSet<PathBuf> = HashSet::new();
    for entry in archive.entries().map_err(LayerError::Read)? {
        let mut entry = entry.map_err(LayerError::Read)?;
        let path = clean_path(&entry.path().map_err(LayerError::Read)?)?;
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let parent = path.parent().map(Path::to_path_buf).unwrap_or_default();
        if name == OPAQUE_MARKER {
            continue;
        }
        add_missing_parents(&mut builder, &mut seen_dirs, &parent)?;
        if let Some(hidden) = name.strip_prefix(WHITEOUT_PREFIX) {
            // A whiteout: a 0:0 character device where the deleted file was.
            let mut h = Header::new_gnu();
            h.set_entry_type(EntryType::Char);
            h.set_mode(0);
            h.set_uid(0);
            h.set_gid(0);
            h.set_size(0);
            h.set_device_major(0).map_err(LayerError::Read)?;
            h.set_device_minor(0).map_err(LayerError::Read)?;
            h.set_mtime(entry.header().mtime().unwrap_or(0));
            builder.append_data(&mut h, parent.join(hidden), io::empty()).map_err(LayerError::Temp)?;
            continue;
        }
        if path.as_os_str().is_empty() {
            // The layer root: mke2fs owns the root directory.
            continue;
        }
        let kind = entry.header().entry_type();
        if let Some(exts) = entry.pax_extensions().map_err(LayerError::Read)? {
            for ext in exts {
                let ext = ext.map_err(LayerError::Read)?;
                if let Some(attr) = ext.key().ok().and_then(|k| k.strip_prefix("SCHILY.xattr.")) {
                    xattrs.push(Xattr {
                        path: xattr_path(&path),
                        name: attr.to_owned(),
                        value: ext.value_bytes().to_vec(),
                    });
                }
            }
        }
        let mut header = entry.header().clone();
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
                let target = entry.link_name().map_err(LayerError::Read)?.unwrap_or_default().into_owned();
                let target = if kind == EntryType::Link { clean_path(&target)? } else { target };
                header.set_size(0);
                builder.append_link(&mut header, &path, &target).map_err(LayerError::Temp)?;
            }
            EntryType::Char | EntryType::Block | EntryType::Fifo => {
                header.set_size(0);
                builder.append_data(&mut header, &path, io::empty()).map_err(LayerError::Temp)?;
            }
            // PAX/GNU metadata records are consumed by the tar reader; sockets and
            // unknown kinds have no place in an image.
            _ => {}
        }
    }
    for dir in &scan.opaque {
        if dir.as_os_str().is_empty() {
            continue;
        }
        add_missing_parents(&mut builder, &mut seen_dirs, dir)?;
        xattrs.push(Xattr { path: xattr_path(dir), name: "trusted.overlay.opaque".into(), value: b"y".to_vec() });
    }
    builder.into_inner().and_then(|mut w| io::Write::flush(&mut w)).map_err(LayerError::Temp)?;
    Ok(xattrs)
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
    fn scan_hashes_whole_stream_and_finds_opaque_dirs() {
        let raw = tar_with(&[("etc/.wh..wh..opq", b""), ("etc/a", b"hello")]);
        let s = scan(&Bytes(raw.clone())).unwrap();
        assert_eq!(s.diff_id, format!("sha256:{}", hex::encode(Sha256::digest(&raw))));
        assert!(s.opaque.contains(Path::new("etc")));
        assert_eq!(s.content_bytes, 5);
    }

    #[test]
    fn gzip_and_zstd_are_detected() {
        let raw = tar_with(&[("a", b"x")]);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        io::Write::write_all(&mut gz, &raw).unwrap();
        let gz = gz.finish().unwrap();
        let zst = zstd::encode_all(raw.as_slice(), 1).unwrap();
        let plain = scan(&Bytes(raw)).unwrap().diff_id;
        assert_eq!(scan(&Bytes(gz)).unwrap().diff_id, plain);
        assert_eq!(scan(&Bytes(zst)).unwrap().diff_id, plain);
    }

    #[test]
    fn corrupt_compression_is_an_error() {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        io::Write::write_all(&mut gz, &tar_with(&[("a", &[7u8; 10000])])).unwrap();
        let mut gz = gz.finish().unwrap();
        gz.truncate(gz.len() / 2);
        assert!(matches!(scan(&Bytes(gz)), Err(LayerError::Read(_))));
    }
}
