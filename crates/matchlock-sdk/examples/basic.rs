//! Create a sandbox, run a command, move a file, clean up.
//! `cargo run -p matchlock-sdk --example basic [image]` (needs `matchlock` on PATH or `$MATCHLOCK_BIN`).

use matchlock_sdk::{Client, CreateOptions};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let image = std::env::args().nth(1).unwrap_or_else(|| "matchlock-busybox".into());
    let client = Client::start().await?;
    let id = client.create(CreateOptions::new(image).no_network()).await?;
    println!("sandbox {id}");
    let out = client.exec("uname -a; echo from $(hostname)").await?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    client.write_file("/tmp/hello.txt", b"written by the SDK\n", 0o644).await?;
    print!("{}", String::from_utf8_lossy(&client.read_file("/tmp/hello.txt").await?));
    client.close().await?;
    client.remove().await?;
    Ok(())
}
