//! Register map of the 82576 physical function's BAR0 (128 KiB), as far as the lab PF responder
//! needs it. Only [`crate::lab_pf`] and the fake device model use this; the VF driver does not.
//!
//! Offsets and bits: 82576 datasheet §8 and Linux `igb/e1000_regs.h`, `e1000_defines.h`,
//! `e1000_mbx.h`; QEMU behaviour per reference §2.

/// Size of the PF register window.
pub const WINDOW_SIZE: usize = 128 * 1024;

/// Device control (RW).
pub const CTRL: usize = 0x0000;
/// [`CTRL`]: full device reset (self-clearing); sets RSTI in every VF mailbox.
pub const CTRL_RESET: u32 = 1 << 26;
/// Device status (RO).
pub const STATUS: usize = 0x0008;
/// [`STATUS`]: link up.
pub const STATUS_LINK_UP: u32 = 1 << 1;
/// Extended device control (RW).
pub const CTRL_EXT: usize = 0x0018;
/// [`CTRL_EXT`]: PF reset done; clears RSTI and sets RSTD in every VF mailbox.
pub const CTRL_EXT_PF_RESET_DONE: u32 = 1 << 14;
/// MDI (PHY register) control (RW).
pub const MDIC: usize = 0x0020;
/// [`MDIC`]: data field (bits 15:0).
pub const MDIC_DATA_MASK: u32 = 0xFFFF;
/// [`MDIC`]: PHY register shift (bits 20:16).
pub const MDIC_REGISTER_SHIFT: u32 = 16;
/// [`MDIC`]: PHY address shift (bits 25:21).
pub const MDIC_PHY_SHIFT: u32 = 21;
/// [`MDIC`]: write operation.
pub const MDIC_OP_WRITE: u32 = 1 << 26;
/// [`MDIC`]: the access completed.
pub const MDIC_READY: u32 = 1 << 28;
/// [`MDIC`]: the access failed.
pub const MDIC_ERROR: u32 = 1 << 30;
/// The internal PHY's MDIO address.
pub const PHY_ADDRESS: u32 = 1;
/// PHY basic mode control register.
pub const PHY_BMCR: u32 = 0;
/// BMCR: 1000 Mb/s.
pub const BMCR_SPEED_1000: u32 = 0x0040;
/// BMCR: full duplex.
pub const BMCR_FULL_DUPLEX: u32 = 0x0100;
/// BMCR: restart auto-negotiation (self-clearing).
pub const BMCR_RESTART_AUTONEG: u32 = 0x0200;
/// BMCR: auto-negotiation enable.
pub const BMCR_AUTONEG_ENABLE: u32 = 0x1000;
/// Interrupt cause read (RC).
pub const ICR: usize = 0x00C0;
/// Receive control (RW).
pub const RCTL: usize = 0x0100;
/// [`RCTL`]: receiver enable.
pub const RCTL_ENABLE: u32 = 1 << 1;
/// [`RCTL`]: strip the Ethernet CRC (else QEMU adds 4 bytes to every RX length).
pub const RCTL_STRIP_CRC: u32 = 1 << 26;
/// Transmit control (RW).
pub const TCTL: usize = 0x0400;
/// [`TCTL`]: transmitter enable.
pub const TCTL_ENABLE: u32 = 1 << 1;
/// DMA TX switch control (RW).
pub const DTXSWC: usize = 0x3500;
/// [`DTXSWC`]: VM-to-VM loopback.
pub const DTXSWC_LOOPBACK: u32 = 1 << 31;
/// General purpose interrupt enable (RW).
pub const GPIE: usize = 0x1514;
/// [`GPIE`]: MSI-X mode (needed for VF interrupts).
pub const GPIE_MSIX_MODE: u32 = 1 << 4;
/// Multicast table array: 128 registers of 32 hash bits.
pub const MTA: usize = 0x5200;
/// Number of [`MTA`] registers.
pub const MTA_REGISTERS: usize = 128;
/// Receive checksum control (RW; 82576 datasheet §8.10, receive registers). QEMU applies it to every
/// queue, VF queues included (`igb_build_rx_metadata`), and resets it to IPOFLD | TUOFLD.
pub const RXCSUM: usize = 0x5000;
/// [`RXCSUM`]: IPOFLD, check IPv4 header checksums and report IPCS/IPE.
pub const RXCSUM_IP_OFFLOAD: u32 = 1 << 8;
/// [`RXCSUM`]: TUOFLD, check TCP/UDP checksums and report TCPCS/UDPCS/L4E.
pub const RXCSUM_L4_OFFLOAD: u32 = 1 << 9;
/// [`RXCSUM`]: CRCOFL, check SCTP CRCs (Linux igb sets it on the 82576).
pub const RXCSUM_SCTP_OFFLOAD: u32 = 1 << 11;
/// [`RXCSUM`]: PCSD, report the RSS hash / IP ID instead of the raw packet checksum.
pub const RXCSUM_PACKET_CHECKSUM_DISABLE: u32 = 1 << 13;
/// Multiple receive queues command (RW).
pub const MRQC: usize = 0x5818;
/// [`MRQC`]: VMDq mode (pools select queues).
pub const MRQC_VMDQ: u32 = 0x3;
/// VMDq control (RW).
pub const VT_CTL: usize = 0x581C;
/// [`VT_CTL`]: drop unmatched frames instead of sending them to a default pool.
pub const VT_CTL_DISABLE_DEFAULT_POOL: u32 = 1 << 29;
/// Number of receive address (RAR) entries.
pub const RAR_ENTRIES: usize = 24;

/// Receive address low of RAR entry `index`.
pub const fn ral(index: usize) -> usize {
    if index < 16 {
        0x5400 + 8 * index
    } else {
        0x54E0 + 8 * (index - 16)
    }
}
/// Receive address high of RAR entry `index`.
pub const fn rah(index: usize) -> usize {
    ral(index) + 4
}
/// [`rah`]: the entry is valid.
pub const RAH_ADDRESS_VALID: u32 = 1 << 31;
/// [`rah`]: pool select bit of pool 0 (pool `n` is this shifted left by `n`).
pub const RAH_POOL_0: u32 = 1 << 18;

/// VM offload control of pool `vf` (RW).
pub const fn vmolr(vf: usize) -> usize {
    0x5AD0 + 4 * vf
}
/// [`vmolr`]: longest frame accepted, bits 13:0.
pub const VMOLR_RLPML_MASK: u32 = 0x3FFF;
/// [`vmolr`]: long packets (up to RLPML) accepted.
pub const VMOLR_LPE: u32 = 1 << 16;
/// [`vmolr`]: accept untagged frames.
pub const VMOLR_AUPE: u32 = 1 << 24;
/// [`vmolr`]: accept multicast matching the MTA.
pub const VMOLR_ROMPE: u32 = 1 << 25;
/// [`vmolr`]: accept unicast matching the UTA.
pub const VMOLR_ROPE: u32 = 1 << 26;
/// [`vmolr`]: accept broadcast.
pub const VMOLR_BAM: u32 = 1 << 27;
/// [`vmolr`]: multicast promiscuous.
pub const VMOLR_MPME: u32 = 1 << 28;
/// [`vmolr`]: strip the CRC.
pub const VMOLR_STRIP_CRC: u32 = 1 << 31;

/// PF side of VF `vf`'s mailbox control register (RW).
pub const fn p2v_mailbox(vf: usize) -> usize {
    0x0C00 + 4 * vf
}
/// VF side of VF `vf`'s mailbox control; reading it from the PF clears the VF's read-to-clear
/// bits in QEMU (`igb_mac_vfmailbox_read`), so the lab PF never reads it.
pub const fn v2p_mailbox(vf: usize) -> usize {
    0x0C40 + 4 * vf
}
/// First mailbox memory word of VF `vf`.
pub const fn vmbmem(vf: usize) -> usize {
    0x0800 + 0x40 * vf
}
/// [`p2v_mailbox`]: a PF message is in the buffer (raises the VF's PFSTS).
pub const P2V_STS: u32 = 1 << 0;
/// [`p2v_mailbox`]: the VF's message was received (raises the VF's PFACK).
pub const P2V_ACK: u32 = 1 << 1;
/// [`p2v_mailbox`]: the VF holds the buffer (RO mirror).
pub const P2V_VFU: u32 = 1 << 2;
/// [`p2v_mailbox`]: the PF holds the buffer; granted only while the VF does not.
pub const P2V_PFU: u32 = 1 << 3;
/// [`p2v_mailbox`]: force-release the VF's lock.
pub const P2V_RVFU: u32 = 1 << 4;
/// Mailbox interrupt causes (W1C): bit `vf` = VF request, bit `16 + vf` = VF acknowledgement.
pub const MBVFICR: usize = 0x0C80;
/// [`MBVFICR`]: request bit of VF 0.
pub const MBVFICR_REQUEST_0: u32 = 1 << 0;
/// [`MBVFICR`]: acknowledgement bit of VF 0.
pub const MBVFICR_ACK_0: u32 = 1 << 16;
/// Mailbox interrupt mask (RW).
pub const MBVFIMR: usize = 0x0C84;
/// VF function-level reset events (W1C): bit `vf` = VF was reset.
pub const VFLRE: usize = 0x0C88;
/// VF receive enables (RW): bit `vf`.
pub const VFRE: usize = 0x0C8C;
/// VF transmit enables (RW): bit `vf`.
pub const VFTE: usize = 0x0C90;

/// PF view of RX queue `queue`'s registers (VF `n` queue 0 is PF queue `n`): base of the block
/// that holds RDBAL at +0x00 … RXDCTL at +0x28.
pub const fn rx_queue_block(queue: usize) -> usize {
    0xC000 + 0x40 * queue
}
/// PF view of TX queue `queue`'s registers: TDBAL at +0x00 … TDWBAH at +0x3C.
pub const fn tx_queue_block(queue: usize) -> usize {
    0xE000 + 0x40 * queue
}

/// Control register of VF `vf` as the PF sees it (a write of RST there resets the VF).
pub const fn vf_control(vf: usize) -> usize {
    0x10000 + 0x100 * vf
}

/// Most VFs the 82576 offers.
pub const MAX_VFS: usize = 8;
