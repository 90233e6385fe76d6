//! Hardware sequences of the VF: register access with removal detection, bounded waits, reset,
//! the PF conversation (VF_RESET, MAC, max frame, multicast) and queue/interrupt programming.
//!
//! Sequences follow the 82576 datasheet §7.8 (VF reset and mailbox) and §4.5.9/§4.5.10
//! (queue enable), as checked against QEMU's igb/igbvf (reference §3.1).

use crate::mailbox::{self, MailboxCounters, Request, VfMailbox};
use crate::regs::{self, Control, QueueControl, SplitRxControl, Status};
use crate::{Error, Queue, WaitHost};
use core::cell::Cell;
use net_device::{MacAddress, PhysAddr, RegisterIo};

/// How long, and how many turns at most, one wait may take.
#[derive(Clone, Copy, Debug)]
pub(crate) struct WaitLimits {
    /// Time bound.
    pub timeout_ns: u64,
    /// Iteration bound, so a clock that never advances cannot turn a wait into a hang.
    pub max_iterations: u32,
}

/// How a bounded wait ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum WaitOutcome<T> {
    /// The condition became true.
    Done(T),
    /// The bound was reached first.
    TimedOut {
        /// Time spent waiting.
        waited_ns: u64,
    },
}

/// Calls `attempt` until it yields a value, an error, or the limits run out; runs
/// [`WaitHost::idle`] between attempts so an in-image PF gets the CPU.
pub(crate) fn wait_for<T>(
    host: &mut dyn WaitHost,
    limits: WaitLimits,
    mut attempt: impl FnMut() -> Result<Option<T>, Error>,
) -> Result<WaitOutcome<T>, Error> {
    let start = host.now_ns();
    let mut iterations: u32 = 0;
    loop {
        if let Some(value) = attempt()? {
            return Ok(WaitOutcome::Done(value));
        }
        iterations = iterations.saturating_add(1);
        let waited_ns = host.now_ns().saturating_sub(start);
        if waited_ns >= limits.timeout_ns || iterations >= limits.max_iterations {
            return Ok(WaitOutcome::TimedOut { waited_ns });
        }
        host.idle();
    }
}

/// True for a STATUS value only a vanished device returns: QEMU reads unassigned MMIO as 0
/// (reference §4.6), real hardware as all-ones; a live VF's STATUS always has bits set
/// (QEMU: bit 31 and FD, reference §3.1 step 8).
pub(crate) fn status_means_removed(status: u32) -> bool {
    status == 0 || status == u32::MAX
}

/// The VF's BAR0 with removal latching: once removal is seen, reads return 0 and writes are
/// dropped, so nothing spins on a dead device.
pub(crate) struct Registers<R> {
    io: R,
    removed: Cell<bool>,
    removal_status: Cell<u32>,
}

impl<R: RegisterIo> Registers<R> {
    pub(crate) fn new(io: R) -> Self {
        Registers {
            io,
            removed: Cell::new(false),
            removal_status: Cell::new(0),
        }
    }

    /// Reads a register; an all-ones value is double-checked against STATUS (Linux `igb_rd32`
    /// does the same) because all-ones is what a removed device returns on real hardware.
    pub(crate) fn read(&self, offset: usize) -> u32 {
        if self.removed.get() {
            return 0;
        }
        let value = self.io.read32(offset);
        if value == u32::MAX && offset != regs::STATUS {
            let status = self.io.read32(regs::STATUS);
            if status_means_removed(status) {
                self.latch_removed(status);
                return 0;
            }
        }
        value
    }

    /// Writes a register unless the device is gone.
    pub(crate) fn write(&self, offset: usize, value: u32) {
        if !self.removed.get() {
            self.io.write32(offset, value);
        }
    }

    fn latch_removed(&self, status: u32) {
        if !self.removed.get() {
            log::error!("igbvf: device removed (STATUS reads {status:#010x})");
        }
        self.removed.set(true);
        self.removal_status.set(status);
    }

    /// Stops all register access (removal noticed elsewhere).
    pub(crate) fn mark_removed(&self) {
        self.removed.set(true);
    }

    /// True once removal was seen.
    pub(crate) fn is_removed(&self) -> bool {
        self.removed.get()
    }

    /// Reads STATUS; `None` (and removal latched) when the device is gone.
    pub(crate) fn status(&self) -> Option<Status> {
        if self.removed.get() {
            return None;
        }
        let status = self.io.read32(regs::STATUS);
        if status_means_removed(status) {
            self.latch_removed(status);
            return None;
        }
        Some(Status::from_bits_retain(status))
    }

    /// Errors with [`Error::DeviceGone`] when the device is gone.
    pub(crate) fn ensure_alive(&self, operation: &'static str) -> Result<Status, Error> {
        self.status().ok_or(Error::DeviceGone {
            operation,
            status: self.removal_status.get(),
        })
    }

    /// The STATUS value that revealed the removal.
    pub(crate) fn removal_status(&self) -> u32 {
        self.removal_status.get()
    }
}

/// An unsolicited PF message or mailbox event seen while running.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum MailboxEvent {
    /// Nothing pending.
    Nothing,
    /// RSTI or RSTD: the PF reset; everything must be set up again.
    PfReset,
    /// PF_CONTROL_MSG: re-check the link; `clear_to_send` tells whether the PF still knows us.
    Control {
        /// The CTS flag of the message.
        clear_to_send: bool,
    },
    /// A NACK outside any request: the PF no longer knows this VF; it must redo VF_RESET.
    NotClearToSend,
    /// A message that was waiting but could not be read yet (lock busy); retried next time.
    Busy,
    /// Something else (a late reply): logged and ignored.
    Ignored(u32),
}

/// Register-level state of one VF: the register window, the mailbox end and what the PF said.
pub(crate) struct Hw<R> {
    pub regs: Registers<R>,
    pub mailbox: VfMailbox,
    /// The last PF message carried CTS (or VF_RESET completed): the PF knows this VF.
    pub clear_to_send: bool,
}

/// Unrelated PF messages tolerated while waiting for one reply (each wait is itself bounded).
const MAX_INTERLEAVED_MESSAGES: usize = 4;

impl<R: RegisterIo> Hw<R> {
    pub(crate) fn new(io: R) -> Self {
        Hw {
            regs: Registers::new(io),
            mailbox: VfMailbox::default(),
            clear_to_send: false,
        }
    }

    pub(crate) fn mailbox_counters(&self) -> MailboxCounters {
        self.mailbox.counters
    }

    /// VF software reset (datasheet §7.8.2.6: CTRL.RST resets the VF's queues and interrupts),
    /// then waits until the PF shows neither reset-in-progress (RSTI) nor reset-done (RSTD):
    /// "we cannot initialize while the RSTI / RSTD bits are asserted" (Linux `vf.c`).
    pub(crate) fn reset(
        &mut self,
        host: &mut dyn WaitHost,
        limits: WaitLimits,
    ) -> Result<(), Error> {
        self.regs.ensure_alive("VF reset")?;
        self.clear_to_send = false;
        self.mailbox.clear();
        self.regs.write(regs::CTRL, Control::RESET.bits());
        let regs = &self.regs;
        let mailbox = &mut self.mailbox;
        let outcome = wait_for(host, limits, || {
            regs.ensure_alive("VF reset")?;
            Ok((!mailbox.check_for_reset(regs)).then_some(()))
        })?;
        match outcome {
            WaitOutcome::Done(()) => Ok(()),
            WaitOutcome::TimedOut { waited_ns } => Err(Error::ResetTimeout {
                waited_ns,
                mailbox: self.mailbox.peek(&self.regs),
            }),
        }
    }

    /// Sends `message` and waits for the PF's reply of the same type into `reply`, tolerating
    /// (and acting on) a few unrelated PF messages in between. Returns reply word 0.
    pub(crate) fn request(
        &mut self,
        host: &mut dyn WaitHost,
        limits: WaitLimits,
        request: Request,
        message: &[u32],
        reply: &mut [u32],
    ) -> Result<u32, Error> {
        self.mailbox
            .write_posted(&self.regs, host, limits, request, message)?;
        for _ in 0..=MAX_INTERLEAVED_MESSAGES {
            reply.iter_mut().for_each(|word| *word = 0);
            self.mailbox
                .read_posted(&self.regs, host, limits, request, reply)?;
            let word = reply.first().copied().unwrap_or(0);
            match mailbox::message_type(word) {
                code if code == request.code() => {
                    // The VF_RESET reply has no CTS bit, yet completing it is what makes the PF
                    // consider this VF clear to send (Linux `igb_vf_reset_msg`).
                    self.clear_to_send =
                        request == Request::Reset || word & mailbox::MSGTYPE_CTS != 0;
                    return Ok(word);
                }
                mailbox::PF_CONTROL_MSG => {
                    log::debug!(
                        "igbvf: PF control message {word:#010x} while waiting for {request}"
                    );
                    self.clear_to_send = word & mailbox::MSGTYPE_CTS != 0;
                }
                0 if word & mailbox::MSGTYPE_NACK != 0 => {
                    // A bare NACK: the PF does not consider us clear to send.
                    self.clear_to_send = false;
                    return Err(Error::PfRefused {
                        request,
                        reply: word,
                    });
                }
                _ => {
                    return Err(Error::UnexpectedReply {
                        request,
                        reply: word,
                    });
                }
            }
        }
        Err(Error::MailboxTimeout {
            request,
            stage: mailbox::MailboxStage::Reply,
        })
    }

    /// VF_RESET: asks the PF to (re)admit this VF. Returns the MAC address the PF assigned, or
    /// `None` when it NACKed (no MAC configured for the VF) or sent an unusable address.
    pub(crate) fn negotiate_reset(
        &mut self,
        host: &mut dyn WaitHost,
        limits: WaitLimits,
    ) -> Result<Option<MacAddress>, Error> {
        let mut reply = [0u32; 3];
        let word = self.request(
            host,
            limits,
            Request::Reset,
            &[mailbox::VF_RESET],
            &mut reply,
        )?;
        if word & mailbox::MSGTYPE_ACK != 0 {
            let mac = mailbox::unpack_mac([reply[1], reply[2]]);
            if mac.is_valid_unicast() {
                return Ok(Some(mac));
            }
            log::warn!("igbvf: PF assigned an unusable MAC address {mac}");
            return Ok(None);
        }
        if word & mailbox::MSGTYPE_NACK != 0 {
            log::info!("igbvf: PF has no MAC address for this VF");
            return Ok(None);
        }
        Err(Error::UnexpectedReply {
            request: Request::Reset,
            reply: word,
        })
    }

    /// Sends a request whose reply is one word; `Ok(true)` on ACK, `Ok(false)` on NACK.
    fn simple_request(
        &mut self,
        host: &mut dyn WaitHost,
        limits: WaitLimits,
        request: Request,
        message: &[u32],
    ) -> Result<bool, Error> {
        let mut reply = [0u32; 1];
        let word = self.request(host, limits, request, message, &mut reply)?;
        if word & mailbox::MSGTYPE_ACK != 0 {
            Ok(true)
        } else if word & mailbox::MSGTYPE_NACK != 0 {
            Ok(false)
        } else {
            Err(Error::UnexpectedReply {
                request,
                reply: word,
            })
        }
    }

    /// SET_MAC_ADDR; `Ok(false)` when the PF refuses (e.g. an administrator set the MAC).
    pub(crate) fn set_mac_address(
        &mut self,
        host: &mut dyn WaitHost,
        limits: WaitLimits,
        mac: MacAddress,
    ) -> Result<bool, Error> {
        let words = mailbox::pack_mac(mac);
        self.simple_request(
            host,
            limits,
            Request::SetMacAddress,
            &[mailbox::SET_MAC_ADDR, words[0], words[1]],
        )
    }

    /// SET_LPE: the largest frame (including FCS and one VLAN tag) the PF lets through.
    pub(crate) fn set_max_frame_size(
        &mut self,
        host: &mut dyn WaitHost,
        limits: WaitLimits,
        bytes: u32,
    ) -> Result<bool, Error> {
        self.simple_request(
            host,
            limits,
            Request::SetMaxFrameSize,
            &[mailbox::SET_LPE, bytes],
        )
    }

    /// SET_MULTICAST with the hashes of `addresses` (at most 30 are sent).
    pub(crate) fn set_multicast(
        &mut self,
        host: &mut dyn WaitHost,
        limits: WaitLimits,
        addresses: &[MacAddress],
    ) -> Result<bool, Error> {
        if addresses.len() > mailbox::MAX_MULTICAST_HASHES {
            log::warn!(
                "igbvf: {} multicast addresses requested, the PF takes {}; the rest are dropped",
                addresses.len(),
                mailbox::MAX_MULTICAST_HASHES
            );
        }
        let message = mailbox::encode_multicast(addresses);
        self.simple_request(host, limits, Request::SetMulticast, &message)
    }

    /// Non-blocking look at the mailbox while running.
    pub(crate) fn poll_mailbox(&mut self) -> MailboxEvent {
        if self.mailbox.check_for_reset(&self.regs) {
            self.mailbox.counters.resets_seen += 1;
            self.clear_to_send = false;
            return MailboxEvent::PfReset;
        }
        if !self.mailbox.check_for_message(&self.regs) {
            return MailboxEvent::Nothing;
        }
        let mut word = [0u32; 1];
        if !self.mailbox.try_read(&self.regs, &mut word) {
            self.mailbox.keep_message_pending();
            return MailboxEvent::Busy;
        }
        let word = word[0];
        let code = mailbox::message_type(word);
        if word & mailbox::MSGTYPE_NACK != 0 && (code == 0 || code == mailbox::PF_CONTROL_MSG) {
            self.clear_to_send = false;
            return MailboxEvent::NotClearToSend;
        }
        if code == mailbox::PF_CONTROL_MSG {
            self.clear_to_send = word & mailbox::MSGTYPE_CTS != 0;
            return MailboxEvent::Control {
                clear_to_send: self.clear_to_send,
            };
        }
        MailboxEvent::Ignored(word)
    }

    /// Clears the enable bit of both queues (the device finishes the frame in progress).
    pub(crate) fn disable_queues(&self) {
        let rx = self.regs.read(regs::RXDCTL);
        self.regs
            .write(regs::RXDCTL, rx & !QueueControl::ENABLE.bits());
        let tx = self.regs.read(regs::TXDCTL);
        self.regs
            .write(regs::TXDCTL, tx & !QueueControl::ENABLE.bits());
    }

    /// Waits until both queues read back `enabled` (datasheet §4.5.9: RXDCTL/TXDCTL.ENABLE
    /// reflect the queue's real state).
    pub(crate) fn wait_queues(
        &self,
        host: &mut dyn WaitHost,
        limits: WaitLimits,
        enabled: bool,
    ) -> Result<(), Error> {
        for (queue, register) in [
            (Queue::Receive, regs::RXDCTL),
            (Queue::Transmit, regs::TXDCTL),
        ] {
            let outcome = wait_for(host, limits, || {
                self.regs.ensure_alive("queue enable/disable")?;
                let is_enabled = self.regs.read(register) & QueueControl::ENABLE.bits() != 0;
                Ok((is_enabled == enabled).then_some(()))
            })?;
            if let WaitOutcome::TimedOut { waited_ns } = outcome {
                return Err(Error::QueueTimeout {
                    queue,
                    enable: enabled,
                    waited_ns,
                });
            }
        }
        Ok(())
    }

    /// Programs TX queue 0 over the ring at `base` (datasheet §4.5.10) and enables it.
    pub(crate) fn configure_tx(&self, base: PhysAddr, ring_bytes: u32) {
        self.regs.write(regs::TXDCTL, 0);
        self.regs.write(regs::TDBAL, base.0 as u32);
        self.regs.write(regs::TDBAH, (base.0 >> 32) as u32);
        self.regs.write(regs::TDLEN, ring_bytes);
        self.regs.write(regs::TDH, 0);
        self.regs.write(regs::TDT, 0);
        // Completion is seen through DD in each descriptor, not a head write-back.
        self.regs.write(regs::TDWBAL, 0);
        self.regs.write(regs::TDWBAH, 0);
        self.regs.write(regs::TXDCTL, QueueControl::ENABLE.bits());
    }

    /// Programs RX queue 0 over the ring at `base` with one buffer of `buffer_bytes` per
    /// descriptor (datasheet §4.5.9) and enables it; the tail is written once buffers are posted.
    pub(crate) fn configure_rx(&self, base: PhysAddr, ring_bytes: u32, buffer_bytes: usize) {
        self.regs.write(regs::RXDCTL, 0);
        self.regs.write(regs::RDBAL, base.0 as u32);
        self.regs.write(regs::RDBAH, (base.0 >> 32) as u32);
        self.regs.write(regs::RDLEN, ring_bytes);
        let srrctl = SplitRxControl::DESCTYPE_ADVANCED_ONE_BUFFER.bits()
            | SplitRxControl::DROP_ENABLE.bits()
            | regs::srrctl_buffer_size(buffer_bytes);
        self.regs.write(regs::SRRCTL, srrctl);
        self.regs.write(regs::RDH, 0);
        self.regs.write(regs::RDT, 0);
        self.regs.write(
            regs::RXDCTL,
            (QueueControl::ENABLE | QueueControl::WTHRESH_1).bits(),
        );
    }

    /// Routes queue 0 RX and TX causes to MSI-X vector `queue_vector` and mailbox causes as
    /// `misc_entry` (already encoded with the valid bit), then unmasks `mask` with auto-clear
    /// (datasheet §7.3.2; VTIVAR byte 0 RX, byte 1 TX).
    pub(crate) fn program_interrupts(&self, queue_vector: u8, misc_entry: u32, mask: u32) {
        let entry = u32::from(queue_vector) | regs::IVAR_VALID;
        self.regs.write(regs::VTIVAR, entry | (entry << 8));
        self.regs.write(regs::VTIVAR_MISC, misc_entry);
        self.regs.write(regs::VTEIAC, mask);
        // No throttle on the queue vector: the driver masks it while it is being polled, so it
        // fires once per busy period, and a throttle would only delay the wake-up after an
        // idle period (QEMU resets EITR to ~6000 interrupts/s, 162 µs; datasheet §7.3.4).
        self.regs.write(regs::vteitr(usize::from(queue_vector)), 0);
        self.regs.write(regs::VTEIMS, mask);
    }

    /// Masks the causes in `bits` (VTEIMC; datasheet §7.3.2): the queue vector while the driver
    /// is being polled.
    pub(crate) fn mask_causes(&self, bits: u32) {
        self.regs.write(regs::VTEIMC, bits);
    }

    /// Clears the causes in `bits` latched while they were masked (VTEICR is write-1-to-clear),
    /// then unmasks them (VTEIMS): unmasking a latched cause would raise an interrupt for work
    /// the caller has already seen.
    pub(crate) fn unmask_causes(&self, bits: u32) {
        self.regs.write(regs::VTEICR, bits);
        self.regs.write(regs::VTEIMS, bits);
    }

    /// Masks every VF interrupt.
    pub(crate) fn mask_interrupts(&self) {
        self.regs.write(regs::VTEIMC, 0x7);
        self.regs.write(regs::VTEIAC, 0);
    }

    /// Reads the wrapping per-VF counters in [`crate::stats`] order.
    pub(crate) fn read_counters(&self) -> [u32; crate::stats::COUNTER_COUNT] {
        [
            self.regs.read(regs::VFGPRC),
            self.regs.read(regs::VFGPTC),
            self.regs.read(regs::VFGORC),
            self.regs.read(regs::VFGOTC),
            self.regs.read(regs::VFMPRC),
        ]
    }
}
