//! Hyper-V network bring-up: the SynIC, the VMBus connection, the netvsc offer and the netvsc
//! driver on its channel, as the synthetic path the bond takes in place of virtio-net.
//!
//! VMBus host messages and channel events are pumped by the shared hub
//! ([`crate::hyperv::vmbus_hub`]) whenever a driver polls or waits (every event-loop round);
//! the SINT 2 interrupt wakes the loop.

use alloc::boxed::Box;
use alloc::format;
use alloc::string::ToString;
use alloc::vec::Vec;

use net_device::NetDevice;
use netvsc_fallback::netvsc::{Netvsc, NetvscChannel, NetvscConfig, VmbusNetvscChannel};
use vmbus::{ClientConfig, OpenParams, VmbusClient};
use zerocopy::IntoBytes;

use crate::error::KernelError;
use crate::hyperv::bringup::{self, NetvscUp, OfferSummary};
use crate::hyperv::port::KernelPort;
use crate::hyperv::vmbus_hub::{HubChannelControl, VmbusHub};
use crate::hyperv::{HyperV, synic};
use crate::mm::heap::KernelDma;

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

/// Enables the SynIC, connects to VMBus, opens the first synthetic NIC's channel and starts
/// netvsc on it. Returns the driver as the bond's synthetic path.
pub fn start_netvsc(hyper_v: &HyperV) -> Result<Box<dyn NetDevice>, KernelError> {
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
    Ok(Box::new(driver))
}
