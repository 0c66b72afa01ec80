//! Running one command in a sandbox and relaying its stdio.

use std::future::Future;
use std::time::Duration;

use matchlock_protocol::exec::{ExecMode, ExecRequest, GuestMessage, HostMessage, WindowSize};
use matchlock_protocol::frame::tokio_io::{read_frame, write_frame};
use matchlock_protocol::EXEC_PORT;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::mpsc;

use crate::{io_err, Sandbox, SandboxError};

/// How long a command may take to die after SIGTERM before it gets SIGKILL.
const KILL_GRACE: Duration = Duration::from_secs(5);
/// How long to wait for the exit report after SIGKILL.
const KILL_WAIT: Duration = Duration::from_secs(3);

const SIGTERM: u8 = 15;
const SIGKILL: u8 = 9;

/// Out-of-band requests while a command runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// Stop the command: SIGTERM to its process group, SIGKILL after 5 s.
    Terminate,
    /// The terminal changed size.
    Resize(WindowSize),
    /// Deliver this signal (1..=64) to the command's process group, as it is.
    Signal(u8),
}

/// Where a command's stdio goes.
pub struct ExecIo<'a> {
    /// Source of stdin (pipe and TTY modes).
    pub stdin: Option<Box<dyn AsyncRead + Unpin + Send + 'a>>,
    /// Destination of stdout (all terminal output in TTY mode).
    pub stdout: Box<dyn AsyncWrite + Unpin + Send + 'a>,
    /// Destination of stderr.
    pub stderr: Box<dyn AsyncWrite + Unpin + Send + 'a>,
    /// Control requests.
    pub control: mpsc::Receiver<Control>,
}

impl std::fmt::Debug for ExecIo<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExecIo").field("stdin", &self.stdin.is_some()).finish_non_exhaustive()
    }
}

async fn send(w: &mut (impl AsyncWrite + Unpin), msg: &HostMessage) -> Result<(), SandboxError> {
    let (kind, payload) = msg.to_frame();
    write_frame(w, kind, &payload).await?;
    Ok(())
}

impl Sandbox {
    /// Runs `request` and relays its stdio until it exits; returns its exit code.
    /// Several commands may run at once.
    pub async fn exec(&self, mode: ExecMode, request: &ExecRequest, io: ExecIo<'_>) -> Result<i32, SandboxError> {
        let machine = self.machine.as_ref().expect("a live sandbox has a machine");
        self.execs.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // The request goes out with the connection's Open, not after the guest's Accept.
        let stream = machine.connect_sending(EXEC_PORT, request_frame(mode, request)?).await?;
        let stopped = machine.stopped();
        relay_exec(stream, io, async move {
            stopped.await;
            "the VM exited (see its logs/vm.log)".to_owned()
        })
        .await
    }
}

/// Runs `request` in the sandbox whose directory is `vm_dir`, through the exec relay its
/// owner process serves; returns the exit code.
pub async fn exec_via_relay(
    vm_dir: &matchlock_api::paths::VmDir,
    mode: ExecMode,
    request: &ExecRequest,
    io: ExecIo<'_>,
) -> Result<i32, SandboxError> {
    let stream = crate::relay::connect(vm_dir, EXEC_PORT, &request_frame(mode, request)?).await?;
    relay_exec(stream, io, std::future::pending()).await
}

/// The frame that starts a command.
fn request_frame(mode: ExecMode, request: &ExecRequest) -> Result<Vec<u8>, SandboxError> {
    let mut frame = Vec::new();
    matchlock_protocol::frame::write_frame(&mut frame, mode.frame_type(), &request.to_payload())?;
    Ok(frame)
}

/// Relays stdio, control requests and the exit code of the command whose request went
/// with the connection `stream` ([`request_frame`]). `vm_exited` resolves (with a
/// description) if the VM dies meanwhile.
async fn relay_exec(
    stream: UnixStream,
    mut io: ExecIo<'_>,
    vm_exited: impl Future<Output = String>,
) -> Result<i32, SandboxError> {
    let (mut rx, mut tx) = stream.into_split();
    // Frames are read by their own task: a read_frame future cancelled by select!
    // would lose the bytes it had consumed.
    let (frames_tx, mut frames) = mpsc::channel(16);
    let reader = AbortOnDrop(tokio::spawn(async move {
        loop {
            let frame = read_frame(&mut rx).await;
            let done = !matches!(frame, Ok(Some(_)));
            if frames_tx.send(frame).await.is_err() || done {
                break;
            }
        }
    }));
    tokio::pin!(vm_exited);

    let mut stdin = io.stdin.take();
    let mut buf = vec![0u8; 32 * 1024];
    let mut control_open = true;
    // Escalation after Terminate: when to send SIGKILL, then when to give up.
    let mut kill_at: Option<tokio::time::Instant> = None;
    let mut give_up_at: Option<tokio::time::Instant> = None;
    let far = tokio::time::Instant::now() + Duration::from_secs(86400 * 365);
    loop {
        tokio::select! {
            frame = frames.recv() => {
                let frame = frame
                    .transpose()?
                    .flatten()
                    .ok_or_else(|| SandboxError::VmStopped("the guest closed the exec connection".into()))?;
                match GuestMessage::from_frame(frame)? {
                    GuestMessage::Stdout(d) => {
                        io.stdout.write_all(&d).await.map_err(io_err("cannot write stdout"))?;
                        io.stdout.flush().await.map_err(io_err("cannot write stdout"))?;
                    }
                    GuestMessage::Stderr(d) => {
                        io.stderr.write_all(&d).await.map_err(io_err("cannot write stderr"))?;
                        io.stderr.flush().await.map_err(io_err("cannot write stderr"))?;
                    }
                    GuestMessage::Exit(code) => {
                        drop(reader);
                        return Ok(code);
                    }
                }
            }
            n = async { stdin.as_mut().expect("guarded").read(&mut buf).await }, if stdin.is_some() => {
                match n {
                    Ok(0) | Err(_) => {
                        stdin = None;
                        send(&mut tx, &HostMessage::StdinEof).await?;
                    }
                    Ok(n) => send(&mut tx, &HostMessage::Stdin(buf[..n].to_vec())).await?,
                }
            }
            ctl = io.control.recv(), if control_open => match ctl {
                None => control_open = false,
                Some(Control::Resize(ws)) => send(&mut tx, &HostMessage::Resize(ws)).await?,
                Some(Control::Signal(sig)) => send(&mut tx, &HostMessage::Signal(sig)).await?,
                Some(Control::Terminate) => {
                    if kill_at.is_none() {
                        send(&mut tx, &HostMessage::Signal(SIGTERM)).await?;
                        kill_at = Some(tokio::time::Instant::now() + KILL_GRACE);
                    } else {
                        // Asked twice: no more grace.
                        kill_at = Some(tokio::time::Instant::now());
                    }
                }
            },
            () = tokio::time::sleep_until(kill_at.unwrap_or(far)), if kill_at.is_some() && give_up_at.is_none() => {
                send(&mut tx, &HostMessage::Signal(SIGKILL)).await?;
                give_up_at = Some(tokio::time::Instant::now() + KILL_WAIT);
            }
            () = tokio::time::sleep_until(give_up_at.unwrap_or(far)), if give_up_at.is_some() => {
                return Err(SandboxError::VmStopped("the command did not exit after SIGKILL".into()));
            }
            how = &mut vm_exited => return Err(SandboxError::VmStopped(how)),
        }
    }
}

/// Aborts a task when dropped, so no reader outlives its exec.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
