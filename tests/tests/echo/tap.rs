//! Root only: the echo app behind a tap on a bridge, in a network namespace the test creates
//! (10.77.0.0/24) and removes; echo, ping, and malformed frames injected from the host.

use std::io::ErrorKind;
use std::net::{SocketAddr, UdpSocket};
use std::process::Command;
use std::time::{Duration, Instant};

use tandem_tests::topology::{BRIDGE, BridgedTap, GUEST_ADDRESS, HOST_ADDRESS, PacketSocket, TAP};
use xtask::Qemu;

use crate::clients::{Arrival, XorShift, concurrent_round_trips, reset_client, udp_sweep};
use crate::frames::{
    BROADCAST, ETHERNET_HEADER, ETHERTYPE_ARP, ETHERTYPE_IPV4, ETHERTYPE_IPV6, IPV4_HEADER, Mac,
    PROTOCOL_TCP, PROTOCOL_UDP, Path, TCP_SYN, UDP_HEADER, ethernet, ipv4, parse_mac,
    refresh_ipv4_checksum, tcp, udp,
};
use crate::guest::{
    ECHO_PORT, assert_alive, assert_no_failures, bad_frames_dropped, echo_image, guest_mac, on_tap,
    on_tap_with_lab,
};
use crate::user::{MAX_UDP_PAYLOAD, UDP_LOSS_ALLOWANCE};

fn create_topology() -> BridgedTap {
    BridgedTap::create().unwrap_or_else(|error| panic!("{error}"))
}

fn echo_address() -> SocketAddr {
    SocketAddr::from((GUEST_ADDRESS, ECHO_PORT))
}

/// `ping -c 3` the guest from the namespace; panics unless all three are answered.
fn ping_guest(qemu: &Qemu, when: &str) {
    let output = Command::new("ping")
        .args([
            "-c",
            "3",
            "-i",
            "0.5",
            "-W",
            "10",
            &GUEST_ADDRESS.to_string(),
        ])
        .output()
        .unwrap_or_else(|error| panic!("starting ping: {error}"));
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && text.contains("3 received"),
        "{when}: ping {GUEST_ADDRESS} failed ({}):\n{text}{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr),
        qemu.diagnostics()
    );
}

/// TCP round trips (all connecting at once) and a UDP sweep over every size, from the
/// namespace.
fn check_echo(qemu: &Qemu, when: &str, clients: usize, bytes: usize) {
    let started = Instant::now();
    let failures = concurrent_round_trips(
        echo_address(),
        &Arrival::Burst,
        clients,
        bytes,
        0x7A9,
        started + Duration::from_secs(120),
    );
    assert_no_failures(qemu, &format!("{when}: TCP echo"), &failures);
    let tcp_time = started.elapsed();
    let socket = UdpSocket::bind((HOST_ADDRESS, 0)).expect("binding a UDP socket on the bridge");
    socket.connect(echo_address()).expect("connecting it");
    let sweep = udp_sweep(
        &socket,
        1..=MAX_UDP_PAYLOAD,
        0x7A9_0D9,
        4,
        Duration::from_secs(2),
    );
    let mut failures = sweep.corrupted.clone();
    if !sweep.never_echoed.is_empty() {
        failures.push(format!("sizes never echoed: {:?}", sweep.never_echoed));
    }
    if sweep.lost > UDP_LOSS_ALLOWANCE {
        failures.push(format!("{} UDP datagrams lost", sweep.lost));
    }
    assert_no_failures(qemu, &format!("{when}: UDP sweep"), &failures);
    eprintln!(
        "{when}: {clients} x {bytes} TCP bytes echoed in {:.1} s; UDP sweep {:.1} s: {sweep:?}",
        tcp_time.as_secs_f64(),
        (started.elapsed() - tcp_time).as_secs_f64()
    );
}

#[test]
fn on_a_bridged_tap_the_guest_echoes_tcp_and_udp_and_answers_ping() {
    let topology = create_topology();
    let elf = echo_image();
    topology
        .run(|| {
            let mut qemu = on_tap("echo tap", elf);
            ping_guest(&qemu, "after boot");
            check_echo(&qemu, "tap", 4, 1 << 20);
            burst_and_resets(&qemu);
            check_echo(&qemu, "after the burst and the resets", 4, 256 * 1024);
            assert_alive(&mut qemu, "after echo on the tap");
        })
        .unwrap_or_else(|error| panic!("{error}"));
}

/// 64 clients connecting in the same instant (far more SYNs at once than the guest keeps
/// listening sockets ready), then 160 clients that reset right after connecting or with data
/// in flight (more than the guest's 128 connections, so leaked ones would show).
fn burst_and_resets(qemu: &Qemu) {
    let started = Instant::now();
    let deadline = started + Duration::from_secs(120);
    let failures = concurrent_round_trips(
        echo_address(),
        &Arrival::Burst,
        64,
        64 * 1024,
        0xB5257,
        deadline,
    );
    assert_no_failures(qemu, "64 clients connecting at once", &failures);
    let resetting: Vec<_> = (0..4u64)
        .map(|thread| {
            std::thread::spawn(move || {
                (0..40u64)
                    .filter_map(|round| {
                        let (send, read) = match round % 3 {
                            0 => (0, 0),
                            1 => (64, 64),
                            _ => (256 * 1024, 16 * 1024),
                        };
                        let seed = thread * 1000 + round;
                        reset_client(echo_address(), &Arrival::Burst, send, read, seed)
                            .err()
                            .map(|error| format!("resetting client {thread}/{round}: {error}"))
                    })
                    .collect::<Vec<String>>()
            })
        })
        .collect();
    let mut failures = concurrent_round_trips(
        echo_address(),
        &Arrival::Burst,
        8,
        1 << 20,
        0x8E5E7,
        deadline,
    );
    for thread in resetting {
        failures.extend(
            thread
                .join()
                .unwrap_or_else(|_| vec!["reset thread panicked".to_string()]),
        );
    }
    assert_no_failures(qemu, "echo beside resetting clients", &failures);
    eprintln!(
        "SYN burst and 160 resets in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// The bridge's MAC (the source of frames from the host's address).
fn bridge_mac(topology: &BridgedTap) -> Mac {
    let line = topology
        .ip(&["-br", "link", "show", BRIDGE])
        .unwrap_or_else(|error| panic!("{error}"));
    line.split_whitespace()
        .nth(2)
        .and_then(parse_mac)
        .unwrap_or_else(|| panic!("no MAC in `{}`", line.trim()))
}

/// A frame to inject, with a name for reports. Some carry a UDP datagram to the echo port with
/// payload [`tag`]`(name)`, whose echo would reach our socket: it must not come.
struct Case {
    name: String,
    frame: Vec<u8>,
}

fn case(name: impl Into<String>, frame: Vec<u8>) -> Case {
    Case {
        name: name.into(),
        frame,
    }
}

/// The payload that marks a datagram built for case `name`.
fn tag(name: &str) -> Vec<u8> {
    format!("bad:{name}").into_bytes()
}

/// A valid IPv4/UDP packet from our socket's port to the echo port carrying `tag(name)`,
/// passed through `spoil` and framed.
fn spoiled_udp(path: &Path, port: u16, name: &str, spoil: impl FnOnce(&mut Vec<u8>)) -> Case {
    let datagram = udp((path.host, port), (path.guest, ECHO_PORT), &tag(name));
    let mut packet = ipv4(path.host, path.guest, PROTOCOL_UDP, &datagram);
    spoil(&mut packet);
    Case {
        name: name.to_string(),
        frame: path.ipv4_frame(&packet),
    }
}

/// Frames a robust receiver must drop: truncated and inconsistent headers, bad checksums,
/// fragments, frames not for the guest. Tagged ones would be echoed to `port` if accepted.
fn malformed_frames(path: &Path, port: u16) -> Vec<Case> {
    let (guest, host) = (path.guest_mac, path.host_mac);
    let valid_udp = udp((path.host, port), (path.guest, ECHO_PORT), b"x");
    let valid_ip = ipv4(path.host, path.guest, PROTOCOL_UDP, &valid_udp);
    let syn = tcp(
        (path.host, port),
        (path.guest, ECHO_PORT),
        1000,
        TCP_SYN,
        &[],
    );
    let mut cases = vec![
        case("1-byte frame", vec![0xFF]),
        case("13-byte frame", guest[..].repeat(3)[..13].to_vec()),
        case(
            "Ethernet header only, IPv4",
            ethernet(guest, host, ETHERTYPE_IPV4, &[]),
        ),
        case(
            "Ethernet header only, ARP",
            ethernet(guest, host, ETHERTYPE_ARP, &[]),
        ),
        case(
            "Ethernet header only, IPv6",
            ethernet(guest, host, ETHERTYPE_IPV6, &[]),
        ),
        case(
            "ARP truncated to 10 bytes",
            ethernet(
                BROADCAST,
                host,
                ETHERTYPE_ARP,
                &[0, 1, 8, 0, 6, 4, 0, 1, 0, 0],
            ),
        ),
        case(
            "IPv6 header truncated to 20 bytes",
            ethernet(guest, host, ETHERTYPE_IPV6, &[0x60; 20]),
        ),
    ];
    for len in [1, 10, IPV4_HEADER - 1] {
        cases.push(case(
            format!("IPv4 header truncated to {len} bytes"),
            path.ipv4_frame(&valid_ip[..len]),
        ));
    }
    for len in [1, 5, 19] {
        let packet = ipv4(path.host, path.guest, PROTOCOL_TCP, &syn[..len]);
        cases.push(case(
            format!("TCP header truncated to {len} bytes"),
            path.ipv4_frame(&packet),
        ));
    }
    for (name, offset) in [("15 (beyond the segment)", 15u8), ("2 (below 5)", 2)] {
        let mut segment = syn.clone();
        segment[12] = offset << 4;
        let packet = ipv4(path.host, path.guest, PROTOCOL_TCP, &segment);
        cases.push(case(
            format!("TCP data offset {name}"),
            path.ipv4_frame(&packet),
        ));
    }
    let mut bad_syn = syn.clone();
    bad_syn[16] ^= 0x55;
    cases.push(case(
        "TCP SYN with a bad checksum",
        path.ipv4_frame(&ipv4(path.host, path.guest, PROTOCOL_TCP, &bad_syn)),
    ));
    let set_total = |total: u16| {
        move |packet: &mut Vec<u8>| {
            packet[2..4].copy_from_slice(&total.to_be_bytes());
            refresh_ipv4_checksum(packet);
        }
    };
    let udp_field = |offset: usize, value: u16| {
        move |packet: &mut Vec<u8>| {
            let at = IPV4_HEADER + offset;
            packet[at..at + 2].copy_from_slice(&value.to_be_bytes());
        }
    };
    let datagram_len = (UDP_HEADER + tag("").len()) as u16;
    cases.extend([
        spoiled_udp(path, port, "IPv4 header checksum wrong", |packet| {
            packet[10] ^= 0xFF;
        }),
        spoiled_udp(path, port, "UDP checksum wrong", |packet| {
            packet[IPV4_HEADER + 6] ^= 0xFF;
        }),
        spoiled_udp(
            path,
            port,
            "IPv4 total length 100 beyond the frame",
            |packet| {
                let total = packet.len() as u16 + 100;
                set_total(total)(packet);
            },
        ),
        spoiled_udp(path, port, "IPv4 total length 65535", set_total(0xFFFF)),
        spoiled_udp(
            path,
            port,
            "IPv4 total length below its header",
            set_total(10),
        ),
        spoiled_udp(path, port, "IPv4 header length 4 words", |packet| {
            packet[0] = 0x44;
            refresh_ipv4_checksum(packet);
        }),
        spoiled_udp(path, port, "IPv4 header length 15 words", |packet| {
            packet[0] = 0x4F;
            refresh_ipv4_checksum(packet);
        }),
        spoiled_udp(path, port, "IP version 6 in an IPv4 frame", |packet| {
            packet[0] = 0x65;
            refresh_ipv4_checksum(packet);
        }),
        spoiled_udp(
            path,
            port,
            "IPv4 first fragment (more fragments)",
            |packet| {
                packet[6..8].copy_from_slice(&0x2000u16.to_be_bytes());
                refresh_ipv4_checksum(packet);
            },
        ),
        spoiled_udp(path, port, "IPv4 last fragment at offset 8", |packet| {
            packet[6..8].copy_from_slice(&0x0001u16.to_be_bytes());
            refresh_ipv4_checksum(packet);
        }),
        spoiled_udp(path, port, "IPv4 to another address", |packet| {
            packet[19] = 3;
            refresh_ipv4_checksum(packet);
        }),
        spoiled_udp(
            path,
            port,
            "UDP length 50 beyond the packet",
            udp_field(4, datagram_len + 50),
        ),
        spoiled_udp(path, port, "UDP length below its header", udp_field(4, 4)),
    ]);
    let mut other_mac = spoiled_udp(path, port, "to another MAC", |_| {});
    other_mac.frame[..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x99]);
    cases.push(other_mac);
    let mut vlan = spoiled_udp(path, port, "VLAN-tagged", |_| {});
    vlan.frame
        .splice(12..12, [0x81, 0x00, 0x00, 0x05].iter().copied());
    cases.push(vlan);
    cases
}

/// `count` frames of random bytes and lengths, most of them addressed to the guest.
fn garbage_frames(path: &Path, count: usize, seed: u64) -> Vec<Vec<u8>> {
    let mut random = XorShift::new(seed);
    let ethertypes = [ETHERTYPE_IPV4, ETHERTYPE_ARP, ETHERTYPE_IPV6];
    (0..count)
        .map(|_| {
            let len = random.between(ETHERNET_HEADER, 1514);
            let mut frame = random.bytes(len);
            match random.between(0, 3) {
                0 | 1 => frame[..6].copy_from_slice(&path.guest_mac),
                2 => frame[..6].copy_from_slice(&BROADCAST),
                _ => {}
            }
            if random.between(0, 3) != 0 {
                let ethertype = ethertypes[random.between(0, ethertypes.len() - 1)];
                frame[12..14].copy_from_slice(&ethertype.to_be_bytes());
            }
            frame
        })
        .collect()
}

/// Receives datagrams on `socket` until one equals `control` or `timeout` passes; every other
/// datagram is added to `others`.
fn receive_until(
    socket: &UdpSocket,
    control: &[u8],
    timeout: Duration,
    others: &mut Vec<Vec<u8>>,
) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    let mut buffer = vec![0u8; 65536];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let timed_out = || {
            format!(
                "no echo of {:?} within {timeout:?}",
                String::from_utf8_lossy(control)
            )
        };
        if left.is_zero() {
            return Err(timed_out());
        }
        socket
            .set_read_timeout(Some(left))
            .map_err(|error| error.to_string())?;
        match socket.recv_from(&mut buffer) {
            Ok((count, _)) if buffer[..count] == *control => return Ok(()),
            Ok((count, _)) => others.push(buffer[..count].to_vec()),
            Err(error) if matches!(error.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Err(timed_out());
            }
            Err(error) => return Err(format!("waiting for the echo: {error}")),
        }
    }
}

/// The first serial line after the first `skip` lines that satisfies `wanted`, waiting up to
/// `timeout` for it.
fn wait_for_new_line(
    qemu: &Qemu,
    skip: usize,
    timeout: Duration,
    wanted: impl Fn(&str) -> bool,
) -> Option<String> {
    let deadline = Instant::now() + timeout;
    loop {
        let found = qemu
            .serial_lines()
            .into_iter()
            .skip(skip)
            .find(|line| wanted(line));
        if found.is_some() || Instant::now() >= deadline {
            return found;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Injects `frame`; returns the error text if the host refused it.
fn inject(injector: &PacketSocket, frame: &[u8]) -> Option<String> {
    match injector.send(frame) {
        Ok(sent) if sent == frame.len() => None,
        Ok(sent) => Some(format!("only {sent} of {} bytes sent", frame.len())),
        Err(error) => Some(error.to_string()),
    }
}

/// Control round trips between the injected frames: one normal datagram through the host's
/// stack (which also keeps the guest's ARP entry for us fresh), one injected through the raw
/// socket. Both must be echoed; each is retried, since UDP may be dropped on the host (a burst
/// of injected frames fills the tap's queue).
struct Prober<'a> {
    socket: &'a UdpSocket,
    injector: &'a PacketSocket,
    path: Path,
    port: u16,
    round: usize,
    /// Payloads of earlier control datagrams: a late echo of one of them is no surprise.
    own: Vec<Vec<u8>>,
}

impl Prober<'_> {
    const TRIES: usize = 4;
    const WAIT: Duration = Duration::from_secs(3);

    /// Runs one control round; returns every other datagram echoed meanwhile (an echo of a
    /// frame the guest should have dropped). Panics if the guest stops echoing.
    fn control(&mut self, qemu: &Qemu, when: &str) -> Vec<Vec<u8>> {
        self.round += 1;
        let mut stray = Vec::new();
        for injected in [false, true] {
            let payload = format!(
                "control {} {}",
                self.round,
                if injected { "injected" } else { "normal" }
            )
            .into_bytes();
            self.own.push(payload.clone());
            let mut last_error = String::new();
            let echoed = (0..Self::TRIES).any(|_| {
                let sent = if injected {
                    let frame = self.path.udp_frame(self.port, ECHO_PORT, &payload);
                    inject(self.injector, &frame)
                        .map_or(Ok(()), |error| Err(format!("injecting: {error}")))
                } else {
                    self.socket
                        .send_to(&payload, echo_address())
                        .map(drop)
                        .map_err(|error| format!("sending: {error}"))
                };
                let result = sent
                    .and_then(|()| receive_until(self.socket, &payload, Self::WAIT, &mut stray));
                result.map_err(|error| last_error = error).is_ok()
            });
            if !echoed {
                panic!(
                    "{when}: the guest stopped echoing ({} tries, {} s each): {last_error}\n{}",
                    Self::TRIES,
                    Self::WAIT.as_secs(),
                    qemu.diagnostics()
                );
            }
        }
        stray.retain(|payload| !self.own.contains(payload));
        stray
    }
}

#[test]
fn malformed_and_oversized_frames_are_dropped_and_echo_goes_on() {
    let topology = create_topology();
    let host_mac = bridge_mac(&topology);
    let elf = echo_image();
    topology
        .run(|| {
            let lab =
                std::env::temp_dir().join(format!("tandem-echo-lab-{}.sock", std::process::id()));
            let mut qemu = on_tap_with_lab("echo bad frames", elf, &lab);
            // A lone newline first: the guest ignores it, and it settles the channel.
            let _ = xtask::vf::lab_command(&lab, "", Duration::from_secs(2));
            let dropped_before = bad_frames_dropped(&lab);
            let path = Path {
                guest_mac: guest_mac(&qemu),
                host_mac,
                host: HOST_ADDRESS,
                guest: GUEST_ADDRESS,
            };
            let injector = PacketSocket::bind(TAP).unwrap_or_else(|error| panic!("{error}"));
            let socket = UdpSocket::bind((HOST_ADDRESS, 0)).expect("binding a UDP socket");
            let port = socket.local_addr().expect("its address").port();
            let mut prober = Prober {
                socket: &socket,
                injector: &injector,
                path,
                port,
                round: 0,
                own: Vec::new(),
            };
            let mut control = |qemu: &Qemu, when: &str| prober.control(qemu, when);
            let stray = control(&qemu, "before injection");
            assert!(stray.is_empty(), "unexpected datagrams: {stray:?}");

            // One malformed frame at a time, each followed by a control round trip: a frame
            // that stops the guest is named, and an echo of a frame it must drop is caught.
            let mut refused = Vec::new();
            let mut wrongly_echoed = Vec::new();
            let cases = malformed_frames(&path, port);
            for case in &cases {
                if let Some(error) = inject(&injector, &case.frame) {
                    refused.push(format!(
                        "{} ({} bytes): {error}",
                        case.name,
                        case.frame.len()
                    ));
                }
                let when = format!("after injecting `{}`", case.name);
                for payload in control(&qemu, &when) {
                    let text = String::from_utf8_lossy(&payload);
                    wrongly_echoed.push(if payload == tag(&case.name) {
                        format!("echoed a frame it must drop: {}", case.name)
                    } else {
                        format!("{when}: unexpected datagram {text:?}")
                    });
                }
            }
            assert_no_failures(&qemu, "malformed frames", &wrongly_echoed);
            let garbage = garbage_frames(&path, 2000, 0x6A7B);
            let mut garbage_refused = 0;
            for (batch, frames) in garbage.chunks(250).enumerate() {
                garbage_refused += frames
                    .iter()
                    .filter(|frame| inject(&injector, frame).is_some())
                    .count();
                let when = format!("after random frames batch {batch}");
                let stray = control(&qemu, &when);
                assert!(stray.is_empty(), "{when}: unexpected datagrams: {stray:?}");
            }
            eprintln!(
                "injected {} malformed frames ({} refused by the host: {refused:?}) and 2000 \
                 random ones ({garbage_refused} refused)",
                cases.len(),
                refused.len()
            );
            assert_alive(&mut qemu, "after malformed frames");
            // The frames with bad IPv4/UDP/TCP checksums are dropped by the bond and counted.
            let dropped = bad_frames_dropped(&lab) - dropped_before;
            eprintln!("the guest counted {dropped} bad frames dropped");
            assert!(
                dropped >= 3,
                "the guest's bad-frame counter grew by only {dropped}\n{}",
                qemu.diagnostics()
            );

            // Oversized: beyond the tap's 1500-byte MTU the host refuses to send them; with
            // the tap's MTU raised they reach QEMU and the guest, which must drop them.
            let oversized = [1515usize, 1600, 4096, 9014];
            let oversized_frame = |len: usize| {
                let payload_len = len - ETHERNET_HEADER - IPV4_HEADER - UDP_HEADER;
                let mut payload = tag(&format!("oversized {len}-byte frame"));
                payload.resize(payload_len, b'.');
                path.udp_frame(port, ECHO_PORT, &payload)
            };
            let mut report = Vec::new();
            for len in oversized {
                let outcome =
                    inject(&injector, &oversized_frame(len)).unwrap_or_else(|| "sent".to_string());
                report.push(format!("{len} bytes at MTU 1500: {outcome}"));
            }
            topology
                .set_mtu(TAP, 9000)
                .unwrap_or_else(|error| panic!("{error}"));
            let lines_before = qemu.serial_lines().len();
            for len in oversized {
                let outcome =
                    inject(&injector, &oversized_frame(len)).unwrap_or_else(|| "sent".to_string());
                report.push(format!("{len} bytes at MTU 9000: {outcome}"));
                let mut garbage = XorShift::new(len as u64).bytes(len);
                garbage[..6].copy_from_slice(&path.guest_mac);
                inject(&injector, &garbage);
            }
            eprintln!("oversized frames: {report:?}");
            let echoed: Vec<String> = control(&qemu, "after oversized frames")
                .iter()
                .map(|payload| {
                    format!(
                        "echoed {} bytes starting {:?}",
                        payload.len(),
                        String::from_utf8_lossy(&payload[..payload.len().min(40)])
                    )
                })
                .collect();
            assert_no_failures(
                &qemu,
                "oversized frames (larger than the guest MTU)",
                &echoed,
            );
            // Whoever refuses them counts and logs it: the NIC driver (`... dropped ... (N
            // dropped so far)`) for frames beyond its receive buffers, or, with GUEST_TSO (the
            // driver then takes coalesced frames of up to 64 KiB), the bond for anything over
            // the MTU that is not TCP (`bond: dropped a 9014-byte frame ...`).
            let drop_logged =
                wait_for_new_line(&qemu, lines_before, Duration::from_secs(10), |line| {
                    (line.contains("virtio-net") && line.contains("dropped"))
                        || line.contains("bond: dropped a")
                });
            assert!(
                drop_logged.is_some(),
                "no drop line for the oversized frames\n{}",
                qemu.diagnostics()
            );
            topology
                .set_mtu(TAP, 1500)
                .unwrap_or_else(|error| panic!("{error}"));
            eprintln!("{}", topology.link_statistics(TAP));
            assert_alive(&mut qemu, "after oversized frames");

            ping_guest(&qemu, "after bad input");
            check_echo(&qemu, "after bad input", 4, 256 * 1024);
            assert_alive(&mut qemu, "at the end");
            let drops: Vec<String> = qemu
                .serial_lines()
                .into_iter()
                .filter(|line| line.contains("net: stats") || line.contains("drop"))
                .collect();
            eprintln!("guest lines about drops:\n{}", drops.join("\n"));
        })
        .unwrap_or_else(|error| panic!("{error}"));
}
