//! A running sandbox's resource use (`matchlock stats`, the JSON-RPC `stats` method): the
//! guest's CPU, memory and processes (its `init` cgroup and `/proc/meminfo`, read through the
//! agent: untrusted text, parsed leniently), the host's side (its helpers' CPU time and
//! private memory), the network's bytes and requests, the workspace's stored bytes, the
//! writable disk's allocated bytes and the commands run.

use std::os::unix::fs::MetadataExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use matchlock_api::paths::VmDir;
use matchlock_vm::Connector;

use crate::network::Network;

pub use matchlock_api::stats::Stats;

/// What a sandbox's stats are read from (held by its owner: the sandbox and its relay).
#[derive(Clone)]
pub(crate) struct Source {
    pub(crate) guest: Connector,
    pub(crate) dir: VmDir,
    pub(crate) helpers: Vec<u32>,
    pub(crate) network: Option<Arc<Network>>,
    pub(crate) workspace: Option<Arc<matchlock_vfs::Router>>,
    pub(crate) execs: Arc<AtomicU64>,
}

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Source").field("dir", &self.dir).field("helpers", &self.helpers).finish_non_exhaustive()
    }
}

/// The cgroup every command of the guest runs in.
const CGROUP: &str = "/sys/fs/cgroup/init";

impl Source {
    /// Reads the stats now; what the guest does not answer reads as 0.
    pub(crate) async fn collect(&self) -> Stats {
        let guest = |path: String| async move {
            let conn = (self.guest)(matchlock_protocol::EXEC_PORT, Vec::new()).await.ok()?;
            let bytes = crate::files::read_file_on(conn, &path).await.ok()?;
            Some(String::from_utf8_lossy(&bytes).into_owned())
        };
        let cpu = guest(format!("{CGROUP}/cpu.stat")).await.unwrap_or_default();
        let meminfo = guest("/proc/meminfo".to_owned()).await.unwrap_or_default();
        let pids = guest(format!("{CGROUP}/pids.current")).await.unwrap_or_default();
        let kib = |key: &str| keyed(&meminfo, key).saturating_mul(1024);
        let (host_cpu_usec, host_private_bytes) = self.helpers.iter().fold((0u64, 0u64), |(cpu, private), pid| {
            (cpu.saturating_add(process_cpu_usec(*pid)), private.saturating_add(private_bytes(*pid)))
        });
        let total = kib("MemTotal:");
        Stats {
            time_ms: matchlock_net::audit::now_ms(),
            guest_cpu_usec: keyed(&cpu, "usage_usec"),
            host_cpu_usec,
            guest_memory_used: total.saturating_sub(kib("MemAvailable:")),
            guest_memory_total: total,
            host_private_bytes,
            network: self.network.as_ref().map(|n| n.budget.usage()).unwrap_or_default(),
            workspace_bytes: self.workspace.as_ref().map_or(0, |w| w.stored_bytes()),
            disk_bytes: std::fs::metadata(self.dir.upper_disk()).map_or(0, |m| m.blocks().saturating_mul(512)),
            pids: pids.trim().parse().unwrap_or(0),
            execs: self.execs.load(Ordering::Relaxed),
        }
    }
}

/// The number after `key` in `key value` lines (0 when missing or malformed).
fn keyed(text: &str, key: &str) -> u64 {
    text.lines()
        .find_map(|l| {
            let mut it = l.split_whitespace();
            (it.next()? == key).then(|| it.next()?.parse().ok()).flatten()
        })
        .unwrap_or(0)
}

/// User and system CPU time of host process `pid`, µs.
fn process_cpu_usec(pid: u32) -> u64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0 };
    // Fields after the command name: state is the 3rd field, utime the 14th, stime the 15th.
    let Some(rest) = stat.rfind(')').map(|end| &stat[end + 1..]) else { return 0 };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    let hz = rustix::param::clock_ticks_per_second().max(1);
    (ticks(11) + ticks(12)).saturating_mul(1_000_000) / hz
}

/// Private memory (clean and dirty) of host process `pid`, bytes.
fn private_bytes(pid: u32) -> u64 {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    (keyed(&rollup, "Private_Clean:") + keyed(&rollup, "Private_Dirty:")).saturating_mul(1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_and_host_text_is_parsed_leniently() {
        let meminfo = "MemTotal:        1000 kB\nMemFree: x kB\nMemAvailable:     250 kB\n";
        assert_eq!((keyed(meminfo, "MemTotal:"), keyed(meminfo, "MemAvailable:")), (1000, 250));
        assert_eq!(keyed(meminfo, "MemFree:"), 0, "malformed reads as 0");
        assert_eq!(keyed("usage_usec 42\nuser_usec 40\n", "usage_usec"), 42);
        let me = std::process::id();
        assert!(private_bytes(me) > 0, "this test process has private memory");
        let spin = std::time::Instant::now();
        while spin.elapsed() < std::time::Duration::from_millis(30) {}
        assert!(process_cpu_usec(me) > 0);
        assert_eq!(process_cpu_usec(u32::MAX), 0);
    }
}
