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
    /// The rootfs could not be packed for the pod's VM.
    #[error("cannot pack the container's rootfs: {0}")]
    Pack(String),
    /// The process's executable is not in the rootfs.
    #[error("exec: {0:?}: executable file not found in the container's PATH or root file system")]
    NotFound(String),
    /// The process's executable is built for another machine.
    #[error("{0} is built for {1}, not for this host's x86_64 (an image for another architecture)")]
    Architecture(String, &'static str),
}

/// The container's first program: what must exist in the rootfs, for this host's machine.
#[derive(Debug, Clone)]
pub struct Entry {
    /// `args[0]` of the process.
    pub program: String,
    /// The process's `PATH`.
    pub path: String,
    /// Its working directory.
    pub cwd: String,
}

/// ELF machines a guest of this host runs: x86-64 and i386.
const RUNNABLE_MACHINES: [u16; 2] = [62, 3];

fn machine_name(machine: u16) -> &'static str {
    match machine {
        40 => "32-bit ARM",
        183 => "aarch64 (arm64)",
        243 => "riscv",
        21 => "ppc64",
        22 => "s390x",
        8 => "mips",
        _ => "another machine",
    }
}

/// Finds `entry`'s program in the root file system at `root` (every path resolved inside it,
/// its symlinks included, as the guest will) and checks that an ELF program is for this host.
/// Scripts and other files are left for the guest's kernel to judge.
fn check_entry(root: &Path, entry: &Entry) -> Result<(), RootfsError> {
    use rustix::fs::{openat2, Mode, OFlags, ResolveFlags};
    let dir =
        rustix::fs::open(root, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty()).map_err(|e| {
            RootfsError::Mount(
                "the root file system".into(),
                root.to_owned(),
                containerd_shim::Error::Other(e.to_string()),
            )
        })?;
    let candidates: Vec<String> = if entry.program.contains('/') {
        if entry.program.starts_with('/') {
            vec![entry.program.clone()]
        } else {
            vec![format!("{}/{}", entry.cwd, entry.program)]
        }
    } else {
        entry.path.split(':').filter(|d| !d.is_empty()).map(|d| format!("{d}/{}", entry.program)).collect()
    };
    for candidate in candidates {
        let flags = OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NONBLOCK;
        let Ok(fd) = openat2(&dir, candidate.as_str(), flags, Mode::empty(), ResolveFlags::IN_ROOT) else { continue };
        let file = std::fs::File::from(fd);
        let is_file = file.metadata().map(|m| m.is_file()).unwrap_or(false);
        if !is_file {
            continue;
        }
        let mut header = [0u8; 20];
        let n = std::io::Read::read(&mut &file, &mut header).unwrap_or(0);
        if n == 20 && header.starts_with(b"\x7fELF") {
            let machine = if header[5] == 2 {
                u16::from_be_bytes([header[18], header[19]])
            } else {
                u16::from_le_bytes([header[18], header[19]])
            };
            if !RUNNABLE_MACHINES.contains(&machine) {
                return Err(RootfsError::Architecture(candidate, machine_name(machine)));
            }
        }
        return Ok(());
    }
    Err(RootfsError::NotFound(entry.program.clone()))
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

/// Mounts containerd's `mounts` on `bundle/rootfs` (as containerd's own shims do), checks
/// that `entry` can run from it, runs `work` on the mounted tree (on a blocking thread), and
/// unmounts it whatever happened.
async fn with_mounted<T: Send + 'static>(
    mounts: &[Mount],
    bundle: &Path,
    entry: &Entry,
    work: impl FnOnce(&Path) -> Result<T, RootfsError> + Send + 'static,
) -> Result<T, RootfsError> {
    let target = bundle.join("rootfs");
    if mounts.is_empty() && !target.is_dir() {
        return Err(RootfsError::Missing(target));
    }
    let mut mounted = 0;
    let result = async {
        for m in mounts {
            containerd_shim::asynchronous::util::mount_rootfs(m, &target)
                .await
                .map_err(|e| RootfsError::Mount(format!("{} {}", m.type_, m.source), target.clone(), e))?;
            mounted += 1;
        }
        check_entry(&target, entry)?;
        let tree = target.clone();
        tokio::task::spawn_blocking(move || work(&tree)).await.map_err(|e| RootfsError::Join(e.to_string()))?
    }
    .await;
    for _ in 0..mounted {
        if let Err(e) = nix::mount::umount2(&target, nix::mount::MntFlags::MNT_DETACH) {
            tracing::warn!("cannot unmount {}: {e}", target.display());
        }
    }
    result
}

/// Converts the rootfs of container `id` into an image of our store, after checking that
/// `entry` can run from it.
pub async fn prepare(
    store_root: &Path,
    mounts: &[Mount],
    bundle: &Path,
    id: &str,
    entry: &Entry,
) -> Result<Rootfs, RootfsError> {
    let (key, private) = match cache_key(mounts) {
        Some(key) => (key, false),
        None => (format!("private:{}:{id}:{}", bundle.display(), std::process::id()), true),
    };
    let tag = tag_for(&key);
    let (image, store_root) = (tag.clone(), store_root.to_owned());
    with_mounted(mounts, bundle, entry, move |tree| {
        let mut store = open_store(&store_root)?;
        if !private && store.get(&image)?.is_some() {
            tracing::debug!("rootfs {image} is cached");
            return Ok(());
        }
        store.save_directory(&image, SOURCE, &key, &ImageConfig::default(), tree)?;
        Ok(())
    })
    .await?;
    Ok(Rootfs { tag, private })
}

/// The rootfs of a pod's container as a tar whose paths lie under `dest` (a guest path),
/// spooled in `tmp_dir`: what the pod's VM unpacks for the container. Owners, modes,
/// links and special files as they are; links never followed.
pub async fn pack(
    mounts: &[Mount],
    bundle: &Path,
    entry: &Entry,
    dest: &str,
    tmp_dir: &Path,
) -> Result<tempfile::NamedTempFile, RootfsError> {
    let (dest, tmp_dir) = (dest.trim_start_matches('/').to_owned(), tmp_dir.to_owned());
    with_mounted(mounts, bundle, entry, move |tree| {
        let err = |e: std::io::Error| RootfsError::Pack(e.to_string());
        let spool = tempfile::NamedTempFile::new_in(&tmp_dir).map_err(err)?;
        let mut tar = tar::Builder::new(std::io::BufWriter::new(spool.reopen().map_err(err)?));
        tar.follow_symlinks(false);
        tar.append_dir_all(&dest, tree).map_err(err)?;
        tar.into_inner().and_then(|mut w| std::io::Write::flush(&mut w)).map_err(err)?;
        Ok(spool)
    })
    .await
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

    fn entry(program: &str) -> Entry {
        Entry { program: program.into(), path: "/usr/bin:/bin".into(), cwd: "/".into() }
    }

    fn elf(machine: u16) -> Vec<u8> {
        let mut h = vec![0x7f, b'E', b'L', b'F', 2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 0];
        h.extend_from_slice(&machine.to_le_bytes());
        h.extend_from_slice(&[0; 44]);
        h
    }

    #[test]
    fn the_entry_is_found_inside_the_rootfs_and_must_be_for_this_machine() {
        let root = tempfile::tempdir().unwrap();
        let bin = root.path().join("bin");
        std::fs::create_dir(&bin).unwrap();
        std::fs::write(bin.join("native"), elf(62)).unwrap();
        std::fs::write(bin.join("arm"), elf(183)).unwrap();
        std::fs::write(bin.join("script"), "#!/bin/sh\n").unwrap();
        // An absolute symlink resolves inside the rootfs, never on the host.
        std::os::unix::fs::symlink("/bin/native", bin.join("link")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", bin.join("hostfile")).unwrap();
        for ok in ["native", "/bin/native", "script", "link"] {
            check_entry(root.path(), &entry(ok)).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        let err = check_entry(root.path(), &entry("arm")).unwrap_err().to_string();
        assert!(err.contains("aarch64") && err.contains("/bin/arm"), "{err}");
        assert!(matches!(check_entry(root.path(), &entry("missing")), Err(RootfsError::NotFound(_))));
        assert!(
            matches!(check_entry(root.path(), &entry("hostfile")), Err(RootfsError::NotFound(_))),
            "a link out of the rootfs does not reach the host's /etc/passwd"
        );
        let relative = Entry { program: "./native".into(), path: String::new(), cwd: "/bin".into() };
        check_entry(root.path(), &relative).unwrap();
    }

    #[test]
    fn tags_are_valid_store_references() {
        let tag = tag_for("overlay:/a:/b");
        assert!(matchlock_image::store::normalize_tag(&tag).is_ok(), "{tag}");
    }
}
