//! Root only: the host's stock iperf3 client against the `iperf` app (in the README's 32 MiB)
//! on a bridge in a network namespace the test creates (10.77.0.0/24). Every client mode
//! completes over the synthetic path (virtio-net alone) and over the VF path (the igbvf VF
//! alone, the guest playing the igb PF's driver); a busy server, a garbage connection and a
//! killed client leave the app serving; and a 10-second TCP test runs on while the bond loses
//! its VF to a hot-unplug and gets it back from a re-plug.

#[path = "iperf/client.rs"]
mod client;
// Only the two-tap topology and its names are used from the failover tests' guest module.
#[allow(dead_code)]
#[path = "failover/guest.rs"]
mod failover_guest;
#[path = "iperf/guest.rs"]
mod guest;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use tandem_tests::image;
use tandem_tests::topology::{BridgedTap, GUEST_ADDRESS, TAP};
use xtask::bench_failover::{ActivePath, LabStats, Trigger, VF_STABLE, lab_stats, wait_for_active};
use xtask::bench_iperf::{IPERF_PORT, PARAMETERS_MARK, TEST_ABORTED_LINE, TEST_DONE_LINE};
use xtask::machine::NetPaths;

use crate::client::{MODES, Mode, REFUSALS, check_throughput};
use crate::failover_guest::{PF_TAP, STATE_TIMEOUT, counter, sleep_until, two_tap_topology};
use crate::guest::{CLIENT_GRACE, IperfGuest};

/// The iperf image, built before entering a namespace (cargo may need the network).
fn iperf_image() -> PathBuf {
    image("iperf")
}

/// A namespace with one tap on the bridge.
fn one_tap_topology() -> BridgedTap {
    BridgedTap::create().unwrap_or_else(|error| panic!("{error}"))
}

/// Runs every mode and every refusal against `guest`.
fn all_modes(guest: &mut IperfGuest) {
    for mode in MODES {
        guest.run_mode(mode);
    }
    for refusal in REFUSALS {
        guest.run_refusal(refusal);
    }
}

/// A second client while a test runs is told the server is busy; the first completes.
fn busy_server_refuses_a_second_client(guest: &mut IperfGuest) {
    let first = guest.spawn_client("-t 5");
    let started = Instant::now();
    guest.wait_line(PARAMETERS_MARK, "the first client's test starting");
    sleep_until(started + Duration::from_millis(1500));
    let second = guest.client("-t 1", 1);
    if second.exit_code != Some(1) || !second.text().contains("busy") {
        guest.fail(format!(
            "a second client during a test must fail with exit code 1 and \"busy\"\n{second}"
        ));
    }
    guest.wait_line("busy; refused the connection", "the app's busy refusal");
    let first = guest.ok(
        "the first client",
        first.finish(Duration::from_secs(5) + CLIENT_GRACE),
    );
    if !first.succeeded() {
        guest.fail(format!(
            "the first client must complete despite the second\n{first}"
        ));
    }
    if let Err(problem) = check_throughput(&first.stdout, &[None]) {
        guest.fail(format!("the first client: {problem}\n{first}"));
    }
    guest.wait_line(TEST_DONE_LINE, "the first client's test");
}

/// A connection that sends garbage instead of a cookie is dropped; the next test runs.
fn garbage_connection_is_dropped(guest: &mut IperfGuest) {
    let peer = SocketAddr::from((GUEST_ADDRESS, IPERF_PORT));
    let mut stream = guest.ok(
        "connecting for the garbage",
        TcpStream::connect_timeout(&peer, Duration::from_secs(30))
            .map_err(|error| xtask::Error::io("connecting", error)),
    );
    guest.ok(
        "sending garbage",
        stream
            .write_all(b"garbage\n")
            .map_err(|error| xtask::Error::io("writing", error)),
    );
    guest.wait_line(
        "ended in the cookie phase",
        "the app's rejection of the garbage",
    );
    // The app closes the connection after its state byte; read to the end (or a reset).
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    let mut rest = Vec::new();
    let _ = stream.read_to_end(&mut rest);
    drop(stream);
    guest.run_mode(&Mode::plain("-t 1"));
}

/// A client killed mid-test (SIGKILL) aborts the test; the next test runs.
fn killed_client_aborts_its_test(guest: &mut IperfGuest) {
    let client = guest.spawn_client("-t 10 -R");
    guest.wait_line(PARAMETERS_MARK, "the doomed client's test starting");
    std::thread::sleep(Duration::from_secs(2));
    let killed = guest.ok("killing the client", client.kill());
    let (_, aborted) = guest.wait_line(TEST_ABORTED_LINE, "the app noticing the killed client");
    eprintln!(
        "{}: killed `{}` after {:.1} s; {}",
        guest.vm.qemu.label(),
        killed.command,
        killed.elapsed.as_secs_f64(),
        aborted.trim()
    );
    guest.run_mode(&Mode::plain("-t 1"));
}

#[test]
fn stock_client_completes_every_mode_over_virtio_net_and_survives_busy_garbage_and_kill() {
    let topology = one_tap_topology();
    let elf = iperf_image();
    topology
        .run(|| {
            let started = Instant::now();
            let mut guest = IperfGuest::boot("iperf virtio", &elf, NetPaths::Virtio, &[TAP]);
            all_modes(&mut guest);
            busy_server_refuses_a_second_client(&mut guest);
            garbage_connection_is_dropped(&mut guest);
            killed_client_aborts_its_test(&mut guest);
            guest.assert_alive("after every mode");
            eprintln!(
                "iperf virtio: {} modes, {} refusals, busy/garbage/kill in {:.1} s",
                MODES.len(),
                REFUSALS.len(),
                started.elapsed().as_secs_f64()
            );
        })
        .unwrap_or_else(|error| panic!("{error}"));
}

#[test]
fn stock_client_completes_every_mode_over_the_vf_alone() {
    let topology = one_tap_topology();
    let elf = iperf_image();
    topology
        .run(|| {
            let started = Instant::now();
            let mut guest = IperfGuest::boot("iperf vf", &elf, NetPaths::Vf, &[TAP]);
            let serial = guest.vm.qemu.serial_lines();
            let on_vf_alone = serial
                .iter()
                .any(|line| line.contains("the VF alone carries the interface"))
                && serial
                    .iter()
                    .any(|line| line.contains("net: interface ") && line.contains(" on igbvf "));
            if !on_vf_alone {
                guest.fail("the guest's interface must run on the igbvf VF alone");
            }
            all_modes(&mut guest);
            let stats = guest.ok("stats after the modes", lab_stats(&guest.lab()));
            // The VF alone takes the bond's primary ("synthetic") slot: that slot's driver
            // (igbvf) must have carried all those tests.
            if counter(&stats, "synthetic_driver_rx") < 10_000 || counter(&stats, "vf_rx") != 0 {
                guest.fail(format!(
                    "the VF in the primary slot received too few frames for all those tests: {}",
                    stats.summary()
                ));
            }
            // The guest-to-host modes (-R, --bidir) send large TCP frames that the igb VF
            // segments itself (TSO), none cut up in software.
            if counter(&stats, "synthetic_tx_tso") < 100
                || counter(&stats, "synthetic_tx_soft_segmented") != 0
            {
                guest.fail(format!(
                    "the VF did not segment the large frames itself: {}",
                    stats.summary()
                ));
            }
            // The host's segments arrive MTU-sized on the VF: the bond merged runs of them
            // before smoltcp, and no frame it saw was malformed.
            let merged_frames = counter(&stats, "rx_merged_frames");
            if merged_frames < 100
                || counter(&stats, "rx_segments_merged") < 2 * merged_frames
                || counter(&stats, "rx_merge_refused_malformed") != 0
            {
                guest.fail(format!(
                    "the bond did not merge the VF's received segments: merged frames \
                     {merged_frames}, segments {}, malformed {}; {}",
                    counter(&stats, "rx_segments_merged"),
                    counter(&stats, "rx_merge_refused_malformed"),
                    stats.summary()
                ));
            }
            guest.assert_alive("after every mode");
            eprintln!(
                "iperf vf: {} modes, {} refusals in {:.1} s; {}",
                MODES.len(),
                REFUSALS.len(),
                started.elapsed().as_secs_f64(),
                stats.summary()
            );
        })
        .unwrap_or_else(|error| panic!("{error}"));
}

/// Frames a path must have received during a phase of the hot-plug test for the test's data
/// to count as having moved there.
const MIN_FRAMES_IN_PHASE: u64 = 1000;
/// How long the test runs on each side of an event.
const PHASE: Duration = Duration::from_secs(3);

/// Fails unless counter `name` grew by at least `at_least` from `from` to `to`.
fn assert_grew(
    guest: &IperfGuest,
    from: &LabStats,
    to: &LabStats,
    name: &str,
    at_least: u64,
    when: &str,
) {
    let grown = counter(to, name).saturating_sub(counter(from, name));
    if grown < at_least {
        guest.fail(format!(
            "{when}: {name} grew by {grown}, expected at least {at_least}\nfrom: {}\nto:   {}",
            from.summary(),
            to.summary()
        ));
    }
}

#[test]
fn a_ten_second_tcp_test_runs_on_across_a_vf_hot_unplug_and_replug() {
    let topology = two_tap_topology();
    let elf = iperf_image();
    topology
        .run(|| {
            let mut guest =
                IperfGuest::boot("iperf hot-plug", &elf, NetPaths::Both, &[TAP, PF_TAP]);
            let lab = guest.lab();
            let pf_netdev = guest
                .vm
                .pf_netdev
                .clone()
                .unwrap_or_else(|| guest.fail("no PF netdev with both paths"));
            let on_vf = guest.ok(
                "after boot",
                wait_for_active(&lab, ActivePath::Vf, STATE_TIMEOUT),
            );
            // A VF that leaves sooner than this after coming up counts as a flap.
            sleep_until(on_vf.at + VF_STABLE);

            let mode = Mode {
                parameters: &["time=10"],
                summary: &["tcp reverse=no streams=1 "],
                ..Mode::plain("-t 10")
            };
            let mut client = guest.spawn_client(mode.args);
            let (start_index, parameters) = guest.wait_line(PARAMETERS_MARK, "the test starting");
            let running = Instant::now();
            sleep_until(running + PHASE);
            let before = guest.ok("before the unplug", lab_stats(&lab));

            let result = Trigger::HotPlug.remove(&mut guest.vm.qemu, &lab);
            guest.ok("device_del pf0 (until DEVICE_DELETED)", result);
            let removed = Instant::now();
            let on_synthetic = guest.ok(
                "after the unplug",
                wait_for_active(&lab, ActivePath::Synthetic, STATE_TIMEOUT),
            );
            sleep_until(removed + PHASE);
            let before_replug = guest.ok("before the re-plug", lab_stats(&lab));
            if client.has_exited() {
                guest.fail(format!(
                    "the 10-second test ended {:.1} s after it started, before the re-plug",
                    running.elapsed().as_secs_f64()
                ));
            }
            let result = Trigger::HotPlug.restore(&mut guest.vm.qemu, &lab, &pf_netdev);
            guest.ok("device_add pf0", result);
            let replugged = Instant::now();
            let back = guest.ok(
                "after the re-plug",
                wait_for_active(&lab, ActivePath::Vf, STATE_TIMEOUT),
            );
            let back_after = back.at.saturating_duration_since(replugged);

            let outcome = guest.ok(
                "the 10-second client",
                client.finish(Duration::from_secs(10) + CLIENT_GRACE),
            );
            let summary = guest.check_success(&mode, &outcome, Some(parameters));
            let after = guest.ok("after the test", lab_stats(&lab));

            // The bond switched once each way, and the test's data ran on each path in turn.
            for name in ["switches_to_synthetic", "switches_to_vf"] {
                assert_grew(&guest, &before, &after, name, 1, "over the test");
                if counter(&after, name) != counter(&before, name) + 1 {
                    guest.fail(format!(
                        "{name} must grow by exactly one over the test: {} -> {}",
                        before.summary(),
                        after.summary()
                    ));
                }
            }
            assert_grew(
                &guest,
                &on_synthetic,
                &before_replug,
                "synthetic_rx",
                MIN_FRAMES_IN_PHASE,
                "while the VF was unplugged",
            );
            assert_grew(
                &guest,
                &back,
                &after,
                "vf_rx",
                MIN_FRAMES_IN_PHASE,
                "after the re-plug",
            );

            // On the console: both switches between the test's start and its summary.
            let lines = guest.vm.qemu.serial_lines();
            let position = |needle: &str| {
                lines
                    .iter()
                    .enumerate()
                    .skip(start_index)
                    .find(|(_, line)| line.contains(needle))
                    .map(|(index, _)| index)
            };
            let away = position("bond: switch vf -> synthetic");
            let home = position("bond: switch synthetic -> vf");
            let done = position(TEST_DONE_LINE);
            match (away, home, done) {
                (Some(away), Some(home), Some(done)) if away < home && home < done => {}
                _ => guest.fail(format!(
                    "the console must show the switch to synthetic, then back to the VF, then \
                     the test's summary (line indices {away:?}, {home:?}, {done:?})"
                )),
            }
            guest.assert_alive("after the hot-plug test");
            eprintln!(
                "iperf hot-plug: removed {:.1} s into the test, re-plugged {:.1} s later, VF \
                 active again {:.2} s after device_add; client {:.1} s; {}",
                removed.duration_since(running).as_secs_f64(),
                replugged.duration_since(removed).as_secs_f64(),
                back_after.as_secs_f64(),
                outcome.elapsed.as_secs_f64(),
                summary
                    .split_once(TEST_DONE_LINE)
                    .map_or("", |(_, rest)| rest)
            );
        })
        .unwrap_or_else(|error| panic!("{error}"));
}
