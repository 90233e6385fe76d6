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

/// One memory range from a `_CRS` resource template: `start..start + len`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryRange {
    /// First byte.
    pub start: u64,
    /// Bytes.
    pub len: u64,
}

/// Most devices a DSDT scan records (a DSDT has dozens; a corrupt one cannot make us collect
/// millions).
const MAX_SCANNED_DEVICES: usize = 4096;

/// A `Device` op found in AML: its name segments and the bytes its package covers.
#[derive(Clone, Debug)]
struct AmlDevice {
    /// Name segments as written (`\_SB.VMOD.VMBS` → `_SB_`, `VMOD`, `VMBS`).
    segments: Vec<[u8; 4]>,
    /// Package extent (after the PkgLength up to its end).
    body: core::ops::Range<usize>,
}

/// Decodes a PkgLength at `at`: (value, bytes it occupies). The value counts itself.
fn pkg_length(aml: &[u8], at: usize) -> Option<(usize, usize)> {
    let lead = *aml.get(at)?;
    let follow = usize::from(lead >> 6);
    if follow == 0 {
        return Some((usize::from(lead & 0x3f), 1));
    }
    let mut value = usize::from(lead & 0x0f);
    for index in 0..follow {
        value |= usize::from(*aml.get(at + 1 + index)?) << (4 + 8 * index);
    }
    Some((value, 1 + follow))
}

/// Decodes a NameString at `at`: (segments, bytes it occupies). Root and parent prefixes are
/// skipped (only the segments matter to the scan).
fn name_string(aml: &[u8], mut at: usize) -> Option<(Vec<[u8; 4]>, usize)> {
    let start = at;
    while matches!(aml.get(at), Some(b'\\' | b'^')) {
        at += 1;
    }
    let count = match *aml.get(at)? {
        0x00 => return Some((Vec::new(), at + 1 - start)),
        0x2e => {
            at += 1;
            2
        }
        0x2f => {
            at += 2;
            usize::from(*aml.get(at - 1)?)
        }
        _ => 1,
    };
    let mut segments = Vec::with_capacity(count);
    for _ in 0..count {
        let segment: [u8; 4] = aml.get(at..at + 4)?.try_into().ok()?;
        let lead_ok = segment[0] == b'_' || segment[0].is_ascii_uppercase();
        let rest_ok = segment[1..]
            .iter()
            .all(|&byte| byte == b'_' || byte.is_ascii_uppercase() || byte.is_ascii_digit());
        if !lead_ok || !rest_ok {
            return None;
        }
        segments.push(segment);
        at += 4;
    }
    Some((segments, at - start))
}

/// Every plausible `Device` op (ExtOpPrefix 0x5B, DeviceOp 0x82) whose package fits the AML.
fn scan_devices(aml: &[u8]) -> Vec<AmlDevice> {
    let mut devices = Vec::new();
    let mut at = 0;
    while at + 2 < aml.len() && devices.len() < MAX_SCANNED_DEVICES {
        if aml[at] == 0x5b && aml[at + 1] == 0x82 {
            let parsed = pkg_length(aml, at + 2).and_then(|(len, len_bytes)| {
                let end = (at + 2).checked_add(len)?;
                let (segments, name_bytes) = name_string(aml, at + 2 + len_bytes)?;
                (end <= aml.len() && !segments.is_empty()).then(|| AmlDevice {
                    segments,
                    body: at + 2 + len_bytes + name_bytes..end,
                })
            });
            if let Some(device) = parsed {
                devices.push(device);
            }
        }
        at += 1;
    }
    devices
}

/// True when `aml[at..]` is `Name(name, …)`: NameOp 0x08 then the 4-byte segment.
fn is_name(aml: &[u8], at: usize, name: &[u8; 4]) -> bool {
    aml.get(at) == Some(&0x08) && aml.get(at + 1..at + 5) == Some(&name[..])
}

/// The string value of `Name(name, "…")` directly inside `device` (not in a nested device).
fn named_string<'a>(
    aml: &'a [u8],
    device: &AmlDevice,
    nested: &[&AmlDevice],
    name: &[u8; 4],
) -> Option<&'a [u8]> {
    let mut at = device.body.start;
    while at + 6 <= device.body.end {
        if nested.iter().any(|inner| inner.body.contains(&at)) {
            at += 1;
            continue;
        }
        if is_name(aml, at, name) && aml.get(at + 5) == Some(&0x0d) {
            let text = &aml[at + 6..device.body.end];
            let len = text.iter().position(|&byte| byte == 0)?;
            return Some(&text[..len]);
        }
        at += 1;
    }
    None
}

/// The resource template bytes of `Name(_CRS, Buffer(…){…})` directly inside `device`.
fn crs_buffer<'a>(aml: &'a [u8], device: &AmlDevice, nested: &[&AmlDevice]) -> Option<&'a [u8]> {
    let mut at = device.body.start;
    while at + 6 <= device.body.end {
        if nested.iter().any(|inner| inner.body.contains(&at)) {
            at += 1;
            continue;
        }
        if is_name(aml, at, b"_CRS") && aml.get(at + 5) == Some(&0x11) {
            let (len, len_bytes) = pkg_length(aml, at + 6)?;
            let end = (at + 6).checked_add(len)?.min(device.body.end);
            // BufferSize: ByteConst, WordConst, DWordConst, Zero or One.
            let mut data = at + 6 + len_bytes;
            data += match *aml.get(data)? {
                0x0a => 2,
                0x0b => 3,
                0x0c => 5,
                0x00 | 0x01 => 1,
                _ => return None,
            };
            return aml.get(data..end);
        }
        at += 1;
    }
    None
}

/// Memory ranges of a resource template: QWord (0x8A) and DWord (0x87) address space
/// descriptors of resource type memory, and 32-bit fixed memory (0x86). Other descriptors are
/// stepped over; parsing stops at the end tag or at the first descriptor that does not fit.
pub fn parse_memory_resources(template: &[u8]) -> Vec<MemoryRange> {
    let u64_at = |bytes: &[u8], at: usize| -> Option<u64> {
        Some(u64::from_le_bytes(bytes.get(at..at + 8)?.try_into().ok()?))
    };
    let u32_at = |bytes: &[u8], at: usize| -> Option<u64> {
        Some(u64::from(u32::from_le_bytes(
            bytes.get(at..at + 4)?.try_into().ok()?,
        )))
    };
    let mut ranges = Vec::new();
    let mut at = 0;
    while let Some(&tag) = template.get(at) {
        if tag & 0x80 == 0 {
            // Small descriptor; 0x79 is the end tag.
            if tag & 0x78 == 0x78 {
                break;
            }
            at += 1 + usize::from(tag & 7);
            continue;
        }
        let Some(len) = template
            .get(at + 1..at + 3)
            .map(|bytes| usize::from(u16::from_le_bytes([bytes[0], bytes[1]])))
        else {
            break;
        };
        let Some(body) = template.get(at..at + 3 + len) else {
            break;
        };
        // (min, max, length) per descriptor kind; address-space ones only when memory (type 0).
        let range = match tag {
            0x8a if body.get(3) == Some(&0) => {
                Some((u64_at(body, 14), u64_at(body, 22), u64_at(body, 38)))
            }
            0x87 if body.get(3) == Some(&0) => {
                Some((u32_at(body, 10), u32_at(body, 14), u32_at(body, 22)))
            }
            0x86 => u32_at(body, 4).zip(u32_at(body, 8)).map(|(base, length)| {
                (
                    Some(base),
                    base.checked_add(length.saturating_sub(1)),
                    Some(length),
                )
            }),
            _ => None,
        };
        if let Some((Some(min), Some(max), Some(length))) = range {
            let len = if length != 0 {
                length
            } else {
                max.saturating_sub(min).saturating_add(1)
            };
            // A range must end inside the address space: its users carve it with plain adds.
            if len != 0 && max >= min && min.checked_add(len - 1).is_some() {
                ranges.push(MemoryRange { start: min, len });
            }
        }
        at += 3 + len;
    }
    ranges
}

/// The MMIO ranges Hyper-V gives VMBus devices (vPCI config windows and BARs), from a DSDT.
///
/// A bounded scan, not an AML interpreter: it finds the `Device` whose `Name(_HID, "VMBus")`
/// (or "VMBUS") is directly inside it, then looks for `Name(_CRS, ResourceTemplate(){…})` in
/// that device and else in its parent — the device that encloses it, or the one named by its
/// path's second-to-last segment (`Device(\_SB.VMOD.VMBS)` → `VMOD`, how Hyper-V and OpenVMM
/// write it) — and returns the memory ranges of the first template that has some (Linux
/// `vmbus_acpi_add` walks the same ancestors). Not handled: a `_CRS` that is a `Method`, a
/// `_HID` given as an EISA id integer, and `Scope`/`External` indirection beyond the path's
/// segments.
pub fn vmbus_mmio_ranges(aml: &[u8]) -> Vec<MemoryRange> {
    let devices = scan_devices(aml);
    let nested_in = |outer: &AmlDevice| -> Vec<&AmlDevice> {
        devices
            .iter()
            .filter(|inner| {
                inner.body.start > outer.body.start
                    && inner.body.end <= outer.body.end
                    && !core::ptr::eq(*inner, outer)
            })
            .collect()
    };
    let Some(vmbus) = devices.iter().find(|device| {
        let nested = nested_in(device);
        named_string(aml, device, &nested, b"_HID")
            .is_some_and(|hid| hid.eq_ignore_ascii_case(b"VMBus"))
    }) else {
        return Vec::new();
    };
    let mut candidates: Vec<&AmlDevice> = Vec::from([vmbus]);
    // The innermost device that encloses the VMBus device.
    if let Some(enclosing) = devices
        .iter()
        .filter(|outer| outer.body.start < vmbus.body.start && vmbus.body.end <= outer.body.end)
        .min_by_key(|outer| outer.body.len())
    {
        candidates.push(enclosing);
    }
    if vmbus.segments.len() >= 2 {
        let parent = vmbus.segments[vmbus.segments.len() - 2];
        candidates.extend(
            devices
                .iter()
                .filter(|device| device.segments.last() == Some(&parent)),
        );
    }
    for device in candidates {
        let nested = nested_in(device);
        if let Some(template) = crs_buffer(aml, device, &nested) {
            let ranges = parse_memory_resources(template);
            if !ranges.is_empty() {
                return ranges;
            }
        }
    }
    Vec::new()
}

#[cfg(not(any(test, feature = "host")))]
mod platform {
    use alloc::vec::Vec;

    use spin::Once;

    use super::{McfgEntry, MemoryRange, PowerControl};
    use crate::boot::RsdpLocation;
    use crate::mm::paging::{self, Cacheability};

    static MCFG: Once<Vec<McfgEntry>> = Once::new();
    static POWER: Once<PowerControl> = Once::new();
    static VMBUS_MMIO: Once<Vec<MemoryRange>> = Once::new();

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
            VMBUS_MMIO.call_once(Vec::new);
            return;
        };
        let mut mcfg = Vec::new();
        let mut power = PowerControl::default();
        let mut vmbus_mmio = Vec::new();
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
                        let aml = table(dsdt);
                        if let Some((a, b)) = aml.and_then(super::find_s5_sleep_types) {
                            power.s5_sleep_type_a = a;
                            power.s5_sleep_type_b = b;
                        }
                        vmbus_mmio = aml.map(super::vmbus_mmio_ranges).unwrap_or_default();
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
        for range in &vmbus_mmio {
            log::info!(
                "ACPI: VMBus MMIO range {:#x}+{:#x} (from the DSDT's _CRS)",
                range.start,
                range.len
            );
        }
        MCFG.call_once(|| mcfg);
        POWER.call_once(|| power);
        VMBUS_MMIO.call_once(|| vmbus_mmio);
    }

    /// The VMBus device's MMIO ranges (vPCI windows and BARs come from them); empty without
    /// a VMBus device in the DSDT.
    pub fn vmbus_mmio() -> Vec<MemoryRange> {
        VMBUS_MMIO.get().cloned().unwrap_or_default()
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
pub use platform::{init, mcfg_entries, power_off, vmbus_mmio};

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

    /// `Name(seg, "text")`.
    fn aml_name_string(segment: &[u8; 4], text: &str) -> Vec<u8> {
        let mut bytes = vec![0x08];
        bytes.extend_from_slice(segment);
        bytes.push(0x0d);
        bytes.extend_from_slice(text.as_bytes());
        bytes.push(0);
        bytes
    }

    /// A PkgLength for `body_len` bytes of content (the encoding counts itself).
    fn pkg(body_len: usize) -> Vec<u8> {
        if body_len + 1 < 0x40 {
            vec![(body_len + 1) as u8]
        } else {
            let total = body_len + 2;
            vec![0x40 | (total & 0xf) as u8, (total >> 4) as u8]
        }
    }

    /// `Device(name) { body }` with a raw NameString.
    fn aml_device(name: &[u8], body: &[u8]) -> Vec<u8> {
        let mut content = name.to_vec();
        content.extend_from_slice(body);
        let mut bytes = vec![0x5b, 0x82];
        bytes.extend(pkg(content.len()));
        bytes.extend(content);
        bytes
    }

    /// `Name(_CRS, ResourceTemplate() { descriptors; EndTag })`.
    fn aml_crs(descriptors: &[u8]) -> Vec<u8> {
        let mut data = descriptors.to_vec();
        data.extend_from_slice(&[0x79, 0]);
        let mut buffer = vec![0x0a, data.len() as u8];
        buffer.extend(data);
        let mut bytes = vec![0x08];
        bytes.extend_from_slice(b"_CRS");
        bytes.push(0x11);
        bytes.extend(pkg(buffer.len()));
        bytes.extend(buffer);
        bytes
    }

    /// A QWordMemory descriptor covering `start..start + len`.
    fn qword_memory(start: u64, len: u64) -> Vec<u8> {
        let mut bytes = vec![0x8a, 43, 0, 0, 0x0c, 0x03];
        for value in [0, start, start + len - 1, 0, len] {
            bytes.extend_from_slice(&value.to_le_bytes());
        }
        bytes
    }

    /// A DWordMemory descriptor with length 0 (range taken from min/max).
    fn dword_memory(start: u32, end: u32) -> Vec<u8> {
        let mut bytes = vec![0x87, 23, 0, 0, 0x0c, 0x03];
        for value in [0, start, end, 0, 0] {
            bytes.extend_from_slice(&value.to_le_bytes());
        }
        bytes
    }

    #[test]
    fn vmbus_mmio_comes_from_the_parent_module_named_by_the_path() {
        // OpenVMM/Hyper-V layout: Device(\_SB.VMOD) and Device(\_SB.VMOD.VMBS) side by side.
        let mut vmod_body = aml_name_string(b"_HID", "ACPI0004");
        let mut ranges = qword_memory(0xf800_0000, 0x0400_0000);
        ranges.extend(qword_memory(0x10_0000_0000, 0x1_0000_0000));
        vmod_body.extend(aml_crs(&ranges));
        let mut vmbs_body = aml_name_string(b"_DDN", "VMBUS");
        vmbs_body.extend(aml_name_string(b"_HID", "VMBus"));
        // Its own _CRS has only an interrupt (small IRQ descriptor): no memory.
        vmbs_body.extend(aml_crs(&[0x22, 0x20, 0x00]));
        let mut aml = vec![0u8; 36];
        aml.extend(aml_device(
            b"\\\x2e_SB_PCI0",
            &aml_crs(&qword_memory(0xc000_0000, 0x1000)),
        ));
        aml.extend(aml_device(b"\\\x2f\x03_SB_VMODVMBS", &vmbs_body));
        aml.extend(aml_device(b"\\\x2e_SB_VMOD", &vmod_body));
        assert_eq!(
            vmbus_mmio_ranges(&aml),
            vec![
                MemoryRange {
                    start: 0xf800_0000,
                    len: 0x0400_0000
                },
                MemoryRange {
                    start: 0x10_0000_0000,
                    len: 0x1_0000_0000
                }
            ]
        );
    }

    #[test]
    fn vmbus_mmio_comes_from_the_enclosing_device_and_nothing_without_vmbus() {
        let vmbs = aml_device(b"VMBS", &aml_name_string(b"_HID", "VMBUS"));
        let mut module = aml_crs(&dword_memory(0xfe00_0000, 0xfe7f_ffff));
        module.extend(vmbs);
        let aml = aml_device(b"VMOD", &module);
        assert_eq!(
            vmbus_mmio_ranges(&aml),
            vec![MemoryRange {
                start: 0xfe00_0000,
                len: 0x80_0000
            }]
        );
        // No VMBus device; and a truncated table never panics.
        let other = aml_device(b"PCI0", &aml_crs(&qword_memory(0xc000_0000, 0x1000)));
        assert!(vmbus_mmio_ranges(&other).is_empty());
        for cut in 0..aml.len() {
            let _ = vmbus_mmio_ranges(&aml[..cut]);
        }
    }

    #[test]
    fn memory_ranges_past_the_end_of_the_address_space_are_refused() {
        let mut overflowing = vec![0x8a, 43, 0, 0, 0x0c, 0x03];
        for value in [0, u64::MAX - 0xfff, u64::MAX, 0, 0x2000] {
            overflowing.extend_from_slice(&value.to_le_bytes());
        }
        let mut template = overflowing;
        template.extend(qword_memory(0xf800_0000, 0x1000));
        assert_eq!(
            parse_memory_resources(&template),
            vec![MemoryRange {
                start: 0xf800_0000,
                len: 0x1000
            }]
        );
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
