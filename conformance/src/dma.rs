//! A `DmaAllocator` over OpenVMM's `GuestMemory`: CPU pointer = base + offset, device address =
//! offset.

use std::ptr::NonNull;
use std::sync::Arc;
use std::sync::Mutex;

use guestmem::GuestMemory;
use net_device::{DmaAllocator, DmaRegion, PhysAddr};

/// Page size of the guest (VMBus and GDMA both count in 4 KiB pages).
pub const PAGE_SIZE: usize = 4096;

/// Hands out page-aligned pieces of one `GuestMemory`, first fit over a free list, so that a test
/// that tears a device down and brings it up again does not run out of memory.
#[derive(Clone)]
pub struct GuestDma {
    memory: GuestMemory,
    base: NonNull<u8>,
    size: usize,
    free: FreeList,
}

// SAFETY: the pointer is the base of the `GuestMemory` mapping, which lives as long as any clone
// of `memory` here; all access to it goes through `DmaRegion`s handed out one owner each.
unsafe impl Send for GuestDma {}
// SAFETY: as above; the free list is behind a mutex.
unsafe impl Sync for GuestDma {}

/// Free (offset, length) ranges of one allocator, sorted by offset.
type FreeList = Arc<Mutex<Vec<(usize, usize)>>>;

/// Regions returned by their `Drop` go back to the allocator they came from. `DmaRegion` only
/// keeps a plain `fn`, so the free lists are found by the address they cover: (base, size, list).
static ALLOCATORS: Mutex<Vec<(usize, usize, FreeList)>> = Mutex::new(Vec::new());

fn release(virt: NonNull<u8>, _phys: PhysAddr, len: usize) {
    let address = virt.as_ptr() as usize;
    let allocators = ALLOCATORS.lock().unwrap();
    // Newest first: a dropped allocator's entry stays behind, and its address range may be
    // handed out again to a newer `GuestMemory`, whose entry must win.
    if let Some((base, _, free)) = allocators
        .iter()
        .rev()
        .find(|(base, size, _)| address >= *base && address < base + size)
    {
        let offset = address - base;
        let len = len.next_multiple_of(PAGE_SIZE);
        // SAFETY: the region is being dropped: nobody else refers to these bytes any more, and
        // the next owner expects them zeroed (DmaAllocator's contract).
        unsafe { std::ptr::write_bytes(virt.as_ptr(), 0, len) };
        let mut free = free.lock().unwrap();
        free.push((offset, len));
        free.sort_unstable();
        // Coalesce neighbours so large requests still fit after many small ones came back.
        let mut merged: Vec<(usize, usize)> = Vec::with_capacity(free.len());
        for &(start, length) in free.iter() {
            match merged.last_mut() {
                Some((last_start, last_length)) if *last_start + *last_length == start => {
                    *last_length += length
                }
                _ => merged.push((start, length)),
            }
        }
        *free = merged;
    }
}

impl GuestDma {
    /// Allocates `size` bytes of guest memory (rounded up to a page) and manages all of it except
    /// the first `reserved` bytes, which stay free for the test's own use (e.g. fixed addresses).
    pub fn new(size: usize, reserved: usize) -> Self {
        let size = size.next_multiple_of(PAGE_SIZE);
        let reserved = reserved.next_multiple_of(PAGE_SIZE);
        assert!(reserved < size, "reserved area larger than the memory");
        let memory = GuestMemory::allocate(size);
        let (pointer, mapped) = memory
            .full_mapping()
            .expect("allocated guest memory has a full mapping");
        assert!(mapped >= size);
        let base = NonNull::new(pointer).expect("guest memory mapping is not null");
        let free = Arc::new(Mutex::new(vec![(reserved, size - reserved)]));
        ALLOCATORS
            .lock()
            .unwrap()
            .push((base.as_ptr() as usize, size, free.clone()));
        GuestDma {
            memory,
            base,
            size,
            free,
        }
    }

    /// The guest memory the host-side devices are given.
    pub fn memory(&self) -> &GuestMemory {
        &self.memory
    }

    /// Bytes managed by this allocator that are currently free.
    pub fn free_bytes(&self) -> usize {
        self.free.lock().unwrap().iter().map(|(_, len)| len).sum()
    }

    /// Total size of the guest memory.
    pub fn size(&self) -> usize {
        self.size
    }
}

impl DmaAllocator for GuestDma {
    fn allocate(&self, len: usize, align: usize) -> Option<DmaRegion> {
        if len == 0 || align == 0 || !align.is_power_of_two() || align > PAGE_SIZE {
            return None;
        }
        let rounded = len.next_multiple_of(PAGE_SIZE);
        let mut free = self.free.lock().unwrap();
        let index = free.iter().position(|&(_, length)| length >= rounded)?;
        let (offset, length) = free[index];
        if length == rounded {
            free.remove(index);
        } else {
            free[index] = (offset + rounded, length - rounded);
        }
        drop(free);
        // SAFETY: offset + rounded lies inside the mapping (taken from the free list, which only
        // ever covers [reserved, size)).
        let virt = unsafe { NonNull::new_unchecked(self.base.as_ptr().add(offset)) };
        // SAFETY: these bytes belong to this region alone until `release` returns them; they are
        // zero (fresh allocation or zeroed by `release`); the host side reaches them at `offset`,
        // which is the guest physical address in `GuestMemory`'s terms.
        Some(unsafe { DmaRegion::from_raw(virt, PhysAddr(offset as u64), len, Some(release)) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_are_visible_to_the_host_at_their_physical_address() {
        let dma = GuestDma::new(1 << 20, PAGE_SIZE);
        let mut region = dma.allocate(100, 8).unwrap();
        region.as_mut_slice()[..4].copy_from_slice(&[1, 2, 3, 4]);
        let mut seen = [0u8; 4];
        dma.memory().read_at(region.phys().0, &mut seen).unwrap();
        assert_eq!(seen, [1, 2, 3, 4]);
        assert!(region.phys().0 >= PAGE_SIZE as u64);
    }

    #[test]
    fn freed_regions_are_reused_and_zeroed() {
        let dma = GuestDma::new(64 * 1024, 0);
        let before = dma.free_bytes();
        let mut region = dma.allocate(32 * 1024, 4096).unwrap();
        region.as_mut_slice().fill(0xaa);
        assert!(dma.allocate(64 * 1024, 4096).is_none());
        drop(region);
        assert_eq!(dma.free_bytes(), before);
        let again = dma.allocate(64 * 1024, 4096).unwrap();
        assert!(again.as_slice().iter().all(|&byte| byte == 0));
    }
}
