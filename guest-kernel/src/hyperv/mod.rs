//! Hyper-V detection (CPUID "Microsoft Hv"), its TSC frequency MSR and the reference TSC page.
//!
//! Facts from the Hyper-V Top-Level Functional Specification (TLFS) 6.0b: §2.4 (hypervisor
//! CPUID leaves 0x4000_0000–0x4000_0005), §2.4.4 (partition privileges and feature flags in
//! leaf 0x4000_0003), §12.4 (partition reference counter MSR), §12.7 (reference TSC page).
//! KVM offers the same interface when QEMU runs it with `hv-*` CPU flags.
//!
//! The decoding and the arithmetic are plain functions over fakeable inputs (CPUID results,
//! page snapshots) so they are unit-tested on the host; only the MSR accesses are unsafe.
//!
//! Submodules: [`abi`] (hypercall and SynIC encodings, pure), [`synic`] (the enlightenments
//! VMBus needs: hypercall page, post/signal, SynIC pages, SINT 2; the only other `unsafe`) and
//! [`bringup`] (which synthetic NIC to start and what the console says, pure), [`port`] (the
//! `vmbus::HypervisorPort` the VMBus client runs on) and [`vmbus_hub`] (the one VMBus client
//! shared by netvsc and vPCI, generic over the port).

pub mod abi;
pub mod bringup;
#[cfg(not(any(test, feature = "host")))]
pub mod port;
#[cfg(not(any(test, feature = "host")))]
pub mod synic;
pub mod vmbus_hub;
pub mod vpci_vf;

use core::arch::x86_64::CpuidResult;

use bitflags::bitflags;

/// CPUID leaf 1, ECX bit 31: a hypervisor is present (its leaves start at 0x4000_0000).
const CPUID_HYPERVISOR_PRESENT: u32 = 1 << 31;
/// CPUID leaf: highest hypervisor leaf (EAX) and vendor signature (EBX, ECX, EDX).
pub const CPUID_VENDOR_AND_MAX_LEAF: u32 = 0x4000_0000;
/// CPUID leaf: hypervisor interface signature (EAX).
pub const CPUID_INTERFACE: u32 = 0x4000_0001;
/// CPUID leaf: hypervisor version (EAX build, EBX major.minor).
pub const CPUID_VERSION: u32 = 0x4000_0002;
/// CPUID leaf: partition privileges (EAX low, EBX high) and feature flags (EDX).
pub const CPUID_FEATURES: u32 = 0x4000_0003;
/// A Hyper-V-compatible hypervisor implements at least the leaves up to this one (TLFS §2.4.1).
const CPUID_MIN_MAX_LEAF: u32 = 0x4000_0005;
/// "Microsoft Hv" as CPUID returns it in EBX, ECX, EDX.
const VENDOR_SIGNATURE: &[u8; 12] = b"Microsoft Hv";
/// "Hv#1": the Microsoft hypervisor interface, in EAX of leaf 0x4000_0001.
const INTERFACE_SIGNATURE: u32 = u32::from_le_bytes(*b"Hv#1");

/// MSR: partition reference counter, 100 ns units since the partition was created.
pub const MSR_TIME_REF_COUNT: u32 = 0x4000_0020;
/// MSR: reference TSC page location (bits 63:12 page number, bit 0 enable).
pub const MSR_REFERENCE_TSC: u32 = 0x4000_0021;
/// MSR: TSC frequency in Hz.
pub const MSR_TSC_FREQUENCY: u32 = 0x4000_0022;
/// MSR: local APIC timer frequency in Hz.
pub const MSR_APIC_FREQUENCY: u32 = 0x4000_0023;

/// Enable bit of [`MSR_REFERENCE_TSC`].
const REFERENCE_TSC_ENABLE: u64 = 1;
/// Bits 11:1 of [`MSR_REFERENCE_TSC`] are reserved and must be written back as read.
const REFERENCE_TSC_RESERVED: u64 = 0xffe;

/// Lowest and highest TSC frequency we believe (1 MHz – 100 GHz).
const PLAUSIBLE_TSC_HZ: core::ops::RangeInclusive<u64> = 1_000_000..=100_000_000_000;
/// Reference time ticks per second (100 ns units).
const REFERENCE_TICKS_PER_SECOND: u128 = 10_000_000;
/// How often a page read is retried while the hypervisor updates it.
const SEQUENCE_RETRIES: usize = 64;

bitflags! {
    /// Partition privileges: CPUID 0x4000_0003 EAX (bits 0–31) and EBX (32–63) (TLFS §2.4.4).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Privileges: u64 {
        /// The virtual processor run-time MSR.
        const ACCESS_VP_RUNTIME = 1 << 0;
        /// The partition reference counter MSR (0x4000_0020).
        const ACCESS_PARTITION_REFERENCE_COUNTER = 1 << 1;
        /// The synthetic interrupt controller MSRs.
        const ACCESS_SYNIC = 1 << 2;
        /// The synthetic timer MSRs.
        const ACCESS_SYNTHETIC_TIMERS = 1 << 3;
        /// The APIC access MSRs (EOI, ICR, TPR).
        const ACCESS_APIC_MSRS = 1 << 4;
        /// The hypercall MSRs (guest OS id, hypercall page).
        const ACCESS_HYPERCALL = 1 << 5;
        /// The virtual processor index MSR.
        const ACCESS_VP_INDEX = 1 << 6;
        /// The reset MSR.
        const ACCESS_RESET = 1 << 7;
        /// The statistics pages.
        const ACCESS_STATS = 1 << 8;
        /// The reference TSC page MSR (0x4000_0021).
        const ACCESS_PARTITION_REFERENCE_TSC = 1 << 9;
        /// The guest idle MSR.
        const ACCESS_GUEST_IDLE = 1 << 10;
        /// The TSC and APIC frequency MSRs (0x4000_0022/23).
        const ACCESS_FREQUENCY_MSRS = 1 << 11;
        /// The debug MSRs.
        const ACCESS_DEBUG = 1 << 12;
        /// Post messages to the host (VMBus).
        const POST_MESSAGES = 1 << 36;
        /// Signal events to the host (VMBus).
        const SIGNAL_EVENTS = 1 << 37;
    }
}

bitflags! {
    /// Feature flags: CPUID 0x4000_0003 EDX (TLFS §2.4.4).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Features: u32 {
        /// Guest debugging support.
        const GUEST_DEBUGGING = 1 << 1;
        /// Performance monitor support.
        const PERFORMANCE_MONITORS = 1 << 2;
        /// Fast hypercalls may pass input in XMM registers.
        const XMM_HYPERCALL_INPUT = 1 << 4;
        /// The guest idle state is supported.
        const GUEST_IDLE = 1 << 5;
        /// The TSC and APIC frequencies can be read from MSRs.
        const FREQUENCY_MSRS_AVAILABLE = 1 << 8;
        /// Synthetic machine checks.
        const SYNTHETIC_MACHINE_CHECK = 1 << 9;
        /// Guest crash MSRs.
        const GUEST_CRASH_MSRS = 1 << 10;
    }
}

/// What the Hyper-V interface offers this partition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HyperV {
    /// Highest hypervisor CPUID leaf.
    pub max_leaf: u32,
    /// Hypervisor build number (CPUID 0x4000_0002 EAX).
    pub build: u32,
    /// Hypervisor major version.
    pub major: u16,
    /// Hypervisor minor version.
    pub minor: u16,
    /// Partition privileges.
    pub privileges: Privileges,
    /// Feature flags.
    pub features: Features,
}

impl HyperV {
    /// Decodes the hypervisor leaves; `cpuid` answers one leaf (subleaf 0). `None` unless the
    /// CPU reports a hypervisor that identifies as "Microsoft Hv" with the "Hv#1" interface.
    pub fn from_cpuid(cpuid: impl Fn(u32) -> CpuidResult) -> Option<HyperV> {
        if cpuid(1).ecx & CPUID_HYPERVISOR_PRESENT == 0 {
            return None;
        }
        let vendor = cpuid(CPUID_VENDOR_AND_MAX_LEAF);
        let mut signature = [0u8; 12];
        signature[0..4].copy_from_slice(&vendor.ebx.to_le_bytes());
        signature[4..8].copy_from_slice(&vendor.ecx.to_le_bytes());
        signature[8..12].copy_from_slice(&vendor.edx.to_le_bytes());
        if &signature != VENDOR_SIGNATURE
            || !(CPUID_MIN_MAX_LEAF..=0x4000_00ff).contains(&vendor.eax)
            || cpuid(CPUID_INTERFACE).eax != INTERFACE_SIGNATURE
        {
            return None;
        }
        let version = cpuid(CPUID_VERSION);
        let features = cpuid(CPUID_FEATURES);
        Some(HyperV {
            max_leaf: vendor.eax,
            build: version.eax,
            major: (version.ebx >> 16) as u16,
            minor: version.ebx as u16,
            privileges: Privileges::from_bits_retain(
                u64::from(features.eax) | (u64::from(features.ebx) << 32),
            ),
            features: Features::from_bits_retain(features.edx),
        })
    }

    /// True when [`MSR_TSC_FREQUENCY`] may be read: the partition has the privilege and the
    /// hypervisor says the MSRs are implemented (both checked, as reading a missing MSR faults).
    pub fn has_frequency_msrs(&self) -> bool {
        self.privileges.contains(Privileges::ACCESS_FREQUENCY_MSRS)
            && self.features.contains(Features::FREQUENCY_MSRS_AVAILABLE)
    }

    /// True when [`MSR_REFERENCE_TSC`] may be written.
    pub fn has_reference_tsc(&self) -> bool {
        self.privileges
            .contains(Privileges::ACCESS_PARTITION_REFERENCE_TSC)
    }

    /// True when the partition may use VMBus (the synthetic NIC, netvsc, needs it): SynIC and
    /// hypercall MSRs. The PostMessages/SignalEvents bits are not required: OpenVMM's KVM backend
    /// leaves them clear while both hypercalls work, and Linux never checks them; a hypervisor
    /// that really refuses answers the hypercall with access denied, which bring-up reports.
    pub fn has_vmbus(&self) -> bool {
        self.privileges
            .contains(Privileges::ACCESS_SYNIC | Privileges::ACCESS_HYPERCALL)
    }
}

/// A frequency read from the hypervisor, if believable.
fn plausible_hz(hz: u64) -> Option<u64> {
    PLAUSIBLE_TSC_HZ.contains(&hz).then_some(hz)
}

/// The TSC frequency implied by a reference page's scale: the page converts TSC ticks to 100 ns
/// units as `tsc * scale / 2^64`, so `scale = 2^64 * 10^7 / tsc_hz`.
pub fn tsc_hz_from_scale(scale: u64) -> Option<u64> {
    if scale == 0 {
        return None;
    }
    let hz = (REFERENCE_TICKS_PER_SECOND << 64) / u128::from(scale);
    plausible_hz(u64::try_from(hz).ok()?)
}

/// Reference time (100 ns units) for a TSC value: `((tsc * scale) >> 64) + offset` (TLFS §12.7.3.2).
pub fn reference_time(tsc: u64, scale: u64, offset: i64) -> u64 {
    let scaled = ((u128::from(tsc) * u128::from(scale)) >> 64) as u64;
    scaled.wrapping_add(offset as u64)
}

/// One read of the reference page's fields, sequence first and last.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageSample {
    /// `TscSequence` before reading scale and offset.
    pub sequence_before: u32,
    /// `TscScale`.
    pub scale: u64,
    /// `TscOffset`.
    pub offset: i64,
    /// `TscSequence` after.
    pub sequence_after: u32,
}

/// Scale and offset from a consistent snapshot of the reference page, or `None` when the page
/// is invalid (sequence 0: the hypervisor wants the reference counter MSR used instead) or kept
/// changing for [`SEQUENCE_RETRIES`] reads.
pub fn consistent_scale_offset(mut sample: impl FnMut() -> PageSample) -> Option<(u64, i64)> {
    for _ in 0..SEQUENCE_RETRIES {
        let read = sample();
        if read.sequence_before == 0 || read.sequence_before == u32::MAX {
            return None;
        }
        if read.sequence_before == read.sequence_after {
            return Some((read.scale, read.offset));
        }
    }
    None
}

/// The value to write to [`MSR_REFERENCE_TSC`] to place the page at `page_phys`, keeping the
/// reserved bits of `current`.
pub fn reference_tsc_msr_value(current: u64, page_phys: u64) -> u64 {
    (page_phys & !0xfff) | (current & REFERENCE_TSC_RESERVED) | REFERENCE_TSC_ENABLE
}

#[cfg(not(any(test, feature = "host")))]
pub use hardware::{ReferenceTsc, detect};

#[cfg(not(any(test, feature = "host")))]
mod hardware {
    use net_device::{DmaAllocator, DmaRegion};

    use super::*;
    use crate::KernelError;
    use crate::arch::cpu;
    use crate::mm::heap::KernelDma;

    /// Byte offsets in the reference TSC page (TLFS §12.7.2: u32 sequence, u32 reserved,
    /// u64 scale, i64 offset).
    const PAGE_SEQUENCE: usize = 0;
    const PAGE_SCALE: usize = 8;
    const PAGE_OFFSET: usize = 16;

    /// Detects Hyper-V (or a hypervisor offering its interface) from CPUID.
    pub fn detect() -> Option<HyperV> {
        HyperV::from_cpuid(|leaf| cpu::cpuid(leaf, 0))
    }

    impl HyperV {
        /// The TSC frequency from [`MSR_TSC_FREQUENCY`], when the MSR exists and its value is
        /// plausible.
        pub fn tsc_frequency_hz(&self) -> Option<u64> {
            if !self.has_frequency_msrs() {
                return None;
            }
            // SAFETY: the MSR exists: CPUID 0x4000_0003 grants the privilege and reports the
            // frequency MSRs available (checked just above). Reading it has no side effects.
            plausible_hz(unsafe { cpu::rdmsr(MSR_TSC_FREQUENCY) })
        }

        /// The local APIC timer frequency from [`MSR_APIC_FREQUENCY`], under the same
        /// conditions.
        pub fn apic_frequency_hz(&self) -> Option<u64> {
            if !self.has_frequency_msrs() {
                return None;
            }
            // SAFETY: as for the TSC frequency: same privilege and feature bit, checked above.
            let hz = unsafe { cpu::rdmsr(MSR_APIC_FREQUENCY) };
            (1_000..=100_000_000_000).contains(&hz).then_some(hz)
        }

        /// Allocates a page, asks the hypervisor to place the reference TSC page there and
        /// returns it once it holds valid data. Dropping the result turns the page off again.
        pub fn enable_reference_tsc(&self) -> Result<ReferenceTsc, KernelError> {
            if !self.has_reference_tsc() {
                return Err(KernelError::BadFirmwareTable {
                    table: "Hyper-V CPUID",
                    reason: "no reference TSC privilege",
                });
            }
            let page = KernelDma
                .allocate(4096, 4096)
                .ok_or(KernelError::OutOfMemory {
                    purpose: "Hyper-V reference TSC page",
                })?;
            // SAFETY: the privilege bit (checked above) says the MSR exists; reading it has no
            // side effects.
            let current = unsafe { cpu::rdmsr(MSR_REFERENCE_TSC) };
            // SAFETY: the MSR exists (above). The value names a page-aligned frame of RAM that
            // `page` owns exclusively and keeps allocated until `ReferenceTsc::drop` has
            // disabled the overlay again; reserved bits are preserved as the TLFS requires.
            unsafe {
                cpu::wrmsr(
                    MSR_REFERENCE_TSC,
                    reference_tsc_msr_value(current, page.phys().0),
                )
            };
            let reference = ReferenceTsc { page, current };
            if reference.scale_offset().is_none() {
                // The hypervisor left the page invalid (sequence 0): the reference counter
                // MSR would have to be used instead. Drop disables the page.
                return Err(KernelError::BadFirmwareTable {
                    table: "Hyper-V reference TSC page",
                    reason: "page invalid (sequence 0) after enabling",
                });
            }
            Ok(reference)
        }
    }

    /// The enabled reference TSC page: time in 100 ns units from the TSC alone, no exit.
    #[derive(Debug)]
    pub struct ReferenceTsc {
        page: DmaRegion,
        /// The MSR's value before we enabled the page (written back on drop).
        current: u64,
    }

    impl ReferenceTsc {
        fn sample(&self) -> PageSample {
            let sequence =
                |page: &DmaRegion| page.read_volatile_u64(PAGE_SEQUENCE).unwrap_or(0) as u32;
            let sequence_before = sequence(&self.page);
            let scale = self.page.read_volatile_u64(PAGE_SCALE).unwrap_or(0);
            let offset = self.page.read_volatile_u64(PAGE_OFFSET).unwrap_or(0) as i64;
            PageSample {
                sequence_before,
                scale,
                offset,
                sequence_after: sequence(&self.page),
            }
        }

        fn scale_offset(&self) -> Option<(u64, i64)> {
            consistent_scale_offset(|| self.sample())
        }

        /// The TSC frequency implied by the page's scale.
        pub fn tsc_frequency_hz(&self) -> Option<u64> {
            tsc_hz_from_scale(self.scale_offset()?.0)
        }

        /// Partition reference time in 100 ns units, or `None` while the page is invalid
        /// (e.g. during live migration; then [`MSR_TIME_REF_COUNT`] is the fallback).
        pub fn now_100ns(&self) -> Option<u64> {
            let (scale, offset) = self.scale_offset()?;
            Some(reference_time(cpu::rdtsc(), scale, offset))
        }
    }

    impl Drop for ReferenceTsc {
        fn drop(&mut self) {
            // SAFETY: the MSR exists (we wrote it when creating `self`); writing back the old
            // value removes the overlay before `page` returns its frame to the pool.
            unsafe { cpu::wrmsr(MSR_REFERENCE_TSC, self.current & !REFERENCE_TSC_ENABLE) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;
    use std::collections::HashMap;

    fn regs(eax: u32, ebx: u32, ecx: u32, edx: u32) -> CpuidResult {
        CpuidResult { eax, ebx, ecx, edx }
    }

    fn text(bytes: &[u8]) -> u32 {
        u32::from_le_bytes(bytes.try_into().unwrap())
    }

    /// A Hyper-V-like CPUID: signature, interface and version as the TLFS lays them out, privilege
    /// and feature bits chosen to exercise the decoding.
    fn hyperv_leaves() -> HashMap<u32, CpuidResult> {
        HashMap::from([
            (1, regs(0x000a_0f11, 0, 0xfed8_3203, 0x178b_fbff)),
            (
                0x4000_0000,
                regs(0x4000_000b, text(b"Micr"), text(b"osof"), text(b"t Hv")),
            ),
            (0x4000_0001, regs(text(b"Hv#1"), 0, 0, 0)),
            (0x4000_0002, regs(20348, 0x000a_0000, 0, 0)),
            // EAX: privilege bits 0–7, 9–11 and 13; EBX: post messages, signal events; EDX: bit 8 among
            // others.
            (
                0x4000_0003,
                regs(0x2eff, 0x0000_0030, 0x0000_0002, 0x0000_0d3e),
            ),
        ])
    }

    fn from(leaves: &HashMap<u32, CpuidResult>) -> Option<HyperV> {
        HyperV::from_cpuid(|leaf| leaves.get(&leaf).copied().unwrap_or(regs(0, 0, 0, 0)))
    }

    #[test]
    fn hyperv_is_detected_with_its_version_and_privileges() {
        let hyperv = from(&hyperv_leaves()).expect("Hyper-V detected");
        assert_eq!(hyperv.max_leaf, 0x4000_000b);
        assert_eq!((hyperv.build, hyperv.major, hyperv.minor), (20348, 10, 0));
        assert!(hyperv.has_frequency_msrs());
        assert!(hyperv.has_reference_tsc());
        assert!(hyperv.has_vmbus());
        assert!(
            hyperv
                .privileges
                .contains(Privileges::ACCESS_PARTITION_REFERENCE_COUNTER)
        );
    }

    #[test]
    fn other_hypervisors_and_bare_metal_are_not_hyperv() {
        let mut kvm = hyperv_leaves();
        kvm.insert(
            0x4000_0000,
            regs(0x4000_0001, text(b"KVMK"), text(b"VMKV"), text(b"M\0\0\0")),
        );
        assert_eq!(from(&kvm), None);

        let mut bare_metal = hyperv_leaves();
        bare_metal.insert(1, regs(0x000a_0f11, 0, 0x7ed8_3203, 0x178b_fbff));
        assert_eq!(from(&bare_metal), None, "hypervisor-present bit clear");

        let mut wrong_interface = hyperv_leaves();
        wrong_interface.insert(0x4000_0001, regs(text(b"Xbnv"), 0, 0, 0));
        assert_eq!(from(&wrong_interface), None);

        let mut too_few_leaves = hyperv_leaves();
        too_few_leaves.get_mut(&0x4000_0000).unwrap().eax = 0x4000_0001;
        assert_eq!(from(&too_few_leaves), None);
    }

    #[test]
    fn frequency_msrs_need_both_the_privilege_and_the_feature_bit() {
        let mut leaves = hyperv_leaves();
        leaves.get_mut(&0x4000_0003).unwrap().edx &= !(1 << 8);
        assert!(!from(&leaves).unwrap().has_frequency_msrs());
        let mut leaves = hyperv_leaves();
        leaves.get_mut(&0x4000_0003).unwrap().eax &= !(1 << 11);
        let hyperv = from(&leaves).unwrap();
        assert!(!hyperv.has_frequency_msrs());
        assert!(hyperv.has_reference_tsc());
    }

    #[test]
    fn reference_page_scale_converts_to_the_tsc_frequency_and_time() {
        // 2.5 GHz TSC: scale = 2^64 * 10^7 / 2.5e9.
        let scale = ((10_000_000u128 << 64) / 2_500_000_000u128) as u64;
        assert_eq!(tsc_hz_from_scale(scale), Some(2_500_000_000));
        assert_eq!(tsc_hz_from_scale(0), None);
        assert_eq!(tsc_hz_from_scale(1), None, "overflows: implausible");
        assert_eq!(
            tsc_hz_from_scale(u64::MAX),
            Some(10_000_000),
            "the slowest TSC a scale can express"
        );
        // One second of TSC ticks is 10^7 reference ticks, plus the offset.
        assert_eq!(reference_time(2_500_000_000, scale, 0), 9_999_999);
        assert_eq!(reference_time(2_500_000_000, scale, 1_000), 10_000_999);
        assert_eq!(reference_time(2_500_000_000, scale, -999_999), 9_000_000);
    }

    #[test]
    fn page_reads_retry_while_the_sequence_changes_and_give_up_when_invalid() {
        let calls = Cell::new(0u32);
        let result = consistent_scale_offset(|| {
            calls.set(calls.get() + 1);
            let changing = calls.get() < 3;
            PageSample {
                sequence_before: 5,
                scale: 42,
                offset: -7,
                sequence_after: if changing { 6 } else { 5 },
            }
        });
        assert_eq!(result, Some((42, -7)));
        assert_eq!(calls.get(), 3);

        let invalid = PageSample {
            sequence_before: 0,
            scale: 42,
            offset: 0,
            sequence_after: 0,
        };
        assert_eq!(consistent_scale_offset(|| invalid), None);

        let always_changing = Cell::new(1u32);
        let result = consistent_scale_offset(|| {
            always_changing.set(always_changing.get() + 1);
            PageSample {
                sequence_before: always_changing.get(),
                scale: 1,
                offset: 0,
                sequence_after: always_changing.get() + 1,
            }
        });
        assert_eq!(result, None, "bounded: gives up");
    }

    #[test]
    fn msr_value_keeps_reserved_bits_and_sets_enable() {
        assert_eq!(reference_tsc_msr_value(0, 0x1234_5000), 0x1234_5001);
        assert_eq!(
            reference_tsc_msr_value(0xdead_b000 | 0xffe, 0x7000),
            0x7000 | 0xffe | 1,
            "old page number dropped, reserved bits kept"
        );
    }
}
