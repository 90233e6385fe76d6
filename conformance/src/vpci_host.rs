//! OpenVMM's `vpci` server with a `gdma` MANA device behind it, offered on a running
//! `vmbus_server` — what Hyper-V does to hand a guest an SR-IOV VF — and the guest-side
//! plumbing our code needs there: the vPCI channel as a `vmbus::vpci::VpciPort`, and the config
//! window and the BARs as `RegisterIo` routed to the emulators (the test plays the CPU's MMIO).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use chipset_device::mmio::{ExternallyManagedMmioIntercepts, MmioIntercept};
use closeable_mutex::CloseableMutex;
use gdma::{GdmaDevice, VportConfig};
use guestmem::GuestMemory;
use guid::Guid;
use net_backend::Endpoint;
use net_device::RegisterIo;
use pal_async::DefaultDriver;
use pal_async::task::Spawn;
use pci_core::msi::MsiConnection;
use vmbus::hypervisor::ChannelEvents;
use vmbus::packet::{IncomingPacket, OutgoingPacket};
use vmbus::vpci::VpciPort;
use vmbus::{Channel, ClientEvent, Error, VmbusClient};
use vmbus_server::VmbusServerControl;
use vmcore::vm_task::{SingleDriverBackend, VmTaskDriverSource};
use vmcore::vpci_msi::VpciInterruptMapper;
use vpci::bus::{VpciBusConfig, VpciBusDevice};
use vpci::test_helpers::TestVpciInterruptController;

use crate::synic::BridgePort;
use crate::vmbus_host::VmbusHost;

type Revoke = Box<dyn FnOnce() -> Pin<Box<dyn Future<Output = ()> + Send>> + Send>;

/// A `gdma` device on its own vPCI bus, offered on a `vmbus_server`.
pub struct GdmaOnVpci {
    /// The MANA emulator (BAR MMIO goes straight to it once the BARs are placed).
    pub device: Arc<CloseableMutex<GdmaDevice>>,
    /// The vPCI bus device (decodes the config window once FDO_D0_ENTRY mapped it).
    pub bus_device: Arc<Mutex<VpciBusDevice>>,
    /// Records the interrupts the device raised, as vectors the guest asked for.
    pub interrupts: Arc<TestVpciInterruptController>,
    /// Set when the function is gone: its BARs then read all-ones, like removed hardware.
    pub removed: Arc<AtomicBool>,
    revoke: Option<Revoke>,
}

impl GdmaOnVpci {
    /// Builds `gdma` with one vPort (`mac`, `endpoint`), puts it behind a vPCI bus with
    /// `instance_id` (serial number = its first 32 bits) and offers the bus on `host`.
    pub fn offer(
        host: &VmbusHost,
        instance_id: Guid,
        mac: [u8; 6],
        endpoint: Box<dyn Endpoint>,
    ) -> GdmaOnVpci {
        futures::executor::block_on(Self::offer_on(
            host.driver().clone(),
            host.dma().memory().clone(),
            host.control(),
            instance_id,
            mac,
            endpoint,
        ))
    }

    /// [`GdmaOnVpci::offer`] from within the host's executor (e.g. netvsp's
    /// `VirtualFunction::guest_ready_for_device`), where blocking on the server would deadlock.
    pub async fn offer_on(
        driver: DefaultDriver,
        memory: GuestMemory,
        control: Arc<VmbusServerControl>,
        instance_id: Guid,
        mac: [u8; 6],
        endpoint: Box<dyn Endpoint>,
    ) -> GdmaOnVpci {
        let source = VmTaskDriverSource::new(SingleDriverBackend::new(driver));
        let interrupts = TestVpciInterruptController::new();
        let connection = MsiConnection::new();
        connection.connect(interrupts.signal_msi());
        let device = GdmaDevice::new(
            &source,
            memory,
            &connection.target(),
            vec![VportConfig {
                mac_address: mac.into(),
                endpoint,
            }],
            &mut ExternallyManagedMmioIntercepts,
        );
        let device = Arc::new(CloseableMutex::new(device));
        let (bus_device, channel) = VpciBusDevice::new(
            VpciBusConfig {
                instance_id,
                vtom: None,
                vnode: None,
            },
            device.clone(),
            &mut ExternallyManagedMmioIntercepts,
            VpciInterruptMapper::new(interrupts.clone()),
        )
        .expect("gdma is a PCI device");
        let handle = vmbus_channel::simple::offer_simple_device(&source, &*control, channel)
            .await
            .expect("vpci offer accepted by vmbus_server");
        handle.start();
        let revoke: Revoke = Box::new(move || {
            Box::pin(async move {
                let _ = handle.revoke().await;
            })
        });
        GdmaOnVpci {
            device,
            bus_device: Arc::new(Mutex::new(bus_device)),
            interrupts,
            removed: Arc::new(AtomicBool::new(false)),
            revoke: Some(revoke),
        }
    }

    /// Revokes the vPCI channel (the guest sees RESCIND_CHANNELOFFER) and marks the function
    /// removed; the receiver yields once the host's revoke finished (after the guest released
    /// the channel).
    pub fn revoke(&mut self, host: &VmbusHost) -> mpsc::Receiver<()> {
        self.removed.store(true, Ordering::SeqCst);
        let (done_send, done_recv) = mpsc::channel();
        if let Some(revoke) = self.revoke.take() {
            host.driver()
                .spawn("revoke-vpci", async move {
                    revoke().await;
                    let _ = done_send.send(());
                })
                .detach();
        }
        done_recv
    }

    /// The config window at `base` (what FDO_D0_ENTRY named).
    pub fn window(&self, base: u64) -> ConfigWindow {
        ConfigWindow {
            bus_device: self.bus_device.clone(),
            base,
        }
    }

    /// A BAR placed at `base`, `len` bytes.
    pub fn bar(&self, base: u64, len: usize) -> BarIo {
        BarIo {
            device: self.device.clone(),
            removed: self.removed.clone(),
            base,
            len,
        }
    }
}

/// The two-page vPCI config window, decoded by OpenVMM's vPCI bus device.
#[derive(Clone)]
pub struct ConfigWindow {
    bus_device: Arc<Mutex<VpciBusDevice>>,
    base: u64,
}

impl ConfigWindow {
    fn read(&self, offset: usize, bytes: &mut [u8]) {
        bytes.fill(0xff);
        let _ = self
            .bus_device
            .lock()
            .unwrap()
            .mmio_read(self.base + offset as u64, bytes);
    }

    fn write(&self, offset: usize, bytes: &[u8]) {
        let _ = self
            .bus_device
            .lock()
            .unwrap()
            .mmio_write(self.base + offset as u64, bytes);
    }
}

impl RegisterIo for ConfigWindow {
    fn read32(&self, offset: usize) -> u32 {
        let mut bytes = [0u8; 4];
        self.read(offset, &mut bytes);
        u32::from_le_bytes(bytes)
    }

    fn write32(&self, offset: usize, value: u32) {
        self.write(offset, &value.to_le_bytes());
    }

    fn write16(&self, offset: usize, value: u16) {
        self.write(offset, &value.to_le_bytes());
    }

    fn write8(&self, offset: usize, value: u8) {
        self.write(offset, &[value]);
    }

    fn len(&self) -> usize {
        vmbus::vpci::protocol::WINDOW_LEN
    }
}

/// A BAR of the `gdma` device; reads all-ones once the function is removed.
#[derive(Clone)]
pub struct BarIo {
    device: Arc<CloseableMutex<GdmaDevice>>,
    removed: Arc<AtomicBool>,
    base: u64,
    len: usize,
}

impl BarIo {
    fn usable(&self, offset: usize, width: usize) -> bool {
        !self.removed.load(Ordering::SeqCst) && offset + width <= self.len
    }
}

impl RegisterIo for BarIo {
    fn read32(&self, offset: usize) -> u32 {
        if !self.usable(offset, 4) {
            return u32::MAX;
        }
        let mut bytes = [0xffu8; 4];
        let _ = self
            .device
            .lock()
            .mmio_read(self.base + offset as u64, &mut bytes);
        u32::from_le_bytes(bytes)
    }

    fn write32(&self, offset: usize, value: u32) {
        if self.usable(offset, 4) {
            let _ = self
                .device
                .lock()
                .mmio_write(self.base + offset as u64, &value.to_le_bytes());
        }
    }

    fn write64(&self, offset: usize, value: u64) {
        if self.usable(offset, 8) {
            let _ = self
                .device
                .lock()
                .mmio_write(self.base + offset as u64, &value.to_le_bytes());
        }
    }

    fn len(&self) -> usize {
        self.len
    }
}

/// The guest's vPCI channel: our VMBus client and the open channel, driven like the kernel
/// would (waits woken by host activity, rescinds noticed through the client).
pub struct GuestVpciPort {
    /// The VMBus client (owned: the vPCI test has no other channel user).
    pub client: VmbusClient<BridgePort>,
    /// The open channel (taken by [`GuestVpciPort::close`]).
    pub channel: Option<Channel>,
    relid: u32,
    start: Instant,
    rescinded: bool,
    events: ChannelEvents,
}

impl GuestVpciPort {
    /// Wraps an open channel `relid`.
    pub fn new(client: VmbusClient<BridgePort>, channel: Channel) -> GuestVpciPort {
        GuestVpciPort {
            relid: channel.relid(),
            client,
            channel: Some(channel),
            start: Instant::now(),
            rescinded: false,
            events: ChannelEvents::new(),
        }
    }

    fn poll_client(&mut self) {
        self.client.take_channel_events(&mut self.events);
        self.events.take(self.relid);
        while let Some(event) = self.client.poll() {
            if event == (ClientEvent::Rescinded { relid: self.relid }) {
                self.rescinded = true;
            }
        }
    }

    /// Closes the channel (after a rescind this also releases the relid to the host).
    pub fn close(&mut self) -> Result<(), Error> {
        if let Some(channel) = self.channel.take() {
            self.client.close_channel(channel)?;
        }
        Ok(())
    }
}

impl VpciPort for GuestVpciPort {
    fn send(&mut self, packet: &OutgoingPacket<'_>) -> Result<(), Error> {
        match self.channel.as_mut() {
            Some(channel) => channel.send(packet),
            None => Err(Error::Rescinded { relid: self.relid }),
        }
    }

    fn receive<'b>(
        &mut self,
        buffer: &'b mut Vec<u8>,
    ) -> Result<Option<IncomingPacket<'b>>, Error> {
        match self.channel.as_mut() {
            Some(channel) => channel.receive(buffer),
            None => Ok(None),
        }
    }

    fn now_ns(&mut self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    fn wait(&mut self, deadline_ns: u64) {
        self.poll_client();
        let seen = self.client.port().activity();
        let left = deadline_ns.saturating_sub(self.now_ns()).min(2_000_000);
        self.client
            .port()
            .wait_for_activity(seen, Duration::from_nanos(left));
    }

    fn is_rescinded(&mut self) -> bool {
        self.poll_client();
        self.rescinded
    }
}
