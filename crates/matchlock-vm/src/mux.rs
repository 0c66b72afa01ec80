//! Host end of the stream multiplexer ([`matchlock_protocol::mux`]) on the VM's serial pipe.
//!
//! Every stream is handed to the rest of the host as a plain [`UnixStream`]: a stream the
//! host opens is one end of a socket pair, a stream the guest opens to host port P is a
//! connection to `<dir>/vsock.sock_P` ([`VmDir::port_listener`]), the listeners the host
//! already serves. The guest is hostile: its frames are validated, each stream holds at
//! most [`TO_HOST_WINDOW`] unconsumed bytes, it may have [`MAX_GUEST_STREAMS`] streams open, and a
//! malformed frame ends the pipe (every stream with it).

use std::collections::{HashMap, VecDeque};
use std::io;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use matchlock_api::paths::VmDir;
use matchlock_protocol::mux::{
    credit_batch, frame, frame_u32, opened_by_host, payload_u32, Header, Kind, HEADER_LEN, MAX_DATA, TO_GUEST_WINDOW,
    TO_HOST_WINDOW,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot, watch, Semaphore};

/// Streams the guest may have open at once.
pub const MAX_GUEST_STREAMS: usize = 64;
/// Frames queued for the pipe before senders wait.
const WRITE_QUEUE: usize = 256;
/// How long the guest has to accept a stream the host opens.
const OPEN_TIMEOUT: Duration = Duration::from_secs(5);

/// What the writer task is asked to do.
enum Out {
    Frame(Vec<u8>),
    /// Send `Pause` and hold every later frame until `Resume`.
    Pause,
    Resume,
}

/// One open stream, as the reader sees it.
struct Entry {
    /// Bytes from the guest for the local socket; `None` once the guest closed its side.
    inbound: Option<mpsc::UnboundedSender<Vec<u8>>>,
    /// Bytes queued on `inbound` not yet written to the local socket.
    unconsumed: Arc<AtomicUsize>,
    /// What the host may still send (the guest's grants).
    credit: Arc<Semaphore>,
    /// The host-side bridge is done sending.
    local_done: bool,
}

#[derive(Default)]
struct Streams {
    open: HashMap<u32, Entry>,
    /// Host-opened streams waiting for `Accept`/`Refuse`.
    pending: HashMap<u32, oneshot::Sender<bool>>,
    guest_opened: usize,
}

struct Inner {
    out: mpsc::Sender<Out>,
    streams: Mutex<Streams>,
    next_id: AtomicU32,
    dir: VmDir,
    /// The guest answered this session's `Hello`.
    ready: watch::Sender<bool>,
    paused: Mutex<Option<oneshot::Sender<()>>>,
    /// This session's id, in every `Hello`.
    session: [u8; 8],
    /// The pipe is gone: no stream can be opened any more.
    closed: watch::Sender<bool>,
}

/// The multiplexer on one VM's pipe. Cloning shares it.
#[derive(Clone)]
pub struct Mux {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Mux {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mux").field("dir", &self.inner.dir.path()).finish_non_exhaustive()
    }
}

fn lock(streams: &Mutex<Streams>) -> std::sync::MutexGuard<'_, Streams> {
    streams.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Mux {
    /// Starts a session on `pipe` (sends `Hello`); guest-opened streams go to `dir`'s port
    /// listeners. The tasks end when the pipe closes.
    pub fn start(pipe: UnixStream, dir: VmDir) -> Self {
        let (rd, wr) = pipe.into_split();
        let (out, queue) = mpsc::channel(WRITE_QUEUE);
        let inner = Arc::new(Inner {
            out,
            streams: Mutex::new(Streams::default()),
            next_id: AtomicU32::new(2),
            dir,
            ready: watch::channel(false).0,
            paused: Mutex::new(None),
            session: session_id(),
            closed: watch::channel(false).0,
        });
        tokio::spawn(write_loop(wr, queue));
        let reader = Arc::clone(&inner);
        tokio::spawn(async move {
            if let Err(e) = reader.read_loop(rd).await {
                tracing::warn!("vm pipe of {}: {e}", reader.dir.path().display());
            }
            reader.close_all();
        });
        let _ = inner.out.try_send(Out::Frame(frame(0, Kind::Hello, &inner.session)));
        Self { inner }
    }

    /// Resolves once the guest answered this session's `Hello` (a restored VM is ready).
    pub async fn ready(&self) -> Result<(), io::Error> {
        let mut ready = self.inner.ready.subscribe();
        let mut closed = self.inner.closed.subscribe();
        tokio::select! {
            r = ready.wait_for(|r| *r) => r.map(|_| ()).map_err(|_| gone()),
            _ = closed.wait_for(|c| *c) => Err(gone()),
        }
    }

    /// Resolves once the pipe is gone and every stream with it.
    pub async fn closed(&self) {
        let _ = self.inner.closed.subscribe().wait_for(|c| *c).await;
    }

    /// Opens a stream to guest `port`.
    pub async fn connect(&self, port: u32) -> io::Result<UnixStream> {
        self.connect_sending(port, &[]).await
    }

    /// Opens a stream to guest `port` with `first` as its first bytes, sent right behind
    /// the `Open` instead of after the guest's `Accept` (which saves a round trip: the
    /// guest registers the stream when it reads the `Open`, before the data). Bytes beyond
    /// the stream's window wait for the `Accept`.
    pub async fn connect_sending(&self, port: u32, first: &[u8]) -> io::Result<UnixStream> {
        let (ours, mut theirs) = UnixStream::pair()?;
        let id = self.inner.next_id.fetch_add(2, Ordering::Relaxed);
        // Registered before the Open goes out: with its first bytes ahead, the guest may
        // answer with data right behind its Accept.
        let (inbound, unconsumed, credit) = self.inner.register(id, false).ok_or_else(gone)?;
        let (answer, accepted) = oneshot::channel();
        lock(&self.inner.streams).pending.insert(id, answer);
        let (early, late) = first.split_at(first.len().min(TO_GUEST_WINDOW as usize));
        // What goes ahead uses up that much of the guest's window.
        credit.forget_permits(early.len());
        if let Err(e) = self.open(id, port, early, accepted).await {
            let mut streams = lock(&self.inner.streams);
            streams.pending.remove(&id);
            Inner::reset(&mut streams, id);
            return Err(e);
        }
        tokio::spawn(Arc::clone(&self.inner).bridge(id, ours, inbound, unconsumed, credit));
        if !late.is_empty() {
            theirs.write_all(late).await?;
        }
        Ok(theirs)
    }

    /// Sends stream `id`'s `Open` and `early` bytes; resolves once the guest accepted.
    async fn open(&self, id: u32, port: u32, early: &[u8], accepted: oneshot::Receiver<bool>) -> io::Result<()> {
        self.inner.send(frame_u32(id, Kind::Open, port)).await?;
        for chunk in early.chunks(MAX_DATA) {
            self.inner.send(frame(id, Kind::Data, chunk)).await?;
        }
        match tokio::time::timeout(OPEN_TIMEOUT, accepted).await {
            Ok(Ok(true)) => Ok(()),
            Ok(Ok(false)) => {
                Err(io::Error::new(io::ErrorKind::ConnectionRefused, format!("nothing listens on guest port {port}")))
            }
            Ok(Err(_)) => Err(gone()),
            Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, format!("guest port {port} did not answer"))),
        }
    }

    /// Asks the guest to stop sending; resolves once nothing is in flight either way. If
    /// the guest does not answer within [`PAUSE_TIMEOUT`] (starved, or hostile), the pipe
    /// is resumed before the error returns: what the host held back goes out, and the
    /// sandbox goes on as before the attempt.
    pub async fn pause(&self) -> io::Result<()> {
        let (done, paused) = oneshot::channel();
        *self.inner.paused.lock().unwrap_or_else(PoisonError::into_inner) = Some(done);
        self.inner.out.send(Out::Pause).await.map_err(|_| gone())?;
        let failed = match tokio::time::timeout(PAUSE_TIMEOUT, paused).await {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(_)) => gone(),
            Err(_) => io::Error::new(io::ErrorKind::TimedOut, "the guest did not pause its pipe"),
        };
        self.inner.paused.lock().unwrap_or_else(PoisonError::into_inner).take();
        if let Err(e) = self.resume().await {
            tracing::debug!("resuming the pipe after a failed pause: {e}");
        }
        Err(failed)
    }

    /// Ends a [`Mux::pause`]: the session and its streams go on.
    pub async fn resume(&self) -> io::Result<()> {
        self.inner.out.send(Out::Resume).await.map_err(|_| gone())
    }
}

/// How long [`Mux::pause`] waits for the guest's answer.
pub const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);

/// A random session id (the clock and pid when the kernel's generator cannot be read).
fn session_id() -> [u8; 8] {
    let mut id = [0u8; 8];
    if crate::host_random(&mut id).is_err() {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        id = (now.as_nanos() as u64 ^ u64::from(std::process::id()) << 32).to_be_bytes();
    }
    id
}

fn gone() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "the VM's pipe is closed")
}

async fn write_loop(mut pipe: OwnedWriteHalf, mut queue: mpsc::Receiver<Out>) {
    let mut held = VecDeque::new();
    let mut paused = false;
    while let Some(out) = queue.recv().await {
        let result = match out {
            Out::Frame(f) if paused => {
                held.push_back(f);
                Ok(())
            }
            Out::Frame(f) => pipe.write_all(&f).await,
            Out::Pause => {
                paused = true;
                pipe.write_all(&frame(0, Kind::Pause, &[])).await
            }
            Out::Resume => {
                paused = false;
                let mut r = pipe.write_all(&frame(0, Kind::Resume, &[])).await;
                while let (Ok(()), Some(f)) = (&r, held.pop_front()) {
                    r = pipe.write_all(&f).await;
                }
                r
            }
        };
        if result.is_err() {
            break;
        }
    }
}

/// Why the reader gave up on the pipe.
#[derive(Debug, thiserror::Error)]
enum PipeError {
    #[error("read failed")]
    Io(#[from] io::Error),
    #[error("malformed frame from the guest")]
    Frame(#[from] matchlock_protocol::mux::MuxError),
    #[error("the guest sent {0:?} on stream {1}, which it may not")]
    Protocol(Kind, u32),
}

impl Inner {
    async fn send(&self, f: Vec<u8>) -> io::Result<()> {
        self.out.send(Out::Frame(f)).await.map_err(|_| gone())
    }

    /// Adds stream `id` to the open set; `None` once the pipe is gone.
    #[allow(clippy::type_complexity)]
    fn register(
        &self,
        id: u32,
        guest_opened: bool,
    ) -> Option<(mpsc::UnboundedReceiver<Vec<u8>>, Arc<AtomicUsize>, Arc<Semaphore>)> {
        if *self.closed.borrow() {
            return None;
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let unconsumed = Arc::new(AtomicUsize::new(0));
        let credit = Arc::new(Semaphore::new(TO_GUEST_WINDOW as usize));
        let mut streams = lock(&self.streams);
        if guest_opened {
            streams.guest_opened += 1;
        }
        streams.open.insert(
            id,
            Entry {
                inbound: Some(tx),
                unconsumed: Arc::clone(&unconsumed),
                credit: Arc::clone(&credit),
                local_done: false,
            },
        );
        Some((rx, unconsumed, credit))
    }

    /// Forgets stream `id` once neither side will send on it.
    fn finish_if_done(streams: &mut Streams, id: u32) {
        if streams.open.get(&id).is_some_and(|e| e.inbound.is_none() && e.local_done) {
            streams.open.remove(&id);
            if !opened_by_host(id) {
                streams.guest_opened -= 1;
            }
        }
    }

    fn reset(streams: &mut Streams, id: u32) {
        if let Some(entry) = streams.open.get_mut(&id) {
            entry.inbound = None;
            entry.credit.close();
            entry.local_done = true;
        }
        Self::finish_if_done(streams, id);
    }

    /// Ends every stream: the pipe is gone.
    fn close_all(&self) {
        let _ = self.closed.send_replace(true);
        let mut streams = lock(&self.streams);
        streams.pending.clear();
        let ids: Vec<u32> = streams.open.keys().copied().collect();
        for id in ids {
            Self::reset(&mut streams, id);
        }
    }

    async fn read_loop(self: &Arc<Self>, mut pipe: OwnedReadHalf) -> Result<(), PipeError> {
        let mut header = [0u8; HEADER_LEN];
        let mut payload = vec![0u8; MAX_DATA];
        loop {
            match pipe.read_exact(&mut header).await {
                Ok(_) => {}
                // QEMU exited.
                Err(e) if matches!(e.kind(), io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset) => {
                    return Ok(())
                }
                Err(e) => return Err(e.into()),
            }
            let h = Header::decode(&header)?;
            let body = &mut payload[..h.len as usize];
            pipe.read_exact(body).await?;
            // Until the guest answers this session's Hello, what arrives belongs to no stream.
            if !*self.ready.borrow() && !matches!(h.kind, Kind::Hello | Kind::Paused) {
                continue;
            }
            self.dispatch(h, body).await?;
        }
    }

    async fn dispatch(self: &Arc<Self>, h: Header, body: &[u8]) -> Result<(), PipeError> {
        let id = h.stream;
        match h.kind {
            Kind::Hello => {
                if body == self.session {
                    let _ = self.ready.send_replace(true);
                }
            }
            Kind::Paused => {
                let waiting = self.paused.lock().unwrap_or_else(PoisonError::into_inner).take();
                match waiting {
                    Some(done) => {
                        let _ = done.send(());
                    }
                    // The guest opened its port: it may have dropped our Hello.
                    None if !*self.ready.borrow() => self.send(frame(0, Kind::Hello, &self.session)).await?,
                    None => {}
                }
            }
            Kind::Pause | Kind::Resume => return Err(PipeError::Protocol(h.kind, id)),
            Kind::Open => {
                if opened_by_host(id) {
                    return Err(PipeError::Protocol(h.kind, id));
                }
                let refuse = {
                    let streams = lock(&self.streams);
                    streams.open.contains_key(&id) || streams.guest_opened >= MAX_GUEST_STREAMS
                };
                if refuse {
                    self.send(frame(id, Kind::Refuse, &[])).await?;
                    return Ok(());
                }
                let Some((inbound, unconsumed, credit)) = self.register(id, true) else { return Ok(()) };
                let port = payload_u32(body);
                let inner = Arc::clone(self);
                tokio::spawn(async move {
                    match UnixStream::connect(inner.dir.port_listener(port)).await {
                        Ok(local) => {
                            if inner.send(frame(id, Kind::Accept, &[])).await.is_ok() {
                                inner.bridge(id, local, inbound, unconsumed, credit).await;
                            }
                        }
                        Err(_) => {
                            Self::reset(&mut lock(&inner.streams), id);
                            let _ = inner.send(frame(id, Kind::Refuse, &[])).await;
                        }
                    }
                });
            }
            Kind::Accept | Kind::Refuse => {
                let waiting = lock(&self.streams).pending.remove(&id);
                match waiting {
                    Some(answer) => {
                        let _ = answer.send(h.kind == Kind::Accept);
                    }
                    // An answer to a stream we gave up on: tell the guest it is gone.
                    None if h.kind == Kind::Accept => self.send(frame(id, Kind::Reset, &[])).await?,
                    None => {}
                }
            }
            Kind::Data => {
                let overran = {
                    let mut streams = lock(&self.streams);
                    let Some(entry) = streams.open.get_mut(&id) else { return Ok(()) };
                    let Some(inbound) = &entry.inbound else { return Ok(()) };
                    let queued = entry.unconsumed.fetch_add(body.len(), Ordering::AcqRel) + body.len();
                    let overran = queued > TO_HOST_WINDOW as usize || inbound.send(body.to_vec()).is_err();
                    if overran {
                        Self::reset(&mut streams, id);
                    }
                    overran
                };
                if overran {
                    // Beyond its window: the guest ignores flow control. The stream ends.
                    tracing::warn!("guest overran the window of stream {id}: reset");
                    self.send(frame(id, Kind::Reset, &[])).await?;
                }
            }
            Kind::Credit => {
                let grant = payload_u32(body) as usize;
                let overgranted = {
                    let mut streams = lock(&self.streams);
                    let Some(entry) = streams.open.get(&id) else { return Ok(()) };
                    let over = entry.credit.available_permits() + grant > TO_GUEST_WINDOW as usize;
                    if over {
                        Self::reset(&mut streams, id);
                    } else {
                        entry.credit.add_permits(grant);
                    }
                    over
                };
                if overgranted {
                    tracing::warn!("guest granted more than the window on stream {id}: reset");
                    self.send(frame(id, Kind::Reset, &[])).await?;
                }
            }
            Kind::Close => {
                let mut streams = lock(&self.streams);
                if let Some(entry) = streams.open.get_mut(&id) {
                    entry.inbound = None;
                }
                Self::finish_if_done(&mut streams, id);
            }
            Kind::Reset => Self::reset(&mut lock(&self.streams), id),
        }
        Ok(())
    }

    /// Pumps one stream between `local` and the pipe until both directions are done.
    async fn bridge(
        self: Arc<Self>,
        id: u32,
        local: UnixStream,
        mut inbound: mpsc::UnboundedReceiver<Vec<u8>>,
        unconsumed: Arc<AtomicUsize>,
        credit: Arc<Semaphore>,
    ) {
        let (mut rd, mut wr) = local.into_split();
        let outbound = async {
            let mut buf = vec![0u8; MAX_DATA];
            loop {
                let Ok(first) = credit.acquire().await else { break };
                first.forget();
                let extra = credit.available_permits().min(MAX_DATA - 1);
                if let Ok(more) = credit.try_acquire_many(extra as u32) {
                    more.forget();
                }
                let want = extra + 1;
                match rd.read(&mut buf[..want]).await {
                    Ok(n) if n > 0 => {
                        credit.add_permits(want - n);
                        if self.send(frame(id, Kind::Data, &buf[..n])).await.is_err() {
                            break;
                        }
                    }
                    _ => {
                        let _ = self.send(frame(id, Kind::Close, &[])).await;
                        break;
                    }
                }
            }
            let mut streams = lock(&self.streams);
            if let Some(entry) = streams.open.get_mut(&id) {
                entry.local_done = true;
            }
            Self::finish_if_done(&mut streams, id);
        };
        let inbound = async {
            let mut uncredited = 0;
            while let Some(chunk) = inbound.recv().await {
                if wr.write_all(&chunk).await.is_err() {
                    Self::reset(&mut lock(&self.streams), id);
                    let _ = self.send(frame(id, Kind::Reset, &[])).await;
                    return;
                }
                unconsumed.fetch_sub(chunk.len(), Ordering::AcqRel);
                uncredited += chunk.len();
                if uncredited >= credit_batch(TO_HOST_WINDOW) as usize {
                    if self.send(frame_u32(id, Kind::Credit, uncredited as u32)).await.is_err() {
                        return;
                    }
                    uncredited = 0;
                }
            }
            let _ = wr.shutdown().await;
        };
        tokio::join!(outbound, inbound);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A guest end on a socket pair: reads one frame.
    async fn read_frame(guest: &mut UnixStream) -> (Header, Vec<u8>) {
        let mut header = [0u8; HEADER_LEN];
        guest.read_exact(&mut header).await.unwrap();
        let h = Header::decode(&header).unwrap();
        let mut body = vec![0u8; h.len as usize];
        guest.read_exact(&mut body).await.unwrap();
        (h, body)
    }

    /// The guest end after the session's `Hello`.
    async fn session() -> (Mux, UnixStream, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let (host, mut guest) = UnixStream::pair().unwrap();
        let mux = Mux::start(host, VmDir::at(dir.path()));
        let (hello, session) = read_frame(&mut guest).await;
        assert_eq!(hello.kind, Kind::Hello);
        guest.write_all(&frame(0, Kind::Hello, &session)).await.unwrap();
        mux.ready().await.unwrap();
        (mux, guest, dir)
    }

    #[tokio::test]
    async fn first_bytes_go_with_the_open_and_an_answer_right_behind_the_accept_arrives() {
        let (mux, mut guest, _dir) = session().await;
        let guest_side = tokio::spawn(async move {
            let (open, port) = read_frame(&mut guest).await;
            assert_eq!((open.kind, payload_u32(&port)), (Kind::Open, 5000));
            // The request is there before the guest has accepted anything.
            let (data, request) = read_frame(&mut guest).await;
            assert_eq!((data.kind, data.stream, request.as_slice()), (Kind::Data, open.stream, &b"request"[..]));
            // Accept and the answer in one write: nothing may be lost in between.
            let mut answer = frame(open.stream, Kind::Accept, &[]);
            answer.extend(frame(open.stream, Kind::Data, b"answer"));
            guest.write_all(&answer).await.unwrap();
            guest
        });
        let mut stream = mux.connect_sending(5000, b"request").await.unwrap();
        let mut answer = [0u8; 6];
        tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut answer)).await.unwrap().unwrap();
        assert_eq!(&answer, b"answer");
        let mut guest = guest_side.await.unwrap();

        // A refused stream is an error, and forgotten (control: the same guest end).
        let connecting = tokio::spawn({
            let mux = mux.clone();
            async move { mux.connect_sending(5009, b"x").await }
        });
        let (open, _) = read_frame(&mut guest).await;
        let _ = read_frame(&mut guest).await;
        guest.write_all(&frame(open.stream, Kind::Refuse, &[])).await.unwrap();
        let refused = connecting.await.unwrap().unwrap_err();
        assert_eq!(refused.kind(), io::ErrorKind::ConnectionRefused);
        assert!(!lock(&mux.inner.streams).open.contains_key(&open.stream));
    }

    #[tokio::test]
    async fn a_guest_that_never_pauses_leaves_the_pipe_running() {
        let (mux, mut guest, _dir) = session().await;
        // Positive control: a guest that answers is paused, and what the host sends meanwhile
        // is held until the resume.
        let pausing = tokio::spawn({
            let mux = mux.clone();
            async move { mux.pause().await }
        });
        assert_eq!(read_frame(&mut guest).await.0.kind, Kind::Pause);
        guest.write_all(&frame(0, Kind::Paused, &[])).await.unwrap();
        pausing.await.unwrap().unwrap();
        let connecting = tokio::spawn({
            let mux = mux.clone();
            async move { mux.connect_sending(5000, b"x").await.map(|_| ()) }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        mux.resume().await.unwrap();
        assert_eq!(read_frame(&mut guest).await.0.kind, Kind::Resume);
        let (open, _) = read_frame(&mut guest).await;
        assert_eq!(open.kind, Kind::Open, "held frames follow the resume");
        let _ = read_frame(&mut guest).await;
        guest.write_all(&frame(open.stream, Kind::Refuse, &[])).await.unwrap();
        assert!(connecting.await.unwrap().is_err());

        // A starved (or hostile) guest never answers: the pause fails after its timeout and
        // the pipe is resumed, so later frames are not held for good.
        let err = mux.pause().await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(read_frame(&mut guest).await.0.kind, Kind::Pause);
        assert_eq!(read_frame(&mut guest).await.0.kind, Kind::Resume);
        let connecting = tokio::spawn({
            let mux = mux.clone();
            async move { mux.connect_sending(5001, b"y").await.map(|_| ()) }
        });
        let (open, port) = read_frame(&mut guest).await;
        assert_eq!((open.kind, payload_u32(&port)), (Kind::Open, 5001));
        let _ = read_frame(&mut guest).await;
        guest.write_all(&frame(open.stream, Kind::Refuse, &[])).await.unwrap();
        assert!(connecting.await.unwrap().is_err());
    }
}
