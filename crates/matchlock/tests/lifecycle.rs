//! Detached sandboxes, the exec relay, state, and cleanup, against real VMs.

mod common;

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{home, ok, stderr, stdout};

fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn detached_lifecycle_list_get_inspect_exec_kill_rm() {
    let h = home();
    let id = h.detach(&["--image", "busybox", "-e", "VISIBLE_ENV=from-run"]);
    let list = ok(&h.ml(&["list"]));
    assert!(list.starts_with("ID  "), "{list}");
    let row = list.lines().find(|l| l.starts_with(&id)).expect("listed");
    assert!(row.contains("running") && row.contains("busybox:latest"), "{row}");
    assert!(ok(&h.ml(&["ls", "--running"])).contains(&id));

    let get: serde_json::Value = serde_json::from_str(&ok(&h.ml(&["get", &id]))).unwrap();
    assert_eq!(get["id"], id.as_str());
    assert_eq!(get["status"], "running");
    assert_eq!(get["config"]["env"]["VISIBLE_ENV"], "from-run");
    for verb in ["inspect", "stat"] {
        let inspect: serde_json::Value = serde_json::from_str(&ok(&h.ml(&[verb, &id]))).unwrap();
        assert_eq!(inspect["vm"]["id"], id.as_str());
        assert_eq!(inspect["lifecycle"]["vm_id"], id.as_str());
        assert_eq!(inspect["lifecycle"]["phase"], "running");
        assert!(inspect["history"].as_array().unwrap().len() >= 4);
        assert_eq!(inspect["vm"]["config"]["env"]["VISIBLE_ENV"], "from-run");
    }

    assert_eq!(ok(&h.ml(&["exec", &id, "echo", "from-exec"])), "from-exec\n");
    assert_eq!(ok(&h.ml(&["exec", &id, "--", "sh", "-c", "echo one && echo two"])), "one\ntwo\n");
    // The sandbox's env applies to exec too, and the exit code comes back.
    let out = h.ml(&["exec", &id, "--", "sh", "-c", "echo $VISIBLE_ENV; exit 7"]);
    assert_eq!(out.status.code(), Some(7));
    assert_eq!(stdout(&out), "from-run\n");
    // State written by one exec is seen by the next: it is one machine.
    ok(&h.ml(&["exec", &id, "--", "sh", "-c", "echo kept > /root/marker"]));
    assert_eq!(ok(&h.ml(&["exec", &id, "-u", "0", "-w", "/root", "cat", "marker"])), "kept\n");

    assert_eq!(ok(&h.ml(&["kill", &id])), format!("Killed {id}\n"));
    assert!(!ok(&h.ml(&["list", "--running"])).contains(&id));
    let out = h.ml(&["exec", &id, "true"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains(&format!("VM {id} is not running (status: stopped)")), "{}", stderr(&out));
    // A stopped sandbox holds only its logs, its egress audit and its writable disk (for
    // `commit`, until `rm`); no socket and no process of it remains.
    let mut left: Vec<_> = std::fs::read_dir(h.vms_dir().join(&id)).unwrap().map(|e| e.unwrap().file_name()).collect();
    left.sort();
    assert_eq!(left, ["audit.jsonl", "logs", "upper.ext4"].map(std::ffi::OsString::from));
    assert!(h.processes().is_empty(), "{:?}", h.processes());
    let history: serde_json::Value = serde_json::from_str(&ok(&h.ml(&["inspect", &id]))).unwrap();
    assert_eq!(history["lifecycle"]["phase"], "cleaned");
    assert_eq!(history["lifecycle"]["cleanup"]["machine_close"]["status"], "ok");

    assert_eq!(ok(&h.ml(&["rm", &id])), format!("Removed {id}\n"));
    assert!(!ok(&h.ml(&["list"])).contains(&id));
    h.assert_no_leftovers();
}

#[test]
fn detached_command_runs_and_logs() {
    let h = home();
    let id = h.detach(&[
        "--image",
        "busybox",
        "--",
        "sh",
        "-c",
        "echo first; echo started > /tmp/marker; sleep 2; echo second; sleep 300",
    ]);
    eventually("the detached command", || {
        stdout(&h.ml(&["exec", &id, "--", "sh", "-c", "test -f /tmp/marker && echo ok"])) == "ok\n"
    });
    eventually("`first` in the log", || stdout(&h.ml(&["log", &id])).contains("first"));
    let mut follow = h.cmd().args(["log", "-f", &id]).stdout(Stdio::piped()).spawn().unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    let out = follow.stdout.as_mut().unwrap();
    while !String::from_utf8_lossy(&seen).contains("second") {
        let n = out.read(&mut buf).unwrap();
        assert!(n > 0, "log -f ended early");
        seen.extend_from_slice(&buf[..n]);
    }
    common::signal(&follow, nix::sys::signal::Signal::SIGINT);
    assert_eq!(follow.wait().unwrap().code(), Some(0));
    assert!(String::from_utf8_lossy(&seen).contains("first"));
    ok(&h.ml(&["kill", &id]));
    ok(&h.ml(&["rm", &id]));
    h.assert_no_leftovers();
}

#[test]
fn exec_through_the_relay_pipes_stdin_and_cancels() {
    let h = home();
    let id = h.detach(&["--image", "busybox"]);
    let mut child = h
        .cmd()
        .args(["exec", "-i", &id, "--", "sh", "-c", "tr a-z A-Z"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), b"piped through the relay\n").unwrap();
    assert_eq!(ok(&child.wait_with_output().unwrap()), "PIPED THROUGH THE RELAY\n");

    // Ctrl-C on `exec` stops the guest command (and only it).
    let mut child =
        h.cmd().args(["exec", &id, "--", "sh", "-c", "echo go; exec sleep 60"]).stdout(Stdio::piped()).spawn().unwrap();
    let mut go = [0u8; 3];
    child.stdout.as_mut().unwrap().read_exact(&mut go).unwrap();
    let sent = Instant::now();
    common::signal(&child, nix::sys::signal::Signal::SIGINT);
    let status = child.wait().unwrap();
    assert!(sent.elapsed() < Duration::from_secs(5));
    assert_eq!(status.code(), Some(143));
    assert_eq!(ok(&h.ml(&["exec", &id, "--", "sh", "-c", "pgrep -x sleep || echo gone"])), "gone\n");

    // What a command leaves running ends with it: the exec answers at once (the
    // background writer holds its stdout), and the writer really stopped. Control: it
    // wrote while the command ran.
    let beat = "(while :; do echo x >> /tmp/beat; sleep 0.1; done) & sleep 0.5; wc -c < /tmp/beat";
    let started = Instant::now();
    let written: usize = ok(&h.ml(&["exec", &id, "--", "sh", "-c", beat])).trim().parse().unwrap();
    assert!(started.elapsed() < Duration::from_secs(10), "exec waited for its background process");
    assert!(written > 0, "the background writer never ran");
    let later =
        ok(&h.ml(&["exec", &id, "--", "sh", "-c", "a=$(wc -c < /tmp/beat); sleep 1; wc -c < /tmp/beat; echo $a"]));
    let sizes: Vec<&str> = later.split_whitespace().collect();
    assert_eq!(sizes[0], sizes[1], "the background writer outlived its command");
    ok(&h.ml(&["kill", &id]));
}

#[test]
fn exec_it_gives_a_terminal_through_the_relay() {
    let h = home();
    let id = h.detach(&["--image", "busybox"]);
    let mut cmd = h.cmd();
    cmd.args(["exec", "-it", &id, "sh"]);
    let (mut child, mut master) = common::spawn_in_pty(cmd, 40, 120);
    let reader = common::read_until(&master, "relay-tty-done");
    std::io::Write::write_all(&mut master, b"tty; stty size; echo relay-tty-$((2-2))-done; exit 3\r").unwrap();
    let status = child.wait().unwrap();
    let out = reader.join().unwrap();
    assert_eq!(status.code(), Some(3), "{out}");
    assert!(out.contains("/dev/pts/") && out.contains("40 120"), "{out}");
    ok(&h.ml(&["kill", &id]));
}

#[test]
fn diagnose_reports_every_check() {
    let h = home();
    let out = h.ml(&["diagnose", "--json"]);
    let doc: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    let names: Vec<&str> = doc["checks"].as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap()).collect();
    for name in ["qemu", "kernel", "guest-init", "e2fsprogs", "kvm", "disk-cache"] {
        assert!(names.contains(&name), "{names:?}");
    }
    assert_eq!(doc["ok"], true, "{doc}");
    assert_eq!(out.status.code(), Some(0));
    let text = ok(&h.ml(&["diagnose"]));
    assert!(text.lines().all(|l| l.starts_with(['✓', '✗', '⚠']) || l.starts_with("  fix: ")), "{text}");
}

#[test]
fn rm_false_keeps_the_sandbox_until_killed() {
    let h = home();
    let mut run = h.spawn(&["run", "--rm=false", "--image", "busybox", "--", "sh", "-c", "echo hi; exit 3"]);
    let mut hi = [0u8; 3];
    run.stdout.as_mut().unwrap().read_exact(&mut hi).unwrap();
    assert_eq!(&hi, b"hi\n");
    let id = ok(&h.ml(&["list", "--running"])).lines().nth(1).map(|l| l.split_whitespace().next().unwrap().to_owned());
    let id = id.expect("the sandbox keeps running after its command");
    assert_eq!(ok(&h.ml(&["exec", &id, "echo", "alive"])), "alive\n");
    ok(&h.ml(&["kill", &id]));
    let out = run.wait_with_output().unwrap();
    // The command's exit code is not the sandbox's: the owner exits 0 when stopped.
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stderr(&out).contains(&format!("Sandbox {id} is running")), "{}", stderr(&out));
    assert!(ok(&h.ml(&["list"])).lines().any(|l| l.starts_with(&id) && l.contains("stopped")));
    ok(&h.ml(&["rm", &id]));
}

#[test]
fn cli_errors_use_the_reference_messages() {
    let h = home();
    for (args, message) in [
        (&["run", "-d", "-it", "--image", "busybox"][..], "--detach cannot be combined"),
        (&["run", "-dit", "--image", "busybox"], "--detach cannot be combined"),
        (&["run", "-d", "-i", "--image", "busybox"], "--detach cannot be combined"),
        (&["kill"], "VM ID required (or use --all)"),
        (&["rm"], "VM ID required (or use --stopped)"),
        (&["exec", "vm-nonexistent", "true"], "VM not found vm-nonexistent"),
        (&["get", "vm-nonexistent"], "not found"),
        (&["log", "vm-nonexistent"], "not found"),
        (&["kill", "vm-nonexistent"], "not found"),
        (&["exec"], "required"),
    ] {
        let out = h.ml(args);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(message), "{args:?}: {}", stderr(&out));
    }
    for args in [&["prune"][..], &["kill", "--all"], &["rm", "--stopped"], &["gc"]] {
        ok(&h.ml(args));
    }
    assert!(ok(&h.ml(&["prune"])).contains("Pruned 0 VMs"));
    let version = ok(&h.ml(&["version"]));
    assert!(version.starts_with("matchlock ") && version.contains("commit:"), "{version}");
    assert!(ok(&h.ml(&["--version"])).contains("matchlock"));
}

#[test]
fn crashed_owner_is_detected_and_gc_reclaims_everything() {
    let h = home();
    let id = h.detach(&["--image", "busybox"]);
    let get: serde_json::Value = serde_json::from_str(&ok(&h.ml(&["get", &id]))).unwrap();
    let owner = get["pid"].as_i64().unwrap() as i32;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(owner), nix::sys::signal::Signal::SIGKILL).unwrap();
    eventually("the owner to die", || {
        !std::path::Path::new(&format!("/proc/{owner}/stat")).exists()
            || std::fs::read_to_string(format!("/proc/{owner}/stat")).is_ok_and(|s| s.contains(") Z"))
    });
    let row = ok(&h.ml(&["list"])).lines().find(|l| l.starts_with(&id)).map(str::to_owned).unwrap();
    assert!(row.contains("crashed"), "{row}");
    let out = h.ml(&["exec", &id, "true"]);
    assert!(stderr(&out).contains("is not running (status: crashed)"), "{}", stderr(&out));

    let gc = ok(&h.ml(&["gc"]));
    assert!(gc.contains(&format!("{id}: cleaned")), "{gc}");
    assert!(gc.contains("upper.ext4") && gc.ends_with("Reconciled 1 VMs\n"), "{gc}");
    assert!(ok(&h.ml(&["gc", &id])).contains("no resources to clean"));
    let mut left: Vec<_> = std::fs::read_dir(h.vms_dir().join(&id)).unwrap().map(|e| e.unwrap().file_name()).collect();
    left.sort();
    assert_eq!(left, ["audit.jsonl", "logs"].map(std::ffi::OsString::from), "gc keeps the logs and the audit");
    assert!(h.processes().is_empty(), "{:?}", h.processes());
    assert_eq!(ok(&h.ml(&["prune"])), format!("Pruned {id}\nPruned 1 VMs\n"));
    h.assert_no_leftovers();
}

/// `gc`, `rm` and `prune` stop a VM's own helpers, found by identity (pid, start time,
/// executable), never a process that only mentions the VM, like a user's `tail -f` of its log.
#[test]
fn gc_rm_and_prune_leave_a_tail_of_the_log_alone() {
    let h = home();
    let tail_of = |id: &str| {
        Command::new("tail")
            .arg("-f")
            .arg(h.vms_dir().join(id).join("logs/vm.log"))
            .stdout(Stdio::null())
            .spawn()
            .unwrap()
    };
    let crashed = h.detach(&["--image", "busybox"]);
    let mut tail = tail_of(&crashed);
    let record = std::fs::read_to_string(h.vms_dir().join(&crashed).join("helpers")).unwrap();
    let helpers: Vec<i32> = record.lines().map(|l| l.split(' ').next().unwrap().parse().unwrap()).collect();
    assert_eq!(helpers.len(), 1, "QEMU is recorded: {record}");
    // The owner is killed, its helpers survive it a moment at most (parent-death signal) or
    // until gc: either way gc must leave the tail alone.
    let get: serde_json::Value = serde_json::from_str(&ok(&h.ml(&["get", &crashed]))).unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(get["pid"].as_i64().unwrap() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    eventually("the helpers to be gone", || {
        helpers.iter().all(|p| !std::path::Path::new(&format!("/proc/{p}/exe")).exists())
    });
    assert!(ok(&h.ml(&["gc"])).contains(&format!("{crashed}: cleaned")));
    assert!(tail.try_wait().unwrap().is_none(), "gc killed a tail of the VM's log");
    let stopped = h.detach(&["--image", "busybox"]);
    let mut second = tail_of(&stopped);
    ok(&h.ml(&["kill", &stopped]));
    ok(&h.ml(&["rm", &stopped]));
    assert!(second.try_wait().unwrap().is_none(), "rm killed a tail of the VM's log");
    assert!(ok(&h.ml(&["prune"])).contains(&format!("Pruned {crashed}")));
    assert!(tail.try_wait().unwrap().is_none(), "prune killed a tail of the VM's log");
    for mut t in [tail, second] {
        t.kill().unwrap();
        t.wait().unwrap();
    }
    h.assert_no_leftovers();
}

#[test]
fn two_sandboxes_and_concurrent_cli_calls_share_one_state_db() {
    let h = home();
    let runs: Vec<_> = (0..2)
        .map(|_| h.cmd().args(["run", "-d", "--image", "busybox"]).stdout(Stdio::piped()).spawn().unwrap())
        .collect();
    let lists: Vec<_> = (0..20).map(|_| h.cmd().arg("list").stdout(Stdio::piped()).spawn().unwrap()).collect();
    for l in lists {
        let out = l.wait_with_output().unwrap();
        assert!(ok(&out).starts_with("ID"), "{}", stderr(&out));
    }
    let ids: Vec<String> = runs.into_iter().map(|r| ok(&r.wait_with_output().unwrap()).trim().to_owned()).collect();
    assert_ne!(ids[0], ids[1]);
    for id in &ids {
        assert_eq!(ok(&h.ml(&["exec", id, "hostname"])), format!("{id}\n"));
    }
    let killed = ok(&h.ml(&["kill", "--all"]));
    for id in &ids {
        assert!(killed.contains(&format!("Killed {id}")), "{killed}");
    }
    let removed = ok(&h.ml(&["rm", "--stopped"]));
    assert_eq!(removed.lines().count(), 2, "{removed}");
    h.assert_no_leftovers();
}

#[test]
fn timeout_kills_the_sandbox_with_exit_124() {
    let h = home();
    let started = Instant::now();
    let out = h.run(&["--image", "busybox", "--timeout", "8", "--", "sh", "-c", "echo running; sleep 60"]);
    assert_eq!(out.status.code(), Some(124), "{}", stderr(&out));
    assert_eq!(stdout(&out), "running\n", "the deadline should hit the command, not the boot");
    assert!(stderr(&out).contains("timed out after 8 s"), "{}", stderr(&out));
    assert!(started.elapsed() < Duration::from_secs(20));
    // A deadline that passes during boot is a timeout too (a cold boot: a warm start can
    // beat a one-second deadline).
    let out = h.run(&["--image", "busybox", "--cold", "--timeout", "1", "--", "true"]);
    assert_eq!(out.status.code(), Some(124), "{}", stderr(&out));
}

/// Completions and man pages are generated from the same clap definitions as the CLI, and
/// `list`/`image ls` speak JSON for scripts.
#[test]
fn completions_man_pages_and_json_listings() {
    let h = home();
    let bash = ok(&h.ml(&["completion", "bash"]));
    assert!(bash.contains("_matchlock"), "{bash}");
    let sourced = Command::new("bash")
        .args(["-c", "source /dev/stdin && complete -p matchlock"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut sourced.stdin.as_ref().unwrap(), bash.as_bytes()).unwrap();
    let sourced = sourced.wait_with_output().unwrap();
    assert!(stdout(&sourced).contains("_matchlock") && stdout(&sourced).contains("matchlock"), "{}", stdout(&sourced));
    assert!(ok(&h.ml(&["completion", "zsh"])).starts_with("#compdef matchlock"));
    assert!(ok(&h.ml(&["completion", "fish"])).contains("complete -c matchlock"));
    assert!(!h.ml(&["completion", "tcsh"]).status.success());

    let pages = tempfile::tempdir().unwrap();
    ok(&h.ml(&["man", "--out-dir", pages.path().to_str().unwrap()]));
    let run_page = pages.path().join("matchlock-run.1");
    assert!(pages.path().join("matchlock.1").is_file() && run_page.is_file());
    let rendered = Command::new("man").arg("-l").arg(&run_page).env("MANWIDTH", "100").output().unwrap();
    let rendered = stdout(&rendered);
    assert!(rendered.contains("--cold") && rendered.contains("--image"), "{rendered}");

    let id = h.detach(&["--image", "busybox"]);
    let listed: serde_json::Value = serde_json::from_str(&ok(&h.ml(&["list", "--json"]))).unwrap();
    assert_eq!(listed[0]["id"], id.as_str());
    assert_eq!(listed[0]["status"], "running");
    let images: serde_json::Value = serde_json::from_str(&ok(&h.ml(&["image", "ls", "--json"]))).unwrap();
    assert!(images.as_array().unwrap().iter().any(|i| i["tag"] == "busybox:latest"), "{images}");
    ok(&h.ml(&["kill", &id]));
    ok(&h.ml(&["rm", &id]));
    h.assert_no_leftovers();
}

#[test]
fn setup_user_gives_access_to_kvm_and_common_errors_end_with_a_hint() {
    let h = home();
    let name = format!("mltest{}", std::process::id() % 100_000);
    struct Remove(String);
    impl Drop for Remove {
        fn drop(&mut self) {
            let _ = Command::new("userdel").arg(&self.0).output();
        }
    }
    let added = Command::new("useradd").args(["--no-create-home", "--shell", "/usr/sbin/nologin", &name]).output();
    assert!(added.unwrap().status.success(), "useradd (the tests run as root)");
    let _remove = Remove(name.clone());
    let out = ok(&h.ml(&["setup", "user", &name]));
    assert!(out.contains(&format!("Added {name} to the kvm group")), "{out}");
    let groups = String::from_utf8(Command::new("id").args(["-nG", &name]).output().unwrap().stdout).unwrap();
    assert!(groups.split_whitespace().any(|g| g == "kvm"), "{groups}");
    if let Ok(meta) = std::fs::metadata("/dev/kvm") {
        use std::os::unix::fs::MetadataExt;
        let kvm = nix::unistd::Group::from_name("kvm").unwrap().unwrap();
        assert_eq!((meta.gid(), meta.mode() & 0o070), (kvm.gid.as_raw(), 0o060), "the kvm group may use /dev/kvm");
    }
    let nobody = h.ml(&["setup", "user", "no-such-user-here"]);
    assert!(!nobody.status.success() && stderr(&nobody).contains("no user"), "{}", stderr(&nobody));

    // An image that is neither stored nor pullable: the last line says what to do.
    let missing = h.ml(&["run", "--image", "no-such-image-here:1", "--", "true"]);
    assert!(!missing.status.success());
    let last = stderr(&missing).lines().last().unwrap_or_default().to_owned();
    assert!(last.starts_with("hint: check the name (`matchlock image ls`"), "{}", stderr(&missing));
}

#[test]
fn everything_a_sandbox_keeps_is_private_to_the_user() {
    let h = home();
    // A cold and a warm sandbox, both with their logs and disks; a snapshot; a commit; an
    // interception CA seed.
    let cold = h.detach(&["--cold", "--image", "busybox", "--network-intercept"]);
    let warm = h.detach(&["--image", "busybox"]);
    ok(&h.ml(&["exec", &warm, "--", "sh", "-c", "echo made > /root/made"]));
    ok(&h.ml(&["snapshot", &warm, "private"]));
    ok(&h.ml(&["commit", &warm, "private-commit:1"]));
    let state = h.vms_dir().parent().unwrap().to_owned();
    let mut seen = 0;
    let mut open_to_others = Vec::new();
    // The state, and the image store and boot disks of the cache (the commit wrote there).
    let mut stack = vec![state.clone(), h.cache_dir().join("images"), h.cache_dir().join("boot")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let meta = entry.metadata().unwrap();
            let kind = meta.file_type();
            // Sockets are reached through their 0700 directories only.
            if std::os::unix::fs::FileTypeExt::is_socket(&kind) {
                continue;
            }
            seen += 1;
            if meta.permissions().mode() & 0o077 != 0 {
                open_to_others.push(format!("{:o} {}", meta.permissions().mode() & 0o7777, entry.path().display()));
            }
            if kind.is_dir() {
                stack.push(entry.path());
            }
        }
    }
    for dir in [&state, &h.cache_dir().join("images")] {
        assert!(std::fs::metadata(dir).unwrap().permissions().mode() & 0o077 == 0, "{} itself", dir.display());
    }
    assert!(open_to_others.is_empty(), "readable by others:\n{}", open_to_others.join("\n"));
    // The walk saw what it should: state.db, both VM directories with logs and disks.
    assert!(seen >= 12, "only {seen} entries under {}", state.display());
    for id in [&cold, &warm] {
        assert!(h.vms_dir().join(id).join("logs/vm.log").exists() && h.vms_dir().join(id).join("upper.ext4").exists());
        ok(&h.ml(&["kill", id]));
        ok(&h.ml(&["rm", id]));
    }
    ok(&h.ml(&["snapshot", "rm", "private"]));
    ok(&h.ml(&["image", "rm", "private-commit:1"]));
}
