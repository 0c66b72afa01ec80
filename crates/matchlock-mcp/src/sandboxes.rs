//! The sandboxes a server opened: bounded in number, closed when idle, all closed at the end.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::backend::{BackendError, Launcher, Machine};
use crate::policy::{Policy, PolicyError};

/// Why a sandbox could not be had.
#[derive(Debug, thiserror::Error)]
pub enum SandboxesError {
    /// The policy refused it.
    #[error(transparent)]
    Policy(#[from] PolicyError),
    /// No open sandbox has this id.
    #[error("no sandbox {0}: sandbox_list shows the open ones (an idle sandbox is closed after a while)")]
    Unknown(String),
    /// Booting failed.
    #[error("cannot start a sandbox: {0}")]
    Boot(#[source] BackendError),
}

/// An open sandbox.
pub struct Entry {
    /// The sandbox.
    pub machine: Arc<dyn Machine>,
    /// Cancelled when the sandbox is being closed: calls in flight stop.
    pub closing: CancellationToken,
    /// Whether a call made it only for itself (closed when that call ends).
    pub one_shot: bool,
    busy: AtomicUsize,
    last_used: Mutex<Instant>,
}

impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Entry").field("id", &self.machine.id()).field("one_shot", &self.one_shot).finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Entry {
    /// Seconds since a call last used it (0 while one does).
    pub fn idle(&self) -> Duration {
        if self.busy.load(Ordering::SeqCst) > 0 {
            return Duration::ZERO;
        }
        lock(&self.last_used).elapsed()
    }

    /// Marks the sandbox in use until the guard drops.
    pub fn hold(self: &Arc<Self>) -> Held {
        self.busy.fetch_add(1, Ordering::SeqCst);
        Held(self.clone())
    }
}

/// A call's hold on a sandbox (it is not idle while held).
#[derive(Debug)]
pub struct Held(Arc<Entry>);

impl std::ops::Deref for Held {
    type Target = Entry;
    fn deref(&self) -> &Entry {
        &self.0
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        *lock(&self.0.last_used) = Instant::now();
        self.0.busy.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The open sandboxes and the slots being booted.
#[derive(Default)]
struct Table {
    open: HashMap<String, Arc<Entry>>,
    booting: usize,
}

/// Every sandbox the server opened.
pub struct Sandboxes {
    launcher: Arc<dyn Launcher>,
    policy: Arc<Policy>,
    table: Mutex<Table>,
}

impl std::fmt::Debug for Sandboxes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sandboxes").field("open", &lock(&self.table).open.len()).finish_non_exhaustive()
    }
}

/// Gives a booting slot back if the boot did not finish.
struct Slot<'a>(&'a Sandboxes);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        lock(&self.0.table).booting -= 1;
    }
}

impl Sandboxes {
    /// No sandboxes yet.
    pub fn new(launcher: Arc<dyn Launcher>, policy: Arc<Policy>) -> Self {
        Self { launcher, policy, table: Mutex::new(Table::default()) }
    }

    /// The policy they follow.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Boots a sandbox of `image` (the default one when `None`), held by the caller.
    pub async fn open(&self, image: Option<&str>, one_shot: bool) -> Result<Held, SandboxesError> {
        let config = self.policy.config_for(image)?;
        let _slot = {
            let mut table = lock(&self.table);
            if table.open.len() + table.booting >= self.policy.max_sandboxes {
                return Err(PolicyError::TooManySandboxes { max: self.policy.max_sandboxes }.into());
            }
            table.booting += 1;
            Slot(self)
        };
        let machine = self.launcher.create(config).await.map_err(SandboxesError::Boot)?;
        let entry = Arc::new(Entry {
            machine,
            closing: CancellationToken::new(),
            one_shot,
            busy: AtomicUsize::new(0),
            last_used: Mutex::new(Instant::now()),
        });
        let held = entry.hold();
        lock(&self.table).open.insert(entry.machine.id().to_owned(), entry);
        tracing::info!(id = held.machine.id(), one_shot, "sandbox opened");
        Ok(held)
    }

    /// The open sandbox `id`, held by the caller.
    pub fn get(&self, id: &str) -> Result<Held, SandboxesError> {
        let table = lock(&self.table);
        let entry = table.open.get(id.trim()).ok_or_else(|| SandboxesError::Unknown(id.to_owned()))?;
        Ok(entry.hold())
    }

    /// Every open sandbox, by id.
    pub fn list(&self) -> Vec<Arc<Entry>> {
        let mut all: Vec<Arc<Entry>> = lock(&self.table).open.values().cloned().collect();
        all.sort_by(|a, b| a.machine.id().cmp(b.machine.id()));
        all
    }

    /// Closes `id`: its calls in flight are cancelled first.
    pub async fn close(&self, id: &str) -> Result<(), SandboxesError> {
        let entry = lock(&self.table).open.remove(id.trim()).ok_or_else(|| SandboxesError::Unknown(id.to_owned()))?;
        close_entry(&entry).await;
        Ok(())
    }

    /// Closes every sandbox (the session ended).
    pub async fn close_all(&self) {
        let all: Vec<Arc<Entry>> = lock(&self.table).open.drain().map(|(_, e)| e).collect();
        for entry in &all {
            entry.closing.cancel();
        }
        for entry in all {
            close_entry(&entry).await;
        }
    }

    /// Closes the sandboxes unused for longer than the policy's idle timeout.
    pub async fn close_idle(&self) {
        let idle: Vec<Arc<Entry>> = {
            let mut table = lock(&self.table);
            let ids: Vec<String> = table
                .open
                .iter()
                .filter(|(_, e)| !e.one_shot && e.idle() >= self.policy.idle_timeout)
                .map(|(id, _)| id.clone())
                .collect();
            ids.iter().filter_map(|id| table.open.remove(id)).collect()
        };
        for entry in idle {
            tracing::info!(id = entry.machine.id(), "closing an idle sandbox");
            close_entry(&entry).await;
        }
    }

    /// Closes idle sandboxes every few seconds until `stop` is cancelled.
    pub async fn reap_idle(&self, stop: CancellationToken) {
        let period = (self.policy.idle_timeout / 4).clamp(Duration::from_millis(200), Duration::from_secs(10));
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(period) => self.close_idle().await,
            }
        }
    }
}

async fn close_entry(entry: &Entry) {
    entry.closing.cancel();
    if let Err(e) = entry.machine.close().await {
        tracing::warn!(id = entry.machine.id(), "cannot close the sandbox: {e}");
    } else {
        tracing::info!(id = entry.machine.id(), "sandbox closed");
    }
}
