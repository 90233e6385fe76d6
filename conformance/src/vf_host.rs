//! The host's VF manager for netvsp: a `netvsp::VirtualFunction` whose `guest_ready_for_device`
//! offers a `gdma` MANA function on its own vPCI bus on the same `vmbus_server` (what Hyper-V
//! does ~1 s after the VF association), and the test's handle to make the VF come and go.

use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use futures::StreamExt;
use guestmem::GuestMemory;
use guid::Guid;
use mesh::rpc::{Rpc, RpcSend};
use pal_async::DefaultDriver;
use vmbus_server::VmbusServerControl;

use crate::vmbus_host::VmbusHost;
use crate::vpci_host::GdmaOnVpci;
use crate::wire::Wire;

/// What the VF manager and the test share.
#[derive(Default)]
pub struct VfState {
    /// The VF exists (netvsp's `id()` returns the serial).
    pub present: bool,
    /// Its hardware is gone (surprise removal) until it is made present again: netvsp asking
    /// for it again is not answered with a new vPCI bus.
    pub hardware_gone: bool,
    /// The vPCI bus currently offered (cleared by the test when it revoked it).
    pub exposed: Option<GdmaOnVpci>,
    /// `guest_ready_for_device` calls.
    pub ready_calls: u64,
    /// vPCI buses offered.
    pub offers: u64,
}

/// The test's side of the VF manager.
#[derive(Clone)]
pub struct VfControl {
    /// Shared state (the offered bus is reached through it for MMIO and revoke).
    pub state: Arc<Mutex<VfState>>,
    changes: mesh::Sender<Rpc<(), ()>>,
    /// The vPCI serial number (netvsp announces it in the VF association).
    pub serial: u32,
}

impl VfControl {
    /// Makes the VF present or absent and tells netvsp; the receiver yields once netvsp
    /// handled the change (data path moved back, association message queued).
    pub fn set_present(&self, present: bool) -> mpsc::Receiver<()> {
        {
            let mut state = self.state.lock().unwrap();
            state.present = present;
            if present {
                state.hardware_gone = false;
            }
        }
        let pending = self.changes.call(|rpc| rpc, ());
        let (done_send, done_recv) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = futures::executor::block_on(pending);
            let _ = done_send.send(());
        });
        done_recv
    }
}

/// The `netvsp::VirtualFunction` given to the NIC.
struct HostVf {
    state: Arc<Mutex<VfState>>,
    changes: mesh::Receiver<Rpc<(), ()>>,
    serial: u32,
    mac: [u8; 6],
    wire: Wire,
    driver: DefaultDriver,
    memory: GuestMemory,
    control: Arc<VmbusServerControl>,
}

#[async_trait]
impl netvsp::VirtualFunction for HostVf {
    async fn id(&self) -> Option<u32> {
        self.state.lock().unwrap().present.then_some(self.serial)
    }

    async fn guest_ready_for_device(&mut self) {
        let generation = {
            let mut state = self.state.lock().unwrap();
            state.ready_calls += 1;
            if !state.present || state.hardware_gone || state.exposed.is_some() {
                return;
            }
            state.offers
        };
        // Each offer is a new bus instance with the same serial (the GUID's first 32 bits).
        let instance_id = Guid {
            data1: self.serial,
            data2: 0x7d44,
            data3: generation as u16,
            data4: [0x9e, 0x0a, 0x1c, 0x2b, 0x3d, 0x4e, 0x5f, 0x60],
        };
        let bus = GdmaOnVpci::offer_on(
            self.driver.clone(),
            self.memory.clone(),
            self.control.clone(),
            instance_id,
            self.mac,
            self.wire.vf_endpoint(),
        )
        .await;
        let mut state = self.state.lock().unwrap();
        state.offers += 1;
        state.exposed = Some(bus);
    }

    async fn wait_for_state_change(&mut self) -> Rpc<(), ()> {
        match self.changes.next().await {
            Some(rpc) => rpc,
            None => std::future::pending().await,
        }
    }
}

/// A VF manager for `host` (present from the start) and its control handle.
pub fn vf_manager(
    host: &VmbusHost,
    serial: u32,
    mac: [u8; 6],
    wire: &Wire,
) -> (Box<dyn netvsp::VirtualFunction>, VfControl) {
    let (send, receive) = mesh::channel();
    let state = Arc::new(Mutex::new(VfState {
        present: true,
        ..VfState::default()
    }));
    let vf = HostVf {
        state: state.clone(),
        changes: receive,
        serial,
        mac,
        wire: wire.clone(),
        driver: host.driver().clone(),
        memory: host.dma().memory().clone(),
        control: host.control(),
    };
    (
        Box::new(vf),
        VfControl {
            state,
            changes: send,
            serial,
        },
    )
}
