//! Choosing between KVM and TCG without ever hanging.
//!
//! `/dev/kvm` existing is not enough: on nested hosts (such as PVM) a normal guest hangs
//! under KVM. So KVM is probed by booting our kernel to a deliberate panic in a
//! time-boxed QEMU; the verdict is cached per host boot, kernel and QEMU binary.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use matchlock_api::paths::cache_dir;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;

use crate::VmError;

/// How QEMU executes guest code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// Hardware virtualisation.
    Kvm,
    /// Software emulation.
    Tcg,
}

impl Accel {
    /// QEMU's `-accel` value.
    pub fn qemu_name(self) -> &'static str {
        match self {
            Self::Kvm => "kvm",
            Self::Tcg => "tcg",
        }
    }

    /// QEMU's `-cpu` value. Under TCG, `max` without ERMS and FSRM: with them the guest's
    /// kernel and glibc copy and clear memory with `rep movsb`/`rep stosb`, which TCG runs a
    /// byte per iteration; without them they use 8-byte or vector moves, and every copy in
    /// the guest (pipes, page cache, the host pipe, the workspace) is 2–4× faster.
    pub fn cpu_model(self) -> &'static str {
        match self {
            Self::Kvm => "host",
            Self::Tcg => "max,-erms,-fsrm",
        }
    }
}

const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
struct ProbeKey {
    boot_id: String,
    kernel: String,
    kernel_size: u64,
    kernel_mtime: i64,
    qemu: String,
    qemu_mtime: i64,
}

#[derive(Debug, Serialize, Deserialize)]
struct ProbeCache {
    key: ProbeKey,
    accel: Accel,
    #[serde(default)]
    reason: Option<String>,
}

fn mtime(p: &Path) -> (u64, i64) {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).map_or((0, 0), |m| (m.size(), m.mtime()))
}

fn probe_key(qemu: &Path, kernel: &Path) -> ProbeKey {
    let (kernel_size, kernel_mtime) = mtime(kernel);
    ProbeKey {
        boot_id: std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default().trim().to_owned(),
        kernel: kernel.display().to_string(),
        kernel_size,
        kernel_mtime,
        qemu: qemu.display().to_string(),
        qemu_mtime: mtime(qemu).1,
    }
}

/// Picks the accelerator: `MATCHLOCK_ACCEL` if set, else KVM when it can boot `kernel`.
/// Prints one line on stderr when it falls back to TCG after probing.
pub async fn select(qemu: &Path, kernel: &Path) -> Result<Accel, VmError> {
    match std::env::var("MATCHLOCK_ACCEL").ok().as_deref() {
        Some("kvm") => return Ok(Accel::Kvm),
        Some("tcg") => return Ok(Accel::Tcg),
        Some("") | None => {}
        Some(other) => return Err(VmError::InvalidSpec(format!("MATCHLOCK_ACCEL={other:?}: expected kvm or tcg"))),
    }
    if let Err(e) = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        let cache = cache_dir().join("accel-probe.json");
        if !cache.exists() {
            tracing::warn!("/dev/kvm is not usable ({e}); using TCG software emulation (slow)");
            let _ = std::fs::create_dir_all(cache_dir());
            let _ = std::fs::write(&cache, "{}");
        }
        return Ok(Accel::Tcg);
    }
    match kvm_usable(qemu, kernel).await {
        Ok(()) => Ok(Accel::Kvm),
        Err(KvmVerdict { reason, fresh }) => {
            if fresh {
                tracing::warn!(
                    "KVM cannot boot the guest kernel on this host ({reason}); using TCG software emulation (slow)"
                );
            }
            Ok(Accel::Tcg)
        }
    }
}

/// Why KVM is not used, and whether this call is the one that found out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvmVerdict {
    /// What failed.
    pub reason: String,
    /// True when the probe ran now (not answered from the cache).
    pub fresh: bool,
}

/// Whether KVM can boot `kernel` here: `/dev/kvm` must open read-write and a
/// time-boxed probe boot must reach the kernel. The probe's verdict is cached per host
/// boot, kernel and QEMU binary.
pub async fn kvm_usable(qemu: &Path, kernel: &Path) -> Result<(), KvmVerdict> {
    if let Err(e) = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        return Err(KvmVerdict { reason: format!("/dev/kvm: {e}"), fresh: false });
    }
    let cache_path = cache_dir().join("accel-probe.json");
    let key = probe_key(qemu, kernel);
    if let Some(cached) = std::fs::read(&cache_path).ok().and_then(|b| serde_json::from_slice::<ProbeCache>(&b).ok()) {
        if cached.key == key {
            return match cached.accel {
                Accel::Kvm => Ok(()),
                Accel::Tcg => Err(KvmVerdict {
                    reason: cached.reason.unwrap_or_else(|| "an earlier probe failed".to_owned()),
                    fresh: false,
                }),
            };
        }
    }
    let verdict = probe_kvm(qemu, kernel).await;
    let _ = std::fs::create_dir_all(cache_dir());
    let record = ProbeCache {
        key,
        accel: if verdict.is_ok() { Accel::Kvm } else { Accel::Tcg },
        reason: verdict.as_ref().err().cloned(),
    };
    if let Ok(json) = serde_json::to_vec(&record) {
        let tmp = cache_path.with_extension(format!("tmp{}", std::process::id()));
        if std::fs::write(&tmp, json).is_ok() {
            let _ = std::fs::rename(tmp, &cache_path);
        }
    }
    verdict.map_err(|reason| KvmVerdict { reason, fresh: true })
}

/// Boots `kernel` under KVM with no root device: a working KVM reaches the "cannot
/// mount root" panic and QEMU exits within a second or so.
async fn probe_kvm(qemu: &Path, kernel: &Path) -> Result<(), String> {
    let mut probe = tokio::process::Command::new(qemu);
    probe
        .args(["-M", "microvm,acpi=off,x-option-roms=off,rtc=off", "-accel", "kvm", "-cpu", "host", "-m", "128"])
        .args(["-nodefaults", "-no-user-config", "-nographic", "-no-reboot", "-serial", "stdio", "-kernel"])
        .arg(kernel)
        .args(["-append", "console=ttyS0 panic=-1 reboot=t root=/dev/matchlock-probe"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // As every helper: it dies with this process (a probe that hangs under a KVM that cannot
    // boot must not outlive an owner killed during it).
    let mut child = crate::qemu::spawn(&mut probe).map_err(|e| e.to_string())?;
    let mut stdout = child.stdout.take().expect("piped");
    let mut output = Vec::new();
    let read = async {
        let _ = stdout.read_to_end(&mut output).await;
        child.wait().await
    };
    match tokio::time::timeout(PROBE_TIMEOUT, read).await {
        Err(_) => Err(format!("probe boot did not finish within {PROBE_TIMEOUT:?}")),
        Ok(Err(e)) => Err(format!("probe failed: {e}")),
        Ok(Ok(_)) if String::from_utf8_lossy(&output).contains("Kernel panic") => Ok(()),
        Ok(Ok(status)) => Err(format!("probe boot failed ({status})")),
    }
}
