//! Building ext4 disk images from tar streams with e2fsprogs, without root.
//!
//! `mke2fs -d <tar>` (e2fsprogs >= 1.47.1) creates files, directories, symlinks, hard
//! links and device nodes with their owners and modes. It carries only
//! `security.capability` of the extended attributes over, so all of them are written
//! afterwards through libext2fs (`matchlock-ext2fs`): no image byte reaches a script.

use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use matchlock_ext2fs::{Ext2fsError, Filesystem};

const BLOCK_SIZE: u64 = 4096;

/// An extended attribute to set on a path inside the new file system.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Xattr {
    /// Absolute path inside the file system.
    pub path: PathBuf,
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
    /// An extended attribute the kernel would refuse.
    #[error("cannot set an extended attribute on {path:?}")]
    Xattr {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        #[source]
        source: XattrError,
    },
    /// libext2fs failed writing the attributes.
    #[error("cannot write extended attributes")]
    Ext2fs(#[from] Ext2fsError),
}

fn run(tool: &'static str, cmd: &mut Command) -> Result<(), Ext4Error> {
    let out = cmd.output().map_err(|source| Ext4Error::Spawn { tool, source })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        return Err(Ext4Error::Failed { tool, stderr: stderr.trim().to_owned() });
    }
    Ok(())
}

/// A size in bytes, large enough for `content_bytes` of file data in `entries` inodes.
pub fn estimate_size(content_bytes: u64, entries: u64) -> u64 {
    let data = content_bytes + entries * BLOCK_SIZE;
    let with_slack = data + data / 8 + 16 * 1024 * 1024;
    with_slack.div_ceil(BLOCK_SIZE) * BLOCK_SIZE
}

/// Options shared by every file system we create.
fn mke2fs(out: &Path, size_bytes: u64) -> Result<Command, Ext4Error> {
    let file =
        matchlock_api::paths::create_private(out).map_err(|source| Ext4Error::Io { path: out.to_owned(), source })?;
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

/// Creates `out` (a sparse file of `size_bytes`, no journal: it is mounted read-only) with a
/// copy of the directory tree `dir`: owners, modes, extended attributes, hard links, device
/// nodes and symbolic links as they are (mke2fs reads the tree itself, never following a
/// link; no name from it reaches a command line).
pub fn build_from_dir(dir: &Path, out: &Path, size_bytes: u64, inodes: u64) -> Result<(), Ext4Error> {
    let mut cmd = mke2fs(out, size_bytes)?;
    cmd.args(["-O", "^has_journal,^resize_inode", "-N"]).arg((inodes + 64).to_string()).arg("-d").arg(dir).arg(out);
    run("mke2fs", &mut cmd)
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

/// The longest extended attribute name the kernel accepts (`XATTR_NAME_MAX`).
pub const MAX_XATTR_NAME: usize = 255;
/// The largest extended attribute value the kernel accepts (`XATTR_SIZE_MAX`).
pub const MAX_XATTR_VALUE: usize = 64 * 1024;
/// The longest name of one path component the kernel accepts (`NAME_MAX`).
pub const MAX_NAME: usize = 255;
/// Namespaces a file's extended attribute can live in; the kernel refuses any other.
const XATTR_NAMESPACES: [&str; 3] = ["user.", "trusted.", "security."];
/// The only `system.` attributes a file system stores for a file (POSIX ACLs).
const SYSTEM_XATTRS: [&str; 2] = ["system.posix_acl_access", "system.posix_acl_default"];

/// Checks an extended attribute as the kernel's `setxattr` would: a name of at most 255
/// bytes, without NUL, in a namespace a file can carry, and a value of at most 64 KiB.
pub fn check_xattr(name: &str, value: &[u8]) -> Result<(), XattrError> {
    let known = XATTR_NAMESPACES.iter().any(|ns| name.len() > ns.len() && name.starts_with(ns))
        || SYSTEM_XATTRS.contains(&name);
    if name.len() > MAX_XATTR_NAME {
        Err(XattrError::NameTooLong(name.len()))
    } else if name.contains('\0') {
        Err(XattrError::Nul)
    } else if !known {
        Err(XattrError::Namespace(name.to_owned()))
    } else if value.len() > MAX_XATTR_VALUE {
        Err(XattrError::ValueTooLarge { name: name.to_owned(), len: value.len() })
    } else {
        Ok(())
    }
}

/// An extended attribute the kernel would refuse.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum XattrError {
    /// The name is longer than the kernel allows.
    #[error("an extended attribute name of {0} bytes is longer than {MAX_XATTR_NAME}")]
    NameTooLong(usize),
    /// The name holds a NUL byte.
    #[error("an extended attribute name contains a NUL byte")]
    Nul,
    /// The name is not UTF-8 (PAX records are).
    #[error("an extended attribute name is not UTF-8")]
    NotUtf8,
    /// The name is in no namespace a file can carry.
    #[error("extended attribute {0:?} is in no namespace a file can carry (user., trusted., security., POSIX ACLs)")]
    Namespace(String),
    /// The value is larger than the kernel allows.
    #[error("extended attribute {name:?} has a value of {len} bytes, more than {MAX_XATTR_VALUE}")]
    ValueTooLarge {
        /// The attribute.
        name: String,
        /// Its value's size.
        len: usize,
    },
}

/// Writes `xattrs` into the image through libext2fs: names, values and paths are passed
/// as arguments, never written into a script a tool parses. Each is checked first.
fn apply_xattrs(image: &Path, xattrs: &[Xattr]) -> Result<(), Ext4Error> {
    for x in xattrs {
        check_xattr(&x.name, &x.value).map_err(|source| Ext4Error::Xattr { path: x.path.clone(), source })?;
    }
    let mut fs = Filesystem::open(image)?;
    // One handle per file: consecutive attributes of the same path are set together.
    for same_file in xattrs.chunk_by(|a, b| a.path == b.path) {
        let attrs: Vec<(&str, &[u8])> = same_file.iter().map(|x| (x.name.as_str(), x.value.as_slice())).collect();
        fs.set_xattrs(same_file[0].path.as_os_str().as_bytes(), &attrs)?;
    }
    fs.close()?;
    Ok(())
}
