//! Host tests of the MANA driver against the fake device: what OpenVMM's emulator never
//! produces (error completions, a silent HWC, link and reset-request events, malformed EQEs and
//! CQEs, out-of-range ids, removal), plus the basics the fake can check byte for byte.

use alloc::boxed::Box;
use alloc::vec;
use alloc::vec::Vec;
use std::cell::Cell;
use std::rc::Rc;

use net_device::checksum::{add, fold};
use net_device::{DeviceError, LinkState, MacAddress, NetDevice, RxMeta, TxMeta};

use super::defs::*;
use super::fake::{FakeMana, RxForgery};
use super::{Mana, ManaConfig};
use crate::fake_dma::FakeDmaAllocator;
use crate::{Error, WaitHost};

/// A clock that moves 1 µs per look, so bounded waits end quickly in test time.
#[derive(Clone, Default)]
struct TestClock(Rc<Cell<u64>>);

impl WaitHost for TestClock {
    fn now_ns(&mut self) -> u64 {
        self.0.set(self.0.get() + 1_000);
        self.0.get()
    }
    fn idle(&mut self) {}
}

type Driver = Mana<FakeMana, FakeDmaAllocator>;

fn config() -> ManaConfig {
    ManaConfig {
        rx_ring_size: 16,
        tx_ring_size: 16,
        tx_buffer_bytes: 256 * 1024,
        hwc_timeout_ns: 50_000_000,
        max_wait_iterations: 100_000,
        ..ManaConfig::default()
    }
}

fn start_with(fake: &FakeMana, config: ManaConfig) -> Result<(Driver, TestClock), Error> {
    let clock = TestClock::default();
    Mana::new(
        fake.clone(),
        FakeDmaAllocator::new(),
        Box::new(clock.clone()),
        config,
    )
    .map(|driver| (driver, clock))
}

fn start() -> (FakeMana, Driver, TestClock) {
    let fake = FakeMana::new();
    let (driver, clock) = start_with(&fake, config()).expect("bring-up against the fake");
    (fake, driver, clock)
}

fn send(driver: &mut Driver, frame: &[u8], meta: TxMeta) -> Result<(), DeviceError> {
    driver.transmit(frame.len(), &mut |buffer| {
        buffer.copy_from_slice(frame);
        meta
    })?;
    driver.flush();
    Ok(())
}

fn receive_all(driver: &mut Driver) -> Vec<(Vec<u8>, RxMeta)> {
    let mut frames = Vec::new();
    driver.receive(1000, &mut |frame, meta| frames.push((frame.to_vec(), meta)));
    frames
}

fn plain_frame(len: usize, seed: u8) -> Vec<u8> {
    let mut frame: Vec<u8> = (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect();
    frame[12..14].copy_from_slice(&0x88b5u16.to_be_bytes());
    frame
}

/// An IPv4 TCP frame with `payload` bytes, its TCP checksum field holding the folded
/// pseudo-header sum (CHECKSUM_PARTIAL), IPv4 header checksum filled in.
fn tcp_frame(payload: usize) -> Vec<u8> {
    let total = 20 + 20 + payload;
    let mut frame = vec![0u8; 14 + total];
    frame[..6].copy_from_slice(&[0x00, 0x15, 0x5d, 0x11, 0x22, 0x33]);
    frame[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 9]);
    frame[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip = 14;
    frame[ip] = 0x45;
    frame[ip + 2..ip + 4].copy_from_slice(&(total as u16).to_be_bytes());
    frame[ip + 8] = 64;
    frame[ip + 9] = 6;
    frame[ip + 12..ip + 16].copy_from_slice(&[10, 0, 0, 1]);
    frame[ip + 16..ip + 20].copy_from_slice(&[10, 0, 0, 2]);
    let header_sum = !fold(add(0, &frame[ip..ip + 20]));
    frame[ip + 10..ip + 12].copy_from_slice(&header_sum.to_be_bytes());
    let tcp = ip + 20;
    frame[tcp..tcp + 2].copy_from_slice(&1234u16.to_be_bytes());
    frame[tcp + 2..tcp + 4].copy_from_slice(&80u16.to_be_bytes());
    frame[tcp + 12] = 5 << 4;
    frame[tcp + 13] = 0x18;
    for (index, byte) in frame[tcp + 20..].iter_mut().enumerate() {
        *byte = index as u8;
    }
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&frame[ip + 12..ip + 20]);
    pseudo.extend_from_slice(&[0, 6]);
    pseudo.extend_from_slice(&((20 + payload) as u16).to_be_bytes());
    let partial = fold(add(0, &pseudo));
    frame[tcp + 16..tcp + 18].copy_from_slice(&partial.to_be_bytes());
    frame
}

#[test]
fn bring_up_follows_the_documented_order_and_reports_the_vport() {
    let (fake, driver, _clock) = start();
    assert_eq!(driver.link_state(), LinkState::Up);
    assert_eq!(
        driver.mac_address(),
        MacAddress([0x00, 0x15, 0x5d, 0x11, 0x22, 0x33])
    );
    let state = fake.state.borrow();
    assert_eq!(
        state.requests,
        vec![
            GDMA_VERIFY_VF_DRIVER_VERSION,
            GDMA_QUERY_MAX_RESOURCES,
            GDMA_LIST_DEVICES,
            GDMA_REGISTER_DEVICE,
            GDMA_CREATE_DMA_REGION,
            GDMA_CREATE_QUEUE,
            MANA_QUERY_DEV_CONFIG,
            MANA_QUERY_VPORT_CONFIG,
            MANA_CONFIG_VPORT_TX,
            GDMA_CREATE_DMA_REGION,
            GDMA_CREATE_DMA_REGION,
            MANA_CREATE_WQ_OBJ,
            GDMA_CREATE_DMA_REGION,
            GDMA_CREATE_DMA_REGION,
            MANA_CREATE_WQ_OBJ,
            MANA_CONFIG_VPORT_RX,
        ]
    );
    assert!(state.rx_enabled);
    drop(state);
    assert_eq!(fake.rx_buffers_posted(), 16);
}

#[test]
fn frames_of_every_length_pass_both_ways_byte_exact() {
    let (fake, mut driver, _clock) = start();
    for len in 14..=1514 {
        let frame = plain_frame(len, 7);
        send(&mut driver, &frame, TxMeta::default()).expect("transmit");
        assert!(
            fake.inject(&frame, RxForgery::default()),
            "inject len {len} state {:?} counters {:?}",
            driver.link_state(),
            driver.counters()
        );
        let received = receive_all(&mut driver);
        assert_eq!(received.len(), 1, "len {len}");
        assert_eq!(received[0].0, frame, "received bytes, len {len}");
        driver.poll(0);
    }
    let state = fake.state.borrow();
    assert_eq!(state.sent.len(), 1501);
    for (index, sent) in state.sent.iter().enumerate() {
        assert_eq!(sent.bytes, plain_frame(14 + index, 7));
        assert!(!sent.long_form);
    }
    let stats = driver.stats();
    assert_eq!((stats.tx_frames, stats.rx_frames), (1501, 1501));
}

#[test]
fn checksum_and_lso_requests_reach_the_device_as_oob_bits_and_header_sge() {
    let (fake, mut driver, _clock) = start();
    let frame = tcp_frame(100);
    let meta = TxMeta {
        checksum: Some((34, 16)),
        tso_mss: None,
    };
    send(&mut driver, &frame, meta).unwrap();
    let big = tcp_frame(60_000);
    let meta = TxMeta {
        checksum: Some((34, 16)),
        tso_mss: Some(1460),
    };
    send(&mut driver, &big, meta).unwrap();
    let state = fake.state.borrow();
    let checksum = &state.sent[0];
    assert!(checksum.oob.tcp_checksum && checksum.oob.ipv4 && !checksum.oob.udp_checksum);
    assert_eq!(checksum.oob.transport_offset, 34);
    assert_eq!(
        checksum.bytes, frame,
        "checksum offload leaves the bytes alone"
    );
    assert_eq!(checksum.lso_mss, None);
    let lso = &state.sent[1];
    assert_eq!(lso.lso_mss, Some(1460));
    assert_eq!(
        lso.sge_lengths,
        vec![54, 60_000],
        "headers alone in the first SGE"
    );
    assert!(lso.oob.ip_checksum && lso.oob.tcp_checksum);
    assert_eq!(&lso.bytes[54..], &big[54..], "payload untouched");
    assert_eq!(
        &lso.bytes[16..18],
        &[0, 0],
        "IPv4 total length zeroed for LSO"
    );
    drop(state);
    let counters = driver.counters();
    assert_eq!(counters.tx_checksum_offloads, 1);
    assert_eq!(counters.tx_segmentation_offloads, 1);
}

#[test]
fn the_long_oob_is_used_when_the_device_refuses_the_short_form() {
    let fake = FakeMana::new();
    fake.state.borrow_mut().short_form_allowed = false;
    fake.state.borrow_mut().tx_vport_offset = 0x123;
    let (mut driver, _clock) = start_with(&fake, config()).unwrap();
    send(&mut driver, &plain_frame(100, 1), TxMeta::default()).unwrap();
    let state = fake.state.borrow();
    assert!(state.sent[0].long_form);
    assert_eq!(state.sent[0].oob.packet_format, MANA_LONG_PACKET_FORMAT);
    assert_eq!(state.sent[0].bytes, plain_frame(100, 1));
}

#[test]
fn transmit_error_completions_are_counted_and_free_their_slot() {
    let (fake, mut driver, _clock) = start();
    fake.state.borrow_mut().tx_error = Some((CQE_TX_FIRST_ERROR + 1, 3));
    for _ in 0..40 {
        send(&mut driver, &plain_frame(200, 2), TxMeta::default()).unwrap();
        driver.poll(0);
    }
    let counters = driver.counters();
    assert_eq!(counters.tx_errors, 3);
    assert_eq!(driver.stats().tx_frames, 37);
    assert!(driver.can_transmit(), "error completions free their WQEs");
}

#[test]
fn a_silent_hardware_channel_fails_bring_up_in_bounded_time() {
    let fake = FakeMana::new();
    fake.state.borrow_mut().hwc_silent = true;
    let result = start_with(&fake, config());
    match result {
        Err(Error::HwcTimeout { request, waited_ns }) => {
            assert_eq!(request, GDMA_VERIFY_VF_DRIVER_VERSION);
            assert!(waited_ns >= 50_000_000);
        }
        Err(other) => panic!("expected an HWC timeout, got {other}"),
        Ok(_) => panic!("bring-up succeeded against a silent HWC"),
    }
}

#[test]
fn stop_finishes_when_the_hardware_channel_stops_answering() {
    let (fake, mut driver, _clock) = start();
    fake.state.borrow_mut().hwc_silent = true;
    driver.stop();
    assert_eq!(driver.link_state(), LinkState::Down);
    assert_eq!(
        send(&mut driver, &plain_frame(60, 0), TxMeta::default()),
        Err(DeviceError::NotReady)
    );
}

#[test]
fn link_events_move_the_link_state() {
    let (fake, mut driver, _clock) = start();
    let mut data = [0u8; 12];
    data[3] = RECONFIG_LINK_DISCONNECT;
    fake.post_hwc_event(EQE_HWC_RECONFIG_DATA, data, None);
    driver.poll(0);
    assert_eq!(driver.link_state(), LinkState::Down);
    assert_eq!(
        send(&mut driver, &plain_frame(60, 0), TxMeta::default()),
        Err(DeviceError::NotReady)
    );
    data[3] = RECONFIG_LINK_CONNECT;
    fake.post_hwc_event(EQE_HWC_RECONFIG_DATA, data, None);
    driver.poll(0);
    assert_eq!(driver.link_state(), LinkState::Up);
    assert_eq!(driver.counters().link_events, 2);
    // Each event came with the HWC EQ's MSI-X vector (index 0), re-armed after draining.
    let hwc_interrupts = fake
        .state
        .borrow()
        .interrupts
        .iter()
        .filter(|index| **index == 0)
        .count();
    assert!(hwc_interrupts >= 2, "HWC EQ interrupts: {hwc_interrupts}");
}

#[test]
fn a_reset_request_re_initialises_the_function() {
    let (fake, mut driver, _clock) = start();
    fake.post_hwc_event(EQE_HWC_RESET_REQUEST, [0; 12], None);
    driver.poll(0);
    assert_eq!(driver.link_state(), LinkState::Resetting);
    driver.poll(10_000_000);
    assert_eq!(driver.link_state(), LinkState::Up);
    let counters = driver.counters();
    assert_eq!(counters.reset_requests, 1);
    assert_eq!(counters.initializations, 2);
    let frame = plain_frame(300, 3);
    send(&mut driver, &frame, TxMeta::default()).unwrap();
    assert!(fake.inject(&frame, RxForgery::default()));
    assert_eq!(receive_all(&mut driver)[0].0, frame);
}

#[test]
fn a_reset_request_the_device_generates_on_demand_is_handled_the_same() {
    let (_fake, mut driver, _clock) = start();
    driver.generate_reset_request().unwrap();
    driver.poll(0);
    assert_eq!(driver.link_state(), LinkState::Resetting);
    driver.poll(10_000_000);
    assert_eq!(driver.link_state(), LinkState::Up);
    assert_eq!(driver.counters().reset_requests, 1);
}

#[test]
fn malformed_events_are_dropped_or_reset_the_function() {
    let (fake, mut driver, _clock) = start();
    // An unknown EQE type on the HWC EQ: counted, nothing else happens.
    fake.post_hwc_event(77, [0xff; 12], None);
    // A completion event naming a CQ that is not ours on the data EQ: counted.
    fake.post_data_event(EQE_COMPLETION, [0xee; 12], None);
    driver.poll(0);
    assert_eq!(
        driver.link_state(),
        LinkState::Up,
        "{:?}",
        driver.counters()
    );
    let counters = driver.counters();
    assert_eq!(counters.hwc.bad_events, 1);
    assert_eq!(counters.bad_events, 1);
    // An EQE with an owner count from no lap the driver expects: the ring is not to be
    // trusted, so the function is re-initialised.
    fake.post_data_event(EQE_COMPLETION, [0; 12], Some(5));
    driver.poll(1);
    assert_eq!(driver.link_state(), LinkState::Resetting);
    assert_eq!(driver.counters().queue_overflows, 1);
    driver.poll(100_000_000);
    assert_eq!(driver.link_state(), LinkState::Up);
}

#[test]
fn impossible_receive_completions_are_dropped_and_the_buffer_reused() {
    let (fake, mut driver, _clock) = start();
    let frame = plain_frame(100, 4);
    let forgeries = [
        RxForgery {
            length: Some(4000),
            ..RxForgery::default()
        },
        RxForgery {
            length: Some(3),
            ..RxForgery::default()
        },
        RxForgery {
            wqe_offset: Some(0x1234_5678),
            ..RxForgery::default()
        },
        RxForgery {
            cqe_type: Some(CQE_RX_TRUNCATED),
            ..RxForgery::default()
        },
        RxForgery {
            cqe_type: Some(17),
            ..RxForgery::default()
        },
    ];
    for forgery in forgeries {
        assert!(fake.inject(&frame, forgery));
        assert!(receive_all(&mut driver).is_empty(), "{forgery:?}");
    }
    assert_eq!(driver.stats().rx_dropped_bad, 5);
    assert_eq!(
        fake.rx_buffers_posted(),
        16,
        "every buffer went back to the device"
    );
    // A completion for a queue that is not the RQ consumes the real buffer's slot in the
    // fake but is not trusted by the driver.
    assert!(fake.inject(
        &frame,
        RxForgery {
            wq_number: Some(0x00ab_cdef),
            ..RxForgery::default()
        }
    ));
    assert!(receive_all(&mut driver).is_empty());
    // The driver resynchronises on the next good completion (the skipped buffer is reposted).
    assert!(fake.inject(&frame, RxForgery::default()));
    let frames = receive_all(&mut driver);
    assert_eq!(frames.len(), 1);
    assert_eq!(frames[0].0, frame);
    // Unknown type, never-posted WQE, CQE for another queue, two skipped buffers.
    assert_eq!(driver.counters().bad_completions, 5);
    assert_eq!(fake.rx_buffers_posted(), 16);
}

#[test]
fn receive_checksum_flags_become_rx_meta() {
    let (fake, mut driver, _clock) = start();
    let frame = tcp_frame(10);
    let good = (RxFlags::IP_CHECKSUM_GOOD | RxFlags::TCP_CHECKSUM_GOOD).bits();
    let bad = (RxFlags::IP_CHECKSUM_GOOD | RxFlags::TCP_CHECKSUM_BAD).bits();
    for flags in [good, bad, 0] {
        fake.inject(
            &frame,
            RxForgery {
                flags,
                ..RxForgery::default()
            },
        );
    }
    let verified: Vec<bool> = receive_all(&mut driver)
        .iter()
        .map(|(_, meta)| meta.checksum_verified)
        .collect();
    assert_eq!(verified, vec![true, false, false]);
}

#[test]
fn out_of_range_ids_and_counts_from_the_device_are_refused() {
    let fake = FakeMana::new();
    fake.state.borrow_mut().eq_id_override = Some(0x0100_0000);
    assert!(matches!(
        start_with(&fake, config()),
        Err(Error::ManaProtocol { .. })
    ));
    let fake = FakeMana::new();
    fake.state.borrow_mut().listed_devices = Some(100_000);
    let (driver, _clock) = start_with(&fake, config()).expect("the list is cut to its room");
    assert_eq!(driver.counters().bad_events, 1);
    let fake = FakeMana::new();
    fake.state.borrow_mut().fail_request = Some(MANA_QUERY_VPORT_CONFIG);
    assert!(matches!(
        start_with(&fake, config()),
        Err(Error::HwcFailed {
            request: MANA_QUERY_VPORT_CONFIG,
            status: 1
        })
    ));
}

#[test]
fn removal_is_gone_without_spinning_or_panicking() {
    let (fake, mut driver, clock) = start();
    send(&mut driver, &plain_frame(100, 5), TxMeta::default()).unwrap();
    fake.state.borrow_mut().removed = true;
    let before = clock.0.get();
    driver.poll(0);
    assert_eq!(driver.link_state(), LinkState::Gone);
    assert_eq!(
        send(&mut driver, &plain_frame(100, 5), TxMeta::default()),
        Err(DeviceError::Gone)
    );
    assert_eq!(receive_all(&mut driver).len(), 0);
    driver.stop();
    assert!(
        clock.0.get() - before < 1_000_000,
        "no waiting on a removed device"
    );
    assert!(matches!(
        driver.reinitialize(),
        Err(Error::DeviceGone { .. })
    ));
}

#[test]
fn stop_and_bring_up_again() {
    let (fake, mut driver, _clock) = start();
    driver.stop();
    {
        let state = fake.state.borrow();
        assert!(!state.rx_enabled);
        assert!(state.requests.ends_with(&[
            MANA_CONFIG_VPORT_RX,
            MANA_DESTROY_WQ_OBJ,
            MANA_DESTROY_WQ_OBJ,
            GDMA_DISABLE_QUEUE,
            GDMA_DEREGISTER_DEVICE,
        ]));
    }
    driver.reinitialize().expect("second bring-up");
    let frame = plain_frame(700, 6);
    send(&mut driver, &frame, TxMeta::default()).unwrap();
    assert!(fake.inject(&frame, RxForgery::default()));
    assert_eq!(receive_all(&mut driver)[0].0, frame);
    assert_eq!(fake.state.borrow().sent.last().unwrap().bytes, frame);
}

#[test]
fn completions_interrupt_through_the_data_vector_and_are_re_armed() {
    let (fake, mut driver, _clock) = start();
    let data_interrupts = |fake: &FakeMana| {
        fake.state
            .borrow()
            .interrupts
            .iter()
            .filter(|index| **index == 1)
            .count()
    };
    let before = data_interrupts(&fake);
    fake.inject(&plain_frame(80, 0), RxForgery::default());
    assert_eq!(data_interrupts(&fake), before + 1);
    // Not drained yet: a second frame raises nothing (the CQ and EQ are disarmed).
    fake.inject(&plain_frame(80, 0), RxForgery::default());
    assert_eq!(data_interrupts(&fake), before + 1);
    assert_eq!(receive_all(&mut driver).len(), 2);
    driver.poll(0);
    fake.inject(&plain_frame(80, 0), RxForgery::default());
    assert_eq!(
        data_interrupts(&fake),
        before + 2,
        "re-armed after draining"
    );
    assert!(driver.stats().interrupts >= 1);
    driver.generate_test_event().unwrap();
    driver.poll(0);
    assert_eq!(driver.counters().test_events, 1);
}

#[test]
fn invalid_configurations_are_refused() {
    let fake = FakeMana::new();
    for bad in [
        ManaConfig {
            rx_ring_size: 12,
            ..config()
        },
        ManaConfig {
            rx_buffer_size: 1024,
            ..config()
        },
        ManaConfig {
            tx_buffer_bytes: 4096,
            ..config()
        },
        ManaConfig {
            data_msix_index: 0,
            ..config()
        },
    ] {
        assert!(matches!(
            start_with(&fake, bad),
            Err(Error::InvalidConfig { .. })
        ));
    }
}

#[test]
fn a_late_answer_after_an_hwc_timeout_is_dropped_and_the_channel_recovers() {
    let (fake, mut driver, _clock) = start();
    fake.state.borrow_mut().hwc_silent = true;
    assert!(matches!(
        driver.generate_test_event(),
        Err(Error::HwcTimeout {
            request: GDMA_GENERATE_TEST_EQE,
            ..
        })
    ));
    // The device wakes up: it answers the old request first (into a receive WQE the driver
    // gave up on), then the new one.
    fake.state.borrow_mut().hwc_silent = false;
    driver
        .generate_test_event()
        .expect("the channel works again");
    assert_eq!(driver.counters().hwc.bad_completions, 1);
    driver.poll(0);
    assert_eq!(driver.counters().test_events, 2);
    assert_eq!(driver.link_state(), LinkState::Up);
}
