//! The four ways to run a command: batch, streaming, piped stdin, and a terminal; and
//! cancelling one by dropping its future.
//! `cargo run -p matchlock-sdk --example exec_modes [image]`

use std::time::Duration;

use matchlock_sdk::{Client, CreateOptions, ExecOptions};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let image = std::env::args().nth(1).unwrap_or_else(|| "matchlock-busybox".into());
    let client = Client::start().await?;
    client.create(CreateOptions::new(image).no_network()).await?;
    let opts = ExecOptions::default();

    let out = client.exec("echo batch; exit 3").await?;
    println!("batch: exit {} stdout {:?}", out.exit_code, String::from_utf8_lossy(&out.stdout));

    let status = client
        .exec_stream(
            "for i in 1 2 3; do echo tick $i; sleep 0.2; done",
            &opts,
            tokio::io::stdout(),
            tokio::io::stderr(),
        )
        .await?;
    println!("stream: exit {}", status.exit_code);

    let status = client
        .exec_pipe("tr a-z A-Z", &opts, &b"piped through tr\n"[..], tokio::io::stdout(), tokio::io::stderr())
        .await?;
    println!("pipe: exit {}", status.exit_code);

    let status = client.exec_tty("stty size; tty", &opts, (30, 100), tokio::io::empty(), tokio::io::stdout()).await?;
    println!("tty: exit {}", status.exit_code);

    // Dropping the future (here: by timing out) cancels the command in the guest.
    let cancelled = tokio::time::timeout(Duration::from_secs(1), client.exec("sleep 60")).await;
    println!("sleep 60 cancelled: {}", cancelled.is_err());

    client.close().await?;
    client.remove().await?;
    Ok(())
}
