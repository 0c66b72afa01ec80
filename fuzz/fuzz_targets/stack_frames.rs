//! Guest Ethernet frames into the userspace TCP/IP stack, served by the engine's real flow
//! handler. Each input is a sequence of frames; the harness fixes what a fuzzer cannot guess,
//! so that inputs get past the first check and into connections: IPv4, TCP and UDP checksums,
//! and on TCP segments of a connection the stack answered, its sequence and acknowledgement
//! numbers. Everything else (addresses, ports, flags, options, fragments, ARP, payloads, the
//! HTTP or DNS bytes inside a connection) is the fuzzer's.
#![no_main]

mod common;

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::rc::Rc;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use matchlock_net::stack::{Stack, StackConfig};
use matchlock_net::Flows;
use smoltcp::wire::{EthernetFrame, EthernetProtocol, IpAddress, IpProtocol, Ipv4Packet, TcpPacket, UdpPacket};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn flows() -> &'static Flows {
    static FLOWS: OnceLock<Flows> = OnceLock::new();
    FLOWS.get_or_init(common::flows)
}

/// (guest ip, guest port, remote ip, remote port)
type FlowKey = (Ipv4Addr, u16, Ipv4Addr, u16);

/// Per flow: the stack's next sequence number (what the guest must acknowledge) and the guest's.
#[derive(Default)]
struct Tcb {
    stack_next: Option<u32>,
    guest_next: Option<u32>,
}

type Tcbs = Rc<RefCell<HashMap<FlowKey, Tcb>>>;

/// Fixes checksums and, on known flows, sequence numbers of one guest frame.
fn fix_up(frame: &mut [u8], tcbs: &Tcbs) {
    let Ok(mut eth) = EthernetFrame::new_checked(&mut *frame) else { return };
    if eth.ethertype() != EthernetProtocol::Ipv4 {
        return;
    }
    let Ok(mut ip) = Ipv4Packet::new_checked(eth.payload_mut()) else { return };
    let (src, dst) = (ip.src_addr(), ip.dst_addr());
    let protocol = ip.next_header();
    if !ip.more_frags() && ip.frag_offset() == 0 {
        match protocol {
            IpProtocol::Tcp => {
                if let Ok(mut tcp) = TcpPacket::new_checked(ip.payload_mut()) {
                    let key = (src, tcp.src_port(), dst, tcp.dst_port());
                    let mut tcbs = tcbs.borrow_mut();
                    let tcb = tcbs.entry(key).or_default();
                    if tcp.syn() && !tcp.ack() {
                        tcb.guest_next = Some(tcp.seq_number().0.wrapping_add(1) as u32);
                    } else if let Some(next) = tcb.guest_next {
                        tcp.set_seq_number(smoltcp::wire::TcpSeqNumber(next as i32));
                        let len = tcp.payload_mut().len() as u32 + u32::from(tcp.fin());
                        tcb.guest_next = Some(next.wrapping_add(len));
                    }
                    if let (true, Some(ack)) = (tcp.ack(), tcb.stack_next) {
                        tcp.set_ack_number(smoltcp::wire::TcpSeqNumber(ack as i32));
                    }
                    tcp.fill_checksum(&IpAddress::Ipv4(src), &IpAddress::Ipv4(dst));
                }
            }
            IpProtocol::Udp => {
                if let Ok(mut udp) = UdpPacket::new_checked(ip.payload_mut()) {
                    udp.fill_checksum(&IpAddress::Ipv4(src), &IpAddress::Ipv4(dst));
                }
            }
            _ => {}
        }
    }
    ip.fill_checksum();
}

/// Learns the stack's sequence numbers from a frame it sent to the guest.
fn learn(frame: &[u8], tcbs: &Tcbs) {
    let Ok(eth) = EthernetFrame::new_checked(frame) else { return };
    let Ok(ip) = Ipv4Packet::new_checked(eth.payload()) else { return };
    if ip.next_header() != IpProtocol::Tcp {
        return;
    }
    let Ok(tcp) = TcpPacket::new_checked(ip.payload()) else { return };
    let key = (ip.dst_addr(), tcp.dst_port(), ip.src_addr(), tcp.src_port());
    let len = tcp.payload().len() as u32 + u32::from(tcp.syn()) + u32::from(tcp.fin());
    let next = (tcp.seq_number().0 as u32).wrapping_add(len);
    tcbs.borrow_mut().entry(key).or_default().stack_next = Some(next);
}

thread_local! {
    /// One runtime for every input (building one per input costs more than most inputs): the
    /// handler's tasks of an input end with its link, before the next input runs.
    static RUNTIME: tokio::runtime::Runtime = common::runtime();
}

fuzz_target!(|data: &[u8]| {
    RUNTIME.with(|runtime| run(runtime, data));
});

fn run(runtime: &tokio::runtime::Runtime, data: &[u8]) {
    let local = tokio::task::LocalSet::new();
    local.block_on(runtime, async {
        let (vmm, link) = tokio::io::duplex(4 << 20);
        let config = StackConfig {
            gateway: matchlock_net::GATEWAY,
            guest: matchlock_net::GUEST,
            prefix_len: matchlock_net::PREFIX_LEN,
            mtu: 1500,
            gateway_mac: [0x02, 0, 0, 0, 0, 1],
        };
        let stack = tokio::spawn(Stack::new(link, flows().clone(), config).run());
        let (mut from_stack, mut to_stack) = tokio::io::split(vmm);
        let tcbs: Tcbs = Rc::default();
        let learner = {
            let tcbs = tcbs.clone();
            tokio::task::spawn_local(async move {
                loop {
                    let Ok(len) = from_stack.read_u32().await else { return };
                    let mut frame = vec![0; len as usize];
                    if from_stack.read_exact(&mut frame).await.is_err() {
                        return;
                    }
                    learn(&frame, &tcbs);
                }
            })
        };
        // [len: u16 LE][frame]*, each frame at most a jumbo's size.
        let mut rest = data;
        while rest.len() >= 2 {
            let len = usize::from(u16::from_le_bytes([rest[0], rest[1]]) % 2048).min(rest.len() - 2);
            let mut frame = rest[2..2 + len].to_vec();
            rest = &rest[2 + len..];
            fix_up(&mut frame, &tcbs);
            if to_stack.write_u32(frame.len() as u32).await.is_err() || to_stack.write_all(&frame).await.is_err() {
                break;
            }
            // Let the stack, the handler's tasks and the learner run before the next frame.
            for _ in 0..8 {
                tokio::task::yield_now().await;
            }
        }
        let _ = to_stack.shutdown().await;
        let _ = stack.await;
        learner.abort();
    });
}
