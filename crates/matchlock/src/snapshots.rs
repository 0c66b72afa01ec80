//! `snapshot`, `restore` and `fork`: running sandboxes saved and resumed.

use anyhow::{bail, Result};
use matchlock_sandbox::{relay, snapshot};

/// `snapshot <id> <name>`: saves the running sandbox through its owner.
pub(crate) async fn take(id: &str, name: &str) -> Result<u8> {
    let dir = crate::vms::running_vm_dir(id)?;
    let meta = relay::snapshot(&dir, name).await?;
    outln!("{}", meta.name)?;
    Ok(0)
}

/// `snapshot ls`.
pub(crate) fn list(json: bool) -> Result<u8> {
    let all = snapshot::list();
    if json {
        outln!("{}", serde_json::to_string_pretty(&all)?)?;
        return Ok(0);
    }
    outln!("{:<24} {:<14} {:<28} {:>10}  CREATED", "NAME", "SOURCE", "IMAGE", "SIZE")?;
    for s in all {
        let size = format!("{:.1} MB", s.size as f64 / 1e6);
        outln!("{:<24} {:<14} {:<28} {:>10}  {}", s.name, s.source, s.image, size, s.created_at)?;
    }
    Ok(0)
}

/// `snapshot rm <name>…`.
pub(crate) fn remove(names: &[String]) -> Result<u8> {
    for name in names {
        snapshot::remove(name)?;
        outln!("{name}")?;
    }
    Ok(0)
}

/// `restore <name>`: a new detached sandbox resumed from the snapshot; prints its id.
pub(crate) fn restore(name: &str, secrets: &[String]) -> Result<u8> {
    let (_, meta) = snapshot::load(name)?;
    crate::run::restore_detached(name, &meta.image, secrets)
}

/// `fork <id> -n N`: N new sandboxes resumed from one snapshot of the running sandbox,
/// taken for the purpose and removed once they run; prints their ids.
pub(crate) async fn fork(id: &str, count: u32, secrets: &[String]) -> Result<u8> {
    if count == 0 {
        bail!("-n must be at least 1");
    }
    let dir = crate::vms::running_vm_dir(id)?;
    let name = format!(".fork-{id}-{}", std::process::id());
    let meta = relay::snapshot(&dir, &name).await?;
    // The children resume at once: each maps the memory privately and copies the disk.
    let started: Vec<_> = (0..count).map(|_| crate::run::start_restore_owner(&name, &meta.image, secrets)).collect();
    let mut code = 0;
    for owner in started {
        let done = owner.and_then(crate::run::await_owner);
        code = code.max(done.unwrap_or_else(|e| {
            eprintln!("matchlock: {e:#}");
            1
        }));
    }
    // The children have its memory mapped and their own disks: the snapshot can go.
    snapshot::remove(&name)?;
    Ok(code)
}
