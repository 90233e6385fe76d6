//! IPv4 header and TCP/UDP/ICMP checksums, filled in on transmit and verified on receive by the
//! bond instead of by smoltcp.
//!
//! Why not smoltcp's: its summing loop is auto-vectorised into SSE unpack instructions, which
//! an emulated CPU (QEMU TCG) runs through slow helpers; under TCG it was the hottest guest loop
//! of a bulk transfer. The shared `net_device::checksum` core stays scalar. Doing the work here
//! also lets a frame skip verification when the NIC already checked it
//! (`RxMeta::checksum_verified`).

pub use net_device::checksum::{add, fold};

const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_IPV6: u16 = 0x86dd;
const PROTOCOL_ICMP: u8 = 1;
const PROTOCOL_TCP: u8 = 6;
const PROTOCOL_UDP: u8 = 17;
const PROTOCOL_ICMPV6: u8 = 58;
const ETHERNET_HEADER: usize = 14;
const IPV6_HEADER: usize = 40;

/// Where the transport checksum lives and what it covers.
struct Transport {
    /// Offset of the transport header in the frame.
    start: usize,
    /// One past the last byte of the transport data.
    end: usize,
    /// Offset of the checksum field relative to `start`.
    field: usize,
    /// The pseudo-header's partial sum (0 for ICMPv4, which has none).
    pseudo: u64,
    /// UDP: a computed 0 is sent as 0xffff, and a received 0 means "no checksum" (IPv4).
    udp: bool,
    /// TCP or UDP: a NIC can complete this checksum (ICMP's it cannot).
    offloadable: bool,
}

fn be16(frame: &[u8], offset: usize) -> Option<u16> {
    Some(u16::from_be_bytes([
        *frame.get(offset)?,
        *frame.get(offset + 1)?,
    ]))
}

/// The checksummed parts of an IP frame: the IPv4 header's `[start, end)` (none for IPv6) and
/// the transport part, when it is one we handle.
type Located = (Option<(usize, usize)>, Option<Transport>);

/// Finds the checksummed parts of a frame; `None` when an IP frame's lengths don't fit.
fn locate(frame: &[u8]) -> Option<Located> {
    match be16(frame, 12)? {
        ETHERTYPE_IPV4 => {
            let ip = ETHERNET_HEADER;
            let header_len = usize::from(frame.get(ip)? & 0x0f) * 4;
            let total_len = usize::from(be16(frame, ip + 2)?);
            if header_len < 20 || total_len < header_len || ip + total_len > frame.len() {
                return None;
            }
            let fragment = be16(frame, ip + 6)? & 0x3fff != 0;
            let protocol = frame[ip + 9];
            let start = ip + header_len;
            let end = ip + total_len;
            let field = match protocol {
                PROTOCOL_TCP => 16,
                PROTOCOL_UDP => 6,
                PROTOCOL_ICMP => 2,
                _ => return Some((Some((ip, start)), None)),
            };
            if fragment || end < start + field + 2 {
                return Some((Some((ip, start)), None));
            }
            let pseudo = if protocol == PROTOCOL_ICMP {
                0
            } else {
                let length = ((end - start) as u16).to_be_bytes();
                add(
                    add(0, &frame[ip + 12..ip + 20]),
                    &[0, protocol, length[0], length[1]],
                )
            };
            let transport = Transport {
                start,
                end,
                field,
                pseudo,
                udp: protocol == PROTOCOL_UDP,
                offloadable: protocol != PROTOCOL_ICMP,
            };
            Some((Some((ip, start)), Some(transport)))
        }
        ETHERTYPE_IPV6 => {
            let ip = ETHERNET_HEADER;
            let payload_len = usize::from(be16(frame, ip + 4)?);
            let start = ip + IPV6_HEADER;
            let end = start + payload_len;
            if end > frame.len() {
                return None;
            }
            let next_header = frame[ip + 6];
            let field = match next_header {
                PROTOCOL_TCP => 16,
                PROTOCOL_UDP => 6,
                PROTOCOL_ICMPV6 => 2,
                // Extension headers: leave the frame to smoltcp's own handling.
                _ => return Some((None, None)),
            };
            if end < start + field + 2 {
                return Some((None, None));
            }
            let length = (payload_len as u16).to_be_bytes();
            let pseudo = add(
                add(0, &frame[ip + 8..ip + 40]),
                &[0, next_header, length[0], length[1]],
            );
            let transport = Transport {
                start,
                end,
                field,
                pseudo,
                udp: next_header == PROTOCOL_UDP,
                offloadable: next_header != PROTOCOL_ICMPV6,
            };
            Some((None, Some(transport)))
        }
        _ => Some((None, None)),
    }
}

/// Fills in the IPv4 header checksum and the TCP/UDP/ICMP checksum of an outgoing frame (whose
/// checksum fields smoltcp left for us). Frames that are not IP, or malformed, are untouched.
pub fn fill(frame: &mut [u8]) {
    let Some((ipv4, transport)) = locate(frame) else {
        return;
    };
    fill_ipv4_header(frame, ipv4);
    if let Some(transport) = transport {
        fill_transport(frame, &transport);
    }
}

/// Prepares an outgoing frame for a NIC that completes TCP/UDP checksums (`TxMeta::checksum`):
/// fills in the IPv4 header checksum and leaves the folded pseudo-header sum in the transport
/// checksum field. Returns `(start, field offset)` for the NIC, or `None` when the frame was
/// completed in software instead (ICMP, not IP, malformed).
pub fn prepare_offload(frame: &mut [u8]) -> Option<(u16, u16)> {
    let (ipv4, transport) = locate(frame)?;
    fill_ipv4_header(frame, ipv4);
    let transport = transport?;
    if !transport.offloadable {
        fill_transport(frame, &transport);
        return None;
    }
    let field = transport.start + transport.field;
    frame[field..field + 2].copy_from_slice(&fold(transport.pseudo).to_be_bytes());
    Some((
        u16::try_from(transport.start).ok()?,
        u16::try_from(transport.field).ok()?,
    ))
}

fn fill_ipv4_header(frame: &mut [u8], ipv4: Option<(usize, usize)>) {
    if let Some((ip, header_end)) = ipv4 {
        frame[ip + 10] = 0;
        frame[ip + 11] = 0;
        let sum = !fold(add(0, &frame[ip..header_end]));
        frame[ip + 10..ip + 12].copy_from_slice(&sum.to_be_bytes());
    }
}

fn fill_transport(frame: &mut [u8], transport: &Transport) {
    let field = transport.start + transport.field;
    frame[field] = 0;
    frame[field + 1] = 0;
    let mut sum = !fold(add(
        transport.pseudo,
        &frame[transport.start..transport.end],
    ));
    if transport.udp && sum == 0 {
        sum = 0xffff;
    }
    frame[field..field + 2].copy_from_slice(&sum.to_be_bytes());
}

/// True when the IPv4 header checksum and the transport checksum of a received frame are right
/// (or the frame carries nothing we check). A malformed IP frame is reported as bad.
pub fn verify(frame: &[u8]) -> bool {
    let Some((ipv4, transport)) = locate(frame) else {
        // IP frames whose lengths don't fit are left to smoltcp, which drops them; anything
        // else (ARP, unknown ethertypes) has no checksum of ours.
        return true;
    };
    if let Some((ip, header_end)) = ipv4
        && fold(add(0, &frame[ip..header_end])) != 0xffff
    {
        return false;
    }
    match transport {
        None => true,
        Some(transport) => {
            let field = transport.start + transport.field;
            if transport.udp && ipv4.is_some() && frame[field] == 0 && frame[field + 1] == 0 {
                return true; // IPv4 UDP without a checksum
            }
            fold(add(
                transport.pseudo,
                &frame[transport.start..transport.end],
            )) == 0xffff
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec::Vec;

    use net_device::checksum::reference;

    fn udp_ipv4_frame(payload: &[u8]) -> Vec<u8> {
        let mut frame = alloc::vec![0u8; 14 + 20 + 8 + payload.len()];
        frame[12..14].copy_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
        frame[14] = 0x45;
        frame[16..18].copy_from_slice(&((20 + 8 + payload.len()) as u16).to_be_bytes());
        frame[22] = 64;
        frame[23] = PROTOCOL_UDP;
        frame[26..30].copy_from_slice(&[10, 0, 2, 15]);
        frame[30..34].copy_from_slice(&[10, 0, 2, 2]);
        frame[34..36].copy_from_slice(&7u16.to_be_bytes());
        frame[36..38].copy_from_slice(&4000u16.to_be_bytes());
        frame[38..40].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        frame[42..].copy_from_slice(payload);
        frame
    }

    #[test]
    fn filled_frames_verify_and_corruption_is_caught() {
        for len in [0, 1, 2, 7, 100, 1472] {
            let payload: Vec<u8> = (0..len).map(|i| (i * 13) as u8).collect();
            let mut frame = udp_ipv4_frame(&payload);
            fill(&mut frame);
            assert!(verify(&frame), "len {len}");
            // Independent check of the UDP checksum over pseudo-header + datagram.
            let mut pseudo = alloc::vec::Vec::new();
            pseudo.extend_from_slice(&frame[26..34]);
            pseudo.extend_from_slice(&[0, PROTOCOL_UDP]);
            pseudo.extend_from_slice(&((8 + len) as u16).to_be_bytes());
            pseudo.extend_from_slice(&frame[34..]);
            assert_eq!(reference(&pseudo), 0xffff, "len {len}");
            assert_eq!(reference(&frame[14..34]), 0xffff, "IPv4 header, len {len}");
            if len > 0 {
                let mut corrupted = frame.clone();
                *corrupted.last_mut().unwrap() ^= 0x40;
                assert!(!verify(&corrupted), "payload corruption, len {len}");
            }
            let mut bad_header = frame.clone();
            bad_header[22] ^= 1;
            assert!(!verify(&bad_header), "header corruption, len {len}");
        }
    }

    #[test]
    fn lengths_beyond_the_frame_and_non_ip_frames_are_left_alone() {
        let mut frame = udp_ipv4_frame(b"hello");
        frame[16..18].copy_from_slice(&2000u16.to_be_bytes());
        let before = frame.clone();
        fill(&mut frame);
        assert_eq!(frame, before, "malformed: untouched");
        let mut arp = alloc::vec![0u8; 42];
        arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
        assert!(verify(&arp));
        assert!(
            verify(&[0u8; 5]),
            "runt frames are the bond's and smoltcp's business"
        );
    }
}
