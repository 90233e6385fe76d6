//! [`NetvscChannel`] over an open [`vmbus::Channel`] plus the client operations a channel alone
//! cannot do (GPADLs, waiting for the host, rescind, close), supplied through
//! [`VmbusChannelControl`] by whoever owns the VMBus client (the kernel glue, or a test host).

use alloc::vec::Vec;

use net_device::DmaRegion;

use super::channel::{IncomingKind, IncomingPacket, NetvscChannel, OutgoingPacket, TransferRange};
use super::error::NetvscError;

/// The client-level operations netvsc needs for its channel.
pub trait VmbusChannelControl {
    /// Creates a GPADL for `region` on the channel `relid`, waiting (bounded) for the host's
    /// GPADL_CREATED, and returns its id.
    fn create_gpadl(&mut self, relid: u32, region: &DmaRegion) -> Result<u32, NetvscError>;
    /// Tears the GPADL down, waiting (bounded) for GPADL_TORNDOWN.
    fn teardown_gpadl(&mut self, relid: u32, gpadl: u32) -> Result<(), NetvscError>;
    /// Monotonic time in nanoseconds.
    fn now_ns(&self) -> u64;
    /// Waits until the host signals `relid` or `deadline_ns` passes; may return early.
    fn wait(&mut self, relid: u32, deadline_ns: u64);
    /// True once the host rescinded `relid`.
    fn is_rescinded(&self, relid: u32) -> bool;
    /// Processes the host's pending control messages (a rescind among them) without waiting.
    /// Called before every receive, so a rescind is noticed while the datapath runs, not only
    /// inside a blocking wait.
    fn process_host_messages(&mut self, relid: u32);
    /// Closes the channel (CLOSECHANNEL, ring GPADL teardown) and disposes of its rings (kept,
    /// never freed, if the host may still use them).
    fn close(&mut self, channel: vmbus::Channel);
}

/// A [`vmbus::Channel`] and its client, as one [`NetvscChannel`].
pub struct VmbusNetvscChannel<V: VmbusChannelControl> {
    /// `None` once closed.
    channel: Option<vmbus::Channel>,
    control: V,
    buffer: Vec<u8>,
    relid: u32,
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
        self.control.process_host_messages(self.relid);
        if self.control.is_rescinded(self.relid) {
            return Err(NetvscError::Rescinded);
        }
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
            // Hosts never send netvsc GPA-direct data; treat it as an (ignored) in-band message
            // with an empty payload so it is counted and completed if asked.
            vmbus::IncomingKind::GpaDirect { .. } => {
                into.payload.clear();
                IncomingKind::InBand
            }
        };
        Ok(true)
    }

    fn create_gpadl(&mut self, region: &DmaRegion) -> Result<u32, NetvscError> {
        self.control.create_gpadl(self.relid, region)
    }

    fn teardown_gpadl(&mut self, gpadl: u32) -> Result<(), NetvscError> {
        self.control.teardown_gpadl(self.relid, gpadl)
    }

    fn now_ns(&self) -> u64 {
        self.control.now_ns()
    }

    fn wait(&mut self, deadline_ns: u64) {
        // Unmask, then look again before sleeping: a packet published between the last read
        // and the unmask would otherwise raise no signal.
        if let Some(channel) = self.channel.as_mut() {
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
