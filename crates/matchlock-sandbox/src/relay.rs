//! The exec relay: a Unix socket (`<vm dir>/exec.sock`) through which other processes
//! reach the guest of a sandbox this process owns.
//!
//! A client writes `CONNECT <port>\n` — the same handshake as the hybrid vsock — and,
//! once the owner answers `OK <port>\n`, speaks the guest protocol of that port; the
//! owner splices bytes both ways. Only the exec and echo ports are reachable. The socket is
//! created with mode 0600: only the sandbox's user may use it.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use matchlock_protocol::{ECHO_PORT, EXEC_PORT};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::{io_err, SandboxError};

/// Path of the relay socket of a VM directory.
pub fn socket_path(vm_dir: &Path) -> PathBuf {
    vm_dir.join("exec.sock")
}

/// Ports a relay client may reach.
const RELAYED_PORTS: [u32; 2] = [EXEC_PORT, ECHO_PORT];

/// Binds the relay socket and serves it until the returned task is aborted.
pub fn serve(vm_dir: &Path) -> Result<tokio::task::JoinHandle<()>, SandboxError> {
    let path = socket_path(vm_dir);
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).map_err(io_err(format!("cannot listen on {}", path.display())))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .map_err(io_err(format!("cannot restrict {}", path.display())))?;
    let vsock = matchlock_vm::vsock::host_socket(vm_dir);
    Ok(tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let vsock = vsock.clone();
            tokio::spawn(async move {
                let _ = splice(client, &vsock).await;
            });
        }
    }))
}

async fn splice(client: UnixStream, vsock: &Path) -> std::io::Result<()> {
    let mut client = BufReader::new(client);
    let mut line = String::new();
    let read = tokio::time::timeout(Duration::from_secs(5), (&mut client).take(64).read_line(&mut line)).await;
    let port = match read {
        Ok(Ok(_)) => line.strip_prefix("CONNECT ").and_then(|p| p.trim_end().parse::<u32>().ok()),
        _ => None,
    };
    let Some(port) = port.filter(|p| RELAYED_PORTS.contains(p)) else {
        client.get_mut().write_all(b"ERR unsupported request\n").await?;
        return Ok(());
    };
    let mut guest = match matchlock_vm::vsock::connect(vsock, port, Duration::from_secs(5)).await {
        Ok(g) => g,
        Err(e) => {
            client.get_mut().write_all(format!("ERR {e}\n").as_bytes()).await?;
            return Ok(());
        }
    };
    client.get_mut().write_all(format!("OK {port}\n").as_bytes()).await?;
    // Bytes the client sent right after the handshake are already buffered.
    let buffered = client.buffer().to_vec();
    guest.write_all(&buffered).await?;
    let mut client = client.into_inner();
    tokio::io::copy_bidirectional(&mut client, &mut guest).await?;
    Ok(())
}

/// Connects to `port` of the guest through the relay of the sandbox in `vm_dir`.
pub async fn connect(vm_dir: &Path, port: u32) -> Result<UnixStream, SandboxError> {
    let path = socket_path(vm_dir);
    let connect_err = |e| SandboxError::Relay(format!("cannot reach the sandbox's exec relay {}: {e}", path.display()));
    let mut stream = UnixStream::connect(&path).await.map_err(connect_err)?;
    stream.write_all(format!("CONNECT {port}\n").as_bytes()).await.map_err(connect_err)?;
    let mut reply = Vec::with_capacity(16);
    loop {
        let mut b = [0u8; 1];
        if stream.read(&mut b).await.map_err(connect_err)? == 0 {
            return Err(SandboxError::Relay("the sandbox's owner closed the relay connection".into()));
        }
        if b[0] == b'\n' || reply.len() > 256 {
            break;
        }
        reply.push(b[0]);
    }
    let reply = String::from_utf8_lossy(&reply);
    if !reply.starts_with("OK ") {
        return Err(SandboxError::Relay(format!("the sandbox refused the connection: {reply}")));
    }
    Ok(stream)
}
