//! The failover bond: one logical link over the synthetic NIC and an optional SR-IOV VF.
//!
//! A sans-IO state machine: every entry point takes the current time, nothing reads a clock.
//!
//! * The **synthetic** path is always present and is the identity: its MAC is the interface MAC.
//! * The **VF** path can be attached and detached at runtime. It is *eligible* while its MAC
//!   equals the synthetic MAC (pairing by permanent MAC, as Linux `failover` does) and its MTU is
//!   at least the interface MTU (smoltcp fixes the MTU when the interface is created).
//! * **Transmit** goes only to the active path: the VF when it is eligible, `Up` and past its
//!   hold-down, else the synthetic path. With no usable path, smoltcp is held back (it keeps
//!   its data); frames that cannot wait (announcements, immediate replies) are dropped and
//!   counted.
//! * **Offloads** follow the active path frame by frame: its NIC completes TCP/UDP checksums
//!   and segments smoltcp's large TCP frames when it offers that; otherwise the bond computes
//!   the checksums and cuts the frames itself (the `segmentation` module), holding the remaining
//!   segments (and back-pressuring smoltcp) while the ring is full.
//! * **Receive** is accepted from both paths (the host may steer some traffic to either path at
//!   any time, see failover-lessons §8.2), through a duplicate window (`dedup`) so a frame
//!   arriving on both never reaches the stack twice. Behind the window, consecutive TCP
//!   segments of a flow received in one batch are merged into one frame (`coalesce`); the
//!   batch is flushed at the end of every [`Bond::poll`].
//! * When the VF goes away (link down, resetting, gone, detached, MAC change) the bond switches
//!   to the synthetic path at once. When the VF comes back `Up`, it must stay up for the hold-down
//!   time (doubled on every flap, up to a maximum) before traffic moves back. If the synthetic
//!   link is down, a usable VF is taken at once: a flapping VF beats no link at all.
//! * After every switch (and when the active link comes back up) an announcement is requested:
//!   the stack then sends a gratuitous ARP / unsolicited neighbour advertisement per address out
//!   of the new path so that switches re-learn where the MAC lives.
//! * Counters stay monotonic across VF detach: a departing VF's counters are added to a
//!   "retired" total.
//! * **Hyper-V data path.** Where the synthetic NIC reports a host data path
//!   ([`NetDevice::host_data_path`], netvsc once the host associated a VF), the host steers
//!   traffic too: when the hold-down
//!   passes, the bond asks the host for the VF (SWITCH_DATA_PATH) and moves transmit only once
//!   the host confirmed it; whenever it leaves the VF it asks the host back. The host moving
//!   the path back on its own (VF withdrawn, host switch) is a VF loss like a link down: same
//!   switch event, announcement, counters and doubled hold-down.

use alloc::boxed::Box;
use alloc::collections::VecDeque;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::fmt;

use net_device::{DeviceError, HostPath, LinkState, MacAddress, NetDevice, Stats, TxMeta};

use crate::Error;
use crate::checksum;
use crate::coalesce::{CoalesceStats, Coalescer, Delivery, MAX_COALESCED_FRAME};
use crate::dedup::{DedupWindow, Verdict, frame_key};
use crate::segmentation::{MAX_SEGMENTATION_FRAME, TcpLayout};

const NS_PER_US: u64 = 1_000;
const NS_PER_MS: u64 = 1_000_000;

/// Ethernet header length (destination, source, ethertype).
pub const ETHERNET_HEADER_LEN: usize = 14;
/// Allowance for one 802.1Q tag on received frames.
const VLAN_TAG_LEN: usize = 4;
/// Frame buffers kept for reuse by the receive queue.
const MAX_POOLED_BUFFERS: usize = 256;
/// Largest buffer kept in the pool of frame-sized buffers: room for a jumbo frame.
const MAX_POOLED_BUFFER_CAPACITY: usize = 9216 + 22;
/// 64 KiB buffers (coalesced frames) kept for reuse: one per flow a batch holds, a few more
/// for frames smoltcp has not consumed yet.
const MAX_POOLED_LARGE_BUFFERS: usize = 4;

/// Tuning of the bond. All times in nanoseconds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BondConfig {
    /// How long a returning VF must stay `Up` before traffic moves back to it.
    pub hold_down_ns: u64,
    /// Upper bound of the hold-down after repeated flaps.
    pub max_hold_down_ns: u64,
    /// A VF that stayed up at least this long before going away was stable: the hold-down goes
    /// back to `hold_down_ns`. Shorter up-times count as flaps and double it.
    pub stable_ns: u64,
    /// How long a delivered frame is remembered for duplicate suppression. Long enough for
    /// the copy on the other path to arrive even when an emulated host delivers the two NICs'
    /// rings tens of milliseconds apart; only a frame seen on the *other* path is dropped, so
    /// a retransmission on the same path is never mistaken for a duplicate.
    pub dedup_window_ns: u64,
    /// Slots of the duplicate-suppression table.
    pub dedup_slots: usize,
    /// Received frames buffered between the devices and the stack.
    pub rx_queue_frames: usize,
    /// Bytes buffered between the devices and the stack: while more are queued the devices are
    /// not read (their rings hold further frames). One device read can add a ring's worth.
    pub rx_queue_bytes: usize,
    /// Frames taken from each device per [`Bond::poll`]. One poll's frames are one receive
    /// batch: coalesced together and acknowledged by one ACK per flow, so the budget sets the
    /// ACK rate of a bulk receiver. Each ACK is a transmit doorbell, under QEMU a register
    /// write that waits for the device model's lock and runs the host's TCP inside it: 256
    /// (one ACK per ~350 KB of one stream) received a VF stream 8–30 % faster than 128. A
    /// batch of 256 MTU frames is well under a millisecond of work before the ACKs go out.
    pub rx_budget: usize,
    /// Devices are polled at least this often even without interrupts, so a silently removed
    /// device is noticed.
    pub watchdog_ns: u64,
    /// Merge consecutive TCP segments of a flow received in one batch (see `coalesce`).
    pub rx_coalescing: bool,
}

impl Default for BondConfig {
    fn default() -> Self {
        BondConfig {
            hold_down_ns: 50 * NS_PER_MS,
            max_hold_down_ns: 10_000 * NS_PER_MS,
            stable_ns: 1_000 * NS_PER_MS,
            dedup_window_ns: 50 * NS_PER_MS,
            dedup_slots: 16384,
            rx_queue_frames: 512,
            rx_queue_bytes: 1024 * 1024,
            rx_budget: 256,
            watchdog_ns: 100 * NS_PER_MS,
            rx_coalescing: true,
        }
    }
}

/// Which path.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
pub enum PathId {
    /// The paravirtual NIC (virtio-net, netvsc): always present, owns the MAC.
    Synthetic,
    /// The SR-IOV virtual function.
    Vf,
}

impl fmt::Display for PathId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PathId::Synthetic => "synthetic",
            PathId::Vf => "vf",
        })
    }
}

/// What the bond itself counted on one path (the driver keeps its own [`Stats`]).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct PathCounters {
    /// Frames handed to the stack from this path.
    pub rx_frames: u64,
    /// Bytes of those frames.
    pub rx_bytes: u64,
    /// Frames queued for transmission on this path.
    pub tx_frames: u64,
    /// Bytes of those frames.
    pub tx_bytes: u64,
    /// Transmissions the device refused (ring full after all, not ready, gone, too large).
    pub tx_errors: u64,
    /// Large TCP frames handed to the NIC to segment (TSO).
    pub tx_offloaded_segmentation: u64,
    /// Large TCP frames the bond segmented in software (the NIC has no TSO).
    pub tx_software_segmentation: u64,
    /// Frames dropped because the other path already delivered them.
    pub rx_duplicates: u64,
    /// Frames dropped as malformed (too short, too long) or looped back (our own source MAC).
    pub rx_bad: u64,
    /// Frames dropped because the stack's receive queue was full (driver exceeded its budget).
    pub rx_queue_full: u64,
    /// Frames from a VF that is attached but not eligible (foreign MAC, MTU too small).
    pub rx_ignored: u64,
}

impl PathCounters {
    fn add(&mut self, other: &PathCounters) {
        self.rx_frames += other.rx_frames;
        self.rx_bytes += other.rx_bytes;
        self.tx_frames += other.tx_frames;
        self.tx_bytes += other.tx_bytes;
        self.tx_errors += other.tx_errors;
        self.tx_offloaded_segmentation += other.tx_offloaded_segmentation;
        self.tx_software_segmentation += other.tx_software_segmentation;
        self.rx_duplicates += other.rx_duplicates;
        self.rx_bad += other.rx_bad;
        self.rx_queue_full += other.rx_queue_full;
        self.rx_ignored += other.rx_ignored;
    }
}

/// Bond counters plus the driver's own counters for one path.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct PathStats {
    /// Counted by the bond.
    pub bond: PathCounters,
    /// Counted by the driver.
    pub device: Stats,
}

impl PathStats {
    fn add(&mut self, other: &PathStats) {
        self.bond.add(&other.bond);
        let (d, o) = (&mut self.device, &other.device);
        d.rx_frames += o.rx_frames;
        d.rx_bytes += o.rx_bytes;
        d.tx_frames += o.tx_frames;
        d.tx_bytes += o.tx_bytes;
        d.rx_dropped_bad += o.rx_dropped_bad;
        d.tx_ring_full += o.tx_ring_full;
        d.interrupts += o.interrupts;
        d.hardware_rx_frames += o.hardware_rx_frames;
        d.hardware_tx_frames += o.hardware_tx_frames;
    }
}

/// A snapshot of the bond's counters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BondStats {
    /// The path transmit currently uses.
    pub active: PathId,
    /// The synthetic path.
    pub synthetic: PathStats,
    /// The attached VF, if any.
    pub vf: Option<PathStats>,
    /// Sum over VFs that were detached.
    pub vf_retired: PathStats,
    /// synthetic + vf + vf_retired: monotonic across VF detach.
    pub total: PathStats,
    /// Switches from synthetic to VF.
    pub switches_to_vf: u64,
    /// Switches from VF to synthetic.
    pub switches_to_synthetic: u64,
    /// Frames dropped as duplicates (all paths).
    pub duplicates_dropped: u64,
    /// Frames dropped as malformed (all paths).
    pub bad_frames_dropped: u64,
    /// Frames dropped because no path was up (announcements, immediate replies).
    pub tx_dropped_no_path: u64,
    /// Transmit attempts smoltcp was refused because no path was up (it keeps the data).
    pub tx_blocked_no_path: u64,
    /// Announcements requested (each results in one frame per address).
    pub announcements_requested: u64,
    /// Duplicate-window entries evicted early (a duplicate may have got through).
    pub dedup_evictions: u64,
    /// VFs attached so far.
    pub vf_attaches: u64,
    /// VFs detached so far.
    pub vf_detaches: u64,
    /// Current hold-down for a returning VF, in nanoseconds.
    pub hold_down_ns: u64,
    /// Receive coalescing: segments merged, merged frames, why merges were refused.
    pub coalesce: CoalesceStats,
    /// Where the host steers traffic (Hyper-V data path); `None` where there is no such host
    /// switch (KVM).
    pub host_data_path: Option<HostPath>,
    /// Data-path switch requests the bond made to the host (both directions).
    pub host_switch_requests: u64,
    /// Where receiving spent its time (zeros unless polled through [`Bond::poll_timed`]).
    pub receive_timings: ReceiveTimings,
}

/// Where the bond's part of receiving spends its time, on the clock the stack lends
/// [`Bond::poll_timed`] (monotonic sums, nanoseconds).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReceiveTimings {
    /// Device housekeeping (`NetDevice::poll`: register reads, transmit reclaim, mailbox) and
    /// path evaluation, before any frame is taken.
    pub housekeeping_ns: u64,
    /// Inside the drivers' `receive`, the bond's per-frame work left out: descriptors, buffer
    /// recycling, the doorbell.
    pub driver_ns: u64,
    /// The bond's per-frame checks (length, looped MAC, checksum) and the duplicate window.
    pub checks_ns: u64,
    /// Receive coalescing (or, with it off, the copy into the receive queue) and the flush at
    /// the end of the batch.
    pub coalesce_ns: u64,
}

/// One frame in this many is timed stage by stage (and counts this many times): two clock
/// reads per frame would be a cost of its own under an emulated CPU.
const TIMED_FRAME_INTERVAL: u64 = 8;

/// Why the bond switched.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SwitchCause {
    /// The VF reported `Down`.
    VfLinkDown,
    /// The VF reported `Resetting`.
    VfResetting,
    /// The VF reported `Gone`.
    VfGone,
    /// The VF was detached.
    VfDetached,
    /// The VF's MAC changed away from the synthetic MAC.
    VfMacChanged(MacAddress),
    /// The VF's MTU dropped below the interface MTU.
    VfMtuTooSmall(usize),
    /// The VF stayed up through its hold-down.
    HoldDownPassed {
        /// How long it had been up, in nanoseconds.
        up_ns: u64,
        /// The hold-down that applied, in nanoseconds.
        hold_down_ns: u64,
    },
    /// The synthetic link is down and the VF is usable: taken without hold-down.
    SyntheticDown,
    /// The host moved the data path back to synthetic (VF withdrawn or host switch).
    HostSwitchedToSynthetic,
}

impl fmt::Display for SwitchCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SwitchCause::VfLinkDown => write!(f, "link down"),
            SwitchCause::VfResetting => write!(f, "resetting"),
            SwitchCause::VfGone => write!(f, "device gone"),
            SwitchCause::VfDetached => write!(f, "detached"),
            SwitchCause::VfMacChanged(mac) => write!(f, "vf mac changed to {mac}"),
            SwitchCause::VfMtuTooSmall(mtu) => write!(f, "vf mtu {mtu} below interface mtu"),
            SwitchCause::HoldDownPassed {
                up_ns,
                hold_down_ns,
            } => write!(
                f,
                "vf up for {} ms, hold-down {} ms",
                up_ns / NS_PER_MS,
                hold_down_ns / NS_PER_MS
            ),
            SwitchCause::SyntheticDown => write!(f, "synthetic link down, vf up"),
            SwitchCause::HostSwitchedToSynthetic => {
                write!(f, "host moved the data path to synthetic")
            }
        }
    }
}

/// One switch, as recorded for logs and tests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SwitchEvent {
    /// Path before.
    pub from: PathId,
    /// Path after.
    pub to: PathId,
    /// Why.
    pub cause: SwitchCause,
    /// When (the `now_ns` of the call that switched).
    pub at_ns: u64,
    /// Reaction time: for a lost VF, time since it was last seen healthy (an upper bound of the
    /// window in which frames went to a dead path); for a return, time since the hold-down
    /// expired.
    pub reaction_ns: u64,
}

/// A VF that [`Bond::attach_vf`] refused, handed back to the caller.
pub struct AttachRejected {
    /// Why.
    pub error: Error,
    /// The device, untouched.
    pub device: Box<dyn NetDevice>,
}

impl fmt::Debug for AttachRejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AttachRejected")
            .field("error", &self.error)
            .field("device", &self.device.name())
            .finish()
    }
}

/// Why an attached VF is not used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ineligible {
    MacMismatch(MacAddress),
    MtuTooSmall(usize),
}

pub(crate) struct Path {
    pub(crate) device: Box<dyn NetDevice>,
    pub(crate) counters: PathCounters,
    /// Frames were queued since the last flush.
    dirty: bool,
    /// Link state seen at the previous evaluation (for change logs).
    last_link: LinkState,
}

impl Path {
    fn new(device: Box<dyn NetDevice>) -> Path {
        let last_link = device.link_state();
        Path {
            device,
            counters: PathCounters::default(),
            dirty: false,
            last_link,
        }
    }

    /// Counts a refused transmission; logged at 1, 2, 4, 8... failures.
    fn count_transmit_error(&mut self, what: fmt::Arguments<'_>) {
        self.counters.tx_errors += 1;
        if self.counters.tx_errors.is_power_of_two() {
            log::warn!(
                "bond: {}: {what} ({} failures so far)",
                self.device.name(),
                self.counters.tx_errors
            );
        }
    }

    fn flush(&mut self) {
        if self.dirty {
            self.dirty = false;
            self.device.flush();
        }
    }
}

pub(crate) struct VfPath {
    pub(crate) path: Path,
    ineligible: Option<Ineligible>,
}

/// Can the active path take a frame right now?
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TxReadiness {
    /// Link up and a ring slot free.
    Ready,
    /// Link up but the ring is full: back-pressure, try after the next device poll.
    Busy,
    /// No path is up: frames are dropped (and counted) so the stack does not spin.
    NoPath,
}

/// The transmit side: both paths and which one is active. Split from the receive queue so a
/// smoltcp receive token (owning a frame) and transmit token (borrowing this) can coexist.
pub(crate) struct Paths {
    pub(crate) synthetic: Path,
    pub(crate) vf: Option<VfPath>,
    pub(crate) active: PathId,
    /// Where frames go when no path can take them; also stands in for a device buffer of the
    /// wrong size.
    scratch: Vec<u8>,
    /// A large frame waiting to be segmented in software.
    segmentation: PendingSegments,
    pub(crate) tx_dropped_no_path: u64,
    pub(crate) tx_blocked_no_path: u64,
}

impl Paths {
    fn active_path_mut(&mut self) -> &mut Path {
        match (self.active, self.vf.as_mut()) {
            (PathId::Vf, Some(vf)) => &mut vf.path,
            _ => &mut self.synthetic,
        }
    }

    fn active_path(&self) -> &Path {
        match (self.active, self.vf.as_ref()) {
            (PathId::Vf, Some(vf)) => &vf.path,
            _ => &self.synthetic,
        }
    }

    pub(crate) fn readiness(&self) -> TxReadiness {
        let device = &self.active_path().device;
        if device.link_state() != LinkState::Up {
            TxReadiness::NoPath
        } else if self.segmentation.layout.is_none() && device.can_transmit() {
            TxReadiness::Ready
        } else {
            TxReadiness::Busy
        }
    }

    /// True while segments of a large frame wait for ring space.
    pub(crate) fn has_pending_segments(&self) -> bool {
        self.segmentation.layout.is_some()
    }

    /// Sends one `len`-byte frame that `fill` writes, on the active path. Always runs `fill`
    /// exactly once (smoltcp needs its result); when the frame cannot be sent it is written to a
    /// scratch buffer and counted as dropped. With `segment_size` (smoltcp's segmentation
    /// offload request) the frame is a TCP frame to be cut into segments of that many payload
    /// bytes: by the NIC when it can, else in software.
    pub(crate) fn transmit_with<R>(
        &mut self,
        len: usize,
        segment_size: Option<u16>,
        fill: impl FnOnce(&mut [u8]) -> R,
    ) -> R {
        let mss = segment_size.filter(|&mss| mss > 0);
        let path = self.active_path();
        let capabilities = path.device.capabilities();
        if let Some(mss) = mss
            && path.device.link_state() == LinkState::Up
            && !(capabilities.tx_checksum && capabilities.max_tso_size + ETHERNET_HEADER_LEN >= len)
        {
            return self.segment_in_software(len, usize::from(mss), fill);
        }
        let Paths {
            synthetic,
            vf,
            active,
            scratch,
            tx_dropped_no_path,
            ..
        } = self;
        let path = match (*active, vf.as_mut()) {
            (PathId::Vf, Some(vf)) => &mut vf.path,
            _ => synthetic,
        };
        if path.device.link_state() != LinkState::Up {
            *tx_dropped_no_path += 1;
            if tx_dropped_no_path.is_power_of_two() {
                log::warn!(
                    "bond: no usable path, {} frames dropped so far",
                    *tx_dropped_no_path
                );
            }
            return run_on_scratch(scratch, len, fill);
        }

        let offload = capabilities.tx_checksum;
        let mut fill = Some(fill);
        let mut output = None;
        let mut wrong_length = None;
        let result = path.device.transmit(len, &mut |buffer: &mut [u8]| {
            let Some(fill) = fill.take() else {
                return TxMeta::default();
            };
            if buffer.len() == len {
                output = Some(fill(buffer));
            } else {
                // A driver bug: never let smoltcp write past (or short of) what it asked for.
                wrong_length = Some(buffer.len());
                scratch.clear();
                scratch.resize(len, 0);
                output = Some(fill(&mut scratch[..]));
                let copy = buffer.len().min(len);
                buffer[..copy].copy_from_slice(&scratch[..copy]);
            }
            finish_frame(buffer, offload, mss)
        });
        if let Some(got) = wrong_length {
            log::warn!(
                "bond: {} gave a {got}-byte buffer for a {len}-byte frame",
                path.device.name()
            );
        }
        if let (Err(DeviceError::RingFull), Some(mss)) = (&result, mss)
            && let Some(fill) = fill.take()
        {
            // No room for the whole large frame after all (a ring's "room" is judged before the
            // frame's size is known): cut it up and send the segments as room appears, instead
            // of losing it to a TCP retransmission.
            return self.segment_in_software(len, usize::from(mss), fill);
        }
        match result {
            Ok(()) if wrong_length.is_none() && output.is_some() => {
                path.counters.tx_frames += 1;
                path.counters.tx_bytes += len as u64;
                if mss.is_some() {
                    path.counters.tx_offloaded_segmentation += 1;
                }
                path.dirty = true;
            }
            Ok(()) => {
                path.counters.tx_errors += 1;
                path.dirty = true;
            }
            Err(error) => {
                path.count_transmit_error(format_args!("transmit failed: {error}"));
                if let DeviceError::FrameTooLarge { .. } = error {
                    // Cannot happen with a consistent MTU; worth a louder note.
                    log::error!(
                        "bond: frame of {len} bytes too large for {}",
                        path.device.name()
                    );
                }
            }
        }
        match (output, fill) {
            (Some(output), _) => output,
            (None, Some(fill)) => run_on_scratch(scratch, len, fill),
            // `fill` is only taken inside the callback, which then always stores `output`.
            (None, None) => unreachable!("transmit callback took the fill closure without output"),
        }
    }

    /// Takes a large TCP frame for software segmentation and sends as many segments as the
    /// active ring takes; [`Paths::send_pending_segments`] sends the rest later.
    fn segment_in_software<R>(
        &mut self,
        len: usize,
        mss: usize,
        fill: impl FnOnce(&mut [u8]) -> R,
    ) -> R {
        if self.segmentation.layout.is_some() {
            // Only a reply token (handed out with a received frame, bypassing readiness) can
            // get here while segments wait; smoltcp never asks to segment those, so this is a
            // bug elsewhere. TCP retransmits what is dropped.
            self.active_path_mut().counters.tx_errors += 1;
            log::error!("bond: a large frame arrived while another was being segmented");
        }
        let pending = &mut self.segmentation;
        pending.frame.clear();
        pending.frame.resize(len, 0);
        let output = fill(&mut pending.frame);
        match TcpLayout::parse(&pending.frame) {
            Some(layout) => {
                pending.layout = Some(layout);
                pending.mss = mss;
                pending.offset = 0;
                pending.index = 0;
                self.active_path_mut().counters.tx_software_segmentation += 1;
                self.send_pending_segments();
            }
            None => {
                let path = self.active_path_mut();
                path.counters.tx_errors += 1;
                log::error!(
                    "bond: a {len}-byte frame asked for segmentation but is not TCP; dropped"
                );
            }
        }
        output
    }

    /// Sends waiting segments until the active ring is full. Returns true when any went out.
    pub(crate) fn send_pending_segments(&mut self) -> bool {
        let Paths {
            synthetic,
            vf,
            active,
            segmentation,
            ..
        } = self;
        let Some(layout) = segmentation.layout else {
            return false;
        };
        let path = match (*active, vf.as_mut()) {
            (PathId::Vf, Some(vf)) => &mut vf.path,
            _ => synthetic,
        };
        if path.device.link_state() != LinkState::Up {
            // Kept for the path that comes up next (or dropped by the next large frame).
            return false;
        }
        let offload = path.device.capabilities().tx_checksum;
        let mut sent_any = false;
        while !layout.is_done(segmentation.offset) {
            let (offset, index) = (segmentation.offset, segmentation.index);
            let segment_len = layout.segment_len(offset, segmentation.mss);
            let frame = &segmentation.frame;
            let mut wrong_length = false;
            let result = path.device.transmit(segment_len, &mut |buffer: &mut [u8]| {
                if buffer.len() != segment_len {
                    wrong_length = true;
                    buffer.fill(0);
                    return TxMeta::default();
                }
                layout.write_segment(frame, offset, index, buffer);
                finish_frame(buffer, offload, None)
            });
            match result {
                Ok(()) if !wrong_length => {
                    path.counters.tx_frames += 1;
                    path.counters.tx_bytes += segment_len as u64;
                    path.dirty = true;
                    sent_any = true;
                    segmentation.offset += segment_len - layout.headers_len();
                    segmentation.index = index.wrapping_add(1);
                }
                Err(DeviceError::RingFull) => return sent_any,
                Ok(()) | Err(_) => {
                    path.dirty |= wrong_length;
                    path.count_transmit_error(format_args!(
                        "a {segment_len}-byte segment was refused"
                    ));
                    // TCP retransmits the rest.
                    break;
                }
            }
        }
        segmentation.layout = None;
        sent_any
    }
}

/// Completes an outgoing frame's checksums: left to the NIC when it offers that (TCP/UDP),
/// else in software. Returns what to ask of the NIC.
fn finish_frame(frame: &mut [u8], offload: bool, mss: Option<u16>) -> TxMeta {
    if offload && let Some(location) = checksum::prepare_offload(frame) {
        return TxMeta {
            checksum: Some(location),
            tso_mss: mss,
        };
    }
    checksum::fill(frame);
    TxMeta::default()
}

/// A large TCP frame being cut into segments in software.
struct PendingSegments {
    /// The whole frame as smoltcp wrote it.
    frame: Vec<u8>,
    /// Its layout; `None` when nothing is pending.
    layout: Option<TcpLayout>,
    /// Payload bytes per segment.
    mss: usize,
    /// Payload offset of the next segment to send.
    offset: usize,
    /// Number of the next segment (IPv4 identification offset).
    index: u16,
}

fn run_on_scratch<R>(scratch: &mut Vec<u8>, len: usize, fill: impl FnOnce(&mut [u8]) -> R) -> R {
    scratch.clear();
    scratch.resize(len, 0);
    fill(&mut scratch[..])
}

/// Frames received from the devices, waiting for the stack.
pub(crate) struct RxQueue {
    frames: VecDeque<Vec<u8>>,
    /// Bytes in `frames`: bounded too, since a coalesced TCP frame can be 64 KiB.
    bytes: usize,
    pub(crate) free: BufferPool,
}

/// Frame buffers kept for reuse: allocating one per received frame is a cost per frame.
#[derive(Default)]
pub(crate) struct BufferPool {
    /// Buffers for frames up to a jumbo frame.
    small: Vec<Vec<u8>>,
    /// Buffers for coalesced frames (64 KiB).
    large: Vec<Vec<u8>>,
}

impl BufferPool {
    /// An empty buffer that holds `len` bytes without growing.
    fn take(&mut self, len: usize) -> Vec<u8> {
        if len <= MAX_POOLED_BUFFER_CAPACITY {
            self.small.pop().unwrap_or_default()
        } else {
            self.large.pop().unwrap_or_else(|| Vec::with_capacity(len))
        }
    }

    /// An empty 64 KiB buffer for a merged frame; `None` when the heap cannot spare one (a
    /// 32 MiB guest with many large socket buffers runs close to its limit).
    fn take_large(&mut self) -> Option<Vec<u8>> {
        if let Some(buffer) = self.large.pop() {
            return Some(buffer);
        }
        let mut buffer = Vec::new();
        buffer.try_reserve_exact(MAX_COALESCED_FRAME).ok()?;
        Some(buffer)
    }

    /// Keeps a buffer for a later frame, unless its pool is full or it is of no standard size
    /// (pooling odd sizes would pin memory).
    pub(crate) fn recycle(&mut self, mut buffer: Vec<u8>) {
        buffer.clear();
        let capacity = buffer.capacity();
        if capacity <= MAX_POOLED_BUFFER_CAPACITY {
            if self.small.len() < MAX_POOLED_BUFFERS {
                self.small.push(buffer);
            }
        } else if capacity >= MAX_COALESCED_FRAME && self.large.len() < MAX_POOLED_LARGE_BUFFERS {
            self.large.push(buffer);
        }
    }
}

impl Delivery for RxQueue {
    fn buffer(&mut self, len: usize) -> Vec<u8> {
        self.free.take(len)
    }

    fn large_buffer(&mut self) -> Option<Vec<u8>> {
        self.free.take_large()
    }

    fn deliver(&mut self, frame: Vec<u8>) {
        self.push(frame);
    }

    fn recycle(&mut self, buffer: Vec<u8>) {
        self.free.recycle(buffer);
    }
}

impl RxQueue {
    fn push(&mut self, buffer: Vec<u8>) {
        self.bytes += buffer.len();
        self.frames.push_back(buffer);
    }

    pub(crate) fn pop(&mut self) -> Option<Vec<u8>> {
        let buffer = self.frames.pop_front()?;
        self.bytes -= buffer.len();
        Some(buffer)
    }
}

/// Hold-down and flap damping of the VF.
struct Damping {
    /// Current hold-down.
    hold_ns: u64,
    /// Since when the (eligible) VF has been continuously up; `None` when it is not.
    up_since_ns: Option<u64>,
}

/// The bond. See the module documentation.
pub struct Bond {
    config: BondConfig,
    mac: MacAddress,
    ip_mtu: usize,
    pub(crate) paths: Paths,
    pub(crate) rx: RxQueue,
    coalescer: Coalescer,
    dedup: DedupWindow,
    damping: Damping,
    announce_pending: bool,
    /// The synthetic device asked for the pending announcement and wants to hear it went out.
    host_announce_pending: bool,
    announcements_requested: u64,
    retired: PathStats,
    switches_to_vf: u64,
    switches_to_synthetic: u64,
    vf_attaches: u64,
    vf_detaches: u64,
    /// Time of the previous evaluation (start of the blind window for a VF that just died).
    last_evaluation_ns: Option<u64>,
    last_device_poll_ns: u64,
    /// Duplicate suppression stays on until then after a VF detach.
    dedup_grace_until_ns: u64,
    no_path_logged: bool,
    last_switch: Option<SwitchEvent>,
    /// The host data path as of the last evaluation (`None`: no host switch).
    host_path: Option<HostPath>,
    host_switch_requests: u64,
    timings: ReceiveTimings,
    /// Frames seen by the timing sampler (see [`TIMED_FRAME_INTERVAL`]).
    timed_frames: u64,
}

impl Bond {
    /// A bond over `synthetic`, whose MAC becomes the interface MAC, carrying IP packets of up
    /// to `ip_mtu` bytes.
    pub fn new(synthetic: Box<dyn NetDevice>, ip_mtu: usize, config: BondConfig) -> Bond {
        let mac = synthetic.mac_address();
        let max_frame = ip_mtu + ETHERNET_HEADER_LEN + VLAN_TAG_LEN;
        Bond {
            mac,
            ip_mtu,
            paths: Paths {
                synthetic: Path::new(synthetic),
                vf: None,
                active: PathId::Synthetic,
                scratch: Vec::with_capacity(max_frame),
                segmentation: PendingSegments {
                    frame: Vec::new(),
                    layout: None,
                    mss: 0,
                    offset: 0,
                    index: 0,
                },
                tx_dropped_no_path: 0,
                tx_blocked_no_path: 0,
            },
            rx: RxQueue {
                frames: VecDeque::with_capacity(config.rx_queue_frames),
                bytes: 0,
                free: BufferPool::default(),
            },
            coalescer: Coalescer::new(),
            dedup: DedupWindow::new(config.dedup_slots, config.dedup_window_ns),
            damping: Damping {
                hold_ns: config.hold_down_ns,
                up_since_ns: None,
            },
            announce_pending: false,
            host_announce_pending: false,
            announcements_requested: 0,
            retired: PathStats::default(),
            switches_to_vf: 0,
            switches_to_synthetic: 0,
            vf_attaches: 0,
            vf_detaches: 0,
            last_evaluation_ns: None,
            last_device_poll_ns: 0,
            dedup_grace_until_ns: 0,
            no_path_logged: false,
            last_switch: None,
            host_path: None,
            host_switch_requests: 0,
            timings: ReceiveTimings::default(),
            timed_frames: 0,
            config,
        }
    }

    /// The interface MAC (the synthetic NIC's).
    pub fn mac(&self) -> MacAddress {
        self.mac
    }

    /// The IP MTU the bond carries.
    pub fn ip_mtu(&self) -> usize {
        self.ip_mtu
    }

    /// The path transmit uses.
    pub fn active_path(&self) -> PathId {
        self.paths.active
    }

    /// True while a VF is attached (usable or not).
    pub fn has_vf(&self) -> bool {
        self.paths.vf.is_some()
    }

    /// Name of the attached VF.
    pub fn vf_name(&self) -> Option<&str> {
        self.paths.vf.as_ref().map(|vf| vf.path.device.name())
    }

    /// Name of the synthetic NIC.
    pub fn synthetic_name(&self) -> &str {
        self.paths.synthetic.device.name()
    }

    /// The most recent switch.
    pub fn last_switch(&self) -> Option<&SwitchEvent> {
        self.last_switch.as_ref()
    }

    /// Current hold-down for a returning VF.
    pub fn hold_down_ns(&self) -> u64 {
        self.damping.hold_ns
    }

    /// Attaches a VF. It carries traffic once it is eligible (same MAC as the synthetic NIC, MTU
    /// large enough), `Up`, and has stayed up for the hold-down. Refused (device handed back)
    /// when a VF is already attached.
    pub fn attach_vf(
        &mut self,
        device: Box<dyn NetDevice>,
        now_ns: u64,
    ) -> Result<(), AttachRejected> {
        if let Some(vf) = &self.paths.vf {
            let attached = vf.path.device.name().to_string();
            return Err(AttachRejected {
                error: Error::VfAlreadyAttached { attached },
                device,
            });
        }
        let caps = device.capabilities();
        log::info!(
            "bond: vf {} attached (mac {}, mtu {}, link {:?})",
            device.name(),
            device.mac_address(),
            caps.mtu,
            device.link_state()
        );
        self.vf_attaches += 1;
        self.paths.vf = Some(VfPath {
            path: Path::new(device),
            ineligible: None,
        });
        self.damping.up_since_ns = None;
        self.dedup.clear();
        self.evaluate(now_ns);
        Ok(())
    }

    /// Detaches the VF: traffic moves to the synthetic path first, frames the VF already
    /// received are taken, its counters are folded into the retired total, and the device is
    /// handed back for the caller to stop and release.
    pub fn detach_vf(&mut self, now_ns: u64) -> Option<Box<dyn NetDevice>> {
        self.paths.vf.as_ref()?;
        if self.paths.active == PathId::Vf {
            let reaction = self.reaction_since_last_evaluation(now_ns);
            self.switch(PathId::Synthetic, SwitchCause::VfDetached, now_ns, reaction);
        }
        // The host must not steer to a VF that is gone (also when a switch was still in flight).
        self.request_host_path(false);
        if self.damping.up_since_ns.is_some() {
            self.register_loss(now_ns);
        }
        let drain = self.paths.vf.as_ref().is_some_and(|vf| {
            vf.path.device.link_state() != LinkState::Gone && vf.ineligible.is_none()
        });
        if drain {
            self.receive_from(PathId::Vf, now_ns, &|| now_ns);
            self.coalescer.flush(&mut self.rx);
        }
        let vf = self.paths.vf.take()?;
        let mut path = vf.path;
        path.flush();
        self.retired.add(&PathStats {
            bond: path.counters,
            device: path.device.stats(),
        });
        self.vf_detaches += 1;
        // Copies of the VF's last frames may still arrive on the synthetic path.
        self.dedup_grace_until_ns = now_ns.saturating_add(self.config.dedup_window_ns);
        log::info!(
            "bond: vf {} detached (rx {} frames, tx {} frames through the bond)",
            path.device.name(),
            path.counters.rx_frames,
            path.counters.tx_frames
        );
        Some(path.device)
    }

    /// Housekeeping: polls both devices, re-evaluates which path to use, and moves received
    /// frames into the queue the stack reads. Returns true when anything happened (frames
    /// received, path or link changed).
    pub fn poll(&mut self, now_ns: u64) -> bool {
        self.poll_timed(now_ns, &|| now_ns)
    }

    /// [`Bond::poll`], timing its stages on `clock` (see [`ReceiveTimings`]). The clock only
    /// measures: every decision still uses `now_ns`.
    pub fn poll_timed(&mut self, now_ns: u64, clock: &dyn Fn() -> u64) -> bool {
        let started_ns = clock();
        self.paths.synthetic.device.poll(now_ns);
        if self.paths.synthetic.device.take_announce_request() {
            log::info!("bond: the host asked for an announcement (e.g. after a migration)");
            self.host_announce_pending = true;
            self.request_announce();
        }
        if let Some(vf) = &mut self.paths.vf {
            vf.path.device.poll(now_ns);
        }
        self.last_device_poll_ns = now_ns;
        let switches_before = self.switches_to_vf + self.switches_to_synthetic;
        let link_changed = self.evaluate(now_ns);
        let active = self.paths.active;
        let other = match active {
            PathId::Synthetic => PathId::Vf,
            PathId::Vf => PathId::Synthetic,
        };
        let housekept_ns = clock();
        self.timings.housekeeping_ns += housekept_ns.saturating_sub(started_ns);
        let mut received = self.receive_from(active, now_ns, clock);
        received += self.receive_from(other, now_ns, clock);
        // The end of the batch: nothing waits for a later one.
        let flush_ns = clock();
        self.coalescer.flush(&mut self.rx);
        self.timings.coalesce_ns += clock().saturating_sub(flush_ns);
        let segments_sent = self.paths.send_pending_segments();
        received > 0
            || segments_sent
            || link_changed
            || switches_before != self.switches_to_vf + self.switches_to_synthetic
    }

    /// The event loop is about to sleep: every path's driver unmasks the interrupts it masked
    /// while being polled. True when a driver saw work arrive meanwhile (poll again instead).
    pub fn arm_interrupts(&mut self) -> bool {
        let mut work = self.paths.synthetic.device.arm_interrupts();
        if let Some(vf) = &mut self.paths.vf {
            work |= vf.path.device.arm_interrupts();
        }
        work
    }

    /// When [`Bond::poll`] must run next even without an interrupt: the end of a VF hold-down,
    /// or the device watchdog.
    pub fn next_deadline_ns(&self) -> Option<u64> {
        let watchdog = self
            .last_device_poll_ns
            .saturating_add(self.config.watchdog_ns);
        let hold_down_end = match (self.paths.active, self.damping.up_since_ns) {
            // While the host's switch is in flight its completion wakes the loop.
            (PathId::Synthetic, Some(_)) if self.host_path == Some(HostPath::SwitchingToVf) => None,
            (PathId::Synthetic, Some(since)) => Some(since.saturating_add(self.damping.hold_ns)),
            _ => None,
        };
        // A host that refused the VF (no association) is asked again at the watchdog, not in
        // a busy loop.
        let hold_down_end =
            hold_down_end.filter(|end| self.host_path.is_none() || *end > self.last_device_poll_ns);
        // A driver's own wish (a register check it deferred while busy).
        let drivers = [
            self.paths.synthetic.device.next_poll_ns(),
            self.paths
                .vf
                .as_ref()
                .and_then(|vf| vf.path.device.next_poll_ns()),
        ];
        let earliest = [hold_down_end, drivers[0], drivers[1]]
            .into_iter()
            .flatten()
            .fold(watchdog, u64::min);
        Some(earliest)
    }

    /// True once per requested announcement, when the active path is up to carry it.
    pub fn take_announce_request(&mut self) -> bool {
        if self.announce_pending && self.paths.readiness() != TxReadiness::NoPath {
            self.announce_pending = false;
            if core::mem::take(&mut self.host_announce_pending) {
                self.paths.synthetic.device.announce_done();
            }
            true
        } else {
            false
        }
    }

    /// Asks for an announcement (e.g. after a new DHCP lease).
    pub fn request_announce(&mut self) {
        self.announce_pending = true;
        self.announcements_requested += 1;
    }

    /// Sends a complete frame on the active path. Returns false when it was dropped.
    pub fn send_frame(&mut self, frame: &[u8]) -> bool {
        match self.paths.readiness() {
            TxReadiness::Ready => {}
            TxReadiness::Busy => {
                self.paths.active_path_mut().counters.tx_errors += 1;
                return false;
            }
            TxReadiness::NoPath => {
                self.paths.tx_dropped_no_path += 1;
                return false;
            }
        }
        let errors_before = self.paths.active_path().counters.tx_errors;
        self.paths
            .transmit_with(frame.len(), None, |buffer| buffer.copy_from_slice(frame));
        self.paths.active_path().counters.tx_errors == errors_before
    }

    /// True when the active path can take a frame right now.
    pub fn can_transmit(&self) -> bool {
        self.paths.readiness() == TxReadiness::Ready
    }

    /// Rings the doorbell of every path that queued frames since the last flush.
    pub fn flush(&mut self) {
        self.paths.synthetic.flush();
        if let Some(vf) = &mut self.paths.vf {
            vf.path.flush();
        }
    }

    /// True while segments of a large frame wait for room in the active ring: the stack must
    /// poll again soon.
    pub fn has_pending_transmit(&self) -> bool {
        self.paths.has_pending_segments() && self.has_usable_path()
    }

    /// True while some path can carry frames (the active path's link is up).
    pub fn has_usable_path(&self) -> bool {
        self.paths.readiness() != TxReadiness::NoPath
    }

    /// Frames waiting for the stack.
    pub fn pending_rx(&self) -> usize {
        self.rx.frames.len()
    }

    /// The next frame the stack will read.
    pub fn peek_rx(&self) -> Option<&[u8]> {
        self.rx.frames.front().map(Vec::as_slice)
    }

    /// Takes the next frame out of the receive queue (the caller may hand the buffer back with
    /// [`Bond::recycle_rx`]).
    pub fn pop_rx(&mut self) -> Option<Vec<u8>> {
        self.rx.pop()
    }

    /// Returns a buffer from [`Bond::pop_rx`] to the pool.
    pub fn recycle_rx(&mut self, buffer: Vec<u8>) {
        self.rx.free.recycle(buffer);
    }

    /// Counters.
    pub fn stats(&self) -> BondStats {
        let synthetic = PathStats {
            bond: self.paths.synthetic.counters,
            device: self.paths.synthetic.device.stats(),
        };
        let vf = self.paths.vf.as_ref().map(|vf| PathStats {
            bond: vf.path.counters,
            device: vf.path.device.stats(),
        });
        let mut total = synthetic;
        if let Some(vf) = &vf {
            total.add(vf);
        }
        total.add(&self.retired);
        BondStats {
            active: self.paths.active,
            synthetic,
            vf,
            vf_retired: self.retired,
            duplicates_dropped: total.bond.rx_duplicates,
            bad_frames_dropped: total.bond.rx_bad,
            total,
            switches_to_vf: self.switches_to_vf,
            switches_to_synthetic: self.switches_to_synthetic,
            tx_dropped_no_path: self.paths.tx_dropped_no_path,
            tx_blocked_no_path: self.paths.tx_blocked_no_path,
            announcements_requested: self.announcements_requested,
            dedup_evictions: self.dedup.evictions(),
            vf_attaches: self.vf_attaches,
            vf_detaches: self.vf_detaches,
            hold_down_ns: self.damping.hold_ns,
            coalesce: self.coalescer.stats,
            host_data_path: self.host_path,
            host_switch_requests: self.host_switch_requests,
            receive_timings: self.timings,
        }
    }

    /// Asks the host (where it steers, i.e. Hyper-V) for the VF or synthetic path, unless it is
    /// there or on the way already. Returns true once the host confirmed the VF.
    fn request_host_path(&mut self, to_vf: bool) -> bool {
        let Some(host) = self.paths.synthetic.device.host_data_path() else {
            return to_vf;
        };
        let state = host.state();
        let wanted = if to_vf {
            matches!(state, HostPath::SwitchingToVf | HostPath::Vf)
        } else {
            state == HostPath::Synthetic
        };
        if !wanted && (!to_vf || state == HostPath::Synthetic) && host.request(to_vf) {
            self.host_switch_requests += 1;
        }
        let state = host.state();
        self.host_path = Some(state);
        to_vf && state == HostPath::Vf
    }

    fn reaction_since_last_evaluation(&self, now_ns: u64) -> u64 {
        self.last_evaluation_ns
            .map_or(0, |last| now_ns.saturating_sub(last))
    }

    /// Re-checks link states and eligibility and switches when needed. Returns true when a link
    /// state changed.
    fn evaluate(&mut self, now_ns: u64) -> bool {
        let mut link_changed = false;
        let synthetic_link = self.paths.synthetic.device.link_state();
        if synthetic_link != self.paths.synthetic.last_link {
            log::info!(
                "bond: synthetic {} link {:?} -> {:?}",
                self.paths.synthetic.device.name(),
                self.paths.synthetic.last_link,
                synthetic_link
            );
            self.paths.synthetic.last_link = synthetic_link;
            link_changed = true;
            if synthetic_link == LinkState::Up && self.paths.active == PathId::Synthetic {
                // Carrier came back on the active path: peers may have aged us out.
                self.request_announce();
            }
        }

        let mut vf_usable = false;
        let mut vf_cause = None;
        let (mac, ip_mtu) = (self.mac, self.ip_mtu);
        if let Some(vf) = &mut self.paths.vf {
            let link = vf.path.device.link_state();
            if link != vf.path.last_link {
                log::info!(
                    "bond: vf {} link {:?} -> {:?}",
                    vf.path.device.name(),
                    vf.path.last_link,
                    link
                );
                vf.path.last_link = link;
                link_changed = true;
            }
            let vf_mac = vf.path.device.mac_address();
            let vf_mtu = vf.path.device.capabilities().mtu;
            let ineligible = if vf_mac != mac {
                Some(Ineligible::MacMismatch(vf_mac))
            } else if vf_mtu < ip_mtu {
                Some(Ineligible::MtuTooSmall(vf_mtu))
            } else {
                None
            };
            if ineligible != vf.ineligible {
                match ineligible {
                    Some(Ineligible::MacMismatch(vf_mac)) => log::warn!(
                        "bond: ignoring vf {}: its MAC {vf_mac} differs from the synthetic MAC {mac} (pairing is by permanent MAC)",
                        vf.path.device.name()
                    ),
                    Some(Ineligible::MtuTooSmall(vf_mtu)) => log::warn!(
                        "bond: ignoring vf {}: its MTU {vf_mtu} is below the interface MTU {ip_mtu} (set mtu= on the command line to use it)",
                        vf.path.device.name()
                    ),
                    None => log::info!("bond: vf {} is eligible", vf.path.device.name()),
                }
                vf.ineligible = ineligible;
            }
            vf_usable = ineligible.is_none() && link == LinkState::Up;
            vf_cause = Some(match (ineligible, link) {
                (Some(Ineligible::MacMismatch(vf_mac)), _) => SwitchCause::VfMacChanged(vf_mac),
                (Some(Ineligible::MtuTooSmall(vf_mtu)), _) => SwitchCause::VfMtuTooSmall(vf_mtu),
                (None, LinkState::Down) => SwitchCause::VfLinkDown,
                (None, LinkState::Resetting) => SwitchCause::VfResetting,
                (None, LinkState::Gone) => SwitchCause::VfGone,
                (None, LinkState::Up) => SwitchCause::VfLinkDown,
            });
        }

        self.host_path = self
            .paths
            .synthetic
            .device
            .host_data_path()
            .map(|host| host.state());
        match self.paths.active {
            PathId::Vf => {
                if !vf_usable {
                    let reaction = self.reaction_since_last_evaluation(now_ns);
                    let cause = vf_cause.unwrap_or(SwitchCause::VfDetached);
                    self.switch(PathId::Synthetic, cause, now_ns, reaction);
                    self.register_loss(now_ns);
                    self.request_host_path(false);
                } else if matches!(
                    self.host_path,
                    Some(HostPath::Synthetic | HostPath::SwitchingToSynthetic)
                ) {
                    // The host took the VF path away (withdrawal, its own switch).
                    let reaction = self.reaction_since_last_evaluation(now_ns);
                    self.switch(
                        PathId::Synthetic,
                        SwitchCause::HostSwitchedToSynthetic,
                        now_ns,
                        reaction,
                    );
                    self.register_loss(now_ns);
                }
            }
            PathId::Synthetic => {
                if vf_usable {
                    let since = *self.damping.up_since_ns.get_or_insert(now_ns);
                    let up_ns = now_ns.saturating_sub(since);
                    let ready = synthetic_link != LinkState::Up || up_ns >= self.damping.hold_ns;
                    // On Hyper-V transmit moves only after the host confirmed the switch.
                    if ready && self.request_host_path(true) {
                        let reaction = self.reaction_since_last_evaluation(now_ns);
                        if synthetic_link != LinkState::Up {
                            self.switch(PathId::Vf, SwitchCause::SyntheticDown, now_ns, reaction);
                        } else {
                            let hold_down_ns = self.damping.hold_ns;
                            let reaction = up_ns - hold_down_ns;
                            self.switch(
                                PathId::Vf,
                                SwitchCause::HoldDownPassed {
                                    up_ns,
                                    hold_down_ns,
                                },
                                now_ns,
                                reaction,
                            );
                        }
                    }
                } else {
                    if self.damping.up_since_ns.is_some() {
                        // Went away again during the hold-down: a flap.
                        self.register_loss(now_ns);
                    }
                    if matches!(self.host_path, Some(HostPath::SwitchingToVf | HostPath::Vf)) {
                        // Lost while the host's switch was in flight: ask it back.
                        self.request_host_path(false);
                    }
                }
            }
        }

        let any_up = self.paths.readiness() != TxReadiness::NoPath;
        if !any_up && !self.no_path_logged {
            log::warn!(
                "bond: no usable path (synthetic {:?}, vf {}); transmission is held back until one returns",
                synthetic_link,
                self.paths
                    .vf
                    .as_ref()
                    .map_or(String::from("absent"), |vf| alloc::format!(
                        "{:?}",
                        vf.path.last_link
                    ))
            );
            self.no_path_logged = true;
        } else if any_up && self.no_path_logged {
            log::info!("bond: {} path usable again", self.paths.active);
            self.no_path_logged = false;
        }
        self.last_evaluation_ns = Some(now_ns);
        link_changed
    }

    /// The VF stopped being usable: update the hold-down (double after a short up-time, reset
    /// after a stable one).
    fn register_loss(&mut self, now_ns: u64) {
        let up_ns = self
            .damping
            .up_since_ns
            .map_or(0, |since| now_ns.saturating_sub(since));
        let previous = self.damping.hold_ns;
        self.damping.hold_ns = if up_ns >= self.config.stable_ns {
            self.config.hold_down_ns
        } else {
            previous.saturating_mul(2).min(self.config.max_hold_down_ns)
        };
        if self.damping.hold_ns != previous {
            log::info!(
                "bond: vf was up {} ms; hold-down now {} ms",
                up_ns / NS_PER_MS,
                self.damping.hold_ns / NS_PER_MS
            );
        }
        self.damping.up_since_ns = None;
    }

    fn switch(&mut self, to: PathId, cause: SwitchCause, now_ns: u64, reaction_ns: u64) {
        let from = self.paths.active;
        if from == to {
            return;
        }
        // Queued frames on the old path go out if it can still send them.
        self.flush();
        self.paths.active = to;
        match to {
            PathId::Vf => self.switches_to_vf += 1,
            PathId::Synthetic => self.switches_to_synthetic += 1,
        }
        log::info!(
            "bond: switch {from} -> {to} (cause: {cause}) in {} us",
            reaction_ns / NS_PER_US
        );
        self.last_switch = Some(SwitchEvent {
            from,
            to,
            cause,
            at_ns: now_ns,
            reaction_ns,
        });
        self.request_announce();
    }

    /// Moves up to the budget of received frames from one path's device into the queue.
    fn receive_from(&mut self, which: PathId, now_ns: u64, clock: &dyn Fn() -> u64) -> usize {
        // Only needed while two paths deliver (and briefly after the VF left).
        let dedup_active = self
            .paths
            .vf
            .as_ref()
            .is_some_and(|vf| vf.ineligible.is_none())
            || now_ns < self.dedup_grace_until_ns;
        let (mac, max_untagged) = (self.mac, self.ip_mtu + ETHERNET_HEADER_LEN);
        let room = self
            .config
            .rx_queue_frames
            .saturating_sub(self.rx.frames.len());
        if room == 0 || self.rx.bytes >= self.config.rx_queue_bytes {
            return 0;
        }
        let budget = room.min(self.config.rx_budget);
        let (path, ignore_all) = match which {
            PathId::Synthetic => (&mut self.paths.synthetic, false),
            PathId::Vf => match self.paths.vf.as_mut() {
                Some(vf) => {
                    let ignore = vf.ineligible.is_some();
                    (&mut vf.path, ignore)
                }
                None => return 0,
            },
        };
        if path.device.link_state() == LinkState::Gone {
            // A removed device must not be touched beyond what `poll` already did.
            return 0;
        }
        let rx_queue_frames = self.config.rx_queue_frames;
        let Path {
            device, counters, ..
        } = path;
        let rx = &mut self.rx;
        let dedup = &mut self.dedup;
        let mut coalescer = self.config.rx_coalescing.then_some(&mut self.coalescer);
        let mut delivered = 0;
        let timings = &mut self.timings;
        let timed_frames = &mut self.timed_frames;
        // The bond's share of the time inside `receive`, estimated from the timed frames.
        let mut sink_ns = 0u64;
        let receive_started_ns = clock();
        device.receive(budget, &mut |frame, meta| {
            *timed_frames += 1;
            let timed = timed_frames.is_multiple_of(TIMED_FRAME_INTERVAL);
            let frame_started_ns = if timed { clock() } else { 0 };
            if ignore_all {
                counters.rx_ignored += 1;
                return;
            }
            // Larger than the MTU is fine for a TCP frame a NIC coalesced (virtio GUEST_TSO):
            // smoltcp takes TCP segments of any size that fits the window.
            // An IP packet beyond the MTU is not ours to take (a VLAN tag may add 4 bytes).
            let tagged = frame.get(12..14) == Some(&[0x81, 0x00][..]);
            let max_frame = max_untagged + if tagged { VLAN_TAG_LEN } else { 0 };
            let oversized = frame.len() > max_frame
                && (frame.len() > MAX_SEGMENTATION_FRAME + VLAN_TAG_LEN
                    || TcpLayout::parse(frame).is_none());
            let rejection = if frame.len() < ETHERNET_HEADER_LEN || oversized {
                Some("length outside 14..=MTU+14 (+4 tagged, 64 KiB for TCP)")
            } else if frame[6..12] == mac.0 {
                // Our own frame looped back by a hub or bridge through the other path.
                Some("our own source MAC (looped back)")
            } else if !meta.checksum_verified && !crate::checksum::verify(frame) {
                Some("bad IPv4/TCP/UDP/ICMP checksum")
            } else {
                None
            };
            if let Some(reason) = rejection {
                counters.rx_bad += 1;
                // Logged at 1, 2, 4, 8... so a flood of bad frames cannot flood the log.
                if counters.rx_bad.is_power_of_two() {
                    log::warn!(
                        "bond: dropped a {}-byte frame from {which}: {reason}; {} bad frames so far",
                        frame.len(),
                        counters.rx_bad
                    );
                }
                return;
            }
            if dedup_active
                && dedup.check(frame_key(frame, meta.checksum_partial), which, now_ns) == Verdict::Duplicate
            {
                counters.rx_duplicates += 1;
                return;
            }
            if rx.frames.len() >= rx_queue_frames {
                counters.rx_queue_full += 1;
                return;
            }
            let checked_ns = if timed { clock() } else { 0 };
            // smoltcp verifies UDP checksums itself (the only check a reassembled datagram
            // gets), so a validated-but-partial field must be completed first. TCP's is never
            // read again.
            let complete = meta.checksum_partial && TcpLayout::parse(frame).is_none();
            match coalescer.as_deref_mut() {
                Some(coalescer) if !complete => coalescer.offer(frame, rx),
                _ => {
                    let mut buffer = rx.free.take(frame.len());
                    buffer.extend_from_slice(frame);
                    if complete {
                        crate::checksum::fill(&mut buffer);
                    }
                    rx.push(buffer);
                }
            }
            counters.rx_frames += 1;
            counters.rx_bytes += frame.len() as u64;
            delivered += 1;
            if timed {
                let checks_ns = checked_ns.saturating_sub(frame_started_ns);
                let coalesce_ns = clock().saturating_sub(checked_ns);
                timings.checks_ns += checks_ns * TIMED_FRAME_INTERVAL;
                timings.coalesce_ns += coalesce_ns * TIMED_FRAME_INTERVAL;
                sink_ns += (checks_ns + coalesce_ns) * TIMED_FRAME_INTERVAL;
            }
        });
        let receive_ns = clock().saturating_sub(receive_started_ns);
        self.timings.driver_ns += receive_ns.saturating_sub(sink_ns);
        delivered
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::{FakeControl, FakeDevice};

    const MS: u64 = 1_000_000;
    const MAC: MacAddress = MacAddress([0x02, 0, 0, 0, 0, 0x15]);
    const PEER: MacAddress = MacAddress([0x02, 0, 0, 0, 0, 0x99]);

    fn bond_with_vf(vf_link: LinkState) -> (Bond, FakeControl, FakeControl) {
        let (synthetic, synthetic_control) = FakeDevice::new("virtio-net", MAC);
        let mut bond = Bond::new(Box::new(synthetic), 1500, BondConfig::default());
        let (vf, vf_control) = FakeDevice::new("igbvf", MAC);
        vf_control.set_link(vf_link);
        bond.attach_vf(Box::new(vf), 0).unwrap();
        (bond, synthetic_control, vf_control)
    }

    #[test]
    fn a_host_announce_request_is_announced_once_and_acknowledged() {
        let (mut bond, synthetic, _vf) = bond_on_vf();
        assert!(!bond.take_announce_request());
        synthetic.request_announce();
        bond.poll(60 * MS);
        assert!(
            bond.take_announce_request(),
            "the host's request becomes an announcement"
        );
        assert_eq!(
            synthetic.announces_done(),
            1,
            "and is acknowledged to the device"
        );
        bond.poll(70 * MS);
        assert!(!bond.take_announce_request(), "once");
        assert_eq!(synthetic.announces_done(), 1);
    }

    /// A Hyper-V-style bond: the synthetic NIC's host steers traffic and has a VF associated;
    /// switch completions are held back.
    fn hyperv_bond() -> (Bond, FakeControl, FakeControl) {
        let (synthetic, synthetic_control) = FakeDevice::new("netvsc", MAC);
        synthetic_control.enable_host_data_path(true);
        synthetic_control.hold_host_switch_completions(true);
        let mut bond = Bond::new(Box::new(synthetic), 1500, BondConfig::default());
        let (vf, vf_control) = FakeDevice::new("mana", MAC);
        bond.attach_vf(Box::new(vf), 0).unwrap();
        (bond, synthetic_control, vf_control)
    }

    #[test]
    fn hyperv_transmit_moves_to_the_vf_only_after_the_host_confirmed_the_switch() {
        let (mut bond, synthetic, vf) = hyperv_bond();
        bond.poll(10 * MS);
        assert!(
            synthetic.host_switch_requests().is_empty(),
            "within the hold-down"
        );
        bond.poll(50 * MS);
        assert_eq!(synthetic.host_switch_requests(), [true]);
        assert_eq!(bond.active_path(), PathId::Synthetic, "completion awaited");
        assert_eq!(bond.stats().host_data_path, Some(HostPath::SwitchingToVf));
        assert!(send(&mut bond, 1));
        assert_eq!(synthetic.take_tx().len(), 1, "still on the synthetic path");
        assert!(vf.take_tx().is_empty());
        bond.poll(60 * MS);
        assert_eq!(synthetic.host_switch_requests(), [true], "asked once");
        synthetic.complete_host_switch();
        bond.poll(70 * MS);
        assert_eq!(bond.active_path(), PathId::Vf);
        assert!(matches!(
            bond.last_switch().unwrap().cause,
            SwitchCause::HoldDownPassed { .. }
        ));
        assert!(bond.take_announce_request());
        assert!(send(&mut bond, 2));
        assert_eq!(vf.take_tx().len(), 1);
        let stats = bond.stats();
        assert_eq!(stats.host_data_path, Some(HostPath::Vf));
        assert_eq!(stats.host_switch_requests, 1);
        assert_eq!(stats.switches_to_vf, 1);
    }

    #[test]
    fn hyperv_host_moving_the_path_back_is_a_vf_loss_with_hold_down_and_fail_back() {
        let (mut bond, synthetic, vf) = hyperv_bond();
        synthetic.hold_host_switch_completions(false);
        bond.poll(50 * MS);
        assert_eq!(bond.active_path(), PathId::Vf);
        let _ = bond.take_announce_request();
        let hold_before = bond.hold_down_ns();
        synthetic.host_reverts(true);
        bond.poll(60 * MS);
        assert_eq!(bond.active_path(), PathId::Synthetic);
        assert_eq!(
            bond.last_switch().unwrap().cause,
            SwitchCause::HostSwitchedToSynthetic
        );
        assert!(bond.take_announce_request());
        assert!(
            bond.hold_down_ns() > hold_before,
            "a loss doubles the hold-down"
        );
        assert!(send(&mut bond, 3));
        assert_eq!(synthetic.take_tx().len(), 1);
        assert!(vf.take_tx().is_empty());
        // Without an association the host is not asked, and the loop does not spin.
        bond.poll(2_000 * MS);
        assert_eq!(synthetic.host_switch_requests(), [true]);
        assert_eq!(bond.active_path(), PathId::Synthetic);
        assert!(bond.next_deadline_ns().unwrap() > 2_000 * MS);
        // Re-associated: after the (doubled) hold-down the bond fails back to the VF.
        synthetic.host_associates();
        bond.poll(2_001 * MS);
        bond.poll(4_000 * MS);
        assert_eq!(synthetic.host_switch_requests(), [true, true]);
        assert_eq!(bond.active_path(), PathId::Vf);
        let stats = bond.stats();
        assert_eq!((stats.switches_to_vf, stats.switches_to_synthetic), (2, 1));
    }

    #[test]
    fn hyperv_vf_loss_or_detach_during_an_in_flight_switch_asks_the_host_back() {
        let (mut bond, synthetic, vf) = hyperv_bond();
        synthetic.hold_host_switch_completions(false);
        bond.poll(50 * MS);
        assert_eq!(bond.active_path(), PathId::Vf);
        vf.set_link(LinkState::Gone);
        bond.poll(51 * MS);
        assert_eq!(bond.active_path(), PathId::Synthetic, "at once");
        assert_eq!(synthetic.host_switch_requests(), [true, false]);
        assert_eq!(synthetic.host_path(), Some(HostPath::Synthetic));
        let _ = bond.detach_vf(52 * MS);
        assert_eq!(
            synthetic.host_switch_requests(),
            [true, false],
            "nothing more to ask"
        );

        // An eject while the switch to the VF is in flight: the VF is detached before the
        // completion; the host is asked back and transmit never moved.
        let (mut bond, synthetic, _vf) = hyperv_bond();
        bond.poll(50 * MS);
        assert_eq!(synthetic.host_path(), Some(HostPath::SwitchingToVf));
        let _ = bond.detach_vf(55 * MS);
        assert_eq!(synthetic.host_switch_requests(), [true, false]);
        synthetic.complete_host_switch();
        bond.poll(60 * MS);
        assert_eq!(synthetic.host_path(), Some(HostPath::Synthetic));
        assert_eq!(bond.active_path(), PathId::Synthetic);
        assert_eq!(bond.stats().switches_to_vf, 0);
    }

    #[test]
    fn without_a_host_data_path_the_bond_reports_none() {
        let (bond, _synthetic, _vf) = bond_on_vf();
        assert_eq!(bond.stats().host_data_path, None);
        assert_eq!(bond.stats().host_switch_requests, 0);
    }

    /// A bond whose VF became active at t = 50 ms.
    fn bond_on_vf() -> (Bond, FakeControl, FakeControl) {
        let (mut bond, synthetic, vf) = bond_with_vf(LinkState::Up);
        bond.poll(50 * MS);
        assert_eq!(bond.active_path(), PathId::Vf);
        assert!(
            bond.take_announce_request(),
            "a switch requests an announcement"
        );
        (bond, synthetic, vf)
    }

    fn frame(tag: u8, len: usize) -> Vec<u8> {
        let mut frame = alloc::vec![0u8; len];
        frame[0..6].copy_from_slice(&MAC.0);
        frame[6..12].copy_from_slice(&PEER.0);
        frame[12] = 0x08;
        frame[14] = tag;
        frame[len - 1] = tag;
        frame
    }

    fn send(bond: &mut Bond, tag: u8) -> bool {
        let sent = bond.send_frame(&frame(tag, 60));
        bond.flush();
        sent
    }

    fn drain(bond: &mut Bond) -> Vec<Vec<u8>> {
        core::iter::from_fn(|| bond.pop_rx()).collect()
    }

    #[test]
    fn a_driver_asking_to_be_polled_bounds_the_sleep() {
        let (bond, synthetic, vf) = bond_on_vf();
        let watchdog = bond.next_deadline_ns().expect("the watchdog");
        vf.set_next_poll(Some(51 * MS));
        assert_eq!(bond.next_deadline_ns(), Some(51 * MS));
        synthetic.set_next_poll(Some(50 * MS + 1));
        assert_eq!(bond.next_deadline_ns(), Some(50 * MS + 1));
        vf.set_next_poll(None);
        synthetic.set_next_poll(Some(watchdog + MS));
        assert_eq!(
            bond.next_deadline_ns(),
            Some(watchdog),
            "never past the watchdog"
        );
    }

    #[test]
    fn vf_is_used_only_after_the_hold_down() {
        let (mut bond, synthetic, vf) = bond_with_vf(LinkState::Up);
        assert_eq!(bond.active_path(), PathId::Synthetic);
        bond.poll(49 * MS);
        assert_eq!(bond.active_path(), PathId::Synthetic);
        assert_eq!(bond.next_deadline_ns(), Some(50 * MS));
        assert!(send(&mut bond, 1));
        assert_eq!(synthetic.take_tx().len(), 1);
        bond.poll(50 * MS);
        assert_eq!(bond.active_path(), PathId::Vf);
        assert!(send(&mut bond, 2));
        assert_eq!(vf.take_tx().len(), 1);
        assert!(
            synthetic.take_tx().is_empty(),
            "transmit only on the active path"
        );
        assert_eq!(bond.stats().switches_to_vf, 1);
    }

    #[test]
    fn every_vf_failure_switches_to_synthetic_immediately() {
        for (state, cause) in [
            (LinkState::Down, SwitchCause::VfLinkDown),
            (LinkState::Gone, SwitchCause::VfGone),
            (LinkState::Resetting, SwitchCause::VfResetting),
        ] {
            let (mut bond, synthetic, vf) = bond_on_vf();
            vf.set_link(state);
            bond.poll(60 * MS);
            assert_eq!(bond.active_path(), PathId::Synthetic, "{state:?}");
            let event = bond.last_switch().unwrap();
            assert_eq!(event.cause, cause);
            assert_eq!(
                event.reaction_ns,
                10 * MS,
                "time since the VF was last seen up"
            );
            assert!(bond.take_announce_request(), "announce after {state:?}");
            assert!(send(&mut bond, 3));
            assert_eq!(synthetic.take_tx().len(), 1);
            assert!(vf.take_tx().is_empty());
            assert_eq!(bond.stats().switches_to_synthetic, 1);
        }
    }

    #[test]
    fn detach_switches_first_and_keeps_counters_monotonic() {
        let (mut bond, synthetic, vf) = bond_on_vf();
        assert!(send(&mut bond, 1));
        assert!(send(&mut bond, 2));
        vf.inject_rx(&frame(9, 100));
        vf.inject_rx(&frame(10, 100));
        // The frames are still in the VF's ring when it is detached: they are not lost.
        let before = bond.stats();
        let device = bond.detach_vf(70 * MS).expect("a VF was attached");
        assert_eq!(device.name(), "igbvf");
        assert_eq!(bond.active_path(), PathId::Synthetic);
        assert_eq!(bond.last_switch().unwrap().cause, SwitchCause::VfDetached);
        assert_eq!(drain(&mut bond).len(), 2);
        // The synthetic copies of those frames (hub) arrive just after: still suppressed.
        synthetic.inject_rx(&frame(9, 100));
        synthetic.inject_rx(&frame(10, 100));
        bond.poll(71 * MS);
        assert_eq!(bond.pending_rx(), 0);
        let after = bond.stats();
        assert!(after.vf.is_none());
        assert_eq!(after.vf_retired.bond.tx_frames, 2);
        assert_eq!(after.vf_retired.bond.rx_frames, 2);
        assert_eq!(after.vf_retired.device.tx_frames, 2);
        assert!(after.total.bond.tx_frames >= before.total.bond.tx_frames);
        assert_eq!(after.total.bond.rx_frames, 2);
        assert!(bond.take_announce_request());
        assert!(send(&mut bond, 4));
        assert_eq!(synthetic.take_tx().len(), 1);
        assert_eq!(bond.stats().total.bond.tx_frames, 3);
        assert!(bond.detach_vf(80 * MS).is_none());
    }

    #[test]
    fn second_vf_is_refused_and_handed_back() {
        let (mut bond, _synthetic, _vf) = bond_with_vf(LinkState::Up);
        let (other, _control) = FakeDevice::new("second-vf", MAC);
        let rejected = bond.attach_vf(Box::new(other), 1).unwrap_err();
        assert_eq!(rejected.device.name(), "second-vf");
        assert_eq!(
            rejected.error,
            Error::VfAlreadyAttached {
                attached: "igbvf".into()
            }
        );
    }

    #[test]
    fn vf_with_another_mac_is_ignored() {
        let (synthetic, synthetic_control) = FakeDevice::new("virtio-net", MAC);
        let mut bond = Bond::new(Box::new(synthetic), 1500, BondConfig::default());
        let (vf, vf_control) = FakeDevice::new("igbvf", PEER);
        bond.attach_vf(Box::new(vf), 0).unwrap();
        bond.poll(1_000 * MS);
        assert_eq!(bond.active_path(), PathId::Synthetic);
        vf_control.inject_rx(&frame(1, 80));
        bond.poll(1_001 * MS);
        assert_eq!(bond.pending_rx(), 0, "a foreign VF's frames are not ours");
        assert_eq!(bond.stats().vf.unwrap().bond.rx_ignored, 1);
        assert!(send(&mut bond, 1));
        assert_eq!(synthetic_control.take_tx().len(), 1);
        // The PF assigns the right MAC (e.g. after a VF reset): now it pairs.
        vf_control.set_mac(MAC);
        bond.poll(1_002 * MS);
        bond.poll(1_052 * MS);
        assert_eq!(bond.active_path(), PathId::Vf);
        // And a MAC change away from ours switches back at once.
        vf_control.set_mac(PEER);
        bond.poll(1_053 * MS);
        assert_eq!(bond.active_path(), PathId::Synthetic);
        assert_eq!(
            bond.last_switch().unwrap().cause,
            SwitchCause::VfMacChanged(PEER)
        );
    }

    #[test]
    fn vf_with_a_smaller_mtu_is_ignored() {
        let (synthetic, _synthetic_control) = FakeDevice::new("virtio-net", MAC);
        let mut bond = Bond::new(Box::new(synthetic), 1500, BondConfig::default());
        let (vf, vf_control) = FakeDevice::new("igbvf", MAC);
        vf_control.set_mtu(1400);
        bond.attach_vf(Box::new(vf), 0).unwrap();
        bond.poll(1_000 * MS);
        assert_eq!(bond.active_path(), PathId::Synthetic);
    }

    #[test]
    fn flapping_vf_is_damped_with_exponential_back_off() {
        let (mut bond, _synthetic, vf) = bond_on_vf(); // up since 0, active at 50 ms
        let mut now = 50 * MS;
        let mut expected_hold = 50 * MS;
        for _ in 0..4 {
            // Up only briefly: a flap.
            now += 10 * MS;
            vf.set_link(LinkState::Down);
            bond.poll(now);
            assert_eq!(bond.active_path(), PathId::Synthetic);
            expected_hold *= 2;
            assert_eq!(bond.hold_down_ns(), expected_hold);
            now += MS;
            vf.set_link(LinkState::Up);
            bond.poll(now);
            let up_at = now;
            bond.poll(up_at + expected_hold - 1);
            assert_eq!(bond.active_path(), PathId::Synthetic, "still held down");
            now = up_at + expected_hold;
            bond.poll(now);
            assert_eq!(bond.active_path(), PathId::Vf);
        }
        // A flap during the hold-down restarts it (and doubles it).
        now += 10 * MS;
        vf.set_link(LinkState::Down);
        bond.poll(now);
        vf.set_link(LinkState::Up);
        now += MS;
        bond.poll(now);
        vf.set_link(LinkState::Down);
        now += MS;
        bond.poll(now);
        assert_eq!(bond.hold_down_ns(), 50 * MS * 64);
        // The cap applies.
        for _ in 0..10 {
            vf.set_link(LinkState::Up);
            now += MS;
            bond.poll(now);
            vf.set_link(LinkState::Down);
            now += MS;
            bond.poll(now);
        }
        assert_eq!(bond.hold_down_ns(), BondConfig::default().max_hold_down_ns);
        // Stable for a long time: the next loss resets the hold-down.
        vf.set_link(LinkState::Up);
        now += MS;
        bond.poll(now);
        now += 10_000 * MS;
        bond.poll(now);
        assert_eq!(bond.active_path(), PathId::Vf);
        now += 5_000 * MS;
        vf.set_link(LinkState::Down);
        bond.poll(now);
        assert_eq!(bond.hold_down_ns(), 50 * MS);
    }

    #[test]
    fn both_paths_down_drops_and_counts_then_resumes() {
        let (mut bond, synthetic, vf) = bond_on_vf();
        synthetic.set_link(LinkState::Down);
        vf.set_link(LinkState::Down);
        bond.poll(60 * MS);
        assert!(!send(&mut bond, 1));
        assert!(!send(&mut bond, 2));
        // A frame that must go out now (a reply) is dropped and counted.
        let dropped_before = bond.stats().tx_dropped_no_path;
        bond.paths
            .transmit_with(60, None, |buffer| buffer.fill(0xaa));
        assert_eq!(bond.stats().tx_dropped_no_path, dropped_before + 1);
        assert!(synthetic.take_tx().is_empty() && vf.take_tx().is_empty());
        assert!(
            !bond.take_announce_request(),
            "announcement waits for a path"
        );
        // The synthetic link returns first.
        synthetic.set_link(LinkState::Up);
        bond.poll(70 * MS);
        assert!(bond.take_announce_request());
        assert!(send(&mut bond, 3));
        assert_eq!(synthetic.take_tx().len(), 1);
        // Then the VF, which is taken after its hold-down.
        vf.set_link(LinkState::Up);
        bond.poll(80 * MS);
        bond.poll(80 * MS + bond.hold_down_ns());
        assert_eq!(bond.active_path(), PathId::Vf);
    }

    #[test]
    fn vf_is_taken_without_hold_down_when_synthetic_is_down() {
        let (mut bond, synthetic, _vf) = bond_with_vf(LinkState::Up);
        synthetic.set_link(LinkState::Down);
        bond.poll(MS);
        assert_eq!(bond.active_path(), PathId::Vf);
        assert_eq!(
            bond.last_switch().unwrap().cause,
            SwitchCause::SyntheticDown
        );
    }

    #[test]
    fn hub_duplicates_are_delivered_once() {
        let (mut bond, synthetic, vf) = bond_on_vf();
        for tag in 0..20u8 {
            let f = frame(tag, 200);
            vf.inject_rx(&f);
            synthetic.inject_rx(&f);
        }
        bond.poll(60 * MS);
        let delivered = drain(&mut bond);
        assert_eq!(delivered.len(), 20);
        for (tag, f) in delivered.iter().enumerate() {
            assert_eq!(f[14], tag as u8);
        }
        assert_eq!(bond.stats().duplicates_dropped, 20);
        // Order of arrival does not matter: synthetic copy first this time.
        let f = frame(42, 300);
        synthetic.inject_rx(&f);
        bond.poll(61 * MS);
        vf.inject_rx(&f);
        bond.poll(62 * MS);
        assert_eq!(drain(&mut bond).len(), 1);
    }

    #[test]
    fn inactive_path_only_frames_and_late_retransmissions_are_delivered() {
        let (mut bond, synthetic, vf) = bond_on_vf();
        // Bridge still relearning: traffic only on the synthetic (inactive) path.
        for tag in 0..5u8 {
            synthetic.inject_rx(&frame(tag, 120));
        }
        bond.poll(60 * MS);
        assert_eq!(drain(&mut bond).len(), 5);
        // A frame, then an identical retransmission on the other path after the window.
        let f = frame(77, 120);
        vf.inject_rx(&f);
        bond.poll(61 * MS);
        synthetic.inject_rx(&f);
        bond.poll(61 * MS + BondConfig::default().dedup_window_ns + 1);
        assert_eq!(drain(&mut bond).len(), 2);
        // An identical frame twice on the same path is delivered twice.
        vf.inject_rx(&f);
        vf.inject_rx(&f);
        bond.poll(200 * MS);
        assert_eq!(drain(&mut bond).len(), 2);
        assert_eq!(bond.stats().duplicates_dropped, 0);
    }

    #[test]
    fn coalesced_tcp_frames_beyond_the_mtu_are_taken_other_oversized_frames_are_not() {
        let (synthetic, control) = FakeDevice::new("virtio-net", MAC);
        let mut bond = Bond::new(Box::new(synthetic), 1500, BondConfig::default());
        let tcp_frame = |len: usize| {
            let mut frame = frame(0x45, len);
            frame[16..18].copy_from_slice(&((len - 14) as u16).to_be_bytes());
            frame[23] = 6; // TCP
            frame[34 + 12] = 5 << 4; // 20-byte TCP header
            frame
        };
        let verified = net_device::RxMeta {
            checksum_verified: true,
            ..net_device::RxMeta::default()
        };
        // What virtio-net delivers with GUEST_TSO: one 64 KiB TCP frame.
        control.inject_rx_with(&tcp_frame(MAX_SEGMENTATION_FRAME), verified);
        // Not TCP, or beyond any IP packet: refused.
        let mut udp = tcp_frame(20_000);
        udp[23] = 17;
        control.inject_rx_with(&udp, verified);
        control.inject_rx_with(&alloc::vec![0u8; MAX_SEGMENTATION_FRAME + 5], verified);
        bond.poll(MS);
        let delivered = drain(&mut bond);
        assert_eq!(delivered.len(), 1);
        assert_eq!(delivered[0].len(), MAX_SEGMENTATION_FRAME);
        assert_eq!(bond.stats().bad_frames_dropped, 2);

        // Coalesced frames count against the queue's byte bound: past it, the device is not
        // read until the stack drained the queue (no frame is dropped for it).
        for _ in 0..20 {
            control.inject_rx_with(&tcp_frame(60_000), verified);
        }
        bond.poll(2 * MS);
        assert_eq!(bond.pending_rx(), 20, "one device read may overshoot");
        control.inject_rx_with(&tcp_frame(60_000), verified);
        bond.poll(3 * MS);
        assert_eq!(
            bond.pending_rx(),
            20,
            "over the byte bound: the device waits"
        );
        assert_eq!(control.rx_pending(), 1);
        assert_eq!(drain(&mut bond).len(), 20);
        bond.poll(4 * MS);
        assert_eq!(drain(&mut bond).len(), 1);
        assert_eq!(bond.stats().synthetic.bond.rx_queue_full, 0);
    }

    #[test]
    fn a_large_frame_the_ring_refuses_is_cut_up_instead_of_lost() {
        let (synthetic, control) = FakeDevice::new("virtio-net", MAC);
        control.set_offloads(true, 65_535);
        control.set_tx_ring_capacity(8);
        control.set_large_frame_slots(8);
        let mut bond = Bond::new(Box::new(synthetic), 1500, BondConfig::default());
        assert!(bond.send_frame(&frame(1, 60)), "one slot taken");
        // A 12 000-byte TCP payload behind IPv4 + TCP headers: 9 segments.
        let payload: Vec<u8> = (0..12_000u32).map(|index| (index % 251) as u8).collect();
        let mut large = frame(0x45, 54 + payload.len());
        large[16..18].copy_from_slice(&((40 + payload.len()) as u16).to_be_bytes());
        large[23] = 6;
        large[34 + 12] = 5 << 4;
        large[54..].copy_from_slice(&payload);
        let wrote = bond.paths.transmit_with(large.len(), Some(1448), |buffer| {
            buffer.copy_from_slice(&large);
            buffer.len()
        });
        assert_eq!(wrote, large.len());
        assert!(bond.paths.has_pending_segments(), "7 slots: the rest waits");
        let mut wire = Vec::new();
        for step in 1..10 {
            bond.flush();
            wire.extend(control.take_tx());
            bond.poll(step * MS);
        }
        assert!(!bond.paths.has_pending_segments());
        assert_eq!(wire.len(), 1 + 9, "the small frame, then 9 segments");
        let mut received = Vec::new();
        for segment in &wire[1..] {
            assert!(segment.len() <= 1514);
            assert!(crate::checksum::verify(segment));
            received.extend_from_slice(&segment[54..]);
        }
        assert_eq!(received, payload, "every byte, in order");
        let counters = bond.stats().synthetic.bond;
        assert_eq!(counters.tx_software_segmentation, 1);
        assert_eq!(counters.tx_errors, 0);
    }

    #[test]
    fn partial_udp_checksums_are_completed_for_smoltcp_and_tcp_ones_left() {
        let (synthetic, control) = FakeDevice::new("virtio-net", MAC);
        let mut bond = Bond::new(Box::new(synthetic), 1500, BondConfig::default());
        let ip_frame = |protocol: u8, len: usize| {
            let mut frame = frame(0x45, len);
            frame[16..18].copy_from_slice(&((len - 14) as u16).to_be_bytes());
            frame[23] = protocol;
            frame[34 + 12] = 5 << 4; // a TCP header length, for the TCP frame
            frame[38..40].copy_from_slice(&((len - 34) as u16).to_be_bytes()); // UDP length
            crate::checksum::fill(&mut frame);
            // What virtio-net NEEDS_CSUM leaves: only the pseudo-header sum in the field.
            frame[if protocol == 17 { 40 } else { 50 }] ^= 0x5a;
            frame
        };
        let partial = net_device::RxMeta {
            checksum_verified: true,
            checksum_partial: true,
        };
        let udp = ip_frame(17, 300);
        let tcp = ip_frame(6, 300);
        control.inject_rx_with(&udp, partial);
        control.inject_rx_with(&tcp, partial);
        bond.poll(MS);
        let delivered = drain(&mut bond);
        assert_eq!(delivered.len(), 2);
        assert!(crate::checksum::verify(&delivered[0]), "UDP completed");
        assert_eq!(delivered[0][42..], udp[42..], "payload untouched");
        assert_eq!(delivered[1], tcp, "TCP left as it came");
    }

    #[test]
    fn malformed_and_looped_frames_are_dropped_and_counted() {
        let (synthetic, control) = FakeDevice::new("virtio-net", MAC);
        let mut bond = Bond::new(Box::new(synthetic), 1500, BondConfig::default());
        control.inject_rx(&[0u8; 10]);
        control.inject_rx(&alloc::vec![0u8; 1500 + 14 + 4 + 1]);
        let mut looped = frame(1, 60);
        looped[6..12].copy_from_slice(&MAC.0);
        control.inject_rx(&looped);
        control.inject_rx(&frame(2, 60));
        // One byte over the MTU untagged: dropped; the same length with a VLAN tag: taken.
        let mut untagged = frame(3, 1500 + 14 + 1);
        untagged[12..14].copy_from_slice(&[0x88, 0xb5]);
        control.inject_rx(&untagged);
        let mut tagged = frame(4, 1500 + 14 + 4);
        tagged[12..14].copy_from_slice(&[0x81, 0x00]);
        tagged[16..18].copy_from_slice(&[0x88, 0xb5]);
        control.inject_rx(&tagged);
        bond.poll(MS);
        assert_eq!(drain(&mut bond).len(), 2);
        assert_eq!(bond.stats().bad_frames_dropped, 4);
    }

    #[test]
    fn ring_full_is_back_pressure_not_loss() {
        let (synthetic, control) = FakeDevice::new("virtio-net", MAC);
        control.set_tx_ring_capacity(2);
        let mut bond = Bond::new(Box::new(synthetic), 1500, BondConfig::default());
        assert_eq!(bond.paths.readiness(), TxReadiness::Ready);
        assert!(bond.send_frame(&frame(1, 60)));
        assert!(bond.send_frame(&frame(2, 60)));
        assert_eq!(bond.paths.readiness(), TxReadiness::Busy);
        assert!(!bond.send_frame(&frame(3, 60)));
        bond.flush();
        bond.poll(MS); // completions free the ring
        assert_eq!(bond.paths.readiness(), TxReadiness::Ready);
        assert_eq!(control.take_tx().len(), 2);
    }

    #[test]
    fn receive_queue_is_bounded() {
        let (synthetic, control) = FakeDevice::new("virtio-net", MAC);
        let config = BondConfig {
            rx_queue_frames: 8,
            rx_budget: 4,
            ..BondConfig::default()
        };
        let mut bond = Bond::new(Box::new(synthetic), 1500, config);
        for tag in 0..20u8 {
            control.inject_rx(&frame(tag, 64));
        }
        bond.poll(MS);
        assert_eq!(bond.pending_rx(), 4, "budget per poll");
        bond.poll(2 * MS);
        bond.poll(3 * MS);
        assert_eq!(
            bond.pending_rx(),
            8,
            "queue limit; the rest waits in the device"
        );
        assert_eq!(control.rx_pending(), 12);
        drain(&mut bond);
        bond.poll(4 * MS);
        assert_eq!(bond.pending_rx(), 4);
    }
}
