//! OpenVMM's VMBus host in-process: `vmbus_server` on its own executor thread, behind a
//! [`SynicBridge`], over a [`GuestDma`]'s guest memory, with devices (netvsp) offered through
//! `server.control()` — what a Hyper-V host is to our guest code.

use std::sync::mpsc;
use std::time::Duration;

use guid::Guid;
use net_backend::Endpoint;
use net_backend_resources::mac_address::MacAddress;
use netvsp::Nic;
use pal_async::task::Spawn;
use pal_async::{DefaultDriver, DefaultPool};
use vmbus_channel::channel::{ChannelHandle, offer_channel};
use vmbus_core::MaxVersionInfo;
use vmbus_server::VmbusServer;
use vmcore::vm_task::{SingleDriverBackend, VmTaskDriverSource};

use crate::GuestDma;
use crate::synic::{BridgePort, SynicBridge};

/// A running `vmbus_server` and the devices offered on it.
pub struct VmbusHost {
    dma: GuestDma,
    bridge: SynicBridge,
    driver: DefaultDriver,
    server: VmbusServer,
    nic: Option<ChannelHandle<Nic>>,
}

impl VmbusHost {
    /// Starts a server over `dma`'s guest memory (no MNF, every version allowed).
    pub fn start(dma: GuestDma) -> VmbusHost {
        Self::start_with_max_version(dma, None)
    }

    /// Starts a server that refuses versions above `max_version` (`major << 16 | minor`), as
    /// an older Hyper-V host would.
    pub fn start_with_max_version(dma: GuestDma, max_version: Option<u32>) -> VmbusHost {
        // The executor thread runs the server and devices while the test thread plays the
        // guest, which polls synchronously like the kernel does.
        let (_thread, driver) = DefaultPool::spawn_on_thread("openvmm-host");
        let bridge = SynicBridge::new();
        let server = VmbusServer::builder(
            driver.clone(),
            std::sync::Arc::new(bridge.clone()),
            dma.memory().clone(),
        )
        .max_version(max_version.map(MaxVersionInfo::new))
        .build()
        .expect("vmbus_server builds");
        server.start();
        VmbusHost {
            dma,
            bridge,
            driver,
            server,
            nic: None,
        }
    }

    /// The guest memory allocator (GPA = offset into the server's guest memory).
    pub fn dma(&self) -> &GuestDma {
        &self.dma
    }

    /// The bridge (counters, registered ports).
    pub fn bridge(&self) -> &SynicBridge {
        &self.bridge
    }

    /// A fresh guest-side port for `VmbusClient::connect`.
    pub fn guest_port(&self) -> BridgePort {
        self.bridge.guest_port()
    }

    /// The server's control plane (a `ParentBus` to offer further devices on, e.g. vPCI).
    pub fn control(&self) -> std::sync::Arc<vmbus_server::VmbusServerControl> {
        self.server.control()
    }

    /// The executor the host side runs on.
    pub fn driver(&self) -> &DefaultDriver {
        &self.driver
    }

    /// Offers a netvsp NIC with `endpoint` (e.g. `NullEndpoint`) as a netvsc channel.
    pub fn offer_nic(&mut self, endpoint: Box<dyn Endpoint>, instance_id: Guid, mac: [u8; 6]) {
        self.offer_nic_with_vf(endpoint, instance_id, mac, None);
    }

    /// Like [`VmbusHost::offer_nic`], with a virtual function behind the NIC (netvsp then
    /// announces it with VF association messages and asks it to expose itself to the guest).
    pub fn offer_nic_with_vf(
        &mut self,
        endpoint: Box<dyn Endpoint>,
        instance_id: Guid,
        mac: [u8; 6],
        virtual_function: Option<Box<dyn netvsp::VirtualFunction>>,
    ) {
        let source = VmTaskDriverSource::new(SingleDriverBackend::new(self.driver.clone()));
        let mut builder = Nic::builder();
        if let Some(virtual_function) = virtual_function {
            builder = builder.virtual_function(virtual_function);
        }
        let nic = builder.build(&source, instance_id, endpoint, MacAddress::from(mac), 0);
        let control = self.server.control();
        let handle = futures::executor::block_on(offer_channel(&self.driver, &*control, nic))
            .expect("netvsp offer accepted by vmbus_server");
        handle.start();
        self.nic = Some(handle);
    }

    /// Revokes the NIC's offer (the guest sees RESCIND_CHANNELOFFER). The revoke completes
    /// on the host executor once the guest has released the channel; returns a receiver that
    /// yields when it has.
    pub fn revoke_nic(&mut self) -> mpsc::Receiver<()> {
        let (done_send, done_recv) = mpsc::channel();
        if let Some(handle) = self.nic.take() {
            self.driver
                .spawn("revoke-nic", async move {
                    let _ = handle.revoke().await;
                    let _ = done_send.send(());
                })
                .detach();
        }
        done_recv
    }

    /// Waits up to `timeout` for a revoke started by [`VmbusHost::revoke_nic`] to finish.
    pub fn wait_revoked(done: &mpsc::Receiver<()>, timeout: Duration) -> bool {
        done.recv_timeout(timeout).is_ok()
    }
}
