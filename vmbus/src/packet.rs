//! Ring packet framing: descriptors, transfer-page and GPA-direct headers, outgoing packets and
//! bounds-checked parsing of incoming ones (fact sheet §2.4, OpenVMM `vmbus_ring`).

use crate::error::PacketError;
use crate::protocol::GpaRange;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Packet type: data in the ring.
pub const PACKET_TYPE_IN_BAND: u16 = 0x6;
/// Packet type: data in a transfer-page set (netvsc receive buffer).
pub const PACKET_TYPE_TRANSFER_PAGES: u16 = 0x7;
/// Packet type: data in guest pages named by GPA ranges.
pub const PACKET_TYPE_GPA_DIRECT: u16 = 0x9;
/// Packet type: completion of a request (echoes its transaction id).
pub const PACKET_TYPE_COMPLETION: u16 = 0xb;
/// Descriptor flag: the sender wants a completion.
pub const FLAG_COMPLETION_REQUESTED: u16 = 1;

/// The 16-byte header of every ring packet.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Debug, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct PacketDescriptor {
    /// One of the `PACKET_TYPE_*` values.
    pub packet_type: u16,
    /// Header length (descriptor + type header) in 8-byte units.
    pub data_offset8: u16,
    /// Packet length without trailer in 8-byte units.
    pub length8: u16,
    /// [`FLAG_COMPLETION_REQUESTED`] or 0.
    pub flags: u16,
    /// Matches requests to completions.
    pub transaction_id: u64,
}

/// Header after the descriptor of a transfer-page packet; `range_count` ranges follow.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Debug, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct TransferPageHeader {
    /// Which transfer-page set (netvsc: the receive buffer's id).
    pub transfer_page_set_id: u16,
    /// Sender-owns-set byte and a reserved byte (may hold garbage).
    pub reserved: u16,
    /// Number of [`TransferPageRange`]s.
    pub range_count: u32,
}

/// One range of a transfer-page packet: bytes within the transfer-page set.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Debug, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct TransferPageRange {
    /// Length in bytes.
    pub byte_count: u32,
    /// Offset from the start of the set.
    pub byte_offset: u32,
}

/// Header after the descriptor of a GPA-direct packet; ranges ([`GpaRange`] + PFNs) follow.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Debug, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct GpaDirectHeader {
    /// Reserved (may hold garbage).
    pub reserved: u32,
    /// Number of ranges.
    pub range_count: u32,
}

/// The 8 bytes after every packet: its start offset in the upper half (Linux `prev_indices`).
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Debug, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct PacketTrailer {
    /// Zero.
    pub reserved: u32,
    /// Ring offset where the packet starts.
    pub start_offset: u32,
}

const _: () = {
    assert!(size_of::<PacketDescriptor>() == 16);
    assert!(size_of::<TransferPageHeader>() == 8);
    assert!(size_of::<TransferPageRange>() == 8);
    assert!(size_of::<GpaDirectHeader>() == 8);
    assert!(size_of::<PacketTrailer>() == 8);
};

/// One GPA-direct range of an outgoing packet: `byte_count` bytes starting `byte_offset` into
/// the first of `pfns`.
#[derive(Clone, Copy, Debug)]
pub struct GpaDirectRange<'a> {
    /// Length in bytes.
    pub byte_count: u32,
    /// Offset into the first page.
    pub byte_offset: u32,
    /// 4 KiB page numbers.
    pub pfns: &'a [u64],
}

/// What kind of packet to send.
#[derive(Clone, Copy, Debug)]
pub enum OutgoingKind<'a> {
    /// Payload carried in the ring.
    InBand,
    /// A completion; `transaction_id` echoes the request's.
    Completion,
    /// Payload in guest pages (e.g. netvsc send without a send buffer); the host completes it.
    GpaDirect(&'a [GpaDirectRange<'a>]),
    /// Payload in a transfer-page set (what a host sends; used by fake hosts in tests).
    TransferPages {
        /// The set id.
        set_id: u16,
        /// Ranges within the set.
        ranges: &'a [TransferPageRange],
    },
}

/// A packet to write into a ring: a header built from `kind`, then `payload` gathered from
/// several slices, zero-padded to 8 bytes.
#[derive(Clone, Copy, Debug)]
pub struct OutgoingPacket<'a> {
    /// Packet type and its type-specific header.
    pub kind: OutgoingKind<'a>,
    /// Transaction id (echoed by the completion).
    pub transaction_id: u64,
    /// Ask the peer for a completion (GPA-direct and transfer-page packets always do).
    pub completion_requested: bool,
    /// Payload pieces, concatenated.
    pub payload: &'a [&'a [u8]],
}

impl<'a> OutgoingPacket<'a> {
    /// An in-band packet.
    pub fn in_band(
        transaction_id: u64,
        completion_requested: bool,
        payload: &'a [&'a [u8]],
    ) -> Self {
        OutgoingPacket {
            kind: OutgoingKind::InBand,
            transaction_id,
            completion_requested,
            payload,
        }
    }

    /// A completion of the request with `transaction_id`.
    pub fn completion(transaction_id: u64, payload: &'a [&'a [u8]]) -> Self {
        OutgoingPacket {
            kind: OutgoingKind::Completion,
            transaction_id,
            completion_requested: false,
            payload,
        }
    }

    /// Total payload bytes.
    pub fn payload_len(&self) -> usize {
        self.payload.iter().map(|piece| piece.len()).sum()
    }

    /// Bytes of descriptor + type header (a multiple of 8).
    pub fn header_len(&self) -> usize {
        let descriptor = size_of::<PacketDescriptor>();
        match self.kind {
            OutgoingKind::InBand | OutgoingKind::Completion => descriptor,
            OutgoingKind::GpaDirect(ranges) => {
                descriptor
                    + size_of::<GpaDirectHeader>()
                    + ranges
                        .iter()
                        .map(|range| size_of::<GpaRange>() + range.pfns.len() * 8)
                        .sum::<usize>()
            }
            OutgoingKind::TransferPages { ranges, .. } => {
                descriptor + size_of::<TransferPageHeader>() + ranges.len() * 8
            }
        }
    }

    /// Packet length without trailer: header + payload rounded up to 8.
    pub fn packet_len(&self) -> usize {
        (self.header_len() + self.payload_len()).next_multiple_of(8)
    }

    /// The descriptor, or `None` when the lengths exceed the 16-bit fields (512 KiB).
    pub fn descriptor(&self) -> Option<PacketDescriptor> {
        let (packet_type, always_completion) = match self.kind {
            OutgoingKind::InBand => (PACKET_TYPE_IN_BAND, false),
            OutgoingKind::Completion => (PACKET_TYPE_COMPLETION, false),
            OutgoingKind::GpaDirect(_) => (PACKET_TYPE_GPA_DIRECT, true),
            OutgoingKind::TransferPages { .. } => (PACKET_TYPE_TRANSFER_PAGES, true),
        };
        let completion = always_completion || self.completion_requested;
        Some(PacketDescriptor {
            packet_type,
            data_offset8: u16::try_from(self.header_len() / 8).ok()?,
            length8: u16::try_from(self.packet_len() / 8).ok()?,
            flags: if completion {
                FLAG_COMPLETION_REQUESTED
            } else {
                0
            },
            transaction_id: self.transaction_id,
        })
    }

    /// Calls `sink` with every byte run of the packet in order (descriptor, type header,
    /// payload, padding), without trailer. `None` when the descriptor cannot encode it.
    pub fn for_each_piece(&self, mut sink: impl FnMut(&[u8])) -> Option<()> {
        let descriptor = self.descriptor()?;
        sink(descriptor.as_bytes());
        match self.kind {
            OutgoingKind::InBand | OutgoingKind::Completion => {}
            OutgoingKind::GpaDirect(ranges) => {
                let header = GpaDirectHeader {
                    reserved: 0,
                    range_count: u32::try_from(ranges.len()).ok()?,
                };
                sink(header.as_bytes());
                for range in ranges {
                    let range_header = GpaRange {
                        byte_count: range.byte_count,
                        byte_offset: range.byte_offset,
                    };
                    sink(range_header.as_bytes());
                    sink(range.pfns.as_bytes());
                }
            }
            OutgoingKind::TransferPages { set_id, ranges } => {
                let header = TransferPageHeader {
                    transfer_page_set_id: set_id,
                    reserved: 0,
                    range_count: u32::try_from(ranges.len()).ok()?,
                };
                sink(header.as_bytes());
                sink(ranges.as_bytes());
            }
        }
        for piece in self.payload {
            sink(piece);
        }
        let padding = self.packet_len() - self.header_len() - self.payload_len();
        sink(&[0u8; 8][..padding]);
        Some(())
    }
}

/// The transfer-page ranges of a received packet, decoded on access (the bytes are unaligned).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct TransferPageRanges<'a> {
    bytes: &'a [u8],
}

impl<'a> TransferPageRanges<'a> {
    /// Number of ranges.
    pub fn len(&self) -> usize {
        self.bytes.len() / size_of::<TransferPageRange>()
    }

    /// True when there are none.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// Range `index`.
    pub fn get(&self, index: usize) -> Option<TransferPageRange> {
        let start = index.checked_mul(size_of::<TransferPageRange>())?;
        TransferPageRange::read_from_prefix(self.bytes.get(start..)?)
            .ok()
            .map(|(range, _)| range)
    }

    /// All ranges in order.
    pub fn iter(&self) -> impl Iterator<Item = TransferPageRange> + 'a {
        let bytes = self.bytes;
        bytes
            .chunks_exact(size_of::<TransferPageRange>())
            .filter_map(|chunk| TransferPageRange::read_from_bytes(chunk).ok())
    }
}

/// What a received packet is.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum IncomingKind<'a> {
    /// Payload in the ring.
    InBand,
    /// Completion of our request `transaction_id`.
    Completion,
    /// Payload in a transfer-page set; complete it with the same transaction id.
    TransferPages {
        /// The set id.
        set_id: u16,
        /// The ranges (count already checked against the header).
        ranges: TransferPageRanges<'a>,
    },
    /// Payload in pages named by the sender (raw range bytes: [`GpaRange`] + PFNs each).
    GpaDirect {
        /// Declared number of ranges (≥ 1).
        range_count: u32,
        /// The range area of the header.
        range_bytes: &'a [u8],
    },
}

/// A received packet, parsed from a private copy of the ring bytes.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct IncomingPacket<'a> {
    /// Type and type-specific header.
    pub kind: IncomingKind<'a>,
    /// Transaction id.
    pub transaction_id: u64,
    /// The sender wants a completion.
    pub completion_requested: bool,
    /// Bytes after the header (padded to 8 by the sender).
    pub payload: &'a [u8],
}

impl<'a> IncomingPacket<'a> {
    /// Parses one packet (descriptor through padding, no trailer). Every length, count and
    /// offset is checked against `bytes`.
    pub fn parse(bytes: &'a [u8]) -> Result<IncomingPacket<'a>, PacketError> {
        let (descriptor, _) =
            PacketDescriptor::read_from_prefix(bytes).map_err(|_| PacketError::Truncated)?;
        let header_len = usize::from(descriptor.data_offset8) * 8;
        let packet_len = usize::from(descriptor.length8) * 8;
        if header_len < size_of::<PacketDescriptor>()
            || header_len > packet_len
            || packet_len > bytes.len()
        {
            return Err(PacketError::Truncated);
        }
        if descriptor.flags & !FLAG_COMPLETION_REQUESTED != 0 {
            return Err(PacketError::UnknownFlags(descriptor.flags));
        }
        let type_header = &bytes[size_of::<PacketDescriptor>()..header_len];
        let kind = match descriptor.packet_type {
            PACKET_TYPE_IN_BAND => IncomingKind::InBand,
            PACKET_TYPE_COMPLETION => IncomingKind::Completion,
            PACKET_TYPE_TRANSFER_PAGES => {
                let (header, ranges) = TransferPageHeader::read_from_prefix(type_header)
                    .map_err(|_| PacketError::Truncated)?;
                let count = header.range_count;
                let ranges_len = usize::try_from(count)
                    .ok()
                    .and_then(|count| count.checked_mul(size_of::<TransferPageRange>()))
                    .filter(|&len| len <= ranges.len())
                    .ok_or(PacketError::TransferPageRanges { count })?;
                IncomingKind::TransferPages {
                    set_id: header.transfer_page_set_id,
                    ranges: TransferPageRanges {
                        bytes: &ranges[..ranges_len],
                    },
                }
            }
            PACKET_TYPE_GPA_DIRECT => {
                let (header, range_bytes) = GpaDirectHeader::read_from_prefix(type_header)
                    .map_err(|_| PacketError::Truncated)?;
                let count = header.range_count;
                let minimum = usize::try_from(count)
                    .ok()
                    .and_then(|count| count.checked_mul(size_of::<GpaRange>()));
                if count == 0 || minimum.is_none_or(|minimum| minimum > range_bytes.len()) {
                    return Err(PacketError::GpaDirectRanges { count });
                }
                IncomingKind::GpaDirect {
                    range_count: count,
                    range_bytes,
                }
            }
            other => return Err(PacketError::UnknownType(other)),
        };
        Ok(IncomingPacket {
            kind,
            transaction_id: descriptor.transaction_id,
            completion_requested: descriptor.flags & FLAG_COMPLETION_REQUESTED != 0,
            payload: &bytes[header_len..packet_len],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec::Vec;

    fn flatten(packet: &OutgoingPacket<'_>) -> Vec<u8> {
        let mut bytes = Vec::new();
        packet
            .for_each_piece(|piece| bytes.extend_from_slice(piece))
            .unwrap();
        bytes
    }

    #[test]
    fn gathered_in_band_packet_round_trips_with_padding() {
        let packet = OutgoingPacket::in_band(42, true, &[b"abc", b"defgh", b"ij"]);
        let bytes = flatten(&packet);
        assert_eq!(bytes.len(), 32, "16 descriptor + 10 payload padded to 16");
        let parsed = IncomingPacket::parse(&bytes).unwrap();
        assert_eq!(parsed.kind, IncomingKind::InBand);
        assert_eq!(parsed.transaction_id, 42);
        assert!(parsed.completion_requested);
        assert_eq!(&parsed.payload[..10], b"abcdefghij");
        assert_eq!(&parsed.payload[10..], &[0; 6]);
    }

    #[test]
    fn transfer_page_packet_round_trips() {
        let ranges = [
            TransferPageRange {
                byte_count: 60,
                byte_offset: 0,
            },
            TransferPageRange {
                byte_count: 1514,
                byte_offset: 4096,
            },
        ];
        let packet = OutgoingPacket {
            kind: OutgoingKind::TransferPages {
                set_id: 0xcafe,
                ranges: &ranges,
            },
            transaction_id: 9,
            completion_requested: false,
            payload: &[&[1, 2, 3, 4, 5, 6, 7, 8]],
        };
        let bytes = flatten(&packet);
        let parsed = IncomingPacket::parse(&bytes).unwrap();
        let IncomingKind::TransferPages {
            set_id,
            ranges: got,
        } = parsed.kind
        else {
            panic!("wrong kind {:?}", parsed.kind);
        };
        assert_eq!(set_id, 0xcafe);
        assert!(
            parsed.completion_requested,
            "transfer-page packets always ask"
        );
        assert_eq!(got.iter().collect::<Vec<_>>(), ranges);
        assert_eq!(got.get(1), Some(ranges[1]));
        assert_eq!(got.get(2), None);
    }

    #[test]
    fn gpa_direct_header_lists_each_range_with_its_pfns() {
        let ranges = [
            GpaDirectRange {
                byte_count: 100,
                byte_offset: 12,
                pfns: &[0x1234],
            },
            GpaDirectRange {
                byte_count: 5000,
                byte_offset: 0,
                pfns: &[0x10, 0x11],
            },
        ];
        let packet = OutgoingPacket {
            kind: OutgoingKind::GpaDirect(&ranges),
            transaction_id: 1,
            completion_requested: true,
            payload: &[&[0xaa; 8]],
        };
        assert_eq!(packet.header_len(), 16 + 8 + (8 + 8) + (8 + 16));
        let bytes = flatten(&packet);
        let parsed = IncomingPacket::parse(&bytes).unwrap();
        let IncomingKind::GpaDirect {
            range_count,
            range_bytes,
        } = parsed.kind
        else {
            panic!("wrong kind");
        };
        assert_eq!(range_count, 2);
        assert_eq!(&range_bytes[8..16], &0x1234u64.to_le_bytes());
        assert_eq!(parsed.payload, &[0xaa; 8]);
    }

    #[test]
    fn malformed_packets_are_rejected_with_a_reason() {
        let good = flatten(&OutgoingPacket::in_band(1, false, &[&[0; 8]]));
        assert_eq!(
            IncomingPacket::parse(&good[..15]),
            Err(PacketError::Truncated)
        );
        assert_eq!(
            IncomingPacket::parse(&good[..16]),
            Err(PacketError::Truncated)
        );

        let mut bad = good.clone();
        bad[2] = 1; // data_offset8 = 1 < descriptor
        assert_eq!(IncomingPacket::parse(&bad), Err(PacketError::Truncated));
        let mut bad = good.clone();
        bad[2] = 4; // header longer than packet
        assert_eq!(IncomingPacket::parse(&bad), Err(PacketError::Truncated));
        let mut bad = good.clone();
        bad[6] = 2;
        assert_eq!(
            IncomingPacket::parse(&bad),
            Err(PacketError::UnknownFlags(2))
        );
        let mut bad = good.clone();
        bad[0] = 0x5;
        assert_eq!(
            IncomingPacket::parse(&bad),
            Err(PacketError::UnknownType(5))
        );

        let ranges = [TransferPageRange {
            byte_count: 1,
            byte_offset: 0,
        }];
        let mut bad = flatten(&OutgoingPacket {
            kind: OutgoingKind::TransferPages {
                set_id: 0,
                ranges: &ranges,
            },
            transaction_id: 0,
            completion_requested: false,
            payload: &[],
        });
        bad[20..24].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(
            IncomingPacket::parse(&bad),
            Err(PacketError::TransferPageRanges { count: u32::MAX })
        );

        let pfns = [1u64];
        let gpa = [GpaDirectRange {
            byte_count: 1,
            byte_offset: 0,
            pfns: &pfns,
        }];
        let mut bad = flatten(&OutgoingPacket {
            kind: OutgoingKind::GpaDirect(&gpa),
            transaction_id: 0,
            completion_requested: false,
            payload: &[],
        });
        bad[20..24].copy_from_slice(&0u32.to_le_bytes());
        assert_eq!(
            IncomingPacket::parse(&bad),
            Err(PacketError::GpaDirectRanges { count: 0 })
        );
    }

    #[test]
    fn oversized_packets_have_no_descriptor() {
        let big = alloc::vec![0u8; 8 * 65536];
        let pieces: [&[u8]; 1] = [&big];
        let packet = OutgoingPacket::in_band(0, false, &pieces);
        assert!(packet.descriptor().is_none());
        assert!(packet.for_each_piece(|_| {}).is_none());
    }
}
