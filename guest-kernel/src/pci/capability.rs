//! Capability lists: walking the standard (0x40-0xFF) and PCIe extended (0x100-0xFFF) chains
//! without trusting the device, and parsing the MSI, MSI-X, PCI Express and SR-IOV structures.

use super::address::PciAddress;
use super::config::{ConfigAccess, EXTENDED_CONFIG_SIZE, LEGACY_CONFIG_SIZE, Status, reg};
use crate::error::{KernelError, PciErrorKind};
use alloc::vec::Vec;
use bitflags::bitflags;
use core::fmt;

/// Standard capability IDs (PCI Code and ID Assignment §2).
pub mod id {
    /// Power management.
    pub const POWER_MANAGEMENT: u16 = 0x01;
    /// Vital product data.
    pub const VPD: u16 = 0x03;
    /// Message signalled interrupts.
    pub const MSI: u16 = 0x05;
    /// Vendor specific (virtio uses these).
    pub const VENDOR: u16 = 0x09;
    /// Bridge subsystem vendor ID.
    pub const SUBSYSTEM_VENDOR: u16 = 0x0d;
    /// PCI Express.
    pub const PCI_EXPRESS: u16 = 0x10;
    /// MSI-X.
    pub const MSIX: u16 = 0x11;
    /// SATA configuration.
    pub const SATA: u16 = 0x12;
    /// Advanced features.
    pub const ADVANCED_FEATURES: u16 = 0x13;
    /// Enhanced allocation.
    pub const ENHANCED_ALLOCATION: u16 = 0x14;
}

/// PCIe extended capability IDs (PCI Code and ID Assignment §3).
pub mod extended_id {
    /// Advanced error reporting.
    pub const AER: u16 = 0x01;
    /// Virtual channel.
    pub const VIRTUAL_CHANNEL: u16 = 0x02;
    /// Device serial number.
    pub const SERIAL_NUMBER: u16 = 0x03;
    /// Power budgeting.
    pub const POWER_BUDGET: u16 = 0x04;
    /// Vendor-specific extended capability.
    pub const VENDOR: u16 = 0x0b;
    /// Access control services.
    pub const ACS: u16 = 0x0d;
    /// Alternative routing-ID interpretation.
    pub const ARI: u16 = 0x0e;
    /// Address translation services.
    pub const ATS: u16 = 0x0f;
    /// Single-root I/O virtualisation.
    pub const SRIOV: u16 = 0x10;
    /// Latency tolerance reporting.
    pub const LTR: u16 = 0x18;
    /// Secondary PCI Express.
    pub const SECONDARY_PCIE: u16 = 0x19;
    /// Process address space ID.
    pub const PASID: u16 = 0x1b;
    /// L1 PM substates.
    pub const L1_SUBSTATES: u16 = 0x1e;
}

/// One entry found in a capability chain.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Capability {
    /// The capability ID (8 bits for standard, 16 bits for extended capabilities).
    pub id: u16,
    /// Offset of the capability header in config space.
    pub offset: u16,
    /// True for a PCIe extended capability (offset 0x100 and above).
    pub extended: bool,
}

impl Capability {
    /// The short name used in the device tree ("msix", "sriov", ...), if the ID is known.
    pub fn name(&self) -> Option<&'static str> {
        if self.extended {
            extended_name(self.id)
        } else {
            standard_name(self.id)
        }
    }
}

impl fmt::Display for Capability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => write!(f, "{name}@{:#x}", self.offset),
            None if self.extended => write!(f, "{:#06x}@{:#x}", self.id, self.offset),
            None => write!(f, "{:#04x}@{:#x}", self.id, self.offset),
        }
    }
}

/// Name of a standard capability ID.
pub fn standard_name(capability_id: u16) -> Option<&'static str> {
    Some(match capability_id {
        id::POWER_MANAGEMENT => "pm",
        0x02 => "agp",
        id::VPD => "vpd",
        0x04 => "slotid",
        id::MSI => "msi",
        0x06 => "hotswap",
        0x07 => "pcix",
        0x08 => "hypertransport",
        id::VENDOR => "vendor",
        0x0a => "debug",
        0x0c => "shpc",
        id::SUBSYSTEM_VENDOR => "ssvid",
        id::PCI_EXPRESS => "pcie",
        id::MSIX => "msix",
        id::SATA => "sata",
        id::ADVANCED_FEATURES => "af",
        id::ENHANCED_ALLOCATION => "ea",
        _ => return None,
    })
}

/// Name of an extended capability ID.
pub fn extended_name(capability_id: u16) -> Option<&'static str> {
    Some(match capability_id {
        extended_id::AER => "aer",
        extended_id::VIRTUAL_CHANNEL => "vc",
        extended_id::SERIAL_NUMBER => "dsn",
        extended_id::POWER_BUDGET => "power-budget",
        extended_id::VENDOR => "vsec",
        extended_id::ACS => "acs",
        extended_id::ARI => "ari",
        extended_id::ATS => "ats",
        extended_id::SRIOV => "sriov",
        0x13 => "pri",
        0x15 => "rebar",
        extended_id::LTR => "ltr",
        extended_id::SECONDARY_PCIE => "secondary-pcie",
        extended_id::PASID => "pasid",
        extended_id::L1_SUBSTATES => "l1ss",
        0x25 => "dlf",
        0x26 => "pl16",
        _ => return None,
    })
}

/// Why a capability walk stopped before reaching a terminating null pointer.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum ChainFault {
    /// A next pointer pointed back into the header (below 0x40, or below 0x100 for extended).
    PointerIntoHeader {
        /// Offset of the capability holding the pointer (0x34 for the first one).
        from: u16,
        /// The offending pointer.
        to: u16,
    },
    /// A next pointer left the configuration space, or the structure would not fit in it.
    PointerPastEnd {
        /// Offset of the capability holding the pointer.
        from: u16,
        /// The offending pointer.
        to: u16,
    },
    /// The chain came back to a capability already visited.
    Loop {
        /// The offset visited twice.
        at: u16,
    },
    /// A capability header read all-ones: the function vanished mid-walk.
    DeviceGone,
}

impl fmt::Display for ChainFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ChainFault::PointerIntoHeader { from, to } => {
                write!(f, "pointer at {from:#x} leads into the header ({to:#x})")
            }
            ChainFault::PointerPastEnd { from, to } => {
                write!(f, "pointer at {from:#x} leads past the end ({to:#x})")
            }
            ChainFault::Loop { at } => write!(f, "loop back to {at:#x}"),
            ChainFault::DeviceGone => write!(f, "device stopped answering"),
        }
    }
}

/// Iterator over one capability chain; stops (and records why) on malformed chains.
///
/// Every offset can be visited once, so a walk makes at most 48 (standard) or 960 (extended)
/// steps whatever the device returns.
pub struct CapabilityWalk<'a, A: ConfigAccess + ?Sized> {
    access: &'a A,
    address: PciAddress,
    /// Where the next header is, 0 when the chain is finished.
    next: u16,
    /// Offset of the structure whose pointer produced `next` (for fault reports).
    previous: u16,
    extended: bool,
    /// One bit per dword of the 4 KiB space, set once visited.
    visited: [u64; 16],
    fault: Option<ChainFault>,
}

impl<'a, A: ConfigAccess + ?Sized> CapabilityWalk<'a, A> {
    /// Walks the standard list starting at the Capabilities Pointer (0x34).
    pub fn standard(access: &'a A, address: PciAddress) -> Self {
        let status = access.read16(address, reg::STATUS);
        let mut walk = CapabilityWalk {
            access,
            address,
            next: 0,
            previous: reg::CAPABILITIES_POINTER,
            extended: false,
            visited: [0; 16],
            fault: None,
        };
        if status == u16::MAX {
            walk.fault = Some(ChainFault::DeviceGone);
        } else if Status::from_bits_retain(status).contains(Status::CAPABILITIES_LIST) {
            // The two low bits are reserved and must be masked (PCI 3.0 §6.7).
            walk.next = u16::from(access.read8(address, reg::CAPABILITIES_POINTER) & 0xfc);
            walk.check_next();
        }
        walk
    }

    /// Walks the PCIe extended list starting at 0x100. A function without extended space
    /// (conventional PCI, or port I/O access) reads 0 or all-ones there: an empty list.
    pub fn extended(access: &'a A, address: PciAddress) -> Self {
        let first = access.read32(address, LEGACY_CONFIG_SIZE);
        let mut walk = CapabilityWalk {
            access,
            address,
            next: if first == 0 || first == u32::MAX {
                0
            } else {
                LEGACY_CONFIG_SIZE
            },
            previous: LEGACY_CONFIG_SIZE,
            extended: true,
            visited: [0; 16],
            fault: None,
        };
        // Marks 0x100 visited so a chain leading back to it is caught as a loop.
        walk.check_next();
        walk
    }

    /// Why the walk ended early, once it has ended; `None` for a well-formed chain.
    pub fn fault(&self) -> Option<ChainFault> {
        self.fault
    }

    /// Validates `self.next` against the header, the end of the space and earlier visits.
    fn check_next(&mut self) {
        let to = self.next;
        if to == 0 {
            return;
        }
        let (floor, end) = if self.extended {
            (LEGACY_CONFIG_SIZE, EXTENDED_CONFIG_SIZE)
        } else {
            (0x40, LEGACY_CONFIG_SIZE)
        };
        let fault = if to < floor {
            Some(ChainFault::PointerIntoHeader {
                from: self.previous,
                to,
            })
        } else if to.checked_add(4).is_none_or(|header_end| header_end > end) {
            Some(ChainFault::PointerPastEnd {
                from: self.previous,
                to,
            })
        } else {
            let dword = usize::from(to / 4);
            let (word, bit) = (dword / 64, dword % 64);
            if self.visited[word] & (1 << bit) != 0 {
                Some(ChainFault::Loop { at: to })
            } else {
                self.visited[word] |= 1 << bit;
                None
            }
        };
        if fault.is_some() {
            self.fault = fault;
            self.next = 0;
        }
    }
}

impl<A: ConfigAccess + ?Sized> Iterator for CapabilityWalk<'_, A> {
    type Item = Capability;

    fn next(&mut self) -> Option<Capability> {
        if self.next == 0 {
            return None;
        }
        let offset = self.next;
        let header = self.access.read32(self.address, offset);
        if header == u32::MAX {
            self.fault = Some(ChainFault::DeviceGone);
            self.next = 0;
            return None;
        }
        let (capability_id, next) = if self.extended {
            // Extended header: ID 15:0, version 19:16, next 31:20 (PCIe Base §7.6.3).
            (header as u16, ((header >> 20) as u16) & 0xffc)
        } else {
            (
                u16::from(header as u8),
                u16::from((header >> 8) as u8) & 0xfc,
            )
        };
        if self.extended && header == 0 {
            // A zero header ends the extended list (no capability has ID 0).
            self.next = 0;
            return None;
        }
        self.previous = offset;
        self.next = next;
        self.check_next();
        Some(Capability {
            id: capability_id,
            offset,
            extended: self.extended,
        })
    }
}

/// Both chains of one function, plus whatever went wrong while walking them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CapabilityList {
    /// Standard capabilities in chain order, then extended ones in chain order.
    pub entries: Vec<Capability>,
    /// Faults of the standard chain and of the extended chain, if any.
    pub faults: Vec<ChainFault>,
}

impl CapabilityList {
    /// Walks both chains of `address`.
    pub fn read(access: &(impl ConfigAccess + ?Sized), address: PciAddress) -> Self {
        let mut list = CapabilityList::default();
        let mut standard = CapabilityWalk::standard(access, address);
        list.entries.extend(&mut standard);
        list.faults.extend(standard.fault());
        let mut extended = CapabilityWalk::extended(access, address);
        list.entries.extend(&mut extended);
        list.faults.extend(extended.fault());
        for fault in &list.faults {
            log::warn!("pci: {address} capability chain broken: {fault}");
        }
        list
    }

    /// Offset of the first standard capability with this ID.
    pub fn find(&self, capability_id: u16) -> Option<u16> {
        self.entries
            .iter()
            .find(|c| !c.extended && c.id == capability_id)
            .map(|c| c.offset)
    }

    /// Offset of the first extended capability with this ID.
    pub fn find_extended(&self, capability_id: u16) -> Option<u16> {
        self.entries
            .iter()
            .find(|c| c.extended && c.id == capability_id)
            .map(|c| c.offset)
    }
}

/// Offset of the first standard capability `capability_id` of `address`.
pub fn find_capability(
    access: &(impl ConfigAccess + ?Sized),
    address: PciAddress,
    capability_id: u16,
) -> Option<u16> {
    CapabilityWalk::standard(access, address)
        .find(|c| c.id == capability_id)
        .map(|c| c.offset)
}

/// Offset of the first extended capability `capability_id` of `address`.
pub fn find_extended_capability(
    access: &(impl ConfigAccess + ?Sized),
    address: PciAddress,
    capability_id: u16,
) -> Option<u16> {
    CapabilityWalk::extended(access, address)
        .find(|c| c.id == capability_id)
        .map(|c| c.offset)
}

fn bad_value(address: PciAddress, what: &'static str) -> KernelError {
    KernelError::Pci(PciErrorKind::BadValue {
        address: address.as_array(),
        what,
    })
}

fn missing(address: PciAddress, capability: &'static str) -> KernelError {
    KernelError::Pci(PciErrorKind::MissingCapability {
        address: address.as_array(),
        capability,
    })
}

/// Checks that a structure of `len` bytes at `offset` fits below `end`.
fn fits(address: PciAddress, offset: u16, len: u16, end: u16) -> Result<(), KernelError> {
    match offset.checked_add(len) {
        Some(structure_end) if structure_end <= end => Ok(()),
        _ => Err(bad_value(
            address,
            "capability structure runs past the end of config space",
        )),
    }
}

/// MSI capability register offsets, relative to the capability (PCI 3.0 §6.8.1).
pub mod msi {
    /// Message Control (16 bits).
    pub const CONTROL: u16 = 0x02;
    /// Message Address, low dword.
    pub const ADDRESS_LOW: u16 = 0x04;
    /// Message Address, high dword (64-bit capable functions only).
    pub const ADDRESS_HIGH: u16 = 0x08;
    /// Message Data for a 32-bit capability.
    pub const DATA_32: u16 = 0x08;
    /// Message Data for a 64-bit capability.
    pub const DATA_64: u16 = 0x0c;
    /// Mask bits (per-vector masking), 32-bit layout.
    pub const MASK_32: u16 = 0x0c;
    /// Mask bits (per-vector masking), 64-bit layout.
    pub const MASK_64: u16 = 0x10;
    /// Control: MSI enable.
    pub const CONTROL_ENABLE: u16 = 1 << 0;
    /// Control: Multiple Message Enable field (bits 6:4).
    pub const CONTROL_MULTIPLE_ENABLE: u16 = 0x7 << 4;
    /// Control: 64-bit address capable.
    pub const CONTROL_64BIT: u16 = 1 << 7;
    /// Control: per-vector masking capable.
    pub const CONTROL_PER_VECTOR_MASK: u16 = 1 << 8;
}

/// A parsed MSI capability.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct MsiCapability {
    /// Offset of the capability header.
    pub offset: u16,
    /// The function takes a 64-bit message address.
    pub is_64bit: bool,
    /// The function has per-vector mask bits.
    pub per_vector_mask: bool,
}

impl MsiCapability {
    /// Reads the MSI capability at `offset`.
    pub fn read(
        access: &(impl ConfigAccess + ?Sized),
        address: PciAddress,
        offset: u16,
    ) -> Result<Self, KernelError> {
        fits(address, offset, 0x18, LEGACY_CONFIG_SIZE)?;
        let control = access.read16(address, offset + msi::CONTROL);
        Ok(MsiCapability {
            offset,
            is_64bit: control & msi::CONTROL_64BIT != 0,
            per_vector_mask: control & msi::CONTROL_PER_VECTOR_MASK != 0,
        })
    }
}

/// MSI-X capability register offsets, relative to the capability (PCI 3.0 §6.8.2).
pub mod msix {
    /// Message Control (16 bits).
    pub const CONTROL: u16 = 0x02;
    /// Table Offset / Table BIR (BAR indicator in bits 2:0).
    pub const TABLE: u16 = 0x04;
    /// PBA Offset / PBA BIR.
    pub const PBA: u16 = 0x08;
    /// Control: table size minus one (bits 10:0).
    pub const CONTROL_TABLE_SIZE: u16 = 0x7ff;
    /// Control: function mask (all vectors masked).
    pub const CONTROL_FUNCTION_MASK: u16 = 1 << 14;
    /// Control: MSI-X enable.
    pub const CONTROL_ENABLE: u16 = 1 << 15;
}

/// A parsed MSI-X capability.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct MsixCapability {
    /// Offset of the capability header.
    pub offset: u16,
    /// Number of table entries (1..=2048).
    pub table_size: u16,
    /// Index of the BAR holding the table.
    pub table_bar: u8,
    /// Byte offset of the table inside that BAR.
    pub table_offset: u32,
    /// Index of the BAR holding the pending-bit array.
    pub pba_bar: u8,
    /// Byte offset of the PBA inside that BAR.
    pub pba_offset: u32,
}

impl MsixCapability {
    /// Reads the MSI-X capability at `offset`, rejecting BAR indicators above 5.
    pub fn read(
        access: &(impl ConfigAccess + ?Sized),
        address: PciAddress,
        offset: u16,
    ) -> Result<Self, KernelError> {
        fits(address, offset, 12, LEGACY_CONFIG_SIZE)?;
        let control = access.read16(address, offset + msix::CONTROL);
        let table = access.read32(address, offset + msix::TABLE);
        let pba = access.read32(address, offset + msix::PBA);
        if control == u16::MAX || table == u32::MAX {
            return Err(KernelError::Pci(PciErrorKind::DeviceGone {
                address: address.as_array(),
            }));
        }
        let (table_bar, pba_bar) = ((table & 7) as u8, (pba & 7) as u8);
        if table_bar > 5 || pba_bar > 5 {
            return Err(bad_value(address, "MSI-X BAR indicator above 5"));
        }
        Ok(MsixCapability {
            offset,
            table_size: (control & msix::CONTROL_TABLE_SIZE) + 1,
            table_bar,
            table_offset: table & !7,
            pba_bar,
            pba_offset: pba & !7,
        })
    }

    /// Finds and reads the MSI-X capability of `address`.
    pub fn find(
        access: &(impl ConfigAccess + ?Sized),
        address: PciAddress,
    ) -> Result<Self, KernelError> {
        let offset = find_capability(access, address, id::MSIX).ok_or(missing(address, "msix"))?;
        MsixCapability::read(access, address, offset)
    }
}

/// PCI Express capability register offsets, relative to the capability (PCIe Base §7.5.3).
pub mod pcie {
    /// PCI Express Capabilities register (16 bits): version, port type, slot implemented.
    pub const FLAGS: u16 = 0x02;
    /// Device Capabilities.
    pub const DEVICE_CAPABILITIES: u16 = 0x04;
    /// Device Control (16 bits).
    pub const DEVICE_CONTROL: u16 = 0x08;
    /// Link Capabilities.
    pub const LINK_CAPABILITIES: u16 = 0x0c;
    /// Link Status (16 bits).
    pub const LINK_STATUS: u16 = 0x12;
    /// Slot Capabilities.
    pub const SLOT_CAPABILITIES: u16 = 0x14;
    /// Slot Control (16 bits).
    pub const SLOT_CONTROL: u16 = 0x18;
    /// Slot Status (16 bits, events are W1C).
    pub const SLOT_STATUS: u16 = 0x1a;
    /// Flags: slot implemented (ports only).
    pub const FLAGS_SLOT_IMPLEMENTED: u16 = 1 << 8;
    /// Link Status: data link layer link active.
    pub const LINK_STATUS_DLL_ACTIVE: u16 = 1 << 13;
    /// Bytes of the capability up to and including Slot Status.
    pub const LENGTH_WITH_SLOT: u16 = 0x1c;
}

/// Device/port type from the PCI Express Capabilities register (bits 7:4).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum PortType {
    /// PCI Express endpoint.
    Endpoint,
    /// Legacy PCI Express endpoint.
    LegacyEndpoint,
    /// Root port of a root complex.
    RootPort,
    /// Upstream port of a switch.
    UpstreamPort,
    /// Downstream port of a switch.
    DownstreamPort,
    /// PCI Express to PCI/PCI-X bridge.
    PcieToPciBridge,
    /// PCI/PCI-X to PCI Express bridge.
    PciToPcieBridge,
    /// Root-complex integrated endpoint.
    IntegratedEndpoint,
    /// Root-complex event collector.
    EventCollector,
    /// A reserved value.
    Reserved(u8),
}

impl PortType {
    fn from_field(field: u8) -> Self {
        match field {
            0x0 => PortType::Endpoint,
            0x1 => PortType::LegacyEndpoint,
            0x4 => PortType::RootPort,
            0x5 => PortType::UpstreamPort,
            0x6 => PortType::DownstreamPort,
            0x7 => PortType::PcieToPciBridge,
            0x8 => PortType::PciToPcieBridge,
            0x9 => PortType::IntegratedEndpoint,
            0xa => PortType::EventCollector,
            other => PortType::Reserved(other),
        }
    }

    /// Root and downstream ports are the ones that can carry a hot-plug slot.
    pub fn is_downstream_facing(&self) -> bool {
        matches!(self, PortType::RootPort | PortType::DownstreamPort)
    }

    /// Short name for the device tree.
    pub fn short_name(&self) -> &'static str {
        match self {
            PortType::Endpoint | PortType::LegacyEndpoint | PortType::IntegratedEndpoint => {
                "endpoint"
            }
            PortType::RootPort => "root-port",
            PortType::UpstreamPort => "upstream-port",
            PortType::DownstreamPort => "downstream-port",
            PortType::PcieToPciBridge => "pcie-to-pci-bridge",
            PortType::PciToPcieBridge => "pci-to-pcie-bridge",
            PortType::EventCollector => "event-collector",
            PortType::Reserved(_) => "pcie-reserved",
        }
    }
}

bitflags! {
    /// Slot Capabilities (PCIe Base §7.5.3.9).
    #[derive(Clone, Copy, PartialEq, Eq, Debug)]
    pub struct SlotCapabilities: u32 {
        /// Attention button present.
        const ATTENTION_BUTTON = 1 << 0;
        /// Power controller present.
        const POWER_CONTROLLER = 1 << 1;
        /// MRL sensor present.
        const MRL_SENSOR = 1 << 2;
        /// Attention indicator present.
        const ATTENTION_INDICATOR = 1 << 3;
        /// Power indicator present.
        const POWER_INDICATOR = 1 << 4;
        /// Hot-plug surprise (removal without notice is allowed).
        const HOT_PLUG_SURPRISE = 1 << 5;
        /// Hot-plug capable.
        const HOT_PLUG_CAPABLE = 1 << 6;
        /// Electromechanical interlock present.
        const ELECTROMECHANICAL_INTERLOCK = 1 << 17;
        /// No command-completed support (writes complete instantly, no CC event).
        const NO_COMMAND_COMPLETED = 1 << 18;
    }
}

/// A parsed PCI Express capability.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct PcieCapability {
    /// Offset of the capability header.
    pub offset: u16,
    /// Capability structure version (1 or 2).
    pub version: u8,
    /// What kind of PCIe function this is.
    pub port_type: PortType,
    /// A slot is attached to this (downstream-facing) port.
    pub slot_implemented: bool,
    /// MSI/MSI-X message used for this capability's interrupts (hot-plug events).
    pub interrupt_message_number: u8,
    /// Slot capabilities; empty when no slot is implemented.
    pub slot_capabilities: SlotCapabilities,
    /// Physical slot number from Slot Capabilities (bits 31:19).
    pub physical_slot: u16,
}

impl PcieCapability {
    /// Reads the PCI Express capability at `offset`.
    pub fn read(
        access: &(impl ConfigAccess + ?Sized),
        address: PciAddress,
        offset: u16,
    ) -> Result<Self, KernelError> {
        fits(address, offset, 0x0c, LEGACY_CONFIG_SIZE)?;
        let flags = access.read16(address, offset + pcie::FLAGS);
        if flags == u16::MAX {
            return Err(KernelError::Pci(PciErrorKind::DeviceGone {
                address: address.as_array(),
            }));
        }
        let port_type = PortType::from_field(((flags >> 4) & 0xf) as u8);
        let slot_implemented =
            flags & pcie::FLAGS_SLOT_IMPLEMENTED != 0 && port_type.is_downstream_facing();
        let mut slot_capabilities = SlotCapabilities::empty();
        let mut physical_slot = 0;
        if slot_implemented {
            fits(address, offset, pcie::LENGTH_WITH_SLOT, LEGACY_CONFIG_SIZE)?;
            let raw = access.read32(address, offset + pcie::SLOT_CAPABILITIES);
            slot_capabilities = SlotCapabilities::from_bits_truncate(raw);
            physical_slot = (raw >> 19) as u16;
        }
        Ok(PcieCapability {
            offset,
            version: (flags & 0xf) as u8,
            port_type,
            slot_implemented,
            interrupt_message_number: ((flags >> 9) & 0x1f) as u8,
            slot_capabilities,
            physical_slot,
        })
    }

    /// True when this port is a native hot-plug controller (slot implemented, HPC set).
    pub fn is_hotplug_port(&self) -> bool {
        self.slot_implemented
            && self
                .slot_capabilities
                .contains(SlotCapabilities::HOT_PLUG_CAPABLE)
    }
}

/// SR-IOV capability register offsets, relative to the capability (SR-IOV 1.1 §3.3).
pub mod sriov {
    /// SR-IOV Capabilities (32 bits).
    pub const CAPABILITIES: u16 = 0x04;
    /// SR-IOV Control (16 bits).
    pub const CONTROL: u16 = 0x08;
    /// SR-IOV Status (16 bits).
    pub const STATUS: u16 = 0x0a;
    /// InitialVFs (16 bits).
    pub const INITIAL_VFS: u16 = 0x0c;
    /// TotalVFs (16 bits).
    pub const TOTAL_VFS: u16 = 0x0e;
    /// NumVFs (16 bits, writable only while VF Enable is clear).
    pub const NUM_VFS: u16 = 0x10;
    /// First VF Offset (16 bits), routing-ID distance from the PF to VF 0.
    pub const FIRST_VF_OFFSET: u16 = 0x14;
    /// VF Stride (16 bits), routing-ID distance between consecutive VFs.
    pub const VF_STRIDE: u16 = 0x16;
    /// VF Device ID (16 bits).
    pub const VF_DEVICE_ID: u16 = 0x1a;
    /// Supported Page Sizes (32 bits).
    pub const SUPPORTED_PAGE_SIZES: u16 = 0x1c;
    /// System Page Size (32 bits).
    pub const SYSTEM_PAGE_SIZE: u16 = 0x20;
    /// VF BAR0; VF BAR1..5 follow dword by dword.
    pub const VF_BAR0: u16 = 0x24;
    /// Bytes of the capability structure.
    pub const LENGTH: u16 = 0x40;
    /// Control: VF Enable.
    pub const CONTROL_VF_ENABLE: u16 = 1 << 0;
    /// Control: VF Memory Space Enable.
    pub const CONTROL_VF_MEMORY_ENABLE: u16 = 1 << 3;
    /// Control: ARI Capable Hierarchy.
    pub const CONTROL_ARI_CAPABLE: u16 = 1 << 4;
}

/// A parsed SR-IOV extended capability.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct SriovCapability {
    /// Offset of the capability header.
    pub offset: u16,
    /// SR-IOV Control.
    pub control: u16,
    /// VFs initially associated with the PF.
    pub initial_vfs: u16,
    /// Maximum number of VFs.
    pub total_vfs: u16,
    /// VFs currently configured.
    pub num_vfs: u16,
    /// Routing-ID offset of VF 0 from the PF (valid for the current NumVFs).
    pub first_vf_offset: u16,
    /// Routing-ID distance between VFs (valid for the current NumVFs).
    pub vf_stride: u16,
    /// Device ID every VF has (the VFs' own ID registers read 0xFFFF).
    pub vf_device_id: u16,
    /// System page size register (bit n set = 4 KiB << n).
    pub system_page_size: u32,
}

impl SriovCapability {
    /// Reads the SR-IOV capability at `offset`.
    pub fn read(
        access: &(impl ConfigAccess + ?Sized),
        address: PciAddress,
        offset: u16,
    ) -> Result<Self, KernelError> {
        fits(address, offset, sriov::LENGTH, EXTENDED_CONFIG_SIZE)?;
        let control = access.read16(address, offset + sriov::CONTROL);
        if control == u16::MAX {
            return Err(KernelError::Pci(PciErrorKind::DeviceGone {
                address: address.as_array(),
            }));
        }
        Ok(SriovCapability {
            offset,
            control,
            initial_vfs: access.read16(address, offset + sriov::INITIAL_VFS),
            total_vfs: access.read16(address, offset + sriov::TOTAL_VFS),
            num_vfs: access.read16(address, offset + sriov::NUM_VFS),
            first_vf_offset: access.read16(address, offset + sriov::FIRST_VF_OFFSET),
            vf_stride: access.read16(address, offset + sriov::VF_STRIDE),
            vf_device_id: access.read16(address, offset + sriov::VF_DEVICE_ID),
            system_page_size: access.read32(address, offset + sriov::SYSTEM_PAGE_SIZE),
        })
    }

    /// Finds and reads the SR-IOV capability of `address`.
    pub fn find(
        access: &(impl ConfigAccess + ?Sized),
        address: PciAddress,
    ) -> Result<Self, KernelError> {
        let offset = find_extended_capability(access, address, extended_id::SRIOV)
            .ok_or(missing(address, "sriov"))?;
        SriovCapability::read(access, address, offset)
    }

    /// True while VF Enable is set.
    pub fn vfs_enabled(&self) -> bool {
        self.control & sriov::CONTROL_VF_ENABLE != 0
    }

    /// Routing ID of VF `index` (0-based) of the PF at `pf`: PF RID + First VF Offset +
    /// index × VF Stride (SR-IOV 1.1 §3.3.10). `None` when it overflows the 16-bit RID space.
    pub fn vf_address(&self, pf: PciAddress, index: u16) -> Option<PciAddress> {
        let distance = u32::from(self.vf_stride) * u32::from(index);
        let rid = u32::from(pf.routing_id()) + u32::from(self.first_vf_offset) + distance;
        u16::try_from(rid).ok().map(PciAddress::from_routing_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::fake::{FakeConfigSpace, FakeFunction};
    use alloc::vec;

    const DEVICE: PciAddress = PciAddress::new(0, 3, 0);

    /// A function whose config space is exactly `bytes` (rest zero), status says "caps".
    fn space_with(bytes: &[(u16, &[u8])]) -> FakeConfigSpace {
        let mut function = FakeFunction::endpoint(0x1af4, 0x1041, [2, 0, 0]);
        function.set_bytes(reg::STATUS, &Status::CAPABILITIES_LIST.bits().to_le_bytes());
        for (offset, data) in bytes {
            function.set_bytes(*offset, data);
        }
        let space = FakeConfigSpace::new();
        space.insert(DEVICE, function);
        space
    }

    #[test]
    fn walks_a_well_formed_standard_chain() {
        let space = space_with(&[
            (0x34, &[0x40]),
            (0x40, &[0x01, 0x50]),
            (0x50, &[0x05, 0x70]),
            (0x70, &[0x11, 0xa0]),
            (0xa0, &[0x10, 0x00]),
        ]);
        let mut walk = CapabilityWalk::standard(&space, DEVICE);
        let found: Vec<(u16, u16)> = walk.by_ref().map(|c| (c.id, c.offset)).collect();
        assert_eq!(
            found,
            vec![(1, 0x40), (5, 0x50), (0x11, 0x70), (0x10, 0xa0)]
        );
        assert_eq!(walk.fault(), None);
    }

    #[test]
    fn masks_reserved_pointer_bits() {
        let space = space_with(&[(0x34, &[0x43]), (0x40, &[0x09, 0x53]), (0x50, &[0x05, 0])]);
        let found: Vec<u16> = CapabilityWalk::standard(&space, DEVICE)
            .map(|c| c.offset)
            .collect();
        assert_eq!(found, vec![0x40, 0x50]);
    }

    #[test]
    fn standard_loop_terminates_and_is_reported() {
        let space = space_with(&[
            (0x34, &[0x40]),
            (0x40, &[0x01, 0x50]),
            (0x50, &[0x05, 0x40]),
        ]);
        let mut walk = CapabilityWalk::standard(&space, DEVICE);
        assert_eq!(walk.by_ref().count(), 2);
        assert_eq!(walk.fault(), Some(ChainFault::Loop { at: 0x40 }));
    }

    #[test]
    fn self_loop_terminates() {
        let space = space_with(&[(0x34, &[0xfc]), (0xfc, &[0x09, 0xfc])]);
        let mut walk = CapabilityWalk::standard(&space, DEVICE);
        assert_eq!(walk.by_ref().count(), 1);
        assert_eq!(walk.fault(), Some(ChainFault::Loop { at: 0xfc }));
    }

    #[test]
    fn pointer_into_header_is_reported() {
        let space = space_with(&[(0x34, &[0x40]), (0x40, &[0x01, 0x10])]);
        let mut walk = CapabilityWalk::standard(&space, DEVICE);
        assert_eq!(walk.by_ref().count(), 1);
        assert_eq!(
            walk.fault(),
            Some(ChainFault::PointerIntoHeader {
                from: 0x40,
                to: 0x10
            })
        );

        let first_bad = space_with(&[(0x34, &[0x20])]);
        let mut walk = CapabilityWalk::standard(&first_bad, DEVICE);
        assert_eq!(walk.by_ref().count(), 0);
        assert_eq!(
            walk.fault(),
            Some(ChainFault::PointerIntoHeader {
                from: 0x34,
                to: 0x20
            })
        );
    }

    #[test]
    fn no_capability_list_bit_means_no_walk() {
        let space = space_with(&[(0x34, &[0x40]), (0x40, &[0x01, 0])]);
        space.write_raw(DEVICE, reg::STATUS, &[0, 0]);
        assert_eq!(CapabilityWalk::standard(&space, DEVICE).count(), 0);
    }

    #[test]
    fn absent_function_reports_gone() {
        let space = FakeConfigSpace::new();
        let mut walk = CapabilityWalk::standard(&space, DEVICE);
        assert_eq!(walk.by_ref().count(), 0);
        assert_eq!(walk.fault(), Some(ChainFault::DeviceGone));
        assert_eq!(CapabilityWalk::extended(&space, DEVICE).count(), 0);
    }

    fn extended_header(capability_id: u16, next: u16) -> [u8; 4] {
        (u32::from(capability_id) | (1 << 16) | (u32::from(next) << 20)).to_le_bytes()
    }

    #[test]
    fn walks_extended_chain_like_qemu_igb() {
        let space = space_with(&[
            (0x100, &extended_header(0x01, 0x150)),
            (0x150, &extended_header(0x0e, 0x160)),
            (0x160, &extended_header(0x10, 0)),
        ]);
        let list = CapabilityList::read(&space, DEVICE);
        assert!(list.faults.is_empty());
        assert_eq!(list.find_extended(extended_id::SRIOV), Some(0x160));
        let names: Vec<_> = list.entries.iter().map(|c| c.name().unwrap()).collect();
        assert_eq!(names, vec!["aer", "ari", "sriov"]);
    }

    #[test]
    fn extended_loop_and_header_pointer_are_reported() {
        let looped = space_with(&[
            (0x100, &extended_header(0x01, 0x200)),
            (0x200, &extended_header(0x0d, 0x100)),
        ]);
        let mut walk = CapabilityWalk::extended(&looped, DEVICE);
        assert_eq!(walk.by_ref().count(), 2);
        assert_eq!(walk.fault(), Some(ChainFault::Loop { at: 0x100 }));

        let into_header = space_with(&[(0x100, &extended_header(0x01, 0x40))]);
        let mut walk = CapabilityWalk::extended(&into_header, DEVICE);
        assert_eq!(walk.by_ref().count(), 1);
        assert_eq!(
            walk.fault(),
            Some(ChainFault::PointerIntoHeader {
                from: 0x100,
                to: 0x40
            })
        );
    }

    #[test]
    fn last_dword_of_extended_space_is_reachable_but_structures_must_fit() {
        let space = space_with(&[
            (0x100, &extended_header(0x01, 0xffc)),
            (0xffc, &extended_header(extended_id::SRIOV, 0)),
        ]);
        let mut walk = CapabilityWalk::extended(&space, DEVICE);
        let offsets: Vec<u16> = walk.by_ref().map(|c| c.offset).collect();
        assert_eq!(offsets, vec![0x100, 0xffc]);
        assert_eq!(walk.fault(), None);
        // The SR-IOV structure would run 0x3c bytes past 4 KiB: parse refuses it.
        let error = SriovCapability::find(&space, DEVICE).unwrap_err();
        assert!(matches!(
            error,
            KernelError::Pci(PciErrorKind::BadValue { .. })
        ));
    }

    #[test]
    fn msix_capability_at_the_end_of_legacy_space_is_rejected() {
        let space = space_with(&[(0x34, &[0xf8]), (0xf8, &[0x11, 0, 0x09, 0])]);
        let error = MsixCapability::find(&space, DEVICE).unwrap_err();
        assert!(matches!(
            error,
            KernelError::Pci(PciErrorKind::BadValue { .. })
        ));
    }

    #[test]
    fn parses_msix_like_qemu_igb() {
        let space = space_with(&[
            (0x34, &[0x70]),
            (0x70, &[0x11, 0x00, 0x09, 0x00]),
            (0x74, &3u32.to_le_bytes()),
            (0x78, &0x2003u32.to_le_bytes()),
        ]);
        let msix = MsixCapability::find(&space, DEVICE).unwrap();
        assert_eq!(
            msix,
            MsixCapability {
                offset: 0x70,
                table_size: 10,
                table_bar: 3,
                table_offset: 0,
                pba_bar: 3,
                pba_offset: 0x2000
            }
        );
    }

    #[test]
    fn msix_with_bar_indicator_six_is_rejected() {
        let space = space_with(&[
            (0x34, &[0x70]),
            (0x70, &[0x11, 0, 0, 0]),
            (0x74, &[6, 0, 0, 0]),
        ]);
        assert!(MsixCapability::find(&space, DEVICE).is_err());
    }

    #[test]
    fn parses_qemu_root_port_slot() {
        let space = space_with(&[
            (0x54, &[0x10, 0x00, 0x42, 0x01]),
            (0x68, &0x000a_007bu32.to_le_bytes()),
        ]);
        let capability = PcieCapability::read(&space, DEVICE, 0x54).unwrap();
        assert_eq!(capability.port_type, PortType::RootPort);
        assert_eq!(capability.version, 2);
        assert!(capability.is_hotplug_port());
        assert_eq!(capability.physical_slot, 1);
        assert!(
            capability
                .slot_capabilities
                .contains(SlotCapabilities::ATTENTION_BUTTON | SlotCapabilities::POWER_CONTROLLER)
        );
    }

    #[test]
    fn endpoint_never_claims_a_slot() {
        // Slot-implemented bit set on an endpoint is meaningless and must be ignored.
        let space = space_with(&[(0xa0, &[0x10, 0x00, 0x02, 0x01])]);
        let capability = PcieCapability::read(&space, DEVICE, 0xa0).unwrap();
        assert_eq!(capability.port_type, PortType::Endpoint);
        assert!(!capability.is_hotplug_port());
    }

    #[test]
    fn vf_routing_ids_follow_offset_and_stride() {
        let capability = SriovCapability {
            offset: 0x160,
            control: 0,
            initial_vfs: 8,
            total_vfs: 8,
            num_vfs: 8,
            first_vf_offset: 0x80,
            vf_stride: 2,
            vf_device_id: 0x10ca,
            system_page_size: 1,
        };
        let pf = PciAddress::new(1, 0, 0);
        assert_eq!(
            capability.vf_address(pf, 0),
            Some(PciAddress::new(1, 0x10, 0))
        );
        assert_eq!(
            capability.vf_address(pf, 7),
            Some(PciAddress::new(1, 0x11, 6))
        );
        let last_bus = PciAddress::new(0xff, 0x1f, 0);
        assert_eq!(capability.vf_address(last_bus, 0), None);
    }

    #[test]
    fn display_names_known_and_unknown_capabilities() {
        let msix = Capability {
            id: 0x11,
            offset: 0x48,
            extended: false,
        };
        let odd = Capability {
            id: 0x42,
            offset: 0x60,
            extended: false,
        };
        let odd_extended = Capability {
            id: 0x2a,
            offset: 0x200,
            extended: true,
        };
        assert_eq!(alloc::format!("{msix}"), "msix@0x48");
        assert_eq!(alloc::format!("{odd}"), "0x42@0x60");
        assert_eq!(alloc::format!("{odd_extended}"), "0x002a@0x200");
    }
}
