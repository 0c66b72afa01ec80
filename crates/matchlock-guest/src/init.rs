//! PID 1: assemble the root filesystem, prepare the machine, then serve the exec agent.
//!
//! The kernel mounts the shared, read-only boot disk (which holds only this binary as
//! `/init`) as `/`. Init mounts the image layers (read-only ext4) and the per-VM upper
//! disk, joins them with overlayfs, and `pivot_root`s into the result, so the workload
//! sees exactly the image plus its own writable changes.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use matchlock_protocol::boot::{BootParams, BootParamsError, Restored, RESTORED_ENTROPY};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::time::{clock_gettime, clock_settime, ClockId};

use crate::{agent, sys};

const STAGING: &str = "/run/matchlock";

/// Errors that stop the guest from booting.
#[derive(Debug, thiserror::Error)]
pub(crate) enum InitError {
    /// /proc/cmdline could not be read.
    #[error("cannot read the kernel command line")]
    Cmdline(#[source] std::io::Error),
    /// The boot parameters are missing or invalid.
    #[error("bad boot parameters")]
    Params(#[from] BootParamsError),
    /// A mount failed.
    #[error("cannot mount {what} on {target}")]
    Mount {
        /// What was being mounted.
        what: String,
        /// Where.
        target: String,
        /// Why it failed.
        #[source]
        source: nix::Error,
    },
    /// Switching to the assembled root failed.
    #[error("cannot switch to the overlay root")]
    PivotRoot(#[source] nix::Error),
    /// A file could not be written.
    #[error("cannot write {path}")]
    Write {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The pipe to the host cannot be opened.
    #[error("cannot open the host pipe")]
    HostPipe(#[source] std::io::Error),
    /// The exec agent failed.
    #[error("exec agent failed")]
    Agent(#[from] agent::AgentError),
}

/// Entry point for PID 1. Never returns normally: on a fatal error the VM is rebooted,
/// which ends it (the host runs QEMU with `-no-reboot`).
pub(crate) fn main() -> ExitCode {
    if let Err(e) = run() {
        eprintln!("matchlock-init: FATAL: {}", sys::error_chain(&e));
    }
    // A reset ends the VM: the host runs QEMU with `-no-reboot`.
    nix::unistd::sync();
    let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
    ExitCode::FAILURE
}

fn run() -> Result<(), InitError> {
    mount_fs("proc", "/proc", "proc", MsFlags::empty(), None)?;
    let cmdline = fs::read_to_string("/proc/cmdline").map_err(InitError::Cmdline)?;
    let params = BootParams::from_cmdline(&cmdline)?;
    set_clock(params.epoch_ms);
    let sandbox_ca = assemble_root(&params)?;
    mount_base_filesystems(params.image_tmp)?;
    crate::mux::start().map_err(InitError::HostPipe)?;
    if let Some(ca) = sandbox_ca {
        if let Err(e) = install_ca(&ca) {
            eprintln!("matchlock-init: cannot install the sandbox CA: {}", sys::error_chain(&e));
        }
    }
    write_identity_files(&params)?;
    mount_disks(&params)?;
    if let Some(workspace) = &params.workspace {
        if let Err(e) = crate::fused::mount(workspace) {
            eprintln!("matchlock-init: cannot mount the workspace {workspace}: {e}");
        }
    }
    if let Err(e) = sys::loopback_up() {
        eprintln!("matchlock-init: cannot bring up lo: {e}");
    }
    if let Err(e) = setup_cgroup(params.cpus) {
        eprintln!("matchlock-init: cgroup setup failed: {e}");
    }
    agent::serve(params.disks.iter().filter(|d| !d.2).map(|d| d.1.clone()).collect())?;
    Ok(())
}

fn mount_fs(source: &str, target: &str, fstype: &str, flags: MsFlags, data: Option<&str>) -> Result<(), InitError> {
    let _ = fs::create_dir_all(target);
    mount(Some(source), target, Some(fstype), flags, data).map_err(|source_err| InitError::Mount {
        what: format!("{source} ({fstype})"),
        target: target.to_owned(),
        source: source_err,
    })
}

/// The guest has no RTC: set the wall clock from the host's launch time plus the time
/// the guest has been running.
fn set_clock(epoch_ms: u64) {
    let Ok(up) = clock_gettime(ClockId::CLOCK_BOOTTIME) else { return };
    let up_ms = up.tv_sec() as u64 * 1000 + up.tv_nsec() as u64 / 1_000_000;
    let now = Duration::from_millis(epoch_ms + up_ms);
    let ts = nix::sys::time::TimeSpec::from_duration(now);
    if let Err(e) = clock_settime(ClockId::CLOCK_REALTIME, ts) {
        eprintln!("matchlock-init: cannot set the clock: {e}");
    }
}

/// Where the host leaves the sandbox CA on the upper disk (outside the overlay's upper dir).
const SEEDED_CA: &str = "matchlock/ca.crt";
/// Where workloads find it.
const GUEST_CA: &str = "/etc/ssl/certs/matchlock-ca.crt";
/// System CA bundles of common distributions; the sandbox CA is appended to those present.
pub(crate) const SYSTEM_BUNDLES: [&str; 3] =
    ["/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt", "/etc/ssl/cert.pem"];

/// Installs the sandbox CA: its own file, and appended to the system bundle (created if the
/// image has none), so TLS clients trust the host's interception.
fn install_ca(pem: &[u8]) -> Result<(), InitError> {
    let write_err = |path: &str| {
        let path = path.to_owned();
        move |source| InitError::Write { path, source }
    };
    fs::create_dir_all("/etc/ssl/certs").map_err(write_err("/etc/ssl/certs"))?;
    fs::write(GUEST_CA, pem).map_err(write_err(GUEST_CA))?;
    fs::set_permissions(GUEST_CA, fs::Permissions::from_mode(0o644)).map_err(write_err(GUEST_CA))?;
    let mut seen = Vec::new();
    for bundle in SYSTEM_BUNDLES {
        let Ok(real) = fs::canonicalize(bundle) else { continue };
        if seen.contains(&real) {
            continue;
        }
        let mut file = fs::OpenOptions::new().append(true).open(&real).map_err(write_err(bundle))?;
        file.write_all(b"\n").and_then(|()| file.write_all(pem)).map_err(write_err(bundle))?;
        seen.push(real);
    }
    if seen.is_empty() {
        fs::write(SYSTEM_BUNDLES[0], pem).map_err(write_err(SYSTEM_BUNDLES[0]))?;
    }
    crate::commit::remember_appended_ca(pem);
    Ok(())
}

/// Mounts the layers and the upper disk as the root; returns the sandbox CA the host seeded.
fn assemble_root(params: &BootParams) -> Result<Option<Vec<u8>>, InitError> {
    mount_fs("tmpfs", "/run", "tmpfs", MsFlags::MS_NOSUID | MsFlags::MS_NODEV, Some("mode=0755"))?;
    let mut lower_dirs = Vec::with_capacity(params.lowers.len());
    for (i, dev) in params.lowers.iter().enumerate() {
        let target = format!("{STAGING}/lower/{i}");
        // Layers keep their device nodes and setuid bits: only MS_RDONLY applies to them.
        mount_fs(&format!("/dev/{dev}"), &target, "ext4", MsFlags::MS_RDONLY, Some("noload"))?;
        lower_dirs.push(target);
    }
    let upper_fs = format!("{STAGING}/upperfs");
    mount_fs(&format!("/dev/{}", params.upper), &upper_fs, "ext4", MsFlags::MS_NOATIME, None)?;
    let upper = format!("{upper_fs}/upper");
    let work = format!("{upper_fs}/work");
    for dir in [&upper, &work] {
        fs::create_dir_all(dir).map_err(|source| InitError::Write { path: dir.clone(), source })?;
    }
    let sandbox_ca = fs::read(format!("{upper_fs}/{SEEDED_CA}")).ok();
    crate::commit::remember_layers(&upper, &lower_dirs)
        .map_err(|source| InitError::Write { path: upper.clone(), source })?;
    // overlayfs wants the top layer first.
    lower_dirs.reverse();
    let merged = format!("{STAGING}/merged");
    let opts = format!("lowerdir={},upperdir={upper},workdir={work}", lower_dirs.join(":"));
    mount_fs("overlay", &merged, "overlay", MsFlags::empty(), Some(&opts))?;
    nix::unistd::chdir(merged.as_str()).map_err(InitError::PivotRoot)?;
    // pivot_root(".", ".") stacks the old root under the new one; detaching it leaves
    // only the overlay visible.
    nix::unistd::pivot_root(".", ".").map_err(InitError::PivotRoot)?;
    umount2(".", MntFlags::MNT_DETACH).map_err(InitError::PivotRoot)?;
    nix::unistd::chdir("/").map_err(InitError::PivotRoot)?;
    Ok(sandbox_ca)
}

/// Mounts /proc, /sys, /dev and the tmpfs directories (`/tmp` only unless `image_tmp`).
fn mount_base_filesystems(image_tmp: bool) -> Result<(), InitError> {
    let nosuid_nodev = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    let nosuid_noexec = MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC;
    mount_fs("proc", "/proc", "proc", nosuid_nodev | MsFlags::MS_NOEXEC, None)?;
    mount_fs("sysfs", "/sys", "sysfs", nosuid_nodev | MsFlags::MS_NOEXEC, None)?;
    mount_fs("devtmpfs", "/dev", "devtmpfs", nosuid_noexec, Some("mode=0755"))?;
    mount_fs("devpts", "/dev/pts", "devpts", nosuid_noexec, Some("newinstance,ptmxmode=0666,mode=0620,gid=5"))?;
    let _ = fs::remove_file("/dev/ptmx");
    let _ = symlink("pts/ptmx", "/dev/ptmx");
    for (link, target) in [
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
    ] {
        let _ = symlink(target, link);
    }
    mount_fs("shm", "/dev/shm", "tmpfs", nosuid_nodev, Some("mode=1777"))?;
    mount_fs("mqueue", "/dev/mqueue", "mqueue", nosuid_nodev | MsFlags::MS_NOEXEC, None)?;
    mount_fs("tmpfs", "/run", "tmpfs", nosuid_nodev, Some("mode=0755"))?;
    if !image_tmp {
        mount_fs("tmpfs", "/tmp", "tmpfs", nosuid_nodev, Some("mode=1777"))?;
    }
    mount_fs("cgroup2", "/sys/fs/cgroup", "cgroup2", nosuid_nodev | MsFlags::MS_NOEXEC, None)?;
    Ok(())
}

/// Mounts the extra ext4 disks (`--disk`) at their guest paths.
fn mount_disks(params: &BootParams) -> Result<(), InitError> {
    for (dev, path, ro) in &params.disks {
        let flags = if *ro { MsFlags::MS_RDONLY } else { MsFlags::empty() };
        mount_fs(&format!("/dev/{dev}"), path, "ext4", flags | MsFlags::MS_NOSUID | MsFlags::MS_NODEV, None)?;
    }
    Ok(())
}

fn write_file(path: &str, contents: &str) -> Result<(), InitError> {
    let err = |source| InitError::Write { path: path.to_owned(), source };
    if let Some(parent) = Path::new(path).parent() {
        fs::create_dir_all(parent).map_err(err)?;
    }
    // Replace, never write through: the image may ship /etc/resolv.conf as a symlink.
    let _ = fs::remove_file(path);
    let mut f = fs::File::create(path).map_err(err)?;
    f.write_all(contents.as_bytes()).map_err(err)?;
    f.set_permissions(fs::Permissions::from_mode(0o644)).map_err(err)?;
    Ok(())
}

/// /etc/hosts in the reference format.
pub(crate) fn hosts_file(params: &BootParams) -> String {
    let mut s = format!("127.0.0.1 localhost localhost.localdomain {}\n", params.hostname);
    for (host, ip) in &params.add_hosts {
        s.push_str(&format!("{ip} {host}\n"));
    }
    s.push_str("::1 localhost ip6-localhost ip6-loopback\nff02::1 ip6-allnodes\nff02::2 ip6-allrouters\n");
    s
}

fn write_identity_files(params: &BootParams) -> Result<(), InitError> {
    if let Err(e) = nix::unistd::sethostname(&params.hostname) {
        eprintln!("matchlock-init: sethostname: {e}");
    }
    write_file("/etc/hostname", &format!("{}\n", params.hostname))?;
    write_file("/etc/hosts", &hosts_file(params))?;
    let resolv: String = params.dns.iter().map(|ip| format!("nameserver {ip}\n")).collect();
    write_file("/etc/resolv.conf", &resolv)
}

/// Takes on the identity of the sandbox a restored machine (a snapshot or a warm
/// template) now is: clock, fresh entropy and a reseeded RNG, then hostname, /etc files,
/// CA and workspace mount.
pub(crate) fn apply_restored(restored: &Restored) -> Result<(), String> {
    restored.validate()?;
    let now = nix::sys::time::TimeSpec::from_duration(Duration::from_millis(restored.epoch_ms));
    clock_settime(ClockId::CLOCK_REALTIME, now).map_err(|e| format!("cannot set the clock: {e}"))?;
    reseed(&restored.entropy[..restored.entropy.len().min(RESTORED_ENTROPY)])
        .map_err(|e| format!("cannot reseed the RNG: {e}"))?;
    let cmdline = fs::read_to_string("/proc/cmdline").map_err(|e| format!("cannot read /proc/cmdline: {e}"))?;
    let mut params = BootParams::from_cmdline(&cmdline).map_err(|e| e.to_string())?;
    params.hostname.clone_from(&restored.hostname);
    params.dns.clone_from(&restored.dns);
    params.add_hosts.clone_from(&restored.add_hosts);
    write_identity_files(&params).map_err(|e| sys::error_chain(&e))?;
    if let Some(pem) = &restored.ca_pem {
        install_ca(pem.as_bytes()).map_err(|e| sys::error_chain(&e))?;
    }
    match &restored.workspace {
        // A saved sandbox's workspace reconnects by itself on its first request.
        Some(path) if crate::fused::mounted() != Some(path.as_str()) => {
            crate::fused::mount(path).map_err(|e| format!("cannot mount the workspace {path}: {e}"))
        }
        _ => Ok(()),
    }
}

/// Credits `entropy` to the kernel's pool and reseeds the CRNG at once: every machine
/// restored from one snapshot starts with the same RNG state until this runs, and a
/// cold-booted one has no seeded CRNG yet.
pub(crate) fn reseed(entropy: &[u8]) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // <linux/random.h>: RNDADDENTROPY = _IOW('R', 0x03, int[2]); RNDRESEEDCRNG = _IO('R', 0x07).
    const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
    const RNDRESEEDCRNG: libc::c_ulong = 0x5207;
    let random = fs::OpenOptions::new().write(true).open("/dev/urandom")?;
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let mut info = Vec::with_capacity(8 + entropy.len().next_multiple_of(4));
    info.extend_from_slice(&((entropy.len() * 8) as i32).to_ne_bytes());
    info.extend_from_slice(&(entropy.len() as i32).to_ne_bytes());
    info.extend_from_slice(entropy);
    info.resize(8 + entropy.len().next_multiple_of(4), 0);
    // SAFETY: `info` is a valid rand_pool_info of `buf_size` bytes that outlives the call;
    // the kernel only reads it.
    if unsafe { libc::ioctl(random.as_raw_fd(), RNDADDENTROPY, info.as_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: RNDRESEEDCRNG takes no argument.
    if unsafe { libc::ioctl(random.as_raw_fd(), RNDRESEEDCRNG) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Moves PID 1 (and so every command) into `/sys/fs/cgroup/init` and applies the CPU quota.
fn setup_cgroup(cpus: f64) -> std::io::Result<()> {
    let group = "/sys/fs/cgroup/init";
    fs::create_dir_all(group)?;
    fs::write(format!("{group}/cgroup.procs"), "1")?;
    let controllers = fs::read_to_string("/sys/fs/cgroup/cgroup.controllers")?;
    let enable: Vec<String> = controllers.split_whitespace().map(|c| format!("+{c}")).collect();
    fs::write("/sys/fs/cgroup/cgroup.subtree_control", enable.join(" "))?;
    let quota = ((cpus * 100_000.0) as u64).max(1000);
    fs::write(format!("{group}/cpu.max"), format!("{quota} 100000"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_file_format() {
        let params = BootParams {
            hostname: "vm-abc".into(),
            dns: vec![],
            cpus: 1.0,
            lowers: vec!["vdb".into()],
            upper: "vdc".into(),
            add_hosts: vec![("api.internal".into(), "10.0.0.10".parse().unwrap())],
            epoch_ms: 0,
            privileged: false,
            workspace: None,
            disks: vec![],
            image_tmp: false,
        };
        assert_eq!(
            hosts_file(&params),
            "127.0.0.1 localhost localhost.localdomain vm-abc\n10.0.0.10 api.internal\n\
             ::1 localhost ip6-localhost ip6-loopback\nff02::1 ip6-allnodes\nff02::2 ip6-allrouters\n"
        );
    }
}
