//! Heap-backed DMA memory for host tests (device address == CPU address) and the fake device's
//! checked access to it. The fake device only touches addresses inside live allocations.
#![allow(unsafe_code)]

use core::ptr::NonNull;
use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use net_device::{DmaAllocator, DmaRegion, PhysAddr};

/// Every allocation is page-aligned (the largest alignment `DmaAllocator` callers may ask for).
const REGION_ALIGN: usize = 4096;

struct LiveRegion {
    len: usize,
    owner: u64,
}

/// All live fake DMA allocations of the process, by start address. Allocation, release and
/// device accesses all hold this lock, so the fake device never touches freed memory.
static LIVE_REGIONS: Mutex<BTreeMap<usize, LiveRegion>> = Mutex::new(BTreeMap::new());
static NEXT_ALLOCATOR_ID: AtomicU64 = AtomicU64::new(1);

fn live_regions() -> MutexGuard<'static, BTreeMap<usize, LiveRegion>> {
    LIVE_REGIONS.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A [`DmaAllocator`] handing out zeroed heap memory whose device address equals its CPU
/// address, so the fake device can follow the driver's rings.
#[derive(Clone, Debug)]
pub struct FakeDmaAllocator {
    id: u64,
    allocations_left: Arc<AtomicUsize>,
}

impl Default for FakeDmaAllocator {
    fn default() -> Self {
        Self::with_allocation_limit(usize::MAX)
    }
}

impl FakeDmaAllocator {
    /// An allocator without limit.
    pub fn new() -> Self {
        Self::default()
    }

    /// An allocator that fails every allocation after the first `limit` (clones share it).
    pub fn with_allocation_limit(limit: usize) -> Self {
        FakeDmaAllocator {
            id: NEXT_ALLOCATOR_ID.fetch_add(1, Ordering::Relaxed),
            allocations_left: Arc::new(AtomicUsize::new(limit)),
        }
    }

    /// Regions from this allocator (and its clones) that are still allocated.
    pub fn live_regions(&self) -> usize {
        live_regions()
            .values()
            .filter(|region| region.owner == self.id)
            .count()
    }
}

impl DmaAllocator for FakeDmaAllocator {
    fn allocate(&self, len: usize, align: usize) -> Option<DmaRegion> {
        if !align.is_power_of_two() || align > REGION_ALIGN {
            return None;
        }
        self.allocations_left
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |left| {
                left.checked_sub(1)
            })
            .ok()?;
        let layout = Layout::from_size_align(len.max(1), REGION_ALIGN).ok()?;
        let mut live = live_regions();
        // SAFETY: the layout has a non-zero size.
        let pointer = NonNull::new(unsafe { alloc_zeroed(layout) })?;
        live.insert(
            pointer.as_ptr() as usize,
            LiveRegion {
                len: layout.size(),
                owner: self.id,
            },
        );
        // SAFETY: `pointer` is a fresh, zeroed allocation of at least `len` bytes, owned only by
        // the returned region; `release_region` frees it with the same layout when the region
        // drops; in this fake the device address is the CPU address.
        Some(unsafe {
            DmaRegion::from_raw(
                pointer,
                PhysAddr(pointer.as_ptr() as u64),
                len,
                Some(release_region),
            )
        })
    }
}

fn release_region(pointer: NonNull<u8>, _phys: PhysAddr, len: usize) {
    let mut live = live_regions();
    live.remove(&(pointer.as_ptr() as usize));
    if let Ok(layout) = Layout::from_size_align(len.max(1), REGION_ALIGN) {
        // SAFETY: `pointer` came from `alloc_zeroed` with exactly this layout in `allocate`, and
        // a region releases its memory once (on drop).
        unsafe { dealloc(pointer.as_ptr(), layout) };
    }
}

/// True when `[address, address + len)` lies inside one live allocation.
fn is_live(live: &BTreeMap<usize, LiveRegion>, address: u64, len: usize) -> bool {
    let Ok(start) = usize::try_from(address) else {
        return false;
    };
    let Some(end) = start.checked_add(len) else {
        return false;
    };
    live.range(..=start)
        .next_back()
        .is_some_and(|(base, region)| end <= base + region.len)
}

/// Copies device memory at `address` into `out` (a DMA read). `false` if not all of it is live.
pub(crate) fn read_memory(address: u64, out: &mut [u8]) -> bool {
    let live = live_regions();
    if !is_live(&live, address, out.len()) {
        return false;
    }
    // SAFETY: the range lies inside a live allocation, checked under the lock that release
    // also takes; tests run the driver and its fake device on one thread, so no CPU reference
    // to these bytes is active during the copy.
    unsafe {
        core::ptr::copy_nonoverlapping(address as usize as *const u8, out.as_mut_ptr(), out.len())
    };
    true
}

/// Copies `data` into device memory at `address` (a DMA write). `false` if not all of it is
/// live.
pub(crate) fn write_memory(address: u64, data: &[u8]) -> bool {
    let live = live_regions();
    if !is_live(&live, address, data.len()) {
        return false;
    }
    // SAFETY: as in read_memory.
    unsafe {
        core::ptr::copy_nonoverlapping(data.as_ptr(), address as usize as *mut u8, data.len())
    };
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracks_live_regions_and_refuses_foreign_addresses() {
        let allocator = FakeDmaAllocator::new();
        let region = allocator.allocate(100, 64).unwrap();
        assert_eq!(region.phys().0, region.as_ptr() as u64);
        assert_eq!(allocator.live_regions(), 1);
        let base = region.phys().0;
        assert!(write_memory(base + 96, &[1, 2, 3, 4]));
        let mut back = [0u8; 4];
        assert!(read_memory(base + 96, &mut back));
        assert_eq!(back, [1, 2, 3, 4]);
        assert!(
            !read_memory(base + 4095, &mut back),
            "beyond the allocation"
        );
        assert!(!write_memory(16, &[0]), "not an allocation");
        drop(region);
        assert_eq!(allocator.live_regions(), 0);
        assert!(!read_memory(base, &mut back), "freed memory");
    }

    #[test]
    fn allocation_limit_applies() {
        let allocator = FakeDmaAllocator::with_allocation_limit(1);
        let first = allocator.allocate(8, 8);
        assert!(first.is_some());
        assert!(allocator.allocate(8, 8).is_none());
        let unlimited = FakeDmaAllocator::new();
        assert!(
            unlimited.allocate(8, 8192).is_none(),
            "alignment above a page"
        );
        assert!(
            unlimited.allocate(8, 24).is_none(),
            "alignment not a power of two"
        );
    }
}
