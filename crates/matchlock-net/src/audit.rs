//! The writer of a sandbox's egress audit ([`matchlock_api::audit`]): flows hand it records
//! without waiting (a bounded queue; what does not fit is counted as dropped), and a thread of
//! its own appends them as JSON lines, one `write` each (a crash loses only what was still
//! queued), keeping the two files within their bound by rotating the older half out.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use matchlock_api::audit::{rotated_path, Kind, Record};

/// Records waiting for the writer at most (a flood beyond it is counted, not kept).
const QUEUE: usize = 4096;

/// Receives every audit record as it is made (the JSON-RPC `event` notifications); must not
/// block.
pub type RecordSink = Arc<dyn Fn(&Record) + Send + Sync>;

/// Where a sandbox's flows send their audit records: the file's writer, and a sink.
#[derive(Clone)]
pub struct Audit {
    queue: Option<SyncSender<Record>>,
    dropped: Arc<AtomicU64>,
    sink: Option<RecordSink>,
}

impl std::fmt::Debug for Audit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Audit").field("file", &self.queue.is_some()).field("sink", &self.sink.is_some()).finish()
    }
}

impl Audit {
    /// An audit that only hands its records to `sink` (no file).
    pub fn to_sink(sink: RecordSink) -> Self {
        Self { queue: None, dropped: Arc::default(), sink: Some(sink) }
    }

    /// Hands every record to `sink` too.
    #[must_use]
    pub fn with_sink(mut self, sink: Option<RecordSink>) -> Self {
        self.sink = sink;
        self
    }

    /// Starts the writer appending to `path` (created private if missing), the files kept
    /// within `max_bytes` together.
    pub fn start(path: &Path, max_bytes: u64) -> std::io::Result<Self> {
        let file = matchlock_api::paths::append_private(path)?;
        let size = file.metadata()?.len();
        let (queue, records) = sync_channel(QUEUE);
        let dropped = Arc::new(AtomicU64::new(0));
        let writer = Writer {
            path: path.to_owned(),
            file,
            size,
            half: (max_bytes / 2).max(1),
            in_current: 0,
            in_previous: 0,
            rotated: 0,
            dropped: dropped.clone(),
            reported_dropped: 0,
            failed: false,
        };
        std::thread::Builder::new().name("matchlock-audit".into()).spawn(move || writer.run(&records))?;
        Ok(Self { queue: Some(queue), dropped, sink: None })
    }

    /// Queues `record` (stamped now if it has no time); counted as dropped when the writer
    /// is behind.
    pub fn record(&self, mut record: Record) {
        if record.time_ms == 0 {
            record.time_ms = now_ms();
        }
        if let Some(sink) = &self.sink {
            sink(&record);
        }
        let Some(queue) = &self.queue else { return };
        if let Err(TrySendError::Full(_)) = queue.try_send(record) {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Unix milliseconds now.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

struct Writer {
    path: PathBuf,
    file: File,
    size: u64,
    /// Each file's bound: half the total.
    half: u64,
    in_current: u64,
    in_previous: u64,
    rotated: u64,
    dropped: Arc<AtomicU64>,
    reported_dropped: u64,
    /// A write failed (logged once; later records are lost too).
    failed: bool,
}

impl Writer {
    /// Appends records until every [`Audit`] is gone (the engine stopped).
    fn run(mut self, records: &Receiver<Record>) {
        for record in records {
            let dropped = self.dropped.load(Ordering::Relaxed);
            if dropped != self.reported_dropped {
                self.reported_dropped = dropped;
                self.append(&Record { kind: Kind::Dropped, count: dropped, time_ms: now_ms(), ..Record::default() });
            }
            self.append(&record);
        }
        let dropped = self.dropped.load(Ordering::Relaxed);
        if dropped != self.reported_dropped {
            self.append(&Record { kind: Kind::Dropped, count: dropped, time_ms: now_ms(), ..Record::default() });
        }
    }

    fn append(&mut self, record: &Record) {
        let Ok(mut line) = serde_json::to_vec(record) else { return };
        line.push(b'\n');
        let len = line.len() as u64;
        if self.size > 0 && self.size + len > self.half {
            self.rotate();
        }
        match self.file.write_all(&line) {
            Ok(()) => {
                self.size += len;
                if !matches!(record.kind, Kind::Dropped | Kind::Rotated) {
                    self.in_current += 1;
                }
            }
            Err(e) if !self.failed => {
                self.failed = true;
                tracing::warn!("writing the audit {}: {e}", self.path.display());
            }
            Err(_) => {}
        }
    }

    /// The current file becomes the older half (the previous older half's records are
    /// counted as rotated out); a new file starts with the count.
    fn rotate(&mut self) {
        let older = rotated_path(&self.path);
        let renamed = std::fs::rename(&self.path, &older);
        let reopened = renamed.and_then(|()| matchlock_api::paths::append_private(&self.path));
        match reopened {
            Ok(file) => {
                self.file = file;
                self.size = 0;
                self.rotated += self.in_previous;
                self.in_previous = self.in_current;
                self.in_current = 0;
                // The counts so far head the new file (the marks before are rotated away).
                let marks = [(Kind::Rotated, self.rotated), (Kind::Dropped, self.reported_dropped)];
                for (kind, count) in marks.into_iter().filter(|(_, count)| *count > 0) {
                    let mark = Record { kind, count, time_ms: now_ms(), ..Record::default() };
                    if let Ok(mut line) = serde_json::to_vec(&mark) {
                        line.push(b'\n');
                        if self.file.write_all(&line).is_ok() {
                            self.size += line.len() as u64;
                        }
                    }
                }
            }
            Err(e) if !self.failed => {
                self.failed = true;
                tracing::warn!("rotating the audit {}: {e}", self.path.display());
            }
            Err(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use matchlock_api::audit::Decision;

    fn dns(i: usize) -> Record {
        Record { kind: Kind::Dns, host: format!("n{i}.flood.test"), decision: Decision::Blocked, ..Record::default() }
    }

    #[test]
    fn a_flood_stays_within_the_bound_and_is_counted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let audit = Audit::start(&path, 64 << 10).unwrap();
        for i in 0..20_000 {
            audit.record(dns(i));
        }
        drop(audit);
        // The writer ends when the queue closes; wait for its last write.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        let read = loop {
            let read = matchlock_api::audit::Audit::read(&path).unwrap();
            let seen = read.records.len() as u64 + read.rotated + read.dropped;
            if seen >= 20_000 || std::time::Instant::now() > deadline {
                break read;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        };
        let total: u64 =
            matchlock_api::audit::files(&path).iter().map(|p| std::fs::metadata(p).map_or(0, |m| m.len())).sum();
        assert!(total <= 64 << 10, "{total} bytes on disk");
        assert_eq!(
            read.records.len() as u64 + read.rotated + read.dropped,
            20_000,
            "every record kept or counted: {} {} {}",
            read.records.len(),
            read.rotated,
            read.dropped
        );
        assert_eq!(read.unreadable, 0);
        // Oldest out first: what is kept is in order, and newer than all that was rotated out.
        let index = |r: &Record| r.host.trim_start_matches('n').split('.').next().unwrap().parse::<u64>().unwrap();
        let kept: Vec<u64> = read.records.iter().map(index).collect();
        assert!(kept.windows(2).all(|w| w[0] < w[1]), "in order");
        assert!(kept[0] >= read.rotated, "{} kept from {}, {} rotated", kept.len(), kept[0], read.rotated);
        let last = read.records.last().unwrap();
        assert!(last.time_ms > 0);
    }
}
