//! Target `vmbus-packet`: what a Hyper-V host writes into a channel ring and the SynIC message
//! page — VMBus packets (descriptor, transfer-page and GPA-direct headers, payload) and channel
//! messages (header, fixed-size bodies) — parsed from hostile bytes.

use vmbus::packet::{IncomingKind, IncomingPacket};
use vmbus::protocol::{
    self, GpadlCreated, MessageType, OfferChannel, OpenResult, RescindChannelOffer, VersionResponse,
};

use crate::engine::{Input, Outcome, Steps, Target, check};

fn run(input: &mut Input, steps: &mut Steps) -> Outcome {
    let bytes = input.rest();
    steps.count(bytes.len() as u64)?;
    if let Ok(packet) = IncomingPacket::parse(bytes) {
        // The payload is a view into the bytes, never past them.
        let start = packet.payload.as_ptr() as usize - bytes.as_ptr() as usize;
        check(start + packet.payload.len() <= bytes.len(), || {
            "payload beyond the packet bytes".to_string()
        })?;
        match packet.kind {
            IncomingKind::TransferPages { ranges, .. } => {
                check(ranges.iter().count() == ranges.len(), || {
                    "transfer-page range count disagrees with its ranges".to_string()
                })?;
                check(ranges.get(ranges.len()).is_none(), || {
                    "range past the end".to_string()
                })?;
            }
            IncomingKind::GpaDirect { range_count, .. } => {
                check(range_count >= 1, || {
                    "GPA-direct packet with no range".to_string()
                })?;
            }
            _ => {}
        }
    }
    if let Some((message_type, body)) = protocol::split_header(bytes) {
        match message_type {
            MessageType::OFFER_CHANNEL => {
                let _ = protocol::read_body::<OfferChannel>(body);
            }
            MessageType::RESCIND_CHANNEL_OFFER => {
                let _ = protocol::read_body::<RescindChannelOffer>(body);
            }
            MessageType::OPEN_CHANNEL_RESULT => {
                let _ = protocol::read_body::<OpenResult>(body);
            }
            MessageType::GPADL_CREATED => {
                let _ = protocol::read_body::<GpadlCreated>(body);
            }
            MessageType::VERSION_RESPONSE => {
                let _ = protocol::read_body::<VersionResponse>(body);
            }
            _ => {}
        }
    }
    Ok(())
}

fn seeds() -> Vec<Vec<u8>> {
    // In-band packet: type 6, header 16 bytes (2 × 8), length 24 bytes (3 × 8), flags 1.
    let mut in_band = vec![6, 0, 2, 0, 3, 0, 1, 0];
    in_band.extend_from_slice(&7u64.to_le_bytes());
    in_band.extend_from_slice(b"payload!");
    // Transfer pages: type 7, header 40 bytes (set id, count 2, two ranges), length 48.
    let mut transfer = vec![7, 0, 5, 0, 6, 0, 0, 0];
    transfer.extend_from_slice(&9u64.to_le_bytes());
    transfer.extend_from_slice(&[0, 0, 0, 0, 2, 0, 0, 0]);
    transfer.extend_from_slice(&[100, 0, 0, 0, 0, 0, 0, 0, 60, 0, 0, 0, 0, 16, 0, 0]);
    transfer.extend_from_slice(&[0; 8]);
    // A channel message: VERSION_RESPONSE, supported.
    let mut message = 15u32.to_le_bytes().to_vec();
    message.extend_from_slice(&[0; 4]);
    message.extend_from_slice(&[1; 16]);
    vec![in_band, transfer, message]
}

/// The registration.
pub const TARGET: Target = Target {
    name: "vmbus-packet",
    about: "VMBus ring packets (in-band, transfer pages, GPA direct) and channel messages",
    default_cases: 100_000,
    max_input_len: 512,
    memory_bound: 64 * 1024,
    step_bound: 1024,
    seeds,
    run,
};
