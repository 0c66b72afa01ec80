//! A process's stdio as containerd hands it over: FIFO paths (also as `fifo://`),
//! `file://` URIs and `binary://` logging binaries; empty means none.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use command_fds::{CommandFdExt, FdMapping};

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::oneshot;

/// Errors opening stdio.
#[derive(Debug, thiserror::Error)]
pub enum StdioError {
    /// The URI scheme is not one we serve.
    #[error("stdio {0:?}: only FIFOs, file:// and binary:// are supported (and stdin only from a FIFO)")]
    Scheme(String),
    /// The logging binary failed to start or to signal that it is ready.
    #[error("logging binary {0}: {1}")]
    Binary(String, String),
    /// Opening failed.
    #[error("cannot open stdio {0}")]
    Open(String, #[source] io::Error),
}

enum Target {
    None,
    Fifo(PathBuf),
    File(PathBuf),
    Binary { path: PathBuf, args: Vec<String> },
}

fn parse(uri: &str) -> Result<Target, StdioError> {
    if uri.is_empty() {
        return Ok(Target::None);
    }
    if uri.starts_with("binary://") {
        let parsed = url::Url::parse(uri).map_err(|_| StdioError::Scheme(uri.to_owned()))?;
        // containerd's own shims: each query pair becomes `key value` (a value may be empty).
        let args = parsed
            .query_pairs()
            .flat_map(|(k, v)| [Some(k.into_owned()), (!v.is_empty()).then(|| v.into_owned())])
            .flatten()
            .collect();
        return Ok(Target::Binary { path: parsed.path().into(), args });
    }
    if let Some(path) = uri.strip_prefix("fifo://") {
        return Ok(Target::Fifo(path.into()));
    }
    if let Some(path) = uri.strip_prefix("file://") {
        return Ok(Target::File(path.into()));
    }
    if uri.starts_with('/') {
        return Ok(Target::Fifo(uri.into()));
    }
    Err(StdioError::Scheme(uri.to_owned()))
}

/// Whether `uri` names a logging binary (which then takes both stdout and stderr).
pub fn is_binary(uri: &str) -> bool {
    uri.starts_with("binary://")
}

/// An output destination (stdout or stderr).
pub async fn output(uri: &str) -> Result<Box<dyn AsyncWrite + Unpin + Send>, StdioError> {
    let err = |e| StdioError::Open(uri.to_owned(), e);
    Ok(match parse(uri)? {
        Target::None => Box::new(tokio::io::sink()),
        Target::Binary { .. } => return Err(StdioError::Scheme(uri.to_owned())),
        // Opened read-write, as containerd's own shims keep a reader: the open never waits
        // for containerd's side and a writer never gets EPIPE if it goes away.
        Target::Fifo(path) => Box::new(pipe::OpenOptions::new().read_write(true).open_sender(&path).map_err(err)?),
        Target::File(path) => Box::new(
            tokio::fs::OpenOptions::new().create(true).append(true).mode(0o600).open(&path).await.map_err(err)?,
        ),
    })
}

/// A process's stdin: what the FIFO delivers until [`StdinCloser::close`] (containerd's
/// CloseIO), then end of file. As with containerd's own shims, the FIFO's writer going
/// away is not an end of file: only CloseIO is.
pub struct Stdin {
    /// What the process reads.
    pub reader: Box<dyn AsyncRead + Unpin + Send>,
    /// Ends the input.
    pub closer: StdinCloser,
}

impl std::fmt::Debug for Stdin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stdin").finish_non_exhaustive()
    }
}

/// Delivers end of file on a [`Stdin`] once the bytes already written are passed on.
#[derive(Debug)]
pub struct StdinCloser(Option<oneshot::Sender<()>>);

impl StdinCloser {
    /// Ends the input after the bytes already in the FIFO.
    pub fn close(&mut self) {
        if let Some(tx) = self.0.take() {
            let _ = tx.send(());
        }
    }
}

/// Opens stdin from `uri` (None when it is empty).
pub fn input(uri: &str) -> Result<Option<Stdin>, StdioError> {
    let err = |e| StdioError::Open(uri.to_owned(), e);
    let fifo = match parse(uri)? {
        Target::None => return Ok(None),
        Target::Fifo(path) => pipe::OpenOptions::new().read_write(true).open_receiver(&path).map_err(err)?,
        Target::File(_) | Target::Binary { .. } => return Err(StdioError::Scheme(uri.to_owned())),
    };
    let (reader, mut writer) = tokio::io::simplex(64 * 1024);
    let (close_tx, mut close_rx) = oneshot::channel();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            tokio::select! {
                ready = fifo.readable() => {
                    if ready.is_err() {
                        break;
                    }
                    match fifo.try_read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => {
                            if writer.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(_) => break,
                    }
                }
                _ = &mut close_rx => {
                    // CloseIO: pass on what is already written, then end.
                    while let Ok(n) = fifo.try_read(&mut buf) {
                        if n == 0 || writer.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                    break;
                }
            }
        }
        let _ = writer.shutdown().await;
    });
    Ok(Some(Stdin { reader: Box::new(reader), closer: StdinCloser(Some(close_tx)) }))
}

/// How long a logging binary may take to say it is ready, and to finish once the
/// process's output has ended.
const BINARY_WAIT: Duration = Duration::from_secs(10);

/// A process's stdout and stderr writers.
pub type Outputs = (Box<dyn AsyncWrite + Unpin + Send>, Box<dyn AsyncWrite + Unpin + Send>);

/// A logging binary serving a process's output (containerd's `binary://` protocol): the
/// process's stdout on its fd 3, stderr on fd 4; it closes fd 5 once it is ready.
pub struct LoggingBinary {
    child: tokio::process::Child,
}

impl std::fmt::Debug for LoggingBinary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoggingBinary").field("pid", &self.child.id()).finish_non_exhaustive()
    }
}

impl LoggingBinary {
    /// Starts the binary of `uri` for container `id` of `namespace` and waits until it is
    /// ready; returns the writers of the process's stdout and stderr.
    pub async fn start(uri: &str, id: &str, namespace: &str) -> Result<(Outputs, Self), StdioError> {
        let Target::Binary { path, args } = parse(uri)? else { return Err(StdioError::Scheme(uri.to_owned())) };
        let err = |what: &str, e: &dyn std::fmt::Display| {
            StdioError::Binary(path.display().to_string(), format!("{what}: {e}"))
        };
        let (stdout, stdout_r) = pipe::pipe().map_err(|e| err("pipe", &e))?;
        let (stderr, stderr_r) = pipe::pipe().map_err(|e| err("pipe", &e))?;
        let (ready_tx, ready_rx) = pipe::pipe().map_err(|e| err("pipe", &e))?;
        let fd = |r: pipe::Receiver| r.into_blocking_fd().map_err(|e| err("pipe", &e));
        let mappings = vec![
            FdMapping { parent_fd: fd(stdout_r)?, child_fd: 3 },
            FdMapping { parent_fd: fd(stderr_r)?, child_fd: 4 },
            FdMapping { parent_fd: ready_tx.into_blocking_fd().map_err(|e| err("pipe", &e))?, child_fd: 5 },
        ];
        let mut cmd = tokio::process::Command::new(&path);
        cmd.args(&args)
            .env("CONTAINER_ID", id)
            .env("CONTAINER_NAMESPACE", namespace)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true);
        cmd.fd_mappings(mappings).map_err(|e| err("fds", &e))?;
        let mut child = cmd.spawn().map_err(|e| err("cannot start it", &e))?;
        // Our copy of its end goes with the command: it is ready once its own is closed.
        drop(cmd);
        let mut ready_rx = ready_rx;
        let mut sink = Vec::new();
        let ready =
            tokio::time::timeout(BINARY_WAIT, tokio::io::AsyncReadExt::read_to_end(&mut ready_rx, &mut sink)).await;
        if !matches!(ready, Ok(Ok(_))) {
            let _ = child.start_kill();
            return Err(err("not ready", &format!("fd 5 still open after {} s", BINARY_WAIT.as_secs())));
        }
        Ok(((Box::new(stdout), Box::new(stderr)), Self { child }))
    }

    /// Waits for the binary to finish (the process's output has ended); kills it after a while.
    pub async fn finish(mut self) {
        match tokio::time::timeout(BINARY_WAIT, self.child.wait()).await {
            Ok(_) => {}
            Err(_) => {
                tracing::warn!(
                    "the logging binary did not exit {} s after the output ended: killed",
                    BINARY_WAIT.as_secs()
                );
                let _ = self.child.kill().await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_uris_carry_their_query_as_arguments() {
        let Ok(Target::Binary { path, args }) = parse("binary:///usr/bin/logger?dir=%2Ftmp%2Fx&flag") else {
            panic!("a binary URI")
        };
        assert_eq!(path, PathBuf::from("/usr/bin/logger"));
        assert_eq!(args, ["dir", "/tmp/x", "flag"]);
        assert!(matches!(parse("/run/fifo"), Ok(Target::Fifo(_))));
        assert!(matches!(parse("fifo:///run/fifo"), Ok(Target::Fifo(_))));
        assert!(matches!(parse("file:///var/log/x"), Ok(Target::File(_))));
        assert!(matches!(parse("tcp://x"), Err(StdioError::Scheme(_))));
    }
}
