//! Network bring-up: finds the NICs on PCI, starts their drivers with MSI-X, hands them to the
//! network stack, and runs the stack's event loop together with PCIe hot-plug service.

use alloc::boxed::Box;
use alloc::format;
use alloc::string::ToString;
use alloc::vec::Vec;
use core::ops::ControlFlow;

use net_stack::{NetConfig, NetStack, Platform};
use netvsc_fallback::{
    MsixVectors, VirtioNet, VirtioNetConfig, VirtioPciCapabilityType, VirtioPciRegions,
    parse_virtio_pci_capability,
};
use spin::Mutex;

use crate::error::KernelError;
use crate::mm::heap::KernelDma;
use crate::mm::mmio::MmioRegion;
use crate::pci::{
    self, Command, ConfigAccess, HotplugEvent, Pci, PciAddress, PciDevice, capability,
};
use crate::{arch, interrupts, time};

/// virtio's PCI vendor ID.
const VIRTIO_VENDOR: u16 = 0x1af4;
/// Modern (virtio 1.x) network device ID.
const VIRTIO_NET_MODERN: u16 = 0x1041;
/// Transitional network device ID (also offers the modern interface).
const VIRTIO_NET_TRANSITIONAL: u16 = 0x1000;

/// The PCI bus, kept for hot-plug service by the event loop.
static PCI: Mutex<Option<Pci>> = Mutex::new(None);

/// Time, sleep and randomness for the network stack.
pub struct KernelPlatform;

impl Platform for KernelPlatform {
    fn now_ns(&self) -> u64 {
        time::now_ns()
    }

    fn wait_for_event(&self, deadline_ns: Option<u64>) {
        time::wait_for_event(deadline_ns);
    }

    fn random_seed(&self) -> u64 {
        arch::cpu::rdtsc() ^ arch::cpu::rdrand().unwrap_or(0)
    }
}

/// True under Hyper-V (CPUID hypervisor leaf signature "Microsoft Hv").
fn running_on_hyper_v() -> bool {
    let leaf = arch::cpu::cpuid(0x4000_0000, 0);
    let mut signature = [0u8; 12];
    signature[..4].copy_from_slice(&leaf.ebx.to_le_bytes());
    signature[4..8].copy_from_slice(&leaf.ecx.to_le_bytes());
    signature[8..].copy_from_slice(&leaf.edx.to_le_bytes());
    &signature == b"Microsoft Hv"
}

/// Device interrupts only need to wake the event loop (the dispatcher counts them); the loop
/// polls every device afterwards.
fn wake_event_loop(_vector: u8) {}

fn is_virtio_net(device: &PciDevice) -> bool {
    device.vendor_id == VIRTIO_VENDOR
        && (device.device_id == VIRTIO_NET_MODERN || device.device_id == VIRTIO_NET_TRANSITIONAL)
}

fn name_of(prefix: &str, address: PciAddress) -> alloc::string::String {
    format!(
        "{prefix} {:02x}:{:02x}.{}",
        address.bus(),
        address.device(),
        address.function()
    )
}

/// Maps the four register windows a virtio-pci device describes in its vendor capabilities.
fn virtio_regions(
    pci: &Pci,
    address: PciAddress,
) -> Result<VirtioPciRegions<MmioRegion>, KernelError> {
    let device_name = name_of("virtio-net", address);
    let driver_error = |reason: alloc::string::String| KernelError::Driver {
        device: device_name.clone(),
        reason,
    };
    let mut common = None;
    let mut notify = None;
    let mut isr = None;
    let mut device = None;
    for entry in pci.capabilities(address).entries {
        if entry.extended || entry.id != capability::id::VENDOR {
            continue;
        }
        let length = usize::from(pci.config().read8(address, entry.offset + 2)).clamp(16, 24);
        let bytes: Vec<u8> = (0..length as u16)
            .map(|index| pci.config().read8(address, entry.offset + index))
            .collect();
        let Ok(parsed) = parse_virtio_pci_capability(&bytes) else {
            continue;
        };
        // The spec lets a device list a structure more than once; the first one is preferred.
        let slot = match parsed.cfg_type {
            VirtioPciCapabilityType::Common => &mut common,
            VirtioPciCapabilityType::Notify => &mut notify,
            VirtioPciCapabilityType::Isr => &mut isr,
            VirtioPciCapabilityType::Device => &mut device,
            _ => continue,
        };
        if slot.is_none() {
            *slot = Some(parsed);
        }
    }
    let map = |parsed: Option<netvsc_fallback::VirtioPciCapability>, what: &str| {
        let parsed = parsed.ok_or_else(|| driver_error(format!("no {what} capability")))?;
        let bar = pci.map_bar(address, usize::from(parsed.bar))?;
        bar.subregion(parsed.offset as usize, parsed.length as usize)
            .ok_or_else(|| {
                driver_error(format!(
                    "{what} window {:#x}+{:#x} outside BAR{}",
                    parsed.offset, parsed.length, parsed.bar
                ))
            })
    };
    let notify_off_multiplier = notify
        .and_then(|cap| cap.notify_off_multiplier)
        .unwrap_or(0);
    Ok(VirtioPciRegions {
        common: map(common, "common configuration")?,
        notify: map(notify, "notification")?,
        notify_off_multiplier,
        isr: map(isr, "ISR")?,
        device: map(device, "device configuration")?,
    })
}

/// Starts the virtio-net driver on `address` with three MSI-X vectors.
fn start_virtio_net(
    pci: &mut Pci,
    address: PciAddress,
) -> Result<Box<dyn net_device::NetDevice>, KernelError> {
    let name = name_of("virtio-net", address);
    let regions = virtio_regions(pci, address)?;
    pci.enable_command(address, Command::MEMORY_SPACE | Command::BUS_MASTER)?;
    let mut config = VirtioNetConfig::default();
    let vectors = [
        interrupts::allocate_vector(wake_event_loop)?,
        interrupts::allocate_vector(wake_event_loop)?,
        interrupts::allocate_vector(wake_event_loop)?,
    ];
    match pci.enable_msix(address, &vectors) {
        Ok(_table) => {
            config.msix = Some(MsixVectors {
                config: 0,
                rx: 1,
                tx: 2,
            })
        }
        Err(error) => {
            log::warn!("{name}: no MSI-X ({error}); falling back to polling");
            for vector in vectors {
                interrupts::free_vector(vector);
            }
        }
    }
    let mut driver =
        VirtioNet::new(regions, KernelDma, config).map_err(|error| KernelError::Driver {
            device: name.clone(),
            reason: error.to_string(),
        })?;
    driver.set_name(&name);
    pci.claim(address);
    log::info!(
        "{name}: up, MAC {}, features {:?}",
        net_device::NetDevice::mac_address(&driver),
        driver.negotiated_features()
    );
    Ok(Box::new(driver))
}

/// Finds the synthetic NIC, starts it, and builds the network stack over it with the
/// addressing from the command line (`ip=`, `gw=`, ... or DHCP).
pub fn bring_up() -> Result<NetStack, KernelError> {
    let mut pci = pci::init()?;
    let config =
        NetConfig::from_cmdline(crate::cmdline()).map_err(|error| KernelError::Network {
            reason: error.to_string(),
        })?;
    let virtio = pci
        .devices()
        .iter()
        .find(|device| is_virtio_net(device))
        .map(|device| device.address);
    let Some(address) = virtio else {
        return Err(KernelError::NoNetworkDevice {
            reason: if running_on_hyper_v() {
                "this is Hyper-V, whose synthetic NIC (netvsc) is not supported yet; \
                 no virtio-net device either"
            } else {
                "no virtio-net device (1af4:1041) on PCI"
            },
        });
    };
    let synthetic = start_virtio_net(&mut pci, address)?;
    let stack = NetStack::new(config, synthetic, Box::new(KernelPlatform)).map_err(|error| {
        KernelError::Network {
            reason: error.to_string(),
        }
    })?;
    *PCI.lock() = Some(pci);
    Ok(stack)
}

/// Handles PCIe hot-plug events: devices without a driver are let go at once (the PCI layer
/// completes their removal itself).
fn service_hotplug(_stack: &mut NetStack) {
    let mut guard = PCI.lock();
    let Some(pci) = guard.as_mut() else { return };
    for event in pci.service() {
        match event {
            HotplugEvent::DeviceLeaving { slot, .. } => {
                if let Err(error) = pci.complete_removal(slot) {
                    log::warn!("hotplug: completing removal on {slot:?}: {error}");
                }
            }
            other => log::debug!("hotplug: {other:?}"),
        }
    }
}

/// Runs the event loop: hot-plug service, stack poll, then the app; sleeps until an interrupt
/// or the next deadline whenever a round did nothing. Returns the app's exit code.
pub fn run(stack: &mut NetStack, mut app: impl FnMut(&mut NetStack) -> ControlFlow<i32>) -> i32 {
    loop {
        service_hotplug(stack);
        let did_work = stack.poll();
        if let ControlFlow::Break(code) = app(stack) {
            return code;
        }
        if !did_work {
            stack.wait();
        }
    }
}
