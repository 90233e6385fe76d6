//! OpenVMM's netvsp in-process, offered through a mock `ParentBus` (SEAMS.md §1), with an
//! endpoint that captures transmitted frames and injects received ones, and our netvsc driver
//! on top through `vmbus::Channel` rings in the same guest memory.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::StreamExt;
use guid::Guid;
use inspect::InspectMut;
use mesh::rpc::RpcSend;
use net_backend::{
    BufferAccess, Endpoint, EndpointAction, QueueConfig, RxId, RxMetadata, TxError, TxId,
    TxMetadata, TxOffloadSupport, TxSegment,
};
use net_device::{DmaAllocator, DmaRegion};
use netvsc_fallback::netvsc::{Netvsc, NetvscConfig, VmbusChannelControl, VmbusNetvscChannel};
use netvsp::Nic;
use pal_async::DefaultDriver;
use pal_async::DefaultPool;
use tandem_conformance::GuestDma;
use vmbus_channel::bus::{
    ChannelRequest, GpadlRequest, OfferInput, OfferResources, OpenData, OpenRequest, ParentBus,
};
use vmbus_channel::channel::{ChannelHandle, offer_channel};
use vmbus_channel::gpadl::GpadlId;
use vmbus_core::protocol::UserDefinedData;
use vmcore::interrupt::Interrupt;
use vmcore::vm_task::{SingleDriverBackend, VmTaskDriverSource};
use zerocopy::FromZeros;

/// Pages of each ring's data area (plus one control page each).
const RING_DATA_PAGES: usize = 16;
/// How long a control-plane request to the host may take.
const RPC_TIMEOUT: Duration = Duration::from_secs(10);
/// The relid our side uses for the channel (the mock bus has no real relids).
const RELID: u32 = 1;

/// Runs `future` to completion on a helper thread, giving up after `timeout`.
fn call_with_timeout<T: Send + 'static>(
    future: impl std::future::Future<Output = T> + Send + 'static,
    timeout: Duration,
) -> Option<T> {
    let (send, receive) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = send.send(futures::executor::block_on(future));
    });
    receive.recv_timeout(timeout).ok()
}

/// A `ParentBus` that records the offer and hands the device our guest memory.
#[derive(Clone)]
struct MockBus {
    memory: guestmem::GuestMemory,
    offers: Arc<Mutex<Vec<OfferInput>>>,
}

#[async_trait]
impl ParentBus for MockBus {
    async fn add_child(&self, request: OfferInput) -> anyhow::Result<OfferResources> {
        self.offers.lock().unwrap().push(request);
        Ok(OfferResources::new(self.memory.clone(), None))
    }

    fn clone_bus(&self) -> Box<dyn ParentBus> {
        Box::new(self.clone())
    }

    fn use_event(&self) -> bool {
        false
    }
}

/// What the endpoint saw and what it should deliver.
#[derive(Default)]
pub struct EndpointState {
    /// Transmitted frames with their metadata, in order.
    pub transmitted: Vec<(Vec<u8>, TxMetadata)>,
    /// Count transmitted frames without keeping them (benchmarks).
    pub discard: bool,
    /// Frames transmitted so far.
    pub transmitted_frames: u64,
    /// Bytes transmitted so far.
    pub transmitted_bytes: u64,
    received: VecDeque<(Vec<u8>, RxMetadata)>,
    waker: Option<Waker>,
    link: Option<mesh::Sender<Vec<bool>>>,
    /// Every `set_data_path_to_guest_vf` netvsp made (true = to the VF), in order.
    pub data_path_to_vf: Vec<bool>,
}

/// A capture endpoint with everything offloadable, and its shared state.
pub fn capture_endpoint(
    offloads: TxOffloadSupport,
) -> (Box<dyn Endpoint>, Arc<Mutex<EndpointState>>) {
    let (link_send, link_receive) = mesh::channel();
    let state = Arc::new(Mutex::new(EndpointState {
        link: Some(link_send),
        ..EndpointState::default()
    }));
    let endpoint = CaptureEndpoint {
        state: state.clone(),
        link: link_receive,
        pending_link: VecDeque::new(),
        offloads,
    };
    (Box::new(endpoint), state)
}

/// Queues a frame for the guest on an endpoint's state (length filled in).
pub fn inject_into(state: &Mutex<EndpointState>, frame: Vec<u8>, mut metadata: RxMetadata) {
    metadata.len = frame.len();
    let mut state = state.lock().unwrap();
    state.received.push_back((frame, metadata));
    if let Some(waker) = state.waker.take() {
        waker.wake();
    }
}

/// A backend endpoint that keeps transmitted frames (bytes and metadata) and delivers
/// injected ones, written for these tests after netvsp's own test endpoint.
struct CaptureEndpoint {
    state: Arc<Mutex<EndpointState>>,
    link: mesh::Receiver<Vec<bool>>,
    /// Link edges received together and not yet reported (a flap arrives as one batch, so
    /// netvsp sees its edges back to back).
    pending_link: VecDeque<bool>,
    offloads: TxOffloadSupport,
}

impl InspectMut for CaptureEndpoint {
    fn inspect_mut(&mut self, _request: inspect::Request<'_>) {}
}

#[async_trait]
impl Endpoint for CaptureEndpoint {
    fn endpoint_type(&self) -> &'static str {
        "tandem-capture"
    }

    async fn get_queues(
        &mut self,
        config: Vec<QueueConfig>,
        _rss: Option<&net_backend::RssConfig<'_>>,
        queues: &mut Vec<Box<dyn net_backend::Queue>>,
    ) -> anyhow::Result<()> {
        queues.clear();
        for _ in config {
            queues.push(Box::new(CaptureQueue {
                state: self.state.clone(),
                rx_ids: VecDeque::new(),
            }));
        }
        Ok(())
    }

    async fn stop(&mut self) {}

    fn is_ordered(&self) -> bool {
        true
    }

    fn tx_offload_support(&self) -> TxOffloadSupport {
        self.offloads
    }

    async fn set_data_path_to_guest_vf(&self, use_vf: bool) -> anyhow::Result<()> {
        self.state.lock().unwrap().data_path_to_vf.push(use_vf);
        Ok(())
    }

    async fn get_data_path_to_guest_vf(&self) -> anyhow::Result<bool> {
        Ok(self
            .state
            .lock()
            .unwrap()
            .data_path_to_vf
            .last()
            .copied()
            .unwrap_or(false))
    }

    async fn wait_for_endpoint_action(&mut self) -> EndpointAction {
        if self.pending_link.is_empty() {
            self.pending_link.extend(self.link.select_next_some().await);
        }
        match self.pending_link.pop_front() {
            Some(up) => EndpointAction::LinkStatusNotify(up),
            None => std::future::pending().await,
        }
    }
}

struct CaptureQueue {
    state: Arc<Mutex<EndpointState>>,
    rx_ids: VecDeque<RxId>,
}

impl InspectMut for CaptureQueue {
    fn inspect_mut(&mut self, _request: inspect::Request<'_>) {}
}

impl net_backend::Queue for CaptureQueue {
    fn poll_ready(&mut self, cx: &mut Context<'_>, _pool: &mut dyn BufferAccess) -> Poll<()> {
        let mut state = self.state.lock().unwrap();
        if !state.received.is_empty() && !self.rx_ids.is_empty() {
            return Poll::Ready(());
        }
        state.waker = Some(cx.waker().clone());
        Poll::Pending
    }

    fn rx_avail(&mut self, _pool: &mut dyn BufferAccess, done: &[RxId]) {
        self.rx_ids.extend(done);
    }

    fn rx_poll(
        &mut self,
        pool: &mut dyn BufferAccess,
        packets: &mut [RxId],
    ) -> anyhow::Result<usize> {
        let mut state = self.state.lock().unwrap();
        let mut count = 0;
        while count < packets.len() && !self.rx_ids.is_empty() {
            let Some((frame, metadata)) = state.received.pop_front() else {
                break;
            };
            let rx_id = self.rx_ids.pop_front().expect("checked non-empty");
            pool.write_packet(rx_id, &metadata, &frame);
            packets[count] = rx_id;
            count += 1;
        }
        Ok(count)
    }

    fn tx_avail(
        &mut self,
        pool: &mut dyn BufferAccess,
        mut segments: &[TxSegment],
    ) -> anyhow::Result<(bool, usize)> {
        let total = segments.len();
        let mut state = self.state.lock().unwrap();
        while !segments.is_empty() {
            let (metadata, _, _) = net_backend::next_packet(segments);
            let metadata = metadata.clone();
            state.transmitted_frames += 1;
            state.transmitted_bytes += u64::from(metadata.len);
            if state.discard {
                let (_, _, rest) = net_backend::next_packet(segments);
                segments = rest;
                continue;
            }
            let frame = net_backend::linearize(pool, &mut segments)?;
            state.transmitted.push((frame, metadata));
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

/// Host → guest signal: the `Interrupt` netvsp raises, turned into a condition variable.
#[derive(Default)]
struct HostSignal {
    raised: Mutex<bool>,
    condvar: Condvar,
}

/// Guest → host signal for `vmbus::Channel`: delivers netvsp's event.
struct GuestSignal(Interrupt);

impl vmbus::EventSignal for GuestSignal {
    fn signal_event(&self, _connection_id: u32) -> Result<(), vmbus::HvStatus> {
        self.0.deliver();
        Ok(())
    }
}

/// The client-side operations over netvsp's channel requests.
pub struct NetvspControl {
    requests: mesh::Sender<ChannelRequest>,
    signal: Arc<HostSignal>,
    rescinded: Arc<AtomicBool>,
    next_gpadl: u32,
    started: Instant,
}

fn gpadl_buffer(region: &DmaRegion) -> Vec<u64> {
    let pages = region.len().div_ceil(4096);
    let first = region.phys().0 / 4096;
    let mut buffer = vec![(pages * 4096) as u64];
    buffer.extend((0..pages as u64).map(|page| first + page));
    buffer
}

impl NetvspControl {
    fn gpadl(&mut self, region: &DmaRegion) -> Result<u32, netvsc_fallback::Error> {
        let id = self.next_gpadl;
        self.next_gpadl += 1;
        let requests = self.requests.clone();
        let request = GpadlRequest {
            id: GpadlId(id),
            count: 1,
            buf: gpadl_buffer(region),
        };
        let accepted = call_with_timeout(
            async move { requests.call(ChannelRequest::Gpadl, request).await },
            RPC_TIMEOUT,
        );
        match accepted {
            Some(Ok(true)) => Ok(id),
            _ => Err(netvsc_fallback::Error::VmbusChannel {
                what: "GPADL refused",
            }),
        }
    }
}

impl VmbusChannelControl for NetvspControl {
    fn create_gpadl(
        &mut self,
        _relid: u32,
        region: &DmaRegion,
    ) -> Result<u32, netvsc_fallback::Error> {
        self.gpadl(region)
    }

    fn teardown_gpadl(&mut self, _relid: u32, gpadl: u32) -> Result<(), netvsc_fallback::Error> {
        let requests = self.requests.clone();
        call_with_timeout(
            async move {
                requests
                    .call(ChannelRequest::TeardownGpadl, GpadlId(gpadl))
                    .await
            },
            RPC_TIMEOUT,
        )
        .and_then(|result| result.ok())
        .ok_or(netvsc_fallback::Error::VmbusChannel {
            what: "GPADL teardown",
        })
    }

    fn now_ns(&self) -> u64 {
        self.started.elapsed().as_nanos() as u64
    }

    fn wait(&mut self, _relid: u32, deadline_ns: u64) {
        let now = self.now_ns();
        if deadline_ns <= now {
            return;
        }
        let timeout = Duration::from_nanos(deadline_ns - now).min(Duration::from_millis(50));
        let raised = self.signal.raised.lock().unwrap();
        let (mut raised, _) = self
            .signal
            .condvar
            .wait_timeout_while(raised, timeout, |raised| !*raised)
            .unwrap();
        *raised = false;
    }

    fn is_rescinded(&self, _relid: u32) -> bool {
        self.rescinded.load(Ordering::SeqCst)
    }

    fn process_host_messages(&mut self, _relid: u32) {
        // The mock bus has no control messages: its revoke sets `rescinded` directly.
    }

    fn close(&mut self, channel: vmbus::Channel) {
        let requests = self.requests.clone();
        let closed = call_with_timeout(
            async move { requests.call(ChannelRequest::Close, ()).await },
            RPC_TIMEOUT,
        );
        let ring_gpadl = channel.ids().ring_gpadl;
        let rings = channel.into_memory();
        if matches!(closed, Some(Ok(()))) && self.teardown_gpadl(RELID, ring_gpadl).is_ok() {
            drop(rings);
        } else {
            // netvsp may still use the rings: keep them.
            std::mem::forget(rings);
        }
    }
}

/// The channel type our driver runs on in these tests.
pub type NetvspChannel = VmbusNetvscChannel<NetvspControl>;

/// Options of the host side.
#[derive(Clone, Copy)]
pub struct HostOptions {
    /// What the endpoint offloads on transmit.
    pub offloads: TxOffloadSupport,
}

impl Default for HostOptions {
    fn default() -> Self {
        HostOptions {
            offloads: TxOffloadSupport {
                ipv4_header: true,
                tcp: true,
                udp: true,
                tso: true,
                uso: false,
            },
        }
    }
}

/// netvsp with its endpoint, running on its own thread.
pub struct NetvspHost {
    /// Guest memory and our DMA allocator over it.
    pub dma: GuestDma,
    /// The endpoint's captures and injection queue.
    pub endpoint: Arc<Mutex<EndpointState>>,
    rescinded: Arc<AtomicBool>,
    _handle: ChannelHandle<Nic>,
    _driver: DefaultDriver,
}

/// The MAC netvsp is built with.
pub const HOST_MAC: [u8; 6] = [0x00, 0x15, 0x5d, 0x12, 0x34, 0x56];

impl NetvspHost {
    /// Starts netvsp, opens its channel with our rings and returns the host and the channel
    /// for our driver.
    pub fn start(options: HostOptions) -> (NetvspHost, NetvspChannel) {
        Self::start_with_vf(options, None)
    }

    /// Like [`NetvspHost::start`], with a virtual function behind the NIC.
    pub fn start_with_vf(
        options: HostOptions,
        virtual_function: Option<Box<dyn netvsp::VirtualFunction>>,
    ) -> (NetvspHost, NetvspChannel) {
        let (_thread, driver) = DefaultPool::spawn_on_thread("netvsp");
        let dma = GuestDma::new(24 << 20, 0);
        let bus = MockBus {
            memory: dma.memory().clone(),
            offers: Arc::new(Mutex::new(Vec::new())),
        };
        let (link_send, link_receive) = mesh::channel();
        let endpoint = Arc::new(Mutex::new(EndpointState {
            link: Some(link_send),
            ..EndpointState::default()
        }));
        let mut builder = Nic::builder();
        if let Some(virtual_function) = virtual_function {
            builder = builder.virtual_function(virtual_function);
        }
        let nic = builder.build(
            &VmTaskDriverSource::new(SingleDriverBackend::new(driver.clone())),
            Guid::new_random(),
            Box::new(CaptureEndpoint {
                state: endpoint.clone(),
                link: link_receive,
                pending_link: VecDeque::new(),
                offloads: options.offloads,
            }),
            HOST_MAC.into(),
            0,
        );
        let handle =
            futures::executor::block_on(offer_channel(&driver, &bus, nic)).expect("netvsp offered");
        let offer = bus.offers.lock().unwrap().pop().expect("one offer");
        let signal = Arc::new(HostSignal::default());
        let rescinded = Arc::new(AtomicBool::new(false));
        let mut control = NetvspControl {
            requests: offer.request_send.clone(),
            signal: signal.clone(),
            rescinded: rescinded.clone(),
            next_gpadl: 1,
            started: Instant::now(),
        };
        let ring_len = (1 + RING_DATA_PAGES) * 4096;
        let rings = dma.allocate(2 * ring_len, 4096).expect("ring memory");
        let ring_gpadl = control.gpadl(&rings).expect("ring GPADL");
        let host_signal = signal.clone();
        let open = OpenRequest {
            open_data: OpenData {
                target_vp: Some(0),
                ring_offset: (1 + RING_DATA_PAGES) as u32,
                ring_gpadl_id: GpadlId(ring_gpadl),
                event_flag: 1,
                connection_id: 1,
                user_data: UserDefinedData::new_zeroed(),
            },
            interrupt: Interrupt::from_fn(move || {
                *host_signal.raised.lock().unwrap() = true;
                host_signal.condvar.notify_all();
            }),
            use_confidential_ring: false,
            use_confidential_external_memory: false,
            is_external_memory_pinned: false,
        };
        let requests = offer.request_send.clone();
        let opened = call_with_timeout(
            async move { requests.call(ChannelRequest::Open, open).await },
            RPC_TIMEOUT,
        );
        assert!(matches!(opened, Some(Ok(true))), "netvsp refused to open");
        let channel = vmbus::Channel::new(
            vmbus::ChannelIds {
                relid: RELID,
                connection_id: 1,
                ring_gpadl,
            },
            rings,
            ring_len,
            Arc::new(GuestSignal(offer.event.clone())),
        )
        .expect("ring layout");
        (
            NetvspHost {
                dma,
                endpoint,
                rescinded,
                _handle: handle,
                _driver: driver,
            },
            VmbusNetvscChannel::new(channel, control),
        )
    }

    /// Starts netvsp and brings our driver up on it.
    pub fn with_driver(
        options: HostOptions,
        config: NetvscConfig,
    ) -> (NetvspHost, Netvsc<NetvspChannel>) {
        let (host, channel) = NetvspHost::start(options);
        match Netvsc::new(channel, &host.dma, config) {
            Ok(device) => (host, device),
            Err((error, _)) => panic!("netvsc bring-up against netvsp failed: {error}"),
        }
    }

    /// Queues a frame for the guest with the given metadata (length filled in).
    pub fn inject(&self, frame: Vec<u8>, metadata: RxMetadata) {
        inject_into(&self.endpoint, frame, metadata);
    }

    /// Frames still queued in the endpoint (netvsp has not taken them yet).
    pub fn queued_rx(&self) -> usize {
        self.endpoint.lock().unwrap().received.len()
    }

    /// Takes what the endpoint captured.
    pub fn take_transmitted(&self) -> Vec<(Vec<u8>, TxMetadata)> {
        std::mem::take(&mut self.endpoint.lock().unwrap().transmitted)
    }

    /// Sends link changes through the endpoint, back to back.
    pub fn set_link(&self, edges: &[bool]) {
        let state = self.endpoint.lock().unwrap();
        state
            .link
            .as_ref()
            .expect("link sender")
            .send(edges.to_vec());
    }

    /// Rescinds the channel as the VMBus client would report it.
    pub fn rescind(&self) {
        self.rescinded.store(true, Ordering::SeqCst);
    }
}
