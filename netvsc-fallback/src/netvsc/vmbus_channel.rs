//! [`NetvscChannel`] over an open [`vmbus::Channel`] plus the client operations a channel alone
//! cannot do (GPADLs, waiting for the host, rescind, close), supplied through
//! [`VmbusChannelControl`] by whoever owns the VMBus client (the kernel glue, or a test host).

use alloc::vec::Vec;

use net_device::DmaRegion;

use super::channel::{IncomingKind, IncomingPacket, NetvscChannel, OutgoingPacket, TransferRange};
use crate::error::Error;

/// The client-level operations netvsc needs for its channel.
pub trait VmbusChannelControl {
    /// Creates a GPADL for `region` on the channel `relid`, waiting (bounded) for the host's
    /// GPADL_CREATED, and returns its id.
    fn create_gpadl(&mut self, relid: u32, region: &DmaRegion) -> Result<u32, Error>;
    /// Tears the GPADL down, waiting (bounded) for GPADL_TORNDOWN.
    fn teardown_gpadl(&mut self, relid: u32, gpadl: u32) -> Result<(), Error>;
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

/// Counters of the adapter, beyond the channel's own ([`vmbus::ChannelCounters`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AdapterCounters {
    /// Packets of a kind netvsc never receives (GPA-direct from the host): dropped.
    pub unexpected_packets: u64,
}

/// A [`vmbus::Channel`] and its client, as one [`NetvscChannel`].
pub struct VmbusNetvscChannel<V: VmbusChannelControl> {
    /// `None` once closed.
    channel: Option<vmbus::Channel>,
    control: V,
    buffer: Vec<u8>,
    relid: u32,
    counters: AdapterCounters,
}

impl<V: VmbusChannelControl> VmbusNetvscChannel<V> {
    /// Wraps an opened channel and the client that opened it.
    pub fn new(channel: vmbus::Channel, control: V) -> Self {
        VmbusNetvscChannel {
            relid: channel.relid(),
            channel: Some(channel),
            control,
            buffer: Vec::new(),
            counters: AdapterCounters::default(),
        }
    }

    /// The channel's relid.
    pub fn relid(&self) -> u32 {
        self.relid
    }

    /// The adapter's counters.
    pub fn counters(&self) -> AdapterCounters {
        self.counters
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

fn channel_error(error: vmbus::Error) -> Error {
    if let vmbus::Error::Rescinded { .. } = error {
        return Error::ChannelRescinded;
    }
    log::warn!("netvsc: VMBus channel failed: {error}");
    Error::VmbusChannel {
        what: match error {
            vmbus::Error::RingCorrupt(_) => "ring corrupt",
            vmbus::Error::SignalEvent { .. } => "signal refused by the hypervisor",
            vmbus::Error::NotConnected => "VMBus not connected",
            _ => "channel operation failed",
        },
    }
}

impl<V: VmbusChannelControl> NetvscChannel for VmbusNetvscChannel<V> {
    fn try_send(&mut self, packet: &OutgoingPacket<'_>) -> Result<bool, Error> {
        if self.control.is_rescinded(self.relid) {
            return Err(Error::ChannelRescinded);
        }
        let Some(channel) = self.channel.as_mut() else {
            return Err(Error::ChannelRescinded);
        };
        let page_lists: Vec<vmbus::GpaDirectRange<'_>>;
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
                page_lists = ranges
                    .iter()
                    .map(|range| vmbus::GpaDirectRange {
                        byte_count: range.byte_count,
                        byte_offset: range.byte_offset,
                        pfns: range.page_numbers,
                    })
                    .collect();
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

    fn outgoing_free(&mut self) -> Result<usize, Error> {
        if self.control.is_rescinded(self.relid) {
            return Err(Error::ChannelRescinded);
        }
        let Some(channel) = self.channel.as_mut() else {
            return Err(Error::ChannelRescinded);
        };
        channel
            .outgoing_free()
            .map(|free| free as usize)
            .map_err(channel_error)
    }

    fn request_room_signal(&mut self, bytes: usize) -> Result<(), Error> {
        if self.control.is_rescinded(self.relid) {
            return Err(Error::ChannelRescinded);
        }
        let Some(channel) = self.channel.as_mut() else {
            return Err(Error::ChannelRescinded);
        };
        let bytes = u32::try_from(bytes).unwrap_or(u32::MAX);
        channel.set_pending_send_size(bytes).map_err(channel_error)
    }

    fn flush(&mut self) {
        // vmbus::Channel signals on the empty → non-empty transition of every send.
    }

    fn try_receive(&mut self, into: &mut IncomingPacket) -> Result<bool, Error> {
        self.control.process_host_messages(self.relid);
        if self.control.is_rescinded(self.relid) {
            return Err(Error::ChannelRescinded);
        }
        let Some(channel) = self.channel.as_mut() else {
            return Err(Error::ChannelRescinded);
        };
        loop {
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
                // Hosts never send netvsc GPA-direct data: a counted drop, and the next packet.
                vmbus::IncomingKind::GpaDirect { .. } => {
                    self.counters.unexpected_packets += 1;
                    log::warn!(
                        "netvsc: relid {}: dropped a GPA-direct packet from the host",
                        self.relid
                    );
                    continue;
                }
            };
            return Ok(true);
        }
    }

    fn create_gpadl(&mut self, region: &DmaRegion) -> Result<u32, Error> {
        self.control.create_gpadl(self.relid, region)
    }

    fn teardown_gpadl(&mut self, gpadl: u32) -> Result<(), Error> {
        self.control.teardown_gpadl(self.relid, gpadl)
    }

    fn now_ns(&self) -> u64 {
        self.control.now_ns()
    }

    fn wait(&mut self, deadline_ns: u64) {
        if self.control.is_rescinded(self.relid) {
            return;
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netvsc::GpaRange;
    use net_device::DmaAllocator;
    use net_device::heap_dma::HeapDmaAllocator;
    use std::collections::BTreeSet;
    use vmbus::guid::interface;
    use vmbus::testing::{FakeHost, FakeHostConfig, FakeHostPort, offer_message};
    use vmbus::{
        ChannelEvents, ClientConfig, ClientEvent, GpaDirectRange, HypervisorPort, OpenParams,
        TransferPageRange, VmbusClient,
    };

    const RELID: u32 = 3;
    const CONNECTION: u32 = 0x2003;

    /// The smallest control over a VMBus client: what a kernel or test host supplies.
    struct ClientControl {
        client: VmbusClient<FakeHostPort>,
        rescinded: BTreeSet<u32>,
        events: ChannelEvents,
        waits: u32,
    }

    impl ClientControl {
        fn pump(&mut self, relid: u32) -> bool {
            while let Some(event) = self.client.poll() {
                if let ClientEvent::Rescinded { relid } = event {
                    self.rescinded.insert(relid);
                }
            }
            self.client.take_channel_events(&mut self.events);
            self.events.take(relid)
        }
    }

    impl VmbusChannelControl for ClientControl {
        fn create_gpadl(&mut self, relid: u32, region: &DmaRegion) -> Result<u32, Error> {
            self.client
                .create_borrowed_gpadl(relid, region.phys(), region.len())
                .map_err(channel_error)
        }

        fn teardown_gpadl(&mut self, relid: u32, gpadl: u32) -> Result<(), Error> {
            self.client
                .teardown_borrowed_gpadl(relid, gpadl)
                .map_err(channel_error)
        }

        fn now_ns(&self) -> u64 {
            self.client.port().now_ns()
        }

        fn wait(&mut self, relid: u32, deadline_ns: u64) {
            self.waits += 1;
            while !self.pump(relid) && !self.rescinded.contains(&relid) {
                if self.client.port().now_ns() >= deadline_ns {
                    return;
                }
                self.client.port_mut().idle();
            }
        }

        fn is_rescinded(&self, relid: u32) -> bool {
            self.rescinded.contains(&relid)
        }

        fn process_host_messages(&mut self, relid: u32) {
            let _signalled = self.pump(relid);
        }

        fn close(&mut self, channel: vmbus::Channel) {
            self.client.close_channel(channel).unwrap();
        }
    }

    fn adapter() -> (
        FakeHost,
        VmbusNetvscChannel<ClientControl>,
        HeapDmaAllocator,
    ) {
        let (host, port) = FakeHost::new(FakeHostConfig {
            offers: vec![offer_message(interface::NETWORK, RELID, CONNECTION)],
            ..FakeHostConfig::default()
        });
        let config = ClientConfig {
            response_timeout_ns: 50_000_000,
            ..ClientConfig::default()
        };
        let mut client = VmbusClient::connect(port, config).unwrap();
        let dma = HeapDmaAllocator::new();
        let channel = client
            .open_channel(RELID, &OpenParams::new(2, 2), &dma)
            .unwrap();
        let control = ClientControl {
            client,
            rescinded: BTreeSet::new(),
            events: ChannelEvents::new(),
            waits: 0,
        };
        (host, VmbusNetvscChannel::new(channel, control), dma)
    }

    #[test]
    fn gpa_direct_packets_carry_every_range_the_driver_gives() {
        let (host, mut adapter, _dma) = adapter();
        let first = [0x1234u64, 0x1235];
        let second = [0x9000u64];
        let packet = OutgoingPacket::GpaDirect {
            transaction_id: 8,
            ranges: &[
                GpaRange {
                    byte_count: 5000,
                    byte_offset: 16,
                    page_numbers: &first,
                },
                GpaRange {
                    byte_count: 100,
                    byte_offset: 0,
                    page_numbers: &second,
                },
            ],
            payload: b"rndis packet",
        };
        let free_before = adapter.outgoing_free().unwrap();
        assert!(adapter.try_send(&packet).unwrap());
        assert_eq!(
            free_before - adapter.outgoing_free().unwrap(),
            packet.ring_len(),
            "ring_len is what the ring gives up"
        );
        let sent = host.read_outgoing(RELID);
        assert_eq!(sent.len(), 1);
        let packet = vmbus::IncomingPacket::parse(&sent[0]).unwrap();
        assert_eq!(packet.transaction_id, 8);
        assert!(packet.completion_requested, "GPA-direct always asks");
        assert!(matches!(
            packet.kind,
            vmbus::IncomingKind::GpaDirect { range_count: 2, .. }
        ));
        assert_eq!(&packet.payload[..12], b"rndis packet");
    }

    #[test]
    fn host_packets_arrive_in_the_driver_s_shapes_and_gpa_direct_ones_are_counted_drops() {
        let (host, mut adapter, _dma) = adapter();
        let pfns = [1u64];
        host.write_incoming(
            RELID,
            &vmbus::OutgoingPacket {
                kind: vmbus::OutgoingKind::GpaDirect(&[GpaDirectRange {
                    byte_count: 8,
                    byte_offset: 0,
                    pfns: &pfns,
                }]),
                transaction_id: 1,
                completion_requested: true,
                payload: &[&[0; 8]],
            },
        );
        let ranges = [
            TransferPageRange {
                byte_count: 60,
                byte_offset: 0,
            },
            TransferPageRange {
                byte_count: 1514,
                byte_offset: 4096,
            },
        ];
        host.write_incoming(
            RELID,
            &vmbus::OutgoingPacket {
                kind: vmbus::OutgoingKind::TransferPages {
                    set_id: 0xcafe,
                    ranges: &ranges,
                },
                transaction_id: 99,
                completion_requested: true,
                payload: &[&[1, 0, 0, 0, 0, 0, 0, 0]],
            },
        );
        host.write_incoming(
            RELID,
            &vmbus::OutgoingPacket::completion(7, &[&[2, 0, 0, 0, 1, 0, 0, 0]]),
        );
        let mut packet = IncomingPacket::default();
        assert!(adapter.try_receive(&mut packet).unwrap());
        assert_eq!(
            packet.kind,
            IncomingKind::TransferPages,
            "GPA-direct skipped"
        );
        assert_eq!(adapter.counters().unexpected_packets, 1);
        assert_eq!((packet.pageset_id, packet.transaction_id), (0xcafe, 99));
        assert_eq!(
            packet.ranges,
            [
                TransferRange {
                    byte_count: 60,
                    byte_offset: 0
                },
                TransferRange {
                    byte_count: 1514,
                    byte_offset: 4096
                }
            ]
        );
        assert!(adapter.try_receive(&mut packet).unwrap());
        assert_eq!(packet.kind, IncomingKind::Completion);
        assert!(packet.ranges.is_empty(), "no ranges left from the last one");
        assert!(!adapter.try_receive(&mut packet).unwrap(), "ring empty");
    }

    #[test]
    fn a_rescind_seen_while_receiving_stops_sends_and_waits() {
        let (host, mut adapter, _dma) = adapter();
        host.rescind(RELID);
        let mut packet = IncomingPacket::default();
        assert_eq!(
            adapter.try_receive(&mut packet),
            Err(Error::ChannelRescinded)
        );
        assert!(adapter.is_rescinded());
        assert_eq!(
            adapter.try_send(&OutgoingPacket::Completion {
                transaction_id: 1,
                payload: &[],
            }),
            Err(Error::ChannelRescinded)
        );
        let before = adapter.now_ns();
        adapter.wait(before + 1_000_000_000);
        assert_eq!(adapter.now_ns(), before, "no wait on a rescinded channel");
        adapter.close();
        assert_eq!(host.released(), [RELID], "relid released once closed");
    }

    #[test]
    fn a_wait_unmasks_and_returns_at_once_for_a_packet_already_in_the_ring() {
        let (host, mut adapter, dma) = adapter();
        adapter
            .channel
            .as_mut()
            .unwrap()
            .set_interrupt_mask(true)
            .unwrap();
        host.write_incoming(RELID, &vmbus::OutgoingPacket::in_band(2, false, &[&[5; 8]]));
        let before = adapter.now_ns();
        adapter.wait(before + 1_000_000_000);
        assert_eq!(adapter.now_ns(), before);
        assert_eq!(adapter.control().waits, 0, "the recheck found the packet");
        // Empty ring: the control's wait runs to the deadline.
        let mut packet = IncomingPacket::default();
        assert!(adapter.try_receive(&mut packet).unwrap());
        adapter.wait(before + 3_000_000);
        assert!(adapter.now_ns() >= before + 3_000_000);
        assert_eq!(adapter.control().waits, 1);
        // GPADLs go through the control; the memory stays the caller's.
        let mut region = dma.allocate(3 * 4096, 4096).unwrap();
        let gpadl = adapter.create_gpadl(&region).unwrap();
        assert_eq!(host.gpadl(gpadl).unwrap().byte_count, 3 * 4096);
        adapter.teardown_gpadl(gpadl).unwrap();
        assert!(host.gpadl(gpadl).is_none());
        assert!(region.write_bytes(0, b"still mine"));
    }
}
