//! Receive path: posting buffers, validating every used entry, merging buffers (MRG_RXBUF) and
//! completing partial checksums (virtio 1.x §5.1.6.3 and §5.1.6.4).

use alloc::vec::Vec;

use log::warn;
use net_device::{DmaAllocator, RegisterIo, RxMeta};

use super::{RECEIVE_QUEUE_INDEX, VirtioNet, VirtioNetConfig, allocate_dma};
use crate::checksum::complete_partial_checksum;
use crate::dma_memory::SlotPool;
use crate::error::{DmaPurpose, Error, QueueKind};
use crate::features::Features;
use crate::net_header::{NET_HEADER_LEN, NetHeaderFlags, VirtioNetHeader};
use crate::virtqueue::{DescriptorFlags, SplitQueue, UsedElement};

/// Why a used entry (or the frame it starts) was dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BadReceive {
    /// The id is not a descriptor of this queue.
    IdOutOfRange,
    /// The descriptor is not posted: never given to the device, or already returned (duplicate).
    NotPosted,
    /// The device claims to have written more than the buffer holds.
    LengthBeyondBuffer,
    /// The first buffer of a frame is shorter than the virtio-net header.
    ShorterThanHeader,
    /// `num_buffers` is 0, more than the buffers the device holds, more than the longest
    /// frame needs, or more than 1 while the first buffer is not full (§5.1.6.3.2: all buffers
    /// but the last are used completely).
    ImpossibleBufferCount,
    /// The merged frame is longer than any frame the device may deliver.
    FrameTooLong,
    /// NEEDS_CSUM offsets point outside the frame.
    ChecksumOutOfBounds,
}

impl BadReceive {
    /// Whether the entry still names a buffer the device really held, which must be reposted.
    fn buffer_was_ours(self) -> bool {
        !matches!(self, BadReceive::IdOutOfRange | BadReceive::NotPosted)
    }
}

/// What handling the next used entries achieved.
enum Step {
    /// Entries consumed; `delivered` says whether a frame went to the sink.
    Consumed { entries: usize, delivered: bool },
    /// A merged frame's buffers are not all used yet; `needed` entries are required.
    Incomplete { needed: u16 },
}

/// The receive queue and its buffers (one per descriptor, descriptor `i` ↔ slot `i`).
pub(super) struct ReceivePath {
    pub(super) queue: SplitQueue,
    buffers: SlotPool,
    pub(super) notify_offset: usize,
    /// Buffers taken back from the device, to post again in one batch.
    refill: Vec<u16>,
    /// The buffers of the frame being assembled: (descriptor, bytes written).
    frame_parts: Vec<(u16, usize)>,
    /// Reassembly space for frames spanning several buffers.
    merged: Vec<u8>,
    mergeable: bool,
}

impl ReceivePath {
    pub(super) fn allocate<D: DmaAllocator>(
        allocator: &D,
        config: &VirtioNetConfig,
    ) -> Result<Self, Error> {
        let queue = SplitQueue::allocate(allocator, config.rx_queue_size, QueueKind::Receive)?;
        let count = usize::from(config.rx_queue_size);
        let len = config.rx_buffer_size * count;
        let region = allocate_dma(allocator, len, DmaPurpose::ReceiveBuffers)?;
        let buffers = SlotPool::new(region, config.rx_buffer_size, count).ok_or(
            Error::DmaAllocationFailed {
                purpose: DmaPurpose::ReceiveBuffers,
                len,
            },
        )?;
        Ok(ReceivePath {
            queue,
            buffers,
            notify_offset: 0,
            refill: Vec::with_capacity(count),
            frame_parts: Vec::with_capacity(count),
            merged: Vec::new(),
            mergeable: false,
        })
    }

    /// Resets the ring for `size` entries and points descriptor `i` at buffer `i` for good.
    pub(super) fn configure(&mut self, size: u16, event_idx: bool) {
        self.queue.configure(size, event_idx);
        let buffer_len = self.buffers.slot_size() as u32;
        for index in 0..self.queue.size() {
            if let Some(address) = self.buffers.slot_phys(usize::from(index)) {
                self.queue
                    .write_descriptor(index, address, buffer_len, DescriptorFlags::WRITE, 0);
            }
        }
        self.refill.clear();
    }

    /// Sets up merged-frame reassembly (its memory is reserved once, not per frame).
    pub(super) fn prepare_merge_buffer(&mut self, mergeable: bool, max_frame: usize) {
        self.mergeable = mergeable;
        self.merged.clear();
        if mergeable {
            self.merged.reserve(max_frame);
        }
    }

    /// Posts every buffer (before DRIVER_OK) and asks for an interrupt on the first frame.
    pub(super) fn post_all(&mut self, size: u16) {
        for index in 0..size {
            if self.buffers.give_to_device(usize::from(index), 1) {
                self.queue.push_available(index);
            }
        }
        self.queue.publish();
        self.queue.enable_interrupts_after(0);
    }

    /// After a device reset every buffer is the driver's again.
    pub(super) fn reclaim_after_reset(&mut self) {
        self.buffers.reclaim_all();
        self.refill.clear();
    }

    pub(super) fn leak(&mut self) {
        self.queue.leak();
        self.buffers.leak();
    }

    /// Checks one used entry against what the driver posted. `first` entries must hold the
    /// header. Returns the descriptor and length.
    fn check_entry(&self, element: UsedElement, first: bool) -> Result<(u16, usize), BadReceive> {
        let id = u16::try_from(element.id)
            .ok()
            .filter(|id| *id < self.queue.size())
            .ok_or(BadReceive::IdOutOfRange)?;
        if !self.buffers.is_device_owned(usize::from(id)) {
            return Err(BadReceive::NotPosted);
        }
        let len = element.len as usize;
        if len > self.buffers.slot_size() {
            return Err(BadReceive::LengthBeyondBuffer);
        }
        if first && len < NET_HEADER_LEN {
            return Err(BadReceive::ShorterThanHeader);
        }
        Ok((id, len))
    }

    /// Takes a buffer back from the device and queues it for reposting.
    fn take_back(&mut self, id: u16) {
        if self.buffers.take_from_device(usize::from(id), 1) {
            self.refill.push(id);
        }
    }

    /// Posts the taken-back buffers in one batch. Returns whether the doorbell must be rung.
    fn repost(&mut self) -> bool {
        if self.refill.is_empty() {
            return false;
        }
        for id in self.refill.drain(..) {
            if self.buffers.give_to_device(usize::from(id), 1) {
                self.queue.push_available(id);
            }
        }
        self.queue.publish();
        self.queue.needs_notification()
    }
}

/// Applies the header's checksum information to a complete frame.
fn checksum_meta(
    frame: &mut [u8],
    header: &VirtioNetHeader,
    guest_csum: bool,
    complete_partial: bool,
) -> Result<(RxMeta, bool), BadReceive> {
    if !guest_csum {
        // §5.1.6.4.1: without GUEST_CSUM the flags are meaningless (the device must send 0).
        return Ok((
            RxMeta {
                checksum_verified: false,
                ..RxMeta::default()
            },
            false,
        ));
    }
    // With RSC_INFO the checksum fields carry coalescing counts instead (§5.1.6.4).
    if header.flags.contains(NetHeaderFlags::NEEDS_CSUM)
        && !header.flags.contains(NetHeaderFlags::RSC_INFO)
    {
        let (start, offset) = (
            usize::from(header.csum_start),
            usize::from(header.csum_offset),
        );
        if !complete_partial {
            // §5.1.6.4: the device validated the data; only the field is incomplete. A stack
            // that consumes the frame never reads it, so summing (up to 64 KiB) is wasted work.
            if start + offset + 2 > frame.len() {
                return Err(BadReceive::ChecksumOutOfBounds);
            }
            return Ok((
                RxMeta {
                    checksum_verified: true,
                    checksum_partial: true,
                },
                false,
            ));
        }
        complete_partial_checksum(frame, start, offset)
            .map_err(|_| BadReceive::ChecksumOutOfBounds)?;
        // The device validated everything up to the partial checksum, which we just completed.
        return Ok((
            RxMeta {
                checksum_verified: true,
                ..RxMeta::default()
            },
            true,
        ));
    }
    let verified = header.flags.contains(NetHeaderFlags::DATA_VALID);
    Ok((
        RxMeta {
            checksum_verified: verified,
            ..RxMeta::default()
        },
        false,
    ))
}

impl<R: RegisterIo, D: DmaAllocator> VirtioNet<R, D> {
    /// The `receive` datapath: hands up to `budget` frames to `sink`, then reposts buffers
    /// with at most one doorbell per batch.
    pub(super) fn receive_frames(
        &mut self,
        budget: usize,
        sink: &mut dyn FnMut(&[u8], RxMeta),
    ) -> usize {
        let size = self.rx.queue.size();
        // Bounds the work per call even if a broken device publishes absurd used indices.
        let mut entries_left = usize::from(size) * 2;
        let mut delivered = 0;
        while delivered < budget && entries_left > 0 {
            let pending = self.rx.queue.used_pending();
            if pending == 0 {
                // Re-enable the interrupt, then look again: a frame used in between would
                // otherwise raise no interrupt (§2.7.14 note).
                self.rx.queue.enable_interrupts_after(0);
                if self.rx.queue.used_pending() == 0 {
                    break;
                }
                continue;
            }
            match self.receive_one(pending, sink) {
                Step::Consumed {
                    entries,
                    delivered: frame_delivered,
                } => {
                    entries_left = entries_left.saturating_sub(entries);
                    delivered += usize::from(frame_delivered);
                }
                Step::Incomplete { needed } => {
                    // Wake up when the rest of the merged frame has been used.
                    self.rx.queue.enable_interrupts_after(needed - 1);
                    self.refill_receive_buffers();
                    return delivered;
                }
            }
            // Do not let the device run dry during a long batch.
            if self.rx.refill.len() >= usize::from(size) / 2 {
                self.refill_receive_buffers();
            }
        }
        // Frames may still wait (budget exhausted; `rx_pending` tells the caller). Ask to be
        // woken by the next frame the device adds, whatever is already there.
        let waiting = self.rx.queue.used_pending().min(size);
        self.rx.queue.enable_interrupts_after(waiting);
        self.refill_receive_buffers();
        delivered
    }

    fn refill_receive_buffers(&mut self) {
        if self.rx.repost() {
            self.regions
                .notify
                .write16(self.rx.notify_offset, RECEIVE_QUEUE_INDEX);
            self.counters.rx_notifications += 1;
        }
    }

    fn drop_receive(&mut self, reason: BadReceive, element: UsedElement) {
        self.stats.rx_dropped_bad += 1;
        if self.rx_warnings.should_log() {
            warn!(
                "{}: dropped receive entry id {} len {}: {reason:?} ({} dropped so far)",
                self.name, element.id, element.len, self.stats.rx_dropped_bad
            );
        }
    }

    /// Handles the frame starting at the next used entry.
    fn receive_one(&mut self, pending: u16, sink: &mut dyn FnMut(&[u8], RxMeta)) -> Step {
        let first = self.rx.queue.peek_used(0);
        let (head, head_len) = match self.rx.check_entry(first, true) {
            Ok(entry) => entry,
            Err(reason) => {
                self.rx.queue.consume_used(1);
                if reason.buffer_was_ours() {
                    self.rx.take_back(first.id as u16);
                }
                self.drop_receive(reason, first);
                return Step::Consumed {
                    entries: 1,
                    delivered: false,
                };
            }
        };
        // Held buffers before taking the head back: the most a frame can span.
        let held = self.rx.buffers.device_owned_count();
        self.rx.take_back(head);
        let header = self
            .rx
            .buffers
            .span(usize::from(head), 1)
            .and_then(VirtioNetHeader::parse)
            .unwrap_or_default();
        let buffer_count = if self.rx.mergeable {
            header.num_buffers
        } else {
            1
        };
        // A lying count would otherwise swallow the next frames as continuation buffers.
        let buffer_size = self.config.rx_buffer_size;
        let most_buffers = (self.max_rx_frame + NET_HEADER_LEN).div_ceil(buffer_size);
        if buffer_count == 0
            || usize::from(buffer_count) > held.min(most_buffers)
            || (buffer_count > 1 && head_len < buffer_size)
        {
            self.rx.queue.consume_used(1);
            self.drop_receive(BadReceive::ImpossibleBufferCount, first);
            return Step::Consumed {
                entries: 1,
                delivered: false,
            };
        }
        if buffer_count > pending {
            // The device has not published the rest yet: give the head back untouched.
            self.rx.refill.pop();
            self.rx.buffers.give_to_device(usize::from(head), 1);
            return Step::Incomplete {
                needed: buffer_count,
            };
        }

        // Gather the continuation buffers; they carry no header (§5.1.6.4).
        self.rx.frame_parts.clear();
        self.rx.frame_parts.push((head, head_len));
        let mut total = head_len - NET_HEADER_LEN;
        let mut problem = None;
        for ahead in 1..buffer_count {
            let element = self.rx.queue.peek_used(ahead);
            match self.rx.check_entry(element, false) {
                Ok((id, len)) => {
                    self.rx.take_back(id);
                    self.rx.frame_parts.push((id, len));
                    total += len;
                }
                Err(reason) => {
                    if reason.buffer_was_ours() {
                        self.rx.take_back(element.id as u16);
                    }
                    problem.get_or_insert((reason, element));
                }
            }
        }
        self.rx.queue.consume_used(buffer_count);
        let entries = usize::from(buffer_count);
        if problem.is_none() && total > self.max_rx_frame {
            problem = Some((BadReceive::FrameTooLong, first));
        }
        if let Some((reason, element)) = problem {
            self.drop_receive(reason, element);
            return Step::Consumed {
                entries,
                delivered: false,
            };
        }

        let guest_csum = self.features.contains(Features::GUEST_CSUM);
        let rx = &mut self.rx;
        let frame: &mut [u8] = if buffer_count == 1 {
            match rx.buffers.span_mut(usize::from(head), 1) {
                Some(buffer) => &mut buffer[NET_HEADER_LEN..head_len],
                None => &mut [],
            }
        } else {
            rx.merged.clear();
            for (index, (id, len)) in rx.frame_parts.iter().enumerate() {
                let start = if index == 0 { NET_HEADER_LEN } else { 0 };
                if let Some(buffer) = rx.buffers.span(usize::from(*id), 1) {
                    rx.merged.extend_from_slice(&buffer[start..*len]);
                }
            }
            &mut rx.merged[..]
        };
        let complete = self.config.complete_partial_checksums;
        match checksum_meta(frame, &header, guest_csum, complete) {
            Ok((meta, completed)) => {
                sink(frame, meta);
                self.stats.rx_frames += 1;
                self.stats.rx_bytes += total as u64;
                self.counters.rx_checksums_completed += u64::from(completed);
                self.counters.rx_merged_frames += u64::from(buffer_count > 1);
                Step::Consumed {
                    entries,
                    delivered: true,
                }
            }
            Err(reason) => {
                self.drop_receive(reason, first);
                Step::Consumed {
                    entries,
                    delivered: false,
                }
            }
        }
    }
}
