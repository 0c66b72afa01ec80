//! A process's stdio as containerd hands it over: FIFO paths (also as `fifo://`) and
//! `file://` URIs; empty means none.

use std::io;
use std::path::PathBuf;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::oneshot;

/// Errors opening stdio.
#[derive(Debug, thiserror::Error)]
pub enum StdioError {
    /// The URI scheme is not one we serve.
    #[error("stdio {0:?}: only FIFOs and file:// are supported (not logging binaries)")]
    Scheme(String),
    /// Opening failed.
    #[error("cannot open stdio {0}")]
    Open(String, #[source] io::Error),
}

enum Target {
    None,
    Fifo(PathBuf),
    File(PathBuf),
}

fn parse(uri: &str) -> Result<Target, StdioError> {
    if uri.is_empty() {
        return Ok(Target::None);
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

/// An output destination (stdout or stderr).
pub async fn output(uri: &str) -> Result<Box<dyn AsyncWrite + Unpin + Send>, StdioError> {
    let err = |e| StdioError::Open(uri.to_owned(), e);
    Ok(match parse(uri)? {
        Target::None => Box::new(tokio::io::sink()),
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
        Target::File(_) => return Err(StdioError::Scheme(uri.to_owned())),
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
