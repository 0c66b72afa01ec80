//! `matchlock run`.

use std::io::IsTerminal;
use std::net::IpAddr;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use matchlock_api::config::{
    parse_add_host, parse_env, parse_env_file, DEFAULT_CPUS, DEFAULT_DISK_SIZE_MB, DEFAULT_MEMORY_MB,
};
use matchlock_api::SandboxConfig;
use matchlock_protocol::exec::{ExecMode, ExecRequest};
use matchlock_sandbox::{compose, Control, ExecIo, Sandbox};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

use crate::cli::open_store;
use crate::terminal;

/// Arguments of `matchlock run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Image to boot (as imported: `name[:tag]`).
    #[arg(long)]
    image: String,
    /// Set an environment variable (`KEY=VALUE`, or `KEY` to pass the host's value).
    #[arg(short = 'e', long = "env", value_name = "KEY[=VALUE]")]
    env: Vec<String>,
    /// Read environment variables from a file (applied before --env).
    #[arg(long = "env-file", value_name = "FILE")]
    env_file: Vec<String>,
    /// Run as this user: `name`, `uid`, or `uid:gid` (default: the image's USER).
    #[arg(short = 'u', long)]
    user: Option<String>,
    /// Working directory (default: the image's WORKDIR, else /).
    #[arg(short = 'w', long)]
    workdir: Option<String>,
    /// Replace the image's ENTRYPOINT (an empty string clears it).
    #[arg(long)]
    entrypoint: Option<String>,
    /// Keep stdin open and forward it to the command.
    #[arg(short = 'i', long)]
    interactive: bool,
    /// With -i: allocate a pseudo-terminal.
    #[arg(short = 't', long)]
    tty: bool,
    /// Number of CPUs (fractions are enforced as a CPU quota).
    #[arg(long, default_value_t = DEFAULT_CPUS)]
    cpus: f64,
    /// Memory in MB.
    #[arg(long, default_value_t = DEFAULT_MEMORY_MB)]
    memory: u64,
    /// Size of the writable disk in MB (sparse).
    #[arg(long = "disk-size", default_value_t = DEFAULT_DISK_SIZE_MB)]
    disk_size: u64,
    /// Hostname (default: the VM id).
    #[arg(long)]
    hostname: Option<String>,
    /// DNS servers for /etc/resolv.conf (comma-separated).
    #[arg(long = "dns-servers", value_delimiter = ',', value_name = "IP[,IP]")]
    dns_servers: Vec<IpAddr>,
    /// Extra /etc/hosts entry `host:ip` (repeatable).
    #[arg(long = "add-host", value_name = "HOST:IP")]
    add_host: Vec<String>,
    /// Command and arguments (default: the image's CMD).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    command: Vec<String>,
}

fn host_env(key: &str) -> Option<String> {
    std::env::var(key).ok()
}

fn build_config(args: &RunArgs) -> Result<SandboxConfig> {
    let mut config = SandboxConfig::new(args.image.clone());
    for file in &args.env_file {
        let contents = std::fs::read_to_string(file).with_context(|| format!("cannot read env file {file}"))?;
        config.env.extend(parse_env_file(file, &contents, host_env)?);
    }
    for spec in &args.env {
        config.env.push(parse_env(spec, host_env)?);
    }
    for spec in &args.add_host {
        config.add_hosts.push(parse_add_host(spec)?);
    }
    if !args.dns_servers.is_empty() {
        config.dns_servers.clone_from(&args.dns_servers);
    }
    config.cpus = args.cpus;
    config.memory_mb = args.memory;
    config.disk_size_mb = args.disk_size;
    config.hostname.clone_from(&args.hostname);
    config.user.clone_from(&args.user);
    config.workdir.clone_from(&args.workdir);
    config.entrypoint = args.entrypoint.as_ref().map(|e| if e.is_empty() { Vec::new() } else { vec![e.clone()] });
    config.command.clone_from(&args.command);
    Ok(config)
}

/// Boots the sandbox, runs the command, tears down; returns the command's exit code.
/// With `MATCHLOCK_TIMING` set, prints how long each phase took on stderr.
pub async fn run(args: RunArgs) -> Result<u8> {
    let mode = match (args.interactive, args.tty) {
        (true, true) => {
            if !std::io::stdin().is_terminal() {
                bail!("-it requires a TTY (stdin is not a terminal)");
            }
            ExecMode::Tty
        }
        (true, false) => ExecMode::Pipe,
        _ => ExecMode::Stream,
    };
    let config = build_config(&args)?;
    let store = open_store()?;
    // Resolve the command before booting: a bad image or command fails fast.
    let image = store
        .get(&config.image)?
        .ok_or_else(|| matchlock_sandbox::SandboxError::ImageNotFound(config.image.clone()))?;
    let composed = compose(&image.config, &config)?;

    let mut sigint = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let mut sigterm = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut sighup = signal(SignalKind::hangup()).context("cannot handle SIGHUP")?;
    let mut sigwinch = signal(SignalKind::window_change()).context("cannot handle SIGWINCH")?;

    let mut sandbox = tokio::select! {
        created = Sandbox::create(config, &store) => created?,
        _ = sigint.recv() => bail!("interrupted while booting"),
        _ = sigterm.recv() => bail!("terminated while booting"),
        _ = sighup.recv() => bail!("hung up while booting"),
    };

    let request = ExecRequest {
        argv: composed.argv,
        env: composed.env,
        working_dir: Some(composed.working_dir),
        user: composed.user,
        window: (mode == ExecMode::Tty)
            .then(|| terminal::window_size().unwrap_or(matchlock_protocol::exec::WindowSize { rows: 24, cols: 80 })),
    };
    let (control_tx, control_rx) = mpsc::channel(8);
    let io = ExecIo {
        stdin: (mode != ExecMode::Stream).then(|| Box::new(tokio::io::stdin()) as _),
        stdout: Box::new(tokio::io::stdout()),
        stderr: Box::new(tokio::io::stderr()),
        control: control_rx,
    };
    let raw = if mode == ExecMode::Tty { Some(terminal::RawMode::enter()?) } else { None };
    let signals = async {
        loop {
            let control = tokio::select! {
                _ = sigint.recv() => Control::Terminate,
                _ = sigterm.recv() => Control::Terminate,
                _ = sighup.recv() => Control::Terminate,
                _ = sigwinch.recv() => match terminal::window_size() {
                    Some(ws) if mode == ExecMode::Tty => Control::Resize(ws),
                    _ => continue,
                },
            };
            if control_tx.send(control).await.is_err() {
                // exec has finished; its branch completes the select below.
                std::future::pending::<()>().await;
            }
        }
    };
    let exec_started = Instant::now();
    let result = tokio::select! {
        r = sandbox.exec(mode, &request, io) => r,
        () = signals => unreachable!("the signal loop never completes"),
    };
    drop(raw);
    let mut timings = sandbox.timings().to_vec();
    timings.push(("exec", exec_started.elapsed()));
    let close_started = Instant::now();
    let closed = sandbox.close().await;
    timings.push(("teardown", close_started.elapsed()));
    if std::env::var_os("MATCHLOCK_TIMING").is_some() {
        let phases: Vec<String> = timings.iter().map(|(name, d)| format!("{name}={}ms", d.as_millis())).collect();
        eprintln!("matchlock: timing {}", phases.join(" "));
    }
    let code = result?;
    closed?;
    Ok(u8::try_from(code).unwrap_or(255))
}
