//! Four-level page tables: identity maps of RAM (write-back) and of MMIO (uncached) on demand.
//!
//! The boot trampoline's tables cover only the first 4 GiB with large pages. `init` replaces
//! them with tables built from the memory map, so RAM anywhere (also above 4 GiB) is mapped and
//! everything else, page 0 included, faults until someone maps it on purpose.

use core::sync::atomic::{AtomicU64, Ordering};

use spin::Mutex;

use super::{PAGE_SIZE, frames::FrameAllocator};
use crate::arch::cpu;
use crate::error::KernelError;

const PRESENT: u64 = 1 << 0;
const WRITABLE: u64 = 1 << 1;
const WRITE_THROUGH: u64 = 1 << 3;
const CACHE_DISABLE: u64 = 1 << 4;
const HUGE_PAGE: u64 = 1 << 7;
const NO_EXECUTE: u64 = 1 << 63;
/// IA32_EFER and its no-execute-enable bit (without it, bit 63 of an entry is reserved and no
/// page is execute-protected).
const IA32_EFER: u32 = 0xc000_0080;
const EFER_NO_EXECUTE_ENABLE: u64 = 1 << 11;
const ADDRESS_MASK: u64 = 0x000f_ffff_ffff_f000;
const LARGE_PAGE: u64 = 2 << 20;

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

fn table(physical: u64) -> *mut u64 {
    physical as *mut u64
}

fn new_table(frames: &mut FrameAllocator) -> Result<u64, KernelError> {
    let Some(physical) = frames.allocate(1, 1) else {
        log::error!(
            "page tables: DMA frame pool exhausted ({} of {} frames free)",
            frames.free_frames(),
            frames.total_frames()
        );
        return Err(KernelError::OutOfMemory {
            purpose: "page tables",
        });
    };
    // SAFETY: the frame was just allocated for us and is identity-mapped RAM (the pool lies in
    // memory both the boot tables and ours map).
    unsafe { core::ptr::write_bytes(physical as *mut u8, 0, PAGE_SIZE as usize) };
    Ok(physical)
}

/// Returns the next-level table for `index` of `parent`, creating it when absent. `None` when
/// the entry is a large page (the range is already mapped).
fn next_table(
    parent: u64,
    index: usize,
    frames: &mut FrameAllocator,
) -> Result<Option<u64>, KernelError> {
    // SAFETY: `parent` is a page-table frame we own; index < 512.
    let entry = unsafe { table(parent).add(index) };
    // SAFETY: as above; page tables are only modified under LOCK.
    let value = unsafe { entry.read_volatile() };
    if value & PRESENT != 0 {
        if value & HUGE_PAGE != 0 {
            return Ok(None);
        }
        return Ok(Some(value & ADDRESS_MASK));
    }
    let child = new_table(frames)?;
    // SAFETY: as above.
    unsafe { entry.write_volatile(child | PRESENT | WRITABLE) };
    Ok(Some(child))
}

fn map_locked(
    root: u64,
    start: u64,
    end: u64,
    cacheability: Cacheability,
    frames: &mut FrameAllocator,
) -> Result<(), KernelError> {
    let attributes = PRESENT
        | WRITABLE
        | match cacheability {
            Cacheability::WriteBack => 0,
            Cacheability::Uncached => WRITE_THROUGH | CACHE_DISABLE,
        };
    let mut address = start / PAGE_SIZE * PAGE_SIZE;
    let end = end.div_ceil(PAGE_SIZE) * PAGE_SIZE;
    while address < end {
        let pml4_index = ((address >> 39) & 511) as usize;
        let pdpt_index = ((address >> 30) & 511) as usize;
        let pd_index = ((address >> 21) & 511) as usize;
        let pt_index = ((address >> 12) & 511) as usize;
        let Some(pdpt) = next_table(root, pml4_index, frames)? else {
            address = (address | ((1 << 39) - 1)) + 1;
            continue;
        };
        let Some(pd) = next_table(pdpt, pdpt_index, frames)? else {
            address = (address | ((1 << 30) - 1)) + 1;
            continue;
        };
        // SAFETY: pd is a page-table frame; pd_index < 512; modified only under LOCK.
        let pd_entry = unsafe { table(pd).add(pd_index) };
        // SAFETY: as above.
        let pd_value = unsafe { pd_entry.read_volatile() };
        let large_fits = address.is_multiple_of(LARGE_PAGE) && address + LARGE_PAGE <= end;
        // Large pages for whole 2 MiB stretches of either kind: the 256 MiB ECAM window
        // alone would otherwise take 128 page tables out of a small VM's frame pool.
        if pd_value & PRESENT == 0 && large_fits {
            // SAFETY: as above.
            unsafe { pd_entry.write_volatile(address | attributes | HUGE_PAGE) };
            cpu::invalidate_page(address);
            address += LARGE_PAGE;
            continue;
        }
        let Some(pt) = next_table(pd, pd_index, frames)? else {
            address = (address | (LARGE_PAGE - 1)) + 1;
            continue;
        };
        // SAFETY: pt is a page-table frame; pt_index < 512; modified only under LOCK.
        let pt_entry = unsafe { table(pt).add(pt_index) };
        // SAFETY: as above.
        if unsafe { pt_entry.read_volatile() } & PRESENT == 0 {
            // SAFETY: as above.
            unsafe { pt_entry.write_volatile(address | attributes) };
            cpu::invalidate_page(address);
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
    let root = new_table(frames)?;
    for range in ram {
        map_locked(
            root,
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
    map_locked(root, start, end, cacheability, &mut frames)
}

/// True when `address` is mapped and the CPU may execute code there (no level of the walk has
/// the no-execute bit while EFER.NXE is on). The Hyper-V hypercall page must be executable.
pub fn is_executable(address: u64) -> bool {
    // SAFETY: IA32_EFER exists on every x86_64 CPU; reading it has no side effects.
    let nx_enabled = unsafe { cpu::rdmsr(IA32_EFER) } & EFER_NO_EXECUTE_ENABLE != 0;
    let _guard = LOCK.lock();
    let mut table_address = cpu::read_cr3() & ADDRESS_MASK;
    for level in 0..4 {
        let shift = 39 - 9 * level;
        let index = ((address >> shift) & 511) as usize;
        // SAFETY: `table_address` is a page-table frame of the live hierarchy (CR3 or a
        // present non-leaf entry), identity-mapped; index < 512; tables change only under LOCK.
        let entry = unsafe { table(table_address).add(index).read_volatile() };
        if entry & PRESENT == 0 || (nx_enabled && entry & NO_EXECUTE != 0) {
            return false;
        }
        if level == 3 || (level > 0 && entry & HUGE_PAGE != 0) {
            return true;
        }
        table_address = entry & ADDRESS_MASK;
    }
    false
}
