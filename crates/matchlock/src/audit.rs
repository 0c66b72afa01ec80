//! `matchlock audit`: a sandbox's egress audit ([`matchlock_api::audit`]) as a table or as
//! JSON lines, once or following new records; `matchlock limits`: its network budgets.

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use matchlock_api::audit::{rotated_path, Audit, Decision, Kind, Record};
use matchlock_api::paths::VmDir;
use matchlock_sandbox::open_state;

use crate::session::StopSignals;

/// Prints the audit of sandbox `id`: every record, or only refusals (`blocked`); with
/// `follow`, new records as they are written until Ctrl-C.
pub(crate) async fn show(id: &str, json: bool, blocked: bool, follow: bool) -> Result<u8> {
    let state = open_state()?;
    state.get(id)?.ok_or_else(|| anyhow!("VM not found {id}: VM {id} not found"))?;
    let path = VmDir::of(id).audit_log();
    // Where following starts: the current file as it is now.
    let mut position = std::fs::metadata(&path).ok().map(|m| (m.ino(), m.len()));
    let audit = Audit::read(&path).with_context(|| format!("cannot read the audit {}", path.display()))?;
    let mut out = std::io::stdout().lock();
    if !json {
        writeln!(
            out,
            "{:<23} {:<4} {:<32} {:<7} {:<28} {:>6} {:>9} {:>9} {:>6} {:<8} SECRETS / REASON",
            "TIME (UTC)", "KIND", "HOST:PORT", "METHOD", "PATH", "STATUS", "UP", "DOWN", "MS", "DECISION"
        )?;
    }
    let shown = |r: &Record| !blocked || r.decision == Decision::Blocked;
    for record in audit.records.iter().filter(|r| shown(r)) {
        print(&mut out, record, json)?;
    }
    out.flush()?;
    drop(out);
    if audit.rotated + audit.dropped + audit.unreadable > 0 {
        eprintln!(
            "matchlock: {} older record(s) rotated out to keep the audit's size bound, {} dropped (the writer fell \
             behind), {} unreadable",
            audit.rotated, audit.dropped, audit.unreadable
        );
    }
    if !follow {
        return Ok(0);
    }
    let mut signals = StopSignals::new()?;
    let mut pending = Vec::new();
    loop {
        tokio::select! {
            () = signals.recv() => return Ok(0),
            () = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
        let mut fresh = Audit::default();
        for line in read_new(&path, &mut position, &mut pending)? {
            fresh.add_line(&line);
        }
        let mut out = std::io::stdout().lock();
        for record in fresh.records.iter().filter(|r| shown(r)) {
            print(&mut out, record, json)?;
        }
        out.flush()?;
    }
}

/// Prints the HTTP(S) records of sandbox `id` (only refusals with `blocked`) as a HAR 1.2
/// document.
pub(crate) fn har(id: &str, blocked: bool) -> Result<u8> {
    let state = open_state()?;
    state.get(id)?.ok_or_else(|| anyhow!("VM not found {id}: VM {id} not found"))?;
    let path = VmDir::of(id).audit_log();
    let audit = Audit::read(&path).with_context(|| format!("cannot read the audit {}", path.display()))?;
    let entries: Vec<serde_json::Value> = audit
        .records
        .iter()
        .filter(|r| r.kind == Kind::Http && (!blocked || r.decision == Decision::Blocked))
        .map(har_entry)
        .collect();
    let document = serde_json::json!({"log": {
        "version": "1.2",
        "creator": {"name": "matchlock", "version": env!("CARGO_PKG_VERSION")},
        "pages": [],
        "entries": entries,
        "comment": format!("the egress audit of {id}: query values, bodies and header values are not recorded"),
    }});
    outln!("{}", serde_json::to_string_pretty(&document).unwrap_or_default())?;
    Ok(0)
}

/// One HTTP record as a HAR entry (what the audit does not keep is empty or -1, as HAR
/// says for unknown sizes).
fn har_entry(r: &Record) -> serde_json::Value {
    let default_port = if r.scheme == "https" { 443 } else { 80 };
    let authority =
        if r.port == default_port || r.port == 0 { r.host.clone() } else { format!("{}:{}", r.host, r.port) };
    let path = if r.path.is_empty() { "/" } else { r.path.as_str() };
    let query: Vec<serde_json::Value> = path
        .split_once('?')
        .map(|(_, q)| q.split('&').map(|p| serde_json::json!({"name": p.trim_end_matches('='), "value": ""})).collect())
        .unwrap_or_default();
    let started = format!(
        "{}.{:03}Z",
        matchlock_state::datetime(i64::try_from(r.time_ms / 1000).unwrap_or(0)).replace(' ', "T"),
        r.time_ms % 1000
    );
    let status_text = match r.decision {
        Decision::Blocked => format!("blocked by matchlock: {}", r.reason),
        Decision::Allowed => String::new(),
    };
    let mut entry = serde_json::json!({
        "startedDateTime": started,
        "time": r.duration_ms,
        "request": {
            "method": if r.method.is_empty() { "CONNECT" } else { r.method.as_str() },
            "url": format!("{}://{authority}{path}", if r.scheme.is_empty() { "http" } else { r.scheme.as_str() }),
            "httpVersion": r.http_version,
            "cookies": [],
            "headers": [],
            "queryString": query,
            "headersSize": -1,
            "bodySize": r.bytes_up,
        },
        "response": {
            "status": r.status.unwrap_or(0),
            "statusText": status_text,
            "httpVersion": r.http_version,
            "cookies": [],
            "headers": [],
            "content": {"size": r.bytes_down, "mimeType": ""},
            "redirectURL": "",
            "headersSize": -1,
            "bodySize": r.bytes_down,
        },
        "cache": {},
        "timings": {"send": 0, "wait": r.duration_ms, "receive": 0},
        "serverIPAddress": if r.addr.is_empty() { r.host.as_str() } else { r.addr.as_str() },
        "_matchlock": {"decision": r.decision, "reason": r.reason, "secrets": r.secrets, "tls_intercepted": r.tls_intercepted},
    });
    // What `--audit-bodies` kept: the response as HAR says binary content goes, the request
    // when it is text.
    if !r.response_body.is_empty() {
        entry["response"]["content"]["text"] = r.response_body.clone().into();
        entry["response"]["content"]["encoding"] = "base64".into();
    }
    use base64::Engine as _;
    let request_body = base64::engine::general_purpose::STANDARD.decode(&r.request_body).unwrap_or_default();
    if let Ok(text) = String::from_utf8(request_body) {
        if !text.is_empty() {
            entry["request"]["postData"] = serde_json::json!({"mimeType": "", "text": text});
        }
    }
    entry
}

/// Prints (and with `args`, first changes) the budgets of running sandbox `id` and what it
/// spent.
pub(crate) async fn limits(id: &str, args: &crate::run::LimitArgs, json: bool) -> Result<u8> {
    let dir = crate::vms::running_vm_dir(id)?;
    let mut reply = matchlock_sandbox::relay::limits(&dir, None).await?;
    if !args.is_empty() {
        let mut limits = reply.limits.clone();
        args.apply(&mut limits)?;
        reply = matchlock_sandbox::relay::limits(&dir, Some(&limits)).await?;
    }
    if let Some(error) = reply.error {
        anyhow::bail!("{error}");
    }
    if json {
        outln!("{}", serde_json::json!({"limits": reply.limits, "usage": reply.usage}))?;
        return Ok(0);
    }
    let (l, u) = (&reply.limits, &reply.usage);
    let of = |used: u64, max: Option<u64>| match max {
        Some(max) => format!("{used} of {max}"),
        None => format!("{used} (no limit)"),
    };
    outln!("egress bytes:  {}", of(u.egress_bytes, l.egress_bytes))?;
    outln!("ingress bytes: {}", of(u.ingress_bytes, l.ingress_bytes))?;
    outln!("requests:      {}", of(u.requests, l.max_requests))?;
    outln!("connections:   {}", of(u.connections, l.max_connections))?;
    for rate in &l.rate_limits {
        outln!("rate limit:    {} {} per {} s", rate.host, rate.requests, rate.seconds)?;
    }
    Ok(0)
}

/// The complete lines appended to the audit since `position` (its file's inode and the
/// offset read to); a rotation is followed into the new file after the rest of the old one.
fn read_new(path: &Path, position: &mut Option<(u64, u64)>, pending: &mut Vec<u8>) -> Result<Vec<Vec<u8>>> {
    let Ok(meta) = std::fs::metadata(path) else { return Ok(Vec::new()) };
    let mut bytes = Vec::new();
    match *position {
        Some((inode, offset)) if inode != meta.ino() => {
            // Rotated: the rest of the old file, now the older half, then the new one.
            if let Ok(mut old) = std::fs::File::open(rotated_path(path)) {
                if old.metadata()?.ino() == inode {
                    old.seek(SeekFrom::Start(offset))?;
                    old.read_to_end(&mut bytes)?;
                }
            }
            *position = Some((meta.ino(), 0));
        }
        None => *position = Some((meta.ino(), 0)),
        Some(_) => {}
    }
    let (inode, offset) = position.expect("set above");
    let mut file = std::fs::File::open(path)?;
    file.seek(SeekFrom::Start(offset))?;
    let read = file.read_to_end(&mut bytes)?;
    *position = Some((inode, offset + read as u64));
    pending.extend_from_slice(&bytes);
    // Only whole lines: the writer may be in the middle of one.
    let Some(end) = pending.iter().rposition(|b| *b == b'\n') else { return Ok(Vec::new()) };
    let rest = pending.split_off(end + 1);
    let lines = std::mem::replace(pending, rest).split(|b| *b == b'\n').map(<[u8]>::to_vec).collect();
    Ok(lines)
}

fn print(out: &mut impl Write, r: &Record, json: bool) -> std::io::Result<()> {
    if json {
        return writeln!(out, "{}", serde_json::to_string(r).unwrap_or_default());
    }
    let time = format!("{}.{:03}", matchlock_state::datetime((r.time_ms / 1000) as i64), r.time_ms % 1000);
    let kind = match r.kind {
        Kind::Http if r.tls_intercepted => "tls",
        Kind::Http => "http",
        Kind::Tcp => "tcp",
        Kind::Udp => "udp",
        Kind::Dns => "dns",
        Kind::Dropped | Kind::Rotated => return Ok(()),
    };
    let target = if r.port == 0 { r.host.clone() } else { format!("{}:{}", r.host, r.port) };
    let method = if r.kind == Kind::Dns { r.query_type.as_str() } else { r.method.as_str() };
    let status = match (r.status, r.kind) {
        (Some(status), _) => status.to_string(),
        (None, Kind::Dns) => r.answer.clone(),
        (None, _) => "-".to_owned(),
    };
    let decision = match r.decision {
        Decision::Allowed => "allowed",
        Decision::Blocked => "BLOCKED",
    };
    let detail = match (r.secrets.is_empty(), r.reason.is_empty()) {
        (false, true) => r.secrets.join(","),
        (false, false) => format!("{} ({})", r.secrets.join(","), r.reason),
        (true, _) => r.reason.clone(),
    };
    writeln!(
        out,
        "{time:<23} {kind:<4} {:<32} {method:<7} {:<28} {status:>6} {:>9} {:>9} {:>6} {decision:<8} {detail}",
        cut(&target, 32),
        cut(&r.path, 28),
        r.bytes_up,
        r.bytes_down,
        r.duration_ms
    )
}

/// `s` cut to `width` characters (marked with `…`) for a table column.
fn cut(s: &str, width: usize) -> String {
    if s.chars().count() <= width {
        return s.to_owned();
    }
    let mut cut: String = s.chars().take(width.saturating_sub(1)).collect();
    cut.push('…');
    cut
}
