//! QEMU `microvm` backend (KVM or TCG), with vsock from `vhost-device-vsock`.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use matchlock_protocol::READY_PORT;
use tokio::net::UnixListener;
use tokio::process::{Child, Command};
use tokio::time::{sleep, Instant};

use crate::accel::Accel;
use crate::{
    tools, vsock, Backend, BoxFuture, Capabilities, Connector, Machine, MachineSpec, NicTransport, VmDir, VmError,
};

/// How long to wait for `vhost-device-vsock` to create its socket.
const HELPER_START_TIMEOUT: Duration = Duration::from_secs(5);
/// Bytes of console output quoted in boot errors.
const CONSOLE_TAIL: usize = 2000;

/// Boots VMs with QEMU's `microvm` machine.
#[derive(Debug, Clone)]
pub struct QemuBackend {
    qemu: PathBuf,
    vhost_vsock: PathBuf,
    accel: Accel,
}

/// virtio-mmio transports of QEMU's `microvm` machine; the vsock device takes one, the NIC
/// another, disks the rest.
const MICROVM_TRANSPORTS: usize = 8;

impl QemuBackend {
    /// The backend for this host: its QEMU and vhost-device-vsock ([`tools`]), on KVM when
    /// usable with `kernel` (probed once, cached), else TCG ([`crate::accel::select`]).
    pub async fn detect(kernel: &Path) -> Result<Self, VmError> {
        let qemu = tools::qemu()?;
        let vhost_vsock = tools::vhost_device_vsock()?;
        let accel = crate::accel::select(&qemu, kernel).await?;
        Ok(Self { qemu, vhost_vsock, accel })
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
/// Most output kept of each helper's own log (QEMU's and vhost-device-vsock's stderr): what
/// the guest makes them complain about is capped too.
const HELPER_LOG_LIMIT: u64 = 1024 * 1024;

/// Copies `from` into `log` until EOF, keeping at most `limit` bytes; output beyond that (or
/// after a failed log write) is read and dropped so the writer never blocks on it.
async fn capture_capped(mut from: impl tokio::io::AsyncRead + Unpin, log: std::fs::File, limit: u64) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
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
    fn qemu_args(&self, spec: &MachineSpec) -> Result<Vec<String>, VmError> {
        let mem = format!("{}M", spec.memory_mb);
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
            &format!("memory-backend-memfd,id=mem,size={mem},share=on"),
            "-numa",
            "node,memdev=mem",
            "-nodefaults",
            "-no-user-config",
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
            "-chardev",
            &format!("socket,id=vsock,path={}", check_option_path(&spec.dir.backend_socket("vhost"))?),
            "-device",
            "vhost-user-vsock-device,chardev=vsock",
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
        Ok(args)
    }
}

impl Backend for QemuBackend {
    fn name(&self) -> &'static str {
        "qemu"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities { max_disks: MICROVM_TRANSPORTS - 2, nic: NicTransport::UnixStream, snapshots: false }
    }

    fn launch(&self, spec: MachineSpec) -> BoxFuture<'_, Result<Box<dyn Machine>, VmError>> {
        Box::pin(async move { Ok(Box::new(self.start(spec).await?) as Box<dyn Machine>) })
    }
}

impl QemuBackend {
    async fn start(&self, spec: MachineSpec) -> Result<QemuMachine, VmError> {
        if spec.disks.len() > self.capabilities().max_disks {
            return Err(VmError::InvalidSpec(format!(
                "{} disks, but microvm has room for {}",
                spec.disks.len(),
                self.capabilities().max_disks
            )));
        }
        std::fs::create_dir_all(spec.dir.logs()).map_err(VmError::io("cannot create the VM directory"))?;
        let args = self.qemu_args(&spec)?;
        let ready_path = spec.dir.vsock_listener(READY_PORT);
        let _ = std::fs::remove_file(&ready_path);
        let ready =
            UnixListener::bind(&ready_path).map_err(VmError::io("cannot listen for the guest's ready signal"))?;

        let vhost_sock = spec.dir.backend_socket("vhost");
        let vsock_uds = spec.dir.vsock_host();
        let mut vhost = spawn(
            Command::new(&self.vhost_vsock)
                .arg("--vm")
                .arg(format!(
                    "guest-cid=3,socket={},uds-path={}",
                    check_option_path(&vhost_sock)?,
                    check_option_path(&vsock_uds)?
                ))
                .stdout(Stdio::null())
                .stderr(Stdio::piped()),
        )?;
        capture_stderr(&mut vhost, log_file(&spec.dir.helper_log("vhost-vsock"))?);
        let (stopped_tx, stopped) = tokio::sync::watch::channel(false);
        let mut machine = QemuMachine {
            dir: spec.dir.clone(),
            qemu: None,
            vhost: Some(vhost),
            console: None,
            exit: None,
            stopped,
            stopped_tx: Some(stopped_tx),
        };
        match self.boot(&mut machine, &spec, &args, &vhost_sock, ready).await {
            Ok(()) => {
                let _ = std::fs::remove_file(&ready_path);
                Ok(machine)
            }
            Err(e) => {
                // Leave nothing running: stop and reap the helpers before reporting.
                let _ = Box::new(machine).shutdown().await;
                let _ = std::fs::remove_file(&ready_path);
                Err(e)
            }
        }
    }
}

impl QemuBackend {
    /// Starts QEMU once the vsock device is up, then waits for the guest's ready signal.
    async fn boot(
        &self,
        machine: &mut QemuMachine,
        spec: &MachineSpec,
        args: &[String],
        vhost_sock: &Path,
        ready: UnixListener,
    ) -> Result<(), VmError> {
        let started = Instant::now();
        while !vhost_sock.exists() {
            if let Some(status) = machine.vhost.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                return Err(VmError::BootFailed {
                    status: format!("vhost-device-vsock {status}"),
                    details: tail(&spec.dir.helper_log("vhost-vsock")),
                });
            }
            if started.elapsed() > HELPER_START_TIMEOUT {
                return Err(VmError::Missing("vhost-device-vsock did not create its socket".into()));
            }
            sleep(Duration::from_millis(2)).await;
        }
        tracing::debug!("boot: vhost-device-vsock up after {} ms", started.elapsed().as_millis());

        let qemu_started = Instant::now();
        let mut qemu = spawn(Command::new(&self.qemu).args(args).stdout(Stdio::piped()).stderr(Stdio::piped()))?;
        capture_stderr(&mut qemu, log_file(&spec.dir.helper_log("qemu"))?);
        let console = qemu.stdout.take().expect("stdout is piped");
        let stopped = machine.stopped_tx.take().expect("one console per machine");
        machine.console = Some(tokio::spawn(capture_console(console, log_file(&spec.dir.console_log())?, stopped)));
        machine.qemu = Some(qemu);
        tracing::debug!(
            "boot: QEMU started ({}, {} vCPUs, {} MB, {} disks); waiting for the guest agent",
            self.accel.qemu_name(),
            spec.vcpus,
            spec.memory_mb,
            spec.disks.len()
        );

        tokio::select! {
            accepted = ready.accept() => {
                accepted.map_err(VmError::io("ready socket failed"))?;
                tracing::debug!(
                    "boot: guest agent ready {} ms after QEMU started (kernel and guest-init: see logs/vm.log)",
                    qemu_started.elapsed().as_millis()
                );
            }
            status = machine.wait_qemu() => {
                if let Some(console) = machine.console.take() {
                    let _ = console.await;
                }
                let details = format!("{}{}", tail(&spec.dir.helper_log("qemu")), tail(&spec.dir.console_log()));
                return Err(VmError::BootFailed { status, details });
            }
            () = sleep(spec.boot_timeout) => {
                return Err(VmError::BootTimeout(spec.boot_timeout, tail(&spec.dir.console_log())));
            }
        }
        Ok(())
    }
}
fn log_file(path: &Path) -> Result<std::fs::File, VmError> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(VmError::io(format!("cannot open {}", path.display())))
}

/// Spawns a helper with the minimal helper environment, that dies with us (whatever thread
/// asks: see [`spawn_on_lifetime_thread`]) and that is killed if its handle is dropped.
fn spawn(cmd: &mut Command) -> Result<Child, VmError> {
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

/// A running QEMU VM.
#[derive(Debug)]
pub struct QemuMachine {
    dir: VmDir,
    qemu: Option<Child>,
    vhost: Option<Child>,
    /// Copies the serial console to `logs/vm.log`; ends when QEMU exits.
    console: Option<tokio::task::JoinHandle<()>>,
    exit: Option<String>,
    /// Turns true once QEMU has exited (its console reached EOF).
    stopped: tokio::sync::watch::Receiver<bool>,
    stopped_tx: Option<tokio::sync::watch::Sender<bool>>,
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
        for child in [self.qemu.as_mut(), self.vhost.as_mut()].into_iter().flatten() {
            kill_and_reap(child);
        }
    }
}

impl Machine for QemuMachine {
    fn dir(&self) -> &VmDir {
        &self.dir
    }

    fn helper_pids(&self) -> Vec<u32> {
        [&self.qemu, &self.vhost].into_iter().flatten().filter_map(Child::id).collect()
    }

    fn connector(&self) -> Connector {
        let host = self.dir.vsock_host();
        Arc::new(move |port| {
            let host = host.clone();
            Box::pin(async move { vsock::connect(&host, port, Duration::from_secs(5)).await })
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

    fn shutdown(mut self: Box<Self>) -> BoxFuture<'static, Result<(), VmError>> {
        Box::pin(async move {
            if let Some(mut qemu) = self.qemu.take() {
                stop(&mut qemu).await;
            }
            if let Some(console) = self.console.take() {
                let _ = console.await;
            }
            if let Some(mut vhost) = self.vhost.take() {
                stop(&mut vhost).await;
            }
            let _ = std::fs::remove_file(self.dir.backend_socket("vhost"));
            let _ = std::fs::remove_file(self.dir.vsock_host());
            Ok(())
        })
    }
}
