//! Target `pci-config`: enumeration, BAR sizing and placement, capability chains, MSI-X,
//! SR-IOV and hot-plug slots over the configuration space of hostile functions — fuzzer patches
//! over an igb PF and a root port with a device behind it, any BAR sizing answers, capability
//! pointers that loop or leave the space, and a device that vanishes (all-ones) mid-walk.

use std::cell::{Cell, RefCell};

use guest_kernel::pci::{
    AddressRange, Bar, CapabilityList, ConfigAccess, MsixTable, PciAddress, PciBus, RootResources,
};
use net_device::RegisterIo;

use crate::engine::{Input, Outcome, Steps, Target, check};

const SPACE: usize = 4096;
/// Functions of the model: an igb PF at 00:01.0, a root port at 00:02.0 and an endpoint behind
/// it (device 0 of the port's secondary bus).
const PF: PciAddress = PciAddress::new(0, 1, 0);
const PORT: PciAddress = PciAddress::new(0, 2, 0);

struct Function {
    bytes: Vec<u8>,
    /// Writable bits of the BARs and SR-IOV VF BARs, by offset (what sizing reads back).
    masks: Vec<(usize, u32)>,
}

impl Function {
    fn blank(vendor: u16, device: u16, class: u32, header_type: u8) -> Function {
        let bars = if header_type & 0x7f == 1 { 2 } else { 6 };
        let mut function = Function {
            bytes: vec![0; SPACE],
            masks: (0..bars).map(|index| (0x10 + 4 * index, 0)).collect(),
        };
        function.put16(0, vendor);
        function.put16(2, device);
        function.put32(8, class << 8 | 1);
        function.bytes[0x0e] = header_type;
        function
    }

    fn put16(&mut self, offset: usize, value: u16) {
        self.bytes[offset..offset + 2].copy_from_slice(&value.to_le_bytes());
    }

    fn put32(&mut self, offset: usize, value: u32) {
        self.bytes[offset..offset + 4].copy_from_slice(&value.to_le_bytes());
    }

    fn get32(&self, offset: usize) -> u32 {
        u32::from_le_bytes(
            self.bytes[offset..offset + 4]
                .try_into()
                .unwrap_or([0xff; 4]),
        )
    }

    fn set_mask(&mut self, offset: usize, mask: u32) {
        match self.masks.iter_mut().find(|(at, _)| *at == offset) {
            Some(entry) => entry.1 = mask,
            None => self.masks.push((offset, mask)),
        }
    }

    fn write32(&mut self, offset: usize, value: u32) {
        if offset < 0x0c {
            if offset == 4 {
                // Command is writable; Status bits are write-1-to-clear (kept as they are).
                let old = self.get32(4);
                self.put32(4, (old & 0xffff_0000) | (value & 0xffff));
            }
            return;
        }
        match self
            .masks
            .iter()
            .find(|(at, _)| *at == offset)
            .map(|(_, mask)| *mask)
        {
            Some(mask) => {
                let old = self.get32(offset);
                self.put32(offset, (value & mask) | (old & !mask));
            }
            None => self.put32(offset, value),
        }
    }
}

/// The igb PF: memory BARs 0 (128 KiB) and 3 (16 KiB), PM → MSI → MSI-X → PCIe, then the
/// extended AER → SR-IOV chain (8 VFs, VF BARs 0 and 3).
fn igb_pf() -> Function {
    let mut f = Function::blank(0x8086, 0x10c9, 0x020000, 0x80);
    f.set_mask(0x10, 0xfffe_0000);
    f.set_mask(0x1c, 0xffff_c000);
    f.set_mask(0x164, 0xffff_c000);
    f.set_mask(0x170, 0xffff_c000);
    f.put16(6, 0x0010);
    f.bytes[0x34] = 0x40;
    f.bytes[0x40..0x44].copy_from_slice(&[0x01, 0x50, 0x03, 0x00]);
    f.bytes[0x50..0x54].copy_from_slice(&[0x05, 0x70, 0x80, 0x01]);
    f.bytes[0x70..0x74].copy_from_slice(&[0x11, 0xa0, 0x09, 0x00]);
    f.put32(0x74, 0x0000_0003);
    f.put32(0x78, 0x0000_2003);
    f.bytes[0xa0..0xa4].copy_from_slice(&[0x10, 0x00, 0x02, 0x00]);
    f.put32(0x100, 0x1401_0001);
    f.put32(0x140, 0x0001_0010);
    f.put16(0x14c, 8); // InitialVFs
    f.put16(0x14e, 8); // TotalVFs
    f.put16(0x154, 0x80); // First VF Offset
    f.put16(0x156, 2); // VF Stride
    f.put16(0x15a, 0x10ca); // VF Device ID
    f.put32(0x15c, 0x553); // supported page sizes
    f.put32(0x160, 1); // system page size
    f
}

/// A pcie-root-port with a hot-plug slot, bus 1 behind it.
fn root_port() -> Function {
    let mut f = Function::blank(0x1b36, 0x000c, 0x060400, 0x01);
    f.put16(6, 0x0010);
    f.put32(0x18, 0x0001_0100);
    f.bytes[0x34] = 0x40;
    f.bytes[0x40..0x44].copy_from_slice(&[0x10, 0x00, 0x42, 0x01]);
    f.put32(0x54, 0x0008_007b); // Slot Capabilities: HPC and friends, slot 1
    f.put16(0x5a, 0x0040); // Slot Status: presence detected
    f
}

fn virtio_net() -> Function {
    let mut f = Function::blank(0x1af4, 0x1041, 0x020000, 0x00);
    f.set_mask(0x20, 0xffff_c000);
    f.set_mask(0x24, 0xffff_ffff);
    f.put32(0x20, 0x0000_000c);
    f
}

struct HostileConfig {
    functions: RefCell<Vec<(PciAddress, Function)>>,
    reads: Cell<u64>,
    /// Every read after this many answers all-ones (surprise removal).
    removed_after: Option<u64>,
}

impl HostileConfig {
    fn index(&self, address: PciAddress) -> Option<usize> {
        let functions = self.functions.borrow();
        let secondary = functions
            .iter()
            .find(|(at, _)| *at == PORT)
            .map(|(_, port)| port.bytes[0x19]);
        functions.iter().position(|(at, _)| {
            *at == address
                || (at.bus() == 1
                    && address.bus() != 0
                    && Some(address.bus()) == secondary
                    && address.devfn() == at.devfn())
        })
    }

    /// A VF of the PF, when VF Enable is set and `address` is one of its routing IDs: its
    /// own ID registers read all-ones (SR-IOV §3.4.1.1), the rest is a blank endpoint.
    fn virtual_function(&self, address: PciAddress) -> Option<Function> {
        let functions = self.functions.borrow();
        let (_, pf) = functions.iter().find(|(at, _)| *at == PF)?;
        let control = pf.get32(0x148) & 0xffff;
        let num_vfs = pf.get32(0x150) & 0xffff;
        let first = pf.get32(0x154) & 0xffff;
        let stride = pf.get32(0x154) >> 16;
        if control & 1 == 0 || address.routing_id() < PF.routing_id() {
            return None;
        }
        let distance = u32::from(address.routing_id() - PF.routing_id());
        let index = distance.checked_sub(first)?;
        let is_vf = if stride == 0 {
            index == 0
        } else {
            index % stride == 0 && index / stride < num_vfs
        };
        is_vf.then(|| Function::blank(0xffff, 0xffff, 0x020000, 0))
    }

    fn removed(&self) -> bool {
        self.removed_after
            .is_some_and(|after| self.reads.get() > after)
    }
}

impl ConfigAccess for HostileConfig {
    fn read32(&self, address: PciAddress, offset: u16) -> u32 {
        self.reads.set(self.reads.get() + 1);
        let offset = usize::from(offset & !3);
        if self.removed() || offset >= SPACE {
            return u32::MAX;
        }
        match self.index(address) {
            Some(index) => self.functions.borrow()[index].1.get32(offset),
            None => self
                .virtual_function(address)
                .map_or(u32::MAX, |vf| vf.get32(offset)),
        }
    }

    fn write32(&self, address: PciAddress, offset: u16, value: u32) {
        let offset = usize::from(offset & !3);
        if self.removed() || offset >= SPACE {
            return;
        }
        if let Some(index) = self.index(address) {
            self.functions.borrow_mut()[index].1.write32(offset, value);
        }
    }

    fn write16(&self, address: PciAddress, offset: u16, value: u16) {
        let aligned = offset & !3;
        let shift = u32::from(offset & 2) * 8;
        let old = self.peek(address, aligned);
        self.write32(
            address,
            aligned,
            (old & !(0xffff << shift)) | (u32::from(value) << shift),
        );
    }

    fn write8(&self, address: PciAddress, offset: u16, value: u8) {
        let aligned = offset & !3;
        let shift = u32::from(offset & 3) * 8;
        let old = self.peek(address, aligned);
        self.write32(
            address,
            aligned,
            (old & !(0xff << shift)) | (u32::from(value) << shift),
        );
    }
}

impl HostileConfig {
    /// A read that is not the driver's (for partial writes).
    fn peek(&self, address: PciAddress, offset: u16) -> u32 {
        let offset = usize::from(offset);
        match self.index(address) {
            Some(index) if offset < SPACE => self.functions.borrow()[index].1.get32(offset),
            _ => u32::MAX,
        }
    }
}

/// An MSI-X table BAR of `len` bytes.
struct TableWindow {
    words: RefCell<Vec<u32>>,
}

impl RegisterIo for TableWindow {
    fn read32(&self, offset: usize) -> u32 {
        self.words
            .borrow()
            .get(offset / 4)
            .copied()
            .unwrap_or(u32::MAX)
    }
    fn write32(&self, offset: usize, value: u32) {
        if let Some(word) = self.words.borrow_mut().get_mut(offset / 4) {
            *word = value;
        }
    }
    fn len(&self) -> usize {
        self.words.borrow().len() * 4
    }
}

fn ranges(bars: &[Option<Bar>]) -> Vec<AddressRange> {
    bars.iter()
        .flatten()
        .filter(|bar| bar.is_memory())
        .filter_map(Bar::range)
        .collect()
}

fn run(input: &mut Input, steps: &mut Steps) -> Outcome {
    let mut functions = vec![
        (PF, igb_pf()),
        (PORT, root_port()),
        (PciAddress::new(1, 0, 0), virtio_net()),
    ];
    let removed_after = (input.below(8) == 7).then(|| u64::from(input.u16()));
    let patches = input.below(40);
    for _ in 0..patches {
        let which = input.below(functions.len());
        let function = &mut functions[which].1;
        match input.below(8) {
            0 => {
                let offset = [0x10, 0x14, 0x18, 0x1c, 0x20, 0x24, 0x164, 0x170][input.below(8)];
                function.set_mask(offset, input.u32());
            }
            1 => {
                // A capability pointer anywhere, including into itself or past the end.
                let at = [0x34, 0x41, 0x51, 0x71, 0xa1][input.below(5)];
                function.bytes[at] = input.u8();
            }
            2 => {
                let at = [0x102, 0x142][input.below(2)];
                function.put16(at, input.u16());
            }
            _ => {
                let offset = (usize::from(input.u16()) % SPACE) & !3;
                let value = input.u32();
                if input.bool() {
                    let old = function.get32(offset);
                    function.put32(offset, old ^ value);
                } else {
                    function.put32(offset, value);
                }
            }
        }
    }
    let access = HostileConfig {
        functions: RefCell::new(functions),
        reads: Cell::new(0),
        removed_after,
    };
    let mut bus = PciBus::probe(&access, RootResources::q35());
    steps.observe(access.reads.get())?;
    let devices: Vec<_> = bus.devices().to_vec();
    for (index, device) in devices.iter().enumerate() {
        check(
            devices[..index]
                .iter()
                .all(|other| other.address != device.address),
            || format!("{} enumerated twice", device.address),
        )?;
    }
    let mut placed: Vec<(PciAddress, AddressRange)> = Vec::new();
    for device in &devices {
        if device.is_bridge() {
            continue;
        }
        for range in ranges(&device.bars) {
            if let Some((other, _)) = placed.iter().find(|(_, taken)| taken.overlaps(&range)) {
                return Err(format!(
                    "{} BAR {range:?} overlaps a BAR of {other}",
                    device.address
                ));
            }
            placed.push((device.address, range));
        }
    }
    for device in &devices {
        let list = CapabilityList::read(&access, device.address);
        check(list.entries.len() <= 48 + 960, || {
            format!("{} capabilities", list.entries.len())
        })?;
        if let Ok(capability) = bus.msix_capability(device.address) {
            let len = usize::from(input.u16()) & 0x7ffc;
            let window = TableWindow {
                words: RefCell::new(vec![0; len / 4]),
            };
            if let Ok(table) = MsixTable::new(window, &capability, device.address) {
                let entries = table.entries();
                for entry in [0, 1, entries.saturating_sub(1), entries, u16::MAX] {
                    let _ = table.program(entry, 0xfee0_0000, 0x40);
                    let _ = table.set_masked(entry, false);
                    let _ = table.message(entry);
                }
            }
            let table = TableWindow {
                words: RefCell::new(vec![0; len / 4]),
            };
            let _ = bus.enable_msix_with(
                device.address,
                table,
                &[(0xfee0_0000, 0x41), (0xfee0_0000, 0x42)],
            );
            let _ = bus.disable_msix(device.address);
        }
        steps.observe(access.reads.get())?;
    }
    let pf_present = devices.iter().any(|device| device.address == PF);
    if pf_present {
        let wanted = 1 + input.below(8) as u16;
        let enabled = bus.enable_sriov(PF, wanted);
        if crate::engine::tracing() {
            eprintln!(
                "{} devices; enable_sriov({wanted}): {enabled:?}",
                devices.len()
            );
            for device in &devices {
                eprintln!("  {} {:?}", device.address, device.bars);
            }
        }
        if enabled.is_ok() {
            let vf_ranges: Vec<AddressRange> = bus
                .device(PF)
                .and_then(|pf| pf.sriov.as_ref())
                .map(|state| state.vf_bar_ranges().collect())
                .unwrap_or_default();
            for range in &vf_ranges {
                if let Some((other, _)) = placed.iter().find(|(_, taken)| taken.overlaps(range)) {
                    return Err(format!("VF BAR {range:?} overlaps a BAR of {other}"));
                }
            }
            let _ = bus.disable_sriov(PF);
        }
    }
    let _ = bus.discover_hotplug_slots();
    for _ in 0..input.below(4) {
        let _ = bus.poll_events();
        let _ = bus.service();
    }
    steps.observe(access.reads.get())
}

fn seeds() -> Vec<Vec<u8>> {
    vec![
        vec![0, 0],
        vec![0, 1, 1, 1, 0x40],
        vec![0, 2, 0, 1, 0x41, 0, 0, 3, 0x44, 0x01, 0, 0, 0, 0],
    ]
}

/// The registration.
pub const TARGET: Target = Target {
    name: "pci-config",
    about: "PCI enumeration, BAR sizing, capability chains, MSI-X, SR-IOV, hot-plug vs hostile config space",
    default_cases: 60_000,
    max_input_len: 1024,
    memory_bound: 4 * 1024 * 1024,
    step_bound: 400_000,
    seeds,
    run,
};
