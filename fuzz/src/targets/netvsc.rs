//! Target `netvsc`: the netvsc driver (NVSP + RNDIS) against its fake Hyper-V host turned
//! hostile — arbitrary in-band NVSP messages, transfer-page packets with lying page sets and
//! ranges, RNDIS messages in the receive buffer with lying offsets, lengths and PPIs,
//! completions with unknown ids — mixed with good frames, link and keepalive traffic and
//! transmits. Afterwards a good frame is still delivered, byte for byte.

use net_device::{NetDevice, TxMeta};
use netvsc_fallback::fake::FakeDmaAllocator;
use netvsc_fallback::netvsc::fake_host::{FakeHostConfig, FakeNetvscHost, rx_message};
use netvsc_fallback::netvsc::nvsp::{self, SendRndisPacket};
use netvsc_fallback::netvsc::rndis::{self, message_type as rndis_type};
use netvsc_fallback::netvsc::{
    IncomingKind, IncomingPacket, Netvsc, NetvscConfig, NetvscCounters, TransferRange,
};

use super::common::StatsWatch;
use crate::engine::{Input, Outcome, Steps, Target, check, monotonic};

/// Operations one case runs at most.
const MAX_OPERATIONS: usize = 48;
/// The fake host's receive page set id.
const RECEIVE_PAGESET: u16 = 0xcafe;
/// The fake host's receive sub-allocation size (its default).
const SUB_ALLOCATION: u32 = 256 + 1514 + 36;
/// The receive buffer length the target configures: 64 sub-allocations (small, so a case
/// allocates and zeroes little; the driver's default is 1 MiB).
const RECEIVE_BUFFER_LEN: u32 = 64 * SUB_ALLOCATION;
/// Longest frame a receive may hand up (an RSC-coalesced one included).
const MAX_FRAME: usize = 65_536;
/// Frames one receive call may hand up.
const BUDGET: usize = 64;

fn figures(counters: &NetvscCounters) -> [(&'static str, u64); 16] {
    [
        ("receive_completions", counters.receive_completions),
        ("bad_ranges", counters.bad_ranges),
        ("bad_packets", counters.bad_packets),
        ("link_indications", counters.link_indications),
        ("keepalives_answered", counters.keepalives_answered),
        ("vf_associations", counters.vf_associations),
        ("host_data_path_switches", counters.host_data_path_switches),
        ("software_checksums", counters.software_checksums),
        ("lso_frames", counters.lso_frames),
        ("tx_refused", counters.tx_refused),
        ("rx_before_ready", counters.rx_before_ready),
        ("tx_via_section", counters.tx_via_section),
        ("tx_via_gpa_direct", counters.tx_via_gpa_direct),
        ("tx_section_overflow", counters.tx_section_overflow),
        ("tx_refused_ring_full", counters.tx_refused_ring_full),
        ("tx_refused_no_buffer", counters.tx_refused_no_buffer),
    ]
}

/// A frame a host could carry: unicast to a locally administered address, `seed`-patterned.
fn frame_of(len: usize, seed: u8) -> Vec<u8> {
    let mut frame: Vec<u8> = (0..len)
        .map(|index| (index as u8).wrapping_mul(31).wrapping_add(seed))
        .collect();
    frame[0] = 0x02;
    frame[12] = 0x88;
    frame[13] = 0xb5;
    frame
}

/// A word that lies about a length or an offset.
fn lying_word(input: &mut Input) -> u32 {
    match input.below(6) {
        0 => 0,
        1 => input.below(64) as u32,
        2 => SUB_ALLOCATION - input.below(64) as u32,
        3 => u32::MAX - input.below(8) as u32,
        4 => 0x8000_0000 | input.u16() as u32,
        _ => input.u32(),
    }
}

/// An RNDIS message: a data PACKET (well-formed or with lying fields), another type with a
/// lying body, or raw bytes.
fn hostile_rndis(input: &mut Input) -> Vec<u8> {
    match input.below(4) {
        0 | 1 => {
            let len = 14 + input.below(1500);
            let checksum = input.bool().then(|| input.u32());
            let mut message = rx_message(&frame_of(len, input.u8()), checksum);
            // Overwrite a few header, packet or PPI words (message length included).
            for _ in 0..input.below(4) {
                let at = 4 * input.below(15);
                let word = lying_word(input);
                if at + 4 <= message.len() {
                    message[at..at + 4].copy_from_slice(&word.to_le_bytes());
                }
            }
            message
        }
        2 => {
            let kind = [
                rndis_type::INDICATE_STATUS,
                rndis_type::KEEPALIVE,
                rndis_type::QUERY_COMPLETE,
                rndis_type::SET_COMPLETE,
                rndis_type::INITIALIZE_COMPLETE,
                rndis_type::RESET_COMPLETE,
                rndis_type::KEEPALIVE_COMPLETE,
            ][input.below(7)];
            let mut message = kind.to_le_bytes().to_vec();
            let body_words = input.below(16);
            message.extend_from_slice(&(8 + 4 * body_words as u32).to_le_bytes());
            for _ in 0..body_words {
                message.extend_from_slice(&lying_word(input).to_le_bytes());
            }
            message
        }
        _ => input.bytes(128).to_vec(),
    }
}

/// The payload of a transfer-page packet: SEND_RNDIS_PACKET (data or control, any section
/// fields) or anything.
fn rndis_packet_payload(input: &mut Input) -> Vec<u8> {
    if input.below(4) == 0 {
        return input.bytes(48).to_vec();
    }
    nvsp::encode(
        nvsp::message_type::SEND_RNDIS_PACKET,
        &SendRndisPacket {
            channel_type: input.below(3) as u32,
            send_buffer_section_index: if input.bool() { u32::MAX } else { input.u32() },
            send_buffer_section_size: if input.bool() { 0 } else { input.u32() },
        },
    )
    .to_vec()
}

fn run(input: &mut Input, steps: &mut Steps) -> Outcome {
    let (host, channel) = FakeNetvscHost::new(FakeHostConfig::default());
    let dma = FakeDmaAllocator::new();
    let config = NetvscConfig {
        receive_buffer_len: RECEIVE_BUFFER_LEN as usize,
        send_buffer_len: 16 * 6144,
        ..NetvscConfig::default()
    };
    let mut device = Netvsc::new(channel, &dma, config)
        .map_err(|(error, _)| format!("bring-up against an honest host failed: {error}"))?;
    let mut watch = StatsWatch::new(&device);
    let mut before = device.counters();
    let mut now_ns = 0u64;
    let mut hostile_transaction = 0x0777_0000_0000_0000u64;
    for _ in 0..MAX_OPERATIONS {
        if input.is_empty() {
            break;
        }
        steps.count(1)?;
        match input.below(10) {
            0 => {
                let frames: Vec<_> = (0..1 + input.below(3))
                    .map(|_| {
                        let len = 14 + input.below(1500);
                        (frame_of(len, input.u8()), input.bool().then(|| input.u32()))
                    })
                    .collect();
                host.inject_frames(&frames);
            }
            1 | 2 => {
                // A transfer-page packet whose ranges point at hostile RNDIS messages (or lie).
                let mut ranges = Vec::new();
                for _ in 0..input.below(5) {
                    let slot = input.below((RECEIVE_BUFFER_LEN / SUB_ALLOCATION) as usize) as u32;
                    let message = hostile_rndis(input);
                    let offset = slot * SUB_ALLOCATION;
                    host.write_receive_buffer(offset as usize, &message);
                    let range = match input.below(4) {
                        0 => TransferRange {
                            byte_count: lying_word(input),
                            byte_offset: lying_word(input),
                        },
                        1 => TransferRange {
                            byte_count: lying_word(input),
                            byte_offset: offset,
                        },
                        _ => TransferRange {
                            byte_count: message.len() as u32,
                            byte_offset: offset,
                        },
                    };
                    ranges.push(range);
                }
                hostile_transaction += 1;
                host.inject_raw(IncomingPacket {
                    kind: IncomingKind::TransferPages,
                    transaction_id: hostile_transaction,
                    completion_requested: input.below(4) != 0,
                    pageset_id: if input.below(4) == 0 {
                        input.u16()
                    } else {
                        RECEIVE_PAGESET
                    },
                    ranges,
                    payload: rndis_packet_payload(input),
                });
            }
            3 => {
                // An in-band NVSP message: a known type with any body, or anything.
                let message_type = match input.below(3) {
                    0 => input.u32(),
                    _ => [
                        1, 2, 100, 102, 103, 105, 106, 107, 108, 125, 128, 129, 132, 133, 134,
                    ][input.below(15)],
                };
                let mut payload = message_type.to_le_bytes().to_vec();
                payload.extend_from_slice(input.bytes(60));
                host.inject_raw(IncomingPacket {
                    kind: if input.bool() {
                        IncomingKind::InBand
                    } else {
                        IncomingKind::Completion
                    },
                    transaction_id: if input.bool() {
                        input.u64()
                    } else {
                        input.below(16) as u64
                    },
                    completion_requested: input.bool(),
                    pageset_id: 0,
                    ranges: Vec::new(),
                    payload,
                });
            }
            4 | 5 => {
                steps.count(BUDGET as u64)?;
                let (mut frames, mut longest) = (0usize, 0usize);
                let count = device.receive(BUDGET, &mut |frame, _| {
                    frames += 1;
                    longest = longest.max(frame.len());
                });
                check(count == frames && count <= BUDGET, || {
                    format!("receive said {count}, handed up {frames}")
                })?;
                check(longest <= MAX_FRAME, || {
                    format!("a frame of {longest} bytes")
                })?;
            }
            6 => {
                now_ns += u64::from(input.u32());
                device.poll(now_ns);
            }
            7 => {
                let len = 14 + input.below(1500);
                let frame = frame_of(len, 9);
                let _ = device.transmit(len, &mut |buffer| {
                    buffer.copy_from_slice(&frame);
                    TxMeta::default()
                });
                device.flush();
                let _ = host.take_tx_frames();
            }
            8 => match input.below(5) {
                0 => host.set_link(input.bool()),
                1 => host.indicate(if input.bool() {
                    rndis::status::NETWORK_CHANGE
                } else {
                    input.u32()
                }),
                2 => host.send_keepalive(input.u32()),
                _ => host.send_vf_association(input.bool(), input.u32()),
            },
            _ => match input.below(2) {
                0 => host.set_ring_full(input.bool()),
                _ => host.hold_tx_completions(input.bool()),
            },
        }
        watch.check(&device)?;
        let after = device.counters();
        monotonic("netvsc", &figures(&before), &figures(&after))?;
        before = after;
    }

    // An honest host again: everything hostile drained, then one good frame arrives whole.
    host.set_ring_full(false);
    host.hold_tx_completions(false);
    host.set_link(true);
    for _ in 0..64 {
        now_ns += 1_000_000_000;
        device.poll(now_ns);
        steps.count(BUDGET as u64)?;
        if device.receive(BUDGET, &mut |_, _| {}) == 0 && host.pending_rx() == 0 {
            break;
        }
    }
    let good = frame_of(98, 0x5a);
    host.inject_frames(&[(good.clone(), None)]);
    let mut delivered = Vec::new();
    for _ in 0..4 {
        steps.count(BUDGET as u64)?;
        device.receive(BUDGET, &mut |frame, _| delivered.push(frame.to_vec()));
    }
    check(delivered.contains(&good), || {
        format!(
            "a good frame after hostile input was not delivered ({} others; {} pending at the host)",
            delivered.len(),
            host.pending_rx()
        )
    })?;
    watch.check(&device)?;
    monotonic("netvsc", &figures(&before), &figures(&device.counters()))
}

fn seeds() -> Vec<Vec<u8>> {
    // Choices below 256 take one byte, below 65 536 two (LE).
    let good_frames = vec![0u8, 1, 46, 0, 7, 0, 100, 0, 8, 1, 1, 2, 3, 4];
    let mut transfer = vec![1u8, 1, 20, 0, 0, 0, 64, 0, 3, 0, 2, 1];
    transfer.extend_from_slice(&[1, 0, 1, 4]);
    let mut seed = good_frames.clone();
    seed.extend_from_slice(&[4]);
    seed.extend(transfer.iter().copied());
    seed.extend_from_slice(&[4, 3, 1, 9, 0, 0, 5, 6, 1, 0, 0, 0, 4]);
    vec![seed, good_frames, transfer]
}

/// The registration.
pub const TARGET: Target = Target {
    name: "netvsc",
    about: "netvsc driver vs a hostile host: NVSP messages, lying transfer ranges, RNDIS offsets/lengths/PPIs, unknown completions",
    default_cases: 10_000,
    max_input_len: 2048,
    memory_bound: 4 << 20,
    step_bound: (MAX_OPERATIONS as u64 + 70) * BUDGET as u64,
    seeds,
    run,
};
