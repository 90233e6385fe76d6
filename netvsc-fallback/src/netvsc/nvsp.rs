//! NVSP, the netvsc control protocol: message layouts, versions and capability bits.
//!
//! Every NVSP message is a `u32` message type followed by a body, carried in VMBus in-band
//! packets (requests) or completion packets (answers). Layouts follow the reference sheet
//! (`hyperv-vmbus-netvsc.md` §3) and what OpenVMM's netvsp expects (`NETVSP.md` §2); all
//! structures are little-endian and packed without padding (asserted below).

use bitflags::bitflags;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::error::{Error, Layer};

/// Bytes of every NVSP message we send: the 6.1 message size, which Linux uses for every
/// version and older hosts accept (they read only the fields they know).
pub const MESSAGE_SIZE: usize = 40;

/// An NVSP protocol version, `major << 16 | minor`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NvspVersion(pub u32);

impl NvspVersion {
    /// NVSP 1 (`0x2`): never negotiated by this driver (no NDIS configuration message).
    pub const V1: NvspVersion = NvspVersion(0x0000_0002);
    /// NVSP 2 (`0x30002`): adds SEND_NDIS_CONFIG.
    pub const V2: NvspVersion = NvspVersion(0x0003_0002);
    /// NVSP 4: adds VF association and data-path switching.
    pub const V4: NvspVersion = NvspVersion(0x0004_0000);
    /// NVSP 5: adds subchannels, indirection tables, UDP checksum offload, NDIS 6.30.
    pub const V5: NvspVersion = NvspVersion(0x0005_0000);
    /// NVSP 6.
    pub const V6: NvspVersion = NvspVersion(0x0006_0000);
    /// NVSP 6.1: 40-byte messages, receive coalescing.
    pub const V61: NvspVersion = NvspVersion(0x0006_0001);

    /// The versions this driver offers, highest first, each tried on its own (min = max), as
    /// Linux, FreeBSD and DPDK do; netvsp accepts only exact matches.
    pub const NEGOTIATION_ORDER: [NvspVersion; 5] = [
        NvspVersion::V61,
        NvspVersion::V6,
        NvspVersion::V5,
        NvspVersion::V4,
        NvspVersion::V2,
    ];
}

impl core::fmt::Display for NvspVersion {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{}.{}", self.0 >> 16, self.0 & 0xffff)
    }
}

/// NVSP message types (`hyperv-vmbus-netvsc.md` §3.1).
pub mod message_type {
    /// Guest → host: version negotiation.
    pub const INIT: u32 = 1;
    /// Host → guest: answer to INIT.
    pub const INIT_COMPLETE: u32 = 2;
    /// Guest → host: NDIS version the guest speaks.
    pub const SEND_NDIS_VERSION: u32 = 100;
    /// Guest → host: the receive buffer GPADL.
    pub const SEND_RECEIVE_BUFFER: u32 = 101;
    /// Host → guest: receive buffer accepted, with its sub-allocation layout.
    pub const SEND_RECEIVE_BUFFER_COMPLETE: u32 = 102;
    /// Guest → host: revoke the receive buffer.
    pub const REVOKE_RECEIVE_BUFFER: u32 = 103;
    /// Guest → host: the send buffer GPADL.
    pub const SEND_SEND_BUFFER: u32 = 104;
    /// Host → guest: send buffer accepted, with its section size.
    pub const SEND_SEND_BUFFER_COMPLETE: u32 = 105;
    /// Guest → host: revoke the send buffer.
    pub const REVOKE_SEND_BUFFER: u32 = 106;
    /// Either way: one or more RNDIS messages.
    pub const SEND_RNDIS_PACKET: u32 = 107;
    /// Either way: completion of SEND_RNDIS_PACKET.
    pub const SEND_RNDIS_PACKET_COMPLETE: u32 = 108;
    /// Guest → host (v2+): MTU and capabilities.
    pub const SEND_NDIS_CONFIG: u32 = 125;
    /// Host → guest (v4+): a VF was allocated or removed.
    pub const SEND_VF_ASSOCIATION: u32 = 128;
    /// Either way (v4+): which data path (synthetic or VF) carries traffic.
    pub const SWITCH_DATA_PATH: u32 = 129;
    /// Guest → host (v5+): extended OID query (netvsp answers "not supported").
    pub const OID_QUERY_EX: u32 = 131;
    /// Host → guest (v5+): answer to OID_QUERY_EX.
    pub const OID_QUERY_EX_COMPLETE: u32 = 132;
    /// Either way (v5+): subchannel allocation request and its answer.
    pub const SUBCHANNEL: u32 = 133;
    /// Host → guest (v5+): the send indirection table.
    pub const SEND_INDIRECTION_TABLE: u32 = 134;
}

/// NVSP status values in completions.
pub mod status {
    /// No status (netvsp's answer to an unsupported INIT version).
    pub const NONE: u32 = 0;
    /// Success.
    pub const SUCCESS: u32 = 1;
    /// Failure.
    pub const FAILURE: u32 = 2;
}

/// `channel_type` of SEND_RNDIS_PACKET: a data frame.
pub const CHANNEL_TYPE_DATA: u32 = 0;
/// `channel_type` of SEND_RNDIS_PACKET: an RNDIS control message.
pub const CHANNEL_TYPE_CONTROL: u32 = 1;
/// `send_buffer_section_index` meaning "not in the send buffer" (GPA-direct).
pub const NO_SEND_BUFFER_SECTION: u32 = 0xffff_ffff;
/// Number of entries of the send indirection table (Linux requires exactly this many).
pub const INDIRECTION_TABLE_ENTRIES: usize = 16;

bitflags! {
    /// Capability bits of SEND_NDIS_CONFIG.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct NdisConfigCapabilities: u64 {
        /// VM queues.
        const VMQ = 1 << 0;
        /// TCP chimney (obsolete).
        const CHIMNEY = 1 << 1;
        /// SR-IOV: the host announces VFs (SEND_VF_ASSOCIATION) only when this is set.
        const SRIOV = 1 << 2;
        /// IEEE 802.1Q tags through the VLAN per-packet info.
        const IEEE_8021Q = 1 << 3;
        /// Correlation ids.
        const CORRELATION_ID = 1 << 4;
        /// Teaming: needed to receive link-speed updates (Linux sets it at v5+).
        const TEAMING = 1 << 5;
        /// Virtual subnet ids.
        const VIRTUAL_SUBNET_ID = 1 << 6;
        /// Receive segment coalescing over VMBus (v6.1).
        const RSC_OVER_VMBUS = 1 << 7;
    }
}

impl NdisConfigCapabilities {
    /// What we announce at `version`: what Linux sets per version (802.1Q always; SR-IOV and
    /// teaming from v5), plus SR-IOV already at v4, the first version with VF association, so
    /// that the VF path works on every version that can carry it. RSC stays off: the driver
    /// does not reassemble coalesced fragments.
    pub fn for_version(version: NvspVersion) -> Self {
        let mut capabilities = NdisConfigCapabilities::IEEE_8021Q;
        if version >= NvspVersion::V4 {
            capabilities |= NdisConfigCapabilities::SRIOV;
        }
        if version >= NvspVersion::V5 {
            capabilities |= NdisConfigCapabilities::TEAMING;
        }
        capabilities
    }
}

/// The type word that starts every NVSP message.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct MessageHeader {
    /// One of [`message_type`].
    pub message_type: u32,
}

/// INIT: offer one protocol version (min = max).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct Init {
    /// Lowest acceptable version.
    pub min_version: u32,
    /// Highest acceptable version.
    pub max_version: u32,
}

/// INIT_COMPLETE.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct InitComplete {
    /// Negotiated version on old hosts; no longer meaningful.
    pub deprecated: u32,
    /// Longest MDL chain the host takes.
    pub max_mdl_chain_length: u32,
    /// [`status::SUCCESS`] when the offered version is accepted.
    pub status: u32,
}

/// SEND_NDIS_VERSION.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct SendNdisVersion {
    /// NDIS major version (6).
    pub major: u32,
    /// NDIS minor version (1 below NVSP 5, 30 from NVSP 5).
    pub minor: u32,
}

/// SEND_NDIS_CONFIG (v2+).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct SendNdisConfig {
    /// Largest frame including the Ethernet header (1514 for a 1500-byte MTU).
    pub mtu: u32,
    /// Zero.
    pub reserved: u32,
    /// [`NdisConfigCapabilities`] bits.
    pub capabilities: u64,
}

/// SEND_RECEIVE_BUFFER and SEND_SEND_BUFFER: hand a GPADL to the host.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct SendBuffer {
    /// The buffer's GPADL id.
    pub gpadl: u32,
    /// Our id for the buffer; the host echoes the receive buffer's as `xfer_pageset_id`.
    pub id: u16,
    /// Zero.
    pub reserved: u16,
}

/// One section of the receive buffer as the host carves it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct ReceiveBufferSection {
    /// Start of the section in the buffer (must be 0).
    pub offset: u32,
    /// Bytes per sub-allocation.
    pub sub_allocation_size: u32,
    /// Number of sub-allocations.
    pub sub_allocation_count: u32,
    /// End of the section in the buffer.
    pub end_offset: u32,
}

/// SEND_RECEIVE_BUFFER_COMPLETE.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct ReceiveBufferComplete {
    /// [`status::SUCCESS`] when accepted.
    pub status: u32,
    /// Number of sections (every host sends exactly 1).
    pub section_count: u32,
    /// The first (only) section.
    pub section: ReceiveBufferSection,
}

/// SEND_SEND_BUFFER_COMPLETE.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct SendBufferComplete {
    /// [`status::SUCCESS`] when accepted.
    pub status: u32,
    /// Bytes per send-buffer section (netvsp and Linux: 6144).
    pub section_size: u32,
}

/// SEND_RNDIS_PACKET: RNDIS message(s) in a send-buffer section, GPA ranges or (host → guest)
/// transfer-page ranges.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct SendRndisPacket {
    /// [`CHANNEL_TYPE_DATA`] or [`CHANNEL_TYPE_CONTROL`].
    pub channel_type: u32,
    /// Send-buffer section holding the message, or [`NO_SEND_BUFFER_SECTION`].
    pub send_buffer_section_index: u32,
    /// Bytes used in that section (0 without one).
    pub send_buffer_section_size: u32,
}

/// SEND_RNDIS_PACKET_COMPLETE.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct SendRndisPacketComplete {
    /// [`status::SUCCESS`] when the packet was taken.
    pub status: u32,
}

/// SEND_VF_ASSOCIATION (v4+, host → guest).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct VfAssociation {
    /// Non-zero when a VF is allocated, zero when it was removed.
    pub allocated: u32,
    /// The VF's vPCI serial number (pairs it with its vPCI channel).
    pub serial_number: u32,
}

/// `active_data_path` of SWITCH_DATA_PATH: the synthetic path.
pub const DATA_PATH_SYNTHETIC: u32 = 0;
/// `active_data_path` of SWITCH_DATA_PATH: the VF.
pub const DATA_PATH_VF: u32 = 1;

/// SWITCH_DATA_PATH (v4+).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct SwitchDataPath {
    /// [`DATA_PATH_SYNTHETIC`] or [`DATA_PATH_VF`].
    pub active_data_path: u32,
}

/// SUBCHANNEL request (v5+): `operation` 1 = allocate `count` subchannels.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct SubchannelRequest {
    /// 1 = allocate.
    pub operation: u32,
    /// Subchannels asked for.
    pub count: u32,
}

/// SUBCHANNEL completion (v5+).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct SubchannelComplete {
    /// [`status::SUCCESS`] when allocated.
    pub status: u32,
    /// Subchannels granted.
    pub count: u32,
}

/// SEND_INDIRECTION_TABLE header (v5+): the table follows at `offset` from the start of the
/// NVSP message.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct IndirectionTableHeader {
    /// Number of u32 entries (16).
    pub entry_count: u32,
    /// Byte offset of the first entry from the start of the NVSP message.
    pub offset: u32,
}

const _: () = {
    assert!(size_of::<MessageHeader>() == 4);
    assert!(size_of::<Init>() == 8);
    assert!(size_of::<InitComplete>() == 12);
    assert!(size_of::<SendNdisVersion>() == 8);
    assert!(size_of::<SendNdisConfig>() == 16);
    assert!(size_of::<SendBuffer>() == 8);
    assert!(size_of::<ReceiveBufferSection>() == 16);
    assert!(size_of::<ReceiveBufferComplete>() == 24);
    assert!(size_of::<SendBufferComplete>() == 8);
    assert!(size_of::<SendRndisPacket>() == 12);
    assert!(size_of::<SendRndisPacketComplete>() == 4);
    assert!(size_of::<VfAssociation>() == 8);
    assert!(size_of::<SwitchDataPath>() == 4);
    assert!(size_of::<SubchannelRequest>() == 8);
    assert!(size_of::<SubchannelComplete>() == 8);
    assert!(size_of::<IndirectionTableHeader>() == 8);
    // The largest body we send (NDIS config) fits the fixed message size.
    assert!(4 + size_of::<ReceiveBufferComplete>() <= MESSAGE_SIZE);
};

/// Builds a [`MESSAGE_SIZE`]-byte NVSP message: the type, then `body`, then zeros.
pub fn encode<T: IntoBytes + Immutable>(message_type: u32, body: &T) -> [u8; MESSAGE_SIZE] {
    let mut message = [0u8; MESSAGE_SIZE];
    message[..4].copy_from_slice(&message_type.to_le_bytes());
    let body = body.as_bytes();
    // Every body type is at most 32 bytes (asserted above for the largest); a longer one is a
    // programming error caught by the tests, and is truncated rather than overflowing.
    let len = body.len().min(MESSAGE_SIZE - 4);
    message[4..4 + len].copy_from_slice(&body[..len]);
    message
}

/// A parsed host → guest NVSP message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NvspMessage {
    /// INIT_COMPLETE.
    InitComplete(InitComplete),
    /// SEND_RECEIVE_BUFFER_COMPLETE.
    ReceiveBufferComplete(ReceiveBufferComplete),
    /// SEND_SEND_BUFFER_COMPLETE.
    SendBufferComplete(SendBufferComplete),
    /// SEND_RNDIS_PACKET (host → guest: in a transfer-page packet).
    RndisPacket(SendRndisPacket),
    /// SEND_RNDIS_PACKET_COMPLETE.
    RndisPacketComplete(SendRndisPacketComplete),
    /// SEND_VF_ASSOCIATION.
    VfAssociation(VfAssociation),
    /// SWITCH_DATA_PATH (the host moved traffic back to the synthetic path).
    SwitchDataPath(SwitchDataPath),
    /// SUBCHANNEL completion.
    SubchannelComplete(SubchannelComplete),
    /// SEND_INDIRECTION_TABLE with its validated entries.
    IndirectionTable([u32; INDIRECTION_TABLE_ENTRIES]),
    /// OID_QUERY_EX_COMPLETE (status only).
    OidQueryExComplete {
        /// NDIS status.
        status: u32,
    },
}

fn body<T: FromBytes>(bytes: &[u8], what: &'static str) -> Result<T, Error> {
    let rest = bytes.get(4..).unwrap_or(&[]);
    T::read_from_prefix(rest)
        .map(|(value, _)| value)
        .map_err(|_| Error::Truncated {
            layer: Layer::Nvsp,
            what,
            len: bytes.len(),
            needed: 4 + size_of::<T>(),
        })
}

/// The message type of an NVSP message, if it has one.
pub fn message_type_of(bytes: &[u8]) -> Result<u32, Error> {
    MessageHeader::read_from_prefix(bytes)
        .map(|(header, _)| header.message_type)
        .map_err(|_| Error::Truncated {
            layer: Layer::Nvsp,
            what: "message header",
            len: bytes.len(),
            needed: 4,
        })
}

/// Parses a host → guest NVSP message from untrusted bytes.
pub fn parse(bytes: &[u8]) -> Result<NvspMessage, Error> {
    use message_type as t;
    let message_type = message_type_of(bytes)?;
    Ok(match message_type {
        t::INIT_COMPLETE => NvspMessage::InitComplete(body(bytes, "INIT_COMPLETE")?),
        t::SEND_RECEIVE_BUFFER_COMPLETE => {
            NvspMessage::ReceiveBufferComplete(body(bytes, "SEND_RECEIVE_BUFFER_COMPLETE")?)
        }
        t::SEND_SEND_BUFFER_COMPLETE => {
            NvspMessage::SendBufferComplete(body(bytes, "SEND_SEND_BUFFER_COMPLETE")?)
        }
        t::SEND_RNDIS_PACKET => NvspMessage::RndisPacket(body(bytes, "SEND_RNDIS_PACKET")?),
        t::SEND_RNDIS_PACKET_COMPLETE => {
            NvspMessage::RndisPacketComplete(body(bytes, "SEND_RNDIS_PACKET_COMPLETE")?)
        }
        t::SEND_VF_ASSOCIATION => NvspMessage::VfAssociation(body(bytes, "SEND_VF_ASSOCIATION")?),
        t::SWITCH_DATA_PATH => NvspMessage::SwitchDataPath(body(bytes, "SWITCH_DATA_PATH")?),
        t::SUBCHANNEL => NvspMessage::SubchannelComplete(body(bytes, "SUBCHANNEL")?),
        t::OID_QUERY_EX_COMPLETE => {
            let complete: SendRndisPacketComplete = body(bytes, "OID_QUERY_EX_COMPLETE")?;
            NvspMessage::OidQueryExComplete {
                status: complete.status,
            }
        }
        t::SEND_INDIRECTION_TABLE => {
            let header: IndirectionTableHeader = body(bytes, "SEND_INDIRECTION_TABLE")?;
            NvspMessage::IndirectionTable(parse_indirection_table(bytes, header)?)
        }
        other => {
            return Err(Error::UnexpectedMessage {
                layer: Layer::Nvsp,
                message_type: other,
            });
        }
    })
}

fn parse_indirection_table(
    bytes: &[u8],
    header: IndirectionTableHeader,
) -> Result<[u32; INDIRECTION_TABLE_ENTRIES], Error> {
    if header.entry_count as usize != INDIRECTION_TABLE_ENTRIES {
        return Err(Error::OutOfRange {
            layer: Layer::Nvsp,
            what: "indirection table entry count",
            value: header.entry_count.into(),
        });
    }
    let start = header.offset as usize;
    let table = start
        .checked_add(INDIRECTION_TABLE_ENTRIES * 4)
        .and_then(|end| bytes.get(start..end))
        .ok_or(Error::OutOfRange {
            layer: Layer::Nvsp,
            what: "indirection table offset",
            value: header.offset.into(),
        })?;
    let mut entries = [0u32; INDIRECTION_TABLE_ENTRIES];
    for (entry, chunk) in entries.iter_mut().zip(table.chunks_exact(4)) {
        *entry = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoded_init_carries_type_and_version_at_their_offsets() {
        let message = encode(
            message_type::INIT,
            &Init {
                min_version: NvspVersion::V61.0,
                max_version: NvspVersion::V61.0,
            },
        );
        assert_eq!(message.len(), 40);
        assert_eq!(&message[0..4], &1u32.to_le_bytes());
        assert_eq!(&message[4..8], &0x60001u32.to_le_bytes());
        assert_eq!(&message[8..12], &0x60001u32.to_le_bytes());
        assert!(message[12..].iter().all(|byte| *byte == 0));
    }

    #[test]
    fn ndis_config_layout_matches_the_wire() {
        let message = encode(
            message_type::SEND_NDIS_CONFIG,
            &SendNdisConfig {
                mtu: 1514,
                reserved: 0,
                capabilities: NdisConfigCapabilities::for_version(NvspVersion::V5).bits(),
            },
        );
        assert_eq!(&message[0..4], &125u32.to_le_bytes());
        assert_eq!(&message[4..8], &1514u32.to_le_bytes());
        // 802.1Q (bit 3) | SR-IOV (bit 2) | teaming (bit 5).
        assert_eq!(&message[12..20], &0x2cu64.to_le_bytes());
    }

    #[test]
    fn capabilities_follow_the_version() {
        let v2 = NdisConfigCapabilities::for_version(NvspVersion::V2);
        assert!(!v2.contains(NdisConfigCapabilities::SRIOV));
        let v4 = NdisConfigCapabilities::for_version(NvspVersion::V4);
        assert!(v4.contains(NdisConfigCapabilities::SRIOV));
        assert!(!v4.contains(NdisConfigCapabilities::TEAMING));
        let v61 = NdisConfigCapabilities::for_version(NvspVersion::V61);
        assert!(v61.contains(NdisConfigCapabilities::SRIOV | NdisConfigCapabilities::TEAMING));
        assert!(!v61.contains(NdisConfigCapabilities::RSC_OVER_VMBUS));
    }

    #[test]
    fn receive_buffer_complete_parses_its_section() {
        let mut bytes = [0u8; 28];
        bytes[0..4].copy_from_slice(&102u32.to_le_bytes());
        bytes[4..8].copy_from_slice(&1u32.to_le_bytes());
        bytes[8..12].copy_from_slice(&1u32.to_le_bytes());
        bytes[16..20].copy_from_slice(&1806u32.to_le_bytes());
        bytes[20..24].copy_from_slice(&580u32.to_le_bytes());
        bytes[24..28].copy_from_slice(&(1806u32 * 580).to_le_bytes());
        let NvspMessage::ReceiveBufferComplete(complete) = parse(&bytes).unwrap() else {
            panic!("wrong message kind");
        };
        assert_eq!(complete.status, status::SUCCESS);
        assert_eq!(complete.section.sub_allocation_size, 1806);
        assert_eq!(complete.section.sub_allocation_count, 580);
    }

    #[test]
    fn truncated_and_unknown_messages_are_errors() {
        assert!(matches!(
            parse(&[2, 0]),
            Err(Error::Truncated { needed: 4, .. })
        ));
        // INIT_COMPLETE with only 8 of its 12 body bytes.
        let mut short = [0u8; 12];
        short[0] = 2;
        assert!(matches!(
            parse(&short),
            Err(Error::Truncated { needed: 16, .. })
        ));
        assert!(matches!(
            parse(&[0xee, 0, 0, 0, 0, 0, 0, 0]),
            Err(Error::UnexpectedMessage {
                message_type: 0xee,
                ..
            })
        ));
    }

    #[test]
    fn indirection_table_is_bounds_checked() {
        let mut bytes = vec![0u8; 12 + 64];
        bytes[0..4].copy_from_slice(&134u32.to_le_bytes());
        bytes[4..8].copy_from_slice(&16u32.to_le_bytes());
        bytes[8..12].copy_from_slice(&12u32.to_le_bytes());
        for entry in 0..16u32 {
            let at = 12 + entry as usize * 4;
            bytes[at..at + 4].copy_from_slice(&(entry % 2).to_le_bytes());
        }
        let NvspMessage::IndirectionTable(table) = parse(&bytes).unwrap() else {
            panic!("wrong message kind");
        };
        assert_eq!(table[1], 1);
        assert_eq!(table[2], 0);
        // An offset that puts the table past the end of the message.
        bytes[8..12].copy_from_slice(&16u32.to_le_bytes());
        assert!(matches!(parse(&bytes), Err(Error::OutOfRange { .. })));
        // An offset that overflows.
        bytes[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(parse(&bytes).is_err());
        // A count other than 16.
        bytes[4..8].copy_from_slice(&17u32.to_le_bytes());
        bytes[8..12].copy_from_slice(&12u32.to_le_bytes());
        assert!(parse(&bytes).is_err());
    }

    #[test]
    fn versions_print_and_order() {
        assert_eq!(NvspVersion::V61.to_string(), "6.1");
        assert_eq!(NvspVersion::V2.to_string(), "3.2");
        let order = NvspVersion::NEGOTIATION_ORDER;
        assert!(order.windows(2).all(|pair| pair[0] > pair[1]));
    }
}
