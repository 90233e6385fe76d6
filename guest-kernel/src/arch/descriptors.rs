//! GDT, TSS (with an IST stack for every vector) and IDT, built with the `x86_64` crate.
//!
//! Prebuilt `core` for the host target uses the red zone, so an interrupt must never push its
//! frame onto the interrupted stack: every IDT entry names an IST stack, and the CPU switches
//! to it unconditionally. Interrupt gates keep interrupts off while a handler runs, so one IST
//! stack per class of vector suffices; NMI, double fault and machine check get their own
//! because they can arrive while another handler runs.
//!
//! The IDT is a plain array of the crate's gate entries rather than its
//! `InterruptDescriptorTable`: that type keeps the reserved vectors (15, 22-27, 31) private,
//! and our stubs cover all 256 vectors, so a stray `int` or a misprogrammed device vector lands
//! in a handler that names it instead of a #NP.

use core::mem::size_of;

use x86_64::VirtAddr;
use x86_64::instructions::segmentation::{CS, DS, ES, SS, Segment};
use x86_64::instructions::tables::{lidt, load_tss};
use x86_64::structures::DescriptorTablePointer;
use x86_64::structures::gdt::{Descriptor, GlobalDescriptorTable, SegmentSelector};
use x86_64::structures::idt::{Entry, HandlerFunc};
use x86_64::structures::tss::TaskStateSegment;

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
const VECTORS: usize = 256;

#[repr(C, align(16))]
struct IstStacks([[u8; IST_STACK_SIZE]; IST_STACKS]);

/// Only the CPU touches these (through the TSS); Rust only takes their addresses.
static mut IST_STACK_MEMORY: IstStacks = IstStacks([[0; IST_STACK_SIZE]; IST_STACKS]);

static TSS: spin::Once<TaskStateSegment> = spin::Once::new();
static GDT: spin::Once<GlobalDescriptorTable> = spin::Once::new();
static IDT: spin::Once<[Entry<HandlerFunc>; VECTORS]> = spin::Once::new();

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

fn task_state_segment() -> TaskStateSegment {
    let stacks = VirtAddr::from_ptr(&raw const IST_STACK_MEMORY);
    // The TSS is packed: fill a copy of the table, then store it whole.
    let mut interrupt_stack_table = [VirtAddr::zero(); 7];
    for (index, top) in interrupt_stack_table[..IST_STACKS].iter_mut().enumerate() {
        *top = (stacks + ((index + 1) * IST_STACK_SIZE) as u64).align_down(16u64);
    }
    let mut tss = TaskStateSegment::new();
    tss.interrupt_stack_table = interrupt_stack_table;
    tss
}

fn global_descriptor_table(tss: &'static TaskStateSegment) -> GlobalDescriptorTable {
    let mut gdt = GlobalDescriptorTable::new();
    let code = gdt.append(Descriptor::kernel_code_segment());
    let data = gdt.append(Descriptor::kernel_data_segment());
    let task = gdt.append(Descriptor::tss_segment(tss));
    // The selectors are public constants (and the boot code's layout): keep them in step.
    assert_eq!(
        (code.0, data.0, task.0),
        (KERNEL_CODE_SELECTOR, KERNEL_DATA_SELECTOR, TSS_SELECTOR)
    );
    gdt
}

/// Loads the GDT and TSS and an IDT whose entry `n` jumps to `stub_base + n * stub_stride`.
///
/// # Safety
/// Must be called once, early, on the boot CPU, with interrupts disabled; `stub_base` must be
/// the address of 256 interrupt stubs laid out `stub_stride` bytes apart.
pub unsafe fn load(stub_base: u64, stub_stride: u64) {
    let tss = TSS.call_once(task_state_segment);
    GDT.call_once(|| global_descriptor_table(tss)).load();
    // SAFETY: the GDT just loaded holds these selectors (checked when it was built): a 64-bit
    // code segment, a data segment and an available TSS; interrupts are off (caller contract).
    unsafe {
        CS::set_reg(SegmentSelector(KERNEL_CODE_SELECTOR));
        DS::set_reg(SegmentSelector(KERNEL_DATA_SELECTOR));
        ES::set_reg(SegmentSelector(KERNEL_DATA_SELECTOR));
        SS::set_reg(SegmentSelector(KERNEL_DATA_SELECTOR));
        load_tss(SegmentSelector(TSS_SELECTOR));
    }

    let idt = IDT.call_once(|| {
        let mut entries = [Entry::<HandlerFunc>::missing(); VECTORS];
        for (vector, entry) in entries.iter_mut().enumerate() {
            let handler = VirtAddr::new(stub_base + vector as u64 * stub_stride);
            // SAFETY: `handler` is stub `vector` (caller contract), which saves the machine
            // state and handles that vector's error code; IST slots 1-5 were set in the TSS
            // above. The gate is a present DPL-0 interrupt gate on the current (kernel) CS.
            unsafe {
                entry
                    .set_handler_addr(handler)
                    .set_stack_index(u16::from(ist_for_vector(vector)) - 1);
            }
        }
        entries
    });
    let pointer = DescriptorTablePointer {
        limit: (size_of::<[Entry<HandlerFunc>; VECTORS]>() - 1) as u16,
        base: VirtAddr::from_ptr(idt.as_ptr()),
    };
    // SAFETY: `idt` is a static that is never modified again, holding valid gates (above).
    unsafe { lidt(&pointer) };
}
