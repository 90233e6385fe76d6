//! x86 port I/O, as thin names over the `x86_64` crate's port traits.
//!
//! The crate's `in`/`out` are `nomem`: sound here, because no port we drive (UART, PIC, PIT,
//! ACPI PM1, CF8/CFC config space, debug exit) starts a DMA that would read memory written
//! just before; doorbells that do are MMIO, written volatile.

use x86_64::instructions::port::{PortRead, PortWrite};

/// Reads a byte from an I/O port.
///
/// # Safety
/// Port reads can have side effects on devices; the caller must own the device at `port`.
pub unsafe fn inb(port: u16) -> u8 {
    // SAFETY: the caller guarantees the port access is valid.
    unsafe { u8::read_from_port(port) }
}

/// Writes a byte to an I/O port.
///
/// # Safety
/// Port writes change device state; the caller must own the device at `port`.
pub unsafe fn outb(port: u16, value: u8) {
    // SAFETY: the caller guarantees the port access is valid.
    unsafe { u8::write_to_port(port, value) }
}

/// Reads a 16-bit word from an I/O port.
///
/// # Safety
/// As for [`inb`].
pub unsafe fn inw(port: u16) -> u16 {
    // SAFETY: as for inb.
    unsafe { u16::read_from_port(port) }
}

/// Writes a 16-bit word to an I/O port.
///
/// # Safety
/// As for [`outb`].
pub unsafe fn outw(port: u16, value: u16) {
    // SAFETY: as for outb.
    unsafe { u16::write_to_port(port, value) }
}

/// Reads a 32-bit word from an I/O port.
///
/// # Safety
/// As for [`inb`].
pub unsafe fn inl(port: u16) -> u32 {
    // SAFETY: as for inb.
    unsafe { u32::read_from_port(port) }
}

/// Writes a 32-bit word to an I/O port.
///
/// # Safety
/// As for [`outb`].
pub unsafe fn outl(port: u16, value: u32) {
    // SAFETY: as for outb.
    unsafe { u32::write_to_port(port, value) }
}
