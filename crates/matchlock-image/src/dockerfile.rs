//! The Dockerfile frontend of `matchlock build`: the text is parsed by `parse-dockerfile`,
//! then planned here into stages of steps with every variable expanded (`ARG`, `ENV`,
//! `--build-arg`), the image config each stage ends with, and the stages a target needs.
//! Errors name the Dockerfile line.

use std::collections::{BTreeMap, BTreeSet};

use parse_dockerfile::{Command, Flag, Instruction, JsonOrStringArray, Source, UnescapedString};

use crate::config::{Healthcheck, ImageConfig};

/// The shell of `RUN`, `CMD` and `ENTRYPOINT` in shell form until a `SHELL` changes it.
const DEFAULT_SHELL: [&str; 2] = ["/bin/sh", "-c"];
/// `PATH` of a stage whose image sets none (Docker's default).
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Arguments every build defines (usable after `ARG NAME`), for the one platform built.
const PLATFORM_ARGS: [(&str, &str); 8] = [
    ("TARGETPLATFORM", "linux/amd64"),
    ("TARGETOS", "linux"),
    ("TARGETARCH", "amd64"),
    ("TARGETVARIANT", ""),
    ("BUILDPLATFORM", "linux/amd64"),
    ("BUILDOS", "linux"),
    ("BUILDARCH", "amd64"),
    ("BUILDVARIANT", ""),
];

/// A Dockerfile that cannot be built, and the line that says so (0: the file as a whole).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{message}", if *line > 0 { format!("Dockerfile line {line}: ") } else { String::new() })]
pub struct DockerfileError {
    /// 1-based line, 0 when no line is to blame.
    pub line: usize,
    /// What is wrong.
    pub message: String,
}

/// What a build does, stage by stage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Every stage of the file, in order.
    pub stages: Vec<Stage>,
    /// Indexes of the stages the target needs, in the order they are built; the target last.
    pub order: Vec<usize>,
}

/// One `FROM` and what follows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stage {
    /// Position in the file (0-based).
    pub index: usize,
    /// `AS` name, lowercased.
    pub name: Option<String>,
    /// What it starts from.
    pub base: Base,
    /// Line of its `FROM`.
    pub line: usize,
    /// Its instructions after `FROM`.
    pub steps: Vec<Step>,
    /// The image config it ends with.
    pub config: ImageConfig,
    /// The working directory a `WORKDIR` of this stage left, if one did (Docker creates it).
    pub workdir: Option<String>,
}

/// The start of a stage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Base {
    /// `FROM scratch`: nothing.
    Scratch,
    /// An image reference.
    Image(String),
    /// An earlier stage (its index).
    Stage(usize),
}

/// One instruction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// Its line.
    pub line: usize,
    /// How progress shows it (`RUN make`), variables expanded where Docker expands them.
    pub display: String,
    /// What it does to the file system.
    pub action: Action,
}

/// What a step does to the root file system.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Runs a command in the stage's VM.
    Run(RunStep),
    /// Copies files into it.
    Copy(CopyStep),
    /// Nothing: it changes the config only.
    Config,
}

/// A `RUN`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunStep {
    /// The command (shell form already wrapped in the `SHELL`).
    pub argv: Vec<String>,
    /// Its environment: the stage's `ENV`, then the `ARG`s in scope.
    pub env: Vec<(String, String)>,
    /// `USER` (empty: root).
    pub user: String,
    /// `WORKDIR` (absolute).
    pub workdir: String,
}

/// A `COPY` or `ADD`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyStep {
    /// Source paths or globs (in the context, or in the `from` stage or image).
    pub sources: Vec<String>,
    /// Where the sources are.
    pub from: CopyFrom,
    /// Absolute destination; a trailing `/` means a directory.
    pub dest: String,
    /// `--chown` (`user[:group]`, names or ids).
    pub chown: Option<String>,
    /// `--chmod` (octal).
    pub chmod: Option<u32>,
    /// `ADD`: local tar archives are unpacked.
    pub unpack_archives: bool,
    /// `ADD --checksum=sha256:<hex>`: the digest (lowercase hex) a remote source must have.
    pub checksum: Option<String>,
}

/// Where a `COPY` takes its files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CopyFrom {
    /// The build context.
    Context,
    /// An earlier stage.
    Stage(usize),
    /// An image.
    Image(String),
    /// `ADD <url>`: the sources are `http`/`https` URLs, fetched by the host under the
    /// build's network policy.
    Remote,
}

impl Plan {
    /// The image references the build needs (bases and `COPY --from` images), each once,
    /// with the line that first names it.
    pub fn images(&self) -> Vec<(String, usize)> {
        let mut images: Vec<(String, usize)> = Vec::new();
        for stage in self.order.iter().map(|&i| &self.stages[i]) {
            let copies = stage.steps.iter().filter_map(|s| match &s.action {
                Action::Copy(CopyStep { from: CopyFrom::Image(image), .. }) => Some((image, s.line)),
                _ => None,
            });
            let base = match &stage.base {
                Base::Image(image) => Some((image, stage.line)),
                _ => None,
            };
            for (image, line) in base.into_iter().chain(copies) {
                if !images.iter().any(|(i, _)| i == image) {
                    images.push((image.clone(), line));
                }
            }
        }
        images
    }
}

/// Plans the Dockerfile `text` with `build_args` (`--build-arg`) for `target` (a stage
/// name; default the last stage). `base_config` gives the config of an image a stage
/// starts from (its `ENV` is in scope); planning with a default config first tells which
/// images to fetch ([`Plan::images`]).
pub fn plan(
    text: &str,
    build_args: &BTreeMap<String, String>,
    target: Option<&str>,
    base_config: &mut dyn FnMut(&str) -> Result<ImageConfig, String>,
) -> Result<Plan, DockerfileError> {
    let parsed =
        parse_dockerfile::parse(text).map_err(|e| DockerfileError { line: e.line(), message: format!("{e:#}") })?;
    let escape = parsed.parser_directives.escape.as_ref().map_or('\\', |d| d.value.value);
    let lines = Lines(text);
    let names = parsed.instructions.iter().filter_map(|i| match i {
        Instruction::From(from) => from.as_.as_ref().map(|(_, n)| n.value.to_ascii_lowercase()),
        _ => None,
    });
    let mut planner = Planner {
        lines,
        escape,
        build_args,
        global_args: Vars::default(),
        stages: Vec::new(),
        later_stages: names.collect(),
    };
    let mut stage_starts = Vec::new();
    for (i, instruction) in parsed.instructions.iter().enumerate() {
        if matches!(instruction, Instruction::From(_)) {
            stage_starts.push(i);
        }
    }
    let first = stage_starts.first().copied().unwrap_or(parsed.instructions.len());
    for instruction in &parsed.instructions[..first] {
        if let Instruction::Arg(arg) = instruction {
            let line = lines.of(&arg.arguments);
            let mut global = std::mem::take(&mut planner.global_args);
            planner.declare_args(&arg.arguments, &mut global, None, line)?;
            planner.global_args = global;
        }
    }
    for (n, &start) in stage_starts.iter().enumerate() {
        let end = stage_starts.get(n + 1).copied().unwrap_or(parsed.instructions.len());
        let stage = planner.stage(&parsed.instructions[start..end], base_config)?;
        planner.stages.push(stage);
    }
    let stages = planner.stages;
    let target = match target {
        None => stages.len() - 1,
        Some(name) => stages
            .iter()
            .position(|s| s.name.as_deref() == Some(&*name.to_ascii_lowercase()))
            .ok_or_else(|| DockerfileError { line: 0, message: format!("target stage {name:?} could not be found") })?,
    };
    let mut order = Vec::new();
    needs(&stages, target, &mut order);
    Ok(Plan { stages, order })
}

/// Adds `stage` after the stages it needs, each once.
fn needs(stages: &[Stage], stage: usize, order: &mut Vec<usize>) {
    if order.contains(&stage) {
        return;
    }
    let s = &stages[stage];
    if let Base::Stage(base) = s.base {
        needs(stages, base, order);
    }
    for step in &s.steps {
        if let Action::Copy(CopyStep { from: CopyFrom::Stage(from), .. }) = step.action {
            needs(stages, from, order);
        }
    }
    order.push(stage);
}

/// Byte offsets to line numbers.
#[derive(Clone, Copy)]
struct Lines<'a>(&'a str);

impl Lines<'_> {
    fn at(self, offset: usize) -> usize {
        self.0.as_bytes()[..offset.min(self.0.len())].iter().filter(|&&b| b == b'\n').count() + 1
    }

    fn of(self, s: &UnescapedString<'_>) -> usize {
        self.at(s.span.start)
    }
}

/// Variables in scope, in declaration order (a later one of the same name replaces it).
#[derive(Debug, Clone, Default)]
struct Vars(Vec<(String, String)>);

impl Vars {
    fn get(&self, name: &str) -> Option<&str> {
        self.0.iter().rev().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    fn set(&mut self, name: &str, value: String) {
        self.0.retain(|(k, _)| k != name);
        self.0.push((name.to_owned(), value));
    }
}

struct Planner<'a> {
    lines: Lines<'a>,
    escape: char,
    build_args: &'a BTreeMap<String, String>,
    global_args: Vars,
    stages: Vec<Stage>,
    /// `AS` names of every stage (lowercased), to tell a stage named too early.
    later_stages: Vec<String>,
}

/// The state of a stage being planned.
struct StageState {
    config: ImageConfig,
    args: Vars,
    shell: Vec<String>,
}

impl StageState {
    /// What `$NAME` means here: `ENV` first, then `ARG`.
    fn lookup(&self) -> Vars {
        let mut vars = self.args.clone();
        for (k, v) in &self.config.env {
            vars.set(k, v.clone());
        }
        vars
    }
}

fn err(line: usize, message: impl Into<String>) -> DockerfileError {
    DockerfileError { line, message: message.into() }
}

impl Planner<'_> {
    /// Declares the `ARG`s of `text` (`a=1 b`) into `into`; inside a stage, `global` gives
    /// the value a redeclared global argument has.
    fn declare_args(
        &self,
        text: &UnescapedString<'_>,
        into: &mut Vars,
        global: Option<&Vars>,
        line: usize,
    ) -> Result<(), DockerfileError> {
        let scope = match global {
            Some(_) => into.clone(),
            None => self.global_args.clone(),
        };
        for word in words(&text.value, &scope, self.escape).map_err(|e| err(line, e))? {
            let (name, default) = match word.split_once('=') {
                Some((n, v)) => (n.to_owned(), Some(v.to_owned())),
                None => (word.clone(), None),
            };
            if !valid_name(&name) {
                return Err(err(line, format!("ARG names a variable {name:?}: letters, digits and '_' only")));
            }
            let platform = PLATFORM_ARGS.iter().find(|(k, _)| *k == name).map(|(_, v)| (*v).to_owned());
            let value = self
                .build_args
                .get(&name)
                .cloned()
                .or(default)
                .or_else(|| global.and_then(|g| g.get(&name)).map(str::to_owned))
                .or(platform)
                .unwrap_or_default();
            into.set(&name, value);
        }
        Ok(())
    }

    fn stage(
        &self,
        instructions: &[Instruction<'_>],
        base_config: &mut dyn FnMut(&str) -> Result<ImageConfig, String>,
    ) -> Result<Stage, DockerfileError> {
        let Some((Instruction::From(from), rest)) = instructions.split_first() else {
            unreachable!("a stage starts with FROM")
        };
        let line = self.lines.at(from.from.span.start);
        for flag in &from.options {
            match &*flag.name.value {
                "platform" => {
                    let platform = self.one_word(flag, &self.global_args, line)?;
                    if platform != "linux/amd64" && platform != "linux/x86_64" {
                        return Err(err(line, format!("--platform={platform}: only linux/amd64 images can be built")));
                    }
                }
                other => return Err(err(line, format!("FROM does not take --{other}"))),
            }
        }
        let image = word(&from.image.value, &self.global_args, self.escape).map_err(|e| err(line, e))?;
        if image.is_empty() {
            return Err(err(line, "FROM names no image (an ARG it uses is empty?)"));
        }
        let name = from.as_.as_ref().map(|(_, n)| n.value.to_ascii_lowercase());
        let (base, config) = if image.eq_ignore_ascii_case("scratch") {
            (Base::Scratch, ImageConfig::default())
        } else if let Some(stage) = self.stage_named(&image) {
            (Base::Stage(stage.index), stage.config.clone())
        } else {
            (Base::Image(image.clone()), base_config(&image).map_err(|e| err(line, e))?)
        };
        let mut state = StageState { config, args: Vars::default(), shell: DEFAULT_SHELL.map(String::from).to_vec() };
        if !state.config.env.iter().any(|(k, _)| k == "PATH") {
            state.config.env.insert(0, ("PATH".to_owned(), DEFAULT_PATH.to_owned()));
        }
        let base_workdir = state.config.working_dir.clone();
        let mut steps = Vec::new();
        for instruction in rest {
            steps.push(self.step(instruction, &mut state)?);
        }
        let workdir = (state.config.working_dir != base_workdir).then(|| state.config.working_dir.clone());
        Ok(Stage { index: self.stages.len(), name, base, line, steps, config: state.config, workdir })
    }

    /// The earlier stage called `name` (or numbered so).
    fn stage_named(&self, name: &str) -> Option<&Stage> {
        let lower = name.to_ascii_lowercase();
        self.stages.iter().find(|s| s.name.as_deref() == Some(&*lower))
    }

    fn one_word(&self, flag: &Flag<'_>, vars: &Vars, line: usize) -> Result<String, DockerfileError> {
        let value = flag.value.as_ref().ok_or_else(|| err(line, format!("--{} needs a value", flag.name.value)))?;
        word(&value.value, vars, self.escape).map_err(|e| err(line, e))
    }

    #[allow(clippy::too_many_lines)]
    fn step(&self, instruction: &Instruction<'_>, state: &mut StageState) -> Result<Step, DockerfileError> {
        let escape = self.escape;
        let config_step = |line, display: String| Ok(Step { line, display, action: Action::Config });
        match instruction {
            Instruction::Run(run) => {
                let line = self.lines.at(run.run.span.start);
                if let Some(flag) = run.options.first() {
                    return Err(err(line, format!("RUN --{} is not supported", flag.name.value)));
                }
                let (argv, display) = match (&run.arguments, run.here_docs.as_slice()) {
                    (Command::Exec(args), _) => {
                        let argv: Vec<String> = args.value.iter().map(|a| a.value.to_string()).collect();
                        let display = format!("RUN {}", serde_json::to_string(&argv).expect("strings serialize"));
                        (argv, display)
                    }
                    (Command::Shell(script), []) => {
                        let script = strip_continuations(script.value, escape);
                        let mut argv = state.shell.clone();
                        argv.push(script.clone());
                        (argv, format!("RUN {script}"))
                    }
                    (Command::Shell(script), [doc]) if script.value.trim_start().starts_with("<<") => {
                        let mut argv = state.shell.clone();
                        argv.push(doc.value.to_string());
                        (argv, format!("RUN {}", script.value.trim()))
                    }
                    _ => {
                        return Err(err(
                            line,
                            "RUN with a here-document is supported only as the whole command (RUN <<EOF)",
                        ))
                    }
                };
                let mut env = state.config.env.clone();
                for (k, v) in &state.args.0 {
                    if !env.iter().any(|(e, _)| e == k) {
                        env.push((k.clone(), v.clone()));
                    }
                }
                let workdir =
                    if state.config.working_dir.is_empty() { "/".to_owned() } else { state.config.working_dir.clone() };
                let run = RunStep { argv, env, user: state.config.user.clone(), workdir };
                Ok(Step { line, display, action: Action::Run(run) })
            }
            Instruction::Copy(copy) => {
                let line = self.lines.at(copy.copy.span.start);
                self.copy(line, "COPY", &copy.options, &copy.src, &copy.dest, false, state)
            }
            Instruction::Add(add) => {
                let line = self.lines.at(add.add.span.start);
                self.copy(line, "ADD", &add.options, &add.src, &add.dest, true, state)
            }
            Instruction::Arg(arg) => {
                let line = self.lines.of(&arg.arguments);
                let mut args = std::mem::take(&mut state.args);
                let mut scope = state.lookup();
                scope.0.retain(|(k, _)| !args.0.iter().any(|(a, _)| a == k));
                args.0.splice(0..0, scope.0);
                let declared_before: BTreeSet<String> = args.0.iter().map(|(k, _)| k.clone()).collect();
                self.declare_args(&arg.arguments, &mut args, Some(&self.global_args), line)?;
                // Only the ARGs themselves are kept (ENV stays in the config).
                let env: BTreeSet<&str> = state.config.env.iter().map(|(k, _)| k.as_str()).collect();
                args.0.retain(|(k, _)| !env.contains(k.as_str()) || !declared_before.contains(k));
                state.args = args;
                config_step(line, format!("ARG {}", arg.arguments.value.trim()))
            }
            Instruction::Env(env) => {
                let line = self.lines.of(&env.arguments);
                for (k, v) in pairs("ENV", &env.arguments.value, &state.lookup(), escape).map_err(|e| err(line, e))? {
                    state.config.env.retain(|(e, _)| *e != k);
                    state.config.env.push((k, v));
                }
                config_step(line, format!("ENV {}", env.arguments.value.trim()))
            }
            Instruction::Label(label) => {
                let line = self.lines.of(&label.arguments);
                for (k, v) in
                    pairs("LABEL", &label.arguments.value, &state.lookup(), escape).map_err(|e| err(line, e))?
                {
                    state.config.labels.insert(k, v);
                }
                config_step(line, format!("LABEL {}", label.arguments.value.trim()))
            }
            Instruction::Workdir(workdir) => {
                let line = self.lines.of(&workdir.arguments);
                let dir = word(&workdir.arguments.value, &state.lookup(), escape).map_err(|e| err(line, e))?;
                if dir.is_empty() {
                    return Err(err(line, "WORKDIR needs a path"));
                }
                let base = if state.config.working_dir.is_empty() { "/" } else { &state.config.working_dir };
                state.config.working_dir = join_abs(base, &dir);
                config_step(line, format!("WORKDIR {dir}"))
            }
            Instruction::User(user) => {
                let line = self.lines.of(&user.arguments);
                let user = word(&user.arguments.value, &state.lookup(), escape).map_err(|e| err(line, e))?;
                if user.is_empty() {
                    return Err(err(line, "USER needs a user"));
                }
                state.config.user.clone_from(&user);
                config_step(line, format!("USER {user}"))
            }
            Instruction::Cmd(cmd) => {
                let line = self.lines.at(cmd.cmd.span.start);
                state.config.cmd = command(&cmd.arguments, &state.shell, escape);
                config_step(line, format!("CMD {}", serde_json::to_string(&state.config.cmd).expect("serializes")))
            }
            Instruction::Entrypoint(entrypoint) => {
                let line = self.lines.at(entrypoint.entrypoint.span.start);
                state.config.entrypoint = command(&entrypoint.arguments, &state.shell, escape);
                // As Docker: an ENTRYPOINT resets the CMD the base image had.
                state.config.cmd.clear();
                let shown = serde_json::to_string(&state.config.entrypoint).expect("serializes");
                config_step(line, format!("ENTRYPOINT {shown}"))
            }
            Instruction::Shell(shell) => {
                let line = self.lines.at(shell.shell.span.start);
                state.shell = shell.arguments.iter().map(|a| a.value.to_string()).collect();
                config_step(line, format!("SHELL {}", serde_json::to_string(&state.shell).expect("serializes")))
            }
            Instruction::Expose(expose) => {
                let line = self.lines.at(expose.expose.span.start);
                let lookup = state.lookup();
                for port in &expose.arguments {
                    for port in words(&port.value, &lookup, escape).map_err(|e| err(line, e))? {
                        let (number, proto) = port.split_once('/').unwrap_or((&port, "tcp"));
                        let valid_range = number.split_once('-').map_or(number.parse::<u16>().is_ok(), |(a, b)| {
                            a.parse::<u16>().is_ok() && b.parse::<u16>().is_ok()
                        });
                        if !valid_range || !["tcp", "udp", "sctp"].contains(&&*proto.to_ascii_lowercase()) {
                            return Err(err(line, format!("EXPOSE {port}: expected PORT[/tcp|udp|sctp]")));
                        }
                        state.config.exposed_ports.insert(format!("{number}/{}", proto.to_ascii_lowercase()));
                    }
                }
                config_step(line, "EXPOSE".to_owned())
            }
            Instruction::Volume(volume) => {
                let line = self.lines.at(volume.volume.span.start);
                let lookup = state.lookup();
                let paths: Vec<String> = match &volume.arguments {
                    JsonOrStringArray::Json(list) => list.value.iter().map(|p| p.value.to_string()).collect(),
                    JsonOrStringArray::String(list) => list.iter().map(|p| p.value.to_string()).collect(),
                };
                for path in paths {
                    let path = word(&path, &lookup, escape).map_err(|e| err(line, e))?;
                    state.config.volumes.insert(join_abs("/", &path));
                }
                config_step(line, "VOLUME".to_owned())
            }
            Instruction::Stopsignal(signal) => {
                let line = self.lines.of(&signal.arguments);
                state.config.stop_signal =
                    word(&signal.arguments.value, &state.lookup(), escape).map_err(|e| err(line, e))?;
                config_step(line, format!("STOPSIGNAL {}", state.config.stop_signal))
            }
            Instruction::Healthcheck(check) => {
                let line = self.lines.at(check.healthcheck.span.start);
                state.config.healthcheck = Some(self.healthcheck(check, state, line)?);
                config_step(line, "HEALTHCHECK".to_owned())
            }
            Instruction::Maintainer(m) => {
                let line = self.lines.of(&m.name);
                state.config.labels.insert("maintainer".to_owned(), m.name.value.trim().to_owned());
                config_step(line, format!("MAINTAINER {}", m.name.value.trim()))
            }
            Instruction::Onbuild(onbuild) => {
                Err(err(self.lines.at(onbuild.onbuild.span.start), "ONBUILD is not supported"))
            }
            Instruction::From(_) => unreachable!("FROM starts the next stage"),
            _ => Err(err(0, "an instruction this version does not know")),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn copy(
        &self,
        line: usize,
        name: &str,
        options: &[Flag<'_>],
        src: &[Source<'_>],
        dest: &UnescapedString<'_>,
        add: bool,
        state: &StageState,
    ) -> Result<Step, DockerfileError> {
        let lookup = state.lookup();
        let (mut from, mut chown, mut chmod, mut checksum) = (CopyFrom::Context, None, None, None);
        for flag in options {
            match &*flag.name.value {
                "from" if !add => {
                    let from_name = self.one_word(flag, &lookup, line)?;
                    from = match self.stage_named(&from_name) {
                        Some(stage) => CopyFrom::Stage(stage.index),
                        None => match from_name.parse::<usize>() {
                            Ok(n) if n < self.stages.len() => CopyFrom::Stage(n),
                            Ok(n) => {
                                return Err(err(line, format!("--from={n}: there is no stage {n} before this one")))
                            }
                            Err(_) if self.later_stages.contains(&from_name.to_ascii_lowercase()) => {
                                return Err(err(
                                    line,
                                    format!("--from={from_name}: that stage comes later in the file"),
                                ))
                            }
                            Err(_) => CopyFrom::Image(from_name),
                        },
                    };
                }
                "chown" => chown = Some(self.one_word(flag, &lookup, line)?),
                "chmod" => {
                    let mode = self.one_word(flag, &lookup, line)?;
                    chmod = Some(
                        u32::from_str_radix(&mode, 8)
                            .ok()
                            .filter(|m| *m <= 0o7777)
                            .ok_or_else(|| err(line, format!("--chmod={mode}: expected an octal mode")))?,
                    );
                }
                "checksum" if add => {
                    let value = self.one_word(flag, &lookup, line)?;
                    let hex = value.strip_prefix("sha256:").filter(|h| {
                        h.len() == 64 && h.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
                    });
                    let hex = hex.ok_or_else(|| {
                        err(line, format!("--checksum={value}: expected sha256: and 64 lowercase hex digits"))
                    })?;
                    checksum = Some(hex.to_owned());
                }
                other => return Err(err(line, format!("{name} --{other} is not supported"))),
            }
        }
        let mut sources = Vec::new();
        let mut remote = 0;
        for source in src {
            match source {
                Source::Path(path) => {
                    let path = word(&path.value, &lookup, self.escape).map_err(|e| err(line, e))?;
                    if add && is_remote(&path) {
                        check_remote(&path).map_err(|e| err(line, format!("{name} {path}: {e}")))?;
                        remote += 1;
                    } else if path.contains("://") || path.starts_with("git@") {
                        let what = if add { "only http:// and https:// URLs can be fetched" } else { "use ADD" };
                        return Err(err(line, format!("{name} {path}: not a path in the build context ({what})")));
                    }
                    sources.push(path);
                }
                _ => return Err(err(line, format!("{name} from a here-document is not supported"))),
            }
        }
        if remote > 0 {
            if remote < sources.len() {
                return Err(err(line, format!("{name} cannot mix URLs with other sources: use one {name} for each")));
            }
            from = CopyFrom::Remote;
        } else if checksum.is_some() {
            return Err(err(line, format!("{name} --checksum is only for URL sources")));
        }
        let dest_word = word(&dest.value, &lookup, self.escape).map_err(|e| err(line, e))?;
        let workdir = if state.config.working_dir.is_empty() { "/" } else { &state.config.working_dir };
        let mut dest = join_abs(workdir, &dest_word);
        if (dest_word.ends_with('/') || dest_word == "." || dest_word.ends_with("/.")) && !dest.ends_with('/') {
            dest.push('/');
        }
        if remote > 0 && (dest.ends_with('/') || sources.len() > 1) {
            if let Some(url) = sources.iter().find(|u| remote_file_name(u).is_none()) {
                return Err(err(
                    line,
                    format!("{name} {url}: the URL's path names no file; give the destination a file name"),
                ));
            }
        }
        let flags: String = options
            .iter()
            .map(|f| {
                format!("--{}{} ", f.name.value, f.value.as_ref().map(|v| format!("={}", v.value)).unwrap_or_default())
            })
            .collect();
        let display = format!("{name} {flags}{} {dest_word}", sources.join(" "));
        // Docker does not unpack what it downloads.
        let unpack_archives = add && remote == 0;
        let copy = CopyStep { sources, from, dest, chown, chmod, unpack_archives, checksum };
        Ok(Step { line, display, action: Action::Copy(copy) })
    }

    fn healthcheck(
        &self,
        check: &parse_dockerfile::HealthcheckInstruction<'_>,
        state: &StageState,
        line: usize,
    ) -> Result<Healthcheck, DockerfileError> {
        let mut hc = Healthcheck::default();
        match &check.arguments {
            parse_dockerfile::HealthcheckArguments::Cmd { arguments, .. } => {
                hc.test = match arguments {
                    Command::Exec(args) => std::iter::once("CMD".to_owned())
                        .chain(args.value.iter().map(|a| a.value.to_string()))
                        .collect(),
                    Command::Shell(s) => vec!["CMD-SHELL".to_owned(), strip_continuations(s.value, self.escape)],
                    _ => return Err(err(line, "HEALTHCHECK CMD needs a command")),
                };
            }
            parse_dockerfile::HealthcheckArguments::None { .. } => hc.test = vec!["NONE".to_owned()],
            _ => return Err(err(line, "HEALTHCHECK needs CMD or NONE")),
        }
        for flag in &check.options {
            let value = self.one_word(flag, &state.lookup(), line)?;
            let name = &*flag.name.value;
            let duration = || {
                go_duration(&value).ok_or_else(|| err(line, format!("--{name}={value}: expected a duration like 30s")))
            };
            match name {
                "interval" => hc.interval = duration()?,
                "timeout" => hc.timeout = duration()?,
                "start-period" => hc.start_period = duration()?,
                "retries" => {
                    hc.retries =
                        value.parse().map_err(|_| err(line, format!("--retries={value}: expected a number")))?;
                }
                other => return Err(err(line, format!("HEALTHCHECK --{other} is not supported"))),
            }
        }
        Ok(hc)
    }
}

/// Whether an `ADD` source is a URL to fetch (`http://`, `https://`, any case).
fn is_remote(source: &str) -> bool {
    let lower = source.get(..8).unwrap_or(source).to_ascii_lowercase();
    lower.starts_with("http://") || lower.starts_with("https://")
}

/// Why a remote source cannot be fetched, if it cannot: a URL with a host, no credentials.
fn check_remote(source: &str) -> Result<(), String> {
    let url = url::Url::parse(source).map_err(|e| format!("not a valid URL: {e}"))?;
    if url.host().is_none() {
        return Err("the URL names no host".into());
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err("credentials in a URL are not supported".into());
    }
    Ok(())
}

/// The file name `ADD <url> <dir>/` gives a download: the last segment of the URL's path,
/// percent-decoded (as Docker names it); `None` when that names no file.
pub fn remote_file_name(source: &str) -> Option<String> {
    let url = url::Url::parse(source).ok()?;
    let last = url.path_segments()?.next_back()?;
    let name = percent_encoding::percent_decode_str(last).decode_utf8().ok()?;
    let usable = !name.is_empty() && name != "." && name != ".." && !name.contains(['/', '\0']);
    usable.then(|| name.into_owned())
}

/// A Go duration (`1m30s`, `500ms`) in nanoseconds.
fn go_duration(s: &str) -> Option<u64> {
    let mut total = 0u64;
    let mut rest = s;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(rest.len());
        let (number, tail) = rest.split_at(digits);
        let unit_len = tail.find(|c: char| c.is_ascii_digit()).unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_len);
        let scale: f64 = match unit {
            "ns" => 1.0,
            "us" | "µs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            _ => return None,
        };
        let n: f64 = number.parse().ok()?;
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        {
            total = total.checked_add((n * scale) as u64)?;
        }
        rest = tail;
    }
    Some(total)
}

/// `CMD`/`ENTRYPOINT` arguments: exec form as is, shell form in the stage's shell.
fn command(arguments: &Command<'_>, shell: &[String], escape: char) -> Vec<String> {
    match arguments {
        Command::Exec(args) => args.value.iter().map(|a| a.value.to_string()).collect(),
        Command::Shell(s) => {
            let mut argv = shell.to_vec();
            argv.push(strip_continuations(s.value, escape));
            argv
        }
        _ => Vec::new(),
    }
}

/// A shell-form command without its line continuations (`\` newline) and comment lines.
fn strip_continuations(text: &str, escape: char) -> String {
    let mut out = String::with_capacity(text.len());
    let mut lines = text.split('\n').peekable();
    while let Some(line) = lines.next() {
        let trimmed = line.trim_end_matches('\r');
        if trimmed.trim_start().starts_with('#') && !out.is_empty() {
            continue;
        }
        match trimmed.strip_suffix(escape) {
            Some(head) if lines.peek().is_some() => out.push_str(head),
            _ => {
                out.push_str(trimmed);
                if lines.peek().is_some() {
                    out.push('\n');
                }
            }
        }
    }
    out.trim().to_owned()
}

/// `path` made absolute against `base`, `.` and `..` resolved (a trailing `/` dropped).
fn join_abs(base: &str, path: &str) -> String {
    let joined = if path.starts_with('/') { path.to_owned() } else { format!("{base}/{path}") };
    let mut parts: Vec<&str> = Vec::new();
    for part in joined.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    format!("/{}", parts.join("/"))
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        && !name.as_bytes()[0].is_ascii_digit()
}

/// `KEY=VALUE …` (or the legacy `KEY VALUE`) of `ENV` and `LABEL`.
fn pairs(what: &str, text: &str, vars: &Vars, escape: char) -> Result<Vec<(String, String)>, String> {
    let text = strip_continuations(text, escape);
    let words = words(&text, vars, escape)?;
    match words.first() {
        None => Err(format!("{what} needs KEY=VALUE")),
        Some(first) if !first.contains('=') => {
            // Legacy form: the rest of the line is the value.
            let rest = text.trim_start()[first.len()..].trim();
            if rest.is_empty() {
                return Err(format!("{what} {first} needs a value (KEY=VALUE)"));
            }
            Ok(vec![(first.clone(), word(rest, vars, escape)?)])
        }
        Some(_) => words
            .into_iter()
            .map(|w| match w.split_once('=') {
                Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
                _ => Err(format!("{what}: {w:?} is not KEY=VALUE")),
            })
            .collect(),
    }
}

/// `text` as one word: quotes removed, variables expanded, whitespace kept.
fn word(text: &str, vars: &Vars, escape: char) -> Result<String, String> {
    Ok(lex(text.trim(), vars, escape, false)?.pop().unwrap_or_default())
}

/// `text` split into shell-like words: quotes removed, variables expanded.
fn words(text: &str, vars: &Vars, escape: char) -> Result<Vec<String>, String> {
    lex(text, vars, escape, true)
}

/// Docker's word processing: `'…'` literal, `"…"` with expansion and `\"`, `\$`, `\\`
/// escapes, `$NAME`, `${NAME}`, `${NAME:-default}`, `${NAME:+alternative}`.
fn lex(text: &str, vars: &Vars, escape: char, split: bool) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut current = String::new();
    let mut started = false;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            c if split && c.is_whitespace() => {
                if started {
                    out.push(std::mem::take(&mut current));
                    started = false;
                }
            }
            '\'' => {
                started = true;
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => current.push(c),
                        None => return Err(format!("unterminated single quote in {text:?}")),
                    }
                }
            }
            '"' => {
                started = true;
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some(c) if c == escape => match chars.next() {
                            Some(n @ ('"' | '$' | '\\' | '`')) => current.push(n),
                            Some(n) if n == escape => current.push(n),
                            Some(n) => {
                                current.push(c);
                                current.push(n);
                            }
                            None => return Err(format!("unterminated double quote in {text:?}")),
                        },
                        Some('$') => current.push_str(&variable(&mut chars, vars, escape)?),
                        Some(c) => current.push(c),
                        None => return Err(format!("unterminated double quote in {text:?}")),
                    }
                }
            }
            c if c == escape => {
                started = true;
                if let Some(n) = chars.next() {
                    current.push(n);
                }
            }
            '$' => {
                started = true;
                current.push_str(&variable(&mut chars, vars, escape)?);
            }
            c => {
                started = true;
                current.push(c);
            }
        }
    }
    if started || !split {
        out.push(current);
    }
    Ok(out)
}

/// The variable name at `chars` (letters, digits, `_`), consumed.
fn variable_name(chars: &mut std::iter::Peekable<std::str::Chars<'_>>) -> String {
    let mut name = String::new();
    while let Some(&c) = chars.peek().filter(|c| c.is_ascii_alphanumeric() || **c == '_') {
        name.push(c);
        chars.next();
    }
    name
}

/// The value of the variable after a `$`.
fn variable(chars: &mut std::iter::Peekable<std::str::Chars<'_>>, vars: &Vars, escape: char) -> Result<String, String> {
    if chars.peek() == Some(&'{') {
        chars.next();
        let name = variable_name(chars);
        let value = vars.get(&name);
        let mut modifier = String::new();
        let mut depth = 0;
        loop {
            match chars.next() {
                Some('}') if depth == 0 => break,
                Some(c) => {
                    if c == '{' {
                        depth += 1;
                    } else if c == '}' {
                        depth -= 1;
                    }
                    modifier.push(c);
                }
                None => return Err(format!("missing '}}' after ${{{name}")),
            }
        }
        if modifier.is_empty() {
            return Ok(value.unwrap_or_default().to_owned());
        }
        let (op, word_text) = if let Some(rest) = modifier.strip_prefix(":-") {
            (":-", rest)
        } else if let Some(rest) = modifier.strip_prefix(":+") {
            (":+", rest)
        } else if let Some(rest) = modifier.strip_prefix('-') {
            ("-", rest)
        } else if let Some(rest) = modifier.strip_prefix('+') {
            ("+", rest)
        } else {
            return Err(format!("unsupported substitution ${{{name}{modifier}}}"));
        };
        let alternative = || word(word_text, vars, escape);
        return match (op, value) {
            (":-", Some(v)) if !v.is_empty() => Ok(v.to_owned()),
            (":-", _) => alternative(),
            ("-", Some(v)) => Ok(v.to_owned()),
            ("-", None) => alternative(),
            (":+", Some(v)) if !v.is_empty() => alternative(),
            ("+", Some(_)) => alternative(),
            _ => Ok(String::new()),
        };
    }
    let name = variable_name(chars);
    if name.is_empty() {
        return Ok("$".to_owned());
    }
    Ok(vars.get(&name).unwrap_or_default().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan_of(text: &str, args: &[(&str, &str)], target: Option<&str>) -> Result<Plan, DockerfileError> {
        let args: BTreeMap<String, String> = args.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        plan(text, &args, target, &mut |image| {
            if image == "missing" {
                return Err("image not found: missing".into());
            }
            Ok(ImageConfig {
                env: vec![("PATH".into(), "/bin".into()), ("BASE".into(), image.into())],
                ..Default::default()
            })
        })
    }

    fn run_of(step: &Step) -> &RunStep {
        match &step.action {
            Action::Run(run) => run,
            other => panic!("not a RUN: {other:?}"),
        }
    }

    #[test]
    fn args_env_and_workdir_reach_run_steps() {
        let plan = plan_of(
            "ARG VERSION=3.19\nFROM alpine:${VERSION} AS base\nARG VERSION\nARG MODE=debug\n\
             ENV APP=/srv/app PATH=$PATH:/opt/bin\nWORKDIR $APP\nWORKDIR sub\nUSER nobody\n\
             RUN echo \"$MODE\" \\\n  && make\nRUN [\"/bin/true\", \"$MODE\"]\n",
            &[("MODE", "release")],
            None,
        )
        .unwrap();
        let stage = &plan.stages[0];
        assert_eq!(stage.base, Base::Image("alpine:3.19".into()));
        let run = run_of(&stage.steps[6]);
        assert_eq!(run.argv, ["/bin/sh", "-c", "echo \"$MODE\"   && make"]);
        assert_eq!(run.workdir, "/srv/app/sub");
        assert_eq!(run.user, "nobody");
        assert!(run.env.contains(&("MODE".into(), "release".into())), "{:?}", run.env);
        assert!(run.env.contains(&("VERSION".into(), "3.19".into())), "a redeclared global ARG");
        assert!(run.env.contains(&("PATH".into(), "/bin:/opt/bin".into())));
        // Exec form is not expanded.
        assert_eq!(run_of(&stage.steps[7]).argv, ["/bin/true", "$MODE"]);
        assert_eq!(stage.steps[6].line, 9);
        assert_eq!(stage.config.working_dir, "/srv/app/sub");
        assert!(!stage.config.env.iter().any(|(k, _)| k == "MODE"), "ARGs are not kept in the image");
    }

    #[test]
    fn stages_copy_from_and_targets() {
        let text = "FROM alpine AS build\nRUN make\nFROM debian AS unused\nRUN x\nFROM scratch\n\
                    COPY --from=build --chown=1:2 --chmod=755 /out/app /app\nCOPY a b ./dir/\nCMD [\"/app\"]\n";
        let plan = plan_of(text, &[], None).unwrap();
        assert_eq!(plan.order, [0, 2], "the unused stage is not built");
        assert_eq!(plan.images(), [("alpine".to_owned(), 1)]);
        let Action::Copy(copy) = &plan.stages[2].steps[0].action else { panic!() };
        assert_eq!(
            (copy.from.clone(), copy.chown.as_deref(), copy.chmod),
            (CopyFrom::Stage(0), Some("1:2"), Some(0o755))
        );
        let Action::Copy(copy) = &plan.stages[2].steps[1].action else { panic!() };
        assert_eq!((copy.sources.clone(), copy.dest.as_str()), (vec!["a".to_owned(), "b".to_owned()], "/dir/"));
        assert_eq!(plan.stages[2].config.cmd, ["/app"]);
        let plan = plan_of(text, &[], Some("UNUSED")).unwrap();
        assert_eq!(plan.order, [1]);
    }

    #[test]
    fn add_of_urls_names_its_files_like_docker() {
        let sum = "ab".repeat(32);
        let text = format!(
            "FROM alpine\nWORKDIR /srv\nARG V=1.2\nADD --chown=1:2 --chmod=644 --checksum=sha256:{sum} \
             https://example.com/dl/tool-$V.tar.gz?x=1 ./\nADD http://example.com/a%20b HTTP://example.com/c /many/\n\
             ADD http://example.com/ /named\nADD local.tar.gz /unpacked/\n"
        );
        let plan = plan_of(&text, &[], None).unwrap();
        let copies: Vec<&CopyStep> = plan.stages[0]
            .steps
            .iter()
            .filter_map(|s| match &s.action {
                Action::Copy(c) => Some(c),
                _ => None,
            })
            .collect();
        let one = copies[0];
        assert_eq!(one.from, CopyFrom::Remote);
        assert_eq!(one.sources, ["https://example.com/dl/tool-1.2.tar.gz?x=1"]);
        assert_eq!((one.dest.as_str(), one.chown.as_deref(), one.chmod), ("/srv/", Some("1:2"), Some(0o644)));
        assert_eq!(one.checksum.as_deref(), Some(sum.as_str()));
        assert!(!one.unpack_archives, "Docker does not unpack remote archives");
        assert_eq!(remote_file_name(&one.sources[0]).as_deref(), Some("tool-1.2.tar.gz"));
        assert_eq!((copies[1].from.clone(), copies[1].dest.as_str()), (CopyFrom::Remote, "/many/"));
        assert_eq!(remote_file_name(&copies[1].sources[0]).as_deref(), Some("a b"));
        assert_eq!(remote_file_name("http://example.com/x/..%2F..%2Fetc"), None, "a name never leaves its directory");
        // A named destination needs no name from the URL.
        assert_eq!((copies[2].from.clone(), copies[2].dest.as_str()), (CopyFrom::Remote, "/named"));
        assert_eq!((copies[3].from.clone(), copies[3].unpack_archives), (CopyFrom::Context, true));
    }

    #[test]
    fn config_instructions() {
        let plan = plan_of(
            "FROM x\nLABEL a=1 \"b c\"='d e'\nEXPOSE 80 53/udp\nVOLUME [\"/data\"]\nSTOPSIGNAL SIGINT\n\
             HEALTHCHECK --interval=1m30s --retries=2 CMD curl -f localhost\nSHELL [\"/bin/bash\", \"-c\"]\n\
             ENTRYPOINT run it\nENV OLD form with spaces\n",
            &[],
            None,
        )
        .unwrap();
        let c = &plan.stages[0].config;
        assert_eq!(c.labels["a"], "1");
        assert_eq!(c.labels["b c"], "d e");
        assert_eq!(c.exposed_ports.iter().collect::<Vec<_>>(), ["53/udp", "80/tcp"]);
        assert!(c.volumes.contains("/data"));
        assert_eq!(c.stop_signal, "SIGINT");
        let hc = c.healthcheck.as_ref().unwrap();
        assert_eq!((hc.interval, hc.retries), (90_000_000_000, 2));
        assert_eq!(hc.test, ["CMD-SHELL", "curl -f localhost"]);
        assert_eq!(c.entrypoint, ["/bin/bash", "-c", "run it"]);
        assert!(c.env.contains(&("OLD".into(), "form with spaces".into())));
    }

    #[test]
    fn expansion_forms() {
        let vars = Vars(vec![("A".into(), "x".into()), ("E".into(), String::new())]);
        let w = |s| word(s, &vars, '\\').unwrap();
        assert_eq!(w("${A}-$A-${B:-dflt}-${E:-e}-${A:+alt}-${B:+no}-'$A'-\"$A\"-\\$A"), "x-x-dflt-e-alt--$A-x-$A");
        assert_eq!(words("a 'b c' \"d $A\"", &vars, '\\').unwrap(), ["a", "b c", "d x"]);
        assert!(word("'open", &vars, '\\').is_err());
        assert_eq!(go_duration("500ms"), Some(500_000_000));
        assert_eq!(go_duration("1h"), Some(3_600_000_000_000));
        assert_eq!(go_duration("soon"), None);
    }

    #[test]
    fn bad_input_names_its_line() {
        let only_for_urls = format!("FROM alpine\nADD --checksum=sha256:{} local /a\n", "0".repeat(64));
        let cases: [(&str, usize, &str); 16] = [
            ("FROM alpine\nRUN true\nFROBNICATE now\n", 3, ""),
            ("RUN true\n", 1, "FROM"),
            ("FROM alpine\nCOPY --from=nosuch/x:1 a b\nCOPY --from=7 a b\n", 3, "no stage 7"),
            ("FROM alpine AS a\nCOPY --from=b x y\nFROM alpine AS b\n", 2, "comes later"),
            ("FROM --platform=linux/arm64 alpine\n", 1, "only linux/amd64"),
            ("FROM missing\n", 1, "image not found"),
            ("FROM alpine\nADD git@github.com:a/b.git /x\n", 2, "only http:// and https://"),
            ("FROM alpine\nCOPY https://example.com/x /x\n", 2, "use ADD"),
            ("FROM alpine\nADD https://example.com/ /d/\n", 2, "names no file"),
            ("FROM alpine\nADD https://example.com/a local /d/\n", 2, "cannot mix"),
            ("FROM alpine\nADD https://user:pw@example.com/a /a\n", 2, "credentials"),
            ("FROM alpine\nADD --checksum=md5:00 https://example.com/a /a\n", 2, "sha256:"),
            (&only_for_urls, 2, "only for URL"),
            ("FROM alpine\nRUN --mount=type=cache,target=/x true\n", 2, "RUN --mount"),
            ("FROM alpine\nCOPY --chmod=9z a b\n", 2, "octal"),
            ("FROM alpine\nENV\n", 2, ""),
        ];
        for (text, line, words) in cases {
            let e = plan_of(text, &[], None).unwrap_err();
            assert_eq!(e.line, line, "{text:?}: {e}");
            assert!(e.to_string().contains(words), "{text:?}: {e}");
            assert!(e.to_string().starts_with(&format!("Dockerfile line {line}: ")), "{e}");
        }
        let e = plan_of("FROM alpine AS a\n", &[], Some("b")).unwrap_err();
        assert!(e.to_string().contains("target stage \"b\""), "{e}");
    }
}
