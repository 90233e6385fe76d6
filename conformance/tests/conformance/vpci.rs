//! Our vPCI client (`vmbus::vpci`) against OpenVMM's `vpci` server with a `gdma` MANA device
//! behind it, on `vmbus_server`: negotiation, D0 entry with the config window, relations, PCI
//! config space through the window (capability walk, BAR sizing), resource requirements, BAR
//! placement, ASSIGNED_RESOURCES2, CREATE_INTERRUPT2 into the MSI-X table, D3/D0, our MANA
//! driver over BAR0 with its interrupts arriving as the vectors we asked for, and a rescind.
//!
//! OpenVMM's vPCI server never sends EJECT (it only revokes the channel), so EJECT →
//! EJECTION_COMPLETE is proved against the scripted host in `vmbus::vpci`'s tests.

use std::time::{Duration, Instant};

use net_backend::null::NullEndpoint;
use net_device::{LinkState, MacAddress, NetDevice, RegisterIo};
use tandem_conformance::GuestDma;
use tandem_conformance::vmbus_host::VmbusHost;
use tandem_conformance::vpci_host::{BarIo, ConfigWindow, GdmaOnVpci, GuestVpciPort};
use vf_driver::{Mana, ManaConfig, WaitHost};
use vmbus::guid::interface;
use vmbus::vpci::{BarPlacement, VpciBus, VpciEvent, place_bars, protocol};
use vmbus::{ClientConfig, OpenParams, VmbusClient};

const INSTANCE: guid::Guid = guid::guid!("5a0c3e21-7d44-4b1f-9e0a-1c2b3d4e5f60");
const SERIAL: u32 = 0x5a0c_3e21;
const MAC: [u8; 6] = [0x00, 0x15, 0x5d, 0x4a, 0x00, 0x07];
/// Where our "firmware" puts the config window and the BARs (any free guest-physical MMIO).
const WINDOW: u64 = 0xf800_0000;
const MMIO_START: u64 = 0x10_0000_0000;
const MMIO_LEN: u64 = 0x100_0000;
const TIMEOUT_NS: u64 = 10_000_000_000;
const WAIT: Duration = Duration::from_secs(20);
/// CPU vectors we ask the host to map for MSI-X entries 0 (HWC EQ) and 1 (data EQ).
const VECTORS: [u8; 2] = [0x50, 0x51];

type Bus = VpciBus<GuestVpciPort, ConfigWindow>;

struct RealTime(Instant);

impl WaitHost for RealTime {
    fn now_ns(&mut self) -> u64 {
        self.0.elapsed().as_nanos() as u64
    }
    fn idle(&mut self) {
        std::thread::sleep(Duration::from_micros(20));
    }
}

/// The host with a gdma VF offered over vPCI, our client connected and the bus probed.
fn probed() -> (VmbusHost, GdmaOnVpci, Bus) {
    let host = VmbusHost::start(GuestDma::new(64 << 20, 0));
    let vf = GdmaOnVpci::offer(&host, INSTANCE, MAC, Box::new(NullEndpoint::new()));
    let mut client =
        VmbusClient::connect(host.guest_port(), ClientConfig::default()).expect("connects");
    let relid = client
        .offers()
        .find(|offer| offer.interface_id == interface::VPCI)
        .expect("a vPCI offer")
        .relid;
    let channel = client
        .open_channel(relid, &OpenParams::new(3, 3), host.dma())
        .expect("vPCI channel opens");
    let bus = VpciBus::probe(
        GuestVpciPort::new(client, channel),
        vf.window(WINDOW),
        WINDOW,
        TIMEOUT_NS,
    )
    .expect("vPCI probe against OpenVMM's vpci");
    (host, vf, bus)
}

/// The PCI layer's capability walk (status bit 4, pointer at 0x34), bounded.
fn find_capability(config: &impl RegisterIo, id: u8) -> Option<usize> {
    if config.read16(0x06) & 0x10 == 0 {
        return None;
    }
    let mut at = usize::from(config.read8(0x34) & !3);
    for _ in 0..48 {
        if at < 0x40 {
            return None;
        }
        if config.read8(at) == id {
            return Some(at);
        }
        at = usize::from(config.read8(at + 1) & !3);
    }
    None
}

/// BAR sizing as a PCI core does it: write all-ones, read the mask back, restore.
fn size_bar(config: &impl RegisterIo, index: usize) -> u32 {
    let offset = 0x10 + 4 * index;
    let original = config.read32(offset);
    config.write32(offset, u32::MAX);
    let mask = config.read32(offset);
    config.write32(offset, original);
    mask
}

/// Resources, decoding and MSI-X the way the kernel's PCI layer would over vPCI; returns BAR0.
fn set_up_function(vf: &GdmaOnVpci, bus: &mut Bus) -> BarIo {
    let masks = bus.resource_requirements(0).expect("resource requirements");
    assert_eq!(
        masks,
        [0xffff_e00c, 0xffff_ffff, 0, 0, 0xffff_f00c, 0xffff_ffff],
        "gdma: BAR0 8 KiB and BAR4 4 KiB, both 64-bit"
    );
    let bars = place_bars(&masks, MMIO_START, MMIO_LEN).expect("BARs fit");
    {
        let config = bus.config_space(0).unwrap();
        // Sizing through the window agrees with what the host reported.
        assert_eq!(size_bar(&config, 0), masks[0]);
        assert_eq!(size_bar(&config, 4), masks[4]);
        for (index, bar) in bars.iter().enumerate() {
            if bar.len != 0 {
                config.write32(0x10 + 4 * index, bar.address as u32 | 0xc);
                config.write32(0x14 + 4 * index, (bar.address >> 32) as u32);
            }
        }
    }
    bus.assign_resources(0, &bars).expect("ASSIGNED_RESOURCES2");
    let config = bus.config_space(0).unwrap();
    assert_eq!(
        config.read32(0x10) & !0xf,
        bars[0].address as u32,
        "BAR0 as placed"
    );
    assert_eq!(config.read32(0x14), (bars[0].address >> 32) as u32);
    config.write16(0x04, 0x0006);
    assert_eq!(
        config.read16(0x04) & 0x6,
        0x6,
        "memory decoding and bus mastering"
    );

    let msix = find_capability(&config, 0x11).expect("MSI-X capability");
    assert_eq!(msix, 0x40);
    let control = config.read16(msix + 2);
    assert_eq!((control & 0x7ff) + 1, 64, "64 MSI-X vectors");
    let table = config.read32(msix + 4);
    assert_eq!(table & 7, 4, "the MSI-X table is in BAR4");
    let table_io = vf.bar(bars[4].address, bars[4].len as usize);
    for (entry, vector) in VECTORS.iter().enumerate() {
        let mapping = bus
            .create_interrupt(0, *vector, &[0])
            .expect("CREATE_INTERRUPT2");
        let at = (table & !7) as usize + entry * 16;
        table_io.write32(at, mapping.address as u32);
        table_io.write32(at + 4, (mapping.address >> 32) as u32);
        table_io.write32(at + 8, mapping.data);
        table_io.write32(at + 12, 0);
    }
    let config = bus.config_space(0).unwrap();
    config.write16(msix + 2, control | 0x8000);
    assert_ne!(config.read16(msix + 2) & 0x8000, 0, "MSI-X enabled");
    vf.bar(bars[0].address, bars[0].len as usize)
}

#[test]
fn vpci_client_negotiates_enters_d0_and_reads_the_function_through_the_window() {
    let (_host, _vf, mut bus) = probed();
    assert_eq!(
        bus.version(),
        protocol::version::V1_4,
        "highest both sides speak"
    );
    assert_eq!(bus.functions().len(), 1);
    let function = *bus.function(0).unwrap();
    assert_eq!(function.pnp_id.vendor_id, 0x1414);
    assert_eq!(function.pnp_id.device_id, 0x00ba);
    assert_eq!(function.pnp_id.base_class, 2, "network controller");
    assert_eq!(
        function.serial_number, SERIAL,
        "serial = instance id's first 32 bits"
    );
    assert_eq!(bus.poll(), Some(VpciEvent::FunctionArrived { wslot: 0 }));
    assert_eq!(bus.config_read32(0, 0).unwrap(), 0x00ba_1414);
    let config = bus.config_space(0).unwrap();
    assert_eq!(config.read16(0), 0x1414);
    assert_eq!(config.read8(0x0b), 2, "class code through the window");
    assert_eq!(bus.counters().malformed, 0);
    assert_eq!(bus.counters().stray_completions, 0);
}

#[test]
fn mana_runs_over_the_vpci_function_with_interrupts_on_the_vectors_we_mapped() {
    let (host, vf, mut bus) = probed();
    let bar0 = set_up_function(&vf, &mut bus);
    let config = ManaConfig {
        name: "mana over vpci".into(),
        hwc_timeout_ns: TIMEOUT_NS,
        ..ManaConfig::default()
    };
    let mut mana = Mana::new(
        bar0,
        host.dma().clone(),
        Box::new(RealTime(Instant::now())),
        config,
    )
    .expect("MANA bring-up through vPCI-placed BAR0");
    assert_eq!(mana.mac_address(), MacAddress(MAC));
    assert_eq!(mana.link_state(), LinkState::Up);
    let mut vectors = Vec::new();
    while let Some(interrupt) = vf.interrupts.get_next_interrupt() {
        vectors.push(interrupt.vector);
    }
    assert!(
        vectors.contains(&u32::from(VECTORS[0])),
        "the HWC EQ's MSI-X entry raised our vector {:#x}: {vectors:x?}",
        VECTORS[0]
    );
    assert!(
        vectors
            .iter()
            .all(|vector| VECTORS.contains(&(*vector as u8)))
    );

    // D3 stops decoding, D0 brings it back; the driver still works afterwards.
    bus.set_power(0, false).expect("D3");
    assert_eq!(
        bus.config_read32(0, 0x04).unwrap() & 0x2,
        0,
        "memory decoding off in D3"
    );
    bus.set_power(0, true).expect("D0");
    assert_ne!(bus.config_read32(0, 0x04).unwrap() & 0x2, 0);
    mana.poll(0);
    assert_eq!(mana.link_state(), LinkState::Up);
    mana.stop();
    bus.release_resources(0).expect("RELEASE_RESOURCES");
    bus.stop().expect("FDO_D0_EXIT");
}

#[test]
fn a_rescinded_vpci_channel_ends_the_function_and_the_host_revoke_completes() {
    let (host, mut vf, mut bus) = probed();
    let bar0 = set_up_function(&vf, &mut bus);
    assert_eq!(bar0.read32(0), bar0.read32(0), "BAR0 decodes");
    let _ = bus.poll();
    let revoked = vf.revoke(&host);
    let start = Instant::now();
    let event = loop {
        if let Some(event) = bus.poll() {
            break event;
        }
        assert!(start.elapsed() < WAIT, "no rescind reached the vPCI client");
        std::thread::sleep(Duration::from_millis(1));
    };
    assert_eq!(event, VpciEvent::Rescinded);
    assert!(bus.config_read32(0, 0).is_err());
    assert_eq!(
        bar0.read32(0),
        u32::MAX,
        "a removed function reads all-ones"
    );
    assert!(bus.resource_requirements(0).is_err());
    // Closing the rescinded channel releases the relid; then the host's revoke finishes.
    let mut port = bus.into_port();
    port.close().expect("close after rescind");
    assert!(revoked.recv_timeout(WAIT).is_ok(), "host revoke completed");
}

#[test]
fn bars_placed_outside_the_function_masks_are_refused_by_the_host() {
    let (_host, _vf, mut bus) = probed();
    // BAR0 needs 8 KiB alignment: an address at 4 KiB is rejected with a status, not a hang.
    let mut bars = [BarPlacement::default(); 6];
    bars[0] = BarPlacement {
        address: MMIO_START + 0x1000,
        len: 0x2000,
    };
    let error = bus.assign_resources(0, &bars).unwrap_err();
    assert!(
        matches!(
            error,
            vmbus::Error::VpciRefused {
                what: "ASSIGNED_RESOURCES",
                ..
            }
        ),
        "{error:?}"
    );
    // The channel stays usable.
    assert_eq!(bus.config_read32(0, 0).unwrap(), 0x00ba_1414);
}
