//! `matchlock volume …`.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::mpsc::RecvTimeoutError;
use std::time::Duration;

use anyhow::Result;
use matchlock_image::format_size;
use matchlock_sandbox::volumes::{self, Volume};

use clap::Subcommand;

use crate::progress::{mb, Output};

/// Bytes a file holds on disk (volumes are sparse).
fn allocated(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.blocks() * 512)
}

/// `volume cp` with the bytes copied as progress: the new volume's file, watched while it
/// grows, against what the source holds.
fn copy(source: &str, dest: &str, out: &Output) -> Result<()> {
    let from = volumes::path(source)?;
    let to = from.with_file_name(format!("{dest}.ext4"));
    let total = allocated(&from);
    out.plain(format_args!("Copying volume {source} ({} MB)...", mb(total)));
    let bar = out.bytes(format!("Copying {source}"), Some(total));
    let (stop, stopped) = std::sync::mpsc::channel::<()>();
    let (bar_ref, to) = (&bar, &to);
    let copied = std::thread::scope(|scope| {
        if out.is_bars() {
            scope.spawn(move || {
                while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(Duration::from_millis(100)) {
                    bar_ref.set_position(allocated(to).min(total));
                }
            });
        }
        let copied = volumes::copy(source, dest);
        drop(stop);
        copied
    });
    if copied.is_ok() {
        bar.set_position(total);
    }
    bar.finish();
    Ok(copied?)
}

fn json(v: &Volume) -> serde_json::Value {
    serde_json::json!({ "name": v.name, "size": format_size(v.size), "path": v.path })
}

/// `matchlock volume`.
#[derive(Debug, Subcommand)]
pub(crate) enum VolumeCommand {
    /// Create a volume.
    Create {
        /// Size in MB.
        #[arg(long, default_value_t = 10240)]
        size: u64,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
        /// Name (`[a-zA-Z0-9][a-zA-Z0-9_.-]*`).
        name: String,
    },
    /// List volumes.
    #[command(alias = "list")]
    Ls {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove a volume.
    #[command(alias = "remove")]
    Rm {
        /// Name.
        name: String,
    },
    /// Copy a volume (mode, owner and modification time kept).
    #[command(alias = "copy")]
    Cp {
        /// No progress on stderr (bytes copied: a bar on a terminal, lines otherwise).
        #[arg(short = 'q', long)]
        quiet: bool,
        /// Source volume.
        source: String,
        /// New volume.
        dest: String,
    },
}

/// Runs a `volume` subcommand.
pub(crate) fn dispatch(cmd: VolumeCommand) -> Result<u8> {
    match cmd {
        VolumeCommand::Create { size, json: as_json, name } => {
            let volume = volumes::create(&name, size)?;
            if as_json {
                outln!("{}", serde_json::to_string_pretty(&json(&volume))?)?;
            } else {
                outln!("Created volume {name} ({size} MB)")?;
            }
        }
        VolumeCommand::Ls { json: as_json } => {
            let all = volumes::list()?;
            if as_json {
                outln!("{}", serde_json::to_string_pretty(&all.iter().map(json).collect::<Vec<_>>())?)?;
            } else {
                let rows: Vec<Vec<String>> = all.iter().map(|v| vec![v.name.clone(), format_size(v.size)]).collect();
                crate::vms::print_table(&["NAME", "SIZE"], &rows)?;
            }
        }
        VolumeCommand::Rm { name } => {
            volumes::remove(&name)?;
            outln!("Removed volume {name}")?;
        }
        VolumeCommand::Cp { quiet, source, dest } => {
            copy(&source, &dest, &Output::new(quiet))?;
            outln!("Copied volume {source} to {dest}")?;
        }
    }
    Ok(0)
}
