//! Target `coalesce`: the receive coalescer (`net_stack::coalesce_batches`) fed in-order TCP
//! segment sequences of two IPv4 flows, some segments made to lie (IP total length, header
//! length, TCP data offset), plus arbitrary frames. The TCP payload each flow delivers equals
//! what the segments carried; a lying frame is passed on unchanged, never merged.

use std::collections::BTreeMap;

use net_stack::coalesce_batches;

use crate::engine::{Input, Outcome, Steps, Target, check};

/// Frames one case offers at most.
const MAX_FRAMES: usize = 96;
/// Merge buffers a case may spend (each 64 KiB).
const LARGE_BUFFERS: usize = 8;

/// An Ethernet + IPv4 + TCP (ACK) segment of flow `port`.
fn segment(port: u16, sequence: u32, payload: &[u8], push: bool) -> Vec<u8> {
    let mut frame = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2, 0x08, 0x00];
    let total = (20 + 20 + payload.len()) as u16;
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&[0, 1, 0x40, 0, 64, 6, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2]);
    let mut sum = 0u32;
    for pair in ip.chunks(2) {
        sum += u32::from(u16::from_be_bytes([pair[0], pair[1]]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    ip[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    frame.extend_from_slice(&ip);
    frame.extend_from_slice(&port.to_be_bytes());
    frame.extend_from_slice(&80u16.to_be_bytes());
    frame.extend_from_slice(&sequence.to_be_bytes());
    frame.extend_from_slice(&1000u32.to_be_bytes());
    frame.extend_from_slice(&[0x50, if push { 0x18 } else { 0x10 }, 0xff, 0xff, 0, 0, 0, 0]);
    frame.extend_from_slice(payload);
    frame
}

/// The (source port, TCP payload) of a well-formed IPv4 TCP frame as [`segment`] builds them.
fn tcp_payload(frame: &[u8]) -> Option<(u16, &[u8])> {
    if frame.len() < 54 || frame[12..14] != [0x08, 0x00] || frame[14] != 0x45 || frame[23] != 6 {
        return None;
    }
    let total = usize::from(u16::from_be_bytes([frame[16], frame[17]]));
    let data_offset = usize::from(frame[46] >> 4) * 4;
    if total < 20 + data_offset || 14 + total != frame.len() || data_offset < 20 {
        return None;
    }
    let port = u16::from_be_bytes([frame[34], frame[35]]);
    Some((port, &frame[14 + 20 + data_offset..]))
}

fn run(input: &mut Input, steps: &mut Steps) -> Outcome {
    let mut batches: Vec<Vec<Vec<u8>>> = vec![Vec::new()];
    let mut sequences = BTreeMap::from([(1000u16, 1u32), (1001u16, 0x7fff_fff0u32)]);
    let mut expected: BTreeMap<u16, Vec<u8>> = BTreeMap::new();
    let mut lying: Vec<Vec<u8>> = Vec::new();
    let mut offered = 0usize;
    for _ in 0..MAX_FRAMES {
        if input.is_empty() {
            break;
        }
        steps.count(1)?;
        offered += 1;
        let choice = input.below(16);
        let frame = match choice {
            0 => input.bytes(200).to_vec(),
            1 => {
                batches.push(Vec::new());
                offered -= 1;
                continue;
            }
            _ => {
                let port = 1000 + input.below(2) as u16;
                let len = 1 + input.below(1460);
                let fill = input.u8();
                let payload: Vec<u8> = (0..len)
                    .map(|index| fill.wrapping_add(index as u8))
                    .collect();
                let sequence = sequences[&port];
                let mut frame = segment(port, sequence, &payload, input.below(8) == 0);
                if choice == 2 {
                    // A lie: IP total length beyond the frame, IHL or TCP data offset that
                    // disagrees with the frame. Its bytes go to the stack as they are (it drops them).
                    match input.below(3) {
                        0 => {
                            // Longer than the frame (shorter would be Ethernet padding).
                            let wrong = (frame.len() - 14 + 1 + usize::from(input.u8())) as u16;
                            frame[16..18].copy_from_slice(&wrong.to_be_bytes());
                        }
                        1 => frame[14] = 0x40 | (6 + input.below(10) as u8),
                        _ => frame[46] = (6 + input.below(10) as u8) << 4,
                    }
                    lying.push(frame.clone());
                } else {
                    sequences.insert(port, sequence.wrapping_add(len as u32));
                    expected
                        .entry(port)
                        .or_default()
                        .extend_from_slice(&payload);
                }
                frame
            }
        };
        batches.last_mut().expect("one batch at least").push(frame);
    }
    let (delivered, stats) = coalesce_batches(&batches, LARGE_BUFFERS);
    steps.count(delivered.len() as u64)?;
    check(delivered.len() <= offered, || {
        format!("{} frames out of {offered}", delivered.len())
    })?;
    check(stats.merged_frames <= stats.segments_merged, || {
        "more merged frames than merged segments".into()
    })?;
    for frame in &lying {
        check(delivered.contains(frame), || {
            "a lying frame was merged or changed".into()
        })?;
    }
    let mut got: BTreeMap<u16, Vec<u8>> = BTreeMap::new();
    for frame in &delivered {
        if lying.contains(frame) {
            continue;
        }
        if let Some((port, payload)) = tcp_payload(frame)
            && (port == 1000 || port == 1001)
            && frame[26..34] == [10, 0, 0, 1, 10, 0, 0, 2]
        {
            got.entry(port).or_default().extend_from_slice(payload);
        }
    }
    // Random frames may look like segments of the flows; compare only when none were offered.
    if batches
        .iter()
        .flatten()
        .all(|frame| tcp_payload(frame).is_some() || lying.contains(frame))
    {
        check(got == expected, || {
            "the payload delivered per flow differs from what the segments carried".into()
        })?;
    }
    Ok(())
}

fn seeds() -> Vec<Vec<u8>> {
    // Eight 1460-byte segments alternating flows, a batch break, then four more.
    let mut seed = Vec::new();
    for index in 0..12u8 {
        if index == 8 {
            seed.push(1);
        }
        seed.extend_from_slice(&[3, index % 2, 0xb3, 0x05, index, 1]);
    }
    vec![seed]
}

/// The registration.
pub const TARGET: Target = Target {
    name: "coalesce",
    about: "receive coalescer: in-order TCP segments of two flows, lying headers, arbitrary frames",
    default_cases: 20_000,
    max_input_len: 1024,
    memory_bound: (LARGE_BUFFERS + 2) * 66 * 1024 + MAX_FRAMES * 4096,
    step_bound: 2 * MAX_FRAMES as u64,
    seeds,
    run,
};
