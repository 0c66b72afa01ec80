//! Building ext4 disk images from tar streams with e2fsprogs, without root.
//!
//! `mke2fs -d <tar>` (e2fsprogs >= 1.47.1) creates files, directories, symlinks, hard
//! links and device nodes with their owners and modes. It does not carry extended
//! attributes over, so those are applied afterwards with `debugfs -w`.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

const BLOCK_SIZE: u64 = 4096;

/// An extended attribute to set on a path inside the new file system.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Xattr {
    /// Absolute path inside the file system.
    pub path: String,
    /// Attribute name (`user.x`, `trusted.overlay.opaque`, `security.capability`).
    pub name: String,
    /// Raw value.
    pub value: Vec<u8>,
}

/// Errors building an ext4 image.
#[derive(Debug, thiserror::Error)]
pub enum Ext4Error {
    /// A tool could not be started.
    #[error("cannot run {tool} (is e2fsprogs >= 1.47.1 installed? run scripts/setup.sh)")]
    Spawn {
        /// The tool.
        tool: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A tool ran and failed.
    #[error("{tool} failed: {stderr}")]
    Failed {
        /// The tool.
        tool: &'static str,
        /// What it printed.
        stderr: String,
    },
    /// Writing the image or a helper file failed.
    #[error("cannot write {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A path cannot be expressed in a debugfs command.
    #[error("cannot set extended attributes on {0:?}: unsupported characters in path")]
    UnsupportedPath(String),
}

fn run(tool: &'static str, cmd: &mut Command) -> Result<String, Ext4Error> {
    let out = cmd.output().map_err(|source| Ext4Error::Spawn { tool, source })?;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if !out.status.success() {
        return Err(Ext4Error::Failed { tool, stderr: stderr.trim().to_owned() });
    }
    Ok(stderr)
}

/// A size in bytes, large enough for `content_bytes` of file data in `entries` inodes.
pub fn estimate_size(content_bytes: u64, entries: u64) -> u64 {
    let data = content_bytes + entries * BLOCK_SIZE;
    let with_slack = data + data / 8 + 16 * 1024 * 1024;
    with_slack.div_ceil(BLOCK_SIZE) * BLOCK_SIZE
}

/// Options shared by every file system we create.
fn mke2fs(out: &Path, size_bytes: u64) -> Result<Command, Ext4Error> {
    let file = std::fs::File::create(out).map_err(|source| Ext4Error::Io { path: out.to_owned(), source })?;
    file.set_len(size_bytes).map_err(|source| Ext4Error::Io { path: out.to_owned(), source })?;
    let mut cmd = Command::new("mke2fs");
    cmd.env_clear()
        .envs(matchlock_api::HELPER_ENV)
        .args(["-q", "-F", "-t", "ext4", "-b", "4096", "-I", "256", "-m", "0"])
        .args(["-E", "root_owner=0:0,lazy_itable_init=1,lazy_journal_init=1,nodiscard"])
        .env("E2FSPROGS_FAKE_TIME", "0");
    Ok(cmd)
}

/// Creates `out` (a sparse file of `size_bytes`) with the contents of the tar at `tar`,
/// then applies `xattrs`. The image has no journal: it is mounted read-only.
pub fn build_from_tar(tar: &Path, out: &Path, size_bytes: u64, inodes: u64, xattrs: &[Xattr]) -> Result<(), Ext4Error> {
    let mut cmd = mke2fs(out, size_bytes)?;
    cmd.args(["-O", "^has_journal,^resize_inode", "-N"]).arg((inodes + 64).to_string()).arg("-d").arg(tar).arg(out);
    run("mke2fs", &mut cmd)?;
    if !xattrs.is_empty() {
        apply_xattrs(out, xattrs)?;
    }
    Ok(())
}

/// Creates a journaled ext4 file system of `size_bytes` in a sparse file, empty or holding
/// the contents of the tar at `seed`.
pub fn create_empty(out: &Path, size_bytes: u64, seed: Option<&Path>) -> Result<(), Ext4Error> {
    let mut cmd = mke2fs(out, size_bytes)?;
    if let Some(tar) = seed {
        cmd.arg("-d").arg(tar);
    }
    cmd.arg(out);
    run("mke2fs", &mut cmd)?;
    Ok(())
}

fn debugfs_quote(path: &str) -> Result<String, Ext4Error> {
    if path.contains(['"', '\n', '\\']) {
        return Err(Ext4Error::UnsupportedPath(path.to_owned()));
    }
    Ok(format!("\"{path}\""))
}

fn apply_xattrs(image: &Path, xattrs: &[Xattr]) -> Result<(), Ext4Error> {
    let dir = tempfile::tempdir().map_err(|source| Ext4Error::Io { path: image.to_owned(), source })?;
    let mut script = String::new();
    for (i, x) in xattrs.iter().enumerate() {
        let value_file = dir.path().join(format!("v{i}"));
        std::fs::write(&value_file, &x.value).map_err(|source| Ext4Error::Io { path: value_file.clone(), source })?;
        let _ = writeln!(
            script,
            "ea_set -f {} {} {}",
            debugfs_quote(&value_file.to_string_lossy())?,
            debugfs_quote(&x.path)?,
            debugfs_quote(&x.name)?
        );
    }
    let script_path = dir.path().join("cmds");
    let mut f =
        std::fs::File::create(&script_path).map_err(|source| Ext4Error::Io { path: script_path.clone(), source })?;
    f.write_all(script.as_bytes()).map_err(|source| Ext4Error::Io { path: script_path.clone(), source })?;
    drop(f);
    let stderr = run(
        "debugfs",
        Command::new("debugfs")
            .env_clear()
            .envs(matchlock_api::HELPER_ENV)
            .arg("-w")
            .arg("-f")
            .arg(&script_path)
            .arg(image),
    )?;
    // debugfs reports per-command failures on stderr but still exits 0.
    let failures: Vec<&str> = stderr.lines().filter(|l| !l.starts_with("debugfs ") && !l.trim().is_empty()).collect();
    if !failures.is_empty() {
        return Err(Ext4Error::Failed { tool: "debugfs", stderr: failures.join("; ") });
    }
    Ok(())
}
