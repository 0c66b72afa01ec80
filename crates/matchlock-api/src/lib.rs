//! Configuration shared by the CLI, the JSON-RPC front end and the orchestrator.
#![forbid(unsafe_code)]

pub mod config;
pub mod paths;
pub mod rpc;

pub use config::{EnvError, SandboxConfig};
