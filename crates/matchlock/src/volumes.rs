//! `matchlock volume …`.

use anyhow::Result;
use matchlock_image::format_size;
use matchlock_sandbox::volumes::{self, Volume};

use clap::Subcommand;

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
        VolumeCommand::Cp { source, dest } => {
            volumes::copy(&source, &dest)?;
            outln!("Copied volume {source} to {dest}")?;
        }
    }
    Ok(0)
}
