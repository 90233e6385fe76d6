//! VMBus channel-management messages: the payloads of SynIC messages on SINT 2 (≤ 240 bytes).
//!
//! Layouts from the fact sheet §2.2 (Linux `hyperv.h`, OpenVMM `vmbus_core::protocol`). Every
//! message is an 8-byte [`MessageHeader`] followed by the body struct declared here; all fields
//! little-endian (the only target is x86_64). Bodies are decoded from untrusted bytes with
//! zerocopy, never by hand-computed offsets.

use crate::guid::Guid;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Largest SynIC message payload (`HV_MESSAGE_PAYLOAD_SIZE`): header plus body.
pub const MAX_MESSAGE_SIZE: usize = 240;
/// SynIC message type of every VMBus message (`HvMessageTypeVmbus` / `HV_MESSAGE_VMBUS`).
pub const HV_MESSAGE_TYPE_VMBUS: u32 = 1;
/// Connection id of the host's message port for clients below 5.0 (and mu_msvm at any version).
pub const MESSAGE_CONNECTION_ID: u32 = 1;
/// Connection id of the host's "multiclient" message port, used from 5.0 on (Linux
/// `VMBUS_MESSAGE_CONNECTION_ID_4`).
pub const MESSAGE_CONNECTION_ID_4: u32 = 4;
/// The SINT VMBus delivers messages and channel events on.
pub const VMBUS_SINT: u8 = 2;

/// A VMBus protocol version, `major << 16 | minor`.
#[repr(transparent)]
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct Version(pub u32);

impl Version {
    /// Windows Server 2012 (2.4): first version with per-SINT event flags.
    pub const WIN8: Version = Version::new(2, 4);
    /// Windows Server 2012 R2 (3.0).
    pub const WIN8_1: Version = Version::new(3, 0);
    /// Windows 10 / Server 2016 (4.0).
    pub const WIN10: Version = Version::new(4, 0);
    /// Windows 10 RS3 (4.1).
    pub const WIN10_RS3_0: Version = Version::new(4, 1);
    /// Windows 10 RS3 update (5.0): messages go to connection id 4 with a message SINT.
    pub const WIN10_RS3_1: Version = Version::new(5, 0);
    /// Windows 10 RS4 (5.1).
    pub const WIN10_RS4: Version = Version::new(5, 1);
    /// Windows Server 2019 (5.2).
    pub const WIN10_RS5: Version = Version::new(5, 2);
    /// Windows Server 2022, "Iron" (5.3).
    pub const IRON: Version = Version::new(5, 3);
    /// "Copper" (6.0): feature flags, 12-byte version response, optional client id.
    pub const COPPER: Version = Version::new(6, 0);

    /// `major.minor`.
    pub const fn new(major: u16, minor: u16) -> Version {
        Version((major as u32) << 16 | minor as u32)
    }

    /// The major number.
    pub const fn major(self) -> u16 {
        (self.0 >> 16) as u16
    }

    /// The minor number.
    pub const fn minor(self) -> u16 {
        self.0 as u16
    }
}

impl core::fmt::Display for Version {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{}.{}", self.major(), self.minor())
    }
}

/// The message type in a [`MessageHeader`].
#[repr(transparent)]
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct MessageType(pub u32);

impl MessageType {
    /// Host → guest: a channel exists ([`OfferChannel`]).
    pub const OFFER_CHANNEL: MessageType = MessageType(1);
    /// Host → guest: a channel is gone ([`RescindChannelOffer`]).
    pub const RESCIND_CHANNEL_OFFER: MessageType = MessageType(2);
    /// Guest → host: send me all offers (header only).
    pub const REQUEST_OFFERS: MessageType = MessageType(3);
    /// Host → guest: the initial offers are complete (header only).
    pub const ALL_OFFERS_DELIVERED: MessageType = MessageType(4);
    /// Guest → host: open a channel ([`OpenChannel`]).
    pub const OPEN_CHANNEL: MessageType = MessageType(5);
    /// Host → guest: [`OpenResult`].
    pub const OPEN_CHANNEL_RESULT: MessageType = MessageType(6);
    /// Guest → host: [`CloseChannel`], no reply.
    pub const CLOSE_CHANNEL: MessageType = MessageType(7);
    /// Guest → host: first part of a GPADL ([`GpadlHeader`] + range data).
    pub const GPADL_HEADER: MessageType = MessageType(8);
    /// Guest → host: further PFNs of a GPADL ([`GpadlBody`] + PFNs).
    pub const GPADL_BODY: MessageType = MessageType(9);
    /// Host → guest: [`GpadlCreated`].
    pub const GPADL_CREATED: MessageType = MessageType(10);
    /// Guest → host: [`GpadlTeardown`].
    pub const GPADL_TEARDOWN: MessageType = MessageType(11);
    /// Host → guest: [`GpadlTorndown`].
    pub const GPADL_TORNDOWN: MessageType = MessageType(12);
    /// Guest → host: a rescinded relid may be reused ([`RelIdReleased`]).
    pub const RELID_RELEASED: MessageType = MessageType(13);
    /// Guest → host: [`InitiateContact`] (or [`InitiateContact2`]).
    pub const INITIATE_CONTACT: MessageType = MessageType(14);
    /// Host → guest: [`VersionResponse`] (or [`VersionResponse2`] for Copper).
    pub const VERSION_RESPONSE: MessageType = MessageType(15);
    /// Guest → host: disconnect (header only).
    pub const UNLOAD: MessageType = MessageType(16);
    /// Host → guest: disconnect done (header only).
    pub const UNLOAD_RESPONSE: MessageType = MessageType(17);
}

/// The 8 bytes in front of every message body.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Debug, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct MessageHeader {
    /// What the body is.
    pub message_type: MessageType,
    /// Zero.
    pub padding: u32,
}

/// A message body with a fixed type: lets [`encode_message`] write the header.
pub trait VmbusMessage: IntoBytes + FromBytes + Immutable + KnownLayout + Sized {
    /// The header's message type for this body.
    const MESSAGE_TYPE: MessageType;
}

/// `InitiateContact.interrupt_page_or_target_info` from 5.0 on: where the host sends messages.
#[repr(C)]
#[derive(
    Clone, Copy, PartialEq, Eq, Debug, Default, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
pub struct TargetInfo {
    /// SINT for host → guest messages (2).
    pub sint: u8,
    /// VTL for host → guest messages (0).
    pub vtl: u8,
    /// Zero.
    pub padding: u16,
    /// Copper feature flags the guest asks for ([`feature_flags`]).
    pub feature_flags: u32,
}

/// Copper feature-flag bits (`InitiateContact` target info, `VersionResponse2`).
pub mod feature_flags {
    /// The guest chooses the connection id and event flag in OPENCHANNEL (OpenChannel2).
    pub const GUEST_SPECIFIED_SIGNAL_PARAMETERS: u32 = 1 << 0;
    /// OPENCHANNEL flags may redirect the channel interrupt.
    pub const CHANNEL_INTERRUPT_REDIRECTION: u32 = 1 << 1;
    /// MODIFY_CONNECTION messages are supported.
    pub const MODIFY_CONNECTION: u32 = 1 << 2;
    /// INITIATE_CONTACT carries a client id ([`super::InitiateContact2`]).
    pub const CLIENT_ID: u32 = 1 << 3;
}

/// INITIATE_CONTACT body (32 bytes; 40 with the header).
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Debug, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct InitiateContact {
    /// The version asked for ([`Version`]).
    pub version_requested: u32,
    /// VP index the host sends messages to.
    pub target_message_vp: u32,
    /// Below 2.4 the interrupt page GPA; from 5.0 a [`TargetInfo`]; otherwise zero.
    pub interrupt_page_or_target_info: u64,
    /// Parent → child monitor page GPA (0 = none; both or neither).
    pub parent_to_child_monitor_page_gpa: u64,
    /// Child → parent monitor page GPA (0 = none).
    pub child_to_parent_monitor_page_gpa: u64,
}

/// INITIATE_CONTACT body with the Copper client id (48 bytes), sent only with
/// [`feature_flags::CLIENT_ID`].
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Debug, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct InitiateContact2 {
    /// The base message.
    pub initiate_contact: InitiateContact,
    /// Identifies the client implementation to the host.
    pub client_id: Guid,
}

/// `VersionResponse.connection_state` value for success.
pub const CONNECTION_STATE_SUCCESSFUL: u8 = 0;

/// VERSION_RESPONSE body (8 bytes; 16 with the header).
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Debug, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct VersionResponse {
    /// Non-zero when the requested version is accepted.
    pub version_supported: u8,
    /// 0 ok, 1 low resources, 2 failure (2.4 and later).
    pub connection_state: u8,
    /// Zero.
    pub padding: u16,
    /// From 5.0 on, the connection id to post further messages to.
    pub selected_version_or_connection_id: u32,
}

/// Copper VERSION_RESPONSE body (12 bytes): sent when 6.0 was asked for and accepted.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Debug, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct VersionResponse2 {
    /// The base message.
    pub version_response: VersionResponse,
    /// Feature flags the host grants ([`feature_flags`]).
    pub supported_features: u32,
}

/// Bytes of user-defined data in offers and OPENCHANNEL.
pub const USER_DEFINED_DATA_SIZE: usize = 120;

/// OFFERCHANNEL body (188 bytes; 196 with the header).
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Debug, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct OfferChannel {
    /// Device class (e.g. [`crate::guid::interface::NETWORK`]).
    pub interface_id: Guid,
    /// This device instance.
    pub instance_id: Guid,
    /// Reserved.
    pub reserved: [u32; 4],
    /// Offer flags.
    pub flags: u16,
    /// MMIO space the device wants (vPCI).
    pub mmio_megabytes: u16,
    /// Device-specific data.
    pub user_defined: [u8; USER_DEFINED_DATA_SIZE],
    /// 0 for the primary channel, n for subchannel n.
    pub subchannel_index: u16,
    /// Optional MMIO space.
    pub mmio_megabytes_optional: u16,
    /// The relid: names the channel in every later message and its event-flag bit.
    pub child_relid: u32,
    /// Monitor id (unused: we allocate no monitor pages).
    pub monitor_id: u8,
    /// Bit 0: monitor allocated.
    pub monitor_allocated: u8,
    /// Bit 0: the channel has a dedicated interrupt.
    pub is_dedicated_interrupt: u16,
    /// Connection id to signal (HvSignalEvent) for this channel.
    pub connection_id: u32,
}

/// RESCIND_CHANNELOFFER body.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Debug, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct RescindChannelOffer {
    /// The channel that is gone.
    pub child_relid: u32,
}

/// Empty body: REQUESTOFFERS.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Debug, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct RequestOffers {}

/// Empty body: ALLOFFERS_DELIVERED.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Debug, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct AllOffersDelivered {}

/// Empty body: UNLOAD.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Debug, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct Unload {}

/// Empty body: UNLOAD_RESPONSE.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Debug, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct UnloadResponse {}

/// OPENCHANNEL body (140 bytes; 148 with the header).
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Debug, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct OpenChannel {
    /// The channel.
    pub child_relid: u32,
    /// Echoed in the result (we use the relid, as Linux does).
    pub open_id: u32,
    /// GPADL of both rings.
    pub ring_buffer_gpadl: u32,
    /// VP to interrupt for this channel.
    pub target_vp: u32,
    /// Pages from the GPADL start to the host → guest ring (the guest → host ring incl. its
    /// control page).
    pub downstream_ring_buffer_page_offset: u32,
    /// Device-specific data (zero for netvsc).
    pub user_data: [u8; USER_DEFINED_DATA_SIZE],
}

/// Copper OPENCHANNEL body with guest-chosen signal parameters (148 bytes).
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Debug, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct OpenChannel2 {
    /// The base message.
    pub open_channel: OpenChannel,
    /// Connection id to signal (with [`feature_flags::GUEST_SPECIFIED_SIGNAL_PARAMETERS`]).
    pub connection_id: u32,
    /// Event flag the host sets for us.
    pub event_flag: u16,
    /// Bit 0: redirect interrupt.
    pub flags: u16,
}

/// OPENCHANNEL_RESULT body.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Debug, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct OpenResult {
    /// The channel.
    pub child_relid: u32,
    /// The open id we sent.
    pub open_id: u32,
    /// 0 = opened.
    pub status: u32,
}

/// CLOSECHANNEL body (no reply).
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Debug, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct CloseChannel {
    /// The channel.
    pub child_relid: u32,
}

/// RELID_RELEASED body.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Debug, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct RelIdReleased {
    /// The rescinded channel.
    pub child_relid: u32,
}

/// GPADL_HEADER body (12 bytes), followed by `range_buflen` bytes of range data: for each
/// range a [`GpaRange`] and its PFNs; the PFNs that do not fit follow in GPADL_BODY messages.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Debug, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct GpadlHeader {
    /// The channel the GPADL belongs to.
    pub child_relid: u32,
    /// Guest-chosen GPADL id.
    pub gpadl: u32,
    /// Bytes of range data in total (header part and all bodies).
    pub range_buflen: u16,
    /// Number of ranges (we always send 1).
    pub range_count: u16,
}

/// One range of a GPADL or a GPA-direct packet: its PFNs follow it.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Debug, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct GpaRange {
    /// Length in bytes.
    pub byte_count: u32,
    /// Offset of the first byte in the first page.
    pub byte_offset: u32,
}

/// GPADL_BODY body (8 bytes), followed by PFNs (u64 each).
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Debug, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct GpadlBody {
    /// Sequence number (informational; hosts ignore it).
    pub message_number: u32,
    /// The GPADL the PFNs extend.
    pub gpadl: u32,
}

/// GPADL_CREATED body.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Debug, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct GpadlCreated {
    /// The channel.
    pub child_relid: u32,
    /// The GPADL.
    pub gpadl: u32,
    /// 0 = created.
    pub creation_status: u32,
}

/// GPADL_TEARDOWN body.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Debug, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct GpadlTeardown {
    /// The channel.
    pub child_relid: u32,
    /// The GPADL.
    pub gpadl: u32,
}

/// GPADL_TORNDOWN body.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Debug, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct GpadlTorndown {
    /// The GPADL.
    pub gpadl: u32,
}

/// PFNs that fit in a GPADL_HEADER message with one range.
pub const GPADL_HEADER_MAX_PFNS: usize = (MAX_MESSAGE_SIZE
    - size_of::<MessageHeader>()
    - size_of::<GpadlHeader>()
    - size_of::<GpaRange>())
    / 8;
/// PFNs that fit in one GPADL_BODY message.
pub const GPADL_BODY_MAX_PFNS: usize =
    (MAX_MESSAGE_SIZE - size_of::<MessageHeader>() - size_of::<GpadlBody>()) / 8;

macro_rules! message_types {
    ($($body:ty => $message_type:ident),* $(,)?) => {
        $(impl VmbusMessage for $body {
            const MESSAGE_TYPE: MessageType = MessageType::$message_type;
        })*
    };
}

message_types! {
    OfferChannel => OFFER_CHANNEL,
    RescindChannelOffer => RESCIND_CHANNEL_OFFER,
    RequestOffers => REQUEST_OFFERS,
    AllOffersDelivered => ALL_OFFERS_DELIVERED,
    OpenChannel => OPEN_CHANNEL,
    OpenChannel2 => OPEN_CHANNEL,
    OpenResult => OPEN_CHANNEL_RESULT,
    CloseChannel => CLOSE_CHANNEL,
    GpadlHeader => GPADL_HEADER,
    GpadlBody => GPADL_BODY,
    GpadlCreated => GPADL_CREATED,
    GpadlTeardown => GPADL_TEARDOWN,
    GpadlTorndown => GPADL_TORNDOWN,
    RelIdReleased => RELID_RELEASED,
    InitiateContact => INITIATE_CONTACT,
    InitiateContact2 => INITIATE_CONTACT,
    VersionResponse => VERSION_RESPONSE,
    VersionResponse2 => VERSION_RESPONSE,
    Unload => UNLOAD,
    UnloadResponse => UNLOAD_RESPONSE,
}

// Sizes from the fact sheet §2.2 (with the 8-byte header: 40, 16, 20, 196, 148, ...).
const _: () = {
    assert!(size_of::<MessageHeader>() == 8);
    assert!(size_of::<TargetInfo>() == 8);
    assert!(size_of::<InitiateContact>() == 32);
    assert!(size_of::<InitiateContact2>() == 48);
    assert!(size_of::<VersionResponse>() == 8);
    assert!(size_of::<VersionResponse2>() == 12);
    assert!(size_of::<OfferChannel>() == 188);
    assert!(size_of::<RescindChannelOffer>() == 4);
    assert!(size_of::<RequestOffers>() == 0);
    assert!(size_of::<OpenChannel>() == 140);
    assert!(size_of::<OpenChannel2>() == 148);
    assert!(size_of::<OpenResult>() == 12);
    assert!(size_of::<CloseChannel>() == 4);
    assert!(size_of::<RelIdReleased>() == 4);
    assert!(size_of::<GpadlHeader>() == 12);
    assert!(size_of::<GpaRange>() == 8);
    assert!(size_of::<GpadlBody>() == 8);
    assert!(size_of::<GpadlCreated>() == 12);
    assert!(size_of::<GpadlTeardown>() == 8);
    assert!(size_of::<GpadlTorndown>() == 4);
    assert!(GPADL_HEADER_MAX_PFNS == 26);
    assert!(GPADL_BODY_MAX_PFNS == 28);
};

/// An encoded message: header + body (+ trailing data), at most [`MAX_MESSAGE_SIZE`] bytes.
#[derive(Clone)]
pub struct EncodedMessage {
    bytes: [u8; MAX_MESSAGE_SIZE],
    len: usize,
}

impl EncodedMessage {
    /// The bytes to post.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

impl core::fmt::Debug for EncodedMessage {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("EncodedMessage")
            .field("bytes", &self.as_bytes())
            .finish()
    }
}

/// Header + `body`. Every body type fits, so this cannot fail.
pub fn encode_message<M: VmbusMessage>(body: &M) -> EncodedMessage {
    encode_message_with_data(body, &[]).expect("every fixed body fits in a SynIC message")
}

/// Header + `body` + `data` (GPADL range data / PFNs); `None` when it exceeds 240 bytes.
pub fn encode_message_with_data<M: VmbusMessage>(body: &M, data: &[u8]) -> Option<EncodedMessage> {
    let header = MessageHeader {
        message_type: M::MESSAGE_TYPE,
        padding: 0,
    };
    let mut message = EncodedMessage {
        bytes: [0; MAX_MESSAGE_SIZE],
        len: 0,
    };
    for part in [header.as_bytes(), body.as_bytes(), data] {
        let end = message.len.checked_add(part.len())?;
        message
            .bytes
            .get_mut(message.len..end)?
            .copy_from_slice(part);
        message.len = end;
    }
    Some(message)
}

/// Splits a received message into its type and body bytes; `None` when shorter than a header.
pub fn split_header(message: &[u8]) -> Option<(MessageType, &[u8])> {
    let (header, body) = MessageHeader::read_from_prefix(message).ok()?;
    Some((header.message_type, body))
}

/// Reads a fixed-size body from the front of `body` (extra bytes after it are allowed, as
/// hosts may pad); `None` when too short.
pub fn read_body<M: VmbusMessage>(body: &[u8]) -> Option<M> {
    M::read_from_prefix(body).ok().map(|(message, _)| message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn initiate_contact_encodes_at_the_documented_offsets() {
        let target = TargetInfo {
            sint: VMBUS_SINT,
            vtl: 0,
            padding: 0,
            feature_flags: 0,
        };
        let message = encode_message(&InitiateContact {
            version_requested: Version::COPPER.0,
            target_message_vp: 3,
            interrupt_page_or_target_info: u64::from_le_bytes(
                target.as_bytes().try_into().unwrap(),
            ),
            parent_to_child_monitor_page_gpa: 0,
            child_to_parent_monitor_page_gpa: 0,
        });
        let bytes = message.as_bytes();
        assert_eq!(bytes.len(), 40);
        assert_eq!(&bytes[0..4], &14u32.to_le_bytes());
        assert_eq!(&bytes[8..12], &0x0006_0000u32.to_le_bytes());
        assert_eq!(&bytes[12..16], &3u32.to_le_bytes());
        assert_eq!(bytes[16], 2, "msg_sint at +16");
    }

    #[test]
    fn offer_fields_sit_at_the_documented_offsets() {
        let mut raw = [0u8; 196];
        raw[0] = 1;
        raw[8..24].copy_from_slice(crate::guid::interface::NETWORK.as_bytes());
        raw[184..188].copy_from_slice(&7u32.to_le_bytes());
        raw[192..196].copy_from_slice(&0x2007u32.to_le_bytes());
        let (message_type, body) = split_header(&raw).unwrap();
        assert_eq!(message_type, MessageType::OFFER_CHANNEL);
        let offer: OfferChannel = read_body(body).unwrap();
        assert_eq!(offer.interface_id, crate::guid::interface::NETWORK);
        assert_eq!(offer.child_relid, 7);
        assert_eq!(offer.connection_id, 0x2007);
        assert!(
            read_body::<OfferChannel>(&body[..187]).is_none(),
            "short offer rejected"
        );
    }

    #[test]
    fn oversized_data_is_refused_not_truncated() {
        let header = GpadlHeader {
            child_relid: 1,
            gpadl: 2,
            range_buflen: 0,
            range_count: 1,
        };
        assert!(encode_message_with_data(&header, &[0; 220]).is_some());
        assert!(encode_message_with_data(&header, &[0; 221]).is_none());
        assert!(split_header(&[1, 0, 0]).is_none());
    }
}
