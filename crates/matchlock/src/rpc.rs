//! `matchlock rpc`: the JSON-RPC 2.0 API on stdin/stdout (reference §2), one sandbox per
//! process. One JSON object per line each way; every output line is written whole by one
//! writer task. `create` and `close` run in the reader loop, stdin/resize notifications
//! are applied inline (in order), `cancel` inline, everything else concurrently, each
//! request cancellable by id. Stdin EOF (or SIGINT/SIGTERM/SIGHUP) without `close` tears
//! the sandbox down and removes it; after `close` the stopped sandbox stays for `matchlock rm`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Result;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use matchlock_api::config::PortForward;
use matchlock_api::paths::VmDir;
use matchlock_api::rpc::{
    code, Binding, CreateParams, ExecParams, ExecResult, ExitResult, FileEvent, FileInfo, NetworkEvent,
};
use matchlock_protocol::exec::{ExecMode, ExecRequest, WindowSize};
use matchlock_sandbox::logfile::Capped;
use matchlock_sandbox::{compose, compose_command, Control, Events, ExecIo, Sandbox};
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

/// A JSON-RPC error.
#[derive(Debug)]
struct RpcError {
    code: i64,
    message: String,
}

impl RpcError {
    fn new(code: i64, message: impl Into<String>) -> Self {
        Self { code, message: message.into() }
    }
}

type Reply = Result<Value, RpcError>;

/// The error and its causes, `: `-separated.
fn chain(e: impl std::error::Error + Send + Sync + 'static) -> String {
    format!("{:#}", anyhow::Error::new(e))
}

fn params<T: DeserializeOwned + Default>(value: Option<Value>) -> Result<T, RpcError> {
    match value {
        None | Some(Value::Null) => Ok(T::default()),
        Some(v) => {
            serde_json::from_value(v).map_err(|e| RpcError::new(code::INVALID_PARAMS, format!("invalid params: {e}")))
        }
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
    forwards: Mutex<Option<crate::forward::Forwarding>>,
    entrypoint: Mutex<Option<JoinHandle<Option<i32>>>>,
    /// The directory of the last sandbox, for `log` after `close`.
    last_dir: Mutex<Option<VmDir>>,
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
            Err(e) => json!({"jsonrpc": "2.0", "error": {"code": e.code, "message": e.message}, "id": id}),
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
        live.sandbox.close(remove).await.map_err(|e| RpcError::new(code::VM_FAILED, chain(e)))
    }
}

/// Serves the JSON-RPC API on stdin/stdout until stdin ends or `close`.
pub async fn serve() -> Result<u8> {
    let (out, mut lines) = mpsc::channel::<String>(OUTPUT_QUEUE);
    let (broken_tx, mut broken) = oneshot::channel::<()>();
    let writer = tokio::spawn(async move {
        let mut stdout = tokio::io::stdout();
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
    });
    let mut signals = crate::session::StopSignals::new()?;
    let mut input = BufReader::new(tokio::io::stdin());
    let mut closed = false;
    loop {
        let line = tokio::select! {
            line = read_line(&mut input) => line,
            _ = &mut broken => break,
            () = signals.recv() => break,
        };
        let Some(line) = line? else { break };
        // A stop signal during `create` or `close` abandons it; the teardown below runs.
        let done = tokio::select! {
            done = dispatch(&server, line) => done,
            () = signals.recv() => break,
        };
        if done {
            closed = true;
            break;
        }
    }
    // Without `close` nothing of the sandbox is kept.
    let _ = server.shutdown(!closed).await;
    drop(server);
    let _ = writer.await;
    Ok(0)
}

/// Reads one line of at most [`MAX_LINE`] bytes: `Ok(None)` at EOF, `Err(())` inside
/// `Some` for an over-long line (skipped to its end).
async fn read_line(input: &mut (impl AsyncRead + AsyncBufReadExt + Unpin)) -> Result<Option<Result<Vec<u8>, ()>>> {
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
    let Some(Value::String(method)) = request.remove("method") else {
        server.respond(id, Err(RpcError::new(code::INVALID_REQUEST, "method is required"))).await;
        return false;
    };
    let params = request.remove("params");
    match method.as_str() {
        "create" => {
            let reply = create(server, params).await;
            server.respond(id, reply).await;
        }
        "close" => {
            let reply = server.shutdown(false).await.map(|()| json!({}));
            server.respond(id, reply).await;
            return true;
        }
        "cancel" => {
            let target = params.as_ref().and_then(|p| p.get("id")).and_then(Value::as_u64);
            let cancel = target.and_then(|t| lock(&server.inflight).get_mut(&t).and_then(|f| f.cancel.take()));
            let cancelled = cancel.is_some_and(|c| c.send(()).is_ok());
            server.respond(id, Ok(json!({"cancelled": cancelled}))).await;
        }
        "exec_pipe.stdin" | "exec_pipe.stdin_eof" | "exec_tty.stdin" | "exec_tty.stdin_eof" | "exec_tty.resize" => {
            route_input(server, &method, params.as_ref()).await;
        }
        _ => spawn_request(server, id, method, params),
    }
    false
}

/// Delivers stdin/resize notifications to their command, in order; never answered.
async fn route_input(server: &Server, method: &str, params: Option<&Value>) {
    let Some(p) = params else { return };
    let Some(target) = p.get("id").and_then(Value::as_u64) else { return };
    let input = if method.ends_with(".stdin") {
        match p.get("data").and_then(Value::as_str).map(|d| B64.decode(d)) {
            Some(Ok(data)) => Input::Data(data),
            _ => return,
        }
    } else if method.ends_with("_eof") {
        Input::Eof
    } else {
        let dim = |k| p.get(k).and_then(Value::as_u64).and_then(|v| u16::try_from(v).ok()).filter(|v| *v > 0);
        match (dim("rows"), dim("cols")) {
            (Some(rows), Some(cols)) => Input::Resize(WindowSize { rows, cols }),
            _ => return,
        }
    };
    let Some(live) = server.live.read().await.clone() else { return };
    let sender = lock(&live.inputs).get(&target).cloned();
    if let Some(sender) = sender {
        let _ = sender.send(input).await;
    }
}

/// Runs a request concurrently, cancellable through `cancel` under its id.
fn spawn_request(server: &Arc<Server>, id: Option<u64>, method: String, params: Option<Value>) {
    let (cancel_tx, cancel_rx) = oneshot::channel();
    let s = server.clone();
    let task = tokio::spawn(async move {
        let work = handle(&s, id, &method, params);
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

async fn handle(server: &Arc<Server>, id: Option<u64>, method: &str, params: Option<Value>) -> Reply {
    match method {
        "exec" => exec(server, params).await,
        "exec_stream" => exec_streaming(server, id, params, ExecMode::Stream).await,
        "exec_pipe" => exec_streaming(server, id, params, ExecMode::Pipe).await,
        "exec_tty" => exec_streaming(server, id, params, ExecMode::Tty).await,
        "write_file" => write_file(server, params).await,
        "read_file" => read_file(server, params).await,
        "list_files" => list_files(server, params).await,
        "log" => log(server).await,
        "log_stream" => log_stream(server, id).await,
        "allow_list_add" => allow_list(server, params, true).await,
        "allow_list_delete" => allow_list(server, params, false).await,
        "port_forward" => port_forward(server, params).await,
        _ => Err(RpcError::new(code::METHOD_NOT_FOUND, "Method not found")),
    }
}

async fn create(server: &Arc<Server>, params_value: Option<Value>) -> Reply {
    let p: CreateParams = params(params_value)?;
    let config = p.to_config().map_err(|e| RpcError::new(code::INVALID_PARAMS, e))?;
    if let Some(live) = server.live.read().await.as_ref() {
        return Err(RpcError::new(
            code::VM_FAILED,
            format!("sandbox {} already exists in this session", live.sandbox.id()),
        ));
    }
    let vm_failed = |e: anyhow::Error| RpcError::new(code::VM_FAILED, format!("{e:#}"));
    let mut store = crate::cli::open_store().map_err(vm_failed)?;
    crate::images::image_for_run(&mut store, &config.image, false).await.map_err(vm_failed)?;
    let state = matchlock_sandbox::open_state().map_err(|e| vm_failed(e.into()))?;
    let sandbox = Sandbox::create_with_events(config, &store, state, event_sinks(&server.out))
        .await
        .map_err(|e| RpcError::new(code::VM_FAILED, chain(e)))?;
    let vm_id = sandbox.id().to_owned();
    let live = Arc::new(Live { sandbox, inputs: Mutex::new(HashMap::new()) });
    *server.live.write().await = Some(live.clone());
    if p.launch_entrypoint {
        if let Err(e) = launch_entrypoint(server, live).await {
            let _ = server.shutdown(true).await;
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
    Events {
        file: Some(Box::new(move |event: FileEvent| {
            let params = json!({"type": "file", "timestamp": since_epoch().as_millis() as u64, "file": event});
            let _ = files.try_send(json!({"jsonrpc": "2.0", "method": "event", "params": params}).to_string());
        })),
        network: Some(matchlock_net::EventSink(Arc::new(move |event: NetworkEvent| {
            let params = json!({"type": "network", "timestamp": since_epoch().as_secs(), "network": event});
            let _ = network.try_send(json!({"jsonrpc": "2.0", "method": "event", "params": params}).to_string());
        }))),
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
    let composed = compose_command(image, config, argv).map_err(|e| RpcError::new(code::EXEC_FAILED, e.to_string()))?;
    let working_dir = if !p.working_dir.is_empty() {
        p.working_dir.clone()
    } else if config.workdir.is_none() && image.working_dir.is_empty() {
        config.workspace.clone().unwrap_or_else(|| "/".into())
    } else {
        composed.working_dir.clone()
    };
    let mut request = composed.into_request(window);
    request.working_dir = Some(working_dir);
    if !p.user.is_empty() {
        request.user = Some(p.user.clone());
    }
    Ok(request)
}

fn exec_failed(e: matchlock_sandbox::SandboxError) -> RpcError {
    RpcError::new(code::EXEC_FAILED, chain(e))
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
    let exit_code = live.sandbox.exec(ExecMode::Stream, &request, io).await.map_err(exec_failed)?;
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
    let exit_code = result.map_err(exec_failed)?;
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

fn file_failed(e: matchlock_sandbox::SandboxError) -> RpcError {
    RpcError::new(code::FILE_FAILED, chain(e))
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
    live.sandbox.write_file(&p.path, &content, p.mode).await.map_err(file_failed)?;
    Ok(json!({}))
}

async fn read_file(server: &Arc<Server>, params_value: Option<Value>) -> Reply {
    let p: FileParams = params(params_value)?;
    required_path(&p)?;
    let live = server.live().await?;
    let content = live.sandbox.read_file(&p.path).await.map_err(file_failed)?;
    Ok(json!({"content": B64.encode(content)}))
}

async fn list_files(server: &Arc<Server>, params_value: Option<Value>) -> Reply {
    let p: FileParams = params(params_value)?;
    required_path(&p)?;
    let live = server.live().await?;
    let entries = live.sandbox.list_files(&p.path).await.map_err(file_failed)?;
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
    let ips = crate::forward::parse_addresses(&addresses)
        .map_err(|e| RpcError::new(code::INVALID_PARAMS, format!("{e:#}")))?;
    // Local port 0 picks a free port (reported in the bindings).
    let forwards: Vec<PortForward> =
        p.forwards.iter().map(|f| PortForward { local: f.local_port, remote: f.remote_port }).collect();
    let bindings = crate::forward::bindings(&ips, &forwards);
    // The new set replaces the old one, whose ports may be reused.
    lock(&server.forwards).take();
    let listeners =
        crate::forward::bind(&bindings).await.map_err(|e| RpcError::new(code::VM_FAILED, format!("{e:#}")))?;
    let mut realized = Vec::new();
    for (listener, binding) in &listeners {
        let local = listener.local_addr().map_or(binding.local, |a| a);
        realized.push(Binding {
            address: local.ip().to_string(),
            local_port: local.port(),
            remote_port: binding.remote,
        });
    }
    *lock(&server.forwards) = Some(crate::forward::start(live.sandbox.dir(), listeners));
    Ok(json!({"bindings": realized}))
}
