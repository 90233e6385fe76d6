//! GDT, TSS (with an IST stack for every vector) and IDT.
//!
//! Prebuilt `core` for the host target uses the red zone, so an interrupt must never push its
//! frame onto the interrupted stack: every IDT entry names an IST stack, and the CPU switches
//! to it unconditionally. Interrupt gates keep interrupts off while a handler runs, so one IST
//! stack per class of vector suffices; NMI, double fault and machine check get their own
//! because they can arrive while another handler runs.

use core::arch::asm;
use core::mem::size_of;

/// Kernel code segment selector.
pub const KERNEL_CODE_SELECTOR: u16 = 0x08;
/// Kernel data segment selector.
pub const KERNEL_DATA_SELECTOR: u16 = 0x10;
const TSS_SELECTOR: u16 = 0x18;

/// IST slot (1-based, as the IDT encodes it) for ordinary CPU exceptions.
pub const IST_EXCEPTION: u8 = 1;
/// IST slot for non-maskable interrupts.
pub const IST_NMI: u8 = 2;
/// IST slot for double faults.
pub const IST_DOUBLE_FAULT: u8 = 3;
/// IST slot for machine checks.
pub const IST_MACHINE_CHECK: u8 = 4;
/// IST slot for device and timer interrupts.
pub const IST_INTERRUPT: u8 = 5;

const IST_STACK_SIZE: usize = 32 * 1024;
const IST_STACKS: usize = 5;

#[repr(C, align(16))]
struct IstStacks([[u8; IST_STACK_SIZE]; IST_STACKS]);

static mut IST_STACK_MEMORY: IstStacks = IstStacks([[0; IST_STACK_SIZE]; IST_STACKS]);

/// The 64-bit task-state segment (Intel SDM Vol. 3A §8.7).
#[repr(C, packed(4))]
struct TaskStateSegment {
    reserved0: u32,
    privilege_stacks: [u64; 3],
    reserved1: u64,
    interrupt_stacks: [u64; 7],
    reserved2: u64,
    reserved3: u16,
    io_map_base: u16,
}

const _: () = assert!(size_of::<TaskStateSegment>() == 104);

static mut TSS: TaskStateSegment = TaskStateSegment {
    reserved0: 0,
    privilege_stacks: [0; 3],
    reserved1: 0,
    interrupt_stacks: [0; 7],
    reserved2: 0,
    reserved3: 0,
    io_map_base: size_of::<TaskStateSegment>() as u16,
};

static mut GDT: [u64; 5] = [
    0,
    0x00AF_9A00_0000_FFFF, // 64-bit code, DPL 0
    0x00CF_9200_0000_FFFF, // data, DPL 0
    0,                     // TSS low (filled in at init)
    0,                     // TSS high
];

/// One 16-byte IDT gate descriptor (Intel SDM Vol. 3A §6.14.1).
#[derive(Clone, Copy)]
#[repr(C)]
struct IdtEntry {
    offset_low: u16,
    selector: u16,
    ist: u8,
    type_attributes: u8,
    offset_middle: u16,
    offset_high: u32,
    reserved: u32,
}

const _: () = assert!(size_of::<IdtEntry>() == 16);

static mut IDT: [IdtEntry; 256] = [IdtEntry {
    offset_low: 0,
    selector: 0,
    ist: 0,
    type_attributes: 0,
    offset_middle: 0,
    offset_high: 0,
    reserved: 0,
}; 256];

#[repr(C, packed(2))]
struct DescriptorTablePointer {
    limit: u16,
    base: u64,
}

/// Which IST stack a vector uses.
fn ist_for_vector(vector: usize) -> u8 {
    match vector {
        2 => IST_NMI,
        8 => IST_DOUBLE_FAULT,
        18 => IST_MACHINE_CHECK,
        0..=31 => IST_EXCEPTION,
        _ => IST_INTERRUPT,
    }
}

/// Loads the GDT and TSS and an IDT whose entry `n` jumps to `stub_base + n * stub_stride`.
///
/// # Safety
/// Must be called once, early, on the boot CPU, with interrupts disabled; `stub_base` must be
/// the address of 256 interrupt stubs laid out `stub_stride` bytes apart.
pub unsafe fn load(stub_base: u64, stub_stride: u64) {
    // SAFETY: single-threaded early boot with interrupts off (caller contract), so nothing else
    // touches these statics; the pointers we take stay valid forever (statics).
    unsafe {
        let tss = &raw mut TSS;
        let stacks = &raw mut IST_STACK_MEMORY;
        for index in 0..IST_STACKS {
            let top = (&raw mut (*stacks).0[index]) as u64 + IST_STACK_SIZE as u64;
            (*tss).interrupt_stacks[index] = top & !0xf;
        }
        let tss_base = tss as u64;
        let limit = (size_of::<TaskStateSegment>() - 1) as u64;
        let low = (limit & 0xffff)
            | ((tss_base & 0xff_ffff) << 16)
            | (0x89 << 40) // present, type 9 = available 64-bit TSS
            | ((limit & 0xf_0000) << 32)
            | ((tss_base & 0xff00_0000) << 32);
        let gdt = &raw mut GDT;
        (*gdt)[3] = low;
        (*gdt)[4] = tss_base >> 32;

        let gdt_pointer = DescriptorTablePointer {
            limit: (size_of::<[u64; 5]>() - 1) as u16,
            base: gdt as u64,
        };
        asm!("lgdt [{}]", in(reg) &gdt_pointer, options(readonly, nostack, preserves_flags));
        // Reload CS with a far return, then the data segments and the task register.
        asm!(
            "push {code}",
            "lea {scratch}, [rip + 2f]",
            "push {scratch}",
            "retfq",
            "2:",
            "mov ds, {data:x}",
            "mov es, {data:x}",
            "mov ss, {data:x}",
            "ltr {tss:x}",
            code = in(reg) u64::from(KERNEL_CODE_SELECTOR),
            data = in(reg) u64::from(KERNEL_DATA_SELECTOR),
            tss = in(reg) u64::from(TSS_SELECTOR),
            scratch = out(reg) _,
        );

        let idt = &raw mut IDT;
        for vector in 0..256usize {
            let handler = stub_base + vector as u64 * stub_stride;
            (*idt)[vector] = IdtEntry {
                offset_low: handler as u16,
                selector: KERNEL_CODE_SELECTOR,
                ist: ist_for_vector(vector),
                type_attributes: 0x8e, // present, DPL 0, 64-bit interrupt gate
                offset_middle: (handler >> 16) as u16,
                offset_high: (handler >> 32) as u32,
                reserved: 0,
            };
        }
        let idt_pointer = DescriptorTablePointer {
            limit: (size_of::<[IdtEntry; 256]>() - 1) as u16,
            base: idt as u64,
        };
        asm!("lidt [{}]", in(reg) &idt_pointer, options(readonly, nostack, preserves_flags));
    }
}
