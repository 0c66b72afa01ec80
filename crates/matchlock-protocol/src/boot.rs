//! Boot parameters the host passes to guest-init on the kernel command line.

use std::net::IpAddr;

/// What guest-init needs to assemble the root filesystem and name the machine.
#[derive(Debug, Clone, PartialEq)]
pub struct BootParams {
    /// Hostname (also written to /etc/hostname and /etc/hosts).
    pub hostname: String,
    /// Name servers for /etc/resolv.conf.
    pub dns: Vec<IpAddr>,
    /// CPU quota in CPUs; a fraction becomes the cgroup `cpu.max` of the workload.
    pub cpus: f64,
    /// Block devices holding the image layers, bottom layer first (e.g. `vdb`).
    pub lowers: Vec<String>,
    /// Block device of the writable upper disk.
    pub upper: String,
    /// Extra /etc/hosts entries: (host, ip).
    pub add_hosts: Vec<(String, IpAddr)>,
    /// Host wall clock at launch, in milliseconds since the Unix epoch.
    pub epoch_ms: u64,
    /// Run commands without the capability drop, no_new_privs and seccomp filter.
    pub privileged: bool,
    /// Extra ext4 disks to mount: (device, absolute guest path, read-only).
    pub disks: Vec<(String, String, bool)>,
    /// Where the host-served workspace file system is mounted (FUSE over vsock).
    pub workspace: Option<String>,
    /// `/tmp` stays on the root file system (commits see it, as a Dockerfile `RUN`
    /// expects) instead of a tmpfs.
    pub image_tmp: bool,
}

/// What a VM resumed from a snapshot or a warm template learns about the sandbox it now
/// is, before any command runs.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Restored {
    /// The new sandbox's hostname (validated by the guest: [`is_valid_hostname`]).
    pub hostname: String,
    /// Host wall clock now, in milliseconds since the Unix epoch.
    pub epoch_ms: u64,
    /// Host entropy mixed into the guest's pool before its RNG is reseeded, so that
    /// machines restored from one snapshot draw different numbers.
    pub entropy: Vec<u8>,
    /// The new sandbox's CA (PEM), when its network intercepts TLS.
    pub ca_pem: Option<String>,
    /// Name servers for /etc/resolv.conf (at most [`MAX_RESTORED_ENTRIES`]).
    pub dns: Vec<IpAddr>,
    /// Extra /etc/hosts entries: (host, ip) (at most [`MAX_RESTORED_ENTRIES`]).
    pub add_hosts: Vec<(String, IpAddr)>,
    /// Where the workspace is mounted, if the sandbox has one (mounted now unless the
    /// saved machine already had it there).
    pub workspace: Option<String>,
}

/// At most this many name servers and /etc/hosts entries in a [`Restored`] message.
pub const MAX_RESTORED_ENTRIES: usize = 256;

impl Restored {
    /// Checks what the guest will write into its files and mount table: valid names and
    /// paths, bounded lists.
    pub fn validate(&self) -> Result<(), String> {
        if !is_valid_hostname(&self.hostname) {
            return Err(format!("invalid hostname {:?}", self.hostname));
        }
        if self.dns.len() > MAX_RESTORED_ENTRIES || self.add_hosts.len() > MAX_RESTORED_ENTRIES {
            return Err(format!("more than {MAX_RESTORED_ENTRIES} name servers or hosts entries"));
        }
        if let Some((host, _)) = self.add_hosts.iter().find(|(host, _)| !is_valid_hostname(host)) {
            return Err(format!("invalid hosts entry {host:?}"));
        }
        match &self.workspace {
            Some(path) if !is_valid_mount_path(path) => Err(format!("invalid workspace path {path:?}")),
            _ => Ok(()),
        }
    }
}

/// Bytes of host entropy in [`Restored::entropy`] (the guest takes at most this many).
pub const RESTORED_ENTROPY: usize = 64;

/// Whether `path` can be a mount point given on the kernel command line: absolute,
/// normalised, not `/`, and free of spaces, commas and control characters.
pub fn is_valid_mount_path(path: &str) -> bool {
    path.starts_with('/')
        && path.len() > 1
        && path.len() <= 256
        && !path.ends_with('/')
        && path.split('/').skip(1).all(|c| !c.is_empty() && c != "." && c != "..")
        && path.bytes().all(|b| b.is_ascii_graphic() && b != b',')
}

/// Errors parsing boot parameters.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BootParamsError {
    /// A required parameter is missing.
    #[error("missing boot parameter matchlock.{0}")]
    Missing(&'static str),
    /// A parameter has a value that does not parse or is out of range.
    #[error("invalid boot parameter matchlock.{0}={1:?}")]
    Invalid(&'static str, String),
}

/// Whether `name` is a valid hostname (RFC 1123 labels).
pub fn is_valid_hostname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

fn is_valid_device(name: &str) -> bool {
    name.len() >= 3 && name.starts_with("vd") && name[2..].bytes().all(|b| b.is_ascii_lowercase())
}

/// Whether a kernel command line asks for privileged commands.
pub fn is_privileged(cmdline: &str) -> bool {
    cmdline.split_ascii_whitespace().any(|w| w == "matchlock.privileged=1")
}

impl BootParams {
    /// Renders the parameters as kernel command-line words.
    pub fn to_cmdline(&self) -> String {
        let dns: Vec<String> = self.dns.iter().map(IpAddr::to_string).collect();
        let mut words = vec![
            format!("matchlock.hostname={}", self.hostname),
            format!("matchlock.dns={}", dns.join(",")),
            format!("matchlock.cpus={}", self.cpus),
            format!("matchlock.lower={}", self.lowers.join(",")),
            format!("matchlock.upper={}", self.upper),
            format!("matchlock.epoch_ms={}", self.epoch_ms),
        ];
        for (host, ip) in &self.add_hosts {
            words.push(format!("matchlock.add_host={host},{ip}"));
        }
        if self.privileged {
            words.push("matchlock.privileged=1".to_owned());
        }
        for (dev, path, ro) in &self.disks {
            words.push(format!("matchlock.disk.{dev}={path}{}", if *ro { ",ro" } else { "" }));
        }
        if let Some(workspace) = &self.workspace {
            words.push(format!("matchlock.workspace={workspace}"));
        }
        if self.image_tmp {
            words.push("matchlock.image_tmp=1".to_owned());
        }
        words.join(" ")
    }

    /// Parses the `matchlock.*` words of a kernel command line; other words are ignored.
    pub fn from_cmdline(cmdline: &str) -> Result<Self, BootParamsError> {
        let mut hostname = None;
        let mut dns = None;
        let mut cpus = None;
        let mut lowers = None;
        let mut upper = None;
        let mut epoch_ms = None;
        let mut add_hosts = Vec::new();
        let mut privileged = false;
        let mut disks = Vec::new();
        let mut workspace = None;
        let mut image_tmp = false;
        for word in cmdline.split_ascii_whitespace() {
            let Some((key, value)) = word.strip_prefix("matchlock.").and_then(|w| w.split_once('=')) else {
                continue;
            };
            let invalid = |k: &'static str| BootParamsError::Invalid(k, value.to_owned());
            match key {
                "hostname" if is_valid_hostname(value) => hostname = Some(value.to_owned()),
                "hostname" => return Err(invalid("hostname")),
                "dns" => {
                    let parsed: Result<Vec<IpAddr>, _> =
                        value.split(',').filter(|s| !s.is_empty()).map(str::parse).collect();
                    dns = Some(parsed.map_err(|_| invalid("dns"))?);
                }
                "cpus" => match value.parse::<f64>() {
                    Ok(c) if c.is_finite() && c > 0.0 => cpus = Some(c),
                    _ => return Err(invalid("cpus")),
                },
                "lower" => {
                    let devs: Vec<String> = value.split(',').map(str::to_owned).collect();
                    if !devs.iter().all(|d| is_valid_device(d)) {
                        return Err(invalid("lower"));
                    }
                    lowers = Some(devs);
                }
                "upper" if is_valid_device(value) => upper = Some(value.to_owned()),
                "upper" => return Err(invalid("upper")),
                "epoch_ms" => epoch_ms = Some(value.parse().map_err(|_| invalid("epoch_ms"))?),
                "add_host" => {
                    let (host, ip) = value.split_once(',').ok_or_else(|| invalid("add_host"))?;
                    let ip = ip.parse().map_err(|_| invalid("add_host"))?;
                    if !is_valid_hostname(host) {
                        return Err(invalid("add_host"));
                    }
                    add_hosts.push((host.to_owned(), ip));
                }
                "privileged" => privileged = value == "1",
                "image_tmp" => image_tmp = value == "1",
                "workspace" if is_valid_mount_path(value) => workspace = Some(value.to_owned()),
                "workspace" => return Err(invalid("workspace")),
                _ if key.starts_with("disk.") => {
                    let dev = &key["disk.".len()..];
                    let (path, ro) = match value.strip_suffix(",ro") {
                        Some(p) => (p, true),
                        None => (value, false),
                    };
                    if !is_valid_device(dev) || !is_valid_mount_path(path) {
                        return Err(invalid("disk"));
                    }
                    disks.push((dev.to_owned(), path.to_owned(), ro));
                }
                _ => {}
            }
        }
        Ok(Self {
            hostname: hostname.ok_or(BootParamsError::Missing("hostname"))?,
            dns: dns.ok_or(BootParamsError::Missing("dns"))?,
            cpus: cpus.ok_or(BootParamsError::Missing("cpus"))?,
            lowers: lowers.ok_or(BootParamsError::Missing("lower"))?,
            upper: upper.ok_or(BootParamsError::Missing("upper"))?,
            add_hosts,
            epoch_ms: epoch_ms.ok_or(BootParamsError::Missing("epoch_ms"))?,
            privileged,
            disks,
            workspace,
            image_tmp,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn restored() -> Restored {
        Restored {
            hostname: "vm-1".into(),
            epoch_ms: 1,
            entropy: vec![0; RESTORED_ENTROPY],
            ca_pem: None,
            dns: vec!["10.0.0.1".parse().unwrap()],
            add_hosts: vec![("db".into(), "10.0.0.2".parse().unwrap())],
            workspace: Some("/workspace".into()),
        }
    }

    #[test]
    fn restored_messages_are_validated() {
        assert_eq!(restored().validate(), Ok(()));
        let bad = [
            Restored { hostname: "a b".into(), ..restored() },
            Restored { add_hosts: vec![("x\n1.2.3.4 evil".into(), "10.0.0.2".parse().unwrap())], ..restored() },
            Restored { workspace: Some("/a/../etc".into()), ..restored() },
            Restored { workspace: Some("/".into()), ..restored() },
            Restored { dns: vec!["10.0.0.1".parse().unwrap(); MAX_RESTORED_ENTRIES + 1], ..restored() },
        ];
        for message in bad {
            assert!(message.validate().is_err(), "{message:?}");
        }
    }

    fn sample() -> BootParams {
        BootParams {
            hostname: "vm-1234abcd".into(),
            dns: vec!["8.8.8.8".parse().unwrap(), "2001:4860:4860::8888".parse().unwrap()],
            cpus: 0.5,
            lowers: vec!["vdb".into(), "vdc".into()],
            upper: "vdd".into(),
            add_hosts: vec![("api.internal".into(), "10.0.0.10".parse().unwrap())],
            epoch_ms: 1_700_000_000_123,
            privileged: true,
            disks: vec![("vdd".into(), "/data".into(), false), ("vde".into(), "/ro".into(), true)],
            workspace: Some("/workspace".into()),
            image_tmp: true,
        }
    }

    #[test]
    fn round_trip_among_other_kernel_words() {
        let line = format!("console=ttyS0 quiet {} panic=-1", sample().to_cmdline());
        assert_eq!(BootParams::from_cmdline(&line).unwrap(), sample());
    }

    #[test]
    fn rejects_bad_values() {
        let good = sample().to_cmdline();
        for (from, to) in [
            ("matchlock.hostname=vm-1234abcd", "matchlock.hostname=bad_host!"),
            ("matchlock.cpus=0.5", "matchlock.cpus=0"),
            ("matchlock.cpus=0.5", "matchlock.cpus=NaN"),
            ("matchlock.upper=vdd", "matchlock.upper=../sda"),
            ("matchlock.lower=vdb,vdc", "matchlock.lower=vdb,sda"),
            ("matchlock.dns=8.8.8.8", "matchlock.dns=not-an-ip"),
            ("matchlock.disk.vdd=/data", "matchlock.disk.vdd=/data/../etc"),
            ("matchlock.disk.vdd=/data", "matchlock.disk.sda=/data"),
        ] {
            let line = good.replace(from, to);
            assert!(BootParams::from_cmdline(&line).is_err(), "{line}");
        }
        assert_eq!(BootParams::from_cmdline("console=ttyS0"), Err(BootParamsError::Missing("hostname")));
    }

    #[test]
    fn hostnames() {
        assert!(is_valid_hostname("override.internal"));
        assert!(!is_valid_hostname("-x"));
        assert!(!is_valid_hostname("a..b"));
        assert!(!is_valid_hostname(&"a".repeat(64)));
    }
}
