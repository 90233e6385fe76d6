//! Heap-backed DMA memory for host tests: device address == CPU address, and a registry of live
//! allocations so the fake device model checks every DMA access instead of touching freed or
//! foreign memory.
//!
//! The registry is per thread (host tests run each test on its own thread and drop their
//! regions there); a region released on another thread is leaked, never freed twice.
#![allow(unsafe_code)]

use alloc::alloc::{Layout, alloc_zeroed, dealloc};
use alloc::collections::BTreeMap;
use core::cell::{Cell, RefCell};
use core::ptr::NonNull;
use net_device::{DmaAllocator, DmaRegion, PhysAddr};

std::thread_local! {
    /// Live allocations of this thread: start address → layout.
    static LIVE: RefCell<BTreeMap<u64, Layout>> = const { RefCell::new(BTreeMap::new()) };
}

fn release(virt: NonNull<u8>, phys: PhysAddr, _len: usize) {
    let layout = LIVE.with(|live| live.borrow_mut().remove(&phys.0));
    if let Some(layout) = layout {
        // SAFETY: `virt` came from `alloc_zeroed(layout)` in `allocate` (the registry entry under
        // its address holds that layout) and the entry was just removed, so it is freed once.
        unsafe { dealloc(virt.as_ptr(), layout) };
    }
}

/// A [`DmaAllocator`] over the host heap. `fail_after` makes allocations fail after that many
/// successes, to test out-of-memory paths.
#[derive(Default)]
pub struct FakeDmaAllocator {
    /// Successful allocations left before failures start; `None` = never fail.
    pub fail_after: Cell<Option<usize>>,
}

impl FakeDmaAllocator {
    /// An allocator that never fails.
    pub fn new() -> Self {
        FakeDmaAllocator::default()
    }
}

impl DmaAllocator for FakeDmaAllocator {
    fn allocate(&self, len: usize, align: usize) -> Option<DmaRegion> {
        if let Some(left) = self.fail_after.get() {
            if left == 0 {
                return None;
            }
            self.fail_after.set(Some(left - 1));
        }
        let layout = Layout::from_size_align(len.max(1), align.max(1)).ok()?;
        // SAFETY: the layout has a non-zero size (max(1) above).
        let virt = NonNull::new(unsafe { alloc_zeroed(layout) })?;
        let phys = PhysAddr(virt.as_ptr() as u64);
        LIVE.with(|live| live.borrow_mut().insert(phys.0, layout));
        // SAFETY: `virt` points to `len` zeroed bytes owned by nothing else; `release` frees
        // them exactly once (registry entry removed first); the device model reaches them at
        // `phys`, which equals the CPU address.
        Some(unsafe { DmaRegion::from_raw(virt, phys, len, Some(release)) })
    }
}

/// True when `[address, address + len)` lies inside one live allocation of this thread.
fn is_live(address: u64, len: usize) -> bool {
    let Some(end) = address.checked_add(len as u64) else {
        return false;
    };
    LIVE.with(|live| {
        live.borrow()
            .range(..=address)
            .next_back()
            .is_some_and(|(start, layout)| end <= start + layout.size() as u64)
    })
}

/// Device-side read of `buffer.len()` bytes at `address`; false (nothing read) when the range
/// is not live DMA memory.
pub fn dma_read(address: u64, buffer: &mut [u8]) -> bool {
    if !is_live(address, buffer.len()) {
        return false;
    }
    // SAFETY: the range lies inside a live allocation (checked above) that this thread owns;
    // tests are single-threaded, so nothing writes it concurrently.
    unsafe {
        core::ptr::copy_nonoverlapping(address as *const u8, buffer.as_mut_ptr(), buffer.len())
    };
    true
}

/// Device-side write of `data` at `address`; false (nothing written) when the range is not
/// live DMA memory.
pub fn dma_write(address: u64, data: &[u8]) -> bool {
    if !is_live(address, data.len()) {
        return false;
    }
    // SAFETY: as in `dma_read`; the driver only reads this memory between device accesses.
    unsafe { core::ptr::copy_nonoverlapping(data.as_ptr(), address as *mut u8, data.len()) };
    true
}

/// Number of live allocations on this thread (leak checks in tests).
pub fn live_allocations() -> usize {
    LIVE.with(|live| live.borrow().len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_accesses_are_confined_to_live_allocations() {
        let allocator = FakeDmaAllocator::new();
        let before = live_allocations();
        let mut region = allocator.allocate(64, 64).expect("heap memory");
        region.as_mut_slice()[3] = 7;
        let address = region.phys().0;
        let mut byte = [0u8; 1];
        assert!(dma_read(address + 3, &mut byte));
        assert_eq!(byte[0], 7);
        assert!(dma_write(address + 60, &[1, 2, 3, 4]));
        assert!(
            !dma_write(address + 61, &[1, 2, 3, 4]),
            "one byte past the end"
        );
        drop(region);
        assert_eq!(live_allocations(), before);
        assert!(
            !dma_read(address, &mut byte),
            "freed memory is not DMA memory any more"
        );
    }

    #[test]
    fn allocation_failure_can_be_scripted() {
        let allocator = FakeDmaAllocator::new();
        allocator.fail_after.set(Some(1));
        assert!(allocator.allocate(16, 16).is_some());
        assert!(allocator.allocate(16, 16).is_none());
    }
}
