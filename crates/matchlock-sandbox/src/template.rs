//! Warm templates: `~/.cache/matchlock/templates/<key>/`, a machine saved right after its
//! agent first became ready, before anything of a sandbox's own (hostname, /etc files, CA,
//! workspace, clock, entropy) was applied. Later sandboxes of the same key resume it
//! instead of booting, then get their own identity ([`crate::Sandbox::create`]).
//!
//! The key covers every input of that saved state: the backend build, kernel, guest-init,
//! image, memory, CPUs, upper-disk size, hardening and NIC. A changed input is a new key;
//! `gc` removes templates whose inputs are gone. Templates are written under a private
//! name and renamed into place, so concurrent runs never see half of one; restored machines
//! map the memory privately (copy-on-write) and copy the disk, so a template never changes
//! once saved.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use matchlock_api::paths::cache_dir;
use matchlock_api::SandboxConfig;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::snapshot::{self, SnapshotMeta};
use crate::{io_err, SandboxError};

/// Environment variable that turns templates off for every sandbox (`1`), as `--cold`
/// does for one.
pub const COLD_ENV: &str = "MATCHLOCK_COLD";

/// Bump when what a template holds changes meaning (what guest-init does before ready).
const FORMAT: u32 = 1;

/// `~/.cache/matchlock/templates`.
pub fn templates_dir() -> PathBuf {
    cache_dir().join("templates")
}

/// A file as a template depends on it: its path and the identity of its content.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct FileId {
    path: PathBuf,
    len: u64,
    mtime_ns: i128,
    inode: u64,
}

impl FileId {
    fn of(path: &Path) -> Result<Self, SandboxError> {
        let meta = std::fs::metadata(path).map_err(io_err(format!("cannot stat {}", path.display())))?;
        Ok(Self {
            path: path.to_owned(),
            len: meta.len(),
            mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
            inode: meta.ino(),
        })
    }
}

/// Everything the saved machine depends on (kept beside it as `inputs.json`).
#[derive(Serialize, Deserialize)]
struct Inputs {
    format: u32,
    backend: String,
    backend_build: String,
    kernel: FileId,
    boot_disk: FileId,
    image_rootfs: FileId,
    memory_mb: u64,
    cpus: f64,
    disk_size_mb: u64,
    privileged: bool,
    /// `/tmp` on the root file system.
    image_tmp: bool,
    /// The NIC's MTU, or `None` without a network.
    nic_mtu: Option<u32>,
}

/// What [`key`] needs besides the sandbox configuration.
pub(crate) struct Boot<'a> {
    pub(crate) backend: &'a str,
    pub(crate) backend_build: &'a str,
    pub(crate) kernel: &'a Path,
    pub(crate) boot_disk: &'a Path,
    pub(crate) image_rootfs: &'a Path,
}

/// Whether `config` may start from (and save) a template: not turned off, and no `--disk`
/// volumes (a saved guest would have them mounted).
pub(crate) fn applies_to(config: &SandboxConfig) -> bool {
    let off = std::env::var(COLD_ENV).is_ok_and(|v| !v.is_empty() && v != "0");
    !off && !config.cold && config.disks.is_empty()
}

/// Which template a sandbox resumes or saves.
pub(crate) struct Key {
    /// 32 hex digits, the template's directory name.
    pub(crate) name: String,
    inputs: Vec<u8>,
}

/// The template key of `config` on `machine`.
pub(crate) fn key(config: &SandboxConfig, machine: &Boot<'_>) -> Result<Key, SandboxError> {
    let inputs = Inputs {
        format: FORMAT,
        backend: machine.backend.to_owned(),
        backend_build: machine.backend_build.to_owned(),
        kernel: FileId::of(machine.kernel)?,
        boot_disk: FileId::of(machine.boot_disk)?,
        image_rootfs: FileId::of(machine.image_rootfs)?,
        memory_mb: config.memory_mb,
        cpus: config.cpus,
        disk_size_mb: config.disk_size_mb,
        privileged: config.privileged,
        image_tmp: config.image_tmp,
        nic_mtu: config.network.as_ref().map(|n| n.mtu),
    };
    let inputs = serde_json::to_vec(&inputs).expect("inputs serialize");
    Ok(Key { name: hex::encode(&Sha256::digest(&inputs)[..16]), inputs })
}

/// The configuration a template is booted with: the sandbox's machine, none of its identity.
pub(crate) fn neutral(config: &SandboxConfig) -> SandboxConfig {
    SandboxConfig {
        hostname: Some(NEUTRAL_HOSTNAME.to_owned()),
        dns_servers: Vec::new(),
        add_hosts: Vec::new(),
        workspace: None,
        ..config.clone()
    }
}

/// The hostname a template is saved with (every sandbox gets its own on resume).
const NEUTRAL_HOSTNAME: &str = "matchlock-template";

/// The saved template of `key`, if there is one.
pub(crate) fn find(key: &str) -> Option<(PathBuf, SnapshotMeta)> {
    let dir = templates_dir().join(key);
    let text = std::fs::read_to_string(dir.join("meta.json")).ok()?;
    match serde_json::from_str(&text) {
        Ok(meta) => Some((dir, meta)),
        Err(e) => {
            tracing::warn!("template {key} has unreadable metadata ({e}): discarding it");
            discard(key);
            None
        }
    }
}

/// Saves the machine as the template `key` (`meta` but for the name) unless another run
/// saved it first.
pub(crate) async fn save(
    snapshotter: &matchlock_vm::Snapshotter,
    key: &Key,
    mut meta: SnapshotMeta,
) -> Result<(), SandboxError> {
    let root = templates_dir();
    let done = || root.join(&key.name).join("meta.json").exists();
    if done() {
        return Ok(());
    }
    meta.name.clone_from(&key.name);
    let partial = snapshot::partial_dir(&root, &key.name)?;
    let inputs = partial.join(INPUTS);
    let saved = match snapshotter(partial.clone()).await {
        Ok(()) => snapshot::write_private(&inputs, &key.inputs)
            .and_then(|()| snapshot::commit(&partial, &root, meta))
            .map(drop),
        Err(e) => Err(e.into()),
    };
    if saved.is_err() && partial.exists() {
        crate::logged(std::fs::remove_dir_all(&partial), "removing a failed template");
    }
    // A concurrent run that saved the same template first: theirs is as good.
    saved.or_else(|e| if done() { Ok(()) } else { Err(e) })
}

/// The file beside a template's metadata that records its [`Inputs`].
const INPUTS: &str = "inputs.json";

/// Whether the template in `dir` still has the inputs it was saved from (for `gc`).
fn is_current(dir: &Path) -> bool {
    let Some(inputs) = std::fs::read(dir.join(INPUTS)).ok().and_then(|t| serde_json::from_slice::<Inputs>(&t).ok())
    else {
        return false;
    };
    inputs.format == FORMAT
        && [&inputs.kernel, &inputs.boot_disk, &inputs.image_rootfs]
            .iter()
            .all(|file| FileId::of(&file.path).is_ok_and(|now| now == **file))
}

/// Removes the template `key` (it failed to resume). Machines resumed from it keep running.
pub(crate) fn discard(key: &str) {
    let dir = templates_dir().join(key);
    if dir.exists() {
        crate::logged(std::fs::remove_dir_all(&dir), "removing a broken template");
    }
}

/// Removes templates that can no longer be resumed (their kernel, guest-init or image is
/// gone or changed) and what crashed saves left; returns their names.
pub fn remove_stale() -> Vec<String> {
    let mut removed = snapshot::remove_leftovers_in(&templates_dir());
    for entry in std::fs::read_dir(templates_dir()).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        if !is_current(&entry.path()) && std::fs::remove_dir_all(entry.path()).is_ok() {
            removed.push(name);
        }
    }
    removed
}
