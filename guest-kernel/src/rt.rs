//! What the host target's prebuilt libraries expect from libc and the unwinder: the memory
//! functions, `rust_eh_personality`, and the panic handler.

use core::arch::asm;

/// Exit code of a kernel panic.
pub const PANIC_EXIT_CODE: i32 = 101;

/// # Safety
/// Standard C `memcpy` contract: valid, non-overlapping regions of `len` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memcpy(destination: *mut u8, source: *const u8, len: usize) -> *mut u8 {
    // SAFETY: the caller's contract is `copy_disjoint`'s.
    unsafe { crate::mm::copy::copy_disjoint(destination, source, len) };
    destination
}

/// # Safety
/// Standard C `memmove` contract: valid regions of `len` bytes, possibly overlapping.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memmove(destination: *mut u8, source: *const u8, len: usize) -> *mut u8 {
    if (destination as usize).wrapping_sub(source as usize) >= len {
        // Destination is not inside [source, source + len): a forward copy is safe.
        // SAFETY: caller contract; forward copy never reads a byte it already overwrote.
        unsafe { crate::mm::copy::copy_forward(destination, source, len) };
        destination
    } else {
        // SAFETY: caller contract; copying backwards (DF set, restored after) handles overlap.
        unsafe {
            asm!("std", "rep movsb", "cld",
                 inout("rcx") len => _, inout("rdi") destination.add(len - 1) => _,
                 inout("rsi") source.add(len - 1) => _, options(nostack));
        }
        destination
    }
}

/// # Safety
/// Standard C `memset` contract: a valid region of `len` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memset(destination: *mut u8, value: i32, len: usize) -> *mut u8 {
    let pattern = u64::from(value as u8) * 0x0101_0101_0101_0101;
    // SAFETY: the caller guarantees the region is valid; `len / 8` quadwords then `len % 8`
    // bytes are stored forwards (see memcpy for why quadwords).
    unsafe {
        asm!("rep stosq", "mov rcx, {tail}", "rep stosb",
             tail = in(reg) len % 8,
             inout("rcx") len / 8 => _, inout("rdi") destination => _,
             in("rax") pattern, options(nostack, preserves_flags));
    }
    destination
}

/// # Safety
/// Standard C `memcmp` contract: valid regions of `len` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memcmp(left: *const u8, right: *const u8, len: usize) -> i32 {
    for index in 0..len {
        // Volatile reads keep LLVM from turning this loop back into a call to memcmp/bcmp.
        // SAFETY: the caller guarantees both regions hold `len` bytes.
        let (a, b) = unsafe {
            (
                left.add(index).read_volatile(),
                right.add(index).read_volatile(),
            )
        };
        if a != b {
            return i32::from(a) - i32::from(b);
        }
    }
    0
}

/// # Safety
/// As [`memcmp`]; only equality matters.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bcmp(left: *const u8, right: *const u8, len: usize) -> i32 {
    // SAFETY: same contract as memcmp.
    unsafe { memcmp(left, right, len) }
}

/// Referenced by the prebuilt `liballoc` even with `panic = "abort"`; never called.
#[unsafe(no_mangle)]
pub extern "C" fn rust_eh_personality() {}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    let now = crate::time::now_ns();
    match info.location() {
        Some(location) => crate::console::emergency_print(format_args!(
            "[{:5}.{:06}] panic: {} at {}:{}:{}\n",
            now / 1_000_000_000,
            now % 1_000_000_000 / 1000,
            info.message(),
            location.file(),
            location.line(),
            location.column()
        )),
        None => crate::console::emergency_print(format_args!("panic: {}\n", info.message())),
    }
    crate::exit::exit(PANIC_EXIT_CODE)
}

/// Referenced by cleanup paths in the prebuilt `liballoc`; with `panic = "abort"` no unwinding
/// ever starts, so reaching this is a kernel bug.
#[unsafe(no_mangle)]
pub extern "C" fn _Unwind_Resume() -> ! {
    crate::console::emergency_print(format_args!(
        "panic: _Unwind_Resume called without an unwinder\n"
    ));
    crate::exit::exit(PANIC_EXIT_CODE)
}
