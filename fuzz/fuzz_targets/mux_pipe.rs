//! The host end of the host↔guest pipe: arbitrary guest bytes, after a valid answer to the
//! host's `Hello` (so streams, data, credit and resets are reached), into a real `Mux` whose
//! guest-opened streams go to port listeners in a temporary VM directory (port 5001 answers).
//! It must never panic, and must end every stream when the pipe closes.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use matchlock_api::paths::VmDir;
use matchlock_vm::mux::Mux;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn vm_dir() -> &'static (tempfile::TempDir, VmDir) {
    static DIR: OnceLock<(tempfile::TempDir, VmDir)> = OnceLock::new();
    DIR.get_or_init(|| {
        let tmp = tempfile::tempdir().unwrap();
        let dir = VmDir::at(tmp.path());
        (tmp, dir)
    })
}

fuzz_target!(|data: &[u8]| {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let (_, dir) = vm_dir();
        let _ = std::fs::remove_file(dir.port_listener(5001));
        let listener = tokio::net::UnixListener::bind(dir.port_listener(5001)).unwrap();
        // The host side of port 5001 echoes what it gets, so credit flows both ways.
        let accept = tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut rd, mut wr) = conn.into_split();
                    let _ = tokio::io::copy(&mut rd, &mut wr).await;
                });
            }
        });
        let (host, guest) = tokio::net::UnixStream::pair().unwrap();
        let mux = Mux::start(host, dir.clone());
        let (mut from_host, mut to_host) = guest.into_split();
        let mut hello = [0u8; 17];
        from_host.read_exact(&mut hello).await.unwrap();
        // Drain what the host sends so it never blocks on us.
        let drain = tokio::spawn(async move {
            let mut sink = tokio::io::sink();
            let _ = tokio::io::copy(&mut from_host, &mut sink).await;
        });
        let _ = to_host.write_all(&hello).await;
        let _ = to_host.write_all(data).await;
        drop(to_host);
        tokio::time::timeout(std::time::Duration::from_secs(10), mux.closed()).await.expect("the pipe's end is seen");
        drain.abort();
        accept.abort();
    });
});
