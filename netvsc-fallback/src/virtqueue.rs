//! A split virtqueue (virtio 1.x §2.7) in one DMA region: descriptor table, available ring and
//! used ring, with VIRTIO_F_EVENT_IDX notification suppression. No MMIO here: the caller rings
//! the doorbell when [`SplitQueue::needs_notification`] says so.

use core::sync::atomic::{Ordering, fence};

use bitflags::bitflags;
use net_device::{DmaAllocator, DmaRegion, PhysAddr};

use crate::dma_memory::{self, read_u16, read_u32, write_u16};
use crate::error::{DmaPurpose, Error, QueueKind};

/// Size of one descriptor: le64 addr, le32 len, le16 flags, le16 next (§2.7.5).
const DESCRIPTOR_SIZE: usize = 16;
/// Available ring: le16 flags, le16 idx, then the entries (§2.7.6).
const AVAIL_RING_ENTRIES: usize = 4;
/// Used ring: le16 flags, le16 idx, then 8-byte elements (§2.7.8).
const USED_RING_ENTRIES: usize = 4;
/// Size of one used element: le32 id, le32 len.
const USED_ELEMENT_SIZE: usize = 8;

bitflags! {
    /// Descriptor `flags` (§2.7.5).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub(crate) struct DescriptorFlags: u16 {
        /// The buffer continues in the descriptor named by `next`.
        const NEXT = 1;
        /// The device writes this buffer (otherwise it only reads it).
        const WRITE = 2;
    }
}

bitflags! {
    /// Available ring `flags` (§2.7.6).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    struct AvailFlags: u16 {
        /// The driver does not want used buffer notifications (ignored with EVENT_IDX).
        const NO_INTERRUPT = 1;
    }
}

bitflags! {
    /// Used ring `flags` (§2.7.8).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    struct UsedFlags: u16 {
        /// The device does not want available buffer notifications (ignored with EVENT_IDX).
        const NO_NOTIFY = 1;
    }
}

/// One used ring element, exactly as the device wrote it (untrusted).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct UsedElement {
    /// Head descriptor index of the used buffer.
    pub id: u32,
    /// Bytes the device wrote into the buffer.
    pub len: u32,
}

/// The three ring addresses the device is given (`queue_desc`, `queue_driver`, `queue_device`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RingAreas {
    /// Descriptor table.
    pub descriptors: PhysAddr,
    /// Available ring (driver area).
    pub driver: PhysAddr,
    /// Used ring (device area).
    pub device: PhysAddr,
}

/// `vring_need_event` (§2.7.10): true when the index moving from `old` to `new` passes `event`.
pub(crate) fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

/// Offsets of the three parts for a queue of `size` entries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RingLayout {
    /// Available ring offset (descriptor table is at 0, 16-aligned by the allocation).
    pub avail: usize,
    /// Used ring offset (4-aligned, §2.7).
    pub used: usize,
    /// Total bytes.
    pub total: usize,
}

impl RingLayout {
    pub(crate) fn new(size: u16) -> Self {
        let size = usize::from(size);
        let avail = DESCRIPTOR_SIZE * size;
        // flags, idx, ring[size], used_event
        let avail_len = AVAIL_RING_ENTRIES + 2 * size + 2;
        let used = (avail + avail_len).next_multiple_of(4);
        // flags, idx, ring[size], avail_event
        let used_len = USED_RING_ENTRIES + USED_ELEMENT_SIZE * size + 2;
        RingLayout {
            avail,
            used,
            total: used + used_len,
        }
    }

    pub(crate) fn used_event(&self, size: u16) -> usize {
        self.avail + AVAIL_RING_ENTRIES + 2 * usize::from(size)
    }

    pub(crate) fn avail_event(&self, size: u16) -> usize {
        self.used + USED_RING_ENTRIES + USED_ELEMENT_SIZE * usize::from(size)
    }
}

/// The driver side of one split virtqueue.
pub(crate) struct SplitQueue {
    memory: DmaRegion,
    capacity: u16,
    size: u16,
    layout: RingLayout,
    event_idx: bool,
    /// Our copy of `avail.idx` including entries not yet published.
    next_avail: u16,
    /// `avail.idx` as last written to memory.
    published_avail: u16,
    /// `avail.idx` when the driver last decided whether to notify.
    checked_avail: u16,
    /// Next used ring entry the driver will look at.
    last_used: u16,
}

impl SplitQueue {
    /// Allocates zeroed ring memory for up to `capacity` entries (a power of two).
    pub(crate) fn allocate<D: DmaAllocator>(
        allocator: &D,
        capacity: u16,
        kind: QueueKind,
    ) -> Result<Self, Error> {
        let layout = RingLayout::new(capacity);
        let memory = allocator
            .allocate(layout.total, 4096)
            .filter(|memory| memory.len() >= layout.total)
            .ok_or(Error::DmaAllocationFailed {
                purpose: DmaPurpose::Ring(kind),
                len: layout.total,
            })?;
        Ok(SplitQueue {
            memory,
            capacity,
            size: capacity,
            layout,
            event_idx: false,
            next_avail: 0,
            published_avail: 0,
            checked_avail: 0,
            last_used: 0,
        })
    }

    /// The largest size this memory can hold.
    pub(crate) fn capacity(&self) -> u16 {
        self.capacity
    }

    /// Resets the queue to empty with `size` entries (a power of two, at most the capacity).
    /// Only call while the device does not use the queue (before enabling it, or after reset).
    pub(crate) fn configure(&mut self, size: u16, event_idx: bool) {
        // Never panics, even on leaked (zero-capacity) memory.
        let size = size.min(self.capacity).max(1);
        self.memory.as_mut_slice().fill(0);
        self.size = size;
        self.layout = RingLayout::new(size);
        self.event_idx = event_idx;
        self.next_avail = 0;
        self.published_avail = 0;
        self.checked_avail = 0;
        self.last_used = 0;
    }

    /// Number of entries.
    pub(crate) fn size(&self) -> u16 {
        self.size
    }

    /// Physical addresses of the three parts.
    pub(crate) fn areas(&self) -> RingAreas {
        let base = self.memory.phys().0;
        RingAreas {
            descriptors: PhysAddr(base),
            driver: PhysAddr(base + self.layout.avail as u64),
            device: PhysAddr(base + self.layout.used as u64),
        }
    }

    /// Fills descriptor `index`.
    pub(crate) fn write_descriptor(
        &mut self,
        index: u16,
        address: PhysAddr,
        len: u32,
        flags: DescriptorFlags,
        next: u16,
    ) {
        debug_assert!(index < self.size);
        let offset = DESCRIPTOR_SIZE * usize::from(index % self.size);
        let low_written = self.memory.write_volatile_u64(offset, address.0);
        let high = u64::from(len) | u64::from(flags.bits()) << 32 | u64::from(next) << 48;
        let high_written = self.memory.write_volatile_u64(offset + 8, high);
        debug_assert!(
            low_written && high_written,
            "descriptor {index} outside ring memory"
        );
    }

    /// Puts a descriptor chain head in the next available ring slot (not yet visible).
    pub(crate) fn push_available(&mut self, head: u16) {
        let slot = usize::from(self.next_avail % self.size);
        let written = write_u16(
            &mut self.memory,
            self.layout.avail + AVAIL_RING_ENTRIES + 2 * slot,
            head,
        );
        debug_assert!(written);
        self.next_avail = self.next_avail.wrapping_add(1);
    }

    /// Makes the pushed entries visible to the device by updating `avail.idx`.
    pub(crate) fn publish(&mut self) {
        if self.published_avail == self.next_avail {
            return;
        }
        // §2.7.13: descriptors and ring entries must be visible before the index that exposes
        // them.
        fence(Ordering::Release);
        write_u16(&mut self.memory, self.layout.avail + 2, self.next_avail);
        self.published_avail = self.next_avail;
    }

    /// Decides whether entries published since the last decision need a doorbell (§2.7.13.4).
    pub(crate) fn needs_notification(&mut self) -> bool {
        let old = self.checked_avail;
        let new = self.published_avail;
        if old == new {
            return false;
        }
        self.checked_avail = new;
        // The index update must be visible before reading the device's suppression state, or
        // the device may go to sleep between the two and never see the new buffers.
        fence(Ordering::SeqCst);
        if self.event_idx {
            let avail_event =
                read_u16(&self.memory, self.layout.avail_event(self.size)).unwrap_or(0);
            need_event(avail_event, new, old)
        } else {
            let flags = read_u16(&self.memory, self.layout.used).unwrap_or(0);
            !UsedFlags::from_bits_retain(flags).contains(UsedFlags::NO_NOTIFY)
        }
    }

    /// How many used entries the device has published that the driver has not consumed. The
    /// value is untrusted: a broken device may report more than the queue size.
    pub(crate) fn used_pending(&self) -> u16 {
        let used_idx = read_u16(&self.memory, self.layout.used + 2).unwrap_or(self.last_used);
        // The entries (and buffer contents) must be read after the index that published them.
        fence(Ordering::Acquire);
        used_idx.wrapping_sub(self.last_used)
    }

    /// The used element `ahead` entries after the next unconsumed one.
    pub(crate) fn peek_used(&self, ahead: u16) -> UsedElement {
        let slot = usize::from(self.last_used.wrapping_add(ahead) % self.size);
        let offset = self.layout.used + USED_RING_ENTRIES + USED_ELEMENT_SIZE * slot;
        UsedElement {
            id: read_u32(&self.memory, offset).unwrap_or(u32::MAX),
            len: read_u32(&self.memory, offset + 4).unwrap_or(u32::MAX),
        }
    }

    /// Marks `count` used entries consumed.
    pub(crate) fn consume_used(&mut self, count: u16) {
        self.last_used = self.last_used.wrapping_add(count);
    }

    /// Asks for a used buffer notification once the device has used `ahead + 1` more entries
    /// (`ahead` = 0: on the next one).
    pub(crate) fn enable_interrupts_after(&mut self, ahead: u16) {
        if self.event_idx {
            let event = self.last_used.wrapping_add(ahead);
            write_u16(&mut self.memory, self.layout.used_event(self.size), event);
        } else {
            write_u16(&mut self.memory, self.layout.avail, 0);
        }
        // The caller re-checks `used_pending` afterwards; the write must be visible first.
        fence(Ordering::SeqCst);
    }

    /// Asks the device not to send used buffer notifications (a hint only, §2.7.7).
    pub(crate) fn disable_interrupts(&mut self) {
        if self.event_idx {
            // An event index just behind the consumer is only passed again after a full wrap.
            let event = self.last_used.wrapping_sub(1);
            write_u16(&mut self.memory, self.layout.used_event(self.size), event);
        } else {
            write_u16(
                &mut self.memory,
                self.layout.avail,
                AvailFlags::NO_INTERRUPT.bits(),
            );
        }
    }

    /// Forgets the ring memory instead of freeing it (the device may still access it).
    pub(crate) fn leak(&mut self) {
        core::mem::forget(core::mem::replace(
            &mut self.memory,
            dma_memory::empty_region(),
        ));
        self.capacity = 0;
        self.size = 1;
    }

    /// The ring memory (unit tests inspect it).
    #[cfg(test)]
    pub(crate) fn memory(&self) -> &DmaRegion {
        &self.memory
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::FakeDmaAllocator;

    #[test]
    fn need_event_matches_the_spec_formula() {
        // Device asked to be told when entry 5 is made available.
        assert!(need_event(5, 6, 5));
        assert!(need_event(5, 10, 3));
        assert!(!need_event(5, 5, 3));
        assert!(!need_event(10, 9, 3));
        // Wrap-around.
        assert!(need_event(0xFFFF, 2, 0xFFFE));
        assert!(!need_event(0xFFFD, 2, 0xFFFE));
    }

    #[test]
    fn layout_respects_alignment() {
        for size in [1u16, 2, 64, 256, 1024, 32768] {
            let layout = RingLayout::new(size);
            assert_eq!(layout.avail, 16 * usize::from(size));
            assert_eq!(layout.used % 4, 0);
            assert!(layout.used >= layout.used_event(size) + 2);
            assert_eq!(layout.avail_event(size) + 2, layout.total);
        }
    }

    #[test]
    fn publish_then_notify_once_and_consume_used() {
        let allocator = FakeDmaAllocator::new();
        let mut queue = SplitQueue::allocate(&allocator, 8, QueueKind::Transmit).unwrap();
        queue.configure(8, true);
        queue.push_available(3);
        queue.push_available(5);
        assert!(!queue.needs_notification(), "nothing published yet");
        queue.publish();
        assert_eq!(read_u16(queue.memory(), queue.layout.avail + 2), Some(2));
        assert!(queue.needs_notification());
        assert!(
            !queue.needs_notification(),
            "already decided for these entries"
        );
        assert_eq!(queue.used_pending(), 0);
    }
}
