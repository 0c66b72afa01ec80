//! The boot disk: a tiny read-only ext4 holding guest-init as `/init`, shared by every
//! VM and cached by the binary's hash.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::{io_err, SandboxError};

/// Mount points guest-init needs before the overlay root exists.
const DIRS: [&str; 4] = ["proc", "sys", "dev", "run"];

/// Returns the cached boot disk for `guest_init`, building it if needed.
pub(crate) fn ensure(guest_init: &Path, cache: &Path) -> Result<PathBuf, SandboxError> {
    let binary = std::fs::read(guest_init).map_err(io_err(format!("cannot read {}", guest_init.display())))?;
    let hash = hex::encode(Sha256::digest(&binary));
    let disk = cache.join(format!("boot-{}.ext4", &hash[..16]));
    if disk.is_file() {
        return Ok(disk);
    }
    matchlock_api::paths::create_private_dir(cache).map_err(io_err(format!("cannot create {}", cache.display())))?;
    let mut tar_file = tempfile::NamedTempFile::new_in(cache).map_err(io_err("cannot create a temporary file"))?;
    {
        let mut builder = tar::Builder::new(tar_file.as_file_mut());
        for dir in DIRS {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Directory);
            h.set_mode(0o755);
            h.set_size(0);
            builder.append_data(&mut h, dir, std::io::empty()).map_err(io_err("cannot write the boot tar"))?;
        }
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o755);
        h.set_size(binary.len() as u64);
        builder.append_data(&mut h, "init", binary.as_slice()).map_err(io_err("cannot write the boot tar"))?;
        builder.finish().map_err(io_err("cannot write the boot tar"))?;
    }
    let image = tempfile::NamedTempFile::new_in(cache).map_err(io_err("cannot create a temporary file"))?;
    let size = matchlock_image::ext4::estimate_size(binary.len() as u64, DIRS.len() as u64 + 1);
    matchlock_image::ext4::build_from_tar(tar_file.path(), image.path(), size, 16, &[])
        .map_err(|source| SandboxError::Disk { what: "the boot disk".into(), source })?;
    image.persist(&disk).map_err(|e| io_err("cannot store the boot disk")(e.error))?;
    Ok(disk)
}
