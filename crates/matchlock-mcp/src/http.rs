//! MCP's Streamable HTTP transport (`rmcp`'s service) behind a bearer token.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower_service::Service as _;

use crate::{McpError, Sandboxes, Tools};

/// Whether `header` is `Bearer <token>`, compared in constant time.
fn authorized(header: Option<&http::HeaderValue>, token: &str) -> bool {
    let Some(given) = header.and_then(|h| h.as_bytes().strip_prefix(b"Bearer ")) else { return false };
    let expected = token.as_bytes();
    given.len() == expected.len() && given.iter().zip(expected).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

/// Serves MCP over HTTP on `listener` (path `/mcp`) to clients presenting `token`, until
/// `stop` completes; then closes every sandbox.
pub async fn serve_http(
    listener: TcpListener,
    token: String,
    sandboxes: Arc<Sandboxes>,
    stop: impl Future<Output = ()>,
) -> Result<(), McpError> {
    let local: SocketAddr = listener.local_addr().map_err(McpError::Http)?;
    let shutdown = CancellationToken::new();
    let mut config = StreamableHttpServerConfig::default();
    config.cancellation_token = shutdown.clone();
    config.allowed_hosts.push(local.ip().to_string());
    config.allowed_hosts.push(local.to_string());
    let tools = Tools::new(sandboxes.clone());
    let service =
        StreamableHttpService::new(move || Ok(tools.clone()), Arc::new(LocalSessionManager::default()), config);
    let token: Arc<str> = token.into();
    let reaper = tokio::spawn({
        let sandboxes = sandboxes.clone();
        let stop = shutdown.clone();
        async move { sandboxes.reap_idle(stop).await }
    });
    tokio::pin!(stop);
    let result = loop {
        let (stream, peer) = tokio::select! {
            () = &mut stop => break Ok(()),
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    tracing::warn!("cannot accept an MCP connection: {e}");
                    continue;
                }
            },
        };
        let service = service.clone();
        let token = token.clone();
        let handler = service_fn(move |request: http::Request<Incoming>| {
            let mut service = service.clone();
            let allowed = request.uri().path() == "/mcp" || request.uri().path().starts_with("/mcp/");
            let authorized = authorized(request.headers().get(http::header::AUTHORIZATION), &token);
            async move {
                if !allowed {
                    return Ok(plain(http::StatusCode::NOT_FOUND, "not found: MCP is served at /mcp\n"));
                }
                if !authorized {
                    let mut response = plain(http::StatusCode::UNAUTHORIZED, "a bearer token is required\n");
                    response
                        .headers_mut()
                        .insert(http::header::WWW_AUTHENTICATE, http::HeaderValue::from_static("Bearer"));
                    return Ok(response);
                }
                service.call(request).await
            }
        });
        tokio::spawn(async move {
            if let Err(e) =
                hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), handler).await
            {
                tracing::debug!(%peer, "MCP connection ended: {e}");
            }
        });
    };
    shutdown.cancel();
    let _ = reaper.await;
    sandboxes.close_all().await;
    result
}

fn plain(
    status: http::StatusCode,
    body: &'static str,
) -> http::Response<http_body_util::combinators::BoxBody<Bytes, std::convert::Infallible>> {
    let mut response = http::Response::new(Full::new(Bytes::from_static(body.as_bytes())).boxed());
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("text/plain; charset=utf-8"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_exact_bearer_token_is_authorized() {
        let header = |v: &str| http::HeaderValue::from_str(v).unwrap();
        assert!(authorized(Some(&header("Bearer s3cret")), "s3cret"));
        assert!(!authorized(Some(&header("Bearer s3cre")), "s3cret"));
        assert!(!authorized(Some(&header("Bearer s3cretX")), "s3cret"));
        assert!(!authorized(Some(&header("Basic s3cret")), "s3cret"));
        assert!(!authorized(None, "s3cret"));
    }
}
