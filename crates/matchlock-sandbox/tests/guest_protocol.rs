//! The guest agent under hostile input, on a real VM: a malformed frame closes that
//! connection only, and the sandbox keeps serving.

use matchlock_api::SandboxConfig;
use matchlock_protocol::exec::{ExecMode, ExecRequest, GuestMessage};
use matchlock_protocol::frame::tokio_io::read_frame;
use matchlock_protocol::EXEC_PORT;
use matchlock_sandbox::{ExecIo, Sandbox};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

mod common;
use common::{busybox_store, isolate};

#[tokio::test(flavor = "current_thread")]
async fn malformed_frames_close_only_their_connection() {
    let home = tempfile::tempdir().unwrap();
    isolate(home.path());
    let store = busybox_store(home.path());

    let state = matchlock_sandbox::open_state().unwrap();
    let sandbox = Sandbox::create(SandboxConfig::new("busybox"), &store, state).await.unwrap();

    // Unknown frame type, an absurd length, and a truncated frame: each connection is
    // dropped by the agent without an answer.
    for garbage in [&[200u8, 0, 0, 0, 0][..], &[11, 0xff, 0xff, 0xff, 0xff], &[11, 0, 0, 0, 50, b'{']] {
        let mut conn = sandbox.connect(EXEC_PORT).await.unwrap();
        conn.write_all(garbage).await.unwrap();
        conn.shutdown().await.unwrap();
        let mut rest = Vec::new();
        let _ = conn.read_to_end(&mut rest).await;
        assert!(rest.is_empty(), "agent answered garbage {garbage:?} with {rest:?}");
    }

    // A well-framed request with invalid content gets an error and exit 127.
    let mut conn = sandbox.connect(EXEC_PORT).await.unwrap();
    let bad = br#"{"argv":[]}"#;
    let mut frame = vec![11u8];
    frame.extend_from_slice(&(bad.len() as u32).to_be_bytes());
    frame.extend_from_slice(bad);
    conn.write_all(&frame).await.unwrap();
    let mut messages = Vec::new();
    while let Some(f) = read_frame(&mut conn).await.unwrap() {
        messages.push(GuestMessage::from_frame(f).unwrap());
    }
    assert!(matches!(&messages[0], GuestMessage::Stderr(m) if String::from_utf8_lossy(m).contains("empty argv")));
    assert_eq!(messages.last(), Some(&GuestMessage::Exit(127)));

    // The sandbox still runs commands.
    let (_tx, control) = tokio::sync::mpsc::channel(1);
    let mut out = Vec::new();
    let io = ExecIo { stdin: None, stdout: Box::new(&mut out), stderr: Box::new(tokio::io::sink()), control };
    let request = ExecRequest {
        argv: vec!["echo".into(), "still serving".into()],
        env: vec![],
        working_dir: None,
        user: None,
        window: None,
        rlimits: Vec::new(),
        root: None,
        binds: Vec::new(),
    };
    let code = sandbox.exec(ExecMode::Stream, &request, io).await.unwrap();
    assert_eq!(code, 0);
    assert_eq!(out, b"still serving\n");
    sandbox.close(true).await.unwrap();
    assert_eq!(std::fs::read_dir(home.path().join(".matchlock/vms")).unwrap().count(), 0);
}
