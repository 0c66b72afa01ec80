//! What one egress-audit record costs (`bench/audit`): the request path's share (making the
//! record and queueing it) and the writer's (serializing and appending it), against the floor
//! of the same JSON lines written straight to a file, one `write` each, on the caller's thread.
//!
//! `audit_cost [records]`

use std::io::Write;
use std::time::{Duration, Instant};

use matchlock_api::audit::{Decision, Kind, Record};
use matchlock_net::audit::Audit;

fn record(i: usize) -> Record {
    Record {
        // Set, so that the audit does not stamp it: both sides write the same bytes.
        time_ms: 1_796_000_000_000,
        kind: Kind::Http,
        host: "api.openai.com".into(),
        addr: "198.51.100.10".into(),
        port: 443,
        scheme: "https".into(),
        method: "POST".into(),
        http_version: "HTTP/2.0".into(),
        path: format!("/v1/chat/completions?n={i}"),
        status: Some(200),
        tls_intercepted: true,
        bytes_up: 1834,
        bytes_down: 23_911,
        duration_ms: 412,
        decision: Decision::Allowed,
        secrets: vec!["OPENAI_API_KEY".into()],
        ..Record::default()
    }
}

fn size(path: &std::path::Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}

fn main() {
    let n: usize = std::env::args().nth(1).and_then(|v| v.parse().ok()).unwrap_or(200_000);
    let dir = std::env::temp_dir().join(format!("ml-audit-cost-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a scratch directory");

    // Floor: the same lines, serialized and written by the caller.
    let floor_path = dir.join("floor.jsonl");
    let mut floor = std::fs::File::create(&floor_path).expect("floor file");
    // Bytes written through record i, for pacing below.
    let mut through = Vec::with_capacity(n);
    let started = Instant::now();
    for i in 0..n {
        let mut line = serde_json::to_vec(&record(i)).expect("serializes");
        line.push(b'\n');
        floor.write_all(&line).expect("write");
        through.push(through.last().copied().unwrap_or(0) + line.len() as u64);
    }
    let floor_time = started.elapsed();

    // Ours, paced so the queue never overflows (a flood is bounded and counted instead):
    // the caller's share per record, and the time until the writer has every line.
    let path = dir.join("audit.jsonl");
    let audit = Audit::start(&path, u64::MAX).expect("audit");
    let mut caller = Duration::ZERO;
    let started = Instant::now();
    for chunk in (0..n).collect::<Vec<_>>().chunks(1024) {
        let made = Instant::now();
        for i in chunk {
            audit.record(record(*i));
        }
        caller += made.elapsed();
        // At most two chunks ahead of the writer (the queue holds four).
        let behind = chunk[chunk.len() - 1].saturating_sub(2048);
        while size(&path) < through[behind] {
            std::thread::sleep(Duration::from_micros(100));
        }
    }
    drop(audit);
    while size(&path) < through[n - 1] {
        std::thread::sleep(Duration::from_micros(100));
    }
    let total = started.elapsed();
    let per = |d: Duration| d.as_secs_f64() * 1e6 / n as f64;
    println!(
        "audit record ({n} records): request path {:.2} µs each, writer end to end {:.2} µs each; \
         floor (serialize + write on the caller) {:.2} µs each; ratio end to end / floor {:.2}",
        per(caller),
        per(total),
        per(floor_time),
        total.as_secs_f64() / floor_time.as_secs_f64()
    );
    let _ = std::fs::remove_dir_all(&dir);
}
