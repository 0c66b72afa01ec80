//! The MCP server (`matchlock mcp`): tools an agent calls to run code and move files in
//! sandboxes, over stdio or Streamable HTTP (with a bearer token), under a [`Policy`] the
//! operator fixed at start. A thin adapter: the protocol is `rmcp`'s, the sandboxes are the
//! orchestration API's ([`backend::SandboxLauncher`]); the tools only choose among what the
//! policy allows. Every sandbox belongs to the server and is closed when the client goes
//! (stdio), the server stops, or it sat idle past the policy's timeout.

pub mod backend;
mod http;
pub mod policy;
pub mod sandboxes;
pub mod tools;

use std::future::Future;
use std::sync::Arc;

use rmcp::ServiceExt as _;
use tokio_util::sync::CancellationToken;

pub use crate::http::serve_http;
pub use crate::policy::{Policy, PolicyError};
pub use crate::sandboxes::Sandboxes;
pub use crate::tools::Tools;

/// Why serving stopped early.
#[derive(Debug, thiserror::Error)]
pub enum McpError {
    /// The MCP handshake failed.
    #[error("the MCP session could not start: {0}")]
    Handshake(String),
    /// The HTTP listener failed.
    #[error("cannot serve HTTP: {0}")]
    Http(#[source] std::io::Error),
}

/// Serves one MCP session on stdin/stdout until the client closes it or `stop` completes;
/// then closes every sandbox the session opened.
pub async fn serve_stdio(sandboxes: Arc<Sandboxes>, stop: impl Future<Output = ()>) -> Result<(), McpError> {
    let reaping = CancellationToken::new();
    let reaper = tokio::spawn({
        let sandboxes = sandboxes.clone();
        let stop = reaping.clone();
        async move { sandboxes.reap_idle(stop).await }
    });
    let served = async {
        let service = Tools::new(sandboxes.clone())
            .serve(rmcp::transport::stdio_pipes())
            .await
            .map_err(|e| McpError::Handshake(e.to_string()))?;
        if let Err(e) = service.waiting().await {
            tracing::warn!("the MCP session ended with an error: {e}");
        }
        Ok(())
    };
    let result = tokio::select! {
        result = served => result,
        () = stop => Ok(()),
    };
    reaping.cancel();
    let _ = reaper.await;
    sandboxes.close_all().await;
    result
}
