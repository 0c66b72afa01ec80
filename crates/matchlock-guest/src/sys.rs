//! Thin wrappers for the few syscalls nix does not cover, and small helpers.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use matchlock_protocol::exec::WindowSize;

/// Formats an error with its whole `source()` chain.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Sets the window size of a terminal.
pub(crate) fn set_window_size(fd: BorrowedFd<'_>, ws: WindowSize) -> io::Result<()> {
    let winsize = libc::winsize { ws_row: ws.rows, ws_col: ws.cols, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: TIOCSWINSZ reads one `winsize` from the pointer, which is valid for the call.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ, &winsize) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Makes the terminal on stdin the controlling terminal of the calling session leader.
pub(crate) fn set_controlling_terminal() -> io::Result<()> {
    // SAFETY: TIOCSCTTY takes an integer argument and touches no memory of ours.
    let rc = unsafe { libc::ioctl(0, libc::TIOCSCTTY, 0) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Brings the loopback interface up.
pub(crate) fn loopback_up() -> io::Result<()> {
    // SAFETY: plain socket(2) call; the result is checked and owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: `ifreq` is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS fills the `ifreq` we own and pass by pointer.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just initialised the flags member of the union.
    unsafe { req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short };
    // SAFETY: SIOCSIFFLAGS reads the `ifreq` we own.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The capabilities a command keeps unless the sandbox is privileged: a default container
/// runtime's set (Docker's, containerd's). Everything else (administration, tracing, raw
/// I/O, modules, boot, time, network administration, BPF, perf …) leaves the bounding set.
const KEPT_CAPABILITIES: [libc::c_ulong; 14] = [
    0,  // CAP_CHOWN
    1,  // CAP_DAC_OVERRIDE
    3,  // CAP_FOWNER
    4,  // CAP_FSETID
    5,  // CAP_KILL
    6,  // CAP_SETGID
    7,  // CAP_SETUID
    8,  // CAP_SETPCAP
    10, // CAP_NET_BIND_SERVICE
    13, // CAP_NET_RAW
    18, // CAP_SYS_CHROOT
    27, // CAP_MKNOD
    29, // CAP_AUDIT_WRITE
    31, // CAP_SETFCAP
];

/// System calls that fail with EPERM for commands, as a default container runtime's
/// seccomp profile refuses them: tracing and reading other processes (`ptrace`,
/// `process_vm_*`, `kcmp`, `pidfd_getfd`), namespaces and mounts (`unshare`, `setns`,
/// `mount` and the new mount API, `pivot_root`), the kernel itself (modules, `kexec`,
/// `reboot`, `swapon`, `acct`, the clock, keyrings, BPF, `perf_event_open`, `userfaultfd`,
/// `io_uring`), and obsolete interfaces. `clone` with namespace flags is refused by
/// [`CLONE_NAMESPACE_FLAGS`]; `clone3` answers ENOSYS, so that libcs fall back to `clone`.
const DENIED_SYSCALLS: [libc::c_long; 53] = [
    libc::SYS_ptrace,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    libc::SYS_process_madvise,
    libc::SYS_kcmp,
    libc::SYS_pidfd_getfd,
    libc::SYS_unshare,
    libc::SYS_setns,
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_mount_setattr,
    libc::SYS_move_mount,
    libc::SYS_open_tree,
    libc::SYS_fsopen,
    libc::SYS_fsconfig,
    libc::SYS_fsmount,
    libc::SYS_fspick,
    libc::SYS_pivot_root,
    libc::SYS_name_to_handle_at,
    libc::SYS_open_by_handle_at,
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_kexec_load,
    libc::SYS_kexec_file_load,
    libc::SYS_reboot,
    libc::SYS_swapon,
    libc::SYS_swapoff,
    libc::SYS_acct,
    libc::SYS_settimeofday,
    libc::SYS_clock_settime,
    libc::SYS_clock_adjtime,
    libc::SYS_adjtimex,
    libc::SYS_add_key,
    libc::SYS_request_key,
    libc::SYS_keyctl,
    libc::SYS_bpf,
    libc::SYS_perf_event_open,
    libc::SYS_userfaultfd,
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
    libc::SYS_fanotify_init,
    libc::SYS_lookup_dcookie,
    libc::SYS_quotactl,
    libc::SYS_quotactl_fd,
    libc::SYS_nfsservctl,
    libc::SYS_sysfs,
    libc::SYS__sysctl,
    libc::SYS_uselib,
    libc::SYS_ustat,
    libc::SYS_ioperm,
    libc::SYS_iopl,
];

/// `clone` flags that make new namespaces: a `clone` with any of them fails with EPERM.
const CLONE_NAMESPACE_FLAGS: [libc::c_int; 7] = [
    libc::CLONE_NEWNS,
    libc::CLONE_NEWUTS,
    libc::CLONE_NEWIPC,
    libc::CLONE_NEWUSER,
    libc::CLONE_NEWPID,
    libc::CLONE_NEWNET,
    libc::CLONE_NEWCGROUP,
];

/// What [`harden`] installs: the EPERM program, then the one answering `clone3` with
/// ENOSYS (a filter has one action for all its matches).
#[derive(Debug)]
pub(crate) struct SeccompPrograms {
    deny: seccompiler::BpfProgram,
    no_clone3: seccompiler::BpfProgram,
}

/// Restricts the calling process before it executes a command: the bounding set keeps
/// only [`KEPT_CAPABILITIES`], the inheritable and ambient sets are emptied, no_new_privs
/// is set, and the seccomp programs (built once by [`seccomp_programs`]) are installed.
/// Inherited by everything it starts.
pub(crate) fn harden(seccomp: &SeccompPrograms) -> io::Result<()> {
    raise_open_files_hard_limit()?;
    // The kernel refuses capabilities past its last with EINVAL.
    for cap in (0..64).filter(|c| !KEPT_CAPABILITIES.contains(c)) {
        // SAFETY: PR_CAPBSET_DROP takes an integer and touches no memory of ours.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) } < 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EINVAL) {
                break;
            }
            return Err(err);
        }
    }
    // SAFETY: PR_CAP_AMBIENT_CLEAR_ALL takes integers and touches no memory of ours.
    if unsafe { libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    clear_inheritable()?;
    nix::sys::prctl::set_no_new_privs()?;
    seccompiler::apply_filter(&seccomp.no_clone3).map_err(io::Error::other)?;
    seccompiler::apply_filter(&seccomp.deny).map_err(io::Error::other)
}

/// Raises the hard limit on open files to the kernel's ceiling (`fs.nr_open`), as container
/// runtimes do, while `CAP_SYS_RESOURCE` is still held: without it a command can no longer
/// raise the limit itself, and `ulimit -n 16384` must keep working. The soft limit stays.
fn raise_open_files_hard_limit() -> io::Result<()> {
    let ceiling = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(1 << 20);
    let (soft, hard) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)?;
    if hard < ceiling {
        nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, soft, ceiling)?;
    }
    Ok(())
}

/// Empties the inheritable capability set (capget, then capset with it cleared).
fn clear_inheritable() -> io::Result<()> {
    /// `_LINUX_CAPABILITY_VERSION_3`: two 32-bit data words.
    const VERSION_3: u32 = 0x2008_0522;
    #[repr(C)]
    struct Header {
        version: u32,
        pid: libc::c_int,
    }
    #[repr(C)]
    #[derive(Default, Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    let mut header = Header { version: VERSION_3, pid: 0 };
    let mut data = [Data::default(); 2];
    // SAFETY: capget writes two `Data` words for version 3 into `data`, which is valid and
    // large enough, and reads `header`.
    if unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) } < 0 {
        return Err(io::Error::last_os_error());
    }
    for word in &mut data {
        word.inheritable = 0;
    }
    // SAFETY: capset reads `header` and two `Data` words from `data`, both valid.
    if unsafe { libc::syscall(libc::SYS_capset, &header, data.as_ptr()) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Builds the seccomp programs [`harden`] installs.
pub(crate) fn seccomp_programs() -> io::Result<SeccompPrograms> {
    use seccompiler::{SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule};
    let mut rules: std::collections::BTreeMap<i64, Vec<SeccompRule>> =
        DENIED_SYSCALLS.iter().map(|nr| (*nr, Vec::new())).collect();
    let clone_rules = CLONE_NAMESPACE_FLAGS
        .iter()
        .map(|flag| {
            let flag = u64::from(flag.unsigned_abs());
            let cond = SeccompCondition::new(0, SeccompCmpArgLen::Qword, SeccompCmpOp::MaskedEq(flag), flag)
                .map_err(io::Error::other)?;
            SeccompRule::new(vec![cond]).map_err(io::Error::other)
        })
        .collect::<io::Result<Vec<_>>>()?;
    rules.insert(libc::SYS_clone, clone_rules);
    let program = |rules, errno: i32| -> io::Result<seccompiler::BpfProgram> {
        let filter = SeccompFilter::new(
            rules,
            SeccompAction::Allow,
            SeccompAction::Errno(errno.unsigned_abs()),
            seccompiler::TargetArch::x86_64,
        )
        .map_err(io::Error::other)?;
        filter.try_into().map_err(io::Error::other)
    };
    Ok(SeccompPrograms {
        deny: program(rules, libc::EPERM)?,
        no_clone3: program([(libc::SYS_clone3, Vec::new())].into_iter().collect(), libc::ENOSYS)?,
    })
}
