//! Guest end of the stream multiplexer ([`matchlock_protocol::mux`]) on the virtio-serial
//! port named [`PORT_NAME`].
//!
//! The rest of guest-init sees ordinary [`UnixStream`]s: each stream is one end of a socket
//! pair whose other end two threads pump to and from the pipe. Only PID 1 holds the port
//! (the kernel lets one process open it), so workloads cannot reach the host's ports.
//!
//! One reader thread parses the pipe and never blocks on anything but the pipe; one writer
//! thread drains a queue to it. Until the host's `Hello` the writer holds everything; on a
//! `Pause` it holds everything after its `Paused`; a new `Hello` (a restored VM's new host)
//! resets every stream and drops what the old session left queued.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io::{self, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, OnceLock, PoisonError};
use std::thread;
use std::time::Duration;

use matchlock_protocol::mux::{
    frame, frame_u32, opened_by_host, payload_u32, Header, Kind, HEADER_LEN, MAX_DATA, PORT_NAME, WINDOW,
};

/// How long [`connect`] waits for the host to accept.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

fn relock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Bytes one side may still send on a stream.
struct Credit {
    avail: Mutex<Option<usize>>,
    changed: Condvar,
}

impl Credit {
    fn new() -> Self {
        Self { avail: Mutex::new(Some(WINDOW as usize)), changed: Condvar::new() }
    }

    /// Waits for credit and takes up to `max`; `None` once the stream is reset.
    fn take(&self, max: usize) -> Option<usize> {
        let mut avail = relock(&self.avail);
        loop {
            match *avail {
                None => return None,
                Some(0) => avail = self.changed.wait(avail).unwrap_or_else(PoisonError::into_inner),
                Some(n) => {
                    let take = n.min(max);
                    *avail = Some(n - take);
                    return Some(take);
                }
            }
        }
    }

    fn give(&self, n: usize) {
        if let Some(avail) = relock(&self.avail).as_mut() {
            *avail = (*avail + n).min(WINDOW as usize);
        }
        self.changed.notify_all();
    }

    fn close(&self) {
        *relock(&self.avail) = None;
        self.changed.notify_all();
    }
}

/// One stream, as the reader thread sees it.
struct Stream {
    inbound: Option<mpsc::Sender<Vec<u8>>>,
    credit: Arc<Credit>,
    /// False once reset: its threads may queue nothing more.
    alive: Arc<AtomicBool>,
    /// Our end of the socket pair, to unblock its threads on a reset.
    ours: UnixStream,
}

struct Outbox {
    queue: VecDeque<Vec<u8>>,
    /// Nothing is written: before the first `Hello`, and after `Paused`.
    held: bool,
}

struct Mux {
    port: File,
    outbox: Mutex<Outbox>,
    ready: Condvar,
    streams: Mutex<HashMap<u32, Stream>>,
    pending: Mutex<HashMap<u32, mpsc::Sender<Option<UnixStream>>>>,
    listeners: Mutex<HashMap<u32, mpsc::Sender<UnixStream>>>,
    next_id: Mutex<u32>,
    /// The current session's id: a `Hello` with another means a new host.
    session: Mutex<Option<Vec<u8>>>,
    /// How many times a new host took over (restores).
    restores: AtomicU64,
}

static MUX: OnceLock<Arc<Mux>> = OnceLock::new();

/// Finds the port's device node (`/dev/vportNpM`) by its name.
fn find_port() -> io::Result<String> {
    for entry in std::fs::read_dir("/sys/class/virtio-ports")?.flatten() {
        let name = std::fs::read_to_string(entry.path().join("name")).unwrap_or_default();
        if name.trim() == PORT_NAME {
            return Ok(format!("/dev/{}", entry.file_name().to_string_lossy()));
        }
    }
    Err(io::Error::new(io::ErrorKind::NotFound, format!("no virtio-serial port named {PORT_NAME}")))
}

/// Opens the port and starts the reader and writer threads.
pub(crate) fn start() -> io::Result<()> {
    let path = find_port()?;
    let mut port = std::fs::OpenOptions::new().read(true).write(true).open(&path)?;
    // What the host sent before the port was open is gone: ask for its Hello again.
    port.write_all(&frame(0, Kind::Paused, &[]))?;
    let mux = Arc::new(Mux {
        port,
        outbox: Mutex::new(Outbox { queue: VecDeque::new(), held: true }),
        ready: Condvar::new(),
        streams: Mutex::new(HashMap::new()),
        pending: Mutex::new(HashMap::new()),
        listeners: Mutex::new(HashMap::new()),
        next_id: Mutex::new(1),
        session: Mutex::new(None),
        restores: AtomicU64::new(0),
    });
    if MUX.set(Arc::clone(&mux)).is_err() {
        return Err(io::Error::new(io::ErrorKind::AlreadyExists, "the mux is already running"));
    }
    let writer = Arc::clone(&mux);
    thread::Builder::new().name("mux-writer".into()).spawn(move || writer.write_loop())?;
    thread::Builder::new().name("mux-reader".into()).spawn(move || mux.read_loop())?;
    Ok(())
}

fn mux() -> io::Result<&'static Arc<Mux>> {
    MUX.get().ok_or_else(|| io::Error::new(io::ErrorKind::NotConnected, "the host pipe is not running"))
}

/// Streams the host opens to one guest port.
pub(crate) struct Listener(mpsc::Receiver<UnixStream>);

impl Listener {
    /// The next stream; `None` if the mux is gone.
    pub(crate) fn accept(&self) -> Option<UnixStream> {
        self.0.recv().ok()
    }
}

/// How many times a new host took over the pipe (the VM was restored from a snapshot):
/// streams of an earlier session ended because their host is gone, not because it hung up.
pub(crate) fn session() -> u64 {
    MUX.get().map_or(0, |m| m.restores.load(Ordering::Acquire))
}

/// Serves guest `port` to the host.
pub(crate) fn listen(port: u32) -> io::Result<Listener> {
    let (tx, rx) = mpsc::channel();
    let mut listeners = relock(&mux()?.listeners);
    if listeners.contains_key(&port) {
        return Err(io::Error::new(io::ErrorKind::AddrInUse, format!("port {port} is served already")));
    }
    listeners.insert(port, tx);
    Ok(Listener(rx))
}

/// Opens a stream to host `port`.
pub(crate) fn connect(port: u32) -> io::Result<UnixStream> {
    let mux = mux()?;
    let id = {
        let mut next = relock(&mux.next_id);
        let id = *next;
        *next = next.wrapping_add(2).max(1);
        id
    };
    let (tx, rx) = mpsc::channel();
    relock(&mux.pending).insert(id, tx);
    mux.queue(frame_u32(id, Kind::Open, port));
    match rx.recv_timeout(CONNECT_TIMEOUT) {
        Ok(Some(stream)) => Ok(stream),
        Ok(None) => Err(io::Error::new(io::ErrorKind::ConnectionRefused, format!("host port {port} refused"))),
        Err(_) => {
            relock(&mux.pending).remove(&id);
            Err(io::Error::new(io::ErrorKind::TimedOut, format!("host port {port} did not answer")))
        }
    }
}

impl Mux {
    fn queue(&self, f: Vec<u8>) {
        relock(&self.outbox).queue.push_back(f);
        self.ready.notify_one();
    }

    /// Queues a stream's frame unless the stream was reset (checked under the outbox lock,
    /// which resets take too: nothing of a dead stream reaches a new session).
    fn queue_for(&self, alive: &AtomicBool, f: Vec<u8>) -> bool {
        let mut outbox = relock(&self.outbox);
        if !alive.load(Ordering::Acquire) {
            return false;
        }
        outbox.queue.push_back(f);
        drop(outbox);
        self.ready.notify_one();
        true
    }

    fn write_loop(&self) {
        loop {
            let next = {
                let mut outbox = relock(&self.outbox);
                loop {
                    if !outbox.held {
                        if let Some(f) = outbox.queue.pop_front() {
                            if f.get(4) == Some(&(Kind::Paused as u8)) {
                                outbox.held = true;
                            }
                            break f;
                        }
                    }
                    outbox = self.ready.wait(outbox).unwrap_or_else(PoisonError::into_inner);
                }
            };
            if let Err(e) = (&self.port).write_all(&next) {
                eprintln!("matchlock-init: host pipe write: {e}");
                thread::sleep(Duration::from_millis(10));
            }
        }
    }

    fn read_loop(self: Arc<Self>) {
        loop {
            // A new reader after EOF: the host went away (a VM restored from a snapshot sees
            // this before its new host connects); a partial frame is dropped with it.
            let mut reader = BufReader::with_capacity(2 * MAX_DATA, &self.port);
            let mut header = [0u8; HEADER_LEN];
            let mut payload = vec![0u8; MAX_DATA];
            loop {
                if reader.read_exact(&mut header).is_err() {
                    break;
                }
                let Ok(h) = Header::decode(&header) else {
                    eprintln!("matchlock-init: malformed frame from the host pipe");
                    break;
                };
                let body = &mut payload[..h.len as usize];
                if reader.read_exact(body).is_err() {
                    break;
                }
                self.dispatch(h, body);
            }
            thread::sleep(Duration::from_millis(2));
        }
    }

    fn dispatch(self: &Arc<Self>, h: Header, body: &[u8]) {
        let id = h.stream;
        match h.kind {
            Kind::Hello => self.new_session(body),
            Kind::Pause => self.queue(frame(0, Kind::Paused, &[])),
            Kind::Resume => {
                relock(&self.outbox).held = false;
                self.ready.notify_one();
            }
            Kind::Paused => {}
            Kind::Open if opened_by_host(id) => {
                let listener = relock(&self.listeners).get(&payload_u32(body)).cloned();
                let accepted = listener.and_then(|l| {
                    let (ours, theirs) = UnixStream::pair().ok()?;
                    // Accept goes out before the stream's first byte can.
                    self.queue(frame(id, Kind::Accept, &[]));
                    self.open_stream(id, ours);
                    l.send(theirs).ok()
                });
                if accepted.is_none() {
                    self.queue(frame(id, Kind::Refuse, &[]));
                }
            }
            Kind::Open => {}
            Kind::Accept | Kind::Refuse => {
                let Some(waiting) = relock(&self.pending).remove(&id) else { return };
                let stream =
                    (h.kind == Kind::Accept).then(UnixStream::pair).and_then(Result::ok).map(|(ours, theirs)| {
                        self.open_stream(id, ours);
                        theirs
                    });
                if waiting.send(stream).is_err() && h.kind == Kind::Accept {
                    self.reset(id, true);
                }
            }
            Kind::Data => {
                let streams = relock(&self.streams);
                if let Some(inbound) = streams.get(&id).and_then(|s| s.inbound.as_ref()) {
                    let _ = inbound.send(body.to_vec());
                }
            }
            Kind::Credit => {
                if let Some(s) = relock(&self.streams).get(&id) {
                    s.credit.give(payload_u32(body) as usize);
                }
            }
            Kind::Close => {
                if let Some(s) = relock(&self.streams).get_mut(&id) {
                    s.inbound = None;
                }
            }
            Kind::Reset => self.reset(id, false),
        }
    }

    /// The host's `Hello`. The first starts the session with what was queued for it; the
    /// same id again is only answered; another id is a new host: every stream of the old
    /// session ends and its frames are dropped.
    fn new_session(&self, id: &[u8]) {
        let previous = relock(&self.session).replace(id.to_vec());
        if previous.as_deref() == Some(id) || previous.is_none() {
            let mut outbox = relock(&self.outbox);
            outbox.queue.push_front(frame(0, Kind::Hello, id));
            outbox.held = false;
            drop(outbox);
            self.ready.notify_one();
            return;
        }
        self.restores.fetch_add(1, Ordering::AcqRel);
        let ids: Vec<u32> = relock(&self.streams).keys().copied().collect();
        for id in ids {
            self.reset(id, false);
        }
        for (_, waiting) in relock(&self.pending).drain() {
            let _ = waiting.send(None);
        }
        let mut outbox = relock(&self.outbox);
        outbox.queue.clear();
        outbox.queue.push_back(frame(0, Kind::Hello, id));
        outbox.held = false;
        drop(outbox);
        self.ready.notify_one();
    }

    fn reset(&self, id: u32, tell_host: bool) {
        let Some(stream) = relock(&self.streams).remove(&id) else { return };
        {
            let _outbox = relock(&self.outbox);
            stream.alive.store(false, Ordering::Release);
        }
        stream.credit.close();
        let _ = stream.ours.shutdown(std::net::Shutdown::Both);
        if tell_host {
            self.queue(frame(id, Kind::Reset, &[]));
        }
    }

    /// Starts pumping stream `id` between `ours` and the pipe.
    fn open_stream(self: &Arc<Self>, id: u32, ours: UnixStream) {
        let (Ok(reader), Ok(writer)) = (ours.try_clone(), ours.try_clone()) else {
            self.queue(frame(id, Kind::Reset, &[]));
            return;
        };
        let (tx, rx) = mpsc::channel();
        let credit = Arc::new(Credit::new());
        let alive = Arc::new(AtomicBool::new(true));
        relock(&self.streams).insert(
            id,
            Stream { inbound: Some(tx), credit: Arc::clone(&credit), alive: Arc::clone(&alive), ours },
        );
        let (mux, out_alive) = (Arc::clone(self), Arc::clone(&alive));
        let spawned = thread::Builder::new().spawn(move || mux.pump_out(id, reader, &credit, &out_alive));
        let mux = Arc::clone(self);
        let spawned_in = thread::Builder::new().spawn(move || mux.pump_in(id, writer, &rx, &alive));
        if spawned.is_err() || spawned_in.is_err() {
            self.reset(id, true);
        }
    }

    /// Local bytes to the host, within the host's grants; local EOF becomes `Close`.
    fn pump_out(&self, id: u32, mut local: UnixStream, credit: &Credit, alive: &AtomicBool) {
        let mut buf = vec![0u8; MAX_DATA];
        while let Some(take) = credit.take(MAX_DATA) {
            match local.read(&mut buf[..take]) {
                Ok(n) if n > 0 => {
                    credit.give(take - n);
                    if !self.queue_for(alive, frame(id, Kind::Data, &buf[..n])) {
                        return;
                    }
                }
                _ => {
                    self.queue_for(alive, frame(id, Kind::Close, &[]));
                    break;
                }
            }
        }
        credit.close();
        self.forget_if_done(id);
    }

    /// Host bytes to the local socket, granting credit as they are written.
    fn pump_in(&self, id: u32, mut local: UnixStream, inbound: &mpsc::Receiver<Vec<u8>>, alive: &AtomicBool) {
        while let Ok(chunk) = inbound.recv() {
            if local.write_all(&chunk).is_err() {
                self.reset(id, true);
                return;
            }
            if !self.queue_for(alive, frame_u32(id, Kind::Credit, chunk.len() as u32)) {
                return;
            }
        }
        let _ = local.shutdown(std::net::Shutdown::Write);
        self.forget_if_done(id);
    }

    /// Drops a stream both of whose directions are closed.
    fn forget_if_done(&self, id: u32) {
        let mut streams = relock(&self.streams);
        let done = streams.get(&id).is_some_and(|s| s.inbound.is_none() && relock(&s.credit.avail).is_none());
        if done {
            streams.remove(&id);
        }
    }
}
