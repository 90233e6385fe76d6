//! Access to DMA memory shared with the device: volatile ring fields and ownership-checked
//! packet buffer slots. The only `unsafe` code of the driver proper.
#![allow(unsafe_code)]

use alloc::vec;
use alloc::vec::Vec;
use core::ptr::NonNull;

use net_device::{DmaRegion, PhysAddr};

/// Returns a pointer to `size` bytes at `offset` when they lie inside `region` and are
/// naturally aligned for a `size`-byte access.
fn field_pointer(region: &DmaRegion, offset: usize, size: usize) -> Option<*mut u8> {
    let end = offset.checked_add(size)?;
    if end > region.len() {
        return None;
    }
    // SAFETY: `offset + size <= len`, so the pointer stays inside the region's allocation.
    let pointer = unsafe { region.as_ptr().add(offset) };
    if !(pointer as usize).is_multiple_of(size) {
        return None;
    }
    Some(pointer)
}

/// Volatile read of a little-endian u16 the device may write concurrently.
pub(crate) fn read_u16(region: &DmaRegion, offset: usize) -> Option<u16> {
    let pointer = field_pointer(region, offset, 2)?;
    // SAFETY: in bounds and aligned (checked by field_pointer); the region is valid memory for
    // its lifetime (DmaRegion::from_raw contract); volatile because the device writes it.
    Some(u16::from_le(unsafe {
        core::ptr::read_volatile(pointer.cast::<u16>())
    }))
}

/// Volatile read of a little-endian u32 the device may write concurrently.
pub(crate) fn read_u32(region: &DmaRegion, offset: usize) -> Option<u32> {
    let pointer = field_pointer(region, offset, 4)?;
    // SAFETY: as in read_u16.
    Some(u32::from_le(unsafe {
        core::ptr::read_volatile(pointer.cast::<u32>())
    }))
}

/// Volatile write of a little-endian u16 the device reads. Returns `false` when out of bounds.
pub(crate) fn write_u16(region: &mut DmaRegion, offset: usize, value: u16) -> bool {
    let Some(pointer) = field_pointer(region, offset, 2) else {
        return false;
    };
    // SAFETY: in bounds and aligned; `&mut` makes this the only CPU-side access.
    unsafe { core::ptr::write_volatile(pointer.cast::<u16>(), value.to_le()) };
    true
}

/// An empty region, put in place of memory that must be leaked because the device may still
/// write it (its reset did not complete).
pub(crate) fn empty_region() -> DmaRegion {
    // SAFETY: a zero-length region never dereferences its pointer, so a dangling, well-aligned
    // pointer is valid for all of zero bytes; no release function runs on drop.
    unsafe { DmaRegion::from_raw(NonNull::dangling(), PhysAddr(0), 0, None) }
}

/// Who may touch a buffer slot right now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SlotOwner {
    Driver,
    Device,
}

/// One DMA region carved into equal buffer slots, with per-slot ownership.
///
/// The CPU only gets slices of slots the driver owns; slots handed to the device (posted in a
/// ring) cannot be borrowed until they are taken back. This is what makes the slicing sound
/// while the device writes other slots of the same region.
pub(crate) struct SlotPool {
    region: DmaRegion,
    slot_size: usize,
    owners: Vec<SlotOwner>,
    device_owned: usize,
}

impl SlotPool {
    /// Carves `region` into `slot_count` slots of `slot_size` bytes; `None` if it is too small.
    pub(crate) fn new(region: DmaRegion, slot_size: usize, slot_count: usize) -> Option<Self> {
        if slot_size == 0 || slot_size.checked_mul(slot_count)? > region.len() {
            return None;
        }
        Some(SlotPool {
            region,
            slot_size,
            owners: vec![SlotOwner::Driver; slot_count],
            device_owned: 0,
        })
    }

    /// Bytes per slot.
    pub(crate) fn slot_size(&self) -> usize {
        self.slot_size
    }

    /// Number of slots.
    pub(crate) fn slot_count(&self) -> usize {
        self.owners.len()
    }

    /// How many slots the device currently owns.
    pub(crate) fn device_owned_count(&self) -> usize {
        self.device_owned
    }

    /// Device-visible address of a slot.
    pub(crate) fn slot_phys(&self, slot: usize) -> Option<PhysAddr> {
        if slot >= self.owners.len() {
            return None;
        }
        Some(PhysAddr(
            self.region.phys().0 + (slot * self.slot_size) as u64,
        ))
    }

    /// True when `slot` exists and is posted to the device.
    pub(crate) fn is_device_owned(&self, slot: usize) -> bool {
        self.owners.get(slot) == Some(&SlotOwner::Device)
    }

    fn span_has_owner(&self, first: usize, count: usize, owner: SlotOwner) -> bool {
        first
            .checked_add(count)
            .and_then(|end| self.owners.get(first..end))
            .is_some_and(|span| span.iter().all(|current| *current == owner))
    }

    fn set_owner(&mut self, first: usize, count: usize, owner: SlotOwner) {
        for current in &mut self.owners[first..first + count] {
            *current = owner;
        }
    }

    /// Hands `count` slots from `first` to the device. Returns `false` (and changes nothing)
    /// unless all of them exist and are driver-owned.
    pub(crate) fn give_to_device(&mut self, first: usize, count: usize) -> bool {
        if !self.span_has_owner(first, count, SlotOwner::Driver) {
            return false;
        }
        self.set_owner(first, count, SlotOwner::Device);
        self.device_owned += count;
        true
    }

    /// Takes `count` slots from `first` back from the device. Returns `false` (and changes
    /// nothing) unless all of them exist and are device-owned.
    pub(crate) fn take_from_device(&mut self, first: usize, count: usize) -> bool {
        if !self.span_has_owner(first, count, SlotOwner::Device) {
            return false;
        }
        self.set_owner(first, count, SlotOwner::Driver);
        self.device_owned -= count;
        true
    }

    /// Takes every slot back; only valid once the device has been reset (no DMA in flight).
    pub(crate) fn reclaim_all(&mut self) {
        self.owners.fill(SlotOwner::Driver);
        self.device_owned = 0;
    }

    /// The bytes of `count` driver-owned slots from `first`; `None` if any is device-owned.
    pub(crate) fn span(&self, first: usize, count: usize) -> Option<&[u8]> {
        if !self.span_has_owner(first, count, SlotOwner::Driver) {
            return None;
        }
        // SAFETY: the slots exist, so the range lies inside the region (checked in new()); they
        // are driver-owned, so the device is not writing them; the shared borrow of `self`
        // prevents a mutable CPU borrow of the same slots.
        Some(unsafe {
            core::slice::from_raw_parts(
                self.region.as_ptr().add(first * self.slot_size),
                count * self.slot_size,
            )
        })
    }

    /// Mutable bytes of `count` driver-owned slots from `first`; `None` if any is device-owned.
    pub(crate) fn span_mut(&mut self, first: usize, count: usize) -> Option<&mut [u8]> {
        if !self.span_has_owner(first, count, SlotOwner::Driver) {
            return None;
        }
        // SAFETY: as in span(); `&mut self` makes the CPU-side borrow exclusive.
        Some(unsafe {
            core::slice::from_raw_parts_mut(
                self.region.as_ptr().add(first * self.slot_size),
                count * self.slot_size,
            )
        })
    }

    /// Gives the region back (to carve it differently).
    pub(crate) fn into_region(self) -> DmaRegion {
        self.region
    }

    /// Forgets the memory instead of freeing it, for when the device may still write it.
    pub(crate) fn leak(&mut self) {
        core::mem::forget(core::mem::replace(&mut self.region, empty_region()));
        self.owners.clear();
        self.device_owned = 0;
    }
}

/// Copies `destination.len()` bytes from `offset` of `region` into `destination`: the one read
/// of memory the device (or a VMBus host) may write, so the caller parses a private copy that
/// cannot change under it. Returns `false` (copying nothing) when the range leaves the region.
pub(crate) fn copy_from_region(region: &DmaRegion, offset: usize, destination: &mut [u8]) -> bool {
    if offset
        .checked_add(destination.len())
        .is_none_or(|end| end > region.len())
    {
        return false;
    }
    // SAFETY: the range lies inside the region (checked above), which is valid memory for its
    // lifetime (DmaRegion::from_raw contract); `destination` is a distinct Rust allocation, so
    // the two do not overlap.
    unsafe {
        core::ptr::copy_nonoverlapping(
            region.as_ptr().add(offset),
            destination.as_mut_ptr(),
            destination.len(),
        );
    }
    true
}
