//! `snapshot`, `restore`, `fork` and `snapshot ls|rm` from the CLI on real VMs, with a secret:
//! what the snapshot files really hold, and what restoring asks for.

mod common;

use common::{home, ok, stderr, stdout, Home};

/// The files of snapshot `name` that contain `needle` (GNU grep: fast over the sparse,
/// hundreds of MB large RAM file).
fn files_containing(h: &Home, name: &str, needle: &str) -> Vec<String> {
    let dir = h.vms_dir().parent().unwrap().join("snapshots").join(name);
    let out =
        std::process::Command::new("grep").args(["-F", "-a", "-l", "-r", "--", needle]).arg(&dir).output().unwrap();
    assert!(out.status.code().is_some_and(|c| c <= 1), "grep failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).lines().map(|l| l.rsplit('/').next().unwrap_or(l).to_owned()).collect()
}

#[test]
fn snapshot_restore_and_fork_from_the_cli() {
    let h = home();
    let value = format!("sk-live-{}", std::process::id());
    let secret = format!("KEY={value}@api.test");
    let id =
        h.detach(&["--image", "busybox", "--secret", &secret, "--", "sh", "-c", "echo $KEY > /root/key; sleep 600"]);
    let placeholder = loop {
        let out = h.ml(&["exec", &id, "--", "cat", "/root/key"]);
        if out.status.success() {
            break stdout(&out).trim().to_owned();
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert!(placeholder.starts_with("SANDBOX_SECRET_"), "the guest sees a placeholder: {placeholder}");
    ok(&h.ml(&["exec", &id, "--", "sync"]));

    assert_eq!(ok(&h.ml(&["snapshot", &id, "warm"])).trim(), "warm");
    let bad = h.ml(&["snapshot", &id, "../x"]);
    assert!(!bad.status.success() && stderr(&bad).contains("invalid snapshot name"), "{}", stderr(&bad));
    let dup = h.ml(&["snapshot", &id, "warm"]);
    assert!(stderr(&dup).contains("snapshot warm exists"), "{}", stderr(&dup));
    let listed = ok(&h.ml(&["snapshot", "ls", "--json"]));
    let listed: serde_json::Value = serde_json::from_str(&listed).unwrap();
    assert_eq!(listed[0]["name"], "warm");
    assert_eq!(listed[0]["source"], id.as_str());

    // What the files really hold: the placeholder (the guest's disk and memory have it: the
    // positive control that the search works), never the value.
    let with_placeholder = files_containing(&h, "warm", &placeholder);
    assert!(with_placeholder.iter().any(|f| f == "disk-2"), "the placeholder is saved: {with_placeholder:?}");
    let with_value = files_containing(&h, "warm", &value);
    assert!(with_value.is_empty(), "the secret's value is in the snapshot's {with_value:?}");

    // Restoring asks for the value again; with it, the child runs with the saved state.
    let refused = h.ml(&["restore", "warm"]);
    assert!(!refused.status.success(), "a restore without the secret's value");
    assert!(stderr(&refused).contains("--secret KEY@api.test"), "{}", stderr(&refused));
    let child = ok(&h.ml(&["restore", "warm", "--secret", &secret])).trim().to_owned();
    assert!(child.starts_with("vm-") && child != id, "{child}");
    assert_eq!(ok(&h.ml(&["exec", &child, "--", "cat", "/root/key"])).trim(), placeholder);
    assert_eq!(ok(&h.ml(&["exec", &child, "--", "hostname"])).trim(), child);

    // fork: N children, each its own, the hidden snapshot gone afterwards.
    let kids = ok(&h.ml(&["fork", &id, "-n", "2", "--secret", &secret]));
    let kids: Vec<&str> = kids.lines().collect();
    assert_eq!(kids.len(), 2, "{kids:?}");
    ok(&h.ml(&["exec", kids[0], "--", "sh", "-c", "echo mine > /root/own"]));
    assert!(!h.ml(&["exec", kids[1], "--", "test", "-e", "/root/own"]).status.success());
    let names: Vec<String> = serde_json::from_str::<Vec<serde_json::Value>>(&ok(&h.ml(&["snapshot", "ls", "--json"])))
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(names, ["warm"], "fork's own snapshot is removed");
    let list = ok(&h.ml(&["list", "--running"]));
    for vm in [&id, &child, &kids[0].to_owned(), &kids[1].to_owned()] {
        assert!(list.contains(vm.as_str()), "{vm} is listed running: {list}");
    }

    ok(&h.ml(&["kill", "--all"]));
    ok(&h.ml(&["prune"]));
    ok(&h.ml(&["snapshot", "rm", "warm"]));
    assert_eq!(ok(&h.ml(&["snapshot", "ls", "--json"])).trim(), "[]");
    h.assert_no_leftovers();
}

/// `wget` of the guest's own web server, retried until it answers (the server starts
/// with the sandbox).
fn fetch_own_page(h: &Home, id: &str) -> String {
    for _ in 0..100 {
        let out = h.ml(&["exec", id, "--", "wget", "-q", "-O", "-", "http://127.0.0.1:8080/"]);
        if out.status.success() {
            return stdout(&out);
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    panic!("the server of {id} never answered");
}

#[test]
fn a_listening_server_keeps_listening_in_restored_children() {
    let h = home();
    let serve = "mkdir -p /www && echo served > /www/index.html && exec httpd -f -p 8080 -h /www";
    let id = h.detach(&["--image", "busybox", "--", "sh", "-c", serve]);
    assert_eq!(fetch_own_page(&h, &id), "served\n", "the positive control: the source serves");
    ok(&h.ml(&["snapshot", &id, "server"]));
    ok(&h.ml(&["kill", &id]));
    let child = ok(&h.ml(&["restore", "server"])).trim().to_owned();
    // Nothing starts a server in the child: the saved process answers, still listening.
    let once = h.ml(&["exec", &child, "--", "wget", "-q", "-O", "-", "http://127.0.0.1:8080/"]);
    assert_eq!(stdout(&once), "served\n", "{}", stderr(&once));
    ok(&h.ml(&["kill", &child]));
    ok(&h.ml(&["prune"]));
    ok(&h.ml(&["snapshot", "rm", "server"]));
    h.assert_no_leftovers();
}

/// A restored sandbox is snapshotted and forked again, generation after generation: each
/// child answers at once (a late end of an old session's stream once reset the new
/// session's stream of the same id).
#[test]
fn restored_sandboxes_snapshot_and_fork_again() {
    let h = home();
    let id = h.detach(&["--image", "busybox", "--", "sleep", "600"]);
    ok(&h.ml(&["exec", &id, "--", "sh", "-c", "echo gen0 > /root/mark"]));
    ok(&h.ml(&["snapshot", &id, "gen1"]));
    let first = ok(&h.ml(&["restore", "gen1"])).trim().to_owned();
    ok(&h.ml(&["snapshot", &first, "gen2"]));
    for _ in 0..3 {
        let child = ok(&h.ml(&["restore", "gen2"])).trim().to_owned();
        assert_eq!(ok(&h.ml(&["exec", &child, "--", "cat", "/root/mark"])), "gen0\n");
        let grandchild = ok(&h.ml(&["fork", &child, "-n", "1"])).trim().to_owned();
        assert_eq!(ok(&h.ml(&["exec", &grandchild, "--", "hostname"])).trim(), grandchild);
    }
    ok(&h.ml(&["kill", "--all"]));
    ok(&h.ml(&["prune"]));
    ok(&h.ml(&["snapshot", "rm", "gen1", "gen2"]));
    h.assert_no_leftovers();
}

#[test]
fn a_snapshot_of_a_starved_guest_fails_cleanly_and_the_sandbox_goes_on() {
    use std::io::BufRead;
    use std::time::{Duration, Instant};
    let h = home();
    // Privileged: only that way can a workload lift the real-time throttle and starve
    // guest-init completely (one vCPU, a FIFO spinner at priority 99 for 20 s).
    let id = h.detach(&["--privileged", "--image", common::debian_image()]);
    ok(&h.ml(&["exec", &id, "--", "sh", "-c", "echo -1 > /proc/sys/kernel/sched_rt_runtime_us"]));
    let spin = "echo spinning; exec chrt -f 99 perl -e '$end = time + 20; 1 while time < $end'";
    let mut spinner =
        h.cmd().args(["exec", &id, "--", "sh", "-c", spin]).stdout(std::process::Stdio::piped()).spawn().unwrap();
    let mut first = String::new();
    std::io::BufReader::new(spinner.stdout.take().unwrap()).read_line(&mut first).unwrap();
    assert_eq!(first, "spinning\n");
    // Past perl's start: from here on nothing else in the guest gets the CPU.
    std::thread::sleep(Duration::from_secs(3));
    let asked = Instant::now();
    let snap = h.ml(&["snapshot", &id, "starved"]);
    assert!(!snap.status.success(), "the starved guest cannot pause: {}", stdout(&snap));
    assert!(stderr(&snap).contains("did not pause"), "{}", stderr(&snap));
    assert!(asked.elapsed() < Duration::from_secs(30), "the snapshot gave up in time: {:?}", asked.elapsed());
    assert!(ok(&h.ml(&["snapshot", "ls"])).lines().all(|l| !l.starts_with("starved")), "no half snapshot is listed");
    // Once the spinner is done, the sandbox answers again (before, the pipe stayed paused:
    // the spinner's own exit and every later exec hung).
    let done = within(spinner, Duration::from_secs(60), "the spinner's exec never ended");
    assert!(done.status.success());
    let exec = h.cmd().args(["exec", &id, "--", "echo", "alive"]).stdout(std::process::Stdio::piped()).spawn().unwrap();
    assert_eq!(ok(&within(exec, Duration::from_secs(60), "the sandbox no longer answers")), "alive\n");
    // A snapshot now works (positive control).
    assert_eq!(ok(&h.ml(&["snapshot", &id, "starved"])).trim(), "starved");
    ok(&h.ml(&["snapshot", "rm", "starved"]));
    ok(&h.ml(&["kill", &id]));
    ok(&h.ml(&["rm", &id]));
}

/// The output of `child` once it ends within `limit`; otherwise it is killed and the test
/// fails with `what`.
fn within(mut child: std::process::Child, limit: std::time::Duration, what: &str) -> std::process::Output {
    let deadline = std::time::Instant::now() + limit;
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} (after {limit:?})");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    child.wait_with_output().unwrap()
}
