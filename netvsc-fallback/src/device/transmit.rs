//! Transmit path: a pool of pre-allocated buffer slots, header construction (checksum and
//! segmentation offload, virtio 1.x §5.1.6.2), batched doorbells and completion reclaim.

use alloc::collections::VecDeque;
use alloc::vec::Vec;

use log::warn;
use net_device::{DeviceError, DmaAllocator, PhysAddr, RegisterIo, TxMeta};

use super::{TRANSMIT_QUEUE_INDEX, VirtioNet, VirtioNetConfig, allocate_dma};
use crate::checksum::{TCP_CHECKSUM_OFFSET, complete_partial_checksum, parse_tcp_frame};
use crate::dma_memory::SlotPool;
use crate::error::{DmaPurpose, Error, QueueKind};
use crate::features::Features;
use crate::net_header::{NET_HEADER_LEN, NetHeaderFlags, VirtioNetHeader};
use crate::virtqueue::{DescriptorFlags, SplitQueue};

/// A frame's place in the pool, between allocation and submission.
#[derive(Debug)]
pub(super) struct TransmitAllocation {
    descriptor: u16,
    first_slot: usize,
    slot_count: usize,
    previous_head: usize,
    sequence: u64,
}

/// Slot space charged to one allocation (its slots plus any skipped tail of the pool),
/// released in allocation order.
struct Span {
    charged: usize,
    completed: bool,
}

/// A frame the device holds.
#[derive(Clone, Copy)]
struct InFlight {
    first_slot: usize,
    slot_count: usize,
    frame_len: usize,
    sequence: u64,
}

/// The transmit buffer pool: one DMA region of slots used as a ring, so that a frame (up to a
/// 64 KiB TSO frame) always gets physically contiguous space and one descriptor. Descriptors
/// are freed as soon as the device completes them; slot space is released oldest first.
pub(super) struct TransmitPool {
    slots: SlotPool,
    head: usize,
    tail: usize,
    in_use: usize,
    spans: VecDeque<Span>,
    first_sequence: u64,
    free_descriptors: Vec<u16>,
    in_flight: Vec<Option<InFlight>>,
}

impl TransmitPool {
    fn new(slots: SlotPool, descriptor_capacity: u16) -> Self {
        let slot_count = slots.slot_count();
        let mut pool = TransmitPool {
            slots,
            head: 0,
            tail: 0,
            in_use: 0,
            spans: VecDeque::with_capacity(slot_count),
            first_sequence: 0,
            free_descriptors: Vec::with_capacity(usize::from(descriptor_capacity)),
            in_flight: alloc::vec![None; usize::from(descriptor_capacity)],
        };
        pool.reset(descriptor_capacity);
        pool
    }

    /// Forgets everything in flight (after a device reset) and uses `descriptors` descriptors.
    fn reset(&mut self, descriptors: u16) {
        self.slots.reclaim_all();
        self.head = 0;
        self.tail = 0;
        self.in_use = 0;
        self.spans.clear();
        self.first_sequence = 0;
        self.free_descriptors.clear();
        let descriptors = descriptors.min(self.in_flight.len() as u16);
        self.free_descriptors.extend((0..descriptors).rev());
        self.in_flight.iter_mut().for_each(|entry| *entry = None);
    }

    fn slots_for(&self, bytes: usize) -> usize {
        bytes.div_ceil(self.slots.slot_size())
    }

    /// Where `needed` contiguous slots fit: (first slot, slots charged including a skipped
    /// tail of the pool).
    fn find_space(&self, needed: usize) -> Option<(usize, usize)> {
        let total = self.slots.slot_count();
        if needed == 0 || needed > total {
            return None;
        }
        if self.in_use == 0 {
            return Some((0, needed));
        }
        if self.head > self.tail {
            // Free: [head, total) and [0, tail).
            if self.head + needed <= total {
                Some((self.head, needed))
            } else if needed <= self.tail {
                Some((0, total - self.head + needed))
            } else {
                None
            }
        } else if self.head < self.tail {
            // Free: [head, tail).
            (self.head + needed <= self.tail).then_some((self.head, needed))
        } else {
            // head == tail with slots in use: full.
            None
        }
    }

    fn can_allocate(&self, bytes: usize) -> bool {
        !self.free_descriptors.is_empty() && self.find_space(self.slots_for(bytes)).is_some()
    }

    fn allocate(&mut self, bytes: usize) -> Option<TransmitAllocation> {
        let needed = self.slots_for(bytes);
        let (first_slot, charged) = self.find_space(needed)?;
        let descriptor = self.free_descriptors.pop()?;
        let previous_head = if self.in_use == 0 { 0 } else { self.head };
        let sequence = self.first_sequence + self.spans.len() as u64;
        if self.in_use == 0 {
            self.tail = 0;
        }
        self.head = (first_slot + needed) % self.slots.slot_count();
        self.in_use += charged;
        self.spans.push_back(Span {
            charged,
            completed: false,
        });
        Some(TransmitAllocation {
            descriptor,
            first_slot,
            slot_count: needed,
            previous_head,
            sequence,
        })
    }

    /// Undoes the most recent allocation (the frame turned out to be unsendable).
    fn cancel(&mut self, allocation: TransmitAllocation) {
        if let Some(span) = self.spans.pop_back() {
            self.in_use -= span.charged;
        }
        self.head = allocation.previous_head;
        if self.in_use == 0 {
            self.head = 0;
            self.tail = 0;
        }
        self.free_descriptors.push(allocation.descriptor);
    }

    fn buffer_mut(&mut self, allocation: &TransmitAllocation, bytes: usize) -> Option<&mut [u8]> {
        self.slots
            .span_mut(allocation.first_slot, allocation.slot_count)?
            .get_mut(..bytes)
    }

    /// Hands the allocation's slots to the device; returns the buffer's device address.
    fn submit(&mut self, allocation: &TransmitAllocation, frame_len: usize) -> Option<PhysAddr> {
        if !self
            .slots
            .give_to_device(allocation.first_slot, allocation.slot_count)
        {
            return None;
        }
        self.in_flight[usize::from(allocation.descriptor)] = Some(InFlight {
            first_slot: allocation.first_slot,
            slot_count: allocation.slot_count,
            frame_len,
            sequence: allocation.sequence,
        });
        self.slots.slot_phys(allocation.first_slot)
    }

    /// Completes descriptor `id` as reported by the device. Returns the frame length, or `None`
    /// when the id names no frame in flight (a bad used entry).
    fn complete(&mut self, id: u32) -> Option<usize> {
        let index = usize::try_from(id)
            .ok()
            .filter(|index| *index < self.in_flight.len())?;
        let entry = self.in_flight[index].take()?;
        self.slots
            .take_from_device(entry.first_slot, entry.slot_count);
        self.free_descriptors.push(index as u16);
        if let Some(span) = entry
            .sequence
            .checked_sub(self.first_sequence)
            .and_then(|position| self.spans.get_mut(position as usize))
        {
            span.completed = true;
        }
        // Release slot space oldest first: it is a ring.
        let total = self.slots.slot_count().max(1);
        while self.spans.front().is_some_and(|span| span.completed) {
            if let Some(span) = self.spans.pop_front() {
                self.tail = (self.tail + span.charged) % total;
                self.in_use -= span.charged;
                self.first_sequence += 1;
            }
        }
        if self.in_use == 0 {
            self.head = 0;
            self.tail = 0;
        }
        Some(entry.frame_len)
    }

    fn in_flight_count(&self) -> usize {
        self.in_flight
            .iter()
            .filter(|entry| entry.is_some())
            .count()
    }
}

/// The transmit queue, its buffer pool and doorbell batching state.
pub(super) struct TransmitPath {
    pub(super) queue: SplitQueue,
    pool: TransmitPool,
    pub(super) notify_offset: usize,
    /// Frames published since the last flush.
    batch: usize,
    /// A completion interrupt was requested because the ring filled up.
    interrupt_armed: bool,
}

impl TransmitPath {
    pub(super) fn allocate<D: DmaAllocator>(
        allocator: &D,
        config: &VirtioNetConfig,
    ) -> Result<Self, Error> {
        let queue = SplitQueue::allocate(allocator, config.tx_queue_size, QueueKind::Transmit)?;
        let len = config.tx_slot_size * config.tx_pool_slots;
        let region = allocate_dma(allocator, len, DmaPurpose::TransmitBuffers)?;
        let slots = SlotPool::new(region, config.tx_slot_size, config.tx_pool_slots).ok_or(
            Error::DmaAllocationFailed {
                purpose: DmaPurpose::TransmitBuffers,
                len,
            },
        )?;
        Ok(TransmitPath {
            queue,
            pool: TransmitPool::new(slots, config.tx_queue_size),
            notify_offset: 0,
            batch: 0,
            interrupt_armed: false,
        })
    }

    pub(super) fn configure(&mut self, size: u16, event_idx: bool) {
        self.queue.configure(size, event_idx);
        self.pool.reset(size);
        self.batch = 0;
        // Completions are reclaimed lazily (transmit, poll); interrupts only when full.
        self.queue.disable_interrupts();
        self.interrupt_armed = false;
    }

    pub(super) fn reclaim_after_reset(&mut self) {
        let descriptors = self.queue.size();
        self.pool.reset(descriptors);
        self.batch = 0;
    }

    pub(super) fn leak(&mut self) {
        self.queue.leak();
        self.pool.slots.leak();
    }

    /// Bytes in the pool.
    pub(super) fn pool_bytes(&self) -> usize {
        self.pool.slots.slot_size() * self.pool.slots.slot_count()
    }

    /// True when a buffer of `bytes` (header included) could be allocated now.
    pub(super) fn has_room(&self, bytes: usize) -> bool {
        self.pool.can_allocate(bytes)
    }
}

impl<R: RegisterIo, D: DmaAllocator> VirtioNet<R, D> {
    /// The largest frame `transmit` takes: a TSO frame when HOST_TSO was negotiated. The ring
    /// counts as having room only when one of those fits, since the stack commits to a frame
    /// before it knows its size.
    pub(super) fn largest_tx_frame(&self) -> usize {
        self.max_tso_frame.max(self.max_tx_frame)
    }

    /// The `transmit` datapath for a running device with link up.
    pub(super) fn transmit_frame(
        &mut self,
        len: usize,
        fill: &mut dyn FnMut(&mut [u8]) -> TxMeta,
    ) -> Result<(), DeviceError> {
        // Only a TSO frame may be longer than the MTU; whether it is one, `fill` says.
        let oversized = self.max_tso_frame > 0 && len > self.max_tx_frame;
        let max = if oversized {
            self.max_tso_frame
        } else {
            self.max_tx_frame
        };
        if len > max {
            return Err(DeviceError::FrameTooLarge { len, max });
        }
        let bytes = NET_HEADER_LEN + len;
        let allocation = match self.tx.pool.allocate(bytes) {
            Some(allocation) => allocation,
            None => {
                self.reclaim_transmitted();
                match self.tx.pool.allocate(bytes) {
                    Some(allocation) => allocation,
                    None => {
                        self.stats.tx_ring_full += 1;
                        self.arm_transmit_interrupt();
                        return Err(DeviceError::RingFull);
                    }
                }
            }
        };
        let Some(buffer) = self.tx.pool.buffer_mut(&allocation, bytes) else {
            self.tx.pool.cancel(allocation);
            return Err(DeviceError::RingFull);
        };
        let (header_bytes, frame) = buffer.split_at_mut(NET_HEADER_LEN);
        let meta = fill(frame);
        let segmentation = oversized && meta.tso_mss.is_some_and(|mss| mss > 0);
        if oversized && !segmentation {
            self.tx.pool.cancel(allocation);
            return Err(DeviceError::FrameTooLarge {
                len,
                max: self.max_tx_frame,
            });
        }
        let header = match transmit_header(frame, meta, segmentation, self.features) {
            Ok(header) => header,
            Err(HeaderProblem::Unsegmentable) => {
                self.tx.pool.cancel(allocation);
                return Err(DeviceError::FrameTooLarge {
                    len,
                    max: self.max_tx_frame,
                });
            }
            Err(HeaderProblem::ChecksumOutOfBounds {
                header,
                start,
                offset,
            }) => {
                self.counters.tx_checksum_errors += 1;
                if self.tx_warnings.should_log() {
                    warn!(
                        "{}: transmit checksum at {start}+{offset} lies outside a {len}-byte frame; sent as is",
                        self.name
                    );
                }
                header
            }
        };
        header.write(header_bytes);

        let Some(address) = self.tx.pool.submit(&allocation, len) else {
            self.tx.pool.cancel(allocation);
            return Err(DeviceError::RingFull);
        };
        let tx = &mut self.tx;
        tx.queue.write_descriptor(
            allocation.descriptor,
            address,
            bytes as u32,
            DescriptorFlags::empty(),
            0,
        );
        tx.queue.push_available(allocation.descriptor);
        // Publish now so a polling device can start; the doorbell waits for flush().
        tx.queue.publish();
        tx.batch += 1;
        Ok(())
    }

    /// Rings the transmit doorbell once for the frames queued since the last flush, if the
    /// device asked for notifications (EVENT_IDX / NO_NOTIFY).
    pub(super) fn flush_transmit(&mut self) {
        if self.tx.batch != 0 {
            self.tx.batch = 0;
            if self.tx.queue.needs_notification() {
                self.regions
                    .notify
                    .write16(self.tx.notify_offset, TRANSMIT_QUEUE_INDEX);
                self.counters.tx_notifications += 1;
            }
        }
        // A full ring makes `can_transmit` say no, so nobody calls `transmit` (which arms the
        // completion interrupt when it finds the ring full): arm it here, or the stack would
        // sleep until its next timer instead of waking when the ring drains.
        if !self.tx.interrupt_armed && !self.tx.has_room(NET_HEADER_LEN + self.largest_tx_frame()) {
            self.arm_transmit_interrupt();
            // Completions from before the arm raise no interrupt: collect them now.
            self.reclaim_transmitted();
        }
    }

    /// Frees the buffers of frames the device has sent. Never waits.
    pub(super) fn reclaim_transmitted(&mut self) {
        let mut entries_left = usize::from(self.tx.queue.size()) * 2;
        while entries_left > 0 {
            let pending = usize::from(self.tx.queue.used_pending());
            if pending == 0 {
                break;
            }
            let count = pending.min(entries_left);
            for ahead in 0..count {
                let element = self.tx.queue.peek_used(ahead as u16);
                match self.tx.pool.complete(element.id) {
                    Some(frame_len) => {
                        self.stats.tx_frames += 1;
                        self.stats.tx_bytes += frame_len as u64;
                    }
                    None => {
                        self.counters.tx_bad_completions += 1;
                        if self.tx_warnings.should_log() {
                            warn!(
                                "{}: ignored transmit completion id {} len {}: not in flight",
                                self.name, element.id, element.len
                            );
                        }
                    }
                }
            }
            self.tx.queue.consume_used(count as u16);
            entries_left -= count;
        }
        if self.tx.interrupt_armed && self.tx.has_room(NET_HEADER_LEN + self.largest_tx_frame()) {
            self.tx.queue.disable_interrupts();
            self.tx.interrupt_armed = false;
        }
    }

    /// Asks for a completion interrupt once three quarters of the frames in flight are sent,
    /// so the stack is woken when the full ring drains.
    fn arm_transmit_interrupt(&mut self) {
        let in_flight = self.tx.pool.in_flight_count();
        let ahead = (in_flight * 3 / 4).max(1) - 1;
        self.tx.queue.enable_interrupts_after(ahead as u16);
        self.tx.interrupt_armed = true;
    }
}

/// Why the requested offloads could not be expressed in the header.
enum HeaderProblem {
    /// Segmentation was needed but the frame is not TCP over IPv4/IPv6 the device can segment.
    Unsegmentable,
    /// The checksum location is outside the frame: sent without checksum offload.
    ChecksumOutOfBounds {
        header: VirtioNetHeader,
        start: usize,
        offset: usize,
    },
}

/// Builds the virtio-net header for `frame`: GSO fields for a frame larger than the MTU with an
/// MSS, NEEDS_CSUM for a checksum request (completed in software without CSUM).
fn transmit_header(
    frame: &mut [u8],
    meta: TxMeta,
    segmentation: bool,
    features: Features,
) -> Result<VirtioNetHeader, HeaderProblem> {
    let mut header = VirtioNetHeader::default();
    let checksum_fits = |start: usize, offset: usize| start + offset + 2 <= frame.len();
    if segmentation {
        let layout = parse_tcp_frame(frame).filter(|layout| {
            features.contains(if layout.ipv6 {
                Features::HOST_TSO6
            } else {
                Features::HOST_TSO4
            })
        });
        let Some(layout) = layout else {
            return Err(HeaderProblem::Unsegmentable);
        };
        let (start, offset) = meta
            .checksum
            .map(|(start, offset)| (usize::from(start), usize::from(offset)))
            .filter(|(start, offset)| checksum_fits(*start, *offset))
            .unwrap_or((layout.tcp_offset, TCP_CHECKSUM_OFFSET));
        // §5.1.6.2.1: a GSO frame must also carry NEEDS_CSUM and the MSS.
        header.flags = NetHeaderFlags::NEEDS_CSUM;
        header.gso_type = if layout.ipv6 {
            VirtioNetHeader::GSO_TCPV6
        } else {
            VirtioNetHeader::GSO_TCPV4
        };
        header.header_len = layout.headers_len as u16;
        header.gso_size = meta.tso_mss.unwrap_or_default();
        header.csum_start = start as u16;
        header.csum_offset = offset as u16;
        return Ok(header);
    }
    if let Some((start, offset)) = meta.checksum {
        let (start, offset) = (usize::from(start), usize::from(offset));
        if !checksum_fits(start, offset) {
            return Err(HeaderProblem::ChecksumOutOfBounds {
                header,
                start,
                offset,
            });
        }
        if features.contains(Features::CSUM) {
            header.flags = NetHeaderFlags::NEEDS_CSUM;
            header.csum_start = start as u16;
            header.csum_offset = offset as u16;
        } else if complete_partial_checksum(frame, start, offset).is_err() {
            return Err(HeaderProblem::ChecksumOutOfBounds {
                header,
                start,
                offset,
            });
        }
    }
    Ok(header)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::FakeDmaAllocator;

    fn pool(slots: usize, descriptors: u16) -> TransmitPool {
        let allocator = FakeDmaAllocator::new();
        let region = allocator.allocate(slots * 64, 64).unwrap();
        TransmitPool::new(SlotPool::new(region, 64, slots).unwrap(), descriptors)
    }

    #[test]
    fn allocations_are_contiguous_and_released_in_order() {
        let mut pool = pool(8, 8);
        let first = pool.allocate(3 * 64).unwrap();
        let second = pool.allocate(3 * 64).unwrap();
        assert_eq!((first.first_slot, second.first_slot), (0, 3));
        pool.submit(&first, 100).unwrap();
        pool.submit(&second, 100).unwrap();
        // Three slots do not fit in the two left at the end, nor before the tail.
        assert!(pool.allocate(3 * 64).is_none());
        // Out-of-order completion frees the descriptor but not the space.
        assert_eq!(pool.complete(u32::from(second.descriptor)), Some(100));
        assert!(pool.allocate(3 * 64).is_none());
        assert_eq!(pool.complete(u32::from(first.descriptor)), Some(100));
        let third = pool.allocate(8 * 64).unwrap();
        assert_eq!(third.first_slot, 0);
    }

    #[test]
    fn wraps_by_skipping_the_tail() {
        let mut pool = pool(8, 8);
        let first = pool.allocate(5 * 64).unwrap();
        let second = pool.allocate(2 * 64).unwrap();
        pool.submit(&first, 1).unwrap();
        pool.submit(&second, 1).unwrap();
        pool.complete(u32::from(first.descriptor)).unwrap();
        // One slot left at the end; four free at the start: the allocation wraps.
        let third = pool.allocate(4 * 64).unwrap();
        assert_eq!(third.first_slot, 0);
        pool.submit(&third, 1).unwrap();
        pool.complete(u32::from(second.descriptor)).unwrap();
        pool.complete(u32::from(third.descriptor)).unwrap();
        assert_eq!(pool.in_use, 0);
    }

    #[test]
    fn rejects_completions_not_in_flight() {
        let mut pool = pool(4, 4);
        assert_eq!(pool.complete(0), None);
        assert_eq!(pool.complete(9), None);
        assert_eq!(pool.complete(u32::MAX), None);
        let allocation = pool.allocate(10).unwrap();
        let descriptor = u32::from(allocation.descriptor);
        pool.submit(&allocation, 10).unwrap();
        assert_eq!(pool.complete(descriptor), Some(10));
        assert_eq!(pool.complete(descriptor), None, "duplicate completion");
    }

    #[test]
    fn cancel_restores_the_pool() {
        let mut pool = pool(4, 2);
        let kept = pool.allocate(64).unwrap();
        pool.submit(&kept, 64).unwrap();
        let cancelled = pool.allocate(3 * 64).unwrap();
        pool.cancel(cancelled);
        assert_eq!(
            (pool.head, pool.in_use, pool.free_descriptors.len()),
            (1, 1, 1)
        );
        assert!(pool.allocate(3 * 64).is_some());
    }
}
