//! The workspace file system against real VMs: host directories served over vsock into a
//! FUSE mount in the guest, in overlay, host_fs and read-only modes.

mod common;

use std::path::Path;

use common::{debian_image, home, ok, stderr, stdout};

fn write(path: &Path, data: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, data).unwrap();
}

fn snapshot(dir: &Path) -> Vec<(String, Vec<u8>, u32)> {
    use std::os::unix::fs::PermissionsExt;
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let meta = std::fs::symlink_metadata(e.path()).unwrap();
            if meta.is_dir() {
                stack.push(e.path());
            }
            let data = if meta.is_file() { std::fs::read(e.path()).unwrap() } else { Vec::new() };
            out.push((e.path().display().to_string(), data, meta.permissions().mode()));
        }
    }
    out.sort();
    out
}

#[test]
fn host_fs_overlay_and_read_only_mounts() {
    let h = home();
    let host = tempfile::tempdir().unwrap();
    let (repo, data, ro) = (host.path().join("repo"), host.path().join("data"), host.path().join("ro"));
    write(&repo.join("README"), "hello from the host\n");
    write(&data.join("keep/original.txt"), "original\n");
    write(&ro.join("fixed.txt"), "fixed\n");
    // A symlink inside a mount that points outside of it, and a secret next to the mounts.
    write(&host.path().join("secret.txt"), "host secret\n");
    std::os::unix::fs::symlink(host.path().join("secret.txt"), repo.join("escape")).unwrap();
    std::os::unix::fs::symlink("../secret.txt", repo.join("escape-rel")).unwrap();
    let data_before = snapshot(&data);
    let ro_before = snapshot(&ro);
    let script = r#"
set -e
cd /workspace/repo
cat README
echo "from the guest" > created.txt
mkdir -p sub/dir && echo nested > sub/dir/file
mv created.txt renamed.txt
echo locked > HEAD.lock && mv HEAD.lock HEAD
mv sub moved-sub && cat moved-sub/dir/file
chmod 700 renamed.txt && stat -c %a renamed.txt
cd moved-sub && pwd -P && cd ..
dd if=/dev/urandom of=big.bin bs=1M count=4 2>/dev/null && md5sum big.bin
ls /workspace
readlink escape-rel
cat escape 2>&1 || echo "escape-blocked"
cat escape-rel 2>&1 || echo "escape-rel-blocked"
ln -s /etc/passwd to-passwd && echo "symlink-made"
touch -d "2020-01-02 03:04:05" renamed.txt && stat -c mtime=%Y renamed.txt
df -k /workspace/repo | tail -1 | awk '{ print ($2 > 0 ? "df-size-ok" : "df-size-zero") }'
cat ../data/keep/original.txt
echo changed > ../data/keep/original.txt && rm ../data/keep/original.txt && echo overlay-delete-ok
echo fresh > ../data/new.txt && cat ../data/new.txt
ls ../data/keep | wc -l
echo nope > ../ro/x 2>/dev/null || echo "ro-write-refused"
rm ../ro/fixed.txt 2>/dev/null || echo "ro-rm-refused"
cat ../ro/fixed.txt
"#;
    let out = h.run(&[
        "--image",
        "busybox",
        "-v",
        &format!("{}:repo:host_fs", repo.display()),
        "-v",
        &format!("{}:/workspace/data", data.display()),
        "-v",
        &format!("{}:ro:ro", ro.display()),
        "--",
        "sh",
        "-c",
        script,
    ]);
    let (o, e) = (stdout(&out), stderr(&out));
    assert!(out.status.success(), "stdout:\n{o}\nstderr:\n{e}");
    assert!(o.starts_with("hello from the host\n"), "{o}");
    assert!(o.contains("nested\n700\n/workspace/repo/moved-sub\n"), "{o}");
    let guest_md5 = o.lines().find(|l| l.ends_with("big.bin")).unwrap().split(' ').next().unwrap().to_owned();
    let host_md5 =
        String::from_utf8(std::process::Command::new("md5sum").arg(repo.join("big.bin")).output().unwrap().stdout)
            .unwrap();
    assert!(host_md5.starts_with(&guest_md5), "byte-exact large file: {guest_md5} vs {host_md5}");
    assert!(o.contains("data\nrepo\nro\n"), "synthesized workspace root: {o}");
    assert!(o.contains("escape-blocked") && o.contains("escape-rel-blocked"), "{o}");
    assert!(!o.contains("host secret"), "a symlink led out of the mount:\n{o}");
    assert!(o.contains("symlink-made") && o.contains("\n../secret.txt\n"), "symlinks are shown as symlinks:\n{o}");
    assert!(o.contains("\nmtime=1577934245\n") && o.contains("\ndf-size-ok\n"), "utimens and statfs:\n{o}");
    let mtime = std::fs::metadata(repo.join("renamed.txt")).unwrap().modified().unwrap();
    assert_eq!(mtime.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs(), 1_577_934_245, "the host file's mtime");
    assert!(o.contains("original\noverlay-delete-ok\nfresh\n0\n"), "{o}");
    assert!(o.contains("ro-write-refused") && o.contains("ro-rm-refused") && o.ends_with("fixed\n"), "{o}");
    // host_fs changed the host; overlay and ro did not.
    assert_eq!(std::fs::read_to_string(repo.join("renamed.txt")).unwrap(), "from the guest\n");
    assert_eq!(std::fs::read_to_string(repo.join("HEAD")).unwrap(), "locked\n");
    assert_eq!(std::fs::read_to_string(repo.join("moved-sub/dir/file")).unwrap(), "nested\n");
    assert_eq!(std::fs::read_link(repo.join("to-passwd")).unwrap(), Path::new("/etc/passwd"));
    assert_eq!(snapshot(&data), data_before, "overlay changed the host directory");
    assert_eq!(snapshot(&ro), ro_before);
    assert_eq!(std::fs::read_to_string(host.path().join("secret.txt")).unwrap(), "host secret\n");
}

#[test]
fn workspace_flags_are_validated() {
    let h = home();
    let dir = tempfile::tempdir().unwrap();
    let missing = h.run(&["--image", "busybox", "-v", "/nonexistent-matchlock-dir:src", "--", "true"]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(stderr(&missing).contains("host path does not exist: /nonexistent-matchlock-dir"), "{}", stderr(&missing));
    let outside = h.run(&["--image", "busybox", "-v", &format!("{}:/etc", dir.path().display()), "--", "true"]);
    assert!(
        stderr(&outside).contains(r#"guest path must be within workspace: "/etc" not in "/workspace""#),
        "{}",
        stderr(&outside)
    );
    let alone = h.run(&["--image", "busybox", "--workspace", "/workspace", "--", "true"]);
    assert!(stderr(&alone).contains("--workspace requires at least one -v mount"), "{}", stderr(&alone));
    std::fs::write(dir.path().join("notes.txt"), "single file\n").unwrap();
    let single = h.run(&[
        "--image",
        "busybox",
        "-v",
        &format!("{}:notes.txt:host_fs", dir.path().join("notes.txt").display()),
        "--",
        "sh",
        "-c",
        "ls -l /workspace | grep -c '^-'; cat /workspace/notes.txt; echo appended >> /workspace/notes.txt",
    ]);
    assert_eq!(ok(&single), "1\nsingle file\n", "a single-file mount is a file");
    assert_eq!(std::fs::read_to_string(dir.path().join("notes.txt")).unwrap(), "single file\nappended\n");
    let custom = h.run(&[
        "--image",
        "busybox",
        "--workspace",
        "/code",
        "-v",
        &format!("{}:project:ro", dir.path().display()),
        "--",
        "sh",
        "-c",
        "ls -d /code/project",
    ]);
    assert_eq!(ok(&custom), "/code/project\n");
}

#[test]
fn git_works_in_a_host_fs_mount() {
    let h = home();
    let repo = tempfile::tempdir().unwrap();
    let script = r#"
set -e
export GIT_AUTHOR_NAME=t GIT_AUTHOR_EMAIL=t@t GIT_COMMITTER_NAME=t GIT_COMMITTER_EMAIL=t@t
cd /workspace/repo
git init -q -b main .
echo one > file.txt
git add file.txt
git commit -q -m first
git checkout -q -b feature
echo two >> file.txt
git commit -q -am second
git checkout -q main
cat file.txt
git status --porcelain | wc -l
git log --oneline --all | wc -l
"#;
    let out = h.run(&[
        "--image",
        debian_image(),
        "-v",
        &format!("{}:repo:host_fs", repo.path().display()),
        "--",
        "sh",
        "-c",
        script,
    ]);
    assert_eq!(ok(&out), "one\n0\n2\n", "{}", stderr(&out));
    // The repository is a real one on the host.
    let log = std::process::Command::new("git")
        .args(["-C", &repo.path().display().to_string(), "log", "--oneline", "feature"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&log.stdout).lines().count(), 2);
}

#[test]
fn two_sandboxes_share_a_read_only_mount() {
    let (h1, h2) = (home(), home());
    let shared = tempfile::tempdir().unwrap();
    write(&shared.path().join("dataset.csv"), "a,b\n1,2\n");
    let spec = format!("{}:data:ro", shared.path().display());
    let spawn = |h: &common::Home| {
        h.cmd()
            .args(["run", "--image", "busybox", "-v", &spec, "--", "sh", "-c"])
            .arg("cat /workspace/data/dataset.csv; touch /workspace/data/x 2>/dev/null || echo refused")
            .output()
            .unwrap()
    };
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| spawn(&h1));
        let b = s.spawn(|| spawn(&h2));
        (a.join().unwrap(), b.join().unwrap())
    });
    for out in [a, b] {
        assert_eq!(ok(&out), "a,b\n1,2\nrefused\n");
    }
    assert_eq!(std::fs::read_dir(shared.path()).unwrap().count(), 1);
}

#[test]
fn vfs_block_rules_refuse_operations_with_eperm() {
    let h = home();
    let dir = tempfile::tempdir().unwrap();
    write(&dir.path().join("app/.env"), "TOKEN=host-only\n");
    write(&dir.path().join("app/main.py"), "print(1)\n");
    write(&dir.path().join("app/hidden.txt"), "listed, never looked up\n");
    write(&dir.path().join("app/log.txt"), "keep\n");
    let rules = dir.path().join("rules.json");
    std::fs::write(
        &rules,
        r#"{"rules": [{"name": "no-dotenv", "ops": ["open", "create", "write"], "path": "/workspace/app/.env", "action": "block"},
                      {"name": "no-keys", "ops": ["create"], "path": "/workspace/app/*.pem", "action": "block"},
                      {"name": "unseen", "ops": ["stat"], "path": "/workspace/app/hidden.txt", "action": "block"},
                      {"name": "append-only", "ops": ["truncate"], "path": "/workspace/app/log.txt", "action": "block"}]}"#,
    )
    .unwrap();
    let out = h.run(&[
        "--image",
        "busybox",
        "-v",
        &format!("{}:app:host_fs", dir.path().join("app").display()),
        "--vfs-rules",
        &rules.display().to_string(),
        "--",
        "sh",
        "-c",
        "cat /workspace/app/.env || echo read-blocked; echo k > /workspace/app/key.pem || echo create-blocked; \
         cat /workspace/app/main.py; echo ok > /workspace/app/new.txt && echo write-ok; ls -a /workspace/app | grep -c env; \
         for f in /workspace/app/*; do echo $f; done | grep -c hidden; \
         stat /workspace/app/hidden.txt >/dev/null || echo stat-blocked; \
         echo x > /workspace/app/log.txt || echo truncate-blocked; echo more >> /workspace/app/log.txt && echo append-ok",
    ]);
    let (o, e) = (stdout(&out), stderr(&out));
    assert!(out.status.success(), "{o}\n{e}");
    // A listing names the file, yet looking it up still meets its rule (no listing answers
    // lookups while rules are in force).
    assert_eq!(
        o,
        "read-blocked\ncreate-blocked\nprint(1)\nwrite-ok\n1\n1\nstat-blocked\ntruncate-blocked\nappend-ok\n"
    );
    assert!(e.contains("Operation not permitted"), "{e}");
    assert!(!dir.path().join("app/key.pem").exists());
    // A truncating open (one request to the host) meets the truncate rule; appending to the
    // same file does not.
    assert_eq!(std::fs::read_to_string(dir.path().join("app/log.txt")).unwrap(), "keep\nmore\n");
    let bad = h.run(&["--image", "busybox", "--vfs-rules", &rules.display().to_string(), "--", "true"]);
    assert!(stderr(&bad).contains("VFS rules require -v mounts"), "{}", stderr(&bad));
}

#[test]
fn guest_and_host_edits_stay_coherent_through_the_caches() {
    let h = home();
    let dir = tempfile::tempdir().unwrap();
    write(&dir.path().join("old.txt"), "old\n");
    write(&dir.path().join("grow.txt"), "1\n");
    let spec = format!("{}:w:host_fs", dir.path().display());
    let id = ok(&h.ml(&["run", "-d", "--image", debian_image(), "-v", &spec])).trim().to_owned();
    let exec = |script: &str| {
        let out = h.ml(&["exec", &id, "--", "bash", "-c", script]);
        assert!(out.status.success(), "{script}: {}", stderr(&out));
        stdout(&out)
    };
    // The guest's own changes show at once, in a directory whose listing it just cached.
    let own = exec(
        "set -e; cd /workspace/w; ls >/dev/null; [ ! -e new ] && echo missing
         echo x > new; [ -e new ] && echo created; rm new; [ ! -e new ] && echo removed
         mkdir d; echo y > d/f; mv d e; [ ! -e d ] && cat e/f
         printf 12345 > grow.txt; stat -c %s grow.txt",
    );
    assert_eq!(own, "missing\ncreated\nremoved\ny\n5\n");
    assert_eq!(std::fs::read_to_string(dir.path().join("e/f")).unwrap(), "y\n");
    // Positive control: the guest has cached the old state (listing, negative entry, size)...
    assert_eq!(exec("cd /workspace/w; ls >/dev/null; [ ! -e late ] && cat old.txt && stat -c %s grow.txt"), "old\n5\n");
    // ...and sees the host's changes within the caches' time (1 s each: at most 2 s).
    let started = std::time::Instant::now();
    std::fs::write(dir.path().join("late"), "late\n").unwrap();
    std::fs::remove_file(dir.path().join("old.txt")).unwrap();
    std::fs::write(dir.path().join("grow.txt"), "123456789").unwrap();
    let seen = exec(
        "cd /workspace/w; until [ -e late ] && [ ! -e old.txt ] && [ $(stat -c %s grow.txt) = 9 ]; do sleep 0.05; done; cat late",
    );
    assert_eq!(seen, "late\n");
    assert!(started.elapsed() < std::time::Duration::from_secs(4), "took {:?}", started.elapsed());
    // Both sides writing into one directory at once: everything lands on both sides.
    let guest = std::thread::scope(|s| {
        let guest = s.spawn(|| exec("cd /workspace/w; for i in $(seq 40); do echo g$i > g$i; done; echo done"));
        for i in 1..=40 {
            std::fs::write(dir.path().join(format!("h{i}")), format!("h{i}\n")).unwrap();
        }
        guest.join().unwrap()
    });
    assert_eq!(guest, "done\n");
    for i in 1..=40 {
        assert_eq!(std::fs::read_to_string(dir.path().join(format!("g{i}"))).unwrap(), format!("g{i}\n"));
    }
    let listed = exec(
        "cd /workspace/w; until [ $(ls | grep -c '^[gh][0-9]') = 80 ]; do sleep 0.05; done; cat h40 g40; ls | wc -l",
    );
    assert_eq!(listed, "h40\ng40\n83\n", "e, grow.txt, late and the 80 written");
    // A file opened again unchanged is read from the guest's page cache: `fincore` opens it
    // a third time and finds its page still resident (each open used to drop it)...
    let same = dir.path().join("same.txt");
    write(&same, "one\n");
    exec("until [ -e /workspace/w/same.txt ]; do sleep 0.05; done");
    let cached = "cd /workspace/w; cat same.txt; cat same.txt >/dev/null; fincore --raw --noheadings -o PAGES same.txt";
    assert_eq!(exec(cached), "one\n1\n");
    // ...until the host changes it, even keeping its size and setting its modification
    // time back (`cp -p`, `touch -r`): the next open reads the new content.
    let modified = std::fs::metadata(&same).unwrap().modified().unwrap();
    std::fs::write(&same, "two\n").unwrap();
    std::fs::File::options().write(true).open(&same).unwrap().set_modified(modified).unwrap();
    assert_eq!(exec("cat /workspace/w/same.txt"), "two\n");
    // Once the change is older than the host's settling time (100 ms), it is cached again.
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(exec(cached), "two\n1\n");
    ok(&h.ml(&["kill", &id]));
    ok(&h.ml(&["rm", &id]));
    h.assert_no_leftovers();
}

#[test]
fn parallel_readers_and_writers_share_the_workers() {
    let h = home();
    let dir = tempfile::tempdir().unwrap();
    let data: Vec<u8> = (0..3u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    std::fs::write(dir.path().join("big"), &data).unwrap();
    let digest = md5_hex(&data);
    // Eight readers of one file and eight writers of their own at once: every byte right.
    let out = h.run(&[
        "--image",
        debian_image(),
        "-v",
        &format!("{}:w:host_fs", dir.path().display()),
        "--",
        "bash",
        "-c",
        "cd /workspace/w; for i in $(seq 8); do (md5sum < big > sum$i; cp big copy$i) & done; wait; \
         cat sum* | sort -u; md5sum copy* | cut -d' ' -f1 | sort -u",
    ]);
    assert_eq!(ok(&out), format!("{digest}  -\n{digest}\n"), "{}", stderr(&out));
    for i in 1..=8 {
        assert_eq!(std::fs::read(dir.path().join(format!("copy{i}"))).unwrap(), data, "copy{i} on the host");
    }
    h.assert_no_leftovers();
}

#[test]
fn large_directories_list_whole_with_their_attributes() {
    let h = home();
    let dir = tempfile::tempdir().unwrap();
    // More than one message could hold at once (~2 MB of names): listed in pages.
    let long = "a-rather-long-file-name-".repeat(7);
    let mut total = 0;
    for i in 0..6000 {
        let data = "x".repeat(i % 7);
        total += data.len();
        std::fs::write(dir.path().join(format!("{long}{i:05}")), data).unwrap();
    }
    std::fs::write(dir.path().join("zz-held"), "held open\n").unwrap();
    // Names and sizes as the host has them; a file held open across the listings still
    // reads (a failed listing once took the connection and its handles with it); a second
    // listing sees a file the guest just added.
    let out = h.run(&[
        "--image",
        debian_image(),
        "-v",
        &format!("{}:big:ro", dir.path().display()),
        "-v",
        &format!("{}:rw:host_fs", dir.path().display()),
        "--",
        "bash",
        "-c",
        "exec 3< /workspace/rw/zz-held; ls /workspace/big | wc -l; ls /workspace/big | sort -u | wc -l; \
         ls -l /workspace/big | awk 'NR > 1 { s += $5 } END { print s }'; cat <&3; \
         touch /workspace/rw/zz-new; ls /workspace/rw | tail -1; ls /workspace/rw | wc -l",
    ]);
    assert_eq!(ok(&out), format!("6001\n6001\n{}\nheld open\nzz-new\n6002\n", total + 10), "{}", stderr(&out));
    h.assert_no_leftovers();
}

fn md5_hex(data: &[u8]) -> String {
    let out = std::process::Command::new("md5sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child.stdin.take().unwrap().write_all(data)?;
            child.wait_with_output()
        })
        .unwrap();
    String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap().to_owned()
}
