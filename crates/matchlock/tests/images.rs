//! Registry pulls and the image store, against a real registry (Debian's docker-registry)
//! on loopback, with fixtures pushed by skopeo.

mod common;

use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{fixture, isolated_home, ok, stderr, Registry};

fn oci(name: &str) -> String {
    format!("oci-archive:{}", fixture(name).display())
}

/// (number of layer blobs, bytes allocated by all blobs: layers and root file systems)
/// in a blob directory.
fn blob_usage(dir: &Path) -> (usize, u64) {
    std::fs::read_dir(dir).into_iter().flatten().flatten().fold((0, 0), |(n, bytes), e| {
        let name = e.file_name().to_string_lossy().into_owned();
        let layer = usize::from(name.ends_with(".layer"));
        let counted = name.ends_with(".layer") || name.ends_with(".ext4");
        (n + layer, bytes + if counted { e.metadata().unwrap().blocks() * 512 } else { 0 })
    })
}

/// A registry holding the layered fixture as `test/layered:latest`.
fn layered_registry() -> Registry {
    let registry = Registry::start(None);
    registry.push(&format!("docker-archive:{}", fixture("layered.tar").display()), "test/layered:latest", None);
    registry
}

#[test]
fn pull_then_run_with_whiteouts_multiarch_and_zstd() {
    let registry = layered_registry();
    registry.push(&oci("multiarch.tar"), "test/multi:latest", None);
    registry.push(&oci("nonroot.tar"), "test/nonroot:latest", None);
    let h = isolated_home();
    let reference = format!("{}/test/layered", registry.addr);
    let out = ok(&h.ml(&["pull", &reference]));
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], format!("Pulling {reference}..."));
    assert!(lines[1].starts_with("Digest: sha256:") && lines[2].starts_with("Size: "), "{out}");
    let script = "test -e /data/gone && echo present || echo deleted; ls /data/dir; readlink /bin/sh";
    let run = h.run(&["--image", &reference, "--entrypoint", "sh", "--", "-c", script]);
    assert_eq!(ok(&run), "deleted\nnew\nbusybox\n");
    // A multi-platform index resolves to linux/amd64; a zstd layer converts.
    let multi = format!("{}/test/multi", registry.addr);
    assert_eq!(ok(&h.run(&["--image", &multi, "--", "sh", "-c", "echo $ARCH"])), "amd64\n");
    let nonroot = format!("{}/test/nonroot", registry.addr);
    assert_eq!(
        ok(&h.run(&["--image", &nonroot, "--", "sh", "-c", "id -u; cat /etc/motd"])),
        "65534\ncompressed with zstd\n"
    );
    let ls = ok(&h.ml(&["image", "ls"]));
    assert!(ls.starts_with("TAG ") && ls.lines().next().unwrap().contains("SOURCE"), "{ls}");
    assert!(ls.contains(&format!("{reference}:latest")) && ls.contains("registry"), "{ls}");
}

#[test]
fn mirror_serves_docker_hub_names_and_the_cache_needs_no_registry() {
    let registry = Registry::start(None);
    registry.push(&oci("busybox.tar"), "library/busybox:latest", None);
    let h = isolated_home();
    let mirror = registry.addr.clone();
    let run = |extra: &[&str]| {
        let mut cmd = h.cmd();
        cmd.env("MATCHLOCK_REGISTRY_MIRROR", &mirror).arg("run").args(extra);
        let out = cmd.args(["--image", "busybox", "--", "echo", "hi"]).output().unwrap();
        h.assert_no_leftovers();
        out
    };
    let first = run(&[]);
    assert_eq!(ok(&first), "hi\n");
    assert!(stderr(&first).contains("Pulling busybox..."), "{}", stderr(&first));
    assert!(ok(&h.ml(&["image", "ls"])).contains("docker.io/library/busybox:latest"));
    drop(registry);
    // Cached: no registry contact at all.
    let second = run(&[]);
    assert_eq!(ok(&second), "hi\n");
    assert!(!stderr(&second).contains("Pulling"), "{}", stderr(&second));
    // --pull insists on the registry, which is gone.
    let forced = run(&["--pull"]);
    assert_eq!(forced.status.code(), Some(1));
    assert!(stderr(&forced).contains("cannot pull busybox"), "{}", stderr(&forced));
}

#[test]
fn registry_authentication() {
    let registry = Registry::start(Some(("alice", "s3cret")));
    registry.push(&oci("busybox.tar"), "private/busybox:latest", Some("alice:s3cret"));
    let h = isolated_home();
    let reference = format!("{}/private/busybox", registry.addr);
    let denied = h.ml(&["pull", &reference]);
    assert_eq!(denied.status.code(), Some(1));
    assert!(stderr(&denied).contains(&format!("authentication to {} failed", registry.addr)), "{}", stderr(&denied));
    let config = |user_pass: &str| h.docker_login(&registry.addr, user_pass);
    config("alice:wrong");
    let wrong = h.ml(&["pull", &reference]);
    assert_eq!(wrong.status.code(), Some(1));
    assert!(stderr(&wrong).contains("authentication"), "{}", stderr(&wrong));
    config("alice:s3cret");
    assert!(ok(&h.ml(&["pull", &reference])).contains("Digest: sha256:"));
}

#[test]
fn a_registry_serving_wrong_bytes_is_an_error_not_a_corrupt_cache() {
    let registry = Registry::start(None);
    registry.push(&oci("nonroot.tar"), "test/nonroot:latest", None);
    // Tamper with the zstd layer in the registry's storage, keeping its size.
    let blobs = registry.root.path().join("data/docker/registry/v2/blobs/sha256");
    let mut tampered = 0;
    for prefix in std::fs::read_dir(&blobs).unwrap().flatten() {
        for blob in std::fs::read_dir(prefix.path()).unwrap().flatten() {
            let data = blob.path().join("data");
            let mut bytes = std::fs::read(&data).unwrap();
            if bytes.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
                let last = bytes.len() - 1;
                bytes[last] ^= 0xff;
                std::fs::write(&data, bytes).unwrap();
                tampered += 1;
            }
        }
    }
    assert_eq!(tampered, 1);
    let h = isolated_home();
    let out = h.ml(&["pull", &format!("{}/test/nonroot", registry.addr)]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("corrupt data"), "{}", stderr(&out));
    // Only the intact base layer was stored; nothing half-written, no image recorded.
    assert_eq!(blob_usage(&h.blobs_dir()).0, 1);
    assert_eq!(std::fs::read_dir(h.blobs_dir().join("../tmp")).unwrap().count(), 0);
    assert_eq!(ok(&h.ml(&["image", "ls"])).lines().count(), 1);
}

#[test]
fn aliases_and_force_pulls_never_duplicate_blobs_and_rm_gc_reclaim_them() {
    let registry = layered_registry();
    let h = isolated_home();
    let reference = format!("{}/test/layered", registry.addr);
    ok(&h.ml(&["pull", &reference]));
    let usage = blob_usage(&h.blobs_dir());
    assert_eq!(usage.0, 3);
    let tagged = ok(&h.ml(&["pull", "-t", "layered:regression-alias", &reference]));
    assert!(tagged.contains("Tagged: layered:regression-alias"), "{tagged}");
    ok(&h.ml(&["pull", "--force", &reference]));
    ok(&h.ml(&["pull", "--force", &reference]));
    assert_eq!(blob_usage(&h.blobs_dir()), usage);
    let ls = ok(&h.ml(&["image", "ls"]));
    assert!(ls.lines().any(|l| l.starts_with("layered:regression-alias") && l.contains(" tag ")), "{ls}");

    assert_eq!(ok(&h.ml(&["image", "rm", "layered:regression-alias"])), "Removed layered:regression-alias\n");
    assert_eq!(blob_usage(&h.blobs_dir()), usage, "blobs still used by the registry image");
    assert_eq!(ok(&h.ml(&["image", "rm", &reference])), format!("Removed {reference}\n"));
    assert_eq!(blob_usage(&h.blobs_dir()), (0, 0), "removing the last image reclaims its blobs");
    let again = h.ml(&["image", "rm", &reference]);
    assert_ne!(again.status.code(), Some(0));
    assert_eq!(ok(&h.ml(&["image", "gc"])), "Removed 0 unreferenced blobs\n");
}

#[test]
fn concurrent_pulls_convert_each_layer_once() {
    let registry = layered_registry();
    let h = isolated_home();
    let reference = format!("{}/test/layered", registry.addr);
    let pulls: Vec<_> = (0..2).map(|_| h.spawn(&["pull", &reference])).collect();
    for p in pulls {
        ok(&p.wait_with_output().unwrap());
    }
    assert_eq!(blob_usage(&h.blobs_dir()).0, 3);
    assert_eq!(ok(&h.run(&["--image", &reference, "--entrypoint", "cat", "--", "/data/keep"])), "kept\n");
}

#[test]
fn an_interrupted_pull_leaves_no_half_blob() {
    let big = tempfile::tempdir().unwrap();
    let made = std::process::Command::new("python3")
        .arg(common::repo_root().join("tests/fixtures/make_images.py"))
        .arg(big.path())
        .arg("--big")
        .status()
        .unwrap();
    assert!(made.success());
    let registry = Registry::start(None);
    registry.push(&format!("oci-archive:{}", big.path().join("big.tar").display()), "test/big:latest", None);
    let h = isolated_home();
    let reference = format!("{}/test/big", registry.addr);
    let mut pull = h.cmd().args(["pull", &reference]).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 256];
    let err = pull.stderr.as_mut().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !String::from_utf8_lossy(&seen).contains("Layer 2/3") {
        assert!(Instant::now() < deadline, "pull never reached layer 2");
        let n = err.read(&mut buf).unwrap();
        assert!(n > 0, "pull ended early: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    pull.kill().unwrap();
    pull.wait().unwrap();
    // Blobs appear only by rename: whatever is there is complete and usable.
    for entry in std::fs::read_dir(h.blobs_dir()).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.ends_with(".ext4") && !name.starts_with('.') {
            let check = std::process::Command::new("debugfs").args(["-R", "stats"]).arg(entry.path()).output().unwrap();
            assert!(
                check.status.success() && !stderr(&check).contains("Bad magic"),
                "{name} is not a complete file system"
            );
        }
    }
    assert!(!ok(&h.ml(&["image", "ls"])).contains("test/big"));
    ok(&h.ml(&["image", "gc"]));
    let leftovers: Vec<_> =
        std::fs::read_dir(h.blobs_dir().join("../tmp")).unwrap().flatten().map(|e| e.path()).collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    assert!(!std::fs::read_dir(h.blobs_dir())
        .unwrap()
        .flatten()
        .any(|e| e.file_name().to_string_lossy().starts_with(".layer-")));
    // And the next pull completes.
    assert!(ok(&h.ml(&["pull", &reference])).contains("Digest: "));
    assert_eq!(blob_usage(&h.blobs_dir()).0, 3);
}

#[test]
fn pull_progress_is_bars_on_a_terminal_plain_lines_in_a_pipe_and_nothing_when_quiet() {
    let registry = layered_registry();
    let reference = format!("{}/test/layered", registry.addr);
    // A pipe: plain lines, no terminal control.
    let h = isolated_home();
    let piped = h.ml(&["pull", &reference]);
    ok(&piped);
    let lines = stderr(&piped);
    assert!(lines.contains("Layer 1/3: downloading") && lines.contains("Layer 3/3: converting"), "{lines}");
    assert!(!lines.contains('\x1b') && !lines.contains('\r'), "{lines:?}");
    // Quiet: nothing on stderr.
    let h = isolated_home();
    let quiet = h.ml(&["pull", "--quiet", &reference]);
    assert!(ok(&quiet).contains("Digest: sha256:") && stderr(&quiet).is_empty(), "{}", stderr(&quiet));
    // A terminal: a bar per layer with bytes and rate.
    let h = isolated_home();
    let mut cmd = h.cmd();
    cmd.args(["pull", &reference]);
    let (mut child, master) = common::spawn_in_pty(cmd, 24, 120);
    let seen = common::read_until(&master, "Size: ");
    assert!(child.wait().unwrap().success());
    let screen = seen.join().unwrap();
    assert!(screen.contains("Layer 1/3 [") && screen.contains("B/s"), "{screen:?}");
    assert!(screen.contains('\x1b'), "bars redraw in place: {screen:?}");
}

/// `matchlock <args>` with stdin from `input`, in a terminal: what the terminal showed once
/// `marker` appeared (the command having succeeded).
fn in_terminal(h: &common::Home, args: &[&str], input: Option<std::fs::File>, marker: &str) -> String {
    let mut cmd = h.cmd();
    cmd.args(args);
    let (mut child, master) = common::spawn_in_pty_reading(cmd, 24, 120, input);
    let seen = common::read_until(&master, marker);
    assert!(child.wait().unwrap().success(), "{args:?}");
    seen.join().unwrap()
}

#[test]
fn import_and_volume_cp_progress_is_bars_on_a_terminal_plain_lines_in_a_pipe_and_nothing_when_quiet() {
    let tarball = fixture("busybox.tar");
    let import = |h: &common::Home, args: &[&str]| {
        let input = std::fs::File::open(&tarball).unwrap();
        h.cmd().args(["image", "import"]).args(args).stdin(input).output().unwrap()
    };
    // A pipe: plain lines, no terminal control.
    let h = isolated_home();
    let piped = import(&h, &["busybox"]);
    assert!(ok(&piped).contains("Imported: busybox"));
    let lines = stderr(&piped);
    assert!(lines.starts_with("Importing busybox...\nRead ") && lines.contains("; converting the layers"), "{lines}");
    ok(&h.ml(&["volume", "create", "data", "--size", "32"]));
    let copied = h.ml(&["volume", "cp", "data", "copy"]);
    assert_eq!(ok(&copied), "Copied volume data to copy\n");
    let lines = lines + &stderr(&copied);
    assert!(lines.contains("Copying volume data ("), "{lines}");
    assert!(!lines.contains('\x1b') && !lines.contains('\r'), "{lines:?}");
    // Quiet: nothing on stderr.
    let h = isolated_home();
    let quiet = import(&h, &["--quiet", "busybox"]);
    assert!(ok(&quiet).contains("Imported: busybox") && stderr(&quiet).is_empty(), "{}", stderr(&quiet));
    ok(&h.ml(&["volume", "create", "data", "--size", "32"]));
    let quiet = h.ml(&["volume", "cp", "-q", "data", "copy"]);
    assert_eq!(ok(&quiet), "Copied volume data to copy\n");
    assert!(stderr(&quiet).is_empty(), "{}", stderr(&quiet));
    // A terminal: bars with bytes and rate, redrawn in place.
    let h = isolated_home();
    let input = std::fs::File::open(&tarball).unwrap();
    let screen = in_terminal(&h, &["image", "import", "busybox"], Some(input), "Size: ");
    assert!(screen.contains("Reading [") && screen.contains("B/s"), "{screen:?}");
    assert!(screen.contains("Converting the layers") && screen.contains('\x1b'), "{screen:?}");
    ok(&h.ml(&["volume", "create", "data", "--size", "32"]));
    let screen = in_terminal(&h, &["volume", "cp", "data", "copy"], None, "Copied volume");
    assert!(screen.contains("Copying data [") && screen.contains("B/s") && screen.contains('\x1b'), "{screen:?}");
}
