//! Our `vmbus::HypervisorPort` (the guest's view of SynIC and hypercalls) bridged to OpenVMM's
//! `vmcore::synic::SynicPortAccess` (the host's view), so our VMBus client talks to
//! `vmbus_server` exactly as it would to Hyper-V.
//!
//! [`SynicBridge`] is handed to `VmbusServer::builder`; [`BridgePort`] to `VmbusClient`. In
//! between: HvPostMessage = the server's message port for the connection id, HvSignalEvent = the
//! event port registered for the channel's connection id, messages the server posts to SINT 2
//! queue up for `poll_message`, and a channel interrupt sets its event flag (relid) for
//! `take_channel_events`. The server runs on its own thread; `idle` waits for its activity.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use hvdef::Vtl;
use inspect::Inspect;
use vmbus::hypervisor::{ChannelEvents, EventSignal, HvStatus, HypervisorPort};
use vmbus::protocol::{MAX_MESSAGE_SIZE, VMBUS_SINT};
use vmcore::interrupt::Interrupt;
use vmcore::synic::{
    EventPort, GuestEventPort, GuestMessagePort, HypervisorError, MessagePort, SynicPortAccess,
};

/// Counts of what crossed the bridge, for assertions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BridgeCounters {
    /// Messages the guest posted that a server port accepted.
    pub posted: u64,
    /// Posts the server pushed back on (retried by the client).
    pub back_pressure: u64,
    /// Messages the server posted to the guest's SINT 2.
    pub delivered: u64,
    /// Messages the server posted to another SINT (never seen by our client).
    pub other_sint: u64,
    /// Guest → host channel signals delivered to an event port.
    pub guest_signals: u64,
    /// Host → guest channel interrupts.
    pub host_interrupts: u64,
}

#[derive(Default)]
struct Shared {
    message_ports: Mutex<HashMap<u32, Arc<dyn MessagePort>>>,
    event_ports: Mutex<HashMap<u32, Arc<dyn EventPort>>>,
    inbox: Mutex<VecDeque<Vec<u8>>>,
    events: Mutex<ChannelEvents>,
    counters: Mutex<BridgeCounters>,
    /// (connection id, VMBus message type) of every message a server port accepted.
    posted: Mutex<Vec<(u32, u32)>>,
    /// Bumped (and waiters woken) whenever the host posts a message or raises an interrupt.
    activity: Mutex<u64>,
    wake: Condvar,
}

impl Shared {
    fn count(&self, update: impl FnOnce(&mut BridgeCounters)) {
        update(&mut self.counters.lock().unwrap());
    }

    fn notify(&self) {
        *self.activity.lock().unwrap() += 1;
        self.wake.notify_all();
    }
}

/// The host side: a `SynicPortAccess` for `VmbusServer::builder`.
#[derive(Clone, Default)]
pub struct SynicBridge {
    shared: Arc<Shared>,
}

impl SynicBridge {
    /// A bridge with no ports yet (the server registers them at `build()`).
    pub fn new() -> Self {
        Self::default()
    }

    /// The guest side, for `VmbusClient::connect`.
    pub fn guest_port(&self) -> BridgePort {
        BridgePort {
            shared: self.shared.clone(),
            start: Instant::now(),
        }
    }

    /// What crossed the bridge so far.
    pub fn counters(&self) -> BridgeCounters {
        *self.shared.counters.lock().unwrap()
    }

    /// (connection id, VMBus message type) of every message the guest posted that the server
    /// accepted, in order.
    pub fn posted_messages(&self) -> Vec<(u32, u32)> {
        self.shared.posted.lock().unwrap().clone()
    }

    /// Connection ids the server listens on for messages.
    pub fn message_connection_ids(&self) -> Vec<u32> {
        let mut ids: Vec<u32> = self
            .shared
            .message_ports
            .lock()
            .unwrap()
            .keys()
            .copied()
            .collect();
        ids.sort_unstable();
        ids
    }

    /// True while the server has an event port for `connection_id` (an open channel).
    pub fn has_event_port(&self, connection_id: u32) -> bool {
        self.shared
            .event_ports
            .lock()
            .unwrap()
            .contains_key(&connection_id)
    }
}

/// Unregisters a port when the server drops the handle `add_*_port` returned.
struct Registration {
    shared: Weak<Shared>,
    connection_id: u32,
    event: bool,
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some(shared) = self.shared.upgrade() {
            if self.event {
                shared
                    .event_ports
                    .lock()
                    .unwrap()
                    .remove(&self.connection_id);
            } else {
                shared
                    .message_ports
                    .lock()
                    .unwrap()
                    .remove(&self.connection_id);
            }
        }
    }
}

struct GuestMessages {
    shared: Arc<Shared>,
    sint: u8,
}

impl GuestMessagePort for GuestMessages {
    fn poll_post_message(&mut self, _cx: &mut Context<'_>, _typ: u32, payload: &[u8]) -> Poll<()> {
        if self.sint == VMBUS_SINT {
            self.shared
                .inbox
                .lock()
                .unwrap()
                .push_back(payload.to_vec());
            self.shared.count(|c| c.delivered += 1);
        } else {
            self.shared.count(|c| c.other_sint += 1);
        }
        self.shared.notify();
        Poll::Ready(())
    }

    fn set_target_vp(&mut self, _vp: u32) -> Result<(), HypervisorError> {
        Ok(())
    }
}

impl Inspect for GuestMessages {
    fn inspect(&self, req: inspect::Request<'_>) {
        req.ignore();
    }
}

struct GuestEvents {
    shared: Arc<Shared>,
    flag: u16,
}

impl GuestEventPort for GuestEvents {
    fn interrupt(&self) -> Interrupt {
        let shared = self.shared.clone();
        let flag = self.flag;
        Interrupt::from_fn(move || {
            shared.events.lock().unwrap().insert(u32::from(flag));
            shared.count(|c| c.host_interrupts += 1);
            shared.notify();
        })
    }

    fn set_target_vp(&mut self, _vp: u32) -> Result<(), HypervisorError> {
        Ok(())
    }
}

impl SynicPortAccess for SynicBridge {
    fn add_message_port(
        &self,
        connection_id: u32,
        _minimum_vtl: Vtl,
        port: Arc<dyn MessagePort>,
    ) -> Result<Box<dyn Sync + Send>, vmcore::synic::Error> {
        let mut ports = self.shared.message_ports.lock().unwrap();
        if ports.contains_key(&connection_id) {
            return Err(vmcore::synic::Error::ConnectionIdInUse(connection_id));
        }
        ports.insert(connection_id, port);
        Ok(Box::new(Registration {
            shared: Arc::downgrade(&self.shared),
            connection_id,
            event: false,
        }))
    }

    fn add_event_port(
        &self,
        connection_id: u32,
        _minimum_vtl: Vtl,
        port: Arc<dyn EventPort>,
        _monitor_info: Option<vmcore::synic::MonitorInfo>,
    ) -> Result<Box<dyn Sync + Send>, vmcore::synic::Error> {
        let mut ports = self.shared.event_ports.lock().unwrap();
        if ports.contains_key(&connection_id) {
            return Err(vmcore::synic::Error::ConnectionIdInUse(connection_id));
        }
        ports.insert(connection_id, port);
        Ok(Box::new(Registration {
            shared: Arc::downgrade(&self.shared),
            connection_id,
            event: true,
        }))
    }

    fn new_guest_message_port(
        &self,
        _vtl: Vtl,
        _vp: u32,
        sint: u8,
    ) -> Result<Box<dyn GuestMessagePort>, HypervisorError> {
        Ok(Box::new(GuestMessages {
            shared: self.shared.clone(),
            sint,
        }))
    }

    fn new_guest_event_port(
        &self,
        _port_id: u32,
        _vtl: Vtl,
        _vp: u32,
        _sint: u8,
        flag: u16,
        _monitor_info: Option<vmcore::synic::MonitorInfo>,
    ) -> Result<Box<dyn GuestEventPort>, HypervisorError> {
        Ok(Box::new(GuestEvents {
            shared: self.shared.clone(),
            flag,
        }))
    }

    fn prefer_os_events(&self) -> bool {
        false
    }
}

/// The guest side: our `HypervisorPort` over the bridge.
#[derive(Clone)]
pub struct BridgePort {
    shared: Arc<Shared>,
    start: Instant,
}

impl BridgePort {
    /// Waits (up to `timeout`) until the host posts a message or raises an interrupt, or
    /// returns at once if it did so since `seen`; returns the new activity count.
    pub fn wait_for_activity(&self, seen: u64, timeout: Duration) -> u64 {
        let guard = self.shared.activity.lock().unwrap();
        let (guard, _) = self
            .shared
            .wake
            .wait_timeout_while(guard, timeout, |count| *count == seen)
            .unwrap();
        *guard
    }

    /// The current activity count (see [`BridgePort::wait_for_activity`]).
    pub fn activity(&self) -> u64 {
        *self.shared.activity.lock().unwrap()
    }
}

impl EventSignal for BridgePort {
    fn signal_event(&self, connection_id: u32) -> Result<(), HvStatus> {
        let port = self
            .shared
            .event_ports
            .lock()
            .unwrap()
            .get(&connection_id)
            .cloned()
            .ok_or(HvStatus::INVALID_CONNECTION_ID)?;
        // The flag number is ignored by per-channel event ports (we signal with flag 0 like
        // mu_msvm).
        port.handle_event(0);
        self.shared.count(|c| c.guest_signals += 1);
        Ok(())
    }
}

impl HypervisorPort for BridgePort {
    fn post_message(&mut self, connection_id: u32, payload: &[u8]) -> Result<(), HvStatus> {
        if payload.len() > MAX_MESSAGE_SIZE {
            return Err(HvStatus::INVALID_PARAMETER);
        }
        let port = self
            .shared
            .message_ports
            .lock()
            .unwrap()
            .get(&connection_id)
            .cloned()
            .ok_or(HvStatus::INVALID_CONNECTION_ID)?;
        // Not trusted: this is not a hardware-isolated VM.
        match port.poll_handle_message(&mut Context::from_waker(Waker::noop()), payload, false) {
            Poll::Ready(()) => {
                self.shared.count(|c| c.posted += 1);
                let message_type = payload
                    .first_chunk::<4>()
                    .map_or(0, |bytes| u32::from_le_bytes(*bytes));
                self.shared
                    .posted
                    .lock()
                    .unwrap()
                    .push((connection_id, message_type));
                Ok(())
            }
            Poll::Pending => {
                self.shared.count(|c| c.back_pressure += 1);
                Err(HvStatus::INSUFFICIENT_BUFFERS)
            }
        }
    }

    fn signal_event(&self, connection_id: u32) -> Result<(), HvStatus> {
        EventSignal::signal_event(self, connection_id)
    }

    fn event_signal(&self) -> Arc<dyn EventSignal> {
        Arc::new(self.clone())
    }

    fn poll_message(&mut self, buffer: &mut [u8; MAX_MESSAGE_SIZE]) -> Option<usize> {
        let message = self.shared.inbox.lock().unwrap().pop_front()?;
        let len = message.len().min(MAX_MESSAGE_SIZE);
        buffer[..len].copy_from_slice(&message[..len]);
        Some(len)
    }

    fn take_channel_events(&mut self, events: &mut ChannelEvents) {
        let mut pending = self.shared.events.lock().unwrap();
        for relid in pending.iter() {
            events.insert(relid);
        }
        *pending = ChannelEvents::new();
    }

    fn vp_index(&self) -> u32 {
        0
    }

    fn now_ns(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    fn idle(&mut self) {
        let seen = self.activity();
        self.wait_for_activity(seen, Duration::from_millis(1));
    }
}
