//! Host side of Firecracker's hybrid vsock: Unix sockets standing in for vsock ports.

use std::io;
use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::time::{sleep, timeout, Instant};

use crate::VmError;

/// One `CONNECT` attempt: returns the stream once the device answered `OK`.
async fn connect_once(uds: &Path, port: u32) -> io::Result<UnixStream> {
    let mut stream = UnixStream::connect(uds).await?;
    stream.write_all(format!("CONNECT {port}\n").as_bytes()).await?;
    // Read the reply byte by byte: anything after the newline belongs to the guest.
    let mut line = Vec::with_capacity(16);
    loop {
        let mut b = [0u8; 1];
        if stream.read(&mut b).await? == 0 {
            return Err(io::Error::new(io::ErrorKind::ConnectionReset, "vsock device closed the connection"));
        }
        if b[0] == b'\n' {
            break;
        }
        line.push(b[0]);
        if line.len() > 64 {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "malformed vsock handshake reply"));
        }
    }
    if !line.starts_with(b"OK ") {
        return Err(io::Error::new(
            io::ErrorKind::ConnectionRefused,
            format!("vsock handshake refused: {}", String::from_utf8_lossy(&line)),
        ));
    }
    Ok(stream)
}

/// Connects to guest `port`, retrying resets and refusals (the guest may still be
/// binding, and the device has been seen to reset a connection right after `OK`) until
/// `deadline` passes.
pub async fn connect(uds: &Path, port: u32, deadline: Duration) -> Result<UnixStream, VmError> {
    let until = Instant::now() + deadline;
    loop {
        let attempt = timeout(Duration::from_secs(5), connect_once(uds, port)).await;
        let err = match attempt {
            Ok(Ok(stream)) => return Ok(stream),
            Ok(Err(e)) => e,
            Err(_) => io::Error::new(io::ErrorKind::TimedOut, "vsock handshake timed out"),
        };
        if Instant::now() >= until {
            return Err(VmError::Connect { port, source: err });
        }
        sleep(Duration::from_millis(20)).await;
    }
}
