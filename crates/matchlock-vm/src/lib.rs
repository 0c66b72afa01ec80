//! Virtual machines for matchlock.
//!
//! A [`Backend`] boots a [`MachineSpec`] — kernel, command line, virtio-blk disks, a
//! host <-> guest transport — and hands back a [`Machine`] once the guest agent has signalled
//! that it is ready. Both sides speak "connect to port N": the host opens streams to guest
//! ports with [`Machine::connect`]; guest connections to host port P arrive at the Unix
//! listener [`VmDir::port_listener`]`(P)`. The QEMU backend carries these streams over one
//! virtio-serial port ([`mux`]), which QEMU can snapshot; a Firecracker backend would map
//! the same model onto its hybrid vsock (`CONNECT <port>` on a Unix socket).

pub mod accel;
pub mod kernel;
pub mod mux;
pub mod qemu;
mod qmp;
pub mod tools;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

pub use matchlock_api::paths::VmDir;

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
    pub dir: VmDir,
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

/// Fills `buf` from the host kernel's generator (session ids, VM ids, a guest's entropy).
pub fn host_random(buf: &mut [u8]) -> std::io::Result<()> {
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, buf)
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
    /// A connection to a guest port failed.
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

/// A boxed future: the traits below are object-safe, so orchestration holds a
/// `Box<dyn Backend>` and `Box<dyn Machine>` and never names a VMM.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Opens connections to one machine's guest ports, sending the given first bytes (a backend
/// may send them before the guest has accepted: one round trip less). Cheap to clone and
/// free of the machine's borrow, so that tasks serving the machine (the exec relay) can
/// hold one.
pub type Connector = Arc<dyn Fn(u32, Vec<u8>) -> BoxFuture<'static, Result<UnixStream, VmError>> + Send + Sync>;

/// Saves one machine into a directory ([`Machine::snapshot`]).
pub type Snapshotter = Arc<dyn Fn(PathBuf) -> BoxFuture<'static, Result<(), VmError>> + Send + Sync>;

/// How a backend's NIC carries the guest's Ethernet frames to the host's network stack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NicTransport {
    /// A Unix stream socket the host listens on: a 4-byte big-endian length, then the frame
    /// ([`Nic::socket`]).
    UnixStream,
}

/// What a backend can do: orchestration asks instead of assuming.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// Most virtio-blk disks a machine can have (root, image and upper disks included).
    pub max_disks: usize,
    /// How the NIC reaches the host's network stack.
    pub nic: NicTransport,
    /// Whether a running machine can be saved and restored.
    pub snapshots: bool,
}

/// A way to run micro-VMs.
pub trait Backend: Send + Sync + std::fmt::Debug {
    /// Short name (`qemu`, `firecracker`), recorded with each VM.
    fn name(&self) -> &'static str;

    /// What machines of this backend support.
    fn capabilities(&self) -> Capabilities;

    /// Identifies the VMM build, accelerator and CPU model: a saved machine restores only under the
    /// build that saved it.
    fn build_id(&self) -> String;

    /// Boots `spec` and returns once the guest agent is ready.
    fn launch(&self, spec: MachineSpec) -> BoxFuture<'_, Result<Box<dyn Machine>, VmError>>;

    /// Resumes the snapshot in directory `from` ([`Machine::snapshot`]) as a new machine:
    /// `spec` must describe the same machine (memory, CPUs, disks in the same order and
    /// modes; writable scratch disks get the snapshot's content). Returns once the guest has
    /// dropped the old host's streams and answered. Backends without
    /// [`Capabilities::snapshots`] refuse.
    fn restore(
        &self,
        spec: MachineSpec,
        from: PathBuf,
        memory: RestoredMemory,
    ) -> BoxFuture<'_, Result<Box<dyn Machine>, VmError>>;
}

/// How a restored machine holds the saved memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestoredMemory {
    /// Mapped copy-on-write from the snapshot: pages the machine never writes stay shared
    /// with every other machine restored from it (forks), but a snapshot of the restored
    /// machine must carry all of its memory in the device state.
    CopyOnWrite,
    /// A copy of its own, held as a booted machine holds its memory: costs a copy of the
    /// saved pages, and snapshots of the machine are as cheap as of a booted one (warm
    /// templates, whose machines are the usual sources of snapshots and forks).
    Copied,
}

/// A running VM.
pub trait Machine: Send + Sync + std::fmt::Debug {
    /// The VM's directory (sockets and logs).
    fn dir(&self) -> &VmDir;

    /// The process ids of the VM's helper processes (the VMM and its device backends), so
    /// that a crash can be cleaned up by identity.
    fn helper_pids(&self) -> Vec<u32>;

    /// What opens connections to the guest's ports.
    fn connector(&self) -> Connector;

    /// Opens a connection to a guest port.
    fn connect(&self, port: u32) -> BoxFuture<'static, Result<UnixStream, VmError>> {
        (self.connector())(port, Vec::new())
    }

    /// Opens a connection to a guest port with `first` as its first bytes ([`Connector`]).
    fn connect_sending(&self, port: u32, first: Vec<u8>) -> BoxFuture<'static, Result<UnixStream, VmError>> {
        (self.connector())(port, first)
    }

    /// Saves the running machine into the existing directory `to`: memory, device state and
    /// its writable scratch disks, captured at one instant, while the guest is paused. The
    /// machine then runs on, its streams intact. Volumes (persistent writable disks) refuse.
    fn snapshot(&self, to: PathBuf) -> BoxFuture<'static, Result<(), VmError>> {
        (self.snapshotter())(to)
    }

    /// What takes [`Machine::snapshot`]s, free of the machine's borrow (for the exec relay).
    fn snapshotter(&self) -> Snapshotter;

    /// Freezes (`running == false`) or thaws the guest's vCPUs; its memory, devices and
    /// streams stay as they are (a paused guest just stops reading them).
    fn set_running(&self, running: bool) -> BoxFuture<'static, Result<(), VmError>>;

    /// Resolves when the VM has exited on its own; returns a description of how.
    fn exited(&mut self) -> BoxFuture<'_, String>;

    /// Resolves once the VM has stopped; unlike [`Machine::exited`] it needs no exclusive
    /// access, so concurrent commands can each watch for it.
    fn stopped(&self) -> BoxFuture<'static, ()>;

    /// Stops the VM and every helper process, and removes their sockets.
    fn shutdown(self: Box<Self>) -> BoxFuture<'static, Result<(), VmError>>;
}

/// The backend for this host: QEMU's `microvm`, on KVM when it is usable (probed once with
/// `kernel`, cached), else TCG. The only place a backend is chosen.
pub async fn host_backend(kernel: &Path) -> Result<Box<dyn Backend>, VmError> {
    Ok(Box::new(qemu::QemuBackend::detect(kernel).await?))
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
