//! `matchlock build`: the CLI adapter of [`matchlock_sandbox::build`].

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use matchlock_api::config::{parse_env, DEFAULT_MTU};
use matchlock_api::SandboxConfig;
use matchlock_image::dockerfile;
use matchlock_sandbox::build::{self, BuildError, BuildOptions};

use crate::images::open_store;
use crate::progress::Output;
use crate::session::StopSignals;

/// Arguments of `matchlock build`.
#[derive(Debug, Args)]
pub(crate) struct BuildArgs {
    /// Tag of the image built (`name[:tag]`); required.
    #[arg(short = 't', long)]
    tag: Option<String>,
    /// The Dockerfile (default: `Dockerfile` in the context).
    #[arg(short = 'f', long, value_name = "FILE")]
    file: Option<PathBuf>,
    /// A build argument: `KEY=VALUE`, or `KEY` for the host's value (repeatable).
    #[arg(long = "build-arg", value_name = "KEY[=VALUE]")]
    build_arg: Vec<String>,
    /// Build this stage (by its `AS` name) and what it needs, not the last one.
    #[arg(long)]
    target: Option<String>,
    /// Run every step again (results still refresh the cache).
    #[arg(long)]
    no_cache: bool,
    /// Print only the result (no steps, no RUN output; a failing step still reports its output).
    #[arg(short = 'q', long)]
    quiet: bool,
    /// CPUs of each step's VM (0: all host CPUs).
    #[arg(long = "build-cpus", default_value_t = 0.0)]
    build_cpus: f64,
    /// Memory of each step's VM in MB.
    #[arg(long = "build-memory", default_value_t = 1024)]
    build_memory: u64,
    /// Writable disk of each step's VM in MB (bounds what one stage may write).
    #[arg(long = "build-disk", default_value_t = 10240)]
    build_disk: u64,
    /// Hosts `RUN` steps may reach over HTTP(S) (globs, comma lists); turns on interception.
    #[arg(long = "allow-host", value_delimiter = ',', value_name = "HOST[,HOST]")]
    allow_host: Vec<String>,
    /// A secret `RUN` steps only see as a placeholder: `NAME=VALUE@hosts` or `NAME@hosts`.
    #[arg(long = "secret", value_name = "NAME[=VALUE]@HOSTS")]
    secret: Vec<String>,
    /// `RUN` steps get no network interface.
    #[arg(long = "no-network", conflicts_with_all = ["allow_host", "secret"])]
    no_network: bool,
    /// DNS servers of `RUN` steps and `ADD <url>` fetches (comma-separated).
    #[arg(long = "dns-servers", value_delimiter = ',', value_name = "IP[,IP]")]
    dns_servers: Vec<std::net::IpAddr>,
    /// MTU of the steps' network interface.
    #[arg(long, default_value_t = DEFAULT_MTU, value_parser = clap::value_parser!(u32).range(576..=65_535))]
    mtu: u32,
    /// Forget the whole build cache and reclaim the layers no image uses, then exit (no
    /// context needed). `matchlock image gc` forgets only steps whose layer no image uses.
    #[arg(long, exclusive = true)]
    prune: bool,
    /// The build context directory.
    #[arg(required_unless_present = "prune")]
    context: Option<PathBuf>,
}

/// `matchlock build`.
pub(crate) async fn build(args: BuildArgs) -> Result<u8> {
    if args.prune {
        let mut store = open_store()?;
        let forgotten = store.prune_build_cache(true)?;
        let removed = store.gc()?;
        outln!("Forgot {forgotten} cached build steps; removed {removed} unreferenced blobs")?;
        return Ok(0);
    }
    let Some(tag) = args.tag.clone() else { bail!("-t/--tag is required when building from a Dockerfile") };
    matchlock_image::store::normalize_tag(&tag)?;
    let context = args.context.clone().expect("clap requires a context unless --prune");
    if !context.is_dir() {
        bail!("the build context {} is not a directory", context.display());
    }
    let file = args.file.clone().unwrap_or_else(|| context.join("Dockerfile"));
    let text = std::fs::read_to_string(&file).with_context(|| format!("cannot read {}", file.display()))?;
    let mut build_args = BTreeMap::new();
    for spec in &args.build_arg {
        let (key, value) = parse_env(spec, |k| std::env::var(k).ok())?;
        build_args.insert(key, value);
    }
    let in_file = |e: dockerfile::DockerfileError| anyhow::anyhow!("{}: {e}", file.display());
    // A first plan tells which images to fetch; the second sees their ENV.
    let images = dockerfile::plan(&text, &build_args, args.target.as_deref(), &mut |_| Ok(Default::default()))
        .map_err(in_file)?
        .images();
    let mut store = open_store()?;
    for (image, line) in &images {
        crate::images::image_for_run(&mut store, image, false)
            .await
            .with_context(|| format!("{}: Dockerfile line {line}: cannot get the image {image}", file.display()))?;
    }
    let plan = dockerfile::plan(&text, &build_args, args.target.as_deref(), &mut |image| match store.resolve(image) {
        Ok(Some(found)) => Ok(found.config),
        Ok(None) => Err(format!("image not found: {image}")),
        Err(e) => Err(e.to_string()),
    })
    .map_err(in_file)?;

    let mut vm = SandboxConfig::new(String::new());
    vm.cpus = if args.build_cpus > 0.0 {
        args.build_cpus
    } else {
        std::thread::available_parallelism().map_or(1, std::num::NonZero::get) as f64
    };
    vm.memory_mb = args.build_memory;
    vm.disk_size_mb = args.build_disk;
    vm.image_tmp = true;
    if !args.dns_servers.is_empty() {
        vm.dns_servers.clone_from(&args.dns_servers);
    }
    if args.no_network {
        vm.network = None;
    } else if let Some(network) = vm.network.as_mut() {
        network.allowed_hosts = args.allow_host.iter().map(|h| h.trim().to_owned()).filter(|h| !h.is_empty()).collect();
        network.mtu = args.mtu;
        crate::run::add_secrets(network, &args.secret, &HashMap::new())?;
    }
    let options = BuildOptions { tag, context, no_cache: args.no_cache, quiet: args.quiet, vm };
    let mut signals = StopSignals::new()?;
    let mut interrupt = std::pin::pin!(async move { signals.recv().await });
    let mut progress: Box<dyn tokio::io::AsyncWrite + Unpin + Send> =
        if args.quiet { Box::new(tokio::io::sink()) } else { Box::new(tokio::io::stderr()) };
    // On a terminal the plain step lines and RUN output become a spinner per step.
    let steps = Output::new(args.quiet).steps(None, is_step)?;
    let built = Box::pin(build::build(&plan, store, &options, &mut progress, interrupt.as_mut())).await;
    drop(steps);
    let summary = match built {
        Ok(summary) => summary,
        Err(BuildError::Interrupted) => bail!("the build was interrupted (nothing of it is left running)"),
        Err(e) => return Err(anyhow::Error::new(e).context(format!("cannot build {}", options.tag))),
    };
    for line in build::summary_lines(&summary) {
        outln!("{line}")?;
    }
    Ok(0)
}

/// Whether a line of the build's progress starts a step: `[2/7] RUN …`, `[builder 2/7] COPY …`
/// (not `CACHED [2/7] …`, which is done when said).
fn is_step(line: &str) -> bool {
    let Some((label, _)) = line.strip_prefix('[').and_then(|rest| rest.split_once("] ")) else { return false };
    let count = label.rsplit(' ').next().unwrap_or_default();
    count.split_once('/').is_some_and(|(n, of)| n.parse::<usize>().is_ok() && of.parse::<usize>().is_ok())
}

#[cfg(test)]
mod tests {
    use super::is_step;

    #[test]
    fn step_lines() {
        assert!(is_step("[2/7] RUN make"));
        assert!(is_step("[builder 1/3] FROM busybox"));
        assert!(!is_step("CACHED [2/7] RUN make"));
        assert!(!is_step("[notes] 2/7"));
        assert!(!is_step("compiling [1/2]"));
    }
}
