//! Control registers, model-specific registers, CPUID, TSC, interrupt flag and halting.
//!
//! Thin names over the `x86_64` crate, kept so callers (boot, Hyper-V, time) stay unchanged.

use core::arch::asm;
use core::arch::x86_64::{__cpuid_count, _rdtsc, CpuidResult};

use x86_64::instructions::{interrupts, random::RdRand, tlb};
use x86_64::registers::control::{Cr2, Cr3, Cr3Flags};
use x86_64::registers::model_specific::Msr;
use x86_64::structures::paging::PhysFrame;
use x86_64::{PhysAddr, VirtAddr};

/// Executes CPUID for `leaf`/`subleaf`.
pub fn cpuid(leaf: u32, subleaf: u32) -> CpuidResult {
    __cpuid_count(leaf, subleaf)
}

/// Reads the time-stamp counter.
pub fn rdtsc() -> u64 {
    // SAFETY: RDTSC is available on every x86_64 CPU; CR4.TSD is clear at CPL 0 anyway.
    unsafe { _rdtsc() }
}

/// Reads a model-specific register.
///
/// # Safety
/// `msr` must exist on this CPU (else #GP).
pub unsafe fn rdmsr(msr: u32) -> u64 {
    // SAFETY: the caller guarantees the MSR exists.
    unsafe { Msr::new(msr).read() }
}

/// Writes a model-specific register.
///
/// # Safety
/// `msr` must exist and `value` must be valid for it; MSRs change CPU behaviour.
pub unsafe fn wrmsr(msr: u32, value: u64) {
    // SAFETY: the caller guarantees the MSR and value are valid. The crate's WRMSR is a compiler
    // barrier (no `nomem`), which MSRs that make the hypervisor read or write a page need.
    unsafe { Msr::new(msr).write(value) };
}

/// Reads CR2 (the faulting address of the last page fault).
pub fn read_cr2() -> u64 {
    Cr2::read_raw()
}

/// Reads CR3 (the page-table root and its caching bits).
pub fn read_cr3() -> u64 {
    let (frame, flags) = Cr3::read_raw();
    frame.start_address().as_u64() | u64::from(flags)
}

/// Loads CR3, switching page tables and flushing non-global TLB entries.
///
/// # Safety
/// `root` must be the page-aligned address of a valid PML4 that maps the running code, stack
/// and data.
pub unsafe fn write_cr3(root: u64) {
    let frame = PhysFrame::containing_address(PhysAddr::new(root));
    // SAFETY: the caller guarantees the new tables map everything in use.
    unsafe { Cr3::write(frame, Cr3Flags::empty()) };
}

/// Invalidates the TLB entry for one address.
pub fn invalidate_page(address: u64) {
    tlb::flush(VirtAddr::new(address));
}

// CLI, STI and HLT must be compiler barriers (asm without `nomem`): with `nomem` the compiler may
// move memory accesses across them, e.g. hoist `time::wait_for_event`'s pending-event check out
// of the interrupts-off window, or reuse a value loaded before `sti; hlt` after the wake-up;
// either loses a wake-up, since interrupt handlers are the other "thread" writing that memory.
// The crate's `enable`/`disable` are barriers; its `enable_and_hlt` is `nomem`, so not used.

/// Enables interrupts (a compiler barrier, see above).
pub fn enable_interrupts() {
    interrupts::enable();
}

/// Disables interrupts (a compiler barrier, see above).
pub fn disable_interrupts() {
    interrupts::disable();
}

/// True when interrupts are enabled (RFLAGS.IF).
pub fn interrupts_enabled() -> bool {
    interrupts::are_enabled()
}

/// Runs `f` with interrupts disabled, restoring the previous state afterwards.
pub fn without_interrupts<T>(f: impl FnOnce() -> T) -> T {
    interrupts::without_interrupts(f)
}

/// Atomically enables interrupts and halts until the next one (`sti; hlt` has no window in
/// which an interrupt could be missed, because STI takes effect after the next instruction).
pub fn enable_interrupts_and_halt() {
    // SAFETY: halting with interrupts enabled just waits for the next interrupt. Not `nomem`
    // (see above): what the interrupt handler wrote must be re-read after the wake-up.
    unsafe { asm!("sti; hlt", options(nostack)) };
}

/// Halts forever with interrupts disabled.
pub fn halt_forever() -> ! {
    // A barrier, so every store made before (exit reasons, console state) is emitted.
    interrupts::disable();
    loop {
        x86_64::instructions::hlt();
    }
}

/// A hardware random number (RDRAND), or `None` when the CPU has none or it failed 10 times.
pub fn rdrand() -> Option<u64> {
    let generator = RdRand::new()?;
    (0..10).find_map(|_| generator.get_u64())
}
