//! Named volumes and `--disk`, against real VMs.

mod common;

use common::{fixture, isolated_home, ok, stderr, stdout, Home};

/// A HOME with volumes of its own and the busybox image.
fn home_with_busybox() -> Home {
    let h = isolated_home();
    ok(&h.import("busybox", &fixture("busybox.tar")));
    h
}

#[test]
fn volume_create_ls_rm() {
    let h = isolated_home();
    let created = ok(&h.ml(&["volume", "create", "vol-a", "--size", "32"]));
    assert_eq!(created, "Created volume vol-a (32 MB)\n");
    let dup = h.ml(&["volume", "create", "vol-a", "--size", "32"]);
    assert!(stderr(&dup).contains("named volume already exists: vol-a"), "{}", stderr(&dup));
    let json: serde_json::Value =
        serde_json::from_str(&ok(&h.ml(&["volume", "create", "vol-b", "--size", "16", "--json"]))).unwrap();
    assert_eq!(json["size"], "16.0 MB");
    assert!(json["path"].as_str().unwrap().ends_with("volumes/vol-b.ext4"));
    let ls = ok(&h.ml(&["volume", "ls"]));
    assert_eq!(ls.lines().next().unwrap().split_whitespace().collect::<Vec<_>>(), ["NAME", "SIZE"]);
    assert!(ls.contains("vol-a") && ls.contains("32.0 MB") && !ls.contains("PATH"), "{ls}");
    let listed: serde_json::Value = serde_json::from_str(&ok(&h.ml(&["volume", "ls", "--json"]))).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 2);
    assert_eq!(ok(&h.ml(&["volume", "rm", "vol-a"])), "Removed volume vol-a\n");
    let again = h.ml(&["volume", "rm", "vol-a"]);
    assert_eq!(again.status.code(), Some(1));
    assert!(stderr(&again).contains("named volume not found: vol-a"));
    for bad in ["-x", "a/b", "../up"] {
        assert_eq!(h.ml(&["volume", "create", bad, "--size", "16"]).status.code(), Some(1), "{bad}");
    }
}

#[test]
fn volumes_persist_across_runs_and_copies_keep_owner_and_mode() {
    let h = home_with_busybox();
    ok(&h.ml(&["volume", "create", "data", "--size", "32"]));
    ok(&h.run(&[
        "--image",
        "busybox",
        "--disk",
        "@data:/foo",
        "--",
        "sh",
        "-c",
        "echo persisted > /foo/file; chown 65534:65534 /foo/file; chmod 640 /foo/file",
    ]));
    assert_eq!(ok(&h.run(&["--image", "busybox", "--disk", "@data:/foo", "--", "cat", "/foo/file"])), "persisted\n");
    assert_eq!(ok(&h.ml(&["volume", "cp", "data", "copy"])), "Copied volume data to copy\n");
    let stat = "stat -c '%u:%g %a' /v/file; cat /v/file";
    assert_eq!(
        ok(&h.run(&["--image", "busybox", "--disk", "@copy:/v:ro", "--", "sh", "-c", stat])),
        "65534:65534 640\npersisted\n"
    );
    let exists = h.ml(&["volume", "cp", "data", "copy"]);
    assert!(stderr(&exists).contains("named volume already exists: copy"), "{}", stderr(&exists));
    // Volumes belong to their cache: another user's HOME does not see them.
    let other = isolated_home();
    let missing = other.ml(&["volume", "cp", "data", "copy2"]);
    assert!(stderr(&missing).contains("named volume not found: data"), "{}", stderr(&missing));
}

#[test]
fn read_only_disks_reject_writes_and_stay_unchanged() {
    let h = home_with_busybox();
    ok(&h.ml(&["volume", "create", "ro", "--size", "16"]));
    let image = h.cache_dir().join("volumes/ro.ext4");
    let before = std::fs::read(&image).unwrap();
    let disk = format!("{}:/data:ro", image.display());
    let out = h.run(&["--image", "busybox", "--disk", &disk, "--", "sh", "-c", "touch /data/x 2>&1; ls /data"]);
    assert!(stdout(&out).contains("Read-only file system"), "{}", stdout(&out));
    assert!(std::fs::read(&image).unwrap() == before, "a read-only disk changed on the host");
}

#[test]
fn bad_disk_specs_fail_before_booting() {
    let h = home_with_busybox();
    for (spec, message) in [
        ("@nope:/x", "named volume not found: nope"),
        ("/no/such/file.ext4:/x", "disk image not found"),
        ("@x:relative", "invalid disk"),
        ("@x:/a/../b", "invalid disk"),
    ] {
        let out = h.run(&["--image", "busybox", "--disk", spec, "--", "true"]);
        assert_eq!(out.status.code(), Some(1), "{spec}");
        assert!(stderr(&out).contains(message), "{spec}: {}", stderr(&out));
    }
}
