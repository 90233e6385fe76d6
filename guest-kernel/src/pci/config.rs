//! Configuration-space access: the one trait all PCI code reads and writes through, and the
//! register layout of the type 0 / type 1 headers (PCI Local Bus 3.0 §6.1, PCIe Base §7.5.1).

use super::address::PciAddress;
use bitflags::bitflags;

/// Reads and writes one function's configuration space.
///
/// Implemented by ECAM (4 KiB per function) and legacy port I/O (256 bytes) in the kernel, and by
/// a fake config space in host tests. Implementations return all-ones for offsets they cannot
/// reach (beyond their space, or a bus outside the ECAM range) and drop such writes, just as a
/// missing device does, so callers need only one "device gone" check.
///
/// Writes have no read-modify-write defaults on purpose: several registers share a dword with
/// write-1-to-clear status bits (Slot Control/Slot Status, Command/Status, I/O base/secondary
/// status), and rewriting the neighbour would clear events that were never handled.
pub trait ConfigAccess {
    /// Reads the dword at `offset` (rounded down to a multiple of 4).
    fn read32(&self, address: PciAddress, offset: u16) -> u32;
    /// Writes the dword at `offset` (rounded down to a multiple of 4).
    fn write32(&self, address: PciAddress, offset: u16, value: u32);
    /// Writes the 16-bit register at `offset` (rounded down to a multiple of 2) with a true
    /// 16-bit access.
    fn write16(&self, address: PciAddress, offset: u16, value: u16);
    /// Writes the byte at `offset` with a true 8-bit access.
    fn write8(&self, address: PciAddress, offset: u16, value: u8);

    /// Reads the 16-bit register at `offset` (rounded down to a multiple of 2).
    fn read16(&self, address: PciAddress, offset: u16) -> u16 {
        let dword = self.read32(address, offset & !3);
        (dword >> ((offset & 2) * 8)) as u16
    }

    /// Reads the byte at `offset`.
    fn read8(&self, address: PciAddress, offset: u16) -> u8 {
        let dword = self.read32(address, offset & !3);
        (dword >> ((offset & 3) * 8)) as u8
    }
}

impl<T: ConfigAccess + ?Sized> ConfigAccess for &T {
    fn read32(&self, address: PciAddress, offset: u16) -> u32 {
        (**self).read32(address, offset)
    }
    fn write32(&self, address: PciAddress, offset: u16, value: u32) {
        (**self).write32(address, offset, value)
    }
    fn write16(&self, address: PciAddress, offset: u16, value: u16) {
        (**self).write16(address, offset, value)
    }
    fn write8(&self, address: PciAddress, offset: u16, value: u8) {
        (**self).write8(address, offset, value)
    }
}

/// Size of one function's extended (PCIe) configuration space.
pub const EXTENDED_CONFIG_SIZE: u16 = 0x1000;
/// Size of the conventional configuration space reachable through port I/O.
pub const LEGACY_CONFIG_SIZE: u16 = 0x100;

/// Header register offsets shared by all header types.
pub mod reg {
    /// Vendor ID (16 bits); 0xFFFF when no function answers.
    pub const VENDOR_ID: u16 = 0x00;
    /// Device ID (16 bits).
    pub const DEVICE_ID: u16 = 0x02;
    /// Command register (16 bits), see [`super::Command`].
    pub const COMMAND: u16 = 0x04;
    /// Status register (16 bits), see [`super::Status`].
    pub const STATUS: u16 = 0x06;
    /// Revision ID (8 bits); the class code follows in bytes 0x09..=0x0B.
    pub const REVISION_ID: u16 = 0x08;
    /// Programming interface byte of the class code.
    pub const PROG_IF: u16 = 0x09;
    /// Sub-class byte of the class code.
    pub const SUBCLASS: u16 = 0x0a;
    /// Base class byte of the class code.
    pub const CLASS: u16 = 0x0b;
    /// Header type (bits 6:0) and multi-function flag (bit 7).
    pub const HEADER_TYPE: u16 = 0x0e;
    /// First Base Address Register.
    pub const BAR0: u16 = 0x10;
    /// Capabilities pointer (8 bits, valid when Status.CAPABILITIES_LIST is set).
    pub const CAPABILITIES_POINTER: u16 = 0x34;
    /// Interrupt line (8 bits) and pin (8 bits, at +1).
    pub const INTERRUPT_LINE: u16 = 0x3c;

    /// Type 1 (bridge): primary bus number (8 bits).
    pub const PRIMARY_BUS: u16 = 0x18;
    /// Type 1: secondary bus number (8 bits).
    pub const SECONDARY_BUS: u16 = 0x19;
    /// Type 1: subordinate bus number (8 bits).
    pub const SUBORDINATE_BUS: u16 = 0x1a;
    /// Type 1: I/O base (8 bits; bits 7:4 = address 15:12, bits 3:0 = 16/32-bit type).
    pub const IO_BASE: u16 = 0x1c;
    /// Type 1: I/O limit (8 bits).
    pub const IO_LIMIT: u16 = 0x1d;
    /// Type 1: memory base (16 bits; bits 15:4 = address 31:20).
    pub const MEMORY_BASE: u16 = 0x20;
    /// Type 1: memory limit (16 bits).
    pub const MEMORY_LIMIT: u16 = 0x22;
    /// Type 1: prefetchable memory base (16 bits; bits 3:0 = 32/64-bit type).
    pub const PREFETCHABLE_BASE: u16 = 0x24;
    /// Type 1: prefetchable memory limit (16 bits).
    pub const PREFETCHABLE_LIMIT: u16 = 0x26;
    /// Type 1: prefetchable base, address bits 63:32.
    pub const PREFETCHABLE_BASE_UPPER: u16 = 0x28;
    /// Type 1: prefetchable limit, address bits 63:32.
    pub const PREFETCHABLE_LIMIT_UPPER: u16 = 0x2c;
    /// Type 1: I/O base bits 31:16 (16 bits), limit bits 31:16 follow at +2.
    pub const IO_BASE_UPPER: u16 = 0x30;
    /// Type 1: bridge control (16 bits).
    pub const BRIDGE_CONTROL: u16 = 0x3e;
}

bitflags! {
    /// The Command register (PCI Local Bus 3.0 §6.2.2).
    #[derive(Clone, Copy, PartialEq, Eq, Debug)]
    pub struct Command: u16 {
        /// Respond to I/O-space accesses in the I/O BARs.
        const IO_SPACE = 1 << 0;
        /// Respond to memory accesses in the memory BARs.
        const MEMORY_SPACE = 1 << 1;
        /// Allow the function to master the bus (DMA, MSI/MSI-X writes).
        const BUS_MASTER = 1 << 2;
        /// Monitor special cycles (conventional PCI only).
        const SPECIAL_CYCLES = 1 << 3;
        /// Memory Write and Invalidate enable.
        const MEMORY_WRITE_INVALIDATE = 1 << 4;
        /// VGA palette snooping.
        const VGA_PALETTE_SNOOP = 1 << 5;
        /// Report parity errors.
        const PARITY_ERROR_RESPONSE = 1 << 6;
        /// Report SERR#.
        const SERR_ENABLE = 1 << 8;
        /// Fast back-to-back transactions.
        const FAST_BACK_TO_BACK = 1 << 9;
        /// Stop asserting legacy INTx (required while MSI/MSI-X is used).
        const INTERRUPT_DISABLE = 1 << 10;
    }
}

bitflags! {
    /// The Status register (PCI Local Bus 3.0 §6.2.3); bits 8 and 11-15 are write-1-to-clear.
    #[derive(Clone, Copy, PartialEq, Eq, Debug)]
    pub struct Status: u16 {
        /// Legacy interrupt pending.
        const INTERRUPT_STATUS = 1 << 3;
        /// The capabilities pointer at 0x34 is valid.
        const CAPABILITIES_LIST = 1 << 4;
        /// Master data parity error (W1C).
        const MASTER_DATA_PARITY_ERROR = 1 << 8;
        /// Signalled target abort (W1C).
        const SIGNALED_TARGET_ABORT = 1 << 11;
        /// Received target abort (W1C).
        const RECEIVED_TARGET_ABORT = 1 << 12;
        /// Received master abort (W1C).
        const RECEIVED_MASTER_ABORT = 1 << 13;
        /// Signalled system error (W1C).
        const SIGNALED_SYSTEM_ERROR = 1 << 14;
        /// Detected parity error (W1C).
        const DETECTED_PARITY_ERROR = 1 << 15;
    }
}

/// The layout of a function's header.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum HeaderType {
    /// Type 0: an endpoint with six BARs.
    Endpoint,
    /// Type 1: a PCI-to-PCI bridge (root/switch ports too) with two BARs and bus windows.
    Bridge,
    /// Type 2: a CardBus bridge (not supported beyond listing).
    CardBus,
    /// A reserved header type.
    Unknown(u8),
}

impl HeaderType {
    /// Decodes bits 6:0 of the header-type byte.
    pub fn from_byte(byte: u8) -> Self {
        match byte & 0x7f {
            0 => HeaderType::Endpoint,
            1 => HeaderType::Bridge,
            2 => HeaderType::CardBus,
            other => HeaderType::Unknown(other),
        }
    }

    /// How many BARs this header type has.
    pub fn bar_count(&self) -> usize {
        match self {
            HeaderType::Endpoint => 6,
            HeaderType::Bridge => 2,
            _ => 0,
        }
    }
}

/// The three class-code bytes.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct ClassCode {
    /// Base class, e.g. 0x02 network.
    pub base: u8,
    /// Sub-class, e.g. 0x00 Ethernet.
    pub sub: u8,
    /// Programming interface.
    pub prog_if: u8,
}

impl ClassCode {
    /// A short, stable name for logs and the device tree.
    pub fn short_name(&self) -> &'static str {
        match (self.base, self.sub) {
            (0x00, _) => "unclassified",
            (0x01, 0x00) => "scsi",
            (0x01, 0x01) => "ide",
            (0x01, 0x06) => "sata",
            (0x01, 0x08) => "nvme",
            (0x01, _) => "storage",
            (0x02, 0x00) => "ethernet",
            (0x02, _) => "network",
            (0x03, 0x00) => "vga",
            (0x03, _) => "display",
            (0x04, _) => "multimedia",
            (0x05, _) => "memory",
            (0x06, 0x00) => "host-bridge",
            (0x06, 0x01) => "isa-bridge",
            (0x06, 0x04) => "pci-bridge",
            (0x06, _) => "bridge",
            (0x07, _) => "communication",
            (0x08, _) => "system",
            (0x09, _) => "input",
            (0x0c, 0x03) => "usb",
            (0x0c, 0x05) => "smbus",
            (0x0c, _) => "serial-bus",
            (0xff, _) => "vendor-class",
            _ => "other",
        }
    }
}

/// Config offset of the q35 MCH PCIEXBAR register (function 00:00.0), low dword; the high
/// dword follows at +4 (Intel 3 Series Chipset datasheet §5.1.15).
pub const Q35_PCIEXBAR: u16 = 0x60;
/// Vendor/device dword of the q35 MCH host bridge (8086:29C0).
pub const Q35_HOST_BRIDGE_ID: u32 = 0x29c0_8086;

/// Decodes PCIEXBAR: `Some((ECAM base, last bus))` when enabled (bit 0). Bits 2:1 select the
/// size: 00 = 256 buses, 01 = 128, 10 = 64 (11 is reserved); the base takes bits 35:28, 35:27
/// or 35:26 accordingly.
pub fn decode_pciexbar(low: u32, high: u32) -> Option<(u64, u8)> {
    if low & 1 == 0 {
        return None;
    }
    let value = (u64::from(high) << 32) | u64::from(low);
    let (mask, last_bus) = match (low >> 1) & 0b11 {
        0b00 => (0xf_f000_0000u64, 0xff),
        0b01 => (0xf_f800_0000, 0x7f),
        0b10 => (0xf_fc00_0000, 0x3f),
        _ => return None,
    };
    Some((value & mask, last_bus))
}

/// Byte offset of register `offset` of `address` inside an ECAM mapping that starts at bus
/// `bus_start` and ends with bus `bus_end` (PCIe Base §7.2.2: bus << 20 | device << 15 |
/// function << 12 | register). `None` for buses outside the mapping or offsets past 4 KiB.
pub fn ecam_offset(bus_start: u8, bus_end: u8, address: PciAddress, offset: u16) -> Option<usize> {
    if offset >= EXTENDED_CONFIG_SIZE || !(bus_start..=bus_end).contains(&address.bus()) {
        return None;
    }
    let bus = usize::from(address.bus() - bus_start);
    Some((bus << 20) | (usize::from(address.devfn()) << 12) | usize::from(offset))
}

/// True when a 32-bit config read says nobody answered (absent, powered off or removed).
pub fn reads_absent(value: u32) -> bool {
    value == u32::MAX
}

/// Reads the Command register.
pub fn read_command(access: &(impl ConfigAccess + ?Sized), address: PciAddress) -> Command {
    Command::from_bits_retain(access.read16(address, reg::COMMAND))
}

/// Writes the Command register with a 16-bit access so the W1C Status bits are left alone.
pub fn write_command(access: &(impl ConfigAccess + ?Sized), address: PciAddress, command: Command) {
    access.write16(address, reg::COMMAND, command.bits());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_type_decodes_and_counts_bars() {
        assert_eq!(HeaderType::from_byte(0x80), HeaderType::Endpoint);
        assert_eq!(HeaderType::from_byte(0x81).bar_count(), 2);
        assert_eq!(HeaderType::from_byte(0x7f), HeaderType::Unknown(0x7f));
        assert_eq!(HeaderType::Unknown(5).bar_count(), 0);
    }

    #[test]
    fn ecam_offsets_follow_the_bus_device_function_layout() {
        let vf7 = PciAddress::new(1, 0x11, 6);
        assert_eq!(ecam_offset(0, 0xff, vf7, 0x160), Some(0x0018_e160));
        assert_eq!(
            ecam_offset(1, 0x10, vf7, 0x4),
            Some(0x0008_e004),
            "relative to bus_start"
        );
        assert_eq!(ecam_offset(2, 0xff, vf7, 0), None, "bus below the mapping");
        assert_eq!(ecam_offset(0, 0x3f, PciAddress::new(0x40, 0, 0), 0), None);
        assert_eq!(ecam_offset(0, 0xff, vf7, 0x1000), None, "past 4 KiB");
        assert_eq!(
            ecam_offset(0, 0xff, PciAddress::new(0xff, 31, 7), 0xffc),
            Some(0x0fff_fffc)
        );
    }

    #[test]
    fn pciexbar_decodes_like_seabios_sets_it() {
        assert_eq!(decode_pciexbar(0xb000_0001, 0), Some((0xb000_0000, 0xff)));
        assert_eq!(decode_pciexbar(0xb000_0000, 0), None, "disabled");
        assert_eq!(decode_pciexbar(0xe800_0003, 0), Some((0xe800_0000, 0x7f)));
        assert_eq!(
            decode_pciexbar(0xec00_0005, 0x1),
            Some((0x1_ec00_0000, 0x3f))
        );
        assert_eq!(decode_pciexbar(0xb000_0007, 0), None, "reserved size");
    }

    #[test]
    fn class_names_distinguish_common_devices() {
        let ethernet = ClassCode {
            base: 2,
            sub: 0,
            prog_if: 0,
        };
        let bridge = ClassCode {
            base: 6,
            sub: 4,
            prog_if: 0,
        };
        assert_eq!(ethernet.short_name(), "ethernet");
        assert_eq!(bridge.short_name(), "pci-bridge");
        assert_eq!(
            ClassCode {
                base: 0x42,
                sub: 0,
                prog_if: 0
            }
            .short_name(),
            "other"
        );
    }
}
