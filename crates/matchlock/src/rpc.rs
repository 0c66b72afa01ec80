//! `matchlock rpc`: the JSON-RPC API (`matchlock-rpc`) on stdin/stdout, with this program's
//! image store (images are pulled when missing) and its stop signals.

use std::future::Future;
use std::pin::Pin;

use anyhow::Result;
use matchlock_image::Store;
use matchlock_rpc::{BoxError, ImageSource};

use crate::images::{image_for_run, open_store};
use crate::session::StopSignals;

/// Serves one session until stdin ends, `close`, or SIGINT/SIGTERM/SIGHUP.
pub(crate) async fn serve() -> Result<u8> {
    let mut signals = StopSignals::new()?;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let watcher = tokio::spawn(async move {
        signals.recv().await;
        let _ = stop.send(true);
    });
    let served = Box::pin(matchlock_rpc::serve(tokio::io::stdin(), tokio::io::stdout(), stopped, CliImages)).await;
    watcher.abort();
    served?;
    Ok(0)
}

/// The CLI's image store, pulling what `create` names when it is missing.
struct CliImages;

impl ImageSource for CliImages {
    fn store_with<'a>(&'a self, reference: &'a str) -> Pin<Box<dyn Future<Output = Result<Store, BoxError>> + 'a>> {
        Box::pin(async move {
            let mut store = open_store()?;
            image_for_run(&mut store, reference, false).await?;
            Ok(store)
        })
    }
}
