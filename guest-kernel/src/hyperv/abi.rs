//! Hyper-V hypercall, SynIC and guest-identity encodings as pure functions and typed layouts.
//!
//! Facts from the Hyper-V TLFS 6.0b (§3 hypercall interface, §3.13 guest OS identity, §11
//! SynIC) as summarised with sources in `shared/reference/hyperv-vmbus-netvsc.md` §1. Nothing
//! here touches hardware: MSR values are computed from the current value and a page address,
//! message slots and event-flag arrays are atomics the hypervisor and a test can both write.

use core::fmt;
use core::sync::atomic::{AtomicU64, Ordering, fence};

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// MSR: guest OS identity; must be non-zero before the hypercall page can be enabled.
pub const MSR_GUEST_OS_ID: u32 = 0x4000_0000;
/// MSR: hypercall page location (bit 0 enable, bit 1 locked, bits 63:12 page number).
pub const MSR_HYPERCALL: u32 = 0x4000_0001;
/// MSR: this virtual processor's index (read-only).
pub const MSR_VP_INDEX: u32 = 0x4000_0002;
/// MSR: SynIC control (bit 0 enable).
pub const MSR_SCONTROL: u32 = 0x4000_0080;
/// MSR: SynIC event-flags page (bit 0 enable, bits 63:12 page number).
pub const MSR_SIEFP: u32 = 0x4000_0082;
/// MSR: SynIC message page (bit 0 enable, bits 63:12 page number).
pub const MSR_SIMP: u32 = 0x4000_0083;
/// MSR: end of message; writing 0 lets the hypervisor deliver the next queued message.
pub const MSR_EOM: u32 = 0x4000_0084;
/// MSR: SINT0; SINTn is `MSR_SINT0 + n`.
pub const MSR_SINT0: u32 = 0x4000_0090;

/// CPUID leaf: implementation recommendations (EAX).
pub const CPUID_RECOMMENDATIONS: u32 = 0x4000_0004;
/// CPUID 0x4000_0004 EAX bit 9: AutoEOI is deprecated, the guest should EOI explicitly.
pub const RECOMMEND_EXPLICIT_EOI: u32 = 1 << 9;

/// The SINT VMBus uses for its messages and channel events (Linux, OpenVMM, mu_msvm).
pub const VMBUS_SINT: u8 = 2;
/// Message type of VMBus channel messages, in posted inputs and received slots (hosts check
/// it: QEMU `vmbus.c`, OpenVMM).
pub const VMBUS_MESSAGE_TYPE: u32 = 1;

/// Bytes per SynIC message slot (16 slots per page, slot n = SINT n).
pub const MESSAGE_SLOT_BYTES: usize = 256;
/// Largest message payload (slot size minus the 16-byte header).
pub const MESSAGE_PAYLOAD_MAX: usize = 240;
/// 64-bit words in one message slot.
pub const MESSAGE_SLOT_WORDS: usize = MESSAGE_SLOT_BYTES / 8;
/// 64-bit words in one SINT's event-flag array (2048 flags).
pub const EVENT_FLAG_WORDS: usize = 2048 / 64;
/// Bytes of a hypervisor page.
pub const PAGE_BYTES: u64 = 4096;

/// Enable bit shared by the hypercall, SIMP, SIEFP and SCONTROL MSRs.
const MSR_ENABLE: u64 = 1;
/// Reserved bits 11:2 of the hypercall MSR (bit 1, "locked", is read-only).
const HYPERCALL_RESERVED: u64 = 0xffc;
/// Reserved bits 11:1 of the SIMP and SIEFP MSRs.
const SYNIC_PAGE_RESERVED: u64 = 0xffe;
/// Page-number bits of page MSRs.
const PAGE_NUMBER_MASK: u64 = !0xfff;

/// SINT register: vector (bits 7:0).
const SINT_VECTOR: u64 = 0xff;
/// SINT register: masked.
const SINT_MASKED: u64 = 1 << 16;
/// SINT register: the hypervisor performs the EOI itself (AutoEOI).
const SINT_AUTO_EOI: u64 = 1 << 17;
/// SINT register: polling mode (no interrupt).
const SINT_POLLING: u64 = 1 << 18;
/// Lowest vector the hypervisor accepts for a SINT (TLFS §11.8.4: 16–255).
pub const SINT_MIN_VECTOR: u8 = 16;

/// Message slot header flags: another message is queued behind this one (write EOM).
const MESSAGE_PENDING: u8 = 1;

/// Hypercall control word (RCX): fast calls pass input in registers (bit 16).
const CONTROL_FAST: u64 = 1 << 16;

/// Guest OS ID for an open-source OS (TLFS §3.13: bit 63 set): OS type 0 "undefined" and OS id 0
/// on purpose, because OpenVMM keys host behaviour on the type (Windows VF serial semantics,
/// ring optimisations disabled for old Linux/FreeBSD) and we are none of those; bits 47:16 carry
/// our version (`major << 16 | minor << 8 | patch`), bits 15:0 the build.
pub fn guest_os_id(major: u8, minor: u8, patch: u8, build: u16) -> u64 {
    const OPEN_SOURCE: u64 = 1 << 63;
    const OS_TYPE_UNDEFINED: u64 = 0;
    const OS_ID: u64 = 0;
    let version = (u64::from(major) << 16) | (u64::from(minor) << 8) | u64::from(patch);
    OPEN_SOURCE | (OS_TYPE_UNDEFINED << 56) | (OS_ID << 48) | (version << 16) | u64::from(build)
}

/// The hypercall MSR value that places the hypercall page at `page_phys` and enables it,
/// keeping the reserved bits of `current`.
pub fn hypercall_msr_value(current: u64, page_phys: u64) -> u64 {
    (page_phys & PAGE_NUMBER_MASK) | (current & HYPERCALL_RESERVED) | MSR_ENABLE
}

/// True when a read-back hypercall MSR has the page enabled at `page_phys`.
pub fn hypercall_msr_enabled_at(value: u64, page_phys: u64) -> bool {
    value & MSR_ENABLE != 0 && value & PAGE_NUMBER_MASK == page_phys & PAGE_NUMBER_MASK
}

/// The SIMP or SIEFP MSR value that places the page at `page_phys` and enables it, keeping the
/// reserved bits of `current`.
pub fn synic_page_msr_value(current: u64, page_phys: u64) -> u64 {
    (page_phys & PAGE_NUMBER_MASK) | (current & SYNIC_PAGE_RESERVED) | MSR_ENABLE
}

/// A page MSR (hypercall, SIMP, SIEFP) with its enable bit cleared, everything else kept.
pub fn page_msr_disabled(current: u64) -> u64 {
    current & !MSR_ENABLE
}

/// SCONTROL with the SynIC enabled.
pub fn scontrol_enabled(current: u64) -> u64 {
    current | MSR_ENABLE
}

/// A SINT register routing to `vector`, unmasked, interrupt (not polling) mode, AutoEOI as
/// asked; reserved bits of `current` kept. `None` for vectors the hypervisor refuses (< 16).
pub fn sint_value(current: u64, vector: u8, auto_eoi: bool) -> Option<u64> {
    if vector < SINT_MIN_VECTOR {
        return None;
    }
    let kept = current & !(SINT_VECTOR | SINT_MASKED | SINT_AUTO_EOI | SINT_POLLING);
    Some(kept | u64::from(vector) | if auto_eoi { SINT_AUTO_EOI } else { 0 })
}

/// A SINT register masked again (what it was before, plus the mask bit).
pub fn sint_masked(current: u64) -> u64 {
    current | SINT_MASKED
}

/// Whether the hypervisor should end our SINT interrupts itself: AutoEOI unless CPUID
/// 0x4000_0004 EAX bit 9 asks for explicit EOIs (Linux `hv_synic_enable_regs` decides alike).
pub fn use_auto_eoi(recommendations_eax: u32) -> bool {
    recommendations_eax & RECOMMEND_EXPLICIT_EOI == 0
}

/// Hypercall call codes used by VMBus.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum CallCode {
    /// HvPostMessage: slow call, input = [`PostMessageInput`] in memory.
    PostMessage = 0x005c,
    /// HvSignalEvent: fast call, input = [`signal_event_input`] in RDX.
    SignalEvent = 0x005d,
    /// HvRetargetDeviceInterrupt: slow call, input = [`RetargetDeviceInterruptInput`] in
    /// memory. Tells the hypervisor where a vPCI device's MSI goes (it remaps device
    /// interrupts itself; Linux `hv_arch_irq_unmask`).
    RetargetDeviceInterrupt = 0x007e,
}

/// The control word (RCX) for a simple (non-rep) hypercall.
pub fn control_word(code: CallCode, fast: bool) -> u64 {
    u64::from(code as u16) | if fast { CONTROL_FAST } else { 0 }
}

/// HvSignalEvent's fast input (RDX): connection id in bits 31:0, event flag number in 47:32.
pub fn signal_event_input(connection_id: u32, flag_number: u16) -> u64 {
    u64::from(connection_id) | (u64::from(flag_number) << 32)
}

/// A hypercall's result status (RAX bits 15:0).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct HvStatus(pub u16);

impl HvStatus {
    /// The call succeeded.
    pub const SUCCESS: HvStatus = HvStatus(0x0000);
    /// Unknown call code.
    pub const INVALID_HYPERCALL_CODE: HvStatus = HvStatus(0x0002);
    /// Bad control word or input.
    pub const INVALID_HYPERCALL_INPUT: HvStatus = HvStatus(0x0003);
    /// Input or output not aligned as required.
    pub const INVALID_ALIGNMENT: HvStatus = HvStatus(0x0004);
    /// A parameter is invalid (e.g. payload size > 240).
    pub const INVALID_PARAMETER: HvStatus = HvStatus(0x0005);
    /// The partition lacks the privilege.
    pub const ACCESS_DENIED: HvStatus = HvStatus(0x0006);
    /// The host is out of memory for the message (retry later).
    pub const INSUFFICIENT_MEMORY: HvStatus = HvStatus(0x000b);
    /// No port listens on this connection id (for INITIATE_CONTACT: an older host).
    pub const INVALID_CONNECTION_ID: HvStatus = HvStatus(0x0012);
    /// The port's message queue is full (retry later).
    pub const INSUFFICIENT_BUFFERS: HvStatus = HvStatus(0x0013);

    /// The status from a hypercall's RAX.
    pub fn from_rax(rax: u64) -> HvStatus {
        HvStatus(rax as u16)
    }

    /// True for success.
    pub fn is_success(self) -> bool {
        self == HvStatus::SUCCESS
    }

    /// True for statuses that clear up by themselves (host queue full or short of memory):
    /// a post is worth repeating after a pause.
    pub fn is_transient(self) -> bool {
        matches!(
            self,
            HvStatus::INSUFFICIENT_MEMORY | HvStatus::INSUFFICIENT_BUFFERS
        )
    }

    /// The TLFS name of the status, when it is one we know.
    pub fn name(self) -> Option<&'static str> {
        Some(match self {
            HvStatus::SUCCESS => "success",
            HvStatus::INVALID_HYPERCALL_CODE => "invalid hypercall code",
            HvStatus::INVALID_HYPERCALL_INPUT => "invalid hypercall input",
            HvStatus::INVALID_ALIGNMENT => "invalid alignment",
            HvStatus::INVALID_PARAMETER => "invalid parameter",
            HvStatus::ACCESS_DENIED => "access denied",
            HvStatus::INSUFFICIENT_MEMORY => "insufficient memory",
            HvStatus::INVALID_CONNECTION_ID => "invalid connection id",
            HvStatus::INSUFFICIENT_BUFFERS => "insufficient buffers",
            _ => return None,
        })
    }
}

impl fmt::Display for HvStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => write!(f, "{name} ({:#06x})", self.0),
            None => write!(f, "status {:#06x}", self.0),
        }
    }
}

impl fmt::Debug for HvStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// How many times a post that failed transiently is repeated, and the pause before the first
/// retry (doubling up to [`POST_RETRY_MAX_PAUSE_US`]); Linux `vmbus_post_msg` does alike.
pub const POST_RETRIES: u32 = 100;
/// First pause between post attempts, microseconds.
pub const POST_RETRY_FIRST_PAUSE_US: u64 = 1;
/// Longest pause between post attempts, microseconds.
pub const POST_RETRY_MAX_PAUSE_US: u64 = 16_000;

/// The pause before retry number `attempt` (0-based) of a transiently failed post, or `None`
/// when the status is final or the retries are used up.
pub fn post_retry_pause_us(status: HvStatus, attempt: u32) -> Option<u64> {
    if !status.is_transient() || attempt >= POST_RETRIES {
        return None;
    }
    Some(
        POST_RETRY_FIRST_PAUSE_US
            .checked_shl(attempt)
            .unwrap_or(u64::MAX)
            .min(POST_RETRY_MAX_PAUSE_US),
    )
}

/// HvPostMessage input (TLFS §11.10.1), placed in an 8-byte-aligned page of its own.
#[derive(Clone, Debug, IntoBytes, FromBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct PostMessageInput {
    /// The connection the host's port listens on.
    pub connection_id: u32,
    /// Must be zero.
    pub reserved: u32,
    /// Message type (1 for VMBus).
    pub message_type: u32,
    /// Bytes of `payload` in use (≤ 240).
    pub payload_size: u32,
    /// The message.
    pub payload: [u8; MESSAGE_PAYLOAD_MAX],
}

impl PostMessageInput {
    /// The input for posting `payload`; `None` when it exceeds 240 bytes.
    pub fn new(connection_id: u32, message_type: u32, payload: &[u8]) -> Option<Self> {
        if payload.len() > MESSAGE_PAYLOAD_MAX {
            return None;
        }
        let mut input = PostMessageInput {
            connection_id,
            reserved: 0,
            message_type,
            payload_size: payload.len() as u32,
            payload: [0; MESSAGE_PAYLOAD_MAX],
        };
        input.payload[..payload.len()].copy_from_slice(payload);
        Some(input)
    }
}

/// The header of a SynIC message slot (TLFS §11.10.3: type, size, flags, reserved, sender).
#[derive(Clone, Copy, Debug, PartialEq, Eq, IntoBytes, FromBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct MessageHeader {
    /// Message type; 0 = the slot is free.
    pub message_type: u32,
    /// Payload bytes.
    pub payload_size: u8,
    /// Bit 0: another message is pending behind this one.
    pub flags: u8,
    /// Reserved.
    pub reserved: u16,
    /// Sender (port id).
    pub sender: u64,
}

/// One message taken out of a SynIC slot.
#[derive(Clone, PartialEq, Eq)]
pub struct SynicMessage {
    /// Message type (1 for VMBus).
    pub message_type: u32,
    /// Payload bytes in use.
    len: usize,
    /// The payload (`len` bytes valid).
    bytes: [u8; MESSAGE_PAYLOAD_MAX],
}

impl SynicMessage {
    /// The payload.
    pub fn payload(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

impl fmt::Debug for SynicMessage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SynicMessage")
            .field("message_type", &self.message_type)
            .field("len", &self.len)
            .finish()
    }
}

/// What a look at a message slot found.
// The message is copied out whole (256 bytes on the stack, briefly) instead of boxed: taking a
// message must not allocate.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SlotRead {
    /// The slot is free.
    Empty,
    /// A message, copied out; the slot is free again.
    Message(SynicMessage),
    /// A header claiming more than 240 payload bytes: dropped, the slot is free again.
    Malformed {
        /// The message type.
        message_type: u32,
        /// The impossible size.
        payload_size: u8,
    },
}

/// Takes the message in `slot` (16 header bytes, 240 payload bytes as 32 little-endian
/// words): copies it, frees the slot (type 0), and — only when the header said another message
/// is pending — calls `end_of_message` (write the EOM MSR) after a full barrier, so the
/// hypervisor delivers the next one (TLFS §11.10.3; Linux `vmbus_signal_eom`).
pub fn take_message(
    slot: &[AtomicU64; MESSAGE_SLOT_WORDS],
    end_of_message: impl FnOnce(),
) -> SlotRead {
    let first = slot[0].load(Ordering::Acquire);
    let mut header_bytes = [0u8; 16];
    header_bytes[..8].copy_from_slice(&first.to_le_bytes());
    header_bytes[8..].copy_from_slice(&slot[1].load(Ordering::Relaxed).to_le_bytes());
    let Ok(header) = MessageHeader::read_from_bytes(&header_bytes) else {
        return SlotRead::Empty;
    };
    if header.message_type == 0 {
        return SlotRead::Empty;
    }
    let read = if usize::from(header.payload_size) > MESSAGE_PAYLOAD_MAX {
        SlotRead::Malformed {
            message_type: header.message_type,
            payload_size: header.payload_size,
        }
    } else {
        let mut bytes = [0u8; MESSAGE_PAYLOAD_MAX];
        for (chunk, word) in bytes.chunks_exact_mut(8).zip(&slot[2..]) {
            chunk.copy_from_slice(&word.load(Ordering::Relaxed).to_le_bytes());
        }
        SlotRead::Message(SynicMessage {
            message_type: header.message_type,
            len: usize::from(header.payload_size),
            bytes,
        })
    };
    // The hypervisor writes a slot only while its type is 0, so freeing it by a plain store
    // cannot lose a message; the barrier orders the free before the EOM (the hypervisor
    // re-checks the slot when EOM is written).
    slot[0].store(0, Ordering::Release);
    fence(Ordering::SeqCst);
    if header.flags & MESSAGE_PENDING != 0 {
        end_of_message();
    }
    read
}

/// Test-and-clears one SINT's event-flag array (2048 bits) word by word, calling
/// `on_word(word_index, bits)` for each word that had flags set. Each word is swapped
/// atomically with 0, so a flag the hypervisor sets meanwhile is either reported now or left
/// for the next call, never lost. Returns how many flags were set.
pub fn take_event_words(
    flags: &[AtomicU64; EVENT_FLAG_WORDS],
    mut on_word: impl FnMut(usize, u64),
) -> u32 {
    let mut count = 0;
    for (index, word) in flags.iter().enumerate() {
        if word.load(Ordering::Relaxed) == 0 {
            continue;
        }
        let bits = word.swap(0, Ordering::AcqRel);
        if bits != 0 {
            count += bits.count_ones();
            on_word(index, bits);
        }
    }
    count
}

/// [`take_event_words`], one call of `on_flag(bit)` per set flag, lowest first (the bit
/// number is the channel's `child_relid` for VMBus).
pub fn take_event_flags(
    flags: &[AtomicU64; EVENT_FLAG_WORDS],
    mut on_flag: impl FnMut(u32),
) -> u32 {
    take_event_words(flags, |index, mut bits| {
        while bits != 0 {
            on_flag(index as u32 * 64 + bits.trailing_zeros());
            bits &= bits - 1;
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot_with(header: MessageHeader, payload: &[u8]) -> [AtomicU64; MESSAGE_SLOT_WORDS] {
        let mut bytes = [0u8; MESSAGE_SLOT_BYTES];
        bytes[..16].copy_from_slice(header.as_bytes());
        bytes[16..16 + payload.len()].copy_from_slice(payload);
        core::array::from_fn(|index| {
            AtomicU64::new(u64::from_le_bytes(
                bytes[index * 8..index * 8 + 8].try_into().unwrap(),
            ))
        })
    }

    fn header(message_type: u32, payload_size: u8, flags: u8) -> MessageHeader {
        MessageHeader {
            message_type,
            payload_size,
            flags,
            reserved: 0,
            sender: 0x1234,
        }
    }

    #[test]
    fn guest_os_id_is_open_source_with_undefined_type_and_our_version() {
        let id = guest_os_id(0, 1, 0, 7);
        assert_eq!(id >> 63, 1, "open-source bit");
        assert_eq!((id >> 56) & 0x7f, 0, "OS type undefined");
        assert_eq!((id >> 48) & 0xff, 0, "OS id");
        assert_eq!((id >> 16) & 0xffff_ffff, 0x0100, "version 0.1.0");
        assert_eq!(id & 0xffff, 7);
        assert_ne!(id, 0, "a zero id would keep the hypercall page disabled");
        assert_eq!(guest_os_id(1, 2, 3, 0), 0x8000_0001_0203_0000);
    }

    #[test]
    fn page_msrs_place_the_page_keep_reserved_bits_and_enable() {
        assert_eq!(hypercall_msr_value(0, 0x0012_3000), 0x0012_3001);
        // Locked (bit 1) is read-only and not written; reserved bits 11:2 are written back.
        assert_eq!(
            hypercall_msr_value(0xaaaa_a000 | 0xffe, 0x5000),
            0x5000 | 0xffc | 1
        );
        assert!(hypercall_msr_enabled_at(0x5003, 0x5000));
        assert!(!hypercall_msr_enabled_at(0x5000, 0x5000), "not enabled");
        assert!(!hypercall_msr_enabled_at(0x6001, 0x5000), "elsewhere");
        assert_eq!(synic_page_msr_value(0xffe, 0x7000), 0x7fff);
        assert_eq!(synic_page_msr_value(0x9000, 0x7000), 0x7001);
        assert_eq!(page_msr_disabled(0x7fff), 0x7ffe);
        assert_eq!(scontrol_enabled(0x10), 0x11);
    }

    #[test]
    fn sint_routes_a_vector_unmasked_with_or_without_auto_eoi() {
        // Reset value: masked, vector 0.
        let reset = SINT_MASKED;
        assert_eq!(sint_value(reset, 0x41, false), Some(0x41));
        assert_eq!(sint_value(reset, 0xf3, true), Some(0xf3 | 1 << 17));
        // Polling mode and an old vector are cleared, reserved high bits kept.
        assert_eq!(
            sint_value(1 << 40 | SINT_POLLING | SINT_AUTO_EOI | 0x22, 0x50, false),
            Some(1 << 40 | 0x50)
        );
        assert_eq!(sint_value(reset, 15, false), None, "vectors < 16 refused");
        assert_eq!(sint_masked(0x41), 0x41 | 1 << 16);
        assert!(use_auto_eoi(0));
        assert!(!use_auto_eoi(1 << 9));
        assert!(use_auto_eoi(!(1 << 9)));
    }

    #[test]
    fn control_words_and_fast_inputs() {
        assert_eq!(control_word(CallCode::PostMessage, false), 0x5c);
        assert_eq!(control_word(CallCode::SignalEvent, true), 0x1_005d);
        assert_eq!(signal_event_input(0x1234_5678, 3), 0x0003_1234_5678);
        assert_eq!(signal_event_input(u32::MAX, 0), 0xffff_ffff);
    }

    #[test]
    fn statuses_decode_from_rax_and_transient_ones_are_retried_with_backoff() {
        assert!(HvStatus::from_rax(0xffff_0000_0000_0000).is_success());
        let full = HvStatus::from_rax(0x0000_0005_0000_0013);
        assert_eq!(full, HvStatus::INSUFFICIENT_BUFFERS);
        assert!(full.is_transient());
        assert_eq!(full.to_string(), "insufficient buffers (0x0013)");
        assert_eq!(HvStatus(0x77).to_string(), "status 0x0077");
        assert!(!HvStatus::INVALID_CONNECTION_ID.is_transient());
        assert_eq!(
            post_retry_pause_us(HvStatus::INSUFFICIENT_MEMORY, 0),
            Some(1)
        );
        assert_eq!(
            post_retry_pause_us(HvStatus::INSUFFICIENT_BUFFERS, 3),
            Some(8)
        );
        assert_eq!(
            post_retry_pause_us(HvStatus::INSUFFICIENT_BUFFERS, 60),
            Some(POST_RETRY_MAX_PAUSE_US)
        );
        assert_eq!(
            post_retry_pause_us(HvStatus::INSUFFICIENT_BUFFERS, 100),
            None
        );
        assert_eq!(post_retry_pause_us(HvStatus::ACCESS_DENIED, 0), None);
        assert_eq!(
            post_retry_pause_us(HvStatus::INVALID_CONNECTION_ID, 0),
            None
        );
    }

    #[test]
    fn post_message_input_has_the_tlfs_layout_and_bounds_the_payload() {
        assert_eq!(core::mem::size_of::<PostMessageInput>(), 256);
        let input = PostMessageInput::new(4, VMBUS_MESSAGE_TYPE, &[0xaa; 40]).unwrap();
        let bytes = input.as_bytes();
        assert_eq!(
            &bytes[..16],
            &[4, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 40, 0, 0, 0]
        );
        assert_eq!(&bytes[16..56], &[0xaa; 40]);
        assert!(bytes[56..].iter().all(|&byte| byte == 0));
        assert!(PostMessageInput::new(1, 1, &[0; 240]).is_some());
        assert!(PostMessageInput::new(1, 1, &[0; 241]).is_none());
    }

    #[test]
    fn a_message_is_copied_and_freed_and_eom_is_written_only_when_one_is_pending() {
        assert_eq!(core::mem::size_of::<MessageHeader>(), 16);
        let payload: Vec<u8> = (0..40u8).collect();
        let slot = slot_with(header(1, 40, 0), &payload);
        let mut eoms = 0;
        let SlotRead::Message(message) = take_message(&slot, || eoms += 1) else {
            panic!("no message");
        };
        assert_eq!(message.message_type, 1);
        assert_eq!(message.payload(), &payload[..]);
        assert_eq!(eoms, 0, "nothing pending: no EOM");
        assert_eq!(slot[0].load(Ordering::Relaxed) as u32, 0, "slot freed");
        assert_eq!(take_message(&slot, || eoms += 1), SlotRead::Empty);
        assert_eq!(eoms, 0);

        let slot = slot_with(header(1, 240, MESSAGE_PENDING), &[7; 240]);
        let SlotRead::Message(message) = take_message(&slot, || eoms += 1) else {
            panic!("no message");
        };
        assert_eq!(message.payload(), &[7; 240]);
        assert_eq!(eoms, 1, "pending: EOM once");
    }

    #[test]
    fn an_oversized_header_is_dropped_but_the_slot_is_still_freed() {
        let slot = slot_with(header(1, 241, MESSAGE_PENDING), &[]);
        let mut eoms = 0;
        assert_eq!(
            take_message(&slot, || eoms += 1),
            SlotRead::Malformed {
                message_type: 1,
                payload_size: 241
            }
        );
        assert_eq!(eoms, 1, "the queue behind it must keep moving");
        assert_eq!(take_message(&slot, || eoms += 1), SlotRead::Empty);
    }

    #[test]
    fn event_flags_are_reported_once_and_cleared() {
        let flags: [AtomicU64; EVENT_FLAG_WORDS] = core::array::from_fn(|_| AtomicU64::new(0));
        flags[0].store(0b1010, Ordering::Relaxed);
        flags[31].store(1 << 63, Ordering::Relaxed);
        let mut seen = Vec::new();
        assert_eq!(take_event_flags(&flags, |bit| seen.push(bit)), 3);
        assert_eq!(seen, [1, 3, 2047]);
        seen.clear();
        assert_eq!(take_event_flags(&flags, |bit| seen.push(bit)), 0);
        assert!(seen.is_empty());
        assert!(flags.iter().all(|word| word.load(Ordering::Relaxed) == 0));

        flags[2].store(u64::MAX, Ordering::Relaxed);
        let mut words = Vec::new();
        assert_eq!(
            take_event_words(&flags, |index, bits| words.push((index, bits))),
            64
        );
        assert_eq!(words, [(2, u64::MAX)]);
    }
}

/// The caller's own partition, for hypercalls that name a partition.
pub const PARTITION_ID_SELF: u64 = u64::MAX;
/// Interrupt source "MSI" of an interrupt entry.
pub const INTERRUPT_SOURCE_MSI: u32 = 1;
/// Target flag: the interrupt may go to any processor in the mask (multicast).
pub const DEVICE_INTERRUPT_TARGET_MULTICAST: u32 = 1;

/// HvRetargetDeviceInterrupt input (hypercall 0x7e; layout as OpenVMM's `hvdef` and Linux
/// `struct retarget_msi_interrupt`): partition, device id, the MSI entry (source, reserved,
/// address low dword, data), reserved, then the target (vector, flags, processor mask).
#[derive(Clone, Copy, Debug, PartialEq, Eq, IntoBytes, FromBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct RetargetDeviceInterruptInput {
    /// [`PARTITION_ID_SELF`].
    pub partition_id: u64,
    /// [`vpci_device_id`] of the function.
    pub device_id: u64,
    /// [`INTERRUPT_SOURCE_MSI`].
    pub source: u32,
    /// Reserved, zero.
    pub reserved: u32,
    /// The MSI address (low 32 bits) programmed into the MSI-X entry.
    pub msi_address: u32,
    /// The MSI data programmed into the MSI-X entry.
    pub msi_data: u32,
    /// Reserved, zero.
    pub reserved2: u64,
    /// The CPU vector.
    pub vector: u32,
    /// Target flags ([`DEVICE_INTERRUPT_TARGET_MULTICAST`]).
    pub flags: u32,
    /// Processor mask: bit n = virtual processor n (VPs 0–63).
    pub processor_mask: u64,
}

/// The device id Hyper-V knows a vPCI function by: bytes 4–7 of the bus's instance GUID (as
/// offered) and the function number, laid out as Linux `hv_build_pci_dev_id` does
/// (b5 << 24 | b4 << 16 | b7 << 8 | (b6 & 0xf8) | function).
pub fn vpci_device_id(instance: &[u8; 16], function: u8) -> u64 {
    (u64::from(instance[5]) << 24)
        | (u64::from(instance[4]) << 16)
        | (u64::from(instance[7]) << 8)
        | u64::from(instance[6] & 0xf8)
        | u64::from(function & 7)
}

impl RetargetDeviceInterruptInput {
    /// The input that sends MSI `(address, data)` of `device_id` to `vector` on processor
    /// `vp` (0–63; `None` beyond).
    pub fn new(device_id: u64, address: u64, data: u32, vector: u8, vp: u32) -> Option<Self> {
        Some(RetargetDeviceInterruptInput {
            partition_id: PARTITION_ID_SELF,
            device_id,
            source: INTERRUPT_SOURCE_MSI,
            reserved: 0,
            msi_address: address as u32,
            msi_data: data,
            reserved2: 0,
            vector: u32::from(vector),
            flags: DEVICE_INTERRUPT_TARGET_MULTICAST,
            processor_mask: 1u64.checked_shl(vp)?,
        })
    }
}

#[cfg(test)]
mod retarget_tests {
    use super::*;

    #[test]
    fn retarget_input_is_56_bytes_in_hypervisor_order() {
        let instance = [
            0, 1, 2, 3, 0x44, 0x55, 0x6f, 0x77, 8, 9, 10, 11, 12, 13, 14, 15,
        ];
        let device_id = vpci_device_id(&instance, 1);
        assert_eq!(device_id, 0x5544_7769);
        let input =
            RetargetDeviceInterruptInput::new(device_id, 0xfee0_0000, 0x4041, 0x41, 2).unwrap();
        let bytes = input.as_bytes();
        assert_eq!(bytes.len(), 56);
        assert_eq!(&bytes[0..8], &u64::MAX.to_le_bytes());
        assert_eq!(&bytes[8..16], &0x5544_7769u64.to_le_bytes());
        assert_eq!(&bytes[16..20], &1u32.to_le_bytes(), "MSI source");
        assert_eq!(&bytes[24..28], &0xfee0_0000u32.to_le_bytes());
        assert_eq!(&bytes[28..32], &0x4041u32.to_le_bytes());
        assert_eq!(&bytes[40..44], &0x41u32.to_le_bytes(), "vector");
        assert_eq!(&bytes[48..56], &4u64.to_le_bytes(), "VP 2");
        assert!(RetargetDeviceInterruptInput::new(1, 0, 0, 0x41, 64).is_none());
    }
}
