//! `matchlock diagnose`, `matchlock setup linux` and `matchlock kernel build`: checking and
//! preparing this host.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, PoisonError};

use anyhow::{bail, Context, Result};
use matchlock_api::paths::{cache_dir, state_dir};
use matchlock_vm::{accel, kernel, tools};
use serde::Serialize;

use crate::progress::{self, Output};

/// Outcome of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
enum Verdict {
    Pass,
    Warn,
    Fail,
}

#[derive(Debug, Serialize)]
struct Check {
    name: &'static str,
    status: Verdict,
    message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    fix: Option<String>,
}

fn check(name: &'static str, status: Verdict, message: impl Into<String>, fix: Option<&str>) -> Check {
    Check { name, status, message: message.into(), fix: fix.map(str::to_owned) }
}

fn version_of(program: &Path, arg: &str) -> Option<String> {
    let out = Command::new(program).arg(arg).output().ok()?;
    let text = if out.stdout.is_empty() { out.stderr } else { out.stdout };
    String::from_utf8_lossy(&text).lines().next().map(|l| l.trim().to_owned())
}

/// mke2fs must be new enough to build file systems from tarballs (1.47.1).
fn e2fsprogs_check() -> Check {
    let fix = Some("scripts/setup.sh (installs e2fsprogs from bookworm-backports)");
    let Some(line) = version_of(Path::new("mke2fs"), "-V") else {
        return check("e2fsprogs", Verdict::Fail, "mke2fs not found", fix);
    };
    let version: Vec<u32> =
        line.split_whitespace().nth(1).unwrap_or("").split('.').filter_map(|p| p.parse().ok()).collect();
    if version >= vec![1, 47, 1] {
        check("e2fsprogs", Verdict::Pass, line, None)
    } else {
        check("e2fsprogs", Verdict::Fail, format!("{line}: 1.47.1 or newer is needed (mke2fs -d <tarball>)"), fix)
    }
}

fn disk_check(name: &'static str, dir: &Path) -> Check {
    let existing = dir.ancestors().find(|d| d.exists()).unwrap_or(Path::new("/"));
    match nix::sys::statvfs::statvfs(existing) {
        Ok(st) => {
            let free = st.blocks_available() * st.fragment_size();
            let gb = free as f64 / 1e9;
            let msg = format!("{gb:.1} GB free for {}", dir.display());
            match gb {
                g if g >= 5.0 => check(name, Verdict::Pass, msg, None),
                g if g >= 1.0 => {
                    check(name, Verdict::Warn, msg, Some("free disk space: sandboxes need up to --disk-size each"))
                }
                _ => check(name, Verdict::Fail, msg, Some("free disk space")),
            }
        }
        Err(e) => check(name, Verdict::Fail, format!("cannot stat {}: {e}", existing.display()), None),
    }
}

async fn checks() -> Vec<Check> {
    let mut out = Vec::new();
    let qemu = tools::qemu();
    out.push(match &qemu {
        Ok(q) => match version_of(q, "--version") {
            Some(v) => check("qemu", Verdict::Pass, v, None),
            None => check("qemu", Verdict::Fail, format!("{} does not run", q.display()), Some("scripts/setup.sh")),
        },
        Err(e) => check("qemu", Verdict::Fail, e.to_string(), Some("scripts/setup.sh")),
    });
    let kernel = kernel::locate();
    out.push(match &kernel {
        Ok(k) => check("kernel", Verdict::Pass, k.display().to_string(), None),
        Err(e) => check("kernel", Verdict::Fail, e.to_string(), Some("matchlock kernel build")),
    });
    out.push(match tools::guest_init() {
        Ok(p) => check("guest-init", Verdict::Pass, p.display().to_string(), None),
        Err(e) => check("guest-init", Verdict::Fail, e.to_string(), Some("scripts/setup.sh")),
    });
    out.push(e2fsprogs_check());
    out.push(match (&qemu, &kernel) {
        (Ok(q), Ok(k)) => match accel::kvm_usable(q, k).await {
            Ok(()) => check("kvm", Verdict::Pass, "KVM boots the guest kernel", None),
            Err(v) => check(
                "kvm",
                Verdict::Warn,
                format!("KVM is not usable ({}); sandboxes run under TCG emulation, much slower", v.reason),
                Some("on a real host: enable virtualisation and give this user read-write access to /dev/kvm"),
            ),
        },
        _ => check("kvm", Verdict::Warn, "not checked: QEMU or the kernel is missing", None),
    });
    out.push(if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        check("cgroup", Verdict::Pass, "cgroup v2", None)
    } else {
        check("cgroup", Verdict::Warn, "the host does not use cgroup v2", None)
    });
    out.push(disk_check("disk-cache", &cache_dir()));
    out.push(disk_check("disk-state", &state_dir()));
    out
}

/// `matchlock diagnose [--json]`.
pub(crate) async fn diagnose(json: bool) -> Result<u8> {
    let checks = checks().await;
    let ok = checks.iter().all(|c| c.status != Verdict::Fail);
    if json {
        outln!("{}", serde_json::to_string_pretty(&serde_json::json!({ "ok": ok, "checks": checks }))?)?;
    } else {
        for c in &checks {
            let mark = match c.status {
                Verdict::Pass => "✓",
                Verdict::Warn => "⚠",
                Verdict::Fail => "✗",
            };
            outln!("{mark} {}: {}", c.name, c.message)?;
            if let Some(fix) = &c.fix {
                outln!("  fix: {fix}")?;
            }
        }
    }
    if !ok {
        bail!("diagnose failed: one or more checks failed");
    }
    Ok(0)
}

const INSTALL_DEPS: &str = include_str!("../../../scripts/install-deps.sh");

/// The udev rule that keeps /dev/kvm usable by the kvm group across reboots.
const KVM_UDEV_RULE: (&str, &str) =
    ("/etc/udev/rules.d/65-matchlock-kvm.rules", "KERNEL==\"kvm\", GROUP=\"kvm\", MODE=\"0660\"\n");

fn run_tool(program: &str, args: &[&str]) -> Result<()> {
    let status = Command::new(program).args(args).status().with_context(|| format!("cannot run {program}"))?;
    if !status.success() {
        bail!("{program} {} failed ({status})", args.join(" "));
    }
    Ok(())
}

/// `matchlock setup user <name>`: the kvm group (created if missing) owns /dev/kvm with
/// mode 0660 (a udev rule keeps it so) and has `name` as a member.
pub(crate) fn setup_user(name: &str) -> Result<u8> {
    if !nix::unistd::Uid::effective().is_root() {
        bail!("setup user changes groups and /dev/kvm: run it as root (sudo matchlock setup user {name})");
    }
    if nix::unistd::User::from_name(name).ok().flatten().is_none() {
        bail!("no user {name:?} on this host");
    }
    let kvm = match nix::unistd::Group::from_name("kvm").context("cannot read the group database")? {
        Some(group) => group,
        None => {
            run_tool("groupadd", &["--system", "kvm"])?;
            outln!("Created the kvm group")?;
            nix::unistd::Group::from_name("kvm")?.context("the kvm group is missing after groupadd")?
        }
    };
    let device = Path::new("/dev/kvm");
    if device.exists() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let meta = std::fs::metadata(device).context("cannot read /dev/kvm")?;
        if meta.gid() != kvm.gid.as_raw() || meta.mode() & 0o060 != 0o060 {
            nix::unistd::chown(device, None, Some(kvm.gid)).context("cannot give /dev/kvm to the kvm group")?;
            std::fs::set_permissions(device, std::fs::Permissions::from_mode(0o660))
                .context("cannot chmod /dev/kvm")?;
            outln!("/dev/kvm: group kvm, mode 0660")?;
        }
    } else {
        eprintln!("matchlock: this host has no /dev/kvm (sandboxes use slow software emulation)");
    }
    let (rule, text) = KVM_UDEV_RULE;
    if Path::new(rule).parent().is_some_and(Path::is_dir) {
        std::fs::write(rule, text).with_context(|| format!("cannot write {rule}"))?;
    }
    run_tool("usermod", &["-aG", "kvm", "--", name])?;
    outln!("Added {name} to the kvm group (it applies at their next login)")?;
    Ok(0)
}

/// `matchlock setup linux`.
pub(crate) fn setup_linux(skip_packages: bool, skip_kernel: bool) -> Result<u8> {
    if !skip_packages {
        let status =
            Command::new("bash").arg("-c").arg(INSTALL_DEPS).status().context("cannot run the dependency installer")?;
        if !status.success() {
            bail!("installing dependencies failed ({status})");
        }
    }
    if !skip_kernel {
        let path = build_kernel(&Output::new(false))?;
        outln!("kernel: {}", path.display())?;
    }
    if tools::guest_init().is_err() {
        eprintln!("matchlock: guest-init is not installed: run scripts/setup.sh from a source checkout");
    }
    outln!("Setup complete; run `matchlock diagnose` to check this host")?;
    Ok(0)
}

/// Lines of a quiet kernel build kept to tell why it failed.
const KERNEL_LOG_TAIL: usize = 20;

/// Builds the guest kernel (a no-op when cached) with its phases as progress: a spinner per
/// phase on a terminal, the build script's lines otherwise; quiet, only a failure's last lines.
pub(crate) fn build_kernel(out: &Output) -> Result<PathBuf> {
    let is_phase = |line: &str| line.starts_with("extracting ") || line.starts_with("building kernel ");
    let tail = Arc::new(Mutex::new(VecDeque::with_capacity(KERNEL_LOG_TAIL)));
    let captured = match out {
        Output::Silent => {
            let kept = tail.clone();
            Some(progress::capture(move |line| {
                let mut kept = kept.lock().unwrap_or_else(PoisonError::into_inner);
                if let Some(line) = line {
                    if kept.len() == KERNEL_LOG_TAIL {
                        kept.pop_front();
                    }
                    kept.push_back(line.to_owned());
                }
            })?)
        }
        Output::Bars(_) | Output::Lines => out.steps(Some("Looking for a built kernel"), is_phase)?,
    };
    let built = kernel::build();
    drop(captured);
    if built.is_err() {
        for line in tail.lock().unwrap_or_else(PoisonError::into_inner).iter() {
            eprintln!("{line}");
        }
    }
    Ok(built?)
}
