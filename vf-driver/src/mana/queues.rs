//! Rings in DMA memory: completion/event queues the device writes (owner-count protocol), work
//! queues the driver writes (byte-addressed, wrapping), and the transmit buffer arena.
//!
//! Owner counts (facts from OpenVMM's `gdma` emulator): each CQE/EQE carries the 3-bit lap
//! number of the ring it was written in; the device's first lap is 1. The driver keeps a
//! running position that starts at `entries` (lap 1, index 0): the entry at `position %
//! entries` is new when its owner count is `position / entries` (mod 8), old when it is one
//! less, and anything else means the device lapped the driver (overflow) or wrote garbage.

use core::marker::PhantomData;
use core::sync::atomic::{Ordering, fence};

use net_device::{DmaAllocator, DmaRegion};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use super::defs::{OWNER_BITS, OWNER_MASK, PAGE_SIZE, WQE_MAX, WQE_UNIT};
use crate::Error;

/// Reads `out.len()` bytes (a multiple of 8) at `offset` (8-aligned) with volatile 8-byte
/// loads; `false` when out of bounds.
pub(crate) fn read_volatile(region: &DmaRegion, offset: usize, out: &mut [u8]) -> bool {
    for (index, chunk) in out.chunks_exact_mut(8).enumerate() {
        match region.read_volatile_u64(offset + index * 8) {
            Some(word) => chunk.copy_from_slice(&word.to_le_bytes()),
            None => return false,
        }
    }
    out.len().is_multiple_of(8)
}

/// Writes `data` (a multiple of 8 bytes) at `offset` (8-aligned) with volatile 8-byte stores.
pub(crate) fn write_volatile(region: &mut DmaRegion, offset: usize, data: &[u8]) -> bool {
    let mut ok = data.len().is_multiple_of(8);
    for (index, chunk) in data.chunks_exact(8).enumerate() {
        let word = u64::from_le_bytes([
            chunk[0], chunk[1], chunk[2], chunk[3], chunk[4], chunk[5], chunk[6], chunk[7],
        ]);
        ok &= region.write_volatile_u64(offset + index * 8, word);
    }
    ok
}

/// Allocates `len` bytes of page-aligned DMA memory.
pub(crate) fn allocate(
    dma: &dyn DmaAllocator,
    len: usize,
    purpose: &'static str,
) -> Result<DmaRegion, Error> {
    dma.allocate(len, PAGE_SIZE)
        .filter(|region| region.len() >= len && region.phys().0.is_multiple_of(PAGE_SIZE as u64))
        .ok_or(Error::DmaAllocation {
            purpose,
            bytes: len,
        })
}

/// What reading a completion or event ring found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Polled<T> {
    /// A new entry, consumed.
    Entry(T),
    /// Nothing new.
    Empty,
    /// The owner count is neither this lap's nor the last one's: the device overran the ring
    /// or wrote garbage. Nothing was consumed.
    Overflow {
        /// The owner count found.
        found: u32,
        /// The owner count expected.
        expected: u32,
    },
}

/// A completion or event queue: entries of type `T` the device writes, owner count in the top
/// three bits of the last dword.
pub(crate) struct EntryRing<T> {
    region: DmaRegion,
    entries: u32,
    shift: u32,
    position: u32,
    /// Queue id the device assigned (0 until created).
    pub id: u32,
    _entry: PhantomData<fn() -> T>,
}

impl<T: FromBytes + IntoBytes + Immutable + KnownLayout + Copy> EntryRing<T> {
    /// A ring of `bytes` (a power of two, at least a page) of zeroed DMA memory.
    pub(crate) fn new(
        dma: &dyn DmaAllocator,
        bytes: usize,
        purpose: &'static str,
    ) -> Result<Self, Error> {
        let bytes = bytes.max(PAGE_SIZE).next_power_of_two();
        let region = allocate(dma, bytes, purpose)?;
        let entries = (bytes / size_of::<T>()) as u32;
        Ok(EntryRing {
            region,
            entries,
            shift: entries.trailing_zeros(),
            position: entries,
            id: 0,
            _entry: PhantomData,
        })
    }

    /// The ring's memory.
    pub(crate) fn region(&self) -> &DmaRegion {
        &self.region
    }

    /// Bytes of the ring.
    pub(crate) fn bytes(&self) -> usize {
        self.entries as usize * size_of::<T>()
    }

    /// Takes the next entry if the device has written it.
    pub(crate) fn poll(&mut self) -> Polled<T> {
        let size = size_of::<T>();
        let offset = (self.position & (self.entries - 1)) as usize * size;
        let mut last = [0u8; 8];
        if !read_volatile(&self.region, offset + size - 8, &mut last) {
            return Polled::Empty;
        }
        let owner = u32::from_le_bytes([last[4], last[5], last[6], last[7]]) >> 29;
        let expected = (self.position >> self.shift) & OWNER_MASK;
        if owner == (expected.wrapping_sub(1) & OWNER_MASK) {
            return Polled::Empty;
        }
        if owner != expected {
            return Polled::Overflow {
                found: owner,
                expected,
            };
        }
        // The owner count is written last by the device: read the rest only after it.
        fence(Ordering::Acquire);
        let mut bytes = [0u8; 64];
        let bytes = &mut bytes[..size];
        if !read_volatile(&self.region, offset, bytes) {
            return Polled::Empty;
        }
        let Ok(entry) = T::read_from_bytes(bytes) else {
            return Polled::Empty;
        };
        self.position = self.position.wrapping_add(1);
        Polled::Entry(entry)
    }

    /// The consumer position as a doorbell carries it.
    pub(crate) fn doorbell_position(&self) -> u32 {
        self.position & ((self.entries << OWNER_BITS) - 1)
    }
}

/// A work queue the driver fills with WQEs: byte-addressed, positions run freely (u32, wrapping)
/// and the device consumes in order.
pub(crate) struct WorkRing {
    region: DmaRegion,
    size: u32,
    /// Producer position (bytes written).
    tail: u32,
    /// Consumer position (bytes the device completed).
    head: u32,
    /// Queue id the device assigned (0 until created).
    pub id: u32,
}

impl WorkRing {
    /// A ring of `bytes` (a power of two, at least a page) of zeroed DMA memory.
    pub(crate) fn new(
        dma: &dyn DmaAllocator,
        bytes: usize,
        purpose: &'static str,
    ) -> Result<Self, Error> {
        let bytes = bytes.max(PAGE_SIZE).next_power_of_two();
        let region = allocate(dma, bytes, purpose)?;
        Ok(WorkRing {
            region,
            size: bytes as u32,
            tail: 0,
            head: 0,
            id: 0,
        })
    }

    /// The ring's memory.
    pub(crate) fn region(&self) -> &DmaRegion {
        &self.region
    }

    /// Bytes of the ring.
    pub(crate) fn bytes(&self) -> usize {
        self.size as usize
    }

    /// Bytes free for new WQEs.
    pub(crate) fn free_bytes(&self) -> u32 {
        self.size - self.tail.wrapping_sub(self.head)
    }

    /// Producer position (what the doorbell carries).
    pub(crate) fn tail(&self) -> u32 {
        self.tail
    }

    /// Writes one WQE (a multiple of [`WQE_UNIT`] bytes, at most [`WQE_MAX`]); returns its
    /// position, or `None` when it does not fit.
    pub(crate) fn post(&mut self, wqe: &[u8]) -> Option<u32> {
        let len = wqe.len() as u32;
        if !wqe.len().is_multiple_of(WQE_UNIT) || wqe.len() > WQE_MAX || len > self.free_bytes() {
            return None;
        }
        let position = self.tail;
        let start = (position & (self.size - 1)) as usize;
        // The device reads a WQE that straddles the end as continuing at the start.
        let first = wqe.len().min(self.size as usize - start);
        write_volatile(&mut self.region, start, &wqe[..first]);
        write_volatile(&mut self.region, 0, &wqe[first..]);
        // The WQE must be in memory before the doorbell that publishes it.
        fence(Ordering::Release);
        self.tail = position.wrapping_add(len);
        Some(position)
    }

    /// The device completed `len` bytes of WQEs (the oldest ones).
    pub(crate) fn release(&mut self, len: u32) {
        let outstanding = self.tail.wrapping_sub(self.head);
        self.head = self.head.wrapping_add(len.min(outstanding));
    }

    /// Forgets every WQE (the queue was destroyed).
    pub(crate) fn reset(&mut self) {
        self.head = self.tail;
    }
}

/// Transmit buffers: one DMA region used as a FIFO of contiguous frames (completions arrive in
/// order), so a 64 KiB TSO frame and a 60-byte ACK take what they need.
pub(crate) struct TxArena {
    region: DmaRegion,
    /// Running position where the next frame goes.
    head: u64,
    /// Running position of the oldest frame still owned by the device.
    tail: u64,
}

impl TxArena {
    /// An arena of `bytes` of DMA memory.
    pub(crate) fn new(dma: &dyn DmaAllocator, bytes: usize) -> Result<Self, Error> {
        Ok(TxArena {
            region: allocate(dma, bytes, "MANA transmit buffers")?,
            head: 0,
            tail: 0,
        })
    }

    /// Room for a `len`-byte frame: its offset in the region and the running position its
    /// release frees up to. Frames never wrap; the bytes skipped at the end belong to the frame.
    pub(crate) fn reserve(&self, len: usize) -> Option<(usize, u64)> {
        let size = self.region.len() as u64;
        let len = (len as u64).next_multiple_of(64);
        if len > size {
            return None;
        }
        let mut start = self.head;
        if start % size + len > size {
            start = start.next_multiple_of(size);
        }
        let end = start + len;
        (end - self.tail <= size).then_some(((start % size) as usize, end))
    }

    /// The frame reserved at `offset` is queued; the arena now ends at `end`.
    pub(crate) fn commit(&mut self, end: u64) {
        self.head = end;
    }

    /// The device is done with everything up to `end`.
    pub(crate) fn release(&mut self, end: u64) {
        self.tail = end.clamp(self.tail, self.head);
    }

    /// The device address of `offset`.
    pub(crate) fn phys(&self, offset: usize) -> u64 {
        self.region.phys().0 + offset as u64
    }

    /// The bytes at `offset..offset + len` for the CPU to fill.
    pub(crate) fn area(&mut self, offset: usize, len: usize) -> Option<&mut [u8]> {
        self.region
            .as_mut_slice()
            .get_mut(offset..offset.checked_add(len)?)
    }
}
