//! The VMBus control plane: version negotiation, offers, GPADLs, open/close, rescind, unload.
//!
//! Sequences from the fact sheet §2 (Linux `connection.c`/`channel_mgmt.c`, OpenVMM
//! `vmbus_server`). Everything is polled: [`VmbusClient`] never blocks except in waits bounded
//! by [`ClientConfig::response_timeout_ns`] on the port's clock. Every host message is validated;
//! a bad one is counted in [`ClientCounters`], logged and dropped.

use crate::channel::{Channel, ChannelIds};
use crate::error::Error;
use crate::guid::Guid;
use crate::hypervisor::{ChannelEvents, HvStatus, HypervisorPort};
use crate::protocol::{
    self, AllOffersDelivered, CloseChannel, GpaRange, GpadlBody, GpadlCreated, GpadlHeader,
    GpadlTeardown, GpadlTorndown, InitiateContact, MAX_MESSAGE_SIZE, MessageType, OfferChannel,
    OpenChannel, OpenResult, RelIdReleased, RequestOffers, RescindChannelOffer, TargetInfo, Unload,
    UnloadResponse, VMBUS_SINT, Version, VersionResponse, VersionResponse2, VmbusMessage,
};
use crate::ring::PAGE_SIZE;
use alloc::collections::{BTreeMap, BTreeSet, VecDeque};
use alloc::vec::Vec;
use net_device::{DmaAllocator, DmaRegion, PhysAddr};
use zerocopy::IntoBytes;

/// Versions tried, highest first: Copper down to Win8 (fact sheet §2.1).
pub const DEFAULT_VERSIONS: [Version; 9] = [
    Version::COPPER,
    Version::IRON,
    Version::WIN10_RS5,
    Version::WIN10_RS4,
    Version::WIN10_RS3_1,
    Version::WIN10_RS3_0,
    Version::WIN10,
    Version::WIN8_1,
    Version::WIN8,
];

/// Most host messages handled in one go, so a flooding host cannot keep a call from returning.
const MAX_MESSAGES_PER_DRAIN: usize = 256;

/// First GPADL id handed out (Linux starts at the same value; any non-zero unique id works).
const FIRST_GPADL_ID: u32 = 0x000e_1e10;

/// Tunables of the client.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// Versions to offer, tried in order (highest first).
    pub versions: Vec<Version>,
    /// Longest wait for any one host response, and for a post the host keeps refusing with a
    /// retryable status.
    pub response_timeout_ns: u64,
    /// Most `idle()` rounds one wait may take, whatever the clock says: a stuck clock must not
    /// make a wait endless.
    pub max_wait_steps: u64,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            versions: DEFAULT_VERSIONS.to_vec(),
            response_timeout_ns: 5_000_000_000,
            max_wait_steps: 10_000_000,
        }
    }
}

/// A channel the host offered.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Offer {
    /// Device class ([`crate::guid::interface`]).
    pub interface_id: Guid,
    /// Device instance.
    pub instance_id: Guid,
    /// Relid.
    pub relid: u32,
    /// Connection id to signal.
    pub connection_id: u32,
    /// 0 for a primary channel.
    pub subchannel_index: u16,
    /// MMIO space wanted (vPCI).
    pub mmio_megabytes: u16,
    /// Offer flags.
    pub flags: u16,
    /// Device-specific data.
    pub user_defined: [u8; protocol::USER_DEFINED_DATA_SIZE],
}

impl Offer {
    fn from_message(message: &OfferChannel) -> Offer {
        Offer {
            interface_id: message.interface_id,
            instance_id: message.instance_id,
            relid: message.child_relid,
            connection_id: message.connection_id,
            subchannel_index: message.subchannel_index,
            mmio_megabytes: message.mmio_megabytes,
            flags: message.flags,
            user_defined: message.user_defined,
        }
    }
}

/// Something the host did that the client's owner must act on.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum ClientEvent {
    /// A channel offered after the initial enumeration (hot-add).
    Offer(Offer),
    /// The host withdrew a channel: stop using it, close it and tear down its GPADLs; the relid
    /// is released to the host once all of that is done.
    Rescinded {
        /// The channel.
        relid: u32,
    },
}

/// Control-plane counters (monotonic).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct ClientCounters {
    /// Host messages taken from the port.
    pub messages_received: u64,
    /// Dropped: type unknown or not valid from a host.
    pub unknown_type: u64,
    /// Dropped: shorter than its type requires (or empty).
    pub malformed: u64,
    /// Dropped: names a relid we were not offered.
    pub unknown_relid: u64,
    /// Dropped: a response nobody waits for, or a duplicate offer.
    pub unexpected: u64,
    /// Posts retried after a retryable hypercall status.
    pub post_retries: u64,
    /// Waits that timed out.
    pub timeouts: u64,
    /// Offers received (initial and hot-added).
    pub offers: u64,
    /// Rescinds received.
    pub rescinds: u64,
}

/// A buffer the host can reach through a GPADL. The memory stays with the handle until
/// [`VmbusClient::teardown_gpadl`] gets the host to release it.
#[derive(Debug)]
pub struct GpadlBuffer {
    id: u32,
    relid: u32,
    memory: DmaRegion,
}

impl GpadlBuffer {
    /// The GPADL id (what NVSP messages name the buffer by).
    pub fn id(&self) -> u32 {
        self.id
    }

    /// The channel it belongs to.
    pub fn relid(&self) -> u32 {
        self.relid
    }

    /// The memory (the host may write it while the GPADL lives).
    pub fn memory(&self) -> &DmaRegion {
        &self.memory
    }

    /// The memory, mutably.
    pub fn memory_mut(&mut self) -> &mut DmaRegion {
        &mut self.memory
    }
}

/// Parameters of [`VmbusClient::open_channel`].
#[derive(Clone, Copy, Debug)]
pub struct OpenParams {
    /// Data pages of the guest → host ring (plus one control page).
    pub outgoing_data_pages: usize,
    /// Data pages of the host → guest ring (plus one control page).
    pub incoming_data_pages: usize,
    /// OPENCHANNEL user data (zero for netvsc).
    pub user_data: [u8; protocol::USER_DEFINED_DATA_SIZE],
}

impl OpenParams {
    /// Rings of `outgoing` and `incoming` data pages, no user data.
    pub fn new(outgoing_data_pages: usize, incoming_data_pages: usize) -> OpenParams {
        OpenParams {
            outgoing_data_pages,
            incoming_data_pages,
            user_data: [0; protocol::USER_DEFINED_DATA_SIZE],
        }
    }
}

#[derive(Debug)]
struct OfferState {
    offer: Offer,
    rescinded: bool,
    open: bool,
    /// Live GPADLs on this channel (the relid is released only when none is left).
    gpadls: BTreeSet<u32>,
}

/// Responses that arrived and wait to be claimed by the waiting call.
#[derive(Default, Debug)]
struct Responses {
    version: Option<(VersionResponse, Option<u32>)>,
    all_offers_delivered: bool,
    gpadl_created: BTreeMap<u32, u32>,
    gpadl_torndown: BTreeSet<u32>,
    open_result: BTreeMap<u32, u32>,
    unload_response: bool,
}

/// What the client is waiting for, so responses nobody asked for are counted as unexpected.
#[derive(Default, Debug)]
struct Pending {
    version: bool,
    offers: bool,
    gpadls: BTreeSet<u32>,
    teardowns: BTreeSet<u32>,
    opens: BTreeSet<u32>,
    unload: bool,
}

/// The guest's VMBus connection.
pub struct VmbusClient<P: HypervisorPort> {
    port: P,
    config: ClientConfig,
    version: Option<Version>,
    features: u32,
    message_connection_id: u32,
    offers: BTreeMap<u32, OfferState>,
    events: VecDeque<ClientEvent>,
    responses: Responses,
    pending: Pending,
    next_gpadl: u32,
    counters: ClientCounters,
    /// Memory the host may still reach (a GPADL whose fate is unknown): never freed.
    quarantine: Vec<DmaRegion>,
}

impl<P: HypervisorPort> core::fmt::Debug for VmbusClient<P> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("VmbusClient")
            .field("version", &self.version)
            .field("message_connection_id", &self.message_connection_id)
            .field("offers", &self.offers.len())
            .field("counters", &self.counters)
            .finish()
    }
}

impl<P: HypervisorPort> VmbusClient<P> {
    /// Negotiates a version (highest first) and collects the initial offers.
    pub fn connect(port: P, config: ClientConfig) -> Result<VmbusClient<P>, Error> {
        let mut client = VmbusClient {
            port,
            config,
            version: None,
            features: 0,
            message_connection_id: protocol::MESSAGE_CONNECTION_ID,
            offers: BTreeMap::new(),
            events: VecDeque::new(),
            responses: Responses::default(),
            pending: Pending::default(),
            next_gpadl: FIRST_GPADL_ID,
            counters: ClientCounters::default(),
            quarantine: Vec::new(),
        };
        client.negotiate()?;
        client.request_offers()?;
        Ok(client)
    }

    /// The negotiated version (`None` after [`VmbusClient::unload`]).
    pub fn version(&self) -> Option<Version> {
        self.version
    }

    /// Copper feature flags the host granted (0 before 6.0).
    pub fn features(&self) -> u32 {
        self.features
    }

    /// Where control messages are posted.
    pub fn message_connection_id(&self) -> u32 {
        self.message_connection_id
    }

    /// Live (not rescinded) offers, by relid.
    pub fn offers(&self) -> impl Iterator<Item = &Offer> + '_ {
        self.offers
            .values()
            .filter(|state| !state.rescinded)
            .map(|state| &state.offer)
    }

    /// The live offer with `relid`.
    pub fn offer(&self, relid: u32) -> Option<&Offer> {
        self.offers
            .get(&relid)
            .filter(|state| !state.rescinded)
            .map(|state| &state.offer)
    }

    /// Counters.
    pub fn counters(&self) -> ClientCounters {
        self.counters
    }

    /// Bytes of DMA memory held back because the host never confirmed releasing it.
    pub fn quarantined_bytes(&self) -> usize {
        self.quarantine.iter().map(DmaRegion::len).sum()
    }

    /// The hypervisor port (e.g. to take channel events).
    pub fn port(&self) -> &P {
        &self.port
    }

    /// The hypervisor port, mutably.
    pub fn port_mut(&mut self) -> &mut P {
        &mut self.port
    }

    /// Moves pending channel event flags into `events` (which relids have ring activity).
    pub fn take_channel_events(&mut self, events: &mut ChannelEvents) {
        self.port.take_channel_events(events);
    }

    /// Processes every waiting host message and returns the next event, if any.
    pub fn poll(&mut self) -> Option<ClientEvent> {
        self.drain_messages();
        self.events.pop_front()
    }

    fn negotiate(&mut self) -> Result<(), Error> {
        let versions = self.config.versions.clone();
        let mut lowest = Version(0);
        for version in versions {
            lowest = version;
            // From 5.0 the host takes INITIATE_CONTACT on the multiclient port with our SINT in
            // the target info; below that on connection id 1 (Linux `vmbus_negotiate_version`).
            let (connection_id, target_info) = if version >= Version::WIN10_RS3_1 {
                let info = TargetInfo {
                    sint: VMBUS_SINT,
                    vtl: 0,
                    padding: 0,
                    feature_flags: 0,
                };
                let mut raw = [0u8; 8];
                raw.copy_from_slice(info.as_bytes());
                (protocol::MESSAGE_CONNECTION_ID_4, u64::from_le_bytes(raw))
            } else {
                (protocol::MESSAGE_CONNECTION_ID, 0)
            };
            let request = InitiateContact {
                version_requested: version.0,
                target_message_vp: self.port.vp_index(),
                interrupt_page_or_target_info: target_info,
                parent_to_child_monitor_page_gpa: 0,
                child_to_parent_monitor_page_gpa: 0,
            };
            self.responses.version = None;
            self.pending.version = true;
            match self.post_to(
                connection_id,
                protocol::encode_message(&request).as_bytes(),
                "INITIATE_CONTACT",
            ) {
                Ok(()) => {}
                // An old host without the multiclient port: try the next (lower) version.
                Err(Error::PostMessage {
                    status: HvStatus::INVALID_CONNECTION_ID,
                    ..
                }) if connection_id == protocol::MESSAGE_CONNECTION_ID_4 => {
                    log::info!("vmbus: no multiclient port, skipping {version}");
                    continue;
                }
                Err(error) => {
                    self.pending.version = false;
                    return Err(error);
                }
            }
            let response = self.wait("VERSION_RESPONSE", |client| client.responses.version.take());
            self.pending.version = false;
            let (response, features) = response?;
            if response.version_supported == 0 {
                log::info!("vmbus: host refused version {version}");
                continue;
            }
            if response.connection_state != protocol::CONNECTION_STATE_SUCCESSFUL {
                return Err(Error::ConnectionRefused {
                    state: response.connection_state,
                });
            }
            self.message_connection_id = if version >= Version::WIN10_RS3_1 {
                match response.selected_version_or_connection_id {
                    0 => connection_id,
                    id => id,
                }
            } else {
                protocol::MESSAGE_CONNECTION_ID
            };
            self.features = features.unwrap_or(0);
            self.version = Some(version);
            log::info!(
                "vmbus: connected at version {version}, messages to connection {:#x}",
                self.message_connection_id
            );
            return Ok(());
        }
        Err(Error::NoVersionAccepted { lowest })
    }

    fn request_offers(&mut self) -> Result<(), Error> {
        self.responses.all_offers_delivered = false;
        self.pending.offers = true;
        let result = self
            .post(&RequestOffers {}, "REQUESTOFFERS")
            .and_then(|()| {
                self.wait("ALLOFFERS_DELIVERED", |client| {
                    client.responses.all_offers_delivered.then_some(())
                })
            });
        self.pending.offers = false;
        result?;
        // Offers seen during enumeration are in `offers()`, not events.
        self.events
            .retain(|event| !matches!(event, ClientEvent::Offer(_)));
        Ok(())
    }

    /// Describes `memory` to the host as a GPADL on `relid` (GPADL_HEADER + as many
    /// GPADL_BODY messages as needed) and waits for GPADL_CREATED. The region must be
    /// page-aligned; it is covered whole.
    pub fn create_gpadl(&mut self, relid: u32, memory: DmaRegion) -> Result<GpadlBuffer, Error> {
        self.live_offer(relid)?;
        let id = self.allocate_gpadl_id();
        match self.establish_gpadl(relid, id, memory.phys().0, memory.len()) {
            Ok(()) => Ok(GpadlBuffer { id, relid, memory }),
            Err(error) => {
                self.abandon_gpadl(relid, id, memory, &error);
                Err(error)
            }
        }
    }

    /// Describes memory the caller keeps owning (`phys`, `len`: page-aligned) as a GPADL on
    /// `relid` and waits for GPADL_CREATED; returns the GPADL id. For drivers that allocate
    /// their own buffers and only need the host to see them (netvsc's receive and send
    /// buffers). The caller may reuse or free the memory only after
    /// [`VmbusClient::teardown_borrowed_gpadl`] succeeded, or after this call failed with
    /// [`Error::GpadlRefused`] or [`Error::BadGpadlBuffer`]; after any other failure the host
    /// may still reach it, and the caller must keep it forever.
    pub fn create_borrowed_gpadl(
        &mut self,
        relid: u32,
        phys: PhysAddr,
        len: usize,
    ) -> Result<u32, Error> {
        self.live_offer(relid)?;
        let id = self.allocate_gpadl_id();
        match self.establish_gpadl(relid, id, phys.0, len) {
            Ok(()) => Ok(id),
            Err(error) => {
                if let Some(state) = self.offers.get_mut(&relid) {
                    state.gpadls.remove(&id);
                }
                Err(error)
            }
        }
    }

    /// Asks the host to release GPADL `id` of `relid` (one made by
    /// [`VmbusClient::create_borrowed_gpadl`]) and waits for GPADL_TORNDOWN. On error the
    /// host may still reach the memory: the caller must keep it.
    pub fn teardown_borrowed_gpadl(&mut self, relid: u32, id: u32) -> Result<(), Error> {
        self.release_gpadl(relid, id)
    }

    /// Memory the host might still reach must never be reused: keep it when the host did not
    /// say the GPADL failed.
    fn abandon_gpadl(&mut self, relid: u32, id: u32, memory: DmaRegion, error: &Error) {
        if let Some(state) = self.offers.get_mut(&relid) {
            state.gpadls.remove(&id);
        }
        if !matches!(
            error,
            Error::GpadlRefused { .. } | Error::BadGpadlBuffer { .. }
        ) {
            log::warn!("vmbus: GPADL {id:#x} state unknown ({error}); its memory is kept");
            self.quarantine.push(memory);
        }
    }

    fn allocate_gpadl_id(&mut self) -> u32 {
        let id = self.next_gpadl;
        self.next_gpadl = self.next_gpadl.wrapping_add(1).max(FIRST_GPADL_ID);
        id
    }

    fn establish_gpadl(&mut self, relid: u32, id: u32, phys: u64, len: usize) -> Result<(), Error> {
        if len == 0 || !phys.is_multiple_of(PAGE_SIZE as u64) {
            return Err(Error::BadGpadlBuffer {
                reason: "empty or not page-aligned",
            });
        }
        let pages = len.div_ceil(PAGE_SIZE);
        let first_pfn = phys / PAGE_SIZE as u64;
        let range_buflen = u16::try_from(size_of::<GpaRange>() + pages * 8).map_err(|_| {
            Error::BadGpadlBuffer {
                reason: "more pages than one GPADL range describes",
            }
        })?;
        let byte_count = u32::try_from(len).map_err(|_| Error::BadGpadlBuffer {
            reason: "larger than 4 GiB",
        })?;
        let pfn = |index: usize| first_pfn + index as u64;

        let header = GpadlHeader {
            child_relid: relid,
            gpadl: id,
            range_buflen,
            range_count: 1,
        };
        let range = GpaRange {
            byte_count,
            byte_offset: 0,
        };
        let in_header = pages.min(protocol::GPADL_HEADER_MAX_PFNS);
        let mut data = [0u8; MAX_MESSAGE_SIZE];
        data[..8].copy_from_slice(range.as_bytes());
        for index in 0..in_header {
            data[8 + index * 8..16 + index * 8].copy_from_slice(&pfn(index).to_le_bytes());
        }
        let message = protocol::encode_message_with_data(&header, &data[..8 + in_header * 8])
            .expect("header PFNs are capped to fit");

        self.responses.gpadl_created.remove(&id);
        self.pending.gpadls.insert(id);
        if let Some(state) = self.offers.get_mut(&relid) {
            state.gpadls.insert(id);
        }
        let result = self.send_gpadl(message.as_bytes(), id, pages, in_header, pfn);
        self.pending.gpadls.remove(&id);
        let status = result?;
        if status != 0 {
            return Err(Error::GpadlRefused { gpadl: id, status });
        }
        Ok(())
    }

    fn send_gpadl(
        &mut self,
        header: &[u8],
        id: u32,
        pages: usize,
        in_header: usize,
        pfn: impl Fn(usize) -> u64,
    ) -> Result<u32, Error> {
        self.post_to(self.message_connection_id, header, "GPADL_HEADER")?;
        let mut sent = in_header;
        let mut message_number = 0u32;
        while sent < pages {
            let count = (pages - sent).min(protocol::GPADL_BODY_MAX_PFNS);
            let mut data = [0u8; MAX_MESSAGE_SIZE];
            for index in 0..count {
                data[index * 8..index * 8 + 8].copy_from_slice(&pfn(sent + index).to_le_bytes());
            }
            message_number = message_number.wrapping_add(1);
            let body = GpadlBody {
                message_number,
                gpadl: id,
            };
            let message = protocol::encode_message_with_data(&body, &data[..count * 8])
                .expect("body PFNs are capped to fit");
            self.post_to(self.message_connection_id, message.as_bytes(), "GPADL_BODY")?;
            sent += count;
        }
        self.wait("GPADL_CREATED", |client| {
            client.responses.gpadl_created.remove(&id)
        })
    }

    /// Asks the host to release a GPADL and waits for GPADL_TORNDOWN; returns the memory. If
    /// the host does not confirm, the memory is kept by the client (never freed) and the error
    /// returned.
    pub fn teardown_gpadl(&mut self, buffer: GpadlBuffer) -> Result<DmaRegion, Error> {
        let GpadlBuffer { id, relid, memory } = buffer;
        match self.release_gpadl(relid, id) {
            Ok(()) => Ok(memory),
            Err(error) => {
                self.quarantine.push(memory);
                Err(error)
            }
        }
    }

    fn release_gpadl(&mut self, relid: u32, id: u32) -> Result<(), Error> {
        self.require_connected()?;
        self.responses.gpadl_torndown.remove(&id);
        self.pending.teardowns.insert(id);
        let result = self
            .post(
                &GpadlTeardown {
                    child_relid: relid,
                    gpadl: id,
                },
                "GPADL_TEARDOWN",
            )
            .and_then(|()| {
                self.wait("GPADL_TORNDOWN", |client| {
                    client.responses.gpadl_torndown.remove(&id).then_some(())
                })
            });
        self.pending.teardowns.remove(&id);
        result?;
        if let Some(state) = self.offers.get_mut(&relid) {
            state.gpadls.remove(&id);
        }
        self.release_if_done(relid)?;
        Ok(())
    }

    /// Opens channel `relid`: allocates both rings, hands them to the host by GPADL, sends
    /// OPENCHANNEL and waits for the result.
    pub fn open_channel(
        &mut self,
        relid: u32,
        params: &OpenParams,
        dma: &dyn DmaAllocator,
    ) -> Result<Channel, Error> {
        let offer = *self.live_offer(relid)?;
        if self.offers.get(&relid).is_some_and(|state| state.open) {
            return Err(Error::AlreadyOpen { relid });
        }
        let outgoing_len = (params.outgoing_data_pages + 1) * PAGE_SIZE;
        let total = outgoing_len + (params.incoming_data_pages + 1) * PAGE_SIZE;
        let memory = dma
            .allocate(total, PAGE_SIZE)
            .ok_or(Error::OutOfMemory { bytes: total })?;
        let gpadl = self.allocate_gpadl_id();
        let ids = ChannelIds {
            relid,
            connection_id: offer.connection_id,
            ring_gpadl: gpadl,
        };
        // The ring control words are initialised before the host can see the memory.
        let channel = Channel::new(ids, memory, outgoing_len, self.port.event_signal())?;
        let (phys, len) = (channel.memory_phys(), total);
        if let Err(error) = self.establish_gpadl(relid, gpadl, phys, len) {
            self.abandon_gpadl(relid, gpadl, channel.into_memory(), &error);
            return Err(error);
        }
        let request = OpenChannel {
            child_relid: relid,
            open_id: relid,
            ring_buffer_gpadl: gpadl,
            target_vp: self.port.vp_index(),
            downstream_ring_buffer_page_offset: channel.downstream_page_offset(),
            user_data: params.user_data,
        };
        self.responses.open_result.remove(&relid);
        self.pending.opens.insert(relid);
        let result = self.post(&request, "OPENCHANNEL").and_then(|()| {
            self.wait("OPENCHANNEL_RESULT", |client| {
                client.responses.open_result.remove(&relid)
            })
        });
        self.pending.opens.remove(&relid);
        let status = match result {
            Ok(status) => status,
            Err(error) => {
                // The host may or may not have opened it: close, then keep the ring memory
                // unless the teardown is confirmed.
                let _ = self.post(&CloseChannel { child_relid: relid }, "CLOSECHANNEL");
                let memory = channel.into_memory();
                let _ = self.teardown_gpadl(GpadlBuffer {
                    id: gpadl,
                    relid,
                    memory,
                });
                return Err(error);
            }
        };
        if status != 0 {
            let rescinded = self.offers.get(&relid).is_none_or(|state| state.rescinded);
            let memory = channel.into_memory();
            self.teardown_gpadl(GpadlBuffer {
                id: gpadl,
                relid,
                memory,
            })?;
            if rescinded {
                return Err(Error::Rescinded { relid });
            }
            return Err(Error::OpenRefused { relid, status });
        }
        if let Some(state) = self.offers.get_mut(&relid) {
            state.open = true;
        }
        log::info!(
            "vmbus: opened relid {relid} (connection {:#x})",
            offer.connection_id
        );
        Ok(channel)
    }

    /// Closes a channel (CLOSECHANNEL, no reply) and tears down its ring GPADL; returns the
    /// ring memory once the host released it. On a rescinded channel this also releases the
    /// relid when nothing else is left.
    pub fn close_channel(&mut self, channel: Channel) -> Result<DmaRegion, Error> {
        let ids = channel.ids();
        self.require_connected()?;
        let closed = self.post(
            &CloseChannel {
                child_relid: ids.relid,
            },
            "CLOSECHANNEL",
        );
        if let Some(state) = self.offers.get_mut(&ids.relid) {
            state.open = false;
        }
        let memory = channel.into_memory();
        if let Err(error) = closed {
            self.quarantine.push(memory);
            return Err(error);
        }
        self.teardown_gpadl(GpadlBuffer {
            id: ids.ring_gpadl,
            relid: ids.relid,
            memory,
        })
    }

    /// Disconnects from the host (UNLOAD → UNLOAD_RESPONSE), e.g. before handing the machine
    /// to another kernel. Channels should be closed first.
    pub fn unload(&mut self) -> Result<(), Error> {
        self.require_connected()?;
        self.responses.unload_response = false;
        self.pending.unload = true;
        let result = self.post(&Unload {}, "UNLOAD").and_then(|()| {
            self.wait("UNLOAD_RESPONSE", |client| {
                client.responses.unload_response.then_some(())
            })
        });
        self.pending.unload = false;
        result?;
        self.version = None;
        self.offers.clear();
        log::info!("vmbus: unloaded");
        Ok(())
    }

    fn require_connected(&self) -> Result<(), Error> {
        self.version.map(|_| ()).ok_or(Error::NotConnected)
    }

    fn live_offer(&self, relid: u32) -> Result<&Offer, Error> {
        self.require_connected()?;
        match self.offers.get(&relid) {
            Some(state) if state.rescinded => Err(Error::Rescinded { relid }),
            Some(state) => Ok(&state.offer),
            None => Err(Error::UnknownChannel { relid }),
        }
    }

    /// Sends RELID_RELEASED once a rescinded channel is closed and has no GPADLs left.
    fn release_if_done(&mut self, relid: u32) -> Result<(), Error> {
        let done = self
            .offers
            .get(&relid)
            .is_some_and(|state| state.rescinded && !state.open && state.gpadls.is_empty());
        if done {
            self.offers.remove(&relid);
            self.post(&RelIdReleased { child_relid: relid }, "RELID_RELEASED")?;
            log::info!("vmbus: released rescinded relid {relid}");
        }
        Ok(())
    }

    fn post<M: VmbusMessage>(&mut self, body: &M, what: &'static str) -> Result<(), Error> {
        let message = protocol::encode_message(body);
        self.post_to(self.message_connection_id, message.as_bytes(), what)
    }

    /// HvPostMessage, retrying retryable statuses until the response timeout.
    fn post_to(
        &mut self,
        connection_id: u32,
        bytes: &[u8],
        what: &'static str,
    ) -> Result<(), Error> {
        let start = self.port.now_ns();
        let mut steps = 0u64;
        loop {
            match self.port.post_message(connection_id, bytes) {
                Ok(()) => return Ok(()),
                Err(status)
                    if status.is_retryable()
                        && steps < self.config.max_wait_steps
                        && self.port.now_ns().saturating_sub(start)
                            < self.config.response_timeout_ns =>
                {
                    steps += 1;
                    self.counters.post_retries += 1;
                    // Only pause (as Linux does): taking messages here could re-enter this
                    // function from a message handler (RELID_RELEASED on rescind).
                    self.port.idle();
                }
                Err(status) => return Err(Error::PostMessage { what, status }),
            }
        }
    }

    /// Processes host messages until `done` yields, bounded by the response timeout.
    fn wait<T>(
        &mut self,
        what: &'static str,
        mut done: impl FnMut(&mut Self) -> Option<T>,
    ) -> Result<T, Error> {
        let start = self.port.now_ns();
        let mut steps = 0u64;
        loop {
            self.drain_messages();
            if let Some(value) = done(self) {
                return Ok(value);
            }
            let waited = self.port.now_ns().saturating_sub(start);
            steps += 1;
            if waited >= self.config.response_timeout_ns || steps > self.config.max_wait_steps {
                self.counters.timeouts += 1;
                log::warn!(
                    "vmbus: no {what} from the host after {} ms",
                    waited / 1_000_000
                );
                return Err(Error::Timeout {
                    what,
                    waited_ms: waited / 1_000_000,
                });
            }
            self.port.idle();
        }
    }

    fn drain_messages(&mut self) {
        let mut message = [0u8; MAX_MESSAGE_SIZE];
        for _ in 0..MAX_MESSAGES_PER_DRAIN {
            let Some(len) = self.port.poll_message(&mut message) else {
                break;
            };
            self.counters.messages_received += 1;
            let len = len.min(MAX_MESSAGE_SIZE);
            self.handle_message(&message[..len]);
        }
    }

    fn drop_message(
        &mut self,
        why: &str,
        message_type: MessageType,
        counter: fn(&mut ClientCounters) -> &mut u64,
    ) {
        *counter(&mut self.counters) += 1;
        log::warn!("vmbus: dropped host message type {}: {why}", message_type.0);
    }

    fn handle_message(&mut self, message: &[u8]) {
        let Some((message_type, body)) = protocol::split_header(message) else {
            self.counters.malformed += 1;
            log::warn!(
                "vmbus: dropped a {}-byte host message: no header",
                message.len()
            );
            return;
        };
        macro_rules! body {
            ($type:ty) => {
                match protocol::read_body::<$type>(body) {
                    Some(parsed) => parsed,
                    None => {
                        return self.drop_message("too short", message_type, |c| &mut c.malformed);
                    }
                }
            };
        }
        match message_type {
            MessageType::VERSION_RESPONSE => {
                let response = body!(VersionResponse);
                if !self.pending.version {
                    return self
                        .drop_message("not negotiating", message_type, |c| &mut c.unexpected);
                }
                let features = protocol::read_body::<VersionResponse2>(body)
                    .map(|copper| copper.supported_features);
                self.responses.version = Some((response, features));
            }
            MessageType::OFFER_CHANNEL => {
                let offer = body!(OfferChannel);
                self.handle_offer(&offer, message_type);
            }
            MessageType::ALL_OFFERS_DELIVERED => {
                let _: AllOffersDelivered = body!(AllOffersDelivered);
                if !self.pending.offers {
                    return self
                        .drop_message("no offers requested", message_type, |c| &mut c.unexpected);
                }
                self.responses.all_offers_delivered = true;
            }
            MessageType::RESCIND_CHANNEL_OFFER => {
                let rescind = body!(RescindChannelOffer);
                self.handle_rescind(rescind.child_relid, message_type);
            }
            MessageType::GPADL_CREATED => {
                let created = body!(GpadlCreated);
                if !self.offers.contains_key(&created.child_relid) {
                    return self
                        .drop_message("unknown relid", message_type, |c| &mut c.unknown_relid);
                }
                if !self.pending.gpadls.contains(&created.gpadl) {
                    return self
                        .drop_message("GPADL not pending", message_type, |c| &mut c.unexpected);
                }
                self.responses
                    .gpadl_created
                    .insert(created.gpadl, created.creation_status);
            }
            MessageType::GPADL_TORNDOWN => {
                let torndown = body!(GpadlTorndown);
                if !self.pending.teardowns.contains(&torndown.gpadl) {
                    return self
                        .drop_message("teardown not pending", message_type, |c| &mut c.unexpected);
                }
                self.responses.gpadl_torndown.insert(torndown.gpadl);
            }
            MessageType::OPEN_CHANNEL_RESULT => {
                let result = body!(OpenResult);
                if !self.offers.contains_key(&result.child_relid) {
                    return self
                        .drop_message("unknown relid", message_type, |c| &mut c.unknown_relid);
                }
                if !self.pending.opens.contains(&result.child_relid)
                    || result.open_id != result.child_relid
                {
                    return self
                        .drop_message("open not pending", message_type, |c| &mut c.unexpected);
                }
                self.responses
                    .open_result
                    .insert(result.child_relid, result.status);
            }
            MessageType::UNLOAD_RESPONSE => {
                let _: UnloadResponse = body!(UnloadResponse);
                if !self.pending.unload {
                    return self
                        .drop_message("no unload pending", message_type, |c| &mut c.unexpected);
                }
                self.responses.unload_response = true;
            }
            _ => self.drop_message("unknown or guest-only type", message_type, |c| {
                &mut c.unknown_type
            }),
        }
    }

    fn handle_offer(&mut self, message: &OfferChannel, message_type: MessageType) {
        let offer = Offer::from_message(message);
        // Relid 0 is reserved and event flags stop at 2047 (one SIEFP slot).
        if offer.relid == 0 || offer.relid as usize >= ChannelEvents::CAPACITY {
            return self.drop_message("relid out of range", message_type, |c| &mut c.malformed);
        }
        if self.offers.contains_key(&offer.relid) {
            return self.drop_message("relid already offered", message_type, |c| &mut c.unexpected);
        }
        self.counters.offers += 1;
        log::info!(
            "vmbus: offer relid {} interface {} instance {} connection {:#x}",
            offer.relid,
            offer.interface_id,
            offer.instance_id,
            offer.connection_id
        );
        self.offers.insert(
            offer.relid,
            OfferState {
                offer,
                rescinded: false,
                open: false,
                gpadls: BTreeSet::new(),
            },
        );
        self.events.push_back(ClientEvent::Offer(offer));
    }

    fn handle_rescind(&mut self, relid: u32, message_type: MessageType) {
        let Some(state) = self.offers.get_mut(&relid) else {
            return self.drop_message("unknown relid", message_type, |c| &mut c.unknown_relid);
        };
        if state.rescinded {
            return self.drop_message("already rescinded", message_type, |c| &mut c.unexpected);
        }
        state.rescinded = true;
        self.counters.rescinds += 1;
        log::info!("vmbus: relid {relid} rescinded");
        // Anyone waiting on this channel would wait for nothing now.
        if self.pending.opens.contains(&relid) {
            self.responses.open_result.insert(relid, u32::MAX);
        }
        self.events.push_back(ClientEvent::Rescinded { relid });
        if let Err(error) = self.release_if_done(relid) {
            log::warn!("vmbus: releasing relid {relid} failed: {error}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guid::interface;
    use crate::packet::{IncomingPacket, OutgoingPacket};
    use crate::ring::{ReadStatus, RingGeometry, RingReader};
    use crate::testing::{FakeHost, FakeHostConfig, FakeHostPort, offer_message};
    use net_device::heap_dma::HeapDmaAllocator;

    const NET_RELID: u32 = 1;
    const NET_CONNECTION: u32 = 0x2001;

    fn config() -> FakeHostConfig {
        FakeHostConfig {
            offers: alloc::vec![offer_message(interface::NETWORK, NET_RELID, NET_CONNECTION)],
            ..FakeHostConfig::default()
        }
    }

    fn client_config() -> ClientConfig {
        ClientConfig {
            response_timeout_ns: 50_000_000,
            ..ClientConfig::default()
        }
    }

    fn connect(
        host_config: FakeHostConfig,
    ) -> (FakeHost, Result<VmbusClient<FakeHostPort>, Error>) {
        let (host, port) = FakeHost::new(host_config);
        let client = VmbusClient::connect(port, client_config());
        (host, client)
    }

    #[test]
    fn connects_at_copper_on_the_multiclient_port_and_enumerates_offers() {
        let (host, client) = connect(config());
        let mut client = client.unwrap();
        assert_eq!(client.version(), Some(Version::COPPER));
        assert_eq!(host.negotiated(), Some(Version::COPPER));
        let posted = host.posted();
        assert_eq!(posted[0], (4, MessageType::INITIATE_CONTACT));
        assert_eq!(
            posted[1],
            (1, MessageType::REQUEST_OFFERS),
            "then the host's msg_conn_id"
        );
        let offers: Vec<_> = client.offers().copied().collect();
        assert_eq!(offers.len(), 1);
        assert_eq!(offers[0].interface_id, interface::NETWORK);
        assert_eq!(offers[0].connection_id, NET_CONNECTION);
        assert_eq!(client.poll(), None, "initial offers are not events");
    }

    #[test]
    fn refused_versions_step_down_and_switch_connection_id_below_5_0() {
        let (host, client) = connect(FakeHostConfig {
            accepted_versions: alloc::vec![Version::WIN8_1],
            ..config()
        });
        let client = client.unwrap();
        assert_eq!(client.version(), Some(Version::WIN8_1));
        assert_eq!(client.message_connection_id(), 1);
        let contacts: Vec<u32> = host
            .posted()
            .iter()
            .filter(|(_, message_type)| *message_type == MessageType::INITIATE_CONTACT)
            .map(|(connection, _)| *connection)
            .collect();
        // 6.0, 5.3, 5.2, 5.1, 5.0 on id 4; 4.1, 4.0, 3.0 on id 1.
        assert_eq!(contacts, [4, 4, 4, 4, 4, 1, 1, 1]);
    }

    #[test]
    fn host_without_multiclient_port_is_reached_on_connection_1() {
        let (host, client) = connect(FakeHostConfig {
            multiclient_port: false,
            ..config()
        });
        assert_eq!(client.unwrap().version(), Some(Version::WIN10_RS3_0));
        assert!(host.posted().iter().all(|(connection, _)| *connection == 1));
    }

    #[test]
    fn host_refusing_everything_is_an_error_naming_the_lowest_version() {
        let (_host, client) = connect(FakeHostConfig {
            accepted_versions: Vec::new(),
            ..config()
        });
        assert_eq!(
            client.unwrap_err(),
            Error::NoVersionAccepted {
                lowest: Version::WIN8
            }
        );
    }

    #[test]
    fn host_that_never_answers_times_out() {
        let (_host, client) = connect(FakeHostConfig {
            silent: true,
            ..config()
        });
        assert!(matches!(
            client.unwrap_err(),
            Error::Timeout {
                what: "VERSION_RESPONSE",
                waited_ms: 50
            }
        ));
    }

    /// A port whose clock never moves: only the step bound ends a wait.
    struct StuckClock(FakeHostPort);

    impl HypervisorPort for StuckClock {
        fn post_message(&mut self, connection_id: u32, payload: &[u8]) -> Result<(), HvStatus> {
            self.0.post_message(connection_id, payload)
        }
        fn signal_event(&self, connection_id: u32) -> Result<(), HvStatus> {
            HypervisorPort::signal_event(&self.0, connection_id)
        }
        fn event_signal(&self) -> alloc::sync::Arc<dyn crate::EventSignal> {
            self.0.event_signal()
        }
        fn poll_message(&mut self, buffer: &mut [u8; MAX_MESSAGE_SIZE]) -> Option<usize> {
            self.0.poll_message(buffer)
        }
        fn take_channel_events(&mut self, events: &mut ChannelEvents) {
            self.0.take_channel_events(events)
        }
        fn vp_index(&self) -> u32 {
            0
        }
        fn now_ns(&self) -> u64 {
            0
        }
        fn idle(&mut self) {}
    }

    #[test]
    fn a_stuck_clock_cannot_make_a_wait_endless() {
        let (_host, port) = FakeHost::new(FakeHostConfig {
            silent: true,
            ..config()
        });
        let config = ClientConfig {
            max_wait_steps: 1000,
            ..client_config()
        };
        assert!(matches!(
            VmbusClient::connect(StuckClock(port), config).unwrap_err(),
            Error::Timeout {
                what: "VERSION_RESPONSE",
                waited_ms: 0
            }
        ));
    }

    #[test]
    fn a_flooding_host_cannot_keep_poll_from_returning() {
        let (host, client) = connect(config());
        let mut client = client.unwrap();
        for _ in 0..1000 {
            host.inject(&[99, 0, 0, 0, 0, 0, 0, 0]);
        }
        assert_eq!(client.poll(), None);
        assert_eq!(client.counters().unknown_type, 256);
        while client.counters().unknown_type < 1000 {
            assert_eq!(client.poll(), None);
        }
    }

    #[test]
    fn busy_host_posts_are_retried() {
        let (host, port) = FakeHost::new(config());
        host.set_busy_posts(3);
        let client = VmbusClient::connect(port, client_config()).unwrap();
        assert_eq!(client.counters().post_retries, 3);
        host.set_busy_posts(u32::MAX);
        let mut client = client;
        let region = HeapDmaAllocator::new()
            .allocate(PAGE_SIZE, PAGE_SIZE)
            .unwrap();
        assert!(matches!(
            client.create_gpadl(NET_RELID, region),
            Err(Error::PostMessage {
                status: HvStatus::INSUFFICIENT_BUFFERS,
                ..
            })
        ));
    }

    #[test]
    fn four_mib_gpadl_is_split_into_header_and_bodies_and_torn_down() {
        let (host, client) = connect(config());
        let mut client = client.unwrap();
        let region = HeapDmaAllocator::new()
            .allocate(4 << 20, PAGE_SIZE)
            .unwrap();
        let first_pfn = region.phys().0 / PAGE_SIZE as u64;
        let buffer = client.create_gpadl(NET_RELID, region).unwrap();
        let gpadl = host.gpadl(buffer.id()).unwrap();
        assert_eq!(gpadl.byte_count, 4 << 20);
        assert_eq!(
            gpadl.pfns,
            (first_pfn..first_pfn + 1024).collect::<Vec<_>>()
        );
        // 26 PFNs in the header, 998 in bodies of 28.
        assert_eq!(gpadl.bodies, 36);
        let memory = client.teardown_gpadl(buffer).unwrap();
        assert_eq!(memory.len(), 4 << 20);
        assert_eq!(host.gpadl_count(), 0);
        assert_eq!(client.quarantined_bytes(), 0);
    }

    #[test]
    fn borrowed_gpadl_lists_the_callers_pages_and_leaves_the_memory_with_the_caller() {
        let (host, client) = connect(config());
        let mut client = client.unwrap();
        let region = HeapDmaAllocator::new()
            .allocate(3 * PAGE_SIZE, PAGE_SIZE)
            .unwrap();
        let first_pfn = region.phys().0 / PAGE_SIZE as u64;
        let id = client
            .create_borrowed_gpadl(NET_RELID, region.phys(), region.len())
            .unwrap();
        let gpadl = host.gpadl(id).unwrap();
        assert_eq!(gpadl.byte_count, 3 * PAGE_SIZE as u32);
        assert_eq!(gpadl.pfns, (first_pfn..first_pfn + 3).collect::<Vec<_>>());
        client.teardown_borrowed_gpadl(NET_RELID, id).unwrap();
        assert_eq!(host.gpadl_count(), 0);
        assert_eq!(client.quarantined_bytes(), 0, "the client never held it");
        assert!(matches!(
            client.create_borrowed_gpadl(NET_RELID, PhysAddr(0x1234), PAGE_SIZE),
            Err(Error::BadGpadlBuffer { .. })
        ));
        host.set_silent(true);
        assert!(matches!(
            client.teardown_borrowed_gpadl(NET_RELID, id),
            Err(Error::Timeout { .. })
        ));
    }

    #[test]
    fn refused_gpadl_is_an_error_and_unanswered_one_keeps_its_memory() {
        let (host, client) = connect(FakeHostConfig {
            gpadl_status: 0xc000_0001,
            ..config()
        });
        let mut client = client.unwrap();
        let dma = HeapDmaAllocator::new();
        assert!(matches!(
            client.create_gpadl(NET_RELID, dma.allocate(PAGE_SIZE, PAGE_SIZE).unwrap()),
            Err(Error::GpadlRefused {
                status: 0xc000_0001,
                ..
            })
        ));
        assert_eq!(
            client.quarantined_bytes(),
            0,
            "a refused GPADL is not the host's"
        );
        host.set_silent(true);
        assert!(matches!(
            client.create_gpadl(NET_RELID, dma.allocate(2 * PAGE_SIZE, PAGE_SIZE).unwrap()),
            Err(Error::Timeout {
                what: "GPADL_CREATED",
                ..
            })
        ));
        assert_eq!(client.quarantined_bytes(), 2 * PAGE_SIZE);
        assert!(matches!(
            client.create_gpadl(99, dma.allocate(PAGE_SIZE, PAGE_SIZE).unwrap()),
            Err(Error::UnknownChannel { relid: 99 })
        ));
    }

    #[test]
    fn open_channel_shares_rings_with_the_host_and_close_releases_them() {
        let (host, client) = connect(config());
        let mut client = client.unwrap();
        let dma = HeapDmaAllocator::new();
        let mut channel = client
            .open_channel(NET_RELID, &OpenParams::new(3, 5), &dma)
            .unwrap();
        let open = host.open(NET_RELID).unwrap();
        assert_eq!(open.downstream_page_offset, 4);
        assert_eq!(open.gpadl, channel.ids().ring_gpadl);
        assert!(matches!(
            client.open_channel(NET_RELID, &OpenParams::new(1, 1), &dma),
            Err(Error::AlreadyOpen { relid: NET_RELID })
        ));

        channel
            .send(&OutgoingPacket::in_band(7, true, &[b"hello host"]))
            .unwrap();
        assert_eq!(host.take_signals(), [NET_CONNECTION]);
        let (mut host_memory, downstream) = host.channel_memory(NET_RELID).unwrap();
        let mut reader =
            RingReader::new(&mut host_memory, RingGeometry::new(0, downstream).unwrap()).unwrap();
        let mut bytes = Vec::new();
        assert!(matches!(
            reader.read(&mut host_memory, &mut bytes).unwrap(),
            ReadStatus::Packet { .. }
        ));
        assert_eq!(
            &IncomingPacket::parse(&bytes).unwrap().payload[..10],
            b"hello host"
        );

        let memory = client.close_channel(channel).unwrap();
        assert_eq!(memory.len(), 10 * PAGE_SIZE);
        assert_eq!(host.closed(), [NET_RELID]);
        assert!(host.open(NET_RELID).is_none());
        assert_eq!(host.gpadl_count(), 0);
        // Reopening after close works.
        let channel = client
            .open_channel(NET_RELID, &OpenParams::new(1, 1), &dma)
            .unwrap();
        client.close_channel(channel).unwrap();
    }

    #[test]
    fn refused_open_tears_the_ring_gpadl_down() {
        let (host, client) = connect(FakeHostConfig {
            open_status: 0xc000_0001,
            ..config()
        });
        let mut client = client.unwrap();
        assert!(matches!(
            client.open_channel(NET_RELID, &OpenParams::new(1, 1), &HeapDmaAllocator::new()),
            Err(Error::OpenRefused {
                relid: NET_RELID,
                status: 0xc000_0001
            })
        ));
        assert_eq!(host.gpadl_count(), 0);
    }

    #[test]
    fn malformed_and_unexpected_host_messages_are_counted_and_dropped() {
        let (host, client) = connect(config());
        let mut client = client.unwrap();
        host.inject(&[]);
        host.inject(&[1, 0, 0]);
        host.inject(&[99, 0, 0, 0, 0, 0, 0, 0]);
        host.inject(&[14, 0, 0, 0, 0, 0, 0, 0]); // INITIATE_CONTACT is guest → host only
        host.inject(&message_bytes(MessageType::OFFER_CHANNEL, &[0; 40])); // short offer
        host.inject(&message_bytes(
            MessageType::GPADL_CREATED,
            &[5, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0],
        ));
        host.inject(&message_bytes(
            MessageType::GPADL_CREATED,
            &[1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0],
        ));
        host.inject(&message_bytes(
            MessageType::OPEN_CHANNEL_RESULT,
            &[1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0],
        ));
        host.inject(&message_bytes(
            MessageType::RESCIND_CHANNEL_OFFER,
            &[42, 0, 0, 0],
        ));
        host.inject(&message_bytes(
            MessageType::VERSION_RESPONSE,
            &[1, 0, 0, 0, 1, 0, 0, 0],
        ));
        host.inject(&message_bytes(MessageType::UNLOAD_RESPONSE, &[]));
        let mut zero_relid = offer_message(interface::NETWORK, 0, 1);
        host.offer(zero_relid);
        zero_relid.child_relid = NET_RELID;
        host.offer(zero_relid); // duplicate of a live relid
        assert_eq!(client.poll(), None);
        let counters = client.counters();
        assert_eq!(counters.malformed, 4, "empty, 3-byte, short offer, relid 0");
        assert_eq!(counters.unknown_type, 2);
        assert_eq!(
            counters.unknown_relid, 2,
            "GPADL_CREATED relid 5, rescind 42"
        );
        assert_eq!(counters.unexpected, 5);
        assert_eq!(client.offers().count(), 1, "state unchanged");
    }

    fn message_bytes(message_type: MessageType, body: &[u8]) -> Vec<u8> {
        let mut bytes = message_type.0.to_le_bytes().to_vec();
        bytes.extend_from_slice(&[0; 4]);
        bytes.extend_from_slice(body);
        bytes
    }

    #[test]
    fn hot_added_offer_and_rescind_are_events_and_the_relid_is_released() {
        let (host, client) = connect(config());
        let mut client = client.unwrap();
        host.offer(offer_message(interface::VPCI, 2, 0x2002));
        let Some(ClientEvent::Offer(offer)) = client.poll() else {
            panic!("expected the hot-added offer");
        };
        assert_eq!((offer.relid, offer.interface_id), (2, interface::VPCI));

        // Not open: released at once.
        host.rescind(2);
        assert_eq!(client.poll(), Some(ClientEvent::Rescinded { relid: 2 }));
        assert_eq!(host.released(), [2]);
        assert!(client.offer(2).is_none());

        // Open: released only after close and teardown.
        let dma = HeapDmaAllocator::new();
        let channel = client
            .open_channel(NET_RELID, &OpenParams::new(1, 1), &dma)
            .unwrap();
        let buffer = client
            .create_gpadl(NET_RELID, dma.allocate(PAGE_SIZE, PAGE_SIZE).unwrap())
            .unwrap();
        host.rescind(NET_RELID);
        assert_eq!(
            client.poll(),
            Some(ClientEvent::Rescinded { relid: NET_RELID })
        );
        assert_eq!(host.released(), [2]);
        assert!(matches!(
            client.open_channel(NET_RELID, &OpenParams::new(1, 1), &dma),
            Err(Error::Rescinded { relid: NET_RELID })
        ));
        client.close_channel(channel).unwrap();
        assert_eq!(host.released(), [2], "a GPADL is still live");
        client.teardown_gpadl(buffer).unwrap();
        assert_eq!(host.released(), [2, NET_RELID]);
        assert_eq!(client.counters().rescinds, 2);
    }

    #[test]
    fn unload_disconnects() {
        let (host, client) = connect(config());
        let mut client = client.unwrap();
        client.unload().unwrap();
        assert!(host.unloaded());
        assert_eq!(client.version(), None);
        assert!(matches!(
            client.open_channel(NET_RELID, &OpenParams::new(1, 1), &HeapDmaAllocator::new()),
            Err(Error::NotConnected)
        ));
        assert_eq!(client.unload(), Err(Error::NotConnected));
    }
}
