//! The container's root file system as a matchlock image: containerd's snapshotter has
//! prepared it (the `rootfs` mounts of CreateTask); we mount it on the bundle's `rootfs`,
//! copy the tree into an ext4 image of our store, and unmount it. An overlay whose upper
//! layer is still empty is the image's committed snapshot chain (its `lowerdir`s, which
//! never change): the image is keyed by that chain, so the next container of the same
//! image reuses it (and boots warm from the template made for it). Any other rootfs is
//! converted for this container only and removed with it.

use std::path::{Path, PathBuf};

use containerd_shim_protos::api::Mount;
use matchlock_image::{ImageConfig, Store, StoreError};
use sha2::{Digest, Sha256};

/// The image store source recorded for these images (`matchlock image ls` shows it).
pub const SOURCE: &str = "containerd";
/// The repository of the images made from containerd's snapshots.
const REPOSITORY: &str = "containerd-rootfs";

/// Errors preparing the root file system.
#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    /// Mounting what containerd prepared failed.
    #[error("cannot mount the container's rootfs ({0}) on {1}")]
    Mount(String, PathBuf, #[source] containerd_shim::Error),
    /// The image store failed.
    #[error("cannot store the container's rootfs")]
    Store(#[from] StoreError),
    /// The bundle's rootfs directory is missing.
    #[error("the bundle has no root file system: no rootfs mounts and no directory {0}")]
    Missing(PathBuf),
    /// The conversion thread failed.
    #[error("the rootfs conversion did not finish: {0}")]
    Join(String),
}

/// The converted root file system.
#[derive(Debug, Clone)]
pub struct Rootfs {
    /// Its tag in the image store.
    pub tag: String,
    /// Whether it belongs to this container alone (removed with it).
    pub private: bool,
}

/// What the mounts are: a key naming their content when it is immutable.
fn cache_key(mounts: &[Mount]) -> Option<String> {
    let [m] = mounts else { return None };
    if m.type_ != "overlay" {
        return None;
    }
    let option = |name: &str| m.options.iter().find_map(|o| o.strip_prefix(name).map(str::to_owned));
    let lower = option("lowerdir=")?;
    if let Some(upper) = option("upperdir=") {
        // A container restarted on its snapshot has content of its own.
        let empty = std::fs::read_dir(&upper).map(|mut d| d.next().is_none()).unwrap_or(false);
        if !empty {
            return None;
        }
    }
    Some(format!("overlay:{lower}"))
}

fn tag_for(key: &str) -> String {
    format!("{REPOSITORY}/{}:latest", &hex::encode(Sha256::digest(key.as_bytes()))[..32])
}

/// Converts the rootfs of container `id` (mounted on `bundle/rootfs`) into an image of `store`.
pub async fn prepare(store_root: &Path, mounts: &[Mount], bundle: &Path, id: &str) -> Result<Rootfs, RootfsError> {
    let target = bundle.join("rootfs");
    let (key, private) = match cache_key(mounts) {
        Some(key) => (key, false),
        None => (format!("private:{}:{id}:{}", bundle.display(), std::process::id()), true),
    };
    let tag = tag_for(&key);
    let mut store = open_store(store_root)?;
    if !private && store.get(&tag)?.is_some() {
        tracing::debug!("rootfs {tag} is cached");
        return Ok(Rootfs { tag, private });
    }
    if mounts.is_empty() && !target.is_dir() {
        return Err(RootfsError::Missing(target));
    }
    let mut mounted = Vec::new();
    let result = async {
        for m in mounts {
            containerd_shim::asynchronous::util::mount_rootfs(m, &target)
                .await
                .map_err(|e| RootfsError::Mount(format!("{} {}", m.type_, m.source), target.clone(), e))?;
            mounted.push(());
        }
        let (tag, target, key) = (tag.clone(), target.clone(), key.clone());
        tokio::task::spawn_blocking(move || {
            store.save_directory(&tag, SOURCE, &key, &ImageConfig::default(), &target).map(drop)
        })
        .await
        .map_err(|e| RootfsError::Join(e.to_string()))??;
        Ok(())
    }
    .await;
    for () in mounted {
        if let Err(e) = nix::mount::umount2(&target, nix::mount::MntFlags::MNT_DETACH) {
            tracing::warn!("cannot unmount {}: {e}", target.display());
        }
    }
    result.map(|()| Rootfs { tag, private })
}

/// Removes a container's private rootfs image (and its blob).
pub fn remove(store_root: &Path, rootfs: &Rootfs) -> Result<(), RootfsError> {
    if rootfs.private {
        open_store(store_root)?.remove(&rootfs.tag)?;
    }
    Ok(())
}

fn open_store(root: &Path) -> Result<Store, RootfsError> {
    Ok(Store::open(root)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn overlay(options: &[&str]) -> Mount {
        Mount {
            type_: "overlay".into(),
            source: "overlay".into(),
            options: options.iter().map(|s| (*s).to_owned()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn an_overlay_with_an_empty_upper_is_keyed_by_its_lower_chain() {
        let upper = tempfile::tempdir().expect("tmp");
        let up = format!("upperdir={}", upper.path().display());
        let a = cache_key(&[overlay(&["lowerdir=/s/2/fs:/s/1/fs", &up, "workdir=/w"])]);
        let b = cache_key(&[overlay(&["lowerdir=/s/2/fs:/s/1/fs", &up, "workdir=/other"])]);
        assert_eq!(a.as_deref(), Some("overlay:/s/2/fs:/s/1/fs"));
        assert_eq!(a, b, "the writable layer's paths do not change the content");
        assert_ne!(a, cache_key(&[overlay(&["lowerdir=/s/3/fs:/s/1/fs", &up])]));
        std::fs::write(upper.path().join("file"), "x").expect("write");
        assert_eq!(cache_key(&[overlay(&["lowerdir=/s/2/fs:/s/1/fs", &up])]), None, "an upper with content is private");
        let bind = Mount { type_: "bind".into(), source: "/snap/9".into(), ..Default::default() };
        assert_eq!(cache_key(&[bind]), None, "the native snapshotter's copies are private");
        assert_eq!(cache_key(&[]), None);
    }

    #[test]
    fn tags_are_valid_store_references() {
        let tag = tag_for("overlay:/a:/b");
        assert!(matchlock_image::store::normalize_tag(&tag).is_ok(), "{tag}");
    }
}
