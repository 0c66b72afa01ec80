//! The seam between the tools and the sandboxes: [`Launcher`] and [`Machine`], implemented
//! over the orchestration API by [`SandboxLauncher`] (and by a fake in the unit tests).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use matchlock_api::SandboxConfig;
use matchlock_image::Store;
use matchlock_protocol::exec::ExecMode;
use matchlock_protocol::files::FileEntry;
use matchlock_sandbox::logfile::Capped;
use matchlock_sandbox::{compose_exec, error_chain, Control, ExecIo, Sandbox, SandboxError};
use tokio::sync::{mpsc, RwLock};

/// A boxed future that may move between threads.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A failure of the sandbox layer, as its error chain.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BackendError(pub String);

impl From<SandboxError> for BackendError {
    fn from(e: SandboxError) -> Self {
        Self(error_chain(&e))
    }
}

/// A command to run in a sandbox.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Command {
    /// Program and arguments.
    pub argv: Vec<String>,
    /// Bytes on its stdin (none: stdin is empty).
    pub stdin: Option<Vec<u8>>,
    /// Working directory (none: the image's, else the workspace, else `/`).
    pub working_dir: Option<String>,
    /// After this long the command gets SIGTERM (SIGKILL 5 s later); its output so far is kept.
    pub time_limit: Option<Duration>,
}

/// What a command printed (each stream cut at the limit the caller gave) and its status.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Output {
    /// The exit code (128 + the signal when a signal ended it).
    pub exit_code: i32,
    /// The first bytes of stdout.
    pub stdout: Vec<u8>,
    /// The first bytes of stderr.
    pub stderr: Vec<u8>,
    /// Bytes of stdout beyond the limit, dropped.
    pub stdout_dropped: u64,
    /// Bytes of stderr beyond the limit, dropped.
    pub stderr_dropped: u64,
    /// Whether the time limit stopped it.
    pub timed_out: bool,
}

/// Boots sandboxes.
pub trait Launcher: Send + Sync {
    /// A running sandbox of `config`.
    fn create(&self, config: SandboxConfig) -> BoxFuture<'_, Result<Arc<dyn Machine>, BackendError>>;
}

/// A running sandbox. Dropping a future of [`Machine::run`] stops its command.
pub trait Machine: Send + Sync {
    /// The sandbox's id (`matchlock list` shows it).
    fn id(&self) -> &str;
    /// The image it booted from.
    fn image(&self) -> &str;
    /// Runs `command`, keeping at most `limit` bytes of each output stream.
    fn run(&self, command: Command, limit: usize) -> BoxFuture<'_, Result<Output, BackendError>>;
    /// Writes a file (parents created).
    fn write_file<'a>(&'a self, path: &'a str, content: &'a [u8], mode: u32)
        -> BoxFuture<'a, Result<(), BackendError>>;
    /// Reads a regular file.
    fn read_file<'a>(&'a self, path: &'a str) -> BoxFuture<'a, Result<Vec<u8>, BackendError>>;
    /// Lists a directory.
    fn list_files<'a>(&'a self, path: &'a str) -> BoxFuture<'a, Result<Vec<FileEntry>, BackendError>>;
    /// Stops the sandbox and removes it; waits for calls in flight, so cancel them first.
    fn close(&self) -> BoxFuture<'_, Result<(), BackendError>>;
}

/// Opens the image store, with the images the policy names already in it.
pub type OpenStore = dyn Fn() -> Result<Store, BackendError> + Send + Sync;

/// [`Launcher`] over [`Sandbox::create`].
pub struct SandboxLauncher {
    open_store: Box<OpenStore>,
}

impl std::fmt::Debug for SandboxLauncher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SandboxLauncher").finish_non_exhaustive()
    }
}

impl SandboxLauncher {
    /// Boots sandboxes from the store `open_store` opens.
    pub fn new(open_store: Box<OpenStore>) -> Self {
        Self { open_store }
    }
}

impl Launcher for SandboxLauncher {
    fn create(&self, config: SandboxConfig) -> BoxFuture<'_, Result<Arc<dyn Machine>, BackendError>> {
        Box::pin(async move {
            let image = Sandbox::resolve_image(&config, &(self.open_store)()?)?;
            let state = matchlock_sandbox::open_state()?;
            let sandbox = Box::pin(Sandbox::create_from(config, image, state)).await?;
            let machine: Arc<dyn Machine> = Arc::new(SandboxMachine {
                id: sandbox.id().to_owned(),
                image: sandbox.config().image.clone(),
                sandbox: RwLock::new(Some(sandbox)),
            });
            Ok(machine)
        })
    }
}

/// A [`Sandbox`] behind a lock: calls share it, `close` takes it.
struct SandboxMachine {
    id: String,
    image: String,
    sandbox: RwLock<Option<Sandbox>>,
}

fn closed() -> BackendError {
    BackendError("the sandbox is closed".into())
}

impl Machine for SandboxMachine {
    fn id(&self) -> &str {
        &self.id
    }

    fn image(&self) -> &str {
        &self.image
    }

    fn run(&self, command: Command, limit: usize) -> BoxFuture<'_, Result<Output, BackendError>> {
        Box::pin(async move {
            let guard = self.sandbox.read().await;
            let sandbox = guard.as_ref().ok_or_else(closed)?;
            let request = compose_exec(&sandbox.image().config, sandbox.config(), command.argv, command.working_dir)
                .map_err(|e| BackendError(e.to_string()))?
                .into_request(None);
            let limit = limit as u64;
            let mut stdout = Capped::new(Vec::new(), limit);
            let mut stderr = Capped::new(Vec::new(), limit);
            let (control_tx, control) = mpsc::channel(1);
            let (mode, stdin) = match command.stdin {
                Some(bytes) => {
                    let reader: Box<dyn tokio::io::AsyncRead + Unpin + Send> = Box::new(std::io::Cursor::new(bytes));
                    (ExecMode::Pipe, Some(reader))
                }
                None => (ExecMode::Stream, None),
            };
            let io = ExecIo { stdin, stdout: Box::new(&mut stdout), stderr: Box::new(&mut stderr), control };
            let mut timed_out = false;
            let exit_code = {
                let exec = sandbox.exec(mode, &request, io);
                tokio::pin!(exec);
                let limit = command.time_limit.unwrap_or(Duration::MAX);
                tokio::select! {
                    code = &mut exec => code?,
                    () = tokio::time::sleep(limit) => {
                        timed_out = true;
                        let _ = control_tx.send(Control::Terminate).await;
                        exec.await?
                    }
                }
            };
            Ok(Output {
                exit_code,
                timed_out,
                stdout_dropped: stdout.dropped(),
                stderr_dropped: stderr.dropped(),
                stdout: stdout.into_inner(),
                stderr: stderr.into_inner(),
            })
        })
    }

    fn write_file<'a>(
        &'a self,
        path: &'a str,
        content: &'a [u8],
        mode: u32,
    ) -> BoxFuture<'a, Result<(), BackendError>> {
        Box::pin(async move {
            let guard = self.sandbox.read().await;
            Ok(guard.as_ref().ok_or_else(closed)?.write_file(path, content, mode).await?)
        })
    }

    fn read_file<'a>(&'a self, path: &'a str) -> BoxFuture<'a, Result<Vec<u8>, BackendError>> {
        Box::pin(async move {
            let guard = self.sandbox.read().await;
            Ok(guard.as_ref().ok_or_else(closed)?.read_file(path).await?)
        })
    }

    fn list_files<'a>(&'a self, path: &'a str) -> BoxFuture<'a, Result<Vec<FileEntry>, BackendError>> {
        Box::pin(async move {
            let guard = self.sandbox.read().await;
            Ok(guard.as_ref().ok_or_else(closed)?.list_files(path).await?)
        })
    }

    fn close(&self) -> BoxFuture<'_, Result<(), BackendError>> {
        Box::pin(async move {
            let Some(sandbox) = self.sandbox.write().await.take() else { return Ok(()) };
            Ok(Box::pin(sandbox.close(true)).await?)
        })
    }
}
