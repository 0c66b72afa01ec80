//! The exec agent: serves the exec port, one command per connection.
//!
//! For each connection the agent reads one request, has the launcher server start the
//! command in new PID and mount namespaces ([`crate::launcher`]), pumps stdio between the
//! connection and the command, and reports the exit code. A closed connection cancels the command:
//! SIGTERM to its process group, SIGKILL 5 s later.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use matchlock_protocol::exec::{ExecMode, ExecRequest, GuestMessage, HostMessage};
use matchlock_protocol::frame::{read_frame, write_frame, FrameType};
use matchlock_protocol::{
    ECHO_PORT, EXEC_PORT, FORWARD_MAX_CHUNK, FORWARD_OK, FORWARD_PORT, FORWARD_REFUSED, READY_ENTROPY, READY_PORT,
};
use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::waitpid;
use nix::unistd::Pid;

use crate::launcher::{self, LaunchError, Launcher};
use crate::mux::{self, Listener, Stream};
use crate::{init, sys, workers};

/// Grace period between SIGTERM and SIGKILL when a command is cancelled.
const KILL_GRACE: Duration = Duration::from_secs(5);
/// Size of the output chunks sent to the host.
const CHUNK: usize = 32 * 1024;

/// The launcher server, started once and again if it dies.
static LAUNCHER: Mutex<Option<Launcher>> = Mutex::new(None);

/// Errors that stop the agent.
#[derive(Debug, thiserror::Error)]
pub(crate) enum AgentError {
    /// The exec port could not be bound.
    #[error("cannot listen on port {EXEC_PORT}")]
    Listen(#[source] io::Error),
}

/// Listens on the exec port, tells the host it is ready, and serves forever. `disks`
/// are the mount points of the extra disks, remounted read-only on quiesce.
pub(crate) fn serve(disks: Vec<String>) -> Result<(), AgentError> {
    let disks: Arc<[String]> = disks.into();
    let listener = mux::listen(EXEC_PORT).map_err(AgentError::Listen)?;
    match mux::listen(ECHO_PORT) {
        Ok(echo) => {
            thread::spawn(move || serve_echo(&echo));
        }
        Err(e) => eprintln!("guest-agent: echo port: {e}"),
    }
    match mux::listen(FORWARD_PORT) {
        Ok(forward) => {
            thread::spawn(move || serve_forwards(&forward));
        }
        Err(e) => eprintln!("guest-agent: forward port: {e}"),
    }
    signal_ready();
    // Started now rather than by the first command, which would wait for it.
    thread::spawn(|| {
        if let Err(e) = started(&mut lock_launcher()) {
            eprintln!("guest-agent: {}", sys::error_chain(&e));
        }
    });
    while let Some(stream) = listener.accept() {
        let disks = Arc::clone(&disks);
        workers::spawn(move || {
            if let Err(e) = handle(stream, &disks) {
                eprintln!("guest-agent: connection: {}", sys::error_chain(&e));
            }
        });
    }
    Ok(())
}

/// Echoes bytes back on each connection (the latency floor for benchmarks).
fn serve_echo(listener: &Listener) {
    while let Some(conn) = listener.accept() {
        workers::spawn(move || {
            let mut conn = conn;
            let mut buf = [0u8; 4096];
            while let Ok(n) = conn.read(&mut buf) {
                if n == 0 || conn.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        });
    }
}

/// Port forwards from the host: each connection names a guest TCP port on loopback.
fn serve_forwards(listener: &Listener) {
    while let Some(conn) = listener.accept() {
        workers::spawn(move || {
            let mut host = conn;
            let mut port = [0u8; 2];
            if host.read_exact(&mut port).is_err() {
                return;
            }
            let Ok(guest) = std::net::TcpStream::connect(("127.0.0.1", u16::from_be_bytes(port))) else {
                let _ = host.write_all(&[FORWARD_REFUSED]);
                return;
            };
            if host.write_all(&[FORWARD_OK]).is_err() {
                return;
            }
            let _ = guest.set_nodelay(true);
            relay_both_ways(host, guest);
        });
    }
}

/// Relays a forward: host chunks to the guest socket (an empty chunk is the host's
/// half-close), guest bytes to host chunks (its EOF becomes an empty chunk).
fn relay_both_ways(host: Stream, guest: std::net::TcpStream) {
    let (Ok(mut host_reader), Ok(mut guest_writer)) = (host.try_clone(), guest.try_clone()) else { return };
    let upstream = thread::spawn(move || {
        let mut len = [0u8; 4];
        let mut chunk = vec![0u8; FORWARD_MAX_CHUNK];
        while host_reader.read_exact(&mut len).is_ok() {
            let n = u32::from_be_bytes(len) as usize;
            if n == 0 || n > FORWARD_MAX_CHUNK {
                break;
            }
            if host_reader.read_exact(&mut chunk[..n]).is_err() || guest_writer.write_all(&chunk[..n]).is_err() {
                break;
            }
        }
        let _ = guest_writer.shutdown(std::net::Shutdown::Write);
    });
    let (mut guest_reader, mut host_writer) = (guest, host);
    let mut buf = vec![0u8; FORWARD_MAX_CHUNK];
    loop {
        let n = guest_reader.read(&mut buf).unwrap_or(0);
        let header = u32::try_from(n).unwrap_or(0).to_be_bytes();
        if host_writer.write_all(&header).is_err() || n == 0 || host_writer.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = upstream.join();
}

/// Connects to the host's ready port (the connection itself is the signal) and seeds the
/// kernel's RNG with the entropy the host answers. Without it a cold-booted guest waits
/// for jitter entropy, and its first blocking `getrandom` (every Python start) waited
/// ~1.3 s under TCG.
fn signal_ready() {
    for _ in 0..50 {
        match mux::connect(READY_PORT) {
            Ok(mut ready) => {
                let mut entropy = [0u8; READY_ENTROPY];
                let seeded = ready.read_exact(&mut entropy).and_then(|()| init::reseed(&entropy));
                if let Err(e) = seeded {
                    eprintln!("guest-agent: no entropy from the host: {e}");
                }
                return;
            }
            Err(_) => thread::sleep(Duration::from_millis(20)),
        }
    }
    eprintln!("guest-agent: the host did not accept the ready signal");
}

/// Errors serving one connection; they end that connection only.
#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("connection I/O")]
    Io(#[from] io::Error),
    #[error("bad frame")]
    Frame(#[from] matchlock_protocol::frame::FrameError),
}

/// Serialises frames from several pump threads onto the connection.
#[derive(Clone)]
struct Sender(Arc<Mutex<Stream>>);

impl Sender {
    fn send(&self, msg: &GuestMessage) -> Result<(), ConnError> {
        let (kind, payload) = msg.to_frame();
        let mut stream = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        write_frame(&mut *stream, kind, &payload)?;
        Ok(())
    }
}

fn handle(mut stream: Stream, disks: &[String]) -> Result<(), ConnError> {
    let Some(frame) = read_frame(&mut stream)? else { return Ok(()) };
    let sender = Sender(Arc::new(Mutex::new(stream.try_clone()?)));
    match frame.kind {
        FrameType::Quiesce => return quiesce(&sender, disks),
        FrameType::Restored => {
            let outcome = serde_json::from_slice(&frame.payload)
                .map_err(|e| format!("invalid restore message: {e}"))
                .and_then(|r| init::apply_restored(&r));
            renew_spare();
            if let Err(e) = &outcome {
                sender.send(&GuestMessage::Stderr(format!("matchlock: {e}\n").into_bytes()))?;
            }
            return sender.send(&GuestMessage::Exit(i32::from(outcome.is_err())));
        }
        FrameType::Commit => {
            let written = crate::commit::write_layer(&mut |message| {
                sender.send(&message).map_err(|e| io::Error::other(e.to_string()))
            });
            if let Err(e) = &written {
                sender.send(&GuestMessage::Stderr(format!("matchlock: commit: {e}\n").into_bytes()))?;
            }
            return sender.send(&GuestMessage::Exit(i32::from(written.is_err())));
        }
        FrameType::ApplyLayer => {
            let applied = crate::commit::apply_layer(&mut StdinFrames { stream: &mut stream, buf: Vec::new(), at: 0 });
            if let Err(e) = &applied {
                sender.send(&GuestMessage::Stderr(format!("matchlock: applying a layer: {e}\n").into_bytes()))?;
            }
            return sender.send(&GuestMessage::Exit(i32::from(applied.is_err())));
        }
        FrameType::WriteFile | FrameType::ReadFile | FrameType::ListFiles => {
            return Ok(crate::files::serve(&mut stream, &frame)?);
        }
        _ => {}
    }
    let (mode, request) = match ExecRequest::from_frame(&frame) {
        Ok(r) => r,
        Err(e) => {
            sender.send(&GuestMessage::Stderr(format!("matchlock: {}\n", sys::error_chain(&e)).into_bytes()))?;
            sender.send(&GuestMessage::Exit(127))?;
            return Ok(());
        }
    };
    let running = match start(mode, &request) {
        Ok(r) => r,
        Err(e) => {
            sender.send(&GuestMessage::Stderr(format!("matchlock: cannot start command: {e}\n").into_bytes()))?;
            sender.send(&GuestMessage::Exit(127))?;
            return Ok(());
        }
    };
    run(stream, &sender, running)
}

/// The bytes of `Stdin` frames until an empty one.
struct StdinFrames<'a> {
    stream: &'a mut Stream,
    buf: Vec<u8>,
    at: usize,
}

impl Read for StdinFrames<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.at == self.buf.len() {
            let frame = read_frame(&mut *self.stream)
                .map_err(|e| io::Error::other(e.to_string()))?
                .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
            if frame.kind != FrameType::Stdin {
                return Err(io::Error::other(format!("expected layer bytes, got a {:?} frame", frame.kind)));
            }
            if frame.payload.is_empty() {
                return Ok(0);
            }
            self.buf = frame.payload;
            self.at = 0;
        }
        let n = out.len().min(self.buf.len() - self.at);
        out[..n].copy_from_slice(&self.buf[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

/// Syncs and remounts the extra disks read-only: their journals are checkpointed and
/// the file systems are clean when the VM stops. Answers with `Exit(0)` or the failures.
fn quiesce(sender: &Sender, disks: &[String]) -> Result<(), ConnError> {
    nix::unistd::sync();
    let mut failed = 0;
    for path in disks {
        let flags = nix::mount::MsFlags::MS_REMOUNT | nix::mount::MsFlags::MS_RDONLY;
        if let Err(e) = nix::mount::mount(None::<&str>, path.as_str(), None::<&str>, flags, None::<&str>) {
            failed += 1;
            sender.send(&GuestMessage::Stderr(
                format!("matchlock: cannot remount {path} read-only: {e}\n").into_bytes(),
            ))?;
        }
    }
    sender.send(&GuestMessage::Exit(failed))
}

/// A launched command and the host ends of its stdio.
struct Running {
    /// Its namespace's init, our child.
    pid: Pid,
    stdin: Option<File>,
    stdout: File,
    stderr: Option<File>,
    /// The PTY master in TTY mode (also `stdin`/`stdout`).
    pty: Option<OwnedFd>,
    /// Where the namespace init reports the exit code.
    status: File,
}

fn pipe() -> io::Result<(File, OwnedFd)> {
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    Ok((File::from(r), w))
}

/// Starts a command through the launcher server (a new one if it died). The fds are the
/// request's pipe, the command's stdin, stdout and stderr, and its status pipe.
fn launch(fds: [std::os::fd::BorrowedFd<'_>; launcher::LAUNCH_FDS]) -> Result<Pid, LaunchError> {
    let mut launcher = lock_launcher();
    let mut retried = false;
    loop {
        match started(&mut launcher)?.launch(fds) {
            Err(LaunchError::Gone(e)) if !retried => {
                eprintln!("guest-agent: restarting the launcher: {e}");
                *launcher = None;
                retried = true;
            }
            other => return other,
        }
    }
}

fn lock_launcher() -> std::sync::MutexGuard<'static, Option<Launcher>> {
    crate::relock(&LAUNCHER)
}

/// The launcher server, started if there is none.
fn started(launcher: &mut Option<Launcher>) -> Result<&mut Launcher, LaunchError> {
    match launcher {
        Some(l) => Ok(l),
        None => Ok(launcher.insert(Launcher::start()?)),
    }
}

/// After the guest's mounts changed: commands must see the new ones.
fn renew_spare() {
    with_launcher(Launcher::renew_spare);
}

/// After a command: the next one's namespace init is made ready now.
fn replenish_spare() {
    with_launcher(Launcher::replenish);
}

fn with_launcher(request: fn(&mut Launcher) -> Result<(), LaunchError>) {
    let mut launcher = lock_launcher();
    if let Some(l) = launcher.as_mut() {
        if let Err(e) = request(l) {
            eprintln!("guest-agent: {}; restarting the launcher", sys::error_chain(&e));
            *launcher = None;
        }
    }
}

fn start(mode: ExecMode, request: &ExecRequest) -> io::Result<Running> {
    let (request_r, request_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    // The command's ends of its stdio: ours are closed once it has them.
    let (child_stdio, stdin, stdout, stderr, pty): ([OwnedFd; 3], _, _, _, _) = match mode {
        ExecMode::Tty => {
            let ws = request.window.unwrap_or(matchlock_protocol::exec::WindowSize { rows: 24, cols: 80 });
            let pty = nix::pty::openpty(None, None)?;
            sys::set_window_size(pty.master.as_fd(), ws)?;
            for fd in [&pty.master, &pty.slave] {
                nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC))?;
            }
            let slave = pty.slave;
            let master = pty.master;
            let reader = File::from(master.try_clone()?);
            let writer = File::from(master.try_clone()?);
            ([slave.try_clone()?, slave.try_clone()?, slave], Some(writer), reader, None, Some(master))
        }
        ExecMode::Stream | ExecMode::Pipe => {
            let (out_r, out_w) = pipe()?;
            let (err_r, err_w) = pipe()?;
            let (child_in, stdin) = if mode == ExecMode::Pipe {
                let (in_r, in_w) = pipe()?;
                (OwnedFd::from(in_r), Some(File::from(in_w)))
            } else {
                (OwnedFd::from(File::open("/dev/null")?), None)
            };
            ([child_in, out_w, err_w], stdin, out_r, Some(err_r), None)
        }
    };
    let (status, status_w) = pipe()?;
    let [child_in, child_out, child_err] = &child_stdio;
    let fds = [request_r.as_fd(), child_in.as_fd(), child_out.as_fd(), child_err.as_fd(), status_w.as_fd()];
    let pid = launch(fds).map_err(|e| io::Error::other(sys::error_chain(&e)))?;
    drop((child_stdio, request_r, status_w));
    let mut request_w = File::from(request_w);
    request_w.write_all(&serde_json::to_vec(request).map_err(io::Error::other)?)?;
    drop(request_w);
    Ok(Running { pid, stdin, stdout, stderr, pty, status })
}

/// Sends the command's output to the host until both streams end, i.e. until every
/// process of the command is gone (its namespace init kills what is left when the
/// command ends). Without a host (the connection is gone) the output is read and
/// dropped: a command that outlives its exec never blocks on it.
fn pump_output(stdout: File, stderr: Option<File>, sender: &Sender) {
    type Wrap = fn(Vec<u8>) -> GuestMessage;
    let mut sources: Vec<(File, Wrap)> = vec![(stdout, GuestMessage::Stdout)];
    sources.extend(stderr.map(|e| (e, GuestMessage::Stderr as Wrap)));
    let mut buf = vec![0u8; CHUNK];
    let mut connected = true;
    while !sources.is_empty() {
        let mut polled: Vec<PollFd<'_>> =
            sources.iter().map(|(f, _)| PollFd::new(f.as_fd(), PollFlags::POLLIN)).collect();
        match poll(&mut polled, PollTimeout::NONE) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => {
                eprintln!("guest-agent: polling the command's output: {e}");
                return;
            }
        }
        let ready: Vec<bool> = polled.iter().map(|p| p.revents().is_some_and(|r| !r.is_empty())).collect();
        drop(polled);
        let mut ended = Vec::new();
        for (i, (source, wrap)) in sources.iter_mut().enumerate().filter(|(i, _)| ready[*i]) {
            match source.read(&mut buf) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // EIO: the PTY's last slave descriptor closed.
                Ok(0) | Err(_) => ended.push(i),
                Ok(n) => {
                    if connected && sender.send(&wrap(buf[..n].to_vec())).is_err() {
                        connected = false;
                    }
                }
            }
        }
        for i in ended.into_iter().rev() {
            sources.remove(i);
        }
    }
}

/// Waits for a namespace init to end; its exit code.
fn reap(pid: Pid) -> io::Result<i32> {
    loop {
        match waitpid(pid, None) {
            Err(Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
            Ok(status) => {
                if let Some(code) = launcher::exit_code(status) {
                    return Ok(code);
                }
            }
        }
    }
}

fn run(mut stream: Stream, sender: &Sender, running: Running) -> Result<(), ConnError> {
    let Running { pid, stdin, stdout, stderr, pty, mut status } = running;
    let finished = Arc::new(AtomicBool::new(false));
    let session = mux::session();

    // Host messages; EOF or garbage on the connection cancels the command.
    let finished_r = Arc::clone(&finished);
    workers::spawn(move || {
        let mut stdin = stdin;
        loop {
            let msg = match read_frame(&mut stream) {
                Ok(Some(frame)) => HostMessage::from_frame(frame),
                Ok(None) => break,
                Err(e) => Err(e),
            };
            match msg {
                Ok(HostMessage::Stdin(data)) => {
                    if let Some(w) = stdin.as_mut() {
                        if w.write_all(&data).is_err() {
                            stdin = None;
                        }
                    }
                }
                Ok(HostMessage::StdinEof) => {
                    // In TTY mode EOF is the terminal's business (^D); keep the master open.
                    if pty.is_none() {
                        stdin = None;
                    }
                }
                Ok(HostMessage::Resize(ws)) => {
                    if let Some(master) = &pty {
                        let _ = sys::set_window_size(master.as_fd(), ws);
                    }
                }
                Ok(HostMessage::Signal(sig)) => {
                    if let Ok(sig) = Signal::try_from(i32::from(sig)) {
                        let _ = kill(pid, sig);
                    }
                }
                Err(e) => {
                    eprintln!("guest-agent: dropping connection: {}", sys::error_chain(&e));
                    break;
                }
            }
        }
        drop(stdin);
        // A closed connection cancels the command, unless the VM was restored from a
        // snapshot: then the host that ran it is gone and the command runs on, detached.
        if !finished_r.load(Ordering::SeqCst) && mux::session() == session {
            cancel(pid, &finished_r);
        }
    });

    pump_output(stdout, stderr, sender);
    // The namespace init reports the code once the command's processes are gone; it
    // reports none if it was killed (cancelled, or rebooted by a privileged command).
    let mut bytes = [0u8; 4];
    let reported = status.read_exact(&mut bytes).is_ok().then(|| i32::from_ne_bytes(bytes));
    let code = match reported {
        Some(code) => code,
        None => reap(pid)?,
    };
    finished.store(true, Ordering::SeqCst);
    let answered = sender.send(&GuestMessage::Exit(code));
    {
        let stream = sender.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let _ = stream.shutdown(std::net::Shutdown::Write);
    }
    if reported.is_some() {
        // After the answer: tearing down the namespace is not the host's to wait for.
        reap(pid)?;
    }
    replenish_spare();
    answered
}

/// SIGTERM now, SIGKILL after the grace period unless the command ended.
fn cancel(pid: Pid, finished: &AtomicBool) {
    let _ = kill(pid, Signal::SIGTERM);
    let step = Duration::from_millis(50);
    let mut waited = Duration::ZERO;
    while waited < KILL_GRACE {
        if finished.load(Ordering::SeqCst) {
            return;
        }
        thread::sleep(step);
        waited += step;
    }
    if !finished.load(Ordering::SeqCst) {
        let _ = kill(pid, Signal::SIGKILL);
    }
}
