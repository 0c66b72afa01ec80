//! Releasing what a VM holds, and reclaiming what a crashed owner left behind.

use std::path::Path;
use std::time::{Duration, Instant};

use matchlock_api::paths::VmDir;

use matchlock_state::{Phase, StateDb, Status, Vm};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::SandboxError;

/// Removes the sockets of a VM directory (logs stay) and, unless `keep_disk` (a stopped
/// sandbox keeps its writable disk until it is removed, for `commit`), its writable disk,
/// recording the cleanup steps.
pub fn release_disks(state: &mut StateDb, id: &str, dir: &VmDir, keep_disk: bool) -> Result<(), SandboxError> {
    release(state, id, dir, keep_disk).map(|_| ())
}

fn release(state: &mut StateDb, id: &str, dir: &VmDir, keep_disk: bool) -> Result<Vec<String>, SandboxError> {
    let mut removed = Vec::new();
    let mut first_error = None;
    let upper = dir.upper_disk();
    if upper.exists() && !keep_disk {
        let result = std::fs::remove_file(&upper);
        let _ = state.record_cleanup(id, "rootfs_remove", result.as_ref().err().map(ToString::to_string).as_deref());
        match result {
            Ok(()) => removed.push("upper.ext4".to_owned()),
            Err(e) => first_error = Some(crate::io_err(format!("cannot remove {}", upper.display()))(e)),
        }
    }
    let sockets = dir.sockets();
    if !sockets.is_empty() {
        let mut error = None;
        for s in &sockets {
            if let Err(e) = std::fs::remove_file(s) {
                error = Some(format!("{}: {e}", s.display()));
            }
        }
        let _ = state.record_cleanup(id, "sockets_remove", error.as_deref());
        removed.push("sockets".to_owned());
    }
    let ram = matchlock_vm::qemu::ram_file(dir);
    if std::fs::remove_file(&ram).is_ok() {
        removed.push("guest RAM".to_owned());
    }
    // The helpers are gone by now (stopped, or killed by reconcile): so is their record.
    let _ = std::fs::remove_file(dir.helpers());
    match first_error {
        Some(e) => Err(e),
        None => Ok(removed),
    }
}

/// Records the identity of a VM's helper processes (pid, start time, executable) in
/// [`VmDir::helpers`], one `pid start-time exe` line each, written
/// once they run, so that [`helper_processes`] finds exactly them later, never a process
/// that merely mentions the VM (a `tail -f` of its log) or one that reused a pid.
pub fn record_helpers(dir: &VmDir, pids: &[u32]) -> Result<(), SandboxError> {
    let mut record = String::new();
    for pid in pids {
        let pid = i32::try_from(*pid).unwrap_or(0);
        let (Some(start), Ok(exe)) =
            (matchlock_state::process::start_time(pid), std::fs::read_link(format!("/proc/{pid}/exe")))
        else {
            continue; // already gone
        };
        record.push_str(&format!("{pid} {start} {}\n", exe.display()));
    }
    let path = dir.helpers();
    matchlock_api::paths::create_private(&path)
        .and_then(|mut f| std::io::Write::write_all(&mut f, record.as_bytes()))
        .map_err(crate::io_err(format!("cannot write {}", path.display())))
}

/// The recorded helpers of the VM in `dir` that still run: same pid, start time and
/// executable as recorded.
pub fn helper_processes(dir: &VmDir) -> Vec<i32> {
    let record = std::fs::read_to_string(dir.helpers()).unwrap_or_default();
    record
        .lines()
        .filter_map(|line| {
            let mut fields = line.splitn(3, ' ');
            let pid: i32 = fields.next()?.parse().ok()?;
            let start: u64 = fields.next()?.parse().ok()?;
            let exe = fields.next()?;
            let same_exe = std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|e| e == Path::new(exe));
            (matchlock_state::process::is_alive(pid, start) && same_exe).then_some(pid)
        })
        .filter(|pid| *pid != std::process::id() as i32)
        .collect()
}

/// Kills `pids` and waits (briefly) until they are gone.
fn kill_all(pids: &[i32]) {
    for pid in pids {
        let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
    }
    let deadline = Instant::now() + Duration::from_secs(3);
    while pids.iter().any(|p| matchlock_state::process::start_time(*p).is_some()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// What [`reconcile`] did for one VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reconciled {
    /// Left alone, with the reason.
    Skipped(String),
    /// Released these resources (possibly none).
    Cleaned(Vec<String>),
}

/// Reclaims the resources of `vm` if its owner is gone (or `force_running`): leftover
/// VMM/helper processes, the writable disk and sockets. Records the steps and moves
/// the lifecycle to `cleaned`.
pub fn reconcile(state: &mut StateDb, vm: &Vm, dir: &VmDir, force_running: bool) -> Result<Reconciled, SandboxError> {
    let owner_alive = vm.status == Status::Running && vm.owner_alive();
    if owner_alive && !force_running {
        return Ok(Reconciled::Skipped("VM is running".into()));
    }
    state.ensure_lifecycle(&vm.id)?;
    let mut cleaned = Vec::new();
    if owner_alive {
        kill_all(&[vm.pid]);
        state.set_status(&vm.id, Status::Crashed)?;
        cleaned.push("owner".to_owned());
    } else if vm.status == Status::Running {
        state.set_status(&vm.id, Status::Crashed)?;
    }
    let helpers = helper_processes(dir);
    if !helpers.is_empty() {
        kill_all(&helpers);
        let _ = state.record_cleanup(&vm.id, "machine_close", None);
        cleaned.push("processes".to_owned());
    }
    let head = state.lifecycle(&vm.id)?.map(|r| r.phase);
    let result = release(state, &vm.id, dir, false);
    if let Some(phase) = head {
        if phase != Phase::Cleaned && phase.can_move_to(Phase::Cleaning) {
            let _ = state.transition(&vm.id, Phase::Cleaning, None);
        }
        let last = if result.is_ok() { Phase::Cleaned } else { Phase::CleanupFailed };
        if state.lifecycle(&vm.id)?.is_some_and(|r| r.phase.can_move_to(last)) {
            let _ = state.transition(&vm.id, last, result.as_ref().err().map(ToString::to_string).as_deref());
        }
    }
    cleaned.extend(result?);
    cleaned.sort();
    Ok(Reconciled::Cleaned(cleaned))
}

/// Removes `vm` for good (`matchlock rm`): reclaims what its owner left if the owner is gone
/// (or is killed first, with `force_running`), then its directory and state rows. A VM whose
/// owner still runs is refused otherwise.
pub fn remove(state: &mut StateDb, vm: &Vm, force_running: bool) -> Result<(), SandboxError> {
    let dir = VmDir::of(&vm.id);
    if let Reconciled::Skipped(_) = reconcile(state, vm, &dir, force_running)? {
        return Err(SandboxError::Config(format!("VM is running {}", vm.id)));
    }
    if dir.path().exists() {
        std::fs::remove_dir_all(dir.path())
            .map_err(crate::io_err(format!("cannot remove {}", dir.path().display())))?;
    }
    state.delete(&vm.id)?;
    Ok(())
}
