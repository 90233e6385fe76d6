//! netvsc host tests against the fake host: negotiation fallbacks, a silent host, bad buffer
//! layouts and ranges, frames both ways, completions, link, keepalive, offloads and rescind.

use alloc::vec;
use alloc::vec::Vec;

use net_device::{DeviceError, HostPath, LinkState, NetDevice, RxMeta, TxMeta};

use super::fake_host::{FakeChannel, FakeHostConfig, FakeNetvscHost, FakeTxFrame};
use super::nvsp::{self, NdisConfigCapabilities, NvspVersion};
use super::{IncomingKind, IncomingPacket, Netvsc, NetvscConfig, Step, TransferRange, VfEvent};
use crate::Error;
use crate::checksum::tests::{make_partial, reference_checksum, tcp_ipv4_frame};
use crate::fake::FakeDmaAllocator;

fn bring_up(
    host: FakeHostConfig,
    config: NetvscConfig,
) -> (FakeNetvscHost, Netvsc<FakeChannel>, FakeDmaAllocator) {
    let (host, channel) = FakeNetvscHost::new(host);
    let dma = FakeDmaAllocator::new();
    let device = match Netvsc::new(channel, &dma, config) {
        Ok(device) => device,
        Err((error, _)) => panic!("bring-up failed: {error}"),
    };
    (host, device, dma)
}

fn try_bring_up(
    host: FakeHostConfig,
    config: NetvscConfig,
) -> (FakeNetvscHost, Error, FakeDmaAllocator) {
    let (host, channel) = FakeNetvscHost::new(host);
    let dma = FakeDmaAllocator::new();
    match Netvsc::new(channel, &dma, config) {
        Ok(_) => panic!("bring-up should fail"),
        Err((error, _channel)) => (host, error, dma),
    }
}

fn frame_of(len: usize, seed: u8) -> Vec<u8> {
    let mut frame: Vec<u8> = (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect();
    if len >= 14 {
        // A locally administered unicast destination and an ethertype no offload looks at.
        frame[0] = 0x02;
        frame[12] = 0x88;
        frame[13] = 0xb5;
    }
    frame
}

fn send(device: &mut Netvsc<FakeChannel>, frame: &[u8], meta: TxMeta) -> Result<(), DeviceError> {
    let result = device.transmit(frame.len(), &mut |buffer| {
        buffer.copy_from_slice(frame);
        meta
    });
    device.flush();
    result
}

fn receive_all(device: &mut Netvsc<FakeChannel>) -> Vec<(Vec<u8>, RxMeta)> {
    let mut frames = Vec::new();
    loop {
        let got = device.receive(32, &mut |frame, meta| frames.push((frame.to_vec(), meta)));
        if got == 0 {
            return frames;
        }
    }
}

#[test]
fn brings_up_at_the_highest_version_with_everything_linux_sets() {
    let (host, device, _dma) = bring_up(FakeHostConfig::default(), NetvscConfig::default());
    assert_eq!(host.init_offers(), vec![NvspVersion::V61.0]);
    assert_eq!(device.negotiated().version, NvspVersion::V61);
    let config = host.ndis_config().expect("NDIS config sent");
    assert_eq!(config.mtu, 1514);
    let capabilities = NdisConfigCapabilities::from_bits_truncate(config.capabilities);
    assert!(capabilities.contains(NdisConfigCapabilities::SRIOV | NdisConfigCapabilities::TEAMING));
    assert!(capabilities.contains(NdisConfigCapabilities::IEEE_8021Q));
    assert_eq!(host.ndis_version(), Some((6, 30)));
    assert_eq!(host.packet_filter(), Some(0x1 | 0x4 | 0x8));
    assert_eq!(device.mac_address(), FakeHostConfig::default().mac);
    assert_eq!(device.link_state(), LinkState::Up);
    let capabilities = device.capabilities();
    assert_eq!(capabilities.mtu, 1500);
    assert!(capabilities.tx_checksum && capabilities.rx_checksum);
    assert_eq!(capabilities.max_tso_size, 0xf53c - 14);
    let parameters = host.offload_parameters().expect("offload parameters set");
    assert_eq!(parameters.tcp4_checksum, 4);
    assert_eq!(parameters.lso_v2_ipv4, 2);
    assert_eq!(parameters.lso_v1, 1);
    assert_eq!(device.negotiated().send_section_size, Some(6144));
    // 1 MiB receive buffer in 1806-byte sub-allocations.
    assert_eq!(
        device.negotiated().receive_sub_allocations,
        (1806, (1 << 20) / 1806)
    );
    assert!(device.can_transmit());
}

#[test]
fn negotiation_falls_back_one_exact_version_at_a_time() {
    for (accepted, offers) in [
        (NvspVersion::V6, 2),
        (NvspVersion::V5, 3),
        (NvspVersion::V4, 4),
        (NvspVersion::V2, 5),
    ] {
        let host_config = FakeHostConfig {
            versions: vec![accepted],
            ..FakeHostConfig::default()
        };
        let (host, device, _dma) = bring_up(host_config, NetvscConfig::default());
        let expected: Vec<u32> = NvspVersion::NEGOTIATION_ORDER[..offers]
            .iter()
            .map(|v| v.0)
            .collect();
        assert_eq!(host.init_offers(), expected, "host accepting {accepted}");
        assert_eq!(device.negotiated().version, accepted);
        let capabilities =
            NdisConfigCapabilities::from_bits_truncate(host.ndis_config().unwrap().capabilities);
        assert_eq!(
            capabilities.contains(NdisConfigCapabilities::SRIOV),
            accepted >= NvspVersion::V4
        );
        assert_eq!(
            capabilities.contains(NdisConfigCapabilities::TEAMING),
            accepted >= NvspVersion::V5
        );
        let minor = if accepted >= NvspVersion::V5 { 30 } else { 1 };
        assert_eq!(host.ndis_version(), Some((6, minor)));
        // UDP checksum offload stays off below NVSP 5 (host bugs).
        let udp = host.offload_parameters().unwrap().udp4_checksum;
        assert_eq!(
            udp == 4,
            accepted >= NvspVersion::V5,
            "udp {udp} at {accepted}"
        );
        assert_eq!(device.link_state(), LinkState::Up);
    }
}

#[test]
fn a_host_without_a_common_version_is_refused_and_cleaned_up() {
    let host_config = FakeHostConfig {
        versions: vec![NvspVersion::V1],
        ..FakeHostConfig::default()
    };
    let (host, error, dma) = try_bring_up(host_config, NetvscConfig::default());
    assert_eq!(error, Error::NoCommonVersion);
    assert_eq!(host.init_offers().len(), 5);
    assert!(host.closed());
    assert_eq!(host.gpadls().0, 0, "receive buffer GPADL torn down");
    assert_eq!(dma.live_regions(), 0, "every DMA region freed");
}

#[test]
fn a_host_that_never_answers_fails_within_the_bound() {
    let host_config = FakeHostConfig {
        answer_init: false,
        ..FakeHostConfig::default()
    };
    let started = std::time::Instant::now();
    let (host, error, _dma) = try_bring_up(host_config, NetvscConfig::default());
    assert!(matches!(
        error,
        Error::HostTimeout {
            step: Step::Init,
            timeout_ms: 5000
        }
    ));
    // One INIT, then a bounded number of waits on the (fake) clock, not a spin.
    assert_eq!(host.init_offers().len(), 1);
    assert!(host.waits() < 10, "{} waits", host.waits());
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
}

#[test]
fn a_receive_buffer_layout_beyond_the_buffer_is_refused() {
    for section in [
        nvsp::ReceiveBufferSection {
            offset: 0,
            sub_allocation_size: 1806,
            sub_allocation_count: 10_000,
            end_offset: 1806 * 10_000,
        },
        nvsp::ReceiveBufferSection {
            offset: 4096,
            sub_allocation_size: 1806,
            sub_allocation_count: 10,
            end_offset: 1806 * 10 + 4096,
        },
        nvsp::ReceiveBufferSection {
            offset: 0,
            sub_allocation_size: 0x8000_0000,
            sub_allocation_count: 4,
            end_offset: 4096,
        },
    ] {
        let (host, channel) = FakeNetvscHost::new(FakeHostConfig::default());
        host.override_receive_buffer_complete(nvsp::ReceiveBufferComplete {
            status: nvsp::status::SUCCESS,
            section_count: 1,
            section,
        });
        let dma = FakeDmaAllocator::new();
        let Err((error, _)) = Netvsc::new(channel, &dma, NetvscConfig::default()) else {
            panic!("accepted {section:?}");
        };
        assert!(matches!(error, Error::OutOfRange { .. }), "{error:?}");
        assert_eq!(dma.live_regions(), 0);
    }
}

fn frames_both_ways(use_send_buffer: bool) {
    let config = NetvscConfig {
        use_send_buffer,
        ..NetvscConfig::default()
    };
    let (host, mut device, _dma) = bring_up(FakeHostConfig::default(), config);
    assert_eq!(
        device.negotiated().send_section_size.is_some(),
        use_send_buffer
    );
    for len in 14..=1514 {
        let frame = frame_of(len, len as u8);
        send(&mut device, &frame, TxMeta::default()).unwrap();
        device.poll(0);
        let sent = host.take_tx_frames();
        assert_eq!(
            sent,
            vec![FakeTxFrame {
                frame: frame.clone(),
                checksum: None,
                lso: None,
                via_send_buffer: use_send_buffer,
            }],
            "length {len}"
        );
        host.inject_frames(&[(frame.clone(), None)]);
        let received = receive_all(&mut device);
        assert_eq!(received.len(), 1, "length {len}");
        assert_eq!(received[0].0, frame, "length {len}");
    }
    assert_eq!(device.transmits_in_flight(), 0);
    assert_eq!(device.stats().tx_frames, 1501);
    assert_eq!(device.stats().rx_frames, 1501);
    assert_eq!(host.outstanding_transfers(), 0);
    // One byte over the MTU without segmentation is refused before anything is written.
    let too_long = frame_of(1515, 1);
    assert!(matches!(
        send(&mut device, &too_long, TxMeta::default()),
        Err(DeviceError::FrameTooLarge { .. })
    ));
}

#[test]
fn frames_of_every_length_pass_both_ways_through_the_send_buffer() {
    frames_both_ways(true);
}

#[test]
fn frames_of_every_length_pass_both_ways_gpa_direct() {
    frames_both_ways(false);
}

#[test]
fn every_transfer_packet_is_completed_and_the_host_waits_when_the_buffer_is_full() {
    let config = NetvscConfig {
        receive_buffer_len: 64 * 1024,
        ..NetvscConfig::default()
    };
    let (host, mut device, _dma) = bring_up(FakeHostConfig::default(), config);
    let data_slots = host.free_data_sub_allocations();
    assert!(data_slots > 0 && data_slots < 100);
    let frames: Vec<(Vec<u8>, Option<u32>)> = (0..1000)
        .map(|i| (frame_of(600 + i % 900, i as u8), None))
        .collect();
    host.inject_frames(&frames);
    assert!(
        host.pending_rx() > 0,
        "the buffer holds fewer than 1000 frames"
    );
    let mut received = Vec::new();
    for _ in 0..10_000 {
        device.receive(7, &mut |frame, _| received.push(frame.to_vec()));
        if received.len() == frames.len() {
            break;
        }
    }
    assert_eq!(received.len(), frames.len());
    for (got, (sent, _)) in received.iter().zip(&frames) {
        assert_eq!(got, sent);
    }
    assert_eq!(host.pending_rx(), 0);
    assert_eq!(host.outstanding_transfers(), 0, "every packet completed");
    assert_eq!(
        host.free_data_sub_allocations(),
        data_slots,
        "nothing leaked"
    );
    assert_eq!(host.unknown_completions(), 0);
}

#[test]
fn control_replies_are_completed_too() {
    let (host, mut device, _dma) = bring_up(FakeHostConfig::default(), NetvscConfig::default());
    // INITIALIZE, 3 queries, offload query, 2 sets: all completed during bring-up.
    assert_eq!(host.outstanding_transfers(), 0);
    assert!(device.counters().receive_completions >= 7);
    host.set_link(false);
    device.poll(0);
    assert_eq!(host.outstanding_transfers(), 0);
}

#[test]
fn malformed_host_packets_are_counted_dropped_and_still_completed() {
    let (host, mut device, _dma) = bring_up(FakeHostConfig::default(), NetvscConfig::default());
    let payload = nvsp::encode(
        nvsp::message_type::SEND_RNDIS_PACKET,
        &nvsp::SendRndisPacket {
            channel_type: 0,
            send_buffer_section_index: u32::MAX,
            send_buffer_section_size: 0,
        },
    )
    .to_vec();
    let transfer =
        |transaction_id, pageset_id, ranges: Vec<TransferRange>, payload: Vec<u8>| IncomingPacket {
            kind: IncomingKind::TransferPages,
            transaction_id,
            completion_requested: true,
            pageset_id,
            ranges,
            payload,
        };
    let buffer_end = (1 << 20) / 1806 * 1806;
    // Ranges past the end, overflowing, too short, and a garbage RNDIS message.
    host.write_receive_buffer(20 * 1806, &[0xff; 64]);
    host.inject_raw(transfer(
        1,
        0xcafe,
        vec![
            TransferRange {
                byte_count: 100,
                byte_offset: buffer_end as u32 - 50,
            },
            TransferRange {
                byte_count: u32::MAX,
                byte_offset: u32::MAX,
            },
            TransferRange {
                byte_count: 4,
                byte_offset: 0,
            },
            TransferRange {
                byte_count: 64,
                byte_offset: 20 * 1806,
            },
        ],
        payload.clone(),
    ));
    // A page set that is not our receive buffer, and a payload that is not SEND_RNDIS_PACKET.
    host.inject_raw(transfer(
        2,
        0xbeef,
        vec![TransferRange {
            byte_count: 64,
            byte_offset: 0,
        }],
        payload.clone(),
    ));
    host.inject_raw(transfer(3, 0xcafe, vec![], vec![1, 2]));
    // A completion for nothing we sent, and an in-band message of an unknown type.
    host.inject_raw(IncomingPacket {
        kind: IncomingKind::Completion,
        transaction_id: 0x0777_0000_0000_0001,
        payload: vec![108, 0, 0, 0, 1, 0, 0, 0],
        ..IncomingPacket::default()
    });
    host.inject_raw(IncomingPacket {
        kind: IncomingKind::InBand,
        transaction_id: 9,
        payload: vec![0xee, 0, 0, 0],
        ..IncomingPacket::default()
    });
    let delivered = receive_all(&mut device);
    assert!(delivered.is_empty());
    let counters = device.counters();
    assert_eq!(counters.bad_ranges, 4);
    assert_eq!(counters.bad_packets, 4);
    assert_eq!(device.stats().rx_dropped_bad, 4);
    // All three transfer packets were completed (the host does not know their ids).
    assert_eq!(host.unknown_completions(), 3);
    assert_eq!(device.link_state(), LinkState::Up);
    // Traffic still flows afterwards.
    host.inject_frames(&[(frame_of(60, 3), None)]);
    assert_eq!(receive_all(&mut device).len(), 1);
}

#[test]
fn link_indications_follow_the_host_and_network_change_asks_for_an_announcement() {
    let (host, mut device, _dma) = bring_up(FakeHostConfig::default(), NetvscConfig::default());
    host.set_link(false);
    device.poll(0);
    assert_eq!(device.link_state(), LinkState::Down);
    assert!(!device.can_transmit());
    assert_eq!(
        send(&mut device, &frame_of(60, 0), TxMeta::default()),
        Err(DeviceError::NotReady)
    );
    // netvsp sends the second edge of a flap 5 s later: nothing changes until it arrives.
    device.poll(1_000_000_000);
    assert_eq!(device.link_state(), LinkState::Down);
    host.set_link(true);
    device.poll(5_000_000_000);
    assert_eq!(device.link_state(), LinkState::Up);
    assert!(device.can_transmit());
    assert_eq!(device.counters().link_indications, 2);
    host.indicate(super::rndis::status::NETWORK_CHANGE);
    device.poll(0);
    assert!(device.take_announce_request());
    assert!(!device.take_announce_request());
    assert_eq!(device.link_state(), LinkState::Up);
}

#[test]
fn a_host_that_starts_disconnected_reports_down() {
    let host_config = FakeHostConfig {
        media_connected: false,
        ..FakeHostConfig::default()
    };
    let (host, mut device, _dma) = bring_up(host_config, NetvscConfig::default());
    assert_eq!(device.link_state(), LinkState::Down);
    host.set_link(true);
    device.poll(0);
    assert_eq!(device.link_state(), LinkState::Up);
}

#[test]
fn host_keepalives_are_answered_with_their_id() {
    let (host, mut device, _dma) = bring_up(FakeHostConfig::default(), NetvscConfig::default());
    host.send_keepalive(42);
    host.send_keepalive(43);
    device.poll(0);
    assert_eq!(host.keepalive_answers(), vec![42, 43]);
    assert_eq!(device.counters().keepalives_answered, 2);
}

#[test]
fn vf_association_is_recorded_and_completed() {
    let (host, mut device, _dma) = bring_up(FakeHostConfig::default(), NetvscConfig::default());
    assert_eq!(device.vf_association(), None);
    host.send_vf_association(true, 7);
    device.poll(0);
    let association = device.vf_association().unwrap();
    assert!(association.allocated);
    assert_eq!(association.serial_number, 7);
    assert_eq!(host.in_band_completions(), 1);
}

#[test]
fn switch_to_the_vf_counts_only_after_the_host_completed_it() {
    let (host, mut device, _dma) = bring_up(FakeHostConfig::default(), NetvscConfig::default());
    assert!(!device.request_data_path(true), "no VF associated yet");
    assert!(host.switch_requests().is_empty());
    assert!(
        device.host_data_path().is_none(),
        "the host steers nothing yet"
    );
    host.send_vf_association(true, 7);
    device.poll(0);
    assert_eq!(
        device.host_data_path().map(|host| host.state()),
        Some(HostPath::Synthetic)
    );
    assert_eq!(
        device.take_vf_event(),
        Some(VfEvent::Associated { serial_number: 7 })
    );
    host.hold_switch_completions(true);
    assert!(device.request_data_path(true));
    assert_eq!(host.switch_requests(), [1]);
    device.poll(0);
    assert_eq!(
        device.data_path(),
        HostPath::SwitchingToVf,
        "completion awaited"
    );
    host.complete_switch(0);
    device.poll(0);
    assert_eq!(device.data_path(), HostPath::Vf);
    assert_eq!(device.take_vf_event(), Some(VfEvent::DataPathVf));
    // Back to synthetic: the VF is unused at once, the completion confirms.
    assert!(device.request_data_path(false));
    assert_eq!(device.data_path(), HostPath::SwitchingToSynthetic);
    host.complete_switch(1);
    device.poll(0);
    assert_eq!(device.data_path(), HostPath::Synthetic);
    assert_eq!(host.switch_requests(), [1, 0]);
    assert_eq!(device.data_path_counters().switch_completions, 2);
}

#[test]
fn the_host_moving_the_path_back_or_withdrawing_the_vf_is_followed() {
    let (host, mut device, _dma) = bring_up(FakeHostConfig::default(), NetvscConfig::default());
    host.send_vf_association(true, 9);
    device.poll(0);
    assert!(device.request_data_path(true));
    device.poll(0);
    assert_eq!(device.data_path(), HostPath::Vf);
    host.send_host_switch(false);
    device.poll(0);
    assert_eq!(device.data_path(), HostPath::Synthetic);
    assert_eq!(device.counters().host_data_path_switches, 1);
    // An eject arriving while a switch is in flight: the guest asks back before the
    // completion; the late completion of the first request changes nothing.
    host.hold_switch_completions(true);
    assert!(device.request_data_path(true));
    assert!(device.request_data_path(false));
    host.complete_switch(1);
    device.poll(0);
    assert_eq!(device.data_path(), HostPath::SwitchingToSynthetic);
    host.complete_switch(2);
    device.poll(0);
    assert_eq!(device.data_path(), HostPath::Synthetic);
    assert_eq!(device.data_path_counters().stale_completions, 1);
    // allocated = 0 while on the VF: synthetic at once, no new switch possible.
    host.hold_switch_completions(false);
    assert!(device.request_data_path(true));
    device.poll(0);
    assert_eq!(device.data_path(), HostPath::Vf);
    host.send_vf_association(false, 9);
    device.poll(0);
    assert_eq!(device.data_path(), HostPath::Synthetic);
    assert!(!device.request_data_path(true));
    assert_eq!(
        host.in_band_completions(),
        3,
        "every host message completed"
    );
}

#[test]
fn rescind_mid_traffic_reports_gone_without_panicking() {
    let (host, mut device, _dma) = bring_up(FakeHostConfig::default(), NetvscConfig::default());
    host.hold_tx_completions(true);
    for i in 0..10 {
        send(&mut device, &frame_of(100, i), TxMeta::default()).unwrap();
    }
    host.inject_frames(&[(frame_of(70, 1), None), (frame_of(71, 2), None)]);
    host.rescind();
    assert!(receive_all(&mut device).is_empty());
    assert_eq!(device.link_state(), LinkState::Gone);
    assert_eq!(
        send(&mut device, &frame_of(60, 0), TxMeta::default()),
        Err(DeviceError::Gone)
    );
    assert!(!device.can_transmit());
    device.poll(0);
    device.stop();
    assert_eq!(device.link_state(), LinkState::Gone);
}

#[test]
fn a_full_ring_and_held_completions_report_ring_full_then_recover() {
    let config = NetvscConfig {
        use_send_buffer: false,
        small_slots: 8,
        ..NetvscConfig::default()
    };
    let (host, mut device, _dma) = bring_up(FakeHostConfig::default(), config);
    host.hold_tx_completions(true);
    for i in 0..8 {
        send(&mut device, &frame_of(100, i), TxMeta::default()).unwrap();
    }
    assert!(!device.can_transmit());
    assert_eq!(
        send(&mut device, &frame_of(100, 9), TxMeta::default()),
        Err(DeviceError::RingFull)
    );
    host.hold_tx_completions(false);
    device.poll(0);
    assert!(device.can_transmit());
    assert_eq!(device.transmits_in_flight(), 0);
    host.set_ring_full(true);
    assert_eq!(
        send(&mut device, &frame_of(100, 9), TxMeta::default()),
        Err(DeviceError::RingFull)
    );
    host.set_ring_full(false);
    send(&mut device, &frame_of(100, 9), TxMeta::default()).unwrap();
    device.poll(0);
    assert_eq!(host.take_tx_frames().len(), 9);
    assert_eq!(device.stats().tx_ring_full, 2);
}

/// A sender blocked on a full guest → host ring must be woken when the host makes room: the
/// driver asks for the host's signal (`pending_send_size`) for as long as a data packet does
/// not fit, and withdraws the request once one does.
#[test]
fn a_full_ring_asks_the_host_to_signal_room_until_there_is_room() {
    let (host, mut device, _dma) = bring_up(FakeHostConfig::default(), NetvscConfig::default());
    assert_eq!(host.room_signal(), (0, 0), "no request while there is room");
    host.set_ring_full(true);
    assert_eq!(
        send(&mut device, &frame_of(100, 1), TxMeta::default()),
        Err(DeviceError::RingFull)
    );
    let (threshold, requests) = host.room_signal();
    assert_eq!(requests, 1);
    // The largest data packet's ring bytes: the descriptor of a GPA-direct send of the
    // largest transmit slot (its page list), not the frame.
    assert!(
        (100..1024).contains(&threshold),
        "room for the largest data packet, asked {threshold}"
    );
    // Still full: polls and refused sends do not repeat the request.
    device.poll(0);
    assert!(!device.can_transmit());
    assert!(send(&mut device, &frame_of(100, 2), TxMeta::default()).is_err());
    assert_eq!(host.room_signal(), (threshold, 1));
    assert_eq!(device.counters().room_signal_requests, 1);
    // The host made room (and signalled): the next poll sees it and withdraws the request.
    host.set_ring_full(false);
    device.poll(0);
    assert!(device.can_transmit());
    assert_eq!(host.room_signal(), (0, 2));
    send(&mut device, &frame_of(100, 3), TxMeta::default()).unwrap();
    device.poll(0);
    assert_eq!(host.take_tx_frames().len(), 1);
    assert_eq!(
        host.room_signal(),
        (0, 2),
        "sends with room ask for nothing"
    );
}

#[test]
fn checksum_offload_metadata_goes_out_and_comes_back() {
    let (host, mut device, _dma) = bring_up(FakeHostConfig::default(), NetvscConfig::default());
    let complete = tcp_ipv4_frame(&[9; 300]);
    let partial = make_partial(&complete);
    let meta = TxMeta {
        checksum: Some((34, 16)),
        tso_mss: None,
    };
    send(&mut device, &partial, meta).unwrap();
    device.poll(0);
    let sent = host.take_tx_frames();
    assert_eq!(sent[0].frame, partial, "the host computes the checksum");
    // IPv4 | TCP, transport header at 34.
    assert_eq!(sent[0].checksum, Some(1 | 4 | 34 << 16));
    // Receive: the host's verdict reaches RxMeta.
    host.inject_frames(&[
        (complete.clone(), Some(1 << 3 | 1 << 5)),
        (complete.clone(), Some(1 << 0)),
        (complete.clone(), None),
    ]);
    let received = receive_all(&mut device);
    assert!(received[0].1.checksum_verified);
    assert!(
        !received[1].1.checksum_verified,
        "a failed checksum is not verified"
    );
    assert!(!received[2].1.checksum_verified);
}

#[test]
fn udp_checksums_the_host_cannot_do_are_completed_in_software() {
    let host_config = FakeHostConfig {
        versions: vec![NvspVersion::V4],
        ..FakeHostConfig::default()
    };
    let (host, mut device, _dma) = bring_up(host_config, NetvscConfig::default());
    // A UDP/IPv4 frame whose checksum field holds the pseudo-header sum.
    let mut frame = tcp_ipv4_frame(&[5; 100]);
    frame[23] = 17;
    let udp_len = (frame.len() - 34) as u16;
    frame[38..40].copy_from_slice(&udp_len.to_be_bytes());
    let mut pseudo = frame[26..34].to_vec();
    pseudo.extend_from_slice(&[0, 17]);
    pseudo.extend_from_slice(&udp_len.to_be_bytes());
    frame[40..42].copy_from_slice(&reference_checksum(&pseudo).to_be_bytes());
    let meta = TxMeta {
        checksum: Some((34, 6)),
        tso_mss: None,
    };
    send(&mut device, &frame, meta).unwrap();
    device.poll(0);
    let sent = host.take_tx_frames();
    assert_eq!(sent[0].checksum, None);
    let mut check = pseudo.clone();
    check.extend_from_slice(&sent[0].frame[34..]);
    assert_eq!(reference_checksum(&check), 0xffff, "valid UDP checksum");
    assert_eq!(device.counters().software_checksums, 1);
}

#[test]
fn large_tcp_frames_leave_with_lso_metadata_and_a_length_free_pseudo_header() {
    let (host, mut device, _dma) = bring_up(FakeHostConfig::default(), NetvscConfig::default());
    let max = device.capabilities().max_tso_size + 14;
    let complete = tcp_ipv4_frame(&vec![0x5a; max - 54]);
    assert_eq!(complete.len(), max);
    let partial = make_partial(&complete);
    let meta = TxMeta {
        checksum: Some((34, 16)),
        tso_mss: Some(1448),
    };
    send(&mut device, &partial, meta).unwrap();
    device.poll(0);
    let sent = host.take_tx_frames();
    assert_eq!(sent.len(), 1);
    let lso = sent[0].lso.expect("LSO PPI");
    assert_eq!(lso & 0xfffff, 1448);
    assert_eq!((lso >> 20) & 0x3ff, 34);
    assert_eq!(lso >> 30, 1, "LSO v2, IPv4");
    // Headers as Windows LSO v2 wants them (and Linux's netvsc sends them): IPv4 total length
    // and header checksum zero, the TCP checksum field the pseudo-header sum over addresses
    // and protocol only; everything else unchanged.
    let sent_frame = &sent[0].frame;
    assert_eq!(sent_frame[16..18], [0, 0]);
    assert_eq!(sent_frame[24..26], [0, 0]);
    assert_eq!(sent_frame[..16], partial[..16]);
    assert_eq!(sent_frame[18..24], partial[18..24]);
    assert_eq!(sent_frame[26..50], partial[26..50]);
    assert_eq!(sent_frame[52..], partial[52..]);
    let mut pseudo = complete[26..34].to_vec();
    pseudo.extend_from_slice(&[0, 6, 0, 0]);
    assert_eq!(
        sent[0].frame[50..52],
        reference_checksum(&pseudo).to_be_bytes()
    );
    assert_eq!(device.counters().lso_frames, 1);
    // One byte more is refused.
    let too_long = tcp_ipv4_frame(&vec![0; max - 53]);
    assert!(matches!(
        send(&mut device, &too_long, meta),
        Err(DeviceError::FrameTooLarge { .. })
    ));
}

#[test]
fn without_offloads_nothing_is_claimed() {
    let host_config = FakeHostConfig {
        offload: None,
        ..FakeHostConfig::default()
    };
    let (host, device, _dma) = bring_up(host_config, NetvscConfig::default());
    let capabilities = device.capabilities();
    assert!(!capabilities.tx_checksum && !capabilities.rx_checksum);
    assert_eq!(capabilities.max_tso_size, 0);
    assert_eq!(host.offload_parameters(), None);
}

#[test]
fn stop_closes_the_channel_and_tears_the_buffers_down() {
    let (host, mut device, dma) = bring_up(FakeHostConfig::default(), NetvscConfig::default());
    assert_eq!(host.gpadls().0, 2);
    device.stop();
    assert!(host.closed());
    assert_eq!(host.gpadls(), (0, 2));
    assert_eq!(device.link_state(), LinkState::Gone);
    drop(device);
    assert_eq!(dma.live_regions(), 0);
}

#[test]
fn dropping_without_stop_never_frees_memory_the_host_can_reach() {
    let (host, device, dma) = bring_up(FakeHostConfig::default(), NetvscConfig::default());
    drop(device);
    // Both GPADLs are still the host's: their memory stays allocated (and writable by it).
    assert_eq!(host.gpadls().0, 2);
    assert!(host.write_receive_buffer(0, &[1, 2, 3]));
    assert_eq!(dma.live_regions(), 2);
}

#[test]
fn stop_after_a_rescind_still_closes_and_tears_down() {
    let (host, mut device, dma) = bring_up(FakeHostConfig::default(), NetvscConfig::default());
    host.rescind();
    device.poll(0);
    assert_eq!(device.link_state(), LinkState::Gone);
    device.stop();
    assert!(host.closed());
    assert_eq!(host.gpadls().0, 0);
    drop(device);
    assert_eq!(dma.live_regions(), 0);
}

#[test]
fn frames_arriving_before_bring_up_finishes_do_not_block_it() {
    let host_config = FakeHostConfig {
        frame_before_filter_reply: true,
        ..FakeHostConfig::default()
    };
    let (host, mut device, _dma) = bring_up(host_config, NetvscConfig::default());
    assert_eq!(device.counters().rx_before_ready, 1);
    assert_eq!(host.outstanding_transfers(), 0, "completed all the same");
    host.inject_frames(&[(frame_of(60, 1), None)]);
    assert_eq!(receive_all(&mut device).len(), 1);
}

#[test]
fn a_burst_past_the_sections_goes_gpa_direct_byte_exact_and_completions_free_each_pool() {
    let (host, mut device, _dma) = bring_up(FakeHostConfig::default(), NetvscConfig::default());
    host.hold_tx_completions(true);
    // 64 sections and 64 GPA-direct slots: 128 frames in flight, the 129th has no buffer.
    let frames: Vec<Vec<u8>> = (0..128)
        .map(|i| frame_of(60 + (i * 11) % 1455, i as u8))
        .collect();
    for (i, frame) in frames.iter().enumerate() {
        assert!(device.can_transmit(), "room reported for frame {i}");
        send(&mut device, frame, TxMeta::default()).unwrap();
    }
    assert!(!device.can_transmit(), "no section and no slot left");
    let mut filled = false;
    assert_eq!(
        device.transmit(60, &mut |_| {
            filled = true;
            TxMeta::default()
        }),
        Err(DeviceError::RingFull)
    );
    assert!(!filled, "refused before the frame was asked for");
    let counters = device.counters();
    assert_eq!(counters.tx_via_section, 64);
    assert_eq!(counters.tx_via_gpa_direct, 64);
    assert_eq!(counters.tx_section_overflow, 64);
    assert_eq!(counters.tx_refused_no_buffer, 1);
    assert_eq!(counters.tx_refused_ring_full, 0);
    let sent = host.take_tx_frames();
    assert_eq!(sent.len(), 128);
    for (i, (sent, frame)) in sent.iter().zip(&frames).enumerate() {
        assert_eq!(&sent.frame, frame, "frame {i} byte-exact");
        assert_eq!(sent.via_send_buffer, i < 64, "frame {i} path");
    }
    // Every completion frees the buffer its frame used: both pools are whole again.
    host.hold_tx_completions(false);
    device.poll(0);
    assert_eq!(device.transmits_in_flight(), 0);
    assert_eq!(device.counters().bad_packets, 0);
    assert_eq!(device.stats().tx_frames, 128);
    let bytes: usize = frames.iter().map(Vec::len).sum();
    assert_eq!(device.stats().tx_bytes, bytes as u64);
    host.hold_tx_completions(true);
    for i in 0..128u8 {
        send(&mut device, &frame_of(200, i), TxMeta::default()).unwrap();
    }
    let again = host.take_tx_frames();
    assert_eq!(
        again.iter().filter(|frame| frame.via_send_buffer).count(),
        64
    );
    assert_eq!(device.counters().tx_section_overflow, 128);
}

#[test]
fn a_ring_without_room_for_a_data_packet_is_refused_before_fill_and_counted() {
    let (host, mut device, _dma) = bring_up(FakeHostConfig::default(), NetvscConfig::default());
    // Room for a small in-band packet, not for the largest GPA-direct send.
    host.set_ring_free(64);
    device.poll(0);
    assert!(!device.can_transmit(), "sections free, but no ring room");
    let mut filled = false;
    assert_eq!(
        device.transmit(100, &mut |_| {
            filled = true;
            TxMeta::default()
        }),
        Err(DeviceError::RingFull)
    );
    assert!(!filled);
    host.set_ring_full(true);
    assert_eq!(
        send(&mut device, &frame_of(100, 1), TxMeta::default()),
        Err(DeviceError::RingFull)
    );
    assert_eq!(device.counters().tx_refused_ring_full, 2);
    assert_eq!(device.stats().tx_ring_full, 2);
    assert_eq!(device.transmits_in_flight(), 0, "nothing left taken");
    host.set_ring_full(false);
    host.set_ring_free(64 * 1024);
    device.poll(0);
    assert!(device.can_transmit());
    send(&mut device, &frame_of(100, 2), TxMeta::default()).unwrap();
    assert_eq!(host.take_tx_frames()[0].frame, frame_of(100, 2));
    assert_eq!(device.counters().tx_via_section, 1);
}

#[test]
fn ring_len_matches_what_a_vmbus_ring_takes() {
    use super::{GpaRange, OutgoingPacket};
    let pages = [1u64, 2, 3];
    let cases = [
        (
            OutgoingPacket::InBand {
                transaction_id: 1,
                completion_requested: true,
                payload: &[0; 40],
            },
            16 + 40 + 8,
        ),
        (
            OutgoingPacket::Completion {
                transaction_id: 1,
                payload: &[0; 5],
            },
            16 + 8 + 8,
        ),
        (
            OutgoingPacket::GpaDirect {
                transaction_id: 1,
                ranges: &[GpaRange {
                    byte_count: 9000,
                    byte_offset: 12,
                    page_numbers: &pages,
                }],
                payload: &[0; 40],
            },
            16 + 8 + 8 + 3 * 8 + 40 + 8,
        ),
    ];
    for (packet, len) in cases {
        assert_eq!(packet.ring_len(), len, "{packet:?}");
    }
}
