//! Exec round-trip latency through the SDK: `exec("true")` N times on one sandbox; prints
//! each call's milliseconds on one line (used by bench/rpc).
//! `cargo run --release -p matchlock-sdk --example exec_latency [calls] [image]`

use std::time::Instant;

use matchlock_sdk::{Client, CreateOptions};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let calls: usize = args.next().map_or(Ok(50), |a| a.parse())?;
    let image = args.next().unwrap_or_else(|| "matchlock-busybox".into());
    let client = Client::start().await?;
    client.create(CreateOptions::new(image).no_network()).await?;
    for _ in 0..3 {
        client.exec("true").await?;
    }
    let mut times = Vec::with_capacity(calls);
    for _ in 0..calls {
        let started = Instant::now();
        let out = client.exec("true").await?;
        times.push(started.elapsed().as_secs_f64() * 1000.0);
        assert_eq!(out.exit_code, 0);
    }
    println!("{}", times.iter().map(|t| format!("{t:.3}")).collect::<Vec<_>>().join(" "));
    client.close().await?;
    client.remove().await?;
    Ok(())
}
