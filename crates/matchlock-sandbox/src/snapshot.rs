//! Saved sandboxes: `~/.matchlock/snapshots/<name>/`, the backend's files (guest memory,
//! device state, the writable disk) and `meta.json`. Directories are 0700, files 0600: the
//! memory of a sandbox may hold anything the guest had, though never a secret's value (the
//! guest only ever sees placeholders).

use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use matchlock_api::paths::state_dir;
use matchlock_api::SandboxConfig;
use serde::{Deserialize, Serialize};

use crate::{io_err, SandboxError};

/// What a snapshot was taken of: restoring needs the same machine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotMeta {
    /// Its name.
    pub name: String,
    /// The sandbox it was taken of.
    pub source: String,
    /// The machine's first id (a restored machine keeps the NIC address it was booted with).
    pub machine_id: String,
    /// Seconds since the Unix epoch when it was taken.
    pub created_at: u64,
    /// The backend that saved it (`qemu`).
    pub backend: String,
    /// The backend's build ([`matchlock_vm::Backend::build_id`]).
    pub backend_build: String,
    /// The configuration of the saved sandbox; restored sandboxes run with it.
    pub config: SandboxConfig,
    /// The image's tag and its root file system (the guest has it mounted: it must not change).
    pub image: String,
    /// The image's squashed root file system when saved.
    pub image_rootfs: PathBuf,
    /// The guest kernel and boot disk when saved (both live in the saved memory).
    pub kernel: PathBuf,
    /// The boot disk (guest-init) when saved.
    pub boot_disk: PathBuf,
    /// Bytes on disk.
    pub size: u64,
}

/// `~/.matchlock/snapshots`.
pub fn snapshots_dir() -> PathBuf {
    state_dir().join("snapshots")
}

/// Prefix of a snapshot being written (renamed into place when complete; `gc` removes
/// leftovers of a crash).
pub(crate) const PARTIAL_PREFIX: &str = ".partial-";
/// Prefix of the hidden snapshot a fork takes.
pub(crate) const FORK_PREFIX: &str = ".fork-";

/// Whether `name` can name a snapshot: 1–64 of `[A-Za-z0-9._-]`, not starting with `.`.
pub fn is_valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && !name.starts_with('.')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
}

fn check_name(name: &str) -> Result<(), SandboxError> {
    if is_valid_name(name) {
        Ok(())
    } else {
        Err(SandboxError::Config(format!("invalid snapshot name {name:?} (letters, digits, '.', '_', '-')")))
    }
}

/// Creates a private directory under `root` for a snapshot being written.
pub(crate) fn partial_dir(root: &Path, name: &str) -> Result<PathBuf, SandboxError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(root)
        .map_err(io_err(format!("cannot create {}", root.display())))?;
    let dir = root.join(format!("{PARTIAL_PREFIX}{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::DirBuilder::new().mode(0o700).create(&dir).map_err(io_err(format!("cannot create {}", dir.display())))?;
    Ok(dir)
}

/// Bytes stored under `dir` (allocated blocks: the files are sparse).
fn stored(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.blocks() * 512)
        .sum()
}

/// Writes a new file readable by the user only.
pub(crate) fn write_private(path: &Path, contents: &[u8]) -> Result<(), SandboxError> {
    use std::io::Write;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut file| file.write_all(contents))
        .map_err(io_err(format!("cannot write {}", path.display())))
}

/// Completes a snapshot written into `partial`: its metadata, then renamed to
/// `root/<name>`.
pub(crate) fn commit(partial: &Path, root: &Path, mut meta: SnapshotMeta) -> Result<SnapshotMeta, SandboxError> {
    let target = root.join(&meta.name);
    if target.exists() {
        return Err(SandboxError::Config(format!("snapshot {} exists (remove it first)", meta.name)));
    }
    meta.created_at = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    meta.size = stored(partial);
    let json = serde_json::to_vec_pretty(&meta).expect("metadata serializes");
    write_private(&partial.join("meta.json"), &json)?;
    std::fs::rename(partial, &target).map_err(io_err(format!("cannot move the snapshot to {}", target.display())))?;
    Ok(meta)
}

/// Saves a machine as snapshot `name` ([`crate::Sandbox::snapshot`]); `template` is its
/// metadata but for the name. A failed snapshot leaves nothing.
pub(crate) async fn take(
    machine: &matchlock_vm::Snapshotter,
    mut template: SnapshotMeta,
    name: &str,
) -> Result<SnapshotMeta, SandboxError> {
    if !name.starts_with(FORK_PREFIX) {
        check_name(name)?;
    }
    if snapshots_dir().join(name).exists() {
        return Err(SandboxError::Config(format!("snapshot {name} exists (remove it first)")));
    }
    let root = snapshots_dir();
    let partial = partial_dir(&root, name)?;
    template.name = name.to_owned();
    let saved = match machine(partial.clone()).await {
        Ok(()) => commit(&partial, &root, template),
        Err(e) => Err(e.into()),
    };
    if saved.is_err() {
        crate::logged(std::fs::remove_dir_all(&partial), "removing a failed snapshot");
    }
    saved
}

/// The snapshot called `name`: its directory and metadata.
pub fn load(name: &str) -> Result<(PathBuf, SnapshotMeta), SandboxError> {
    let dir = if name.starts_with(FORK_PREFIX) {
        snapshots_dir().join(name)
    } else {
        check_name(name)?;
        snapshots_dir().join(name)
    };
    let text = std::fs::read_to_string(dir.join("meta.json"))
        .map_err(|_| SandboxError::Config(format!("snapshot not found: {name} (see `matchlock snapshot ls`)")))?;
    let meta = serde_json::from_str(&text)
        .map_err(|e| SandboxError::Config(format!("snapshot {name} has unreadable metadata: {e}")))?;
    Ok((dir, meta))
}

/// Every complete snapshot, by name.
pub fn list() -> Vec<SnapshotMeta> {
    let mut all: Vec<SnapshotMeta> = std::fs::read_dir(snapshots_dir())
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| is_valid_name(&e.file_name().to_string_lossy()))
        .filter_map(|e| load(&e.file_name().to_string_lossy()).ok().map(|(_, m)| m))
        .collect();
    all.sort_by(|a, b| a.name.cmp(&b.name));
    all
}

/// Removes what a crashed snapshot or fork left (`.partial-*` and `.fork-*` directories
/// whose process is gone); returns their names.
pub fn remove_leftovers() -> Vec<String> {
    remove_leftovers_in(&snapshots_dir())
}

/// [`remove_leftovers`] under `root`.
pub(crate) fn remove_leftovers_in(root: &Path) -> Vec<String> {
    let mut removed = Vec::new();
    for entry in std::fs::read_dir(root).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !(name.starts_with(PARTIAL_PREFIX) || name.starts_with(FORK_PREFIX)) {
            continue;
        }
        let pid = name.rsplit('-').next().and_then(|p| p.parse::<i32>().ok());
        let alive = pid.is_some_and(matchlock_state::process::is_running);
        if !alive && std::fs::remove_dir_all(entry.path()).is_ok() {
            removed.push(name);
        }
    }
    removed
}

/// Deletes the snapshot `name`. Sandboxes restored from it keep running: their memory is
/// mapped, their disks are copies.
pub fn remove(name: &str) -> Result<(), SandboxError> {
    let (dir, _) = load(name)?;
    std::fs::remove_dir_all(&dir).map_err(io_err(format!("cannot remove {}", dir.display())))
}

#[cfg(test)]
mod tests {
    use super::is_valid_name;

    #[test]
    fn names_are_plain() {
        for ok in ["warm", "a.b_c-1", &"x".repeat(64)] {
            assert!(is_valid_name(ok), "{ok}");
        }
        for bad in ["", ".hidden", "a/b", "..", "a b", &"x".repeat(65)] {
            assert!(!is_valid_name(bad), "{bad}");
        }
    }
}
