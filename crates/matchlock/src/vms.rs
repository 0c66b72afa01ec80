//! Commands on existing sandboxes: exec, list, get, inspect, log, kill, rm, prune, gc.

use std::io::{Read, Seek, SeekFrom, Write};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use matchlock_api::paths::{vms_dir, VmDir};
use matchlock_api::SandboxConfig;
use matchlock_protocol::exec::ExecMode;
use matchlock_sandbox::gc::{reconcile, Reconciled};
use matchlock_sandbox::{compose, exec_via_relay, open_state, relay};
use matchlock_state::{short_time, StateDb, Status, Vm};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::images::open_store;
use crate::session::{self, Output, StopSignals};

/// Arguments of `matchlock exec`.
#[derive(Debug, Args)]
pub(crate) struct ExecArgs {
    /// Keep stdin open and forward it to the command.
    #[arg(short = 'i', long)]
    interactive: bool,
    /// With -i: allocate a pseudo-terminal.
    #[arg(short = 't', long)]
    tty: bool,
    /// Working directory.
    #[arg(short = 'w', long)]
    workdir: Option<String>,
    /// User (`name`, `uid`, `uid:gid`).
    #[arg(short = 'u', long)]
    user: Option<String>,
    /// The sandbox.
    id: String,
    /// Command and arguments.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    command: Vec<String>,
}

/// A VM row, refreshed: a `running` row whose owner died becomes `crashed`.
pub(crate) fn lookup(state: &StateDb, id: &str) -> Result<Vm> {
    state.reconciled(id)?.ok_or_else(|| anyhow!("VM not found {id}: VM {id} not found"))
}

/// The VM directory of a running sandbox whose relay is up.
pub(crate) fn running_vm_dir(id: &str) -> Result<VmDir> {
    Ok(running_vm(&open_state()?, id)?.1)
}

/// A running sandbox whose relay is up, and its directory.
fn running_vm(state: &StateDb, id: &str) -> Result<(Vm, VmDir)> {
    let vm = lookup(state, id)?;
    if vm.status != Status::Running {
        bail!("VM {} is not running (status: {})", vm.id, vm.status);
    }
    let dir = VmDir::of(&vm.id);
    if !dir.exec_socket().exists() {
        bail!("exec socket not found for {} (was it started with --rm=false?)", vm.id);
    }
    Ok((vm, dir))
}

/// `matchlock allow-list add|delete`.
pub(crate) async fn allow_list(id: &str, add: bool, hosts: &[String]) -> Result<u8> {
    let hosts: Vec<String> = hosts.iter().map(|h| h.trim().to_owned()).filter(|h| !h.is_empty()).collect();
    if hosts.is_empty() {
        bail!("no hosts given");
    }
    let dir = running_vm_dir(id)?;
    let reply = relay::allow_list(&dir, add, &hosts).await?;
    if let Some(error) = reply.error {
        bail!("{error}");
    }
    match (add, reply.added.is_empty(), reply.removed.is_empty()) {
        (true, false, _) => outln!("Added to {id}: {}", reply.added.join(","))?,
        (true, true, _) => outln!("No new hosts were added to {id}")?,
        (false, _, false) => outln!("Removed from {id}: {}", reply.removed.join(","))?,
        (false, _, true) => outln!("No hosts were removed from {id}")?,
    }
    if reply.allowed_hosts.is_empty() {
        outln!("Current allow-list: (empty: all hosts allowed)")?;
    } else {
        outln!("Current allow-list: {}", reply.allowed_hosts.join(","))?;
    }
    Ok(0)
}

/// `matchlock port-forward`: serves until a stop signal.
pub(crate) async fn port_forward(id: &str, ports: &[String], addresses: &[String]) -> Result<u8> {
    let dir = running_vm_dir(id)?;
    let bindings = matchlock_sandbox::forward::parse(ports, addresses)?;
    let listeners = matchlock_sandbox::forward::bind(&bindings).await?;
    let mut signals = StopSignals::new()?;
    announce_forwards(&listeners);
    let _forwarding = matchlock_sandbox::forward::start(&dir, listeners);
    signals.recv().await;
    Ok(0)
}

/// `matchlock exec`.
pub(crate) async fn exec(args: ExecArgs) -> Result<u8> {
    let mode = session::exec_mode(args.interactive, args.tty)?;
    let mut command = args.command.clone();
    if command.is_empty() {
        if mode != ExecMode::Tty {
            bail!("command required (or use -it for a shell)");
        }
        command.push("sh".to_owned());
    }
    let (vm, dir) = running_vm(&open_state()?, &args.id)?;
    // Same environment, user and directory rules as `run`, with this command.
    let mut config: SandboxConfig =
        serde_json::from_str(&vm.config_json).with_context(|| format!("corrupt configuration of {}", vm.id))?;
    config.entrypoint = Some(Vec::new());
    config.command = command;
    if args.user.is_some() {
        config.user = args.user;
    }
    if args.workdir.is_some() {
        config.workdir = args.workdir;
    }
    let image = open_store()?.resolve(&vm.image)?.map(|i| i.config).unwrap_or_default();
    let composed = compose(&image, &config)?;
    let request = composed.into_request(session::initial_window(mode));
    let mut signals = StopSignals::new()?;
    let (result, _) = session::run(mode, &Output::Terminal, &mut signals, None, |io| async move {
        exec_via_relay(&dir, mode, &request, io).await
    })
    .await?;
    Ok(u8::try_from(result?).unwrap_or(255))
}

/// Prints rows as a table with two spaces between columns.
pub(crate) fn print_table(header: &[&str], rows: &[Vec<String>]) -> std::io::Result<()> {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let last = cells.len() - 1;
        let mut s = String::new();
        for (i, cell) in cells.into_iter().enumerate() {
            if i == last {
                s.push_str(cell);
            } else {
                s.push_str(&format!("{cell:<w$}  ", w = widths[i]));
            }
        }
        outln!("{}", s.trim_end())
    };
    line(header.to_vec())?;
    for row in rows {
        line(row.iter().map(String::as_str).collect())?;
    }
    Ok(())
}

/// `matchlock list`.
pub(crate) fn list(running_only: bool, json: bool) -> Result<u8> {
    let state = open_state()?;
    let vms = state.reconcile_statuses()?.into_iter().filter(|vm| !running_only || vm.status == Status::Running);
    if json {
        let all = vms.map(|vm| vm_json(&vm)).collect::<Result<Vec<_>>>()?;
        outln!("{}", serde_json::to_string_pretty(&all)?)?;
        return Ok(0);
    }
    let rows: Vec<Vec<String>> = vms
        .map(|vm| {
            let pid = if vm.pid == 0 { "-".to_owned() } else { vm.pid.to_string() };
            vec![vm.id, vm.status.to_string(), vm.image, short_time(&vm.created_at), pid]
        })
        .collect();
    print_table(&["ID", "STATUS", "IMAGE", "CREATED", "PID"], &rows)?;
    Ok(0)
}

fn vm_json(vm: &Vm) -> Result<serde_json::Value> {
    let config: serde_json::Value =
        serde_json::from_str(&vm.config_json).with_context(|| format!("corrupt configuration of {}", vm.id))?;
    Ok(serde_json::json!({
        "id": vm.id,
        "pid": vm.pid,
        "status": vm.status,
        "image": vm.image,
        "created_at": vm.created_at,
        "config": config,
    }))
}

/// `matchlock get`.
pub(crate) fn get(id: &str) -> Result<u8> {
    let state = open_state()?;
    let vm = state.get(id)?.ok_or_else(|| anyhow!("VM {id} not found"))?;
    let vm = state.reconcile_statuses()?.into_iter().find(|v| v.id == vm.id).unwrap_or(vm);
    outln!("{}", serde_json::to_string_pretty(&vm_json(&vm)?)?)?;
    Ok(0)
}

/// `matchlock inspect`.
pub(crate) fn inspect(id: &str) -> Result<u8> {
    let state = open_state()?;
    let vm = state.get(id)?.ok_or_else(|| anyhow!("VM {id} not found"))?;
    let vm = state.reconcile_statuses()?.into_iter().find(|v| v.id == vm.id).unwrap_or(vm);
    let audit_log = VmDir::of(id).audit_log();
    let audit = matchlock_api::audit::Audit::read(&audit_log).unwrap_or_default();
    let doc = serde_json::json!({
        "vm": vm_json(&vm)?,
        "lifecycle": state.lifecycle(id)?,
        "history": state.history(id)?,
        "audit": {
            "path": audit_log,
            "records": audit.records.len(),
            "blocked": audit.records.iter().filter(|r| r.decision == matchlock_api::audit::Decision::Blocked).count(),
            "rotated": audit.rotated,
            "dropped": audit.dropped,
        },
    });
    outln!("{}", serde_json::to_string_pretty(&doc)?)?;
    Ok(0)
}

/// `matchlock log [-f]`.
pub(crate) async fn log(id: &str, follow: bool) -> Result<u8> {
    let state = open_state()?;
    state.get(id)?.ok_or_else(|| anyhow!("VM not found {id}: VM {id} not found"))?;
    let path = VmDir::of(id).console_log();
    let mut offset = 0u64;
    let mut signals = StopSignals::new()?;
    loop {
        if let Ok(mut file) = std::fs::File::open(&path) {
            let len = file.metadata()?.len();
            if len < offset {
                offset = 0;
            }
            file.seek(SeekFrom::Start(offset))?;
            let mut buf = Vec::new();
            file.read_to_end(&mut buf)?;
            offset += buf.len() as u64;
            std::io::stdout().write_all(&buf)?;
            std::io::stdout().flush()?;
        } else if !follow {
            bail!("no log for {id}");
        }
        if !follow {
            return Ok(0);
        }
        tokio::select! {
            () = signals.recv() => return Ok(0),
            () = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
}

/// Sends SIGTERM to the owner of `vm` and waits for it to finish tearing down.
async fn stop_owner(vm: &Vm) -> Result<()> {
    if vm.status != Status::Running || vm.pid == 0 || !vm.owner_alive() {
        bail!("VM {} is not running", vm.id);
    }
    kill(Pid::from_raw(vm.pid), Signal::SIGTERM).with_context(|| format!("cannot signal the owner of {}", vm.id))?;
    // The owner stops the command (SIGTERM, SIGKILL after 5 s) and the VM.
    let deadline = Instant::now() + Duration::from_secs(20);
    while vm.owner_alive() {
        if Instant::now() > deadline {
            kill(Pid::from_raw(vm.pid), Signal::SIGKILL).ok();
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    Ok(())
}

/// `matchlock kill`.
pub(crate) async fn kill_vms(id: Option<String>, all: bool) -> Result<u8> {
    let state = open_state()?;
    let targets: Vec<Vm> = match (id, all) {
        (Some(id), _) => vec![lookup(&state, &id)?],
        (None, true) => state.reconcile_statuses()?.into_iter().filter(|v| v.status == Status::Running).collect(),
        (None, false) => bail!("VM ID required (or use --all)"),
    };
    for vm in targets {
        stop_owner(&vm).await?;
        outln!("Killed {}", vm.id)?;
    }
    Ok(0)
}

/// Reclaims leftovers of a VM that is not running, then deletes its rows and directory.
fn remove(state: &mut StateDb, vm: &Vm) -> Result<()> {
    Ok(matchlock_sandbox::gc::remove(state, vm, false)?)
}

/// `matchlock rm`.
pub(crate) fn rm(id: Option<String>, stopped: bool) -> Result<u8> {
    let mut state = open_state()?;
    let targets: Vec<Vm> = match (id, stopped) {
        (Some(id), _) => vec![lookup(&state, &id)?],
        (None, true) => state.reconcile_statuses()?.into_iter().filter(|v| v.status != Status::Running).collect(),
        (None, false) => bail!("VM ID required (or use --stopped)"),
    };
    for vm in targets {
        remove(&mut state, &vm)?;
        outln!("Removed {}", vm.id)?;
    }
    Ok(0)
}

/// `matchlock prune`.
pub(crate) fn prune() -> Result<u8> {
    let mut state = open_state()?;
    let mut n = 0;
    for vm in state.reconcile_statuses()?.into_iter().filter(|v| v.status != Status::Running) {
        remove(&mut state, &vm)?;
        outln!("Pruned {}", vm.id)?;
        n += 1;
    }
    outln!("Pruned {n} VMs")?;
    Ok(0)
}

/// `matchlock gc`.
pub(crate) fn gc(id: Option<&str>, force_running: bool) -> Result<u8> {
    let mut state = open_state()?;
    let mut vms = state.reconcile_statuses()?;
    if let Some(id) = &id {
        vms.retain(|v| v.id == *id);
        if vms.is_empty() {
            bail!("VM not found {id}: VM {id} not found");
        }
    }
    let mut failed = false;
    for vm in &vms {
        match reconcile(&mut state, vm, &VmDir::of(&vm.id), force_running) {
            Ok(Reconciled::Skipped(why)) => println!("{}: skipped ({why})", vm.id),
            Ok(Reconciled::Cleaned(items)) if items.is_empty() => println!("{}: no resources to clean", vm.id),
            Ok(Reconciled::Cleaned(items)) => println!("{}: cleaned {}", vm.id, items.join(", ")),
            Err(e) => {
                failed = true;
                eprintln!("{}: failed gc: {e:#}", vm.id);
            }
        }
    }
    // VM directories without a state row (a crash before registering).
    if id.is_none() {
        for name in matchlock_sandbox::snapshot::remove_leftovers() {
            println!("snapshot {name}: removed an unfinished snapshot");
        }
        for name in matchlock_sandbox::template::remove_stale() {
            println!("template {name}: removed (its kernel, guest-init or image changed, or it was unfinished)");
        }
        let known: std::collections::HashSet<_> = vms.iter().map(|v| v.id.clone()).collect();
        for entry in std::fs::read_dir(vms_dir()).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with("vm-") && !known.contains(&name) && state.get(&name)?.is_none() {
                // A directory younger than a minute may belong to a sandbox being created.
                let old = entry
                    .metadata()
                    .and_then(|m| m.modified())
                    .is_ok_and(|t| t.elapsed().unwrap_or_default() > Duration::from_secs(60));
                let pids = matchlock_sandbox::gc::helper_processes(&VmDir::at(entry.path()));
                if old && pids.is_empty() && std::fs::remove_dir_all(entry.path()).is_ok() {
                    outln!("{name}: cleaned orphaned directory")?;
                }
            }
        }
    }
    outln!("Reconciled {} VMs", vms.len())?;
    Ok(u8::from(failed))
}

/// Tells the user which host ports lead into the sandbox.
pub(crate) fn announce_forwards(listeners: &[(tokio::net::TcpListener, matchlock_sandbox::forward::Binding)]) {
    for (_, binding) in listeners {
        eprintln!("Forwarding {}:{} -> sandbox:{}", binding.local.ip(), binding.local.port(), binding.remote);
    }
}
