//! Control virtqueue (virtio 1.x §5.1.6.5), used for one command: acknowledging an announce
//! request (VIRTIO_NET_CTRL_ANNOUNCE / VIRTIO_NET_CTRL_ANNOUNCE_ACK, §5.1.6.5.4). One command is
//! in flight at a time and completions are reaped by `poll`; nothing waits.

use log::warn;
use net_device::{DmaAllocator, DmaRegion, RegisterIo};

use super::{CONTROL_QUEUE_INDEX, VirtioNet, allocate_dma};
use crate::dma_memory::{read_u16, write_u16};
use crate::error::{DmaPurpose, Error, QueueKind};
use crate::features::Features;
use crate::virtqueue::{DescriptorFlags, SplitQueue};

/// Command class: link announcement.
const VIRTIO_NET_CTRL_ANNOUNCE: u8 = 3;
/// Command in the announce class: the driver has announced.
const VIRTIO_NET_CTRL_ANNOUNCE_ACK: u8 = 0;
/// `ack` value for success.
const VIRTIO_NET_OK: u8 = 0;
/// Offset of `class` and `command` (device-readable) in the command buffer.
const COMMAND_OFFSET: usize = 0;
/// Offset of the `ack` byte (device-writable), in its own 8-byte word.
const ACK_OFFSET: usize = 8;
/// Size of the command buffer.
const COMMAND_BUFFER_LEN: usize = 16;
/// Value placed in `ack` before submission, so a device that never writes it reads as failure.
const ACK_UNSET: u8 = 0xFF;

/// The control queue and its single command buffer.
pub(super) struct ControlPath {
    pub(super) queue: SplitQueue,
    command: DmaRegion,
    pub(super) notify_offset: usize,
    /// A command is posted and not yet completed.
    in_flight: bool,
    /// An announce acknowledgement waits to be posted.
    announce_ack_pending: bool,
}

impl ControlPath {
    pub(super) fn allocate<D: DmaAllocator>(allocator: &D, capacity: u16) -> Result<Self, Error> {
        let queue = SplitQueue::allocate(allocator, capacity, QueueKind::Control)?;
        let command = allocate_dma(allocator, COMMAND_BUFFER_LEN, DmaPurpose::ControlCommand)?;
        Ok(ControlPath {
            queue,
            command,
            notify_offset: 0,
            in_flight: false,
            announce_ack_pending: false,
        })
    }

    /// Resets the ring; descriptor 0 (class + command, read by the device) chains to
    /// descriptor 1 (the ack byte, written by the device) for good.
    pub(super) fn configure(&mut self, size: u16, event_idx: bool) {
        self.queue.configure(size, event_idx);
        let base = self.command.phys().0;
        self.queue.write_descriptor(
            0,
            net_device::PhysAddr(base + COMMAND_OFFSET as u64),
            2,
            DescriptorFlags::NEXT,
            1,
        );
        self.queue.write_descriptor(
            1,
            net_device::PhysAddr(base + ACK_OFFSET as u64),
            1,
            DescriptorFlags::WRITE,
            0,
        );
        self.queue.disable_interrupts();
        self.in_flight = false;
        // A fresh device has no announce outstanding.
        self.announce_ack_pending = false;
    }

    pub(super) fn reclaim_after_reset(&mut self) {
        self.in_flight = false;
    }

    pub(super) fn leak(&mut self) {
        self.queue.leak();
        core::mem::forget(core::mem::replace(
            &mut self.command,
            crate::dma_memory::empty_region(),
        ));
    }

    /// An announce acknowledgement is queued or in flight.
    pub(super) fn announce_ack_busy(&self) -> bool {
        self.announce_ack_pending || self.in_flight
    }

    /// Posts the pending command if the queue is free. Returns whether to ring the doorbell.
    fn post_pending(&mut self) -> bool {
        if self.in_flight || !self.announce_ack_pending {
            return false;
        }
        self.announce_ack_pending = false;
        let class_and_command =
            u16::from_le_bytes([VIRTIO_NET_CTRL_ANNOUNCE, VIRTIO_NET_CTRL_ANNOUNCE_ACK]);
        write_u16(&mut self.command, COMMAND_OFFSET, class_and_command);
        write_u16(&mut self.command, ACK_OFFSET, u16::from(ACK_UNSET));
        self.queue.push_available(0);
        self.queue.publish();
        self.in_flight = true;
        self.queue.needs_notification()
    }

    /// Reaps a completed command: `Some(Ok(()))` on VIRTIO_NET_OK, `Some(Err(..))` on an error
    /// ack or a bad used entry, `None` while nothing completed.
    fn reap(&mut self) -> Option<Result<(), ControlFailure>> {
        if !self.in_flight {
            // Anything used now was never posted; skip it.
            let stray = self.queue.used_pending();
            if stray == 0 {
                return None;
            }
            self.queue.consume_used(stray);
            return Some(Err(ControlFailure::UnexpectedEntry));
        }
        let pending = self.queue.used_pending();
        if pending == 0 {
            return None;
        }
        let element = self.queue.peek_used(0);
        self.queue.consume_used(pending);
        self.in_flight = false;
        if element.id != 0 {
            return Some(Err(ControlFailure::UnexpectedEntry));
        }
        let ack = read_u16(&self.command, ACK_OFFSET).map_or(ACK_UNSET, |word| word as u8);
        if ack == VIRTIO_NET_OK {
            Some(Ok(()))
        } else {
            Some(Err(ControlFailure::Ack(ack)))
        }
    }
}

/// How a control command failed.
#[derive(Clone, Copy, Debug)]
enum ControlFailure {
    /// The device answered with this `ack` value.
    Ack(u8),
    /// The used ring held an entry the driver did not post.
    UnexpectedEntry,
}

impl<R: RegisterIo, D: DmaAllocator> VirtioNet<R, D> {
    /// Tells the device the announce it requested has been sent (VIRTIO_NET_CTRL_ANNOUNCE_ACK),
    /// which makes it clear VIRTIO_NET_S_ANNOUNCE. Does nothing unless GUEST_ANNOUNCE was
    /// negotiated. Never waits: the completion is reaped by `poll`.
    pub fn ack_announce(&mut self) {
        if !self.features.contains(Features::GUEST_ANNOUNCE) {
            return;
        }
        if let Some(control) = &mut self.control {
            control.announce_ack_pending = true;
        }
        if self.state == super::DriverState::Running {
            self.service_control_queue();
        }
    }

    /// Reaps a completed control command and posts a pending one.
    pub(super) fn service_control_queue(&mut self) {
        let Some(control) = &mut self.control else {
            return;
        };
        match control.reap() {
            None => {}
            Some(Ok(())) => {
                self.counters.announce_acks_completed += 1;
                // The device cleared ANNOUNCE before completing (§5.1.6.5.4.2), so a set bit
                // seen from now on is a new request.
                self.announce.seen = false;
            }
            Some(Err(failure)) => {
                self.counters.control_errors += 1;
                if self.control_warnings.should_log() {
                    match failure {
                        ControlFailure::Ack(ack) => warn!(
                            "{}: device answered the announce acknowledgement with {ack}",
                            self.name
                        ),
                        ControlFailure::UnexpectedEntry => {
                            warn!(
                                "{}: control queue used an entry that was not posted",
                                self.name
                            )
                        }
                    }
                }
            }
        }
        let Some(control) = &mut self.control else {
            return;
        };
        if control.post_pending() {
            self.regions
                .notify
                .write16(control.notify_offset, CONTROL_QUEUE_INDEX);
        }
    }
}
