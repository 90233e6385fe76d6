//! Address announcements sent after a path switch: gratuitous ARP and unsolicited neighbour
//! advertisements, so switches and neighbours re-learn which port our MAC is behind.
//!
//! smoltcp does not send these itself. The frames follow RFC 5227 §3 (ARP announcement: an ARP
//! request with sender and target protocol address both set to our address, to broadcast) and
//! RFC 4861 §7.2.6 (unsolicited neighbour advertisement to all-nodes, Override set, Solicited
//! clear, with the target link-layer address option, hop limit 255).

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
    let source = EthernetAddress(mac.0);
    let arp = ArpRepr::EthernetIpv4 {
        operation: ArpOperation::Request,
        source_hardware_addr: source,
        source_protocol_addr: address,
        target_hardware_addr: EthernetAddress([0; 6]),
        target_protocol_addr: address,
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
    let source = EthernetAddress(mac.0);
    let icmp = Icmpv6Repr::Ndisc(NdiscRepr::NeighborAdvert {
        flags: NdiscNeighborFlags::OVERRIDE,
        target_addr: address,
        lladdr: Some(RawHardwareAddress::from(source)),
    });
    let ip = Ipv6Repr {
        src_addr: address,
        dst_addr: IPV6_LINK_LOCAL_ALL_NODES,
        next_header: IpProtocol::Icmpv6,
        payload_len: icmp.buffer_len(),
        hop_limit: 255,
    };
    let ethernet = EthernetRepr {
        src_addr: source,
        dst_addr: ALL_NODES_MAC,
        ethertype: EthernetProtocol::Ipv6,
    };
    let mut frame = vec![0u8; ETHERNET_HEADER_LEN + ip.buffer_len() + icmp.buffer_len()];
    let mut ethernet_frame = EthernetFrame::new_unchecked(&mut frame[..]);
    ethernet.emit(&mut ethernet_frame);
    let mut ip_packet = Ipv6Packet::new_unchecked(ethernet_frame.payload_mut());
    ip.emit(&mut ip_packet);
    icmp.emit(
        &address,
        &IPV6_LINK_LOCAL_ALL_NODES,
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

    #[test]
    fn gratuitous_arp_parses_as_an_announcement() {
        let address = Ipv4Address::new(10, 0, 2, 15);
        let frame = gratuitous_arp(MAC, address);
        let ethernet = EthernetFrame::new_checked(&frame[..]).unwrap();
        assert_eq!(ethernet.dst_addr(), EthernetAddress::BROADCAST);
        assert_eq!(ethernet.src_addr(), EthernetAddress(MAC.0));
        assert_eq!(ethernet.ethertype(), EthernetProtocol::Arp);
        let arp = ArpRepr::parse(&ArpPacket::new_checked(ethernet.payload()).unwrap()).unwrap();
        assert_eq!(
            arp,
            ArpRepr::EthernetIpv4 {
                operation: ArpOperation::Request,
                source_hardware_addr: EthernetAddress(MAC.0),
                source_protocol_addr: address,
                target_hardware_addr: EthernetAddress([0; 6]),
                target_protocol_addr: address,
            }
        );
    }

    #[test]
    fn neighbor_advertisement_parses_with_valid_checksum() {
        let address = Ipv6Address::from_str("fe80::5054:ff:fe12:3456").unwrap();
        let frame = unsolicited_neighbor_advertisement(MAC, address);
        let ethernet = EthernetFrame::new_checked(&frame[..]).unwrap();
        assert_eq!(ethernet.dst_addr(), ALL_NODES_MAC);
        let ip = Ipv6Packet::new_checked(ethernet.payload()).unwrap();
        let ip_repr = Ipv6Repr::parse(&ip).unwrap();
        assert_eq!(ip_repr.hop_limit, 255);
        assert_eq!(ip_repr.dst_addr, IPV6_LINK_LOCAL_ALL_NODES);
        let icmp_packet = Icmpv6Packet::new_checked(ip.payload()).unwrap();
        // Parsing verifies the checksum (software checksum capabilities).
        let icmp = Icmpv6Repr::parse(
            &ip_repr.src_addr,
            &ip_repr.dst_addr,
            &icmp_packet,
            &ChecksumCapabilities::default(),
        )
        .unwrap();
        assert_eq!(
            icmp,
            Icmpv6Repr::Ndisc(NdiscRepr::NeighborAdvert {
                flags: NdiscNeighborFlags::OVERRIDE,
                target_addr: address,
                lladdr: Some(RawHardwareAddress::from(EthernetAddress(MAC.0))),
            })
        );
    }
}
