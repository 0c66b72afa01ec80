//! The JSON-RPC 2.0 API (reference §2) over the sandbox API: what `matchlock rpc` serves on
//! stdin/stdout to the SDKs, one sandbox per session. One JSON object per line each way; every output line is written whole by one
//! writer task. `create` and `close` run in the reader loop, stdin/resize notifications
//! are applied inline (in order), `cancel` inline, everything else concurrently, each
//! request cancellable by id. Stdin EOF (or SIGINT/SIGTERM/SIGHUP) without `close` tears
//! the sandbox down and removes it; after `close` the stopped sandbox stays for `matchlock rm`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use matchlock_api::config::PortForward;
use matchlock_api::paths::VmDir;
use matchlock_api::rpc::{
    code, Binding, CreateParams, ExecParams, ExecResult, ExitResult, FileEvent, FileInfo, NetworkEvent,
};
use matchlock_image::Store;
use matchlock_protocol::exec::{ExecMode, ExecRequest, WindowSize};
use matchlock_sandbox::logfile::Capped;
use matchlock_sandbox::{compose, compose_exec, Control, Events, ExecIo, Sandbox};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

/// Longest request line (the reference's scanner limit).
const MAX_LINE: usize = 10 * 1024 * 1024;
/// Output lines queued for stdout; `event` notifications are dropped when it is full.
const OUTPUT_QUEUE: usize = 1024;
/// Most bytes of each stream `exec` collects; the rest is dropped.
const MAX_EXEC_OUTPUT: u64 = 64 * 1024 * 1024;
/// How long a launched entrypoint must survive for `create` to succeed.
const ENTRYPOINT_GRACE: Duration = Duration::from_millis(500);

/// A JSON-RPC error: `message` is the whole chain `: `-separated (what the SDKs show),
/// `data.causes` the same chain as a list, outermost first.
#[derive(Debug)]
struct RpcError {
    code: i64,
    message: String,
    causes: Vec<String>,
}

impl RpcError {
    fn new(code: i64, message: impl Into<String>) -> Self {
        Self { code, message: message.into(), causes: Vec::new() }
    }

    /// `error` and its sources.
    fn from_error(code: i64, error: &(dyn std::error::Error + 'static)) -> Self {
        let causes: Vec<String> = std::iter::successors(Some(error), |e| e.source()).map(ToString::to_string).collect();
        Self { code, message: causes.join(": "), causes }
    }

    fn to_json(&self) -> Value {
        let mut error = json!({"code": self.code, "message": self.message});
        if !self.causes.is_empty() {
            error["data"] = json!({"causes": self.causes});
        }
        error
    }
}

type Reply = Result<Value, RpcError>;

fn params<T: DeserializeOwned + Default>(value: Option<Value>) -> Result<T, RpcError> {
    match value {
        None | Some(Value::Null) => Ok(T::default()),
        Some(v) => serde_json::from_value(v).map_err(|e| {
            let mut error = RpcError::from_error(code::INVALID_PARAMS, &e);
            error.message = format!("invalid params: {}", error.message);
            error
        }),
    }
}

/// Every method of the API, parsed once from a request's `method`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Method {
    /// Boots the session's sandbox (in the reader loop: requests after it see it).
    Create,
    /// Resumes a snapshot as the session's sandbox (our extension; like `create`).
    Restore,
    /// Stops the sandbox and ends the session.
    Close,
    /// Cancels a running request by id.
    Cancel,
    /// Input for a running `exec_pipe`/`exec_tty`: applied in order, never answered.
    Input(InputKind),
    /// Everything else: run concurrently, cancellable.
    Call(Call),
}

/// Input notifications.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum InputKind {
    Stdin,
    StdinEof,
    Resize,
}

/// Methods that run concurrently.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Call {
    Exec,
    ExecStreaming(ExecMode),
    WriteFile,
    ReadFile,
    ListFiles,
    Log,
    LogStream,
    AllowList {
        add: bool,
    },
    PortForward,
    /// Saves the sandbox as a named snapshot (our extension).
    Snapshot,
    /// The sandbox's resource use (our extension).
    Stats,
    /// Reads or replaces the network budgets (our extension).
    Limits,
}

impl Method {
    fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "create" => Self::Create,
            "restore" => Self::Restore,
            "snapshot" => Self::Call(Call::Snapshot),
            "close" => Self::Close,
            "cancel" => Self::Cancel,
            "exec_pipe.stdin" | "exec_tty.stdin" => Self::Input(InputKind::Stdin),
            "exec_pipe.stdin_eof" | "exec_tty.stdin_eof" => Self::Input(InputKind::StdinEof),
            "exec_tty.resize" => Self::Input(InputKind::Resize),
            "exec" => Self::Call(Call::Exec),
            "exec_stream" => Self::Call(Call::ExecStreaming(ExecMode::Stream)),
            "exec_pipe" => Self::Call(Call::ExecStreaming(ExecMode::Pipe)),
            "exec_tty" => Self::Call(Call::ExecStreaming(ExecMode::Tty)),
            "write_file" => Self::Call(Call::WriteFile),
            "read_file" => Self::Call(Call::ReadFile),
            "list_files" => Self::Call(Call::ListFiles),
            "log" => Self::Call(Call::Log),
            "log_stream" => Self::Call(Call::LogStream),
            "allow_list_add" => Self::Call(Call::AllowList { add: true }),
            "allow_list_delete" => Self::Call(Call::AllowList { add: false }),
            "port_forward" => Self::Call(Call::PortForward),
            "stats" => Self::Call(Call::Stats),
            "limits" => Self::Call(Call::Limits),
            _ => return None,
        })
    }
}

/// Input routed to a running `exec_pipe`/`exec_tty`.
enum Input {
    Data(Vec<u8>),
    Eof,
    Resize(WindowSize),
}

/// The sandbox and what runs beside it.
struct Live {
    sandbox: Sandbox,
    /// Where to send input for running pipe/tty commands, by request id.
    inputs: Mutex<HashMap<u64, mpsc::Sender<Input>>>,
}

/// A request running concurrently.
struct InFlight {
    cancel: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

struct Server {
    out: mpsc::Sender<String>,
    live: tokio::sync::RwLock<Option<Arc<Live>>>,
    inflight: Mutex<HashMap<u64, InFlight>>,
    /// Requests sent without an id (they cannot be cancelled, only stopped at teardown).
    anonymous: Mutex<Vec<JoinHandle<()>>>,
    forwards: Mutex<Option<matchlock_sandbox::forward::Forwarding>>,
    entrypoint: Mutex<Option<JoinHandle<Option<i32>>>>,
    /// The directory of the last sandbox, for `log` after `close`.
    last_dir: Mutex<Option<VmDir>>,
    images: Box<dyn ImageSource>,
}

/// An error from the front end, with its chain.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Where `create` gets its image: the front end's store, with the image pulled into it when
/// it is missing (the CLI shows pull progress on stderr). The future runs in the session's
/// reader loop, so it need not be `Send`.
pub trait ImageSource: Send + Sync {
    /// The store, holding `reference` once this resolves.
    fn store_with<'a>(
        &'a self,
        reference: &'a str,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Store, BoxError>> + 'a>>;
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Server {
    async fn send(&self, message: Value) {
        let _ = self.out.send(message.to_string()).await;
    }

    async fn respond(&self, id: Option<u64>, reply: Reply) {
        let Some(id) = id else { return };
        let message = match reply {
            Ok(result) => json!({"jsonrpc": "2.0", "result": result, "id": id}),
            Err(e) => json!({"jsonrpc": "2.0", "error": e.to_json(), "id": id}),
        };
        self.send(message).await;
    }

    async fn notify(&self, method: &str, params: Value) {
        self.send(json!({"jsonrpc": "2.0", "method": method, "params": params})).await;
    }

    async fn live(&self) -> Result<Arc<Live>, RpcError> {
        self.live.read().await.clone().ok_or_else(|| RpcError::new(code::VM_FAILED, "VM not created"))
    }

    /// Cancels every concurrent request (each answers -32003) and waits for them to end;
    /// what does not end within a few seconds, and the entrypoint, are aborted.
    async fn stop_requests(&self) {
        let tasks: Vec<JoinHandle<()>> = lock(&self.inflight)
            .drain()
            .filter_map(|(_, mut f)| {
                if let Some(c) = f.cancel.take() {
                    let _ = c.send(());
                }
                f.task
            })
            .chain(lock(&self.anonymous).drain(..))
            .collect();
        for mut task in tasks {
            if tokio::time::timeout(Duration::from_secs(5), &mut task).await.is_err() {
                task.abort();
                let _ = task.await;
            }
        }
        let entrypoint = lock(&self.entrypoint).take();
        if let Some(entrypoint) = entrypoint {
            entrypoint.abort();
            let _ = entrypoint.await;
        }
    }

    /// Stops everything; `remove` also deletes the sandbox's directory and state rows.
    async fn shutdown(&self, remove: bool) -> Result<(), RpcError> {
        self.stop_requests().await;
        lock(&self.forwards).take();
        let Some(live) = self.live.write().await.take() else { return Ok(()) };
        // Requests and the entrypoint hold clones only while they run, and they have ended.
        let live = Arc::try_unwrap(live).map_err(|_| RpcError::new(code::VM_FAILED, "sandbox still in use"))?;
        *lock(&self.last_dir) = Some(live.sandbox.dir().clone());
        live.sandbox.close(remove).await.map_err(|e| RpcError::from_error(code::VM_FAILED, &e))
    }
}

/// Serves the API on `input`/`output` until `input` ends, `close`, or `stop` turns true (a
/// stop signal); then the sandbox is torn down (and removed unless `close` came first).
pub async fn serve(
    input: impl AsyncRead + Unpin,
    mut stdout: impl tokio::io::AsyncWrite + Unpin + Send + 'static,
    mut stop: tokio::sync::watch::Receiver<bool>,
    images: impl ImageSource + 'static,
) -> std::io::Result<()> {
    let (out, mut lines) = mpsc::channel::<String>(OUTPUT_QUEUE);
    let (broken_tx, mut broken) = oneshot::channel::<()>();
    let writer = tokio::spawn(async move {
        while let Some(mut line) = lines.recv().await {
            line.push('\n');
            if stdout.write_all(line.as_bytes()).await.is_err() || stdout.flush().await.is_err() {
                let _ = broken_tx.send(());
                return;
            }
        }
    });
    let server = Arc::new(Server {
        out,
        live: tokio::sync::RwLock::new(None),
        inflight: Mutex::new(HashMap::new()),
        anonymous: Mutex::new(Vec::new()),
        forwards: Mutex::new(None),
        entrypoint: Mutex::new(None),
        last_dir: Mutex::new(None),
        images: Box::new(images),
    });
    let mut input = BufReader::new(input);
    let mut closed = false;
    loop {
        let line = tokio::select! {
            line = read_line(&mut input) => line,
            _ = &mut broken => break,
            _ = stop.wait_for(|s| *s) => break,
        };
        let Some(line) = line? else { break };
        // A stop signal during `create` or `close` abandons it; the teardown below runs.
        let done = tokio::select! {
            done = dispatch(&server, line) => done,
            _ = stop.wait_for(|s| *s) => break,
        };
        if done {
            closed = true;
            break;
        }
    }
    // Without `close` nothing of the sandbox is kept.
    if let Err(e) = server.shutdown(!closed).await {
        tracing::warn!("rpc: tearing the sandbox down failed: {}", e.message);
    }
    drop(server);
    let _ = writer.await;
    Ok(())
}

/// Reads one line of at most [`MAX_LINE`] bytes: `Ok(None)` at EOF, `Err(())` inside
/// `Some` for an over-long line (skipped to its end).
async fn read_line(
    input: &mut (impl AsyncRead + AsyncBufReadExt + Unpin),
) -> std::io::Result<Option<Result<Vec<u8>, ()>>> {
    let mut line = Vec::new();
    let n = input.take(MAX_LINE as u64 + 1).read_until(b'\n', &mut line).await?;
    if n == 0 {
        return Ok(None);
    }
    if line.last() == Some(&b'\n') {
        line.pop();
        return Ok(Some(Ok(line)));
    }
    if line.len() <= MAX_LINE {
        return Ok(Some(Ok(line))); // the last line, without a newline
    }
    // Too long: discard through the end of the line.
    loop {
        let buf = input.fill_buf().await?;
        if buf.is_empty() {
            break;
        }
        match buf.iter().position(|b| *b == b'\n') {
            Some(i) => {
                input.consume(i + 1);
                break;
            }
            None => {
                let n = buf.len();
                input.consume(n);
            }
        }
    }
    Ok(Some(Err(())))
}

/// Handles one line; returns true after `close`.
async fn dispatch(server: &Arc<Server>, line: Result<Vec<u8>, ()>) -> bool {
    let parse_error = json!({"jsonrpc": "2.0", "error": {"code": code::PARSE, "message": "Parse error"}});
    let Ok(line) = line else {
        server.send(parse_error).await;
        return false;
    };
    if line.iter().all(u8::is_ascii_whitespace) {
        return false;
    }
    let Ok(Value::Object(mut request)) = serde_json::from_slice::<Value>(&line) else {
        server.send(parse_error).await;
        return false;
    };
    let id = match request.remove("id") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) if n.as_u64().is_some() => n.as_u64(),
        Some(_) => {
            server.send(parse_error).await;
            return false;
        }
    };
    let Some(Value::String(name)) = request.remove("method") else {
        server.respond(id, Err(RpcError::new(code::INVALID_REQUEST, "method is required"))).await;
        return false;
    };
    let Some(method) = Method::parse(&name) else {
        server.respond(id, Err(RpcError::new(code::METHOD_NOT_FOUND, "Method not found"))).await;
        return false;
    };
    let params = request.remove("params");
    match method {
        Method::Create => {
            let reply = Box::pin(create(server, params)).await;
            server.respond(id, reply).await;
        }
        Method::Restore => {
            let reply = restore(server, params).await;
            server.respond(id, reply).await;
        }
        Method::Close => {
            let reply = server.shutdown(false).await.map(|()| json!({}));
            server.respond(id, reply).await;
            return true;
        }
        Method::Cancel => {
            let target = params.as_ref().and_then(|p| p.get("id")).and_then(Value::as_u64);
            let cancel = target.and_then(|t| lock(&server.inflight).get_mut(&t).and_then(|f| f.cancel.take()));
            let cancelled = cancel.is_some_and(|c| c.send(()).is_ok());
            server.respond(id, Ok(json!({"cancelled": cancelled}))).await;
        }
        Method::Input(kind) => route_input(server, kind, params.as_ref()).await,
        Method::Call(call) => spawn_request(server, id, call, params),
    }
    false
}

/// Delivers stdin/resize notifications to their command, in order; never answered.
async fn route_input(server: &Server, kind: InputKind, params: Option<&Value>) {
    let Some(p) = params else { return };
    let Some(target) = p.get("id").and_then(Value::as_u64) else { return };
    let input = match kind {
        InputKind::Stdin => match p.get("data").and_then(Value::as_str).map(|d| B64.decode(d)) {
            Some(Ok(data)) => Input::Data(data),
            _ => return,
        },
        InputKind::StdinEof => Input::Eof,
        InputKind::Resize => {
            let dim = |k| p.get(k).and_then(Value::as_u64).and_then(|v| u16::try_from(v).ok()).filter(|v| *v > 0);
            match (dim("rows"), dim("cols")) {
                (Some(rows), Some(cols)) => Input::Resize(WindowSize { rows, cols }),
                _ => return,
            }
        }
    };
    let Some(live) = server.live.read().await.clone() else { return };
    let sender = lock(&live.inputs).get(&target).cloned();
    if let Some(sender) = sender {
        let _ = sender.send(input).await;
    }
}

/// Runs a request concurrently, cancellable through `cancel` under its id.
fn spawn_request(server: &Arc<Server>, id: Option<u64>, call: Call, params: Option<Value>) {
    let (cancel_tx, cancel_rx) = oneshot::channel();
    let s = server.clone();
    let task = tokio::spawn(async move {
        let work = handle(&s, id, call, params);
        let reply = tokio::select! {
            reply = work => reply,
            Ok(()) = cancel_rx => Err(RpcError::new(code::CANCELLED, "request cancelled")),
        };
        if let Some(id) = id {
            lock(&s.inflight).remove(&id);
        }
        s.respond(id, reply).await;
    });
    match id {
        Some(id) => {
            let mut inflight = lock(&server.inflight);
            inflight.retain(|_, f| f.task.as_ref().is_some_and(|t| !t.is_finished()));
            if !task.is_finished() {
                inflight.insert(id, InFlight { cancel: Some(cancel_tx), task: Some(task) });
            }
        }
        None => {
            drop(cancel_tx);
            let mut anonymous = lock(&server.anonymous);
            anonymous.retain(|t| !t.is_finished());
            anonymous.push(task);
        }
    }
}

async fn handle(server: &Arc<Server>, id: Option<u64>, call: Call, params: Option<Value>) -> Reply {
    match call {
        Call::Exec => exec(server, params).await,
        Call::ExecStreaming(mode) => exec_streaming(server, id, params, mode).await,
        Call::WriteFile => write_file(server, params).await,
        Call::ReadFile => read_file(server, params).await,
        Call::ListFiles => list_files(server, params).await,
        Call::Log => log(server).await,
        Call::LogStream => log_stream(server, id).await,
        Call::AllowList { add } => allow_list(server, params, add).await,
        Call::PortForward => port_forward(server, params).await,
        Call::Snapshot => snapshot(server, params).await,
        Call::Stats => Ok(serde_json::to_value(server.live().await?.sandbox.stats().await).unwrap_or_default()),
        Call::Limits => limits(server, params).await,
    }
}

/// `limits`: with `limits` (a `network.limits` object), replaces the budgets; answers the
/// budgets in force and what was spent.
async fn limits(server: &Arc<Server>, params_value: Option<Value>) -> Reply {
    #[derive(Default, serde::Deserialize)]
    #[serde(default, deny_unknown_fields)]
    struct LimitsParams {
        limits: Option<matchlock_api::config::NetworkLimits>,
    }
    let p: LimitsParams = params(params_value)?;
    let live = server.live().await?;
    if let Some(limits) = p.limits {
        live.sandbox.set_limits(limits).map_err(|e| RpcError::new(code::VM_FAILED, e.to_string()))?;
    }
    let (limits, usage) =
        live.sandbox.limits().ok_or_else(|| RpcError::new(code::VM_FAILED, "the sandbox has no network"))?;
    Ok(json!({"limits": limits, "usage": usage}))
}

/// `snapshot` parameters.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SnapshotParams {
    name: String,
}

async fn snapshot(server: &Arc<Server>, params_value: Option<Value>) -> Reply {
    let p: SnapshotParams = params(params_value)?;
    let live = server.live().await?;
    let meta = live.sandbox.snapshot(&p.name).await.map_err(|e| RpcError::from_error(code::VM_FAILED, &e))?;
    Ok(serde_json::to_value(meta).expect("metadata serializes"))
}

/// One sandbox per session: `create` and `restore` refuse a second.
async fn no_sandbox_yet(server: &Arc<Server>) -> Result<(), RpcError> {
    match server.live.read().await.as_ref() {
        Some(live) => {
            Err(RpcError::new(code::VM_FAILED, format!("sandbox {} already exists in this session", live.sandbox.id())))
        }
        None => Ok(()),
    }
}

/// `restore` parameters: the snapshot, and the values of its secrets by name (never saved).
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RestoreParams {
    name: String,
    #[serde(default)]
    secrets: HashMap<String, String>,
}

async fn restore(server: &Arc<Server>, params_value: Option<Value>) -> Reply {
    let p: RestoreParams = params(params_value)?;
    no_sandbox_yet(server).await?;
    let (_, meta) =
        matchlock_sandbox::snapshot::load(&p.name).map_err(|e| RpcError::from_error(code::VM_FAILED, &e))?;
    let store = server.images.store_with(&meta.image).await.map_err(|e| RpcError::from_error(code::VM_FAILED, &*e))?;
    let state = matchlock_sandbox::open_state().map_err(|e| RpcError::from_error(code::VM_FAILED, &e))?;
    let sandbox = Sandbox::restore(&p.name, &store, state, event_sinks(&server.out), &p.secrets)
        .await
        .map_err(|e| RpcError::from_error(code::VM_FAILED, &e))?;
    let vm_id = sandbox.id().to_owned();
    *server.live.write().await = Some(Arc::new(Live { sandbox, inputs: Mutex::new(HashMap::new()) }));
    Ok(json!({"id": vm_id}))
}

async fn create(server: &Arc<Server>, params_value: Option<Value>) -> Reply {
    let p: CreateParams = params(params_value)?;
    let config = p.to_config().map_err(|e| RpcError::new(code::INVALID_PARAMS, e))?;
    no_sandbox_yet(server).await?;
    let store =
        server.images.store_with(&config.image).await.map_err(|e| RpcError::from_error(code::VM_FAILED, &*e))?;
    let state = matchlock_sandbox::open_state().map_err(|e| RpcError::from_error(code::VM_FAILED, &e))?;
    let sandbox = Sandbox::create_with_events(config, &store, state, event_sinks(&server.out))
        .await
        .map_err(|e| RpcError::from_error(code::VM_FAILED, &e))?;
    let vm_id = sandbox.id().to_owned();
    let live = Arc::new(Live { sandbox, inputs: Mutex::new(HashMap::new()) });
    *server.live.write().await = Some(live.clone());
    if p.launch_entrypoint {
        if let Err(e) = launch_entrypoint(server, live).await {
            if let Err(teardown) = server.shutdown(true).await {
                tracing::warn!("rpc: tearing down after a failed entrypoint: {}", teardown.message);
            }
            return Err(e);
        }
    }
    Ok(json!({"id": vm_id}))
}

/// Sinks that turn file and network events into `event` notifications (timestamps in
/// Unix ms for files and Unix seconds for network, as the reference). Events are dropped
/// when the output queue is full, as the reference drops them.
fn event_sinks(out: &mpsc::Sender<String>) -> Events {
    fn since_epoch() -> Duration {
        SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default()
    }
    let files = out.clone();
    let network = out.clone();
    let audit = out.clone();
    Events {
        file: Some(Box::new(move |event: FileEvent| {
            let params = json!({"type": "file", "timestamp": since_epoch().as_millis() as u64, "file": event});
            let _ = files.try_send(json!({"jsonrpc": "2.0", "method": "event", "params": params}).to_string());
        })),
        network: Some(matchlock_net::EventSink(Arc::new(move |event: NetworkEvent| {
            let params = json!({"type": "network", "timestamp": since_epoch().as_secs(), "network": event});
            let _ = network.try_send(json!({"jsonrpc": "2.0", "method": "event", "params": params}).to_string());
        }))),
        // Our extension: every audit record (HTTP, TCP, UDP, DNS), timestamps in Unix ms.
        audit: Some(Arc::new(move |record: &matchlock_api::audit::Record| {
            let params = json!({"type": "audit", "timestamp": record.time_ms, "audit": record});
            let _ = audit.try_send(json!({"jsonrpc": "2.0", "method": "event", "params": params}).to_string());
        })),
    }
}

/// Starts the image's ENTRYPOINT + CMD with empty stdin, its output appended to vm.log;
/// fails if it exits non-zero within [`ENTRYPOINT_GRACE`].
async fn launch_entrypoint(server: &Arc<Server>, live: Arc<Live>) -> Result<(), RpcError> {
    let Ok(composed) = compose(&live.sandbox.image().config, live.sandbox.config()) else { return Ok(()) };
    let log = live.sandbox.dir().console_log();
    let request = composed.into_request(None);
    let mut task = tokio::spawn(async move {
        let Ok((stdout, stderr)) = matchlock_sandbox::logfile::command_log(&log) else { return None };
        let (_control_tx, control) = mpsc::channel(1);
        let io = ExecIo {
            stdin: Some(Box::new(tokio::io::empty())),
            stdout: Box::new(stdout),
            stderr: Box::new(stderr),
            control,
        };
        live.sandbox.exec(ExecMode::Pipe, &request, io).await.ok()
    });
    match tokio::time::timeout(ENTRYPOINT_GRACE, &mut task).await {
        Ok(Ok(Some(code))) if code != 0 => {
            Err(RpcError::new(code::VM_FAILED, format!("start image entrypoint: exit code {code}")))
        }
        Ok(_) => Ok(()),
        Err(_) => {
            *lock(&server.entrypoint) = Some(task);
            Ok(())
        }
    }
}

/// The exec request for `sh -c <command>`: env and user from the image and the config,
/// working directory from the request, the image, the workspace, else `/`.
fn exec_request(live: &Live, p: &ExecParams, window: Option<WindowSize>) -> Result<ExecRequest, RpcError> {
    if p.command.is_empty() {
        return Err(RpcError::new(code::INVALID_PARAMS, "command is required"));
    }
    let config = live.sandbox.config();
    let image = &live.sandbox.image().config;
    let argv = vec!["sh".into(), "-c".into(), p.command.clone()];
    let working_dir = (!p.working_dir.is_empty()).then(|| p.working_dir.clone());
    let composed =
        compose_exec(image, config, argv, working_dir).map_err(|e| RpcError::new(code::EXEC_FAILED, e.to_string()))?;
    let mut request = composed.into_request(window);
    if !p.user.is_empty() {
        request.user = Some(p.user.clone());
    }
    Ok(request)
}

fn exec_failed(e: &matchlock_sandbox::SandboxError) -> RpcError {
    RpcError::from_error(code::EXEC_FAILED, e)
}

async fn exec(server: &Arc<Server>, params_value: Option<Value>) -> Reply {
    let p: ExecParams = params(params_value)?;
    let live = server.live().await?;
    let request = exec_request(&live, &p, None)?;
    let started = Instant::now();
    let mut stdout = Capped::new(Vec::new(), MAX_EXEC_OUTPUT);
    let mut stderr = Capped::new(Vec::new(), MAX_EXEC_OUTPUT);
    let (_control_tx, control) = mpsc::channel(1);
    let io = ExecIo { stdin: None, stdout: Box::new(&mut stdout), stderr: Box::new(&mut stderr), control };
    let exit_code = live.sandbox.exec(ExecMode::Stream, &request, io).await.map_err(|e| exec_failed(&e))?;
    let result = ExecResult {
        exit_code,
        stdout: B64.encode(stdout.into_inner()),
        stderr: B64.encode(stderr.into_inner()),
        duration_ms: started.elapsed().as_millis() as u64,
    };
    Ok(serde_json::to_value(result).expect("result serializes"))
}

/// Sends everything written to the returned writer as `<method>` notifications for `id`.
fn notifier(server: &Arc<Server>, id: u64, method: &'static str) -> (tokio::io::DuplexStream, JoinHandle<()>) {
    let (writer, mut reader) = tokio::io::duplex(64 * 1024);
    let s = server.clone();
    let task = tokio::spawn(async move {
        let mut buf = vec![0u8; 32 * 1024];
        while let Ok(n) = reader.read(&mut buf).await {
            if n == 0 {
                break;
            }
            s.notify(method, json!({"id": id, "data": B64.encode(&buf[..n])})).await;
        }
    });
    (writer, task)
}

/// `exec_stream`, `exec_pipe` and `exec_tty`: output as notifications, then the exit code.
async fn exec_streaming(server: &Arc<Server>, id: Option<u64>, params_value: Option<Value>, mode: ExecMode) -> Reply {
    let prefix = match mode {
        ExecMode::Stream => "exec_stream",
        ExecMode::Pipe => "exec_pipe",
        ExecMode::Tty => "exec_tty",
    };
    let Some(id) = id else {
        return Err(RpcError::new(code::INVALID_REQUEST, format!("{prefix} requires request id")));
    };
    let p: ExecParams = params(params_value)?;
    let live = server.live().await?;
    let window = (mode == ExecMode::Tty).then_some(WindowSize {
        rows: if p.rows == 0 { 24 } else { p.rows },
        cols: if p.cols == 0 { 80 } else { p.cols },
    });
    let request = exec_request(&live, &p, window)?;
    // A terminal merges stderr into stdout: exec_tty has no stderr notifications.
    let (stdout_method, stderr_method) = match mode {
        ExecMode::Stream => ("exec_stream.stdout", "exec_stream.stderr"),
        ExecMode::Pipe => ("exec_pipe.stdout", "exec_pipe.stderr"),
        ExecMode::Tty => ("exec_tty.stdout", "exec_tty.stdout"),
    };
    let (stdout, stdout_task) = notifier(server, id, stdout_method);
    let (stderr, stderr_task) = notifier(server, id, stderr_method);
    let (control_tx, control) = mpsc::channel(16);
    let mut stdin: Option<Box<dyn AsyncRead + Unpin + Send>> = None;
    let mut input_pump = None;
    if mode != ExecMode::Stream {
        let (mut stdin_writer, stdin_reader) = tokio::io::duplex(64 * 1024);
        stdin = Some(Box::new(stdin_reader));
        let (input_tx, mut input_rx) = mpsc::channel::<Input>(256);
        lock(&live.inputs).insert(id, input_tx);
        input_pump = Some(AbortOnDrop(tokio::spawn(async move {
            let mut writer = Some(&mut stdin_writer);
            while let Some(input) = input_rx.recv().await {
                match input {
                    Input::Data(d) => {
                        if let Some(w) = writer.as_mut() {
                            if w.write_all(&d).await.is_err() {
                                writer = None;
                            }
                        }
                    }
                    Input::Eof => {
                        if let Some(w) = writer.take() {
                            let _ = w.shutdown().await;
                        }
                    }
                    Input::Resize(ws) => {
                        let _ = control_tx.send(Control::Resize(ws)).await;
                    }
                }
            }
        })));
        server.notify(&format!("{prefix}.ready"), json!({"id": id})).await;
    }
    let started = Instant::now();
    let io = ExecIo { stdin, stdout: Box::new(stdout), stderr: Box::new(stderr), control };
    let result = live.sandbox.exec(mode, &request, io).await;
    lock(&live.inputs).remove(&id);
    drop(input_pump);
    // All output is out before the result.
    let _ = stdout_task.await;
    let _ = stderr_task.await;
    let exit_code = result.map_err(|e| exec_failed(&e))?;
    let result = ExitResult { exit_code, duration_ms: started.elapsed().as_millis() as u64 };
    Ok(serde_json::to_value(result).expect("result serializes"))
}

/// Aborts a task when dropped.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[derive(Default, serde::Deserialize)]
#[serde(default)]
struct FileParams {
    path: String,
    content: Option<String>,
    mode: u32,
}

fn file_failed(e: &matchlock_sandbox::SandboxError) -> RpcError {
    RpcError::from_error(code::FILE_FAILED, e)
}

fn required_path(p: &FileParams) -> Result<(), RpcError> {
    if p.path.is_empty() {
        return Err(RpcError::new(code::INVALID_PARAMS, "path is required"));
    }
    Ok(())
}

async fn write_file(server: &Arc<Server>, params_value: Option<Value>) -> Reply {
    let p: FileParams = params(params_value)?;
    required_path(&p)?;
    let content = B64
        .decode(p.content.as_deref().unwrap_or_default())
        .map_err(|_| RpcError::new(code::INVALID_PARAMS, "invalid base64 content"))?;
    let live = server.live().await?;
    live.sandbox.write_file(&p.path, &content, p.mode).await.map_err(|e| file_failed(&e))?;
    Ok(json!({}))
}

async fn read_file(server: &Arc<Server>, params_value: Option<Value>) -> Reply {
    let p: FileParams = params(params_value)?;
    required_path(&p)?;
    let live = server.live().await?;
    let content = live.sandbox.read_file(&p.path).await.map_err(|e| file_failed(&e))?;
    Ok(json!({"content": B64.encode(content)}))
}

async fn list_files(server: &Arc<Server>, params_value: Option<Value>) -> Reply {
    let p: FileParams = params(params_value)?;
    required_path(&p)?;
    let live = server.live().await?;
    let entries = live.sandbox.list_files(&p.path).await.map_err(|e| file_failed(&e))?;
    let files: Vec<FileInfo> = entries
        .into_iter()
        .map(|e| FileInfo {
            name: e.name,
            size: e.size,
            mode: e.mode,
            mod_time: "0001-01-01T00:00:00Z".into(),
            is_dir: e.is_dir,
        })
        .collect();
    Ok(json!({"files": files}))
}

/// The log file of the live sandbox, else of the last one.
async fn log_path(server: &Server) -> Option<PathBuf> {
    let dir = match server.live.read().await.as_ref() {
        Some(live) => Some(live.sandbox.dir().clone()),
        None => lock(&server.last_dir).clone(),
    };
    dir.map(|d| d.console_log())
}

async fn log(server: &Arc<Server>) -> Reply {
    let content = match log_path(server).await {
        Some(path) => tokio::fs::read(&path).await.unwrap_or_default(),
        None => return Err(RpcError::new(code::VM_FAILED, "VM not created")),
    };
    Ok(json!({"content": B64.encode(content)}))
}

/// Streams vm.log (what exists, then what is appended, polled every 100 ms) until cancelled.
async fn log_stream(server: &Arc<Server>, id: Option<u64>) -> Reply {
    let Some(id) = id else { return Err(RpcError::new(code::INVALID_REQUEST, "log_stream requires request id")) };
    let path = log_path(server).await.ok_or_else(|| RpcError::new(code::VM_FAILED, "VM not created"))?;
    let mut offset = 0u64;
    loop {
        if let Ok(mut file) = tokio::fs::File::open(&path).await {
            use tokio::io::AsyncSeekExt;
            if file.seek(std::io::SeekFrom::Start(offset)).await.is_ok() {
                let mut buf = vec![0u8; 64 * 1024];
                while let Ok(n) = file.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    offset += n as u64;
                    server.notify("log_stream.data", json!({"id": id, "data": B64.encode(&buf[..n])})).await;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[derive(Default, serde::Deserialize)]
#[serde(default)]
struct HostsParams {
    hosts: Vec<String>,
}

async fn allow_list(server: &Arc<Server>, params_value: Option<Value>, add: bool) -> Reply {
    let p: HostsParams = params(params_value)?;
    let hosts: Vec<String> = p.hosts.iter().map(|h| h.trim().to_owned()).filter(|h| !h.is_empty()).collect();
    if hosts.is_empty() {
        return Err(RpcError::new(code::INVALID_PARAMS, "hosts is required"));
    }
    let live = server.live().await?;
    let network = live.sandbox.network().filter(|n| n.intercepts).ok_or_else(|| {
        RpcError::new(
            code::VM_FAILED,
            "allow-list updates unavailable: sandbox was started without network interception",
        )
    })?;
    let changed = if add { network.policy.add_hosts(&hosts) } else { network.policy.remove_hosts(&hosts) };
    let allowed = network.policy.allowed_hosts();
    Ok(if add {
        json!({"added": changed, "allowed_hosts": allowed})
    } else {
        json!({"removed": changed, "allowed_hosts": allowed})
    })
}

#[derive(Default, serde::Deserialize)]
#[serde(default)]
struct ForwardParams {
    forwards: Vec<matchlock_api::rpc::ForwardSpec>,
    addresses: Vec<String>,
}

async fn port_forward(server: &Arc<Server>, params_value: Option<Value>) -> Reply {
    let p: ForwardParams = params(params_value)?;
    if p.forwards.is_empty() {
        return Err(RpcError::new(code::INVALID_PARAMS, "forwards is required"));
    }
    if p.forwards.iter().any(|f| f.remote_port == 0) {
        return Err(RpcError::new(code::INVALID_PARAMS, "remote_port must be in range 1-65535"));
    }
    let live = server.live().await?;
    let addresses = if p.addresses.is_empty() { vec!["127.0.0.1".to_owned()] } else { p.addresses };
    let ips = matchlock_sandbox::forward::parse_addresses(&addresses)
        .map_err(|e| RpcError::from_error(code::INVALID_PARAMS, &e))?;
    // Local port 0 picks a free port (reported in the bindings).
    let forwards: Vec<PortForward> =
        p.forwards.iter().map(|f| PortForward { local: f.local_port, remote: f.remote_port }).collect();
    let bindings = matchlock_sandbox::forward::bindings(&ips, &forwards);
    // The new set replaces the old one, whose ports may be reused.
    lock(&server.forwards).take();
    let listeners =
        matchlock_sandbox::forward::bind(&bindings).await.map_err(|e| RpcError::from_error(code::VM_FAILED, &e))?;
    let mut realized = Vec::new();
    for (listener, binding) in &listeners {
        let local = listener.local_addr().map_or(binding.local, |a| a);
        realized.push(Binding {
            address: local.ip().to_string(),
            local_port: local.port(),
            remote_port: binding.remote,
        });
    }
    *lock(&server.forwards) = Some(matchlock_sandbox::forward::start(live.sandbox.dir(), listeners));
    Ok(json!({"bindings": realized}))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs a session over in-memory streams: `input` is sent, then EOF; returns every line
    /// the server wrote, parsed.
    /// Runs a session over in-memory streams: `input` is sent, and once `replies` lines came
    /// back (or the server ended the session), EOF; returns every line the server wrote.
    async fn session(input: &[u8], replies: usize) -> Vec<Value> {
        let (mut client, server_in) = tokio::io::duplex(64 << 10);
        let (server_out, client_out) = tokio::io::duplex(64 << 10);
        let (_stop, stopped) = tokio::sync::watch::channel(false);
        let serving = Box::pin(serve(server_in, server_out, stopped, NoImages));
        let talk = async {
            // The server may stop reading (after `close`): what it leaves unread is dropped.
            let _ = client.write_all(input).await;
            let mut lines = BufReader::new(client_out).lines();
            let mut out = Vec::new();
            while out.len() < replies {
                let Ok(Some(line)) = lines.next_line().await else { break };
                out.push(serde_json::from_str::<Value>(&line).unwrap());
            }
            drop(client);
            while let Ok(Some(line)) = lines.next_line().await {
                out.push(serde_json::from_str(&line).unwrap());
            }
            out
        };
        let (served, out) = tokio::join!(serving, talk);
        served.unwrap();
        out
    }

    /// A front end without images: `create` cannot get past it.
    struct NoImages;

    impl ImageSource for NoImages {
        fn store_with<'a>(
            &'a self,
            reference: &'a str,
        ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Store, BoxError>> + 'a>> {
            Box::pin(async move { Err(format!("image not found: {reference}").into()) })
        }
    }

    fn error_code(reply: &Value) -> i64 {
        reply["error"]["code"].as_i64().unwrap_or_else(|| panic!("not an error: {reply}"))
    }

    #[tokio::test]
    async fn malformed_lines_get_parse_errors_and_the_session_goes_on() {
        let mut input = b"not json\n{\"id\": \"seven\", \"method\": \"log\"}\n[1,2]\n\n".to_vec();
        input.extend(std::iter::repeat_n(b'x', MAX_LINE + 10));
        input.extend_from_slice(b"\n{\"jsonrpc\":\"2.0\",\"id\":9,\"method\":\"cancel\",\"params\":{\"id\":1}}\n");
        let replies = session(&input, 5).await;
        assert_eq!(replies.len(), 5, "{replies:?}");
        for reply in &replies[..4] {
            assert_eq!(error_code(reply), code::PARSE);
            assert!(reply.get("id").is_none(), "a parse error carries no id: {reply}");
        }
        assert_eq!(replies[4], json!({"jsonrpc": "2.0", "result": {"cancelled": false}, "id": 9}));
    }

    #[tokio::test]
    async fn unknown_methods_missing_methods_and_no_sandbox_are_errors_with_their_id() {
        let replies = session(
            b"{\"id\":1,\"method\":\"reboot\"}\n{\"id\":2}\n{\"id\":3,\"method\":\"exec\",\"params\":{\"command\":\"true\"}}\n\
              {\"method\":\"reboot\"}\n{\"method\":\"exec_pipe.stdin\",\"params\":{\"id\":5,\"data\":\"aGk=\"}}\n",
            3,
        )
        .await;
        assert_eq!(replies.len(), 3, "notifications are never answered: {replies:?}");
        let by_id = |id: u64| replies.iter().find(|r| r["id"] == id).unwrap_or_else(|| panic!("no reply {id}"));
        assert_eq!(error_code(by_id(1)), code::METHOD_NOT_FOUND);
        assert_eq!(error_code(by_id(2)), code::INVALID_REQUEST);
        assert_eq!(error_code(by_id(3)), code::VM_FAILED);
        assert_eq!(by_id(3)["error"]["message"], "VM not created");
    }

    #[tokio::test]
    async fn invalid_params_carry_their_cause_chain_in_data() {
        let replies = session(b"{\"id\":1,\"method\":\"create\",\"params\":{\"image\":7}}\n", 1).await;
        assert_eq!(error_code(&replies[0]), code::INVALID_PARAMS);
        let message = replies[0]["error"]["message"].as_str().unwrap();
        assert!(message.starts_with("invalid params: invalid type"), "{message}");
        let causes = replies[0]["error"]["data"]["causes"].as_array().expect("data.causes");
        assert!(causes[0].as_str().unwrap().contains("expected a string"), "{causes:?}");
    }

    #[tokio::test]
    async fn close_answers_then_ends_the_session_unread_requests_unanswered() {
        let replies = session(b"{\"id\":1,\"method\":\"close\"}\n{\"id\":2,\"method\":\"log\"}\n", 2).await;
        assert_eq!(replies, [json!({"jsonrpc": "2.0", "result": {}, "id": 1})]);
    }

    #[tokio::test]
    async fn requests_are_answered_in_order_when_they_run_inline() {
        let mut input = Vec::new();
        for id in 1..=50 {
            input.extend_from_slice(
                format!("{{\"id\":{id},\"method\":\"cancel\",\"params\":{{\"id\":{id}}}}}\n").as_bytes(),
            );
        }
        let ids: Vec<u64> = session(&input, 50).await.iter().map(|r| r["id"].as_u64().unwrap()).collect();
        assert_eq!(ids, (1..=50).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn a_stop_signal_ends_the_session_with_the_input_still_open() {
        let (_client, server_in) = tokio::io::duplex(1024);
        let (server_out, _client_out) = tokio::io::duplex(1024);
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let serving = Box::pin(serve(server_in, server_out, stopped, NoImages));
        stop.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(5), serving).await.expect("the session ends").unwrap();
    }

    #[test]
    fn every_method_name_parses_to_one_method() {
        for (name, method) in [
            ("create", Method::Create),
            ("exec_tty", Method::Call(Call::ExecStreaming(ExecMode::Tty))),
            ("exec_tty.resize", Method::Input(InputKind::Resize)),
            ("exec_pipe.stdin_eof", Method::Input(InputKind::StdinEof)),
            ("allow_list_delete", Method::Call(Call::AllowList { add: false })),
        ] {
            assert_eq!(Method::parse(name), Some(method), "{name}");
        }
        assert_eq!(Method::parse("Create"), None, "names are case-sensitive");
    }
}
