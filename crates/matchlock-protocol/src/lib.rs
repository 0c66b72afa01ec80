//! The host <-> guest protocol of matchlock.
//!
//! Everything the guest sends is untrusted: every decoder here bounds lengths and
//! validates payloads, and a malformed frame is an error for that connection only.
//!
//! - [`frame`]: the length-prefixed frame format used on the exec port.
//! - [`exec`]: the typed exec request and the messages exchanged while it runs.
//! - [`boot`]: the `matchlock.*` kernel command-line parameters read by guest-init.
#![forbid(unsafe_code)]

pub mod boot;
pub mod exec;
pub mod frame;

/// The vsock context id of the host.
pub const HOST_CID: u32 = 2;
/// The vsock context id every guest gets.
pub const GUEST_CID: u32 = 3;
/// Guest port of the exec service (host-initiated connections).
pub const EXEC_PORT: u32 = 5000;
/// Host port of the VFS server (guest-initiated connections).
pub const VFS_PORT: u32 = 5001;
/// Host port the guest agent connects to once it serves [`EXEC_PORT`].
pub const READY_PORT: u32 = 5002;
/// Guest port that echoes every byte back: a floor for host <-> guest latency.
pub const ECHO_PORT: u32 = 5003;
