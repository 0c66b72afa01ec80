//! Command-line definitions and dispatch.

use std::io::IsTerminal;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use matchlock_api::paths::cache_dir;
use matchlock_image::{format_size, Store};

/// Run untrusted code in micro-VMs booted from OCI images.
#[derive(Debug, Parser)]
#[command(name = "matchlock", version, about, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Boot a sandbox from an image and run a command in it.
    Run(Box<crate::run::RunArgs>),
    /// Manage local images.
    #[command(subcommand)]
    Image(ImageCommand),
    /// Manage the guest kernel.
    #[command(subcommand)]
    Kernel(KernelCommand),
    /// Print version information.
    Version,
}

#[derive(Debug, Subcommand)]
enum ImageCommand {
    /// Import a `docker save` or OCI-layout tarball from stdin.
    Import(ImportArgs),
}

#[derive(Debug, Args)]
struct ImportArgs {
    /// Tag to store the image under (`name[:tag]`).
    tag: String,
}

#[derive(Debug, Subcommand)]
enum KernelCommand {
    /// Build the guest kernel from Debian's linux-source-6.1 (cached; takes minutes once).
    Build,
    /// Print the path of the kernel that `run` boots.
    Path,
}

/// The image store under the cache directory.
pub fn open_store() -> Result<Store> {
    let root = cache_dir().join("images");
    Store::open(&root).with_context(|| format!("cannot open the image store at {}", root.display()))
}

/// Runs a parsed command line; returns the process exit code.
pub async fn dispatch(cli: Cli) -> Result<u8> {
    match cli.command {
        Command::Run(args) => crate::run::run(*args).await,
        Command::Image(ImageCommand::Import(args)) => {
            let stdin = std::io::stdin();
            if stdin.is_terminal() {
                bail!(
                    "image import reads an image tarball from stdin, e.g. `matchlock image import {} < image.tar`",
                    args.tag
                );
            }
            eprintln!("Importing {}...", args.tag);
            let mut store = open_store()?;
            // Nothing else runs on this runtime while importing, so blocking it is fine.
            let summary =
                store.import(&args.tag, &mut stdin.lock()).with_context(|| format!("cannot import {}", args.tag))?;
            println!("Imported: {}", summary.tag);
            println!("Layers: {}", summary.layers);
            println!("Size: {}", format_size(summary.size));
            Ok(0)
        }
        Command::Kernel(KernelCommand::Build) => {
            let path = matchlock_vm::kernel::build()?;
            println!("{}", path.display());
            Ok(0)
        }
        Command::Kernel(KernelCommand::Path) => {
            println!("{}", matchlock_vm::kernel::locate()?.display());
            Ok(0)
        }
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
