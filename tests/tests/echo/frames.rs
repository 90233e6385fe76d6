//! Hand-built Ethernet frames, well-formed and broken on purpose, for injection through a raw
//! packet socket (RFC 791 IPv4, RFC 768 UDP, RFC 793 TCP header layouts).

use std::net::Ipv4Addr;

/// EtherType of IPv4.
pub const ETHERTYPE_IPV4: u16 = 0x0800;
/// EtherType of ARP.
pub const ETHERTYPE_ARP: u16 = 0x0806;
/// EtherType of IPv6.
pub const ETHERTYPE_IPV6: u16 = 0x86DD;
/// Ethernet header length (no VLAN tag).
pub const ETHERNET_HEADER: usize = 14;
/// IPv4 header length without options.
pub const IPV4_HEADER: usize = 20;
/// UDP header length.
pub const UDP_HEADER: usize = 8;
/// IP protocol number of TCP.
pub const PROTOCOL_TCP: u8 = 6;
/// IP protocol number of UDP.
pub const PROTOCOL_UDP: u8 = 17;

/// A MAC address.
pub type Mac = [u8; 6];

/// The all-ones broadcast address.
pub const BROADCAST: Mac = [0xFF; 6];

/// Parses `52:54:00:12:34:56`.
pub fn parse_mac(text: &str) -> Option<Mac> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        *byte = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// The Internet checksum (RFC 1071) of `data`, folded and complemented.
pub fn internet_checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|pair| u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xFFFF {
        sum = (sum & 0xFFFF) + (sum >> 16);
    }
    !(sum as u16)
}

/// An Ethernet header followed by `payload`.
pub fn ethernet(destination: Mac, source: Mac, ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(ETHERNET_HEADER + payload.len());
    frame.extend_from_slice(&destination);
    frame.extend_from_slice(&source);
    frame.extend_from_slice(&ethertype.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

/// An IPv4 packet: 20-byte header (checksum filled in, DF set, TTL 64) and `payload`.
pub fn ipv4(source: Ipv4Addr, destination: Ipv4Addr, protocol: u8, payload: &[u8]) -> Vec<u8> {
    let total = (IPV4_HEADER + payload.len()) as u16;
    let mut packet = vec![
        0x45, 0, // version 4, IHL 5; DSCP/ECN
    ];
    packet.extend_from_slice(&total.to_be_bytes());
    packet.extend_from_slice(&[0x12, 0x34, 0x40, 0x00, 64, protocol, 0, 0]);
    packet.extend_from_slice(&source.octets());
    packet.extend_from_slice(&destination.octets());
    let checksum = internet_checksum(&packet);
    packet[10..12].copy_from_slice(&checksum.to_be_bytes());
    packet.extend_from_slice(payload);
    packet
}

/// Recomputes the header checksum of the IPv4 packet in `packet` (after a field was changed).
pub fn refresh_ipv4_checksum(packet: &mut [u8]) {
    let header_len = usize::from(packet[0] & 0x0F) * 4;
    let header_len = header_len.clamp(IPV4_HEADER, packet.len());
    packet[10..12].fill(0);
    let checksum = internet_checksum(&packet[..header_len]);
    packet[10..12].copy_from_slice(&checksum.to_be_bytes());
}

/// The pseudo-header sum input (RFC 768/793) for a transport segment.
fn pseudo_header(source: Ipv4Addr, destination: Ipv4Addr, protocol: u8, len: usize) -> Vec<u8> {
    let mut pseudo = Vec::with_capacity(12);
    pseudo.extend_from_slice(&source.octets());
    pseudo.extend_from_slice(&destination.octets());
    pseudo.extend_from_slice(&[0, protocol]);
    pseudo.extend_from_slice(&(len as u16).to_be_bytes());
    pseudo
}

/// A UDP datagram with a correct checksum.
pub fn udp(source: (Ipv4Addr, u16), destination: (Ipv4Addr, u16), payload: &[u8]) -> Vec<u8> {
    let len = UDP_HEADER + payload.len();
    let mut datagram = Vec::with_capacity(len);
    datagram.extend_from_slice(&source.1.to_be_bytes());
    datagram.extend_from_slice(&destination.1.to_be_bytes());
    datagram.extend_from_slice(&(len as u16).to_be_bytes());
    datagram.extend_from_slice(&[0, 0]);
    datagram.extend_from_slice(payload);
    let mut summed = pseudo_header(source.0, destination.0, PROTOCOL_UDP, len);
    summed.extend_from_slice(&datagram);
    let checksum = match internet_checksum(&summed) {
        // Zero means "no checksum" in UDP; a computed zero is sent as all ones.
        0 => 0xFFFF,
        checksum => checksum,
    };
    datagram[6..8].copy_from_slice(&checksum.to_be_bytes());
    datagram
}

/// A TCP segment with no options and a correct checksum.
pub fn tcp(
    source: (Ipv4Addr, u16),
    destination: (Ipv4Addr, u16),
    sequence: u32,
    flags: u8,
    payload: &[u8],
) -> Vec<u8> {
    let mut segment = Vec::with_capacity(20 + payload.len());
    segment.extend_from_slice(&source.1.to_be_bytes());
    segment.extend_from_slice(&destination.1.to_be_bytes());
    segment.extend_from_slice(&sequence.to_be_bytes());
    segment.extend_from_slice(&0u32.to_be_bytes());
    segment.extend_from_slice(&[5 << 4, flags, 0xFF, 0xFF, 0, 0, 0, 0]);
    segment.extend_from_slice(payload);
    let mut summed = pseudo_header(source.0, destination.0, PROTOCOL_TCP, segment.len());
    summed.extend_from_slice(&segment);
    let checksum = internet_checksum(&summed);
    segment[16..18].copy_from_slice(&checksum.to_be_bytes());
    segment
}

/// TCP SYN flag.
pub const TCP_SYN: u8 = 0x02;

/// Where injected traffic comes from and goes to.
#[derive(Clone, Copy, Debug)]
pub struct Path {
    /// Guest MAC.
    pub guest_mac: Mac,
    /// Source MAC (the host bridge's, so replies reach the host's sockets).
    pub host_mac: Mac,
    /// Source address.
    pub host: Ipv4Addr,
    /// Guest address.
    pub guest: Ipv4Addr,
}

impl Path {
    /// A complete, valid Ethernet/IPv4/UDP frame from `host:source_port` to `guest:port`.
    pub fn udp_frame(&self, source_port: u16, port: u16, payload: &[u8]) -> Vec<u8> {
        let datagram = udp((self.host, source_port), (self.guest, port), payload);
        self.ipv4_frame(&ipv4(self.host, self.guest, PROTOCOL_UDP, &datagram))
    }

    /// `packet` in an Ethernet frame to the guest.
    pub fn ipv4_frame(&self, packet: &[u8]) -> Vec<u8> {
        ethernet(self.guest_mac, self.host_mac, ETHERTYPE_IPV4, packet)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_match_known_values() {
        // RFC 1071 §3 example bytes.
        let data = [0x00, 0x01, 0xF2, 0x03, 0xF4, 0xF5, 0xF6, 0xF7];
        assert_eq!(internet_checksum(&data), !0xDDF2);
        // A header with its checksum filled in sums to zero.
        let packet = ipv4(
            Ipv4Addr::new(10, 77, 0, 1),
            Ipv4Addr::new(10, 77, 0, 2),
            PROTOCOL_UDP,
            &[1, 2, 3],
        );
        assert_eq!(internet_checksum(&packet[..IPV4_HEADER]), 0);
        assert_eq!(packet.len(), 23);
        assert_eq!(u16::from_be_bytes([packet[2], packet[3]]), 23);
    }

    #[test]
    fn parses_macs() {
        assert_eq!(
            parse_mac("52:54:00:12:34:5a"),
            Some([0x52, 0x54, 0, 0x12, 0x34, 0x5A])
        );
        assert_eq!(parse_mac("52:54:00:12:34"), None);
        assert_eq!(parse_mac("52:54:00:12:34:56:78"), None);
    }
}
