//! Target `acpi`: RSDP, RSDT/XSDT entry lists, MCFG (ECAM windows), FADT, the `_S5_` package
//! and the VMBus device's `_CRS` memory ranges in the DSDT, from hostile table bytes.

use guest_kernel::acpi;

use crate::engine::{Input, Outcome, Steps, Target, check};

fn run(input: &mut Input, steps: &mut Steps) -> Outcome {
    let rsdp = input.bytes(40);
    let table = input.rest();
    steps.count((rsdp.len() + table.len()) as u64)?;
    if let Some((_, is_xsdt)) = acpi::parse_rsdp(rsdp) {
        check(rsdp.len() >= 20 && acpi::checksum_ok(&rsdp[..20]), || {
            "RSDP with a bad checksum accepted".to_string()
        })?;
        let entries = acpi::parse_root_table(table, is_xsdt);
        let width = if is_xsdt { 8 } else { 4 };
        check(
            entries.len() <= table.len().saturating_sub(36) / width,
            || {
                format!(
                    "{} entries from a {}-byte root table",
                    entries.len(),
                    table.len()
                )
            },
        )?;
        check(entries.iter().all(|address| *address != 0), || {
            "null table address".to_string()
        })?;
    }
    for entry in acpi::parse_mcfg(table) {
        check(entry.base != 0 && entry.bus_start <= entry.bus_end, || {
            format!("bad ECAM window {entry:?} accepted")
        })?;
    }
    let _ = acpi::parse_fadt(table);
    let _ = acpi::find_s5_sleep_types(table);
    for ranges in [
        acpi::parse_memory_resources(table),
        acpi::vmbus_mmio_ranges(table),
    ] {
        // Every memory descriptor takes at least 3 bytes of the input.
        check(ranges.len() <= table.len() / 3, || {
            format!("{} ranges from {} bytes", ranges.len(), table.len())
        })?;
        for range in ranges {
            check(
                range.len != 0 && range.start.checked_add(range.len - 1).is_some(),
                || format!("empty or overflowing MMIO range {range:?} accepted"),
            )?;
        }
    }
    // Well-formed tables still parse.
    let mut mcfg = vec![0u8; 44];
    mcfg.extend_from_slice(&0xb000_0000u64.to_le_bytes());
    mcfg.extend_from_slice(&[0, 0, 0, 0xff, 0, 0, 0, 0]);
    check(acpi::parse_mcfg(&mcfg).len() == 1, || {
        "good MCFG rejected".to_string()
    })?;
    check(
        acpi::find_s5_sleep_types(b"\x08_S5_\x12\x06\x04\x0a\x05\x0a\x05\x00\x00") == Some((5, 5)),
        || "good _S5_ rejected".to_string(),
    )?;
    let ranges = acpi::vmbus_mmio_ranges(&vmbus_dsdt());
    check(
        ranges.len() == 1 && ranges[0].start == 0xf800_0000 && ranges[0].len == 0x0400_0000,
        || format!("good VMBus _CRS read as {ranges:?}"),
    )
}

fn rsdp(revision: u8, rsdt: u32, xsdt: u64) -> Vec<u8> {
    let mut bytes = b"RSD PTR BOCHS \0".to_vec();
    bytes.push(revision);
    bytes.extend_from_slice(&rsdt.to_le_bytes());
    bytes.extend_from_slice(&36u32.to_le_bytes());
    bytes.extend_from_slice(&xsdt.to_le_bytes());
    bytes.extend_from_slice(&[0; 4]);
    let sum = bytes[..20]
        .iter()
        .fold(0u8, |sum, byte| sum.wrapping_add(*byte));
    bytes[8] = bytes[8].wrapping_sub(sum);
    let sum = bytes.iter().fold(0u8, |sum, byte| sum.wrapping_add(*byte));
    bytes[32] = bytes[32].wrapping_sub(sum);
    bytes
}

/// A DSDT holding `Device(VMBS) { Name(_HID, "VMBus"); Name(_CRS, ResourceTemplate() {
/// QWordMemory(0xf800_0000, 64 MiB) }) }`, as Hyper-V describes VMBus's MMIO.
fn vmbus_dsdt() -> Vec<u8> {
    let mut descriptor = vec![0x8a, 43, 0, 0, 0x0c, 0x03];
    for value in [0u64, 0xf800_0000, 0xfbff_ffff, 0, 0x0400_0000] {
        descriptor.extend_from_slice(&value.to_le_bytes());
    }
    descriptor.extend_from_slice(&[0x79, 0]);
    // Buffer(ByteConst size) { descriptor }: 2 size bytes + 48 data bytes, PkgLength of 1 byte.
    let mut crs = b"\x08_CRS\x11".to_vec();
    crs.push((2 + descriptor.len() + 1) as u8);
    crs.extend_from_slice(&[0x0a, descriptor.len() as u8]);
    crs.extend_from_slice(&descriptor);
    let mut body = b"VMBS\x08_HID\x0dVMBus\0".to_vec();
    body.extend_from_slice(&crs);
    // Device: 0x5b 0x82, then a 2-byte PkgLength (the body is longer than 62 bytes).
    let total = body.len() + 2;
    let mut dsdt = b"DSDT".to_vec();
    dsdt.resize(36, 0);
    dsdt.extend_from_slice(&[0x5b, 0x82, 0x40 | (total & 0xf) as u8, (total >> 4) as u8]);
    dsdt.extend_from_slice(&body);
    dsdt
}

fn seeds() -> Vec<Vec<u8>> {
    let with_rsdp = |rsdp: Vec<u8>, table: &[u8]| {
        let mut bytes = (rsdp.len() as u8).to_le_bytes().to_vec();
        bytes.extend_from_slice(&rsdp);
        bytes.extend_from_slice(table);
        bytes
    };
    let mut xsdt = b"XSDT".to_vec();
    xsdt.resize(36, 0);
    xsdt.extend_from_slice(&0x7fe_1000u64.to_le_bytes());
    xsdt.extend_from_slice(&0x7fe_2000u64.to_le_bytes());
    let mut fadt = b"FACP".to_vec();
    fadt.resize(148, 0);
    fadt[64..68].copy_from_slice(&0x604u32.to_le_bytes());
    fadt[40..44].copy_from_slice(&0x7fe_0040u32.to_le_bytes());
    let mut dsdt = b"DSDT".to_vec();
    dsdt.resize(36, 0);
    dsdt.extend_from_slice(b"\x08_S5_\x12\x06\x04\x0a\x05\x00\x00\x00");
    let mut mcfg = b"MCFG".to_vec();
    mcfg.resize(44, 0);
    mcfg.extend_from_slice(&0xb000_0000u64.to_le_bytes());
    mcfg.extend_from_slice(&[0, 0, 0, 0xff, 0, 0, 0, 0]);
    vec![
        with_rsdp(rsdp(2, 0, 0), &vmbus_dsdt()),
        with_rsdp(rsdp(2, 0x7fe_0000, 0x7fe_0100), &xsdt),
        with_rsdp(rsdp(0, 0x7fe_0000, 0), &xsdt[..44]),
        with_rsdp(rsdp(2, 0, 0), &fadt),
        with_rsdp(rsdp(2, 0, 0), &dsdt),
        with_rsdp(rsdp(2, 0, 0), &mcfg),
    ]
}

/// The registration.
pub const TARGET: Target = Target {
    name: "acpi",
    about: "RSDP, RSDT/XSDT, MCFG, FADT, DSDT _S5_ and VMBus _CRS from hostile table bytes",
    default_cases: 200_000,
    max_input_len: 1024,
    memory_bound: 128 * 1024,
    step_bound: 2048,
    seeds,
    run,
};
