//! The `hello` image: PVH boot, command line, PCI tree, exit codes of panics and CPU exceptions.

use tandem_tests::{
    BOOT_TIMEOUT, EXIT_TIMEOUT, accelerators, bar_addresses, image, pci_function_block,
};
use xtask::exit::{GUEST_CPU_EXCEPTION, GUEST_PANIC};
use xtask::machine::{igb_pf_device, virtio_net_device};
use xtask::{Accel, Qemu, QemuBuilder};

/// virtio-net (modern, transitional id 0x1041) and the igb PF (82576, 0x10c9).
const VIRTIO_NET: &str = "1af4:1041";
const IGB_PF: &str = "8086:10c9";

fn hello(label: &str, accel: Accel, cmdline: &str) -> Qemu {
    QemuBuilder::new(label, accel)
        .kernel(image("hello"))
        .cmdline(cmdline)
        .netdev("user,id=vnet")
        .device(virtio_net_device("vnet"))
        .netdev("user,id=pfnet")
        .device(igb_pf_device("pfnet"))
        .spawn()
        .unwrap_or_else(|error| panic!("{error}"))
}

fn check_function(lines: &[String], vendor_device: &str, capabilities: &[&str]) {
    let block = pci_function_block(lines, vendor_device).unwrap_or_else(|| {
        panic!(
            "no `pci ... {vendor_device}` line in:\n{}",
            lines.join("\n")
        )
    });
    let text = block.join("\n");
    assert!(
        bar_addresses(&block).iter().any(|&address| address != 0),
        "{vendor_device} has no BAR with a non-zero address:\n{text}"
    );
    for capability in capabilities {
        assert!(
            block
                .iter()
                .any(|line| line.trim_start().starts_with(capability)),
            "{vendor_device} lacks `{capability}`:\n{text}"
        );
    }
}

#[test]
fn hello_boots_via_pvh_and_prints_the_command_line_and_pci_tree() {
    for accel in accelerators() {
        let cmdline = "log=debug tandem.test=pvh-boot";
        let mut qemu = hello(&format!("hello {accel}"), accel, cmdline);
        let line = qemu
            .wait_for_line("cmdline:", BOOT_TIMEOUT)
            .unwrap_or_else(|error| panic!("{error}"));
        assert_eq!(line.trim_end(), format!("cmdline: {cmdline}"));
        qemu.wait_for_line("hello: done", BOOT_TIMEOUT)
            .unwrap_or_else(|error| panic!("{error}"));
        let code = qemu
            .wait_exit(EXIT_TIMEOUT)
            .unwrap_or_else(|error| panic!("{error}"));
        let lines = qemu.serial_lines();
        assert!(
            lines
                .iter()
                .any(|line| line.contains("Tandem guest kernel")),
            "no boot banner"
        );
        check_function(&lines, VIRTIO_NET, &["cap msix"]);
        check_function(&lines, IGB_PF, &["cap msix", "cap sriov"]);
        assert_eq!(code, 0, "hello under {accel} exited with {code}");
    }
}

#[test]
fn a_panic_exits_101_with_message_and_location() {
    let mut qemu = hello("hello panic", Accel::Tcg, "hello.crash=panic");
    let code = qemu
        .wait_exit(BOOT_TIMEOUT)
        .unwrap_or_else(|error| panic!("{error}"));
    let serial = qemu.serial_text();
    assert_eq!(code, GUEST_PANIC, "serial:\n{serial}");
    let panic_line = serial
        .lines()
        .find(|line| line.contains("panic:"))
        .unwrap_or_else(|| panic!("no `panic:` line in:\n{serial}"));
    assert!(
        serial.contains("examples/hello"),
        "the panic report lacks the source location: {panic_line}\n{serial}"
    );
}

#[test]
fn a_page_fault_exits_102_with_the_faulting_address() {
    let mut qemu = hello("hello pagefault", Accel::Tcg, "hello.crash=pagefault");
    let code = qemu
        .wait_exit(BOOT_TIMEOUT)
        .unwrap_or_else(|error| panic!("{error}"));
    let serial = qemu.serial_text();
    assert_eq!(code, GUEST_CPU_EXCEPTION, "serial:\n{serial}");
    assert!(serial.contains("page fault"), "serial:\n{serial}");
    assert!(serial.contains("CR2"), "serial:\n{serial}");
}
