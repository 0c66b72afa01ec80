//! Owner-process liveness from /proc, robust against pid reuse.

/// Start time of `pid` in clock ticks since boot (field 22 of /proc/<pid>/stat).
pub fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces and parentheses: skip past the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split(' ').nth(19)?.parse().ok()
}

/// Whether `pid` is alive and is the same process that started at `start` (a zombie
/// counts as dead).
pub fn is_alive(pid: i32, start: u64) -> bool {
    is_running(pid) && start_time(pid) == Some(start)
}

/// Whether some process `pid` exists and is not a zombie.
pub fn is_running(pid: i32) -> bool {
    if pid <= 0 {
        return false;
    }
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return false };
    stat.rfind(')').is_some_and(|close| !stat[close + 2..].starts_with('Z'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_is_alive_and_a_wrong_start_time_is_not() {
        let me = std::process::id() as i32;
        let start = start_time(me).unwrap();
        assert!(is_alive(me, start));
        assert!(!is_alive(me, start + 1));
        assert!(!is_alive(i32::MAX, start));
    }
}
