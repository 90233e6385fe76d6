//! ECAM (PCIe enhanced configuration access mechanism, PCIe Base §7.2.2): each function's
//! 4 KiB config space is memory at `base + (bus << 20 | device << 15 | function << 12)`.

use super::address::PciAddress;
use super::config::{ConfigAccess, ecam_offset};
use crate::error::KernelError;
use crate::mm::mmio::MmioRegion;
use net_device::RegisterIo;

/// Bytes of ECAM space per bus.
const BUS_STRIDE: u64 = 1 << 20;

/// ECAM access over one mapped MCFG range.
#[derive(Clone, Debug)]
pub struct Ecam {
    region: MmioRegion,
    base: u64,
    bus_start: u8,
    bus_end: u8,
}

impl Ecam {
    /// Maps the ECAM space of buses `bus_start..=bus_end`; `base` is the address of bus 0
    /// (as in the MCFG table), so the mapping starts at `base + bus_start << 20`.
    pub fn new(base: u64, bus_start: u8, bus_end: u8) -> Result<Self, KernelError> {
        if bus_end < bus_start {
            return Err(KernelError::BadFirmwareTable {
                table: "MCFG",
                reason: "bus range reversed",
            });
        }
        let start = base.checked_add(u64::from(bus_start) * BUS_STRIDE).ok_or(
            KernelError::BadFirmwareTable {
                table: "MCFG",
                reason: "base overflows",
            },
        )?;
        let len = (u64::from(bus_end - bus_start) + 1) * BUS_STRIDE;
        let region = MmioRegion::map(start, len as usize)?;
        Ok(Ecam {
            region,
            base,
            bus_start,
            bus_end,
        })
    }

    /// Physical address of bus 0's config space.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// First and last bus reachable.
    pub fn bus_range(&self) -> (u8, u8) {
        (self.bus_start, self.bus_end)
    }

    /// Offset of `address`'s register `offset` inside the mapping; `None` outside the range.
    fn offset(&self, address: PciAddress, offset: u16) -> Option<usize> {
        ecam_offset(self.bus_start, self.bus_end, address, offset)
    }
}

impl ConfigAccess for Ecam {
    fn read32(&self, address: PciAddress, offset: u16) -> u32 {
        self.offset(address, offset & !3)
            .map_or(u32::MAX, |at| self.region.read32(at))
    }

    fn write32(&self, address: PciAddress, offset: u16, value: u32) {
        if let Some(at) = self.offset(address, offset & !3) {
            self.region.write32(at, value);
        }
    }

    fn write16(&self, address: PciAddress, offset: u16, value: u16) {
        if let Some(at) = self.offset(address, offset & !1) {
            self.region.write16(at, value);
        }
    }

    fn write8(&self, address: PciAddress, offset: u16, value: u8) {
        if let Some(at) = self.offset(address, offset) {
            self.region.write8(at, value);
        }
    }

    fn read16(&self, address: PciAddress, offset: u16) -> u16 {
        self.offset(address, offset & !1)
            .map_or(u16::MAX, |at| self.region.read16(at))
    }

    fn read8(&self, address: PciAddress, offset: u16) -> u8 {
        self.offset(address, offset)
            .map_or(u8::MAX, |at| self.region.read8(at))
    }
}
