//! Hyper-V network bring-up: the SynIC, the VMBus connection, the netvsc offer and the netvsc
//! driver on its channel, as the synthetic path the bond takes in place of virtio-net; and the
//! VF path over vPCI ([`crate::hyperv::vpci_vf`]), whose machine side ([`KernelVfPlatform`]:
//! channels, MMIO from the DSDT, MSI-X with the retarget hypercall, the MANA driver) is here.
//!
//! VMBus host messages and channel events are pumped by the shared hub
//! ([`crate::hyperv::vmbus_hub`]) whenever a driver polls or waits (every event-loop round);
//! the SINT 2 interrupt wakes the loop.

use alloc::boxed::Box;
use alloc::collections::{BTreeMap, VecDeque};
use alloc::format;
use alloc::string::ToString;
use alloc::vec::Vec;

use net_device::NetDevice;
use netvsc_fallback::netvsc::{Netvsc, NetvscChannel, NetvscConfig, VmbusNetvscChannel};
use vmbus::client::Offer;
use vmbus::vpci::{VpciBus, protocol::WINDOW_LEN};
use vmbus::{ClientConfig, OpenParams, VmbusClient};
use zerocopy::IntoBytes;

use crate::error::KernelError;
use crate::hyperv::abi::{RetargetDeviceInterruptInput, vpci_device_id};
use crate::hyperv::bringup::{self, NetvscUp, OfferSummary};
use crate::hyperv::port::KernelPort;
use crate::hyperv::vmbus_hub::{HubChannelControl, HubVpciPort, SharedHub, VmbusHub};
use crate::hyperv::vpci_vf::{
    self, HyperVNic, MmioPool, SharedVpciBus, VfHook, VfPlatform, present_function,
};
use crate::hyperv::{HyperV, synic};
use crate::mm::heap::KernelDma;
use crate::mm::mmio::MmioRegion;
use crate::pci::AddressRange;

/// Data pages of each ring of the netvsc channel: 128 KiB each way holds ~80 MTU frames in
/// flight (frames travel in the send and receive buffers; the ring carries only descriptors and
/// NVSP messages), small beside the 1 MiB receive buffer of a 32 MiB VM.
const RING_DATA_PAGES: usize = 32;

fn vmbus_error(step: &'static str, error: impl ToString) -> KernelError {
    KernelError::HyperV {
        step,
        reason: error.to_string(),
    }
}

fn version_pair(version: u32) -> (u16, u16) {
    ((version >> 16) as u16, version as u16)
}

/// Data pages of each ring of a vPCI channel (its messages are small and rare; Linux uses
/// 4-page rings).
const VPCI_RING_DATA_PAGES: usize = 3;
/// Longest wait for any one vPCI request.
const VPCI_TIMEOUT_NS: u64 = 5_000_000_000;

/// The synthetic path, and the bond's VF slot when vPCI VFs can be used.
pub struct HyperVPaths {
    /// netvsc (with the VF hook when `vf_slot` is set).
    pub synthetic: Box<dyn NetDevice>,
    /// The slot the VFs arriving over vPCI appear in; attach it to the bond.
    pub vf_slot: Option<Box<dyn NetDevice>>,
}

/// Enables the SynIC, connects to VMBus, opens the first synthetic NIC's channel and starts
/// netvsc on it. Returns the driver as the bond's synthetic path; with `with_vpci` (no VF on
/// PCI) and MMIO for VMBus in the DSDT, also the VF hook and its slot.
pub fn start_netvsc(hyper_v: &HyperV, with_vpci: bool) -> Result<HyperVPaths, KernelError> {
    let synic = synic::enable_once(hyper_v)?;
    let client = VmbusClient::connect(KernelPort::new(synic), ClientConfig::default())
        .map_err(|error| vmbus_error("VMBus connect", error))?;
    let version = client.version().map_or(0, |version| version.0);
    let offers: Vec<OfferSummary> = client
        .offers()
        .map(|offer| {
            log::info!(
                "vmbus: offer relid {} interface {} instance {} subchannel {}",
                offer.relid,
                offer.interface_id,
                offer.instance_id,
                offer.subchannel_index
            );
            OfferSummary {
                interface: offer.interface_id.as_bytes().try_into().unwrap_or([0; 16]),
                instance: offer.instance_id.as_bytes().try_into().unwrap_or([0; 16]),
                relid: offer.relid,
                sub_channel_index: offer.subchannel_index,
            }
        })
        .collect();
    let vpci_offers: VecDeque<Offer> = client
        .offers()
        .filter(|offer| offer.interface_id == vmbus::guid::interface::VPCI)
        .copied()
        .collect();
    let nics = bringup::netvsc_offers(&offers);
    let Some(nic) = nics.first().copied() else {
        return Err(KernelError::NoNetworkDevice {
            reason: "Hyper-V VMBus offers no synthetic NIC (netvsc): add a network adapter \
                     to the VM",
        });
    };
    if nics.len() > 1 {
        log::info!(
            "vmbus: {} synthetic NICs offered; relid {} is used",
            nics.len(),
            nic.relid
        );
    }
    let hub = VmbusHub::shared(client);
    let channel = hub
        .borrow_mut()
        .client_mut()
        .open_channel(
            nic.relid,
            &OpenParams::new(RING_DATA_PAGES, RING_DATA_PAGES),
            &KernelDma,
        )
        .map_err(|error| vmbus_error("netvsc channel open", error))?;
    let adapter = VmbusNetvscChannel::new(channel, HubChannelControl::new(hub.clone()));
    let name = format!("netvsc relid {}", nic.relid);
    let config = NetvscConfig {
        name: name.clone(),
        ..NetvscConfig::default()
    };
    let driver = match Netvsc::new(adapter, &KernelDma, config) {
        Ok(driver) => driver,
        Err((error, mut adapter)) => {
            adapter.close();
            return Err(KernelError::Driver {
                device: name,
                reason: error.to_string(),
            });
        }
    };
    let negotiated = driver.negotiated();
    log::info!(
        "{}",
        bringup::netvsc_up_line(&NetvscUp {
            vmbus_version: version_pair(version),
            nvsp_version: version_pair(negotiated.version.0),
            relid: nic.relid,
            instance: nic.instance,
            mac: driver.mac_address().to_string(),
            mtu: driver.capabilities().mtu as u32,
        })
    );
    log::info!(
        "{name}: send buffer {}, receive buffer {} x {} bytes, offloads {:?}",
        negotiated
            .send_section_size
            .map_or("none (GPA-direct)".to_string(), |size| format!(
                "{size}-byte sections"
            )),
        negotiated.receive_sub_allocations.1,
        negotiated.receive_sub_allocations.0,
        negotiated.offload
    );
    log::info!("hyperv: SynIC {}", synic.counters());
    let mmio: Vec<(u64, u64)> = crate::acpi::vmbus_mmio()
        .iter()
        .map(|range| (range.start, range.len))
        .collect();
    if !with_vpci || mmio.is_empty() {
        if with_vpci {
            log::info!("hyperv: no VMBus MMIO ranges in the DSDT: VFs over vPCI not used");
        }
        return Ok(HyperVPaths {
            synthetic: Box::new(driver),
            vf_slot: None,
        });
    }
    let platform = KernelVfPlatform {
        hub,
        synic,
        pending: vpci_offers,
        mmio: MmioPool::new(&mmio),
        windows: BTreeMap::new(),
        functions: BTreeMap::new(),
    };
    let mac = driver.mac_address();
    let capabilities = driver.capabilities();
    let (hook, slot) = VfHook::new(platform, mac, capabilities);
    Ok(HyperVPaths {
        synthetic: Box::new(HyperVNic::new(driver, hook)),
        vf_slot: Some(Box::new(slot)),
    })
}

/// The kernel side of the VF hook: vPCI channels on the shared VMBus client, MMIO carved from
/// the VMBus `_CRS` ranges, MSI-X through CREATE_INTERRUPT plus HvRetargetDeviceInterrupt, and
/// the MANA driver.
struct KernelVfPlatform {
    hub: SharedHub<KernelPort>,
    synic: &'static synic::Synic,
    /// vPCI offers not handed to the hook yet.
    pending: VecDeque<Offer>,
    mmio: MmioPool,
    /// Config windows by relid.
    windows: BTreeMap<u32, AddressRange>,
    /// BAR space and vectors of started functions, by (relid, wslot).
    functions: BTreeMap<(u32, u32), (AddressRange, Vec<u8>)>,
}

impl VfPlatform for KernelVfPlatform {
    type Port = HubVpciPort<KernelPort>;
    type Window = MmioRegion;

    fn take_vpci_offer(&mut self) -> Option<Offer> {
        loop {
            if let Some(offer) = self.pending.pop_front() {
                return Some(offer);
            }
            let offer = self.hub.borrow_mut().take_late_offer()?;
            if offer.interface_id == vmbus::guid::interface::VPCI {
                return Some(offer);
            }
        }
    }

    fn open_bus(
        &mut self,
        offer: &Offer,
    ) -> Result<SharedVpciBus<Self::Port, Self::Window>, KernelError> {
        let window = self
            .mmio
            .carve(WINDOW_LEN as u64, WINDOW_LEN as u64)
            .ok_or(KernelError::HyperV {
                step: "vPCI config window",
                reason: "no room left in the VMBus MMIO ranges".to_string(),
            })?;
        let mapped = match MmioRegion::map(window.start, WINDOW_LEN) {
            Ok(mapped) => mapped,
            Err(error) => {
                self.mmio.give_back(window);
                return Err(error);
            }
        };
        let channel = self
            .hub
            .borrow_mut()
            .client_mut()
            .open_channel(
                offer.relid,
                &OpenParams::new(VPCI_RING_DATA_PAGES, VPCI_RING_DATA_PAGES),
                &KernelDma,
            )
            .map_err(|error| {
                self.mmio.give_back(window);
                vmbus_error("vPCI channel open", error)
            })?;
        let port = HubVpciPort::new(self.hub.clone(), channel);
        match VpciBus::probe(port, mapped, window.start, VPCI_TIMEOUT_NS) {
            Ok(bus) => {
                self.windows.insert(offer.relid, window);
                Ok(alloc::rc::Rc::new(core::cell::RefCell::new(bus)))
            }
            Err(error) => {
                // The dropped port closed the channel; the host may still decode the window
                // (D0 entry may have happened): it is not reused.
                Err(vmbus_error("vPCI probe", error))
            }
        }
    }

    fn start_function(
        &mut self,
        offer: &Offer,
        bus: &SharedVpciBus<Self::Port, Self::Window>,
        wslot: u32,
    ) -> Result<Box<dyn NetDevice>, KernelError> {
        // The host says how much MMIO the bus needs; BARs are naturally aligned inside it.
        let len = (u64::from(offer.mmio_megabytes.max(1)) << 20).next_power_of_two();
        let bars = self.mmio.carve(len, len).ok_or(KernelError::HyperV {
            step: "vPCI BAR space",
            reason: format!("{len:#x} bytes do not fit in the VMBus MMIO ranges"),
        })?;
        let presented = match present_function(bus, wslot, bars) {
            Ok(presented) => presented,
            Err(error) => {
                self.mmio.give_back(bars);
                return Err(error);
            }
        };
        let name = format!("mana vpci{}.{wslot:x}", offer.relid);
        let instance: [u8; 16] = offer.instance_id.as_bytes().try_into().unwrap_or([0; 16]);
        let device_id = vpci_device_id(&instance, presented.address.function());
        let vp = self.synic.vp_index();
        let synic = self.synic;
        let mut vectors_used = Vec::new();
        let registers = crate::net::vf_path::prepare_mana(
            &presented.pci,
            presented.address,
            &name,
            &mut |vectors| {
                vectors_used = vectors.to_vec();
                let messages = vpci_vf::interrupt_messages(
                    bus,
                    wslot,
                    vectors,
                    u16::try_from(vp).unwrap_or(0),
                )?;
                for (&vector, &(address, data)) in vectors.iter().zip(&messages) {
                    let retarget =
                        RetargetDeviceInterruptInput::new(device_id, address, data, vector, vp)
                            .ok_or(KernelError::HyperV {
                                step: "HvRetargetDeviceInterrupt",
                                reason: format!("VP {vp} beyond the 64-bit processor mask"),
                            })?;
                    synic
                        .retarget_device_interrupt(&retarget)
                        .map_err(|status| KernelError::HyperV {
                            step: "HvRetargetDeviceInterrupt",
                            reason: format!("{status:?}"),
                        })?;
                }
                Ok(messages)
            },
        );
        let registers = match registers {
            Ok(registers) => registers,
            Err(error) => {
                self.mmio.give_back(bars);
                return Err(error);
            }
        };
        self.functions
            .insert((offer.relid, wslot), (bars, vectors_used));
        crate::net::vf_path::finish_mana(registers, name).inspect_err(|_| {
            self.function_stopped(offer, wslot);
        })
    }

    fn function_stopped(&mut self, offer: &Offer, wslot: u32) {
        if let Some((bars, vectors)) = self.functions.remove(&(offer.relid, wslot)) {
            vectors.into_iter().for_each(crate::interrupts::free_vector);
            self.mmio.give_back(bars);
        }
    }

    fn close_bus(&mut self, offer: &Offer, bus: SharedVpciBus<Self::Port, Self::Window>) {
        let Ok(bus) = alloc::rc::Rc::try_unwrap(bus) else {
            log::warn!("vpci: relid {} still in use; not closed", offer.relid);
            return;
        };
        let mut bus = bus.into_inner();
        let rescinded = bus.is_rescinded();
        if !rescinded && let Err(error) = bus.stop() {
            log::warn!("vpci: relid {}: FDO_D0_EXIT: {error}", offer.relid);
        }
        bus.into_port().close();
        // A rescinded bus's window is no longer decoded; a stopped one neither.
        if let Some(window) = self.windows.remove(&offer.relid) {
            self.mmio.give_back(window);
        }
    }
}
