//! Guest end of the stream multiplexer ([`matchlock_protocol::mux`]) on the virtio-serial
//! port named [`PORT_NAME`].
//!
//! The rest of guest-init sees each stream as a [`Stream`] (`Read`, `Write`, `try_clone`,
//! `shutdown`): reads take what the reader thread queued for it, writes queue frames for the
//! writer thread, so a byte crosses one thread hop each way (under TCG every guest context
//! switch costs). Only PID 1 holds the port (the kernel lets one process open it), so
//! workloads cannot reach the host's ports.
//!
//! One reader thread parses the pipe and never blocks on anything but the pipe; one writer
//! thread drains a queue to it. Until the host's `Hello` the writer holds everything; on a
//! `Pause` it holds everything after its `Paused`; a new `Hello` (a restored VM's new host)
//! resets every stream and drops what the old session left queued.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io::{self, BufReader, Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, OnceLock, PoisonError};
use std::thread;
use std::time::Duration;

use matchlock_protocol::mux::{
    credit_batch, frame, frame_u32, opened_by_host, payload_u32, Header, Kind, HEADER_LEN, MAX_DATA, PORT_NAME,
    TO_GUEST_WINDOW, TO_HOST_WINDOW,
};

use crate::relock;

/// Bytes of queued frames the writer gathers into one write to the port.
const WRITE_BATCH: usize = 256 * 1024;

/// Size of the buffers the guest's virtio-serial driver reads the port into (a page each):
/// one `read` returns at most one of them.
const PORT_BUFFER: usize = 4096;

/// How long [`connect`] waits for the host to accept.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Bytes one side may still send on a stream.
struct Credit {
    avail: Mutex<Option<usize>>,
    changed: Condvar,
}

impl Credit {
    fn new() -> Self {
        Self { avail: Mutex::new(Some(TO_HOST_WINDOW as usize)), changed: Condvar::new() }
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
            *avail = (*avail + n).min(TO_HOST_WINDOW as usize);
        }
        self.changed.notify_all();
    }

    fn close(&self) {
        *relock(&self.avail) = None;
        self.changed.notify_all();
    }
}

/// Chunks from the host not read yet, and whether more may come.
#[derive(Default)]
struct Chunks {
    queue: VecDeque<Vec<u8>>,
    /// The host closed its side, or the stream was reset: the reader sees EOF after the queue.
    ended: bool,
}

/// Where the reader thread hands a stream its bytes. A plain queue whose waiter is woken
/// after the lock is released: under TCG the guest has one vCPU, and a waiter woken with a
/// lock still held (as a channel's waker lock is) runs at once, finds it taken, and spins
/// (each spin a `pause`, which TCG turns into an exit from the CPU loop).
#[derive(Default)]
struct Inbox {
    chunks: Mutex<Chunks>,
    arrived: Condvar,
}

impl Inbox {
    fn push(&self, chunk: Vec<u8>) {
        relock(&self.chunks).queue.push_back(chunk);
        self.arrived.notify_one();
    }

    fn end(&self) {
        relock(&self.chunks).ended = true;
        self.arrived.notify_all();
    }

    /// The next chunk; `None` at the end.
    fn next(&self) -> Option<Vec<u8>> {
        let mut chunks = relock(&self.chunks);
        loop {
            if let Some(chunk) = chunks.queue.pop_front() {
                return Some(chunk);
            }
            if chunks.ended {
                return None;
            }
            chunks = self.arrived.wait(chunks).unwrap_or_else(PoisonError::into_inner);
        }
    }
}

/// One stream, as the reader thread sees it.
struct Entry {
    /// Bytes from the host.
    inbox: Arc<Inbox>,
    credit: Arc<Credit>,
    /// False once reset: nothing more of it may be queued.
    alive: Arc<AtomicBool>,
}

impl Drop for Entry {
    /// The stream is gone (reset): its reader sees EOF after what was queued.
    fn drop(&mut self) {
        self.inbox.end();
    }
}

/// The reading end of a stream.
struct Inbound {
    inbox: Arc<Inbox>,
    /// The chunk being read and how far.
    chunk: Vec<u8>,
    at: usize,
    /// Bytes consumed since the last `Credit` sent to the host.
    uncredited: usize,
}

/// One stream as guest-init uses it. Clones share it; the last one gone resets it.
pub(crate) struct Stream(Arc<StreamInner>);

struct StreamInner {
    id: u32,
    mux: Arc<Mux>,
    /// Chunks from the host and the rest of the one being read.
    inbound: Mutex<Inbound>,
    credit: Arc<Credit>,
    alive: Arc<AtomicBool>,
    write_closed: AtomicBool,
}

impl Stream {
    /// Another handle on the same stream (a reader and a writer on two threads).
    pub(crate) fn try_clone(&self) -> io::Result<Self> {
        Ok(Self(Arc::clone(&self.0)))
    }

    /// Ends the writing direction (the host reads EOF); reading ends with the host's side.
    pub(crate) fn shutdown(&self, how: std::net::Shutdown) -> io::Result<()> {
        if how != std::net::Shutdown::Read && !self.0.write_closed.swap(true, Ordering::AcqRel) {
            self.0.mux.queue_for(&self.0.alive, frame(self.0.id, Kind::Close, &[]));
        }
        Ok(())
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let inner = &*self.0;
        let mut inbound = relock(&inner.inbound);
        let Inbound { inbox, chunk, at, uncredited } = &mut *inbound;
        if *at == chunk.len() {
            match inbox.next() {
                Some(next) => {
                    // Consumed from the host's window: it may send as much again (granted
                    // in batches).
                    *uncredited += next.len();
                    if *uncredited >= credit_batch(TO_GUEST_WINDOW) as usize {
                        inner.mux.queue_for(&inner.alive, frame_u32(inner.id, Kind::Credit, *uncredited as u32));
                        *uncredited = 0;
                    }
                    *chunk = next;
                    *at = 0;
                }
                None => return Ok(0),
            }
        }
        let n = buf.len().min(chunk.len() - *at);
        buf[..n].copy_from_slice(&chunk[*at..*at + n]);
        *at += n;
        Ok(n)
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let inner = &*self.0;
        if buf.is_empty() {
            return Ok(0);
        }
        if inner.write_closed.load(Ordering::Acquire) {
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        let reset = || io::Error::new(io::ErrorKind::ConnectionReset, "the host closed the stream");
        let take = inner.credit.take(buf.len().min(MAX_DATA)).ok_or_else(reset)?;
        if inner.mux.queue_for(&inner.alive, frame(inner.id, Kind::Data, &buf[..take])) {
            Ok(take)
        } else {
            Err(reset())
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for StreamInner {
    /// Nobody uses the stream any more: the host is told it is gone both ways — unless a
    /// new session already reset it and reuses its id.
    fn drop(&mut self) {
        self.mux.reset_incarnation(self.id, Some(&self.alive), true);
    }
}

struct Outbox {
    queue: VecDeque<Vec<u8>>,
    /// Nothing is written: before the first `Hello`, and after `Paused`.
    held: bool,
    /// A thread is writing to the port (frames must not overtake each other).
    writing: bool,
}

struct Mux {
    port: File,
    outbox: Mutex<Outbox>,
    ready: Condvar,
    streams: Mutex<HashMap<u32, Entry>>,
    pending: Mutex<HashMap<u32, mpsc::Sender<Option<Stream>>>>,
    listeners: Mutex<HashMap<u32, mpsc::Sender<Stream>>>,
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
        outbox: Mutex::new(Outbox { queue: VecDeque::new(), held: true, writing: false }),
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
pub(crate) struct Listener(mpsc::Receiver<Stream>);

impl Listener {
    /// The next stream; `None` if the mux is gone.
    pub(crate) fn accept(&self) -> Option<Stream> {
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
pub(crate) fn connect(port: u32) -> io::Result<Stream> {
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

    /// Sends a stream's frame unless the stream was reset (checked under the outbox lock,
    /// which resets take too: nothing of a dead stream reaches a new session). When the pipe
    /// is idle the calling thread writes it itself (under TCG a hop to the writer thread
    /// costs more than the write); else it is queued behind what waits. Only stream users
    /// call this, never the reader thread, which must never block on the port.
    fn queue_for(&self, alive: &AtomicBool, f: Vec<u8>) -> bool {
        let mut outbox = relock(&self.outbox);
        if !alive.load(Ordering::Acquire) {
            return false;
        }
        if outbox.held || outbox.writing || !outbox.queue.is_empty() {
            outbox.queue.push_back(f);
            drop(outbox);
            self.ready.notify_one();
            return true;
        }
        outbox.writing = true;
        drop(outbox);
        self.write_port(&f);
        relock(&self.outbox).writing = false;
        // The writer may have been waiting for the port.
        self.ready.notify_one();
        true
    }

    fn write_port(&self, frames: &[u8]) {
        if let Err(e) = (&self.port).write_all(frames) {
            eprintln!("matchlock-init: host pipe write: {e}");
            thread::sleep(Duration::from_millis(10));
        }
    }

    fn write_loop(&self) {
        let mut next = Vec::with_capacity(WRITE_BATCH + HEADER_LEN + MAX_DATA);
        loop {
            next.clear();
            {
                let mut outbox = relock(&self.outbox);
                // Everything queued goes out in one write (a request's frame and a credit
                // grant cost one trip through the device, not two), up to `WRITE_BATCH`.
                while next.is_empty() || (!outbox.held && next.len() < WRITE_BATCH && !outbox.queue.is_empty()) {
                    if !outbox.held && !outbox.writing {
                        if let Some(f) = outbox.queue.pop_front() {
                            if f.get(4) == Some(&(Kind::Paused as u8)) {
                                outbox.held = true;
                            }
                            next.extend_from_slice(&f);
                            continue;
                        }
                    }
                    outbox = self.ready.wait(outbox).unwrap_or_else(PoisonError::into_inner);
                }
                outbox.writing = true;
            }
            self.write_port(&next);
            relock(&self.outbox).writing = false;
        }
    }

    fn read_loop(self: Arc<Self>) {
        loop {
            // A new reader after EOF: the host went away (a VM restored from a snapshot sees
            // this before its new host connects); a partial frame is dropped with it.
            // The buffer is one port buffer: small frames come many to a read, and the bulk
            // of a large payload bypasses it, read by the kernel straight into its own chunk
            // (no copy in between: under TCG each costs).
            let mut reader = BufReader::with_capacity(PORT_BUFFER, &self.port);
            let mut header = [0u8; HEADER_LEN];
            loop {
                if reader.read_exact(&mut header).is_err() {
                    break;
                }
                let Ok(h) = Header::decode(&header) else {
                    eprintln!("matchlock-init: malformed frame from the host pipe");
                    break;
                };
                // Bounded by the header's check (at most MAX_DATA); read into spare capacity,
                // not zeroed first.
                let mut body = Vec::with_capacity(h.len as usize);
                match (&mut reader).take(u64::from(h.len)).read_to_end(&mut body) {
                    Ok(n) if n == h.len as usize => {}
                    _ => break,
                }
                self.dispatch(h, body);
            }
            thread::sleep(Duration::from_millis(2));
        }
    }

    fn dispatch(self: &Arc<Self>, h: Header, body: Vec<u8>) {
        let id = h.stream;
        match h.kind {
            Kind::Hello => self.new_session(&body),
            Kind::Pause => self.queue(frame(0, Kind::Paused, &[])),
            Kind::Resume => {
                let mut outbox = relock(&self.outbox);
                // A pause the host gave up on before our `Paused` went out (we were starved
                // past its timeout): it is not sent at all, or the writer would hold
                // everything behind it for good once it got there.
                outbox.queue.retain(|f| f.get(4) != Some(&(Kind::Paused as u8)));
                outbox.held = false;
                drop(outbox);
                self.ready.notify_one();
            }
            Kind::Paused => {}
            Kind::Open if opened_by_host(id) => {
                let listener = relock(&self.listeners).get(&payload_u32(&body)).cloned();
                match listener {
                    Some(l) => {
                        // Accept goes out before the stream's first byte can.
                        self.queue(frame(id, Kind::Accept, &[]));
                        // A listener that is gone drops the stream, which resets it.
                        let _ = l.send(self.open_stream(id));
                    }
                    None => self.queue(frame(id, Kind::Refuse, &[])),
                }
            }
            Kind::Open => {}
            Kind::Accept | Kind::Refuse => {
                let Some(waiting) = relock(&self.pending).remove(&id) else { return };
                let stream = (h.kind == Kind::Accept).then(|| self.open_stream(id));
                // A connect that gave up drops the stream, which resets it.
                let _ = waiting.send(stream);
            }
            Kind::Data => {
                let inbox = relock(&self.streams).get(&id).map(|s| Arc::clone(&s.inbox));
                if let Some(inbox) = inbox {
                    inbox.push(body);
                }
            }
            Kind::Credit => {
                if let Some(s) = relock(&self.streams).get(&id) {
                    s.credit.give(payload_u32(&body) as usize);
                }
            }
            Kind::Close => {
                if let Some(s) = relock(&self.streams).get(&id) {
                    s.inbox.end();
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
        self.reset_incarnation(id, None, tell_host);
    }

    /// Resets stream `id` — with `only`, only while `id` is still that incarnation (its
    /// `alive` flag): a stream of an old session that ends late must not take a new
    /// session's stream of the same id with it.
    fn reset_incarnation(&self, id: u32, only: Option<&Arc<AtomicBool>>, tell_host: bool) {
        let stream = {
            let mut streams = relock(&self.streams);
            match streams.get(&id) {
                Some(entry) if only.is_none_or(|alive| Arc::ptr_eq(alive, &entry.alive)) => streams.remove(&id),
                _ => None,
            }
        };
        let Some(stream) = stream else { return };
        {
            let _outbox = relock(&self.outbox);
            stream.alive.store(false, Ordering::Release);
        }
        stream.credit.close();
        if tell_host {
            self.queue(frame(id, Kind::Reset, &[]));
        }
    }

    /// Registers stream `id` and hands out its [`Stream`].
    fn open_stream(self: &Arc<Self>, id: u32) -> Stream {
        let inbox = Arc::new(Inbox::default());
        let credit = Arc::new(Credit::new());
        let alive = Arc::new(AtomicBool::new(true));
        relock(&self.streams)
            .insert(id, Entry { inbox: Arc::clone(&inbox), credit: Arc::clone(&credit), alive: Arc::clone(&alive) });
        Stream(Arc::new(StreamInner {
            id,
            mux: Arc::clone(self),
            inbound: Mutex::new(Inbound { inbox, chunk: Vec::new(), at: 0, uncredited: 0 }),
            credit,
            alive,
            write_closed: AtomicBool::new(false),
        }))
    }
}
