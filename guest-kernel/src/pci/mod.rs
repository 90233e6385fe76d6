//! PCI/PCIe subsystem: enumeration, BAR assignment, capabilities, MSI-X, SR-IOV and native
//! PCIe hot-plug, written against the [`ConfigAccess`] trait so all logic runs in host tests.
//!
//! Layout: `config` (access trait, header registers), `capability` (chain walks and parsed
//! structures), `bar` + `allocator` (sizing, windows, placement), `enumerate` (bus scan and bus
//! numbering), `resources` (BAR and window assignment), `msix`, `sriov`, `hotplug`, `tree`
//! (the printed device tree). Only `ecam`, `port_io` and `platform` touch hardware; they are
//! compiled out of host tests, where `fake` stands in for QEMU's config space.

pub mod address;
pub mod allocator;
pub mod bar;
pub mod capability;
pub mod config;
mod enumerate;
pub mod hotplug;
pub mod msix;
mod resources;
pub mod sriov;
mod tree;

#[cfg(not(any(test, feature = "host")))]
pub mod ecam;
#[cfg(not(any(test, feature = "host")))]
mod platform;
#[cfg(not(any(test, feature = "host")))]
pub mod port_io;

#[cfg(test)]
pub(crate) mod fake;
#[cfg(test)]
mod tests;

pub use address::PciAddress;
pub use allocator::{BarAllocator, Placement, Window, WindowKind};
pub use bar::{AddressRange, Bar, BarKind, BridgeWindows};
pub use capability::{
    Capability, CapabilityList, ChainFault, MsiCapability, MsixCapability, PcieCapability,
    PortType, SlotCapabilities, SriovCapability,
};
pub use config::{ClassCode, Command, ConfigAccess, HeaderType, Status};
pub use hotplug::{HotplugEvent, SlotState};
pub use msix::MsixTable;
pub use resources::AssignmentReport;
pub use sriov::SriovState;

#[cfg(not(any(test, feature = "host")))]
pub use ecam::Ecam;
#[cfg(not(any(test, feature = "host")))]
pub use platform::{Pci, PlatformConfig, init};
#[cfg(not(any(test, feature = "host")))]
pub use port_io::PortIo;

use crate::error::{KernelError, PciErrorKind};
use alloc::collections::BTreeSet;
use alloc::vec::Vec;
use core::fmt;

/// Bus numbers of a PCI-to-PCI bridge plus its forwarding windows.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct BridgeInfo {
    /// Bus the bridge sits on.
    pub primary_bus: u8,
    /// Bus directly behind the bridge.
    pub secondary_bus: u8,
    /// Highest bus behind the bridge.
    pub subordinate_bus: u8,
    /// Forwarding windows.
    pub windows: BridgeWindows,
}

/// One PCI function as found by enumeration (or created by enabling SR-IOV).
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct PciDevice {
    /// Bus/device/function.
    pub address: PciAddress,
    /// Vendor ID (for a VF: the PF's vendor ID, since the VF's own register reads 0xFFFF).
    pub vendor_id: u16,
    /// Device ID (for a VF: the PF's VF Device ID).
    pub device_id: u16,
    /// Revision ID.
    pub revision: u8,
    /// Class code.
    pub class: ClassCode,
    /// Header layout.
    pub header_type: HeaderType,
    /// Function 0 says the device has more functions.
    pub multifunction: bool,
    /// Implemented BARs by index; a 64-bit BAR occupies its index and leaves the next `None`.
    /// A VF's BARs come from its PF's SR-IOV capability.
    pub bars: [Option<Bar>; 6],
    /// Bus numbers and windows, for bridges.
    pub bridge: Option<BridgeInfo>,
    /// PCIe device/port type, when the function has a PCI Express capability.
    pub port_type: Option<PortType>,
    /// The port implements a native hot-plug slot (PCIe Slot Capabilities HPC).
    pub hotplug_slot: bool,
    /// The bridge this function sits behind (`None` on the root bus).
    pub parent: Option<PciAddress>,
    /// For a virtual function: its physical function.
    pub physical_function: Option<PciAddress>,
    /// For a physical function with VFs enabled by us: the VF layout.
    pub sriov: Option<SriovState>,
}

impl PciDevice {
    /// True for PCI-to-PCI bridges (including PCIe root and switch ports).
    pub fn is_bridge(&self) -> bool {
        self.header_type == HeaderType::Bridge
    }

    /// True for an SR-IOV virtual function.
    pub fn is_virtual_function(&self) -> bool {
        self.physical_function.is_some()
    }

    /// The short name printed in the device tree ("ethernet", "root-port", "ethernet-vf").
    pub fn kind_name(&self) -> &'static str {
        if self.is_virtual_function() && self.class.base == 0x02 {
            return "ethernet-vf";
        }
        if self.is_virtual_function() {
            return "vf";
        }
        match self.port_type {
            Some(port) if self.is_bridge() => port.short_name(),
            _ => self.class.short_name(),
        }
    }

    /// `01:00.0 8086:10c9`, the identification used in log lines.
    pub fn identity(&self) -> DeviceIdentity {
        DeviceIdentity {
            address: self.address,
            vendor_id: self.vendor_id,
            device_id: self.device_id,
        }
    }

    /// Space-separated `bar<i>=<kind>@<addr>+<size>` for every implemented BAR.
    pub fn bar_summary(&self) -> BarSummary<'_> {
        BarSummary(&self.bars)
    }
}

/// Displays as `bb:dd.f vvvv:dddd`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct DeviceIdentity {
    address: PciAddress,
    vendor_id: u16,
    device_id: u16,
}

impl fmt::Display for DeviceIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {:04x}:{:04x}",
            self.address, self.vendor_id, self.device_id
        )
    }
}

/// Displays a device's BARs as `bar0=mem32@0xfe000000+0x20000 bar2=io@0xc000+0x20`.
pub struct BarSummary<'a>(&'a [Option<Bar>; 6]);

impl fmt::Display for BarSummary<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for (index, bar) in self.0.iter().enumerate() {
            if let Some(bar) = bar {
                if !first {
                    f.write_str(" ")?;
                }
                write!(f, "bar{index}={bar}")?;
                first = false;
            }
        }
        if first {
            f.write_str("no-bars")?;
        }
        Ok(())
    }
}

/// Address space the root bus may hand out, and what inside it is taken by non-PCI things.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RootResources {
    /// Windows of the root bus (the host bridge forwards these to PCI).
    pub windows: Vec<Window>,
    /// Ranges never to allocate (ECAM, firmware regions), on every bus.
    pub reserved: Vec<AddressRange>,
    /// Highest bus number reachable through the config access method.
    pub last_bus: u8,
}

impl RootResources {
    /// The q35 layout SeaBIOS sets up: 32-bit PCI memory from the end of the 256 MiB ECAM
    /// window at 0xB000_0000 up to the IOAPIC at 0xFEC0_0000 (SeaBIOS `pciinit.c`:
    /// `pcimem_start = 0xC000_0000`, `BUILD_PCIMEM_END`), and the I/O ranges SeaBIOS treats as
    /// free: 0x1000-0x9FFF and 0xC000-0xFFFF (0xA000-0xBFFF is hot-plug/PM on QEMU machines).
    pub fn q35() -> Self {
        RootResources {
            windows: alloc::vec![
                Window {
                    kind: WindowKind::Memory,
                    range: AddressRange {
                        start: 0xc000_0000,
                        end: 0xfebf_ffff
                    },
                },
                Window {
                    kind: WindowKind::Io,
                    range: AddressRange {
                        start: 0xc000,
                        end: 0xffff
                    }
                },
                Window {
                    kind: WindowKind::Io,
                    range: AddressRange {
                        start: 0x1000,
                        end: 0x9fff
                    }
                },
            ],
            reserved: Vec::new(),
            last_bus: 0xff,
        }
    }
}

/// The PCI subsystem: the config access method, every known function, and hot-plug state.
///
/// Generic over the access method so host tests drive it with a fake config space; the kernel
/// uses [`Pci`] (`PciBus<PlatformConfig>`), built by [`init`].
pub struct PciBus<A: ConfigAccess> {
    access: A,
    /// All functions, sorted by address.
    devices: Vec<PciDevice>,
    root: RootResources,
    /// Functions a driver has bound to (they get `DeviceLeaving` instead of an instant unplug).
    claimed: BTreeSet<PciAddress>,
    hotplug: hotplug::HotplugState,
}

impl<A: ConfigAccess> PciBus<A> {
    /// An empty bus over `access`; call [`PciBus::scan`] and [`PciBus::assign_resources`]
    /// (or use [`PciBus::probe`]) to fill it.
    pub fn new(access: A, root: RootResources) -> Self {
        PciBus {
            access,
            devices: Vec::new(),
            root,
            claimed: BTreeSet::new(),
            hotplug: hotplug::HotplugState::default(),
        }
    }

    /// Enumerates, assigns missing BARs and windows, and finds hot-plug slots (not yet armed).
    pub fn probe(access: A, root: RootResources) -> Self {
        let mut bus = PciBus::new(access, root);
        bus.scan();
        let report = bus.assign_resources();
        if !report.failures.is_empty() {
            log::warn!(
                "pci: {} BAR/window assignments failed",
                report.failures.len()
            );
        }
        bus.discover_hotplug_slots();
        bus
    }

    /// The config access method, for drivers that need raw config registers.
    pub fn config(&self) -> &A {
        &self.access
    }

    /// All known functions, sorted by address (VFs included once enabled).
    pub fn devices(&self) -> &[PciDevice] {
        &self.devices
    }

    /// The function at `address`, if known.
    pub fn device(&self, address: PciAddress) -> Option<&PciDevice> {
        self.index_of(address).map(|index| &self.devices[index])
    }

    /// The first function (lowest address) with this vendor and device ID.
    pub fn find(&self, vendor_id: u16, device_id: u16) -> Option<&PciDevice> {
        self.find_all(vendor_id, device_id).next()
    }

    /// Every function with this vendor and device ID.
    pub fn find_all(
        &self,
        vendor_id: u16,
        device_id: u16,
    ) -> impl Iterator<Item = &PciDevice> + '_ {
        self.devices
            .iter()
            .filter(move |d| d.vendor_id == vendor_id && d.device_id == device_id)
    }

    /// BAR `index` of the function at `address`: `None` if unknown or not implemented. An
    /// unassigned BAR is returned with address 0.
    pub fn bar(&self, address: PciAddress, index: usize) -> Option<Bar> {
        self.device(address)?.bars.get(index).copied().flatten()
    }

    /// Reads the Command register.
    pub fn command(&self, address: PciAddress) -> Command {
        config::read_command(&self.access, address)
    }

    /// Writes the Command register (16-bit write; Status is left alone).
    pub fn set_command(&self, address: PciAddress, command: Command) {
        config::write_command(&self.access, address, command);
    }

    /// Sets `bits` in the Command register, keeping the others.
    pub fn enable_command(&self, address: PciAddress, bits: Command) -> Result<(), KernelError> {
        let raw = self.access.read16(address, config::reg::COMMAND);
        if raw == u16::MAX {
            return Err(gone(address));
        }
        self.set_command(address, Command::from_bits_retain(raw) | bits);
        Ok(())
    }

    /// Both capability chains of `address`.
    pub fn capabilities(&self, address: PciAddress) -> CapabilityList {
        CapabilityList::read(&self.access, address)
    }

    /// Marks `address` as driven: an attention-button press on its slot then waits for
    /// [`PciBus::complete_removal`] instead of powering the slot off at once.
    pub fn claim(&mut self, address: PciAddress) {
        self.claimed.insert(address);
    }

    /// Drops a claim made with [`PciBus::claim`].
    pub fn release(&mut self, address: PciAddress) {
        self.claimed.remove(&address);
    }

    /// True when a driver claimed `address`.
    pub fn is_claimed(&self, address: PciAddress) -> bool {
        self.claimed.contains(&address)
    }

    fn index_of(&self, address: PciAddress) -> Option<usize> {
        self.devices
            .binary_search_by_key(&address, |d| d.address)
            .ok()
    }

    /// Inserts or replaces the record for `device.address`, keeping the list sorted.
    fn upsert(&mut self, device: PciDevice) {
        match self
            .devices
            .binary_search_by_key(&device.address, |d| d.address)
        {
            Ok(index) => self.devices[index] = device,
            Err(index) => self.devices.insert(index, device),
        }
    }

    /// Forgets every function on buses `first..=last`, with their claims; returns them.
    fn remove_buses(&mut self, first: u8, last: u8) -> Vec<PciDevice> {
        let (removed, kept): (Vec<PciDevice>, Vec<PciDevice>) = core::mem::take(&mut self.devices)
            .into_iter()
            .partition(|d| (first..=last).contains(&d.address.bus()));
        self.devices = kept;
        for device in &removed {
            self.claimed.remove(&device.address);
        }
        removed
    }
}

fn gone(address: PciAddress) -> KernelError {
    KernelError::Pci(PciErrorKind::DeviceGone {
        address: address.as_array(),
    })
}

fn bad_value(address: PciAddress, what: &'static str) -> KernelError {
    KernelError::Pci(PciErrorKind::BadValue {
        address: address.as_array(),
        what,
    })
}
