//! Host tests of the driver against the fake virtio-net device.

use net_device::{
    DeviceError, DmaAllocator, LinkState, MacAddress, NetDevice, RegisterIo, RxMeta, TxMeta,
};

use crate::checksum::tests::{make_partial, tcp_ipv4_frame};
use crate::fake::{FakeDeviceConfig, FakeDmaAllocator, FakeError, FakeVirtioNet, FakeWindow};
use crate::pci::registers;
use crate::{
    DeviceStatus, Error, Features, MsixTarget, MsixVectors, NetHeaderFlags, QueueKind, VirtioNet,
    VirtioNetConfig, VirtioNetHeader,
};

type Driver = VirtioNet<FakeWindow, FakeDmaAllocator>;

const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const RX: u16 = 0;
const TX: u16 = 1;
/// Well past the health check interval, so each poll at `tick(n)` reads device status.
const fn tick(n: u64) -> u64 {
    n * 20_000_000
}

struct Setup {
    device: FakeVirtioNet,
    allocator: FakeDmaAllocator,
    driver: Driver,
}

fn setup_with(device_config: FakeDeviceConfig, driver_config: VirtioNetConfig) -> Setup {
    let device = FakeVirtioNet::new(device_config);
    let allocator = FakeDmaAllocator::new();
    let driver = VirtioNet::new(device.regions(), allocator.clone(), driver_config)
        .expect("driver initialises");
    Setup {
        device,
        allocator,
        driver,
    }
}

fn setup() -> Setup {
    setup_with(FakeDeviceConfig::default(), VirtioNetConfig::default())
}

fn try_init(
    device: &FakeVirtioNet,
    config: VirtioNetConfig,
) -> (Result<Driver, Error>, FakeDmaAllocator) {
    let allocator = FakeDmaAllocator::new();
    (
        VirtioNet::new(device.regions(), allocator.clone(), config),
        allocator,
    )
}

/// An Ethernet frame of `len` bytes to our MAC with a recognisable payload.
fn test_frame(len: usize, seed: u8) -> Vec<u8> {
    let mut frame: Vec<u8> = (0..len)
        .map(|index| (index as u8).wrapping_mul(31).wrapping_add(seed))
        .collect();
    frame[..6].copy_from_slice(&MAC);
    frame[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, seed]);
    frame[12..14].copy_from_slice(&[0x88, 0xB5]);
    frame
}

fn receive_all(driver: &mut Driver) -> Vec<(Vec<u8>, RxMeta)> {
    let mut frames = Vec::new();
    driver.receive(1024, &mut |frame, meta| frames.push((frame.to_vec(), meta)));
    frames
}

fn send(driver: &mut Driver, frame: &[u8], meta: TxMeta) -> Result<(), DeviceError> {
    driver.transmit(frame.len(), &mut |buffer| {
        buffer.copy_from_slice(frame);
        meta
    })
}

fn expected_features() -> Features {
    Features::VERSION_1
        | Features::MAC
        | Features::STATUS
        | Features::MRG_RXBUF
        | Features::CSUM
        | Features::GUEST_CSUM
        | Features::RING_EVENT_IDX
        | Features::STANDBY
        | Features::MTU
        | Features::CTRL_VQ
        | Features::GUEST_ANNOUNCE
        | Features::HOST_TSO4
        | Features::HOST_TSO6
}

#[test]
fn init_negotiates_the_expected_features() {
    let Setup { device, driver, .. } = setup();
    assert_eq!(device.driver_features(), expected_features());
    assert_eq!(driver.negotiated_features(), expected_features());
    assert!(driver.is_standby());
    assert_eq!(
        device.device_status(),
        DeviceStatus::ACKNOWLEDGE
            | DeviceStatus::DRIVER
            | DeviceStatus::FEATURES_OK
            | DeviceStatus::DRIVER_OK
    );
    assert_eq!(driver.mac_address(), MacAddress(MAC));
    assert_eq!(driver.link_state(), LinkState::Up);
    let capabilities = driver.capabilities();
    assert_eq!(capabilities.mtu, 1500);
    assert!(capabilities.tx_checksum && capabilities.rx_checksum);
    assert_eq!(capabilities.max_tso_size, 65_535);
    assert_eq!(
        (
            device.queue_size(RX),
            device.queue_size(TX),
            device.queue_size(2)
        ),
        (256, 256, 16)
    );
    assert!(device.queue_enabled(RX) && device.queue_enabled(TX) && device.queue_enabled(2));
    assert_eq!(
        device.available_rx_buffers(),
        256,
        "every receive buffer posted at init"
    );
    assert_eq!(device.notifications(RX), 1, "one doorbell after DRIVER_OK");
    assert_eq!(
        device.width_violations(),
        0,
        "every field accessed with its natural width"
    );
}

#[test]
fn only_offered_features_are_negotiated() {
    let device_config = FakeDeviceConfig {
        features: Features::VERSION_1
            | Features::MAC
            | Features::HOST_TSO4
            | Features::GUEST_ANNOUNCE,
        ..FakeDeviceConfig::default()
    };
    let Setup {
        device, mut driver, ..
    } = setup_with(device_config, VirtioNetConfig::default());
    // HOST_TSO4 without CSUM and GUEST_ANNOUNCE without CTRL_VQ must be refused.
    assert_eq!(
        device.driver_features(),
        Features::VERSION_1 | Features::MAC
    );
    let capabilities = driver.capabilities();
    assert!(!capabilities.tx_checksum && !capabilities.rx_checksum);
    assert_eq!(capabilities.max_tso_size, 0);
    assert!(!driver.is_standby());
    // Without STATUS the link is assumed up, and traffic flows over the legacy-style buffers.
    assert_eq!(driver.link_state(), LinkState::Up);
    assert!(!device.queue_enabled(2));
    device.inject_rx_frame(&test_frame(1514, 1)).unwrap();
    assert_eq!(
        receive_all(&mut driver),
        vec![(test_frame(1514, 1), RxMeta::default())]
    );
}

#[test]
fn refuses_a_device_without_version_1() {
    let device = FakeVirtioNet::new(FakeDeviceConfig {
        features: Features::MAC | Features::STATUS | Features::MRG_RXBUF,
        ..FakeDeviceConfig::default()
    });
    let (result, allocator) = try_init(&device, VirtioNetConfig::default());
    assert!(matches!(result, Err(Error::MissingVersion1 { .. })));
    assert!(
        device.device_status().contains(DeviceStatus::FAILED),
        "told the device"
    );
    assert!(!device.queue_enabled(RX));
    assert_eq!(allocator.live_regions(), 0, "all DMA memory returned");
}

#[test]
fn fails_cleanly_when_the_device_refuses_features_ok() {
    let device = FakeVirtioNet::new(FakeDeviceConfig {
        reject_features: true,
        ..FakeDeviceConfig::default()
    });
    let (result, allocator) = try_init(&device, VirtioNetConfig::default());
    assert!(matches!(result, Err(Error::FeaturesRejected { .. })));
    assert_eq!(allocator.live_regions(), 0);
}

#[test]
fn reset_wait_is_bounded() {
    let config = VirtioNetConfig {
        reset_poll_limit: 1000,
        ..VirtioNetConfig::default()
    };
    let Setup {
        device, mut driver, ..
    } = setup_with(FakeDeviceConfig::default(), config);
    device.set_reset_behaviour(5, false);
    driver.reinitialize().expect("a slow reset is waited for");
    assert_eq!(driver.link_state(), LinkState::Up);

    device.set_reset_behaviour(0, true);
    let running = (DeviceStatus::ACKNOWLEDGE
        | DeviceStatus::DRIVER
        | DeviceStatus::FEATURES_OK
        | DeviceStatus::DRIVER_OK)
        .bits();
    assert_eq!(
        driver.reinitialize(),
        Err(Error::ResetTimeout {
            last_status: running,
            reads: 1000
        })
    );
    assert_eq!(driver.link_state(), LinkState::Resetting);
}

#[test]
fn programs_and_verifies_msix_vectors() {
    let config = VirtioNetConfig {
        msix: Some(MsixVectors {
            config: 0,
            rx: 1,
            tx: 2,
        }),
        ..VirtioNetConfig::default()
    };
    let Setup {
        device, mut driver, ..
    } = setup_with(FakeDeviceConfig::default(), config);
    assert_eq!(device.config_msix_vector(), 0);
    assert_eq!(
        (device.queue_msix_vector(RX), device.queue_msix_vector(TX)),
        (1, 2)
    );
    assert_eq!(
        device.queue_msix_vector(2),
        registers::NO_VECTOR,
        "control queue is polled"
    );
    // A config vector interrupt makes the next poll re-read the link at once.
    driver.poll(tick(1));
    device.set_link(false);
    driver.poll(tick(1) + 1);
    assert_eq!(driver.link_state(), LinkState::Up, "interval not elapsed");
    driver.handle_msix_interrupt(0);
    driver.poll(tick(1) + 2);
    assert_eq!(driver.link_state(), LinkState::Down);
    assert_eq!(driver.stats().interrupts, 1);

    let device = FakeVirtioNet::new(FakeDeviceConfig {
        msix_table_size: 2,
        ..FakeDeviceConfig::default()
    });
    let (result, allocator) = try_init(&device, config);
    assert_eq!(
        result.err(),
        Some(Error::MsixVectorRefused {
            target: MsixTarget::Queue(QueueKind::Transmit),
            vector: 2
        })
    );
    assert_eq!(allocator.live_regions(), 0);
}

#[test]
fn receives_frames_of_several_sizes_exactly() {
    let Setup {
        device, mut driver, ..
    } = setup();
    let sizes = [14usize, 60, 64, 333, 1000, 1514, 1518];
    for (index, size) in sizes.iter().enumerate() {
        device
            .inject_rx_frame(&test_frame(*size, index as u8))
            .unwrap();
    }
    let received = receive_all(&mut driver);
    let expected: Vec<_> = sizes
        .iter()
        .enumerate()
        .map(|(index, size)| (test_frame(*size, index as u8), RxMeta::default()))
        .collect();
    assert_eq!(received, expected);
    let stats = driver.stats();
    assert_eq!(stats.rx_frames, sizes.len() as u64);
    assert_eq!(stats.rx_bytes, sizes.iter().sum::<usize>() as u64);
    assert_eq!(stats.rx_dropped_bad, 0);
    assert_eq!(device.available_rx_buffers(), 256, "buffers reposted");
}

#[test]
fn receive_respects_the_budget_and_refills_in_batches() {
    let Setup {
        device, mut driver, ..
    } = setup();
    for index in 0..40 {
        device.inject_rx_frame(&test_frame(100, index)).unwrap();
    }
    let mut count = 0;
    let interrupts = device.interrupts(RX);
    assert_eq!(driver.receive(10, &mut |_, _| count += 1), 10);
    assert!(driver.rx_pending());
    // Leaving frames behind still arms the interrupt for the next new frame.
    device.inject_rx_frame(&test_frame(100, 40)).unwrap();
    assert_eq!(device.interrupts(RX), interrupts + 1);
    assert_eq!(driver.receive(100, &mut |_, _| count += 1), 31);
    assert_eq!(count, 41);
    assert!(!driver.rx_pending());
    // The device asked for a refill notification once; each batch rings at most once.
    assert!(
        device.notifications(RX) <= 3,
        "doorbells: {}",
        device.notifications(RX)
    );
    assert_eq!(device.available_rx_buffers(), 256);
}

#[test]
fn merged_buffers_are_reassembled() {
    let config = VirtioNetConfig {
        rx_buffer_size: 512,
        ..VirtioNetConfig::default()
    };
    let Setup {
        device, mut driver, ..
    } = setup_with(FakeDeviceConfig::default(), config);
    let frame = test_frame(1514, 9);
    device.inject_rx_frame(&frame).unwrap();
    device.inject_rx_frame(&test_frame(200, 10)).unwrap();
    let received = receive_all(&mut driver);
    assert_eq!(received.len(), 2);
    assert_eq!(received[0].0, frame);
    assert_eq!(received[1].0, test_frame(200, 10));
    assert_eq!(driver.counters().rx_merged_frames, 1);
    assert_eq!(device.available_rx_buffers(), 256);
}

#[test]
fn guest_tso_frames_up_to_64k_are_reassembled() {
    let config = VirtioNetConfig {
        guest_tso: true,
        ..VirtioNetConfig::default()
    };
    let Setup {
        device, mut driver, ..
    } = setup_with(FakeDeviceConfig::default(), config);
    assert!(
        device
            .driver_features()
            .contains(Features::GUEST_TSO4 | Features::GUEST_TSO6)
    );
    let payload: Vec<u8> = (0..60_000u32).map(|index| (index % 251) as u8).collect();
    let complete = tcp_ipv4_frame(&payload);
    let header = VirtioNetHeader {
        flags: NetHeaderFlags::NEEDS_CSUM,
        gso_type: VirtioNetHeader::GSO_TCPV4,
        header_len: 54,
        gso_size: 1448,
        csum_start: 34,
        csum_offset: 16,
        num_buffers: 0,
    };
    device
        .inject_rx_frame_with_header(header, &make_partial(&complete))
        .unwrap();
    let received = receive_all(&mut driver);
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].0.len(), complete.len());
    assert!(received[0].0 == complete, "reassembled and checksummed");
    assert_eq!(
        received[0].1,
        RxMeta {
            checksum_verified: true,
            ..RxMeta::default()
        }
    );
}

#[test]
fn works_without_mergeable_buffers() {
    let mut features = FakeDeviceConfig::default().features;
    features.remove(Features::MRG_RXBUF);
    let Setup {
        device, mut driver, ..
    } = setup_with(
        FakeDeviceConfig {
            features,
            ..FakeDeviceConfig::default()
        },
        VirtioNetConfig::default(),
    );
    assert!(!device.driver_features().contains(Features::MRG_RXBUF));
    device.inject_rx_frame(&test_frame(1514, 3)).unwrap();
    assert_eq!(
        receive_all(&mut driver),
        vec![(test_frame(1514, 3), RxMeta::default())]
    );

    // Small buffers cannot work without merging.
    let device = FakeVirtioNet::new(FakeDeviceConfig {
        features,
        ..FakeDeviceConfig::default()
    });
    let (result, _) = try_init(
        &device,
        VirtioNetConfig {
            rx_buffer_size: 1024,
            ..VirtioNetConfig::default()
        },
    );
    assert!(matches!(
        result,
        Err(Error::ReceiveBufferTooSmall { size: 1024, .. })
    ));
}

#[test]
fn transmits_a_batch_with_one_doorbell() {
    let Setup {
        device, mut driver, ..
    } = setup();
    let frames: Vec<Vec<u8>> = [60usize, 1514, 100, 1518, 42]
        .iter()
        .enumerate()
        .map(|(i, len)| test_frame(*len, i as u8))
        .collect();
    for frame in &frames {
        assert!(driver.can_transmit());
        send(&mut driver, frame, TxMeta::default()).unwrap();
    }
    assert_eq!(device.notifications(TX), 0, "no doorbell before flush");
    driver.flush();
    assert_eq!(device.notifications(TX), 1, "one doorbell for the batch");
    let packets = device.take_tx_packets();
    assert_eq!(
        packets
            .iter()
            .map(|packet| packet.frame.clone())
            .collect::<Vec<_>>(),
        frames
    );
    assert!(
        packets
            .iter()
            .all(|packet| packet.header == VirtioNetHeader::default())
    );
    // Completions are counted when reclaimed.
    assert_eq!(driver.stats().tx_frames, 0);
    driver.poll(tick(1));
    assert_eq!(driver.stats().tx_frames, 5);
    assert_eq!(
        driver.stats().tx_bytes,
        frames.iter().map(Vec::len).sum::<usize>() as u64
    );
    assert_eq!(
        device.interrupts(TX),
        0,
        "no completion interrupts while the ring has room"
    );

    send(&mut driver, &frames[0], TxMeta::default()).unwrap();
    driver.flush();
    driver.flush();
    assert_eq!(
        device.notifications(TX),
        2,
        "second batch, second doorbell; empty flush rings none"
    );
    assert_eq!(device.take_tx_frames(), vec![frames[0].clone()]);
}

#[test]
fn no_doorbell_when_the_device_suppresses_notifications() {
    let Setup {
        device, mut driver, ..
    } = setup();
    send(&mut driver, &test_frame(100, 1), TxMeta::default()).unwrap();
    driver.flush();
    assert_eq!(device.take_tx_frames().len(), 1);
    device.suppress_tx_notifications(true);
    for index in 0..3 {
        send(&mut driver, &test_frame(100, index), TxMeta::default()).unwrap();
    }
    driver.flush();
    assert_eq!(device.notifications(TX), 1, "device said it polls");
    assert_eq!(
        device.take_tx_frames().len(),
        3,
        "frames were published anyway"
    );
}

#[test]
fn transmit_checksum_offload_and_software_fallback() {
    let complete = tcp_ipv4_frame(b"hello, checksum offload");
    let partial = make_partial(&complete);
    let meta = TxMeta {
        checksum: Some((34, 16)),
        tso_mss: None,
    };

    let Setup {
        device, mut driver, ..
    } = setup();
    send(&mut driver, &partial, meta).unwrap();
    driver.flush();
    let packet = device.take_tx_packets().remove(0);
    assert_eq!(packet.header.flags, NetHeaderFlags::NEEDS_CSUM);
    assert_eq!(
        (packet.header.csum_start, packet.header.csum_offset),
        (34, 16)
    );
    assert_eq!(packet.frame, partial, "the device completes it");

    let config = VirtioNetConfig {
        checksum_offload: false,
        ..VirtioNetConfig::default()
    };
    let Setup {
        device, mut driver, ..
    } = setup_with(FakeDeviceConfig::default(), config);
    assert!(!driver.capabilities().tx_checksum);
    send(&mut driver, &partial, meta).unwrap();
    driver.flush();
    let packet = device.take_tx_packets().remove(0);
    assert_eq!(packet.header, VirtioNetHeader::default());
    assert_eq!(packet.frame, complete, "completed by the driver");

    // A checksum location outside the frame is counted and the frame goes out untouched.
    send(
        &mut driver,
        &partial,
        TxMeta {
            checksum: Some((34, 400)),
            tso_mss: None,
        },
    )
    .unwrap();
    driver.flush();
    assert_eq!(device.take_tx_frames(), vec![partial]);
    assert_eq!(driver.counters().tx_checksum_errors, 1);
}

#[test]
fn large_tcp_frames_use_segmentation_offload() {
    let Setup {
        device, mut driver, ..
    } = setup();
    let payload: Vec<u8> = (0..20_000u32).map(|index| (index * 7) as u8).collect();
    let frame = make_partial(&tcp_ipv4_frame(&payload));
    let meta = TxMeta {
        checksum: Some((34, 16)),
        tso_mss: Some(1448),
    };
    send(&mut driver, &frame, meta).unwrap();
    driver.flush();
    let packet = device.take_tx_packets().remove(0);
    assert_eq!(packet.frame, frame);
    assert_eq!(packet.header.gso_type, VirtioNetHeader::GSO_TCPV4);
    assert_eq!(packet.header.gso_size, 1448);
    assert_eq!(packet.header.header_len, 54);
    assert_eq!(packet.header.flags, NetHeaderFlags::NEEDS_CSUM);
    assert_eq!(
        (packet.header.csum_start, packet.header.csum_offset),
        (34, 16)
    );

    // A large frame that is not TCP cannot be segmented; the pool is left intact.
    let not_tcp = test_frame(9000, 1);
    assert_eq!(
        send(
            &mut driver,
            &not_tcp,
            TxMeta {
                checksum: None,
                tso_mss: Some(1448)
            }
        ),
        Err(DeviceError::FrameTooLarge {
            len: 9000,
            max: 1518
        })
    );
    // Without an MSS a frame above the MTU is refused outright.
    assert_eq!(
        send(&mut driver, &frame, TxMeta::default()),
        Err(DeviceError::FrameTooLarge {
            len: frame.len(),
            max: 1518
        })
    );
    send(&mut driver, &test_frame(64, 2), TxMeta::default()).unwrap();
    driver.flush();
    assert_eq!(device.take_tx_frames(), vec![test_frame(64, 2)]);
}

#[test]
fn with_tso_the_ring_has_room_only_while_a_largest_frame_fits() {
    // 64 slots of 2 KiB: a 64 KiB TSO frame needs 33 of them.
    let config = VirtioNetConfig {
        tx_pool_slots: 64,
        ..VirtioNetConfig::default()
    };
    let Setup {
        device, mut driver, ..
    } = setup_with(FakeDeviceConfig::default(), config);
    assert_eq!(driver.capabilities().max_tso_size, 65_535);
    for index in 0..31 {
        send(&mut driver, &test_frame(1500, index), TxMeta::default()).unwrap();
    }
    assert!(driver.can_transmit(), "33 slots left: a largest frame fits");
    send(&mut driver, &test_frame(1500, 31), TxMeta::default()).unwrap();
    assert!(
        !driver.can_transmit(),
        "32 slots left: an MTU frame would fit, a 64 KiB one would not"
    );
    driver.flush();
    assert_eq!(device.take_tx_frames().len(), 32);
    assert!(
        driver.can_transmit(),
        "room again once the device sent them"
    );
}

#[test]
fn full_transmit_ring_is_reported_and_recovers() {
    let config = VirtioNetConfig {
        tx_queue_size: 4,
        ..VirtioNetConfig::default()
    };
    let Setup {
        device, mut driver, ..
    } = setup_with(FakeDeviceConfig::default(), config);
    for index in 0..4 {
        send(&mut driver, &test_frame(500, index), TxMeta::default()).unwrap();
    }
    assert!(!driver.can_transmit());
    assert_eq!(
        send(&mut driver, &test_frame(500, 9), TxMeta::default()),
        Err(DeviceError::RingFull)
    );
    assert_eq!(driver.stats().tx_ring_full, 1);
    // The device sends them; the driver asked for a completion interrupt to learn about it.
    assert_eq!(device.take_tx_frames().len(), 4);
    assert!(
        device.interrupts(TX) >= 1,
        "completion interrupt requested when full"
    );
    assert!(driver.can_transmit());
    send(&mut driver, &test_frame(500, 9), TxMeta::default()).unwrap();
    driver.flush();
    assert_eq!(device.take_tx_frames(), vec![test_frame(500, 9)]);
    assert_eq!(driver.stats().tx_frames, 4, "reclaimed inside transmit");
}

#[test]
fn receive_completes_partial_checksums_and_reports_data_valid() {
    let Setup {
        device, mut driver, ..
    } = setup();
    for payload_len in [0usize, 1, 17, 1000, 1460] {
        let payload: Vec<u8> = (0..payload_len)
            .map(|index| (index * 13 + 5) as u8)
            .collect();
        let complete = tcp_ipv4_frame(&payload);
        let header = VirtioNetHeader {
            flags: NetHeaderFlags::NEEDS_CSUM,
            csum_start: 34,
            csum_offset: 16,
            ..VirtioNetHeader::default()
        };
        device
            .inject_rx_frame_with_header(header, &make_partial(&complete))
            .unwrap();
        let received = receive_all(&mut driver);
        assert_eq!(
            received,
            vec![(
                complete,
                RxMeta {
                    checksum_verified: true,
                    ..RxMeta::default()
                }
            )],
            "payload {payload_len}"
        );
    }
    assert_eq!(driver.counters().rx_checksums_completed, 5);

    let frame = tcp_ipv4_frame(b"validated");
    let header = VirtioNetHeader {
        flags: NetHeaderFlags::DATA_VALID,
        ..VirtioNetHeader::default()
    };
    device.inject_rx_frame_with_header(header, &frame).unwrap();
    assert_eq!(
        receive_all(&mut driver),
        vec![(
            frame.clone(),
            RxMeta {
                checksum_verified: true,
                ..RxMeta::default()
            }
        )]
    );

    // Offsets beyond the frame: dropped and counted, never a panic.
    let header = VirtioNetHeader {
        flags: NetHeaderFlags::NEEDS_CSUM,
        csum_start: 60_000,
        csum_offset: 16,
        ..VirtioNetHeader::default()
    };
    device.inject_rx_frame_with_header(header, &frame).unwrap();
    assert!(receive_all(&mut driver).is_empty());
    assert_eq!(driver.stats().rx_dropped_bad, 1);
}

#[test]
fn partial_checksums_can_be_left_for_a_consuming_stack() {
    let Setup {
        device, mut driver, ..
    } = setup_with(
        FakeDeviceConfig::default(),
        VirtioNetConfig {
            complete_partial_checksums: false,
            ..VirtioNetConfig::default()
        },
    );
    let partial = make_partial(&tcp_ipv4_frame(b"left as the host sent it"));
    let header = VirtioNetHeader {
        flags: NetHeaderFlags::NEEDS_CSUM,
        csum_start: 34,
        csum_offset: 16,
        ..VirtioNetHeader::default()
    };
    device
        .inject_rx_frame_with_header(header, &partial)
        .unwrap();
    assert_eq!(
        receive_all(&mut driver),
        vec![(
            partial.clone(),
            RxMeta {
                checksum_verified: true,
                checksum_partial: true,
            }
        )]
    );
    assert_eq!(driver.counters().rx_checksums_completed, 0);
    // Offsets beyond the frame are still refused.
    let header = VirtioNetHeader {
        csum_start: 60_000,
        ..header
    };
    device
        .inject_rx_frame_with_header(header, &partial)
        .unwrap();
    assert!(receive_all(&mut driver).is_empty());
    assert_eq!(driver.stats().rx_dropped_bad, 1);
}

#[test]
fn hostile_used_entries_are_dropped_and_counted() {
    let Setup {
        device, mut driver, ..
    } = setup();
    let mut expected_drops = 0;
    let mut check = |driver: &mut Driver, what: &str| {
        expected_drops += 1;
        assert!(receive_all(driver).is_empty(), "{what}: nothing delivered");
        assert_eq!(
            driver.stats().rx_dropped_bad,
            expected_drops,
            "{what}: counted"
        );
    };

    device.inject_used_raw(RX, 256, 100).unwrap();
    check(&mut driver, "id equal to the queue size");
    device.inject_used_raw(RX, u32::MAX, 100).unwrap();
    check(&mut driver, "huge id");
    device.inject_used_raw(RX, 5, 5000).unwrap();
    check(&mut driver, "length beyond the buffer");
    device.inject_used_raw(RX, 7, 4).unwrap();
    check(&mut driver, "length shorter than the header");

    // A duplicate: buffer 0 is used twice in one batch.
    device.inject_rx_frame(&test_frame(80, 1)).unwrap();
    device.inject_used_raw(RX, 0, 92).unwrap();
    device.inject_used_raw(RX, 0, 92).unwrap();
    let received = receive_all(&mut driver);
    assert_eq!(received, vec![(test_frame(80, 1), RxMeta::default())]);
    assert_eq!(driver.stats().rx_dropped_bad, 6, "both repeats dropped");

    // num_buffers of 0 and more buffers than the device holds.
    let bad_count = VirtioNetHeader {
        num_buffers: 1000,
        ..VirtioNetHeader::default()
    };
    device
        .inject_rx_frame_with_header(bad_count, &test_frame(80, 2))
        .unwrap();
    assert!(receive_all(&mut driver).is_empty());
    assert_eq!(driver.stats().rx_dropped_bad, 7);

    // Transmit completions for descriptors never sent.
    device.inject_used_raw(TX, 3, 0).unwrap();
    device.inject_used_raw(TX, 70_000, 0).unwrap();
    driver.poll(tick(1));
    assert_eq!(driver.counters().tx_bad_completions, 2);
    assert_eq!(driver.stats().tx_frames, 0);

    // The driver keeps working: every buffer that was ours went back to the device.
    for index in 0..300u32 {
        device
            .inject_rx_frame(&test_frame(60 + index as usize, index as u8))
            .unwrap();
        let received = receive_all(&mut driver);
        assert_eq!(
            received,
            vec![(
                test_frame(60 + index as usize, index as u8),
                RxMeta::default()
            )]
        );
    }
    send(&mut driver, &test_frame(70, 1), TxMeta::default()).unwrap();
    driver.flush();
    assert_eq!(device.take_tx_frames(), vec![test_frame(70, 1)]);
    assert_eq!(driver.stats().rx_dropped_bad, 7);
}

#[test]
fn merged_frame_waits_for_all_its_buffers() {
    let config = VirtioNetConfig {
        rx_buffer_size: 512,
        ..VirtioNetConfig::default()
    };
    let Setup {
        device, mut driver, ..
    } = setup_with(FakeDeviceConfig::default(), config);
    // The header claims three buffers, the first one is full, only it is used so far.
    let header = VirtioNetHeader {
        num_buffers: 3,
        ..VirtioNetHeader::default()
    };
    device
        .inject_rx_frame_with_header(header, &test_frame(500, 1))
        .unwrap();
    assert!(receive_all(&mut driver).is_empty());
    assert_eq!(driver.stats().rx_dropped_bad, 0, "not an error yet");
    assert!(driver.rx_pending());
    // Two more buffers complete the (garbled) frame, which is within limits and delivered.
    device.inject_rx_frame(&test_frame(100, 2)).unwrap();
    device.inject_rx_frame(&test_frame(100, 3)).unwrap();
    let received = receive_all(&mut driver);
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].0.len(), 500 + 112 + 112);
    // Afterwards frames flow normally.
    device.inject_rx_frame(&test_frame(900, 4)).unwrap();
    assert_eq!(
        receive_all(&mut driver),
        vec![(test_frame(900, 4), RxMeta::default())]
    );
}

/// Found by the fuzz harness (target virtio-net): a frame that fills one buffer in part but
/// claims 16 made the driver wait and swallow the next good frames as its continuation.
#[test]
fn buffer_count_beyond_a_partly_used_first_buffer_is_dropped_at_once() {
    let Setup {
        device, mut driver, ..
    } = setup();
    for num_buffers in [2, 16] {
        let header = VirtioNetHeader {
            num_buffers,
            ..VirtioNetHeader::default()
        };
        device
            .inject_rx_frame_with_header(header, &test_frame(240, 1))
            .unwrap();
        assert!(receive_all(&mut driver).is_empty());
    }
    assert_eq!(driver.stats().rx_dropped_bad, 2);
    assert!(!driver.rx_pending());
    device.inject_rx_frame(&test_frame(64, 2)).unwrap();
    assert_eq!(
        receive_all(&mut driver),
        vec![(test_frame(64, 2), RxMeta::default())]
    );
}

/// More buffers than the longest frame can need are impossible even when the first is full.
#[test]
fn buffer_count_beyond_the_longest_frame_is_dropped_at_once() {
    let config = VirtioNetConfig {
        rx_buffer_size: 512,
        ..VirtioNetConfig::default()
    };
    let Setup {
        device, mut driver, ..
    } = setup_with(FakeDeviceConfig::default(), config);
    // A 1514-byte frame with its header needs 3 buffers of 512 bytes; 4 is a lie.
    let header = VirtioNetHeader {
        num_buffers: 4,
        ..VirtioNetHeader::default()
    };
    device
        .inject_rx_frame_with_header(header, &test_frame(500, 1))
        .unwrap();
    assert!(receive_all(&mut driver).is_empty());
    assert_eq!(driver.stats().rx_dropped_bad, 1);
    device.inject_rx_frame(&test_frame(64, 2)).unwrap();
    assert_eq!(
        receive_all(&mut driver),
        vec![(test_frame(64, 2), RxMeta::default())]
    );
}

#[test]
fn receive_rearms_the_interrupt_after_draining() {
    let Setup {
        device, mut driver, ..
    } = setup();
    device.inject_rx_frame(&test_frame(64, 1)).unwrap();
    assert_eq!(device.interrupts(RX), 1, "armed at init");
    device.inject_rx_frame(&test_frame(64, 2)).unwrap();
    assert_eq!(
        device.interrupts(RX),
        1,
        "not re-armed before the driver looked"
    );
    assert_eq!(receive_all(&mut driver).len(), 2);
    device.inject_rx_frame(&test_frame(64, 3)).unwrap();
    assert_eq!(device.interrupts(RX), 2, "re-armed after draining");
}

#[test]
fn intx_reads_and_clears_the_isr() {
    let Setup {
        device, mut driver, ..
    } = setup();
    assert!(!driver.handle_intx(), "nothing pending");
    device.inject_rx_frame(&test_frame(64, 1)).unwrap();
    assert!(driver.handle_intx());
    assert_eq!(device.isr(), 0, "read clears it");
    assert!(!driver.handle_intx());
    assert_eq!(driver.stats().interrupts, 1);
}

#[test]
fn link_down_and_up_follow_the_device() {
    let Setup {
        device, mut driver, ..
    } = setup();
    driver.poll(tick(1));
    device.set_link(false);
    assert!(driver.handle_intx(), "configuration interrupt");
    driver.poll(tick(1) + 1);
    assert_eq!(driver.link_state(), LinkState::Down);
    assert!(!driver.can_transmit());
    assert_eq!(
        send(&mut driver, &test_frame(64, 1), TxMeta::default()),
        Err(DeviceError::NotReady)
    );
    device.set_link(true);
    driver.poll(tick(2));
    assert_eq!(
        driver.link_state(),
        LinkState::Up,
        "noticed at the next interval"
    );
    send(&mut driver, &test_frame(64, 1), TxMeta::default()).unwrap();
}

#[test]
fn a_configuration_interrupt_makes_the_next_poll_read_the_link_before_the_interval() {
    let Setup {
        device, mut driver, ..
    } = setup_with(
        FakeDeviceConfig::default(),
        VirtioNetConfig {
            health_check_interval_ns: 100_000_000,
            ..VirtioNetConfig::default()
        },
    );
    let fired = std::rc::Rc::new(core::cell::Cell::new(false));
    let flag = fired.clone();
    driver.set_config_interrupt(Box::new(move || flag.replace(false)));
    driver.poll(0);
    device.set_link(false);
    driver.poll(1_000_000);
    assert_eq!(
        driver.link_state(),
        LinkState::Up,
        "without the vector the change waits for the interval"
    );
    fired.set(true);
    driver.poll(2_000_000);
    assert_eq!(
        driver.link_state(),
        LinkState::Down,
        "read at the interrupt"
    );
    assert!(!fired.get(), "the flag was taken");
    device.set_link(true);
    driver.poll(3_000_000);
    assert_eq!(driver.link_state(), LinkState::Down);
    driver.poll(101_000_000);
    assert_eq!(
        driver.link_state(),
        LinkState::Down,
        "not yet 100 ms after the last read"
    );
    driver.poll(102_000_000);
    assert_eq!(
        driver.link_state(),
        LinkState::Up,
        "the interval still backs the vector up"
    );
}

#[test]
fn announce_requests_are_raised_once_and_acknowledged() {
    let Setup {
        device, mut driver, ..
    } = setup();
    driver.poll(tick(1));
    assert!(!driver.take_announce_request());
    device.request_announce();
    driver.poll(tick(2));
    assert!(driver.take_announce_request());
    assert!(!driver.take_announce_request(), "taken");
    driver.poll(tick(3));
    assert!(
        !driver.take_announce_request(),
        "the same request is not raised twice"
    );

    driver.ack_announce();
    assert_eq!(device.announce_acks(), 1);
    assert_eq!(device.control_commands(), vec![(3, 0)]);
    driver.poll(tick(4));
    assert_eq!(driver.counters().announce_acks_completed, 1);
    assert!(!driver.take_announce_request());

    // The next announce round is a new request.
    device.request_announce();
    driver.poll(tick(5));
    assert!(driver.take_announce_request());
    assert_eq!(driver.counters().announce_requests, 2);
}

#[test]
fn announce_without_guest_announce_is_edge_triggered_and_not_acked() {
    let mut features = FakeDeviceConfig::default().features;
    features.remove(Features::GUEST_ANNOUNCE);
    let Setup {
        device, mut driver, ..
    } = setup_with(
        FakeDeviceConfig {
            features,
            ..FakeDeviceConfig::default()
        },
        VirtioNetConfig::default(),
    );
    assert!(
        !device.driver_features().contains(Features::CTRL_VQ),
        "control queue unused"
    );
    device.request_announce();
    driver.poll(tick(1));
    assert!(driver.take_announce_request());
    driver.ack_announce();
    driver.poll(tick(2));
    assert!(!driver.take_announce_request());
    assert!(device.control_commands().is_empty());
}

#[test]
fn needs_reset_reinitialises_automatically() {
    let Setup {
        device, mut driver, ..
    } = setup();
    driver.poll(tick(1));
    send(&mut driver, &test_frame(100, 1), TxMeta::default()).unwrap();
    device.set_needs_reset();
    driver.poll(tick(2));
    assert_eq!(driver.link_state(), LinkState::Up);
    assert_eq!(driver.counters().device_reset_requests, 1);
    assert_eq!(driver.counters().initializations, 2);
    assert_eq!(device.resets(), 2);
    assert!(
        !device
            .device_status()
            .contains(DeviceStatus::DEVICE_NEEDS_RESET)
    );
    assert_eq!(device.available_rx_buffers(), 256);
    device.inject_rx_frame(&test_frame(700, 2)).unwrap();
    assert_eq!(
        receive_all(&mut driver),
        vec![(test_frame(700, 2), RxMeta::default())]
    );
    send(&mut driver, &test_frame(100, 3), TxMeta::default()).unwrap();
    driver.flush();
    assert_eq!(
        device.take_tx_frames(),
        vec![test_frame(100, 3)],
        "the frame lost in the reset is gone"
    );
}

#[test]
fn needs_reset_reports_resetting_until_reinitialised() {
    let config = VirtioNetConfig {
        auto_reinitialize: false,
        ..VirtioNetConfig::default()
    };
    let Setup {
        device, mut driver, ..
    } = setup_with(FakeDeviceConfig::default(), config);
    device.set_needs_reset();
    driver.poll(tick(1));
    assert_eq!(driver.link_state(), LinkState::Resetting);
    assert_eq!(
        send(&mut driver, &test_frame(64, 1), TxMeta::default()),
        Err(DeviceError::NotReady)
    );
    assert!(!driver.can_transmit());
    driver.reinitialize().unwrap();
    assert_eq!(driver.link_state(), LinkState::Up);
    device.inject_rx_frame(&test_frame(64, 2)).unwrap();
    assert_eq!(receive_all(&mut driver).len(), 1);
}

#[test]
fn a_reset_behind_the_drivers_back_is_recovered() {
    let Setup {
        device, mut driver, ..
    } = setup();
    // The hypervisor resets the device (status reads 0, registers still answer).
    device.regions().common.write8(registers::DEVICE_STATUS, 0);
    driver.poll(tick(1));
    assert_eq!(driver.link_state(), LinkState::Up);
    assert_eq!(driver.counters().initializations, 2);
    device.inject_rx_frame(&test_frame(64, 2)).unwrap();
    assert_eq!(receive_all(&mut driver).len(), 1);
}

fn assert_gone_and_inert(device: &FakeVirtioNet, driver: &mut Driver) {
    let doorbells = (
        device.notifications(RX),
        device.notifications(TX),
        device.resets(),
    );
    assert_eq!(driver.link_state(), LinkState::Gone);
    assert_eq!(
        send(driver, &test_frame(64, 1), TxMeta::default()),
        Err(DeviceError::Gone)
    );
    assert!(!driver.can_transmit());
    assert_eq!(
        driver.receive(64, &mut |_, _| panic!("no frames from a removed device")),
        0
    );
    driver.flush();
    driver.poll(tick(9));
    driver.stop();
    assert!(!driver.handle_intx());
    assert_eq!(driver.reinitialize(), Err(Error::DeviceGone));
    assert_eq!(
        (
            device.notifications(RX),
            device.notifications(TX),
            device.resets()
        ),
        doorbells,
        "no register writes to a gone device"
    );
}

#[test]
fn unplug_reading_all_ones_is_gone() {
    let Setup {
        device,
        allocator,
        mut driver,
    } = setup();
    device.unplug();
    driver.poll(tick(1));
    assert_gone_and_inert(&device, &mut driver);
    assert_eq!(
        device.inject_rx_frame(&test_frame(64, 1)),
        Err(FakeError::Unplugged)
    );
    drop(driver);
    assert_eq!(
        allocator.live_regions(),
        0,
        "a removed device does no DMA: memory freed"
    );
}

#[test]
fn unplug_reading_zero_is_gone() {
    let Setup {
        device, mut driver, ..
    } = setup();
    device.unplug_reading_zero();
    driver.poll(tick(1));
    assert_gone_and_inert(&device, &mut driver);
}

#[test]
fn mark_gone_stops_register_access() {
    let Setup {
        device, mut driver, ..
    } = setup();
    let resets = device.resets();
    driver.mark_gone();
    assert_gone_and_inert(&device, &mut driver);
    drop(driver);
    assert_eq!(device.resets(), resets, "no reset written to a gone device");
}

#[test]
fn stop_resets_the_device_and_drop_frees_memory() {
    let Setup {
        device,
        allocator,
        mut driver,
    } = setup();
    send(&mut driver, &test_frame(64, 1), TxMeta::default()).unwrap();
    driver.stop();
    assert_eq!(device.device_status(), DeviceStatus::empty());
    assert!(!device.queue_enabled(RX));
    assert_eq!(driver.link_state(), LinkState::Down);
    assert_eq!(
        send(&mut driver, &test_frame(64, 1), TxMeta::default()),
        Err(DeviceError::NotReady)
    );
    assert_eq!(driver.receive(64, &mut |_, _| {}), 0);
    let resets = device.resets();
    drop(driver);
    assert_eq!(device.resets(), resets, "already quiesced");
    assert_eq!(allocator.live_regions(), 0);

    // A stopped device can be brought back.
    let Setup {
        device, mut driver, ..
    } = setup();
    driver.stop();
    driver.reinitialize().unwrap();
    device.inject_rx_frame(&test_frame(64, 1)).unwrap();
    assert_eq!(receive_all(&mut driver).len(), 1);
}

#[test]
fn drop_leaks_memory_when_the_device_will_not_reset() {
    let Setup {
        device,
        allocator,
        driver,
    } = setup();
    device.set_reset_behaviour(0, true);
    drop(driver);
    assert!(
        allocator.live_regions() > 0,
        "DMA memory kept alive for the running device"
    );
}

#[test]
fn allocation_failure_is_reported_without_leaks() {
    let device = FakeVirtioNet::default();
    for limit in 0..6 {
        let allocator = FakeDmaAllocator::with_allocation_limit(limit);
        let result = VirtioNet::new(
            device.regions(),
            allocator.clone(),
            VirtioNetConfig::default(),
        );
        assert!(
            matches!(result, Err(Error::DmaAllocationFailed { .. })),
            "limit {limit}"
        );
        assert_eq!(allocator.live_regions(), 0);
    }
    assert!(
        VirtioNet::new(
            device.regions(),
            FakeDmaAllocator::with_allocation_limit(6),
            VirtioNetConfig::default()
        )
        .is_ok()
    );
}

#[test]
fn invalid_configuration_is_rejected() {
    let device = FakeVirtioNet::default();
    for (config, field) in [
        (
            VirtioNetConfig {
                rx_queue_size: 100,
                ..VirtioNetConfig::default()
            },
            "rx_queue_size",
        ),
        (
            VirtioNetConfig {
                tx_queue_size: 0,
                ..VirtioNetConfig::default()
            },
            "tx_queue_size",
        ),
        (
            VirtioNetConfig {
                rx_buffer_size: 16,
                ..VirtioNetConfig::default()
            },
            "rx_buffer_size",
        ),
        (
            VirtioNetConfig {
                tx_pool_slots: 0,
                ..VirtioNetConfig::default()
            },
            "tx_pool_slots",
        ),
    ] {
        let (result, _) = try_init(&device, config);
        assert!(
            matches!(result, Err(Error::InvalidConfig { field: found, .. }) if found == field),
            "{field}"
        );
    }
}

#[test]
fn smaller_device_queues_are_respected() {
    let device_config = FakeDeviceConfig {
        queue_max_size: 64,
        ..FakeDeviceConfig::default()
    };
    let Setup {
        device, mut driver, ..
    } = setup_with(device_config, VirtioNetConfig::default());
    assert_eq!((device.queue_size(RX), device.queue_size(TX)), (64, 64));
    assert_eq!(device.available_rx_buffers(), 64);
    device.inject_used_raw(RX, 64, 100).unwrap();
    assert!(receive_all(&mut driver).is_empty());
    assert_eq!(
        driver.stats().rx_dropped_bad,
        1,
        "id beyond the negotiated size"
    );
    for index in 0..100u8 {
        device.inject_rx_frame(&test_frame(128, index)).unwrap();
        assert_eq!(receive_all(&mut driver).len(), 1);
    }
}

#[test]
fn dma_regions_of_the_fake_allocator_are_usable_by_the_driver() {
    // Guards the test fixture itself: phys must equal the CPU address for the fake device.
    let allocator = FakeDmaAllocator::new();
    let region = allocator.allocate(64, 4096).unwrap();
    assert_eq!(region.phys().0 % 4096, 0);
    assert_eq!(region.phys().0, region.as_ptr() as u64);
}

#[test]
fn jumbo_mtu_from_the_device_is_used_both_ways() {
    let device_config = FakeDeviceConfig {
        mtu: 9000,
        ..FakeDeviceConfig::default()
    };
    let Setup {
        device, mut driver, ..
    } = setup_with(device_config, VirtioNetConfig::default());
    assert_eq!(driver.capabilities().mtu, 9000);
    let jumbo = test_frame(9014, 7);
    device.inject_rx_frame(&jumbo).unwrap();
    assert_eq!(
        receive_all(&mut driver),
        vec![(jumbo.clone(), RxMeta::default())]
    );
    assert_eq!(driver.counters().rx_merged_frames, 1);
    send(&mut driver, &jumbo, TxMeta::default()).unwrap();
    driver.flush();
    assert_eq!(device.take_tx_frames(), vec![jumbo]);
    assert_eq!(
        send(&mut driver, &test_frame(9100, 1), TxMeta::default()),
        Err(DeviceError::FrameTooLarge {
            len: 9100,
            max: 9018
        })
    );
}

#[test]
fn receive_frames_beyond_the_mtu_are_dropped() {
    let Setup {
        device, mut driver, ..
    } = setup();
    // Fits the 2048-byte buffer, but no device may send it without GSO at MTU 1500.
    device.inject_rx_frame(&test_frame(1600, 1)).unwrap();
    assert!(receive_all(&mut driver).is_empty());
    assert_eq!(driver.stats().rx_dropped_bad, 1);
    // A double-tagged full-size frame is fine.
    device.inject_rx_frame(&test_frame(1522, 2)).unwrap();
    assert_eq!(receive_all(&mut driver).len(), 1);
}

#[test]
fn a_control_queue_of_one_entry_is_refused() {
    let device = FakeVirtioNet::new(FakeDeviceConfig {
        control_queue_max_size: 1,
        ..FakeDeviceConfig::default()
    });
    let (result, allocator) = try_init(&device, VirtioNetConfig::default());
    assert_eq!(
        result.err(),
        Some(Error::QueueTooSmall {
            queue: QueueKind::Control,
            size: 1,
            needed: 2
        })
    );
    assert_eq!(
        device.device_status(),
        DeviceStatus::empty(),
        "reset: queues were enabled"
    );
    assert_eq!(allocator.live_regions(), 0);
}

/// A window of the fake; the common-configuration one's first `queue_size` read lies (64).
struct LiesOnceAboutQueueSize {
    inner: FakeWindow,
    /// `Some(already lied)` for the common window.
    lied: Option<core::cell::Cell<bool>>,
}

impl RegisterIo for LiesOnceAboutQueueSize {
    fn read32(&self, offset: usize) -> u32 {
        self.inner.read32(offset)
    }
    fn write32(&self, offset: usize, value: u32) {
        self.inner.write32(offset, value);
    }
    fn read16(&self, offset: usize) -> u16 {
        if offset == registers::QUEUE_SIZE
            && self.lied.as_ref().is_some_and(|lied| !lied.replace(true))
        {
            return 64;
        }
        self.inner.read16(offset)
    }
    fn write16(&self, offset: usize, value: u16) {
        self.inner.write16(offset, value);
    }
    fn read8(&self, offset: usize) -> u8 {
        self.inner.read8(offset)
    }
    fn write8(&self, offset: usize, value: u8) {
        self.inner.write8(offset, value);
    }
    fn len(&self) -> usize {
        self.inner.len()
    }
}

/// Found by the fuzz harness (target virtio-net): when the queue maximum read wrong once, the
/// driver set up rings of a size the device refused and ran on with the link up while nothing
/// could ever arrive; now it reads the size back and fails initialisation instead.
#[test]
fn a_queue_size_the_device_did_not_take_fails_initialisation() {
    let device = FakeVirtioNet::new(FakeDeviceConfig {
        queue_max_size: 4,
        ..FakeDeviceConfig::default()
    });
    let honest = device.regions();
    let honest_window = |inner| LiesOnceAboutQueueSize { inner, lied: None };
    let regions = crate::VirtioPciRegions {
        common: LiesOnceAboutQueueSize {
            inner: honest.common,
            lied: Some(core::cell::Cell::new(false)),
        },
        notify: honest_window(honest.notify),
        notify_off_multiplier: honest.notify_off_multiplier,
        isr: honest_window(honest.isr),
        device: honest_window(honest.device),
    };
    let allocator = FakeDmaAllocator::new();
    let result = VirtioNet::new(regions, allocator.clone(), VirtioNetConfig::default());
    assert!(
        matches!(
            result,
            Err(Error::QueueTooSmall {
                size: 4,
                needed: 64,
                ..
            })
        ),
        "got {:?}",
        result.err()
    );
    assert_eq!(allocator.live_regions(), 0, "all memory returned");
}
