//! Heap-backed DMA memory for host tests, with checked device-side access by physical address.
//!
//! no_std (alloc + a spin lock), so enabling the feature never links std into the kernel when
//! cargo unifies features across a workspace build.
//!
//! Device address == CPU address and every allocation is page-aligned, so a fake device or a
//! fake hypervisor host can follow page numbers (GPADLs, PFN lists) the driver hands it, just as
//! a real host reads guest memory by GPA. Every device-side access is checked against the
//! registry of live allocations under one lock, so a driver bug or a test sending a bad address
//! is a `false`/`None`, never a wild access.
use alloc::alloc::{Layout, alloc_zeroed, dealloc};
use alloc::collections::BTreeMap;
use alloc::sync::Arc;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use spin::{Mutex, MutexGuard};

use crate::{DmaAllocator, DmaRegion, PhysAddr};

/// Every allocation is page-aligned: the largest alignment `DmaAllocator` callers may ask for.
const REGION_ALIGN: usize = 4096;

/// Live allocations of the process: start address → layout size.
static LIVE: Mutex<BTreeMap<usize, usize>> = Mutex::new(BTreeMap::new());

fn live() -> MutexGuard<'static, BTreeMap<usize, usize>> {
    LIVE.lock()
}

fn release(virt: NonNull<u8>, _phys: PhysAddr, _len: usize) {
    let mut live = live();
    if let Some(size) = live.remove(&(virt.as_ptr() as usize)) {
        let layout =
            Layout::from_size_align(size, REGION_ALIGN).expect("layout was valid at alloc");
        // SAFETY: `virt` came from `alloc_zeroed(layout)` (the registry entry under its address
        // holds that size) and the entry was just removed under the lock, so it is freed once
        // and no device-side access can be in flight.
        unsafe { dealloc(virt.as_ptr(), layout) };
    }
}

/// A [`DmaAllocator`] handing out zeroed, page-aligned heap memory whose device address is its
/// CPU address. Clones share the allocation limit.
#[derive(Clone, Debug)]
pub struct HeapDmaAllocator {
    allocations_left: Arc<AtomicUsize>,
}

impl Default for HeapDmaAllocator {
    fn default() -> Self {
        Self::with_allocation_limit(usize::MAX)
    }
}

impl HeapDmaAllocator {
    /// An allocator without limit.
    pub fn new() -> Self {
        Self::default()
    }

    /// An allocator that fails every allocation after the first `limit` (out-of-memory tests).
    pub fn with_allocation_limit(limit: usize) -> Self {
        HeapDmaAllocator {
            allocations_left: Arc::new(AtomicUsize::new(limit)),
        }
    }
}

impl DmaAllocator for HeapDmaAllocator {
    fn allocate(&self, len: usize, align: usize) -> Option<DmaRegion> {
        if !align.is_power_of_two() || align > REGION_ALIGN {
            return None;
        }
        self.allocations_left
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |left| {
                left.checked_sub(1)
            })
            .ok()?;
        let size = len.max(1).checked_next_multiple_of(REGION_ALIGN)?;
        let layout = Layout::from_size_align(size, REGION_ALIGN).ok()?;
        let mut live = live();
        // SAFETY: the layout has a non-zero size.
        let pointer = NonNull::new(unsafe { alloc_zeroed(layout) })?;
        // Exposed so device-side accesses by physical address may rebuild a pointer from it.
        live.insert(pointer.as_ptr().expose_provenance(), size);
        // SAFETY: a fresh zeroed allocation of at least `len` bytes owned only by the returned
        // region; `release` frees it once with the same layout; device address == CPU address.
        Some(unsafe {
            DmaRegion::from_raw(
                pointer,
                PhysAddr(pointer.as_ptr() as u64),
                len,
                Some(release),
            )
        })
    }
}

/// Runs `access` on the address of `[address, address + len)` while the lock guarantees the
/// range stays inside one live allocation; `None` when it is not.
fn with_live_range<T>(address: u64, len: usize, access: impl FnOnce(*mut u8) -> T) -> Option<T> {
    let start = usize::try_from(address).ok()?;
    let end = start.checked_add(len)?;
    let live = live();
    let (&base, &size) = live.range(..=start).next_back()?;
    if end > base + size {
        return None;
    }
    Some(access(core::ptr::with_exposed_provenance_mut(start)))
}

/// Device-side read of `buffer.len()` bytes at physical `address`; `false` (nothing read) when
/// the range is not inside one live allocation.
pub fn phys_read(address: u64, buffer: &mut [u8]) -> bool {
    with_live_range(address, buffer.len(), |source| {
        // SAFETY: the range lies in a live allocation (checked under the lock, which is held
        // for the copy, so it cannot be freed meanwhile); `buffer` is a separate allocation.
        unsafe { core::ptr::copy_nonoverlapping(source, buffer.as_mut_ptr(), buffer.len()) }
    })
    .is_some()
}

/// Device-side write of `data` at physical `address`; `false` (nothing written) when the range
/// is not inside one live allocation.
pub fn phys_write(address: u64, data: &[u8]) -> bool {
    with_live_range(address, data.len(), |destination| {
        // SAFETY: as in `phys_read`; this models DMA, which writes behind the driver's back.
        unsafe { core::ptr::copy_nonoverlapping(data.as_ptr(), destination, data.len()) }
    })
    .is_some()
}

/// Device-side atomic load of the u32 at physical `address` (4-byte aligned).
pub fn phys_load_u32(address: u64) -> Option<u32> {
    if !address.is_multiple_of(4) {
        return None;
    }
    with_live_range(address, 4, |word| {
        // SAFETY: in a live allocation, 4-byte aligned (checked), held alive by the lock.
        unsafe { AtomicU32::from_ptr(word.cast::<u32>()) }.load(Ordering::SeqCst)
    })
}

/// Device-side atomic store of a u32 at physical `address` (4-byte aligned).
pub fn phys_store_u32(address: u64, value: u32) -> bool {
    if !address.is_multiple_of(4) {
        return false;
    }
    with_live_range(address, 4, |word| {
        // SAFETY: as in `phys_load_u32`.
        unsafe { AtomicU32::from_ptr(word.cast::<u32>()) }.store(value, Ordering::SeqCst)
    })
    .is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_side_access_stays_inside_live_allocations() {
        let allocator = HeapDmaAllocator::new();
        let mut region = allocator.allocate(8192, 4096).unwrap();
        let base = region.phys().0;
        assert!(region.write_bytes(100, b"hello"));
        let mut seen = [0u8; 5];
        assert!(phys_read(base + 100, &mut seen));
        assert_eq!(&seen, b"hello");
        assert!(phys_store_u32(base + 8, 7));
        assert_eq!(region.load_u32(8), Some(7));
        assert!(!phys_read(base + 8190, &mut seen), "range crosses the end");
        assert_eq!(phys_load_u32(base + 2), None, "misaligned");
        drop(region);
        assert!(!phys_read(base, &mut seen), "freed memory is not reachable");
    }

    #[test]
    fn region_accessors_reject_out_of_bounds() {
        let allocator = HeapDmaAllocator::new();
        let mut region = allocator.allocate(64, 8).unwrap();
        assert!(!region.write_bytes(60, &[0; 8]));
        assert!(!region.write_bytes(usize::MAX, &[0; 1]));
        assert!(region.read_bytes(56, &mut [0; 8]));
        assert!(!region.read_bytes(57, &mut [0; 8]));
        assert_eq!(region.load_u32(62), None);
        assert_eq!(region.load_u32(2), None, "misaligned");
        assert!(!region.store_u32(64, 1));
    }

    #[test]
    fn allocation_limit_is_enforced() {
        let allocator = HeapDmaAllocator::with_allocation_limit(1);
        let _first = allocator.allocate(16, 8).unwrap();
        assert!(allocator.allocate(16, 8).is_none());
    }
}
