//! A fake configuration space for host tests, modelling what QEMU 10.0.2 q35 does: per-function
//! 4 KiB spaces with write masks (BAR sizing) and W1C bits, type 1 routing through bridge bus
//! numbers, pcie-root-port hot-plug (reference §4.2-4.5, including the Slot Status W1C revert
//! quirk) and SR-IOV VFs appearing on VF Enable (reference §1.2-1.4).

use super::address::PciAddress;
use super::config::ConfigAccess;
use alloc::boxed::Box;
use alloc::collections::BTreeMap;
use alloc::vec;
use alloc::vec::Vec;
use std::sync::{Arc, Mutex, MutexGuard};

const SPACE: usize = 4096;

/// Slot register offsets relative to the PCIe capability.
const SLOT_CONTROL: usize = 0x18;
const SLOT_STATUS: usize = 0x1a;
const LINK_STATUS: usize = 0x12;
/// Slot Status event bits (W1C).
const SLOT_EVENTS: u16 = 0x011f;
const SLOT_ABP: u16 = 0x1;
const SLOT_PDC: u16 = 0x8;
const SLOT_CC: u16 = 0x10;
const SLOT_PDS: u16 = 0x40;
const CONTROL_HPIE: u16 = 0x20;
const CONTROL_PCC_OFF: u16 = 0x400;
const CONTROL_PIC_OFF: u16 = 0x300;
const LINK_DLL_ACTIVE: u16 = 0x2000;

/// A BAR to give a fake function.
#[derive(Clone, Copy, Debug)]
pub(crate) enum FakeBar {
    /// 32-bit memory BAR.
    Memory32 { size: u64, prefetchable: bool },
    /// 64-bit memory BAR (takes the next slot too).
    Memory64 { size: u64, prefetchable: bool },
    /// 16-bit-decoding I/O BAR.
    Io { size: u64 },
}

/// SR-IOV emulation state of a PF.
#[derive(Clone, Debug)]
struct FakeSriov {
    offset: usize,
    vf_template: Box<FakeFunction>,
    enabled: Vec<PciAddress>,
}

/// One fake function.
#[derive(Clone, Debug)]
pub(crate) struct FakeFunction {
    bytes: Vec<u8>,
    write_mask: Vec<u8>,
    clear_mask: Vec<u8>,
    /// For bridges: the functions on the secondary bus, by devfn.
    children: BTreeMap<u8, FakeFunction>,
    /// PCIe capability offset of a hot-plug slot.
    slot: Option<usize>,
    sriov: Option<FakeSriov>,
    last_capability: Option<usize>,
    last_extended: Option<usize>,
    slot_interrupt_line: bool,
    slot_interrupts: u32,
}

impl FakeFunction {
    fn blank() -> Self {
        FakeFunction {
            bytes: vec![0; SPACE],
            write_mask: vec![0; SPACE],
            clear_mask: vec![0; SPACE],
            children: BTreeMap::new(),
            slot: None,
            sriov: None,
            last_capability: None,
            last_extended: None,
            slot_interrupt_line: false,
            slot_interrupts: 0,
        }
    }

    /// A type 0 function with Command writable and Status error bits W1C.
    pub(crate) fn endpoint(vendor: u16, device: u16, class: [u8; 3]) -> Self {
        let mut function = FakeFunction::blank();
        function.set_bytes(0, &vendor.to_le_bytes());
        function.set_bytes(2, &device.to_le_bytes());
        function.set_bytes(0x09, &[class[2], class[1], class[0]]);
        function.write_mask[4..6].copy_from_slice(&0x0547u16.to_le_bytes());
        function.clear_mask[6..8].copy_from_slice(&0xf900u16.to_le_bytes());
        function.write_mask[0x3c] = 0xff;
        function
    }

    /// A type 1 bridge at reset: bus numbers 0, windows zero (closed), 64-bit prefetchable.
    pub(crate) fn bridge(vendor: u16, device: u16) -> Self {
        let mut function = FakeFunction::endpoint(vendor, device, [6, 4, 0]);
        function.bytes[0x0e] = 0x01;
        function.write_mask[0x18..0x1c].fill(0xff);
        function.write_mask[0x1c] = 0xf0;
        function.write_mask[0x1d] = 0xf0;
        function.clear_mask[0x1e..0x20].copy_from_slice(&0xf900u16.to_le_bytes());
        for offset in [0x20, 0x22, 0x24, 0x26] {
            function.write_mask[offset..offset + 2].copy_from_slice(&0xfff0u16.to_le_bytes());
        }
        function.bytes[0x24] = 0x01;
        function.bytes[0x26] = 0x01;
        function.write_mask[0x28..0x30].fill(0xff);
        function.write_mask[0x3e..0x40].copy_from_slice(&0x0fffu16.to_le_bytes());
        function
    }

    /// Overwrites raw bytes (no masks).
    pub(crate) fn set_bytes(&mut self, offset: u16, data: &[u8]) {
        let start = usize::from(offset);
        self.bytes[start..start + data.len()].copy_from_slice(data);
    }

    /// Makes bits writable.
    pub(crate) fn writable(mut self, offset: u16, mask: &[u8]) -> Self {
        let start = usize::from(offset);
        self.write_mask[start..start + mask.len()].copy_from_slice(mask);
        self
    }

    /// Sets the multi-function bit.
    pub(crate) fn with_multifunction(mut self) -> Self {
        self.bytes[0x0e] |= 0x80;
        self
    }

    /// Gives BAR `index` a type and size (address 0, write mask from the size).
    pub(crate) fn with_bar(self, index: usize, bar: FakeBar) -> Self {
        self.with_bar_at(0x10 + 4 * index, bar)
    }

    fn with_bar_at(mut self, offset: usize, bar: FakeBar) -> Self {
        let (flags, mask): (u32, u64) = match bar {
            FakeBar::Memory32 { size, prefetchable } => {
                (u32::from(prefetchable) << 3, !(size - 1) & 0xffff_fff0)
            }
            FakeBar::Memory64 { size, prefetchable } => {
                ((u32::from(prefetchable) << 3) | 0b100, !(size - 1) & !0xf)
            }
            FakeBar::Io { size } => (1, !(size - 1) & 0xfffc),
        };
        self.bytes[offset..offset + 4].copy_from_slice(&flags.to_le_bytes());
        self.write_mask[offset..offset + 4].copy_from_slice(&(mask as u32).to_le_bytes());
        if let FakeBar::Memory64 { .. } = bar {
            self.write_mask[offset + 4..offset + 8]
                .copy_from_slice(&((mask >> 32) as u32).to_le_bytes());
        }
        self
    }

    /// Presets BAR `index` to `address` (as firmware would have), keeping its type bits.
    pub(crate) fn with_bar_address(mut self, index: usize, address: u64) -> Self {
        let offset = 0x10 + 4 * index;
        let low = u32::from_le_bytes(self.bytes[offset..offset + 4].try_into().unwrap());
        let flags = if low & 1 == 1 { low & 0x3 } else { low & 0xf };
        self.bytes[offset..offset + 4].copy_from_slice(&((address as u32) | flags).to_le_bytes());
        if low & 0b110 == 0b100 {
            self.bytes[offset + 4..offset + 8]
                .copy_from_slice(&((address >> 32) as u32).to_le_bytes());
        }
        self
    }

    /// Appends a standard capability at `offset`: `body` follows the ID/next bytes.
    pub(crate) fn with_capability(mut self, offset: u8, capability_id: u8, body: &[u8]) -> Self {
        let at = usize::from(offset);
        self.bytes[at] = capability_id;
        self.bytes[at + 1] = 0;
        self.bytes[at + 2..at + 2 + body.len()].copy_from_slice(body);
        match self.last_capability {
            Some(previous) => self.bytes[previous + 1] = offset,
            None => self.bytes[0x34] = offset,
        }
        self.bytes[6] |= 0x10;
        self.last_capability = Some(at);
        self
    }

    /// Appends an extended capability at `offset`: `body` follows the 4-byte header.
    pub(crate) fn with_extended_capability(
        mut self,
        offset: u16,
        capability_id: u16,
        version: u8,
        body: &[u8],
    ) -> Self {
        let at = usize::from(offset);
        let header = u32::from(capability_id) | (u32::from(version) << 16);
        self.bytes[at..at + 4].copy_from_slice(&header.to_le_bytes());
        self.bytes[at + 4..at + 4 + body.len()].copy_from_slice(body);
        if let Some(previous) = self.last_extended {
            let mut header =
                u32::from_le_bytes(self.bytes[previous..previous + 4].try_into().unwrap());
            header |= u32::from(offset) << 20;
            self.bytes[previous..previous + 4].copy_from_slice(&header.to_le_bytes());
        }
        self.last_extended = Some(at);
        self
    }

    /// Sets primary/secondary/subordinate bus numbers (firmware-numbered bridge).
    pub(crate) fn with_bus_numbers(mut self, primary: u8, secondary: u8, subordinate: u8) -> Self {
        self.bytes[0x18] = primary;
        self.bytes[0x19] = secondary;
        self.bytes[0x1a] = subordinate;
        self
    }

    /// Opens the memory and prefetchable windows (firmware-programmed bridge).
    pub(crate) fn with_windows(mut self, memory: (u32, u32), prefetchable: (u32, u32)) -> Self {
        let memory_registers = ((memory.0 >> 16) & 0xfff0) | (((memory.1 >> 16) & 0xfff0) << 16);
        self.bytes[0x20..0x24].copy_from_slice(&memory_registers.to_le_bytes());
        let prefetchable_registers = ((prefetchable.0 >> 16) & 0xfff0)
            | (((prefetchable.1 >> 16) & 0xfff0) << 16)
            | 0x0001_0001;
        self.bytes[0x24..0x28].copy_from_slice(&prefetchable_registers.to_le_bytes());
        self
    }

    /// Places `child` at `devfn` on this bridge's secondary bus.
    pub(crate) fn with_child(mut self, devfn: u8, child: FakeFunction) -> Self {
        self.children.insert(devfn, child);
        self
    }

    fn is_bridge(&self) -> bool {
        self.bytes[0x0e] & 0x7f == 1
    }

    fn read16_at(&self, offset: usize) -> u16 {
        u16::from_le_bytes([self.bytes[offset], self.bytes[offset + 1]])
    }

    fn write16_at(&mut self, offset: usize, value: u16) {
        self.bytes[offset..offset + 2].copy_from_slice(&value.to_le_bytes());
    }

    /// A hot-plug port powers its children only while Power Controller Control is "on".
    fn slot_powered(&self) -> bool {
        self.slot
            .is_none_or(|cap| self.read16_at(cap + SLOT_CONTROL) & CONTROL_PCC_OFF == 0)
    }

    /// Raises the (counted) hot-plug interrupt on a false→true edge (pcie.c:396-439).
    fn update_slot_interrupt(&mut self) {
        let Some(cap) = self.slot else { return };
        let control = self.read16_at(cap + SLOT_CONTROL);
        let status = self.read16_at(cap + SLOT_STATUS);
        let asserted =
            control & CONTROL_HPIE != 0 && status & control & (SLOT_ABP | SLOT_PDC | SLOT_CC) != 0;
        if asserted && !self.slot_interrupt_line {
            self.slot_interrupts += 1;
        }
        self.slot_interrupt_line = asserted;
    }

    fn set_slot_presence(&mut self, present: bool) {
        let Some(cap) = self.slot else { return };
        let mut status = self.read16_at(cap + SLOT_STATUS);
        let mut link = self.read16_at(cap + LINK_STATUS);
        if present {
            status |= SLOT_PDS;
            link |= LINK_DLL_ACTIVE;
        } else {
            status &= !SLOT_PDS;
            link &= !LINK_DLL_ACTIVE;
        }
        status |= SLOT_PDC;
        self.write16_at(cap + SLOT_STATUS, status);
        self.write16_at(cap + LINK_STATUS, link);
    }
}

/// One recorded config write.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) struct WriteRecord {
    pub(crate) address: PciAddress,
    pub(crate) offset: u16,
    pub(crate) width: u8,
    pub(crate) value: u32,
}

#[derive(Default)]
struct FakeState {
    root: BTreeMap<u8, FakeFunction>,
    writes: Vec<WriteRecord>,
}

/// Finds the functions of `target` bus by following bridge bus numbers, as type 1 routing
/// does. With `respect_power`, a powered-off hot-plug slot hides its subtree.
fn container(
    map: &mut BTreeMap<u8, FakeFunction>,
    this_bus: u8,
    target: u8,
    respect_power: bool,
) -> Option<&mut BTreeMap<u8, FakeFunction>> {
    if this_bus == target {
        return Some(map);
    }
    for function in map.values_mut() {
        if !function.is_bridge() {
            continue;
        }
        let (secondary, subordinate) = (function.bytes[0x19], function.bytes[0x1a]);
        if secondary > this_bus && secondary <= target && target <= subordinate {
            if respect_power && !function.slot_powered() {
                return None;
            }
            return container(&mut function.children, secondary, target, respect_power);
        }
    }
    None
}

impl FakeState {
    fn function(&mut self, address: PciAddress, respect_power: bool) -> Option<&mut FakeFunction> {
        container(&mut self.root, 0, address.bus(), respect_power)?.get_mut(&address.devfn())
    }

    fn write(&mut self, address: PciAddress, offset: u16, data: &[u8]) {
        let value = data
            .iter()
            .rev()
            .fold(0u32, |v, b| (v << 8) | u32::from(*b));
        self.writes.push(WriteRecord {
            address,
            offset,
            width: data.len() as u8,
            value,
        });
        let start = usize::from(offset);
        if start + data.len() > SPACE {
            return;
        }
        let Some(function) = self.function(address, true) else {
            return;
        };
        let old = function.bytes.clone();
        for (i, byte) in data.iter().enumerate() {
            let at = start + i;
            let mask = function.write_mask[at];
            let mut new = (function.bytes[at] & !mask) | (byte & mask);
            new &= !(byte & function.clear_mask[at]);
            function.bytes[at] = new;
        }
        let overlaps =
            |register: usize, len: usize| start < register + len && register < start + data.len();
        if let Some(cap) = function.slot {
            if overlaps(cap + SLOT_STATUS, 2) {
                // QEMU's W1C workaround (pcie.c:826-849): a write that sets event bits which are
                // not pending is reverted entirely.
                let mut written = [0u8; 2];
                for (i, byte) in written.iter_mut().enumerate() {
                    let at = cap + SLOT_STATUS + i;
                    if at >= start && at < start + data.len() {
                        *byte = data[at - start];
                    }
                }
                let written = u16::from_le_bytes(written) & SLOT_EVENTS;
                let current = function.read16_at(cap + SLOT_STATUS);
                if written & !current == 0 {
                    function.write16_at(cap + SLOT_STATUS, current & !written);
                }
            }
            if overlaps(cap + SLOT_CONTROL, 2) {
                let old_control =
                    u16::from_le_bytes([old[cap + SLOT_CONTROL], old[cap + SLOT_CONTROL + 1]]);
                self.slot_control_written(address, old_control);
            }
        }
        let Some(function) = self.function(address, true) else {
            return;
        };
        if let Some(sriov) = function.sriov.as_ref() {
            let control = sriov.offset + 8;
            if overlaps(control, 2) {
                let was_enabled = old[control] & 1 != 0;
                self.sriov_control_written(address, was_enabled);
            }
        }
        if let Some(function) = self.function(address, false) {
            function.update_slot_interrupt();
        }
    }

    /// Slot Control side effects (pcie.c:819-912): every write completes at once and sets CC;
    /// PCC off + PIC off with an adapter present (and not already so) deletes the adapter.
    fn slot_control_written(&mut self, port: PciAddress, old_control: u16) {
        let Some(function) = self.function(port, false) else {
            return;
        };
        let Some(cap) = function.slot else { return };
        let control = function.read16_at(cap + SLOT_CONTROL);
        let status = function.read16_at(cap + SLOT_STATUS);
        function.write16_at(cap + SLOT_STATUS, status | SLOT_CC);
        let off = |c: u16| c & CONTROL_PCC_OFF != 0 && c & CONTROL_PIC_OFF == CONTROL_PIC_OFF;
        if off(control) && !off(old_control) && status & SLOT_PDS != 0 {
            function.children.clear();
            function.set_slot_presence(false);
        }
    }

    /// VF Enable 0→1 creates NumVFs VFs at PF RID + offset + stride × i; 1→0 removes them.
    fn sriov_control_written(&mut self, pf: PciAddress, was_enabled: bool) {
        let Some(function) = self.function(pf, true) else {
            return;
        };
        let Some(sriov) = function.sriov.as_ref() else {
            return;
        };
        let offset = sriov.offset;
        let enabled = function.bytes[offset + 8] & 1 != 0;
        if enabled == was_enabled {
            return;
        }
        let num_vfs = function.read16_at(offset + 0x10);
        let first = function.read16_at(offset + 0x14);
        let stride = function.read16_at(offset + 0x16);
        let template = (*sriov.vf_template).clone();
        let previously: Vec<PciAddress> = sriov.enabled.clone();
        // NumVFs is writable only while VF Enable is clear (pcie_sriov.c:197).
        let num_vfs_mask: u8 = if enabled { 0 } else { 0xff };
        function.write_mask[offset + 0x10..offset + 0x12].fill(num_vfs_mask);
        let mut created = Vec::new();
        if enabled {
            for index in 0..num_vfs {
                let rid = u32::from(pf.routing_id())
                    + u32::from(first)
                    + u32::from(stride) * u32::from(index);
                if let Ok(rid) = u16::try_from(rid) {
                    created.push(PciAddress::from_routing_id(rid));
                }
            }
        }
        for vf in &previously {
            if let Some(functions) = container(&mut self.root, 0, vf.bus(), false) {
                functions.remove(&vf.devfn());
            }
        }
        for vf in &created {
            if let Some(functions) = container(&mut self.root, 0, vf.bus(), false) {
                functions.insert(vf.devfn(), template.clone());
            }
        }
        if let Some(sriov) = self.function(pf, true).and_then(|f| f.sriov.as_mut()) {
            sriov.enabled = created;
        }
    }
}

/// The shared fake config space; clones share state, so a test keeps a handle while the
/// [`super::PciBus`] owns another.
#[derive(Clone, Default)]
pub(crate) struct FakeConfigSpace {
    state: Arc<Mutex<FakeState>>,
}

impl FakeConfigSpace {
    pub(crate) fn new() -> Self {
        FakeConfigSpace::default()
    }

    fn lock(&self) -> MutexGuard<'_, FakeState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Puts `function` at `address` (the bus must be routed already).
    pub(crate) fn insert(&self, address: PciAddress, function: FakeFunction) {
        let mut state = self.lock();
        let functions = container(&mut state.root, 0, address.bus(), false)
            .unwrap_or_else(|| panic!("fake: bus {:02x} is not routed", address.bus()));
        functions.insert(address.devfn(), function);
    }

    /// Overwrites raw bytes of a function, bypassing masks and hooks.
    pub(crate) fn write_raw(&self, address: PciAddress, offset: u16, data: &[u8]) {
        let mut state = self.lock();
        let function = state
            .function(address, false)
            .expect("fake: no such function");
        function.set_bytes(offset, data);
    }

    /// Every config write so far.
    pub(crate) fn writes(&self) -> Vec<WriteRecord> {
        self.lock().writes.clone()
    }

    /// QEMU `device_del` of the adapter in `port`'s slot (pcie.c:608-664): pushes the
    /// attention button, or deletes at once if the slot is already powered off.
    pub(crate) fn device_del(&self, port: PciAddress) {
        let mut state = self.lock();
        let function = state.function(port, false).expect("fake: no port");
        let cap = function.slot.expect("fake: not a hot-plug port");
        let control = function.read16_at(cap + SLOT_CONTROL);
        if control & CONTROL_PCC_OFF != 0 && control & CONTROL_PIC_OFF == CONTROL_PIC_OFF {
            function.children.clear();
            function.set_slot_presence(false);
        } else {
            let status = function.read16_at(cap + SLOT_STATUS);
            function.write16_at(cap + SLOT_STATUS, status | SLOT_ABP);
        }
        function.update_slot_interrupt();
    }

    /// QEMU `device_add` into `port`'s empty slot (reference §4.5): PDS|PDC|ABP, link up; the
    /// functions stay invisible while the slot is powered off.
    pub(crate) fn device_add(&self, port: PciAddress, functions: Vec<(u8, FakeFunction)>) {
        let mut state = self.lock();
        let function = state.function(port, false).expect("fake: no port");
        let cap = function.slot.expect("fake: not a hot-plug port");
        assert_eq!(
            function.read16_at(cap + SLOT_STATUS) & SLOT_PDS,
            0,
            "fake: slot occupied"
        );
        for (devfn, child) in functions {
            function.children.insert(devfn, child);
        }
        function.set_slot_presence(true);
        let status = function.read16_at(cap + SLOT_STATUS);
        function.write16_at(cap + SLOT_STATUS, status | SLOT_ABP);
        function.update_slot_interrupt();
    }

    /// The adapter is yanked out: presence lost, no button press.
    pub(crate) fn surprise_remove(&self, port: PciAddress) {
        let mut state = self.lock();
        let function = state.function(port, false).expect("fake: no port");
        function.children.clear();
        function.set_slot_presence(false);
        function.update_slot_interrupt();
    }

    /// Hot-plug interrupts the port raised so far.
    pub(crate) fn slot_interrupts(&self, port: PciAddress) -> u32 {
        self.lock()
            .function(port, false)
            .map_or(0, |f| f.slot_interrupts)
    }

    /// Raw Slot Status of a fake port.
    pub(crate) fn slot_status(&self, port: PciAddress) -> u16 {
        let mut state = self.lock();
        let function = state.function(port, false).expect("fake: no port");
        function.read16_at(function.slot.expect("fake: no slot") + SLOT_STATUS)
    }

    /// Raw Slot Control of a fake port.
    pub(crate) fn slot_control(&self, port: PciAddress) -> u16 {
        let mut state = self.lock();
        let function = state.function(port, false).expect("fake: no port");
        function.read16_at(function.slot.expect("fake: no slot") + SLOT_CONTROL)
    }
}

impl ConfigAccess for FakeConfigSpace {
    fn read32(&self, address: PciAddress, offset: u16) -> u32 {
        let start = usize::from(offset & !3);
        if start + 4 > SPACE {
            return u32::MAX;
        }
        let mut state = self.lock();
        match state.function(address, true) {
            Some(function) => {
                u32::from_le_bytes(function.bytes[start..start + 4].try_into().unwrap())
            }
            None => u32::MAX,
        }
    }

    fn write32(&self, address: PciAddress, offset: u16, value: u32) {
        self.lock()
            .write(address, offset & !3, &value.to_le_bytes());
    }

    fn write16(&self, address: PciAddress, offset: u16, value: u16) {
        self.lock()
            .write(address, offset & !1, &value.to_le_bytes());
    }

    fn write8(&self, address: PciAddress, offset: u16, value: u8) {
        self.lock().write(address, offset, &[value]);
    }
}

/// A fake register window (an MSI-X table BAR) implementing `RegisterIo`.
#[derive(Clone, Debug)]
pub(crate) struct FakeRegisters {
    words: Arc<Mutex<Vec<u32>>>,
}

impl FakeRegisters {
    pub(crate) fn new(len: usize) -> Self {
        FakeRegisters {
            words: Arc::new(Mutex::new(vec![0; len / 4])),
        }
    }
}

impl net_device::RegisterIo for FakeRegisters {
    fn read32(&self, offset: usize) -> u32 {
        let words = self.words.lock().unwrap();
        words.get(offset / 4).copied().unwrap_or(u32::MAX)
    }

    fn write32(&self, offset: usize, value: u32) {
        let mut words = self.words.lock().unwrap();
        if let Some(word) = words.get_mut(offset / 4) {
            *word = value;
        }
    }

    fn len(&self) -> usize {
        self.words.lock().unwrap().len() * 4
    }
}

/// Functions as QEMU 10.0.2 q35 presents them (values from the reference, measured).
pub(crate) mod templates {
    use super::{FakeBar, FakeFunction, FakeSriov};
    use alloc::boxed::Box;
    use alloc::vec::Vec;

    /// 00:00.0 Intel Q35 MCH (8086:29C0), PCIEXBAR = 0xB000_0001 (enabled, 256 buses).
    pub(crate) fn q35_host_bridge() -> FakeFunction {
        let mut function = FakeFunction::endpoint(0x8086, 0x29c0, [6, 0, 0]);
        function.set_bytes(0x60, &0xb000_0001u32.to_le_bytes());
        function
    }

    /// A std VGA (1234:1111): BAR0 16 MiB prefetchable framebuffer, BAR2 4 KiB MMIO.
    pub(crate) fn vga() -> FakeFunction {
        FakeFunction::endpoint(0x1234, 0x1111, [3, 0, 0])
            .with_bar(
                0,
                FakeBar::Memory32 {
                    size: 16 << 20,
                    prefetchable: true,
                },
            )
            .with_bar(
                2,
                FakeBar::Memory32 {
                    size: 0x1000,
                    prefetchable: false,
                },
            )
    }

    /// ICH9 LPC (8086:2918), function 0 of the multi-function device 1f.
    pub(crate) fn ich9_lpc() -> FakeFunction {
        FakeFunction::endpoint(0x8086, 0x2918, [6, 1, 0]).with_multifunction()
    }

    /// ICH9 AHCI (8086:2922): BAR4 I/O 32 bytes, BAR5 4 KiB MMIO.
    pub(crate) fn ich9_ahci() -> FakeFunction {
        FakeFunction::endpoint(0x8086, 0x2922, [1, 6, 1])
            .with_bar(4, FakeBar::Io { size: 0x20 })
            .with_bar(
                5,
                FakeBar::Memory32 {
                    size: 0x1000,
                    prefetchable: false,
                },
            )
            .with_capability(0x80, 0x05, &[0, 0])
            .with_capability(0xa8, 0x12, &[0x10, 0, 0x48, 0, 0, 0])
    }

    /// A `pcie-root-port` (1b36:000c) with a hot-plug slot (reference §4.2): SSVID@0x40,
    /// MSI-X@0x48 (1 vector in BAR0), PCIe@0x54 (root port, slot implemented), AER@0x100,
    /// ACS@0x148. An empty slot is powered off (Slot Control 0x07C0).
    pub(crate) fn pcie_root_port(slot_number: u32, populated: bool) -> FakeFunction {
        let slot_capabilities = 0x0002_007bu32 | (slot_number << 19);
        let slot_control: u16 = if populated { 0x03c0 } else { 0x07c0 };
        let slot_status: u16 = if populated { 0x0040 } else { 0 };
        let link_status: u16 = if populated { 0x2011 } else { 0x0204 };
        let mut pcie = Vec::new();
        pcie.extend_from_slice(&0x0142u16.to_le_bytes()); // +2 flags
        pcie.extend_from_slice(&0x0000_8000u32.to_le_bytes()); // +4 DEVCAP
        pcie.extend_from_slice(&[0; 4]); // +8 DEVCTL/DEVSTA
        pcie.extend_from_slice(&0x0030_0604u32.to_le_bytes()); // +0xC LNKCAP
        pcie.extend_from_slice(&0u16.to_le_bytes()); // +0x10 LNKCTL
        pcie.extend_from_slice(&link_status.to_le_bytes()); // +0x12 LNKSTA
        pcie.extend_from_slice(&slot_capabilities.to_le_bytes()); // +0x14 SLTCAP
        pcie.extend_from_slice(&slot_control.to_le_bytes()); // +0x18 SLTCTL
        pcie.extend_from_slice(&slot_status.to_le_bytes()); // +0x1A SLTSTA
        let mut function = FakeFunction::bridge(0x1b36, 0x000c)
            .with_bar(
                0,
                FakeBar::Memory32 {
                    size: 0x1000,
                    prefetchable: false,
                },
            )
            .with_capability(0x40, 0x0d, &[0, 0, 0xf4, 0x1a, 0x00, 0x11])
            .with_capability(
                0x48,
                0x11,
                &[0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x08, 0x00, 0x00],
            )
            .writable(0x4a, &[0x00, 0xc0])
            .with_capability(0x54, 0x10, &pcie)
            .writable(0x54 + 0x18, &0x1ff9u16.to_le_bytes())
            .with_extended_capability(0x100, 0x01, 2, &[0; 0x44])
            .with_extended_capability(0x148, 0x0d, 1, &[0; 4]);
        function.slot = Some(0x54);
        function
    }

    /// QEMU `igb` PF (8086:10C9, reference §1.1-1.2): BAR0/1 128 KiB, BAR2 I/O 32, BAR3 64-bit
    /// 16 KiB MSI-X; PM@0x40, MSI@0x50, MSI-X@0x70 (10 vectors), PCIe@0xA0; AER@0x100,
    /// ARI@0x150, SR-IOV@0x160 (8 VFs, offset 0x80, stride 2, VF 10CA, VF BAR0/3 16 KiB).
    pub(crate) fn igb_pf() -> FakeFunction {
        let mut sriov = Vec::new();
        sriov.extend_from_slice(&0u32.to_le_bytes()); // +4 capabilities
        sriov.extend_from_slice(&0u16.to_le_bytes()); // +8 control
        sriov.extend_from_slice(&0u16.to_le_bytes()); // +A status
        sriov.extend_from_slice(&8u16.to_le_bytes()); // +C InitialVFs
        sriov.extend_from_slice(&8u16.to_le_bytes()); // +E TotalVFs
        sriov.extend_from_slice(&0u16.to_le_bytes()); // +10 NumVFs
        sriov.extend_from_slice(&0u16.to_le_bytes()); // +12 dependency
        sriov.extend_from_slice(&0x80u16.to_le_bytes()); // +14 first VF offset
        sriov.extend_from_slice(&2u16.to_le_bytes()); // +16 stride
        sriov.extend_from_slice(&0u16.to_le_bytes()); // +18 reserved
        sriov.extend_from_slice(&0x10cau16.to_le_bytes()); // +1A VF device ID
        sriov.extend_from_slice(&0x553u32.to_le_bytes()); // +1C supported page sizes
        sriov.extend_from_slice(&1u32.to_le_bytes()); // +20 system page size
        let mut function = FakeFunction::endpoint(0x8086, 0x10c9, [2, 0, 0])
            .with_multifunction()
            .with_bar(
                0,
                FakeBar::Memory32 {
                    size: 0x20000,
                    prefetchable: false,
                },
            )
            .with_bar(
                1,
                FakeBar::Memory32 {
                    size: 0x20000,
                    prefetchable: false,
                },
            )
            .with_bar(2, FakeBar::Io { size: 0x20 })
            .with_bar(
                3,
                FakeBar::Memory64 {
                    size: 0x4000,
                    prefetchable: false,
                },
            )
            .with_capability(0x40, 0x01, &[0x03, 0x00, 0x00, 0x00, 0x00, 0x00])
            .with_capability(0x50, 0x05, &[0x80, 0x00, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])
            .writable(0x52, &[0x71, 0x00])
            .writable(
                0x54,
                &[0xfc, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
            )
            .with_capability(
                0x70,
                0x11,
                &[0x09, 0x00, 0x03, 0x00, 0x00, 0x00, 0x03, 0x20, 0x00, 0x00],
            )
            .writable(0x72, &[0x00, 0xc0])
            .with_capability(0xa0, 0x10, &[0x02, 0x00, 0x20, 0x80, 0x00, 0x10])
            .with_extended_capability(0x100, 0x01, 2, &[0; 0x44])
            .with_extended_capability(0x150, 0x0e, 1, &[0; 4])
            .with_extended_capability(0x160, 0x10, 1, &sriov)
            .writable(0x168, &[0x19, 0x00])
            .writable(0x170, &[0xff, 0xff])
            .writable(0x180, &[0xff, 0xff, 0xff, 0xff]);
        function = function
            .with_bar_at(
                0x184,
                FakeBar::Memory64 {
                    size: 0x4000,
                    prefetchable: true,
                },
            )
            .with_bar_at(
                0x190,
                FakeBar::Memory64 {
                    size: 0x4000,
                    prefetchable: true,
                },
            );
        function.sriov = Some(FakeSriov {
            offset: 0x160,
            vf_template: Box::new(igbvf()),
            enabled: Vec::new(),
        });
        function
    }

    /// QEMU `igbvf` (reference §1.3): vendor/device read 0xFFFF, class 02.00.00 rev 1, BARs
    /// read 0 (they live in the PF), MSI-X@0x70 (3 vectors in BAR3), PCIe@0xA0, AER, ARI.
    pub(crate) fn igbvf() -> FakeFunction {
        let mut function = FakeFunction::endpoint(0xffff, 0xffff, [2, 0, 0])
            .with_capability(
                0x70,
                0x11,
                &[0x02, 0x00, 0x03, 0x00, 0x00, 0x00, 0x03, 0x20, 0x00, 0x00],
            )
            .writable(0x72, &[0x00, 0xc0])
            .with_capability(0xa0, 0x10, &[0x02, 0x00, 0x20, 0x80, 0x00, 0x10])
            .with_extended_capability(0x100, 0x01, 2, &[0; 0x44])
            .with_extended_capability(0x150, 0x0e, 1, &[0; 4]);
        function.bytes[0x08] = 1;
        function.write_mask[4..6].copy_from_slice(&0x0406u16.to_le_bytes());
        function
    }

    /// A virtio-net modern device (1af4:1041): BAR1 4 KiB, BAR4 64-bit prefetchable 16 KiB,
    /// MSI-X@0x98 plus vendor capabilities.
    pub(crate) fn virtio_net() -> FakeFunction {
        FakeFunction::endpoint(0x1af4, 0x1041, [2, 0, 0])
            .with_bar(
                1,
                FakeBar::Memory32 {
                    size: 0x1000,
                    prefetchable: false,
                },
            )
            .with_bar(
                4,
                FakeBar::Memory64 {
                    size: 0x4000,
                    prefetchable: true,
                },
            )
            .with_capability(
                0x98,
                0x11,
                &[0x02, 0x00, 0x01, 0x00, 0x00, 0x00, 0x01, 0x08, 0x00, 0x00],
            )
            .with_capability(0x84, 0x09, &[0x14, 0x05, 0x00, 0x00, 0x00, 0x00])
            .with_capability(0x70, 0x09, &[0x14, 0x01, 0x04, 0x00, 0x00, 0x00])
    }
}
