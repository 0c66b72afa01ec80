//! `matchlock mcp` driven by the official MCP Python SDK (tests/fixtures/mcp_client.py) as an
//! agent would: real VMs, the test hosts for the network policy, what the servers really
//! received, and nothing left behind when the client goes.

mod common;
mod testnet;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{debian_image, home, ok, repo_root, stderr, stdout, Home};
use serde_json::Value;
use testnet::{marker, testnet, DNS};

/// The MCP client's site-packages (`scripts/install-mcp-client.sh`).
fn client_site() -> String {
    let out = Command::new("bash").arg(repo_root().join("scripts/install-mcp-client.sh")).output().unwrap();
    ok(&out).trim().to_owned()
}

/// The Python interpreter itself (`python3` may be a shim that forks it: killing the shim
/// would leave the client running).
fn python() -> &'static str {
    static PYTHON: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    PYTHON.get_or_init(|| {
        let out = Command::new("python3").args(["-c", "import sys; print(sys.executable)"]).output().unwrap();
        ok(&out).trim().to_owned()
    })
}

/// `python3 mcp_client.py <args>` with this HOME's environment (the server it starts inherits
/// it).
fn client(h: &Home, args: &[&str]) -> Command {
    let mut cmd = Command::new(python());
    cmd.arg(repo_root().join("tests/fixtures/mcp_client.py")).args(args).env("PYTHONPATH", client_site());
    h.env_into(&mut cmd);
    cmd
}

/// A child process killed when the test ends, passed or not (a client left running would
/// hold the test's output pipes open).
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `cmd` to its end, killing it (and failing) after 10 minutes.
fn finished(cmd: &mut Command) -> std::process::Output {
    let child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(Duration::from_secs(600)) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            panic!("the MCP client ran for 10 minutes");
        }
    }
}

fn server_argv(args: &[&str]) -> String {
    let argv: Vec<&str> =
        std::iter::once(env!("CARGO_BIN_EXE_matchlock")).chain(["mcp"]).chain(args.iter().copied()).collect();
    serde_json::to_string(&argv).unwrap()
}

fn text(v: &Value) -> &str {
    v["text"].as_str().unwrap_or_default()
}

/// Waits until no process or VM directory of `h` is left.
#[track_caller]
fn wait_until_clean(h: &Home, within: Duration) {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline && !h.processes().is_empty() {
        std::thread::sleep(Duration::from_millis(200));
    }
    h.assert_no_leftovers();
}

#[test]
fn an_agent_runs_code_keeps_a_sandbox_and_moves_files_under_the_operators_policy() {
    let net = testnet();
    let h = home();
    let m = marker("mcp");
    let value = format!("mcp-secret-{m}");
    let argv = server_argv(&[
        "--image",
        debian_image(),
        "--dns-servers",
        DNS,
        "--allow-host",
        "api.test",
        "--secret",
        "KEY@api.test",
        "--max-sandboxes",
        "2",
        "--max-output",
        "4096",
        "--call-timeout",
        "120",
    ]);
    let out = finished(client(&h, &["session", &m, &argv]).env("KEY", &value));
    let report: Value = serde_json::from_str(&stdout(&out))
        .unwrap_or_else(|e| panic!("no report ({e}): {}\n{}", stdout(&out), stderr(&out)));
    let all = report.to_string();

    // The server and its tools, as the SDK read them.
    assert_eq!(report["server"], "matchlock");
    assert!(report["instructions"].as_str().unwrap().contains("api.test"), "{}", report["instructions"]);
    assert_eq!(
        report["tools"],
        serde_json::json!([
            "exec",
            "list_files",
            "read_file",
            "run_code",
            "sandbox_close",
            "sandbox_create",
            "sandbox_list",
            "write_file"
        ])
    );
    assert_eq!(report["schemas_valid"], true);
    assert_eq!(report["run_code_required"], serde_json::json!(["language", "code"]));

    // One-off runs: stdout, stderr and the exit code, structured.
    for (name, out, err, code) in [("python", "py-out\n", "py-err\n", 3), ("sh", "sh-out\n", "sh-err\n", 4)] {
        let r = &report[name]["structured"];
        assert_eq!(
            (r["stdout"].as_str(), r["stderr"].as_str(), r["exit_code"].as_i64()),
            (Some(out), Some(err), Some(code)),
            "{name}: {}",
            report[name]
        );
        assert!(text(&report[name]).contains(&format!("exit code {code}")), "{}", report[name]);
    }

    // A kept sandbox: state across calls, files both ways.
    let sid = report["created"]["structured"]["sandbox"].as_str().unwrap();
    assert_eq!(report["kept_write"]["structured"]["exit_code"], 0, "{}", report["kept_write"]);
    assert_eq!(report["kept_read"]["structured"]["stdout"], "state-42", "{}", report["kept_read"]);
    assert_eq!(report["write_file"]["structured"]["bytes"], 15);
    assert_eq!(report["write_then_cat"]["structured"]["stdout"], "hello from mcp\n");
    assert_eq!(report["read_file"]["structured"]["content"], "state-42");
    assert_eq!(report["list_files"]["structured"]["entries"][0]["name"], "hello.txt");

    // Output over the bound is cut, and the result says how much.
    let big = &report["big"]["structured"];
    assert_eq!(
        (big["stdout"].as_str().map(str::len), big["stdout_dropped_bytes"].as_u64()),
        (Some(4096), Some(100_000 - 4096)),
        "{big}"
    );
    assert!(text(&report["big"]).contains(&format!("[stdout cut: {} more bytes were dropped]", 100_000 - 4096)));

    // A long call reports progress; a cancelled one returns within seconds and its process is gone.
    assert_eq!(report["slow"]["structured"]["stdout"], "slow-done\n");
    let progress = report["progress"].as_array().unwrap();
    assert!(progress.len() >= 2, "progress notifications of a 4 s call: {progress:?}");
    assert!(report["cancel_seconds"].as_f64().unwrap() < 6.0, "cancel took {}", report["cancel_seconds"]);
    assert_eq!(
        report["after_cancel"]["structured"]["stdout"], "0\n",
        "the cancelled sleep is gone: {}",
        report["after_cancel"]
    );

    // Policy attacks are refused with a tool error naming why; nothing booted for them.
    let refused = &report["refused"];
    for (attack, why) in [
        ("image", "image alpine:latest is not allowed"),
        ("volume", "unknown field `volumes`"),
        ("host", "unknown field `allow_hosts`"),
        ("secret", "unknown field `secrets`"),
        ("unknown_sandbox", "no sandbox not-ours"),
    ] {
        assert_eq!(refused[attack]["is_error"], true, "{attack}: {}", refused[attack]);
        assert!(text(&refused[attack]).contains(why), "{attack}: {}", refused[attack]);
    }

    // The network policy: the allowed host answers, another does not, and never got a request.
    assert!(text(&report["allowed_host"]).contains("status=200"), "{}", report["allowed_host"]);
    assert!(!text(&report["other_host"]).contains("status=200"), "{}", report["other_host"]);
    assert_eq!(net.requests_with(&format!("{m}-allowed")).len(), 1);
    assert!(net.requests_with(&format!("{m}-other")).is_empty(), "other.test was reached");

    // The secret: the guest and every tool result saw the placeholder; api.test got the value.
    let echoed = report["secret_echo"]["structured"]["stdout"].as_str().unwrap();
    assert!(echoed.contains("env=SANDBOX_SECRET_") && echoed.contains("Bearer SANDBOX_SECRET_"), "{echoed}");
    assert!(!all.contains(&value), "the secret's value reached a tool result");
    let at_server = net.requests_with(&format!("/echo/{m}-secret"));
    assert_eq!(at_server.len(), 1, "{at_server:?}");
    assert_eq!(at_server[0]["headers"]["authorization"], format!("Bearer {value}"));

    // --max-sandboxes 2: the second opens, the third is refused.
    assert_eq!(report["second"]["is_error"], false, "{}", report["second"]);
    assert!(text(&report["third"]).contains("too many sandboxes: 2 are open"), "{}", report["third"]);
    assert_eq!(report["listed"]["structured"]["sandboxes"].as_array().unwrap().len(), 2);
    assert_eq!(report["closed"]["structured"]["closed"], true);
    let listed = &report["listed_after_close"]["structured"]["sandboxes"];
    assert!(listed.as_array().unwrap().iter().all(|s| s["sandbox"] != sid), "{listed}");

    // The client closed the session: every sandbox is gone.
    assert!(out.status.success(), "{}", stderr(&out));
    wait_until_clean(&h, Duration::from_secs(30));
}

/// A client (`mcp_client.py hold`) whose server opened two sandboxes, and their ids.
fn holding(h: &Home) -> (Reaped, Value) {
    let mut child =
        Reaped(client(h, &["hold", &server_argv(&["--image", "busybox"])]).stdout(Stdio::piped()).spawn().unwrap());
    let mut line = String::new();
    BufReader::new(child.0.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let ids: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
    assert_eq!(ids["ids"].as_array().unwrap().len(), 2, "{ids}");
    (child, ids)
}

#[test]
fn a_killed_client_takes_every_sandbox_with_it() {
    let h = home();
    let (child, ids) = holding(&h);
    let running = stdout(&h.cmd().args(["list", "--running"]).output().unwrap());
    for id in ids["ids"].as_array().unwrap() {
        assert!(running.contains(id.as_str().unwrap()), "{id} runs: {running}");
    }
    assert!(!h.processes().is_empty(), "the sandboxes' QEMU processes run");
    drop(child);
    wait_until_clean(&h, Duration::from_secs(30));
    let listed = stdout(&h.cmd().args(["list"]).output().unwrap());
    assert!(ids["ids"].as_array().unwrap().iter().all(|id| !listed.contains(id.as_str().unwrap())), "{listed}");
}

#[test]
fn streamable_http_needs_the_bearer_token_and_stops_cleanly() {
    let h = home();
    let token = "test-token-0123456789abcdef";
    let mut server = Reaped(
        h.cmd()
            .args(["mcp", "--image", "busybox", "--listen", "127.0.0.1:0"])
            .env("MATCHLOCK_MCP_TOKEN", token)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut lines = BufReader::new(server.0.stderr.take().unwrap()).lines();
    let url = loop {
        let line = lines.next().expect("the server printed its address").unwrap();
        if let Some(url) = line.strip_prefix("matchlock: MCP on ") {
            break url.to_owned();
        }
    };
    std::thread::spawn(move || lines.for_each(drop));
    let out = finished(&mut client(&h, &["http", &url, token]));
    let report: Value = serde_json::from_str(&stdout(&out))
        .unwrap_or_else(|e| panic!("no report ({e}): {}\n{}", stdout(&out), stderr(&out)));
    assert_eq!(report["tools"].as_array().unwrap().len(), 8, "{report}");
    assert_eq!(report["exec"]["structured"]["stdout"], "via-http\n", "{report}");
    assert_eq!((report["no_token"].as_u64(), report["wrong_token"].as_u64()), (Some(401), Some(401)), "{report}");
    common::signal(&server.0, nix::sys::signal::Signal::SIGTERM);
    let status = server.0.wait().unwrap();
    assert!(status.success(), "{status}");
    h.assert_no_leftovers();
}

/// The processes whose parent is `parent`.
fn children_of(parent: u32) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // pid (comm) state ppid …: the fields after the last ')'.
            stat.rsplit(')').next().and_then(|rest| rest.split_whitespace().nth(1)).and_then(|p| p.parse().ok())
                == Some(parent)
        })
        .collect()
}

#[test]
fn a_crashed_server_leaves_nothing_gc_cannot_clean() {
    let h = home();
    let (child, ids) = holding(&h);
    let servers = children_of(child.0.id());
    assert_eq!(servers.len(), 1, "the client started one server: {servers:?}");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(servers[0]), nix::sys::signal::Signal::SIGKILL).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline && !h.processes().is_empty() {
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(child);
    assert!(h.processes().is_empty(), "the helpers die with their owner: {:?}", h.processes());
    // gc releases what the crash left (disks, sockets) and keeps the logs; prune removes them.
    let gc = ok(&h.ml(&["gc"]));
    for id in ids["ids"].as_array().unwrap() {
        assert!(gc.contains(&format!("{}: cleaned", id.as_str().unwrap())), "{gc}");
    }
    assert!(ok(&h.ml(&["prune"])).contains("Pruned 2 VMs"));
    h.assert_no_leftovers();
}
