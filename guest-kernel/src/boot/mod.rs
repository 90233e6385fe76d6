//! Boot information from any of our boot protocols: memory map, command line and ACPI RSDP.
//!
//! Three protocols reach the kernel: PVH and Multiboot2 through the 32-bit trampoline, and the
//! Linux x86-64 boot protocol (OpenVMM, and any VMM that boots an ELF `vmlinux`) through the
//! 64-bit entry at the ELF `e_entry`; see [`entry`].
//!
//! The parsers read physical memory through a caller-supplied function, so they run unchanged
//! on the host against byte arrays in unit tests. Everything is copied into fixed-size,
//! owned structures: the loader's memory is not trusted to stay intact once we allocate.

#[cfg(not(any(test, feature = "host")))]
pub mod entry;

use core::fmt;

/// Multiboot2 boot loaders leave this in `eax`.
pub const MULTIBOOT2_MAGIC: u32 = 0x36d7_6289;
/// First field of a PVH `hvm_start_info`.
pub const PVH_START_INFO_MAGIC: u32 = 0x336e_c578;
/// What the 64-bit Linux boot protocol entry passes as `magic` (the setup header's "HdrS"), with
/// the `boot_params` address as `info`.
pub const LINUX_BOOT_MAGIC: u32 = 0x5372_6448;

/// Field offsets in the Linux x86 `boot_params` ("zero page"), from the kernel's
/// Documentation/arch/x86/zero-page.rst and boot.rst.
mod zero_page {
    /// `acpi_rsdp_addr` (u64, boot protocol 2.14+; 0 = not provided).
    pub const ACPI_RSDP_ADDR: u64 = 0x070;
    /// `ext_cmd_line_ptr` (u32): bits 32..63 of the command line address.
    pub const EXT_CMD_LINE_PTR: u64 = 0x0c8;
    /// `e820_entries` (u8).
    pub const E820_ENTRIES: u64 = 0x1e8;
    /// `hdr.header` (u32), "HdrS" when a setup header is present.
    pub const HEADER_MAGIC: u64 = 0x202;
    /// `hdr.cmd_line_ptr` (u32): bits 0..31 of the NUL-terminated command line address.
    pub const CMD_LINE_PTR: u64 = 0x228;
    /// `hdr.cmdline_size` (u32): the longest command line the kernel accepts; loaders fill it
    /// with the length of the line they wrote (OpenVMM, Firecracker).
    pub const CMDLINE_SIZE: u64 = 0x238;
    /// `e820_table`: up to [`E820_MAX_ENTRIES`] packed 20-byte entries (addr u64, size u64,
    /// type u32).
    pub const E820_TABLE: u64 = 0x2d0;
    /// Capacity of `e820_table`.
    pub const E820_MAX_ENTRIES: u8 = 128;
    /// Size of one `e820_table` entry.
    pub const E820_ENTRY_SIZE: u64 = 20;
}

/// Longest command line we keep.
pub const MAX_CMDLINE: usize = 1024;
/// Most memory map entries we keep.
pub const MAX_MEMORY_REGIONS: usize = 64;

/// Which protocol started us.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum BootProtocol {
    /// Xen PVH direct boot (QEMU `-kernel`, Firecracker, cloud-hypervisor).
    Pvh,
    /// Multiboot2 (GRUB).
    Multiboot2,
    /// The Linux x86-64 boot protocol, 64-bit entry (OpenVMM, Firecracker with an ELF kernel).
    LinuxBoot,
}

impl fmt::Display for BootProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BootProtocol::Pvh => write!(f, "PVH"),
            BootProtocol::Multiboot2 => write!(f, "Multiboot2"),
            BootProtocol::LinuxBoot => write!(f, "the Linux x86-64 boot protocol"),
        }
    }
}

/// E820-style memory region types (shared by PVH and Multiboot2).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum RegionKind {
    /// Usable RAM.
    Usable,
    /// Reserved by firmware or hardware.
    Reserved,
    /// ACPI tables, reclaimable after parsing.
    AcpiReclaimable,
    /// ACPI non-volatile storage.
    AcpiNvs,
    /// Defective RAM.
    Unusable,
}

impl RegionKind {
    fn from_e820(kind: u32) -> RegionKind {
        match kind {
            1 => RegionKind::Usable,
            3 => RegionKind::AcpiReclaimable,
            4 => RegionKind::AcpiNvs,
            5 => RegionKind::Unusable,
            _ => RegionKind::Reserved,
        }
    }
}

/// One physical memory region.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct MemoryRegion {
    /// First byte.
    pub start: u64,
    /// Length in bytes.
    pub len: u64,
    /// What it is.
    pub kind: RegionKind,
}

impl MemoryRegion {
    /// One past the last byte (saturating).
    pub fn end(&self) -> u64 {
        self.start.saturating_add(self.len)
    }
}

/// Where the ACPI root pointer is.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum RsdpLocation {
    /// Not provided by the loader: scan the BIOS areas.
    Unknown,
    /// At this physical address (PVH, Linux `acpi_rsdp_addr`).
    Physical(u64),
    /// A copy in the boot information (Multiboot2 tags 14/15), up to 36 bytes.
    Copy([u8; 36]),
}

/// Everything the kernel takes from the boot loader.
#[derive(Clone)]
pub struct BootInfo {
    /// Which protocol started us.
    pub protocol: BootProtocol,
    cmdline: [u8; MAX_CMDLINE],
    cmdline_len: usize,
    regions: [MemoryRegion; MAX_MEMORY_REGIONS],
    region_count: usize,
    /// Where the ACPI RSDP is.
    pub rsdp: RsdpLocation,
    /// Memory map entries dropped because there were too many or they were malformed.
    pub dropped_regions: usize,
}

/// Why boot information could not be used.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum BootInfoError {
    /// Neither a Multiboot2 magic nor a PVH start_info magic was found.
    UnknownProtocol,
    /// A structure could not be read from memory.
    Unreadable(&'static str),
    /// A size or count was out of range.
    Malformed(&'static str),
    /// No usable RAM in the memory map.
    NoMemory,
}

impl fmt::Display for BootInfoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BootInfoError::UnknownProtocol => write!(f, "unknown boot protocol"),
            BootInfoError::Unreadable(what) => write!(f, "cannot read {what}"),
            BootInfoError::Malformed(what) => write!(f, "malformed {what}"),
            BootInfoError::NoMemory => write!(f, "no usable RAM in the memory map"),
        }
    }
}

/// Reads `buffer.len()` bytes of physical memory at the address; false if not readable.
pub type PhysicalReader<'a> = &'a dyn Fn(u64, &mut [u8]) -> bool;

fn read_u32(read: PhysicalReader, addr: u64, what: &'static str) -> Result<u32, BootInfoError> {
    let mut bytes = [0u8; 4];
    if !read(addr, &mut bytes) {
        return Err(BootInfoError::Unreadable(what));
    }
    Ok(u32::from_le_bytes(bytes))
}

fn read_u64(read: PhysicalReader, addr: u64, what: &'static str) -> Result<u64, BootInfoError> {
    let mut bytes = [0u8; 8];
    if !read(addr, &mut bytes) {
        return Err(BootInfoError::Unreadable(what));
    }
    Ok(u64::from_le_bytes(bytes))
}

impl BootInfo {
    fn empty(protocol: BootProtocol) -> BootInfo {
        BootInfo {
            protocol,
            cmdline: [0; MAX_CMDLINE],
            cmdline_len: 0,
            regions: [MemoryRegion {
                start: 0,
                len: 0,
                kind: RegionKind::Reserved,
            }; MAX_MEMORY_REGIONS],
            region_count: 0,
            rsdp: RsdpLocation::Unknown,
            dropped_regions: 0,
        }
    }

    /// Parses the boot information for whichever protocol left `magic` in `eax` and `info` in
    /// `ebx` (or, from the 64-bit entry, [`LINUX_BOOT_MAGIC`] and the `boot_params` address).
    pub fn parse(magic: u32, info: u64, read: PhysicalReader) -> Result<BootInfo, BootInfoError> {
        if magic == MULTIBOOT2_MAGIC {
            return Self::parse_multiboot2(info, read);
        }
        if magic == LINUX_BOOT_MAGIC {
            return Self::parse_linux_boot_params(info, read);
        }
        if read_u32(read, info, "start_info")? == PVH_START_INFO_MAGIC {
            return Self::parse_pvh(info, read);
        }
        Err(BootInfoError::UnknownProtocol)
    }

    /// Parses a PVH `hvm_start_info` (version 1 carries the memory map).
    pub fn parse_pvh(info: u64, read: PhysicalReader) -> Result<BootInfo, BootInfoError> {
        let mut boot = BootInfo::empty(BootProtocol::Pvh);
        let version = read_u32(read, info + 4, "start_info version")?;
        let cmdline_addr = read_u64(read, info + 24, "start_info cmdline")?;
        let rsdp = read_u64(read, info + 32, "start_info rsdp")?;
        if rsdp != 0 {
            boot.rsdp = RsdpLocation::Physical(rsdp);
        }
        if cmdline_addr != 0 {
            boot.read_c_string(cmdline_addr, read);
        }
        if version < 1 {
            return Err(BootInfoError::Malformed(
                "PVH start_info without a memory map",
            ));
        }
        let map_addr = read_u64(read, info + 40, "start_info memmap")?;
        let entries = read_u32(read, info + 48, "start_info memmap entries")?;
        if entries > 4096 {
            return Err(BootInfoError::Malformed("PVH memory map entry count"));
        }
        for index in 0..u64::from(entries) {
            let entry = map_addr + index * 24;
            let start = read_u64(read, entry, "memmap entry")?;
            let len = read_u64(read, entry + 8, "memmap entry")?;
            let kind = read_u32(read, entry + 16, "memmap entry")?;
            boot.push_region(start, len, RegionKind::from_e820(kind));
        }
        boot.finish()
    }

    /// Parses a Multiboot2 boot information structure.
    pub fn parse_multiboot2(info: u64, read: PhysicalReader) -> Result<BootInfo, BootInfoError> {
        let mut boot = BootInfo::empty(BootProtocol::Multiboot2);
        let total = u64::from(read_u32(read, info, "multiboot2 info")?);
        if !(16..=(1 << 20)).contains(&total) {
            return Err(BootInfoError::Malformed("multiboot2 total size"));
        }
        let end = info + total;
        let mut tag = info + 8;
        while tag + 8 <= end {
            let kind = read_u32(read, tag, "multiboot2 tag")?;
            let size = u64::from(read_u32(read, tag + 4, "multiboot2 tag")?);
            if kind == 0 {
                break;
            }
            if size < 8 || tag + size > end {
                return Err(BootInfoError::Malformed("multiboot2 tag size"));
            }
            match kind {
                1 => boot.read_bounded_string(tag + 8, size - 8, read),
                6 => {
                    let entry_size = u64::from(read_u32(read, tag + 8, "mmap tag")?);
                    if entry_size < 24 {
                        return Err(BootInfoError::Malformed("multiboot2 mmap entry size"));
                    }
                    let mut entry = tag + 16;
                    while entry + entry_size <= tag + size {
                        let start = read_u64(read, entry, "mmap entry")?;
                        let len = read_u64(read, entry + 8, "mmap entry")?;
                        let kind = read_u32(read, entry + 16, "mmap entry")?;
                        boot.push_region(start, len, RegionKind::from_e820(kind));
                        entry += entry_size;
                    }
                }
                14 | 15 => {
                    let mut copy = [0u8; 36];
                    let len = ((size - 8) as usize).min(36);
                    if !read(tag + 8, &mut copy[..len]) {
                        return Err(BootInfoError::Unreadable("ACPI RSDP tag"));
                    }
                    // Prefer the ACPI 2.0 copy (tag 15) when both are present.
                    if kind == 15 || boot.rsdp == RsdpLocation::Unknown {
                        boot.rsdp = RsdpLocation::Copy(copy);
                    }
                }
                _ => {}
            }
            tag += (size + 7) & !7;
        }
        boot.finish()
    }

    /// Parses a Linux x86 `boot_params` page: the e820 map, the command line through
    /// `cmd_line_ptr` (+ `ext_cmd_line_ptr`), the RSDP from `acpi_rsdp_addr` when set (else the
    /// caller scans the BIOS area, which is where OpenVMM puts it).
    pub fn parse_linux_boot_params(
        params: u64,
        read: PhysicalReader,
    ) -> Result<BootInfo, BootInfoError> {
        let mut boot = BootInfo::empty(BootProtocol::LinuxBoot);
        let mut byte = [0u8; 1];
        if !read(params + zero_page::E820_ENTRIES, &mut byte) {
            return Err(BootInfoError::Unreadable("boot_params e820_entries"));
        }
        let entries = byte[0];
        if entries > zero_page::E820_MAX_ENTRIES {
            return Err(BootInfoError::Malformed("boot_params e820_entries"));
        }
        for index in 0..u64::from(entries) {
            let entry = params + zero_page::E820_TABLE + index * zero_page::E820_ENTRY_SIZE;
            let start = read_u64(read, entry, "e820 entry")?;
            let len = read_u64(read, entry + 8, "e820 entry")?;
            let kind = read_u32(read, entry + 16, "e820 entry")?;
            boot.push_region(start, len, RegionKind::from_e820(kind));
        }
        let rsdp = read_u64(read, params + zero_page::ACPI_RSDP_ADDR, "acpi_rsdp_addr")?;
        if rsdp != 0 {
            boot.rsdp = RsdpLocation::Physical(rsdp);
        }
        let has_setup_header =
            read_u32(read, params + zero_page::HEADER_MAGIC, "setup header")? == LINUX_BOOT_MAGIC;
        let low = read_u32(read, params + zero_page::CMD_LINE_PTR, "cmd_line_ptr")?;
        let high = read_u32(
            read,
            params + zero_page::EXT_CMD_LINE_PTR,
            "ext_cmd_line_ptr",
        )?;
        let cmdline_addr = u64::from(high) << 32 | u64::from(low);
        if cmdline_addr != 0 {
            // `cmdline_size` bounds the line only when a setup header says the field is real.
            let size = read_u32(read, params + zero_page::CMDLINE_SIZE, "cmdline_size")?;
            if has_setup_header && size != 0 {
                boot.read_bounded_string(cmdline_addr, u64::from(size), read);
            } else {
                boot.read_c_string(cmdline_addr, read);
            }
        }
        boot.finish()
    }

    fn finish(mut self) -> Result<BootInfo, BootInfoError> {
        self.regions[..self.region_count].sort_unstable_by_key(|region| region.start);
        if !self
            .regions()
            .iter()
            .any(|region| region.kind == RegionKind::Usable)
        {
            return Err(BootInfoError::NoMemory);
        }
        Ok(self)
    }

    fn push_region(&mut self, start: u64, len: u64, kind: RegionKind) {
        if len == 0 || start.checked_add(len).is_none() || self.region_count == MAX_MEMORY_REGIONS {
            self.dropped_regions += 1;
            return;
        }
        self.regions[self.region_count] = MemoryRegion { start, len, kind };
        self.region_count += 1;
    }

    fn read_c_string(&mut self, addr: u64, read: PhysicalReader) {
        let mut byte = [0u8; 1];
        let mut len = 0;
        while len < MAX_CMDLINE && read(addr + len as u64, &mut byte) && byte[0] != 0 {
            self.cmdline[len] = byte[0];
            len += 1;
        }
        self.cmdline_len = len;
    }

    fn read_bounded_string(&mut self, addr: u64, max: u64, read: PhysicalReader) {
        let mut byte = [0u8; 1];
        let mut len = 0;
        while (len as u64) < max
            && len < MAX_CMDLINE
            && read(addr + len as u64, &mut byte)
            && byte[0] != 0
        {
            self.cmdline[len] = byte[0];
            len += 1;
        }
        self.cmdline_len = len;
    }

    /// The kernel command line (non-UTF-8 bytes are replaced by nothing: we keep the valid prefix).
    pub fn cmdline(&self) -> &str {
        let bytes = &self.cmdline[..self.cmdline_len];
        match core::str::from_utf8(bytes) {
            Ok(text) => text.trim(),
            Err(error) => core::str::from_utf8(&bytes[..error.valid_up_to()])
                .unwrap_or("")
                .trim(),
        }
    }

    /// The memory map, sorted by start address.
    pub fn regions(&self) -> &[MemoryRegion] {
        &self.regions[..self.region_count]
    }
}

/// Looks up `key=value` (or a bare `key`, which yields `""`) on a command line.
pub fn cmdline_value<'a>(cmdline: &'a str, key: &str) -> Option<&'a str> {
    cmdline
        .split_ascii_whitespace()
        .find_map(|word| match word.split_once('=') {
            Some((name, value)) if name == key => Some(value),
            None if word == key => Some(""),
            _ => None,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    /// A sparse fake physical memory.
    struct Memory(RefCell<Vec<(u64, Vec<u8>)>>);

    impl Memory {
        fn new() -> Memory {
            Memory(RefCell::new(Vec::new()))
        }
        fn put(&self, addr: u64, bytes: &[u8]) {
            self.0.borrow_mut().push((addr, bytes.to_vec()));
        }
        fn read(&self, addr: u64, buffer: &mut [u8]) -> bool {
            for (base, bytes) in self.0.borrow().iter() {
                let end = base + bytes.len() as u64;
                if addr >= *base && addr + buffer.len() as u64 <= end {
                    let offset = (addr - base) as usize;
                    buffer.copy_from_slice(&bytes[offset..offset + buffer.len()]);
                    return true;
                }
            }
            false
        }
    }

    fn pvh_memory(cmdline: &[u8], entries: &[(u64, u64, u32)]) -> Memory {
        let memory = Memory::new();
        let mut info = Vec::new();
        info.extend_from_slice(&PVH_START_INFO_MAGIC.to_le_bytes());
        info.extend_from_slice(&1u32.to_le_bytes()); // version
        info.extend_from_slice(&0u32.to_le_bytes()); // flags
        info.extend_from_slice(&0u32.to_le_bytes()); // nr_modules
        info.extend_from_slice(&0u64.to_le_bytes()); // modlist
        info.extend_from_slice(&0x2000u64.to_le_bytes()); // cmdline
        info.extend_from_slice(&0xf_5a40u64.to_le_bytes()); // rsdp
        info.extend_from_slice(&0x3000u64.to_le_bytes()); // memmap
        info.extend_from_slice(&(entries.len() as u32).to_le_bytes());
        info.extend_from_slice(&0u32.to_le_bytes());
        memory.put(0x1000, &info);
        let mut line = cmdline.to_vec();
        line.push(0);
        memory.put(0x2000, &line);
        let mut map = Vec::new();
        for (start, len, kind) in entries {
            map.extend_from_slice(&start.to_le_bytes());
            map.extend_from_slice(&len.to_le_bytes());
            map.extend_from_slice(&kind.to_le_bytes());
            map.extend_from_slice(&0u32.to_le_bytes());
        }
        memory.put(0x3000, &map);
        memory
    }

    #[test]
    fn pvh_start_info_gives_cmdline_memory_map_and_rsdp() {
        let memory = pvh_memory(
            b"log=debug ip=10.0.2.15/24",
            &[
                (0x10_0000, 0x3f0_0000, 1),
                (0, 0x9fc00, 1),
                (0xfeff_c000, 0x4000, 2),
            ],
        );
        let reader = |addr: u64, buffer: &mut [u8]| memory.read(addr, buffer);
        let boot = BootInfo::parse(0, 0x1000, &reader).unwrap();
        assert_eq!(boot.protocol, BootProtocol::Pvh);
        assert_eq!(boot.cmdline(), "log=debug ip=10.0.2.15/24");
        assert_eq!(boot.rsdp, RsdpLocation::Physical(0xf_5a40));
        let starts: Vec<u64> = boot.regions().iter().map(|r| r.start).collect();
        assert_eq!(starts, vec![0, 0x10_0000, 0xfeff_c000], "sorted by start");
        assert_eq!(boot.regions()[2].kind, RegionKind::Reserved);
        assert_eq!(cmdline_value(boot.cmdline(), "log"), Some("debug"));
        assert_eq!(cmdline_value(boot.cmdline(), "ip"), Some("10.0.2.15/24"));
        assert_eq!(cmdline_value(boot.cmdline(), "gw"), None);
    }

    #[test]
    fn pvh_without_usable_ram_or_with_absurd_counts_is_rejected() {
        let memory = pvh_memory(b"", &[(0xfeff_c000, 0x4000, 2)]);
        let reader = |addr: u64, buffer: &mut [u8]| memory.read(addr, buffer);
        assert_eq!(
            BootInfo::parse(0, 0x1000, &reader).err(),
            Some(BootInfoError::NoMemory)
        );

        let memory = pvh_memory(b"", &[(0, 0x1000, 1)]);
        memory.0.borrow_mut()[0].1[48..52].copy_from_slice(&100_000u32.to_le_bytes());
        let reader = |addr: u64, buffer: &mut [u8]| memory.read(addr, buffer);
        assert!(matches!(
            BootInfo::parse(0, 0x1000, &reader),
            Err(BootInfoError::Malformed(_))
        ));
    }

    #[test]
    fn unknown_protocol_is_reported() {
        let memory = Memory::new();
        memory.put(0x1000, &[0u8; 64]);
        let reader = |addr: u64, buffer: &mut [u8]| memory.read(addr, buffer);
        assert_eq!(
            BootInfo::parse(0, 0x1000, &reader).err(),
            Some(BootInfoError::UnknownProtocol)
        );
    }

    fn multiboot2_info(tags: &[(u32, Vec<u8>)]) -> Vec<u8> {
        let mut body = Vec::new();
        for (kind, payload) in tags {
            body.extend_from_slice(&kind.to_le_bytes());
            body.extend_from_slice(&(8 + payload.len() as u32).to_le_bytes());
            body.extend_from_slice(payload);
            while body.len() % 8 != 0 {
                body.push(0);
            }
        }
        body.extend_from_slice(&0u32.to_le_bytes());
        body.extend_from_slice(&8u32.to_le_bytes());
        let mut info = Vec::new();
        info.extend_from_slice(&(8 + body.len() as u32).to_le_bytes());
        info.extend_from_slice(&0u32.to_le_bytes());
        info.extend_from_slice(&body);
        info
    }

    #[test]
    fn multiboot2_tags_give_cmdline_memory_map_and_rsdp_copy() {
        let mut mmap = Vec::new();
        mmap.extend_from_slice(&24u32.to_le_bytes());
        mmap.extend_from_slice(&0u32.to_le_bytes());
        for (start, len, kind) in [(0u64, 0x9fc00u64, 1u32), (0x10_0000, 0x1f0_0000, 1)] {
            mmap.extend_from_slice(&start.to_le_bytes());
            mmap.extend_from_slice(&len.to_le_bytes());
            mmap.extend_from_slice(&kind.to_le_bytes());
            mmap.extend_from_slice(&0u32.to_le_bytes());
        }
        let mut rsdp = b"RSD PTR ".to_vec();
        rsdp.resize(20, 7);
        let info = multiboot2_info(&[
            (1, b"echo.port=9\0".to_vec()),
            (6, mmap),
            (14, rsdp.clone()),
        ]);
        let memory = Memory::new();
        memory.put(0x8000, &info);
        let reader = |addr: u64, buffer: &mut [u8]| memory.read(addr, buffer);
        let boot = BootInfo::parse(MULTIBOOT2_MAGIC, 0x8000, &reader).unwrap();
        assert_eq!(boot.protocol, BootProtocol::Multiboot2);
        assert_eq!(boot.cmdline(), "echo.port=9");
        assert_eq!(boot.regions().len(), 2);
        assert_eq!(boot.regions()[1].len, 0x1f0_0000);
        match boot.rsdp {
            RsdpLocation::Copy(copy) => assert_eq!(&copy[..8], b"RSD PTR "),
            other => panic!("expected an RSDP copy, got {other:?}"),
        }
    }

    #[test]
    fn multiboot2_tag_overrunning_the_structure_is_rejected() {
        let mut info = multiboot2_info(&[(1, b"x\0".to_vec())]);
        info[12..16].copy_from_slice(&4096u32.to_le_bytes()); // tag size beyond total
        let memory = Memory::new();
        memory.put(0x8000, &info);
        let reader = |addr: u64, buffer: &mut [u8]| memory.read(addr, buffer);
        assert!(matches!(
            BootInfo::parse(MULTIBOOT2_MAGIC, 0x8000, &reader),
            Err(BootInfoError::Malformed(_))
        ));
    }

    /// A `boot_params` page as OpenVMM builds it for an ELF kernel: a minimal setup header, the
    /// command line at 0x3000 (length in `cmdline_size`, no NUL counted), no `acpi_rsdp_addr`.
    fn linux_zero_page(cmdline: &[u8], entries: &[(u64, u64, u32)]) -> Vec<u8> {
        let mut page = vec![0u8; 4096];
        page[0x1e8] = entries.len() as u8;
        page[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
        page[0x202..0x206].copy_from_slice(&LINUX_BOOT_MAGIC.to_le_bytes());
        page[0x210] = 0xff; // type_of_loader
        page[0x228..0x22c].copy_from_slice(&0x3000u32.to_le_bytes());
        page[0x238..0x23c].copy_from_slice(&(cmdline.len() as u32).to_le_bytes());
        for (index, (start, len, kind)) in entries.iter().enumerate() {
            let entry = 0x2d0 + index * 20;
            page[entry..entry + 8].copy_from_slice(&start.to_le_bytes());
            page[entry + 8..entry + 16].copy_from_slice(&len.to_le_bytes());
            page[entry + 16..entry + 20].copy_from_slice(&kind.to_le_bytes());
        }
        page
    }

    /// The e820 map OpenVMM handed a 512 MiB guest (observed layout).
    const OPENVMM_E820: &[(u64, u64, u32)] = &[
        (0, 0x1a000, 1),
        (0x1a000, 0x3000, 3),
        (0x1d000, 0xc3000, 1),
        (0xe0000, 0x20000, 2),
        (0x10_0000, 0x1ff0_0000, 1),
    ];

    #[test]
    fn linux_boot_params_give_e820_map_and_command_line() {
        let cmdline = b"panic=-1 debug pci=off log=debug echo.port=7";
        let memory = Memory::new();
        memory.put(0x2000, &linux_zero_page(cmdline, OPENVMM_E820));
        // Bytes right after `cmdline_size` that a reader looking only for the NUL would take.
        let mut line = cmdline.to_vec();
        line.extend_from_slice(b" garbage\0");
        memory.put(0x3000, &line);
        let reader = |addr: u64, buffer: &mut [u8]| memory.read(addr, buffer);
        let boot = BootInfo::parse(LINUX_BOOT_MAGIC, 0x2000, &reader).unwrap();
        assert_eq!(boot.protocol, BootProtocol::LinuxBoot);
        assert_eq!(
            boot.cmdline(),
            "panic=-1 debug pci=off log=debug echo.port=7"
        );
        assert_eq!(cmdline_value(boot.cmdline(), "echo.port"), Some("7"));
        assert_eq!(boot.regions().len(), 5);
        assert_eq!(boot.regions()[1].kind, RegionKind::AcpiReclaimable);
        assert_eq!(boot.regions()[3].kind, RegionKind::Reserved);
        assert_eq!(boot.regions()[4].end(), 0x2000_0000);
        assert_eq!(
            boot.rsdp,
            RsdpLocation::Unknown,
            "OpenVMM: found by the BIOS-area scan"
        );
    }

    #[test]
    fn linux_boot_params_rsdp_address_and_high_command_line_are_used() {
        let memory = Memory::new();
        let mut page = linux_zero_page(b"", OPENVMM_E820);
        page[0x70..0x78].copy_from_slice(&0xf_5a40u64.to_le_bytes());
        // A command line above 4 GiB, NUL-terminated, without a setup header to size it.
        page[0x202..0x206].fill(0);
        page[0x228..0x22c].copy_from_slice(&0x10u32.to_le_bytes());
        page[0xc8..0xcc].copy_from_slice(&1u32.to_le_bytes());
        memory.put(0x2000, &page);
        memory.put(0x1_0000_0010, b"log=info\0");
        let reader = |addr: u64, buffer: &mut [u8]| memory.read(addr, buffer);
        let boot = BootInfo::parse(LINUX_BOOT_MAGIC, 0x2000, &reader).unwrap();
        assert_eq!(boot.rsdp, RsdpLocation::Physical(0xf_5a40));
        assert_eq!(boot.cmdline(), "log=info");
    }

    #[test]
    fn linux_boot_params_with_bad_counts_or_no_ram_are_rejected() {
        let memory = Memory::new();
        let mut page = linux_zero_page(b"", OPENVMM_E820);
        page[0x1e8] = 200;
        memory.put(0x2000, &page);
        let reader = |addr: u64, buffer: &mut [u8]| memory.read(addr, buffer);
        assert_eq!(
            BootInfo::parse(LINUX_BOOT_MAGIC, 0x2000, &reader).err(),
            Some(BootInfoError::Malformed("boot_params e820_entries"))
        );

        let memory = Memory::new();
        memory.put(0x2000, &linux_zero_page(b"", &[(0xe0000, 0x20000, 2)]));
        let reader = |addr: u64, buffer: &mut [u8]| memory.read(addr, buffer);
        assert_eq!(
            BootInfo::parse(LINUX_BOOT_MAGIC, 0x2000, &reader).err(),
            Some(BootInfoError::NoMemory)
        );

        // The page itself unreadable (a bogus RSI).
        let memory = Memory::new();
        let reader = |addr: u64, buffer: &mut [u8]| memory.read(addr, buffer);
        assert!(matches!(
            BootInfo::parse(LINUX_BOOT_MAGIC, 0x2000, &reader),
            Err(BootInfoError::Unreadable(_))
        ));
    }
}
