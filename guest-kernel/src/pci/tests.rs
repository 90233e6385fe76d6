//! Whole-subsystem tests against a fake q35 machine: enumeration, bus numbering, BAR
//! assignment, the printed tree, SR-IOV, and hot-plug cycles as QEMU drives them.

use super::allocator::WindowKind;
use super::capability::SriovCapability;
use super::config::{Command, ConfigAccess, reg};
use super::fake::{FakeBar, FakeConfigSpace, FakeFunction, templates};
use super::hotplug::{HotplugEvent, SlotState};
use super::{AddressRange, BarKind, PciAddress, PciBus, RootResources, Window};
use crate::error::{KernelError, PciErrorKind};
use alloc::string::String;
use alloc::vec::Vec;

/// Captures log lines per test thread so tests can check the exact markers.
mod log_capture {
    use std::cell::RefCell;
    use std::string::String;
    use std::vec::Vec;

    std::thread_local! {
        static LINES: RefCell<Vec<String>> = const { RefCell::new(Vec::new()) };
    }

    struct Capture;

    impl log::Log for Capture {
        fn enabled(&self, _: &log::Metadata<'_>) -> bool {
            true
        }
        fn log(&self, record: &log::Record<'_>) {
            LINES.with(|lines| lines.borrow_mut().push(std::format!("{}", record.args())));
        }
        fn flush(&self) {}
    }

    static LOGGER: Capture = Capture;

    /// Installs the logger (once per process) and clears this thread's lines.
    pub(super) fn start() {
        let _ = log::set_logger(&LOGGER);
        log::set_max_level(log::LevelFilter::Debug);
        LINES.with(|lines| lines.borrow_mut().clear());
    }

    /// This thread's lines since the last call.
    pub(super) fn take() -> Vec<String> {
        LINES.with(|lines| core::mem::take(&mut *lines.borrow_mut()))
    }
}

const HOST_BRIDGE: PciAddress = PciAddress::new(0, 0, 0);
const VGA: PciAddress = PciAddress::new(0, 1, 0);
const VIRTIO: PciAddress = PciAddress::new(0, 2, 0);
const ROOT_PORT_1: PciAddress = PciAddress::new(0, 4, 0);
const ROOT_PORT_2: PciAddress = PciAddress::new(0, 5, 0);
const PLAIN_BRIDGE: PciAddress = PciAddress::new(0, 6, 0);
const NESTED_BRIDGE: PciAddress = PciAddress::new(3, 1, 0);
const PF: PciAddress = PciAddress::new(1, 0, 0);
const AHCI: PciAddress = PciAddress::new(0, 0x1f, 2);

/// What SeaBIOS leaves behind on `-M q35` with two pcie-root-ports (igb in the first, the
/// second empty) plus an unnumbered PCI bridge holding an e1000 and a nested bridge.
fn q35_machine() -> FakeConfigSpace {
    let space = FakeConfigSpace::new();
    space.insert(HOST_BRIDGE, templates::q35_host_bridge());
    space.insert(VGA, templates::vga());
    space.insert(
        VIRTIO,
        templates::virtio_net()
            .with_bar_address(1, 0xfe0f_2000)
            .with_bar_address(4, 0xfe0f_4000),
    );
    // Function 1 of a single-function device must never be looked at.
    space.insert(VIRTIO.with_function(1), templates::virtio_net());
    let igb = templates::igb_pf()
        .with_bar_address(0, 0xfe60_0000)
        .with_bar_address(1, 0xfe62_0000)
        .with_bar_address(3, 0xfe64_0000);
    space.insert(
        ROOT_PORT_1,
        templates::pcie_root_port(1, true)
            .with_bus_numbers(0, 1, 1)
            .with_windows((0xfe60_0000, 0xfe7f_ffff), (0xfea0_0000, 0xfebf_ffff))
            .with_bar_address(0, 0xfe0f_0000)
            .with_child(0, igb),
    );
    space.insert(
        ROOT_PORT_2,
        templates::pcie_root_port(2, false)
            .with_bus_numbers(0, 2, 2)
            .with_windows((0xfe20_0000, 0xfe3f_ffff), (0xfe80_0000, 0xfe9f_ffff))
            .with_bar_address(0, 0xfe0f_1000),
    );
    let e1000 = FakeFunction::endpoint(0x8086, 0x100e, [2, 0, 0])
        .with_bar(
            0,
            FakeBar::Memory32 {
                size: 0x20000,
                prefetchable: false,
            },
        )
        .with_bar(1, FakeBar::Io { size: 0x40 });
    let nested = FakeFunction::bridge(0x1b36, 0x0001).with_child(0, templates::virtio_net());
    space.insert(
        PLAIN_BRIDGE,
        FakeFunction::bridge(0x1b36, 0x0001)
            .with_child(0, e1000)
            .with_child(0x08, nested),
    );
    space.insert(PciAddress::new(0, 0x1f, 0), templates::ich9_lpc());
    space.insert(AHCI, templates::ich9_ahci());
    space.insert(
        PciAddress::new(0, 0x1f, 3),
        FakeFunction::endpoint(0x8086, 0x2930, [0x0c, 5, 0])
            .with_bar(4, FakeBar::Io { size: 0x40 }),
    );
    space
}

fn probe(space: &FakeConfigSpace) -> PciBus<FakeConfigSpace> {
    PciBus::probe(space.clone(), RootResources::q35())
}

fn tree(pci: &PciBus<FakeConfigSpace>) -> String {
    let mut out = String::new();
    pci.print_tree(&mut out).unwrap();
    out
}

/// Every assigned memory range (BARs and open windows) of functions on `bus`.
fn memory_ranges_on_bus(pci: &PciBus<FakeConfigSpace>, bus: u8) -> Vec<(PciAddress, AddressRange)> {
    let mut ranges = Vec::new();
    for device in pci
        .devices()
        .iter()
        .filter(|d| d.address.bus() == bus && !d.is_virtual_function())
    {
        for bar in device.bars.iter().flatten().filter(|b| b.is_memory()) {
            if let Some(range) = bar.range() {
                ranges.push((device.address, range));
            }
        }
        if let Some(bridge) = device.bridge {
            ranges.extend(bridge.windows.memory.map(|r| (device.address, r)));
            ranges.extend(bridge.windows.prefetchable.map(|r| (device.address, r)));
        }
    }
    ranges
}

fn assert_no_overlap(ranges: &[(PciAddress, AddressRange)]) {
    for (i, (a_device, a)) in ranges.iter().enumerate() {
        for (b_device, b) in &ranges[i + 1..] {
            assert!(!a.overlaps(b), "{a_device} {a} overlaps {b_device} {b}");
        }
    }
}

#[test]
fn enumerates_the_q35_machine_through_bridges() {
    let pci = probe(&q35_machine());
    let found: Vec<String> = pci
        .devices()
        .iter()
        .map(|d| alloc::format!("{}", d.identity()))
        .collect();
    assert_eq!(
        found,
        [
            "00:00.0 8086:29c0",
            "00:01.0 1234:1111",
            "00:02.0 1af4:1041",
            "00:04.0 1b36:000c",
            "00:05.0 1b36:000c",
            "00:06.0 1b36:0001",
            "00:1f.0 8086:2918",
            "00:1f.2 8086:2922",
            "00:1f.3 8086:2930",
            "01:00.0 8086:10c9",
            "03:00.0 8086:100e",
            "03:01.0 1b36:0001",
            "04:00.0 1af4:1041",
        ]
    );
    assert_eq!(pci.find(0x8086, 0x10c9).map(|d| d.address), Some(PF));
    assert!(pci.device(ROOT_PORT_1).unwrap().hotplug_slot);
    assert!(!pci.device(PLAIN_BRIDGE).unwrap().hotplug_slot);
    assert_eq!(pci.device(PF).unwrap().parent, Some(ROOT_PORT_1));
}

#[test]
fn numbers_bridges_the_firmware_left_unnumbered_without_stealing_buses() {
    let space = q35_machine();
    let pci = probe(&space);
    let plain = pci.device(PLAIN_BRIDGE).unwrap().bridge.unwrap();
    assert_eq!(
        (
            plain.primary_bus,
            plain.secondary_bus,
            plain.subordinate_bus
        ),
        (0, 3, 4)
    );
    let nested = pci.device(NESTED_BRIDGE).unwrap().bridge.unwrap();
    assert_eq!(
        (
            nested.primary_bus,
            nested.secondary_bus,
            nested.subordinate_bus
        ),
        (3, 4, 4)
    );
    assert_eq!(
        space.read32(PLAIN_BRIDGE, reg::PRIMARY_BUS) & 0xff_ffff,
        0x04_0300
    );
    let port = pci.device(ROOT_PORT_1).unwrap().bridge.unwrap();
    assert_eq!(
        (port.secondary_bus, port.subordinate_bus),
        (1, 1),
        "firmware numbers kept"
    );
}

#[test]
fn overlapping_and_self_referencing_bus_numbers_are_renumbered() {
    let space = FakeConfigSpace::new();
    let leaf = || FakeFunction::endpoint(0x1af4, 0x1041, [2, 0, 0]);
    space.insert(
        PciAddress::new(0, 8, 0),
        FakeFunction::bridge(0x1b36, 1)
            .with_bus_numbers(0, 5, 5)
            .with_child(0, leaf()),
    );
    space.insert(
        PciAddress::new(0, 9, 0),
        FakeFunction::bridge(0x1b36, 1)
            .with_bus_numbers(0, 5, 5)
            .with_child(0, leaf()),
    );
    // Secondary bus 0 below bus 0 would route to itself: must not loop.
    space.insert(
        PciAddress::new(0, 10, 0),
        FakeFunction::bridge(0x1b36, 1).with_bus_numbers(0, 0, 0xff),
    );
    let pci = probe(&space);
    // The first bridge keeps bus 5; the second gets the lowest free bus.
    let first = pci
        .device(PciAddress::new(0, 8, 0))
        .unwrap()
        .bridge
        .unwrap();
    assert_eq!((first.secondary_bus, first.subordinate_bus), (5, 5));
    let second = pci
        .device(PciAddress::new(0, 9, 0))
        .unwrap()
        .bridge
        .unwrap();
    assert_eq!((second.secondary_bus, second.subordinate_bus), (1, 1));
    assert_eq!(
        pci.device(PciAddress::new(5, 0, 0)).unwrap().parent,
        Some(PciAddress::new(0, 8, 0))
    );
    assert_eq!(
        pci.device(PciAddress::new(1, 0, 0)).unwrap().parent,
        Some(PciAddress::new(0, 9, 0))
    );
    let third = pci
        .device(PciAddress::new(0, 10, 0))
        .unwrap()
        .bridge
        .unwrap();
    assert_eq!((third.secondary_bus, third.subordinate_bus), (2, 2));
    assert_eq!(pci.devices().len(), 5);
}

#[test]
fn assigns_missing_bars_inside_windows_and_keeps_firmware_ones() {
    let space = q35_machine();
    let pci = probe(&space);
    let vga = pci.bar(VGA, 0).unwrap();
    assert_eq!(
        (vga.kind, vga.size, vga.prefetchable),
        (BarKind::Memory32, 16 << 20, true)
    );
    assert!(vga.address >= 0xc000_0000 && vga.address.is_multiple_of(16 << 20));
    assert_eq!(space.read32(VGA, reg::BAR0) & !0xf, vga.address as u32);
    assert!(pci.command(VGA).contains(Command::MEMORY_SPACE));
    // Firmware assignments survive untouched, and their Command is not ours to change.
    assert_eq!(pci.bar(VIRTIO, 4).unwrap().address, 0xfe0f_4000);
    assert_eq!(pci.bar(PF, 0).unwrap().address, 0xfe60_0000);
    assert!(!pci.command(VIRTIO).contains(Command::MEMORY_SPACE));
    // The igb I/O BAR needed an I/O window on the root port (hot-plug ports get one).
    let port = pci.device(ROOT_PORT_1).unwrap().bridge.unwrap();
    let io = pci.bar(PF, 2).unwrap();
    assert!(port.windows.io.unwrap().contains(&io.range().unwrap()));
    // Everything under the unnumbered bridge fits its newly opened windows.
    let plain = pci.device(PLAIN_BRIDGE).unwrap().bridge.unwrap();
    let e1000 = pci.bar(PciAddress::new(3, 0, 0), 0).unwrap();
    assert!(
        plain
            .windows
            .memory
            .unwrap()
            .contains(&e1000.range().unwrap())
    );
    let nested_virtio = pci.bar(PciAddress::new(4, 0, 0), 4).unwrap();
    let nested = pci.device(NESTED_BRIDGE).unwrap().bridge.unwrap();
    assert!(
        nested
            .windows
            .prefetchable
            .unwrap()
            .contains(&nested_virtio.range().unwrap())
    );
    assert!(
        plain
            .windows
            .prefetchable
            .unwrap()
            .contains(&nested.windows.prefetchable.unwrap())
    );
    assert!(
        pci.command(PLAIN_BRIDGE)
            .contains(Command::MEMORY_SPACE | Command::BUS_MASTER)
    );
    for bus in 0..=4 {
        assert_no_overlap(&memory_ranges_on_bus(&pci, bus));
    }
}

#[test]
fn assignment_is_idempotent() {
    let space = q35_machine();
    let mut pci = probe(&space);
    let before = pci.devices().to_vec();
    let report = pci.assign_resources();
    assert_eq!((report.assigned_bars, report.opened_windows), (0, 0));
    assert!(
        report.failures.is_empty(),
        "{:?}\n{}",
        report.failures,
        tree(&pci)
    );
    assert_eq!(pci.devices(), &before[..]);
}

#[test]
fn no_room_is_reported_and_decoding_stays_off() {
    let space = FakeConfigSpace::new();
    space.insert(VGA, templates::vga());
    let root = RootResources {
        windows: alloc::vec![Window {
            kind: WindowKind::Memory,
            range: AddressRange {
                start: 0xfe00_0000,
                end: 0xfe0f_ffff
            },
        }],
        reserved: Vec::new(),
        last_bus: 0,
    };
    let mut pci = PciBus::new(space.clone(), root);
    pci.scan();
    let report = pci.assign_resources();
    assert_eq!(report.assigned_bars, 1, "the 4 KiB BAR fits");
    assert_eq!(
        report.failures,
        [PciErrorKind::NoBarSpace {
            address: [0, 1, 0],
            size: 16 << 20
        }]
    );
    assert!(
        !pci.command(VGA).contains(Command::MEMORY_SPACE),
        "BAR0 still at 0"
    );
}

#[test]
fn prints_the_device_tree() {
    let pci = probe(&q35_machine());
    let text = tree(&pci);
    for expected in [
        "pci 00:00.0 8086:29c0 class 06.00.00 host-bridge",
        "pci 00:04.0 1b36:000c class 06.04.00 root-port",
        "  bar0 mem32 0xfe0f0000 size 0x1000",
        "  bridge bus 01-01 mem 0xfe600000-0xfe7fffff pref 0xfea00000-0xfebfffff io 0x3000-0x3fff",
        "  cap ssvid@0x40",
        "  cap msix@0x48",
        "  cap pcie@0x54",
        "  cap aer@0x100",
        "  cap acs@0x148",
        "pci 01:00.0 8086:10c9 class 02.00.00 ethernet",
        "  bar0 mem32 0xfe600000 size 0x20000",
        "  bar3 mem64 0xfe640000 size 0x4000",
        "  cap pm@0x40",
        "  cap msi@0x50",
        "  cap ari@0x150",
        "  cap sriov@0x160",
        "pci 00:1f.2 8086:2922 class 01.06.01 sata",
        "  cap sata@0xa8",
        "  bar4 mem64 pref 0xfe0f4000 size 0x4000",
        "  cap vendor@0x84",
    ] {
        assert!(
            text.lines().any(|line| line == expected),
            "missing {expected:?} in\n{text}"
        );
    }
    assert!(!text.contains("00:02.1"));
}

#[test]
fn tree_reports_unassigned_bars_and_broken_chains() {
    let space = FakeConfigSpace::new();
    let mut looped = FakeFunction::endpoint(0x1af4, 0x1000, [2, 0, 0])
        .with_bar(
            0,
            FakeBar::Memory32 {
                size: 0x1000,
                prefetchable: false,
            },
        )
        .with_capability(0x40, 0x42, &[0, 0]);
    looped.set_bytes(0x41, &[0x40]);
    space.insert(VGA, looped);
    let mut pci = PciBus::new(
        space,
        RootResources {
            windows: Vec::new(),
            reserved: Vec::new(),
            last_bus: 0,
        },
    );
    pci.scan();
    let text = tree(&pci);
    assert!(
        text.contains("  bar0 mem32 0x0 size 0x1000 (unassigned)"),
        "{text}"
    );
    assert!(text.contains("  cap 0x42@0x40"), "{text}");
    assert!(
        text.contains("  cap chain broken: loop back to 0x40"),
        "{text}"
    );
}

#[test]
fn enables_sriov_vfs_with_bars_below_4g_inside_the_port_window() {
    let space = q35_machine();
    let mut pci = probe(&space);
    let vfs = pci.enable_sriov(PF, 2).unwrap();
    assert_eq!(
        vfs,
        [PciAddress::new(1, 0x10, 0), PciAddress::new(1, 0x10, 2)]
    );

    let capability = SriovCapability::find(&space, PF).unwrap();
    assert_eq!(capability.control & 0x9, 0x9, "VF Enable | VF MSE");
    assert_eq!(capability.num_vfs, 2);
    let window = pci
        .device(ROOT_PORT_1)
        .unwrap()
        .bridge
        .unwrap()
        .windows
        .prefetchable
        .unwrap();
    let vf0 = pci.device(vfs[0]).unwrap().clone();
    let vf1 = pci.device(vfs[1]).unwrap().clone();
    assert_eq!(
        (vf0.vendor_id, vf0.device_id, vf0.class.base),
        (0x8086, 0x10ca, 2)
    );
    assert_eq!(vf0.physical_function, Some(PF));
    let vf0_bar0 = vf0.bars[0].unwrap();
    assert_eq!(
        (vf0_bar0.kind, vf0_bar0.size, vf0_bar0.prefetchable),
        (BarKind::Memory64, 0x4000, true)
    );
    assert_eq!(vf1.bars[0].unwrap().address, vf0_bar0.address + 0x4000);
    assert!(vf0_bar0.address + 0x8000 <= 0x1_0000_0000);
    for bar in [vf0.bars[0].unwrap(), vf1.bars[3].unwrap()] {
        assert!(
            window.contains(&bar.range().unwrap()),
            "{bar} outside {window}"
        );
    }
    // VF BAR0 and BAR3 regions do not overlap each other.
    let ranges: Vec<_> = pci
        .device(PF)
        .unwrap()
        .sriov
        .as_ref()
        .unwrap()
        .vf_bar_ranges()
        .map(|r| (PF, r))
        .collect();
    assert_eq!(ranges.len(), 2);
    assert_no_overlap(&ranges);
    // QEMU: the VF's own Command gates its BARs and DMA.
    for vf in &vfs {
        assert_eq!(
            space.read16(*vf, reg::COMMAND),
            (Command::MEMORY_SPACE | Command::BUS_MASTER).bits()
        );
    }
    // VF identity lives in the PF; the VF's own ID registers read all-ones.
    assert_eq!(space.read32(vfs[0], reg::VENDOR_ID), u32::MAX);
    let text = tree(&pci);
    assert!(
        text.contains("pci 01:10.0 8086:10ca class 02.00.00 ethernet-vf"),
        "{text}"
    );
    assert!(text.contains("  sriov 2 vfs"), "{text}");

    pci.disable_sriov(PF).unwrap();
    assert!(pci.device(vfs[0]).is_none());
    assert_eq!(space.read32(vfs[0], reg::REVISION_ID), u32::MAX);
}

#[test]
fn sriov_rejects_bad_counts_and_reconfigures_cleanly() {
    let space = q35_machine();
    let mut pci = probe(&space);
    assert!(matches!(
        pci.enable_sriov(PF, 9),
        Err(KernelError::Pci(PciErrorKind::BadValue { .. }))
    ));
    assert!(pci.enable_sriov(PF, 0).is_err());
    assert!(matches!(
        pci.enable_sriov(VIRTIO, 1),
        Err(KernelError::Pci(PciErrorKind::MissingCapability {
            capability: "sriov",
            ..
        }))
    ));
    pci.enable_sriov(PF, 8).unwrap();
    assert_eq!(
        pci.devices()
            .iter()
            .filter(|d| d.is_virtual_function())
            .count(),
        8
    );
    // Re-enabling with fewer VFs first disables (NumVFs is read-only while enabled).
    let vfs = pci.enable_sriov(PF, 1).unwrap();
    assert_eq!(vfs.len(), 1);
    assert_eq!(
        pci.devices()
            .iter()
            .filter(|d| d.is_virtual_function())
            .count(),
        1
    );
    assert_eq!(
        space.read32(PciAddress::new(1, 0x10, 2), reg::REVISION_ID),
        u32::MAX
    );
}

/// Arms every discovered slot in polled mode.
fn armed(space: &FakeConfigSpace) -> PciBus<FakeConfigSpace> {
    let mut pci = probe(space);
    let ports: Vec<PciAddress> = pci.hotplug_slots().map(|(port, _)| port).collect();
    assert_eq!(ports, [ROOT_PORT_1, ROOT_PORT_2]);
    for port in ports {
        pci.arm_hotplug_slot(port, None).unwrap();
    }
    pci
}

fn slot_state(pci: &PciBus<FakeConfigSpace>, port: PciAddress) -> SlotState {
    pci.hotplug_slots().find(|(p, _)| *p == port).unwrap().1
}

fn identities(devices: &[super::PciDevice]) -> Vec<PciAddress> {
    devices.iter().map(|d| d.address).collect()
}

#[test]
fn arming_enables_presence_and_button_events_and_clears_stale_ones_exactly() {
    let space = q35_machine();
    let pci = armed(&space);
    let control = space.slot_control(ROOT_PORT_1);
    assert_eq!(
        control & 0x3f,
        0x09,
        "ABPE | PDCE, no CCIE, no HPIE when polled"
    );
    assert_eq!(
        space.slot_status(ROOT_PORT_1) & 0x11f,
        0,
        "stale CC from the arming write cleared"
    );
    assert_eq!(slot_state(&pci, ROOT_PORT_1), SlotState::Occupied);
    assert_eq!(slot_state(&pci, ROOT_PORT_2), SlotState::Empty);
    // Slot Control is only ever written with 16-bit accesses (Slot Status shares the dword).
    assert!(
        space
            .writes()
            .iter()
            .all(|w| !(w.offset == 0x6c && w.width == 4))
    );
}

#[test]
fn two_full_unplug_plug_cycles_on_a_root_port() {
    log_capture::start();
    let space = q35_machine();
    let mut pci = armed(&space);
    assert!(pci.service().is_empty());

    // Cycle 1: a driver owns the PF, so the removal waits for it.
    pci.claim(PF);
    space.device_del(ROOT_PORT_1);
    let events = pci.service();
    let [HotplugEvent::DeviceLeaving { slot, devices }] = &events[..] else {
        panic!("expected DeviceLeaving, got {events:?}")
    };
    assert_eq!((*slot, identities(devices)), (ROOT_PORT_1, alloc::vec![PF]));
    assert_eq!(
        space.read32(PF, reg::VENDOR_ID),
        0x10c9_8086,
        "still there until we power off"
    );
    assert!(
        pci.service().is_empty(),
        "no repeat while waiting for the owner"
    );
    pci.complete_removal(ROOT_PORT_1).unwrap();
    assert_eq!(
        space.slot_control(ROOT_PORT_1) & 0x700,
        0x700,
        "PCC off and PIC off"
    );
    assert_eq!(
        space.read32(PF, reg::VENDOR_ID),
        u32::MAX,
        "QEMU deleted the device"
    );
    let events = pci.service();
    assert!(
        matches!(&events[..], [HotplugEvent::UnplugComplete { slot, .. }] if *slot == ROOT_PORT_1)
    );
    assert!(pci.device(PF).is_none() && !pci.is_claimed(PF));
    assert_eq!(slot_state(&pci, ROOT_PORT_1), SlotState::Empty);

    space.device_add(ROOT_PORT_1, alloc::vec![(0, templates::igb_pf())]);
    let events = pci.service();
    let [HotplugEvent::DeviceArrived { slot, devices }] = &events[..] else {
        panic!("expected DeviceArrived, got {events:?}")
    };
    assert_eq!((*slot, identities(devices)), (ROOT_PORT_1, alloc::vec![PF]));
    assert_eq!(
        space.slot_control(ROOT_PORT_1) & 0x700,
        0x100,
        "power on, PIC on"
    );
    let windows = pci.device(ROOT_PORT_1).unwrap().bridge.unwrap().windows;
    let bar0 = pci.bar(PF, 0).unwrap();
    assert!(windows.memory.unwrap().contains(&bar0.range().unwrap()));
    assert_eq!(space.read32(PF, reg::BAR0), bar0.address as u32);
    assert!(pci.command(PF).contains(Command::MEMORY_SPACE));

    // Cycle 2: nobody claimed the new PF, so the slot powers off at once.
    space.device_del(ROOT_PORT_1);
    let events = pci.service();
    assert!(
        matches!(&events[..], [HotplugEvent::UnplugComplete { slot, devices }] if *slot == ROOT_PORT_1 && devices.len() == 1)
    );
    assert_eq!(space.read32(PF, reg::VENDOR_ID), u32::MAX);
    assert!(pci.service().is_empty());
    space.device_add(ROOT_PORT_1, alloc::vec![(0, templates::igb_pf())]);
    let events = pci.service();
    assert!(matches!(&events[..], [HotplugEvent::DeviceArrived { .. }]));
    assert_eq!(pci.find(0x8086, 0x10c9).unwrap().address, PF);
    assert!(pci.service().is_empty());
    assert_eq!(
        space.slot_status(ROOT_PORT_1) & 0x11f,
        0,
        "every event acknowledged"
    );

    let lines = log_capture::take();
    let count = |marker: &str| lines.iter().filter(|line| line.starts_with(marker)).count();
    assert_eq!(
        count("hotplug: slot 00:04.0 device leaving: 01:00.0 8086:10c9"),
        2
    );
    assert_eq!(
        count("hotplug: slot 00:04.0 powered off, unplug complete"),
        2
    );
    assert_eq!(
        count("hotplug: slot 00:04.0 device arrived: 01:00.0 8086:10c9 bar0=mem32@0xfe6"),
        2,
        "{lines:#?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("bar3=mem64@0x") && l.contains("bar2=io@0x3000+0x20")),
        "{lines:#?}"
    );
}

#[test]
fn removal_of_a_pf_with_vfs_takes_the_vfs_along() {
    let space = q35_machine();
    let mut pci = armed(&space);
    let vfs = pci.enable_sriov(PF, 2).unwrap();
    pci.claim(vfs[0]);
    space.device_del(ROOT_PORT_1);
    let events = pci.service();
    let [HotplugEvent::DeviceLeaving { devices, .. }] = &events[..] else {
        panic!("{events:?}")
    };
    assert_eq!(identities(devices), [PF, vfs[0], vfs[1]]);
    pci.complete_removal(ROOT_PORT_1).unwrap();
    assert!(pci.devices().iter().all(|d| d.address.bus() != 1));
    assert!(!pci.is_claimed(vfs[0]));
    assert!(
        pci.complete_removal(ROOT_PORT_1).is_err(),
        "nothing left to remove"
    );
}

#[test]
fn hot_add_into_a_slot_empty_at_boot_powers_it_on_and_uses_its_windows() {
    let space = q35_machine();
    let mut pci = armed(&space);
    space.device_add(ROOT_PORT_2, alloc::vec![(0, templates::virtio_net())]);
    let events = pci.service();
    let [HotplugEvent::DeviceArrived { slot, devices }] = &events[..] else {
        panic!("{events:?}")
    };
    assert_eq!(*slot, ROOT_PORT_2);
    let device = &devices[0];
    assert_eq!(device.address, PciAddress::new(2, 0, 0));
    let bar1 = device.bars[1].unwrap();
    let bar4 = device.bars[4].unwrap();
    assert_eq!(bar1.range().unwrap().start, 0xfe20_0000);
    assert_eq!(
        bar4.range().unwrap().start,
        0xfe80_0000,
        "prefetchable BAR in the pref window"
    );
}

#[test]
fn surprise_removal_is_reported_and_the_slot_recovers() {
    log_capture::start();
    let space = q35_machine();
    let mut pci = armed(&space);
    pci.claim(PF);
    space.surprise_remove(ROOT_PORT_1);
    let events = pci.service();
    let [HotplugEvent::DeviceRemoved { slot, devices }] = &events[..] else {
        panic!("{events:?}")
    };
    assert_eq!((*slot, identities(devices)), (ROOT_PORT_1, alloc::vec![PF]));
    assert!(!pci.is_claimed(PF));
    assert!(
        log_capture::take()
            .iter()
            .any(|l| l.starts_with("hotplug: slot 00:04.0 device removed (surprise)"))
    );
    space.device_add(ROOT_PORT_1, alloc::vec![(0, templates::igb_pf())]);
    assert!(matches!(
        &pci.service()[..],
        [HotplugEvent::DeviceArrived { .. }]
    ));
}

#[test]
fn interrupt_driven_slot_is_serviced_when_its_vector_fires() {
    const VECTOR: u8 = 201;
    let space = q35_machine();
    let mut pci = probe(&space);
    pci.arm_hotplug_slot(ROOT_PORT_1, Some(VECTOR)).unwrap();
    assert_eq!(space.slot_control(ROOT_PORT_1) & 0x20, 0x20, "HPIE set");
    space.device_del(ROOT_PORT_1);
    assert_eq!(space.slot_interrupts(ROOT_PORT_1), 1);
    assert!(
        pci.service().is_empty(),
        "no interrupt noted yet: slot not read"
    );
    crate::pending_vectors::note_pending(VECTOR);
    let events = pci.service();
    assert!(
        matches!(&events[..], [HotplugEvent::UnplugComplete { .. }]),
        "{events:?}"
    );
    // The power-off completes the unplug: PDC raises a second interrupt.
    assert_eq!(space.slot_interrupts(ROOT_PORT_1), 2);
}

#[test]
fn removal_requested_before_arming_is_not_lost() {
    let space = q35_machine();
    let mut pci = probe(&space);
    space.device_del(ROOT_PORT_1);
    pci.arm_hotplug_slot(ROOT_PORT_1, Some(202)).unwrap();
    assert_eq!(space.slot_status(ROOT_PORT_1) & 0x11f, 0);
    let events = pci.service();
    assert!(
        matches!(&events[..], [HotplugEvent::UnplugComplete { .. }]),
        "{events:?}"
    );
}

#[test]
fn device_added_before_arming_is_brought_up_by_the_first_service() {
    let space = q35_machine();
    space.device_add(ROOT_PORT_2, alloc::vec![(0, templates::virtio_net())]);
    let mut pci = armed(&space);
    let events = pci.service();
    assert!(
        matches!(&events[..], [HotplugEvent::DeviceArrived { slot, .. }] if *slot == ROOT_PORT_2),
        "{events:?}"
    );
}

#[test]
fn complete_removal_on_a_non_slot_is_an_error() {
    let mut pci = armed(&q35_machine());
    assert!(pci.complete_removal(VGA).is_err());
    assert!(pci.complete_removal(ROOT_PORT_2).is_err(), "empty slot");
}

#[test]
fn vfs_routed_beyond_the_ports_bus_range_are_refused() {
    let space = q35_machine();
    let mut pci = probe(&space);
    // First VF Offset 0x100 would put VF 0 on bus 2, which root port 1 does not forward.
    space.write_raw(PF, 0x174, &0x100u16.to_le_bytes());
    let error = pci.enable_sriov(PF, 1).unwrap_err();
    assert_eq!(
        error,
        KernelError::Pci(PciErrorKind::BadValue {
            address: [1, 0, 0],
            what: "VF bus number beyond the bridge's subordinate bus"
        })
    );
    assert_eq!(
        SriovCapability::find(&space, PF).unwrap().control & 1,
        0,
        "VFs stay off"
    );
}

#[test]
fn functions_answering_vendor_zero_or_all_ones_are_skipped() {
    let space = FakeConfigSpace::new();
    space.insert(
        PciAddress::new(0, 3, 0),
        FakeFunction::endpoint(0, 0x1234, [2, 0, 0]),
    );
    space.insert(
        PciAddress::new(0, 4, 0),
        FakeFunction::endpoint(0xffff, 0xffff, [2, 0, 0]),
    );
    space.insert(
        PciAddress::new(0, 5, 0),
        FakeFunction::endpoint(0x8086, 0x2918, [6, 1, 0]).with_multifunction(),
    );
    // Function 1 missing, function 2 present: multi-function scans go on past gaps.
    space.insert(PciAddress::new(0, 5, 2), templates::ich9_ahci());
    let mut pci = PciBus::new(space, RootResources::q35());
    pci.scan();
    let found: Vec<PciAddress> = pci.devices().iter().map(|d| d.address).collect();
    assert_eq!(found, [PciAddress::new(0, 5, 0), PciAddress::new(0, 5, 2)]);
}
