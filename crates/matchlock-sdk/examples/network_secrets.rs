//! Network interception: an allow-list, a secret the guest only sees as a placeholder, and a
//! request rule that adds a header. Watches the `network` events.
//! `cargo run -p matchlock-sdk --example network_secrets -- <image with wget> <allowed host> <token>`

use matchlock_sdk::{Client, CreateOptions, Event, HookRule};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let image = args.next().unwrap_or_else(|| "matchlock-busybox".into());
    let host = args.next().unwrap_or_else(|| "example.com".into());
    let token = args.next().unwrap_or_else(|| "sk-real-value".into());
    let client = Client::start().await?;
    let mut events = client.events();
    let mut tagged = HookRule { name: "tag".into(), hosts: vec![host.clone()], ..HookRule::default() };
    tagged.set_headers.insert("X-Sandbox".into(), "matchlock".into());
    client
        .create(
            CreateOptions::new(image)
                .allow_host(host.clone())
                .secret("API_TOKEN", token, &[host.as_str()])
                .network_rules(vec![tagged], None),
        )
        .await?;
    let out = client.exec("echo \"the guest sees: $API_TOKEN\"").await?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    let out = client
        .exec(&format!("wget -qO- --header \"Authorization: Bearer $API_TOKEN\" http://{host}/ | head -c 200; echo"))
        .await?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    let out = client.exec("wget -qO- http://not-allowed.example/ 2>&1").await?;
    println!("unlisted host: exit {}", out.exit_code);
    while let Ok(event) = events.try_recv() {
        if let Event::Network(n) = event {
            println!("{} {} -> {} blocked={}", n.method, n.url, n.status_code, n.blocked);
        }
    }
    client.close().await?;
    client.remove().await?;
    Ok(())
}
