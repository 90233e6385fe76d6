//! MANA BAR0: the register map, the SMC shared-memory mailbox and the doorbell page layout.
//!
//! Facts from OpenVMM's `gdma_defs` and `gdma` emulator (MIT; read, not copied): BAR0 starts
//! with a read-only register map giving the doorbell zone and the shared-memory (SMC) window;
//! the SMC window is 8 dwords whose last one is the protocol header and, once written, runs the
//! command; doorbells are 8-byte writes into the function's doorbell page.

use bitflags::bitflags;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// PCI vendor id of Microsoft.
pub const VENDOR_MICROSOFT: u16 = 0x1414;
/// PCI device id of the MANA (GDMA) function.
pub const DEVICE_MANA: u16 = 0x00ba;

/// True for a PCI function this driver drives.
pub fn is_supported_device(vendor: u16, device: u16) -> bool {
    vendor == VENDOR_MICROSOFT && device == DEVICE_MANA
}

/// The read-only register map at BAR0 offset 0.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct RegisterMap {
    /// GDMA version, micro part.
    pub micro_version: u16,
    /// GDMA version, minor part.
    pub minor_version: u8,
    /// GDMA version, major part (never 0 on a live device).
    pub major_version: u8,
    /// Unused.
    pub reserved: u32,
    /// BAR0 offset of the doorbell pages.
    pub doorbell_zone_offset: u64,
    /// Bytes per doorbell page.
    pub doorbell_page_size: u16,
    /// Unused.
    pub reserved2: u16,
    /// Unused.
    pub reserved3: u32,
    /// BAR0 offset of the SMC shared-memory window.
    pub smc_offset: u64,
    /// Bytes of the SMC window.
    pub smc_size: u16,
    /// Unused.
    pub reserved4: u16,
    /// Unused.
    pub reserved5: u32,
}
const _: () = assert!(size_of::<RegisterMap>() == 40);

/// BAR0 offset of the register map.
pub const REGISTER_MAP: usize = 0;
/// BAR0 offset of the dword holding the GDMA version; all-ones or zero means the device is
/// gone (read on every poll).
pub const VERSION: usize = REGISTER_MAP;

/// The SMC window: an ESTABLISH_HWC request (the layout every SMC message shares: 28 bytes of
/// arguments, then the header dword).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct SmcEstablishHwc {
    /// HWC EQ page number, low 48 bits.
    pub eq_page: [u8; 6],
    /// HWC CQ page number, low 48 bits.
    pub cq_page: [u8; 6],
    /// HWC RQ page number, low 48 bits.
    pub rq_page: [u8; 6],
    /// HWC SQ page number, low 48 bits.
    pub sq_page: [u8; 6],
    /// Bits 48..52 of the four page numbers: EQ in bits 0..4, CQ 4..8, RQ 8..12, SQ 12..16.
    pub page_high_bits: u16,
    /// MSI-X index of the HWC EQ.
    pub msix_index: u16,
    /// [`SmcHeader`] bits; written last, it starts the command.
    pub header: u32,
}
const _: () = assert!(size_of::<SmcEstablishHwc>() == 32);

/// Bytes of the SMC window this driver uses.
pub const SMC_SIZE: usize = size_of::<SmcEstablishHwc>();
/// Offset of the header dword within the SMC window.
pub const SMC_HEADER: usize = SMC_SIZE - 4;

/// SMC command: set up the hardware channel.
pub const SMC_ESTABLISH_HWC: u32 = 1;
/// SMC command: tear the hardware channel down.
pub const SMC_DESTROY_HWC: u32 = 2;
/// Version of both commands.
pub const SMC_VERSION: u32 = 0;
/// Mask of the command type in the header (bits 0..3).
pub const SMC_TYPE_MASK: u32 = 0x7;
/// Shift of the command version in the header (bits 3..6).
pub const SMC_VERSION_SHIFT: u32 = 3;
/// Shift of the status byte in the header (bits 8..16; 0 = success).
pub const SMC_STATUS_SHIFT: u32 = 8;

bitflags! {
    /// Single-bit fields of the SMC header dword.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct SmcHeader: u32 {
        /// Set by the device when the command is done (status valid).
        const IS_RESPONSE = 1 << 7;
        /// Set by the device when it asks for a VF reset.
        const RESET_VF = 1 << 24;
        /// The PF owns the window.
        const OWNER_IS_PF = 1 << 31;
        /// The other (multi-bit) fields.
        const _ = !0;
    }
}

/// A request header dword for `command`.
pub fn smc_request(command: u32) -> u32 {
    (command & SMC_TYPE_MASK) | (SMC_VERSION << SMC_VERSION_SHIFT)
}

/// The status byte of a response header.
pub fn smc_status(header: u32) -> u8 {
    (header >> SMC_STATUS_SHIFT) as u8
}

/// Splits a page number into the 48 low bits the window has room for and the 4 high ones.
pub fn split_page_number(page: u64) -> ([u8; 6], u16) {
    let bytes = page.to_le_bytes();
    (
        [bytes[0], bytes[1], bytes[2], bytes[3], bytes[4], bytes[5]],
        ((page >> 48) & 0xf) as u16,
    )
}

/// Largest page number the SMC window can express (52 bits).
pub const SMC_MAX_PAGE_NUMBER: u64 = (1 << 52) - 1;

/// Doorbell page offset of the send queue doorbell.
pub const DOORBELL_SQ: usize = 0x000;
/// Doorbell page offset of the receive queue doorbell.
pub const DOORBELL_RQ: usize = 0x400;
/// Doorbell page offset of the completion queue doorbell.
pub const DOORBELL_CQ: usize = 0x800;
/// Doorbell page offset of the event queue doorbell.
pub const DOORBELL_EQ: usize = 0xff8;

/// The 8-byte value of a CQ or EQ doorbell: id (bits 0..24), consumer position (32..63, the
/// running count of entries taken modulo `entries << OWNER_BITS`), arm (63).
pub fn cq_eq_doorbell(id: u32, position: u32, arm: bool) -> u64 {
    u64::from(id & 0xff_ffff) | (u64::from(position & 0x7fff_ffff) << 32) | (u64::from(arm) << 63)
}

/// The 8-byte value of an SQ or RQ doorbell: id (bits 0..24), WQEs added (24..32, RQ only),
/// producer position in bytes (32..64).
pub fn wq_doorbell(id: u32, added: u8, position: u32) -> u64 {
    u64::from(id & 0xff_ffff) | (u64::from(added) << 24) | (u64::from(position) << 32)
}
