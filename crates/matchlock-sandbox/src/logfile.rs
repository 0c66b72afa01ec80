//! Command output appended to a VM's log (`run -d`, an RPC sandbox's entrypoint), capped:
//! the guest decides how much it prints, the host decides how much disk it gets.

use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::AsyncWrite;

use crate::{io_err, SandboxError};

/// Most command output kept in one VM log; the rest is dropped.
pub const COMMAND_LOG_LIMIT: u64 = 64 * 1024 * 1024;

/// An appending writer that stops storing once the writers sharing its budget have
/// stored [`COMMAND_LOG_LIMIT`] bytes; later output is accepted and dropped.
#[derive(Debug)]
pub struct CappedLog {
    file: tokio::fs::File,
    used: Arc<AtomicU64>,
}

/// Two writers (stdout, stderr) appending to `path` with one shared budget.
pub fn command_log(path: &Path) -> Result<(CappedLog, CappedLog), SandboxError> {
    let open = || {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map(tokio::fs::File::from_std)
            .map_err(io_err(format!("cannot open {}", path.display())))
    };
    let used = Arc::new(AtomicU64::new(0));
    Ok((CappedLog { file: open()?, used: used.clone() }, CappedLog { file: open()?, used }))
}

impl AsyncWrite for CappedLog {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let room = COMMAND_LOG_LIMIT.saturating_sub(self.used.load(Ordering::Relaxed));
        let take = buf.len().min(usize::try_from(room).unwrap_or(usize::MAX));
        if take == 0 {
            return Poll::Ready(Ok(buf.len()));
        }
        let written = std::task::ready!(Pin::new(&mut self.file).poll_write(cx, &buf[..take]))?;
        self.used.fetch_add(written as u64, Ordering::Relaxed);
        Poll::Ready(Ok(written))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.file).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.file).poll_shutdown(cx)
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
    }
}
