//! The guest's DNS path: arbitrary bytes as a query to the host's answerer, under an
//! allow-list (no name server is configured: nothing leaves the process).
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use matchlock_net::dns::{answer_guest, Resolver};
use matchlock_net::Policy;

struct World {
    runtime: tokio::runtime::Runtime,
    resolver: Resolver,
    policy: Policy,
}

fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| World {
        runtime: tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap(),
        resolver: Resolver::new(&[]),
        policy: Policy::new(vec!["api.test".into(), "*.allowed.test".into()], true, vec![]),
    })
}

fuzz_target!(|data: &[u8]| {
    let w = world();
    w.runtime.block_on(async {
        let _ = answer_guest(data, &w.resolver, Some(&w.policy), None).await;
        let _ = answer_guest(data, &w.resolver, None, None).await;
    });
});
