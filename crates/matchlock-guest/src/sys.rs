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

/// Capabilities no command keeps unless the sandbox is privileged: tracing other
/// processes, administration (mount, namespaces…), kernel modules, raw I/O, reboot.
const DROPPED_CAPABILITIES: [libc::c_ulong; 5] = [
    19, // CAP_SYS_PTRACE
    21, // CAP_SYS_ADMIN
    16, // CAP_SYS_MODULE
    17, // CAP_SYS_RAWIO
    22, // CAP_SYS_BOOT
];

/// System calls that fail with EPERM for commands: reading or writing other processes'
/// memory, and loading a new kernel.
const DENIED_SYSCALLS: [libc::c_long; 5] = [
    libc::SYS_ptrace,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    libc::SYS_kexec_load,
    libc::SYS_kexec_file_load,
];

/// Restricts the calling process before it executes a command: drops
/// [`DROPPED_CAPABILITIES`] from the bounding set, sets no_new_privs, and installs a
/// seccomp filter denying [`DENIED_SYSCALLS`] (built once by [`seccomp_program`]).
/// Inherited by everything it starts.
pub(crate) fn harden(seccomp: &seccompiler::BpfProgram) -> io::Result<()> {
    for cap in DROPPED_CAPABILITIES {
        // SAFETY: PR_CAPBSET_DROP takes an integer and touches no memory of ours.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    nix::sys::prctl::set_no_new_privs()?;
    seccompiler::apply_filter(seccomp).map_err(io::Error::other)
}

/// The seccomp program [`harden`] installs: [`DENIED_SYSCALLS`] fail with EPERM.
pub(crate) fn seccomp_program() -> io::Result<seccompiler::BpfProgram> {
    let rules = DENIED_SYSCALLS.iter().map(|nr| (*nr, Vec::new())).collect();
    let filter = seccompiler::SeccompFilter::new(
        rules,
        seccompiler::SeccompAction::Allow,
        seccompiler::SeccompAction::Errno(libc::EPERM as u32),
        seccompiler::TargetArch::x86_64,
    )
    .map_err(io::Error::other)?;
    filter.try_into().map_err(io::Error::other)
}
