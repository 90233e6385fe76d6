//! The netvsc driver: NVSP and RNDIS bring-up with bounded waits, then a non-blocking
//! [`NetDevice`] over transfer-page receive and send-buffer or GPA-direct transmit.

use alloc::collections::VecDeque;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;

use log::{debug, info, warn};
use net_device::{
    Capabilities, DeviceError, DmaAllocator, DmaRegion, HostDataPath, HostPath, LinkState,
    MacAddress, NetDevice, RxMeta, Stats, TxMeta,
};
use zerocopy::{FromBytes, IntoBytes};

use super::channel::{
    GpaRange, IncomingKind, IncomingPacket, NetvscChannel, OutgoingPacket, TransferRange,
};
use super::data_path::{DataPathCounters, DataPathState, VfEvent};
use super::nvsp::{self, NdisConfigCapabilities, NvspMessage, NvspVersion};
use super::rndis::{self, OffloadSupport, RndisMessage};
use crate::checksum::complete_partial_checksum;
use crate::dma_memory::{SlotPool, copy_from_region, empty_region};
use crate::error::{DmaPurpose, Error, Layer, Step};

/// Bytes of a guest page as VMBus counts them.
const PAGE_SIZE: usize = 4096;
/// Our id for the receive buffer; the host echoes it in every transfer-page packet.
const RECEIVE_BUFFER_ID: u16 = 0xcafe;
/// Our id for the send buffer (netvsp and Linux use 0).
const SEND_BUFFER_ID: u16 = 0;
/// Bytes of a small transmit slot: an RNDIS header and a 1514-byte frame, rounded up.
const SMALL_SLOT_SIZE: usize = 2048;
/// Bytes of one RNDIS control page (a request never crosses a page: DPDK refuses that).
const CONTROL_PAGE_SIZE: usize = PAGE_SIZE;
/// Control pages: the init sequence needs one at a time; the others carry keepalive answers
/// that may overlap with it.
const CONTROL_PAGES: usize = 4;
/// Largest RNDIS message we accept in one transfer-page range: a 64 KiB frame plus headers.
const MAX_RECEIVE_MESSAGE: usize = 65536 + 512;
/// Most host replies, keepalives and completions kept waiting at once: a host that floods
/// unsolicited messages costs a bounded amount of memory (the excess is dropped and counted).
const MAX_QUEUED: usize = 64;
/// Most receive completions kept waiting for ring space (one per host packet in flight).
const MAX_UNSENT_COMPLETIONS: usize = 4096;
/// Ethernet header length (untagged).
const ETHERNET_HEADER_LEN: usize = 14;
/// Most pages of one GPA-direct range: a 64 KiB LSO frame and its RNDIS header, unaligned.
const MAX_GPA_DIRECT_PAGES: usize = 24;

/// Transaction-id tags (bits 56-63) that route host completions back to what they complete.
/// Host-initiated transactions use bit 63, which none of ours set.
mod tag {
    pub const SHIFT: u32 = 56;
    pub const CONTROL: u64 = 1;
    pub const SMALL: u64 = 2;
    pub const SECTION: u64 = 3;
    pub const LARGE: u64 = 4;
    pub const REQUEST: u64 = 5;
    /// SWITCH_DATA_PATH requests; the index is the request's sequence number.
    pub const SWITCH: u64 = 6;
}

fn transaction(tag: u64, index: usize) -> u64 {
    tag << tag::SHIFT | index as u64
}

/// How the driver is set up; [`NetvscConfig::default`] is what the kernel uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetvscConfig {
    /// Name for logs and [`NetDevice::name`].
    pub name: String,
    /// NVSP versions to offer, highest first (default: 6.1, 6, 5, 4, 2).
    pub versions: Vec<NvspVersion>,
    /// Bytes of the receive buffer (a multiple of 4 KiB).
    ///
    /// The default, 1 MiB, is sized for a 32 MiB VM: netvsp carves it into 1806-byte
    /// sub-allocations for a 1500-byte MTU, about 580 of them, i.e. 16 reserved for control
    /// messages plus ~560 frames in flight, more than one full 375-range batch of the host;
    /// at 10 Gbit/s that is ~0.7 ms of line rate, covered by our completion after every
    /// packet. Linux's 16 MiB default would be half the VM. It also takes ~9 GPADL_BODY
    /// messages, so multi-message GPADLs are exercised on every boot.
    pub receive_buffer_len: usize,
    /// Offer a send buffer (frames are copied into its sections); without one every frame
    /// goes GPA-direct. Both are what real hosts accept.
    pub use_send_buffer: bool,
    /// Bytes of the send buffer (a multiple of 4 KiB): 64 sections of netvsp's 6144 bytes.
    pub send_buffer_len: usize,
    /// GPA-direct transmit slots for MTU-sized frames: every frame uses them without a send
    /// buffer; with one, they take the frames that find every section in use.
    pub small_slots: usize,
    /// Transmit slots for LSO frames (allocated only when the host grants LSO).
    pub large_slots: usize,
    /// Negotiate checksum and LSO offloads with the host.
    pub offloads: bool,
    /// How long each init step waits for the host's answer.
    pub reply_timeout_ns: u64,
}

impl Default for NetvscConfig {
    fn default() -> Self {
        NetvscConfig {
            name: String::from("netvsc"),
            versions: NvspVersion::NEGOTIATION_ORDER.to_vec(),
            receive_buffer_len: 1 << 20,
            use_send_buffer: true,
            send_buffer_len: 64 * 6144,
            small_slots: 64,
            large_slots: 4,
            offloads: true,
            reply_timeout_ns: 5_000_000_000,
        }
    }
}

/// netvsc-specific counters, beyond [`Stats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetvscCounters {
    /// Transfer-page packets completed back to the host.
    pub receive_completions: u64,
    /// Transfer-page ranges (RNDIS messages) dropped as malformed or out of bounds.
    pub bad_ranges: u64,
    /// Host packets dropped as malformed (bad NVSP, bad page-set id, unknown completion).
    pub bad_packets: u64,
    /// Link indications received (connect and disconnect).
    pub link_indications: u64,
    /// Host keepalives answered.
    pub keepalives_answered: u64,
    /// VF association messages received.
    pub vf_associations: u64,
    /// Times the host moved the data path back to synthetic on its own.
    pub host_data_path_switches: u64,
    /// Frames whose checksum the driver completed because the host could not.
    pub software_checksums: u64,
    /// Frames sent with an LSO request.
    pub lso_frames: u64,
    /// Frames refused after `fill` because their offload request cannot be honoured (LSO the
    /// host cannot do, a checksum field outside the frame).
    pub tx_refused: u64,
    /// Frames received during bring-up, before the device was handed out (dropped).
    pub rx_before_ready: u64,
    /// Frames sent through a send-buffer section.
    pub tx_via_section: u64,
    /// Frames sent GPA-direct (from a transmit slot the host reads itself).
    pub tx_via_gpa_direct: u64,
    /// Of `tx_via_gpa_direct`: frames that would have taken a section but found every section
    /// in use.
    pub tx_section_overflow: u64,
    /// Frames refused because the guest → host ring lacked room for a data packet.
    pub tx_refused_ring_full: u64,
    /// Frames refused because every section and transmit slot they fit was in flight.
    pub tx_refused_no_buffer: u64,
    /// Times the ring lacked room for a data packet and the host was asked to signal once it
    /// has room (VMBus `pending_send_size`).
    pub room_signal_requests: u64,
}

/// The host's latest VF association message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VfAssociation {
    /// A VF is allocated (false: it was removed).
    pub allocated: bool,
    /// Its vPCI serial number.
    pub serial_number: u32,
}

/// What the host negotiated, for logs and tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Negotiated {
    /// NVSP version.
    pub version: NvspVersion,
    /// Send-buffer section size (None: GPA-direct only).
    pub send_section_size: Option<u32>,
    /// Receive sub-allocation size and count.
    pub receive_sub_allocations: (u32, u32),
    /// What the host can offload.
    pub offload: OffloadSupport,
}

/// The receive buffer and the layout the host gave it.
struct ReceiveBuffer {
    region: DmaRegion,
    gpadl: u32,
    /// The host may reach the memory (GPADL not torn down): leak it rather than free it.
    gpadl_live: bool,
    /// Bytes the host may use (the section's end offset).
    end: usize,
    /// Sub-allocation size and count the host announced.
    sub_allocations: (u32, u32),
}

impl Drop for ReceiveBuffer {
    fn drop(&mut self) {
        if self.gpadl_live {
            core::mem::forget(core::mem::replace(&mut self.region, empty_region()));
        }
    }
}

/// One transmit slot pool and its free list.
struct TxPool {
    pool: SlotPool,
    free: Vec<usize>,
    /// Frame length per slot while the host owns it (for the counters).
    lengths: Vec<usize>,
    tag: u64,
    /// The pool is the send buffer and its GPADL is not torn down: leak it rather than free it.
    gpadl_live: bool,
}

impl Drop for TxPool {
    fn drop(&mut self) {
        if self.gpadl_live {
            self.pool.leak();
        }
    }
}

impl TxPool {
    fn new(region: DmaRegion, slot_size: usize, count: usize, tag: u64) -> Option<Self> {
        let pool = SlotPool::new(region, slot_size, count)?;
        Some(TxPool {
            pool,
            free: (0..count).rev().collect(),
            lengths: vec![0; count],
            tag,
            gpadl_live: false,
        })
    }

    fn capacity(&self) -> usize {
        self.pool.slot_size()
    }

    /// Returns a completed slot; `None` when the host completes a slot it does not own.
    fn complete(&mut self, slot: usize) -> Option<usize> {
        if !self.pool.take_from_device(slot, 1) {
            return None;
        }
        self.free.push(slot);
        Some(self.lengths[slot])
    }
}

/// An owned copy of an RNDIS control reply.
struct RndisReply {
    message_type: u32,
    request_id: u32,
    status: u32,
    info: Vec<u8>,
    initialize: Option<rndis::InitializeComplete>,
}

/// The netvsc driver over a [`NetvscChannel`].
pub struct Netvsc<C: NetvscChannel> {
    channel: C,
    config: NetvscConfig,
    version: NvspVersion,
    mac: MacAddress,
    mtu: usize,
    capabilities: Capabilities,
    offload: OffloadSupport,
    link: LinkState,
    gone: bool,
    /// Bring-up is running: received frames have no taker yet.
    initializing: bool,
    /// `stop` ran: the channel is closed and the buffers torn down.
    stopped: bool,
    receive: ReceiveBuffer,
    send_buffer: Option<(TxPool, u32)>,
    small: Option<TxPool>,
    large: Option<TxPool>,
    control: TxPool,
    /// The packet being worked through (a transfer-page packet may hold many frames).
    incoming: IncomingPacket,
    /// Next range of `incoming` to process; `None` when no packet is in progress.
    next_range: Option<usize>,
    /// Receive completions the ring had no room for yet.
    unsent_completions: VecDeque<u64>,
    /// KEEPALIVE answers waiting for a control page.
    unsent_keepalives: VecDeque<u32>,
    /// Private copy of the current RNDIS message.
    scratch: Vec<u8>,
    nvsp_replies: VecDeque<NvspMessage>,
    rndis_replies: VecDeque<RndisReply>,
    next_request_id: u32,
    pending_flush: bool,
    /// Bytes free in the guest → host ring when last looked (after our latest send, so never
    /// more than there is: only our sends take room).
    ring_room: usize,
    /// Ring bytes the largest data packet takes (a GPA-direct send of the largest slot).
    data_packet_ring_len: usize,
    /// The host was asked to signal once the ring has `data_packet_ring_len` bytes free.
    room_signal_requested: bool,
    announce: bool,
    data_path: DataPathState,
    stats: Stats,
    counters: NetvscCounters,
}

impl<C: NetvscChannel> Netvsc<C> {
    /// Brings the device up on an opened channel: NVSP negotiation (highest version first),
    /// NDIS configuration and version, receive and send buffers, RNDIS initialisation, MAC,
    /// MTU and offload queries, offload parameters and the packet filter
    /// (`hyperv-vmbus-netvsc.md` §3.2, §4). Every wait is bounded by
    /// [`NetvscConfig::reply_timeout_ns`] of the channel's clock.
    ///
    /// On failure the channel is closed and the buffers' GPADLs torn down.
    pub fn new(
        mut channel: C,
        dma: &dyn DmaAllocator,
        config: NetvscConfig,
    ) -> Result<Self, (Error, C)> {
        let control_region = match dma.allocate(CONTROL_PAGES * CONTROL_PAGE_SIZE, PAGE_SIZE) {
            Some(region) => region,
            None => {
                return Err((
                    Error::DmaAllocationFailed {
                        purpose: DmaPurpose::RndisControlPages,
                        len: CONTROL_PAGES * CONTROL_PAGE_SIZE,
                    },
                    channel,
                ));
            }
        };
        let receive_len = config.receive_buffer_len.next_multiple_of(PAGE_SIZE);
        let Some(receive_region) = dma.allocate(receive_len, PAGE_SIZE) else {
            return Err((
                Error::DmaAllocationFailed {
                    purpose: DmaPurpose::NetvscReceiveBuffer,
                    len: receive_len,
                },
                channel,
            ));
        };
        let receive_gpadl = match channel.create_gpadl(&receive_region) {
            Ok(gpadl) => gpadl,
            Err(error) => {
                // The host may hold part of the GPADL: never free the memory under it.
                core::mem::forget(receive_region);
                channel.close();
                return Err((error, channel));
            }
        };
        let control = TxPool::new(
            control_region,
            CONTROL_PAGE_SIZE,
            CONTROL_PAGES,
            tag::CONTROL,
        )
        .expect("control region sized for its pages");
        let mut device = Netvsc {
            channel,
            config,
            version: NvspVersion::V1,
            mac: MacAddress::default(),
            mtu: 1500,
            capabilities: Capabilities::default(),
            offload: OffloadSupport::default(),
            link: LinkState::Down,
            gone: false,
            initializing: true,
            stopped: false,
            receive: ReceiveBuffer {
                region: receive_region,
                gpadl: receive_gpadl,
                gpadl_live: true,
                end: 0,
                sub_allocations: (0, 0),
            },
            send_buffer: None,
            small: None,
            large: None,
            control,
            incoming: IncomingPacket::default(),
            next_range: None,
            unsent_completions: VecDeque::new(),
            unsent_keepalives: VecDeque::new(),
            scratch: Vec::with_capacity(MAX_RECEIVE_MESSAGE),
            nvsp_replies: VecDeque::new(),
            rndis_replies: VecDeque::new(),
            next_request_id: 1,
            pending_flush: false,
            ring_room: 0,
            room_signal_requested: false,
            data_packet_ring_len: 0,
            announce: false,
            data_path: DataPathState::default(),
            stats: Stats::default(),
            counters: NetvscCounters::default(),
        };
        match device.initialize(dma) {
            Ok(()) => {
                device.initializing = false;
                Ok(device)
            }
            Err(error) => {
                warn!("{}: bring-up failed: {error}", device.config.name);
                device.shut_down();
                let channel = device.into_channel();
                Err((error, channel))
            }
        }
    }

    fn into_channel(self) -> C {
        let Netvsc {
            channel,
            receive,
            send_buffer,
            small,
            large,
            control,
            ..
        } = self;
        // Memory the host might still reach after a failed teardown is leaked by
        // shut_down; what is left here is ours again.
        drop((receive, send_buffer, small, large, control));
        channel
    }

    fn initialize(&mut self, dma: &dyn DmaAllocator) -> Result<(), Error> {
        let name = self.config.name.clone();
        self.negotiate_version()?;
        // §3.2 step 3: MTU and capabilities (v2+); no completion requested, as Linux does.
        if self.version >= NvspVersion::V2 {
            let message = nvsp::encode(
                nvsp::message_type::SEND_NDIS_CONFIG,
                &nvsp::SendNdisConfig {
                    mtu: (self.mtu + ETHERNET_HEADER_LEN) as u32,
                    reserved: 0,
                    capabilities: NdisConfigCapabilities::for_version(self.version).bits(),
                },
            );
            self.send_request(&message, false, Step::NdisConfig)?;
        }
        // §3.2 step 4: NDIS 6.30 from NVSP 5, else 6.1.
        let ndis_minor = if self.version >= NvspVersion::V5 {
            30
        } else {
            1
        };
        let message = nvsp::encode(
            nvsp::message_type::SEND_NDIS_VERSION,
            &nvsp::SendNdisVersion {
                major: 6,
                minor: ndis_minor,
            },
        );
        self.send_request(&message, false, Step::NdisVersion)?;
        self.set_up_receive_buffer()?;
        if self.config.use_send_buffer {
            self.set_up_send_buffer(dma)?;
        }
        self.initialize_rndis()?;
        self.allocate_transmit_pools(dma)?;
        let filter = rndis::packet_filter::DIRECTED
            | rndis::packet_filter::BROADCAST
            | rndis::packet_filter::ALL_MULTICAST;
        self.set_oid(rndis::oid::GEN_CURRENT_PACKET_FILTER, &filter.to_le_bytes())?;
        info!(
            "{name}: NVSP {}, MAC {}, MTU {}, {} send, link {:?}, tx checksum {}, rx checksum {}, LSO {}",
            self.version,
            self.mac,
            self.mtu,
            if self.send_buffer.is_some() {
                "send buffer"
            } else {
                "GPA-direct"
            },
            self.link,
            self.capabilities.tx_checksum,
            self.capabilities.rx_checksum,
            self.capabilities.max_tso_size
        );
        Ok(())
    }

    fn negotiate_version(&mut self) -> Result<(), Error> {
        let versions = self.config.versions.clone();
        for version in versions {
            let message = nvsp::encode(
                nvsp::message_type::INIT,
                &nvsp::Init {
                    min_version: version.0,
                    max_version: version.0,
                },
            );
            self.send_request(&message, true, Step::Init)?;
            let complete = self.wait_nvsp(Step::Init, |message| match message {
                NvspMessage::InitComplete(complete) => Some(*complete),
                _ => None,
            })?;
            if complete.status == nvsp::status::SUCCESS {
                self.version = version;
                return Ok(());
            }
            debug!(
                "{}: host refused NVSP {version} (status {})",
                self.config.name, complete.status
            );
        }
        Err(Error::NoCommonVersion)
    }

    fn set_up_receive_buffer(&mut self) -> Result<(), Error> {
        let message = nvsp::encode(
            nvsp::message_type::SEND_RECEIVE_BUFFER,
            &nvsp::SendBuffer {
                gpadl: self.receive.gpadl,
                id: RECEIVE_BUFFER_ID,
                reserved: 0,
            },
        );
        self.send_request(&message, true, Step::ReceiveBuffer)?;
        let complete = self.wait_nvsp(Step::ReceiveBuffer, |message| match message {
            NvspMessage::ReceiveBufferComplete(complete) => Some(*complete),
            _ => None,
        })?;
        if complete.status != nvsp::status::SUCCESS {
            return Err(Error::HostRefused {
                step: Step::ReceiveBuffer,
                status: complete.status,
            });
        }
        let section = complete.section;
        let total =
            u64::from(section.sub_allocation_size) * u64::from(section.sub_allocation_count);
        let check = |ok: bool, what: &'static str, value: u64| {
            if ok {
                Ok(())
            } else {
                Err(Error::OutOfRange {
                    layer: Layer::Nvsp,
                    what,
                    value,
                })
            }
        };
        check(
            complete.section_count == 1,
            "receive buffer section count",
            complete.section_count.into(),
        )?;
        check(
            section.offset == 0,
            "receive buffer section offset",
            section.offset.into(),
        )?;
        check(
            section.end_offset as usize <= self.receive.region.len()
                && total <= u64::from(section.end_offset),
            "receive buffer section end",
            section.end_offset.into(),
        )?;
        check(
            section.sub_allocation_size > 0,
            "receive sub-allocation size",
            0,
        )?;
        self.receive.end = section.end_offset as usize;
        self.receive.sub_allocations = (section.sub_allocation_size, section.sub_allocation_count);
        debug!(
            "{}: receive buffer {} x {} bytes",
            self.config.name, section.sub_allocation_count, section.sub_allocation_size
        );
        Ok(())
    }

    fn set_up_send_buffer(&mut self, dma: &dyn DmaAllocator) -> Result<(), Error> {
        let len = self.config.send_buffer_len.next_multiple_of(PAGE_SIZE);
        let region = dma
            .allocate(len, PAGE_SIZE)
            .ok_or(Error::DmaAllocationFailed {
                purpose: DmaPurpose::NetvscSendBuffer,
                len,
            })?;
        let gpadl = match self.channel.create_gpadl(&region) {
            Ok(gpadl) => gpadl,
            Err(error) => {
                // The host may hold part of the GPADL: never free the memory under it.
                core::mem::forget(region);
                return Err(error);
            }
        };
        let message = nvsp::encode(
            nvsp::message_type::SEND_SEND_BUFFER,
            &nvsp::SendBuffer {
                gpadl,
                id: SEND_BUFFER_ID,
                reserved: 0,
            },
        );
        // Keep the region alive (and its GPADL known) even if the host refuses it, so that
        // shut_down tears the GPADL down before the memory is freed.
        let mut placeholder =
            TxPool::new(region, len, 1, tag::SECTION).expect("one slot of the whole region");
        placeholder.gpadl_live = true;
        self.send_buffer = Some((placeholder, gpadl));
        self.send_request(&message, true, Step::SendBuffer)?;
        let complete = self.wait_nvsp(Step::SendBuffer, |message| match message {
            NvspMessage::SendBufferComplete(complete) => Some(*complete),
            _ => None,
        })?;
        if complete.status != nvsp::status::SUCCESS {
            return Err(Error::HostRefused {
                step: Step::SendBuffer,
                status: complete.status,
            });
        }
        let section_size = complete.section_size as usize;
        if section_size < rndis::TX_HEADER_LEN + self.mtu + ETHERNET_HEADER_LEN
            || section_size > len
        {
            return Err(Error::OutOfRange {
                layer: Layer::Nvsp,
                what: "send buffer section size",
                value: section_size as u64,
            });
        }
        let (mut placeholder, gpadl) = self.send_buffer.take().expect("set above");
        let empty = SlotPool::new(empty_region(), 1, 0).expect("zero slots fit");
        let region = core::mem::replace(&mut placeholder.pool, empty).into_region();
        placeholder.gpadl_live = false;
        let sections = len / section_size;
        let mut pool = TxPool::new(region, section_size, sections, tag::SECTION)
            .expect("sections fit the buffer");
        pool.gpadl_live = true;
        self.send_buffer = Some((pool, gpadl));
        Ok(())
    }

    fn allocate_transmit_pools(&mut self, dma: &dyn DmaAllocator) -> Result<(), Error> {
        // With a send buffer too: a burst that finds every section in flight goes GPA-direct
        // from these slots instead of being refused while the ring still has room.
        let small_slots = self.config.small_slots.max(1);
        let len = small_slots * SMALL_SLOT_SIZE;
        let region = dma
            .allocate(len, PAGE_SIZE)
            .ok_or(Error::DmaAllocationFailed {
                purpose: DmaPurpose::NetvscTransmitSlots,
                len,
            })?;
        self.small = TxPool::new(region, SMALL_SLOT_SIZE, small_slots, tag::SMALL);
        if self.capabilities.max_tso_size > 0 {
            let slot =
                (rndis::TX_HEADER_LEN + ETHERNET_HEADER_LEN + self.capabilities.max_tso_size)
                    .next_multiple_of(PAGE_SIZE);
            let count = self.config.large_slots.max(1);
            let region =
                dma.allocate(slot * count, PAGE_SIZE)
                    .ok_or(Error::DmaAllocationFailed {
                        purpose: DmaPurpose::NetvscLsoSlots,
                        len: slot * count,
                    })?;
            self.large = TxPool::new(region, slot, count, tag::LARGE);
        }
        self.data_packet_ring_len = self.largest_data_packet_ring_len();
        self.refresh_ring_room();
        Ok(())
    }

    /// Ring bytes of the largest data packet this driver sends: GPA-direct from its largest
    /// slot, the slot starting anywhere in a page (a section send is smaller).
    fn largest_data_packet_ring_len(&self) -> usize {
        let largest_slot = [self.small.as_ref(), self.large.as_ref()]
            .into_iter()
            .flatten()
            .map(TxPool::capacity)
            .max()
            .unwrap_or(SMALL_SLOT_SIZE);
        let pages = [0u64; MAX_GPA_DIRECT_PAGES];
        let page_count = (largest_slot.div_ceil(PAGE_SIZE) + 1).min(MAX_GPA_DIRECT_PAGES);
        let payload = [0u8; nvsp::MESSAGE_SIZE];
        OutgoingPacket::GpaDirect {
            transaction_id: 0,
            ranges: &[GpaRange {
                byte_count: largest_slot as u32,
                byte_offset: 0,
                page_numbers: &pages[..page_count],
            }],
            payload: &payload,
        }
        .ring_len()
    }

    /// Looks at the ring's free bytes again (the host may have read packets since). While
    /// they are too few for a data packet, the host is asked to signal once they are not
    /// (`hyperv-vmbus-netvsc.md` §2.4, `pending_send_size`): it signals on its own only for
    /// packets it writes, so a full ring would otherwise be noticed at the next unrelated
    /// wake-up (a frame received, a timer), and a sender blocked on it would crawl. The
    /// request is withdrawn once there is room, so the host does not signal needlessly.
    fn refresh_ring_room(&mut self) {
        self.ring_room = self.channel.outgoing_free().unwrap_or(0);
        let short = self.ring_room < self.data_packet_ring_len;
        if short == self.room_signal_requested {
            return;
        }
        let threshold = if short { self.data_packet_ring_len } else { 0 };
        // An error means an unusable channel, which the next receive reports.
        if self.channel.request_room_signal(threshold).is_ok() {
            self.room_signal_requested = short;
            if short {
                self.counters.room_signal_requests += 1;
                // The host may have made the room before it saw the request (and would not
                // signal a crossing that already happened): look once more.
                self.ring_room = self.channel.outgoing_free().unwrap_or(0);
            }
        }
    }

    /// Writes one packet to the ring and keeps `ring_room` a lower bound of what is left.
    fn send_packet(&mut self, packet: &OutgoingPacket<'_>) -> Result<bool, Error> {
        let sent = self.channel.try_send(packet);
        if let Ok(true) = sent {
            self.refresh_ring_room();
        }
        sent
    }

    fn initialize_rndis(&mut self) -> Result<(), Error> {
        let request_id = self.request_id();
        let message = rndis::build_request(
            rndis::message_type::INITIALIZE,
            &rndis::InitializeRequest {
                request_id,
                major_version: rndis::MAJOR_VERSION,
                minor_version: rndis::MINOR_VERSION,
                max_transfer_size: rndis::MAX_TRANSFER_SIZE,
            },
            &[],
        );
        self.send_control(&message)?;
        let reply = self.wait_rndis(request_id)?;
        let Some(initialize) = reply.initialize else {
            return Err(Error::UnexpectedMessage {
                layer: Layer::Rndis,
                message_type: reply.message_type,
            });
        };
        if initialize.status != rndis::status::SUCCESS {
            return Err(Error::HostRefused {
                step: Step::RndisReply,
                status: initialize.status,
            });
        }
        let mac = self.query_oid(rndis::oid::PERMANENT_ADDRESS_802_3)?;
        let mac: [u8; 6] =
            mac.get(..6)
                .and_then(|mac| mac.try_into().ok())
                .ok_or(Error::Truncated {
                    layer: Layer::Rndis,
                    what: "MAC address",
                    len: mac.len(),
                    needed: 6,
                })?;
        self.mac = MacAddress(mac);
        let frame = self.query_oid(rndis::oid::GEN_MAXIMUM_FRAME_SIZE)?;
        let mtu = read_u32(&frame, "maximum frame size")? as usize;
        if !(576..=9216).contains(&mtu) {
            return Err(Error::OutOfRange {
                layer: Layer::Rndis,
                what: "maximum frame size",
                value: mtu as u64,
            });
        }
        self.mtu = mtu;
        // Media status: 0 connected. A failed query leaves the link up (netvsp always
        // answers; indications correct it later).
        self.link = match self.query_oid(rndis::oid::GEN_MEDIA_CONNECT_STATUS) {
            Ok(status) if read_u32(&status, "media status")? == 1 => LinkState::Down,
            _ => LinkState::Up,
        };
        self.capabilities = Capabilities {
            mtu: self.mtu,
            tx_checksum: false,
            rx_checksum: false,
            max_tso_size: 0,
        };
        if self.config.offloads {
            self.negotiate_offloads()?;
        }
        Ok(())
    }

    /// Queries the hardware capabilities and enables what they allow (Linux does the same:
    /// TCP checksum and LSO only when the answer says so).
    fn negotiate_offloads(&mut self) -> Result<(), Error> {
        let revision = if self.version >= NvspVersion::V5 {
            3
        } else if self.version >= NvspVersion::V4 {
            2
        } else {
            1
        };
        let header = rndis::NdisObjectHeader {
            object_type: rndis::NDIS_OBJECT_TYPE_OFFLOAD,
            revision,
            size: size_of::<rndis::NdisOffload>() as u16,
        };
        let answer = match self.query_oid_with(
            rndis::oid::TCP_OFFLOAD_HARDWARE_CAPABILITIES,
            header.as_bytes(),
        ) {
            Ok(answer) => answer,
            Err(Error::HostRefused { status, .. }) => {
                info!(
                    "{}: host reports no offload capabilities ({status:#x})",
                    self.config.name
                );
                return Ok(());
            }
            Err(error) => return Err(error),
        };
        let support = match rndis::parse_offload_capabilities(&answer) {
            Ok(support) => support,
            Err(error) => {
                warn!(
                    "{}: offload capabilities unusable: {error}",
                    self.config.name
                );
                return Ok(());
            }
        };
        // UDP checksum offload is broken on hosts below NVSP 5 (Linux disables it there).
        let support = if self.version < NvspVersion::V5 {
            OffloadSupport {
                tx_udp4: false,
                tx_udp6: false,
                ..support
            }
        } else {
            support
        };
        let lso_max = support.lso4_max.min(support.lso6_max) as usize;
        let use_lso = support.tx_tcp4 && support.tx_tcp6 && lso_max > self.mtu;
        let parameters = rndis::offload_parameters(&support, use_lso);
        match self.set_oid(rndis::oid::TCP_OFFLOAD_PARAMETERS, parameters.as_bytes()) {
            Ok(()) => {}
            Err(Error::HostRefused { status, .. }) => {
                warn!(
                    "{}: host refused offload parameters ({status:#x})",
                    self.config.name
                );
                return Ok(());
            }
            Err(error) => return Err(error),
        }
        self.offload = support;
        // The stack asks for TCP and UDP checksums over both IP versions; what the host cannot
        // do is completed in software per frame, so claim the offload when the host does TCP
        // over IPv4 (the bulk of the traffic).
        self.capabilities.tx_checksum = support.tx_tcp4;
        self.capabilities.rx_checksum = support.rx;
        // Linux treats the LSO maximum as the whole frame; so do we (minus the header the
        // bond adds back), capped at what an IP length field holds.
        self.capabilities.max_tso_size = if use_lso {
            lso_max.min(65535) - ETHERNET_HEADER_LEN
        } else {
            0
        };
        Ok(())
    }

    fn request_id(&mut self) -> u32 {
        let id = self.next_request_id;
        self.next_request_id = self.next_request_id.wrapping_add(1).max(1);
        id
    }

    fn query_oid(&mut self, oid: u32) -> Result<Vec<u8>, Error> {
        self.query_oid_with(oid, &[])
    }

    fn query_oid_with(&mut self, oid: u32, info: &[u8]) -> Result<Vec<u8>, Error> {
        let request_id = self.request_id();
        let message = rndis::build_oid_request(request_id, oid, false, info);
        self.send_control(&message)?;
        let reply = self.wait_rndis(request_id)?;
        if reply.message_type != rndis::message_type::QUERY_COMPLETE {
            return Err(Error::UnexpectedMessage {
                layer: Layer::Rndis,
                message_type: reply.message_type,
            });
        }
        if reply.status != rndis::status::SUCCESS {
            return Err(Error::HostRefused {
                step: Step::RndisReply,
                status: reply.status,
            });
        }
        Ok(reply.info)
    }

    fn set_oid(&mut self, oid: u32, info: &[u8]) -> Result<(), Error> {
        let request_id = self.request_id();
        let message = rndis::build_oid_request(request_id, oid, true, info);
        self.send_control(&message)?;
        let reply = self.wait_rndis(request_id)?;
        if reply.message_type != rndis::message_type::SET_COMPLETE {
            return Err(Error::UnexpectedMessage {
                layer: Layer::Rndis,
                message_type: reply.message_type,
            });
        }
        if reply.status != rndis::status::SUCCESS {
            return Err(Error::HostRefused {
                step: Step::RndisReply,
                status: reply.status,
            });
        }
        Ok(())
    }

    /// Sends an NVSP request in-band, waiting (bounded) for ring space.
    fn send_request(&mut self, message: &[u8], completion: bool, step: Step) -> Result<(), Error> {
        let packet = OutgoingPacket::InBand {
            transaction_id: transaction(tag::REQUEST, 0),
            completion_requested: completion,
            payload: message,
        };
        let deadline = self.deadline();
        loop {
            if self.send_packet(&packet)? {
                self.channel.flush();
                return Ok(());
            }
            self.wait_until(deadline, Step::RingSpace)
                .map_err(|error| match error {
                    Error::HostTimeout { timeout_ms, .. } => {
                        Error::HostTimeout { step, timeout_ms }
                    }
                    other => other,
                })?;
        }
    }

    fn deadline(&self) -> u64 {
        self.channel
            .now_ns()
            .saturating_add(self.config.reply_timeout_ns)
    }

    /// One bounded wait step: services the rings, then sleeps until the host signals or the
    /// deadline passes. Errors once the deadline has passed or the channel is gone.
    fn wait_until(&mut self, deadline: u64, step: Step) -> Result<(), Error> {
        if self.gone || self.channel.is_rescinded() {
            self.gone = true;
            return Err(Error::ChannelRescinded);
        }
        if self.channel.now_ns() >= deadline {
            return Err(Error::HostTimeout {
                step,
                timeout_ms: self.config.reply_timeout_ns / 1_000_000,
            });
        }
        self.channel.wait(deadline);
        self.service(0, &mut |_, _| {}, false);
        Ok(())
    }

    fn wait_nvsp<T>(
        &mut self,
        step: Step,
        mut matches: impl FnMut(&NvspMessage) -> Option<T>,
    ) -> Result<T, Error> {
        let deadline = self.deadline();
        loop {
            self.service(0, &mut |_, _| {}, false);
            while let Some(message) = self.nvsp_replies.pop_front() {
                if let Some(found) = matches(&message) {
                    return Ok(found);
                }
                self.counters.bad_packets += 1;
                warn!(
                    "{}: unexpected NVSP reply {message:?} while waiting for {step:?}",
                    self.config.name
                );
            }
            self.wait_until(deadline, step)?;
        }
    }

    fn wait_rndis(&mut self, request_id: u32) -> Result<RndisReply, Error> {
        let deadline = self.deadline();
        loop {
            self.service(0, &mut |_, _| {}, false);
            while let Some(reply) = self.rndis_replies.pop_front() {
                if reply.request_id == request_id {
                    return Ok(reply);
                }
                self.counters.bad_packets += 1;
                warn!(
                    "{}: RNDIS reply for request {} while waiting for {request_id}",
                    self.config.name, reply.request_id
                );
            }
            self.wait_until(deadline, Step::RndisReply)?;
        }
    }

    /// Sends an RNDIS control message GPA-direct from a control page, waiting (bounded) for a
    /// free page and ring space.
    fn send_control(&mut self, message: &[u8]) -> Result<(), Error> {
        let deadline = self.deadline();
        loop {
            match self.try_send_control(message)? {
                true => return Ok(()),
                false => self.wait_until(deadline, Step::RingSpace)?,
            }
        }
    }

    /// Sends an RNDIS control message if a control page and ring space are free.
    fn try_send_control(&mut self, message: &[u8]) -> Result<bool, Error> {
        if message.len() > CONTROL_PAGE_SIZE {
            return Err(Error::OutOfRange {
                layer: Layer::Rndis,
                what: "control message length",
                value: message.len() as u64,
            });
        }
        let Some(slot) = self.control.free.pop() else {
            return Ok(false);
        };
        let Some(bytes) = self.control.pool.span_mut(slot, 1) else {
            self.control.free.push(slot);
            return Ok(false);
        };
        bytes[..message.len()].copy_from_slice(message);
        let phys = self.control.pool.slot_phys(slot).expect("slot exists").0;
        let pages = [phys / PAGE_SIZE as u64];
        let ranges = [GpaRange {
            byte_count: message.len() as u32,
            byte_offset: (phys % PAGE_SIZE as u64) as u32,
            page_numbers: &pages,
        }];
        let payload = nvsp::encode(
            nvsp::message_type::SEND_RNDIS_PACKET,
            &nvsp::SendRndisPacket {
                channel_type: nvsp::CHANNEL_TYPE_CONTROL,
                send_buffer_section_index: nvsp::NO_SEND_BUFFER_SECTION,
                send_buffer_section_size: 0,
            },
        );
        self.control.pool.give_to_device(slot, 1);
        let sent = self.send_packet(&OutgoingPacket::GpaDirect {
            transaction_id: transaction(tag::CONTROL, slot),
            ranges: &ranges,
            payload: &payload,
        });
        match sent {
            Ok(true) => {
                self.channel.flush();
                Ok(true)
            }
            other => {
                self.control.pool.take_from_device(slot, 1);
                self.control.free.push(slot);
                other
            }
        }
    }

    /// Works through the rings: completions, host messages and transfer-page packets. With
    /// `deliver`, up to `budget` data frames go to `sink`; without, the first data frame stops
    /// the walk (it stays for the next `receive`). Returns frames delivered.
    fn service(
        &mut self,
        budget: usize,
        sink: &mut dyn FnMut(&[u8], RxMeta),
        deliver: bool,
    ) -> usize {
        if self.gone {
            return 0;
        }
        if self.channel.is_rescinded() {
            self.set_gone("channel rescinded");
            return 0;
        }
        self.send_unsent();
        let mut delivered = 0;
        loop {
            if let Some(next) = self.next_range {
                match self.process_ranges(next, budget, &mut delivered, sink, deliver) {
                    Some(stopped_at) => {
                        self.next_range = Some(stopped_at);
                        return delivered;
                    }
                    None => {
                        self.next_range = None;
                        self.complete_transfer(self.incoming.transaction_id);
                    }
                }
            }
            match self.channel.try_receive(&mut self.incoming) {
                Ok(true) => {}
                Ok(false) => break,
                Err(error) => {
                    self.set_gone_error(error);
                    break;
                }
            }
            match self.incoming.kind {
                IncomingKind::Completion => self.handle_completion(),
                IncomingKind::InBand => self.handle_in_band(),
                IncomingKind::TransferPages => self.start_transfer(),
            }
            if self.gone {
                break;
            }
        }
        if self.pending_flush {
            self.pending_flush = false;
            self.channel.flush();
        }
        // The host reads the ring on its own: what it freed is room for `can_transmit`.
        self.refresh_ring_room();
        delivered
    }

    fn set_gone(&mut self, why: &str) {
        if !self.gone {
            warn!("{}: device gone: {why}", self.config.name);
        }
        self.gone = true;
        self.link = LinkState::Gone;
    }

    fn set_gone_error(&mut self, error: Error) {
        if !self.gone {
            warn!("{}: device gone: {error}", self.config.name);
        }
        self.gone = true;
        self.link = LinkState::Gone;
    }

    fn send_unsent(&mut self) {
        while let Some(transaction_id) = self.unsent_completions.front().copied() {
            if !self.send_receive_completion(transaction_id) {
                return;
            }
            self.unsent_completions.pop_front();
        }
        while let Some(request_id) = self.unsent_keepalives.front().copied() {
            let message = rndis::build_request(
                rndis::message_type::KEEPALIVE_COMPLETE,
                &rndis::StatusComplete {
                    request_id,
                    status: rndis::status::SUCCESS,
                },
                &[],
            );
            match self.try_send_control(&message) {
                Ok(true) => {
                    self.counters.keepalives_answered += 1;
                    self.unsent_keepalives.pop_front();
                }
                Ok(false) => return,
                Err(error) => {
                    self.set_gone_error(error);
                    return;
                }
            }
        }
    }

    /// Sends the completion that hands a transfer-page packet's ranges back to the host.
    /// `false` when the ring is full (the caller keeps it for later).
    fn send_receive_completion(&mut self, transaction_id: u64) -> bool {
        let payload = nvsp::encode(
            nvsp::message_type::SEND_RNDIS_PACKET_COMPLETE,
            &nvsp::SendRndisPacketComplete {
                status: nvsp::status::SUCCESS,
            },
        );
        match self.send_packet(&OutgoingPacket::Completion {
            transaction_id,
            payload: &payload,
        }) {
            Ok(true) => {
                self.counters.receive_completions += 1;
                self.pending_flush = true;
                true
            }
            Ok(false) => false,
            Err(error) => {
                self.set_gone_error(error);
                // Nothing more will be sent; do not keep it.
                true
            }
        }
    }

    fn complete_transfer(&mut self, transaction_id: u64) {
        if !self.unsent_completions.is_empty() || !self.send_receive_completion(transaction_id) {
            if self.unsent_completions.len() >= MAX_UNSENT_COMPLETIONS {
                self.drop_packet("receive completion queue full");
            } else {
                self.unsent_completions.push_back(transaction_id);
            }
        }
    }

    fn drop_packet(&mut self, what: &str) {
        self.counters.bad_packets += 1;
        warn!("{}: dropped host packet: {what}", self.config.name);
    }

    fn handle_completion(&mut self) {
        let transaction_id = self.incoming.transaction_id;
        let index = (transaction_id & ((1 << tag::SHIFT) - 1)) as usize;
        match transaction_id >> tag::SHIFT {
            tag::REQUEST => match nvsp::parse(&self.incoming.payload) {
                Ok(message) => self.queue_nvsp_reply(message),
                // NDIS config and version completions are empty in netvsp.
                Err(_) if self.incoming.payload.len() < 4 => {}
                Err(error) => {
                    self.counters.bad_packets += 1;
                    warn!("{}: bad NVSP completion: {error}", self.config.name);
                }
            },
            tag::SWITCH => self.data_path.on_completion(index as u64),
            tag::CONTROL => {
                if self.control.complete(index).is_none() {
                    self.drop_packet("completion of a control page not in flight");
                }
            }
            tag::SMALL | tag::SECTION | tag::LARGE => {
                let status = nvsp::parse(&self.incoming.payload);
                let pool = match transaction_id >> tag::SHIFT {
                    tag::SMALL => self.small.as_mut(),
                    tag::SECTION => self.send_buffer.as_mut().map(|(pool, _)| pool),
                    _ => self.large.as_mut(),
                };
                match pool.and_then(|pool| pool.complete(index)) {
                    Some(len) => {
                        self.stats.tx_frames += 1;
                        self.stats.tx_bytes += len as u64;
                        if let Ok(NvspMessage::RndisPacketComplete(complete)) = status
                            && complete.status != nvsp::status::SUCCESS
                        {
                            debug!(
                                "{}: host failed a transmit (status {})",
                                self.config.name, complete.status
                            );
                        }
                    }
                    None => self.drop_packet("completion of a transmit slot not in flight"),
                }
            }
            _ => self.drop_packet("completion with an unknown transaction id"),
        }
    }

    fn handle_in_band(&mut self) {
        let transaction_id = self.incoming.transaction_id;
        let completion_requested = self.incoming.completion_requested;
        match nvsp::parse(&self.incoming.payload) {
            Ok(NvspMessage::VfAssociation(association)) => {
                self.counters.vf_associations += 1;
                let association = VfAssociation {
                    allocated: association.allocated != 0,
                    serial_number: association.serial_number,
                };
                info!("{}: host VF association {association:?}", self.config.name);
                self.data_path.on_association(association);
            }
            Ok(NvspMessage::SwitchDataPath(switch)) => {
                self.counters.host_data_path_switches += 1;
                self.data_path
                    .on_host_switch(switch.active_data_path == nvsp::DATA_PATH_VF);
                info!(
                    "{}: host switched the data path to {}",
                    self.config.name,
                    if switch.active_data_path == nvsp::DATA_PATH_VF {
                        "VF"
                    } else {
                        "synthetic"
                    }
                );
            }
            Ok(NvspMessage::IndirectionTable(_)) => {
                // One channel: every entry means channel 0 for us.
                debug!(
                    "{}: send indirection table ignored (single channel)",
                    self.config.name
                );
            }
            Ok(other) => {
                // Completions in in-band clothing (old hosts) are routed like completions.
                self.queue_nvsp_reply(other);
            }
            Err(error) => {
                self.counters.bad_packets += 1;
                warn!("{}: bad in-band NVSP message: {error}", self.config.name);
            }
        }
        if completion_requested {
            // netvsp treats completions of its VF messages as optional; send an empty one.
            match self.send_packet(&OutgoingPacket::Completion {
                transaction_id,
                payload: &[],
            }) {
                Ok(_) => self.pending_flush = true,
                Err(error) => self.set_gone_error(error),
            }
        }
    }

    fn start_transfer(&mut self) {
        let transaction_id = self.incoming.transaction_id;
        if self.incoming.pageset_id != RECEIVE_BUFFER_ID {
            self.drop_packet("transfer-page packet for an unknown page set");
            // The ranges are not ours, but the host waits for the completion all the same.
            self.complete_transfer(transaction_id);
            return;
        }
        match nvsp::parse(&self.incoming.payload) {
            Ok(NvspMessage::RndisPacket(_)) => self.next_range = Some(0),
            _ => {
                self.drop_packet("transfer-page packet without SEND_RNDIS_PACKET");
                self.complete_transfer(transaction_id);
            }
        }
    }

    /// Processes ranges from `next`; `Some(index)` when stopped early at `index`.
    fn process_ranges(
        &mut self,
        next: usize,
        budget: usize,
        delivered: &mut usize,
        sink: &mut dyn FnMut(&[u8], RxMeta),
        deliver: bool,
    ) -> Option<usize> {
        let mut index = next;
        while let Some(range) = self.incoming.ranges.get(index).copied() {
            if !self.copy_range(range) {
                index += 1;
                continue;
            }
            let scratch = core::mem::take(&mut self.scratch);
            let stop = match rndis::parse(&scratch) {
                Ok(RndisMessage::Packet(_)) if self.initializing => {
                    // Frames the host passes before bring-up finished (the packet filter
                    // applies before its SET completes): nobody takes them yet, and keeping
                    // them would block the control replies behind them.
                    self.counters.rx_before_ready += 1;
                    false
                }
                Ok(RndisMessage::Packet(packet)) => {
                    if !deliver || *delivered >= budget {
                        true
                    } else {
                        if self.link != LinkState::Gone {
                            let meta = self.receive_meta(packet.checksum);
                            sink(packet.frame, meta);
                            self.stats.rx_frames += 1;
                            self.stats.rx_bytes += packet.frame.len() as u64;
                            *delivered += 1;
                        }
                        false
                    }
                }
                Ok(control) => {
                    self.handle_rndis_control(control);
                    false
                }
                Err(error) => {
                    self.counters.bad_ranges += 1;
                    self.stats.rx_dropped_bad += 1;
                    warn!("{}: bad RNDIS message: {error}", self.config.name);
                    false
                }
            };
            self.scratch = scratch;
            if stop {
                return Some(index);
            }
            index += 1;
        }
        None
    }

    /// Copies one transfer-page range into `scratch` after checking it against the receive
    /// buffer; `false` (counted, logged) when it is out of bounds.
    fn copy_range(&mut self, range: TransferRange) -> bool {
        let start = range.byte_offset as usize;
        let len = range.byte_count as usize;
        let in_bounds = start
            .checked_add(len)
            .is_some_and(|end| end <= self.receive.end)
            && len >= size_of::<rndis::MessageHeader>()
            && len <= MAX_RECEIVE_MESSAGE;
        if !in_bounds {
            self.counters.bad_ranges += 1;
            self.stats.rx_dropped_bad += 1;
            warn!(
                "{}: transfer range {len} bytes at {start} outside the {}-byte receive buffer",
                self.config.name, self.receive.end
            );
            return false;
        }
        self.scratch.resize(len, 0);
        copy_from_region(&self.receive.region, start, &mut self.scratch)
    }

    fn receive_meta(&self, checksum: Option<u32>) -> RxMeta {
        use rndis::rx_checksum as bits;
        let Some(value) = checksum.filter(|_| self.capabilities.rx_checksum) else {
            return RxMeta::default();
        };
        let failed = value & (bits::TCP_FAILED | bits::UDP_FAILED | bits::IP_FAILED) != 0;
        let transport_ok = value & (bits::TCP_SUCCEEDED | bits::UDP_SUCCEEDED) != 0;
        RxMeta {
            checksum_verified: !failed && transport_ok,
            checksum_partial: false,
        }
    }

    fn queue_nvsp_reply(&mut self, message: NvspMessage) {
        if self.nvsp_replies.len() >= MAX_QUEUED {
            self.nvsp_replies.pop_front();
            self.drop_packet("unclaimed NVSP replies");
        }
        self.nvsp_replies.push_back(message);
    }

    fn queue_rndis_reply(&mut self, reply: RndisReply) {
        if self.rndis_replies.len() >= MAX_QUEUED {
            self.rndis_replies.pop_front();
            self.drop_packet("unclaimed RNDIS replies");
        }
        self.rndis_replies.push_back(reply);
    }

    fn handle_rndis_control(&mut self, message: RndisMessage<'_>) {
        match message {
            RndisMessage::Packet(_) => {}
            RndisMessage::InitializeComplete(complete) => self.queue_rndis_reply(RndisReply {
                message_type: rndis::message_type::INITIALIZE_COMPLETE,
                request_id: complete.request_id,
                status: complete.status,
                info: Vec::new(),
                initialize: Some(complete),
            }),
            RndisMessage::QueryComplete {
                request_id,
                status,
                info,
            } => self.queue_rndis_reply(RndisReply {
                message_type: rndis::message_type::QUERY_COMPLETE,
                request_id,
                status,
                info: info.to_vec(),
                initialize: None,
            }),
            RndisMessage::SetComplete(complete) => self.queue_rndis_reply(RndisReply {
                message_type: rndis::message_type::SET_COMPLETE,
                request_id: complete.request_id,
                status: complete.status,
                info: Vec::new(),
                initialize: None,
            }),
            RndisMessage::KeepaliveRequest { request_id } => {
                if self.unsent_keepalives.len() >= MAX_QUEUED {
                    self.drop_packet("keepalive answers queue full");
                } else {
                    self.unsent_keepalives.push_back(request_id);
                }
                self.send_unsent();
            }
            RndisMessage::KeepaliveComplete(_) | RndisMessage::ResetComplete { .. } => {}
            RndisMessage::IndicateStatus { status, .. } => self.indicate(status),
        }
    }

    /// Applies a status indication. The host debounces flaps itself (netvsp delays the second
    /// edge of a flap by 5 s), so the driver follows each edge as it comes and the bond's
    /// hold-down decides what to do with a short outage.
    fn indicate(&mut self, status: u32) {
        match status {
            rndis::status::MEDIA_CONNECT => {
                self.counters.link_indications += 1;
                if self.link != LinkState::Gone {
                    info!("{}: link up", self.config.name);
                    self.link = LinkState::Up;
                }
            }
            rndis::status::MEDIA_DISCONNECT => {
                self.counters.link_indications += 1;
                if self.link != LinkState::Gone {
                    info!("{}: link down", self.config.name);
                    self.link = LinkState::Down;
                }
            }
            rndis::status::NETWORK_CHANGE => {
                // Linux bounces the carrier to renew addresses; announcing does the part the
                // bond can use without a failover.
                info!("{}: network changed, announcing", self.config.name);
                self.announce = true;
            }
            other => debug!("{}: status indication {other:#x} ignored", self.config.name),
        }
    }

    /// The negotiated protocol parameters.
    pub fn negotiated(&self) -> Negotiated {
        let sub_allocations = self.receive.sub_allocations;
        Negotiated {
            version: self.version,
            send_section_size: self
                .send_buffer
                .as_ref()
                .map(|(pool, _)| pool.capacity() as u32),
            receive_sub_allocations: sub_allocations,
            offload: self.offload,
        }
    }

    /// netvsc counters.
    pub fn counters(&self) -> NetvscCounters {
        self.counters
    }

    /// The host's latest VF association, if any.
    pub fn vf_association(&self) -> Option<VfAssociation> {
        self.data_path.association()
    }

    /// Where the host steers traffic (the VF only after it confirmed a switch).
    pub fn data_path(&self) -> HostPath {
        self.data_path.path()
    }

    /// Data-path switch counters.
    pub fn data_path_counters(&self) -> DataPathCounters {
        self.data_path.counters()
    }

    /// The next association or data-path change, oldest first.
    pub fn take_vf_event(&mut self) -> Option<VfEvent> {
        self.data_path.take_event()
    }

    /// Sends SWITCH_DATA_PATH to the VF (`true`) or back to synthetic, with a completion
    /// requested; the switch counts only once the host completed it ([`Netvsc::data_path`]).
    /// Back to synthetic, the VF is unused from this call on. Returns false when nothing was
    /// sent (no VF associated, already there or on the way, ring full, device gone).
    pub fn request_data_path(&mut self, to_vf: bool) -> bool {
        if self.gone || self.stopped || self.version < NvspVersion::V4 {
            return false;
        }
        let sequence = match self.data_path.begin_request(to_vf) {
            Some(sequence) => sequence,
            None if !to_vf && self.data_path.needs_resend_to_synthetic() => {
                // A previous request back could not be sent: send it now.
                match self.data_path.begin_request(false) {
                    Some(sequence) => sequence,
                    None => return false,
                }
            }
            None => return false,
        };
        let payload = nvsp::encode(
            nvsp::message_type::SWITCH_DATA_PATH,
            &nvsp::SwitchDataPath {
                active_data_path: if to_vf {
                    nvsp::DATA_PATH_VF
                } else {
                    nvsp::DATA_PATH_SYNTHETIC
                },
            },
        );
        let sent = self.send_packet(&OutgoingPacket::InBand {
            transaction_id: transaction(tag::SWITCH, sequence as usize),
            completion_requested: true,
            payload: &payload,
        });
        match sent {
            Ok(true) => {
                self.channel.flush();
                info!(
                    "{}: asked the host for the {} data path",
                    self.config.name,
                    if to_vf { "VF" } else { "synthetic" }
                );
                true
            }
            Ok(false) => {
                self.data_path.request_not_sent(sequence);
                false
            }
            Err(error) => {
                self.data_path.request_not_sent(sequence);
                self.set_gone_error(error);
                false
            }
        }
    }

    /// The channel, for tests and the kernel glue (e.g. to read its own counters).
    pub fn channel(&self) -> &C {
        &self.channel
    }

    /// The channel, mutably (tests drive the fake host through it).
    pub fn channel_mut(&mut self) -> &mut C {
        &mut self.channel
    }

    /// Frames the host has not completed yet.
    pub fn transmits_in_flight(&self) -> usize {
        [
            self.small.as_ref(),
            self.large.as_ref(),
            self.send_buffer.as_ref().map(|(pool, _)| pool),
        ]
        .into_iter()
        .flatten()
        .map(|pool| pool.pool.device_owned_count())
        .sum()
    }

    /// Closes the channel and tears the buffers' GPADLs down. Memory whose GPADL could not be
    /// torn down is leaked rather than freed under the host (the buffers' `Drop` does that).
    fn shut_down(&mut self) {
        self.channel.close();
        if self.receive.gpadl_live {
            match self.channel.teardown_gpadl(self.receive.gpadl) {
                Ok(()) => self.receive.gpadl_live = false,
                Err(error) => warn!(
                    "{}: receive buffer GPADL teardown failed ({error}): leaking it",
                    self.config.name
                ),
            }
        }
        if let Some((pool, gpadl)) = self.send_buffer.as_mut()
            && pool.gpadl_live
        {
            match self.channel.teardown_gpadl(*gpadl) {
                Ok(()) => pool.gpadl_live = false,
                Err(error) => warn!(
                    "{}: send buffer GPADL teardown failed ({error}): leaking it",
                    self.config.name
                ),
            }
        }
        if self.gone {
            // The host may not have released the GPA-direct pages it was reading.
            for pool in [
                self.small.as_mut(),
                self.large.as_mut(),
                Some(&mut self.control),
            ]
            .into_iter()
            .flatten()
            {
                if pool.pool.device_owned_count() > 0 {
                    pool.pool.leak();
                }
            }
        }
    }

    fn transmit_frame(
        &mut self,
        len: usize,
        fill: &mut dyn FnMut(&mut [u8]) -> TxMeta,
    ) -> Result<(), DeviceError> {
        let max_frame = self.mtu.max(self.capabilities.max_tso_size) + ETHERNET_HEADER_LEN;
        if len > max_frame || len == 0 {
            return Err(DeviceError::FrameTooLarge {
                len,
                max: max_frame,
            });
        }
        let needed = rndis::TX_HEADER_LEN + len;
        // Where the frame fits, in order of preference: a section (one copy, the smallest
        // packet), else a GPA-direct slot of the smallest size that holds it.
        let fits_section = self
            .send_buffer
            .as_ref()
            .is_some_and(|(pool, _)| needed <= pool.capacity());
        let fits = |pool: &Option<TxPool>| pool.as_ref().is_some_and(|p| needed <= p.capacity());
        let has_free = |pool: &Option<TxPool>| pool.as_ref().is_some_and(|p| !p.free.is_empty());
        let fits_small = fits(&self.small);
        let fits_large = !fits_small && fits(&self.large);
        if !fits_section && !fits_small && !fits_large {
            return Err(DeviceError::FrameTooLarge {
                len,
                max: max_frame,
            });
        }
        // Refused before `fill`: a frame the caller hands over is never dropped for lack of
        // ring room (the host frees room on its own, so look again first).
        self.refresh_ring_room();
        if self.ring_room < self.data_packet_ring_len {
            self.stats.tx_ring_full += 1;
            self.counters.tx_refused_ring_full += 1;
            return Err(DeviceError::RingFull);
        }
        let section_free = self
            .send_buffer
            .as_ref()
            .is_some_and(|(pool, _)| !pool.free.is_empty());
        let pool_tag = if fits_section && section_free {
            tag::SECTION
        } else if fits_small && has_free(&self.small) {
            tag::SMALL
        } else if fits_large && has_free(&self.large) {
            tag::LARGE
        } else {
            self.stats.tx_ring_full += 1;
            self.counters.tx_refused_no_buffer += 1;
            return Err(DeviceError::RingFull);
        };
        let overflow = fits_section && pool_tag != tag::SECTION;
        let mtu = self.mtu;
        let offload = self.offload;
        let pool = match pool_tag {
            tag::SECTION => &mut self.send_buffer.as_mut().expect("chosen above").0,
            tag::SMALL => self.small.as_mut().expect("chosen above"),
            _ => self.large.as_mut().expect("chosen above"),
        };
        let slot = pool.free.pop().expect("checked to have a free slot");
        let bytes = pool
            .pool
            .span_mut(slot, 1)
            .expect("free slots are driver-owned");
        let (header, rest) = bytes.split_at_mut(rndis::TX_HEADER_LEN);
        let frame = &mut rest[..len];
        let meta = fill(frame);
        let (ppis, software) = match transmit_offload(frame, meta, mtu, &offload) {
            Ok(plan) => plan,
            Err(why) => {
                pool.free.push(slot);
                warn!("{}: transmit refused: {why}", self.config.name);
                self.counters.tx_refused += 1;
                return Err(DeviceError::FrameTooLarge {
                    len,
                    max: mtu + ETHERNET_HEADER_LEN,
                });
            }
        };
        rndis::write_tx_header(header, len, ppis.as_slice());
        let is_lso = ppis
            .iter()
            .any(|(kind, _)| *kind == rndis::ppi_type::LARGE_SEND);
        pool.lengths[slot] = len;
        pool.pool.give_to_device(slot, 1);
        let phys = pool.pool.slot_phys(slot).expect("slot exists").0;
        let transaction_id = transaction(pool.tag, slot);
        let total = (rndis::TX_HEADER_LEN + len) as u32;
        let sent = if pool_tag == tag::SECTION {
            let payload = nvsp::encode(
                nvsp::message_type::SEND_RNDIS_PACKET,
                &nvsp::SendRndisPacket {
                    channel_type: nvsp::CHANNEL_TYPE_DATA,
                    send_buffer_section_index: slot as u32,
                    send_buffer_section_size: total,
                },
            );
            self.send_packet(&OutgoingPacket::InBand {
                transaction_id,
                completion_requested: true,
                payload: &payload,
            })
        } else {
            let first_page = phys / PAGE_SIZE as u64;
            let byte_offset = (phys % PAGE_SIZE as u64) as u32;
            let page_count = (byte_offset as usize + total as usize).div_ceil(PAGE_SIZE);
            let mut pages = [0u64; 24];
            let page_count = page_count.min(pages.len());
            for (index, page) in pages[..page_count].iter_mut().enumerate() {
                *page = first_page + index as u64;
            }
            let ranges = [GpaRange {
                byte_count: total,
                byte_offset,
                page_numbers: &pages[..page_count],
            }];
            let payload = nvsp::encode(
                nvsp::message_type::SEND_RNDIS_PACKET,
                &nvsp::SendRndisPacket {
                    channel_type: nvsp::CHANNEL_TYPE_DATA,
                    send_buffer_section_index: nvsp::NO_SEND_BUFFER_SECTION,
                    send_buffer_section_size: 0,
                },
            );
            self.send_packet(&OutgoingPacket::GpaDirect {
                transaction_id,
                ranges: &ranges,
                payload: &payload,
            })
        };
        let pool = match pool_tag {
            tag::SECTION => &mut self.send_buffer.as_mut().expect("chosen above").0,
            tag::SMALL => self.small.as_mut().expect("chosen above"),
            _ => self.large.as_mut().expect("chosen above"),
        };
        match sent {
            Ok(true) => {
                self.pending_flush = true;
                self.counters.software_checksums += u64::from(software);
                self.counters.lso_frames += u64::from(is_lso);
                if pool_tag == tag::SECTION {
                    self.counters.tx_via_section += 1;
                } else {
                    self.counters.tx_via_gpa_direct += 1;
                    self.counters.tx_section_overflow += u64::from(overflow);
                }
                Ok(())
            }
            Ok(false) => {
                // The ring had room a moment ago and only we write it: a channel that
                // misreports its room. The frame is lost; count it with the refusals.
                pool.pool.take_from_device(slot, 1);
                pool.free.push(slot);
                self.stats.tx_ring_full += 1;
                self.counters.tx_refused_ring_full += 1;
                warn!(
                    "{}: ring refused a data packet it had room for",
                    self.config.name
                );
                Err(DeviceError::RingFull)
            }
            Err(error) => {
                pool.pool.take_from_device(slot, 1);
                pool.free.push(slot);
                self.set_gone_error(error);
                Err(DeviceError::Gone)
            }
        }
    }
}

/// A few PPIs for one frame (at most two).
struct Ppis {
    entries: [(u32, u32); 2],
    len: usize,
}

impl Ppis {
    fn new() -> Self {
        Ppis {
            entries: [(0, 0); 2],
            len: 0,
        }
    }

    fn push(&mut self, kind: u32, value: u32) {
        if self.len < self.entries.len() {
            self.entries[self.len] = (kind, value);
            self.len += 1;
        }
    }

    fn as_slice(&self) -> &[(u32, u32)] {
        &self.entries[..self.len]
    }

    fn iter(&self) -> impl Iterator<Item = &(u32, u32)> {
        self.as_slice().iter()
    }
}

const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_IPV6: u16 = 0x86dd;
const TCP_CHECKSUM_FIELD: u16 = 16;
const UDP_CHECKSUM_FIELD: u16 = 6;

/// Decides how a frame's offload requests reach the host: the PPIs to send and whether the
/// checksum was completed in software instead (host cannot do that protocol, or the frame
/// is VLAN-tagged: hosts assume a 14-byte Ethernet header).
fn transmit_offload(
    frame: &mut [u8],
    meta: TxMeta,
    mtu: usize,
    offload: &OffloadSupport,
) -> Result<(Ppis, bool), &'static str> {
    let mut ppis = Ppis::new();
    let Some((start, field)) = meta.checksum else {
        if meta.tso_mss.is_some() {
            return Err("segmentation without a checksum request");
        }
        if frame.len() > mtu + ETHERNET_HEADER_LEN {
            return Err("frame over the MTU without segmentation");
        }
        return Ok((ppis, false));
    };
    let ethertype = frame
        .get(12..14)
        .map(|bytes| u16::from_be_bytes([bytes[0], bytes[1]]));
    let ipv4 = ethertype == Some(ETHERTYPE_IPV4);
    let ipv6 = ethertype == Some(ETHERTYPE_IPV6);
    let tcp = field == TCP_CHECKSUM_FIELD;
    let udp = field == UDP_CHECKSUM_FIELD;
    let start_ok = usize::from(start) >= ETHERNET_HEADER_LEN + 20
        && usize::from(start) < frame.len()
        && start < 0x400;
    if let Some(mss) = meta.tso_mss {
        let lso_ok = tcp
            && start_ok
            && mss > 0
            && ((ipv4 && offload.lso4_max > 0) || (ipv6 && offload.lso6_max > 0));
        if !lso_ok {
            return Err("segmentation the host cannot do for this frame");
        }
        // LSO v2 wants the TCP checksum field to hold the pseudo-header sum without the
        // length (Windows semantics, as Linux's netvsc prepares it); ours includes the whole
        // L4 length, so take that back out in one's-complement arithmetic. `start_ok` put the
        // IP header inside the frame.
        let at = usize::from(start) + usize::from(field);
        let l4_len = (frame.len() - usize::from(start)) as u32;
        let current = u32::from(u16::from_be_bytes([frame[at], frame[at + 1]]));
        let mut sum = current + (!l4_len & 0xffff) + (!(l4_len >> 16) & 0xffff);
        while sum >> 16 != 0 {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        frame[at..at + 2].copy_from_slice(&(sum as u16).to_be_bytes());
        // And the IP length fields zeroed (IPv4 header checksum too): the host writes them per
        // segment. This is the header Linux's netvsc hands Hyper-V for a large send.
        let ip = ETHERNET_HEADER_LEN;
        if ipv4 {
            frame[ip + 2..ip + 4].fill(0);
            frame[ip + 10..ip + 12].fill(0);
        } else {
            frame[ip + 4..ip + 6].fill(0);
        }
        ppis.push(
            rndis::ppi_type::LARGE_SEND,
            rndis::lso_v2_value(mss, start, ipv6),
        );
        return Ok((ppis, false));
    }
    if frame.len() > mtu + ETHERNET_HEADER_LEN {
        return Err("frame over the MTU without segmentation");
    }
    let host_can = start_ok
        && ((ipv4 && tcp && offload.tx_tcp4)
            || (ipv4 && udp && offload.tx_udp4)
            || (ipv6 && tcp && offload.tx_tcp6)
            || (ipv6 && udp && offload.tx_udp6));
    if host_can {
        use rndis::tx_checksum as bits;
        let mut value = if ipv4 { bits::IPV4 } else { bits::IPV6 };
        value |= if tcp { bits::TCP } else { bits::UDP };
        value |= u32::from(start) << bits::TRANSPORT_OFFSET_SHIFT;
        ppis.push(rndis::ppi_type::TCP_IP_CHECKSUM, value);
        return Ok((ppis, false));
    }
    complete_partial_checksum(frame, usize::from(start), usize::from(field))
        .map_err(|_| "checksum request outside the frame")?;
    Ok((ppis, true))
}

fn read_u32(bytes: &[u8], what: &'static str) -> Result<u32, Error> {
    u32::read_from_prefix(bytes)
        .map(|(value, _)| value)
        .map_err(|_| Error::Truncated {
            layer: Layer::Rndis,
            what,
            len: bytes.len(),
            needed: 4,
        })
}

impl<C: NetvscChannel> NetDevice for Netvsc<C> {
    fn name(&self) -> &str {
        &self.config.name
    }

    fn mac_address(&self) -> MacAddress {
        self.mac
    }

    fn capabilities(&self) -> Capabilities {
        self.capabilities
    }

    fn link_state(&self) -> LinkState {
        if self.gone {
            LinkState::Gone
        } else {
            self.link
        }
    }

    fn poll(&mut self, _now_ns: u64) {
        self.service(0, &mut |_, _| {}, false);
    }

    fn host_data_path(&mut self) -> Option<&mut dyn HostDataPath> {
        // Until the host associates a VF it does not steer anything (netvsp ignores switch
        // requests then); a VF paired by MAC alone is used as on KVM.
        if self.data_path.association().is_some() {
            Some(self)
        } else {
            None
        }
    }

    fn receive(&mut self, budget: usize, sink: &mut dyn FnMut(&[u8], RxMeta)) -> usize {
        self.service(budget, sink, true)
    }

    fn can_transmit(&self) -> bool {
        if self.gone || self.link != LinkState::Up {
            return false;
        }
        // What `transmit` checks, for a frame of any size: ring room for the largest data
        // packet, a section or a GPA-direct slot for an MTU frame, and a slot for the largest
        // (LSO) frame too, as virtio-net does (the bond decides before it knows the size).
        let free = |pool: Option<&TxPool>| pool.is_some_and(|pool| !pool.free.is_empty());
        let mtu_frame =
            free(self.send_buffer.as_ref().map(|(pool, _)| pool)) || free(self.small.as_ref());
        self.ring_room >= self.data_packet_ring_len
            && mtu_frame
            && self.large.as_ref().is_none_or(|pool| !pool.free.is_empty())
    }

    fn transmit(
        &mut self,
        len: usize,
        fill: &mut dyn FnMut(&mut [u8]) -> TxMeta,
    ) -> Result<(), DeviceError> {
        if self.gone {
            return Err(DeviceError::Gone);
        }
        if self.link != LinkState::Up {
            return Err(DeviceError::NotReady);
        }
        self.transmit_frame(len, fill)
    }

    fn flush(&mut self) {
        if self.pending_flush && !self.gone {
            self.pending_flush = false;
            self.channel.flush();
        }
    }

    fn stats(&self) -> Stats {
        self.stats
    }

    fn stop(&mut self) {
        if !self.stopped {
            // Also after a rescind: the client still closes the channel and tears the GPADLs
            // down (the host expects it before it releases the relid).
            self.stopped = true;
            self.shut_down();
        }
        self.gone = true;
        self.link = LinkState::Gone;
    }

    fn mark_gone(&mut self) {
        self.set_gone("marked gone");
    }

    fn take_announce_request(&mut self) -> bool {
        core::mem::take(&mut self.announce)
    }
}

impl<C: NetvscChannel> HostDataPath for Netvsc<C> {
    fn state(&self) -> HostPath {
        self.data_path.path()
    }

    fn vf_associated(&self) -> bool {
        self.data_path
            .association()
            .is_some_and(|association| association.allocated)
    }

    fn request(&mut self, to_vf: bool) -> bool {
        self.request_data_path(to_vf)
    }
}
