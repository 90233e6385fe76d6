//! [`NetvscChannel`] over an open [`vmbus::Channel`] plus the client operations a channel alone
//! cannot do (GPADLs, waiting for the host, rescind, close), supplied through
//! [`VmbusChannelControl`]: by [`SharedVmbusClient`] (the kernel's [`vmbus::VmbusClient`],
//! shared with the other drivers on the bus) or by a test host.

use alloc::collections::{BTreeSet, VecDeque};
use alloc::rc::Rc;
use alloc::vec::Vec;
use core::borrow::Borrow;
use core::cell::RefCell;

use net_device::DmaRegion;
use vmbus::{ChannelEvents, ClientEvent, HypervisorPort, VmbusClient};

use super::channel::{
    GpadlBuffer, IncomingKind, IncomingPacket, NetvscChannel, OutgoingPacket, TransferRange,
};
use super::error::NetvscError;

/// The client-level operations netvsc needs for its channel.
pub trait VmbusChannelControl {
    /// A buffer behind a GPADL.
    type Buffer: GpadlBuffer;
    /// Creates a GPADL for `region` on the channel `relid`, waiting (bounded) for the host's
    /// GPADL_CREATED. On failure the control keeps or frees the memory as is safe.
    fn create_gpadl(&mut self, relid: u32, region: DmaRegion) -> Result<Self::Buffer, NetvscError>;
    /// Tears the GPADL down, waiting (bounded) for GPADL_TORNDOWN, and returns the memory.
    fn teardown_gpadl(&mut self, buffer: Self::Buffer) -> Result<DmaRegion, NetvscError>;
    /// Monotonic time in nanoseconds.
    fn now_ns(&self) -> u64;
    /// Waits until the host signals `relid` or `deadline_ns` passes; may return early.
    fn wait(&mut self, relid: u32, deadline_ns: u64);
    /// True once the host rescinded `relid`.
    fn is_rescinded(&self, relid: u32) -> bool;
    /// Closes the channel (CLOSECHANNEL, ring GPADL teardown) and disposes of its rings.
    fn close(&mut self, channel: vmbus::Channel);
}

/// A [`vmbus::Channel`] and its client, as one [`NetvscChannel`].
pub struct VmbusNetvscChannel<V: VmbusChannelControl> {
    channel: Option<vmbus::Channel>,
    relid: u32,
    control: V,
    buffer: Vec<u8>,
}

impl<V: VmbusChannelControl> VmbusNetvscChannel<V> {
    /// Wraps an opened channel and the client that opened it.
    pub fn new(channel: vmbus::Channel, control: V) -> Self {
        VmbusNetvscChannel {
            relid: channel.relid(),
            channel: Some(channel),
            control,
            buffer: Vec::new(),
        }
    }

    /// The VMBus channel (counters, ids); `None` once closed.
    pub fn channel(&self) -> Option<&vmbus::Channel> {
        self.channel.as_ref()
    }

    /// The client side.
    pub fn control(&self) -> &V {
        &self.control
    }

    /// The client side, mutably.
    pub fn control_mut(&mut self) -> &mut V {
        &mut self.control
    }
}

fn channel_error(error: vmbus::Error) -> NetvscError {
    log::warn!("netvsc: VMBus channel failed: {error}");
    NetvscError::Channel {
        what: match error {
            vmbus::Error::RingCorrupt(_) => "ring corrupt",
            _ => "channel operation failed",
        },
    }
}

impl<V: VmbusChannelControl> NetvscChannel for VmbusNetvscChannel<V> {
    type Buffer = V::Buffer;

    fn try_send(&mut self, packet: &OutgoingPacket<'_>) -> Result<bool, NetvscError> {
        if self.control.is_rescinded(self.relid) {
            return Err(NetvscError::Rescinded);
        }
        let Some(channel) = self.channel.as_mut() else {
            return Err(NetvscError::Rescinded);
        };
        let mut page_lists: [vmbus::GpaDirectRange<'_>; 1] = [vmbus::GpaDirectRange {
            byte_count: 0,
            byte_offset: 0,
            pfns: &[],
        }];
        let (kind, transaction_id, completion_requested, payload) = match *packet {
            OutgoingPacket::InBand {
                transaction_id,
                completion_requested,
                payload,
            } => (
                vmbus::OutgoingKind::InBand,
                transaction_id,
                completion_requested,
                payload,
            ),
            OutgoingPacket::Completion {
                transaction_id,
                payload,
            } => (
                vmbus::OutgoingKind::Completion,
                transaction_id,
                false,
                payload,
            ),
            OutgoingPacket::GpaDirect {
                transaction_id,
                ranges,
                payload,
            } => {
                // netvsc sends one range per packet (one contiguous buffer).
                let [range] = ranges else {
                    return Err(NetvscError::Channel {
                        what: "GPA-direct packets carry exactly one range",
                    });
                };
                page_lists[0] = vmbus::GpaDirectRange {
                    byte_count: range.byte_count,
                    byte_offset: range.byte_offset,
                    pfns: range.page_numbers,
                };
                (
                    vmbus::OutgoingKind::GpaDirect(&page_lists),
                    transaction_id,
                    true,
                    payload,
                )
            }
        };
        let pieces = [payload];
        let outgoing = vmbus::OutgoingPacket {
            kind,
            transaction_id,
            completion_requested,
            payload: &pieces,
        };
        match channel.send(&outgoing) {
            Ok(()) => Ok(true),
            Err(vmbus::Error::RingFull { .. }) => Ok(false),
            Err(error) => Err(channel_error(error)),
        }
    }

    fn flush(&mut self) {
        // vmbus::Channel signals on the empty → non-empty transition of every send.
    }

    fn try_receive(&mut self, into: &mut IncomingPacket) -> Result<bool, NetvscError> {
        let Some(channel) = self.channel.as_mut() else {
            return Err(NetvscError::Rescinded);
        };
        let packet = match channel.receive(&mut self.buffer) {
            Ok(Some(packet)) => packet,
            Ok(None) => return Ok(false),
            Err(error) => return Err(channel_error(error)),
        };
        into.transaction_id = packet.transaction_id;
        into.completion_requested = packet.completion_requested;
        into.payload.clear();
        into.payload.extend_from_slice(packet.payload);
        into.ranges.clear();
        into.pageset_id = 0;
        into.kind = match packet.kind {
            vmbus::IncomingKind::InBand => IncomingKind::InBand,
            vmbus::IncomingKind::Completion => IncomingKind::Completion,
            vmbus::IncomingKind::TransferPages { set_id, ranges } => {
                into.pageset_id = set_id;
                into.ranges.extend(ranges.iter().map(|range| TransferRange {
                    byte_count: range.byte_count,
                    byte_offset: range.byte_offset,
                }));
                IncomingKind::TransferPages
            }
            // Hosts never send netvsc GPA-direct data: it reaches the driver as an in-band
            // message without payload, which it counts as malformed (and completes if asked).
            vmbus::IncomingKind::GpaDirect { .. } => {
                into.payload.clear();
                IncomingKind::InBand
            }
        };
        Ok(true)
    }

    fn create_gpadl(&mut self, region: DmaRegion) -> Result<Self::Buffer, NetvscError> {
        self.control.create_gpadl(self.relid, region)
    }

    fn teardown_gpadl(&mut self, buffer: Self::Buffer) -> Result<DmaRegion, NetvscError> {
        self.control.teardown_gpadl(buffer)
    }

    fn now_ns(&self) -> u64 {
        self.control.now_ns()
    }

    fn wait(&mut self, deadline_ns: u64) {
        if let Some(channel) = self.channel.as_mut() {
            // Unmask, then look again before sleeping: a packet published between the last
            // read and the unmask would otherwise raise no signal.
            let _ = channel.set_interrupt_mask(false);
            if channel.has_incoming().unwrap_or(true) {
                return;
            }
        }
        self.control.wait(self.relid, deadline_ns);
    }

    fn is_rescinded(&self) -> bool {
        self.control.is_rescinded(self.relid)
    }

    fn close(&mut self) {
        if let Some(channel) = self.channel.take() {
            self.control.close(channel);
        }
    }
}

/// A buffer behind a GPADL of the kernel's [`VmbusClient`].
#[derive(Debug)]
pub struct ClientGpadl(vmbus::client::GpadlBuffer);

impl Borrow<DmaRegion> for ClientGpadl {
    fn borrow(&self) -> &DmaRegion {
        self.0.memory()
    }
}

impl GpadlBuffer for ClientGpadl {
    fn gpadl_id(&self) -> u32 {
        self.0.id()
    }
}

struct SharedState<P: HypervisorPort> {
    client: VmbusClient<P>,
    /// Channel event flags taken from the port and not yet claimed by their channel's owner.
    events: ChannelEvents,
    /// Relids the host rescinded.
    rescinded: BTreeSet<u32>,
    /// Client events for the owner of the bus (hot-added offers, rescinds).
    client_events: VecDeque<ClientEvent>,
}

/// The kernel's VMBus client, shared by the drivers of its channels (single-threaded, like the
/// kernel). Waiting drivers keep the bus serviced: messages are processed, rescinds noted and
/// other channels' event flags kept for their owners.
pub struct SharedVmbusClient<P: HypervisorPort> {
    state: Rc<RefCell<SharedState<P>>>,
}

impl<P: HypervisorPort> Clone for SharedVmbusClient<P> {
    fn clone(&self) -> Self {
        SharedVmbusClient {
            state: self.state.clone(),
        }
    }
}

impl<P: HypervisorPort> SharedVmbusClient<P> {
    /// Shares a connected client.
    pub fn new(client: VmbusClient<P>) -> Self {
        SharedVmbusClient {
            state: Rc::new(RefCell::new(SharedState {
                client,
                events: ChannelEvents::new(),
                rescinded: BTreeSet::new(),
                client_events: VecDeque::new(),
            })),
        }
    }

    /// Runs `f` with the client (to open channels, read offers…).
    pub fn with_client<T>(&self, f: impl FnOnce(&mut VmbusClient<P>) -> T) -> T {
        f(&mut self.state.borrow_mut().client)
    }

    /// Processes host messages; returns the next client event for the bus owner (rescinds are
    /// also remembered for the affected channel's driver).
    pub fn poll(&self) -> Option<ClientEvent> {
        let mut state = self.state.borrow_mut();
        state.pump();
        state.client_events.pop_front()
    }

    /// Takes the event flag of `relid` (true when its rings have activity).
    pub fn take_channel_event(&self, relid: u32) -> bool {
        let mut state = self.state.borrow_mut();
        let SharedState { client, events, .. } = &mut *state;
        client.take_channel_events(events);
        events.take(relid)
    }
}

impl<P: HypervisorPort> SharedState<P> {
    fn pump(&mut self) {
        while let Some(event) = self.client.poll() {
            if let ClientEvent::Rescinded { relid } = event {
                self.rescinded.insert(relid);
            }
            self.client_events.push_back(event);
        }
    }
}

fn client_error(error: vmbus::Error) -> NetvscError {
    log::warn!("netvsc: VMBus client: {error}");
    NetvscError::Channel {
        what: match error {
            vmbus::Error::GpadlRefused { .. } => "GPADL refused",
            _ => "VMBus control request failed",
        },
    }
}

impl<P: HypervisorPort> VmbusChannelControl for SharedVmbusClient<P> {
    type Buffer = ClientGpadl;

    fn create_gpadl(&mut self, relid: u32, region: DmaRegion) -> Result<ClientGpadl, NetvscError> {
        let mut state = self.state.borrow_mut();
        // The client keeps the memory if the host might hold part of the GPADL.
        let result = state.client.create_gpadl(relid, region);
        result.map(ClientGpadl).map_err(client_error)
    }

    fn teardown_gpadl(&mut self, buffer: ClientGpadl) -> Result<DmaRegion, NetvscError> {
        let mut state = self.state.borrow_mut();
        let result = state.client.teardown_gpadl(buffer.0);
        result.map_err(client_error)
    }

    fn now_ns(&self) -> u64 {
        RefCell::borrow(&self.state).client.port().now_ns()
    }

    fn wait(&mut self, relid: u32, deadline_ns: u64) {
        let mut state = self.state.borrow_mut();
        loop {
            state.pump();
            let SharedState { client, events, .. } = &mut *state;
            client.take_channel_events(events);
            if events.take(relid) || state.rescinded.contains(&relid) {
                return;
            }
            if state.client.port().now_ns() >= deadline_ns {
                return;
            }
            state.client.port_mut().idle();
        }
    }

    fn is_rescinded(&self, relid: u32) -> bool {
        RefCell::borrow(&self.state).rescinded.contains(&relid)
    }

    fn close(&mut self, channel: vmbus::Channel) {
        let mut state = self.state.borrow_mut();
        // On failure the client keeps the ring memory (quarantine); nothing else to do here.
        if let Err(error) = state.client.close_channel(channel) {
            log::warn!("netvsc: closing the channel failed: {error}");
        }
    }
}
