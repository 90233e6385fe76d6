//! Target `virtio-net`: the virtio-net driver against the fake device turned hostile — device
//! configuration and feature answers, ISR and status reads replaced by fuzzer words, used-ring
//! entries with any id and length, received frames with any virtio-net header, link, announce,
//! reset and removal events in any order.

use net_device::{MacAddress, NetDevice, TxMeta};
use netvsc_fallback::fake::{FakeDeviceConfig, FakeDmaAllocator, FakeVirtioNet};
use netvsc_fallback::{
    Features, MsixVectors, NetHeaderFlags, VirtioNet, VirtioNetConfig, VirtioNetHeader,
    VirtioPciRegions,
};

use crate::engine::{Input, Outcome, Steps, Target, check, monotonic};
use crate::frames::{self, OUR_MAC};
use crate::hostile::{Hostile, Script};
use crate::targets::common::{StatsWatch, drain, is_up};

/// Operations per case.
const MAX_OPERATIONS: usize = 48;
const MS: u64 = 1_000_000;

fn counters(
    driver: &VirtioNet<Hostile<netvsc_fallback::fake::FakeWindow>, FakeDmaAllocator>,
) -> [(&'static str, u64); 8] {
    let c = driver.counters();
    [
        ("tx_bad_completions", c.tx_bad_completions),
        ("tx_notifications", c.tx_notifications),
        ("rx_notifications", c.rx_notifications),
        ("rx_merged_frames", c.rx_merged_frames),
        ("device_reset_requests", c.device_reset_requests),
        ("initializations", c.initializations),
        ("announce_requests", c.announce_requests),
        ("control_errors", c.control_errors),
    ]
}

fn run(input: &mut Input, steps: &mut Steps) -> Outcome {
    let defaults = FakeDeviceConfig::default();
    let feature_mask = input.u64();
    let device_config = FakeDeviceConfig {
        features: Features::from_bits_retain(
            defaults.features.bits() & !(feature_mask & feature_mask.rotate_left(17)),
        ),
        queue_max_size: [256, 256, 64, 0, 1, 3, 32768, input.u16()][input.below(8)],
        control_queue_max_size: [64, 64, 0, 1, input.u16()][input.below(5)],
        msix_table_size: input.below(5) as u16,
        mtu: [1500, 1500, 9000, 68, 0, input.u16()][input.below(6)],
        link_up: input.below(8) != 7,
        reset_delay_reads: input.below(4) as u32,
        reset_never_completes: input.below(32) == 31,
        reject_features: input.below(32) == 31,
        mac: MacAddress(OUR_MAC),
    };
    let driver_config = VirtioNetConfig {
        rx_queue_size: 64,
        tx_queue_size: 64,
        tx_pool_slots: 64,
        msix: input.bool().then_some(MsixVectors {
            rx: 0,
            tx: 1,
            config: 2,
        }),
        guest_tso: input.bool(),
        complete_partial_checksums: input.bool(),
        ..VirtioNetConfig::default()
    };
    let rate = input.u8();
    // Mostly the device turns hostile once the driver runs (deeper states); sometimes at once.
    let hostile_init = input.below(4) == 3;
    let script_bytes = input.bytes(256);
    let script = Script::new(script_bytes, if hostile_init { rate } else { 0 });
    let device = FakeVirtioNet::new(device_config);
    let honest = device.regions();
    let regions = VirtioPciRegions {
        common: Hostile::new(honest.common, &script),
        notify: Hostile::new(honest.notify, &script),
        notify_off_multiplier: honest.notify_off_multiplier,
        isr: Hostile::new(honest.isr, &script),
        device: Hostile::new(honest.device, &script),
    };
    let allocator = FakeDmaAllocator::new();
    let driver = VirtioNet::new(regions, allocator.clone(), driver_config);
    steps.observe(script.borrow().reads())?;
    let Ok(mut driver) = driver else {
        check(allocator.live_regions() == 0, || {
            format!(
                "failed initialisation kept {} DMA regions",
                allocator.live_regions()
            )
        })?;
        return Ok(());
    };
    script.borrow_mut().set_rate(rate);
    let mut watch = StatsWatch::new(&driver);
    let mut counters_before = counters(&driver);
    let mut now = 0u64;
    let mut ring_tampered = false;
    let mut gone = false;
    for _ in 0..MAX_OPERATIONS {
        if input.is_empty() {
            break;
        }
        now += u64::from(input.u16()) * 1_000;
        let operation = input.below(12);
        if crate::engine::tracing() {
            eprintln!("op {operation} at {now}: link {:?}", driver.link_state());
        }
        match operation {
            0 | 1 => {
                let header = VirtioNetHeader {
                    flags: NetHeaderFlags::from_bits_retain(input.u8()),
                    gso_type: [0, 0, 1, 3, 4, 0x81, input.u8()][input.below(7)],
                    header_len: input.u16(),
                    gso_size: input.u16(),
                    csum_start: [34, 14, 0, 0xffff, input.u16()][input.below(5)],
                    csum_offset: [16, 6, 0, 0xffff, input.u16()][input.below(5)],
                    num_buffers: [0, 0, 1, 2, 0xffff, input.u16()][input.below(6)],
                };
                let frame = frames::hostile_frame(input);
                let result = device.inject_rx_frame_with_header(header, &frame);
                if crate::engine::tracing() {
                    eprintln!("inject {header:?} {frame:02x?}: {result:?}");
                }
            }
            2 => {
                let queue = input.below(3) as u16;
                let id = [0, 1, 63, 64, 65535, u32::MAX, input.u32()][input.below(7)];
                let len = [0, 1, 12, 2048, 65535, u32::MAX, input.u32()][input.below(7)];
                if device.inject_used_raw(queue, id, len).is_ok() {
                    ring_tampered = true;
                }
            }
            3 | 4 => driver.poll(now),
            5 | 6 => {
                let budget = input.below(80);
                let (frames, count) = drain(&mut driver, budget);
                check(count == frames.len() && count <= budget, || {
                    format!(
                        "receive({budget}) returned {count} for {} frames",
                        frames.len()
                    )
                })?;
                for frame in &frames {
                    check(frame.len() <= 65_550, || {
                        format!("{}-byte frame handed up", frame.len())
                    })?;
                }
            }
            7 => {
                let frame = frames::hostile_frame(input);
                let meta = TxMeta::default();
                if !frame.is_empty() {
                    let _ = driver.transmit(frame.len(), &mut |buffer| {
                        buffer.copy_from_slice(&frame);
                        meta
                    });
                }
                driver.flush();
                let _ = device.take_tx_frames();
            }
            8 => match input.below(6) {
                0 => device.set_link(input.bool()),
                1 => device.request_announce(),
                2 => device.set_needs_reset(),
                3 => {
                    if input.below(4) == 0 {
                        gone = true;
                        if input.bool() {
                            device.unplug()
                        } else {
                            device.unplug_reading_zero()
                        }
                    }
                }
                4 => device.set_reset_behaviour(input.below(4) as u32, input.below(16) == 0),
                _ => {
                    if driver.take_announce_request() {
                        driver.announce_done();
                    }
                }
            },
            9 => {
                let _ = driver.handle_intx();
            }
            10 => driver.handle_msix_interrupt(input.below(4) as u16),
            _ => {
                let _ = driver.reinitialize();
            }
        }
        steps.count(1)?;
        steps.observe(script.borrow().reads())?;
        watch.check(&driver)?;
        let counters_now = counters(&driver);
        monotonic("virtio-net", &counters_before, &counters_now)?;
        counters_before = counters_now;
    }
    // The device behaves from now on: a driver that still reports link must carry a good frame.
    script.borrow_mut().stop();
    device.set_reset_behaviour(0, false);
    if gone || ring_tampered {
        return Ok(());
    }
    for _ in 0..3 {
        now += 50 * MS;
        driver.poll(now);
        let _ = drain(&mut driver, 256);
    }
    if !is_up(&driver) {
        return Ok(());
    }
    // A lying num_buffers may make the driver merge the next buffer into a frame it still
    // assembles (the spec gives it no way to tell), so the good frame goes three times.
    let good = frames::good_udp_frame(7, b"still accepted");
    let mut received = Vec::new();
    for _ in 0..3 {
        if device.inject_rx_frame(&good).is_err() {
            return Ok(());
        }
        now += MS;
        driver.poll(now);
        received.extend(drain(&mut driver, 256).0);
    }
    if crate::engine::tracing() {
        eprintln!(
            "received {received:02x?}; device holds {} rx buffers, queue size {}; {:?}; {:?}",
            device.available_rx_buffers(),
            device.queue_size(0),
            driver.counters(),
            driver.stats()
        );
    }
    check(received.contains(&good), || {
        format!(
            "link up but a good frame was not delivered ({} other frames)",
            received.len()
        )
    })?;
    steps.observe(script.borrow().reads())?;
    watch.check(&driver)
}

fn seeds() -> Vec<Vec<u8>> {
    let mut plain = vec![0u8; 8];
    plain.extend_from_slice(&[0, 0, 0, 0, 0, 1, 0, 0, 0, 0]);
    plain.push(0); // rate: never tamper
    plain.push(0); // hostile after initialisation only
    plain.push(0); // empty script
    let mut operations = Vec::new();
    for _ in 0..6 {
        operations.extend_from_slice(&[0x10, 0]);
        operations.push(0);
        operations.extend_from_slice(&[0; 13]);
        operations.extend_from_slice(&frames::tcp_frame_seed());
        operations.extend_from_slice(&[0x10, 0, 3, 0x10, 0, 5, 64]);
    }
    let mut hostile = plain.clone();
    hostile[18] = 64;
    hostile[20] = 200;
    hostile.extend((0..200u32).map(|i| (i * 37) as u8));
    plain.extend_from_slice(&operations);
    hostile.extend_from_slice(&operations);
    vec![plain, hostile]
}

/// The registration.
pub const TARGET: Target = Target {
    name: "virtio-net",
    about: "virtio-net driver vs hostile registers, used ring, net headers, link/reset/removal",
    default_cases: 50_000,
    max_input_len: 4096,
    memory_bound: 4 * 1024 * 1024,
    // A reset that never completes costs the driver's reset_poll_limit (100 000) status reads;
    // a case may see a few of those, plus a few thousand other register reads.
    step_bound: 4 * 100_000 + 50_000,
    seeds,
    run,
};
