//! Reading image tarballs: `docker save` output and OCI image layouts.
//!
//! The tarball is spooled to a file first (stdin cannot seek, and `manifest.json` may
//! come last), then indexed once; blobs are read in place by offset.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Component, Path, PathBuf};

use serde::Deserialize;

use crate::config::RawImageConfig;
use crate::layer::LayerSource;

/// Errors reading an image tarball.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    /// The tarball is not a readable tar.
    #[error("not a valid image tarball")]
    Tar(#[source] io::Error),
    /// A file the format requires is missing.
    #[error("image tarball has no {0}")]
    Missing(String),
    /// A JSON document does not parse.
    #[error("invalid {what} in image tarball")]
    Json {
        /// Which document.
        what: String,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// The tarball holds no image for this host.
    #[error("image tarball has no linux/amd64 image")]
    NoPlatform,
    /// The image's layers and its config disagree.
    #[error("image has {layers} layers but its config lists {diff_ids} diff-ids")]
    LayerCount {
        /// Layers in the manifest.
        layers: usize,
        /// Diff-ids in the config.
        diff_ids: usize,
    },
}

#[derive(Debug, Clone, Copy)]
struct Span {
    offset: u64,
    len: u64,
}

/// An indexed image tarball on disk.
#[derive(Debug)]
pub struct ImageArchive {
    file: File,
    entries: HashMap<PathBuf, Span>,
    symlinks: HashMap<PathBuf, PathBuf>,
}

/// One image found in an archive.
#[derive(Debug)]
pub struct ArchiveImage {
    /// The raw config document (its sha256 is the image id).
    pub config_bytes: Vec<u8>,
    /// The parsed config.
    pub config: RawImageConfig,
    /// Paths of the layer blobs in the archive, bottom first.
    pub layers: Vec<PathBuf>,
    /// Tags the archive records for this image (docker save only).
    pub repo_tags: Vec<String>,
}

fn normalise(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::ParentDir => {
                out.pop();
            }
            _ => {}
        }
    }
    out
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerManifestEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Descriptor {
    #[serde(default)]
    media_type: String,
    digest: String,
    #[serde(default)]
    platform: Option<Platform>,
}

#[derive(Deserialize)]
struct Platform {
    architecture: String,
    os: String,
}

#[derive(Deserialize)]
struct OciIndex {
    manifests: Vec<Descriptor>,
}

#[derive(Deserialize)]
struct OciManifest {
    config: Descriptor,
    layers: Vec<Descriptor>,
}

fn parse<T: for<'de> Deserialize<'de>>(what: &str, bytes: &[u8]) -> Result<T, ArchiveError> {
    serde_json::from_slice(bytes).map_err(|source| ArchiveError::Json { what: what.to_owned(), source })
}

fn blob_path(digest: &str) -> PathBuf {
    PathBuf::from("blobs").join(digest.replacen(':', "/", 1))
}

impl ImageArchive {
    /// Indexes the tarball in `file`.
    pub fn open(mut file: File) -> Result<Self, ArchiveError> {
        file.seek(SeekFrom::Start(0)).map_err(ArchiveError::Tar)?;
        let mut entries = HashMap::new();
        let mut symlinks = HashMap::new();
        {
            let mut archive = tar::Archive::new(&mut file);
            for entry in archive.entries().map_err(ArchiveError::Tar)? {
                let entry = entry.map_err(ArchiveError::Tar)?;
                let path = normalise(&entry.path().map_err(ArchiveError::Tar)?);
                match entry.header().entry_type() {
                    tar::EntryType::Regular | tar::EntryType::Continuous => {
                        entries.insert(path, Span { offset: entry.raw_file_position(), len: entry.size() });
                    }
                    tar::EntryType::Symlink => {
                        if let Ok(Some(target)) = entry.link_name() {
                            let resolved = normalise(&path.parent().unwrap_or(Path::new("")).join(target));
                            symlinks.insert(path, resolved);
                        }
                    }
                    _ => {}
                }
            }
        }
        if entries.is_empty() {
            return Err(ArchiveError::Missing("files (empty or not a tar)".into()));
        }
        Ok(Self { file, entries, symlinks })
    }

    fn span(&self, path: &Path) -> Option<Span> {
        let mut p = normalise(path);
        for _ in 0..8 {
            if let Some(span) = self.entries.get(&p) {
                return Some(*span);
            }
            p = self.symlinks.get(&p)?.clone();
        }
        None
    }

    /// Reads a whole (small) file of the archive.
    pub fn read(&self, path: &Path) -> Result<Vec<u8>, ArchiveError> {
        let span = self.span(path).ok_or_else(|| ArchiveError::Missing(path.display().to_string()))?;
        let mut buf = Vec::with_capacity(span.len.min(64 << 20) as usize);
        self.reader(span).map_err(ArchiveError::Tar)?.read_to_end(&mut buf).map_err(ArchiveError::Tar)?;
        Ok(buf)
    }

    fn reader(&self, span: Span) -> io::Result<SpanReader<'_>> {
        Ok(SpanReader { file: &self.file, pos: span.offset, end: span.offset + span.len })
    }

    /// A [`LayerSource`] for the blob at `path`.
    pub fn layer(&self, path: &Path) -> Result<ArchiveLayer<'_>, ArchiveError> {
        let span = self.span(path).ok_or_else(|| ArchiveError::Missing(path.display().to_string()))?;
        Ok(ArchiveLayer { archive: self, span })
    }

    /// Finds the image: `manifest.json` (docker save) first, else `index.json` (OCI).
    pub fn image(&self) -> Result<ArchiveImage, ArchiveError> {
        let image = if self.span(Path::new("manifest.json")).is_some() {
            let entries: Vec<DockerManifestEntry> = parse("manifest.json", &self.read(Path::new("manifest.json"))?)?;
            let entry =
                entries.into_iter().next().ok_or_else(|| ArchiveError::Missing("image in manifest.json".into()))?;
            let config_bytes = self.read(Path::new(&entry.config))?;
            ArchiveImage {
                config: parse("image config", &config_bytes)?,
                config_bytes,
                layers: entry.layers.iter().map(PathBuf::from).collect(),
                repo_tags: entry.repo_tags.unwrap_or_default(),
            }
        } else {
            let index: OciIndex = parse("index.json", &self.read(Path::new("index.json"))?)?;
            let manifest = self.oci_manifest(&index, 0)?;
            let config_bytes = self.read(&blob_path(&manifest.config.digest))?;
            ArchiveImage {
                config: parse("image config", &config_bytes)?,
                config_bytes,
                layers: manifest.layers.iter().map(|d| blob_path(&d.digest)).collect(),
                repo_tags: Vec::new(),
            }
        };
        if image.layers.len() != image.config.rootfs.diff_ids.len() {
            return Err(ArchiveError::LayerCount {
                layers: image.layers.len(),
                diff_ids: image.config.rootfs.diff_ids.len(),
            });
        }
        Ok(image)
    }

    /// Walks an index down to the linux/amd64 image manifest.
    fn oci_manifest(&self, index: &OciIndex, depth: u8) -> Result<OciManifest, ArchiveError> {
        if depth > 4 {
            return Err(ArchiveError::NoPlatform);
        }
        let pick = index
            .manifests
            .iter()
            .find(|d| d.platform.as_ref().is_some_and(|p| p.os == "linux" && p.architecture == "amd64"))
            .or_else(|| index.manifests.iter().find(|d| d.platform.is_none()))
            .ok_or(ArchiveError::NoPlatform)?;
        let bytes = self.read(&blob_path(&pick.digest))?;
        if pick.media_type.contains("index") || pick.media_type.contains("manifest.list") {
            let nested: OciIndex = parse("image index", &bytes)?;
            return self.oci_manifest(&nested, depth + 1);
        }
        let value: serde_json::Value = parse("image manifest", &bytes)?;
        if value.get("manifests").is_some() {
            let nested: OciIndex = parse("image index", &bytes)?;
            return self.oci_manifest(&nested, depth + 1);
        }
        parse("image manifest", &bytes)
    }
}

/// A layer blob inside an [`ImageArchive`].
#[derive(Debug)]
pub struct ArchiveLayer<'a> {
    archive: &'a ImageArchive,
    span: Span,
}

impl LayerSource for ArchiveLayer<'_> {
    fn open(&self) -> io::Result<Box<dyn Read + '_>> {
        Ok(Box::new(io::BufReader::with_capacity(256 * 1024, self.archive.reader(self.span)?)))
    }
}

/// Reads a byte range of a file with positioned reads, so readers never share an offset.
struct SpanReader<'a> {
    file: &'a File,
    pos: u64,
    end: u64,
}

impl Read for SpanReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let want = buf.len().min((self.end - self.pos) as usize);
        if want == 0 {
            return Ok(0);
        }
        let n = std::os::unix::fs::FileExt::read_at(self.file, &mut buf[..want], self.pos)?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "image tarball is truncated"));
        }
        self.pos += n as u64;
        Ok(n)
    }
}
