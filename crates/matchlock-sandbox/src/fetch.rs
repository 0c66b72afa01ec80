//! `ADD <url>` of `matchlock build`: the host fetches the file for the build, held to the
//! build's network policy as a `RUN` step's request would be. No network (`--no-network`):
//! nothing is fetched. The URL's host must pass the allow-list before its name is even
//! resolved; the name is resolved as the sandbox resolves it (the user's `--add-host`, else
//! the sandbox's name servers), and only addresses that pass the address check (never the
//! host itself, private ranges unless allowed) are dialled, with no proxy. Redirects are
//! followed here, each hop checked anew. The request carries no secret and no credentials.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use matchlock_api::SandboxConfig;
use matchlock_net::dns::{DnsError, Resolver};
use matchlock_net::policy::{Blocked, Policy};
use reqwest::header::{LAST_MODIFIED, LOCATION};
use reqwest::{StatusCode, Url};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use crate::network;

/// Redirects followed before giving up.
const MAX_REDIRECTS: usize = 10;
/// How long connecting to a server may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a server may stay silent mid-response.
const READ_TIMEOUT: Duration = Duration::from_secs(60);
/// How long one fetch (all its redirects and its body) may take.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// Why a URL was not fetched.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The build has no network.
    #[error("{url}: the build has no network (--no-network), so nothing is fetched")]
    NoNetwork {
        /// The URL.
        url: String,
    },
    /// The policy refuses the host or every address of it.
    #[error("{url}: refused by the build's network policy: {reason}")]
    Refused {
        /// The URL (the redirect hop refused).
        url: String,
        /// Why.
        reason: Blocked,
    },
    /// A URL this fetcher does not take (scheme, credentials, IPv6).
    #[error("{url}: {reason}")]
    Unsupported {
        /// The URL.
        url: String,
        /// Why.
        reason: String,
    },
    /// The host's name does not resolve.
    #[error("{url}: cannot resolve {host}")]
    Resolve {
        /// The URL.
        url: String,
        /// The name.
        host: String,
        /// Why.
        #[source]
        source: DnsError,
    },
    /// The server answered with an error or an unusable redirect.
    #[error("{url}: the server answered {status}")]
    Status {
        /// The URL.
        url: String,
        /// Its status.
        status: StatusCode,
    },
    /// Too many redirects.
    #[error("{url}: more than {MAX_REDIRECTS} redirects")]
    Redirects {
        /// The URL.
        url: String,
    },
    /// The file is larger than the bound.
    #[error("{url}: larger than {limit} bytes (the build's disk size)")]
    TooLarge {
        /// The URL.
        url: String,
        /// The bound.
        limit: u64,
    },
    /// The content is not what `--checksum` says.
    #[error("{url}: its content has sha256:{actual}, not the --checksum sha256:{expected}")]
    Checksum {
        /// The URL.
        url: String,
        /// `--checksum`.
        expected: String,
        /// What came.
        actual: String,
    },
    /// The fetch took too long.
    #[error("{url}: not fetched within {} s", FETCH_TIMEOUT.as_secs())]
    TimedOut {
        /// The URL.
        url: String,
    },
    /// The request or the response failed.
    #[error("{url}")]
    Http {
        /// The URL.
        url: String,
        /// Why.
        #[source]
        source: reqwest::Error,
    },
    /// The download cannot be kept.
    #[error("cannot keep a download in {}", path.display())]
    Io {
        /// Where.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The upstream TLS trust cannot be read.
    #[error("cannot set up TLS for fetches")]
    Tls(#[source] matchlock_net::NetError),
}

/// A fetched file.
#[derive(Debug)]
pub struct Fetched {
    /// Its bytes, in the directory given to [`fetch`].
    pub file: tempfile::NamedTempFile,
    /// sha256 of the bytes (hex).
    pub sha256: String,
    /// The response's `Last-Modified` (seconds since the epoch), or 0.
    pub mtime: u64,
}

/// Fetches `url` for a build whose step VMs have `config`, into a file in `dir`: at most
/// `limit` bytes, matching `checksum` (sha256 hex) if given.
pub async fn fetch(
    config: &SandboxConfig,
    url: &str,
    limit: u64,
    checksum: Option<&str>,
    dir: &Path,
) -> Result<Fetched, FetchError> {
    let Some(net) = &config.network else { return Err(FetchError::NoNetwork { url: url.to_owned() }) };
    let start = Url::parse(url).map_err(|e| unsupported(url, &format!("not a valid URL: {e}")))?;
    let hops = Hops {
        policy: network::policy(net, &config.add_hosts),
        resolver: Resolver::new(&config.dns_servers),
        add_hosts: &config.add_hosts,
        tls: {
            let mut tls = network::upstream_tls().map_err(FetchError::Tls)?;
            // This client speaks HTTP/1.1 only.
            tls.alpn_protocols = vec![b"http/1.1".to_vec()];
            tls
        },
    };
    match tokio::time::timeout(FETCH_TIMEOUT, hops.fetch(start, limit, checksum, dir)).await {
        Ok(fetched) => fetched,
        Err(_) => Err(FetchError::TimedOut { url: url.to_owned() }),
    }
}

fn unsupported(url: &str, reason: &str) -> FetchError {
    FetchError::Unsupported { url: url.to_owned(), reason: reason.to_owned() }
}

/// What every hop of a fetch is checked against and dialled with.
struct Hops<'a> {
    policy: Policy,
    resolver: Resolver,
    add_hosts: &'a [(String, IpAddr)],
    tls: rustls::ClientConfig,
}

impl Hops<'_> {
    async fn fetch(&self, mut url: Url, limit: u64, checksum: Option<&str>, dir: &Path) -> Result<Fetched, FetchError> {
        for _ in 0..=MAX_REDIRECTS {
            let http = |source| FetchError::Http { url: url.to_string(), source };
            let (host, addrs) = self.addresses(&url).await?;
            let client = reqwest::Client::builder()
                .no_proxy()
                .redirect(reqwest::redirect::Policy::none())
                .referer(false)
                .dns_resolver(Arc::new(Checked { host, addrs }))
                .tls_backend_preconfigured(self.tls.clone())
                .connect_timeout(CONNECT_TIMEOUT)
                .read_timeout(READ_TIMEOUT)
                .user_agent(concat!("matchlock-build/", env!("CARGO_PKG_VERSION")))
                .build()
                .map_err(http)?;
            let response = client.get(url.clone()).send().await.map_err(http)?;
            let status = response.status();
            if status.is_success() {
                return save(&url, response, limit, checksum, dir).await;
            }
            let location = response.headers().get(LOCATION).and_then(|l| l.to_str().ok());
            let next = location.and_then(|l| url.join(l).ok());
            let followed = [301, 302, 303, 307, 308].contains(&status.as_u16());
            match next {
                Some(next) if followed => url = next,
                _ => return Err(FetchError::Status { url: url.to_string(), status }),
            }
        }
        Err(FetchError::Redirects { url: url.to_string() })
    }

    /// The host of `url` and the addresses it may be fetched from, or why none.
    async fn addresses(&self, url: &Url) -> Result<(String, Vec<SocketAddr>), FetchError> {
        let shown = url.as_str();
        if !matches!(url.scheme(), "http" | "https") {
            return Err(unsupported(shown, "only http:// and https:// URLs are fetched"));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(unsupported(shown, "credentials in a URL are not supported"));
        }
        let host = match url.host_str() {
            None => return Err(unsupported(shown, "the URL names no host")),
            Some(h) if h.starts_with('[') => return Err(unsupported(shown, "IPv6 is not spoken by builds")),
            // One trailing dot is the same name, as for a guest's request.
            Some(h) => h.strip_suffix('.').unwrap_or(h).to_ascii_lowercase(),
        };
        let refused = |reason| FetchError::Refused { url: shown.to_owned(), reason };
        self.policy.check_host(&host).map_err(refused)?;
        let pinned: Vec<_> = network::pinned(self.add_hosts)
            .filter(|(name, _)| name.eq_ignore_ascii_case(&host))
            .map(|(_, ip)| ip)
            .collect();
        let ips = if pinned.is_empty() {
            self.resolver.lookup_ipv4(&host).await.map_err(|source| FetchError::Resolve {
                url: shown.to_owned(),
                host: host.clone(),
                source,
            })?
        } else {
            pinned
        };
        let port = url.port_or_known_default().unwrap_or(80);
        let mut refusal = None;
        let mut addrs = Vec::new();
        for ip in ips {
            match self.policy.check_address(ip) {
                Ok(()) => addrs.push(SocketAddr::from((ip, port))),
                Err(e) => {
                    refusal.get_or_insert(e);
                }
            }
        }
        if addrs.is_empty() {
            return Err(refused(refusal.unwrap_or(Blocked::NotAllowed(host))));
        }
        Ok((host, addrs))
    }
}

/// The client's resolver: the checked addresses of the one checked name, nothing else.
struct Checked {
    host: String,
    addrs: Vec<SocketAddr>,
}

impl reqwest::dns::Resolve for Checked {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let name = name.as_str();
        let known = name.strip_suffix('.').unwrap_or(name).eq_ignore_ascii_case(&self.host);
        let addrs = self.addrs.clone();
        Box::pin(async move {
            if known {
                Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
            } else {
                Err("not the name the policy checked".into())
            }
        })
    }
}

/// Writes the body of `response` to a new file in `dir`, bounded by `limit`, checked
/// against `checksum`.
async fn save(
    url: &Url,
    mut response: reqwest::Response,
    limit: u64,
    checksum: Option<&str>,
    dir: &Path,
) -> Result<Fetched, FetchError> {
    let too_large = || FetchError::TooLarge { url: url.to_string(), limit };
    if response.content_length().is_some_and(|n| n > limit) {
        return Err(too_large());
    }
    let mtime = response
        .headers()
        .get(LAST_MODIFIED)
        .and_then(|v| httpdate::parse_http_date(v.to_str().ok()?).ok())
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs());
    let (dir, within) = (dir.to_owned(), dir.to_owned());
    let (file, out) = tokio::task::spawn_blocking(move || {
        let file = tempfile::NamedTempFile::new_in(&within)?;
        let out = file.reopen()?;
        Ok((file, out))
    })
    .await
    .expect("creating a file does not panic")
    .map_err(|source| FetchError::Io { path: dir, source })?;
    let io_err = |source| FetchError::Io { path: file.path().to_owned(), source };
    let mut out = tokio::fs::File::from_std(out);
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    while let Some(chunk) =
        response.chunk().await.map_err(|source| FetchError::Http { url: url.to_string(), source })?
    {
        size += chunk.len() as u64;
        if size > limit {
            return Err(too_large());
        }
        hasher.update(&chunk);
        out.write_all(&chunk).await.map_err(io_err)?;
    }
    out.flush().await.map_err(io_err)?;
    let sha256 = hex::encode(hasher.finalize());
    if let Some(expected) = checksum.filter(|c| *c != sha256) {
        return Err(FetchError::Checksum { url: url.to_string(), expected: expected.to_owned(), actual: sha256 });
    }
    Ok(Fetched { file, sha256, mtime })
}
