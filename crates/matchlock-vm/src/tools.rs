//! Finding the host programs and guest files matchlock runs.

use std::path::{Path, PathBuf};

use matchlock_api::paths::cache_dir;

use crate::VmError;

/// Where the Debian package installs guest-init and the guest kernel.
pub const PACKAGE_LIB_DIR: &str = "/usr/lib/matchlock";

fn on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?.to_str()?.split(':').map(|dir| Path::new(dir).join(name)).find(|p| p.is_file())
}

/// `qemu-system-x86_64` (override: `MATCHLOCK_QEMU`).
pub fn qemu() -> Result<PathBuf, VmError> {
    if let Some(p) = std::env::var_os("MATCHLOCK_QEMU") {
        return Ok(PathBuf::from(p));
    }
    on_path("qemu-system-x86_64")
        .ok_or_else(|| VmError::Missing("qemu-system-x86_64 not found: run scripts/setup.sh".into()))
}

/// The static `guest-init` binary (override: `MATCHLOCK_GUEST_INIT`; then next to the
/// running executable, then the package's `/usr/lib/matchlock/guest-init`, then
/// `~/.cache/matchlock/guest-init`).
pub fn guest_init() -> Result<PathBuf, VmError> {
    if let Some(p) = std::env::var_os("MATCHLOCK_GUEST_INIT") {
        let p = PathBuf::from(p);
        check_guest_binary(&p)?;
        return Ok(p);
    }
    let beside = std::env::current_exe().ok().and_then(|e| e.parent().map(|d| d.join("guest-init")));
    let packaged = Path::new(PACKAGE_LIB_DIR).join("guest-init");
    let candidates = beside.into_iter().chain([packaged, cache_dir().join("guest-init")]);
    for c in candidates {
        if c.is_file() && check_guest_binary(&c).is_ok() {
            return Ok(c);
        }
    }
    Err(VmError::Missing(
        "guest-init not found: install the matchlock package, or run scripts/setup.sh (or set MATCHLOCK_GUEST_INIT)"
            .into(),
    ))
}

/// Checks that `path` is a statically linked x86_64 ELF executable (the guest has no
/// dynamic loader of ours).
pub fn check_guest_binary(path: &Path) -> Result<(), VmError> {
    let bad = |why: &str| VmError::Missing(format!("{} is not usable as guest-init: {why}", path.display()));
    let bytes = std::fs::read(path).map_err(|_| bad("cannot be read"))?;
    let u16_at = |o: usize| bytes.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u64_at = |o: usize| bytes.get(o..o + 8).map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")));
    if !bytes.starts_with(b"\x7fELF\x02\x01") {
        return Err(bad("not a 64-bit little-endian ELF file"));
    }
    if u16_at(0x12) != Some(62) {
        return Err(bad("not an x86_64 binary"));
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38)) else {
        return Err(bad("truncated ELF header"));
    };
    for i in 0..usize::from(phnum) {
        let at = phoff as usize + i * usize::from(phentsize);
        let kind = bytes.get(at..at + 4).map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")));
        match kind {
            None => return Err(bad("truncated program headers")),
            Some(3) => return Err(bad("dynamically linked (build it with scripts/build-guest.sh)")),
            Some(_) => {}
        }
    }
    Ok(())
}
