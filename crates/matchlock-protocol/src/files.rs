//! File requests served by the guest agent on the exec port (`write_file`, `read_file`,
//! `list_files` of the JSON-RPC API): one request per connection, like exec.
//!
//! - write: `WriteFile` {path, mode}, then `Stdin` chunks, an empty one ends the
//!   content; the guest creates missing parent directories, writes, sets the mode and
//!   answers `FileResult`.
//! - read: `ReadFile` {path}; the guest answers `Stdout` chunks (regular files up to
//!   [`MAX_READ_FILE`]) and then `FileResult`.
//! - list: `ListFiles` {path}; `FileResult` carries the entries (at most [`MAX_ENTRIES`]).

use serde::{Deserialize, Serialize};

/// Largest file `read_file` returns (the reference limit).
pub const MAX_READ_FILE: u64 = 16 * 1024 * 1024;
/// Largest file `write_file` accepts.
pub const MAX_WRITE_FILE: u64 = 64 * 1024 * 1024;
/// Most directory entries one `list_files` answer carries (it must fit one frame).
pub const MAX_ENTRIES: usize = 8192;

/// A file request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileRequest {
    /// Absolute guest path.
    pub path: String,
    /// Permission bits for `WriteFile` (0 means 0644).
    #[serde(default)]
    pub mode: u32,
}

/// One directory entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// File name.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Go `os.FileMode` bits (the SDK wire format): permissions, plus
    /// [`GO_MODE_DIR`] or [`GO_MODE_SYMLINK`] and the other type bits.
    pub mode: u32,
    /// Whether it is a directory.
    pub is_dir: bool,
}

/// Outcome of a file request.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileResult {
    /// Directory entries (`ListFiles`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files: Option<Vec<FileEntry>>,
    /// Why the request failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Go `os.ModeDir`.
pub const GO_MODE_DIR: u32 = 1 << 31;
/// Go `os.ModeSymlink`.
pub const GO_MODE_SYMLINK: u32 = 1 << 27;
const GO_MODE_DEVICE: u32 = 1 << 26;
const GO_MODE_NAMED_PIPE: u32 = 1 << 25;
const GO_MODE_SOCKET: u32 = 1 << 24;
const GO_MODE_SETUID: u32 = 1 << 23;
const GO_MODE_SETGID: u32 = 1 << 22;
const GO_MODE_CHAR_DEVICE: u32 = 1 << 21;
const GO_MODE_STICKY: u32 = 1 << 20;

/// Converts a Unix `st_mode` to Go's `os.FileMode` bits.
pub fn go_file_mode(st_mode: u32) -> u32 {
    let mut mode = st_mode & 0o777;
    mode |= match st_mode & 0o170_000 {
        0o040_000 => GO_MODE_DIR,
        0o120_000 => GO_MODE_SYMLINK,
        0o060_000 => GO_MODE_DEVICE,
        0o020_000 => GO_MODE_DEVICE | GO_MODE_CHAR_DEVICE,
        0o010_000 => GO_MODE_NAMED_PIPE,
        0o140_000 => GO_MODE_SOCKET,
        _ => 0,
    };
    for (unix, go) in [(0o4000, GO_MODE_SETUID), (0o2000, GO_MODE_SETGID), (0o1000, GO_MODE_STICKY)] {
        if st_mode & unix != 0 {
            mode |= go;
        }
    }
    mode
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_modes() {
        assert_eq!(go_file_mode(0o100_644), 0o644);
        assert_eq!(go_file_mode(0o040_755), GO_MODE_DIR | 0o755);
        assert_eq!(go_file_mode(0o120_777), GO_MODE_SYMLINK | 0o777);
        assert_eq!(go_file_mode(0o104_755), GO_MODE_SETUID | 0o755);
        assert_eq!(go_file_mode(0o020_666), GO_MODE_DEVICE | GO_MODE_CHAR_DEVICE | 0o666);
    }

    #[test]
    fn requests_reject_unknown_fields() {
        assert!(serde_json::from_str::<FileRequest>(r#"{"path":"/a","evil":1}"#).is_err());
        let r: FileRequest = serde_json::from_str(r#"{"path":"/a"}"#).unwrap();
        assert_eq!(r.mode, 0);
    }
}
