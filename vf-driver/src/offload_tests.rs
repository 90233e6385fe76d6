//! Host tests of transmit checksum offload, TSO and receive checksum reporting against the fake
//! device, whose offload model follows the hardware (see `fake_offload`). Every checksum on
//! the "wire" is checked with an RFC 1071 reference written here, not with the code under test.

use crate::device::{Config, IgbVf};
use crate::fake::{FakeIgb, FakeVfRegisters, RxWriteBackOverride, TestHost};
use crate::fake_dma::FakeDmaAllocator;
use crate::pf_regs as pf;
use alloc::boxed::Box;
use alloc::vec::Vec;
use core::cell::Cell;
use net_device::{DeviceError, LinkState, MacAddress, NetDevice, RegisterIo, RxMeta, TxMeta};

type Vf = IgbVf<FakeVfRegisters, FakeDmaAllocator>;

const VF_MAC: MacAddress = MacAddress([0x52, 0x54, 0x00, 0x12, 0x34, 0x56]);
const PEER_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0xaa, 0xbb, 0xcc];
/// The MSS of TCP over IPv4 with timestamps on a 1500-byte MTU.
const MSS: u16 = 1448;
const TCP_FIN: u8 = 0x01;
const TCP_PSH: u8 = 0x08;
const TCP_ACK: u8 = 0x10;
const TCP_CWR: u8 = 0x80;

fn config(ring: u16) -> Config {
    Config {
        name: "igbvf offload test".into(),
        rx_ring_size: 64,
        tx_ring_size: ring,
        mailbox_timeout_ns: 5_000_000,
        ..Config::default()
    }
}

fn start_with(config: Config) -> (FakeIgb, Vf) {
    let fake = FakeIgb::with_scripted_pf(Some(VF_MAC));
    let vf = IgbVf::new(
        fake.vf_registers(0),
        FakeDmaAllocator::new(),
        Box::new(TestHost::new(1_000)),
        config,
    )
    .expect("VF starts against the scripted PF");
    assert_eq!(vf.link_state(), LinkState::Up);
    (fake, vf)
}

fn start(ring: u16) -> (FakeIgb, Vf) {
    start_with(config(ring))
}

use net_device::checksum::reference as reference_sum;

fn be16(frame: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([frame[at], frame[at + 1]])
}

fn be32(frame: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([frame[at], frame[at + 1], frame[at + 2], frame[at + 3]])
}

/// What a test frame looks like.
#[derive(Clone, Copy, Debug)]
struct Spec {
    ipv6: bool,
    udp: bool,
    vlan: bool,
}

const TCP4: Spec = Spec {
    ipv6: false,
    udp: false,
    vlan: false,
};
const UDP4: Spec = Spec { udp: true, ..TCP4 };
const TCP6: Spec = Spec { ipv6: true, ..TCP4 };
const UDP6: Spec = Spec {
    ipv6: true,
    udp: true,
    vlan: false,
};
const TCP4_VLAN: Spec = Spec { vlan: true, ..TCP4 };

impl Spec {
    fn mac_len(&self) -> usize {
        if self.vlan { 18 } else { 14 }
    }
    fn ip_len(&self) -> usize {
        if self.ipv6 { 40 } else { 20 }
    }
    fn start(&self) -> usize {
        self.mac_len() + self.ip_len()
    }
    /// TCP with 12 bytes of options (timestamps), as Linux and smoltcp send.
    fn l4_header_len(&self) -> usize {
        if self.udp { 8 } else { 32 }
    }
    fn headers_len(&self) -> usize {
        self.start() + self.l4_header_len()
    }
    /// The MSS that fills a 1500-byte MTU.
    fn mss(&self) -> u16 {
        (1500 - self.ip_len() - self.l4_header_len()) as u16
    }
    fn field(&self) -> usize {
        self.start() + if self.udp { 6 } else { 16 }
    }
}

/// The pseudo-header sum of the frame's IP header for `l4_len` bytes, per the reference.
fn pseudo_header(frame: &[u8], spec: Spec, l4_len: usize) -> u16 {
    let mac = spec.mac_len();
    let mut bytes = Vec::new();
    if spec.ipv6 {
        bytes.extend_from_slice(&frame[mac + 8..mac + 40]);
        bytes.extend_from_slice(&(l4_len as u32).to_be_bytes());
        bytes.extend_from_slice(&[0, 0, 0, if spec.udp { 17 } else { 6 }]);
    } else {
        bytes.extend_from_slice(&frame[mac + 12..mac + 20]);
        bytes.extend_from_slice(&[0, if spec.udp { 17 } else { 6 }]);
        bytes.extend_from_slice(&(l4_len as u16).to_be_bytes());
    }
    reference_sum(&bytes)
}

/// A frame from the VF to the peer (or, with `to_vf`, the other way) with `payload`, TCP
/// sequence number `sequence` and `flags`. With `complete` every checksum is final (a frame
/// as it arrives from the wire); without, the L4 field holds the folded pseudo-header sum
/// including the L4 length, as the stack hands frames over for offload.
fn build(
    spec: Spec,
    payload: &[u8],
    sequence: u32,
    flags: u8,
    complete: bool,
    to_vf: bool,
) -> (Vec<u8>, TxMeta) {
    let mut frame = Vec::new();
    let (destination, source) = if to_vf {
        (VF_MAC.0, PEER_MAC)
    } else {
        (PEER_MAC, VF_MAC.0)
    };
    frame.extend_from_slice(&destination);
    frame.extend_from_slice(&source);
    if spec.vlan {
        frame.extend_from_slice(&[0x81, 0x00, 0x00, 0x05]);
    }
    let l4_len = spec.l4_header_len() + payload.len();
    let protocol = if spec.udp { 17 } else { 6 };
    if spec.ipv6 {
        frame.extend_from_slice(&[0x86, 0xdd, 0x60, 0, 0, 0]);
        frame.extend_from_slice(&(l4_len as u16).to_be_bytes());
        frame.extend_from_slice(&[protocol, 64]);
        frame.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
        frame.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
    } else {
        frame.extend_from_slice(&[0x08, 0x00, 0x45, 0]);
        frame.extend_from_slice(&((20 + l4_len) as u16).to_be_bytes());
        frame.extend_from_slice(&[0x12, 0x34, 0x40, 0x00, 64, protocol, 0, 0]);
        frame.extend_from_slice(&[10, 0, 0, 2, 10, 0, 0, 1]);
        let mac = spec.mac_len();
        let sum = !reference_sum(&frame[mac..mac + 20]);
        frame[mac + 10..mac + 12].copy_from_slice(&sum.to_be_bytes());
    }
    if spec.udp {
        frame.extend_from_slice(&[0x13, 0x89, 0x9c, 0x40]);
        frame.extend_from_slice(&(l4_len as u16).to_be_bytes());
        frame.extend_from_slice(&[0, 0]);
    } else {
        frame.extend_from_slice(&[0x13, 0x89, 0x9c, 0x40]);
        frame.extend_from_slice(&sequence.to_be_bytes());
        frame.extend_from_slice(&[0x01, 0x02, 0x03, 0x04, 0x80, flags, 0xff, 0xff, 0, 0, 0, 0]);
        frame.extend_from_slice(&[1, 1, 8, 10, 0, 0, 0, 7, 0, 0, 0, 9]);
    }
    frame.extend_from_slice(payload);
    let pseudo = pseudo_header(&frame, spec, l4_len);
    let field = spec.field();
    frame[field..field + 2].copy_from_slice(&pseudo.to_be_bytes());
    if complete {
        let start = spec.start();
        let sum = !reference_sum(&frame[start..]);
        frame[field..field + 2].copy_from_slice(&sum.to_be_bytes());
    }
    let meta = TxMeta {
        checksum: Some((spec.start() as u16, (field - spec.start()) as u16)),
        tso_mss: None,
    };
    (frame, meta)
}

/// Payload bytes that differ everywhere (so a misplaced byte shows).
fn payload(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 8) as u8)
        .collect()
}

/// Asserts that `frame`'s IPv4 header checksum (if IPv4) and its L4 checksum are right per
/// the reference, taking lengths from the IP header (a frame may carry padding).
fn assert_checksums_valid(frame: &[u8], spec: Spec) {
    let mac = spec.mac_len();
    let end = if spec.ipv6 {
        mac + 40 + usize::from(be16(frame, mac + 4))
    } else {
        assert_eq!(
            reference_sum(&frame[mac..mac + 20]),
            0xffff,
            "IPv4 header checksum"
        );
        mac + usize::from(be16(frame, mac + 2))
    };
    assert!(end <= frame.len(), "IP length beyond the frame");
    let start = spec.start();
    let pseudo = pseudo_header(frame, spec, end - start);
    let mut bytes = pseudo.to_be_bytes().to_vec();
    bytes.extend_from_slice(&frame[start..end]);
    assert_eq!(reference_sum(&bytes), 0xffff, "L4 checksum");
}

fn send(vf: &mut Vf, frame: &[u8], meta: TxMeta) -> Result<(), DeviceError> {
    vf.transmit(frame.len(), &mut |buffer: &mut [u8]| {
        buffer.copy_from_slice(frame);
        meta
    })
}

#[test]
fn checksum_offload_leaves_correct_tcp_and_udp_checksums_over_ipv4_and_ipv6() {
    let (fake, mut vf) = start(64);
    let specs = [TCP4, UDP4, TCP6, UDP6, TCP4_VLAN];
    let mut sent = Vec::new();
    for (index, spec) in specs.iter().enumerate() {
        // Twice per layout: the second frame finds its context loaded.
        for round in 0..2u8 {
            let (frame, meta) = build(
                *spec,
                &payload(200 + index * 7, round),
                1000,
                TCP_ACK,
                false,
                false,
            );
            send(&mut vf, &frame, meta).expect("room in the ring");
            sent.push((frame, *spec));
        }
    }
    vf.flush();
    let wire = fake.take_transmitted(0);
    assert_eq!(wire.len(), sent.len());
    for (out, (frame, spec)) in wire.iter().zip(&sent) {
        assert_checksums_valid(out, *spec);
        let field = spec.field();
        assert_eq!(out.len(), frame.len());
        assert_eq!(out[..field], frame[..field], "{spec:?}");
        assert_eq!(out[field + 2..], frame[field + 2..], "{spec:?}");
    }
    let counters = vf.driver_counters();
    assert_eq!(counters.tx_checksum_offloaded, 10);
    assert_eq!(counters.tx_checksum_software, 0);
    assert_eq!(counters.tx_context_descriptors, 5, "one per layout change");
    assert!(fake.tx_faults(0).is_empty(), "{:?}", fake.tx_faults(0));
    let capabilities = vf.capabilities();
    assert!(capabilities.tx_checksum && capabilities.rx_checksum);
}

#[test]
fn short_frames_and_layouts_the_device_cannot_express_are_completed_in_software() {
    let (fake, mut vf) = start(64);
    // A pure ACK without options: 54 bytes, padded to 60 by the driver.
    let (mut ack, meta) = build(TCP4, &[], 77, TCP_ACK, false, false);
    ack.truncate(54);
    ack[16..18].copy_from_slice(&40u16.to_be_bytes());
    ack[24..26].fill(0);
    let ip_sum = !reference_sum(&ack[14..34]);
    ack[24..26].copy_from_slice(&ip_sum.to_be_bytes());
    ack[46] = 0x50; // data offset 5
    let pseudo = pseudo_header(&ack, TCP4, 20);
    ack[50..52].copy_from_slice(&pseudo.to_be_bytes());
    send(&mut vf, &ack, meta).expect("room");

    // IPv6 with an 8-byte hop-by-hop header before UDP: the checksum starts 48 bytes in.
    let mut extended = Vec::new();
    extended.extend_from_slice(&PEER_MAC);
    extended.extend_from_slice(&VF_MAC.0);
    extended.extend_from_slice(&[0x86, 0xdd, 0x60, 0, 0, 0, 0, 8 + 8 + 100, 0, 64]);
    extended.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
    extended.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
    extended.extend_from_slice(&[17, 0, 1, 4, 0, 0, 0, 0]);
    extended.extend_from_slice(&[0x13, 0x89, 0x9c, 0x40, 0, 108, 0, 0]);
    extended.extend_from_slice(&payload(100, 3));
    let mut pseudo_bytes = extended[22..54].to_vec();
    pseudo_bytes.extend_from_slice(&[0, 0, 0, 108, 0, 0, 0, 17]);
    let pseudo = reference_sum(&pseudo_bytes);
    extended[68..70].copy_from_slice(&pseudo.to_be_bytes());
    let extended_meta = TxMeta {
        checksum: Some((62, 6)),
        tso_mss: None,
    };
    send(&mut vf, &extended, extended_meta).expect("room");
    vf.flush();

    let wire = fake.take_transmitted(0);
    assert_eq!(wire.len(), 2);
    assert_eq!(wire[0].len(), 60);
    assert!(wire[0][54..].iter().all(|byte| *byte == 0), "zero padding");
    let mut tcp = pseudo_header(&wire[0], TCP4, 20).to_be_bytes().to_vec();
    tcp.extend_from_slice(&wire[0][34..54]);
    assert_eq!(reference_sum(&tcp), 0xffff, "ACK checksum");
    let mut udp = pseudo_bytes.clone();
    udp.extend_from_slice(&wire[1][62..]);
    assert_eq!(reference_sum(&udp), 0xffff, "UDP after an extension header");
    let counters = vf.driver_counters();
    assert_eq!(counters.tx_checksum_software, 2);
    assert_eq!(counters.tx_checksum_offloaded, 0);
    assert_eq!(
        counters.tx_bad_offload_requests, 0,
        "nothing wrong was asked"
    );
}

/// Sends one TSO frame of `len` bytes and returns (frame as handed over, wire segments).
fn send_tso(
    fake: &FakeIgb,
    vf: &mut Vf,
    spec: Spec,
    len: usize,
    sequence: u32,
    flags: u8,
) -> (Vec<u8>, Vec<Vec<u8>>) {
    let data = payload(len - spec.headers_len(), len as u8);
    let (frame, mut meta) = build(spec, &data, sequence, flags, false, false);
    assert_eq!(frame.len(), len);
    meta.tso_mss = Some(spec.mss());
    send(vf, &frame, meta).expect("TSO frame accepted");
    vf.flush();
    (frame, fake.take_transmitted(0))
}

/// Checks the segments of a TSO frame without FIN: sizes, payload, IP and TCP fields,
/// checksums.
fn assert_segments(frame: &[u8], segments: &[Vec<u8>], spec: Spec) {
    let headers = spec.headers_len();
    let (mac, start) = (spec.mac_len(), spec.start());
    let data = &frame[headers..];
    let mss = usize::from(spec.mss());
    let expected = data.len().div_ceil(mss);
    assert_eq!(segments.len(), expected);
    let mut joined = Vec::new();
    for (number, segment) in segments.iter().enumerate() {
        let payload_len = (data.len() - number * mss).min(mss);
        assert_eq!(segment.len(), headers + payload_len, "segment {number}");
        assert!(segment.len() <= 1514 + usize::from(spec.vlan) * 4);
        joined.extend_from_slice(&segment[headers..]);
        assert_eq!(segment[..12], frame[..12], "Ethernet addresses");
        if spec.ipv6 {
            assert_eq!(
                usize::from(be16(segment, mac + 4)),
                segment.len() - mac - 40
            );
            assert_eq!(segment[mac + 6..mac + 40], frame[mac + 6..mac + 40]);
        } else {
            assert_eq!(usize::from(be16(segment, mac + 2)), segment.len() - mac);
            assert_eq!(
                be16(segment, mac + 4),
                be16(frame, mac + 4).wrapping_add(number as u16),
                "IPv4 identification"
            );
            assert_eq!(be16(segment, mac + 6), 0x4000, "DF kept");
            assert_eq!(segment[mac + 12..mac + 20], frame[mac + 12..mac + 20]);
        }
        assert_eq!(
            be32(segment, start + 4),
            be32(frame, start + 4).wrapping_add((number * mss) as u32),
            "sequence number of segment {number}"
        );
        let flags = segment[start + 13];
        let original = frame[start + 13];
        let last = number + 1 == segments.len();
        assert_eq!(flags & TCP_ACK, original & TCP_ACK);
        assert_eq!(flags & TCP_PSH != 0, last && original & TCP_PSH != 0, "PSH");
        assert_eq!(
            flags & TCP_CWR != 0,
            number == 0 && original & TCP_CWR != 0,
            "CWR"
        );
        assert_eq!(flags & TCP_FIN, 0, "no FIN in data segments");
        assert_eq!(
            segment[start + 20..headers],
            frame[start + 20..headers],
            "options"
        );
        assert_checksums_valid(segment, spec);
    }
    assert_eq!(joined, data, "payloads concatenate to the original");
}

#[test]
fn a_20000_byte_tso_frame_leaves_as_valid_mss_sized_segments_over_ipv4_and_ipv6() {
    for spec in [TCP4, TCP6, TCP4_VLAN] {
        let (fake, mut vf) = start(64);
        assert!(vf.capabilities().max_tso_size >= 20_000);
        let flags = TCP_ACK | TCP_PSH | TCP_CWR;
        let (frame, segments) = send_tso(&fake, &mut vf, spec, 20_000, 0xFFFF_F000, flags);
        assert_segments(&frame, &segments, spec);
        vf.poll(0);
        let counters = vf.driver_counters();
        assert_eq!(counters.tx_segmentation_offloaded, 1);
        assert_eq!(counters.tx_fin_segments, 0);
        // One packet for the device, as QEMU's VFGPTC counts it: driver and hardware agree.
        assert_eq!(vf.stats().tx_frames, 1);
        assert_eq!(vf.stats().tx_bytes, 20_000);
        assert_eq!(vf.hardware_stats().tx_packets, 1);
        assert_eq!(vf.hardware_stats().tx_bytes, 20_004);
        assert!(fake.tx_faults(0).is_empty(), "{:?}", fake.tx_faults(0));
        assert!(vf.can_transmit(), "every slot came back");
    }
}

#[test]
fn a_tso_frame_carrying_fin_ends_with_a_header_only_fin_segment() {
    for spec in [TCP4, TCP6] {
        let (fake, mut vf) = start(64);
        let flags = TCP_ACK | TCP_PSH | TCP_FIN;
        let (frame, mut wire) = send_tso(&fake, &mut vf, spec, 9_000, 4242, flags);
        let fin = wire.pop().expect("segments");
        // The data segments: as without FIN, but PSH moved to the FIN segment too.
        let mut without_fin = frame.clone();
        without_fin[spec.start() + 13] &= !(TCP_FIN | TCP_PSH);
        assert_segments(&without_fin, &wire, spec);
        let (mac, start, headers) = (spec.mac_len(), spec.start(), spec.headers_len());
        assert_eq!(fin.len(), headers.max(60));
        assert_eq!(
            fin[start + 13],
            flags,
            "FIN, PSH and ACK on the last segment"
        );
        assert_eq!(
            be32(&fin, start + 4),
            4242 + (frame.len() - headers) as u32,
            "FIN follows the last data byte"
        );
        if !spec.ipv6 {
            assert_eq!(usize::from(be16(&fin, mac + 2)), headers - mac);
            assert_eq!(
                be16(&fin, mac + 4),
                be16(&frame, mac + 4).wrapping_add(wire.len() as u16)
            );
        }
        assert_checksums_valid(&fin, spec);
        assert_eq!(vf.driver_counters().tx_fin_segments, 1);
        assert!(fake.tx_faults(0).is_empty(), "{:?}", fake.tx_faults(0));
    }
}

#[test]
fn the_largest_tso_frame_fits_the_default_ring_and_the_devices_descriptor_limit() {
    let (fake, mut vf) = start_with(Config {
        rx_ring_size: 64,
        mailbox_timeout_ns: 5_000_000,
        ..Config::default()
    });
    let max = vf.capabilities().max_tso_size;
    assert_eq!(max, 65_535);
    let (frame, segments) = send_tso(&fake, &mut vf, TCP4, max + 14, 1, TCP_ACK);
    assert_segments(&frame, &segments, TCP4);
    assert_eq!(
        send(&mut vf, &alloc::vec![0u8; max + 19], TxMeta::default()),
        Err(DeviceError::FrameTooLarge {
            len: max + 19,
            max: max + 18
        })
    );
    assert!(fake.tx_faults(0).is_empty(), "{:?}", fake.tx_faults(0));
}

#[test]
fn a_tso_frame_that_does_not_fit_returns_ring_full_and_the_ring_stays_consistent() {
    let (fake, mut vf) = start(64);
    fake.stall_tx(0, true);
    let small = |seed: u8| build(TCP4, &payload(100, seed), 1, TCP_ACK, false, false);
    // 63 usable slots; a 20 000-byte TSO frame needs 10 data slots + context + FIN slot.
    let mut expected = Vec::new();
    for seed in 0..52 {
        let (frame, meta) = small(seed);
        send(&mut vf, &frame, meta).expect("room");
        expected.push(frame);
    }
    vf.flush();
    assert!(!vf.can_transmit(), "not enough room for the largest frame");
    let data = payload(20_000 - TCP4.headers_len(), 9);
    let (big, mut meta) = build(TCP4, &data, 5, TCP_ACK, false, false);
    meta.tso_mss = Some(MSS);
    let filled = Cell::new(false);
    let result = vf.transmit(big.len(), &mut |buffer: &mut [u8]| {
        filled.set(true);
        buffer.copy_from_slice(&big);
        meta
    });
    assert_eq!(result, Err(DeviceError::RingFull));
    assert!(!filled.get(), "the frame was not taken");
    assert_eq!(vf.stats().tx_ring_full, 1);

    fake.stall_tx(0, false);
    let wire = fake.take_transmitted(0);
    assert_eq!(wire.len(), expected.len());
    for (out, frame) in wire.iter().zip(&expected) {
        assert_eq!(out[..50], frame[..50]);
        assert_checksums_valid(out, TCP4);
    }
    vf.poll(0);
    assert!(vf.can_transmit());
    let (frame, segments) = send_tso(&fake, &mut vf, TCP4, 20_000, 5, TCP_ACK);
    assert_segments(&frame, &segments, TCP4);
    assert!(fake.tx_faults(0).is_empty(), "{:?}", fake.tx_faults(0));
    assert_eq!(fake.dma_faults(), 0);
}

#[test]
fn tso_frames_wrap_around_the_ring_whichever_descriptors_get_written_back() {
    let (fake, mut vf) = start(64);
    let mut packets = 0u64;
    for round in 0..40usize {
        // Half the time the device writes DD on every descriptor, half only on RS ones.
        fake.write_back_every_tx_descriptor(0, round % 2 == 0);
        let spec = if round % 3 == 0 { TCP6 } else { TCP4 };
        let len = 3_000 + (round * 1_777) % 25_000;
        let (frame, segments) =
            send_tso(&fake, &mut vf, spec, len, round as u32 * 100_000, TCP_ACK);
        assert_segments(&frame, &segments, spec);
        packets += 1;
        // A small checksum-offloaded frame between them shifts the alignment.
        let (small, meta) = build(UDP4, &payload(round * 13 % 900, 1), 0, 0, false, false);
        send(&mut vf, &small, meta).expect("room");
        vf.flush();
        let wire = fake.take_transmitted(0);
        assert_eq!(wire.len(), 1);
        assert_checksums_valid(&wire[0], UDP4);
        packets += 1;
        vf.poll(round as u64);
    }
    assert_eq!(vf.stats().tx_frames, packets);
    assert!(vf.can_transmit());
    assert!(fake.tx_faults(0).is_empty(), "{:?}", fake.tx_faults(0));
    assert_eq!(fake.dma_faults(), 0);
}

#[test]
fn hostile_offload_metadata_is_counted_and_never_reaches_the_device() {
    let (fake, mut vf) = start(64);
    let (frame, meta) = build(TCP4, &payload(100, 1), 1, TCP_ACK, false, false);
    let bad = |vf: &Vf| vf.driver_counters().tx_bad_offload_requests;

    // Checksum field beyond the frame: dropped, counted.
    for location in [
        (100u16, 100u16),
        (u16::MAX, u16::MAX),
        (frame.len() as u16 - 1, 0),
    ] {
        let meta = TxMeta {
            checksum: Some(location),
            tso_mss: None,
        };
        assert_eq!(send(&mut vf, &frame, meta), Ok(()));
    }
    assert_eq!(vf.driver_counters().tx_refused, 3);
    assert_eq!(bad(&vf), 3);

    // Segmentation of a UDP frame above the MTU, MSS 0, no checksum offload, an MSS beyond
    // the MTU, a TCP header length beyond the frame, an IP length that disagrees: refused.
    let (udp, mut udp_meta) = build(UDP4, &payload(3_000, 2), 0, 0, false, false);
    udp_meta.tso_mss = Some(MSS);
    let (tcp, tcp_meta) = build(TCP4, &payload(5_000, 3), 1, TCP_ACK, false, false);
    let mut bad_header = tcp.clone();
    bad_header[34 + 12] = 0x40; // a 16-byte TCP header
    let mut bad_length = tcp.clone();
    bad_length[16..18].copy_from_slice(&1000u16.to_be_bytes());
    let cases: [(&[u8], TxMeta); 6] = [
        (&udp, udp_meta),
        (
            &tcp,
            TxMeta {
                tso_mss: Some(0),
                ..tcp_meta
            },
        ),
        (
            &tcp,
            TxMeta {
                checksum: None,
                tso_mss: Some(MSS),
            },
        ),
        (
            &tcp,
            TxMeta {
                tso_mss: Some(9_000),
                ..tcp_meta
            },
        ),
        (
            &bad_header,
            TxMeta {
                tso_mss: Some(MSS),
                ..tcp_meta
            },
        ),
        (
            &bad_length,
            TxMeta {
                tso_mss: Some(MSS),
                ..tcp_meta
            },
        ),
    ];
    for (frame, meta) in cases {
        assert_eq!(
            send(&mut vf, frame, meta),
            Err(DeviceError::FrameTooLarge {
                len: frame.len(),
                max: 1518
            }),
            "{meta:?}"
        );
    }
    assert_eq!(bad(&vf), 9);
    assert_eq!(vf.driver_counters().tx_refused, 9);

    // Within the MTU the impossible part is ignored and the frame still goes out right.
    let (small_udp, mut small_meta) = build(UDP4, &payload(300, 4), 0, 0, false, false);
    small_meta.tso_mss = Some(MSS);
    send(&mut vf, &small_udp, small_meta).expect("sent");
    send(
        &mut vf,
        &frame,
        TxMeta {
            checksum: None,
            tso_mss: Some(MSS),
        },
    )
    .expect("sent");
    vf.flush();
    let wire = fake.take_transmitted(0);
    assert_eq!(wire.len(), 2);
    assert_checksums_valid(&wire[0], UDP4);
    assert_eq!(wire[1], frame, "sent as written");
    assert_eq!(bad(&vf), 11);
    assert_eq!(vf.driver_counters().tx_refused, 9);

    // Any combination of lengths and metadata: no panic, and the device never sees a
    // descriptor it cannot make sense of.
    let starts = [0u16, 13, 14, 33, 34, 54, 1000, u16::MAX];
    let offsets = [0u16, 6, 16, 40, u16::MAX];
    let mss_values = [
        None,
        Some(0u16),
        Some(1),
        Some(100),
        Some(MSS),
        Some(u16::MAX),
    ];
    for len in [
        1usize, 13, 14, 40, 54, 60, 100, 1514, 1518, 1519, 3_000, 12_000,
    ] {
        let (full, _) = build(
            TCP4,
            &payload(len.saturating_sub(66), 5),
            9,
            TCP_ACK,
            false,
            false,
        );
        let frame = &full[..len.min(full.len())];
        for start in starts {
            for offset in offsets {
                for tso_mss in mss_values {
                    let meta = TxMeta {
                        checksum: Some((start, offset)),
                        tso_mss,
                    };
                    match send(&mut vf, frame, meta) {
                        Ok(()) | Err(DeviceError::FrameTooLarge { .. }) => {}
                        Err(DeviceError::RingFull) => {
                            vf.flush();
                            fake.take_transmitted(0);
                            vf.poll(0);
                            let again = send(&mut vf, frame, meta);
                            assert!(!matches!(again, Err(DeviceError::RingFull)));
                        }
                        Err(other) => panic!("{other:?}"),
                    }
                }
            }
        }
        vf.flush();
        fake.take_transmitted(0);
        vf.poll(0);
    }
    assert!(fake.tx_faults(0).is_empty(), "{:?}", fake.tx_faults(0));
    assert_eq!(fake.dma_faults(), 0);
    // The ring is still in order.
    send(&mut vf, &frame, meta).expect("sent");
    vf.flush();
    let wire = fake.take_transmitted(0);
    assert_eq!(wire.len(), 1);
    assert_checksums_valid(&wire[0], TCP4);
    vf.poll(0);
    assert!(vf.can_transmit());
}

#[test]
fn without_offloads_checksum_requests_are_completed_in_software() {
    let (fake, mut vf) = start_with(Config {
        offloads: false,
        ..config(64)
    });
    let capabilities = vf.capabilities();
    assert!(!capabilities.tx_checksum);
    assert_eq!(capabilities.max_tso_size, 0);
    let (frame, meta) = build(TCP6, &payload(500, 6), 3, TCP_ACK, false, false);
    send(&mut vf, &frame, meta).expect("sent");
    let (big, mut big_meta) = build(TCP4, &payload(5_000, 6), 3, TCP_ACK, false, false);
    big_meta.tso_mss = Some(MSS);
    assert!(matches!(
        send(&mut vf, &big, big_meta),
        Err(DeviceError::FrameTooLarge { max: 1518, .. })
    ));
    vf.flush();
    let wire = fake.take_transmitted(0);
    assert_eq!(wire.len(), 1);
    assert_checksums_valid(&wire[0], TCP6);
    let counters = vf.driver_counters();
    assert_eq!(counters.tx_checksum_software, 1);
    assert_eq!(counters.tx_context_descriptors, 0);
}

#[test]
fn the_largest_tso_frame_follows_the_ring_size() {
    for (ring, expected) in [(16u16, 5 * 2048 - 18), (64, 29 * 2048 - 18), (256, 65_535)] {
        let (_fake, vf) = start(ring);
        assert_eq!(vf.capabilities().max_tso_size, expected, "ring {ring}");
    }
}

#[test]
fn contexts_are_written_again_after_reinitialisation() {
    let (fake, mut vf) = start(64);
    let (frame, meta) = build(TCP4, &payload(300, 7), 3, TCP_ACK, false, false);
    for _ in 0..2 {
        send(&mut vf, &frame, meta).expect("sent");
        vf.flush();
        vf.reinitialize().expect("reinitialise");
    }
    send(&mut vf, &frame, meta).expect("sent");
    vf.flush();
    let wire = fake.take_transmitted(0);
    assert_eq!(wire.len(), 3);
    wire.iter()
        .for_each(|out| assert_checksums_valid(out, TCP4));
    assert_eq!(vf.driver_counters().tx_context_descriptors, 3);
    assert!(fake.tx_faults(0).is_empty(), "{:?}", fake.tx_faults(0));
}

fn receive_one(vf: &mut Vf) -> (Vec<u8>, RxMeta) {
    let mut got = Vec::new();
    vf.receive(8, &mut |data, meta| got.push((data.to_vec(), meta)));
    assert_eq!(got.len(), 1);
    got.pop().expect("one frame")
}

#[test]
fn received_checksums_are_reported_verified_only_when_the_device_checked_them_all() {
    let (fake, mut vf) = start(64);
    let inject = |frame: &[u8]| assert!(fake.inject_rx_frame(0, frame));

    for spec in [TCP4, UDP4, TCP6, UDP6] {
        let (good, _) = build(spec, &payload(300, 8), 1, TCP_ACK, true, true);
        inject(&good);
        let (data, meta) = receive_one(&mut vf);
        assert_eq!(data, good);
        assert!(meta.checksum_verified, "{spec:?}");
    }

    // A corrupted TCP payload and a corrupted IPv4 header: delivered unverified, counted.
    let (mut bad_l4, _) = build(TCP4, &payload(300, 9), 1, TCP_ACK, true, true);
    bad_l4[100] ^= 0x40;
    inject(&bad_l4);
    let (data, meta) = receive_one(&mut vf);
    assert_eq!(data, bad_l4);
    assert!(!meta.checksum_verified);
    let (mut bad_ip, _) = build(UDP4, &payload(300, 9), 1, 0, true, true);
    bad_ip[22] ^= 0x01; // TTL
    inject(&bad_ip);
    assert!(!receive_one(&mut vf).1.checksum_verified);
    assert_eq!(vf.driver_counters().rx_checksum_errors, 2);

    // ICMP (only the IP header is checked) and non-IP frames are left to the stack.
    let (mut icmp, _) = build(UDP4, &payload(56, 1), 0, 0, true, true);
    icmp[23] = 1;
    icmp[24..26].fill(0);
    let ip_sum = !reference_sum(&icmp[14..34]);
    icmp[24..26].copy_from_slice(&ip_sum.to_be_bytes());
    inject(&icmp);
    assert!(!receive_one(&mut vf).1.checksum_verified);
    let mut arp = icmp.clone();
    arp[12..14].copy_from_slice(&[0x08, 0x06]);
    inject(&arp);
    assert!(!receive_one(&mut vf).1.checksum_verified);
    // A device claiming an L4 check for a frame that is not IP is not believed.
    let tweak = RxWriteBackOverride {
        extra_status: 0x30,
        ..Default::default()
    };
    assert!(fake.inject_rx_frame_with(0, &arp, tweak));
    assert!(!receive_one(&mut vf).1.checksum_verified);

    // The PF turns TCP/UDP checksum offload off: good frames are no longer vouched for.
    let registers = fake.pf_registers();
    let rxcsum = registers.read32(pf::RXCSUM);
    registers.write32(pf::RXCSUM, rxcsum & !pf::RXCSUM_L4_OFFLOAD);
    let (good, _) = build(TCP4, &payload(300, 10), 1, TCP_ACK, true, true);
    inject(&good);
    assert!(!receive_one(&mut vf).1.checksum_verified);

    let counters = vf.driver_counters();
    assert_eq!(counters.rx_checksum_verified, 4);
    assert_eq!(counters.rx_checksum_errors, 2);
    assert_eq!(
        vf.stats().rx_dropped_bad,
        0,
        "checksum errors are not frame errors"
    );
}

#[test]
fn every_offload_counter_moves() {
    let (fake, mut vf) = start(64);
    let (frame, meta) = build(TCP4, &payload(300, 11), 1, TCP_ACK, false, false);
    send(&mut vf, &frame, meta).expect("sent");
    send_tso(&fake, &mut vf, TCP4, 8_000, 1, TCP_ACK | TCP_FIN);
    let (ack, ack_meta) = build(UDP4, &[1], 0, 0, false, false);
    send(&mut vf, &ack, ack_meta).expect("sent");
    send(
        &mut vf,
        &frame,
        TxMeta {
            checksum: Some((2000, 0)),
            tso_mss: None,
        },
    )
    .expect("dropped");
    let (good, _) = build(TCP4, &payload(300, 12), 1, TCP_ACK, true, true);
    assert!(fake.inject_rx_frame(0, &good));
    let mut bad = good.clone();
    bad[200] ^= 1;
    assert!(fake.inject_rx_frame(0, &bad));
    vf.receive(8, &mut |_, _| {});
    let c = vf.driver_counters();
    let all = [
        c.tx_checksum_offloaded,
        c.tx_segmentation_offloaded,
        c.tx_context_descriptors,
        c.tx_checksum_software,
        c.tx_fin_segments,
        c.tx_bad_offload_requests,
        c.tx_refused,
        c.rx_checksum_verified,
        c.rx_checksum_errors,
    ];
    assert!(all.iter().all(|count| *count > 0), "{c:?}");
}
