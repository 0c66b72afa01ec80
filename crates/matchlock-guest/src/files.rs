//! File requests on the exec port: write, read and list guest files for the host
//! (the JSON-RPC `write_file`, `read_file` and `list_files`). See
//! [`matchlock_protocol::files`] for the exchange.

use crate::mux::Stream;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use matchlock_protocol::files::{
    go_file_mode, FileEntry, FileRequest, FileResult, MAX_ENTRIES, MAX_READ_FILE, MAX_WRITE_FILE,
};
use matchlock_protocol::frame::{read_frame, write_frame, Frame, FrameError, FrameType};

/// Size of the content chunks sent to the host.
const CHUNK: usize = 256 * 1024;

/// Serves one file request whose first frame is `frame`.
pub(crate) fn serve(stream: &mut Stream, frame: &Frame) -> Result<(), FrameError> {
    let request: FileRequest = match serde_json::from_slice(&frame.payload) {
        Ok(r) => r,
        Err(e) => return reply(stream, Err(format!("invalid file request: {e}"))),
    };
    let outcome = match frame.kind {
        FrameType::WriteFile => write(stream, &request)?.map(|()| None),
        FrameType::ReadFile => read(stream, &request)?.map(|()| None),
        FrameType::ListFiles => list(&request).map(Some),
        _ => Err(format!("not a file request: {:?}", frame.kind)),
    };
    reply(stream, outcome)
}

/// Ends a request: the entries of a listing, or why it failed.
fn reply(stream: &mut Stream, outcome: Result<Option<Vec<FileEntry>>, String>) -> Result<(), FrameError> {
    let result = match outcome {
        Ok(files) => FileResult { files, error: None },
        Err(e) => FileResult { files: None, error: Some(e) },
    };
    write_frame(stream, FrameType::FileResult, &serde_json::to_vec(&result)?)
}

fn describe(path: &str, what: &str, e: &io::Error) -> String {
    format!("{what} {path}: {e}")
}

/// Receives the content and writes it: parents created, truncated, mode applied.
/// The content is always drained, so the connection stays in step on errors.
fn write(stream: &mut Stream, request: &FileRequest) -> Result<Result<(), String>, FrameError> {
    let path = request.path.as_str();
    let mode = if request.mode == 0 { 0o644 } else { request.mode & 0o7777 };
    let mut file: Result<File, String> = (|| {
        if !path.starts_with('/') {
            return Err(format!("path must be absolute: {path}"));
        }
        if let Some(parent) = Path::new(path).parent() {
            fs::create_dir_all(parent).map_err(|e| describe(path, "cannot create the parent of", &e))?;
        }
        OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(path)
            .map_err(|e| describe(path, "cannot create", &e))
    })();
    let mut written: u64 = 0;
    loop {
        let Some(chunk) = read_frame(stream)? else { return Err(FrameError::Truncated) };
        if chunk.kind != FrameType::Stdin {
            return Err(FrameError::Invalid { kind: chunk.kind, reason: "expected file content" });
        }
        if chunk.payload.is_empty() {
            break;
        }
        written += chunk.payload.len() as u64;
        if written > MAX_WRITE_FILE {
            file = Err(format!("file exceeds the {MAX_WRITE_FILE} byte limit: {path}"));
        }
        if let Ok(f) = &mut file {
            if let Err(e) = f.write_all(&chunk.payload) {
                file = Err(describe(path, "cannot write", &e));
            }
        }
    }
    Ok(file.and_then(|f| {
        f.set_permissions(fs::Permissions::from_mode(mode)).map_err(|e| describe(path, "cannot chmod", &e))
    }))
}

/// Sends a regular file's content as `Stdout` chunks.
fn read(stream: &mut Stream, request: &FileRequest) -> Result<Result<(), String>, FrameError> {
    let path = request.path.as_str();
    let mut file = match File::open(path) {
        Ok(f) => f,
        Err(e) => return Ok(Err(describe(path, "cannot open", &e))),
    };
    let meta = match file.metadata() {
        Ok(m) => m,
        Err(e) => return Ok(Err(describe(path, "cannot stat", &e))),
    };
    if !meta.is_file() {
        return Ok(Err(format!("not a regular file: {path}")));
    }
    if meta.len() > MAX_READ_FILE {
        return Ok(Err(format!("file is larger than {MAX_READ_FILE} bytes: {path}")));
    }
    let mut buf = vec![0u8; CHUNK];
    let mut sent: u64 = 0;
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => return Ok(Ok(())),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Ok(Err(describe(path, "cannot read", &e))),
        };
        sent += n as u64;
        if sent > MAX_READ_FILE {
            return Ok(Err(format!("file grew beyond {MAX_READ_FILE} bytes while reading: {path}")));
        }
        write_frame(stream, FrameType::Stdout, &buf[..n])?;
    }
}

fn list(request: &FileRequest) -> Result<Vec<FileEntry>, String> {
    let path = request.path.as_str();
    let mut files = Vec::new();
    for entry in fs::read_dir(path).map_err(|e| describe(path, "cannot list", &e))? {
        let entry = entry.map_err(|e| describe(path, "cannot list", &e))?;
        let Ok(meta) = entry.path().symlink_metadata() else { continue };
        if files.len() == MAX_ENTRIES {
            return Err(format!("{path} has more than {MAX_ENTRIES} entries"));
        }
        files.push(FileEntry {
            name: entry.file_name().to_string_lossy().into_owned(),
            size: meta.len(),
            mode: go_file_mode(meta.mode()),
            is_dir: meta.is_dir(),
        });
    }
    files.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(files)
}
