//! The printed device tree (one block per function: identity, BARs, bridge windows,
//! capabilities), which the hello app shows at boot and the system tests grep.

use super::bar::AddressRange;
use super::capability::CapabilityList;
use super::config::ConfigAccess;
use super::{PciBus, PciDevice};
use core::fmt::{self, Write};

/// Formats a window as `0xstart-0xend`, or `none` when closed.
struct WindowText(Option<AddressRange>);

impl fmt::Display for WindowText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(range) => write!(f, "{range}"),
            None => f.write_str("none"),
        }
    }
}

impl<A: ConfigAccess> PciBus<A> {
    /// Prints every function:
    ///
    /// ```text
    /// pci 00:04.0 1b36:000c class 06.04.00 root-port
    ///   bar0 mem32 0xfeb40000 size 0x1000
    ///   bridge bus 01-01 mem 0xfe800000-0xfe9fffff pref 0xfe000000-0xfe1fffff io 0x1000-0x1fff
    ///   cap msix@0x48
    ///   cap aer@0x100
    /// ```
    ///
    /// Unknown capabilities print as `cap 0x<id>@0x<offset>`, unassigned BARs with
    /// `(unassigned)`, broken capability chains as `cap chain broken: ...`.
    pub fn print_tree(&self, out: &mut dyn Write) -> fmt::Result {
        for device in &self.devices {
            self.print_device(device, out)?;
        }
        Ok(())
    }

    fn print_device(&self, device: &PciDevice, out: &mut dyn Write) -> fmt::Result {
        writeln!(
            out,
            "pci {} {:04x}:{:04x} class {:02x}.{:02x}.{:02x} {}",
            device.address,
            device.vendor_id,
            device.device_id,
            device.class.base,
            device.class.sub,
            device.class.prog_if,
            device.kind_name()
        )?;
        if let Some(pf) = device.physical_function {
            writeln!(out, "  vf of {pf}")?;
        }
        for (index, bar) in device.bars.iter().enumerate() {
            let Some(bar) = bar else { continue };
            write!(
                out,
                "  bar{index} {}{} {:#x} size {:#x}",
                bar.kind.name(),
                if bar.prefetchable { " pref" } else { "" },
                bar.address,
                bar.size
            )?;
            if !bar.is_assigned() {
                out.write_str(" (unassigned)")?;
            }
            out.write_str("\n")?;
        }
        if let Some(bridge) = device.bridge {
            writeln!(
                out,
                "  bridge bus {:02x}-{:02x} mem {} pref {} io {}",
                bridge.secondary_bus,
                bridge.subordinate_bus,
                WindowText(bridge.windows.memory),
                WindowText(bridge.windows.prefetchable),
                WindowText(bridge.windows.io)
            )?;
        }
        if let Some(sriov) = &device.sriov {
            writeln!(out, "  sriov {} vfs", sriov.num_vfs)?;
            for (index, bar) in sriov.vf_bars.iter().enumerate() {
                let Some(bar) = bar else { continue };
                writeln!(
                    out,
                    "  vfbar{index} {}{} {:#x} size {:#x} x{}",
                    bar.kind.name(),
                    if bar.prefetchable { " pref" } else { "" },
                    bar.address,
                    bar.size,
                    sriov.num_vfs
                )?;
            }
        }
        let capabilities = CapabilityList::read(&self.access, device.address);
        for capability in &capabilities.entries {
            writeln!(out, "  cap {capability}")?;
        }
        for fault in &capabilities.faults {
            writeln!(out, "  cap chain broken: {fault}")?;
        }
        Ok(())
    }
}
