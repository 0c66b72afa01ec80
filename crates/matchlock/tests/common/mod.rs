//! Shared harness for tests that run the real `matchlock` binary against real VMs.
//!
//! All tests of a process share one private cache directory (image store, boot disk,
//! accelerator probe), with the fixture images imported once; each test gets its own
//! HOME, so its VM state is its own and "nothing left behind" can be checked exactly.
//! The kernel and guest-init come from the project's setup
//! (`scripts/setup.sh`); a missing one is a test failure, never a skip.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Output, Stdio};

use serde_json::{json, Value};
use std::sync::OnceLock;

pub(crate) struct Shared {
    _cache: tempfile::TempDir,
    pub fixtures: PathBuf,
    tools: Tools,
}

/// What every `matchlock` invocation of the tests points at.
#[derive(Clone)]
struct Tools {
    cache: PathBuf,
    kernel: PathBuf,
    guest_init: PathBuf,
}

pub(crate) fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().expect("repo root")
}

fn real_cache() -> PathBuf {
    match std::env::var_os("XDG_CACHE_HOME") {
        Some(d) if !d.is_empty() => PathBuf::from(d).join("matchlock"),
        _ => PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/matchlock"),
    }
}

fn find_kernel() -> PathBuf {
    let out = Command::new(env!("CARGO_BIN_EXE_matchlock")).args(["kernel", "path"]).output().expect("run matchlock");
    assert!(
        out.status.success(),
        "no guest kernel: run scripts/setup.sh first\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

fn build_guest_init() -> PathBuf {
    if let Some(p) = std::env::var_os("MATCHLOCK_GUEST_INIT") {
        return PathBuf::from(p);
    }
    let out = Command::new("bash")
        .arg(repo_root().join("scripts/build-guest.sh"))
        .stderr(Stdio::inherit())
        .output()
        .expect("run build-guest.sh");
    assert!(out.status.success(), "building guest-init failed");
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

pub(crate) fn shared() -> &'static Shared {
    static SHARED: OnceLock<Shared> = OnceLock::new();
    SHARED.get_or_init(|| {
        let kernel = find_kernel();
        let guest_init = build_guest_init();
        // A static is never dropped, so this directory outlives the test process: it is
        // named by the process and removed by a later one once that process is gone.
        remove_stale_caches();
        let cache = tempfile::Builder::new()
            .prefix(&format!("{SHARED_CACHE_PREFIX}{}-", std::process::id()))
            .tempdir()
            .expect("temp cache");
        let fixtures = cache.path().join("fixtures");
        let status = Command::new("python3")
            .arg(repo_root().join("tests/fixtures/make_images.py"))
            .arg(&fixtures)
            .status()
            .expect("run make_images.py");
        assert!(status.success(), "building fixture images failed");
        let tools = Tools { cache: cache.path().to_owned(), kernel, guest_init };
        let setup = Home::new(tools.clone());
        for (tag, file) in [("busybox", "busybox.tar"), ("layered", "layered.tar"), ("nonroot", "nonroot.tar")] {
            let out = setup.import(tag, &fixtures.join(file));
            assert!(out.status.success(), "import {tag}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Shared { _cache: cache, fixtures, tools }
    })
}

/// Name prefix of a test process's shared cache, followed by its PID.
const SHARED_CACHE_PREFIX: &str = "matchlock-test-cache-shared-";

/// Name prefix of a test process's own HOME ([`process_home`]), followed by its PID.
const PROCESS_HOME_PREFIX: &str = "matchlock-test-home-process-";

/// Removes the shared caches of test processes that have ended.
fn remove_stale_caches() {
    remove_stale(SHARED_CACHE_PREFIX);
}

/// Removes the temporary directories named `<prefix><pid>-…` of processes that have ended.
fn remove_stale(prefix: &str) {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix(prefix).and_then(|rest| rest.split('-').next()) else {
            continue;
        };
        if !Path::new("/proc").join(pid).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// A HOME of one test.
pub(crate) struct Home {
    pub dir: tempfile::TempDir,
    tools: Tools,
    /// An image store of its own, when the test needs one.
    _own_cache: Option<tempfile::TempDir>,
}

/// The Debian test image's tarball (OCI layout, built by `scripts/build-test-image.sh`).
#[allow(dead_code)]
pub(crate) fn debian_tarball() -> PathBuf {
    real_cache().join("fixtures/debian-test.tar")
}

/// The Debian test image (curl, git, python3; built by `scripts/build-test-image.sh`),
/// imported into the shared store once per test process.
#[allow(dead_code)]
pub(crate) fn debian_image() -> &'static str {
    static IMPORTED: OnceLock<()> = OnceLock::new();
    IMPORTED.get_or_init(|| {
        let tarball = debian_tarball();
        assert!(tarball.is_file(), "{} missing: run scripts/setup.sh (it builds the test image)", tarball.display());
        let out = home().import("debian-test", &tarball);
        assert!(out.status.success(), "import: {}", String::from_utf8_lossy(&out.stderr));
    });
    "debian-test"
}

/// A fresh HOME sharing the process-wide cache and images.
pub(crate) fn home() -> Home {
    Home::new(shared().tools.clone())
}

/// A HOME for the whole test process (whose environment points at it): named by the process
/// and removed by a later one once this one has ended (a static is never dropped).
pub(crate) fn process_home() -> Home {
    remove_stale(PROCESS_HOME_PREFIX);
    let dir = tempfile::Builder::new()
        .prefix(&format!("{PROCESS_HOME_PREFIX}{}-", std::process::id()))
        .tempdir()
        .expect("temp home");
    Home { dir, tools: shared().tools.clone(), _own_cache: None }
}

/// A fresh HOME with an empty cache (image store) of its own.
pub(crate) fn isolated_home() -> Home {
    let mut tools = shared().tools.clone();
    let cache = tempfile::Builder::new().prefix("matchlock-test-cache-").tempdir().expect("temp cache");
    tools.cache = cache.path().to_owned();
    let mut home = Home::new(tools);
    home._own_cache = Some(cache);
    home
}

/// The fixture image tarballs.
pub(crate) fn fixture(name: &str) -> PathBuf {
    shared().fixtures.join(name)
}

impl Home {
    fn new(tools: Tools) -> Self {
        let dir = tempfile::Builder::new().prefix("matchlock-test-home-").tempdir().expect("temp home");
        Self { dir, tools, _own_cache: None }
    }

    /// A `matchlock` command with this HOME and the shared cache and tools.
    pub(crate) fn cmd(&self) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_matchlock"));
        self.env_into(&mut cmd);
        cmd
    }

    /// Gives `cmd` this HOME, the shared cache and tools, as every `matchlock` command gets
    /// (for programs that run matchlock code themselves, e.g. containerd and its shims).
    pub(crate) fn env_into<'c>(&self, cmd: &'c mut Command) -> &'c mut Command {
        cmd.envs(self.env()).stdin(Stdio::null())
    }

    /// The environment of [`Home::env_into`].
    pub(crate) fn env(&self) -> Vec<(&'static str, std::ffi::OsString)> {
        vec![
            ("HOME", self.dir.path().into()),
            ("XDG_CACHE_HOME", self.tools.cache.clone().into()),
            ("MATCHLOCK_KERNEL", self.tools.kernel.clone().into()),
            ("MATCHLOCK_GUEST_INIT", self.tools.guest_init.clone().into()),
            // Tests never reach the internet: Docker Hub names go to a closed local port
            // unless a test points them at its own registry.
            ("MATCHLOCK_REGISTRY_MIRROR", "127.0.0.1:9".into()),
            ("DOCKER_CONFIG", self.dir.path().join(".docker").into()),
        ]
    }

    pub(crate) fn import(&self, tag: &str, tarball: &Path) -> Output {
        let input = std::fs::File::open(tarball).expect("tarball");
        self.cmd().args(["image", "import", tag]).stdin(input).output().expect("run")
    }

    /// `matchlock run <args>`, asserting that it leaves nothing behind.
    pub(crate) fn run(&self, args: &[&str]) -> Output {
        let out = self.cmd().arg("run").args(args).output().expect("run matchlock");
        self.assert_no_leftovers();
        out
    }

    /// The image store's blob directory.
    pub(crate) fn blobs_dir(&self) -> PathBuf {
        self.cache_dir().join("images/blobs")
    }

    /// This HOME's `~/.cache/matchlock`.
    pub(crate) fn cache_dir(&self) -> PathBuf {
        self.tools.cache.join("matchlock")
    }

    pub(crate) fn vms_dir(&self) -> PathBuf {
        self.dir.path().join(".matchlock/vms")
    }

    /// (pid, command line) of processes whose command line mentions this HOME
    /// (QEMU).
    pub(crate) fn pids(&self) -> Vec<(i32, String)> {
        processes_mentioning(&self.dir.path().to_string_lossy())
    }

    /// Command lines of [`Self::pids`].
    pub(crate) fn processes(&self) -> Vec<String> {
        self.pids().into_iter().map(|(_, c)| c).collect()
    }

    /// No VM directory and no helper process of this HOME remain.
    #[track_caller]
    pub(crate) fn assert_no_leftovers(&self) {
        let dirs: Vec<_> =
            std::fs::read_dir(self.vms_dir()).into_iter().flatten().flatten().map(|e| e.path()).collect();
        assert!(dirs.is_empty(), "VM directories left behind: {dirs:?}");
        let procs = self.processes();
        assert!(procs.is_empty(), "processes left behind: {procs:?}");
    }
}

impl Drop for Home {
    /// Detached sandboxes outlive their `run`: stop whatever a failed test left.
    fn drop(&mut self) {
        let _ = self.cmd().args(["kill", "--all"]).output();
        let _ = self.cmd().args(["gc", "--force-running"]).output();
    }
}

impl Home {
    /// `matchlock run -d <args>`: returns the id of the detached sandbox.
    #[track_caller]
    pub(crate) fn detach(&self, args: &[&str]) -> String {
        let out = self.cmd().args(["run", "-d"]).args(args).output().expect("run -d");
        let id = ok(&out).trim().to_owned();
        assert!(id.starts_with("vm-") && !id.contains('\n'), "run -d printed {id:?}");
        id
    }

    /// Starts `matchlock <args>` with stdout and stderr piped.
    pub(crate) fn spawn(&self, args: &[&str]) -> Child {
        self.cmd().args(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn matchlock")
    }

    /// Writes this HOME's Docker config with `user:password` for `registry`.
    pub(crate) fn docker_login(&self, registry: &str, user_pass: &str) {
        let docker = self.dir.path().join(".docker");
        std::fs::create_dir_all(&docker).unwrap();
        let mut encode =
            Command::new("base64").arg("-w0").stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
        encode.stdin.take().unwrap().write_all(user_pass.as_bytes()).unwrap();
        let encoded = stdout(&encode.wait_with_output().unwrap());
        std::fs::write(docker.join("config.json"), format!(r#"{{"auths":{{"{registry}":{{"auth":"{encoded}"}}}}}}"#))
            .unwrap();
    }

    /// `matchlock <args>`.
    pub(crate) fn ml(&self, args: &[&str]) -> Output {
        self.cmd().args(args).output().expect("run matchlock")
    }
}

/// (pid, command line) of the processes whose command line contains `marker`.
pub(crate) fn processes_mentioning(marker: &str) -> Vec<(i32, String)> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|p| {
            let pid = p.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(p.path().join("cmdline")).ok()?;
            Some((pid, String::from_utf8_lossy(&cmdline).replace('\0', " ")))
        })
        .filter(|(_, c)| c.contains(marker))
        .collect()
}

/// Starts `cmd` as a session leader with a new pseudo-terminal of `rows`x`cols` as its
/// controlling terminal and stdio; returns it and the terminal's master side.
pub(crate) fn spawn_in_pty(cmd: Command, rows: u16, cols: u16) -> (Child, std::fs::File) {
    spawn_in_pty_reading(cmd, rows, cols, None)
}

/// [`spawn_in_pty`], with stdin from `input` when given (stdout and stderr stay the terminal).
pub(crate) fn spawn_in_pty_reading(
    mut cmd: Command,
    rows: u16,
    cols: u16,
    input: Option<std::fs::File>,
) -> (Child, std::fs::File) {
    use std::os::unix::process::CommandExt;
    let ws = nix::pty::Winsize { ws_row: rows, ws_col: cols, ws_xpixel: 0, ws_ypixel: 0 };
    let pty = nix::pty::openpty(Some(&ws), None).expect("openpty");
    let slave = std::fs::File::from(pty.slave);
    cmd.stdin(match input {
        Some(input) => input,
        None => slave.try_clone().unwrap(),
    })
    .stdout(slave.try_clone().unwrap())
    .stderr(slave);
    // SAFETY: setsid and TIOCSCTTY are async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid()?;
            if libc::ioctl(2, libc::TIOCSCTTY, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().expect("spawn in pty");
    drop(cmd);
    (child, std::fs::File::from(pty.master))
}

/// Reads the terminal until `marker` appears (or the terminal closes).
pub(crate) fn read_until(master: &std::fs::File, marker: &str) -> std::thread::JoinHandle<String> {
    use std::io::Read;
    let mut master = master.try_clone().unwrap();
    let marker = marker.to_owned();
    std::thread::spawn(move || {
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = master.read(&mut buf) {
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
            if String::from_utf8_lossy(&out).contains(&marker) {
                break;
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    })
}

pub(crate) fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub(crate) fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Asserts success and returns stdout.
#[track_caller]
pub(crate) fn ok(out: &Output) -> String {
    assert!(out.status.success(), "exit {:?}\nstdout: {}\nstderr: {}", out.status.code(), stdout(out), stderr(out));
    stdout(out)
}

/// A real OCI registry (Debian's docker-registry) on a loopback port, optionally with
/// htpasswd authentication. Killed when dropped.
pub(crate) struct Registry {
    child: Child,
    /// `127.0.0.1:<port>`.
    pub addr: String,
    /// Its storage (for tampering with blobs).
    pub root: tempfile::TempDir,
}

impl Registry {
    pub(crate) fn start(credentials: Option<(&str, &str)>) -> Self {
        let root = tempfile::Builder::new().prefix("matchlock-test-registry-").tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let addr = format!("127.0.0.1:{port}");
        let mut config = format!(
            "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\n\
             http:\n  addr: {addr}\n",
            root.path().join("data").display()
        );
        if let Some((user, password)) = credentials {
            let out = Command::new("htpasswd").args(["-Bbn", user, password]).output().expect("htpasswd");
            assert!(out.status.success());
            std::fs::write(root.path().join("htpasswd"), out.stdout).unwrap();
            config.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: matchlock-test\n    path: {}\n",
                root.path().join("htpasswd").display()
            ));
        }
        std::fs::write(root.path().join("config.yml"), config).unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(root.path().join("config.yml"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(root.path().join("registry.log")).unwrap())
            .spawn()
            .expect("docker-registry: run scripts/setup.sh");
        let registry = Self { child, addr, root };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::net::TcpStream::connect(&registry.addr).is_err() {
            assert!(std::time::Instant::now() < deadline, "registry did not start");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        registry
    }

    /// Pushes an image (`oci-archive:<path>` or `docker-archive:<path>`) to `repo:tag`.
    pub(crate) fn push(&self, source: &str, target: &str, credentials: Option<&str>) {
        let mut cmd = Command::new("skopeo");
        cmd.args(["copy", "--quiet", "--all", "--dest-tls-verify=false"]);
        if let Some(c) = credentials {
            cmd.args(["--dest-creds", c]);
        }
        let out = cmd.arg(source).arg(format!("docker://{}/{target}", self.addr)).output().expect("skopeo");
        assert!(out.status.success(), "skopeo copy {source}: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// Path of a blob in the registry's storage.
    pub(crate) fn blob_path(&self, digest: &str) -> PathBuf {
        let hex = digest.trim_start_matches("sha256:");
        self.root.path().join(format!("data/docker/registry/v2/blobs/sha256/{}/{hex}/data", &hex[..2]))
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends `signal` to a child process.
pub(crate) fn signal(child: &Child, signal: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), signal).expect("kill");
}

/// `python3 <script>` with this HOME's environment, the PyPI Python SDK on `PYTHONPATH`
/// (installed by scripts/install-python-sdk.sh) and `MATCHLOCK_BIN` set to this build.
#[allow(dead_code)]
pub(crate) fn python_sdk_command(h: &Command, script: &str) -> Command {
    let sdk = Command::new("bash").arg(repo_root().join("scripts/install-python-sdk.sh")).output().unwrap();
    assert!(sdk.status.success(), "{}", String::from_utf8_lossy(&sdk.stderr));
    let mut python = Command::new("python3");
    for (key, value) in h.get_envs() {
        if let Some(value) = value {
            python.env(key, value);
        }
    }
    python
        .arg(repo_root().join(script))
        .env("PYTHONPATH", String::from_utf8_lossy(&sdk.stdout).trim())
        .env("MATCHLOCK_BIN", env!("CARGO_BIN_EXE_matchlock"))
        .env("MATCHLOCK_TEST_BUSYBOX", "busybox")
        .stdin(Stdio::null());
    python
}

#[allow(dead_code)]
/// A `matchlock rpc` process.
pub(crate) struct Rpc {
    pub child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

#[allow(dead_code)]
impl Rpc {
    /// Starts `<cmd> rpc` (a `matchlock` command with its environment).
    pub(crate) fn start(mut cmd: Command) -> Self {
        let mut child = cmd
            .arg("rpc")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn rpc");
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        Self { child, stdin, stdout }
    }

    pub(crate) fn send_raw(&mut self, bytes: &[u8]) {
        self.stdin.as_mut().unwrap().write_all(bytes).unwrap();
        self.stdin.as_mut().unwrap().flush().unwrap();
    }

    pub(crate) fn send(&mut self, message: &Value) {
        let mut line = message.to_string().into_bytes();
        line.push(b'\n');
        self.send_raw(&line);
    }

    pub(crate) fn recv(&mut self) -> Value {
        let mut line = String::new();
        assert!(self.stdout.read_line(&mut line).unwrap() > 0, "rpc closed its output");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad output line {line:?}: {e}"))
    }

    /// Sends a request and returns its response (notifications meanwhile are skipped).
    pub(crate) fn call(&mut self, id: u64, method: &str, params: &Value) -> Value {
        self.call_collecting(id, method, params).0
    }

    /// Sends a request; returns its response and the notifications that came before it.
    pub(crate) fn call_collecting(&mut self, id: u64, method: &str, params: &Value) -> (Value, Vec<Value>) {
        self.send(&json!({"jsonrpc": "2.0", "method": method, "params": params, "id": id}));
        let mut notifications = Vec::new();
        loop {
            let m = self.recv();
            if m.get("id").and_then(Value::as_u64) == Some(id) {
                return (m, notifications);
            }
            notifications.push(m);
        }
    }

    pub(crate) fn finish(mut self) -> std::process::ExitStatus {
        drop(self.stdin.take());
        self.child.wait().unwrap()
    }
}
