//! Threads that are used again: every exec needs two (its connection's and its host
//! reader), and creating one costs about 0.3 ms of the guest's one vCPU under TCG. A job
//! goes to an idle worker if there is one, else to a new thread; a worker idle for
//! [`IDLE_LIFETIME`] ends.

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::Duration;

/// How long a worker waits for another job before it ends.
const IDLE_LIFETIME: Duration = Duration::from_secs(10);

type Job = Box<dyn FnOnce() + Send>;

struct State {
    jobs: VecDeque<Job>,
    idle: usize,
}

static STATE: Mutex<State> = Mutex::new(State { jobs: VecDeque::new(), idle: 0 });
static WAKE: Condvar = Condvar::new();

fn lock() -> MutexGuard<'static, State> {
    crate::relock(&STATE)
}

/// Runs `job` on a worker thread.
pub(crate) fn spawn(job: impl FnOnce() + Send + 'static) {
    let mut state = lock();
    // Jobs already queued each have an idle worker waking up for them.
    if state.idle > state.jobs.len() {
        state.jobs.push_back(Box::new(job));
        drop(state);
        WAKE.notify_one();
        return;
    }
    drop(state);
    let started = thread::Builder::new().name("agent-worker".to_owned()).spawn(move || {
        job();
        work();
    });
    if let Err(e) = started {
        eprintln!("guest-agent: cannot start a thread: {e}");
    }
}

fn work() {
    let mut state = lock();
    loop {
        if let Some(job) = state.jobs.pop_front() {
            drop(state);
            job();
            state = lock();
            continue;
        }
        state.idle += 1;
        let (woken, waited) = WAKE.wait_timeout(state, IDLE_LIFETIME).unwrap_or_else(PoisonError::into_inner);
        state = woken;
        state.idle -= 1;
        if waited.timed_out() && state.jobs.is_empty() {
            return;
        }
    }
}
