//! Workspace interception: a rule that blocks creating `*.pem` files, and `file` events for
//! everything else the guest does in the workspace.
//! `cargo run -p matchlock-sdk --example vfs_hooks [image]`

use matchlock_sdk::{Client, CreateOptions, Event, VfsAction, VfsInterception, VfsRule};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let image = std::env::args().nth(1).unwrap_or_else(|| "matchlock-busybox".into());
    let client = Client::start().await?;
    let mut events = client.events();
    let block_keys = VfsRule {
        name: "no-keys".into(),
        ops: vec!["create".into()],
        path: "/workspace/*.pem".into(),
        action: VfsAction::Block,
        ..VfsRule::default()
    };
    let rules = VfsInterception { emit_events: true, rules: vec![block_keys] };
    client.create(CreateOptions::new(image).no_network().mount_memory("/workspace").vfs_interception(rules)).await?;
    let out = client.exec("echo notes > /workspace/notes.txt; echo key > /workspace/id.pem").await?;
    print!("{}", String::from_utf8_lossy(&out.stderr));
    while let Ok(event) = events.try_recv() {
        if let Event::File(f) = event {
            println!("{} {} ({} bytes)", f.op, f.path, f.size);
        }
    }
    client.close().await?;
    client.remove().await?;
    Ok(())
}
