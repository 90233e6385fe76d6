//! Control registers, model-specific registers, CPUID, TSC and halting.

use core::arch::asm;
use core::arch::x86_64::{__cpuid_count, _rdtsc, CpuidResult};

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
    let (low, high): (u32, u32);
    // SAFETY: the caller guarantees the MSR exists.
    unsafe {
        asm!("rdmsr", in("ecx") msr, out("eax") low, out("edx") high, options(nomem, nostack, preserves_flags))
    };
    (u64::from(high) << 32) | u64::from(low)
}

/// Writes a model-specific register.
///
/// # Safety
/// `msr` must exist and `value` must be valid for it; MSRs change CPU behaviour.
pub unsafe fn wrmsr(msr: u32, value: u64) {
    // SAFETY: the caller guarantees the MSR and value are valid.
    unsafe {
        asm!("wrmsr", in("ecx") msr, in("eax") value as u32, in("edx") (value >> 32) as u32, options(nostack, preserves_flags))
    };
}

/// Reads CR2 (the faulting address of the last page fault).
pub fn read_cr2() -> u64 {
    let value: u64;
    // SAFETY: reading CR2 has no side effects at CPL 0.
    unsafe { asm!("mov {}, cr2", out(reg) value, options(nomem, nostack, preserves_flags)) };
    value
}

/// Reads CR3 (the page-table root).
pub fn read_cr3() -> u64 {
    let value: u64;
    // SAFETY: reading CR3 has no side effects at CPL 0.
    unsafe { asm!("mov {}, cr3", out(reg) value, options(nomem, nostack, preserves_flags)) };
    value
}

/// Loads CR3, switching page tables and flushing non-global TLB entries.
///
/// # Safety
/// `value` must point to a valid PML4 that maps the running code, stack and data.
pub unsafe fn write_cr3(value: u64) {
    // SAFETY: the caller guarantees the new tables map everything in use.
    unsafe { asm!("mov cr3, {}", in(reg) value, options(nostack, preserves_flags)) };
}

/// Invalidates the TLB entry for one address.
pub fn invalidate_page(address: u64) {
    // SAFETY: INVLPG only drops a cached translation; it cannot break memory safety.
    unsafe { asm!("invlpg [{}]", in(reg) address, options(nostack, preserves_flags)) };
}

// CLI, STI and HLT are compiler barriers on purpose (no `nomem`): with `nomem` the compiler may
// move memory accesses across them, e.g. hoist `wait_for_event`'s pending-event check out of
// the interrupts-off window, or reuse a value loaded before `sti; hlt` after the wake-up,
// either of which loses a wake-up. Interrupt handlers are the other "thread" here.

/// Enables interrupts.
pub fn enable_interrupts() {
    // SAFETY: the IDT is loaded before any caller runs (kernel init order). Not `nomem`: see
    // above.
    unsafe { asm!("sti", options(nostack)) };
}

/// Disables interrupts.
pub fn disable_interrupts() {
    // SAFETY: CLI only masks interrupts. Not `nomem`: see above.
    unsafe { asm!("cli", options(nostack)) };
}

/// True when interrupts are enabled (RFLAGS.IF).
pub fn interrupts_enabled() -> bool {
    let flags: u64;
    // SAFETY: reading RFLAGS has no side effects.
    unsafe { asm!("pushfq; pop {}", out(reg) flags, options(nomem, preserves_flags)) };
    flags & (1 << 9) != 0
}

/// Runs `f` with interrupts disabled, restoring the previous state afterwards.
pub fn without_interrupts<T>(f: impl FnOnce() -> T) -> T {
    let was_enabled = interrupts_enabled();
    if was_enabled {
        disable_interrupts();
    }
    let result = f();
    if was_enabled {
        enable_interrupts();
    }
    result
}

/// Atomically enables interrupts and halts until the next one (`sti; hlt` has no window in
/// which an interrupt could be missed, because STI takes effect after the next instruction).
pub fn enable_interrupts_and_halt() {
    // SAFETY: halting with interrupts enabled just waits for the next interrupt. Not `nomem`:
    // what the interrupt handler wrote must be re-read after the wake-up.
    unsafe { asm!("sti; hlt", options(nostack)) };
}

/// Halts forever with interrupts disabled.
pub fn halt_forever() -> ! {
    loop {
        // SAFETY: CLI/HLT stop the CPU; nothing else runs. Not `nomem`, so every store made
        // before (exit reasons, console state a debugger or the host may read) is emitted.
        unsafe { asm!("cli; hlt", options(nostack)) };
    }
}

/// A hardware random number (RDRAND), or `None` when the CPU has none or it failed 10 times.
pub fn rdrand() -> Option<u64> {
    if cpuid(1, 0).ecx & (1 << 30) == 0 {
        return None;
    }
    for _ in 0..10 {
        let value: u64;
        let ok: u8;
        // SAFETY: RDRAND exists (CPUID.1:ECX[30] checked above) and only writes registers.
        unsafe {
            asm!("rdrand {}", "setc {}", out(reg) value, out(reg_byte) ok, options(nomem, nostack))
        };
        if ok != 0 {
            return Some(value);
        }
    }
    None
}
