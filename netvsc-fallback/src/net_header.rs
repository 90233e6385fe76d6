//! The 12-byte `struct virtio_net_hdr` that precedes every frame (virtio 1.x §5.1.6).

use bitflags::bitflags;

/// Length of the header with VIRTIO_F_VERSION_1 (it always includes `num_buffers`).
pub const NET_HEADER_LEN: usize = 12;

bitflags! {
    /// The header's `flags` byte.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
    pub struct NetHeaderFlags: u8 {
        /// The L4 checksum is partial: complete it from `csum_start` to the end and store the
        /// result at `csum_start + csum_offset`.
        const NEEDS_CSUM = 1;
        /// Receive only: the device validated the checksum.
        const DATA_VALID = 2;
        /// Receive only: `csum_start`/`csum_offset` carry coalescing counts (RSC_EXT).
        const RSC_INFO = 4;
    }
}

/// A decoded `struct virtio_net_hdr`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct VirtioNetHeader {
    /// `flags`.
    pub flags: NetHeaderFlags,
    /// `gso_type`, one of the `GSO_*` constants, possibly with [`VirtioNetHeader::GSO_ECN`].
    pub gso_type: u8,
    /// `hdr_len`: length of the headers to replicate into each segment (a hint).
    pub header_len: u16,
    /// `gso_size`: the MSS for segmentation.
    pub gso_size: u16,
    /// `csum_start`: where checksumming starts.
    pub csum_start: u16,
    /// `csum_offset`: where the checksum goes, relative to `csum_start`.
    pub csum_offset: u16,
    /// `num_buffers`: receive buffers the frame spans (MRG_RXBUF); zero on transmit.
    pub num_buffers: u16,
}

impl VirtioNetHeader {
    /// `gso_type`: not a GSO frame.
    pub const GSO_NONE: u8 = 0;
    /// `gso_type`: TCP/IPv4 segmentation.
    pub const GSO_TCPV4: u8 = 1;
    /// `gso_type`: UDP fragmentation.
    pub const GSO_UDP: u8 = 3;
    /// `gso_type`: TCP/IPv6 segmentation.
    pub const GSO_TCPV6: u8 = 4;
    /// `gso_type` flag: the TCP segment has ECN CWR set.
    pub const GSO_ECN: u8 = 0x80;

    /// Decodes the first [`NET_HEADER_LEN`] bytes; `None` when `bytes` is shorter.
    pub fn parse(bytes: &[u8]) -> Option<Self> {
        let bytes = bytes.get(..NET_HEADER_LEN)?;
        let le16 = |offset: usize| u16::from_le_bytes([bytes[offset], bytes[offset + 1]]);
        Some(VirtioNetHeader {
            flags: NetHeaderFlags::from_bits_retain(bytes[0]),
            gso_type: bytes[1],
            header_len: le16(2),
            gso_size: le16(4),
            csum_start: le16(6),
            csum_offset: le16(8),
            num_buffers: le16(10),
        })
    }

    /// Encodes into the first [`NET_HEADER_LEN`] bytes; returns `false` when `out` is shorter.
    pub fn write(&self, out: &mut [u8]) -> bool {
        let Some(out) = out.get_mut(..NET_HEADER_LEN) else {
            return false;
        };
        out[0] = self.flags.bits();
        out[1] = self.gso_type;
        out[2..4].copy_from_slice(&self.header_len.to_le_bytes());
        out[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        out[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        out[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
        out[10..12].copy_from_slice(&self.num_buffers.to_le_bytes());
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_little_endian() {
        let header = VirtioNetHeader {
            flags: NetHeaderFlags::NEEDS_CSUM,
            gso_type: VirtioNetHeader::GSO_TCPV6,
            header_len: 0x0102,
            gso_size: 1440,
            csum_start: 54,
            csum_offset: 16,
            num_buffers: 3,
        };
        let mut bytes = [0u8; NET_HEADER_LEN];
        assert!(header.write(&mut bytes));
        assert_eq!(bytes, [1, 4, 0x02, 0x01, 0xA0, 0x05, 54, 0, 16, 0, 3, 0]);
        assert_eq!(VirtioNetHeader::parse(&bytes), Some(header));
        assert_eq!(VirtioNetHeader::parse(&bytes[..11]), None);
    }
}
