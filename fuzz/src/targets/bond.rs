//! Target `bond`: the failover bond as a state machine fed arbitrary frames on both paths
//! (dedup keys, receive queue, bad-frame drops), arbitrary frames to send (checksum filling,
//! software segmentation and TSO offload of anything that looks like TCP), link, MTU, offload
//! and announce events, VF attach/detach — plus the checksum and announce helpers directly.

use net_device::{LinkState, MacAddress, RxMeta};
use net_stack::fake::{FakeControl, FakeDevice};
use net_stack::{Bond, BondConfig, BondStats, PathStats, announce, checksum};

use crate::engine::{Input, Outcome, Steps, Target, check, monotonic};
use crate::frames::{self, OUR_MAC};
use crate::targets::common::stats_fields;

const MAX_OPERATIONS: usize = 64;
const MS: u64 = 1_000_000;

fn path_fields(prefix: &'static str, stats: &PathStats) -> Vec<(&'static str, u64)> {
    let b = &stats.bond;
    let mut fields = vec![
        (prefix, b.rx_frames),
        ("rx_bytes", b.rx_bytes),
        ("tx_frames", b.tx_frames),
        ("tx_bytes", b.tx_bytes),
        ("tx_errors", b.tx_errors),
        ("tx_offloaded_segmentation", b.tx_offloaded_segmentation),
        ("tx_software_segmentation", b.tx_software_segmentation),
        ("rx_duplicates", b.rx_duplicates),
        ("rx_bad", b.rx_bad),
        ("rx_queue_full", b.rx_queue_full),
        ("rx_ignored", b.rx_ignored),
    ];
    fields.extend(stats_fields(&stats.device));
    fields
}

fn bond_fields(stats: &BondStats) -> Vec<(&'static str, u64)> {
    let mut fields = path_fields("total.rx_frames", &stats.total);
    fields.extend(path_fields("synthetic.rx_frames", &stats.synthetic));
    fields.extend(path_fields("vf_retired.rx_frames", &stats.vf_retired));
    fields.extend([
        ("switches_to_vf", stats.switches_to_vf),
        ("switches_to_synthetic", stats.switches_to_synthetic),
        ("duplicates_dropped", stats.duplicates_dropped),
        ("bad_frames_dropped", stats.bad_frames_dropped),
        ("tx_dropped_no_path", stats.tx_dropped_no_path),
        ("tx_blocked_no_path", stats.tx_blocked_no_path),
        ("announcements_requested", stats.announcements_requested),
        ("dedup_evictions", stats.dedup_evictions),
        ("vf_attaches", stats.vf_attaches),
        ("vf_detaches", stats.vf_detaches),
    ]);
    fields
}

/// Checksum helpers on a hostile frame: no panic, and what `fill` changed verifies.
fn checksum_properties(frame: &[u8]) -> Outcome {
    let _ = checksum::verify(frame);
    let mut filled = frame.to_vec();
    checksum::fill(&mut filled);
    if filled != frame {
        check(checksum::verify(&filled), || {
            format!("frame filled by checksum::fill does not verify: {filled:02x?}")
        })?;
    }
    let mut again = filled.clone();
    checksum::fill(&mut again);
    check(again == filled, || {
        "checksum::fill is not idempotent".to_string()
    })?;
    let mut offload = frame.to_vec();
    if let Some((start, field)) = checksum::prepare_offload(&mut offload) {
        check(
            usize::from(start) + usize::from(field) + 2 <= offload.len(),
            || {
                format!(
                    "offload field {start}+{field} beyond a {}-byte frame",
                    offload.len()
                )
            },
        )?;
    }
    Ok(())
}

/// A frame to send: hostile, sometimes stretched into a large TCP segment (TSO sizes).
fn frame_to_send(input: &mut Input) -> Vec<u8> {
    let mut frame = frames::hostile_frame(input);
    if input.below(4) == 3 && frame.len() > 60 {
        let target = 1500 + input.below(64 * 1024);
        while frame.len() < target {
            let chunk = frame[54..].to_vec();
            frame.extend_from_slice(&chunk);
        }
        frame.truncate(target);
        if frame.len() >= 18 && frame[12..14] == [0x08, 0x00] {
            let total = ((frame.len() - 14).min(65535) as u16).to_be_bytes();
            frame[16..18].copy_from_slice(&total);
        }
        checksum::fill(&mut frame);
    }
    frame
}

fn run(input: &mut Input, steps: &mut Steps) -> Outcome {
    let (synthetic, synthetic_control) = FakeDevice::boxed("synthetic", MacAddress(OUR_MAC));
    let config = BondConfig {
        dedup_slots: 1024,
        rx_queue_frames: 64,
        rx_queue_bytes: 256 * 1024,
        ..BondConfig::default()
    };
    let mut bond = Bond::new(synthetic, 1500, config);
    let mut now = 0u64;
    let mut vf_control: Option<FakeControl> = None;
    let mut before = bond_fields(&bond.stats());
    let mut nonce = 0u32;
    for _ in 0..MAX_OPERATIONS {
        if input.is_empty() {
            break;
        }
        now += u64::from(input.u16()) * 1_000;
        let control = match (&vf_control, input.below(3)) {
            (Some(vf), 2) => vf.clone(),
            _ => synthetic_control.clone(),
        };
        match input.below(12) {
            0..=2 => {
                let frame = frames::hostile_frame(input);
                checksum_properties(&frame)?;
                let meta = RxMeta {
                    checksum_verified: input.below(4) == 3,
                    checksum_partial: input.below(8) == 7,
                };
                control.inject_rx_with(&frame, meta);
            }
            3 | 4 => {
                bond.poll(now);
            }
            5 => {
                for _ in 0..input.below(80) {
                    match bond.pop_rx() {
                        Some(frame) => bond.recycle_rx(frame),
                        None => break,
                    }
                }
            }
            6 => {
                let frame = frame_to_send(input);
                if !frame.is_empty() {
                    let _ = bond.send_frame(&frame);
                }
                bond.flush();
            }
            7 => {
                for frame in control.take_tx() {
                    check(frame.len() <= 65_536 + 18, || {
                        format!("{}-byte frame sent", frame.len())
                    })?;
                }
            }
            8 => match input.below(6) {
                0 => control.set_link(
                    [
                        LinkState::Up,
                        LinkState::Down,
                        LinkState::Resetting,
                        LinkState::Gone,
                    ][input.below(4)],
                ),
                1 => control.set_offloads(
                    input.bool(),
                    [0, 0, 16 * 1024, 65_535, input.below(70_000)][input.below(5)],
                ),
                2 => control.set_mtu([1500, 576, 9000, 68, input.below(10_000)][input.below(5)]),
                3 => control.request_announce(),
                4 => control.set_tx_ring_capacity(input.below(8)),
                _ => {
                    let _ = control.lose_in_flight();
                }
            },
            9 => {
                if vf_control.is_none() {
                    let mac = if input.below(8) == 7 {
                        MacAddress([2, 0, 0, 0, 0, input.u8()])
                    } else {
                        MacAddress(OUR_MAC)
                    };
                    let (vf, handle) = FakeDevice::boxed("vf", mac);
                    if bond.attach_vf(vf, now).is_ok() {
                        vf_control = Some(handle);
                    }
                } else if bond.detach_vf(now).is_some() {
                    vf_control = None;
                }
            }
            10 => {
                if bond.take_announce_request() {
                    let address = [input.u8(), input.u8(), input.u8(), input.u8()];
                    let arp = announce::gratuitous_arp(bond.mac(), address.into());
                    let _ = bond.send_frame(&arp);
                    let mut v6 = [0u8; 16];
                    v6.iter_mut().for_each(|byte| *byte = input.u8());
                    let na = announce::unsolicited_neighbor_advertisement(bond.mac(), v6.into());
                    let _ = bond.send_frame(&na);
                }
            }
            _ => bond.request_announce(),
        }
        steps.count(1)?;
        let after = bond_fields(&bond.stats());
        monotonic("bond", &before, &after)?;
        before = after;
        check(bond.pending_rx() <= 64 + 256, || {
            format!("{} frames queued", bond.pending_rx())
        })?;
    }
    // Healthy again: a fresh, well-formed frame on the synthetic path gets through.
    synthetic_control.set_link(LinkState::Up);
    synthetic_control.set_mtu(1500);
    while bond.pop_rx().is_some() {}
    nonce += 1;
    let good = frames::good_udp_frame(7, format!("still accepted {nonce}").as_bytes());
    synthetic_control.inject_rx(&good);
    let mut delivered = false;
    for _ in 0..4 {
        now += MS;
        bond.poll(now);
        while let Some(frame) = bond.pop_rx() {
            delivered |= frame == good;
        }
    }
    steps.count(4)?;
    check(delivered, || {
        "a good frame on the synthetic path was not delivered".to_string()
    })
}

fn seeds() -> Vec<Vec<u8>> {
    let mut bytes = Vec::new();
    for _ in 0..6 {
        bytes.extend_from_slice(&[0x10, 0, 0, 0]);
        bytes.extend_from_slice(&frames::tcp_frame_seed());
        bytes.extend_from_slice(&[0, 0x10, 0, 0, 3, 0x10, 0, 0, 5, 10, 0x10, 0, 0, 9]);
    }
    vec![bytes]
}

/// The registration.
pub const TARGET: Target = Target {
    name: "bond",
    about: "bond: frames on both paths (dedup, queue), sends (checksums, segmentation), events",
    default_cases: 100_000,
    max_input_len: 4096,
    memory_bound: 8 * 1024 * 1024,
    step_bound: 1_000,
    seeds,
    run,
};
