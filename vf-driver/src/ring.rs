//! RX and TX descriptor rings over DMA memory. Nothing here touches MMIO: the rings return the
//! tail value to write, and the device code writes it once per batch.
//!
//! Everything the device writes back is untrusted: lengths are checked against the buffer,
//! error bits and multi-descriptor frames are dropped and counted, and a descriptor the device
//! wrote although it was never handed over is counted when it is next posted.

use crate::Error;
use crate::descriptors::{
    AdvancedRxReadDescriptor, AdvancedRxWriteBack, AdvancedTxDataDescriptor, DESCRIPTOR_SIZE,
    RxStatus,
};
use alloc::vec::Vec;
use core::sync::atomic::{Ordering, fence};
use net_device::{DmaAllocator, DmaRegion, PhysAddr, RxMeta};

/// Descriptor rings must be 128-byte aligned (datasheet §8.10.1: RDBAL bits 6:0 are zero).
const RING_ALIGNMENT: usize = 128;
/// Buffers are aligned to a cache line.
const BUFFER_ALIGNMENT: usize = 64;
/// Shortest Ethernet frame without FCS; shorter frames are zero-padded by the driver because
/// QEMU's padding is not verified (reference §3.2).
pub(crate) const MIN_FRAME_LEN: usize = 60;

fn allocate(
    dma: &impl DmaAllocator,
    bytes: usize,
    align: usize,
    purpose: &'static str,
) -> Result<DmaRegion, Error> {
    dma.allocate(bytes, align)
        .ok_or(Error::DmaAllocation { purpose, bytes })
}

fn read_descriptor(ring: &DmaRegion, index: usize) -> Option<[u64; 2]> {
    let offset = index * DESCRIPTOR_SIZE;
    Some([
        ring.read_volatile_u64(offset)?,
        ring.read_volatile_u64(offset + 8)?,
    ])
}

fn write_descriptor(ring: &mut DmaRegion, index: usize, words: [u64; 2]) {
    let offset = index * DESCRIPTOR_SIZE;
    // The second word carries the status the device polls for, so it goes last.
    ring.write_volatile_u64(offset, words[0]);
    ring.write_volatile_u64(offset + 8, words[1]);
}

/// What a reclaim pass found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Reclaimed {
    /// Frames the device finished.
    pub frames: u64,
    /// Their bytes.
    pub bytes: u64,
}

/// Transmit ring: one buffer per descriptor, one descriptor per frame.
pub(crate) struct TxRing {
    descriptors: DmaRegion,
    buffers: Vec<DmaRegion>,
    lengths: Vec<u16>,
    size: u16,
    /// Next slot to fill (the software tail).
    next_to_use: u16,
    /// Oldest slot the device has not been seen to finish.
    next_to_clean: u16,
    /// Slots filled and not reclaimed (flushed or not).
    in_use: u16,
    /// Slots filled since the last doorbell.
    unflushed: u16,
}

impl TxRing {
    pub(crate) fn new(
        dma: &impl DmaAllocator,
        size: u16,
        buffer_size: usize,
    ) -> Result<Self, Error> {
        let descriptors = allocate(
            dma,
            usize::from(size) * DESCRIPTOR_SIZE,
            RING_ALIGNMENT,
            "TX descriptors",
        )?;
        let buffers = (0..size)
            .map(|_| allocate(dma, buffer_size, BUFFER_ALIGNMENT, "TX buffers"))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(TxRing {
            descriptors,
            buffers,
            lengths: alloc::vec![0; usize::from(size)],
            size,
            next_to_use: 0,
            next_to_clean: 0,
            in_use: 0,
            unflushed: 0,
        })
    }

    /// Forgets everything in flight (after a reset: the device dropped it) and clears the ring.
    pub(crate) fn reset(&mut self) {
        for index in 0..usize::from(self.size) {
            write_descriptor(&mut self.descriptors, index, [0, 0]);
        }
        self.next_to_use = 0;
        self.next_to_clean = 0;
        self.in_use = 0;
        self.unflushed = 0;
    }

    /// Device address of the descriptor ring.
    pub(crate) fn base(&self) -> PhysAddr {
        self.descriptors.phys()
    }

    /// Ring length in bytes, for TDLEN.
    pub(crate) fn byte_len(&self) -> u32 {
        u32::from(self.size) * DESCRIPTOR_SIZE as u32
    }

    /// Slots that can take a frame now. One slot always stays empty so that a full ring never
    /// looks empty to the device (TDT == TDH means "nothing to do").
    pub(crate) fn free_slots(&self) -> u16 {
        self.size - 1 - self.in_use
    }

    /// Frames handed to the device (doorbell rung) and not yet seen finished.
    pub(crate) fn outstanding(&self) -> u16 {
        self.in_use - self.unflushed
    }

    /// Fills the next slot with a frame of `len` bytes written by `fill`; frames shorter than
    /// the Ethernet minimum are zero-padded. `None` when the ring is full.
    pub(crate) fn enqueue(&mut self, len: usize, fill: &mut dyn FnMut(&mut [u8])) -> Option<()> {
        if self.free_slots() == 0 {
            return None;
        }
        let slot = usize::from(self.next_to_use);
        let buffer = &mut self.buffers[slot];
        let wire_len = len.max(MIN_FRAME_LEN).min(buffer.len());
        let bytes = buffer.as_mut_slice();
        bytes[len.min(wire_len)..wire_len].fill(0);
        fill(&mut bytes[..len.min(wire_len)]);
        let descriptor =
            AdvancedTxDataDescriptor::single_buffer_frame(buffer.phys().0, wire_len as u16);
        write_descriptor(&mut self.descriptors, slot, descriptor.to_words());
        self.lengths[slot] = wire_len as u16;
        self.next_to_use = (self.next_to_use + 1) % self.size;
        self.in_use += 1;
        self.unflushed += 1;
        Some(())
    }

    /// The tail to write when frames were queued since the last doorbell.
    pub(crate) fn take_doorbell(&mut self) -> Option<u16> {
        if self.unflushed == 0 {
            return None;
        }
        self.unflushed = 0;
        // Buffer and descriptor writes must be visible before the device sees the tail.
        fence(Ordering::Release);
        Some(self.next_to_use)
    }

    /// Collects frames the device finished (DD written back), oldest first.
    pub(crate) fn reclaim(&mut self) -> Reclaimed {
        let mut reclaimed = Reclaimed::default();
        while self.outstanding() > 0 {
            let slot = usize::from(self.next_to_clean);
            let Some(words) = read_descriptor(&self.descriptors, slot) else {
                break;
            };
            if !AdvancedTxDataDescriptor::from_words(words).is_done() {
                break;
            }
            reclaimed.frames += 1;
            reclaimed.bytes += u64::from(self.lengths[slot]);
            self.next_to_clean = (self.next_to_clean + 1) % self.size;
            self.in_use -= 1;
        }
        reclaimed
    }
}

/// Why received descriptors were dropped, by cause.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct RxDrops {
    /// Write-back length of 0 or beyond the buffer.
    pub bad_length: u64,
    /// Frame error bits set.
    pub frame_errors: u64,
    /// Frames spread over several descriptors (never expected: buffers hold a whole frame).
    pub multi_descriptor: u64,
    /// Descriptors the device wrote back although they were not handed to it.
    pub unposted_written: u64,
}

impl RxDrops {
    pub(crate) fn total(&self) -> u64 {
        self.bad_length + self.frame_errors + self.multi_descriptor + self.unposted_written
    }
}

/// Receive ring: one buffer per descriptor; frames are handed to the caller straight from the
/// buffer, which the device does not own at that time.
pub(crate) struct RxRing {
    descriptors: DmaRegion,
    buffers: Vec<DmaRegion>,
    posted: Vec<bool>,
    size: u16,
    /// Next slot the device fills.
    next_to_clean: u16,
    /// Next slot to hand over (the software tail).
    next_to_use: u16,
    posted_count: u16,
    /// Inside a multi-descriptor frame that is being dropped.
    discarding: bool,
}

impl RxRing {
    pub(crate) fn new(
        dma: &impl DmaAllocator,
        size: u16,
        buffer_size: usize,
    ) -> Result<Self, Error> {
        let descriptors = allocate(
            dma,
            usize::from(size) * DESCRIPTOR_SIZE,
            RING_ALIGNMENT,
            "RX descriptors",
        )?;
        let buffers = (0..size)
            .map(|_| allocate(dma, buffer_size, BUFFER_ALIGNMENT, "RX buffers"))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(RxRing {
            descriptors,
            buffers,
            posted: alloc::vec![false; usize::from(size)],
            size,
            next_to_clean: 0,
            next_to_use: 0,
            posted_count: 0,
            discarding: false,
        })
    }

    /// Takes every buffer back (after a reset) and clears the ring.
    pub(crate) fn reset(&mut self) {
        for index in 0..usize::from(self.size) {
            write_descriptor(&mut self.descriptors, index, [0, 0]);
        }
        self.posted.iter_mut().for_each(|posted| *posted = false);
        self.next_to_clean = 0;
        self.next_to_use = 0;
        self.posted_count = 0;
        self.discarding = false;
    }

    /// Device address of the descriptor ring.
    pub(crate) fn base(&self) -> PhysAddr {
        self.descriptors.phys()
    }

    /// Ring length in bytes, for RDLEN.
    pub(crate) fn byte_len(&self) -> u32 {
        u32::from(self.size) * DESCRIPTOR_SIZE as u32
    }

    /// Bytes per buffer.
    pub(crate) fn buffer_size(&self) -> usize {
        self.buffers.first().map_or(0, DmaRegion::len)
    }

    /// Hands every free buffer but one to the device (a full ring would make RDT == RDH, which
    /// means empty). Returns the new tail if anything was posted.
    pub(crate) fn refill(&mut self, drops: &mut RxDrops) -> Option<u16> {
        let mut posted_any = false;
        while self.posted_count < self.size - 1 {
            let slot = usize::from(self.next_to_use);
            if let Some(words) = read_descriptor(&self.descriptors, slot) {
                // Consumed descriptors were zeroed, so DD here was written by a device that did
                // not own the descriptor.
                if AdvancedRxWriteBack::from_words(words)
                    .status()
                    .contains(RxStatus::DD)
                {
                    drops.unposted_written += 1;
                    log::warn!("igbvf: device wrote back RX descriptor {slot}, never handed over");
                }
            }
            let address = self.buffers[slot].phys().0;
            write_descriptor(
                &mut self.descriptors,
                slot,
                AdvancedRxReadDescriptor::new(address).to_words(),
            );
            self.posted[slot] = true;
            self.posted_count += 1;
            self.next_to_use = (self.next_to_use + 1) % self.size;
            posted_any = true;
        }
        if posted_any {
            fence(Ordering::Release);
            Some(self.next_to_use)
        } else {
            None
        }
    }

    /// Hands up to `budget` good frames to `sink`; returns (frames, bytes) delivered.
    pub(crate) fn receive(
        &mut self,
        budget: usize,
        drops: &mut RxDrops,
        sink: &mut dyn FnMut(&[u8], RxMeta),
    ) -> (usize, u64) {
        let mut delivered = 0;
        let mut bytes = 0u64;
        while delivered < budget && self.posted_count > 0 {
            let slot = usize::from(self.next_to_clean);
            let Some(words) = read_descriptor(&self.descriptors, slot) else {
                break;
            };
            let write_back = AdvancedRxWriteBack::from_words(words);
            let status = write_back.status();
            if !status.contains(RxStatus::DD) {
                break;
            }
            // The device is done with this descriptor and its buffer; read nothing of the
            // buffer before the DD check above.
            fence(Ordering::Acquire);
            debug_assert!(self.posted[slot], "next_to_clean only walks posted slots");
            self.posted[slot] = false;
            self.posted_count -= 1;
            self.next_to_clean = (self.next_to_clean + 1) % self.size;
            write_descriptor(&mut self.descriptors, slot, [0, 0]);

            let length = usize::from(write_back.length.get());
            let end_of_packet = status.contains(RxStatus::EOP);
            if self.discarding {
                self.discarding = !end_of_packet;
                continue;
            }
            if !end_of_packet {
                drops.multi_descriptor += 1;
                log::warn!("igbvf: frame spans several RX descriptors (slot {slot}); dropped");
                self.discarding = true;
                continue;
            }
            if status.intersects(RxStatus::FRAME_ERRORS) {
                drops.frame_errors += 1;
                log::warn!(
                    "igbvf: RX frame error bits {:#010x}; dropped",
                    status.bits()
                );
                continue;
            }
            let buffer = self.buffers[slot].as_slice();
            if length == 0 || length > buffer.len() {
                drops.bad_length += 1;
                log::warn!(
                    "igbvf: RX write-back length {length} for a {}-byte buffer; dropped",
                    buffer.len()
                );
                continue;
            }
            sink(
                &buffer[..length],
                RxMeta {
                    checksum_verified: false,
                },
            );
            delivered += 1;
            bytes += length as u64;
        }
        (delivered, bytes)
    }
}
