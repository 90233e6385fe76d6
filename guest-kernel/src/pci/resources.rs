//! Assignment of BARs and bridge windows the firmware left unassigned, bus by bus from the
//! root, inside each bus's windows; what already decodes validly is never moved.

use super::allocator::{BarAllocator, Placement, Window, WindowKind};
use super::bar::{
    AddressRange, Bar, BarKind, IO_WINDOW_GRANULARITY, MEMORY_WINDOW_GRANULARITY,
    read_bridge_windows, write_io_window, write_memory_window, write_prefetchable_window,
};
use super::config::{Command, ConfigAccess, read_command, reg, write_command};
use super::{PciAddress, PciBus, PciDevice};
use crate::error::PciErrorKind;
use alloc::collections::BTreeSet;
use alloc::vec::Vec;

/// Memory and prefetchable space given to an empty hot-plug port whose window is closed, so a
/// device added later fits (SeaBIOS reserves the same 2 MiB per window on hot-plug ports).
const HOTPLUG_MEMORY_RESERVE: u64 = 2 << 20;

/// What [`PciBus::assign_resources`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AssignmentReport {
    /// BARs given an address.
    pub assigned_bars: usize,
    /// Bridge windows opened.
    pub opened_windows: usize,
    /// Assignments that found no room (or that the device refused).
    pub failures: Vec<PciErrorKind>,
}

/// Which bridge window an item lives in.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum WindowClass {
    Io,
    Memory,
    Prefetchable,
}

/// Something on a bus that needs address space.
#[derive(Clone, Copy, Debug)]
enum Target {
    Bar { device: usize, index: usize },
    BridgeWindow { device: usize, class: WindowClass },
}

#[derive(Clone, Copy, Debug)]
struct Request {
    target: Target,
    size: u64,
    align: u64,
    kind: BarKind,
    prefetchable: bool,
}

/// True when `range` of this class sits inside one of the bus's windows that may hold it.
fn inside_windows(range: &AddressRange, class: WindowClass, windows: &[Window]) -> bool {
    windows.iter().any(|window| {
        let compatible = match class {
            WindowClass::Io => window.kind == WindowKind::Io,
            WindowClass::Memory => window.kind == WindowKind::Memory,
            WindowClass::Prefetchable => window.kind != WindowKind::Io,
        };
        compatible && window.range.contains(range)
    })
}

fn bar_class(bar: &Bar) -> WindowClass {
    match (bar.kind, bar.prefetchable) {
        (BarKind::Io, _) => WindowClass::Io,
        (_, false) => WindowClass::Memory,
        (_, true) => WindowClass::Prefetchable,
    }
}

/// Space a closed bridge window must have to hold `sizes` (each a power of two), plus one
/// granule per nested bridge for their own rounding. Returns (size, alignment).
fn window_need(mut sizes: Vec<u64>, nested_bridges: u64, granularity: u64) -> (u64, u64) {
    // Largest first: packed in that order every item lands on its own alignment.
    sizes.sort_unstable_by(|a, b| b.cmp(a));
    let total = sizes
        .iter()
        .fold(0u64, |sum, size| sum.saturating_add(*size));
    let total = total.saturating_add(nested_bridges.saturating_mul(granularity));
    let align = sizes
        .first()
        .copied()
        .unwrap_or(granularity)
        .max(granularity);
    let size = total
        .checked_next_multiple_of(granularity)
        .unwrap_or(u64::MAX);
    (size, align)
}

impl<A: ConfigAccess> PciBus<A> {
    /// Assigns every BAR and bridge window that does not decode validly yet, top-down from the
    /// root bus, then enables decoding on the functions it changed. Idempotent: run again after
    /// a hot-add, it touches only the new functions.
    pub fn assign_resources(&mut self) -> AssignmentReport {
        let mut report = AssignmentReport::default();
        let windows = self.root.windows.clone();
        self.assign_bus(0, &windows, true, 0, &mut report);
        report
    }

    /// The windows through which `bus` receives accesses: the root windows for bus 0, else the
    /// windows of the bridge whose secondary bus it is.
    pub(super) fn bus_windows(&self, bus: u8) -> (Vec<Window>, bool) {
        if bus == 0 {
            return (self.root.windows.clone(), true);
        }
        let bridge = self
            .devices
            .iter()
            .find_map(|d| d.bridge.filter(|b| b.secondary_bus == bus));
        let Some(bridge) = bridge else {
            return (Vec::new(), false);
        };
        let mut windows = Vec::new();
        let w = bridge.windows;
        if let Some(range) = w.io {
            windows.push(Window {
                kind: WindowKind::Io,
                range,
            });
        }
        if let Some(range) = w.memory {
            windows.push(Window {
                kind: WindowKind::Memory,
                range,
            });
        }
        if let Some(range) = w.prefetchable {
            windows.push(Window {
                kind: WindowKind::Prefetchable,
                range,
            });
        }
        (windows, false)
    }

    /// An allocator for `bus` with everything that already validly decodes there reserved.
    /// The VF BARs of `skip_sriov_of` are not reserved (they are about to be replaced).
    pub(super) fn bus_allocator(
        &self,
        bus: u8,
        windows: &[Window],
        is_root: bool,
        skip_sriov_of: Option<PciAddress>,
    ) -> BarAllocator {
        let mut allocator = BarAllocator::new(windows);
        for range in &self.root.reserved {
            allocator.reserve(*range);
        }
        let valid = |range: &AddressRange, class| is_root || inside_windows(range, class, windows);
        for device in self.devices.iter().filter(|d| d.address.bus() == bus) {
            if device.is_virtual_function() {
                continue;
            }
            for bar in device.bars.iter().flatten() {
                if let Some(range) = bar.range().filter(|r| valid(r, bar_class(bar))) {
                    allocator.reserve(range);
                }
            }
            if let Some(sriov) = device
                .sriov
                .as_ref()
                .filter(|_| skip_sriov_of != Some(device.address))
            {
                for range in sriov.vf_bar_ranges() {
                    allocator.reserve(range);
                }
            }
            if let Some(bridge) = device.bridge {
                let w = bridge.windows;
                for (range, class) in [
                    (w.io, WindowClass::Io),
                    (w.memory, WindowClass::Memory),
                    (w.prefetchable, WindowClass::Prefetchable),
                ] {
                    if let Some(range) = range.filter(|r| valid(r, class)) {
                        allocator.reserve(range);
                    }
                }
            }
        }
        allocator
    }

    fn assign_bus(
        &mut self,
        bus: u8,
        windows: &[Window],
        is_root: bool,
        depth: u8,
        report: &mut AssignmentReport,
    ) {
        if depth > 32 {
            return;
        }
        let mut allocator = self.bus_allocator(bus, windows, is_root, None);
        let on_bus: Vec<usize> = (0..self.devices.len())
            .filter(|&i| {
                self.devices[i].address.bus() == bus && !self.devices[i].is_virtual_function()
            })
            .collect();

        let mut requests = Vec::new();
        for &device_index in &on_bus {
            let device = &self.devices[device_index];
            for (index, bar) in device.bars.iter().enumerate() {
                let Some(bar) = bar else { continue };
                let valid = bar
                    .range()
                    .is_some_and(|r| is_root || inside_windows(&r, bar_class(bar), windows));
                if !valid {
                    requests.push(Request {
                        target: Target::Bar {
                            device: device_index,
                            index,
                        },
                        size: bar.size,
                        align: bar.size,
                        kind: bar.kind,
                        prefetchable: bar.prefetchable,
                    });
                }
            }
            if device.bridge.is_some() {
                requests.extend(self.window_requests(device_index, windows, is_root));
            }
        }
        // Largest alignment first keeps the packing tight.
        requests.sort_by(|a, b| b.align.cmp(&a.align).then(b.size.cmp(&a.size)));

        let mut touched = BTreeSet::new();
        for request in requests {
            let placements = Placement::for_bar(request.kind, request.prefetchable);
            let Some(start) = allocator.allocate(request.size, request.align, placements) else {
                let device = &self.devices[request.target_device()];
                log::warn!(
                    "pci: {}: no room for {:#x} bytes ({}) on bus {bus:02x}",
                    device.address,
                    request.size,
                    request.describe()
                );
                report.failures.push(PciErrorKind::NoBarSpace {
                    address: device.address.as_array(),
                    size: request.size,
                });
                continue;
            };
            match self.apply(request, start) {
                Ok(()) => {
                    touched.insert(request.target_device());
                    match request.target {
                        Target::Bar { .. } => report.assigned_bars += 1,
                        Target::BridgeWindow { .. } => report.opened_windows += 1,
                    }
                }
                Err(kind) => report.failures.push(kind),
            }
        }
        for device_index in touched {
            self.enable_decoding(device_index);
        }

        for device_index in on_bus {
            let Some(bridge) = self.devices[device_index].bridge else {
                continue;
            };
            if bridge.secondary_bus <= bus {
                continue;
            }
            let (child_windows, _) = self.bus_windows(bridge.secondary_bus);
            self.assign_bus(
                bridge.secondary_bus,
                &child_windows,
                false,
                depth + 1,
                report,
            );
        }
    }

    /// Requests for the closed (or invalid) windows of bridge `device_index` that its subtree
    /// needs; hot-plug ports always get a minimum reserve.
    fn window_requests(
        &self,
        device_index: usize,
        windows: &[Window],
        is_root: bool,
    ) -> Vec<Request> {
        let device = &self.devices[device_index];
        let Some(bridge) = device.bridge else {
            return Vec::new();
        };
        if bridge.secondary_bus <= device.address.bus() {
            return Vec::new();
        }
        let buses = bridge.secondary_bus..=bridge.subordinate_bus;
        let below: Vec<&PciDevice> = self
            .devices
            .iter()
            .filter(|d| buses.contains(&d.address.bus()))
            .collect();
        let nested = below.iter().filter(|d| d.is_bridge()).count() as u64;
        let mut requests = Vec::new();
        let w = bridge.windows;
        for (current, class) in [
            (w.memory, WindowClass::Memory),
            (w.prefetchable, WindowClass::Prefetchable),
            (w.io, WindowClass::Io),
        ] {
            if current.is_some_and(|r| is_root || inside_windows(&r, class, windows)) {
                continue;
            }
            let mut sizes = Vec::new();
            for below_device in &below {
                if below_device.is_virtual_function() {
                    continue;
                }
                sizes.extend(
                    below_device
                        .bars
                        .iter()
                        .flatten()
                        .filter(|b| bar_class(b) == class)
                        .map(|b| b.size),
                );
                if let Some(sriov) = &below_device.sriov {
                    sizes.extend(
                        sriov
                            .vf_bars
                            .iter()
                            .flatten()
                            .filter(|b| bar_class(b) == class)
                            .map(|b| {
                                b.size
                                    .saturating_mul(u64::from(sriov.num_vfs))
                                    .next_power_of_two()
                            }),
                    );
                }
            }
            let granularity = if class == WindowClass::Io {
                IO_WINDOW_GRANULARITY
            } else {
                MEMORY_WINDOW_GRANULARITY
            };
            // I/O space is scarce (64 KiB for the machine): hot-plug ports get an I/O window
            // only when a device below needs one.
            let reserve = match class {
                WindowClass::Memory | WindowClass::Prefetchable if device.hotplug_slot => {
                    HOTPLUG_MEMORY_RESERVE
                }
                _ => 0,
            };
            if sizes.is_empty() && reserve == 0 {
                continue;
            }
            let (size, align) = window_need(sizes, nested, granularity);
            let size = size.max(reserve);
            let (kind, prefetchable) = match class {
                WindowClass::Io => (BarKind::Io, false),
                WindowClass::Memory => (BarKind::Memory32, false),
                WindowClass::Prefetchable if w.prefetchable_64bit => (BarKind::Memory64, true),
                WindowClass::Prefetchable => (BarKind::Memory32, true),
            };
            requests.push(Request {
                target: Target::BridgeWindow {
                    device: device_index,
                    class,
                },
                size,
                align,
                kind,
                prefetchable,
            });
        }
        requests
    }

    /// Programs one allocation into the device and its record.
    fn apply(&mut self, request: Request, start: u64) -> Result<(), PciErrorKind> {
        let device_index = request.target_device();
        let address = self.devices[device_index].address;
        let range =
            AddressRange::from_start_size(start, request.size).ok_or(PciErrorKind::BadValue {
                address: address.as_array(),
                what: "allocation overflows the address space",
            })?;
        match request.target {
            Target::Bar { index, .. } => {
                let Some(bar) = self.devices[device_index].bars[index] else {
                    return Ok(());
                };
                super::bar::program_bar(&self.access, address, reg::BAR0, index, &bar, start)
                    .map_err(|error| match error {
                        crate::error::KernelError::Pci(kind) => kind,
                        _ => PciErrorKind::BadValue {
                            address: address.as_array(),
                            what: "BAR write failed",
                        },
                    })?;
                if let Some(bar) = self.devices[device_index].bars[index].as_mut() {
                    bar.address = start;
                }
                log::debug!(
                    "pci: {address} bar{index} -> {start:#x} size {:#x}",
                    request.size
                );
            }
            Target::BridgeWindow { class, .. } => {
                let current = read_bridge_windows(&self.access, address);
                match class {
                    WindowClass::Memory => write_memory_window(&self.access, address, Some(range)),
                    WindowClass::Prefetchable => write_prefetchable_window(
                        &self.access,
                        address,
                        Some(range),
                        current.prefetchable_64bit,
                    ),
                    WindowClass::Io => {
                        write_io_window(&self.access, address, Some(range), current.io_32bit)
                    }
                }
                let after = read_bridge_windows(&self.access, address);
                let kept = match class {
                    WindowClass::Memory => after.memory,
                    WindowClass::Prefetchable => after.prefetchable,
                    WindowClass::Io => after.io,
                };
                if let Some(info) = self.devices[device_index].bridge.as_mut() {
                    info.windows = after;
                }
                if kept != Some(range) {
                    log::warn!("pci: {address} did not take window {range} (has {kept:?})");
                    return Err(PciErrorKind::BadValue {
                        address: address.as_array(),
                        what: "bridge window not implemented",
                    });
                }
                log::info!("pci: {address} window {range} opened");
            }
        }
        Ok(())
    }

    /// Turns on memory/I/O decoding for a function whose resources were just assigned: only
    /// for a space in which every BAR now has an address (a BAR left at 0 must not decode).
    /// Bridges also get bus mastering so they forward their children's DMA and MSIs upstream.
    fn enable_decoding(&mut self, device_index: usize) {
        let device = &self.devices[device_index];
        let address = device.address;
        let bars: Vec<&Bar> = device.bars.iter().flatten().collect();
        let memory_ready = bars
            .iter()
            .filter(|b| b.is_memory())
            .all(|b| b.is_assigned());
        let io_ready = bars
            .iter()
            .filter(|b| !b.is_memory())
            .all(|b| b.is_assigned());
        let has_memory = bars.iter().any(|b| b.is_memory());
        let has_io = bars.iter().any(|b| !b.is_memory());
        let mut command = read_command(&self.access, address);
        if command.bits() == u16::MAX {
            return;
        }
        if let Some(bridge) = device.bridge {
            let windows = bridge.windows;
            if memory_ready
                && (windows.memory.is_some() || windows.prefetchable.is_some() || has_memory)
            {
                command |= Command::MEMORY_SPACE;
            }
            if io_ready && (windows.io.is_some() || has_io) {
                command |= Command::IO_SPACE;
            }
            command |= Command::BUS_MASTER;
        } else {
            // A BAR still at 0 must not decode, even if firmware had enabled the space; a
            // space without BARs (legacy VGA ranges) is left as firmware set it.
            if has_memory {
                command.set(Command::MEMORY_SPACE, memory_ready);
            }
            if has_io {
                command.set(Command::IO_SPACE, io_ready);
            }
        }
        write_command(&self.access, address, command);
    }
}

impl Request {
    fn target_device(&self) -> usize {
        match self.target {
            Target::Bar { device, .. } | Target::BridgeWindow { device, .. } => device,
        }
    }

    fn describe(&self) -> &'static str {
        match self.target {
            Target::Bar { .. } => "BAR",
            Target::BridgeWindow {
                class: WindowClass::Io,
                ..
            } => "I/O window",
            Target::BridgeWindow {
                class: WindowClass::Memory,
                ..
            } => "memory window",
            Target::BridgeWindow {
                class: WindowClass::Prefetchable,
                ..
            } => "prefetchable window",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_need_packs_largest_first_and_rounds_to_granularity() {
        let (size, align) = window_need(alloc::vec![0x4000, 0x20000, 0x20000], 0, 1 << 20);
        assert_eq!((size, align), (1 << 20, 1 << 20));
        let (size, align) = window_need(alloc::vec![4 << 20, 0x1000], 1, 1 << 20);
        assert_eq!((size, align), (6 << 20, 4 << 20));
        let (size, _) = window_need(alloc::vec![u64::MAX / 2 + 1, u64::MAX / 2 + 1], 0, 1 << 20);
        assert_eq!(size, u64::MAX, "saturates instead of wrapping");
    }
}
