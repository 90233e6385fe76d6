//! Kernel glue: picks the config access method (MCFG ECAM, the q35 PCIEXBAR, else port I/O),
//! builds the [`Pci`] bus, maps BARs and wires MSI-X and hot-plug interrupts.

use super::address::PciAddress;
use super::capability::{MsixCapability, id};
use super::config::{ConfigAccess, Q35_HOST_BRIDGE_ID, Q35_PCIEXBAR, decode_pciexbar, reg};
use super::ecam::Ecam;
use super::msix::MsixTable;
use super::port_io::PortIo;
use super::{AddressRange, PciBus, RootResources, bad_value};
use crate::error::{KernelError, PciErrorKind};
use crate::interrupts::{allocate_vector, msi_message};
use crate::mm::mmio::MmioRegion;
use crate::pending_vectors::note_pending;
use alloc::vec;
use alloc::vec::Vec;

/// The config access method in use.
#[derive(Clone, Debug)]
pub enum PlatformConfig {
    /// Memory-mapped extended config space (4 KiB per function).
    Ecam(Ecam),
    /// Ports 0xCF8/0xCFC (256 bytes per function; no SR-IOV).
    PortIo(PortIo),
}

impl ConfigAccess for PlatformConfig {
    fn read32(&self, address: PciAddress, offset: u16) -> u32 {
        match self {
            PlatformConfig::Ecam(ecam) => ecam.read32(address, offset),
            PlatformConfig::PortIo(ports) => ports.read32(address, offset),
        }
    }

    fn write32(&self, address: PciAddress, offset: u16, value: u32) {
        match self {
            PlatformConfig::Ecam(ecam) => ecam.write32(address, offset, value),
            PlatformConfig::PortIo(ports) => ports.write32(address, offset, value),
        }
    }

    fn write16(&self, address: PciAddress, offset: u16, value: u16) {
        match self {
            PlatformConfig::Ecam(ecam) => ecam.write16(address, offset, value),
            PlatformConfig::PortIo(ports) => ports.write16(address, offset, value),
        }
    }

    fn write8(&self, address: PciAddress, offset: u16, value: u8) {
        match self {
            PlatformConfig::Ecam(ecam) => ecam.write8(address, offset, value),
            PlatformConfig::PortIo(ports) => ports.write8(address, offset, value),
        }
    }

    fn read16(&self, address: PciAddress, offset: u16) -> u16 {
        match self {
            PlatformConfig::Ecam(ecam) => ecam.read16(address, offset),
            PlatformConfig::PortIo(ports) => ports.read16(address, offset),
        }
    }

    fn read8(&self, address: PciAddress, offset: u16) -> u8 {
        match self {
            PlatformConfig::Ecam(ecam) => ecam.read8(address, offset),
            PlatformConfig::PortIo(ports) => ports.read8(address, offset),
        }
    }
}

/// The kernel's PCI bus.
pub type Pci = PciBus<PlatformConfig>;

/// Finds the config access method, enumerates, assigns missing BARs, enables memory decoding
/// for the functions it assigned, and arms every hot-plug slot (MSI-X, else MSI, else polled).
pub fn init() -> Result<Pci, KernelError> {
    let (access, root) = choose_access();
    let mut pci = PciBus::probe(access, root);
    pci.connect_hotplug_slots();
    Ok(pci)
}

/// ECAM from MCFG (segment 0); else the q35 MCH's PCIEXBAR if enabled; else port I/O. The
/// ECAM mapping is cross-checked against port I/O on 00:00.0 before it is trusted, unless
/// port I/O has no config space at all.
fn choose_access() -> (PlatformConfig, RootResources) {
    let mut root = RootResources::q35();
    let ports = PortIo::new();
    let host_bridge = PciAddress::new(0, 0, 0);
    let host_id = ports.read32(host_bridge, reg::VENDOR_ID);
    let from_mcfg = crate::acpi::mcfg_entries()
        .into_iter()
        .find(|entry| entry.segment == 0)
        .map(|entry| (entry.base, entry.bus_start, entry.bus_end, "MCFG"));
    let from_q35 = || {
        if host_id != Q35_HOST_BRIDGE_ID {
            return None;
        }
        let low = ports.read32(host_bridge, Q35_PCIEXBAR);
        let high = ports.read32(host_bridge, Q35_PCIEXBAR + 4);
        decode_pciexbar(low, high).map(|(base, last_bus)| (base, 0, last_bus, "q35 PCIEXBAR"))
    };
    if let Some((base, bus_start, bus_end, source)) = from_mcfg.or_else(from_q35) {
        match Ecam::new(base, bus_start, bus_end) {
            // Port I/O reading all-ones means ECAM is the only config access (OpenVMM's PCIe
            // root complex), so there is nothing to cross-check against.
            Ok(ecam)
                if bus_start != 0
                    || host_id == u32::MAX
                    || ecam.read32(host_bridge, reg::VENDOR_ID) == host_id =>
            {
                log::info!(
                    "pci: ECAM at {base:#x} buses {bus_start:02x}-{bus_end:02x} (from {source})"
                );
                if let Some(range) =
                    AddressRange::from_start_size(base, (u64::from(bus_end) + 1) << 20)
                {
                    root.reserved.push(range);
                }
                root.last_bus = bus_end;
                return (PlatformConfig::Ecam(ecam), root);
            }
            Ok(_) => {
                log::warn!("pci: ECAM at {base:#x} ({source}) does not match port I/O; ignored")
            }
            Err(error) => log::warn!("pci: cannot map ECAM at {base:#x} ({source}): {error}"),
        }
    }
    if host_id == u32::MAX {
        // Hyper-V Gen2 VMs and microvm have no PCI bus at all (Hyper-V's devices are on VMBus):
        // enumeration will find nothing, which is not a fault.
        log::info!("pci: no MCFG and no host bridge behind port 0xCF8: no PCI bus");
    } else {
        log::warn!("pci: using port I/O config access (256 bytes per function, no SR-IOV)");
    }
    (PlatformConfig::PortIo(ports), root)
}

impl<A: ConfigAccess> PciBus<A> {
    /// Maps memory BAR `index` of `address` (uncached). Fails for unknown, unassigned or I/O
    /// BARs. Any bus: the platform's, or a Hyper-V vPCI bus (`hyperv::vpci_vf`).
    pub fn map_bar(&self, address: PciAddress, index: usize) -> Result<MmioRegion, KernelError> {
        let bar = self
            .bar(address, index)
            .ok_or_else(|| bad_value(address, "no such BAR"))?;
        if !bar.is_memory() {
            return Err(bad_value(address, "I/O BAR cannot be mapped"));
        }
        if !bar.is_assigned() {
            return Err(bad_value(address, "BAR has no address"));
        }
        let len = usize::try_from(bar.size).map_err(|_| bad_value(address, "BAR too large"))?;
        MmioRegion::map(bar.address, len)
    }
}

impl PciBus<PlatformConfig> {
    /// Enables MSI-X on `address` with table entry `i` delivering kernel vector `vectors[i]`
    /// (vectors come from `crate::interrupts::allocate_vector`). Returns the table so the
    /// driver can mask and unmask entries.
    pub fn enable_msix(
        &self,
        address: PciAddress,
        vectors: &[u8],
    ) -> Result<MsixTable<MmioRegion>, KernelError> {
        let capability = MsixCapability::find(self.config(), address)?;
        let region = self.map_bar(address, usize::from(capability.table_bar))?;
        let messages: Vec<(u64, u32)> = vectors.iter().map(|&vector| msi_message(vector)).collect();
        self.enable_msix_with(address, region, &messages)
    }

    /// Wires an interrupt to every known, unarmed hot-plug slot and arms it; a slot whose
    /// interrupt cannot be wired is armed in polled mode.
    pub fn connect_hotplug_slots(&mut self) {
        let ports: Vec<PciAddress> = self.hotplug_slots().map(|(port, _)| port).collect();
        for port in ports {
            let vector = match self.connect_hotplug_interrupt(port) {
                Ok(vector) => Some(vector),
                Err(error) => {
                    log::warn!("hotplug: slot {port}: no interrupt ({error}); polling");
                    None
                }
            };
            if let Err(error) = self.arm_hotplug_slot(port, vector) {
                log::warn!("hotplug: slot {port} not armed: {error}");
            }
        }
    }

    /// MSI-X (entry = the port's interrupt message number) or MSI for a hot-plug port. The
    /// vector is allocated only once the capability and its BAR are known to be usable.
    fn connect_hotplug_interrupt(&mut self, port: PciAddress) -> Result<u8, KernelError> {
        let message_number = self.hotplug_message_number(port)?;
        let capabilities = self.capabilities(port);
        if capabilities.find(id::MSIX).is_some() {
            let capability = MsixCapability::find(self.config(), port)?;
            if u16::from(message_number) >= capability.table_size {
                return Err(bad_value(
                    port,
                    "hot-plug message number beyond the MSI-X table",
                ));
            }
            let region = self.map_bar(port, usize::from(capability.table_bar))?;
            // The handler only notes the event; the next hot-plug `service` call looks.
            let vector = allocate_vector(note_pending)?;
            let messages = vec![msi_message(vector); usize::from(message_number) + 1];
            self.enable_msix_with(port, region, &messages)?;
            return Ok(vector);
        }
        if capabilities.find(id::MSI).is_some() {
            let vector = allocate_vector(note_pending)?;
            self.enable_msi(port, msi_message(vector))?;
            return Ok(vector);
        }
        Err(KernelError::Pci(PciErrorKind::MissingCapability {
            address: port.as_array(),
            capability: "msi/msix",
        }))
    }
}
