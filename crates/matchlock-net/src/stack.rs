//! The userspace TCP/IP stack: guest Ethernet frames in, host sockets out.
//!
//! Frames arrive from the VMM (QEMU's `-netdev stream`: a 4-byte big-endian length, then the
//! frame). smoltcp terminates the guest's TCP: every SYN, to any address, gets its own socket
//! (AnyIP), and once the handshake completes the connection is handed to the [`FlowHandler`]
//! as a byte stream. UDP never enters smoltcp: datagrams go to the handler, which answers
//! through [`UdpReply`]. Everything from the guest is bounded: frame size, connections,
//! half-open connections, queued frames.

use std::collections::{HashMap, VecDeque};
use std::future::{poll_fn, Future};
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant as StdInstant;

use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{Device, DeviceCapabilities, Medium, RxToken, TxToken};
use smoltcp::socket::tcp;
use smoltcp::time::Instant;
use smoltcp::wire::{
    EthernetAddress, EthernetFrame, EthernetProtocol, EthernetRepr, HardwareAddress, IpAddress, IpCidr, IpProtocol,
    Ipv4Packet, Ipv4Repr, TcpPacket, UdpPacket, UdpRepr,
};
use tokio::io::{AsyncRead, AsyncWrite, DuplexStream, ReadBuf};
use tokio::sync::mpsc;

/// Guest-side addressing of one sandbox's NIC.
#[derive(Debug, Clone, Copy)]
pub struct StackConfig {
    /// The host's address on the guest's link (the guest's default gateway).
    pub gateway: Ipv4Addr,
    /// The guest's address.
    pub guest: Ipv4Addr,
    /// Prefix length of the link.
    pub prefix_len: u8,
    /// The guest NIC's MTU (IP packet size).
    pub mtu: usize,
    /// The gateway's MAC address.
    pub gateway_mac: [u8; 6],
}

/// Where new flows go.
pub trait FlowHandler {
    /// Whether to accept a guest connection to `dst` (a refused SYN is answered with RST).
    fn accept_tcp(&self, dst: SocketAddrV4) -> bool;
    /// A guest connection completed its handshake; `stream` carries its bytes.
    fn tcp(&self, src: SocketAddrV4, dst: SocketAddrV4, stream: DuplexStream);
    /// A UDP datagram from the guest.
    fn udp(&self, src: SocketAddrV4, dst: SocketAddrV4, payload: Vec<u8>, reply: UdpReply);
}

/// Sends datagrams back to the guest.
#[derive(Debug, Clone)]
pub struct UdpReply(mpsc::Sender<(SocketAddrV4, SocketAddrV4, Vec<u8>)>);

impl UdpReply {
    /// Queues `payload` from `from` to the guest's `to`; dropped if the queue is full (UDP).
    pub fn send(&self, from: SocketAddrV4, to: SocketAddrV4, payload: Vec<u8>) {
        let _ = self.0.try_send((from, to, payload));
    }
}

/// Bound on concurrent guest TCP connections.
const MAX_CONNECTIONS: usize = 256;
/// Bound on connections still in the handshake (SYN-flood protection).
const MAX_HALF_OPEN: usize = 64;
/// Receive buffer per connection (the window advertised to the guest).
const RX_BUFFER: usize = 256 * 1024;
/// Send buffer per connection.
const TX_BUFFER: usize = 128 * 1024;
/// Bytes buffered between a connection's socket and its handler.
const PIPE_BUFFER: usize = 64 * 1024;
/// Frames queued towards the guest before smoltcp is told to hold back.
const MAX_TX_BYTES: usize = 1024 * 1024;
/// Frames read from the VMM before they are processed.
const MAX_RX_FRAMES: usize = 256;
/// UDP replies queued towards the guest.
const UDP_REPLY_QUEUE: usize = 256;
/// A handshake not completed in this time is dropped.
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

/// Frame queues between the VMM link and smoltcp.
struct Queues {
    rx: VecDeque<Vec<u8>>,
    tx: Vec<u8>,
    mtu: usize,
}

struct Rx(Vec<u8>);
struct Tx<'a>(&'a mut Vec<u8>);

impl RxToken for Rx {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl TxToken for Tx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let start = self.0.len();
        self.0.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_be_bytes());
        self.0.resize(start + 4 + len, 0);
        f(&mut self.0[start + 4..])
    }
}

impl Device for Queues {
    type RxToken<'a> = Rx;
    type TxToken<'a> = Tx<'a>;

    fn receive(&mut self, _: Instant) -> Option<(Rx, Tx<'_>)> {
        let frame = self.rx.pop_front()?;
        Some((Rx(frame), Tx(&mut self.tx)))
    }

    fn transmit(&mut self, _: Instant) -> Option<Tx<'_>> {
        (self.tx.len() < MAX_TX_BYTES).then_some(Tx(&mut self.tx))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = self.mtu + 14;
        caps
    }
}

/// One guest TCP connection.
struct Connection {
    handle: SocketHandle,
    src: SocketAddrV4,
    dst: SocketAddrV4,
    created: StdInstant,
    /// Our end of the pipe to the handler, once the handshake completed.
    pipe: Option<DuplexStream>,
    /// The guest's FIN was passed on to the handler.
    guest_closed: bool,
    /// The handler's EOF was passed on to the guest.
    handler_closed: bool,
}

/// The stack of one sandbox.
pub struct Stack<L, H> {
    link: L,
    handler: H,
    config: StackConfig,
    iface: Interface,
    sockets: SocketSet<'static>,
    queues: Queues,
    connections: HashMap<(SocketAddrV4, SocketAddrV4), Connection>,
    read_buf: Vec<u8>,
    read_len: usize,
    udp_tx: mpsc::Sender<(SocketAddrV4, SocketAddrV4, Vec<u8>)>,
    udp_rx: mpsc::Receiver<(SocketAddrV4, SocketAddrV4, Vec<u8>)>,
    guest_mac: Option<EthernetAddress>,
    started: StdInstant,
    timer: Pin<Box<tokio::time::Sleep>>,
}

impl<L, H> std::fmt::Debug for Stack<L, H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stack").field("config", &self.config).field("connections", &self.connections.len()).finish()
    }
}

impl<L: AsyncRead + AsyncWrite + Unpin, H: FlowHandler> Stack<L, H> {
    /// A stack on `link` (the VMM's frame stream).
    pub fn new(link: L, handler: H, config: StackConfig) -> Self {
        let mut queues = Queues { rx: VecDeque::new(), tx: Vec::new(), mtu: config.mtu };
        let mac = EthernetAddress(config.gateway_mac);
        let started = StdInstant::now();
        let mut iface = Interface::new(Config::new(HardwareAddress::Ethernet(mac)), &mut queues, Instant::ZERO);
        let gateway = config.gateway;
        iface.update_ip_addrs(|addrs| {
            let _ = addrs.push(IpCidr::new(IpAddress::Ipv4(gateway), config.prefix_len));
        });
        // Accept packets for every destination: the gateway is the route to the whole Internet.
        iface.set_any_ip(true);
        let _ = iface.routes_mut().add_default_ipv4_route(gateway);
        let (udp_tx, udp_rx) = mpsc::channel(UDP_REPLY_QUEUE);
        Self {
            link,
            handler,
            config,
            iface,
            sockets: SocketSet::new(Vec::new()),
            queues,
            connections: HashMap::new(),
            read_buf: vec![0; 256 * 1024],
            read_len: 0,
            udp_tx,
            udp_rx,
            guest_mac: None,
            started,
            timer: Box::pin(tokio::time::sleep(std::time::Duration::ZERO)),
        }
    }

    /// Runs until the VMM closes the link.
    pub async fn run(mut self) -> io::Result<()> {
        poll_fn(|cx| self.poll(cx)).await
    }

    fn now(&self) -> Instant {
        Instant::from_micros(i64::try_from(self.started.elapsed().as_micros()).unwrap_or(i64::MAX))
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        for _ in 0..64 {
            let mut progress = false;
            match self.read_frames(cx) {
                Poll::Ready(Ok(read)) => progress |= read,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {}
            }
            while let Poll::Ready(Some((from, to, payload))) = self.udp_rx.poll_recv(cx) {
                self.emit_udp(from, to, &payload);
                progress = true;
            }
            progress |= self.pump_interface();
            progress |= self.service_connections(cx);
            progress |= self.pump_interface();
            match self.write_frames(cx) {
                Poll::Ready(Ok(wrote)) => progress |= wrote,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {}
            }
            if !progress {
                let now = self.now();
                if let Some(delay) = self.iface.poll_delay(now, &self.sockets) {
                    let delay = std::time::Duration::from_micros(delay.total_micros());
                    self.timer.as_mut().reset(tokio::time::Instant::now() + delay);
                    if self.timer.as_mut().poll(cx).is_ready() {
                        continue;
                    }
                }
                return Poll::Pending;
            }
        }
        // Busy: let other tasks run, then come back.
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// Lets smoltcp process every received frame and emit until it has nothing more to send
    /// (it emits at most one segment per socket per poll). Returns whether anything moved.
    fn pump_interface(&mut self) -> bool {
        let received = self.queues.rx.len();
        let mut moved = false;
        loop {
            let queued = self.queues.tx.len();
            let now = self.now();
            let changed = self.iface.poll(now, &mut self.queues, &mut self.sockets) != smoltcp::iface::PollResult::None;
            let emitted = self.queues.tx.len() > queued;
            moved |= changed || emitted;
            if !emitted || self.queues.tx.len() >= MAX_TX_BYTES {
                break;
            }
        }
        moved || self.queues.rx.len() != received
    }

    /// Reads length-prefixed frames from the link into the receive queue.
    fn read_frames(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        let mut any = false;
        while self.queues.rx.len() < MAX_RX_FRAMES {
            let mut buf = ReadBuf::new(&mut self.read_buf[self.read_len..]);
            match Pin::new(&mut self.link).poll_read(cx, &mut buf) {
                Poll::Ready(Ok(())) => {
                    let n = buf.filled().len();
                    if n == 0 {
                        return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()));
                    }
                    self.read_len += n;
                    any = true;
                    self.split_frames();
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return if any { Poll::Ready(Ok(true)) } else { Poll::Pending },
            }
        }
        Poll::Ready(Ok(any))
    }

    fn split_frames(&mut self) {
        let mut offset = 0;
        while self.read_len - offset >= 4 {
            let header: [u8; 4] = self.read_buf[offset..offset + 4].try_into().expect("4 bytes");
            let len = u32::from_be_bytes(header) as usize;
            if len > self.read_buf.len() - 4 {
                // Larger than any frame: the stream cannot be trusted past this point, so
                // drop what is buffered.
                offset = self.read_len;
                break;
            }
            if self.read_len - offset - 4 < len {
                break;
            }
            let frame = self.read_buf[offset + 4..offset + 4 + len].to_vec();
            offset += 4 + len;
            self.ingest(frame);
        }
        self.read_buf.copy_within(offset..self.read_len, 0);
        self.read_len -= offset;
    }

    /// Classifies one frame: UDP to the handler, new SYNs get a socket, the rest to smoltcp.
    fn ingest(&mut self, frame: Vec<u8>) {
        if frame.len() > self.config.mtu + 18 {
            return;
        }
        let Ok(eth) = EthernetFrame::new_checked(&frame[..]) else { return };
        if self.guest_mac.is_none() && eth.src_addr().is_unicast() {
            self.guest_mac = Some(eth.src_addr());
        }
        if eth.ethertype() == EthernetProtocol::Ipv4 {
            if let Ok(ip) = Ipv4Packet::new_checked(eth.payload()) {
                if ip.verify_checksum() && !ip.more_frags() && ip.frag_offset() == 0 {
                    let src_ip = ip.src_addr();
                    let dst_ip = ip.dst_addr();
                    match ip.next_header() {
                        IpProtocol::Udp => {
                            if let Ok(udp) = UdpPacket::new_checked(ip.payload()) {
                                let src = SocketAddrV4::new(src_ip, udp.src_port());
                                let dst = SocketAddrV4::new(dst_ip, udp.dst_port());
                                if src_ip == self.config.guest {
                                    let reply = UdpReply(self.udp_tx.clone());
                                    self.handler.udp(src, dst, udp.payload().to_vec(), reply);
                                }
                            }
                            return;
                        }
                        // Echo is answered for the gateway only: a reply from any other
                        // address would claim a host is reachable when nothing was sent.
                        IpProtocol::Icmp if dst_ip != self.config.gateway => return,
                        IpProtocol::Tcp => {
                            if let Ok(tcp) = TcpPacket::new_checked(ip.payload()) {
                                if tcp.syn() && !tcp.ack() {
                                    let src = SocketAddrV4::new(src_ip, tcp.src_port());
                                    let dst = SocketAddrV4::new(dst_ip, tcp.dst_port());
                                    self.on_syn(src, dst);
                                }
                            }
                        }
                        _ => {}
                    }
                }
            }
        }
        self.queues.rx.push_back(frame);
    }

    fn on_syn(&mut self, src: SocketAddrV4, dst: SocketAddrV4) {
        if src.ip() != &self.config.guest || self.connections.contains_key(&(src, dst)) {
            return;
        }
        let half_open = self.connections.values().filter(|c| c.pipe.is_none()).count();
        if self.connections.len() >= MAX_CONNECTIONS || half_open >= MAX_HALF_OPEN || !self.handler.accept_tcp(dst) {
            return; // smoltcp answers RST: nobody listens
        }
        // Earlier frames first, so this SYN is the one the new listener takes.
        if !self.queues.rx.is_empty() {
            let now = self.now();
            self.iface.poll(now, &mut self.queues, &mut self.sockets);
        }
        let mut socket =
            tcp::Socket::new(tcp::SocketBuffer::new(vec![0; RX_BUFFER]), tcp::SocketBuffer::new(vec![0; TX_BUFFER]));
        socket.set_nagle_enabled(false);
        socket.set_ack_delay(None);
        if socket.listen((IpAddress::Ipv4(*dst.ip()), dst.port())).is_err() {
            return;
        }
        let handle = self.sockets.add(socket);
        let connection = Connection {
            handle,
            src,
            dst,
            created: StdInstant::now(),
            pipe: None,
            guest_closed: false,
            handler_closed: false,
        };
        self.connections.insert((src, dst), connection);
    }

    /// Moves bytes between sockets and handlers; hands over new connections; reaps closed ones.
    fn service_connections(&mut self, cx: &mut Context<'_>) -> bool {
        let mut progress = false;
        let mut finished = Vec::new();
        for (key, conn) in &mut self.connections {
            let socket = self.sockets.get_mut::<tcp::Socket>(conn.handle);
            let state = socket.state();
            if conn.pipe.is_none() {
                match state {
                    tcp::State::Listen | tcp::State::SynReceived => {
                        if conn.created.elapsed() > HANDSHAKE_TIMEOUT {
                            finished.push(*key);
                        }
                        continue;
                    }
                    tcp::State::Closed | tcp::State::TimeWait => {
                        finished.push(*key);
                        continue;
                    }
                    _ => {
                        let (ours, theirs) = tokio::io::duplex(PIPE_BUFFER);
                        conn.pipe = Some(ours);
                        self.handler.tcp(conn.src, conn.dst, theirs);
                        progress = true;
                    }
                }
            }
            let pipe = conn.pipe.as_mut().expect("set above");
            // Guest → handler.
            let mut broken = false;
            while socket.can_recv() {
                let moved = socket.recv(|data| match Pin::new(&mut *pipe).poll_write(cx, data) {
                    Poll::Ready(Ok(n)) => (n, n),
                    Poll::Ready(Err(_)) => {
                        broken = true;
                        (0, 0)
                    }
                    Poll::Pending => (0, 0),
                });
                match moved {
                    Ok(n) if n > 0 => progress = true,
                    _ => break,
                }
            }
            if broken {
                socket.abort();
            }
            if !conn.guest_closed
                && !socket.may_recv()
                && !socket.can_recv()
                && Pin::new(&mut *pipe).poll_shutdown(cx).is_ready()
            {
                conn.guest_closed = true;
                progress = true;
            }
            // Handler → guest.
            while !conn.handler_closed && socket.can_send() {
                let mut eof = false;
                let moved = socket.send(|space| {
                    let mut buf = ReadBuf::new(space);
                    match Pin::new(&mut *pipe).poll_read(cx, &mut buf) {
                        Poll::Ready(Ok(())) => {
                            let n = buf.filled().len();
                            eof = n == 0;
                            (n, n)
                        }
                        Poll::Ready(Err(_)) => {
                            eof = true;
                            (0, 0)
                        }
                        Poll::Pending => (0, 0),
                    }
                });
                if eof {
                    socket.close();
                    conn.handler_closed = true;
                    progress = true;
                }
                match moved {
                    Ok(n) if n > 0 => progress = true,
                    _ => break,
                }
            }
            if matches!(socket.state(), tcp::State::Closed | tcp::State::TimeWait) {
                finished.push(*key);
            }
        }
        for key in finished {
            if let Some(conn) = self.connections.remove(&key) {
                self.sockets.remove(conn.handle);
                progress = true;
            }
        }
        progress
    }

    /// Writes queued frames to the link.
    fn write_frames(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        let mut any = false;
        while !self.queues.tx.is_empty() {
            match Pin::new(&mut self.link).poll_write(cx, &self.queues.tx) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => {
                    self.queues.tx.drain(..n);
                    any = true;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return if any { Poll::Ready(Ok(true)) } else { Poll::Pending },
            }
        }
        Poll::Ready(Ok(any))
    }

    /// Builds an Ethernet/IPv4/UDP frame towards the guest.
    fn emit_udp(&mut self, from: SocketAddrV4, to: SocketAddrV4, payload: &[u8]) {
        let Some(guest_mac) = self.guest_mac else { return };
        if self.queues.tx.len() >= MAX_TX_BYTES || payload.len() + 28 > self.config.mtu {
            return;
        }
        let udp = UdpRepr { src_port: from.port(), dst_port: to.port() };
        let ip = Ipv4Repr {
            src_addr: *from.ip(),
            dst_addr: *to.ip(),
            next_header: IpProtocol::Udp,
            payload_len: udp.header_len() + payload.len(),
            hop_limit: 64,
        };
        let eth = EthernetRepr {
            src_addr: EthernetAddress(self.config.gateway_mac),
            dst_addr: guest_mac,
            ethertype: EthernetProtocol::Ipv4,
        };
        let len = eth.buffer_len() + ip.buffer_len() + udp.header_len() + payload.len();
        let checksum = smoltcp::phy::ChecksumCapabilities::default();
        Tx(&mut self.queues.tx).consume(len, |buf| {
            let mut frame = EthernetFrame::new_unchecked(buf);
            eth.emit(&mut frame);
            let mut packet = Ipv4Packet::new_unchecked(frame.payload_mut());
            ip.emit(&mut packet, &checksum);
            let mut datagram = UdpPacket::new_unchecked(packet.payload_mut());
            udp.emit(
                &mut datagram,
                &IpAddress::Ipv4(ip.src_addr),
                &IpAddress::Ipv4(ip.dst_addr),
                payload.len(),
                |b| b.copy_from_slice(payload),
                &checksum,
            );
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    struct Counting(std::sync::Arc<std::sync::atomic::AtomicUsize>);

    impl FlowHandler for Counting {
        fn accept_tcp(&self, _: SocketAddrV4) -> bool {
            true
        }
        fn tcp(&self, _: SocketAddrV4, _: SocketAddrV4, _: DuplexStream) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        fn udp(&self, _: SocketAddrV4, _: SocketAddrV4, _: Vec<u8>, _: UdpReply) {}
    }

    const GUEST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 2];

    fn config() -> StackConfig {
        StackConfig {
            gateway: Ipv4Addr::new(192, 168, 100, 1),
            guest: Ipv4Addr::new(192, 168, 100, 2),
            prefix_len: 24,
            mtu: 1500,
            gateway_mac: [0x02, 0, 0, 0, 0, 1],
        }
    }

    fn arp_request() -> Vec<u8> {
        let mut frame = vec![0xff; 6];
        frame.extend_from_slice(&GUEST_MAC);
        frame.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
        frame.extend_from_slice(&GUEST_MAC);
        frame.extend_from_slice(&[192, 168, 100, 2, 0, 0, 0, 0, 0, 0, 192, 168, 100, 1]);
        frame
    }

    /// A cheap deterministic generator (no dependency for a test).
    fn noise(seed: &mut u64) -> u64 {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        *seed
    }

    #[tokio::test]
    async fn hostile_frames_leave_the_stack_answering() {
        let (mut vmm, link) = tokio::io::duplex(1 << 20);
        let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        tokio::spawn(Stack::new(link, Counting(accepted.clone()), config()).run());
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut frames = Vec::new();
        for i in 0..3000 {
            let len = (noise(&mut seed) % 1600) as usize;
            let mut frame: Vec<u8> = (0..len).map(|_| noise(&mut seed) as u8).collect();
            if i % 2 == 0 && frame.len() > 60 {
                // Plausible headers with random contents: Ethernet to the gateway, IPv4, TCP SYN.
                frame[..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 1]);
                frame[6..12].copy_from_slice(&GUEST_MAC);
                frame[12..14].copy_from_slice(&[0x08, 0x00]);
                frame[14] = 0x45;
                frame[23] = 6;
                frame[47] = 0x02;
            }
            frames.extend_from_slice(&(frame.len() as u32).to_be_bytes());
            frames.extend_from_slice(&frame);
        }
        vmm.write_all(&frames).await.unwrap();
        let arp = arp_request();
        vmm.write_all(&(arp.len() as u32).to_be_bytes()).await.unwrap();
        vmm.write_all(&arp).await.unwrap();
        // The stack still answers: an ARP reply for the gateway comes back.
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let len = tokio::time::timeout_at(deadline, vmm.read_u32()).await.expect("stack answers").unwrap() as usize;
            let mut frame = vec![0u8; len];
            vmm.read_exact(&mut frame).await.unwrap();
            if frame.len() >= 42 && frame[12..14] == [0x08, 0x06] && frame[20..22] == [0, 2] {
                assert_eq!(&frame[28..32], &[192, 168, 100, 1]);
                break;
            }
        }
        assert_eq!(accepted.load(std::sync::atomic::Ordering::Relaxed), 0, "no garbage completed a handshake");
    }
}
