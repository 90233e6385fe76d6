//! netvsc's `NetvscChannel` over the VMBus client: one opened channel plus the shared control
//! plane (GPADLs, rescind, host messages), pumped whenever the driver polls or waits.
//!
//! Generic over the hypervisor port, so the same adapter runs in the kernel (SynIC) and over a
//! fake or in-process host. The client is shared (`Rc<RefCell<_>>`) because the control plane
//! outlives and serves every channel; the kernel runs one event loop on one CPU.

use alloc::rc::Rc;
use alloc::vec::Vec;
use core::cell::RefCell;

use net_device::DmaRegion;
use netvsc_fallback::netvsc::{
    self, IncomingKind, NetvscChannel, NetvscError, OutgoingPacket, TransferRange,
};
use vmbus::client::{ClientEvent, GpadlBuffer, VmbusClient};
use vmbus::{Channel, ChannelEvents, Error as VmbusError, GpaDirectRange, HypervisorPort};

/// Counters of the adapter, beyond the client's and the channel's own.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AdapterCounters {
    /// Packets of a kind netvsc never receives (GPA-direct from the host): dropped.
    pub unexpected_packets: u64,
    /// Times the channel's event flag was found set.
    pub channel_events: u64,
    /// Offers that arrived after bring-up (hot-add), logged and left alone here.
    pub late_offers: u64,
    /// Rescinds seen.
    pub rescinds: u64,
}

/// The shared VMBus client.
pub type SharedClient<P> = Rc<RefCell<VmbusClient<P>>>;

/// One netvsc channel on the shared client.
pub struct VmbusNetvscChannel<P: HypervisorPort> {
    client: SharedClient<P>,
    relid: u32,
    /// `None` once closed.
    channel: Option<Channel>,
    /// GPADLs created for the driver's buffers, by id (the memory stays the driver's).
    gpadls: Vec<GpadlBuffer>,
    scratch: Vec<u8>,
    events: ChannelEvents,
    rescinded: bool,
    counters: AdapterCounters,
}

fn channel_error(error: VmbusError) -> NetvscError {
    match error {
        VmbusError::Rescinded { .. } => NetvscError::Rescinded,
        VmbusError::RingCorrupt(_) => NetvscError::Channel {
            what: "ring corrupt",
        },
        VmbusError::SignalEvent { .. } => NetvscError::Channel {
            what: "signal refused by the hypervisor",
        },
        VmbusError::NotConnected => NetvscError::Channel {
            what: "VMBus not connected",
        },
        _ => NetvscError::Channel {
            what: "VMBus operation failed",
        },
    }
}

/// A second handle on `region`'s frames, for the client's GPADL bookkeeping only.
fn gpadl_view(region: &DmaRegion) -> Option<DmaRegion> {
    let virt = core::ptr::NonNull::new(region.as_ptr())?;
    // SAFETY: the view has no release function, so dropping it (or the client quarantining it)
    // never frees the frames; the client only reads its physical address and length to list
    // the pages in GPADL messages and never accesses the memory through it (this adapter never
    // asks for `GpadlBuffer::memory`). The driver keeps owning the frames and frees them only
    // after a confirmed teardown (it leaks them otherwise), so the view never outlives them in
    // use.
    Some(unsafe { DmaRegion::from_raw(virt, region.phys(), region.len(), None) })
}

impl<P: HypervisorPort> VmbusNetvscChannel<P> {
    /// Wraps the opened `channel` (relid `relid`) of `client`.
    pub fn new(client: SharedClient<P>, relid: u32, channel: Channel) -> Self {
        VmbusNetvscChannel {
            client,
            relid,
            channel: Some(channel),
            gpadls: Vec::new(),
            scratch: Vec::new(),
            events: ChannelEvents::new(),
            rescinded: false,
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

    /// The channel's own counters, while it is open.
    pub fn channel_counters(&self) -> Option<vmbus::ChannelCounters> {
        self.channel.as_ref().map(Channel::counters)
    }

    /// The shared client.
    pub fn client(&self) -> &SharedClient<P> {
        &self.client
    }

    /// Processes host messages (rescinds, late offers) and clears our event flag. Returns
    /// true when the host signalled this channel since the last pump.
    fn pump(&mut self) -> bool {
        let mut client = self.client.borrow_mut();
        while let Some(event) = client.poll() {
            match event {
                ClientEvent::Rescinded { relid } => {
                    self.counters.rescinds += 1;
                    if relid == self.relid {
                        log::warn!("netvsc: relid {relid} rescinded by the host");
                        self.rescinded = true;
                    } else {
                        log::info!("vmbus: relid {relid} rescinded");
                    }
                }
                ClientEvent::Offer(offer) => {
                    self.counters.late_offers += 1;
                    log::info!(
                        "vmbus: late offer relid {} interface {} (not used yet)",
                        offer.relid,
                        offer.interface_id
                    );
                }
            }
        }
        // Taking the flags re-arms the hypervisor's interrupt for the next signal.
        client.take_channel_events(&mut self.events);
        if client.offer(self.relid).is_none() {
            self.rescinded = true;
        }
        drop(client);
        let signalled = self.events.take(self.relid);
        if signalled {
            self.counters.channel_events += 1;
        }
        // Flags of other channels are not ours to act on; forget them.
        self.events = ChannelEvents::new();
        signalled
    }
}

impl<P: HypervisorPort> NetvscChannel for VmbusNetvscChannel<P> {
    fn try_send(&mut self, packet: &OutgoingPacket<'_>) -> Result<bool, NetvscError> {
        if self.rescinded {
            return Err(NetvscError::Rescinded);
        }
        let channel = self.channel.as_mut().ok_or(NetvscError::Channel {
            what: "channel closed",
        })?;
        let ranges: Vec<GpaDirectRange<'_>>;
        let pieces: [&[u8]; 1];
        let outgoing = match *packet {
            OutgoingPacket::InBand {
                transaction_id,
                completion_requested,
                payload,
            } => {
                pieces = [payload];
                vmbus::OutgoingPacket::in_band(transaction_id, completion_requested, &pieces)
            }
            OutgoingPacket::Completion {
                transaction_id,
                payload,
            } => {
                pieces = [payload];
                vmbus::OutgoingPacket::completion(transaction_id, &pieces)
            }
            OutgoingPacket::GpaDirect {
                transaction_id,
                ranges: gpa_ranges,
                payload,
            } => {
                pieces = [payload];
                ranges = gpa_ranges
                    .iter()
                    .map(|range| GpaDirectRange {
                        byte_count: range.byte_count,
                        byte_offset: range.byte_offset,
                        pfns: range.page_numbers,
                    })
                    .collect();
                vmbus::OutgoingPacket {
                    kind: vmbus::OutgoingKind::GpaDirect(&ranges),
                    transaction_id,
                    completion_requested: true,
                    payload: &pieces,
                }
            }
        };
        match channel.send(&outgoing) {
            Ok(()) => Ok(true),
            Err(VmbusError::RingFull { .. }) => Ok(false),
            Err(error) => Err(channel_error(error)),
        }
    }

    fn flush(&mut self) {
        // `Channel::send` signals the host itself on the empty → non-empty transition.
    }

    fn try_receive(&mut self, into: &mut netvsc::IncomingPacket) -> Result<bool, NetvscError> {
        self.pump();
        if self.rescinded {
            return Err(NetvscError::Rescinded);
        }
        let channel = self.channel.as_mut().ok_or(NetvscError::Channel {
            what: "channel closed",
        })?;
        loop {
            let Some(packet) = channel.receive(&mut self.scratch).map_err(channel_error)? else {
                return Ok(false);
            };
            into.transaction_id = packet.transaction_id;
            into.completion_requested = packet.completion_requested;
            into.payload.clear();
            into.payload.extend_from_slice(packet.payload);
            into.ranges.clear();
            into.pageset_id = 0;
            match packet.kind {
                vmbus::IncomingKind::InBand => into.kind = IncomingKind::InBand,
                vmbus::IncomingKind::Completion => into.kind = IncomingKind::Completion,
                vmbus::IncomingKind::TransferPages { set_id, ranges } => {
                    into.kind = IncomingKind::TransferPages;
                    into.pageset_id = set_id;
                    into.ranges.extend(ranges.iter().map(|range| TransferRange {
                        byte_count: range.byte_count,
                        byte_offset: range.byte_offset,
                    }));
                }
                vmbus::IncomingKind::GpaDirect { .. } => {
                    self.counters.unexpected_packets += 1;
                    log::warn!(
                        "netvsc: relid {}: dropped a GPA-direct packet from the host",
                        self.relid
                    );
                    continue;
                }
            }
            return Ok(true);
        }
    }

    fn create_gpadl(&mut self, region: &DmaRegion) -> Result<u32, NetvscError> {
        let view = gpadl_view(region).ok_or(NetvscError::Channel {
            what: "GPADL of an empty region",
        })?;
        let buffer = self
            .client
            .borrow_mut()
            .create_gpadl(self.relid, view)
            .map_err(channel_error)?;
        let id = buffer.id();
        self.gpadls.push(buffer);
        Ok(id)
    }

    fn teardown_gpadl(&mut self, gpadl: u32) -> Result<(), NetvscError> {
        let index = self
            .gpadls
            .iter()
            .position(|buffer| buffer.id() == gpadl)
            .ok_or(NetvscError::Channel {
                what: "teardown of an unknown GPADL",
            })?;
        let buffer = self.gpadls.swap_remove(index);
        // The returned view is dropped without freeing anything; the driver frees the frames.
        self.client
            .borrow_mut()
            .teardown_gpadl(buffer)
            .map(drop)
            .map_err(channel_error)
    }

    fn now_ns(&self) -> u64 {
        self.client.borrow().port().now_ns()
    }

    fn wait(&mut self, deadline_ns: u64) {
        loop {
            if self.pump() || self.rescinded {
                return;
            }
            let Some(channel) = self.channel.as_mut() else {
                return;
            };
            // Unmask the host's signal, then look again before sleeping, so a packet written
            // in between is not slept through (ring protocol, reference §2.4).
            let _ = channel.set_interrupt_mask(false);
            if channel.has_incoming().unwrap_or(true) {
                return;
            }
            let mut client = self.client.borrow_mut();
            if client.port().now_ns() >= deadline_ns {
                return;
            }
            client.port_mut().idle();
        }
    }

    fn is_rescinded(&self) -> bool {
        self.rescinded
    }

    fn close(&mut self) {
        if let Some(channel) = self.channel.take()
            && let Err(error) = self.client.borrow_mut().close_channel(channel)
        {
            log::warn!(
                "netvsc: closing relid {}: {error} (ring memory kept)",
                self.relid
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use net_device::DmaAllocator;
    use net_device::heap_dma::HeapDmaAllocator;
    use netvsc_fallback::netvsc::GpaRange;
    use vmbus::guid::interface;
    use vmbus::ring::{ReadStatus, RingGeometry, RingReader, RingWriter};
    use vmbus::testing::{FakeHost, FakeHostConfig, FakeHostPort, offer_message};
    use vmbus::{ClientConfig, OpenParams, TransferPageRange};

    const RELID: u32 = 3;
    const CONNECTION: u32 = 0x2003;

    fn adapter() -> (FakeHost, VmbusNetvscChannel<FakeHostPort>, HeapDmaAllocator) {
        let (host, port) = FakeHost::new(FakeHostConfig {
            offers: alloc::vec![offer_message(interface::NETWORK, RELID, CONNECTION)],
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
        let client = Rc::new(RefCell::new(client));
        (host, VmbusNetvscChannel::new(client, RELID, channel), dma)
    }

    /// What the host reads from our outgoing ring.
    fn host_reads(host: &FakeHost) -> Vec<Vec<u8>> {
        let (mut memory, downstream) = host.channel_memory(RELID).unwrap();
        let mut reader =
            RingReader::new(&mut memory, RingGeometry::new(0, downstream).unwrap()).unwrap();
        let mut packets = Vec::new();
        let mut bytes = Vec::new();
        while let ReadStatus::Packet { .. } = reader.read(&mut memory, &mut bytes).unwrap() {
            packets.push(bytes.clone());
        }
        packets
    }

    /// Writes `packet` into our incoming ring as the host.
    fn host_writes(host: &FakeHost, packet: &vmbus::OutgoingPacket<'_>) {
        let (mut memory, downstream) = host.channel_memory(RELID).unwrap();
        let total = memory.len();
        let geometry = RingGeometry::new(downstream, total - downstream).unwrap();
        let mut writer = RingWriter::new(&mut memory, geometry).unwrap();
        writer.write(&mut memory, packet).unwrap();
    }

    #[test]
    fn packets_cross_both_rings_in_the_driver_s_shapes() {
        let (host, mut adapter, _dma) = adapter();
        assert!(
            adapter
                .try_send(&OutgoingPacket::InBand {
                    transaction_id: 7,
                    completion_requested: true,
                    payload: b"nvsp init",
                })
                .unwrap()
        );
        let pages = [0x1234u64, 0x1235];
        assert!(
            adapter
                .try_send(&OutgoingPacket::GpaDirect {
                    transaction_id: 8,
                    ranges: &[GpaRange {
                        byte_count: 5000,
                        byte_offset: 16,
                        page_numbers: &pages,
                    }],
                    payload: b"rndis packet",
                })
                .unwrap()
        );
        let sent = host_reads(&host);
        assert_eq!(sent.len(), 2);
        let first = vmbus::IncomingPacket::parse(&sent[0]).unwrap();
        assert_eq!(first.transaction_id, 7);
        assert!(first.completion_requested);
        assert_eq!(&first.payload[..9], b"nvsp init");
        let second = vmbus::IncomingPacket::parse(&sent[1]).unwrap();
        assert!(matches!(
            second.kind,
            vmbus::IncomingKind::GpaDirect { range_count: 1, .. }
        ));
        assert_eq!(&second.payload[..12], b"rndis packet");

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
        host_writes(
            &host,
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
        host_writes(
            &host,
            &vmbus::OutgoingPacket::completion(7, &[&[2, 0, 0, 0, 1, 0, 0, 0]]),
        );
        let mut packet = netvsc::IncomingPacket::default();
        assert!(adapter.try_receive(&mut packet).unwrap());
        assert_eq!(packet.kind, IncomingKind::TransferPages);
        assert_eq!(packet.pageset_id, 0xcafe);
        assert_eq!(packet.transaction_id, 99);
        assert!(packet.completion_requested);
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
        assert!(
            packet.ranges.is_empty(),
            "no ranges left from the last packet"
        );
        assert_eq!(&packet.payload[..8], &[2, 0, 0, 0, 1, 0, 0, 0]);
        assert!(!adapter.try_receive(&mut packet).unwrap(), "ring empty");
    }

    #[test]
    fn a_gpa_direct_packet_from_the_host_is_a_counted_drop() {
        let (host, mut adapter, _dma) = adapter();
        let pfns = [1u64];
        host_writes(
            &host,
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
        host_writes(&host, &vmbus::OutgoingPacket::in_band(2, false, &[&[5; 8]]));
        let mut packet = netvsc::IncomingPacket::default();
        assert!(adapter.try_receive(&mut packet).unwrap());
        assert_eq!(packet.transaction_id, 2, "the bad packet was skipped");
        assert_eq!(adapter.counters().unexpected_packets, 1);
    }

    #[test]
    fn gpadls_name_the_driver_s_pages_and_leave_the_memory_with_the_driver() {
        let (host, mut adapter, dma) = adapter();
        let mut region = dma.allocate(40 * 4096, 4096).unwrap();
        let gpadl = adapter.create_gpadl(&region).unwrap();
        let described = host.gpadl(gpadl).unwrap();
        assert_eq!(described.relid, RELID);
        assert_eq!(described.byte_count, 40 * 4096);
        let first = region.phys().0 / 4096;
        assert_eq!(described.pfns, (first..first + 40).collect::<Vec<_>>());
        assert!(described.bodies >= 1, "40 pages need a GPADL_BODY");
        adapter.teardown_gpadl(gpadl).unwrap();
        assert!(host.gpadl(gpadl).is_none());
        // The driver still owns its memory and can use it.
        assert!(region.write_bytes(0, b"still mine"));
        assert!(matches!(
            adapter.teardown_gpadl(gpadl),
            Err(NetvscError::Channel { .. })
        ));
    }

    #[test]
    fn a_rescind_stops_the_channel_and_close_gives_the_rings_back() {
        let (host, mut adapter, _dma) = adapter();
        assert!(!adapter.is_rescinded());
        host.rescind(RELID);
        let mut packet = netvsc::IncomingPacket::default();
        assert_eq!(
            adapter.try_receive(&mut packet),
            Err(NetvscError::Rescinded)
        );
        assert!(adapter.is_rescinded());
        assert_eq!(
            adapter.try_send(&OutgoingPacket::Completion {
                transaction_id: 1,
                payload: &[],
            }),
            Err(NetvscError::Rescinded)
        );
        adapter.close();
        assert_eq!(host.closed(), [RELID]);
        assert_eq!(host.released(), [RELID], "relid released once closed");
    }

    #[test]
    fn waits_end_at_the_deadline_or_when_the_host_signals() {
        let (host, mut adapter, _dma) = adapter();
        let start = adapter.now_ns();
        adapter.wait(start + 5_000_000);
        let waited = adapter.now_ns() - start;
        assert!(
            (5_000_000..6_000_000).contains(&waited),
            "bounded by the deadline: {waited} ns"
        );
        host.raise_event(RELID);
        let start = adapter.now_ns();
        adapter.wait(start + 1_000_000_000);
        assert_eq!(adapter.now_ns(), start, "the signal ends the wait at once");
        assert_eq!(adapter.counters().channel_events, 1);
    }
}
