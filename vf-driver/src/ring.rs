//! RX and TX descriptor rings over DMA memory. Nothing here touches MMIO: the rings return the
//! tail value to write, and the device code writes it once per batch.
//!
//! Everything the device writes back is untrusted: lengths are checked against the buffer,
//! error bits and multi-descriptor frames are dropped and counted, and a descriptor the device
//! wrote although it was never handed over is counted when it is next posted.

use crate::Error;
use crate::descriptors::{
    AdvancedRxReadDescriptor, AdvancedRxWriteBack, AdvancedTxDataDescriptor, DESCRIPTOR_SIZE,
    RxStatus, TX_CONTEXT_SLOTS, TxCommand,
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

/// `index + by` on a ring of `size` slots (`by` ≤ `size`). A compare instead of `%`: a
/// division by a runtime value is a helper call under an emulated CPU, on every frame.
fn wrapping_advance(index: usize, by: usize, size: usize) -> usize {
    let next = index + by;
    if next >= size { next - size } else { next }
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
    /// Packets the device finished (a TSO frame counts once, its FIN segment once more).
    pub frames: u64,
    /// Their bytes.
    pub bytes: u64,
}

/// One packet for the device: `len` bytes at `offset` in the transmit's buffer area.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct TxPacket {
    /// Offset from the start of the transmit's area.
    pub offset: usize,
    /// Bytes (each data descriptor takes at most one chunk of them).
    pub len: usize,
    /// Command bits beyond DTYP/DEXT/IFCS/EOP/RS (TSE).
    pub command: TxCommand,
    /// `olinfo_status` of the packet's first data descriptor (the others carry 0).
    pub olinfo_status: u32,
    /// The context (slot, descriptor words) the packet needs loaded first.
    pub context: Option<(usize, [u64; 2])>,
}

/// Bookkeeping of one transmit, kept at its first slot.
#[derive(Clone, Copy, Debug, Default)]
struct TxUnit {
    /// Descriptor slots it occupies (context and data descriptors).
    slots: u16,
    /// Packets it hands the device.
    frames: u16,
    /// Their bytes.
    bytes: u32,
}

/// Transmit ring.
///
/// Buffers: one DMA region of `size` chunks (one per slot) plus a tail. A transmit that
/// starts at slot `s` and occupies slots `s..s+n` writes its bytes contiguously from chunk `s`
/// on, using at most `n` chunks; one that runs past the last slot continues into the tail, and
/// the chunks of the slots it wrapped onto stay unused meanwhile. So every frame (a TSO frame
/// of up to 64 KiB included) is one contiguous slice for the stack to write into, data
/// descriptors each cover at most one chunk, and no slot's memory is shared between two
/// transmits in flight.
///
/// Completion: QEMU writes DD back only on descriptors with RS (`igb_txdesc_writeback`),
/// hardware with a write-back threshold may write it on others too; either way a transmit is
/// reclaimed when the DD of its last descriptor (EOP | RS) is seen, whatever the others say.
pub(crate) struct TxRing {
    descriptors: DmaRegion,
    buffers: DmaRegion,
    chunk: usize,
    units: Vec<TxUnit>,
    /// The context descriptor last written to each of the device's slots; `None` after a
    /// reset (the device may have forgotten them).
    contexts: [Option<[u64; 2]>; TX_CONTEXT_SLOTS],
    /// Context descriptors written so far.
    contexts_written: u64,
    size: u16,
    /// Next slot to fill (the software tail).
    next_to_use: u16,
    /// First slot of the oldest transmit the device has not been seen to finish.
    next_to_clean: u16,
    /// Slots filled and not reclaimed (flushed or not).
    in_use: u16,
    /// Slots filled since the last doorbell.
    unflushed: u16,
}

impl TxRing {
    /// A ring of `size` descriptors with `chunk`-byte buffers and `tail_chunks` chunks of
    /// buffer past the last slot (the most a transmit may use beyond its first chunk).
    pub(crate) fn new(
        dma: &impl DmaAllocator,
        size: u16,
        chunk: usize,
        tail_chunks: usize,
    ) -> Result<Self, Error> {
        let descriptors = allocate(
            dma,
            usize::from(size) * DESCRIPTOR_SIZE,
            RING_ALIGNMENT,
            "TX descriptors",
        )?;
        let buffers = allocate(
            dma,
            (usize::from(size) + tail_chunks) * chunk,
            BUFFER_ALIGNMENT,
            "TX buffers",
        )?;
        Ok(TxRing {
            descriptors,
            buffers,
            chunk,
            units: alloc::vec![TxUnit::default(); usize::from(size)],
            contexts: [None; TX_CONTEXT_SLOTS],
            contexts_written: 0,
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
        self.units
            .iter_mut()
            .for_each(|unit| *unit = TxUnit::default());
        self.contexts = [None; TX_CONTEXT_SLOTS];
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

    /// Slots that can take descriptors now. One slot always stays empty so that a full ring
    /// never looks empty to the device (TDT == TDH means "nothing to do").
    pub(crate) fn free_slots(&self) -> u16 {
        self.size - 1 - self.in_use
    }

    /// Slots handed to the device (doorbell rung) and not yet seen finished.
    pub(crate) fn outstanding(&self) -> u16 {
        self.in_use - self.unflushed
    }

    /// Context descriptors written so far.
    pub(crate) fn contexts_written(&self) -> u64 {
        self.contexts_written
    }

    /// The context descriptors the device holds, as last written.
    pub(crate) fn loaded_contexts(&self) -> [Option<[u64; 2]>; TX_CONTEXT_SLOTS] {
        self.contexts
    }

    /// The buffer memory of the next transmit: `bytes` from the next slot's chunk on (into the
    /// tail when it wraps). `None` when that would leave the region.
    pub(crate) fn area(&mut self, bytes: usize) -> Option<&mut [u8]> {
        let start = usize::from(self.next_to_use) * self.chunk;
        self.buffers
            .as_mut_slice()
            .get_mut(start..start.checked_add(bytes)?)
    }

    /// Descriptor slots `packets` need, given the contexts the device holds.
    fn slots_for(&self, packets: &[Option<TxPacket>]) -> usize {
        let mut contexts = self.contexts;
        let mut slots = 0;
        for packet in packets.iter().flatten() {
            if let Some((index, words)) = packet.context
                && contexts
                    .get(index)
                    .is_some_and(|loaded| *loaded != Some(words))
            {
                contexts[index] = Some(words);
                slots += 1;
            }
            slots += self.data_descriptors(packet);
        }
        slots
    }

    /// Data descriptors of `packet`: one per chunk it touches.
    fn data_descriptors(&self, packet: &TxPacket) -> usize {
        if packet.len == 0 {
            return 0;
        }
        (packet.offset + packet.len).div_ceil(self.chunk) - packet.offset / self.chunk
    }

    /// Writes the descriptors of one transmit whose bytes are in [`TxRing::area`]: for each
    /// packet its context descriptor (unless the device holds it already), then one data
    /// descriptor per chunk, EOP | RS on the last. `frames`/`bytes` are what reclaiming it
    /// reports. False (nothing written) when it does not fit the free slots or its bytes
    /// would use more chunks than it has slots.
    pub(crate) fn commit(&mut self, packets: &[Option<TxPacket>], frames: u16, bytes: u32) -> bool {
        let slots = self.slots_for(packets);
        let chunks_used = packets
            .iter()
            .flatten()
            .map(|packet| (packet.offset + packet.len).div_ceil(self.chunk))
            .max()
            .unwrap_or(0);
        if slots == 0 || slots > usize::from(self.free_slots()) || chunks_used > slots {
            return false;
        }
        let first = self.next_to_use;
        let area_base = self.buffers.phys().0 + u64::from(first) * self.chunk as u64;
        let mut slot = usize::from(first);
        let size = usize::from(self.size);
        for packet in packets.iter().flatten() {
            if let Some((index, words)) = packet.context
                && self
                    .contexts
                    .get(index)
                    .is_some_and(|loaded| *loaded != Some(words))
            {
                write_descriptor(&mut self.descriptors, slot, words);
                self.contexts[index] = Some(words);
                self.contexts_written += 1;
                slot = wrapping_advance(slot, 1, size);
            }
            let mut done = 0;
            while done < packet.len {
                let offset = packet.offset + done;
                let piece = (self.chunk - offset % self.chunk).min(packet.len - done);
                let last = done + piece == packet.len;
                let mut command = packet.command;
                if last {
                    command |= TxCommand::EOP | TxCommand::RS;
                }
                let olinfo_status = if done == 0 { packet.olinfo_status } else { 0 };
                let descriptor = AdvancedTxDataDescriptor::new(
                    area_base + offset as u64,
                    piece as u16,
                    command,
                    olinfo_status,
                );
                write_descriptor(&mut self.descriptors, slot, descriptor.to_words());
                slot = wrapping_advance(slot, 1, size);
                done += piece;
            }
        }
        self.units[usize::from(first)] = TxUnit {
            slots: slots as u16,
            frames,
            bytes,
        };
        self.next_to_use = slot as u16;
        self.in_use += slots as u16;
        self.unflushed += slots as u16;
        true
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

    /// The oldest outstanding transmit (its first slot and record) when the device finished
    /// it (DD on its last descriptor).
    fn oldest_finished(&self) -> Option<(usize, TxUnit)> {
        if self.outstanding() == 0 {
            return None;
        }
        let first = usize::from(self.next_to_clean);
        let unit = self.units[first];
        if unit.slots == 0 || unit.slots > self.outstanding() {
            // Only a bookkeeping bug could get here; stop rather than walk garbage.
            log::error!("igbvf: TX slot {first} has no transmit recorded");
            return None;
        }
        let last = wrapping_advance(first, usize::from(unit.slots) - 1, usize::from(self.size));
        read_descriptor(&self.descriptors, last)
            .filter(|&words| AdvancedTxDataDescriptor::from_words(words).is_done())
            .map(|_| (first, unit))
    }

    /// True when [`TxRing::reclaim`] would make progress.
    pub(crate) fn has_completion(&self) -> bool {
        self.oldest_finished().is_some()
    }

    /// Collects transmits the device finished (DD on their last descriptor), oldest first.
    pub(crate) fn reclaim(&mut self) -> Reclaimed {
        let mut reclaimed = Reclaimed::default();
        while let Some((first, unit)) = self.oldest_finished() {
            reclaimed.frames += u64::from(unit.frames);
            reclaimed.bytes += u64::from(unit.bytes);
            self.units[first] = TxUnit::default();
            self.next_to_clean =
                wrapping_advance(first, usize::from(unit.slots), usize::from(self.size)) as u16;
            self.in_use -= unit.slots;
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

/// What the device said about received checksums.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct RxChecksums {
    /// Frames delivered as verified (the stack skips its own check).
    pub verified: u64,
    /// Frames with IPE or L4E, delivered unverified so the stack checks (and drops) them.
    pub errors: u64,
}

/// IPv4 ethertype as it sits in the frame.
const ETHERTYPE_IPV4: [u8; 2] = [0x08, 0x00];
/// IPv6 ethertype as it sits in the frame.
const ETHERTYPE_IPV6: [u8; 2] = [0x86, 0xDD];
/// 802.1Q tag protocol identifier as it sits in the frame.
const ETHERTYPE_VLAN: [u8; 2] = [0x81, 0x00];

/// True when the write-back vouches for every checksum of `frame` (82576 datasheet §7.1.5.2;
/// Linux `igb_rx_checksum` reads the same bits): an L4 checksum was checked (TCPCS/L4I or
/// UDPCS), for IPv4 the header checksum too (IPCS), and neither error bit is set. Frames the
/// device only partly checked (ICMP, fragments, RXCSUM offloads off at the PF) are left to the
/// stack.
fn checksums_verified(status: RxStatus, frame: &[u8]) -> bool {
    if status.intersects(RxStatus::IP_CHECKSUM_ERROR | RxStatus::L4_CHECKSUM_ERROR)
        || !status.intersects(RxStatus::TCP_CHECKSUM | RxStatus::UDP_CHECKSUM)
    {
        return false;
    }
    // A stripped VLAN tag (VP) is gone from the buffer; an unstripped one is skipped here.
    let ethertype = match frame.get(12..14) {
        Some(tag) if tag == ETHERTYPE_VLAN => frame.get(16..18),
        other => other,
    };
    match ethertype {
        Some(ethertype) if ethertype == ETHERTYPE_IPV4 => status.contains(RxStatus::IP_CHECKSUM),
        Some(ethertype) if ethertype == ETHERTYPE_IPV6 => true,
        _ => false,
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

    /// True when the device has written back the next descriptor: [`RxRing::receive`] would
    /// find a frame (or a drop) there.
    pub(crate) fn has_write_back(&self) -> bool {
        self.posted_count > 0
            && read_descriptor(&self.descriptors, usize::from(self.next_to_clean)).is_some_and(
                |words| {
                    AdvancedRxWriteBack::from_words(words)
                        .status()
                        .contains(RxStatus::DD)
                },
            )
    }

    /// Buffers handed back per RDT write at least (half the ring, at most 512): each tail
    /// write is a register access, under emulation an exit that waits for the device model's
    /// lock, which QEMU's I/O thread holds while it receives a burst from the tap (`perf` of a
    /// bulk receive: the vCPU thread was off CPU ~40 % of the time, and ~70 % of its context
    /// switches were waits for that lock at register accesses). A ring that still holds half
    /// its buffers loses nothing by waiting: 512 of the 1024 the kernel gives the VF are
    /// 0.7 MB, several milliseconds of frames at line rate, and every receive call checks
    /// again (Linux igbvf writes every 16 on 256-entry rings; one write per 128 took ~2 per
    /// poll of 256 frames here).
    fn refill_batch(&self) -> u16 {
        ((self.size - 1) / 2).clamp(1, 512)
    }

    /// Hands every free buffer but one to the device (a full ring would make RDT == RDH, which
    /// means empty), once at least [`RxRing::refill_batch`] are free. Returns the new tail if
    /// anything was posted.
    pub(crate) fn refill(&mut self, drops: &mut RxDrops) -> Option<u16> {
        if self.size - 1 - self.posted_count < self.refill_batch() {
            return None;
        }
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
            self.next_to_use =
                wrapping_advance(usize::from(self.next_to_use), 1, usize::from(self.size)) as u16;
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
        checksums: &mut RxChecksums,
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
            self.next_to_clean =
                wrapping_advance(usize::from(self.next_to_clean), 1, usize::from(self.size)) as u16;
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
            let frame = &buffer[..length];
            let checksum_verified = checksums_verified(status, frame);
            checksums.verified += u64::from(checksum_verified);
            if status.intersects(RxStatus::IP_CHECKSUM_ERROR | RxStatus::L4_CHECKSUM_ERROR) {
                checksums.errors += 1;
                if checksums.errors.is_power_of_two() {
                    log::warn!(
                        "igbvf: RX checksum error bits {:#010x} ({} so far); delivered unverified",
                        status.bits(),
                        checksums.errors
                    );
                }
            }
            sink(
                frame,
                RxMeta {
                    checksum_verified,
                    ..RxMeta::default()
                },
            );
            delivered += 1;
            bytes += length as u64;
        }
        (delivered, bytes)
    }
}
