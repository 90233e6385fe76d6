//! SR-IOV: sizing and placing VF BARs, enabling VFs, and registering the VFs (which a
//! vendor-ID scan never finds) as functions (SR-IOV 1.1 §3.3; QEMU quirks in the reference
//! `qemu-igb-sriov-hotplug.md` §1.2-1.4).

use super::allocator::Placement;
use super::bar::{AddressRange, Bar, program_bar, size_bars};
use super::capability::{PcieCapability, SriovCapability, find_capability, id, sriov};
use super::config::{ClassCode, Command, ConfigAccess, HeaderType, reg, write_command};
use super::{PciAddress, PciBus, PciDevice, bad_value, gone};
use crate::error::{KernelError, PciErrorKind};
use alloc::vec::Vec;

/// Config reads of a just-enabled VF before giving up on it. SR-IOV 1.1 §3.3.3.1 asks for
/// 100 ms before the first VF access on real hardware; QEMU answers at once, and a caller on
/// hardware should wait before calling into the VFs' drivers anyway.
const VF_READY_POLLS: u32 = 1000;

/// The VF layout of a PF whose VFs we enabled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SriovState {
    /// Offset of the SR-IOV capability in the PF.
    pub capability_offset: u16,
    /// VFs enabled.
    pub num_vfs: u16,
    /// VF BARs: `address` is VF 0's base, `size` the per-VF size; VF i's BAR is at
    /// `address + i * size`.
    pub vf_bars: [Option<Bar>; 6],
    /// The VFs' addresses, VF 0 first.
    pub vfs: Vec<PciAddress>,
}

impl SriovState {
    /// The address ranges the VF BARs occupy in total (per-VF size × NumVFs each).
    pub fn vf_bar_ranges(&self) -> impl Iterator<Item = AddressRange> + '_ {
        self.vf_bars.iter().flatten().filter_map(|bar| {
            let total = bar.size.checked_mul(u64::from(self.num_vfs))?;
            AddressRange::from_start_size(bar.address, total)
        })
    }

    /// BAR `index` of VF `vf_index`.
    pub fn vf_bar(&self, vf_index: u16, index: usize) -> Option<Bar> {
        let bar = self.vf_bars.get(index).copied().flatten()?;
        let offset = bar.size.checked_mul(u64::from(vf_index))?;
        Some(Bar {
            address: bar.address.checked_add(offset)?,
            ..bar
        })
    }
}

impl<A: ConfigAccess> PciBus<A> {
    /// Enables `num_vfs` VFs on the PF at `pf` and returns their addresses, VF 0 first.
    ///
    /// Steps (SR-IOV 1.1 §3.3.3-3.3.14, plus QEMU §1.4): clear VF Enable if set; write NumVFs;
    /// re-read First VF Offset / VF Stride (they may depend on NumVFs); size the VF BARs and
    /// place per-VF size × NumVFs of each inside the PF's bus windows, below 4 GiB when
    /// possible; set VF Enable | VF MSE; then give every VF Command MEM|BME, because QEMU
    /// gates VF BAR decoding and DMA on the VF's own Command register. The VFs are added to
    /// [`PciBus::devices`] with the PF's vendor ID and the VF Device ID.
    pub fn enable_sriov(
        &mut self,
        pf: PciAddress,
        num_vfs: u16,
    ) -> Result<Vec<PciAddress>, KernelError> {
        let pf_device = self.device(pf).cloned().ok_or_else(|| gone(pf))?;
        if pf_device.is_virtual_function() {
            return Err(bad_value(pf, "a VF cannot enable SR-IOV"));
        }
        let mut capability = SriovCapability::find(&self.access, pf)?;
        if num_vfs == 0 || num_vfs > capability.total_vfs {
            return Err(bad_value(pf, "NumVFs is 0 or above TotalVFs"));
        }
        let control_offset = capability.offset + sriov::CONTROL;
        let keep_ari = capability.control & sriov::CONTROL_ARI_CAPABLE;
        if capability.control & (sriov::CONTROL_VF_ENABLE | sriov::CONTROL_VF_MEMORY_ENABLE) != 0 {
            log::info!("pci: {pf} VFs were enabled; disabling before reconfiguring");
            self.access.write16(pf, control_offset, keep_ari);
            self.forget_vfs(pf);
        }

        self.access
            .write16(pf, capability.offset + sriov::NUM_VFS, num_vfs);
        capability = SriovCapability::read(&self.access, pf, capability.offset)?;
        if capability.num_vfs != num_vfs {
            return Err(bad_value(pf, "device did not accept NumVFs"));
        }
        if capability.first_vf_offset == 0 || (num_vfs > 1 && capability.vf_stride == 0) {
            return Err(bad_value(pf, "SR-IOV First VF Offset/VF Stride is zero"));
        }
        let vfs = self.vf_addresses(pf, &capability, num_vfs)?;

        let vf_bars = self.place_vf_bars(pf, &capability, num_vfs)?;

        self.access.write16(
            pf,
            control_offset,
            keep_ari | sriov::CONTROL_VF_ENABLE | sriov::CONTROL_VF_MEMORY_ENABLE,
        );

        let state = SriovState {
            capability_offset: capability.offset,
            num_vfs,
            vf_bars,
            vfs: vfs.clone(),
        };
        let mut records = Vec::with_capacity(vfs.len());
        for (vf_index, &vf) in vfs.iter().enumerate() {
            let ready =
                (0..VF_READY_POLLS).any(|_| self.access.read32(vf, reg::REVISION_ID) != u32::MAX);
            if !ready {
                log::warn!("pci: {pf} VF {vf_index} at {vf} never answered; disabling VFs");
                self.access.write16(pf, control_offset, keep_ari);
                return Err(gone(vf));
            }
            write_command(
                &self.access,
                vf,
                Command::MEMORY_SPACE | Command::BUS_MASTER,
            );
            records.push(self.vf_record(&pf_device, &capability, &state, vf, vf_index as u16));
        }
        for record in records {
            self.upsert(record);
        }
        if let Some(index) = self.index_of(pf) {
            self.devices[index].sriov = Some(state);
        }
        log::info!(
            "pci: {pf} SR-IOV: {num_vfs} VFs {:04x}:{:04x} at {}..",
            pf_device.vendor_id,
            capability.vf_device_id,
            vfs[0]
        );
        Ok(vfs)
    }

    /// Clears VF Enable and VF MSE on `pf` and forgets its VFs (QEMU resets and hides them).
    pub fn disable_sriov(&mut self, pf: PciAddress) -> Result<(), KernelError> {
        let capability = SriovCapability::find(&self.access, pf)?;
        let keep_ari = capability.control & sriov::CONTROL_ARI_CAPABLE;
        self.access
            .write16(pf, capability.offset + sriov::CONTROL, keep_ari);
        self.forget_vfs(pf);
        log::info!("pci: {pf} SR-IOV disabled");
        Ok(())
    }

    /// Removes the VF records of `pf` and their claims.
    fn forget_vfs(&mut self, pf: PciAddress) {
        let vfs: Vec<PciAddress> = self
            .devices
            .iter()
            .filter(|d| d.physical_function == Some(pf))
            .map(|d| d.address)
            .collect();
        self.devices.retain(|d| d.physical_function != Some(pf));
        for vf in vfs {
            self.claimed.remove(&vf);
        }
        if let Some(index) = self.index_of(pf) {
            self.devices[index].sriov = None;
        }
    }

    /// Routing IDs of the VFs, checked to be reachable behind the PF's upstream bridge and
    /// not to collide with a real function.
    fn vf_addresses(
        &self,
        pf: PciAddress,
        capability: &SriovCapability,
        num_vfs: u16,
    ) -> Result<Vec<PciAddress>, KernelError> {
        let last_reachable_bus = match self.device(pf).and_then(|d| d.parent) {
            Some(parent) => self
                .device(parent)
                .and_then(|d| d.bridge)
                .map_or(pf.bus(), |b| b.subordinate_bus),
            None => self.root.last_bus,
        };
        let mut vfs = Vec::with_capacity(usize::from(num_vfs));
        for index in 0..num_vfs {
            let vf = capability
                .vf_address(pf, index)
                .ok_or_else(|| bad_value(pf, "VF routing ID overflows"))?;
            if vf.bus() > last_reachable_bus {
                return Err(bad_value(
                    pf,
                    "VF bus number beyond the bridge's subordinate bus",
                ));
            }
            if self
                .device(vf)
                .is_some_and(|d| d.physical_function != Some(pf))
            {
                return Err(bad_value(
                    pf,
                    "VF routing ID collides with another function",
                ));
            }
            vfs.push(vf);
        }
        Ok(vfs)
    }

    /// Sizes the VF BARs (decode is off: VF MSE clear) and programs each to a fresh range of
    /// per-VF size × NumVFs, aligned to the per-VF size and at least the system page size.
    fn place_vf_bars(
        &mut self,
        pf: PciAddress,
        capability: &SriovCapability,
        num_vfs: u16,
    ) -> Result<[Option<Bar>; 6], KernelError> {
        let bar_base = capability.offset + sriov::VF_BAR0;
        let mut vf_bars = size_bars(&self.access, pf, bar_base, 6);
        // System Page Size bit n selects 4 KiB << n (SR-IOV 1.1 §3.3.13).
        let page_shift = capability.system_page_size.trailing_zeros().min(20);
        let page_size = 4096u64 << page_shift;
        let (windows, is_root) = self.bus_windows(pf.bus());
        let mut allocator = self.bus_allocator(pf.bus(), &windows, is_root, Some(pf));
        for (index, slot) in vf_bars.iter_mut().enumerate() {
            let Some(bar) = slot.as_mut() else { continue };
            let total = bar
                .size
                .checked_mul(u64::from(num_vfs))
                .ok_or_else(|| bad_value(pf, "VF BAR total size overflows"))?;
            let align = bar.size.max(page_size);
            let placements = Placement::for_bar(bar.kind, bar.prefetchable);
            let Some(start) = allocator.allocate(total, align, placements) else {
                log::warn!(
                    "pci: {pf} no room for VF BAR{index} ({num_vfs} x {:#x})",
                    bar.size
                );
                return Err(KernelError::Pci(PciErrorKind::NoBarSpace {
                    address: pf.as_array(),
                    size: total,
                }));
            };
            program_bar(&self.access, pf, bar_base, index, bar, start)?;
            bar.address = start;
            log::debug!(
                "pci: {pf} VF BAR{index} at {start:#x}, {num_vfs} x {:#x}",
                bar.size
            );
        }
        Ok(vf_bars)
    }

    /// The device record of VF `vf_index`.
    fn vf_record(
        &self,
        pf: &PciDevice,
        capability: &SriovCapability,
        state: &SriovState,
        vf: PciAddress,
        vf_index: u16,
    ) -> PciDevice {
        let class_dword = self.access.read32(vf, reg::REVISION_ID);
        let mut bars = [None; 6];
        for (index, bar) in bars.iter_mut().enumerate() {
            *bar = state.vf_bar(vf_index, index);
        }
        let port_type = find_capability(&self.access, vf, id::PCI_EXPRESS)
            .and_then(|offset| PcieCapability::read(&self.access, vf, offset).ok())
            .map(|p| p.port_type);
        PciDevice {
            address: vf,
            vendor_id: pf.vendor_id,
            device_id: capability.vf_device_id,
            revision: class_dword as u8,
            class: ClassCode {
                base: (class_dword >> 24) as u8,
                sub: (class_dword >> 16) as u8,
                prog_if: (class_dword >> 8) as u8,
            },
            header_type: HeaderType::Endpoint,
            multifunction: false,
            bars,
            bridge: None,
            port_type,
            hotplug_slot: false,
            parent: pf.parent,
            physical_function: Some(pf.address),
            sriov: None,
        }
    }
}
