//! The HTTP interception path: arbitrary bytes as a guest connection to port 80 of an address,
//! served by the engine's real flow handler (hyper's parser, the one-destination decision, the
//! allow-list, interception rules, secret substitution and the upstream decision). No upstream
//! is reachable: every request ends in a refusal, after every guest-controlled step ran.
#![no_main]

mod common;

use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::OnceLock;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use matchlock_net::stack::FlowHandler;
use matchlock_net::Flows;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn flows() -> &'static Flows {
    static FLOWS: OnceLock<Flows> = OnceLock::new();
    FLOWS.get_or_init(common::flows)
}

fuzz_target!(|data: &[u8]| {
    let runtime = common::runtime();
    runtime.block_on(async {
        let (mut guest, host) = tokio::io::duplex(64 * 1024);
        let src = SocketAddrV4::new(Ipv4Addr::new(192, 168, 100, 2), 40000);
        flows().tcp(src, SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 7), 80), host);
        let exchange = async {
            let _ = guest.write_all(data).await;
            let _ = guest.shutdown().await;
            let mut answer = Vec::new();
            let _ = guest.read_to_end(&mut answer).await;
        };
        // A request hyper still waits on (a body never completed) ends with the input.
        let _ = tokio::time::timeout(Duration::from_secs(2), exchange).await;
    });
});
