//! A scripted in-memory `NetDevice` for host tests of the bond, the stack and applications.
//!
//! [`FakeDevice::new`] returns the device (to hand to the bond as `Box<dyn NetDevice>`) and a
//! [`FakeControl`] through which the test sets the link state, injects received frames and
//! collects transmitted ones. Behaviour mirrors the driver contract in `net-device`:
//! * `transmit` fails with `NotReady` unless the link is `Up`, with `Gone` once gone, and with
//!   `RingFull` when the ring holds `tx_ring_capacity` frames not yet completed;
//! * frames become visible to [`FakeControl::take_tx`] only after `flush` (the doorbell), and
//!   their ring slots complete at the next `poll`;
//! * `receive` delivers injected frames (never when gone);
//! * with [`FakeControl::set_offloads`] it acts as a NIC with checksum offload and TSO: frames on
//!   the wire carry completed checksums and TSO frames come out as MSS-sized segments, the way a
//!   host's segmentation would cut them; a request that breaks the `TxMeta` contract drops the
//!   frame and counts an offload error;
//! * with [`FakeControl::enable_host_data_path`] it also plays a Hyper-V host's data-path switch
//!   (netvsc's SWITCH_DATA_PATH): requests are recorded and completed at once or held back.

use alloc::boxed::Box;
use alloc::collections::VecDeque;
use alloc::rc::Rc;
use alloc::string::String;
use alloc::vec::Vec;
use core::cell::RefCell;

use net_device::{
    Capabilities, DeviceError, HostDataPath, HostPath, LinkState, MacAddress, NetDevice, RxMeta,
    Stats, TxMeta, checksum,
};

/// The scripted host data path of a fake synthetic NIC.
struct FakeHostPath {
    path: HostPath,
    associated: bool,
    hold_completions: bool,
    /// Requests made: `true` = to the VF.
    requests: Vec<bool>,
}

struct FakeState {
    mac: MacAddress,
    capabilities: Capabilities,
    link: LinkState,
    rx: VecDeque<(Vec<u8>, RxMeta)>,
    /// Queued by `transmit`, not yet flushed, with what `fill` asked of the NIC.
    queued: Vec<(Vec<u8>, TxMeta)>,
    /// Frames that asked for checksum offload / segmentation.
    checksum_offloads: u64,
    segmentation_offloads: u64,
    /// Requests that broke the `TxMeta` contract (frame dropped).
    offload_errors: u64,
    /// Flushed: "on the wire", for the test to collect.
    wire: VecDeque<Vec<u8>>,
    /// Ring slots in use (queued or flushed but not completed by `poll`).
    in_ring: usize,
    ring_capacity: usize,
    /// Free slots a frame larger than the MTU needs (a TSO frame spans several buffers).
    large_frame_slots: usize,
    stats: Stats,
    stopped: bool,
    polls: u64,
    flushes: u64,
    last_poll_ns: u64,
    /// The host asked for an announcement and the device has not handed the request over yet.
    announce_requested: bool,
    /// Announcements the stack reported done.
    announces_done: u64,
    /// The host data path, when the device plays a Hyper-V synthetic NIC.
    host: Option<FakeHostPath>,
    /// Calls of `arm_interrupts` (the stack was about to sleep).
    arms: u64,
    /// What `next_poll_ns` reports (a driver's deferred work).
    next_poll_ns: Option<u64>,
}

/// The device half; see the module documentation.
pub struct FakeDevice {
    name: String,
    state: Rc<RefCell<FakeState>>,
}

/// The test's handle on a [`FakeDevice`]. Cloneable; all clones control the same device.
#[derive(Clone)]
pub struct FakeControl {
    state: Rc<RefCell<FakeState>>,
}

impl FakeDevice {
    /// A device named `name` with MAC `mac`, link `Up`, MTU 1500, a 256-slot transmit ring.
    pub fn new(name: &str, mac: MacAddress) -> (FakeDevice, FakeControl) {
        let state = Rc::new(RefCell::new(FakeState {
            mac,
            capabilities: Capabilities::default(),
            link: LinkState::Up,
            rx: VecDeque::new(),
            queued: Vec::new(),
            checksum_offloads: 0,
            segmentation_offloads: 0,
            offload_errors: 0,
            wire: VecDeque::new(),
            in_ring: 0,
            ring_capacity: 256,
            large_frame_slots: 1,
            stats: Stats::default(),
            stopped: false,
            polls: 0,
            flushes: 0,
            last_poll_ns: 0,
            announce_requested: false,
            announces_done: 0,
            host: None,
            arms: 0,
            next_poll_ns: None,
        }));
        (
            FakeDevice {
                name: String::from(name),
                state: state.clone(),
            },
            FakeControl { state },
        )
    }

    /// Same as [`FakeDevice::new`], boxed for the bond.
    pub fn boxed(name: &str, mac: MacAddress) -> (Box<dyn NetDevice>, FakeControl) {
        let (device, control) = FakeDevice::new(name, mac);
        (Box::new(device), control)
    }
}

impl FakeControl {
    /// Makes the device ask for an announcement, as virtio-net does after a live migration.
    pub fn request_announce(&self) {
        self.state.borrow_mut().announce_requested = true;
    }

    /// Announcements the stack reported done through `announce_done`.
    pub fn announces_done(&self) -> u64 {
        self.state.borrow().announces_done
    }

    /// Sets the link state the device reports.
    pub fn set_link(&self, link: LinkState) {
        self.state.borrow_mut().link = link;
    }

    /// The link state the device reports.
    pub fn link(&self) -> LinkState {
        self.state.borrow().link
    }

    /// Changes the MAC the device reports (e.g. the PF assigned another one).
    pub fn set_mac(&self, mac: MacAddress) {
        self.state.borrow_mut().mac = mac;
    }

    /// Changes the MTU the device reports.
    pub fn set_mtu(&self, mtu: usize) {
        self.state.borrow_mut().capabilities.mtu = mtu;
    }

    /// Offers transmit checksum offload and, with `max_tso_size` > 0, segmentation of TCP frames
    /// whose IP packet is up to that size.
    pub fn set_offloads(&self, tx_checksum: bool, max_tso_size: usize) {
        let mut state = self.state.borrow_mut();
        state.capabilities.tx_checksum = tx_checksum;
        state.capabilities.max_tso_size = max_tso_size;
    }

    /// Frames sent with checksum offload, frames sent with segmentation offload, and requests
    /// that broke the contract.
    pub fn offload_counts(&self) -> (u64, u64, u64) {
        let state = self.state.borrow();
        (
            state.checksum_offloads,
            state.segmentation_offloads,
            state.offload_errors,
        )
    }

    /// Free ring slots a frame larger than the MTU needs; `can_transmit` only looks for one,
    /// as a driver that cannot know the next frame's size does.
    pub fn set_large_frame_slots(&self, slots: usize) {
        self.state.borrow_mut().large_frame_slots = slots.max(1);
    }

    /// Number of transmit ring slots.
    pub fn set_tx_ring_capacity(&self, slots: usize) {
        self.state.borrow_mut().ring_capacity = slots;
    }

    /// Queues a frame for the device to receive.
    pub fn inject_rx(&self, frame: &[u8]) {
        self.inject_rx_with(frame, RxMeta::default());
    }

    /// Queues a frame with receive metadata.
    pub fn inject_rx_with(&self, frame: &[u8], meta: RxMeta) {
        self.state.borrow_mut().rx.push_back((frame.to_vec(), meta));
    }

    /// Received frames not yet taken by the bond.
    pub fn rx_pending(&self) -> usize {
        self.state.borrow().rx.len()
    }

    /// Takes the frames that were flushed onto the wire.
    pub fn take_tx(&self) -> Vec<Vec<u8>> {
        self.state.borrow_mut().wire.drain(..).collect()
    }

    /// Frames queued but not yet flushed.
    pub fn unflushed_tx(&self) -> usize {
        self.state.borrow().queued.len()
    }

    /// Drops frames that are queued or flushed but not yet collected (a device that went away
    /// loses what was in its rings).
    pub fn lose_in_flight(&self) -> usize {
        let mut state = self.state.borrow_mut();
        let lost = state.queued.len() + state.wire.len();
        state.queued.clear();
        state.wire.clear();
        lost
    }

    /// The driver counters.
    pub fn stats(&self) -> Stats {
        self.state.borrow().stats
    }

    /// True once `stop` was called.
    pub fn is_stopped(&self) -> bool {
        self.state.borrow().stopped
    }

    /// How often `poll` and `flush` were called.
    pub fn poll_and_flush_counts(&self) -> (u64, u64) {
        let state = self.state.borrow();
        (state.polls, state.flushes)
    }

    /// The `now_ns` of the last `poll`.
    pub fn last_poll_ns(&self) -> u64 {
        self.state.borrow().last_poll_ns
    }

    /// How often the stack armed the device's interrupts before sleeping.
    pub fn arms(&self) -> u64 {
        self.state.borrow().arms
    }

    /// Makes the device ask to be polled at `at` (like a driver that deferred a check).
    pub fn set_next_poll(&self, at: Option<u64>) {
        self.state.borrow_mut().next_poll_ns = at;
    }
}

impl NetDevice for FakeDevice {
    fn name(&self) -> &str {
        &self.name
    }

    fn mac_address(&self) -> MacAddress {
        self.state.borrow().mac
    }

    fn capabilities(&self) -> Capabilities {
        self.state.borrow().capabilities
    }

    fn link_state(&self) -> LinkState {
        self.state.borrow().link
    }

    fn poll(&mut self, now_ns: u64) {
        let mut state = self.state.borrow_mut();
        state.polls += 1;
        state.last_poll_ns = now_ns;
        // Everything flushed has completed.
        state.in_ring = state.queued.len();
    }

    fn receive(&mut self, budget: usize, sink: &mut dyn FnMut(&[u8], RxMeta)) -> usize {
        let mut delivered = 0;
        while delivered < budget {
            // Release the borrow before calling the sink (it may be arbitrary code).
            let next = {
                let mut state = self.state.borrow_mut();
                if state.link == LinkState::Gone || state.stopped {
                    None
                } else {
                    state.rx.pop_front()
                }
            };
            let Some((frame, meta)) = next else { break };
            {
                let mut state = self.state.borrow_mut();
                state.stats.rx_frames += 1;
                state.stats.rx_bytes += frame.len() as u64;
            }
            sink(&frame, meta);
            delivered += 1;
        }
        delivered
    }

    fn can_transmit(&self) -> bool {
        let state = self.state.borrow();
        state.link == LinkState::Up && !state.stopped && state.in_ring < state.ring_capacity
    }

    fn transmit(
        &mut self,
        len: usize,
        fill: &mut dyn FnMut(&mut [u8]) -> TxMeta,
    ) -> Result<(), DeviceError> {
        {
            let mut state = self.state.borrow_mut();
            match state.link {
                LinkState::Gone => return Err(DeviceError::Gone),
                LinkState::Up if !state.stopped => {}
                _ => return Err(DeviceError::NotReady),
            }
            let max = (state.capabilities.mtu).max(state.capabilities.max_tso_size) + 14;
            if len > max {
                return Err(DeviceError::FrameTooLarge { len, max });
            }
            let needed = if len > state.capabilities.mtu + 14 {
                state.large_frame_slots
            } else {
                1
            };
            if state.in_ring + needed > state.ring_capacity {
                state.stats.tx_ring_full += 1;
                return Err(DeviceError::RingFull);
            }
            state.in_ring += 1;
        }
        let mut buffer = alloc::vec![0u8; len];
        let meta = fill(&mut buffer);
        let mut state = self.state.borrow_mut();
        if len > state.capabilities.mtu + 14 && meta.tso_mss.is_none() {
            state.in_ring -= 1;
            return Err(DeviceError::FrameTooLarge {
                len,
                max: state.capabilities.mtu + 14,
            });
        }
        state.queued.push((buffer, meta));
        Ok(())
    }

    fn arm_interrupts(&mut self) -> bool {
        // Like a driver that masks its interrupt while polled: frames that arrived since the
        // last poll raised none, so they must be reported here.
        let mut state = self.state.borrow_mut();
        state.arms += 1;
        !state.rx.is_empty()
    }

    fn next_poll_ns(&self) -> Option<u64> {
        self.state.borrow().next_poll_ns
    }

    fn flush(&mut self) {
        let mut state = self.state.borrow_mut();
        state.flushes += 1;
        let queued: Vec<(Vec<u8>, TxMeta)> = state.queued.drain(..).collect();
        for (frame, meta) in queued {
            let capabilities = state.capabilities;
            state.checksum_offloads += u64::from(meta.checksum.is_some());
            state.segmentation_offloads += u64::from(meta.tso_mss.is_some());
            match nic_output(frame, meta, capabilities) {
                Ok(frames) => {
                    for frame in frames {
                        state.stats.tx_frames += 1;
                        state.stats.tx_bytes += frame.len() as u64;
                        state.wire.push_back(frame);
                    }
                }
                Err(reason) => {
                    state.offload_errors += 1;
                    log::error!("fake NIC: dropped a frame: {reason}");
                }
            }
        }
    }

    fn stats(&self) -> Stats {
        self.state.borrow().stats
    }

    fn stop(&mut self) {
        let mut state = self.state.borrow_mut();
        state.stopped = true;
        state.queued.clear();
        state.in_ring = 0;
    }

    fn mark_gone(&mut self) {
        self.state.borrow_mut().link = LinkState::Gone;
    }

    fn take_announce_request(&mut self) -> bool {
        core::mem::take(&mut self.state.borrow_mut().announce_requested)
    }

    fn announce_done(&mut self) {
        self.state.borrow_mut().announces_done += 1;
    }

    fn host_data_path(&mut self) -> Option<&mut dyn HostDataPath> {
        if self.state.borrow().host.is_some() {
            Some(self)
        } else {
            None
        }
    }
}

impl HostDataPath for FakeDevice {
    fn state(&self) -> HostPath {
        self.state
            .borrow()
            .host
            .as_ref()
            .map_or(HostPath::Synthetic, |host| host.path)
    }

    fn vf_associated(&self) -> bool {
        self.state
            .borrow()
            .host
            .as_ref()
            .is_some_and(|host| host.associated)
    }

    fn request(&mut self, to_vf: bool) -> bool {
        let mut state = self.state.borrow_mut();
        let Some(host) = state.host.as_mut() else {
            return false;
        };
        if to_vf && !host.associated {
            return false;
        }
        host.requests.push(to_vf);
        host.path = match (to_vf, host.hold_completions) {
            (true, true) => HostPath::SwitchingToVf,
            (true, false) => HostPath::Vf,
            (false, true) => HostPath::SwitchingToSynthetic,
            (false, false) => HostPath::Synthetic,
        };
        true
    }
}

impl FakeControl {
    /// Makes the device a Hyper-V-style synthetic NIC whose host steers traffic, with a VF
    /// associated or not.
    pub fn enable_host_data_path(&self, associated: bool) {
        self.state.borrow_mut().host = Some(FakeHostPath {
            path: HostPath::Synthetic,
            associated,
            hold_completions: false,
            requests: Vec::new(),
        });
    }

    /// Holds switch completions back (a switch stays in flight) until
    /// [`FakeControl::complete_host_switch`].
    pub fn hold_host_switch_completions(&self, hold: bool) {
        if let Some(host) = self.state.borrow_mut().host.as_mut() {
            host.hold_completions = hold;
        }
    }

    /// Completes the switch in flight.
    pub fn complete_host_switch(&self) {
        if let Some(host) = self.state.borrow_mut().host.as_mut() {
            host.path = match host.path {
                HostPath::SwitchingToVf => HostPath::Vf,
                HostPath::SwitchingToSynthetic => HostPath::Synthetic,
                other => other,
            };
        }
    }

    /// The host moves the path back on its own; `withdraw` also ends the association.
    pub fn host_reverts(&self, withdraw: bool) {
        if let Some(host) = self.state.borrow_mut().host.as_mut() {
            host.path = HostPath::Synthetic;
            if withdraw {
                host.associated = false;
            }
        }
    }

    /// The host associates a VF again.
    pub fn host_associates(&self) {
        if let Some(host) = self.state.borrow_mut().host.as_mut() {
            host.associated = true;
        }
    }

    /// Switch requests the bond made (`true` = to the VF).
    pub fn host_switch_requests(&self) -> Vec<bool> {
        self.state
            .borrow()
            .host
            .as_ref()
            .map_or(Vec::new(), |host| host.requests.clone())
    }

    /// Where the host steers now.
    pub fn host_path(&self) -> Option<HostPath> {
        self.state.borrow().host.as_ref().map(|host| host.path)
    }
}

/// What the NIC puts on the wire for a frame and its offload requests.
fn nic_output(
    mut frame: Vec<u8>,
    meta: TxMeta,
    capabilities: Capabilities,
) -> Result<Vec<Vec<u8>>, &'static str> {
    let Some((start, offset)) = meta.checksum else {
        return match meta.tso_mss {
            Some(_) => Err("segmentation asked for without checksum offload"),
            None => Ok(alloc::vec![frame]),
        };
    };
    if !capabilities.tx_checksum {
        return Err("checksum offload asked for but not offered");
    }
    let (start, offset) = (usize::from(start), usize::from(offset));
    if start + offset + 2 > frame.len() {
        return Err("checksum field outside the frame");
    }
    let Some(mss) = meta.tso_mss else {
        complete_checksum(&mut frame, start, offset);
        return Ok(alloc::vec![frame]);
    };
    let mss = usize::from(mss);
    let ipv6 = frame[12..14] == [0x86, 0xdd];
    if mss == 0 || capabilities.max_tso_size == 0 || offset != 16 {
        return Err("segmentation of something that is not TCP, or not offered");
    }
    let field = start + offset;
    if frame[field..field + 2] != pseudo_header_sum(&frame, frame.len() - start) {
        return Err("TSO frame without the pseudo-header sum in its checksum field");
    }
    let headers = start + usize::from(frame[start + 12] >> 4) * 4;
    if headers > frame.len() {
        return Err("TCP header beyond the frame");
    }
    let chunks: Vec<&[u8]> = frame[headers..].chunks(mss).collect();
    let mut segments = Vec::new();
    for (number, chunk) in chunks.iter().enumerate() {
        let mut segment = frame[..headers].to_vec();
        segment.extend_from_slice(chunk);
        if ipv6 {
            let payload_len = (segment.len() - 54) as u16;
            segment[18..20].copy_from_slice(&payload_len.to_be_bytes());
        } else {
            let total_len = (segment.len() - 14) as u16;
            segment[16..18].copy_from_slice(&total_len.to_be_bytes());
            let ident = u16::from_be_bytes([segment[18], segment[19]]).wrapping_add(number as u16);
            segment[18..20].copy_from_slice(&ident.to_be_bytes());
            segment[24..26].fill(0);
            let ip_sum = !checksum::fold(checksum::add(0, &segment[14..start]));
            segment[24..26].copy_from_slice(&ip_sum.to_be_bytes());
        }
        let sequence = u32::from_be_bytes([
            segment[start + 4],
            segment[start + 5],
            segment[start + 6],
            segment[start + 7],
        ]);
        let sequence = sequence.wrapping_add((number * mss) as u32);
        segment[start + 4..start + 8].copy_from_slice(&sequence.to_be_bytes());
        if number + 1 < chunks.len() {
            segment[start + 13] &= !0x09; // FIN, PSH: last segment only
        }
        if number > 0 {
            segment[start + 13] &= !0x80; // CWR: first segment only
        }
        let pseudo = pseudo_header_sum(&segment, segment.len() - start);
        segment[field..field + 2].copy_from_slice(&pseudo);
        complete_checksum(&mut segment, start, offset);
        segments.push(segment);
    }
    Ok(segments)
}

/// The folded pseudo-header sum (IPv4 or IPv6) for an L4 part of `l4_len` bytes.
fn pseudo_header_sum(frame: &[u8], l4_len: usize) -> [u8; 2] {
    let length = (l4_len as u32).to_be_bytes();
    let sum = if frame[12..14] == [0x86, 0xdd] {
        let with_addresses = checksum::add(0, &frame[22..54]);
        checksum::add(with_addresses, &[0, 0, 0, frame[20]])
    } else {
        let with_addresses = checksum::add(0, &frame[26..34]);
        checksum::add(with_addresses, &[0, 0, 0, frame[23]])
    };
    checksum::fold(checksum::add(sum, &length)).to_be_bytes()
}

/// Sums from `start` to the end of the frame (the field holds the pseudo-header sum) and
/// stores the complement, as NICs do.
fn complete_checksum(frame: &mut [u8], start: usize, offset: usize) {
    let mut sum = !checksum::fold(checksum::add(0, &frame[start..]));
    if offset == 6 && sum == 0 {
        sum = 0xffff; // UDP sends a computed zero as all ones
    }
    frame[start + offset..start + offset + 2].copy_from_slice(&sum.to_be_bytes());
}
