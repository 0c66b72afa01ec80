//! The launcher: runs one command inside fresh PID and mount namespaces.
//!
//! The agent spawns this binary as `matchlock-launcher` (posix_spawn: nothing runs between
//! fork and exec), with the request on the descriptor named by `MATCHLOCK_REQUEST_FD`. The
//! launcher calls `unshare(NEWPID|NEWNS)` and `setsid()`, then forks the namespace's PID 1
//! (a tiny init that forwards signals and reaps), which forks the command itself. A
//! namespace init only receives signals it handles, so the command must not be PID 1:
//! otherwise SIGTERM would be ignored. Exit codes travel back up unchanged (128+N for
//! a death by signal N).

use std::ffi::CString;
use std::fs;
use std::io::Read;
use std::os::fd::FromRawFd;
use std::process::ExitCode;

use matchlock_protocol::exec::ExecRequest;
use nix::mount::{mount, MsFlags};
use nix::sys::signal::{kill, killpg, SigSet, SigmaskHow, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{fork, ForkResult, Gid, Pid, Uid};

use crate::agent::REQUEST_FD_ENV;
use crate::{sys, users};

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

fn fail(msg: &str) -> ! {
    eprintln!("matchlock: {msg}");
    std::process::exit(127)
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
fn exit_code(status: WaitStatus) -> Option<i32> {
    match status {
        WaitStatus::Exited(_, code) => Some(code),
        WaitStatus::Signaled(_, sig, _) => Some(128 + sig as i32),
        _ => None,
    }
}

/// Where a supervisor delivers the signals it receives.
#[derive(Clone, Copy)]
enum Forward {
    /// To the child process only (the namespace init, which handles them).
    Process,
    /// To the child's process group (the command and everything it started).
    Group,
}

/// Forks. Returns in the child; the parent never returns: it forwards signals to the
/// child and exits with the child's exit code.
fn fork_supervised(forward: Forward) {
    let set = forwarded_and_child();
    if let Err(e) = set.thread_block() {
        fail(&format!("cannot block signals: {e}"));
    }
    // SAFETY: the launcher is single-threaded, so the child may run arbitrary code.
    match unsafe { fork() } {
        Ok(ForkResult::Child) => {
            let _ = nix::sys::signal::sigprocmask(SigmaskHow::SIG_UNBLOCK, Some(&set), None);
        }
        Ok(ForkResult::Parent { child }) => supervise(child, forward, &set),
        Err(e) => fail(&format!("fork failed: {e}")),
    }
}

fn supervise(child: Pid, forward: Forward, set: &SigSet) -> ! {
    loop {
        let Ok(sig) = set.wait() else { continue };
        if sig != Signal::SIGCHLD {
            let _ = match forward {
                Forward::Process => kill(child, sig),
                Forward::Group => killpg(child, sig),
            };
            continue;
        }
        // Reap everything (a namespace init adopts orphans); exit with the child's code.
        loop {
            match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                Ok(status) if status.pid() == Some(child) => {
                    if let Some(code) = exit_code(status) {
                        std::process::exit(code);
                    }
                }
                Ok(_) => {}
            }
        }
    }
}

/// Entry point of the `matchlock-launcher` role.
pub(crate) fn main() -> ExitCode {
    let fd = std::env::var(REQUEST_FD_ENV).ok().and_then(|v| v.parse::<i32>().ok());
    let Some(fd) = fd.filter(|fd| *fd > 2) else { fail("no request descriptor") };
    // SAFETY: the agent hands us this descriptor holding the request; nothing else owns it.
    let mut request_pipe = unsafe { fs::File::from_raw_fd(fd) };
    let mut raw = Vec::new();
    if let Err(e) = request_pipe.read_to_end(&mut raw) {
        fail(&format!("cannot read the request: {e}"));
    }
    drop(request_pipe);
    let request: ExecRequest = match serde_json::from_slice(&raw) {
        Ok(r) => r,
        Err(e) => fail(&format!("bad request: {e}")),
    };
    // Our own namespaces and session: the children get a new PID namespace (our first
    // child is its PID 1), we and they a private mount namespace.
    if let Err(e) = nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWPID | nix::sched::CloneFlags::CLONE_NEWNS) {
        fail(&format!("cannot make the command's namespaces: {e}"));
    }
    if let Err(e) = nix::unistd::setsid() {
        fail(&format!("setsid: {e}"));
    }
    fork_supervised(Forward::Process);
    prepare_namespace();
    fork_supervised(Forward::Group);
    exec_command(&request, request.window.is_some())
}

/// Runs as PID 1 of the command's namespace.
fn prepare_namespace() {
    // Die with the launcher: when PID 1 of a namespace exits, the kernel kills the rest.
    let _ = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL);
    if let Err(e) = mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REC | MsFlags::MS_PRIVATE, None::<&str>) {
        fail(&format!("cannot make mounts private: {e}"));
    }
    let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    if let Err(e) = mount(Some("proc"), "/proc", Some("proc"), flags, None::<&str>) {
        fail(&format!("cannot mount /proc: {e}"));
    }
}

/// Stage 3: become the command.
fn exec_command(request: &ExecRequest, tty: bool) -> ! {
    if let Err(e) = nix::unistd::setsid() {
        fail(&format!("setsid: {e}"));
    }
    if tty {
        if let Err(e) = sys::set_controlling_terminal() {
            fail(&format!("cannot acquire the terminal: {e}"));
        }
    }
    let cmdline = fs::read_to_string("/proc/cmdline").unwrap_or_default();
    if !matchlock_protocol::boot::is_privileged(&cmdline) {
        if let Err(e) = sys::harden() {
            fail(&format!("cannot restrict the command: {e}"));
        }
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
    let code = if err == nix::errno::Errno::EACCES { 126 } else { 127 };
    eprintln!("matchlock: cannot execute {}: {}", request.argv[0], err.desc());
    std::process::exit(code)
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
