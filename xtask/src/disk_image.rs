//! Bootable disk images of an app: a GPT disk that GRUB 2 boots under BIOS and UEFI (raw, qcow2, VHDX, VHD), or a GRUB rescue ISO.
//!
//! Disk layout (512-byte sectors, partitions 1 MiB aligned), built without root or loop
//! devices — the partition tables are written here, the file system by mtools:
//!
//! | where            | what                                                                   |
//! |------------------|------------------------------------------------------------------------|
//! | LBA 0            | protective MBR whose code is GRUB's `boot.img`, patched with core.img's LBA |
//! | LBA 1–33         | GPT header and the 128 partition entries                               |
//! | 1 MiB            | partition 1, "BIOS boot": GRUB `i386-pc` core.img (blocklist patched)   |
//! | 2 MiB            | partition 2, EFI system partition, FAT32 (see below)                   |
//! | last 33 sectors  | backup GPT                                                             |
//!
//! The ESP holds `EFI/BOOT/BOOTX64.EFI` (GRUB `x86_64-efi`), `boot/grub/grub.cfg` and
//! `tandem/<app>.elf`. Both GRUBs carry every module they use inside themselves and read that
//! one grub.cfg, whose `multiboot2` line is the kernel command line: [`set_cmdline`] (or
//! `mcopy -i <image>@@2097152`) rewrites it in place. qcow2, VHDX and VHD are `qemu-img convert`
//! copies of the raw disk; the ISO comes from `grub-mkrescue` (El Torito for BIOS and UEFI, and
//! hybrid, so it also boots when written to a disk).

use std::collections::hash_map::RandomState;
use std::fmt;
use std::fs::{self, File};
use std::hash::{BuildHasher, Hasher};
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::str::FromStr;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::tools::find_program;

/// Sector size of every image (the only size BIOS `int 13h`, GRUB's `boot.img` and Hyper-V Gen1 all accept).
pub const SECTOR: u64 = 512;
/// First LBA of the BIOS boot partition (core.img).
pub const BIOS_BOOT_START_LBA: u64 = 2048;
/// First LBA of the EFI system partition.
pub const ESP_START_LBA: u64 = 4096;
/// Byte offset of the EFI system partition: `mtools -i <raw image>@@ESP_OFFSET` opens it.
pub const ESP_OFFSET: u64 = ESP_START_LBA * SECTOR;
/// Path of the GRUB configuration inside the ESP (mtools syntax).
pub const GRUB_CFG: &str = "::/boot/grub/grub.cfg";
/// Smallest ESP: FAT32 needs at least 65,525 clusters; with 512-byte clusters that is 32 MiB,
/// and a few MiB more leave room for the kernel.
const ESP_MIN_BYTES: u64 = 61 << 20;
/// Where the GRUB platform directories (`i386-pc`, `x86_64-efi`) are (Debian's grub-pc-bin and
/// grub-efi-amd64-bin).
pub const GRUB_LIB_DIR: &str = "/usr/lib/grub";

const MIB: u64 = 1 << 20;
/// GPT entry array: 128 entries of 128 bytes (UEFI 2.10 §5.3.2: at least 16 KiB).
const GPT_ENTRY_COUNT: u32 = 128;
const GPT_ENTRY_SIZE: u32 = 128;
const GPT_ENTRY_SECTORS: u64 = (GPT_ENTRY_COUNT as u64 * GPT_ENTRY_SIZE as u64) / SECTOR;
/// GPT partition type GUIDs (UEFI 2.10 table 5.7; GRUB's BIOS boot partition).
const ESP_TYPE_GUID: &str = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B";
const BIOS_BOOT_TYPE_GUID: &str = "21686148-6449-6E6F-744E-656564454649";

/// GRUB `boot.img` offsets (grub/include/grub/i386/pc/boot.h).
mod boot_img {
    /// 64-bit LBA of the first sector of core.img.
    pub const KERNEL_SECTOR: usize = 0x5c;
    /// Two-byte `jmp` that skips the "boot drive number looks wrong, assume 0x80" workaround.
    pub const DRIVE_CHECK: usize = 0x66;
    /// First byte the MBR keeps for itself (disk signature, then the partition table).
    pub const CODE_END: usize = 0x1b8;
    /// Size of one blocklist entry at the end of core.img's first sector (diskboot.img).
    pub const BLOCKLIST_ENTRY: usize = 12;
}

/// Modules built into both GRUB images (their dependencies are added by grub-mkimage).
const GRUB_COMMON_MODULES: &[&str] = &[
    "part_gpt",
    "part_msdos",
    "fat",
    "multiboot2",
    "normal",
    "boot",
    "echo",
    "serial",
    "terminal",
];

/// The Debian packages that provide each program this module runs.
const TOOL_PACKAGES: &[(&str, &str)] = &[
    ("grub-mkimage", "grub-common"),
    ("grub-mkrescue", "grub-common"),
    ("mformat", "mtools"),
    ("mmd", "mtools"),
    ("mcopy", "mtools"),
    ("mtype", "mtools"),
    ("xorriso", "xorriso"),
    ("qemu-img", "qemu-utils"),
];

/// Container format of a built image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageFormat {
    /// A raw disk (`.img`): QEMU, cloud-hypervisor disks, `dd` to a real disk.
    Raw,
    /// QEMU copy-on-write (`.qcow2`), for libvirt.
    Qcow2,
    /// Hyper-V Generation 2 (UEFI; Secure Boot off): dynamic VHDX.
    Vhdx,
    /// Hyper-V Generation 1 (BIOS): fixed VHD.
    Vhd,
    /// A hybrid ISO 9660 image (`.iso`): CD-ROM or disk, BIOS or UEFI. Read-only.
    Iso,
}

impl ImageFormat {
    /// Every format, for help texts.
    pub const ALL: [ImageFormat; 5] = [
        ImageFormat::Raw,
        ImageFormat::Qcow2,
        ImageFormat::Vhdx,
        ImageFormat::Vhd,
        ImageFormat::Iso,
    ];

    /// The name accepted by [`FromStr`].
    pub fn name(self) -> &'static str {
        match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
            ImageFormat::Vhdx => "vhdx",
            ImageFormat::Vhd => "vhd",
            ImageFormat::Iso => "iso",
        }
    }

    /// File name extension of the output.
    pub fn extension(self) -> &'static str {
        match self {
            ImageFormat::Raw => "img",
            other => other.name(),
        }
    }

    /// The programs a build in this format runs.
    pub fn programs(self) -> &'static [&'static str] {
        match self {
            ImageFormat::Raw => &["grub-mkimage", "mformat", "mmd", "mcopy"],
            ImageFormat::Qcow2 | ImageFormat::Vhdx | ImageFormat::Vhd => {
                &["grub-mkimage", "mformat", "mmd", "mcopy", "qemu-img"]
            }
            ImageFormat::Iso => &["grub-mkrescue", "xorriso", "mformat", "mcopy"],
        }
    }
}

impl fmt::Display for ImageFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for ImageFormat {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let lower = text.to_ascii_lowercase();
        let wanted = if lower == "img" { "raw" } else { &lower };
        ImageFormat::ALL
            .into_iter()
            .find(|format| format.name() == wanted)
            .ok_or_else(|| {
                let names: Vec<&str> = ImageFormat::ALL.iter().map(|f| f.name()).collect();
                format!(
                    "unknown image format `{text}` (expected one of: {})",
                    names.join(", ")
                )
            })
    }
}

/// The Debian packages missing for building `format` (empty when everything is installed),
/// including GRUB's platform files.
pub fn missing_packages(format: ImageFormat) -> Vec<&'static str> {
    let mut missing: Vec<&'static str> = Vec::new();
    for program in format.programs() {
        if find_program(program).is_none() {
            let package = TOOL_PACKAGES
                .iter()
                .find(|(name, _)| name == program)
                .map_or("grub-common", |(_, package)| package);
            if !missing.contains(&package) {
                missing.push(package);
            }
        }
    }
    for (platform, package) in [
        ("i386-pc", "grub-pc-bin"),
        ("x86_64-efi", "grub-efi-amd64-bin"),
    ] {
        if !Path::new(GRUB_LIB_DIR)
            .join(platform)
            .join("moddep.lst")
            .is_file()
        {
            missing.push(package);
        }
    }
    missing
}

/// Builds a bootable image of `app` (whose kernel is `kernel_elf`) in `out_dir` and returns its
/// path (`<out_dir>/<app>.<ext>`, replaced if it exists). `cmdline` is the kernel command line:
/// whitespace-separated words without quotes, backslashes or control characters.
pub fn build_image(
    kernel_elf: &Path,
    app: &str,
    format: ImageFormat,
    cmdline: &str,
    out_dir: &Path,
    log: &mut dyn FnMut(&str),
) -> Result<PathBuf, String> {
    check_app_name(app)?;
    check_cmdline(cmdline)?;
    let missing = missing_packages(format);
    if !missing.is_empty() {
        return Err(format!(
            "building a {format} image needs these Debian packages: apt-get install {}",
            missing.join(" ")
        ));
    }
    let kernel = fs::read(kernel_elf)
        .map_err(|error| format!("reading the kernel {}: {error}", kernel_elf.display()))?;
    check_multiboot2_header(&kernel)
        .map_err(|error| format!("{}: {error}", kernel_elf.display()))?;
    fs::create_dir_all(out_dir)
        .map_err(|error| format!("creating {}: {error}", out_dir.display()))?;
    let output = out_dir.join(format!("{app}.{}", format.extension()));
    let work = WorkDir::new(out_dir, app)?;
    log(&format!(
        "building the {format} image of `{app}` from {} ({} KiB), command line `{cmdline}`",
        kernel_elf.display(),
        kernel.len() / 1024
    ));
    let config = grub_config(app, cmdline);
    let staged = work
        .path
        .join(format!("{app}.{}.partial", format.extension()));
    match format {
        ImageFormat::Iso => build_iso(&kernel, app, &config, &work.path, &staged, log)?,
        ImageFormat::Raw => build_raw_disk(&kernel, app, &config, &work.path, &staged, log)?,
        ImageFormat::Qcow2 | ImageFormat::Vhdx | ImageFormat::Vhd => {
            let raw = work.path.join(format!("{app}.img"));
            build_raw_disk(&kernel, app, &config, &work.path, &raw, log)?;
            convert(&raw, format, &staged, log)?;
        }
    }
    fs::rename(&staged, &output).map_err(|error| {
        format!(
            "moving {} to {}: {error}",
            staged.display(),
            output.display()
        )
    })?;
    drop(work);
    log(&format!("image ready: {}", output.display()));
    Ok(output)
}

/// Rewrites the kernel command line in the grub.cfg of a raw disk image built by
/// [`build_image`], keeping the rest of the file (and any edits made to it) as it is.
pub fn set_cmdline(
    raw_image: &Path,
    cmdline: &str,
    log: &mut dyn FnMut(&str),
) -> Result<(), String> {
    check_cmdline(cmdline)?;
    let config = read_grub_config(raw_image)?;
    let updated = config_with_cmdline(&config, cmdline)?;
    let dir = raw_image.parent().unwrap_or(Path::new("."));
    let work = WorkDir::new(dir, "cmdline")?;
    let file = work.path.join("grub.cfg");
    fs::write(&file, updated).map_err(|error| format!("writing {}: {error}", file.display()))?;
    let target = esp_target(raw_image);
    run(
        Command::new("mcopy")
            .args(["-o", "-i"])
            .arg(&target)
            .arg(&file)
            .arg(GRUB_CFG),
        log,
    )?;
    log(&format!(
        "{}: kernel command line is now `{cmdline}`",
        raw_image.display()
    ));
    Ok(())
}

/// The grub.cfg inside a raw disk image built by [`build_image`].
pub fn read_grub_config(raw_image: &Path) -> Result<String, String> {
    let output = Command::new("mtype")
        .arg("-i")
        .arg(esp_target(raw_image))
        .arg(GRUB_CFG)
        .output()
        .map_err(|error| format!("running mtype (Debian package mtools): {error}"))?;
    if !output.status.success() {
        return Err(format!(
            "reading {GRUB_CFG} from {}: {}",
            raw_image.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    String::from_utf8(output.stdout).map_err(|_| format!("{GRUB_CFG} is not UTF-8"))
}

/// The `-i` argument that makes mtools open the ESP of a raw disk image.
fn esp_target(raw_image: &Path) -> std::ffi::OsString {
    let mut target = raw_image.as_os_str().to_owned();
    target.push(format!("@@{ESP_OFFSET}"));
    target
}

/// The GRUB configuration of an image: no menu, serial console, one `multiboot2` line.
pub fn grub_config(app: &str, cmdline: &str) -> String {
    format!(
        "# Tandem boot configuration for the `{app}` app, read by GRUB under BIOS and UEFI.\n\
         # The kernel command line is everything after the kernel path on the multiboot2 line:\n\
         # whitespace-separated words; no quotes or backslashes (GRUB would escape them).\n\
         # `cargo xtask image {app} --cmdline ...` rebuilds the image with another one; to edit\n\
         # this file in a raw image, see docs/qemu.md (\"Changing the command line\").\n\
         set timeout=0\n\
         set timeout_style=hidden\n\
         serial --unit=0 --speed=115200\n\
         terminal_input serial\n\
         terminal_output serial\n\
         menuentry \"Tandem {app}\" {{\n\
         \tmultiboot2 {}{}\n\
         \tboot\n\
         }}\n",
        kernel_path(app),
        grub_words(cmdline)
    )
}

/// Where the kernel lives on the ESP (or the ISO).
fn kernel_path(app: &str) -> String {
    format!("/tandem/{app}.elf")
}

/// `cmdline` as GRUB script words, each preceded by a space. Words with characters GRUB's
/// parser treats specially (`$`, `;`, `#`, braces ...) are single-quoted, which GRUB passes
/// through literally.
fn grub_words(cmdline: &str) -> String {
    let mut out = String::new();
    for word in cmdline.split_ascii_whitespace() {
        out.push(' ');
        let plain = word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.,:/=+@%".contains(c));
        if plain {
            out.push_str(word);
        } else {
            out.push('\'');
            out.push_str(word);
            out.push('\'');
        }
    }
    out
}

/// Rejects command lines GRUB cannot pass through unchanged.
fn check_cmdline(cmdline: &str) -> Result<(), String> {
    if let Some(bad) = cmdline
        .chars()
        .find(|&c| matches!(c, '\'' | '"' | '\\') || (c.is_control() && c != ' ' && c != '\t'))
    {
        return Err(format!(
            "the kernel command line may not contain {bad:?}: GRUB would escape or cut it \
             (command line: {cmdline:?})"
        ));
    }
    if cmdline.len() > 1000 {
        return Err(format!(
            "the kernel command line is {} bytes; the kernel keeps 1024 at most",
            cmdline.len()
        ));
    }
    Ok(())
}

/// App names become file names on FAT and in GRUB scripts: keep them plain.
fn check_app_name(app: &str) -> Result<(), String> {
    let plain = !app.is_empty()
        && app.len() <= 64
        && app
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if plain {
        Ok(())
    } else {
        Err(format!(
            "app name `{app}` must be 1-64 characters of letters, digits, `-` and `_`"
        ))
    }
}

/// The command line of `config`'s `multiboot2` line (the words after the kernel path,
/// single quotes removed), or `None` if it has no such line.
pub fn config_cmdline(config: &str) -> Option<String> {
    let line = config
        .lines()
        .find(|line| line.trim_start().starts_with("multiboot2 "))?;
    let words: Vec<String> = line
        .split_ascii_whitespace()
        .skip(2)
        .map(|word| word.replace('\'', ""))
        .collect();
    Some(words.join(" "))
}

/// `config` with the arguments of its `multiboot2` line replaced by `cmdline`.
pub fn config_with_cmdline(config: &str, cmdline: &str) -> Result<String, String> {
    check_cmdline(cmdline)?;
    let mut found = false;
    let mut out = String::with_capacity(config.len() + cmdline.len());
    for line in config.split_inclusive('\n') {
        let body = line.trim_end_matches(['\r', '\n']);
        let ending = &line[body.len()..];
        let indent_len = body.len() - body.trim_start().len();
        let mut words = body.split_ascii_whitespace();
        if !found && words.next() == Some("multiboot2") {
            let Some(kernel) = words.find(|word| !word.starts_with("--")) else {
                return Err("the multiboot2 line of grub.cfg names no kernel".to_string());
            };
            found = true;
            out.push_str(&body[..indent_len]);
            out.push_str("multiboot2 ");
            out.push_str(kernel);
            out.push_str(&grub_words(cmdline));
            out.push_str(ending);
        } else {
            out.push_str(line);
        }
    }
    if found {
        Ok(out)
    } else {
        Err("grub.cfg has no multiboot2 line".to_string())
    }
}

/// Checks that `kernel` is an x86 ELF with a Multiboot2 header where GRUB looks for it (the
/// first 32 KiB, 8-byte aligned, with a valid checksum; Multiboot2 spec §3.1.1).
fn check_multiboot2_header(kernel: &[u8]) -> Result<(), String> {
    if kernel.len() < 64 || &kernel[..4] != b"\x7fELF" {
        return Err("not an ELF file".to_string());
    }
    let window = &kernel[..kernel.len().min(32 * 1024)];
    let found = window.chunks_exact(8).enumerate().any(|(index, chunk)| {
        let magic = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        let offset = index * 8;
        if magic != 0xE852_50D6 || offset + 16 > window.len() {
            return false;
        }
        let field = |at: usize| {
            u32::from_le_bytes([
                window[offset + at],
                window[offset + at + 1],
                window[offset + at + 2],
                window[offset + at + 3],
            ])
        };
        magic
            .wrapping_add(field(4))
            .wrapping_add(field(8))
            .wrapping_add(field(12))
            == 0
    });
    if found {
        Ok(())
    } else {
        Err("no Multiboot2 header in the first 32 KiB: GRUB cannot boot it".to_string())
    }
}

/// Sizes of a disk image holding a kernel of `kernel_len` bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiskLayout {
    /// Sectors in the whole disk.
    pub total_sectors: u64,
    /// Sectors in the EFI system partition (which starts at [`ESP_START_LBA`]).
    pub esp_sectors: u64,
}

impl DiskLayout {
    /// A whole number of MiB (Hyper-V and Azure want that), with the ESP at least twice the
    /// kernel's size so a rebuilt, larger kernel still fits when copied in by hand.
    pub fn for_kernel(kernel_len: u64) -> DiskLayout {
        let esp_bytes = (kernel_len * 2 + 4 * MIB).div_ceil(MIB) * MIB;
        let esp_bytes = esp_bytes.max(ESP_MIN_BYTES);
        // 1 MiB for the MBR and GPT, 1 MiB BIOS boot, the ESP, 1 MiB holding the backup GPT.
        let total_bytes = ESP_OFFSET + esp_bytes + MIB;
        DiskLayout {
            total_sectors: total_bytes / SECTOR,
            esp_sectors: esp_bytes / SECTOR,
        }
    }

    /// Last LBA of the disk (the backup GPT header).
    fn last_lba(&self) -> u64 {
        self.total_sectors - 1
    }
}

fn build_raw_disk(
    kernel: &[u8],
    app: &str,
    config: &str,
    work: &Path,
    output: &Path,
    log: &mut dyn FnMut(&str),
) -> Result<(), String> {
    let layout = DiskLayout::for_kernel(kernel.len() as u64);

    // GRUB for BIOS: core.img finds grub.cfg on partition 2 of the disk the BIOS booted from
    // (the empty device name before the comma).
    let bios_config = work.join("early-bios.cfg");
    write_file(&bios_config, EARLY_CONFIG)?;
    let core_img = work.join("core.img");
    let mut bios_args: Vec<&str> = vec!["biosdisk"];
    bios_args.extend_from_slice(GRUB_COMMON_MODULES);
    run(
        Command::new("grub-mkimage")
            .args(["-O", "i386-pc", "-d"])
            .arg(Path::new(GRUB_LIB_DIR).join("i386-pc"))
            .arg("-c")
            .arg(&bios_config)
            .args(["-p", "(,gpt2)/boot/grub", "-o"])
            .arg(&core_img)
            .args(&bios_args),
        log,
    )?;
    let mut core = read_file(&core_img)?;
    patch_core_blocklist(&mut core, BIOS_BOOT_START_LBA)?;
    let boot_img = read_file(&Path::new(GRUB_LIB_DIR).join("i386-pc/boot.img"))?;
    let mbr = protective_mbr(&boot_img, BIOS_BOOT_START_LBA, layout.total_sectors)?;

    // GRUB for UEFI: with a prefix that names no device, GRUB uses the partition it was loaded
    // from (the ESP).
    let efi_config = work.join("early-efi.cfg");
    write_file(&efi_config, EARLY_CONFIG)?;
    let efi_image = work.join("BOOTX64.EFI");
    run(
        Command::new("grub-mkimage")
            .args(["-O", "x86_64-efi", "-d"])
            .arg(Path::new(GRUB_LIB_DIR).join("x86_64-efi"))
            .arg("-c")
            .arg(&efi_config)
            .args(["-p", "/boot/grub", "-o"])
            .arg(&efi_image)
            .args(GRUB_COMMON_MODULES),
        log,
    )?;

    log(&format!(
        "writing the partition tables: {} MiB disk, BIOS boot partition at 1 MiB ({} KiB core.img), \
         EFI system partition at 2 MiB ({} MiB)",
        layout.total_sectors * SECTOR / MIB,
        core.len() / 1024,
        layout.esp_sectors * SECTOR / MIB
    ));
    let disk_guid = random_guid();
    let tables = gpt_tables(&layout, disk_guid, [random_guid(), random_guid()]);
    let mut file =
        File::create(output).map_err(|error| format!("creating {}: {error}", output.display()))?;
    // A sparse file: only the written sectors take space.
    file.set_len(layout.total_sectors * SECTOR)
        .map_err(|error| format!("sizing {}: {error}", output.display()))?;
    write_at(&mut file, 0, &mbr, output)?;
    write_at(&mut file, SECTOR, &tables.primary, output)?;
    write_at(&mut file, BIOS_BOOT_START_LBA * SECTOR, &core, output)?;
    write_at(
        &mut file,
        (layout.last_lba() - GPT_ENTRY_SECTORS) * SECTOR,
        &tables.backup,
        output,
    )?;
    file.sync_all()
        .map_err(|error| format!("writing {}: {error}", output.display()))?;
    drop(file);

    // The ESP: FAT32 with the volume serial derived from the disk GUID.
    let target = esp_target(output);
    let serial = u32::from_le_bytes([disk_guid[0], disk_guid[1], disk_guid[2], disk_guid[3]]);
    run(
        Command::new("mformat")
            .arg("-i")
            .arg(&target)
            .args(["-F", "-h", "64", "-s", "32", "-v", "TANDEM"])
            .args(["-T", &layout.esp_sectors.to_string()])
            .args(["-H", &ESP_START_LBA.to_string()])
            .args(["-N", &format!("{serial:08x}")])
            .arg("::"),
        log,
    )?;
    run(
        Command::new("mmd").arg("-i").arg(&target).args([
            "::/EFI",
            "::/EFI/BOOT",
            "::/boot",
            "::/boot/grub",
            "::/tandem",
        ]),
        log,
    )?;
    let kernel_file = work.join(format!("{app}.elf"));
    write_file(&kernel_file, kernel)?;
    let config_file = work.join("grub.cfg");
    write_file(&config_file, config)?;
    for (source, destination) in [
        (&efi_image, "::/EFI/BOOT/BOOTX64.EFI".to_string()),
        (&config_file, GRUB_CFG.to_string()),
        (&kernel_file, format!("::{}", kernel_path(app))),
    ] {
        run(
            Command::new("mcopy")
                .arg("-i")
                .arg(&target)
                .arg(source)
                .arg(destination),
            log,
        )?;
    }
    Ok(())
}

/// Built into both GRUB images: the serial console before anything is printed. `normal` then
/// reads `$prefix/grub.cfg`.
const EARLY_CONFIG: &str = "serial --unit=0 --speed=115200\n\
                            terminal_input serial\n\
                            terminal_output serial\n";

fn convert(
    raw: &Path,
    format: ImageFormat,
    output: &Path,
    log: &mut dyn FnMut(&str),
) -> Result<(), String> {
    let (driver, options) = match format {
        ImageFormat::Qcow2 => ("qcow2", None),
        // Dynamic VHDX is what Hyper-V Manager creates by default.
        ImageFormat::Vhdx => ("vhdx", Some("subformat=dynamic")),
        // Fixed VHD is what Hyper-V Gen1 and Azure expect; force_size keeps the exact size
        // instead of rounding to a CHS geometry (which would cut off the backup GPT).
        ImageFormat::Vhd => ("vpc", Some("subformat=fixed,force_size=on")),
        ImageFormat::Raw | ImageFormat::Iso => {
            return Err(format!("{format} is not a qemu-img conversion target"));
        }
    };
    let mut command = Command::new("qemu-img");
    command.args(["convert", "-f", "raw", "-O", driver]);
    if let Some(options) = options {
        command.args(["-o", options]);
    }
    run(command.arg(raw).arg(output), log)?;
    // The format is named explicitly: qemu-img's probe takes a fixed VHD (data + footer) for raw.
    let info = Command::new("qemu-img")
        .args(["info", "--output=json", "-f", driver])
        .arg(output)
        .output()
        .map_err(|error| format!("running qemu-img info: {error}"))?;
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).map_err(|error| {
        format!(
            "qemu-img info {}: {error}: {}",
            output.display(),
            String::from_utf8_lossy(&info.stderr).trim()
        )
    })?;
    let raw_size = fs::metadata(raw)
        .map_err(|error| format!("reading {}: {error}", raw.display()))?
        .len();
    if info["format"] != driver || info["virtual-size"] != raw_size {
        return Err(format!(
            "{} is not a {raw_size}-byte {driver} image: qemu-img info says {info}",
            output.display()
        ));
    }
    log(&format!(
        "qemu-img info: {driver}, virtual size {raw_size} bytes"
    ));
    // A fixed VHD has no metadata for `qemu-img check` to check.
    if format != ImageFormat::Vhd {
        run(
            Command::new("qemu-img")
                .args(["check", "-f", driver])
                .arg(output),
            log,
        )?;
    }
    Ok(())
}

fn build_iso(
    kernel: &[u8],
    app: &str,
    config: &str,
    work: &Path,
    output: &Path,
    log: &mut dyn FnMut(&str),
) -> Result<(), String> {
    let root = work.join("iso-root");
    fs::create_dir_all(root.join("boot/grub"))
        .and_then(|()| fs::create_dir_all(root.join("tandem")))
        .map_err(|error| format!("creating {}: {error}", root.display()))?;
    write_file(&root.join("boot/grub/grub.cfg"), config)?;
    write_file(&root.join(format!("tandem/{app}.elf")), kernel)?;
    let modules = GRUB_COMMON_MODULES.join(" ");
    // grub-mkrescue's built-in UEFI configuration loads every partition module; install them
    // so it does not print an error for each missing one.
    let install = format!("{modules} iso9660 {ISO_PARTITION_MODULES}");
    run(
        Command::new("grub-mkrescue")
            .arg("-o")
            .arg(output)
            .arg(format!("--install-modules={install}"))
            .arg(format!("--modules={modules}"))
            .args(["--fonts=", "--locales=", "--themes="])
            .arg(&root)
            .args(["--", "-volid", "TANDEM"]),
        log,
    )
    .map_err(|error| {
        format!(
            "{error}\n(grub-mkrescue needs grub-pc-bin, grub-efi-amd64-bin, mtools and xorriso)"
        )
    })
}

/// Partition-map modules grub-mkrescue's UEFI image loads at start.
const ISO_PARTITION_MODULES: &str =
    "part_acorn part_amiga part_apple part_bsd part_dfly part_dvh part_plan part_sun part_sunpc";

/// A private scratch directory under the output directory, removed on drop.
struct WorkDir {
    path: PathBuf,
}

impl WorkDir {
    fn new(parent: &Path, label: &str) -> Result<WorkDir, String> {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let unique = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = parent.join(format!(
            ".{label}-image-work-{}-{unique}",
            std::process::id()
        ));
        fs::create_dir_all(&path)
            .map_err(|error| format!("creating {}: {error}", path.display()))?;
        Ok(WorkDir { path })
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        // Best effort: a leftover scratch directory is harmless.
        let _ = fs::remove_dir_all(&self.path);
    }
}

fn read_file(path: &Path) -> Result<Vec<u8>, String> {
    fs::read(path).map_err(|error| format!("reading {}: {error}", path.display()))
}

fn write_file(path: &Path, contents: impl AsRef<[u8]>) -> Result<(), String> {
    fs::write(path, contents).map_err(|error| format!("writing {}: {error}", path.display()))
}

fn write_at(file: &mut File, offset: u64, bytes: &[u8], path: &Path) -> Result<(), String> {
    file.seek(SeekFrom::Start(offset))
        .and_then(|_| file.write_all(bytes))
        .map_err(|error| format!("writing {} at byte {offset}: {error}", path.display()))
}

/// Runs `command`, logging it first; its output is kept for the error message only.
fn run(command: &mut Command, log: &mut dyn FnMut(&str)) -> Result<(), String> {
    let program = command.get_program().to_string_lossy().into_owned();
    let line = std::iter::once(program.clone())
        .chain(
            command
                .get_args()
                .map(|arg| crate::machine::shell_quote(&arg.to_string_lossy())),
        )
        .collect::<Vec<_>>()
        .join(" ");
    log(&format!("$ {line}"));
    let output = command.output().map_err(|error| {
        let package = TOOL_PACKAGES
            .iter()
            .find(|(name, _)| *name == program)
            .map_or("", |(_, package)| package);
        format!("running {program} (Debian package {package}): {error}")
    })?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`{line}` failed ({}): {}{}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim(),
            String::from_utf8_lossy(&output.stdout).trim()
        ))
    }
}

/// Makes core.img loadable from `core_lba`: the first blocklist entry at the end of its first
/// sector (diskboot.img) lists the sectors after that one (GRUB's `grub_pc_bios_boot_blocklist`:
/// u64 start, u16 length, u16 segment).
fn patch_core_blocklist(core: &mut Vec<u8>, core_lba: u64) -> Result<(), String> {
    let sector = SECTOR as usize;
    if core.len() <= sector {
        return Err(format!("core.img is only {} bytes", core.len()));
    }
    core.resize(core.len().div_ceil(sector) * sector, 0);
    let sectors = core.len() / sector;
    let room = (ESP_START_LBA - BIOS_BOOT_START_LBA) as usize;
    if sectors > room {
        return Err(format!(
            "core.img has {sectors} sectors; the BIOS boot partition holds {room}"
        ));
    }
    let entry = sector - boot_img::BLOCKLIST_ENTRY;
    let segment = u16::from_le_bytes([core[entry + 10], core[entry + 11]]);
    // diskboot.img loads the rest of core.img right after itself at 0x8000 + 512 = 0x820:0.
    if segment != 0x820 {
        return Err(format!(
            "core.img's blocklist has segment {segment:#x}, not 0x820: not a GRUB i386-pc diskboot image"
        ));
    }
    core[entry..entry + 8].copy_from_slice(&(core_lba + 1).to_le_bytes());
    core[entry + 8..entry + 10].copy_from_slice(&((sectors - 1) as u16).to_le_bytes());
    Ok(())
}

/// The protective MBR (UEFI 2.10 §5.2.3) carrying GRUB's boot.img code, which loads the sector
/// at `core_lba`.
fn protective_mbr(boot_img: &[u8], core_lba: u64, total_sectors: u64) -> Result<[u8; 512], String> {
    if boot_img.len() != 512 || boot_img[510..512] != [0x55, 0xaa] {
        return Err("GRUB's boot.img is not a 512-byte boot sector".to_string());
    }
    if boot_img[boot_img::DRIVE_CHECK] != 0xeb {
        return Err("GRUB's boot.img has no drive-check jump at 0x66: unknown version".to_string());
    }
    let mut mbr = [0u8; 512];
    mbr[..boot_img::CODE_END].copy_from_slice(&boot_img[..boot_img::CODE_END]);
    mbr[boot_img::KERNEL_SECTOR..boot_img::KERNEL_SECTOR + 8]
        .copy_from_slice(&core_lba.to_le_bytes());
    // As grub-bios-setup does for hard disks: replace the jump with NOPs, so a BIOS that passes
    // a floppy drive number in DL is corrected to 0x80.
    mbr[boot_img::DRIVE_CHECK] = 0x90;
    mbr[boot_img::DRIVE_CHECK + 1] = 0x90;
    let entry = &mut mbr[0x1be..0x1ce];
    entry[0] = 0x00; // not active: UEFI firmware must ignore it, BIOSes run our code anyway
    entry[1..4].copy_from_slice(&[0x00, 0x02, 0x00]); // CHS of LBA 1
    entry[4] = 0xee; // GPT protective
    entry[5..8].copy_from_slice(&[0xff, 0xff, 0xff]); // CHS beyond 8 GiB
    entry[8..12].copy_from_slice(&1u32.to_le_bytes());
    let size = u32::try_from(total_sectors - 1).unwrap_or(u32::MAX);
    entry[12..16].copy_from_slice(&size.to_le_bytes());
    mbr[510] = 0x55;
    mbr[511] = 0xaa;
    Ok(mbr)
}

/// The primary (LBA 1 onwards: header, entries) and backup (entries, header) GPT structures.
struct GptTables {
    primary: Vec<u8>,
    backup: Vec<u8>,
}

/// GPT header and partition entries (UEFI 2.10 §5.3.2–5.3.3) for the two partitions.
fn gpt_tables(
    layout: &DiskLayout,
    disk_guid: [u8; 16],
    partition_guids: [[u8; 16]; 2],
) -> GptTables {
    let mut entries = vec![0u8; (GPT_ENTRY_COUNT * GPT_ENTRY_SIZE) as usize];
    let partitions = [
        (
            BIOS_BOOT_TYPE_GUID,
            BIOS_BOOT_START_LBA,
            ESP_START_LBA - 1,
            "BIOS boot",
        ),
        (
            ESP_TYPE_GUID,
            ESP_START_LBA,
            ESP_START_LBA + layout.esp_sectors - 1,
            "EFI system",
        ),
    ];
    for (index, (type_guid, first, last, name)) in partitions.into_iter().enumerate() {
        let entry = &mut entries[index * GPT_ENTRY_SIZE as usize..][..GPT_ENTRY_SIZE as usize];
        entry[0..16].copy_from_slice(&guid_bytes(type_guid));
        entry[16..32].copy_from_slice(&partition_guids[index]);
        entry[32..40].copy_from_slice(&first.to_le_bytes());
        entry[40..48].copy_from_slice(&last.to_le_bytes());
        // Attributes (48..56) stay zero; the name is UTF-16LE.
        for (slot, unit) in name.encode_utf16().enumerate() {
            entry[56 + slot * 2..58 + slot * 2].copy_from_slice(&unit.to_le_bytes());
        }
    }
    let entries_crc = crc32(&entries);
    let last_lba = layout.last_lba();
    let header = |my_lba: u64, alternate_lba: u64, entries_lba: u64| {
        let mut header = vec![0u8; SECTOR as usize];
        header[0..8].copy_from_slice(b"EFI PART");
        header[8..12].copy_from_slice(&0x0001_0000u32.to_le_bytes());
        header[12..16].copy_from_slice(&92u32.to_le_bytes());
        header[24..32].copy_from_slice(&my_lba.to_le_bytes());
        header[32..40].copy_from_slice(&alternate_lba.to_le_bytes());
        header[40..48].copy_from_slice(&(2 + GPT_ENTRY_SECTORS).to_le_bytes());
        header[48..56].copy_from_slice(&(last_lba - 1 - GPT_ENTRY_SECTORS).to_le_bytes());
        header[56..72].copy_from_slice(&disk_guid);
        header[72..80].copy_from_slice(&entries_lba.to_le_bytes());
        header[80..84].copy_from_slice(&GPT_ENTRY_COUNT.to_le_bytes());
        header[84..88].copy_from_slice(&GPT_ENTRY_SIZE.to_le_bytes());
        header[88..92].copy_from_slice(&entries_crc.to_le_bytes());
        let header_crc = crc32(&header[..92]);
        header[16..20].copy_from_slice(&header_crc.to_le_bytes());
        header
    };
    let mut primary = header(1, last_lba, 2);
    primary.extend_from_slice(&entries);
    let mut backup = entries;
    backup.extend_from_slice(&header(last_lba, 1, last_lba - GPT_ENTRY_SECTORS));
    GptTables { primary, backup }
}

/// A GUID in its on-disk (mixed-endian) byte order from its text form.
fn guid_bytes(text: &str) -> [u8; 16] {
    let hex: Vec<u8> = text
        .bytes()
        .filter(|byte| *byte != b'-')
        .collect::<Vec<u8>>()
        .chunks(2)
        .map(|pair| {
            let digits = std::str::from_utf8(pair).unwrap_or("00");
            u8::from_str_radix(digits, 16).unwrap_or(0)
        })
        .collect();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&hex[..16]);
    // The first three fields are little-endian on disk.
    bytes[0..4].reverse();
    bytes[4..6].reverse();
    bytes[6..8].reverse();
    bytes
}

/// A version-4 (random) GUID, from the standard library's randomly keyed hasher.
fn random_guid() -> [u8; 16] {
    let mut bytes = [0u8; 16];
    for half in bytes.chunks_mut(8) {
        let mut hasher = RandomState::new().build_hasher();
        hasher.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |since| since.as_nanos()),
        );
        half.copy_from_slice(&hasher.finish().to_le_bytes());
    }
    bytes[7] = (bytes[7] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    bytes
}

/// CRC-32 (IEEE 802.3, reflected, as GPT uses).
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for &byte in bytes {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            let mask = (crc & 1).wrapping_neg();
            crc = (crc >> 1) ^ (0xedb8_8320 & mask);
        }
    }
    !crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_matches_the_ieee_check_value() {
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
        assert_eq!(crc32(b""), 0);
    }

    #[test]
    fn guids_are_stored_mixed_endian() {
        assert_eq!(
            guid_bytes(ESP_TYPE_GUID),
            [
                0x28, 0x73, 0x2a, 0xc1, 0x1f, 0xf8, 0xd2, 0x11, 0xba, 0x4b, 0x00, 0xa0, 0xc9, 0x3e,
                0xc9, 0x3b
            ]
        );
        let guid = random_guid();
        assert_eq!(guid[7] >> 4, 4, "version 4");
        assert_eq!(guid[8] >> 6, 0b10, "RFC 4122 variant");
        assert_ne!(random_guid(), guid);
    }

    #[test]
    fn formats_parse_and_name_their_files() {
        assert_eq!("VHDX".parse::<ImageFormat>(), Ok(ImageFormat::Vhdx));
        assert_eq!("img".parse::<ImageFormat>(), Ok(ImageFormat::Raw));
        assert_eq!(ImageFormat::Raw.extension(), "img");
        assert_eq!(ImageFormat::Vhd.extension(), "vhd");
        let error = "vmdk".parse::<ImageFormat>().unwrap_err();
        assert!(error.contains("raw, qcow2, vhdx, vhd, iso"), "{error}");
        for format in ImageFormat::ALL {
            assert_eq!(format.to_string().parse::<ImageFormat>(), Ok(format));
        }
    }

    #[test]
    fn layout_is_mib_aligned_and_grows_with_the_kernel() {
        let small = DiskLayout::for_kernel(2 << 20);
        assert_eq!(small.total_sectors * SECTOR, 64 << 20);
        assert_eq!(small.esp_sectors * SECTOR, ESP_MIN_BYTES);
        let large = DiskLayout::for_kernel(50 << 20);
        assert_eq!(large.esp_sectors * SECTOR, 104 << 20);
        assert_eq!((large.total_sectors * SECTOR) % MIB, 0);
    }

    #[test]
    fn gpt_headers_point_at_each_other_with_valid_checksums() {
        let layout = DiskLayout::for_kernel(1 << 20);
        let tables = gpt_tables(&layout, [7; 16], [[1; 16], [2; 16]]);
        let primary = &tables.primary[..512];
        let backup_start = tables.backup.len() - 512;
        let backup = &tables.backup[backup_start..];
        let entries = &tables.primary[512..];
        assert_eq!(entries, &tables.backup[..backup_start]);
        for (header, my_lba, alternate, entries_lba) in [
            (primary, 1, layout.last_lba(), 2),
            (backup, layout.last_lba(), 1, layout.last_lba() - 32),
        ] {
            let field = |at: usize| u64::from_le_bytes(header[at..at + 8].try_into().unwrap());
            assert_eq!(&header[..8], b"EFI PART");
            assert_eq!(field(24), my_lba);
            assert_eq!(field(32), alternate);
            assert_eq!(field(72), entries_lba);
            assert_eq!(field(40), 34, "first usable LBA");
            assert_eq!(field(48), layout.last_lba() - 33, "last usable LBA");
            let mut zeroed = header[..92].to_vec();
            zeroed[16..20].fill(0);
            assert_eq!(header[16..20], crc32(&zeroed).to_le_bytes());
            assert_eq!(header[88..92], crc32(entries).to_le_bytes());
        }
        let esp = &entries[128..256];
        assert_eq!(esp[..16], guid_bytes(ESP_TYPE_GUID));
        assert_eq!(
            u64::from_le_bytes(esp[32..40].try_into().unwrap()),
            ESP_START_LBA
        );
        let esp_last = u64::from_le_bytes(esp[40..48].try_into().unwrap());
        assert_eq!(esp_last, ESP_START_LBA + layout.esp_sectors - 1);
        assert!(
            esp_last <= layout.last_lba() - 33,
            "ESP overlaps the backup GPT"
        );
        assert!(entries[256..].iter().all(|&byte| byte == 0));
    }

    fn fake_boot_img() -> Vec<u8> {
        let mut image = vec![0xcc; 512];
        image[boot_img::DRIVE_CHECK] = 0xeb;
        image[510] = 0x55;
        image[511] = 0xaa;
        image
    }

    #[test]
    fn protective_mbr_keeps_grub_code_and_points_at_core_img() {
        let mbr = protective_mbr(&fake_boot_img(), 2048, 131_072).unwrap();
        assert_eq!(mbr[0], 0xcc);
        assert_eq!(mbr[0x5c..0x64], 2048u64.to_le_bytes());
        assert_eq!(mbr[0x66..0x68], [0x90, 0x90]);
        assert_eq!(mbr[0x1b8..0x1be], [0; 6], "disk signature area cleared");
        assert_eq!(mbr[0x1c2], 0xee);
        assert_eq!(mbr[0x1c6..0x1ca], 1u32.to_le_bytes());
        assert_eq!(mbr[0x1ca..0x1ce], 131_071u32.to_le_bytes());
        assert!(
            mbr[0x1ce..0x1fe].iter().all(|&byte| byte == 0),
            "one entry only"
        );
        assert_eq!(mbr[510..], [0x55, 0xaa]);
        let mut not_grub = fake_boot_img();
        not_grub[boot_img::DRIVE_CHECK] = 0;
        assert!(protective_mbr(&not_grub, 2048, 131_072).is_err());
    }

    #[test]
    fn core_blocklist_names_the_sectors_after_the_first() {
        let mut core = vec![0u8; 3 * 512 + 100];
        core[500..512].copy_from_slice(&[2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x20, 0x08]);
        patch_core_blocklist(&mut core, 2048).unwrap();
        assert_eq!(core.len(), 4 * 512, "padded to whole sectors");
        assert_eq!(core[500..508], 2049u64.to_le_bytes());
        assert_eq!(core[508..510], 3u16.to_le_bytes());
        let mut wrong = vec![0u8; 1024];
        assert!(patch_core_blocklist(&mut wrong, 2048).is_err());
        let mut huge = vec![0u8; 2049 * 512];
        huge[500..512].copy_from_slice(&[2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x20, 0x08]);
        assert!(patch_core_blocklist(&mut huge, 2048).is_err());
    }

    #[test]
    fn command_line_round_trips_through_grub_cfg() {
        let config = grub_config("hello", "log=debug ip=10.0.2.15/24 tag=$x;y");
        assert!(
            config
                .contains("\tmultiboot2 /tandem/hello.elf log=debug ip=10.0.2.15/24 'tag=$x;y'\n"),
            "{config}"
        );
        assert!(config.contains("set timeout=0\n"));
        assert!(config.contains("terminal_output serial\n"));
        assert_eq!(
            config_cmdline(&config).as_deref(),
            Some("log=debug ip=10.0.2.15/24 tag=$x;y")
        );
        let edited = config.replace("set timeout=0", "set timeout=5");
        let updated = config_with_cmdline(&edited, "echo.port=9").unwrap();
        assert!(updated.contains("set timeout=5\n"), "other edits are kept");
        assert!(updated.contains("\tmultiboot2 /tandem/hello.elf echo.port=9\n"));
        assert_eq!(config_cmdline(&updated).as_deref(), Some("echo.port=9"));
        assert_eq!(
            config_cmdline(&config_with_cmdline(&config, "").unwrap()).as_deref(),
            Some("")
        );
        assert!(config_with_cmdline("set timeout=0\n", "x").is_err());
    }

    #[test]
    fn unrepresentable_command_lines_and_app_names_are_rejected() {
        for bad in ["a=\"b\"", "a='b'", "path=c:\\x", "two\nlines"] {
            let error = check_cmdline(bad).unwrap_err();
            assert!(error.contains("may not contain"), "{error}");
        }
        assert!(check_cmdline(&"x".repeat(1001)).is_err());
        assert!(check_cmdline("log=debug\techo.port=7").is_ok());
        assert!(check_app_name("hello").is_ok());
        assert!(check_app_name("../etc").is_err());
        assert!(check_app_name("").is_err());
    }

    #[test]
    fn kernels_without_a_multiboot2_header_are_refused() {
        let mut kernel = vec![0u8; 8192];
        kernel[..4].copy_from_slice(b"\x7fELF");
        assert!(check_multiboot2_header(&kernel).is_err());
        let header_len = 24u32;
        let magic = 0xE852_50D6u32;
        let checksum = 0u32.wrapping_sub(magic.wrapping_add(header_len));
        for (index, value) in [magic, 0, header_len, checksum].into_iter().enumerate() {
            kernel[4096 + index * 4..4100 + index * 4].copy_from_slice(&value.to_le_bytes());
        }
        assert!(check_multiboot2_header(&kernel).is_ok());
        kernel[4108] ^= 1;
        assert!(check_multiboot2_header(&kernel).is_err(), "bad checksum");
        assert!(check_multiboot2_header(b"MZ not an elf").is_err());
    }
}
