//! The PF↔VF mailbox: message formats shared by both ends, and the VF end of the protocol.
//!
//! Each VF shares 16 words of mailbox memory (VMBMEM) with the PF and owns a control register
//! (V2PMAILBOX; the PF's view is P2VMAILBOX). A sender takes the buffer lock (VFU/PFU), writes
//! the words and raises REQ/STS; the receiver takes the lock, reads and answers ACK. PFSTS,
//! PFACK and RSTD are cleared by *reading* V2PMAILBOX, so the VF end latches them in software
//! (82576 datasheet §7.8.2.9; Linux `igbvf/mbx.c` does the same).
//!
//! Message words (Linux `igbvf/mbx.h`, `igb/e1000_mbx.h`): bits 15:0 the message type, bits
//! 23:16 per-message info, bit 31 ACK, bit 30 NACK, bit 29 CTS ("clear to send": the PF knows
//! this VF since its last VF_RESET). The igb PF has no API-version negotiation (that message,
//! 0x08, belongs to ixgbe): a Linux igb PF NACKs it and logs "Unhandled Msg", so this VF never
//! sends it, and the lab PF NACKs it the same way.

use crate::hw::{Registers, WaitLimits, WaitOutcome, wait_for};
use crate::regs::{self, Mailbox};
use crate::{Error, WaitHost};
use core::fmt;
use net_device::{MacAddress, RegisterIo};

/// VF → PF: "I reset; give me my MAC address and enable my queues." Reply: 3 words.
pub const VF_RESET: u32 = 0x01;
/// VF → PF: set the VF's MAC address (info 0) or add/clear extra unicast filters.
pub const SET_MAC_ADDR: u32 = 0x02;
/// VF → PF: the multicast hash list (count in the info field, u16 hashes from word 1).
pub const SET_MULTICAST: u32 = 0x03;
/// VF → PF: add (info 1) or remove (info 0) a VLAN filter; word 1 is the VLAN ID.
pub const SET_VLAN: u32 = 0x04;
/// VF → PF: largest frame to accept (VMOLR.RLPML/LPE); word 1 is the size in bytes.
pub const SET_LPE: u32 = 0x05;
/// VF → PF: promiscuous modes (info `2` = all multicast).
pub const SET_PROMISC: u32 = 0x06;
/// PF → VF: something changed (PF reset, link change); re-check link and CTS.
pub const PF_CONTROL_MSG: u32 = 0x0100;

/// Reply flag: the request was carried out.
pub const MSGTYPE_ACK: u32 = 0x8000_0000;
/// Reply flag: the request was refused.
pub const MSGTYPE_NACK: u32 = 0x4000_0000;
/// Reply flag: the PF knows this VF (it completed VF_RESET and was not reset since).
pub const MSGTYPE_CTS: u32 = 0x2000_0000;
/// Shift of the per-message info field.
pub const MSGINFO_SHIFT: u32 = 16;
/// Mask of the per-message info field.
pub const MSGINFO_MASK: u32 = 0xFF << MSGINFO_SHIFT;
/// SET_MAC_ADDR info: remove every extra unicast filter of the VF.
pub const MAC_FILTER_CLEAR: u32 = 1 << MSGINFO_SHIFT;
/// SET_MAC_ADDR info: add an extra unicast filter.
pub const MAC_FILTER_ADD: u32 = 2 << MSGINFO_SHIFT;
/// SET_PROMISC info: receive all multicast.
pub const PROMISC_MULTICAST: u32 = 2 << MSGINFO_SHIFT;
/// Most multicast hashes one SET_MULTICAST carries (15 words of two u16 after word 0).
pub const MAX_MULTICAST_HASHES: usize = 30;

/// The message type of a word 0 (flags and info stripped).
pub const fn message_type(word: u32) -> u32 {
    word & 0xFFFF
}

/// A request the VF makes, for errors and logs.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Request {
    /// [`VF_RESET`].
    Reset,
    /// [`SET_MAC_ADDR`].
    SetMacAddress,
    /// [`SET_MULTICAST`].
    SetMulticast,
    /// [`SET_LPE`].
    SetMaxFrameSize,
    /// [`SET_VLAN`].
    SetVlan,
    /// [`SET_PROMISC`].
    SetPromiscuous,
}

impl Request {
    /// The message type code.
    pub const fn code(self) -> u32 {
        match self {
            Request::Reset => VF_RESET,
            Request::SetMacAddress => SET_MAC_ADDR,
            Request::SetMulticast => SET_MULTICAST,
            Request::SetMaxFrameSize => SET_LPE,
            Request::SetVlan => SET_VLAN,
            Request::SetPromiscuous => SET_PROMISC,
        }
    }
}

impl fmt::Display for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Request::Reset => "VF_RESET",
            Request::SetMacAddress => "SET_MAC_ADDR",
            Request::SetMulticast => "SET_MULTICAST",
            Request::SetMaxFrameSize => "SET_LPE",
            Request::SetVlan => "SET_VLAN",
            Request::SetPromiscuous => "SET_PROMISC",
        })
    }
}

/// The step of a mailbox exchange that did not happen in time.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum MailboxStage {
    /// The buffer lock was never granted (the PF kept it).
    Lock,
    /// The PF never acknowledged the request (PFACK).
    Acknowledgement,
    /// The PF never sent its reply (PFSTS).
    Reply,
}

impl fmt::Display for MailboxStage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MailboxStage::Lock => "buffer lock",
            MailboxStage::Acknowledgement => "PF acknowledgement",
            MailboxStage::Reply => "PF reply",
        })
    }
}

/// Packs a MAC address into message words 1-2 (bytes in order, little-endian words).
pub fn pack_mac(mac: MacAddress) -> [u32; 2] {
    let m = mac.0;
    [
        u32::from_le_bytes([m[0], m[1], m[2], m[3]]),
        u32::from_le_bytes([m[4], m[5], 0, 0]),
    ]
}

/// Unpacks a MAC address from message words 1-2.
pub fn unpack_mac(words: [u32; 2]) -> MacAddress {
    let low = words[0].to_le_bytes();
    let high = words[1].to_le_bytes();
    MacAddress([low[0], low[1], low[2], low[3], high[0], high[1]])
}

/// The 12-bit multicast table hash of `mac` for the default filter type (address bits 47:36),
/// as the VF sends it and the PF programs it into the MTA.
pub fn multicast_hash(mac: MacAddress) -> u16 {
    ((u16::from(mac.0[4]) >> 4) | (u16::from(mac.0[5]) << 4)) & 0x0FFF
}

/// Builds a SET_MULTICAST message; addresses past [`MAX_MULTICAST_HASHES`] are left out (and
/// the caller logs it).
pub fn encode_multicast(addresses: &[MacAddress]) -> [u32; regs::MAILBOX_WORDS] {
    let count = addresses.len().min(MAX_MULTICAST_HASHES);
    let mut message = [0u32; regs::MAILBOX_WORDS];
    message[0] = SET_MULTICAST | ((count as u32) << MSGINFO_SHIFT);
    for (index, address) in addresses.iter().take(count).enumerate() {
        let word = 1 + index / 2;
        let shift = (index % 2) * 16;
        message[word] |= u32::from(multicast_hash(*address)) << shift;
    }
    message
}

/// Decodes the hashes of a SET_MULTICAST message (count clamped to what fits).
pub fn decode_multicast(
    message: &[u32; regs::MAILBOX_WORDS],
) -> ([u16; MAX_MULTICAST_HASHES], usize) {
    let count = (((message[0] & MSGINFO_MASK) >> MSGINFO_SHIFT) as usize).min(MAX_MULTICAST_HASHES);
    let mut hashes = [0u16; MAX_MULTICAST_HASHES];
    for (index, hash) in hashes.iter_mut().take(count).enumerate() {
        *hash = (message[1 + index / 2] >> ((index % 2) * 16)) as u16;
    }
    (hashes, count)
}

/// Mailbox activity counters of the VF end.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct MailboxCounters {
    /// Messages written to the PF.
    pub messages_sent: u64,
    /// Messages read from the PF.
    pub messages_received: u64,
    /// PF acknowledgements seen.
    pub acks_received: u64,
    /// PF reset indications (RSTI/RSTD) seen while the VF was running.
    pub resets_seen: u64,
    /// Waits that ran out of time.
    pub timeouts: u64,
}

/// The VF end of the mailbox: latched read-to-clear bits and counters.
#[derive(Default)]
pub(crate) struct VfMailbox {
    latched: Mailbox,
    pub(crate) counters: MailboxCounters,
}

impl VfMailbox {
    /// Forgets latched bits (after a VF reset).
    pub(crate) fn clear(&mut self) {
        self.latched = Mailbox::empty();
    }

    /// Reads V2PMAILBOX, keeping read-to-clear bits for later checks.
    fn read_control<R: RegisterIo>(&mut self, regs: &Registers<R>) -> Mailbox {
        let bits = Mailbox::from_bits_retain(regs.read(regs::V2PMAILBOX)) | self.latched;
        self.latched |= bits & Mailbox::READ_TO_CLEAR;
        bits
    }

    /// True when any bit of `mask` is (or was, while latched) set; consumes those bits.
    fn take<R: RegisterIo>(&mut self, regs: &Registers<R>, mask: Mailbox) -> bool {
        let bits = self.read_control(regs);
        self.latched.remove(mask);
        bits.intersects(mask)
    }

    /// The raw control bits as last seen (for error messages).
    pub(crate) fn peek<R: RegisterIo>(&mut self, regs: &Registers<R>) -> u32 {
        self.read_control(regs).bits()
    }

    /// PF reset indication (RSTI) or reset-done (RSTD) pending.
    pub(crate) fn check_for_reset<R: RegisterIo>(&mut self, regs: &Registers<R>) -> bool {
        self.take(regs, Mailbox::RSTI | Mailbox::RSTD)
    }

    /// A PF message is waiting (PFSTS).
    pub(crate) fn check_for_message<R: RegisterIo>(&mut self, regs: &Registers<R>) -> bool {
        self.take(regs, Mailbox::PFSTS)
    }

    /// Puts PFSTS back after a message could not be read yet (lock busy), so the next poll
    /// retries instead of losing the message.
    pub(crate) fn keep_message_pending(&mut self) {
        self.latched |= Mailbox::PFSTS;
    }

    /// The PF acknowledged our last message (PFACK).
    fn check_for_ack<R: RegisterIo>(&mut self, regs: &Registers<R>) -> bool {
        let seen = self.take(regs, Mailbox::PFACK);
        if seen {
            self.counters.acks_received += 1;
        }
        seen
    }

    /// Takes the buffer lock; false while the PF holds it.
    fn lock<R: RegisterIo>(&mut self, regs: &Registers<R>) -> bool {
        regs.write(regs::V2PMAILBOX, Mailbox::VFU.bits());
        self.read_control(regs).contains(Mailbox::VFU)
    }

    /// Writes `message` and raises REQ (which also drops the lock). False if the lock was busy.
    pub(crate) fn try_write<R: RegisterIo>(
        &mut self,
        regs: &Registers<R>,
        message: &[u32],
    ) -> bool {
        if !self.lock(regs) {
            return false;
        }
        // The buffer is about to be overwritten: whatever the PF said before is stale now.
        self.latched.remove(Mailbox::PFACK | Mailbox::PFSTS);
        for (index, word) in message.iter().take(regs::MAILBOX_WORDS).enumerate() {
            regs.write(regs::VMBMEM + 4 * index, *word);
        }
        regs.write(regs::V2PMAILBOX, Mailbox::REQ.bits());
        self.counters.messages_sent += 1;
        true
    }

    /// Reads a PF message into `buffer` and acknowledges it (which also drops the lock).
    /// False if the lock was busy.
    pub(crate) fn try_read<R: RegisterIo>(
        &mut self,
        regs: &Registers<R>,
        buffer: &mut [u32],
    ) -> bool {
        if !self.lock(regs) {
            return false;
        }
        for (index, word) in buffer.iter_mut().take(regs::MAILBOX_WORDS).enumerate() {
            *word = regs.read(regs::VMBMEM + 4 * index);
        }
        regs.write(regs::V2PMAILBOX, Mailbox::ACK.bits());
        self.counters.messages_received += 1;
        true
    }

    /// Sends `message` and waits (bounded) for the PF's acknowledgement.
    pub(crate) fn write_posted<R: RegisterIo>(
        &mut self,
        regs: &Registers<R>,
        host: &mut dyn WaitHost,
        limits: WaitLimits,
        request: Request,
        message: &[u32],
    ) -> Result<(), Error> {
        let written = wait_for(host, limits, || {
            regs.ensure_alive("mailbox write")?;
            Ok(self.try_write(regs, message).then_some(()))
        })?;
        self.expect(written, request, MailboxStage::Lock)?;
        let acknowledged = wait_for(host, limits, || {
            regs.ensure_alive("mailbox write")?;
            Ok(self.check_for_ack(regs).then_some(()))
        })?;
        self.expect(acknowledged, request, MailboxStage::Acknowledgement)
    }

    /// Waits (bounded) for a PF message and reads it into `buffer`.
    pub(crate) fn read_posted<R: RegisterIo>(
        &mut self,
        regs: &Registers<R>,
        host: &mut dyn WaitHost,
        limits: WaitLimits,
        request: Request,
        buffer: &mut [u32],
    ) -> Result<(), Error> {
        let arrived = wait_for(host, limits, || {
            regs.ensure_alive("mailbox read")?;
            Ok(self.check_for_message(regs).then_some(()))
        })?;
        self.expect(arrived, request, MailboxStage::Reply)?;
        let read = wait_for(host, limits, || {
            regs.ensure_alive("mailbox read")?;
            Ok(self.try_read(regs, buffer).then_some(()))
        })?;
        self.expect(read, request, MailboxStage::Lock)
    }

    fn expect(
        &mut self,
        outcome: WaitOutcome<()>,
        request: Request,
        stage: MailboxStage,
    ) -> Result<(), Error> {
        match outcome {
            WaitOutcome::Done(()) => Ok(()),
            WaitOutcome::TimedOut { waited_ns } => {
                self.counters.timeouts += 1;
                log::warn!("igbvf: {request} got no {stage} within {waited_ns} ns");
                Err(Error::MailboxTimeout { request, stage })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_round_trips_through_message_words() {
        let mac = MacAddress([0x52, 0x54, 0x00, 0x00, 0x0a, 0x00]);
        // Reference §3.1 step 4: the reply words for 52:54:00:00:0a:00.
        assert_eq!(pack_mac(mac), [0x0000_5452, 0x0000_000a]);
        assert_eq!(unpack_mac(pack_mac(mac)), mac);
    }

    #[test]
    fn multicast_hash_uses_address_bits_47_to_36() {
        // 01:00:5e:00:00:fb (mDNS): bytes 4,5 = 0x00,0xfb -> 0xfb0.
        assert_eq!(
            multicast_hash(MacAddress([0x01, 0x00, 0x5e, 0x00, 0x00, 0xfb])),
            0xfb0
        );
        assert_eq!(
            multicast_hash(MacAddress([0x33, 0x33, 0, 0, 0x12, 0x34])),
            0x341
        );
    }

    #[test]
    fn multicast_message_packs_two_hashes_per_word_and_caps_at_thirty() {
        let addresses: alloc::vec::Vec<MacAddress> = (0..40u8)
            .map(|i| MacAddress([0x01, 0x00, 0x5e, 0, i << 4, i]))
            .collect();
        let message = encode_multicast(&addresses);
        assert_eq!(message[0], SET_MULTICAST | (30 << MSGINFO_SHIFT));
        let (hashes, count) = decode_multicast(&message);
        assert_eq!(count, 30);
        for (i, hash) in hashes.iter().enumerate() {
            assert_eq!(*hash, multicast_hash(addresses[i]));
        }
    }
}
