//! End-to-end tests: a "guest" stack (synthetic NIC, optionally a VF) and a "client" stack joined
//! by a simulated wire, with time advanced by hand.

use alloc::boxed::Box;
use alloc::rc::Rc;
use alloc::vec;
use alloc::vec::Vec;
use core::cell::Cell;

use net_device::{LinkState, MacAddress};
use smoltcp::phy::ChecksumCapabilities;
use smoltcp::socket::icmp;
use smoltcp::wire::{
    DhcpMessageType, DhcpPacket, DhcpRepr, EthernetRepr, Icmpv4Packet, Icmpv4Repr, Icmpv6Packet,
    Icmpv6Repr, Ipv4Repr, TcpControl, TcpRepr, TcpSeqNumber,
};

use super::*;
use crate::config::Ipv4Mode;
use crate::fake::{FakeControl, FakeDevice};

const GUEST_MAC: MacAddress = MacAddress([0x52, 0x54, 0x00, 0x00, 0x00, 0x15]);
const CLIENT_MAC: MacAddress = MacAddress([0x52, 0x54, 0x00, 0x00, 0x00, 0x64]);
/// The client's address (10.0.2.100, as [`static_config`] gives it in [`Sim`]).
const CLIENT_IP: Ipv4Address = Ipv4Address::new(10, 0, 2, 100);
const US: u64 = 1_000;
const MS: u64 = 1_000_000;
const MIB: usize = 1024 * 1024;

fn guest_ip() -> Ipv4Address {
    Ipv4Address::new(10, 0, 2, 15)
}

/// Prints the stack's log lines (shown with `--nocapture` or when a test fails).
struct TestLogger;

impl log::Log for TestLogger {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() <= log::Level::Info
    }
    fn log(&self, record: &log::Record) {
        if self.enabled(record.metadata()) {
            std::eprintln!("[{}] {}", record.level(), record.args());
        }
    }
    fn flush(&self) {}
}

static LOGGER: TestLogger = TestLogger;

fn init_logging() {
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(log::LevelFilter::Info);
}

struct TestPlatform {
    clock: Rc<Cell<u64>>,
    seed: u64,
}

impl Platform for TestPlatform {
    fn now_ns(&self) -> u64 {
        self.clock.get()
    }
    fn wait_for_event(&self, deadline_ns: Option<u64>) {
        if let Some(deadline) = deadline_ns {
            self.clock.set(self.clock.get().max(deadline));
        }
    }
    fn random_seed(&self) -> u64 {
        self.seed
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Topology {
    /// Every client frame reaches every guest NIC whose link is up.
    Hub,
    /// Unicast to the guest MAC goes only to the port the guest last sent from.
    LearningSwitch,
}

/// The wire between the client NIC and the guest's NICs.
struct Wire {
    topology: Topology,
    client: FakeControl,
    guest_synthetic: FakeControl,
    guest_vf: Option<FakeControl>,
    learned: Option<PathId>,
    lost: usize,
}

impl Wire {
    fn guest_ports(&self) -> Vec<(PathId, FakeControl)> {
        let mut ports = vec![(PathId::Synthetic, self.guest_synthetic.clone())];
        if let Some(vf) = &self.guest_vf {
            ports.push((PathId::Vf, vf.clone()));
        }
        ports
    }

    /// Moves flushed frames across; returns how many moved.
    fn pump(&mut self) -> usize {
        let mut moved = 0;
        for (path, port) in self.guest_ports() {
            let frames = port.take_tx();
            if port.link() != LinkState::Up {
                self.lost += frames.len();
                continue;
            }
            for frame in frames {
                if frame[6..12] == GUEST_MAC.0 {
                    self.learned = Some(path);
                }
                self.client.inject_rx(&frame);
                moved += 1;
            }
        }
        for frame in self.client.take_tx() {
            moved += 1;
            let multicast = frame[0] & 1 == 1;
            for (path, port) in self.guest_ports() {
                let selected = match (self.topology, self.learned) {
                    (Topology::Hub, _) | (_, None) => true,
                    (Topology::LearningSwitch, Some(learned)) => multicast || learned == path,
                };
                if !selected {
                    continue;
                }
                if port.link() == LinkState::Up {
                    port.inject_rx(&frame);
                } else {
                    self.lost += 1;
                }
            }
        }
        moved
    }
}

struct Sim {
    clock: Rc<Cell<u64>>,
    guest: NetStack,
    client: NetStack,
    wire: Wire,
}

fn static_config(address: [u8; 4]) -> NetConfig {
    NetConfig {
        ipv4: Ipv4Mode::Static {
            address: Ipv4Cidr::new(
                Ipv4Address::new(address[0], address[1], address[2], address[3]),
                24,
            ),
            gateway: None,
        },
        ..NetConfig::default()
    }
}

impl Sim {
    fn new(topology: Topology, options: StackOptions) -> Sim {
        Sim::with_guest_config(topology, options, static_config([10, 0, 2, 15]))
    }

    fn with_guest_config(
        topology: Topology,
        options: StackOptions,
        guest_config: NetConfig,
    ) -> Sim {
        init_logging();
        let clock = Rc::new(Cell::new(1_000 * MS));
        let (guest_synthetic, guest_synthetic_control) = FakeDevice::boxed("virtio-net", GUEST_MAC);
        let (client_nic, client_control) = FakeDevice::boxed("client-nic", CLIENT_MAC);
        let guest = NetStack::with_options(
            guest_config,
            guest_synthetic,
            Box::new(TestPlatform {
                clock: clock.clone(),
                seed: 0x1234_5678,
            }),
            options.clone(),
        )
        .unwrap();
        let client = NetStack::with_options(
            static_config([10, 0, 2, 100]),
            client_nic,
            Box::new(TestPlatform {
                clock: clock.clone(),
                seed: 0x9abc_def0,
            }),
            options,
        )
        .unwrap();
        Sim {
            clock,
            guest,
            client,
            wire: Wire {
                topology,
                client: client_control,
                guest_synthetic: guest_synthetic_control,
                guest_vf: None,
                learned: None,
                lost: 0,
            },
        }
    }

    fn now(&self) -> u64 {
        self.clock.get()
    }

    fn attach_vf(&mut self) -> FakeControl {
        let (vf, control) = FakeDevice::boxed("igbvf", GUEST_MAC);
        self.guest.attach_vf(vf).unwrap();
        self.wire.guest_vf = Some(control.clone());
        control
    }

    /// One round: both stacks poll, the apps run, frames cross the wire, time advances (a
    /// little when something happened, to the next deadline otherwise).
    fn step(&mut self, apps: &mut dyn FnMut(&mut NetStack, &mut NetStack) -> bool) {
        let mut progress = self.guest.poll();
        progress |= self.client.poll();
        progress |= apps(&mut self.guest, &mut self.client);
        progress |= self.wire.pump() > 0;
        let now = self.now();
        let next = if progress {
            now + 10 * US
        } else {
            let deadline = [self.guest.next_wakeup_ns(), self.client.next_wakeup_ns()]
                .into_iter()
                .flatten()
                .min()
                .unwrap_or(now + MS);
            deadline.max(now + US)
        };
        self.clock.set(next);
    }

    /// Steps until `done` (checked after each step), at most `limit` simulated nanoseconds.
    fn run_until(
        &mut self,
        limit_ns: u64,
        apps: &mut dyn FnMut(&mut NetStack, &mut NetStack) -> bool,
        done: &mut dyn FnMut(&mut Sim) -> bool,
    ) {
        let end = self.now() + limit_ns;
        while !done(self) {
            assert!(self.now() < end, "timed out in simulated time");
            self.step(apps);
        }
    }

    fn settle(&mut self, duration_ns: u64) {
        let end = self.now() + duration_ns;
        while self.now() < end {
            self.step(&mut |_, _| false);
        }
    }
}

/// A TCP + UDP echo server for the guest.
struct EchoServer {
    listener: TcpListener,
    udp: UdpSocket,
    connections: Vec<(TcpStream, Vec<u8>)>,
    closed: usize,
}

impl EchoServer {
    fn new(net: &mut NetStack) -> EchoServer {
        EchoServer {
            listener: net.tcp_listen(7).unwrap(),
            udp: net.udp_bind(7).unwrap(),
            connections: Vec::new(),
            closed: 0,
        }
    }

    fn step(&mut self, net: &mut NetStack) -> bool {
        let mut progress = false;
        while let Some(stream) = net.accept(&self.listener) {
            self.connections.push((stream, Vec::new()));
            progress = true;
        }
        let mut buffer = [0u8; 8192];
        let mut index = 0;
        while index < self.connections.len() {
            let (stream, pending) = &mut self.connections[index];
            let mut finished = false;
            if !pending.is_empty() {
                match net.tcp_write(stream, pending) {
                    Ok(written) => {
                        pending.drain(..written);
                        progress |= written > 0;
                    }
                    Err(_) => finished = true,
                }
            }
            if pending.is_empty() && !finished {
                match net.tcp_read(stream, &mut buffer) {
                    Ok(0) => {}
                    Ok(read) => {
                        progress = true;
                        let written = net.tcp_write(stream, &buffer[..read]).unwrap_or(0);
                        pending.extend_from_slice(&buffer[written..read]);
                    }
                    Err(Error::PeerClosed) | Err(_) => finished = true,
                }
            }
            if finished {
                let (stream, _) = self.connections.swap_remove(index);
                net.tcp_close(stream);
                self.closed += 1;
                progress = true;
            } else {
                index += 1;
            }
        }
        let mut datagram = vec![0u8; 65_536];
        while let Ok(Some((len, from))) = net.udp_recv_from(&self.udp, &mut datagram) {
            net.udp_send_to(&self.udp, &datagram[..len], from).unwrap();
            progress = true;
        }
        progress
    }
}

/// A client that sends `data` and collects the echo.
struct BulkClient {
    stream: TcpStream,
    data: Vec<u8>,
    sent: usize,
    received: Vec<u8>,
    eof: bool,
}

fn pattern(len: usize, seed: u32) -> Vec<u8> {
    let mut state = seed | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            state as u8
        })
        .collect()
}

impl BulkClient {
    fn connect(net: &mut NetStack, len: usize) -> BulkClient {
        let stream = net
            .tcp_connect(IpEndpoint::new(guest_ip().into(), 7))
            .unwrap();
        BulkClient {
            stream,
            data: pattern(len, len as u32),
            sent: 0,
            received: Vec::new(),
            eof: false,
        }
    }

    fn step(&mut self, net: &mut NetStack) -> bool {
        let mut progress = false;
        if self.sent < self.data.len() {
            let end = (self.sent + 16 * 1024).min(self.data.len());
            let written = net
                .tcp_write(&self.stream, &self.data[self.sent..end])
                .unwrap();
            self.sent += written;
            progress |= written > 0;
            if self.sent == self.data.len() {
                net.tcp_shutdown(&self.stream).unwrap();
            }
        }
        let mut buffer = [0u8; 8192];
        loop {
            match net.tcp_read(&self.stream, &mut buffer) {
                Ok(0) => break,
                Ok(read) => {
                    self.received.extend_from_slice(&buffer[..read]);
                    progress = true;
                }
                Err(Error::PeerClosed) => {
                    progress |= !self.eof;
                    self.eof = true;
                    break;
                }
                Err(error) => panic!("client stream failed: {error}"),
            }
        }
        progress
    }

    fn done(&self) -> bool {
        self.eof && self.received.len() == self.data.len()
    }
}

fn assert_echo_exact(client: &BulkClient) {
    assert_eq!(client.received.len(), client.data.len());
    assert!(
        client.received == client.data,
        "echoed bytes differ from the bytes sent"
    );
}

/// Runs a bulk echo; `at_progress` is called with the echoed byte count after every step.
fn bulk_echo(
    sim: &mut Sim,
    len: usize,
    at_progress: &mut dyn FnMut(&mut Sim, usize),
) -> (BulkClient, EchoServer) {
    let mut server = EchoServer::new(&mut sim.guest);
    let mut client = BulkClient::connect(&mut sim.client, len);
    let end = sim.now() + 120_000 * MS;
    while !client.done() {
        if sim.now() >= end {
            let server_stream = server.connections.first().map(|(stream, pending)| {
                (
                    sim.guest.tcp_state(stream),
                    sim.guest.send_queue_len(stream),
                    sim.guest.recv_queue_len(stream),
                    pending.len(),
                )
            });
            let now = instant(sim.now());
            std::eprintln!(
                "poll_at guest {:?} client {:?} now {now}",
                sim.guest.iface.poll_at(now, &sim.guest.sockets),
                sim.client.iface.poll_at(now, &sim.client.sockets)
            );
            for (handle, socket) in sim.client.sockets.iter() {
                std::eprintln!("client socket {handle:?}: {socket:?}");
            }
            panic!(
                "bulk echo timed out at {} of {len} bytes (sent {}); client {:?} sendq {} recvq {}; server {:?}; wire lost {}",
                client.received.len(),
                client.sent,
                sim.client.tcp_state(&client.stream),
                sim.client.send_queue_len(&client.stream),
                sim.client.recv_queue_len(&client.stream),
                server_stream,
                sim.wire.lost
            );
        }
        sim.step(&mut |guest, client_net| server.step(guest) | client.step(client_net));
        let echoed = client.received.len();
        at_progress(sim, echoed);
    }
    assert_echo_exact(&client);
    (client, server)
}

fn ping_v4(sim: &mut Sim, target: Ipv4Address) {
    let rx = icmp::PacketBuffer::new(vec![icmp::PacketMetadata::EMPTY; 4], vec![0u8; 1024]);
    let tx = icmp::PacketBuffer::new(vec![icmp::PacketMetadata::EMPTY; 4], vec![0u8; 1024]);
    let mut socket = icmp::Socket::new(rx, tx);
    socket.bind(icmp::Endpoint::Ident(0x4242)).unwrap();
    let handle = sim.client.sockets.add(socket);
    let request = Icmpv4Repr::EchoRequest {
        ident: 0x4242,
        seq_no: 7,
        data: b"tandem ping",
    };
    {
        let socket = sim.client.sockets.get_mut::<icmp::Socket>(handle);
        let buffer = socket.send(request.buffer_len(), target.into()).unwrap();
        request.emit(
            &mut Icmpv4Packet::new_unchecked(buffer),
            &ChecksumCapabilities::default(),
        );
    }
    sim.run_until(2_000 * MS, &mut |_, _| false, &mut |sim| {
        sim.client.sockets.get::<icmp::Socket>(handle).can_recv()
    });
    let socket = sim.client.sockets.get_mut::<icmp::Socket>(handle);
    let (payload, from) = socket.recv().unwrap();
    assert_eq!(from, IpAddress::Ipv4(target));
    let reply = Icmpv4Repr::parse(
        &Icmpv4Packet::new_checked(payload).unwrap(),
        &ChecksumCapabilities::default(),
    )
    .unwrap();
    assert_eq!(
        reply,
        Icmpv4Repr::EchoReply {
            ident: 0x4242,
            seq_no: 7,
            data: b"tandem ping"
        }
    );
    sim.client.sockets.remove(handle);
}

fn ping_v6(sim: &mut Sim, target: Ipv6Address) {
    let source = link_local_address(CLIENT_MAC);
    let rx = icmp::PacketBuffer::new(vec![icmp::PacketMetadata::EMPTY; 4], vec![0u8; 1024]);
    let tx = icmp::PacketBuffer::new(vec![icmp::PacketMetadata::EMPTY; 4], vec![0u8; 1024]);
    let mut socket = icmp::Socket::new(rx, tx);
    socket.bind(icmp::Endpoint::Ident(0x4343)).unwrap();
    let handle = sim.client.sockets.add(socket);
    let request = Icmpv6Repr::EchoRequest {
        ident: 0x4343,
        seq_no: 9,
        data: b"ping6",
    };
    {
        let socket = sim.client.sockets.get_mut::<icmp::Socket>(handle);
        let buffer = socket.send(request.buffer_len(), target.into()).unwrap();
        request.emit(
            &source,
            &target,
            &mut Icmpv6Packet::new_unchecked(buffer),
            &ChecksumCapabilities::default(),
        );
    }
    sim.run_until(2_000 * MS, &mut |_, _| false, &mut |sim| {
        sim.client.sockets.get::<icmp::Socket>(handle).can_recv()
    });
    let socket = sim.client.sockets.get_mut::<icmp::Socket>(handle);
    let (payload, from) = socket.recv().unwrap();
    assert_eq!(from, IpAddress::Ipv6(target));
    let reply = Icmpv6Repr::parse(
        &target,
        &source,
        &Icmpv6Packet::new_checked(payload).unwrap(),
        &ChecksumCapabilities::default(),
    )
    .unwrap();
    assert_eq!(
        reply,
        Icmpv6Repr::EchoReply {
            ident: 0x4343,
            seq_no: 9,
            data: b"ping6"
        }
    );
    sim.client.sockets.remove(handle);
}

fn udp_echo(sim: &mut Sim, server: &mut EchoServer) {
    let socket = sim.client.udp_bind(0).unwrap();
    let target = IpEndpoint::new(guest_ip().into(), 7);
    // Up to the IPv4 limit: beyond 1472 bytes the datagrams travel as IP fragments both ways.
    assert_eq!(sim.client.udp_max_payload(&target), 65_507);
    let datagrams: Vec<Vec<u8>> = [1usize, 100, 512, 1400, 1472, 1473, 8000, 32_768, 65_507]
        .iter()
        .map(|len| pattern(*len, *len as u32 + 99))
        .collect();
    assert_eq!(
        sim.client.udp_send_to(&socket, &[0u8; 65_508], target),
        Err(Error::DatagramTooLarge {
            len: 65_508,
            max: 65_507
        })
    );
    let mut received = Vec::new();
    let mut next = 0;
    sim.run_until(2_000 * MS, &mut |guest, _| server.step(guest), &mut |sim| {
        // One at a time: the stack reassembles one fragmented datagram at once.
        if next < datagrams.len() && received.len() == next {
            sim.client
                .udp_send_to(&socket, &datagrams[next], target)
                .unwrap();
            next += 1;
        }
        let mut buffer = vec![0u8; 65_536];
        while let Some((len, from)) = sim.client.udp_recv_from(&socket, &mut buffer).unwrap() {
            assert_eq!(from, target);
            received.push(buffer[..len].to_vec());
        }
        received.len() == datagrams.len()
    });
    assert_eq!(received, datagrams);
    // A datagram larger than the buffer is reported, not silently cut.
    sim.client
        .udp_send_to(&socket, &[5u8; 300], target)
        .unwrap();
    let mut small = [0u8; 100];
    let mut outcome = None;
    sim.run_until(2_000 * MS, &mut |guest, _| server.step(guest), &mut |sim| {
        outcome = match sim.client.udp_recv_from(&socket, &mut small) {
            Ok(None) => None,
            other => Some(other),
        };
        outcome.is_some()
    });
    assert_eq!(
        outcome,
        Some(Err(Error::Truncated {
            datagram_len: 300,
            buffer_len: 100
        }))
    );
    sim.client.udp_close(socket);
}

#[test]
fn tcp_echo_of_one_mib_udp_echo_and_ping_over_the_synthetic_path() {
    let mut sim = Sim::new(Topology::Hub, StackOptions::default());
    let (client, mut server) = bulk_echo(&mut sim, MIB, &mut |_, _| {});
    udp_echo(&mut sim, &mut server);
    ping_v4(&mut sim, guest_ip());
    ping_v6(&mut sim, link_local_address(GUEST_MAC));
    sim.client.tcp_close(client.stream);
    sim.settle(100 * MS);
    let stats = sim.guest.stats();
    assert_eq!(stats.bond.active, PathId::Synthetic);
    assert_eq!(stats.tcp_accepted, 1);
    assert_eq!(stats.tcp_streams, 0);
    assert_eq!(stats.tcp_lingering, 0);
    // What is left: the spare listening sockets and the UDP socket.
    assert_eq!(
        stats.sockets_in_use,
        TcpOptions::default().spare_listeners + 1
    );
    assert!(
        stats.bond.synthetic.bond.rx_frames > 700,
        "1 MiB arrived over the synthetic path"
    );
    assert_eq!(
        stats.bond.total.bond.rx_frames,
        stats.bond.synthetic.bond.rx_frames
    );
    assert!(stats.announcement_frames >= 2, "initial GARP and NA");
    assert_eq!(sim.client.stats().sockets_in_use, 0);
    assert_eq!(sim.wire.lost, 0);
}

/// A short hold-down, so the switch back to the VF happens while a transfer is still running.
fn short_hold_down() -> StackOptions {
    StackOptions {
        bond: BondConfig {
            hold_down_ns: MS,
            ..BondConfig::default()
        },
        ..StackOptions::default()
    }
}

#[test]
fn vf_going_down_mid_transfer_moves_traffic_to_synthetic_without_losing_a_byte() {
    let mut sim = Sim::new(Topology::Hub, short_hold_down());
    let vf = sim.attach_vf();
    sim.run_until(200 * MS, &mut |_, _| false, &mut |sim| {
        sim.guest.active_path() == PathId::Vf
    });
    let mut phase = 0;
    let mut vf_tx_at_down = 0;
    let mut synthetic_tx_at_down = 0;
    let mut back_on_vf_at = None;
    let started = sim.now();
    let (client, mut server) = bulk_echo(&mut sim, 4 * MIB, &mut |sim, echoed| {
        if phase == 0 && echoed >= MIB {
            let stats = sim.guest.stats().bond;
            vf_tx_at_down = stats.vf.unwrap().bond.tx_frames;
            synthetic_tx_at_down = stats.synthetic.bond.tx_frames;
            vf.set_link(LinkState::Down);
            vf.lose_in_flight();
            phase = 1;
        } else if phase == 1 && echoed >= MIB + 256 * 1024 {
            assert_eq!(sim.guest.active_path(), PathId::Synthetic);
            vf.set_link(LinkState::Up);
            phase = 2;
        } else if phase == 2 && sim.guest.active_path() == PathId::Vf {
            back_on_vf_at = Some(echoed);
            phase = 3;
        }
    });
    assert_eq!(phase, 3);
    std::eprintln!(
        "4 MiB echoed in {} us of simulated time",
        (sim.now() - started) / US
    );
    assert!(
        back_on_vf_at.is_some_and(|at| at < 4 * MIB - 256 * 1024),
        "switched back mid-transfer"
    );
    assert_echo_exact(&client);
    let stats = sim.guest.stats().bond;
    assert_eq!(
        stats.active,
        PathId::Vf,
        "back on the VF after the hold-down"
    );
    assert_eq!(stats.switches_to_vf, 2);
    assert_eq!(stats.switches_to_synthetic, 1);
    assert!(vf_tx_at_down > 100, "the first quarter went out on the VF");
    assert!(
        stats.synthetic.bond.tx_frames > synthetic_tx_at_down + 100,
        "the middle part went out on the synthetic path"
    );
    assert!(
        stats.vf.unwrap().bond.tx_frames > vf_tx_at_down + 100,
        "and the end on the VF"
    );
    assert!(stats.duplicates_dropped > 100, "hub copies were suppressed");
    assert_eq!(stats.tx_dropped_no_path + stats.tx_blocked_no_path, 0);
    // One announcement per switch (plus the initial one), each for IPv4 and IPv6 link-local.
    assert!(sim.guest.stats().announcement_frames >= 8);
    // Datagrams and pings work on the VF path too.
    let vf_tx_before = sim.guest.stats().bond.vf.unwrap().bond.tx_frames;
    udp_echo(&mut sim, &mut server);
    ping_v4(&mut sim, guest_ip());
    ping_v6(&mut sim, link_local_address(GUEST_MAC));
    assert!(sim.guest.stats().bond.vf.unwrap().bond.tx_frames >= vf_tx_before + 8);
    assert_eq!(sim.guest.active_path(), PathId::Vf);
}

#[test]
fn vf_detach_behind_a_learning_switch_relearns_through_the_announcement() {
    let mut sim = Sim::new(Topology::LearningSwitch, StackOptions::default());
    sim.attach_vf();
    sim.run_until(200 * MS, &mut |_, _| false, &mut |sim| {
        sim.guest.active_path() == PathId::Vf
    });
    let mut detached = None;
    let (client, _server) = bulk_echo(&mut sim, MIB, &mut |sim, echoed| {
        if detached.is_none() && echoed >= 300 * 1024 {
            assert_eq!(sim.wire.learned, Some(PathId::Vf));
            let device = sim.guest.detach_vf().unwrap();
            sim.wire.guest_vf = None;
            // The announcement went out on the synthetic path at once.
            assert_eq!(sim.guest.active_path(), PathId::Synthetic);
            detached = Some(device);
        }
    });
    assert!(detached.is_some());
    assert_echo_exact(&client);
    assert_eq!(sim.wire.learned, Some(PathId::Synthetic));
    let stats = sim.guest.stats().bond;
    assert!(stats.vf.is_none());
    assert!(stats.vf_retired.bond.tx_frames > 100);
    assert_eq!(
        stats.total.bond.tx_frames,
        stats.synthetic.bond.tx_frames + stats.vf_retired.bond.tx_frames
    );
    // A new VF pairs and takes over again after the hold-down.
    sim.attach_vf();
    sim.run_until(500 * MS, &mut |_, _| false, &mut |sim| {
        sim.guest.active_path() == PathId::Vf
    });
    ping_v4(&mut sim, guest_ip());
    assert_eq!(sim.wire.learned, Some(PathId::Vf));
}

/// Both paths go down during a client-to-guest transfer; smoltcp on the guest is held back
/// (nothing it sends is lost), and the transfer completes once the links return.
///
/// The flow is one-way on purpose: with smoltcp on *both* ends, a bidirectional bulk flow that
/// loses ACKs in both directions can stall, because smoltcp rewinds SND.NXT on a retransmission
/// timeout and its pure ACKs then carry a sequence number the peer already received, which the
/// peer drops unprocessed (RFC 9293 §3.10.7.4). A Linux peer keeps SND.NXT in its ACKs and
/// breaks that cycle, so the guest is not affected in practice.
#[test]
fn both_paths_down_holds_transmission_back_then_tcp_recovers() {
    let mut sim = Sim::new(Topology::Hub, StackOptions::default());
    let vf = sim.attach_vf();
    sim.run_until(200 * MS, &mut |_, _| false, &mut |sim| {
        sim.guest.active_path() == PathId::Vf
    });
    let synthetic = sim.wire.guest_synthetic.clone();
    let listener = sim.guest.tcp_listen(9).unwrap();
    let data = pattern(512 * 1024, 5);
    let stream = sim
        .client
        .tcp_connect(IpEndpoint::new(guest_ip().into(), 9))
        .unwrap();
    let mut server: Option<TcpStream> = None;
    let mut received = Vec::new();
    let mut eof = false;
    let mut sent = 0;
    let mut outage: Option<(u64, u64)> = None;
    let mut recovered_at = None;
    let end = sim.now() + 60_000 * MS;
    while !eof {
        assert!(
            sim.now() < end,
            "transfer stalled at {} of {} bytes",
            received.len(),
            data.len()
        );
        sim.step(&mut |guest, client| {
            let mut progress = false;
            if server.is_none() {
                server = guest.accept(&listener);
            }
            if let Some(server) = &server {
                loop {
                    // Read in place, part of what is there each time: the rest stays queued.
                    let read = guest.tcp_read_with(server, |data| {
                        let used = data.len().min(1000);
                        received.extend_from_slice(&data[..used]);
                        used
                    });
                    match read {
                        Ok(0) => break,
                        Ok(_) => progress = true,
                        Err(error) => {
                            assert_eq!(error, Error::PeerClosed);
                            eof = true;
                            break;
                        }
                    }
                }
            }
            if sent < data.len() {
                let written = client.tcp_write(&stream, &data[sent..]).unwrap();
                sent += written;
                progress |= written > 0;
                if sent == data.len() {
                    client.tcp_shutdown(&stream).unwrap();
                }
            }
            progress
        });
        let now = sim.now();
        if outage.is_none() && received.len() >= 128 * 1024 {
            vf.set_link(LinkState::Down);
            synthetic.set_link(LinkState::Down);
            vf.lose_in_flight();
            synthetic.lose_in_flight();
            outage = Some((now, now + 1_500 * MS));
            // Something for the guest to send while no path is up.
            let server = server.as_ref().unwrap();
            assert_eq!(sim.guest.tcp_write(server, b"status: outage"), Ok(14));
        }
        if let Some((start, stop)) = outage {
            if now >= stop && synthetic.link() == LinkState::Down {
                synthetic.set_link(LinkState::Up);
                vf.set_link(LinkState::Up);
                recovered_at = Some(received.len());
            }
            if now < stop {
                assert!(now >= start);
            }
        }
    }
    assert_eq!(received.len(), data.len());
    assert!(
        received == data,
        "received bytes differ from the bytes sent"
    );
    assert!(
        recovered_at.is_some_and(|at| at < data.len()),
        "the outage was mid-transfer"
    );
    let stats = sim.guest.stats().bond;
    assert!(
        stats.tx_blocked_no_path > 0,
        "smoltcp was held back during the outage"
    );
    assert_eq!(stats.active, PathId::Vf);
    // The message written during the outage arrived afterwards.
    let mut message = [0u8; 32];
    let mut got = 0;
    sim.run_until(5_000 * MS, &mut |_, _| false, &mut |sim| {
        got += sim
            .client
            .tcp_read(&stream, &mut message[got..])
            .unwrap_or(0);
        got == 14
    });
    assert_eq!(&message[..14], b"status: outage");
    sim.client.tcp_close(stream);
}

#[test]
fn thousands_of_connections_and_resets_do_not_leak_sockets() {
    let mut sim = Sim::new(Topology::Hub, StackOptions::default());
    let mut server = EchoServer::new(&mut sim.guest);
    let target = IpEndpoint::new(guest_ip().into(), 7);
    let mut completed = 0;
    let mut reset = 0;
    const CONNECTIONS: usize = 1000;
    const PARALLEL: usize = 16;
    let mut active: Vec<(TcpStream, usize, Vec<u8>)> = Vec::new();
    let mut started = 0;
    let end = sim.now() + 600_000 * MS;
    while completed + reset < CONNECTIONS {
        assert!(
            sim.now() < end,
            "timed out with {completed} completed, {reset} reset"
        );
        while active.len() < PARALLEL && started < CONNECTIONS {
            let stream = sim.client.tcp_connect(target).unwrap();
            active.push((stream, started, Vec::new()));
            started += 1;
        }
        let mut finished = Vec::new();
        sim.step(&mut |guest, client| {
            let mut progress = server.step(guest);
            for (index, (stream, number, received)) in active.iter_mut().enumerate() {
                let message = pattern(100, *number as u32);
                if client.tcp_state(stream) == Some(TcpState::Established) && received.is_empty() {
                    if *number % 10 == 3 {
                        // Every tenth connection is reset by the client instead.
                        finished.push((index, true));
                        continue;
                    }
                    if client.send_queue_len(stream) == 0 && client.can_write(stream) {
                        assert_eq!(client.tcp_write(stream, &message).unwrap(), 100);
                        received.push(0);
                        progress = true;
                    }
                    continue;
                }
                let mut buffer = [0u8; 256];
                if let Ok(read) = client.tcp_read(stream, &mut buffer) {
                    received.extend_from_slice(&buffer[..read]);
                    progress |= read > 0;
                }
                if received.len() == 101 {
                    assert_eq!(&received[1..], &message[..]);
                    finished.push((index, false));
                }
            }
            progress
        });
        finished.sort_unstable_by_key(|&(index, _)| core::cmp::Reverse(index));
        for (index, abort) in finished {
            let (stream, _, _) = active.swap_remove(index);
            if abort {
                sim.client.tcp_abort(stream);
                reset += 1;
            } else {
                sim.client.tcp_close(stream);
                completed += 1;
            }
        }
    }
    // Let the last closes and resets finish.
    sim.run_until(
        60_000 * MS,
        &mut |guest, _| server.step(guest),
        &mut |sim| sim.guest.stats().tcp_lingering == 0 && sim.client.stats().tcp_lingering == 0,
    );
    sim.settle(10 * MS);
    std::eprintln!(
        "{completed} echoed, {reset} reset, in {} ms of simulated time",
        (sim.now() - 1_000 * MS) / MS
    );
    assert_eq!(completed, 900);
    assert_eq!(reset, 100);
    let guest = sim.guest.stats();
    assert_eq!(guest.tcp_accepted, 1000);
    assert_eq!(server.connections.len(), 0);
    assert_eq!(guest.tcp_streams, 0);
    assert_eq!(
        guest.sockets_in_use,
        TcpOptions::default().spare_listeners + 1
    );
    assert_eq!(sim.client.stats().sockets_in_use, 0);
    assert_eq!(guest.tcp_reclaimed, 1000);
}

#[test]
fn a_peer_that_never_reads_is_reset_after_the_linger_time() {
    let options = StackOptions {
        close_linger_ns: 5_000 * MS,
        ..StackOptions::default()
    };
    let mut sim = Sim::new(Topology::Hub, options);
    let listener = sim.guest.tcp_listen(9).unwrap();
    let peer = sim
        .client
        .tcp_connect(IpEndpoint::new(guest_ip().into(), 9))
        .unwrap();
    let mut accepted = None;
    sim.run_until(1_000 * MS, &mut |_, _| false, &mut |sim| {
        accepted = accepted.take().or_else(|| sim.guest.accept(&listener));
        accepted.is_some()
    });
    let stream = accepted.unwrap();
    // Fill the peer's window and our send buffer; the peer never reads.
    let data = vec![0x5au8; 256 * 1024];
    let mut queued = 0;
    sim.run_until(5_000 * MS, &mut |_, _| false, &mut |sim| {
        queued += sim.guest.tcp_write(&stream, &data[queued..]).unwrap();
        !sim.guest.can_write(&stream) && queued >= 64 * 1024
    });
    sim.settle(200 * MS);
    sim.guest.tcp_close(stream);
    assert_eq!(sim.guest.stats().tcp_lingering, 1);
    sim.settle(4_000 * MS);
    assert_eq!(
        sim.guest.stats().tcp_lingering,
        1,
        "still trying within the linger time"
    );
    sim.settle(2_000 * MS);
    let stats = sim.guest.stats();
    assert_eq!(stats.tcp_lingering, 0);
    assert_eq!(stats.tcp_linger_aborts, 1);
    // The peer got the reset.
    assert!(matches!(
        sim.client.tcp_read(&peer, &mut [0u8; 16]),
        Err(Error::Closed) | Ok(_)
    ));
    assert_eq!(sim.client.tcp_state(&peer), Some(TcpState::Closed));
}

#[test]
fn connection_limit_refuses_extra_connections_and_recovers() {
    let options = StackOptions {
        tcp: TcpOptions {
            spare_listeners: 2,
            max_connections: 4,
            ..TcpOptions::default()
        },
        ..StackOptions::default()
    };
    let mut sim = Sim::new(Topology::Hub, options);
    let listener = sim.guest.tcp_listen(80).unwrap();
    let target = IpEndpoint::new(guest_ip().into(), 80);
    let peers: Vec<TcpStream> = (0..6)
        .map(|_| sim.client.tcp_connect(target).unwrap())
        .collect();
    let mut accepted = Vec::new();
    sim.run_until(3_000 * MS, &mut |_, _| false, &mut |sim| {
        while let Some(stream) = sim.guest.accept(&listener) {
            accepted.push(stream);
        }
        accepted.len() >= 4
            && peers.iter().all(|peer| {
                matches!(
                    sim.client.tcp_state(peer),
                    Some(TcpState::Established | TcpState::Closed)
                )
            })
    });
    sim.settle(100 * MS);
    while let Some(stream) = sim.guest.accept(&listener) {
        accepted.push(stream);
    }
    assert_eq!(accepted.len(), 4);
    let refused = peers
        .iter()
        .filter(|peer| sim.client.tcp_state(peer) == Some(TcpState::Closed))
        .count();
    assert_eq!(refused, 2);
    for peer in peers {
        sim.client.tcp_abort(peer);
    }
    for stream in accepted.drain(..) {
        sim.guest.tcp_close(stream);
    }
    sim.settle(500 * MS);
    let again = sim.client.tcp_connect(target).unwrap();
    sim.run_until(1_000 * MS, &mut |_, _| false, &mut |sim| {
        while let Some(stream) = sim.guest.accept(&listener) {
            accepted.push(stream);
        }
        !accepted.is_empty()
    });
    assert_eq!(sim.client.tcp_state(&again), Some(TcpState::Established));
}

#[test]
fn handles_are_checked_and_errors_are_distinct() {
    let mut sim = Sim::new(Topology::Hub, StackOptions::default());
    let listener = sim.guest.tcp_listen(7).unwrap();
    assert_eq!(
        sim.guest.tcp_listen(7).unwrap_err(),
        Error::AddressInUse { port: 7 }
    );
    assert_eq!(sim.guest.tcp_listen(0).unwrap_err(), Error::InvalidPort);
    let udp = sim.guest.udp_bind(53).unwrap();
    assert_eq!(
        sim.guest.udp_bind(53).unwrap_err(),
        Error::AddressInUse { port: 53 }
    );
    let client = sim
        .client
        .tcp_connect(IpEndpoint::new(guest_ip().into(), 7))
        .unwrap();
    assert_eq!(
        sim.client.tcp_read(&client, &mut [0u8; 8]),
        Ok(0),
        "handshake in progress"
    );
    assert_eq!(
        sim.client.tcp_write(&client, b"early"),
        Ok(0),
        "handshake in progress"
    );
    let mut server = None;
    sim.run_until(1_000 * MS, &mut |_, _| false, &mut |sim| {
        server = server.take().or_else(|| sim.guest.accept(&listener));
        server.is_some()
    });
    let server = server.unwrap();
    assert_eq!(sim.client.tcp_write(&client, b"hello"), Ok(5));
    sim.client.tcp_shutdown(&client).unwrap();
    let mut buffer = [0u8; 16];
    let mut got = Vec::new();
    sim.run_until(1_000 * MS, &mut |_, _| false, &mut |sim| match sim
        .guest
        .tcp_read(&server, &mut buffer)
    {
        Ok(read) => {
            got.extend_from_slice(&buffer[..read]);
            false
        }
        Err(error) => {
            assert_eq!(error, Error::PeerClosed, "end of stream after the data");
            true
        }
    });
    assert_eq!(got, b"hello");
    assert!(sim.guest.can_read(&server), "EOF is readable");
    // Half-closed: the server can still answer.
    assert_eq!(sim.guest.tcp_write(&server, b"bye"), Ok(3));
    sim.guest.tcp_close(server);
    let mut reply = Vec::new();
    sim.run_until(1_000 * MS, &mut |_, _| false, &mut |sim| match sim
        .client
        .tcp_read(&client, &mut buffer)
    {
        Ok(read) => {
            reply.extend_from_slice(&buffer[..read]);
            false
        }
        Err(error) => {
            assert_eq!(error, Error::PeerClosed);
            true
        }
    });
    assert_eq!(reply, b"bye");
    // Once the connection has fully ended its socket is reclaimed, the handle reports how.
    sim.settle(200 * MS);
    assert_eq!(
        sim.client.tcp_read(&client, &mut buffer),
        Err(Error::PeerClosed)
    );
    assert_eq!(sim.client.tcp_write(&client, b"x"), Err(Error::Closed));
    sim.client.tcp_close(client);
    // A handle of another stack's slot is rejected.
    assert_eq!(sim.guest.udp_recv_from(&udp, &mut buffer), Ok(None));
    sim.guest.udp_close(udp);
    sim.guest.tcp_unlisten(listener);
    sim.settle(10 * MS);
    assert_eq!(sim.guest.stats().sockets_in_use, 0);
}

/// A minimal DHCP server on the client stack: offers and acknowledges 10.0.2.15/24.
fn dhcp_server_step(net: &mut NetStack, socket: &UdpSocket) -> bool {
    let mut buffer = [0u8; 1500];
    let mut progress = false;
    while let Ok(Some((len, _from))) = net.udp_recv_from(socket, &mut buffer) {
        let packet = DhcpPacket::new_checked(&buffer[..len]).unwrap();
        let request = DhcpRepr::parse(&packet).unwrap();
        let message_type = match request.message_type {
            DhcpMessageType::Discover => DhcpMessageType::Offer,
            DhcpMessageType::Request => DhcpMessageType::Ack,
            _ => continue,
        };
        let server = Ipv4Address::new(10, 0, 2, 100);
        let mut reply = DhcpRepr {
            message_type,
            transaction_id: request.transaction_id,
            secs: 0,
            client_hardware_address: request.client_hardware_address,
            client_ip: Ipv4Address::UNSPECIFIED,
            your_ip: guest_ip(),
            server_ip: server,
            router: Some(Ipv4Address::new(10, 0, 2, 2)),
            subnet_mask: Some(Ipv4Address::new(255, 255, 255, 0)),
            relay_agent_ip: Ipv4Address::UNSPECIFIED,
            broadcast: false,
            requested_ip: None,
            client_identifier: None,
            server_identifier: Some(server),
            parameter_request_list: None,
            dns_servers: Some(Default::default()),
            max_size: None,
            lease_duration: Some(3600),
            renew_duration: None,
            rebind_duration: None,
            additional_options: &[],
        };
        if let Some(dns) = &mut reply.dns_servers {
            dns.push(Ipv4Address::new(10, 0, 2, 3)).unwrap();
        }
        let mut out = vec![0u8; reply.buffer_len()];
        reply
            .emit(&mut DhcpPacket::new_unchecked(&mut out[..]))
            .unwrap();
        net.udp_send_to(
            socket,
            &out,
            IpEndpoint::new(Ipv4Address::BROADCAST.into(), 68),
        )
        .unwrap();
        progress = true;
    }
    progress
}

#[test]
fn dhcp_lease_configures_the_interface() {
    let mut sim =
        Sim::with_guest_config(Topology::Hub, StackOptions::default(), NetConfig::default());
    assert_eq!(sim.guest.ipv4_address(), None);
    let server = sim.client.udp_bind(67).unwrap();
    sim.run_until(
        10_000 * MS,
        &mut |_, client| dhcp_server_step(client, &server),
        &mut |sim| sim.guest.ipv4_address().is_some(),
    );
    assert_eq!(
        sim.guest.ipv4_address(),
        Some(Ipv4Cidr::new(guest_ip(), 24))
    );
    assert_eq!(
        sim.guest.dns_servers(),
        [IpAddress::Ipv4(Ipv4Address::new(10, 0, 2, 3))]
    );
    assert_eq!(sim.guest.stats().dhcp_leases, 1);
    // The new address is announced and reachable.
    ping_v4(&mut sim, guest_ip());
    let (client, _server) = bulk_echo(&mut sim, 64 * 1024, &mut |_, _| {});
    assert_echo_exact(&client);
}

#[test]
fn retransmitted_syn_does_not_open_a_second_connection() {
    let mut sim = Sim::new(Topology::Hub, StackOptions::default());
    let listener = sim.guest.tcp_listen(7).unwrap();
    let peer = sim
        .client
        .tcp_connect(IpEndpoint::new(guest_ip().into(), 7))
        .unwrap();
    // Carry frames by hand to keep a copy of the client's SYN.
    let mut syn = None;
    let mut accepted = None;
    for _ in 0..10_000 {
        sim.guest.poll();
        sim.client.poll();
        for frame in sim.wire.client.take_tx() {
            if tcp_syn(&frame).is_some() {
                syn = Some(frame.clone());
            }
            sim.wire.guest_synthetic.inject_rx(&frame);
        }
        for frame in sim.wire.guest_synthetic.take_tx() {
            sim.wire.client.inject_rx(&frame);
        }
        accepted = accepted.take().or_else(|| sim.guest.accept(&listener));
        if accepted.is_some() && sim.client.tcp_state(&peer) == Some(TcpState::Established) {
            break;
        }
        sim.clock.set(sim.now() + 100 * US);
    }
    let stream = accepted.expect("connection accepted");
    let syn = syn.expect("the client sent a SYN");
    // The SYN arrives again (a retransmission, or a copy through the other path).
    sim.wire.guest_synthetic.inject_rx(&syn);
    sim.settle(10 * MS);
    assert_eq!(sim.guest.stats().tcp_duplicate_syns_dropped, 1);
    assert!(
        sim.guest.accept(&listener).is_none(),
        "no second connection"
    );
    assert_eq!(sim.guest.tcp_write(&stream, b"still fine"), Ok(10));
    let mut buffer = [0u8; 16];
    let mut got = 0;
    sim.run_until(1_000 * MS, &mut |_, _| false, &mut |sim| {
        got += sim.client.tcp_read(&peer, &mut buffer[got..]).unwrap();
        got == 10
    });
    assert_eq!(&buffer[..10], b"still fine");
}

/// A stack alone on a wire, for event-loop tests.
fn lone_stack(clock: &Rc<Cell<u64>>) -> (NetStack, FakeControl) {
    lone_stack_with(clock, static_config([10, 0, 2, 15]))
}

fn lone_stack_with(clock: &Rc<Cell<u64>>, config: NetConfig) -> (NetStack, FakeControl) {
    init_logging();
    let (nic, control) = FakeDevice::boxed("virtio-net", GUEST_MAC);
    let stack = NetStack::new(
        config,
        nic,
        Box::new(TestPlatform {
            clock: clock.clone(),
            seed: 1,
        }),
    )
    .unwrap();
    (stack, control)
}

#[test]
fn run_sleeps_when_idle_and_returns_the_exit_code() {
    let clock = Rc::new(Cell::new(0));
    let (mut stack, control) = lone_stack(&clock);
    let mut iterations = 0;
    let code = stack.run(|net| {
        iterations += 1;
        if iterations > 1_000 {
            ControlFlow::Break(-1) // spinning: the clock does not advance
        } else if net.now_ns() >= 1_000 * MS {
            ControlFlow::Break(7)
        } else {
            ControlFlow::Continue(())
        }
    });
    assert_eq!(code, 7);
    // Idle: woken by the 100 ms device watchdog only, not spinning.
    assert!(
        iterations <= 15,
        "{iterations} iterations in one idle second"
    );
    assert!(
        control.poll_and_flush_counts().0 >= 10,
        "devices are polled by the watchdog"
    );
}

#[test]
fn the_stack_arms_device_interrupts_and_does_not_sleep_over_work_that_arrived() {
    let clock = Rc::new(Cell::new(0));
    let (mut stack, control) = lone_stack(&clock);
    stack.poll();
    // A frame lands after the poll, before the sleep: a driver polled with its interrupt
    // masked raised none, so the stack must not sleep until the next deadline.
    control.inject_rx(&syn_frame(40000, 9));
    let before = clock.get();
    stack.wait();
    assert_eq!(control.arms(), 1, "interrupts armed before sleeping");
    assert_eq!(clock.get(), before, "did not sleep: work was pending");
    stack.poll();
    assert_eq!(control.rx_pending(), 0);
    // Nothing pending: armed again, then it sleeps (the test clock jumps to the deadline).
    stack.wait();
    assert_eq!(control.arms(), 2);
    assert!(clock.get() > before, "slept until the next deadline");
    // An app's own deadline sleeps the same way.
    stack.poll();
    let deadline = clock.get() + MS;
    stack.wait_until(deadline);
    assert_eq!(control.arms(), 3);
    assert_eq!(clock.get(), deadline);
}

#[test]
fn no_usable_path_does_not_spin_the_event_loop() {
    let clock = Rc::new(Cell::new(0));
    let (mut stack, control) = lone_stack(&clock);
    control.set_link(LinkState::Down);
    // A connection attempt that smoltcp wants to send "now", forever.
    let stream = stack
        .tcp_connect(IpEndpoint::new(Ipv4Address::new(10, 0, 2, 2).into(), 80))
        .unwrap();
    let mut iterations = 0;
    let code = stack.run(|net| {
        iterations += 1;
        if iterations > 1_000 {
            ControlFlow::Break(-1) // spinning: the clock does not advance
        } else if net.now_ns() >= 1_000 * MS {
            ControlFlow::Break(0)
        } else {
            ControlFlow::Continue(())
        }
    });
    assert_eq!(code, 0, "the loop slept instead of spinning");
    assert!(
        iterations <= 20,
        "{iterations} iterations in one second without a path"
    );
    assert!(control.take_tx().is_empty());
    // The link returns: the ARP request for the peer goes out at the next poll.
    control.set_link(LinkState::Up);
    stack.poll();
    let frames = control.take_tx();
    let gateway = [10, 0, 2, 2];
    assert!(
        frames
            .iter()
            .any(|frame| frame[12..14] == [0x08, 0x06] && frame[38..42] == gateway),
        "an ARP request for the peer went out"
    );
    stack.tcp_abort(stream);
}

/// A TCP SYN from the client's addresses to the guest, built by hand.
fn syn_frame(source_port: u16, destination_port: u16) -> Vec<u8> {
    client_segment(&TcpRepr {
        src_port: source_port,
        dst_port: destination_port,
        control: TcpControl::Syn,
        seq_number: TcpSeqNumber(1000),
        ack_number: None,
        window_len: 65535,
        window_scale: None,
        max_seg_size: Some(1460),
        sack_permitted: false,
        sack_ranges: [None, None, None],
        timestamp: None,
        payload: &[],
    })
}

/// A host that learned our MAC from the bring-up frames (a gratuitous ARP, our ARP request)
/// and pings at once gets its first echo request answered: the stack asked for the gateway
/// before announcing, so the gateway's reply arrives before its ping.
#[test]
fn the_gateway_is_asked_for_at_bring_up_so_its_first_ping_is_answered() {
    let clock = Rc::new(Cell::new(0));
    let config = NetConfig {
        ipv4: Ipv4Mode::Static {
            address: Ipv4Cidr::new(guest_ip(), 24),
            gateway: Some(CLIENT_IP),
        },
        ..NetConfig::default()
    };
    let (mut stack, control) = lone_stack_with(&clock, config);
    stack.poll();
    let bring_up = control.take_tx();
    let first = bring_up.first().expect("frames at bring-up");
    let GuestFrame::ArpRequest { target, reply } = parse_guest_frame(first) else {
        panic!("the first frame at bring-up is not an ARP request");
    };
    assert_eq!(target, CLIENT_IP, "the gateway is asked for first");
    assert_eq!(stack.stats().gateway_solicitations, 1);
    assert!(stack.stats().announcement_frames >= 2, "then GARP and NA");
    control.inject_rx(&reply);
    control.inject_rx(&client_echo_request(1));
    stack.poll();
    let answers = control.take_tx();
    let echo_reply = answers.iter().find_map(|frame| {
        let ethernet = EthernetFrame::new_checked(&frame[..]).ok()?;
        let ip = Ipv4Packet::new_checked(ethernet.payload()).ok()?;
        let icmp = Icmpv4Packet::new_checked(ip.payload()).ok()?;
        let repr = Icmpv4Repr::parse(&icmp, &ChecksumCapabilities::default()).ok()?;
        matches!(repr, Icmpv4Repr::EchoReply { seq_no: 1, .. })
            .then_some((ethernet.dst_addr(), ip.dst_addr()))
    });
    assert_eq!(
        echo_reply,
        Some((EthernetAddress(CLIENT_MAC.0), CLIENT_IP)),
        "the first ping was answered at once (frames sent: {})",
        answers.len()
    );
}

/// Without a gateway to ask for, an unknown peer's first ping waits for smoltcp's neighbour
/// resolution and its answer is lost (what the solicitation at bring-up avoids for the gateway).
#[test]
fn an_unknown_peers_first_ping_without_a_gateway_is_answered_only_after_resolution() {
    let clock = Rc::new(Cell::new(0));
    let (mut stack, control) = lone_stack(&clock);
    stack.poll();
    let bring_up = control.take_tx();
    assert!(
        bring_up.iter().all(|frame| match parse_guest_frame(frame) {
            GuestFrame::ArpRequest { target, .. } => target == guest_ip(),
            _ => true,
        }),
        "no gateway: only the gratuitous ARP at bring-up"
    );
    assert_eq!(stack.stats().gateway_solicitations, 0);
    control.inject_rx(&client_echo_request(1));
    stack.poll();
    let answers = control.take_tx();
    assert!(
        answers.iter().any(|frame| matches!(
            parse_guest_frame(frame),
            GuestFrame::ArpRequest { target, .. } if target == CLIENT_IP
        )),
        "the echo request made the stack resolve the peer"
    );
}

#[test]
fn half_open_connections_expire_and_free_the_connection_limit() {
    let clock = Rc::new(Cell::new(0));
    let (mut stack, control) = lone_stack(&clock);
    let options = TcpOptions {
        spare_listeners: 1,
        max_connections: 2,
        ..TcpOptions::default()
    };
    let _listener = stack.tcp_listen_with(80, options).unwrap();
    // Two clients send a SYN and vanish; the listener is then at its limit.
    control.inject_rx(&syn_frame(40000, 80));
    control.inject_rx(&syn_frame(40001, 80));
    stack.poll();
    let half_open = |stack: &NetStack| {
        stack.sockets.iter().filter(|(_, socket)| {
            matches!(socket, Socket::Tcp(tcp) if tcp.state() == TcpState::SynReceived)
        })
        .count()
    };
    assert_eq!(half_open(&stack), 2);
    assert_eq!(
        stack.stats().sockets_in_use,
        2,
        "no spare left: at the limit"
    );
    control.inject_rx(&syn_frame(40002, 80));
    stack.poll();
    assert_eq!(half_open(&stack), 2, "a third SYN is refused");
    // The handshake timeout frees them.
    while clock.get() < (HANDSHAKE_TIMEOUT_MS + 1_000) * MS {
        stack.poll();
        clock.set(clock.get() + 100 * MS);
    }
    stack.poll();
    assert_eq!(half_open(&stack), 0);
    assert_eq!(stack.stats().tcp_reclaimed, 2);
    assert_eq!(
        stack.stats().sockets_in_use,
        1,
        "one spare listening socket again"
    );
    control.inject_rx(&syn_frame(40003, 80));
    stack.poll();
    assert_eq!(half_open(&stack), 1, "new connections are accepted again");
}

#[test]
fn raw_bursts_fill_the_ring_and_go_out_unchanged() {
    let clock = Rc::new(Cell::new(0));
    let (mut stack, control) = lone_stack(&clock);
    stack.poll();
    control.take_tx();
    control.set_tx_ring_capacity(8);
    let mut frame = vec![0xabu8; 1514];
    frame[..6].copy_from_slice(&[0xff; 6]);
    frame[6..12].copy_from_slice(&GUEST_MAC.0);
    frame[12..14].copy_from_slice(&0x88b5u16.to_be_bytes());
    let queued = stack.transmit_raw_burst(&frame, 100).unwrap();
    assert!(
        (1..=8).contains(&queued),
        "as many as the ring holds: {queued}"
    );
    assert_eq!(
        stack.next_wakeup_ns(),
        Some(clock.get()),
        "a sender that made progress is not put to sleep"
    );
    assert_eq!(
        stack.transmit_raw_burst(&frame, 100),
        Ok(0),
        "the ring is full until reclaimed"
    );
    let sent = control.take_tx();
    assert_eq!(sent.len(), queued);
    assert!(
        sent.iter().all(|sent| *sent == frame),
        "the frames go out byte for byte"
    );
    stack.poll();
    assert!(
        stack.next_wakeup_ns() > Some(clock.get()),
        "idle again after a poll"
    );
    assert_eq!(
        stack.transmit_raw_burst(&frame, 3),
        Ok(3),
        "capped by max once reclaimed"
    );
    assert!(matches!(
        stack.transmit_raw_burst(&vec![0u8; 1515], 1),
        Err(Error::DatagramTooLarge {
            len: 1515,
            max: 1514
        })
    ));
    assert!(
        stack.transmit_raw_burst(&[0u8; 13], 1).is_err(),
        "shorter than a header"
    );
}

#[test]
fn large_tcp_frames_are_cut_by_a_tso_nic_or_in_software_and_arrive_exact() {
    let mut sim = Sim::new(Topology::Hub, short_hold_down());
    // The synthetic NIC checksums and segments; the VF does neither.
    sim.wire.guest_synthetic.set_offloads(true, 65_535);
    let vf = sim.attach_vf();
    sim.run_until(200 * MS, &mut |_, _| false, &mut |sim| {
        sim.guest.active_path() == PathId::Vf
    });
    let mut phase = 0;
    let (client, mut server) = bulk_echo(&mut sim, 4 * MIB, &mut |sim, echoed| {
        if phase == 0 && echoed >= MIB {
            vf.set_link(LinkState::Down);
            phase = 1;
        } else if phase == 1 && echoed >= 2 * MIB {
            assert_eq!(sim.guest.active_path(), PathId::Synthetic);
            vf.set_link(LinkState::Up);
            phase = 2;
        }
    });
    assert_eq!(phase, 2);
    assert_echo_exact(&client);
    udp_echo(&mut sim, &mut server);
    ping_v4(&mut sim, guest_ip());

    let bond = sim.guest.stats().bond;
    let vf_counters = bond.vf.unwrap().bond;
    assert!(
        vf_counters.tx_software_segmentation > 10,
        "the VF path got large frames cut in software: {vf_counters:?}"
    );
    assert_eq!(vf_counters.tx_offloaded_segmentation, 0);
    let synthetic = bond.synthetic.bond;
    assert!(
        synthetic.tx_offloaded_segmentation > 10,
        "the synthetic NIC got large frames to segment: {synthetic:?}"
    );
    let (checksums, segmentations, errors) = sim.wire.guest_synthetic.offload_counts();
    assert!(checksums >= segmentations && segmentations > 10);
    assert_eq!(errors, 0, "every offload request kept the TxMeta contract");
    assert_eq!(
        vf.offload_counts(),
        (0, 0, 0),
        "nothing asked of a NIC without offloads"
    );
    // The client's bond verifies every checksum and refuses frames over the MTU.
    assert_eq!(sim.client.stats().bond.bad_frames_dropped, 0);
}

/// Neither fake NIC coalesces or segments: the client's bond cuts its large frames into
/// MSS-sized segments, so the guest receives what a VF hands over.
#[test]
fn a_transfer_over_a_nic_that_does_not_coalesce_arrives_exact_with_merges_counted() {
    let mut sim = Sim::new(Topology::Hub, StackOptions::default());
    let (client, _server) = bulk_echo(&mut sim, 4 * MIB, &mut |_, _| {});
    assert_echo_exact(&client);
    let guest = sim.guest.stats().bond;
    let coalesce = guest.coalesce;
    assert!(
        coalesce.merged_frames > 20 && coalesce.segments_merged >= 3 * coalesce.merged_frames,
        "the guest merged the client's segments: {coalesce:?}"
    );
    assert!(
        coalesce.segments_merged < guest.total.bond.rx_frames,
        "every merged segment was received once: {coalesce:?}"
    );
    assert_eq!(coalesce.refused_malformed, 0);
    assert_eq!(coalesce.refused_out_of_order, 0, "no loss on this wire");
    // The echo came back merged on the client's side too.
    assert!(sim.client.stats().bond.coalesce.merged_frames > 20);
}

#[test]
fn merged_transfer_stays_exact_across_a_vf_detach_mid_transfer() {
    let mut sim = Sim::new(Topology::Hub, short_hold_down());
    sim.attach_vf();
    sim.run_until(200 * MS, &mut |_, _| false, &mut |sim| {
        sim.guest.active_path() == PathId::Vf
    });
    let mut merged_at_detach = None;
    let (client, _server) = bulk_echo(&mut sim, 4 * MIB, &mut |sim, echoed| {
        if merged_at_detach.is_none() && echoed >= MIB {
            merged_at_detach = Some(sim.guest.stats().bond.coalesce.merged_frames);
            assert!(sim.guest.detach_vf().is_some());
            sim.wire.guest_vf = None;
        }
    });
    assert_echo_exact(&client);
    let merged_at_detach = merged_at_detach.expect("the VF was detached mid-transfer");
    let stats = sim.guest.stats().bond;
    assert!(
        merged_at_detach > 10,
        "merged on the VF: {merged_at_detach}"
    );
    assert!(
        stats.coalesce.merged_frames > merged_at_detach + 10,
        "and on the synthetic path after the detach: {:?}",
        stats.coalesce
    );
    assert!(
        stats.duplicates_dropped > 100,
        "hub copies matched frame by frame"
    );
    assert_eq!(stats.vf_detaches, 1);
    assert_eq!(stats.coalesce.refused_malformed, 0);
}

/// A TCP segment from the client (10.0.2.100) to the guest, built by hand.
fn client_segment(repr: &TcpRepr<'_>) -> Vec<u8> {
    client_ipv4_frame(IpProtocol::Tcp, repr.buffer_len(), |payload| {
        repr.emit(
            &mut TcpPacket::new_unchecked(payload),
            &CLIENT_IP.into(),
            &guest_ip().into(),
            &ChecksumCapabilities::default(),
        )
    })
}

/// An ICMP echo request from the client's addresses to the guest.
fn client_echo_request(seq_no: u16) -> Vec<u8> {
    let request = Icmpv4Repr::EchoRequest {
        ident: 0x4242,
        seq_no,
        data: b"first ping",
    };
    client_ipv4_frame(IpProtocol::Icmp, request.buffer_len(), |payload| {
        request.emit(
            &mut Icmpv4Packet::new_unchecked(payload),
            &ChecksumCapabilities::default(),
        )
    })
}

/// An IPv4 frame from the client's MAC and address to the guest's, its `payload_len`-byte
/// payload written by `emit_payload`.
fn client_ipv4_frame(
    protocol: IpProtocol,
    payload_len: usize,
    emit_payload: impl FnOnce(&mut [u8]),
) -> Vec<u8> {
    let ip = Ipv4Repr {
        src_addr: CLIENT_IP,
        dst_addr: guest_ip(),
        next_header: protocol,
        payload_len,
        hop_limit: 64,
    };
    let ethernet = EthernetRepr {
        src_addr: EthernetAddress(CLIENT_MAC.0),
        dst_addr: EthernetAddress(GUEST_MAC.0),
        ethertype: EthernetProtocol::Ipv4,
    };
    let mut frame = vec![0u8; 14 + ip.buffer_len() + payload_len];
    let mut ethernet_frame = EthernetFrame::new_unchecked(&mut frame[..]);
    ethernet.emit(&mut ethernet_frame);
    let mut ip_packet = Ipv4Packet::new_unchecked(ethernet_frame.payload_mut());
    ip.emit(&mut ip_packet, &ChecksumCapabilities::default());
    emit_payload(ip_packet.payload_mut());
    frame
}

/// What the client learns from one of the guest's frames.
enum GuestFrame {
    /// The guest asks for `target`; `reply` answers it from the client's MAC.
    ArpRequest {
        target: Ipv4Address,
        reply: Vec<u8>,
    },
    /// A TCP segment's header fields.
    Tcp {
        syn: bool,
        seq: u32,
        ack: u32,
        window: u16,
        window_scale: Option<u8>,
    },
    Other,
}

fn parse_guest_frame(frame: &[u8]) -> GuestFrame {
    use smoltcp::wire::{ArpOperation, ArpPacket, ArpRepr};
    let Ok(ethernet) = EthernetFrame::new_checked(frame) else {
        return GuestFrame::Other;
    };
    match ethernet.ethertype() {
        EthernetProtocol::Arp => {
            let Ok(ArpRepr::EthernetIpv4 {
                operation: ArpOperation::Request,
                source_hardware_addr,
                source_protocol_addr,
                target_protocol_addr,
                ..
            }) = ArpRepr::parse(&ArpPacket::new_unchecked(ethernet.payload()))
            else {
                return GuestFrame::Other;
            };
            let reply = ArpRepr::EthernetIpv4 {
                operation: ArpOperation::Reply,
                source_hardware_addr: EthernetAddress(CLIENT_MAC.0),
                source_protocol_addr: target_protocol_addr,
                target_hardware_addr: source_hardware_addr,
                target_protocol_addr: source_protocol_addr,
            };
            let mut bytes = vec![0u8; 14 + reply.buffer_len()];
            let mut out = EthernetFrame::new_unchecked(&mut bytes[..]);
            EthernetRepr {
                src_addr: EthernetAddress(CLIENT_MAC.0),
                dst_addr: source_hardware_addr,
                ethertype: EthernetProtocol::Arp,
            }
            .emit(&mut out);
            reply.emit(&mut ArpPacket::new_unchecked(out.payload_mut()));
            GuestFrame::ArpRequest {
                target: target_protocol_addr,
                reply: bytes,
            }
        }
        EthernetProtocol::Ipv4 => {
            let Ok(ip) = Ipv4Packet::new_checked(ethernet.payload()) else {
                return GuestFrame::Other;
            };
            let Ok(tcp) = TcpPacket::new_checked(ip.payload()) else {
                return GuestFrame::Other;
            };
            let Ok(repr) = TcpRepr::parse(
                &tcp,
                &ip.src_addr().into(),
                &ip.dst_addr().into(),
                &ChecksumCapabilities::ignored(),
            ) else {
                return GuestFrame::Other;
            };
            GuestFrame::Tcp {
                syn: repr.control == TcpControl::Syn,
                seq: repr.seq_number.0 as u32,
                ack: repr.ack_number.map_or(0, |ack| ack.0 as u32),
                window: repr.window_len,
                window_scale: repr.window_scale,
            }
        }
        _ => GuestFrame::Other,
    }
}

/// A client's SYN to port 5201 that offers window scaling (shift 7) and a 1460-byte MSS.
fn scaling_syn(source_port: u16, isn: u32) -> TcpRepr<'static> {
    TcpRepr {
        src_port: source_port,
        dst_port: 5201,
        control: TcpControl::Syn,
        seq_number: TcpSeqNumber(isn as i32),
        ack_number: None,
        window_len: 65535,
        window_scale: Some(7),
        max_seg_size: Some(1460),
        sack_permitted: false,
        sack_ranges: [None, None, None],
        timestamp: None,
        payload: &[],
    }
}

/// A sender like OpenVMM's consomme (user-mode NAT): it always fills the whole window the guest
/// last advertised, in 1460-byte segments (1460 ≡ 4 mod 8, the unit of a 256 KiB buffer's
/// window), and never retransmits, trusting a lossless link. Any byte the guest drops after
/// advertising room for it leaves a hole that never fills: the transfer stalls for good while
/// segments keep arriving.
#[test]
fn a_sender_that_never_retransmits_gets_every_byte_through_a_full_window() {
    const TOTAL: usize = 2 * MIB;
    const CLIENT_ISN: u32 = 1000;
    let clock = Rc::new(Cell::new(0));
    let (mut stack, control) = lone_stack(&clock);
    let listener = stack.tcp_listen_with(5201, TcpOptions::bulk()).unwrap();
    let syn = scaling_syn(40000, CLIENT_ISN);
    control.inject_rx(&client_segment(&syn));
    let data = pattern(TOTAL, 7);
    let mut guest_isn = None;
    let mut shift = 0u8;
    // The window's right edge as the sender knows it: latest acknowledgement + window.
    let mut edge = 0u32;
    let mut next = CLIENT_ISN + 1;
    let mut sent = 0usize;
    let mut stream = None;
    let mut received = Vec::with_capacity(TOTAL);
    let mut buffer = vec![0u8; 31_000];
    let mut rounds = 0;
    while received.len() < TOTAL && rounds < 20_000 {
        rounds += 1;
        stack.poll();
        for frame in control.take_tx() {
            match parse_guest_frame(&frame) {
                GuestFrame::ArpRequest { reply, .. } => control.inject_rx(&reply),
                GuestFrame::Tcp {
                    syn: true,
                    seq,
                    ack,
                    window,
                    window_scale,
                } => {
                    // The SYN-ACK: complete the handshake (its window is never scaled).
                    guest_isn = Some(TcpSeqNumber(seq.wrapping_add(1) as i32));
                    shift = window_scale.unwrap_or(0);
                    edge = ack.wrapping_add(u32::from(window));
                    control.inject_rx(&client_segment(&TcpRepr {
                        control: TcpControl::None,
                        seq_number: TcpSeqNumber(next as i32),
                        ack_number: guest_isn,
                        window_scale: None,
                        max_seg_size: None,
                        ..syn
                    }));
                }
                GuestFrame::Tcp {
                    syn: false,
                    ack,
                    window,
                    ..
                } => {
                    edge = ack.wrapping_add(u32::from(window) << shift);
                }
                GuestFrame::Other => {}
            }
        }
        if let Some(guest_isn) = guest_isn {
            // The whole window at once, as consomme does.
            while sent < TOTAL && (edge.wrapping_sub(next) as i32) > 0 {
                let len = 1460.min(edge.wrapping_sub(next) as usize).min(TOTAL - sent);
                control.inject_rx(&client_segment(&TcpRepr {
                    control: TcpControl::None,
                    seq_number: TcpSeqNumber(next as i32),
                    ack_number: Some(guest_isn),
                    window_scale: None,
                    max_seg_size: None,
                    payload: &data[sent..sent + len],
                    ..syn
                }));
                next = next.wrapping_add(len as u32);
                sent += len;
                // The guest takes each segment as it arrives and acknowledges it at once; the
                // acknowledgement reaches the sender only next round (the link's latency),
                // after the rest of the burst.
                stack.poll();
            }
        }
        if stream.is_none() {
            stream = stack.accept(&listener);
        }
        // A reader slower than the link, so the window fills, reading chunks that reopen the
        // window by 21 full segments and a short one (31 000 = 21 × 1460 + 340).
        if let Some(stream) = &stream
            && rounds % 16 == 0
        {
            let n = stack.tcp_read(stream, &mut buffer).unwrap_or(0);
            received.extend_from_slice(&buffer[..n]);
        }
        clock.set(clock.get() + MS);
    }
    assert_eq!(
        received.len(),
        TOTAL,
        "stalled after {} of {TOTAL} bytes ({sent} sent, {rounds} rounds)",
        received.len()
    );
    assert!(received == data, "the bytes arrived changed");
}

/// The window scale of the guest's SYN-ACK to a SYN (offering scaling) from `source_port`.
fn syn_ack_window_scale(
    stack: &mut NetStack,
    control: &FakeControl,
    source_port: u16,
) -> Option<u8> {
    control.inject_rx(&client_segment(&scaling_syn(source_port, 1000)));
    for _ in 0..10 {
        stack.poll();
        for frame in control.take_tx() {
            match parse_guest_frame(&frame) {
                GuestFrame::ArpRequest { reply, .. } => control.inject_rx(&reply),
                GuestFrame::Tcp {
                    syn: true,
                    window_scale,
                    ..
                } => return window_scale,
                _ => {}
            }
        }
    }
    panic!("no SYN-ACK to the SYN from port {source_port}");
}

#[test]
fn new_listener_options_give_the_next_connection_its_buffer_size() {
    let clock = Rc::new(Cell::new(0));
    let (mut stack, control) = lone_stack(&clock);
    let small = TcpOptions::default();
    let listener = stack.tcp_listen_with(5201, small).unwrap();
    // 64 KiB: the window needs one bit of scaling (smoltcp scales to the buffer's size).
    assert_eq!(syn_ack_window_scale(&mut stack, &control, 40000), Some(1));
    let large = TcpOptions {
        rx_buffer: MIB,
        ..small
    };
    stack.set_listener_options(&listener, large).unwrap();
    // The spare listening sockets were made anew: the very next SYN gets a 1 MiB window.
    assert_eq!(syn_ack_window_scale(&mut stack, &control, 40001), Some(5));
    stack.set_listener_options(&listener, small).unwrap();
    assert_eq!(syn_ack_window_scale(&mut stack, &control, 40002), Some(1));
    assert_eq!(stack.stats().tcp_buffer_allocation_failures, 0);
}

#[test]
fn socket_buffers_the_heap_cannot_give_refuse_connections_instead_of_stopping_the_kernel() {
    let clock = Rc::new(Cell::new(0));
    let (mut stack, control) = lone_stack(&clock);
    // No allocator can give this: the allocation fails the way a full guest heap does.
    let impossible = TcpOptions {
        rx_buffer: usize::MAX / 2,
        ..TcpOptions::default()
    };
    let listener = stack.tcp_listen_with(5201, impossible).unwrap();
    assert!(stack.stats().tcp_buffer_allocation_failures > 0);
    let syn = syn_frame(40000, 5201);
    let mut reset = false;
    for _ in 0..10 {
        if reset {
            break;
        }
        // Again each round: the first answer waits for ARP (smoltcp drops it meanwhile).
        control.inject_rx(&syn);
        stack.poll();
        for frame in control.take_tx() {
            if let GuestFrame::ArpRequest { reply, .. } = parse_guest_frame(&frame) {
                control.inject_rx(&reply);
            }
            // TCP flags byte of an untagged IPv4 frame without options: RST is 0x04.
            reset |= frame.len() >= 54 && frame[12..14] == [0x08, 0x00] && frame[47] & 0x04 != 0;
        }
    }
    assert!(reset, "the SYN was answered with a reset");
    assert!(stack.accept(&listener).is_none());
    let remote = IpEndpoint::new(IpAddress::v4(10, 0, 2, 100), 5201);
    assert_eq!(
        stack.tcp_connect_with(remote, impossible).unwrap_err(),
        Error::OutOfMemory {
            what: "TCP socket buffers",
            bytes: usize::MAX / 2 + TcpOptions::default().tx_buffer,
        }
    );
    // Memory back: the listener serves again.
    stack
        .set_listener_options(&listener, TcpOptions::default())
        .unwrap();
    assert_eq!(syn_ack_window_scale(&mut stack, &control, 40001), Some(1));
}
