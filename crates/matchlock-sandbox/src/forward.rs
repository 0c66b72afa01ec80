//! Port forwards (`run -p`, `port-forward`): host TCP listeners whose connections are relayed
//! to a port on the guest's loopback through the sandbox's exec relay.

use std::net::{IpAddr, SocketAddr};

use matchlock_api::config::{parse_publish, PortForward};
use matchlock_api::paths::VmDir;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::{io_err, SandboxError};

type Result<T> = std::result::Result<T, SandboxError>;

/// One listener to bind.
#[derive(Debug, Clone, Copy)]
pub struct Binding {
    /// Host address and port.
    pub local: SocketAddr,
    /// Guest port.
    pub remote: u16,
}

/// Parses `[LOCAL:]REMOTE` specs and `--address` values (IP literals or `localhost`).
pub fn parse(specs: &[String], addresses: &[String]) -> Result<Vec<Binding>> {
    let ips = parse_addresses(addresses)?;
    let forwards: Vec<PortForward> = specs
        .iter()
        .map(|s| parse_publish(s).map_err(|e| SandboxError::Config(e.to_string())))
        .collect::<Result<_>>()?;
    Ok(bindings(&ips, &forwards))
}

/// Every forward on every address.
pub fn bindings(ips: &[IpAddr], forwards: &[PortForward]) -> Vec<Binding> {
    ips.iter()
        .flat_map(|ip| forwards.iter().map(|f| Binding { local: SocketAddr::new(*ip, f.local), remote: f.remote }))
        .collect()
}

/// Parses listen addresses (IP literals or `localhost`), without duplicates.
pub fn parse_addresses(addresses: &[String]) -> Result<Vec<IpAddr>> {
    let mut ips: Vec<IpAddr> = Vec::new();
    for address in addresses {
        let ip = if address == "localhost" {
            IpAddr::from([127, 0, 0, 1])
        } else {
            address
                .parse()
                .map_err(|_| SandboxError::Config(format!("invalid address {address:?}: must be an IP or localhost")))?
        };
        if !ips.contains(&ip) {
            ips.push(ip);
        }
    }
    Ok(ips)
}

/// Binds every listener (before the sandbox boots: a busy port fails fast).
pub async fn bind(bindings: &[Binding]) -> Result<Vec<(TcpListener, Binding)>> {
    let mut listeners = Vec::new();
    for binding in bindings {
        let listener =
            TcpListener::bind(binding.local).await.map_err(io_err(format!("cannot listen on {}", binding.local)))?;
        listeners.push((listener, *binding));
    }
    Ok(listeners)
}

/// Serves the listeners for the sandbox in `vm_dir` until the returned guard drops.
pub fn start(vm_dir: &VmDir, listeners: Vec<(TcpListener, Binding)>) -> Forwarding {
    let mut tasks = Vec::new();
    for (listener, binding) in listeners {
        let dir = vm_dir.clone();
        tasks.push(tokio::spawn(async move {
            let mut backoff = crate::relay::AcceptBackoff::default();
            loop {
                let (client, _) = backoff.accept("a port forward", || listener.accept()).await;
                let dir = dir.clone();
                tokio::spawn(async move {
                    let _ = client.set_nodelay(true);
                    if let Err(e) = crate::relay::forward(&dir, binding.remote, client).await {
                        tracing::warn!("port forward to sandbox port {}: {e}", binding.remote);
                    }
                });
            }
        }));
    }
    Forwarding(tasks)
}

/// Running listeners; dropping it stops them.
#[derive(Debug)]
pub struct Forwarding(Vec<JoinHandle<()>>);

impl Drop for Forwarding {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}
