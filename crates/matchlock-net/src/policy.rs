//! Who the guest may talk to: the allow-list, private-address blocking, and secrets.
//!
//! Every decision is made on the host, on what the host actually dials: names are resolved here
//! and the resolved address is checked, so a name that resolves to a private address cannot be
//! used to reach one (no DNS-rebinding bypass).

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex, RwLock};

use matchlock_api::config::Secret;

/// Matches `host` against one allow-list glob (reference semantics, case-sensitive).
///
/// `*` matches everything; `*.x.com` matches names ending in `.x.com` (not `x.com` itself);
/// `x.*` matches names starting with `x.`; otherwise `*` matches any run of characters and a
/// pattern without `*` must equal the host.
pub fn glob_matches(pattern: &str, host: &str) -> bool {
    if pattern == "*" {
        return true;
    }
    if let Some(suffix) = pattern.strip_prefix('*') {
        if suffix.starts_with('.') && !suffix.contains('*') {
            return host.ends_with(suffix);
        }
    }
    if let Some(prefix) = pattern.strip_suffix('*') {
        if prefix.ends_with('.') && !prefix.contains('*') {
            return host.starts_with(prefix);
        }
    }
    wildcard_matches(pattern.as_bytes(), host.as_bytes())
}

/// `*` as "any run of bytes", everything else literal.
fn wildcard_matches(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut backtrack: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() && pattern[p] == b'*' {
            backtrack = Some((p, t));
            p += 1;
        } else if p < pattern.len() && pattern[p] == text[t] {
            p += 1;
            t += 1;
        } else if let Some((star, matched)) = backtrack {
            p = star + 1;
            t = matched + 1;
            backtrack = Some((star, matched + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&b| b == b'*')
}

/// Addresses no sandbox may reach whatever the configuration: the host itself and addresses
/// that are not a single remote host.
pub fn is_always_blocked(ip: Ipv4Addr) -> bool {
    ip.is_loopback() || ip.is_unspecified() || ip.is_broadcast() || ip.is_multicast() || ip.octets()[0] == 0
}

/// Whether `ip` is assigned to one of this host's own interfaces, read at the moment of the
/// check (interfaces come and go: a veth, a VPN, a new DHCP lease). If the host's addresses
/// cannot be read, every address counts as the host's: the check fails closed.
pub fn is_host_address(ip: Ipv4Addr) -> bool {
    match nix::ifaddrs::getifaddrs() {
        Ok(addresses) => addresses
            .filter_map(|interface| interface.address)
            .any(|address| address.as_sockaddr_in().is_some_and(|a| a.ip() == ip)),
        Err(_) => true,
    }
}

/// Private, link-local (incl. the 169.254.169.254 metadata service), CGNAT and other
/// non-public ranges, blocked when `block_private_ips` is on.
pub fn is_private(ip: Ipv4Addr) -> bool {
    let [a, b, ..] = ip.octets();
    ip.is_private()
        || ip.is_loopback()
        || ip.is_link_local()
        || (a == 100 && (64..128).contains(&b))
        || (a == 192 && b == 0 && ip.octets()[2] == 0)
        || (a == 198 && (b == 18 || b == 19))
        || a >= 240
}

/// Why a connection or request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Blocked {
    /// The host matches no allow-list pattern.
    #[error("host {0} is not in the allow-list")]
    NotAllowed(String),
    /// The destination address is private, loopback or otherwise reserved.
    #[error("address {0} is private or reserved")]
    PrivateAddress(Ipv4Addr),
    /// The destination is one of the host's own addresses.
    #[error("address {0} belongs to the host")]
    HostAddress(Ipv4Addr),
    /// A secret's placeholder was sent to a host the secret is not for.
    #[error("secret placeholder sent to unauthorized host")]
    SecretToUnauthorizedHost,
    /// A request rule blocked the request.
    #[error("blocked by rule {0}")]
    Rule(String),
}

/// Why a secret's value cannot be set at runtime.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SecretValueError {
    /// No secret of that name.
    #[error("the sandbox has no secret {0}")]
    Unknown(String),
    /// It already has another value.
    #[error("the secret {0} already has another value")]
    Conflict(String),
}

/// The network policy of one sandbox, shared by every connection and changed at runtime.
#[derive(Debug)]
pub struct Policy {
    allowed_hosts: RwLock<Vec<String>>,
    block_private_ips: bool,
    /// Replaced whole when a value arrives at runtime ([`Policy::set_secret_value`]).
    secrets: RwLock<Arc<Vec<Secret>>>,
    /// Addresses the sandbox's DNS answered for allowed names, for non-HTTP ports.
    resolved: Mutex<HashMap<Ipv4Addr, String>>,
    /// Name → address pairs the user configured for the guest (`--add-host`).
    pinned: Vec<(String, Ipv4Addr)>,
    /// Whether a `Range` request may carry a secret (`--allow-secret-ranges`).
    secret_ranges: bool,
}

/// Bound on remembered DNS answers.
const MAX_REMEMBERED_ADDRESSES: usize = 4096;

impl Policy {
    /// A policy; the hosts of `secrets` join the allow-list.
    pub fn new(allowed_hosts: Vec<String>, block_private_ips: bool, secrets: Vec<Secret>) -> Self {
        let mut hosts = Vec::new();
        for host in allowed_hosts.into_iter().chain(secrets.iter().flat_map(|s| s.hosts.iter().cloned())) {
            if !hosts.contains(&host) {
                hosts.push(host);
            }
        }
        Self {
            allowed_hosts: RwLock::new(hosts),
            block_private_ips,
            secrets: RwLock::new(Arc::new(secrets)),
            resolved: Mutex::new(HashMap::new()),
            pinned: Vec::new(),
            secret_ranges: false,
        }
    }

    /// The policy letting `Range` requests carry a secret, or not (the default).
    pub fn with_secret_ranges(mut self, allowed: bool) -> Self {
        self.secret_ranges = allowed;
        self
    }

    /// Whether a `Range` request may carry a secret.
    pub fn secret_ranges_allowed(&self) -> bool {
        self.secret_ranges
    }

    /// The policy with the user's own name → address entries (`--add-host`), which count as
    /// addresses of those names (names compared without case).
    pub fn with_pinned(mut self, pinned: impl IntoIterator<Item = (String, Ipv4Addr)>) -> Self {
        self.pinned = pinned.into_iter().map(|(name, ip)| (name.to_ascii_lowercase(), ip)).collect();
        self
    }

    /// The current allow-list.
    pub fn allowed_hosts(&self) -> Vec<String> {
        self.allowed_hosts.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Adds hosts; returns those that were not already present.
    pub fn add_hosts(&self, hosts: &[String]) -> Vec<String> {
        let mut list = self.allowed_hosts.write().unwrap_or_else(|e| e.into_inner());
        let mut added = Vec::new();
        for host in hosts {
            if !host.is_empty() && !list.contains(host) {
                list.push(host.clone());
                added.push(host.clone());
            }
        }
        added
    }

    /// Removes hosts; returns those that were present.
    pub fn remove_hosts(&self, hosts: &[String]) -> Vec<String> {
        let mut list = self.allowed_hosts.write().unwrap_or_else(|e| e.into_inner());
        let removed: Vec<String> = hosts.iter().filter(|h| list.contains(h)).cloned().collect();
        list.retain(|h| !removed.contains(h));
        removed
    }

    /// The secrets this sandbox may send: those with a value (a pod's secret has none until
    /// one of its containers brings it; its placeholder then goes out as it is).
    pub fn secrets(&self) -> Arc<Vec<Secret>> {
        let all = self.secrets.read().unwrap_or_else(|e| e.into_inner()).clone();
        if all.iter().all(|s| !s.value.is_empty()) {
            return all;
        }
        Arc::new(all.iter().filter(|s| !s.value.is_empty()).cloned().collect())
    }

    /// Gives the secret `name` its value, once: a later different value is refused (one
    /// placeholder stands for one value); the same value again is fine.
    pub fn set_secret_value(&self, name: &str, value: &str) -> Result<(), SecretValueError> {
        let mut current = self.secrets.write().unwrap_or_else(|e| e.into_inner());
        let Some(index) = current.iter().position(|s| s.name == name) else {
            return Err(SecretValueError::Unknown(name.to_owned()));
        };
        match current[index].value.as_str() {
            "" if !value.is_empty() => {
                let mut next = (**current).clone();
                next[index].value = value.to_owned();
                *current = Arc::new(next);
                Ok(())
            }
            v if v == value => Ok(()),
            _ => Err(SecretValueError::Conflict(name.to_owned())),
        }
    }

    /// Whether a host name (without port) passes the allow-list (empty list = all).
    pub fn host_allowed(&self, host: &str) -> bool {
        let list = self.allowed_hosts.read().unwrap_or_else(|e| e.into_inner());
        list.is_empty() || list.iter().any(|p| glob_matches(p, host))
    }

    /// Checks a host name against the allow-list.
    pub fn check_host(&self, host: &str) -> Result<(), Blocked> {
        if self.host_allowed(host) {
            Ok(())
        } else {
            Err(Blocked::NotAllowed(host.to_owned()))
        }
    }

    /// Checks an address about to be dialled: never the host itself (loopback or any address
    /// of its interfaces), never a non-unicast address, private ranges unless allowed.
    pub fn check_address(&self, ip: Ipv4Addr) -> Result<(), Blocked> {
        if is_always_blocked(ip) || (self.block_private_ips && is_private(ip)) {
            Err(Blocked::PrivateAddress(ip))
        } else if is_host_address(ip) {
            Err(Blocked::HostAddress(ip))
        } else {
            Ok(())
        }
    }

    /// Whether a name may be resolved for the guest: some allow-list pattern could match it.
    pub fn name_resolvable(&self, name: &str) -> bool {
        self.host_allowed(name)
    }

    /// Remembers that the sandbox's DNS answered `ip` for `name`.
    pub fn remember_answer(&self, ip: Ipv4Addr, name: &str) {
        let mut map = self.resolved.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= MAX_REMEMBERED_ADDRESSES && !map.contains_key(&ip) {
            map.clear();
        }
        map.insert(ip, name.to_owned());
    }

    /// Whether the sandbox's DNS answered `name` before (or the user pinned it).
    pub fn has_answered(&self, name: &str) -> bool {
        self.pinned.iter().any(|(n, _)| n == name)
            || self.resolved.lock().unwrap_or_else(|e| e.into_inner()).values().any(|n| n == name)
    }

    /// The name the sandbox's DNS last answered `ip` for (or the user pinned to it).
    pub fn name_of(&self, ip: Ipv4Addr) -> Option<String> {
        let answered = self.resolved.lock().unwrap_or_else(|e| e.into_inner()).get(&ip).cloned();
        answered.or_else(|| self.pinned.iter().find(|(_, p)| *p == ip).map(|(n, _)| n.clone()))
    }

    /// Whether the sandbox's DNS answered `ip` for `name`, or the user pinned `name` to `ip`.
    pub fn answered(&self, ip: Ipv4Addr, name: &str) -> bool {
        self.pinned.iter().any(|(n, p)| *p == ip && n == name)
            || self.resolved.lock().unwrap_or_else(|e| e.into_inner()).get(&ip).is_some_and(|n| n == name)
    }

    /// Non-HTTP TCP under interception: the address must be an allowed host's resolved address
    /// (or match the allow-list as a literal), and pass the address check.
    pub fn check_passthrough(&self, ip: Ipv4Addr) -> Result<(), Blocked> {
        self.check_address(ip)?;
        if self.host_allowed(&ip.to_string()) {
            return Ok(());
        }
        let name = self.resolved.lock().unwrap_or_else(|e| e.into_inner()).get(&ip).cloned();
        match name {
            Some(name) if self.host_allowed(&name) => Ok(()),
            _ => Err(Blocked::NotAllowed(ip.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_follow_the_reference() {
        assert!(glob_matches("*", "anything.example"));
        assert!(glob_matches("*.github.com", "api.github.com"));
        assert!(glob_matches("*.github.com", "a.b.github.com"));
        assert!(!glob_matches("*.github.com", "github.com"));
        assert!(!glob_matches("*.github.com", "evilgithub.com"));
        assert!(glob_matches("api.*", "api.openai.com"));
        assert!(!glob_matches("api.*", "apix.openai.com"));
        assert!(glob_matches("api-*.example.com", "api-eu.example.com"));
        assert!(glob_matches("a*b*c", "aXXbYYc"));
        assert!(!glob_matches("a*b*c", "aXXbYY"));
        assert!(glob_matches("example.com", "example.com"));
        assert!(!glob_matches("example.com", "www.example.com"));
        assert!(!glob_matches("Example.com", "example.com"));
    }

    #[test]
    fn private_ranges() {
        for ip in ["10.1.2.3", "172.16.0.1", "192.168.1.1", "127.0.0.1", "169.254.169.254", "100.64.0.1", "0.0.0.0"] {
            let ip: Ipv4Addr = ip.parse().unwrap();
            assert!(is_private(ip) || is_always_blocked(ip), "{ip}");
        }
        for ip in ["8.8.8.8", "198.51.100.10", "203.0.113.5", "172.32.0.1", "100.128.0.1"] {
            assert!(!is_private(ip.parse().unwrap()), "{ip}");
        }
    }

    #[test]
    fn allow_list_changes_and_secret_hosts_join() {
        let secret = Secret::new("K", "v", vec!["api.test".into()]);
        let policy = Policy::new(vec!["a.test".into()], true, vec![secret]);
        assert_eq!(policy.allowed_hosts(), ["a.test", "api.test"]);
        assert_eq!(policy.add_hosts(&["b.test".into(), "a.test".into()]), ["b.test"]);
        assert!(policy.host_allowed("b.test"));
        assert_eq!(policy.remove_hosts(&["b.test".into(), "zzz".into()]), ["b.test"]);
        assert!(!policy.host_allowed("b.test"));
        assert!(Policy::new(vec![], true, vec![]).host_allowed("whatever"));
    }

    #[test]
    fn passthrough_needs_an_allowed_answer_and_a_public_address() {
        let policy = Policy::new(vec!["db.test".into()], true, vec![]);
        let ip: Ipv4Addr = "198.51.100.7".parse().unwrap();
        assert!(policy.check_passthrough(ip).is_err());
        policy.remember_answer(ip, "db.test");
        assert!(policy.check_passthrough(ip).is_ok());
        policy.remember_answer("10.0.0.5".parse().unwrap(), "db.test");
        assert_eq!(
            policy.check_passthrough("10.0.0.5".parse().unwrap()),
            Err(Blocked::PrivateAddress("10.0.0.5".parse().unwrap()))
        );
        policy.remove_hosts(&["db.test".into()]);
        assert!(policy.check_passthrough(ip).is_ok(), "empty list allows all");
    }

    #[test]
    fn the_hosts_own_addresses_are_never_dialled() {
        let open = Policy::new(vec![], false, vec![]);
        let own: Vec<Ipv4Addr> = nix::ifaddrs::getifaddrs()
            .unwrap()
            .filter_map(|i| i.address?.as_sockaddr_in().map(|a| a.ip()))
            .filter(|ip| !ip.is_loopback())
            .collect();
        assert!(!own.is_empty(), "this host has a non-loopback address");
        for ip in own {
            assert_eq!(open.check_address(ip), Err(Blocked::HostAddress(ip)), "{ip}");
        }
        assert!(open.check_address("203.0.113.77".parse().unwrap()).is_ok(), "a remote address still passes");
    }
    #[test]
    fn a_secret_gets_its_value_once_and_only_valued_secrets_are_sent() {
        let pending = Secret::new("KEY", String::new(), vec!["api.test".into()]);
        let policy = Policy::new(vec![], true, vec![pending]);
        assert!(policy.secrets().is_empty(), "no value yet: nothing to substitute or scrub");
        assert_eq!(policy.set_secret_value("KEY", "v1"), Ok(()));
        assert_eq!(policy.secrets()[0].value, "v1");
        assert_eq!(policy.set_secret_value("KEY", "v1"), Ok(()));
        assert_eq!(policy.set_secret_value("KEY", "v2"), Err(SecretValueError::Conflict("KEY".into())));
        assert_eq!(policy.set_secret_value("OTHER", "x"), Err(SecretValueError::Unknown("OTHER".into())));
        assert_eq!(policy.secrets()[0].value, "v1");
    }
}
