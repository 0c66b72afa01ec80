//! Snapshots on real VMs: a running sandbox saved, the source running on, and two sandboxes
//! restored from it that keep the saved processes and then diverge.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use matchlock_api::SandboxConfig;
use matchlock_protocol::exec::{ExecMode, ExecRequest};
use matchlock_sandbox::{snapshot, Events, ExecIo, Sandbox};

mod common;
use common::{busybox_store, isolate};

/// Runs `script` with `sh -c`; its exit code and stdout.
async fn sh(sandbox: &Sandbox, script: &str) -> (i32, String) {
    let (_tx, control) = tokio::sync::mpsc::channel(1);
    let mut out = Vec::new();
    let io = ExecIo { stdin: None, stdout: Box::new(&mut out), stderr: Box::new(tokio::io::sink()), control };
    let request = ExecRequest {
        argv: vec!["sh".into(), "-c".into(), script.into()],
        env: vec![],
        working_dir: None,
        user: None,
        window: None,
        rlimits: Vec::new(),
        root: None,
        binds: Vec::new(),
    };
    let code = sandbox.exec(ExecMode::Stream, &request, io).await.unwrap();
    (code, String::from_utf8_lossy(&out).trim().to_owned())
}

async fn ticks(sandbox: &Sandbox) -> u64 {
    let (code, out) = sh(sandbox, "cat /tmp/ticks").await;
    assert_eq!(code, 0, "the ticker's file");
    out.parse().unwrap_or_else(|_| panic!("ticks: {out:?}"))
}

/// Whether the ticker process is still counting.
async fn still_ticking(sandbox: &Sandbox) -> bool {
    let before = ticks(sandbox).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    ticks(sandbox).await > before
}

fn now_s() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restored_sandboxes_keep_running_processes_and_then_diverge() {
    let home = tempfile::tempdir().unwrap();
    isolate(home.path());
    let store = busybox_store(home.path());
    let source = Arc::new(
        Sandbox::create(SandboxConfig::new("busybox"), &store, matchlock_sandbox::open_state().unwrap()).await.unwrap(),
    );

    // A command in flight during the snapshot: it counts into /tmp/ticks.
    let ticker = {
        let source = Arc::clone(&source);
        tokio::spawn(async move {
            sh(&source, "i=0; while :; do i=$((i+1)); echo $i > /tmp/ticks; sleep 0.1; done").await;
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(sh(&source, "echo saved > /root/marker").await.0, 0);

    let meta = source.snapshot("t1").await.unwrap();
    assert_eq!(meta.source, source.id());
    assert!(source.snapshot("t1").await.is_err(), "a second snapshot of one name is refused");
    let dir = snapshot::snapshots_dir().join("t1");
    assert_eq!(std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777, 0o700);
    for file in std::fs::read_dir(&dir).unwrap().flatten() {
        let mode = file.metadata().unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{} is private", file.path().display());
    }
    // The source runs on, its in-flight command included.
    assert!(still_ticking(&source).await, "the source's command survives its snapshot");
    assert!(!ticker.is_finished());

    // An old snapshot: the restored clock must be the host's, not the saved one.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let restore = || async {
        Sandbox::restore("t1", &store, matchlock_sandbox::open_state().unwrap(), Events::default(), &HashMap::new())
            .await
    };
    let a = restore().await.unwrap();
    let b = restore().await.unwrap();
    for child in [&a, &b] {
        assert_ne!(child.id(), source.id());
        assert!(still_ticking(child).await, "the saved process runs on in {}", child.id());
        assert_eq!(sh(child, "cat /root/marker").await.1, "saved");
        assert_eq!(sh(child, "hostname").await.1, child.id(), "the child's own name");
        let guest_now: i64 = sh(child, "date +%s").await.1.parse().unwrap();
        assert!((guest_now - now_s()).abs() <= 2, "guest clock {guest_now} vs host {}", now_s());
    }

    // They diverge: disks are copies, entropy is fresh.
    assert_eq!(sh(&a, "echo a > /root/only-a && sync").await.0, 0);
    assert_eq!(sh(&b, "test -e /root/only-a").await.0, 1, "a file written in one child is absent in the other");
    assert_eq!(sh(&source, "test -e /root/only-a").await.0, 1, "and in the source");
    let draw = "head -c 16 /dev/urandom | od -An -tx1";
    let (ra, rb) = (sh(&a, draw).await.1, sh(&b, draw).await.1);
    assert_eq!(ra.split_whitespace().count(), 16);
    assert_ne!(ra, rb, "two children draw different random numbers");

    // Positive control for the detached command: when its own host hangs up (no restore),
    // a command is still cancelled.
    ticker.abort();
    let _ = ticker.await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!still_ticking(&source).await, "a hung-up exec is cancelled in the source");
    assert!(still_ticking(&a).await, "the children's copies are theirs");

    let ids = [source.id().to_owned(), a.id().to_owned(), b.id().to_owned()];
    a.close(true).await.unwrap();
    b.close(true).await.unwrap();
    Arc::try_unwrap(source).expect("the ticker let go").close(true).await.unwrap();
    snapshot::remove("t1").unwrap();
    assert!(snapshot::list().is_empty());
    assert_eq!(std::fs::read_dir(home.path().join(".matchlock/vms")).unwrap().count(), 0);
    let shm: Vec<String> = std::fs::read_dir("/dev/shm")
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| ids.iter().any(|id| n.contains(id.as_str())))
        .collect();
    assert!(shm.is_empty(), "guest RAM files left: {shm:?}");
}
