//! Our MANA driver (`vf_driver::Mana`) against OpenVMM's MANA emulator (`gdma`), in one process.
//!
//! The test plays the PCI core: it places BAR0 and BAR4, enables memory decoding and bus
//! mastering, programs MSI-X table entries (address/data as the kernel's `pci::msix` would) and
//! enables MSI-X; the interrupt "controller" only records which vectors fired, which for the
//! driver means "poll me". The vPort's endpoint is a capture/inject [`Wire`]: it records what
//! the emulator hands the backend (bytes and `TxMetadata`) and injects frames with chosen
//! receive metadata. For the stack tests the wire also acts as the hardware would for the
//! offloads it was asked for (checksum insertion, segmentation) before handing frames to a
//! peer stack.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use chipset_device::mmio::{ExternallyManagedMmioIntercepts, MmioIntercept};
use chipset_device::pci::{ByteEnabledDwordRead, ByteEnabledDwordWrite, PciConfigSpace};
use gdma::{GdmaDevice, VportConfig};
use net_backend::{
    BufferAccess, Endpoint, L4Protocol, Queue, QueueConfig, RssConfig, RxChecksumState, RxId,
    RxMetadata, TxError, TxId, TxMetadata, TxOffloadSupport, TxSegment, linearize, next_packet,
};
use net_device::checksum::{add, fold};
use net_device::{
    Capabilities, DeviceError, LinkState, MacAddress, NetDevice, RegisterIo, RxMeta, Stats, TxMeta,
};
use net_stack::{IpEndpoint, Ipv4Address, Ipv4Cidr, Ipv4Mode, NetConfig, NetStack, Platform};
use pal_async::DefaultPool;
use pci_core::msi::{MsiConnection, SignalMsi};
use tandem_conformance::GuestDma;
use vf_driver::{Mana, ManaConfig, WaitHost};
use vmcore::vm_task::{SingleDriverBackend, VmTaskDriverSource};

/// Where the test's "PCI core" puts BAR0 (registers, 8 KiB) and BAR4 (MSI-X).
const BAR0: u64 = 0x1_0000_0000;
const BAR4: u64 = 0x2_0000_0000;
const BAR0_LEN: usize = 8192;
/// The MSI-X capability's offset in config space (gdma's fixed layout; a PCI core finds it by
/// walking the capability list, which this test does not need to re-prove).
const MSIX_CAPABILITY: u16 = 0x40;
/// CPU vectors the test's interrupt controller hands out: MSI-X entry i → vector BASE + i.
const VECTOR_BASE: u32 = 0x40;
const GUEST_MAC: [u8; 6] = [0x00, 0x15, 0x5d, 0x4a, 0x00, 0x01];
const PEER_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x00, 0x00, 0x64];
const WAIT: Duration = Duration::from_secs(20);

/// Records MSIs as the interrupt controller saw them (the data word = the CPU vector).
#[derive(Default)]
struct InterruptLog(Mutex<Vec<u32>>);

impl SignalMsi for InterruptLog {
    fn signal_msi(&self, _devid: Option<u32>, _address: u64, data: u32) {
        self.0.lock().unwrap().push(data);
    }
}

impl InterruptLog {
    fn count(&self, vector: u32) -> usize {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|seen| **seen == vector)
            .count()
    }
}

/// The capture/inject medium between the emulator's backend queue and the test.
#[derive(Default)]
struct Wire {
    /// What the device transmitted: bytes as the backend read them, and the metadata.
    sent: Vec<(Vec<u8>, TxMetadata)>,
    /// Keep `sent` (off for bulk traffic).
    record: bool,
    /// Frames waiting for a guest receive buffer.
    to_guest: VecDeque<(Vec<u8>, RxMetadata)>,
    /// Frames for the peer stack (after the offloads the wire applies).
    to_peer: VecDeque<Vec<u8>>,
    /// Deliver transmitted frames to the peer.
    forward: bool,
    /// Frames the device was asked to segment (LSO).
    segmented: usize,
    waker: Option<Waker>,
}

type SharedWire = Arc<Mutex<Wire>>;

fn inject(wire: &SharedWire, frame: Vec<u8>, metadata: RxMetadata) {
    let mut wire = wire.lock().unwrap();
    wire.to_guest.push_back((frame, metadata));
    if let Some(waker) = wire.waker.take() {
        waker.wake();
    }
}

struct WireEndpoint(SharedWire);

impl inspect::InspectMut for WireEndpoint {
    fn inspect_mut(&mut self, req: inspect::Request<'_>) {
        req.ignore();
    }
}

#[async_trait::async_trait]
impl Endpoint for WireEndpoint {
    fn endpoint_type(&self) -> &'static str {
        "tandem-wire"
    }

    async fn get_queues(
        &mut self,
        config: Vec<QueueConfig>,
        _rss: Option<&RssConfig<'_>>,
        queues: &mut Vec<Box<dyn Queue>>,
    ) -> anyhow::Result<()> {
        for _ in config {
            queues.push(Box::new(WireQueue {
                wire: self.0.clone(),
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
        TxOffloadSupport {
            ipv4_header: true,
            tcp: true,
            udp: true,
            tso: true,
            uso: false,
        }
    }
}

struct WireQueue {
    wire: SharedWire,
    rx_avail: VecDeque<RxId>,
    rx_done: VecDeque<RxId>,
}

impl inspect::InspectMut for WireQueue {
    fn inspect_mut(&mut self, req: inspect::Request<'_>) {
        req.ignore();
    }
}

impl Queue for WireQueue {
    fn poll_ready(&mut self, cx: &mut Context<'_>, pool: &mut dyn BufferAccess) -> Poll<()> {
        let mut wire = self.wire.lock().unwrap();
        while !self.rx_avail.is_empty() && !wire.to_guest.is_empty() {
            let id = self.rx_avail.pop_front().unwrap();
            let (frame, metadata) = wire.to_guest.pop_front().unwrap();
            pool.write_packet(id, &metadata, &frame);
            self.rx_done.push_back(id);
        }
        if self.rx_done.is_empty() {
            wire.waker = Some(cx.waker().clone());
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
            let (metadata, _, _) = next_packet(segments);
            let metadata = metadata.clone();
            let bytes = linearize(pool, &mut segments)?;
            let mut wire = self.wire.lock().unwrap();
            wire.segmented += usize::from(metadata.flags.offload_tcp_segmentation());
            if wire.forward {
                for frame in apply_offloads(&bytes, &metadata) {
                    wire.to_peer.push_back(frame);
                }
            }
            if wire.record {
                wire.sent.push((bytes, metadata));
            }
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

fn put16(frame: &mut [u8], at: usize, value: u16) {
    frame[at..at + 2].copy_from_slice(&value.to_be_bytes());
}

fn get16(frame: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([frame[at], frame[at + 1]])
}

/// The IPv4 pseudo-header sum for `l4_len` bytes of protocol `protocol`.
fn pseudo_header(frame: &[u8], ip: usize, protocol: u8, l4_len: usize) -> u64 {
    let mut pseudo = frame[ip + 12..ip + 20].to_vec();
    pseudo.extend_from_slice(&[0, protocol]);
    pseudo.extend_from_slice(&(l4_len as u16).to_be_bytes());
    add(0, &pseudo)
}

/// What a NIC does with the offloads in `metadata` (IPv4 only; the stack tests use IPv4).
fn apply_offloads(bytes: &[u8], metadata: &TxMetadata) -> Vec<Vec<u8>> {
    let flags = metadata.flags;
    let ip = usize::from(metadata.l2_len);
    let start = usize::from(metadata.transport_header_offset);
    if flags.offload_tcp_segmentation() {
        assert!(flags.is_ipv4(), "the stack tests only segment IPv4");
        let headers = start + usize::from(metadata.l4_len);
        let mss = usize::from(metadata.max_segment_size);
        let payload = &bytes[headers..];
        let sequence = u32::from_be_bytes(bytes[start + 4..start + 8].try_into().unwrap());
        let id = get16(bytes, ip + 4);
        let flags_byte = bytes[start + 13];
        let chunks: Vec<&[u8]> = payload.chunks(mss).collect();
        return chunks
            .iter()
            .enumerate()
            .map(|(index, chunk)| {
                let mut segment = bytes[..headers].to_vec();
                segment.extend_from_slice(chunk);
                let len = segment.len();
                put16(&mut segment, ip + 2, (len - ip) as u16);
                put16(&mut segment, ip + 4, id.wrapping_add(index as u16));
                put16(&mut segment, ip + 10, 0);
                let header_sum = !fold(add(0, &segment[ip..start]));
                put16(&mut segment, ip + 10, header_sum);
                let offset = (index * mss) as u32;
                segment[start + 4..start + 8]
                    .copy_from_slice(&sequence.wrapping_add(offset).to_be_bytes());
                if index + 1 < chunks.len() {
                    // FIN and PSH belong to the last segment only.
                    segment[start + 13] = flags_byte & !0x09;
                }
                put16(&mut segment, start + 16, 0);
                let sum = pseudo_header(&segment, ip, 6, len - start);
                let checksum = !fold(add(sum, &segment[start..]));
                put16(&mut segment, start + 16, checksum);
                segment
            })
            .collect();
    }
    let mut frame = bytes.to_vec();
    if flags.offload_tcp_checksum() || flags.offload_udp_checksum() {
        // The field holds the pseudo-header sum: summing the L4 bytes as they are completes it.
        let field = start + if flags.offload_tcp_checksum() { 16 } else { 6 };
        let mut checksum = !fold(add(0, &frame[start..]));
        if flags.offload_udp_checksum() && checksum == 0 {
            checksum = 0xffff;
        }
        put16(&mut frame, field, checksum);
    }
    vec![frame]
}

/// BAR0 as the driver sees it; `removed` makes it read like a surprise-removed device.
#[derive(Clone)]
struct Bar0 {
    device: Arc<Mutex<GdmaDevice>>,
    removed: Arc<AtomicBool>,
}

impl RegisterIo for Bar0 {
    fn read32(&self, offset: usize) -> u32 {
        if self.removed.load(Ordering::SeqCst) || offset + 4 > BAR0_LEN {
            return u32::MAX;
        }
        let mut bytes = [0u8; 4];
        let _ = self
            .device
            .lock()
            .unwrap()
            .mmio_read(BAR0 + offset as u64, &mut bytes);
        u32::from_le_bytes(bytes)
    }

    fn write32(&self, offset: usize, value: u32) {
        if self.removed.load(Ordering::SeqCst) || offset + 4 > BAR0_LEN {
            return;
        }
        let _ = self
            .device
            .lock()
            .unwrap()
            .mmio_write(BAR0 + offset as u64, &value.to_le_bytes());
    }

    fn write64(&self, offset: usize, value: u64) {
        if self.removed.load(Ordering::SeqCst) || offset + 8 > BAR0_LEN {
            return;
        }

        let _ = self
            .device
            .lock()
            .unwrap()
            .mmio_write(BAR0 + offset as u64, &value.to_le_bytes());
    }

    fn len(&self) -> usize {
        BAR0_LEN
    }
}

/// Real time for the driver's bounded waits; the device runs on its own thread.
struct RealTime(Instant);

impl WaitHost for RealTime {
    fn now_ns(&mut self) -> u64 {
        self.0.elapsed().as_nanos() as u64
    }
    fn idle(&mut self) {
        std::thread::sleep(Duration::from_micros(20));
    }
}

/// One emulated MANA function set up as a PCI core would, with its wire and interrupt log.
struct Harness {
    _pool: std::thread::JoinHandle<()>,
    dma: GuestDma,
    device: Arc<Mutex<GdmaDevice>>,
    removed: Arc<AtomicBool>,
    wire: SharedWire,
    interrupts: Arc<InterruptLog>,
    clock: Instant,
}

type Driver = Mana<Bar0, GuestDma>;

fn config_write(device: &mut GdmaDevice, offset: u16, value: u32) {
    let _ = device.pci_cfg_write(offset, ByteEnabledDwordWrite::with_all_bytes_enabled(value));
}

fn config_read(device: &mut GdmaDevice, offset: u16) -> u32 {
    let mut value = 0;
    let _ = device.pci_cfg_read(
        offset,
        ByteEnabledDwordRead::with_all_bytes_enabled(&mut value),
    );
    value
}

impl Harness {
    fn new() -> Harness {
        let (pool, driver) = DefaultPool::spawn_on_thread("gdma");
        let source = VmTaskDriverSource::new(SingleDriverBackend::new(driver));
        let dma = GuestDma::new(64 << 20, 0);
        let connection = MsiConnection::new();
        let interrupts = Arc::new(InterruptLog::default());
        connection.connect(interrupts.clone());
        let wire: SharedWire = Arc::new(Mutex::new(Wire {
            record: true,
            ..Wire::default()
        }));
        let mut device = GdmaDevice::new(
            &source,
            dma.memory().clone(),
            &connection.target(),
            vec![VportConfig {
                mac_address: GUEST_MAC.into(),
                endpoint: Box::new(WireEndpoint(wire.clone())),
            }],
            &mut ExternallyManagedMmioIntercepts,
        );
        // The PCI core's part: identity, BARs, decoding and bus mastering, MSI-X.
        let id = config_read(&mut device, 0);
        assert_eq!(id, 0x00ba_1414, "vendor 1414, device 00BA");
        assert!(vf_driver::mana::is_supported_device(
            id as u16,
            (id >> 16) as u16
        ));
        config_write(&mut device, 0x10, BAR0 as u32);
        config_write(&mut device, 0x14, (BAR0 >> 32) as u32);
        config_write(&mut device, 0x20, BAR4 as u32);
        config_write(&mut device, 0x24, (BAR4 >> 32) as u32);
        config_write(&mut device, 0x04, 0x0006);
        let table = config_read(&mut device, MSIX_CAPABILITY + 4);
        assert_eq!(table & 7, 4, "the MSI-X table is in BAR4");
        let table = BAR4 + u64::from(table & !7);
        let vectors = ((config_read(&mut device, MSIX_CAPABILITY) >> 16) & 0x7ff) + 1;
        assert_eq!(vectors, 64);
        for entry in 0..2u64 {
            let at = table + entry * 16;
            let _ = device.mmio_write(at, &0xfee0_0000u32.to_le_bytes());
            let _ = device.mmio_write(at + 4, &0u32.to_le_bytes());
            let _ = device.mmio_write(at + 8, &(VECTOR_BASE + entry as u32).to_le_bytes());
            let _ = device.mmio_write(at + 12, &0u32.to_le_bytes());
        }
        config_write(&mut device, MSIX_CAPABILITY, 0x8000_0000);
        Harness {
            _pool: pool,
            dma,
            device: Arc::new(Mutex::new(device)),
            removed: Arc::new(AtomicBool::new(false)),
            wire,
            interrupts,
            clock: Instant::now(),
        }
    }

    fn bar0(&self) -> Bar0 {
        Bar0 {
            device: self.device.clone(),
            removed: self.removed.clone(),
        }
    }

    fn start(&self, offloads: bool) -> Driver {
        let config = ManaConfig {
            name: "mana conformance".into(),
            hwc_timeout_ns: 10_000_000_000,
            offloads,
            ..ManaConfig::default()
        };
        Mana::new(
            self.bar0(),
            self.dma.clone(),
            Box::new(RealTime(self.clock)),
            config,
        )
        .expect("MANA bring-up against the emulator")
    }

    fn now(&self) -> u64 {
        self.clock.elapsed().as_nanos() as u64
    }

    /// Polls `driver` until `done` gives a value, at most [`WAIT`].
    fn wait_for<T>(
        &self,
        driver: &mut Driver,
        what: &str,
        mut done: impl FnMut(&mut Driver, &Harness) -> Option<T>,
    ) -> T {
        let start = Instant::now();
        loop {
            driver.poll(self.now());
            if let Some(value) = done(driver, self) {
                return value;
            }
            assert!(start.elapsed() < WAIT, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_micros(50));
        }
    }

    fn sent_count(&self) -> usize {
        self.wire.lock().unwrap().sent.len()
    }
}

fn send(driver: &mut Driver, frame: &[u8], meta: TxMeta) -> Result<(), DeviceError> {
    driver.transmit(frame.len(), &mut |buffer| {
        buffer.copy_from_slice(frame);
        meta
    })?;
    driver.flush();
    Ok(())
}

fn frame(len: usize, seed: u8) -> Vec<u8> {
    let mut bytes: Vec<u8> = (0..len)
        .map(|index| (index as u8).wrapping_mul(13).wrapping_add(seed))
        .collect();
    bytes[..6].copy_from_slice(&GUEST_MAC);
    bytes[6..12].copy_from_slice(&PEER_MAC);
    bytes[12..14].copy_from_slice(&0x88b5u16.to_be_bytes());
    bytes
}

/// An IPv4 TCP or UDP frame whose L4 checksum field holds the pseudo-header sum.
fn ip_frame(tcp: bool, payload: usize) -> Vec<u8> {
    let l4_header = if tcp { 20 } else { 8 };
    let total = 20 + l4_header + payload;
    let mut bytes = vec![0u8; 14 + total];
    bytes[..6].copy_from_slice(&PEER_MAC);
    bytes[6..12].copy_from_slice(&GUEST_MAC);
    put16(&mut bytes, 12, 0x0800);
    bytes[14] = 0x45;
    put16(&mut bytes, 16, total as u16);
    bytes[22] = 64;
    bytes[23] = if tcp { 6 } else { 17 };
    bytes[26..30].copy_from_slice(&[10, 0, 2, 15]);
    bytes[30..34].copy_from_slice(&[10, 0, 2, 100]);
    let header_sum = !fold(add(0, &bytes[14..34]));
    put16(&mut bytes, 24, header_sum);
    put16(&mut bytes, 34, 4000);
    put16(&mut bytes, 36, 7);
    if tcp {
        bytes[46] = 5 << 4;
        bytes[47] = 0x18;
    } else {
        put16(&mut bytes, 38, (8 + payload) as u16);
    }
    for (index, byte) in bytes[34 + l4_header..].iter_mut().enumerate() {
        *byte = (index % 251) as u8;
    }
    let field = 34 + if tcp { 16 } else { 6 };
    let sum = fold(pseudo_header(&bytes, 14, bytes[23], l4_header + payload));
    put16(&mut bytes, field, sum);
    bytes
}

#[test]
fn mana_brings_up_and_passes_frames_of_every_length_both_ways_byte_exact() {
    let harness = Harness::new();
    let mut driver = harness.start(true);
    assert_eq!(driver.link_state(), LinkState::Up);
    assert_eq!(driver.mac_address(), MacAddress(GUEST_MAC));
    // Bring-up established the HWC on MSI-X entry 0 (one interrupt for the init EQEs).
    assert!(harness.interrupts.count(VECTOR_BASE) >= 1);
    let data_vector = VECTOR_BASE + 1;
    for len in 14..=1514 {
        let bytes = frame(len, len as u8);
        let before = harness.sent_count();
        send(&mut driver, &bytes, TxMeta::default()).expect("transmit");
        harness.wait_for(&mut driver, "a transmitted frame", |_, harness| {
            (harness.sent_count() > before).then_some(())
        });
        {
            let wire = harness.wire.lock().unwrap();
            let (sent, metadata) = wire.sent.last().unwrap();
            assert_eq!(sent, &bytes, "transmitted bytes, length {len}");
            assert_eq!(metadata.segment_count, 1);
            assert!(
                !metadata.flags.offload_tcp_checksum()
                    && !metadata.flags.offload_tcp_segmentation()
            );
        }
        // Quiesce: the transmit completion (and its EQE) taken, everything re-armed; then
        // the receive completion must interrupt.
        harness.wait_for(&mut driver, "the transmit completion", |driver, _| {
            (driver.stats().tx_frames == (len - 13) as u64).then_some(())
        });
        std::thread::sleep(Duration::from_millis(1));
        driver.poll(harness.now());
        driver.receive(8, &mut |_, _| panic!("nothing was injected yet"));

        let interrupts_before = harness.interrupts.count(data_vector);
        inject(
            &harness.wire,
            bytes.clone(),
            RxMetadata {
                len,
                ..RxMetadata::default()
            },
        );
        let received = harness.wait_for(&mut driver, "a received frame", |driver, _| {
            let mut got = None;
            driver.receive(8, &mut |frame, meta| got = Some((frame.to_vec(), meta)));
            got
        });
        assert_eq!(received.0, bytes, "received bytes, length {len}");
        assert!(!received.1.checksum_verified);
        // The completion came as an interrupt on the data EQ's vector, re-armed each time. The
        // device writes the CQE and EQE before it signals, so the driver may see the frame
        // first: wait (bounded) for the MSI.
        harness.wait_for(&mut driver, "the data-path interrupt", |_, harness| {
            (harness.interrupts.count(data_vector) > interrupts_before).then_some(())
        });
    }
    let stats = driver.stats();
    assert_eq!((stats.tx_frames, stats.rx_frames), (1501, 1501));
    assert_eq!(stats.rx_dropped_bad, 0);
    assert!(stats.interrupts > 0);
    // A frame larger than the receive buffer is reported truncated by the device and dropped.
    inject(
        &harness.wire,
        frame(3000, 1),
        RxMetadata {
            len: 3000,
            ..RxMetadata::default()
        },
    );
    harness.wait_for(&mut driver, "the truncated frame's drop", |driver, _| {
        driver.receive(8, &mut |_, _| panic!("a truncated frame was delivered"));
        (driver.stats().rx_dropped_bad == 1).then_some(())
    });
}

#[test]
fn mana_checksum_and_lso_requests_reach_the_backend_as_metadata() {
    let harness = Harness::new();
    let mut driver = harness.start(true);
    assert!(driver.capabilities().tx_checksum);
    assert_eq!(driver.capabilities().max_tso_size, 65_535);
    let cases = [
        (
            ip_frame(true, 200),
            TxMeta {
                checksum: Some((34, 16)),
                tso_mss: None,
            },
        ),
        (
            ip_frame(false, 300),
            TxMeta {
                checksum: Some((34, 6)),
                tso_mss: None,
            },
        ),
        (
            ip_frame(true, 60_000),
            TxMeta {
                checksum: Some((34, 16)),
                tso_mss: Some(1448),
            },
        ),
    ];
    for (index, (bytes, meta)) in cases.iter().enumerate() {
        send(&mut driver, bytes, *meta).unwrap();
        harness.wait_for(&mut driver, "the offload frame", |_, harness| {
            (harness.sent_count() > index).then_some(())
        });
    }
    let wire = harness.wire.lock().unwrap();
    let (tcp, tcp_meta) = &wire.sent[0];
    assert_eq!(
        tcp, &cases[0].0,
        "checksum offload leaves the bytes to the device"
    );
    assert!(tcp_meta.flags.offload_tcp_checksum() && tcp_meta.flags.is_ipv4());
    assert!(!tcp_meta.flags.offload_udp_checksum() && !tcp_meta.flags.offload_tcp_segmentation());
    assert_eq!(
        (
            tcp_meta.l2_len,
            tcp_meta.l3_len,
            tcp_meta.transport_header_offset
        ),
        (14, 20, 34)
    );
    let (udp, udp_meta) = &wire.sent[1];
    assert_eq!(udp, &cases[1].0);
    assert!(udp_meta.flags.offload_udp_checksum() && !udp_meta.flags.offload_tcp_checksum());
    let (lso, lso_meta) = &wire.sent[2];
    assert!(lso_meta.flags.offload_tcp_segmentation());
    assert!(lso_meta.flags.offload_tcp_checksum() && lso_meta.flags.offload_ip_header_checksum());
    assert_eq!(lso_meta.max_segment_size, 1448);
    assert_eq!(
        lso_meta.l4_len, 20,
        "the first SGE holds exactly the headers"
    );
    assert_eq!(lso_meta.segment_count, 2);
    assert_eq!(lso_meta.len as usize, cases[2].0.len());
    assert_eq!(&lso[54..], &cases[2].0[54..], "payload unchanged");
    // The wire's segmentation (what the NIC does) yields valid segments of the MSS.
    let segments = apply_offloads(lso, lso_meta);
    assert_eq!(segments.len(), 60_000usize.div_ceil(1448));
    let payload: Vec<u8> = segments.iter().flat_map(|s| s[54..].to_vec()).collect();
    assert_eq!(payload, cases[2].0[54..].to_vec());
    drop(wire);
    let counters = driver.counters();
    assert_eq!(
        (
            counters.tx_checksum_offloads,
            counters.tx_segmentation_offloads
        ),
        (2, 1)
    );

    // Receive checksum results reach RxMeta.
    let checks = [
        (RxChecksumState::Good, RxChecksumState::Good, true),
        (RxChecksumState::Good, RxChecksumState::Bad, false),
        (RxChecksumState::Unknown, RxChecksumState::Unknown, false),
    ];
    for (ip, l4, verified) in checks {
        let bytes = ip_frame(true, 100);
        inject(
            &harness.wire,
            bytes.clone(),
            RxMetadata {
                len: bytes.len(),
                ip_checksum: ip,
                l4_checksum: l4,
                l4_protocol: L4Protocol::Tcp,
                ..RxMetadata::default()
            },
        );
        let meta: RxMeta = harness.wait_for(&mut driver, "a checksummed frame", |driver, _| {
            let mut got = None;
            driver.receive(8, &mut |_, meta| got = Some(meta));
            got
        });
        assert_eq!(meta.checksum_verified, verified, "{ip:?}/{l4:?}");
    }
}

#[test]
fn mana_test_event_interrupts_through_the_data_vector() {
    let harness = Harness::new();
    let mut driver = harness.start(true);
    let before = harness.interrupts.count(VECTOR_BASE + 1);
    driver.generate_test_event().unwrap();
    harness.wait_for(&mut driver, "the test EQE", |driver, harness| {
        (driver.counters().test_events == 1 && harness.interrupts.count(VECTOR_BASE + 1) > before)
            .then_some(())
    });
}

#[test]
fn mana_re_initialises_after_a_reset_request_eqe() {
    let harness = Harness::new();
    let mut driver = harness.start(true);
    driver.generate_reset_request().unwrap();
    harness.wait_for(&mut driver, "the reset request", |driver, _| {
        (driver.counters().reset_requests == 1).then_some(())
    });
    harness.wait_for(&mut driver, "re-initialisation", |driver, _| {
        (driver.link_state() == LinkState::Up).then_some(())
    });
    assert_eq!(driver.counters().initializations, 2);
    let bytes = frame(500, 9);
    let before = harness.sent_count();
    send(&mut driver, &bytes, TxMeta::default()).unwrap();
    harness.wait_for(&mut driver, "a frame after the reset", |_, harness| {
        (harness.sent_count() > before).then_some(())
    });
    inject(
        &harness.wire,
        bytes.clone(),
        RxMetadata {
            len: bytes.len(),
            ..RxMetadata::default()
        },
    );
    let received = harness.wait_for(&mut driver, "a frame after the reset", |driver, _| {
        let mut got = None;
        driver.receive(8, &mut |frame, _| got = Some(frame.to_vec()));
        got
    });
    assert_eq!(received, bytes);
}

#[test]
fn mana_stops_and_comes_up_again() {
    let harness = Harness::new();
    let mut driver = harness.start(true);
    driver.stop();
    assert_eq!(driver.link_state(), LinkState::Down);
    assert_eq!(
        send(&mut driver, &frame(100, 0), TxMeta::default()),
        Err(DeviceError::NotReady)
    );
    driver.reinitialize().expect("second bring-up");
    assert_eq!(driver.link_state(), LinkState::Up);
    for round in 0..3u8 {
        let bytes = frame(600, round);
        let before = harness.sent_count();
        send(&mut driver, &bytes, TxMeta::default()).unwrap();
        harness.wait_for(&mut driver, "a frame after restart", |_, harness| {
            (harness.sent_count() > before).then_some(())
        });
        assert_eq!(harness.wire.lock().unwrap().sent.last().unwrap().0, bytes);
        inject(
            &harness.wire,
            bytes.clone(),
            RxMetadata {
                len: bytes.len(),
                ..RxMetadata::default()
            },
        );
        let received = harness.wait_for(&mut driver, "a frame after restart", |driver, _| {
            let mut got = None;
            driver.receive(8, &mut |frame, _| got = Some(frame.to_vec()));
            got
        });
        assert_eq!(received, bytes);
    }
    assert_eq!(driver.counters().initializations, 2);
    // A third cycle, then the driver is dropped while running (Drop stops it).
    driver.stop();
    driver.reinitialize().expect("third bring-up");
}

#[test]
fn mana_removal_mid_traffic_is_gone_without_panic_or_hang() {
    let harness = Harness::new();
    let mut driver = harness.start(true);
    for round in 0..50u8 {
        let _ = send(&mut driver, &frame(1000, round), TxMeta::default());
        inject(
            &harness.wire,
            frame(900, round),
            RxMetadata {
                len: 900,
                ..RxMetadata::default()
            },
        );
        driver.receive(4, &mut |_, _| {});
        driver.poll(harness.now());
    }
    harness.removed.store(true, Ordering::SeqCst);
    let start = Instant::now();
    driver.poll(harness.now());
    assert_eq!(driver.link_state(), LinkState::Gone);
    assert_eq!(
        send(&mut driver, &frame(100, 0), TxMeta::default()),
        Err(DeviceError::Gone)
    );
    assert_eq!(driver.receive(64, &mut |_, _| {}), 0);
    driver.stop();
    assert!(driver.reinitialize().is_err());
    drop(driver);
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "removal handling waited {:?}",
        start.elapsed()
    );
}

/// The peer's NIC: frames go onto the wire towards the MANA function.
struct PeerNic {
    wire: SharedWire,
    stats: Stats,
}

impl NetDevice for PeerNic {
    fn name(&self) -> &str {
        "peer"
    }
    fn mac_address(&self) -> MacAddress {
        MacAddress(PEER_MAC)
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
    }
    fn link_state(&self) -> LinkState {
        LinkState::Up
    }
    fn poll(&mut self, _now_ns: u64) {}
    fn receive(&mut self, budget: usize, sink: &mut dyn FnMut(&[u8], RxMeta)) -> usize {
        let mut delivered = 0;
        while delivered < budget {
            let Some(frame) = self.wire.lock().unwrap().to_peer.pop_front() else {
                break;
            };
            sink(&frame, RxMeta::default());
            self.stats.rx_frames += 1;
            delivered += 1;
        }
        delivered
    }
    fn can_transmit(&self) -> bool {
        true
    }
    fn transmit(
        &mut self,
        len: usize,
        fill: &mut dyn FnMut(&mut [u8]) -> TxMeta,
    ) -> Result<(), DeviceError> {
        let mut bytes = vec![0u8; len];
        let meta = fill(&mut bytes);
        assert_eq!(meta, TxMeta::default(), "the peer NIC offers no offloads");
        self.stats.tx_frames += 1;
        inject(
            &self.wire,
            bytes,
            RxMetadata {
                len,
                ..RxMetadata::default()
            },
        );
        Ok(())
    }
    fn flush(&mut self) {}
    fn stats(&self) -> Stats {
        self.stats
    }
    fn stop(&mut self) {}
    fn mark_gone(&mut self) {}
}

struct RealPlatform(Instant, u64);

impl Platform for RealPlatform {
    fn now_ns(&self) -> u64 {
        self.0.elapsed().as_nanos() as u64
    }
    fn wait_for_event(&self, _deadline_ns: Option<u64>) {
        std::thread::sleep(Duration::from_micros(50));
    }
    fn random_seed(&self) -> u64 {
        self.1
    }
}

fn static_config(address: [u8; 4]) -> NetConfig {
    NetConfig {
        ipv4: Ipv4Mode::Static {
            address: Ipv4Cidr::new(
                Ipv4Address::new(address[0], address[1], address[2], address[3]),
                24,
            ),
            gateway: None,
        },
        ..NetConfig::default()
    }
}

fn pattern(len: usize, seed: u32) -> Vec<u8> {
    let mut state = seed | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            state as u8
        })
        .collect()
}

#[test]
fn mana_alone_carries_a_net_stack_for_one_mib_tcp_echo_and_udp_echo() {
    let harness = Harness::new();
    {
        let mut wire = harness.wire.lock().unwrap();
        wire.record = false;
        wire.forward = true;
    }
    let driver = harness.start(true);
    let mut guest = NetStack::new(
        static_config([10, 0, 2, 15]),
        Box::new(driver),
        Box::new(RealPlatform(harness.clock, 0x1234_5678)),
    )
    .unwrap();
    let mut peer = NetStack::new(
        static_config([10, 0, 2, 100]),
        Box::new(PeerNic {
            wire: harness.wire.clone(),
            stats: Stats::default(),
        }),
        Box::new(RealPlatform(harness.clock, 0x9abc_def0)),
    )
    .unwrap();
    let guest_ip = Ipv4Address::new(10, 0, 2, 15);
    let listener = guest.tcp_listen(7).unwrap();
    let server_udp = guest.udp_bind(7).unwrap();
    let data = pattern(1 << 20, 77);
    let client = peer
        .tcp_connect(IpEndpoint::new(guest_ip.into(), 7))
        .unwrap();
    let mut server: Option<(net_stack::TcpStream, Vec<u8>)> = None;
    let (mut sent, mut received, mut eof) = (0usize, Vec::new(), false);
    let start = Instant::now();
    let mut buffer = vec![0u8; 16 * 1024];
    while !(eof && received.len() == data.len()) {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "TCP echo stalled at {} of {} bytes",
            received.len(),
            data.len()
        );
        let mut progress = guest.poll() | peer.poll();
        if server.is_none()
            && let Some(stream) = guest.accept(&listener)
        {
            server = Some((stream, Vec::new()));
        }
        if let Some((stream, pending)) = server.as_mut() {
            if !pending.is_empty() {
                let written = guest.tcp_write(stream, pending).unwrap_or(0);
                pending.drain(..written);
                progress |= written > 0;
            }
            if pending.is_empty() {
                match guest.tcp_read(stream, &mut buffer) {
                    Ok(0) => {}
                    Ok(read) => {
                        let written = guest.tcp_write(stream, &buffer[..read]).unwrap_or(0);
                        pending.extend_from_slice(&buffer[written..read]);
                        progress = true;
                    }
                    Err(_) => {
                        let (stream, _) = server.take().unwrap();
                        guest.tcp_close(stream);
                    }
                }
            }
        }
        if sent < data.len() {
            let end = (sent + 16 * 1024).min(data.len());
            let written = peer.tcp_write(&client, &data[sent..end]).unwrap();
            sent += written;
            progress |= written > 0;
            if sent == data.len() {
                peer.tcp_shutdown(&client).unwrap();
            }
        }
        loop {
            match peer.tcp_read(&client, &mut buffer) {
                Ok(0) => break,
                Ok(read) => {
                    received.extend_from_slice(&buffer[..read]);
                    progress = true;
                }
                Err(_) => {
                    eof = true;
                    break;
                }
            }
        }
        if !progress {
            std::thread::sleep(Duration::from_micros(50));
        }
    }
    assert!(received == data, "echoed bytes differ from the bytes sent");
    peer.tcp_close(client);

    // UDP echo, fragmented datagrams included.
    let socket = peer.udp_bind(0).unwrap();
    let target = IpEndpoint::new(guest_ip.into(), 7);
    let mut datagram = vec![0u8; 65_536];
    for len in [1usize, 100, 1472, 1473, 8000, 30_000] {
        let payload = pattern(len, len as u32);
        peer.udp_send_to(&socket, &payload, target).unwrap();
        let start = Instant::now();
        loop {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "UDP echo of {len} bytes"
            );
            guest.poll();
            peer.poll();
            while let Ok(Some((got, from))) = guest.udp_recv_from(&server_udp, &mut datagram) {
                guest
                    .udp_send_to(&server_udp, &datagram[..got], from)
                    .unwrap();
            }
            if let Ok(Some((got, _))) = peer.udp_recv_from(&socket, &mut datagram) {
                assert_eq!(&datagram[..got], &payload[..], "UDP echo of {len} bytes");
                break;
            }
            std::thread::sleep(Duration::from_micros(50));
        }
    }
    let stats = guest.stats();
    assert!(
        stats.bond.total.bond.rx_frames > 700,
        "1 MiB arrived over MANA"
    );
    let segmented = harness.wire.lock().unwrap().segmented;
    assert!(
        segmented > 0,
        "the echoed bulk data left MANA as LSO frames"
    );
}
