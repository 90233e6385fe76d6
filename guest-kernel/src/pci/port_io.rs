//! Legacy configuration mechanism #1 (PCI Local Bus 3.0 §3.2.2.3.2): an address dword written
//! to port 0xCF8 selects a function's register, port 0xCFC..0xCFF carries the data. Reaches
//! only the first 256 bytes of each function (no PCIe extended capabilities).

use super::address::PciAddress;
use super::config::{ConfigAccess, LEGACY_CONFIG_SIZE};
use crate::arch::port::{inl, outb, outl, outw};

/// CONFIG_ADDRESS port.
const CONFIG_ADDRESS: u16 = 0xcf8;
/// CONFIG_DATA port.
const CONFIG_DATA: u16 = 0xcfc;
/// CONFIG_ADDRESS bit 31: enable the configuration cycle.
const CONFIG_ENABLE: u32 = 1 << 31;

/// Port-I/O config access.
///
/// The address/data pair is not atomic: the kernel runs on one CPU and config space is only
/// touched from the main loop (the hot-plug interrupt handler just sets a flag), so two
/// accesses never interleave.
#[derive(Clone, Copy, Debug, Default)]
pub struct PortIo;

impl PortIo {
    /// The port-I/O access method.
    pub const fn new() -> Self {
        PortIo
    }

    fn select(address: PciAddress, offset: u16) {
        let word = CONFIG_ENABLE
            | (u32::from(address.bus()) << 16)
            | (u32::from(address.devfn()) << 8)
            | u32::from(offset & 0xfc);
        // SAFETY: 0xCF8 is the host bridge's CONFIG_ADDRESS register on every x86 PC; writing
        // it selects a config register and has no effect on memory.
        unsafe { outl(CONFIG_ADDRESS, word) };
    }
}

impl ConfigAccess for PortIo {
    fn read32(&self, address: PciAddress, offset: u16) -> u32 {
        if offset >= LEGACY_CONFIG_SIZE {
            return u32::MAX;
        }
        PortIo::select(address, offset);
        // SAFETY: reads the config dword selected above; config reads have no side effects
        // on memory.
        unsafe { inl(CONFIG_DATA) }
    }

    fn write32(&self, address: PciAddress, offset: u16, value: u32) {
        if offset >= LEGACY_CONFIG_SIZE {
            return;
        }
        PortIo::select(address, offset);
        // SAFETY: writes the config dword selected above; PCI code decides what it means.
        unsafe { outl(CONFIG_DATA, value) };
    }

    fn write16(&self, address: PciAddress, offset: u16, value: u16) {
        if offset >= LEGACY_CONFIG_SIZE {
            return;
        }
        PortIo::select(address, offset);
        // SAFETY: a 16-bit write to CONFIG_DATA + (offset & 2) writes just that register.
        unsafe { outw(CONFIG_DATA + (offset & 2), value) };
    }

    fn write8(&self, address: PciAddress, offset: u16, value: u8) {
        if offset >= LEGACY_CONFIG_SIZE {
            return;
        }
        PortIo::select(address, offset);
        // SAFETY: an 8-bit write to CONFIG_DATA + (offset & 3) writes just that byte.
        unsafe { outb(CONFIG_DATA + (offset & 3), value) };
    }
}
