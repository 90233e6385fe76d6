//! The lab PF responder: PF-side programming and mailbox answers for QEMU test VMs.
//!
//! QEMU emulates the 82576 PF hardware but no PF *driver* runs anywhere, so nothing would
//! enable the VFs, bring the link up, program the MAC filters or answer the VF's mailbox
//! (reference §2, §7.1). In test images the kernel therefore owns the PF too, and this module
//! does what Linux's igb does for its VFs (`igb_vf_reset_msg`, `igb_rcv_msg_from_vf`,
//! `igb_msg_task`, `igb_ping_all_vfs`; facts only). It is *not* part of the VF driver: the
//! driver never uses it, and product images never construct it.
//!
//! Single-threaded use: the VF driver's wait loops call [`WaitHost::idle`]; the kernel's
//! implementation calls [`LabPf::service`] there, and also from its main loop (or the PF's
//! mailbox interrupt, ICR.VMMB).
//!
//! Policy (mirrors Linux igb):
//! * VF_RESET → forget the VF's settings, program its MAC filter, enable its RX/TX, reply ACK +
//!   MAC (NACK when the lab has no MAC for it); the VF is then clear to send (CTS).
//! * Before VF_RESET every other request is NACKed without CTS.
//! * SET_MAC_ADDR is refused when the lab was configured with a MAC for that VF (the
//!   "administratively set" case); otherwise any valid unicast MAC is accepted. Extra unicast
//!   filters (MAC_FILTER_ADD) are refused: the lab keeps one filter per VF.
//! * SET_MULTICAST programs the MTA, SET_LPE the pool's max frame, SET_PROMISC the pool's
//!   multicast promiscuity. SET_VLAN and unknown messages (including ixgbe's API negotiation,
//!   0x08) are NACKed — the lab programs no VLAN filters.
//! * A VF function reset (VFLRE: VF CTRL.RST, FLR, VF enable toggles) forgets the VF's state.
//! * A VF that acknowledges a message while not clear to send gets a NACK, which tells it to
//!   redo VF_RESET (Linux `igb_rcv_ack_from_vf`).
//! * PF link changes are announced to every VF with PF_CONTROL_MSG.

use crate::hw::{WaitLimits, WaitOutcome, status_means_removed, wait_for};
use crate::mailbox::{self as message, MAX_MULTICAST_HASHES};
use crate::pf_regs as pf;
use crate::regs::MAILBOX_WORDS;
use crate::{Error, WaitHost};
use alloc::vec::Vec;
use net_device::{MacAddress, RegisterIo};

/// The PF's SR-IOV controls, implemented by the kernel's PCI code over the PF's SR-IOV
/// capability (reference §1: VF BARs, NumVFs, VF Enable|VF MSE, and each VF's own COMMAND
/// MEM+BME, which QEMU needs).
pub trait SriovControl {
    /// TotalVFs of the PF.
    fn total_vfs(&self) -> u16;
    /// Enables `count` VFs (programming their BARs and COMMAND registers). Every VF starts
    /// freshly reset.
    fn enable_vfs(&mut self, count: u16) -> Result<(), Error>;
    /// Clears VF Enable: every VF is reset and vanishes (its registers read 0 under QEMU) —
    /// the lab's surprise removal.
    fn disable_vfs(&mut self);
    /// VFs currently enabled.
    fn enabled_vfs(&self) -> u16;
    /// Function-level reset of VF `vf` (VF DEVCTL initiate-FLR).
    fn function_level_reset(&mut self, vf: u16) -> Result<(), Error>;
}

/// Largest frame a VF may ask for with SET_LPE (the 82576's pool limit, VMOLR.RLPML reset
/// value 0x2600).
pub const MAX_VF_FRAME_SIZE: u32 = 0x2600;
/// Smallest SET_LPE value accepted (a minimum Ethernet frame with FCS).
pub const MIN_VF_FRAME_SIZE: u32 = 64;
/// VMOLR of a VF that has just been reset: strip CRC, broadcast (ARP needs it), untagged frames,
/// QEMU's reset RLPML.
const VMOLR_DEFAULT: u32 = pf::VMOLR_STRIP_CRC | pf::VMOLR_BAM | pf::VMOLR_AUPE | 0x2600;

/// Lab PF settings.
#[derive(Clone, Debug)]
pub struct LabPfConfig {
    /// VFs to enable (1..=TotalVFs, at most 8).
    pub num_vfs: u16,
    /// Per VF: the MAC the lab assigns (as an administrator would; in the product, the
    /// synthetic NIC's MAC). `None` = no MAC: VF_RESET is NACKed and the VF may pick its own.
    /// Missing entries count as `None`.
    pub vf_macs: Vec<Option<MacAddress>>,
    /// Bound on waiting for the link after restarting auto-negotiation (QEMU: 500 ms).
    pub link_timeout_ns: u64,
    /// Bound on one PHY register access.
    pub phy_timeout_ns: u64,
    /// Iteration bound of every wait loop.
    pub max_wait_iterations: u32,
    /// Set GPIE.MSIX_MODE so VF interrupts are delivered (reference §2.1 step 12).
    pub enable_vf_interrupts: bool,
    /// Switch VF↔VF traffic inside the NIC (DTXSWC loopback, reference §2.1 step 13).
    pub vf_loopback: bool,
    /// Receive checksum offload (RXCSUM IPOFLD, TUOFLD, CRCOFL), as a Linux igb PF leaves it.
    /// Off, the VFs report no checksum results and the stack sums every frame; QEMU 10.0.2's
    /// igb then skips its receive-checksum validation, which a crafted SCTP frame crashes
    /// (`tests/qemu-bugs/igb-sctp-checksum`).
    pub receive_checksum_offload: bool,
}

impl Default for LabPfConfig {
    fn default() -> Self {
        LabPfConfig {
            num_vfs: 1,
            vf_macs: Vec::new(),
            link_timeout_ns: 2_000_000_000,
            phy_timeout_ns: 10_000_000,
            max_wait_iterations: 1_000_000,
            enable_vf_interrupts: true,
            vf_loopback: false,
            receive_checksum_offload: true,
        }
    }
}

/// What the lab PF did, for tests and logs.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct LabPfCounters {
    /// VF messages read.
    pub requests: u64,
    /// Replies with ACK.
    pub acks_sent: u64,
    /// Replies with NACK (refusals, not-clear-to-send answers).
    pub nacks_sent: u64,
    /// VF_RESET requests handled.
    pub vf_resets: u64,
    /// VF function resets (VFLRE) handled.
    pub function_resets: u64,
    /// PF_CONTROL_MSG messages sent.
    pub control_messages: u64,
    /// PF link transitions seen.
    pub link_changes: u64,
    /// Messages that had to wait because the VF held the mailbox or had not read the last one.
    pub deferred_messages: u64,
    /// Requests of unknown type.
    pub unknown_requests: u64,
}

#[derive(Clone, Debug)]
struct VfRecord {
    mac: Option<MacAddress>,
    administrative_mac: bool,
    clear_to_send: bool,
    link_up: bool,
    multicast: Vec<u16>,
    multicast_promiscuous: bool,
    max_frame: Option<u32>,
    /// A message (word 0 only: control message or NACK) waiting to be sent.
    outbox: Option<u32>,
    /// A reply that could not be written yet because the VF held the buffer.
    pending_reply: Option<([u32; 3], usize)>,
    /// A request whose reading failed (buffer busy) and must be retried.
    request_pending: bool,
    /// We sent a message the VF has not acknowledged; do not overwrite it.
    awaiting_ack: bool,
    last_sent_nack: bool,
}

impl VfRecord {
    fn new(mac: Option<MacAddress>) -> Self {
        VfRecord {
            mac,
            administrative_mac: mac.is_some(),
            clear_to_send: false,
            link_up: true,
            multicast: Vec::new(),
            multicast_promiscuous: false,
            max_frame: None,
            outbox: None,
            pending_reply: None,
            request_pending: false,
            awaiting_ack: false,
            last_sent_nack: false,
        }
    }

    /// Back to the state of a VF that has not talked to us yet (keeps an administrative MAC).
    fn forget(&mut self) {
        if !self.administrative_mac {
            self.mac = None;
        }
        self.clear_to_send = false;
        self.multicast.clear();
        self.multicast_promiscuous = false;
        self.max_frame = None;
        self.outbox = None;
        self.pending_reply = None;
        self.request_pending = false;
        self.awaiting_ack = false;
        self.last_sent_nack = false;
    }

    /// CTS flag for messages to this VF: it completed VF_RESET and its (lab) link is up.
    fn cts_flag(&self) -> u32 {
        if self.clear_to_send && self.link_up {
            message::MSGTYPE_CTS
        } else {
            0
        }
    }
}

/// The lab PF responder over the PF's BAR0 (`R`, 128 KiB) and SR-IOV controls (`S`).
pub struct LabPf<R: RegisterIo, S: SriovControl> {
    regs: R,
    sriov: S,
    config: LabPfConfig,
    vfs: Vec<VfRecord>,
    pf_link_up: bool,
    present: bool,
    vfs_enabled: bool,
    counters: LabPfCounters,
}

impl<R: RegisterIo, S: SriovControl> LabPf<R, S> {
    /// Checks the configuration; touches no hardware.
    pub fn new(regs: R, sriov: S, config: LabPfConfig) -> Result<Self, Error> {
        let total = sriov.total_vfs().min(pf::MAX_VFS as u16);
        if config.num_vfs == 0 || config.num_vfs > total {
            return Err(Error::SriovEnable {
                requested: config.num_vfs,
                reason: "outside 1..=TotalVFs",
            });
        }
        if config
            .vf_macs
            .iter()
            .flatten()
            .any(|mac| !mac.is_valid_unicast())
        {
            return Err(Error::InvalidConfig {
                reason: "lab VF MACs must be unicast and not zero",
            });
        }
        if config.max_wait_iterations == 0 {
            return Err(Error::InvalidConfig {
                reason: "max_wait_iterations must not be 0",
            });
        }
        let vfs = (0..usize::from(config.num_vfs))
            .map(|vf| VfRecord::new(config.vf_macs.get(vf).copied().flatten()))
            .collect();
        Ok(LabPf {
            regs,
            sriov,
            config,
            vfs,
            pf_link_up: false,
            present: true,
            vfs_enabled: false,
            counters: LabPfCounters::default(),
        })
    }

    /// Enables the VFs and programs the PF (reference §2.1). Returns whether the link came up
    /// within [`LabPfConfig::link_timeout_ns`]; if not, VFs report link down until it does and
    /// [`LabPf::service`] announces the change.
    pub fn bring_up(&mut self, host: &mut dyn WaitHost) -> Result<bool, Error> {
        self.sriov.enable_vfs(self.config.num_vfs)?;
        self.vfs_enabled = true;
        self.vfs.iter_mut().for_each(VfRecord::forget);
        self.program_pf(host)
    }

    /// PF software reset (CTRL.RST: every VF sees RSTI) followed by the full PF programming,
    /// which ends with PFRSTD (every VF sees RSTD and must re-initialise). VF enables in PCI
    /// config space survive a PF CTRL.RST.
    pub fn reset_pf(&mut self, host: &mut dyn WaitHost) -> Result<bool, Error> {
        self.ensure_present()?;
        self.regs.write32(pf::CTRL, pf::CTRL_RESET);
        self.vfs.iter_mut().for_each(VfRecord::forget);
        self.program_pf(host)
    }

    fn ensure_present(&mut self) -> Result<(), Error> {
        let status = self.regs.read32(pf::STATUS);
        if status_means_removed(status) {
            self.present = false;
            return Err(Error::DeviceGone {
                operation: "lab PF",
                status,
            });
        }
        Ok(())
    }

    fn limits(&self, timeout_ns: u64) -> WaitLimits {
        WaitLimits {
            timeout_ns,
            max_iterations: self.config.max_wait_iterations,
        }
    }

    fn program_pf(&mut self, host: &mut dyn WaitHost) -> Result<bool, Error> {
        self.ensure_present()?;
        // Step 3: link up by restarting auto-negotiation on the internal PHY (BMCR).
        let bmcr = pf::BMCR_AUTONEG_ENABLE
            | pf::BMCR_RESTART_AUTONEG
            | pf::BMCR_FULL_DUPLEX
            | pf::BMCR_SPEED_1000;
        self.write_phy(host, pf::PHY_BMCR, bmcr)?;
        // Steps 4-5: VMDq pools; frames matching no filter are dropped, not sent to a default
        // pool (which would be VF 0).
        self.regs.write32(pf::MRQC, pf::MRQC_VMDQ);
        self.regs
            .write32(pf::VT_CTL, pf::VT_CTL_DISABLE_DEFAULT_POOL);
        // Steps 6-7: per-VF filters and pool settings; RX/TX enables wait for VF_RESET.
        self.regs.write32(pf::VFRE, 0);
        self.regs.write32(pf::VFTE, 0);
        for vf in 0..self.vfs.len() {
            self.program_vf_filters(vf);
        }
        self.program_multicast_table();
        // Receive checksum offload for every pool, as a Linux igb PF leaves it (`igb_setup_mrqc`
        // relies on IPOFLD/TUOFLD defaulting to 1 and adds PCSD | CRCOFL); set explicitly so the
        // VFs' IPCS/TCPCS/UDPCS reports do not depend on reset defaults.
        let rxcsum = self.regs.read32(pf::RXCSUM);
        let offloads = pf::RXCSUM_IP_OFFLOAD | pf::RXCSUM_L4_OFFLOAD | pf::RXCSUM_SCTP_OFFLOAD;
        self.regs.write32(
            pf::RXCSUM,
            if self.config.receive_checksum_offload {
                rxcsum | offloads | pf::RXCSUM_PACKET_CHECKSUM_DISABLE
            } else {
                (rxcsum & !offloads) | pf::RXCSUM_PACKET_CHECKSUM_DISABLE
            },
        );
        // Steps 8-9: receiver (stripping the CRC so lengths are frame lengths) and transmitter.
        self.regs
            .write32(pf::RCTL, pf::RCTL_ENABLE | pf::RCTL_STRIP_CRC);
        let tctl = self.regs.read32(pf::TCTL);
        self.regs.write32(pf::TCTL, tctl | pf::TCTL_ENABLE);
        // Step 12 before step 10, so interrupts work once VFs start.
        if self.config.enable_vf_interrupts {
            let gpie = self.regs.read32(pf::GPIE);
            self.regs.write32(pf::GPIE, gpie | pf::GPIE_MSIX_MODE);
        }
        if self.config.vf_loopback {
            let dtxswc = self.regs.read32(pf::DTXSWC);
            self.regs.write32(pf::DTXSWC, dtxswc | pf::DTXSWC_LOOPBACK);
        }
        // Stale events from before: every VF starts from scratch anyway.
        self.regs.write32(pf::VFLRE, u32::MAX);
        self.regs.write32(pf::MBVFICR, u32::MAX);
        // Step 10: PF reset done: clears RSTI in every VF mailbox.
        let ctrl_ext = self.regs.read32(pf::CTRL_EXT);
        self.regs
            .write32(pf::CTRL_EXT, ctrl_ext | pf::CTRL_EXT_PF_RESET_DONE);

        let regs = &self.regs;
        let link = wait_for(host, self.limits(self.config.link_timeout_ns), || {
            Ok((regs.read32(pf::STATUS) & pf::STATUS_LINK_UP != 0).then_some(()))
        })?;
        self.pf_link_up = matches!(link, WaitOutcome::Done(()));
        if self.pf_link_up {
            log::info!("lab PF: up with {} VFs, link up", self.vfs.len());
        } else if self.config.link_timeout_ns == 0 {
            log::info!(
                "lab PF: up with {} VFs; link comes up when auto-negotiation ends",
                self.vfs.len()
            );
        } else {
            log::warn!(
                "lab PF: link still down after {} ns",
                self.config.link_timeout_ns
            );
        }
        Ok(self.pf_link_up)
    }

    /// MDIC write of PHY register `register` (datasheet §8.2.4), bounded.
    fn write_phy(
        &mut self,
        host: &mut dyn WaitHost,
        register: u32,
        data: u32,
    ) -> Result<(), Error> {
        let command = pf::MDIC_OP_WRITE
            | (pf::PHY_ADDRESS << pf::MDIC_PHY_SHIFT)
            | (register << pf::MDIC_REGISTER_SHIFT)
            | (data & pf::MDIC_DATA_MASK);
        self.regs.write32(pf::MDIC, command);
        let regs = &self.regs;
        let outcome = wait_for(host, self.limits(self.config.phy_timeout_ns), || {
            let mdic = regs.read32(pf::MDIC);
            Ok((mdic & pf::MDIC_READY != 0).then_some(mdic))
        })?;
        match outcome {
            WaitOutcome::Done(mdic) if mdic & pf::MDIC_ERROR == 0 => Ok(()),
            WaitOutcome::Done(mdic) => Err(Error::PhyAccess { register, mdic }),
            WaitOutcome::TimedOut { .. } => Err(Error::PhyAccess {
                register,
                mdic: self.regs.read32(pf::MDIC),
            }),
        }
    }

    /// RAR entry of VF `vf` (Linux: entry 23 - vf) and its pool's VMOLR.
    fn program_vf_filters(&mut self, vf: usize) {
        let entry = pf::RAR_ENTRIES - 1 - vf;
        match self.vfs[vf].mac {
            Some(mac) => {
                let words = message::pack_mac(mac);
                self.regs.write32(pf::ral(entry), words[0]);
                self.regs.write32(
                    pf::rah(entry),
                    words[1] | pf::RAH_ADDRESS_VALID | (pf::RAH_POOL_0 << vf),
                );
            }
            None => {
                self.regs.write32(pf::rah(entry), 0);
                self.regs.write32(pf::ral(entry), 0);
            }
        }
        let record = &self.vfs[vf];
        let mut vmolr = VMOLR_DEFAULT;
        if let Some(size) = record.max_frame {
            vmolr = (vmolr & !pf::VMOLR_RLPML_MASK) | size | pf::VMOLR_LPE;
        }
        if record.multicast_promiscuous {
            vmolr |= pf::VMOLR_MPME;
        } else if !record.multicast.is_empty() {
            vmolr |= pf::VMOLR_ROMPE;
        }
        self.regs.write32(pf::vmolr(vf), vmolr);
    }

    /// The MTA holds the union of every VF's multicast hashes (the table is shared).
    fn program_multicast_table(&mut self) {
        let mut table = [0u32; pf::MTA_REGISTERS];
        for hash in self.vfs.iter().flat_map(|record| record.multicast.iter()) {
            let hash = usize::from(*hash & 0x0FFF);
            table[(hash >> 5) & 0x7F] |= 1 << (hash & 0x1F);
        }
        for (index, bits) in table.iter().enumerate() {
            self.regs.write32(pf::MTA + 4 * index, *bits);
        }
    }

    fn set_traffic_enables(&mut self, vf: usize) {
        let record = &self.vfs[vf];
        let on = record.clear_to_send && record.link_up;
        for register in [pf::VFRE, pf::VFTE] {
            let value = self.regs.read32(register);
            let value = if on {
                value | (1 << vf)
            } else {
                value & !(1 << vf)
            };
            self.regs.write32(register, value);
        }
    }

    /// Answers everything pending: VF function resets, VF requests, VF acknowledgements, PF
    /// link changes, and queued messages. Never waits; call it often (and from the VF's wait
    /// hook).
    pub fn service(&mut self) {
        if !self.present {
            return;
        }
        let status = self.regs.read32(pf::STATUS);
        if status_means_removed(status) {
            log::error!("lab PF: PF gone (STATUS {status:#010x})");
            self.present = false;
            return;
        }
        if !self.vfs_enabled {
            return;
        }
        let link_up = status & pf::STATUS_LINK_UP != 0;
        if link_up != self.pf_link_up {
            self.pf_link_up = link_up;
            self.counters.link_changes += 1;
            log::info!("lab PF: link {}", if link_up { "up" } else { "down" });
            for vf in 0..self.vfs.len() {
                self.queue_message(vf, message::PF_CONTROL_MSG);
            }
        }

        // Function resets first: a VF resets itself before it sends VF_RESET, so handling them
        // in this order never undoes an admission (Linux `igb_msg_task` does the same).
        let mask = (1u32 << self.vfs.len()) - 1;
        let resets = self.regs.read32(pf::VFLRE) & mask;
        if resets != 0 {
            self.regs.write32(pf::VFLRE, resets);
            for vf in (0..self.vfs.len()).filter(|vf| resets & (1 << vf) != 0) {
                self.counters.function_resets += 1;
                log::info!("lab PF: VF {vf} was reset");
                self.vfs[vf].forget();
                self.program_vf_filters(vf);
            }
            self.program_multicast_table();
        }

        let causes = self.regs.read32(pf::MBVFICR);
        let requests = causes & mask;
        let acks = causes & (mask << 16);
        // Clear before reading so a message sent meanwhile raises the bit again.
        if requests | acks != 0 {
            self.regs.write32(pf::MBVFICR, requests | acks);
        }
        for vf in 0..self.vfs.len() {
            if requests & (pf::MBVFICR_REQUEST_0 << vf) != 0 || self.vfs[vf].request_pending {
                self.handle_request(vf);
            }
            if acks & (pf::MBVFICR_ACK_0 << vf) != 0 {
                self.handle_ack(vf);
            }
            self.flush_outbox(vf);
        }
    }

    /// Takes the buffer lock; false while the VF holds it.
    fn lock(&mut self, vf: usize) -> bool {
        self.regs.write32(pf::p2v_mailbox(vf), pf::P2V_PFU);
        if self.regs.read32(pf::p2v_mailbox(vf)) & pf::P2V_PFU != 0 {
            return true;
        }
        // Not ours by the read-back; drop any claim anyway, in case the read lied (a lock the
        // PF holds with nothing to send would shut the VF out of its mailbox for good).
        self.regs.write32(pf::p2v_mailbox(vf), 0);
        false
    }

    /// Writes a message to VF `vf` and raises STS; false if the VF held the buffer.
    fn write_message(&mut self, vf: usize, words: &[u32]) -> bool {
        if !self.lock(vf) {
            self.counters.deferred_messages += 1;
            return false;
        }
        for (index, word) in words.iter().take(MAILBOX_WORDS).enumerate() {
            self.regs.write32(pf::vmbmem(vf) + 4 * index, *word);
        }
        // STS without PFU also releases the lock.
        self.regs.write32(pf::p2v_mailbox(vf), pf::P2V_STS);
        let record = &mut self.vfs[vf];
        record.awaiting_ack = true;
        record.last_sent_nack = words[0] & message::MSGTYPE_NACK != 0;
        if words[0] & message::MSGTYPE_NACK != 0 {
            self.counters.nacks_sent += 1;
        } else if words[0] & message::MSGTYPE_ACK != 0 {
            self.counters.acks_sent += 1;
        }
        true
    }

    /// Queues a one-word message (control message or NACK); the CTS flag is added when sent.
    fn queue_message(&mut self, vf: usize, word: u32) {
        if word == message::PF_CONTROL_MSG {
            self.counters.control_messages += 1;
        }
        self.vfs[vf].outbox = Some(word);
    }

    fn flush_outbox(&mut self, vf: usize) {
        if let Some((reply, len)) = self.vfs[vf].pending_reply {
            if self.write_message(vf, &reply[..len]) {
                self.vfs[vf].pending_reply = None;
            }
            return;
        }
        if self.vfs[vf].awaiting_ack {
            return;
        }
        if let Some(word) = self.vfs[vf].outbox {
            let word = if word == message::PF_CONTROL_MSG {
                word | self.vfs[vf].cts_flag()
            } else {
                word
            };
            if self.write_message(vf, &[word]) {
                self.vfs[vf].outbox = None;
            }
        }
    }

    fn handle_request(&mut self, vf: usize) {
        if !self.lock(vf) {
            // The VF is still holding the buffer; try again on the next pass.
            self.vfs[vf].request_pending = true;
            return;
        }
        self.vfs[vf].request_pending = false;
        let mut request = [0u32; MAILBOX_WORDS];
        for (index, word) in request.iter_mut().enumerate() {
            *word = self.regs.read32(pf::vmbmem(vf) + 4 * index);
        }
        // ACK without PFU: "received", and the lock is released.
        self.regs.write32(pf::p2v_mailbox(vf), pf::P2V_ACK);
        self.counters.requests += 1;
        // A VF writing a request has consumed whatever we sent before.
        self.vfs[vf].awaiting_ack = false;

        let word = request[0];
        if word & (message::MSGTYPE_ACK | message::MSGTYPE_NACK) != 0 {
            // Already-processed message echoed back: nothing to do (Linux does the same).
            return;
        }
        let (reply, len) = if message::message_type(word) == message::VF_RESET {
            (self.vf_reset_request(vf), 3)
        } else if !self.vfs[vf].clear_to_send {
            ([word | message::MSGTYPE_NACK, 0, 0], 1)
        } else {
            let accepted = self.configuration_request(vf, &request);
            let flag = if accepted {
                message::MSGTYPE_ACK
            } else {
                message::MSGTYPE_NACK
            };
            ([word | flag | self.vfs[vf].cts_flag(), 0, 0], 1)
        };
        if !self.write_message(vf, &reply[..len]) {
            self.vfs[vf].pending_reply = Some((reply, len));
        }
    }

    /// Linux `igb_vf_reset_msg`: forget, filters, enables, reply with the MAC.
    fn vf_reset_request(&mut self, vf: usize) -> [u32; 3] {
        self.counters.vf_resets += 1;
        let record = &mut self.vfs[vf];
        record.forget();
        record.clear_to_send = true;
        self.program_vf_filters(vf);
        self.program_multicast_table();
        self.set_traffic_enables(vf);
        match self.vfs[vf].mac {
            Some(mac) => {
                log::info!("lab PF: VF {vf} reset, assigned {mac}");
                let words = message::pack_mac(mac);
                [message::VF_RESET | message::MSGTYPE_ACK, words[0], words[1]]
            }
            None => {
                log::info!("lab PF: VF {vf} reset, no MAC to assign");
                [message::VF_RESET | message::MSGTYPE_NACK, 0, 0]
            }
        }
    }

    /// Every request but VF_RESET from a clear-to-send VF; true = carried out.
    fn configuration_request(&mut self, vf: usize, request: &[u32; MAILBOX_WORDS]) -> bool {
        let word = request[0];
        let info = word & message::MSGINFO_MASK;
        match message::message_type(word) {
            message::SET_MAC_ADDR => self.set_mac_request(vf, info, [request[1], request[2]]),
            message::SET_MULTICAST => {
                let (hashes, count) = message::decode_multicast(request);
                let requested = ((word & message::MSGINFO_MASK) >> message::MSGINFO_SHIFT) as usize;
                if requested > MAX_MULTICAST_HASHES {
                    log::warn!("lab PF: VF {vf} sent {requested} multicast hashes, keeping 30");
                }
                self.vfs[vf].multicast = hashes[..count].to_vec();
                self.program_vf_filters(vf);
                self.program_multicast_table();
                true
            }
            message::SET_LPE => {
                let size = request[1];
                if !(MIN_VF_FRAME_SIZE..=MAX_VF_FRAME_SIZE).contains(&size) {
                    log::warn!("lab PF: VF {vf} asked for max frame {size}; refused");
                    return false;
                }
                self.vfs[vf].max_frame = Some(size);
                self.program_vf_filters(vf);
                true
            }
            message::SET_PROMISC => {
                self.vfs[vf].multicast_promiscuous = info & message::PROMISC_MULTICAST != 0;
                self.program_vf_filters(vf);
                // Other promiscuous flags (unicast) are not supported: refuse if asked.
                info & !message::PROMISC_MULTICAST == 0
            }
            message::SET_VLAN => {
                log::warn!("lab PF: VF {vf} asked for a VLAN filter; the lab programs none");
                false
            }
            other => {
                self.counters.unknown_requests += 1;
                log::warn!("lab PF: unhandled message {other:#x} from VF {vf}");
                false
            }
        }
    }

    /// Linux `igb_set_vf_mac_addr`: an administratively set MAC cannot be changed by the VF.
    fn set_mac_request(&mut self, vf: usize, info: u32, words: [u32; 2]) -> bool {
        let mac = message::unpack_mac(words);
        match info {
            0 if self.vfs[vf].administrative_mac => {
                log::warn!("lab PF: VF {vf} tried to override its assigned MAC with {mac}");
                false
            }
            0 if !mac.is_valid_unicast() => {
                log::warn!("lab PF: VF {vf} tried to set invalid MAC {mac}");
                false
            }
            0 => {
                self.vfs[vf].mac = Some(mac);
                self.program_vf_filters(vf);
                true
            }
            // No extra filters exist in the lab, so clearing them is done.
            message::MAC_FILTER_CLEAR => true,
            _ => {
                log::warn!("lab PF: VF {vf} asked for an extra MAC filter; the lab keeps one");
                false
            }
        }
    }

    /// Linux `igb_rcv_ack_from_vf`: a VF that reads our messages while not clear to send is
    /// told so with a NACK (once, until it answers).
    fn handle_ack(&mut self, vf: usize) {
        let record = &mut self.vfs[vf];
        record.awaiting_ack = false;
        if !record.clear_to_send && !record.last_sent_nack {
            self.queue_message(vf, message::MSGTYPE_NACK);
        }
    }

    /// Lab event: behave as a PF that reset its state for VF `vf` — stop its traffic, forget it
    /// (not clear to send) and send PF_CONTROL_MSG. The VF reads it, acknowledges, gets a NACK
    /// and re-initialises (VF_RESET), after which it is admitted again.
    pub fn send_control_message(&mut self, vf: u16) -> Result<(), Error> {
        let vf = self.check_vf(vf)?;
        self.vfs[vf].clear_to_send = false;
        self.set_traffic_enables(vf);
        self.queue_message(vf, message::PF_CONTROL_MSG);
        self.flush_outbox(vf);
        Ok(())
    }

    /// Lab event: VF `vf`'s link goes down (its RX/TX stop, PF_CONTROL_MSG without CTS → the VF
    /// reports `Down`) or comes back (enables restored, PF_CONTROL_MSG with CTS → `Up`).
    /// The PHY link itself is untouched; QEMU cannot hold it down from the guest.
    pub fn set_vf_link(&mut self, vf: u16, up: bool) -> Result<(), Error> {
        let vf = self.check_vf(vf)?;
        self.vfs[vf].link_up = up;
        self.set_traffic_enables(vf);
        self.queue_message(vf, message::PF_CONTROL_MSG);
        self.flush_outbox(vf);
        Ok(())
    }

    /// Lab event: surprise removal of every VF (SR-IOV VF Enable cleared). Their registers read
    /// 0 afterwards and DMA stops.
    pub fn disable_vfs(&mut self) {
        self.sriov.disable_vfs();
        self.vfs_enabled = false;
        self.vfs.iter_mut().for_each(VfRecord::forget);
        log::info!("lab PF: VFs disabled");
    }

    /// Lab event: VFs come back after [`LabPf::disable_vfs`] (fresh devices: the kernel must
    /// map and initialise them again).
    pub fn enable_vfs(&mut self) -> Result<(), Error> {
        self.ensure_present()?;
        self.sriov.enable_vfs(self.config.num_vfs)?;
        self.vfs_enabled = true;
        self.regs.write32(pf::VFLRE, u32::MAX);
        self.vfs.iter_mut().for_each(VfRecord::forget);
        for vf in 0..self.vfs.len() {
            self.program_vf_filters(vf);
        }
        self.program_multicast_table();
        log::info!("lab PF: VFs enabled again");
        Ok(())
    }

    /// Lab event: function-level reset of VF `vf` (handled through VFLRE on the next
    /// [`LabPf::service`]).
    pub fn reset_vf_function(&mut self, vf: u16) -> Result<(), Error> {
        self.check_vf(vf)?;
        self.sriov.function_level_reset(vf)
    }

    fn check_vf(&self, vf: u16) -> Result<usize, Error> {
        if usize::from(vf) < self.vfs.len() {
            Ok(usize::from(vf))
        } else {
            Err(Error::NoSuchVf {
                vf,
                count: self.vfs.len() as u16,
            })
        }
    }

    /// The MAC VF `vf` currently has at the PF (assigned or chosen by the VF).
    pub fn vf_mac(&self, vf: u16) -> Option<MacAddress> {
        self.vfs.get(usize::from(vf)).and_then(|record| record.mac)
    }

    /// True when VF `vf` completed VF_RESET and was not forgotten since.
    pub fn vf_clear_to_send(&self, vf: u16) -> bool {
        self.vfs
            .get(usize::from(vf))
            .is_some_and(|record| record.clear_to_send)
    }

    /// PF link as last seen.
    pub fn pf_link_up(&self) -> bool {
        self.pf_link_up
    }

    /// False once the PF's registers read as a removed device.
    pub fn is_present(&self) -> bool {
        self.present
    }

    /// Activity counters.
    pub fn counters(&self) -> LabPfCounters {
        self.counters
    }
}
