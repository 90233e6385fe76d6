//! Software TCP segmentation (GSO): splits a large TCP frame from smoltcp into MSS-sized frames
//! for a path whose NIC cannot segment (the VF without TSO, virtio-net without HOST_TSO).
//!
//! smoltcp is told the bond segments TCP frames of up to [`MAX_SEGMENTATION_FRAME`] bytes, for
//! every path, because its device capabilities are fixed when the interface is created while the
//! active path changes at run time. A path with TSO gets the large frame as it is; for any other
//! path the bond cuts it up here. Both beat smoltcp emitting MSS-sized segments: one socket
//! dispatch per 64 KiB instead of per 1.4 KiB.

const ETHERNET_HEADER: usize = 14;
const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_IPV6: u16 = 0x86dd;
const IPV6_HEADER: usize = 40;
const PROTOCOL_TCP: u8 = 6;
const TCP_MIN_HEADER: usize = 20;
/// TCP flags a segment other than the last must not carry.
const FIN: u8 = 0x01;
const PSH: u8 = 0x08;
/// Congestion window reduced: only the first segment carries it (RFC 3168 §6.1.2).
const CWR: u8 = 0x80;

/// Largest frame (Ethernet header included) smoltcp may hand the bond for segmentation: the
/// largest IPv4 packet behind an Ethernet header.
pub const MAX_SEGMENTATION_FRAME: usize = ETHERNET_HEADER + 65_535;

/// Where the headers of a TCP frame end and how to rewrite them per segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct TcpLayout {
    /// IPv6 (else IPv4).
    ipv6: bool,
    /// Offset of the TCP header.
    tcp: usize,
    /// Ethernet + IP + TCP header bytes, copied into every segment.
    headers_len: usize,
    /// TCP payload bytes of the whole frame.
    payload_len: usize,
}

impl TcpLayout {
    /// Parses an outgoing TCP frame with payload (IPv4 without fragmentation, or IPv6 without
    /// extension headers). `None` for anything else: such a frame cannot be segmented.
    pub(crate) fn parse(frame: &[u8]) -> Option<TcpLayout> {
        let ethertype = u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]);
        let ip = ETHERNET_HEADER;
        let (ipv6, tcp) = match ethertype {
            ETHERTYPE_IPV4 => {
                let header_len = usize::from(frame.get(ip)? & 0x0f) * 4;
                let fragment =
                    u16::from_be_bytes([*frame.get(ip + 6)?, *frame.get(ip + 7)?]) & 0x3fff != 0;
                if header_len < 20 || fragment || *frame.get(ip + 9)? != PROTOCOL_TCP {
                    return None;
                }
                (false, ip + header_len)
            }
            ETHERTYPE_IPV6 if *frame.get(ip + 6)? == PROTOCOL_TCP => (true, ip + IPV6_HEADER),
            _ => return None,
        };
        let tcp_header_len = usize::from(frame.get(tcp + 12)? >> 4) * 4;
        let headers_len = tcp + tcp_header_len;
        // Without payload there is nothing to segment (and smoltcp never asks).
        if tcp_header_len < TCP_MIN_HEADER || headers_len >= frame.len() {
            return None;
        }
        Some(TcpLayout {
            ipv6,
            tcp,
            headers_len,
            payload_len: frame.len() - headers_len,
        })
    }

    /// Bytes of the segment whose payload starts at `offset` (into the frame's payload).
    pub(crate) fn segment_len(&self, offset: usize, mss: usize) -> usize {
        self.headers_len + mss.min(self.payload_len.saturating_sub(offset))
    }

    /// Ethernet + IP + TCP header bytes.
    pub(crate) fn headers_len(&self) -> usize {
        self.headers_len
    }

    /// True when `offset` is past the last segment.
    pub(crate) fn is_done(&self, offset: usize) -> bool {
        offset >= self.payload_len
    }

    /// Writes the segment whose payload starts at `offset` into `out`, which is
    /// [`TcpLayout::segment_len`] bytes: the frame's headers with lengths, IPv4 identification,
    /// sequence number and flags adjusted, followed by its slice of the payload. Checksums are
    /// left for the caller (the IPv4 header's included).
    pub(crate) fn write_segment(&self, frame: &[u8], offset: usize, index: u16, out: &mut [u8]) {
        let headers = self.headers_len;
        let chunk = out.len() - headers;
        out[..headers].copy_from_slice(&frame[..headers]);
        out[headers..].copy_from_slice(&frame[headers + offset..headers + offset + chunk]);

        let ip = ETHERNET_HEADER;
        if self.ipv6 {
            let payload_len = (out.len() - ip - IPV6_HEADER) as u16;
            out[ip + 4..ip + 6].copy_from_slice(&payload_len.to_be_bytes());
        } else {
            let total_len = (out.len() - ip) as u16;
            out[ip + 2..ip + 4].copy_from_slice(&total_len.to_be_bytes());
            let ident = u16::from_be_bytes([out[ip + 4], out[ip + 5]]).wrapping_add(index);
            out[ip + 4..ip + 6].copy_from_slice(&ident.to_be_bytes());
        }

        let tcp = self.tcp;
        let sequence = u32::from_be_bytes([out[tcp + 4], out[tcp + 5], out[tcp + 6], out[tcp + 7]])
            .wrapping_add(offset as u32);
        out[tcp + 4..tcp + 8].copy_from_slice(&sequence.to_be_bytes());
        if offset + chunk < self.payload_len {
            out[tcp + 13] &= !(FIN | PSH);
        }
        if offset != 0 {
            out[tcp + 13] &= !CWR;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec::Vec;

    fn tcp_frame(ipv6: bool, payload_len: usize, flags: u8) -> Vec<u8> {
        let ip_header = if ipv6 { 40 } else { 20 };
        let tcp_header = 32; // with 12 bytes of options (timestamps)
        let mut frame = alloc::vec![0u8; 14 + ip_header + tcp_header + payload_len];
        let tcp = 14 + ip_header;
        if ipv6 {
            frame[12..14].copy_from_slice(&ETHERTYPE_IPV6.to_be_bytes());
            frame[14] = 0x60;
            frame[18..20].copy_from_slice(&((tcp_header + payload_len) as u16).to_be_bytes());
            frame[20] = PROTOCOL_TCP;
        } else {
            frame[12..14].copy_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
            frame[14] = 0x45;
            frame[16..18].copy_from_slice(&((20 + tcp_header + payload_len) as u16).to_be_bytes());
            frame[18..20].copy_from_slice(&0x1234u16.to_be_bytes());
            frame[20] = 0x40; // don't fragment
            frame[23] = PROTOCOL_TCP;
        }
        frame[tcp + 4..tcp + 8].copy_from_slice(&0xffff_fff0u32.to_be_bytes());
        frame[tcp + 12] = ((tcp_header / 4) as u8) << 4;
        frame[tcp + 13] = flags;
        for (index, byte) in frame[tcp + tcp_header..].iter_mut().enumerate() {
            *byte = (index % 251) as u8;
        }
        frame
    }

    fn segments(frame: &[u8], mss: usize) -> Vec<Vec<u8>> {
        let layout = TcpLayout::parse(frame).expect("a TCP frame");
        let mut out = Vec::new();
        let mut offset = 0;
        while !layout.is_done(offset) {
            let mut segment = alloc::vec![0u8; layout.segment_len(offset, mss)];
            layout.write_segment(frame, offset, out.len() as u16, &mut segment);
            offset += segment.len() - layout.headers_len;
            out.push(segment);
        }
        out
    }

    #[test]
    fn segments_carry_the_payload_in_order_with_adjusted_headers() {
        for ipv6 in [false, true] {
            let frame = tcp_frame(ipv6, 10_000, 0x80 | 0x10 | PSH | FIN);
            let pieces = segments(&frame, 1448);
            assert_eq!(pieces.len(), 7, "ipv6 {ipv6}");
            let tcp = if ipv6 { 54 } else { 34 };
            let mut payload = Vec::new();
            for (index, piece) in pieces.iter().enumerate() {
                let last = index == pieces.len() - 1;
                let chunk = piece.len() - (tcp + 32);
                assert_eq!(chunk, if last { 10_000 - 6 * 1448 } else { 1448 });
                if ipv6 {
                    assert_eq!(
                        u16::from_be_bytes([piece[18], piece[19]]) as usize,
                        32 + chunk
                    );
                } else {
                    assert_eq!(
                        u16::from_be_bytes([piece[16], piece[17]]) as usize,
                        20 + 32 + chunk
                    );
                    assert_eq!(
                        u16::from_be_bytes([piece[18], piece[19]]),
                        0x1234 + index as u16
                    );
                }
                let sequence = u32::from_be_bytes(piece[tcp + 4..tcp + 8].try_into().unwrap());
                assert_eq!(sequence, 0xffff_fff0u32.wrapping_add(index as u32 * 1448));
                let flags = piece[tcp + 13];
                assert_eq!(flags & (FIN | PSH) != 0, last, "FIN/PSH only on the last");
                assert_eq!(flags & CWR != 0, index == 0, "CWR only on the first");
                assert_eq!(flags & 0x10, 0x10, "ACK on all");
                payload.extend_from_slice(&piece[tcp + 32..]);
            }
            assert_eq!(payload, frame[tcp + 32..], "ipv6 {ipv6}");
        }
    }

    #[test]
    fn a_frame_within_the_mss_is_one_segment_and_other_frames_are_refused() {
        let frame = tcp_frame(false, 500, 0x18);
        assert_eq!(segments(&frame, 1448), alloc::vec![frame.clone()]);
        let mut udp = frame.clone();
        udp[23] = 17;
        assert_eq!(TcpLayout::parse(&udp), None);
        let mut fragment = frame.clone();
        fragment[20] = 0x20; // more fragments
        assert_eq!(TcpLayout::parse(&fragment), None);
        let mut short_header = frame.clone();
        short_header[34 + 12] = 4 << 4;
        assert_eq!(TcpLayout::parse(&short_header), None);
        assert_eq!(TcpLayout::parse(&frame[..40]), None, "truncated headers");
        assert_eq!(TcpLayout::parse(&[0u8; 10]), None);
    }
}
