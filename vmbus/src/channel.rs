//! An open channel: its two rings, its relid and connection id, and a signalling handle, so a
//! driver can own it and run without the client object.

use crate::error::{Error, RingCorruption};
use crate::hypervisor::EventSignal;
use crate::packet::{IncomingPacket, OutgoingPacket};
use crate::ring::{PAGE_SIZE, ReadStatus, RingGeometry, RingReader, RingWriter};
use alloc::sync::Arc;
use alloc::vec::Vec;
use net_device::DmaRegion;

/// Most malformed packets one [`Channel::receive`] skips before returning, so a host writing
/// garbage as fast as we read cannot keep the caller in the loop.
pub const MAX_SKIPPED_PER_RECEIVE: usize = 64;

/// What the host knows a channel by.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct ChannelIds {
    /// The offer's relid (event-flag bit and name in control messages).
    pub relid: u32,
    /// The offer's connection id (what HvSignalEvent signals).
    pub connection_id: u32,
    /// The GPADL covering both rings.
    pub ring_gpadl: u32,
}

/// Per-channel counters (monotonic).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct ChannelCounters {
    /// Packets written to the outgoing ring.
    pub packets_sent: u64,
    /// Well-formed packets received.
    pub packets_received: u64,
    /// Sends refused because the ring was full.
    pub ring_full: u64,
    /// HvSignalEvent calls made.
    pub signals_sent: u64,
    /// HvSignalEvent calls that failed.
    pub signal_failures: u64,
    /// Received packets dropped as malformed (framing was sound, contents were not).
    pub malformed_packets: u64,
    /// Times the host corrupted a ring (the channel stops at the first).
    pub ring_corruptions: u64,
}

/// An open VMBus channel.
pub struct Channel {
    ids: ChannelIds,
    memory: DmaRegion,
    outgoing: RingWriter,
    incoming: RingReader,
    signal: Arc<dyn EventSignal>,
    counters: ChannelCounters,
    /// The first corruption seen; after it the rings are never touched again.
    broken: Option<RingCorruption>,
}

impl core::fmt::Debug for Channel {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Channel")
            .field("ids", &self.ids)
            .field("memory", &self.memory)
            .field("counters", &self.counters)
            .field("broken", &self.broken)
            .finish()
    }
}

impl Channel {
    /// Wraps ring memory already handed to the host: the guest → host ring is the first
    /// `outgoing_ring_len` bytes (control page included), the host → guest ring the rest.
    pub fn new(
        ids: ChannelIds,
        mut memory: DmaRegion,
        outgoing_ring_len: usize,
        signal: Arc<dyn EventSignal>,
    ) -> Result<Channel, Error> {
        let incoming_len =
            memory
                .len()
                .checked_sub(outgoing_ring_len)
                .ok_or(Error::RingLayout {
                    reason: "outgoing ring larger than the ring memory",
                })?;
        let outgoing = RingWriter::new(&mut memory, RingGeometry::new(0, outgoing_ring_len)?)?;
        let incoming = RingReader::new(
            &mut memory,
            RingGeometry::new(outgoing_ring_len, incoming_len)?,
        )?;
        Ok(Channel {
            ids,
            memory,
            outgoing,
            incoming,
            signal,
            counters: ChannelCounters::default(),
            broken: None,
        })
    }

    /// Relid, connection id and ring GPADL.
    pub fn ids(&self) -> ChannelIds {
        self.ids
    }

    /// The relid.
    pub fn relid(&self) -> u32 {
        self.ids.relid
    }

    /// OPENCHANNEL's `downstream_ring_buffer_page_offset` for this layout.
    pub fn downstream_page_offset(&self) -> u32 {
        (self.outgoing.geometry().data_len() as usize / PAGE_SIZE + 1) as u32
    }

    /// Counters.
    pub fn counters(&self) -> ChannelCounters {
        self.counters
    }

    /// The corruption that stopped the channel, if any.
    pub fn corruption(&self) -> Option<RingCorruption> {
        self.broken
    }

    fn check(&mut self, result: Result<(), Error>) -> Result<(), Error> {
        if let Err(Error::RingCorrupt(corruption)) = result
            && self.broken.is_none()
        {
            self.counters.ring_corruptions += 1;
            log::warn!("vmbus: relid {} ring corrupt: {corruption}", self.ids.relid);
            self.broken = Some(corruption);
        }
        result
    }

    fn ensure_usable(&self) -> Result<(), Error> {
        match self.broken {
            Some(corruption) => Err(Error::RingCorrupt(corruption)),
            None => Ok(()),
        }
    }

    /// Writes `packet` to the host and signals it if the ring went from empty to non-empty with
    /// its interrupts unmasked. [`Error::RingFull`] leaves nothing written.
    pub fn send(&mut self, packet: &OutgoingPacket<'_>) -> Result<(), Error> {
        self.ensure_usable()?;
        let result = self.outgoing.write(&mut self.memory, packet);
        let signal = match result {
            Ok(signal) => signal,
            Err(error) => {
                if matches!(error, Error::RingFull { .. }) {
                    self.counters.ring_full += 1;
                }
                return self.check(Err(error)).map(|_| ());
            }
        };
        self.counters.packets_sent += 1;
        if signal {
            self.signal_host()?;
        }
        Ok(())
    }

    /// Signals the host (HvSignalEvent on the channel's connection id).
    pub fn signal_host(&mut self) -> Result<(), Error> {
        self.counters.signals_sent += 1;
        self.signal
            .signal_event(self.ids.connection_id)
            .map_err(|status| {
                self.counters.signal_failures += 1;
                Error::SignalEvent {
                    connection_id: self.ids.connection_id,
                    status,
                }
            })
    }

    /// Takes the next well-formed packet from the host, copied into `buffer`. Malformed packets
    /// (sound framing, bad contents) are counted, logged and skipped (at most
    /// [`MAX_SKIPPED_PER_RECEIVE`] per call, then `None`); a corrupt ring stops the channel.
    /// Signals the host when it waits for ring space that this read freed.
    pub fn receive<'b>(
        &mut self,
        buffer: &'b mut Vec<u8>,
    ) -> Result<Option<IncomingPacket<'b>>, Error> {
        self.ensure_usable()?;
        let mut skipped = 0;
        loop {
            if skipped == MAX_SKIPPED_PER_RECEIVE {
                return Ok(None);
            }
            let status = self.incoming.read(&mut self.memory, buffer);
            let status = match status {
                Ok(status) => status,
                Err(error) => return self.check(Err(error)).map(|_| None),
            };
            let ReadStatus::Packet { signal_writer } = status else {
                return Ok(None);
            };
            if signal_writer {
                self.signal_host()?;
            }
            match IncomingPacket::parse(buffer) {
                Ok(_) => break,
                Err(error) => {
                    skipped += 1;
                    self.counters.malformed_packets += 1;
                    log::warn!("vmbus: relid {} dropped a packet: {error}", self.ids.relid);
                }
            }
        }
        self.counters.packets_received += 1;
        Ok(IncomingPacket::parse(buffer).ok())
    }

    /// True when the host has published packets we have not read.
    pub fn has_incoming(&mut self) -> Result<bool, Error> {
        self.ensure_usable()?;
        let result = self.incoming.is_empty(&self.memory);
        match result {
            Ok(empty) => Ok(!empty),
            Err(error) => self.check(Err(error)).map(|_| false),
        }
    }

    /// Masks (`true`) or unmasks the host's signals for incoming packets. After unmasking,
    /// check [`Channel::has_incoming`] again before sleeping.
    pub fn set_interrupt_mask(&mut self, masked: bool) -> Result<(), Error> {
        self.ensure_usable()?;
        self.incoming.set_interrupt_mask(&mut self.memory, masked)
    }

    /// Bytes free in the outgoing ring right now.
    pub fn outgoing_free(&mut self) -> Result<u32, Error> {
        self.ensure_usable()?;
        let result = self.outgoing.free(&self.memory);
        match result {
            Ok(free) => Ok(free),
            Err(error) => self.check(Err(error)).map(|_| 0),
        }
    }

    /// Asks the host to signal once `len` bytes are free in the outgoing ring (0 = don't).
    pub fn set_pending_send_size(&mut self, len: u32) -> Result<(), Error> {
        self.ensure_usable()?;
        self.outgoing.set_pending_send_size(&mut self.memory, len)
    }

    /// Physical address of the ring memory (what the ring GPADL describes).
    pub fn memory_phys(&self) -> u64 {
        self.memory.phys().0
    }

    /// Gives the ring memory back (after the host released the GPADL).
    pub fn into_memory(self) -> DmaRegion {
        self.memory
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::{IncomingKind, OutgoingKind, TransferPageRange};
    use crate::ring::{INTERRUPT_MASK_OFFSET, RingMemory, WRITE_INDEX_OFFSET};
    use crate::testing::{PageListMemory, RecordingSignal};
    use net_device::DmaAllocator;
    use net_device::heap_dma::HeapDmaAllocator;

    const CONNECTION_ID: u32 = 0x2001;

    /// A guest channel with 1-data-page rings and the host's view of the same pages.
    struct Fixture {
        channel: Channel,
        signal: RecordingSignal,
        host_memory: PageListMemory,
        host_reader: RingReader,
        host_writer: RingWriter,
    }

    fn fixture() -> Fixture {
        let memory = HeapDmaAllocator::new()
            .allocate(4 * PAGE_SIZE, PAGE_SIZE)
            .unwrap();
        let first_pfn = memory.phys().0 / PAGE_SIZE as u64;
        let signal = RecordingSignal::new();
        let ids = ChannelIds {
            relid: 1,
            connection_id: CONNECTION_ID,
            ring_gpadl: 7,
        };
        let channel = Channel::new(ids, memory, 2 * PAGE_SIZE, Arc::new(signal.clone())).unwrap();
        let mut host_memory = PageListMemory::new((first_pfn..first_pfn + 4).collect());
        let host_reader = RingReader::new(
            &mut host_memory,
            RingGeometry::new(0, 2 * PAGE_SIZE).unwrap(),
        )
        .unwrap();
        let host_writer = RingWriter::new(
            &mut host_memory,
            RingGeometry::new(2 * PAGE_SIZE, 2 * PAGE_SIZE).unwrap(),
        )
        .unwrap();
        Fixture {
            channel,
            signal,
            host_memory,
            host_reader,
            host_writer,
        }
    }

    #[test]
    fn guest_packets_reach_the_host_and_signal_once_per_batch() {
        let mut f = fixture();
        assert_eq!(f.channel.downstream_page_offset(), 2);
        f.channel
            .send(&OutgoingPacket::in_band(5, true, &[b"nvsp-", b"init"]))
            .unwrap();
        f.channel
            .send(&OutgoingPacket::in_band(6, false, &[b"second"]))
            .unwrap();
        assert_eq!(
            f.signal.take(),
            [CONNECTION_ID],
            "only the empty → non-empty write signals"
        );

        let mut buffer = Vec::new();
        f.host_reader.read(&mut f.host_memory, &mut buffer).unwrap();
        let packet = IncomingPacket::parse(&buffer).unwrap();
        assert_eq!(packet.transaction_id, 5);
        assert!(packet.completion_requested);
        assert_eq!(&packet.payload[..9], b"nvsp-init");
        assert_eq!(f.channel.counters().packets_sent, 2);
        assert_eq!(f.channel.counters().signals_sent, 1);
    }

    #[test]
    fn host_transfer_page_packets_and_completions_reach_the_guest() {
        let mut f = fixture();
        let ranges = [TransferPageRange {
            byte_count: 1514,
            byte_offset: 8192,
        }];
        let host_packet = OutgoingPacket {
            kind: OutgoingKind::TransferPages {
                set_id: 0xcafe,
                ranges: &ranges,
            },
            transaction_id: 77,
            completion_requested: true,
            payload: &[&[1, 0, 0, 0, 0, 0, 0, 0]],
        };
        assert!(
            f.host_writer
                .write(&mut f.host_memory, &host_packet)
                .unwrap()
        );
        let mut buffer = Vec::new();
        let packet = f.channel.receive(&mut buffer).unwrap().unwrap();
        let IncomingKind::TransferPages {
            set_id,
            ranges: got,
        } = packet.kind
        else {
            panic!("wrong kind");
        };
        assert_eq!((set_id, got.get(0)), (0xcafe, Some(ranges[0])));
        assert_eq!(packet.transaction_id, 77);
        let transaction_id = packet.transaction_id;
        f.channel
            .send(&OutgoingPacket::completion(
                transaction_id,
                &[&[1, 0, 0, 0]],
            ))
            .unwrap();
        f.host_reader.read(&mut f.host_memory, &mut buffer).unwrap();
        let completion = IncomingPacket::parse(&buffer).unwrap();
        assert_eq!(
            (completion.kind, completion.transaction_id),
            (IncomingKind::Completion, 77)
        );
        assert!(f.channel.receive(&mut buffer).unwrap().is_none());
    }

    #[test]
    fn malformed_host_packet_is_counted_and_skipped() {
        let mut f = fixture();
        let mut bad = OutgoingPacket::in_band(1, false, &[&[0; 8]]);
        bad.kind = OutgoingKind::Completion;
        f.host_writer.write(&mut f.host_memory, &bad).unwrap();
        // Turn the completion into packet type 0x5 (unknown) in place: the framing stays sound.
        assert!(f.host_memory.write(2 * PAGE_SIZE + PAGE_SIZE, &[0x5, 0]));
        f.host_writer
            .write(
                &mut f.host_memory,
                &OutgoingPacket::in_band(2, false, &[b"good"]),
            )
            .unwrap();
        let mut buffer = Vec::new();
        let packet = f.channel.receive(&mut buffer).unwrap().unwrap();
        assert_eq!(packet.transaction_id, 2);
        assert_eq!(f.channel.counters().malformed_packets, 1);
        assert_eq!(f.channel.counters().packets_received, 1);
    }

    #[test]
    fn a_host_writing_only_garbage_cannot_keep_receive_looping() {
        let mut f = fixture();
        // 70 packets of unknown type 0x5 (sound framing), then a good one.
        for _ in 0..70 {
            let start = f.host_memory.load_u32(2 * PAGE_SIZE).unwrap() as usize;
            f.host_writer
                .write(&mut f.host_memory, &OutgoingPacket::in_band(1, false, &[]))
                .unwrap();
            assert!(f.host_memory.write(3 * PAGE_SIZE + start, &[0x5, 0]));
        }
        f.host_writer
            .write(
                &mut f.host_memory,
                &OutgoingPacket::in_band(2, false, &[b"good"]),
            )
            .unwrap();
        let mut buffer = Vec::new();
        assert!(f.channel.receive(&mut buffer).unwrap().is_none());
        assert_eq!(
            f.channel.counters().malformed_packets,
            MAX_SKIPPED_PER_RECEIVE as u64
        );
        let packet = f.channel.receive(&mut buffer).unwrap().unwrap();
        assert_eq!(packet.transaction_id, 2);
        assert_eq!(f.channel.counters().malformed_packets, 70);
    }

    #[test]
    fn corrupt_ring_stops_the_channel_and_is_counted_once() {
        let mut f = fixture();
        assert!(
            f.host_memory
                .store_u32(2 * PAGE_SIZE + WRITE_INDEX_OFFSET, 0x1_0000)
        );
        let mut buffer = Vec::new();
        for _ in 0..3 {
            assert!(matches!(
                f.channel.receive(&mut buffer),
                Err(Error::RingCorrupt(RingCorruption::BadIndex {
                    index: 0x1_0000,
                    ..
                }))
            ));
        }
        assert!(
            f.channel
                .send(&OutgoingPacket::in_band(1, false, &[b"x"]))
                .is_err()
        );
        assert_eq!(f.channel.counters().ring_corruptions, 1);
        assert!(f.channel.corruption().is_some());
    }

    #[test]
    fn full_ring_is_reported_and_host_wakes_the_blocked_guest() {
        let mut f = fixture();
        let payload = [0u8; 1000]; // 1024 bytes per packet in a 4096-byte data area
        for _ in 0..3 {
            f.channel
                .send(&OutgoingPacket::in_band(0, false, &[&payload]))
                .unwrap();
        }
        assert!(matches!(
            f.channel
                .send(&OutgoingPacket::in_band(0, false, &[&payload])),
            Err(Error::RingFull { .. })
        ));
        assert_eq!(f.channel.counters().ring_full, 1);
        f.channel.set_pending_send_size(1024 + 1016).unwrap();
        let mut buffer = Vec::new();
        assert_eq!(
            f.host_reader.read(&mut f.host_memory, &mut buffer).unwrap(),
            ReadStatus::Packet {
                signal_writer: true
            },
            "the host must wake the guest once the packet fits"
        );
    }

    #[test]
    fn interrupt_mask_suppresses_host_signals_and_failures_are_counted() {
        let mut f = fixture();
        f.channel.set_interrupt_mask(true).unwrap();
        assert_eq!(
            f.host_memory
                .load_u32(2 * PAGE_SIZE + INTERRUPT_MASK_OFFSET),
            Some(1)
        );
        assert!(
            !f.host_writer
                .write(
                    &mut f.host_memory,
                    &OutgoingPacket::in_band(1, false, &[b"a"])
                )
                .unwrap()
        );
        f.channel.set_interrupt_mask(false).unwrap();
        assert!(f.channel.has_incoming().unwrap());

        f.signal
            .fail_with(Some(crate::HvStatus::INVALID_CONNECTION_ID));
        assert!(matches!(
            f.channel.send(&OutgoingPacket::in_band(1, false, &[b"b"])),
            Err(Error::SignalEvent {
                connection_id: CONNECTION_ID,
                ..
            })
        ));
        assert_eq!(f.channel.counters().signal_failures, 1);
    }
}
