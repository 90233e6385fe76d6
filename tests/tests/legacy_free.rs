//! A machine without PCI, PIT or PIC (what a Hyper-V Gen2 VM lacks): QEMU's `microvm` with
//! `pit=off,pic=off`. The kernel must boot, say what is missing in plain log lines, and run
//! the app — Hyper-V itself cannot be emulated under TCG, so this is the closest stand-in.

use tandem_tests::{BOOT_TIMEOUT, EXIT_TIMEOUT, image};
use xtask::machine::Board;
use xtask::{Accel, QemuBuilder};

#[test]
fn hello_boots_without_pci_pit_or_pic_and_says_so() {
    let mut qemu = QemuBuilder::new("hello legacy-free", Accel::Tcg)
        .board(Board::LegacyFree)
        .kernel(image("hello"))
        .cmdline("log=debug")
        .spawn()
        .unwrap_or_else(|error| panic!("{error}"));
    qemu.wait_for_line("hello: done", BOOT_TIMEOUT)
        .unwrap_or_else(|error| panic!("{error}"));
    let code = qemu
        .wait_exit(EXIT_TIMEOUT)
        .unwrap_or_else(|error| panic!("{error}"));
    let lines = qemu.serial_lines();
    let text = lines.join("\n");
    assert_eq!(code, 0, "hello exited with {code}:\n{text}");
    let banner = lines
        .iter()
        .find(|line| line.contains("Tandem guest kernel"))
        .unwrap_or_else(|| panic!("no boot banner:\n{text}"));
    assert!(
        banner.contains("no PIT"),
        "the banner does not say the PIT is missing: {banner}"
    );
    for expected in [
        "no legacy 8259 PICs: nothing to mask",
        "pci: no MCFG and no host bridge behind port 0xCF8: no PCI bus",
        "pci: 0 functions found",
    ] {
        assert!(
            lines.iter().any(|line| line.contains(expected)),
            "missing `{expected}`:\n{text}"
        );
    }
    // Nothing is reported as broken: the only warning is the clock's (TCG's microvm offers no
    // frequency to read and no PIT to measure with; Hyper-V has its frequency MSRs).
    let warnings: Vec<&String> = lines
        .iter()
        .filter(|line| line.contains("WARN") || line.contains("ERROR"))
        .filter(|line| !line.contains("clock: no PIT and no CPUID or hypervisor frequency"))
        .collect();
    assert!(warnings.is_empty(), "unexpected warnings: {warnings:#?}");
}
