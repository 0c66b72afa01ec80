//! The image store under `~/.cache/matchlock/images`.
//!
//! - `blobs/sha256_<diff-id>.layer`: each layer as received (compressed or not),
//!   verified against its diff-id, stored once however many images use it.
//! - `blobs/squash_<chain>.ext4`: the read-only root file system of a stack of layers
//!   (whiteouts applied), keyed by the hash of the diff-id chain, shared by every image
//!   with that stack. This is the one lower disk a sandbox boots.
//! - `metadata.db`: images, their layers and root file system (SQLite, WAL,
//!   `user_version` migrations). Blobs no image references are reclaimed by
//!   [`Store::gc`], which also runs after [`Store::remove`].

use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use matchlock_api::paths::lock_file;
use rusqlite::{params, Connection, OptionalExtension};
use sha2::{Digest, Sha256};

use crate::archive::{ArchiveError, ImageArchive};
use crate::config::ImageConfig;
use crate::layer::{self, LayerError, LayerSource};

/// Schema migrations, applied in order; `PRAGMA user_version` records how many ran.
const MIGRATIONS: &[&str] = &[
    "CREATE TABLE images (
        tag TEXT PRIMARY KEY,
        digest TEXT NOT NULL,
        size INTEGER NOT NULL,
        source TEXT NOT NULL,
        config_json TEXT NOT NULL,
        created_at INTEGER NOT NULL
    );
    CREATE TABLE layers (
        diff_id TEXT PRIMARY KEY,
        fs_type TEXT NOT NULL,
        size INTEGER NOT NULL,
        created_at INTEGER NOT NULL
    );
    CREATE TABLE image_layers (
        tag TEXT NOT NULL REFERENCES images(tag) ON DELETE CASCADE,
        ordinal INTEGER NOT NULL,
        diff_id TEXT NOT NULL REFERENCES layers(diff_id),
        PRIMARY KEY (tag, ordinal)
    );",
    // Layers are kept as received and images boot one squashed root file system; the
    // per-layer ext4 images of version 1 are dropped (the store is a cache).
    "DELETE FROM image_layers;
    DELETE FROM images;
    DELETE FROM layers;
    ALTER TABLE images ADD COLUMN rootfs TEXT NOT NULL DEFAULT '';",
    // `matchlock build`'s step cache: a step's key to the layer it made (NULL: none).
    "CREATE TABLE build_cache (
        key TEXT PRIMARY KEY,
        diff_id TEXT,
        created_at INTEGER NOT NULL
    );",
];

/// The `source` of the hidden images a build boots its steps from.
pub const BUILD_STEP_SOURCE: &str = "build-step";

/// Errors from the image store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The metadata database failed.
    #[error("image metadata database error")]
    Db(#[from] rusqlite::Error),
    /// A file in the store could not be read or written.
    #[error("image store I/O error on {path}")]
    Io {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The tarball could not be read.
    #[error("cannot import image")]
    Archive(#[from] ArchiveError),
    /// A layer is corrupt or does not match its digest.
    #[error("layer {index} of {total} is unusable")]
    Layer {
        /// 1-based layer number.
        index: usize,
        /// Number of layers.
        total: usize,
        /// Why.
        #[source]
        source: LayerError,
    },
    /// Building the root file system failed.
    #[error("cannot build the root file system")]
    Squash(#[source] LayerError),
    /// A directory tree could not become a root file system.
    #[error("cannot build a root file system from a directory")]
    Directory(#[source] crate::ext4::Ext4Error),
    /// Stored metadata is inconsistent (a blob is missing, or JSON is corrupt).
    #[error("image store is inconsistent: {0}")]
    Corrupt(String),
    /// The tag is not a valid image reference.
    #[error("invalid image reference {0:?}")]
    InvalidTag(String),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io { path: path.to_owned(), source }
}

/// What an import produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportSummary {
    /// The tag the image is stored under.
    pub tag: String,
    /// `sha256:` digest of the image config.
    pub digest: String,
    /// Number of layers.
    pub layers: usize,
    /// Uncompressed content size in bytes.
    pub size: u64,
}

/// One row of `image ls`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRow {
    /// Tag.
    pub tag: String,
    /// `import`, `registry` or `tag`.
    pub source: String,
    /// Uncompressed content size in bytes.
    pub size: u64,
    /// Unix seconds.
    pub created: i64,
}

/// A stored image, ready to boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRecord {
    /// Its tag.
    pub tag: String,
    /// `sha256:` digest (of the manifest for pulled images, of the config for imports).
    pub digest: String,
    /// Runtime settings.
    pub config: ImageConfig,
    /// The squashed, read-only root file system.
    pub rootfs: PathBuf,
    /// Uncompressed content size in bytes.
    pub size: u64,
}

/// Adds `:latest` to a reference without a tag or digest.
pub fn normalize_tag(reference: &str) -> Result<String, StoreError> {
    let valid = !reference.is_empty()
        && reference.len() <= 255
        && reference.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-/:@".contains(&b))
        && !reference.starts_with(['/', ':', '@', '.', '-']);
    if !valid {
        return Err(StoreError::InvalidTag(reference.to_owned()));
    }
    let last = reference.rsplit('/').next().unwrap_or(reference);
    if last.contains(':') || last.contains('@') {
        Ok(reference.to_owned())
    } else {
        Ok(format!("{reference}:latest"))
    }
}

fn now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

/// File name of the root file system of a layer chain.
/// Content bytes and entries of the tree `dir` (symbolic links not followed).
fn tree_size(dir: &Path) -> io::Result<(u64, u64)> {
    let (mut bytes, mut entries) = (0u64, 1u64);
    let mut pending = vec![dir.to_owned()];
    while let Some(d) = pending.pop() {
        for entry in fs::read_dir(&d)? {
            let entry = entry?;
            let meta = entry.metadata()?;
            entries += 1;
            bytes += meta.len();
            if meta.is_dir() {
                pending.push(entry.path());
            }
        }
    }
    Ok((bytes, entries))
}

fn rootfs_name(diff_ids: &[String]) -> String {
    let mut h = Sha256::new();
    h.update(b"matchlock-squash-v1\n");
    for d in diff_ids {
        h.update(d.as_bytes());
        h.update(b"\n");
    }
    format!("squash_{}.ext4", hex::encode(h.finalize()))
}

/// A stored layer blob.
struct FileSource(PathBuf);

impl LayerSource for FileSource {
    fn open(&self) -> io::Result<Box<dyn Read + '_>> {
        Ok(Box::new(io::BufReader::with_capacity(256 * 1024, fs::File::open(&self.0)?)))
    }
}

/// The store at `~/.cache/matchlock/images`.
#[derive(Debug)]
pub struct Store {
    root: PathBuf,
    db: Connection,
    build_cache_bound: u64,
}

/// Content bytes of the layers the build cache alone keeps (no image uses them) beyond
/// which its oldest entries are forgotten: 10 GiB.
pub const BUILD_CACHE_BOUND: u64 = 10 << 30;

impl Store {
    /// Opens (creating if needed) the store under `root`.
    pub fn open(root: &Path) -> Result<Self, StoreError> {
        // Private to the user, as everything matchlock keeps (files are made 0600).
        for dir in [root.to_owned(), root.join("blobs"), root.join("tmp")] {
            matchlock_api::paths::create_private_dir(&dir).map_err(io_err(&dir))?;
        }
        // Switching a new database to WAL and migrating it must not race another process
        // doing the same (SQLite reports "locked" at once there, busy timeout or not).
        let lock_path = root.join("metadata.db.lock");
        let lock = lock_file(&lock_path, true).map_err(io_err(&lock_path))?;
        let db_path = root.join("metadata.db");
        matchlock_api::paths::make_private_file(&db_path).map_err(io_err(&db_path))?;
        let db = Connection::open(&db_path)?;
        db.busy_timeout(std::time::Duration::from_secs(15))?;
        db.pragma_update(None, "journal_mode", "WAL")?;
        db.pragma_update(None, "synchronous", "NORMAL")?;
        db.pragma_update(None, "foreign_keys", "ON")?;
        let mut store = Self { root: root.to_owned(), db, build_cache_bound: BUILD_CACHE_BOUND };
        store.migrate()?;
        drop(lock);
        Ok(store)
    }

    fn migrate(&mut self) -> Result<(), StoreError> {
        let tx = self.db.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let version: usize = tx.pragma_query_value(None, "user_version", |r| r.get(0))?;
        for migration in MIGRATIONS.iter().skip(version) {
            tx.execute_batch(migration)?;
        }
        tx.pragma_update(None, "user_version", MIGRATIONS.len())?;
        tx.commit()?;
        Ok(())
    }

    /// Path of a stored layer.
    pub fn layer_path(&self, diff_id: &str) -> PathBuf {
        self.root.join("blobs").join(format!("{}.layer", diff_id.replace([':', '/'], "_")))
    }

    /// The directory for temporary files of this store (same file system as the blobs).
    pub fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    fn lock_file(&self, name: &str, exclusive: bool) -> Result<fs::File, StoreError> {
        let path = self.root.join(name);
        lock_file(&path, exclusive).map_err(io_err(&path))
    }

    /// Takes the store-wide lock: shared while adding images, exclusive for [`Store::gc`],
    /// so a collection never deletes a blob an import is about to reference.
    pub fn lock(&self, exclusive: bool) -> Result<fs::File, StoreError> {
        self.lock_file("store.lock", exclusive)
    }

    /// Takes the lock of one blob, so two processes never write it twice.
    fn lock_blob(&self, name: &str) -> Result<fs::File, StoreError> {
        self.lock_file(&format!("blobs/{name}.lock"), true)
    }

    /// The content size of a stored layer, if it is stored.
    pub fn layer_size(&self, diff_id: &str) -> Result<Option<u64>, StoreError> {
        let known: Option<i64> = self
            .db
            .query_row("SELECT size FROM layers WHERE diff_id = ?1", params![diff_id], |r| r.get(0))
            .optional()?;
        Ok(known.filter(|_| self.layer_path(diff_id).exists()).map(|s| s as u64))
    }

    /// Stores a layer received in `file` (compressed or not) after checking that it is a
    /// well-formed tar whose content hashes to `diff_id`; returns its content size. A
    /// layer already stored is not written again.
    pub fn add_layer(&self, file: tempfile::NamedTempFile, diff_id: &str) -> Result<u64, LayerError> {
        let _lock =
            self.lock_blob(&diff_id.replace([':', '/'], "_")).map_err(|e| LayerError::Temp(io::Error::other(e)))?;
        if let Ok(Some(size)) = self.layer_size(diff_id) {
            return Ok(size);
        }
        let stats = layer::verify(&FileSource(file.path().to_owned()), Some(diff_id))?;
        file.persist(self.layer_path(diff_id)).map_err(|e| LayerError::Temp(e.error))?;
        self.db
            .execute(
                "INSERT OR REPLACE INTO layers (diff_id, fs_type, size, created_at) VALUES (?1, 'layer', ?2, ?3)",
                params![diff_id, stats.content_bytes as i64, now()],
            )
            .map_err(|e| LayerError::Temp(io::Error::other(e)))?;
        Ok(stats.content_bytes)
    }

    /// The root file system of a layer chain, squashing it from the stored layers once.
    pub fn ensure_rootfs(&self, diff_ids: &[String]) -> Result<PathBuf, StoreError> {
        let name = rootfs_name(diff_ids);
        let path = self.root.join("blobs").join(&name);
        if path.exists() {
            return Ok(path);
        }
        let _lock = self.lock_blob(&name)?;
        if path.exists() {
            return Ok(path);
        }
        let sources: Vec<FileSource> = diff_ids.iter().map(|d| FileSource(self.layer_path(d))).collect();
        let refs: Vec<&dyn LayerSource> = sources.iter().map(|s| s as &dyn LayerSource).collect();
        layer::squash(&refs, &path).map_err(StoreError::Squash)?;
        Ok(path)
    }

    /// Imports a `docker save` or OCI-layout tarball from `input` under `tag`.
    pub fn import(&mut self, tag: &str, input: &mut dyn Read) -> Result<ImportSummary, StoreError> {
        let tag = normalize_tag(tag)?;
        let _lock = self.lock(false)?;
        let tmp_dir = self.tmp_dir();
        let mut spool = tempfile::tempfile_in(&tmp_dir).map_err(io_err(&tmp_dir))?;
        io::copy(input, &mut spool).map_err(io_err(&tmp_dir))?;
        let archive = ImageArchive::open(spool)?;
        let image = archive.image()?;
        let diff_ids = &image.config.rootfs.diff_ids;
        let total = image.layers.len();
        let mut size = 0;
        for (i, (path, diff_id)) in image.layers.iter().zip(diff_ids).enumerate() {
            let layer_err = |source| StoreError::Layer { index: i + 1, total, source };
            if let Some(s) = self.layer_size(diff_id)? {
                size += s;
                continue;
            }
            let mut file = tempfile::NamedTempFile::new_in(&tmp_dir).map_err(io_err(&tmp_dir))?;
            let source = archive.layer(path)?;
            let mut blob = source.open().map_err(|e| layer_err(LayerError::Read(e)))?;
            io::copy(&mut blob, file.as_file_mut()).map_err(|e| layer_err(LayerError::Read(e)))?;
            drop(blob);
            size += self.add_layer(file, diff_id).map_err(layer_err)?;
        }
        let rootfs = self.ensure_rootfs(diff_ids)?;
        let digest = format!("sha256:{}", hex::encode(Sha256::digest(&image.config_bytes)));
        self.save(&tag, "import", &digest, &image.config.image_config(), diff_ids, size, &rootfs)?;
        Ok(ImportSummary { tag, digest, layers: total, size })
    }

    /// The layers of image `tag`, bottom first.
    pub fn diff_ids(&self, tag: &str) -> Result<Vec<String>, StoreError> {
        let mut stmt = self.db.prepare("SELECT diff_id FROM image_layers WHERE tag = ?1 ORDER BY ordinal")?;
        let rows = stmt.query_map(params![tag], |r| r.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Stores the image `tag`: `base`'s layers, then the layer tar in `layer` (content
    /// digest `diff_id`, checked), with `config`; `source` says how it was made (`commit`).
    pub fn add_layer_image(
        &mut self,
        tag: &str,
        base: &ImageRecord,
        layer: tempfile::NamedTempFile,
        diff_id: &str,
        config: &ImageConfig,
        source: &str,
    ) -> Result<ImportSummary, StoreError> {
        let _lock = self.lock(false)?;
        let mut diff_ids = self.diff_ids(&base.tag)?;
        let total = diff_ids.len() + 1;
        self.add_layer(layer, diff_id).map_err(|source| StoreError::Layer { index: total, total, source })?;
        diff_ids.push(diff_id.to_owned());
        self.save_chain(tag, source, config, &diff_ids)
    }

    /// Stores the image `tag` made of the stored layers `diff_ids` (bottom first) with
    /// `config`, squashing its root file system if no image has it yet.
    pub fn save_chain(
        &mut self,
        tag: &str,
        source: &str,
        config: &ImageConfig,
        diff_ids: &[String],
    ) -> Result<ImportSummary, StoreError> {
        let tag = normalize_tag(tag)?;
        let mut size = 0;
        for diff_id in diff_ids {
            size += self
                .layer_size(diff_id)?
                .ok_or_else(|| StoreError::Corrupt(format!("layer {diff_id} is not stored")))?;
        }
        let rootfs = self.ensure_rootfs(diff_ids)?;
        let digest = format!("sha256:{}", hex::encode(Sha256::digest(config.to_oci_json(diff_ids))));
        self.save(&tag, source, &digest, config, diff_ids, size, &rootfs)?;
        Ok(ImportSummary { tag, digest, layers: diff_ids.len(), size })
    }

    /// The layer a build step with cache `key` made before: `Some(None)` when it made none,
    /// `None` when the step is not cached (or its layer is gone).
    pub fn cached_step(&self, key: &str) -> Result<Option<Option<String>>, StoreError> {
        let row: Option<Option<String>> = self
            .db
            .query_row("SELECT diff_id FROM build_cache WHERE key = ?1", params![key], |r| r.get(0))
            .optional()?;
        Ok(match row {
            Some(Some(diff_id)) if self.layer_size(&diff_id)?.is_none() => None,
            other => other,
        })
    }

    /// Records that the build step `key` made the stored layer `diff_id` (or none), then
    /// forgets the oldest entries while the layers only the cache keeps exceed its bound
    /// ([`BUILD_CACHE_BOUND`]); their layers go at the next [`Store::gc`].
    pub fn cache_step(&self, key: &str, diff_id: Option<&str>) -> Result<(), StoreError> {
        self.db.execute(
            "INSERT OR REPLACE INTO build_cache (key, diff_id, created_at) VALUES (?1, ?2, ?3)",
            params![key, diff_id, now()],
        )?;
        while self.cache_only_bytes()? > self.build_cache_bound {
            let forgotten = self.db.execute(
                "DELETE FROM build_cache WHERE rowid = (SELECT rowid FROM build_cache
                   WHERE diff_id IS NOT NULL AND diff_id NOT IN (SELECT diff_id FROM image_layers)
                   ORDER BY created_at, rowid LIMIT 1)",
                [],
            )?;
            if forgotten == 0 {
                break;
            }
        }
        Ok(())
    }

    /// Content bytes of the layers that only the build cache keeps.
    fn cache_only_bytes(&self) -> Result<u64, StoreError> {
        let bytes: i64 = self.db.query_row(
            "SELECT COALESCE(SUM(size), 0) FROM layers WHERE diff_id IN
               (SELECT diff_id FROM build_cache WHERE diff_id IS NOT NULL)
               AND diff_id NOT IN (SELECT diff_id FROM image_layers)",
            [],
            |r| r.get(0),
        )?;
        Ok(u64::try_from(bytes).unwrap_or(0))
    }

    /// Sets the bound of [`Store::cache_step`] (default [`BUILD_CACHE_BOUND`]).
    pub fn set_build_cache_bound(&mut self, bytes: u64) {
        self.build_cache_bound = bytes;
    }

    /// Forgets cached build steps (their layers go at the next [`Store::gc`]): every one
    /// with `all`, else those whose layer no image uses. Returns how many.
    pub fn prune_build_cache(&self, all: bool) -> Result<usize, StoreError> {
        let sql = if all {
            "DELETE FROM build_cache"
        } else {
            "DELETE FROM build_cache WHERE diff_id IS NOT NULL AND diff_id NOT IN (SELECT diff_id FROM image_layers)"
        };
        Ok(self.db.execute(sql, [])?)
    }

    /// The merged root file system of `diff_ids` as one tar, in an anonymous temporary file
    /// rewound to its start.
    pub fn merged_tar(&self, diff_ids: &[String]) -> Result<fs::File, StoreError> {
        let tmp = self.tmp_dir();
        let mut out = tempfile::tempfile_in(&tmp).map_err(io_err(&tmp))?;
        let sources: Vec<FileSource> = diff_ids.iter().map(|d| FileSource(self.layer_path(d))).collect();
        let refs: Vec<&dyn LayerSource> = sources.iter().map(|s| s as &dyn LayerSource).collect();
        layer::merge_to_tar(&refs, &out).map_err(StoreError::Squash)?;
        io::Seek::rewind(&mut out).map_err(io_err(&tmp))?;
        Ok(out)
    }

    /// The content of the regular file `path` (relative, like `etc/passwd`) in the root
    /// file system of `diff_ids`, if it has one.
    pub fn read_chain_file(&self, diff_ids: &[String], path: &Path) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.chain_entry(diff_ids, path, true)?.and_then(|(kind, content)| kind.is_file().then_some(content)))
    }

    /// Whether the root file system of `diff_ids` has a directory at `path` (relative).
    pub fn chain_has_dir(&self, diff_ids: &[String], path: &Path) -> Result<bool, StoreError> {
        Ok(self.chain_entry(diff_ids, path, false)?.is_some_and(|(kind, _)| kind.is_dir()))
    }

    /// The last version of `path` in the layers `diff_ids` (its kind, and its content if
    /// `read`), whiteouts of it or of a directory above it applied.
    fn chain_entry(
        &self,
        diff_ids: &[String],
        path: &Path,
        read: bool,
    ) -> Result<Option<(tar::EntryType, Vec<u8>)>, StoreError> {
        let mut found = None;
        for diff_id in diff_ids {
            let stored = self.layer_path(diff_id);
            let raw = fs::File::open(&stored).map_err(io_err(&stored))?;
            let mut archive = tar::Archive::new(layer::decompress(Box::new(raw)).map_err(io_err(&stored))?);
            for entry in archive.entries().map_err(io_err(&stored))? {
                let mut entry = entry.map_err(io_err(&stored))?;
                let Ok(Ok(name)) = entry.path().map(|p| layer::clean_path(&p)) else { continue };
                let file_name = name.file_name().and_then(|n| n.to_str()).unwrap_or_default();
                let parent = name.parent().unwrap_or(Path::new(""));
                let hides = if file_name == layer::OPAQUE_MARKER {
                    path.starts_with(parent) && path != parent
                } else if let Some(hidden) = file_name.strip_prefix(layer::WHITEOUT_PREFIX) {
                    path.starts_with(parent.join(hidden))
                } else {
                    false
                };
                if hides {
                    found = None;
                } else if name == path {
                    let mut content = Vec::new();
                    if read {
                        entry.read_to_end(&mut content).map_err(io_err(&stored))?;
                    }
                    found = Some((entry.header().entry_type(), content));
                }
            }
        }
        Ok(found)
    }

    /// The uncompressed tar of a stored layer (stored as pulled, maybe compressed), in an
    /// anonymous temporary file rewound to its start, and its size; its sha256 is `diff_id`.
    pub fn plain_layer(&self, diff_id: &str) -> Result<(fs::File, u64), StoreError> {
        let stored = self.layer_path(diff_id);
        let mut plain = tempfile::tempfile_in(self.tmp_dir()).map_err(io_err(&stored))?;
        let raw = fs::File::open(&stored).map_err(io_err(&stored))?;
        let size = io::copy(&mut layer::decompress(Box::new(raw)).map_err(io_err(&stored))?, &mut plain)
            .map_err(io_err(&stored))?;
        io::Seek::rewind(&mut plain).map_err(io_err(&stored))?;
        Ok((plain, size))
    }

    /// Writes image `reference` to `out` as a `docker save` archive (`manifest.json`, the
    /// config, one uncompressed `layer.tar` per layer), which `docker load`, skopeo
    /// (`docker-archive:`) and `image import` read.
    pub fn export(&self, reference: &str, out: &mut dyn io::Write) -> Result<(), StoreError> {
        let image = self.get(reference)?.ok_or_else(|| StoreError::Corrupt(format!("no image {reference}")))?;
        let diff_ids = self.diff_ids(&image.tag)?;
        let config = image.config.to_oci_json(&diff_ids);
        let config_name = format!("{}.json", hex::encode(Sha256::digest(&config)));
        let mut tar = tar::Builder::new(out);
        let add = |tar: &mut tar::Builder<&mut dyn io::Write>, name: &str, size: u64, data: &mut dyn Read| {
            let mut header = tar::Header::new_ustar();
            header.set_mode(0o644);
            header.set_size(size);
            tar.append_data(&mut header, name, data)
        };
        let write_err = |e: io::Error| StoreError::Io { path: PathBuf::from("the export"), source: e };
        let mut layer_names = Vec::new();
        for diff_id in &diff_ids {
            let (mut plain, size) = self.plain_layer(diff_id)?;
            let name = format!("{}/layer.tar", diff_id.trim_start_matches("sha256:"));
            add(&mut tar, &name, size, &mut plain).map_err(write_err)?;
            layer_names.push(name);
        }
        add(&mut tar, &config_name, config.len() as u64, &mut config.as_slice()).map_err(write_err)?;
        let manifest = serde_json::to_vec(&serde_json::json!([
            {"Config": config_name, "RepoTags": [image.tag], "Layers": layer_names}
        ]))
        .expect("the manifest serializes");
        add(&mut tar, "manifest.json", manifest.len() as u64, &mut manifest.as_slice()).map_err(write_err)?;
        tar.into_inner().and_then(|out| out.flush()).map_err(write_err)
    }

    /// Stores the directory tree `dir` (a root file system another engine prepared, e.g.
    /// containerd's snapshot) as the image `tag` with `config` and no layers; `key` names
    /// the content (the same key, the same tree), so a second call with it only looks it up.
    pub fn save_directory(
        &mut self,
        tag: &str,
        source: &str,
        key: &str,
        config: &ImageConfig,
        dir: &Path,
    ) -> Result<ImportSummary, StoreError> {
        let tag = normalize_tag(tag)?;
        let _lock = self.lock(false)?;
        let name = format!("dir_{}.ext4", hex::encode(Sha256::digest(format!("matchlock-dir-v1\n{key}"))));
        let path = self.root.join("blobs").join(&name);
        let (bytes, entries) = tree_size(dir).map_err(io_err(dir))?;
        if !path.exists() {
            let _blob = self.lock_blob(&name)?;
            if !path.exists() {
                let tmp = self.tmp_dir().join(format!(".{name}-{}", std::process::id()));
                let built = crate::ext4::build_from_dir(dir, &tmp, crate::ext4::estimate_size(bytes, entries), entries)
                    .map_err(StoreError::Directory)
                    .and_then(|()| fs::rename(&tmp, &path).map_err(io_err(&path)));
                if built.is_err() {
                    let _ = fs::remove_file(&tmp);
                }
                built?;
            }
        }
        let mut hasher = Sha256::new();
        hasher.update(format!("{key}\n"));
        hasher.update(config.to_oci_json(&[]));
        let digest = format!("sha256:{}", hex::encode(hasher.finalize()));
        self.save(&tag, source, &digest, config, &[], bytes, &path)?;
        Ok(ImportSummary { tag, digest, layers: 0, size: bytes })
    }

    /// Records an image whose layers and root file system are stored (replacing any
    /// image of that tag).
    #[allow(clippy::too_many_arguments)]
    pub fn save(
        &mut self,
        tag: &str,
        source: &str,
        digest: &str,
        config: &ImageConfig,
        diff_ids: &[String],
        size: u64,
        rootfs: &Path,
    ) -> Result<(), StoreError> {
        let config_json = serde_json::to_string(config).expect("config serializes");
        let rootfs_name = rootfs.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let tx = self.db.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        tx.execute("DELETE FROM images WHERE tag = ?1", params![tag])?;
        tx.execute(
            "INSERT INTO images (tag, digest, size, source, config_json, created_at, rootfs)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![tag, digest, size as i64, source, config_json, now(), rootfs_name],
        )?;
        for (ordinal, diff_id) in diff_ids.iter().enumerate() {
            tx.execute(
                "INSERT INTO image_layers (tag, ordinal, diff_id) VALUES (?1, ?2, ?3)",
                params![tag, ordinal as i64, diff_id],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Every image: (tag, source, size, created unix seconds), local sources first.
    pub fn list(&self) -> Result<Vec<ImageRow>, StoreError> {
        let mut stmt = self.db.prepare(
            "SELECT tag, source, size, created_at FROM images
             WHERE source != ?1 ORDER BY CASE source WHEN 'registry' THEN 1 ELSE 0 END, tag",
        )?;
        let rows = stmt
            .query_map([BUILD_STEP_SOURCE], |r| {
                Ok(ImageRow { tag: r.get(0)?, source: r.get(1)?, size: r.get::<_, i64>(2)? as u64, created: r.get(3)? })
            })?
            .collect::<Result<_, _>>()?;
        Ok(rows)
    }

    /// Removes an image record and reclaims the blobs only it used. Returns whether it
    /// existed.
    pub fn remove(&mut self, tag: &str) -> Result<bool, StoreError> {
        let tx = self.db.transaction()?;
        tx.execute("DELETE FROM image_layers WHERE tag = ?1", params![tag])?;
        let n = tx.execute("DELETE FROM images WHERE tag = ?1", params![tag])?;
        tx.commit()?;
        if n > 0 {
            self.gc()?;
        }
        Ok(n > 0)
    }

    /// Deletes blobs no image references (and leftovers of interrupted imports and
    /// pulls); returns how many blobs went.
    pub fn gc(&mut self) -> Result<usize, StoreError> {
        let _lock = self.lock(true)?;
        self.gc_locked()
    }

    /// [`Store::gc`] if no other process uses the store right now (never waits); `None`
    /// when it was busy.
    pub fn gc_if_idle(&mut self) -> Result<Option<usize>, StoreError> {
        let path = self.root.join("store.lock");
        let lock = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
            .map_err(io_err(&path))?;
        match lock.try_lock() {
            Ok(()) => self.gc_locked().map(Some),
            Err(fs::TryLockError::WouldBlock) => Ok(None),
            Err(fs::TryLockError::Error(e)) => Err(StoreError::Io { path, source: e }),
        }
    }

    /// The collection itself, under the exclusive store lock: no build runs, so the
    /// hidden images builds boot their steps from go first.
    fn gc_locked(&mut self) -> Result<usize, StoreError> {
        let tx = self.db.transaction()?;
        tx.execute(
            "DELETE FROM image_layers WHERE tag IN (SELECT tag FROM images WHERE source = ?1)",
            [BUILD_STEP_SOURCE],
        )?;
        tx.execute("DELETE FROM images WHERE source = ?1", [BUILD_STEP_SOURCE])?;
        tx.commit()?;
        let mut keep: std::collections::HashSet<String> = std::collections::HashSet::new();
        {
            let mut stmt = self.db.prepare(
                "SELECT diff_id FROM image_layers UNION SELECT diff_id FROM build_cache WHERE diff_id IS NOT NULL",
            )?;
            for diff_id in stmt.query_map([], |r| r.get::<_, String>(0))? {
                let path = self.layer_path(&diff_id?);
                keep.insert(path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default());
            }
            let mut stmt = self.db.prepare("SELECT DISTINCT rootfs FROM images")?;
            for rootfs in stmt.query_map([], |r| r.get::<_, String>(0))? {
                keep.insert(rootfs?);
            }
        }
        let blobs = self.root.join("blobs");
        let mut removed = 0;
        for entry in fs::read_dir(&blobs).map_err(io_err(&blobs))?.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let is_blob = name.ends_with(".layer") || name.ends_with(".ext4");
            if name.starts_with(".layer-") || (is_blob && !keep.contains(&name)) {
                fs::remove_file(entry.path()).map_err(io_err(&entry.path()))?;
                if !name.starts_with('.') {
                    removed += 1;
                }
            } else if name.ends_with(".lock") {
                let _ = fs::remove_file(entry.path());
            }
        }
        // Leftovers of interrupted imports and pulls: nobody holds the store lock for them.
        for entry in fs::read_dir(self.tmp_dir()).into_iter().flatten().flatten() {
            let _ = fs::remove_file(entry.path());
        }
        self.db.execute(
            "DELETE FROM layers WHERE diff_id NOT IN (SELECT diff_id FROM image_layers)
             AND diff_id NOT IN (SELECT diff_id FROM build_cache WHERE diff_id IS NOT NULL)",
            [],
        )?;
        Ok(removed)
    }

    /// Finds an image the way `run --image` names it: a local tag first (`name[:tag]`),
    /// then the registry name (`alpine` → `docker.io/library/alpine:latest`).
    pub fn resolve(&self, reference: &str) -> Result<Option<ImageRecord>, StoreError> {
        if let Some(found) = self.get(reference)? {
            return Ok(Some(found));
        }
        // Docker's defaults, as `registry::normalize` applies them.
        match reference.parse::<oci_client::Reference>() {
            Ok(full) => self.get(&full.whole()),
            Err(_) => Ok(None),
        }
    }

    /// Looks up an image by tag (`:latest` is implied).
    pub fn get(&self, reference: &str) -> Result<Option<ImageRecord>, StoreError> {
        let tag = normalize_tag(reference)?;
        let row: Option<(String, i64, String, String)> = self
            .db
            .query_row("SELECT digest, size, config_json, rootfs FROM images WHERE tag = ?1", params![tag], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
            })
            .optional()?;
        let Some((digest, size, config_json, rootfs)) = row else { return Ok(None) };
        let config: ImageConfig =
            serde_json::from_str(&config_json).map_err(|e| StoreError::Corrupt(format!("config of {tag}: {e}")))?;
        let rootfs = self.root.join("blobs").join(rootfs);
        if !rootfs.is_file() {
            return Err(StoreError::Corrupt(format!(
                "the root file system of {tag} is missing; pull or import it again"
            )));
        }
        Ok(Some(ImageRecord { tag, digest, config, rootfs, size: size as u64 }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags() {
        assert_eq!(normalize_tag("alpine").unwrap(), "alpine:latest");
        assert_eq!(normalize_tag("localhost:5000/x").unwrap(), "localhost:5000/x:latest");
        assert_eq!(normalize_tag("a/b:1.2").unwrap(), "a/b:1.2");
        assert!(normalize_tag("bad tag").is_err());
        assert!(normalize_tag("").is_err());
    }

    /// Stores a layer holding one file of `size` bytes; its diff-id.
    fn layer_of(store: &Store, name: &str, size: usize) -> String {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_size(size as u64);
        b.append_data(&mut h, name, vec![7u8; size].as_slice()).unwrap();
        let bytes = b.into_inner().unwrap();
        let diff_id = format!("sha256:{}", hex::encode(Sha256::digest(&bytes)));
        let mut file = tempfile::NamedTempFile::new_in(store.tmp_dir()).unwrap();
        io::Write::write_all(&mut file, &bytes).unwrap();
        store.add_layer(file, &diff_id).unwrap();
        diff_id
    }

    fn blobs(store: &Store) -> usize {
        fs::read_dir(store.root.join("blobs"))
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".layer"))
            .count()
    }

    #[test]
    fn the_build_cache_is_bounded_and_gc_reclaims_what_no_image_uses() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path()).unwrap();
        store.set_build_cache_bound(2500);
        let layers: Vec<String> = (0..3).map(|i| layer_of(&store, &format!("f{i}"), 1000)).collect();
        for (i, diff_id) in layers.iter().enumerate() {
            store.cache_step(&format!("step{i}"), Some(diff_id)).unwrap();
        }
        // Three 1000-byte layers under a 2500-byte bound: the oldest entry is forgotten.
        assert_eq!(store.cached_step("step0").unwrap(), None);
        assert_eq!(store.cached_step("step2").unwrap(), Some(Some(layers[2].clone())));
        store.gc().unwrap();
        assert_eq!(blobs(&store), 2, "the forgotten step's layer is collected");
        // A step whose layer an image uses costs the cache nothing, and stays.
        let config = ImageConfig::default();
        store.save_chain("kept:1", "build", &config, &layers[1..2]).unwrap();
        assert_eq!(store.prune_build_cache(false).unwrap(), 1, "only the entry no image uses");
        assert_eq!(store.cached_step("step1").unwrap(), Some(Some(layers[1].clone())));
        store.gc().unwrap();
        assert_eq!(blobs(&store), 1);
        // `image rm` then gc reclaims the rest.
        assert!(store.remove("kept:1").unwrap());
        store.prune_build_cache(false).unwrap();
        store.gc().unwrap();
        assert_eq!(blobs(&store), 0, "nothing of the build is left");
        assert_eq!(store.prune_build_cache(true).unwrap(), 0);
    }
}
