//! Capped writers for what the guest prints: command output appended to a VM's log
//! (`run -d`, an RPC sandbox's entrypoint) and output collected in memory (RPC `exec`).
//! The guest decides how much it prints, the host decides how much it keeps.

use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::AsyncWrite;

use crate::{io_err, SandboxError};

/// Most command output kept in one VM log; the rest is dropped.
pub const COMMAND_LOG_LIMIT: u64 = 64 * 1024 * 1024;

/// A writer that stores at most `limit` bytes (counted across the writers sharing its
/// budget) and accepts and drops the rest.
#[derive(Debug)]
pub struct Capped<W> {
    inner: W,
    used: Arc<AtomicU64>,
    limit: u64,
    dropped: u64,
}

impl<W> Capped<W> {
    /// A writer of its own budget.
    pub fn new(inner: W, limit: u64) -> Self {
        Self { inner, used: Arc::new(AtomicU64::new(0)), limit, dropped: 0 }
    }

    /// Bytes written to this writer and dropped because the budget was spent.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// The inner writer.
    pub fn into_inner(self) -> W {
        self.inner
    }
}

/// Command output appended to a VM log.
pub type CappedLog = Capped<tokio::fs::File>;

/// Two writers (stdout, stderr) appending to `path` with one shared budget of
/// [`COMMAND_LOG_LIMIT`].
pub fn command_log(path: &Path) -> Result<(CappedLog, CappedLog), SandboxError> {
    let open = || {
        matchlock_api::paths::append_private(path)
            .map(tokio::fs::File::from_std)
            .map_err(io_err(format!("cannot open {}", path.display())))
    };
    let stdout = Capped::new(open()?, COMMAND_LOG_LIMIT);
    let stderr = Capped { inner: open()?, used: stdout.used.clone(), limit: COMMAND_LOG_LIMIT, dropped: 0 };
    Ok((stdout, stderr))
}

impl<W: AsyncWrite + Unpin> AsyncWrite for Capped<W> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let room = self.limit.saturating_sub(self.used.load(Ordering::Relaxed));
        let take = buf.len().min(usize::try_from(room).unwrap_or(usize::MAX));
        if take == 0 {
            self.dropped += buf.len() as u64;
            return Poll::Ready(Ok(buf.len()));
        }
        let written = std::task::ready!(Pin::new(&mut self.inner).poll_write(cx, &buf[..take]))?;
        self.used.fetch_add(written as u64, Ordering::Relaxed);
        Poll::Ready(Ok(written))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncWriteExt;

    use super::*;

    #[tokio::test]
    async fn output_beyond_the_limit_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.log");
        std::fs::write(&path, "console\n").unwrap();
        let (mut out, mut err) = command_log(&path).unwrap();
        let chunk = vec![b'x'; 1024 * 1024];
        for _ in 0..40 {
            out.write_all(&chunk).await.unwrap();
            err.write_all(&chunk).await.unwrap();
        }
        out.flush().await.unwrap();
        err.flush().await.unwrap();
        let size = std::fs::metadata(&path).unwrap().len();
        assert_eq!(size, 8 + COMMAND_LOG_LIMIT, "appended after the existing content, capped in all");
        assert_eq!(out.dropped() + err.dropped(), 80 * 1024 * 1024 - COMMAND_LOG_LIMIT, "what was dropped is counted");
    }
}
