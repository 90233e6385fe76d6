//! The stack over netvsc over netvsp: a guest `NetStack` whose synthetic path is our netvsc
//! driver on OpenVMM's netvsp, talking to a client stack through netvsp's endpoint: TCP and UDP
//! echo byte-exact, then the same bonded with an igbvf VF (on vf-driver's fake igb) that is
//! detached mid-transfer.

use std::time::{Duration, Instant};

use net_device::{MacAddress, NetDevice};
use net_stack::fake::{FakeControl, FakeDevice};
use net_stack::{
    Error, IpEndpoint, Ipv4Address, Ipv4Cidr, Ipv4Mode, NetConfig, NetStack, PathId, Platform,
    StackOptions, TcpListener, TcpStream, UdpSocket,
};
use netvsc_fallback::netvsc::NetvscConfig;
use vf_driver::fake::{FakeIgb, TestHost};

use super::harness::{HOST_MAC, HostOptions, NetvspHost};

const CLIENT_MAC: MacAddress = MacAddress([0x52, 0x54, 0x00, 0x00, 0x00, 0x64]);
const MIB: usize = 1 << 20;

/// Real time: netvsp runs on its own thread against the wall clock.
struct WallClock {
    started: Instant,
    seed: u64,
}

impl Platform for WallClock {
    fn now_ns(&self) -> u64 {
        self.started.elapsed().as_nanos() as u64
    }
    fn wait_for_event(&self, _deadline_ns: Option<u64>) {}
    fn random_seed(&self) -> u64 {
        self.seed
    }
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

fn guest_endpoint() -> IpEndpoint {
    IpEndpoint::new(Ipv4Address::new(10, 0, 2, 15).into(), 7)
}

/// Guest (netvsc on netvsp, optionally a VF), client (fake NIC), and the wire between them: a
/// learning switch (unicast to the guest goes to the port it last sent from).
struct World {
    guest: NetStack,
    client: NetStack,
    host: NetvspHost,
    client_nic: FakeControl,
    vf: Option<FakeIgb>,
    learned_vf: bool,
}

impl World {
    fn new() -> World {
        // Offloads off: the frames cross to the client stack as they left the guest, with no
        // NIC in between to segment them or fill in checksums.
        let config = NetvscConfig {
            offloads: false,
            ..NetvscConfig::default()
        };
        let (host, device) = NetvspHost::with_driver(HostOptions::default(), config);
        let started = Instant::now();
        let guest = NetStack::with_options(
            static_config([10, 0, 2, 15]),
            Box::new(device),
            Box::new(WallClock {
                started,
                seed: 0x1234_5678,
            }),
            StackOptions::default(),
        )
        .expect("guest stack");
        let (client_nic, client_nic_control) = FakeDevice::boxed("client-nic", CLIENT_MAC);
        let client = NetStack::with_options(
            static_config([10, 0, 2, 100]),
            client_nic,
            Box::new(WallClock {
                started,
                seed: 0x9abc_def0,
            }),
            StackOptions::default(),
        )
        .expect("client stack");
        World {
            guest,
            client,
            host,
            client_nic: client_nic_control,
            vf: None,
            learned_vf: false,
        }
    }

    fn attach_vf(&mut self) {
        let fake = FakeIgb::with_scripted_pf(Some(MacAddress(HOST_MAC)));
        let vf = vf_driver::IgbVf::new(
            fake.vf_registers(0),
            vf_driver::fake_dma::FakeDmaAllocator::new(),
            Box::new(TestHost::new(1_000)),
            vf_driver::Config {
                name: "igbvf (fake)".into(),
                ..vf_driver::Config::default()
            },
        )
        .expect("VF on the fake igb");
        self.guest.attach_vf(Box::new(vf)).expect("VF pairs");
        self.vf = Some(fake);
    }

    fn detach_vf(&mut self) -> Box<dyn NetDevice> {
        let device = self.guest.detach_vf().expect("a VF was attached");
        self.vf = None;
        self.learned_vf = false;
        device
    }

    /// Moves frames across the wire; returns how many moved.
    fn pump(&mut self) -> usize {
        let mut moved = 0;
        for (frame, _) in self.host.take_transmitted() {
            if frame[6..12] == HOST_MAC {
                self.learned_vf = false;
            }
            self.client_nic.inject_rx(&frame);
            moved += 1;
        }
        if let Some(vf) = &self.vf {
            for frame in vf.take_transmitted(0) {
                self.learned_vf = true;
                self.client_nic.inject_rx(&frame);
                moved += 1;
            }
        }
        for frame in self.client_nic.take_tx() {
            moved += 1;
            let multicast = frame[0] & 1 == 1;
            let to_vf = self.vf.is_some() && (multicast || self.learned_vf);
            let to_synthetic = multicast || !to_vf;
            if to_synthetic {
                self.host
                    .inject(frame.clone(), net_backend::RxMetadata::default());
            }
            if to_vf && let Some(vf) = &self.vf {
                vf.inject_rx_frame(0, &frame);
            }
        }
        moved
    }

    /// One round: both stacks poll, the apps run, frames cross; a short sleep when idle.
    fn step(&mut self, apps: &mut dyn FnMut(&mut NetStack, &mut NetStack) -> bool) {
        let mut progress = self.guest.poll();
        progress |= self.client.poll();
        progress |= apps(&mut self.guest, &mut self.client);
        progress |= self.pump() > 0;
        if !progress {
            std::thread::sleep(Duration::from_micros(100));
        }
    }

    fn run_until(
        &mut self,
        limit: Duration,
        apps: &mut dyn FnMut(&mut NetStack, &mut NetStack) -> bool,
        done: &mut dyn FnMut(&mut World) -> bool,
    ) {
        let started = Instant::now();
        while !done(self) {
            assert!(started.elapsed() < limit, "timed out");
            self.step(apps);
        }
    }
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

/// The guest's TCP and UDP echo server on port 7.
struct EchoServer {
    listener: TcpListener,
    udp: UdpSocket,
    connections: Vec<(TcpStream, Vec<u8>)>,
}

impl EchoServer {
    fn new(net: &mut NetStack) -> EchoServer {
        EchoServer {
            listener: net.tcp_listen(7).unwrap(),
            udp: net.udp_bind(7).unwrap(),
            connections: Vec::new(),
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
                    Err(_) => finished = true,
                }
            }
            if finished {
                let (stream, _) = self.connections.swap_remove(index);
                net.tcp_close(stream);
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

/// Sends `len` bytes from the client and collects the echo; `at_progress` runs after every
/// step with the echoed byte count.
fn tcp_echo(
    world: &mut World,
    server: &mut EchoServer,
    len: usize,
    at_progress: &mut dyn FnMut(&mut World, usize),
) -> (Vec<u8>, Vec<u8>) {
    let data = pattern(len, len as u32);
    let stream = world.client.tcp_connect(guest_endpoint()).unwrap();
    let mut sent = 0;
    let mut received = Vec::new();
    let mut eof = false;
    let started = Instant::now();
    while !(eof && received.len() == data.len()) {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "echo stalled at {} of {len} bytes",
            received.len()
        );
        world.step(&mut |guest, client| {
            let mut progress = server.step(guest);
            if sent < data.len() {
                let end = (sent + 16 * 1024).min(data.len());
                let written = client.tcp_write(&stream, &data[sent..end]).unwrap();
                sent += written;
                progress |= written > 0;
                if sent == data.len() {
                    client.tcp_shutdown(&stream).unwrap();
                }
            }
            let mut buffer = [0u8; 8192];
            loop {
                match client.tcp_read(&stream, &mut buffer) {
                    Ok(0) => break,
                    Ok(read) => {
                        received.extend_from_slice(&buffer[..read]);
                        progress = true;
                    }
                    Err(Error::PeerClosed) => {
                        eof = true;
                        break;
                    }
                    Err(error) => panic!("client stream failed: {error}"),
                }
            }
            progress
        });
        at_progress(world, received.len());
    }
    (data, received)
}

fn udp_echo(world: &mut World, server: &mut EchoServer) {
    let socket = world.client.udp_bind(0).unwrap();
    let datagrams: Vec<Vec<u8>> = [1usize, 100, 1400, 1472, 1473, 8000, 32_768]
        .iter()
        .map(|len| pattern(*len, *len as u32 + 99))
        .collect();
    let mut received = Vec::new();
    let mut next = 0;
    world.run_until(
        Duration::from_secs(30),
        &mut |guest, _| server.step(guest),
        &mut |world| {
            // One at a time: the stack reassembles one fragmented datagram at once.
            if next < datagrams.len() && received.len() == next {
                world
                    .client
                    .udp_send_to(&socket, &datagrams[next], guest_endpoint())
                    .unwrap();
                next += 1;
            }
            let mut buffer = vec![0u8; 65_536];
            while let Some((len, _)) = world.client.udp_recv_from(&socket, &mut buffer).unwrap() {
                received.push(buffer[..len].to_vec());
            }
            received.len() == datagrams.len()
        },
    );
    assert_eq!(received, datagrams);
}

#[test]
fn tcp_and_udp_echo_over_netvsc_are_byte_exact() {
    let mut world = World::new();
    let mut server = EchoServer::new(&mut world.guest);
    let (sent, echoed) = tcp_echo(&mut world, &mut server, MIB, &mut |_, _| {});
    assert_eq!(echoed.len(), sent.len());
    assert!(echoed == sent, "echoed bytes differ");
    udp_echo(&mut world, &mut server);
    assert_eq!(world.guest.active_path(), PathId::Synthetic);
}

#[test]
fn bonded_with_a_vf_detached_mid_transfer_loses_nothing() {
    let mut world = World::new();
    world.attach_vf();
    world.run_until(Duration::from_secs(10), &mut |_, _| false, &mut |world| {
        world.guest.active_path() == PathId::Vf
    });
    let mut server = EchoServer::new(&mut world.guest);
    let mut detached = None;
    let (sent, echoed) = tcp_echo(&mut world, &mut server, MIB, &mut |world, echoed| {
        if detached.is_none() && echoed >= 300 * 1024 {
            assert!(world.learned_vf, "the transfer ran over the VF");
            detached = Some(world.detach_vf());
            assert_eq!(world.guest.active_path(), PathId::Synthetic);
        }
    });
    assert!(detached.is_some(), "the VF was detached mid-transfer");
    assert_eq!(echoed.len(), sent.len());
    assert!(echoed == sent, "echoed bytes differ");
    assert!(!world.learned_vf, "the switch relearned the synthetic path");
    let stats = world.guest.stats().bond;
    // The VF carried the first part of the echo (it segments large frames itself, so count
    // bytes, not frames), netvsc the rest.
    assert!(
        stats.vf_retired.bond.tx_bytes > 200 * 1024,
        "{:?}",
        stats.vf_retired
    );
    assert!(stats.synthetic.bond.tx_bytes > 500 * 1024);
    udp_echo(&mut world, &mut server);
}
