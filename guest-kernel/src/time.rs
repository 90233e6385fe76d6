//! The monotonic clock (calibrated TSC), deadlines, and halting until an interrupt or deadline.

use core::sync::atomic::{AtomicU64, Ordering};

use crate::arch::{apic, cpu, port};
use crate::interrupts;

static TSC_START: AtomicU64 = AtomicU64::new(0);
/// Nanoseconds per TSC tick as a 32.32 fixed-point multiplier.
static TSC_TO_NS_MULTIPLIER: AtomicU64 = AtomicU64::new(1 << 32);
static TSC_HZ: AtomicU64 = AtomicU64::new(0);
/// LAPIC timer ticks (after divide-by-16) per millisecond.
static APIC_TICKS_PER_MS: AtomicU64 = AtomicU64::new(0);
/// Interrupt event count the last `wait_for_event` returned with.
static LAST_SEEN_EVENTS: AtomicU64 = AtomicU64::new(0);

/// Where the TSC frequency came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClockSource {
    /// The hypervisor's timing leaf (CPUID 0x4000_0010: KVM, VMware).
    HypervisorLeaf,
    /// CPUID 0x15 (crystal ratio).
    Cpuid15,
    /// CPUID 0x16 (base frequency).
    Cpuid16,
    /// Measured against the 8254 PIT.
    Pit,
    /// Hyper-V reference TSC frequency MSR.
    HyperV,
}

const PIT_HZ: u64 = 1_193_182;
const CALIBRATION_MS: u64 = 10;

fn tsc_hz_from_cpuid() -> Option<(u64, ClockSource)> {
    let hypervisor = cpu::cpuid(0x4000_0000, 0);
    if hypervisor.eax >= 0x4000_0010 {
        let timing = cpu::cpuid(0x4000_0010, 0);
        if timing.eax != 0 {
            return Some((u64::from(timing.eax) * 1000, ClockSource::HypervisorLeaf));
        }
    }
    let max_leaf = cpu::cpuid(0, 0).eax;
    if max_leaf >= 0x15 {
        let leaf = cpu::cpuid(0x15, 0);
        if leaf.eax != 0 && leaf.ebx != 0 && leaf.ecx != 0 {
            return Some((
                u64::from(leaf.ecx) * u64::from(leaf.ebx) / u64::from(leaf.eax),
                ClockSource::Cpuid15,
            ));
        }
    }
    if max_leaf >= 0x16 {
        let leaf = cpu::cpuid(0x16, 0);
        if leaf.eax & 0xffff != 0 {
            return Some((
                u64::from(leaf.eax & 0xffff) * 1_000_000,
                ClockSource::Cpuid16,
            ));
        }
    }
    None
}

/// Measures TSC and LAPIC-timer rates over a 10 ms PIT channel-2 one-shot. Returns
/// (tsc_hz, apic_ticks_per_ms), or `None` if the PIT never finished (then no PIT exists).
fn calibrate_with_pit() -> Option<(u64, u64)> {
    let count = (PIT_HZ * CALIBRATION_MS / 1000) as u16;
    // SAFETY: ports 0x42/0x43/0x61 are the PIT channel 2 and its gate on every PC-compatible
    // machine; the speaker output stays off.
    let (start_tsc, start_apic) = unsafe {
        let gate = port::inb(0x61) & !0x03;
        port::outb(0x61, gate);
        port::outb(0x43, 0xb0); // channel 2, lobyte/hibyte, mode 0 (interrupt on terminal count)
        port::outb(0x42, count as u8);
        port::outb(0x42, (count >> 8) as u8);
        apic::start_free_running(u32::MAX);
        port::outb(0x61, gate | 0x01);
        (cpu::rdtsc(), apic::current_count())
    };
    let mut finished = false;
    for _ in 0..50_000_000u32 {
        // SAFETY: reading the PIT gate/status port has no side effects.
        if unsafe { port::inb(0x61) } & 0x20 != 0 {
            finished = true;
            break;
        }
    }
    let end_tsc = cpu::rdtsc();
    let end_apic = apic::current_count();
    apic::disarm();
    if !finished {
        return None;
    }
    let tsc_hz = (end_tsc - start_tsc) * 1000 / CALIBRATION_MS;
    let apic_per_ms = u64::from(start_apic.saturating_sub(end_apic)) / CALIBRATION_MS;
    Some((tsc_hz, apic_per_ms))
}

fn set_tsc_hz(hz: u64) {
    TSC_HZ.store(hz, Ordering::Relaxed);
    TSC_TO_NS_MULTIPLIER.store(
        ((1_000_000_000u128 << 32) / u128::from(hz)) as u64,
        Ordering::Relaxed,
    );
}

/// Marks time zero (kernel entry), before anything else runs.
pub fn mark_boot() {
    TSC_START.store(cpu::rdtsc(), Ordering::Relaxed);
}

/// Calibrates the clock. Called once at boot after the APIC is up.
pub fn init() -> ClockSource {
    let measured = calibrate_with_pit();
    let (hz, source) = match (tsc_hz_from_cpuid(), measured) {
        (Some((hz, source)), _) => (hz, source),
        (None, Some((hz, _))) => (hz, ClockSource::Pit),
        (None, None) => {
            log::warn!("no PIT and no CPUID frequency: assuming a 2 GHz TSC");
            (2_000_000_000, ClockSource::Pit)
        }
    };
    set_tsc_hz(hz.max(1_000_000));
    let apic_per_ms = match measured {
        Some((measured_hz, apic_ticks)) if measured_hz > 0 => {
            // Rescale in case the PIT window was stretched (slow emulation): ticks per TSC ms.
            apic_ticks * measured_hz / hz.max(1)
        }
        _ => 62_500, // 1 GHz bus / 16: a guess; deadlines are re-checked against the TSC anyway
    };
    APIC_TICKS_PER_MS.store(apic_per_ms.max(1), Ordering::Relaxed);
    source
}

/// Overrides the TSC frequency (e.g. from the Hyper-V frequency MSR).
pub fn set_frequency(hz: u64) {
    if hz >= 1_000_000 {
        set_tsc_hz(hz);
    }
}

/// TSC frequency in Hz.
pub fn tsc_frequency() -> u64 {
    TSC_HZ.load(Ordering::Relaxed)
}

/// Nanoseconds since boot.
pub fn now_ns() -> u64 {
    let ticks = cpu::rdtsc().wrapping_sub(TSC_START.load(Ordering::Relaxed));
    ((u128::from(ticks) * u128::from(TSC_TO_NS_MULTIPLIER.load(Ordering::Relaxed))) >> 32) as u64
}

/// Sleeps until an interrupt arrives (one that has not been seen by a previous call) or the
/// deadline passes. A network poll loop calls this when it has nothing to do.
pub fn wait_for_event(deadline_ns: Option<u64>) {
    cpu::disable_interrupts();
    let events = interrupts::event_counter();
    if events != LAST_SEEN_EVENTS.load(Ordering::Relaxed) {
        LAST_SEEN_EVENTS.store(events, Ordering::Relaxed);
        cpu::enable_interrupts();
        return;
    }
    if let Some(deadline) = deadline_ns {
        let now = now_ns();
        if deadline <= now {
            cpu::enable_interrupts();
            return;
        }
        let ticks_per_ms = APIC_TICKS_PER_MS.load(Ordering::Relaxed);
        let ticks = u128::from(deadline - now) * u128::from(ticks_per_ms) / 1_000_000;
        apic::arm_one_shot(
            interrupts::TIMER_VECTOR,
            ticks.clamp(1, u128::from(u32::MAX)) as u32,
        );
    }
    cpu::enable_interrupts_and_halt();
    LAST_SEEN_EVENTS.store(interrupts::event_counter(), Ordering::Relaxed);
}

/// Sleeps until `deadline_ns` (other interrupts are serviced meanwhile).
pub fn sleep_until(deadline_ns: u64) {
    while now_ns() < deadline_ns {
        wait_for_event(Some(deadline_ns));
    }
}

/// Busy-waits for `microseconds` (for hardware settle times during bring-up only).
pub fn delay_us(microseconds: u64) {
    let deadline = now_ns() + microseconds * 1000;
    while now_ns() < deadline {
        core::hint::spin_loop();
    }
}
