//! Our netvsc's VF association and data-path switch against netvsp with a virtual function:
//! the association after RNDIS initialisation (our SR-IOV capability), netvsp's 1 s delay
//! before it exposes the VF, SWITCH_DATA_PATH completed only after netvsp's endpoint switched,
//! and the VF's removal (netvsp moves the path back and withdraws the association).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::StreamExt;
use mesh::rpc::{Rpc, RpcSend};
use net_device::HostPath;
use netvsc_fallback::netvsc::{Netvsc, NetvscConfig, SyntheticCause, VfAssociation, VfEvent};

use super::harness::{HostOptions, NetvspChannel, NetvspHost};

const SERIAL: u32 = 0x5a0c_3e21;
const WAIT: Duration = Duration::from_secs(15);

/// A VF whose presence the test controls; `guest_ready_for_device` only counts (the vPCI side
/// is proved in the `vpci` module).
struct TestVf {
    id: Arc<Mutex<Option<u32>>>,
    ready: Arc<AtomicUsize>,
    changes: mesh::Receiver<Rpc<(), ()>>,
}

#[async_trait]
impl netvsp::VirtualFunction for TestVf {
    async fn id(&self) -> Option<u32> {
        *self.id.lock().unwrap()
    }

    async fn guest_ready_for_device(&mut self) {
        self.ready.fetch_add(1, Ordering::SeqCst);
    }

    async fn wait_for_state_change(&mut self) -> Rpc<(), ()> {
        match self.changes.next().await {
            Some(rpc) => rpc,
            None => std::future::pending().await,
        }
    }
}

struct VfControl {
    id: Arc<Mutex<Option<u32>>>,
    ready: Arc<AtomicUsize>,
    changes: mesh::Sender<Rpc<(), ()>>,
}

impl VfControl {
    /// Changes the VF's presence and tells netvsp, without waiting for it to be handled.
    fn set(&self, id: Option<u32>) {
        *self.id.lock().unwrap() = id;
        let pending = self.changes.call(|rpc| rpc, ());
        std::thread::spawn(move || {
            let _ = futures::executor::block_on(pending);
        });
    }
}

fn start() -> (NetvspHost, Netvsc<NetvspChannel>, VfControl) {
    let (send, receive) = mesh::channel();
    let control = VfControl {
        id: Arc::new(Mutex::new(Some(SERIAL))),
        ready: Arc::new(AtomicUsize::new(0)),
        changes: send,
    };
    let vf = TestVf {
        id: control.id.clone(),
        ready: control.ready.clone(),
        changes: receive,
    };
    let (host, channel) = NetvspHost::start_with_vf(HostOptions::default(), Some(Box::new(vf)));
    match Netvsc::new(channel, &host.dma, NetvscConfig::default()) {
        Ok(device) => (host, device, control),
        Err((error, _)) => panic!("netvsc bring-up against netvsp failed: {error}"),
    }
}

fn poll_until(
    device: &mut Netvsc<NetvspChannel>,
    what: &str,
    mut done: impl FnMut(&mut Netvsc<NetvspChannel>) -> bool,
) {
    let started = Instant::now();
    loop {
        net_device::NetDevice::poll(device, 0);
        if done(device) {
            return;
        }
        assert!(started.elapsed() < WAIT, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_micros(500));
    }
}

fn events(device: &mut Netvsc<NetvspChannel>) -> Vec<VfEvent> {
    std::iter::from_fn(|| device.take_vf_event()).collect()
}

#[test]
fn netvsp_associates_the_vf_and_switches_the_data_path_only_on_our_request() {
    let started = Instant::now();
    let (host, mut device, vf) = start();
    poll_until(&mut device, "the VF association", |device| {
        device.vf_association().is_some()
    });
    assert_eq!(
        device.vf_association(),
        Some(VfAssociation {
            allocated: true,
            serial_number: SERIAL
        })
    );
    assert_eq!(
        events(&mut device),
        [VfEvent::Associated {
            serial_number: SERIAL
        }]
    );
    poll_until(&mut device, "netvsp exposing the VF", |_| {
        vf.ready.load(Ordering::SeqCst) > 0
    });
    let exposed_after = started.elapsed();
    assert!(
        exposed_after >= Duration::from_millis(900),
        "netvsp waits ~1 s before exposing the VF ({exposed_after:?})"
    );
    assert!(host.endpoint.lock().unwrap().data_path_to_vf.is_empty());

    assert!(device.request_data_path(true));
    assert_eq!(device.data_path(), HostPath::SwitchingToVf);
    poll_until(&mut device, "the switch completion", |device| {
        device.data_path() == HostPath::Vf
    });
    assert_eq!(
        host.endpoint.lock().unwrap().data_path_to_vf,
        [true],
        "netvsp switched its endpoint before completing"
    );
    assert_eq!(events(&mut device), [VfEvent::DataPathVf]);

    assert!(device.request_data_path(false));
    poll_until(&mut device, "the switch back", |device| {
        device.data_path() == HostPath::Synthetic
    });
    assert_eq!(host.endpoint.lock().unwrap().data_path_to_vf, [true, false]);
    assert_eq!(
        events(&mut device),
        [VfEvent::DataPathSynthetic(SyntheticCause::Requested)]
    );
    assert_eq!(device.data_path_counters().switch_completions, 2);
    assert_eq!(device.data_path_counters().stale_completions, 0);
}

#[test]
fn removing_the_vf_moves_the_path_back_and_withdraws_the_association() {
    let (host, mut device, vf) = start();
    poll_until(&mut device, "netvsp exposing the VF", |_| {
        vf.ready.load(Ordering::SeqCst) > 0
    });
    assert!(device.request_data_path(true));
    poll_until(&mut device, "the switch to the VF", |device| {
        device.data_path() == HostPath::Vf
    });
    let _ = events(&mut device);
    vf.set(None);
    poll_until(&mut device, "the withdrawal", |device| {
        device
            .vf_association()
            .is_some_and(|association| !association.allocated)
    });
    assert_eq!(device.data_path(), HostPath::Synthetic);
    let seen = events(&mut device);
    assert!(
        seen.contains(&VfEvent::Withdrawn {
            serial_number: SERIAL
        }),
        "{seen:?}"
    );
    assert!(
        seen.iter()
            .any(|event| matches!(event, VfEvent::DataPathSynthetic(_))),
        "{seen:?}"
    );
    assert_eq!(
        host.endpoint.lock().unwrap().data_path_to_vf.last(),
        Some(&false),
        "netvsp moved its endpoint back"
    );
    assert!(!device.request_data_path(true), "no VF to switch to");
    // The VF comes back: a new association, and the path can move again.
    vf.set(Some(SERIAL));
    poll_until(&mut device, "the re-association", |device| {
        device
            .vf_association()
            .is_some_and(|association| association.allocated)
    });
    poll_until(&mut device, "netvsp exposing the VF again", |_| {
        vf.ready.load(Ordering::SeqCst) > 1
    });
    assert!(device.request_data_path(true));
    poll_until(&mut device, "the switch to the returned VF", |device| {
        device.data_path() == HostPath::Vf
    });
}
