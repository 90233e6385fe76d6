//! virtio-net and transport feature bits (virtio 1.x §5.1.3 and §6) and the negotiation rules.

use bitflags::bitflags;

bitflags! {
    /// Feature bits, as offered by the device and accepted by the driver.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
    pub struct Features: u64 {
        /// Device handles packets with partial checksum (transmit checksum offload).
        const CSUM = 1 << 0;
        /// Driver handles packets with partial checksum (receive checksum offload).
        const GUEST_CSUM = 1 << 1;
        /// Control channel offloads reconfiguration.
        const CTRL_GUEST_OFFLOADS = 1 << 2;
        /// Device reports its maximum MTU in the `mtu` config field.
        const MTU = 1 << 3;
        /// Device has given a MAC address in the `mac` config field.
        const MAC = 1 << 5;
        /// Driver can receive TSOv4 (large merged TCP/IPv4 frames).
        const GUEST_TSO4 = 1 << 7;
        /// Driver can receive TSOv6.
        const GUEST_TSO6 = 1 << 8;
        /// Driver can receive TSO with ECN.
        const GUEST_ECN = 1 << 9;
        /// Driver can receive UFO.
        const GUEST_UFO = 1 << 10;
        /// Device can segment TCP/IPv4 (transmit TSO).
        const HOST_TSO4 = 1 << 11;
        /// Device can segment TCP/IPv6.
        const HOST_TSO6 = 1 << 12;
        /// Device can segment TCP with ECN.
        const HOST_ECN = 1 << 13;
        /// Device can fragment UDP.
        const HOST_UFO = 1 << 14;
        /// Driver can merge receive buffers (`num_buffers` in the header).
        const MRG_RXBUF = 1 << 15;
        /// Configuration `status` field (link up, announce) is available.
        const STATUS = 1 << 16;
        /// Control virtqueue is available.
        const CTRL_VQ = 1 << 17;
        /// Control channel RX mode support.
        const CTRL_RX = 1 << 18;
        /// Control channel VLAN filtering.
        const CTRL_VLAN = 1 << 19;
        /// Driver can send gratuitous packets when the device asks (VIRTIO_NET_S_ANNOUNCE).
        const GUEST_ANNOUNCE = 1 << 21;
        /// Device supports multiqueue with automatic receive steering.
        const MQ = 1 << 22;
        /// Set MAC address through the control channel.
        const CTRL_MAC_ADDR = 1 << 23;
        /// Driver can use indirect descriptors (not used by this driver).
        const RING_INDIRECT_DESC = 1 << 28;
        /// `used_event` / `avail_event` notification suppression (virtio 1.x §2.7.7, §2.7.10).
        const RING_EVENT_IDX = 1 << 29;
        /// Device complies with virtio 1.x (modern interface, little-endian, 12-byte net header).
        const VERSION_1 = 1 << 32;
        /// Device DMA goes through the platform's address translation (IOMMU) if any.
        const ACCESS_PLATFORM = 1 << 33;
        /// Packed virtqueue layout (not used by this driver).
        const RING_PACKED = 1 << 34;
        /// Device uses buffers in order (not used by this driver).
        const IN_ORDER = 1 << 35;
        /// Driver passes extra data in notifications (not used by this driver).
        const NOTIFICATION_DATA = 1 << 38;
        /// Per-queue reset (not used by this driver).
        const RING_RESET = 1 << 40;
        /// Device is the standby of a failover pair with the same MAC address (QEMU `failover=on`).
        const STANDBY = 1 << 62;
        /// Device reports link speed and duplex.
        const SPEED_DUPLEX = 1 << 63;
    }
}

/// Picks the features to accept: only those the device offers and the driver wants, minus any
/// whose prerequisite is missing (virtio 1.x §5.1.3.1), and minus the control queue when nothing
/// needs it.
pub(crate) fn select_features(offered: Features, wanted: Features) -> Features {
    let mut accepted = offered & wanted;
    if !accepted.contains(Features::CSUM) {
        accepted.remove(Features::HOST_TSO4 | Features::HOST_TSO6 | Features::HOST_ECN);
    }
    if !accepted.contains(Features::GUEST_CSUM) {
        accepted.remove(Features::GUEST_TSO4 | Features::GUEST_TSO6 | Features::GUEST_ECN);
    }
    if !accepted.contains(Features::CTRL_VQ) {
        accepted.remove(Features::GUEST_ANNOUNCE);
    }
    // The control queue is only used for the announce acknowledgement.
    if !accepted.contains(Features::GUEST_ANNOUNCE) {
        accepted.remove(Features::CTRL_VQ);
    }
    accepted
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prerequisites_are_enforced() {
        let offered = Features::VERSION_1
            | Features::HOST_TSO4
            | Features::GUEST_TSO4
            | Features::GUEST_ANNOUNCE;
        let accepted = select_features(offered, Features::all());
        assert_eq!(accepted, Features::VERSION_1);
    }

    #[test]
    fn only_offered_and_wanted_bits_survive() {
        let offered = Features::VERSION_1 | Features::MAC | Features::MQ | Features::STANDBY;
        let wanted = Features::VERSION_1 | Features::MAC | Features::STANDBY | Features::CSUM;
        assert_eq!(
            select_features(offered, wanted),
            Features::VERSION_1 | Features::MAC | Features::STANDBY
        );
    }

    #[test]
    fn standby_is_bit_62() {
        assert_eq!(Features::STANDBY.bits() >> 32, 1 << 30);
    }
}
