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
    /// KVM's paravirtual clock (pvclock scaling factors).
    KvmClock,
    /// The hypervisor's timing leaf (CPUID 0x4000_0010: KVM, VMware).
    HypervisorLeaf,
    /// CPUID 0x15 (crystal ratio).
    Cpuid15,
    /// CPUID 0x16 (base frequency).
    Cpuid16,
    /// Measured against the 8254 PIT.
    Pit,
    /// Hyper-V's TSC and APIC frequency MSRs (no PIT needed: Gen2 VMs have none).
    HyperVFrequencyMsrs,
    /// The scale of Hyper-V's reference TSC page.
    HyperVReferencePage,
    /// Nothing to measure against (no PIT, no CPUID or hypervisor frequency): a guess.
    Assumed,
}

/// How the clock was calibrated, for the boot banner (logged once logging is up).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Calibration {
    /// Where the TSC frequency came from.
    pub source: ClockSource,
    /// Whether an 8254 PIT answered (Gen2 Hyper-V, microvm with `pit=off`: none).
    pub pit: PitPresence,
    /// Where the LAPIC timer rate came from.
    pub apic_timer: ClockSource,
}

/// Whether the 8254 PIT was there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PitPresence {
    /// It counted.
    Counting,
    /// It never counted (no PIT: ports read as all-ones).
    Absent,
    /// Not probed (the hypervisor gave both rates).
    NotProbed,
}

impl core::fmt::Display for Calibration {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{:?}", self.source)?;
        match self.pit {
            PitPresence::Counting => {}
            PitPresence::Absent => write!(f, ", no PIT")?,
            PitPresence::NotProbed => write!(f, ", PIT not probed")?,
        }
        if self.apic_timer != self.source {
            write!(f, ", APIC timer from {:?}", self.apic_timer)?;
        }
        Ok(())
    }
}

const PIT_HZ: u64 = 1_193_182;
/// TSC ticks after which PIT calibration gives up (2^33: 1.7 s at 5 GHz, 8.6 s at 1 GHz; far
/// beyond the 10 ms a counting PIT needs, even on a host that deschedules the vCPU).
const CALIBRATION_TSC_LIMIT: u64 = 1 << 33;
const CALIBRATION_MS: u64 = 10;
/// Samples in a row with the same PIT count after which there is no PIT: a real one changes
/// every 0.84 us and one sample takes microseconds, so 1000 unchanged ones mean nothing counts.
const PIT_ABSENT_AFTER_UNCHANGED_SAMPLES: u32 = 1000;
/// LAPIC timer rate assumed when nothing can measure it (1 GHz bus / 16); deadlines are
/// re-checked against the TSC anyway.
const ASSUMED_APIC_TICKS_PER_MS: u64 = 62_500;
/// TSC frequency assumed when nothing gives or measures it.
const ASSUMED_TSC_HZ: u64 = 2_000_000_000;

/// KVM's paravirtual clock MSR (MSR_KVM_SYSTEM_TIME_NEW): physical address of a
/// `pvclock_vcpu_time_info` | enable bit.
const MSR_KVM_SYSTEM_TIME_NEW: u32 = 0x4b56_4d01;
/// CPUID 0x4000_0001 EAX bit: the MSR above exists.
const KVM_FEATURE_CLOCKSOURCE2: u32 = 1 << 3;

/// The pvclock structure KVM fills in (Linux `pvclock_vcpu_time_info`).
#[repr(C, align(64))]
struct PvclockTimeInfo {
    version: u32,
    pad0: u32,
    tsc_timestamp: u64,
    system_time: u64,
    tsc_to_system_mul: u32,
    tsc_shift: i8,
    flags: u8,
    pad: [u8; 2],
}

static mut KVMCLOCK_PAGE: PvclockTimeInfo = PvclockTimeInfo {
    version: 0,
    pad0: 0,
    tsc_timestamp: 0,
    system_time: 0,
    tsc_to_system_mul: 0,
    tsc_shift: 0,
    flags: 0,
    pad: [0; 2],
};

/// Reads the TSC frequency from KVM's pvclock (kvmclock), then turns the clock page off again
/// (we keep time with the TSC ourselves).
fn tsc_hz_from_kvmclock() -> Option<u64> {
    let signature = cpu::cpuid(0x4000_0000, 0);
    let kvm = signature.ebx == u32::from_le_bytes(*b"KVMK")
        && signature.ecx == u32::from_le_bytes(*b"VMKV")
        && signature.edx == u32::from_le_bytes(*b"M\0\0\0");
    if !kvm || signature.eax < 0x4000_0001 {
        return None;
    }
    if cpu::cpuid(0x4000_0001, 0).eax & KVM_FEATURE_CLOCKSOURCE2 == 0 {
        return None;
    }
    let page = &raw mut KVMCLOCK_PAGE;
    // The kernel image is identity-mapped, so the static's address is its physical address.
    // SAFETY: the MSR exists (feature bit checked); KVM writes the structure at that address,
    // which is ours, 64-byte aligned, and stays valid until we disable it below.
    unsafe { cpu::wrmsr(MSR_KVM_SYSTEM_TIME_NEW, page as u64 | 1) };
    let mut result = None;
    for _ in 0..1000 {
        // SAFETY: volatile reads of plain integers KVM writes; version odd = update in progress.
        let (version, mul, shift, version_after) = unsafe {
            let version = core::ptr::read_volatile(&raw const (*page).version);
            core::sync::atomic::fence(core::sync::atomic::Ordering::Acquire);
            let mul = core::ptr::read_volatile(&raw const (*page).tsc_to_system_mul);
            let shift = core::ptr::read_volatile(&raw const (*page).tsc_shift);
            core::sync::atomic::fence(core::sync::atomic::Ordering::Acquire);
            (
                version,
                mul,
                shift,
                core::ptr::read_volatile(&raw const (*page).version),
            )
        };
        if version != 0 && version % 2 == 0 && version == version_after {
            result = crate::pvclock::tsc_hz_from_pvclock(mul, shift);
            break;
        }
    }
    // SAFETY: writing 0 disables the pvclock page.
    unsafe { cpu::wrmsr(MSR_KVM_SYSTEM_TIME_NEW, 0) };
    result
}

fn tsc_hz_from_cpuid() -> Option<(u64, ClockSource)> {
    if let Some(hz) = tsc_hz_from_kvmclock() {
        return Some((hz, ClockSource::KvmClock));
    }
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

/// One reading of PIT channel 2's counter, bracketed by two TSC reads. Only readings whose
/// bracket is tight are used, so a host preempting the vCPU (emulation on a busy machine) can
/// stretch the calibration window but never skew it.
#[derive(Clone, Copy)]
struct PitSample {
    tsc: u64,
    count: u16,
    apic: u32,
}

fn read_pit_sample() -> PitSample {
    let mut best: Option<(u64, PitSample)> = None;
    for _ in 0..8 {
        let before = cpu::rdtsc();
        // SAFETY: latching and reading PIT channel 2's count has no side effects beyond the
        // latch itself (ports 0x42/0x43 exist on every PC-compatible machine).
        let count = unsafe {
            port::outb(0x43, 0x80); // latch channel 2
            let low = port::inb(0x42);
            let high = port::inb(0x42);
            u16::from_le_bytes([low, high])
        };
        let apic = apic::current_count();
        let after = cpu::rdtsc();
        let bracket = after.wrapping_sub(before);
        let sample = PitSample {
            tsc: before + bracket / 2,
            count,
            apic,
        };
        if best.is_none_or(|(tightest, _)| bracket < tightest) {
            best = Some((bracket, sample));
        }
    }
    best.map_or(
        PitSample {
            tsc: cpu::rdtsc(),
            count: 0,
            apic: 0,
        },
        |(_, sample)| sample,
    )
}

/// Measures the TSC and LAPIC-timer rates against PIT channel 2 counting down from 0xFFFF
/// (mode 2) for about 10 ms of PIT time. Returns (tsc_hz, apic_ticks_per_ms), or `None` if the
/// PIT does not count (then there is none).
fn calibrate_with_pit() -> Option<(u64, u64)> {
    // SAFETY: ports 0x42/0x43/0x61 are PIT channel 2 and its gate; the speaker stays off.
    unsafe {
        let gate = port::inb(0x61) & !0x03;
        port::outb(0x61, gate);
        port::outb(0x43, 0xb4); // channel 2, lobyte/hibyte, mode 2 (rate generator)
        port::outb(0x42, 0xff);
        port::outb(0x42, 0xff);
        port::outb(0x61, gate | 0x01);
    }
    apic::start_free_running(u32::MAX);
    let wanted_ticks = PIT_HZ * CALIBRATION_MS / 1000;
    let first = read_pit_sample();
    let mut last = first;
    let mut elapsed_ticks = 0u64;
    let mut unchanged = 0u32;
    for _ in 0..5_000_000u32 {
        let sample = read_pit_sample();
        // Each sample is a few port exits; where exits are slow (nested virtualisation) the
        // step count alone would wait for hours on a PIT that does not count, so the TSC
        // bounds the wait too (seconds at any plausible TSC rate).
        if sample.tsc.wrapping_sub(first.tsc) > CALIBRATION_TSC_LIMIT {
            break;
        }
        if sample.count == last.count {
            unchanged += 1;
            if elapsed_ticks == 0 && unchanged >= PIT_ABSENT_AFTER_UNCHANGED_SAMPLES {
                break;
            }
        } else {
            unchanged = 0;
        }
        // Down-counter: ticks passed since the previous sample (one wrap at most, since a
        // wrap takes 55 ms and samples are microseconds apart unless preempted).
        elapsed_ticks += u64::from(last.count.wrapping_sub(sample.count));
        last = sample;
        if elapsed_ticks >= wanted_ticks {
            break;
        }
    }
    apic::disarm();
    if elapsed_ticks < wanted_ticks {
        return None;
    }
    let tsc_ticks = last.tsc.wrapping_sub(first.tsc);
    let tsc_hz = u128::from(tsc_ticks) * u128::from(PIT_HZ) / u128::from(elapsed_ticks);
    let apic_ticks = u128::from(first.apic.saturating_sub(last.apic));
    let apic_per_ms = apic_ticks * u128::from(PIT_HZ) / u128::from(elapsed_ticks) / 1000;
    Some((tsc_hz as u64, apic_per_ms as u64))
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

/// Measures the LAPIC timer (divide by 16) against a TSC of known frequency for about 10 ms.
fn calibrate_apic_with_tsc(tsc_hz: u64) -> u64 {
    apic::start_free_running(u32::MAX);
    let wanted = tsc_hz * CALIBRATION_MS / 1000;
    let start_tsc = cpu::rdtsc();
    let start_count = apic::current_count();
    let mut elapsed = 0;
    // Bounded twice: by the TSC (always advancing) and by a spin count.
    for _ in 0..100_000_000u32 {
        elapsed = cpu::rdtsc().wrapping_sub(start_tsc);
        if elapsed >= wanted {
            break;
        }
        core::hint::spin_loop();
    }
    let end_count = apic::current_count();
    apic::disarm();
    let ticks = u128::from(start_count.saturating_sub(end_count));
    let per_ms = ticks * u128::from(tsc_hz) / u128::from(elapsed.max(1)) / 1000;
    u64::try_from(per_ms).unwrap_or(ASSUMED_APIC_TICKS_PER_MS)
}

/// The TSC frequency from Hyper-V's reference TSC page scale (enabled, read, disabled again).
fn tsc_hz_from_hyperv_page(hyper_v: &crate::hyperv::HyperV) -> Option<u64> {
    hyper_v.enable_reference_tsc().ok()?.tsc_frequency_hz()
}

/// Calibrates the clock. Called once at boot after the APIC is up. On Hyper-V the frequency
/// MSRs give both rates and the PIT is not touched (Gen2 VMs have none); elsewhere the PIT
/// measures the LAPIC timer, and a missing PIT is noticed within a thousand reads.
pub fn init() -> Calibration {
    let hyper_v = crate::hyperv::detect();
    if let Some(hyper_v) = &hyper_v
        && let (Some(tsc_hz), Some(apic_hz)) =
            (hyper_v.tsc_frequency_hz(), hyper_v.apic_frequency_hz())
    {
        set_tsc_hz(tsc_hz);
        APIC_TICKS_PER_MS.store((apic_hz / 16 / 1000).max(1), Ordering::Relaxed);
        return Calibration {
            source: ClockSource::HyperVFrequencyMsrs,
            pit: PitPresence::NotProbed,
            apic_timer: ClockSource::HyperVFrequencyMsrs,
        };
    }
    let measured = calibrate_with_pit();
    let from_cpuid = tsc_hz_from_cpuid().or_else(|| {
        let hz = tsc_hz_from_hyperv_page(hyper_v.as_ref()?)?;
        Some((hz, ClockSource::HyperVReferencePage))
    });
    let (hz, source) = match (from_cpuid, measured) {
        (Some((hz, source)), _) => (hz, source),
        (None, Some((hz, _))) => (hz, ClockSource::Pit),
        (None, None) => (ASSUMED_TSC_HZ, ClockSource::Assumed),
    };
    set_tsc_hz(hz.max(1_000_000));
    let (apic_per_ms, apic_timer) = match (measured, source) {
        (Some((_, apic_per_ms)), _) => (apic_per_ms, ClockSource::Pit),
        (None, ClockSource::Assumed) => (ASSUMED_APIC_TICKS_PER_MS, ClockSource::Assumed),
        (None, source) => (calibrate_apic_with_tsc(tsc_frequency()), source),
    };
    APIC_TICKS_PER_MS.store(apic_per_ms.max(1), Ordering::Relaxed);
    Calibration {
        source,
        pit: if measured.is_some() {
            PitPresence::Counting
        } else {
            PitPresence::Absent
        },
        apic_timer,
    }
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
    // Spin briefly with interrupts on before halting: a reply or the next frame of a burst
    // usually arrives within microseconds, and waking a halted vCPU costs the host a thread
    // wake-up, which dominated small round trips.
    cpu::enable_interrupts();
    let spin_until = now_ns().saturating_add(SPIN_BEFORE_HALT_NS);
    while now_ns() < spin_until {
        if interrupts::event_counter() != events {
            LAST_SEEN_EVENTS.store(interrupts::event_counter(), Ordering::Relaxed);
            return;
        }
        core::hint::spin_loop();
    }
    cpu::disable_interrupts();
    if interrupts::event_counter() != events {
        LAST_SEEN_EVENTS.store(interrupts::event_counter(), Ordering::Relaxed);
        cpu::enable_interrupts();
        return;
    }
    cpu::enable_interrupts_and_halt();
    LAST_SEEN_EVENTS.store(interrupts::event_counter(), Ordering::Relaxed);
}

/// How long `wait_for_event` polls for an interrupt before halting the CPU.
const SPIN_BEFORE_HALT_NS: u64 = 50_000;

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
