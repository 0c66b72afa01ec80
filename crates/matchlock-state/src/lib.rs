//! The VM state database (`~/.matchlock/state.db`).
//!
//! - `vms`: one row per sandbox: owner process (pid + start time, so a recycled pid is
//!   never mistaken for the owner), status, image, and its configuration.
//! - `vm_lifecycle`: append-only history of lifecycle records, validated against the
//!   phase machine in [`lifecycle`]; `vm_lifecycle_head` points at the latest version.
//!
//! Every CLI process opens its own connection: WAL mode, a busy timeout and immediate
//! transactions for read-modify-write keep concurrent writers from corrupting rows or
//! reading torn ones. Schema changes run as numbered migrations, with a backup taken
//! before the first pending one and restored if any fails.
#![forbid(unsafe_code)]

pub mod lifecycle;
pub mod process;

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use serde::{Deserialize, Serialize};

pub use lifecycle::{CleanupStep, Phase, Record};

/// Schema migrations of the `state` module, in order.
const MIGRATIONS: &[(&str, &str)] = &[(
    "initial",
    "CREATE TABLE vms (
        id TEXT PRIMARY KEY,
        pid INTEGER NOT NULL,
        pid_start INTEGER NOT NULL,
        status TEXT NOT NULL,
        image TEXT NOT NULL,
        config_json TEXT NOT NULL,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL
    );
    CREATE TABLE vm_lifecycle (
        vm_id TEXT NOT NULL,
        version INTEGER NOT NULL,
        backend TEXT NOT NULL,
        phase TEXT NOT NULL,
        updated_at TEXT NOT NULL,
        last_error TEXT,
        resources_json TEXT NOT NULL,
        cleanup_json TEXT NOT NULL,
        PRIMARY KEY (vm_id, version)
    );
    CREATE TABLE vm_lifecycle_head (
        vm_id TEXT PRIMARY KEY,
        last_version INTEGER NOT NULL
    );",
)];

/// Errors from the state database.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// SQLite failed.
    #[error("state database error")]
    Db(#[from] rusqlite::Error),
    /// A file operation failed.
    #[error("state database file error on {path}")]
    Io {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// No such VM.
    #[error("VM {0} not found")]
    NotFound(String),
    /// A lifecycle transition the phase machine forbids.
    #[error("invalid lifecycle transition for {vm}: {from} -> {to}")]
    InvalidTransition {
        /// The VM.
        vm: String,
        /// Current phase.
        from: Phase,
        /// Requested phase.
        to: Phase,
    },
    /// A stored JSON document does not parse.
    #[error("corrupt {what} for {vm}")]
    Corrupt {
        /// Which document.
        what: &'static str,
        /// The VM.
        vm: String,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
}

/// Status of a VM row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Its owner process is alive (or was, at the last check).
    Running,
    /// Its owner stopped it.
    Stopped,
    /// Its owner died without stopping it.
    Crashed,
}

impl Status {
    /// The stored spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Stopped => "stopped",
            Self::Crashed => "crashed",
        }
    }

    fn parse(s: &str) -> Self {
        match s {
            "running" => Self::Running,
            "stopped" => Self::Stopped,
            _ => Self::Crashed,
        }
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One VM row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Vm {
    /// `vm-xxxxxxxx`.
    pub id: String,
    /// PID of the owner process.
    pub pid: i32,
    /// Start time of the owner (clock ticks since boot), to detect pid reuse.
    #[serde(skip)]
    pub pid_start: u64,
    /// Status.
    pub status: Status,
    /// Image reference.
    pub image: String,
    /// Configuration (JSON).
    #[serde(skip)]
    pub config_json: String,
    /// RFC 3339 UTC.
    pub created_at: String,
    /// RFC 3339 UTC.
    #[serde(skip)]
    pub updated_at: String,
}

impl Vm {
    /// Whether the owner process recorded in this row is alive.
    pub fn owner_alive(&self) -> bool {
        process::is_alive(self.pid, self.pid_start)
    }
}

/// Current time as RFC 3339 with nanoseconds, UTC.
pub fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".to_owned())
}

/// `YYYY-MM-DD HH:MM` of an RFC 3339 timestamp (for tables).
pub fn short_time(rfc3339: &str) -> String {
    time::OffsetDateTime::parse(rfc3339, &time::format_description::well_known::Rfc3339)
        .ok()
        .and_then(|t| t.format(time::macros::format_description!("[year]-[month]-[day] [hour]:[minute]")).ok())
        .unwrap_or_else(|| rfc3339.to_owned())
}

/// `YYYY-MM-DD HH:MM:SS` (UTC) of Unix seconds.
pub fn datetime(unix_seconds: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix_seconds)
        .ok()
        .and_then(|t| t.format(time::macros::format_description!("[year]-[month]-[day] [hour]:[minute]:[second]")).ok())
        .unwrap_or_default()
}

/// The state database.
#[derive(Debug)]
pub struct StateDb {
    conn: Connection,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StateError + '_ {
    move |source| StateError::Io { path: path.to_owned(), source }
}

impl StateDb {
    /// Opens (creating and migrating as needed) the database at `path`.
    pub fn open(path: &Path) -> Result<Self, StateError> {
        if let Some(dir) = path.parent() {
            matchlock_api::paths::create_private_dir(dir).map_err(io_err(dir))?;
        }
        // Serialise first-time creation and migrations across processes.
        let lock_path = path.with_extension("db.lock");
        let lock = matchlock_api::paths::lock_file(&lock_path, true).map_err(io_err(&lock_path))?;
        matchlock_api::paths::make_private_file(path).map_err(io_err(path))?;
        let conn = Connection::open(path)?;
        conn.busy_timeout(Duration::from_secs(15))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        let mut db = Self { conn };
        db.migrate(path)?;
        drop(lock);
        Ok(db)
    }

    fn migrate(&mut self, path: &Path) -> Result<(), StateError> {
        self.conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS schema_migrations (
                module TEXT NOT NULL, version INTEGER NOT NULL, name TEXT NOT NULL,
                applied_at TEXT NOT NULL, PRIMARY KEY (module, version))",
        )?;
        let applied: usize =
            self.conn.query_row("SELECT COUNT(*) FROM schema_migrations WHERE module = 'state'", [], |r| r.get(0))?;
        if applied >= MIGRATIONS.len() {
            return Ok(());
        }
        let backup = path.with_extension("db.premigrate.bak");
        if applied > 0 {
            self.conn.execute("VACUUM INTO ?1", params![backup.to_string_lossy()]).ok();
        }
        let result = (|| -> Result<(), StateError> {
            let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            for (i, (name, sql)) in MIGRATIONS.iter().enumerate().skip(applied) {
                tx.execute_batch(sql)?;
                tx.execute(
                    "INSERT INTO schema_migrations (module, version, name, applied_at) VALUES ('state', ?1, ?2, ?3)",
                    params![i as i64 + 1, name, now_rfc3339()],
                )?;
            }
            tx.commit()?;
            Ok(())
        })();
        if result.is_err() && backup.exists() {
            let _ = std::fs::copy(&backup, path);
        }
        result
    }

    /// Registers a new running VM owned by `pid`, with its first lifecycle record.
    pub fn register(&mut self, vm: &Vm, backend: &str, resources: &serde_json::Value) -> Result<(), StateError> {
        let now = now_rfc3339();
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute(
            "INSERT INTO vms (id, pid, pid_start, status, image, config_json, created_at, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?7)",
            params![vm.id, vm.pid, vm.pid_start as i64, vm.status.as_str(), vm.image, vm.config_json, now],
        )?;
        let record = Record::new(&vm.id, backend, resources.clone());
        lifecycle::append(&tx, &record)?;
        tx.commit()?;
        Ok(())
    }

    fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Vm> {
        Ok(Vm {
            id: r.get(0)?,
            pid: r.get(1)?,
            pid_start: r.get::<_, i64>(2)? as u64,
            status: Status::parse(&r.get::<_, String>(3)?),
            image: r.get(4)?,
            config_json: r.get(5)?,
            created_at: r.get(6)?,
            updated_at: r.get(7)?,
        })
    }

    const COLUMNS: &'static str = "id, pid, pid_start, status, image, config_json, created_at, updated_at";

    /// One VM.
    pub fn get(&self, id: &str) -> Result<Option<Vm>, StateError> {
        let sql = format!("SELECT {} FROM vms WHERE id = ?1", Self::COLUMNS);
        Ok(self.conn.query_row(&sql, params![id], Self::row).optional()?)
    }

    /// All VMs, newest first.
    pub fn list(&self) -> Result<Vec<Vm>, StateError> {
        let sql = format!("SELECT {} FROM vms ORDER BY created_at DESC, id", Self::COLUMNS);
        let mut stmt = self.conn.prepare(&sql)?;
        let rows = stmt.query_map([], Self::row)?.collect::<Result<_, _>>()?;
        Ok(rows)
    }

    /// Sets a VM's status.
    pub fn set_status(&self, id: &str, status: Status) -> Result<(), StateError> {
        let n = self.conn.execute(
            "UPDATE vms SET status = ?2, updated_at = ?3 WHERE id = ?1",
            params![id, status.as_str(), now_rfc3339()],
        )?;
        if n == 0 {
            return Err(StateError::NotFound(id.to_owned()));
        }
        Ok(())
    }

    /// Marks `running` rows whose owner is dead as `crashed`; returns the fresh list.
    pub fn reconcile_statuses(&self) -> Result<Vec<Vm>, StateError> {
        let mut vms = self.list()?;
        for vm in &mut vms {
            self.reconcile(vm)?;
        }
        Ok(vms)
    }

    /// One VM, its status reconciled like [`StateDb::reconcile_statuses`] does.
    pub fn reconciled(&self, id: &str) -> Result<Option<Vm>, StateError> {
        let Some(mut vm) = self.get(id)? else { return Ok(None) };
        self.reconcile(&mut vm)?;
        Ok(Some(vm))
    }

    fn reconcile(&self, vm: &mut Vm) -> Result<(), StateError> {
        if vm.status == Status::Running && !vm.owner_alive() {
            // Only flip rows still marked running: the owner may have just stopped it.
            self.conn.execute(
                "UPDATE vms SET status = 'crashed', updated_at = ?2 WHERE id = ?1 AND status = 'running'",
                params![vm.id, now_rfc3339()],
            )?;
            vm.status = Status::Crashed;
        }
        Ok(())
    }

    /// Deletes a VM's rows (the VM and its lifecycle history).
    pub fn delete(&mut self, id: &str) -> Result<(), StateError> {
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute("DELETE FROM vms WHERE id = ?1", params![id])?;
        tx.execute("DELETE FROM vm_lifecycle WHERE vm_id = ?1", params![id])?;
        tx.execute("DELETE FROM vm_lifecycle_head WHERE vm_id = ?1", params![id])?;
        tx.commit()?;
        Ok(())
    }

    /// Moves a VM's lifecycle to `phase` (validated), recording `error` if given.
    pub fn transition(&mut self, id: &str, phase: Phase, error: Option<&str>) -> Result<Record, StateError> {
        self.update_record(id, |rec| {
            if !rec.phase.can_move_to(phase) {
                return Err(StateError::InvalidTransition { vm: rec.vm_id.clone(), from: rec.phase, to: phase });
            }
            rec.phase = phase;
            rec.last_error = error.map(str::to_owned);
            Ok(())
        })
    }

    /// Records the outcome of one cleanup step.
    pub fn record_cleanup(&mut self, id: &str, step: &str, error: Option<&str>) -> Result<Record, StateError> {
        self.update_record(id, |rec| {
            rec.cleanup.insert(step.to_owned(), CleanupStep::new(error));
            Ok(())
        })
    }

    fn update_record(
        &mut self,
        id: &str,
        change: impl FnOnce(&mut Record) -> Result<(), StateError>,
    ) -> Result<Record, StateError> {
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut rec = lifecycle::head(&tx, id)?.ok_or_else(|| StateError::NotFound(id.to_owned()))?;
        change(&mut rec)?;
        rec.version += 1;
        rec.updated_at = now_rfc3339();
        lifecycle::append(&tx, &rec)?;
        tx.commit()?;
        Ok(rec)
    }

    /// The latest lifecycle record of a VM.
    pub fn lifecycle(&self, id: &str) -> Result<Option<Record>, StateError> {
        lifecycle::head(&self.conn, id)
    }

    /// Every lifecycle record of a VM, oldest first.
    pub fn history(&self, id: &str) -> Result<Vec<Record>, StateError> {
        lifecycle::history(&self.conn, id)
    }

    /// Creates a lifecycle record for a VM that has none (rows from a crash mid-register):
    /// its backend was never recorded, so it is `unknown`.
    pub fn ensure_lifecycle(&mut self, id: &str) -> Result<(), StateError> {
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        if lifecycle::head(&tx, id)?.is_none() {
            lifecycle::append(&tx, &Record::new(id, "unknown", serde_json::json!({})))?;
        }
        tx.commit()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(id: &str, pid: i32) -> Vm {
        Vm {
            id: id.into(),
            pid,
            pid_start: process::start_time(pid).unwrap_or(0),
            status: Status::Running,
            image: "busybox:latest".into(),
            config_json: "{}".into(),
            created_at: String::new(),
            updated_at: String::new(),
        }
    }

    #[test]
    fn register_list_and_crash_detection() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let mut db = StateDb::open(&path).unwrap();
        db.register(&vm("vm-live", std::process::id() as i32), "qemu", &serde_json::json!({})).unwrap();
        db.register(&vm("vm-dead", i32::MAX), "qemu", &serde_json::json!({})).unwrap();
        let vms = db.reconcile_statuses().unwrap();
        let status = |id: &str| vms.iter().find(|v| v.id == id).unwrap().status;
        assert_eq!(status("vm-live"), Status::Running);
        assert_eq!(status("vm-dead"), Status::Crashed);
        // Persisted, and reopening does not re-run migrations.
        let db = StateDb::open(&path).unwrap();
        assert_eq!(db.get("vm-dead").unwrap().unwrap().status, Status::Crashed);
    }

    #[test]
    fn lifecycle_is_validated_and_append_only() {
        let dir = tempfile::tempdir().unwrap();
        let mut db = StateDb::open(&dir.path().join("state.db")).unwrap();
        db.register(&vm("vm-a", 1), "qemu", &serde_json::json!({"state_dir": "/x"})).unwrap();
        db.transition("vm-a", Phase::Created, None).unwrap();
        db.transition("vm-a", Phase::Starting, None).unwrap();
        db.transition("vm-a", Phase::Running, None).unwrap();
        let err = db.transition("vm-a", Phase::Created, None).unwrap_err();
        assert!(matches!(err, StateError::InvalidTransition { .. }), "{err}");
        db.transition("vm-a", Phase::Stopping, None).unwrap();
        db.record_cleanup("vm-a", "machine_close", None).unwrap();
        db.record_cleanup("vm-a", "rootfs_remove", Some("busy")).unwrap();
        let head = db.lifecycle("vm-a").unwrap().unwrap();
        assert_eq!(head.phase, Phase::Stopping);
        assert_eq!(head.cleanup["rootfs_remove"].status, "failed");
        assert_eq!(head.resources["state_dir"], "/x");
        let history = db.history("vm-a").unwrap();
        assert_eq!(history.len(), 7);
        assert!(history.windows(2).all(|w| w[0].version + 1 == w[1].version));
        db.delete("vm-a").unwrap();
        assert!(db.history("vm-a").unwrap().is_empty());
    }

    #[test]
    fn short_times() {
        assert_eq!(short_time("2026-11-22T08:10:51.123456789Z"), "2026-11-22 08:10");
    }
}
