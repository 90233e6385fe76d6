//! The VF path: starting the igbvf driver on an SR-IOV VF or the MANA driver on a MANA
//! function (Azure's VF, 1414:00BA), and (in lab images only) the PF responder that plays the
//! host's PF driver for QEMU's igb emulation.
//!
//! The lab PF is test-bed scaffolding: it runs only when the command line says
//! `igb.lab_pf=1`. On a real SR-IOV host the PF belongs to the host and the VF arrives alone.

use alloc::boxed::Box;
use alloc::string::{String, ToString};
use alloc::vec;
use core::sync::atomic::{AtomicBool, Ordering};

use net_device::{MacAddress, NetDevice};
use spin::Mutex;
use vf_driver::{Config, IgbVf, LabPf, LabPfConfig, Mana, ManaConfig, SriovControl, WaitHost};

use super::{PCI, name_of, wake_event_loop};
use crate::error::KernelError;
use crate::interrupts::msi_message;
use crate::mm::heap::KernelDma;
use crate::mm::mmio::MmioRegion;
use crate::pci::{Command, ConfigAccess, PciAddress, PciDevice, capability};
use crate::{interrupts, pending_vectors, time};

/// Intel's PCI vendor ID.
const INTEL_VENDOR: u16 = 0x8086;
/// 82576 PF (what QEMU's `igb` device is).
const IGB_82576_PF: u16 = 0x10c9;

/// The lab PF responder, when running.
pub(super) static LAB_PF: Mutex<Option<LabPf<MmioRegion, KernelSriov>>> = Mutex::new(None);

/// Set when the VF's mailbox vector fired: the VF is about to read (and acknowledge) a PF
/// message, so the lab PF has an acknowledgement to see and perhaps a queued message to send.
static LAB_PF_DUE: AtomicBool = AtomicBool::new(false);

/// Takes the flag that the lab PF has work from the VF's side (see [`LAB_PF_DUE`]).
pub fn take_lab_pf_due() -> bool {
    LAB_PF_DUE.swap(false, Ordering::AcqRel)
}

/// True when the command line asks for the lab PF responder.
pub fn lab_pf_requested() -> bool {
    matches!(
        crate::cmdline_value("igb.lab_pf"),
        Some("1" | "on" | "yes" | "true")
    )
}

/// True for a PF the lab responder can drive.
pub fn is_lab_pf_device(device: &PciDevice) -> bool {
    device.vendor_id == INTEL_VENDOR
        && device.device_id == IGB_82576_PF
        && !device.is_virtual_function()
}

/// True for a VF the igbvf driver drives.
pub fn is_igb_vf(device: &PciDevice) -> bool {
    device.is_virtual_function()
        && vf_driver::regs::is_supported_device(device.vendor_id, device.device_id)
}

/// True for a MANA function (passed through on KVM; on Hyper-V it arrives over vPCI).
pub fn is_mana(device: &PciDevice) -> bool {
    vf_driver::mana::is_supported_device(device.vendor_id, device.device_id)
}

/// Starts the MANA driver on `function`. MSI-X entries 0 and 1 go to the HWC EQ and the data
/// EQ; like igbvf's, their handler only wakes the event loop, which polls the driver.
pub fn start_mana(function: PciAddress) -> Result<Box<dyn NetDevice>, KernelError> {
    let name = name_of("mana", function);
    let registers = {
        let mut guard = PCI.lock();
        let pci = guard.as_mut().ok_or(KernelError::NoNetworkDevice {
            reason: "PCI not initialised",
        })?;
        pci.claim(function);
        prepare_mana(pci, function, &name, &mut |vectors| {
            Ok(vectors.iter().map(|&vector| msi_message(vector)).collect())
        })?
    };
    finish_mana(registers, name)
}

/// Gives the MSI address/data for each of a function's vectors.
pub type MsiMessages<'a> =
    dyn FnMut(&[u8]) -> Result<alloc::vec::Vec<(u64, u32)>, KernelError> + 'a;

/// Readies a MANA function on any PCI bus (the platform's, or a Hyper-V vPCI bus): memory
/// decoding and bus mastering, BAR0 mapped, MSI-X entries 0 and 1 programmed with the messages
/// `messages` gives for two fresh vectors (plain MSI on PCI; host-mapped on vPCI). Returns the
/// register window; without MSI-X the driver polls.
pub fn prepare_mana<A: ConfigAccess>(
    pci: &crate::pci::PciBus<A>,
    function: PciAddress,
    name: &str,
    messages: &mut MsiMessages<'_>,
) -> Result<MmioRegion, KernelError> {
    pci.enable_command(function, Command::MEMORY_SPACE | Command::BUS_MASTER)?;
    let registers = pci.map_bar(function, 0)?;
    let vectors = [
        interrupts::allocate_vector(wake_event_loop)?,
        interrupts::allocate_vector(wake_event_loop)?,
    ];
    let wired = pci.msix_capability(function).and_then(|capability| {
        let table = pci.map_bar(function, usize::from(capability.table_bar))?;
        let messages = messages(&vectors)?;
        pci.enable_msix_with(function, table, &messages)
    });
    if let Err(error) = wired {
        log::warn!("{name}: no MSI-X ({error}); polling");
        vectors.into_iter().for_each(interrupts::free_vector);
    }
    Ok(registers)
}

/// Starts the MANA driver over its mapped registers.
pub fn finish_mana(registers: MmioRegion, name: String) -> Result<Box<dyn NetDevice>, KernelError> {
    let config = ManaConfig {
        name: name.clone(),
        hwc_msix_index: 0,
        data_msix_index: 1,
        ..ManaConfig::default()
    };
    let driver =
        Mana::new(registers, KernelDma, Box::new(KernelWaitHost), config).map_err(|error| {
            KernelError::Driver {
                device: name.clone(),
                reason: error.to_string(),
            }
        })?;
    log::info!("{name}: up, MAC {}", driver.mac_address());
    Ok(Box::new(driver))
}

/// Waits in driver bring-up: the clock, and a turn of the lab PF (the VF's mailbox peer lives
/// in this image when the lab PF runs).
struct KernelWaitHost;

impl WaitHost for KernelWaitHost {
    fn now_ns(&mut self) -> u64 {
        time::now_ns()
    }

    fn idle(&mut self) {
        if let Some(mut lab) = LAB_PF.try_lock()
            && let Some(lab) = lab.as_mut()
        {
            lab.service();
        }
        core::hint::spin_loop();
    }
}

/// The PF's SR-IOV controls, through the kernel's PCI bus.
pub(super) struct KernelSriov {
    pf: PciAddress,
}

impl KernelSriov {
    fn with_pci<T>(&self, default: T, f: impl FnOnce(&mut crate::pci::Pci) -> T) -> T {
        match PCI.lock().as_mut() {
            Some(pci) => f(pci),
            None => default,
        }
    }
}

impl SriovControl for KernelSriov {
    fn total_vfs(&self) -> u16 {
        self.with_pci(0, |pci| {
            capability::SriovCapability::find(pci.config(), self.pf).map_or(0, |cap| cap.total_vfs)
        })
    }

    fn enable_vfs(&mut self, count: u16) -> Result<(), vf_driver::Error> {
        let pf = self.pf;
        self.with_pci(Err("no PCI bus"), |pci| {
            pci.enable_sriov(pf, count)
                .map(|_| ())
                .map_err(|_| "PCI refused")
        })
        .map_err(|reason| vf_driver::Error::SriovEnable {
            requested: count,
            reason,
        })
    }

    fn disable_vfs(&mut self) {
        let pf = self.pf;
        self.with_pci((), |pci| {
            if let Err(error) = pci.disable_sriov(pf) {
                log::warn!("lab PF: disabling VFs: {error}");
            }
        });
    }

    fn enabled_vfs(&self) -> u16 {
        self.with_pci(0, |pci| {
            pci.device(self.pf)
                .and_then(|pf| pf.sriov.as_ref())
                .map_or(0, |state| state.num_vfs)
        })
    }

    fn function_level_reset(&mut self, vf: u16) -> Result<(), vf_driver::Error> {
        let pf = self.pf;
        self.with_pci(Err(vf_driver::Error::NoSuchVf { vf, count: 0 }), |pci| {
            let state = pci.device(pf).and_then(|pf| pf.sriov.clone());
            let count = state.as_ref().map_or(0, |state| state.num_vfs);
            let address = state
                .and_then(|state| state.vfs.get(usize::from(vf)).copied())
                .ok_or(vf_driver::Error::NoSuchVf { vf, count })?;
            let express =
                capability::find_capability(pci.config(), address, capability::id::PCI_EXPRESS)
                    .ok_or(vf_driver::Error::NoSuchVf { vf, count })?;
            // PCIe Device Control (capability + 8), bit 15: Initiate Function Level Reset.
            let control = pci.config().read16(address, express + 8);
            pci.config().write16(address, express + 8, control | 0x8000);
            // FLR clears the VF's Command register; QEMU gates its BARs and DMA on it.
            pci.set_command(address, Command::MEMORY_SPACE | Command::BUS_MASTER);
            Ok(())
        })
    }
}

/// Starts the lab PF responder on `pf`, giving VF 0 the MAC `mac` (the synthetic NIC's, as a
/// host administrator or libvirt `<teaming>` would), and enables one VF.
pub fn start_lab_pf(pf: PciAddress, mac: MacAddress) -> Result<(), KernelError> {
    let name = name_of("lab PF", pf);
    let lab_error = |error: vf_driver::Error| KernelError::Driver {
        device: name.clone(),
        reason: error.to_string(),
    };
    let registers = {
        let guard = PCI.lock();
        let pci = guard.as_ref().ok_or(KernelError::NoNetworkDevice {
            reason: "PCI not initialised",
        })?;
        // QEMU needs PF bus mastering for the VFs' DMA too.
        pci.enable_command(pf, Command::MEMORY_SPACE | Command::BUS_MASTER)?;
        pci.map_bar(pf, 0)?
    };
    // Claimed, an attention-button press becomes "device leaving" for us to quiesce the VF
    // path first, instead of an immediate power-off.
    if let Some(pci) = PCI.lock().as_mut() {
        pci.claim(pf);
    }
    // Don't wait for auto-negotiation (QEMU takes 500 ms): the VF reports link down until it
    // completes and the bond switches to it then, so the stack starts serving at once.
    let config = LabPfConfig {
        num_vfs: 1,
        vf_macs: vec![Some(mac)],
        link_timeout_ns: 0,
        // `igb.rx_checksum=0`: no receive checksum offload (works around QEMU 10.0.2's igb
        // crash on crafted SCTP frames, tests/qemu-bugs/igb-sctp-checksum).
        receive_checksum_offload: !matches!(
            crate::cmdline_value("igb.rx_checksum"),
            Some("0" | "off" | "no" | "false")
        ),
        ..LabPfConfig::default()
    };
    let mut lab = LabPf::new(registers, KernelSriov { pf }, config).map_err(lab_error)?;
    let link_up = lab.bring_up(&mut KernelWaitHost).map_err(lab_error)?;
    log::info!(
        "{name}: SR-IOV enabled, VF 0 MAC {mac}, link {}",
        if link_up { "up" } else { "down" }
    );
    *LAB_PF.lock() = Some(lab);
    Ok(())
}

/// The VF's register check period while frames flow, when PF messages raise an interrupt.
const BUSY_REGISTER_CHECK_WITH_MAILBOX_VECTOR_NS: u64 = 100_000_000;

/// Starts the igbvf driver on `vf` with MSI-X.
pub fn start_vf(vf: PciAddress) -> Result<Box<dyn NetDevice>, KernelError> {
    let name = name_of("igbvf", vf);
    let (registers, msix) = {
        let mut guard = PCI.lock();
        let pci = guard.as_mut().ok_or(KernelError::NoNetworkDevice {
            reason: "PCI not initialised",
        })?;
        pci.claim(vf);
        pci.enable_command(vf, Command::MEMORY_SPACE | Command::BUS_MASTER)?;
        let registers = pci.map_bar(vf, 0)?;
        // Queue, mailbox (noted, so the driver reads PF messages at once), spare.
        let vectors = [
            interrupts::allocate_vector(wake_event_loop)?,
            interrupts::allocate_vector(pending_vectors::note_pending)?,
            interrupts::allocate_vector(wake_event_loop)?,
        ];
        let msix = match pci.enable_msix(vf, &vectors) {
            Ok(_) => true,
            Err(error) => {
                log::warn!("{name}: no MSI-X ({error}); polling");
                vectors.into_iter().for_each(interrupts::free_vector);
                false
            }
        };
        (registers, msix.then_some(vectors[1]))
    };
    let config = Config {
        name: name.clone(),
        // Room for a few bursts (2 MiB of buffers): when the ring fills, QEMU's igb queues
        // what the tap delivers and receives it on the vCPU thread at our next RDT write,
        // serialised with the guest's own work, instead of on its I/O thread alongside it
        // (`bench iperf` -P 4: driver stage 3.3 → 1.1 µs of guest time per frame).
        rx_ring_size: 1024,
        // While frames flow, STATUS and the mailbox are read this rarely: a PF message raises
        // the mailbox vector (read at once), and removal or link loss stop the frames, after
        // which the quiet period applies. Each read waits for the device model's lock.
        busy_register_check_period_ns: if msix.is_some() {
            BUSY_REGISTER_CHECK_WITH_MAILBOX_VECTOR_NS
        } else {
            Config::default().busy_register_check_period_ns
        },
        ..Config::default()
    };
    let mut driver =
        IgbVf::new(registers, KernelDma, Box::new(KernelWaitHost), config).map_err(|error| {
            KernelError::Driver {
                device: name.clone(),
                reason: error.to_string(),
            }
        })?;
    if let Some(mailbox_vector) = msix {
        match driver.configure_msix(0, 1) {
            Ok(()) => driver.set_mailbox_interrupt(Box::new(move || {
                let fired = pending_vectors::take_pending(mailbox_vector);
                if fired {
                    LAB_PF_DUE.store(true, Ordering::Release);
                }
                fired
            })),
            Err(error) => log::warn!("{name}: MSI-X vector mapping refused: {error}"),
        }
    }
    log::info!("{name}: up, MAC {}", driver.mac_address());
    Ok(Box::new(driver))
}

/// Brings up the lab PF on the first igb PF (if asked for) and its VF 0; returns the VF
/// driver. `Ok(None)` when there is nothing to do.
pub fn bring_up_vf_path(mac: MacAddress) -> Result<Option<Box<dyn NetDevice>>, KernelError> {
    // Two steps at most: the lab PF (creating the VF), then the VF.
    for _ in 0..2 {
        match bring_up_step(mac)? {
            BringUpStep::Ready(vf) => return Ok(Some(vf)),
            BringUpStep::Nothing => return Ok(None),
            BringUpStep::Again => {}
        }
    }
    Ok(None)
}

/// Where [`bring_up_step`] left the VF path.
pub enum BringUpStep {
    /// The VF driver is up.
    Ready(Box<dyn NetDevice>),
    /// A step was done (the lab PF enabled its VF); call again for the next.
    Again,
    /// No VF path here.
    Nothing,
}

/// Does the next step of bringing up the VF path: the MANA driver when a MANA function is on
/// the bus; otherwise the lab PF when there is no VF yet (and the lab PF is asked for), else
/// the igbvf driver. Each step blocks the caller for a few
/// milliseconds (register and mailbox round trips), so the event loop serves the network
/// between steps.
pub fn bring_up_step(mac: MacAddress) -> Result<BringUpStep, KernelError> {
    let (pf, existing_vf) = {
        let guard = PCI.lock();
        let Some(pci) = guard.as_ref() else {
            return Ok(BringUpStep::Nothing);
        };
        let mana = pci
            .devices()
            .iter()
            .find(|device| is_mana(device))
            .map(|device| device.address);
        if let Some(mana) = mana {
            drop(guard);
            return start_mana(mana).map(BringUpStep::Ready);
        }
        let pf = pci
            .devices()
            .iter()
            .find(|device| is_lab_pf_device(device))
            .map(|device| device.address);
        // A VF on the bus, or one the lab PF enabled in an earlier step.
        let vf = pci
            .devices()
            .iter()
            .find(|device| is_igb_vf(device))
            .map(|device| device.address)
            .or_else(|| {
                pf.and_then(|pf| pci.device(pf))
                    .and_then(|device| device.sriov.as_ref())
                    .and_then(|state| state.vfs.first().copied())
            });
        (pf, vf)
    };
    match (existing_vf, pf) {
        (Some(vf), _) => start_vf(vf).map(BringUpStep::Ready),
        (None, Some(pf)) if lab_pf_requested() => {
            start_lab_pf(pf, mac)?;
            let guard = PCI.lock();
            let pci = guard.as_ref().ok_or(KernelError::NoNetworkDevice {
                reason: "PCI not initialised",
            })?;
            let has_vf = pci
                .device(pf)
                .and_then(|device| device.sriov.as_ref())
                .is_some_and(|state| !state.vfs.is_empty());
            if has_vf {
                Ok(BringUpStep::Again)
            } else {
                Err(KernelError::NoNetworkDevice {
                    reason: "the lab PF enabled no VF",
                })
            }
        }
        (None, Some(pf)) => {
            log::info!("igb PF {pf} present but igb.lab_pf=1 not given: it belongs to the host");
            Ok(BringUpStep::Nothing)
        }
        (None, None) => Ok(BringUpStep::Nothing),
    }
}

/// Services the lab PF's mailbox (VF requests) once; cheap when idle.
pub fn service_lab_pf() {
    if let Some(mut lab) = LAB_PF.try_lock()
        && let Some(lab) = lab.as_mut()
    {
        lab.service();
    }
}

/// Drops the lab PF (its device is leaving or gone).
pub fn stop_lab_pf() {
    LAB_PF.lock().take();
}

/// Host-side events the lab PF can inject (see `lab_control`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LabEvent {
    /// Clear VF Enable: the VF vanishes (surprise removal).
    DisableVfs,
    /// Set VF Enable again and bring a fresh VF into the bond.
    EnableVfs,
    /// The VF's link goes down.
    LinkDown,
    /// The VF's link comes back.
    LinkUp,
    /// A PF reset/control message: the VF must re-initialise.
    ControlMessage,
}

/// Executes a lab event; returns the answer line for the control channel.
pub fn lab_event(event: LabEvent, stack: &mut net_stack::NetStack) -> alloc::string::String {
    use alloc::string::String;
    let result: Result<(), String> = {
        let mut guard = LAB_PF.lock();
        match guard.as_mut() {
            None => Err(String::from(
                "no lab PF (boot with igb.lab_pf=1 and an igb PF)",
            )),
            Some(lab) => match event {
                LabEvent::DisableVfs => {
                    lab.disable_vfs();
                    Ok(())
                }
                LabEvent::EnableVfs => lab.enable_vfs().map_err(|error| error.to_string()),
                LabEvent::LinkDown => lab.set_vf_link(0, false).map_err(|error| error.to_string()),
                LabEvent::LinkUp => lab.set_vf_link(0, true).map_err(|error| error.to_string()),
                LabEvent::ControlMessage => lab
                    .send_control_message(0)
                    .map_err(|error| error.to_string()),
            },
        }
    };
    if let Err(reason) = result {
        return alloc::format!("error {reason}");
    }
    if event == LabEvent::EnableVfs {
        // The re-enabled VF is a fresh device: drop the dead driver and start a new one.
        if let Some(mut old) = stack.detach_vf() {
            old.mark_gone();
        }
        let vf = PCI.lock().as_ref().and_then(|pci| {
            pci.devices()
                .iter()
                .find(|device| is_igb_vf(device))
                .map(|device| device.address)
        });
        match vf
            .ok_or_else(|| String::from("no VF after enabling"))
            .and_then(|vf| start_vf(vf).map_err(|e| e.to_string()))
        {
            Ok(driver) => {
                if let Err(rejected) = stack.attach_vf(driver) {
                    return alloc::format!("error VF not paired: {rejected:?}");
                }
            }
            Err(reason) => return alloc::format!("error {reason}"),
        }
    }
    alloc::format!("ok {event:?}")
}
