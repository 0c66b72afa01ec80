//! Where matchlock keeps its cache (`~/.cache/matchlock`) and state (`~/.matchlock`).

use std::fs::{DirBuilder, File, OpenOptions, Permissions};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

fn home() -> PathBuf {
    std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from)
}

/// `$XDG_CACHE_HOME/matchlock`, else `~/.cache/matchlock`: kernels, images, tools.
pub fn cache_dir() -> PathBuf {
    match std::env::var_os("XDG_CACHE_HOME") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir).join("matchlock"),
        _ => home().join(".cache/matchlock"),
    }
}

/// `~/.matchlock`: per-VM state.
pub fn state_dir() -> PathBuf {
    home().join(".matchlock")
}

/// The directory holding every VM's directory.
pub fn vms_dir() -> PathBuf {
    state_dir().join("vms")
}

/// One VM's directory (`~/.matchlock/vms/<id>`): the one place the names of its files are
/// spelled. Sockets follow Firecracker's hybrid vsock model, which every backend provides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmDir(PathBuf);

impl VmDir {
    /// The directory of VM `id`.
    pub fn of(id: &str) -> Self {
        Self(vms_dir().join(id))
    }

    /// A VM directory at `path` (tests, and directories found by listing [`vms_dir`]).
    pub fn at(path: impl Into<PathBuf>) -> Self {
        Self(path.into())
    }

    /// The directory itself.
    pub fn path(&self) -> &Path {
        &self.0
    }

    /// `logs/`: every log of the VM.
    pub fn logs(&self) -> PathBuf {
        self.0.join("logs")
    }

    /// `logs/vm.log`: the guest's console, and a detached command's output.
    pub fn console_log(&self) -> PathBuf {
        self.0.join("logs/vm.log")
    }

    /// `logs/owner.log`: the detached owner process's own log.
    pub fn owner_log(&self) -> PathBuf {
        self.0.join("logs/owner.log")
    }

    /// `logs/<helper>.log`: a helper process's own output (`qemu`).
    pub fn helper_log(&self, helper: &str) -> PathBuf {
        self.0.join(format!("logs/{helper}.log"))
    }

    /// `upper.ext4`: the VM's writable root disk.
    pub fn upper_disk(&self) -> PathBuf {
        self.0.join("upper.ext4")
    }

    /// `upper-seed.tar`: files written into the upper disk when it is created (the CA).
    pub fn upper_seed(&self) -> PathBuf {
        self.0.join("upper-seed.tar")
    }

    /// `helpers`: the identities of the VM's helper processes, recorded at launch.
    pub fn helpers(&self) -> PathBuf {
        self.0.join("helpers")
    }

    /// `exec.sock`: the exec relay other processes reach the sandbox through.
    pub fn exec_socket(&self) -> PathBuf {
        self.0.join("exec.sock")
    }

    /// `net.sock`: where the VMM's NIC meets the host's network stack.
    pub fn net_socket(&self) -> PathBuf {
        self.0.join("net.sock")
    }

    /// `port-<port>.sock`: guest connections to host `port` arrive here, whatever the
    /// backend's transport.
    pub fn port_listener(&self, port: u32) -> PathBuf {
        self.0.join(format!("port-{port}.sock"))
    }

    /// `<name>.sock`: a backend's private socket (QEMU's `mux.sock` and `qmp.sock`).
    pub fn backend_socket(&self, name: &str) -> PathBuf {
        self.0.join(format!("{name}.sock"))
    }

    /// The Unix sockets in the directory (whatever created them).
    pub fn sockets(&self) -> Vec<PathBuf> {
        use std::os::unix::fs::FileTypeExt;
        let entries = std::fs::read_dir(&self.0).into_iter().flatten().flatten();
        entries.filter(|e| e.file_type().is_ok_and(|t| t.is_socket())).map(|e| e.path()).collect()
    }

    /// `audit.jsonl`: the sandbox's egress audit (see [`crate::audit`]).
    pub fn audit_log(&self) -> PathBuf {
        self.0.join("audit.jsonl")
    }

    /// `<kind>/mount-<index>`: host-side data of workspace mount `index` (`overlay`, `memory`).
    pub fn workspace_data(&self, kind: &str, index: usize) -> PathBuf {
        self.0.join(format!("{kind}/mount-{index:03}"))
    }
}

/// Opens (creating if needed) `path` and takes an advisory lock on it: exclusive, or
/// shared. The lock lasts as long as the returned file.
pub fn lock_file(path: &Path, exclusive: bool) -> std::io::Result<File> {
    let file = OpenOptions::new().create(true).truncate(false).write(true).mode(0o600).open(path)?;
    if exclusive {
        file.lock()?;
    } else {
        file.lock_shared()?;
    }
    Ok(file)
}

/// Creates `dir` and its missing parents private to the user (0700), and makes `dir` 0700
/// if it was there already: what a sandbox or the state keeps is nobody else's to read.
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    std::fs::set_permissions(dir, Permissions::from_mode(0o700))
}

/// Opens `path` for appending, created private to the user (0600) if missing.
pub fn append_private(path: &Path) -> std::io::Result<File> {
    OpenOptions::new().create(true).append(true).mode(0o600).open(path)
}

/// Makes the file `path` private to the user (0600), creating it empty if missing and
/// keeping what it holds: a SQLite database before it is opened (SQLite gives its `-wal` and
/// `-shm` files the database's mode).
pub fn make_private_file(path: &Path) -> std::io::Result<()> {
    append_private(path)?.set_permissions(Permissions::from_mode(0o600))
}

/// Creates (or truncates) `path` for writing, private to the user (0600).
pub fn create_private(path: &Path) -> std::io::Result<File> {
    let file = OpenOptions::new().create(true).truncate(true).write(true).mode(0o600).open(path)?;
    file.set_permissions(Permissions::from_mode(0o600))?;
    Ok(file)
}
