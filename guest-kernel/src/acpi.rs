//! ACPI tables: finding the RSDP, walking the XSDT/RSDT, MCFG (PCIe ECAM) and FADT (power off).
//!
//! Table parsing works on byte slices and is unit-tested on the host; only `init` and
//! `power_off` touch physical memory and ports.

use alloc::vec::Vec;

/// One PCIe ECAM window from MCFG.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct McfgEntry {
    /// Physical base of the window (for bus 0, even if `bus_start` > 0).
    pub base: u64,
    /// PCI segment group.
    pub segment: u16,
    /// First bus decoded.
    pub bus_start: u8,
    /// Last bus decoded.
    pub bus_end: u8,
}

/// What the kernel keeps from the FADT.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PowerControl {
    /// PM1a control block I/O port (0 = none).
    pub pm1a_control: u16,
    /// PM1b control block I/O port (0 = none).
    pub pm1b_control: u16,
    /// SLP_TYPa value for S5 from the DSDT's `_S5_` package.
    pub s5_sleep_type_a: u16,
    /// SLP_TYPb value for S5.
    pub s5_sleep_type_b: u16,
}

/// Validates the checksum of an ACPI structure (all bytes sum to 0 mod 256).
pub fn checksum_ok(bytes: &[u8]) -> bool {
    bytes.iter().fold(0u8, |sum, byte| sum.wrapping_add(*byte)) == 0
}

/// Parses an RSDP, returning the XSDT (preferred) or RSDT address and whether it is an XSDT.
pub fn parse_rsdp(bytes: &[u8]) -> Option<(u64, bool)> {
    if bytes.len() < 20 || &bytes[..8] != b"RSD PTR " || !checksum_ok(&bytes[..20]) {
        return None;
    }
    let revision = bytes[15];
    if revision >= 2 && bytes.len() >= 36 && checksum_ok(&bytes[..36]) {
        let xsdt = u64::from_le_bytes(bytes[24..32].try_into().ok()?);
        if xsdt != 0 {
            return Some((xsdt, true));
        }
    }
    Some((
        u64::from(u32::from_le_bytes(bytes[16..20].try_into().ok()?)),
        false,
    ))
}

/// The table addresses listed in an XSDT (8-byte entries) or RSDT (4-byte entries).
pub fn parse_root_table(table: &[u8], is_xsdt: bool) -> Vec<u64> {
    let width = if is_xsdt { 8 } else { 4 };
    table
        .get(36..)
        .unwrap_or(&[])
        .chunks_exact(width)
        .map(|chunk| {
            if is_xsdt {
                u64::from_le_bytes(chunk.try_into().unwrap_or([0; 8]))
            } else {
                u64::from(u32::from_le_bytes(chunk.try_into().unwrap_or([0; 4])))
            }
        })
        .filter(|address| *address != 0)
        .collect()
}

/// The ECAM windows in an MCFG table.
pub fn parse_mcfg(table: &[u8]) -> Vec<McfgEntry> {
    table
        .get(44..)
        .unwrap_or(&[])
        .chunks_exact(16)
        .map(|entry| McfgEntry {
            base: u64::from_le_bytes(entry[0..8].try_into().unwrap_or([0; 8])),
            segment: u16::from_le_bytes([entry[8], entry[9]]),
            bus_start: entry[10],
            bus_end: entry[11],
        })
        .filter(|entry| entry.base != 0 && entry.bus_end >= entry.bus_start)
        .collect()
}

/// The I/O port of an ACPI 2.0+ Generic Address Structure at `offset` (space id 1 = system
/// I/O), if it names one.
fn generic_address_port(table: &[u8], offset: usize) -> Option<u32> {
    let gas = table.get(offset..offset + 12)?;
    let address = u64::from_le_bytes(gas[4..12].try_into().ok()?);
    (gas[0] == 1 && address != 0).then_some(u32::try_from(address).ok()?)
}

/// PM1a/PM1b control ports and the DSDT address from a FADT.
///
/// The legacy 32-bit port fields (offsets 64/68) win; when they are 0, the ACPI 2.0
/// X_PM1a/X_PM1b_CNT_BLK generic addresses (offsets 172/184) are used, which is all OpenVMM
/// fills in.
pub fn parse_fadt(table: &[u8]) -> Option<(u16, u16, u64)> {
    let u32_at = |offset: usize| -> Option<u32> {
        Some(u32::from_le_bytes(
            table.get(offset..offset + 4)?.try_into().ok()?,
        ))
    };
    let mut pm1a = u32_at(64)?;
    let mut pm1b = u32_at(68).unwrap_or(0);
    if pm1a == 0 {
        pm1a = generic_address_port(table, 172).unwrap_or(0);
        pm1b = generic_address_port(table, 184).unwrap_or(0);
    }
    let mut dsdt = u64::from(u32_at(40)?);
    if table.len() >= 148 {
        let x_dsdt = u64::from_le_bytes(table[140..148].try_into().ok()?);
        if x_dsdt != 0 {
            dsdt = x_dsdt;
        }
    }
    Some((
        u16::try_from(pm1a).ok()?,
        u16::try_from(pm1b).unwrap_or(0),
        dsdt,
    ))
}

/// Finds the `\_S5_` package in AML and returns its first two values (SLP_TYPa, SLP_TYPb).
///
/// This is the well-known shortcut of matching the byte pattern `NameOp "_S5_" PackageOp`
/// instead of interpreting AML; it handles the ByteConst/ZeroOp/OneOp encodings firmware uses.
pub fn find_s5_sleep_types(aml: &[u8]) -> Option<(u16, u16)> {
    let position = aml.windows(4).position(|window| window == b"_S5_")?;
    let mut index = position + 4;
    if aml.get(index) != Some(&0x12) {
        return None; // not followed by PackageOp
    }
    index += 1;
    let length_bytes = usize::from(aml.get(index)? >> 6);
    index += 1 + length_bytes + 1; // PkgLength, then NumElements
    let read_value = |index: &mut usize| -> Option<u16> {
        match *aml.get(*index)? {
            0x0a => {
                *index += 2;
                Some(u16::from(*aml.get(*index - 1)?))
            }
            0x00 => {
                *index += 1;
                Some(0)
            }
            0x01 => {
                *index += 1;
                Some(1)
            }
            value => {
                *index += 1;
                Some(u16::from(value))
            }
        }
    };
    let a = read_value(&mut index)?;
    let b = read_value(&mut index).unwrap_or(0);
    Some((a, b))
}

#[cfg(not(any(test, feature = "host")))]
mod platform {
    use alloc::vec::Vec;

    use spin::Once;

    use super::{McfgEntry, PowerControl};
    use crate::boot::RsdpLocation;
    use crate::mm::paging::{self, Cacheability};

    static MCFG: Once<Vec<McfgEntry>> = Once::new();
    static POWER: Once<PowerControl> = Once::new();

    /// Maps and borrows `len` bytes of firmware memory.
    fn physical(address: u64, len: usize) -> Option<&'static [u8]> {
        paging::map(address, len as u64, Cacheability::WriteBack).ok()?;
        // SAFETY: just identity-mapped; firmware tables are never freed or moved.
        Some(unsafe { core::slice::from_raw_parts(address as *const u8, len) })
    }

    /// A whole table at `address`, if its length is sane and its checksum is right.
    fn table(address: u64) -> Option<&'static [u8]> {
        let header = physical(address, 36)?;
        let len = u32::from_le_bytes(header[4..8].try_into().ok()?) as usize;
        if !(36..=(16 << 20)).contains(&len) {
            log::warn!("ACPI table at {address:#x} has an absurd length {len}");
            return None;
        }
        let bytes = physical(address, len)?;
        if !super::checksum_ok(bytes) {
            log::warn!(
                "ACPI table {:?} at {address:#x}: bad checksum",
                core::str::from_utf8(&bytes[..4])
            );
            return None;
        }
        Some(bytes)
    }

    fn scan_for_rsdp() -> Option<[u8; 36]> {
        // The RSDP lies on a 16-byte boundary in the BIOS area 0xE0000..0xFFFFF.
        let area = physical(0xe0000, 0x20000)?;
        let offset = (0..area.len() - 36)
            .step_by(16)
            .find(|&offset| super::parse_rsdp(&area[offset..offset + 36]).is_some())?;
        area[offset..offset + 36].try_into().ok()
    }

    pub fn init(location: RsdpLocation) {
        let rsdp: Option<[u8; 36]> = match location {
            RsdpLocation::Copy(copy) => Some(copy),
            RsdpLocation::Physical(address) => {
                physical(address, 36).and_then(|bytes| bytes.try_into().ok())
            }
            RsdpLocation::Unknown => scan_for_rsdp(),
        };
        let Some((root, is_xsdt)) = rsdp.as_ref().and_then(|bytes| super::parse_rsdp(bytes)) else {
            log::warn!("no valid ACPI RSDP: no MCFG, no ACPI power-off");
            MCFG.call_once(Vec::new);
            POWER.call_once(PowerControl::default);
            return;
        };
        let mut mcfg = Vec::new();
        let mut power = PowerControl::default();
        for address in table(root)
            .map(|t| super::parse_root_table(t, is_xsdt))
            .unwrap_or_default()
        {
            let Some(bytes) = table(address) else {
                continue;
            };
            match &bytes[..4] {
                b"MCFG" => mcfg = super::parse_mcfg(bytes),
                b"FACP" => {
                    if let Some((pm1a, pm1b, dsdt)) = super::parse_fadt(bytes) {
                        power.pm1a_control = pm1a;
                        power.pm1b_control = pm1b;
                        if let Some((a, b)) = table(dsdt).and_then(super::find_s5_sleep_types) {
                            power.s5_sleep_type_a = a;
                            power.s5_sleep_type_b = b;
                        }
                    }
                }
                _ => {}
            }
        }
        log::debug!(
            "ACPI: {} MCFG window(s), PM1a control port {:#x}",
            mcfg.len(),
            power.pm1a_control
        );
        MCFG.call_once(|| mcfg);
        POWER.call_once(|| power);
    }

    pub fn mcfg_entries() -> Vec<McfgEntry> {
        MCFG.get().cloned().unwrap_or_default()
    }

    pub fn power_off() {
        let Some(power) = POWER.get() else { return };
        const SLEEP_ENABLE: u16 = 1 << 13;
        // SAFETY: the ports come from the firmware's FADT; writing SLP_TYP|SLP_EN enters S5.
        unsafe {
            if power.pm1a_control != 0 {
                crate::arch::port::outw(
                    power.pm1a_control,
                    (power.s5_sleep_type_a << 10) | SLEEP_ENABLE,
                );
            }
            if power.pm1b_control != 0 {
                crate::arch::port::outw(
                    power.pm1b_control,
                    (power.s5_sleep_type_b << 10) | SLEEP_ENABLE,
                );
            }
        }
    }
}

#[cfg(not(any(test, feature = "host")))]
pub use platform::{init, mcfg_entries, power_off};

#[cfg(test)]
mod tests {
    use super::*;

    /// Sets the checksum byte at `checksum_offset` so that `bytes[..covered]` sums to zero.
    fn with_checksum(mut bytes: Vec<u8>, checksum_offset: usize, covered: usize) -> Vec<u8> {
        bytes[checksum_offset] = 0;
        let sum = bytes[..covered]
            .iter()
            .fold(0u8, |sum, byte| sum.wrapping_add(*byte));
        bytes[checksum_offset] = 0u8.wrapping_sub(sum);
        bytes
    }

    #[test]
    fn rsdp_v2_prefers_the_xsdt_and_rejects_bad_checksums() {
        let mut rsdp = vec![0u8; 36];
        rsdp[..8].copy_from_slice(b"RSD PTR ");
        rsdp[15] = 2;
        rsdp[16..20].copy_from_slice(&0x7fe_0000u32.to_le_bytes());
        rsdp[20..24].copy_from_slice(&36u32.to_le_bytes());
        rsdp[24..32].copy_from_slice(&0x7fe_1000u64.to_le_bytes());
        let rsdp = with_checksum(rsdp, 8, 20);
        let rsdp = with_checksum(rsdp, 32, 36);
        assert_eq!(parse_rsdp(&rsdp), Some((0x7fe_1000, true)));
        let mut broken = rsdp.clone();
        broken[9] ^= 0xff;
        assert_eq!(parse_rsdp(&broken), None);
    }

    #[test]
    fn mcfg_entries_are_parsed_and_empty_ones_dropped() {
        let mut mcfg = vec![0u8; 44];
        mcfg[..4].copy_from_slice(b"MCFG");
        let mut entry = vec![0u8; 16];
        entry[..8].copy_from_slice(&0xb000_0000u64.to_le_bytes());
        entry[11] = 0xff;
        mcfg.extend_from_slice(&entry);
        mcfg.extend_from_slice(&[0u8; 16]);
        mcfg.extend_from_slice(&[1, 2, 3]); // trailing garbage shorter than an entry
        assert_eq!(
            parse_mcfg(&mcfg),
            vec![McfgEntry {
                base: 0xb000_0000,
                segment: 0,
                bus_start: 0,
                bus_end: 0xff
            }]
        );
    }

    #[test]
    fn root_table_lists_addresses() {
        let mut xsdt = vec![0u8; 36];
        xsdt.extend_from_slice(&0x1000u64.to_le_bytes());
        xsdt.extend_from_slice(&0x2000u64.to_le_bytes());
        assert_eq!(parse_root_table(&xsdt, true), vec![0x1000, 0x2000]);
        let mut rsdt = vec![0u8; 36];
        rsdt.extend_from_slice(&0x3000u32.to_le_bytes());
        assert_eq!(parse_root_table(&rsdt, false), vec![0x3000]);
    }

    #[test]
    fn s5_package_is_found_in_aml() {
        // NameOp "_S5_" PackageOp PkgLength NumElements ByteConst 5 ZeroOp ...
        let aml = [
            0x10, 0x08, 0x08, b'_', b'S', b'5', b'_', 0x12, 0x06, 0x04, 0x0a, 0x05, 0x00, 0x00,
        ];
        let mut no_package = aml;
        no_package[7] = 0x13;
        assert_eq!(
            find_s5_sleep_types(&no_package),
            None,
            "no PackageOp right after the name"
        );
        assert_eq!(find_s5_sleep_types(&aml), Some((5, 0)));
        assert_eq!(find_s5_sleep_types(b"nothing here"), None);
    }

    #[test]
    fn fadt_pm1_control_comes_from_the_legacy_field_or_the_generic_address() {
        // An ACPI 6 FADT as OpenVMM builds it: legacy PM1a_CNT_BLK 0, X_PM1a_CNT_BLK in I/O
        // space, X_DSDT set.
        let mut fadt = vec![0u8; 276];
        fadt[0..4].copy_from_slice(b"FACP");
        fadt[140..148].copy_from_slice(&0x1_2000u64.to_le_bytes());
        fadt[172..176].copy_from_slice(&[1, 16, 0, 2]);
        fadt[176..184].copy_from_slice(&0x404u64.to_le_bytes());
        assert_eq!(parse_fadt(&fadt), Some((0x404, 0, 0x1_2000)));
        // A memory-space generic address is no port.
        fadt[172] = 0;
        assert_eq!(parse_fadt(&fadt), Some((0, 0, 0x1_2000)));
        // The legacy field wins when present (QEMU fills both).
        fadt[172] = 1;
        fadt[64..68].copy_from_slice(&0x604u32.to_le_bytes());
        assert_eq!(parse_fadt(&fadt), Some((0x604, 0, 0x1_2000)));
    }
}
