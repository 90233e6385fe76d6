//! Interrupt entry stubs, exception reports, and vector allocation for device interrupts.
//!
//! Every vector has a 16-byte stub that pushes a uniform frame and jumps to a common routine.
//! The common routine saves all general registers and the full XMM/x87 state (`fxsave`),
//! because the Rust handlers (and prebuilt `core`) use SSE, then calls
//! [`tandem_interrupt_dispatch`].

use core::arch::global_asm;
use core::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use crate::arch::{apic, cpu, descriptors};
use crate::error::KernelError;

/// The LAPIC timer's vector.
pub const TIMER_VECTOR: u8 = 0xf0;
/// The LAPIC spurious-interrupt vector (no EOI).
pub const SPURIOUS_VECTOR: u8 = 0xff;
/// The legacy PICs are remapped here and masked; anything arriving is spurious.
pub const PIC_BASE_VECTOR: u8 = 0x20;
/// First vector handed out to devices.
pub const FIRST_DEVICE_VECTOR: u8 = 0x30;
/// Last vector handed out to devices.
pub const LAST_DEVICE_VECTOR: u8 = 0xef;

/// Exit code used when a CPU exception ends the kernel.
pub const EXCEPTION_EXIT_CODE: i32 = 102;

const STUB_STRIDE: u64 = 16;

global_asm!(
    r#"
    .section .text
    .balign 16
    .global tandem_interrupt_stubs
tandem_interrupt_stubs:
    .set tandem_vector, 0
    .rept 256
    .balign 16
    .set tandem_has_error_code, 0
    .if tandem_vector == 8
    .set tandem_has_error_code, 1
    .endif
    .if tandem_vector == 10
    .set tandem_has_error_code, 1
    .endif
    .if tandem_vector == 11
    .set tandem_has_error_code, 1
    .endif
    .if tandem_vector == 12
    .set tandem_has_error_code, 1
    .endif
    .if tandem_vector == 13
    .set tandem_has_error_code, 1
    .endif
    .if tandem_vector == 14
    .set tandem_has_error_code, 1
    .endif
    .if tandem_vector == 17
    .set tandem_has_error_code, 1
    .endif
    .if tandem_vector == 21
    .set tandem_has_error_code, 1
    .endif
    .if tandem_vector == 29
    .set tandem_has_error_code, 1
    .endif
    .if tandem_vector == 30
    .set tandem_has_error_code, 1
    .endif
    .if tandem_has_error_code == 0
    pushq $0
    .endif
    pushq $tandem_vector
    jmp tandem_interrupt_common
    .set tandem_vector, tandem_vector + 1
    .endr

    .balign 16
tandem_interrupt_common:
    cld
    pushq %rax
    pushq %rbx
    pushq %rcx
    pushq %rdx
    pushq %rsi
    pushq %rdi
    pushq %rbp
    pushq %r8
    pushq %r9
    pushq %r10
    pushq %r11
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, %rbx
    andq $-16, %rsp
    subq $512, %rsp
    fxsave64 (%rsp)
    movq %rbx, %rdi
    call tandem_interrupt_dispatch
    fxrstor64 (%rsp)
    movq %rbx, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %r11
    popq %r10
    popq %r9
    popq %r8
    popq %rbp
    popq %rdi
    popq %rsi
    popq %rdx
    popq %rcx
    popq %rbx
    popq %rax
    addq $16, %rsp
    iretq
    "#,
    options(att_syntax)
);

unsafe extern "C" {
    static tandem_interrupt_stubs: u8;
}

/// The registers saved by the interrupt stubs, in stack order.
#[repr(C)]
#[derive(Debug)]
pub struct InterruptFrame {
    /// General registers, pushed by the common stub.
    pub r15: u64,
    #[allow(missing_docs)]
    pub r14: u64,
    #[allow(missing_docs)]
    pub r13: u64,
    #[allow(missing_docs)]
    pub r12: u64,
    #[allow(missing_docs)]
    pub r11: u64,
    #[allow(missing_docs)]
    pub r10: u64,
    #[allow(missing_docs)]
    pub r9: u64,
    #[allow(missing_docs)]
    pub r8: u64,
    #[allow(missing_docs)]
    pub rbp: u64,
    #[allow(missing_docs)]
    pub rdi: u64,
    #[allow(missing_docs)]
    pub rsi: u64,
    #[allow(missing_docs)]
    pub rdx: u64,
    #[allow(missing_docs)]
    pub rcx: u64,
    #[allow(missing_docs)]
    pub rbx: u64,
    #[allow(missing_docs)]
    pub rax: u64,
    /// The vector number, pushed by the per-vector stub.
    pub vector: u64,
    /// The CPU's error code, or 0 for vectors without one.
    pub error_code: u64,
    /// Pushed by the CPU.
    pub rip: u64,
    #[allow(missing_docs)]
    pub cs: u64,
    #[allow(missing_docs)]
    pub rflags: u64,
    #[allow(missing_docs)]
    pub rsp: u64,
    #[allow(missing_docs)]
    pub ss: u64,
}

/// A device interrupt handler. Runs with interrupts disabled on the interrupt IST stack; keep
/// it short (note the event; the main loop does the work). EOI is sent by the dispatcher.
pub type Handler = fn(vector: u8);

/// Registered handlers by vector, as `fn` addresses (0 = free).
static HANDLERS: [AtomicUsize; 256] = [const { AtomicUsize::new(0) }; 256];
/// Interrupts received per vector.
static COUNTS: [AtomicU64; 256] = [const { AtomicU64::new(0) }; 256];
/// Vectors whose source ends the interrupt itself (a Hyper-V SINT in AutoEOI mode): a LAPIC
/// EOI there would end some other in-service interrupt instead.
static AUTO_EOI: [AtomicBool; 256] = [const { AtomicBool::new(false) }; 256];
/// Bumped by every interrupt: lets the idle loop notice "something happened".
static EVENTS: AtomicU64 = AtomicU64::new(0);

fn no_op_handler(_vector: u8) {}

/// Installs the GDT/TSS/IDT. Called once at boot with interrupts disabled.
pub fn init() {
    // SAFETY: called once on the boot CPU with interrupts off (kernel init order); the stub
    // table is the 256 × 16-byte block defined in the global_asm above.
    unsafe {
        descriptors::load(
            core::ptr::addr_of!(tandem_interrupt_stubs) as u64,
            STUB_STRIDE,
        );
    }
    HANDLERS[usize::from(TIMER_VECTOR)].store(no_op_handler as Handler as usize, Ordering::Relaxed);
}

/// Reserves a free device vector and installs `handler` on it.
pub fn allocate_vector(handler: Handler) -> Result<u8, KernelError> {
    for vector in FIRST_DEVICE_VECTOR..=LAST_DEVICE_VECTOR {
        if HANDLERS[usize::from(vector)]
            .compare_exchange(
                0,
                handler as Handler as usize,
                Ordering::AcqRel,
                Ordering::Relaxed,
            )
            .is_ok()
        {
            return Ok(vector);
        }
    }
    Err(KernelError::NoFreeVector)
}

/// Reserves a vector for the Hyper-V SynIC interrupt (SINT). With `auto_eoi` the hypervisor
/// ends each interrupt as it delivers it (TLFS §11.8.4), so the dispatcher sends no LAPIC EOI.
pub fn allocate_synic_vector(handler: Handler, auto_eoi: bool) -> Result<u8, KernelError> {
    let vector = allocate_vector(handler)?;
    AUTO_EOI[usize::from(vector)].store(auto_eoi, Ordering::Release);
    Ok(vector)
}

/// Releases a vector obtained from [`allocate_vector`] or [`allocate_synic_vector`].
pub fn free_vector(vector: u8) {
    if (FIRST_DEVICE_VECTOR..=LAST_DEVICE_VECTOR).contains(&vector) {
        HANDLERS[usize::from(vector)].store(0, Ordering::Release);
        AUTO_EOI[usize::from(vector)].store(false, Ordering::Release);
    }
}

/// The MSI/MSI-X message (address, data) that delivers `vector` to the boot CPU
/// (Intel SDM Vol. 3A §11.11: fixed delivery, edge, physical destination).
pub fn msi_message(vector: u8) -> (u64, u32) {
    let apic_id = u64::from(apic::id());
    (0xfee0_0000 | (apic_id << 12), u32::from(vector))
}

/// How many interrupts `vector` has received.
pub fn count(vector: u8) -> u64 {
    COUNTS[usize::from(vector)].load(Ordering::Relaxed)
}

/// A counter that changes whenever any interrupt arrives.
pub fn event_counter() -> u64 {
    EVENTS.load(Ordering::Acquire)
}

#[unsafe(no_mangle)]
extern "C" fn tandem_interrupt_dispatch(frame: &mut InterruptFrame) {
    let vector = frame.vector as u8;
    COUNTS[usize::from(vector)].fetch_add(1, Ordering::Relaxed);
    match vector {
        0..=31 => exception(frame),
        SPURIOUS_VECTOR => {}
        v if (PIC_BASE_VECTOR..PIC_BASE_VECTOR + 16).contains(&v) => {}
        _ => {
            let handler = HANDLERS[usize::from(vector)].load(Ordering::Acquire);
            if handler != 0 {
                // SAFETY: only `Handler` function pointers are ever stored in HANDLERS.
                let handler: Handler = unsafe { core::mem::transmute::<usize, Handler>(handler) };
                handler(vector);
            }
            EVENTS.fetch_add(1, Ordering::Release);
            if !AUTO_EOI[usize::from(vector)].load(Ordering::Acquire) {
                apic::end_of_interrupt();
            }
        }
    }
}

const EXCEPTION_NAMES: [&str; 32] = [
    "divide error",
    "debug",
    "non-maskable interrupt",
    "breakpoint",
    "overflow",
    "bound range exceeded",
    "invalid opcode",
    "device not available",
    "double fault",
    "coprocessor segment overrun",
    "invalid TSS",
    "segment not present",
    "stack-segment fault",
    "general protection fault",
    "page fault",
    "reserved",
    "x87 floating-point error",
    "alignment check",
    "machine check",
    "SIMD floating-point error",
    "virtualization exception",
    "control protection exception",
    "reserved",
    "reserved",
    "reserved",
    "reserved",
    "reserved",
    "reserved",
    "hypervisor injection exception",
    "VMM communication exception",
    "security exception",
    "reserved",
];

fn exception(frame: &InterruptFrame) -> ! {
    let vector = frame.vector as usize;
    let cr2 = cpu::read_cr2();
    crate::console::emergency_print(format_args!(
        "EXCEPTION: {} (vector {}) error code {:#x}\n  RIP {:#018x} CS {:#x} RFLAGS {:#x} RSP {:#018x} SS {:#x}\n  CR2 {:#018x} CR3 {:#018x}\n  RAX {:#018x} RBX {:#018x} RCX {:#018x} RDX {:#018x}\n  RSI {:#018x} RDI {:#018x} RBP {:#018x}\n  R8  {:#018x} R9  {:#018x} R10 {:#018x} R11 {:#018x}\n  R12 {:#018x} R13 {:#018x} R14 {:#018x} R15 {:#018x}\n",
        EXCEPTION_NAMES[vector & 31],
        vector,
        frame.error_code,
        frame.rip,
        frame.cs,
        frame.rflags,
        frame.rsp,
        frame.ss,
        cr2,
        cpu::read_cr3(),
        frame.rax,
        frame.rbx,
        frame.rcx,
        frame.rdx,
        frame.rsi,
        frame.rdi,
        frame.rbp,
        frame.r8,
        frame.r9,
        frame.r10,
        frame.r11,
        frame.r12,
        frame.r13,
        frame.r14,
        frame.r15,
    ));
    if vector == 14 {
        let code = frame.error_code;
        crate::console::emergency_print(format_args!(
            "  page fault: {} access to {:#x} ({}{})\n",
            if code & 2 != 0 {
                "write"
            } else if code & 16 != 0 {
                "instruction fetch"
            } else {
                "read"
            },
            cr2,
            if code & 1 != 0 {
                "protection violation"
            } else {
                "page not present"
            },
            if code & 8 != 0 {
                ", reserved bit set"
            } else {
                ""
            },
        ));
    }
    crate::exit::exit(EXCEPTION_EXIT_CODE)
}
