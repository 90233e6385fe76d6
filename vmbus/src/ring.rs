//! Ring buffers in the standard Hyper-V layout, usable in both roles.
//!
//! A ring is a 4 KiB control page followed by a data area (a page multiple). The writer owns
//! `write_index` and `pending_send_size`, the reader owns `read_index` and `interrupt_mask`;
//! each side only loads the other's words, atomically, and checks them before use. A guest
//! writes its outgoing ring with [`RingWriter`] and reads its incoming one with [`RingReader`]; a
//! fake host in tests does the opposite over the same memory.

use crate::error::{Error, RingCorruption};
use crate::packet::{OutgoingPacket, PacketDescriptor, PacketTrailer};
use alloc::vec::Vec;
use net_device::DmaRegion;
use zerocopy::{FromBytes, IntoBytes};

/// Hyper-V page size; rings and GPADLs are counted in these pages.
pub const PAGE_SIZE: usize = 4096;
/// Control-page offset of `write_index` (byte offset into the data area).
pub const WRITE_INDEX_OFFSET: usize = 0;
/// Control-page offset of `read_index`.
pub const READ_INDEX_OFFSET: usize = 4;
/// Control-page offset of `interrupt_mask` (reader: 1 = don't signal me).
pub const INTERRUPT_MASK_OFFSET: usize = 8;
/// Control-page offset of `pending_send_size` (writer: signal me when this much is free).
pub const PENDING_SEND_SIZE_OFFSET: usize = 12;
/// Control-page offset of `feature_bits`.
pub const FEATURE_BITS_OFFSET: usize = 64;
/// `feature_bits` bit 0: the writer uses `pending_send_size`.
pub const FEATURE_PENDING_SEND_SIZE: u32 = 1;

const TRAILER_LEN: u32 = size_of::<PacketTrailer>() as u32;
const DESCRIPTOR_LEN: u32 = size_of::<PacketDescriptor>() as u32;

/// Memory a ring lives in, addressed by byte offset: the guest's [`DmaRegion`], or a fake host's
/// view of guest pages. Out-of-range accesses fail instead of touching anything.
pub trait RingMemory {
    /// Atomic load of the u32 at `offset` (4-byte aligned).
    fn load_u32(&self, offset: usize) -> Option<u32>;
    /// Atomic store of a u32 at `offset` (4-byte aligned).
    fn store_u32(&mut self, offset: usize, value: u32) -> bool;
    /// Copies bytes out.
    fn read(&self, offset: usize, buffer: &mut [u8]) -> bool;
    /// Copies bytes in.
    fn write(&mut self, offset: usize, data: &[u8]) -> bool;
}

impl RingMemory for DmaRegion {
    fn load_u32(&self, offset: usize) -> Option<u32> {
        DmaRegion::load_u32(self, offset)
    }
    fn store_u32(&mut self, offset: usize, value: u32) -> bool {
        DmaRegion::store_u32(self, offset, value)
    }
    fn read(&self, offset: usize, buffer: &mut [u8]) -> bool {
        self.read_bytes(offset, buffer)
    }
    fn write(&mut self, offset: usize, data: &[u8]) -> bool {
        self.write_bytes(offset, data)
    }
}

/// Where one ring sits in its memory.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct RingGeometry {
    /// Offset of the control page.
    base: usize,
    /// Size of the data area.
    data_len: u32,
}

impl RingGeometry {
    /// A ring of `total_len` bytes (control page + data, page multiple, ≥ 2 pages) at `base`
    /// (page-aligned).
    pub fn new(base: usize, total_len: usize) -> Result<RingGeometry, Error> {
        if !base.is_multiple_of(PAGE_SIZE) || !total_len.is_multiple_of(PAGE_SIZE) {
            return Err(Error::RingLayout {
                reason: "ring not page-aligned",
            });
        }
        if total_len < 2 * PAGE_SIZE {
            return Err(Error::RingLayout {
                reason: "ring needs a control page and a data page",
            });
        }
        let data_len = u32::try_from(total_len - PAGE_SIZE)
            .ok()
            .filter(|len| *len < 1 << 31)
            .ok_or(Error::RingLayout {
                reason: "ring larger than 2 GiB",
            })?;
        Ok(RingGeometry { base, data_len })
    }

    /// Size of the data area.
    pub fn data_len(&self) -> u32 {
        self.data_len
    }

    /// Largest packet (trailer included) a writer may put in the empty ring: one byte less than
    /// the data area would make read == write (= empty) ambiguous, so 8 bytes stay free.
    pub fn max_packet_len(&self) -> u32 {
        self.data_len - 8
    }

    fn control(&self, offset: usize) -> usize {
        self.base + offset
    }

    fn data(&self, index: u32) -> usize {
        self.base + PAGE_SIZE + index as usize
    }

    fn load(&self, memory: &impl RingMemory, offset: usize) -> Result<u32, RingCorruption> {
        memory
            .load_u32(self.control(offset))
            .ok_or(RingCorruption::ControlPage)
    }

    fn store(
        &self,
        memory: &mut impl RingMemory,
        offset: usize,
        value: u32,
    ) -> Result<(), RingCorruption> {
        memory
            .store_u32(self.control(offset), value)
            .then_some(())
            .ok_or(RingCorruption::ControlPage)
    }

    /// Loads an index and checks it lies in the data area on an 8-byte boundary.
    fn load_index(&self, memory: &impl RingMemory, offset: usize) -> Result<u32, RingCorruption> {
        let index = self.load(memory, offset)?;
        if index >= self.data_len || !index.is_multiple_of(8) {
            return Err(RingCorruption::BadIndex {
                index,
                data_len: self.data_len,
            });
        }
        Ok(index)
    }

    /// Bytes between `read` and `write` (what the reader may consume).
    fn available(&self, read: u32, write: u32) -> u32 {
        if write >= read {
            write - read
        } else {
            self.data_len - read + write
        }
    }

    /// Bytes a writer may still fill (8 always stay free).
    fn free(&self, read: u32, write: u32) -> u32 {
        self.data_len - self.available(read, write) - 8
    }

    fn advance(&self, index: u32, by: u32) -> u32 {
        // Both < data_len < 2^31, so no overflow.
        let next = index + by;
        if next >= self.data_len {
            next - self.data_len
        } else {
            next
        }
    }

    /// Copies `data` to data offset `index`, wrapping at the end; returns the next index.
    fn write_wrapped(
        &self,
        memory: &mut impl RingMemory,
        index: u32,
        data: &[u8],
    ) -> Result<u32, RingCorruption> {
        let first = data.len().min((self.data_len - index) as usize);
        let (head, tail) = data.split_at(first);
        let ok = memory.write(self.data(index), head)
            && (tail.is_empty() || memory.write(self.data(0), tail));
        if !ok {
            return Err(RingCorruption::ControlPage);
        }
        Ok(self.advance(index, data.len() as u32))
    }

    /// Copies from data offset `index`, wrapping at the end.
    fn read_wrapped(
        &self,
        memory: &impl RingMemory,
        index: u32,
        buffer: &mut [u8],
    ) -> Result<(), RingCorruption> {
        let first = buffer.len().min((self.data_len - index) as usize);
        let (head, tail) = buffer.split_at_mut(first);
        let ok = memory.read(self.data(index), head)
            && (tail.is_empty() || memory.read(self.data(0), tail));
        ok.then_some(()).ok_or(RingCorruption::ControlPage)
    }
}

/// The writing end of a ring.
#[derive(Debug)]
pub struct RingWriter {
    geometry: RingGeometry,
    /// Our own write index: the shared copy is only ever stored, never trusted back.
    write_index: u32,
}

impl RingWriter {
    /// Takes the writing end of the ring at `geometry`, continuing at the write index found in
    /// the control page (0 in fresh memory), and advertises `pending_send_size` support.
    pub fn new(memory: &mut impl RingMemory, geometry: RingGeometry) -> Result<RingWriter, Error> {
        let write_index = geometry.load_index(memory, WRITE_INDEX_OFFSET)?;
        let features = geometry.load(memory, FEATURE_BITS_OFFSET)?;
        geometry.store(
            memory,
            FEATURE_BITS_OFFSET,
            features | FEATURE_PENDING_SEND_SIZE,
        )?;
        geometry.store(memory, PENDING_SEND_SIZE_OFFSET, 0)?;
        Ok(RingWriter {
            geometry,
            write_index,
        })
    }

    /// The ring's position.
    pub fn geometry(&self) -> RingGeometry {
        self.geometry
    }

    /// Bytes free right now (the reader may free more at any moment).
    pub fn free(&self, memory: &impl RingMemory) -> Result<u32, Error> {
        let read = self.geometry.load_index(memory, READ_INDEX_OFFSET)?;
        Ok(self.geometry.free(read, self.write_index))
    }

    /// Writes `packet` and publishes it. Returns `true` when the reader must be signalled:
    /// its interrupts are unmasked and the ring was empty before this packet.
    pub fn write(
        &mut self,
        memory: &mut impl RingMemory,
        packet: &OutgoingPacket<'_>,
    ) -> Result<bool, Error> {
        let max = self.geometry.max_packet_len() as usize;
        let needed = packet.packet_len() + TRAILER_LEN as usize;
        if needed > max || packet.descriptor().is_none() {
            return Err(Error::PacketTooLarge { len: needed, max });
        }
        let needed = needed as u32;
        let read = self.geometry.load_index(memory, READ_INDEX_OFFSET)?;
        let free = self.geometry.free(read, self.write_index);
        if free < needed {
            return Err(Error::RingFull { needed, free });
        }
        let start = self.write_index;
        let mut index = start;
        let mut result = Ok(());
        packet.for_each_piece(|piece| {
            if result.is_ok() {
                match self.geometry.write_wrapped(memory, index, piece) {
                    Ok(next) => index = next,
                    Err(error) => result = Err(error),
                }
            }
        });
        result?;
        let trailer = PacketTrailer {
            reserved: 0,
            start_offset: start,
        };
        index = self
            .geometry
            .write_wrapped(memory, index, trailer.as_bytes())?;
        // The store is SeqCst: the packet bytes are visible before the new index, and the
        // loads below cannot move before it (the reader's mask/index check races with us).
        self.geometry.store(memory, WRITE_INDEX_OFFSET, index)?;
        self.write_index = index;
        let masked = self.geometry.load(memory, INTERRUPT_MASK_OFFSET)? != 0;
        let read_now = self.geometry.load(memory, READ_INDEX_OFFSET)?;
        Ok(!masked && read_now == start)
    }

    /// Asks the reader to signal once `len` bytes are free (0 = don't). Rounded up to 8.
    pub fn set_pending_send_size(
        &mut self,
        memory: &mut impl RingMemory,
        len: u32,
    ) -> Result<(), Error> {
        let len = len.min(self.geometry.max_packet_len()).next_multiple_of(8);
        self.geometry.store(memory, PENDING_SEND_SIZE_OFFSET, len)?;
        Ok(())
    }
}

/// What [`RingReader::read`] found.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum ReadStatus {
    /// Nothing to read.
    Empty,
    /// One packet copied into the buffer (descriptor through padding, no trailer).
    Packet {
        /// The writer asked (via `pending_send_size`) to be signalled and enough room has now
        /// been freed.
        signal_writer: bool,
    },
}

/// The reading end of a ring.
#[derive(Debug)]
pub struct RingReader {
    geometry: RingGeometry,
    /// Our own read index: the shared copy is only stored, never trusted back.
    read_index: u32,
}

impl RingReader {
    /// Takes the reading end of the ring at `geometry`, continuing at the read index found in
    /// the control page (0 in fresh memory), with interrupts unmasked.
    pub fn new(memory: &mut impl RingMemory, geometry: RingGeometry) -> Result<RingReader, Error> {
        let read_index = geometry.load_index(memory, READ_INDEX_OFFSET)?;
        geometry.store(memory, INTERRUPT_MASK_OFFSET, 0)?;
        Ok(RingReader {
            geometry,
            read_index,
        })
    }

    /// The ring's position.
    pub fn geometry(&self) -> RingGeometry {
        self.geometry
    }

    /// Masks (`true`) or unmasks the writer's signals. After unmasking, check
    /// [`RingReader::is_empty`] again: a packet may have arrived while masked.
    pub fn set_interrupt_mask(
        &mut self,
        memory: &mut impl RingMemory,
        masked: bool,
    ) -> Result<(), Error> {
        self.geometry
            .store(memory, INTERRUPT_MASK_OFFSET, u32::from(masked))?;
        Ok(())
    }

    /// True when the writer has published nothing beyond what we consumed.
    pub fn is_empty(&self, memory: &impl RingMemory) -> Result<bool, Error> {
        Ok(self.geometry.load_index(memory, WRITE_INDEX_OFFSET)? == self.read_index)
    }

    /// Copies the next packet into `buffer` (replacing its contents) and frees its ring space.
    /// A bad index or length is [`Error::RingCorrupt`] and consumes nothing.
    pub fn read(
        &mut self,
        memory: &mut impl RingMemory,
        buffer: &mut Vec<u8>,
    ) -> Result<ReadStatus, Error> {
        let geometry = self.geometry;
        let write = geometry.load_index(memory, WRITE_INDEX_OFFSET)?;
        let read = self.read_index;
        if write == read {
            return Ok(ReadStatus::Empty);
        }
        let available = geometry.available(read, write);
        if available < DESCRIPTOR_LEN + TRAILER_LEN {
            return Err(RingCorruption::ShortData { available }.into());
        }
        let mut descriptor_bytes = [0u8; DESCRIPTOR_LEN as usize];
        geometry.read_wrapped(memory, read, &mut descriptor_bytes)?;
        let descriptor = PacketDescriptor::read_from_bytes(&descriptor_bytes)
            .map_err(|_| RingCorruption::ShortData { available })?;
        let (offset8, len8) = (descriptor.data_offset8, descriptor.length8);
        if u32::from(offset8) * 8 < DESCRIPTOR_LEN || offset8 > len8 {
            return Err(RingCorruption::DescriptorLengths { offset8, len8 }.into());
        }
        let len = u32::from(len8) * 8;
        if len + TRAILER_LEN > available {
            return Err(RingCorruption::PacketExceedsData { len, available }.into());
        }
        buffer.clear();
        buffer.resize(len as usize, 0);
        geometry.read_wrapped(memory, read, buffer)?;

        // Compare free space before and after with the same write index, so a writer that
        // asked to be woken at `pending_send_size` is signalled exactly on the crossing.
        let next = geometry.advance(read, len + TRAILER_LEN);
        let free_before = geometry.free(read, write);
        geometry.store(memory, READ_INDEX_OFFSET, next)?;
        self.read_index = next;
        // Some writers ask for "ring size - 1"; the low bits are meaningless (OpenVMM masks too).
        let pending = geometry.load(memory, PENDING_SEND_SIZE_OFFSET)? & !7;
        let free_after = geometry.free(next, write);
        let signal_writer = pending != 0 && free_before < pending && free_after >= pending;
        Ok(ReadStatus::Packet { signal_writer })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::{IncomingKind, IncomingPacket};
    use net_device::DmaAllocator;
    use net_device::heap_dma::HeapDmaAllocator;

    /// One ring with 1 data page at offset 0 of a fresh region.
    fn ring(data_pages: usize) -> (DmaRegion, RingWriter, RingReader) {
        let mut memory = HeapDmaAllocator::new()
            .allocate((1 + data_pages) * PAGE_SIZE, PAGE_SIZE)
            .unwrap();
        let geometry = RingGeometry::new(0, (1 + data_pages) * PAGE_SIZE).unwrap();
        let writer = RingWriter::new(&mut memory, geometry).unwrap();
        let reader = RingReader::new(&mut memory, geometry).unwrap();
        (memory, writer, reader)
    }

    fn send(
        memory: &mut DmaRegion,
        writer: &mut RingWriter,
        id: u64,
        payload: &[u8],
    ) -> Result<bool, Error> {
        writer.write(memory, &OutgoingPacket::in_band(id, false, &[payload]))
    }

    fn receive(memory: &mut DmaRegion, reader: &mut RingReader) -> Option<(u64, Vec<u8>)> {
        let mut buffer = Vec::new();
        match reader.read(memory, &mut buffer).unwrap() {
            ReadStatus::Empty => None,
            ReadStatus::Packet { .. } => {
                let packet = IncomingPacket::parse(&buffer).unwrap();
                assert_eq!(packet.kind, IncomingKind::InBand);
                Some((packet.transaction_id, packet.payload.to_vec()))
            }
        }
    }

    #[test]
    fn packets_survive_many_wraps_byte_exact() {
        let (mut memory, mut writer, mut reader) = ring(1);
        for round in 0..500u64 {
            let len = (round as usize * 37) % 700 + 1;
            let payload: Vec<u8> = (0..len).map(|i| (i as u64 ^ round) as u8).collect();
            send(&mut memory, &mut writer, round, &payload).unwrap();
            let (id, got) = receive(&mut memory, &mut reader).unwrap();
            assert_eq!(id, round);
            assert_eq!(&got[..len], &payload[..]);
            assert!(receive(&mut memory, &mut reader).is_none());
        }
    }

    #[test]
    fn trailer_holds_the_start_offset() {
        let (mut memory, mut writer, _reader) = ring(1);
        send(&mut memory, &mut writer, 0, &[0; 8]).unwrap();
        send(&mut memory, &mut writer, 0, &[0; 8]).unwrap();
        let mut trailer = [0u8; 8];
        assert!(memory.read_bytes(PAGE_SIZE + 32 + 24, &mut trailer));
        assert_eq!(
            u64::from_le_bytes(trailer),
            32 << 32,
            "second packet starts at 32"
        );
    }

    #[test]
    fn ring_never_fills_completely() {
        let (mut memory, mut writer, mut reader) = ring(1);
        // 4096-byte data area: packets of 16 + 1000 + 8 = 1024 bytes; three fit (3072) and
        // leave 4096 - 3072 - 8 = 1016 free: a fourth would fill the ring completely.
        for id in 0..3 {
            send(&mut memory, &mut writer, id, &[7; 1000]).unwrap();
        }
        assert_eq!(
            send(&mut memory, &mut writer, 3, &[7; 1000]),
            Err(Error::RingFull {
                needed: 1024,
                free: 1016
            })
        );
        // A packet of exactly the free space fits; then 0 bytes are free, never read == write.
        send(&mut memory, &mut writer, 3, &[7; 992]).unwrap();
        assert_eq!(writer.free(&memory).unwrap(), 0);
        assert!(!reader.is_empty(&memory).unwrap());
        for id in 0..4 {
            assert_eq!(receive(&mut memory, &mut reader).unwrap().0, id);
        }
        assert!(reader.is_empty(&memory).unwrap());
        assert_eq!(
            send(&mut memory, &mut writer, 0, &[0; 4096]),
            Err(Error::PacketTooLarge {
                len: 4120,
                max: 4088
            })
        );
    }

    #[test]
    fn writer_signals_only_on_empty_to_non_empty_with_interrupts_unmasked() {
        let (mut memory, mut writer, mut reader) = ring(2);
        assert!(
            send(&mut memory, &mut writer, 1, b"first").unwrap(),
            "empty → non-empty"
        );
        assert!(
            !send(&mut memory, &mut writer, 2, b"second").unwrap(),
            "already non-empty"
        );
        receive(&mut memory, &mut reader).unwrap();
        receive(&mut memory, &mut reader).unwrap();
        reader.set_interrupt_mask(&mut memory, true).unwrap();
        assert!(
            !send(&mut memory, &mut writer, 3, b"masked").unwrap(),
            "reader masked"
        );
        reader.set_interrupt_mask(&mut memory, false).unwrap();
        assert!(
            !reader.is_empty(&memory).unwrap(),
            "reader re-checks after unmasking"
        );
        receive(&mut memory, &mut reader).unwrap();
        assert!(send(&mut memory, &mut writer, 4, b"again").unwrap());
    }

    #[test]
    fn reader_signals_when_free_space_crosses_pending_send_size() {
        let (mut memory, mut writer, mut reader) = ring(1);
        for id in 0..3 {
            send(&mut memory, &mut writer, id, &[1; 1000]).unwrap();
        }
        let mut buffer = Vec::new();
        // No pending size: reading never asks for a signal.
        assert_eq!(
            reader.read(&mut memory, &mut buffer).unwrap(),
            ReadStatus::Packet {
                signal_writer: false
            }
        );
        send(&mut memory, &mut writer, 3, &[1; 1000]).unwrap();
        // 1016 bytes free; the blocked writer wants 2040 (2039 rounded up to 8).
        writer.set_pending_send_size(&mut memory, 2039).unwrap();
        assert_eq!(
            reader.read(&mut memory, &mut buffer).unwrap(),
            ReadStatus::Packet {
                signal_writer: true
            },
            "1016 → 2040 free crosses 2040"
        );
        assert_eq!(
            reader.read(&mut memory, &mut buffer).unwrap(),
            ReadStatus::Packet {
                signal_writer: false
            },
            "already above: no second signal"
        );
    }

    /// Writes a raw control word, as a hostile peer would.
    fn poke(memory: &mut DmaRegion, offset: usize, value: u32) {
        assert!(memory.store_u32(offset, value));
    }

    #[test]
    fn bad_indices_from_the_peer_are_errors_not_panics() {
        let (mut memory, mut writer, mut reader) = ring(1);
        let mut buffer = Vec::new();
        for bad in [4096, 4097, 12, u32::MAX] {
            poke(&mut memory, WRITE_INDEX_OFFSET, bad);
            assert_eq!(
                reader.read(&mut memory, &mut buffer),
                Err(Error::RingCorrupt(RingCorruption::BadIndex {
                    index: bad,
                    data_len: 4096
                }))
            );
            poke(&mut memory, READ_INDEX_OFFSET, bad);
            assert!(matches!(
                send(&mut memory, &mut writer, 0, b"x"),
                Err(Error::RingCorrupt(RingCorruption::BadIndex { .. }))
            ));
        }
        // A new end over a corrupt control page is refused.
        let geometry = reader.geometry();
        assert!(RingReader::new(&mut memory, geometry).is_err());
    }

    #[test]
    fn bad_lengths_from_the_peer_are_errors_and_consume_nothing() {
        let (mut memory, mut writer, mut reader) = ring(1);
        let mut buffer = Vec::new();
        send(&mut memory, &mut writer, 0, &[0; 24]).unwrap(); // 16 + 24 + 8 = 48 bytes
        let descriptor = |memory: &mut DmaRegion, offset8: u16, len8: u16| {
            let mut bytes = [0u8; 4];
            bytes[..2].copy_from_slice(&offset8.to_le_bytes());
            bytes[2..].copy_from_slice(&len8.to_le_bytes());
            assert!(memory.write_bytes(PAGE_SIZE + 2, &bytes));
        };
        descriptor(&mut memory, 1, 5);
        assert_eq!(
            reader.read(&mut memory, &mut buffer),
            Err(Error::RingCorrupt(RingCorruption::DescriptorLengths {
                offset8: 1,
                len8: 5
            }))
        );
        descriptor(&mut memory, 3, 2);
        assert!(reader.read(&mut memory, &mut buffer).is_err());
        descriptor(&mut memory, 2, 6); // 48 + 8 > 48 available
        assert_eq!(
            reader.read(&mut memory, &mut buffer),
            Err(Error::RingCorrupt(RingCorruption::PacketExceedsData {
                len: 48,
                available: 48
            }))
        );
        descriptor(&mut memory, 2, u16::MAX);
        assert!(reader.read(&mut memory, &mut buffer).is_err());
        // Too few bytes for any packet.
        poke(&mut memory, WRITE_INDEX_OFFSET, 8);
        assert_eq!(
            reader.read(&mut memory, &mut buffer),
            Err(Error::RingCorrupt(RingCorruption::ShortData {
                available: 8
            }))
        );
        // Repaired, the same packet reads fine: nothing was consumed.
        poke(&mut memory, WRITE_INDEX_OFFSET, 48);
        descriptor(&mut memory, 2, 5);
        assert!(receive(&mut memory, &mut reader).is_some());
    }

    #[test]
    fn geometry_rejects_unusable_layouts() {
        assert!(RingGeometry::new(0, PAGE_SIZE).is_err());
        assert!(RingGeometry::new(0, 3 * PAGE_SIZE + 8).is_err());
        assert!(RingGeometry::new(8, 2 * PAGE_SIZE).is_err());
        let geometry = RingGeometry::new(PAGE_SIZE * 2, 4 * PAGE_SIZE).unwrap();
        assert_eq!(geometry.data_len(), 3 * PAGE_SIZE as u32);
        // Ring memory smaller than the geometry: refused, not out-of-bounds.
        let mut small = HeapDmaAllocator::new()
            .allocate(2 * PAGE_SIZE, PAGE_SIZE)
            .unwrap();
        assert!(RingWriter::new(&mut small, geometry).is_err());
    }
}
