//! Command-line definitions and dispatch.

use crate::volumes::VolumeCommand;
use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

/// Run untrusted code in micro-VMs booted from OCI images.
#[derive(Debug, Parser)]
#[command(name = "matchlock", version, about, propagate_version = true)]
pub(crate) struct Cli {
    /// Log level or `RUST_LOG`-style filter for matchlock's own log on stderr (`debug` tells
    /// where boot time goes); default `RUST_LOG`, else `warn`.
    #[arg(long, global = true, value_name = "LEVEL")]
    pub log_level: Option<String>,
    #[command(subcommand)]
    command: Command,
}

/// `matchlock allow-list`.
#[derive(Debug, Subcommand)]
pub(crate) enum AllowListCommand {
    /// Add hosts (globs, comma-separated) to the allow-list.
    Add {
        /// The sandbox.
        id: String,
        /// Hosts to add.
        #[arg(required = true, value_delimiter = ',')]
        hosts: Vec<String>,
    },
    /// Remove hosts from the allow-list.
    #[command(alias = "rm", alias = "remove")]
    Delete {
        /// The sandbox.
        id: String,
        /// Hosts to remove.
        #[arg(required = true, value_delimiter = ',')]
        hosts: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Boot a sandbox from an image and run a command in it.
    Run(Box<crate::run::RunArgs>),
    /// Serve sandboxes to AI agents as MCP tools (run code, run commands, keep sandboxes,
    /// move files) on stdio, or Streamable HTTP with --listen, under the policy these
    /// options fix.
    Mcp(Box<crate::mcp::McpArgs>),
    /// Run a command in a running sandbox.
    Exec(crate::vms::ExecArgs),
    /// List sandboxes.
    #[command(alias = "ls")]
    List {
        /// Only running sandboxes.
        #[arg(long, env = "MATCHLOCK_LIST_RUNNING")]
        running: bool,
        /// One JSON array (the `get` object of each sandbox) instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Print a sandbox's state as JSON.
    Get {
        /// The sandbox.
        id: String,
    },
    /// Print a sandbox's state and lifecycle history as JSON.
    #[command(alias = "stat")]
    Inspect {
        /// The sandbox.
        id: String,
    },
    /// Print a sandbox's log (console and command output).
    Log {
        /// Keep printing new output.
        #[arg(short = 'f', long)]
        follow: bool,
        /// The sandbox.
        id: String,
    },
    /// Print a sandbox's egress audit: every HTTP request, TCP flow, UDP exchange and DNS
    /// question the host handled for it, with what it decided (never a secret value, a body
    /// or a query value).
    Audit {
        /// JSON lines (the records as stored) instead of a table.
        #[arg(long)]
        json: bool,
        /// The HTTP(S) requests as one HAR 1.2 document (browsers' network panels and HAR
        /// viewers open it; refusals have status 0).
        #[arg(long, conflicts_with_all = ["json", "follow"])]
        har: bool,
        /// Only what the host refused.
        #[arg(long)]
        blocked: bool,
        /// Keep printing new records.
        #[arg(short = 'f', long)]
        follow: bool,
        /// The sandbox.
        id: String,
    },
    /// Running sandboxes' resource use, like `docker stats`: CPU (guest and host), memory,
    /// network in/out, workspace and disk bytes, processes, commands run.
    Stats {
        /// One reading instead of refreshing every second.
        #[arg(long)]
        no_stream: bool,
        /// JSON lines (one per sandbox and reading).
        #[arg(long)]
        json: bool,
        /// The sandboxes (every running one when none is given).
        ids: Vec<String>,
    },
    /// Show, or change while it runs, a sandbox's network budgets and rate limits and what
    /// it spent (the options as for `run`; `none` removes a limit).
    Limits {
        #[command(flatten)]
        limits: crate::run::LimitArgs,
        /// JSON instead of text.
        #[arg(long)]
        json: bool,
        /// The sandbox.
        id: String,
    },
    /// Stop running sandboxes.
    Kill {
        /// Stop every running sandbox.
        #[arg(long, env = "MATCHLOCK_KILL_ALL")]
        all: bool,
        /// The sandbox.
        id: Option<String>,
    },
    /// Change the network allow-list of a running sandbox.
    #[command(subcommand, name = "allow-list")]
    AllowList(AllowListCommand),
    /// Forward host ports to ports in a running sandbox until interrupted.
    #[command(name = "port-forward")]
    PortForward {
        /// Host addresses to listen on (IP literals or `localhost`).
        #[arg(long = "address", value_delimiter = ',', default_value = "127.0.0.1", value_name = "IP")]
        address: Vec<String>,
        /// The sandbox.
        id: String,
        /// `[LOCAL:]REMOTE` port mappings.
        #[arg(required = true, value_name = "[LOCAL:]REMOTE")]
        ports: Vec<String>,
    },
    /// Save a running sandbox (memory, devices, disk) as a named snapshot, or manage them.
    #[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
    Snapshot {
        #[command(subcommand)]
        action: Option<SnapshotCommand>,
        /// The running sandbox.
        #[arg(required = true)]
        id: Option<String>,
        /// The snapshot's name (letters, digits, '.', '_', '-').
        #[arg(required = true)]
        name: Option<String>,
    },
    /// Build an image from a Dockerfile, every RUN step in a micro-VM.
    Build(Box<crate::build::BuildArgs>),
    /// Save a sandbox's root file system changes as a new image (one layer on top of its
    /// image): a running one's processes are stopped for the moment it takes; a stopped one
    /// (`--rm=false`, `-d`, until `rm`) is read on a copy of its disk.
    Commit {
        /// A Dockerfile-style change to the image config: `CMD …`, `ENTRYPOINT …`,
        /// `ENV K=V`, `WORKDIR /p`, `USER u` (repeatable).
        #[arg(short = 'c', long = "change", value_name = "INSTRUCTION")]
        changes: Vec<String>,
        /// The sandbox (running, or stopped and not removed).
        id: String,
        /// Tag of the new image (`name[:tag]`).
        tag: String,
    },
    /// Start a new sandbox from a snapshot, its processes still running; prints its id.
    Restore {
        /// Values of the snapshot's secrets (`NAME@hosts` or `NAME=VALUE@hosts`); never saved.
        #[arg(long = "secret", value_name = "NAME[=VALUE]@HOSTS")]
        secrets: Vec<String>,
        /// The snapshot.
        name: String,
    },
    /// Start copies of a running sandbox (copy-on-write memory, own disks); prints their ids.
    Fork {
        /// How many.
        #[arg(short = 'n', long = "count", default_value_t = 1)]
        count: u32,
        /// Values of the sandbox's secrets (`NAME@hosts` or `NAME=VALUE@hosts`).
        #[arg(long = "secret", value_name = "NAME[=VALUE]@HOSTS")]
        secrets: Vec<String>,
        /// The running sandbox.
        id: String,
    },
    /// Remove stopped sandboxes.
    #[command(alias = "remove")]
    Rm {
        /// Remove every sandbox that is not running.
        #[arg(long, env = "MATCHLOCK_RM_STOPPED")]
        stopped: bool,
        /// The sandbox.
        id: Option<String>,
    },
    /// Remove all crashed and stopped sandboxes.
    Prune,
    /// Reclaim resources left behind by sandboxes whose owner died.
    Gc {
        /// Also reclaim sandboxes whose owner is alive (kills them).
        #[arg(long = "force-running")]
        force_running: bool,
        /// Only this sandbox.
        id: Option<String>,
    },
    /// Print the shell completion script (`source <(matchlock completion bash)`).
    Completion {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Write the man pages (`matchlock.1`, `matchlock-run.1`, …) into a directory.
    Man {
        /// Where to write them.
        #[arg(long = "out-dir", value_name = "DIR")]
        out_dir: std::path::PathBuf,
    },
    /// Pull an image from a registry.
    Pull {
        /// Also store the image under this tag.
        #[arg(short = 't', long)]
        tag: Option<String>,
        /// Download and convert every layer again.
        #[arg(long)]
        force: bool,
        /// No progress on stderr (bars on a terminal, lines otherwise).
        #[arg(short = 'q', long)]
        quiet: bool,
        /// The image (`alpine`, `localhost:5000/app:1`).
        reference: String,
    },
    /// Push a local image to a registry (same credentials and TLS rules as pull).
    Push {
        /// The local image.
        image: String,
        /// Where to (`localhost:5000/team/app:1`); the local name when absent.
        target: Option<String>,
    },
    /// Manage local images.
    #[command(subcommand)]
    Image(ImageCommand),
    /// Manage named volumes (ext4 disks for `run --disk @name:/path`).
    #[command(subcommand)]
    Volume(VolumeCommand),
    /// Manage the guest kernel.
    #[command(subcommand)]
    Kernel(KernelCommand),
    /// Serve the JSON-RPC API on stdin/stdout (what the SDKs drive): one sandbox per process.
    Rpc,
    /// Internal: the owner of a `run -d` sandbox (its arguments arrive on stdin).
    #[command(hide = true)]
    DetachedOwner,
    /// Print version information.
    Version,
    /// Check that this host can run sandboxes.
    Diagnose {
        /// Print the checks as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Install and configure what this host needs.
    #[command(subcommand)]
    Setup(SetupCommand),
}

#[derive(Debug, Subcommand)]
enum SnapshotCommand {
    /// List snapshots.
    #[command(alias = "list")]
    Ls {
        /// Print them as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove snapshots (sandboxes restored from them keep running).
    Rm {
        /// The snapshots.
        #[arg(required = true)]
        names: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
enum ImageCommand {
    /// Import a `docker save` or OCI-layout tarball from stdin.
    Import(ImportArgs),
    /// List images.
    #[command(alias = "list")]
    Ls {
        /// One JSON array instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Remove an image (its layers go when no image uses them).
    Rm {
        /// The image.
        tag: String,
    },
    /// Delete layer blobs no image uses (and the cached build steps that kept them).
    Gc,
    /// Write an image as a `docker save` archive (for `docker load`, skopeo, `image import`).
    Export {
        /// The file to write (default: stdout).
        #[arg(short = 'o', long = "output", value_name = "FILE")]
        output: Option<std::path::PathBuf>,
        /// The image.
        tag: String,
    },
}

#[derive(Debug, Args)]
struct ImportArgs {
    /// No progress on stderr (bytes read and the conversion: bars on a terminal, lines otherwise).
    #[arg(short = 'q', long)]
    quiet: bool,
    /// Tag to store the image under (`name[:tag]`).
    tag: String,
}

#[derive(Debug, Subcommand)]
enum SetupCommand {
    /// Debian packages and the guest kernel (idempotent).
    Linux {
        /// Do not install packages.
        #[arg(long)]
        skip_packages: bool,
        /// Do not build the guest kernel.
        #[arg(long)]
        skip_kernel: bool,
    },
    /// Give a user access to /dev/kvm (the kvm group; run as root).
    User {
        /// The user.
        name: String,
    },
}

#[derive(Debug, Subcommand)]
enum KernelCommand {
    /// Build the guest kernel from Debian's linux-source-6.1 (cached; takes minutes once).
    Build {
        /// No progress on stderr (a spinner per phase on a terminal, lines otherwise).
        #[arg(short = 'q', long)]
        quiet: bool,
    },
    /// Print the path of the kernel that `run` boots.
    Path,
}

/// Runs a parsed command line; returns the process exit code.
pub(crate) async fn dispatch(cli: Cli) -> Result<u8> {
    match cli.command {
        Command::Run(args) => Box::pin(crate::run::run(*args)).await,
        Command::Mcp(args) => Box::pin(crate::mcp::serve(*args)).await,
        Command::Exec(args) => crate::vms::exec(args).await,
        Command::List { running, json } => crate::vms::list(running, json),
        Command::Get { id } => crate::vms::get(&id),
        Command::Inspect { id } => crate::vms::inspect(&id),
        Command::Log { follow, id } => crate::vms::log(&id, follow).await,
        Command::Audit { json: _, har: true, blocked, id, .. } => crate::audit::har(&id, blocked),
        Command::Audit { json, har: false, blocked, follow, id } => {
            crate::audit::show(&id, json, blocked, follow).await
        }
        Command::Stats { no_stream, json, ids } => crate::stats::show(ids, no_stream, json).await,
        Command::Limits { limits, json, id } => crate::audit::limits(&id, &limits, json).await,
        Command::Kill { all, id } => crate::vms::kill_vms(id, all).await,
        Command::AllowList(AllowListCommand::Add { id, hosts }) => crate::vms::allow_list(&id, true, &hosts).await,
        Command::AllowList(AllowListCommand::Delete { id, hosts }) => crate::vms::allow_list(&id, false, &hosts).await,
        Command::PortForward { address, id, ports } => crate::vms::port_forward(&id, &ports, &address).await,
        Command::Rm { stopped, id } => crate::vms::rm(id, stopped),
        Command::Prune => crate::vms::prune(),
        Command::Snapshot { action: Some(SnapshotCommand::Ls { json }), .. } => crate::snapshots::list(json),
        Command::Snapshot { action: Some(SnapshotCommand::Rm { names }), .. } => crate::snapshots::remove(&names),
        Command::Snapshot { action: None, id, name } => {
            crate::snapshots::take(&id.unwrap_or_default(), &name.unwrap_or_default()).await
        }
        Command::Restore { secrets, name } => crate::snapshots::restore(&name, &secrets),
        Command::Fork { count, secrets, id } => crate::snapshots::fork(&id, count, &secrets).await,
        Command::Rpc => Box::pin(crate::rpc::serve()).await,
        Command::DetachedOwner => Box::pin(crate::run::detached_owner()).await,
        Command::Gc { force_running, id } => crate::vms::gc(id.as_deref(), force_running),
        Command::Pull { tag, force, quiet, reference } => {
            crate::images::pull(&reference, tag.as_deref(), force, quiet).await
        }
        Command::Completion { shell } => {
            let mut command = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut command, "matchlock", &mut std::io::stdout());
            Ok(0)
        }
        Command::Man { out_dir } => {
            std::fs::create_dir_all(&out_dir).with_context(|| format!("cannot create {}", out_dir.display()))?;
            let command = <Cli as clap::CommandFactory>::command();
            clap_mangen::generate_to(command, &out_dir)
                .with_context(|| format!("cannot write the man pages into {}", out_dir.display()))?;
            Ok(0)
        }
        Command::Push { image, target } => crate::images::push(&image, target.as_deref().unwrap_or(&image)).await,
        Command::Volume(cmd) => crate::volumes::dispatch(cmd),
        Command::Build(args) => Box::pin(crate::build::build(*args)).await,
        Command::Commit { changes, id, tag } => crate::images::commit(&id, &tag, &changes).await,
        Command::Image(ImageCommand::Ls { json }) => crate::images::list(json),
        Command::Image(ImageCommand::Rm { tag }) => crate::images::remove(&tag),
        Command::Image(ImageCommand::Gc) => crate::images::gc(),
        Command::Image(ImageCommand::Export { output, tag }) => crate::images::export(&tag, output.as_deref()),
        Command::Image(ImageCommand::Import(args)) => crate::images::import(&args.tag, args.quiet),
        Command::Kernel(KernelCommand::Build { quiet }) => {
            let path = crate::host::build_kernel(&crate::progress::Output::new(quiet))?;
            outln!("{}", path.display())?;
            Ok(0)
        }
        Command::Kernel(KernelCommand::Path) => {
            outln!("{}", matchlock_vm::kernel::locate()?.display())?;
            Ok(0)
        }
        Command::Diagnose { json } => crate::host::diagnose(json).await,
        Command::Setup(SetupCommand::Linux { skip_packages, skip_kernel }) => {
            crate::host::setup_linux(skip_packages, skip_kernel)
        }
        Command::Setup(SetupCommand::User { name }) => crate::host::setup_user(&name),
        Command::Version => {
            println!(
                "matchlock {} (commit: {}, built: {})",
                env!("CARGO_PKG_VERSION"),
                env!("MATCHLOCK_GIT_COMMIT"),
                env!("MATCHLOCK_BUILD_TIME")
            );
            Ok(0)
        }
    }
}
