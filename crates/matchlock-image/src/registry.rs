//! Pulling images from OCI distribution registries.
//!
//! Manifests and blobs come through `oci-client` (anonymous or bearer-token auth, with
//! basic credentials from `~/.docker/config.json` or its credential helpers). Every blob
//! is verified against its digest while it streams to a temporary file; a layer is
//! converted once per diff-id (under a per-layer lock) and then shared by every image
//! that contains it.

use std::time::Duration;

use oci_client::client::{linux_amd64_resolver, ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::manifest::OciDescriptor;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use tokio::io::AsyncWriteExt;

use crate::config::RawImageConfig;
use crate::store::{Store, StoreError};

/// Attempts per blob or manifest before giving up on transient failures.
const ATTEMPTS: u32 = 4;

/// Errors pulling an image.
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    /// The reference does not parse.
    #[error("invalid image reference {0:?}")]
    Reference(String),
    /// The registry refused our credentials (or wants some).
    #[error("authentication to {registry} failed: {detail} (credentials come from ~/.docker/config.json)")]
    Auth {
        /// The registry.
        registry: String,
        /// What it said.
        detail: String,
    },
    /// The registry has no such image.
    #[error("image not found in registry: {0}")]
    NotFound(String),
    /// A blob's bytes do not match its digest.
    #[error("registry sent corrupt data for {what}: {detail}")]
    Digest {
        /// Which blob.
        what: String,
        /// Expected and actual digests.
        detail: String,
    },
    /// Any other registry or transport failure.
    #[error("pulling {reference} failed")]
    Registry {
        /// The image.
        reference: String,
        /// Why.
        #[source]
        source: OciDistributionError,
    },
    /// The image config is unusable.
    #[error("invalid image config of {reference}: {detail}")]
    Config {
        /// The image.
        reference: String,
        /// Why.
        detail: String,
    },
    /// The local store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A temporary file failed.
    #[error("cannot write a temporary file")]
    Io(#[source] std::io::Error),
}

/// What a pull produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PullSummary {
    /// Normalised reference (`docker.io/library/alpine:latest`).
    pub reference: String,
    /// Manifest digest.
    pub digest: String,
    /// Uncompressed content size in bytes.
    pub size: u64,
    /// Number of layers.
    pub layers: usize,
}

/// Progress of a pull, for the CLI to render.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PullEvent {
    /// Layer `index` (1-based) of `total` is already stored.
    LayerCached {
        /// Layer number.
        index: usize,
        /// Layers in the image.
        total: usize,
    },
    /// Downloading layer `index`: `done` of `size` bytes.
    Downloading {
        /// Layer number.
        index: usize,
        /// Layers in the image.
        total: usize,
        /// Bytes so far.
        done: u64,
        /// Compressed size.
        size: u64,
    },
    /// Verifying and storing layer `index`.
    Converting {
        /// Layer number.
        index: usize,
        /// Layers in the image.
        total: usize,
    },
}

/// Parses a reference with Docker's defaults (`alpine` → `docker.io/library/alpine:latest`).
pub fn normalize(reference: &str) -> Result<Reference, PullError> {
    reference.parse::<Reference>().map_err(|_| PullError::Reference(reference.to_owned()))
}

fn host_of(registry: &str) -> &str {
    if let Some(rest) = registry.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    registry.rsplit_once(':').map_or(registry, |(h, _)| h)
}

/// Whether a registry may be reached over plain HTTP: loopback, or listed in
/// `MATCHLOCK_INSECURE_REGISTRIES` (comma-separated `host[:port]`).
pub fn is_insecure(registry: &str) -> bool {
    let host = host_of(registry);
    if matches!(host, "localhost" | "127.0.0.1" | "::1") {
        return true;
    }
    std::env::var("MATCHLOCK_INSECURE_REGISTRIES")
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .any(|r| !r.is_empty() && (r == registry || r == host))
}

/// The reference to contact: docker.io references go to `MATCHLOCK_REGISTRY_MIRROR` when set.
fn source_reference(reference: &Reference) -> Reference {
    match std::env::var("MATCHLOCK_REGISTRY_MIRROR") {
        Ok(mirror) if !mirror.is_empty() && reference.registry() == "docker.io" => {
            let mirror = mirror.trim_start_matches("http://").trim_start_matches("https://").trim_end_matches('/');
            match (reference.tag(), reference.digest()) {
                (_, Some(digest)) => {
                    Reference::with_digest(mirror.to_owned(), reference.repository().to_owned(), digest.to_owned())
                }
                (tag, None) => Reference::with_tag(
                    mirror.to_owned(),
                    reference.repository().to_owned(),
                    tag.unwrap_or("latest").to_owned(),
                ),
            }
        }
        _ => reference.clone(),
    }
}

/// Credentials for `registry` from the Docker config (or its credential helper).
fn credentials(registry: &str) -> RegistryAuth {
    let server = if registry == "docker.io" || registry == "index.docker.io" {
        "https://index.docker.io/v1/".to_owned()
    } else {
        registry.to_owned()
    };
    match docker_credential::get_credential(&server) {
        Ok(docker_credential::DockerCredential::UsernamePassword(user, password)) => {
            RegistryAuth::Basic(user, password)
        }
        Ok(docker_credential::DockerCredential::IdentityToken(token)) => RegistryAuth::Bearer(token),
        Err(_) => RegistryAuth::Anonymous,
    }
}

fn client_for(registry: &str) -> Client {
    let protocol = if is_insecure(registry) {
        ClientProtocol::HttpsExcept(vec![registry.to_owned()])
    } else {
        ClientProtocol::Https
    };
    Client::new(ClientConfig {
        protocol,
        platform_resolver: Some(Box::new(linux_amd64_resolver)),
        connect_timeout: Some(Duration::from_secs(10)),
        read_timeout: Some(Duration::from_secs(60)),
        user_agent: concat!("matchlock/", env!("CARGO_PKG_VERSION")),
        ..ClientConfig::default()
    })
}

/// Whether an error may go away on retry (5xx, timeouts, connection failures).
fn transient(e: &OciDistributionError) -> bool {
    match e {
        OciDistributionError::RequestError(r) => r.is_timeout() || r.is_connect() || r.is_request() || r.is_body(),
        OciDistributionError::ServerError { code, .. } => *code >= 500,
        OciDistributionError::IoError(_) => true,
        _ => false,
    }
}

/// What the registry said when it refused our credentials (or wanted some), if it did.
fn auth_refusal(e: &OciDistributionError) -> Option<String> {
    match e {
        OciDistributionError::AuthenticationFailure(detail) => Some(detail.clone()),
        OciDistributionError::UnauthorizedError { .. } => Some(e.to_string()),
        OciDistributionError::RegistryError { envelope, .. }
            if envelope.errors.iter().any(|r| format!("{:?}", r.code).contains("Unauthorized")) =>
        {
            Some(e.to_string())
        }
        _ => None,
    }
}

fn classify(reference: &str, registry: &str, e: OciDistributionError) -> PullError {
    if let Some(detail) = auth_refusal(&e) {
        return PullError::Auth { registry: registry.to_owned(), detail };
    }
    match &e {
        OciDistributionError::ImageManifestNotFoundError(_) => PullError::NotFound(reference.to_owned()),
        OciDistributionError::DigestError(d) => PullError::Digest { what: reference.to_owned(), detail: d.to_string() },
        OciDistributionError::RegistryError { envelope, .. }
            if envelope.errors.iter().any(|r| format!("{:?}", r.code).contains("Unknown")) =>
        {
            PullError::NotFound(reference.to_owned())
        }
        _ => PullError::Registry { reference: reference.to_owned(), source: e },
    }
}

async fn with_retries<T, F, Fut>(mut op: F) -> Result<T, OciDistributionError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, OciDistributionError>>,
{
    let mut delay = Duration::from_millis(250);
    for attempt in 1.. {
        match op().await {
            Err(e) if attempt < ATTEMPTS && transient(&e) => {
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
            other => return other,
        }
    }
    unreachable!("the loop returns on its last attempt")
}

/// Pulls `reference` into `store` under its normalised name (source `registry`), and
/// also under `alias` (source `tag`) when given. Layers already stored are not
/// downloaded again unless `force`.
pub async fn pull(
    store: &mut Store,
    reference: &str,
    alias: Option<&str>,
    force: bool,
    progress: &mut dyn FnMut(PullEvent),
) -> Result<PullSummary, PullError> {
    let wanted = normalize(reference)?;
    let name = wanted.whole();
    let source = source_reference(&wanted);
    let registry = source.resolve_registry().to_owned();
    let client = client_for(&registry);
    let auth = credentials(wanted.registry());
    let (manifest, digest, config_json) = with_retries(|| client.pull_manifest_and_config(&source, &auth))
        .await
        .map_err(|e| classify(&name, &registry, e))?;
    let raw: RawImageConfig = serde_json::from_str(&config_json)
        .map_err(|e| PullError::Config { reference: name.clone(), detail: e.to_string() })?;
    let diff_ids = raw.rootfs.diff_ids.clone();
    if diff_ids.len() != manifest.layers.len() {
        return Err(PullError::Config {
            reference: name,
            detail: format!("{} layers but {} diff-ids", manifest.layers.len(), diff_ids.len()),
        });
    }
    let _store_lock = store.lock(false)?;
    let total = diff_ids.len();
    let mut size = 0;
    for (i, (descriptor, diff_id)) in manifest.layers.iter().zip(&diff_ids).enumerate() {
        let index = i + 1;
        if !force {
            if let Some(s) = store.layer_size(diff_id)? {
                progress(PullEvent::LayerCached { index, total });
                size += s;
                continue;
            }
        }
        let download =
            tempfile::Builder::new().prefix(".download-").tempfile_in(store.tmp_dir()).map_err(PullError::Io)?;
        let mut delay = Duration::from_millis(250);
        for attempt in 1..=ATTEMPTS {
            match download_blob(&client, &source, descriptor, download.path(), index, total, progress).await {
                Ok(()) => break,
                Err(e) if attempt < ATTEMPTS && transient(&e) => {
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                }
                Err(e) => return Err(classify(&format!("{name} layer {index}"), &registry, e)),
            }
        }
        progress(PullEvent::Converting { index, total });
        size += store.add_layer(download, diff_id).map_err(|source| StoreError::Layer { index, total, source })?;
    }
    let rootfs = store.ensure_rootfs(&diff_ids)?;
    let config = raw.image_config();
    store.save(&name, "registry", &digest, &config, &diff_ids, size, &rootfs)?;
    if let Some(alias) = alias {
        let alias = crate::store::normalize_tag(alias)?;
        store.save(&alias, "tag", &digest, &config, &diff_ids, size, &rootfs)?;
    }
    Ok(PullSummary { reference: name, digest, size, layers: total })
}

async fn download_blob(
    client: &Client,
    reference: &Reference,
    descriptor: &OciDescriptor,
    to: &std::path::Path,
    index: usize,
    total: usize,
    progress: &mut dyn FnMut(PullEvent),
) -> Result<(), OciDistributionError> {
    let file = tokio::fs::File::create(to).await?;
    let size = u64::try_from(descriptor.size).unwrap_or(0);
    let mut writer =
        ProgressWriter { inner: tokio::io::BufWriter::new(file), done: 0, last: 0, size, index, total, progress };
    client.pull_blob(reference, descriptor, &mut writer).await?;
    writer.flush().await?;
    Ok(())
}

/// Counts bytes on their way to the file and reports progress every 1 MiB.
struct ProgressWriter<'a, W> {
    inner: W,
    done: u64,
    last: u64,
    size: u64,
    index: usize,
    total: usize,
    progress: &'a mut dyn FnMut(PullEvent),
}

impl<W: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for ProgressWriter<'_, W> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let this = &mut *self;
        let poll = std::pin::Pin::new(&mut this.inner).poll_write(cx, buf);
        if let std::task::Poll::Ready(Ok(n)) = &poll {
            this.done += *n as u64;
            if this.done - this.last >= 1 << 20 || this.done == this.size {
                this.last = this.done;
                (this.progress)(PullEvent::Downloading {
                    index: this.index,
                    total: this.total,
                    done: this.done,
                    size: this.size,
                });
            }
        }
        poll
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_hub_short_names() {
        assert_eq!(normalize("alpine").unwrap().whole(), "docker.io/library/alpine:latest");
        assert_eq!(normalize("python:3.12-alpine").unwrap().whole(), "docker.io/library/python:3.12-alpine");
        assert_eq!(normalize("localhost:5000/a/b:1").unwrap().whole(), "localhost:5000/a/b:1");
    }

    #[test]
    fn plain_http_only_for_loopback_and_listed_registries() {
        assert!(is_insecure("localhost:5000"));
        assert!(is_insecure("127.0.0.1:5000"));
        assert!(is_insecure("[::1]:5000"));
        assert!(!is_insecure("registry.example.com"));
        assert!(!is_insecure("index.docker.io"));
    }
}

/// Errors pushing an image.
#[derive(Debug, thiserror::Error)]
pub enum PushError {
    /// The local image does not exist.
    #[error("image not found: {0} (see `matchlock image ls`)")]
    NotFound(String),
    /// The target does not parse.
    #[error("invalid image reference {0:?}")]
    Reference(String),
    /// The registry refused our credentials (or wants some).
    #[error("authentication to {registry} failed: {detail} (credentials come from ~/.docker/config.json)")]
    Auth {
        /// The registry.
        registry: String,
        /// What it said.
        detail: String,
    },
    /// Any other registry or transport failure.
    #[error("pushing {reference} failed")]
    Registry {
        /// The target.
        reference: String,
        /// Why.
        #[source]
        source: OciDistributionError,
    },
    /// The local store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What a push sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushSummary {
    /// Normalised target reference.
    pub reference: String,
    /// Manifest URL the registry answered with.
    pub manifest_url: String,
    /// Number of layers.
    pub layers: usize,
}

/// Pushes the local image `local` to `target` (same TLS and credential rules as a pull):
/// each layer as an uncompressed OCI layer (its digest is its diff-id), the config, then an
/// OCI manifest. `progress` hears of each layer as it starts.
pub async fn push(
    store: &Store,
    local: &str,
    target: &str,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<PushSummary, PushError> {
    use futures_util::StreamExt;
    use oci_client::manifest::{OciImageManifest, OciManifest, IMAGE_CONFIG_MEDIA_TYPE, IMAGE_LAYER_MEDIA_TYPE};
    use sha2::Digest;

    let image = store.get(local)?.ok_or_else(|| PushError::NotFound(local.to_owned()))?;
    let diff_ids = store.diff_ids(&image.tag)?;
    let reference: Reference = target.parse().map_err(|_| PushError::Reference(target.to_owned()))?;
    let name = reference.whole();
    let registry = reference.resolve_registry().to_owned();
    let client = client_for(&registry);
    let failed = |e: OciDistributionError| match auth_refusal(&e) {
        Some(detail) => PushError::Auth { registry: registry.clone(), detail },
        None => PushError::Registry { reference: name.clone(), source: e },
    };
    client
        .auth(&reference, &credentials(reference.registry()), oci_client::RegistryOperation::Push)
        .await
        .map_err(failed)?;
    let total = diff_ids.len();
    let mut layers = Vec::with_capacity(total);
    for (i, diff_id) in diff_ids.iter().enumerate() {
        progress(i + 1, total);
        let (plain, size) = store.plain_layer(diff_id)?;
        let stream = tokio_util::io::ReaderStream::new(tokio::fs::File::from_std(plain))
            .map(|chunk| chunk.map_err(OciDistributionError::IoError));
        client.push_blob_stream(&reference, stream, diff_id, Some(size)).await.map_err(failed)?;
        layers.push(OciDescriptor {
            media_type: IMAGE_LAYER_MEDIA_TYPE.to_owned(),
            digest: diff_id.clone(),
            size: size as i64,
            ..OciDescriptor::default()
        });
    }
    let config = image.config.to_oci_json(&diff_ids);
    let config_digest = format!("sha256:{}", hex::encode(sha2::Sha256::digest(&config)));
    let config_size = config.len() as i64;
    client.push_blob(&reference, config, &config_digest).await.map_err(failed)?;
    let manifest = OciImageManifest {
        config: OciDescriptor {
            media_type: IMAGE_CONFIG_MEDIA_TYPE.to_owned(),
            digest: config_digest,
            size: config_size,
            ..OciDescriptor::default()
        },
        layers,
        ..OciImageManifest::default()
    };
    let manifest_url = client.push_manifest(&reference, &OciManifest::Image(manifest)).await.map_err(failed)?;
    Ok(PushSummary { reference: name, manifest_url, layers: total })
}
