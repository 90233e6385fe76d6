//! Root only: the `echo` app's failover bond (igbvf VF + virtio-net) on a bridge with two taps
//! in a network namespace the test creates (10.77.0.0/24; virtio-net on one tap, the igb PF
//! whose VF the guest creates on the other). One TCP stream keeps flowing, checked byte for byte,
//! while the VF is hot-unplugged, disabled or loses its link 20 times; while it is hot-added
//! after a boot without it; while both paths are down; and through a flap storm. The guest's
//! `stats` counters show which path carried the traffic.

#[path = "failover/guest.rs"]
mod guest;

use std::time::{Duration, Instant};

use xtask::bench_failover::{ActivePath, LabStats, Trigger, VF_STABLE, lab_ok, wait_for_stats};

use crate::guest::{
    Guest, STATE_TIMEOUT, VfAtBoot, counter, echo_image, sleep_until, two_tap_topology,
};

/// Removal/restore cycles per trigger.
const CYCLES: u64 = 20;

/// Fails unless the bond switched exactly `(to synthetic, to VF)` times from `before` to `now`.
fn assert_switches(
    guest: &Guest,
    before: &LabStats,
    now: &LabStats,
    wanted: (u64, u64),
    when: &str,
) {
    let since = |name| {
        let (then, current) = (counter(before, name), counter(now, name));
        current.checked_sub(then).unwrap_or_else(|| {
            guest.fail(format!(
                "{when}: {name} went backwards from {then} to {current} (counters must be \
                 monotonic)"
            ))
        })
    };
    let switched = (since("switches_to_synthetic"), since("switches_to_vf"));
    if switched != wanted {
        guest.fail(format!(
            "{when}: the bond switched {} time(s) to synthetic and {} to the VF since the cycle \
             began, expected {} and {} (one switch each way per cycle)\nstats: {}",
            switched.0,
            switched.1,
            wanted.0,
            wanted.1,
            now.summary()
        ));
    }
}

/// Boots with the VF, then removes and restores it [`CYCLES`] times with `trigger` under one
/// stream: the stream never breaks, every byte comes back exactly, and each cycle the bond
/// switches once to the synthetic path and once back, with the stream's traffic on each.
fn survives_removal_cycles(trigger: Trigger, label: &str, seed: u64) {
    let topology = two_tap_topology();
    let elf = echo_image();
    topology
        .run(|| {
            let started = Instant::now();
            let mut guest = Guest::boot(label, elf, VfAtBoot::Present);
            let on_vf = guest.wait_active(ActivePath::Vf, "after boot");
            let stream = guest.stream(seed, "after boot");
            let mut on_vf = guest.wait_traffic_on(ActivePath::Vf, &stream, &on_vf, "after boot");
            let first = on_vf.clone();
            for cycle in 1..=CYCLES {
                let when =
                    |phase: &str| format!("{} cycle {cycle}/{CYCLES}: {phase}", trigger.name());
                // A VF that leaves sooner than 1 s after it came up counts as a flap and
                // doubles the hold-down; these cycles are about orderly switches.
                sleep_until(on_vf.at + VF_STABLE);
                let before = guest.stats(&when("before removal"));
                guest.remove(trigger, &when("removal"));
                let switched = guest.wait_active(ActivePath::Synthetic, &when("after removal"));
                let on_synthetic = guest.wait_traffic_on(
                    ActivePath::Synthetic,
                    &stream,
                    &switched,
                    &when("after removal"),
                );
                guest.restore(trigger, &when("restore"));
                let back = guest.wait_active(ActivePath::Vf, &when("after restore"));
                on_vf =
                    guest.wait_traffic_on(ActivePath::Vf, &stream, &back, &when("after restore"));
                assert_switches(
                    &guest,
                    &before,
                    &on_synthetic,
                    (1, 0),
                    &when("on synthetic"),
                );
                assert_switches(&guest, &before, &on_vf, (1, 1), &when("back on the VF"));
                guest.ok(&when("stream"), stream.check());
            }
            let totals = guest.finish(stream, "after the cycles");
            let last = guest.stats("after the cycles");
            for name in ["switches_to_synthetic", "switches_to_vf"] {
                assert_eq!(
                    counter(&last, name),
                    counter(&first, name) + CYCLES,
                    "{name} over {CYCLES} cycles: {}",
                    last.summary()
                );
            }
            guest.assert_alive("after the cycles");
            eprintln!(
                "{}: {CYCLES} cycles in {:.1} s, {} bytes echoed exactly; {}",
                trigger.name(),
                started.elapsed().as_secs_f64(),
                totals.received,
                last.summary()
            );
        })
        .unwrap_or_else(|error| panic!("{error}"));
}

#[test]
fn vf_hot_unplugged_and_replugged_20_times_under_one_tcp_stream_loses_nothing() {
    survives_removal_cycles(Trigger::HotPlug, "failover hot-plug", 0xA1);
}

#[test]
fn vf_disabled_and_enabled_20_times_under_one_tcp_stream_loses_nothing() {
    survives_removal_cycles(Trigger::VfEnable, "failover vf enable", 0xB2);
}

#[test]
fn vf_link_down_and_up_20_times_under_one_tcp_stream_loses_nothing() {
    survives_removal_cycles(Trigger::VfLink, "failover vf link", 0xC3);
}

#[test]
fn booted_without_a_vf_the_bond_moves_traffic_onto_a_hot_added_one() {
    let topology = two_tap_topology();
    let elf = echo_image();
    topology
        .run(|| {
            let mut guest = Guest::boot("failover late vf", elf, VfAtBoot::Absent);
            let at_boot = guest.stats("after boot");
            if !at_boot.is_active(ActivePath::Synthetic) || counter(&at_boot, "vf_tx") != 0 {
                guest.fail(format!(
                    "with no VF the bond must run on the synthetic path: {}",
                    at_boot.summary()
                ));
            }
            let stream = guest.stream(0xD4, "after boot");
            guest.wait_traffic_on(ActivePath::Synthetic, &stream, &at_boot, "before the VF");
            guest.hot_add_pf("hot-add");
            let on_vf = guest.wait_active(ActivePath::Vf, "after the hot-add");
            let on_vf = guest.wait_traffic_on(ActivePath::Vf, &stream, &on_vf, "after the hot-add");
            assert_eq!(
                counter(&on_vf, "switches_to_vf"),
                counter(&at_boot, "switches_to_vf") + 1,
                "one switch onto the new VF: {}",
                on_vf.summary()
            );
            let totals = guest.finish(stream, "after the hot-add");
            guest.assert_alive("after the hot-add");
            eprintln!(
                "late VF: {} bytes echoed exactly; {}",
                totals.received,
                on_vf.summary()
            );
        })
        .unwrap_or_else(|error| panic!("{error}"));
}

/// How long the stream must not move for the traffic to count as stalled.
const STALL_QUIET: Duration = Duration::from_millis(2500);

#[test]
fn vf_removed_while_the_synthetic_link_is_down_stalls_then_resumes_on_synthetic() {
    let topology = two_tap_topology();
    let elf = echo_image();
    topology
        .run(|| {
            let mut guest = Guest::boot("failover no path", elf, VfAtBoot::Present);
            let on_vf = guest.wait_active(ActivePath::Vf, "after boot");
            let stream = guest.stream(0xE5, "after boot");
            let on_vf = guest.wait_traffic_on(ActivePath::Vf, &stream, &on_vf, "after boot");
            sleep_until(on_vf.at + VF_STABLE);

            guest.set_synthetic_link(false, "synthetic link down");
            // The VF still carries the stream while only the synthetic link is down.
            let vf_alone = guest.stats("synthetic link down");
            guest.wait_traffic_on(ActivePath::Vf, &stream, &vf_alone, "synthetic link down");

            guest.remove(
                Trigger::HotPlug,
                "VF unplugged with the synthetic link down",
            );
            // Data already in flight may still trickle in; then nothing can pass.
            let deadline = Instant::now() + STATE_TIMEOUT;
            let (mut last, mut since) = (stream.received(), Instant::now());
            while since.elapsed() < STALL_QUIET {
                if Instant::now() > deadline {
                    guest.fail(format!(
                        "with no path left, echoed data kept arriving ({} bytes)",
                        stream.received()
                    ));
                }
                std::thread::sleep(Duration::from_millis(50));
                if stream.received() != last {
                    (last, since) = (stream.received(), Instant::now());
                }
            }
            guest.ok("while stalled", stream.check());
            let stalled = guest.stats("while stalled");
            eprintln!(
                "no path: stalled at {last} echoed bytes ({} sent); {}",
                stream.sent(),
                stalled.summary()
            );

            guest.set_synthetic_link(true, "synthetic link up");
            guest.ok(
                "after the synthetic link came back",
                stream.wait_for_received(last + 64 * 1024, STATE_TIMEOUT),
            );
            let resumed = guest.wait_active(ActivePath::Synthetic, "synthetic link up");
            let resumed = guest.wait_traffic_on(
                ActivePath::Synthetic,
                &stream,
                &resumed,
                "synthetic link up",
            );
            // And the VF can come back after the double failure.
            guest.restore(Trigger::HotPlug, "VF re-plugged");
            let back = guest.wait_active(ActivePath::Vf, "VF re-plugged");
            guest.wait_traffic_on(ActivePath::Vf, &stream, &back, "VF re-plugged");
            let totals = guest.finish(stream, "after the stall");
            guest.assert_alive("after the stall");
            eprintln!(
                "no path: {} bytes echoed exactly; resumed with {}",
                totals.received,
                resumed.summary()
            );
        })
        .unwrap_or_else(|error| panic!("{error}"));
}

/// Disable/enable pairs in the flap storm.
const STORM_FLAPS: usize = 10;

#[test]
fn after_a_flap_storm_of_ten_vf_disable_enable_pairs_the_bond_works_and_returns_to_the_vf() {
    let topology = two_tap_topology();
    let elf = echo_image();
    topology
        .run(|| {
            let mut guest = Guest::boot("failover flap storm", elf, VfAtBoot::Present);
            let on_vf = guest.wait_active(ActivePath::Vf, "after boot");
            let stream = guest.stream(0xF6, "after boot");
            let on_vf = guest.wait_traffic_on(ActivePath::Vf, &stream, &on_vf, "after boot");
            sleep_until(on_vf.at + VF_STABLE);
            let before = guest.stats("before the storm");
            let lab = guest.lab();
            let storm_start = Instant::now();
            for flap in 1..=STORM_FLAPS {
                for command in ["vf disable", "vf enable"] {
                    guest.ok(
                        &format!("storm flap {flap}: {command}"),
                        lab_ok(&lab, command),
                    );
                }
            }
            let storm = storm_start.elapsed();
            guest.ok("right after the storm", stream.check());
            let settled = guest.ok(
                "after the storm: waiting for the VF to be active again",
                wait_for_stats(&lab, "active=Vf after the storm", STATE_TIMEOUT, |stats| {
                    stats.is_active(ActivePath::Vf)
                }),
            );
            let settled_after = settled.at - storm_start;
            let after = guest.wait_traffic_on(ActivePath::Vf, &stream, &settled, "after the storm");
            let totals = guest.finish(stream, "after the storm");
            guest.assert_alive("after the storm");
            let last_return = guest
                .qemu
                .serial_lines()
                .into_iter()
                .rfind(|line| line.contains("bond: switch synthetic -> vf"))
                .unwrap_or_default();
            eprintln!(
                "flap storm: {STORM_FLAPS} disable/enable pairs in {:.2} s, back on the VF {:.2} s \
                 after the storm began; {} bytes echoed exactly; switches during and after: {} to \
                 synthetic, {} to VF; last return: {}",
                storm.as_secs_f64(),
                settled_after.as_secs_f64(),
                totals.received,
                counter(&after, "switches_to_synthetic")
                    .saturating_sub(counter(&before, "switches_to_synthetic")),
                counter(&after, "switches_to_vf")
                    .saturating_sub(counter(&before, "switches_to_vf")),
                last_return.trim()
            );
        })
        .unwrap_or_else(|error| panic!("{error}"));
}
