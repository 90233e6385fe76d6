//! A fake virtio-net device for host tests: the modern virtio-pci register windows over shared
//! state, feature negotiation, queue setup, and methods that act as the device (deliver frames,
//! collect transmitted ones, answer control commands) or misbehave on purpose.
//!
//! The fake reads and writes the driver's rings through the DMA memory handed out by
//! [`FakeDmaAllocator`] (device address == CPU address). It runs on the caller's thread: the
//! device "acts" inside the `inject_*`/`take_*` calls and on doorbell writes.

pub(crate) mod memory;

use alloc::vec::Vec;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

pub use memory::FakeDmaAllocator;
use memory::{read_memory, write_memory};
use net_device::{MacAddress, RegisterIo};

use crate::features::Features;
use crate::net_header::{NET_HEADER_LEN, VirtioNetHeader};
use crate::pci::{DeviceStatus, NetStatus, VirtioPciRegions, registers};
use crate::virtqueue::need_event;

/// Spacing of the queues' doorbells in the notify window.
pub const FAKE_NOTIFY_MULTIPLIER: u32 = 4;
/// Length of the fake's common configuration window.
const COMMON_WINDOW_LEN: usize = 0x40;
/// Length of the fake's device configuration window (mac, status, pairs, mtu, speed, duplex).
const DEVICE_WINDOW_LEN: usize = 0x18;
/// Descriptor flag NEXT.
const DESCRIPTOR_NEXT: u16 = 1;
/// Descriptor flag WRITE.
const DESCRIPTOR_WRITE: u16 = 2;
/// Control command answers.
const CONTROL_OK: u8 = 0;
const CONTROL_ERROR: u8 = 1;

/// What the fake device offers and how it behaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FakeDeviceConfig {
    /// The MAC address in the device configuration.
    pub mac: MacAddress,
    /// Offered feature bits.
    pub features: Features,
    /// `queue_size` of the receive and transmit queues after reset.
    pub queue_max_size: u16,
    /// `queue_size` of the control queue after reset.
    pub control_queue_max_size: u16,
    /// MSI-X table size: vectors at or above it are refused (read back as NO_VECTOR).
    pub msix_table_size: u16,
    /// The `mtu` configuration field.
    pub mtu: u16,
    /// Link state at creation.
    pub link_up: bool,
    /// Reads of `device_status` that still show the old value after a reset write.
    pub reset_delay_reads: u32,
    /// The device never reports reset completion.
    pub reset_never_completes: bool,
    /// Clear FEATURES_OK whatever the driver asks for.
    pub reject_features: bool,
}

impl Default for FakeDeviceConfig {
    fn default() -> Self {
        FakeDeviceConfig {
            mac: MacAddress([0x52, 0x54, 0x00, 0x12, 0x34, 0x56]),
            // What QEMU's virtio-net-pci offers with failover=on, plus MQ which the driver
            // must leave alone.
            features: Features::VERSION_1
                | Features::CSUM
                | Features::GUEST_CSUM
                | Features::MTU
                | Features::MAC
                | Features::GUEST_TSO4
                | Features::GUEST_TSO6
                | Features::GUEST_ECN
                | Features::HOST_TSO4
                | Features::HOST_TSO6
                | Features::HOST_ECN
                | Features::MRG_RXBUF
                | Features::STATUS
                | Features::CTRL_VQ
                | Features::CTRL_RX
                | Features::CTRL_VLAN
                | Features::GUEST_ANNOUNCE
                | Features::MQ
                | Features::CTRL_MAC_ADDR
                | Features::RING_INDIRECT_DESC
                | Features::RING_EVENT_IDX
                | Features::STANDBY,
            queue_max_size: 256,
            control_queue_max_size: 64,
            msix_table_size: 4,
            mtu: 1500,
            link_up: true,
            reset_delay_reads: 0,
            reset_never_completes: false,
            reject_features: false,
        }
    }
}

/// Why the fake device could not do what a test asked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FakeError {
    /// The device has been unplugged.
    Unplugged,
    /// DRIVER_OK is not set or the queue is not enabled.
    NotLive,
    /// Not enough receive buffers are posted.
    NoBuffers,
    /// Without mergeable buffers, the next buffer is too small for the frame.
    BufferTooSmall {
        /// Bytes needed (header included).
        needed: usize,
        /// Bytes in the buffer.
        available: usize,
    },
    /// A descriptor has the wrong direction or a broken chain.
    BadDescriptor,
    /// The driver gave an address outside its DMA memory.
    MemoryAccess {
        /// The address.
        address: u64,
    },
}

/// A frame the driver transmitted, with its virtio-net header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FakeTxPacket {
    /// The header the driver wrote.
    pub header: VirtioNetHeader,
    /// The frame after the header.
    pub frame: Vec<u8>,
}

#[derive(Clone, Copy, Debug, Default)]
struct FakeQueue {
    max_size: u16,
    size: u16,
    msix_vector: u16,
    enabled: bool,
    descriptors: u64,
    driver: u64,
    device: u64,
    next_avail: u16,
    used_index: u16,
    notifications: u64,
    interrupts: u64,
    suppress_notifications: bool,
}

impl FakeQueue {
    fn new(max_size: u16) -> Self {
        FakeQueue {
            max_size,
            size: max_size,
            msix_vector: registers::NO_VECTOR,
            ..Default::default()
        }
    }
}

fn read_u16(address: u64) -> Result<u16, FakeError> {
    let mut bytes = [0u8; 2];
    if !read_memory(address, &mut bytes) {
        return Err(FakeError::MemoryAccess { address });
    }
    Ok(u16::from_le_bytes(bytes))
}

fn write_bytes(address: u64, data: &[u8]) -> Result<(), FakeError> {
    if !write_memory(address, data) {
        return Err(FakeError::MemoryAccess { address });
    }
    Ok(())
}

/// One descriptor as the driver wrote it.
#[derive(Clone, Copy)]
struct Descriptor {
    address: u64,
    len: u32,
    flags: u16,
    next: u16,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum WindowKind {
    Common,
    Notify,
    Isr,
    Device,
}

struct FakeState {
    config: FakeDeviceConfig,
    status: u8,
    /// Value `device_status` reads while a reset is still "in progress".
    status_during_reset: u8,
    reset_reads_left: u32,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    config_msix_vector: u16,
    queue_select: u16,
    queues: Vec<FakeQueue>,
    isr: u8,
    net_status: u16,
    config_generation: u8,
    config_interrupts: u64,
    unplugged_read_value: Option<u32>,
    resets: u32,
    tx_packets: Vec<FakeTxPacket>,
    announce_acks: u32,
    control_commands: Vec<(u8, u8)>,
    width_violations: u32,
}

impl FakeState {
    fn new(config: FakeDeviceConfig) -> Self {
        let mut queues = Vec::new();
        queues.push(FakeQueue::new(config.queue_max_size));
        queues.push(FakeQueue::new(config.queue_max_size));
        if config.features.contains(Features::CTRL_VQ) {
            queues.push(FakeQueue::new(config.control_queue_max_size));
        }
        FakeState {
            config,
            status: 0,
            status_during_reset: 0,
            reset_reads_left: 0,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            config_msix_vector: registers::NO_VECTOR,
            queue_select: 0,
            queues,
            isr: 0,
            net_status: if config.link_up {
                NetStatus::LINK_UP.bits()
            } else {
                0
            },
            config_generation: 0,
            config_interrupts: 0,
            unplugged_read_value: None,
            resets: 0,
            tx_packets: Vec::new(),
            announce_acks: 0,
            control_commands: Vec::new(),
            width_violations: 0,
        }
    }

    fn negotiated(&self, feature: Features) -> bool {
        Features::from_bits_retain(self.driver_features).contains(feature)
    }

    fn driver_ok(&self) -> bool {
        self.status & DeviceStatus::DRIVER_OK.bits() != 0 && self.unplugged_read_value.is_none()
    }

    fn reset(&mut self) {
        self.status_during_reset = self.status;
        self.reset_reads_left = if self.status == 0 {
            // Nothing to reset: the status already reads 0.
            0
        } else if self.config.reset_never_completes {
            u32::MAX
        } else {
            self.config.reset_delay_reads
        };
        self.status = 0;
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.driver_features = 0;
        self.config_msix_vector = registers::NO_VECTOR;
        self.queue_select = 0;
        for queue in &mut self.queues {
            *queue = FakeQueue::new(queue.max_size);
        }
        self.isr = 0;
        self.net_status &= !NetStatus::ANNOUNCE.bits();
        self.resets += 1;
    }

    fn config_changed(&mut self) {
        self.config_generation = self.config_generation.wrapping_add(1);
        self.config_interrupts += 1;
        if self.config_msix_vector == registers::NO_VECTOR {
            self.isr |= registers::ISR_CONFIG;
        }
    }

    fn msix_vector_accepted(&self, vector: u16) -> u16 {
        if vector < self.config.msix_table_size {
            vector
        } else {
            registers::NO_VECTOR
        }
    }

    fn natural_width(kind: WindowKind, offset: usize) -> Option<usize> {
        match kind {
            WindowKind::Common => match offset {
                0x00 | 0x04 | 0x08 | 0x0C | 0x20 | 0x24 | 0x28 | 0x2C | 0x30 | 0x34 => Some(4),
                0x10 | 0x12 | 0x16 | 0x18 | 0x1A | 0x1C | 0x1E | 0x38 | 0x3A => Some(2),
                0x14 | 0x15 => Some(1),
                _ => None,
            },
            WindowKind::Device => match offset {
                0..=5 | 16 => Some(1),
                6 | 8 | 10 => Some(2),
                12 => Some(4),
                _ => None,
            },
            WindowKind::Isr => (offset == 0).then_some(1),
            WindowKind::Notify => Some(2),
        }
    }

    fn check_width(&mut self, kind: WindowKind, offset: usize, width: usize) {
        if Self::natural_width(kind, offset) != Some(width) {
            self.width_violations += 1;
        }
    }

    fn read(&mut self, kind: WindowKind, offset: usize, width: usize) -> u32 {
        if let Some(value) = self.unplugged_read_value {
            return value;
        }
        self.check_width(kind, offset, width);
        match kind {
            WindowKind::Common => self.read_common(offset),
            WindowKind::Device => self.read_device_config(offset, width),
            WindowKind::Isr => {
                // Reading the ISR byte clears it (§4.1.4.5).
                let value = self.isr;
                self.isr = 0;
                u32::from(value)
            }
            WindowKind::Notify => 0,
        }
    }

    fn selected_queue(&mut self) -> Option<&mut FakeQueue> {
        self.queues.get_mut(usize::from(self.queue_select))
    }

    fn read_common(&mut self, offset: usize) -> u32 {
        let offered = self.config.features.bits();
        let queue = self.queues.get(usize::from(self.queue_select)).copied();
        match offset {
            registers::DEVICE_FEATURE_SELECT => self.device_feature_select,
            registers::DEVICE_FEATURE => match self.device_feature_select {
                0 => offered as u32,
                1 => (offered >> 32) as u32,
                _ => 0,
            },
            registers::DRIVER_FEATURE_SELECT => self.driver_feature_select,
            registers::DRIVER_FEATURE => match self.driver_feature_select {
                0 => self.driver_features as u32,
                1 => (self.driver_features >> 32) as u32,
                _ => 0,
            },
            registers::CONFIG_MSIX_VECTOR => u32::from(self.config_msix_vector),
            registers::NUM_QUEUES => self.queues.len() as u32,
            registers::DEVICE_STATUS => {
                if self.reset_reads_left > 0 {
                    self.reset_reads_left -= 1;
                    u32::from(self.status_during_reset)
                } else {
                    u32::from(self.status)
                }
            }
            registers::CONFIG_GENERATION => u32::from(self.config_generation),
            registers::QUEUE_SELECT => u32::from(self.queue_select),
            registers::QUEUE_SIZE => queue.map_or(0, |queue| u32::from(queue.size)),
            registers::QUEUE_MSIX_VECTOR => queue
                .map_or(u32::from(registers::NO_VECTOR), |queue| {
                    u32::from(queue.msix_vector)
                }),
            registers::QUEUE_ENABLE => queue.map_or(0, |queue| u32::from(queue.enabled)),
            registers::QUEUE_NOTIFY_OFF => u32::from(self.queue_select),
            0x20 => queue.map_or(0, |queue| queue.descriptors as u32),
            0x24 => queue.map_or(0, |queue| (queue.descriptors >> 32) as u32),
            0x28 => queue.map_or(0, |queue| queue.driver as u32),
            0x2C => queue.map_or(0, |queue| (queue.driver >> 32) as u32),
            0x30 => queue.map_or(0, |queue| queue.device as u32),
            0x34 => queue.map_or(0, |queue| (queue.device >> 32) as u32),
            _ => 0,
        }
    }

    fn read_device_config(&mut self, offset: usize, width: usize) -> u32 {
        let mut bytes = [0u8; DEVICE_WINDOW_LEN];
        bytes[..6].copy_from_slice(&self.config.mac.0);
        bytes[6..8].copy_from_slice(&self.net_status.to_le_bytes());
        bytes[8..10].copy_from_slice(&1u16.to_le_bytes());
        bytes[10..12].copy_from_slice(&self.config.mtu.to_le_bytes());
        bytes[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
        bytes[16] = 0xFF;
        let mut value = [0u8; 4];
        for (index, byte) in value.iter_mut().enumerate().take(width) {
            *byte = bytes.get(offset + index).copied().unwrap_or(0);
        }
        u32::from_le_bytes(value)
    }

    fn write(&mut self, kind: WindowKind, offset: usize, width: usize, value: u32) {
        if self.unplugged_read_value.is_some() {
            return;
        }
        self.check_width(kind, offset, width);
        match kind {
            WindowKind::Common => self.write_common(offset, value),
            WindowKind::Notify => {
                let queue = offset / FAKE_NOTIFY_MULTIPLIER as usize;
                self.notify(queue, value as u16);
            }
            WindowKind::Isr | WindowKind::Device => {}
        }
    }

    fn write_common(&mut self, offset: usize, value: u32) {
        let features_ok = self.status & DeviceStatus::FEATURES_OK.bits() != 0;
        match offset {
            registers::DEVICE_FEATURE_SELECT => self.device_feature_select = value,
            registers::DRIVER_FEATURE_SELECT => self.driver_feature_select = value,
            // Features are frozen once FEATURES_OK is set.
            registers::DRIVER_FEATURE if !features_ok => match self.driver_feature_select {
                0 => {
                    self.driver_features = (self.driver_features & !0xFFFF_FFFF) | u64::from(value)
                }
                1 => {
                    self.driver_features =
                        (self.driver_features & 0xFFFF_FFFF) | u64::from(value) << 32
                }
                _ => {}
            },
            registers::CONFIG_MSIX_VECTOR => {
                self.config_msix_vector = self.msix_vector_accepted(value as u16)
            }
            registers::DEVICE_STATUS => self.write_status(value as u8),
            registers::QUEUE_SELECT => self.queue_select = value as u16,
            registers::QUEUE_SIZE => {
                let size = value as u16;
                if let Some(queue) = self.selected_queue()
                    && size.is_power_of_two()
                    && size <= queue.max_size
                    && !queue.enabled
                {
                    queue.size = size;
                }
            }
            registers::QUEUE_MSIX_VECTOR => {
                let vector = self.msix_vector_accepted(value as u16);
                if let Some(queue) = self.selected_queue() {
                    queue.msix_vector = vector;
                }
            }
            registers::QUEUE_ENABLE if value == 1 => {
                if let Some(queue) = self.selected_queue() {
                    queue.enabled = true;
                    queue.next_avail = 0;
                    queue.used_index = 0;
                }
            }
            0x20..=0x34 => {
                let high = offset % 8 == 4;
                if let Some(queue) = self.selected_queue() {
                    let field = match offset & !7 {
                        0x20 => &mut queue.descriptors,
                        0x28 => &mut queue.driver,
                        _ => &mut queue.device,
                    };
                    *field = if high {
                        (*field & 0xFFFF_FFFF) | u64::from(value) << 32
                    } else {
                        (*field & !0xFFFF_FFFF) | u64::from(value)
                    };
                }
            }
            _ => {}
        }
    }

    fn write_status(&mut self, value: u8) {
        if value == 0 {
            self.reset();
            return;
        }
        let mut status = value;
        let newly_features_ok = value & DeviceStatus::FEATURES_OK.bits() != 0
            && self.status & DeviceStatus::FEATURES_OK.bits() == 0;
        if newly_features_ok {
            let requested = Features::from_bits_retain(self.driver_features);
            let acceptable = !self.config.reject_features
                && self.config.features.contains(requested)
                && requested.contains(Features::VERSION_1);
            if !acceptable {
                status &= !DeviceStatus::FEATURES_OK.bits();
            }
        }
        // DEVICE_NEEDS_RESET stays until the driver resets the device.
        self.status = status | (self.status & DeviceStatus::DEVICE_NEEDS_RESET.bits());
    }

    fn queue_live(&self, index: usize) -> Result<FakeQueue, FakeError> {
        if self.unplugged_read_value.is_some() {
            return Err(FakeError::Unplugged);
        }
        let queue = self.queues.get(index).copied().ok_or(FakeError::NotLive)?;
        // A size-0 queue (the driver enabled one the device has no room for) cannot carry
        // anything; treating it as live would divide by zero.
        if !self.driver_ok() || !queue.enabled || queue.size == 0 {
            return Err(FakeError::NotLive);
        }
        Ok(queue)
    }

    fn avail_index(queue: &FakeQueue) -> Result<u16, FakeError> {
        read_u16(queue.driver + 2)
    }

    fn avail_entry(queue: &FakeQueue, position: u16) -> Result<u16, FakeError> {
        read_u16(queue.driver + 4 + 2 * u64::from(position % queue.size))
    }

    fn descriptor(queue: &FakeQueue, index: u16) -> Result<Descriptor, FakeError> {
        if index >= queue.size {
            return Err(FakeError::BadDescriptor);
        }
        let mut bytes = [0u8; 16];
        let address = queue.descriptors + 16 * u64::from(index);
        if !read_memory(address, &mut bytes) {
            return Err(FakeError::MemoryAccess { address });
        }
        let mut word = [0u8; 8];
        word.copy_from_slice(&bytes[..8]);
        Ok(Descriptor {
            address: u64::from_le_bytes(word),
            len: u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]),
            flags: u16::from_le_bytes([bytes[12], bytes[13]]),
            next: u16::from_le_bytes([bytes[14], bytes[15]]),
        })
    }

    /// Follows a descriptor chain: (device-readable bytes, device-writable descriptors).
    fn read_chain(queue: &FakeQueue, head: u16) -> Result<(Vec<u8>, Vec<Descriptor>), FakeError> {
        let mut readable = Vec::new();
        let mut writable = Vec::new();
        let mut index = head;
        for _ in 0..queue.size {
            let descriptor = Self::descriptor(queue, index)?;
            if descriptor.flags & DESCRIPTOR_WRITE != 0 {
                writable.push(descriptor);
            } else {
                if !writable.is_empty() {
                    // Readable after writable is not allowed (§2.7.4.1).
                    return Err(FakeError::BadDescriptor);
                }
                let start = readable.len();
                readable.resize(start + descriptor.len as usize, 0);
                if !read_memory(descriptor.address, &mut readable[start..]) {
                    return Err(FakeError::MemoryAccess {
                        address: descriptor.address,
                    });
                }
            }
            if descriptor.flags & DESCRIPTOR_NEXT == 0 {
                return Ok((readable, writable));
            }
            index = descriptor.next;
        }
        Err(FakeError::BadDescriptor)
    }

    /// Writes a used element and advances the device's private used index (not yet published).
    fn push_used(queue: &mut FakeQueue, id: u32, len: u32) -> Result<(), FakeError> {
        let slot = u64::from(queue.used_index % queue.size);
        let mut element = [0u8; 8];
        element[..4].copy_from_slice(&id.to_le_bytes());
        element[4..].copy_from_slice(&len.to_le_bytes());
        write_bytes(queue.device + 4 + 8 * slot, &element)?;
        queue.used_index = queue.used_index.wrapping_add(1);
        Ok(())
    }

    /// Publishes the used index and sends a used buffer notification if the driver wants one.
    fn publish_used(&mut self, index: usize, old_used: u16) -> Result<(), FakeError> {
        let event_idx = self.negotiated(Features::RING_EVENT_IDX);
        let queue = &mut self.queues[index];
        write_bytes(queue.device + 2, &queue.used_index.to_le_bytes())?;
        let wanted = if event_idx {
            let used_event = read_u16(queue.driver + 4 + 2 * u64::from(queue.size))?;
            need_event(used_event, queue.used_index, old_used)
        } else {
            read_u16(queue.driver)? & 1 == 0
        };
        if wanted && queue.used_index != old_used {
            queue.interrupts += 1;
            if queue.msix_vector == registers::NO_VECTOR {
                self.isr |= registers::ISR_QUEUE;
            }
        }
        Ok(())
    }

    /// Tells the driver which available entry should trigger the next doorbell.
    fn update_avail_event(&mut self, index: usize) -> Result<(), FakeError> {
        let event_idx = self.negotiated(Features::RING_EVENT_IDX);
        let queue = &self.queues[index];
        if event_idx {
            // Suppressed: an index just behind ours is only passed again after a wrap.
            let event = if queue.suppress_notifications {
                queue.next_avail.wrapping_sub(1)
            } else {
                queue.next_avail
            };
            write_bytes(
                queue.device + 4 + 8 * u64::from(queue.size),
                &event.to_le_bytes(),
            )
        } else {
            let flags = u16::from(queue.suppress_notifications);
            write_bytes(queue.device, &flags.to_le_bytes())
        }
    }

    fn notify(&mut self, queue: usize, value: u16) {
        if let Some(entry) = self.queues.get_mut(queue) {
            entry.notifications += 1;
        }
        if usize::from(value) != queue {
            // The notification value must be the queue index (§4.1.5.2).
            self.width_violations += 1;
        }
        // Doorbells cannot report errors; a test sees them through missing frames.
        let _ = match queue {
            1 => self.process_transmit().map(|_| ()),
            2 => self.process_control(),
            _ => Ok(()),
        };
    }

    fn process_transmit(&mut self) -> Result<usize, FakeError> {
        let mut queue = self.queue_live(1)?;
        let available = Self::avail_index(&queue)?;
        let old_used = queue.used_index;
        let mut processed = 0;
        while queue.next_avail != available && processed < usize::from(queue.size) {
            let head = Self::avail_entry(&queue, queue.next_avail)?;
            queue.next_avail = queue.next_avail.wrapping_add(1);
            let (bytes, _) = Self::read_chain(&queue, head)?;
            let header = VirtioNetHeader::parse(&bytes).ok_or(FakeError::BadDescriptor)?;
            self.tx_packets.push(FakeTxPacket {
                header,
                frame: bytes[NET_HEADER_LEN..].to_vec(),
            });
            // QEMU reports 0 bytes written for transmit buffers.
            Self::push_used(&mut queue, u32::from(head), 0)?;
            processed += 1;
        }
        self.queues[1] = queue;
        self.publish_used(1, old_used)?;
        self.update_avail_event(1)?;
        Ok(processed)
    }

    fn process_control(&mut self) -> Result<(), FakeError> {
        let mut queue = self.queue_live(2)?;
        let available = Self::avail_index(&queue)?;
        let old_used = queue.used_index;
        while queue.next_avail != available {
            let head = Self::avail_entry(&queue, queue.next_avail)?;
            queue.next_avail = queue.next_avail.wrapping_add(1);
            let (command, writable) = Self::read_chain(&queue, head)?;
            let (class, code) = (command.first().copied(), command.get(1).copied());
            let ack = match (class, code) {
                (Some(3), Some(0)) if self.negotiated(Features::GUEST_ANNOUNCE) => {
                    // §5.1.6.5.4.2: clear ANNOUNCE before marking the buffer used.
                    self.net_status &= !NetStatus::ANNOUNCE.bits();
                    self.announce_acks += 1;
                    CONTROL_OK
                }
                _ => CONTROL_ERROR,
            };
            self.control_commands
                .push((class.unwrap_or(0xFF), code.unwrap_or(0xFF)));
            let ack_target = writable.first().ok_or(FakeError::BadDescriptor)?;
            write_bytes(ack_target.address, &[ack])?;
            Self::push_used(&mut queue, u32::from(head), 1)?;
        }
        self.queues[2] = queue;
        self.publish_used(2, old_used)?;
        self.update_avail_event(2)
    }

    fn inject_receive(
        &mut self,
        mut header: VirtioNetHeader,
        frame: &[u8],
    ) -> Result<(), FakeError> {
        let mut queue = self.queue_live(0)?;
        let mergeable = self.negotiated(Features::MRG_RXBUF);
        let available = Self::avail_index(&queue)?;
        let total = NET_HEADER_LEN + frame.len();

        // Pick the buffers: one without MRG_RXBUF, as many as needed with it.
        let mut buffers = Vec::new();
        let mut capacity = 0usize;
        let mut position = queue.next_avail;
        while capacity < total {
            if position == available {
                return Err(FakeError::NoBuffers);
            }
            let head = Self::avail_entry(&queue, position)?;
            position = position.wrapping_add(1);
            let descriptor = Self::descriptor(&queue, head)?;
            if descriptor.flags & DESCRIPTOR_WRITE == 0 || descriptor.flags & DESCRIPTOR_NEXT != 0 {
                return Err(FakeError::BadDescriptor);
            }
            capacity += descriptor.len as usize;
            buffers.push((head, descriptor));
            if !mergeable && capacity < total {
                return Err(FakeError::BufferTooSmall {
                    needed: total,
                    available: capacity,
                });
            }
        }
        if header.num_buffers == 0 {
            header.num_buffers = buffers.len() as u16;
        }
        let mut data = alloc::vec![0u8; NET_HEADER_LEN];
        header.write(&mut data);
        data.extend_from_slice(frame);

        let old_used = queue.used_index;
        let mut offset = 0;
        for (head, descriptor) in &buffers {
            let chunk = (data.len() - offset).min(descriptor.len as usize);
            write_bytes(descriptor.address, &data[offset..offset + chunk])?;
            Self::push_used(&mut queue, u32::from(*head), chunk as u32)?;
            offset += chunk;
        }
        queue.next_avail = position;
        self.queues[0] = queue;
        self.publish_used(0, old_used)?;
        self.update_avail_event(0)
    }
}

/// The fake device. Clones share the same device.
#[derive(Clone)]
pub struct FakeVirtioNet {
    state: Arc<Mutex<FakeState>>,
}

/// One register window of the fake device.
pub struct FakeWindow {
    state: Arc<Mutex<FakeState>>,
    kind: WindowKind,
    len: usize,
}

fn lock(state: &Mutex<FakeState>) -> MutexGuard<'_, FakeState> {
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

impl FakeWindow {
    fn read(&self, offset: usize, width: usize) -> u32 {
        if offset.checked_add(width).is_none_or(|end| end > self.len) {
            // RegisterIo contract: out of range reads all-ones.
            return u32::MAX;
        }
        lock(&self.state).read(self.kind, offset, width)
    }

    fn write(&self, offset: usize, width: usize, value: u32) {
        if offset.checked_add(width).is_some_and(|end| end <= self.len) {
            lock(&self.state).write(self.kind, offset, width, value);
        }
    }
}

impl RegisterIo for FakeWindow {
    fn read32(&self, offset: usize) -> u32 {
        self.read(offset, 4)
    }

    fn write32(&self, offset: usize, value: u32) {
        self.write(offset, 4, value);
    }

    fn read16(&self, offset: usize) -> u16 {
        self.read(offset, 2) as u16
    }

    fn write16(&self, offset: usize, value: u16) {
        self.write(offset, 2, u32::from(value));
    }

    fn read8(&self, offset: usize) -> u8 {
        self.read(offset, 1) as u8
    }

    fn write8(&self, offset: usize, value: u8) {
        self.write(offset, 1, u32::from(value));
    }

    fn len(&self) -> usize {
        self.len
    }
}

impl Default for FakeVirtioNet {
    fn default() -> Self {
        Self::new(FakeDeviceConfig::default())
    }
}

impl FakeVirtioNet {
    /// A device with the given behaviour, reset and waiting for a driver.
    pub fn new(config: FakeDeviceConfig) -> Self {
        FakeVirtioNet {
            state: Arc::new(Mutex::new(FakeState::new(config))),
        }
    }

    fn state(&self) -> MutexGuard<'_, FakeState> {
        lock(&self.state)
    }

    fn window(&self, kind: WindowKind, len: usize) -> FakeWindow {
        FakeWindow {
            state: Arc::clone(&self.state),
            kind,
            len,
        }
    }

    /// The register windows, as the kernel would map them.
    pub fn regions(&self) -> VirtioPciRegions<FakeWindow> {
        let queue_count = self.state().queues.len();
        VirtioPciRegions {
            common: self.window(WindowKind::Common, COMMON_WINDOW_LEN),
            notify: self.window(
                WindowKind::Notify,
                queue_count * FAKE_NOTIFY_MULTIPLIER as usize + 2,
            ),
            notify_off_multiplier: FAKE_NOTIFY_MULTIPLIER,
            isr: self.window(WindowKind::Isr, 4),
            device: self.window(WindowKind::Device, DEVICE_WINDOW_LEN),
        }
    }

    /// Delivers `frame` with a zero header (no offload flags): takes the next posted receive
    /// buffer(s), writes header and frame, and marks them used.
    pub fn inject_rx_frame(&self, frame: &[u8]) -> Result<(), FakeError> {
        self.inject_rx_frame_with_header(VirtioNetHeader::default(), frame)
    }

    /// Delivers `frame` with `header`. A `num_buffers` of 0 is filled in with the number of
    /// buffers used; any other value is written as given (to test bad values).
    pub fn inject_rx_frame_with_header(
        &self,
        header: VirtioNetHeader,
        frame: &[u8],
    ) -> Result<(), FakeError> {
        self.state().inject_receive(header, frame)
    }

    /// Processes any transmit buffers the driver made available (as a polling device would)
    /// and returns every frame transmitted so far, without headers.
    pub fn take_tx_frames(&self) -> Vec<Vec<u8>> {
        self.take_tx_packets()
            .into_iter()
            .map(|packet| packet.frame)
            .collect()
    }

    /// Like [`FakeVirtioNet::take_tx_frames`], with the virtio-net headers.
    pub fn take_tx_packets(&self) -> Vec<FakeTxPacket> {
        let mut state = self.state();
        let _ = state.process_transmit();
        core::mem::take(&mut state.tx_packets)
    }

    /// Writes an arbitrary used element into `queue` and publishes it (hostile device).
    pub fn inject_used_raw(&self, queue: u16, id: u32, len: u32) -> Result<(), FakeError> {
        let mut state = self.state();
        let index = usize::from(queue);
        let mut entry = state.queue_live(index)?;
        let old_used = entry.used_index;
        FakeState::push_used(&mut entry, id, len)?;
        state.queues[index] = entry;
        state.publish_used(index, old_used)
    }

    /// Sets the link state and raises a configuration change.
    pub fn set_link(&self, up: bool) {
        let mut state = self.state();
        if up {
            state.net_status |= NetStatus::LINK_UP.bits();
        } else {
            state.net_status &= !NetStatus::LINK_UP.bits();
        }
        state.config_changed();
    }

    /// Sets VIRTIO_NET_S_ANNOUNCE (as after a migration) and raises a configuration change.
    pub fn request_announce(&self) {
        let mut state = self.state();
        state.net_status |= NetStatus::ANNOUNCE.bits();
        state.config_changed();
    }

    /// Sets DEVICE_NEEDS_RESET and raises a configuration change.
    pub fn set_needs_reset(&self) {
        let mut state = self.state();
        state.status |= DeviceStatus::DEVICE_NEEDS_RESET.bits();
        state.config_changed();
    }

    /// Surprise removal as config space sees it: every read returns all-ones, writes vanish,
    /// no more DMA.
    pub fn unplug(&self) {
        self.state().unplugged_read_value = Some(u32::MAX);
    }

    /// Surprise removal as QEMU MMIO sees it: every read returns 0.
    pub fn unplug_reading_zero(&self) {
        self.state().unplugged_read_value = Some(0);
    }

    /// Changes how later resets behave: `delay_reads` reads of the old status first, or never
    /// completing.
    pub fn set_reset_behaviour(&self, delay_reads: u32, never_completes: bool) {
        let mut state = self.state();
        state.config.reset_delay_reads = delay_reads;
        state.config.reset_never_completes = never_completes;
    }

    /// Makes the device ask (EVENT_IDX `avail_event` / NO_NOTIFY) for no transmit doorbells;
    /// it then only picks up frames in [`FakeVirtioNet::take_tx_frames`].
    pub fn suppress_tx_notifications(&self, suppress: bool) {
        let mut state = self.state();
        state.queues[1].suppress_notifications = suppress;
        if state.queue_live(1).is_ok() {
            let _ = state.update_avail_event(1);
        }
    }

    /// Doorbell writes seen for `queue`.
    pub fn notifications(&self, queue: u16) -> u64 {
        self.state()
            .queues
            .get(usize::from(queue))
            .map_or(0, |queue| queue.notifications)
    }

    /// Used buffer notifications (interrupts) sent for `queue`.
    pub fn interrupts(&self, queue: u16) -> u64 {
        self.state()
            .queues
            .get(usize::from(queue))
            .map_or(0, |queue| queue.interrupts)
    }

    /// Configuration change notifications sent.
    pub fn config_interrupts(&self) -> u64 {
        self.state().config_interrupts
    }

    /// Receive buffers the driver has made available and the device has not used.
    pub fn available_rx_buffers(&self) -> u16 {
        let state = self.state();
        let queue = state.queues[0];
        if !queue.enabled {
            return 0;
        }
        FakeState::avail_index(&queue)
            .map_or(0, |available| available.wrapping_sub(queue.next_avail))
    }

    /// The feature bits the driver wrote.
    pub fn driver_features(&self) -> Features {
        Features::from_bits_retain(self.state().driver_features)
    }

    /// The current `device_status`.
    pub fn device_status(&self) -> DeviceStatus {
        DeviceStatus::from_bits_retain(self.state().status)
    }

    /// How many times the driver reset the device.
    pub fn resets(&self) -> u32 {
        self.state().resets
    }

    /// Announce acknowledgements received on the control queue.
    pub fn announce_acks(&self) -> u32 {
        self.state().announce_acks
    }

    /// Control commands received, as (class, command).
    pub fn control_commands(&self) -> Vec<(u8, u8)> {
        self.state().control_commands.clone()
    }

    /// Register accesses that did not use the field's natural width (virtio 1.x §4.1.3.1), and
    /// doorbells with a wrong value.
    pub fn width_violations(&self) -> u32 {
        self.state().width_violations
    }

    /// The size the driver chose for `queue`.
    pub fn queue_size(&self, queue: u16) -> u16 {
        self.state()
            .queues
            .get(usize::from(queue))
            .map_or(0, |queue| queue.size)
    }

    /// True when the driver enabled `queue`.
    pub fn queue_enabled(&self, queue: u16) -> bool {
        self.state()
            .queues
            .get(usize::from(queue))
            .is_some_and(|queue| queue.enabled)
    }

    /// The MSI-X vector programmed for `queue`.
    pub fn queue_msix_vector(&self, queue: u16) -> u16 {
        self.state()
            .queues
            .get(usize::from(queue))
            .map_or(registers::NO_VECTOR, |queue| queue.msix_vector)
    }

    /// The MSI-X vector programmed for configuration changes.
    pub fn config_msix_vector(&self) -> u16 {
        self.state().config_msix_vector
    }

    /// The ISR status byte, without clearing it.
    pub fn isr(&self) -> u8 {
        self.state().isr
    }
}
