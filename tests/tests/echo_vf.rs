//! Root only: the `echo` app over the igbvf VF alone — the igb PF on root port rp1 with the
//! guest as its driver (lab PF), and no virtio-net device in the VM — behind a tap on a bridge
//! in a network namespace the test creates: 64 concurrent TCP clients, every UDP size, ping,
//! and the VF's hardware frame counters against the traffic the host really sent.

// The client and guest helpers are shared with the `echo` test binary, which uses all of them;
// this one needs only some.
#[allow(dead_code)]
#[path = "echo/clients.rs"]
mod clients;
#[allow(dead_code)]
#[path = "echo/frames.rs"]
mod frames;
#[allow(dead_code)]
#[path = "echo/guest.rs"]
mod guest;
#[path = "echo_vf/vf_guest.rs"]
mod vf_guest;

use std::io::ErrorKind;
use std::net::{SocketAddr, UdpSocket};
use std::process::Command;
use std::time::{Duration, Instant};

use tandem_tests::topology::{BRIDGE, BridgedTap, GUEST_ADDRESS, HOST_ADDRESS, TAP};

use crate::clients::{Arrival, XorShift, concurrent_round_trips, udp_sweep};
use crate::guest::{ECHO_PORT, assert_alive, assert_no_failures, echo_image};
use crate::vf_guest::{Stats, VfGuest, on_tap_vf_only};

/// Largest UDP payload in one 1500-byte IPv4 packet.
const MAX_UDP_PAYLOAD: usize = 1500 - 20 - 8;
/// UDP tries per size that may go unanswered (retried) before the sweep fails: a tap on a
/// bridge should lose none, so this only absorbs a rare hiccup.
const UDP_LOSS_ALLOWANCE: usize = 3;

fn create_topology() -> BridgedTap {
    BridgedTap::create().unwrap_or_else(|error| panic!("{error}"))
}

fn echo_address() -> SocketAddr {
    SocketAddr::from((GUEST_ADDRESS, ECHO_PORT))
}

/// `ping -c 3` the guest from the namespace; panics unless all three are answered.
fn ping_guest(guest: &VfGuest, when: &str) {
    let output = Command::new("ping")
        .args([
            "-c",
            "3",
            "-i",
            "0.3",
            "-W",
            "10",
            &GUEST_ADDRESS.to_string(),
        ])
        .output()
        .unwrap_or_else(|error| panic!("starting ping: {error}"));
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && text.contains("3 received"),
        "{when}: ping {GUEST_ADDRESS} over the VF failed ({}):\n{text}{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr),
        guest.qemu.diagnostics()
    );
}

#[test]
fn over_the_vf_alone_sixty_four_concurrent_tcp_clients_get_one_mib_each_back_exactly() {
    const CLIENTS: usize = 64;
    const BYTES: usize = 1 << 20;
    let topology = create_topology();
    let elf = echo_image();
    topology
        .run(|| {
            let mut guest = on_tap_vf_only("vf echo tcp64", elf);
            let started = Instant::now();
            // All 64 are connected (one at a time, each after its first echo) before any
            // sends its mebibyte, so the transfers really run at once.
            let failures = concurrent_round_trips(
                echo_address(),
                &Arrival::one_at_a_time(),
                CLIENTS,
                BYTES,
                0x7CB_0F64,
                started + Duration::from_secs(120),
            );
            eprintln!(
                "VF alone: {CLIENTS} clients x {BYTES} bytes echoed in {:.1} s",
                started.elapsed().as_secs_f64()
            );
            assert_no_failures(&guest.qemu, "64 concurrent 1 MiB TCP echoes", &failures);
            assert_alive(&mut guest.qemu, "after 64 TCP clients over the VF");
        })
        .unwrap_or_else(|error| panic!("{error}"));
}

#[test]
fn over_the_vf_alone_udp_datagrams_of_every_size_come_back_intact_and_ping_is_answered() {
    let topology = create_topology();
    let elf = echo_image();
    topology
        .run(|| {
            let mut guest = on_tap_vf_only("vf echo udp+ping", elf);
            ping_guest(&guest, "after boot");
            let socket = UdpSocket::bind((HOST_ADDRESS, 0)).expect("binding a UDP socket");
            socket.connect(echo_address()).expect("connecting it");
            let started = Instant::now();
            let sweep = udp_sweep(
                &socket,
                1..=MAX_UDP_PAYLOAD,
                0x0DD_5EEF,
                4,
                Duration::from_secs(2),
            );
            eprintln!(
                "VF alone: UDP sweep in {:.1} s: {sweep:?}",
                started.elapsed().as_secs_f64()
            );
            let mut failures = sweep.corrupted.clone();
            if !sweep.never_echoed.is_empty() {
                failures.push(format!(
                    "sizes never echoed in 4 tries: {:?}",
                    sweep.never_echoed
                ));
            }
            if sweep.lost > UDP_LOSS_ALLOWANCE {
                failures.push(format!(
                    "{} datagrams lost (more than {UDP_LOSS_ALLOWANCE}) on a bridged tap",
                    sweep.lost
                ));
            }
            assert_no_failures(&guest.qemu, "UDP size sweep over the VF", &failures);
            assert_eq!(sweep.echoed, MAX_UDP_PAYLOAD);
            ping_guest(&guest, "after the UDP sweep");
            assert_alive(&mut guest.qemu, "after UDP and ping over the VF");
        })
        .unwrap_or_else(|error| panic!("{error}"));
}

/// Switches IPv6 off on the namespace's interfaces (call inside the namespace): otherwise the
/// host's router solicitations, MLD reports and DAD probes reach the guest at times of their
/// own choosing and blur the frame counts. The namespace's own interfaces come first: their
/// entries exist only inside it, so a thread outside it fails before touching `all`.
fn disable_host_ipv6() {
    for interface in [BRIDGE, TAP, "all", "default"] {
        let path = format!("/proc/sys/net/ipv6/conf/{interface}/disable_ipv6");
        std::fs::write(&path, "1").unwrap_or_else(|error| panic!("writing {path}: {error}"));
    }
}

/// What sending datagrams one at a time, each waiting for its echo, did.
#[derive(Debug, Default)]
struct Exchange {
    /// Datagrams sent (retries included).
    sent: u64,
    /// Exact echoes received (late echoes of retried datagrams included).
    echoes: u64,
    /// Datagrams never echoed within all tries.
    unanswered: u64,
    /// Replies that matched no datagram sent.
    strange: Vec<String>,
}

/// Sends `count` datagrams of random sizes (1..=1472) one at a time, each waiting up to 2 s
/// for its exact echo and retried up to 3 times.
fn exchange_datagrams(socket: &UdpSocket, count: usize, seed: u64) -> Exchange {
    const TRIES: usize = 4;
    let mut random = XorShift::new(seed);
    let mut exchange = Exchange::default();
    let mut sent_before: Vec<Vec<u8>> = Vec::new();
    let mut buffer = vec![0u8; 2048];
    for index in 0..count {
        let size = random.between(1, MAX_UDP_PAYLOAD);
        let mut payload = random.bytes(size);
        // The index in the first bytes keeps every datagram distinct.
        let tag = (index as u32).to_le_bytes();
        let tagged = tag.len().min(size);
        payload[..tagged].copy_from_slice(&tag[..tagged]);
        let mut echoed = false;
        for _ in 0..TRIES {
            socket.send(&payload).expect("sending a datagram");
            exchange.sent += 1;
            let deadline = Instant::now() + Duration::from_secs(2);
            while !echoed {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                let _ = socket.set_read_timeout(Some(left.max(Duration::from_millis(1))));
                match socket.recv(&mut buffer) {
                    Ok(len) if buffer[..len] == payload[..] => {
                        exchange.echoes += 1;
                        echoed = true;
                    }
                    Ok(len) if sent_before.iter().any(|sent| sent[..] == buffer[..len]) => {
                        exchange.echoes += 1
                    }
                    Ok(len) => exchange
                        .strange
                        .push(format!("a {len}-byte reply that matches nothing sent")),
                    Err(error)
                        if matches!(error.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                    Err(error) => panic!("receiving an echo: {error}"),
                }
            }
            if echoed {
                break;
            }
        }
        if !echoed {
            exchange.unanswered += 1;
        }
        sent_before.push(payload);
    }
    exchange
}

#[test]
fn the_vf_hardware_counters_count_the_frames_the_host_sent_and_received() {
    /// Datagrams exchanged between the two readings.
    const DATAGRAMS: usize = 400;
    /// Frames beyond the datagrams the counters may see in the meantime: an ARP request and
    /// reply in each direction when a neighbour entry expires.
    const EXTRA_FRAMES: u64 = 4;
    let topology = create_topology();
    let elf = echo_image();
    topology
        .run(|| {
            disable_host_ipv6();
            let mut guest = on_tap_vf_only("vf echo counters", elf);
            let socket = UdpSocket::bind((HOST_ADDRESS, 0)).expect("binding a UDP socket");
            socket.connect(echo_address()).expect("connecting it");
            // A few exchanges first, so both sides have resolved each other's MAC.
            let warm_up = exchange_datagrams(&socket, 5, 0x3A6);
            assert_eq!(warm_up.unanswered, 0, "warm-up: {warm_up:?}");

            let before = guest.settled_stats();
            let exchange = exchange_datagrams(&socket, DATAGRAMS, 0xC0_0273);
            let after = guest.settled_stats();
            eprintln!("exchange: {exchange:?}\nbefore: {before:?}\nafter: {after:?}");
            assert!(
                exchange.strange.is_empty() && exchange.unanswered == 0,
                "the echo itself went wrong: {exchange:?}\n{}",
                guest.qemu.diagnostics()
            );

            // With the VF as the only NIC it takes the bond's primary ("synthetic") slot, so
            // its counters are the `synthetic_*` ones.
            assert_eq!(after.active, "Synthetic", "{after:?}");
            let delta = |name: &str| after.delta(&before, name);
            let (hardware_rx, hardware_tx) = (
                delta("synthetic_hardware_rx"),
                delta("synthetic_hardware_tx"),
            );
            let (driver_rx, driver_tx) =
                (delta("synthetic_driver_rx"), delta("synthetic_driver_tx"));
            let report = format!(
                "host sent {} datagrams and got {} echoes; VF hardware rx +{hardware_rx} \
                 tx +{hardware_tx}, driver rx +{driver_rx} tx +{driver_tx}",
                exchange.sent, exchange.echoes
            );
            eprintln!("{report}");
            let within =
                |count: u64, expected: u64| (expected..=expected + EXTRA_FRAMES).contains(&count);
            assert!(
                within(hardware_rx, exchange.sent),
                "VFGPRC: {report} (expected {} to {})\n{}",
                exchange.sent,
                exchange.sent + EXTRA_FRAMES,
                guest.qemu.diagnostics()
            );
            assert!(
                within(hardware_tx, exchange.echoes),
                "VFGPTC: {report} (expected {} to {})\n{}",
                exchange.echoes,
                exchange.echoes + EXTRA_FRAMES,
                guest.qemu.diagnostics()
            );
            // Every frame the hardware delivered, the driver took; every frame the driver
            // queued, the hardware sent.
            assert_eq!(
                (hardware_rx, hardware_tx),
                (driver_rx, driver_tx),
                "hardware and driver disagree: {report}"
            );
            // Nothing else counted the traffic: no second NIC, no drops.
            assert_eq!(
                delta("vf_hardware_rx") + delta("vf_driver_rx"),
                0,
                "{after:?}"
            );
            assert_eq!(delta("bad_frames_dropped"), 0, "{after:?}");
            assert_alive(&mut guest.qemu, "after the counted exchange");
        })
        .unwrap_or_else(|error| panic!("{error}"));
}

#[test]
fn stats_answers_are_parsed_into_named_counters() {
    let stats = Stats::parse(
        "ok active=Synthetic rx_frames=51 tx_frames=53 synthetic_hardware_rx=51 \
         synthetic_hardware_tx=53",
    )
    .expect("a valid answer");
    assert_eq!(stats.active, "Synthetic");
    assert_eq!(stats.get("synthetic_hardware_tx"), 53);
    let later = Stats::parse("ok active=Synthetic synthetic_hardware_tx=60").expect("valid");
    assert_eq!(later.delta(&stats, "synthetic_hardware_tx"), 7);
    assert_eq!(Stats::parse("error unknown command"), None);
    assert_eq!(Stats::parse("ok active=Vf rx_frames=lots"), None);
    assert_eq!(Stats::parse("ok rx_frames=1"), None);
}
