//! `matchlock volume …`.

use anyhow::Result;
use matchlock_image::format_size;
use matchlock_sandbox::volumes::{self, Volume};

use crate::cli::VolumeCommand;

fn json(v: &Volume) -> serde_json::Value {
    serde_json::json!({ "name": v.name, "size": format_size(v.size), "path": v.path })
}

/// Runs a `volume` subcommand.
pub fn dispatch(cmd: VolumeCommand) -> Result<u8> {
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
