//! Ending the VM with an exit code the host can see.
//!
//! Under QEMU, `isa-debug-exit` (iobase 0xf4) turns a write of `code` into QEMU exit status
//! `2 * code + 1`. Elsewhere that port is nothing, so we fall back to ACPI S5 (soft off) and
//! then to a reset. Power-off carries no code, so the code is also printed on the console as
//! [`EXIT_MARKER`]` <code>`, which is how the OpenVMM harness learns it.

use crate::arch::{cpu, port};

const ISA_DEBUG_EXIT_PORT: u16 = 0xf4;

/// Console line prefix announcing the exit code (`tandem: exit code 0`).
pub const EXIT_MARKER: &str = "tandem: exit code";

/// Stops the machine with `code` (0 = success; 0..=127 reach the host intact).
pub fn exit(code: i32) -> ! {
    let code = code.clamp(0, 127) as u32;
    cpu::disable_interrupts();
    crate::console::emergency_print(format_args!("{EXIT_MARKER} {code}\n"));
    // SAFETY: port 0xf4 is QEMU's isa-debug-exit when present and unused otherwise.
    unsafe { port::outl(ISA_DEBUG_EXIT_PORT, code) };
    crate::acpi::power_off();
    // SAFETY: 0xcf9 is the PCI reset control register on PC chipsets; 0x06 = full reset.
    unsafe { port::outb(0xcf9, 0x06) };
    cpu::halt_forever()
}
