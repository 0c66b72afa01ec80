//! Configuration shared by the CLI, the JSON-RPC front end and the orchestrator.
#![forbid(unsafe_code)]

pub mod audit;
pub mod config;
pub mod paths;
pub mod rpc;
pub mod stats;

pub use config::{EnvError, SandboxConfig};

/// The whole environment of every helper process a sandbox's owner starts (QEMU,
/// mke2fs): nothing is inherited from the owner, whose
/// environment may hold secret values, so a guest that escapes into a helper finds none.
pub const HELPER_ENV: [(&str, &str); 2] =
    [("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"), ("LC_ALL", "C")];
