//! Named volumes: ext4 images under `~/.cache/matchlock/volumes/<name>.ext4` that
//! sandboxes mount with `--disk @name:/path`.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::PathBuf;

use matchlock_api::config::is_valid_volume_name;
use matchlock_api::paths::cache_dir;

use crate::{io_err, SandboxError};

/// A volume and its apparent size in bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Volume {
    /// Name.
    pub name: String,
    /// Apparent size of the image file.
    pub size: u64,
    /// The image file.
    pub path: PathBuf,
}

fn dir() -> PathBuf {
    cache_dir().join("volumes")
}

fn checked(name: &str) -> Result<PathBuf, SandboxError> {
    if !is_valid_volume_name(name) {
        return Err(SandboxError::Volume(format!(
            "invalid volume name {name:?}: use letters, digits, '_', '.' and '-', starting with a letter or digit"
        )));
    }
    Ok(dir().join(format!("{name}.ext4")))
}

fn not_found(name: &str) -> SandboxError {
    SandboxError::Volume(format!("named volume not found: {name}"))
}

/// The image file of an existing volume.
pub fn path(name: &str) -> Result<PathBuf, SandboxError> {
    let path = checked(name)?;
    if !path.is_file() {
        return Err(not_found(name));
    }
    Ok(path)
}

/// Creates an empty ext4 volume of `size_mb`.
pub fn create(name: &str, size_mb: u64) -> Result<Volume, SandboxError> {
    let path = checked(name)?;
    if size_mb == 0 {
        return Err(SandboxError::Volume("volume size must be greater than 0".into()));
    }
    std::fs::create_dir_all(dir()).map_err(io_err(format!("cannot create {}", dir().display())))?;
    // create_new: two concurrent creates of one name cannot both succeed.
    let claim = std::fs::OpenOptions::new().write(true).create_new(true).open(&path);
    if claim.is_err() && path.exists() {
        return Err(SandboxError::Volume(format!("named volume already exists: {name}")));
    }
    claim.map_err(io_err(format!("cannot create {}", path.display())))?;
    if let Err(source) = matchlock_image::ext4::create_empty(&path, size_mb * 1024 * 1024, None) {
        let _ = std::fs::remove_file(&path);
        return Err(SandboxError::Disk { what: format!("volume {name}"), source });
    }
    Ok(Volume { name: name.to_owned(), size: size_mb * 1024 * 1024, path })
}

/// Every volume, sorted by name.
pub fn list() -> Result<Vec<Volume>, SandboxError> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir()).into_iter().flatten().flatten() {
        let file = entry.file_name().to_string_lossy().into_owned();
        if let Some(name) = file.strip_suffix(".ext4").filter(|n| is_valid_volume_name(n)) {
            let size = entry.metadata().map_or(0, |m| m.len());
            out.push(Volume { name: name.to_owned(), size, path: entry.path() });
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Deletes a volume.
pub fn remove(name: &str) -> Result<(), SandboxError> {
    let path = path(name)?;
    std::fs::remove_file(&path).map_err(io_err(format!("cannot remove {}", path.display())))
}

/// Copies a volume byte for byte (sparse regions stay sparse), keeping its mode, owner
/// and modification time.
pub fn copy(from: &str, to: &str) -> Result<(), SandboxError> {
    if from == to {
        return Err(SandboxError::Volume(format!(
            "cannot copy volume {from}: source and destination must be different"
        )));
    }
    let source = path(from)?;
    let dest = checked(to)?;
    let claim = std::fs::OpenOptions::new().write(true).create_new(true).open(&dest);
    if claim.is_err() && dest.exists() {
        return Err(SandboxError::Volume(format!("named volume already exists: {to}")));
    }
    claim.map_err(io_err(format!("cannot create {}", dest.display())))?;
    let copied = std::process::Command::new("cp")
        .args(["--sparse=always", "--preserve=mode,ownership,timestamps", "--"])
        .arg(&source)
        .arg(&dest)
        .status();
    match copied {
        Ok(s) if s.success() => {}
        other => {
            let _ = std::fs::remove_file(&dest);
            return Err(SandboxError::Volume(format!("cannot copy volume {from} to {to}: {other:?}")));
        }
    }
    let meta = std::fs::metadata(&source).map_err(io_err(format!("cannot read {}", source.display())))?;
    std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(meta.mode()))
        .map_err(io_err(format!("cannot set the mode of {}", dest.display())))?;
    Ok(())
}
