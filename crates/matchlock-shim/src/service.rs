//! The containerd Task service: each container is one sandbox (a micro-VM booted at
//! Create from the container's rootfs), its init and `ctr task exec` processes are
//! commands in it. Every method of the Task API is answered; those we do not support
//! answer `UNIMPLEMENTED` (the generated default says `NOT_FOUND`, which containerd takes
//! for "no such task").

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use containerd_shim::asynchronous::publisher::RemotePublisher;
use containerd_shim::asynchronous::ExitSignal;
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::{MessageDyn, MessageField};
use containerd_shim::TtrpcResult;
use containerd_shim_protos::api::{self, Status};
use containerd_shim_protos::events::task as ev;
use containerd_shim_protos::shim_async::Task;
use containerd_shim_protos::topics;
use containerd_shim_protos::ttrpc::r#async::TtrpcContext;
use containerd_shim_protos::ttrpc::{self, Code};
use matchlock_api::SandboxConfig;
use matchlock_protocol::exec::WindowSize;
use matchlock_sandbox::{error_chain as chain, Control, ExecIo, Sandbox};
use tokio::sync::{mpsc, watch, Mutex};

use crate::rootfs::{self, Rootfs};
use crate::spec::{self, ProcessPlan};
use crate::{guest, stdio};

/// The file in the bundle naming the VM of the container (for `delete` after a crash).
pub const VM_ID_FILE: &str = "matchlock-vm-id";
/// The file in the bundle naming a rootfs image only this container uses.
pub const PRIVATE_ROOTFS_FILE: &str = "matchlock-rootfs";
/// Where a pod's containers' root file systems live in the pod's VM.
const POD_CONTAINERS: &str = "/run/matchlock/containers";
/// The guest's `PATH` for a process whose environment has none.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// How long the processes left when the init exits get to die before the VM stops.
const EXEC_KILL_WAIT: Duration = Duration::from_secs(5);
/// How long the guest has to deliver a SIGKILL to the init before its VM is killed.
const KILL_DEADLINE: Duration = Duration::from_secs(5);
/// How often the guest's OOM kill count is read.
const OOM_POLL: Duration = Duration::from_secs(2);

fn status(code: Code, message: impl Into<String>) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, message.into()))
}

fn not_found(what: impl std::fmt::Display) -> ttrpc::Error {
    status(Code::NOT_FOUND, format!("{what}: not found"))
}

fn now() -> Timestamp {
    containerd_shim::util::timestamp().unwrap_or_default()
}

/// How a process ended.
#[derive(Debug, Clone)]
struct Exit {
    code: u32,
    at: Timestamp,
}

/// One process of a container.
#[derive(Debug)]
struct Proc {
    plan: ProcessPlan,
    stdin: String,
    stdout: String,
    stderr: String,
    terminal: bool,
    started: bool,
    /// Out-of-band requests while it runs.
    control: Option<mpsc::Sender<Control>>,
    stdin_closer: Option<stdio::StdinCloser>,
    exit_tx: watch::Sender<Option<Exit>>,
    /// Its runner, while it runs.
    runner: Option<tokio::task::JoinHandle<()>>,
}

impl Proc {
    fn new(plan: ProcessPlan, stdin: String, stdout: String, stderr: String, terminal: bool) -> Self {
        Self {
            plan,
            stdin,
            stdout,
            stderr,
            terminal,
            started: false,
            control: None,
            stdin_closer: None,
            exit_tx: watch::channel(None).0,
            runner: None,
        }
    }

    fn exit(&self) -> Option<Exit> {
        self.exit_tx.borrow().clone()
    }

    fn status(&self, paused: bool) -> Status {
        match (self.exit(), self.started) {
            (Some(_), _) => Status::STOPPED,
            (None, false) => Status::CREATED,
            (None, true) if paused => Status::PAUSED,
            (None, true) => Status::RUNNING,
        }
    }
}

/// One container: its sandbox and processes.
#[derive(Debug)]
struct Container {
    bundle: PathBuf,
    /// Its image in our store (a pod's containers have none: their tree is in the pod's VM).
    rootfs: Option<Rootfs>,
    /// The pod whose VM it runs in, for a pod's container.
    pod: Option<String>,
    /// Its `dev.matchlock.*` annotations (a pod's containers may carry the pod's).
    policy: std::collections::BTreeMap<String, String>,
    /// A pod's container's volumes: their guest paths in the pod's workspace.
    volumes: Vec<String>,
    config: SandboxConfig,
    /// Until the init exits (then the VM is stopped).
    sandbox: Option<Arc<Sandbox>>,
    init: Proc,
    execs: HashMap<String, Proc>,
    paused: bool,
    /// The guest's OOM kills reported so far.
    oom_kills: Arc<std::sync::atomic::AtomicU64>,
}

impl Container {
    fn process(&self, exec_id: &str) -> TtrpcResult<&Proc> {
        if exec_id.is_empty() {
            return Ok(&self.init);
        }
        self.execs.get(exec_id).ok_or_else(|| not_found(format!("exec {exec_id}")))
    }

    fn process_mut(&mut self, exec_id: &str) -> TtrpcResult<&mut Proc> {
        if exec_id.is_empty() {
            return Ok(&mut self.init);
        }
        self.execs.get_mut(exec_id).ok_or_else(|| not_found(format!("exec {exec_id}")))
    }

    /// Stops serving a pod's container's volumes in the pod's VM.
    fn release_volumes(&mut self) {
        if let Some(sandbox) = &self.sandbox {
            for volume in self.volumes.drain(..) {
                sandbox.remove_volume(&volume);
            }
        }
    }

    fn sandbox(&self) -> TtrpcResult<Arc<Sandbox>> {
        self.sandbox.clone().ok_or_else(|| status(Code::FAILED_PRECONDITION, "the container has stopped"))
    }
}

/// Where events go: containerd, or (in tests) a channel.
#[derive(Clone)]
pub enum Publisher {
    /// containerd's event service, through the address it gave at start.
    Remote(Arc<RemotePublisher>),
    /// Topics and events, for tests.
    Channel(mpsc::UnboundedSender<(String, Box<dyn MessageDyn>)>),
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Remote(_) => "Publisher::Remote",
            Self::Channel(_) => "Publisher::Channel",
        })
    }
}

/// The state the service's methods share.
struct Shared {
    namespace: String,
    publisher: Publisher,
    exit: Arc<ExitSignal>,
    store_root: PathBuf,
    containers: Mutex<HashMap<String, Container>>,
}

/// The Task service of one shim process.
#[derive(Clone)]
pub struct Service {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service").field("namespace", &self.shared.namespace).finish_non_exhaustive()
    }
}

impl Service {
    /// A service for containerd namespace `namespace` whose images live in `store_root`;
    /// `exit` is signalled when containerd shuts the shim down.
    pub fn new(namespace: &str, publisher: Publisher, exit: Arc<ExitSignal>, store_root: PathBuf) -> Self {
        Self {
            shared: Arc::new(Shared {
                namespace: namespace.to_owned(),
                publisher,
                exit,
                store_root,
                containers: Mutex::new(HashMap::new()),
            }),
        }
    }

    async fn publish(&self, topic: &str, event: Box<dyn MessageDyn>) {
        match &self.shared.publisher {
            Publisher::Remote(remote) => {
                let ctx = ttrpc::context::with_timeout(0);
                if let Err(e) = remote.publish(ctx, topic, &self.shared.namespace, event).await {
                    tracing::warn!("cannot publish {topic}: {e}");
                }
            }
            Publisher::Channel(tx) => {
                let _ = tx.send((topic.to_owned(), event));
            }
        }
    }

    /// Boots the sandbox of a new container, or installs a pod's container in its pod's VM.
    async fn create_container(&self, req: &api::CreateTaskRequest) -> Result<Container, String> {
        if !req.checkpoint.is_empty() || !req.parent_checkpoint.is_empty() {
            return Err("restoring from a checkpoint is not supported by the matchlock runtime".into());
        }
        let bundle = PathBuf::from(&req.bundle);
        let spec = spec::load(&bundle).map_err(|e| chain(&e))?;
        for uri in [&req.stdin, &req.stdout, &req.stderr] {
            check_stdio(uri)?;
        }
        if let spec::Role::Member(pod) = spec::role(&spec) {
            return self.create_member(req, &spec, bundle, pod).await;
        }
        // Everything the spec asks is checked before the rootfs is copied.
        let mut plan = spec::plan(&req.id, &spec).map_err(|e| chain(&e))?;
        let entry = entry_of(&plan.init);
        let rootfs = rootfs::prepare(&self.shared.store_root, &req.rootfs, &bundle, &req.id, &entry)
            .await
            .map_err(|e| chain(&e))?;
        if rootfs.private {
            write_marker(&bundle, PRIVATE_ROOTFS_FILE, &rootfs.tag)?;
        }
        plan.config.image.clone_from(&rootfs.tag);
        let booted = async {
            let sandbox = boot(plan.config.clone(), self.shared.store_root.clone()).await?;
            if let Err(e) = write_marker(&bundle, VM_ID_FILE, sandbox.id()) {
                close_sandbox(sandbox).await;
                return Err(e);
            }
            Ok(sandbox)
        }
        .await;
        let sandbox = match booted {
            Ok(b) => b,
            Err(e) => {
                discard_rootfs(&self.shared.store_root, &bundle, &rootfs);
                return Err(e);
            }
        };
        tracing::info!("container {} is sandbox {}", req.id, sandbox.id());
        let init = Proc::new(plan.init, req.stdin.clone(), req.stdout.clone(), req.stderr.clone(), req.terminal);
        Ok(Container {
            bundle,
            rootfs: Some(rootfs),
            pod: None,
            policy: spec::policy_annotations(&spec),
            volumes: Vec::new(),
            config: plan.config,
            sandbox: Some(Arc::new(sandbox)),
            init,
            execs: HashMap::new(),
            paused: false,
            oom_kills: Arc::default(),
        })
    }

    /// A pod's container: its rootfs is unpacked into the pod's VM (under
    /// [`POD_CONTAINERS`]/<id>/rootfs) and its processes run there as their root.
    async fn create_member(
        &self,
        req: &api::CreateTaskRequest,
        spec: &oci_spec::runtime::Spec,
        bundle: PathBuf,
        pod: String,
    ) -> Result<Container, String> {
        let valid_id = !req.id.is_empty()
            && req.id.len() <= 128
            && req.id.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
            && !req.id.starts_with('.');
        if !valid_id {
            return Err(format!("container id {:?}: a pod's container needs letters, digits, '_', '.', '-'", req.id));
        }
        let (sandbox, config, policy) = {
            let containers = self.shared.containers.lock().await;
            let owner = containers
                .get(&pod)
                .filter(|c| c.pod.is_none())
                .ok_or_else(|| format!("the pod {pod} has no sandbox in this shim"))?;
            let sandbox = owner.sandbox.clone().ok_or_else(|| format!("the pod {pod} has stopped"))?;
            (sandbox, owner.config.clone(), owner.policy.clone())
        };
        let root = format!("{POD_CONTAINERS}/{}/rootfs", req.id);
        let member = spec::member_plan(&req.id, spec, &config, &policy, &root).map_err(|e| chain(&e))?;
        // The values of the pod's secrets that this container holds go to the host's engine.
        for (name, value) in &member.secret_values {
            sandbox.set_secret_value(name, value).map_err(|e| chain(&e))?;
        }
        let plan = member.init;
        let volumes: Vec<String> = member.volumes.iter().map(|v| v.guest_path.clone()).collect();
        let unpacked = async {
            for volume in &member.volumes {
                sandbox.add_volume(volume).map_err(|e| chain(&e))?;
            }
            let tmp = matchlock_image::Store::open(&self.shared.store_root).map_err(|e| chain(&e))?.tmp_dir();
            let tar = rootfs::pack(&req.rootfs, &bundle, &entry_of(&plan), &root, &tmp).await.map_err(|e| chain(&e))?;
            let conn = sandbox.connect(matchlock_protocol::EXEC_PORT).await.map_err(|e| chain(&e))?;
            matchlock_sandbox::commit::apply_layer(conn, tar.path()).await.map_err(|e| chain(&e))
        };
        if let Err(e) = unpacked.await {
            for volume in &volumes {
                sandbox.remove_volume(volume);
            }
            return Err(e);
        }
        tracing::info!("container {} runs in pod {pod} (sandbox {})", req.id, sandbox.id());
        let init = Proc::new(plan, req.stdin.clone(), req.stdout.clone(), req.stderr.clone(), req.terminal);
        Ok(Container {
            bundle,
            rootfs: None,
            pod: Some(pod),
            policy,
            volumes,
            config,
            sandbox: Some(sandbox),
            init,
            execs: HashMap::new(),
            paused: false,
            oom_kills: Arc::default(),
        })
    }

    /// Starts process `exec_id` ("" for the init) of container `id`.
    async fn start_process(&self, id: &str, exec_id: &str) -> TtrpcResult<u32> {
        let mut containers = self.shared.containers.lock().await;
        let container = containers.get_mut(id).ok_or_else(|| not_found(format!("container {id}")))?;
        let sandbox = container.sandbox()?;
        let proc = container.process_mut(exec_id)?;
        if proc.started || proc.exit().is_some() {
            return Err(status(Code::FAILED_PRECONDITION, format!("process {id}/{exec_id} was already started")));
        }
        let stdin = stdio::input(&proc.stdin).map_err(|e| status(Code::INVALID_ARGUMENT, chain(&e)))?;
        let stdio_err = |e: stdio::StdioError| status(Code::INVALID_ARGUMENT, chain(&e));
        let (stdout, stderr, logger) = if stdio::is_binary(&proc.stdout) {
            let namespace = &self.shared.namespace;
            let ((stdout, stderr), logger) =
                stdio::LoggingBinary::start(&proc.stdout, id, namespace).await.map_err(stdio_err)?;
            (stdout, stderr, Some(logger))
        } else {
            let stdout = stdio::output(&proc.stdout).await.map_err(stdio_err)?;
            let stderr: Box<dyn tokio::io::AsyncWrite + Unpin + Send> = if proc.terminal {
                Box::new(tokio::io::sink())
            } else {
                stdio::output(&proc.stderr).await.map_err(stdio_err)?
            };
            (stdout, stderr, None)
        };
        let (control_tx, control_rx) = mpsc::channel(16);
        let (reader, closer) = match stdin {
            Some(s) => (Some(s.reader), Some(s.closer)),
            None => (None, None),
        };
        proc.stdin_closer = closer;
        proc.control = Some(control_tx);
        proc.started = true;
        let plan = proc.plan.clone();
        let exit_tx = proc.exit_tx.clone();
        let service = self.clone();
        let (id_owned, exec_owned) = (id.to_owned(), exec_id.to_owned());
        // Its exit is reported after its start, however fast it ends (as containerd's own
        // shims hold exits until the start event is out).
        let (start_published, start_was_published) = tokio::sync::oneshot::channel::<()>();
        proc.runner = Some(tokio::spawn(async move {
            let io = ExecIo { stdin: reader, stdout, stderr, control: control_rx };
            let code = match sandbox.exec(plan.mode, &plan.request, io).await {
                Ok(code) => u32::try_from(code).unwrap_or(255),
                Err(e) => {
                    tracing::warn!("process {id_owned}/{exec_owned}: {}", chain(&e));
                    // As a process killed by SIGKILL (the VM or its connection went away).
                    137
                }
            };
            drop(sandbox);
            if let Some(logger) = logger {
                logger.finish().await;
            }
            let _ = start_was_published.await;
            service.process_exited(&id_owned, &exec_owned, code, exit_tx).await;
        }));
        let pid = std::process::id();
        if exec_id.is_empty() {
            let sandbox = container.sandbox()?;
            // The VM's watchers belong to its owner (a pod's containers share the pod's VM).
            let owns_vm = container.pod.is_none();
            if owns_vm {
                tokio::spawn(self.clone().watch_oom(id.to_owned(), Arc::downgrade(&sandbox)));
            }
            if let Some(netns) = container.config.network.as_ref().and_then(|n| n.netns.clone()).filter(|_| owns_vm) {
                tokio::spawn(crate::ingress::mirror(Arc::downgrade(&sandbox), netns.into()));
            }
            drop(containers);
            self.publish(
                topics::TASK_START_EVENT_TOPIC,
                Box::new(ev::TaskStart { container_id: id.to_owned(), pid, ..Default::default() }),
            )
            .await;
            let _ = start_published.send(());
        } else {
            drop(containers);
            self.publish(
                topics::TASK_EXEC_STARTED_EVENT_TOPIC,
                Box::new(ev::TaskExecStarted {
                    container_id: id.to_owned(),
                    exec_id: exec_id.to_owned(),
                    pid,
                    ..Default::default()
                }),
            )
            .await;
            let _ = start_published.send(());
        }
        Ok(pid)
    }

    /// Records a process's exit; the init's exit stops the VM first (the container ends
    /// with it, as its PID namespace would).
    async fn process_exited(&self, id: &str, exec_id: &str, code: u32, exit_tx: watch::Sender<Option<Exit>>) {
        if exec_id.is_empty() {
            // An init killed by the OOM killer ends the VM before the next poll: ask now.
            let sandbox = self.shared.containers.lock().await.get(id).and_then(|c| c.sandbox.clone());
            if let Some(sandbox) = sandbox.filter(|_| code == 128 + 9) {
                self.check_oom(id, &sandbox).await;
            }
            self.stop_vm(id).await;
        }
        let at = now();
        exit_tx.send_replace(Some(Exit { code, at: at.clone() }));
        if let Some(c) = self.shared.containers.lock().await.get_mut(id) {
            if let Ok(p) = c.process_mut(exec_id) {
                p.control = None;
                p.stdin_closer = None;
            }
        }
        self.publish(
            topics::TASK_EXIT_EVENT_TOPIC,
            Box::new(ev::TaskExit {
                container_id: id.to_owned(),
                id: if exec_id.is_empty() { id.to_owned() } else { exec_id.to_owned() },
                pid: std::process::id(),
                exit_status: code,
                exited_at: MessageField::some(at),
                ..Default::default()
            }),
        )
        .await;
    }

    /// Ends every other process of container `id`; then, when the VM is its own (alone, or
    /// a pod's sandbox), every process of the pod's containers, and stops and removes the VM.
    async fn stop_vm(&self, id: &str) {
        let (sandbox, runners) = {
            let mut containers = self.shared.containers.lock().await;
            let Some(owns_vm) = containers.get(id).map(|c| c.pod.is_none()) else { return };
            let mut runners = Vec::new();
            let mut sandbox = None;
            for (cid, c) in containers.iter_mut() {
                let is_self = cid == id;
                let is_member = owns_vm && c.pod.as_deref() == Some(id);
                if !is_self && !is_member {
                    continue;
                }
                let init = (!is_self).then_some(&mut c.init);
                for p in init.into_iter().chain(c.execs.values_mut()) {
                    if let Some(control) = &p.control {
                        let _ = control.try_send(Control::Signal(9));
                    }
                    runners.extend(p.runner.take());
                }
                if c.paused {
                    if let Some(s) = &c.sandbox {
                        let _ = s.resume().await;
                    }
                    c.paused = false;
                }
                // A pod's container lets go of the pod's VM; the owner closes it.
                c.release_volumes();
                let held = c.sandbox.take();
                if is_self && owns_vm {
                    sandbox = held;
                }
            }
            (sandbox, runners)
        };
        for runner in runners {
            let _ = tokio::time::timeout(EXEC_KILL_WAIT, runner).await;
        }
        if let Some(sandbox) = sandbox {
            close_shared(sandbox).await;
        }
    }

    /// Publishes TaskOOM whenever the guest's OOM killer strikes, while the init runs.
    async fn watch_oom(self, id: String, sandbox: std::sync::Weak<Sandbox>) {
        loop {
            tokio::time::sleep(OOM_POLL).await;
            let Some(sandbox) = sandbox.upgrade() else { return };
            let paused = self.shared.containers.lock().await.get(&id).is_none_or(|c| c.paused);
            if !paused {
                self.check_oom(&id, &sandbox).await;
            }
        }
    }

    /// Publishes TaskOOM if the guest's OOM killer struck since the last check.
    async fn check_oom(&self, id: &str, sandbox: &Sandbox) {
        let Ok(Ok(kills)) = tokio::time::timeout(OOM_POLL, guest::oom_kills(sandbox)).await else { return };
        let Some(seen) = self.shared.containers.lock().await.get(id).map(|c| Arc::clone(&c.oom_kills)) else { return };
        if seen.fetch_max(kills, std::sync::atomic::Ordering::SeqCst) < kills {
            self.publish(
                topics::TASK_OOM_EVENT_TOPIC,
                Box::new(ev::TaskOOM { container_id: id.to_owned(), ..Default::default() }),
            )
            .await;
        }
    }
}

/// What must exist in the rootfs for `process` to start.
fn entry_of(process: &ProcessPlan) -> rootfs::Entry {
    let request = &process.request;
    rootfs::Entry {
        program: request.argv[0].clone(),
        path: request
            .env
            .iter()
            .rev()
            .find(|(k, _)| k == "PATH")
            .map_or_else(|| DEFAULT_PATH.to_owned(), |(_, v)| v.clone()),
        cwd: request.working_dir.clone().unwrap_or_else(|| "/".into()),
    }
}

/// Boots a sandbox. The creation holds the image store (not `Sync`) across its awaits, so
/// it runs on a blocking thread of the runtime; what it spawns runs on the runtime as usual.
async fn boot(config: SandboxConfig, store_root: PathBuf) -> Result<Sandbox, String> {
    let runtime = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || {
        runtime.block_on(async {
            let store = matchlock_image::Store::open(&store_root).map_err(|e| chain(&e))?;
            let state = matchlock_sandbox::open_state().map_err(|e| chain(&e))?;
            Sandbox::create(config, &store, state).await.map_err(|e| chain(&e))
        })
    })
    .await
    .map_err(|e| format!("the sandbox's creation did not finish: {e}"))?
}

/// Stops a sandbox once the calls still using it (a Stats, a runner given up on) let go.
async fn close_shared(mut sandbox: Arc<Sandbox>) {
    for _ in 0..100 {
        match Arc::try_unwrap(sandbox) {
            Ok(s) => return close_sandbox(s).await,
            Err(shared) => sandbox = shared,
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tracing::error!("sandbox {} is still in use after 10 s: left for `matchlock gc`", sandbox.id());
}

/// Stops a sandbox and removes it (its state row and directory).
async fn close_sandbox(sandbox: Sandbox) {
    let id = sandbox.id().to_owned();
    if let Err(e) = sandbox.close(true).await {
        tracing::warn!("closing sandbox {id}: {}", chain(&e));
    }
}

fn write_marker(bundle: &Path, name: &str, value: &str) -> Result<(), String> {
    std::fs::write(bundle.join(name), value).map_err(|e| format!("cannot write {}: {e}", bundle.join(name).display()))
}

fn discard_rootfs(store_root: &Path, bundle: &Path, rootfs: &Rootfs) {
    if let Err(e) = rootfs::remove(store_root, rootfs) {
        tracing::warn!("removing the rootfs image {}: {}", rootfs.tag, chain(&e));
    }
    let _ = std::fs::remove_file(bundle.join(PRIVATE_ROOTFS_FILE));
}

fn check_stdio(uri: &str) -> Result<(), String> {
    let known = ["fifo://", "file://", "binary://"];
    if uri.is_empty() || uri.starts_with('/') || known.iter().any(|k| uri.starts_with(k)) {
        Ok(())
    } else {
        Err(format!("stdio {uri:?} is not supported by the matchlock runtime (FIFOs, file:// and binary:// are)"))
    }
}

fn unimplemented(what: &str) -> ttrpc::Error {
    status(Code::UNIMPLEMENTED, format!("{what} is not supported by the matchlock runtime"))
}

#[async_trait]
impl Task for Service {
    async fn create(&self, _ctx: &TtrpcContext, req: api::CreateTaskRequest) -> TtrpcResult<api::CreateTaskResponse> {
        if self.shared.containers.lock().await.contains_key(&req.id) {
            return Err(status(Code::ALREADY_EXISTS, format!("container {} already exists", req.id)));
        }
        let container = self.create_container(&req).await.map_err(|e| status(Code::FAILED_PRECONDITION, e))?;
        let mut containers = self.shared.containers.lock().await;
        if containers.contains_key(&req.id) {
            drop(containers);
            let (sandbox, rootfs, bundle) = (container.sandbox, container.rootfs, container.bundle);
            if let Some(s) = sandbox {
                close_shared(s).await;
            }
            if let Some(rootfs) = &rootfs {
                discard_rootfs(&self.shared.store_root, &bundle, rootfs);
            }
            return Err(status(Code::ALREADY_EXISTS, format!("container {} already exists", req.id)));
        }
        containers.insert(req.id.clone(), container);
        drop(containers);
        let pid = std::process::id();
        self.publish(
            topics::TASK_CREATE_EVENT_TOPIC,
            Box::new(ev::TaskCreate {
                container_id: req.id.clone(),
                bundle: req.bundle.clone(),
                rootfs: req.rootfs.clone(),
                io: MessageField::some(ev::TaskIO {
                    stdin: req.stdin.clone(),
                    stdout: req.stdout.clone(),
                    stderr: req.stderr.clone(),
                    terminal: req.terminal,
                    ..Default::default()
                }),
                pid,
                ..Default::default()
            }),
        )
        .await;
        Ok(api::CreateTaskResponse { pid, ..Default::default() })
    }

    async fn start(&self, _ctx: &TtrpcContext, req: api::StartRequest) -> TtrpcResult<api::StartResponse> {
        let pid = self.start_process(&req.id, &req.exec_id).await?;
        Ok(api::StartResponse { pid, ..Default::default() })
    }

    async fn state(&self, _ctx: &TtrpcContext, req: api::StateRequest) -> TtrpcResult<api::StateResponse> {
        let containers = self.shared.containers.lock().await;
        let c = containers.get(&req.id).ok_or_else(|| not_found(format!("container {}", req.id)))?;
        let p = c.process(&req.exec_id)?;
        let exit = p.exit();
        Ok(api::StateResponse {
            id: if req.exec_id.is_empty() { req.id.clone() } else { req.exec_id.clone() },
            bundle: c.bundle.display().to_string(),
            pid: std::process::id(),
            status: p.status(c.paused).into(),
            stdin: p.stdin.clone(),
            stdout: p.stdout.clone(),
            stderr: p.stderr.clone(),
            terminal: p.terminal,
            exit_status: exit.as_ref().map_or(0, |e| e.code),
            exited_at: exit.map(|e| e.at).into(),
            exec_id: req.exec_id.clone(),
            ..Default::default()
        })
    }

    async fn wait(&self, _ctx: &TtrpcContext, req: api::WaitRequest) -> TtrpcResult<api::WaitResponse> {
        let mut rx = {
            let containers = self.shared.containers.lock().await;
            let c = containers.get(&req.id).ok_or_else(|| not_found(format!("container {}", req.id)))?;
            c.process(&req.exec_id)?.exit_tx.subscribe()
        };
        let exit = rx
            .wait_for(Option::is_some)
            .await
            .map_err(|_| status(Code::UNAVAILABLE, "the process was deleted before it exited"))?
            .clone()
            .expect("waited for an exit");
        Ok(api::WaitResponse { exit_status: exit.code, exited_at: MessageField::some(exit.at), ..Default::default() })
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<api::Empty> {
        let signal = u8::try_from(req.signal)
            .ok()
            .filter(|s| (1..=64).contains(s))
            .ok_or_else(|| status(Code::INVALID_ARGUMENT, format!("invalid signal {}", req.signal)))?;
        let containers = self.shared.containers.lock().await;
        let c = containers.get(&req.id).ok_or_else(|| not_found(format!("container {}", req.id)))?;
        let p = c.process(&req.exec_id)?;
        if p.exit().is_some() {
            return Err(not_found(format!("process {}/{} (it has already exited)", req.id, req.exec_id)));
        }
        match &p.control {
            Some(control) => {
                // Every process of a container gets it when `all` (an exec'd process runs in
                // its own namespace in the guest, so the init's group is not enough).
                let mut targets = vec![control.clone()];
                if req.all && req.exec_id.is_empty() {
                    targets.extend(c.execs.values().filter_map(|e| e.control.clone()));
                }
                let unanswered = (signal == 9 && req.exec_id.is_empty())
                    .then(|| c.sandbox.as_ref().map(|s| (Arc::downgrade(s), p.exit_tx.subscribe())))
                    .flatten();
                drop(containers);
                for t in targets {
                    let _ = t.send(Control::Signal(signal)).await;
                }
                if let Some((sandbox, mut exited)) = unanswered {
                    // SIGKILL goes through the guest; a guest too busy to deliver it (thrashing,
                    // hung) has its VM killed instead, so the container ends all the same.
                    tokio::spawn(async move {
                        if tokio::time::timeout(KILL_DEADLINE, exited.wait_for(Option::is_some)).await.is_err() {
                            if let Some(sandbox) = sandbox.upgrade() {
                                tracing::warn!(
                                    "the guest did not deliver SIGKILL in {} s: its VM is killed",
                                    KILL_DEADLINE.as_secs()
                                );
                                sandbox.kill_machine();
                            }
                        }
                    });
                }
            }
            None if !p.started => {
                // Killed before it started: it ends as if the signal had killed it.
                let exit_tx = p.exit_tx.clone();
                drop(containers);
                self.process_exited(&req.id, &req.exec_id, 128 + u32::from(signal), exit_tx).await;
            }
            None => {}
        }
        Ok(api::Empty::new())
    }

    async fn delete(&self, _ctx: &TtrpcContext, req: api::DeleteRequest) -> TtrpcResult<api::DeleteResponse> {
        let mut containers = self.shared.containers.lock().await;
        let c = containers.get_mut(&req.id).ok_or_else(|| not_found(format!("container {}", req.id)))?;
        let p = c.process(&req.exec_id)?;
        let exit = match (p.exit(), p.started) {
            (Some(exit), _) => exit,
            (None, false) => Exit { code: 0, at: now() },
            (None, true) => {
                return Err(status(Code::FAILED_PRECONDITION, format!("process {}/{} is running", req.id, req.exec_id)))
            }
        };
        let pid = std::process::id();
        if !req.exec_id.is_empty() {
            c.execs.remove(&req.exec_id);
            return Ok(api::DeleteResponse {
                pid,
                exit_status: exit.code,
                exited_at: MessageField::some(exit.at),
                ..Default::default()
            });
        }
        let mut c = containers.remove(&req.id).expect("looked up");
        drop(containers);
        c.release_volumes();
        if let Some(s) = c.sandbox {
            close_shared(s).await;
        }
        if let Some(rootfs) = &c.rootfs {
            discard_rootfs(&self.shared.store_root, &c.bundle, rootfs);
        }
        let _ = std::fs::remove_file(c.bundle.join(VM_ID_FILE));
        self.publish(
            topics::TASK_DELETE_EVENT_TOPIC,
            Box::new(ev::TaskDelete {
                container_id: req.id.clone(),
                id: req.id.clone(),
                pid,
                exit_status: exit.code,
                exited_at: MessageField::some(exit.at.clone()),
                ..Default::default()
            }),
        )
        .await;
        Ok(api::DeleteResponse {
            pid,
            exit_status: exit.code,
            exited_at: MessageField::some(exit.at),
            ..Default::default()
        })
    }

    async fn exec(&self, _ctx: &TtrpcContext, req: api::ExecProcessRequest) -> TtrpcResult<api::Empty> {
        let mut containers = self.shared.containers.lock().await;
        let c = containers.get_mut(&req.id).ok_or_else(|| not_found(format!("container {}", req.id)))?;
        c.sandbox()?;
        if req.exec_id.is_empty() || c.execs.contains_key(&req.exec_id) {
            return Err(status(Code::ALREADY_EXISTS, format!("exec {} already exists", req.exec_id)));
        }
        let value = req.spec.as_ref().map(|a| a.value.as_slice()).unwrap_or_default();
        let process: oci_spec::runtime::Process = serde_json::from_slice(value)
            .map_err(|e| status(Code::INVALID_ARGUMENT, format!("the exec's process spec: {e}")))?;
        let mut plan =
            spec::process_plan(&process, &c.config).map_err(|e| status(Code::INVALID_ARGUMENT, chain(&e)))?;
        // A pod's container's processes all run in its own root, with its volumes.
        plan.request.root.clone_from(&c.init.plan.request.root);
        plan.request.binds.clone_from(&c.init.plan.request.binds);
        for uri in [&req.stdin, &req.stdout, &req.stderr] {
            check_stdio(uri).map_err(|e| status(Code::INVALID_ARGUMENT, e))?;
        }
        let proc = Proc::new(plan, req.stdin.clone(), req.stdout.clone(), req.stderr.clone(), req.terminal);
        c.execs.insert(req.exec_id.clone(), proc);
        drop(containers);
        self.publish(
            topics::TASK_EXEC_ADDED_EVENT_TOPIC,
            Box::new(ev::TaskExecAdded {
                container_id: req.id.clone(),
                exec_id: req.exec_id.clone(),
                ..Default::default()
            }),
        )
        .await;
        Ok(api::Empty::new())
    }

    async fn resize_pty(&self, _ctx: &TtrpcContext, req: api::ResizePtyRequest) -> TtrpcResult<api::Empty> {
        let containers = self.shared.containers.lock().await;
        let c = containers.get(&req.id).ok_or_else(|| not_found(format!("container {}", req.id)))?;
        let p = c.process(&req.exec_id)?;
        if !p.terminal {
            return Err(status(Code::FAILED_PRECONDITION, "the process has no terminal"));
        }
        let window = WindowSize {
            rows: u16::try_from(req.height).unwrap_or(u16::MAX),
            cols: u16::try_from(req.width).unwrap_or(u16::MAX),
        };
        if let Some(control) = p.control.clone() {
            drop(containers);
            let _ = control.send(Control::Resize(window)).await;
        }
        Ok(api::Empty::new())
    }

    async fn close_io(&self, _ctx: &TtrpcContext, req: api::CloseIORequest) -> TtrpcResult<api::Empty> {
        let mut containers = self.shared.containers.lock().await;
        let c = containers.get_mut(&req.id).ok_or_else(|| not_found(format!("container {}", req.id)))?;
        let p = c.process_mut(&req.exec_id)?;
        if req.stdin {
            if let Some(closer) = p.stdin_closer.as_mut() {
                closer.close();
            }
        }
        Ok(api::Empty::new())
    }

    async fn pids(&self, _ctx: &TtrpcContext, req: api::PidsRequest) -> TtrpcResult<api::PidsResponse> {
        let sandbox = self.running_sandbox(&req.id).await?;
        let pids = guest::pids(&sandbox).await.map_err(|e| status(Code::UNAVAILABLE, chain(&e)))?;
        let processes = pids.into_iter().map(|pid| api::ProcessInfo { pid, ..Default::default() }).collect();
        Ok(api::PidsResponse { processes, ..Default::default() })
    }

    async fn stats(&self, _ctx: &TtrpcContext, req: api::StatsRequest) -> TtrpcResult<api::StatsResponse> {
        let sandbox = self.running_sandbox(&req.id).await?;
        let metrics = guest::metrics(&sandbox).await.map_err(|e| status(Code::UNAVAILABLE, chain(&e)))?;
        let any: Any = containerd_shim::util::convert_to_any(Box::new(metrics))
            .map_err(|e| status(Code::INTERNAL, e.to_string()))?;
        Ok(api::StatsResponse { stats: MessageField::some(any), ..Default::default() })
    }

    async fn pause(&self, _ctx: &TtrpcContext, req: api::PauseRequest) -> TtrpcResult<api::Empty> {
        self.set_paused(&req.id, true).await?;
        self.publish(
            topics::TASK_PAUSED_EVENT_TOPIC,
            Box::new(ev::TaskPaused { container_id: req.id, ..Default::default() }),
        )
        .await;
        Ok(api::Empty::new())
    }

    async fn resume(&self, _ctx: &TtrpcContext, req: api::ResumeRequest) -> TtrpcResult<api::Empty> {
        self.set_paused(&req.id, false).await?;
        self.publish(
            topics::TASK_RESUMED_EVENT_TOPIC,
            Box::new(ev::TaskResumed { container_id: req.id, ..Default::default() }),
        )
        .await;
        Ok(api::Empty::new())
    }

    async fn checkpoint(&self, _ctx: &TtrpcContext, _req: api::CheckpointTaskRequest) -> TtrpcResult<api::Empty> {
        Err(unimplemented("checkpoint (use `matchlock snapshot` for a sandbox's memory and disk)"))
    }

    async fn update(&self, _ctx: &TtrpcContext, _req: api::UpdateTaskRequest) -> TtrpcResult<api::Empty> {
        Err(unimplemented("updating a running container's resources"))
    }

    async fn connect(&self, _ctx: &TtrpcContext, req: api::ConnectRequest) -> TtrpcResult<api::ConnectResponse> {
        if !self.shared.containers.lock().await.contains_key(&req.id) {
            return Err(not_found(format!("container {}", req.id)));
        }
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            ..Default::default()
        })
    }

    async fn shutdown(&self, _ctx: &TtrpcContext, req: api::ShutdownRequest) -> TtrpcResult<api::Empty> {
        if req.now || self.shared.containers.lock().await.is_empty() {
            self.shared.exit.signal();
        }
        Ok(api::Empty::new())
    }
}

impl Service {
    async fn running_sandbox(&self, id: &str) -> TtrpcResult<Arc<Sandbox>> {
        let containers = self.shared.containers.lock().await;
        let c = containers.get(id).ok_or_else(|| not_found(format!("container {id}")))?;
        if c.paused {
            return Err(status(Code::FAILED_PRECONDITION, format!("container {id} is paused")));
        }
        c.sandbox()
    }

    async fn set_paused(&self, id: &str, paused: bool) -> TtrpcResult<()> {
        let mut containers = self.shared.containers.lock().await;
        let c = containers.get_mut(id).ok_or_else(|| not_found(format!("container {id}")))?;
        if c.paused == paused {
            return Err(status(
                Code::FAILED_PRECONDITION,
                format!("container {id} is {}", if paused { "already paused" } else { "not paused" }),
            ));
        }
        let sandbox = c.sandbox()?;
        let done = if paused { sandbox.pause().await } else { sandbox.resume().await };
        done.map_err(|e| status(Code::INTERNAL, chain(&e)))?;
        c.paused = paused;
        Ok(())
    }
}
