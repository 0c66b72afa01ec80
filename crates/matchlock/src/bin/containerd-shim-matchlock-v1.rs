//! `containerd-shim-matchlock-v1`: the containerd runtime `io.containerd.matchlock.v1`
//! (see `matchlock-shim` and docs/CONTAINERD.md).

#[tokio::main]
async fn main() {
    matchlock_shim::main().await;
}
