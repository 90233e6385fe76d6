//! RNDIS over netvsc: message layouts, OIDs, NDIS offload objects and per-packet info.
//!
//! An RNDIS message is `{type u32, length u32}` and a body; requests start with a request id
//! the completion echoes. Data frames are PACKET messages whose per-packet info (PPI) carries
//! checksum, LSO and VLAN metadata (`hyperv-vmbus-netvsc.md` §4). Everything parsed here comes
//! from the host and is bounds-checked: offsets and lengths must stay inside the message.

use alloc::vec::Vec;

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::error::{Error, Layer};

/// RNDIS message types (completions are the request type with bit 31 set).
pub mod message_type {
    /// A data frame.
    pub const PACKET: u32 = 1;
    /// INITIALIZE request.
    pub const INITIALIZE: u32 = 2;
    /// HALT request (no completion).
    pub const HALT: u32 = 3;
    /// QUERY request.
    pub const QUERY: u32 = 4;
    /// SET request.
    pub const SET: u32 = 5;
    /// RESET request.
    pub const RESET: u32 = 6;
    /// Status indication from the host.
    pub const INDICATE_STATUS: u32 = 7;
    /// KEEPALIVE request (either side).
    pub const KEEPALIVE: u32 = 8;
    /// INITIALIZE completion.
    pub const INITIALIZE_COMPLETE: u32 = 0x8000_0002;
    /// QUERY completion.
    pub const QUERY_COMPLETE: u32 = 0x8000_0004;
    /// SET completion.
    pub const SET_COMPLETE: u32 = 0x8000_0005;
    /// RESET completion.
    pub const RESET_COMPLETE: u32 = 0x8000_0006;
    /// KEEPALIVE completion.
    pub const KEEPALIVE_COMPLETE: u32 = 0x8000_0008;
}

/// NDIS status values.
pub mod status {
    /// Success.
    pub const SUCCESS: u32 = 0;
    /// Media connected (link up).
    pub const MEDIA_CONNECT: u32 = 0x4001_000b;
    /// Media disconnected (link down).
    pub const MEDIA_DISCONNECT: u32 = 0x4001_000c;
    /// Link speed changed.
    pub const LINK_SPEED_CHANGE: u32 = 0x4001_0013;
    /// The network changed: Linux bounces the carrier so addresses are renewed.
    pub const NETWORK_CHANGE: u32 = 0x4001_0018;
    /// Offload configuration changed (informational).
    pub const TASK_OFFLOAD_CURRENT_CONFIG: u32 = 0x4002_0006;
    /// Operation not supported.
    pub const NOT_SUPPORTED: u32 = 0xc000_00bb;
}

/// NDIS OIDs the driver queries or sets.
pub mod oid {
    /// Largest frame without the Ethernet header (the MTU).
    pub const GEN_MAXIMUM_FRAME_SIZE: u32 = 0x0001_0106;
    /// Link speed in units of 100 bit/s.
    pub const GEN_LINK_SPEED: u32 = 0x0001_0107;
    /// The receive packet filter (0 stops receive).
    pub const GEN_CURRENT_PACKET_FILTER: u32 = 0x0001_010e;
    /// 0 = connected, 1 = disconnected.
    pub const GEN_MEDIA_CONNECT_STATUS: u32 = 0x0001_0114;
    /// The factory MAC address.
    pub const PERMANENT_ADDRESS_802_3: u32 = 0x0101_0101;
    /// The current MAC address.
    pub const CURRENT_ADDRESS_802_3: u32 = 0x0101_0102;
    /// Offload parameters to enable (SET).
    pub const TCP_OFFLOAD_PARAMETERS: u32 = 0xfc01_020c;
    /// What the host can offload (QUERY).
    pub const TCP_OFFLOAD_HARDWARE_CAPABILITIES: u32 = 0xfc01_020d;
}

/// Packet filter bits of [`oid::GEN_CURRENT_PACKET_FILTER`].
pub mod packet_filter {
    /// Frames to our MAC.
    pub const DIRECTED: u32 = 0x1;
    /// All multicast frames.
    pub const ALL_MULTICAST: u32 = 0x4;
    /// Broadcast frames.
    pub const BROADCAST: u32 = 0x8;
    /// Every frame.
    pub const PROMISCUOUS: u32 = 0x20;
}

/// Per-packet info types.
pub mod ppi_type {
    /// TCP/IP checksum info (transmit request or receive result).
    pub const TCP_IP_CHECKSUM: u32 = 0;
    /// TCP large send offload (LSO v2 on transmit).
    pub const LARGE_SEND: u32 = 2;
    /// IEEE 802.1Q tag.
    pub const IEEE_8021Q: u32 = 6;
}

/// RNDIS major version we speak.
pub const MAJOR_VERSION: u32 = 1;
/// RNDIS minor version we speak.
pub const MINOR_VERSION: u32 = 0;
/// Largest message we send (Linux and DPDK announce the same).
pub const MAX_TRANSFER_SIZE: u32 = 0x4000;

/// The header of every RNDIS message.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct MessageHeader {
    /// One of [`message_type`].
    pub message_type: u32,
    /// Bytes of the whole message, header included.
    pub message_length: u32,
}

/// INITIALIZE request body.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct InitializeRequest {
    /// Echoed by the completion.
    pub request_id: u32,
    /// [`MAJOR_VERSION`].
    pub major_version: u32,
    /// [`MINOR_VERSION`].
    pub minor_version: u32,
    /// Largest message the guest sends.
    pub max_transfer_size: u32,
}

/// INITIALIZE completion body.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct InitializeComplete {
    /// The request's id.
    pub request_id: u32,
    /// NDIS status.
    pub status: u32,
    /// Host's RNDIS major version.
    pub major_version: u32,
    /// Host's RNDIS minor version.
    pub minor_version: u32,
    /// Device flags (connectionless).
    pub device_flags: u32,
    /// Medium (0 = 802.3).
    pub medium: u32,
    /// Most RNDIS packets per send the host takes.
    pub max_packets_per_message: u32,
    /// Largest message the host takes.
    pub max_transfer_size: u32,
    /// Packets in one send are aligned to `1 << factor` bytes.
    pub packet_alignment_factor: u32,
    /// Unused (connection-oriented devices only).
    pub af_list_offset: u32,
    /// Unused.
    pub af_list_size: u32,
}

/// QUERY and SET request body; the information buffer follows at `info_offset` from
/// `request_id`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct OidRequest {
    /// Echoed by the completion.
    pub request_id: u32,
    /// The OID.
    pub oid: u32,
    /// Bytes of the information buffer.
    pub info_length: u32,
    /// Offset of the information buffer from `request_id`.
    pub info_offset: u32,
    /// Zero.
    pub device_vc_handle: u32,
}

/// QUERY completion body; the answer follows at `info_offset` from `request_id`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct QueryComplete {
    /// The request's id.
    pub request_id: u32,
    /// NDIS status.
    pub status: u32,
    /// Bytes of the answer.
    pub info_length: u32,
    /// Offset of the answer from `request_id`.
    pub info_offset: u32,
}

/// SET, RESET-less completions (SET, KEEPALIVE): request id and status.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct StatusComplete {
    /// The request's id.
    pub request_id: u32,
    /// NDIS status.
    pub status: u32,
}

/// Request bodies that are only an id (KEEPALIVE, HALT).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct IdRequest {
    /// Echoed by the completion (KEEPALIVE).
    pub request_id: u32,
}

/// INDICATE_STATUS body; a status buffer follows at `buffer_offset` from `status`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct IndicateStatus {
    /// One of [`status`].
    pub status: u32,
    /// Bytes of the status buffer.
    pub buffer_length: u32,
    /// Offset of the status buffer from `status`.
    pub buffer_offset: u32,
}

/// PACKET body. Offsets count from the start of this structure (8 bytes into the message).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct Packet {
    /// Offset of the frame.
    pub data_offset: u32,
    /// Bytes of the frame.
    pub data_length: u32,
    /// Out-of-band data offset (unused, 0).
    pub oob_data_offset: u32,
    /// Out-of-band data length (unused, 0).
    pub oob_data_length: u32,
    /// Out-of-band element count (unused, 0).
    pub oob_element_count: u32,
    /// Offset of the per-packet info.
    pub ppi_offset: u32,
    /// Bytes of per-packet info.
    pub ppi_length: u32,
    /// Zero.
    pub vc_handle: u32,
    /// Zero.
    pub reserved: u32,
}

/// One per-packet info element's header; its value follows at `value_offset` from the
/// element's start.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct PerPacketInfo {
    /// Bytes of the element, header included.
    pub size: u32,
    /// One of [`ppi_type`]; bit 31 marks internal types.
    pub kind: u32,
    /// Offset of the value from the element's start (12).
    pub value_offset: u32,
}

/// The header of every NDIS object (offload capabilities and parameters).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct NdisObjectHeader {
    /// Object type (0x80 default, 0xa7 offload).
    pub object_type: u8,
    /// Object revision.
    pub revision: u8,
    /// Bytes of the object, header included.
    pub size: u16,
}

/// NDIS object type of offload parameters.
pub const NDIS_OBJECT_TYPE_DEFAULT: u8 = 0x80;
/// NDIS object type of offload capabilities.
pub const NDIS_OBJECT_TYPE_OFFLOAD: u8 = 0xa7;

/// Checksum part of the NDIS_OFFLOAD capabilities: encapsulation and 2-bit flag fields per
/// direction and IP version.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct ChecksumOffload {
    /// IPv4 transmit encapsulation (2 = 802.3).
    pub ipv4_tx_encapsulation: u32,
    /// IPv4 transmit flags: bits 4-5 TCP, 6-7 UDP, 8-9 IP header (1 = supported).
    pub ipv4_tx_flags: u32,
    /// IPv4 receive encapsulation.
    pub ipv4_rx_encapsulation: u32,
    /// IPv4 receive flags (as transmit).
    pub ipv4_rx_flags: u32,
    /// IPv6 transmit encapsulation.
    pub ipv6_tx_encapsulation: u32,
    /// IPv6 transmit flags: bits 4-5 TCP, 6-7 UDP.
    pub ipv6_tx_flags: u32,
    /// IPv6 receive encapsulation.
    pub ipv6_rx_encapsulation: u32,
    /// IPv6 receive flags.
    pub ipv6_rx_flags: u32,
}

/// LSO v2 part of the NDIS_OFFLOAD capabilities.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct LsoV2Offload {
    /// IPv4 encapsulation (2 = 802.3 when supported, 0 otherwise).
    pub ipv4_encapsulation: u32,
    /// Largest IPv4 large send.
    pub ipv4_max_offload_size: u32,
    /// Fewest segments a large send must produce.
    pub ipv4_min_segment_count: u32,
    /// IPv6 encapsulation.
    pub ipv6_encapsulation: u32,
    /// Largest IPv6 large send.
    pub ipv6_max_offload_size: u32,
    /// Fewest segments.
    pub ipv6_min_segment_count: u32,
    /// IPv6 option flags.
    pub ipv6_flags: u32,
}

/// The NDIS_OFFLOAD object (revision 1 part) answered to
/// [`oid::TCP_OFFLOAD_HARDWARE_CAPABILITIES`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct NdisOffload {
    /// Object header (type 0xa7).
    pub header: NdisObjectHeader,
    /// Checksum capabilities.
    pub checksum: ChecksumOffload,
    /// LSO v1 (we never enable it; netvsp refuses it).
    pub lso_v1: [u32; 4],
    /// IPsec v1.
    pub ipsec_v1: [u32; 7],
    /// LSO v2 capabilities.
    pub lso_v2: LsoV2Offload,
    /// Flags.
    pub flags: u32,
}

/// Encapsulation value meaning "802.3" in offload capabilities.
pub const ENCAPSULATION_IEEE_802_3: u32 = 2;

/// The NDIS_OFFLOAD_PARAMETERS object (revision 1) set through
/// [`oid::TCP_OFFLOAD_PARAMETERS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct NdisOffloadParameters {
    /// Object header (type 0x80, revision 1, size 20).
    pub header: NdisObjectHeader,
    /// IPv4 header checksum ([`offload_checksum`]).
    pub ipv4_checksum: u8,
    /// TCP over IPv4 checksum.
    pub tcp4_checksum: u8,
    /// UDP over IPv4 checksum.
    pub udp4_checksum: u8,
    /// TCP over IPv6 checksum.
    pub tcp6_checksum: u8,
    /// UDP over IPv6 checksum.
    pub udp6_checksum: u8,
    /// LSO v1 (always 1 = off).
    pub lso_v1: u8,
    /// IPsec v1 (0 = no change).
    pub ipsec_v1: u8,
    /// LSO v2 over IPv4 ([`offload_lso`]).
    pub lso_v2_ipv4: u8,
    /// LSO v2 over IPv6.
    pub lso_v2_ipv6: u8,
    /// TCP connection offload over IPv4 (0 = no change).
    pub tcp_connection_ipv4: u8,
    /// TCP connection offload over IPv6.
    pub tcp_connection_ipv6: u8,
    /// Zero.
    pub reserved: u8,
    /// Zero.
    pub flags: u32,
}

/// Values of the checksum fields of [`NdisOffloadParameters`].
pub mod offload_checksum {
    /// Leave as is.
    pub const NO_CHANGE: u8 = 0;
    /// Neither direction.
    pub const DISABLED: u8 = 1;
    /// Transmit only.
    pub const TX: u8 = 2;
    /// Receive only.
    pub const RX: u8 = 3;
    /// Both directions.
    pub const TX_RX: u8 = 4;
}

/// Values of the LSO fields of [`NdisOffloadParameters`].
pub mod offload_lso {
    /// Leave as is.
    pub const NO_CHANGE: u8 = 0;
    /// Off.
    pub const DISABLED: u8 = 1;
    /// On.
    pub const ENABLED: u8 = 2;
}

const _: () = {
    assert!(size_of::<MessageHeader>() == 8);
    assert!(size_of::<InitializeRequest>() == 16);
    assert!(size_of::<InitializeComplete>() == 44);
    assert!(size_of::<OidRequest>() == 20);
    assert!(size_of::<QueryComplete>() == 16);
    assert!(size_of::<StatusComplete>() == 8);
    assert!(size_of::<IndicateStatus>() == 12);
    assert!(size_of::<Packet>() == 36);
    assert!(size_of::<PerPacketInfo>() == 12);
    assert!(size_of::<NdisObjectHeader>() == 4);
    assert!(size_of::<ChecksumOffload>() == 32);
    assert!(size_of::<LsoV2Offload>() == 28);
    // NDIS_SIZEOF_NDIS_OFFLOAD_REVISION_1.
    assert!(size_of::<NdisOffload>() == 112);
    // NDIS_SIZEOF_OFFLOAD_PARAMETERS_REVISION_1.
    assert!(size_of::<NdisOffloadParameters>() == 20);
};

/// Transmit checksum request bits of the [`ppi_type::TCP_IP_CHECKSUM`] value.
pub mod tx_checksum {
    /// The packet is IPv4.
    pub const IPV4: u32 = 1 << 0;
    /// The packet is IPv6.
    pub const IPV6: u32 = 1 << 1;
    /// Compute the TCP checksum.
    pub const TCP: u32 = 1 << 2;
    /// Compute the UDP checksum.
    pub const UDP: u32 = 1 << 3;
    /// Compute the IPv4 header checksum.
    pub const IP_HEADER: u32 = 1 << 4;
    /// Shift of the 10-bit transport header offset.
    pub const TRANSPORT_OFFSET_SHIFT: u32 = 16;
}

/// Receive checksum result bits of the [`ppi_type::TCP_IP_CHECKSUM`] value.
pub mod rx_checksum {
    /// The TCP checksum is wrong.
    pub const TCP_FAILED: u32 = 1 << 0;
    /// The UDP checksum is wrong.
    pub const UDP_FAILED: u32 = 1 << 1;
    /// The IPv4 header checksum is wrong.
    pub const IP_FAILED: u32 = 1 << 2;
    /// The TCP checksum is right.
    pub const TCP_SUCCEEDED: u32 = 1 << 3;
    /// The UDP checksum is right.
    pub const UDP_SUCCEEDED: u32 = 1 << 4;
    /// The IPv4 header checksum is right.
    pub const IP_SUCCEEDED: u32 = 1 << 5;
}

/// LSO v2 transmit request value: MSS in bits 0-19, TCP header offset in 20-29, bit 30 = v2,
/// bit 31 = IPv6.
pub fn lso_v2_value(mss: u16, tcp_header_offset: u16, ipv6: bool) -> u32 {
    u32::from(mss) | (u32::from(tcp_header_offset) & 0x3ff) << 20 | 1 << 30 | u32::from(ipv6) << 31
}

/// Offset of the frame from the [`Packet`] structure in messages we send: room for two
/// 16-byte PPIs after the 36-byte structure, so the frame's place does not depend on which
/// PPIs the frame ends up needing (the metadata is known only after the frame is written).
pub const TX_DATA_OFFSET: usize = size_of::<Packet>() + 2 * TX_PPI_SIZE;
/// Bytes of one transmit PPI element with a u32 value.
pub const TX_PPI_SIZE: usize = size_of::<PerPacketInfo>() + 4;
/// Bytes before the frame in a transmit message.
pub const TX_HEADER_LEN: usize = size_of::<MessageHeader>() + TX_DATA_OFFSET;

/// Writes the RNDIS header of a transmit message into `header` ([`TX_HEADER_LEN`] bytes)
/// for a frame of `frame_len` bytes that follows it, with the given `(type, value)` PPIs (at
/// most two).
pub fn write_tx_header(header: &mut [u8], frame_len: usize, ppis: &[(u32, u32)]) {
    let ppis = &ppis[..ppis.len().min(2)];
    let message = MessageHeader {
        message_type: message_type::PACKET,
        message_length: (TX_HEADER_LEN + frame_len) as u32,
    };
    let packet = Packet {
        data_offset: TX_DATA_OFFSET as u32,
        data_length: frame_len as u32,
        oob_data_offset: 0,
        oob_data_length: 0,
        oob_element_count: 0,
        ppi_offset: if ppis.is_empty() {
            0
        } else {
            size_of::<Packet>() as u32
        },
        ppi_length: (ppis.len() * TX_PPI_SIZE) as u32,
        vc_handle: 0,
        reserved: 0,
    };
    let mut at = 0;
    for bytes in [message.as_bytes(), packet.as_bytes()] {
        header[at..at + bytes.len()].copy_from_slice(bytes);
        at += bytes.len();
    }
    for (kind, value) in ppis {
        let info = PerPacketInfo {
            size: TX_PPI_SIZE as u32,
            kind: *kind,
            value_offset: size_of::<PerPacketInfo>() as u32,
        };
        header[at..at + 12].copy_from_slice(info.as_bytes());
        header[at + 12..at + 16].copy_from_slice(&value.to_le_bytes());
        at += TX_PPI_SIZE;
    }
    header[at..TX_HEADER_LEN].fill(0);
}

/// Builds a control request: header, `body`, then `info` (the OID information buffer).
pub fn build_request<T: IntoBytes + Immutable>(
    message_type: u32,
    body: &T,
    info: &[u8],
) -> Vec<u8> {
    let body = body.as_bytes();
    let length = size_of::<MessageHeader>() + body.len() + info.len();
    let mut message = Vec::with_capacity(length);
    message.extend_from_slice(
        MessageHeader {
            message_type,
            message_length: length as u32,
        }
        .as_bytes(),
    );
    message.extend_from_slice(body);
    message.extend_from_slice(info);
    message
}

/// Builds a QUERY (`set == false`) or SET request for `oid` with information buffer `info`.
pub fn build_oid_request(request_id: u32, oid: u32, set: bool, info: &[u8]) -> Vec<u8> {
    let body = OidRequest {
        request_id,
        oid,
        info_length: info.len() as u32,
        info_offset: if info.is_empty() {
            0
        } else {
            size_of::<OidRequest>() as u32
        },
        device_vc_handle: 0,
    };
    let message_type = if set {
        message_type::SET
    } else {
        message_type::QUERY
    };
    build_request(message_type, &body, info)
}

/// A parsed host → guest RNDIS message. Borrowed parts point into the message bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RndisMessage<'a> {
    /// A received frame and its metadata.
    Packet(ReceivedPacket<'a>),
    /// INITIALIZE completion.
    InitializeComplete(InitializeComplete),
    /// QUERY completion with its answer.
    QueryComplete {
        /// The request's id.
        request_id: u32,
        /// NDIS status.
        status: u32,
        /// The answer bytes.
        info: &'a [u8],
    },
    /// SET completion.
    SetComplete(StatusComplete),
    /// KEEPALIVE completion.
    KeepaliveComplete(StatusComplete),
    /// RESET completion (status only).
    ResetComplete {
        /// NDIS status.
        status: u32,
    },
    /// A KEEPALIVE request from the host: answer with a KEEPALIVE completion.
    KeepaliveRequest {
        /// The id to echo.
        request_id: u32,
    },
    /// A status indication.
    IndicateStatus {
        /// One of [`status`].
        status: u32,
        /// The status buffer.
        buffer: &'a [u8],
    },
}

/// A received frame: the bytes and what the receive PPIs said.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReceivedPacket<'a> {
    /// The Ethernet frame.
    pub frame: &'a [u8],
    /// The receive checksum PPI value, when present.
    pub checksum: Option<u32>,
    /// The 802.1Q PPI value (priority bits 0-2, VLAN id bits 4-15), when present.
    pub vlan: Option<u32>,
}

fn truncated(what: &'static str, len: usize, needed: usize) -> Error {
    Error::Truncated {
        layer: Layer::Rndis,
        what,
        len,
        needed,
    }
}

fn out_of_range(what: &'static str, value: impl Into<u64>) -> Error {
    Error::OutOfRange {
        layer: Layer::Rndis,
        what,
        value: value.into(),
    }
}

fn read<T: FromBytes>(bytes: &[u8], what: &'static str) -> Result<T, Error> {
    T::read_from_prefix(bytes)
        .map(|(value, _)| value)
        .map_err(|_| truncated(what, bytes.len(), size_of::<T>()))
}

/// `length` bytes at `offset` of `bytes`, or an out-of-range error naming `what`.
fn sub_range<'a>(
    bytes: &'a [u8],
    offset: u32,
    length: u32,
    what: &'static str,
) -> Result<&'a [u8], Error> {
    let start = offset as usize;
    start
        .checked_add(length as usize)
        .and_then(|end| bytes.get(start..end))
        .ok_or_else(|| out_of_range(what, u64::from(offset) + u64::from(length)))
}

/// Parses one RNDIS message from untrusted bytes (one transfer-page range). Trailing bytes
/// past `message_length` are ignored; a `message_length` beyond the bytes is an error.
pub fn parse(bytes: &[u8]) -> Result<RndisMessage<'_>, Error> {
    let header: MessageHeader = read(bytes, "message header")?;
    let length = header.message_length as usize;
    if length < size_of::<MessageHeader>() || length > bytes.len() {
        return Err(out_of_range("message length", header.message_length));
    }
    let message = &bytes[..length];
    let body = &message[size_of::<MessageHeader>()..];
    Ok(match header.message_type {
        message_type::PACKET => RndisMessage::Packet(parse_packet(body)?),
        message_type::INITIALIZE_COMPLETE => {
            RndisMessage::InitializeComplete(read(body, "INITIALIZE completion")?)
        }
        message_type::QUERY_COMPLETE => {
            let complete: QueryComplete = read(body, "QUERY completion")?;
            let info = if complete.info_length == 0 {
                &[][..]
            } else {
                sub_range(
                    body,
                    complete.info_offset,
                    complete.info_length,
                    "QUERY information buffer",
                )?
            };
            RndisMessage::QueryComplete {
                request_id: complete.request_id,
                status: complete.status,
                info,
            }
        }
        message_type::SET_COMPLETE => RndisMessage::SetComplete(read(body, "SET completion")?),
        message_type::KEEPALIVE_COMPLETE => {
            RndisMessage::KeepaliveComplete(read(body, "KEEPALIVE completion")?)
        }
        message_type::RESET_COMPLETE => {
            let status: IdRequest = read(body, "RESET completion")?;
            RndisMessage::ResetComplete {
                status: status.request_id,
            }
        }
        message_type::KEEPALIVE => {
            let request: IdRequest = read(body, "KEEPALIVE request")?;
            RndisMessage::KeepaliveRequest {
                request_id: request.request_id,
            }
        }
        message_type::INDICATE_STATUS => {
            let indication: IndicateStatus = read(body, "INDICATE_STATUS")?;
            let buffer = if indication.buffer_length == 0 {
                &[][..]
            } else {
                sub_range(
                    body,
                    indication.buffer_offset,
                    indication.buffer_length,
                    "status buffer",
                )?
            };
            RndisMessage::IndicateStatus {
                status: indication.status,
                buffer,
            }
        }
        other => {
            return Err(Error::UnexpectedMessage {
                layer: Layer::Rndis,
                message_type: other,
            });
        }
    })
}

/// Parses a PACKET body (offsets relative to its start) and its PPIs.
fn parse_packet(body: &[u8]) -> Result<ReceivedPacket<'_>, Error> {
    let packet: Packet = read(body, "PACKET")?;
    if packet.data_length == 0 {
        return Err(out_of_range("PACKET data length", 0u32));
    }
    let frame = sub_range(body, packet.data_offset, packet.data_length, "PACKET data")?;
    let mut received = ReceivedPacket {
        frame,
        checksum: None,
        vlan: None,
    };
    if packet.ppi_length == 0 {
        return Ok(received);
    }
    let mut ppis = sub_range(body, packet.ppi_offset, packet.ppi_length, "PPI area")?;
    while !ppis.is_empty() {
        let info: PerPacketInfo = read(ppis, "PPI header")?;
        let size = info.size as usize;
        // A zero or header-less size would loop forever or read outside the element.
        if size < size_of::<PerPacketInfo>() || size > ppis.len() {
            return Err(out_of_range("PPI size", info.size));
        }
        let element = &ppis[..size];
        let value = sub_range(element, info.value_offset, 4, "PPI value")?;
        let value = u32::from_le_bytes([value[0], value[1], value[2], value[3]]);
        match info.kind {
            ppi_type::TCP_IP_CHECKSUM => received.checksum = Some(value),
            ppi_type::IEEE_8021Q => received.vlan = Some(value),
            // Hash values, packet ids and internal types carry nothing we use.
            _ => {}
        }
        ppis = &ppis[size..];
    }
    Ok(received)
}

/// What the host can offload, from the hardware-capabilities answer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OffloadSupport {
    /// TCP checksum over IPv4 on transmit.
    pub tx_tcp4: bool,
    /// UDP checksum over IPv4 on transmit.
    pub tx_udp4: bool,
    /// TCP checksum over IPv6 on transmit.
    pub tx_tcp6: bool,
    /// UDP checksum over IPv6 on transmit.
    pub tx_udp6: bool,
    /// IPv4 header checksum on transmit.
    pub tx_ip4: bool,
    /// Checksums verified on receive (TCP and UDP over IPv4 and IPv6).
    pub rx: bool,
    /// Largest IPv4 LSO v2 send (0 = none).
    pub lso4_max: u32,
    /// Largest IPv6 LSO v2 send (0 = none).
    pub lso6_max: u32,
}

/// Reads the 2-bit capability field at `shift` of a checksum flag word (non-zero = supported).
fn flag(flags: u32, shift: u32) -> bool {
    (flags >> shift) & 0b11 != 0
}

/// Parses the NDIS_OFFLOAD answer to [`oid::TCP_OFFLOAD_HARDWARE_CAPABILITIES`].
pub fn parse_offload_capabilities(info: &[u8]) -> Result<OffloadSupport, Error> {
    let offload: NdisOffload = read(info, "NDIS_OFFLOAD")?;
    if offload.header.object_type != NDIS_OBJECT_TYPE_OFFLOAD {
        return Err(out_of_range(
            "NDIS_OFFLOAD object type",
            offload.header.object_type,
        ));
    }
    let checksum = offload.checksum;
    let ipv4_tx = checksum.ipv4_tx_encapsulation & ENCAPSULATION_IEEE_802_3 != 0;
    let ipv6_tx = checksum.ipv6_tx_encapsulation & ENCAPSULATION_IEEE_802_3 != 0;
    let lso = offload.lso_v2;
    let lso4 =
        lso.ipv4_encapsulation & ENCAPSULATION_IEEE_802_3 != 0 && lso.ipv4_min_segment_count <= 2;
    let lso6 =
        lso.ipv6_encapsulation & ENCAPSULATION_IEEE_802_3 != 0 && lso.ipv6_min_segment_count <= 2;
    Ok(OffloadSupport {
        tx_tcp4: ipv4_tx && flag(checksum.ipv4_tx_flags, 4),
        tx_udp4: ipv4_tx && flag(checksum.ipv4_tx_flags, 6),
        tx_ip4: ipv4_tx && flag(checksum.ipv4_tx_flags, 8),
        tx_tcp6: ipv6_tx && flag(checksum.ipv6_tx_flags, 4),
        tx_udp6: ipv6_tx && flag(checksum.ipv6_tx_flags, 6),
        rx: flag(checksum.ipv4_rx_flags, 4)
            && flag(checksum.ipv4_rx_flags, 6)
            && flag(checksum.ipv6_rx_flags, 4)
            && flag(checksum.ipv6_rx_flags, 6),
        lso4_max: if lso4 { lso.ipv4_max_offload_size } else { 0 },
        lso6_max: if lso6 { lso.ipv6_max_offload_size } else { 0 },
    })
}

/// The offload parameters that switch on what `support` allows (checksum transmit for a
/// protocol only when both IP versions have it, since the stack does not tell them apart
/// per capability; receive checksums when reported; LSO v2 when both IP versions have it).
pub fn offload_parameters(support: &OffloadSupport, use_lso: bool) -> NdisOffloadParameters {
    let checksum = |tx: bool, rx: bool| match (tx, rx) {
        (true, true) => offload_checksum::TX_RX,
        (true, false) => offload_checksum::TX,
        (false, true) => offload_checksum::RX,
        (false, false) => offload_checksum::DISABLED,
    };
    let lso = |on: bool| {
        if on {
            offload_lso::ENABLED
        } else {
            offload_lso::DISABLED
        }
    };
    NdisOffloadParameters {
        header: NdisObjectHeader {
            object_type: NDIS_OBJECT_TYPE_DEFAULT,
            revision: 1,
            size: size_of::<NdisOffloadParameters>() as u16,
        },
        ipv4_checksum: checksum(support.tx_ip4, support.rx),
        tcp4_checksum: checksum(support.tx_tcp4, support.rx),
        udp4_checksum: checksum(support.tx_udp4, support.rx),
        tcp6_checksum: checksum(support.tx_tcp6, support.rx),
        udp6_checksum: checksum(support.tx_udp6, support.rx),
        lso_v1: offload_lso::DISABLED,
        ipsec_v1: 0,
        lso_v2_ipv4: lso(use_lso && support.lso4_max > 0),
        lso_v2_ipv6: lso(use_lso && support.lso6_max > 0),
        tcp_connection_ipv4: 0,
        tcp_connection_ipv6: 0,
        reserved: 0,
        flags: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;
    use zerocopy::FromZeros;

    fn packet_message(frame: &[u8], ppis: &[(u32, u32)]) -> Vec<u8> {
        let mut message = vec![0u8; TX_HEADER_LEN + frame.len()];
        write_tx_header(&mut message[..TX_HEADER_LEN], frame.len(), ppis);
        message[TX_HEADER_LEN..].copy_from_slice(frame);
        message
    }

    #[test]
    fn transmit_header_round_trips_through_the_receive_parser() {
        let frame: Vec<u8> = (0..60u8).collect();
        let message = packet_message(&frame, &[(ppi_type::TCP_IP_CHECKSUM, 0x0022_0005)]);
        assert_eq!(&message[0..4], &1u32.to_le_bytes());
        assert_eq!(&message[4..8], &((TX_HEADER_LEN + 60) as u32).to_le_bytes());
        let RndisMessage::Packet(packet) = parse(&message).unwrap() else {
            panic!("not a packet");
        };
        assert_eq!(packet.frame, &frame[..]);
        assert_eq!(packet.checksum, Some(0x0022_0005));
        assert_eq!(packet.vlan, None);
    }

    #[test]
    fn packet_without_ppis_has_none() {
        let message = packet_message(&[7; 14], &[]);
        let RndisMessage::Packet(packet) = parse(&message).unwrap() else {
            panic!("not a packet");
        };
        assert_eq!(packet.frame, &[7; 14]);
        assert_eq!(packet.checksum, None);
    }

    #[test]
    fn packet_bounds_are_checked() {
        let mut message = packet_message(&[1; 20], &[(ppi_type::IEEE_8021Q, 5)]);
        // Data length one past the message.
        let at = 8 + 4;
        message[at..at + 4].copy_from_slice(&21u32.to_le_bytes());
        assert!(matches!(parse(&message), Err(Error::OutOfRange { .. })));
        message[at..at + 4].copy_from_slice(&20u32.to_le_bytes());
        // A PPI whose size is 0 (would never advance).
        let ppi = 8 + 36;
        message[ppi..ppi + 4].copy_from_slice(&0u32.to_le_bytes());
        assert!(parse(&message).is_err());
        // A PPI value offset outside its element.
        message[ppi..ppi + 4].copy_from_slice(&16u32.to_le_bytes());
        message[ppi + 8..ppi + 12].copy_from_slice(&13u32.to_le_bytes());
        assert!(parse(&message).is_err());
        // Message length beyond the bytes.
        let mut long = packet_message(&[1; 20], &[]);
        long[4..8].copy_from_slice(&1000u32.to_le_bytes());
        assert!(parse(&long).is_err());
        // Data offset that overflows.
        let mut overflow = packet_message(&[1; 20], &[]);
        overflow[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(parse(&overflow).is_err());
    }

    #[test]
    fn query_completion_information_buffer_is_bounds_checked() {
        let body = QueryComplete {
            request_id: 9,
            status: status::SUCCESS,
            info_length: 6,
            info_offset: 16,
        };
        let message = build_request(message_type::QUERY_COMPLETE, &body, &[2, 0, 0, 1, 2, 3]);
        let RndisMessage::QueryComplete {
            request_id, info, ..
        } = parse(&message).unwrap()
        else {
            panic!("not a query completion");
        };
        assert_eq!(request_id, 9);
        assert_eq!(info, &[2, 0, 0, 1, 2, 3]);
        let body = QueryComplete {
            info_length: 7,
            ..body
        };
        let message = build_request(message_type::QUERY_COMPLETE, &body, &[0; 6]);
        assert!(parse(&message).is_err());
    }

    #[test]
    fn oid_request_places_the_information_buffer_after_the_body() {
        let message = build_oid_request(3, oid::GEN_CURRENT_PACKET_FILTER, true, &[0xd, 0, 0, 0]);
        assert_eq!(message.len(), 8 + 20 + 4);
        assert_eq!(&message[0..4], &5u32.to_le_bytes());
        assert_eq!(&message[12..16], &0x0001_010eu32.to_le_bytes());
        assert_eq!(&message[16..20], &4u32.to_le_bytes());
        assert_eq!(&message[20..24], &20u32.to_le_bytes());
        assert_eq!(&message[28..32], &0xdu32.to_le_bytes());
    }

    #[test]
    fn status_indication_and_keepalive_parse() {
        let message = build_request(
            message_type::INDICATE_STATUS,
            &IndicateStatus {
                status: status::MEDIA_DISCONNECT,
                buffer_length: 0,
                buffer_offset: 0,
            },
            &[],
        );
        assert_eq!(
            parse(&message).unwrap(),
            RndisMessage::IndicateStatus {
                status: status::MEDIA_DISCONNECT,
                buffer: &[]
            }
        );
        let message = build_request(message_type::KEEPALIVE, &IdRequest { request_id: 77 }, &[]);
        assert_eq!(
            parse(&message).unwrap(),
            RndisMessage::KeepaliveRequest { request_id: 77 }
        );
        let unknown = build_request(0x55, &IdRequest { request_id: 1 }, &[]);
        assert!(matches!(
            parse(&unknown),
            Err(Error::UnexpectedMessage { .. })
        ));
    }

    #[test]
    fn offload_capabilities_decide_the_parameters() {
        let mut offload = NdisOffload::new_zeroed();
        offload.header = NdisObjectHeader {
            object_type: NDIS_OBJECT_TYPE_OFFLOAD,
            revision: 3,
            size: 112,
        };
        offload.checksum.ipv4_tx_encapsulation = ENCAPSULATION_IEEE_802_3;
        offload.checksum.ipv4_tx_flags = 1 << 4 | 1 << 6 | 1 << 8;
        offload.checksum.ipv6_tx_encapsulation = ENCAPSULATION_IEEE_802_3;
        offload.checksum.ipv6_tx_flags = 1 << 4 | 1 << 6;
        offload.checksum.ipv4_rx_flags = 1 << 4 | 1 << 6 | 1 << 8;
        offload.checksum.ipv6_rx_flags = 1 << 4 | 1 << 6;
        offload.lso_v2.ipv4_encapsulation = ENCAPSULATION_IEEE_802_3;
        offload.lso_v2.ipv4_max_offload_size = 0xf53c;
        offload.lso_v2.ipv4_min_segment_count = 2;
        let support = parse_offload_capabilities(offload.as_bytes()).unwrap();
        assert!(support.tx_tcp4 && support.tx_udp4 && support.tx_tcp6 && support.rx);
        assert_eq!(support.lso4_max, 0xf53c);
        assert_eq!(support.lso6_max, 0);
        let parameters = offload_parameters(&support, true);
        assert_eq!(parameters.tcp4_checksum, offload_checksum::TX_RX);
        assert_eq!(parameters.lso_v2_ipv4, offload_lso::ENABLED);
        assert_eq!(parameters.lso_v2_ipv6, offload_lso::DISABLED);
        assert_eq!(parameters.lso_v1, offload_lso::DISABLED);
        assert_eq!(parameters.as_bytes().len(), 20);
        // A short answer and a wrong object type are errors.
        assert!(parse_offload_capabilities(&offload.as_bytes()[..100]).is_err());
        offload.header.object_type = 0x80;
        assert!(parse_offload_capabilities(offload.as_bytes()).is_err());
    }

    #[test]
    fn lso_value_packs_its_fields() {
        let value = lso_v2_value(1448, 34, false);
        assert_eq!(value & 0xfffff, 1448);
        assert_eq!((value >> 20) & 0x3ff, 34);
        assert_eq!(value >> 30, 1);
        assert_eq!(lso_v2_value(1428, 54, true) >> 31, 1);
    }
}
