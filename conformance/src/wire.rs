//! One simulated wire behind two OpenVMM backends: netvsp's endpoint (synthetic) and the VF's
//! `gdma` vPort endpoint, steering the peer's frames the way a Hyper-V host's virtual switch does.
//!
//! netvsp tells its endpoint where the guest wants its traffic with
//! `Endpoint::set_data_path_to_guest_vf` (on the guest's SWITCH_DATA_PATH, and back to
//! synthetic when the VF goes away). The wire keeps that flag: unicast frames from the peer go
//! to the VF's queue while it is set, to netvsp's otherwise; broadcast and multicast always go
//! to netvsp (they keep arriving on the synthetic path while the VF is active,
//! `hyperv-vmbus-netvsc.md` §3.7). Frames steered to a VF that is gone, or left in a removed
//! VF's queue, are lost, as on the real host. What either endpoint transmits goes to the peer in
//! the order it was sent.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use async_trait::async_trait;
use net_backend::{
    BufferAccess, Endpoint, Queue, QueueConfig, RssConfig, RxId, RxMetadata, TxError, TxId,
    TxOffloadSupport, TxSegment, linearize,
};

/// Which backend a frame went through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// netvsp's endpoint.
    Synthetic,
    /// The VF's vPort endpoint.
    Vf,
}

/// Frame counts per side and direction (monotonic): the host's view of which path carried what.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WireCounters {
    /// Peer frames queued for netvsp.
    pub to_guest_synthetic: u64,
    /// Peer frames queued for the VF.
    pub to_guest_vf: u64,
    /// Peer frames steered to the VF while no VF port existed (lost).
    pub to_guest_vf_dropped: u64,
    /// Peer frames left in a removed VF's queue (lost).
    pub vf_queue_discarded: u64,
    /// Peer frames the VF's device took from its queue (into a guest receive buffer).
    pub vf_taken: u64,
    /// Frames the guest sent through netvsp.
    pub from_guest_synthetic: u64,
    /// Bytes the guest sent through netvsp.
    pub from_guest_synthetic_bytes: u64,
    /// Frames the guest sent through the VF.
    pub from_guest_vf: u64,
    /// Bytes the guest sent through the VF.
    pub from_guest_vf_bytes: u64,
    /// Times netvsp set the data path (either way).
    pub data_path_changes: u64,
}

#[derive(Default)]
struct Port {
    to_guest: VecDeque<Vec<u8>>,
    waker: Option<Waker>,
}

impl Port {
    fn push(&mut self, frame: Vec<u8>) {
        self.to_guest.push_back(frame);
        if let Some(waker) = self.waker.take() {
            waker.wake();
        }
    }
}

#[derive(Default)]
struct State {
    guest_mac: [u8; 6],
    data_path_to_vf: bool,
    /// Every data-path setting netvsp made, in order (true = VF).
    data_path_history: Vec<bool>,
    synthetic: Port,
    /// The current VF port (its generation and queue); `None` while no VF exists.
    vf: Option<(u64, Port)>,
    next_generation: u64,
    to_peer: VecDeque<(Side, Vec<u8>)>,
    counters: WireCounters,
}

/// The wire; clones share it.
#[derive(Clone)]
pub struct Wire(Arc<Mutex<State>>);

impl Wire {
    /// A wire whose guest owns `guest_mac` (the synthetic NIC's and its VF's MAC).
    pub fn new(guest_mac: [u8; 6]) -> Wire {
        Wire(Arc::new(Mutex::new(State {
            guest_mac,
            ..State::default()
        })))
    }

    /// netvsp's endpoint.
    pub fn synthetic_endpoint(&self) -> Box<dyn Endpoint> {
        Box::new(WireEndpoint {
            wire: self.clone(),
            side: SideKey::Synthetic,
        })
    }

    /// A new VF port (a freshly offered VF); replaces the previous one, whose queued frames
    /// are lost.
    pub fn vf_endpoint(&self) -> Box<dyn Endpoint> {
        let mut state = self.0.lock().unwrap();
        state.next_generation += 1;
        let generation = state.next_generation;
        if let Some((_, old)) = state.vf.replace((generation, Port::default())) {
            state.counters.vf_queue_discarded += old.to_guest.len() as u64;
        }
        Box::new(WireEndpoint {
            wire: self.clone(),
            side: SideKey::Vf(generation),
        })
    }

    /// The VF was removed: its port and queued frames are gone.
    pub fn remove_vf(&self) {
        let mut state = self.0.lock().unwrap();
        if let Some((_, old)) = state.vf.take() {
            state.counters.vf_queue_discarded += old.to_guest.len() as u64;
        }
    }

    /// A frame from the peer, steered as the host's switch would.
    pub fn send_to_guest(&self, frame: Vec<u8>) {
        let mut state = self.0.lock().unwrap();
        let unicast_to_guest = frame.len() >= 14 && frame[..6] == state.guest_mac;
        if unicast_to_guest && state.data_path_to_vf {
            match state.vf.as_mut() {
                Some((_, port)) => {
                    port.push(frame);
                    state.counters.to_guest_vf += 1;
                }
                None => state.counters.to_guest_vf_dropped += 1,
            }
        } else {
            state.synthetic.push(frame);
            state.counters.to_guest_synthetic += 1;
        }
    }

    /// Takes what the guest sent (either side), oldest first.
    pub fn take_from_guest(&self) -> Vec<(Side, Vec<u8>)> {
        self.0.lock().unwrap().to_peer.drain(..).collect()
    }

    /// Counters.
    pub fn counters(&self) -> WireCounters {
        self.0.lock().unwrap().counters
    }

    /// Where netvsp steers now (true = VF).
    pub fn data_path_to_vf(&self) -> bool {
        self.0.lock().unwrap().data_path_to_vf
    }

    /// Every data-path setting netvsp made, in order (true = VF).
    pub fn data_path_history(&self) -> Vec<bool> {
        self.0.lock().unwrap().data_path_history.clone()
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum SideKey {
    Synthetic,
    Vf(u64),
}

struct WireEndpoint {
    wire: Wire,
    side: SideKey,
}

impl inspect::InspectMut for WireEndpoint {
    fn inspect_mut(&mut self, request: inspect::Request<'_>) {
        request.ignore();
    }
}

#[async_trait]
impl Endpoint for WireEndpoint {
    fn endpoint_type(&self) -> &'static str {
        "tandem-hyperv-wire"
    }

    async fn get_queues(
        &mut self,
        config: Vec<QueueConfig>,
        _rss: Option<&RssConfig<'_>>,
        queues: &mut Vec<Box<dyn Queue>>,
    ) -> anyhow::Result<()> {
        queues.clear();
        // One queue carries everything (the tests ask for one); further ones stay idle.
        for (index, _) in config.into_iter().enumerate() {
            queues.push(Box::new(WireQueue {
                wire: self.wire.clone(),
                side: self.side,
                receives: index == 0,
                rx_avail: VecDeque::new(),
                rx_done: VecDeque::new(),
            }));
        }
        Ok(())
    }

    async fn stop(&mut self) {}

    fn is_ordered(&self) -> bool {
        true
    }

    fn tx_offload_support(&self) -> TxOffloadSupport {
        // Nothing offloaded: frames reach the peer stack as the guest built them.
        TxOffloadSupport {
            ipv4_header: false,
            tcp: false,
            udp: false,
            tso: false,
            uso: false,
        }
    }

    async fn set_data_path_to_guest_vf(&self, use_vf: bool) -> anyhow::Result<()> {
        if self.side == SideKey::Synthetic {
            let mut state = self.wire.0.lock().unwrap();
            state.data_path_to_vf = use_vf;
            state.data_path_history.push(use_vf);
            state.counters.data_path_changes += 1;
        }
        Ok(())
    }

    async fn get_data_path_to_guest_vf(&self) -> anyhow::Result<bool> {
        Ok(self.wire.0.lock().unwrap().data_path_to_vf)
    }
}

struct WireQueue {
    wire: Wire,
    side: SideKey,
    receives: bool,
    rx_avail: VecDeque<RxId>,
    rx_done: VecDeque<RxId>,
}

impl inspect::InspectMut for WireQueue {
    fn inspect_mut(&mut self, request: inspect::Request<'_>) {
        request.ignore();
    }
}

impl State {
    fn port(&mut self, side: SideKey) -> Option<&mut Port> {
        match side {
            SideKey::Synthetic => Some(&mut self.synthetic),
            SideKey::Vf(generation) => match self.vf.as_mut() {
                Some((current, port)) if *current == generation => Some(port),
                _ => None,
            },
        }
    }
}

impl Queue for WireQueue {
    fn poll_ready(&mut self, cx: &mut Context<'_>, pool: &mut dyn BufferAccess) -> Poll<()> {
        if self.receives {
            let mut state = self.wire.0.lock().unwrap();
            let mut taken = 0;
            if let Some(port) = state.port(self.side) {
                while !self.rx_avail.is_empty() && !port.to_guest.is_empty() {
                    let id = self.rx_avail.pop_front().expect("checked non-empty");
                    let frame = port.to_guest.pop_front().expect("checked non-empty");
                    let metadata = RxMetadata {
                        len: frame.len(),
                        ..RxMetadata::default()
                    };
                    pool.write_packet(id, &metadata, &frame);
                    self.rx_done.push_back(id);
                    if matches!(self.side, SideKey::Vf(_)) {
                        taken += 1;
                    }
                }
                if self.rx_done.is_empty() {
                    port.waker = Some(cx.waker().clone());
                }
            }
            state.counters.vf_taken += taken;
        }
        if self.rx_done.is_empty() {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    }

    fn rx_avail(&mut self, _pool: &mut dyn BufferAccess, done: &[RxId]) {
        self.rx_avail.extend(done.iter().copied());
    }

    fn rx_poll(
        &mut self,
        _pool: &mut dyn BufferAccess,
        packets: &mut [RxId],
    ) -> anyhow::Result<usize> {
        let count = packets.len().min(self.rx_done.len());
        for (slot, id) in packets.iter_mut().zip(self.rx_done.drain(..count)) {
            *slot = id;
        }
        Ok(count)
    }

    fn tx_avail(
        &mut self,
        pool: &mut dyn BufferAccess,
        mut segments: &[TxSegment],
    ) -> anyhow::Result<(bool, usize)> {
        let total = segments.len();
        while !segments.is_empty() {
            let frame = linearize(pool, &mut segments)?;
            let mut state = self.wire.0.lock().unwrap();
            let side = match self.side {
                SideKey::Synthetic => {
                    state.counters.from_guest_synthetic += 1;
                    state.counters.from_guest_synthetic_bytes += frame.len() as u64;
                    Side::Synthetic
                }
                SideKey::Vf(_) => {
                    state.counters.from_guest_vf += 1;
                    state.counters.from_guest_vf_bytes += frame.len() as u64;
                    Side::Vf
                }
            };
            state.to_peer.push_back((side, frame));
        }
        Ok((true, total))
    }

    fn tx_poll(
        &mut self,
        _pool: &mut dyn BufferAccess,
        _done: &mut [TxId],
    ) -> Result<usize, TxError> {
        Ok(0)
    }
}
