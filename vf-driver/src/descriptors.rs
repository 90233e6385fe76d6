//! Advanced RX/TX descriptor layouts of the 82576/I350 (datasheet §7.1.5, §7.2.2.3 and, for the
//! transmit context descriptor and its offload fields, §7.2.2.5 / §7.2.3.2.3).
//!
//! The structs are `#[repr(C)]` over explicit little-endian byte fields, so their layout is the
//! device's whatever the CPU. Rings move them to and from DMA memory as two little-endian u64
//! words ([`DmaRegion::read_volatile_u64`](net_device::DmaRegion::read_volatile_u64) already
//! converts from little-endian), via `to_words`/`from_words`.

use bitflags::bitflags;
use core::mem::size_of;

/// Size of every descriptor in bytes.
pub const DESCRIPTOR_SIZE: usize = 16;

/// A little-endian u16 as it sits in memory.
#[derive(Clone, Copy, Default, PartialEq, Eq, Debug)]
#[repr(transparent)]
pub struct Le16([u8; 2]);

impl Le16 {
    /// Stores `value` little-endian.
    pub const fn new(value: u16) -> Self {
        Le16(value.to_le_bytes())
    }
    /// The value in CPU order.
    pub const fn get(self) -> u16 {
        u16::from_le_bytes(self.0)
    }
}

/// A little-endian u32 as it sits in memory.
#[derive(Clone, Copy, Default, PartialEq, Eq, Debug)]
#[repr(transparent)]
pub struct Le32([u8; 4]);

impl Le32 {
    /// Stores `value` little-endian.
    pub const fn new(value: u32) -> Self {
        Le32(value.to_le_bytes())
    }
    /// The value in CPU order.
    pub const fn get(self) -> u32 {
        u32::from_le_bytes(self.0)
    }
}

/// A little-endian u64 as it sits in memory.
#[derive(Clone, Copy, Default, PartialEq, Eq, Debug)]
#[repr(transparent)]
pub struct Le64([u8; 8]);

impl Le64 {
    /// Stores `value` little-endian.
    pub const fn new(value: u64) -> Self {
        Le64(value.to_le_bytes())
    }
    /// The value in CPU order.
    pub const fn get(self) -> u64 {
        u64::from_le_bytes(self.0)
    }
}

bitflags! {
    /// `cmd_type_len` bits of an advanced TX data descriptor (datasheet §7.2.2.3.2); the low 16
    /// bits hold the buffer length.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct TxCommand: u32 {
        /// Descriptor type "advanced data".
        const DTYP_DATA = 0x0030_0000;
        /// End of packet: the last descriptor of a frame.
        const EOP = 0x0100_0000;
        /// Insert the Ethernet FCS.
        const IFCS = 0x0200_0000;
        /// Report status: write DD back when done.
        const RS = 0x0800_0000;
        /// Descriptor extension: advanced (not legacy) format.
        const DEXT = 0x2000_0000;
        /// TCP segmentation enable: the device cuts the frame into MSS-sized segments using
        /// the context the first descriptor's `olinfo_status` selects (§7.2.4).
        const TSE = 0x8000_0000;
    }
}

/// The descriptor type field (DTYP, bits 23:20) of `cmd_type_len` / `type_tucmd_mlhl`.
pub const TX_DESCRIPTOR_TYPE_MASK: u32 = 0x00F0_0000;
/// DTYP of an advanced data descriptor.
pub const TX_DESCRIPTOR_TYPE_DATA: u32 = 0x0030_0000;
/// DTYP of an advanced context descriptor.
pub const TX_DESCRIPTOR_TYPE_CONTEXT: u32 = 0x0020_0000;

/// Shift of the payload length in `olinfo_status`: the whole frame's length for a plain or
/// checksum-offloaded frame, the L4 payload (without any header) for a TSO frame.
pub const TX_PAYLEN_SHIFT: u32 = 14;
/// Shift of the context index (IDX, bits 6:4) in `olinfo_status`.
pub const TX_CONTEXT_INDEX_SHIFT: u32 = 4;
/// Context slots per queue: the 82576 keeps two, and QEMU reads only bit 4 of IDX.
pub const TX_CONTEXT_SLOTS: usize = 2;
/// The "descriptor done" bit the device writes into `olinfo_status` (byte 12).
pub const TX_STATUS_DD: u32 = 1 << 0;

bitflags! {
    /// POPTS bits of an advanced data descriptor's `olinfo_status` (§7.2.2.3.2).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct TxOffloadOptions: u32 {
        /// IXSM: insert the IPv4 header checksum.
        const IP_CHECKSUM = 1 << 8;
        /// TXSM: insert the TCP/UDP checksum.
        const L4_CHECKSUM = 1 << 9;
    }
}

bitflags! {
    /// `type_tucmd_mlhl` bits of an advanced context descriptor (§7.2.2.5); TUCMD is bits
    /// 19:9. An L4 type of 00b (no TCP/SCTP bit) means UDP.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct ContextCommand: u32 {
        /// TUCMD.IPV4: the IP header is IPv4 (clear: IPv6).
        const IPV4 = 1 << 10;
        /// TUCMD.L4T = 01b: TCP.
        const L4_TCP = 1 << 11;
        /// TUCMD.L4T = 10b: SCTP (never used by this driver).
        const L4_SCTP = 1 << 12;
        /// Descriptor type "advanced context".
        const DTYP_CONTEXT = TX_DESCRIPTOR_TYPE_CONTEXT;
        /// Descriptor extension: advanced format.
        const DEXT = 0x2000_0000;
    }
}

/// Shift of MACLEN (bits 15:9, the L2 header length) in `vlan_macip_lens`; IPLEN (the IP
/// header length including options or extension headers) is bits 8:0.
pub const CONTEXT_MACLEN_SHIFT: u32 = 9;
/// Largest MACLEN (7 bits).
pub const CONTEXT_MAX_MACLEN: usize = 0x7F;
/// Mask (and largest value) of IPLEN.
pub const CONTEXT_IPLEN_MASK: u32 = 0x1FF;
/// Shift of the context index (IDX, bits 6:4) in `mss_l4len_idx`.
pub const CONTEXT_INDEX_SHIFT: u32 = 4;
/// Shift of L4LEN (bits 15:8, the TCP header length including options) in `mss_l4len_idx`.
pub const CONTEXT_L4LEN_SHIFT: u32 = 8;
/// Shift of MSS (bits 31:16) in `mss_l4len_idx`.
pub const CONTEXT_MSS_SHIFT: u32 = 16;

bitflags! {
    /// `status_error` bits of an advanced RX write-back descriptor (datasheet §7.1.5.2).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct RxStatus: u32 {
        /// Descriptor done: the device wrote this descriptor back.
        const DD = 1 << 0;
        /// End of packet: the last descriptor of a frame.
        const EOP = 1 << 1;
        /// The frame carried an 802.1Q tag.
        const VLAN_PACKET = 1 << 3;
        /// UDPCS: the UDP checksum was checked.
        const UDP_CHECKSUM = 1 << 4;
        /// TCPCS/L4I: the L4 checksum was checked (QEMU sets it for UDP too).
        const TCP_CHECKSUM = 1 << 5;
        /// IPCS: the IPv4 header checksum was checked.
        const IP_CHECKSUM = 1 << 6;
        /// CRC error.
        const CRC_ERROR = 1 << 24;
        /// Symbol error.
        const SYMBOL_ERROR = 1 << 25;
        /// Sequence error.
        const SEQUENCE_ERROR = 1 << 26;
        /// Carrier extension error.
        const CARRIER_EXTENSION_ERROR = 1 << 28;
        /// TCP/UDP checksum error (L4E; the frame is delivered unverified for the stack to
        /// judge, not dropped as a frame error).
        const L4_CHECKSUM_ERROR = 1 << 29;
        /// IPv4 checksum error (IPE; delivered unverified like [`RxStatus::L4_CHECKSUM_ERROR`]).
        const IP_CHECKSUM_ERROR = 1 << 30;
        /// RX data error.
        const RX_DATA_ERROR = 1 << 31;
        /// Errors that make the frame itself unusable: counted and dropped.
        const FRAME_ERRORS = Self::CRC_ERROR.bits() | Self::SYMBOL_ERROR.bits()
            | Self::SEQUENCE_ERROR.bits() | Self::CARRIER_EXTENSION_ERROR.bits()
            | Self::RX_DATA_ERROR.bits();
    }
}

fn words_from_bytes(bytes: [u8; DESCRIPTOR_SIZE]) -> [u64; 2] {
    let mut low = [0u8; 8];
    let mut high = [0u8; 8];
    low.copy_from_slice(&bytes[..8]);
    high.copy_from_slice(&bytes[8..]);
    [u64::from_le_bytes(low), u64::from_le_bytes(high)]
}

fn bytes_from_words(words: [u64; 2]) -> [u8; DESCRIPTOR_SIZE] {
    let mut bytes = [0u8; DESCRIPTOR_SIZE];
    bytes[..8].copy_from_slice(&words[0].to_le_bytes());
    bytes[8..].copy_from_slice(&words[1].to_le_bytes());
    bytes
}

/// Advanced TX data descriptor, read format (what the driver writes).
#[derive(Clone, Copy, Default, PartialEq, Eq, Debug)]
#[repr(C)]
pub struct AdvancedTxDataDescriptor {
    /// Device address of the frame buffer.
    pub buffer_address: Le64,
    /// Length (bits 15:0) | [`TxCommand`] bits.
    pub cmd_type_len: Le32,
    /// Payload length << [`TX_PAYLEN_SHIFT`] | offload bits; the device ORs [`TX_STATUS_DD`]
    /// in on write-back.
    pub olinfo_status: Le32,
}

const _: () = assert!(size_of::<AdvancedTxDataDescriptor>() == DESCRIPTOR_SIZE);

impl AdvancedTxDataDescriptor {
    /// A single-buffer frame of `length` bytes at `buffer_address`, with FCS insertion and
    /// status write-back requested.
    pub fn single_buffer_frame(buffer_address: u64, length: u16) -> Self {
        let command = TxCommand::DTYP_DATA
            | TxCommand::DEXT
            | TxCommand::IFCS
            | TxCommand::EOP
            | TxCommand::RS;
        AdvancedTxDataDescriptor {
            buffer_address: Le64::new(buffer_address),
            cmd_type_len: Le32::new(command.bits() | u32::from(length)),
            olinfo_status: Le32::new(u32::from(length) << TX_PAYLEN_SHIFT),
        }
    }

    /// A data descriptor for `length` bytes at `buffer_address` with `command` bits (the DTYP,
    /// DEXT and IFCS bits are added) and `olinfo_status` as given.
    pub fn new(buffer_address: u64, length: u16, command: TxCommand, olinfo_status: u32) -> Self {
        let command = command | TxCommand::DTYP_DATA | TxCommand::DEXT | TxCommand::IFCS;
        AdvancedTxDataDescriptor {
            buffer_address: Le64::new(buffer_address),
            cmd_type_len: Le32::new(command.bits() | u32::from(length)),
            olinfo_status: Le32::new(olinfo_status),
        }
    }

    /// Buffer length field.
    pub fn length(&self) -> u16 {
        self.cmd_type_len.get() as u16
    }

    /// Command bits (unknown bits dropped).
    pub fn command(&self) -> TxCommand {
        TxCommand::from_bits_truncate(self.cmd_type_len.get())
    }

    /// True once the device wrote the descriptor back.
    pub fn is_done(&self) -> bool {
        self.olinfo_status.get() & TX_STATUS_DD != 0
    }

    /// The descriptor as the two little-endian words it occupies in memory.
    pub fn to_words(&self) -> [u64; 2] {
        let mut bytes = [0u8; DESCRIPTOR_SIZE];
        bytes[..8].copy_from_slice(&self.buffer_address.0);
        bytes[8..12].copy_from_slice(&self.cmd_type_len.0);
        bytes[12..].copy_from_slice(&self.olinfo_status.0);
        words_from_bytes(bytes)
    }

    /// Decodes the two words read from memory.
    pub fn from_words(words: [u64; 2]) -> Self {
        let bytes = bytes_from_words(words);
        let mut descriptor = AdvancedTxDataDescriptor::default();
        descriptor.buffer_address.0.copy_from_slice(&bytes[..8]);
        descriptor.cmd_type_len.0.copy_from_slice(&bytes[8..12]);
        descriptor.olinfo_status.0.copy_from_slice(&bytes[12..]);
        descriptor
    }
}

/// Advanced TX context descriptor (§7.2.2.5): offload parameters the device keeps in one of its
/// [`TX_CONTEXT_SLOTS`] per-queue slots for the data descriptors that follow. It moves no data
/// and is never written back.
#[derive(Clone, Copy, Default, PartialEq, Eq, Debug)]
#[repr(C)]
pub struct AdvancedTxContextDescriptor {
    /// VLAN tag (bits 31:16, unused here) | MACLEN << [`CONTEXT_MACLEN_SHIFT`] | IPLEN.
    pub vlan_macip_lens: Le32,
    /// IPsec/FCoE fields; zero.
    pub seqnum_seed: Le32,
    /// [`ContextCommand`] bits.
    pub type_tucmd_mlhl: Le32,
    /// MSS << [`CONTEXT_MSS_SHIFT`] | L4LEN << [`CONTEXT_L4LEN_SHIFT`] | IDX <<
    /// [`CONTEXT_INDEX_SHIFT`].
    pub mss_l4len_idx: Le32,
}

const _: () = assert!(size_of::<AdvancedTxContextDescriptor>() == DESCRIPTOR_SIZE);

impl AdvancedTxContextDescriptor {
    /// The descriptor as the two little-endian words it occupies in memory.
    pub fn to_words(&self) -> [u64; 2] {
        let mut bytes = [0u8; DESCRIPTOR_SIZE];
        bytes[..4].copy_from_slice(&self.vlan_macip_lens.0);
        bytes[4..8].copy_from_slice(&self.seqnum_seed.0);
        bytes[8..12].copy_from_slice(&self.type_tucmd_mlhl.0);
        bytes[12..].copy_from_slice(&self.mss_l4len_idx.0);
        words_from_bytes(bytes)
    }

    /// Decodes the two words read from memory.
    pub fn from_words(words: [u64; 2]) -> Self {
        let bytes = bytes_from_words(words);
        let mut descriptor = AdvancedTxContextDescriptor::default();
        descriptor.vlan_macip_lens.0.copy_from_slice(&bytes[..4]);
        descriptor.seqnum_seed.0.copy_from_slice(&bytes[4..8]);
        descriptor.type_tucmd_mlhl.0.copy_from_slice(&bytes[8..12]);
        descriptor.mss_l4len_idx.0.copy_from_slice(&bytes[12..]);
        descriptor
    }

    /// MACLEN.
    pub fn mac_header_len(&self) -> usize {
        ((self.vlan_macip_lens.get() >> CONTEXT_MACLEN_SHIFT) as usize) & CONTEXT_MAX_MACLEN
    }

    /// IPLEN.
    pub fn ip_header_len(&self) -> usize {
        (self.vlan_macip_lens.get() & CONTEXT_IPLEN_MASK) as usize
    }

    /// Command bits (unknown bits dropped).
    pub fn command(&self) -> ContextCommand {
        ContextCommand::from_bits_truncate(self.type_tucmd_mlhl.get())
    }

    /// The slot (IDX) this context goes to.
    pub fn index(&self) -> usize {
        ((self.mss_l4len_idx.get() >> CONTEXT_INDEX_SHIFT) & 0x7) as usize
    }

    /// L4LEN.
    pub fn l4_header_len(&self) -> usize {
        ((self.mss_l4len_idx.get() >> CONTEXT_L4LEN_SHIFT) & 0xFF) as usize
    }

    /// MSS.
    pub fn mss(&self) -> usize {
        (self.mss_l4len_idx.get() >> CONTEXT_MSS_SHIFT) as usize
    }
}

/// Advanced RX descriptor, read format (what the driver writes to hand a buffer over).
#[derive(Clone, Copy, Default, PartialEq, Eq, Debug)]
#[repr(C)]
pub struct AdvancedRxReadDescriptor {
    /// Device address of the packet buffer.
    pub packet_address: Le64,
    /// Header buffer address (header split only; 0 here). Overlaps the write-back status, so
    /// writing 0 also clears a stale DD.
    pub header_address: Le64,
}

const _: () = assert!(size_of::<AdvancedRxReadDescriptor>() == DESCRIPTOR_SIZE);

impl AdvancedRxReadDescriptor {
    /// A descriptor offering the buffer at `packet_address`.
    pub fn new(packet_address: u64) -> Self {
        AdvancedRxReadDescriptor {
            packet_address: Le64::new(packet_address),
            header_address: Le64::new(0),
        }
    }

    /// The descriptor as the two little-endian words it occupies in memory.
    pub fn to_words(&self) -> [u64; 2] {
        [self.packet_address.get(), self.header_address.get()]
    }
}

/// Advanced RX descriptor, write-back format (what the device writes when a frame arrived).
#[derive(Clone, Copy, Default, PartialEq, Eq, Debug)]
#[repr(C)]
pub struct AdvancedRxWriteBack {
    /// RSS type (bits 3:0) and packet type (bits 16:4 of the dword).
    pub packet_info: Le16,
    /// Header length / split info.
    pub header_info: Le16,
    /// RSS hash or IP identification/checksum.
    pub rss_hash: Le32,
    /// [`RxStatus`] bits.
    pub status_error: Le32,
    /// Bytes written into the buffer.
    pub length: Le16,
    /// Stripped VLAN tag.
    pub vlan: Le16,
}

const _: () = assert!(size_of::<AdvancedRxWriteBack>() == DESCRIPTOR_SIZE);

impl AdvancedRxWriteBack {
    /// Decodes the two words read from memory.
    pub fn from_words(words: [u64; 2]) -> Self {
        let bytes = bytes_from_words(words);
        let mut descriptor = AdvancedRxWriteBack::default();
        descriptor.packet_info.0.copy_from_slice(&bytes[0..2]);
        descriptor.header_info.0.copy_from_slice(&bytes[2..4]);
        descriptor.rss_hash.0.copy_from_slice(&bytes[4..8]);
        descriptor.status_error.0.copy_from_slice(&bytes[8..12]);
        descriptor.length.0.copy_from_slice(&bytes[12..14]);
        descriptor.vlan.0.copy_from_slice(&bytes[14..16]);
        descriptor
    }

    /// The descriptor as the two little-endian words it occupies in memory (used by the fake
    /// device model to write back).
    pub fn to_words(&self) -> [u64; 2] {
        let mut bytes = [0u8; DESCRIPTOR_SIZE];
        bytes[0..2].copy_from_slice(&self.packet_info.0);
        bytes[2..4].copy_from_slice(&self.header_info.0);
        bytes[4..8].copy_from_slice(&self.rss_hash.0);
        bytes[8..12].copy_from_slice(&self.status_error.0);
        bytes[12..14].copy_from_slice(&self.length.0);
        bytes[14..16].copy_from_slice(&self.vlan.0);
        words_from_bytes(bytes)
    }

    /// Status and error bits (unknown bits dropped).
    pub fn status(&self) -> RxStatus {
        RxStatus::from_bits_truncate(self.status_error.get())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tx_descriptor_matches_the_layout_qemu_reads() {
        // Reference §6.1: a 60-byte frame is {addr, 60 | 0x2B300000, 60 << 14}.
        let descriptor = AdvancedTxDataDescriptor::single_buffer_frame(0x1234_5678_9ABC, 60);
        let words = descriptor.to_words();
        assert_eq!(words[0], 0x1234_5678_9ABC);
        assert_eq!(words[1] as u32, 0x2B30_0000 | 60);
        assert_eq!((words[1] >> 32) as u32, 60 << 14);
        assert!(!descriptor.is_done());
        let written_back = AdvancedTxDataDescriptor::from_words([words[0], words[1] | (1 << 32)]);
        assert!(written_back.is_done());
        assert_eq!(written_back.length(), 60);
    }

    #[test]
    fn context_descriptor_matches_the_layout_qemu_reads() {
        // QEMU `igb_process_tx_desc` reads vlan_macip_lens, seqnum_seed, type_tucmd_mlhl and
        // mss_l4len_idx as four little-endian dwords; IDX is bit 4 of the last one.
        let command = ContextCommand::DEXT
            | ContextCommand::DTYP_CONTEXT
            | ContextCommand::IPV4
            | ContextCommand::L4_TCP;
        let descriptor = AdvancedTxContextDescriptor {
            vlan_macip_lens: Le32::new(20 | (14 << CONTEXT_MACLEN_SHIFT)),
            seqnum_seed: Le32::new(0),
            type_tucmd_mlhl: Le32::new(command.bits()),
            mss_l4len_idx: Le32::new(
                (1448 << CONTEXT_MSS_SHIFT)
                    | (32 << CONTEXT_L4LEN_SHIFT)
                    | (1 << CONTEXT_INDEX_SHIFT),
            ),
        };
        let words = descriptor.to_words();
        assert_eq!(words[0], 0x0000_1C14);
        assert_eq!(words[1] as u32, 0x2020_0C00);
        assert_eq!((words[1] >> 32) as u32, 0x05A8_2010);
        let decoded = AdvancedTxContextDescriptor::from_words(words);
        assert_eq!(decoded, descriptor);
        assert_eq!(
            (decoded.mac_header_len(), decoded.ip_header_len()),
            (14, 20)
        );
        assert_eq!(
            (decoded.l4_header_len(), decoded.mss(), decoded.index()),
            (32, 1448, 1)
        );
        // A TSO data descriptor: TSE | DEXT | DTYP data | IFCS | EOP | RS.
        let data = AdvancedTxDataDescriptor::new(
            0x1000,
            1514,
            TxCommand::TSE | TxCommand::EOP | TxCommand::RS,
            (1448 << TX_PAYLEN_SHIFT) | TxOffloadOptions::L4_CHECKSUM.bits(),
        );
        assert_eq!(data.to_words()[1] as u32, 0xAB30_0000 | 1514);
    }

    #[test]
    fn rx_write_back_fields_sit_at_bytes_8_and_12() {
        // Reference §3.2: status_error in bytes 8-11, length in bytes 12-13.
        let words = [0u64, 0x0000_0040_0000_0003];
        let descriptor = AdvancedRxWriteBack::from_words(words);
        assert_eq!(descriptor.status(), RxStatus::DD | RxStatus::EOP);
        assert_eq!(descriptor.length.get(), 64);
        assert_eq!(descriptor.to_words(), words);
    }

    #[test]
    fn posting_a_buffer_clears_the_status_word() {
        let words = AdvancedRxReadDescriptor::new(0xABCD_0000).to_words();
        assert_eq!(words, [0xABCD_0000, 0]);
    }
}
