//! The `matchlock` command line.

/// `println!` that returns an error instead of panicking when stdout is closed
/// (`matchlock list | head`).
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($arg)*)
    }};
}

mod audit;
mod build;
mod cli;
mod host;
mod images;
mod mcp;
mod progress;
mod rpc;
mod run;
mod session;
mod snapshots;
mod stats;
mod terminal;
mod vms;
mod volumes;

use std::process::ExitCode;

use clap::Parser;

/// A sandbox's owner holds many files (disks, sockets, workspace handles): its soft limit on
/// open files goes up to the hard limit, so every per-sandbox budget (e.g.
/// `matchlock_vfs::MAX_HANDLES`) stays well below it. Failing to raise it only lowers the
/// headroom, so it is not an error.
fn raise_open_file_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
        }
    }
}

fn main() -> ExitCode {
    raise_open_file_limit();
    let cli = match cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { 1 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    if let Err(e) = init_logging(cli.log_level.as_deref()) {
        eprintln!("Error: {e}");
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("Error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(cli::dispatch(cli));
    // Do not wait for blocking reads of stdin that no one needs any more.
    runtime.shutdown_background();
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("Error: {e:#}");
            if let Some(hint) = hint(&e) {
                eprintln!("hint: {hint}");
            }
            ExitCode::FAILURE
        }
    }
}

/// One line telling how to fix a failure a user often meets.
fn hint(e: &anyhow::Error) -> Option<&'static str> {
    let text = format!("{e:#}");
    if text.contains("cannot pull") {
        Some("check the name (`matchlock image ls` lists stored images); a local image: `docker save IMG | matchlock image import IMG`")
    } else if text.contains("no guest kernel") {
        Some("`matchlock kernel build` builds it once (minutes); the matchlock package ships one")
    } else if text.contains("guest-init not found") || text.contains("qemu-system-x86_64 not found") {
        Some("`matchlock diagnose` tells what this host lacks; `scripts/setup.sh` or the package installs it")
    } else if text.contains("/dev/kvm") {
        Some("`matchlock diagnose` checks KVM; `sudo matchlock setup user $USER` gives you access to it")
    } else {
        None
    }
}

/// The `--log-level` given, for processes this one starts (a detached owner).
static LOG_FILTER: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// The `--log-level` this process was started with, if any.
pub(crate) fn log_filter() -> Option<&'static str> {
    LOG_FILTER.get().map(String::as_str)
}

/// matchlock's own log on stderr (the detached owner's goes to `logs/owner.log`): `--log-level`,
/// else `RUST_LOG`, else warnings and errors only.
fn init_logging(level: Option<&str>) -> Result<(), String> {
    use tracing_subscriber::filter::{EnvFilter, LevelFilter};
    let filter = match level {
        Some(level) => {
            let filter = EnvFilter::try_new(level).map_err(|e| format!("invalid --log-level {level:?}: {e}"))?;
            let _ = LOG_FILTER.set(level.to_owned());
            filter
        }
        None => EnvFilter::builder().with_default_directive(LevelFilter::WARN.into()).from_env_lossy(),
    };
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false).init();
    Ok(())
}

/// Whether the error is stdout going away (the reader of a pipe exited).
fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe))
}
