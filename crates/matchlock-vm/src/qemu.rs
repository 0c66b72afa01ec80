//! QEMU `microvm` backend (KVM or TCG). Host and guest talk over one virtio-serial port
//! carrying the stream multiplexer ([`crate::mux`]), a device QEMU can save and restore.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use matchlock_protocol::{READY_ENTROPY, READY_PORT};
use tokio::io::AsyncWriteExt;
use tokio::net::UnixListener;
use tokio::process::{Child, Command};
use tokio::time::{sleep, Instant};

use crate::accel::Accel;
use crate::mux::Mux;
use crate::qmp::Qmp;
use crate::{
    tools, Backend, BoxFuture, Capabilities, Connector, Machine, MachineSpec, NicTransport, RestoredMemory,
    Snapshotter, VmDir, VmError,
};

/// How long to wait for QEMU to create its sockets.
const HELPER_START_TIMEOUT: Duration = Duration::from_secs(5);
/// Bytes of console output quoted in boot errors.
const CONSOLE_TAIL: usize = 2000;

/// Boots VMs with QEMU's `microvm` machine.
#[derive(Debug, Clone)]
pub struct QemuBackend {
    qemu: PathBuf,
    accel: Accel,
}

/// virtio-mmio transports of QEMU's `microvm` machine; the serial pipe takes one, the NIC
/// another, disks the rest.
const MICROVM_TRANSPORTS: usize = 8;

impl QemuBackend {
    /// The backend for this host: its QEMU ([`tools`]), on KVM when usable with `kernel`
    /// (probed once, cached), else TCG ([`crate::accel::select`]).
    pub async fn detect(kernel: &Path) -> Result<Self, VmError> {
        let qemu = tools::qemu()?;
        let accel = crate::accel::select(&qemu, kernel).await?;
        Ok(Self { qemu, accel })
    }

    /// The accelerator in use.
    pub fn accel(&self) -> Accel {
        self.accel
    }
}

fn check_option_path(p: &Path) -> Result<String, VmError> {
    let s = p.to_str().ok_or_else(|| VmError::InvalidSpec(format!("path is not UTF-8: {}", p.display())))?;
    if s.contains(',') {
        return Err(VmError::InvalidSpec(format!("QEMU cannot take paths containing ',': {s}")));
    }
    Ok(s.to_owned())
}

/// Most console output kept per VM; the guest decides how much it prints, so it is capped.
const CONSOLE_LOG_LIMIT: u64 = 16 * 1024 * 1024;
/// Most output kept of QEMU's own log (its stderr): what the guest makes it complain about is
/// capped too.
const HELPER_LOG_LIMIT: u64 = 1024 * 1024;

/// Copies `from` into `log` until EOF, keeping at most `limit` bytes; output beyond that (or
/// after a failed log write) is read and dropped so the writer never blocks on it.
async fn capture_capped(mut from: impl tokio::io::AsyncRead + Unpin, log: std::fs::File, limit: u64) {
    use tokio::io::AsyncReadExt;
    let mut log = tokio::fs::File::from_std(log);
    let mut kept = 0u64;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if kept < limit {
            let take = n.min(usize::try_from(limit - kept).unwrap_or(usize::MAX));
            if log.write_all(&buf[..take]).await.is_err() {
                kept = limit;
                continue;
            }
            kept += take as u64;
            if kept == limit {
                let note = format!("\n[matchlock: output beyond {} KiB dropped]\n", limit >> 10);
                let _ = log.write_all(note.as_bytes()).await;
            }
        }
    }
    let _ = log.flush().await;
}

/// A helper's stderr into its log ([`HELPER_LOG_LIMIT`]), until the helper exits.
fn capture_stderr(child: &mut Child, log: std::fs::File) {
    if let Some(stderr) = child.stderr.take() {
        tokio::spawn(capture_capped(stderr, log, HELPER_LOG_LIMIT));
    }
}

/// The serial console into the VM's log ([`CONSOLE_LOG_LIMIT`]); `stopped` turns true at EOF,
/// i.e. when QEMU has exited.
async fn capture_console(
    console: tokio::process::ChildStdout,
    log: std::fs::File,
    stopped: tokio::sync::watch::Sender<bool>,
) {
    capture_capped(console, log, CONSOLE_LOG_LIMIT).await;
    let _ = stopped.send(true);
}

fn tail(path: &Path) -> String {
    let bytes = std::fs::read(path).unwrap_or_default();
    let start = bytes.len().saturating_sub(CONSOLE_TAIL);
    let text = String::from_utf8_lossy(&bytes[start..]).trim().to_owned();
    if text.is_empty() {
        String::new()
    } else {
        format!(
            "\n--- {} (last lines) ---\n{text}",
            path.file_name().map_or_else(String::new, |n| n.to_string_lossy().into_owned())
        )
    }
}

impl QemuBackend {
    /// QEMU's command line. Guest RAM is the file `ram`: shared (a fresh boot or a copied
    /// snapshot, so that a snapshot can skip it and copy the file), or a snapshot's, mapped
    /// copy-on-write. `incoming`: the machine waits for a saved state.
    fn qemu_args(
        &self,
        spec: &MachineSpec,
        ram: &Path,
        memory: Option<RestoredMemory>,
    ) -> Result<Vec<String>, VmError> {
        let mem = format!("{}M", spec.memory_mb);
        let backing = match memory {
            Some(RestoredMemory::CopyOnWrite) => "share=off,readonly=on,rom=off",
            None | Some(RestoredMemory::Copied) => "share=on",
        };
        let mut args: Vec<String> = [
            "-M",
            "microvm,acpi=off,x-option-roms=off,rtc=off,pcie=off",
            "-accel",
            self.accel.qemu_name(),
            "-cpu",
            self.accel.cpu_model(),
            "-smp",
            &spec.vcpus.to_string(),
            "-m",
            &mem,
            "-object",
            &format!("memory-backend-file,id=mem,size={mem},mem-path={},{backing}", check_option_path(ram)?),
            "-numa",
            "node,memdev=mem",
            "-nodefaults",
            "-no-user-config",
            // QEMU's own seccomp filter: a guest that escapes into QEMU cannot execute a
            // program, gain privileges, or use obsolete or resource-control system calls.
            "-sandbox",
            "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
            "-nographic",
            "-no-reboot",
            "-serial",
            "stdio",
            "-kernel",
            &check_option_path(&spec.kernel)?,
            "-append",
            &format!(
                "console=ttyS0 reboot=t panic=-1 quiet root=/dev/vda ro rootfstype=ext4 rootwait init=/init {}",
                spec.cmdline
            ),
            "-device",
            "virtio-serial-device,max_ports=2",
            "-chardev",
            &format!("socket,id=mux,path={},server=on,wait=off", check_option_path(&spec.dir.backend_socket("mux"))?),
            "-device",
            &format!("virtserialport,chardev=mux,name={}", matchlock_protocol::mux::PORT_NAME),
            "-qmp",
            &format!("unix:{},server=on,wait=off", check_option_path(&spec.dir.backend_socket("qmp"))?),
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        // Linux names virtio-blk disks in the order QEMU adds them: disk i is vd<a+i>.
        for (i, disk) in spec.disks.iter().enumerate() {
            let ro = if disk.read_only { "on" } else { "off" };
            let cache = if disk.persistent { "writeback" } else { "unsafe" };
            args.push("-drive".into());
            args.push(format!(
                "id=disk{i},file={},format=raw,if=none,readonly={ro},cache={cache},discard=unmap",
                check_option_path(&disk.path)?
            ));
            args.push("-device".into());
            args.push(format!("virtio-blk-device,drive=disk{i}"));
        }
        if let Some(nic) = &spec.nic {
            let mac = nic.mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":");
            args.push("-netdev".into());
            args.push(match &nic.socket {
                Some(socket) => {
                    format!("stream,id=net0,server=off,addr.type=unix,addr.path={}", check_option_path(socket)?)
                }
                None => "user,id=net0,net=192.168.100.0/24,host=192.168.100.1".to_owned(),
            });
            args.push("-device".into());
            args.push(format!("virtio-net-device,netdev=net0,mac={mac},host_mtu={}", nic.mtu));
        }
        if memory.is_some() {
            args.extend(["-incoming".to_owned(), "defer".to_owned()]);
        }
        Ok(args)
    }
}

impl Backend for QemuBackend {
    fn name(&self) -> &'static str {
        "qemu"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities { max_disks: MICROVM_TRANSPORTS - 2, nic: NicTransport::UnixStream, snapshots: true }
    }

    fn build_id(&self) -> String {
        use std::os::unix::fs::MetadataExt;
        let binary = std::fs::metadata(&self.qemu).map_or((0, 0, 0), |m| (m.len(), m.mtime(), m.ino()));
        format!("{} {binary:?} {} {}", self.qemu.display(), self.accel.qemu_name(), self.accel.cpu_model())
    }

    fn launch(&self, spec: MachineSpec) -> BoxFuture<'_, Result<Box<dyn Machine>, VmError>> {
        Box::pin(async move { Ok(Box::new(self.start(spec, None).await?) as Box<dyn Machine>) })
    }

    fn restore(
        &self,
        spec: MachineSpec,
        from: PathBuf,
        memory: RestoredMemory,
    ) -> BoxFuture<'_, Result<Box<dyn Machine>, VmError>> {
        Box::pin(async move { Ok(Box::new(self.start(spec, Some((&from, memory))).await?) as Box<dyn Machine>) })
    }
}

/// The shared guest RAM file of a fresh boot: on tmpfs, private to the user, and unlinked
/// once QEMU has mapped it (the owner keeps a descriptor for snapshots).
fn fresh_ram(dir: &VmDir, memory_mb: u64) -> Result<(PathBuf, std::fs::File), VmError> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = ram_file(dir);
    let _ = std::fs::remove_file(&path);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(VmError::io(format!("cannot create the guest RAM file {}", path.display())))?;
    file.set_len(memory_mb << 20).map_err(VmError::io("cannot size the guest RAM file"))?;
    Ok((path, file))
}

/// Where fresh guest RAM lives (tmpfs).
const RAM_DIR: &str = "/dev/shm";

/// The name of a cold-booted VM's RAM file while QEMU starts (`gc` removes it after a crash).
pub fn ram_file(dir: &VmDir) -> PathBuf {
    let name = dir.path().file_name().map_or_else(|| "vm".into(), |n| n.to_string_lossy().into_owned());
    PathBuf::from(format!("{RAM_DIR}/matchlock-{}-{name}.ram", nix::unistd::getuid()))
}

/// Files of a snapshot directory.
const SNAPSHOT_RAM: &str = "ram";
const SNAPSHOT_STATE: &str = "state";

fn snapshot_disk(index: usize) -> String {
    format!("disk-{index}")
}

/// Copies `from` into a new file `to` (mode 0600), holes kept (RAM files and disks are
/// mostly holes).
pub fn copy_sparse(from: &std::fs::File, to: &Path) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    let len = from.metadata()?.len();
    let out = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(to)?;
    out.set_len(len)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut at: i64 = 0;
    while (at as u64) < len {
        let data = match nix::unistd::lseek(from.as_raw_fd(), at, nix::unistd::Whence::SeekData) {
            Ok(d) => d,
            Err(nix::errno::Errno::ENXIO) => break,
            Err(e) => return Err(e.into()),
        };
        let hole = nix::unistd::lseek(from.as_raw_fd(), data, nix::unistd::Whence::SeekHole)?;
        let mut pos = data as u64;
        while pos < hole as u64 {
            let want = buf.len().min((hole as u64 - pos) as usize);
            let n = from.read_at(&mut buf[..want], pos)?;
            if n == 0 {
                break;
            }
            if buf[..n].iter().any(|&b| b != 0) {
                out.write_all_at(&buf[..n], pos)?;
            }
            pos += n as u64;
        }
        at = hole;
    }
    Ok(())
}

impl QemuBackend {
    /// Boots `spec`, or with `restore` resumes the snapshot in that directory.
    async fn start(&self, spec: MachineSpec, restore: Option<(&Path, RestoredMemory)>) -> Result<QemuMachine, VmError> {
        if spec.disks.len() > self.capabilities().max_disks {
            return Err(VmError::InvalidSpec(format!(
                "{} disks, but microvm has room for {}",
                spec.disks.len(),
                self.capabilities().max_disks
            )));
        }
        matchlock_api::paths::create_private_dir(&spec.dir.logs())
            .map_err(VmError::io("cannot create the VM directory"))?;
        for socket in ["mux", "qmp"] {
            let _ = std::fs::remove_file(spec.dir.backend_socket(socket));
        }
        let (stopped_tx, stopped) = tokio::sync::watch::channel(false);
        let mut machine = QemuMachine {
            dir: spec.dir.clone(),
            qemu: None,
            mux: None,
            console: None,
            exit: None,
            stopped,
            stopped_tx: Some(stopped_tx),
            ram: None,
            ram_path: None,
            memory_mb: spec.memory_mb,
            disks: spec.disks.clone(),
            snapshotting: Arc::new(tokio::sync::Mutex::new(())),
        };
        let started = match restore {
            None => self.boot(&mut machine, &spec).await,
            Some((from, memory)) => self.resume(&mut machine, &spec, from, memory).await,
        };
        if let Some(path) = machine.ram_path.take() {
            // QEMU has mapped it (or failed): the name is no longer needed.
            let _ = std::fs::remove_file(path);
        }
        match started {
            Ok(()) => Ok(machine),
            Err(e) => {
                // Leave nothing running: stop and reap QEMU before reporting.
                let _ = Box::new(machine).shutdown().await;
                Err(e)
            }
        }
    }

    /// Spawns QEMU with `args`, its console and log captured.
    fn spawn_qemu(&self, machine: &mut QemuMachine, spec: &MachineSpec, args: &[String]) -> Result<(), VmError> {
        let mut qemu = spawn(Command::new(&self.qemu).args(args).stdout(Stdio::piped()).stderr(Stdio::piped()))?;
        capture_stderr(&mut qemu, log_file(&spec.dir.helper_log("qemu"))?);
        let console = qemu.stdout.take().expect("stdout is piped");
        let stopped = machine.stopped_tx.take().expect("one console per machine");
        machine.console = Some(tokio::spawn(capture_console(console, log_file(&spec.dir.console_log())?, stopped)));
        machine.qemu = Some(qemu);
        tracing::debug!(
            "QEMU started ({}, {} vCPUs, {} MB, {} disks)",
            self.accel.qemu_name(),
            spec.vcpus,
            spec.memory_mb,
            spec.disks.len()
        );
        Ok(())
    }

    /// Joins QEMU's serial pipe and starts the multiplexer on it.
    async fn join_pipe(machine: &mut QemuMachine, spec: &MachineSpec) -> Result<Mux, VmError> {
        let mux_socket = spec.dir.backend_socket("mux");
        let pipe = tokio::select! {
            pipe = connect_when_listening(&mux_socket) => pipe?,
            status = machine.wait_qemu() => {
                return Err(VmError::BootFailed { status, details: tail(&spec.dir.helper_log("qemu")) });
            }
        };
        let mux = Mux::start(pipe, spec.dir.clone());
        machine.mux = Some(mux.clone());
        Ok(mux)
    }

    /// Waits for `work` unless QEMU exits or the boot timeout passes first.
    async fn unless_exited<T>(
        machine: &mut QemuMachine,
        spec: &MachineSpec,
        work: impl std::future::Future<Output = Result<T, VmError>>,
    ) -> Result<T, VmError> {
        tokio::select! {
            done = work => done,
            status = machine.wait_qemu() => {
                if let Some(console) = machine.console.take() {
                    let _ = console.await;
                }
                let details = format!("{}{}", tail(&spec.dir.helper_log("qemu")), tail(&spec.dir.console_log()));
                Err(VmError::BootFailed { status, details })
            }
            () = sleep(spec.boot_timeout) => Err(VmError::BootTimeout(spec.boot_timeout, tail(&spec.dir.console_log()))),
        }
    }

    /// A cold boot: starts QEMU, joins its serial pipe, then waits for the guest's ready
    /// signal.
    async fn boot(&self, machine: &mut QemuMachine, spec: &MachineSpec) -> Result<(), VmError> {
        let (ram_path, ram) = fresh_ram(&spec.dir, spec.memory_mb)?;
        machine.ram_path = Some(ram_path.clone());
        machine.ram = Some(Arc::new(ram));
        let args = self.qemu_args(spec, &ram_path, None)?;
        let ready_path = spec.dir.port_listener(READY_PORT);
        let _ = std::fs::remove_file(&ready_path);
        let ready =
            UnixListener::bind(&ready_path).map_err(VmError::io("cannot listen for the guest's ready signal"))?;
        let qemu_started = Instant::now();
        self.spawn_qemu(machine, spec, &args)?;
        let result = async {
            Self::join_pipe(machine, spec).await?;
            let ready = async {
                let (mut signal, _) = ready.accept().await.map_err(VmError::io("ready socket failed"))?;
                // The guest seeds its RNG with this before it runs anything.
                let mut entropy = [0u8; READY_ENTROPY];
                crate::host_random(&mut entropy).map_err(VmError::io("cannot read /dev/urandom"))?;
                signal.write_all(&entropy).await.map_err(VmError::io("cannot answer the guest's ready signal"))
            };
            Self::unless_exited(machine, spec, ready).await
        }
        .await;
        let _ = std::fs::remove_file(&ready_path);
        result?;
        tracing::debug!(
            "boot: guest agent ready {} ms after QEMU started (kernel and guest-init: see logs/vm.log)",
            qemu_started.elapsed().as_millis()
        );
        Ok(())
    }

    /// A restore: the snapshot's writable disks copied to the spec's, QEMU started on the
    /// snapshot's RAM (copy-on-write) and device state, then a new pipe session: the guest
    /// drops the old host's streams and answers.
    async fn resume(
        &self,
        machine: &mut QemuMachine,
        spec: &MachineSpec,
        from: &Path,
        memory: RestoredMemory,
    ) -> Result<(), VmError> {
        let started = Instant::now();
        let mut copies: Vec<(PathBuf, PathBuf)> = spec
            .disks
            .iter()
            .enumerate()
            .filter(|(_, d)| !d.read_only && !d.persistent)
            .map(|(i, disk)| (from.join(snapshot_disk(i)), disk.path.clone()))
            .collect();
        let ram = match memory {
            RestoredMemory::CopyOnWrite => from.join(SNAPSHOT_RAM),
            RestoredMemory::Copied => {
                let path = ram_file(&spec.dir);
                copies.push((from.join(SNAPSHOT_RAM), path.clone()));
                path
            }
        };
        // Sparse copies of a few to hundreds of MB: not on the runtime's threads.
        tokio::task::spawn_blocking(move || {
            copies.iter().try_for_each(|(saved, copy)| {
                let _ = std::fs::remove_file(copy);
                std::fs::File::open(saved)
                    .and_then(|f| copy_sparse(&f, copy))
                    .map_err(VmError::io(format!("cannot copy the snapshot's {}", saved.display())))
            })
        })
        .await
        .map_err(|e| VmError::io("copying the snapshot")(e.into()))??;
        if memory == RestoredMemory::Copied {
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&ram)
                .map_err(VmError::io(format!("cannot open the guest RAM file {}", ram.display())))?;
            machine.ram_path = Some(ram.clone());
            machine.ram = Some(Arc::new(file));
        }
        let args = self.qemu_args(spec, &ram, Some(memory))?;
        self.spawn_qemu(machine, spec, &args)?;
        let state = check_option_path(&from.join(SNAPSHOT_STATE))?;
        let qmp_socket = spec.dir.backend_socket("qmp");
        let incoming = async {
            let mut qmp = connect_qmp(&qmp_socket).await?;
            qmp.execute("migrate-set-capabilities", ignore_shared()).await?;
            qmp.execute("migrate-incoming", serde_json::json!({ "uri": format!("file:{state}") })).await?;
            qmp.wait_migration().await?;
            // The saved VM was stopped, so the loaded one is paused until told.
            qmp.execute("cont", serde_json::json!({})).await.map(|_| ())
        };
        Self::unless_exited(machine, spec, incoming).await?;
        let mux = Self::join_pipe(machine, spec).await?;
        Self::unless_exited(machine, spec, async {
            mux.ready().await.map_err(VmError::io("the restored guest did not answer"))
        })
        .await?;
        tracing::debug!("restore: guest running again {} ms after the restore began", started.elapsed().as_millis());
        Ok(())
    }
}

/// The migration capability that leaves shared RAM out of the saved state.
fn ignore_shared() -> serde_json::Value {
    serde_json::json!({ "capabilities": [{ "capability": "x-ignore-shared", "state": true }] })
}

/// Connects to QEMU's QMP socket, waiting while QEMU creates it (the file can exist a moment
/// before QEMU listens on it).
async fn connect_qmp(path: &Path) -> Result<Qmp, VmError> {
    Qmp::start(connect_when_listening(path).await?).await
}

/// Connects to a socket QEMU is about to create.
async fn connect_when_listening(path: &Path) -> Result<tokio::net::UnixStream, VmError> {
    let started = Instant::now();
    loop {
        match tokio::net::UnixStream::connect(path).await {
            Ok(stream) => return Ok(stream),
            Err(e) if started.elapsed() > HELPER_START_TIMEOUT => {
                return Err(VmError::Io { context: format!("cannot connect to {}", path.display()), source: e })
            }
            Err(_) => sleep(Duration::from_millis(2)).await,
        }
    }
}

fn log_file(path: &Path) -> Result<std::fs::File, VmError> {
    matchlock_api::paths::append_private(path).map_err(VmError::io(format!("cannot open {}", path.display())))
}

/// Spawns a helper with the minimal helper environment, that dies with us (whatever thread
/// asks: see [`spawn_on_lifetime_thread`]) and that is killed if its handle is dropped.
pub(crate) fn spawn(cmd: &mut Command) -> Result<Child, VmError> {
    let program = cmd.as_std().get_program().to_string_lossy().into_owned();
    cmd.stdin(Stdio::null()).kill_on_drop(true).env_clear().envs(matchlock_api::HELPER_ENV);
    // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches no memory.
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)?;
            Ok(())
        });
    }
    spawn_on_lifetime_thread(cmd).map_err(|source| VmError::Spawn { program, source })
}

type SpawnJob = (Command, tokio::runtime::Handle, std::sync::mpsc::Sender<std::io::Result<Child>>);

/// Forks `cmd` from one thread that lives as long as the process. `PR_SET_PDEATHSIG` fires
/// when the *thread* that forked the child exits, not the process: a helper forked from a
/// runtime worker or a blocking-pool thread would be killed when that thread retires. The
/// caller's runtime is entered there so the child is reaped by it.
fn spawn_on_lifetime_thread(cmd: &mut Command) -> std::io::Result<Child> {
    static SPAWNER: std::sync::OnceLock<std::sync::Mutex<std::sync::mpsc::Sender<SpawnJob>>> =
        std::sync::OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (jobs, queue) = std::sync::mpsc::channel::<SpawnJob>();
        // The thread is never joined: it ends with the process.
        let started = std::thread::Builder::new().name("matchlock-spawner".into()).spawn(move || {
            for (mut cmd, runtime, reply) in queue {
                let _entered = runtime.enter();
                let _ = reply.send(cmd.spawn());
            }
        });
        if let Err(e) = started {
            tracing::error!("cannot start the helper spawner thread: {e}");
        }
        std::sync::Mutex::new(jobs)
    });
    let gone = || std::io::Error::other("the helper spawner thread is gone");
    let (reply, answer) = std::sync::mpsc::channel();
    // The command moves to the spawner thread; the caller keeps an empty one it never uses.
    let job = std::mem::replace(cmd, Command::new(cmd.as_std().get_program()));
    spawner
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .send((job, tokio::runtime::Handle::current(), reply))
        .map_err(|_| gone())?;
    // A fork takes microseconds; waiting for it here does not hold up the runtime.
    answer.recv().map_err(|_| gone())?
}

/// What saving a running machine needs; shared with whoever may ask for a snapshot.
#[derive(Clone)]
struct Saver {
    dir: VmDir,
    mux: Option<Mux>,
    ram: Option<Arc<std::fs::File>>,
    memory_mb: u64,
    disks: Vec<crate::Disk>,
    /// QMP takes one client at a time: snapshots of one machine queue.
    one_at_a_time: Arc<tokio::sync::Mutex<()>>,
}

impl Saver {
    async fn snapshot(&self, to: PathBuf) -> Result<(), VmError> {
        // QMP takes one client at a time; snapshots of one machine queue.
        let _one_at_a_time = self.one_at_a_time.lock().await;
        if let Some(disk) = self.disks.iter().find(|d| d.persistent && !d.read_only) {
            return Err(VmError::InvalidSpec(format!(
                "the writable disk {} is a volume: a snapshot cannot copy it",
                disk.path.display()
            )));
        }
        let mux = self.mux.clone().ok_or_else(|| VmError::Missing("the VM is not running".into()))?;
        let mut qmp = connect_qmp(&self.dir.backend_socket("qmp")).await?;
        qmp.execute("migrate-set-capabilities", ignore_shared()).await?;
        let started = Instant::now();
        mux.pause().await.map_err(VmError::io("cannot pause the guest's pipe"))?;
        let saved = match qmp.execute("stop", serde_json::json!({})).await {
            Ok(_) => {
                let saved = self.save(&mut qmp, &to).await;
                let resumed = qmp.execute("cont", serde_json::json!({})).await;
                saved.and(resumed.map(|_| ()))
            }
            Err(e) => Err(e),
        };
        let resumed = mux.resume().await.map_err(VmError::io("cannot resume the guest's pipe"));
        tracing::debug!("snapshot: guest paused for {} ms", started.elapsed().as_millis());
        saved.and(resumed)
    }

    /// While the VM is stopped: device state (and RAM not shared) to `to/state`, the shared
    /// RAM and the writable scratch disks copied beside it.
    async fn save(&self, qmp: &mut Qmp, to: &Path) -> Result<(), VmError> {
        let state = check_option_path(&to.join(SNAPSHOT_STATE))?;
        qmp.execute("migrate", serde_json::json!({ "uri": format!("file:{state}") })).await?;
        qmp.wait_migration().await?;
        let saver = self.clone();
        let to = to.to_owned();
        // Copying blocks for tens of milliseconds: not on the runtime's threads.
        tokio::task::spawn_blocking(move || saver.copy_files(&to))
            .await
            .map_err(|e| VmError::Io { context: "copying the snapshot".into(), source: e.into() })?
    }

    /// The shared RAM and the writable scratch disks into the snapshot `to`.
    fn copy_files(&self, to: &Path) -> Result<(), VmError> {
        let copy_err = |what: &str| VmError::io(format!("cannot copy the guest's {what} into the snapshot"));
        let ram_to = to.join(SNAPSHOT_RAM);
        match self.ram.as_deref() {
            Some(ram) => copy_sparse(ram, &ram_to).map_err(copy_err("RAM"))?,
            // A restored machine's RAM is private: the state holds all of it, the RAM file
            // only has to be the right size.
            None => {
                let f = std::fs::File::create(&ram_to).map_err(copy_err("RAM"))?;
                f.set_len(self.memory_mb << 20).map_err(copy_err("RAM"))?;
            }
        }
        for (i, disk) in self.disks.iter().enumerate().filter(|(_, d)| !d.read_only && !d.persistent) {
            let from = std::fs::File::open(&disk.path).map_err(copy_err("disk"))?;
            copy_sparse(&from, &to.join(snapshot_disk(i))).map_err(copy_err("disk"))?;
        }
        Ok(())
    }
}

/// A running QEMU VM.
#[derive(Debug)]
pub struct QemuMachine {
    dir: VmDir,
    qemu: Option<Child>,
    /// The serial pipe's streams.
    mux: Option<Mux>,
    /// Copies the serial console to `logs/vm.log`; ends when QEMU exits.
    console: Option<tokio::task::JoinHandle<()>>,
    exit: Option<String>,
    /// Turns true once QEMU has exited (its console reached EOF).
    stopped: tokio::sync::watch::Receiver<bool>,
    stopped_tx: Option<tokio::sync::watch::Sender<bool>>,
    /// The shared guest RAM of a cold-booted machine (a restored one maps its snapshot's).
    ram: Option<Arc<std::fs::File>>,
    /// The RAM file's name until QEMU has mapped it.
    ram_path: Option<PathBuf>,
    memory_mb: u64,
    disks: Vec<crate::Disk>,
    snapshotting: Arc<tokio::sync::Mutex<()>>,
}

impl QemuMachine {
    async fn wait_qemu(&mut self) -> String {
        if let Some(exit) = &self.exit {
            return exit.clone();
        }
        let Some(qemu) = self.qemu.as_mut() else { return "not started".into() };
        let exit = match qemu.wait().await {
            Ok(status) => format!("QEMU {status}"),
            Err(e) => format!("QEMU wait failed: {e}"),
        };
        self.exit = Some(exit.clone());
        exit
    }
}

async fn stop(child: &mut Child) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    if let Some(pid) = child.id() {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGTERM);
    }
    if tokio::time::timeout(Duration::from_secs(2), child.wait()).await.is_err() {
        let _ = child.kill().await;
    }
}

/// Kills `child` and waits (synchronously, briefly) until it is reaped.
fn kill_and_reap(child: &mut Child) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    let _ = child.start_kill();
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while std::time::Instant::now() < deadline {
        if let Ok(Some(_)) | Err(_) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

impl Drop for QemuMachine {
    /// A machine dropped without [`Machine::shutdown`] (e.g. a boot interrupted by Ctrl-C)
    /// takes its processes with it before the caller goes on.
    fn drop(&mut self) {
        if let Some(qemu) = self.qemu.as_mut() {
            kill_and_reap(qemu);
        }
        if let Some(path) = self.ram_path.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

impl Machine for QemuMachine {
    fn dir(&self) -> &VmDir {
        &self.dir
    }

    fn set_running(&self, running: bool) -> BoxFuture<'static, Result<(), VmError>> {
        let qmp_socket = self.dir.backend_socket("qmp");
        let one_at_a_time = Arc::clone(&self.snapshotting);
        Box::pin(async move {
            // QMP takes one client at a time: after any snapshot in progress.
            let _one_at_a_time = one_at_a_time.lock().await;
            let mut qmp = connect_qmp(&qmp_socket).await?;
            qmp.execute(if running { "cont" } else { "stop" }, serde_json::json!({})).await.map(drop)
        })
    }

    fn helper_pids(&self) -> Vec<u32> {
        self.qemu.iter().filter_map(Child::id).collect()
    }

    fn connector(&self) -> Connector {
        let mux = self.mux.clone();
        Arc::new(move |port, first| {
            let mux = mux.clone();
            Box::pin(async move {
                let mux =
                    mux.ok_or_else(|| VmError::Connect { port, source: std::io::ErrorKind::NotConnected.into() })?;
                mux.connect_sending(port, &first).await.map_err(|source| VmError::Connect { port, source })
            })
        })
    }

    fn exited(&mut self) -> BoxFuture<'_, String> {
        Box::pin(self.wait_qemu())
    }

    fn stopped(&self) -> BoxFuture<'static, ()> {
        let mut stopped = self.stopped.clone();
        Box::pin(async move {
            // An error means the console task is gone, which it only is once QEMU exited.
            let _ = stopped.wait_for(|s| *s).await;
        })
    }

    fn snapshotter(&self) -> Snapshotter {
        let saver = Saver {
            dir: self.dir.clone(),
            mux: self.mux.clone(),
            ram: self.ram.clone(),
            memory_mb: self.memory_mb,
            disks: self.disks.clone(),
            one_at_a_time: Arc::clone(&self.snapshotting),
        };
        Arc::new(move |to| {
            let saver = saver.clone();
            Box::pin(async move { saver.snapshot(to).await })
        })
    }

    fn shutdown(mut self: Box<Self>) -> BoxFuture<'static, Result<(), VmError>> {
        Box::pin(async move {
            if let Some(mut qemu) = self.qemu.take() {
                stop(&mut qemu).await;
            }
            if let Some(console) = self.console.take() {
                let _ = console.await;
            }
            if let Some(mux) = self.mux.take() {
                // QEMU is gone: its pipe ends, and every stream is reset before we return.
                let _ = tokio::time::timeout(Duration::from_secs(1), mux.closed()).await;
            }
            for socket in ["mux", "qmp"] {
                let _ = std::fs::remove_file(self.dir.backend_socket(socket));
            }
            if let Some(path) = self.ram_path.take() {
                let _ = std::fs::remove_file(path);
            }
            Ok(())
        })
    }
}
