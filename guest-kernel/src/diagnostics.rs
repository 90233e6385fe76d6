//! Hooks for tests that check how the kernel reports faults.

/// Reads a u64 from `address`. An unmapped address raises a page fault, which the kernel
/// reports (vector, error code, RIP, CR2, registers) before ending the VM with a non-zero code.
pub fn probe_read(address: usize) -> u64 {
    // SAFETY: a volatile read of plain integer bits: any mapped address yields some value (no
    // invalid bit patterns for u64); an unmapped one faults and the exception handler ends the
    // VM, so execution never continues with an invalid read.
    unsafe { core::ptr::read_volatile(address as *const u64) }
}
