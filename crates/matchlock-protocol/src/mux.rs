//! Streams to numbered ports over one byte pipe: the QEMU backend's virtio-serial port.
//!
//! The host and the guest each open streams to the other's ports ("connect to port N", as on
//! vsock) and every stream is flow-controlled on its own, so one stalled reader never stalls
//! the pipe. Each frame is a [`HEADER_LEN`]-byte header (stream id, [`Kind`], payload length,
//! big-endian) and at most [`MAX_DATA`] bytes. Streams the host opens have even ids, streams
//! the guest opens odd ones; id 0 carries session control.
//!
//! A session starts with the host's [`Kind::Hello`] carrying a random session id; the guest
//! answers with the same `Hello`. A `Hello` with a new id resets every stream the guest
//! knows: this is how a VM restored from a snapshot drops the connections of the process
//! that saved it. The guest drops what reaches its port before it opens it, so when it does
//! it announces itself with an unsolicited `Paused`, which a host still waiting for its
//! answer takes as a cue to send its `Hello` again (same id: no reset). Before a snapshot the host
//! sends [`Kind::Pause`]; the guest answers [`Kind::Paused`] and sends nothing more until
//! [`Kind::Resume`] (same session) or `Hello` (a new one), so the saved pipe holds no
//! half-sent frame in either direction.

/// The virtio-serial port name the guest looks for (`/sys/class/virtio-ports/*/name`).
pub const PORT_NAME: &str = "matchlock.mux";
/// Bytes of a frame header.
pub const HEADER_LEN: usize = 9;
/// Largest payload of one frame.
pub const MAX_DATA: usize = 64 * 1024;
/// Bytes the guest may send on one stream before the host grants more ([`Kind::Credit`]):
/// what the host may have to hold for a stream, so it bounds host memory.
pub const TO_HOST_WINDOW: u32 = 256 * 1024;
/// Bytes the host may send on one stream before the guest grants more: held in the guest's
/// memory, and large enough that a 1 MiB workspace read does not wait for credit (a quarter
/// of the window is granted by one `Credit` frame, a guest write and a device notification
/// under TCG; reads ran ~30% faster than with the host's window).
pub const TO_GUEST_WINDOW: u32 = 1024 * 1024;

/// How much a receiver consumes before it grants credit (one `Credit` frame per batch, not
/// per chunk: a small request and its answer then cost two frames, not four): a quarter of
/// the sender's `window`, so the sender is never starved.
pub const fn credit_batch(window: u32) -> u32 {
    window / 4
}

/// What a frame means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Start of a session (stream 0): 8-byte session id.
    Hello = 1,
    /// Host: stop sending after your answer (stream 0).
    Pause = 2,
    /// Guest: nothing follows until `Resume` or `Hello` (stream 0).
    Paused = 3,
    /// Host: the paused session goes on (stream 0).
    Resume = 4,
    /// Open a stream to a port: 4-byte big-endian port.
    Open = 5,
    /// The port accepted the stream.
    Accept = 6,
    /// Nothing listens on that port (or too many streams are open).
    Refuse = 7,
    /// Stream bytes.
    Data = 8,
    /// The receiver consumed bytes: 4-byte big-endian count the sender may send again.
    Credit = 9,
    /// The sender will send no more on this stream (a half-close).
    Close = 10,
    /// The stream is gone in both directions.
    Reset = 11,
}

/// A malformed frame header: the peer is broken or hostile, the pipe cannot be trusted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MuxError {
    /// Unknown frame kind.
    #[error("unknown mux frame kind {0}")]
    Kind(u8),
    /// A payload length the kind does not allow.
    #[error("mux frame {kind:?} with a {len}-byte payload")]
    Length {
        /// The kind.
        kind: Kind,
        /// The announced length.
        len: u32,
    },
    /// Session control on a stream, or stream traffic on stream 0.
    #[error("mux frame {kind:?} on stream {stream}")]
    Stream {
        /// The kind.
        kind: Kind,
        /// The stream id.
        stream: u32,
    },
}

/// A decoded frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Stream id (0: session control).
    pub stream: u32,
    /// What the frame means.
    pub kind: Kind,
    /// Payload bytes that follow.
    pub len: u32,
}

impl Kind {
    fn from_u8(b: u8) -> Result<Self, MuxError> {
        Ok(match b {
            1 => Self::Hello,
            2 => Self::Pause,
            3 => Self::Paused,
            4 => Self::Resume,
            5 => Self::Open,
            6 => Self::Accept,
            7 => Self::Refuse,
            8 => Self::Data,
            9 => Self::Credit,
            10 => Self::Close,
            11 => Self::Reset,
            other => return Err(MuxError::Kind(other)),
        })
    }

    fn is_session(self) -> bool {
        matches!(self, Self::Hello | Self::Pause | Self::Paused | Self::Resume)
    }
}

impl Header {
    /// Parses and validates a header: known kind, a length the kind allows, control frames
    /// on stream 0 only and stream frames never there.
    pub fn decode(bytes: &[u8; HEADER_LEN]) -> Result<Self, MuxError> {
        let stream = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        let kind = Kind::from_u8(bytes[4])?;
        let len = u32::from_be_bytes([bytes[5], bytes[6], bytes[7], bytes[8]]);
        let len_ok = match kind {
            Kind::Open | Kind::Credit => len == 4,
            Kind::Hello => len == 8,
            Kind::Data => len >= 1 && len as usize <= MAX_DATA,
            _ => len == 0,
        };
        if !len_ok {
            return Err(MuxError::Length { kind, len });
        }
        if kind.is_session() != (stream == 0) {
            return Err(MuxError::Stream { kind, stream });
        }
        Ok(Self { stream, kind, len })
    }

    /// The header's bytes.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[..4].copy_from_slice(&self.stream.to_be_bytes());
        out[4] = self.kind as u8;
        out[5..].copy_from_slice(&self.len.to_be_bytes());
        out
    }
}

/// A whole frame: header and payload. `payload` must fit the kind (see [`Header::decode`]).
pub fn frame(stream: u32, kind: Kind, payload: &[u8]) -> Vec<u8> {
    debug_assert!(payload.len() <= MAX_DATA);
    let header = Header { stream, kind, len: payload.len() as u32 };
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&header.encode());
    out.extend_from_slice(payload);
    out
}

/// A frame with a 4-byte big-endian value (`Open`'s port, `Credit`'s count).
pub fn frame_u32(stream: u32, kind: Kind, value: u32) -> Vec<u8> {
    frame(stream, kind, &value.to_be_bytes())
}

/// The value of an `Open` or `Credit` payload (exactly 4 bytes after [`Header::decode`]).
pub fn payload_u32(payload: &[u8]) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&payload[..4]);
    u32::from_be_bytes(b)
}

/// Whether the host opened stream `id` (even ids; 0 is session control).
pub fn opened_by_host(id: u32) -> bool {
    id != 0 && id.is_multiple_of(2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_and_bad_ones_are_refused() {
        for (stream, kind, len) in
            [(0, Kind::Hello, 8), (2, Kind::Open, 4), (3, Kind::Data, 65536), (5, Kind::Credit, 4)]
        {
            let h = Header { stream, kind, len };
            assert_eq!(Header::decode(&h.encode()), Ok(h));
        }
        let bad = |stream: u32, kind: u8, len: u32| {
            let mut b = [0u8; HEADER_LEN];
            b[..4].copy_from_slice(&stream.to_be_bytes());
            b[4] = kind;
            b[5..].copy_from_slice(&len.to_be_bytes());
            Header::decode(&b).is_err()
        };
        assert!(bad(2, 0, 0), "kind 0");
        assert!(bad(2, 12, 0), "unknown kind");
        assert!(bad(2, Kind::Data as u8, 65537), "oversized data");
        assert!(bad(2, Kind::Data as u8, 0), "empty data");
        assert!(bad(2, Kind::Open as u8, 5), "open with 5 bytes");
        assert!(bad(0, Kind::Data as u8, 1), "data on stream 0");
        assert!(bad(4, Kind::Hello as u8, 0), "hello on a stream");
        assert!(bad(4, Kind::Close as u8, 1), "close with a payload");
    }

    #[test]
    fn ids_tell_who_opened_a_stream() {
        assert!(opened_by_host(2) && !opened_by_host(3) && !opened_by_host(0));
        assert_eq!(payload_u32(&frame_u32(2, Kind::Open, 5000)[HEADER_LEN..]), 5000);
    }
}
