//! `matchlock mcp`: the MCP server (`matchlock-mcp`) on stdio or Streamable HTTP, under the
//! policy of `run`'s options given here.

use std::collections::HashMap;
use std::io::Read as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use matchlock_mcp::backend::{BackendError, SandboxLauncher};
use matchlock_mcp::{Policy, Sandboxes};

use crate::images::{image_for_run, open_store};
use crate::run::SandboxArgs;
use crate::session::StopSignals;

/// Arguments of `matchlock mcp`.
#[derive(Debug, Args)]
pub(crate) struct McpArgs {
    /// What every sandbox boots with: the default image, network, secrets, volumes,
    /// resources. A tool call cannot change any of it.
    #[command(flatten)]
    sandbox: SandboxArgs,
    /// Further images a tool call may ask for (comma-separated; `--image` is the default).
    #[arg(long = "allow-image", value_delimiter = ',', value_name = "IMAGE[,IMAGE]")]
    allow_image: Vec<String>,
    /// Most sandboxes open at once (one-off runs included); the next is refused.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=256))]
    max_sandboxes: u64,
    /// Close a sandbox no call has used for this many seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 600, value_parser = clap::value_parser!(u64).range(1..))]
    idle_timeout: u64,
    /// Longest a command may run, in seconds (a call may ask for less, never more); then it
    /// is stopped and its output so far returned.
    #[arg(long, value_name = "SECONDS", default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..))]
    call_timeout: u64,
    /// Most bytes of each of stdout and stderr a result carries; the rest is dropped and
    /// counted.
    #[arg(long, value_name = "BYTES", default_value_t = 64 * 1024, value_parser = clap::value_parser!(u64).range(1..=(16 << 20)))]
    max_output: u64,
    /// Serve MCP's Streamable HTTP at http://ADDR/mcp instead of stdio. Clients must send
    /// `Authorization: Bearer <token>`.
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// With --listen: a file holding the bearer token (default: $MATCHLOCK_MCP_TOKEN, else a
    /// random token printed on stderr).
    #[arg(long, value_name = "FILE", requires = "listen")]
    token_file: Option<PathBuf>,
}

/// Serves until the client goes (stdio) or a stop signal; every sandbox is closed then.
pub(crate) async fn serve(args: McpArgs) -> Result<u8> {
    let base = args.sandbox.config(&HashMap::new())?;
    let policy = Policy {
        base,
        other_images: args.allow_image.iter().map(|i| i.trim().to_owned()).filter(|i| !i.is_empty()).collect(),
        max_sandboxes: usize::try_from(args.max_sandboxes).unwrap_or(usize::MAX),
        idle_timeout: Duration::from_secs(args.idle_timeout),
        call_timeout: Duration::from_secs(args.call_timeout),
        max_output: usize::try_from(args.max_output).unwrap_or(usize::MAX),
    };
    // Every image the policy names is in the store before the first call: a call never pulls.
    let mut store = open_store()?;
    for image in policy.images() {
        image_for_run(&mut store, &image, args.sandbox.pull).await?;
    }
    drop(store);
    let token = match args.listen {
        Some(_) => Some(bearer_token(args.token_file.as_deref())?),
        None => None,
    };
    let launcher = SandboxLauncher::new(Box::new(|| open_store().map_err(|e| BackendError(format!("{e:#}")))));
    let sandboxes = Arc::new(Sandboxes::new(Arc::new(launcher), Arc::new(policy)));
    let mut signals = StopSignals::new()?;
    let stop = async move { signals.recv().await };
    match (args.listen, token) {
        (Some(address), Some(token)) => {
            let listener =
                tokio::net::TcpListener::bind(address).await.with_context(|| format!("cannot listen on {address}"))?;
            let local = listener.local_addr().context("cannot read the listening address")?;
            eprintln!("matchlock: MCP on http://{local}/mcp");
            Box::pin(matchlock_mcp::serve_http(listener, token, sandboxes, stop)).await?;
        }
        _ => Box::pin(matchlock_mcp::serve_stdio(sandboxes, stop)).await?,
    }
    Ok(0)
}

/// The token HTTP clients must present: from `file`, else `$MATCHLOCK_MCP_TOKEN`, else a
/// new random one (printed on stderr).
fn bearer_token(file: Option<&std::path::Path>) -> Result<String> {
    let token = match file {
        Some(path) => std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the token file {}", path.display()))?
            .trim()
            .to_owned(),
        None => match std::env::var("MATCHLOCK_MCP_TOKEN") {
            Ok(token) => token.trim().to_owned(),
            Err(_) => {
                let mut bytes = [0u8; 24];
                std::fs::File::open("/dev/urandom")
                    .and_then(|mut f| f.read_exact(&mut bytes))
                    .context("cannot read /dev/urandom")?;
                let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
                eprintln!("matchlock: MCP bearer token: {token}");
                token
            }
        },
    };
    if token.len() < 16 || !token.bytes().all(|b| b.is_ascii_graphic()) {
        bail!("the MCP bearer token must be at least 16 printable characters without spaces");
    }
    Ok(token)
}
