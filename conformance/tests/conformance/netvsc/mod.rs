//! Our netvsc driver against OpenVMM's netvsp (channel level, through a mock `ParentBus`):
//! every NVSP version netvsp accepts, frames of every length both ways, checksum and LSO
//! metadata, receive-buffer exhaustion, link changes, with and without a send buffer, rescind.

mod bench;
mod control_plane;
mod harness;
mod stack;
mod vf;

use std::time::{Duration, Instant};

use harness::{HOST_MAC, HostOptions, NetvspChannel, NetvspHost};
use net_backend::{L4Protocol, RxChecksumState, RxMetadata};
use net_device::{LinkState, MacAddress, NetDevice, RxMeta, TxMeta};
use netvsc_fallback::netvsc::nvsp::NvspVersion;
use netvsc_fallback::netvsc::{Netvsc, NetvscConfig};

/// Polls and receives until `done` says so or `timeout` passes; returns the frames received.
fn receive_until(
    device: &mut Netvsc<NetvspChannel>,
    timeout: Duration,
    mut done: impl FnMut(&[(Vec<u8>, RxMeta)], &Netvsc<NetvspChannel>) -> bool,
) -> Vec<(Vec<u8>, RxMeta)> {
    let started = Instant::now();
    let mut frames = Vec::new();
    while started.elapsed() < timeout {
        device.poll(0);
        device.receive(64, &mut |frame, meta| frames.push((frame.to_vec(), meta)));
        if done(&frames, device) {
            break;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    frames
}

fn send(device: &mut Netvsc<NetvspChannel>, frame: &[u8], meta: TxMeta) {
    let started = Instant::now();
    loop {
        device.poll(0);
        let result = device.transmit(frame.len(), &mut |buffer| {
            buffer.copy_from_slice(frame);
            meta
        });
        match result {
            Ok(()) => break,
            Err(net_device::DeviceError::RingFull)
                if started.elapsed() < Duration::from_secs(5) =>
            {
                std::thread::sleep(Duration::from_micros(100));
            }
            Err(error) => panic!("transmit of {} bytes failed: {error}", frame.len()),
        }
    }
    device.flush();
}

/// Waits until the endpoint has captured `count` frames.
fn wait_transmitted(
    host: &NetvspHost,
    device: &mut Netvsc<NetvspChannel>,
    count: usize,
) -> Vec<(Vec<u8>, net_backend::TxMetadata)> {
    let started = Instant::now();
    let mut frames = Vec::new();
    while frames.len() < count && started.elapsed() < Duration::from_secs(10) {
        device.poll(0);
        frames.extend(host.take_transmitted());
        std::thread::sleep(Duration::from_micros(100));
    }
    frames
}

fn frame_of(len: usize, seed: u8) -> Vec<u8> {
    let mut frame: Vec<u8> = (0..len)
        .map(|i| (i as u8).wrapping_mul(13).wrapping_add(seed))
        .collect();
    frame[..6].copy_from_slice(&HOST_MAC);
    frame[12] = 0x88;
    frame[13] = 0xb5;
    frame
}

fn config(versions: &[NvspVersion], use_send_buffer: bool) -> NetvscConfig {
    NetvscConfig {
        versions: versions.to_vec(),
        use_send_buffer,
        ..NetvscConfig::default()
    }
}

#[test]
fn every_nvsp_version_netvsp_accepts_comes_up() {
    for version in NvspVersion::NEGOTIATION_ORDER {
        for use_send_buffer in [true, false] {
            let (host, mut device) = NetvspHost::with_driver(
                HostOptions::default(),
                config(&[version], use_send_buffer),
            );
            let negotiated = device.negotiated();
            assert_eq!(negotiated.version, version);
            assert_eq!(negotiated.send_section_size.is_some(), use_send_buffer);
            assert_eq!(device.mac_address(), MacAddress(HOST_MAC));
            assert_eq!(device.capabilities().mtu, 1500);
            assert_eq!(device.link_state(), LinkState::Up);
            // One frame each way proves the data path at this version.
            let frame = frame_of(100, version.0 as u8);
            send(&mut device, &frame, TxMeta::default());
            let sent = wait_transmitted(&host, &mut device, 1);
            assert_eq!(sent.len(), 1, "NVSP {version}");
            assert_eq!(sent[0].0, frame);
            host.inject(frame.clone(), RxMetadata::default());
            let received = receive_until(&mut device, Duration::from_secs(10), |frames, _| {
                !frames.is_empty()
            });
            assert_eq!(received.len(), 1, "NVSP {version}");
            assert_eq!(received[0].0, frame);
        }
    }
}

#[test]
fn the_default_negotiation_lands_on_6_1() {
    let (_host, device) = NetvspHost::with_driver(HostOptions::default(), NetvscConfig::default());
    assert_eq!(device.negotiated().version, NvspVersion::V61);
    let capabilities = device.capabilities();
    assert!(capabilities.tx_checksum && capabilities.rx_checksum);
    assert!(capabilities.max_tso_size > 60_000, "{capabilities:?}");
}

fn every_length_both_ways(use_send_buffer: bool) {
    let (host, mut device) = NetvspHost::with_driver(
        HostOptions::default(),
        config(&NvspVersion::NEGOTIATION_ORDER, use_send_buffer),
    );
    let mut expected = Vec::new();
    for len in 14..=1514 {
        let frame = frame_of(len, len as u8);
        send(&mut device, &frame, TxMeta::default());
        expected.push(frame);
    }
    let sent = wait_transmitted(&host, &mut device, expected.len());
    assert_eq!(sent.len(), expected.len());
    for ((frame, metadata), wanted) in sent.iter().zip(&expected) {
        assert_eq!(frame, wanted, "transmitted {} bytes", wanted.len());
        assert!(
            !metadata.flags.offload_tcp_checksum() && !metadata.flags.offload_tcp_segmentation()
        );
    }
    for frame in &expected {
        host.inject(frame.clone(), RxMetadata::default());
    }
    let received = receive_until(&mut device, Duration::from_secs(30), |frames, _| {
        frames.len() >= expected.len()
    });
    assert_eq!(received.len(), expected.len());
    for ((frame, _), wanted) in received.iter().zip(&expected) {
        assert_eq!(frame, wanted, "received {} bytes", wanted.len());
    }
    assert_eq!(device.transmits_in_flight(), 0);
    assert_eq!(
        device.counters().bad_ranges + device.counters().bad_packets,
        0
    );
}

#[test]
fn frames_of_every_length_pass_both_ways_with_a_send_buffer() {
    every_length_both_ways(true);
}

#[test]
fn frames_of_every_length_pass_both_ways_gpa_direct() {
    every_length_both_ways(false);
}

#[test]
fn a_burst_past_the_64_sections_goes_gpa_direct_and_arrives_byte_exact() {
    let (host, mut device) =
        NetvspHost::with_driver(HostOptions::default(), NetvscConfig::default());
    // 100 frames back to back, no poll in between: completions cannot free a section, so 64
    // take sections and 36 go GPA-direct from the overflow slots, none refused.
    let frames: Vec<Vec<u8>> = (0..100).map(|i| frame_of(60 + i * 14, i as u8)).collect();
    for (i, frame) in frames.iter().enumerate() {
        assert!(device.can_transmit(), "room reported for frame {i}");
        let result = device.transmit(frame.len(), &mut |buffer| {
            buffer.copy_from_slice(frame);
            TxMeta::default()
        });
        assert_eq!(result, Ok(()), "frame {i}");
    }
    device.flush();
    let counters = device.counters();
    assert_eq!(
        (counters.tx_via_section, counters.tx_via_gpa_direct),
        (64, 36)
    );
    assert_eq!(counters.tx_section_overflow, 36);
    assert_eq!(
        counters.tx_refused_ring_full + counters.tx_refused_no_buffer,
        0
    );
    let sent = wait_transmitted(&host, &mut device, frames.len());
    assert_eq!(sent.len(), frames.len());
    for (i, ((frame, _), wanted)) in sent.iter().zip(&frames).enumerate() {
        assert_eq!(frame, wanted, "frame {i} byte-exact");
    }
    // netvsp completed every send, each freeing what its frame used.
    receive_until(&mut device, Duration::from_secs(10), |_, device| {
        device.transmits_in_flight() == 0
    });
    assert_eq!(device.transmits_in_flight(), 0);
    assert_eq!(device.counters().bad_packets, 0);
    assert_eq!(device.stats().tx_frames, 100);
}

/// An Ethernet + IPv4 + TCP frame whose checksum field holds the pseudo-header sum (what the
/// stack hands a device with checksum offload).
fn partial_tcp_frame(payload_len: usize) -> Vec<u8> {
    let mut frame = Vec::new();
    frame.extend_from_slice(&HOST_MAC);
    frame.extend_from_slice(&[0x02, 0, 0, 0, 0, 1]);
    frame.extend_from_slice(&[0x08, 0x00]);
    let total = (40 + payload_len) as u16;
    let mut ip = vec![
        0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, 6, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2,
    ];
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    let checksum = !net_device::checksum::reference(&ip);
    ip[10..12].copy_from_slice(&checksum.to_be_bytes());
    frame.extend_from_slice(&ip);
    let mut tcp = vec![
        0x1f, 0x90, 0xc3, 0x50, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x18, 0xff, 0xff, 0, 0, 0, 0,
    ];
    let tcp_len = (20 + payload_len) as u16;
    let mut pseudo = ip[12..20].to_vec();
    pseudo.extend_from_slice(&[0, 6]);
    pseudo.extend_from_slice(&tcp_len.to_be_bytes());
    tcp[16..18].copy_from_slice(&net_device::checksum::reference(&pseudo).to_be_bytes());
    frame.extend_from_slice(&tcp);
    frame.extend((0..payload_len).map(|i| (i * 7) as u8));
    frame
}

#[test]
fn checksum_offload_metadata_goes_both_ways() {
    let (host, mut device) =
        NetvspHost::with_driver(HostOptions::default(), NetvscConfig::default());
    let frame = partial_tcp_frame(500);
    send(
        &mut device,
        &frame,
        TxMeta {
            checksum: Some((34, 16)),
            tso_mss: None,
        },
    );
    let sent = wait_transmitted(&host, &mut device, 1);
    assert_eq!(sent.len(), 1);
    let (bytes, metadata) = &sent[0];
    assert_eq!(bytes, &frame);
    assert!(metadata.flags.offload_tcp_checksum());
    assert!(metadata.flags.is_ipv4());
    assert!(!metadata.flags.offload_tcp_segmentation());
    assert_eq!(metadata.l2_len, 14);
    assert_eq!(metadata.l3_len, 20);
    // Receive: netvsp's verdict reaches RxMeta.
    let good = RxMetadata {
        ip_checksum: RxChecksumState::Good,
        l4_checksum: RxChecksumState::Good,
        l4_protocol: L4Protocol::Tcp,
        ..RxMetadata::default()
    };
    let bad = RxMetadata {
        l4_checksum: RxChecksumState::Bad,
        ..good
    };
    host.inject(frame.clone(), good);
    host.inject(frame.clone(), bad);
    host.inject(frame.clone(), RxMetadata::default());
    let received = receive_until(&mut device, Duration::from_secs(10), |frames, _| {
        frames.len() >= 3
    });
    assert_eq!(received.len(), 3);
    assert!(received[0].1.checksum_verified);
    assert!(!received[1].1.checksum_verified);
    assert!(!received[2].1.checksum_verified);
}

#[test]
fn large_tcp_frames_leave_with_lso_metadata_and_intact_headers() {
    let (host, mut device) =
        NetvspHost::with_driver(HostOptions::default(), NetvscConfig::default());
    let max = device.capabilities().max_tso_size + 14;
    let frame = partial_tcp_frame(max - 54);
    send(
        &mut device,
        &frame,
        TxMeta {
            checksum: Some((34, 16)),
            tso_mss: Some(1448),
        },
    );
    let sent = wait_transmitted(&host, &mut device, 1);
    assert_eq!(sent.len(), 1);
    let (bytes, metadata) = &sent[0];
    assert_eq!(bytes.len(), frame.len());
    assert!(metadata.flags.offload_tcp_segmentation());
    assert!(metadata.flags.offload_tcp_checksum());
    assert!(metadata.flags.is_ipv4());
    assert_eq!(metadata.max_segment_size, 1448);
    assert_eq!(metadata.l2_len, 14);
    assert_eq!(metadata.l3_len, 20);
    // Headers as Windows LSO v2 wants them (Linux's netvsc sends the same): IPv4 total length
    // and header checksum zero, TCP checksum = pseudo-header sum without length, the rest
    // unchanged.
    assert_eq!(bytes[16..18], [0, 0]);
    assert_eq!(bytes[24..26], [0, 0]);
    assert_eq!(bytes[..16], frame[..16]);
    assert_eq!(bytes[18..24], frame[18..24]);
    assert_eq!(bytes[26..50], frame[26..50]);
    let mut pseudo = frame[26..34].to_vec();
    pseudo.extend_from_slice(&[0, 6, 0, 0]);
    assert_eq!(
        bytes[50..52],
        net_device::checksum::reference(&pseudo).to_be_bytes()
    );
    assert_eq!(bytes[52..], frame[52..]);
    assert_eq!(device.counters().lso_frames, 1);
}

#[test]
fn receive_buffer_exhaustion_loses_nothing() {
    // 64 KiB: 36 sub-allocations, 16 reserved for control: 20 frames in flight at most.
    let config = NetvscConfig {
        receive_buffer_len: 64 * 1024,
        ..NetvscConfig::default()
    };
    let (host, mut device) = NetvspHost::with_driver(HostOptions::default(), config);
    let frames: Vec<Vec<u8>> = (0..400).map(|i| frame_of(200 + i * 3, i as u8)).collect();
    for frame in &frames {
        host.inject(frame.clone(), RxMetadata::default());
    }
    // Without our completions the host must stop: give it time, then check it waited.
    std::thread::sleep(Duration::from_millis(200));
    device.poll(0);
    assert!(
        host.queued_rx() > 300,
        "netvsp took {} frames without completions",
        400 - host.queued_rx()
    );
    let received = receive_until(&mut device, Duration::from_secs(30), |got, _| {
        got.len() >= frames.len()
    });
    assert_eq!(received.len(), frames.len());
    for ((frame, _), wanted) in received.iter().zip(&frames) {
        assert_eq!(frame, wanted);
    }
    assert_eq!(host.queued_rx(), 0);
    // The buffer still works afterwards (nothing leaked on either side).
    let more: Vec<Vec<u8>> = (0..100).map(|i| frame_of(1514, i as u8)).collect();
    for frame in &more {
        host.inject(frame.clone(), RxMetadata::default());
    }
    let received = receive_until(&mut device, Duration::from_secs(30), |got, _| {
        got.len() >= more.len()
    });
    assert_eq!(received.len(), more.len());
}

#[test]
fn link_down_and_up_reach_the_device_and_a_flap_s_second_edge_comes_5_s_later() {
    let (host, mut device) =
        NetvspHost::with_driver(HostOptions::default(), NetvscConfig::default());
    host.set_link(&[false]);
    receive_until(&mut device, Duration::from_secs(10), |_, device| {
        device.link_state() == LinkState::Down
    });
    assert_eq!(device.link_state(), LinkState::Down);
    assert!(!device.can_transmit());
    host.set_link(&[true]);
    receive_until(&mut device, Duration::from_secs(10), |_, device| {
        device.link_state() == LinkState::Up
    });
    assert_eq!(device.link_state(), LinkState::Up);
    // A flap (down and straight back up): netvsp sends the first edge at once and holds the
    // second back for 5 s (LINK_DELAY_DURATION outside its own unit tests). The device follows
    // each edge as it arrives; it neither misses the outage nor invents a longer one.
    let flapped_at = Instant::now();
    host.set_link(&[false, true]);
    receive_until(&mut device, Duration::from_secs(10), |_, device| {
        device.link_state() == LinkState::Down
    });
    assert_eq!(device.link_state(), LinkState::Down);
    receive_until(&mut device, Duration::from_secs(15), |_, device| {
        device.link_state() == LinkState::Up
    });
    assert_eq!(device.link_state(), LinkState::Up);
    let outage = flapped_at.elapsed();
    assert!(
        outage >= Duration::from_secs(4),
        "second edge after {outage:?}"
    );
    assert_eq!(device.counters().link_indications, 4);
    // Traffic flows again.
    let frame = frame_of(64, 9);
    send(&mut device, &frame, TxMeta::default());
    assert_eq!(wait_transmitted(&host, &mut device, 1).len(), 1);
}

#[test]
fn rescind_mid_traffic_reports_gone_and_nothing_panics() {
    let (host, mut device) = NetvspHost::with_driver(
        HostOptions::default(),
        config(&NvspVersion::NEGOTIATION_ORDER, false),
    );
    for i in 0..50 {
        send(&mut device, &frame_of(600, i), TxMeta::default());
        host.inject(frame_of(700, i), RxMetadata::default());
    }
    receive_until(&mut device, Duration::from_millis(50), |_, _| false);
    host.rescind();
    receive_until(&mut device, Duration::from_secs(5), |_, device| {
        device.link_state() == LinkState::Gone
    });
    assert_eq!(device.link_state(), LinkState::Gone);
    assert!(!device.can_transmit());
    assert_eq!(
        device.transmit(60, &mut |_| TxMeta::default()),
        Err(net_device::DeviceError::Gone)
    );
    device.stop();
    assert_eq!(device.link_state(), LinkState::Gone);
}

#[test]
fn stop_closes_the_channel_and_netvsp_releases_every_buffer() {
    for use_send_buffer in [true, false] {
        let (host, mut device) = NetvspHost::with_driver(
            HostOptions::default(),
            config(&NvspVersion::NEGOTIATION_ORDER, use_send_buffer),
        );
        send(&mut device, &frame_of(300, 1), TxMeta::default());
        assert_eq!(wait_transmitted(&host, &mut device, 1).len(), 1);
        device.stop();
        assert_eq!(device.link_state(), LinkState::Gone);
        drop(device);
        // Rings, receive and send buffer GPADLs were torn down with netvsp's agreement, so
        // every page went back to the allocator.
        assert_eq!(host.dma.free_bytes(), host.dma.size());
    }
}
