//! `matchlock rpc`: the wire protocol driven directly (no VM needed for most checks), and
//! the original project's Python SDK from PyPI, unchanged, against real VMs.

mod common;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use common::{debian_image, home, python_sdk_command, Rpc};
use serde_json::{json, Value};

fn error_code(response: &Value) -> i64 {
    response["error"]["code"].as_i64().unwrap_or_else(|| panic!("not an error: {response}"))
}

#[test]
fn protocol_errors_are_answered_and_the_server_keeps_serving() {
    let h = home();
    let mut rpc = Rpc::start(h.cmd());
    rpc.send_raw(b"this is not json\n");
    assert_eq!(rpc.recv(), json!({"jsonrpc": "2.0", "error": {"code": -32700, "message": "Parse error"}}));
    rpc.send_raw(b"\n   \n");
    rpc.send_raw(br#"{"jsonrpc":"2.0","method":"exec","id":"seven"}"#);
    rpc.send_raw(b"\n");
    assert_eq!(error_code(&rpc.recv()), -32700, "a string id is a parse error");
    // A line over the 10 MiB limit is refused without taking the server down.
    let mut long = vec![b'x'; 10 * 1024 * 1024 + 10];
    long.push(b'\n');
    rpc.send_raw(&long);
    assert_eq!(error_code(&rpc.recv()), -32700);
    let r = rpc.call(1, "no_such_method", &json!({}));
    assert_eq!(r["error"], json!({"code": -32601, "message": "Method not found"}));
    let r = rpc.call(2, "exec", &json!({"command": "true"}));
    assert_eq!(r["error"], json!({"code": -32000, "message": "VM not created"}));
    let r = rpc.call(3, "create", &json!({}));
    assert_eq!(r["error"], json!({"code": -32602, "message": "image is required (e.g., alpine:latest)"}));
    let r = rpc.call(4, "create", &json!({"image": "busybox", "id": "vm-mine"}));
    assert_eq!(r["error"]["message"], "id is internal-only and cannot be set");
    let r = rpc.call(5, "create", &json!({"image": "busybox", "resources": {"cpus": "many"}}));
    assert_eq!(error_code(&r), -32602, "{r}");
    let r = rpc.call(6, "create", &json!({"image": "busybox", "network": {"no_network": true, "intercept": true}}));
    assert!(r["error"]["message"].as_str().unwrap().contains("no_network cannot be combined"), "{r}");
    let r = rpc.call(7, "create", &json!({"image": "busybox", "vfs": {"workspace": "/w", "mounts": {"/x": {}}}}));
    assert!(r["error"]["message"].as_str().unwrap().contains("within workspace"), "{r}");
    let r = rpc.call(8, "create", &json!({"image": "no-such-image"}));
    assert_eq!(error_code(&r), -32000, "{r}");
    let r = rpc.call(9, "cancel", &json!({"id": 12345}));
    assert_eq!(r["result"], json!({"cancelled": false}));
    // Input for unknown commands is ignored, never answered.
    rpc.send(&json!({"jsonrpc": "2.0", "method": "exec_pipe.stdin", "params": {"id": 99, "data": "aGk="}}));
    let r = rpc.call(10, "log", &json!({}));
    assert_eq!(r["error"]["message"], "VM not created");
    assert!(rpc.finish().success());
    h.assert_no_leftovers();
}

#[test]
fn stdin_eof_without_close_removes_the_sandbox() {
    let h = home();
    let mut rpc = Rpc::start(h.cmd());
    let r = rpc.call(1, "create", &json!({"image": "busybox", "network": {"no_network": true}}));
    let id = r["result"]["id"].as_str().unwrap_or_else(|| panic!("{r}")).to_owned();
    let r = rpc.call(2, "exec", &json!({"command": "echo $((6 * 7))"}));
    assert_eq!(r["result"]["stdout"], "NDIK", "{r}");
    assert!(rpc.finish().success());
    h.assert_no_leftovers();
    assert!(!String::from_utf8_lossy(&h.ml(&["list"]).stdout).contains(&id));
}

/// Runs tests/sdk/test_python_sdk.py (unittest) with the PyPI SDK against this build.
#[test]
fn python_sdk_suite() {
    let h = home();
    let image = debian_image();
    let out = python_sdk_command(&h.cmd(), "tests/sdk/test_python_sdk.py")
        .env("MATCHLOCK_TEST_IMAGE", image)
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "Python SDK suite failed:\n{log}");
    assert!(log.contains("OK"), "{log}");
    h.assert_no_leftovers();
}

#[test]
fn long_running_entrypoint_then_close_and_stop_signal_teardown() {
    let h = home();
    let mut rpc = Rpc::start(h.cmd());
    let create = json!({"image": "busybox", "launch_entrypoint": true, "network": {"no_network": true},
        "image_config": {"entrypoint": ["sh", "-c", "echo serving; sleep 300"]}});
    let r = rpc.call(1, "create", &create);
    let id = r["result"]["id"].as_str().unwrap_or_else(|| panic!("{r}")).to_owned();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        let r = rpc.call(2, "log", &json!({}));
        let log = B64.decode(r["result"]["content"].as_str().unwrap_or_default()).unwrap();
        if String::from_utf8_lossy(&log).contains("serving\n") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the entrypoint's output never reached the log: {r}");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    // An exec in flight when close arrives is cancelled and answered.
    rpc.send(&json!({"jsonrpc": "2.0", "method": "exec", "params": {"command": "sleep 300"}, "id": 3}));
    let started = std::time::Instant::now();
    rpc.send(&json!({"jsonrpc": "2.0", "method": "close", "params": {"timeout_seconds": 2}, "id": 4}));
    let (first, second) = (rpc.recv(), rpc.recv());
    assert_eq!((first["id"].as_u64(), error_code(&first)), (Some(3), -32003), "{first}");
    assert_eq!((second["id"].as_u64(), &second["result"]), (Some(4), &json!({})), "{second}");
    assert!(started.elapsed() < std::time::Duration::from_secs(20), "close took {:?}", started.elapsed());
    assert!(rpc.finish().success());
    assert!(h.processes().is_empty(), "{:?}", h.processes());
    let listed = String::from_utf8_lossy(&h.ml(&["list"]).stdout).into_owned();
    assert!(listed.contains(&id) && listed.contains("stopped"), "{listed}");
    assert!(h.ml(&["rm", &id]).status.success());

    // SIGTERM (as `Popen.terminate()` sends) tears the sandbox down and removes it.
    let mut rpc = Rpc::start(h.cmd());
    let r = rpc.call(1, "create", &json!({"image": "busybox", "network": {"no_network": true}}));
    assert!(r["result"]["id"].is_string(), "{r}");
    let pid = nix::unistd::Pid::from_raw(rpc.child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    assert!(rpc.finish().success());
    h.assert_no_leftovers();
}

#[test]
fn a_vm_that_dies_mid_command_fails_the_command_and_close_cleans_up() {
    let h = home();
    let mut rpc = Rpc::start(h.cmd());
    let r = rpc.call(1, "create", &json!({"image": "busybox", "network": {"no_network": true}}));
    assert!(r["result"]["id"].is_string(), "{r}");
    rpc.send(&json!({"jsonrpc": "2.0", "method": "exec", "params": {"command": "sleep 300"}, "id": 2}));
    std::thread::sleep(std::time::Duration::from_millis(500));
    // The VM crashes: its QEMU process is killed.
    let (qemu, _) = h.pids().into_iter().find(|(_, c)| c.contains("qemu-system")).expect("a QEMU process");
    let started = std::time::Instant::now();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(qemu), nix::sys::signal::Signal::SIGKILL).unwrap();
    let r = rpc.recv();
    assert_eq!((r["id"].as_u64(), error_code(&r)), (Some(2), -32001), "{r}");
    assert!(r["error"]["message"].as_str().unwrap().contains("VM"), "{r}");
    assert!(started.elapsed() < std::time::Duration::from_secs(10), "took {:?}", started.elapsed());
    let r = rpc.call(3, "exec", &json!({"command": "true"}));
    assert!(r.get("error").is_some(), "{r}");
    let r = rpc.call(4, "close", &json!({}));
    assert!(r.get("result").is_some() || r.get("error").is_some(), "{r}");
    assert!(rpc.finish().success());
    assert!(h.processes().is_empty(), "{:?}", h.processes());
}
