//! The containerd runtime `io.containerd.matchlock.v1` against a real containerd (Debian's
//! 1.6) started by each test with its own root, state, sockets and namespace, driven by
//! Debian's `ctr`, with images put in by `ctr image import` and real VMs behind.

mod common;
mod testnet;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{home, ok, stderr, stdout, Home};

const IMAGE: &str = "docker.io/library/busybox:latest";
const RUNTIME: &str = "io.containerd.matchlock.v1";
const NAMESPACE: &str = "mltest";

/// A private containerd: its config, root, state and sockets under one temporary
/// directory; the shim first on its PATH; the test's HOME (and so its own VM state).
struct Containerd {
    dir: tempfile::TempDir,
    daemon: Child,
    home: Home,
    extra_env: Vec<(String, PathBuf)>,
    /// `mltest`, or CRI's `k8s.io`.
    namespace: &'static str,
    /// The CNI bridge a CRI containerd's pods made (removed at the end).
    bridge: Option<String>,
}

/// The subnet of the CRI tests' pods (a bridge of the test's own; not one the machine uses).
const POD_SUBNET: &str = "10.213.77";

/// Starts containerd on the configuration in `dir`, with `home`'s environment.
fn spawn_daemon(home: &Home, dir: &Path, extra_env: &[(String, PathBuf)]) -> Child {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("containerd.log")).unwrap();
    let mut cmd = Command::new("containerd");
    home.env_into(&mut cmd)
        .arg("--config")
        .arg(dir.join("config.toml"))
        .env("PATH", format!("{}:{}", dir.join("bin").display(), std::env::var("PATH").unwrap_or_default()))
        .envs(extra_env.iter().map(|(k, v)| (k, v)))
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    cmd.spawn().expect("containerd (installed by scripts/install-deps.sh)")
}

impl Containerd {
    fn start() -> Self {
        Self::start_with(&[])
    }

    fn start_with(env: &[(&str, &Path)]) -> Self {
        Self::launch(env, false, home())
    }

    /// With an image store of its own (what it caches is its own to count).
    fn start_isolated() -> Self {
        Self::launch(&[], false, common::isolated_home())
    }

    /// containerd with its CRI plugin: a CNI bridge and subnet of the test's own, the
    /// runtime handler `matchlock`, the pause, busybox and layered images in `k8s.io`.
    fn start_cri() -> Self {
        Self::launch(&[], true, home())
    }

    fn launch(env: &[(&str, &Path)], cri: bool, home: Home) -> Self {
        // Unix socket paths are short: directly under /tmp.
        let dir = tempfile::Builder::new().prefix("ml-ctd-").tempdir_in("/tmp").expect("temp dir");
        let d = dir.path().display().to_string();
        let bin = dir.path().join("bin");
        std::fs::create_dir(&bin).unwrap();
        std::os::unix::fs::symlink(
            env!("CARGO_BIN_EXE_containerd-shim-matchlock-v1"),
            bin.join("containerd-shim-matchlock-v1"),
        )
        .unwrap();
        let bridge = format!("mlcri{}", std::process::id() % 100_000);
        let plugins = if cri {
            std::fs::create_dir(dir.path().join("cni")).unwrap();
            let conflist = serde_json::json!({
                "cniVersion": "0.4.0", "name": bridge, "plugins": [{
                    "type": "bridge", "bridge": bridge, "isGateway": true, "ipMasq": false,
                    "ipam": {"type": "host-local", "ranges": [[{"subnet": format!("{POD_SUBNET}.0/24")}]],
                             "dataDir": format!("{d}/ipam")}}]});
            std::fs::write(dir.path().join("cni/10-mlcri.conflist"), conflist.to_string()).unwrap();
            format!(
                r#"[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "registry.test/pause:1"
  restrict_oom_score_adj = true
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{d}/cni"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.matchlock]
    runtime_type = "io.containerd.matchlock.v1"
    pod_annotations = ["dev.matchlock.*"]
"#
            )
        } else {
            String::new()
        };
        let disabled = if cri { "" } else { r#"disabled_plugins = ["io.containerd.grpc.v1.cri"]"# };
        let config = format!(
            r#"version = 2
root = "{d}/root"
state = "{d}/state"
{disabled}
[grpc]
  address = "{d}/containerd.sock"
[ttrpc]
  address = "{d}/containerd.sock.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"
{plugins}"#
        );
        std::fs::write(dir.path().join("config.toml"), config).unwrap();
        let extra_env: Vec<(String, PathBuf)> = env.iter().map(|(k, v)| ((*k).to_owned(), v.to_path_buf())).collect();
        let daemon = spawn_daemon(&home, dir.path(), &extra_env);
        let namespace = if cri { "k8s.io" } else { NAMESPACE };
        let c = Self { dir, daemon, home, extra_env, namespace, bridge: cri.then_some(bridge) };
        c.wait_ready();
        let tarball = common::fixture("busybox.tar");
        ok(&c.ctr(&["image", "import", "--index-name", IMAGE]).arg(&tarball).output().unwrap());
        if cri {
            ok(&c
                .ctr(&["image", "import", "--index-name", "registry.test/pause:1"])
                .arg(common::fixture("pause.tar"))
                .output()
                .unwrap());
            ok(&c.ctr(&["image", "import"]).arg(common::fixture("layered.tar")).output().unwrap());
        }
        c
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.ctr(&["version"]).output().unwrap().status.success() {
            assert!(Instant::now() < deadline, "containerd did not start:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// kill -9 of containerd, then containerd again on the same root and state.
    fn crash_and_restart(&mut self) {
        self.daemon.kill().unwrap();
        self.daemon.wait().unwrap();
        self.daemon = spawn_daemon(&self.home, self.dir.path(), &self.extra_env);
        self.wait_ready();
    }

    fn ctr(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("ctr");
        cmd.arg("--address").arg(self.dir.path().join("containerd.sock")).args(["-n", self.namespace]).args(args);
        cmd.stdin(Stdio::null());
        cmd
    }

    fn out(&self, args: &[&str]) -> Output {
        self.ctr(args).output().expect("run ctr")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
    }

    /// `ctr task ls`: (task, status) pairs.
    fn tasks(&self) -> Vec<(String, String)> {
        stdout(&self.out(&["task", "ls"]))
            .lines()
            .skip(1)
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                Some((f.first()?.to_string(), f.get(2)?.to_string()))
            })
            .collect()
    }

    fn status(&self, id: &str) -> String {
        self.tasks().into_iter().find(|(t, _)| t == id).map(|(_, s)| s).unwrap_or_default()
    }

    fn wait_status(&self, id: &str, want: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.status(id) != want {
            assert!(Instant::now() < deadline, "{id} never became {want}: {:?}\n{}", self.tasks(), self.log());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `ctr task rm` then `ctr container rm` of a stopped task.
    #[track_caller]
    fn remove(&self, name: &str) {
        ok(&self.out(&["task", "rm", name]));
        ok(&self.out(&["container", "rm", name]));
    }

    /// Our shim processes (their command line names this containerd's socket).
    fn shims(&self) -> Vec<i32> {
        common::processes_mentioning(&self.dir.path().to_string_lossy())
            .into_iter()
            .filter(|(_, cmdline)| cmdline.contains("containerd-shim-matchlock-v1"))
            .map(|(pid, _)| pid)
            .collect()
    }

    /// Records `ctr events` until [`Events::topics`].
    fn events(&self) -> Events {
        let mut child = self.ctr(&["events"]).stdout(Stdio::piped()).spawn().unwrap();
        let reader = BufReader::new(child.stdout.take().unwrap());
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let collected = std::sync::Arc::clone(&lines);
        std::thread::spawn(move || {
            reader.lines().map_while(Result::ok).for_each(|l| collected.lock().unwrap().push(l))
        });
        // Subscribed once an event of our own shows up.
        let deadline = Instant::now() + Duration::from_secs(20);
        for n in 0.. {
            let marker = format!("ml-events-ready-{n}");
            ok(&self.ctr(&["namespaces", "create", &marker]).output().unwrap());
            ok(&self.ctr(&["namespaces", "remove", &marker]).output().unwrap());
            std::thread::sleep(Duration::from_millis(100));
            if lines.lock().unwrap().iter().any(|l| l.contains("/namespaces/")) {
                break;
            }
            assert!(Instant::now() < deadline, "ctr events never subscribed");
        }
        Events { child, lines }
    }

    /// Nothing of a finished container is left: no shim, no VM process or directory, no
    /// state row, no mount under containerd's directories.
    #[track_caller]
    fn assert_clean(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.shims().is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(self.shims().is_empty(), "shims left: {:?}", self.shims());
        self.home.assert_no_leftovers();
        let listed = stdout(&self.home.cmd().args(["list"]).output().unwrap());
        assert_eq!(listed.lines().count(), 1, "state rows left:\n{listed}");
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let ours = self.dir.path().to_string_lossy().into_owned();
        assert!(!ours.is_empty() && !mounts.contains(&ours), "mounts left:\n{mounts}");
    }
}

/// A running `ctr events`.
struct Events {
    child: Child,
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Events {
    /// The task topics containerd published so far, in order.
    fn seen(&self) -> Vec<String> {
        let lines = self.lines.lock().unwrap();
        lines
            .iter()
            .filter_map(|l| l.split_whitespace().find(|f| f.starts_with("/tasks/")).map(str::to_owned))
            .collect()
    }

    /// The task topics, once `complete` says they are all there (or after 20 s).
    fn topics(mut self, complete: impl Fn(&[String]) -> bool) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !complete(&self.seen()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        self.seen()
    }
}

impl Containerd {
    /// The network namespaces the CRI plugin made for this containerd's pods (named in
    /// their sandbox specs under its own state directory).
    fn pod_namespaces(&self) -> Vec<PathBuf> {
        let tasks = self.dir.path().join("state/io.containerd.runtime.v2.task").join(self.namespace);
        std::fs::read_dir(tasks)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|bundle| std::fs::read(bundle.path().join("config.json")).ok())
            .filter_map(|spec| serde_json::from_slice::<serde_json::Value>(&spec).ok())
            .flat_map(|spec| spec["linux"]["namespaces"].as_array().cloned().unwrap_or_default())
            .filter(|ns| ns["type"] == "network")
            .filter_map(|ns| ns["path"].as_str().filter(|p| p.starts_with("/var/run/netns/cni-")).map(PathBuf::from))
            .collect()
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        // A test that failed half-way leaves its pods: their namespaces are ours to remove.
        let pod_namespaces = if self.bridge.is_some() { self.pod_namespaces() } else { Vec::new() };
        for (task, _) in self.tasks() {
            let _ = self.out(&["task", "kill", "-s", "SIGKILL", &task]);
            let _ = self.out(&["task", "rm", "-f", &task]);
        }
        for c in stdout(&self.out(&["container", "ls", "-q"])).lines() {
            let _ = self.out(&["container", "rm", c]);
        }
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.daemon.id() as i32), nix::sys::signal::SIGTERM);
        let _ = self.daemon.wait();
        for pid in self.shims() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL);
        }
        if let Some(bridge) = &self.bridge {
            let _ = Command::new("ip").args(["link", "del", bridge]).output();
        }
        for ns in pod_namespaces.iter().filter_map(|p| p.file_name()).filter_map(|n| n.to_str()) {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
        // Only mounts under our own directory, which is never empty.
        let ours = self.dir.path().to_string_lossy().into_owned();
        if ours.len() > 5 {
            for line in std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default().lines() {
                if let Some(point) = line.split(' ').nth(4).filter(|p| p.starts_with(&ours)) {
                    let _ = nix::mount::umount2(point, nix::mount::MntFlags::MNT_DETACH);
                }
            }
        }
    }
}

fn host_release() -> String {
    nix::sys::utsname::uname().unwrap().release().to_string_lossy().into_owned()
}

#[test]
fn ctr_run_gives_exact_output_exit_code_env_and_cwd_and_the_second_container_reuses_the_rootfs() {
    let c = Containerd::start_isolated();
    let script = "echo out; echo err >&2; echo foo=$FOO; pwd; uname -r; hostname; ulimit -n; exit 42";
    let run = |name: &str| {
        c.out(&[
            "run",
            "--rm",
            "--runtime",
            RUNTIME,
            "--env",
            "FOO=bar baz",
            "--cwd",
            "/tmp",
            IMAGE,
            name,
            "sh",
            "-c",
            script,
        ])
    };
    let out = run("first");
    let (o, e) = (stdout(&out), stderr(&out));
    assert_eq!(out.status.code(), Some(42), "stdout:\n{o}\nstderr:\n{e}\n{}", c.log());
    let lines: Vec<&str> = o.lines().collect();
    assert_eq!(lines[..3], ["out", "foo=bar baz", "/tmp"], "{o}");
    assert!(lines[3].contains("matchlock") && lines[3] != host_release(), "the guest's kernel, not the host's: {o}");
    assert_eq!(lines[4], "first", "the hostname is the container's id");
    assert_eq!(lines[5], "1024", "the spec's RLIMIT_NOFILE (containerd's default spec says 1024)");
    assert_eq!(e.trim(), "err");
    c.assert_clean();

    let rootfs_images = || {
        stdout(&c.home.cmd().args(["image", "ls"]).output().unwrap())
            .lines()
            .filter(|l| l.starts_with("containerd-rootfs/"))
            .count()
    };
    let kept = rootfs_images();
    assert_eq!(kept, 1, "the image's rootfs is kept, keyed by its snapshot chain");
    let out = run("second");
    assert_eq!(out.status.code(), Some(42), "{}", stderr(&out));
    assert_eq!(rootfs_images(), kept, "the second container of the image reuses the first one's rootfs");
    c.assert_clean();
}

#[test]
fn a_detached_task_execs_lists_reports_metrics_pauses_and_takes_signals() {
    let c = Containerd::start();
    let data = tempfile::tempdir().unwrap();
    let mount = format!("type=bind,src={},dst=/data,options=rbind:rw", data.path().display());
    let script = r#"trap 'echo "got TERM" > /data/term; exit 7' TERM; echo started > /data/started; while true; do sleep 0.2; done"#;
    ok(&c.out(&["run", "-d", "--runtime", RUNTIME, "--mount", &mount, IMAGE, "web", "sh", "-c", script]));
    c.wait_status("web", "RUNNING");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !data.path().join("started").exists() {
        assert!(Instant::now() < deadline, "the init never wrote through the rw bind mount");
        std::thread::sleep(Duration::from_millis(100));
    }

    // exec: output, exit code, user, stdin from ctr's own stdin.
    let out = c.out(&["task", "exec", "--exec-id", "e1", "web", "cat", "/etc/hostname"]);
    assert_eq!(stdout(&out).trim(), "web", "{}", stderr(&out));
    let out = c.out(&["task", "exec", "--exec-id", "e2", "web", "sh", "-c", "exit 5"]);
    assert_eq!(out.status.code(), Some(5));
    let out = c.out(&["task", "exec", "--exec-id", "e3", "--user", "1000", "web", "id", "-u"]);
    assert_eq!(stdout(&out).trim(), "1000", "{}", stderr(&out));

    // ps: the container's processes, not the guest's own helpers.
    let ps = ok(&c.out(&["task", "ps", "web"]));
    let pids: Vec<u32> = ps.lines().skip(1).filter_map(|l| l.split_whitespace().next()?.parse().ok()).collect();
    assert!(!pids.is_empty() && pids.iter().all(|p| *p > 1), "{ps}");

    // metrics: a cgroup v2 Metrics read from the guest.
    let metrics = ok(&c.out(&["task", "metrics", "web"]));
    let usage: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("memory.usage ").map(|v| v.trim().parse().unwrap()))
        .unwrap_or_else(|| panic!("no memory.usage:\n{metrics}"));
    assert!(usage > 0, "{metrics}");

    // pause / resume freeze the VM: nothing runs while paused.
    ok(&c.out(&["task", "pause", "web"]));
    assert_eq!(c.status("web"), "PAUSED");
    std::fs::remove_file(data.path().join("started")).unwrap();
    let out = c.out(&["task", "metrics", "web"]);
    assert!(!out.status.success(), "a paused VM is not asked for metrics");
    ok(&c.out(&["task", "resume", "web"]));
    assert_eq!(c.status("web"), "RUNNING");

    // SIGTERM reaches the init's trap; its exit ends the container.
    ok(&c.out(&["task", "kill", "-s", "SIGTERM", "web"]));
    c.wait_status("web", "STOPPED");
    assert_eq!(std::fs::read_to_string(data.path().join("term")).unwrap().trim(), "got TERM");
    c.remove("web");
    c.assert_clean();
}

#[test]
fn bind_mounts_keep_their_read_only_and_read_write_options() {
    let c = Containerd::start();
    let ro = tempfile::tempdir().unwrap();
    let rw = tempfile::tempdir().unwrap();
    std::fs::write(ro.path().join("in.txt"), "from the host\n").unwrap();
    let ro_mount = format!("type=bind,src={},dst=/mnt/ro,options=rbind:ro", ro.path().display());
    let rw_mount = format!("type=bind,src={},dst=/mnt/rw,options=rbind:rw", rw.path().display());
    let script = "cat /mnt/ro/in.txt; echo x > /mnt/ro/new && echo ro-write=ok || echo ro-write=refused; \
                  echo written > /mnt/rw/out.txt && echo rw-write=ok";
    let out = c.out(&[
        "run",
        "--rm",
        "--runtime",
        RUNTIME,
        "--mount",
        &ro_mount,
        "--mount",
        &rw_mount,
        IMAGE,
        "binds",
        "sh",
        "-c",
        script,
    ]);
    let o = stdout(&out);
    assert!(out.status.success(), "{o}\n{}", stderr(&out));
    assert!(o.contains("from the host") && o.contains("ro-write=refused") && o.contains("rw-write=ok"), "{o}");
    assert!(!ro.path().join("new").exists(), "the read-only mount was written");
    assert_eq!(std::fs::read_to_string(rw.path().join("out.txt")).unwrap(), "written\n");
    c.assert_clean();
}

#[test]
fn output_goes_to_file_uris_and_logging_binaries() {
    let c = Containerd::start();
    let logs = tempfile::tempdir().unwrap();
    let script = "echo to-out; echo to-err >&2";
    let file = logs.path().join("file.log");
    let uri = format!("file://{}", file.display());
    let out = c.out(&["run", "--rm", "--runtime", RUNTIME, "--log-uri", &uri, IMAGE, "filelog", "sh", "-c", script]);
    assert!(out.status.success(), "{}", stderr(&out));
    let logged = std::fs::read_to_string(&file).unwrap();
    assert!(logged.contains("to-out") && logged.contains("to-err"), "{logged:?}");

    // containerd's logging binary protocol: stdout on fd 3, stderr on fd 4, fd 5 closed when ready.
    let logger = logs.path().join("logger.sh");
    std::fs::write(&logger, "#!/bin/sh\nexec 5>&-\ncat <&3 > \"$2/stdout\" &\ncat <&4 > \"$2/stderr\" &\nwait\necho \"$CONTAINER_NAMESPACE/$CONTAINER_ID\" > \"$2/who\"\n").unwrap();
    std::fs::set_permissions(&logger, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let uri = format!("binary://{}?dir={}", logger.display(), logs.path().display());
    let out = c.out(&["run", "--rm", "--runtime", RUNTIME, "--log-uri", &uri, IMAGE, "binlog", "sh", "-c", script]);
    assert!(out.status.success(), "{}", stderr(&out));
    let read = |name: &str| std::fs::read_to_string(logs.path().join(name)).unwrap_or_default();
    assert_eq!(read("stdout"), "to-out\n");
    assert_eq!(read("stderr"), "to-err\n");
    assert_eq!(
        read("who").trim(),
        format!("{NAMESPACE}/binlog"),
        "the binary ran to its end with containerd's variables"
    );
    c.assert_clean();
}

#[test]
fn a_terminal_gets_its_size_and_resizes() {
    let c = Containerd::start();
    let script = r#"stty size; while [ "$(stty size)" = "30 100" ]; do sleep 0.1; done; stty size; tty"#;
    let mut cmd = c.ctr(&["run", "--rm", "-t", "--runtime", RUNTIME, IMAGE, "tty", "sh", "-c", script]);
    cmd.stdin(Stdio::null());
    let (mut child, master) = common::spawn_in_pty(cmd, 30, 100);
    let seen = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let reader = {
        let (seen, mut master) = (std::sync::Arc::clone(&seen), master.try_clone().unwrap());
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = std::io::Read::read(&mut master, &mut buf) {
                if n == 0 {
                    break;
                }
                seen.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        })
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !seen.lock().unwrap().contains("30 100") {
        assert!(Instant::now() < deadline, "no initial size: {:?}\n{}", seen.lock().unwrap(), c.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    let ws = nix::pty::Winsize { ws_row: 40, ws_col: 120, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: TIOCSWINSZ reads one Winsize from a valid pointer.
    let set = unsafe { libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(&master), libc::TIOCSWINSZ, &ws) };
    assert_eq!(set, 0);
    let status = child.wait().unwrap();
    drop(master);
    let _ = reader.join();
    let out = seen.lock().unwrap().clone();
    assert!(status.success(), "{out}\n{}", c.log());
    assert!(out.contains("40 120"), "size after the resize:\n{out}");
    assert!(out.contains("/dev/pts/"), "a real terminal:\n{out}");
    c.assert_clean();
}

#[test]
fn events_arrive_in_lifecycle_order() {
    let c = Containerd::start();
    let events = c.events();
    ok(&c.out(&["run", "-d", "--runtime", RUNTIME, IMAGE, "ev", "sh", "-c", "sleep 30"]));
    c.wait_status("ev", "RUNNING");
    ok(&c.out(&["task", "exec", "--exec-id", "x1", "ev", "true"]));
    ok(&c.out(&["task", "pause", "ev"]));
    ok(&c.out(&["task", "resume", "ev"]));
    ok(&c.out(&["task", "kill", "-s", "SIGKILL", "ev"]));
    c.wait_status("ev", "STOPPED");
    c.remove("ev");
    // A process that ends at once is still reported started before it exits.
    ok(&c.out(&["run", "--rm", "--runtime", RUNTIME, IMAGE, "quick", "true"]));
    let expected = [
        "/tasks/create",
        "/tasks/start",
        "/tasks/exec-added",
        "/tasks/exec-started",
        "/tasks/exit",
        "/tasks/paused",
        "/tasks/resumed",
        "/tasks/exit",
        "/tasks/delete",
        "/tasks/create",
        "/tasks/start",
        "/tasks/exit",
        "/tasks/delete",
    ];
    let topics = events.topics(|t| t.len() >= expected.len());
    assert_eq!(topics, expected, "{}", c.log());
    c.assert_clean();
}

#[test]
fn the_guest_oom_killer_is_reported_as_task_oom() {
    let c = Containerd::start();
    let events = c.events();
    // `tail` buffers a line that never ends: the guest's OOM killer ends it (the init).
    let out = c.out(&[
        "run",
        "--rm",
        "--runtime",
        RUNTIME,
        "--annotation",
        "dev.matchlock.memory=256",
        IMAGE,
        "oom",
        "tail",
        "/dev/zero",
    ]);
    assert_eq!(out.status.code(), Some(137), "{}", stderr(&out));
    let topics = events.topics(|t| t.iter().any(|t| t == "/tasks/delete"));
    let oom = topics.iter().position(|t| t == "/tasks/oom").unwrap_or_else(|| panic!("no /tasks/oom: {topics:?}"));
    let exit = topics.iter().position(|t| t == "/tasks/exit").expect("an exit");
    assert!(oom < exit, "the OOM is reported before the exit: {topics:?}");
    c.assert_clean();
}

#[test]
fn kill_9_of_the_shim_or_of_qemu_leaves_a_stopped_task_and_nothing_else() {
    let c = Containerd::start();
    for (name, victim) in [("shimkill", "shim"), ("qemukill", "qemu")] {
        ok(&c.out(&["run", "-d", "--runtime", RUNTIME, IMAGE, name, "sleep", "600"]));
        c.wait_status(name, "RUNNING");
        let pid = match victim {
            "shim" => c.shims()[0],
            _ => {
                let qemu = c.home.pids().into_iter().find(|(_, cmd)| cmd.contains("qemu-system"));
                qemu.unwrap_or_else(|| panic!("no QEMU: {:?}", c.home.processes())).0
            }
        };
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL).unwrap();
        if victim == "shim" {
            // containerd 1.6 runs our `delete` for a dead shim and forgets the task.
            c.wait_status(name, "");
        } else {
            c.wait_status(name, "STOPPED");
            ok(&c.out(&["task", "rm", name]));
        }
        ok(&c.out(&["container", "rm", name]));
        c.assert_clean();
    }
    // A guest that cannot deliver SIGKILL (here: frozen) has its VM killed instead.
    ok(&c.out(&["run", "-d", "--runtime", RUNTIME, IMAGE, "frozen", "sleep", "600"]));
    c.wait_status("frozen", "RUNNING");
    ok(&c.out(&["task", "pause", "frozen"]));
    ok(&c.out(&["task", "kill", "-s", "SIGKILL", "frozen"]));
    c.wait_status("frozen", "STOPPED");
    c.remove("frozen");
    c.assert_clean();
    let gc = ok(&c.home.cmd().arg("gc").output().unwrap());
    assert!(!gc.contains("cleaned"), "gc found something: {gc}");
}

#[test]
fn a_task_outlives_a_kill_9_of_containerd_and_is_still_driven_after_its_restart() {
    let mut c = Containerd::start();
    ok(&c.out(&["run", "-d", "--runtime", RUNTIME, IMAGE, "survivor", "sleep", "600"]));
    c.wait_status("survivor", "RUNNING");
    c.crash_and_restart();
    assert_eq!(c.status("survivor"), "RUNNING", "containerd reconnected to the shim:\n{}", c.log());
    let out = c.out(&["task", "exec", "--exec-id", "after", "survivor", "echo", "still here"]);
    assert_eq!(stdout(&out).trim(), "still here", "{}", stderr(&out));
    ok(&c.out(&["task", "kill", "-s", "SIGKILL", "survivor"]));
    c.wait_status("survivor", "STOPPED");
    c.remove("survivor");
    c.assert_clean();
}

#[test]
fn a_bundle_we_cannot_run_fails_create_with_the_reason() {
    let c = Containerd::start();
    let out = c.out(&[
        "run",
        "--rm",
        "--runtime",
        RUNTIME,
        "--mount",
        "type=tmpfs,src=tmpfs,dst=/cache",
        IMAGE,
        "bad",
        "true",
    ]);
    assert!(!out.status.success());
    let e = stderr(&out);
    assert!(e.contains("not supported by the matchlock runtime") && e.contains("/cache"), "{e}");
    let out =
        c.out(&["run", "--rm", "--runtime", RUNTIME, "--annotation", "dev.matchlock.memroy=1G", IMAGE, "bad2", "true"]);
    assert!(stderr(&out).contains("unknown annotation dev.matchlock.memroy"), "{}", stderr(&out));
    for name in ["bad", "bad2"] {
        let _ = c.out(&["container", "rm", name]);
    }
    c.assert_clean();
}

#[test]
fn secret_and_allow_list_annotations_apply_to_the_container() {
    let net = testnet::testnet();
    let c = Containerd::start_with(&[("MATCHLOCK_UPSTREAM_CA", &net.ca())]);
    let m = testnet::marker("ctd");
    let value = format!("ctd-secret-{m}");
    let resolv = c.dir.path().join("resolv.conf");
    std::fs::write(&resolv, format!("nameserver {}\n", testnet::DNS)).unwrap();
    let resolv_mount = format!("type=bind,src={},dst=/etc/resolv.conf,options=rbind:ro", resolv.display());
    let script = format!(
        r#"echo "env=$KEY"; grep -c 'KEY=SANDBOX_SECRET_' /proc/self/environ; \
wget -qO- "http://api.test/echo/{m}-allowed" --header "Authorization: Bearer $KEY"; echo " allowed-rc=$?"; \
wget -qO- "http://other.test/echo/{m}-refused" --header "Authorization: Bearer $KEY"; echo " refused-rc=$?""#
    );
    let out = c.out(&[
        "run",
        "--rm",
        "--runtime",
        RUNTIME,
        "--env",
        &format!("KEY={value}"),
        "--annotation",
        "dev.matchlock.allow-hosts=api.test",
        "--annotation",
        "dev.matchlock.secrets=KEY@api.test",
        "--mount",
        &resolv_mount,
        IMAGE,
        "secret",
        "sh",
        "-c",
        &script,
    ]);
    let (o, e) = (stdout(&out), stderr(&out));
    assert!(out.status.success(), "{o}\n{e}\n{}", c.log());
    assert!(!o.contains(&value) && !e.contains(&value), "the value reached the guest:\n{o}\n{e}");
    let placeholder = o.lines().find_map(|l| l.strip_prefix("env=")).unwrap();
    assert!(placeholder.starts_with("SANDBOX_SECRET_"), "{o}");
    assert_eq!(o.lines().nth(1), Some("1"), "the process's environment holds the placeholder: {o}");
    assert!(o.contains(" allowed-rc=0") && o.contains(" refused-rc=1"), "{o}\n{e}");
    // What the servers really received: the value at the allowed host, nothing elsewhere.
    let allowed = net.requests_with(&format!("{m}-allowed"));
    assert_eq!(allowed.len(), 1, "{allowed:?}");
    assert!(allowed[0].to_string().contains(&format!("Bearer {value}")), "{allowed:?}");
    assert!(net.requests_with(&format!("{m}-refused")).is_empty(), "the refused host was reached");
    c.assert_clean();
}

#[test]
fn the_specs_network_namespace_carries_the_upstream_traffic() {
    let net = testnet::testnet();
    let c = Containerd::start();
    let m = testnet::marker("netns");
    let fetch = |tag: &str| {
        format!("wget -qO- --header 'Host: api.test' http://{}/echo/{m}-{tag} >/dev/null; echo rc=$?", testnet::API)
    };
    let pod_ns = format!("network:/var/run/netns/{}", testnet::POD_NAMESPACE);
    let out =
        c.out(&["run", "--rm", "--runtime", RUNTIME, "--with-ns", &pod_ns, IMAGE, "inpod", "sh", "-c", &fetch("pod")]);
    assert!(stdout(&out).contains("rc=0"), "{}\n{}", stdout(&out), stderr(&out));
    // Positive control: without the namespace the host's own address is the source.
    let out = c.out(&["run", "--rm", "--runtime", RUNTIME, IMAGE, "onhost", "sh", "-c", &fetch("host")]);
    assert!(stdout(&out).contains("rc=0"), "{}\n{}", stdout(&out), stderr(&out));
    let client = |tag: &str| {
        let seen = net.requests_with(&format!("{m}-{tag}"));
        assert_eq!(seen.len(), 1, "{seen:?}");
        seen[0]["client"].as_str().unwrap().to_owned()
    };
    assert_eq!(client("pod"), testnet::POD_ADDRESS, "egress leaves from the spec's namespace");
    assert_eq!(client("host"), testnet::HOST_SIDE);

    // Ingress: the namespace's address on a port the guest listens on reaches the server.
    let serve = "mkdir -p /www && echo hello-from-the-vm > /www/index.html && httpd -f -p 8080 -h /www";
    ok(&c.out(&["run", "-d", "--runtime", RUNTIME, "--with-ns", &pod_ns, IMAGE, "web", "sh", "-c", serve]));
    c.wait_status("web", "RUNNING");
    let get = |port: u16| {
        testnet::in_namespace(move || {
            let mut s = std::net::TcpStream::connect((testnet::POD_ADDRESS, port))?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            std::io::Write::write_all(&mut s, b"GET / HTTP/1.0\r\n\r\n")?;
            let mut answer = String::new();
            std::io::Read::read_to_string(&mut s, &mut answer)?;
            Ok::<_, std::io::Error>(answer)
        })
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let answer = loop {
        match get(8080) {
            Ok(a) if a.contains("hello-from-the-vm") => break a,
            other => assert!(Instant::now() < deadline, "no answer on the pod address: {other:?}\n{}", c.log()),
        }
        std::thread::sleep(Duration::from_millis(300));
    };
    assert!(answer.starts_with("HTTP/1.1 200") && answer.contains("\r\n\r\nhello-from-the-vm"), "{answer}");
    assert!(get(8081).is_err(), "a port the guest does not listen on is closed");
    ok(&c.out(&["task", "kill", "-s", "SIGKILL", "web"]));
    c.wait_status("web", "STOPPED");
    c.remove("web");
    assert!(get(8080).is_err(), "the listener goes with the container");
    c.assert_clean();
}

/// The annotations containerd's CRI gives a pod's sandbox container, or one of its containers.
fn pod_annotations(pod: &str, sandbox: bool) -> Vec<String> {
    let kind = if sandbox { "sandbox" } else { "container" };
    vec![
        "--annotation".into(),
        format!("io.kubernetes.cri.container-type={kind}"),
        "--annotation".into(),
        format!("io.kubernetes.cri.sandbox-id={pod}"),
    ]
}

#[test]
fn a_pods_containers_share_one_vm_each_with_its_own_root() {
    let c = Containerd::start();
    let layered = common::fixture("layered.tar");
    ok(&c.ctr(&["image", "import"]).arg(&layered).output().unwrap());
    let run = |name: &str, image: &str, sandbox: bool, detach: bool, cmd: &[&str]| {
        let mut args: Vec<String> = vec!["run".into(), "--runtime".into(), RUNTIME.into()];
        args.push(if detach { "-d" } else { "--rm" }.into());
        args.extend(pod_annotations("pod1", sandbox));
        args.extend([image.to_owned(), name.to_owned()]);
        args.extend(cmd.iter().map(|a| (*a).to_owned()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        c.out(&args)
    };
    ok(&run("pod1", IMAGE, true, true, &["sleep", "3600"]));
    c.wait_status("pod1", "RUNNING");
    let serve = "mkdir -p /www && echo from-web > /www/index.html && httpd -f -p 8080 -h /www";
    ok(&run("web", IMAGE, false, true, &["sh", "-c", serve]));
    c.wait_status("web", "RUNNING");
    let qemus = || c.home.pids().into_iter().filter(|(_, cmd)| cmd.contains("qemu-system")).count();
    assert_eq!(qemus(), 1, "the pod's containers run in the pod's one VM");

    // Another image, another root: layered has /data, busybox has not; localhost is shared.
    let probe = "for i in 1 2 3 4 5 6 7 8 9 10; do wget -qO- http://127.0.0.1:8080/ && break; sleep 0.5; done; \
                 test -d /data && echo has-data; test -e /www && echo sees-web-root; hostname; \
                 test -e /run/matchlock/containers && echo sees-other-roots; \
                 awk '$5 == \"/proc/sys\" {print \"procsys=\" $6} $5 == \"/proc/timer_list\" {print \"timer-list-masked\"}' /proc/self/mountinfo";
    let out = run("client", "docker.io/library/layered:latest", false, false, &["sh", "-c", probe]);
    let o = stdout(&out);
    assert!(out.status.success(), "{o}\n{}\n{}", stderr(&out), c.log());
    assert!(o.contains("from-web"), "localhost reaches the pod's other container: {o}");
    assert!(o.contains("has-data") && !o.contains("sees-web-root"), "each container has its own root: {o}");
    assert!(!o.contains("sees-other-roots"), "the VM's root is detached: {o}");
    assert!(o.contains("procsys=ro,") && o.contains("timer-list-masked"), "the kernel's files stay protected: {o}");
    assert_eq!(qemus(), 1);
    let out = c.out(&[
        "task",
        "exec",
        "--exec-id",
        "x",
        "web",
        "sh",
        "-c",
        "test -d /data || echo no-data; cat /www/index.html",
    ]);
    assert_eq!(stdout(&out), "no-data\nfrom-web\n", "{}", stderr(&out));

    // The pod's sandbox ending ends every container of the pod, and the VM.
    ok(&c.out(&["task", "kill", "-s", "SIGKILL", "pod1"]));
    c.wait_status("pod1", "STOPPED");
    c.wait_status("web", "STOPPED");
    assert_eq!(qemus(), 0, "the VM went with the pod");
    for name in ["web", "pod1"] {
        c.remove(name);
    }
    c.assert_clean();

    // kill -9 of the pod's QEMU: every container of the pod is reported exited.
    let pod2 = |name: &str, sandbox: bool, cmd: &[&str]| {
        let mut args: Vec<String> = vec!["run".into(), "-d".into(), "--runtime".into(), RUNTIME.into()];
        args.extend(pod_annotations("pod2", sandbox));
        args.extend([IMAGE.to_owned(), name.to_owned()]);
        args.extend(cmd.iter().map(|a| (*a).to_owned()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        ok(&c.out(&args));
        c.wait_status(name, "RUNNING");
    };
    pod2("pod2", true, &["sleep", "3600"]);
    pod2("worker", false, &["sleep", "3600"]);
    let qemu = c.home.pids().into_iter().find(|(_, cmd)| cmd.contains("qemu-system")).expect("the pod's QEMU").0;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(qemu), nix::sys::signal::SIGKILL).unwrap();
    c.wait_status("pod2", "STOPPED");
    c.wait_status("worker", "STOPPED");
    for name in ["worker", "pod2"] {
        c.remove(name);
    }
    c.assert_clean();

    // kill -9 of the pod's shim: containerd's `delete` of each container cleans up.
    let pod3 = |name: &str, sandbox: bool| {
        let mut args: Vec<String> = vec!["run".into(), "-d".into(), "--runtime".into(), RUNTIME.into()];
        args.extend(pod_annotations("pod3", sandbox));
        args.extend([IMAGE.to_owned(), name.to_owned(), "sleep".to_owned(), "3600".to_owned()]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        ok(&c.out(&args));
        c.wait_status(name, "RUNNING");
    };
    pod3("pod3", true);
    pod3("helper", false);
    assert_eq!(c.shims().len(), 1, "one shim for the pod");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(c.shims()[0]), nix::sys::signal::SIGKILL).unwrap();
    c.wait_status("pod3", "");
    c.wait_status("helper", "");
    for name in ["helper", "pod3"] {
        ok(&c.out(&["container", "rm", name]));
    }
    c.assert_clean();
}

/// The CRI client (`scripts/install-cri-client.sh`) playing kubelet (`tests/fixtures/cri_pod.py`);
/// the pod's volumes are under `<containerd dir>/volumes`.
fn cri(c: &Containerd, phase: &str, egress: &str) -> serde_json::Value {
    let site = Command::new("bash").arg(common::repo_root().join("scripts/install-cri-client.sh")).output().unwrap();
    let site = ok(&site).trim().to_owned();
    let logs = c.dir.path().join("pod-logs");
    std::fs::create_dir_all(&logs).unwrap();
    let out = Command::new("python3")
        .arg(common::repo_root().join("tests/fixtures/cri_pod.py"))
        .arg(c.dir.path().join("containerd.sock"))
        .arg(&logs)
        .arg(egress)
        .arg(phase)
        .arg(c.dir.path().join("volumes"))
        .env("PYTHONPATH", site)
        .output()
        .unwrap();
    assert!(out.status.success(), "cri_pod.py {phase}: {}\n{}", stderr(&out), c.log());
    serde_json::from_str(&stdout(&out)).unwrap()
}

fn netns_names() -> Vec<String> {
    std::fs::read_dir("/var/run/netns")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

#[test]
fn a_kubernetes_pod_runs_in_one_vm_through_containerds_cri() {
    let namespaces_before = netns_names();
    let c = Containerd::start_cri();
    // What the pod reaches on the node: a server that notes who connected and what it sent.
    // Port 80: HTTP is intercepted (and secrets substituted) on the HTTP ports.
    let server = std::net::TcpListener::bind("0.0.0.0:80").expect("port 80 free for the node's test server");
    let port = server.local_addr().unwrap().port();
    // (peer address, request head) of each connection.
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<(String, String)>::new()));
    {
        let seen = std::sync::Arc::clone(&seen);
        std::thread::spawn(move || {
            for conn in server.incoming().flatten() {
                let peer = conn.peer_addr().unwrap().ip().to_string();
                let mut conn = conn;
                let mut buf = [0u8; 4096];
                let n = std::io::Read::read(&mut conn, &mut buf).unwrap_or(0);
                seen.lock().unwrap().push((peer, String::from_utf8_lossy(&buf[..n]).into_owned()));
                let _ = std::io::Write::write_all(&mut conn, b"HTTP/1.0 200 OK\r\n\r\nhello-from-the-node\n");
            }
        });
    }
    assert_eq!(port, 80);
    // The pod's volumes: an emptyDir both containers share, and a read-only service-account
    // token laid out as kubelet projects it (a timestamped directory, `..data` and the names
    // as symbolic links).
    let volumes = c.dir.path().join("volumes");
    std::fs::create_dir_all(volumes.join("shared")).unwrap();
    let projected = volumes.join("token/..2026_12_07_20_00_00.000000001");
    std::fs::create_dir_all(&projected).unwrap();
    std::fs::write(projected.join("token"), "sa-token-7f3a\n").unwrap();
    std::fs::write(projected.join("namespace"), "default").unwrap();
    std::os::unix::fs::symlink("..2026_12_07_20_00_00.000000001", volumes.join("token/..data")).unwrap();
    for name in ["token", "namespace"] {
        std::os::unix::fs::symlink(format!("..data/{name}"), volumes.join("token").join(name)).unwrap();
    }
    let egress = format!("http://{POD_SUBNET}.1/");
    let up = cri(&c, "up", &egress);
    let pod_ip = up["pod_ip"].as_str().unwrap().to_owned();
    assert!(pod_ip.starts_with(POD_SUBNET), "{up}");
    let qemus = || c.home.pids().into_iter().filter(|(_, cmd)| cmd.contains("qemu-system")).count();
    assert_eq!(qemus(), 1, "the pod is one VM: {up}");

    // Egress leaves with the pod's IP; localhost and separate roots inside the pod.
    let log = up["client_log"].as_str().unwrap();
    assert!(log.contains("hello-from-web"), "localhost reaches the other container: {up}");
    assert!(log.contains("hello-from-the-node"), "egress: {up}");
    assert!(log.contains("has-data") && log.contains("no-www"), "each container has its own root: {up}");
    assert!(log.contains(" stdout F "), "the log is in CRI's format: {log}");
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert!(seen.iter().all(|(peer, _)| *peer == pod_ip), "the node saw the pod's IP: {seen:?}");
    // The pod's secret: its value came from the client's env, reached the node only on the way
    // out; the container saw its placeholder.
    let with_key = &seen.iter().find(|(_, head)| head.contains("with-key")).expect("the request with the key").1;
    assert!(with_key.contains("Bearer pod-secret-value-5c1e"), "the node received the value: {with_key}");
    // The pod's interception rules: the header reached the node, /admin never did.
    assert!(with_key.to_ascii_lowercase().contains("x-pod-rule: agent"), "{with_key}");
    assert!(log.contains("admin-refused"), "{log}");
    assert!(!seen.iter().any(|(_, head)| head.contains("/admin")), "a blocked request reached the node: {seen:?}");
    assert!(log.contains("key=SANDBOX_SECRET_") && !log.contains("pod-secret-value-5c1e"), "{log}");
    // ExecSync, with its timeout, and stats.
    assert_eq!(up["exec"], serde_json::json!({"exit_code": 3, "stdout": "out\n", "stderr": "err\n"}), "{up}");
    assert_eq!(up["exec_timeout"], "DEADLINE_EXCEEDED", "{up}");
    // Streaming exec (kubectl exec -i, -it) through containerd's streaming server.
    let stream = &up["stream"];
    assert_eq!(
        (&stream["stdout"], &stream["stderr"]),
        (&serde_json::json!("got=typed-in\n"), &serde_json::json!("to-err\n")),
        "{up}"
    );
    assert_eq!(stream["status"]["details"]["causes"][0]["message"], "5", "the exit code reached the client: {up}");
    let tty = &up["stream_tty"];
    assert!(tty["stdout"].as_str().unwrap().contains("/dev/pts/"), "a terminal: {up}");
    assert_eq!(tty["status"]["status"], "Success", "{up}");
    assert!(up["memory_working_set"].as_u64().unwrap() > 0, "{up}");
    assert_eq!(up["listed_stats"], serde_json::json!(["client", "web"]), "ListContainerStats: {up}");
    // Volumes: the emptyDir carries files both ways and to the host; the token is readable
    // (through its links, also by an exec) and its write refused, the host's file unchanged.
    assert!(log.contains("shared=web-wrote"), "the client read what web wrote: {log}");
    let from_client = std::fs::read_to_string(volumes.join("shared/from-client")).unwrap_or_default();
    assert_eq!(from_client, "client-wrote\n", "the host's directory received the client's file");
    assert!(log.contains("token=sa-token-7f3a"), "the token through kubelet's links: {log}");
    assert!(log.contains("token-write-refused"), "a read-only volume: {log}");
    assert_eq!(std::fs::read_to_string(projected.join("token")).unwrap(), "sa-token-7f3a\n");
    assert_eq!(up["exec_volume"], "default", "an exec sees its container's volumes: {up}");
    assert_eq!(up["update"], "UNIMPLEMENTED", "UpdateContainerResources is refused clearly: {up}");
    assert_eq!(
        (&up["oneshot_0"], &up["oneshot_1"]),
        (&serde_json::json!(4), &serde_json::json!(4)),
        "a restart in the pod: {up}"
    );
    for (attempt, file) in [(0, "oneshot.log"), (1, "oneshot-1.log")] {
        let log = std::fs::read_to_string(c.dir.path().join("pod-logs").join(file)).unwrap_or_default();
        assert!(log.contains(&format!("run-{attempt}")), "{file}: {log}");
    }
    // Ingress: the pod IP on the web container's port.
    let mut conn = std::net::TcpStream::connect((pod_ip.as_str(), 8080)).expect("the pod IP answers on 8080");
    std::io::Write::write_all(&mut conn, b"GET / HTTP/1.0\r\n\r\n").unwrap();
    let mut answer = String::new();
    std::io::Read::read_to_string(&mut conn, &mut answer).unwrap();
    assert!(answer.contains("hello-from-web"), "{answer}");

    let down = cri(&c, "down", &egress);
    assert_eq!(down["web"], 0, "StopContainer's SIGTERM reached the trap within the grace period: {down}");
    assert_eq!(down["pods_left"], 0, "{down}");
    assert_eq!(qemus(), 0);
    c.assert_clean();
    assert_eq!(netns_names(), namespaces_before, "the pod's network namespace is gone");
}
