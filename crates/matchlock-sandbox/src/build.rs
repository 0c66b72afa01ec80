//! `matchlock build`: a planned Dockerfile ([`matchlock_image::dockerfile::plan`]) built
//! into an image, every `RUN` in a micro-VM under the build's sandbox configuration (its
//! network policy and secrets).
//!
//! One VM serves the consecutive `RUN` steps of a stage: after each, the guest commits its
//! root's changes since boot and the step's layer is the difference from the commit before
//! ([`matchlock_image::diff`]). `COPY`/`ADD` layers are made on the host. A step whose key
//! (parent layers, instruction, its environment) is cached reuses its layer; a VM is booted
//! only when a step really runs, from the layers so far. Whatever fails or is interrupted,
//! no VM, disk, hidden image or partial layer stays behind.

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context as TaskContext, Poll};

use matchlock_api::SandboxConfig;
use matchlock_image::copy::{self, Context, CopyError, Ownership};
use matchlock_image::diff::{self, Diff};
use matchlock_image::dockerfile::{Action, Base, CopyFrom, CopyStep, Plan, RunStep};
use matchlock_image::layer::LayerError;
use matchlock_image::store::BUILD_STEP_SOURCE;
use matchlock_image::{format_size, ImageConfig, ImportSummary, Store, StoreError};
use matchlock_protocol::exec::{ExecMode, ExecRequest};
use matchlock_protocol::EXEC_PORT;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncWrite, AsyncWriteExt};

use crate::exec::ExecIo;
use crate::fetch::{FetchError, Fetched};
use crate::{Sandbox, SandboxError};

/// Bytes of a failed `RUN`'s output kept for its error.
const OUTPUT_TAIL: usize = 4096;

/// Why a build failed.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// A `RUN` exited with a non-zero code.
    #[error("{step} (Dockerfile line {line}) failed with exit code {code}{}", tail(output))]
    RunFailed {
        /// `[2/7] RUN …`.
        step: String,
        /// Its line.
        line: usize,
        /// Its exit code.
        code: i32,
        /// The end of what it printed.
        output: String,
    },
    /// A `COPY`/`ADD` could not be made.
    #[error("{step} (Dockerfile line {line})")]
    Copy {
        /// The step.
        step: String,
        /// Its line.
        line: usize,
        /// Why.
        #[source]
        source: CopyError,
    },
    /// An `ADD <url>` could not be fetched.
    #[error("{step} (Dockerfile line {line})")]
    Fetch {
        /// The step.
        step: String,
        /// Its line.
        line: usize,
        /// Why.
        #[source]
        source: FetchError,
    },
    /// A step's VM failed.
    #[error("{step} (Dockerfile line {line})")]
    Sandbox {
        /// The step.
        step: String,
        /// Its line.
        line: usize,
        /// Why.
        #[source]
        source: SandboxError,
    },
    /// A `--chown` names an unknown user or group.
    #[error("{step} (Dockerfile line {line}): {message}")]
    Owner {
        /// The step.
        step: String,
        /// Its line.
        line: usize,
        /// Why.
        message: String,
    },
    /// An image the build needs is not stored.
    #[error("image not found: {0}")]
    ImageNotFound(String),
    /// Storing a layer or image failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Making a layer failed.
    #[error("cannot make a layer")]
    Layer(#[from] LayerError),
    /// The build context cannot be used.
    #[error("the build context {}", path.display())]
    Context {
        /// The context.
        path: PathBuf,
        /// Why.
        #[source]
        source: CopyError,
    },
    /// Stopped by a signal.
    #[error("interrupted")]
    Interrupted,
    /// Writing progress failed.
    #[error("cannot write the build's progress")]
    Progress(#[source] std::io::Error),
}

fn tail(output: &str) -> String {
    if output.trim().is_empty() {
        String::new()
    } else {
        format!("; its output ended with:\n{}", output.trim_end())
    }
}

/// What to build and how.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// The tag of the result.
    pub tag: String,
    /// The build context directory.
    pub context: PathBuf,
    /// Ignore cached steps (results are still cached for later builds).
    pub no_cache: bool,
    /// `RUN` output is not shown (it is still kept for a failing step's error).
    pub quiet: bool,
    /// The machines of `RUN` steps: cpus, memory, disk, network policy and secrets (its
    /// `image` is set per stage).
    pub vm: SandboxConfig,
}

/// What a build made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildSummary {
    /// The stored image.
    pub image: ImportSummary,
    /// Steps that ran (`RUN`, `COPY`, `ADD`).
    pub steps_run: usize,
    /// Steps whose result came from the cache.
    pub steps_cached: usize,
}

/// The interrupt a build watches (Ctrl-C, SIGTERM).
pub type Interrupt<'a> = Pin<&'a mut (dyn Future<Output = ()> + Send)>;

/// The VM serving a stage's `RUN` steps, and its last commit.
struct StageVm {
    sandbox: Sandbox,
    /// The root's changes since boot at the end of the previous step.
    baseline: Option<tempfile::NamedTempFile>,
    /// Working directories created so far.
    made_dirs: Vec<String>,
    /// `COPY` layers of the chain this VM has not unpacked yet.
    pending: Vec<String>,
}

struct Builder<'a> {
    store: Option<Store>,
    options: &'a BuildOptions,
    context: Option<Context>,
    /// Whether a hidden step image was made (removed at the end).
    booted_hidden: bool,
    progress: &'a mut (dyn AsyncWrite + Unpin + Send),
    summary: (usize, usize),
}

/// Builds `plan` into the image `options.tag`, writing step progress and `RUN` output to
/// `progress`. The store's layers and images are shared with other processes; the build
/// holds the store's shared lock while it runs.
pub async fn build(
    plan: &Plan,
    store: Store,
    options: &BuildOptions,
    progress: &mut (dyn AsyncWrite + Unpin + Send),
    mut interrupt: Interrupt<'_>,
) -> Result<BuildSummary, BuildError> {
    let lock = store.lock(false)?;
    let mut builder =
        Builder { store: Some(store), options, context: None, booted_hidden: false, progress, summary: (0, 0) };
    let result = Box::pin(builder.run(plan, &mut interrupt)).await;
    drop(lock);
    // The hidden step images go whatever happened (their root file systems with them),
    // now or, while another process uses the store, at its next collection.
    if builder.booted_hidden {
        builder.blocking(|store| crate::logged(store.gc_if_idle(), "removing the build's step images")).await;
    }
    let image = result?;
    Ok(BuildSummary { image, steps_run: builder.summary.0, steps_cached: builder.summary.1 })
}

/// sha256 (hex) of `prefix` and `lines`, one per line.
fn digest_lines<'a>(prefix: &str, lines: impl IntoIterator<Item = &'a str>) -> String {
    let mut h = Sha256::new();
    h.update(prefix.as_bytes());
    for line in lines {
        h.update(b"\n");
        h.update(line.as_bytes());
    }
    hex::encode(h.finalize())
}

/// The cache key of a `RUN` on `chain`.
fn run_key(chain: &[String], run: &RunStep) -> String {
    let instruction = serde_json::json!({"argv": run.argv, "env": run.env, "user": run.user, "workdir": run.workdir});
    let instruction = instruction.to_string();
    digest_lines("matchlock-build-run-v1", chain.iter().map(String::as_str).chain([instruction.as_str()]))
}

/// The cache key of a `COPY`/`ADD` that made the layer `diff_id` on `chain`; an `ADD` of
/// URLs keys on each URL and the sha256 of what it fetched too.
fn copy_key(chain: &[String], diff_id: &str, fetched: &[(&str, &str)]) -> String {
    let remote = fetched.iter().flat_map(|(url, sha256)| [*url, *sha256]);
    digest_lines("matchlock-build-copy-v1", chain.iter().map(String::as_str).chain([diff_id]).chain(remote))
}

/// The tag of the hidden image of the layers `chain`.
fn hidden_tag(chain: &[String]) -> String {
    format!(
        "matchlock-build-step/{}:latest",
        &digest_lines("matchlock-build-step-v1", chain.iter().map(String::as_str))[..32]
    )
}

impl Builder<'_> {
    fn store(&self) -> &Store {
        self.store.as_ref().expect("the store is back after each blocking call")
    }

    /// Runs `work` on the store on the blocking pool.
    async fn blocking<T: Send + 'static>(&mut self, work: impl FnOnce(&mut Store) -> T + Send + 'static) -> T {
        let mut store = self.store.take().expect("the store is back after each blocking call");
        let (store, out) = tokio::task::spawn_blocking(move || {
            let out = work(&mut store);
            (store, out)
        })
        .await
        .expect("store work does not panic");
        self.store = Some(store);
        out
    }

    async fn say(&mut self, line: &str) -> Result<(), BuildError> {
        self.progress.write_all(format!("{line}\n").as_bytes()).await.map_err(BuildError::Progress)?;
        self.progress.flush().await.map_err(BuildError::Progress)
    }

    async fn run(&mut self, plan: &Plan, interrupt: &mut Interrupt<'_>) -> Result<ImportSummary, BuildError> {
        let mut chains: BTreeMap<usize, Vec<String>> = BTreeMap::new();
        for &index in &plan.order {
            let stage = &plan.stages[index];
            let label = |n: usize| match &stage.name {
                Some(name) => format!("[{name} {n}/{}]", stage.steps.len() + 1),
                None => format!("[{n}/{}]", stage.steps.len() + 1),
            };
            let (mut chain, base_image) = match &stage.base {
                Base::Scratch => (Vec::new(), None),
                Base::Stage(i) => (chains[i].clone(), None),
                Base::Image(reference) => {
                    let image =
                        self.store().resolve(reference)?.ok_or_else(|| BuildError::ImageNotFound(reference.clone()))?;
                    (self.store().diff_ids(&image.tag)?, Some(image.tag))
                }
            };
            let from = match &stage.base {
                Base::Scratch => "scratch".to_owned(),
                Base::Stage(i) => plan.stages[*i].name.clone().unwrap_or_else(|| format!("stage {i}")),
                Base::Image(r) => r.clone(),
            };
            self.say(&format!("{} FROM {from}", label(1))).await?;
            let base_chain = chain.clone();
            let mut vm: Option<StageVm> = None;
            let outcome = async {
                for (n, step) in stage.steps.iter().enumerate() {
                    let shown = format!("{} {}", label(n + 2), step.display);
                    match &step.action {
                        Action::Config => self.say(&shown).await?,
                        Action::Copy(copy) => {
                            let fetched = self.fetch(copy, &shown, step.line, interrupt).await?;
                            let layer =
                                self.copy_layer(copy, &chain, &chains, plan, &shown, step.line, &fetched).await?;
                            if let Some((diff_id, cached)) = layer {
                                let remote: Vec<(&str, &str)> =
                                    copy.sources.iter().zip(&fetched).map(|(u, f)| (u.as_str(), &*f.sha256)).collect();
                                // Recorded so that the layer stays stored for later builds.
                                self.store().cache_step(&copy_key(&chain, &diff_id, &remote), Some(&diff_id))?;
                                self.say(&if cached { format!("CACHED {shown}") } else { shown.clone() }).await?;
                                // The running VM unpacks it before the next RUN it serves.
                                if let Some(running) = vm.as_mut() {
                                    running.pending.push(diff_id.clone());
                                }
                                chain.push(diff_id);
                            } else {
                                self.say(&shown).await?;
                            }
                        }
                        Action::Run(run) => {
                            let key = run_key(&chain, run);
                            let cached = if self.options.no_cache { None } else { self.store().cached_step(&key)? };
                            if let Some(layer) = cached {
                                self.say(&format!("CACHED {shown}")).await?;
                                self.summary.1 += 1;
                                if let Some(diff_id) = layer {
                                    chain.push(diff_id);
                                    // A cached RUN layer may delete: the next RUN boots anew.
                                    if let Some(old) = vm.take() {
                                        close(old).await;
                                    }
                                }
                                continue;
                            }
                            self.say(&shown).await?;
                            self.summary.0 += 1;
                            let sandbox_err =
                                |source| BuildError::Sandbox { step: shown.clone(), line: step.line, source };
                            if let Some(mut running) = vm.take() {
                                match self.catch_up(&mut running, interrupt).await {
                                    Ok(()) => vm = Some(running),
                                    Err(BuildError::Interrupted) => {
                                        close(running).await;
                                        return Err(BuildError::Interrupted);
                                    }
                                    Err(e) => {
                                        tracing::warn!("the step VM cannot take the copied files, booting anew: {e}");
                                        close(running).await;
                                    }
                                }
                            }
                            if vm.is_none() {
                                let boot_tag = match &base_image {
                                    Some(tag) if chain == base_chain => tag.clone(),
                                    _ => self.hidden_image(&chain).await?,
                                };
                                let started =
                                    self.boot(boot_tag, base_image.is_some() && chain == base_chain, interrupt);
                                vm = Some(started.await.map_err(|e| match e {
                                    BootError::Interrupted => BuildError::Interrupted,
                                    BootError::Sandbox(source) => sandbox_err(source),
                                })?);
                            }
                            let machine = vm.as_mut().expect("booted above");
                            let layer = self.run_step(machine, run, &shown, step.line, interrupt).await?;
                            self.store().cache_step(&key, layer.as_deref())?;
                            if let Some(diff_id) = layer {
                                chain.push(diff_id);
                            }
                        }
                    }
                }
                if let Some(dir) = &stage.workdir {
                    // A WORKDIR no RUN ran in still exists in the image, as Docker makes it.
                    let ran_there =
                        stage.steps.iter().any(|s| matches!(&s.action, Action::Run(r) if &r.workdir == dir));
                    if !ran_there {
                        let key = digest_lines(
                            "matchlock-build-workdir-v1",
                            chain.iter().map(String::as_str).chain([dir.as_str()]),
                        );
                        let layer = match self.store().cached_step(&key)? {
                            Some(cached) => cached,
                            None => self.workdir_layer(&chain, dir).await?,
                        };
                        self.store().cache_step(&key, layer.as_deref())?;
                        chain.extend(layer);
                    }
                }
                Ok::<(), BuildError>(())
            }
            .await;
            if let Some(old) = vm.take() {
                close(old).await;
            }
            outcome?;
            chains.insert(index, chain);
        }
        let target = *plan.order.last().expect("a plan has a target");
        let chain = chains.remove(&target).expect("the target was built");
        let config: ImageConfig = plan.stages[target].config.clone();
        let tag = self.options.tag.clone();
        let image = self.blocking(move |store| store.save_chain(&tag, "build", &config, &chain)).await?;
        Ok(image)
    }

    /// A hidden image of `chain` to boot from (its root file system squashed once).
    async fn hidden_image(&mut self, chain: &[String]) -> Result<String, BuildError> {
        let tag = hidden_tag(chain);
        let owned = chain.to_vec();
        let saved = tag.clone();
        self.blocking(move |store| store.save_chain(&saved, BUILD_STEP_SOURCE, &ImageConfig::default(), &owned))
            .await?;
        self.booted_hidden = true;
        Ok(tag)
    }

    async fn boot(&self, image: String, warm: bool, interrupt: &mut Interrupt<'_>) -> Result<StageVm, BootError> {
        let mut config = self.options.vm.clone();
        config.image = image;
        // A template of a one-off layer chain would never be resumed.
        config.cold |= !warm;
        let state = crate::open_state()?;
        let sandbox = tokio::select! {
            created = Box::pin(Sandbox::create(config, self.store(), state)) => created?,
            () = interrupt.as_mut() => return Err(BootError::Interrupted),
        };
        Ok(StageVm { sandbox, baseline: None, made_dirs: Vec::new(), pending: Vec::new() })
    }

    /// A stored layer holding the directory `dir` (root's, 0755), unless `chain` has it.
    async fn workdir_layer(&mut self, chain: &[String], dir: &str) -> Result<Option<String>, BuildError> {
        let chain = chain.to_vec();
        let rel = PathBuf::from(dir.trim_start_matches('/'));
        self.blocking(move |store| -> Result<Option<String>, BuildError> {
            if store.chain_has_dir(&chain, &rel)? {
                return Ok(None);
            }
            let tmp = store.tmp_dir();
            let mut layer =
                tempfile::NamedTempFile::new_in(&tmp).map_err(|e| StoreError::Io { path: tmp.clone(), source: e })?;
            let mut header = tar::Header::new_gnu();
            header.set_entry_type(tar::EntryType::Directory);
            header.set_mode(0o755);
            header.set_size(0);
            header.set_mtime(
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
            );
            let mut tar = tar::Builder::new(layer.as_file_mut());
            tar.append_data(&mut header, &rel, std::io::empty()).map_err(LayerError::Temp)?;
            tar.finish().map_err(LayerError::Temp)?;
            drop(tar);
            let bytes = std::fs::read(layer.path()).map_err(LayerError::Temp)?;
            let diff_id = format!("sha256:{}", hex::encode(Sha256::digest(&bytes)));
            store.add_layer(layer, &diff_id)?;
            Ok(Some(diff_id))
        })
        .await
    }

    /// Unpacks `vm`'s pending `COPY` layers into it and takes its new baseline commit.
    async fn catch_up(&mut self, vm: &mut StageVm, interrupt: &mut Interrupt<'_>) -> Result<(), BuildError> {
        if vm.pending.is_empty() {
            return Ok(());
        }
        let sandbox_err = |source| BuildError::Sandbox { step: "copying into the step VM".into(), line: 0, source };
        let tmp = self.store().tmp_dir();
        let layers: Vec<PathBuf> = vm.pending.iter().map(|d| self.store().layer_path(d)).collect();
        let work = async {
            for layer in &layers {
                crate::commit::apply_layer(vm.sandbox.connect(EXEC_PORT).await?, layer).await?;
            }
            let conn = vm.sandbox.connect(EXEC_PORT).await?;
            crate::commit::receive_layer(conn, &tmp, vm.sandbox.config().disk_size_mb).await
        };
        let baseline = tokio::select! {
            done = work => done.map_err(sandbox_err)?,
            () = interrupt.as_mut() => return Err(BuildError::Interrupted),
        };
        vm.baseline = Some(baseline.into_file());
        vm.pending.clear();
        Ok(())
    }

    /// Runs `run` in `vm`; returns the layer it made (stored), if it changed anything.
    async fn run_step(
        &mut self,
        vm: &mut StageVm,
        run: &RunStep,
        shown: &str,
        line: usize,
        interrupt: &mut Interrupt<'_>,
    ) -> Result<Option<String>, BuildError> {
        let sandbox_err = |source| BuildError::Sandbox { step: shown.to_owned(), line, source };
        if run.workdir != "/" && !vm.made_dirs.contains(&run.workdir) {
            // WORKDIR creates its directory (as root), as Docker does.
            let mkdir = ExecRequest {
                argv: vec!["mkdir".into(), "-p".into(), run.workdir.clone()],
                env: run.env.clone(),
                working_dir: Some("/".into()),
                user: None,
                window: None,
                rlimits: Vec::new(),
                root: None,
                binds: Vec::new(),
            };
            let (code, output) =
                self.exec(&vm.sandbox, &mkdir, interrupt).await.map_err(|e| e.into_build(sandbox_err))?;
            if code != 0 {
                return Err(BuildError::RunFailed {
                    step: format!("{shown} (creating its WORKDIR)"),
                    line,
                    code,
                    output,
                });
            }
            vm.made_dirs.push(run.workdir.clone());
        }
        // The sandbox's own environment too: CA paths under interception, secret placeholders.
        let step_config = ImageConfig {
            env: run.env.clone(),
            user: run.user.clone(),
            working_dir: run.workdir.clone(),
            ..ImageConfig::default()
        };
        let request = crate::compose_command(&step_config, vm.sandbox.config(), run.argv.clone())
            .map_err(|e| sandbox_err(SandboxError::Config(e.to_string())))?
            .into_request(None);
        let (code, output) =
            self.exec(&vm.sandbox, &request, interrupt).await.map_err(|e| e.into_build(sandbox_err))?;
        if code != 0 {
            return Err(BuildError::RunFailed { step: shown.to_owned(), line, code, output });
        }
        let tmp = self.store().tmp_dir();
        let commit = async {
            let conn = vm.sandbox.connect(EXEC_PORT).await?;
            crate::commit::receive_layer(conn, &tmp, vm.sandbox.config().disk_size_mb).await
        };
        let after = tokio::select! {
            layer = commit => layer.map_err(sandbox_err)?,
            () = interrupt.as_mut() => return Err(BuildError::Interrupted),
        };
        let after = after.into_file();
        let before = vm.baseline.take();
        let after_path = after.path().to_owned();
        let (diff, layer, before) = self
            .blocking(move |store| -> Result<_, BuildError> {
                let tmp = store.tmp_dir();
                let mut layer = tempfile::NamedTempFile::new_in(&tmp)
                    .map_err(|e| StoreError::Io { path: tmp.clone(), source: e })?;
                let mut prev = before.as_ref().map(|b| b.reopen()).transpose().map_err(LayerError::Read)?;
                let mut open_after = || -> std::io::Result<Box<dyn std::io::Read>> {
                    Ok(Box::new(std::io::BufReader::new(std::fs::File::open(&after_path)?)))
                };
                let mut out = std::io::BufWriter::new(layer.as_file_mut());
                let diff = diff::diff(
                    prev.as_mut().map(|p| p as &mut dyn std::io::Read),
                    &mut open_after,
                    &mut out,
                    diff::Limits::default(),
                )?;
                std::io::Write::flush(&mut out).map_err(LayerError::Temp)?;
                drop(out);
                if diff.entries > 0 {
                    store.add_layer(layer, &diff.diff_id)?;
                    return Ok((diff, None, before));
                }
                Ok((diff, Some(layer), before))
            })
            .await?;
        drop((layer, before));
        vm.baseline = Some(after);
        Ok((diff.entries > 0).then_some(diff.diff_id))
    }

    /// Runs `request`, its output to the progress stream; returns its exit code and the
    /// end of its output.
    async fn exec(
        &mut self,
        sandbox: &Sandbox,
        request: &ExecRequest,
        interrupt: &mut Interrupt<'_>,
    ) -> Result<(i32, String), StepError> {
        let kept = Arc::new(Mutex::new(VecDeque::with_capacity(OUTPUT_TAIL)));
        let (_control, control) = tokio::sync::mpsc::channel(1);
        let shown = || -> Box<dyn AsyncWrite + Unpin + Send> {
            if self.options.quiet {
                Box::new(tokio::io::sink())
            } else {
                Box::new(tokio::io::stderr())
            }
        };
        let io = ExecIo {
            stdin: None,
            stdout: Box::new(Tee { inner: shown(), kept: kept.clone() }),
            stderr: Box::new(Tee { inner: shown(), kept: kept.clone() }),
            control,
        };
        let code = tokio::select! {
            code = sandbox.exec(ExecMode::Pipe, request, io) => code.map_err(StepError::Sandbox)?,
            () = interrupt.as_mut() => return Err(StepError::Interrupted),
        };
        let bytes: Vec<u8> = kept.lock().unwrap_or_else(PoisonError::into_inner).iter().copied().collect();
        Ok((code, String::from_utf8_lossy(&bytes).into_owned()))
    }

    /// The files of an `ADD` of URLs, fetched under the build's network policy, at most the
    /// step VMs' disk size each; none for other steps.
    async fn fetch(
        &mut self,
        copy: &CopyStep,
        shown: &str,
        line: usize,
        interrupt: &mut Interrupt<'_>,
    ) -> Result<Vec<Fetched>, BuildError> {
        if copy.from != CopyFrom::Remote {
            return Ok(Vec::new());
        }
        let limit = self.options.vm.disk_size_mb.saturating_mul(1 << 20);
        let tmp = self.store().tmp_dir();
        let mut fetched = Vec::new();
        for url in &copy.sources {
            let fetching = crate::fetch::fetch(&self.options.vm, url, limit, copy.checksum.as_deref(), &tmp);
            let file = tokio::select! {
                file = fetching => file,
                () = interrupt.as_mut() => return Err(BuildError::Interrupted),
            };
            fetched.push(file.map_err(|source| BuildError::Fetch { step: shown.to_owned(), line, source })?);
        }
        Ok(fetched)
    }

    /// The layer of a `COPY`/`ADD` (stored) and whether it was stored already; `None` when
    /// it copies nothing.
    #[allow(clippy::too_many_arguments)]
    async fn copy_layer(
        &mut self,
        copy: &CopyStep,
        chain: &[String],
        chains: &BTreeMap<usize, Vec<String>>,
        plan: &Plan,
        shown: &str,
        line: usize,
        fetched: &[Fetched],
    ) -> Result<Option<(String, bool)>, BuildError> {
        let shown_owned = shown.to_owned();
        let copy_err = move |source| BuildError::Copy { step: shown_owned, line, source };
        let owner = match &copy.chown {
            None => None,
            Some(spec) => {
                let numeric = spec.split(':').all(|p| p.parse::<u64>().is_ok());
                let read = |path: &str| -> Result<Option<String>, BuildError> {
                    if numeric {
                        return Ok(None);
                    }
                    Ok(self
                        .store()
                        .read_chain_file(chain, Path::new(path))?
                        .map(|b| String::from_utf8_lossy(&b).into_owned()))
                };
                let (passwd, group) = (read("etc/passwd")?, read("etc/group")?);
                Some(
                    copy::resolve_owner(spec, passwd.as_deref(), group.as_deref())
                        .map_err(|message| BuildError::Owner { step: shown.to_owned(), line, message })?,
                )
            }
        };
        let ownership = Ownership { owner, chmod: copy.chmod };
        let source_chain = match &copy.from {
            CopyFrom::Context | CopyFrom::Remote => None,
            CopyFrom::Stage(i) => {
                Some((chains[i].clone(), plan.stages[*i].name.clone().unwrap_or_else(|| format!("stage {i}"))))
            }
            CopyFrom::Image(reference) => {
                let image =
                    self.store().resolve(reference)?.ok_or_else(|| BuildError::ImageNotFound(reference.clone()))?;
                Some((self.store().diff_ids(&image.tag)?, reference.clone()))
            }
        };
        let downloads: Vec<copy::Download> = copy
            .sources
            .iter()
            .zip(fetched)
            .map(|(url, f)| copy::Download { url: url.clone(), file: f.file.path().to_owned(), mtime: f.mtime })
            .collect();
        if copy.from == CopyFrom::Context && self.context.is_none() {
            let path = self.options.context.clone();
            self.context = Some(Context::open(&path).map_err(|source| BuildError::Context { path, source })?);
        }
        let context = self.context.take();
        let step = copy.clone();
        let disk_mb = self.options.vm.disk_size_mb;
        let (context, made) = self
            .blocking(move |store| {
                let made = (|| -> Result<Option<(String, bool)>, BuildError> {
                    let tmp = store.tmp_dir();
                    let mut layer = tempfile::NamedTempFile::new_in(&tmp)
                        .map_err(|e| StoreError::Io { path: tmp.clone(), source: e })?;
                    let mut out =
                        std::io::BufWriter::new(Bounded { inner: layer.as_file_mut(), left: disk_mb << 20, disk_mb });
                    let diff: Diff = match &source_chain {
                        None if step.from == CopyFrom::Remote => {
                            copy::layer_from_downloads(&step, &downloads, ownership, &mut out).map_err(copy_err)?
                        }
                        None => context
                            .as_ref()
                            .expect("opened above")
                            .layer(&step, ownership, &mut out)
                            .map_err(copy_err)?,
                        Some((diff_ids, from)) => {
                            let mut merged = store.merged_tar(diff_ids)?;
                            let rewind_from = merged.try_clone().map_err(LayerError::Temp)?;
                            let rewind = move || -> std::io::Result<Box<dyn std::io::Read>> {
                                let mut again = rewind_from.try_clone()?;
                                std::io::Seek::rewind(&mut again)?;
                                Ok(Box::new(std::io::BufReader::new(again)))
                            };
                            let mut reader = std::io::BufReader::new(&mut merged);
                            copy::layer_from_image(&step, from, &mut reader, ownership, &mut out, rewind)
                                .map_err(copy_err)?
                        }
                    };
                    std::io::Write::flush(&mut out).map_err(LayerError::Temp)?;
                    drop(out);
                    if diff.entries == 0 {
                        return Ok(None);
                    }
                    let stored = store.layer_size(&diff.diff_id)?.is_some();
                    store.add_layer(layer, &diff.diff_id)?;
                    Ok(Some((diff.diff_id, stored)))
                })();
                (context, made)
            })
            .await;
        self.context = context;
        let made = made?;
        match &made {
            Some((_, true)) => self.summary.1 += 1,
            _ => self.summary.0 += 1,
        }
        Ok(made)
    }
}

/// A writer that refuses to grow past `left` bytes: a `COPY`/`ADD` layer is bounded by the
/// build's disk (`--build-disk`), which it could not be unpacked into anyway, so a huge (or
/// sparse) file in the context fails the step instead of filling the host's disk.
struct Bounded<W> {
    inner: W,
    left: u64,
    disk_mb: u64,
}

impl<W: std::io::Write> std::io::Write for Bounded<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let len = buf.len() as u64;
        if len > self.left {
            return Err(std::io::Error::new(
                std::io::ErrorKind::StorageFull,
                format!("the layer is larger than the build's disk ({} MB, --build-disk)", self.disk_mb),
            ));
        }
        let written = self.inner.write(buf)?;
        self.left -= written as u64;
        Ok(written)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Closes a stage's VM, removing it; a failure to stop it cleanly is logged.
async fn close(vm: StageVm) {
    crate::logged(vm.sandbox.close(true).await, "closing a build step's VM");
}

enum BootError {
    Interrupted,
    Sandbox(SandboxError),
}

impl From<SandboxError> for BootError {
    fn from(e: SandboxError) -> Self {
        Self::Sandbox(e)
    }
}

enum StepError {
    Interrupted,
    Sandbox(SandboxError),
}

impl StepError {
    fn into_build(self, sandbox: impl FnOnce(SandboxError) -> BuildError) -> BuildError {
        match self {
            Self::Interrupted => BuildError::Interrupted,
            Self::Sandbox(e) => sandbox(e),
        }
    }
}

/// Writes through to `inner`, keeping the last [`OUTPUT_TAIL`] bytes.
struct Tee<W> {
    inner: W,
    kept: Arc<Mutex<VecDeque<u8>>>,
}

impl<W: AsyncWrite + Unpin> AsyncWrite for Tee<W> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let written = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &written {
            let mut kept = self.kept.lock().unwrap_or_else(PoisonError::into_inner);
            kept.extend(&buf[..*n]);
            let excess = kept.len().saturating_sub(OUTPUT_TAIL);
            kept.drain(..excess);
        }
        written
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The reference's final lines of a build.
pub fn summary_lines(summary: &BuildSummary) -> [String; 3] {
    [
        format!("Successfully built and tagged {}", summary.image.tag),
        format!("Layers: {}", summary.image.layers),
        format!("Size: {}", format_size(summary.image.size)),
    ]
}
