//! The workspace file system's wire protocol (reference §3.5, guest port [`crate::VFS_PORT`]): each message is a 4-byte big-endian length and a
//! CBOR map. Requests carry absolute guest paths; responses carry a negative errno or data.

use std::io::{Read, Write};

use serde::{Deserialize, Serialize};

/// Largest message accepted in either direction (a write of 1 MiB plus the envelope).
pub const MAX_MESSAGE: usize = 1024 * 1024 + 4096;
/// Largest read or write a request may ask for.
pub const MAX_IO: u32 = 1024 * 1024;

/// Operation codes (reference order, then matchlock's additions).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Op {
    /// Stat a path (same as getattr).
    Lookup = 0,
    /// Stat a path.
    Getattr = 1,
    /// Change the mode (`mode`) of a path.
    Setattr = 2,
    /// Read `sz` bytes at `off` from handle `fh`.
    Read = 3,
    /// Write `data` at `off` to handle `fh`; the answer's `stat` has the file's size and
    /// modification time after it (nothing else).
    Write = 4,
    /// Create (or truncate) a file; returns a handle and its stat.
    Create = 5,
    /// Make a directory.
    Mkdir = 6,
    /// Remove a file.
    Unlink = 7,
    /// Remove an empty directory.
    Rmdir = 8,
    /// Rename `path` to `new_path`, replacing it.
    Rename = 9,
    /// Open a file with `flags`; returns a handle.
    Open = 10,
    /// Close a handle.
    Release = 11,
    /// List a directory: with `sz`, at most `sz` entries from index `off` (the answer's
    /// `more` tells whether others follow); without, all of them.
    Readdir = 12,
    /// Flush a handle to stable storage.
    Fsync = 13,
    /// Make a directory and its parents.
    MkdirAll = 14,
    /// Set a file's size to `off`.
    Truncate = 15,
    /// Create a symlink at `path` whose target is `new_path` (reference: unsupported).
    Symlink = 16,
    /// Read a symlink.
    Readlink = 17,
    /// Hard-link `path` to `new_path`.
    Link = 18,
    /// Set the access and/or modification time (`atime_ns`, `mtime_ns`); returns the stat.
    Utimens = 19,
    /// File system statistics of the mount holding `path`.
    Statfs = 20,
    /// List a directory with every entry's attributes, for the guest's lookup cache: like
    /// `Readdir` (and paged the same way), but not reported as a `file` event (the guest's
    /// programs did not list it).
    List = 21,
    /// Change any of the mode (`new_mode`), the size (`new_size`) and the times (`atime_ns`,
    /// `mtime_ns`) in one request, in that order, as `Setattr`, `Truncate` and `Utimens`
    /// would; returns the stat after.
    Change = 22,
}

impl Op {
    /// The op for a wire code.
    pub fn from_code(code: u8) -> Option<Self> {
        use Op::*;
        [
            Lookup, Getattr, Setattr, Read, Write, Create, Mkdir, Unlink, Rmdir, Rename, Open, Release, Readdir, Fsync,
            MkdirAll, Truncate, Symlink, Readlink, Link, Utimens, Statfs, List, Change,
        ]
        .get(usize::from(code))
        .copied()
    }
}

/// A request from the guest.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Request {
    /// [`Op`] code.
    pub op: u8,
    /// Absolute guest path.
    pub path: String,
    /// Second path (rename, link).
    pub new_path: String,
    /// Handle.
    pub fh: u64,
    /// Offset (read, write) or size (truncate).
    pub off: i64,
    /// Size to read.
    pub sz: u32,
    /// Bytes to write.
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
    /// `open(2)` flags.
    pub flags: u32,
    /// Mode bits.
    pub mode: u32,
    /// Caller's uid.
    pub uid: u32,
    /// Caller's gid.
    pub gid: u32,
    /// New access time, nanoseconds since the epoch (`Utimens`; absent: unchanged).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub atime_ns: Option<i64>,
    /// New modification time, nanoseconds since the epoch (`Utimens`; absent: unchanged).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mtime_ns: Option<i64>,
    /// New permission bits (`Change`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub new_mode: Option<u32>,
    /// New size (`Change`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub new_size: Option<u64>,
    /// Send no response (a `Release` the guest does not wait for).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub quiet: bool,
}

/// File attributes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Stat {
    /// Size in bytes.
    pub size: u64,
    /// Permission bits (and file type bits).
    pub mode: u32,
    /// Modification time, Unix seconds.
    pub mtime: i64,
    /// Nanoseconds of the modification time.
    pub mtime_nsec: u32,
    /// Whether it is a directory.
    pub is_dir: bool,
    /// Stable inode number.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ino: Option<u64>,
    /// Number of hard links (host-side bookkeeping; absent on the wire when unknown).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nlink: Option<u64>,
}

/// A directory entry.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct DirEntry {
    /// File name.
    pub name: String,
    /// Whether it is a directory.
    pub is_dir: bool,
    /// Mode bits.
    pub mode: u32,
    /// Size.
    pub size: u64,
    /// Stable inode number.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ino: Option<u64>,
    /// Modification time, Unix seconds.
    pub mtime: i64,
    /// Nanoseconds of the modification time.
    pub mtime_nsec: u32,
    /// Number of hard links (absent when unknown).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nlink: Option<u64>,
}

impl DirEntry {
    /// The entry for `name` with attributes `stat`.
    pub fn new(name: String, stat: &Stat) -> Self {
        Self {
            name,
            is_dir: stat.is_dir,
            mode: stat.mode,
            size: stat.size,
            ino: stat.ino,
            mtime: stat.mtime,
            mtime_nsec: stat.mtime_nsec,
            nlink: stat.nlink,
        }
    }

    /// The entry's attributes.
    pub fn stat(&self) -> Stat {
        Stat {
            size: self.size,
            mode: self.mode,
            mtime: self.mtime,
            mtime_nsec: self.mtime_nsec,
            is_dir: self.is_dir,
            ino: self.ino,
            nlink: self.nlink,
        }
    }
}

/// A response to the guest.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Response {
    /// 0, or a negative errno.
    pub err: i32,
    /// Attributes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stat: Option<Stat>,
    /// Bytes read.
    #[serde(with = "serde_bytes", skip_serializing_if = "Vec::is_empty")]
    pub data: Vec<u8>,
    /// Bytes written.
    pub written: u32,
    /// Handle.
    pub fh: u64,
    /// Directory entries.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub entries: Vec<DirEntry>,
    /// File system statistics (`Statfs`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub statfs: Option<FsStats>,
    /// `Readdir`, `List`: `entries` are the whole directory with their real attributes, and no rule
    /// hides any of them, so the guest may answer lookups in it from them for a while.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub complete: bool,
    /// `Readdir`, `List` with a page size: entries follow this page.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub more: bool,
}

/// File system statistics, as `statvfs(3)` reports them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct FsStats {
    /// Size in fragments.
    pub blocks: u64,
    /// Free fragments.
    pub bfree: u64,
    /// Fragments free for unprivileged users.
    pub bavail: u64,
    /// Inodes.
    pub files: u64,
    /// Free inodes.
    pub ffree: u64,
    /// Preferred I/O size.
    pub bsize: u32,
    /// Longest file name.
    pub namelen: u32,
    /// Fragment size.
    pub frsize: u32,
}

impl Response {
    /// A failure with `errno` (positive).
    pub fn error(errno: i32) -> Self {
        Self { err: -errno, ..Self::default() }
    }
}

/// Errors on the wire.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The peer went away or the socket failed.
    #[error("VFS connection failed")]
    Io(#[from] std::io::Error),
    /// A message claims more than [`MAX_MESSAGE`] bytes.
    #[error("VFS message of {0} bytes exceeds the limit")]
    TooLarge(usize),
    /// A message is not valid CBOR of the expected shape.
    #[error("malformed VFS message: {0}")]
    Malformed(String),
}

/// Reads one message; `None` at a clean end of stream.
pub fn read_message<T: serde::de::DeserializeOwned>(reader: &mut impl Read) -> Result<Option<T>, WireError> {
    let mut len = [0u8; 4];
    match reader.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_MESSAGE {
        return Err(WireError::TooLarge(len));
    }
    let mut body = vec![0u8; len];
    reader.read_exact(&mut body)?;
    ciborium::from_reader(body.as_slice()).map(Some).map_err(|e| WireError::Malformed(e.to_string()))
}

/// Writes one message.
pub fn write_message(writer: &mut impl Write, message: &impl Serialize) -> Result<(), WireError> {
    // One buffer, one write: the length prefix and the body travel in the same packet.
    let mut buf = vec![0u8; 4];
    ciborium::into_writer(message, &mut buf).map_err(|e| WireError::Malformed(e.to_string()))?;
    let len = buf.len() - 4;
    if len > MAX_MESSAGE {
        return Err(WireError::TooLarge(len));
    }
    let prefix = u32::try_from(len).map_err(|_| WireError::TooLarge(len))?.to_be_bytes();
    buf[..4].copy_from_slice(&prefix);
    writer.write_all(&buf)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_bounds() {
        let request =
            Request { op: Op::Write as u8, path: "/workspace/a".into(), data: vec![1, 2, 3], ..Request::default() };
        let mut buf = Vec::new();
        write_message(&mut buf, &request).unwrap();
        assert_eq!(read_message::<Request>(&mut buf.as_slice()).unwrap(), Some(request));
        assert!(read_message::<Request>(&mut &[][..]).unwrap().is_none());
        let huge = (MAX_MESSAGE as u32 + 1).to_be_bytes();
        assert!(matches!(read_message::<Request>(&mut &huge[..]), Err(WireError::TooLarge(_))));
        let garbage = [0, 0, 0, 3, 0xff, 0xff, 0xff];
        assert!(matches!(read_message::<Request>(&mut &garbage[..]), Err(WireError::Malformed(_))));
        assert_eq!(Op::from_code(18), Some(Op::Link));
        assert_eq!(Op::from_code(20), Some(Op::Statfs));
        assert_eq!(Op::from_code(21), Some(Op::List));
        assert_eq!(Op::from_code(22), Some(Op::Change));
        assert_eq!(Op::from_code(23), None);
    }
}
