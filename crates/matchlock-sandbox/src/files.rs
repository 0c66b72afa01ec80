//! Writing, reading and listing guest files through the guest agent (the JSON-RPC
//! `write_file`, `read_file` and `list_files`).

use matchlock_protocol::files::{FileEntry, FileRequest, FileResult, MAX_READ_FILE};
use matchlock_protocol::frame::tokio_io::{read_frame, write_frame};
use matchlock_protocol::frame::{FrameError, FrameType};
use matchlock_protocol::EXEC_PORT;
use tokio::net::UnixStream;

use crate::{Sandbox, SandboxError};

/// Content chunk size sent to the guest (below the frame limit).
const CHUNK: usize = 256 * 1024;

impl Sandbox {
    /// Writes `content` to `path` in the guest (parent directories created; `mode` 0
    /// means 0644).
    pub async fn write_file(&self, path: &str, content: &[u8], mode: u32) -> Result<(), SandboxError> {
        let mut conn = self.file_request(FrameType::WriteFile, path, mode).await?;
        for chunk in content.chunks(CHUNK) {
            write_frame(&mut conn, FrameType::Stdin, chunk).await?;
        }
        write_frame(&mut conn, FrameType::Stdin, &[]).await?;
        finish(&mut conn).await.map(drop)
    }

    /// Reads the regular file `path` from the guest (at most 16 MiB).
    pub async fn read_file(&self, path: &str) -> Result<Vec<u8>, SandboxError> {
        read_file_on(self.connect(EXEC_PORT).await?, path).await
    }

    /// Lists the directory `path` in the guest, sorted by name.
    pub async fn list_files(&self, path: &str) -> Result<Vec<FileEntry>, SandboxError> {
        let mut conn = self.file_request(FrameType::ListFiles, path, 0).await?;
        finish(&mut conn).await
    }

    async fn file_request(&self, kind: FrameType, path: &str, mode: u32) -> Result<UnixStream, SandboxError> {
        let mut conn = self.connect(EXEC_PORT).await?;
        send_request(&mut conn, kind, path, mode).await?;
        Ok(conn)
    }
}

/// Reads the regular file `path` from the guest on `conn`, a new connection to the agent's
/// port (at most 16 MiB).
pub(crate) async fn read_file_on(mut conn: UnixStream, path: &str) -> Result<Vec<u8>, SandboxError> {
    send_request(&mut conn, FrameType::ReadFile, path, 0).await?;
    let mut content = Vec::new();
    loop {
        let frame = read_frame(&mut conn).await?.ok_or(FrameError::Truncated)?;
        match frame.kind {
            FrameType::Stdout => {
                if (content.len() + frame.payload.len()) as u64 > MAX_READ_FILE {
                    return Err(SandboxError::File(format!("{path} exceeds {MAX_READ_FILE} bytes")));
                }
                content.extend_from_slice(&frame.payload);
            }
            FrameType::FileResult => {
                decode_result(&frame.payload)?;
                return Ok(content);
            }
            kind => return Err(FrameError::Invalid { kind, reason: "unexpected in a file read" }.into()),
        }
    }
}

/// Sends a file request.
async fn send_request(conn: &mut UnixStream, kind: FrameType, path: &str, mode: u32) -> Result<(), SandboxError> {
    let request = FileRequest { path: path.to_owned(), mode };
    Ok(write_frame(conn, kind, &serde_json::to_vec(&request).expect("request serializes")).await?)
}

/// Reads the `FileResult` that ends a request.
async fn finish(conn: &mut UnixStream) -> Result<Vec<FileEntry>, SandboxError> {
    let frame = read_frame(conn).await?.ok_or(FrameError::Truncated)?;
    if frame.kind != FrameType::FileResult {
        return Err(FrameError::Invalid { kind: frame.kind, reason: "expected a file result" }.into());
    }
    decode_result(&frame.payload)
}

fn decode_result(payload: &[u8]) -> Result<Vec<FileEntry>, SandboxError> {
    let result: FileResult = serde_json::from_slice(payload).map_err(FrameError::from)?;
    match result.error {
        Some(e) => Err(SandboxError::File(e)),
        None => Ok(result.files.unwrap_or_default()),
    }
}
