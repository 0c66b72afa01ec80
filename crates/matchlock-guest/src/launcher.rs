//! The launcher: starts each command inside fresh PID and mount namespaces.
//!
//! The agent starts one launcher server per guest: this binary as `matchlock-launcher`,
//! with a `SOCK_SEQPACKET` socket on the descriptor named by `MATCHLOCK_LAUNCHER_FD`. For
//! each command the agent sends the request's pipe, the command's stdin, stdout and
//! stderr, and a status pipe (`SCM_RIGHTS`); the server hands them to a namespace init it
//! cloned ahead of time (the "spare"), straight into new PID and mount namespaces and as a
//! child of the agent (`CLONE_PARENT`: the agent signals and reaps it), and answers with
//! its PID. A clone of a process that already runs costs far less than spawning and
//! starting a binary for each command. A spare prepares its namespace (session, private
//! mounts, `/proc`) before its command exists; the next is cloned when the agent reports
//! that a command ended (the guest's idle time while the host handles the answer), or on
//! demand. It runs at normal priority: a spare at `SCHED_IDLE` raised when its command
//! came had run up a virtual runtime that kept it off the CPU behind any busy process
//! (an exec under a guest CPU hog took 200 ms instead of 15). A spare holds a copy of
//! the mounts of its time: after a restore changed them, the agent has the server let it
//! go and clone a new one.
//!
//! The namespace's PID 1 reads the request and starts the command, then lets go of its
//! stdio, forwards signals to the command's process group and reaps. When the command
//! ends, it kills and reaps what is left in the namespace and reports the exit code on the
//! status pipe before it exits, so the agent answers without waiting for the namespace's
//! teardown. A namespace init only receives
//! signals it handles, so the command must not be PID 1: otherwise SIGTERM would be
//! ignored. Exit codes travel back up unchanged (128+N for a death by signal N). The
//! seccomp program is built once, in the server.

use std::ffi::CString;
use std::fs;
use std::io::{self, IoSlice, IoSliceMut, Read};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, ExitCode, Stdio};

use matchlock_protocol::exec::{Bind, ExecRequest, RlimitResource};
use nix::errno::Errno;
use nix::mount::{mount, MsFlags};
use nix::sched::CloneFlags;
use nix::sys::resource::Resource;
use nix::sys::signal::{kill, killpg, SigHandler, SigSet, SigmaskHow, Signal};
use nix::sys::socket::{
    recv, recvmsg, sendmsg, socketpair, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag,
    SockType,
};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{Gid, Pid, Uid};

use crate::{sys, users, LAUNCHER_ARGV0};

/// The environment variable that tells the launcher server which descriptor is its socket.
const LAUNCHER_FD_ENV: &str = "MATCHLOCK_LAUNCHER_FD";
/// Descriptors sent per command: the request's pipe; stdin, stdout, stderr; and the
/// pipe on which the namespace init reports the command's exit code.
pub(crate) const LAUNCH_FDS: usize = 5;
/// The stack the command's process runs on until it executes.
const COMMAND_STACK: usize = 256 * 1024;
/// Requests to the server (the byte of each message): start a command (with its
/// [`LAUNCH_FDS`] descriptors); let the spare go because the mounts changed; clone a spare
/// now if there is none (asked when a command has ended: in the guest's idle time).
const LAUNCH: u8 = 0;
const RENEW: u8 = 1;
const REPLENISH: u8 = 2;

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Signals forwarded to the command.
const FORWARDED: [Signal; 7] = [
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGHUP,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
    Signal::SIGWINCH,
];

/// Reports on stderr and ends with 127. `_exit`: no exit handlers run, as the command's
/// process shares its parent's memory until it executes.
fn fail(msg: &str) -> ! {
    eprintln!("matchlock: {msg}");
    // SAFETY: _exit ends the process at once and touches no memory of ours.
    unsafe { libc::_exit(127) }
}

fn forwarded_and_child() -> SigSet {
    let mut set = SigSet::empty();
    for s in FORWARDED {
        set.add(s);
    }
    set.add(Signal::SIGCHLD);
    set
}

/// Exit code for a wait status, shell style.
pub(crate) fn exit_code(status: WaitStatus) -> Option<i32> {
    match status {
        WaitStatus::Exited(_, code) => Some(code),
        WaitStatus::Signaled(_, sig, _) => Some(128 + sig as i32),
        _ => None,
    }
}

/// Starts the command and becomes its supervisor: lets go of the command's stdio,
/// forwards signals to the command's process group, reaps orphans, and when the command
/// ends, [`finish`]es.
///
/// The command is cloned with `CLONE_VM | CLONE_VFORK` on a stack of its own, as
/// posix_spawn does: it shares our memory and we wait until it has called execve (or
/// exited), so no page tables are copied and neither side takes copy-on-write faults.
fn spawn_command(request: &ExecRequest, hardening: &Hardening, status: &OwnedFd) -> ! {
    let set = forwarded_and_child();
    if let Err(e) = set.thread_block() {
        fail(&format!("cannot block signals: {e}"));
    }
    let mut stack = vec![0u8; COMMAND_STACK];
    let command = Box::new(|| {
        let _ = nix::sys::signal::sigprocmask(SigmaskHow::SIG_UNBLOCK, Some(&set), None);
        exec_command(request, request.window.is_some(), hardening)
    });
    let flags = CloneFlags::CLONE_VM | CloneFlags::CLONE_VFORK;
    // SAFETY: the child runs `command` on its own stack while this (single-threaded)
    // process is suspended; `command` ends only in execve or _exit (see `fail`), never
    // returning into or unwinding through our frames.
    let child = match unsafe { nix::sched::clone(command, &mut stack, flags, Some(libc::SIGCHLD)) } {
        Ok(child) => child,
        Err(e) => fail(&format!("cannot start the command: {e}")),
    };
    // The output ends when the command's processes are gone, not with us.
    for fd in 0..=2 {
        let _ = nix::unistd::close(fd);
    }
    supervise(child, &set, status)
}

fn supervise(child: Pid, set: &SigSet, status: &OwnedFd) -> ! {
    loop {
        let Ok(sig) = set.wait() else { continue };
        if sig != Signal::SIGCHLD {
            let _ = killpg(child, sig);
            continue;
        }
        loop {
            match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                Ok(exited) if exited.pid() == Some(child) => {
                    if let Some(code) = exit_code(exited) {
                        finish(code, status);
                    }
                }
                Ok(_) => {}
            }
        }
    }
}

/// The command ended with `code`: what is left in the namespace is killed and reaped,
/// then the code goes to the agent on `status`, before the namespace itself is torn down
/// (which costs about a millisecond under TCG, none of it the host's to wait for).
fn finish(code: i32, status: &OwnedFd) -> ! {
    let _ = kill(Pid::from_raw(-1), Signal::SIGKILL);
    while !matches!(waitpid(None, None), Err(Errno::ECHILD)) {}
    let _ = nix::unistd::write(status, &code.to_ne_bytes());
    std::process::exit(code)
}

/// Errors starting a command through the launcher server.
#[derive(Debug, thiserror::Error)]
pub(crate) enum LaunchError {
    /// The server could not be started.
    #[error("cannot start the launcher")]
    Start(#[source] io::Error),
    /// The server is gone or answered out of turn; a new one may do.
    #[error("the launcher is gone")]
    Gone(#[source] io::Error),
    /// The server could not create the command's process.
    #[error("cannot create the command's process")]
    Clone(#[source] Errno),
}

/// The agent's end of the launcher server.
pub(crate) struct Launcher {
    socket: OwnedFd,
    server: std::process::Child,
}

impl Launcher {
    /// Starts a launcher server.
    pub(crate) fn start() -> Result<Self, LaunchError> {
        let (ours, theirs) = socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC)
            .map_err(|e| LaunchError::Start(e.into()))?;
        let inherited = theirs.as_raw_fd();
        let mut cmd = Command::new("/proc/self/exe");
        cmd.arg0(LAUNCHER_ARGV0)
            .env_clear()
            .env(LAUNCHER_FD_ENV, inherited.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        // SAFETY: fcntl(2) is async-signal-safe and touches only the child's descriptor
        // table: the server's socket survives its exec, nothing else does.
        unsafe {
            cmd.pre_exec(move || {
                nix::fcntl::fcntl(inherited, nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()))?;
                Ok(())
            });
        }
        let server = cmd.spawn().map_err(LaunchError::Start)?;
        Ok(Self { socket: ours, server })
    }

    /// Starts a command: `fds` are its request's pipe, stdin, stdout, stderr and status
    /// pipe. Returns the PID of the command's namespace init, a child of the calling
    /// process.
    pub(crate) fn launch(&mut self, fds: [BorrowedFd<'_>; LAUNCH_FDS]) -> Result<Pid, LaunchError> {
        let raw = fds.map(|fd| fd.as_raw_fd());
        match self.call(LAUNCH, &raw)? {
            pid if pid > 0 => Ok(Pid::from_raw(pid)),
            errno => Err(LaunchError::Clone(Errno::from_raw(-errno))),
        }
    }

    /// The mounts changed: the server's spare namespace init, which holds a copy of the
    /// old ones, is let go (and reaped) and a new one cloned.
    pub(crate) fn renew_spare(&mut self) -> Result<(), LaunchError> {
        let pid = self.call(RENEW, &[])?;
        if pid > 0 {
            let _ = waitpid(Pid::from_raw(pid), None);
        }
        Ok(())
    }

    /// A command ended: the server clones the next spare now, while the guest waits for
    /// the host, rather than while the next command waits for it.
    pub(crate) fn replenish(&mut self) -> Result<(), LaunchError> {
        self.call(REPLENISH, &[]).map(drop)
    }

    /// One request to the server, its answer.
    fn call(&mut self, request: u8, fds: &[RawFd]) -> Result<i32, LaunchError> {
        let socket = self.socket.as_raw_fd();
        let rights = [ControlMessage::ScmRights(fds)];
        let cmsgs: &[ControlMessage<'_>] = if fds.is_empty() { &[] } else { &rights };
        sendmsg::<()>(socket, &[IoSlice::new(&[request])], cmsgs, MsgFlags::MSG_NOSIGNAL, None)
            .map_err(|e| LaunchError::Gone(e.into()))?;
        let mut reply = [0u8; 4];
        let n = loop {
            match recv(socket, &mut reply, MsgFlags::empty()) {
                Err(Errno::EINTR) => {}
                other => break other.map_err(|e| LaunchError::Gone(e.into()))?,
            }
        };
        if n != reply.len() {
            return Err(LaunchError::Gone(io::Error::from(io::ErrorKind::UnexpectedEof)));
        }
        Ok(i32::from_ne_bytes(reply))
    }
}

impl Drop for Launcher {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
    }
}

/// Entry point of the `matchlock-launcher` role: the launcher server.
pub(crate) fn main() -> ExitCode {
    let fd = std::env::var(LAUNCHER_FD_ENV).ok().and_then(|v| v.parse::<RawFd>().ok());
    let Some(fd) = fd.filter(|fd| *fd > 2) else { fail("no launcher socket") };
    // SAFETY: the agent hands us this descriptor as our socket; nothing else owns it.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    let cmdline = fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let hardening = if matchlock_protocol::boot::is_privileged(&cmdline) {
        Hardening::None
    } else {
        sys::seccomp_programs().map_or_else(|e| Hardening::Failed(e.to_string()), Hardening::Restrict)
    };
    let mut spare = clone_spare(&hardening).ok();
    loop {
        let (request, fds) = match receive(&socket) {
            Err(e) => fail(&format!("launcher socket: {e}")),
            // The agent closed its end.
            Ok(None) => return ExitCode::SUCCESS,
            Ok(Some(message)) => message,
        };
        let reply = match (request, <[OwnedFd; LAUNCH_FDS]>::try_from(fds)) {
            (LAUNCH, Ok(fds)) => match spare.take().map_or_else(|| clone_spare(&hardening), Ok) {
                Ok(init) => init.hand_over(fds).as_raw(),
                Err(e) => -(e as i32),
            },
            // The mounts changed (a restore): the spare's copy of them is stale.
            (RENEW, _) => spare.take().map_or(0, |s| s.dismiss().as_raw()),
            (REPLENISH, _) => 0,
            _ => -(Errno::EINVAL as i32),
        };
        if let Err(e) = nix::sys::socket::send(socket.as_raw_fd(), &reply.to_ne_bytes(), MsgFlags::MSG_NOSIGNAL) {
            fail(&format!("launcher socket: {e}"));
        }
        if request != LAUNCH && spare.is_none() {
            spare = clone_spare(&hardening).ok();
        }
    }
}

/// Receives one message: its request byte and descriptors; `None` once the peer closed
/// its end.
fn receive(socket: &OwnedFd) -> Result<Option<(u8, Vec<OwnedFd>)>, Errno> {
    loop {
        let mut byte = [0u8; 1];
        let mut iov = [IoSliceMut::new(&mut byte)];
        let mut space = nix::cmsg_space!([RawFd; LAUNCH_FDS]);
        let msg = match recvmsg::<()>(socket.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC) {
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e),
            Ok(msg) => msg,
        };
        if msg.bytes == 0 {
            return Ok(None);
        }
        let fds = msg
            .cmsgs()
            .into_iter()
            .flatten()
            .filter_map(|c| match c {
                ControlMessageOwned::ScmRights(fds) => Some(fds),
                _ => None,
            })
            .flatten()
            // SAFETY: the kernel just installed these descriptors for us.
            .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })
            .collect();
        return Ok(Some((byte[0], fds)));
    }
}

/// What commands are restricted with, decided once per boot.
enum Hardening {
    /// A privileged sandbox: nothing.
    None,
    /// Kernel knobs out of reach ([`protect_kernel_files`]), then capabilities,
    /// no_new_privs and these seccomp programs ([`sys::harden`]).
    Restrict(sys::SeccompPrograms),
    /// The seccomp program could not be built: every command fails with this.
    Failed(String),
}

/// A namespace init cloned ahead of its command. It prepares its namespace and waits on
/// `socket` for its command's descriptors.
struct Spare {
    pid: Pid,
    socket: OwnedFd,
}

impl Spare {
    /// Gives the spare its command's descriptors. Returns its PID (if it died meanwhile,
    /// the agent learns so from its wait status).
    fn hand_over(self, fds: [OwnedFd; LAUNCH_FDS]) -> Pid {
        let raw = fds.each_ref().map(AsRawFd::as_raw_fd);
        let cmsgs = [ControlMessage::ScmRights(&raw)];
        if let Err(e) =
            sendmsg::<()>(self.socket.as_raw_fd(), &[IoSlice::new(&[0])], &cmsgs, MsgFlags::MSG_NOSIGNAL, None)
        {
            eprintln!("matchlock-launcher: the spare namespace init is gone: {e}");
        }
        // Ours are closed: the command holds them now.
        drop(fds);
        self.pid
    }

    /// Lets the spare go (it exits when its socket closes); its PID, for the agent to reap.
    fn dismiss(self) -> Pid {
        self.pid
    }
}

/// Clones the init of a new PID and mount namespace as a child of our parent (the
/// agent), to wait as the [`Spare`]; the clone itself runs [`namespace_init`].
fn clone_spare(hardening: &Hardening) -> Result<Spare, Errno> {
    let (ours, theirs) = socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC)?;
    let flags = libc::CLONE_PARENT | libc::CLONE_NEWPID | libc::CLONE_NEWNS | libc::SIGCHLD;
    // SAFETY: without CLONE_VM this is a fork (what the standard library does to spawn):
    // the child continues here on a copy of this single-threaded process's memory.
    let rc = unsafe { libc::syscall(libc::SYS_clone, libc::c_long::from(flags), 0usize, 0usize, 0usize, 0usize) };
    match rc {
        -1 => Err(Errno::last()),
        0 => {
            // Only its own socket goes on (as fd 3): nothing the server held when it
            // cloned, such as another command's descriptors in flight, stays open here.
            if let Err(e) = keep_only(&theirs, SPARE_SOCKET_FD) {
                fail(&format!("cannot close inherited descriptors: {e}"));
            }
            // SAFETY: `keep_only` made fd 3 this socket and closed the original.
            let socket = unsafe { OwnedFd::from_raw_fd(SPARE_SOCKET_FD) };
            namespace_init(&socket, hardening)
        }
        pid => {
            let pid = Pid::from_raw(i32::try_from(pid).map_err(|_| Errno::EOVERFLOW)?);
            Ok(Spare { pid, socket: ours })
        }
    }
}

/// Where a spare keeps its socket.
const SPARE_SOCKET_FD: RawFd = 3;

/// Moves `fd` to `target` and closes every descriptor above 2 but `target`.
fn keep_only(fd: &OwnedFd, target: RawFd) -> Result<(), Errno> {
    if fd.as_raw_fd() != target {
        nix::unistd::dup2(fd.as_raw_fd(), target)?;
    }
    // SAFETY: close_range only closes descriptors; `fd` (if not `target`) is among them
    // and is never used or closed again (the caller does not return).
    if unsafe { libc::close_range(target as libc::c_uint + 1, libc::c_uint::MAX, 0) } < 0 {
        return Err(Errno::last());
    }
    Ok(())
}

/// PID 1 of a command's namespaces: prepares the namespace, waits for the command's
/// descriptors on `socket`, reads its request, then forks the command and supervises it.
fn namespace_init(socket: &OwnedFd, hardening: &Hardening) -> ! {
    let prepared = prepare_namespace().and_then(|()| match hardening {
        Hardening::None => Ok(()),
        Hardening::Restrict(_) | Hardening::Failed(_) => protect_kernel_files(),
    });
    let fds = match receive(socket) {
        Ok(Some((_, fds))) => fds,
        // Dismissed.
        Ok(None) | Err(_) => std::process::exit(0),
    };
    let _ = nix::unistd::close(socket.as_raw_fd());
    let Ok([request_pipe, stdin, stdout, stderr, status]) = <[OwnedFd; LAUNCH_FDS]>::try_from(fds) else {
        std::process::exit(127)
    };
    let stdio = [stdin, stdout, stderr];
    for (fd, target) in stdio.iter().zip(0..) {
        if let Err(e) = nix::unistd::dup2(fd.as_raw_fd(), target) {
            fail(&format!("cannot set up the command's stdio: {e}"));
        }
    }
    drop(stdio);
    if let Err(e) = prepared {
        fail(&e);
    }
    let mut raw = Vec::new();
    if let Err(e) = fs::File::from(request_pipe).read_to_end(&mut raw) {
        fail(&format!("cannot read the request: {e}"));
    }
    let request: ExecRequest = match serde_json::from_slice(&raw) {
        Ok(r) => r,
        Err(e) => fail(&format!("bad request: {e}")),
    };
    if let Some(root) = &request.root {
        if let Err(e) = enter_root(root, &request.binds) {
            fail(&format!("cannot enter the container root {root}: {e}"));
        }
    }
    spawn_command(&request, hardening, &status)
}

/// The guest's files a container shares with the VM (a pod shares its network and name).
const SHARED_FILES: [&str; 3] = ["/etc/hosts", "/etc/hostname", "/etc/resolv.conf"];

/// Makes `root` (a directory of the guest: a container's root file system) this mount
/// namespace's root: the namespace's own `/proc` (with its protections), `/sys` and `/dev`
/// bound recursively into it (their read-only and masked submounts come along), the guest's
/// [`SHARED_FILES`] over the container's, its `binds` (volumes), then `pivot_root` with the
/// old root detached.
fn enter_root(root: &str, binds: &[Bind]) -> Result<(), String> {
    let root = Path::new(root);
    if !fs::symlink_metadata(root).map_err(|e| e.to_string())?.is_dir() {
        return Err("not a directory".into());
    }
    let bind = |from: &Path, to: &Path, flags: MsFlags| {
        mount(Some(from), to, None::<&str>, MsFlags::MS_BIND | flags, None::<&str>)
            .map_err(|e| format!("cannot bind {} on {}: {e}", from.display(), to.display()))
    };
    bind(root, root, MsFlags::MS_REC)?;
    for dir in ["proc", "sys", "dev"] {
        let target = root.join(dir);
        // The image's own entry must be a directory (not a link out of its root).
        if !fs::symlink_metadata(&target).is_ok_and(|m| m.is_dir()) {
            let _ = fs::remove_file(&target);
            fs::create_dir_all(&target).map_err(|e| format!("cannot create {}: {e}", target.display()))?;
        }
        bind(&Path::new("/").join(dir), &target, MsFlags::MS_REC)?;
    }
    for file in SHARED_FILES {
        let target = root.join(&file[1..]);
        let is_file = fs::symlink_metadata(&target).is_ok_and(|m| m.is_file());
        if !is_file {
            // Missing, or a link the container's own root would resolve: the VM's file instead.
            let _ = fs::remove_file(&target);
            if let Some(parent) = target.parent() {
                let _ = fs::create_dir_all(parent);
            }
            fs::write(&target, b"").map_err(|e| format!("cannot create {}: {e}", target.display()))?;
        }
        bind(Path::new(file), &target, MsFlags::empty())?;
    }
    for volume in binds {
        bind_in_root(root, volume).map_err(|e| format!("volume {} at {}: {e}", volume.source, volume.target))?;
    }
    nix::unistd::chdir(root).map_err(|e| format!("chdir: {e}"))?;
    nix::unistd::pivot_root(".", ".").map_err(|e| format!("pivot_root: {e}"))?;
    nix::mount::umount2(".", nix::mount::MntFlags::MNT_DETACH).map_err(|e| format!("detaching the old root: {e}"))?;
    nix::unistd::chdir("/").map_err(|e| format!("chdir: {e}"))
}

/// Binds `volume.source` at `volume.target` inside `root`, creating what is missing of the
/// target (directories; an empty file for a file). Every component is resolved inside the
/// root (`RESOLVE_IN_ROOT`), as the container will see it: a link in the image
/// (`/var/run -> /run`) leads where it leads in the container, never out of its root.
fn bind_in_root(root: &Path, volume: &Bind) -> Result<(), String> {
    use nix::fcntl::{openat, openat2, OFlag, OpenHow, ResolveFlag};
    use nix::sys::stat::{mkdirat, Mode};
    let source_is_dir = fs::metadata(&volume.source).map_err(|e| format!("source: {e}"))?.is_dir();
    let root_dir = fs::File::open(root).map_err(|e| format!("root: {e}"))?;
    let in_root = |path: &str, flags: OFlag| -> nix::Result<OwnedFd> {
        let how = OpenHow::new()
            .flags(flags | OFlag::O_PATH | OFlag::O_CLOEXEC)
            .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
        let fd = openat2(root_dir.as_raw_fd(), path, how)?;
        // SAFETY: openat2 just returned this descriptor; nothing else owns it.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    };
    let parts: Vec<&str> = volume.target.split('/').filter(|p| !p.is_empty()).collect();
    for depth in 1..=parts.len() {
        let path = parts[..depth].join("/");
        match in_root(&path, OFlag::empty()) {
            Ok(_) => continue,
            Err(Errno::ENOENT) => {}
            Err(e) => return Err(format!("{path}: {e}")),
        }
        let parent = if depth == 1 { ".".to_owned() } else { parts[..depth - 1].join("/") };
        let parent = in_root(&parent, OFlag::O_DIRECTORY).map_err(|e| format!("{parent}: {e}"))?;
        let name = parts[depth - 1];
        let made = if depth == parts.len() && !source_is_dir {
            let flags = OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_WRONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
            openat(Some(parent.as_raw_fd()), name, flags, Mode::from_bits_truncate(0o644)).and_then(nix::unistd::close)
        } else {
            mkdirat(Some(parent.as_raw_fd()), name, Mode::from_bits_truncate(0o755))
        };
        match made {
            Ok(()) | Err(Errno::EEXIST) => {}
            Err(e) => return Err(format!("cannot create {path}: {e}")),
        }
    }
    let rel = parts.join("/");
    let on = |fd: &OwnedFd| format!("/proc/self/fd/{}", fd.as_raw_fd());
    let target = in_root(&rel, OFlag::empty()).map_err(|e| format!("{rel}: {e}"))?;
    mount(
        Some(volume.source.as_str()),
        on(&target).as_str(),
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(|e| format!("bind: {e}"))?;
    if volume.read_only {
        // The new mount is what the path leads to now.
        let mounted = in_root(&rel, OFlag::empty()).map_err(|e| format!("{rel}: {e}"))?;
        let flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
        mount(None::<&str>, on(&mounted).as_str(), None::<&str>, flags, None::<&str>)
            .map_err(|e| format!("read-only: {e}"))?;
    }
    Ok(())
}

/// What a namespace needs before any command: its own session, private mounts, and a
/// `/proc` of its PIDs.
fn prepare_namespace() -> Result<(), String> {
    nix::unistd::setsid().map_err(|e| format!("setsid: {e}"))?;
    mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REC | MsFlags::MS_PRIVATE, None::<&str>)
        .map_err(|e| format!("cannot make mounts private: {e}"))?;
    let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount(Some("proc"), "/proc", Some("proc"), flags, None::<&str>).map_err(|e| format!("cannot mount /proc: {e}"))
}

/// Files under `/proc` that only serve to change the kernel: read-only for commands, as a
/// default container runtime makes them (`core_pattern` under `/proc/sys` would let a
/// command have the kernel run a program of its choice with every capability).
const READ_ONLY_PROC: [&str; 5] = ["/proc/sys", "/proc/sysrq-trigger", "/proc/irq", "/proc/bus", "/proc/fs"];
/// Files under `/proc` and `/sys` that tell about the kernel or other processes' keys and
/// timers: replaced by an empty file or directory, as a default container runtime does.
const MASKED: [&str; 12] = [
    "/proc/kcore",
    "/proc/keys",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/latency_stats",
    "/proc/interrupts",
    "/proc/acpi",
    "/proc/asound",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];

/// Puts the kernel's knobs out of a command's reach in its mount namespace: [`READ_ONLY_PROC`]
/// and every mount under `/sys` read-only, [`MASKED`] hidden. The command cannot undo it:
/// it has no `CAP_SYS_ADMIN` and no mount calls ([`sys::harden`]).
fn protect_kernel_files() -> Result<(), String> {
    let keep = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    let read_only = |path: &str, bind_first: bool| -> Result<(), String> {
        if bind_first {
            mount(Some(path), path, None::<&str>, MsFlags::MS_BIND | MsFlags::MS_REC, None::<&str>)
                .map_err(|e| format!("cannot bind {path}: {e}"))?;
        }
        let flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | keep;
        mount(None::<&str>, path, None::<&str>, flags, None::<&str>)
            .map_err(|e| format!("cannot make {path} read-only: {e}"))
    };
    for path in READ_ONLY_PROC {
        match fs::symlink_metadata(path) {
            Ok(_) => read_only(path, true)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("cannot inspect {path}: {e}")),
        }
    }
    let mounts = fs::read_to_string("/proc/self/mountinfo").map_err(|e| format!("cannot read mountinfo: {e}"))?;
    for point in mount_points(&mounts).filter(|p| *p == "/sys" || p.starts_with("/sys/")) {
        read_only(point, false)?;
    }
    for path in MASKED {
        let masked = match fs::symlink_metadata(path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(format!("cannot inspect {path}: {e}")),
            Ok(meta) if meta.is_dir() => {
                mount(Some("tmpfs"), path, Some("tmpfs"), MsFlags::MS_RDONLY | keep, Some("size=0,mode=0555"))
            }
            Ok(_) => mount(Some("/dev/null"), path, None::<&str>, MsFlags::MS_BIND, None::<&str>),
        };
        masked.map_err(|e| format!("cannot mask {path}: {e}"))?;
    }
    Ok(())
}

/// The mount points of a `/proc/self/mountinfo` text, in mount order (field 5; the kernel
/// escapes spaces in it, which none of ours have).
fn mount_points(mountinfo: &str) -> impl Iterator<Item = &str> {
    mountinfo.lines().filter_map(|line| line.split(' ').nth(4))
}

/// Becomes the command.
fn exec_command(request: &ExecRequest, tty: bool, hardening: &Hardening) -> ! {
    // The Rust runtime ignores SIGPIPE; an ignored signal stays ignored across exec, and
    // commands expect the default (`yes | head` ends by SIGPIPE).
    // SAFETY: restoring the default disposition installs no handler.
    if let Err(e) = unsafe { nix::sys::signal::signal(Signal::SIGPIPE, SigHandler::SigDfl) } {
        fail(&format!("cannot restore SIGPIPE: {e}"));
    }
    if let Err(e) = nix::unistd::setsid() {
        fail(&format!("setsid: {e}"));
    }
    if tty {
        if let Err(e) = sys::set_controlling_terminal() {
            fail(&format!("cannot acquire the terminal: {e}"));
        }
    }
    // Before the hardening: raising a hard limit takes CAP_SYS_RESOURCE, which it drops.
    for limit in &request.rlimits {
        if let Err(e) = nix::sys::resource::setrlimit(rlimit_resource(limit.resource), limit.soft, limit.hard) {
            fail(&format!("cannot set {:?} to {}/{}: {e}", limit.resource, limit.soft, limit.hard));
        }
    }
    let hardened = match hardening {
        Hardening::None => Ok(()),
        Hardening::Restrict(seccomp) => sys::harden(seccomp).map_err(|e| e.to_string()),
        Hardening::Failed(e) => Err(e.clone()),
    };
    if let Err(e) = hardened {
        fail(&format!("cannot restrict the command: {e}"));
    }
    let mut env: Vec<(String, String)> = Vec::new();
    let mut set_env = |k: &str, v: &str| {
        env.retain(|(key, _)| key != k);
        env.push((k.to_owned(), v.to_owned()));
    };
    set_env("PATH", DEFAULT_PATH);
    if let Ok(h) = fs::read_to_string("/etc/hostname") {
        set_env("HOSTNAME", h.trim());
    }
    if tty {
        set_env("TERM", "xterm");
    }
    let user = request.user.as_deref().unwrap_or("0");
    let passwd = fs::read_to_string("/etc/passwd").unwrap_or_default();
    let group = fs::read_to_string("/etc/group").unwrap_or_default();
    let id = users::resolve(user, &passwd, &group).unwrap_or_else(|e| fail(&e.to_string()));
    set_env("HOME", &id.home);
    for (k, v) in &request.env {
        set_env(k, v);
    }
    let gids: Vec<Gid> = id.groups.iter().map(|g| Gid::from_raw(*g)).collect();
    if let Err(e) = nix::unistd::setgroups(&gids) {
        fail(&format!("setgroups: {e}"));
    }
    if let Err(e) = nix::unistd::setgid(Gid::from_raw(id.gid)) {
        fail(&format!("setgid {}: {e}", id.gid));
    }
    if let Err(e) = nix::unistd::setuid(Uid::from_raw(id.uid)) {
        fail(&format!("setuid {}: {e}", id.uid));
    }
    let dir = request.working_dir.as_deref().unwrap_or("/");
    if let Err(e) = nix::unistd::chdir(dir) {
        fail(&format!("cannot change to working directory {dir}: {e}"));
    }
    let cstr = |s: &str| CString::new(s).unwrap_or_else(|_| fail("argument contains a NUL byte"));
    let argv: Vec<CString> = request.argv.iter().map(|a| cstr(a)).collect();
    let envp: Vec<CString> = env.iter().map(|(k, v)| cstr(&format!("{k}={v}"))).collect();
    let path = env.iter().rev().find(|(k, _)| k == "PATH").map_or(DEFAULT_PATH, |(_, v)| v.as_str());
    let program = resolve_program(&request.argv[0], path);
    let err = nix::unistd::execve(&cstr(&program), &argv, &envp).unwrap_err();
    let code = if err == Errno::EACCES { 126 } else { 127 };
    eprintln!("matchlock: cannot execute {}: {}", request.argv[0], err.desc());
    // SAFETY: as in `fail`.
    unsafe { libc::_exit(code) }
}

/// The `setrlimit` resource of a request's limit.
fn rlimit_resource(resource: RlimitResource) -> Resource {
    match resource {
        RlimitResource::RlimitAs => Resource::RLIMIT_AS,
        RlimitResource::RlimitCore => Resource::RLIMIT_CORE,
        RlimitResource::RlimitCpu => Resource::RLIMIT_CPU,
        RlimitResource::RlimitData => Resource::RLIMIT_DATA,
        RlimitResource::RlimitFsize => Resource::RLIMIT_FSIZE,
        RlimitResource::RlimitLocks => Resource::RLIMIT_LOCKS,
        RlimitResource::RlimitMemlock => Resource::RLIMIT_MEMLOCK,
        RlimitResource::RlimitMsgqueue => Resource::RLIMIT_MSGQUEUE,
        RlimitResource::RlimitNice => Resource::RLIMIT_NICE,
        RlimitResource::RlimitNofile => Resource::RLIMIT_NOFILE,
        RlimitResource::RlimitNproc => Resource::RLIMIT_NPROC,
        RlimitResource::RlimitRss => Resource::RLIMIT_RSS,
        RlimitResource::RlimitRtprio => Resource::RLIMIT_RTPRIO,
        RlimitResource::RlimitRttime => Resource::RLIMIT_RTTIME,
        RlimitResource::RlimitSigpending => Resource::RLIMIT_SIGPENDING,
        RlimitResource::RlimitStack => Resource::RLIMIT_STACK,
    }
}

/// Finds `name` in `path` like execvp, but against the command's own PATH.
fn resolve_program(name: &str, path: &str) -> String {
    if name.contains('/') {
        return name.to_owned();
    }
    for dir in path.split(':').filter(|d| !d.is_empty()) {
        let candidate = format!("{dir}/{name}");
        if let Ok(meta) = fs::metadata(&candidate) {
            if meta.is_file() {
                return candidate;
            }
        }
    }
    fail(&format!("{name}: command not found"))
}
