//! Hostile Ethernet frames built from fuzzer bytes: random EtherTypes, VLAN tags, truncated and
//! lying IPv4/IPv6 headers, bad IHL, fragments, random TCP flags and options, UDP lengths that
//! lie, with right or wrong checksums — and well-formed frames to check that a path still works.

use crate::engine::Input;

/// Our MAC in every target.
pub const OUR_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
/// The peer's MAC.
pub const PEER_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0xaa, 0xbb, 0xcc];
/// Our IPv4 address.
pub const OUR_IP: [u8; 4] = [10, 0, 2, 15];
/// The peer's IPv4 address.
pub const PEER_IP: [u8; 4] = [10, 0, 2, 2];
/// Ports the targets keep open (TCP listener and UDP socket).
pub const OPEN_PORTS: [u16; 2] = [5201, 7];

const ETHERTYPES: [u16; 7] = [0x0800, 0x0800, 0x86dd, 0x0806, 0x8100, 0x88a8, 0x88b5];

fn pick<T: Copy>(input: &mut Input, choices: &[T]) -> T {
    choices[input.below(choices.len())]
}

/// One of `choices`, or any byte.
fn pick_or_byte(input: &mut Input, choices: &[u8]) -> u8 {
    let index = input.below(choices.len() + 1);
    match choices.get(index) {
        Some(choice) => *choice,
        None => input.u8(),
    }
}

fn push_ipv6_address(frame: &mut Vec<u8>, input: &mut Input, ours: bool) {
    if ours {
        frame.extend_from_slice(&[
            0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0x50, 0x54, 0, 0xff, 0xfe, 0x12, 0x34, 0x56,
        ]);
    } else {
        for _ in 0..16 {
            frame.push(input.u8());
        }
    }
}

fn transport(frame: &mut Vec<u8>, input: &mut Input, protocol: u8) {
    let port = |input: &mut Input| {
        if input.below(4) == 3 {
            input.u16()
        } else {
            pick(input, &OPEN_PORTS)
        }
    };
    match protocol {
        6 => {
            let source = port(input);
            frame.extend_from_slice(&source.to_be_bytes());
            frame.extend_from_slice(&port(input).to_be_bytes());
            frame.extend_from_slice(&input.u32().to_be_bytes());
            frame.extend_from_slice(&input.u32().to_be_bytes());
            let options = input.below(11);
            let offset = if input.below(4) == 3 {
                input.u8() >> 4
            } else {
                5 + options as u8
            };
            frame.push(offset << 4);
            frame.push(input.u8());
            frame.extend_from_slice(&input.u16().to_be_bytes());
            frame.extend_from_slice(&[0, 0]);
            frame.extend_from_slice(&input.u16().to_be_bytes());
            for _ in 0..options * 4 {
                frame.push(pick(input, &[0, 1, 2, 3, 4, 5, 8, 30, 0xff, 0x28]));
            }
        }
        17 => {
            frame.extend_from_slice(&port(input).to_be_bytes());
            frame.extend_from_slice(&port(input).to_be_bytes());
            frame.extend_from_slice(&input.u16().to_be_bytes());
            frame.extend_from_slice(&[0, 0]);
        }
        1 | 58 => {
            frame.push(pick_or_byte(
                input,
                &[0, 8, 3, 11, 128, 129, 133, 134, 135, 136],
            ));
            frame.push(input.u8());
            frame.extend_from_slice(&[0, 0]);
            frame.extend_from_slice(&input.u32().to_be_bytes());
        }
        _ => {}
    }
}

/// One hostile frame.
pub fn hostile_frame(input: &mut Input) -> Vec<u8> {
    let mut frame = Vec::with_capacity(128);
    match input.below(8) {
        5 => frame.extend_from_slice(&[0xff; 6]),
        6 => frame.extend_from_slice(&[0x33, 0x33, 0, 0, 0, 1]),
        7 => (0..6).for_each(|_| frame.push(input.u8())),
        _ => frame.extend_from_slice(&OUR_MAC),
    }
    match input.below(16) {
        14 => frame.extend_from_slice(&OUR_MAC),
        15 => (0..6).for_each(|_| frame.push(input.u8())),
        _ => frame.extend_from_slice(&PEER_MAC),
    }
    let mut ethertype = pick(input, &ETHERTYPES);
    if input.below(3) == 2 {
        ethertype = input.u16();
    }
    while matches!(ethertype, 0x8100 | 0x88a8) && frame.len() < 30 {
        frame.extend_from_slice(&ethertype.to_be_bytes());
        frame.extend_from_slice(&input.u16().to_be_bytes());
        ethertype = pick(input, &ETHERTYPES);
    }
    frame.extend_from_slice(&ethertype.to_be_bytes());
    let ip = frame.len();
    let mut fix_checksums = input.below(4) != 0;
    match ethertype {
        0x0800 => {
            let options = input.below(11);
            let version_ihl = match input.below(6) {
                5 => input.u8(),
                _ => 0x40 | (5 + options as u8),
            };
            frame.push(version_ihl);
            frame.push(input.u8());
            let total_at = frame.len();
            frame.extend_from_slice(&[0, 0]);
            frame.extend_from_slice(&input.u16().to_be_bytes());
            let fragment: u16 = match input.below(5) {
                3 => input.u16(),
                4 => 0x2000 | (input.u16() & 0x1fff),
                _ => 0x4000,
            };
            frame.extend_from_slice(&fragment.to_be_bytes());
            frame.push(input.u8());
            let protocol = pick_or_byte(input, &[6, 6, 17, 1]);
            frame.push(protocol);
            frame.extend_from_slice(&[0, 0]);
            frame.extend_from_slice(&PEER_IP);
            if input.below(8) == 7 {
                (0..4).for_each(|_| frame.push(input.u8()));
            } else {
                frame.extend_from_slice(&OUR_IP);
            }
            for _ in 0..options * 4 {
                frame.push(input.u8());
            }
            if fragment & 0x1fff == 0 {
                transport(&mut frame, input, protocol);
            }
            let payload = input.bytes(1600);
            frame.extend_from_slice(payload);
            let mut total = (frame.len() - ip) as u16;
            if input.below(4) == 3 {
                total = input.u16();
            }
            frame[total_at..total_at + 2].copy_from_slice(&total.to_be_bytes());
        }
        0x86dd => {
            frame.extend_from_slice(&[0x60, 0, 0, 0]);
            let length_at = frame.len();
            frame.extend_from_slice(&[0, 0]);
            let next = pick_or_byte(input, &[6, 17, 58, 44, 0]);
            frame.push(next);
            frame.push(255);
            push_ipv6_address(&mut frame, input, false);
            let ours = input.below(4) != 3;
            push_ipv6_address(&mut frame, input, ours);
            if next == 44 || next == 0 {
                frame.extend_from_slice(&[6, 0]);
                frame.extend_from_slice(&input.u16().to_be_bytes());
                frame.extend_from_slice(&input.u32().to_be_bytes());
                transport(&mut frame, input, 6);
            } else {
                transport(&mut frame, input, next);
            }
            frame.extend_from_slice(input.bytes(1600));
            let mut length = (frame.len() - ip - 40) as u16;
            if input.below(4) == 3 {
                length = input.u16();
            }
            frame[length_at..length_at + 2].copy_from_slice(&length.to_be_bytes());
        }
        0x0806 => {
            frame.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0]);
            frame.push(pick_or_byte(input, &[1, 2]));
            frame.extend_from_slice(&PEER_MAC);
            frame.extend_from_slice(&PEER_IP);
            frame.extend_from_slice(&[0; 6]);
            frame.extend_from_slice(&OUR_IP);
            fix_checksums = false;
        }
        _ => {
            frame.extend_from_slice(input.bytes(1600));
            fix_checksums = false;
        }
    }
    if fix_checksums {
        net_stack::checksum::fill(&mut frame);
    }
    match input.below(8) {
        6 => frame.truncate(input.below(frame.len() + 1)),
        7 => frame.extend_from_slice(input.bytes(64)),
        _ => {}
    }
    frame
}

/// A well-formed UDP/IPv4 frame to us from the peer, `payload` carried, checksums right.
pub fn good_udp_frame(destination_port: u16, payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(42 + payload.len());
    frame.extend_from_slice(&OUR_MAC);
    frame.extend_from_slice(&PEER_MAC);
    frame.extend_from_slice(&[0x08, 0x00]);
    let total = (28 + payload.len()) as u16;
    frame.extend_from_slice(&[0x45, 0]);
    frame.extend_from_slice(&total.to_be_bytes());
    frame.extend_from_slice(&[0, 1, 0x40, 0, 64, 17, 0, 0]);
    frame.extend_from_slice(&PEER_IP);
    frame.extend_from_slice(&OUR_IP);
    frame.extend_from_slice(&40000u16.to_be_bytes());
    frame.extend_from_slice(&destination_port.to_be_bytes());
    frame.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    frame.extend_from_slice(&[0, 0]);
    frame.extend_from_slice(payload);
    net_stack::checksum::fill(&mut frame);
    frame
}

/// Seeds for frame-driven targets: a byte string that [`hostile_frame`] turns into a
/// well-formed TCP/IPv4 frame to an open port.
pub fn tcp_frame_seed() -> Vec<u8> {
    // dst ours, src peer, IPv4, checksums fixed, 0 options, tos, id, DF, ttl, TCP ...
    let mut bytes = vec![3, 3, 0, 1, 1];
    bytes.extend_from_slice(&[0, 1, 0, 0, 0x34, 0x12, 2, 64, 0, 1]);
    bytes.extend_from_slice(&[
        1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0x02, 0xff, 0xff, 0, 0,
    ]);
    bytes.extend_from_slice(&[0, 0, 1, 2, 2]);
    bytes
}
