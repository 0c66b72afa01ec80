//! What containerd asks about a running container, read from the guest: its processes and
//! its cgroup v2 statistics. Every command runs in the guest's `init` cgroup, so that
//! cgroup is the container. The guest's files are untrusted text: parsed leniently, a
//! malformed line is skipped, numbers saturate.

use containerd_shim_protos::cgroups_v2::metrics::{
    CPUStat, IOEntry, IOStat, MemoryEvents, MemoryStat, Metrics, PidsStat,
};
use matchlock_sandbox::{Sandbox, SandboxError};

/// The cgroup every command of the guest runs in.
const CGROUP: &str = "/sys/fs/cgroup/init";
/// The command name of the guest's own helpers: the launcher and each command's
/// namespace init, children of the guest's PID 1 re-executed from `/proc/self/exe`.
const GUEST_HELPER: &str = "exe";

async fn read(sandbox: &Sandbox, file: &str) -> Result<String, SandboxError> {
    let bytes = sandbox.read_file(&format!("{CGROUP}/{file}")).await?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// `key value` lines.
fn keyed(text: &str) -> impl Iterator<Item = (&str, u64)> {
    text.lines().filter_map(|l| {
        let mut it = l.split_whitespace();
        Some((it.next()?, it.next()?.parse().ok()?))
    })
}

fn value(text: &str) -> u64 {
    text.trim().parse().unwrap_or(0)
}

/// At most this many processes are listed (each costs the host a request to the guest).
const MAX_LISTED: usize = 4096;

/// The guest PIDs of the container's processes (the guest's own agent processes left out;
/// at most [`MAX_LISTED`]).
pub async fn pids(sandbox: &Sandbox) -> Result<Vec<u32>, SandboxError> {
    let procs = read(sandbox, "cgroup.procs").await?;
    let mut out = Vec::new();
    let listed = procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()).filter(|p| *p > 1).take(MAX_LISTED);
    for pid in listed {
        // A process may be gone by now: then it is not listed.
        let Ok(stat) = sandbox.read_file(&format!("/proc/{pid}/stat")).await else { continue };
        if !is_guest_helper(&String::from_utf8_lossy(&stat)) {
            out.push(pid);
        }
    }
    Ok(out)
}

/// Whether a `/proc/<pid>/stat` line is one of the guest's helpers rather than the container's.
fn is_guest_helper(stat: &str) -> bool {
    let ppid = stat.rfind(')').and_then(|end| stat[end + 1..].split_whitespace().nth(1));
    command_name(stat) == GUEST_HELPER && ppid == Some("1")
}

/// The command name of a `/proc/<pid>/stat` line (between its first `(` and last `)`).
fn command_name(stat: &str) -> &str {
    match (stat.find('('), stat.rfind(')')) {
        (Some(a), Some(b)) if a < b => &stat[a + 1..b],
        _ => "",
    }
}

/// The container's cgroup v2 metrics (CPU, memory, pids, IO, memory events).
pub async fn metrics(sandbox: &Sandbox) -> Result<Metrics, SandboxError> {
    let cpu = read(sandbox, "cpu.stat").await?;
    let mut m = Metrics::new();
    let mut c = CPUStat::new();
    for (k, v) in keyed(&cpu) {
        match k {
            "usage_usec" => c.usage_usec = v,
            "user_usec" => c.user_usec = v,
            "system_usec" => c.system_usec = v,
            "nr_periods" => c.nr_periods = v,
            "nr_throttled" => c.nr_throttled = v,
            "throttled_usec" => c.throttled_usec = v,
            _ => {}
        }
    }
    m.cpu = Some(c).into();
    // Controllers the guest kernel lacks are left out rather than failing the call.
    if let Ok(current) = read(sandbox, "memory.current").await {
        let mut mem = MemoryStat::new();
        mem.usage = value(&current);
        mem.usage_limit = read(sandbox, "memory.max").await.map(|t| value(&t)).unwrap_or(0);
        if let Ok(stat) = read(sandbox, "memory.stat").await {
            for (k, v) in keyed(&stat) {
                match k {
                    "anon" => mem.anon = v,
                    "file" => mem.file = v,
                    "kernel_stack" => mem.kernel_stack = v,
                    "slab" => mem.slab = v,
                    "sock" => mem.sock = v,
                    "shmem" => mem.shmem = v,
                    "file_mapped" => mem.file_mapped = v,
                    "file_dirty" => mem.file_dirty = v,
                    "inactive_anon" => mem.inactive_anon = v,
                    "active_anon" => mem.active_anon = v,
                    "inactive_file" => mem.inactive_file = v,
                    "active_file" => mem.active_file = v,
                    "pgfault" => mem.pgfault = v,
                    "pgmajfault" => mem.pgmajfault = v,
                    _ => {}
                }
            }
        }
        m.memory = Some(mem).into();
    }
    if let Ok(events) = read(sandbox, "memory.events").await {
        m.memory_events = Some(memory_events(&events)).into();
    }
    if let Ok(current) = read(sandbox, "pids.current").await {
        let mut p = PidsStat::new();
        p.current = value(&current);
        p.limit = read(sandbox, "pids.max").await.map(|t| value(&t)).unwrap_or(0);
        m.pids = Some(p).into();
    }
    if let Ok(io) = read(sandbox, "io.stat").await {
        let mut stat = IOStat::new();
        stat.usage = io_entries(&io);
        m.io = Some(stat).into();
    }
    Ok(m)
}

/// `memory.events` (`oom_kill` counts the guest's OOM kills).
pub fn memory_events(text: &str) -> MemoryEvents {
    let mut e = MemoryEvents::new();
    for (k, v) in keyed(text) {
        match k {
            "low" => e.low = v,
            "high" => e.high = v,
            "max" => e.max = v,
            "oom" => e.oom = v,
            "oom_kill" => e.oom_kill = v,
            _ => {}
        }
    }
    e
}

/// The OOM kills the guest's kernel made so far in the container's cgroup.
pub async fn oom_kills(sandbox: &Sandbox) -> Result<u64, SandboxError> {
    Ok(memory_events(&read(sandbox, "memory.events").await?).oom_kill)
}

/// `io.stat` lines: `MAJ:MIN rbytes=… wbytes=… rios=… wios=…`.
fn io_entries(text: &str) -> Vec<IOEntry> {
    text.lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let (major, minor) = it.next()?.split_once(':')?;
            let mut e = IOEntry::new();
            e.major = major.parse().ok()?;
            e.minor = minor.parse().ok()?;
            for kv in it {
                let Some((k, v)) = kv.split_once('=') else { continue };
                let v = v.parse().unwrap_or(0);
                match k {
                    "rbytes" => e.rbytes = v,
                    "wbytes" => e.wbytes = v,
                    "rios" => e.rios = v,
                    "wios" => e.wios = v,
                    _ => {}
                }
            }
            Some(e)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_text_is_parsed_leniently() {
        assert_eq!(command_name("42 (sh) S 1 42"), "sh");
        assert_eq!(command_name("7 (a) b)) R"), "a) b)");
        assert_eq!(command_name("garbage"), "");
        assert!(is_guest_helper("40 (exe) S 1 40 40 0"));
        assert!(!is_guest_helper("41 (sh) S 40 41 41 0"));
        assert!(!is_guest_helper("45 (exe) S 41 41 41 0"), "a user's own `exe` is the container's");
        let e = memory_events("low 0\nhigh 0\nmax 3\noom 2\noom_kill 1\nbogus\n");
        assert_eq!((e.max, e.oom, e.oom_kill), (3, 2, 1));
        let io = io_entries("254:0 rbytes=4096 wbytes=8192 rios=1 wios=2 dbytes=0\nnonsense\n254:16 rbytes=x\n");
        assert_eq!(io.len(), 2);
        assert_eq!((io[0].major, io[0].minor, io[0].rbytes, io[0].wbytes), (254, 0, 4096, 8192));
        assert_eq!(value("123\n"), 123);
        assert_eq!(value("max\n"), 0);
    }
}
