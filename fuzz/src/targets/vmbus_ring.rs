//! Target `vmbus-ring`: a hostile Hyper-V host on both rings of one open `vmbus::Channel` —
//! arbitrary control words (write index of the incoming ring; read index, interrupt mask and
//! pending send size of the outgoing one) and data bytes mixed with well-formed packets, guest
//! receives and sends. A corrupt ring stops the channel for good; a sound one still delivers a
//! well-formed packet at the end.

use std::sync::Arc;

use net_device::DmaAllocator;
use net_device::heap_dma::HeapDmaAllocator;
use vmbus::channel::{Channel, ChannelCounters, ChannelIds, MAX_SKIPPED_PER_RECEIVE};
use vmbus::packet::{IncomingKind, OutgoingPacket};
use vmbus::ring::{
    INTERRUPT_MASK_OFFSET, PAGE_SIZE, PENDING_SEND_SIZE_OFFSET, READ_INDEX_OFFSET, RingGeometry,
    RingMemory, RingReader, RingWriter, WRITE_INDEX_OFFSET,
};
use vmbus::testing::{PageListMemory, RecordingSignal};

use crate::engine::{Input, Outcome, Steps, Target, check, monotonic};

/// Operations one case runs at most.
const MAX_OPERATIONS: usize = 96;
/// Longest payload a packet in the largest incoming ring here can carry.
const MAX_PAYLOAD: usize = 3 * PAGE_SIZE;
/// The transaction id of the packet that must arrive after the hostile part.
const FINAL_ID: u64 = 0x5eed_f00d;

fn figures(counters: &ChannelCounters) -> [(&'static str, u64); 7] {
    [
        ("packets_sent", counters.packets_sent),
        ("packets_received", counters.packets_received),
        ("ring_full", counters.ring_full),
        ("signals_sent", counters.signals_sent),
        ("signal_failures", counters.signal_failures),
        ("malformed_packets", counters.malformed_packets),
        ("ring_corruptions", counters.ring_corruptions),
    ]
}

/// A control word the host may write: a sound index, one off by a little, or anything.
fn hostile_word(input: &mut Input, data_len: u32) -> u32 {
    match input.below(4) {
        0 => (input.u32() % data_len) & !7,
        1 => (input.u32() % data_len) | 4,
        2 => data_len.wrapping_add(u32::from(input.u8()) * 8),
        _ => input.u32(),
    }
}

fn run(input: &mut Input, steps: &mut Steps) -> Outcome {
    let outgoing_pages = 2 + input.below(2);
    let incoming_pages = 2 + input.below(2);
    let total = (outgoing_pages + incoming_pages) * PAGE_SIZE;
    let memory = HeapDmaAllocator::new()
        .allocate(total, PAGE_SIZE)
        .ok_or("ring allocation failed")?;
    let first_pfn = memory.phys().0 / PAGE_SIZE as u64;
    let pfns = (0..(total / PAGE_SIZE) as u64)
        .map(|page| first_pfn + page)
        .collect();
    let mut host = PageListMemory::new(pfns);
    let signal = RecordingSignal::new();
    let ids = ChannelIds {
        relid: 7,
        connection_id: 0x2007,
        ring_gpadl: 1,
    };
    let mut channel = Channel::new(
        ids,
        memory,
        outgoing_pages * PAGE_SIZE,
        Arc::new(signal.clone()),
    )
    .map_err(|error| format!("channel refused a sound layout: {error}"))?;
    let incoming = RingGeometry::new(outgoing_pages * PAGE_SIZE, incoming_pages * PAGE_SIZE)
        .map_err(|error| error.to_string())?;
    let outgoing = RingGeometry::new(0, outgoing_pages * PAGE_SIZE).map_err(|e| e.to_string())?;
    let mut host_writer = RingWriter::new(&mut host, incoming).map_err(|e| e.to_string())?;
    let mut host_reader = RingReader::new(&mut host, outgoing).map_err(|e| e.to_string())?;
    let incoming_base = outgoing_pages * PAGE_SIZE;

    let mut buffer = Vec::new();
    let mut host_buffer = Vec::new();
    let mut before = channel.counters();
    for _ in 0..MAX_OPERATIONS {
        if input.is_empty() {
            break;
        }
        steps.count(1)?;
        let broken_before = channel.corruption();
        match input.below(10) {
            0 => {
                let payload = input.bytes(600);
                let id = input.u64();
                // The host's own writer checks free space against the guest's read index.
                let _ =
                    host_writer.write(&mut host, &OutgoingPacket::in_band(id, false, &[payload]));
            }
            1 => {
                let word = hostile_word(input, incoming.data_len());
                host.store_u32(incoming_base + WRITE_INDEX_OFFSET, word);
            }
            2 => {
                let offset = input.below(incoming.data_len() as usize);
                let bytes = input.bytes(64);
                host.write(incoming_base + PAGE_SIZE + offset, bytes);
            }
            3 | 4 => {
                steps.count(MAX_SKIPPED_PER_RECEIVE as u64 + 1)?;
                let skipped_before = channel.counters().malformed_packets;
                if let Ok(Some(packet)) = channel.receive(&mut buffer) {
                    check(packet.payload.len() <= MAX_PAYLOAD, || {
                        "payload longer than the ring allows".into()
                    })?;
                    if let IncomingKind::TransferPages { ranges, .. } = packet.kind {
                        check(ranges.iter().count() == ranges.len(), || {
                            "range count disagrees with its ranges".into()
                        })?;
                    }
                }
                let skipped = channel.counters().malformed_packets - skipped_before;
                check(skipped <= MAX_SKIPPED_PER_RECEIVE as u64, || {
                    format!("one receive skipped {skipped} packets")
                })?;
            }
            5 => {
                let payload = input.bytes(900);
                let id = input.u64();
                let _ = channel.send(&OutgoingPacket::in_band(id, input.bool(), &[payload]));
            }
            6 => {
                let offset = [
                    READ_INDEX_OFFSET,
                    INTERRUPT_MASK_OFFSET,
                    PENDING_SEND_SIZE_OFFSET,
                ][input.below(3)];
                let word = hostile_word(input, outgoing.data_len());
                host.store_u32(offset, word);
            }
            7 => match input.below(4) {
                0 => {
                    let _ = channel.has_incoming();
                }
                1 => {
                    let _ = channel.outgoing_free();
                }
                2 => {
                    let _ = channel.set_interrupt_mask(input.bool());
                }
                _ => {
                    let _ = channel.set_pending_send_size(input.u32());
                }
            },
            8 => {
                // The host drains what the guest sent (its reader trusts nothing either).
                for _ in 0..4 {
                    steps.count(1)?;
                    if !matches!(
                        host_reader.read(&mut host, &mut host_buffer),
                        Ok(vmbus::ring::ReadStatus::Packet { .. })
                    ) {
                        break;
                    }
                }
            }
            _ => {
                let _ = signal.take();
            }
        }
        let after = channel.counters();
        monotonic("channel", &figures(&before), &figures(&after))?;
        check(after.ring_corruptions <= 1, || {
            "a channel counted more than one corruption".into()
        })?;
        if let Some(corruption) = broken_before {
            check(channel.corruption() == Some(corruption), || {
                "the first corruption was replaced or forgotten".into()
            })?;
            check(
                after.packets_received == before.packets_received
                    && after.packets_sent == before.packets_sent,
                || "a stopped channel moved packets".into(),
            )?;
        }
        check(
            (after.ring_corruptions == 1) == channel.corruption().is_some(),
            || "corruption counter disagrees with the channel state".into(),
        )?;
        before = after;
    }

    if channel.corruption().is_some() {
        // Stopped for good: every call refuses.
        check(channel.receive(&mut buffer).is_err(), || {
            "a corrupt channel received".into()
        })?;
        check(
            channel
                .send(&OutgoingPacket::in_band(1, false, &[b"after"]))
                .is_err(),
            || "a corrupt channel sent".into(),
        )?;
        return Ok(());
    }
    // Drain what the hostile part left, then the host starts over at the guest's read index
    // (the guest's own copy, which the host never wrote here) with one good packet.
    for _ in 0..MAX_OPERATIONS {
        steps.count(MAX_SKIPPED_PER_RECEIVE as u64 + 1)?;
        match channel.receive(&mut buffer) {
            Ok(Some(_)) => {}
            _ => break,
        }
        if !matches!(channel.has_incoming(), Ok(true)) {
            break;
        }
    }
    if channel.corruption().is_some() {
        return Ok(());
    }
    let read_index = host
        .load_u32(incoming_base + READ_INDEX_OFFSET)
        .ok_or("control page unreadable")?;
    host.store_u32(incoming_base + WRITE_INDEX_OFFSET, read_index);
    let mut fresh = RingWriter::new(&mut host, incoming).map_err(|e| e.to_string())?;
    fresh
        .write(
            &mut host,
            &OutgoingPacket::in_band(FINAL_ID, false, &[b"still works!"]),
        )
        .map_err(|error| format!("host could not write the final packet: {error}"))?;
    let received = channel
        .receive(&mut buffer)
        .map_err(|error| format!("final packet refused: {error}"))?;
    check(
        received.is_some_and(|packet| {
            packet.transaction_id == FINAL_ID && packet.payload.starts_with(b"still works!")
        }),
        || "a well-formed packet after hostile input was not delivered".into(),
    )
}

fn seeds() -> Vec<Vec<u8>> {
    // Operation and small choices take one byte each; lengths up to 65 536 take two (LE).
    let good_packet = |id: u8| {
        let mut op = vec![0u8, 16, 0];
        op.extend_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]);
        op.extend_from_slice(&[id, 0, 0, 0, 0, 0, 0, 0]);
        op
    };
    let mut plain = vec![0, 0];
    plain.extend(good_packet(1));
    plain.push(3);
    plain.extend(good_packet(2));
    plain.push(4);
    let mut with_send = vec![1, 1, 5, 8, 0];
    with_send.extend_from_slice(&[9; 8]);
    with_send.extend_from_slice(&[3, 0, 0, 0, 0, 0, 0, 0, 1]);
    with_send.push(8);
    with_send.extend(good_packet(3));
    with_send.push(3);
    vec![plain, with_send]
}

/// The registration.
pub const TARGET: Target = Target {
    name: "vmbus-ring",
    about: "VMBus channel rings: hostile control words and data on both rings, receive and send",
    default_cases: 50_000,
    max_input_len: 2048,
    memory_bound: 256 * 1024,
    step_bound: (MAX_OPERATIONS as u64 + 1) * (MAX_SKIPPED_PER_RECEIVE as u64 + 2) * 2,
    seeds,
    run,
};
