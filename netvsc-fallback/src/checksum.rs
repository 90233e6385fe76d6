//! Internet checksum helpers: completing partial (NEEDS_CSUM) checksums and finding the TCP
//! headers of a frame for segmentation offload.

/// One's-complement sum of `data` added to `initial` (the shared scalar core).
pub(crate) fn ones_complement_sum(data: &[u8], initial: u64) -> u64 {
    net_device::checksum::add(initial, data)
}

pub(crate) use net_device::checksum::fold;

/// Where a partial checksum would be stored, when it does not fit in the frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ChecksumOutOfBounds {
    /// `csum_start`.
    pub start: usize,
    /// `csum_offset`.
    pub offset: usize,
    /// Frame length.
    pub len: usize,
}

/// Completes a partial checksum in place: the field at `start + offset` holds the pseudo-header
/// sum, so the one's complement of the sum over `frame[start..]` is the final checksum
/// (virtio 1.x §5.1.6.2, "Packet Transmission" point 3).
pub(crate) fn complete_partial_checksum(
    frame: &mut [u8],
    start: usize,
    offset: usize,
) -> Result<(), ChecksumOutOfBounds> {
    let field = start.checked_add(offset);
    let Some(field) =
        field.filter(|field| field.checked_add(2).is_some_and(|end| end <= frame.len()))
    else {
        return Err(ChecksumOutOfBounds {
            start,
            offset,
            len: frame.len(),
        });
    };
    let checksum = !fold(ones_complement_sum(&frame[start..], 0));
    // A computed 0 is sent as 0xFFFF: the two are equal in one's complement, and UDP reserves
    // 0 for "no checksum".
    let checksum = if checksum == 0 { 0xFFFF } else { checksum };
    frame[field..field + 2].copy_from_slice(&checksum.to_be_bytes());
    Ok(())
}

/// Location of the TCP header in an Ethernet frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct TcpFrameLayout {
    /// Offset of the TCP header (the checksum start).
    pub tcp_offset: usize,
    /// Offset of the TCP payload (all headers included), the virtio `hdr_len`.
    pub headers_len: usize,
    /// IPv6 rather than IPv4.
    pub ipv6: bool,
}

const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_IPV6: u16 = 0x86DD;
const ETHERTYPE_VLAN: u16 = 0x8100;
const ETHERTYPE_QINQ: u16 = 0x88A8;
const IP_PROTOCOL_TCP: u8 = 6;
/// Offset of the TCP checksum within the TCP header.
pub(crate) const TCP_CHECKSUM_OFFSET: usize = 16;

/// Finds the TCP header of a TCP/IPv4 or TCP/IPv6 frame (up to two VLAN tags, no IPv6
/// extension headers). `None` for anything else or a truncated frame.
pub(crate) fn parse_tcp_frame(frame: &[u8]) -> Option<TcpFrameLayout> {
    let be16 = |offset: usize| -> Option<u16> {
        Some(u16::from_be_bytes([
            *frame.get(offset)?,
            *frame.get(offset + 1)?,
        ]))
    };
    let mut ethertype_offset = 12;
    let mut ethertype = be16(ethertype_offset)?;
    for _ in 0..2 {
        if ethertype != ETHERTYPE_VLAN && ethertype != ETHERTYPE_QINQ {
            break;
        }
        ethertype_offset += 4;
        ethertype = be16(ethertype_offset)?;
    }
    let ip_offset = ethertype_offset + 2;
    let (tcp_offset, ipv6) = match ethertype {
        ETHERTYPE_IPV4 => {
            let version_and_length = *frame.get(ip_offset)?;
            let ip_header_len = usize::from(version_and_length & 0x0F) * 4;
            if version_and_length >> 4 != 4 || ip_header_len < 20 {
                return None;
            }
            if *frame.get(ip_offset + 9)? != IP_PROTOCOL_TCP {
                return None;
            }
            (ip_offset + ip_header_len, false)
        }
        ETHERTYPE_IPV6 => {
            if *frame.get(ip_offset)? >> 4 != 6 || *frame.get(ip_offset + 6)? != IP_PROTOCOL_TCP {
                return None;
            }
            (ip_offset + 40, true)
        }
        _ => return None,
    };
    let tcp_header_len = usize::from(*frame.get(tcp_offset + 12)? >> 4) * 4;
    let headers_len = tcp_offset + tcp_header_len;
    if tcp_header_len < 20 || headers_len > frame.len() {
        return None;
    }
    Some(TcpFrameLayout {
        tcp_offset,
        headers_len,
        ipv6,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Builds an Ethernet + IPv4 + TCP frame with `payload` and a *complete* TCP checksum
    /// computed the straightforward way (pseudo header + segment with a zero checksum field).
    pub(crate) fn tcp_ipv4_frame(payload: &[u8]) -> Vec<u8> {
        let mut frame = Vec::new();
        frame.extend_from_slice(&[0x52, 0x54, 0, 0x12, 0x34, 0x56]); // destination
        frame.extend_from_slice(&[0x52, 0x54, 0, 0xab, 0xcd, 0xef]); // source
        frame.extend_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
        let total_len = (20 + 20 + payload.len()) as u16;
        let mut ip = vec![
            0x45,
            0,
            0,
            0,
            0x12,
            0x34,
            0x40,
            0,
            64,
            IP_PROTOCOL_TCP,
            0,
            0,
        ];
        ip[2..4].copy_from_slice(&total_len.to_be_bytes());
        ip.extend_from_slice(&[10, 0, 2, 15, 10, 0, 2, 2]);
        let ip_checksum = !reference_checksum(&ip);
        ip[10..12].copy_from_slice(&ip_checksum.to_be_bytes());
        frame.extend_from_slice(&ip);
        let mut tcp = vec![
            0x1f, 0x90, 0xc3, 0x50, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x18, 0xff, 0xff,
        ];
        tcp.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
        tcp.extend_from_slice(payload);
        let checksum = !reference_checksum(&[pseudo_header(&ip, tcp.len()), tcp.clone()].concat());
        tcp[16..18].copy_from_slice(&checksum.to_be_bytes());
        frame.extend_from_slice(&tcp);
        frame
    }

    /// The IPv4 pseudo header for a TCP segment of `tcp_len` bytes.
    pub(crate) fn pseudo_header(ip: &[u8], tcp_len: usize) -> Vec<u8> {
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&ip[12..20]);
        pseudo.extend_from_slice(&[0, IP_PROTOCOL_TCP]);
        pseudo.extend_from_slice(&(tcp_len as u16).to_be_bytes());
        pseudo
    }

    /// A deliberately naive RFC 1071 sum, independent of the driver's implementation.
    pub(crate) use net_device::checksum::reference as reference_checksum;

    /// Turns a fully checksummed TCP/IPv4 frame into its partial form: the checksum field holds
    /// the folded pseudo-header sum, as a NEEDS_CSUM sender leaves it.
    pub(crate) fn make_partial(frame: &[u8]) -> Vec<u8> {
        let mut partial = frame.to_vec();
        let tcp_len = frame.len() - 34;
        let pseudo = reference_checksum(&pseudo_header(&frame[14..34], tcp_len));
        partial[50..52].copy_from_slice(&pseudo.to_be_bytes());
        partial
    }

    #[test]
    fn completes_partial_checksum_like_the_reference() {
        for payload_len in [0usize, 1, 2, 3, 100, 1397, 1460] {
            let payload: Vec<u8> = (0..payload_len).map(|i| (i * 7 + 3) as u8).collect();
            let complete = tcp_ipv4_frame(&payload);
            let mut partial = make_partial(&complete);
            assert_ne!(partial, complete);
            complete_partial_checksum(&mut partial, 34, 16).unwrap();
            assert_eq!(partial, complete, "payload of {payload_len} bytes");
        }
    }

    #[test]
    fn rejects_checksum_field_outside_frame() {
        let mut frame = [0u8; 40];
        assert!(complete_partial_checksum(&mut frame, 34, 5).is_err());
        assert!(complete_partial_checksum(&mut frame, 41, 0).is_err());
        assert!(complete_partial_checksum(&mut frame, usize::MAX, 16).is_err());
        assert!(complete_partial_checksum(&mut frame, 34, 4).is_ok());
    }

    #[test]
    fn finds_tcp_headers() {
        let frame = tcp_ipv4_frame(&[1, 2, 3]);
        assert_eq!(
            parse_tcp_frame(&frame),
            Some(TcpFrameLayout {
                tcp_offset: 34,
                headers_len: 54,
                ipv6: false
            })
        );
        let mut udp = frame.clone();
        udp[23] = 17;
        assert_eq!(parse_tcp_frame(&udp), None);
        assert_eq!(parse_tcp_frame(&frame[..40]), None);
        let mut ipv6 = frame[..14].to_vec();
        ipv6[12..14].copy_from_slice(&ETHERTYPE_IPV6.to_be_bytes());
        let mut ip6 = vec![0x60, 0, 0, 0, 0, 20, IP_PROTOCOL_TCP, 64];
        ip6.extend_from_slice(&[0u8; 32]);
        ipv6.extend_from_slice(&ip6);
        ipv6.extend_from_slice(&frame[34..]);
        assert_eq!(
            parse_tcp_frame(&ipv6),
            Some(TcpFrameLayout {
                tcp_offset: 54,
                headers_len: 74,
                ipv6: true
            })
        );
    }
}
