//! [`IgbVf`]: the 82576/I350 virtual function as a [`NetDevice`].
//!
//! States: `Up`/`Down` (running; link as the PF and STATUS say), `Resetting` (the PF reset or
//! forgot this VF, or TX hung: call [`IgbVf::reinitialize`]), `Stopped` (after `stop`: queues
//! disabled, no DMA), `Gone` (removed: no register access ever again).

use crate::hw::{Hw, MailboxEvent, WaitLimits};
use crate::mailbox::{self, MailboxCounters, Request};
use crate::offload::{self, TxEnvironment, TxOutcome};
use crate::regs::{self, Status};
use crate::ring::{MIN_FRAME_LEN, RxChecksums, RxDrops, RxRing, TxRing};
use crate::stats::{CounterAccumulator, HardwareStats};
use crate::{Error, WaitHost};
use alloc::boxed::Box;
use alloc::string::String;
use alloc::vec::Vec;
use net_device::{
    Capabilities, DeviceError, DmaAllocator, LinkState, MacAddress, NetDevice, RegisterIo, RxMeta,
    Stats, TxMeta,
};

/// Ethernet header length.
const ETHERNET_HEADER: usize = 14;
/// One 802.1Q tag.
const VLAN_TAG: usize = 4;
/// Frame check sequence.
const FCS: usize = 4;
/// MSI-X vectors a VF has (reference §1.3).
const VF_VECTORS: u8 = 3;
/// Largest IP packet (its 16-bit total length), hence the largest TSO frame's IP part.
const MAX_IP_PACKET: usize = 65_535;

/// How VTIVAR_MISC (the mailbox interrupt vector) is encoded.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum MailboxVectorEncoding {
    /// As the datasheet says: `vector | 0x80`.
    Datasheet,
    /// QEMU 10's igb treats the field as a bit mask (`0x81` → vector 0, `0x82` → vector 1,
    /// vector 2 unreachable; reference §3.3/§7.6). On real hardware this value selects vector
    /// `index + 1`, so wire MSI-X vectors 0 and 1 to the same handler if one image must run on
    /// both.
    QemuBitmask,
}

impl MailboxVectorEncoding {
    fn encode(self, index: u8) -> Result<u32, Error> {
        match self {
            MailboxVectorEncoding::Datasheet => Ok(u32::from(index) | regs::IVAR_VALID),
            MailboxVectorEncoding::QemuBitmask if index < 2 => {
                Ok((1u32 << index) | regs::IVAR_VALID)
            }
            MailboxVectorEncoding::QemuBitmask => Err(Error::InvalidVector {
                index,
                reason: "QEMU's VTIVAR_MISC can only reach vectors 0 and 1",
            }),
        }
    }
}

/// Driver settings. `Config::default()` suits a 1500-byte MTU under QEMU.
#[derive(Clone, Debug)]
pub struct Config {
    /// Name for logs and [`NetDevice::name`], e.g. "igbvf 01:10.0".
    pub name: String,
    /// RX descriptors (multiple of 8, 8..=4096).
    pub rx_ring_size: u16,
    /// TX descriptors (multiple of 8, 8..=4096).
    pub tx_ring_size: u16,
    /// Bytes per RX buffer (multiple of 1024, up to 16 KiB); must hold a whole frame.
    pub rx_buffer_size: usize,
    /// Largest IP packet; frames up to `mtu` + 14 (+4 with a VLAN tag) bytes are sent.
    pub mtu: usize,
    /// MAC address to ask the PF for when it differs from (or there is no) PF-assigned one; a
    /// PF with an administrator-set MAC refuses, and then the PF's MAC is used.
    pub requested_mac: Option<MacAddress>,
    /// Multicast addresses to receive (at most 30 reach the PF; e.g. IPv6 solicited-node).
    pub multicast: Vec<MacAddress>,
    /// Bound on waiting for the PF's reset indication to clear after the VF reset.
    pub reset_timeout_ns: u64,
    /// Bound on each mailbox step (lock, acknowledgement, reply); Linux uses 1 s.
    pub mailbox_timeout_ns: u64,
    /// Bound on queues reporting enabled/disabled.
    pub queue_timeout_ns: u64,
    /// Frames outstanding with no completion for this long while the link is up and not
    /// paused = TX hang → [`LinkState::Resetting`].
    pub tx_hang_timeout_ns: u64,
    /// Iteration bound of every wait loop, whatever the clock says.
    pub max_wait_iterations: u32,
    /// How to program the mailbox interrupt vector.
    pub mailbox_vector_encoding: MailboxVectorEncoding,
    /// Offer transmit checksum offload and TSO (receive checksum reports are always used).
    /// Off, requests the stack makes anyway are completed in software.
    pub offloads: bool,
    /// While the VF is up, `poll` reads STATUS (removal, link) and the mailbox (PF messages) at
    /// most this often; 0 = every poll. Under emulation every register access is a VM exit
    /// that waits for the device model's lock (held while QEMU's I/O thread receives a whole
    /// burst), and a busy event loop polls many times per millisecond. PF messages raise the
    /// mailbox interrupt, which makes the next poll read at once
    /// ([`IgbVf::set_mailbox_interrupt`]).
    pub register_check_period_ns: u64,
    /// While frames keep arriving (a receive write-back within the last
    /// `register_check_period_ns`), the period stretches to this: a VF that is writing back
    /// frames is present and has link. Removal, link loss and a PF reset all stop reception,
    /// so they are still seen within `register_check_period_ns` of the last frame; only a PF
    /// message that leaves traffic flowing waits up to this long.
    pub busy_register_check_period_ns: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            name: String::from("igbvf"),
            rx_ring_size: 256,
            tx_ring_size: 256,
            rx_buffer_size: 2048,
            mtu: 1500,
            requested_mac: None,
            multicast: Vec::new(),
            reset_timeout_ns: 50_000_000,
            mailbox_timeout_ns: 1_000_000_000,
            queue_timeout_ns: 10_000_000,
            tx_hang_timeout_ns: 100_000_000,
            max_wait_iterations: 1_000_000,
            mailbox_vector_encoding: MailboxVectorEncoding::QemuBitmask,
            offloads: true,
            // Under TCG the vCPU often sees a gap of a millisecond between frames of a busy
            // stream; 2 ms keeps such a gap from counting as "quiet" most of the time.
            register_check_period_ns: 2_000_000,
            busy_register_check_period_ns: 10_000_000,
        }
    }
}

impl Config {
    /// Largest frame handed to `transmit` (no FCS; one VLAN tag allowed).
    fn max_tx_frame(&self) -> usize {
        self.mtu + ETHERNET_HEADER + VLAN_TAG
    }

    /// The SET_LPE value: largest frame on the wire including FCS and one VLAN tag (Linux
    /// `igbvf_set_rlpml` sends the same).
    fn max_wire_frame(&self) -> usize {
        self.mtu + ETHERNET_HEADER + FCS + VLAN_TAG
    }

    fn validate(&self) -> Result<(), Error> {
        let ring_ok = |size: u16| size.is_multiple_of(8) && (8..=4096).contains(&size);
        if !ring_ok(self.rx_ring_size) || !ring_ok(self.tx_ring_size) {
            return Err(Error::InvalidConfig {
                reason: "ring sizes must be multiples of 8 in 8..=4096",
            });
        }
        if !self.rx_buffer_size.is_multiple_of(1024)
            || !(1024..=16 * 1024).contains(&self.rx_buffer_size)
        {
            return Err(Error::InvalidConfig {
                reason: "rx_buffer_size must be a multiple of 1024 up to 16 KiB",
            });
        }
        if self.mtu < 68 || self.max_wire_frame() > self.rx_buffer_size {
            return Err(Error::InvalidConfig {
                reason: "mtu must be at least 68 and a full frame must fit one RX buffer",
            });
        }
        if self.max_wait_iterations == 0 {
            return Err(Error::InvalidConfig {
                reason: "max_wait_iterations must not be 0",
            });
        }
        Ok(())
    }

    fn limits(&self, timeout_ns: u64) -> WaitLimits {
        WaitLimits {
            timeout_ns,
            max_iterations: self.max_wait_iterations,
        }
    }

    /// Transmit sizes that follow from the ring and buffer sizes; see [`TxLimits`].
    fn tx_limits(&self) -> TxLimits {
        let chunk = self.rx_buffer_size;
        let max_frame = self.max_tx_frame();
        let largest_tso_frame = MAX_IP_PACKET + ETHERNET_HEADER + VLAN_TAG;
        // A TSO frame may take half the usable ring, less its context descriptor and FIN
        // segment, so a mostly idle ring always has room for one.
        let usable = usize::from(self.tx_ring_size) - 1;
        let tso_chunks = (usable / 2)
            .saturating_sub(2)
            .min(largest_tso_frame.div_ceil(chunk));
        let tso_frame = (tso_chunks * chunk).min(largest_tso_frame);
        let segmentation_frame = if self.offloads && tso_frame > max_frame {
            tso_frame
        } else {
            0
        };
        let largest = max_frame.max(segmentation_frame);
        TxLimits {
            chunk,
            max_frame,
            segmentation_frame,
            ready_slots: if segmentation_frame > 0 {
                (segmentation_frame.div_ceil(chunk) + 2) as u16
            } else {
                1
            },
            tail_chunks: largest.div_ceil(chunk) + 1,
        }
    }
}

/// Transmit sizes, fixed at start-up.
#[derive(Clone, Copy, Debug)]
struct TxLimits {
    /// Bytes per slot buffer.
    chunk: usize,
    /// Largest frame sent unsegmented (MTU + Ethernet header + one VLAN tag).
    max_frame: usize,
    /// Largest frame taken for TSO; 0 without TSO.
    segmentation_frame: usize,
    /// Free slots [`NetDevice::can_transmit`] wants: enough for the largest frame taken
    /// (context descriptor and FIN segment included), because the stack commits to a frame
    /// before it knows its length.
    ready_slots: u16,
    /// Buffer chunks past the ring's last slot (a transmit's bytes beyond its first chunk).
    tail_chunks: usize,
}

/// Counters of driver events beyond [`Stats`]; every one of them only grows.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct DriverCounters {
    /// Mailbox traffic.
    pub mailbox: MailboxCounters,
    /// Completed (re)initialisations.
    pub initializations: u64,
    /// PF reset indications (RSTI/RSTD) seen while running.
    pub pf_resets: u64,
    /// PF messages saying this VF is no longer clear to send (NACK outside a request).
    pub pf_not_clear_to_send: u64,
    /// PF control messages (link/state change notifications).
    pub pf_control_messages: u64,
    /// Link up/down transitions.
    pub link_changes: u64,
    /// TX hangs detected.
    pub tx_hangs: u64,
    /// RX write-backs with a length of 0 or beyond the buffer.
    pub rx_bad_length: u64,
    /// RX write-backs with frame error bits.
    pub rx_frame_errors: u64,
    /// RX frames spread over several descriptors.
    pub rx_multi_descriptor: u64,
    /// RX descriptors written back although never handed to the device.
    pub rx_unposted_written: u64,
    /// Removals the driver noticed itself (STATUS read 0 or all-ones); `mark_gone` is not
    /// counted.
    pub removals_detected: u64,
    /// Frames the device inserted the TCP/UDP checksum into (TSO frames included).
    pub tx_checksum_offloaded: u64,
    /// TSO frames handed to the device.
    pub tx_segmentation_offloaded: u64,
    /// Context descriptors written (frames whose context the device still held need none).
    pub tx_context_descriptors: u64,
    /// Checksums the driver completed itself: frames under 60 bytes (QEMU would count the
    /// padding), layouts the context descriptor cannot express, no slot for a context.
    pub tx_checksum_software: u64,
    /// TSO frames whose FIN went out in a separate header-only segment.
    pub tx_fin_segments: u64,
    /// Offload requests that could not be honoured (checksum field outside the frame,
    /// segmentation of a non-TCP frame, MSS 0, ...): counted whether the frame was still sent
    /// without the impossible part or refused ([`DriverCounters::tx_refused`]).
    pub tx_bad_offload_requests: u64,
    /// Frames not sent because of their offload request.
    pub tx_refused: u64,
    /// Received frames the device vouched for (`RxMeta::checksum_verified`).
    pub rx_checksum_verified: u64,
    /// Received frames with a checksum error bit, delivered unverified for the stack to drop.
    pub rx_checksum_errors: u64,
    /// Times the queue interrupt was unmasked before the event loop slept (it is masked while
    /// the driver is being polled): busy periods, not interrupts.
    pub interrupt_rearms: u64,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum State {
    Up,
    Down,
    Resetting,
    Stopped,
    Gone,
}

#[derive(Clone, Copy, Debug)]
struct MsixSetup {
    queue_vector: u8,
    misc_entry: u32,
    mask: u32,
}

/// The 82576/I350 virtual function driver.
///
/// `R` is the VF's BAR0 (16 KiB), `D` the DMA allocator the rings come from.
pub struct IgbVf<R: RegisterIo, D: DmaAllocator> {
    hw: Hw<R>,
    host: Box<dyn WaitHost>,
    config: Config,
    mac: MacAddress,
    state: State,
    tx: TxRing,
    tx_limits: TxLimits,
    rx: RxRing,
    rx_drops: RxDrops,
    rx_checksums: RxChecksums,
    stats: Stats,
    counters: DriverCounters,
    hardware_counters: CounterAccumulator,
    msix: Option<MsixSetup>,
    multicast: Vec<MacAddress>,
    /// When the oldest outstanding TX frame started waiting without progress.
    tx_watch_since_ns: Option<u64>,
    now_ns: u64,
    /// When `poll` next tries to re-initialise a VF that is `Resetting` (PF reset or control
    /// message, TX hang); `None` until the state is first seen.
    reinit_at_ns: Option<u64>,
    /// Delay before the next automatic re-initialisation; doubles on each failure.
    reinit_backoff_ns: u64,
    /// When `poll` last folded the hardware counters in.
    counters_read_ns: u64,
    /// When `poll` last read STATUS and the mailbox (see [`Config::register_check_period_ns`]);
    /// `None` forces the next poll to read them.
    registers_read_ns: Option<u64>,
    /// A poll skipped those reads (within the period): [`NetDevice::next_poll_ns`] asks for
    /// a poll when they are due, since the skipped poll may have been woken by a PF message's
    /// interrupt and the caller may sleep next.
    register_check_deferred: bool,
    /// When a poll last found receive write-backs (see
    /// [`Config::busy_register_check_period_ns`]).
    received_ns: Option<u64>,
    /// The last receive call found write-backs: the VF counts as busy for the register check
    /// however long ago that call was (see [`IgbVf::register_check_due_ns`]).
    receiving: bool,
    /// RX tail of buffers refilled but not yet announced with an RDT write (see
    /// [`IgbVf::announce_rx_buffers`]).
    rx_tail_pending: Option<u16>,
    /// Takes the "mailbox vector fired" flag (see [`IgbVf::set_mailbox_interrupt`]).
    mailbox_interrupt: Option<Box<dyn FnMut() -> bool>>,
    /// The queue vector is masked because the driver is being polled (NAPI-style): unmasked
    /// again by [`NetDevice::arm_interrupts`] before the caller sleeps.
    queue_interrupt_masked: bool,
    /// Kept to the end (fields drop in order) so the allocator outlives the regions it gave out.
    _allocator: D,
}

/// First automatic re-initialisation attempt after the VF is seen `Resetting` (lets the PF
/// finish its own reset first).
const REINIT_INITIAL_BACKOFF_NS: u64 = 10_000_000;
/// How often `poll` reads the hardware statistics registers. `stats` reports what was last
/// read, and readers (the lab's `stats`, tests) expect it fresh within a fraction of a second.
const HARDWARE_COUNTER_PERIOD_NS: u64 = 100_000_000;
/// Longest delay between automatic re-initialisation attempts.
const REINIT_MAX_BACKOFF_NS: u64 = 1_000_000_000;

impl<R: RegisterIo, D: DmaAllocator> IgbVf<R, D> {
    /// Re-initialises a `Resetting` VF from `poll` once its back-off has passed, so the VF comes
    /// back by itself after a PF reset or control message (the bond only sees link states).
    fn reinitialize_when_due(&mut self, now_ns: u64) {
        let due = *self
            .reinit_at_ns
            .get_or_insert(now_ns + self.reinit_backoff_ns);
        if now_ns < due {
            return;
        }
        // The attempt's bounded waits take time (up to reset_timeout_ns): the back-off counts
        // from its end, or a PF stuck in reset would keep every poll busy-waiting.
        let attempt_started = self.host.now_ns();
        match self.reinitialize() {
            Ok(()) => {
                self.reinit_at_ns = None;
                self.reinit_backoff_ns = REINIT_INITIAL_BACKOFF_NS;
            }
            Err(error) => {
                let spent = self.host.now_ns().saturating_sub(attempt_started);
                self.reinit_backoff_ns = (self.reinit_backoff_ns * 2).min(REINIT_MAX_BACKOFF_NS);
                self.reinit_at_ns = Some(
                    now_ns
                        .saturating_add(spent)
                        .saturating_add(self.reinit_backoff_ns),
                );
                log::warn!(
                    "{}: automatic re-initialisation failed ({error}); next try in {} ms",
                    self.config.name,
                    self.reinit_backoff_ns / 1_000_000
                );
            }
        }
    }

    /// Allocates the rings and brings the VF up: VF reset, VF_RESET with the PF (MAC address),
    /// max frame size, multicast list, queues. Every wait is bounded through `host`.
    ///
    /// Fails cleanly (no register access left half-done that matters: the VF stays reset) when
    /// the PF does not answer, refuses, or the device is gone.
    pub fn new(regs: R, dma: D, host: Box<dyn WaitHost>, config: Config) -> Result<Self, Error> {
        config.validate()?;
        let tx_limits = config.tx_limits();
        let tx = TxRing::new(
            &dma,
            config.tx_ring_size,
            tx_limits.chunk,
            tx_limits.tail_chunks,
        )?;
        let rx = RxRing::new(&dma, config.rx_ring_size, config.rx_buffer_size)?;
        let multicast = config.multicast.clone();
        let mut vf = IgbVf {
            hw: Hw::new(regs),
            host,
            mac: MacAddress::default(),
            state: State::Resetting,
            tx,
            tx_limits,
            rx,
            rx_drops: RxDrops::default(),
            rx_checksums: RxChecksums::default(),
            stats: Stats::default(),
            counters: DriverCounters::default(),
            hardware_counters: CounterAccumulator::default(),
            msix: None,
            multicast,
            tx_watch_since_ns: None,
            now_ns: 0,
            reinit_at_ns: None,
            reinit_backoff_ns: REINIT_INITIAL_BACKOFF_NS,
            counters_read_ns: 0,
            registers_read_ns: None,
            register_check_deferred: false,
            received_ns: None,
            receiving: false,
            rx_tail_pending: None,
            mailbox_interrupt: None,
            queue_interrupt_masked: false,
            config,
            _allocator: dma,
        };
        vf.reinitialize()?;
        Ok(vf)
    }

    /// Full re-initialisation, as at start-up. Use it when [`NetDevice::link_state`] says
    /// `Resetting`, or to restart after [`NetDevice::stop`]. Fails with
    /// [`Error::DeviceGone`] once the device is gone; on other errors the VF stays `Resetting`
    /// and the call may be retried.
    pub fn reinitialize(&mut self) -> Result<(), Error> {
        if self.state == State::Gone {
            return Err(Error::DeviceGone {
                operation: "reinitialize",
                status: self.hw.regs.removal_status(),
            });
        }
        self.state = State::Resetting;
        match self.bring_up() {
            Ok(()) => {
                self.counters.initializations += 1;
                log::info!(
                    "{}: up, MAC {}, link {:?}",
                    self.config.name,
                    self.mac,
                    self.link_state()
                );
                Ok(())
            }
            Err(error) => {
                if self.hw.regs.is_removed() {
                    self.become_gone();
                } else {
                    self.state = State::Resetting;
                }
                log::error!("{}: initialisation failed: {error}", self.config.name);
                Err(error)
            }
        }
    }

    fn bring_up(&mut self) -> Result<(), Error> {
        self.hw.regs.ensure_alive("initialisation")?;
        // The queues are reset and the ring is handed over afresh below.
        self.rx_tail_pending = None;
        // Keep what the counters said before the reset; they may restart from 0 after it.
        self.hardware_counters.accumulate(self.hw.read_counters());
        self.quiesce_queues();

        let mailbox_limits = self.config.limits(self.config.mailbox_timeout_ns);
        let host = self.host.as_mut();
        // Datasheet §7.8.2.6 / reference §3.1 steps 2-4.
        self.hw
            .reset(host, self.config.limits(self.config.reset_timeout_ns))?;
        self.tx.reset();
        self.rx.reset();
        let assigned = self.hw.negotiate_reset(host, mailbox_limits)?;
        self.mac = self.choose_mac(assigned)?;

        // Reference §3.1 step 5: the PF lets frames up to this size through (VMOLR.RLPML).
        let max_frame = self.config.max_wire_frame() as u32;
        if !self
            .hw
            .set_max_frame_size(self.host.as_mut(), mailbox_limits, max_frame)?
        {
            log::warn!(
                "{}: PF refused max frame size {max_frame}",
                self.config.name
            );
        }
        if !self
            .hw
            .set_multicast(self.host.as_mut(), mailbox_limits, &self.multicast)?
        {
            log::warn!("{}: PF refused the multicast list", self.config.name);
        }

        // Reference §3.1 steps 6-7 (datasheet §4.5.9, §4.5.10).
        self.hw.configure_tx(self.tx.base(), self.tx.byte_len());
        self.hw
            .configure_rx(self.rx.base(), self.rx.byte_len(), self.rx.buffer_size());
        let queue_limits = self.config.limits(self.config.queue_timeout_ns);
        self.hw
            .wait_queues(self.host.as_mut(), queue_limits, true)?;
        if let Some(tail) = self.rx.refill(&mut self.rx_drops) {
            self.hw.regs.write(regs::RDT, u32::from(tail));
        }

        self.hw.regs.read(regs::VTEICR);
        match self.msix {
            Some(setup) => {
                self.hw
                    .program_interrupts(setup.queue_vector, setup.misc_entry, setup.mask)
            }
            None => self.hw.mask_interrupts(),
        }
        self.queue_interrupt_masked = false;
        self.hardware_counters.rebaseline(self.hw.read_counters());
        self.tx_watch_since_ns = None;
        let status = self.hw.regs.ensure_alive("initialisation")?;
        self.state = State::Down;
        self.update_link(status);
        Ok(())
    }

    fn choose_mac(&mut self, assigned: Option<MacAddress>) -> Result<MacAddress, Error> {
        let limits = self.config.limits(self.config.mailbox_timeout_ns);
        let Some(requested) = self
            .config
            .requested_mac
            .filter(|mac| Some(*mac) != assigned)
        else {
            return assigned.ok_or(Error::NoMacAddress);
        };
        if !requested.is_valid_unicast() {
            return Err(Error::InvalidConfig {
                reason: "requested_mac is not a unicast address",
            });
        }
        if self
            .hw
            .set_mac_address(self.host.as_mut(), limits, requested)?
        {
            return Ok(requested);
        }
        match assigned {
            Some(mac) => {
                log::warn!(
                    "{}: PF refused MAC {requested}; using the PF-assigned {mac}",
                    self.config.name
                );
                Ok(mac)
            }
            None => Err(Error::PfRefused {
                request: Request::SetMacAddress,
                reply: mailbox::SET_MAC_ADDR | mailbox::MSGTYPE_NACK,
            }),
        }
    }

    /// Disables both queues and waits (bounded) until the device reports them stopped, so no
    /// DMA is in flight afterwards. A queue that will not stop is reset with the whole VF.
    fn quiesce_queues(&mut self) {
        self.hw.disable_queues();
        let limits = self.config.limits(self.config.queue_timeout_ns);
        if let Err(error) = self.hw.wait_queues(self.host.as_mut(), limits, false) {
            log::error!(
                "{}: {error}; resetting the VF to stop DMA",
                self.config.name
            );
            self.hw.regs.write(regs::CTRL, regs::Control::RESET.bits());
        }
    }

    /// Sends a new multicast list to the PF (at most 30 addresses take effect).
    pub fn set_multicast_list(&mut self, addresses: &[MacAddress]) -> Result<(), Error> {
        if !matches!(self.state, State::Up | State::Down) {
            return Err(Error::NotReady {
                operation: "set_multicast_list",
            });
        }
        self.multicast = addresses.to_vec();
        let limits = self.config.limits(self.config.mailbox_timeout_ns);
        let result = self.hw.set_multicast(self.host.as_mut(), limits, addresses);
        self.after_control_request(result, Request::SetMulticast)
    }

    fn after_control_request(
        &mut self,
        result: Result<bool, Error>,
        request: Request,
    ) -> Result<(), Error> {
        let outcome = match result {
            Ok(true) => Ok(()),
            Ok(false) => Err(Error::PfRefused {
                request,
                reply: request.code() | mailbox::MSGTYPE_NACK,
            }),
            Err(error) => Err(error),
        };
        if let Err(error) = &outcome {
            if self.hw.regs.is_removed() {
                self.become_gone();
            } else if !self.hw.clear_to_send || matches!(error, Error::MailboxTimeout { .. }) {
                // The PF lost track of us or stopped answering: start over.
                log::warn!("{}: {error}; re-initialisation needed", self.config.name);
                self.state = State::Resetting;
            }
        }
        outcome
    }

    /// Routes RX/TX completions to MSI-X vector `rx_tx_vector_index` and PF mailbox messages
    /// to `mailbox_vector_index` (each 0..3), unmasking both with auto-clear. Takes effect now
    /// if running and is re-applied after every re-initialisation. Encoding of the mailbox
    /// vector follows [`Config::mailbox_vector_encoding`].
    pub fn configure_msix(
        &mut self,
        rx_tx_vector_index: u8,
        mailbox_vector_index: u8,
    ) -> Result<(), Error> {
        for index in [rx_tx_vector_index, mailbox_vector_index] {
            if index >= VF_VECTORS {
                return Err(Error::InvalidVector {
                    index,
                    reason: "a VF has MSI-X vectors 0..3",
                });
            }
        }
        let misc_entry = self
            .config
            .mailbox_vector_encoding
            .encode(mailbox_vector_index)?;
        let setup = MsixSetup {
            queue_vector: rx_tx_vector_index,
            misc_entry,
            mask: (1 << rx_tx_vector_index) | (1 << mailbox_vector_index),
        };
        self.msix = Some(setup);
        if matches!(self.state, State::Up | State::Down) {
            self.hw
                .program_interrupts(setup.queue_vector, setup.misc_entry, setup.mask);
            self.queue_interrupt_masked = false;
        }
        Ok(())
    }

    /// Gives the driver a way to learn that its mailbox vector fired (`take` returns true once
    /// per firing): the next `poll` then reads the mailbox and STATUS at once instead of when
    /// the register check period says (which stretches while frames arrive).
    pub fn set_mailbox_interrupt(&mut self, take: Box<dyn FnMut() -> bool>) {
        self.mailbox_interrupt = Some(take);
    }

    /// Interrupt work: reads (and so clears) VTEICR, then handles PF messages and TX
    /// completions. RX frames are handed over by [`NetDevice::receive`].
    pub fn handle_interrupt(&mut self) {
        self.stats.interrupts += 1;
        if matches!(self.state, State::Gone | State::Stopped) {
            return;
        }
        let causes = self.hw.regs.read(regs::VTEICR);
        log::trace!("{}: interrupt causes {causes:#x}", self.config.name);
        let Some(status) = self.check_alive() else {
            return;
        };
        self.service_mailbox();
        if matches!(self.state, State::Up | State::Down) {
            self.reclaim_tx();
            self.update_link(status);
        }
    }

    /// The VF's hardware counters as 64-bit totals since the driver was created (they survive
    /// wraps and re-initialisations; frozen once the device is gone).
    pub fn hardware_stats(&mut self) -> HardwareStats {
        if !matches!(self.state, State::Gone) && self.check_alive().is_some() {
            self.hardware_counters.accumulate(self.hw.read_counters());
        }
        self.hardware_counters.snapshot()
    }

    /// Driver event counters.
    pub fn driver_counters(&self) -> DriverCounters {
        let mut counters = self.counters;
        counters.mailbox = self.hw.mailbox_counters();
        counters.rx_bad_length = self.rx_drops.bad_length;
        counters.rx_frame_errors = self.rx_drops.frame_errors;
        counters.rx_multi_descriptor = self.rx_drops.multi_descriptor;
        counters.rx_unposted_written = self.rx_drops.unposted_written;
        counters.tx_context_descriptors = self.tx.contexts_written();
        counters.rx_checksum_verified = self.rx_checksums.verified;
        counters.rx_checksum_errors = self.rx_checksums.errors;
        counters
    }

    /// Reads STATUS; latches `Gone` when the device vanished.
    fn check_alive(&mut self) -> Option<Status> {
        let status = self.hw.regs.status();
        if status.is_none() {
            self.become_gone();
        }
        status
    }

    /// When the registers read at `read_ns` are next due (see
    /// [`Config::busy_register_check_period_ns`]).
    fn register_check_due_ns(&self, read_ns: u64) -> u64 {
        let period = self.config.register_check_period_ns;
        if period == 0 {
            return 0;
        }
        let busy_period = self.config.busy_register_check_period_ns.max(period);
        // A poll cycle under load can outlast the period: as long as the last receive call
        // found frames the VF counts as busy, whenever that was.
        let quiet_from = if self.receiving {
            u64::MAX
        } else {
            self.received_ns
                .map_or(0, |received| received.saturating_add(period))
        };
        read_ns
            .saturating_add(period)
            .max(quiet_from.min(read_ns.saturating_add(busy_period)))
    }

    fn become_gone(&mut self) {
        if self.state != State::Gone {
            self.counters.removals_detected += u64::from(self.hw.regs.is_removed());
            log::error!("{}: device gone", self.config.name);
        }
        self.hw.regs.mark_removed();
        self.state = State::Gone;
    }

    /// Writes RDT for the buffers `receive` refilled, if it has not been written since.
    ///
    /// `receive` only notes the new tail: the write waits for the next `flush` (the transmit
    /// doorbell), `arm_interrupts` or `receive`, whichever comes first. Under emulation each
    /// register access waits for QEMU's big lock, which its I/O thread holds while it
    /// receives a burst from the tap (often hundreds of microseconds); the doorbell written
    /// right after this usually finds the lock still free, so the pair waits about once. The
    /// ring keeps about half its buffers posted when it is refilled, so a poll's delay costs
    /// nothing. A queue being reset gets its ring afresh (`bring_up` drops the held tail).
    fn announce_rx_buffers(&mut self) {
        if !matches!(self.state, State::Up | State::Down) {
            return;
        }
        if let Some(tail) = self.rx_tail_pending.take() {
            self.hw.regs.write(regs::RDT, u32::from(tail));
        }
    }

    /// Masks the queue vector once the driver has data work: the caller polls until it runs
    /// out of work and calls [`NetDevice::arm_interrupts`], so each busy period costs two
    /// register writes instead of an interrupt (and its end-of-interrupt) per burst of frames.
    fn mask_queue_interrupt(&mut self) {
        if self.queue_interrupt_masked || self.state != State::Up {
            return;
        }
        if let Some(setup) = self.msix {
            self.hw.mask_causes(1 << setup.queue_vector);
            self.queue_interrupt_masked = true;
        }
    }

    fn service_mailbox(&mut self) {
        if self.state == State::Resetting {
            return;
        }
        // Bounded: each iteration consumes one PF message or stops.
        for _ in 0..4 {
            match self.hw.poll_mailbox() {
                MailboxEvent::Nothing | MailboxEvent::Busy => return,
                MailboxEvent::PfReset => {
                    self.counters.pf_resets += 1;
                    log::warn!("{}: PF reset; re-initialisation needed", self.config.name);
                    self.state = State::Resetting;
                    return;
                }
                MailboxEvent::NotClearToSend => {
                    self.counters.pf_not_clear_to_send += 1;
                    log::warn!(
                        "{}: PF no longer knows this VF; re-initialisation needed",
                        self.config.name
                    );
                    self.state = State::Resetting;
                    return;
                }
                MailboxEvent::Control { clear_to_send } => {
                    self.counters.pf_control_messages += 1;
                    log::info!(
                        "{}: PF control message (clear to send: {clear_to_send})",
                        self.config.name
                    );
                }
                MailboxEvent::Ignored(word) => {
                    log::debug!("{}: ignoring PF message {word:#010x}", self.config.name);
                }
            }
        }
    }

    /// Up when the PHY has link and the PF considers this VF clear to send (Linux
    /// `e1000_check_for_link_vf`).
    fn update_link(&mut self, status: Status) {
        if !matches!(self.state, State::Up | State::Down) {
            return;
        }
        let up = status.contains(Status::LINK_UP) && self.hw.clear_to_send;
        let next = if up { State::Up } else { State::Down };
        if next != self.state {
            self.counters.link_changes += 1;
            log::info!(
                "{}: link {}",
                self.config.name,
                if up { "up" } else { "down" }
            );
            self.state = next;
        }
    }

    fn count_offloads(&mut self, outcome: &TxOutcome, len: usize, meta: TxMeta) {
        let counters = &mut self.counters;
        counters.tx_checksum_offloaded += u64::from(outcome.checksum_offloaded);
        counters.tx_segmentation_offloaded += u64::from(outcome.segmented);
        counters.tx_checksum_software += u64::from(outcome.software_checksum);
        counters.tx_fin_segments += u64::from(outcome.fin_segment);
        counters.tx_refused += u64::from(outcome.refused);
        if let Some(bad) = outcome.bad_request {
            counters.tx_bad_offload_requests += 1;
            if counters.tx_bad_offload_requests.is_power_of_two() {
                log::warn!(
                    "{}: {bad} ({len}-byte frame, {meta:?}; {} so far){}",
                    self.config.name,
                    counters.tx_bad_offload_requests,
                    if outcome.refused { "; dropped" } else { "" }
                );
            }
        }
    }

    fn reclaim_tx(&mut self) -> bool {
        let done = self.tx.reclaim();
        self.stats.tx_frames += done.frames;
        self.stats.tx_bytes += done.bytes;
        done.frames > 0
    }

    /// TX hang detection: frames outstanding, link up and not paused, and no completion for
    /// longer than the configured bound.
    fn watch_tx(&mut self, progressed: bool, status: Status) {
        if self.tx.outstanding() == 0 || self.state != State::Up || status.contains(Status::TX_OFF)
        {
            self.tx_watch_since_ns = None;
            return;
        }
        let since = match self.tx_watch_since_ns {
            Some(since) if !progressed => since,
            _ => {
                self.tx_watch_since_ns = Some(self.now_ns);
                return;
            }
        };
        if self.now_ns.saturating_sub(since) > self.config.tx_hang_timeout_ns {
            self.counters.tx_hangs += 1;
            log::error!(
                "{}: TX hang: {} frames outstanding for {} ns; re-initialisation needed",
                self.config.name,
                self.tx.outstanding(),
                self.now_ns - since
            );
            self.tx_watch_since_ns = None;
            self.state = State::Resetting;
        }
    }
}

impl<R: RegisterIo, D: DmaAllocator> NetDevice for IgbVf<R, D> {
    fn name(&self) -> &str {
        &self.config.name
    }

    fn mac_address(&self) -> MacAddress {
        self.mac
    }

    fn capabilities(&self) -> Capabilities {
        let limits = &self.tx_limits;
        Capabilities {
            mtu: self.config.mtu,
            tx_checksum: self.config.offloads,
            // Reported per frame from the write-back status; the PF enables it (RXCSUM
            // IPOFLD/TUOFLD are on after reset and a Linux PF or the lab PF keeps them on).
            rx_checksum: true,
            max_tso_size: if limits.segmentation_frame > 0 {
                (limits.segmentation_frame - ETHERNET_HEADER - VLAN_TAG).min(MAX_IP_PACKET)
            } else {
                0
            },
        }
    }

    fn link_state(&self) -> LinkState {
        match self.state {
            State::Up => LinkState::Up,
            State::Down | State::Stopped => LinkState::Down,
            State::Resetting => LinkState::Resetting,
            State::Gone => LinkState::Gone,
        }
    }

    fn poll(&mut self, now_ns: u64) {
        self.now_ns = now_ns;
        if matches!(self.state, State::Gone | State::Stopped) {
            return;
        }
        if self.mailbox_interrupt.as_mut().is_some_and(|take| take()) {
            // A PF message: read the mailbox now, whatever the period says.
            self.registers_read_ns = None;
        }
        if self.state == State::Up
            && self
                .registers_read_ns
                .is_some_and(|read| self.register_check_due_ns(read) > now_ns)
        {
            // Descriptor write-backs are memory, not registers: completions stay per poll.
            self.reclaim_tx();
            self.register_check_deferred = true;
            return;
        }
        self.registers_read_ns = Some(now_ns);
        self.register_check_deferred = false;
        let Some(status) = self.check_alive() else {
            return;
        };
        self.service_mailbox();
        if self.state == State::Resetting {
            self.reinitialize_when_due(now_ns);
            return;
        }
        // Counter registers are VM exits under emulation: fold them in every 100 ms only.
        if now_ns.saturating_sub(self.counters_read_ns) >= HARDWARE_COUNTER_PERIOD_NS {
            self.counters_read_ns = now_ns;
            self.hardware_counters.accumulate(self.hw.read_counters());
        }
        if matches!(self.state, State::Up | State::Down) {
            let progressed = self.reclaim_tx();
            self.update_link(status);
            self.watch_tx(progressed, status);
        }
    }

    fn receive(&mut self, budget: usize, sink: &mut dyn FnMut(&[u8], RxMeta)) -> usize {
        if !matches!(self.state, State::Up | State::Down) {
            return 0;
        }
        // Buffers refilled by the last call that no flush carried go now: never later than
        // one poll.
        self.announce_rx_buffers();
        let drops_before = self.rx_drops.total();
        let (frames, bytes) =
            self.rx
                .receive(budget, &mut self.rx_drops, &mut self.rx_checksums, sink);
        if let Some(tail) = self.rx.refill(&mut self.rx_drops) {
            self.rx_tail_pending = Some(tail);
        }
        self.receiving = frames > 0;
        if frames > 0 {
            self.received_ns = Some(self.now_ns);
            self.mask_queue_interrupt();
        }
        self.stats.rx_frames += frames as u64;
        self.stats.rx_bytes += bytes;
        self.stats.rx_dropped_bad += self.rx_drops.total() - drops_before;
        frames
    }

    fn can_transmit(&self) -> bool {
        self.state == State::Up && self.tx.free_slots() >= self.tx_limits.ready_slots
    }

    fn transmit(
        &mut self,
        len: usize,
        fill: &mut dyn FnMut(&mut [u8]) -> TxMeta,
    ) -> Result<(), DeviceError> {
        match self.state {
            State::Up => {}
            State::Gone => return Err(DeviceError::Gone),
            State::Down | State::Resetting | State::Stopped => return Err(DeviceError::NotReady),
        }
        let limits = self.tx_limits;
        let accepted = limits.max_frame.max(limits.segmentation_frame);
        if len > accepted {
            return Err(DeviceError::FrameTooLarge { len, max: accepted });
        }
        // Room for the worst case before the frame is written (the stack cannot take it back
        // afterwards): a frame above the MTU can only be TSO, which adds a context descriptor
        // and possibly a FIN segment; one within it needs one slot per chunk, and a context
        // descriptor only if a slot is left (else its checksum is completed in software).
        let data_chunks = len.max(MIN_FRAME_LEN).div_ceil(limits.chunk);
        let reserve = if len > limits.max_frame {
            data_chunks + 2
        } else {
            data_chunks
        };
        if usize::from(self.tx.free_slots()) < reserve {
            self.reclaim_tx();
        }
        if usize::from(self.tx.free_slots()) < reserve {
            self.stats.tx_ring_full += 1;
            return Err(DeviceError::RingFull);
        }
        let environment = TxEnvironment {
            chunk: limits.chunk,
            max_frame: limits.max_frame,
            offloads: self.config.offloads,
            free_slots: usize::from(self.tx.free_slots()),
            loaded_contexts: self.tx.loaded_contexts(),
        };
        // The frame's chunks plus one for a FIN segment, but only chunks of free slots: the
        // device may be reading the others.
        let area_chunks = (data_chunks + 1).min(usize::from(self.tx.free_slots()));
        let Some(area) = self.tx.area(area_chunks * limits.chunk) else {
            // The tail is sized for the largest frame taken; not reached.
            log::error!("{}: no buffer for a {len}-byte frame", self.config.name);
            return Err(DeviceError::FrameTooLarge {
                len,
                max: limits.max_frame,
            });
        };
        // Short frames are zero-padded to the Ethernet minimum (QEMU does not pad, reference
        // §3.2); the padding is written before `fill` so the frame bytes are its own.
        area[len..len.max(MIN_FRAME_LEN)].fill(0);
        let meta = fill(&mut area[..len]);
        let prepared = offload::prepare_transmit(area, len, meta, &environment);
        self.count_offloads(&prepared.outcome, len, meta);
        if prepared.outcome.refused {
            // Nothing was queued. A frame within the MTU is dropped (its checksum cannot be
            // right); one above it is refused like any oversized frame.
            return if len > limits.max_frame {
                Err(DeviceError::FrameTooLarge {
                    len,
                    max: limits.max_frame,
                })
            } else {
                Ok(())
            };
        }
        if self.tx.commit(
            &prepared.packets,
            prepared.device_packets,
            prepared.device_bytes,
        ) {
            Ok(())
        } else {
            // `prepare_transmit` sized everything to the free slots; not reached.
            log::error!(
                "{}: a {len}-byte frame did not fit the ring",
                self.config.name
            );
            self.stats.tx_ring_full += 1;
            Err(DeviceError::RingFull)
        }
    }

    fn flush(&mut self) {
        if self.state == State::Gone {
            return;
        }
        // Refilled buffers first, so they are there for the burst the peer sends in answer.
        self.announce_rx_buffers();
        if let Some(tail) = self.tx.take_doorbell() {
            self.hw.regs.write(regs::TDT, u32::from(tail));
            self.mask_queue_interrupt();
        }
    }

    fn arm_interrupts(&mut self) -> bool {
        if !matches!(self.state, State::Up | State::Down) {
            return false;
        }
        // The loop is about to sleep: no buffer may stay unannounced.
        self.announce_rx_buffers();
        if !self.queue_interrupt_masked {
            return false;
        }
        let Some(setup) = self.msix else {
            return false;
        };
        self.hw.unmask_causes(1 << setup.queue_vector);
        self.queue_interrupt_masked = false;
        self.counters.interrupt_rearms += 1;
        // A write-back that landed after the caller's last poll but before the latched cause
        // was cleared raised no interrupt: look once more.
        self.rx.has_write_back() || self.tx.has_completion()
    }

    fn next_poll_ns(&self) -> Option<u64> {
        // A deferred check is due by the clock, not by an interrupt (a sleep would otherwise
        // last until the next frame or the caller's watchdog).
        self.registers_read_ns
            .filter(|_| self.register_check_deferred && self.state == State::Up)
            .map(|read| self.register_check_due_ns(read))
    }

    fn stats(&self) -> Stats {
        let hardware = self.hardware_counters.snapshot();
        Stats {
            hardware_rx_frames: hardware.rx_packets,
            hardware_tx_frames: hardware.tx_packets,
            ..self.stats
        }
    }

    fn stop(&mut self) {
        if matches!(self.state, State::Gone | State::Stopped) {
            return;
        }
        if !self.hw.regs.is_removed() {
            self.hardware_counters.accumulate(self.hw.read_counters());
        }
        self.hw.mask_interrupts();
        self.quiesce_queues();
        self.reclaim_tx();
        if self.hw.regs.is_removed() {
            self.become_gone();
        } else {
            self.hardware_counters.accumulate(self.hw.read_counters());
            self.state = State::Stopped;
            log::info!("{}: stopped", self.config.name);
        }
    }

    fn mark_gone(&mut self) {
        self.become_gone();
    }
}

impl<R: RegisterIo, D: DmaAllocator> Drop for IgbVf<R, D> {
    /// The rings are freed with the driver, so the device must not DMA into them afterwards.
    fn drop(&mut self) {
        if !matches!(self.state, State::Gone | State::Stopped) {
            self.stop();
        }
    }
}
