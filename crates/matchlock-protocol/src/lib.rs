//! The host <-> guest protocol of matchlock.
//!
//! Everything the guest sends is untrusted: every decoder here bounds lengths and
//! validates payloads, and a malformed frame is an error for that connection only.
//!
//! - [`frame`]: the length-prefixed frame format used on the exec port.
//! - [`exec`]: the typed exec request and the messages exchanged while it runs.
//! - [`files`]: writing, reading and listing guest files through the agent.
//! - [`boot`]: the `matchlock.*` kernel command-line parameters read by guest-init.
//! - [`mux`]: streams to numbered ports over one pipe (the QEMU backend's transport).
#![forbid(unsafe_code)]

pub mod boot;
pub mod exec;
pub mod files;
pub mod frame;
pub mod mux;
pub mod vfs;

/// Guest port of the exec service (host-opened streams).
pub const EXEC_PORT: u32 = 5000;
/// Host port of the VFS server (guest-opened streams).
pub const VFS_PORT: u32 = 5001;
/// Host port the guest agent connects to once it serves [`EXEC_PORT`]: the connection is
/// the signal. The host answers with [`READY_ENTROPY`] bytes of entropy, which the guest
/// credits to its kernel's pool before it runs a command.
pub const READY_PORT: u32 = 5002;
/// Bytes of host entropy the host answers the ready signal with.
pub const READY_ENTROPY: usize = 64;
/// Guest port that echoes every byte back: a floor for host <-> guest latency.
pub const ECHO_PORT: u32 = 5003;
/// Guest port of the port-forward service: the host writes a 2-byte big-endian guest TCP
/// port, the guest answers one byte ([`FORWARD_OK`] or [`FORWARD_REFUSED`]) and then relays
/// to and from `127.0.0.1:<port>` in the guest. After the handshake each direction carries
/// chunks: a 4-byte big-endian length (at most [`FORWARD_MAX_CHUNK`]) and the bytes; an empty
/// chunk ends that direction (a TCP half-close), so no transport-level half-close is needed
/// (vsock VMMs treat one as a full close).
pub const FORWARD_PORT: u32 = 5004;
/// The forward connected.
pub const FORWARD_OK: u8 = 0;
/// Nothing listens on that port in the guest.
pub const FORWARD_REFUSED: u8 = 1;
/// Largest port-forward chunk.
pub const FORWARD_MAX_CHUNK: usize = 64 * 1024;

#[cfg(test)]
mod hostile_input {
    //! Whatever bytes arrive, decoding returns a value or an error: it never panics,
    //! never allocates beyond the frame limit, and never accepts an invalid message.

    use crate::boot::BootParams;
    use crate::exec::{ExecRequest, GuestMessage, HostMessage};
    use crate::frame::{read_frame, Frame, FrameType, MAX_PAYLOAD_LEN};

    /// xorshift64*: deterministic, dependency-free randomness for the tests.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        fn bytes(&mut self, max: usize) -> Vec<u8> {
            let len = (self.next() as usize) % (max + 1);
            (0..len).map(|_| self.next() as u8).collect()
        }
    }

    const KINDS: [FrameType; 10] = [
        FrameType::Quiesce,
        FrameType::Stdout,
        FrameType::Stderr,
        FrameType::Signal,
        FrameType::Stdin,
        FrameType::Resize,
        FrameType::ExecTty,
        FrameType::Exit,
        FrameType::ExecStream,
        FrameType::ExecPipe,
    ];

    #[test]
    fn random_byte_streams() {
        let mut rng = Rng(0x5eed_1234_abcd_0001);
        for _ in 0..20_000 {
            let mut stream = rng.bytes(64);
            // Sometimes a plausible header in front of the noise.
            if rng.next().is_multiple_of(2) {
                let mut h = vec![KINDS[(rng.next() % 10) as usize] as u8];
                h.extend_from_slice(&((rng.next() % 80) as u32).to_be_bytes());
                h.extend(stream);
                stream = h;
            }
            let mut reader = stream.as_slice();
            while let Ok(Some(frame)) = read_frame(&mut reader) {
                assert!(frame.payload.len() <= MAX_PAYLOAD_LEN);
                let _ = HostMessage::from_frame(frame.clone());
                let _ = GuestMessage::from_frame(frame.clone());
                if let Ok((_, req)) = ExecRequest::from_frame(&frame) {
                    assert!(!req.argv.is_empty());
                }
            }
        }
    }

    #[test]
    fn random_payloads_for_every_frame_type() {
        let mut rng = Rng(0xfeed_beef_0000_0002);
        for _ in 0..20_000 {
            let kind = KINDS[(rng.next() % 10) as usize];
            let frame = Frame { kind, payload: rng.bytes(16) };
            if let Ok(HostMessage::Signal(sig)) = HostMessage::from_frame(frame.clone()) {
                assert!((1..=64).contains(&sig));
            }
            let _ = GuestMessage::from_frame(frame.clone());
            let _ = ExecRequest::from_frame(&frame);
        }
        // JSON-shaped garbage for requests.
        for doc in [
            &br#"{"argv":"sh"}"#[..],
            br#"{"argv":[1,2]}"#,
            br#"{"argv":["a"],"env":[["k"]]}"#,
            br#"{"argv":["a"],"window":{"rows":-1,"cols":2}}"#,
            br#"[]"#,
            b"\xff\xfe",
        ] {
            let frame = Frame { kind: FrameType::ExecStream, payload: doc.to_vec() };
            assert!(ExecRequest::from_frame(&frame).is_err(), "{}", String::from_utf8_lossy(doc));
        }
    }

    #[test]
    fn random_kernel_command_lines() {
        let mut rng = Rng(0x0bad_cafe_0000_0003);
        let keys = ["hostname", "dns", "cpus", "lower", "upper", "epoch_ms", "add_host", "privileged"];
        for _ in 0..5_000 {
            let words: Vec<String> = (0..(rng.next() % 10))
                .map(|_| {
                    let key = keys[(rng.next() % keys.len() as u64) as usize];
                    let value: String = rng.bytes(12).into_iter().map(|b| (b % 94 + 33) as char).collect();
                    format!("matchlock.{key}={value}")
                })
                .collect();
            if let Ok(params) = BootParams::from_cmdline(&words.join(" ")) {
                assert!(crate::boot::is_valid_hostname(&params.hostname));
                assert!(params.cpus > 0.0 && params.cpus.is_finite());
            }
        }
    }
}
