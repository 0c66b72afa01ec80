//! Frame format: 1-byte type, 4-byte big-endian payload length, payload.

use std::io::{self, Read, Write};

/// Largest payload accepted in either direction. Output is chunked well below this.
pub const MAX_PAYLOAD_LEN: usize = 1 << 20;
/// Size of the frame header.
pub const HEADER_LEN: usize = 5;

/// Frame types on the exec port (values from the original matchlock wire format).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameType {
    /// Output of the command's stdout (guest -> host).
    Stdout = 3,
    /// Output of the command's stderr, or an error message (guest -> host).
    Stderr = 4,
    /// A signal number for the command's process group (host -> guest).
    Signal = 5,
    /// Input for the command's stdin; an empty payload is EOF (host -> guest).
    Stdin = 7,
    /// Terminal size: rows u16 BE, cols u16 BE (host -> guest).
    Resize = 8,
    /// Run a command on a pseudo-terminal (host -> guest, JSON [`crate::exec::ExecRequest`]).
    ExecTty = 9,
    /// The command finished: exit code i32 BE (guest -> host).
    Exit = 10,
    /// Run a command with stdin closed, streaming its output.
    ExecStream = 11,
    /// Run a command with stdin forwarded from the host.
    ExecPipe = 12,
    /// Write a file (host -> guest, JSON [`crate::files::FileRequest`]); the content
    /// follows as `Stdin` chunks ended by an empty one; answered with `FileResult`.
    WriteFile = 14,
    /// Read a regular file (host -> guest, JSON [`crate::files::FileRequest`]); the
    /// content comes back as `Stdout` chunks, then `FileResult`.
    ReadFile = 15,
    /// List a directory (host -> guest, JSON [`crate::files::FileRequest`]); answered
    /// with `FileResult` carrying the entries.
    ListFiles = 16,
    /// The outcome of a file request (guest -> host, JSON [`crate::files::FileResult`]).
    FileResult = 17,
    /// Prepare for the VM to stop: sync, and remount the extra disks read-only so they
    /// are clean on the host (host -> guest, empty; answered with `Exit`).
    Quiesce = 32,
    /// The VM was restored from a snapshot: take on this sandbox's identity, clock and
    /// fresh entropy before anything else runs (host -> guest, JSON
    /// [`crate::boot::Restored`]; answered with `Exit`).
    Restored = 33,
    /// Stream the root file system's changes as one OCI layer tar, every other process
    /// stopped meanwhile (host -> guest, empty; answered with `Stdout` chunks of the tar,
    /// then `Exit`, or `Stderr` and a failing `Exit`).
    Commit = 34,
    /// Unpack a layer tar into the root file system (host -> guest, empty; then the tar in
    /// `Stdin` frames and an empty `Stdin` for its end; answered with `Exit`, or `Stderr`
    /// and a failing `Exit`). Layers with whiteouts are refused.
    ApplyLayer = 35,
}

impl TryFrom<u8> for FrameType {
    type Error = FrameError;

    fn try_from(value: u8) -> Result<Self, FrameError> {
        Ok(match value {
            3 => Self::Stdout,
            4 => Self::Stderr,
            5 => Self::Signal,
            7 => Self::Stdin,
            8 => Self::Resize,
            9 => Self::ExecTty,
            10 => Self::Exit,
            11 => Self::ExecStream,
            12 => Self::ExecPipe,
            14 => Self::WriteFile,
            15 => Self::ReadFile,
            16 => Self::ListFiles,
            17 => Self::FileResult,
            32 => Self::Quiesce,
            33 => Self::Restored,
            34 => Self::Commit,
            35 => Self::ApplyLayer,
            other => return Err(FrameError::UnknownType(other)),
        })
    }
}

/// One decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// What the payload means.
    pub kind: FrameType,
    /// The payload, at most [`MAX_PAYLOAD_LEN`] bytes.
    pub payload: Vec<u8>,
}

/// Errors reading or decoding frames.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The transport failed.
    #[error("frame I/O failed")]
    Io(#[from] io::Error),
    /// The peer sent a type byte this protocol does not define.
    #[error("unknown frame type {0}")]
    UnknownType(u8),
    /// The peer announced a payload larger than [`MAX_PAYLOAD_LEN`].
    #[error("frame payload of {0} bytes exceeds the {MAX_PAYLOAD_LEN} byte limit")]
    TooLarge(usize),
    /// The connection ended inside a frame.
    #[error("connection closed in the middle of a frame")]
    Truncated,
    /// A frame arrived where it makes no sense, or with a payload of the wrong shape.
    #[error("invalid {kind:?} frame: {reason}")]
    Invalid {
        /// The frame type.
        kind: FrameType,
        /// What was wrong.
        reason: &'static str,
    },
    /// A JSON payload did not parse.
    #[error("invalid JSON payload")]
    Json(#[from] serde_json::Error),
}

/// Encodes a frame header.
pub fn header(kind: FrameType, len: usize) -> Result<[u8; HEADER_LEN], FrameError> {
    if len > MAX_PAYLOAD_LEN {
        return Err(FrameError::TooLarge(len));
    }
    let mut h = [0u8; HEADER_LEN];
    h[0] = kind as u8;
    // The bound above keeps `len` far below u32::MAX.
    h[1..].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(h)
}

/// Decodes a frame header into its type and validated payload length.
pub fn parse_header(h: [u8; HEADER_LEN]) -> Result<(FrameType, usize), FrameError> {
    let kind = FrameType::try_from(h[0])?;
    let len = u32::from_be_bytes([h[1], h[2], h[3], h[4]]) as usize;
    if len > MAX_PAYLOAD_LEN {
        return Err(FrameError::TooLarge(len));
    }
    Ok((kind, len))
}

/// Writes one frame.
pub fn write_frame<W: Write>(w: &mut W, kind: FrameType, payload: &[u8]) -> Result<(), FrameError> {
    w.write_all(&header(kind, payload.len())?)?;
    w.write_all(payload)?;
    w.flush()?;
    Ok(())
}

/// Reads one frame; `Ok(None)` when the peer closed the connection between frames.
pub fn read_frame<R: Read>(r: &mut R) -> Result<Option<Frame>, FrameError> {
    let mut h = [0u8; HEADER_LEN];
    let mut filled = 0;
    while filled < HEADER_LEN {
        match r.read(&mut h[filled..]) {
            Ok(0) if filled == 0 => return Ok(None),
            Ok(0) => return Err(FrameError::Truncated),
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let (kind, len) = parse_header(h)?;
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => FrameError::Truncated,
        _ => FrameError::Io(e),
    })?;
    Ok(Some(Frame { kind, payload }))
}

/// Async frame I/O for tokio-based peers (the host).
#[cfg(feature = "tokio")]
pub mod tokio_io {
    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

    use super::{header, parse_header, Frame, FrameError, FrameType, HEADER_LEN};

    /// Writes one frame.
    pub async fn write_frame<W: AsyncWrite + Unpin>(
        w: &mut W,
        kind: FrameType,
        payload: &[u8],
    ) -> Result<(), FrameError> {
        w.write_all(&header(kind, payload.len())?).await?;
        w.write_all(payload).await?;
        w.flush().await?;
        Ok(())
    }

    /// Reads one frame; `Ok(None)` when the peer closed the connection between frames.
    pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<Frame>, FrameError> {
        let mut h = [0u8; HEADER_LEN];
        let mut filled = 0;
        while filled < HEADER_LEN {
            match r.read(&mut h[filled..]).await? {
                0 if filled == 0 => return Ok(None),
                0 => return Err(FrameError::Truncated),
                n => filled += n,
            }
        }
        let (kind, len) = parse_header(h)?;
        let mut payload = vec![0u8; len];
        r.read_exact(&mut payload).await.map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => FrameError::Truncated,
            _ => FrameError::Io(e),
        })?;
        Ok(Some(Frame { kind, payload }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let mut buf = Vec::new();
        write_frame(&mut buf, FrameType::Stdout, b"hello").unwrap();
        assert_eq!(buf[..5], [3, 0, 0, 0, 5]);
        let frame = read_frame(&mut buf.as_slice()).unwrap().unwrap();
        assert_eq!(frame, Frame { kind: FrameType::Stdout, payload: b"hello".to_vec() });
    }

    #[test]
    fn clean_eof_between_frames_is_none() {
        assert!(read_frame(&mut [].as_slice()).unwrap().is_none());
    }

    #[test]
    fn truncated_header_and_payload_are_errors() {
        assert!(matches!(read_frame(&mut [3u8, 0].as_slice()), Err(FrameError::Truncated)));
        assert!(matches!(read_frame(&mut [3u8, 0, 0, 0, 9, 1].as_slice()), Err(FrameError::Truncated)));
    }

    #[test]
    fn oversized_length_is_rejected_before_allocating() {
        let h = [3u8, 0xff, 0xff, 0xff, 0xff];
        assert!(matches!(read_frame(&mut h.as_slice()), Err(FrameError::TooLarge(_))));
        assert!(matches!(header(FrameType::Stdout, MAX_PAYLOAD_LEN + 1), Err(FrameError::TooLarge(_))));
    }

    #[test]
    fn unknown_type_is_rejected() {
        assert!(matches!(read_frame(&mut [200u8, 0, 0, 0, 0].as_slice()), Err(FrameError::UnknownType(200))));
    }
}
