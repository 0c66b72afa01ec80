//! `matchlock stats`: running sandboxes' resource use, like `docker stats`: a table refreshed
//! every second until Ctrl-C, or one reading (`--no-stream`), or JSON lines (`--json`).

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::time::Duration;

use anyhow::Result;
use matchlock_api::paths::VmDir;
use matchlock_sandbox::open_state;
use matchlock_sandbox::stats::Stats;
use matchlock_state::Status;

use crate::session::StopSignals;

/// Prints the stats of sandboxes `ids` (every running one when empty).
pub(crate) async fn show(ids: Vec<String>, no_stream: bool, json: bool) -> Result<u8> {
    let ids = if ids.is_empty() {
        open_state()?.list()?.into_iter().filter(|vm| vm.status == Status::Running).map(|vm| vm.id).collect()
    } else {
        for id in &ids {
            crate::vms::running_vm_dir(id)?;
        }
        ids
    };
    let mut signals = StopSignals::new()?;
    let mut previous: HashMap<String, Stats> = HashMap::new();
    // A rate needs two readings: the first comes half a second before the first table.
    let mut wait = Duration::from_millis(500);
    loop {
        let mut current = Vec::new();
        for id in &ids {
            // A sandbox that stopped meanwhile drops out.
            if let Ok(stats) = matchlock_sandbox::relay::stats(&VmDir::of(id)).await {
                current.push((id.clone(), stats));
            }
        }
        let ready = current.iter().all(|(id, _)| previous.contains_key(id));
        if ready {
            print(&current, &previous, json)?;
            if no_stream {
                return Ok(0);
            }
        }
        previous = current.into_iter().collect();
        tokio::select! {
            () = signals.recv() => return Ok(0),
            () = tokio::time::sleep(wait) => {}
        }
        wait = Duration::from_secs(1);
    }
}

/// CPU use between two readings, % of one CPU.
fn percent(now: u64, before: u64, now_ms: u64, before_ms: u64) -> f64 {
    let elapsed_us = now_ms.saturating_sub(before_ms).saturating_mul(1000).max(1);
    now.saturating_sub(before) as f64 * 100.0 / elapsed_us as f64
}

fn print(current: &[(String, Stats)], previous: &HashMap<String, Stats>, json: bool) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    if !json && out.is_terminal() {
        write!(out, "\x1b[2J\x1b[H")?;
    }
    if !json {
        writeln!(
            out,
            "{:<12} {:>6} {:>9} {:>21} {:>10} {:>21} {:>10} {:>10} {:>5} {:>6}",
            "ID",
            "CPU %",
            "HOST CPU%",
            "MEM USAGE / LIMIT",
            "HOST PRIV",
            "NET I/O (IN / OUT)",
            "WORKSPACE",
            "DISK",
            "PIDS",
            "EXECS"
        )?;
    }
    for (id, s) in current {
        let before = previous.get(id).cloned().unwrap_or_default();
        let cpu = percent(s.guest_cpu_usec, before.guest_cpu_usec, s.time_ms, before.time_ms);
        let host_cpu = percent(s.host_cpu_usec, before.host_cpu_usec, s.time_ms, before.time_ms);
        if json {
            let mut value = serde_json::to_value(s).unwrap_or_default();
            value["id"] = id.clone().into();
            value["cpu_percent"] = ((cpu * 100.0).round() / 100.0).into();
            value["host_cpu_percent"] = ((host_cpu * 100.0).round() / 100.0).into();
            writeln!(out, "{value}")?;
            continue;
        }
        let memory = format!("{} / {}", size(s.guest_memory_used), size(s.guest_memory_total));
        let net = format!("{} / {}", size(s.network.ingress_bytes), size(s.network.egress_bytes));
        writeln!(
            out,
            "{id:<12} {cpu:>5.1}% {host_cpu:>8.1}% {memory:>21} {:>10} {net:>21} {:>10} {:>10} {:>5} {:>6}",
            size(s.host_private_bytes),
            size(s.workspace_bytes),
            size(s.disk_bytes),
            s.pids,
            s.execs
        )?;
    }
    out.flush()
}

/// `12.3MiB`, as `docker stats` prints sizes.
fn size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes}B")
    } else {
        format!("{value:.1}{}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_and_sizes_read_like_docker_stats() {
        assert_eq!(size(512), "512B");
        assert_eq!(size(1536), "1.5KiB");
        assert_eq!(size(3 << 30), "3.0GiB");
        assert!((percent(500_000, 0, 2000, 1000) - 50.0).abs() < 1e-9, "0.5 s of CPU in 1 s");
        assert_eq!(percent(0, 10, 2000, 1000), 0.0, "a counter that went back reads 0");
    }
}
