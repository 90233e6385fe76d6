//! Target `net-stack`: a running `NetStack` with a TCP listener, an established TCP connection
//! and a bound UDP socket, fed hostile frames through the fake NIC(s) — random frames, and TCP
//! segments aimed at the open connection (in-window sequence numbers, any flags, options and
//! payload) — while the application reads, writes and time passes.

use std::cell::Cell;
use std::rc::Rc;

use net_device::{LinkState, MacAddress};
use net_stack::fake::{FakeControl, FakeDevice};
use net_stack::{
    Ipv4Address, Ipv4Cidr, Ipv4Mode, NetConfig, NetStack, NetStats, Platform, StackOptions,
    TcpOptions, TcpState, checksum,
};

use crate::engine::{Input, Outcome, Steps, Target, check, monotonic};
use crate::frames::{self, OUR_IP, OUR_MAC, PEER_IP, PEER_MAC};
use crate::targets::common::stats_fields;

const MAX_OPERATIONS: usize = 48;
const MS: u64 = 1_000_000;
const SERVER_PORT: u16 = 5201;
const CLIENT_PORT: u16 = 40_000;
const CLIENT_ISN: u32 = 1_000;

struct Clock(Rc<Cell<u64>>);

impl Platform for Clock {
    fn now_ns(&self) -> u64 {
        self.0.get()
    }
    fn wait_for_event(&self, deadline_ns: Option<u64>) {
        if let Some(deadline) = deadline_ns {
            self.0.set(self.0.get().max(deadline));
        }
    }
    fn random_seed(&self) -> u64 {
        7
    }
}

/// A TCP/IPv4 segment from the peer to our server port, checksums right.
fn segment(
    sequence: u32,
    acknowledgement: u32,
    flags: u8,
    window: u16,
    options: &[u8],
    payload: &[u8],
) -> Vec<u8> {
    let options_len = options.len().div_ceil(4) * 4;
    let mut frame = Vec::with_capacity(54 + options_len + payload.len());
    frame.extend_from_slice(&OUR_MAC);
    frame.extend_from_slice(&PEER_MAC);
    frame.extend_from_slice(&[0x08, 0x00, 0x45, 0]);
    frame.extend_from_slice(&((40 + options_len + payload.len()) as u16).to_be_bytes());
    frame.extend_from_slice(&[0, 0, 0x40, 0, 64, 6, 0, 0]);
    frame.extend_from_slice(&PEER_IP);
    frame.extend_from_slice(&OUR_IP);
    frame.extend_from_slice(&CLIENT_PORT.to_be_bytes());
    frame.extend_from_slice(&SERVER_PORT.to_be_bytes());
    frame.extend_from_slice(&sequence.to_be_bytes());
    frame.extend_from_slice(&acknowledgement.to_be_bytes());
    frame.push(((5 + options_len / 4) as u8) << 4);
    frame.push(flags);
    frame.extend_from_slice(&window.to_be_bytes());
    frame.extend_from_slice(&[0, 0, 0, 0]);
    frame.extend_from_slice(options);
    frame.resize(frame.len() + options_len - options.len(), 0);
    frame.extend_from_slice(payload);
    checksum::fill(&mut frame);
    frame
}

fn arp_reply() -> Vec<u8> {
    let mut frame = Vec::new();
    frame.extend_from_slice(&OUR_MAC);
    frame.extend_from_slice(&PEER_MAC);
    frame.extend_from_slice(&[0x08, 0x06, 0, 1, 8, 0, 6, 4, 0, 2]);
    frame.extend_from_slice(&PEER_MAC);
    frame.extend_from_slice(&PEER_IP);
    frame.extend_from_slice(&OUR_MAC);
    frame.extend_from_slice(&OUR_IP);
    frame
}

/// Advances `server_next` past the data in our TCP frames among `sent`.
fn learn_sent(sent: &[Vec<u8>], server_next: &mut u32) {
    for frame in sent {
        if frame.len() < 54 || frame[12..14] != [0x08, 0x00] || frame[23] != 6 {
            continue;
        }
        let ihl = usize::from(frame[14] & 0x0f) * 4;
        let total = usize::from(u16::from_be_bytes([frame[16], frame[17]]));
        let Some(tcp) = frame.get(14 + ihl..14 + ihl + 20) else {
            continue;
        };
        let ports = [SERVER_PORT.to_be_bytes(), CLIENT_PORT.to_be_bytes()].concat();
        if tcp[..4] != ports[..] || frame[30..34] != PEER_IP || tcp[13] & 0x04 != 0 {
            continue; // another flow, or a reset
        }
        let data_offset = usize::from(tcp[12] >> 4) * 4;
        let payload = total.saturating_sub(ihl + data_offset) as u32;
        let fin = u32::from(tcp[13] & 0x01);
        let sequence = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
        let end = sequence.wrapping_add(payload + fin);
        if end.wrapping_sub(*server_next) as i32 > 0 {
            *server_next = end;
        }
    }
}

/// The server's sequence number from the SYN-ACK it sent, if any.
fn syn_ack_sequence(sent: &[Vec<u8>]) -> Option<u32> {
    sent.iter().find_map(|frame| {
        let tcp = frame.get(34..54)?;
        (frame[12..14] == [0x08, 0x00] && tcp[13] & 0x12 == 0x12)
            .then(|| u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]))
    })
}

fn stats_list(stats: &NetStats) -> Vec<(&'static str, u64)> {
    let mut fields = vec![
        ("tcp_accepted", stats.tcp_accepted),
        ("tcp_connects", stats.tcp_connects),
        ("tcp_reclaimed", stats.tcp_reclaimed),
        ("tcp_linger_aborts", stats.tcp_linger_aborts),
        (
            "tcp_duplicate_syns_dropped",
            stats.tcp_duplicate_syns_dropped,
        ),
        ("dhcp_leases", stats.dhcp_leases),
        ("announcement_frames", stats.announcement_frames),
        ("gateway_solicitations", stats.gateway_solicitations),
        ("duplicates_dropped", stats.bond.duplicates_dropped),
        ("bad_frames_dropped", stats.bond.bad_frames_dropped),
        ("bond.rx_frames", stats.bond.total.bond.rx_frames),
        ("bond.tx_frames", stats.bond.total.bond.tx_frames),
        ("bond.rx_bad", stats.bond.total.bond.rx_bad),
    ];
    fields.extend(stats_fields(&stats.bond.total.device));
    fields
}

fn run(input: &mut Input, steps: &mut Steps) -> Outcome {
    let clock = Rc::new(Cell::new(1_000 * MS));
    let (synthetic, wire) = FakeDevice::boxed("synthetic", MacAddress(OUR_MAC));
    let config = NetConfig {
        ipv4: Ipv4Mode::Static {
            address: Ipv4Cidr::new(Ipv4Address::new(10, 0, 2, 15), 24),
            gateway: None,
        },
        ..NetConfig::default()
    };
    let options = StackOptions {
        tcp: TcpOptions {
            rx_buffer: 16 * 1024,
            tx_buffer: 16 * 1024,
            ..TcpOptions::default()
        },
        ..StackOptions::default()
    };
    let mut stack =
        NetStack::with_options(config, synthetic, Box::new(Clock(clock.clone())), options)
            .map_err(|error| format!("stack did not start: {error}"))?;
    let listener = stack
        .tcp_listen(SERVER_PORT)
        .map_err(|error| format!("listen: {error}"))?;
    let udp = stack
        .udp_bind(7)
        .map_err(|error| format!("bind: {error}"))?;
    // Handshake from the peer.
    wire.inject_rx(&arp_reply());
    wire.inject_rx(&segment(
        CLIENT_ISN,
        0,
        0x02,
        65_535,
        &[2, 4, 0x05, 0xb4],
        &[],
    ));
    stack.poll();
    let server_isn = syn_ack_sequence(&wire.take_tx()).ok_or("no SYN-ACK to a well-formed SYN")?;
    let mut client_next = CLIENT_ISN.wrapping_add(1);
    let mut server_next = server_isn.wrapping_add(1);
    wire.inject_rx(&segment(client_next, server_next, 0x10, 65_535, &[], &[]));
    stack.poll();
    let stream = stack
        .accept(&listener)
        .ok_or("handshake did not complete")?;
    let mut vf: Option<FakeControl> = None;
    let mut before = stats_list(&stack.stats());
    let mut buffer = vec![0u8; 4096];
    let mut hostile_acks: Vec<u32> = Vec::new();
    for _ in 0..MAX_OPERATIONS {
        if input.is_empty() {
            break;
        }
        clock.set(clock.get() + u64::from(input.u16()) * 10_000);
        let port = match (&vf, input.below(3)) {
            (Some(vf), 2) => vf.clone(),
            _ => wire.clone(),
        };
        let operation = input.below(10);
        if crate::engine::tracing() {
            eprintln!(
                "op {operation}: client_next {client_next} server_next {server_next} state {:?}",
                stack.tcp_state(&stream)
            );
        }
        match operation {
            0 | 1 => port.inject_rx(&frames::hostile_frame(input)),
            2 | 3 => {
                // At the open connection: near the expected numbers, any flags and options.
                let sequence = client_next.wrapping_add(u32::from(input.u16()).wrapping_sub(0x100));
                let acknowledgement = server_next
                    .wrapping_add(u32::from(input.u8()))
                    .wrapping_sub(0x40);
                hostile_acks.push(acknowledgement);
                let flags = [0x10, 0x18, 0x11, 0x04, 0x02, 0x12, input.u8()][input.below(7)];
                let options = input.bytes(40).to_vec();
                let payload = input.bytes(1400).to_vec();
                if crate::engine::tracing() {
                    eprintln!(
                        "  segment seq {sequence} ack {acknowledgement} flags {flags:#x} options {options:02x?} payload {}",
                        payload.len()
                    );
                }
                port.inject_rx(&segment(
                    sequence,
                    acknowledgement,
                    flags,
                    input.u16(),
                    &options,
                    &payload,
                ));
            }
            4 | 5 => {
                stack.poll();
            }
            6 => {
                if let Ok(read) = stack.tcp_read(&stream, &mut buffer) {
                    client_next = client_next.wrapping_add(read as u32);
                }
                while let Ok(Some(_)) = stack.udp_recv_from(&udp, &mut buffer) {}
            }
            7 => {
                let data = input.bytes(3000).to_vec();
                let _ = stack.tcp_write(&stream, &data);
            }
            8 => {
                // The peer acknowledges what we sent (keeps the connection alive and moving).
                learn_sent(&wire.take_tx(), &mut server_next);
                wire.inject_rx(&segment(client_next, server_next, 0x10, 65_535, &[], &[]));
                if let Some(vf) = &vf {
                    learn_sent(&vf.take_tx(), &mut server_next);
                }
            }
            _ => match input.below(4) {
                0 if vf.is_none() => {
                    let (device, handle) = FakeDevice::boxed("vf", MacAddress(OUR_MAC));
                    if stack.attach_vf(device).is_ok() {
                        vf = Some(handle);
                    }
                }
                0 => {
                    if let Some(vf) = &vf {
                        learn_sent(&vf.take_tx(), &mut server_next);
                    }
                    let _ = stack.detach_vf();
                    vf = None;
                }
                1 => {
                    port.set_link([LinkState::Up, LinkState::Down, LinkState::Gone][input.below(3)])
                }
                2 => port.set_offloads(input.bool(), [0, 65_535][input.below(2)]),
                _ => port.request_announce(),
            },
        }
        steps.count(1)?;
        let after = stats_list(&stack.stats());
        monotonic("net-stack", &before, &after)?;
        before = after;
        check(stack.stats().sockets_in_use <= 16, || {
            format!("{} sockets", stack.stats().sockets_in_use)
        })?;
    }
    // Healthy again: a good datagram reaches the UDP socket; an in-order segment reaches the
    // stream if it is still established.
    wire.set_link(LinkState::Up);
    clock.set(clock.get() + 10 * MS);
    stack.poll();
    while let Ok(Some(_)) = stack.udp_recv_from(&udp, &mut buffer) {}
    learn_sent(&wire.take_tx(), &mut server_next);
    wire.inject_rx(&frames::good_udp_frame(7, b"still accepted"));
    stack.poll();
    let received = stack.udp_recv_from(&udp, &mut buffer);
    check(
        matches!(received, Ok(Some((14, _)))) && &buffer[..14] == b"still accepted",
        || format!("a good datagram was not delivered: {received:?}"),
    )?;
    if stack.tcp_state(&stream) == Some(TcpState::Established) {
        while let Ok(read) = stack.tcp_read(&stream, &mut buffer) {
            if read == 0 {
                break;
            }
            client_next = client_next.wrapping_add(read as u32);
        }
        // Acknowledging everything the stack ever sent is always acceptable (smoltcp drops a
        // segment whose ACK is below what it already had acknowledged).
        learn_sent(&wire.take_tx(), &mut server_next);
        if let Some(vf) = &vf {
            learn_sent(&vf.take_tx(), &mut server_next);
        }
        // A hostile segment in the window may have acknowledged more than we saw the stack
        // send, and smoltcp drops a segment whose ACK is below one it accepted: the client
        // tries the acknowledgement numbers it knows of, highest first, until one is taken.
        let mut candidates: Vec<u32> = hostile_acks
            .iter()
            .copied()
            .filter(|ack| ack.wrapping_sub(server_next) < 0x1_0000)
            .collect();
        candidates.push(server_next);
        candidates.sort_by_key(|ack| std::cmp::Reverse(ack.wrapping_sub(server_next)));
        candidates.dedup();
        let mut read = Ok(0);
        for ack in candidates {
            wire.inject_rx(&segment(client_next, ack, 0x18, 65_535, &[], b"in order"));
            stack.poll();
            read = stack.tcp_read(&stream, &mut buffer);
            if read != Ok(0) {
                break;
            }
        }
        if crate::engine::tracing() {
            let mut sent = wire.take_tx();
            if let Some(vf) = &vf {
                sent.extend(vf.take_tx());
            }
            for frame in sent {
                if let Some(tcp) = frame.get(34..54) {
                    eprintln!(
                        "  reply seq {} ack {} flags {:#x} len {}",
                        u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]),
                        u32::from_be_bytes([tcp[8], tcp[9], tcp[10], tcp[11]]),
                        tcp[13],
                        frame.len()
                    );
                }
            }
            eprintln!(
                "final: client_next {client_next} server_next {server_next} state {:?} read {read:?} recv_queue {}",
                stack.tcp_state(&stream),
                stack.recv_queue_len(&stream)
            );
        }
        check(
            matches!(read, Ok(n) if n >= 8) && &buffer[..8] == b"in order",
            || format!("an in-order segment on the established stream was not delivered: {read:?}"),
        )?;
    }
    steps.count(1)
}

fn seeds() -> Vec<Vec<u8>> {
    let mut bytes = Vec::new();
    for round in 0..5u8 {
        bytes.extend_from_slice(&[0x10, 0, 0, 2, 0, 1, 0x40, 1, 0, 0, 0xff, 0xff, 0, 5]);
        bytes.extend_from_slice(b"hello");
        bytes.extend_from_slice(&[0x10, 0, 0, 4, 0x10, 0, 0, 6, 0x10, 0, 0, 7, 4, 0]);
        bytes.extend_from_slice(b"data");
        bytes.extend_from_slice(&[0x10, 0, 0, 8, 0x10, 0, 0, 0]);
        bytes.extend_from_slice(&frames::tcp_frame_seed());
        bytes.push(round);
    }
    vec![bytes]
}

/// The registration.
pub const TARGET: Target = Target {
    name: "net-stack",
    about: "NetStack with listener, open TCP stream and UDP socket: hostile frames and segments",
    default_cases: 40_000,
    max_input_len: 4096,
    memory_bound: 8 * 1024 * 1024,
    step_bound: 1_000,
    seeds,
    run,
};
