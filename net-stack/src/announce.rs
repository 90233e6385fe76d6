//! Address announcements sent at bring-up and after a path switch (gratuitous ARP, unsolicited
//! neighbour advertisements) and the gateway solicitations sent with them.
//!
//! smoltcp sends none of these itself. The frames follow RFC 5227 §3 (ARP announcement: an ARP
//! request with sender and target protocol address both set to our address, to broadcast),
//! RFC 4861 §7.2.6 (unsolicited neighbour advertisement to all-nodes, Override set, Solicited
//! clear, with the target link-layer address option, hop limit 255), RFC 826 (ARP request) and
//! RFC 4861 §7.2.2 (neighbour solicitation to the target's solicited-node multicast address, with
//! the source link-layer address option).

use alloc::vec;
use alloc::vec::Vec;

use net_device::MacAddress;
use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol,
    EthernetRepr, IPV6_LINK_LOCAL_ALL_NODES, Icmpv6Packet, Icmpv6Repr, IpProtocol, Ipv4Address,
    Ipv6Address, Ipv6Packet, Ipv6Repr, NdiscNeighborFlags, NdiscRepr, RawHardwareAddress,
};

/// Ethernet multicast address for IPv6 all-nodes (ff02::1), RFC 2464 §7.
const ALL_NODES_MAC: EthernetAddress = EthernetAddress([0x33, 0x33, 0, 0, 0, 1]);
const ETHERNET_HEADER_LEN: usize = 14;

/// A gratuitous ARP (ARP announcement) for `address` owned by `mac`.
pub fn gratuitous_arp(mac: MacAddress, address: Ipv4Address) -> Vec<u8> {
    arp_request(mac, address, address)
}

/// A broadcast ARP request from `sender` (owned by `mac`) asking who has `target`.
pub fn arp_request(mac: MacAddress, sender: Ipv4Address, target: Ipv4Address) -> Vec<u8> {
    let source = EthernetAddress(mac.0);
    let arp = ArpRepr::EthernetIpv4 {
        operation: ArpOperation::Request,
        source_hardware_addr: source,
        source_protocol_addr: sender,
        target_hardware_addr: EthernetAddress([0; 6]),
        target_protocol_addr: target,
    };
    let ethernet = EthernetRepr {
        src_addr: source,
        dst_addr: EthernetAddress::BROADCAST,
        ethertype: EthernetProtocol::Arp,
    };
    let mut frame = vec![0u8; ETHERNET_HEADER_LEN + arp.buffer_len()];
    let mut ethernet_frame = EthernetFrame::new_unchecked(&mut frame[..]);
    ethernet.emit(&mut ethernet_frame);
    arp.emit(&mut ArpPacket::new_unchecked(ethernet_frame.payload_mut()));
    frame
}

/// An unsolicited neighbour advertisement for `address` owned by `mac`, to all nodes.
pub fn unsolicited_neighbor_advertisement(mac: MacAddress, address: Ipv6Address) -> Vec<u8> {
    let advertisement = Icmpv6Repr::Ndisc(NdiscRepr::NeighborAdvert {
        flags: NdiscNeighborFlags::OVERRIDE,
        target_addr: address,
        lladdr: Some(RawHardwareAddress::from(EthernetAddress(mac.0))),
    });
    neighbor_discovery_frame(
        mac,
        ALL_NODES_MAC,
        address,
        IPV6_LINK_LOCAL_ALL_NODES,
        &advertisement,
    )
}

/// A neighbour solicitation from `source` (owned by `mac`) for `target`, to the target's
/// solicited-node multicast address.
pub fn neighbor_solicitation(mac: MacAddress, source: Ipv6Address, target: Ipv6Address) -> Vec<u8> {
    let solicitation = Icmpv6Repr::Ndisc(NdiscRepr::NeighborSolicit {
        target_addr: target,
        lladdr: Some(RawHardwareAddress::from(EthernetAddress(mac.0))),
    });
    let group = solicited_node_group(target);
    let octets = group.octets();
    // RFC 2464 §7: 33:33 followed by the group address's last four bytes.
    let group_mac = EthernetAddress([0x33, 0x33, octets[12], octets[13], octets[14], octets[15]]);
    neighbor_discovery_frame(mac, group_mac, source, group, &solicitation)
}

/// The solicited-node multicast group of `address`: ff02::1:ff00:0/104 plus its last three
/// bytes (RFC 4291 §2.7.1).
fn solicited_node_group(address: Ipv6Address) -> Ipv6Address {
    let low = address.octets();
    Ipv6Address::new(
        0xff02,
        0,
        0,
        0,
        0,
        1,
        0xff00 | u16::from(low[13]),
        u16::from_be_bytes([low[14], low[15]]),
    )
}

/// An Ethernet frame carrying neighbour-discovery message `icmp` (hop limit 255, RFC 4861 §6.1).
fn neighbor_discovery_frame(
    mac: MacAddress,
    destination_mac: EthernetAddress,
    source: Ipv6Address,
    destination: Ipv6Address,
    icmp: &Icmpv6Repr<'_>,
) -> Vec<u8> {
    let ip = Ipv6Repr {
        src_addr: source,
        dst_addr: destination,
        next_header: IpProtocol::Icmpv6,
        payload_len: icmp.buffer_len(),
        hop_limit: 255,
    };
    let ethernet = EthernetRepr {
        src_addr: EthernetAddress(mac.0),
        dst_addr: destination_mac,
        ethertype: EthernetProtocol::Ipv6,
    };
    let mut frame = vec![0u8; ETHERNET_HEADER_LEN + ip.buffer_len() + icmp.buffer_len()];
    let mut ethernet_frame = EthernetFrame::new_unchecked(&mut frame[..]);
    ethernet.emit(&mut ethernet_frame);
    let mut ip_packet = Ipv6Packet::new_unchecked(ethernet_frame.payload_mut());
    ip.emit(&mut ip_packet);
    icmp.emit(
        &source,
        &destination,
        &mut Icmpv6Packet::new_unchecked(ip_packet.payload_mut()),
        &ChecksumCapabilities::default(),
    );
    frame
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::str::FromStr;

    const MAC: MacAddress = MacAddress([0x52, 0x54, 0, 0x12, 0x34, 0x56]);

    /// The destination and ARP content of an ARP frame from [`MAC`].
    fn parse_arp_frame(frame: &[u8]) -> (EthernetAddress, ArpRepr) {
        let ethernet = EthernetFrame::new_checked(frame).unwrap();
        assert_eq!(ethernet.src_addr(), EthernetAddress(MAC.0));
        assert_eq!(ethernet.ethertype(), EthernetProtocol::Arp);
        let arp = ArpRepr::parse(&ArpPacket::new_checked(ethernet.payload()).unwrap()).unwrap();
        (ethernet.dst_addr(), arp)
    }

    /// An ARP request from [`MAC`] at `sender` for `target`.
    fn request_from_mac(sender: Ipv4Address, target: Ipv4Address) -> ArpRepr {
        ArpRepr::EthernetIpv4 {
            operation: ArpOperation::Request,
            source_hardware_addr: EthernetAddress(MAC.0),
            source_protocol_addr: sender,
            target_hardware_addr: EthernetAddress([0; 6]),
            target_protocol_addr: target,
        }
    }

    /// The destinations and ICMPv6 message of a neighbour-discovery frame; parsing verifies
    /// the checksum (software checksum capabilities) and the hop limit is checked.
    fn parse_neighbor_discovery_frame(frame: &[u8]) -> (EthernetAddress, Ipv6Repr, Icmpv6Repr<'_>) {
        let ethernet = EthernetFrame::new_checked(frame).unwrap();
        assert_eq!(ethernet.src_addr(), EthernetAddress(MAC.0));
        let destination_mac = ethernet.dst_addr();
        let ip = Ipv6Packet::new_checked(&frame[ETHERNET_HEADER_LEN..]).unwrap();
        let ip_repr = Ipv6Repr::parse(&ip).unwrap();
        assert_eq!(ip_repr.hop_limit, 255);
        let payload = &frame[ETHERNET_HEADER_LEN + ip_repr.buffer_len()..];
        let icmp = Icmpv6Repr::parse(
            &ip_repr.src_addr,
            &ip_repr.dst_addr,
            &Icmpv6Packet::new_checked(payload).unwrap(),
            &ChecksumCapabilities::default(),
        )
        .unwrap();
        (destination_mac, ip_repr, icmp)
    }

    #[test]
    fn gratuitous_arp_parses_as_an_announcement() {
        let address = Ipv4Address::new(10, 0, 2, 15);
        let (destination, arp) = parse_arp_frame(&gratuitous_arp(MAC, address));
        assert_eq!(destination, EthernetAddress::BROADCAST);
        assert_eq!(arp, request_from_mac(address, address));
    }

    #[test]
    fn neighbor_advertisement_parses_with_valid_checksum() {
        let address = Ipv6Address::from_str("fe80::5054:ff:fe12:3456").unwrap();
        let frame = unsolicited_neighbor_advertisement(MAC, address);
        let (destination, ip, icmp) = parse_neighbor_discovery_frame(&frame);
        assert_eq!(destination, ALL_NODES_MAC);
        assert_eq!(ip.dst_addr, IPV6_LINK_LOCAL_ALL_NODES);
        assert_eq!(
            icmp,
            Icmpv6Repr::Ndisc(NdiscRepr::NeighborAdvert {
                flags: NdiscNeighborFlags::OVERRIDE,
                target_addr: address,
                lladdr: Some(RawHardwareAddress::from(EthernetAddress(MAC.0))),
            })
        );
    }

    #[test]
    fn arp_request_asks_for_the_target_from_the_sender() {
        let sender = Ipv4Address::new(10, 0, 2, 15);
        let gateway = Ipv4Address::new(10, 0, 2, 2);
        let (destination, arp) = parse_arp_frame(&arp_request(MAC, sender, gateway));
        assert_eq!(destination, EthernetAddress::BROADCAST);
        assert_eq!(arp, request_from_mac(sender, gateway));
    }

    #[test]
    fn neighbor_solicitation_goes_to_the_solicited_node_group_with_valid_checksum() {
        let source = Ipv6Address::from_str("fe80::5054:ff:fe12:3456").unwrap();
        let gateway = Ipv6Address::from_str("2001:db8::1:2:3").unwrap();
        let frame = neighbor_solicitation(MAC, source, gateway);
        let (destination, ip, icmp) = parse_neighbor_discovery_frame(&frame);
        assert_eq!(
            destination,
            EthernetAddress([0x33, 0x33, 0xff, 0x02, 0x00, 0x03])
        );
        assert_eq!(ip.src_addr, source);
        assert_eq!(
            ip.dst_addr,
            Ipv6Address::from_str("ff02::1:ff02:3").unwrap()
        );
        assert_eq!(
            icmp,
            Icmpv6Repr::Ndisc(NdiscRepr::NeighborSolicit {
                target_addr: gateway,
                lladdr: Some(RawHardwareAddress::from(EthernetAddress(MAC.0))),
            })
        );
    }
}
