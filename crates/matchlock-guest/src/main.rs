//! guest-init: the one static binary matchlock puts into every guest.
//!
//! The role is chosen by argv[0]:
//! - anything else: PID 1 ([`init`]) — assembles the overlay root, mounts the base file
//!   systems, names the machine, then serves the exec port ([`agent`]) in-process;
//! - `guest-agent`: only the exec agent (for running under another init);
//! - `matchlock-launcher`: internal, started by the agent for each command ([`launcher`]).

mod agent;
mod commit;
mod files;
mod fused;
mod init;
mod launcher;
mod listings;
mod mux;
mod sys;
mod users;
mod workers;

use std::path::Path;
use std::process::ExitCode;

/// argv[0] under which the agent re-executes itself to launch a command.
pub const LAUNCHER_ARGV0: &str = "matchlock-launcher";

fn main() -> ExitCode {
    let argv0 = std::env::args_os().next().unwrap_or_default();
    let role = Path::new(&argv0).file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    match role.as_str() {
        LAUNCHER_ARGV0 => launcher::main(),
        "guest-agent" => {
            match mux::start().map_err(agent::AgentError::Listen).and_then(|()| agent::serve(Vec::new())) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("guest-agent: {}", sys::error_chain(&e));
                    ExitCode::FAILURE
                }
            }
        }
        _ => init::main(),
    }
}

/// Locks `m`, taking over a lock a panicking thread poisoned (guest-init must go on).
pub(crate) fn relock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
