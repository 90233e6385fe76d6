//! Bus enumeration: depth-first scan from bus 0 through PCI-to-PCI bridges, numbering bridges
//! the firmware left unnumbered (PCI-to-PCI Bridge 1.2 §3.2.5.3, the usual depth-first scheme).

use super::bar::{read_bridge_windows, size_bars};
use super::capability::{PcieCapability, find_capability, id};
use super::config::{
    ClassCode, Command, ConfigAccess, HeaderType, read_command, reg, write_command,
};
use super::{BridgeInfo, PciAddress, PciBus, PciDevice};
use alloc::vec::Vec;

/// Deepest bridge nesting followed; deeper hierarchies are logged and skipped, which keeps
/// recursion bounded whatever the bus numbers say.
const MAX_BRIDGE_DEPTH: u8 = 32;

/// A set of bus numbers.
#[derive(Clone, Default)]
pub(super) struct BusSet([u64; 4]);

impl BusSet {
    pub(super) fn insert(&mut self, bus: u8) {
        self.0[usize::from(bus / 64)] |= 1 << (bus % 64);
    }

    pub(super) fn contains(&self, bus: u8) -> bool {
        self.0[usize::from(bus / 64)] & (1 << (bus % 64)) != 0
    }

    fn any_in(&self, first: u8, last: u8) -> bool {
        (first..=last).any(|bus| self.contains(bus))
    }
}

/// A bridge whose bus numbers were unusable, to be numbered after the firmware's numbering
/// of the whole tree is known.
struct Fixup {
    bridge: PciAddress,
    /// Buses the bridge may take (its parent's free range).
    first: u8,
    last: u8,
}

/// How one `scan_bus` call treats bridge numbers.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Numbering {
    /// Keep valid firmware numbers; defer broken bridges.
    KeepFirmware,
    /// Number every bridge now (the subtree is fresh, e.g. hot-added).
    Renumber,
}

impl<A: ConfigAccess> PciBus<A> {
    /// Rescans the whole hierarchy from bus 0, replacing the device list.
    ///
    /// Bridges whose bus numbers are missing (secondary 0), inconsistent or overlapping are
    /// given free bus numbers inside their parent's range after the firmware-numbered part of
    /// the tree has been seen, so existing numbers are never stolen.
    pub fn scan(&mut self) {
        self.devices.clear();
        let mut used = BusSet::default();
        used.insert(0);
        let mut fixups = Vec::new();
        let last_bus = self.root.last_bus;
        self.scan_bus(
            0,
            None,
            1,
            last_bus,
            Numbering::KeepFirmware,
            0,
            &mut used,
            &mut fixups,
        );
        for fixup in fixups {
            let parent_bus = fixup.bridge.bus();
            self.number_bridge(
                fixup.bridge,
                parent_bus,
                fixup.first,
                fixup.last,
                1,
                &mut used,
            );
        }
        log::info!("pci: {} functions found", self.devices.len());
    }

    /// Scans what is behind the bridge `port` (after a hot-add), numbering any bridges found
    /// inside the port's own bus range. Returns the addresses of the functions found.
    pub(super) fn scan_behind(&mut self, port: PciAddress) -> Vec<PciAddress> {
        let Some(info) = self.device(port).and_then(|d| d.bridge) else {
            return Vec::new();
        };
        let (secondary, subordinate) = (info.secondary_bus, info.subordinate_bus);
        if secondary <= port.bus() || subordinate < secondary {
            log::warn!("pci: {port} has unusable bus numbers {secondary:02x}-{subordinate:02x}");
            return Vec::new();
        }
        // Every bus outside the port's range belongs to someone else.
        let mut used = BusSet::default();
        for bus in 0..=u8::MAX {
            if bus <= secondary || bus > subordinate {
                used.insert(bus);
            }
        }
        let before: Vec<PciAddress> = self.devices.iter().map(|d| d.address).collect();
        let mut fixups = Vec::new();
        let first_child = secondary.saturating_add(1);
        self.scan_bus(
            secondary,
            Some(port),
            first_child,
            subordinate,
            Numbering::Renumber,
            1,
            &mut used,
            &mut fixups,
        );
        self.devices
            .iter()
            .map(|d| d.address)
            .filter(|address| {
                (secondary..=subordinate).contains(&address.bus()) && !before.contains(address)
            })
            .collect()
    }

    /// Scans `bus`; child bridges may use buses `first..=last`. Returns the highest bus used
    /// in this subtree.
    #[allow(clippy::too_many_arguments)]
    fn scan_bus(
        &mut self,
        bus: u8,
        parent: Option<PciAddress>,
        first: u8,
        last: u8,
        numbering: Numbering,
        depth: u8,
        used: &mut BusSet,
        fixups: &mut Vec<Fixup>,
    ) -> u8 {
        let mut highest = bus;
        for device in 0..PciAddress::DEVICES_PER_BUS {
            for function in 0..PciAddress::FUNCTIONS_PER_DEVICE {
                let address = PciAddress::new(bus, device, function);
                let Some(found) = self.probe_function(address, parent) else {
                    if function == 0 {
                        break;
                    }
                    continue;
                };
                let multifunction = found.multifunction;
                let bridge = found.bridge;
                self.upsert(found);
                if let Some(info) = bridge {
                    let subtree_last = self
                        .visit_bridge(address, info, first, last, numbering, depth, used, fixups);
                    highest = highest.max(subtree_last);
                }
                if function == 0 && !multifunction {
                    break;
                }
            }
        }
        highest
    }

    /// Follows (or numbers) one bridge found on a scan. Returns the highest bus it uses.
    #[allow(clippy::too_many_arguments)]
    fn visit_bridge(
        &mut self,
        bridge: PciAddress,
        info: BridgeInfo,
        first: u8,
        last: u8,
        numbering: Numbering,
        depth: u8,
        used: &mut BusSet,
        fixups: &mut Vec<Fixup>,
    ) -> u8 {
        if depth >= MAX_BRIDGE_DEPTH {
            log::warn!("pci: {bridge} is nested deeper than {MAX_BRIDGE_DEPTH} bridges; skipped");
            return bridge.bus();
        }
        let (secondary, subordinate) = (info.secondary_bus, info.subordinate_bus);
        let firmware_numbers_usable = numbering == Numbering::KeepFirmware
            && secondary > bridge.bus()
            && secondary >= first
            && subordinate >= secondary
            && subordinate <= last
            && !used.any_in(secondary, subordinate);
        if firmware_numbers_usable {
            for bus in secondary..=subordinate {
                used.insert(bus);
            }
            self.scan_bus(
                secondary,
                Some(bridge),
                secondary.saturating_add(1),
                subordinate,
                numbering,
                depth + 1,
                used,
                fixups,
            );
            return subordinate;
        }
        match numbering {
            Numbering::KeepFirmware => {
                if secondary != 0 {
                    log::warn!(
                        "pci: {bridge} bus numbers {secondary:02x}-{subordinate:02x} unusable; renumbering"
                    );
                }
                fixups.push(Fixup {
                    bridge,
                    first,
                    last,
                });
                bridge.bus()
            }
            Numbering::Renumber => {
                self.number_bridge(bridge, bridge.bus(), first, last, depth, used)
            }
        }
    }

    /// Gives `bridge` the first free bus in `first..=last` (plus the free run after it for
    /// bridges below), scans behind it, then shrinks its subordinate number to what was used.
    fn number_bridge(
        &mut self,
        bridge: PciAddress,
        parent_bus: u8,
        first: u8,
        last: u8,
        depth: u8,
        used: &mut BusSet,
    ) -> u8 {
        let Some(secondary) = (first..=last).find(|bus| !used.contains(*bus) && *bus != 0) else {
            log::warn!("pci: no free bus number for bridge {bridge}; its subtree is not scanned");
            return parent_bus;
        };
        let mut run_end = secondary;
        while run_end < last && !used.contains(run_end + 1) {
            run_end += 1;
        }
        // Only the secondary bus is taken now: bridges below are numbered from the rest of
        // the run (marking their own buses), and nobody else numbers until this returns.
        used.insert(secondary);
        self.write_bus_numbers(bridge, parent_bus, secondary, run_end);
        let mut nested = Vec::new();
        let highest = self.scan_bus(
            secondary,
            Some(bridge),
            secondary.saturating_add(1),
            run_end,
            Numbering::Renumber,
            depth + 1,
            used,
            &mut nested,
        );
        self.write_bus_numbers(bridge, parent_bus, secondary, highest);
        log::info!("pci: {bridge} numbered: bus {secondary:02x}-{highest:02x}");
        highest
    }

    /// Programs primary/secondary/subordinate bus numbers and updates the record.
    fn write_bus_numbers(
        &mut self,
        bridge: PciAddress,
        primary: u8,
        secondary: u8,
        subordinate: u8,
    ) {
        let latency = self.access.read32(bridge, reg::PRIMARY_BUS) & 0xff00_0000;
        let value = u32::from(primary)
            | (u32::from(secondary) << 8)
            | (u32::from(subordinate) << 16)
            | latency;
        self.access.write32(bridge, reg::PRIMARY_BUS, value);
        let index = self.index_of(bridge);
        if let Some(info) = index.and_then(|index| self.devices[index].bridge.as_mut()) {
            info.primary_bus = primary;
            info.secondary_bus = secondary;
            info.subordinate_bus = subordinate;
        }
    }

    /// Reads one function's identity, sizes its BARs and reads its bridge registers.
    /// `None` when nobody answers.
    pub(super) fn probe_function(
        &self,
        address: PciAddress,
        parent: Option<PciAddress>,
    ) -> Option<PciDevice> {
        let ids = self.access.read32(address, reg::VENDOR_ID);
        let vendor_id = ids as u16;
        if vendor_id == u16::MAX || vendor_id == 0 {
            return None;
        }
        let class_dword = self.access.read32(address, reg::REVISION_ID);
        let header = self.access.read8(address, reg::HEADER_TYPE);
        let header_type = HeaderType::from_byte(header);

        let bar_count = header_type.bar_count();
        let bars = if bar_count == 0 {
            [None; 6]
        } else {
            // Decoding off while the BARs hold the all-ones probe (PCI 3.0 §6.2.5.1).
            let command = read_command(&self.access, address);
            let decoding = Command::MEMORY_SPACE | Command::IO_SPACE;
            if command.intersects(decoding) {
                write_command(&self.access, address, command - decoding);
            }
            let bars = size_bars(&self.access, address, reg::BAR0, bar_count);
            if command.intersects(decoding) {
                write_command(&self.access, address, command);
            }
            bars
        };

        let bridge = (header_type == HeaderType::Bridge).then(|| {
            let numbers = self.access.read32(address, reg::PRIMARY_BUS);
            BridgeInfo {
                primary_bus: numbers as u8,
                secondary_bus: (numbers >> 8) as u8,
                subordinate_bus: (numbers >> 16) as u8,
                windows: read_bridge_windows(&self.access, address),
            }
        });

        let pcie = find_capability(&self.access, address, id::PCI_EXPRESS)
            .and_then(|offset| PcieCapability::read(&self.access, address, offset).ok());

        Some(PciDevice {
            address,
            vendor_id,
            device_id: (ids >> 16) as u16,
            revision: class_dword as u8,
            class: ClassCode {
                base: (class_dword >> 24) as u8,
                sub: (class_dword >> 16) as u8,
                prog_if: (class_dword >> 8) as u8,
            },
            header_type,
            multifunction: header & 0x80 != 0,
            bars,
            bridge,
            port_type: pcie.map(|p| p.port_type),
            hotplug_slot: pcie.is_some_and(|p| p.is_hotplug_port()),
            parent,
            physical_function: None,
            sriov: None,
        })
    }
}
