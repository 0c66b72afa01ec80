//! What a sandbox is asked to be, and the parsers for the user's spellings of it.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// Default CPU count.
pub const DEFAULT_CPUS: f64 = 1.0;
/// Default guest memory in MB.
pub const DEFAULT_MEMORY_MB: u64 = 512;
/// Default size of the writable upper disk in MB.
pub const DEFAULT_DISK_SIZE_MB: u64 = 5120;
/// Default name servers.
pub const DEFAULT_DNS: [&str; 2] = ["8.8.8.8", "8.8.4.4"];

/// A sandbox: the image, the machine, and how its command runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SandboxConfig {
    /// Image reference, resolved in the local image store.
    pub image: String,
    /// CPUs; fractions are enforced with a cgroup quota in the guest.
    pub cpus: f64,
    /// Guest memory in MB.
    pub memory_mb: u64,
    /// Size of the writable upper disk in MB (sparse).
    pub disk_size_mb: u64,
    /// Hostname; the VM id when absent.
    pub hostname: Option<String>,
    /// Name servers for /etc/resolv.conf.
    pub dns_servers: Vec<IpAddr>,
    /// Extra /etc/hosts entries.
    pub add_hosts: Vec<(String, IpAddr)>,
    /// Environment over the image's ENV.
    pub env: BTreeMap<String, String>,
    /// User (`name`, `uid`, `uid:gid`); the image's USER when absent.
    pub user: Option<String>,
    /// Working directory; the image's WORKDIR, else `/`, when absent.
    pub workdir: Option<String>,
    /// Replacement ENTRYPOINT; `Some(vec![])` clears the image's.
    pub entrypoint: Option<Vec<String>>,
    /// Arguments (replace the image's CMD when non-empty).
    pub command: Vec<String>,
    /// Skip the in-guest hardening of commands (capability drop, no_new_privs, seccomp).
    #[serde(default)]
    pub privileged: bool,
    /// Extra ext4 disks (`--disk`).
    #[serde(default)]
    pub disks: Vec<DiskMount>,
}

/// An ext4 disk image mounted in the guest (`--disk source:/guest/path[:ro]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskMount {
    /// A host path to an ext4 image, or `@name` for a named volume.
    pub source: String,
    /// Absolute mount point in the guest.
    pub guest_path: String,
    /// Mount read-only.
    pub read_only: bool,
}

/// Errors in `--disk` specs.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid disk {0:?}: expected host_path:/guest/path[:ro] or @volume:/guest/path[:ro]")]
pub struct DiskSpecError(pub String);

/// Parses `--disk`: `host_path:/guest/path[:ro]` or `@volume:/guest/path[:ro]`.
pub fn parse_disk(spec: &str) -> Result<DiskMount, DiskSpecError> {
    let err = || DiskSpecError(spec.to_owned());
    let (rest, read_only) = match spec.strip_suffix(":ro") {
        Some(r) => (r, true),
        None => (spec, false),
    };
    let (source, guest) = rest.rsplit_once(':').ok_or_else(err)?;
    if source.is_empty() || !matchlock_protocol::boot::is_valid_mount_path(guest) {
        return Err(err());
    }
    if let Some(name) = source.strip_prefix('@') {
        if !is_valid_volume_name(name) {
            return Err(err());
        }
    }
    Ok(DiskMount { source: source.to_owned(), guest_path: guest.to_owned(), read_only })
}

/// Volume names: `^[a-zA-Z0-9][a-zA-Z0-9_.-]*$`, at most 128 characters.
pub fn is_valid_volume_name(name: &str) -> bool {
    name.len() <= 128
        && name.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
}

impl SandboxConfig {
    /// A configuration with the documented defaults for `image`.
    pub fn new(image: impl Into<String>) -> Self {
        Self {
            image: image.into(),
            cpus: DEFAULT_CPUS,
            memory_mb: DEFAULT_MEMORY_MB,
            disk_size_mb: DEFAULT_DISK_SIZE_MB,
            hostname: None,
            dns_servers: DEFAULT_DNS.iter().map(|s| s.parse().expect("valid default DNS")).collect(),
            add_hosts: Vec::new(),
            env: BTreeMap::new(),
            user: None,
            workdir: None,
            entrypoint: None,
            command: Vec::new(),
            privileged: false,
            disks: Vec::new(),
        }
    }
}

/// Errors in environment specs.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EnvError {
    /// `-e KEY` named a variable the host does not have.
    #[error("invalid environment variable: environment variable is not set ${0}")]
    NotSet(String),
    /// The key is empty or contains `=` or NUL.
    #[error("invalid environment variable: bad name {0:?}")]
    BadName(String),
    /// An env file line does not parse.
    #[error("invalid environment variable: {file}:{line}: {reason}")]
    BadLine {
        /// The file.
        file: String,
        /// 1-based line number.
        line: usize,
        /// Why.
        reason: String,
    },
}

/// Parses one `-e` value: `KEY=VALUE`, or `KEY` to take the host's value.
pub fn parse_env(spec: &str, host: impl Fn(&str) -> Option<String>) -> Result<(String, String), EnvError> {
    let (key, value) = match spec.split_once('=') {
        Some((k, v)) => (k, Some(v.to_owned())),
        None => (spec, None),
    };
    if key.is_empty() || key.contains('\0') || value.as_deref().is_some_and(|v| v.contains('\0')) {
        return Err(EnvError::BadName(key.to_owned()));
    }
    let value = match value {
        Some(v) => v,
        None => host(key).ok_or_else(|| EnvError::NotSet(key.to_owned()))?,
    };
    Ok((key.to_owned(), value))
}

/// Parses an env file: one `KEY=VALUE` or `KEY` per line; `#` comments and blank lines skipped.
pub fn parse_env_file(
    file: &str,
    contents: &str,
    host: impl Fn(&str) -> Option<String>,
) -> Result<Vec<(String, String)>, EnvError> {
    let mut out = Vec::new();
    for (i, raw) in contents.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        out.push(parse_env(line, &host).map_err(|e| match e {
            EnvError::NotSet(k) => EnvError::NotSet(k),
            other => EnvError::BadLine { file: file.to_owned(), line: i + 1, reason: other.to_string() },
        })?);
    }
    Ok(out)
}

/// Errors in `--add-host` specs.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid add-host mapping: {0:?} (expected host:ip)")]
pub struct AddHostError(pub String);

/// Parses `host:ip` (the IP may be IPv6: the split is on the first colon).
pub fn parse_add_host(spec: &str) -> Result<(String, IpAddr), AddHostError> {
    let err = || AddHostError(spec.to_owned());
    let (host, ip) = spec.split_once(':').ok_or_else(err)?;
    let ip: IpAddr = ip.parse().map_err(|_| err())?;
    let valid_host = !host.is_empty()
        && host.len() <= 253
        && host.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        && !host.starts_with(['-', '.']);
    if !valid_host {
        return Err(err());
    }
    Ok((host.to_owned(), ip))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(k: &str) -> Option<String> {
        (k == "FROM_HOST").then(|| "from-host".to_owned())
    }

    #[test]
    fn env_flags() {
        assert_eq!(parse_env("A=b=c", host), Ok(("A".into(), "b=c".into())));
        assert_eq!(parse_env("A=", host), Ok(("A".into(), String::new())));
        assert_eq!(parse_env("FROM_HOST", host), Ok(("FROM_HOST".into(), "from-host".into())));
        let err = parse_env("MISSING_VAR", host).unwrap_err();
        assert_eq!(err.to_string(), "invalid environment variable: environment variable is not set $MISSING_VAR");
        assert!(matches!(parse_env("=x", host), Err(EnvError::BadName(_))));
    }

    #[test]
    fn env_file() {
        let parsed = parse_env_file("f", "# comment\n\nFILE_ONLY=from-file\n  FROM_HOST  \n", host).unwrap();
        assert_eq!(parsed, vec![("FILE_ONLY".into(), "from-file".into()), ("FROM_HOST".into(), "from-host".into())]);
        assert_eq!(parse_env_file("f", "NOPE\n", host), Err(EnvError::NotSet("NOPE".into())));
    }

    #[test]
    fn disks() {
        assert_eq!(
            parse_disk("@cache:/cache"),
            Ok(DiskMount { source: "@cache".into(), guest_path: "/cache".into(), read_only: false })
        );
        assert!(parse_disk("/tmp/d.ext4:/data:ro").unwrap().read_only);
        for bad in ["@cache", "@-x:/a", "/x.ext4:relative", "/x.ext4:/a/../b", "/x.ext4:/", ":/a", "/x:/a b"] {
            assert!(parse_disk(bad).is_err(), "{bad}");
        }
        assert!(is_valid_volume_name("my.vol_1-x"));
        assert!(!is_valid_volume_name("../x"));
    }

    #[test]
    fn add_host() {
        assert_eq!(parse_add_host("api.internal:10.0.0.10"), Ok(("api.internal".into(), "10.0.0.10".parse().unwrap())));
        assert_eq!(parse_add_host("v6.internal:fd00::1").unwrap().1, "fd00::1".parse::<IpAddr>().unwrap());
        for bad in ["invalid-spec", "bad host:1.2.3.4", ":1.2.3.4", "h:999.1.1.1"] {
            let e = parse_add_host(bad).unwrap_err();
            assert!(e.to_string().starts_with("invalid add-host mapping"), "{bad}");
        }
    }
}
