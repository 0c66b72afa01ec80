//! The lifecycle phase machine and its append-only records.

use std::collections::BTreeMap;

use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};

use crate::{now_rfc3339, StateError};

/// Lifecycle phases (reference §7).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Resources are being prepared.
    Creating,
    /// Resources exist; the VM has not started.
    Created,
    /// The VM is booting.
    Starting,
    /// The guest is ready.
    Running,
    /// The VM is being stopped.
    Stopping,
    /// The VM process has ended.
    Stopped,
    /// Resources are being released.
    Cleaning,
    /// Everything is released (terminal).
    Cleaned,
    /// Creation failed.
    CreateFailed,
    /// Boot failed.
    StartFailed,
    /// Stopping failed.
    StopFailed,
    /// A cleanup step failed.
    CleanupFailed,
}

impl Phase {
    /// Whether the machine allows moving from `self` to `to` (self-transitions always are).
    pub fn can_move_to(self, to: Phase) -> bool {
        use Phase::*;
        if self == to {
            return true;
        }
        let allowed: &[Phase] = match self {
            Creating => &[Created, CreateFailed, Cleaning],
            Created => &[Starting, Stopping, Cleaning],
            Starting => &[Running, StartFailed, Stopping, Cleaning],
            Running => &[Stopping, Cleaning],
            Stopping => &[Stopped, StopFailed, Cleaning],
            Stopped => &[Cleaning, Cleaned],
            Cleaning => &[Cleaned, CleanupFailed],
            CreateFailed => &[Cleaning, CleanupFailed],
            StartFailed => &[Stopping, Cleaning, CleanupFailed],
            StopFailed => &[Cleaning, CleanupFailed],
            CleanupFailed => &[Cleaning, Cleaned],
            Cleaned => &[],
        };
        allowed.contains(&to)
    }

    fn as_str(self) -> String {
        serde_json::to_value(self).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default()
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.as_str())
    }
}

/// Outcome of one cleanup step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CleanupStep {
    /// `ok` or `failed`.
    pub status: String,
    /// Why it failed.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub error: Option<String>,
    /// When it was recorded.
    pub updated_at: String,
}

impl CleanupStep {
    /// A step outcome recorded now.
    pub fn new(error: Option<&str>) -> Self {
        Self {
            status: if error.is_some() { "failed" } else { "ok" }.to_owned(),
            error: error.map(str::to_owned),
            updated_at: now_rfc3339(),
        }
    }
}

/// One lifecycle record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// Increments with every change.
    pub version: i64,
    /// The VM.
    pub vm_id: String,
    /// `qemu`, `firecracker`.
    pub backend: String,
    /// Current phase.
    pub phase: Phase,
    /// When this version was written.
    pub updated_at: String,
    /// The error that caused a failure phase.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub last_error: Option<String>,
    /// What the VM holds (state dir, disks, sockets).
    pub resources: serde_json::Value,
    /// Cleanup steps by name.
    pub cleanup: BTreeMap<String, CleanupStep>,
}

impl Record {
    /// The first record of a VM.
    pub fn new(vm_id: &str, backend: &str, resources: serde_json::Value) -> Self {
        Self {
            version: 1,
            vm_id: vm_id.to_owned(),
            backend: backend.to_owned(),
            phase: Phase::Creating,
            updated_at: now_rfc3339(),
            last_error: None,
            resources,
            cleanup: BTreeMap::new(),
        }
    }
}

pub(crate) fn append(conn: &Connection, rec: &Record) -> Result<(), StateError> {
    conn.execute(
        "INSERT INTO vm_lifecycle (vm_id, version, backend, phase, updated_at, last_error, resources_json, cleanup_json)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        params![
            rec.vm_id,
            rec.version,
            rec.backend,
            rec.phase.as_str(),
            rec.updated_at,
            rec.last_error,
            rec.resources.to_string(),
            serde_json::to_string(&rec.cleanup).expect("cleanup map serializes"),
        ],
    )?;
    conn.execute(
        "INSERT INTO vm_lifecycle_head (vm_id, last_version) VALUES (?1, ?2)
         ON CONFLICT (vm_id) DO UPDATE SET last_version = excluded.last_version",
        params![rec.vm_id, rec.version],
    )?;
    Ok(())
}

/// A `vm_lifecycle` row before its JSON columns are parsed.
struct RawRecord {
    version: i64,
    vm_id: String,
    backend: String,
    phase: String,
    updated_at: String,
    last_error: Option<String>,
    resources: String,
    cleanup: String,
}

fn parse_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<RawRecord> {
    Ok(RawRecord {
        version: r.get(0)?,
        vm_id: r.get(1)?,
        backend: r.get(2)?,
        phase: r.get(3)?,
        updated_at: r.get(4)?,
        last_error: r.get(5)?,
        resources: r.get(6)?,
        cleanup: r.get(7)?,
    })
}

fn to_record(raw: RawRecord) -> Result<Record, StateError> {
    let corrupt = |what| {
        let vm = raw.vm_id.clone();
        move |source| StateError::Corrupt { what, vm, source }
    };
    Ok(Record {
        version: raw.version,
        phase: serde_json::from_value(serde_json::Value::String(raw.phase.clone()))
            .map_err(corrupt("lifecycle phase"))?,
        resources: serde_json::from_str(&raw.resources).map_err(corrupt("lifecycle resources"))?,
        cleanup: serde_json::from_str(&raw.cleanup).map_err(corrupt("lifecycle cleanup"))?,
        backend: raw.backend,
        updated_at: raw.updated_at,
        last_error: raw.last_error,
        vm_id: raw.vm_id,
    })
}

const SELECT: &str =
    "SELECT version, vm_id, backend, phase, updated_at, last_error, resources_json, cleanup_json FROM vm_lifecycle";

pub(crate) fn head(conn: &Connection, vm_id: &str) -> Result<Option<Record>, StateError> {
    let sql = format!(
        "{SELECT} WHERE vm_id = ?1 AND version = (SELECT last_version FROM vm_lifecycle_head WHERE vm_id = ?1)"
    );
    conn.query_row(&sql, params![vm_id], parse_row).optional()?.map(to_record).transpose()
}

pub(crate) fn history(conn: &Connection, vm_id: &str) -> Result<Vec<Record>, StateError> {
    let mut stmt = conn.prepare(&format!("{SELECT} WHERE vm_id = ?1 ORDER BY version"))?;
    let rows: Vec<_> = stmt.query_map(params![vm_id], parse_row)?.collect::<Result<_, _>>()?;
    rows.into_iter().map(to_record).collect()
}

#[cfg(test)]
mod tests {
    use super::Phase::*;

    #[test]
    fn phase_machine() {
        assert!(Creating.can_move_to(Created));
        assert!(Running.can_move_to(Running));
        assert!(!Running.can_move_to(Created));
        assert!(!Cleaned.can_move_to(Cleaning));
        assert!(CleanupFailed.can_move_to(Cleaned));
        assert_eq!(StartFailed.to_string(), "start_failed");
    }
}
