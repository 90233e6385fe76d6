//! Network bring-up: finds the NICs on PCI (or netvsc on Hyper-V's VMBus), starts their
//! drivers, hands them to the network stack, and runs the stack's event loop together with
//! PCIe hot-plug service.

pub mod hyperv;
pub mod lab_control;
pub mod vf_path;

use alloc::boxed::Box;
use alloc::format;
use alloc::string::ToString;
use alloc::vec::Vec;
use core::ops::ControlFlow;

use net_device::MacAddress;
use net_stack::{NetConfig, NetStack, Platform, StackOptions};
use netvsc_fallback::{
    MsixVectors, VirtioNet, VirtioNetConfig, VirtioPciCapabilityType, VirtioPciRegions,
    parse_virtio_pci_capability,
};
use spin::Mutex;

use crate::error::KernelError;
use crate::hyperv::bringup::{SyntheticPlan, synthetic_plan};
use crate::mm::heap::KernelDma;
use crate::mm::mmio::MmioRegion;
use crate::pci::{
    self, Command, ConfigAccess, HotplugEvent, Pci, PciAddress, PciDevice, capability,
};
use crate::{arch, interrupts, pending_vectors, time};

/// virtio's PCI vendor ID.
const VIRTIO_VENDOR: u16 = 0x1af4;
/// Modern (virtio 1.x) network device ID.
const VIRTIO_NET_MODERN: u16 = 0x1041;
/// Transitional network device ID (also offers the modern interface).
const VIRTIO_NET_TRANSITIONAL: u16 = 0x1000;

/// The PCI bus, kept for hot-plug service by the event loop.
pub(crate) static PCI: Mutex<Option<Pci>> = Mutex::new(None);

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

/// Device interrupts only need to wake the event loop (the dispatcher counts them); the loop
/// polls every device afterwards.
pub(crate) fn wake_event_loop(_vector: u8) {}

fn is_virtio_net(device: &PciDevice) -> bool {
    device.vendor_id == VIRTIO_VENDOR
        && (device.device_id == VIRTIO_NET_MODERN || device.device_id == VIRTIO_NET_TRANSITIONAL)
}

pub(crate) fn name_of(prefix: &str, address: PciAddress) -> alloc::string::String {
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
    // The bond takes coalesced TCP frames of up to 64 KiB: one per host GSO packet instead of
    // dozens of MTU-sized ones. The stack consumes every frame (it never forwards), so frames
    // the host validated need no summing.
    let mut config = VirtioNetConfig {
        guest_tso: true,
        complete_partial_checksums: false,
        ..VirtioNetConfig::default()
    };
    // Configuration (noted, so the driver re-reads status and link at once), receive,
    // transmit.
    let vectors = [
        interrupts::allocate_vector(pending_vectors::note_pending)?,
        interrupts::allocate_vector(wake_event_loop)?,
        interrupts::allocate_vector(wake_event_loop)?,
    ];
    let config_vector = match pci.enable_msix(address, &vectors) {
        Ok(_table) => {
            config.msix = Some(MsixVectors {
                config: 0,
                rx: 1,
                tx: 2,
            });
            // Every status or link change raises the configuration vector: the periodic
            // check (two register reads, each an exit that waits for the device model's lock
            // under emulation, while a VF carries the traffic too) only backs it up.
            config.health_check_interval_ns = VIRTIO_HEALTH_CHECK_WITH_INTERRUPT_NS;
            Some(vectors[0])
        }
        Err(error) => {
            log::warn!("{name}: no MSI-X ({error}); falling back to polling");
            for vector in vectors {
                interrupts::free_vector(vector);
            }
            None
        }
    };
    let mut driver =
        VirtioNet::new(regions, KernelDma, config).map_err(|error| KernelError::Driver {
            device: name.clone(),
            reason: error.to_string(),
        })?;
    driver.set_name(&name);
    if let Some(vector) = config_vector {
        driver.set_config_interrupt(Box::new(move || pending_vectors::take_pending(vector)));
    }
    pci.claim(address);
    log::info!(
        "{name}: up, MAC {}, features {:?}",
        net_device::NetDevice::mac_address(&driver),
        driver.negotiated_features()
    );
    Ok(Box::new(driver))
}

/// Finds the synthetic NIC, starts it, builds the network stack over it with the addressing
/// from the command line (`ip=`, `gw=`, ... or DHCP), and pairs a VF with it when one is there
/// (with `igb.lab_pf=1`, this image also plays the igb PF's driver to create the VF).
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
    let hyper_v = crate::hyperv::detect();
    let plan = synthetic_plan(virtio.is_some(), hyper_v.as_ref());
    let mut vf_slot = None;
    let synthetic = match (plan, virtio, hyper_v) {
        (SyntheticPlan::VirtioNet, Some(address), _) => Some(start_virtio_net(&mut pci, address)?),
        (SyntheticPlan::Netvsc, _, Some(hyper_v)) => match hyperv::start_netvsc(
            &hyper_v,
            !carries_vf_path(pci.devices()) && !pci.devices().iter().any(vf_path::is_mana),
        ) {
            Ok(paths) => {
                vf_slot = paths.vf_slot;
                Some(paths.synthetic)
            }
            // A VM with only a VF (e.g. MANA on a PCIe port under OpenVMM) still has a network.
            Err(error) => {
                log::warn!("net: no synthetic path: {error}");
                return vf_alone(pci, config, error);
            }
        },
        _ => None,
    };
    let Some(synthetic) = synthetic else {
        return vf_alone(
            pci,
            config,
            KernelError::NoNetworkDevice {
                reason: if plan == SyntheticPlan::VmbusNotAllowed {
                    "this is Hyper-V, but the partition may not use VMBus (SynIC or \
                     hypercall privilege missing); no VF either"
                } else {
                    "no virtio-net device (1af4:1041), no Hyper-V VMBus and no usable VF"
                },
            },
        );
    };
    if plan == SyntheticPlan::VirtioNet {
        log::info!("net: synthetic path up: {}", synthetic.name());
    }
    let mut stack =
        NetStack::with_options(config, synthetic, Box::new(KernelPlatform), stack_options())
            .map_err(|error| KernelError::Network {
                reason: error.to_string(),
            })?;
    *PCI.lock() = Some(pci);
    match vf_slot {
        // Hyper-V: VFs arrive over vPCI into the slot, paired by netvsc's association.
        Some(slot) => attach(&mut stack, slot),
        None => attach_vf_if_present(&mut stack),
    }
    Ok(stack)
}

/// No synthetic NIC: a VF alone carries the interface (no failover possible); without a VF
/// either, `no_vf` is the error.
fn vf_alone(pci: Pci, config: NetConfig, no_vf: KernelError) -> Result<NetStack, KernelError> {
    *PCI.lock() = Some(pci);
    let mac = crate::cmdline_value("igb.vf_mac")
        .and_then(parse_mac)
        .unwrap_or(DEFAULT_VF_ONLY_MAC);
    match vf_path::bring_up_vf_path(mac)? {
        Some(vf) => {
            log::warn!(
                "net: no virtio-net device: the VF alone carries the interface, without failover"
            );
            NetStack::with_options(config, vf, Box::new(KernelPlatform), stack_options()).map_err(
                |error| KernelError::Network {
                    reason: error.to_string(),
                },
            )
        }
        None => Err(no_vf),
    }
}

/// The stack's options: the defaults, except receive coalescing off with `net.coalesce=off`
/// (to measure what it brings).
fn stack_options() -> StackOptions {
    let mut options = StackOptions::default();
    if crate::cmdline_value("net.coalesce") == Some("off") {
        log::info!("net: receive coalescing off (net.coalesce=off)");
        options.bond.rx_coalescing = false;
    }
    options
}

/// The MAC the lab PF gives a VF that has no synthetic partner (`igb.vf_mac=` overrides it).
const DEFAULT_VF_ONLY_MAC: MacAddress = MacAddress([0x52, 0x54, 0x00, 0x12, 0x34, 0x56]);

/// Parses `aa:bb:cc:dd:ee:ff`.
fn parse_mac(text: &str) -> Option<MacAddress> {
    let mut bytes = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut bytes {
        *byte = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts
        .next()
        .is_none()
        .then_some(MacAddress(bytes))
        .filter(MacAddress::is_valid_unicast)
}

/// Starts the VF path (and the lab PF when asked) and attaches it to the bond; failures leave
/// the synthetic path alone in charge.
fn attach_vf_if_present(stack: &mut NetStack) {
    match vf_path::bring_up_vf_path(stack.mac_address()) {
        Ok(Some(vf)) => attach(stack, vf),
        Ok(None) => {}
        Err(error) => warn_unavailable(&error),
    }
}

fn attach(stack: &mut NetStack, vf: Box<dyn net_device::NetDevice>) {
    if let Err(rejected) = stack.attach_vf(vf) {
        log::warn!("net: VF not paired: {rejected:?}");
    }
}

fn warn_unavailable(error: &KernelError) {
    log::warn!("net: VF path unavailable, staying on the synthetic path: {error}");
}

/// A VF path that arrived by hot-plug, brought up one step per event-loop round so the
/// synthetic path keeps being served in between (each step blocks for milliseconds).
#[derive(Default)]
struct VfArrival {
    due: bool,
}

impl VfArrival {
    /// Runs the next step; returns true when one ran.
    fn step(&mut self, stack: &mut NetStack) -> bool {
        if !core::mem::take(&mut self.due) {
            return false;
        }
        if stack.bond().has_vf() {
            return true;
        }
        match vf_path::bring_up_step(stack.mac_address()) {
            Ok(vf_path::BringUpStep::Ready(vf)) => attach(stack, vf),
            Ok(vf_path::BringUpStep::Again) => self.due = true,
            Ok(vf_path::BringUpStep::Nothing) => {}
            Err(error) => warn_unavailable(&error),
        }
        true
    }
}

/// True when `devices` include the PF or VF of the VF path.
fn carries_vf_path(devices: &[PciDevice]) -> bool {
    devices
        .iter()
        .any(|device| vf_path::is_lab_pf_device(device) || vf_path::is_igb_vf(device))
}

/// Handles PCIe hot-plug events. The VF path's slot leaving: stop choosing the VF, quiesce it
/// (no DMA in flight), drop it and the lab PF, then let the slot power off. A VF path
/// arriving: marked for bring-up, which the event loop runs step by step between polls, then
/// attached (the bond switches once it is ready). Devices nobody drives are let go at once.
fn service_hotplug(stack: &mut NetStack, arrival: &mut VfArrival) {
    let events = match PCI.lock().as_mut() {
        Some(pci) => pci.service(),
        None => return,
    };
    for event in events {
        match event {
            HotplugEvent::DeviceLeaving { slot, devices } => {
                if carries_vf_path(&devices) {
                    arrival.due = false;
                    let started = time::now_ns();
                    if let Some(mut vf) = stack.detach_vf() {
                        vf.stop();
                    }
                    vf_path::stop_lab_pf();
                    log::info!(
                        "net: VF path quiesced for unplug in {} us",
                        (time::now_ns() - started) / 1000
                    );
                }
                if let Some(pci) = PCI.lock().as_mut() {
                    for device in &devices {
                        pci.release(device.address);
                    }
                    if let Err(error) = pci.complete_removal(slot) {
                        log::warn!("hotplug: completing removal on {slot:?}: {error}");
                    }
                }
            }
            HotplugEvent::DeviceRemoved { devices, .. }
            | HotplugEvent::UnplugComplete { devices, .. } => {
                if carries_vf_path(&devices) {
                    if let Some(mut vf) = stack.detach_vf() {
                        vf.mark_gone();
                    }
                    vf_path::stop_lab_pf();
                }
            }
            HotplugEvent::DeviceArrived { devices, .. } => {
                if carries_vf_path(&devices) && !stack.bond().has_vf() {
                    arrival.due = true;
                }
            }
        }
    }
}

/// The event loop services the lab PF at least this often: each service is three register
/// reads, and under emulation each is an exit that waits for the device model's lock (with
/// traffic flowing, up to a whole burst of frames). The lab PF runs on events otherwise, as a
/// PF driver runs on its interrupts: the VF's own mailbox waits service it directly, lab events
/// send their message at once, and the VF's mailbox vector (the VF reading a PF message, which
/// it then acknowledges) makes the next round service it. This bounds how soon anything else,
/// e.g. a PF link change, is noticed.
const LAB_PF_SERVICE_PERIOD_NS: u64 = 100_000_000;
/// The event loop reads the lab control channel's port at most this often. Like every
/// register access under emulation, each read waits whenever QEMU's I/O thread is in a burst;
/// at once a millisecond they were the guest's most frequent exit while receiving. Commands
/// are rare and their callers wait seconds for an answer.
const LAB_CONTROL_SERVICE_PERIOD_NS: u64 = 10_000_000;
/// The virtio-net driver's periodic status and link check when the configuration vector
/// reports changes (a safety net, e.g. for a device that stops answering).
const VIRTIO_HEALTH_CHECK_WITH_INTERRUPT_NS: u64 = 100_000_000;

/// Runs the event loop: hot-plug service, stack poll, then the app; sleeps until an interrupt
/// or the next deadline whenever a round did nothing. Returns the app's exit code.
pub fn run(stack: &mut NetStack, mut app: impl FnMut(&mut NetStack) -> ControlFlow<i32>) -> i32 {
    let mut control = lab_control::LabControl::open();
    let mut arrival = VfArrival::default();
    let mut lab_pf_serviced_ns = None;
    let mut lab_control_serviced_ns = None;
    let due = |last: &mut Option<u64>, now_ns: u64, period_ns: u64| {
        let due = last.is_none_or(|at| now_ns.saturating_sub(at) >= period_ns);
        if due {
            *last = Some(now_ns);
        }
        due
    };
    loop {
        service_hotplug(stack, &mut arrival);
        let now_ns = time::now_ns();
        if vf_path::take_lab_pf_due()
            || due(&mut lab_pf_serviced_ns, now_ns, LAB_PF_SERVICE_PERIOD_NS)
        {
            vf_path::service_lab_pf();
        }
        if let Some(control) = control.as_mut()
            && due(
                &mut lab_control_serviced_ns,
                now_ns,
                LAB_CONTROL_SERVICE_PERIOD_NS,
            )
        {
            control.service(stack);
        }
        let mut did_work = stack.poll();
        if let ControlFlow::Break(code) = app(stack) {
            return code;
        }
        did_work |= arrival.step(stack);
        if !did_work {
            stack.wait();
        }
    }
}
