//! The Hyper-V enlightenments VMBus needs: guest OS id, hypercall page, HvPostMessage,
//! HvSignalEvent, the SynIC message and event-flag pages and SINT 2 on a vector of ours.
//!
//! This is the only place that writes Hyper-V MSRs or makes hypercalls; the values it writes
//! come from the pure functions in [`super::abi`]. Bring-up order (TLFS §3.13, §11.8; reference
//! `hyperv-vmbus-netvsc.md` §1.4): guest OS id, hypercall page, SIMP, SIEFP, SINT 2, SCONTROL.
//! Dropping a [`Synic`] undoes it in reverse before its pages go back to the frame pool.

use alloc::format;
use alloc::string::ToString;
use core::arch::asm;
use core::sync::atomic::{AtomicU64, Ordering};

use net_device::{DmaAllocator, DmaRegion};
use spin::Mutex;
use zerocopy::IntoBytes;

use super::abi::{self, CallCode, HvStatus, PostMessageInput, SlotRead, SynicMessage};
use super::{HyperV, Privileges};
use crate::KernelError;
use crate::arch::cpu;
use crate::mm::heap::KernelDma;
use crate::mm::paging;
use crate::{interrupts, time};

/// What the SynIC layer has done since it was enabled (shown by [`Synic::counters`]).
#[derive(Debug, Default)]
pub struct SynicCounters {
    /// SINT interrupts taken.
    pub interrupts: AtomicU64,
    /// Messages taken from the SINT 2 slot.
    pub messages: AtomicU64,
    /// Messages dropped because their header claimed more than 240 bytes.
    pub malformed_messages: AtomicU64,
    /// EOM writes (a message was pending behind the one taken).
    pub end_of_messages: AtomicU64,
    /// Event flags found set (channel signals from the host).
    pub events: AtomicU64,
    /// Messages posted.
    pub posts: AtomicU64,
    /// Post attempts repeated after a transient refusal (host queue full).
    pub post_retries: AtomicU64,
    /// Posts that finally failed.
    pub post_failures: AtomicU64,
    /// Events signalled to the host.
    pub signals: AtomicU64,
    /// Signals the hypervisor refused.
    pub signal_failures: AtomicU64,
}

/// Counters of the SynIC vector, bumped by its interrupt handler.
static SINT_INTERRUPTS: AtomicU64 = AtomicU64::new(0);

/// The SINT interrupt only wakes the event loop (the dispatcher counts it and bumps the event
/// counter); messages and event flags are taken by the loop's poll, outside interrupt context.
fn sint_interrupt(_vector: u8) {
    SINT_INTERRUPTS.fetch_add(1, Ordering::Relaxed);
}

/// A frame shared with the hypervisor.
struct SharedPage(DmaRegion);

// SAFETY: the frame is plain RAM owned by the `Synic` for its whole life. The hypercall page
// is only executed, the message and event pages are only accessed as atomics (the hypervisor
// writes them concurrently), and the post-input page only under its `Mutex`; the kernel runs
// the event loop on one CPU, and nothing here depends on which thread touches the frame.
unsafe impl Send for SharedPage {}
// SAFETY: as above: every shared access is atomic or serialised by a lock.
unsafe impl Sync for SharedPage {}

/// The SynIC the kernel enabled, for the VMBus client and the event loop.
static SYNIC: spin::Once<Synic> = spin::Once::new();

/// Enables the SynIC on first use (see [`Synic::enable`]) and keeps it for the kernel's life.
pub fn enable_once(hyper_v: &HyperV) -> Result<&'static Synic, KernelError> {
    SYNIC.try_call_once(|| Synic::enable(hyper_v))
}

/// The SynIC, if [`enable_once`] succeeded.
pub fn get() -> Option<&'static Synic> {
    SYNIC.get()
}

/// The enabled SynIC of the boot CPU with its hypercall page.
pub struct Synic {
    hypercall_page: SharedPage,
    /// The HvPostMessage input page (one post at a time).
    post_input: Mutex<SharedPage>,
    message_page: SharedPage,
    event_page: SharedPage,
    vector: u8,
    auto_eoi: bool,
    vp_index: u32,
    /// SINT 2's value before we routed it (written back on drop).
    sint_before: u64,
    counters: SynicCounters,
}

fn page(purpose: &'static str) -> Result<DmaRegion, KernelError> {
    KernelDma
        .allocate(abi::PAGE_BYTES as usize, abi::PAGE_BYTES as usize)
        .ok_or(KernelError::OutOfMemory { purpose })
}

fn refused(step: &'static str, reason: &str) -> KernelError {
    KernelError::HyperV {
        step,
        reason: reason.to_string(),
    }
}

impl Synic {
    /// Enables everything VMBus needs on the boot CPU. Fails (changing nothing) unless the
    /// partition may use the SynIC and the hypercall MSRs (see [`HyperV::has_vmbus`] for why the
    /// post-message and signal-event bits are not required).
    pub fn enable(hyper_v: &HyperV) -> Result<Synic, KernelError> {
        let needed = Privileges::ACCESS_SYNIC | Privileges::ACCESS_HYPERCALL;
        if !hyper_v.privileges.contains(needed) {
            return Err(refused(
                "privileges",
                &format!(
                    "partition lacks {:?}",
                    needed.difference(hyper_v.privileges)
                ),
            ));
        }
        let hypercall_page = page("Hyper-V hypercall page")?;
        let post_input = page("Hyper-V post-message input")?;
        let message_page = page("Hyper-V SynIC message page")?;
        let event_page = page("Hyper-V SynIC event-flags page")?;
        if !paging::is_executable(hypercall_page.phys().0) {
            return Err(refused(
                "hypercall page",
                "the frame is not executable in our page tables",
            ));
        }
        let recommendations = cpu::cpuid(abi::CPUID_RECOMMENDATIONS, 0).eax;
        let auto_eoi = abi::use_auto_eoi(recommendations);
        let vector = interrupts::allocate_synic_vector(sint_interrupt, auto_eoi)?;
        let vp_index = if hyper_v.privileges.contains(Privileges::ACCESS_VP_INDEX) {
            // SAFETY: the VP index MSR exists when the partition has its privilege (checked).
            unsafe { cpu::rdmsr(abi::MSR_VP_INDEX) as u32 }
        } else {
            0
        };

        // SAFETY: ACCESS_SYNIC (checked) grants the SynIC MSRs; reads have no side effects.
        let (simp, siefp, sint_before, scontrol) = unsafe {
            (
                cpu::rdmsr(abi::MSR_SIMP),
                cpu::rdmsr(abi::MSR_SIEFP),
                cpu::rdmsr(abi::MSR_SINT0 + u32::from(abi::VMBUS_SINT)),
                cpu::rdmsr(abi::MSR_SCONTROL),
            )
        };
        let Some(sint) = abi::sint_value(sint_before, vector, auto_eoi) else {
            interrupts::free_vector(vector);
            return Err(refused(
                "SINT",
                &format!("vector {vector:#x} below the SINT minimum"),
            ));
        };

        let major = env!("CARGO_PKG_VERSION_MAJOR").parse().unwrap_or(0);
        let minor = env!("CARGO_PKG_VERSION_MINOR").parse().unwrap_or(0);
        let patch = env!("CARGO_PKG_VERSION_PATCH").parse().unwrap_or(0);
        // SAFETY: ACCESS_HYPERCALL (checked) grants the guest OS id and hypercall MSRs; the id
        // is a non-zero open-source encoding, which the hypervisor only records.
        unsafe {
            cpu::wrmsr(
                abi::MSR_GUEST_OS_ID,
                abi::guest_os_id(major, minor, patch, 0),
            )
        };
        // SAFETY: as above, the MSR exists; reading it has no side effects.
        let hypercall_before = unsafe { cpu::rdmsr(abi::MSR_HYPERCALL) };
        let hypercall_phys = hypercall_page.phys().0;
        // SAFETY: the MSR exists (above). The page is a frame we own exclusively, zeroed,
        // page-aligned and executable in our tables (checked); the hypervisor overlays it with
        // its call stub and `Synic::drop` disables the overlay before the frame is freed.
        unsafe {
            cpu::wrmsr(
                abi::MSR_HYPERCALL,
                abi::hypercall_msr_value(hypercall_before, hypercall_phys),
            )
        };
        // SAFETY: as above.
        let hypercall_now = unsafe { cpu::rdmsr(abi::MSR_HYPERCALL) };
        if !abi::hypercall_msr_enabled_at(hypercall_now, hypercall_phys) {
            interrupts::free_vector(vector);
            // SAFETY: the guest OS id MSR exists; zero withdraws our identity again.
            unsafe { cpu::wrmsr(abi::MSR_GUEST_OS_ID, 0) };
            return Err(refused(
                "hypercall page",
                &format!(
                    "the hypervisor did not enable it (MSR reads {hypercall_now:#x}, locked: {})",
                    hypercall_now & 2 != 0
                ),
            ));
        }

        // SAFETY: the SynIC MSRs exist (above). The message and event pages are zeroed frames
        // we own exclusively and keep until `drop` has disabled them; the SINT routes to a
        // vector whose handler is installed (allocated above); order as the TLFS requires.
        unsafe {
            cpu::wrmsr(
                abi::MSR_SIMP,
                abi::synic_page_msr_value(simp, message_page.phys().0),
            );
            cpu::wrmsr(
                abi::MSR_SIEFP,
                abi::synic_page_msr_value(siefp, event_page.phys().0),
            );
            cpu::wrmsr(abi::MSR_SINT0 + u32::from(abi::VMBUS_SINT), sint);
            cpu::wrmsr(abi::MSR_SCONTROL, abi::scontrol_enabled(scontrol));
        }
        log::info!(
            "hyperv: hypercall page at {hypercall_phys:#x}, SynIC on (SINT {} -> vector {vector:#x}, {}), VP index {vp_index}",
            abi::VMBUS_SINT,
            if auto_eoi { "AutoEOI" } else { "explicit EOI" },
        );
        Ok(Synic {
            hypercall_page: SharedPage(hypercall_page),
            post_input: Mutex::new(SharedPage(post_input)),
            message_page: SharedPage(message_page),
            event_page: SharedPage(event_page),
            vector,
            auto_eoi,
            vp_index,
            sint_before,
            counters: SynicCounters::default(),
        })
    }

    /// Calls the hypervisor through the hypercall page; returns RAX. The stub follows the TLFS
    /// x64 convention: control in RCX, input in RDX, output in R8, status in RAX, the volatile
    /// registers of the C ABI clobbered.
    fn hypercall(&self, control: u64, input: u64, output: u64) -> u64 {
        let stub = self.hypercall_page.0.as_ptr() as u64;
        let rax: u64;
        // SAFETY: `stub` is the hypervisor-filled, executable hypercall page (verified in
        // `enable`, kept until drop); slow-call GPAs name pages we own.
        unsafe {
            asm!(
                "call {stub}",
                stub = in(reg) stub,
                inout("rcx") control => _,
                inout("rdx") input => _,
                inout("r8") output => _,
                out("rax") rax,
                clobber_abi("C"),
            )
        };
        rax
    }

    /// Posts one message to the host's `connection_id` (HvPostMessage, slow call) once; a
    /// transient refusal ([`HvStatus::is_transient`]) is the caller's to repeat.
    pub fn try_post_message(
        &self,
        connection_id: u32,
        message_type: u32,
        payload: &[u8],
    ) -> Result<(), HvStatus> {
        let input = PostMessageInput::new(connection_id, message_type, payload)
            .ok_or(HvStatus::INVALID_PARAMETER)?;
        let mut page = self.post_input.lock();
        let bytes = input.as_bytes();
        page.0.as_mut_slice()[..bytes.len()].copy_from_slice(bytes);
        let control = abi::control_word(CallCode::PostMessage, false);
        let status = HvStatus::from_rax(self.hypercall(control, page.0.phys().0, 0));
        if status.is_success() {
            self.counters.posts.fetch_add(1, Ordering::Relaxed);
            Ok(())
        } else if status.is_transient() {
            self.counters.post_retries.fetch_add(1, Ordering::Relaxed);
            Err(status)
        } else {
            self.counters.post_failures.fetch_add(1, Ordering::Relaxed);
            Err(status)
        }
    }

    /// [`Synic::try_post_message`], repeating a transiently refused post with bounded
    /// back-off (at most ~1.5 s in all, as Linux `vmbus_post_msg`).
    pub fn post_message(
        &self,
        connection_id: u32,
        message_type: u32,
        payload: &[u8],
    ) -> Result<(), HvStatus> {
        let mut attempt = 0;
        loop {
            let status = match self.try_post_message(connection_id, message_type, payload) {
                Ok(()) => return Ok(()),
                Err(status) => status,
            };
            match abi::post_retry_pause_us(status, attempt) {
                Some(pause) => {
                    time::delay_us(pause);
                    attempt += 1;
                }
                None => {
                    if status.is_transient() {
                        self.counters.post_failures.fetch_add(1, Ordering::Relaxed);
                    }
                    return Err(status);
                }
            }
        }
    }

    /// Tells the hypervisor where a vPCI function's MSI goes (HvRetargetDeviceInterrupt, slow
    /// call; Linux does it on every unmask, `hv_arch_irq_unmask`). The input goes through the
    /// same page as posted messages (serialised by its lock).
    pub fn retarget_device_interrupt(
        &self,
        input: &abi::RetargetDeviceInterruptInput,
    ) -> Result<(), HvStatus> {
        let mut page = self.post_input.lock();
        let bytes = input.as_bytes();
        page.0.as_mut_slice()[..bytes.len()].copy_from_slice(bytes);
        let control = abi::control_word(CallCode::RetargetDeviceInterrupt, false);
        // The hypercall itself (the one `unsafe` step) is in `hypercall`: the input GPA names
        // the page we own and just filled; there is no output.
        let status = HvStatus::from_rax(self.hypercall(control, page.0.phys().0, 0));
        if status.is_success() {
            Ok(())
        } else {
            Err(status)
        }
    }

    /// Signals event flag `flag_number` of the host's `connection_id` (HvSignalEvent, fast).
    pub fn signal_event(&self, connection_id: u32, flag_number: u16) -> Result<(), HvStatus> {
        let control = abi::control_word(CallCode::SignalEvent, true);
        let input = abi::signal_event_input(connection_id, flag_number);
        let status = HvStatus::from_rax(self.hypercall(control, input, 0));
        if status.is_success() {
            self.counters.signals.fetch_add(1, Ordering::Relaxed);
            Ok(())
        } else {
            self.counters
                .signal_failures
                .fetch_add(1, Ordering::Relaxed);
            Err(status)
        }
    }

    fn message_slot(&self) -> &[AtomicU64; abi::MESSAGE_SLOT_WORDS] {
        let offset = usize::from(abi::VMBUS_SINT) * abi::MESSAGE_SLOT_BYTES;
        // SAFETY: the message page is a 4 KiB page-aligned frame we own for `self`'s lifetime;
        // slot 2 (bytes 512..768) lies inside it and is 8-byte aligned. The hypervisor writes it
        // concurrently, which is why it is viewed as atomics and never as plain memory.
        unsafe {
            &*(self.message_page.0.as_ptr().add(offset)
                as *const [AtomicU64; abi::MESSAGE_SLOT_WORDS])
        }
    }

    fn event_flags(&self) -> &[AtomicU64; abi::EVENT_FLAG_WORDS] {
        let offset = usize::from(abi::VMBUS_SINT) * abi::MESSAGE_SLOT_BYTES;
        // SAFETY: as for the message slot: SINT 2's 256-byte flag array in our event page,
        // 8-byte aligned, written concurrently by the hypervisor.
        unsafe {
            &*(self.event_page.0.as_ptr().add(offset) as *const [AtomicU64; abi::EVENT_FLAG_WORDS])
        }
    }

    /// Takes the next VMBus message from SINT 2's slot, writing EOM when another is queued.
    /// A malformed slot is a counted drop and a log line.
    pub fn poll_message(&self) -> Option<SynicMessage> {
        let end_of_message = || {
            self.counters
                .end_of_messages
                .fetch_add(1, Ordering::Relaxed);
            // SAFETY: the EOM MSR exists while the SynIC is enabled (ours is); writing 0 only
            // tells the hypervisor the slot is free.
            unsafe { cpu::wrmsr(abi::MSR_EOM, 0) };
        };
        match abi::take_message(self.message_slot(), end_of_message) {
            SlotRead::Empty => None,
            SlotRead::Message(message) => {
                self.counters.messages.fetch_add(1, Ordering::Relaxed);
                Some(message)
            }
            SlotRead::Malformed {
                message_type,
                payload_size,
            } => {
                self.counters
                    .malformed_messages
                    .fetch_add(1, Ordering::Relaxed);
                log::warn!(
                    "hyperv: dropped a SynIC message of type {message_type} claiming {payload_size} bytes (> 240)"
                );
                None
            }
        }
    }

    /// Test-and-clears SINT 2's event flags, calling `on_flag(child_relid)` per set flag.
    pub fn take_events(&self, on_flag: impl FnMut(u32)) -> u32 {
        let count = abi::take_event_flags(self.event_flags(), on_flag);
        self.counters
            .events
            .fetch_add(u64::from(count), Ordering::Relaxed);
        count
    }

    /// Test-and-clears SINT 2's event flags word by word: `on_word(index, bits)` per word
    /// with flags set (bit n of word i = relid 64·i + n).
    pub fn take_event_words(&self, on_word: impl FnMut(usize, u64)) -> u32 {
        let count = abi::take_event_words(self.event_flags(), on_word);
        self.counters
            .events
            .fetch_add(u64::from(count), Ordering::Relaxed);
        count
    }

    /// This CPU's VP index (for INITIATE_CONTACT and OPENCHANNEL targets).
    pub fn vp_index(&self) -> u32 {
        self.vp_index
    }

    /// The interrupt vector SINT 2 is routed to.
    pub fn vector(&self) -> u8 {
        self.vector
    }

    /// True when the hypervisor ends SINT interrupts itself.
    pub fn auto_eoi(&self) -> bool {
        self.auto_eoi
    }

    /// The counters, with the interrupt count brought up to date.
    pub fn counters(&self) -> &SynicCounters {
        self.counters
            .interrupts
            .store(SINT_INTERRUPTS.load(Ordering::Relaxed), Ordering::Relaxed);
        &self.counters
    }
}

impl core::fmt::Display for SynicCounters {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        write!(
            f,
            "interrupts {} messages {} malformed {} eom {} events {} posts {} post-retries {} post-failures {} signals {} signal-failures {}",
            get(&self.interrupts),
            get(&self.messages),
            get(&self.malformed_messages),
            get(&self.end_of_messages),
            get(&self.events),
            get(&self.posts),
            get(&self.post_retries),
            get(&self.post_failures),
            get(&self.signals),
            get(&self.signal_failures),
        )
    }
}

impl Drop for Synic {
    fn drop(&mut self) {
        // SAFETY: the MSRs exist (written in `enable`). Masking SINT 2 and disabling SCONTROL,
        // SIEFP, SIMP and the hypercall page stop the hypervisor writing or overlaying our
        // frames before the fields' drops hand them back to the pool.
        unsafe {
            let sint = abi::MSR_SINT0 + u32::from(abi::VMBUS_SINT);
            cpu::wrmsr(sint, abi::sint_masked(self.sint_before));
            let scontrol = cpu::rdmsr(abi::MSR_SCONTROL);
            cpu::wrmsr(abi::MSR_SCONTROL, abi::page_msr_disabled(scontrol));
            let siefp = cpu::rdmsr(abi::MSR_SIEFP);
            cpu::wrmsr(abi::MSR_SIEFP, abi::page_msr_disabled(siefp));
            let simp = cpu::rdmsr(abi::MSR_SIMP);
            cpu::wrmsr(abi::MSR_SIMP, abi::page_msr_disabled(simp));
            let hypercall = cpu::rdmsr(abi::MSR_HYPERCALL);
            cpu::wrmsr(abi::MSR_HYPERCALL, abi::page_msr_disabled(hypercall));
        }
        interrupts::free_vector(self.vector);
    }
}
