//! Modern virtio-pci transport pieces (virtio 1.x §4.1): vendor capability parsing, the register
//! windows the kernel maps for the driver, and the register layout inside them.
//!
//! The kernel walks the PCI capability list, hands each vendor capability (ID 0x09) to
//! [`parse_virtio_pci_capability`], maps the first usable common, notify, ISR and device
//! structures (uncached) and passes them as [`VirtioPciRegions`]. The driver itself knows nothing
//! about PCI. The kernel must also enable memory decoding and bus mastering, and enable MSI-X in
//! the capability before the driver writes vectors.

use bitflags::bitflags;
use net_device::RegisterIo;

use crate::error::{Error, Window};

/// PCI vendor ID of every virtio device (virtio 1.x §4.1.2).
pub const VIRTIO_PCI_VENDOR_ID: u16 = 0x1af4;
/// PCI device ID of a modern-only virtio-net device: 0x1040 + virtio device ID 1 (§4.1.2).
pub const VIRTIO_NET_MODERN_DEVICE_ID: u16 = 0x1041;
/// PCI device ID of a transitional virtio-net device, which also carries the modern capabilities
/// (QEMU uses it when the device sits on a conventional PCI bus; subsystem device ID is 1).
pub const VIRTIO_NET_TRANSITIONAL_DEVICE_ID: u16 = 0x1000;
/// PCI capability ID of vendor-specific capabilities, which describe the virtio structures.
pub const PCI_CAPABILITY_ID_VENDOR: u8 = 0x09;

/// Length of `struct virtio_pci_cap` (§4.1.4).
pub const VIRTIO_PCI_CAP_LEN: usize = 16;
/// Length of `struct virtio_pci_notify_cap` (§4.1.4.4).
pub const VIRTIO_PCI_NOTIFY_CAP_LEN: usize = 20;
/// Length of `struct virtio_pci_cap64` (§4.1.4).
pub const VIRTIO_PCI_CAP64_LEN: usize = 24;

/// Byte offsets of the register windows' fields.
pub mod registers {
    /// `device_feature_select` (le32, RW): which 32 feature bits `device_feature` shows.
    pub const DEVICE_FEATURE_SELECT: usize = 0x00;
    /// `device_feature` (le32, RO): feature bits offered by the device.
    pub const DEVICE_FEATURE: usize = 0x04;
    /// `driver_feature_select` (le32, RW): which 32 feature bits `driver_feature` takes.
    pub const DRIVER_FEATURE_SELECT: usize = 0x08;
    /// `driver_feature` (le32, RW): feature bits accepted by the driver.
    pub const DRIVER_FEATURE: usize = 0x0C;
    /// `config_msix_vector` (le16, RW): MSI-X vector for configuration changes.
    pub const CONFIG_MSIX_VECTOR: usize = 0x10;
    /// `num_queues` (le16, RO): number of virtqueues the device supports.
    pub const NUM_QUEUES: usize = 0x12;
    /// `device_status` (u8, RW): the status bits; writing 0 resets the device.
    pub const DEVICE_STATUS: usize = 0x14;
    /// `config_generation` (u8, RO): changes whenever the device configuration changes.
    pub const CONFIG_GENERATION: usize = 0x15;
    /// `queue_select` (le16, RW): which virtqueue the `queue_*` fields refer to.
    pub const QUEUE_SELECT: usize = 0x16;
    /// `queue_size` (le16, RW): maximum size on reset; the driver may write a smaller power of 2.
    pub const QUEUE_SIZE: usize = 0x18;
    /// `queue_msix_vector` (le16, RW): MSI-X vector for used buffer notifications.
    pub const QUEUE_MSIX_VECTOR: usize = 0x1A;
    /// `queue_enable` (le16, RW): write 1 once the queue is configured.
    pub const QUEUE_ENABLE: usize = 0x1C;
    /// `queue_notify_off` (le16, RO): notify address = notify cap offset + this * multiplier.
    pub const QUEUE_NOTIFY_OFF: usize = 0x1E;
    /// `queue_desc` (le64, RW): physical address of the descriptor table.
    pub const QUEUE_DESC: usize = 0x20;
    /// `queue_driver` (le64, RW): physical address of the available ring.
    pub const QUEUE_DRIVER: usize = 0x28;
    /// `queue_device` (le64, RW): physical address of the used ring.
    pub const QUEUE_DEVICE: usize = 0x30;
    /// Length of the common configuration fields this driver uses.
    pub const COMMON_CONFIG_LEN: usize = 0x38;

    /// Value of the MSI-X vector fields meaning "no vector" (also the refusal answer).
    pub const NO_VECTOR: u16 = 0xFFFF;

    /// Device configuration: `mac` (6 × u8).
    pub const NET_CONFIG_MAC: usize = 0x00;
    /// Device configuration: `status` (le16), see [`crate::NetStatus`].
    pub const NET_CONFIG_STATUS: usize = 0x06;
    /// Device configuration: `max_virtqueue_pairs` (le16).
    pub const NET_CONFIG_MAX_VIRTQUEUE_PAIRS: usize = 0x08;
    /// Device configuration: `mtu` (le16), valid with VIRTIO_NET_F_MTU.
    pub const NET_CONFIG_MTU: usize = 0x0A;
    /// Device configuration length needed for `mac` and `status`.
    pub const NET_CONFIG_MIN_LEN: usize = 0x08;
    /// Device configuration length needed to read `mtu`.
    pub const NET_CONFIG_MTU_LEN: usize = 0x0C;

    /// ISR status bit 0: a virtqueue has used buffers (INTx only).
    pub const ISR_QUEUE: u8 = 1 << 0;
    /// ISR status bit 1: the device configuration changed (INTx only).
    pub const ISR_CONFIG: u8 = 1 << 1;
}

bitflags! {
    /// The `device_status` field (virtio 1.x §2.1).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct DeviceStatus: u8 {
        /// The guest has found the device.
        const ACKNOWLEDGE = 1;
        /// The guest knows how to drive the device.
        const DRIVER = 2;
        /// The driver is ready: the device may now use the queues.
        const DRIVER_OK = 4;
        /// Feature negotiation is complete (re-read to see whether the device accepted it).
        const FEATURES_OK = 8;
        /// The device hit an error it cannot recover from without a reset.
        const DEVICE_NEEDS_RESET = 0x40;
        /// The driver gave up on the device.
        const FAILED = 0x80;
    }
}

bitflags! {
    /// The virtio-net configuration `status` field (virtio 1.x §5.1.4).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct NetStatus: u16 {
        /// The link is up.
        const LINK_UP = 1;
        /// The device asks the driver to announce itself (gratuitous ARP / unsolicited NA).
        const ANNOUNCE = 2;
    }
}

/// Which virtio structure a vendor capability describes (`cfg_type`, virtio 1.x §4.1.4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VirtioPciCapabilityType {
    /// VIRTIO_PCI_CAP_COMMON_CFG (1).
    Common,
    /// VIRTIO_PCI_CAP_NOTIFY_CFG (2).
    Notify,
    /// VIRTIO_PCI_CAP_ISR_CFG (3).
    Isr,
    /// VIRTIO_PCI_CAP_DEVICE_CFG (4).
    Device,
    /// VIRTIO_PCI_CAP_PCI_CFG (5): the config-space access window (unused by this driver).
    PciConfig,
    /// VIRTIO_PCI_CAP_SHARED_MEMORY_CFG (8) (unused by virtio-net).
    SharedMemory,
    /// VIRTIO_PCI_CAP_VENDOR_CFG (9) (unused by this driver).
    Vendor,
}

impl VirtioPciCapabilityType {
    /// The `cfg_type` value.
    pub fn value(self) -> u8 {
        match self {
            VirtioPciCapabilityType::Common => 1,
            VirtioPciCapabilityType::Notify => 2,
            VirtioPciCapabilityType::Isr => 3,
            VirtioPciCapabilityType::Device => 4,
            VirtioPciCapabilityType::PciConfig => 5,
            VirtioPciCapabilityType::SharedMemory => 8,
            VirtioPciCapabilityType::Vendor => 9,
        }
    }

    fn from_value(value: u8) -> Option<Self> {
        Some(match value {
            1 => VirtioPciCapabilityType::Common,
            2 => VirtioPciCapabilityType::Notify,
            3 => VirtioPciCapabilityType::Isr,
            4 => VirtioPciCapabilityType::Device,
            5 => VirtioPciCapabilityType::PciConfig,
            8 => VirtioPciCapabilityType::SharedMemory,
            9 => VirtioPciCapabilityType::Vendor,
            _ => return None,
        })
    }
}

/// A parsed virtio vendor capability: where one virtio structure lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VirtioPciCapability {
    /// Which structure.
    pub cfg_type: VirtioPciCapabilityType,
    /// The BAR (0..=5) that maps it.
    pub bar: u8,
    /// `id`, distinguishing several capabilities of one type where the device type defines it.
    pub id: u8,
    /// Offset of the structure within the BAR.
    pub offset: u64,
    /// Length of the structure in bytes (the kernel may map less, e.g. 4 KiB, §4.1.4).
    pub length: u64,
    /// For the notify capability: the multiplier applied to each queue's `queue_notify_off`.
    pub notify_off_multiplier: Option<u32>,
}

fn read_le32(bytes: &[u8], offset: usize) -> u32 {
    let mut word = [0u8; 4];
    word.copy_from_slice(&bytes[offset..offset + 4]);
    u32::from_le_bytes(word)
}

/// Parses one vendor-specific PCI capability (`cap[0]` is `cap_vndr`, so `cap` is the
/// capability's bytes read from configuration space, at least `cap_len` of them).
///
/// Errors tell the kernel to skip the capability: a reserved `cfg_type` or BAR must be ignored
/// per virtio 1.x §4.1.4, and the driver should use the first usable capability of each type.
pub fn parse_virtio_pci_capability(cap: &[u8]) -> Result<VirtioPciCapability, Error> {
    if cap.len() < VIRTIO_PCI_CAP_LEN {
        return Err(Error::CapabilityTooShort {
            len: cap.len(),
            needed: VIRTIO_PCI_CAP_LEN,
        });
    }
    if cap[0] != PCI_CAPABILITY_ID_VENDOR {
        return Err(Error::NotVendorCapability { id: cap[0] });
    }
    // cap_len may be larger than the structure (padding); never trust more bytes than we have.
    let available = usize::from(cap[2]).min(cap.len());
    if available < VIRTIO_PCI_CAP_LEN {
        return Err(Error::CapabilityTooShort {
            len: available,
            needed: VIRTIO_PCI_CAP_LEN,
        });
    }
    let cfg_type_value = cap[3];
    let cfg_type = VirtioPciCapabilityType::from_value(cfg_type_value).ok_or(
        Error::ReservedCapabilityType {
            cfg_type: cfg_type_value,
        },
    )?;
    let bar = cap[4];
    if bar > 5 {
        return Err(Error::ReservedBar { bar });
    }
    let id = cap[5];
    let mut offset = u64::from(read_le32(cap, 8));
    let mut length = u64::from(read_le32(cap, 12));

    let mut notify_off_multiplier = None;
    match cfg_type {
        VirtioPciCapabilityType::Notify => {
            if available < VIRTIO_PCI_NOTIFY_CAP_LEN {
                return Err(Error::CapabilityTooShort {
                    len: available,
                    needed: VIRTIO_PCI_NOTIFY_CAP_LEN,
                });
            }
            let multiplier = read_le32(cap, 16);
            // §4.1.4.4: 0 (one shared address) or a power of two (each notification is a
            // 16-bit write, so a multiplier of 1 would overlap neighbouring queues).
            if multiplier != 0 && (!multiplier.is_power_of_two() || multiplier < 2) {
                return Err(Error::InvalidNotifyMultiplier { multiplier });
            }
            notify_off_multiplier = Some(multiplier);
        }
        VirtioPciCapabilityType::SharedMemory => {
            // struct virtio_pci_cap64 carries the high halves.
            if available < VIRTIO_PCI_CAP64_LEN {
                return Err(Error::CapabilityTooShort {
                    len: available,
                    needed: VIRTIO_PCI_CAP64_LEN,
                });
            }
            offset |= u64::from(read_le32(cap, 16)) << 32;
            length |= u64::from(read_le32(cap, 20)) << 32;
        }
        _ => {}
    }

    // Alignment rules of §4.1.4.3, §4.1.4.4 and §4.1.4.6: natural-width accesses to the fields
    // would otherwise be misaligned.
    let alignment = match cfg_type {
        VirtioPciCapabilityType::Common | VirtioPciCapabilityType::Device => 4,
        VirtioPciCapabilityType::Notify => 2,
        _ => 1,
    };
    if offset % alignment != 0 {
        return Err(Error::MisalignedCapability {
            cfg_type: cfg_type_value,
            offset,
        });
    }

    Ok(VirtioPciCapability {
        cfg_type,
        bar,
        id,
        offset,
        length,
        notify_off_multiplier,
    })
}

/// The register windows of one virtio-net device, mapped by the kernel.
///
/// Each window starts at the structure's offset within its BAR. The kernel's [`RegisterIo`]
/// must perform true 8-, 16- and 32-bit accesses: the spec requires each field to be accessed
/// with its natural width (virtio 1.x §4.1.3.1), e.g. `device_status` with an 8-bit write.
pub struct VirtioPciRegions<R: RegisterIo> {
    /// The common configuration structure.
    pub common: R,
    /// The notification area (queue doorbells).
    pub notify: R,
    /// `notify_off_multiplier` from the notify capability.
    pub notify_off_multiplier: u32,
    /// The ISR status byte (only read for INTx).
    pub isr: R,
    /// The virtio-net device configuration (`struct virtio_net_config`).
    pub device: R,
}

impl<R: RegisterIo> VirtioPciRegions<R> {
    /// Checks that every window is large enough for the fields the driver touches.
    pub fn validate(&self) -> Result<(), Error> {
        let checks = [
            (
                Window::Common,
                self.common.len(),
                registers::COMMON_CONFIG_LEN,
            ),
            (Window::Notify, self.notify.len(), 2),
            (Window::Isr, self.isr.len(), 1),
            (
                Window::Device,
                self.device.len(),
                registers::NET_CONFIG_MIN_LEN,
            ),
        ];
        for (window, len, needed) in checks {
            if len < needed {
                return Err(Error::WindowTooSmall {
                    window,
                    len,
                    needed,
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn capability(cfg_type: u8, bar: u8, offset: u32, length: u32, extra: &[u8]) -> Vec<u8> {
        let mut bytes = vec![PCI_CAPABILITY_ID_VENDOR, 0x50, 0, cfg_type, bar, 0, 0, 0];
        bytes.extend_from_slice(&offset.to_le_bytes());
        bytes.extend_from_slice(&length.to_le_bytes());
        bytes.extend_from_slice(extra);
        bytes[2] = bytes.len() as u8;
        bytes
    }

    #[test]
    fn parses_qemu_style_capabilities() {
        let common = parse_virtio_pci_capability(&capability(1, 4, 0x0000, 0x1000, &[])).unwrap();
        assert_eq!(common.cfg_type, VirtioPciCapabilityType::Common);
        assert_eq!((common.bar, common.offset, common.length), (4, 0, 0x1000));
        assert_eq!(common.notify_off_multiplier, None);

        let notify =
            parse_virtio_pci_capability(&capability(2, 4, 0x3000, 0x1000, &4u32.to_le_bytes()))
                .unwrap();
        assert_eq!(notify.cfg_type, VirtioPciCapabilityType::Notify);
        assert_eq!(notify.notify_off_multiplier, Some(4));
        assert_eq!(notify.offset, 0x3000);

        let isr = parse_virtio_pci_capability(&capability(3, 4, 0x1000, 0x1000, &[])).unwrap();
        assert_eq!(isr.cfg_type, VirtioPciCapabilityType::Isr);
        let device = parse_virtio_pci_capability(&capability(4, 4, 0x2000, 0x1000, &[])).unwrap();
        assert_eq!(device.cfg_type, VirtioPciCapabilityType::Device);
    }

    #[test]
    fn rejects_what_the_spec_says_to_ignore() {
        assert_eq!(
            parse_virtio_pci_capability(&capability(7, 0, 0, 16, &[])),
            Err(Error::ReservedCapabilityType { cfg_type: 7 })
        );
        assert_eq!(
            parse_virtio_pci_capability(&capability(1, 6, 0, 16, &[])),
            Err(Error::ReservedBar { bar: 6 })
        );
        let mut not_vendor = capability(1, 0, 0, 16, &[]);
        not_vendor[0] = 0x11;
        assert_eq!(
            parse_virtio_pci_capability(&not_vendor),
            Err(Error::NotVendorCapability { id: 0x11 })
        );
    }

    #[test]
    fn rejects_truncated_and_malformed_capabilities() {
        assert!(matches!(
            parse_virtio_pci_capability(&[PCI_CAPABILITY_ID_VENDOR, 0, 16]),
            Err(Error::CapabilityTooShort { len: 3, needed: 16 })
        ));
        // A notify capability without its multiplier.
        assert!(matches!(
            parse_virtio_pci_capability(&capability(2, 0, 0, 16, &[])),
            Err(Error::CapabilityTooShort { needed: 20, .. })
        ));
        // cap_len says 16 although the slice is longer: the multiplier is not part of it.
        let mut lying_length = capability(2, 0, 0, 16, &4u32.to_le_bytes());
        lying_length[2] = 16;
        assert!(matches!(
            parse_virtio_pci_capability(&lying_length),
            Err(Error::CapabilityTooShort {
                len: 16,
                needed: 20
            })
        ));
        assert_eq!(
            parse_virtio_pci_capability(&capability(2, 0, 0, 16, &3u32.to_le_bytes())),
            Err(Error::InvalidNotifyMultiplier { multiplier: 3 })
        );
        assert_eq!(
            parse_virtio_pci_capability(&capability(1, 0, 2, 16, &[])),
            Err(Error::MisalignedCapability {
                cfg_type: 1,
                offset: 2
            })
        );
    }

    #[test]
    fn accepts_zero_multiplier_and_64_bit_shared_memory() {
        let notify =
            parse_virtio_pci_capability(&capability(2, 0, 0, 2, &0u32.to_le_bytes())).unwrap();
        assert_eq!(notify.notify_off_multiplier, Some(0));
        let mut high = Vec::new();
        high.extend_from_slice(&1u32.to_le_bytes());
        high.extend_from_slice(&2u32.to_le_bytes());
        let shared = parse_virtio_pci_capability(&capability(8, 2, 0x10, 0x20, &high)).unwrap();
        assert_eq!(shared.offset, 0x1_0000_0010);
        assert_eq!(shared.length, 0x2_0000_0020);
    }
}
