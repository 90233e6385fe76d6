//! A scripted in-memory `NetDevice` for host tests of the bond, the stack and applications.
//!
//! [`FakeDevice::new`] returns the device (to hand to the bond as `Box<dyn NetDevice>`) and a
//! [`FakeControl`] through which the test sets the link state, injects received frames and
//! collects transmitted ones. Behaviour mirrors the driver contract in `net-device`:
//! * `transmit` fails with `NotReady` unless the link is `Up`, with `Gone` once gone, and with
//!   `RingFull` when the ring holds `tx_ring_capacity` frames not yet completed;
//! * frames become visible to [`FakeControl::take_tx`] only after `flush` (the doorbell), and
//!   their ring slots complete at the next `poll`;
//! * `receive` delivers injected frames (never when gone).

use alloc::boxed::Box;
use alloc::collections::VecDeque;
use alloc::rc::Rc;
use alloc::string::String;
use alloc::vec::Vec;
use core::cell::RefCell;

use net_device::{
    Capabilities, DeviceError, LinkState, MacAddress, NetDevice, RxMeta, Stats, TxMeta,
};

struct FakeState {
    mac: MacAddress,
    capabilities: Capabilities,
    link: LinkState,
    rx: VecDeque<(Vec<u8>, RxMeta)>,
    /// Queued by `transmit`, not yet flushed.
    queued: Vec<Vec<u8>>,
    /// Flushed: "on the wire", for the test to collect.
    wire: VecDeque<Vec<u8>>,
    /// Ring slots in use (queued or flushed but not completed by `poll`).
    in_ring: usize,
    ring_capacity: usize,
    stats: Stats,
    stopped: bool,
    polls: u64,
    flushes: u64,
    last_poll_ns: u64,
    /// The host asked for an announcement and the device has not handed the request over yet.
    announce_requested: bool,
    /// Announcements the stack reported done.
    announces_done: u64,
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
            wire: VecDeque::new(),
            in_ring: 0,
            ring_capacity: 256,
            stats: Stats::default(),
            stopped: false,
            polls: 0,
            flushes: 0,
            last_poll_ns: 0,
            announce_requested: false,
            announces_done: 0,
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
            let max = state.capabilities.mtu + 14;
            if len > max {
                return Err(DeviceError::FrameTooLarge { len, max });
            }
            if state.in_ring >= state.ring_capacity {
                state.stats.tx_ring_full += 1;
                return Err(DeviceError::RingFull);
            }
            state.in_ring += 1;
        }
        let mut buffer = alloc::vec![0u8; len];
        fill(&mut buffer);
        self.state.borrow_mut().queued.push(buffer);
        Ok(())
    }

    fn flush(&mut self) {
        let mut state = self.state.borrow_mut();
        state.flushes += 1;
        let queued: Vec<Vec<u8>> = state.queued.drain(..).collect();
        for frame in queued {
            state.stats.tx_frames += 1;
            state.stats.tx_bytes += frame.len() as u64;
            state.wire.push_back(frame);
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
}
