//! `matchlock commit` on real VMs: a running sandbox's changes become an image that runs
//! like any other; what the host stored is checked in the layer tar itself. `image export`
//! writes archives another tool (skopeo) reads and another store imports; `push` sends an
//! image to a real registry (with authentication) that a clean store pulls from.

mod common;

use std::collections::BTreeSet;
use std::io::Read;

use common::{home, isolated_home, ok, stderr, stdout, Home, Registry};

/// The stored layer blobs of `h`'s image store.
fn blobs(h: &Home) -> BTreeSet<std::path::PathBuf> {
    std::fs::read_dir(h.blobs_dir())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "layer"))
        .collect()
}

/// (path, xattrs as `name=value`) of every entry of the tar at `path`.
fn entries(path: &std::path::Path) -> Vec<(String, Vec<String>)> {
    let mut archive = tar::Archive::new(std::fs::File::open(path).unwrap());
    let mut all = Vec::new();
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let name = entry.path().unwrap().to_string_lossy().trim_end_matches('/').to_owned();
        let mut xattrs = Vec::new();
        if let Some(pax) = entry.pax_extensions().unwrap() {
            for ext in pax {
                let ext = ext.unwrap();
                if let Some(attr) = ext.key().unwrap().strip_prefix("SCHILY.xattr.") {
                    xattrs.push(format!("{attr}={}", String::from_utf8_lossy(ext.value_bytes())));
                }
            }
        }
        let mut sink = Vec::new();
        entry.read_to_end(&mut sink).unwrap();
        all.push((name, xattrs));
    }
    all
}

#[test]
fn a_committed_sandbox_runs_as_an_image_with_its_changes() {
    // A store of its own: the blobs it gains are this commit's alone (the other tests of
    // this file commit and import concurrently).
    let h = isolated_home();
    ok(&h.import("layered", &common::fixture("layered.tar")));
    let ticker = "i=0; while :; do i=$((i+1)); echo $i > /root/tick; sleep 0.1; done";
    // (`layered` has an ENTRYPOINT that only prints its arguments.)
    let id = h.detach(&["--image", "layered", "--network-intercept", "--entrypoint", "", "--", "sh", "-c", ticker]);
    let changes = "echo data > /root/made && mkdir -p /opt/app && echo v1 > /opt/app/a \
        && ln /opt/app/a /opt/app/hard && ln -s a /opt/app/soft && chown 1000:1000 /opt/app/a \
        && chmod 640 /opt/app/a && mkfifo /opt/app/fifo && rm /data/link && rm -rf /data/dir \
        && mkdir /data/dir && echo fresh > /data/dir/only && echo more >> /data/keep";
    ok(&h.ml(&["exec", &id, "--", "sh", "-c", changes]));
    let before = blobs(&h);

    let bad = h.ml(&["commit", &id, "made:1", "--change", "RUN make"]);
    assert!(!bad.status.success() && stderr(&bad).contains("unsupported change"), "{}", stderr(&bad));
    let out = ok(&h.ml(&[
        "commit",
        &id,
        "made:1",
        "--change",
        "ENTRYPOINT []",
        "--change",
        r#"CMD ["cat", "/root/made"]"#,
        "--change",
        "ENV STAGE=committed",
    ]));
    assert!(out.starts_with("Committed: made:1\nLayers: 4\n"), "{out}");
    // The sandbox's processes run on after the moment they were stopped.
    let tick = |h: &Home| ok(&h.ml(&["exec", &id, "--", "cat", "/root/tick"]));
    let first = tick(&h);
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert_ne!(tick(&h), first, "the sandbox's command runs again after the commit");

    // What the host stored: one new layer, whiteouts in OCI form, the xattr of a copied-up
    // file kept, none of the files matchlock writes.
    let added: Vec<_> = blobs(&h).difference(&before).cloned().collect();
    assert_eq!(added.len(), 1, "{added:?}");
    let layer = entries(&added[0]);
    let names: BTreeSet<&str> = layer.iter().map(|(n, _)| n.as_str()).collect();
    for expected in [
        "root/made",
        "opt/app/a",
        "opt/app/hard",
        "opt/app/soft",
        "opt/app/fifo",
        "data/.wh.link",
        "data/dir/.wh..wh..opq",
        "data/dir/only",
    ] {
        assert!(names.contains(expected), "{expected} missing from the layer: {names:?}");
    }
    for own in [
        "etc/hostname",
        "etc/hosts",
        "etc/resolv.conf",
        "etc/ssl/certs/matchlock-ca.crt",
        "etc/ssl/certs/ca-certificates.crt",
    ] {
        assert!(!names.contains(own), "{own} is matchlock's, not the sandbox's: {names:?}");
    }
    let keep = layer.iter().find(|(n, _)| n == "data/keep").expect("the copied-up file");
    assert_eq!(keep.1, ["user.matchlock=xattr-value"]);

    // The image runs like any other: its config changes and every kind of change apply.
    let out = h.ml(&["run", "--image", "made:1"]);
    assert_eq!(stdout(&out), "data\n", "{}", stderr(&out));
    let check = "cat /opt/app/a; stat -c '%u:%g %a %h' /opt/app/a; readlink /opt/app/soft; \
        test -p /opt/app/fifo && echo fifo; ls /data/dir; test -e /data/link || echo no-link; \
        cat /data/keep; echo $STAGE; cat /etc/hostname";
    let out = h.ml(&["run", "--image", "made:1", "--hostname", "fresh", "--", "sh", "-c", check]);
    assert_eq!(
        stdout(&out),
        "v1\n1000:1000 640 2\na\nfifo\nonly\nno-link\nkept\nmore\ncommitted\nfresh\n",
        "{}",
        stderr(&out)
    );

    let missing = h.ml(&["commit", "vm-00000000", "x:1"]);
    assert!(!missing.status.success() && stderr(&missing).contains("not found"), "{}", stderr(&missing));
    ok(&h.ml(&["kill", &id]));
    ok(&h.ml(&["rm", &id]));
    ok(&h.ml(&["image", "rm", "made:1"]));
    h.assert_no_leftovers();
}

#[test]
fn an_exported_image_reads_in_skopeo_and_runs_from_another_store() {
    let h = home();
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("layered.tar");
    ok(&h.ml(&["image", "export", "layered", "-o", archive.to_str().unwrap()]));
    let missing = h.ml(&["image", "export", "nope", "-o", archive.to_str().unwrap()]);
    assert!(!missing.status.success() && stderr(&missing).contains("image not found: nope"), "{}", stderr(&missing));

    // Another tool reads it.
    let out = std::process::Command::new("skopeo")
        .args(["inspect", &format!("docker-archive:{}", archive.display())])
        .output()
        .expect("skopeo (installed by scripts/setup.sh)");
    assert!(out.status.success(), "skopeo: {}", String::from_utf8_lossy(&out.stderr));
    let inspected: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(inspected["Layers"].as_array().map(Vec::len), Some(3), "{inspected}");
    assert_eq!((inspected["Architecture"].as_str(), inspected["Os"].as_str()), (Some("amd64"), Some("linux")));
    assert!(inspected["Env"].as_array().unwrap().iter().any(|e| e == "FOO=image"), "{inspected}");

    // Another store imports it, and it runs the same.
    let other = isolated_home();
    ok(&other.import("again", &archive));
    let run = |home: &Home, image: &str| {
        let out = home.run(&[
            "--image",
            image,
            "--entrypoint",
            "",
            "--",
            "sh",
            "-c",
            "cat /data/keep; ls /data/dir; echo $FOO",
        ]);
        (stdout(&out), out.status.code())
    };
    assert_eq!(run(&other, "again"), run(&h, "layered"));
    assert_eq!(run(&other, "again").0, "kept\nnew\nimage\n");
}

#[test]
fn a_pushed_commit_pulls_into_a_clean_store_and_runs() {
    let registry = Registry::start(Some(("alice", "s3cret")));
    let h = home();
    let id = h.detach(&["--image", "busybox", "--", "sleep", "600"]);
    ok(&h.ml(&["exec", &id, "--", "sh", "-c", "echo pushed > /root/made && rm /etc/os-release"]));
    ok(&h.ml(&["commit", &id, "pushme:1", "--change", "CMD [\"cat\", \"/root/made\"]"]));
    ok(&h.ml(&["kill", &id]));
    ok(&h.ml(&["rm", &id]));
    let target = format!("{}/team/pushme:1", registry.addr);

    // Without credentials the registry refuses, and says so.
    let denied = h.ml(&["push", "pushme:1", &target]);
    assert!(!denied.status.success() && stderr(&denied).contains("authentication"), "{}", stderr(&denied));
    let missing = h.ml(&["push", "nope:1", &target]);
    assert!(stderr(&missing).contains("image not found: nope:1"), "{}", stderr(&missing));
    h.docker_login(&registry.addr, "alice:s3cret");
    let out = ok(&h.ml(&["push", "pushme:1", &target]));
    assert!(out.contains("Layers: 2"), "{out}");

    // What the registry really holds: skopeo reads the manifest with two layers.
    let inspected = std::process::Command::new("skopeo")
        .args(["inspect", "--tls-verify=false", "--creds", "alice:s3cret", &format!("docker://{target}")])
        .output()
        .unwrap();
    assert!(inspected.status.success(), "{}", String::from_utf8_lossy(&inspected.stderr));
    let inspected: serde_json::Value = serde_json::from_slice(&inspected.stdout).unwrap();
    assert_eq!(inspected["Layers"].as_array().map(Vec::len), Some(2), "{inspected}");

    // A clean store pulls it and it runs as committed.
    let clean = isolated_home();
    clean.docker_login(&registry.addr, "alice:s3cret");
    ok(&clean.ml(&["pull", &target]));
    let out = clean.run(&["--image", &target]);
    assert_eq!(stdout(&out), "pushed\n", "{}", stderr(&out));
    let out = clean.run(&["--image", &target, "--", "sh", "-c", "test -e /etc/os-release || echo deleted"]);
    assert_eq!(stdout(&out), "deleted\n", "{}", stderr(&out));
    h.assert_no_leftovers();
}

#[test]
fn a_stopped_sandbox_keeps_its_disk_until_removed_and_commits_what_it_wrote() {
    // A store of its own: the blob counts of the other tests stay theirs.
    let h = isolated_home();
    ok(&h.import("busybox", &common::fixture("busybox.tar")));
    let id = h.detach(&["--image", "busybox", "--", "sleep", "600"]);
    ok(&h.ml(&["exec", &id, "--", "sh", "-c", "echo kept > /root/kept && rm /bin/vi"]));
    ok(&h.ml(&["kill", &id]));
    let disk = h.vms_dir().join(&id).join("upper.ext4");
    assert!(disk.is_file(), "a stopped sandbox keeps its writable disk");
    let stamp = |p: &std::path::Path| {
        let m = std::fs::metadata(p).unwrap();
        (m.len(), m.modified().unwrap())
    };
    let stopped_disk = stamp(&disk);
    let out = ok(&h.ml(&["commit", &id, "from-stopped:1"]));
    assert!(out.contains("Committed: from-stopped:1"), "{out}");
    assert_eq!(stamp(&disk), stopped_disk, "the stopped sandbox's disk is left as it was (the helper used a copy)");
    let probe = "cat /root/kept; test -e /bin/vi || echo vi-gone";
    let seen = ok(&h.ml(&["run", "--image", "from-stopped:1", "--", "sh", "-c", probe]));
    assert_eq!(seen, "kept\nvi-gone\n");
    let listed = ok(&h.ml(&["list"]));
    assert_eq!(listed.lines().filter(|l| l.contains("running")).count(), 0, "the helper VM is gone: {listed}");
    ok(&h.ml(&["rm", &id]));
    h.assert_no_leftovers();
    let gone = h.ml(&["commit", &id, "x:1"]);
    assert!(!gone.status.success(), "a removed sandbox cannot be committed");
}
