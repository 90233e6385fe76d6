//! Shared helpers for the QEMU integration tests: images built once, timeouts, output parsing.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use xtask::accel::{self, Accel};
use xtask::image::{Profile, build_app};

pub mod topology;

/// Time a guest gets to boot and print a given line under TCG. Generous: CI has 2 slow cores
/// and runs two guests at once.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(240);
/// Time a guest gets to exit once it has printed its last line.
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(120);
/// Time for one hot-plug step (guest notices, powers the slot, QEMU reports).
pub const HOTPLUG_TIMEOUT: Duration = Duration::from_secs(120);

/// The release image of `app`, built the first time any test asks for it (a failed build is
/// remembered too, so the other tests fail at once instead of rebuilding).
pub fn image(app: &str) -> PathBuf {
    static IMAGES: OnceLock<Mutex<HashMap<String, Result<PathBuf, String>>>> = OnceLock::new();
    let mut images = IMAGES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    images
        .entry(app.to_string())
        .or_insert_with(|| build_app(app, Profile::Release).map_err(|error| error.to_string()))
        .clone()
        .unwrap_or_else(|error| panic!("building image `{app}` failed: {error}"))
}

/// The accelerators every boot test runs under: always TCG, plus KVM when the host really has it
/// (the same decision `cargo xtask run` makes).
pub fn accelerators() -> Vec<Accel> {
    let choice = accel::decide(None);
    if choice.accel == Accel::Kvm {
        vec![Accel::Tcg, Accel::Kvm]
    } else {
        eprintln!("KVM variant skipped: {}", choice.reason);
        vec![Accel::Tcg]
    }
}

/// The lines describing one PCI function in the `hello` tree: its `pci bb:dd.f vvvv:dddd ...`
/// header line and the indented lines under it. `None` if no header names `vendor_device`.
pub fn pci_function_block(lines: &[String], vendor_device: &str) -> Option<Vec<String>> {
    let start = lines.iter().position(|line| {
        line.starts_with("pci ") && line.split_whitespace().nth(2) == Some(vendor_device)
    })?;
    let body = lines[start + 1..]
        .iter()
        .take_while(|line| line.starts_with(' ') || line.starts_with('\t'))
        .cloned();
    Some(std::iter::once(lines[start].clone()).chain(body).collect())
}

/// Parses `0x...` hex.
pub fn parse_hex(text: &str) -> Option<u64> {
    u64::from_str_radix(text.strip_prefix("0x")?, 16).ok()
}

/// Addresses of the BAR lines (`bar0 mem32 0xfe000000 size 0x20000`) in a PCI function block.
pub fn bar_addresses(block: &[String]) -> Vec<u64> {
    block
        .iter()
        .map(|line| line.trim_start())
        .filter(|line| line.starts_with("bar"))
        .filter_map(|line| line.split_whitespace().find_map(parse_hex))
        .collect()
}

/// The address in a hot-plug `bar0=mem32@0xfe200000+0x20000` field.
pub fn hotplug_bar_address(line: &str) -> Option<u64> {
    let field = line
        .split_whitespace()
        .find(|word| word.starts_with("bar"))?;
    let (_, placement) = field.split_once('@')?;
    let address = placement.split('+').next()?;
    parse_hex(address)
}

/// A temporary file removed on drop.
pub struct TempFile {
    path: PathBuf,
}

impl TempFile {
    /// Writes `contents` to a fresh file named after `name`.
    pub fn new(name: &str, contents: &[u8]) -> Self {
        let path = std::env::temp_dir().join(format!("tandem-{}-{name}", std::process::id()));
        std::fs::write(&path, contents)
            .unwrap_or_else(|error| panic!("writing {}: {error}", path.display()));
        TempFile { path }
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// What the test boot sector does after printing its message.
#[derive(Clone, Copy, Debug)]
pub enum BootSectorEnd {
    /// Writes this code to isa-debug-exit.
    Exit(u8),
    /// Halts forever with interrupts off.
    Halt,
}

/// A 1 MiB raw disk whose boot sector prints `message` (CR LF line ends) on COM1, then ends as
/// asked. Lets the harness be tested against real QEMU without the kernel.
pub fn boot_sector_disk(message: &str, end: BootSectorEnd) -> Vec<u8> {
    const MESSAGE_OFFSET: usize = 28;
    let (exit_code, out_or_nop) = match end {
        BootSectorEnd::Exit(code) => (code, 0xEE), // out dx, al
        BootSectorEnd::Halt => (0, 0x90),          // nop
    };
    let address = (0x7C00 + MESSAGE_OFFSET) as u16;
    #[rustfmt::skip]
    let mut disk = vec![
        0xFA,                                       // cli
        0x31, 0xC0,                                 // xor ax, ax
        0x8E, 0xD8,                                 // mov ds, ax
        0xBE, address as u8, (address >> 8) as u8, // mov si, message
        0xBA, 0xF8, 0x03,                           // mov dx, 0x3f8 (COM1 data)
        0xAC,                                       // next: lodsb
        0x84, 0xC0,                                 // test al, al
        0x74, 0x03,                                 // jz done
        0xEE,                                       // out dx, al
        0xEB, 0xF8,                                 // jmp next
        0xBA, 0xF4, 0x00,                           // done: mov dx, 0xf4 (isa-debug-exit)
        0xB0, exit_code,                            // mov al, code
        out_or_nop,                                 // out dx, al | nop
        0xF4,                                       // hlt
        0xEB, 0xFE,                                 // jmp $
    ];
    assert_eq!(disk.len(), MESSAGE_OFFSET);
    disk.extend(message.replace('\n', "\r\n").bytes());
    disk.push(0);
    assert!(disk.len() <= 510, "boot sector message too long");
    disk.resize(510, 0);
    disk.extend([0x55, 0xAA]);
    // SeaBIOS refuses to boot from a disk this small, so pad it to 1 MiB.
    disk.resize(1 << 20, 0);
    disk
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(text: &str) -> Vec<String> {
        text.lines().map(String::from).collect()
    }

    #[test]
    fn finds_a_function_block_and_its_bars() {
        let output = lines(
            "cmdline: log=debug\n\
             pci 00:01.0 1af4:1041 class 02.00.00 ethernet\n  bar1 mem32 0xfebd1000 size 0x1000\n  \
             bar4 mem64 0xfe000000 size 0x4000\n  cap msix@0x98\n\
             pci 01:00.0 8086:10c9 class 02.00.00 ethernet\n  bar0 mem32 0x0 size 0x20000\n\
             hello: done",
        );
        let virtio = pci_function_block(&output, "1af4:1041").unwrap();
        assert_eq!(virtio.len(), 4);
        assert_eq!(bar_addresses(&virtio), [0xfebd1000, 0xfe000000]);
        let igb = pci_function_block(&output, "8086:10c9").unwrap();
        assert_eq!(igb.len(), 2);
        assert_eq!(bar_addresses(&igb), [0]);
        assert!(pci_function_block(&output, "8086:10d3").is_none());
    }

    #[test]
    fn parses_hotplug_bar_fields() {
        let line = "[    3.100000] INFO  hotplug: slot 00:05.0 device arrived: 02:00.0 8086:10d3 \
                    bar0=mem32@0xfe200000+0x20000";
        assert_eq!(hotplug_bar_address(line), Some(0xfe200000));
        assert_eq!(
            hotplug_bar_address("hotplug: device arrived: 8086:10d3"),
            None
        );
    }

    #[test]
    fn boot_sector_has_signature_and_message() {
        let disk = boot_sector_disk("hi\n", BootSectorEnd::Exit(5));
        assert_eq!(disk.len(), 1 << 20);
        assert_eq!(&disk[510..512], [0x55, 0xAA]);
        assert_eq!(&disk[28..33], b"hi\r\n\0");
        assert_eq!(disk[23], 5);
    }
}
