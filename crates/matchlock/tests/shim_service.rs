//! The shim's Task service driven directly, without containerd: its error paths, and
//! what `ctr` cannot drive (stdin end of file through CloseIO), against a real VM booted
//! from a bundle whose rootfs is a plain directory.

mod common;

use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use containerd_shim::asynchronous::ExitSignal;
use containerd_shim_protos::api;
use containerd_shim_protos::shim_async::Task;
use containerd_shim_protos::ttrpc::r#async::TtrpcContext;
use containerd_shim_protos::ttrpc::{Code, Error};
use matchlock_shim::{Publisher, Service};
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;

/// The process's environment points matchlock at a test HOME and the shared cache, once,
/// before any test thread reads it.
fn test_home() -> &'static common::Home {
    static HOME: OnceLock<common::Home> = OnceLock::new();
    HOME.get_or_init(|| {
        let home = common::process_home();
        for (k, v) in home.env() {
            std::env::set_var(k, v);
        }
        home
    })
}

fn ctx() -> TtrpcContext {
    TtrpcContext { mh: Default::default(), metadata: Default::default(), timeout_nano: 0 }
}

type Events = mpsc::UnboundedReceiver<(String, Box<dyn containerd_shim_protos::protobuf::MessageDyn>)>;

fn service() -> (Service, Events, Arc<ExitSignal>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let exit = Arc::new(ExitSignal::default());
    let store = Path::new(&std::env::var("XDG_CACHE_HOME").unwrap()).join("matchlock/images");
    (Service::new("test", Publisher::Channel(tx), Arc::clone(&exit), store), rx, exit)
}

#[track_caller]
fn code_of<T: std::fmt::Debug>(r: Result<T, Error>) -> (Code, String) {
    match r.expect_err("the call fails") {
        Error::RpcStatus(s) => (s.code(), s.message().to_owned()),
        other => panic!("not a status: {other:?}"),
    }
}

/// A bundle whose rootfs is busybox (Debian's static build) and whose process is `args`.
fn bundle(dir: &Path, args: &[&str], annotations: &serde_json::Value) {
    let bin = dir.join("rootfs/bin");
    if !bin.exists() {
        std::fs::create_dir_all(&bin).unwrap();
        std::fs::copy("/bin/busybox", bin.join("busybox")).expect("busybox-static (scripts/install-deps.sh)");
        for applet in ["sh", "cat", "echo", "sleep"] {
            std::os::unix::fs::symlink("busybox", bin.join(applet)).unwrap();
        }
    }
    let spec = serde_json::json!({
        "ociVersion": "1.0.2",
        "process": {"args": args, "env": ["PATH=/bin"], "cwd": "/", "user": {"uid": 0, "gid": 0}},
        "root": {"path": "rootfs"},
        "annotations": annotations,
    });
    std::fs::write(dir.join("config.json"), spec.to_string()).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_unsupported_or_unknown_call_answers_a_status_containerd_understands() {
    test_home();
    let (svc, _events, exit) = service();
    let c = ctx();
    let id = || "nope".to_owned();
    assert_eq!(code_of(svc.state(&c, api::StateRequest { id: id(), ..Default::default() }).await).0, Code::NOT_FOUND);
    assert_eq!(
        code_of(svc.kill(&c, api::KillRequest { id: id(), signal: 9, ..Default::default() }).await).0,
        Code::NOT_FOUND
    );
    assert_eq!(code_of(svc.delete(&c, api::DeleteRequest { id: id(), ..Default::default() }).await).0, Code::NOT_FOUND);
    assert_eq!(code_of(svc.wait(&c, api::WaitRequest { id: id(), ..Default::default() }).await).0, Code::NOT_FOUND);
    assert_eq!(code_of(svc.pids(&c, api::PidsRequest { id: id(), ..Default::default() }).await).0, Code::NOT_FOUND);
    assert_eq!(code_of(svc.stats(&c, api::StatsRequest { id: id(), ..Default::default() }).await).0, Code::NOT_FOUND);
    assert_eq!(
        code_of(svc.connect(&c, api::ConnectRequest { id: id(), ..Default::default() }).await).0,
        Code::NOT_FOUND
    );
    let (code, msg) = code_of(svc.update(&c, api::UpdateTaskRequest { id: id(), ..Default::default() }).await);
    assert_eq!(code, Code::UNIMPLEMENTED, "{msg}");
    let (code, msg) = code_of(svc.checkpoint(&c, api::CheckpointTaskRequest { id: id(), ..Default::default() }).await);
    assert_eq!(code, Code::UNIMPLEMENTED, "{msg}");

    let dir = tempfile::tempdir().unwrap();
    let create = |bundle: &Path| api::CreateTaskRequest {
        id: "c1".into(),
        bundle: bundle.display().to_string(),
        ..Default::default()
    };
    let (code, msg) = code_of(svc.create(&c, create(dir.path())).await);
    assert_eq!(code, Code::FAILED_PRECONDITION);
    assert!(msg.contains("config.json"), "{msg}");
    bundle(dir.path(), &["true"], &serde_json::json!({"dev.matchlock.memroy": "1G"}));
    let (_, msg) = code_of(svc.create(&c, create(dir.path())).await);
    assert!(msg.contains("unknown annotation dev.matchlock.memroy"), "{msg}");
    let mut with_checkpoint = create(dir.path());
    with_checkpoint.checkpoint = "/some/checkpoint".into();
    let (_, msg) = code_of(svc.create(&c, with_checkpoint).await);
    assert!(msg.contains("checkpoint"), "{msg}");

    // An entry point for another machine, or none at all: Create says so, nothing is kept.
    let arm = tempfile::tempdir().unwrap();
    bundle(arm.path(), &["/bin/hello"], &serde_json::json!({}));
    let mut header = vec![0x7f, b'E', b'L', b'F', 2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 0, 183, 0];
    header.resize(64, 0);
    std::fs::write(arm.path().join("rootfs/bin/hello"), header).unwrap();
    let (_, msg) = code_of(svc.create(&c, create(arm.path())).await);
    assert!(msg.contains("aarch64") && msg.contains("another architecture"), "{msg}");
    bundle(arm.path(), &["no-such-program"], &serde_json::json!({}));
    let (_, msg) = code_of(svc.create(&c, create(arm.path())).await);
    assert!(msg.contains("no-such-program") && msg.contains("not found"), "{msg}");
    assert!(!arm.path().join(matchlock_shim::service::PRIVATE_ROOTFS_FILE).exists());

    svc.shutdown(&c, api::ShutdownRequest::default()).await.unwrap();
    tokio::time::timeout(Duration::from_secs(1), exit.wait()).await.expect("shutdown with no containers ends the shim");
}

fn stdout_of(cmd: &mut std::process::Command) -> String {
    common::ok(&cmd.output().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdin_reaches_the_process_and_close_io_delivers_end_of_file() {
    let home = test_home();
    let (svc, mut events, _exit) = service();
    let c = ctx();
    let dir = tempfile::tempdir().unwrap();
    bundle(dir.path(), &["sh", "-c", "cat; echo '<eof>'; exit 3"], &serde_json::json!({}));
    let fifo = |name: &str| {
        let path = dir.path().join(name);
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        path
    };
    let (stdin, stdout) = (fifo("stdin"), fifo("stdout"));
    let rootfs_images = || stdout_of(home.cmd().args(["image", "ls"])).matches("containerd-rootfs/").count();
    let images_before = rootfs_images();
    // containerd's side: the reader of stdout and the writer of stdin, open before Create.
    let mut out_reader = tokio::net::unix::pipe::OpenOptions::new().open_receiver(&stdout).unwrap();
    let create = api::CreateTaskRequest {
        id: "cat".into(),
        bundle: dir.path().display().to_string(),
        stdin: stdin.display().to_string(),
        stdout: stdout.display().to_string(),
        ..Default::default()
    };
    svc.create(&c, create.clone()).await.unwrap_or_else(|e| panic!("create: {e:?}"));
    assert_eq!(code_of(svc.create(&c, create).await).0, Code::ALREADY_EXISTS);
    let start = || api::StartRequest { id: "cat".into(), ..Default::default() };
    svc.start(&c, start()).await.unwrap();
    assert_eq!(code_of(svc.start(&c, start()).await).0, Code::FAILED_PRECONDITION, "started twice");
    let (code, _) = code_of(svc.delete(&c, api::DeleteRequest { id: "cat".into(), ..Default::default() }).await);
    assert_eq!(code, Code::FAILED_PRECONDITION, "a running task is not deleted");

    let mut writer = tokio::net::unix::pipe::OpenOptions::new().open_sender(&stdin).unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut writer, b"line one\nline two\n").await.unwrap();
    // The writer going away is not an end of file (as with containerd's own shims)...
    drop(writer);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let state = svc.state(&c, api::StateRequest { id: "cat".into(), ..Default::default() }).await.unwrap();
    assert_eq!(state.status.enum_value_or_default(), api::Status::RUNNING, "cat ended before CloseIO");
    // ...CloseIO is.
    svc.close_io(&c, api::CloseIORequest { id: "cat".into(), stdin: true, ..Default::default() }).await.unwrap();
    let waited = tokio::time::timeout(
        Duration::from_secs(30),
        svc.wait(&c, api::WaitRequest { id: "cat".into(), ..Default::default() }),
    )
    .await
    .expect("cat ends after CloseIO")
    .unwrap();
    assert_eq!(waited.exit_status, 3);
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(2), out_reader.read_to_end(&mut out)).await;
    assert_eq!(String::from_utf8_lossy(&out), "line one\nline two\n<eof>\n");
    let (code, _) =
        code_of(svc.kill(&c, api::KillRequest { id: "cat".into(), signal: 15, ..Default::default() }).await);
    assert_eq!(code, Code::NOT_FOUND, "an exited process cannot be signalled");

    let deleted = svc.delete(&c, api::DeleteRequest { id: "cat".into(), ..Default::default() }).await.unwrap();
    assert_eq!(deleted.exit_status, 3);
    let mut topics = Vec::new();
    while let Ok((topic, _)) = events.try_recv() {
        topics.push(topic);
    }
    assert_eq!(topics, ["/tasks/create", "/tasks/start", "/tasks/exit", "/tasks/delete"]);
    home.assert_no_leftovers();
    assert_eq!(rootfs_images(), images_before, "the container's private rootfs image is removed with it");
    assert!(!dir.path().join(matchlock_shim::service::PRIVATE_ROOTFS_FILE).exists());
}
