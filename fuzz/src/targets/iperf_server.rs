//! Target `iperf-server`: the iperf app's server (the control-protocol state machine) on a
//! running `NetStack`, talked to by a hostile client over TCP through the fake NIC: cookie,
//! length-prefixed parameter JSON, state bytes and garbage in any order and split, a second
//! connection (data stream or competing client), resets and time passing. Afterwards a new,
//! well-behaved client must be answered.

use std::cell::Cell;
use std::rc::Rc;

use iperf::protocol::state;
use iperf::server::Server;
use net_device::MacAddress;
use net_stack::fake::{FakeControl, FakeDevice};
use net_stack::{Ipv4Address, Ipv4Cidr, Ipv4Mode, NetConfig, NetStack, Platform, checksum};

use crate::engine::{Input, Outcome, Steps, Target, check};
use crate::frames::{OUR_IP, OUR_MAC, PEER_IP, PEER_MAC};

const MAX_OPERATIONS: usize = 40;
const MS: u64 = 1_000_000;
const PORT: u16 = 5201;
const COOKIE: &[u8; 37] = b"abcdefghijklmnopqrstuvwxyz2345672345\0";
const PARAMS: &[u8] = br#"{"tcp":true,"omit":0,"time":1,"num":0,"blockcount":0,"parallel":1,"len":1024,"pacing_timer":1000,"client_version":"3.12"}"#;

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
        11
    }
}

/// One TCP connection of the client, with the sequence numbers it knows.
struct Peer {
    port: u16,
    next: u32,
    server_next: u32,
    /// What the server sent on this connection (in order, as far as the client saw).
    received: Vec<u8>,
}

impl Peer {
    fn segment(&self, flags: u8, payload: &[u8]) -> Vec<u8> {
        let mut frame = Vec::with_capacity(54 + payload.len());
        frame.extend_from_slice(&OUR_MAC);
        frame.extend_from_slice(&PEER_MAC);
        frame.extend_from_slice(&[0x08, 0x00, 0x45, 0]);
        frame.extend_from_slice(&((40 + payload.len()) as u16).to_be_bytes());
        frame.extend_from_slice(&[0, 0, 0x40, 0, 64, 6, 0, 0]);
        frame.extend_from_slice(&PEER_IP);
        frame.extend_from_slice(&OUR_IP);
        frame.extend_from_slice(&self.port.to_be_bytes());
        frame.extend_from_slice(&PORT.to_be_bytes());
        frame.extend_from_slice(&self.next.to_be_bytes());
        frame.extend_from_slice(&self.server_next.to_be_bytes());
        frame.extend_from_slice(&[0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
        frame.extend_from_slice(payload);
        checksum::fill(&mut frame);
        frame
    }

    /// Takes in what the server sent to this connection.
    fn learn(&mut self, sent: &[Vec<u8>]) {
        for frame in sent {
            let Some(tcp) = frame.get(34..54) else {
                continue;
            };
            if frame[12..14] != [0x08, 0x00]
                || frame[23] != 6
                || tcp[2..4] != self.port.to_be_bytes()
            {
                continue;
            }
            let total = usize::from(u16::from_be_bytes([frame[16], frame[17]]));
            let data_offset = usize::from(tcp[12] >> 4) * 4;
            let start = 34 + data_offset;
            let end = (14 + total).min(frame.len());
            let sequence = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
            let flags = tcp[13];
            if flags & 0x12 == 0x12 {
                self.server_next = sequence.wrapping_add(1);
                continue;
            }
            if sequence == self.server_next && start <= end {
                self.received.extend_from_slice(&frame[start..end]);
                self.server_next = self
                    .server_next
                    .wrapping_add((end - start) as u32 + u32::from(flags & 1));
            }
        }
    }
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
    let mut stack = NetStack::new(config, synthetic, Box::new(Clock(clock.clone())))
        .map_err(|error| format!("stack did not start: {error}"))?;
    let mut server = Server::new(&mut stack, PORT, 1024 * 1024).map_err(|error| format!("server: {error}"))?;
    let mut arp = Vec::new();
    arp.extend_from_slice(&OUR_MAC);
    arp.extend_from_slice(&PEER_MAC);
    arp.extend_from_slice(&[0x08, 0x06, 0, 1, 8, 0, 6, 4, 0, 2]);
    arp.extend_from_slice(&PEER_MAC);
    arp.extend_from_slice(&PEER_IP);
    arp.extend_from_slice(&OUR_MAC);
    arp.extend_from_slice(&OUR_IP);
    wire.inject_rx(&arp);
    let mut peers: Vec<Peer> = Vec::new();
    let connect = |peers: &mut Vec<Peer>, wire: &FakeControl, port: u16| {
        let peer = Peer {
            port,
            next: 7_000,
            server_next: 0,
            received: Vec::new(),
        };
        wire.inject_rx(&peer.segment(0x02, &[]));
        peers.push(peer);
    };
    connect(&mut peers, &wire, 40_000);
    for operation in 0..MAX_OPERATIONS {
        if input.is_empty() && operation > 0 {
            break;
        }
        // Let the stack and the server run, then the client sees what came back.
        clock.set(clock.get() + u64::from(input.u16()) * 20_000);
        stack.poll();
        server.step(&mut stack);
        stack.poll();
        let sent = wire.take_tx();
        for peer in &mut peers {
            let handshaking = peer.server_next == 0;
            peer.learn(&sent);
            if handshaking && peer.server_next != 0 {
                peer.next = peer.next.wrapping_add(1);
                wire.inject_rx(&peer.segment(0x10, &[]));
            }
        }
        let index = input.below(peers.len());
        let peer = &mut peers[index];
        let payload: Vec<u8> = match input.below(8) {
            0 => COOKIE.to_vec(),
            1 => {
                let mut message = (PARAMS.len() as u32).to_be_bytes().to_vec();
                message.extend_from_slice(PARAMS);
                message
            }
            2 => {
                let body = input.bytes(300).to_vec();
                let mut message = [input.u32() % 2000, body.len() as u32][input.below(2)]
                    .to_be_bytes()
                    .to_vec();
                message.extend_from_slice(&body);
                message
            }
            3 => vec![
                [
                    state::TEST_END,
                    state::IPERF_DONE,
                    state::CLIENT_TERMINATE,
                    state::TEST_START,
                    input.u8(),
                ][input.below(5)],
            ],
            4 => input.bytes(200).to_vec(),
            5 => {
                if peers.len() < 3 {
                    let port = 40_001 + peers.len() as u16;
                    connect(&mut peers, &wire, port);
                }
                Vec::new()
            }
            6 => {
                let flags = [0x04, 0x11][input.below(2)];
                wire.inject_rx(&peer.segment(flags, &[]));
                if flags == 0x11 {
                    peer.next = peer.next.wrapping_add(1);
                }
                Vec::new()
            }
            _ => Vec::new(),
        };
        let peer = &mut peers[index];
        if !payload.is_empty() && peer.server_next != 0 {
            wire.inject_rx(&peer.segment(0x18, &payload));
            peer.next = peer.next.wrapping_add(payload.len() as u32);
        }
        steps.count(1)?;
    }
    if crate::engine::tracing() {
        for peer in &peers {
            eprintln!(
                "peer {} got {:02x?}",
                peer.port,
                &peer.received[..peer.received.len().min(64)]
            );
        }
    }
    // Every connection of that client resets; after the session times out, a new client with
    // a proper cookie is answered (PARAM_EXCHANGE, or ACCESS_DENIED while still busy).
    for peer in &peers {
        if peer.server_next != 0 {
            wire.inject_rx(&peer.segment(0x04, &[]));
        }
    }
    for _ in 0..30 {
        clock.set(clock.get() + 2_000 * MS);
        stack.poll();
        server.step(&mut stack);
        let _ = wire.take_tx();
        steps.count(1)?;
    }
    let mut fresh = Peer {
        port: 50_000,
        next: 9_000,
        server_next: 0,
        received: Vec::new(),
    };
    wire.inject_rx(&fresh.segment(0x02, &[]));
    for round in 0..6 {
        stack.poll();
        server.step(&mut stack);
        stack.poll();
        let handshaking = fresh.server_next == 0;
        fresh.learn(&wire.take_tx());
        if handshaking && fresh.server_next != 0 {
            fresh.next = fresh.next.wrapping_add(1);
            wire.inject_rx(&fresh.segment(0x10, &[]));
            wire.inject_rx(&fresh.segment(0x18, COOKIE));
            fresh.next = fresh.next.wrapping_add(COOKIE.len() as u32);
        }
        clock.set(clock.get() + 10 * MS * (round + 1));
        steps.count(1)?;
    }
    check(
        matches!(
            fresh.received.first(),
            Some(&state::PARAM_EXCHANGE) | Some(&state::ACCESS_DENIED)
        ),
        || format!("a new client's cookie got {:02x?}", fresh.received),
    )
}

fn seeds() -> Vec<Vec<u8>> {
    // Time, then peer 0: cookie, parameters, a TEST_START byte, IPERF_DONE.
    let wait = [0x10, 0, 0, 7];
    let mut session = vec![0x10, 0, 0, 0, 0x10, 0, 0, 1];
    session.extend_from_slice(&wait);
    session.extend_from_slice(&[0x10, 0, 0, 5]); // a data connection
    session.extend_from_slice(&wait);
    session.extend_from_slice(&[0x10, 0, 1, 0]); // its cookie
    for _ in 0..4 {
        session.extend_from_slice(&wait);
    }
    session.extend_from_slice(&[0xff, 0xff, 0, 3, 0]); // TEST_END
    session.extend_from_slice(&wait);
    session.extend_from_slice(&[0x10, 0, 0, 2, 1, 0x40]);
    session.extend_from_slice(&[b'{'; 0x40]);
    session.extend_from_slice(&[0x10, 0, 0, 3, 1]); // IPERF_DONE
    vec![session]
}

/// The registration.
pub const TARGET: Target = Target {
    name: "iperf-server",
    about: "iperf3 server state machine on a NetStack vs a hostile client over TCP",
    default_cases: 10_000,
    max_input_len: 2048,
    memory_bound: 48 * 1024 * 1024,
    step_bound: 200,
    seeds,
    run,
};
