//! The image store: layer blobs under `blobs/`, image records in `metadata.db`.

use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use rusqlite::{params, Connection, OptionalExtension};
use sha2::{Digest, Sha256};

use crate::archive::{ArchiveError, ImageArchive};
use crate::config::ImageConfig;
use crate::layer::{self, LayerError};

/// Schema migrations, applied in order; `PRAGMA user_version` records how many ran.
const MIGRATIONS: &[&str] = &["CREATE TABLE images (
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
    );"];

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
    /// A layer could not be converted.
    #[error("cannot convert layer {index} of {total}")]
    Layer {
        /// 1-based layer number.
        index: usize,
        /// Number of layers.
        total: usize,
        /// Why.
        #[source]
        source: LayerError,
    },
    /// Stored metadata is inconsistent (a blob is missing, or JSON is corrupt).
    #[error("image store is inconsistent: {0}")]
    Corrupt(String),
    /// The tag is not a valid image reference.
    #[error("invalid image reference {0:?}")]
    InvalidTag(String),
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
    /// `sha256:` digest of the image config.
    pub digest: String,
    /// Runtime settings.
    pub config: ImageConfig,
    /// Layer disk images, bottom first.
    pub layers: Vec<PathBuf>,
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

/// The store at `~/.cache/matchlock/images`.
#[derive(Debug)]
pub struct Store {
    root: PathBuf,
    db: Connection,
}

impl Store {
    /// Opens (creating if needed) the store under `root`.
    pub fn open(root: &Path) -> Result<Self, StoreError> {
        let io_err = |path: &Path| {
            let path = path.to_owned();
            move |source| StoreError::Io { path, source }
        };
        fs::create_dir_all(root.join("blobs")).map_err(io_err(root))?;
        fs::create_dir_all(root.join("tmp")).map_err(io_err(root))?;
        let db = Connection::open(root.join("metadata.db"))?;
        db.busy_timeout(std::time::Duration::from_secs(15))?;
        db.pragma_update(None, "journal_mode", "WAL")?;
        db.pragma_update(None, "synchronous", "NORMAL")?;
        db.pragma_update(None, "foreign_keys", "ON")?;
        let mut store = Self { root: root.to_owned(), db };
        store.migrate()?;
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

    /// Path of the disk image of a layer.
    pub fn blob_path(&self, diff_id: &str) -> PathBuf {
        self.root.join("blobs").join(format!("{}.ext4", diff_id.replace([':', '/'], "_")))
    }

    /// Imports a `docker save` or OCI-layout tarball from `input` under `tag`.
    pub fn import(&mut self, tag: &str, input: &mut dyn Read) -> Result<ImportSummary, StoreError> {
        let tag = normalize_tag(tag)?;
        let _lock = self.lock(false)?;
        let tmp_dir = self.root.join("tmp");
        let mut spool =
            tempfile::tempfile_in(&tmp_dir).map_err(|source| StoreError::Io { path: tmp_dir.clone(), source })?;
        io::copy(input, &mut spool).map_err(|source| StoreError::Io { path: tmp_dir.clone(), source })?;
        let archive = ImageArchive::open(spool)?;
        let image = archive.image()?;
        let total = image.layers.len();
        let mut size = 0;
        for (i, (path, diff_id)) in image.layers.iter().zip(&image.config.rootfs.diff_ids).enumerate() {
            size += self.ensure_layer(&archive, path, diff_id).map_err(|e| match e {
                StoreError::Layer { source, .. } => StoreError::Layer { index: i + 1, total, source },
                other => other,
            })?;
        }
        let digest = format!("sha256:{}", hex::encode(Sha256::digest(&image.config_bytes)));
        self.save(&tag, "import", &digest, &image.config.image_config(), &image.config.rootfs.diff_ids, size)?;
        Ok(ImportSummary { tag, digest, layers: total, size })
    }

    /// Records an image whose layer blobs are all stored (replacing any image of that tag).
    pub fn save(
        &mut self,
        tag: &str,
        source: &str,
        digest: &str,
        config: &ImageConfig,
        diff_ids: &[String],
        size: u64,
    ) -> Result<(), StoreError> {
        let config_json = serde_json::to_string(config).expect("config serializes");
        let tx = self.db.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        tx.execute("DELETE FROM images WHERE tag = ?1", params![tag])?;
        tx.execute(
            "INSERT INTO images (tag, digest, size, source, config_json, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![tag, digest, size as i64, source, config_json, now()],
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

    /// Whether the blob of a layer is stored; returns its content size.
    pub fn layer_size(&self, diff_id: &str) -> Result<Option<u64>, StoreError> {
        let known: Option<i64> = self
            .db
            .query_row("SELECT size FROM layers WHERE diff_id = ?1", params![diff_id], |r| r.get(0))
            .optional()?;
        Ok(known.filter(|_| self.blob_path(diff_id).exists()).map(|s| s as u64))
    }

    /// Records a converted layer blob.
    pub fn add_layer(&self, diff_id: &str, size: u64) -> Result<(), StoreError> {
        self.db.execute(
            "INSERT OR REPLACE INTO layers (diff_id, fs_type, size, created_at) VALUES (?1, 'ext4', ?2, ?3)",
            params![diff_id, size as i64, now()],
        )?;
        Ok(())
    }

    /// The directory for temporary files of this store (same file system as the blobs).
    pub fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    /// Takes the store-wide lock: shared while adding images, exclusive for [`Store::gc`],
    /// so a collection never deletes a blob an import is about to reference.
    pub fn lock(&self, exclusive: bool) -> Result<fs::File, StoreError> {
        let path = self.root.join("store.lock");
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|source| StoreError::Io { path: path.clone(), source })?;
        let locked = if exclusive { file.lock() } else { file.lock_shared() };
        locked.map_err(|source| StoreError::Io { path, source })?;
        Ok(file)
    }

    /// Takes the conversion lock of one layer, so two processes never convert it twice.
    pub fn lock_layer(&self, diff_id: &str) -> Result<fs::File, StoreError> {
        let path = self.root.join("blobs").join(format!("{}.lock", diff_id.replace([':', '/'], "_")));
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|source| StoreError::Io { path: path.clone(), source })?;
        file.lock().map_err(|source| StoreError::Io { path, source })?;
        Ok(file)
    }

    /// Every image: (tag, source, size, created unix seconds), local sources first.
    pub fn list(&self) -> Result<Vec<ImageRow>, StoreError> {
        let mut stmt = self.db.prepare(
            "SELECT tag, source, size, created_at FROM images
             ORDER BY CASE source WHEN 'registry' THEN 1 ELSE 0 END, tag",
        )?;
        let rows = stmt
            .query_map([], |r| {
                Ok(ImageRow { tag: r.get(0)?, source: r.get(1)?, size: r.get::<_, i64>(2)? as u64, created: r.get(3)? })
            })?
            .collect::<Result<_, _>>()?;
        Ok(rows)
    }

    /// Removes an image record; its blobs stay until [`Store::gc`]. Returns whether it existed.
    pub fn remove(&mut self, tag: &str) -> Result<bool, StoreError> {
        let tx = self.db.transaction()?;
        tx.execute("DELETE FROM image_layers WHERE tag = ?1", params![tag])?;
        let n = tx.execute("DELETE FROM images WHERE tag = ?1", params![tag])?;
        tx.commit()?;
        Ok(n > 0)
    }

    /// Deletes layer blobs no image references; returns how many.
    pub fn gc(&mut self) -> Result<usize, StoreError> {
        let _lock = self.lock(true)?;
        let referenced: std::collections::HashSet<String> = {
            let mut stmt = self.db.prepare("SELECT DISTINCT diff_id FROM image_layers")?;
            let ids = stmt.query_map([], |r| r.get::<_, String>(0))?.collect::<Result<_, _>>()?;
            ids
        };
        let referenced_files: std::collections::HashSet<PathBuf> =
            referenced.iter().map(|d| self.blob_path(d)).collect();
        let mut removed = 0;
        let blobs = self.root.join("blobs");
        for entry in fs::read_dir(&blobs).map_err(|source| StoreError::Io { path: blobs.clone(), source })?.flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.ends_with(".ext4") && !referenced_files.contains(&path) {
                fs::remove_file(&path).map_err(|source| StoreError::Io { path: path.clone(), source })?;
                removed += 1;
            }
        }
        // Leftovers of interrupted imports and pulls: nobody holds the store lock for them.
        let tmp = self.tmp_dir();
        for entry in fs::read_dir(&tmp).into_iter().flatten().flatten() {
            let _ = fs::remove_file(entry.path());
        }
        for entry in fs::read_dir(&blobs).into_iter().flatten().flatten() {
            if entry.file_name().to_string_lossy().starts_with(".layer-") {
                let _ = fs::remove_file(entry.path());
            }
        }
        let mut stmt = self.db.prepare("SELECT diff_id FROM layers")?;
        let known: Vec<String> = stmt.query_map([], |r| r.get(0))?.collect::<Result<_, _>>()?;
        drop(stmt);
        for diff_id in known.iter().filter(|d| !referenced.contains(*d)) {
            self.db.execute("DELETE FROM layers WHERE diff_id = ?1", params![diff_id])?;
        }
        Ok(removed)
    }

    /// Converts a layer unless its blob is already stored; returns its content size.
    fn ensure_layer(&self, archive: &ImageArchive, path: &Path, diff_id: &str) -> Result<u64, StoreError> {
        if let Some(size) = self.layer_size(diff_id)? {
            return Ok(size);
        }
        let _layer_lock = self.lock_layer(diff_id)?;
        // Another process may have converted it while we waited for the lock.
        if let Some(size) = self.layer_size(diff_id)? {
            return Ok(size);
        }
        let layer_err = |source| StoreError::Layer { index: 0, total: 0, source };
        let source = archive.layer(path)?;
        let converted = layer::convert(&source, Some(diff_id), &self.blob_path(diff_id)).map_err(layer_err)?;
        self.add_layer(diff_id, converted.content_bytes)?;
        Ok(converted.content_bytes)
    }

    /// Finds an image the way `run --image` names it: a local tag first (`name[:tag]`),
    /// then the registry name (`alpine` → `docker.io/library/alpine:latest`).
    pub fn resolve(&self, reference: &str) -> Result<Option<ImageRecord>, StoreError> {
        if let Some(found) = self.get(reference)? {
            return Ok(Some(found));
        }
        match crate::registry::normalize(reference) {
            Ok(full) => self.get(&full.whole()),
            Err(_) => Ok(None),
        }
    }

    /// Looks up an image by tag (`:latest` is implied).
    pub fn get(&self, reference: &str) -> Result<Option<ImageRecord>, StoreError> {
        let tag = normalize_tag(reference)?;
        let row: Option<(String, i64, String)> = self
            .db
            .query_row("SELECT digest, size, config_json FROM images WHERE tag = ?1", params![tag], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .optional()?;
        let Some((digest, size, config_json)) = row else { return Ok(None) };
        let config: ImageConfig =
            serde_json::from_str(&config_json).map_err(|e| StoreError::Corrupt(format!("config of {tag}: {e}")))?;
        let mut stmt = self.db.prepare("SELECT diff_id FROM image_layers WHERE tag = ?1 ORDER BY ordinal")?;
        let diff_ids: Vec<String> = stmt.query_map(params![tag], |r| r.get(0))?.collect::<Result<_, _>>()?;
        let mut layers = Vec::with_capacity(diff_ids.len());
        for diff_id in &diff_ids {
            let blob = self.blob_path(diff_id);
            if !blob.exists() {
                return Err(StoreError::Corrupt(format!("layer {diff_id} of {tag} is missing; re-import the image")));
            }
            layers.push(blob);
        }
        Ok(Some(ImageRecord { tag, digest, config, layers, size: size as u64 }))
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
}
