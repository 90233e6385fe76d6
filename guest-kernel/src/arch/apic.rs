//! The local APIC (xAPIC MMIO mode): enable, end-of-interrupt, one-shot timer.

use net_device::RegisterIo;
use x86_64::registers::model_specific::{ApicBase, ApicBaseFlags};

use crate::mm::mmio::MmioRegion;

/// Local APIC ID register.
const REG_ID: usize = 0x20;
/// End-of-interrupt register.
const REG_EOI: usize = 0xb0;
/// Spurious-interrupt vector register (bit 8 = APIC software enable).
const REG_SPURIOUS: usize = 0xf0;
/// LVT timer register.
const REG_LVT_TIMER: usize = 0x320;
/// LVT LINT0/LINT1 and error registers.
const REG_LVT_LINT0: usize = 0x350;
const REG_LVT_LINT1: usize = 0x360;
const REG_LVT_ERROR: usize = 0x370;
/// Timer initial count.
const REG_TIMER_INITIAL: usize = 0x380;
/// Timer current count.
const REG_TIMER_CURRENT: usize = 0x390;
/// Timer divide configuration.
const REG_TIMER_DIVIDE: usize = 0x3e0;

const LVT_MASKED: u32 = 1 << 16;
const DIVIDE_BY_16: u32 = 0b0011;

/// Mapped once at init; read lock-free afterwards (interrupt handlers send EOI through it).
static REGISTERS: spin::Once<MmioRegion> = spin::Once::new();

fn registers() -> Option<&'static MmioRegion> {
    REGISTERS.get()
}

fn read(offset: usize) -> u32 {
    registers().map_or(0, |apic| apic.read32(offset))
}

fn write(offset: usize, value: u32) {
    if let Some(apic) = registers() {
        apic.write32(offset, value);
    }
}

/// Enables the local APIC with the given spurious vector and masks its local interrupt lines.
/// Also remaps and masks the legacy 8259 PICs so they can never deliver on exception vectors.
pub fn init(spurious_vector: u8, pic_base: u8) {
    // SAFETY: the ports are the 8259 PIC's, which every PC-compatible machine (and QEMU q35)
    // has; the ICW sequence remaps the vectors and the final writes mask every line.
    unsafe {
        use super::port::outb;
        outb(0x20, 0x11);
        outb(0xa0, 0x11);
        outb(0x21, pic_base);
        outb(0xa1, pic_base + 8);
        outb(0x21, 4);
        outb(0xa1, 2);
        outb(0x21, 1);
        outb(0xa1, 1);
        outb(0x21, 0xff);
        outb(0xa1, 0xff);
    }
    let (frame, flags) = ApicBase::read();
    // SAFETY: setting the global enable bit keeps the base address unchanged.
    unsafe { ApicBase::write(frame, flags | ApicBaseFlags::LAPIC_ENABLE) };
    let base = frame.start_address().as_u64();
    match MmioRegion::map(base, 4096) {
        Ok(region) => {
            REGISTERS.call_once(|| region);
        }
        Err(error) => {
            log::error!("cannot map the local APIC at {base:#x}: {error}");
            return;
        }
    }
    write(REG_SPURIOUS, 0x100 | u32::from(spurious_vector));
    write(REG_LVT_LINT0, LVT_MASKED);
    write(REG_LVT_LINT1, LVT_MASKED);
    write(REG_LVT_ERROR, LVT_MASKED);
    write(REG_TIMER_DIVIDE, DIVIDE_BY_16);
    write(REG_LVT_TIMER, LVT_MASKED);
}

/// This CPU's APIC ID (0 before `init`).
pub fn id() -> u8 {
    (read(REG_ID) >> 24) as u8
}

/// Signals end of interrupt.
pub fn end_of_interrupt() {
    write(REG_EOI, 0);
}

/// Starts the timer counting down from `count` (divide by 16) without interrupting.
pub fn start_free_running(count: u32) {
    write(REG_LVT_TIMER, LVT_MASKED);
    write(REG_TIMER_INITIAL, count);
}

/// The timer's current count.
pub fn current_count() -> u32 {
    read(REG_TIMER_CURRENT)
}

/// Arms a one-shot timer interrupt on `vector` after `count` timer ticks (divide by 16).
pub fn arm_one_shot(vector: u8, count: u32) {
    write(REG_LVT_TIMER, u32::from(vector));
    write(REG_TIMER_INITIAL, count.max(1));
}

/// Stops the timer.
pub fn disarm() {
    write(REG_TIMER_INITIAL, 0);
}
