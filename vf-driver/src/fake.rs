//! Fake 82576 register model for host tests: one PF register file, the VF windows that
//! translate onto it (like QEMU's `igbvf.c`), descriptor processing over heap DMA memory, a
//! scripted PF responder, and hostile knobs.
//!
//! Two ways to drive the PF side:
//! * **scripted** ([`FakeIgb::with_scripted_pf`]): the PF is pre-configured (link up, RX/TX
//!   enabled, PF reset done) and the model itself answers every VF mailbox request the moment
//!   the VF raises REQ, per [`ScriptedPf`];
//! * **external** ([`FakeIgb::new`]): nothing answers; a real [`LabPf`](crate::lab_pf::LabPf)
//!   programs the PF through [`FakeIgb::pf_registers`] and answers through its `service`.
//!
//! Behaviour follows QEMU 10's igb (reference §1.5, §2, §3): V2PMAILBOX read-to-clear bits,
//! VF reset side effects (queue enables, VFRE/VFTE cleared, VFLRE set), PFRSTD, MDIC autoneg,
//! per-VF counters that wrap and are not cleared by reads, VTEICR read-to-clear, the
//! VTIVAR_MISC bit-mask quirk, removed devices reading 0 (or all-ones if asked). Transmit
//! offloads (context descriptors, checksum insertion, TSO) and receive checksum status follow
//! the hardware as `fake_offload` models it; DD is written back only on RS
//! descriptors, like QEMU (`igb_txdesc_writeback`), unless a test asks for every one.

use crate::descriptors::{
    AdvancedRxWriteBack, AdvancedTxContextDescriptor, AdvancedTxDataDescriptor, Le16, Le32,
    RxStatus, TX_DESCRIPTOR_TYPE_CONTEXT, TX_DESCRIPTOR_TYPE_DATA, TX_DESCRIPTOR_TYPE_MASK,
    TxCommand,
};
use crate::fake_dma::{dma_read, dma_write};
use crate::fake_offload::{self, MAX_DESCRIPTORS_PER_PACKET};
use crate::lab_pf::SriovControl;
use crate::mailbox::{self as message, multicast_hash};
use crate::pf_regs as pf;
use crate::regs::{self as vfr, Mailbox, QueueControl};
use crate::{Error, WaitHost};
use alloc::boxed::Box;
use alloc::rc::Rc;
use alloc::vec::Vec;
use core::cell::{Cell, RefCell};
use net_device::{MacAddress, RegisterIo};

/// What reads return after [`FakeIgb::unplug`].
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum UnplugStyle {
    /// QEMU: unassigned MMIO reads 0.
    Zeros,
    /// Real hardware: reads complete with all-ones.
    AllOnes,
}

/// How the scripted PF answers VF mailbox requests.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum ScriptedPf {
    /// Like a Linux igb PF: VF_RESET → ACK + MAC (NACK if it has none), others ACK|CTS.
    Answers,
    /// Never touches the mailbox (no PF driver loaded).
    NeverAnswers,
    /// NACKs VF_RESET even when it has a MAC.
    NacksReset,
    /// Acknowledges requests (PFACK) but never replies.
    AcksWithoutReply,
}

/// Hostile variations of an RX write-back.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct RxWriteBackOverride {
    /// Length to report instead of the real one.
    pub length: Option<u16>,
    /// Status/error bits ORed into the write-back.
    pub extra_status: u32,
    /// Leave EOP out, as if the frame continued in the next descriptor.
    pub omit_end_of_packet: bool,
}

const COUNTER_OFFSETS: [usize; 5] = [
    vfr::VFGPRC,
    vfr::VFGPTC,
    vfr::VFGORC,
    vfr::VFGOTC,
    vfr::VFMPRC,
];
const GPRC: usize = 0;
const GPTC: usize = 1;
const GORC: usize = 2;
const GOTC: usize = 3;
const MPRC: usize = 4;
/// STATUS bits QEMU always reports (bit 31, PHYRA, FD, 1000 Mb/s, GIO master enable).
const STATUS_BASE: u32 = 0x8000_0400 | 0x1 | 0x80 | (1 << 19);
const STATUS_IOV_MODE: u32 = 1 << 18;
const STATUS_NUM_VFS_SHIFT: u32 = 14;
/// STATUS reads until a restarted auto-negotiation completes (QEMU: 500 ms of virtual time).
const DEFAULT_AUTONEG_READS: u32 = 3;

#[derive(Clone, Copy)]
struct Script {
    behaviour: ScriptedPf,
    mac: Option<MacAddress>,
    /// The MAC was set by an administrator: SET_MAC_ADDR is refused.
    administrative_mac: bool,
}

#[derive(Default)]
struct VfState {
    eims: u32,
    eiac: u32,
    eicr: u32,
    ivar: u32,
    ivar_misc: u32,
    counters: [u32; 5],
    transmitted: Vec<Vec<u8>>,
    partial_frame: Vec<u8>,
    /// The first data descriptor's command and `olinfo_status` of the packet being gathered.
    packet_start: Option<(TxCommand, u32)>,
    /// Data descriptors the packet being gathered has had so far.
    packet_descriptors: usize,
    /// The queue's two context slots.
    tx_contexts: [Option<AdvancedTxContextDescriptor>; 2],
    /// Packets dropped because their offload request made no sense to the hardware.
    tx_faults: Vec<&'static str>,
    /// Write DD back on every descriptor, not only on RS ones.
    write_back_every_descriptor: bool,
    tdt_writes: u64,
    rdt_writes: u64,
    stall_tx: bool,
    requests: Vec<[u32; vfr::MAILBOX_WORDS]>,
    scripted_clear_to_send: bool,
    interrupts: [u64; 3],
}

impl VfState {
    /// A reset drops the packet being gathered and the loaded contexts.
    fn forget_transmit_state(&mut self) {
        self.partial_frame.clear();
        self.packet_start = None;
        self.packet_descriptors = 0;
        self.tx_contexts = [None; 2];
    }
}

struct Model {
    registers: Vec<u32>,
    vfs: Vec<VfState>,
    enabled_vfs: usize,
    unplugged: Option<UnplugStyle>,
    script: Option<Script>,
    link_up: bool,
    cable_connected: bool,
    autoneg_reads_left: Option<u32>,
    hold_pf_in_reset: bool,
    vf_reads: u64,
    dma_faults: u64,
}

fn power_on_registers() -> Vec<u32> {
    let mut registers = alloc::vec![0u32; pf::WINDOW_SIZE / 4];
    let mut set = |offset: usize, value: u32| registers[offset / 4] = value;
    set(pf::TCTL, 0xA404_00F8);
    set(pf::VFRE, 0xFF);
    set(pf::VFTE, 0xFF);
    set(pf::MBVFIMR, 0xFF);
    // QEMU `igb_mac_reg_init`; the 82576 resets the same way.
    set(pf::RXCSUM, pf::RXCSUM_IP_OFFLOAD | pf::RXCSUM_L4_OFFLOAD);
    for vf in 0..pf::MAX_VFS {
        set(pf::vmolr(vf), 0x8000_2600);
        set(pf::v2p_mailbox(vf), Mailbox::RSTI.bits());
    }
    registers
}

impl Model {
    fn new() -> Self {
        Model {
            registers: power_on_registers(),
            vfs: (0..pf::MAX_VFS).map(|_| VfState::default()).collect(),
            enabled_vfs: 0,
            unplugged: None,
            script: None,
            link_up: false,
            cable_connected: true,
            autoneg_reads_left: None,
            hold_pf_in_reset: false,
            vf_reads: 0,
            dma_faults: 0,
        }
    }

    fn get(&self, offset: usize) -> u32 {
        self.registers[offset / 4]
    }

    fn put(&mut self, offset: usize, value: u32) {
        self.registers[offset / 4] = value;
    }

    fn status(&mut self) -> u32 {
        if let Some(left) = self.autoneg_reads_left {
            if left == 0 {
                self.autoneg_reads_left = None;
                self.link_up = self.cable_connected;
            } else {
                self.autoneg_reads_left = Some(left - 1);
            }
        }
        let mut status = STATUS_BASE;
        if self.enabled_vfs > 0 {
            status |= STATUS_IOV_MODE | ((self.enabled_vfs as u32) << STATUS_NUM_VFS_SHIFT);
        }
        if self.link_up {
            status |= pf::STATUS_LINK_UP;
        }
        status
    }

    fn pf_read(&mut self, offset: usize) -> u32 {
        if offset == pf::STATUS {
            return self.status();
        }
        if (pf::v2p_mailbox(0)..pf::v2p_mailbox(pf::MAX_VFS)).contains(&offset) {
            // QEMU `igb_mac_vfmailbox_read`: whoever reads clears PFSTS, PFACK and RSTD.
            let value = self.get(offset);
            let cleared = Mailbox::PFSTS | Mailbox::PFACK | Mailbox::RSTD;
            self.put(offset, value & !cleared.bits());
            return value;
        }
        if offset == pf::ICR {
            let value = self.get(offset);
            self.put(offset, 0);
            return value;
        }
        self.get(offset)
    }

    fn pf_write(&mut self, offset: usize, value: u32) {
        match offset {
            pf::CTRL if value & pf::CTRL_RESET != 0 => self.pf_reset(),
            pf::CTRL_EXT => {
                self.put(offset, value);
                if value & pf::CTRL_EXT_PF_RESET_DONE != 0 && !self.hold_pf_in_reset {
                    for vf in 0..pf::MAX_VFS {
                        let mailbox = self.get(pf::v2p_mailbox(vf));
                        let mailbox = (mailbox & !Mailbox::RSTI.bits()) | Mailbox::RSTD.bits();
                        self.put(pf::v2p_mailbox(vf), mailbox);
                    }
                }
            }
            pf::MDIC => self.mdic(value),
            pf::MBVFICR | pf::VFLRE | pf::ICR => {
                let old = self.get(offset);
                self.put(offset, old & !value);
            }
            _ if (pf::p2v_mailbox(0)..pf::p2v_mailbox(pf::MAX_VFS)).contains(&offset) => {
                self.pf_mailbox_write((offset - pf::p2v_mailbox(0)) / 4, value);
            }
            _ if (pf::v2p_mailbox(0)..pf::v2p_mailbox(pf::MAX_VFS)).contains(&offset) => {
                self.vf_mailbox_write((offset - pf::v2p_mailbox(0)) / 4, value);
            }
            _ if (pf::vf_control(0)..pf::vf_control(pf::MAX_VFS)).contains(&offset)
                && (offset - pf::vf_control(0)).is_multiple_of(0x100) =>
            {
                if value & vfr::Control::RESET.bits() != 0 {
                    self.vf_reset((offset - pf::vf_control(0)) / 0x100);
                }
            }
            _ if (pf::rx_queue_block(0)..pf::rx_queue_block(16)).contains(&offset) => {
                self.rx_queue_write(offset, value);
            }
            _ if (pf::tx_queue_block(0)..pf::tx_queue_block(16)).contains(&offset) => {
                self.tx_queue_write(offset, value);
            }
            _ => self.put(offset, value),
        }
    }

    fn mdic(&mut self, value: u32) {
        let phy = (value >> pf::MDIC_PHY_SHIFT) & 0x1F;
        let register = (value >> pf::MDIC_REGISTER_SHIFT) & 0x1F;
        let data = value & pf::MDIC_DATA_MASK;
        if phy != pf::PHY_ADDRESS {
            self.put(pf::MDIC, value | pf::MDIC_ERROR | pf::MDIC_READY);
            return;
        }
        if value & pf::MDIC_OP_WRITE != 0
            && register == pf::PHY_BMCR
            && data & pf::BMCR_AUTONEG_ENABLE != 0
            && data & pf::BMCR_RESTART_AUTONEG != 0
        {
            // QEMU `e1000x_restart_autoneg`: link down now, up when negotiation completes.
            self.link_up = false;
            self.autoneg_reads_left = self.cable_connected.then_some(DEFAULT_AUTONEG_READS);
        }
        self.put(pf::MDIC, value | pf::MDIC_READY);
    }

    fn pf_reset(&mut self) {
        self.registers = power_on_registers();
        self.link_up = false;
        self.autoneg_reads_left = None;
        for vf in &mut self.vfs {
            vf.scripted_clear_to_send = false;
            vf.forget_transmit_state();
        }
    }

    /// QEMU `igb_vf_reset`: queues of VF `vf` (queues vf and vf+8) stop, its RX/TX enables are
    /// cleared, and the PF is told through VFLRE.
    fn vf_reset(&mut self, vf: usize) {
        for queue in [vf, vf + 8] {
            let rxdctl = pf::rx_queue_block(queue) + 0x28;
            let txdctl = pf::tx_queue_block(queue) + 0x28;
            self.put(rxdctl, self.get(rxdctl) & !QueueControl::ENABLE.bits());
            self.put(txdctl, self.get(txdctl) & !QueueControl::ENABLE.bits());
        }
        self.put(pf::VFRE, self.get(pf::VFRE) & !(1 << vf));
        self.put(pf::VFTE, self.get(pf::VFTE) & !(1 << vf));
        self.put(pf::VFLRE, self.get(pf::VFLRE) | (1 << vf));
        self.vfs[vf].scripted_clear_to_send = false;
        self.vfs[vf].forget_transmit_state();
    }

    fn pf_mailbox_write(&mut self, vf: usize, value: u32) {
        let v2p = pf::v2p_mailbox(vf);
        let p2v = pf::p2v_mailbox(vf);
        if value & pf::P2V_STS != 0 {
            self.put(v2p, self.get(v2p) | Mailbox::PFSTS.bits());
            self.raise_mailbox_interrupt(vf);
        }
        if value & pf::P2V_ACK != 0 {
            self.put(v2p, self.get(v2p) | Mailbox::PFACK.bits());
            self.raise_mailbox_interrupt(vf);
        }
        if value & pf::P2V_PFU != 0 {
            if self.get(p2v) & pf::P2V_VFU == 0 {
                self.put(p2v, self.get(p2v) | pf::P2V_PFU);
                self.put(v2p, self.get(v2p) | Mailbox::PFU.bits());
            }
        } else {
            self.put(p2v, self.get(p2v) & !pf::P2V_PFU);
            self.put(v2p, self.get(v2p) & !Mailbox::PFU.bits());
        }
        if value & pf::P2V_RVFU != 0 {
            self.put(v2p, self.get(v2p) & !Mailbox::VFU.bits());
            self.put(p2v, self.get(p2v) & !pf::P2V_VFU);
            let bits = (pf::MBVFICR_REQUEST_0 | pf::MBVFICR_ACK_0) << vf;
            self.put(pf::MBVFICR, self.get(pf::MBVFICR) & !bits);
        }
    }

    fn vf_mailbox_write(&mut self, vf: usize, value: u32) {
        let v2p = pf::v2p_mailbox(vf);
        let p2v = pf::p2v_mailbox(vf);
        if value & Mailbox::VFU.bits() != 0 {
            if self.get(v2p) & Mailbox::PFU.bits() == 0 {
                self.put(v2p, self.get(v2p) | Mailbox::VFU.bits());
                self.put(p2v, self.get(p2v) | pf::P2V_VFU);
            }
        } else {
            self.put(v2p, self.get(v2p) & !Mailbox::VFU.bits());
            self.put(p2v, self.get(p2v) & !pf::P2V_VFU);
        }
        if value & Mailbox::REQ.bits() != 0 {
            self.put(
                pf::MBVFICR,
                self.get(pf::MBVFICR) | (pf::MBVFICR_REQUEST_0 << vf),
            );
            self.scripted_request(vf);
        }
        if value & Mailbox::ACK.bits() != 0 {
            self.put(
                pf::MBVFICR,
                self.get(pf::MBVFICR) | (pf::MBVFICR_ACK_0 << vf),
            );
        }
    }

    fn read_mailbox_memory(&self, vf: usize) -> [u32; vfr::MAILBOX_WORDS] {
        let mut words = [0u32; vfr::MAILBOX_WORDS];
        for (index, word) in words.iter_mut().enumerate() {
            *word = self.get(pf::vmbmem(vf) + 4 * index);
        }
        words
    }

    /// Writes a PF message the way a PF driver would (buffer, then STS).
    fn send_to_vf(&mut self, vf: usize, words: &[u32]) {
        for (index, word) in words.iter().take(vfr::MAILBOX_WORDS).enumerate() {
            self.put(pf::vmbmem(vf) + 4 * index, *word);
        }
        self.pf_mailbox_write(vf, pf::P2V_STS);
    }

    fn scripted_request(&mut self, vf: usize) {
        let Some(script) = self.script else {
            return;
        };
        if script.behaviour == ScriptedPf::NeverAnswers {
            return;
        }
        let request = self.read_mailbox_memory(vf);
        self.vfs[vf].requests.push(request);
        self.put(
            pf::MBVFICR,
            self.get(pf::MBVFICR) & !(pf::MBVFICR_REQUEST_0 << vf),
        );
        self.pf_mailbox_write(vf, pf::P2V_ACK);
        if script.behaviour == ScriptedPf::AcksWithoutReply {
            return;
        }
        let word = request[0];
        let code = message::message_type(word);
        let flags_ok = message::MSGTYPE_ACK | message::MSGTYPE_CTS;
        let flags_refused = message::MSGTYPE_NACK | message::MSGTYPE_CTS;
        let reply: Vec<u32> = if code == message::VF_RESET {
            self.put(pf::VFRE, self.get(pf::VFRE) | (1 << vf));
            self.put(pf::VFTE, self.get(pf::VFTE) | (1 << vf));
            self.vfs[vf].scripted_clear_to_send = true;
            match script.mac {
                Some(mac) if script.behaviour != ScriptedPf::NacksReset => {
                    let words = message::pack_mac(mac);
                    alloc::vec![message::VF_RESET | message::MSGTYPE_ACK, words[0], words[1]]
                }
                _ => alloc::vec![message::VF_RESET | message::MSGTYPE_NACK, 0, 0],
            }
        } else if !self.vfs[vf].scripted_clear_to_send {
            alloc::vec![word | message::MSGTYPE_NACK]
        } else if code == message::SET_MAC_ADDR {
            if script.administrative_mac {
                alloc::vec![word | flags_refused]
            } else {
                let mac = message::unpack_mac([request[1], request[2]]);
                if let Some(script) = self.script.as_mut() {
                    script.mac = Some(mac);
                }
                alloc::vec![word | flags_ok]
            }
        } else if code == message::SET_LPE || code == message::SET_MULTICAST {
            alloc::vec![word | flags_ok]
        } else {
            alloc::vec![word | flags_refused]
        };
        self.send_to_vf(vf, &reply);
    }

    fn raise_vf_causes(&mut self, vf: usize, causes: u32) {
        let state = &mut self.vfs[vf];
        state.eicr |= causes;
        for vector in 0..3 {
            if causes & state.eims & (1 << vector) != 0 {
                state.interrupts[vector] += 1;
            }
        }
        state.eicr &= !(causes & state.eiac & state.eims);
    }

    /// QEMU `mailbox_interrupt_to_vf`: VTIVAR_MISC's low two bits are used as a vector mask.
    fn raise_mailbox_interrupt(&mut self, vf: usize) {
        let entry = self.vfs[vf].ivar_misc;
        if entry & vfr::IVAR_VALID != 0 {
            self.raise_vf_causes(vf, entry & 0x3);
        }
    }

    fn queue_interrupt(&mut self, vf: usize, transmit: bool) {
        let entry = (self.vfs[vf].ivar >> if transmit { 8 } else { 0 }) & 0xFF;
        if entry & vfr::IVAR_VALID != 0 && entry & 0x7 < 3 {
            self.raise_vf_causes(vf, 1 << (entry & 0x7));
        }
    }

    fn rx_queue_write(&mut self, offset: usize, value: u32) {
        let queue = (offset - pf::rx_queue_block(0)) / 0x40;
        match (offset - pf::rx_queue_block(0)) % 0x40 {
            0x08 => self.put(offset, value & 0xF_FFF0),
            0x10 => self.put(offset, value & 0xFFFF),
            0x18 => {
                self.put(offset, value & 0xFFFF);
                if let Some(state) = self.vfs.get_mut(queue) {
                    state.rdt_writes += 1;
                }
            }
            _ => self.put(offset, value),
        }
    }

    fn tx_queue_write(&mut self, offset: usize, value: u32) {
        let queue = (offset - pf::tx_queue_block(0)) / 0x40;
        match (offset - pf::tx_queue_block(0)) % 0x40 {
            0x08 => self.put(offset, value & 0xF_FFF0),
            0x10 => self.put(offset, value & 0xFFFF),
            0x18 => {
                self.put(offset, value & 0xFFFF);
                if queue < pf::MAX_VFS {
                    self.vfs[queue].tdt_writes += 1;
                    self.transmit(queue);
                }
            }
            _ => self.put(offset, value),
        }
    }

    fn vf_alive(&self, vf: usize) -> bool {
        self.unplugged.is_none() && vf < self.enabled_vfs
    }

    /// QEMU `igb_start_xmit`: process descriptors from head to tail.
    fn transmit(&mut self, vf: usize) {
        let block = pf::tx_queue_block(vf);
        let enabled = self.get(block + 0x28) & QueueControl::ENABLE.bits() != 0
            && self.get(pf::TCTL) & pf::TCTL_ENABLE != 0
            && (self.get(pf::MRQC) & 1 == 0 || self.get(pf::VFTE) & (1 << vf) != 0)
            && self.vf_alive(vf)
            && !self.vfs[vf].stall_tx;
        if !enabled {
            return;
        }
        let base = u64::from(self.get(block)) | (u64::from(self.get(block + 4)) << 32);
        let count = self.get(block + 0x08) / 16;
        let mut completed = false;
        loop {
            let head = self.get(block + 0x10);
            let tail = self.get(block + 0x18);
            if head == tail || tail >= count || count == 0 {
                break;
            }
            let address = base + u64::from(head) * 16;
            let mut raw = [0u8; 16];
            if !dma_read(address, &mut raw) {
                self.dma_faults += 1;
                break;
            }
            let words = [
                u64::from_le_bytes(raw[..8].try_into().unwrap_or_default()),
                u64::from_le_bytes(raw[8..].try_into().unwrap_or_default()),
            ];
            let descriptor = AdvancedTxDataDescriptor::from_words(words);
            let command = descriptor.command();
            let kind = descriptor.cmd_type_len.get() & TX_DESCRIPTOR_TYPE_MASK;
            if command.contains(TxCommand::DEXT) && kind == TX_DESCRIPTOR_TYPE_CONTEXT {
                let context = AdvancedTxContextDescriptor::from_words(words);
                // QEMU keeps two slots and reads one bit of IDX.
                self.vfs[vf].tx_contexts[context.index() & 1] = Some(context);
            } else if command.contains(TxCommand::DEXT) && kind == TX_DESCRIPTOR_TYPE_DATA {
                self.gather_tx_data(vf, &descriptor);
            }
            if command.contains(TxCommand::RS) || self.vfs[vf].write_back_every_descriptor {
                let status = descriptor.olinfo_status.get() | crate::descriptors::TX_STATUS_DD;
                if !dma_write(address + 12, &status.to_le_bytes()) {
                    self.dma_faults += 1;
                }
                completed = true;
            }
            self.put(block + 0x10, (head + 1) % count);
        }
        if completed {
            self.queue_interrupt(vf, true);
        }
    }

    /// One data descriptor of VF `vf`'s current packet; at EOP the packet goes through the
    /// offload model onto the wire.
    fn gather_tx_data(&mut self, vf: usize, descriptor: &AdvancedTxDataDescriptor) {
        let command = descriptor.command();
        let mut data = alloc::vec![0u8; usize::from(descriptor.length())];
        if dma_read(descriptor.buffer_address.get(), &mut data) {
            self.vfs[vf].partial_frame.extend_from_slice(&data);
        } else {
            self.dma_faults += 1;
        }
        let state = &mut self.vfs[vf];
        state
            .packet_start
            .get_or_insert((command, descriptor.olinfo_status.get()));
        state.packet_descriptors += 1;
        if !command.contains(TxCommand::EOP) {
            return;
        }
        let frame = core::mem::take(&mut state.partial_frame);
        let packet_len = frame.len();
        let (first_command, olinfo) = state.packet_start.take().unwrap_or((command, 0));
        let descriptors = core::mem::take(&mut state.packet_descriptors);
        let frames = if descriptors > MAX_DESCRIPTORS_PER_PACKET {
            Err("more data descriptors than QEMU takes per packet")
        } else {
            fake_offload::transmit_offloads(frame, first_command, olinfo, &state.tx_contexts)
        };
        match frames {
            Ok(frames) => {
                // QEMU `igb_on_tx_done_update_stats`: once per packet, a TSO frame included.
                if self.get(pf::MRQC) & 1 != 0 {
                    let counters = &mut self.vfs[vf].counters;
                    counters[GPTC] = counters[GPTC].wrapping_add(1);
                    counters[GOTC] = counters[GOTC].wrapping_add(packet_len as u32 + 4);
                }
                self.vfs[vf].transmitted.extend(frames);
            }
            Err(fault) => self.vfs[vf].tx_faults.push(fault),
        }
    }

    fn rx_accepting(&self, vf: usize) -> bool {
        let block = pf::rx_queue_block(vf);
        self.get(block + 0x28) & QueueControl::ENABLE.bits() != 0
            && self.get(pf::RCTL) & pf::RCTL_ENABLE != 0
            && self.link_up
            && (self.get(pf::MRQC) & 1 == 0 || self.get(pf::VFRE) & (1 << vf) != 0)
            && self.vf_alive(vf)
    }

    /// QEMU `igb_write_packet_to_guest`, single queue: buffers from head, write-back with
    /// DD (and EOP on the last), counters when VMDq is on.
    fn receive(&mut self, vf: usize, frame: &[u8], tweak: RxWriteBackOverride) -> bool {
        if !self.rx_accepting(vf) {
            return false;
        }
        let block = pf::rx_queue_block(vf);
        let base = u64::from(self.get(block)) | (u64::from(self.get(block + 4)) << 32);
        let count = self.get(block + 0x08) / 16;
        let buffer_size = match self.get(block + 0x0C) & 0x7F {
            0 => 2048,
            units => units as usize * 1024,
        };
        let head = self.get(block + 0x10);
        let tail = self.get(block + 0x18);
        if count == 0 || tail >= count {
            return false;
        }
        let free = if head <= tail {
            tail - head
        } else {
            count + tail - head
        } as usize;
        if frame.len() > free * buffer_size {
            return false;
        }
        let mut offset = 0;
        let mut head = head;
        loop {
            let address = base + u64::from(head) * 16;
            let mut raw = [0u8; 8];
            if !dma_read(address, &mut raw) {
                self.dma_faults += 1;
                return false;
            }
            let buffer = u64::from_le_bytes(raw);
            let chunk = &frame[offset..frame.len().min(offset + buffer_size)];
            if !dma_write(buffer, chunk) {
                self.dma_faults += 1;
            }
            offset += chunk.len();
            let last = offset >= frame.len();
            let mut status = RxStatus::DD.bits() | tweak.extra_status;
            if last && !tweak.omit_end_of_packet {
                // QEMU reports checksum results on the EOP descriptor only.
                status |= RxStatus::EOP.bits()
                    | fake_offload::receive_checksum_status(frame, self.get(pf::RXCSUM));
            }
            let write_back = AdvancedRxWriteBack {
                status_error: Le32::new(status),
                length: Le16::new(tweak.length.unwrap_or(chunk.len() as u16)),
                ..AdvancedRxWriteBack::default()
            };
            let words = write_back.to_words();
            let mut bytes = [0u8; 16];
            bytes[..8].copy_from_slice(&words[0].to_le_bytes());
            bytes[8..].copy_from_slice(&words[1].to_le_bytes());
            if !dma_write(address, &bytes) {
                self.dma_faults += 1;
            }
            head = (head + 1) % count;
            if last {
                break;
            }
        }
        self.put(block + 0x10, head);
        if self.get(pf::MRQC) & 1 != 0 {
            let counters = &mut self.vfs[vf].counters;
            counters[GPRC] = counters[GPRC].wrapping_add(1);
            counters[GORC] = counters[GORC].wrapping_add(frame.len() as u32 + 4);
            if frame.len() >= 6 && frame[0] & 1 == 1 && frame[..6] != [0xFF; 6] {
                counters[MPRC] = counters[MPRC].wrapping_add(1);
            }
        }
        self.queue_interrupt(vf, false);
        true
    }

    fn mta_matches(&self, destination: MacAddress) -> bool {
        let hash = usize::from(multicast_hash(destination));
        self.get(pf::MTA + 4 * ((hash >> 5) & 0x7F)) & (1 << (hash & 0x1F)) != 0
    }

    /// QEMU `igb_receive_assign` in VMDq mode (simplified: no VLAN, no RSS).
    fn route_from_wire(&self, frame: &[u8]) -> Vec<usize> {
        if frame.len() < 14 || self.get(pf::MRQC) & 1 == 0 {
            return alloc::vec![0];
        }
        let mut destination = [0u8; 6];
        destination.copy_from_slice(&frame[..6]);
        let destination = MacAddress(destination);
        let pools_with = |bit: u32| -> Vec<usize> {
            (0..pf::MAX_VFS)
                .filter(|vf| self.get(pf::vmolr(*vf)) & bit != 0)
                .collect()
        };
        if destination == MacAddress::BROADCAST {
            return pools_with(pf::VMOLR_BAM);
        }
        if destination.0[0] & 1 == 1 {
            if !self.mta_matches(destination) {
                return pools_with(pf::VMOLR_MPME);
            }
            let mut pools = pools_with(pf::VMOLR_ROMPE);
            pools.extend(pools_with(pf::VMOLR_MPME));
            pools.sort_unstable();
            pools.dedup();
            return pools;
        }
        let words = message::pack_mac(destination);
        let mut pools = Vec::new();
        for entry in 0..pf::RAR_ENTRIES {
            let high = self.get(pf::rah(entry));
            if high & pf::RAH_ADDRESS_VALID != 0
                && self.get(pf::ral(entry)) == words[0]
                && high & 0xFFFF == words[1]
            {
                pools.extend((0..pf::MAX_VFS).filter(|vf| high & (pf::RAH_POOL_0 << vf) != 0));
            }
        }
        if pools.is_empty() && self.get(pf::VT_CTL) & pf::VT_CTL_DISABLE_DEFAULT_POOL == 0 {
            pools.push(((self.get(pf::VT_CTL) >> 7) & 0x7) as usize);
        }
        pools
    }

    fn vf_register_read(&mut self, vf: usize, offset: usize) -> u32 {
        self.vf_reads += 1;
        match self.unplugged {
            Some(UnplugStyle::Zeros) => return 0,
            Some(UnplugStyle::AllOnes) => return u32::MAX,
            None => {}
        }
        if vf >= self.enabled_vfs {
            return 0;
        }
        match offset {
            vfr::CTRL | vfr::FRTIMER => 0,
            vfr::STATUS => self.status(),
            vfr::VTEIMS => self.vfs[vf].eims,
            vfr::VTEIAC => self.vfs[vf].eiac,
            vfr::VTEICR => core::mem::take(&mut self.vfs[vf].eicr),
            vfr::VTIVAR => self.vfs[vf].ivar,
            vfr::VTIVAR_MISC => self.vfs[vf].ivar_misc,
            _ => {
                if let Some(index) = COUNTER_OFFSETS
                    .iter()
                    .position(|counter| *counter == offset)
                {
                    return self.vfs[vf].counters[index];
                }
                match vf_to_pf(vf, offset) {
                    Some(target) => self.pf_read(target),
                    None => 0,
                }
            }
        }
    }

    fn vf_register_write(&mut self, vf: usize, offset: usize, value: u32) {
        if self.unplugged.is_some() || vf >= self.enabled_vfs {
            return;
        }
        match offset {
            vfr::CTRL => {
                if value & vfr::Control::RESET.bits() != 0 {
                    self.vf_reset(vf);
                }
            }
            vfr::VTEICS => self.raise_vf_causes(vf, value & 0x7),
            vfr::VTEIMS => self.vfs[vf].eims |= value & 0x7,
            vfr::VTEIMC => self.vfs[vf].eims &= !value,
            vfr::VTEIAC => self.vfs[vf].eiac = value & 0x7,
            vfr::VTEICR => self.vfs[vf].eicr &= !value,
            vfr::VTIVAR => self.vfs[vf].ivar = value,
            vfr::VTIVAR_MISC => self.vfs[vf].ivar_misc = value,
            _ => {
                if let Some(target) = vf_to_pf(vf, offset) {
                    self.pf_write(target, value);
                }
            }
        }
    }
}

/// QEMU `igbvf.c` translation of a VF BAR0 offset to the PF register it aliases.
fn vf_to_pf(vf: usize, offset: usize) -> Option<usize> {
    match offset {
        vfr::STATUS => Some(pf::STATUS),
        vfr::V2PMAILBOX => Some(pf::v2p_mailbox(vf)),
        _ if (vfr::VMBMEM..vfr::VMBMEM + 4 * vfr::MAILBOX_WORDS).contains(&offset) => {
            Some(pf::vmbmem(vf) + (offset - vfr::VMBMEM))
        }
        _ if (vfr::RDBAL..vfr::RDBAL + 0x40).contains(&offset) => {
            Some(pf::rx_queue_block(vf) + (offset - vfr::RDBAL))
        }
        _ if (vfr::TDBAL..vfr::TDBAL + 0x40).contains(&offset) => {
            Some(pf::tx_queue_block(vf) + (offset - vfr::TDBAL))
        }
        _ => None,
    }
}

/// Handle on the fake device; clones share the same model.
#[derive(Clone)]
pub struct FakeIgb {
    model: Rc<RefCell<Model>>,
}

impl Default for FakeIgb {
    fn default() -> Self {
        FakeIgb::new()
    }
}

impl FakeIgb {
    /// A PF in its power-on state with no VFs enabled and nobody answering the mailbox: for
    /// tests of the lab PF, which does the PF's work through [`FakeIgb::pf_registers`].
    pub fn new() -> Self {
        FakeIgb {
            model: Rc::new(RefCell::new(Model::new())),
        }
    }

    /// One VF (VF 0) enabled behind a PF that is already set up (link up, RX/TX on, VMDq,
    /// reset done) and answers the mailbox itself with `mac` (an administrator-set address).
    pub fn with_scripted_pf(mac: Option<MacAddress>) -> Self {
        let fake = FakeIgb::new();
        {
            let mut model = fake.model.borrow_mut();
            model.enabled_vfs = 1;
            model.link_up = true;
            model.script = Some(Script {
                behaviour: ScriptedPf::Answers,
                mac,
                administrative_mac: mac.is_some(),
            });
            model.put(pf::RCTL, pf::RCTL_ENABLE | pf::RCTL_STRIP_CRC);
            model.put(pf::TCTL, 0xA404_00FA);
            model.put(pf::MRQC, pf::MRQC_VMDQ);
            // What a Linux igb PF adds (`igb_setup_mrqc`).
            let rxcsum = model.get(pf::RXCSUM);
            model.put(
                pf::RXCSUM,
                rxcsum | pf::RXCSUM_PACKET_CHECKSUM_DISABLE | pf::RXCSUM_SCTP_OFFLOAD,
            );
            model.put(pf::VFRE, 0);
            model.put(pf::VFTE, 0);
            model.pf_write(pf::CTRL_EXT, pf::CTRL_EXT_PF_RESET_DONE);
        }
        fake
    }

    fn with_model<T>(&self, f: impl FnOnce(&mut Model) -> T) -> T {
        f(&mut self.model.borrow_mut())
    }

    /// The BAR0 window of VF `vf`.
    pub fn vf_registers(&self, vf: usize) -> FakeVfRegisters {
        FakeVfRegisters {
            model: self.model.clone(),
            vf,
        }
    }

    /// The PF's BAR0 window.
    pub fn pf_registers(&self) -> FakePfRegisters {
        FakePfRegisters {
            model: self.model.clone(),
        }
    }

    /// The PF's SR-IOV capability, as the kernel would drive it.
    pub fn sriov(&self) -> FakeSriov {
        FakeSriov {
            model: self.model.clone(),
        }
    }

    /// Changes how the scripted PF answers (keeps its MAC).
    pub fn set_scripted_pf(&self, behaviour: ScriptedPf) {
        self.with_model(|model| {
            if let Some(script) = model.script.as_mut() {
                script.behaviour = behaviour;
            }
        });
    }

    /// Makes the scripted PF accept SET_MAC_ADDR (no administrator-set MAC).
    pub fn allow_vf_mac_change(&self) {
        self.with_model(|model| {
            if let Some(script) = model.script.as_mut() {
                script.administrative_mac = false;
            }
        });
    }

    /// The device disappears: every register reads `style` and DMA stops.
    pub fn unplug(&self, style: UnplugStyle) {
        self.with_model(|model| model.unplugged = Some(style));
    }

    /// Cable state (QMP `set_link`): off drops the link at once; on restarts negotiation.
    pub fn set_cable(&self, connected: bool) {
        self.with_model(|model| {
            model.cable_connected = connected;
            if connected {
                model.autoneg_reads_left = Some(DEFAULT_AUTONEG_READS);
            } else {
                model.link_up = false;
                model.autoneg_reads_left = None;
            }
        });
    }

    /// True when the PHY reports link.
    pub fn link_up(&self) -> bool {
        self.with_model(|model| model.link_up)
    }

    /// A frame arrives for VF `vf` with a correct write-back. False when the VF could not take
    /// it (queue off, no free descriptor, link down, RX disabled by the PF).
    pub fn inject_rx_frame(&self, vf: usize, frame: &[u8]) -> bool {
        self.with_model(|model| model.receive(vf, frame, RxWriteBackOverride::default()))
    }

    /// A frame arrives for VF `vf` with a tampered write-back.
    pub fn inject_rx_frame_with(
        &self,
        vf: usize,
        frame: &[u8],
        tweak: RxWriteBackOverride,
    ) -> bool {
        self.with_model(|model| model.receive(vf, frame, tweak))
    }

    /// A frame arrives from the wire and is switched to VF pools the way the PF's filters (RAR
    /// pool bits, VMOLR, MTA) say. Returns the VFs that got it.
    pub fn deliver_from_wire(&self, frame: &[u8]) -> Vec<usize> {
        self.with_model(|model| {
            model
                .route_from_wire(frame)
                .into_iter()
                .filter(|vf| model.receive(*vf, frame, RxWriteBackOverride::default()))
                .collect()
        })
    }

    /// Hostile: writes DD|EOP into the descriptor at VF `vf`'s RX tail, which the device does
    /// not own.
    pub fn write_back_unposted_rx(&self, vf: usize) {
        self.with_model(|model| {
            let block = pf::rx_queue_block(vf);
            let base = u64::from(model.get(block)) | (u64::from(model.get(block + 4)) << 32);
            let tail = u64::from(model.get(block + 0x18));
            let write_back = AdvancedRxWriteBack {
                status_error: Le32::new((RxStatus::DD | RxStatus::EOP).bits()),
                length: Le16::new(64),
                ..AdvancedRxWriteBack::default()
            };
            let words = write_back.to_words();
            if !dma_write(base + tail * 16 + 8, &words[1].to_le_bytes()) {
                model.dma_faults += 1;
            }
        });
    }

    /// Stops (or resumes) VF `vf`'s transmitter without telling anyone.
    pub fn stall_tx(&self, vf: usize, stalled: bool) {
        self.with_model(|model| {
            model.vfs[vf].stall_tx = stalled;
            if !stalled {
                model.transmit(vf);
            }
        });
    }

    /// Frames VF `vf` put on the wire since the last call.
    pub fn take_transmitted(&self, vf: usize) -> Vec<Vec<u8>> {
        self.with_model(|model| core::mem::take(&mut model.vfs[vf].transmitted))
    }

    /// Packets of VF `vf` the device dropped because their offload request made no sense
    /// (no context loaded, lengths that do not fit, PAYLEN wrong, too many descriptors).
    pub fn tx_faults(&self, vf: usize) -> Vec<&'static str> {
        self.with_model(|model| model.vfs[vf].tx_faults.clone())
    }

    /// Makes VF `vf`'s queue write DD back on every descriptor instead of only RS ones.
    pub fn write_back_every_tx_descriptor(&self, vf: usize, every: bool) {
        self.with_model(|model| model.vfs[vf].write_back_every_descriptor = every);
    }

    /// Writes of VF `vf`'s TX tail register so far.
    pub fn tx_tail_writes(&self, vf: usize) -> u64 {
        self.with_model(|model| model.vfs[vf].tdt_writes)
    }

    /// Writes of VF `vf`'s RX tail register so far.
    pub fn rx_tail_writes(&self, vf: usize) -> u64 {
        self.with_model(|model| model.vfs[vf].rdt_writes)
    }

    /// Sets a VF counter register (e.g. near 2^32 to test wrapping).
    pub fn set_counter(&self, vf: usize, register: usize, value: u32) {
        self.with_model(|model| {
            if let Some(index) = COUNTER_OFFSETS
                .iter()
                .position(|offset| *offset == register)
            {
                model.vfs[vf].counters[index] = value;
            }
        });
    }

    /// VF register reads so far (to prove that nothing spins on a dead device).
    pub fn vf_register_reads(&self) -> u64 {
        self.with_model(|model| model.vf_reads)
    }

    /// DMA accesses that fell outside live DMA memory.
    pub fn dma_faults(&self) -> u64 {
        self.with_model(|model| model.dma_faults)
    }

    /// Mailbox messages VF `vf` sent to the scripted PF.
    pub fn mailbox_requests(&self, vf: usize) -> Vec<[u32; vfr::MAILBOX_WORDS]> {
        self.with_model(|model| model.vfs[vf].requests.clone())
    }

    /// The scripted PF sends `words` to VF `vf` unprompted (e.g. a PF_CONTROL_MSG).
    pub fn pf_send(&self, vf: usize, words: &[u32]) {
        self.with_model(|model| model.send_to_vf(vf, words));
    }

    /// The scripted PF forgets VF `vf` (as after a PF reset of its per-VF state).
    pub fn pf_forget_vf(&self, vf: usize) {
        self.with_model(|model| model.vfs[vf].scripted_clear_to_send = false);
    }

    /// The PF signals "reset done" (RSTD) to every VF, as after a PF reset it recovered from.
    pub fn signal_pf_reset_done(&self) {
        self.with_model(|model| {
            for vf in 0..pf::MAX_VFS {
                let mailbox = model.get(pf::v2p_mailbox(vf)) | Mailbox::RSTD.bits();
                model.put(pf::v2p_mailbox(vf), mailbox);
                model.vfs[vf].scripted_clear_to_send = false;
            }
        });
    }

    /// Keeps RSTI asserted (the PF is "in reset") until released; CTRL_EXT.PFRSTD is ignored
    /// meanwhile.
    pub fn hold_pf_in_reset(&self, held: bool) {
        self.with_model(|model| {
            model.hold_pf_in_reset = held;
            for vf in 0..pf::MAX_VFS {
                let mailbox = model.get(pf::v2p_mailbox(vf));
                let mailbox = if held {
                    mailbox | Mailbox::RSTI.bits()
                } else {
                    (mailbox & !Mailbox::RSTI.bits()) | Mailbox::RSTD.bits()
                };
                model.put(pf::v2p_mailbox(vf), mailbox);
            }
        });
    }

    /// VF `vf`'s queue enables as (RX, TX).
    pub fn queues_enabled(&self, vf: usize) -> (bool, bool) {
        self.with_model(|model| {
            let enable = QueueControl::ENABLE.bits();
            (
                model.get(pf::rx_queue_block(vf) + 0x28) & enable != 0,
                model.get(pf::tx_queue_block(vf) + 0x28) & enable != 0,
            )
        })
    }

    /// MSI-X messages VF `vf` sent on each of its three vectors.
    pub fn vf_interrupts(&self, vf: usize) -> [u64; 3] {
        self.with_model(|model| model.vfs[vf].interrupts)
    }

    /// A PF register value, read without side effects.
    pub fn pf_register(&self, offset: usize) -> u32 {
        self.with_model(|model| model.get(offset))
    }

    /// Number of enabled VFs.
    pub fn enabled_vfs(&self) -> usize {
        self.with_model(|model| model.enabled_vfs)
    }
}

/// VF BAR0 of the fake device.
pub struct FakeVfRegisters {
    model: Rc<RefCell<Model>>,
    vf: usize,
}

impl RegisterIo for FakeVfRegisters {
    fn read32(&self, offset: usize) -> u32 {
        if offset + 4 > vfr::WINDOW_SIZE || !offset.is_multiple_of(4) {
            return u32::MAX;
        }
        self.model.borrow_mut().vf_register_read(self.vf, offset)
    }

    fn write32(&self, offset: usize, value: u32) {
        if offset + 4 <= vfr::WINDOW_SIZE && offset.is_multiple_of(4) {
            self.model
                .borrow_mut()
                .vf_register_write(self.vf, offset, value);
        }
    }

    fn len(&self) -> usize {
        vfr::WINDOW_SIZE
    }
}

/// PF BAR0 of the fake device.
pub struct FakePfRegisters {
    model: Rc<RefCell<Model>>,
}

impl RegisterIo for FakePfRegisters {
    fn read32(&self, offset: usize) -> u32 {
        if offset + 4 > pf::WINDOW_SIZE || !offset.is_multiple_of(4) {
            return u32::MAX;
        }
        let mut model = self.model.borrow_mut();
        match model.unplugged {
            Some(UnplugStyle::Zeros) => 0,
            Some(UnplugStyle::AllOnes) => u32::MAX,
            None => model.pf_read(offset),
        }
    }

    fn write32(&self, offset: usize, value: u32) {
        if offset + 4 <= pf::WINDOW_SIZE && offset.is_multiple_of(4) {
            let mut model = self.model.borrow_mut();
            if model.unplugged.is_none() {
                model.pf_write(offset, value);
            }
        }
    }

    fn len(&self) -> usize {
        pf::WINDOW_SIZE
    }
}

/// The PF's SR-IOV capability on the fake device (QEMU `pcie_sriov.c` behaviour: enabling or
/// disabling resets every VF).
pub struct FakeSriov {
    model: Rc<RefCell<Model>>,
}

impl SriovControl for FakeSriov {
    fn total_vfs(&self) -> u16 {
        pf::MAX_VFS as u16
    }

    fn enable_vfs(&mut self, count: u16) -> Result<(), Error> {
        if usize::from(count) > pf::MAX_VFS || count == 0 {
            return Err(Error::SriovEnable {
                requested: count,
                reason: "TotalVFs is 8",
            });
        }
        let mut model = self.model.borrow_mut();
        if model.unplugged.is_some() {
            return Err(Error::SriovEnable {
                requested: count,
                reason: "PF not present",
            });
        }
        model.enabled_vfs = usize::from(count);
        for vf in 0..usize::from(count) {
            model.vf_reset(vf);
        }
        Ok(())
    }

    fn disable_vfs(&mut self) {
        let mut model = self.model.borrow_mut();
        for vf in 0..model.enabled_vfs {
            model.vf_reset(vf);
        }
        model.enabled_vfs = 0;
    }

    fn enabled_vfs(&self) -> u16 {
        self.model.borrow().enabled_vfs as u16
    }

    fn function_level_reset(&mut self, vf: u16) -> Result<(), Error> {
        let mut model = self.model.borrow_mut();
        let count = model.enabled_vfs as u16;
        if vf >= count {
            return Err(Error::NoSuchVf { vf, count });
        }
        model.vf_reset(usize::from(vf));
        Ok(())
    }
}

/// A [`WaitHost`] for tests: a clock that advances `step_ns` per reading, a count of idle
/// turns, and an optional idle hook (e.g. running a lab PF's `service`).
pub struct TestHost {
    clock_ns: Rc<Cell<u64>>,
    step_ns: u64,
    idle_turns: Rc<Cell<u64>>,
    hook: Option<Box<dyn FnMut()>>,
}

impl TestHost {
    /// A host whose clock advances `step_ns` per reading.
    pub fn new(step_ns: u64) -> Self {
        TestHost {
            clock_ns: Rc::new(Cell::new(0)),
            step_ns,
            idle_turns: Rc::new(Cell::new(0)),
            hook: None,
        }
    }

    /// Runs `hook` on every idle turn.
    pub fn with_idle(mut self, hook: impl FnMut() + 'static) -> Self {
        self.hook = Some(Box::new(hook));
        self
    }

    /// Shared view of the clock (tests read it and move it forward).
    pub fn clock(&self) -> Rc<Cell<u64>> {
        self.clock_ns.clone()
    }

    /// Shared count of idle turns.
    pub fn idle_turns(&self) -> Rc<Cell<u64>> {
        self.idle_turns.clone()
    }
}

impl WaitHost for TestHost {
    fn now_ns(&mut self) -> u64 {
        self.clock_ns.set(self.clock_ns.get() + self.step_ns);
        self.clock_ns.get()
    }

    fn idle(&mut self) {
        self.idle_turns.set(self.idle_turns.get() + 1);
        if let Some(hook) = self.hook.as_mut() {
            hook();
        }
    }
}
