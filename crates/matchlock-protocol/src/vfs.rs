//! The workspace file system's wire protocol (reference §3.5, guest port [`crate::VFS_PORT`]).
//! Requests carry absolute guest paths; responses carry a negative errno or data.
//!
//! Each message is a CBOR map and the bytes it carries (`data`: a write's, a read's answer)
//! after it, raw: a 4-byte big-endian length of the map, a 4-byte big-endian length of the
//! data, the map, the data. (The reference puts the data in the map as a CBOR byte string;
//! decoding one copies it several times, and under TCG every copy in the guest costs.)

use std::io::{Read, Write};

use serde::{Deserialize, Serialize};

/// Largest message accepted in either direction, map and data (a write of 1 MiB plus the map).
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
    /// Bytes to write (after the map on the wire).
    #[serde(skip)]
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
    /// Bytes read, or a symlink's target (after the map on the wire).
    #[serde(skip)]
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
    /// `Open`: an identity of the file's content, different after any change to it, so
    /// the guest may keep what it cached of the file when it is the same as at its last
    /// open. Absent when that cannot be told (a change too recent for its timestamps to
    /// set it apart from the next), or when every read must reach the host (a rule or
    /// file events in force).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
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

/// A message of the protocol: a CBOR map, and the bytes that travel raw after it.
pub trait Message: Serialize + serde::de::DeserializeOwned {
    /// The bytes sent after the map.
    fn data(&self) -> &[u8];
    /// Takes the bytes that came after the map.
    fn set_data(&mut self, data: Vec<u8>);
}

impl Message for Request {
    fn data(&self) -> &[u8] {
        &self.data
    }

    fn set_data(&mut self, data: Vec<u8>) {
        self.data = data;
    }
}

impl Message for Response {
    fn data(&self) -> &[u8] {
        &self.data
    }

    fn set_data(&mut self, data: Vec<u8>) {
        self.data = data;
    }
}

/// Data up to this size is copied behind the map and sent with it in one write; larger
/// data is written on its own, not copied.
const INLINE_DATA: usize = 16 * 1024;

/// Reads one message; `None` at a clean end of stream.
pub fn read_message<T: Message>(reader: &mut impl Read) -> Result<Option<T>, WireError> {
    let mut lengths = [0u8; 8];
    match reader.read_exact(&mut lengths) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let map_len = u32::from_be_bytes([lengths[0], lengths[1], lengths[2], lengths[3]]) as usize;
    let data_len = u32::from_be_bytes([lengths[4], lengths[5], lengths[6], lengths[7]]) as usize;
    let total = map_len.saturating_add(data_len);
    if total > MAX_MESSAGE {
        return Err(WireError::TooLarge(total));
    }
    let mut map = vec![0u8; map_len];
    reader.read_exact(&mut map)?;
    let mut message: T = ciborium::from_reader(map.as_slice()).map_err(|e| WireError::Malformed(e.to_string()))?;
    if data_len > 0 {
        let mut data = Vec::with_capacity(data_len);
        if reader.take(data_len as u64).read_to_end(&mut data)? != data_len {
            return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
        }
        message.set_data(data);
    }
    Ok(Some(message))
}

/// Writes one message.
pub fn write_message(writer: &mut impl Write, message: &impl Message) -> Result<(), WireError> {
    write_with_data(writer, message, message.data())
}

/// Writes one message with `data` as its data (in place of the message's own, which is
/// not sent): the caller's bytes are not copied into the message first.
pub fn write_with_data(writer: &mut impl Write, message: &impl Serialize, data: &[u8]) -> Result<(), WireError> {
    let mut buf = vec![0u8; 8];
    ciborium::into_writer(message, &mut buf).map_err(|e| WireError::Malformed(e.to_string()))?;
    let map_len = buf.len() - 8;
    let total = map_len.saturating_add(data.len());
    if total > MAX_MESSAGE {
        return Err(WireError::TooLarge(total));
    }
    // Both fit in a u32: their sum is at most MAX_MESSAGE.
    buf[..4].copy_from_slice(&(map_len as u32).to_be_bytes());
    buf[4..8].copy_from_slice(&(data.len() as u32).to_be_bytes());
    if data.len() <= INLINE_DATA {
        // One buffer, one write: small messages travel in one packet.
        buf.extend_from_slice(data);
        writer.write_all(&buf)?;
    } else {
        writer.write_all(&buf)?;
        writer.write_all(data)?;
    }
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
        let huge = [(MAX_MESSAGE as u32 - 8).to_be_bytes(), 9u32.to_be_bytes()].concat();
        assert!(matches!(read_message::<Request>(&mut &huge[..]), Err(WireError::TooLarge(_))));
        let overflow = [u32::MAX.to_be_bytes(), u32::MAX.to_be_bytes()].concat();
        assert!(matches!(read_message::<Request>(&mut &overflow[..]), Err(WireError::TooLarge(_))));
        let garbage = [0, 0, 0, 3, 0, 0, 0, 0, 0xff, 0xff, 0xff];
        assert!(matches!(read_message::<Request>(&mut &garbage[..]), Err(WireError::Malformed(_))));
        // Data after the map, small (sent inline) and large (a write of its own).
        for size in [1, INLINE_DATA + 1, MAX_IO as usize] {
            let response = Response { data: vec![7; size], fh: 9, ..Response::default() };
            let mut buf = Vec::new();
            write_message(&mut buf, &response).unwrap();
            assert_eq!(read_message::<Response>(&mut buf.as_slice()).unwrap(), Some(response));
        }
        // Data cut short is an error, not a shorter read.
        let mut buf = Vec::new();
        write_message(&mut buf, &Response { data: vec![7; 100], ..Response::default() }).unwrap();
        buf.truncate(buf.len() - 1);
        assert!(matches!(read_message::<Response>(&mut buf.as_slice()), Err(WireError::Io(_))));
        let too_much = Response { data: vec![0; MAX_MESSAGE], ..Response::default() };
        assert!(matches!(write_message(&mut Vec::new(), &too_much), Err(WireError::TooLarge(_))));
        assert_eq!(Op::from_code(18), Some(Op::Link));
        assert_eq!(Op::from_code(20), Some(Op::Statfs));
        assert_eq!(Op::from_code(21), Some(Op::List));
        assert_eq!(Op::from_code(22), Some(Op::Change));
        assert_eq!(Op::from_code(23), None);
    }
}
