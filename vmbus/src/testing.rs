//! Host-side helpers for tests (feature `fake-host`; no_std, so enabling it never links std
//! into the kernel): guest memory seen by page number, as a host sees it through a GPADL, a
//! recording event signal, and [`FakeHost`], a scriptable VMBus host for what OpenVMM cannot
//! produce (silence, refusals, malformed messages).
//!
//! They let a fake host drive the same [`crate::ring`] code in the opposite role over the
//! guest's real ring memory (allocated by `net_device::heap_dma::HeapDmaAllocator`).

use crate::guid::Guid;
use crate::hypervisor::{ChannelEvents, EventSignal, HvStatus, HypervisorPort};
use crate::packet::{IncomingPacket, OutgoingKind, OutgoingPacket};
use crate::protocol::{
    self, AllOffersDelivered, CloseChannel, GpaRange, GpadlBody, GpadlCreated, GpadlHeader,
    GpadlTeardown, GpadlTorndown, InitiateContact, MAX_MESSAGE_SIZE, MessageType, OfferChannel,
    OpenChannel, OpenResult, RelIdReleased, RescindChannelOffer, UnloadResponse, Version,
    VersionResponse, VersionResponse2, VmbusMessage,
};
use crate::ring::{PAGE_SIZE, ReadStatus, RingGeometry, RingMemory, RingReader, RingWriter};
use alloc::collections::{BTreeMap, VecDeque};
use alloc::sync::Arc;
use alloc::vec::Vec;
use net_device::heap_dma::{phys_load_u32, phys_read, phys_store_u32, phys_write};
use spin::Mutex;
use zerocopy::{FromBytes, FromZeros};

/// Guest memory as a list of 4 KiB page numbers: offset `n` is byte `n % 4096` of page
/// `pfns[n / 4096]`. Every access is checked against live heap-DMA allocations.
#[derive(Clone, Debug)]
pub struct PageListMemory {
    pfns: Vec<u64>,
}

impl PageListMemory {
    /// Memory over `pfns` (as listed in a GPADL).
    pub fn new(pfns: Vec<u64>) -> Self {
        PageListMemory { pfns }
    }

    /// Bytes covered.
    pub fn len(&self) -> usize {
        self.pfns.len() * PAGE_SIZE
    }

    /// True when no pages are listed.
    pub fn is_empty(&self) -> bool {
        self.pfns.is_empty()
    }

    fn address(&self, offset: usize) -> Option<u64> {
        let pfn = *self.pfns.get(offset / PAGE_SIZE)?;
        pfn.checked_mul(PAGE_SIZE as u64)?
            .checked_add((offset % PAGE_SIZE) as u64)
    }

    /// Splits `[offset, offset + len)` at page boundaries: (physical address, start, len).
    fn pieces(&self, offset: usize, len: usize) -> Option<Vec<(u64, usize, usize)>> {
        let end = offset.checked_add(len)?;
        if end > self.len() {
            return None;
        }
        let mut pieces = Vec::new();
        let mut at = offset;
        while at < end {
            let run = (PAGE_SIZE - at % PAGE_SIZE).min(end - at);
            pieces.push((self.address(at)?, at - offset, run));
            at += run;
        }
        Some(pieces)
    }
}

impl RingMemory for PageListMemory {
    fn load_u32(&self, offset: usize) -> Option<u32> {
        phys_load_u32(self.address(offset)?)
    }

    fn store_u32(&mut self, offset: usize, value: u32) -> bool {
        self.address(offset)
            .is_some_and(|address| phys_store_u32(address, value))
    }

    fn read(&self, offset: usize, buffer: &mut [u8]) -> bool {
        let Some(pieces) = self.pieces(offset, buffer.len()) else {
            return false;
        };
        pieces
            .into_iter()
            .all(|(address, start, len)| phys_read(address, &mut buffer[start..start + len]))
    }

    fn write(&mut self, offset: usize, data: &[u8]) -> bool {
        let Some(pieces) = self.pieces(offset, data.len()) else {
            return false;
        };
        pieces
            .into_iter()
            .all(|(address, start, len)| phys_write(address, &data[start..start + len]))
    }
}

/// An [`EventSignal`] that records the connection ids it was asked to signal.
#[derive(Clone, Debug, Default)]
pub struct RecordingSignal {
    signals: Arc<Mutex<Vec<u32>>>,
    /// When set, every signal fails with this status.
    failure: Arc<Mutex<Option<HvStatus>>>,
}

impl RecordingSignal {
    /// A signal that succeeds and records.
    pub fn new() -> Self {
        Self::default()
    }

    /// Connection ids signalled so far, in order; clears the record.
    pub fn take(&self) -> Vec<u32> {
        core::mem::take(&mut *self.signals.lock())
    }

    /// Makes every later signal fail with `status` (or succeed again with `None`).
    pub fn fail_with(&self, status: Option<HvStatus>) {
        *self.failure.lock() = status;
    }
}

impl EventSignal for RecordingSignal {
    fn signal_event(&self, connection_id: u32) -> Result<(), HvStatus> {
        if let Some(status) = *self.failure.lock() {
            return Err(status);
        }
        self.signals.lock().push(connection_id);
        Ok(())
    }
}

/// How a [`FakeHost`] behaves.
#[derive(Clone, Debug)]
pub struct FakeHostConfig {
    /// Versions the host accepts.
    pub accepted_versions: Vec<Version>,
    /// Whether the multiclient port (connection id 4) exists; without it, posts there fail
    /// with `HV_STATUS_INVALID_CONNECTION_ID` like an old host.
    pub multiclient_port: bool,
    /// The host never answers anything.
    pub silent: bool,
    /// Offers sent on REQUESTOFFERS.
    pub offers: Vec<OfferChannel>,
    /// GPADL_CREATED status.
    pub gpadl_status: u32,
    /// OPENCHANNEL_RESULT status.
    pub open_status: u32,
    /// Connection id the VERSION_RESPONSE names for later messages (≥ 5.0).
    pub message_connection_id: u32,
}

impl Default for FakeHostConfig {
    fn default() -> Self {
        FakeHostConfig {
            accepted_versions: crate::client::DEFAULT_VERSIONS.to_vec(),
            multiclient_port: true,
            silent: false,
            offers: Vec::new(),
            gpadl_status: 0,
            open_status: 0,
            message_connection_id: crate::protocol::MESSAGE_CONNECTION_ID,
        }
    }
}

/// A GPADL as the fake host assembled it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FakeGpadl {
    /// Channel.
    pub relid: u32,
    /// Byte count of the range.
    pub byte_count: u32,
    /// Page numbers received so far.
    pub pfns: Vec<u64>,
    /// Page numbers announced by range_buflen.
    pub expected_pfns: usize,
    /// GPADL_BODY messages received.
    pub bodies: usize,
}

/// An open channel as the fake host sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FakeOpen {
    /// Ring GPADL.
    pub gpadl: u32,
    /// Pages to the host → guest ring.
    pub downstream_page_offset: u32,
    /// VP to interrupt.
    pub target_vp: u32,
}

#[derive(Debug, Default)]
struct FakeHostState {
    config: FakeHostConfig,
    clock_ns: u64,
    to_guest: VecDeque<Vec<u8>>,
    posted: Vec<(u32, MessageType)>,
    gpadls: BTreeMap<u32, FakeGpadl>,
    opens: BTreeMap<u32, FakeOpen>,
    released: Vec<u32>,
    closed: Vec<u32>,
    torn_down: Vec<u32>,
    events: ChannelEvents,
    signals: Vec<u32>,
    busy_posts: u32,
    negotiated: Option<Version>,
    unloaded: bool,
}

/// The test side of a fake VMBus host: inspect what the guest did, inject messages.
#[derive(Clone, Debug)]
pub struct FakeHost {
    state: Arc<Mutex<FakeHostState>>,
}

/// The guest side of a [`FakeHost`]: a [`HypervisorPort`] whose clock advances 1 ms per idle.
#[derive(Clone, Debug)]
pub struct FakeHostPort {
    state: Arc<Mutex<FakeHostState>>,
}

fn message<M: VmbusMessage>(body: &M) -> Vec<u8> {
    protocol::encode_message(body).as_bytes().to_vec()
}

/// A packet of `kind` with `payload`, as a host writes it into the guest's ring (descriptor,
/// type header, payload, padding; no trailer; no completion requested), written over `buffer`
/// and parsed back as the guest's channel reads it: for fake ports that hand the guest
/// packets without a ring.
///
/// # Panics
/// When the packet cannot be encoded (lengths beyond the descriptor's 16-bit fields) or does
/// not parse back: a test's fake is wrong then.
pub fn received_by_guest<'b>(
    kind: OutgoingKind<'_>,
    transaction_id: u64,
    payload: &[u8],
    buffer: &'b mut Vec<u8>,
) -> IncomingPacket<'b> {
    let pieces: &[&[u8]] = &[payload];
    let packet = OutgoingPacket {
        kind,
        transaction_id,
        completion_requested: false,
        payload: pieces,
    };
    buffer.clear();
    packet
        .for_each_piece(|piece| buffer.extend_from_slice(piece))
        .expect("the fake's packet fits a descriptor");
    IncomingPacket::parse(buffer).expect("an encoded packet parses back")
}

/// An offer for a device class with relid and connection id, as OpenVMM would send it.
pub fn offer_message(interface_id: Guid, relid: u32, connection_id: u32) -> OfferChannel {
    let mut offer = OfferChannel::new_zeroed();
    offer.interface_id = interface_id;
    offer.instance_id = Guid::from_fields(relid, 0, 0, [0; 8]);
    offer.child_relid = relid;
    offer.connection_id = connection_id;
    offer.is_dedicated_interrupt = 1;
    offer
}

impl FakeHost {
    /// A host with `config` and the port the client will use.
    pub fn new(config: FakeHostConfig) -> (FakeHost, FakeHostPort) {
        let state = Arc::new(Mutex::new(FakeHostState {
            config,
            ..FakeHostState::default()
        }));
        (
            FakeHost {
                state: state.clone(),
            },
            FakeHostPort { state },
        )
    }

    /// Queues raw bytes as a host → guest message.
    pub fn inject(&self, bytes: &[u8]) {
        self.state.lock().to_guest.push_back(bytes.to_vec());
    }

    /// Offers a channel now (hot-add).
    pub fn offer(&self, offer: OfferChannel) {
        self.state.lock().to_guest.push_back(message(&offer));
    }

    /// Rescinds a channel now.
    pub fn rescind(&self, relid: u32) {
        self.state
            .lock()
            .to_guest
            .push_back(message(&RescindChannelOffer { child_relid: relid }));
    }

    /// Sets whether the host answers.
    pub fn set_silent(&self, silent: bool) {
        self.state.lock().config.silent = silent;
    }

    /// The next `count` posts fail with `HV_STATUS_INSUFFICIENT_BUFFERS`.
    pub fn set_busy_posts(&self, count: u32) {
        self.state.lock().busy_posts = count;
    }

    /// Every message the guest posted: (connection id, type).
    pub fn posted(&self) -> Vec<(u32, MessageType)> {
        self.state.lock().posted.clone()
    }

    /// The version the host agreed to.
    pub fn negotiated(&self) -> Option<Version> {
        self.state.lock().negotiated
    }

    /// A GPADL the host holds.
    pub fn gpadl(&self, id: u32) -> Option<FakeGpadl> {
        self.state.lock().gpadls.get(&id).cloned()
    }

    /// Number of GPADLs the host holds.
    pub fn gpadl_count(&self) -> usize {
        self.state.lock().gpadls.len()
    }

    /// The open state of `relid`.
    pub fn open(&self, relid: u32) -> Option<FakeOpen> {
        self.state.lock().opens.get(&relid).copied()
    }

    /// The ring memory of open channel `relid` as the host sees it, and the byte offset of the
    /// host → guest ring.
    pub fn channel_memory(&self, relid: u32) -> Option<(PageListMemory, usize)> {
        let state = self.state.lock();
        let open = state.opens.get(&relid)?;
        let gpadl = state.gpadls.get(&open.gpadl)?;
        Some((
            PageListMemory::new(gpadl.pfns.clone()),
            open.downstream_page_offset as usize * PAGE_SIZE,
        ))
    }

    /// Every packet waiting in open channel `relid`'s guest → host ring, read (and consumed) as
    /// the host would.
    pub fn read_outgoing(&self, relid: u32) -> Vec<Vec<u8>> {
        let (mut memory, downstream) = self.channel_memory(relid).expect("channel is open");
        let geometry = RingGeometry::new(0, downstream).expect("valid ring geometry");
        let mut reader = RingReader::new(&mut memory, geometry).expect("ring readable");
        let mut packets = Vec::new();
        let mut bytes = Vec::new();
        while let ReadStatus::Packet { .. } = reader.read(&mut memory, &mut bytes).expect("ring") {
            packets.push(bytes.clone());
        }
        packets
    }

    /// Writes `packet` into open channel `relid`'s host → guest ring, as the host would (the
    /// guest is not signalled: see [`FakeHost::raise_event`]).
    pub fn write_incoming(&self, relid: u32, packet: &OutgoingPacket<'_>) {
        let (mut memory, downstream) = self.channel_memory(relid).expect("channel is open");
        let total = memory.len();
        let geometry = RingGeometry::new(downstream, total - downstream).expect("valid geometry");
        let mut writer = RingWriter::new(&mut memory, geometry).expect("ring writable");
        writer.write(&mut memory, packet).expect("room in the ring");
    }

    /// Relids the guest released, closed; GPADLs it tore down.
    pub fn released(&self) -> Vec<u32> {
        self.state.lock().released.clone()
    }

    /// Relids the guest closed.
    pub fn closed(&self) -> Vec<u32> {
        self.state.lock().closed.clone()
    }

    /// True after an UNLOAD.
    pub fn unloaded(&self) -> bool {
        self.state.lock().unloaded
    }

    /// Sets `relid`'s event flag, as the host does after writing its ring.
    pub fn raise_event(&self, relid: u32) {
        self.state.lock().events.insert(relid);
    }

    /// Connection ids the guest signalled (HvSignalEvent), in order; clears the record.
    pub fn take_signals(&self) -> Vec<u32> {
        core::mem::take(&mut self.state.lock().signals)
    }
}

impl FakeHostState {
    fn send<M: VmbusMessage>(&mut self, body: &M) {
        self.to_guest.push_back(message(body));
    }

    fn gpadl_complete(&mut self, id: u32) {
        let Some(gpadl) = self.gpadls.get(&id) else {
            return;
        };
        if gpadl.pfns.len() >= gpadl.expected_pfns {
            let relid = gpadl.relid;
            let status = self.config.gpadl_status;
            if status != 0 {
                self.gpadls.remove(&id);
            }
            self.send(&GpadlCreated {
                child_relid: relid,
                gpadl: id,
                creation_status: status,
            });
        }
    }

    fn receive(&mut self, connection_id: u32, bytes: &[u8]) -> Result<(), HvStatus> {
        if connection_id == protocol::MESSAGE_CONNECTION_ID_4 && !self.config.multiclient_port {
            return Err(HvStatus::INVALID_CONNECTION_ID);
        }
        if self.busy_posts > 0 {
            self.busy_posts -= 1;
            return Err(HvStatus::INSUFFICIENT_BUFFERS);
        }
        let (message_type, body) =
            protocol::split_header(bytes).ok_or(HvStatus::INVALID_PARAMETER)?;
        self.posted.push((connection_id, message_type));
        if self.config.silent {
            return Ok(());
        }
        match message_type {
            MessageType::INITIATE_CONTACT => {
                let request: InitiateContact =
                    protocol::read_body(body).ok_or(HvStatus::INVALID_PARAMETER)?;
                let version = Version(request.version_requested);
                let accepted = self.config.accepted_versions.contains(&version);
                let base = VersionResponse {
                    version_supported: u8::from(accepted),
                    connection_state: 0,
                    padding: 0,
                    selected_version_or_connection_id: if version >= Version::WIN10_RS3_1 {
                        self.config.message_connection_id
                    } else {
                        version.0
                    },
                };
                if accepted {
                    self.negotiated = Some(version);
                }
                if accepted && version >= Version::COPPER {
                    self.send(&VersionResponse2 {
                        version_response: base,
                        supported_features: 0,
                    });
                } else {
                    self.send(&base);
                }
            }
            MessageType::REQUEST_OFFERS => {
                for offer in self.config.offers.clone() {
                    self.send(&offer);
                }
                self.send(&AllOffersDelivered {});
            }
            MessageType::GPADL_HEADER => {
                let (header, rest) =
                    GpadlHeader::read_from_prefix(body).map_err(|_| HvStatus::INVALID_PARAMETER)?;
                let (range, pfn_bytes) =
                    GpaRange::read_from_prefix(rest).map_err(|_| HvStatus::INVALID_PARAMETER)?;
                let pfns = pfn_bytes
                    .chunks_exact(8)
                    .map(|chunk| u64::from_le_bytes(chunk.try_into().expect("8 bytes")))
                    .collect();
                self.gpadls.insert(
                    header.gpadl,
                    FakeGpadl {
                        relid: header.child_relid,
                        byte_count: range.byte_count,
                        pfns,
                        expected_pfns: (usize::from(header.range_buflen).saturating_sub(8)) / 8,
                        bodies: 0,
                    },
                );
                self.gpadl_complete(header.gpadl);
            }
            MessageType::GPADL_BODY => {
                let (body_header, pfn_bytes) =
                    GpadlBody::read_from_prefix(body).map_err(|_| HvStatus::INVALID_PARAMETER)?;
                if let Some(gpadl) = self.gpadls.get_mut(&body_header.gpadl) {
                    gpadl.bodies += 1;
                    gpadl.pfns.extend(
                        pfn_bytes
                            .chunks_exact(8)
                            .map(|chunk| u64::from_le_bytes(chunk.try_into().expect("8 bytes"))),
                    );
                    self.gpadl_complete(body_header.gpadl);
                }
            }
            MessageType::GPADL_TEARDOWN => {
                let teardown: GpadlTeardown =
                    protocol::read_body(body).ok_or(HvStatus::INVALID_PARAMETER)?;
                self.gpadls.remove(&teardown.gpadl);
                self.torn_down.push(teardown.gpadl);
                self.send(&GpadlTorndown {
                    gpadl: teardown.gpadl,
                });
            }
            MessageType::OPEN_CHANNEL => {
                let open: OpenChannel =
                    protocol::read_body(body).ok_or(HvStatus::INVALID_PARAMETER)?;
                if self.config.open_status == 0 {
                    self.opens.insert(
                        open.child_relid,
                        FakeOpen {
                            gpadl: open.ring_buffer_gpadl,
                            downstream_page_offset: open.downstream_ring_buffer_page_offset,
                            target_vp: open.target_vp,
                        },
                    );
                }
                self.send(&OpenResult {
                    child_relid: open.child_relid,
                    open_id: open.open_id,
                    status: self.config.open_status,
                });
            }
            MessageType::CLOSE_CHANNEL => {
                let close: CloseChannel =
                    protocol::read_body(body).ok_or(HvStatus::INVALID_PARAMETER)?;
                self.opens.remove(&close.child_relid);
                self.closed.push(close.child_relid);
            }
            MessageType::RELID_RELEASED => {
                let released: RelIdReleased =
                    protocol::read_body(body).ok_or(HvStatus::INVALID_PARAMETER)?;
                self.released.push(released.child_relid);
            }
            MessageType::UNLOAD => {
                self.unloaded = true;
                self.send(&UnloadResponse {});
            }
            _ => {}
        }
        Ok(())
    }
}

impl EventSignal for FakeHostPort {
    fn signal_event(&self, connection_id: u32) -> Result<(), HvStatus> {
        self.state.lock().signals.push(connection_id);
        Ok(())
    }
}

impl HypervisorPort for FakeHostPort {
    fn post_message(&mut self, connection_id: u32, payload: &[u8]) -> Result<(), HvStatus> {
        if payload.len() > MAX_MESSAGE_SIZE {
            return Err(HvStatus::INVALID_PARAMETER);
        }
        self.state.lock().receive(connection_id, payload)
    }

    fn signal_event(&self, connection_id: u32) -> Result<(), HvStatus> {
        EventSignal::signal_event(self, connection_id)
    }

    fn event_signal(&self) -> Arc<dyn EventSignal> {
        Arc::new(self.clone())
    }

    fn poll_message(&mut self, buffer: &mut [u8; MAX_MESSAGE_SIZE]) -> Option<usize> {
        let message = self.state.lock().to_guest.pop_front()?;
        let len = message.len().min(MAX_MESSAGE_SIZE);
        buffer[..len].copy_from_slice(&message[..len]);
        Some(len)
    }

    fn take_channel_events(&mut self, events: &mut ChannelEvents) {
        let mut state = self.state.lock();
        for relid in state.events.iter().collect::<Vec<_>>() {
            events.insert(relid);
        }
        state.events = ChannelEvents::new();
    }

    fn vp_index(&self) -> u32 {
        0
    }

    fn now_ns(&self) -> u64 {
        self.state.lock().clock_ns
    }

    fn idle(&mut self) {
        self.state.lock().clock_ns += 1_000_000;
    }
}
