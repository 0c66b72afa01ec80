//! Where matchlock keeps its cache (`~/.cache/matchlock`) and state (`~/.matchlock`).

use std::path::{Path, PathBuf};

fn home() -> PathBuf {
    std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from)
}

/// `$XDG_CACHE_HOME/matchlock`, else `~/.cache/matchlock`: kernels, images, tools.
pub fn cache_dir() -> PathBuf {
    match std::env::var_os("XDG_CACHE_HOME") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir).join("matchlock"),
        _ => home().join(".cache/matchlock"),
    }
}

/// `~/.matchlock`: per-VM state.
pub fn state_dir() -> PathBuf {
    home().join(".matchlock")
}

/// The directory of one VM.
pub fn vm_dir(id: &str) -> PathBuf {
    state_dir().join("vms").join(id)
}

/// Opens (creating if needed) `path` and takes an advisory lock on it: exclusive, or
/// shared. The lock lasts as long as the returned file.
pub fn lock_file(path: &Path, exclusive: bool) -> std::io::Result<std::fs::File> {
    let file = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(path)?;
    if exclusive {
        file.lock()?;
    } else {
        file.lock_shared()?;
    }
    Ok(file)
}
