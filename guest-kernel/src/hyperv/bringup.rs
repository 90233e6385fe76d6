//! Which synthetic NIC the kernel brings up (virtio-net on KVM, netvsc over VMBus on Hyper-V),
//! which VMBus offers are netvsc NICs, and the console lines that say so.
//!
//! Pure decisions over what the kernel found, so they are unit-tested on the host; the kernel
//! glue (`net::hyperv`) acts on them.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use super::HyperV;

/// The synthetic network interface's VMBus interface type, f8615163-df3e-46c5-913f-f2d2f965ed0e,
/// in the offer's (Windows mixed-endian) byte order (reference §2.2).
pub const NETVSC_INTERFACE: [u8; 16] = [
    0x63, 0x51, 0x61, 0xf8, 0x3e, 0xdf, 0xc5, 0x46, 0x91, 0x3f, 0xf2, 0xd2, 0xf9, 0x65, 0xed, 0x0e,
];

/// Formats an offer-order GUID as text (first three fields little-endian).
pub fn guid_text(bytes: &[u8; 16]) -> String {
    format!(
        "{:08x}-{:04x}-{:04x}-{:02x}{:02x}-{:02x}{:02x}{:02x}{:02x}{:02x}{:02x}",
        u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]),
        u16::from_le_bytes([bytes[4], bytes[5]]),
        u16::from_le_bytes([bytes[6], bytes[7]]),
        bytes[8],
        bytes[9],
        bytes[10],
        bytes[11],
        bytes[12],
        bytes[13],
        bytes[14],
        bytes[15]
    )
}

/// What the kernel needs to know about one VMBus offer to pick NICs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OfferSummary {
    /// Interface type (what kind of device).
    pub interface: [u8; 16],
    /// Instance (which device).
    pub instance: [u8; 16],
    /// The host's channel id.
    pub relid: u32,
    /// 0 for a device's primary channel, 1.. for its subchannels.
    pub sub_channel_index: u16,
}

impl OfferSummary {
    /// True for the primary channel of a synthetic NIC.
    pub fn is_netvsc_primary(&self) -> bool {
        self.interface == NETVSC_INTERFACE && self.sub_channel_index == 0
    }
}

/// The primary channels of the synthetic NICs among `offers`, lowest relid first (the host
/// numbers channels in the order it added the devices, so the first NIC comes first).
pub fn netvsc_offers(offers: &[OfferSummary]) -> Vec<OfferSummary> {
    let mut nics: Vec<OfferSummary> = offers
        .iter()
        .copied()
        .filter(OfferSummary::is_netvsc_primary)
        .collect();
    nics.sort_by_key(|offer| offer.relid);
    nics
}

/// Which synthetic path to bring up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyntheticPlan {
    /// A virtio-net device is on PCI (KVM/QEMU): unchanged behaviour, VMBus is not touched
    /// even where a hypervisor offers both.
    VirtioNet,
    /// Hyper-V with VMBus allowed: connect the VMBus client and start netvsc.
    Netvsc,
    /// Hyper-V, but this partition may not use VMBus (privileges missing).
    VmbusNotAllowed,
    /// No synthetic NIC anywhere.
    None,
}

/// Decides the synthetic path from what PCI and CPUID showed.
pub fn synthetic_plan(virtio_net_on_pci: bool, hyper_v: Option<&HyperV>) -> SyntheticPlan {
    match (virtio_net_on_pci, hyper_v) {
        (true, _) => SyntheticPlan::VirtioNet,
        (false, Some(hyper_v)) if hyper_v.has_vmbus() => SyntheticPlan::Netvsc,
        (false, Some(_)) => SyntheticPlan::VmbusNotAllowed,
        (false, None) => SyntheticPlan::None,
    }
}

/// What the console says once netvsc is up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetvscUp {
    /// VMBus version granted, `(major, minor)`.
    pub vmbus_version: (u16, u16),
    /// NVSP version negotiated, `(major, minor)`.
    pub nvsp_version: (u16, u16),
    /// The channel id.
    pub relid: u32,
    /// The device instance GUID (offer order).
    pub instance: [u8; 16],
    /// The MAC, formatted.
    pub mac: String,
    /// The MTU the host reported.
    pub mtu: u32,
}

/// The console line that names the synthetic path once netvsc is up.
pub fn netvsc_up_line(up: &NetvscUp) -> String {
    format!(
        "net: synthetic path up: netvsc over VMBus {}.{} (NVSP {}.{}, relid {}, instance {}), MAC {}, MTU {}",
        up.vmbus_version.0,
        up.vmbus_version.1,
        up.nvsp_version.0,
        up.nvsp_version.1,
        up.relid,
        guid_text(&up.instance),
        up.mac,
        up.mtu
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hyperv::{Features, Privileges};

    fn hyper_v(privileges: Privileges) -> HyperV {
        HyperV {
            max_leaf: 0x4000_000b,
            build: 20348,
            major: 10,
            minor: 0,
            privileges,
            features: Features::empty(),
        }
    }

    fn offer(interface: [u8; 16], relid: u32, sub_channel_index: u16) -> OfferSummary {
        OfferSummary {
            interface,
            instance: [relid as u8; 16],
            relid,
            sub_channel_index,
        }
    }

    #[test]
    fn the_netvsc_guid_reads_as_the_documented_text() {
        assert_eq!(
            guid_text(&NETVSC_INTERFACE),
            "f8615163-df3e-46c5-913f-f2d2f965ed0e"
        );
        use zerocopy::IntoBytes;
        assert_eq!(
            &NETVSC_INTERFACE[..],
            vmbus::guid::interface::NETWORK.as_bytes(),
            "the VMBus client's offers compare equal"
        );
    }

    #[test]
    fn only_primary_netvsc_channels_are_nics_in_relid_order() {
        let scsi = [
            0xd9, 0x63, 0x61, 0xba, 0xa1, 0x04, 0x29, 0x4d, 0xb6, 0x05, 0x72, 0xe2, 0xff, 0xb1,
            0xdc, 0x7f,
        ];
        let offers = [
            offer(scsi, 1, 0),
            offer(NETVSC_INTERFACE, 14, 0),
            offer(NETVSC_INTERFACE, 15, 1),
            offer(NETVSC_INTERFACE, 9, 0),
        ];
        let nics = netvsc_offers(&offers);
        assert_eq!(
            nics.iter().map(|nic| nic.relid).collect::<Vec<_>>(),
            [9, 14]
        );
        assert!(netvsc_offers(&[offer(scsi, 1, 0)]).is_empty());
    }

    #[test]
    fn virtio_net_wins_then_vmbus_when_allowed() {
        let vmbus = Privileges::ACCESS_SYNIC
            | Privileges::ACCESS_HYPERCALL
            | Privileges::POST_MESSAGES
            | Privileges::SIGNAL_EVENTS;
        // What OpenVMM's KVM backend grants (0x87f): no PostMessages/SignalEvents bits, yet
        // both hypercalls work there.
        let openvmm = Privileges::from_bits_truncate(0x87f);
        assert_eq!(
            synthetic_plan(false, Some(&hyper_v(openvmm))),
            SyntheticPlan::Netvsc
        );
        assert_eq!(
            synthetic_plan(true, Some(&hyper_v(vmbus))),
            SyntheticPlan::VirtioNet,
            "KVM with Hyper-V enlightenments and a virtio NIC keeps virtio-net"
        );
        assert_eq!(synthetic_plan(true, None), SyntheticPlan::VirtioNet);
        assert_eq!(
            synthetic_plan(false, Some(&hyper_v(vmbus))),
            SyntheticPlan::Netvsc
        );
        assert_eq!(
            synthetic_plan(false, Some(&hyper_v(Privileges::ACCESS_SYNIC))),
            SyntheticPlan::VmbusNotAllowed
        );
        assert_eq!(synthetic_plan(false, None), SyntheticPlan::None);
    }

    #[test]
    fn the_up_line_names_the_path_and_versions() {
        let line = netvsc_up_line(&NetvscUp {
            vmbus_version: (5, 3),
            nvsp_version: (6, 1),
            relid: 14,
            instance: NETVSC_INTERFACE,
            mac: String::from("00:15:5d:01:02:03"),
            mtu: 1500,
        });
        assert_eq!(
            line,
            "net: synthetic path up: netvsc over VMBus 5.3 (NVSP 6.1, relid 14, instance \
             f8615163-df3e-46c5-913f-f2d2f965ed0e), MAC 00:15:5d:01:02:03, MTU 1500"
        );
    }
}
