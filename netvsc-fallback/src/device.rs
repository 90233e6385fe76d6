//! The virtio-net driver: initialisation (virtio 1.x §3.1.1), device health (reset requests,
//! removal), interrupts and the [`NetDevice`] implementation. The datapath lives in the
//! `receive`, `transmit` and `control` submodules.

mod control;
mod receive;
mod transmit;

use alloc::boxed::Box;
use alloc::string::String;

use log::{error, info, warn};
use net_device::{
    Capabilities, DeviceError, DmaAllocator, LinkState, MacAddress, NetDevice, RegisterIo, RxMeta,
    Stats, TxMeta,
};

use crate::error::{DmaPurpose, Error, MsixTarget, QueueKind};
use crate::features::{Features, select_features};
use crate::net_header::NET_HEADER_LEN;
use crate::pci::{DeviceStatus, NetStatus, VirtioPciRegions, registers};
use crate::virtqueue::RingAreas;

use control::ControlPath;
use receive::ReceivePath;
use transmit::TransmitPath;

/// Ethernet header plus one VLAN tag: what a transmitted frame may add to the MTU.
const ETHERNET_OVERHEAD: usize = 18;
/// Ethernet header plus two VLAN tags (QinQ): what a received frame may add to the MTU.
const RECEIVE_ETHERNET_OVERHEAD: usize = 22;
/// MTU assumed without VIRTIO_NET_F_MTU.
const DEFAULT_MTU: usize = 1500;
/// Largest frame without VIRTIO_NET_F_MTU and without GSO (virtio 1.x §5.1.6.3).
const DEFAULT_MAX_FRAME: usize = 1514;
/// Largest IP packet: the limit of a TSO frame's IP total length.
const MAX_IP_PACKET: usize = 65_535;
/// Largest frame the device delivers with GUEST_TSO: Ethernet + VLAN + IPv6 header + payload
/// (virtio 1.x §5.1.6.3).
const MAX_GSO_RECEIVE_FRAME: usize = 14 + 4 + 40 + 65_535;
/// Virtqueue indices without multiqueue (§5.1.2).
const RECEIVE_QUEUE_INDEX: u16 = 0;
const TRANSMIT_QUEUE_INDEX: u16 = 1;
const CONTROL_QUEUE_INDEX: u16 = 2;
/// Control queue entries the driver asks for (one command is in flight at a time).
const CONTROL_QUEUE_SIZE: u16 = 16;
/// Attempts at reading the MAC address without `config_generation` changing.
const CONFIG_READ_ATTEMPTS: usize = 8;

/// MSI-X table entries for the device's interrupt sources.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsixVectors {
    /// Configuration change (link, announce, reset request).
    pub config: u16,
    /// Receive queue used buffers.
    pub rx: u16,
    /// Transmit queue used buffers (only requested when the transmit ring fills).
    pub tx: u16,
}

/// Driver settings. Start from [`VirtioNetConfig::default`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VirtioNetConfig {
    /// Receive queue entries wanted (a power of two; the device maximum wins if smaller).
    pub rx_queue_size: u16,
    /// Transmit queue entries wanted (a power of two; the device maximum wins if smaller).
    pub tx_queue_size: u16,
    /// Bytes per receive buffer, header included. 2048 holds a full 1500-MTU frame; with
    /// mergeable buffers larger frames span several buffers.
    pub rx_buffer_size: usize,
    /// MSI-X vectors to program, or `None` for INTx (the kernel calls [`VirtioNet::handle_intx`]).
    pub msix: Option<MsixVectors>,
    /// Bytes per transmit pool slot; a frame uses as many consecutive slots as it needs.
    pub tx_slot_size: usize,
    /// Slots in the transmit pool (one DMA region of `tx_slot_size * tx_pool_slots` bytes).
    pub tx_pool_slots: usize,
    /// Negotiate checksum offload in both directions (CSUM, GUEST_CSUM).
    pub checksum_offload: bool,
    /// Negotiate transmit segmentation offload (HOST_TSO4/6; needs `checksum_offload`).
    pub tso: bool,
    /// Negotiate receive segmentation offload (GUEST_TSO4/6): frames up to 64 KiB are
    /// reassembled from merged buffers and handed up whole. Off by default because the stack
    /// must accept frames larger than its MTU.
    pub guest_tso: bool,
    /// Complete received checksums the device left partial (NEEDS_CSUM, e.g. frames from the
    /// host's own stack). The device validated the data either way; a stack that only consumes
    /// frames (never forwards them) can skip the summing.
    pub complete_partial_checksums: bool,
    /// When `poll` finds that the device needs a reset, re-initialise it right away.
    pub auto_reinitialize: bool,
    /// How often `poll` reads device status and link state (each read is a VM exit), unless an
    /// interrupt says the configuration changed.
    pub health_check_interval_ns: u64,
    /// Maximum `device_status` reads while waiting for a reset to complete.
    pub reset_poll_limit: u32,
    /// MAC address to use if the device offers none (VIRTIO_NET_F_MAC not offered).
    pub fallback_mac: Option<MacAddress>,
}

impl Default for VirtioNetConfig {
    fn default() -> Self {
        VirtioNetConfig {
            rx_queue_size: 256,
            tx_queue_size: 256,
            rx_buffer_size: 2048,
            msix: None,
            tx_slot_size: 2048,
            tx_pool_slots: 512,
            checksum_offload: true,
            tso: true,
            guest_tso: false,
            complete_partial_checksums: true,
            auto_reinitialize: true,
            health_check_interval_ns: 10_000_000,
            reset_poll_limit: 100_000,
            fallback_mac: None,
        }
    }
}

impl VirtioNetConfig {
    fn validate(&self) -> Result<(), Error> {
        let queue_size_ok = |size: u16| size.is_power_of_two() && (2..=32768).contains(&size);
        if !queue_size_ok(self.rx_queue_size) {
            return Err(Error::InvalidConfig {
                field: "rx_queue_size",
                value: usize::from(self.rx_queue_size),
            });
        }
        if !queue_size_ok(self.tx_queue_size) {
            return Err(Error::InvalidConfig {
                field: "tx_queue_size",
                value: usize::from(self.tx_queue_size),
            });
        }
        // Descriptor lengths are 32-bit; a buffer must at least hold the header and a minimal
        // Ethernet frame.
        if !(NET_HEADER_LEN + 64..=1 << 20).contains(&self.rx_buffer_size) {
            return Err(Error::InvalidConfig {
                field: "rx_buffer_size",
                value: self.rx_buffer_size,
            });
        }
        if !(64..=1 << 20).contains(&self.tx_slot_size) {
            return Err(Error::InvalidConfig {
                field: "tx_slot_size",
                value: self.tx_slot_size,
            });
        }
        let pool_bytes = self.tx_slot_size.saturating_mul(self.tx_pool_slots);
        if self.tx_pool_slots == 0 || pool_bytes < NET_HEADER_LEN + DEFAULT_MTU + ETHERNET_OVERHEAD
        {
            return Err(Error::InvalidConfig {
                field: "tx_pool_slots",
                value: self.tx_pool_slots,
            });
        }
        if self.reset_poll_limit == 0 {
            return Err(Error::InvalidConfig {
                field: "reset_poll_limit",
                value: 0,
            });
        }
        Ok(())
    }
}

/// Driver-specific counters beyond [`Stats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VirtioNetCounters {
    /// Transmit used entries naming a descriptor that was not in flight (dropped, logged).
    pub tx_bad_completions: u64,
    /// Transmit frames whose checksum request could not be honoured (bad offsets).
    pub tx_checksum_errors: u64,
    /// Transmit doorbells rung.
    pub tx_notifications: u64,
    /// Receive doorbells rung (refills).
    pub rx_notifications: u64,
    /// Received frames that spanned several merged buffers.
    pub rx_merged_frames: u64,
    /// Received NEEDS_CSUM frames whose checksum the driver completed.
    pub rx_checksums_completed: u64,
    /// Times the device asked for a reset (DEVICE_NEEDS_RESET or lost configuration).
    pub device_reset_requests: u64,
    /// Successful (re-)initialisations, the first included.
    pub initializations: u64,
    /// Announce requests seen (VIRTIO_NET_S_ANNOUNCE).
    pub announce_requests: u64,
    /// Announce acknowledgements the device completed.
    pub announce_acks_completed: u64,
    /// Control commands the device answered with an error or a bad used entry.
    pub control_errors: u64,
}

/// Where the driver is in its life cycle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DriverState {
    /// DRIVER_OK set, queues live.
    Running,
    /// The device needs (or is undergoing) re-initialisation.
    Resetting,
    /// Stopped by `stop()`: the device is reset and idle.
    Stopped,
    /// The device is gone: no register access any more.
    Gone,
}

/// Logs the first few occurrences of a problem, then only at powers of two, so a hostile
/// device cannot flood the log.
#[derive(Default)]
struct LogLimiter {
    occurrences: u64,
}

impl LogLimiter {
    fn should_log(&mut self) -> bool {
        self.occurrences += 1;
        self.occurrences <= 8 || self.occurrences.is_power_of_two()
    }
}

/// Announce (gratuitous ARP) bookkeeping.
#[derive(Default)]
struct AnnounceState {
    /// The stack has to announce; cleared by `take_announce_request`.
    requested: bool,
    /// The current ANNOUNCE bit has already produced a request.
    seen: bool,
}

/// A virtio-net 1.x device over modern virtio-pci.
pub struct VirtioNet<R: RegisterIo, D: DmaAllocator> {
    regions: VirtioPciRegions<R>,
    allocator: D,
    config: VirtioNetConfig,
    name: String,
    state: DriverState,
    /// The device may be using DMA memory: set once queues are enabled, cleared by a completed
    /// reset or removal. Decides whether dropping the driver may free the rings.
    dma_may_be_active: bool,
    features: Features,
    mac: MacAddress,
    mtu: usize,
    max_tx_frame: usize,
    max_tso_frame: usize,
    max_rx_frame: usize,
    link_up: bool,
    rx: ReceivePath,
    tx: TransmitPath,
    control: Option<ControlPath>,
    stats: Stats,
    counters: VirtioNetCounters,
    announce: AnnounceState,
    health_check_forced: bool,
    last_health_check_ns: Option<u64>,
    /// Takes the "configuration vector fired" flag (see [`VirtioNet::set_config_interrupt`]).
    config_interrupt: Option<Box<dyn FnMut() -> bool>>,
    rx_warnings: LogLimiter,
    tx_warnings: LogLimiter,
    control_warnings: LogLimiter,
}

impl<R: RegisterIo, D: DmaAllocator> VirtioNet<R, D> {
    /// Allocates the rings and buffers and brings the device up (virtio 1.x §3.1.1).
    ///
    /// On error the device is left reset (or FAILED) and all memory is returned.
    pub fn new(
        regions: VirtioPciRegions<R>,
        allocator: D,
        config: VirtioNetConfig,
    ) -> Result<Self, Error> {
        config.validate()?;
        regions.validate()?;
        let rx = ReceivePath::allocate(&allocator, &config)?;
        let tx = TransmitPath::allocate(&allocator, &config)?;
        let mut device = VirtioNet {
            regions,
            allocator,
            config,
            name: String::from("virtio-net"),
            state: DriverState::Resetting,
            dma_may_be_active: false,
            features: Features::empty(),
            mac: MacAddress::default(),
            mtu: DEFAULT_MTU,
            max_tx_frame: DEFAULT_MTU + ETHERNET_OVERHEAD,
            max_tso_frame: 0,
            max_rx_frame: DEFAULT_MTU + RECEIVE_ETHERNET_OVERHEAD,
            link_up: false,
            rx,
            tx,
            control: None,
            stats: Stats::default(),
            counters: VirtioNetCounters::default(),
            announce: AnnounceState::default(),
            health_check_forced: false,
            last_health_check_ns: None,
            config_interrupt: None,
            rx_warnings: LogLimiter::default(),
            tx_warnings: LogLimiter::default(),
            control_warnings: LogLimiter::default(),
        };
        device.bring_up()?;
        Ok(device)
    }

    /// Sets the name returned by [`NetDevice::name`], e.g. "virtio-net 00:03.0".
    pub fn set_name(&mut self, name: &str) {
        self.name = String::from(name);
    }

    /// The features accepted during the last initialisation.
    pub fn negotiated_features(&self) -> Features {
        self.features
    }

    /// True when the device is the standby of a failover pair (VIRTIO_NET_F_STANDBY): the
    /// primary (VF) with the same MAC address should carry traffic while it is present.
    pub fn is_standby(&self) -> bool {
        self.features.contains(Features::STANDBY)
    }

    /// Driver-specific counters.
    pub fn counters(&self) -> VirtioNetCounters {
        self.counters
    }

    /// True when received frames are waiting (call `receive` again).
    pub fn rx_pending(&self) -> bool {
        self.state == DriverState::Running && self.rx.queue.used_pending() != 0
    }

    /// Services a legacy INTx interrupt: reads (and so clears) the ISR status byte. Returns
    /// `true` when the interrupt was this device's; the kernel then calls `poll`.
    pub fn handle_intx(&mut self) -> bool {
        if self.state == DriverState::Gone {
            return false;
        }
        let isr = self.regions.isr.read8(0);
        if isr == 0xFF {
            // Reserved bits set: the device is probably gone. Shared lines go on to other
            // handlers; the next poll confirms.
            self.health_check_forced = true;
            return false;
        }
        if isr == 0 {
            return false;
        }
        self.stats.interrupts += 1;
        if isr & registers::ISR_CONFIG != 0 {
            self.health_check_forced = true;
        }
        true
    }

    /// Records an MSI-X interrupt (optional, costs no register access): counts it, and when
    /// `vector` is the configuration vector makes the next `poll` re-read status and link.
    pub fn handle_msix_interrupt(&mut self, vector: u16) {
        self.stats.interrupts += 1;
        if self
            .config
            .msix
            .is_some_and(|vectors| vectors.config == vector)
        {
            self.health_check_forced = true;
        }
    }

    /// Lets `poll` learn that the configuration vector fired: `take` returns (and clears) the
    /// interrupt owner's flag, and a set flag makes that poll re-read status and link at once.
    /// The device raises that vector for every reset request (DEVICE_NEEDS_RESET, §2.1.2) and
    /// link change (the link bit is in the device configuration space, whose changes it
    /// notifies), so with it the periodic check is only a safety net and can be rare.
    pub fn set_config_interrupt(&mut self, take: Box<dyn FnMut() -> bool>) {
        self.config_interrupt = Some(take);
    }

    /// Makes the next `poll` check device status and link state regardless of the interval.
    pub fn request_health_check(&mut self) {
        self.health_check_forced = true;
    }

    /// True once per device announce request: the stack should send gratuitous ARP (and
    /// unsolicited neighbour advertisements) from this device's MAC, then call
    /// [`VirtioNet::ack_announce`].
    pub fn take_announce_request(&mut self) -> bool {
        core::mem::take(&mut self.announce.requested)
    }

    /// Resets the device and initialises it again (after DEVICE_NEEDS_RESET, or to recover
    /// from any doubt). Frames in flight are lost; received frames not yet taken are dropped.
    pub fn reinitialize(&mut self) -> Result<(), Error> {
        if self.state == DriverState::Gone {
            return Err(Error::DeviceGone);
        }
        self.bring_up()
    }

    fn common(&self) -> &R {
        &self.regions.common
    }

    fn read_status(&self) -> DeviceStatus {
        DeviceStatus::from_bits_retain(self.common().read8(registers::DEVICE_STATUS))
    }

    fn write_status(&self, status: DeviceStatus) {
        self.common()
            .write8(registers::DEVICE_STATUS, status.bits());
    }

    fn become_gone(&mut self, reason: &str) {
        if self.state != DriverState::Gone {
            warn!(
                "{}: device gone ({reason}); no further register access",
                self.name
            );
        }
        self.state = DriverState::Gone;
        self.link_up = false;
        // A removed device does no DMA.
        self.dma_may_be_active = false;
    }

    /// Writes 0 to `device_status` and waits, bounded, for the device to read back 0
    /// (virtio 1.x §4.1.4.3.2). Afterwards the device holds none of our buffers.
    fn reset_device(&mut self) -> Result<(), Error> {
        self.write_status(DeviceStatus::empty());
        let mut last_status = 0;
        for _ in 0..self.config.reset_poll_limit {
            last_status = self.common().read8(registers::DEVICE_STATUS);
            if last_status == 0 {
                self.dma_may_be_active = false;
                self.rx.reclaim_after_reset();
                self.tx.reclaim_after_reset();
                if let Some(control) = &mut self.control {
                    control.reclaim_after_reset();
                }
                return Ok(());
            }
            if last_status == 0xFF {
                self.become_gone("status reads all-ones during reset");
                return Err(Error::DeviceGone);
            }
            core::hint::spin_loop();
        }
        Err(Error::ResetTimeout {
            last_status,
            reads: self.config.reset_poll_limit,
        })
    }

    /// Reset plus the full initialisation sequence; shared by `new` and `reinitialize`.
    fn bring_up(&mut self) -> Result<(), Error> {
        self.state = DriverState::Resetting;
        self.link_up = false;
        self.reset_device()?;
        match self.initialize_after_reset() {
            Ok(()) => {
                self.counters.initializations += 1;
                info!(
                    "{}: up, MAC {}, MTU {}, features {:#018x}{}",
                    self.name,
                    self.mac,
                    self.mtu,
                    self.features.bits(),
                    if self.is_standby() {
                        ", failover standby"
                    } else {
                        ""
                    }
                );
                Ok(())
            }
            Err(error) => {
                if self.state != DriverState::Gone {
                    // §3.1.1: tell the device we gave up. If queues were already enabled, also
                    // reset it so it stops touching our memory (that clears FAILED again).
                    self.write_status(self.read_status() | DeviceStatus::FAILED);
                    if self.dma_may_be_active {
                        let _ = self.reset_device();
                    }
                }
                error!("{}: initialisation failed: {error}", self.name);
                Err(error)
            }
        }
    }

    fn read_device_features(&self) -> Features {
        let common = self.common();
        common.write32(registers::DEVICE_FEATURE_SELECT, 0);
        let low = common.read32(registers::DEVICE_FEATURE);
        common.write32(registers::DEVICE_FEATURE_SELECT, 1);
        let high = common.read32(registers::DEVICE_FEATURE);
        Features::from_bits_retain(u64::from(high) << 32 | u64::from(low))
    }

    fn write_driver_features(&self, features: Features) {
        let common = self.common();
        common.write32(registers::DRIVER_FEATURE_SELECT, 0);
        common.write32(registers::DRIVER_FEATURE, features.bits() as u32);
        common.write32(registers::DRIVER_FEATURE_SELECT, 1);
        common.write32(registers::DRIVER_FEATURE, (features.bits() >> 32) as u32);
    }

    /// The MTU the device reports, if it offers VIRTIO_NET_F_MTU and the value is legal.
    fn read_device_mtu(&self, offered: Features) -> Option<usize> {
        if !offered.contains(Features::MTU)
            || self.regions.device.len() < registers::NET_CONFIG_MTU_LEN
        {
            return None;
        }
        let mtu = usize::from(self.regions.device.read16(registers::NET_CONFIG_MTU));
        // §5.1.4.1: the device must report 68..=65535.
        (68..=MAX_IP_PACKET).contains(&mtu).then_some(mtu)
    }

    /// Reads the 6-byte MAC with the `config_generation` protocol (§4.1.4.3.1), since it
    /// spans several accesses.
    fn read_mac(&self) -> Result<MacAddress, Error> {
        let common = self.common();
        for _ in 0..CONFIG_READ_ATTEMPTS {
            let before = common.read8(registers::CONFIG_GENERATION);
            let mut mac = [0u8; 6];
            for (index, byte) in mac.iter_mut().enumerate() {
                *byte = self.regions.device.read8(registers::NET_CONFIG_MAC + index);
            }
            if common.read8(registers::CONFIG_GENERATION) == before {
                return Ok(MacAddress(mac));
            }
        }
        Err(Error::ConfigUnstable)
    }

    /// The features this driver can use, given the device's offer and the configuration.
    fn wanted_features(&self, offered: Features) -> Features {
        let mut wanted = Features::VERSION_1
            | Features::MAC
            | Features::STATUS
            | Features::MRG_RXBUF
            | Features::RING_EVENT_IDX
            | Features::STANDBY
            | Features::MTU
            | Features::CTRL_VQ
            | Features::GUEST_ANNOUNCE
            // Our DMA addresses are device-visible addresses (DmaAllocator contract), which is
            // what the device expects with this feature; refusing it may make the device fail.
            | Features::ACCESS_PLATFORM;
        if self.config.checksum_offload {
            wanted |= Features::CSUM | Features::GUEST_CSUM;
            let pool_bytes = self.config.tx_slot_size * self.config.tx_pool_slots;
            // TSO is only useful if the pool holds at least a few full-size segments' worth.
            if self.config.tso && pool_bytes >= NET_HEADER_LEN + 16 * 1024 {
                wanted |= Features::HOST_TSO4 | Features::HOST_TSO6;
            }
            let mergeable = offered.contains(Features::MRG_RXBUF);
            if self.config.guest_tso
                && (mergeable
                    || self.config.rx_buffer_size >= NET_HEADER_LEN + MAX_GSO_RECEIVE_FRAME)
            {
                wanted |= Features::GUEST_TSO4 | Features::GUEST_TSO6;
            }
        }
        wanted
    }

    /// Steps 2 to 8 of virtio 1.x §3.1.1, after a completed reset.
    fn initialize_after_reset(&mut self) -> Result<(), Error> {
        // §3.1.1 steps 2 and 3: we found the device and know how to drive it.
        self.write_status(DeviceStatus::ACKNOWLEDGE);
        self.write_status(DeviceStatus::ACKNOWLEDGE | DeviceStatus::DRIVER);

        let num_queues = self.common().read16(registers::NUM_QUEUES);
        if num_queues == 0 || num_queues == 0xFFFF {
            // A removed device reads 0 (QEMU MMIO) or all-ones.
            self.become_gone("num_queues reads 0 or all-ones");
            return Err(Error::DeviceGone);
        }
        if num_queues < 2 {
            return Err(Error::TooFewQueues {
                num_queues,
                needed: 2,
            });
        }

        // Step 4: read the offer, choose a subset. The device configuration may be read (not
        // written) here to decide.
        let offered = self.read_device_features();
        if !offered.contains(Features::VERSION_1) {
            return Err(Error::MissingVersion1 {
                offered: offered.bits(),
            });
        }
        let mut wanted = self.wanted_features(offered);
        let mergeable = offered.contains(Features::MRG_RXBUF);
        let device_mtu = self.read_device_mtu(offered);
        let receive_capacity = self.config.rx_buffer_size - NET_HEADER_LEN;
        if !mergeable && device_mtu.is_some_and(|mtu| mtu + ETHERNET_OVERHEAD > receive_capacity) {
            // §5.1.4.2: with MTU negotiated we must be able to receive an MTU-sized frame.
            wanted.remove(Features::MTU);
        }
        if !mergeable && receive_capacity < DEFAULT_MAX_FRAME {
            // §5.1.6.3.1: without merging, each buffer must hold a whole frame.
            return Err(Error::ReceiveBufferTooSmall {
                size: self.config.rx_buffer_size,
                needed: NET_HEADER_LEN + DEFAULT_MAX_FRAME,
            });
        }
        let mut features = select_features(offered, wanted);
        if features.contains(Features::CTRL_VQ) && num_queues <= CONTROL_QUEUE_INDEX {
            features.remove(Features::CTRL_VQ | Features::GUEST_ANNOUNCE);
        }
        self.write_driver_features(features);

        // Steps 5 and 6: FEATURES_OK, then re-read: the device clears it if it cannot work
        // with this subset.
        let negotiating =
            DeviceStatus::ACKNOWLEDGE | DeviceStatus::DRIVER | DeviceStatus::FEATURES_OK;
        self.write_status(negotiating);
        let status = self.read_status();
        if status.bits() == 0xFF {
            self.become_gone("status reads all-ones after FEATURES_OK");
            return Err(Error::DeviceGone);
        }
        if !status.contains(DeviceStatus::FEATURES_OK) {
            return Err(Error::FeaturesRejected {
                requested: features.bits(),
                status: status.bits(),
            });
        }
        self.features = features;

        // Step 7: device-specific setup.
        self.mac = if features.contains(Features::MAC) {
            self.read_mac()?
        } else {
            self.config.fallback_mac.ok_or(Error::NoMacAddress)?
        };
        self.mtu = if features.contains(Features::MTU) {
            device_mtu.unwrap_or(DEFAULT_MTU)
        } else {
            DEFAULT_MTU
        };
        self.max_tx_frame = self.mtu + ETHERNET_OVERHEAD;
        self.max_tso_frame = if features.intersects(Features::HOST_TSO4 | Features::HOST_TSO6) {
            (MAX_IP_PACKET + ETHERNET_OVERHEAD).min(self.tx.pool_bytes() - NET_HEADER_LEN)
        } else {
            0
        };
        self.max_rx_frame = if features.intersects(Features::GUEST_TSO4 | Features::GUEST_TSO6) {
            MAX_GSO_RECEIVE_FRAME
        } else {
            self.mtu + RECEIVE_ETHERNET_OVERHEAD
        };

        if let Some(vectors) = self.config.msix {
            self.set_config_vector(vectors.config)?;
        }
        let event_idx = features.contains(Features::RING_EVENT_IDX);
        let msix = self.config.msix;

        let (rx_size, rx_notify) = self.select_queue(
            RECEIVE_QUEUE_INDEX,
            QueueKind::Receive,
            self.rx.queue.capacity(),
            msix.map(|vectors| vectors.rx),
        )?;
        self.rx.configure(rx_size, event_idx);
        self.rx.notify_offset = rx_notify;
        self.rx
            .prepare_merge_buffer(features.contains(Features::MRG_RXBUF), self.max_rx_frame);
        self.enable_selected_queue(self.rx.queue.areas());

        let (tx_size, tx_notify) = self.select_queue(
            TRANSMIT_QUEUE_INDEX,
            QueueKind::Transmit,
            self.tx.queue.capacity(),
            msix.map(|vectors| vectors.tx),
        )?;
        self.tx.configure(tx_size, event_idx);
        self.tx.notify_offset = tx_notify;
        self.enable_selected_queue(self.tx.queue.areas());

        if features.contains(Features::CTRL_VQ) {
            if self.control.is_none() {
                self.control = Some(ControlPath::allocate(&self.allocator, CONTROL_QUEUE_SIZE)?);
            }
            let capacity = self
                .control
                .as_ref()
                .map_or(CONTROL_QUEUE_SIZE, |control| control.queue.capacity());
            // Control completions are reaped by poll; no interrupt vector needed.
            let (size, notify) =
                self.select_queue(CONTROL_QUEUE_INDEX, QueueKind::Control, capacity, None)?;
            // The announce command is a chain of two descriptors.
            if size < 2 {
                return Err(Error::QueueTooSmall {
                    queue: QueueKind::Control,
                    size,
                    needed: 2,
                });
            }
            if let Some(control) = &mut self.control {
                control.configure(size, event_idx);
                control.notify_offset = notify;
                let areas = control.queue.areas();
                self.enable_selected_queue(areas);
            }
        }

        // Fill the receive queue before DRIVER_OK; the doorbell has to wait until after it
        // (§3.1.1: no notifications before DRIVER_OK).
        self.rx.post_all(rx_size);
        self.announce = AnnounceState::default();
        self.link_up = self.read_link_up();

        // Step 8.
        self.write_status(negotiating | DeviceStatus::DRIVER_OK);
        self.state = DriverState::Running;
        if self.rx.queue.needs_notification() {
            self.regions
                .notify
                .write16(self.rx.notify_offset, RECEIVE_QUEUE_INDEX);
            self.counters.rx_notifications += 1;
        }
        Ok(())
    }

    fn set_config_vector(&self, vector: u16) -> Result<(), Error> {
        self.common().write16(registers::CONFIG_MSIX_VECTOR, vector);
        // §4.1.5.1.2: read back; NO_VECTOR means the device could not map it.
        if self.common().read16(registers::CONFIG_MSIX_VECTOR) != vector {
            return Err(Error::MsixVectorRefused {
                target: MsixTarget::Config,
                vector,
            });
        }
        Ok(())
    }

    /// Selects virtqueue `index` and negotiates its size and MSI-X vector (virtio 1.x
    /// §4.1.5.1.3). Returns the size to use and the queue's offset in the notify window. The
    /// caller then prepares its rings and calls [`Self::enable_selected_queue`].
    fn select_queue(
        &self,
        index: u16,
        kind: QueueKind,
        capacity: u16,
        vector: Option<u16>,
    ) -> Result<(u16, usize), Error> {
        let common = self.common();
        common.write16(registers::QUEUE_SELECT, index);
        let maximum = common.read16(registers::QUEUE_SIZE);
        if maximum == 0 {
            return Err(Error::QueueUnavailable { queue: kind, index });
        }
        // Split queues are a power of two in size; round a broken device's odd maximum down.
        let limit = capacity.min(maximum);
        let size = 1u16 << (15 - limit.leading_zeros());
        common.write16(registers::QUEUE_SIZE, size);
        // A device that did not take the size (its maximum read wrong once) would use rings of
        // another size than ours: nothing would ever arrive while the link looks up.
        let taken = common.read16(registers::QUEUE_SIZE);
        if taken != size {
            return Err(Error::QueueTooSmall {
                queue: kind,
                size: taken,
                needed: size,
            });
        }

        if let Some(vector) = vector {
            common.write16(registers::QUEUE_MSIX_VECTOR, vector);
            // §4.1.5.1.2: read back; NO_VECTOR means the device could not map it.
            if common.read16(registers::QUEUE_MSIX_VECTOR) != vector {
                return Err(Error::MsixVectorRefused {
                    target: MsixTarget::Queue(kind),
                    vector,
                });
            }
        }

        let notify_offset = usize::from(common.read16(registers::QUEUE_NOTIFY_OFF))
            * self.regions.notify_off_multiplier as usize;
        let window_len = self.regions.notify.len();
        if notify_offset
            .checked_add(2)
            .is_none_or(|end| end > window_len)
        {
            return Err(Error::NotifyOutOfRange {
                queue: kind,
                offset: notify_offset,
                window_len,
            });
        }
        Ok((size, notify_offset))
    }

    /// Writes the ring addresses of the selected queue and enables it.
    fn enable_selected_queue(&mut self, areas: RingAreas) {
        let common = &self.regions.common;
        for (offset, address) in [
            (registers::QUEUE_DESC, areas.descriptors),
            (registers::QUEUE_DRIVER, areas.driver),
            (registers::QUEUE_DEVICE, areas.device),
        ] {
            // 64-bit fields are written as two 32-bit halves (§4.1.3.1).
            common.write32(offset, address.0 as u32);
            common.write32(offset + 4, (address.0 >> 32) as u32);
        }
        common.write16(registers::QUEUE_ENABLE, 1);
        self.dma_may_be_active = true;
    }

    fn read_link_up(&self) -> bool {
        if !self.features.contains(Features::STATUS) {
            // §5.1.4.2: without STATUS, assume the link is up.
            return true;
        }
        let status =
            NetStatus::from_bits_retain(self.regions.device.read16(registers::NET_CONFIG_STATUS));
        status.contains(NetStatus::LINK_UP)
    }

    /// Reads device status and link state: notices removal, reset requests, link changes and
    /// announce requests.
    fn check_device(&mut self) {
        let status = self.read_status();
        if status.bits() == 0xFF {
            self.become_gone("status reads all-ones");
            return;
        }
        let lost = !status.contains(DeviceStatus::DRIVER_OK)
            || status.intersects(DeviceStatus::DEVICE_NEEDS_RESET | DeviceStatus::FAILED);
        if lost {
            // A removed device reads 0 here (QEMU MMIO); tell that apart from a reset by a
            // register that is never 0 on a live virtio-net device.
            let num_queues = self.common().read16(registers::NUM_QUEUES);
            if num_queues == 0 || num_queues == 0xFFFF {
                self.become_gone("num_queues reads 0 or all-ones");
                return;
            }
            if self.state == DriverState::Running {
                warn!(
                    "{}: device needs a reset (status {:#04x}); re-initialising",
                    self.name,
                    status.bits()
                );
                self.counters.device_reset_requests += 1;
            }
            self.state = DriverState::Resetting;
            self.link_up = false;
            return;
        }
        if !self.features.contains(Features::STATUS) {
            self.link_up = true;
            return;
        }
        let raw = self.regions.device.read16(registers::NET_CONFIG_STATUS);
        let net_status = NetStatus::from_bits_retain(raw);
        let link_up = net_status.contains(NetStatus::LINK_UP);
        if link_up != self.link_up {
            info!(
                "{}: link {}",
                self.name,
                if link_up { "up" } else { "down" }
            );
        }
        self.link_up = link_up;
        self.observe_announce(net_status.contains(NetStatus::ANNOUNCE));
    }

    fn observe_announce(&mut self, announce: bool) {
        let acknowledging = self
            .control
            .as_ref()
            .is_some_and(|control| control.announce_ack_busy());
        if !announce {
            self.announce.seen = false;
        } else if !self.announce.seen && !acknowledging {
            self.announce.seen = true;
            self.announce.requested = true;
            self.counters.announce_requests += 1;
            info!("{}: device asks for a gratuitous announce", self.name);
        }
    }

    fn health_check_due(&self, now_ns: u64) -> bool {
        self.health_check_forced
            || self.last_health_check_ns.is_none_or(|last| {
                now_ns.wrapping_sub(last) >= self.config.health_check_interval_ns
            })
    }
}

impl<R: RegisterIo, D: DmaAllocator> NetDevice for VirtioNet<R, D> {
    fn name(&self) -> &str {
        &self.name
    }

    fn mac_address(&self) -> MacAddress {
        self.mac
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            mtu: self.mtu,
            tx_checksum: self.features.contains(Features::CSUM),
            rx_checksum: self.features.contains(Features::GUEST_CSUM),
            max_tso_size: if self.features.contains(Features::HOST_TSO4) {
                self.max_tso_frame.saturating_sub(ETHERNET_OVERHEAD)
            } else {
                0
            },
        }
    }

    fn link_state(&self) -> LinkState {
        match self.state {
            DriverState::Gone => LinkState::Gone,
            DriverState::Resetting => LinkState::Resetting,
            DriverState::Stopped => LinkState::Down,
            DriverState::Running if self.link_up => LinkState::Up,
            DriverState::Running => LinkState::Down,
        }
    }

    fn poll(&mut self, now_ns: u64) {
        if matches!(self.state, DriverState::Gone | DriverState::Stopped) {
            return;
        }
        if self.config_interrupt.as_mut().is_some_and(|take| take()) {
            self.health_check_forced = true;
        }
        if self.health_check_due(now_ns) {
            self.health_check_forced = false;
            self.last_health_check_ns = Some(now_ns);
            self.check_device();
            if self.state == DriverState::Resetting
                && self.config.auto_reinitialize
                && let Err(error) = self.reinitialize()
            {
                warn!("{}: re-initialisation failed: {error}", self.name);
            }
        }
        if self.state != DriverState::Running {
            return;
        }
        self.reclaim_transmitted();
        self.service_control_queue();
    }

    fn receive(&mut self, budget: usize, sink: &mut dyn FnMut(&[u8], RxMeta)) -> usize {
        if self.state != DriverState::Running {
            return 0;
        }
        self.receive_frames(budget, sink)
    }

    fn can_transmit(&self) -> bool {
        self.state == DriverState::Running
            && self.link_up
            && (self.tx.has_room(NET_HEADER_LEN + self.largest_tx_frame())
                || self.tx.queue.used_pending() != 0)
    }

    fn transmit(
        &mut self,
        len: usize,
        fill: &mut dyn FnMut(&mut [u8]) -> TxMeta,
    ) -> Result<(), DeviceError> {
        match self.state {
            DriverState::Running if self.link_up => self.transmit_frame(len, fill),
            DriverState::Gone => Err(DeviceError::Gone),
            _ => Err(DeviceError::NotReady),
        }
    }

    fn flush(&mut self) {
        if self.state == DriverState::Running {
            self.flush_transmit();
        }
    }

    fn stats(&self) -> Stats {
        self.stats
    }

    fn stop(&mut self) {
        if matches!(self.state, DriverState::Gone | DriverState::Stopped) {
            return;
        }
        match self.reset_device() {
            Ok(()) => {
                self.state = DriverState::Stopped;
                self.link_up = false;
                info!("{}: stopped", self.name);
            }
            Err(Error::DeviceGone) => {}
            Err(error) => {
                // The device may still be doing DMA: keep the memory alive (leaked on drop).
                self.state = DriverState::Stopped;
                self.link_up = false;
                error!("{}: stop: {error}", self.name);
            }
        }
    }

    fn mark_gone(&mut self) {
        self.become_gone("marked gone by the kernel");
    }

    fn take_announce_request(&mut self) -> bool {
        VirtioNet::take_announce_request(self)
    }

    fn announce_done(&mut self) {
        self.ack_announce();
    }
}

impl<R: RegisterIo, D: DmaAllocator> Drop for VirtioNet<R, D> {
    fn drop(&mut self) {
        if self.dma_may_be_active && self.state != DriverState::Gone {
            let _ = self.reset_device();
        }
        if self.dma_may_be_active {
            // The reset did not complete: freeing the rings and buffers would let the device
            // scribble over reused memory. Leaking is the safe choice.
            error!(
                "{}: device did not reset; leaking its DMA memory",
                self.name
            );
            self.rx.leak();
            self.tx.leak();
            if let Some(control) = &mut self.control {
                control.leak();
            }
        }
    }
}

/// Allocates `len` bytes of DMA memory (page-aligned) or reports what for.
fn allocate_dma<D: DmaAllocator>(
    allocator: &D,
    len: usize,
    purpose: DmaPurpose,
) -> Result<net_device::DmaRegion, Error> {
    allocator
        .allocate(len, 4096)
        .filter(|region| region.len() >= len)
        .ok_or(Error::DmaAllocationFailed { purpose, len })
}
