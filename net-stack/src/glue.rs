//! `smoltcp::phy::Device` for the bond: smoltcp sees one Ethernet device.
//!
//! * Receive tokens own a frame copied out of the device ring by [`Bond::poll`]; the buffer goes
//!   back to the bond's pool after smoltcp consumed it.
//! * Transmit tokens write straight into the active device's buffer. `transmit()` returns `None`
//!   while the active ring is full or no path is up: back-pressure, smoltcp keeps the data and
//!   sends it as soon as a path can take it. (Dropping instead would make TCP back off its
//!   retransmission timer during the outage and recover seconds after the path returns.) The
//!   stack does not busy-poll meanwhile: [`crate::NetStack::next_wakeup_ns`] ignores smoltcp's
//!   "send now" while no path is up. A transmit token handed out with a received frame (for an
//!   immediate reply) drops and counts its frame if the path vanished in between.
//! * Capabilities: MTU is the bond's (at most the synthetic NIC's; a VF with a smaller MTU is
//!   never used), `max_burst_size: None` (a `Some` clamps the TCP window, toolchain notes §2),
//!   checksums left to the bond, and TCP segmentation offload up to 64 KiB. smoltcp fixes these
//!   when the interface is created while the path (and its offloads) can change at any time, so
//!   the bond decides per frame: the active NIC completes checksums and segments large frames
//!   when it offers that, the bond does it in software otherwise.
//! * Every outgoing TCP segment advertises one window unit less than smoltcp chose, so the
//!   window edge a peer sees never moves backwards ([`crate::window_edge`]).

use alloc::vec::Vec;

use core::num::{NonZeroU16, NonZeroUsize};

use smoltcp::phy::{
    Checksum, ChecksumCapabilities, Device, DeviceCapabilities, Medium, PacketMeta, RxToken,
    TxToken,
};
use smoltcp::time::Instant;

use crate::bond::{Bond, BufferPool, ETHERNET_HEADER_LEN, Paths, TxReadiness};
use crate::segmentation::MAX_SEGMENTATION_FRAME;

/// A received frame lent to smoltcp.
pub struct BondRxToken<'a> {
    frame: Vec<u8>,
    free: &'a mut BufferPool,
}

impl RxToken for BondRxToken<'_> {
    fn consume<R, F>(self, f: F) -> R
    where
        F: FnOnce(&[u8]) -> R,
    {
        let result = f(&self.frame);
        self.free.recycle(self.frame);
        result
    }
}

/// Permission to send one frame on the bond's active path.
pub struct BondTxToken<'a> {
    paths: &'a mut Paths,
    /// smoltcp's segmentation request for this frame.
    segment_size: Option<u16>,
}

impl TxToken for BondTxToken<'_> {
    fn consume<R, F>(self, len: usize, f: F) -> R
    where
        F: FnOnce(&mut [u8]) -> R,
    {
        // Before the bond computes the checksums (see `window_edge` for why).
        self.paths
            .transmit_with(len, self.segment_size, |frame: &mut [u8]| {
                let result = f(frame);
                crate::window_edge::hold_back_one_unit(frame);
                result
            })
    }

    fn set_meta(&mut self, meta: PacketMeta) {
        self.segment_size = meta.segmentation_offload_size.map(NonZeroU16::get);
    }
}

impl Device for Bond {
    type RxToken<'a>
        = BondRxToken<'a>
    where
        Self: 'a;
    type TxToken<'a>
        = BondTxToken<'a>
    where
        Self: 'a;

    fn receive(&mut self, _timestamp: Instant) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        let frame = self.rx.pop()?;
        Some((
            BondRxToken {
                frame,
                free: &mut self.rx.free,
            },
            BondTxToken {
                paths: &mut self.paths,
                segment_size: None,
            },
        ))
    }

    fn transmit(&mut self, _timestamp: Instant) -> Option<Self::TxToken<'_>> {
        // Segments of the previous large frame go first: TCP data stays in order.
        self.paths.send_pending_segments();
        match self.paths.readiness() {
            TxReadiness::Ready => Some(BondTxToken {
                paths: &mut self.paths,
                segment_size: None,
            }),
            TxReadiness::Busy => None,
            TxReadiness::NoPath => {
                self.paths.tx_blocked_no_path += 1;
                None
            }
        }
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut capabilities = DeviceCapabilities::default();
        capabilities.medium = Medium::Ethernet;
        capabilities.max_transmission_unit = self.ip_mtu() + ETHERNET_HEADER_LEN;
        capabilities.max_burst_size = None;
        // The bond fills in and verifies checksums itself (see `checksum`), or has the NIC do it;
        // but a UDP datagram reassembled from IPv4 fragments is only whole inside smoltcp, so
        // smoltcp verifies received UDP checksums.
        let mut checksum = ChecksumCapabilities::ignored();
        checksum.udp = Checksum::Rx;
        capabilities.checksum = checksum;
        // Large TCP frames on every path: the NIC segments them where it can, the bond
        // elsewhere (see `segmentation`).
        let segmentation = NonZeroUsize::new(MAX_SEGMENTATION_FRAME);
        capabilities.segmentation.tcpv4 = segmentation;
        capabilities.segmentation.tcpv6 = segmentation;
        capabilities
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bond::BondConfig;
    use crate::fake::FakeDevice;
    use alloc::boxed::Box;
    use net_device::{LinkState, MacAddress};

    const MAC: MacAddress = MacAddress([0x02, 0, 0, 0, 0, 1]);

    #[test]
    fn capabilities_leave_checksums_to_the_bond_and_set_no_burst_limit() {
        let (device, _control) = FakeDevice::new("virtio-net", MAC);
        let bond = Bond::new(Box::new(device), 1500, BondConfig::default());
        let capabilities = bond.capabilities();
        assert_eq!(capabilities.max_transmission_unit, 1514);
        assert_eq!(capabilities.max_burst_size, None);
        assert!(matches!(capabilities.checksum.tcp, Checksum::None));
        assert!(matches!(capabilities.checksum.ipv4, Checksum::None));
        assert!(matches!(capabilities.checksum.udp, Checksum::Rx));
    }

    #[test]
    fn tokens_move_frames_and_respect_ring_state() {
        let (device, control) = FakeDevice::new("virtio-net", MAC);
        control.set_tx_ring_capacity(1);
        let mut bond = Bond::new(Box::new(device), 1500, BondConfig::default());
        control.inject_rx(&[0x55; 60]);
        bond.poll(1);
        let (rx, tx) = bond.receive(Instant::ZERO).expect("a frame is queued");
        assert_eq!(rx.consume(|frame| frame.len()), 60);
        tx.consume(42, |buffer| buffer.fill(7));
        assert!(bond.receive(Instant::ZERO).is_none());
        assert!(
            bond.transmit(Instant::ZERO).is_none(),
            "ring full: back-pressure"
        );
        bond.flush();
        assert_eq!(control.take_tx(), [alloc::vec![7u8; 42]]);
        bond.poll(2);
        assert!(bond.transmit(Instant::ZERO).is_some());
        control.set_link(LinkState::Down);
        bond.poll(3);
        assert!(
            bond.transmit(Instant::ZERO).is_none(),
            "no path: smoltcp keeps the data"
        );
        assert_eq!(bond.stats().tx_blocked_no_path, 1);
        // A reply token obtained with a received frame drops (and counts) if the path vanished.
        control.inject_rx(&[0x55; 60]);
        control.set_link(LinkState::Up);
        bond.poll(4);
        let (_rx, tx) = bond.receive(Instant::ZERO).expect("a frame is queued");
        control.set_link(LinkState::Down);
        tx.consume(60, |buffer| buffer.fill(1));
        assert_eq!(bond.stats().tx_dropped_no_path, 1);
        bond.flush();
        assert!(control.take_tx().is_empty());
    }
}
