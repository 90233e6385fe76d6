//! Target `igbvf`: the igbvf driver against the fake 82576 turned hostile — every register read
//! may answer fuzzer data, receive write-backs carry any length and status/error bits (or lack
//! EOP), the PF sends any mailbox words, resets, removal, link and counter values in any order.

use net_device::{MacAddress, NetDevice, TxMeta};
use vf_driver::fake::{
    FakeIgb, FakeVfRegisters, RxWriteBackOverride, ScriptedPf, TestHost, UnplugStyle,
};
use vf_driver::fake_dma::FakeDmaAllocator;
use vf_driver::{Config, IgbVf, regs};

use crate::engine::{Input, Outcome, Steps, Target, check, monotonic};
use crate::frames::{self, OUR_MAC};
use crate::hostile::{Hostile, Script};
use crate::targets::common::{StatsWatch, drain, is_up};

const MAX_OPERATIONS: usize = 48;
const MS: u64 = 1_000_000;
const COUNTERS: [usize; 5] = [
    regs::VFGPRC,
    regs::VFGPTC,
    regs::VFGORC,
    regs::VFGOTC,
    regs::VFMPRC,
];

type Vf = IgbVf<Hostile<FakeVfRegisters>, FakeDmaAllocator>;

fn counters(vf: &Vf) -> Vec<(&'static str, u64)> {
    let c = vf.driver_counters();
    vec![
        ("messages_sent", c.mailbox.messages_sent),
        ("messages_received", c.mailbox.messages_received),
        ("acks_received", c.mailbox.acks_received),
        ("resets_seen", c.mailbox.resets_seen),
        ("timeouts", c.mailbox.timeouts),
        ("initializations", c.initializations),
        ("pf_resets", c.pf_resets),
        ("pf_not_clear_to_send", c.pf_not_clear_to_send),
        ("pf_control_messages", c.pf_control_messages),
        ("link_changes", c.link_changes),
        ("tx_hangs", c.tx_hangs),
        ("rx_bad_length", c.rx_bad_length),
        ("rx_frame_errors", c.rx_frame_errors),
        ("rx_multi_descriptor", c.rx_multi_descriptor),
        ("rx_unposted_written", c.rx_unposted_written),
        ("removals_detected", c.removals_detected),
    ]
}

fn hardware(vf: &mut Vf) -> Vec<(&'static str, u64)> {
    let h = vf.hardware_stats();
    vec![
        ("rx_packets", h.rx_packets),
        ("tx_packets", h.tx_packets),
        ("rx_bytes", h.rx_bytes),
        ("tx_bytes", h.tx_bytes),
        ("rx_multicast", h.rx_multicast),
    ]
}

fn run(input: &mut Input, steps: &mut Steps) -> Outcome {
    let fake = FakeIgb::with_scripted_pf(Some(MacAddress(OUR_MAC)));
    let rate = input.u8();
    // Mostly the device turns hostile once the driver runs (deeper states); sometimes at once.
    let hostile_init = input.below(4) == 3;
    let script = Script::new(input.bytes(256), if hostile_init { rate } else { 0 });
    let config = Config {
        name: "igbvf fuzz".into(),
        rx_ring_size: 16,
        tx_ring_size: 16,
        mailbox_timeout_ns: 2 * MS,
        offloads: input.below(4) != 3,
        ..Config::default()
    };
    let host = TestHost::new(1_000);
    let clock = host.clock();
    let started = IgbVf::new(
        Hostile::new(fake.vf_registers(0), &script),
        FakeDmaAllocator::new(),
        Box::new(host),
        config,
    );
    steps.observe(script.borrow().reads())?;
    let Ok(mut vf) = started else {
        return Ok(());
    };
    script.borrow_mut().set_rate(rate);
    let mut watch = StatsWatch::new(&vf);
    let mut counters_before = counters(&vf);
    let mut hardware_before = hardware(&mut vf);
    let mut broken = false;
    let mut explicit_reinitializations = 0;
    for _ in 0..MAX_OPERATIONS {
        if input.is_empty() {
            break;
        }
        clock.set(clock.get() + u64::from(input.u16()) * 1_000);
        let operation = input.below(12);
        if crate::engine::tracing() {
            eprintln!(
                "op {operation} at {}: link {:?}, {} reads",
                clock.get(),
                vf.link_state(),
                script.borrow().reads()
            );
        }
        match operation {
            0 | 1 => {
                let tweak = match input.below(4) {
                    0 => RxWriteBackOverride::default(),
                    _ => RxWriteBackOverride {
                        length: input
                            .bool()
                            .then(|| [0, 1, 14, 60, 2048, 0xffff, input.u16()][input.below(7)]),
                        extra_status: input.u32()
                            & [0, 0xff, 0xfff0_0000, u32::MAX][input.below(4)],
                        omit_end_of_packet: input.below(4) == 3,
                    },
                };
                let frame = frames::hostile_frame(input);
                let _ = fake.inject_rx_frame_with(0, &frame, tweak);
            }
            2 => {
                let count = input.below(regs::MAILBOX_WORDS + 1);
                let words: Vec<u32> = (0..count).map(|_| input.u32()).collect();
                fake.pf_send(0, &words);
            }
            3 | 4 => vf.poll(clock.get()),
            5 | 6 => {
                let budget = input.below(40);
                let (received, count) = drain(&mut vf, budget);
                check(count == received.len() && count <= budget, || {
                    format!(
                        "receive({budget}) returned {count} for {} frames",
                        received.len()
                    )
                })?;
            }
            7 => {
                let frame = frames::hostile_frame(input);
                if !frame.is_empty() {
                    let _ = vf.transmit(frame.len(), &mut |buffer| {
                        buffer.copy_from_slice(&frame);
                        TxMeta::default()
                    });
                }
                vf.flush();
                let _ = fake.take_transmitted(0);
            }
            8 => match input.below(9) {
                0 => fake.set_cable(input.bool()),
                1 => {
                    broken = true;
                    fake.unplug(if input.bool() {
                        UnplugStyle::Zeros
                    } else {
                        UnplugStyle::AllOnes
                    });
                }
                2 => fake.signal_pf_reset_done(),
                3 => {
                    broken = true;
                    fake.hold_pf_in_reset(input.bool());
                }
                4 => {
                    broken = true;
                    fake.set_scripted_pf(
                        [
                            ScriptedPf::NeverAnswers,
                            ScriptedPf::NacksReset,
                            ScriptedPf::AcksWithoutReply,
                        ][input.below(3)],
                    );
                }
                5 => fake.write_back_unposted_rx(0),
                6 => fake.stall_tx(0, input.bool()),
                7 => fake.pf_forget_vf(0),
                _ => fake.set_counter(0, COUNTERS[input.below(COUNTERS.len())], input.u32()),
            },
            9 => vf.handle_interrupt(),
            10 => {
                let now = hardware(&mut vf);
                monotonic("igbvf hardware", &hardware_before, &now)?;
                hardware_before = now;
            }
            _ => {
                // Each costs up to a reset timeout of reads when the PF is stuck: two at most.
                if explicit_reinitializations < 2 {
                    explicit_reinitializations += 1;
                    let _ = vf.reinitialize();
                }
            }
        }
        steps.count(1)?;
        steps.observe(script.borrow().reads())?;
        watch.check(&vf)?;
        let now = counters(&vf);
        monotonic("igbvf driver", &counters_before, &now)?;
        counters_before = now;
    }
    script.borrow_mut().stop();
    if broken {
        return Ok(());
    }
    fake.stall_tx(0, false);
    fake.set_cable(true);
    for _ in 0..4 {
        clock.set(clock.get() + 50 * MS);
        vf.poll(clock.get());
        let _ = drain(&mut vf, 64);
    }
    if !is_up(&vf) {
        return Ok(());
    }
    let good = frames::good_udp_frame(7, b"still accepted");
    let mut received = Vec::new();
    for _ in 0..3 {
        if !fake.inject_rx_frame(0, &good) {
            return Ok(());
        }
        clock.set(clock.get() + MS);
        vf.poll(clock.get());
        received.extend(drain(&mut vf, 64).0);
    }
    check(received.contains(&good), || {
        format!(
            "link up but a good frame was not delivered ({} other frames)",
            received.len()
        )
    })?;
    steps.observe(script.borrow().reads())?;
    watch.check(&vf)
}

fn seeds() -> Vec<Vec<u8>> {
    let mut operations = Vec::new();
    for _ in 0..6 {
        operations.extend_from_slice(&[0x10, 0, 0, 0]);
        operations.extend_from_slice(&frames::tcp_frame_seed());
        operations.extend_from_slice(&[0x10, 0, 3, 0x10, 0, 5, 20]);
    }
    operations.extend_from_slice(&[0, 0, 2, 2, 0, 1, 0, 0, 0, 0, 0, 0x80]);
    let mut plain = vec![0, 0, 0, 0];
    plain.extend_from_slice(&operations);
    let mut hostile = vec![64, 0, 200];
    hostile.extend((0..200u32).map(|i| (i * 41) as u8));
    hostile.push(0);
    hostile.extend_from_slice(&operations);
    vec![plain, hostile]
}

/// The registration.
pub const TARGET: Target = Target {
    name: "igbvf",
    about: "igbvf driver vs hostile registers, RX write-backs, PF mailbox words, resets, removal",
    default_cases: 50_000,
    max_input_len: 4096,
    memory_bound: 2 * 1024 * 1024,
    // A reset the PF never completes costs the driver reset_timeout_ns (50 ms) of polling at
    // two reads per microsecond of the test clock: 100 000 reads. A case has up to two explicit
    // re-initialisations and the automatic ones its back-off allows over at most 48 × 65 ms.
    step_bound: 8 * 100_000 + 50_000,
    seeds,
    run,
};
