//! The MCP tools: run code and commands, keep sandboxes across calls, move files. Every
//! argument is checked against the operator's [`Policy`]; nothing here widens it.

use std::fmt::Write as _;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{
    CallToolResult, ContentBlock, Implementation, ProgressNotificationParam, ProgressToken, RequestMetaObject,
    ServerCapabilities, ServerConfig,
};
use rmcp::{tool, tool_handler, tool_router, Peer, RoleServer, ServerHandler};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::backend::{BackendError, Command, Output};
use crate::sandboxes::{Held, Sandboxes, SandboxesError};

/// Most bytes `write_file` writes in one call.
pub const MAX_WRITE_BYTES: usize = 8 << 20;
/// Most bytes `read_file` returns in one call (and its default).
pub const MAX_READ_BYTES: usize = 4 << 20;
const DEFAULT_READ_BYTES: usize = 256 << 10;
/// Most bytes of code, a command line or stdin in one call.
pub const MAX_CODE_BYTES: usize = 4 << 20;
/// How often a running command reports progress (when the client asked for it).
const PROGRESS_PERIOD: Duration = Duration::from_secs(1);
/// Where `run_code` puts the program in the guest.
const CODE_DIR: &str = "/tmp/matchlock-mcp";

/// A language `run_code` runs: the interpreter must be in the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Language {
    /// `python3`.
    #[serde(alias = "python3", alias = "py")]
    Python,
    /// `node`.
    #[serde(alias = "javascript", alias = "js", alias = "nodejs")]
    Node,
    /// `bash`.
    Bash,
    /// `sh`.
    #[serde(alias = "shell")]
    Sh,
    /// `ruby`.
    Ruby,
    /// `perl`.
    Perl,
}

impl Language {
    /// The interpreter and the file extension of a program.
    fn interpreter(self) -> (&'static str, &'static str) {
        match self {
            Self::Python => ("python3", "py"),
            Self::Node => ("node", "js"),
            Self::Bash => ("bash", "sh"),
            Self::Sh => ("sh", "sh"),
            Self::Ruby => ("ruby", "rb"),
            Self::Perl => ("perl", "pl"),
        }
    }
}

/// Arguments of `run_code`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RunCodeArgs {
    /// The language of `code`; its interpreter must be in the sandbox's image.
    pub language: Language,
    /// The program's source.
    pub code: String,
    /// A sandbox id from `sandbox_create` to run in (files and installed packages stay
    /// there for later calls); without it the code runs in a fresh sandbox that is
    /// closed afterwards.
    #[serde(default)]
    pub sandbox: Option<String>,
    /// Text given to the program on stdin (default: none).
    #[serde(default)]
    pub stdin: Option<String>,
    /// Seconds before the program is stopped (at most the server's limit).
    #[serde(default)]
    pub timeout: Option<u64>,
}

/// Arguments of `exec`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecArgs {
    /// A shell command line, run by `sh -c` (pipes, `&&`, redirections work).
    pub command: String,
    /// A sandbox id from `sandbox_create`; without it the command runs in a fresh sandbox
    /// that is closed afterwards.
    #[serde(default)]
    pub sandbox: Option<String>,
    /// Working directory (default: the image's, else the workspace, else /).
    #[serde(default)]
    pub workdir: Option<String>,
    /// Text given to the command on stdin (default: none).
    #[serde(default)]
    pub stdin: Option<String>,
    /// Seconds before the command is stopped (at most the server's limit).
    #[serde(default)]
    pub timeout: Option<u64>,
}

/// Arguments of `sandbox_create`.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateArgs {
    /// The image to boot (default: the server's image; only images the operator allowed).
    #[serde(default)]
    pub image: Option<String>,
}

/// Arguments naming one sandbox.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SandboxArgs {
    /// The sandbox id `sandbox_create` returned.
    pub sandbox: String,
}

/// How file content is carried.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    /// UTF-8 text.
    #[default]
    Text,
    /// Any bytes, base64.
    Base64,
}

/// Arguments of `write_file`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WriteFileArgs {
    /// The sandbox id.
    pub sandbox: String,
    /// Absolute path in the sandbox; parent directories are created.
    pub path: String,
    /// The file's content.
    pub content: String,
    /// `text` (default) or `base64` for binary content.
    #[serde(default)]
    pub encoding: Encoding,
    /// Permissions in octal, e.g. "755" for a script (default 644).
    #[serde(default)]
    pub mode: Option<String>,
}

/// Arguments of `read_file`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReadFileArgs {
    /// The sandbox id.
    pub sandbox: String,
    /// Absolute path of a regular file in the sandbox.
    pub path: String,
    /// Most bytes to return (default 262144, at most 4194304); the rest is reported as cut.
    #[serde(default)]
    pub max_bytes: Option<usize>,
    /// `text` or `base64`; by default text when the content is UTF-8, else base64.
    #[serde(default)]
    pub encoding: Option<Encoding>,
}

/// Arguments of `list_files`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ListFilesArgs {
    /// The sandbox id.
    pub sandbox: String,
    /// Absolute path of a directory in the sandbox.
    pub path: String,
}

/// The structured result of `run_code` and `exec`.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct RunResult {
    /// The sandbox it ran in (absent for a fresh sandbox, closed since).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
    /// Exit code (128 + the signal when a signal ended it).
    pub exit_code: i32,
    /// Standard output (UTF-8, invalid bytes replaced).
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
    /// Bytes of stdout beyond the server's bound, not returned.
    pub stdout_dropped_bytes: u64,
    /// Bytes of stderr beyond the bound, not returned.
    pub stderr_dropped_bytes: u64,
    /// Whether the time limit stopped it.
    pub timed_out: bool,
    /// How long it ran.
    pub duration_ms: u64,
}

/// The MCP server: its tools over the session's sandboxes.
#[derive(Clone, Debug)]
pub struct Tools {
    sandboxes: Arc<Sandboxes>,
}

/// What a tool returns: a refusal or a failure is a tool error (`isError`, the reason as
/// text), as MCP asks, so that the model reads it and can correct its call.
type Reply = Result<CallToolResult, CallToolResult>;

fn refusal(text: impl Into<String>) -> CallToolResult {
    CallToolResult::error(vec![ContentBlock::text(text.into())])
}

fn refused(e: &SandboxesError) -> CallToolResult {
    refusal(e.to_string())
}

fn failed(what: &str, e: &BackendError) -> CallToolResult {
    CallToolResult::error(vec![ContentBlock::text(format!("{what}: {e}"))])
}

fn too_big(what: &str, len: usize, max: usize) -> Option<CallToolResult> {
    (len > max).then(|| refusal(format!("{what} is {len} bytes; at most {max} are accepted")))
}

/// Runs `work`, sending a progress notification each second when the client gave a token,
/// until it ends or `stop` or `cancel` fires (then `None`: `work` was dropped).
async fn with_progress<T>(
    work: impl Future<Output = T>,
    what: &str,
    progress: Option<(ProgressToken, Peer<RoleServer>)>,
    limit: Duration,
    cancel: &CancellationToken,
    closing: Option<&CancellationToken>,
) -> Option<T> {
    let started = Instant::now();
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + PROGRESS_PERIOD, PROGRESS_PERIOD);
    let never = CancellationToken::new();
    let closing = closing.unwrap_or(&never);
    tokio::pin!(work);
    loop {
        tokio::select! {
            done = &mut work => return Some(done),
            () = cancel.cancelled() => return None,
            () = closing.cancelled() => return None,
            _ = ticks.tick() => {
                if let Some((token, peer)) = &progress {
                    let elapsed = started.elapsed().as_secs_f64();
                    let note = ProgressNotificationParam::new(token.clone(), elapsed.floor())
                        .with_total(limit.as_secs_f64())
                        .with_message(format!("{what}: {} s", elapsed.floor()));
                    if let Err(e) = peer.notify_progress(note).await {
                        tracing::debug!("cannot send progress: {e}");
                    }
                }
            }
        }
    }
}

/// The progress token of a request, with the peer to notify.
fn progress_of(meta: &RequestMetaObject, peer: Peer<RoleServer>) -> Option<(ProgressToken, Peer<RoleServer>)> {
    meta.get_progress_token().map(|token| (token, peer))
}

impl RunResult {
    fn new(sandbox: Option<String>, output: &Output, started: Instant) -> Self {
        Self {
            sandbox,
            exit_code: output.exit_code,
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
            stdout_dropped_bytes: output.stdout_dropped,
            stderr_dropped_bytes: output.stderr_dropped,
            timed_out: output.timed_out,
            duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        }
    }

    /// The result as a model reads it, and as structured content.
    fn into_tool_result(self) -> CallToolResult {
        let mut text = String::new();
        if self.timed_out {
            let _ =
                writeln!(text, "timed out after {} ms and stopped (exit code {})", self.duration_ms, self.exit_code);
        } else {
            let _ = writeln!(text, "exit code {} ({} ms)", self.exit_code, self.duration_ms);
        }
        for (name, body, dropped) in
            [("stdout", &self.stdout, self.stdout_dropped_bytes), ("stderr", &self.stderr, self.stderr_dropped_bytes)]
        {
            if body.is_empty() && dropped == 0 {
                continue;
            }
            let _ = writeln!(text, "--- {name} ---\n{}", body.strip_suffix('\n').unwrap_or(body));
            if dropped > 0 {
                let _ = writeln!(text, "[{name} cut: {dropped} more bytes were dropped]");
            }
        }
        let value = serde_json::to_value(&self).expect("a run result serializes");
        let mut result = CallToolResult::success(vec![ContentBlock::text(text)]);
        result.structured_content = Some(value);
        result
    }
}

fn structured(value: serde_json::Value) -> CallToolResult {
    let mut result = CallToolResult::success(vec![ContentBlock::text(value.to_string())]);
    result.structured_content = Some(value);
    result
}

fn parse_mode(mode: Option<&str>) -> Result<u32, CallToolResult> {
    let Some(text) = mode.map(str::trim).filter(|m| !m.is_empty()) else { return Ok(0o644) };
    let digits = text.strip_prefix("0o").unwrap_or(text);
    match u32::from_str_radix(digits, 8) {
        Ok(mode) if mode <= 0o7777 => Ok(mode),
        _ => Err(refusal(format!("mode {text:?} is not octal permissions like \"755\""))),
    }
}

fn check_path(path: &str) -> Result<(), CallToolResult> {
    if !path.starts_with('/') || path.contains('\0') {
        return Err(refusal(format!("path {path:?} must be absolute")));
    }
    Ok(())
}

#[tool_router]
impl Tools {
    /// Tools over `sandboxes`.
    pub fn new(sandboxes: Arc<Sandboxes>) -> Self {
        Self { sandboxes }
    }

    /// Runs `command` in the sandbox `id`, or in a fresh one closed afterwards; `prepare`
    /// writes a file first (the program of `run_code`).
    #[allow(clippy::too_many_arguments)]
    async fn run(
        &self,
        id: Option<&str>,
        prepare: Option<(String, Vec<u8>)>,
        mut command: Command,
        timeout: Option<u64>,
        cancel: &CancellationToken,
        progress: Option<(ProgressToken, Peer<RoleServer>)>,
    ) -> Reply {
        let limit = self.sandboxes.policy().time_limit(timeout);
        command.time_limit = Some(limit);
        let started = Instant::now();
        let held: Held = match id {
            Some(id) => self.sandboxes.get(id).map_err(|e| refused(&e))?,
            None => {
                let boot = self.sandboxes.open(None, true);
                with_progress(boot, "booting", progress.clone(), limit, cancel, None)
                    .await
                    .ok_or_else(|| refusal("cancelled"))?
                    .map_err(|e| refused(&e))?
            }
        };
        let max_output = self.sandboxes.policy().max_output;
        let machine = held.machine.clone();
        let work = async {
            if let Some((path, content)) = &prepare {
                machine.write_file(path, content, 0o644).await?;
            }
            machine.run(command, max_output).await
        };
        let ran = with_progress(work, "running", progress, limit, cancel, Some(&held.closing)).await;
        let one_shot = held.one_shot.then(|| held.machine.id().to_owned());
        drop(held);
        if let Some(id) = &one_shot {
            let _ = self.sandboxes.close(id).await;
        }
        let sandbox = if one_shot.is_some() { None } else { id.map(str::to_owned) };
        match ran {
            None if cancel.is_cancelled() => Err(refusal("cancelled")),
            None => Ok(CallToolResult::error(vec![ContentBlock::text(
                "the sandbox was closed while the command ran".to_owned(),
            )])),
            Some(Err(e)) => Ok(failed("the command could not run", &e)),
            Some(Ok(output)) => Ok(RunResult::new(sandbox, &output, started).into_tool_result()),
        }
    }

    /// Runs a program in a sandbox and returns its stdout, stderr and exit code.
    #[tool(
        description = "Run a program (python, node, bash, sh, ruby or perl) in an isolated sandbox VM and return its \
                       stdout, stderr and exit code. Without `sandbox` it runs in a fresh sandbox that is thrown away \
                       afterwards; pass the id from sandbox_create to keep files and installed packages across calls. \
                       Network access and secrets follow the server's policy (see the server instructions). Output \
                       beyond the server's bound is cut and the result says how much was dropped.",
        annotations(title = "Run code in a sandbox", destructive_hint = false, open_world_hint = true)
    )]
    async fn run_code(
        &self,
        Parameters(args): Parameters<RunCodeArgs>,
        cancel: CancellationToken,
        meta: RequestMetaObject,
        peer: Peer<RoleServer>,
    ) -> Reply {
        if let Some(e) = too_big("code", args.code.len(), MAX_CODE_BYTES)
            .or_else(|| too_big("stdin", args.stdin.as_ref().map_or(0, String::len), MAX_CODE_BYTES))
        {
            return Err(e);
        }
        let (interpreter, extension) = args.language.interpreter();
        let serial = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
        let path = format!("{CODE_DIR}/program-{serial}.{extension}");
        let command = Command {
            argv: vec![interpreter.to_owned(), path.clone()],
            stdin: args.stdin.map(String::into_bytes),
            ..Command::default()
        };
        let progress = progress_of(&meta, peer);
        self.run(
            args.sandbox.as_deref(),
            Some((path, args.code.into_bytes())),
            command,
            args.timeout,
            &cancel,
            progress,
        )
        .await
    }

    /// Runs a shell command line in a sandbox.
    #[tool(
        description = "Run a shell command line (sh -c) in a sandbox VM and return its stdout, stderr and exit code: \
                       install packages, run tests, inspect files. Pass `sandbox` (from sandbox_create) to work in a \
                       sandbox that keeps its state; without it a fresh sandbox is used and thrown away.",
        annotations(title = "Run a command in a sandbox", destructive_hint = false, open_world_hint = true)
    )]
    async fn exec(
        &self,
        Parameters(args): Parameters<ExecArgs>,
        cancel: CancellationToken,
        meta: RequestMetaObject,
        peer: Peer<RoleServer>,
    ) -> Reply {
        if let Some(e) = too_big("command", args.command.len(), MAX_CODE_BYTES)
            .or_else(|| too_big("stdin", args.stdin.as_ref().map_or(0, String::len), MAX_CODE_BYTES))
        {
            return Err(e);
        }
        if args.command.trim().is_empty() {
            return Err(refusal("command is empty"));
        }
        if let Some(dir) = &args.workdir {
            check_path(dir)?;
        }
        let command = Command {
            argv: vec!["sh".into(), "-c".into(), args.command],
            stdin: args.stdin.map(String::into_bytes),
            working_dir: args.workdir,
            time_limit: None,
        };
        let progress = progress_of(&meta, peer);
        self.run(args.sandbox.as_deref(), None, command, args.timeout, &cancel, progress).await
    }

    /// Starts a sandbox that stays for later calls.
    #[tool(
        description = "Start a sandbox VM that keeps its files, packages and processes across calls; returns its id \
                       for run_code, exec, write_file, read_file and list_files. Close it with sandbox_close when \
                       done (an unused sandbox is closed after the server's idle timeout).",
        annotations(title = "Create a sandbox", destructive_hint = false, open_world_hint = false)
    )]
    async fn sandbox_create(
        &self,
        Parameters(args): Parameters<CreateArgs>,
        cancel: CancellationToken,
        meta: RequestMetaObject,
        peer: Peer<RoleServer>,
    ) -> Reply {
        let policy = self.sandboxes.policy();
        // Refused before booting: an image outside the policy never reaches the launcher.
        policy.config_for(args.image.as_deref()).map_err(|e| refused(&e.into()))?;
        let boot = self.sandboxes.open(args.image.as_deref(), false);
        let held = with_progress(boot, "booting", progress_of(&meta, peer), policy.call_timeout, &cancel, None)
            .await
            .ok_or_else(|| refusal("cancelled"))?
            .map_err(|e| refused(&e))?;
        Ok(structured(json!({"sandbox": held.machine.id(), "image": held.machine.image()})))
    }

    /// Lists the open sandboxes.
    #[tool(
        description = "List the sandboxes this server has open: id, image and seconds since last use.",
        annotations(title = "List sandboxes", read_only_hint = true)
    )]
    async fn sandbox_list(&self) -> Reply {
        let sandboxes: Vec<serde_json::Value> = self
            .sandboxes
            .list()
            .iter()
            .filter(|e| !e.one_shot)
            .map(|e| json!({"sandbox": e.machine.id(), "image": e.machine.image(), "idle_seconds": e.idle().as_secs()}))
            .collect();
        Ok(structured(json!({"sandboxes": sandboxes})))
    }

    /// Closes a sandbox.
    #[tool(
        description = "Close a sandbox: its processes stop and its files are gone.",
        annotations(title = "Close a sandbox", destructive_hint = true, idempotent_hint = false)
    )]
    async fn sandbox_close(&self, Parameters(args): Parameters<SandboxArgs>) -> Reply {
        self.sandboxes.close(&args.sandbox).await.map_err(|e| refused(&e))?;
        Ok(structured(json!({"sandbox": args.sandbox.trim(), "closed": true})))
    }

    /// Writes a file into a sandbox.
    #[tool(
        description = "Write a file in a sandbox (parent directories are created): UTF-8 text, or base64 for binary \
                       content. At most 8 MiB per call.",
        annotations(title = "Write a file in a sandbox", destructive_hint = true)
    )]
    async fn write_file(&self, Parameters(args): Parameters<WriteFileArgs>) -> Reply {
        check_path(&args.path)?;
        let mode = parse_mode(args.mode.as_deref())?;
        let content = match args.encoding {
            Encoding::Text => args.content.into_bytes(),
            Encoding::Base64 => {
                B64.decode(args.content.trim()).map_err(|e| refusal(format!("content is not base64: {e}")))?
            }
        };
        if let Some(e) = too_big("content", content.len(), MAX_WRITE_BYTES) {
            return Err(e);
        }
        let held = self.sandboxes.get(&args.sandbox).map_err(|e| refused(&e))?;
        match held.machine.write_file(&args.path, &content, mode).await {
            Ok(()) => Ok(structured(json!({"path": args.path, "bytes": content.len()}))),
            Err(e) => Ok(failed(&format!("cannot write {}", args.path), &e)),
        }
    }

    /// Reads a file from a sandbox.
    #[tool(
        description = "Read a file from a sandbox: text when it is UTF-8, else base64. Returns at most max_bytes \
                       (default 256 KiB) and says how many bytes were cut.",
        annotations(title = "Read a file in a sandbox", read_only_hint = true)
    )]
    async fn read_file(&self, Parameters(args): Parameters<ReadFileArgs>) -> Reply {
        check_path(&args.path)?;
        let max = args.max_bytes.unwrap_or(DEFAULT_READ_BYTES).min(MAX_READ_BYTES);
        let held = self.sandboxes.get(&args.sandbox).map_err(|e| refused(&e))?;
        let mut content = match held.machine.read_file(&args.path).await {
            Ok(content) => content,
            Err(e) => return Ok(failed(&format!("cannot read {}", args.path), &e)),
        };
        let size = content.len();
        content.truncate(max);
        let text = match args.encoding {
            Some(Encoding::Base64) => None,
            _ => match std::str::from_utf8(&content) {
                Ok(text) => Some(text.to_owned()),
                // A cut in the middle of a character: keep the whole characters.
                Err(e) if e.error_len().is_none() && size > max => {
                    Some(String::from_utf8_lossy(&content[..e.valid_up_to()]).into_owned())
                }
                Err(_) if args.encoding == Some(Encoding::Text) => {
                    return Err(refusal(format!("{} is not UTF-8 text; read it with encoding base64", args.path)))
                }
                Err(_) => None,
            },
        };
        let (encoding, body, returned) = match text {
            Some(text) => {
                let n = text.len();
                (Encoding::Text, text, n)
            }
            None => (Encoding::Base64, B64.encode(&content), content.len()),
        };
        Ok(structured(json!({
            "path": args.path,
            "size": size,
            "encoding": encoding,
            "content": body,
            "cut_bytes": size - returned,
        })))
    }

    /// Lists a directory in a sandbox.
    #[tool(
        description = "List a directory in a sandbox: name, type (file, dir, symlink, other), size and permissions.",
        annotations(title = "List files in a sandbox", read_only_hint = true)
    )]
    async fn list_files(&self, Parameters(args): Parameters<ListFilesArgs>) -> Reply {
        check_path(&args.path)?;
        let held = self.sandboxes.get(&args.sandbox).map_err(|e| refused(&e))?;
        let entries = match held.machine.list_files(&args.path).await {
            Ok(entries) => entries,
            Err(e) => return Ok(failed(&format!("cannot list {}", args.path), &e)),
        };
        let entries: Vec<serde_json::Value> = entries
            .iter()
            .map(|e| {
                let kind = if e.is_dir {
                    "dir"
                } else if e.mode & matchlock_protocol::files::GO_MODE_SYMLINK != 0 {
                    "symlink"
                } else if e.mode & GO_MODE_TYPE == 0 {
                    "file"
                } else {
                    "other"
                };
                json!({"name": e.name, "type": kind, "size": e.size, "mode": format!("{:o}", e.mode & 0o777)})
            })
            .collect();
        Ok(structured(json!({"path": args.path, "entries": entries})))
    }
}

/// Go's `os.ModeType`: every type bit (a regular file has none).
const GO_MODE_TYPE: u32 = 0x8F28_0000;

#[tool_handler]
impl ServerHandler for Tools {
    fn get_info(&self) -> ServerConfig {
        let instructions = format!(
            "Run untrusted code in isolated micro-VM sandboxes. {} Use run_code or exec without a sandbox id for a \
             one-off; use sandbox_create for multi-step work and pass its id to later calls; close it with \
             sandbox_close when done.",
            self.sandboxes.policy().describe()
        );
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(Implementation::new("matchlock", env!("CARGO_PKG_VERSION")))
            .with_instructions(instructions)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    use matchlock_api::SandboxConfig;
    use matchlock_protocol::files::FileEntry;
    use rmcp::model::{CallToolRequestParams, ClientRequest, Request};
    use rmcp::service::{PeerRequestOptions, RunningService};
    use rmcp::{RoleClient, ServiceExt as _};
    use serde_json::Value;

    use super::*;
    use crate::backend::{BoxFuture, Launcher, Machine};
    use crate::policy::Policy;

    /// Sandboxes that run nothing: `sh -c CMD` prints CMD, `sh -c sleep` never ends,
    /// `sh -c flood` fills stdout past the limit, an interpreter prints its program.
    #[derive(Default)]
    struct Fake {
        created: Mutex<Vec<SandboxConfig>>,
        closed: Arc<Mutex<Vec<String>>>,
        abandoned_runs: Arc<AtomicUsize>,
    }

    struct FakeMachine {
        id: String,
        image: String,
        files: Mutex<HashMap<String, Vec<u8>>>,
        closed: Arc<Mutex<Vec<String>>>,
        abandoned_runs: Arc<AtomicUsize>,
    }

    /// Counts a run future dropped before it finished.
    struct Abandoned(Arc<AtomicUsize>, bool);

    impl Drop for Abandoned {
        fn drop(&mut self) {
            if !self.1 {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
    }

    impl Launcher for Fake {
        fn create(&self, config: SandboxConfig) -> BoxFuture<'_, Result<Arc<dyn Machine>, BackendError>> {
            let mut created = self.created.lock().unwrap();
            let machine: Arc<dyn Machine> = Arc::new(FakeMachine {
                id: format!("vm-{}", created.len()),
                image: config.image.clone(),
                files: Mutex::default(),
                closed: self.closed.clone(),
                abandoned_runs: self.abandoned_runs.clone(),
            });
            created.push(config);
            Box::pin(async move { Ok(machine) })
        }
    }

    impl Machine for FakeMachine {
        fn id(&self) -> &str {
            &self.id
        }
        fn image(&self) -> &str {
            &self.image
        }
        fn run(&self, command: Command, limit: usize) -> BoxFuture<'_, Result<Output, BackendError>> {
            Box::pin(async move {
                let mut guard = Abandoned(self.abandoned_runs.clone(), false);
                let printed = match command.argv[0].as_str() {
                    "sh" => command.argv[2].clone().into_bytes(),
                    _ => self.files.lock().unwrap().get(&command.argv[1]).cloned().unwrap_or_default(),
                };
                let output = match printed.as_slice() {
                    b"sleep" => std::future::pending().await,
                    b"flood" => Output { stdout: vec![b'x'; limit], stdout_dropped: 1000, ..Output::default() },
                    _ => Output { stdout: printed, stderr: b"err".to_vec(), exit_code: 3, ..Output::default() },
                };
                guard.1 = true;
                Ok(output)
            })
        }
        fn write_file<'a>(
            &'a self,
            path: &'a str,
            content: &'a [u8],
            _: u32,
        ) -> BoxFuture<'a, Result<(), BackendError>> {
            self.files.lock().unwrap().insert(path.to_owned(), content.to_vec());
            Box::pin(async { Ok(()) })
        }
        fn read_file<'a>(&'a self, path: &'a str) -> BoxFuture<'a, Result<Vec<u8>, BackendError>> {
            let found =
                self.files.lock().unwrap().get(path).cloned().ok_or_else(|| BackendError("no such file".into()));
            Box::pin(async move { found })
        }
        fn list_files<'a>(&'a self, _: &'a str) -> BoxFuture<'a, Result<Vec<FileEntry>, BackendError>> {
            let entries = self
                .files
                .lock()
                .unwrap()
                .iter()
                .map(|(name, c)| FileEntry { name: name.clone(), size: c.len() as u64, mode: 0o644, is_dir: false })
                .collect();
            Box::pin(async move { Ok(entries) })
        }
        fn close(&self) -> BoxFuture<'_, Result<(), BackendError>> {
            self.closed.lock().unwrap().push(self.id.clone());
            Box::pin(async { Ok(()) })
        }
    }

    fn policy() -> Policy {
        Policy {
            base: SandboxConfig::new("python:3.12".to_owned()),
            other_images: vec!["node:22".into()],
            max_sandboxes: 2,
            idle_timeout: Duration::from_secs(600),
            call_timeout: Duration::from_secs(30),
            max_output: 100,
        }
    }

    async fn connect(policy: Policy) -> (RunningService<RoleClient, ()>, Arc<Fake>, Arc<Sandboxes>) {
        let (server_end, client_end) = tokio::io::duplex(1 << 20);
        let fake = Arc::new(Fake::default());
        let sandboxes = Arc::new(Sandboxes::new(fake.clone(), Arc::new(policy)));
        let tools = Tools::new(sandboxes.clone());
        tokio::spawn(async move {
            let service = tools.serve(server_end).await.expect("server handshake");
            let _ = service.waiting().await;
        });
        let client = ().serve(client_end).await.expect("client handshake");
        (client, fake, sandboxes)
    }

    /// The result of a call, or the text of a tool error.
    async fn call(client: &RunningService<RoleClient, ()>, tool: &str, args: Value) -> Result<CallToolResult, String> {
        let Value::Object(args) = args else { panic!("arguments are an object") };
        let result = client
            .call_tool(CallToolRequestParams::new(tool.to_owned()).with_arguments(args))
            .await
            .unwrap_or_else(|e| panic!("{tool}: a protocol error, not a tool result: {e}"));
        if result.is_error == Some(true) {
            return Err(text(&result));
        }
        Ok(result)
    }

    fn text(result: &CallToolResult) -> String {
        match &result.content[0] {
            ContentBlock::Text(t) => t.text.clone(),
            other => panic!("{other:?}"),
        }
    }

    fn structured(result: &CallToolResult) -> &Value {
        result.structured_content.as_ref().expect("structured content")
    }

    #[tokio::test]
    async fn every_tool_is_listed_with_a_closed_schema() {
        let (client, _, _) = connect(policy()).await;
        let tools = client.list_all_tools().await.unwrap();
        let mut names: Vec<&str> = tools.iter().map(|t| t.name.as_ref()).collect();
        names.sort_unstable();
        assert_eq!(
            names,
            [
                "exec",
                "list_files",
                "read_file",
                "run_code",
                "sandbox_close",
                "sandbox_create",
                "sandbox_list",
                "write_file"
            ]
        );
        for tool in &tools {
            let schema = Value::Object((*tool.input_schema).clone());
            assert_eq!(schema["type"], "object", "{}", tool.name);
            if tool.name != "sandbox_list" {
                assert_eq!(schema["additionalProperties"], false, "{}: unknown arguments are refused", tool.name);
            }
            assert!(tool.description.as_ref().is_some_and(|d| d.len() > 40), "{} is described", tool.name);
        }
        let run_code = tools.iter().find(|t| t.name == "run_code").unwrap();
        let schema = Value::Object((*run_code.input_schema).clone());
        assert_eq!(schema["required"], serde_json::json!(["language", "code"]));
        client.cancel().await.unwrap();
    }

    #[tokio::test]
    async fn run_code_boots_a_fresh_sandbox_runs_the_program_and_closes_it() {
        let (client, fake, _) = connect(policy()).await;
        let result = call(&client, "run_code", json!({"language": "python", "code": "print('hi')"})).await.unwrap();
        let value = structured(&result);
        assert_eq!(value["stdout"], "print('hi')", "the interpreter got the program: {value}");
        assert_eq!((value["exit_code"].as_i64(), value["stderr"].as_str()), (Some(3), Some("err")));
        assert!(value.get("sandbox").is_none(), "a one-off sandbox is not offered for reuse");
        assert_eq!(fake.closed.lock().unwrap().as_slice(), ["vm-0"], "the one-off sandbox is closed");
        assert_eq!(fake.created.lock().unwrap()[0].image, "python:3.12");
        client.cancel().await.unwrap();
    }

    #[tokio::test]
    async fn a_sandbox_keeps_its_files_across_calls_until_closed() {
        let (client, fake, _) = connect(policy()).await;
        let created = call(&client, "sandbox_create", json!({"image": "node:22"})).await.unwrap();
        let id = structured(&created)["sandbox"].as_str().unwrap().to_owned();
        assert_eq!(structured(&created)["image"], "node:22");
        call(&client, "write_file", json!({"sandbox": id, "path": "/w/a.txt", "content": "hello"})).await.unwrap();
        let binary = call(
            &client,
            "write_file",
            json!({"sandbox": id, "path": "/w/b.bin", "content": B64.encode([0xff, 0, 1]), "encoding": "base64"}),
        )
        .await
        .unwrap();
        assert_eq!(structured(&binary)["bytes"], 3);
        let read = call(&client, "read_file", json!({"sandbox": id, "path": "/w/a.txt"})).await.unwrap();
        assert_eq!(
            (structured(&read)["content"].as_str(), structured(&read)["encoding"].as_str()),
            (Some("hello"), Some("text"))
        );
        let read = call(&client, "read_file", json!({"sandbox": id, "path": "/w/b.bin"})).await.unwrap();
        assert_eq!(structured(&read)["encoding"], "base64", "bytes that are not UTF-8 come back as base64");
        assert_eq!(B64.decode(structured(&read)["content"].as_str().unwrap()).unwrap(), [0xff, 0, 1]);
        let cut = call(&client, "read_file", json!({"sandbox": id, "path": "/w/a.txt", "max_bytes": 2})).await.unwrap();
        assert_eq!(
            (structured(&cut)["content"].as_str(), structured(&cut)["cut_bytes"].as_u64()),
            (Some("he"), Some(3))
        );
        let listed = call(&client, "list_files", json!({"sandbox": id, "path": "/w"})).await.unwrap();
        assert_eq!(structured(&listed)["entries"].as_array().unwrap().len(), 2);
        let ran = call(&client, "exec", json!({"sandbox": id, "command": "ls"})).await.unwrap();
        assert_eq!(structured(&ran)["sandbox"], id.as_str());
        let listed = call(&client, "sandbox_list", json!({})).await.unwrap();
        assert_eq!(structured(&listed)["sandboxes"][0]["sandbox"], id.as_str());
        assert!(fake.closed.lock().unwrap().is_empty(), "a created sandbox stays across calls");
        call(&client, "sandbox_close", json!({"sandbox": id})).await.unwrap();
        assert_eq!(fake.closed.lock().unwrap().as_slice(), [id.as_str()]);
        let gone = call(&client, "exec", json!({"sandbox": id, "command": "ls"})).await.unwrap_err();
        assert!(gone.contains("no sandbox"), "{gone}");
        client.cancel().await.unwrap();
    }

    #[tokio::test]
    async fn nothing_a_call_sends_widens_the_policy() {
        let (client, fake, _) = connect(policy()).await;
        let other_image = call(&client, "sandbox_create", json!({"image": "alpine"})).await.unwrap_err();
        assert!(other_image.contains("image alpine is not allowed"), "{other_image}");
        for (tool, args) in [
            ("sandbox_create", json!({"volumes": ["/etc:/host-etc"]})),
            ("run_code", json!({"language": "sh", "code": "true", "allow_hosts": ["evil.example"]})),
            ("exec", json!({"command": "env", "secrets": {"KEY": "value"}})),
            ("exec", json!({"command": "env", "image": "alpine"})),
            ("run_code", json!({"language": "cobol", "code": "x"})),
        ] {
            let refused = call(&client, tool, args.clone()).await.unwrap_err();
            assert!(
                refused.contains("unknown field") || refused.contains("unknown variant"),
                "{tool} {args}: {refused}"
            );
        }
        assert!(fake.created.lock().unwrap().is_empty(), "no refused call booted a sandbox");
        // The positive control: the allowed images boot.
        call(&client, "sandbox_create", json!({})).await.unwrap();
        call(&client, "sandbox_create", json!({"image": "node:22"})).await.unwrap();
        let third = call(&client, "sandbox_create", json!({})).await.unwrap_err();
        assert!(third.contains("too many sandboxes: 2 are open"), "{third}");
        let one_off = call(&client, "exec", json!({"command": "true"})).await.unwrap_err();
        assert!(one_off.contains("too many sandboxes"), "one-off runs count too: {one_off}");
        client.cancel().await.unwrap();
    }

    #[tokio::test]
    async fn output_past_the_bound_is_cut_with_a_note() {
        let (client, _, _) = connect(policy()).await;
        let result = call(&client, "exec", json!({"command": "flood"})).await.unwrap();
        assert_eq!(structured(&result)["stdout"].as_str().unwrap().len(), 100);
        assert_eq!(structured(&result)["stdout_dropped_bytes"], 1000);
        let text = text(&result);
        assert!(text.contains("[stdout cut: 1000 more bytes were dropped]"), "{text}");
        client.cancel().await.unwrap();
    }

    #[tokio::test]
    async fn a_cancelled_call_stops_its_command_and_the_end_closes_every_sandbox() {
        let (client, fake, sandboxes) = connect(policy()).await;
        let created = call(&client, "sandbox_create", json!({})).await.unwrap();
        let id = structured(&created)["sandbox"].as_str().unwrap().to_owned();
        let Value::Object(args) = json!({"sandbox": id, "command": "sleep"}) else { unreachable!() };
        let request =
            ClientRequest::CallToolRequest(Request::new(CallToolRequestParams::new("exec").with_arguments(args)));
        let mut options = PeerRequestOptions::no_options();
        options.timeout = Some(Duration::from_millis(300));
        let handle = client.send_cancellable_request(request, options).await.unwrap();
        assert!(handle.await_response().await.is_err(), "the client gave up");
        for _ in 0..100 {
            if fake.abandoned_runs.load(Ordering::SeqCst) == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(fake.abandoned_runs.load(Ordering::SeqCst), 1, "the cancellation reached the command");
        assert!(fake.closed.lock().unwrap().is_empty(), "cancelling a command keeps its sandbox");
        call(&client, "sandbox_create", json!({})).await.unwrap();
        sandboxes.close_all().await;
        let mut closed = fake.closed.lock().unwrap().clone();
        closed.sort();
        assert_eq!(closed, ["vm-0", "vm-1"]);
        client.cancel().await.unwrap();
    }

    #[tokio::test]
    async fn an_idle_sandbox_is_closed_and_a_busy_one_is_not() {
        let policy = Policy { idle_timeout: Duration::from_millis(50), ..policy() };
        let (client, fake, sandboxes) = connect(policy).await;
        let idle = call(&client, "sandbox_create", json!({})).await.unwrap();
        let busy = call(&client, "sandbox_create", json!({})).await.unwrap();
        let busy_id = structured(&busy)["sandbox"].as_str().unwrap().to_owned();
        let held = sandboxes.get(&busy_id).unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        sandboxes.close_idle().await;
        assert_eq!(fake.closed.lock().unwrap().as_slice(), [structured(&idle)["sandbox"].as_str().unwrap()]);
        drop(held);
        tokio::time::sleep(Duration::from_millis(100)).await;
        sandboxes.close_idle().await;
        assert_eq!(fake.closed.lock().unwrap().len(), 2, "once released and idle, it is closed too");
        client.cancel().await.unwrap();
    }
}
