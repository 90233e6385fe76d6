//! Base Address Registers (sizing, decoding, programming) and the forwarding windows of
//! PCI-to-PCI bridges (PCI Local Bus 3.0 §6.2.5, PCI-to-PCI Bridge 1.2 §3.2.5).

use super::address::PciAddress;
use super::config::{ConfigAccess, reg};
use crate::error::{KernelError, PciErrorKind};
use core::fmt;

/// BAR bit 0: the BAR decodes I/O space.
const BAR_IO_SPACE: u32 = 1 << 0;
/// BAR bits 2:1 of a memory BAR: the address width.
const BAR_MEMORY_TYPE_MASK: u32 = 0b11 << 1;
/// Memory type: 32-bit address.
const BAR_MEMORY_TYPE_32: u32 = 0b00 << 1;
/// Memory type: below 1 MiB (PCI 2.x legacy, treated as 32-bit).
const BAR_MEMORY_TYPE_BELOW_1M: u32 = 0b01 << 1;
/// Memory type: 64-bit address, the next BAR holds the upper dword.
const BAR_MEMORY_TYPE_64: u32 = 0b10 << 1;
/// BAR bit 3 of a memory BAR: prefetchable.
const BAR_PREFETCHABLE: u32 = 1 << 3;
/// Address bits of a memory BAR's low dword.
const BAR_MEMORY_ADDRESS_MASK: u32 = !0xf;
/// Address bits of an I/O BAR.
const BAR_IO_ADDRESS_MASK: u32 = !0x3;

/// Bridge memory windows have 1 MiB granularity.
pub const MEMORY_WINDOW_GRANULARITY: u64 = 1 << 20;
/// Bridge I/O windows have 4 KiB granularity.
pub const IO_WINDOW_GRANULARITY: u64 = 1 << 12;
/// Window type field (bits 3:0 of I/O base / prefetchable base): 32/64-bit addressing.
const WINDOW_TYPE_WIDE: u16 = 0x1;

/// What address space a BAR decodes.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum BarKind {
    /// Memory below 4 GiB.
    Memory32,
    /// Memory anywhere in the 64-bit space; takes two BAR slots.
    Memory64,
    /// I/O ports.
    Io,
}

impl BarKind {
    /// "mem32", "mem64" or "io".
    pub fn name(&self) -> &'static str {
        match self {
            BarKind::Memory32 => "mem32",
            BarKind::Memory64 => "mem64",
            BarKind::Io => "io",
        }
    }
}

/// One implemented BAR: what it decodes, where, and how large it is.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Bar {
    /// Address space and width.
    pub kind: BarKind,
    /// Programmed base address; 0 means "not assigned".
    pub address: u64,
    /// Size in bytes (a power of two).
    pub size: u64,
    /// Prefetchable memory (no read side effects).
    pub prefetchable: bool,
}

impl Bar {
    /// True once a base address has been programmed.
    pub fn is_assigned(&self) -> bool {
        self.address != 0
    }

    /// True for memory BARs.
    pub fn is_memory(&self) -> bool {
        self.kind != BarKind::Io
    }

    /// The decoded range, if assigned and not wrapping around.
    pub fn range(&self) -> Option<AddressRange> {
        if !self.is_assigned() {
            return None;
        }
        AddressRange::from_start_size(self.address, self.size)
    }
}

impl fmt::Display for Bar {
    /// The compact form used in hot-plug log lines: `mem32@0xfe000000+0x20000`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}@{:#x}+{:#x}",
            self.kind.name(),
            self.address,
            self.size
        )
    }
}

/// An inclusive address range `[start, end]` (inclusive so ranges may end at `u64::MAX`).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct AddressRange {
    /// First address.
    pub start: u64,
    /// Last address (inclusive).
    pub end: u64,
}

impl AddressRange {
    /// `[start, start + size - 1]`, or `None` for size 0 or overflow.
    pub fn from_start_size(start: u64, size: u64) -> Option<Self> {
        let end = start.checked_add(size.checked_sub(1)?)?;
        Some(AddressRange { start, end })
    }

    /// Number of bytes (saturating at `u64::MAX` for the full space).
    pub fn size(&self) -> u64 {
        (self.end - self.start).saturating_add(1)
    }

    /// True when `other` lies entirely inside this range.
    pub fn contains(&self, other: &AddressRange) -> bool {
        other.start >= self.start && other.end <= self.end
    }

    /// True when the two ranges share at least one address.
    pub fn overlaps(&self, other: &AddressRange) -> bool {
        self.start <= other.end && other.start <= self.end
    }
}

impl fmt::Display for AddressRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}-{:#x}", self.start, self.end)
    }
}

/// Sizes the `count` BARs starting at config offset `base` (0x10 for headers, the SR-IOV
/// capability's VF BAR0 for VF BARs), restoring their values afterwards.
///
/// The caller must have disabled decoding (Command.MEM/IO, or VF MSE) so the all-ones probe
/// value is never decoded (PCI 3.0 §6.2.5.1). Unimplemented BARs and the upper halves of 64-bit
/// BARs are `None`. A 64-bit BAR in the last slot or a reserved memory type is logged and
/// skipped rather than trusted.
pub fn size_bars(
    access: &(impl ConfigAccess + ?Sized),
    address: PciAddress,
    base: u16,
    count: usize,
) -> [Option<Bar>; 6] {
    let mut bars = [None; 6];
    let count = count.min(6);
    let mut index = 0;
    while index < count {
        let offset = base + 4 * index as u16;
        let original = access.read32(address, offset);
        if original == u32::MAX {
            // Nobody answers (or a BAR reading all-ones, which no valid BAR does).
            index += 1;
            continue;
        }
        if original & BAR_IO_SPACE != 0 {
            access.write32(address, offset, u32::MAX);
            let probe = access.read32(address, offset);
            access.write32(address, offset, original);
            let mut mask = probe & BAR_IO_ADDRESS_MASK;
            if mask != 0 && mask & 0xffff_0000 == 0 {
                // 16-bit I/O decoders hard-wire the upper half to zero (PCI 3.0 §6.2.5.1).
                mask |= 0xffff_0000;
            }
            if mask != 0 {
                bars[index] = Some(Bar {
                    kind: BarKind::Io,
                    address: u64::from(original & BAR_IO_ADDRESS_MASK),
                    size: u64::from(mask & mask.wrapping_neg()),
                    prefetchable: false,
                });
            }
            index += 1;
            continue;
        }
        let prefetchable = original & BAR_PREFETCHABLE != 0;
        match original & BAR_MEMORY_TYPE_MASK {
            BAR_MEMORY_TYPE_32 | BAR_MEMORY_TYPE_BELOW_1M => {
                access.write32(address, offset, u32::MAX);
                let probe = access.read32(address, offset);
                access.write32(address, offset, original);
                let mask = probe & BAR_MEMORY_ADDRESS_MASK;
                if mask != 0 {
                    bars[index] = Some(Bar {
                        kind: BarKind::Memory32,
                        address: u64::from(original & BAR_MEMORY_ADDRESS_MASK),
                        size: u64::from(mask & mask.wrapping_neg()),
                        prefetchable,
                    });
                }
                index += 1;
            }
            BAR_MEMORY_TYPE_64 => {
                if index + 1 >= count {
                    log::warn!("pci: {address} BAR at {offset:#x} is 64-bit but has no upper half");
                    index += 1;
                    continue;
                }
                let original_high = access.read32(address, offset + 4);
                access.write32(address, offset, u32::MAX);
                access.write32(address, offset + 4, u32::MAX);
                let probe_low = access.read32(address, offset);
                let probe_high = access.read32(address, offset + 4);
                access.write32(address, offset, original);
                access.write32(address, offset + 4, original_high);
                let mask =
                    (u64::from(probe_high) << 32) | u64::from(probe_low & BAR_MEMORY_ADDRESS_MASK);
                if mask != 0 {
                    bars[index] = Some(Bar {
                        kind: BarKind::Memory64,
                        address: (u64::from(original_high) << 32)
                            | u64::from(original & BAR_MEMORY_ADDRESS_MASK),
                        size: mask & mask.wrapping_neg(),
                        prefetchable,
                    });
                }
                index += 2;
            }
            _ => {
                log::warn!("pci: {address} BAR at {offset:#x} has a reserved memory type");
                index += 1;
            }
        }
    }
    bars
}

/// Programs BAR `index` (of the BAR block at `base`) to `new_address` and reads it back.
///
/// Fails with `BadValue` when the device does not keep the address (a read-only BAR, or QEMU
/// dropping the upper dword), so callers never believe in a mapping the device does not decode.
pub fn program_bar(
    access: &(impl ConfigAccess + ?Sized),
    address: PciAddress,
    base: u16,
    index: usize,
    bar: &Bar,
    new_address: u64,
) -> Result<(), KernelError> {
    let offset = base + 4 * index as u16;
    let low_flags = access.read32(address, offset) & !BAR_MEMORY_ADDRESS_MASK;
    let fits_kind = match bar.kind {
        BarKind::Memory64 => true,
        BarKind::Memory32 => new_address <= u64::from(u32::MAX),
        BarKind::Io => new_address <= u64::from(u32::MAX),
    };
    if !fits_kind {
        return Err(KernelError::Pci(PciErrorKind::BadValue {
            address: address.as_array(),
            what: "BAR address out of range for its type",
        }));
    }
    let low_mask = if bar.kind == BarKind::Io {
        BAR_IO_ADDRESS_MASK
    } else {
        BAR_MEMORY_ADDRESS_MASK
    };
    access.write32(
        address,
        offset,
        (new_address as u32 & low_mask) | (low_flags & !low_mask),
    );
    let mut read_back = u64::from(access.read32(address, offset) & low_mask);
    if bar.kind == BarKind::Memory64 {
        access.write32(address, offset + 4, (new_address >> 32) as u32);
        read_back |= u64::from(access.read32(address, offset + 4)) << 32;
    }
    if read_back != new_address {
        log::warn!("pci: {address} bar{index}: wrote {new_address:#x}, device kept {read_back:#x}");
        return Err(KernelError::Pci(PciErrorKind::BadValue {
            address: address.as_array(),
            what: "BAR did not keep the programmed address",
        }));
    }
    Ok(())
}

/// The forwarding windows of a PCI-to-PCI bridge. `None` means the window is closed.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct BridgeWindows {
    /// I/O window.
    pub io: Option<AddressRange>,
    /// Non-prefetchable memory window (always below 4 GiB).
    pub memory: Option<AddressRange>,
    /// Prefetchable memory window.
    pub prefetchable: Option<AddressRange>,
    /// The prefetchable window decodes 64-bit addresses.
    pub prefetchable_64bit: bool,
    /// The I/O window decodes 32-bit addresses.
    pub io_32bit: bool,
}

/// A window is open when base <= limit. Base 0 is also treated as closed: it is the reset
/// value of an unconfigured bridge, and no platform puts PCI windows over low RAM.
fn open_window(start: u64, end: u64) -> Option<AddressRange> {
    (start != 0 && start <= end).then_some(AddressRange { start, end })
}

/// Reads the bridge windows of the type 1 function at `address`.
pub fn read_bridge_windows(
    access: &(impl ConfigAccess + ?Sized),
    address: PciAddress,
) -> BridgeWindows {
    let io_registers = access.read16(address, reg::IO_BASE);
    let io_32bit = io_registers & 0xf == WINDOW_TYPE_WIDE;
    let (io_base_upper, io_limit_upper) = if io_32bit {
        let upper = access.read32(address, reg::IO_BASE_UPPER);
        (
            u64::from(upper & 0xffff) << 16,
            u64::from(upper >> 16) << 16,
        )
    } else {
        (0, 0)
    };
    let io_start = (u64::from(io_registers & 0xf0) << 8) | io_base_upper;
    let io_end = (u64::from((io_registers >> 8) & 0xf0) << 8) | 0xfff | io_limit_upper;

    let memory_registers = access.read32(address, reg::MEMORY_BASE);
    let memory_start = u64::from(memory_registers & 0xfff0) << 16;
    let memory_end = (u64::from((memory_registers >> 16) & 0xfff0) << 16) | 0xf_ffff;

    let prefetchable_registers = access.read32(address, reg::PREFETCHABLE_BASE);
    let prefetchable_64bit = prefetchable_registers & 0xf == u32::from(WINDOW_TYPE_WIDE);
    let (base_upper, limit_upper) = if prefetchable_64bit {
        (
            u64::from(access.read32(address, reg::PREFETCHABLE_BASE_UPPER)) << 32,
            u64::from(access.read32(address, reg::PREFETCHABLE_LIMIT_UPPER)) << 32,
        )
    } else {
        (0, 0)
    };
    let prefetchable_start = (u64::from(prefetchable_registers & 0xfff0) << 16) | base_upper;
    let prefetchable_end =
        (u64::from((prefetchable_registers >> 16) & 0xfff0) << 16) | 0xf_ffff | limit_upper;

    BridgeWindows {
        io: open_window(io_start, io_end),
        memory: open_window(memory_start, memory_end),
        prefetchable: open_window(prefetchable_start, prefetchable_end),
        prefetchable_64bit,
        io_32bit,
    }
}

/// Programs (or with `None`, closes) the non-prefetchable memory window. The range must be
/// 1 MiB aligned and below 4 GiB.
pub fn write_memory_window(
    access: &(impl ConfigAccess + ?Sized),
    address: PciAddress,
    range: Option<AddressRange>,
) {
    let value = match range {
        Some(range) => {
            ((range.start >> 16) as u32 & 0xfff0) | (((range.end >> 16) as u32 & 0xfff0) << 16)
        }
        // Base 0xFFF0_0000 above limit 0x000F_FFFF: closed.
        None => 0x0000_fff0,
    };
    access.write32(address, reg::MEMORY_BASE, value);
}

/// Programs (or closes) the prefetchable window; the upper dwords only on 64-bit windows.
pub fn write_prefetchable_window(
    access: &(impl ConfigAccess + ?Sized),
    address: PciAddress,
    range: Option<AddressRange>,
    is_64bit: bool,
) {
    // Close first so the window never spans a half-written range.
    access.write32(address, reg::PREFETCHABLE_BASE, 0x0000_fff0);
    let Some(range) = range else {
        if is_64bit {
            access.write32(address, reg::PREFETCHABLE_BASE_UPPER, 0);
            access.write32(address, reg::PREFETCHABLE_LIMIT_UPPER, 0);
        }
        return;
    };
    if is_64bit {
        access.write32(
            address,
            reg::PREFETCHABLE_BASE_UPPER,
            (range.start >> 32) as u32,
        );
        access.write32(
            address,
            reg::PREFETCHABLE_LIMIT_UPPER,
            (range.end >> 32) as u32,
        );
    }
    let value = ((range.start >> 16) as u32 & 0xfff0) | (((range.end >> 16) as u32 & 0xfff0) << 16);
    access.write32(address, reg::PREFETCHABLE_BASE, value);
}

/// Programs (or closes) the I/O window with 16-bit accesses (0x1E holds W1C secondary status).
pub fn write_io_window(
    access: &(impl ConfigAccess + ?Sized),
    address: PciAddress,
    range: Option<AddressRange>,
    is_32bit: bool,
) {
    let Some(range) = range else {
        access.write16(address, reg::IO_BASE, 0x00f0);
        return;
    };
    if is_32bit {
        let upper = ((range.start >> 16) as u32 & 0xffff) | (((range.end >> 16) as u32) << 16);
        access.write32(address, reg::IO_BASE_UPPER, upper);
    }
    let value = ((range.start >> 8) as u16 & 0xf0) | (((range.end >> 8) as u16 & 0xf0) << 8);
    access.write16(address, reg::IO_BASE, value);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::fake::{FakeBar, FakeConfigSpace, FakeFunction};

    const DEVICE: PciAddress = PciAddress::new(0, 2, 0);

    fn space(function: FakeFunction) -> FakeConfigSpace {
        let space = FakeConfigSpace::new();
        space.insert(DEVICE, function);
        space
    }

    #[test]
    fn sizes_every_bar_kind_and_restores_values() {
        let function = FakeFunction::endpoint(0x8086, 0x10c9, [2, 0, 0])
            .with_bar(
                0,
                FakeBar::Memory32 {
                    size: 0x20000,
                    prefetchable: false,
                },
            )
            .with_bar(2, FakeBar::Io { size: 0x20 })
            .with_bar(
                3,
                FakeBar::Memory64 {
                    size: 0x4000,
                    prefetchable: true,
                },
            )
            .with_bar_address(0, 0xfe00_0000);
        let space = space(function);
        let bars = size_bars(&space, DEVICE, reg::BAR0, 6);
        assert_eq!(
            bars[0],
            Some(Bar {
                kind: BarKind::Memory32,
                address: 0xfe00_0000,
                size: 0x20000,
                prefetchable: false
            })
        );
        assert_eq!(bars[1], None);
        assert_eq!(
            bars[2],
            Some(Bar {
                kind: BarKind::Io,
                address: 0,
                size: 0x20,
                prefetchable: false
            })
        );
        assert_eq!(
            bars[3],
            Some(Bar {
                kind: BarKind::Memory64,
                address: 0,
                size: 0x4000,
                prefetchable: true
            })
        );
        assert_eq!(bars[4], None, "upper half of the 64-bit BAR is not a BAR");
        assert_eq!(
            space.read32(DEVICE, reg::BAR0),
            0xfe00_0000,
            "value restored after sizing"
        );
    }

    #[test]
    fn hostile_sizing_answers_give_power_of_two_sizes_or_nothing() {
        // Non-contiguous writable bits: the lowest one decides the size.
        let mut function = FakeFunction::endpoint(1, 2, [0, 0, 0])
            .writable(reg::BAR0, &[0x30, 0xf0, 0x00, 0xff])
            .writable(reg::BAR0 + 4, &[0xfc, 0xff, 0x00, 0x00]);
        function.set_bytes(reg::BAR0 + 4, &[0x01, 0, 0, 0]);
        let space = space(function);
        let bars = size_bars(&space, DEVICE, reg::BAR0, 6);
        assert_eq!(
            bars[0].map(|b| (b.kind, b.size)),
            Some((BarKind::Memory32, 0x10))
        );
        // A 16-bit I/O BAR (upper half hard-wired to 0) is still sized from its low bits.
        assert_eq!(bars[1].map(|b| (b.kind, b.size)), Some((BarKind::Io, 4)));
        // A BAR reading all-ones is not a BAR.
        space.write_raw(DEVICE, reg::BAR0 + 8, &[0xff; 4]);
        assert_eq!(size_bars(&space, DEVICE, reg::BAR0, 6)[2], None);
    }

    #[test]
    fn sixty_four_bit_bar_in_last_slot_is_rejected() {
        let function = FakeFunction::endpoint(1, 2, [0, 0, 0]);
        let space = space(function);
        space.write_raw(DEVICE, reg::BAR0 + 20, &BAR_MEMORY_TYPE_64.to_le_bytes());
        assert_eq!(size_bars(&space, DEVICE, reg::BAR0, 6)[5], None);
    }

    #[test]
    fn programming_verifies_the_device_kept_the_address() {
        let function = FakeFunction::endpoint(1, 2, [0, 0, 0]).with_bar(
            0,
            FakeBar::Memory64 {
                size: 0x4000,
                prefetchable: true,
            },
        );
        let space = space(function);
        let bar = size_bars(&space, DEVICE, reg::BAR0, 6)[0].unwrap();
        program_bar(&space, DEVICE, reg::BAR0, 0, &bar, 0x1_2345_c000).unwrap();
        assert_eq!(space.read32(DEVICE, reg::BAR0), 0x2345_c000 | 0xc);
        assert_eq!(space.read32(DEVICE, reg::BAR0 + 4), 1);
        // Misaligned for a 16 KiB BAR: the device drops the low bits and we notice.
        assert!(program_bar(&space, DEVICE, reg::BAR0, 0, &bar, 0x1000).is_err());
    }

    #[test]
    fn mem32_bar_refuses_addresses_above_4g() {
        let function = FakeFunction::endpoint(1, 2, [0, 0, 0]).with_bar(
            0,
            FakeBar::Memory32 {
                size: 0x1000,
                prefetchable: false,
            },
        );
        let space = space(function);
        let bar = size_bars(&space, DEVICE, reg::BAR0, 6)[0].unwrap();
        assert!(program_bar(&space, DEVICE, reg::BAR0, 0, &bar, 0x1_0000_0000).is_err());
    }

    #[test]
    fn bridge_windows_round_trip() {
        let space = space(FakeFunction::bridge(0x1b36, 0x000c));
        let closed = read_bridge_windows(&space, DEVICE);
        assert_eq!(
            (closed.io, closed.memory, closed.prefetchable),
            (None, None, None)
        );
        let memory = AddressRange {
            start: 0xfe20_0000,
            end: 0xfe3f_ffff,
        };
        let prefetchable = AddressRange {
            start: 0x8_0000_0000,
            end: 0x8_001f_ffff,
        };
        let io = AddressRange {
            start: 0x1000,
            end: 0x1fff,
        };
        write_memory_window(&space, DEVICE, Some(memory));
        write_prefetchable_window(&space, DEVICE, Some(prefetchable), true);
        write_io_window(&space, DEVICE, Some(io), false);
        let windows = read_bridge_windows(&space, DEVICE);
        assert_eq!(windows.memory, Some(memory));
        assert_eq!(windows.prefetchable, Some(prefetchable));
        assert!(windows.prefetchable_64bit);
        assert_eq!(windows.io, Some(io));
        write_memory_window(&space, DEVICE, None);
        assert_eq!(read_bridge_windows(&space, DEVICE).memory, None);
    }

    #[test]
    fn range_helpers_handle_the_top_of_the_address_space() {
        let top = AddressRange::from_start_size(u64::MAX - 0xfff, 0x1000).unwrap();
        assert_eq!(top.end, u64::MAX);
        assert_eq!(top.size(), 0x1000);
        assert_eq!(AddressRange::from_start_size(u64::MAX, 2), None);
        assert_eq!(AddressRange::from_start_size(5, 0), None);
        let full = AddressRange {
            start: 0,
            end: u64::MAX,
        };
        assert_eq!(full.size(), u64::MAX);
        assert!(full.contains(&top) && top.overlaps(&full));
    }
}
