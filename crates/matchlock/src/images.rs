//! `matchlock pull` and `matchlock image …`.

use std::collections::HashMap;
use std::io::{IsTerminal, Read};
use std::os::fd::AsFd;

use anyhow::{bail, Context, Result};
use indicatif::ProgressBar;
use matchlock_image::registry::{self, PullEvent, PullSummary};
use matchlock_image::{format_size, ImageRecord, Store};

use crate::progress::{mb, Output};

/// Shows pull events: a bar per layer (bytes, rate) on a terminal, plain lines otherwise.
fn pull_progress(out: &Output) -> impl FnMut(PullEvent) + '_ {
    let mut layers: HashMap<usize, ProgressBar> = HashMap::new();
    move |event| match event {
        PullEvent::LayerCached { index, total } => out.line(format_args!("Layer {index}/{total}: already stored")),
        PullEvent::Downloading { index, total, done, size } => {
            if done == size || done <= 1 << 20 {
                out.plain(format_args!("Layer {index}/{total}: downloading {} / {} MB", mb(done), mb(size)));
            }
            layers
                .entry(index)
                .or_insert_with(|| out.bytes(format!("Layer {index}/{total}"), Some(size)))
                .set_position(done);
        }
        PullEvent::Converting { index, total } => {
            out.plain(format_args!("Layer {index}/{total}: converting"));
            if let Some(bar) = layers.get(&index) {
                bar.finish_with_message("converting");
            }
        }
    }
}

/// Pulls with progress on stderr.
pub(crate) async fn pull_with_progress(
    store: &mut Store,
    reference: &str,
    alias: Option<&str>,
    force: bool,
    out: &Output,
) -> Result<PullSummary> {
    let mut progress = pull_progress(out);
    registry::pull(store, reference, alias, force, &mut progress)
        .await
        .with_context(|| format!("cannot pull {reference}"))
}

/// The image for `run --image`: the store's, or pulled when missing (always with `--pull`).
pub(crate) async fn image_for_run(store: &mut Store, reference: &str, force_pull: bool) -> Result<ImageRecord> {
    if !force_pull {
        if let Some(image) = store.resolve(reference)? {
            return Ok(image);
        }
    }
    eprintln!("Pulling {reference}...");
    let summary = pull_with_progress(store, reference, None, force_pull, &Output::new(false)).await?;
    store.resolve(&summary.reference)?.context("pulled image is missing from the store")
}

/// `matchlock pull`.
pub(crate) async fn pull(reference: &str, tag: Option<&str>, force: bool, quiet: bool) -> Result<u8> {
    let mut store = open_store()?;
    outln!("Pulling {reference}...")?;
    let summary = pull_with_progress(&mut store, reference, tag, force, &Output::new(quiet)).await?;
    if let Some(tag) = tag {
        outln!("Tagged: {tag}")?;
    }
    outln!("Digest: {}", summary.digest)?;
    outln!("Size: {}", format_size(summary.size))?;
    Ok(0)
}

/// `matchlock image import`: a tarball from stdin, with the bytes read and then the
/// conversion as progress on stderr.
pub(crate) fn import(tag: &str, quiet: bool) -> Result<u8> {
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        bail!("image import reads an image tarball from stdin, e.g. `matchlock image import {tag} < image.tar`");
    }
    let out = Output::new(quiet);
    out.line(format_args!("Importing {tag}..."));
    // Known when stdin is a file.
    let size = stdin
        .as_fd()
        .try_clone_to_owned()
        .map(std::fs::File::from)
        .and_then(|f| f.metadata())
        .ok()
        .filter(std::fs::Metadata::is_file)
        .map(|m| m.len());
    let mut input = Reading { inner: stdin.lock(), out: &out, bar: out.bytes("Reading", size), converting: None };
    let mut store = open_store()?;
    // Nothing else runs on this runtime while importing, so blocking it is fine.
    let imported = store.import(tag, &mut input).with_context(|| format!("cannot import {tag}"));
    if let Some(spinner) = input.converting {
        spinner.finish();
    }
    let summary = imported?;
    outln!("Imported: {}", summary.tag)?;
    outln!("Layers: {}", summary.layers)?;
    outln!("Size: {}", format_size(summary.size))?;
    Ok(0)
}

/// The tarball being read: bytes on a bar, then (at its end) a spinner for the conversion.
struct Reading<'a, R> {
    inner: R,
    out: &'a Output,
    bar: ProgressBar,
    converting: Option<ProgressBar>,
}

impl<R: Read> Read for Reading<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.bar.inc(n as u64);
        if n == 0 && !buf.is_empty() && self.converting.is_none() {
            self.bar.finish();
            self.out.plain(format_args!("Read {} MB; converting the layers", mb(self.bar.position())));
            self.converting = Some(self.out.spinner("Converting the layers"));
        }
        Ok(n)
    }
}

/// `matchlock push`.
pub(crate) async fn push(image: &str, target: &str) -> Result<u8> {
    let store = open_store()?;
    outln!("Pushing {image} to {target}...")?;
    let mut progress = |index: usize, total: usize| eprintln!("Layer {index}/{total}: uploading");
    let summary =
        registry::push(&store, image, target, &mut progress).await.with_context(|| format!("cannot push {image}"))?;
    outln!("Pushed: {}", summary.reference)?;
    outln!("Layers: {}", summary.layers)?;
    Ok(0)
}

/// `matchlock image ls`.
pub(crate) fn list(json: bool) -> Result<u8> {
    let store = open_store()?;
    if json {
        let all: Vec<serde_json::Value> = store
            .list()?
            .into_iter()
            .map(|r| serde_json::json!({"tag": r.tag, "source": r.source, "size": r.size, "created": r.created}))
            .collect();
        outln!("{}", serde_json::to_string_pretty(&all)?)?;
        return Ok(0);
    }
    let rows: Vec<Vec<String>> = store
        .list()?
        .into_iter()
        .map(|r| vec![r.tag, r.source, format_size(r.size), matchlock_state::datetime(r.created)])
        .collect();
    crate::vms::print_table(&["TAG", "SOURCE", "SIZE", "CREATED"], &rows)?;
    Ok(0)
}

/// `matchlock image rm`.
pub(crate) fn remove(tag: &str) -> Result<u8> {
    let mut store = open_store()?;
    let full = registry::normalize(tag).map(|r| r.whole()).ok();
    let local = matchlock_image::store::normalize_tag(tag).ok();
    for candidate in [local, full].into_iter().flatten() {
        if store.remove(&candidate)? {
            store.gc()?;
            outln!("Removed {tag}")?;
            return Ok(0);
        }
    }
    bail!("image not found: {tag}")
}

/// `matchlock image gc`: also forgets the cached build steps whose layer no image uses
/// (`matchlock build --prune` forgets them all).
pub(crate) fn gc() -> Result<u8> {
    let mut store = open_store()?;
    store.prune_build_cache(false)?;
    let removed = store.gc()?;
    outln!("Removed {removed} unreferenced blobs")?;
    Ok(0)
}

/// `matchlock commit`: the running sandbox's changes as the image `tag`, on top of the
/// image it runs (which must not have changed since it started).
pub(crate) async fn commit(id: &str, tag: &str, changes: &[String]) -> Result<u8> {
    let state = matchlock_sandbox::open_state()?;
    let vm = crate::vms::lookup(&state, id)?;
    let sandbox: matchlock_api::SandboxConfig =
        serde_json::from_str(&vm.config_json).context("the sandbox's recorded configuration is unreadable")?;
    let resources = state.lifecycle(&vm.id)?.map(|r| r.resources).unwrap_or_default();
    let mut store = open_store()?;
    let base = store
        .get(&vm.image)?
        .filter(|base| resources["image_rootfs"].as_str() == Some(&*base.rootfs.to_string_lossy()))
        .with_context(|| format!("the image {} changed or is gone since {} started: cannot commit", vm.image, vm.id))?;
    let mut config = base.config.clone();
    for change in changes {
        config.apply_change(change).map_err(anyhow::Error::msg)?;
    }
    let layer = if vm.status == matchlock_state::Status::Running {
        let dir = crate::vms::running_vm_dir(&vm.id)?;
        let conn = matchlock_sandbox::relay::connect(&dir, matchlock_protocol::EXEC_PORT, &[]).await?;
        matchlock_sandbox::commit::receive_layer(conn, &store.tmp_dir(), sandbox.disk_size_mb).await
    } else {
        let disk = matchlock_api::paths::VmDir::of(&vm.id).upper_disk();
        if !disk.is_file() {
            bail!("{} is {} and its disk is gone: nothing to commit", vm.id, vm.status);
        }
        Box::pin(matchlock_sandbox::commit::receive_stopped_layer(sandbox, &disk, &store)).await
    }
    .with_context(|| format!("cannot commit {}", vm.id))?;
    let tag = tag.to_owned();
    let summary = tokio::task::spawn_blocking(move || {
        matchlock_sandbox::commit::save_image(&mut store, &base, layer, &tag, &config)
    })
    .await??;
    outln!("Committed: {}", summary.tag)?;
    outln!("Layers: {}", summary.layers)?;
    outln!("Size: {}", format_size(summary.size))?;
    Ok(0)
}

/// `matchlock image export`: the image as a `docker save` archive, to `output` (written
/// whole, then renamed into place) or stdout (never a terminal).
pub(crate) fn export(tag: &str, output: Option<&std::path::Path>) -> Result<u8> {
    let store = open_store()?;
    if store.get(tag)?.is_none() {
        bail!("image not found: {tag} (see `matchlock image ls`)");
    }
    match output {
        Some(path) => {
            let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
            let mut file = tempfile::NamedTempFile::new_in(dir)
                .with_context(|| format!("cannot create a file in {}", dir.display()))?;
            store.export(tag, file.as_file_mut()).with_context(|| format!("cannot export {tag}"))?;
            file.persist(path).with_context(|| format!("cannot write {}", path.display()))?;
        }
        None => {
            let stdout = std::io::stdout();
            if stdout.is_terminal() {
                bail!("image export writes a tarball: redirect it (`> image.tar`) or pass -o FILE");
            }
            store.export(tag, &mut stdout.lock()).with_context(|| format!("cannot export {tag}"))?;
        }
    }
    Ok(0)
}

/// The image store under the cache directory.
pub(crate) fn open_store() -> Result<Store> {
    let root = matchlock_api::paths::cache_dir().join("images");
    Store::open(&root).with_context(|| format!("cannot open the image store at {}", root.display()))
}
