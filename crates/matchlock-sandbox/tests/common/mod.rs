//! Shared by the VM tests of this crate: the real kernel and guest-init, a private HOME.

use std::path::{Path, PathBuf};
use std::process::Command;

use matchlock_image::Store;

pub(crate) fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap()
}

/// Points matchlock at the real kernel and tools, and a private HOME and cache.
pub(crate) fn isolate(home: &Path) {
    let kernel = matchlock_vm::kernel::locate().expect("guest kernel: run scripts/setup.sh");
    let guest_init = match std::env::var_os("MATCHLOCK_GUEST_INIT") {
        Some(p) => PathBuf::from(p),
        None => {
            let out = Command::new("bash").arg(repo_root().join("scripts/build-guest.sh")).output().unwrap();
            assert!(out.status.success(), "build-guest.sh failed");
            PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
        }
    };
    std::env::set_var("MATCHLOCK_KERNEL", kernel);
    std::env::set_var("MATCHLOCK_GUEST_INIT", guest_init);
    std::env::set_var("HOME", home);
    std::env::set_var("XDG_CACHE_HOME", home.join("cache"));
}

/// A store under `home` holding the busybox fixture image.
pub(crate) fn busybox_store(home: &Path) -> Store {
    let fixtures = home.join("fixtures");
    let status =
        Command::new("python3").arg(repo_root().join("tests/fixtures/make_images.py")).arg(&fixtures).status().unwrap();
    assert!(status.success());
    let mut store = Store::open(&home.join("images")).unwrap();
    store.import("busybox", &mut std::fs::File::open(fixtures.join("busybox.tar")).unwrap()).unwrap();
    store
}
