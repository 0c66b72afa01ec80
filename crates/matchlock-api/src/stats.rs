//! A running sandbox's resource use (`matchlock stats`, the JSON-RPC `stats` method) and what
//! it spent of its network budgets (`matchlock limits`, the `limits` method).

use serde::{Deserialize, Serialize};

/// What a sandbox has spent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Bytes the guest sent.
    pub egress_bytes: u64,
    /// Bytes the guest received.
    pub ingress_bytes: u64,
    /// HTTP requests let through.
    pub requests: u64,
    /// TCP connections let through.
    pub connections: u64,
}

/// A sandbox's resource use at one moment (CPU as cumulative time: a rate needs two).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// When it was read, Unix ms.
    pub time_ms: u64,
    /// CPU time the guest's commands used, µs (its `init` cgroup).
    pub guest_cpu_usec: u64,
    /// CPU time the host's helpers (QEMU) used, µs.
    pub host_cpu_usec: u64,
    /// Guest memory in use (total less available), bytes.
    pub guest_memory_used: u64,
    /// Guest memory in all, bytes.
    pub guest_memory_total: u64,
    /// Host memory private to the sandbox's helpers (guest RAM they touched included), bytes.
    pub host_private_bytes: u64,
    /// The network: bytes each way, HTTP requests, TCP connections.
    pub network: Usage,
    /// Bytes the guest stores on the host through the workspace.
    pub workspace_bytes: u64,
    /// Bytes allocated to the sandbox's writable disk on the host.
    pub disk_bytes: u64,
    /// Processes in the guest's commands' cgroup.
    pub pids: u64,
    /// Commands started in the sandbox.
    pub execs: u64,
}
