//! OCI images for matchlock: import from `docker save` / OCI-layout tarballs, layer
//! conversion to read-only ext4 disks, and the content-addressed store.
//!
//! Each layer becomes its own ext4 image, named by its diff-id (the sha256 of the
//! uncompressed layer tar), so layers shared between images are stored once. The guest
//! stacks them with overlayfs; OCI whiteouts are converted to overlayfs whiteouts
//! (0:0 character devices and `trusted.overlay.opaque` directories) during conversion.
//! Conversion never extracts to the host file system and needs no root: `mke2fs -d`
//! builds the file system straight from a normalised tar stream.
#![forbid(unsafe_code)]

pub mod archive;
pub mod config;
pub mod copy;
pub mod diff;
pub mod dockerfile;
pub mod ext4;
pub mod layer;
pub mod registry;
pub mod store;

pub use config::{Healthcheck, ImageConfig};
pub use store::{ImageRecord, ImportSummary, Store, StoreError};

/// Formats a byte count as the CLI prints sizes (`12.3 MB`).
pub fn format_size(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / (1024.0 * 1024.0))
}
