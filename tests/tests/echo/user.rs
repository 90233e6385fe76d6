//! Rootless: the echo app on QEMU user-mode networking, reached through a host port forward.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use tandem_tests::topology::free_loopback_port;

use crate::clients::{Arrival, StalledClient, concurrent_round_trips, reset_client, udp_sweep};
use crate::guest::{assert_alive, assert_no_failures, on_user_network};

/// Largest UDP payload in one 1500-byte IPv4 packet.
pub const MAX_UDP_PAYLOAD: usize = 1500 - 20 - 8;
/// UDP tries per size that may go unanswered (retried) before the sweep fails: user-mode
/// networking should lose none, so this only absorbs a rare hiccup.
pub const UDP_LOSS_ALLOWANCE: usize = 3;

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

fn forwarded_port() -> u16 {
    free_loopback_port().unwrap_or_else(|error| panic!("no free loopback port: {error}"))
}

#[test]
fn sixty_four_concurrent_tcp_clients_get_one_mib_each_back_exactly() {
    const CLIENTS: usize = 64;
    const BYTES: usize = 1 << 20;
    let port = forwarded_port();
    let mut qemu = on_user_network("echo tcp64", port);
    let started = Instant::now();
    // All 64 are connected (one at a time: see `Arrival::OneAtATime`) before any sends its
    // mebibyte, so the transfers really run at once.
    let failures = concurrent_round_trips(
        loopback(port),
        &Arrival::one_at_a_time(),
        CLIENTS,
        BYTES,
        0x7CB_0064,
        started + Duration::from_secs(120),
    );
    eprintln!(
        "{CLIENTS} clients x {BYTES} bytes echoed in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert_no_failures(&qemu, "64 concurrent 1 MiB TCP echoes", &failures);
    assert_alive(&mut qemu, "after 64 TCP clients");
}

#[test]
fn udp_datagrams_of_every_size_from_1_to_1472_come_back_intact() {
    let port = forwarded_port();
    let mut qemu = on_user_network("echo udp", port);
    let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("binding a UDP socket");
    socket.connect(loopback(port)).expect("connecting it");
    let started = Instant::now();
    let sweep = udp_sweep(
        &socket,
        1..=MAX_UDP_PAYLOAD,
        0x0DD_5EED,
        4,
        Duration::from_secs(2),
    );
    eprintln!(
        "UDP sweep in {:.1} s: {sweep:?}",
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
            "{} datagrams lost (more than {UDP_LOSS_ALLOWANCE}) on user-mode networking",
            sweep.lost
        ));
    }
    assert_no_failures(&qemu, "UDP size sweep", &failures);
    assert_eq!(sweep.echoed, MAX_UDP_PAYLOAD);
    assert_alive(&mut qemu, "after the UDP sweep");
}

#[test]
fn resetting_and_non_reading_clients_do_not_disturb_the_others() {
    /// More than the guest's 128 connections per listener, so leaked resets would show.
    const RESETS: usize = 160;
    const RESET_THREADS: usize = 4;
    let port = forwarded_port();
    let address = loopback(port);
    let mut qemu = on_user_network("echo rst+stall", port);
    let deadline = Instant::now() + Duration::from_secs(150);
    let arrival = Arrival::one_at_a_time();

    // A client that sends and never reads: its writes must block (the guest stops reading
    // it) long before the guest's 64 MiB of memory could have been used for it.
    let stalled = StalledClient::start(address, &arrival, 0x57A1, Duration::from_secs(3), 64 << 20)
        .unwrap_or_else(|error| panic!("non-reading client: {error}\n{}", qemu.diagnostics()));
    eprintln!("non-reading client blocked after {} bytes", stalled.sent());

    // While it stays stalled: clients that reset (half right after their first echo, half
    // with 256 KiB in flight and only 16 KiB read back), and clients that must get their
    // bytes back exactly.
    let resetting: Vec<_> = (0..RESET_THREADS)
        .map(|thread| {
            let arrival = arrival.clone();
            std::thread::spawn(move || {
                (0..RESETS / RESET_THREADS)
                    .filter_map(|round| {
                        let (send, read) = if round % 2 == 0 {
                            (64, 64)
                        } else {
                            (256 * 1024, 16 * 1024)
                        };
                        let seed = (thread * 1000 + round) as u64;
                        reset_client(address, &arrival, send, read, seed)
                            .err()
                            .map(|error| format!("resetting client {thread}/{round}: {error}"))
                    })
                    .collect::<Vec<String>>()
            })
        })
        .collect();
    let mut failures = concurrent_round_trips(address, &arrival, 8, 1 << 20, 0xB0B, deadline);
    for thread in resetting {
        failures.extend(
            thread
                .join()
                .unwrap_or_else(|_| vec!["reset thread panicked".to_string()]),
        );
    }
    assert_no_failures(&qemu, "echo beside resetting clients", &failures);

    // 160 resets exceed the guest's 128 connections per listener, so unreclaimed ones would
    // already have failed the later resetting clients. New clients are still served, and the
    // stalled client, reading at last, gets all its bytes back.
    let after = concurrent_round_trips(address, &arrival, 16, 256 * 1024, 0xAF7E, deadline);
    assert_no_failures(&qemu, "echo after the resets", &after);
    if let Err(error) = stalled.drain(deadline) {
        panic!(
            "the non-reading client, reading at last: {error}\n{}",
            qemu.diagnostics()
        );
    }
    assert_alive(&mut qemu, "after resets and a stalled client");
}
