//! The egress audit's records: what the host did with each HTTP request, TCP flow, UDP
//! exchange and DNS question of a sandbox, as JSON lines in `<vm dir>/audit.jsonl` (the older
//! half in `audit.1.jsonl`). Never a secret value, a body or a query value.

use std::io::BufRead;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Default bound on a sandbox's audit files together (`--audit-max-size`).
pub const DEFAULT_AUDIT_MAX_BYTES: u64 = 16 << 20;
/// Longest path kept in a record (longer ones are cut, marked with `…`).
pub const MAX_AUDIT_PATH: usize = 1024;

/// What a record is about.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// An HTTP request through interception (HTTPS too: `tls_intercepted`).
    #[default]
    Http,
    /// A TCP flow the host did not intercept (spliced, or refused).
    Tcp,
    /// A UDP exchange (other than DNS).
    Udp,
    /// A DNS question of the guest.
    Dns,
    /// Records lost because the writer fell behind: `count` since the sandbox started.
    Dropped,
    /// Records rotated out of the files to keep their bound: `count` since the start.
    Rotated,
}

/// What the host decided.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Decision {
    /// It went out (whatever the upstream answered).
    #[default]
    Allowed,
    /// The host refused it.
    Blocked,
}

/// One audit record.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Record {
    /// When it started, Unix milliseconds.
    pub time_ms: u64,
    /// What it is about.
    pub kind: Kind,
    /// The host name (the request's, the TLS name, the DNS question's, or the name the
    /// sandbox's DNS answered for the address), else the address.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub host: String,
    /// The destination address, when it differs from `host`.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub addr: String,
    /// The TLS server name a flow not intercepted asked for in its ClientHello, if any.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub sni: String,
    /// The destination port.
    #[serde(skip_serializing_if = "is_zero_u16")]
    pub port: u16,
    /// `http` or `https` (HTTP records).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub scheme: String,
    /// The request method (HTTP records).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub method: String,
    /// The request path; a query keeps its parameter names only (`?a=&b=`).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub path: String,
    /// The guest's HTTP version (`HTTP/1.1`, `HTTP/2.0`; HTTP records).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub http_version: String,
    /// The status the guest got (HTTP records).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// Whether the host terminated the guest's TLS to see the request.
    #[serde(skip_serializing_if = "is_false")]
    pub tls_intercepted: bool,
    /// Bytes the guest sent (HTTP: the request body as forwarded).
    pub bytes_up: u64,
    /// Bytes the guest received (HTTP: the response body as delivered).
    pub bytes_down: u64,
    /// How long it lasted, ms.
    pub duration_ms: u64,
    /// Allowed or blocked.
    pub decision: Decision,
    /// Why it was blocked (or what answered for it).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub reason: String,
    /// The secrets substituted into the request, by name.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<String>,
    /// The DNS question's type (`A`, `AAAA`, …).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub query_type: String,
    /// The DNS answer's code (`NOERROR`, `NXDOMAIN`, `REFUSED`, …).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub answer: String,
    /// With `--audit-bodies`: the first bytes of the request body as the guest sent it
    /// (placeholders, never secret values), base64.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub request_body: String,
    /// With `--audit-bodies`: the first bytes of the response body as the guest got it
    /// (scrubbed), base64.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub response_body: String,
    /// A body was longer than what was kept of it.
    #[serde(skip_serializing_if = "is_false")]
    pub bodies_cut: bool,
    /// For `dropped` and `rotated` records: how many so far.
    #[serde(skip_serializing_if = "is_zero_u64")]
    pub count: u64,
}

fn is_zero_u16(v: &u16) -> bool {
    *v == 0
}

fn is_zero_u64(v: &u64) -> bool {
    *v == 0
}

fn is_false(v: &bool) -> bool {
    !*v
}

/// `path` as a record keeps it: query values removed (names kept), at most
/// [`MAX_AUDIT_PATH`] bytes.
pub fn audited_path(path: &str) -> String {
    let mut out = match path.split_once('?') {
        None => path.to_owned(),
        Some((base, query)) => {
            let names: Vec<&str> = query.split('&').map(|pair| pair.split('=').next().unwrap_or_default()).collect();
            format!("{base}?{}", names.iter().map(|n| format!("{n}=")).collect::<Vec<_>>().join("&"))
        }
    };
    if out.len() > MAX_AUDIT_PATH {
        let mut cut = MAX_AUDIT_PATH;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out.truncate(cut);
        out.push('…');
    }
    out
}

/// The audit file of a VM directory and its rotated older half.
pub fn files(audit_log: &Path) -> [PathBuf; 2] {
    [rotated_path(audit_log), audit_log.to_owned()]
}

/// Where the older half of `audit_log` goes when it is rotated.
pub fn rotated_path(audit_log: &Path) -> PathBuf {
    audit_log.with_extension("1.jsonl")
}

/// A sandbox's audit as read back.
#[derive(Debug, Default)]
pub struct Audit {
    /// The records kept, oldest first.
    pub records: Vec<Record>,
    /// Records lost because the writer fell behind.
    pub dropped: u64,
    /// Records rotated out to keep the bound.
    pub rotated: u64,
    /// Lines that did not parse (a record cut by a crash).
    pub unreadable: u64,
}

impl Audit {
    /// Reads `audit_log` (and its rotated half); missing files are an empty audit.
    pub fn read(audit_log: &Path) -> std::io::Result<Self> {
        let mut audit = Self::default();
        for path in files(audit_log) {
            let file = match std::fs::File::open(&path) {
                Ok(file) => file,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            for line in std::io::BufReader::new(file).split(b'\n') {
                audit.add_line(&line?);
            }
        }
        Ok(audit)
    }

    /// Takes one line of an audit file.
    pub fn add_line(&mut self, line: &[u8]) {
        if line.iter().all(u8::is_ascii_whitespace) {
            return;
        }
        match serde_json::from_slice::<Record>(line) {
            Ok(r) if r.kind == Kind::Dropped => self.dropped = self.dropped.max(r.count),
            Ok(r) if r.kind == Kind::Rotated => self.rotated = self.rotated.max(r.count),
            Ok(r) => self.records.push(r),
            Err(_) => self.unreadable += 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_keep_query_names_only_and_are_bounded() {
        assert_eq!(audited_path("/v1/chat?key=s3cret&model=gpt"), "/v1/chat?key=&model=");
        assert_eq!(audited_path("/plain"), "/plain");
        assert_eq!(audited_path("/x?flag"), "/x?flag=");
        let long = format!("/{}", "é".repeat(MAX_AUDIT_PATH));
        let cut = audited_path(&long);
        assert!(cut.len() <= MAX_AUDIT_PATH + '…'.len_utf8() && cut.ends_with('…'));
    }

    #[test]
    fn reading_takes_the_counts_and_skips_a_cut_line() {
        let dir = std::env::temp_dir().join(format!("ml-audit-read-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("audit.jsonl");
        std::fs::write(rotated_path(&log), "{\"kind\":\"dns\",\"host\":\"a.test\",\"decision\":\"blocked\"}\n")
            .unwrap();
        std::fs::write(
            &log,
            "{\"kind\":\"rotated\",\"count\":7}\n{\"kind\":\"tcp\",\"port\":22,\"bytes_up\":3}\n{\"kind\":\"dropped\",\"count\":2}\n{\"kind\":\"ht",
        )
        .unwrap();
        let audit = Audit::read(&log).unwrap();
        assert_eq!((audit.rotated, audit.dropped, audit.unreadable), (7, 2, 1));
        assert_eq!(audit.records.len(), 2);
        assert_eq!((audit.records[0].kind, audit.records[0].decision), (Kind::Dns, Decision::Blocked));
        assert_eq!((audit.records[1].port, audit.records[1].bytes_up), (22, 3));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
