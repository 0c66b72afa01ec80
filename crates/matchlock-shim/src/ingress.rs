//! Ingress into a sandbox that lives in a network namespace of its own (a pod's): every TCP
//! port the guest listens on (on all addresses) is mirrored by a listener on the same port
//! in that namespace, whose connections go to the guest's port through the sandbox's relay.
//! Connections to the namespace's address (the pod IP) reach the server in the VM, as they
//! would reach a runc container; ports the guest only binds on loopback stay private.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Weak;
use std::time::Duration;

use matchlock_sandbox::forward::{self, Binding, Forwarding};
use matchlock_sandbox::Sandbox;

/// How often the guest's listening sockets are read.
const POLL: Duration = Duration::from_secs(1);
/// At most this many ports are mirrored (each is a host listener).
const MAX_PORTS: usize = 256;

/// The ports a `/proc/net/tcp` or `/proc/net/tcp6` table lists as listening on every address.
pub fn listening_ports(table: &str) -> BTreeSet<u16> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let local = fields.nth(1)?;
            let state = fields.nth(1)?;
            let (addr, port) = local.split_once(':')?;
            let any = addr.bytes().all(|b| b == b'0');
            (state == "0A" && any).then(|| u16::from_str_radix(port, 16).ok()).flatten()
        })
        .filter(|p| *p != 0)
        .collect()
}

/// Binds `0.0.0.0:port` inside the network namespace at `netns` (on a thread that joins it:
/// the socket stays in that namespace).
fn bind_in(netns: &Path, port: u16) -> std::io::Result<std::net::TcpListener> {
    let ns = std::fs::File::open(netns)?;
    std::thread::spawn(move || {
        nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET)?;
        let listener = std::net::TcpListener::bind((Ipv4Addr::UNSPECIFIED, port))?;
        listener.set_nonblocking(true)?;
        Ok(listener)
    })
    .join()
    .map_err(|_| std::io::Error::other("the namespace thread panicked"))?
}

/// Mirrors the guest's listening ports into `netns` until the sandbox is gone.
pub async fn mirror(sandbox: Weak<Sandbox>, netns: PathBuf) {
    let mut served: BTreeMap<u16, Forwarding> = BTreeMap::new();
    loop {
        tokio::time::sleep(POLL).await;
        let Some(s) = sandbox.upgrade() else { return };
        let mut ports = BTreeSet::new();
        for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
            if let Ok(Ok(text)) = tokio::time::timeout(POLL, s.read_file(table)).await {
                ports.extend(listening_ports(&String::from_utf8_lossy(&text)));
            }
        }
        let vm_dir = s.dir().clone();
        drop(s);
        served.retain(|port, _| ports.contains(port));
        let room = MAX_PORTS.saturating_sub(served.len());
        let new: Vec<u16> = ports.into_iter().filter(|p| !served.contains_key(p)).take(room).collect();
        for port in new {
            let listener = bind_in(&netns, port).and_then(tokio::net::TcpListener::from_std);
            match listener {
                Ok(listener) => {
                    let binding = Binding { local: SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)), remote: port };
                    served.insert(port, forward::start(&vm_dir, vec![(listener, binding)]));
                    tracing::info!("ingress: port {port} of {} reaches the guest", netns.display());
                }
                Err(e) => tracing::warn!("ingress: cannot listen on port {port} in {}: {e}", netns.display()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_sockets_listening_on_every_address_are_mirrored() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0
   1: 0100007F:1F91 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2 1 0 100 0 0 10 0
   2: 0200A8C0:9C40 0A0000C6:0050 01 00000000:00000000 00:00000000 00000000     0        0 3 1 0 100 0 0 10 0
   3: 00000000000000000000000000000000:0050 00000000000000000000000000000000:0000 0A 0 0 0 0 0
garbage
";
        assert_eq!(listening_ports(table).into_iter().collect::<Vec<_>>(), [80, 8080]);
    }
}
