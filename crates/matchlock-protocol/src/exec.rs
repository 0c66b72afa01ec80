//! Exec requests and the messages exchanged while a command runs.
//!
//! A connection to the exec port carries exactly one command: the host sends one
//! request frame ([`ExecMode`] decides its type), then [`HostMessage`]s; the guest
//! answers with [`GuestMessage`]s and ends with [`GuestMessage::Exit`]. Closing the
//! connection cancels the command.

use serde::{Deserialize, Serialize};

use crate::frame::{Frame, FrameError, FrameType};

/// How the command's stdio is connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExecMode {
    /// stdin is empty; stdout and stderr stream back separately.
    Stream,
    /// As `Stream`, and the host forwards stdin (EOF included).
    Pipe,
    /// stdin/stdout/stderr are one pseudo-terminal.
    Tty,
}

impl ExecMode {
    /// The frame type that carries a request in this mode.
    pub fn frame_type(self) -> FrameType {
        match self {
            Self::Stream => FrameType::ExecStream,
            Self::Pipe => FrameType::ExecPipe,
            Self::Tty => FrameType::ExecTty,
        }
    }

    /// The mode a request frame type selects, if it is one.
    pub fn from_frame_type(kind: FrameType) -> Option<Self> {
        match kind {
            FrameType::ExecStream => Some(Self::Stream),
            FrameType::ExecPipe => Some(Self::Pipe),
            FrameType::ExecTty => Some(Self::Tty),
            _ => None,
        }
    }
}

/// A terminal size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowSize {
    /// Rows.
    pub rows: u16,
    /// Columns.
    pub cols: u16,
}

/// A command to run in the guest. The argv is executed directly (no shell).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    /// Program and arguments; the program is looked up in `PATH` when it has no `/`.
    pub argv: Vec<String>,
    /// Environment, in order; a later entry for the same key wins.
    #[serde(default)]
    pub env: Vec<(String, String)>,
    /// Working directory; `/` when absent.
    #[serde(default)]
    pub working_dir: Option<String>,
    /// `name`, `uid` or `uid:gid`, resolved in the guest's /etc/passwd; root when absent.
    #[serde(default)]
    pub user: Option<String>,
    /// Initial terminal size (TTY mode only).
    #[serde(default)]
    pub window: Option<WindowSize>,
    /// Resource limits the command starts with (an OCI spec's `rlimits`); the guest's
    /// defaults when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rlimits: Vec<Rlimit>,
    /// A directory of the guest to run the command in as its root file system (a pod's
    /// container); the guest's `/proc`, `/sys`, `/dev` and its `/etc/hosts`, `/etc/hostname`
    /// and `/etc/resolv.conf` are mounted into it. The guest's own root when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root: Option<String>,
    /// Directories or files of the guest bound into [`ExecRequest::root`] (a pod's
    /// container's volumes), in order; only with a root.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub binds: Vec<Bind>,
}

/// At most this many binds in a request.
pub const MAX_BINDS: usize = 64;

/// A directory or file of the guest bound into a command's root file system.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bind {
    /// The guest's path (before the root is entered).
    pub source: String,
    /// Where it appears, inside the root (symbolic links resolved within the root).
    pub target: String,
    /// Mounted read-only.
    #[serde(default)]
    pub read_only: bool,
}

/// At most this many limits in a request (there are 16 resources).
pub const MAX_RLIMITS: usize = 16;

/// A resource limit (`setrlimit`), as an OCI spec names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rlimit {
    /// Which resource.
    pub resource: RlimitResource,
    /// The soft limit (`u64::MAX`: unlimited).
    pub soft: u64,
    /// The hard limit (`u64::MAX`: unlimited).
    pub hard: u64,
}

/// The resources of `setrlimit(2)`.
#[allow(missing_docs)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum RlimitResource {
    RlimitAs,
    RlimitCore,
    RlimitCpu,
    RlimitData,
    RlimitFsize,
    RlimitLocks,
    RlimitMemlock,
    RlimitMsgqueue,
    RlimitNice,
    RlimitNofile,
    RlimitNproc,
    RlimitRss,
    RlimitRtprio,
    RlimitRttime,
    RlimitSigpending,
    RlimitStack,
}

/// Errors decoding an [`ExecRequest`].
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The frame is not a request frame.
    #[error("expected an exec request, got a {0:?} frame")]
    NotARequest(FrameType),
    /// The request JSON did not parse.
    #[error("invalid exec request")]
    Json(#[from] serde_json::Error),
    /// The argv was empty.
    #[error("exec request has an empty argv")]
    EmptyArgv,
    /// A string carried a NUL byte, which cannot reach execve.
    #[error("exec request contains a NUL byte")]
    NulByte,
    /// A resource limit is malformed (soft above hard, or too many).
    #[error("exec request has an invalid resource limit")]
    Rlimit,
    /// The root is not an absolute, clean path.
    #[error("exec request has an invalid root {0:?}")]
    Root(String),
    /// A bind without a root, with a path that is not absolute and clean, or too many.
    #[error("exec request has an invalid bind {0:?}")]
    Bind(String),
}

impl ExecRequest {
    /// Encodes the request as the payload of a request frame.
    pub fn to_payload(&self) -> Vec<u8> {
        // Serializing plain strings and integers cannot fail.
        serde_json::to_vec(self).expect("ExecRequest serializes")
    }

    /// Decodes and validates a request frame.
    pub fn from_frame(frame: &Frame) -> Result<(ExecMode, Self), RequestError> {
        let mode = ExecMode::from_frame_type(frame.kind).ok_or(RequestError::NotARequest(frame.kind))?;
        let req: Self = serde_json::from_slice(&frame.payload)?;
        if req.argv.is_empty() {
            return Err(RequestError::EmptyArgv);
        }
        let strings = req
            .argv
            .iter()
            .chain(req.env.iter().flat_map(|(k, v)| [k, v]))
            .chain(req.working_dir.iter())
            .chain(req.user.iter())
            .chain(req.root.iter());
        for s in strings {
            if s.contains('\0') {
                return Err(RequestError::NulByte);
            }
        }
        if req.rlimits.len() > MAX_RLIMITS || req.rlimits.iter().any(|r| r.soft > r.hard) {
            return Err(RequestError::Rlimit);
        }
        if let Some(root) = &req.root {
            if !crate::boot::is_valid_mount_path(root) {
                return Err(RequestError::Root(root.clone()));
            }
        }
        if req.binds.len() > MAX_BINDS {
            return Err(RequestError::Bind(format!("{} binds (at most {MAX_BINDS})", req.binds.len())));
        }
        let valid = |b: &Bind| {
            req.root.is_some()
                && crate::boot::is_valid_mount_path(&b.source)
                && crate::boot::is_valid_mount_path(&b.target)
        };
        if let Some(bad) = req.binds.iter().find(|b| !valid(b)) {
            return Err(RequestError::Bind(format!("{} at {}", bad.source, bad.target)));
        }
        Ok((mode, req))
    }
}

/// What the host sends after the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostMessage {
    /// Bytes for the command's stdin.
    Stdin(Vec<u8>),
    /// stdin reached end of file.
    StdinEof,
    /// The host terminal changed size.
    Resize(WindowSize),
    /// Deliver this signal to the command's process group.
    Signal(u8),
}

impl HostMessage {
    /// Encodes the message as a frame.
    pub fn to_frame(&self) -> (FrameType, Vec<u8>) {
        match self {
            Self::Stdin(data) => (FrameType::Stdin, data.clone()),
            Self::StdinEof => (FrameType::Stdin, Vec::new()),
            Self::Resize(ws) => {
                let mut p = ws.rows.to_be_bytes().to_vec();
                p.extend_from_slice(&ws.cols.to_be_bytes());
                (FrameType::Resize, p)
            }
            Self::Signal(sig) => (FrameType::Signal, vec![*sig]),
        }
    }

    /// Decodes and validates a frame from the host.
    pub fn from_frame(frame: Frame) -> Result<Self, FrameError> {
        let invalid = |reason| FrameError::Invalid { kind: frame.kind, reason };
        match frame.kind {
            FrameType::Stdin if frame.payload.is_empty() => Ok(Self::StdinEof),
            FrameType::Stdin => Ok(Self::Stdin(frame.payload)),
            FrameType::Resize => match frame.payload[..] {
                [r0, r1, c0, c1] => Ok(Self::Resize(WindowSize {
                    rows: u16::from_be_bytes([r0, r1]),
                    cols: u16::from_be_bytes([c0, c1]),
                })),
                _ => Err(invalid("payload must be 4 bytes")),
            },
            FrameType::Signal => match frame.payload[..] {
                [sig] if (1..=64).contains(&sig) => Ok(Self::Signal(sig)),
                _ => Err(invalid("payload must be one signal number in 1..=64")),
            },
            _ => Err(invalid("not a message the host sends during exec")),
        }
    }
}

/// What the guest sends while the command runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestMessage {
    /// Output on stdout (in TTY mode: all terminal output).
    Stdout(Vec<u8>),
    /// Output on stderr, or a message from the agent itself.
    Stderr(Vec<u8>),
    /// The command ended with this exit code (128+N for a death by signal N).
    Exit(i32),
}

impl GuestMessage {
    /// Encodes the message as a frame.
    pub fn to_frame(&self) -> (FrameType, Vec<u8>) {
        match self {
            Self::Stdout(d) => (FrameType::Stdout, d.clone()),
            Self::Stderr(d) => (FrameType::Stderr, d.clone()),
            Self::Exit(code) => (FrameType::Exit, code.to_be_bytes().to_vec()),
        }
    }

    /// Decodes and validates a frame from the guest.
    pub fn from_frame(frame: Frame) -> Result<Self, FrameError> {
        match frame.kind {
            FrameType::Stdout => Ok(Self::Stdout(frame.payload)),
            FrameType::Stderr => Ok(Self::Stderr(frame.payload)),
            FrameType::Exit => match frame.payload[..] {
                [a, b, c, d] => Ok(Self::Exit(i32::from_be_bytes([a, b, c, d]))),
                _ => Err(FrameError::Invalid { kind: frame.kind, reason: "payload must be 4 bytes" }),
            },
            kind => Err(FrameError::Invalid { kind, reason: "not a message the guest sends during exec" }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: FrameType, payload: &[u8]) -> Frame {
        Frame { kind, payload: payload.to_vec() }
    }

    #[test]
    fn request_round_trip() {
        let req = ExecRequest {
            argv: vec!["sh".into(), "-c".into(), "echo hi".into()],
            env: vec![("A".into(), "1".into())],
            working_dir: Some("/tmp".into()),
            user: Some("nobody".into()),
            window: Some(WindowSize { rows: 24, cols: 80 }),
            rlimits: vec![Rlimit { resource: RlimitResource::RlimitNofile, soft: 1024, hard: 4096 }],
            root: Some("/run/matchlock/containers/c1/rootfs".into()),
            binds: vec![Bind {
                source: "/run/matchlock/volumes/c1/0".into(),
                target: "/var/run/secrets/kubernetes.io/serviceaccount".into(),
                read_only: true,
            }],
        };
        let f = frame(ExecMode::Tty.frame_type(), &req.to_payload());
        assert!(String::from_utf8_lossy(&f.payload).contains(r#""resource":"RLIMIT_NOFILE""#), "the OCI spelling");
        assert_eq!(ExecRequest::from_frame(&f).unwrap(), (ExecMode::Tty, req));
    }

    #[test]
    fn request_validation() {
        let empty = frame(FrameType::ExecStream, br#"{"argv":[]}"#);
        assert!(matches!(ExecRequest::from_frame(&empty), Err(RequestError::EmptyArgv)));
        let nul = frame(FrameType::ExecStream, br#"{"argv":["a\u0000b"]}"#);
        assert!(matches!(ExecRequest::from_frame(&nul), Err(RequestError::NulByte)));
        let unknown = frame(FrameType::ExecStream, br#"{"argv":["x"],"evil":1}"#);
        assert!(matches!(ExecRequest::from_frame(&unknown), Err(RequestError::Json(_))));
        let wrong = frame(FrameType::Stdout, br#"{"argv":["x"]}"#);
        assert!(matches!(ExecRequest::from_frame(&wrong), Err(RequestError::NotARequest(_))));
        let inverted = frame(
            FrameType::ExecStream,
            br#"{"argv":["x"],"rlimits":[{"resource":"RLIMIT_NOFILE","soft":9,"hard":1}]}"#,
        );
        assert!(matches!(ExecRequest::from_frame(&inverted), Err(RequestError::Rlimit)));
        let unknown_resource = frame(
            FrameType::ExecStream,
            br#"{"argv":["x"],"rlimits":[{"resource":"RLIMIT_BOGUS","soft":1,"hard":1}]}"#,
        );
        assert!(matches!(ExecRequest::from_frame(&unknown_resource), Err(RequestError::Json(_))));
        for root in ["relative", "/a/../b", "/"] {
            let payload = serde_json::json!({"argv": ["x"], "root": root}).to_string();
            let f = frame(FrameType::ExecStream, payload.as_bytes());
            assert!(matches!(ExecRequest::from_frame(&f), Err(RequestError::Root(_))), "{root}");
        }
        let bind = |source: &str, target: &str| serde_json::json!({"source": source, "target": target});
        for (root, binds) in [
            (Some("/r"), vec![bind("/v/0", "../etc")]),
            (Some("/r"), vec![bind("/v/0", "/data/../../etc")]),
            (Some("/r"), vec![bind("v/0", "/data")]),
            (None, vec![bind("/v/0", "/data")]),
            (Some("/r"), vec![bind("/v/0", "/data"); MAX_BINDS + 1]),
        ] {
            let payload = serde_json::json!({"argv": ["x"], "root": root, "binds": binds}).to_string();
            let f = frame(FrameType::ExecStream, payload.as_bytes());
            assert!(matches!(ExecRequest::from_frame(&f), Err(RequestError::Bind(_))), "{payload}");
        }
        let fine = serde_json::json!({"argv": ["x"], "root": "/r", "binds": [bind("/v/0", "/data")]}).to_string();
        ExecRequest::from_frame(&frame(FrameType::ExecStream, fine.as_bytes())).expect("a clean bind");
    }

    #[test]
    fn host_messages_round_trip_and_validate() {
        for msg in [
            HostMessage::Stdin(b"abc".to_vec()),
            HostMessage::StdinEof,
            HostMessage::Resize(WindowSize { rows: 50, cols: 132 }),
            HostMessage::Signal(15),
        ] {
            let (kind, payload) = msg.to_frame();
            assert_eq!(HostMessage::from_frame(Frame { kind, payload }).unwrap(), msg);
        }
        assert!(HostMessage::from_frame(frame(FrameType::Signal, &[0])).is_err());
        assert!(HostMessage::from_frame(frame(FrameType::Signal, &[9, 9])).is_err());
        assert!(HostMessage::from_frame(frame(FrameType::Resize, &[1, 2, 3])).is_err());
        assert!(HostMessage::from_frame(frame(FrameType::Exit, &[0, 0, 0, 0])).is_err());
    }

    #[test]
    fn guest_messages_round_trip_and_validate() {
        for msg in [GuestMessage::Stdout(b"o".to_vec()), GuestMessage::Stderr(vec![]), GuestMessage::Exit(255)] {
            let (kind, payload) = msg.to_frame();
            assert_eq!(GuestMessage::from_frame(Frame { kind, payload }).unwrap(), msg);
        }
        assert!(GuestMessage::from_frame(frame(FrameType::Exit, &[0])).is_err());
        assert!(GuestMessage::from_frame(frame(FrameType::Stdin, b"x")).is_err());
    }
}
