//! Running one command in a sandbox from the terminal: stdio, raw mode, signals,
//! window size and deadlines, shared by `run` and `exec`.

use std::future::Future;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use matchlock_protocol::exec::{ExecMode, WindowSize};
use matchlock_sandbox::{Control, ExecIo, SandboxError};
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::mpsc;

use crate::terminal;

/// Where command output goes.
#[derive(Debug, Clone)]
pub(crate) enum Output {
    /// The user's stdout/stderr.
    Terminal,
    /// Appended to a log file (detached sandboxes).
    Log(PathBuf),
}

/// The signals that stop a command or a sandbox.
#[derive(Debug)]
pub(crate) struct StopSignals {
    int: Signal,
    term: Signal,
    hup: Signal,
}

impl StopSignals {
    /// Starts listening for SIGINT, SIGTERM and SIGHUP.
    pub(crate) fn new() -> Result<Self> {
        Ok(Self {
            int: signal(SignalKind::interrupt()).context("cannot handle SIGINT")?,
            term: signal(SignalKind::terminate()).context("cannot handle SIGTERM")?,
            hup: signal(SignalKind::hangup()).context("cannot handle SIGHUP")?,
        })
    }

    /// Resolves at the next stop signal.
    pub(crate) async fn recv(&mut self) {
        tokio::select! {
            _ = self.int.recv() => {}
            _ = self.term.recv() => {}
            _ = self.hup.recv() => {}
        }
    }
}

/// Why a session ended early.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Interruptions {
    /// A stop signal arrived.
    pub stopped: bool,
    /// The deadline passed.
    pub timed_out: bool,
}

/// The exec mode for `-i` / `-t`: `-it` is a TTY (and needs one), `-i` a pipe, and
/// anything else a plain stream (`-t` alone has no effect).
pub(crate) fn exec_mode(interactive: bool, tty: bool) -> Result<ExecMode> {
    match (interactive, tty) {
        (true, true) if !std::io::stdin().is_terminal() => {
            anyhow::bail!("-it requires a TTY (stdin is not a terminal)")
        }
        (true, true) => Ok(ExecMode::Tty),
        (true, false) => Ok(ExecMode::Pipe),
        _ => Ok(ExecMode::Stream),
    }
}

/// Sleeps until `deadline`, or forever without one.
pub(crate) async fn until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}

/// The initial terminal size for TTY mode.
pub(crate) fn initial_window(mode: ExecMode) -> Option<WindowSize> {
    (mode == ExecMode::Tty).then(|| terminal::window_size().unwrap_or(WindowSize { rows: 24, cols: 80 }))
}

/// Runs `exec` with this process's stdio (or a log), turning stop signals and the
/// deadline into a graceful stop (SIGTERM, then SIGKILL after 5 s) and SIGWINCH into
/// resizes. Returns the command's result and what interrupted it.
pub(crate) async fn run<F, Fut>(
    mode: ExecMode,
    output: &Output,
    signals: &mut StopSignals,
    deadline: Option<Instant>,
    exec: F,
) -> Result<(Result<i32, SandboxError>, Interruptions)>
where
    F: FnOnce(ExecIo<'static>) -> Fut,
    Fut: Future<Output = Result<i32, SandboxError>>,
{
    let mut winch = signal(SignalKind::window_change()).context("cannot handle SIGWINCH")?;
    let (control_tx, control_rx) = mpsc::channel(8);
    let (stdout, stderr): (
        Box<dyn tokio::io::AsyncWrite + Unpin + Send>,
        Box<dyn tokio::io::AsyncWrite + Unpin + Send>,
    ) = match output {
        Output::Terminal => (Box::new(tokio::io::stdout()), Box::new(tokio::io::stderr())),
        Output::Log(path) => {
            let (stdout, stderr) = matchlock_sandbox::logfile::command_log(path)?;
            (Box::new(stdout), Box::new(stderr))
        }
    };
    let io = ExecIo {
        stdin: (mode != ExecMode::Stream).then(|| Box::new(tokio::io::stdin()) as _),
        stdout,
        stderr,
        control: control_rx,
    };
    let raw = if mode == ExecMode::Tty { Some(terminal::RawMode::enter()?) } else { None };
    let mut interruptions = Interruptions::default();
    let forward = async {
        loop {
            let control = tokio::select! {
                () = signals.recv() => {
                    interruptions.stopped = true;
                    Control::Terminate
                }
                () = until(deadline), if !interruptions.timed_out => {
                    interruptions.timed_out = true;
                    Control::Terminate
                }
                _ = winch.recv() => match terminal::window_size() {
                    Some(ws) if mode == ExecMode::Tty => Control::Resize(ws),
                    _ => continue,
                },
            };
            if control_tx.send(control).await.is_err() {
                // The command has ended; its branch completes the select below.
                std::future::pending::<()>().await;
            }
        }
    };
    let result = tokio::select! {
        r = exec(io) => r,
        () = forward => unreachable!("the forwarding loop never completes"),
    };
    drop(raw);
    Ok((result, interruptions))
}
