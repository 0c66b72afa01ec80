//! Rust SDK for matchlock: create a sandbox from an OCI image, run commands in it, move
//! files, forward ports and watch its events. It drives `matchlock rpc` as a child process
//! (newline-delimited JSON-RPC on stdio, the same protocol the Python SDK speaks).
//!
//! ```no_run
//! # async fn demo() -> Result<(), matchlock_sdk::Error> {
//! use matchlock_sdk::{Client, CreateOptions};
//! let client = Client::start().await?;
//! client.launch(CreateOptions::new("alpine:latest").allow_host("api.openai.com")).await?;
//! let out = client.exec("echo hello").await?;
//! assert_eq!(out.stdout, b"hello\n");
//! client.close().await?;
//! # Ok(()) }
//! ```
//!
//! Every call is cancellable by dropping its future: the SDK then sends `cancel` for it,
//! and a running command is stopped in the guest. A client dropped without
//! [`Client::close`] closes the server's stdin, and the server stops and removes the sandbox.
#![forbid(unsafe_code)]

mod options;

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
pub use matchlock_api::config::{
    BodyReplacement, HookRule, NetworkLimits, RateLimit, RuleAction, RulePhase, VfsAction, VfsInterception, VfsRule,
};
pub use matchlock_api::rpc::{Binding, FileEvent, FileInfo, NetworkEvent};
pub use matchlock_api::stats::{Stats, Usage};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, oneshot};

pub use options::{CreateOptions, ExecOptions};

/// Errors of the SDK.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `matchlock rpc` could not be started.
    #[error("cannot start {binary}")]
    Spawn {
        /// The binary.
        binary: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The server answered with an error.
    #[error("{message} (JSON-RPC error {code})")]
    Rpc {
        /// The JSON-RPC error code ([`codes`]).
        code: i64,
        /// The server's message.
        message: String,
    },
    /// The `matchlock rpc` process went away.
    #[error("the matchlock rpc process closed")]
    Closed,
    /// The server sent something this SDK does not understand.
    #[error("invalid response: {0}")]
    InvalidResponse(String),
    /// Local I/O failed (stdin/stdout of a command, a CLI call).
    #[error("{context}")]
    Io {
        /// What was being done.
        context: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A `matchlock` CLI command failed.
    #[error("matchlock {command} failed: {stderr}")]
    Command {
        /// The subcommand.
        command: String,
        /// Its error output.
        stderr: String,
    },
}

/// JSON-RPC error codes the server uses.
pub mod codes {
    pub use matchlock_api::rpc::code::*;
}

impl Error {
    /// The JSON-RPC error code, for errors the server sent.
    pub fn code(&self) -> Option<i64> {
        match self {
            Self::Rpc { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// Output of [`Client::exec`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    /// Exit code (128 + N when killed by signal N).
    pub exit_code: i32,
    /// Standard output.
    pub stdout: Vec<u8>,
    /// Standard error.
    pub stderr: Vec<u8>,
    /// Wall time in the sandbox.
    pub duration: Duration,
}

/// How a streamed command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitStatus {
    /// Exit code.
    pub exit_code: i32,
    /// Wall time in the sandbox.
    pub duration: Duration,
}

/// Something the sandbox did (the `event` notification).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// An intercepted HTTP request.
    Network(NetworkEvent),
    /// A workspace file operation (with `emit_events` in the VFS interception config).
    File(FileEvent),
    /// A record of the egress audit: an HTTP request, TCP flow, UDP exchange or DNS question
    /// and what the host decided (our extension).
    Audit(Box<matchlock_api::audit::Record>),
}

type Notification = (String, Value);

struct Pending {
    reply: oneshot::Sender<Result<Value, Error>>,
    notifications: Option<mpsc::UnboundedSender<Notification>>,
}

/// What the reader task shares with the client. The request channel is deliberately not
/// here: when the client and its calls are gone, the channel closes, `matchlock rpc` sees
/// EOF and tears the sandbox down.
struct Inner {
    pending: Mutex<HashMap<u64, Pending>>,
    next_id: AtomicU64,
    events: Mutex<Option<mpsc::Sender<Event>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Queues one message for `matchlock rpc`'s stdin.
fn send(outgoing: &mpsc::UnboundedSender<String>, method: &str, params: &Value, id: Option<u64>) -> Result<(), Error> {
    let mut message = json!({"jsonrpc": "2.0", "method": method, "params": params});
    if let Some(id) = id {
        message["id"] = json!(id);
    }
    outgoing.send(message.to_string()).map_err(|_| Error::Closed)
}

impl Inner {
    fn dispatch(&self, message: &Value) {
        if let Some(id) = message.get("id").and_then(Value::as_u64) {
            let Some(pending) = lock(&self.pending).remove(&id) else { return };
            let result = match message.get("error") {
                Some(e) if !e.is_null() => Err(Error::Rpc {
                    code: e.get("code").and_then(Value::as_i64).unwrap_or(codes::INTERNAL),
                    message: e.get("message").and_then(Value::as_str).unwrap_or_default().to_owned(),
                }),
                _ => Ok(message.get("result").cloned().unwrap_or(Value::Null)),
            };
            let _ = pending.reply.send(result);
            return;
        }
        let Some(method) = message.get("method").and_then(Value::as_str) else { return };
        let params = message.get("params").cloned().unwrap_or(Value::Null);
        if method == "event" {
            let event = match params.get("type").and_then(Value::as_str) {
                Some("network") => serde_json::from_value(params["network"].clone()).ok().map(Event::Network),
                Some("file") => serde_json::from_value(params["file"].clone()).ok().map(Event::File),
                Some("audit") => {
                    serde_json::from_value(params["audit"].clone()).ok().map(|r| Event::Audit(Box::new(r)))
                }
                _ => None,
            };
            if let (Some(event), Some(events)) = (event, lock(&self.events).as_ref()) {
                let _ = events.try_send(event);
            }
            return;
        }
        let Some(id) = params.get("id").and_then(Value::as_u64) else { return };
        if let Some(tx) = lock(&self.pending).get(&id).and_then(|p| p.notifications.clone()) {
            let _ = tx.send((method.to_owned(), params));
        }
    }

    fn fail_all(&self) {
        for (_, pending) in lock(&self.pending).drain() {
            let _ = pending.reply.send(Err(Error::Closed));
        }
    }
}

/// A request in flight: dropping it before the answer cancels it on the server.
struct Call {
    inner: Arc<Inner>,
    outgoing: mpsc::UnboundedSender<String>,
    id: u64,
    reply: Option<oneshot::Receiver<Result<Value, Error>>>,
}

impl Call {
    async fn result(mut self) -> Result<Value, Error> {
        let reply = self.reply.take().expect("awaited once");
        let result = reply.await.unwrap_or(Err(Error::Closed));
        self.id = 0;
        result
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        if self.id != 0 && lock(&self.inner.pending).remove(&self.id).is_some() {
            let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
            let _ = send(&self.outgoing, "cancel", &json!({"id": self.id}), Some(id));
        }
    }
}

/// A connection to one `matchlock rpc` process, which holds at most one sandbox.
pub struct Client {
    inner: Arc<Inner>,
    outgoing: mpsc::UnboundedSender<String>,
    child: tokio::sync::Mutex<Child>,
    binary: PathBuf,
    /// Environment changes of the command it was started with (for CLI calls).
    env: Vec<(OsString, Option<OsString>)>,
    vm_id: Mutex<Option<String>>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("binary", &self.binary).field("vm_id", &*lock(&self.vm_id)).finish()
    }
}

/// The `matchlock` binary: `$MATCHLOCK_BIN`, else `matchlock` on `PATH`.
pub fn default_binary() -> PathBuf {
    std::env::var_os("MATCHLOCK_BIN").filter(|v| !v.is_empty()).map_or_else(|| "matchlock".into(), PathBuf::from)
}

fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let context = context.into();
    move |source| Error::Io { context, source }
}

impl Client {
    /// Starts `matchlock rpc` from [`default_binary`].
    pub async fn start() -> Result<Self, Error> {
        Self::start_with(default_binary()).await
    }

    /// Starts `<binary> rpc`.
    pub async fn start_with(binary: impl Into<PathBuf>) -> Result<Self, Error> {
        Self::from_command(std::process::Command::new(binary.into())).await
    }

    /// Starts `rpc` with a prepared `matchlock` command (its program, environment and
    /// working directory are kept; `rpc` is appended to its arguments).
    pub async fn from_command(command: std::process::Command) -> Result<Self, Error> {
        let binary = PathBuf::from(command.get_program());
        let env: Vec<(OsString, Option<OsString>)> =
            command.get_envs().map(|(k, v)| (k.to_owned(), v.map(ToOwned::to_owned))).collect();
        let mut command = Command::from(command);
        let mut child = command
            .arg("rpc")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            // Dropped without `close`, the client closes the process's stdin instead:
            // `matchlock rpc` then stops and removes the sandbox itself.
            .kill_on_drop(false)
            .spawn()
            .map_err(|source| Error::Spawn { binary: binary.clone(), source })?;
        let mut stdin = child.stdin.take().ok_or(Error::Closed)?;
        let stdout = child.stdout.take().ok_or(Error::Closed)?;
        let (outgoing, mut lines) = mpsc::unbounded_channel::<String>();
        let inner = Arc::new(Inner {
            pending: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            events: Mutex::new(None),
        });
        tokio::spawn(async move {
            while let Some(mut line) = lines.recv().await {
                line.push('\n');
                if stdin.write_all(line.as_bytes()).await.is_err() || stdin.flush().await.is_err() {
                    break;
                }
            }
        });
        let reader = inner.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if let Ok(message) = serde_json::from_str::<Value>(&line) {
                    reader.dispatch(&message);
                }
            }
            reader.fail_all();
        });
        Ok(Self { inner, outgoing, child: tokio::sync::Mutex::new(child), binary, env, vm_id: Mutex::new(None) })
    }

    fn call_with(
        &self,
        method: &str,
        params: &Value,
        notify: Option<mpsc::UnboundedSender<Notification>>,
    ) -> Result<Call, Error> {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let (reply, rx) = oneshot::channel();
        lock(&self.inner.pending).insert(id, Pending { reply, notifications: notify });
        let call = Call { inner: self.inner.clone(), outgoing: self.outgoing.clone(), id, reply: Some(rx) };
        send(&self.outgoing, method, params, Some(id))?;
        Ok(call)
    }

    async fn call(&self, method: &str, params: Value) -> Result<Value, Error> {
        self.call_with(method, &params, None)?.result().await
    }

    /// Receives the sandbox's events from now on (at most 1024 queued; more are dropped).
    pub fn events(&self) -> mpsc::Receiver<Event> {
        let (tx, rx) = mpsc::channel(1024);
        *lock(&self.inner.events) = Some(tx);
        rx
    }

    /// Creates and boots the sandbox; returns its id (`vm-…`).
    pub async fn create(&self, options: CreateOptions) -> Result<String, Error> {
        self.start_sandbox("create", options.to_params()).await
    }

    /// Calls `method` (`create`, `restore`), which starts the session's sandbox; keeps its id.
    async fn start_sandbox(&self, method: &str, params: Value) -> Result<String, Error> {
        let result = self.call(method, params).await?;
        let id = result
            .get("id")
            .and_then(Value::as_str)
            .ok_or_else(|| Error::InvalidResponse(format!("{method} returned {result}")))?
            .to_owned();
        *lock(&self.vm_id) = Some(id.clone());
        Ok(id)
    }

    /// Resumes the snapshot `name` as this client's sandbox (a matchlock extension), with
    /// the values of the snapshot's secrets by name (values are never saved).
    pub async fn restore(&self, name: &str, secrets: &[(&str, &str)]) -> Result<String, Error> {
        let secrets: serde_json::Map<String, Value> =
            secrets.iter().map(|(k, v)| ((*k).to_owned(), Value::String((*v).to_owned()))).collect();
        self.start_sandbox("restore", json!({"name": name, "secrets": secrets})).await
    }

    /// Saves the running sandbox as snapshot `name` (a matchlock extension): memory,
    /// devices and disk; the sandbox runs on. Returns the snapshot's metadata.
    pub async fn snapshot(&self, name: &str) -> Result<Value, Error> {
        self.call("snapshot", json!({"name": name})).await
    }

    /// Creates the sandbox and starts the image's ENTRYPOINT + CMD in it.
    pub async fn launch(&self, options: CreateOptions) -> Result<String, Error> {
        self.create(options.launch_entrypoint(true)).await
    }

    /// The sandbox id, once created.
    pub fn vm_id(&self) -> Option<String> {
        lock(&self.vm_id).clone()
    }

    /// Runs `sh -c <command>` and collects its output.
    pub async fn exec(&self, command: &str) -> Result<ExecOutput, Error> {
        self.exec_with(command, &ExecOptions::default()).await
    }

    /// [`Client::exec`] with a working directory and user.
    pub async fn exec_with(&self, command: &str, options: &ExecOptions) -> Result<ExecOutput, Error> {
        let result = self.call("exec", options.params(command)).await?;
        let field = |name: &str| -> Result<Vec<u8>, Error> {
            let text = result.get(name).and_then(Value::as_str).unwrap_or_default();
            B64.decode(text).map_err(|e| Error::InvalidResponse(format!("{name}: {e}")))
        };
        Ok(ExecOutput {
            exit_code: exit_code(&result)?,
            stdout: field("stdout")?,
            stderr: field("stderr")?,
            duration: duration(&result),
        })
    }

    /// Runs a command with stdin closed, writing its output as it arrives.
    pub async fn exec_stream(
        &self,
        command: &str,
        options: &ExecOptions,
        stdout: impl AsyncWrite + Unpin,
        stderr: impl AsyncWrite + Unpin,
    ) -> Result<ExitStatus, Error> {
        self.streaming("exec_stream", options.params(command), None::<tokio::io::Empty>, stdout, stderr).await
    }

    /// Runs a command with `stdin` forwarded (EOF included), writing its output as it arrives.
    pub async fn exec_pipe(
        &self,
        command: &str,
        options: &ExecOptions,
        stdin: impl AsyncRead + Unpin,
        stdout: impl AsyncWrite + Unpin,
        stderr: impl AsyncWrite + Unpin,
    ) -> Result<ExitStatus, Error> {
        self.streaming("exec_pipe", options.params(command), Some(stdin), stdout, stderr).await
    }

    /// Runs a command on a `rows`×`cols` pseudo-terminal; everything it prints goes to `output`.
    pub async fn exec_tty(
        &self,
        command: &str,
        options: &ExecOptions,
        (rows, cols): (u16, u16),
        stdin: impl AsyncRead + Unpin,
        output: impl AsyncWrite + Unpin,
    ) -> Result<ExitStatus, Error> {
        let mut params = options.params(command);
        params["rows"] = json!(rows);
        params["cols"] = json!(cols);
        self.streaming("exec_tty", params, Some(stdin), output, tokio::io::sink()).await
    }

    async fn streaming(
        &self,
        method: &str,
        params: Value,
        stdin: Option<impl AsyncRead + Unpin>,
        mut stdout: impl AsyncWrite + Unpin,
        mut stderr: impl AsyncWrite + Unpin,
    ) -> Result<ExitStatus, Error> {
        let (tx, mut notifications) = mpsc::unbounded_channel();
        let call = self.call_with(method, &params, Some(tx))?;
        let id = call.id;
        let mut result = Box::pin(call.result());
        let mut stdin = stdin;
        let mut ready = false;
        let mut buf = vec![0u8; 4096];
        let ready_method = format!("{method}.ready");
        let (stdin_method, eof_method) = (format!("{method}.stdin"), format!("{method}.stdin_eof"));
        let (stdout_method, stderr_method) = (format!("{method}.stdout"), format!("{method}.stderr"));
        let mut write_output = async |name: &str, params: &Value| -> Result<(), Error> {
            let data = params.get("data").and_then(Value::as_str).unwrap_or_default();
            let data = B64.decode(data).map_err(|e| Error::InvalidResponse(e.to_string()))?;
            let out: &mut (dyn AsyncWrite + Unpin) = if name == stdout_method {
                &mut stdout
            } else if name == stderr_method {
                &mut stderr
            } else {
                return Ok(());
            };
            out.write_all(&data).await.map_err(io_err("cannot write the command's output"))?;
            out.flush().await.map_err(io_err("cannot write the command's output"))
        };
        loop {
            tokio::select! {
                biased;
                Some((name, params)) = notifications.recv() => {
                    if name == ready_method {
                        ready = true;
                    } else {
                        write_output(&name, &params).await?;
                    }
                }
                result = &mut result => {
                    // Output notifications precede the result; write what is still queued.
                    while let Ok((name, params)) = notifications.try_recv() {
                        write_output(&name, &params).await?;
                    }
                    let result = result?;
                    return Ok(ExitStatus { exit_code: exit_code(&result)?, duration: duration(&result) });
                }
                n = async { stdin.as_mut().expect("guarded").read(&mut buf).await }, if ready && stdin.is_some() => {
                    match n {
                        Ok(0) | Err(_) => {
                            stdin = None;
                            send(&self.outgoing, &eof_method, &json!({"id": id}), None)?;
                        }
                        Ok(n) => {
                            send(&self.outgoing, &stdin_method, &json!({"id": id, "data": B64.encode(&buf[..n])}), None)?;
                        }
                    }
                }
            }
        }
    }

    /// Writes a file in the sandbox (parents created; `mode` 0 means 0644).
    pub async fn write_file(&self, path: &str, content: &[u8], mode: u32) -> Result<(), Error> {
        self.call("write_file", json!({"path": path, "content": B64.encode(content), "mode": mode})).await.map(drop)
    }

    /// Reads a regular file (at most 16 MiB) from the sandbox.
    pub async fn read_file(&self, path: &str) -> Result<Vec<u8>, Error> {
        let result = self.call("read_file", json!({"path": path})).await?;
        let content = result.get("content").and_then(Value::as_str).unwrap_or_default();
        B64.decode(content).map_err(|e| Error::InvalidResponse(e.to_string()))
    }

    /// Lists a directory in the sandbox.
    pub async fn list_files(&self, path: &str) -> Result<Vec<FileInfo>, Error> {
        let result = self.call("list_files", json!({"path": path})).await?;
        serde_json::from_value(result.get("files").cloned().unwrap_or(Value::Null))
            .map_err(|e| Error::InvalidResponse(e.to_string()))
    }

    /// Forwards host ports to guest ports (`(local, remote)`, local 0 = any free port) on
    /// `addresses` (default 127.0.0.1); replaces the previous set.
    pub async fn port_forward(&self, forwards: &[(u16, u16)], addresses: &[&str]) -> Result<Vec<Binding>, Error> {
        let forwards: Vec<Value> = forwards.iter().map(|(l, r)| json!({"local_port": l, "remote_port": r})).collect();
        let mut params = json!({"forwards": forwards});
        if !addresses.is_empty() {
            params["addresses"] = json!(addresses);
        }
        let result = self.call("port_forward", params).await?;
        serde_json::from_value(result.get("bindings").cloned().unwrap_or(Value::Null))
            .map_err(|e| Error::InvalidResponse(e.to_string()))
    }

    /// Adds hosts to the allow-list at run time; returns the whole list.
    pub async fn allow_list_add(&self, hosts: &[&str]) -> Result<Vec<String>, Error> {
        self.allow_list("allow_list_add", hosts).await
    }

    /// Removes hosts from the allow-list at run time; returns the whole list.
    pub async fn allow_list_delete(&self, hosts: &[&str]) -> Result<Vec<String>, Error> {
        self.allow_list("allow_list_delete", hosts).await
    }

    async fn allow_list(&self, method: &str, hosts: &[&str]) -> Result<Vec<String>, Error> {
        let result = self.call(method, json!({"hosts": hosts})).await?;
        serde_json::from_value(result.get("allowed_hosts").cloned().unwrap_or(Value::Null))
            .map_err(|e| Error::InvalidResponse(e.to_string()))
    }

    /// The sandbox's resource use now (our extension).
    pub async fn stats(&self) -> Result<Stats, Error> {
        let result = self.call("stats", json!({})).await?;
        serde_json::from_value(result).map_err(|e| Error::InvalidResponse(e.to_string()))
    }

    /// The network budgets in force and what was spent; with `limits`, replaces them first
    /// (our extension).
    pub async fn limits(&self, limits: Option<&NetworkLimits>) -> Result<(NetworkLimits, Usage), Error> {
        let params = limits.map_or_else(|| json!({}), |l| json!({"limits": l}));
        let result = self.call("limits", params).await?;
        let field = |name: &str| result.get(name).cloned().unwrap_or(Value::Null);
        let invalid = |e: serde_json::Error| Error::InvalidResponse(e.to_string());
        Ok((
            serde_json::from_value(field("limits")).map_err(invalid)?,
            serde_json::from_value(field("usage")).map_err(invalid)?,
        ))
    }

    /// The sandbox's log (console and entrypoint output).
    pub async fn log(&self) -> Result<Vec<u8>, Error> {
        let result = self.call("log", json!({})).await?;
        B64.decode(result.get("content").and_then(Value::as_str).unwrap_or_default())
            .map_err(|e| Error::InvalidResponse(e.to_string()))
    }

    /// Stops the sandbox (it stays listed as stopped until [`Client::remove`]) and ends
    /// the `matchlock rpc` process.
    pub async fn close(&self) -> Result<(), Error> {
        let result = self.call("close", json!({"timeout_seconds": 2.0})).await;
        let mut child = self.child.lock().await;
        if tokio::time::timeout(Duration::from_secs(10), child.wait()).await.is_err() {
            let _ = child.kill().await;
        }
        match result {
            Ok(_) | Err(Error::Closed) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Deletes the stopped sandbox (`matchlock rm <id>`).
    pub async fn remove(&self) -> Result<(), Error> {
        let Some(id) = self.vm_id() else { return Ok(()) };
        let mut rm = Command::new(&self.binary);
        for (key, value) in &self.env {
            match value {
                Some(v) => rm.env(key, v),
                None => rm.env_remove(key),
            };
        }
        let out = rm
            .args(["rm", &id])
            .output()
            .await
            .map_err(|source| Error::Spawn { binary: self.binary.clone(), source })?;
        if !out.status.success() {
            return Err(Error::Command {
                command: "rm".into(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().into(),
            });
        }
        Ok(())
    }
}

fn exit_code(result: &Value) -> Result<i32, Error> {
    result
        .get("exit_code")
        .and_then(Value::as_i64)
        .and_then(|c| i32::try_from(c).ok())
        .ok_or_else(|| Error::InvalidResponse(format!("no exit_code in {result}")))
}

fn duration(result: &Value) -> Duration {
    Duration::from_millis(result.get("duration_ms").and_then(Value::as_u64).unwrap_or(0))
}
