//! The Rust SDK (`matchlock-sdk`) against real VMs through `matchlock rpc`.

mod common;

use std::time::{Duration, Instant};

use common::{debian_image, home, Home};
use matchlock_sdk::{
    codes, Client, CreateOptions, Event, ExecOptions, NetworkLimits, VfsAction, VfsInterception, VfsRule,
};

async fn client(h: &Home) -> Client {
    Client::from_command(h.cmd()).await.expect("start matchlock rpc")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn core_flows() {
    let h = home();
    let c = client(&h).await;
    let err = c.exec("true").await.unwrap_err();
    assert_eq!(err.code(), Some(codes::VM_FAILED), "{err}");
    let mut events = c.events();
    let rules = VfsInterception {
        emit_events: true,
        rules: vec![VfsRule {
            name: "no-pem".into(),
            ops: vec!["create".into()],
            path: "/workspace/*.pem".into(),
            action: VfsAction::Block,
            ..VfsRule::default()
        }],
    };
    let id = c
        .create(
            CreateOptions::new(debian_image()).env("GREETING", "hi").mount_memory("/workspace").vfs_interception(rules),
        )
        .await
        .unwrap();
    assert!(id.starts_with("vm-"), "{id}");

    // Batch exec: output, exit code, default dir, env, user and dir options.
    let out = c.exec("echo $GREETING; echo oops >&2; pwd; exit 7").await.unwrap();
    assert_eq!(
        (out.stdout.as_slice(), out.stderr.as_slice(), out.exit_code),
        (&b"hi\n/workspace\n"[..], &b"oops\n"[..], 7)
    );
    let opts = ExecOptions { working_dir: Some("/tmp".into()), user: Some("nobody".into()), ..ExecOptions::default() };
    assert_eq!(c.exec_with("pwd; id -u", &opts).await.unwrap().stdout, b"/tmp\n65534\n");
    // Stats and the network budgets (our extensions).
    let stats = c.stats().await.unwrap();
    assert!(stats.guest_memory_total > 0 && stats.execs >= 2 && stats.host_private_bytes > 0, "{stats:?}");
    let lowered = NetworkLimits { max_requests: Some(7), ..NetworkLimits::default() };
    let (limits, usage) = c.limits(Some(&lowered)).await.unwrap();
    assert_eq!((limits, usage.requests), (lowered, 0));

    // Streaming, pipe (stdin with EOF) and TTY.
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    let status = c
        .exec_stream("for i in 1 2 3; do echo $i; done; echo e >&2", &ExecOptions::default(), &mut stdout, &mut stderr)
        .await
        .unwrap();
    assert_eq!((status.exit_code, stdout.as_slice(), stderr.as_slice()), (0, &b"1\n2\n3\n"[..], &b"e\n"[..]));
    let input = vec![b'x'; 300_000];
    let mut piped = Vec::new();
    let status =
        c.exec_pipe("wc -c", &ExecOptions::default(), input.as_slice(), &mut piped, tokio::io::sink()).await.unwrap();
    assert_eq!((status.exit_code, String::from_utf8_lossy(&piped).trim()), (0, "300000"));
    let mut screen = Vec::new();
    c.exec_tty("stty size; tty", &ExecOptions::default(), (40, 120), tokio::io::empty(), &mut screen).await.unwrap();
    let screen = String::from_utf8_lossy(&screen);
    assert!(screen.contains("40 120") && screen.contains("/dev/pts/"), "{screen}");

    // Files, through the workspace (file events) and the guest's own disk.
    let data: Vec<u8> = (0..2_000_000u32).map(|i| (i % 251) as u8).collect();
    c.write_file("/workspace/data/blob.bin", &data, 0o600).await.unwrap();
    assert_eq!(c.read_file("/workspace/data/blob.bin").await.unwrap(), data);
    let listed = c.list_files("/workspace/data").await.unwrap();
    assert_eq!((listed[0].name.as_str(), listed[0].size, listed[0].mode & 0o777), ("blob.bin", 2_000_000, 0o600));
    let blocked = c.write_file("/workspace/key.pem", b"k", 0).await.unwrap_err();
    assert_eq!(blocked.code(), Some(codes::FILE_FAILED), "{blocked}");
    let err = c.read_file("/no/such/file").await.unwrap_err();
    assert!(err.to_string().contains("No such file"), "{err}");
    let mut saw_write = false;
    while let Ok(Some(event)) = tokio::time::timeout(Duration::from_secs(2), events.recv()).await {
        if let Event::File(f) = event {
            saw_write |= f.op == "write" && f.path == "/workspace/data/blob.bin";
        }
    }
    assert!(saw_write, "file events for the workspace write");

    // Cancellation by dropping the future: the command dies in the guest.
    let started = Instant::now();
    let timed_out = tokio::time::timeout(Duration::from_secs(1), c.exec("touch /tmp/started; sleep 60")).await;
    assert!(timed_out.is_err() && started.elapsed() < Duration::from_secs(5));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let left = c.exec("test -f /tmp/started && echo started; cat /proc/[0-9]*/comm | grep -cx sleep").await.unwrap();
    assert_eq!(String::from_utf8_lossy(&left.stdout), "started\n0\n");

    // Port forward to a server the guest runs for one connection.
    let server = c.exec("python3 -c \"import socket\ns=socket.socket();s.bind(('127.0.0.1',7000));s.listen()\nc,_=s.accept();c.sendall(b'from-guest');c.close()\"");
    let forward = async {
        let bindings = c.port_forward(&[(0, 7000)], &[]).await.unwrap();
        assert_eq!((bindings[0].address.as_str(), bindings[0].remote_port), ("127.0.0.1", 7000));
        assert_ne!(bindings[0].local_port, 0);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            use tokio::io::AsyncReadExt;
            let mut got = Vec::new();
            if let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", bindings[0].local_port)).await {
                let _ = s.read_to_end(&mut got).await;
            }
            if got == b"from-guest" {
                break;
            }
            assert!(Instant::now() < deadline, "no answer through the forward");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    let (served, ()) = tokio::join!(server, forward);
    assert_eq!(served.unwrap().exit_code, 0);

    c.close().await.unwrap();
    c.remove().await.unwrap();
    h.assert_no_leftovers();
    assert!(!String::from_utf8_lossy(&h.ml(&["list"]).stdout).contains(&id));
}

#[tokio::test]
async fn create_errors_are_typed() {
    let h = home();
    let c = client(&h).await;
    let err = c.create(CreateOptions::new("no-such-image")).await.unwrap_err();
    assert_eq!(err.code(), Some(codes::VM_FAILED), "{err}");
    let err = c.create(CreateOptions::new("busybox").no_network().allow_host("x")).await.unwrap_err();
    assert_eq!(err.code(), Some(codes::INVALID_PARAMS), "{err}");
    c.close().await.unwrap();
    h.assert_no_leftovers();
}

#[tokio::test]
async fn a_dropped_client_leaves_nothing_behind() {
    let h = home();
    let c = client(&h).await;
    c.create(CreateOptions::new("busybox").no_network()).await.unwrap();
    assert_eq!(c.exec("echo up").await.unwrap().stdout, b"up\n");
    drop(c);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !(h.processes().is_empty() && std::fs::read_dir(h.vms_dir()).map_or(true, |d| d.count() == 0)) {
        assert!(Instant::now() < deadline, "left behind: {:?}", h.processes());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    h.assert_no_leftovers();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_and_restore_through_the_sdk() {
    let h = home();
    let source = client(&h).await;
    source.create(CreateOptions::new("busybox")).await.unwrap();
    assert_eq!(source.exec("echo kept > /root/f").await.unwrap().exit_code, 0);
    let meta = source.snapshot("sdk-snap").await.unwrap();
    assert_eq!(meta["name"], "sdk-snap");
    let restored = client(&h).await;
    let id = restored.restore("sdk-snap", &[]).await.unwrap();
    assert_ne!(Some(id.clone()), source.vm_id());
    assert_eq!(restored.exec("cat /root/f; hostname").await.unwrap().stdout, format!("kept\n{id}\n").into_bytes());
    let missing = client(&h).await;
    let err = missing.restore("no-such", &[]).await.unwrap_err();
    assert!(err.to_string().contains("snapshot not found"), "{err}");
    for c in [source, restored, missing] {
        let _ = c.close().await;
    }
}
