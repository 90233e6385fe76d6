//! A fake netvsc host for host tests: plays NetVSP's side of NVSP and RNDIS at packet level,
//! with knobs to refuse versions, stay silent, hand out bad ranges, hold completions back,
//! flip the link and rescind.
//!
//! The driver gets a [`FakeChannel`]; the test keeps the [`FakeNetvscHost`] handle to the same
//! state. The host acts synchronously inside the driver's `try_send` (as a host with
//! infinite speed would) and in the test's `inject_*` calls. Its memory accesses go through
//! the fake DMA allocator's checked copies (device address == CPU address). Time is fake:
//! `wait` jumps the clock to the deadline, so a host that never answers costs no real time.

use alloc::collections::{BTreeMap, VecDeque};
use alloc::vec;
use alloc::vec::Vec;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use net_device::{DmaRegion, MacAddress};
use zerocopy::{FromBytes, FromZeros, IntoBytes};

use super::channel::{IncomingKind, IncomingPacket, NetvscChannel, OutgoingPacket, TransferRange};
use super::nvsp::{self, NvspVersion};
use super::rndis;
use crate::error::Error;
use crate::fake::memory::{read_memory, write_memory};

/// Sub-allocations kept for control messages, as netvsp does.
const CONTROL_SUB_ALLOCATIONS: usize = 16;

/// What the fake host offers and how it behaves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FakeHostConfig {
    /// NVSP versions the host accepts (exact match).
    pub versions: Vec<NvspVersion>,
    /// The permanent MAC address.
    pub mac: MacAddress,
    /// MTU answered to the maximum-frame-size query.
    pub mtu: u32,
    /// Answer INIT at all (false: a host that never answers).
    pub answer_init: bool,
    /// Receive sub-allocation size (netvsp: 256 + 1514 + 36).
    pub sub_allocation_size: u32,
    /// Send-buffer section size in the send-buffer completion.
    pub section_size: u32,
    /// Offload capabilities answered; `None` refuses the query.
    pub offload: Option<rndis::NdisOffload>,
    /// Media connected at start.
    pub media_connected: bool,
    /// Most frames per transfer-page packet.
    pub frames_per_packet: usize,
    /// A broadcast frame arrives between applying the packet filter and its SET completion
    /// (a busy network at boot).
    pub frame_before_filter_reply: bool,
}

impl Default for FakeHostConfig {
    fn default() -> Self {
        FakeHostConfig {
            versions: NvspVersion::NEGOTIATION_ORDER.to_vec(),
            mac: MacAddress([0x00, 0x15, 0x5d, 0x01, 0x02, 0x03]),
            mtu: 1500,
            answer_init: true,
            sub_allocation_size: 256 + 1514 + 36,
            section_size: 6144,
            offload: Some(full_offload()),
            media_connected: true,
            frames_per_packet: 8,
            frame_before_filter_reply: false,
        }
    }
}

/// Offload capabilities like netvsp's with an endpoint that does everything: checksums both
/// ways, LSO v2 up to 0xF53C bytes for IPv4 and IPv6.
pub fn full_offload() -> rndis::NdisOffload {
    let mut offload = rndis::NdisOffload::new_zeroed();
    offload.header = rndis::NdisObjectHeader {
        object_type: rndis::NDIS_OBJECT_TYPE_OFFLOAD,
        revision: 3,
        size: size_of::<rndis::NdisOffload>() as u16,
    };
    let flags4 = 1 << 4 | 1 << 6 | 1 << 8;
    let flags6 = 1 << 4 | 1 << 6;
    let checksum = &mut offload.checksum;
    checksum.ipv4_tx_encapsulation = rndis::ENCAPSULATION_IEEE_802_3;
    checksum.ipv4_tx_flags = flags4;
    checksum.ipv4_rx_encapsulation = rndis::ENCAPSULATION_IEEE_802_3;
    checksum.ipv4_rx_flags = flags4;
    checksum.ipv6_tx_encapsulation = rndis::ENCAPSULATION_IEEE_802_3;
    checksum.ipv6_tx_flags = flags6;
    checksum.ipv6_rx_encapsulation = rndis::ENCAPSULATION_IEEE_802_3;
    checksum.ipv6_rx_flags = flags6;
    let lso = &mut offload.lso_v2;
    lso.ipv4_encapsulation = rndis::ENCAPSULATION_IEEE_802_3;
    lso.ipv4_max_offload_size = 0xf53c;
    lso.ipv4_min_segment_count = 2;
    lso.ipv6_encapsulation = rndis::ENCAPSULATION_IEEE_802_3;
    lso.ipv6_max_offload_size = 0xf53c;
    lso.ipv6_min_segment_count = 2;
    offload
}

/// A frame the guest transmitted, with its metadata.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FakeTxFrame {
    /// The Ethernet frame.
    pub frame: Vec<u8>,
    /// Checksum PPI value, if any.
    pub checksum: Option<u32>,
    /// LSO PPI value, if any.
    pub lso: Option<u32>,
    /// It came through a send-buffer section (else GPA-direct).
    pub via_send_buffer: bool,
}

struct Gpadl {
    address: u64,
    len: usize,
}

#[derive(Default)]
struct HostState {
    config: Option<FakeHostConfig>,
    now_ns: u64,
    waits: u64,
    to_guest: VecDeque<IncomingPacket>,
    gpadls: BTreeMap<u32, Gpadl>,
    next_gpadl: u32,
    gpadl_teardowns: usize,
    version: Option<NvspVersion>,
    init_offers: Vec<u32>,
    ndis_config: Option<nvsp::SendNdisConfig>,
    ndis_version: Option<(u32, u32)>,
    receive_buffer: Option<(u64, usize)>,
    send_buffer: Option<(u64, usize)>,
    /// Sub-allocations in use, by transfer-page transaction id.
    outstanding: BTreeMap<u64, Vec<usize>>,
    free_sub_allocations: Vec<bool>,
    next_transaction: u64,
    pending_rx: VecDeque<(Vec<u8>, Option<u32>)>,
    tx_frames: Vec<FakeTxFrame>,
    packet_filter: Option<u32>,
    offload_parameters: Option<rndis::NdisOffloadParameters>,
    keepalive_answers: Vec<u32>,
    unknown_completions: usize,
    guest_completions: usize,
    ring_full: bool,
    /// Bytes the guest → host ring reports free (the fake never fills up on its own).
    ring_free: usize,
    /// What the driver last asked for with `request_room_signal` (0 = nothing).
    room_signal_bytes: usize,
    /// How often it asked (a change of the value).
    room_signal_requests: u64,
    hold_tx_completions: bool,
    held_tx_completions: Vec<u64>,
    rescinded: bool,
    closed: bool,
    signals: u64,
    rndis_requests: Vec<u32>,
    completions_for_host_in_band: usize,
    receive_complete_override: Option<nvsp::ReceiveBufferComplete>,
    /// SWITCH_DATA_PATH requests seen (`active_data_path`, transaction id).
    switch_requests: Vec<(u32, u64)>,
    /// Keep SWITCH_DATA_PATH completions back until released.
    hold_switch_completions: bool,
}

impl HostState {
    fn config(&self) -> &FakeHostConfig {
        self.config.as_ref().expect("configured at creation")
    }

    fn push(&mut self, packet: IncomingPacket) {
        self.to_guest.push_back(packet);
    }

    fn completion(&mut self, transaction_id: u64, payload: &[u8]) {
        self.push(IncomingPacket {
            kind: IncomingKind::Completion,
            transaction_id,
            payload: payload.to_vec(),
            ..IncomingPacket::default()
        });
    }

    fn handle_in_band(&mut self, transaction_id: u64, completion_requested: bool, payload: &[u8]) {
        let Ok(message_type) = nvsp::message_type_of(payload) else {
            return;
        };
        let body = payload.get(4..).unwrap_or(&[]);
        match message_type {
            nvsp::message_type::INIT => {
                let Ok((init, _)) = nvsp::Init::read_from_prefix(body) else {
                    return;
                };
                self.init_offers.push(init.min_version);
                if !self.config().answer_init {
                    return;
                }
                let accepted = init.min_version == init.max_version
                    && self
                        .config()
                        .versions
                        .contains(&NvspVersion(init.min_version));
                if accepted {
                    self.version = Some(NvspVersion(init.min_version));
                }
                let reply = nvsp::encode(
                    nvsp::message_type::INIT_COMPLETE,
                    &nvsp::InitComplete {
                        deprecated: 0,
                        max_mdl_chain_length: 34,
                        status: if accepted {
                            nvsp::status::SUCCESS
                        } else {
                            nvsp::status::NONE
                        },
                    },
                );
                self.completion(transaction_id, &reply);
            }
            nvsp::message_type::SEND_NDIS_CONFIG => {
                self.ndis_config = nvsp::SendNdisConfig::read_from_prefix(body)
                    .ok()
                    .map(|(c, _)| c);
                if completion_requested {
                    self.completion(transaction_id, &[]);
                }
            }
            nvsp::message_type::SEND_NDIS_VERSION => {
                self.ndis_version = nvsp::SendNdisVersion::read_from_prefix(body)
                    .ok()
                    .map(|(v, _)| (v.major, v.minor));
                if completion_requested {
                    self.completion(transaction_id, &[]);
                }
            }
            nvsp::message_type::SEND_RECEIVE_BUFFER => {
                let Ok((request, _)) = nvsp::SendBuffer::read_from_prefix(body) else {
                    return;
                };
                let Some(gpadl) = self.gpadls.get(&request.gpadl) else {
                    return;
                };
                let (address, len) = (gpadl.address, gpadl.len);
                self.receive_buffer = Some((address, len));
                let size = self.config().sub_allocation_size;
                let count = (len / size as usize) as u32;
                self.free_sub_allocations = vec![true; count as usize];
                let complete =
                    self.receive_complete_override
                        .unwrap_or(nvsp::ReceiveBufferComplete {
                            status: nvsp::status::SUCCESS,
                            section_count: 1,
                            section: nvsp::ReceiveBufferSection {
                                offset: 0,
                                sub_allocation_size: size,
                                sub_allocation_count: count,
                                end_offset: size * count,
                            },
                        });
                let reply =
                    nvsp::encode(nvsp::message_type::SEND_RECEIVE_BUFFER_COMPLETE, &complete);
                self.completion(transaction_id, &reply);
            }
            nvsp::message_type::SEND_SEND_BUFFER => {
                let Ok((request, _)) = nvsp::SendBuffer::read_from_prefix(body) else {
                    return;
                };
                let Some(gpadl) = self.gpadls.get(&request.gpadl) else {
                    return;
                };
                self.send_buffer = Some((gpadl.address, gpadl.len));
                let reply = nvsp::encode(
                    nvsp::message_type::SEND_SEND_BUFFER_COMPLETE,
                    &nvsp::SendBufferComplete {
                        status: nvsp::status::SUCCESS,
                        section_size: self.config().section_size,
                    },
                );
                self.completion(transaction_id, &reply);
            }
            nvsp::message_type::SEND_RNDIS_PACKET => {
                let Ok((request, _)) = nvsp::SendRndisPacket::read_from_prefix(body) else {
                    return;
                };
                let Some((address, len)) = self.send_buffer else {
                    return;
                };
                let section = self.config().section_size as usize;
                let start = request.send_buffer_section_index as usize * section;
                let size = request.send_buffer_section_size as usize;
                if start + size > len || size > section {
                    return;
                }
                let mut message = vec![0u8; size];
                if read_memory(address + start as u64, &mut message) {
                    self.handle_rndis(&message, true);
                }
                self.complete_rndis(transaction_id);
            }
            nvsp::message_type::SWITCH_DATA_PATH => {
                let Ok((switch, _)) = nvsp::SwitchDataPath::read_from_prefix(body) else {
                    return;
                };
                self.switch_requests
                    .push((switch.active_data_path, transaction_id));
                // netvsp completes with an empty packet once its endpoint switched.
                if completion_requested && !self.hold_switch_completions {
                    self.completion(transaction_id, &[]);
                }
            }
            _ => {}
        }
    }

    fn complete_rndis(&mut self, transaction_id: u64) {
        if self.hold_tx_completions {
            self.held_tx_completions.push(transaction_id);
            return;
        }
        let reply = nvsp::encode(
            nvsp::message_type::SEND_RNDIS_PACKET_COMPLETE,
            &nvsp::SendRndisPacketComplete {
                status: nvsp::status::SUCCESS,
            },
        );
        self.completion(transaction_id, &reply);
    }

    fn handle_rndis(&mut self, message: &[u8], via_send_buffer: bool) {
        let Ok((header, _)) = rndis::MessageHeader::read_from_prefix(message) else {
            return;
        };
        self.rndis_requests.push(header.message_type);
        let body = &message[8..];
        match header.message_type {
            rndis::message_type::PACKET => {
                let Ok((packet, _)) = rndis::Packet::read_from_prefix(body) else {
                    return;
                };
                let data_start = packet.data_offset as usize;
                let Some(frame) = body.get(data_start..data_start + packet.data_length as usize)
                else {
                    return;
                };
                let mut captured = FakeTxFrame {
                    frame: frame.to_vec(),
                    checksum: None,
                    lso: None,
                    via_send_buffer,
                };
                let ppi_start = packet.ppi_offset as usize;
                let mut ppis = body
                    .get(ppi_start..ppi_start + packet.ppi_length as usize)
                    .unwrap_or(&[]);
                while let Ok((info, _)) = rndis::PerPacketInfo::read_from_prefix(ppis) {
                    let value_at = info.value_offset as usize;
                    let value = ppis
                        .get(value_at..value_at + 4)
                        .map(|v| u32::from_le_bytes([v[0], v[1], v[2], v[3]]));
                    match info.kind {
                        rndis::ppi_type::TCP_IP_CHECKSUM => captured.checksum = value,
                        rndis::ppi_type::LARGE_SEND => captured.lso = value,
                        _ => {}
                    }
                    if info.size == 0 || info.size as usize > ppis.len() {
                        break;
                    }
                    ppis = &ppis[info.size as usize..];
                }
                self.tx_frames.push(captured);
            }
            rndis::message_type::INITIALIZE => {
                let Ok((request, _)) = rndis::InitializeRequest::read_from_prefix(body) else {
                    return;
                };
                let reply = rndis::build_request(
                    rndis::message_type::INITIALIZE_COMPLETE,
                    &rndis::InitializeComplete {
                        request_id: request.request_id,
                        status: rndis::status::SUCCESS,
                        major_version: 1,
                        minor_version: 0,
                        device_flags: 1,
                        medium: 0,
                        max_packets_per_message: 8,
                        max_transfer_size: 0xefff_ffff,
                        packet_alignment_factor: 3,
                        af_list_offset: 0,
                        af_list_size: 0,
                    },
                    &[],
                );
                self.send_control(reply);
            }
            rndis::message_type::QUERY => {
                let Ok((request, _)) = rndis::OidRequest::read_from_prefix(body) else {
                    return;
                };
                let config = self.config().clone();
                let answer: Option<Vec<u8>> = match request.oid {
                    rndis::oid::PERMANENT_ADDRESS_802_3 | rndis::oid::CURRENT_ADDRESS_802_3 => {
                        Some(config.mac.0.to_vec())
                    }
                    rndis::oid::GEN_MAXIMUM_FRAME_SIZE => Some(config.mtu.to_le_bytes().to_vec()),
                    rndis::oid::GEN_MEDIA_CONNECT_STATUS => {
                        Some(u32::from(!config.media_connected).to_le_bytes().to_vec())
                    }
                    rndis::oid::TCP_OFFLOAD_HARDWARE_CAPABILITIES => {
                        config.offload.map(|offload| offload.as_bytes().to_vec())
                    }
                    _ => None,
                };
                let info = answer.clone().unwrap_or_default();
                let reply = rndis::build_request(
                    rndis::message_type::QUERY_COMPLETE,
                    &rndis::QueryComplete {
                        request_id: request.request_id,
                        status: if answer.is_some() {
                            rndis::status::SUCCESS
                        } else {
                            rndis::status::NOT_SUPPORTED
                        },
                        info_length: info.len() as u32,
                        info_offset: 16,
                    },
                    &info,
                );
                self.send_control(reply);
            }
            rndis::message_type::SET => {
                let Ok((request, _)) = rndis::OidRequest::read_from_prefix(body) else {
                    return;
                };
                let info_start = request.info_offset as usize;
                let info = body
                    .get(info_start..info_start + request.info_length as usize)
                    .unwrap_or(&[]);
                match request.oid {
                    rndis::oid::GEN_CURRENT_PACKET_FILTER => {
                        self.packet_filter = u32::read_from_prefix(info).ok().map(|(v, _)| v);
                        if self.config().frame_before_filter_reply {
                            let mut frame = vec![0xff; 60];
                            frame[12..14].copy_from_slice(&[0x08, 0x06]);
                            self.pending_rx.push_back((frame, None));
                            self.deliver_pending();
                        }
                    }
                    rndis::oid::TCP_OFFLOAD_PARAMETERS => {
                        self.offload_parameters =
                            rndis::NdisOffloadParameters::read_from_prefix(info)
                                .ok()
                                .map(|(p, _)| p);
                    }
                    _ => {}
                }
                let reply = rndis::build_request(
                    rndis::message_type::SET_COMPLETE,
                    &rndis::StatusComplete {
                        request_id: request.request_id,
                        status: rndis::status::SUCCESS,
                    },
                    &[],
                );
                self.send_control(reply);
            }
            rndis::message_type::KEEPALIVE_COMPLETE => {
                if let Ok((complete, _)) = rndis::StatusComplete::read_from_prefix(body) {
                    self.keepalive_answers.push(complete.request_id);
                }
            }
            _ => {}
        }
    }

    /// Sends one control message through a reserved sub-allocation.
    fn send_control(&mut self, message: Vec<u8>) {
        let Some(index) = (0..CONTROL_SUB_ALLOCATIONS.min(self.free_sub_allocations.len()))
            .find(|index| self.free_sub_allocations[*index])
        else {
            return;
        };
        self.transfer(vec![(index, message)]);
    }

    /// Writes messages into their sub-allocations and queues one transfer-page packet.
    fn transfer(&mut self, messages: Vec<(usize, Vec<u8>)>) {
        let Some((address, _)) = self.receive_buffer else {
            return;
        };
        let size = self.config().sub_allocation_size as usize;
        let mut ranges = Vec::new();
        let mut used = Vec::new();
        for (index, message) in messages {
            let offset = index * size;
            write_memory(address + offset as u64, &message);
            self.free_sub_allocations[index] = false;
            used.push(index);
            ranges.push(TransferRange {
                byte_count: message.len() as u32,
                byte_offset: offset as u32,
            });
        }
        self.next_transaction += 1;
        let transaction_id = self.next_transaction;
        self.outstanding.insert(transaction_id, used);
        let payload = nvsp::encode(
            nvsp::message_type::SEND_RNDIS_PACKET,
            &nvsp::SendRndisPacket {
                channel_type: nvsp::CHANNEL_TYPE_DATA,
                send_buffer_section_index: nvsp::NO_SEND_BUFFER_SECTION,
                send_buffer_section_size: 0,
            },
        );
        self.push(IncomingPacket {
            kind: IncomingKind::TransferPages,
            transaction_id,
            completion_requested: true,
            pageset_id: 0xcafe,
            ranges,
            payload: payload.to_vec(),
        });
    }

    /// Delivers queued frames while data sub-allocations are free, several per packet.
    fn deliver_pending(&mut self) {
        loop {
            let mut batch = Vec::new();
            let per_packet = self.config().frames_per_packet.max(1);
            let mut search_from = CONTROL_SUB_ALLOCATIONS;
            while batch.len() < per_packet && !self.pending_rx.is_empty() {
                let Some(index) = (search_from..self.free_sub_allocations.len())
                    .find(|index| self.free_sub_allocations[*index])
                else {
                    break;
                };
                search_from = index + 1;
                let (frame, checksum) = self.pending_rx.pop_front().expect("not empty");
                batch.push((index, rx_message(&frame, checksum)));
            }
            if batch.is_empty() {
                return;
            }
            self.transfer(batch);
        }
    }
}

/// Builds a receive PACKET message the way a host lays it out: PPIs right after the packet
/// structure, then the frame.
pub fn rx_message(frame: &[u8], checksum: Option<u32>) -> Vec<u8> {
    let ppi_len = if checksum.is_some() { 16 } else { 0 };
    let data_offset = 36 + ppi_len;
    let packet = rndis::Packet {
        data_offset: data_offset as u32,
        data_length: frame.len() as u32,
        oob_data_offset: 0,
        oob_data_length: 0,
        oob_element_count: 0,
        ppi_offset: if checksum.is_some() { 36 } else { 0 },
        ppi_length: ppi_len as u32,
        vc_handle: 0,
        reserved: 0,
    };
    let mut info = Vec::new();
    if let Some(value) = checksum {
        info.extend_from_slice(
            rndis::PerPacketInfo {
                size: 16,
                kind: rndis::ppi_type::TCP_IP_CHECKSUM,
                value_offset: 12,
            }
            .as_bytes(),
        );
        info.extend_from_slice(&value.to_le_bytes());
    }
    info.extend_from_slice(frame);
    rndis::build_request(rndis::message_type::PACKET, &packet, &info)
}

fn lock(state: &Mutex<HostState>) -> MutexGuard<'_, HostState> {
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The test's handle on the fake host.
#[derive(Clone)]
pub struct FakeNetvscHost {
    state: Arc<Mutex<HostState>>,
}

/// The driver's end: implements [`NetvscChannel`] against the fake host.
pub struct FakeChannel {
    state: Arc<Mutex<HostState>>,
}

impl FakeNetvscHost {
    /// A host with `config`, and the channel to hand to the driver.
    pub fn new(config: FakeHostConfig) -> (FakeNetvscHost, FakeChannel) {
        let state = Arc::new(Mutex::new(HostState {
            config: Some(config),
            next_gpadl: 1,
            ring_free: 64 * 1024,
            room_signal_bytes: 0,
            room_signal_requests: 0,
            ..HostState::default()
        }));
        (
            FakeNetvscHost {
                state: state.clone(),
            },
            FakeChannel { state },
        )
    }

    fn state(&self) -> MutexGuard<'_, HostState> {
        lock(&self.state)
    }

    /// Queues received frames (each with an optional receive-checksum PPI value); they go
    /// out as soon as receive sub-allocations are free, and wait for completions otherwise.
    pub fn inject_frames(&self, frames: &[(Vec<u8>, Option<u32>)]) {
        let mut state = self.state();
        state.pending_rx.extend(frames.iter().cloned());
        state.deliver_pending();
    }

    /// Frames still waiting for receive-buffer space.
    pub fn pending_rx(&self) -> usize {
        self.state().pending_rx.len()
    }

    /// Transfer-page packets the guest has not completed.
    pub fn outstanding_transfers(&self) -> usize {
        self.state().outstanding.len()
    }

    /// Sends a link indication.
    pub fn set_link(&self, up: bool) {
        self.indicate(if up {
            rndis::status::MEDIA_CONNECT
        } else {
            rndis::status::MEDIA_DISCONNECT
        });
    }

    /// Sends a status indication.
    pub fn indicate(&self, status: u32) {
        let message = rndis::build_request(
            rndis::message_type::INDICATE_STATUS,
            &rndis::IndicateStatus {
                status,
                buffer_length: 0,
                buffer_offset: 0,
            },
            &[],
        );
        self.state().send_control(message);
    }

    /// Sends an RNDIS KEEPALIVE request.
    pub fn send_keepalive(&self, request_id: u32) {
        let message = rndis::build_request(
            rndis::message_type::KEEPALIVE,
            &rndis::IdRequest { request_id },
            &[],
        );
        self.state().send_control(message);
    }

    /// Sends a VF association message in-band with a completion requested, as netvsp does.
    pub fn send_vf_association(&self, allocated: bool, serial_number: u32) {
        let payload = nvsp::encode(
            nvsp::message_type::SEND_VF_ASSOCIATION,
            &nvsp::VfAssociation {
                allocated: u32::from(allocated),
                serial_number,
            },
        );
        self.state().push(IncomingPacket {
            kind: IncomingKind::InBand,
            transaction_id: 0x8000_0000_0000_0000,
            completion_requested: true,
            payload: payload.to_vec(),
            ..IncomingPacket::default()
        });
    }

    /// Queues an arbitrary packet for the guest (malformed-input tests).
    pub fn inject_raw(&self, packet: IncomingPacket) {
        self.state().push(packet);
    }

    /// Writes bytes into the receive buffer at `offset` (malformed-input tests).
    pub fn write_receive_buffer(&self, offset: usize, bytes: &[u8]) -> bool {
        let state = self.state();
        let Some((address, len)) = state.receive_buffer else {
            return false;
        };
        offset + bytes.len() <= len && write_memory(address + offset as u64, bytes)
    }

    /// Answers SEND_RECEIVE_BUFFER with this instead of a correct completion.
    pub fn override_receive_buffer_complete(&self, complete: nvsp::ReceiveBufferComplete) {
        self.state().receive_complete_override = Some(complete);
    }

    /// Takes the frames the guest transmitted so far.
    pub fn take_tx_frames(&self) -> Vec<FakeTxFrame> {
        core::mem::take(&mut self.state().tx_frames)
    }

    /// Makes the guest → host ring report full (or not).
    pub fn set_ring_full(&self, full: bool) {
        self.state().ring_full = full;
    }

    /// The free guest → host ring bytes the driver last asked to be signalled at (0 = none)
    /// and how many times it asked.
    pub fn room_signal(&self) -> (usize, u64) {
        let state = self.state();
        (state.room_signal_bytes, state.room_signal_requests)
    }

    /// Sets the bytes the guest → host ring has free (64 KiB at start; the host drains it at
    /// once, so sends never use it up): a packet whose [`OutgoingPacket::ring_len`] is larger
    /// is refused as by a full ring.
    pub fn set_ring_free(&self, bytes: usize) {
        self.state().ring_free = bytes;
    }

    /// Holds transmit completions back (or releases them all).
    pub fn hold_tx_completions(&self, hold: bool) {
        let mut state = self.state();
        state.hold_tx_completions = hold;
        if !hold {
            for transaction_id in core::mem::take(&mut state.held_tx_completions) {
                state.complete_rndis(transaction_id);
            }
        }
    }

    /// Rescinds the channel.
    pub fn rescind(&self) {
        self.state().rescinded = true;
    }

    /// The version the host accepted, if any.
    pub fn version(&self) -> Option<NvspVersion> {
        self.state().version
    }

    /// Every version the guest offered, in order.
    pub fn init_offers(&self) -> Vec<u32> {
        self.state().init_offers.clone()
    }

    /// The NDIS configuration the guest sent.
    pub fn ndis_config(&self) -> Option<nvsp::SendNdisConfig> {
        self.state().ndis_config
    }

    /// The NDIS version the guest sent.
    pub fn ndis_version(&self) -> Option<(u32, u32)> {
        self.state().ndis_version
    }

    /// The packet filter the guest set.
    pub fn packet_filter(&self) -> Option<u32> {
        self.state().packet_filter
    }

    /// The offload parameters the guest set.
    pub fn offload_parameters(&self) -> Option<rndis::NdisOffloadParameters> {
        self.state().offload_parameters
    }

    /// Request ids of the guest's KEEPALIVE completions.
    pub fn keepalive_answers(&self) -> Vec<u32> {
        self.state().keepalive_answers.clone()
    }

    /// Completions from the guest that matched nothing outstanding.
    pub fn unknown_completions(&self) -> usize {
        self.state().unknown_completions
    }

    /// SWITCH_DATA_PATH requests the guest sent: `active_data_path` (0 synthetic, 1 VF).
    pub fn switch_requests(&self) -> Vec<u32> {
        self.state()
            .switch_requests
            .iter()
            .map(|(path, _)| *path)
            .collect()
    }

    /// Holds SWITCH_DATA_PATH completions back (a switch in flight) until
    /// [`FakeNetvscHost::complete_switch`].
    pub fn hold_switch_completions(&self, hold: bool) {
        self.state().hold_switch_completions = hold;
    }

    /// Completes the `index`th SWITCH_DATA_PATH request (held back before).
    pub fn complete_switch(&self, index: usize) {
        let mut state = self.state();
        if let Some(&(_, transaction_id)) = state.switch_requests.get(index) {
            state.completion(transaction_id, &[]);
        }
    }

    /// Sends SWITCH_DATA_PATH to the guest, as netvsp does when it moves the path itself.
    pub fn send_host_switch(&self, to_vf: bool) {
        let payload = nvsp::encode(
            nvsp::message_type::SWITCH_DATA_PATH,
            &nvsp::SwitchDataPath {
                active_data_path: u32::from(to_vf),
            },
        );
        self.state().push(IncomingPacket {
            kind: IncomingKind::InBand,
            transaction_id: 0x8000_0000_0000_0001,
            completion_requested: true,
            payload: payload.to_vec(),
            ..IncomingPacket::default()
        });
    }

    /// Completions of the host's in-band messages (VF association).
    pub fn in_band_completions(&self) -> usize {
        self.state().completions_for_host_in_band
    }

    /// GPADLs currently registered, and teardowns so far.
    pub fn gpadls(&self) -> (usize, usize) {
        let state = self.state();
        (state.gpadls.len(), state.gpadl_teardowns)
    }

    /// The channel was closed by the guest.
    pub fn closed(&self) -> bool {
        self.state().closed
    }

    /// Times the guest waited on the channel.
    pub fn waits(&self) -> u64 {
        self.state().waits
    }

    /// Receive sub-allocations free for data.
    pub fn free_data_sub_allocations(&self) -> usize {
        let state = self.state();
        state
            .free_sub_allocations
            .iter()
            .skip(CONTROL_SUB_ALLOCATIONS)
            .filter(|free| **free)
            .count()
    }
}

impl NetvscChannel for FakeChannel {
    fn try_send(&mut self, packet: &OutgoingPacket<'_>) -> Result<bool, Error> {
        let mut state = lock(&self.state);
        if state.rescinded {
            return Err(Error::ChannelRescinded);
        }
        if state.ring_full || packet.ring_len() > state.ring_free {
            return Ok(false);
        }
        match *packet {
            OutgoingPacket::InBand {
                transaction_id,
                completion_requested,
                payload,
            } => state.handle_in_band(transaction_id, completion_requested, payload),
            OutgoingPacket::Completion { transaction_id, .. } => {
                state.guest_completions += 1;
                if let Some(used) = state.outstanding.remove(&transaction_id) {
                    for index in used {
                        state.free_sub_allocations[index] = true;
                    }
                    state.deliver_pending();
                } else if transaction_id >= 0x8000_0000_0000_0000 {
                    state.completions_for_host_in_band += 1;
                } else {
                    state.unknown_completions += 1;
                }
            }
            OutgoingPacket::GpaDirect {
                transaction_id,
                ranges,
                payload,
            } => {
                let Ok((request, _)) =
                    nvsp::SendRndisPacket::read_from_prefix(payload.get(4..).unwrap_or(&[]))
                else {
                    return Ok(true);
                };
                let mut message = Vec::new();
                for range in ranges {
                    let Some(first) = range.page_numbers.first() else {
                        continue;
                    };
                    // The fake's pages are consecutive memory (device address == CPU address).
                    let address = first * 4096 + u64::from(range.byte_offset);
                    let mut bytes = vec![0u8; range.byte_count as usize];
                    if read_memory(address, &mut bytes) {
                        message.extend_from_slice(&bytes);
                    }
                }
                state.handle_rndis(&message, false);
                let _ = request;
                state.complete_rndis(transaction_id);
            }
        }
        Ok(true)
    }

    fn outgoing_free(&mut self) -> Result<usize, Error> {
        let state = lock(&self.state);
        if state.rescinded {
            return Err(Error::ChannelRescinded);
        }
        Ok(if state.ring_full { 0 } else { state.ring_free })
    }

    fn request_room_signal(&mut self, bytes: usize) -> Result<(), Error> {
        let mut state = lock(&self.state);
        if state.rescinded {
            return Err(Error::ChannelRescinded);
        }
        state.room_signal_bytes = bytes;
        state.room_signal_requests += 1;
        Ok(())
    }

    fn flush(&mut self) {
        lock(&self.state).signals += 1;
    }

    fn try_receive(&mut self, into: &mut IncomingPacket) -> Result<bool, Error> {
        let mut state = lock(&self.state);
        match state.to_guest.pop_front() {
            Some(packet) => {
                *into = packet;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    fn create_gpadl(&mut self, region: &DmaRegion) -> Result<u32, Error> {
        let mut state = lock(&self.state);
        let id = state.next_gpadl;
        state.next_gpadl += 1;
        state.gpadls.insert(
            id,
            Gpadl {
                address: region.phys().0,
                len: region.len(),
            },
        );
        Ok(id)
    }

    fn teardown_gpadl(&mut self, gpadl: u32) -> Result<(), Error> {
        let mut state = lock(&self.state);
        state.gpadl_teardowns += 1;
        state
            .gpadls
            .remove(&gpadl)
            .map(|_| ())
            .ok_or(Error::VmbusChannel {
                what: "unknown GPADL",
            })
    }

    fn now_ns(&self) -> u64 {
        lock(&self.state).now_ns
    }

    fn wait(&mut self, deadline_ns: u64) {
        let mut state = lock(&self.state);
        state.waits += 1;
        if state.to_guest.is_empty() {
            state.now_ns = state.now_ns.max(deadline_ns);
        }
    }

    fn is_rescinded(&self) -> bool {
        lock(&self.state).rescinded
    }

    fn close(&mut self) {
        lock(&self.state).closed = true;
    }
}
