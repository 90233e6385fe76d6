//! Four-level page tables: identity maps of RAM (write-back) and of MMIO (uncached) on demand.
//!
//! The boot trampoline's tables cover only the first 4 GiB with large pages. `init` replaces
//! them with tables built from the memory map, so RAM anywhere (also above 4 GiB) is mapped and
//! everything else, page 0 included, faults until someone maps it on purpose.

use core::sync::atomic::{AtomicU64, Ordering};

use spin::Mutex;
use x86_64::registers::control::Cr3;
use x86_64::registers::model_specific::{Efer, EferFlags};
use x86_64::structures::paging::mapper::{MapToError, Mapper};
use x86_64::structures::paging::{
    FrameAllocator as TableFrameSource, OffsetPageTable, Page, PageSize, PageTable, PageTableFlags,
    PhysFrame, Size2MiB, Size4KiB,
};
use x86_64::{PhysAddr, VirtAddr};

use super::{PAGE_SIZE, frames::FrameAllocator};
use crate::arch::cpu;
use crate::error::KernelError;

const LARGE_PAGE: u64 = Size2MiB::SIZE;

/// How a mapping is cached.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Cacheability {
    /// Normal RAM.
    WriteBack,
    /// Device registers: no caching, no write combining.
    Uncached,
}

static ROOT: AtomicU64 = AtomicU64::new(0);
static LOCK: Mutex<()> = Mutex::new(());

/// Page-table frames come from the DMA frame pool (identity-mapped RAM).
struct TableFrames<'a>(&'a mut FrameAllocator);

// SAFETY: every frame handed out is a fresh, unused 4 KiB frame of identity-mapped RAM that
// nothing else owns (the pool never hands a frame out twice).
unsafe impl TableFrameSource<Size4KiB> for TableFrames<'_> {
    fn allocate_frame(&mut self) -> Option<PhysFrame<Size4KiB>> {
        let frames = &mut *self.0;
        let Some(physical) = frames.allocate(1, 1) else {
            log::error!(
                "page tables: DMA frame pool exhausted ({} of {} frames free)",
                frames.free_frames(),
                frames.total_frames()
            );
            return None;
        };
        Some(PhysFrame::containing_address(PhysAddr::new(physical)))
    }
}

fn out_of_memory() -> KernelError {
    KernelError::OutOfMemory {
        purpose: "page tables",
    }
}

/// The identity-mapped tables rooted at `root`.
///
/// # Safety
/// `root` must be a PML4 frame of ours, all page-table frames identity-mapped, and the caller
/// must hold LOCK for as long as the result lives.
unsafe fn tables(root: u64) -> OffsetPageTable<'static> {
    // SAFETY: caller contract: the frame is a page table nobody else references meanwhile, and
    // a physical-memory offset of zero is exactly the identity map.
    unsafe { OffsetPageTable::new(&mut *(root as *mut PageTable), VirtAddr::zero()) }
}

fn map_locked(
    tables: &mut OffsetPageTable<'_>,
    start: u64,
    end: u64,
    cacheability: Cacheability,
    frames: &mut FrameAllocator,
) -> Result<(), KernelError> {
    let flags = PageTableFlags::PRESENT
        | PageTableFlags::WRITABLE
        | match cacheability {
            Cacheability::WriteBack => PageTableFlags::empty(),
            Cacheability::Uncached => PageTableFlags::WRITE_THROUGH | PageTableFlags::NO_CACHE,
        };
    // Identity mapping needs canonical virtual addresses, i.e. below 128 TiB.
    if end > 1 << 47 {
        return Err(KernelError::BadMapping {
            phys: start,
            len: end.saturating_sub(start),
        });
    }
    let mut frames = TableFrames(frames);
    let mut address = start / PAGE_SIZE * PAGE_SIZE;
    let end = end.div_ceil(PAGE_SIZE) * PAGE_SIZE;
    while address < end {
        // Large pages for whole 2 MiB stretches of either kind: the 256 MiB ECAM window
        // alone would otherwise take 128 page tables out of a small VM's frame pool.
        if address.is_multiple_of(LARGE_PAGE) && address + LARGE_PAGE <= end {
            let page = Page::<Size2MiB>::containing_address(VirtAddr::new(address));
            let frame = PhysFrame::<Size2MiB>::containing_address(PhysAddr::new(address));
            // SAFETY: an identity mapping of a range nothing maps yet (the entry is unused, else
            // the crate refuses); the caller asked for exactly this range.
            match unsafe { tables.map_to(page, frame, flags, &mut frames) } {
                Ok(flush) => {
                    flush.flush();
                    address += LARGE_PAGE;
                    continue;
                }
                Err(MapToError::FrameAllocationFailed) => return Err(out_of_memory()),
                // Already a large page or a page table: the 4 KiB path below sorts it out.
                Err(MapToError::PageAlreadyMapped(_) | MapToError::ParentEntryHugePage) => {}
            }
        }
        let page = Page::<Size4KiB>::containing_address(VirtAddr::new(address));
        let frame = PhysFrame::<Size4KiB>::containing_address(PhysAddr::new(address));
        // SAFETY: as above.
        match unsafe { tables.map_to(page, frame, flags, &mut frames) } {
            Ok(flush) => flush.flush(),
            Err(MapToError::FrameAllocationFailed) => return Err(out_of_memory()),
            // Pages already mapped keep their mapping.
            Err(MapToError::PageAlreadyMapped(_)) => {}
            // Inside a large page (we never make 1 GiB ones): the rest of it is mapped.
            Err(MapToError::ParentEntryHugePage) => {
                address = (address | (LARGE_PAGE - 1)) + 1;
                continue;
            }
        }
        address += PAGE_SIZE;
    }
    Ok(())
}

/// Builds the kernel's page tables identity-mapping `ram` (write-back) and switches to them.
///
/// # Safety
/// `ram` must include the kernel image, its stacks and the frame pool; called once at boot.
pub unsafe fn init(
    ram: &[super::PhysRange],
    frames: &mut FrameAllocator,
) -> Result<(), KernelError> {
    let _guard = LOCK.lock();
    let root = TableFrames(frames)
        .allocate_frame()
        .ok_or_else(out_of_memory)?
        .start_address()
        .as_u64();
    // SAFETY: the frame was just allocated for us and is identity-mapped RAM (the pool lies in
    // memory both the boot tables and ours map).
    unsafe { (*(root as *mut PageTable)).zero() };
    // SAFETY: `root` is the PML4 just made; LOCK is held until `tables` is gone.
    let mut tables = unsafe { tables(root) };
    for range in ram {
        map_locked(
            &mut tables,
            range.start,
            range.end,
            Cacheability::WriteBack,
            frames,
        )?;
    }
    // SAFETY: the new tables map all RAM, which includes everything in use (caller contract).
    unsafe { cpu::write_cr3(root) };
    ROOT.store(root, Ordering::Release);
    Ok(())
}

/// Pages touched in the first round of [`grow_emulated_tlb`]; each round doubles it.
const TLB_GROWTH_FIRST_ROUND_PAGES: u64 = 128;
/// Rounds of [`grow_emulated_tlb`]: enough to go from QEMU's smallest TLB (64 entries) to one
/// that holds 32 768 pages (128 MiB) in one doubling per round.
const TLB_GROWTH_ROUNDS: u32 = 9;

/// Lets an emulated CPU's software TLB grow to hold the RAM in `ram` (up to 128 MiB of it):
/// rounds that each read one byte of twice as many pages as the round before, then reload CR3,
/// until two rounds covered all of RAM.
///
/// QEMU's TCG starts each TLB at 256 entries and resizes it only when the guest flushes it, by
/// one doubling when more than 70 % of the entries were in use (`tlb_mmu_resize_locked`). This
/// kernel flushes only while it builds its tables, so without this the TLB stays small while a
/// network stack's working set spans thousands of pages (receive buffers, socket buffers): a
/// `perf` profile of the vCPU thread receiving TCP showed ~18 % of its time in TLB refills
/// (`tlb_set_page_full` and the slow-path accessors), 4–6 % after this. On hardware or a
/// hardware-assisted hypervisor it costs some thousand reads and at most nine TLB flushes at
/// boot.
pub fn grow_emulated_tlb(ram: &[super::PhysRange]) {
    let root = ROOT.load(Ordering::Acquire);
    if root == 0 {
        return;
    }
    let mut rounds_over_all_ram = 0;
    for round in 0..TLB_GROWTH_ROUNDS {
        let mut left = TLB_GROWTH_FIRST_ROUND_PAGES << round;
        for range in ram {
            let mut page = range.start;
            while page < range.end && left > 0 {
                // SAFETY: `ram` is identity-mapped write-back RAM (`init` mapped it); a read of
                // one byte has no effect on whoever owns the page.
                unsafe { core::ptr::read_volatile(page as *const u8) };
                page += PAGE_SIZE;
                left -= 1;
            }
        }
        // SAFETY: reloading the current root keeps every mapping and flushes the TLB.
        unsafe { cpu::write_cr3(root) };
        if left > 0 {
            // All of RAM fitted in this round's quota: one more such round lets a TLB that
            // was just under it double once more, after which it holds all of RAM.
            rounds_over_all_ram += 1;
            if rounds_over_all_ram == 2 {
                break;
            }
        }
    }
}

/// Identity-maps `[start, start + len)` with the given caching. Pages already mapped keep
/// their mapping.
pub fn map(start: u64, len: u64, cacheability: Cacheability) -> Result<(), KernelError> {
    let end = start
        .checked_add(len)
        .filter(|_| len > 0)
        .ok_or(KernelError::BadMapping { phys: start, len })?;
    if end > (1 << 46) {
        return Err(KernelError::BadMapping { phys: start, len });
    }
    let root = ROOT.load(Ordering::Acquire);
    if root == 0 {
        // Still on the boot tables, which identity-map the first 4 GiB.
        return if end <= 1 << 32 {
            Ok(())
        } else {
            Err(KernelError::BadMapping { phys: start, len })
        };
    }
    let _guard = LOCK.lock();
    let mut frames = super::heap::FRAMES.lock();
    // SAFETY: ROOT is our PML4 (set by `init`); LOCK is held until `tables` is gone.
    let mut tables = unsafe { tables(root) };
    map_locked(&mut tables, start, end, cacheability, &mut frames)
}

/// True when `address` is mapped and the CPU may execute code there (no level of the walk has
/// the no-execute bit while EFER.NXE is on). The Hyper-V hypercall page must be executable.
pub fn is_executable(address: u64) -> bool {
    let nx_enabled = Efer::read().contains(EferFlags::NO_EXECUTE_ENABLE);
    let address = VirtAddr::new_truncate(address);
    let indexes = [
        address.p4_index(),
        address.p3_index(),
        address.p2_index(),
        address.p1_index(),
    ];
    let _guard = LOCK.lock();
    let mut table_address = Cr3::read().0.start_address().as_u64();
    for (level, index) in indexes.into_iter().enumerate() {
        // SAFETY: `table_address` is a page-table frame of the live hierarchy (CR3 or a present
        // non-leaf entry), identity-mapped; tables change only under LOCK, which we hold.
        let table = unsafe { &*(table_address as *const PageTable) };
        let entry = &table[index];
        let flags = entry.flags();
        if !flags.contains(PageTableFlags::PRESENT)
            || (nx_enabled && flags.contains(PageTableFlags::NO_EXECUTE))
        {
            return false;
        }
        if level == 3 || (level > 0 && flags.contains(PageTableFlags::HUGE_PAGE)) {
            return true;
        }
        table_address = entry.addr().as_u64();
    }
    false
}
