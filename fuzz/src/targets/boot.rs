//! Target `boot-info`: what the boot loader leaves in memory — PVH `hvm_start_info` and its
//! memory map, Multiboot2 tags (command line, memory map, RSDP copies) — parsed through a reader
//! of a hostile physical memory, then the memory plan the kernel derives from it.

use std::cell::Cell;

use guest_kernel::boot::{
    BootInfo, MAX_CMDLINE, MAX_MEMORY_REGIONS, MULTIBOOT2_MAGIC, PVH_START_INFO_MAGIC, RsdpLocation,
};
use guest_kernel::mm::{self, PhysRange};

use crate::engine::{Input, Outcome, Steps, Target, check};

/// Where the hostile bytes sit in the fake physical memory.
const BASE: u64 = 0x10_0000;

fn run(input: &mut Input, steps: &mut Steps) -> Outcome {
    let mode = input.u8();
    let offset = u64::from(input.u16());
    let hostile_pointer = input.u64();
    let memory = input.rest();
    let reads = Cell::new(0u64);
    let reader = |address: u64, buffer: &mut [u8]| -> bool {
        reads.set(reads.get() + 1);
        let Some(start) = address.checked_sub(BASE) else {
            return false;
        };
        let Some(end) = start.checked_add(buffer.len() as u64) else {
            return false;
        };
        if end > memory.len() as u64 {
            return false;
        }
        buffer.copy_from_slice(&memory[start as usize..end as usize]);
        true
    };
    let info = if mode & 0x80 != 0 {
        hostile_pointer
    } else {
        BASE + offset
    };
    let magic = match mode & 3 {
        0 => MULTIBOOT2_MAGIC,
        1 => PVH_START_INFO_MAGIC,
        _ => hostile_pointer as u32,
    };
    let parsed = BootInfo::parse(magic, info, &reader);
    steps.observe(reads.get())?;
    let Ok(boot) = parsed else {
        return Ok(());
    };
    check(boot.cmdline().len() <= MAX_CMDLINE, || {
        "command line too long".to_string()
    })?;
    let regions = boot.regions();
    check(regions.len() <= MAX_MEMORY_REGIONS, || {
        format!("{} regions", regions.len())
    })?;
    for pair in regions.windows(2) {
        check(pair[0].start <= pair[1].start, || {
            "memory map not sorted".to_string()
        })?;
    }
    for region in regions {
        check(
            region.start.checked_add(region.len).is_some() && region.len > 0,
            || format!("region {region:?} wraps or is empty"),
        )?;
    }
    if let RsdpLocation::Copy(bytes) = boot.rsdp {
        let _ = guest_kernel::acpi::parse_rsdp(&bytes);
    }
    // The kernel's next step: the usable RAM minus the first MiB and the kernel image.
    let exclude = [
        PhysRange {
            start: 0,
            end: 0x10_0000,
        },
        PhysRange {
            start: 0x10_0000,
            end: 0x40_0000,
        },
    ];
    let usable = mm::usable_ranges(regions, &exclude);
    let mut total = 0u64;
    for range in usable.as_slice() {
        check(range.start < range.end, || {
            format!("empty usable range {range:?}")
        })?;
        check(
            range.start % mm::PAGE_SIZE == 0 && range.end % mm::PAGE_SIZE == 0,
            || format!("unaligned usable range {range:?}"),
        )?;
        for hole in &exclude {
            check(range.end <= hole.start || range.start >= hole.end, || {
                format!("usable range {range:?} overlaps excluded {hole:?}")
            })?;
        }
        total = total.saturating_add(range.len());
    }
    check(usable.total() == total, || {
        "usable total disagrees with its ranges".to_string()
    })?;
    let _ = mm::frame_pool_size(total);
    Ok(())
}

fn header(mode: u8, offset: u16) -> Vec<u8> {
    let mut bytes = vec![mode];
    bytes.extend_from_slice(&offset.to_le_bytes());
    bytes.extend_from_slice(&0u64.to_le_bytes());
    bytes
}

fn pvh_seed() -> Vec<u8> {
    let mut memory = vec![0u8; 0x300];
    memory[0..4].copy_from_slice(&PVH_START_INFO_MAGIC.to_le_bytes());
    memory[4..8].copy_from_slice(&1u32.to_le_bytes());
    memory[24..32].copy_from_slice(&(BASE + 0x200).to_le_bytes());
    memory[32..40].copy_from_slice(&0xe0000u64.to_le_bytes());
    memory[40..48].copy_from_slice(&(BASE + 0x100).to_le_bytes());
    memory[48..52].copy_from_slice(&3u32.to_le_bytes());
    let map = [
        (0u64, 0x9fc00u64, 1u32),
        (0x10_0000, 0x7ee_0000, 1),
        (0xfeff_c000, 0x4000, 2),
    ];
    for (index, (start, len, kind)) in map.iter().enumerate() {
        let at = 0x100 + index * 24;
        memory[at..at + 8].copy_from_slice(&start.to_le_bytes());
        memory[at + 8..at + 16].copy_from_slice(&len.to_le_bytes());
        memory[at + 16..at + 20].copy_from_slice(&kind.to_le_bytes());
    }
    memory[0x200..0x200 + 22].copy_from_slice(b"ip=10.0.2.15/24 log=x\0");
    let mut bytes = header(1, 0);
    bytes.extend_from_slice(&memory);
    bytes
}

fn multiboot2_seed() -> Vec<u8> {
    let mut tags = Vec::new();
    let mut tag = |kind: u32, body: &[u8]| {
        let size = 8 + body.len() as u32;
        tags.extend_from_slice(&kind.to_le_bytes());
        tags.extend_from_slice(&size.to_le_bytes());
        tags.extend_from_slice(body);
        while tags.len() % 8 != 0 {
            tags.push(0);
        }
    };
    tag(1, b"mtu=9000 ip=dhcp\0");
    let mut mmap = Vec::new();
    mmap.extend_from_slice(&24u32.to_le_bytes());
    mmap.extend_from_slice(&0u32.to_le_bytes());
    for (start, len, kind) in [
        (0u64, 0x9fc00u64, 1u32),
        (0x10_0000, 0x3ff_0000, 1),
        (0xf_0000, 0x1_0000, 3),
    ] {
        mmap.extend_from_slice(&start.to_le_bytes());
        mmap.extend_from_slice(&len.to_le_bytes());
        mmap.extend_from_slice(&kind.to_le_bytes());
        mmap.extend_from_slice(&0u32.to_le_bytes());
    }
    tag(6, &mmap);
    let mut rsdp = b"RSD PTR ".to_vec();
    rsdp.resize(36, 0);
    tag(15, &rsdp);
    tag(0, &[]);
    let mut memory = ((tags.len() + 8) as u32).to_le_bytes().to_vec();
    memory.extend_from_slice(&[0; 4]);
    memory.extend_from_slice(&tags);
    let mut bytes = header(0, 0);
    bytes.extend_from_slice(&memory);
    bytes
}

fn seeds() -> Vec<Vec<u8>> {
    vec![pvh_seed(), multiboot2_seed()]
}

/// The registration.
pub const TARGET: Target = Target {
    name: "boot-info",
    about: "PVH start info, Multiboot2 tags, memory maps, then the usable-RAM plan",
    default_cases: 200_000,
    max_input_len: 4096,
    memory_bound: 256 * 1024,
    // A 1024-byte command line read bytewise plus a 4096-entry PVH map at 3 reads each.
    step_bound: 2 * 1024 + 3 * 4096 + 4096,
    seeds,
    run,
};
