//! The kernel heap (talc) over usable RAM, the global frame pool, and the DMA allocator drivers
//! get.

use core::ptr::NonNull;
use core::sync::atomic::{AtomicUsize, Ordering};

use net_device::{DmaAllocator, DmaRegion, PhysAddr};
use spin::Mutex;
use talc::source::Manual;
use talc::sync::TalcLock;

use super::{PAGE_SIZE, PhysRange, frames::FrameAllocator};

#[global_allocator]
static HEAP: TalcLock<spin::mutex::SpinMutex<()>, Manual, talc::DefaultBinning> =
    TalcLock::new(Manual);

/// Bytes the heap was given at boot.
static HEAP_BYTES: AtomicUsize = AtomicUsize::new(0);

/// Bytes the heap was given at boot (what apps size their buffers by).
pub fn heap_bytes() -> usize {
    HEAP_BYTES.load(Ordering::Relaxed)
}

/// The DMA frame pool.
pub static FRAMES: Mutex<FrameAllocator> = Mutex::new(FrameAllocator::empty());

/// Gives the heap one more range of identity-mapped RAM. Returns false if talc refused it
/// (too small).
///
/// # Safety
/// The range must be mapped, usable RAM that nothing else uses, ever.
pub unsafe fn add_heap_range(range: PhysRange) -> bool {
    // SAFETY: the caller hands us exclusive, mapped RAM.
    let claimed = unsafe {
        HEAP.lock()
            .claim(range.start as *mut u8, range.len() as usize)
            .is_some()
    };
    if claimed {
        HEAP_BYTES.fetch_add(range.len() as usize, Ordering::Relaxed);
    }
    claimed
}

/// Hands out zeroed, page-aligned, physically contiguous frames from the pool.
#[derive(Clone, Copy, Debug, Default)]
pub struct KernelDma;

fn release_frames(_virt: NonNull<u8>, phys: PhysAddr, len: usize) {
    FRAMES
        .lock()
        .free(phys.0, (len as u64).div_ceil(PAGE_SIZE) as usize);
}

impl DmaAllocator for KernelDma {
    fn allocate(&self, len: usize, align: usize) -> Option<DmaRegion> {
        if len == 0 || !align.is_power_of_two() || align > PAGE_SIZE as usize {
            return None;
        }
        let count = (len as u64).div_ceil(PAGE_SIZE) as usize;
        let phys = FRAMES.lock().allocate(count, 1)?;
        let virt = NonNull::new(phys as *mut u8)?;
        // SAFETY: the frames are identity-mapped RAM that the pool just gave us exclusively.
        unsafe { core::ptr::write_bytes(virt.as_ptr(), 0, count * PAGE_SIZE as usize) };
        // SAFETY: `count` frames (≥ len bytes) of zeroed, exclusively owned RAM, reachable by
        // devices at the same address (identity map, no IOMMU); released to the pool on drop.
        Some(unsafe { DmaRegion::from_raw(virt, PhysAddr(phys), len, Some(release_frames)) })
    }
}
