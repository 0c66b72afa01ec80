//! The guest kernel: our config, the build recipe, and finding the built image.
//!
//! The kernel is built from Debian's `linux-source-6.1` with `guest/kernel/config-x86_64`
//! into `~/.cache/matchlock/kernels/<source version>-<config hash>/kernel`. The config
//! and the build script are compiled into the binary, so `matchlock kernel build` works
//! without a source checkout.

use std::path::{Path, PathBuf};
use std::process::Command;

use matchlock_api::paths::cache_dir;
use sha2::{Digest, Sha256};

use crate::VmError;

/// The kernel series we build (Debian moves point releases; the series and config are pinned).
pub const KERNEL_SERIES: &str = "6.1";
/// Our kernel config fragment.
pub const CONFIG: &str = include_str!("../../../guest/kernel/config-x86_64");
const BUILD_SCRIPT: &str = include_str!("../../../guest/kernel/build.sh");

/// Hash prefix that names kernels built from [`CONFIG`].
pub fn config_hash() -> String {
    hex::encode(Sha256::digest(CONFIG.as_bytes()))[..12].to_owned()
}

/// Where kernels are cached.
pub fn kernels_dir() -> PathBuf {
    cache_dir().join("kernels")
}

/// The kernel to boot: `MATCHLOCK_KERNEL`, else the package's build of our config (under
/// `/usr/lib/matchlock/kernels`), else the newest cached build of it.
pub fn locate() -> Result<PathBuf, VmError> {
    if let Some(p) = std::env::var_os("MATCHLOCK_KERNEL") {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(VmError::Missing(format!("MATCHLOCK_KERNEL={} does not exist", p.display())))
        };
    }
    let suffix = format!("-{}", config_hash());
    let newest_in = |dir: PathBuf| {
        std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(KERNEL_SERIES))
            .filter(|e| e.file_name().to_string_lossy().ends_with(&suffix))
            .map(|e| e.path().join("kernel"))
            .filter(|k| k.is_file())
            .max_by_key(|k| k.metadata().and_then(|m| m.modified()).ok())
    };
    newest_in(Path::new(crate::tools::PACKAGE_LIB_DIR).join("kernels")).or_else(|| newest_in(kernels_dir())).ok_or_else(
        || {
            VmError::Missing(format!(
                "no guest kernel for config {} in {}: run `matchlock kernel build` (or scripts/setup.sh)",
                config_hash(),
                kernels_dir().display()
            ))
        },
    )
}

/// Builds the kernel (a no-op when it is cached) and returns its path. Takes minutes.
pub fn build() -> Result<PathBuf, VmError> {
    let work = tempfile::tempdir().map_err(VmError::io("cannot create a temporary directory"))?;
    let config = work.path().join("config-x86_64");
    let script = work.path().join("build.sh");
    std::fs::write(&config, CONFIG).map_err(VmError::io("cannot write the kernel config"))?;
    std::fs::write(&script, BUILD_SCRIPT).map_err(VmError::io("cannot write the kernel build script"))?;
    let out = Command::new("bash")
        .arg(&script)
        .arg(&config)
        .arg(kernels_dir())
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(|source| VmError::Spawn { program: "bash".into(), source })?;
    if !out.status.success() {
        return Err(VmError::Missing(format!("kernel build failed ({})", out.status)));
    }
    Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}
