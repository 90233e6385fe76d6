//! Register map of the 82576/I350 virtual function's BAR0 (16 KiB): offsets and bit definitions.
//!
//! Offsets are from the VF's own window (82576 datasheet §8.26 "Virtual Function Registers",
//! Linux `igbvf/regs.h` for the same facts). Access class is noted per register: RO read-only,
//! RW read/write, RC cleared by reading, W1C write one to clear, WO write-only.
//! Under QEMU (`hw/net/igbvf.c`) the window is a translation table onto the PF register file;
//! offsets not listed here read 0 there.

use bitflags::bitflags;

/// Size of the VF register window (BAR0).
pub const WINDOW_SIZE: usize = 16 * 1024;

/// VF control (RW). Only [`Control::RESET`] acts on a VF.
pub const CTRL: usize = 0x0000;
/// Device status (RO): a mirror of the PF's STATUS register.
pub const STATUS: usize = 0x0008;
/// Free-running timer (RO).
pub const FRTIMER: usize = 0x1048;

/// Extended interrupt cause set (WO): software-raised causes, one bit per MSI-X vector.
pub const VTEICS: usize = 0x1520;
/// Extended interrupt mask set/read (RW): one bit per MSI-X vector.
pub const VTEIMS: usize = 0x1524;
/// Extended interrupt mask clear (WO).
pub const VTEIMC: usize = 0x1528;
/// Extended interrupt auto-clear (RW): causes cleared when their MSI-X message is sent.
pub const VTEIAC: usize = 0x152C;
/// Extended interrupt auto-mask (RW).
pub const VTEIAM: usize = 0x1530;
/// Extended interrupt cause read (RC/W1C): one bit per MSI-X vector.
pub const VTEICR: usize = 0x1580;
/// Interrupt throttle for MSI-X vector `n` (RW), n in 0..3.
pub const fn vteitr(n: usize) -> usize {
    0x1680 + 4 * n
}
/// Interrupt vector allocation for queue 0 (RW): byte 0 RX, byte 1 TX, each `vector | VALID`.
pub const VTIVAR: usize = 0x1700;
/// Interrupt vector allocation for "other" causes, i.e. the mailbox (RW): `vector | VALID`.
pub const VTIVAR_MISC: usize = 0x1740;
/// The valid bit of one [`VTIVAR`]/[`VTIVAR_MISC`] entry.
pub const IVAR_VALID: u32 = 0x80;

/// VF side of the PF↔VF mailbox control register (RW, some bits RC): [`Mailbox`] bits.
pub const V2PMAILBOX: usize = 0x0C40;
/// First of the 16 shared mailbox message words (RW).
pub const VMBMEM: usize = 0x0800;
/// Number of 32-bit words in the mailbox memory.
pub const MAILBOX_WORDS: usize = 16;

/// RX descriptor ring base, low 32 bits (RW), queue 0.
pub const RDBAL: usize = 0x2800;
/// RX descriptor ring base, high 32 bits (RW), queue 0.
pub const RDBAH: usize = 0x2804;
/// RX descriptor ring length in bytes (RW), a multiple of 128.
pub const RDLEN: usize = 0x2808;
/// Split-and-replication RX control (RW): [`SplitRxControl`] bits.
pub const SRRCTL: usize = 0x280C;
/// RX descriptor head (RO for software after enable), queue 0.
pub const RDH: usize = 0x2810;
/// RX descriptor tail (RW): one past the last descriptor handed to the device.
pub const RDT: usize = 0x2818;
/// RX descriptor control (RW): [`QueueControl`] bits and thresholds.
pub const RXDCTL: usize = 0x2828;
/// RX queue drop packet count (RC).
pub const RQDPC: usize = 0x2830;

/// TX descriptor ring base, low 32 bits (RW), queue 0.
pub const TDBAL: usize = 0x3800;
/// TX descriptor ring base, high 32 bits (RW), queue 0.
pub const TDBAH: usize = 0x3804;
/// TX descriptor ring length in bytes (RW), a multiple of 128.
pub const TDLEN: usize = 0x3808;
/// TX descriptor head (RO for software after enable), queue 0.
pub const TDH: usize = 0x3810;
/// TX descriptor tail (RW): writing it starts transmission up to (not including) this index.
pub const TDT: usize = 0x3818;
/// TX descriptor control (RW): [`QueueControl`] bits and thresholds.
pub const TXDCTL: usize = 0x3828;
/// TX head write-back address, low 32 bits (RW); bit 0 enables head write-back.
pub const TDWBAL: usize = 0x3838;
/// TX head write-back address, high 32 bits (RW).
pub const TDWBAH: usize = 0x383C;

/// Good packets received by this VF (RO, 32-bit, wraps; not cleared on read).
pub const VFGPRC: usize = 0x0F10;
/// Good packets transmitted by this VF (RO, 32-bit, wraps).
pub const VFGPTC: usize = 0x0F14;
/// Good octets received by this VF (RO, 32-bit, wraps).
pub const VFGORC: usize = 0x0F18;
/// Good octets transmitted by this VF (RO, 32-bit, wraps).
pub const VFGOTC: usize = 0x0F34;
/// Multicast packets received by this VF (RO, 32-bit, wraps).
pub const VFMPRC: usize = 0x0F3C;

/// Vendor ID of every device this driver supports (Intel).
pub const INTEL_VENDOR_ID: u16 = 0x8086;
/// PCI device ID of the 82576 virtual function.
pub const DEVICE_ID_82576_VF: u16 = 0x10CA;
/// PCI device ID of the I350 virtual function.
pub const DEVICE_ID_I350_VF: u16 = 0x1520;

/// True for the PCI IDs this driver handles (the VF's own config space reads 0xFFFF for both on
/// QEMU; the kernel takes the device ID from the PF's SR-IOV capability).
pub fn is_supported_device(vendor: u16, device: u16) -> bool {
    vendor == INTEL_VENDOR_ID && matches!(device, DEVICE_ID_82576_VF | DEVICE_ID_I350_VF)
}

bitflags! {
    /// [`CTRL`] bits a VF may use.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Control: u32 {
        /// Resets the VF's queues and interrupts (self-clearing).
        const RESET = 1 << 26;
    }
}

bitflags! {
    /// [`STATUS`] bits (mirror of the PF's STATUS).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Status: u32 {
        /// Full duplex.
        const FULL_DUPLEX = 1 << 0;
        /// Link up.
        const LINK_UP = 1 << 1;
        /// Transmission paused by flow control (a stalled TX queue is then not a hang).
        const TX_OFF = 1 << 4;
        /// Speed 100 Mb/s.
        const SPEED_100 = 1 << 6;
        /// Speed 1000 Mb/s.
        const SPEED_1000 = 1 << 7;
        /// PCIe master enable status.
        const GIO_MASTER_ENABLE = 1 << 19;
    }
}

bitflags! {
    /// [`V2PMAILBOX`] bits (82576 datasheet §8.26.6, Linux `igbvf/mbx.h`).
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
    pub struct Mailbox: u32 {
        /// VF → PF: a message is in the buffer (WO; raises the PF's mailbox interrupt).
        const REQ = 1 << 0;
        /// VF → PF: the PF's message was received (WO).
        const ACK = 1 << 1;
        /// The VF holds the buffer lock (RW; granted only while the PF does not hold it).
        const VFU = 1 << 2;
        /// The PF holds the buffer lock (RO).
        const PFU = 1 << 3;
        /// The PF wrote a message (RC).
        const PFSTS = 1 << 4;
        /// The PF acknowledged the VF's message (RC).
        const PFACK = 1 << 5;
        /// The PF is in reset (RO; cleared when the PF sets CTRL_EXT.PFRSTD).
        const RSTI = 1 << 6;
        /// The PF finished a reset (RC).
        const RSTD = 1 << 7;
        /// All bits the hardware clears when the register is read; drivers must latch them.
        const READ_TO_CLEAR = Self::PFSTS.bits() | Self::PFACK.bits() | Self::RSTD.bits();
    }
}

bitflags! {
    /// [`SRRCTL`] bits.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct SplitRxControl: u32 {
        /// Packet buffer size in 1 KiB units (bits 6:0); see [`srrctl_buffer_size`].
        const BSIZEPACKET_MASK = 0x7F;
        /// Advanced one-buffer descriptors.
        const DESCTYPE_ADVANCED_ONE_BUFFER = 0x0200_0000;
        /// Drop frames when no descriptor is free instead of blocking the shared packet buffer.
        const DROP_ENABLE = 0x8000_0000;
    }
}

/// The [`SplitRxControl::BSIZEPACKET_MASK`] field for a buffer of `bytes` (a multiple of 1 KiB).
pub const fn srrctl_buffer_size(bytes: usize) -> u32 {
    ((bytes / 1024) as u32) & SplitRxControl::BSIZEPACKET_MASK.bits()
}

bitflags! {
    /// [`RXDCTL`]/[`TXDCTL`] bits.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct QueueControl: u32 {
        /// Write-back threshold of 1 (bits 20:16): write descriptors back as soon as done.
        const WTHRESH_1 = 1 << 16;
        /// Queue enable; reads back set once the queue runs and clear once it stopped.
        const ENABLE = 1 << 25;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffer_size_field_is_in_kibibytes() {
        assert_eq!(srrctl_buffer_size(2048), 2);
        assert_eq!(srrctl_buffer_size(16 * 1024), 16);
    }

    #[test]
    fn both_vf_models_are_recognised_and_the_pf_is_not() {
        assert!(is_supported_device(0x8086, 0x10CA));
        assert!(is_supported_device(0x8086, 0x1520));
        assert!(!is_supported_device(0x8086, 0x10C9));
        assert!(!is_supported_device(0x1AF4, 0x10CA));
    }
}
