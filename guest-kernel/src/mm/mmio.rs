//! Uncached MMIO windows with bounds-checked volatile access: the only way to touch device
//! registers.

use net_device::RegisterIo;

use super::paging::{self, Cacheability};
use crate::error::KernelError;

/// A mapped device register window.
#[derive(Clone, Debug)]
pub struct MmioRegion {
    base: u64,
    len: usize,
}

impl MmioRegion {
    /// Maps `len` bytes of device memory at physical `phys` (identity, uncached).
    pub fn map(phys: u64, len: usize) -> Result<MmioRegion, KernelError> {
        paging::map(phys, len as u64, Cacheability::Uncached)?;
        Ok(MmioRegion { base: phys, len })
    }

    /// Physical (= virtual) address of the window.
    pub fn phys(&self) -> u64 {
        self.base
    }

    /// A sub-window `[offset, offset + len)`, or `None` if it does not fit.
    pub fn subregion(&self, offset: usize, len: usize) -> Option<MmioRegion> {
        let end = offset.checked_add(len)?;
        (end <= self.len).then(|| MmioRegion {
            base: self.base + offset as u64,
            len,
        })
    }

    fn in_bounds(&self, offset: usize, width: usize) -> bool {
        offset.is_multiple_of(width) && offset.checked_add(width).is_some_and(|end| end <= self.len)
    }
}

impl RegisterIo for MmioRegion {
    fn read32(&self, offset: usize) -> u32 {
        if !self.in_bounds(offset, 4) {
            return u32::MAX;
        }
        // SAFETY: in bounds of a window mapped uncached by `map`; aligned.
        unsafe { core::ptr::read_volatile((self.base as usize + offset) as *const u32) }
    }

    fn write32(&self, offset: usize, value: u32) {
        if self.in_bounds(offset, 4) {
            // SAFETY: as for read32.
            unsafe { core::ptr::write_volatile((self.base as usize + offset) as *mut u32, value) }
        }
    }

    fn write64(&self, offset: usize, value: u64) {
        if self.in_bounds(offset, 8) {
            // SAFETY: as for read32; one 8-byte access (MANA doorbells need it whole).
            unsafe { core::ptr::write_volatile((self.base as usize + offset) as *mut u64, value) }
        }
    }

    fn read16(&self, offset: usize) -> u16 {
        if !self.in_bounds(offset, 2) {
            return u16::MAX;
        }
        // SAFETY: as for read32.
        unsafe { core::ptr::read_volatile((self.base as usize + offset) as *const u16) }
    }

    fn write16(&self, offset: usize, value: u16) {
        if self.in_bounds(offset, 2) {
            // SAFETY: as for read32.
            unsafe { core::ptr::write_volatile((self.base as usize + offset) as *mut u16, value) }
        }
    }

    fn read8(&self, offset: usize) -> u8 {
        if !self.in_bounds(offset, 1) {
            return u8::MAX;
        }
        // SAFETY: as for read32.
        unsafe { core::ptr::read_volatile((self.base as usize + offset) as *const u8) }
    }

    fn write8(&self, offset: usize, value: u8) {
        if self.in_bounds(offset, 1) {
            // SAFETY: as for read32.
            unsafe { core::ptr::write_volatile((self.base as usize + offset) as *mut u8, value) }
        }
    }

    fn len(&self) -> usize {
        self.len
    }
}
