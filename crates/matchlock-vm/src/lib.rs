//! Virtual machines for matchlock.
//!
//! A [`Backend`] boots a [`MachineSpec`] — kernel, command line, virtio-blk disks, a
//! vsock device — and hands back a [`Machine`] once the guest agent has signalled that
//! it is ready. Host <-> guest traffic uses Firecracker's hybrid vsock model on Unix
//! sockets: the host connects to `<dir>/vsock.sock` and writes `CONNECT <port>\n`;
//! guest-initiated connections to host port P arrive at `<dir>/vsock.sock_P`. The QEMU
//! backend gets this model from `vhost-device-vsock`; a Firecracker backend gets it
//! natively, so the same kernel, disks and protocol fit both.

pub mod accel;
pub mod kernel;
pub mod qemu;
pub mod tools;
pub mod vsock;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::net::UnixStream;

/// One virtio-blk disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    /// Backing file (raw).
    pub path: PathBuf,
    /// Whether the guest may write.
    pub read_only: bool,
    /// Whether writes must survive the VM (volumes): flushes reach the file. Scratch
    /// disks skip flushes for speed.
    pub persistent: bool,
}

/// Everything a backend needs to boot a VM.
#[derive(Debug, Clone)]
pub struct MachineSpec {
    /// Per-VM directory for sockets and logs.
    pub dir: PathBuf,
    /// Uncompressed kernel with a PVH entry.
    pub kernel: PathBuf,
    /// Extra kernel command-line words (the backend adds console and root).
    pub cmdline: String,
    /// Disks; the first is the root (boot) disk. Disk `i` appears as [`device_name`]`(i)`.
    pub disks: Vec<Disk>,
    /// Virtual CPUs.
    pub vcpus: u32,
    /// Memory in MB.
    pub memory_mb: u64,
    /// How long to wait for the guest's ready signal.
    pub boot_timeout: Duration,
    /// The NIC, if the guest has network.
    pub nic: Option<Nic>,
}

/// A virtio-net NIC whose Ethernet frames go to a Unix stream socket (4-byte big-endian
/// length, then the frame) where the host's userspace network stack listens.
#[derive(Debug, Clone)]
pub struct Nic {
    /// The listening socket; `None` is QEMU's own user networking on the same addresses
    /// (benchmark comparisons only: no policy applies).
    pub socket: Option<PathBuf>,
    /// The guest's MAC address.
    pub mac: [u8; 6],
    /// MTU announced to the guest driver.
    pub mtu: u32,
}

/// The guest device name of disk `index` (`vda`, `vdb`, …, `vdz`, `vdaa`, …).
pub fn device_name(index: usize) -> String {
    let letters = b"abcdefghijklmnopqrstuvwxyz";
    if index < 26 {
        format!("vd{}", letters[index] as char)
    } else {
        format!("vd{}{}", letters[index / 26 - 1] as char, letters[index % 26] as char)
    }
}

/// Errors from VM backends.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// A helper program could not be started.
    #[error("cannot start {program}")]
    Spawn {
        /// The program.
        program: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A required program or file is missing.
    #[error("{0}")]
    Missing(String),
    /// The VM stopped before the guest became ready.
    #[error("the VM exited during boot ({status}){details}")]
    BootFailed {
        /// How the VMM exited.
        status: String,
        /// Recent console or VMM output.
        details: String,
    },
    /// The guest did not become ready in time.
    #[error("the guest did not become ready within {0:?}{1}")]
    BootTimeout(Duration, String),
    /// The spec cannot be expressed for this backend.
    #[error("invalid machine spec: {0}")]
    InvalidSpec(String),
    /// Host-side I/O failed.
    #[error("{context}")]
    Io {
        /// What was being done.
        context: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A vsock connection to the guest failed.
    #[error("cannot connect to guest port {port}")]
    Connect {
        /// Guest port.
        port: u32,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

impl VmError {
    /// Wraps an I/O error with context.
    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let context = context.into();
        move |source| Self::Io { context, source }
    }
}

/// A way to run micro-VMs.
pub trait Backend {
    /// A running VM of this backend.
    type Machine: Machine;

    /// Short name (`qemu`, `firecracker`).
    fn name(&self) -> &'static str;

    /// Boots `spec` and returns once the guest agent is ready.
    fn launch(&self, spec: MachineSpec) -> impl Future<Output = Result<Self::Machine, VmError>> + Send;
}

/// A running VM.
pub trait Machine: Send {
    /// The directory holding the VM's sockets and logs.
    fn dir(&self) -> &Path;

    /// The process ids of the VM's helper processes (the VMM and its device backends), so
    /// that a crash can be cleaned up by identity.
    fn helper_pids(&self) -> Vec<u32>;

    /// Opens a connection to a guest vsock port.
    fn connect(&self, port: u32) -> impl Future<Output = Result<UnixStream, VmError>> + Send;

    /// Resolves when the VM has exited on its own; returns a description of how.
    fn exited(&mut self) -> impl Future<Output = String> + Send;

    /// Resolves once the VM has stopped; unlike [`Machine::exited`] it needs no exclusive
    /// access, so concurrent commands can each watch for it.
    fn stopped(&self) -> impl Future<Output = ()> + Send + 'static;

    /// Stops the VM and every helper process, and removes their sockets.
    fn shutdown(self) -> impl Future<Output = Result<(), VmError>> + Send;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names() {
        assert_eq!(device_name(0), "vda");
        assert_eq!(device_name(25), "vdz");
        assert_eq!(device_name(26), "vdaa");
        assert_eq!(device_name(27), "vdab");
    }
}
