//! Warm templates on real VMs: the first run of a machine saves one, later runs resume it
//! and must behave exactly like a cold boot; inputs that change make a new one; a broken
//! one is discarded with a clear error and nothing left behind.

mod common;

use common::{fixture, isolated_home, ok, stderr, stdout, Home};

/// A HOME with a store of its own (so that its templates directory is its own) holding
/// the busybox fixture.
fn own_home() -> Home {
    let h = isolated_home();
    ok(&h.import("busybox", &fixture("busybox.tar")));
    // The accelerator probe of a new cache warns once: not part of any compared output.
    ok(&h.run(&["--image", "busybox", "--cold", "--", "true"]));
    h
}

/// The complete templates of `h`, by directory name.
fn templates(h: &Home) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(h.cache_dir().join("templates"))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().join("meta.json").is_file())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn args(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// `run` with `args`; returns (exit code, stdout, stderr).
fn run(h: &Home, args: &[&str]) -> (Option<i32>, String, String) {
    let out = h.run(args);
    (out.status.code(), stdout(&out), stderr(&out))
}

/// The guest's kernel command line tells which boot it is running: a resumed template
/// still has the command line it was booted with.
const CMDLINE: &[&str] = &["cat", "/proc/cmdline"];

#[test]
fn warm_runs_behave_like_cold_runs() {
    let h = own_home();
    let workspace = tempfile::tempdir().unwrap();
    std::fs::write(workspace.path().join("hello.txt"), "from the host\n").unwrap();
    let volume = format!("{}:/workspace:host_fs", workspace.path().display());
    let scenarios: Vec<Vec<&str>> = vec![
        vec!["--hostname", "box1", "--", "sh", "-c", "hostname; cat /etc/hostname /etc/hosts"],
        vec![
            "--hostname",
            "sbx",
            "--add-host",
            "db.internal:10.1.2.3",
            "--dns-servers",
            "1.1.1.1",
            "--",
            "sh",
            "-c",
            "cat /etc/hosts /etc/resolv.conf",
        ],
        vec!["-e", "GREETING=hi", "-w", "/tmp", "-u", "1000:1000", "--", "sh", "-c", "echo $GREETING; pwd; id"],
        vec![
            "-v",
            &volume,
            "--",
            "sh",
            "-c",
            "cat /workspace/hello.txt; cat /workspace/out.txt; echo back > /workspace/out.txt",
        ],
        vec!["--", "sh", "-c", "echo to-stderr >&2; exit 7"],
        vec!["--cpus", "0.5", "--", "cat", "/sys/fs/cgroup/init/cpu.max"],
        vec!["--no-network", "--", "sh", "-c", "ls /sys/class/net | sort"],
        vec!["--network-intercept", "--", "sh", "-c", "grep -c 'BEGIN CERTIFICATE' /etc/ssl/certs/matchlock-ca.crt"],
    ];
    for scenario in &scenarios {
        let with = |extra: &[&str]| -> Vec<String> {
            let mut args = vec!["--image".to_owned(), "busybox".to_owned()];
            args.extend(extra.iter().map(|s| (*s).to_owned()));
            args.extend(scenario.iter().map(|s| (*s).to_owned()));
            args
        };
        let fresh = || drop(std::fs::remove_file(workspace.path().join("out.txt")));
        fresh();
        let cold = run(&h, &args(&with(&["--cold"])));
        fresh();
        let saving = run(&h, &args(&with(&[])));
        fresh();
        let warm = run(&h, &args(&with(&[])));
        assert_eq!(saving, cold, "the run that saves the template, against --cold, for {scenario:?}");
        assert_eq!(warm, cold, "a run resumed from the template, against --cold, for {scenario:?}");
        if scenario.first() == Some(&"-v") {
            assert_eq!(std::fs::read_to_string(workspace.path().join("out.txt")).unwrap(), "back\n");
        }
    }
    // The positive control that the warm runs really resumed: a template per machine
    // shape (network, no network, half a CPU), and the resumed guest's command line is
    // the template's.
    assert_eq!(templates(&h).len(), 3, "{:?}", templates(&h));
    let (_, warm, _) = run(&h, &["--image", "busybox", "--", CMDLINE[0], CMDLINE[1]]);
    assert!(warm.contains("matchlock.hostname=matchlock-template"), "resumed: {warm}");
    let (_, cold, _) = run(&h, &["--image", "busybox", "--cold", "--", CMDLINE[0], CMDLINE[1]]);
    assert!(!cold.contains("matchlock-template") && cold.contains("matchlock.hostname=vm-"), "cold: {cold}");
}

#[test]
fn resumed_sandboxes_get_their_own_identity_clock_and_entropy() {
    let h = own_home();
    let probe = "hostname; cat /proc/sys/kernel/random/uuid; head -c 16 /dev/urandom | od -An -tx1; date +%s";
    let first = run(&h, &["--image", "busybox", "--", "sh", "-c", probe]);
    let mut seen = Vec::new();
    for _ in 0..2 {
        let (code, out, err) = run(&h, &["--image", "busybox", "--", "sh", "-c", probe]);
        assert_eq!(code, Some(0), "{err}");
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 4, "{out}");
        assert!(lines[0].starts_with("vm-"), "its own hostname: {out}");
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
        let guest: u64 = lines[3].trim().parse().unwrap();
        assert!(guest.abs_diff(now) <= 5, "the guest clock is the host's: {guest} vs {now}");
        seen.push(lines[..3].join("\n"));
    }
    seen.push(first.1.lines().take(3).collect::<Vec<_>>().join("\n"));
    assert_ne!(seen[0], seen[1], "two resumed sandboxes differ in name and random numbers");
    assert_ne!(seen[0], seen[2]);
    assert_eq!(templates(&h).len(), 1);
    // inspect tells how each sandbox started.
    let started_from = |args: &[&str]| {
        let id = h.detach(args);
        let doc: serde_json::Value = serde_json::from_str(&ok(&h.ml(&["inspect", &id]))).unwrap();
        ok(&h.ml(&["kill", &id]));
        ok(&h.ml(&["rm", &id]));
        doc["lifecycle"]["resources"]["started_from"].clone()
    };
    let warm = started_from(&["--image", "busybox"]);
    assert_eq!((warm["kind"].as_str(), warm["name"].as_str()), (Some("template"), Some(templates(&h)[0].as_str())));
    assert_eq!(started_from(&["--image", "busybox", "--cold"])["kind"], "boot");
}

#[test]
fn changed_inputs_make_new_templates_and_gc_removes_stale_ones() {
    let h = own_home();
    ok(&h.run(&["--image", "busybox", "--", "true"]));
    ok(&h.run(&["--image", "busybox", "--memory", "256", "--", "true"]));
    ok(&h.run(&["--image", "busybox", "--privileged", "--", "true"]));
    ok(&h.run(&["--image", "busybox", "--", "true"]));
    assert_eq!(templates(&h).len(), 3, "memory and hardening are inputs: {:?}", templates(&h));
    // Two first runs of a new shape at once: both work, one template remains, nothing half.
    let racers: Vec<_> =
        (0..2).map(|_| h.spawn(&["run", "--image", "busybox", "--memory", "448", "--", "echo", "raced"])).collect();
    for racer in racers {
        let out = racer.wait_with_output().unwrap();
        assert_eq!(stdout(&out), "raced\n", "{}", stderr(&out));
    }
    assert_eq!(templates(&h).len(), 4, "{:?}", templates(&h));
    assert!(unfinished(&h.cache_dir().join("templates")).is_empty());
    // --disk volumes are never in a template; MATCHLOCK_COLD turns templates off.
    let out = h
        .cmd()
        .args(["run", "--image", "busybox", "--memory", "384", "--", "true"])
        .env("MATCHLOCK_COLD", "1")
        .output()
        .unwrap();
    ok(&out);
    assert_eq!(templates(&h).len(), 4);
    // gc keeps current templates and removes those whose image is gone.
    let gc = ok(&h.ml(&["gc"]));
    assert!(!gc.contains("template"), "{gc}");
    ok(&h.ml(&["image", "rm", "busybox"]));
    let gc = ok(&h.ml(&["gc"]));
    assert_eq!(gc.matches("template ").count(), 4, "{gc}");
    assert!(templates(&h).is_empty());
}

#[test]
fn a_broken_template_is_discarded_with_a_clear_error() {
    let h = own_home();
    ok(&h.run(&["--image", "busybox", "--", "true"]));
    let names = templates(&h);
    assert_eq!(names.len(), 1);
    let dir = h.cache_dir().join("templates").join(&names[0]);
    std::fs::write(dir.join("state"), b"not a migration stream").unwrap();
    let (code, out, err) = run(&h, &["--log-level", "debug", "--image", "busybox", "--", "echo", "hi"]);
    assert_ne!(
        code,
        Some(0),
        "resumed a corrupt template? stdout {out:?}, templates {:?}, stderr:\n{err}",
        templates(&h)
    );
    assert!(err.contains("warm template") && err.contains("--cold"), "{err}");
    assert!(!dir.exists(), "the broken template is gone");
    // The next run boots cold, saves a new template, and works.
    let (code, out, err) = run(&h, &["--image", "busybox", "--", "echo", "hi"]);
    assert_eq!((code, out.as_str()), (Some(0), "hi\n"), "{err}");
    assert_eq!(templates(&h).len(), 1);
    let list = ok(&h.ml(&["list"]));
    assert!(!list.contains("vm-"), "no state rows: {list}");
}

/// Polls `found` every 2 ms for up to `secs` seconds.
fn poll<T>(secs: u64, mut found: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while std::time::Instant::now() < deadline {
        if let Some(hit) = found() {
            return Some(hit);
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    None
}

/// Names of unfinished saves (`.partial-*`) under `dir`.
fn unfinished(dir: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".partial-"))
        .collect()
}

/// Guest RAM files in /dev/shm of the VMs `ids`.
fn ram_files(ids: &[String]) -> Vec<String> {
    std::fs::read_dir("/dev/shm")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| ids.iter().any(|id| n.contains(id.as_str())))
        .collect()
}

#[test]
fn kill_9_while_saving_a_template_a_snapshot_or_restoring_leaves_nothing() {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    let h = own_home();
    let templates_dir = h.cache_dir().join("templates");
    let snapshots_dir = h.dir.path().join(".matchlock/snapshots");

    // 1. The run that saves a template is killed while the template is half written.
    let mut caught = false;
    for memory in ["272", "288", "304", "320", "336"] {
        let mut run = h.spawn(&["run", "--image", "busybox", "--memory", memory, "--", "true"]);
        let hit = poll(60, || {
            if !unfinished(&templates_dir).is_empty() {
                return Some(true);
            }
            run.try_wait().unwrap().map(|_| false)
        });
        if hit == Some(true) {
            kill(Pid::from_raw(run.id() as i32), Signal::SIGKILL).unwrap();
            caught = true;
        }
        let _ = run.wait();
        if caught {
            break;
        }
    }
    assert!(caught, "no run was caught while saving its template");
    // gc reclaims a crashed sandbox's resources and unfinished saves; prune its row and logs.
    ok(&h.ml(&["gc"]));
    ok(&h.ml(&["prune"]));
    assert!(unfinished(&templates_dir).is_empty(), "{:?}", unfinished(&templates_dir));
    h.assert_no_leftovers();

    // 2. The owner is killed while its snapshot is half written.
    let id = h.detach(&["--image", "busybox"]);
    let owner = serde_json::from_str::<serde_json::Value>(&ok(&h.ml(&["get", &id]))).unwrap()["pid"].as_i64().unwrap();
    let mut snap = h.spawn(&["snapshot", &id, "doomed"]);
    let hit = poll(60, || (!unfinished(&snapshots_dir).is_empty()).then_some(()));
    assert!(hit.is_some(), "the snapshot was never seen half written");
    kill(Pid::from_raw(owner as i32), Signal::SIGKILL).unwrap();
    assert!(!snap.wait().unwrap().success(), "the snapshot of a killed owner fails");
    let gone = poll(10, || {
        let stat = std::fs::read_to_string(format!("/proc/{owner}/stat")).unwrap_or_default();
        (stat.is_empty() || stat.rsplit(')').next().is_some_and(|s| s.starts_with(" Z"))).then_some(())
    });
    assert!(gone.is_some(), "the killed owner {owner} is gone");
    ok(&h.ml(&["gc"]));
    ok(&h.ml(&["prune"]));
    assert!(unfinished(&snapshots_dir).is_empty(), "{:?}", unfinished(&snapshots_dir));
    assert!(ok(&h.ml(&["snapshot", "ls"])).lines().all(|l| !l.contains("doomed")));
    assert!(ram_files(std::slice::from_ref(&id)).is_empty(), "guest RAM of {id} left in /dev/shm");
    h.assert_no_leftovers();

    // 3. QEMU is killed while it resumes a snapshot: the restore fails, nothing remains.
    let id = h.detach(&["--image", "busybox"]);
    assert_eq!(ok(&h.ml(&["snapshot", &id, "base"])).trim(), "base");
    ok(&h.ml(&["kill", &id]));
    ok(&h.ml(&["rm", &id]));
    let restore = h.spawn(&["restore", "base"]);
    let victim = poll(60, || h.pids().into_iter().find(|(_, cmd)| cmd.contains("-incoming")).map(|(pid, _)| pid));
    let victim = victim.expect("the restoring QEMU was never seen");
    kill(Pid::from_raw(victim), Signal::SIGKILL).unwrap();
    let out = restore.wait_with_output().unwrap();
    assert!(!out.status.success(), "a restore whose QEMU was killed: {}", String::from_utf8_lossy(&out.stdout));
    ok(&h.ml(&["gc"]));
    h.assert_no_leftovers();
    // The positive control: the same snapshot restores when nothing interferes.
    let child = ok(&h.ml(&["restore", "base"])).trim().to_owned();
    assert_eq!(ok(&h.ml(&["exec", &child, "--", "echo", "back"])), "back\n");
    ok(&h.ml(&["kill", &child]));
    ok(&h.ml(&["rm", &child]));
    ok(&h.ml(&["snapshot", "rm", "base"]));
    h.assert_no_leftovers();
}

/// The files under `dir` that contain `needle` (GNU grep over the sparse RAM file too).
fn files_containing(dir: &std::path::Path, needle: &str) -> Vec<String> {
    let out =
        std::process::Command::new("grep").args(["-F", "-a", "-l", "-r", "--", needle]).arg(dir).output().unwrap();
    assert!(out.status.code().is_some_and(|c| c <= 1), "grep failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).lines().map(|l| l.rsplit('/').next().unwrap_or(l).to_owned()).collect()
}

#[test]
fn a_template_holds_nothing_of_the_sandbox_that_saved_it() {
    let h = own_home();
    let hostname = format!("saver-{}", std::process::id());
    let dns = "10.99.88.77";
    let out = h.run(&[
        "--image",
        "busybox",
        // Small guest memory and disk: grep reads the sparse files whole.
        "--memory",
        "128",
        "--disk-size",
        "256",
        "--hostname",
        &hostname,
        "--dns-servers",
        dns,
        "--network-intercept",
        "--",
        "sh",
        "-c",
        "hostname; cat /etc/resolv.conf",
    ]);
    assert_eq!(stdout(&out), format!("{hostname}\nnameserver {dns}\n"), "{}", stderr(&out));
    let names = templates(&h);
    assert_eq!(names.len(), 1);
    let dir = h.cache_dir().join("templates").join(&names[0]);
    // Positive control: the search finds the neutral identity the template was booted with.
    assert!(!files_containing(&dir, "matchlock-template").is_empty(), "grep finds what the template holds");
    for own in [hostname.as_str(), dns, "BEGIN CERTIFICATE"] {
        let found = files_containing(&dir, own);
        assert!(found.is_empty(), "the template holds the saving sandbox's {own:?} in {found:?}");
    }
}
