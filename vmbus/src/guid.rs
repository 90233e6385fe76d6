//! GUIDs as VMBus carries them: Windows mixed-endian byte order (first three fields little-endian).

use core::fmt;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// A GUID in its wire layout: `data1`..`data3` little-endian, `data4` as bytes.
#[repr(C)]
#[derive(
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Default,
    FromBytes,
    IntoBytes,
    KnownLayout,
    Immutable,
)]
pub struct Guid {
    /// First group (8 hex digits).
    pub data1: u32,
    /// Second group (4 hex digits).
    pub data2: u16,
    /// Third group (4 hex digits).
    pub data3: u16,
    /// Fourth and fifth groups (2 + 6 bytes, in text order).
    pub data4: [u8; 8],
}

const _: () = assert!(size_of::<Guid>() == 16);

impl Guid {
    /// The all-zero GUID.
    pub const ZERO: Guid = Guid::from_fields(0, 0, 0, [0; 8]);

    /// Builds a GUID from the groups of its text form `data1-data2-data3-data4[0..2]-data4[2..]`.
    pub const fn from_fields(data1: u32, data2: u16, data3: u16, data4: [u8; 8]) -> Guid {
        Guid {
            data1,
            data2,
            data3,
            data4,
        }
    }

    /// Parses the text form `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx` (either case).
    pub fn parse(text: &str) -> Option<Guid> {
        let bytes = text.as_bytes();
        if bytes.len() != 36 || [8, 13, 18, 23].iter().any(|&dash| bytes[dash] != b'-') {
            return None;
        }
        let mut digits = [0u8; 16];
        let mut count = 0;
        let mut pending: Option<u8> = None;
        for &character in bytes.iter().filter(|&&character| character != b'-') {
            let nibble = (character as char).to_digit(16)? as u8;
            match pending.take() {
                None => pending = Some(nibble),
                Some(high) => {
                    *digits.get_mut(count)? = high << 4 | nibble;
                    count += 1;
                }
            }
        }
        if count != 16 {
            return None;
        }
        let mut data4 = [0u8; 8];
        data4.copy_from_slice(&digits[8..]);
        Some(Guid::from_fields(
            u32::from_be_bytes([digits[0], digits[1], digits[2], digits[3]]),
            u16::from_be_bytes([digits[4], digits[5]]),
            u16::from_be_bytes([digits[6], digits[7]]),
            data4,
        ))
    }
}

impl fmt::Display for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = self.data4;
        write!(
            f,
            "{:08x}-{:04x}-{:04x}-{:02x}{:02x}-{:02x}{:02x}{:02x}{:02x}{:02x}{:02x}",
            self.data1, self.data2, self.data3, d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]
        )
    }
}

impl fmt::Debug for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Interface GUIDs of the offers this project cares about (OpenVMM `OfferChannel`, Linux
/// `hyperv.h`).
pub mod interface {
    use super::Guid;

    /// Synthetic network adapter (netvsc): f8615163-df3e-46c5-913f-f2d2f965ed0e.
    pub const NETWORK: Guid = Guid::from_fields(
        0xf861_5163,
        0xdf3e,
        0x46c5,
        [0x91, 0x3f, 0xf2, 0xd2, 0xf9, 0x65, 0xed, 0x0e],
    );
    /// Virtual PCI bus (the SR-IOV VF path): 44c4f61d-4444-4400-9d52-802e27ede19f.
    pub const VPCI: Guid = Guid::from_fields(
        0x44c4_f61d,
        0x4444,
        0x4400,
        [0x9d, 0x52, 0x80, 0x2e, 0x27, 0xed, 0xe1, 0x9f],
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn network_guid_has_the_windows_wire_order_and_text_form() {
        assert_eq!(
            interface::NETWORK.as_bytes(),
            &[
                0x63, 0x51, 0x61, 0xf8, 0x3e, 0xdf, 0xc5, 0x46, 0x91, 0x3f, 0xf2, 0xd2, 0xf9, 0x65,
                0xed, 0x0e
            ]
        );
        assert_eq!(
            interface::NETWORK.to_string(),
            "f8615163-df3e-46c5-913f-f2d2f965ed0e"
        );
    }

    #[test]
    fn parse_round_trips_and_rejects_malformed_text() {
        let text = "44C4F61D-4444-4400-9D52-802E27EDE19F";
        assert_eq!(Guid::parse(text), Some(interface::VPCI));
        assert_eq!(
            Guid::parse(&interface::VPCI.to_string()),
            Some(interface::VPCI)
        );
        assert_eq!(Guid::parse("44c4f61d-4444-4400-9d52-802e27ede19"), None);
        assert_eq!(Guid::parse("44c4f61d+4444-4400-9d52-802e27ede19f"), None);
        assert_eq!(Guid::parse("44c4f61g-4444-4400-9d52-802e27ede19f"), None);
    }
}
