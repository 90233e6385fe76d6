//! Host tests of the VF driver against the fake register model with a scripted PF.

use crate::device::{Config, IgbVf, MailboxVectorEncoding};
use crate::fake::{
    FakeIgb, FakeVfRegisters, RxWriteBackOverride, ScriptedPf, TestHost, UnplugStyle,
};
use crate::fake_dma::{FakeDmaAllocator, live_allocations};
use crate::mailbox::{self, MailboxStage, Request};
use crate::{Error, regs};
use alloc::boxed::Box;
use alloc::rc::Rc;
use alloc::vec::Vec;
use core::cell::Cell;
use net_device::{DeviceError, LinkState, MacAddress, NetDevice, TxMeta};

type Vf = IgbVf<FakeVfRegisters, FakeDmaAllocator>;

const PF_MAC: MacAddress = MacAddress([0x52, 0x54, 0x00, 0x12, 0x34, 0x56]);
const PEER_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0xaa, 0xbb, 0xcc];
/// Fake clock step per reading: 1 µs.
const STEP_NS: u64 = 1_000;

fn test_config() -> Config {
    Config {
        name: "igbvf test".into(),
        rx_ring_size: 16,
        tx_ring_size: 16,
        mailbox_timeout_ns: 5_000_000,
        // Most tests change the fake and expect the next poll to see it.
        register_check_period_ns: 0,
        ..Config::default()
    }
}

struct Bench {
    fake: FakeIgb,
    clock: Rc<Cell<u64>>,
    idle_turns: Rc<Cell<u64>>,
}

fn new_bench(mac: Option<MacAddress>) -> Bench {
    Bench {
        fake: FakeIgb::with_scripted_pf(mac),
        clock: Rc::new(Cell::new(0)),
        idle_turns: Rc::new(Cell::new(0)),
    }
}

impl Bench {
    fn start(&mut self, config: Config) -> Result<Vf, Error> {
        let host = TestHost::new(STEP_NS);
        self.clock = host.clock();
        self.idle_turns = host.idle_turns();
        IgbVf::new(
            self.fake.vf_registers(0),
            FakeDmaAllocator::new(),
            Box::new(host),
            config,
        )
    }

    fn now(&self) -> u64 {
        self.clock.get()
    }
}

fn started() -> (Bench, Vf) {
    let mut bench = new_bench(Some(PF_MAC));
    let vf = bench
        .start(test_config())
        .expect("VF initialises against a PF that answers");
    (bench, vf)
}

/// A frame to `destination` from the peer, `len` bytes, payload bytes derived from `seed`.
fn frame(destination: [u8; 6], len: usize, seed: u8) -> Vec<u8> {
    let mut frame = Vec::with_capacity(len);
    frame.extend_from_slice(&destination);
    frame.extend_from_slice(&PEER_MAC);
    frame.extend_from_slice(&[0x08, 0x00]);
    frame.extend((frame.len()..len).map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed)));
    frame.truncate(len);
    frame
}

fn send(vf: &mut Vf, data: &[u8]) -> Result<(), DeviceError> {
    vf.transmit(data.len(), &mut |buffer: &mut [u8]| {
        buffer.copy_from_slice(data);
        TxMeta::default()
    })
}

fn receive_all(vf: &mut Vf) -> Vec<Vec<u8>> {
    let mut frames = Vec::new();
    vf.receive(64, &mut |data, _meta| frames.push(data.to_vec()));
    frames
}

#[test]
fn initialisation_takes_the_mac_from_the_pf_and_brings_the_link_up() {
    let (bench, vf) = started();
    assert_eq!(vf.mac_address(), PF_MAC);
    assert_eq!(vf.link_state(), LinkState::Up);
    assert_eq!(bench.fake.queues_enabled(0), (true, true));
    let requests = bench.fake.mailbox_requests(0);
    let kinds: Vec<u32> = requests
        .iter()
        .map(|r| mailbox::message_type(r[0]))
        .collect();
    assert_eq!(
        kinds,
        [mailbox::VF_RESET, mailbox::SET_LPE, mailbox::SET_MULTICAST]
    );
    // MTU 1500 + Ethernet header + FCS + one VLAN tag, as Linux igbvf asks.
    assert_eq!(requests[1][1], 1522);
    // All RX buffers but one handed over with a single tail write.
    assert_eq!(
        bench.fake.rx_tail_writes(0),
        2,
        "one RDT=0 while programming, one after posting"
    );
    assert_eq!(vf.driver_counters().initializations, 1);
}

#[test]
fn initialisation_fails_cleanly_when_the_pf_never_answers() {
    let mut bench = new_bench(Some(PF_MAC));
    bench.fake.set_scripted_pf(ScriptedPf::NeverAnswers);
    let config = test_config();
    let timeout = config.mailbox_timeout_ns;
    let error = bench.start(config).err().expect("no PF, no VF");
    assert_eq!(
        error,
        Error::MailboxTimeout {
            request: Request::Reset,
            stage: MailboxStage::Acknowledgement
        }
    );
    // It gave up at the bound, not much later, and without spinning forever.
    assert!(
        bench.now() >= timeout && bench.now() < 2 * timeout + 10_000_000,
        "{} ns",
        bench.now()
    );
    assert!(bench.idle_turns.get() < 1_000_000);
    // The failed driver left the queues off.
    assert_eq!(bench.fake.queues_enabled(0), (false, false));
}

#[test]
fn initialisation_fails_cleanly_when_the_pf_acknowledges_but_never_replies() {
    let mut bench = new_bench(Some(PF_MAC));
    bench.fake.set_scripted_pf(ScriptedPf::AcksWithoutReply);
    let error = bench.start(test_config()).err().expect("no reply, no VF");
    assert_eq!(
        error,
        Error::MailboxTimeout {
            request: Request::Reset,
            stage: MailboxStage::Reply
        }
    );
}

#[test]
fn a_wait_loop_is_bounded_by_iterations_even_if_the_clock_stands_still() {
    let fake = FakeIgb::with_scripted_pf(Some(PF_MAC));
    fake.set_scripted_pf(ScriptedPf::NeverAnswers);
    let host = TestHost::new(0);
    let turns = host.idle_turns();
    let config = Config {
        max_wait_iterations: 500,
        ..test_config()
    };
    let result = IgbVf::new(
        fake.vf_registers(0),
        FakeDmaAllocator::new(),
        Box::new(host),
        config,
    );
    assert!(matches!(result, Err(Error::MailboxTimeout { .. })));
    // A few waits ran (reset, lock, acknowledgement, queue stop), each capped at 500 turns.
    assert!(turns.get() < 1_000, "{} turns", turns.get());
}

#[test]
fn a_pf_without_a_mac_for_the_vf_is_a_clear_error() {
    let mut bench = new_bench(None);
    assert_eq!(bench.start(test_config()).err(), Some(Error::NoMacAddress));

    let mut bench = new_bench(Some(PF_MAC));
    bench.fake.set_scripted_pf(ScriptedPf::NacksReset);
    assert_eq!(bench.start(test_config()).err(), Some(Error::NoMacAddress));
}

#[test]
fn a_requested_mac_is_used_when_the_pf_allows_it_and_ignored_when_it_does_not() {
    let wanted = MacAddress([0x02, 0, 0, 0, 0, 0x42]);
    let mut bench = new_bench(None);
    let vf = bench
        .start(Config {
            requested_mac: Some(wanted),
            ..test_config()
        })
        .expect("PF without MAC");
    assert_eq!(vf.mac_address(), wanted);

    // The PF's administrator set a MAC: the request is refused and the PF's MAC wins.
    let mut bench = new_bench(Some(PF_MAC));
    let vf = bench
        .start(Config {
            requested_mac: Some(wanted),
            ..test_config()
        })
        .expect("PF refuses");
    assert_eq!(vf.mac_address(), PF_MAC);

    bench.fake.allow_vf_mac_change();
    let vf = bench
        .start(Config {
            requested_mac: Some(wanted),
            ..test_config()
        })
        .expect("PF allows");
    assert_eq!(vf.mac_address(), wanted);
}

#[test]
fn a_pf_stuck_in_reset_times_out_instead_of_hanging() {
    let mut bench = new_bench(Some(PF_MAC));
    bench.fake.hold_pf_in_reset(true);
    let config = test_config();
    let bound = config.reset_timeout_ns;
    match bench.start(config) {
        Err(Error::ResetTimeout { waited_ns, mailbox }) => {
            assert!(waited_ns >= bound);
            assert_ne!(mailbox & regs::Mailbox::RSTI.bits(), 0);
        }
        other => panic!("expected a reset timeout, got {:?}", other.err()),
    }
}

/// Found by the fuzz harness (target igbvf): the back-off of a failed automatic
/// re-initialisation started before the attempt's own 50 ms reset wait, so with the PF stuck in
/// reset the next poll busy-waited again at once.
#[test]
fn a_failed_reinitialisation_backs_off_from_the_end_of_the_attempt() {
    let (bench, mut vf) = started();
    bench.fake.hold_pf_in_reset(true);
    bench.fake.signal_pf_reset_done();
    let mut attempts = Vec::new();
    for _ in 0..40 {
        bench.clock.set(bench.now() + 1_000_000);
        let reads = bench.fake.vf_register_reads();
        vf.poll(bench.now());
        if bench.fake.vf_register_reads() - reads > 1_000 {
            attempts.push(bench.now());
        }
    }
    assert_eq!(vf.link_state(), LinkState::Resetting);
    assert!(attempts.len() >= 2, "it does retry: {attempts:?}");
    for pair in attempts.windows(2) {
        // Each attempt ends 50 ms (the reset timeout) after it starts; the next may start only
        // a back-off (20 ms and up) after that.
        assert!(
            pair[1] - pair[0] >= 70_000_000,
            "attempts {} ms apart",
            (pair[1] - pair[0]) / 1_000_000
        );
    }
}

#[test]
fn bad_configuration_and_missing_memory_fail_before_touching_the_device() {
    let mut bench = new_bench(Some(PF_MAC));
    let bad = Config {
        rx_ring_size: 12,
        ..test_config()
    };
    assert!(matches!(bench.start(bad), Err(Error::InvalidConfig { .. })));
    let jumbo = Config {
        mtu: 9000,
        ..test_config()
    };
    assert!(matches!(
        bench.start(jumbo),
        Err(Error::InvalidConfig { .. })
    ));
    let allocator = FakeDmaAllocator::new();
    allocator.fail_after.set(Some(3));
    let result = IgbVf::new(
        bench.fake.vf_registers(0),
        allocator,
        Box::new(TestHost::new(STEP_NS)),
        test_config(),
    );
    assert!(matches!(result, Err(Error::DmaAllocation { .. })));
    assert!(
        bench.fake.mailbox_requests(0).is_empty(),
        "the PF never heard of it"
    );
}

#[test]
fn a_transmit_batch_reaches_the_wire_exactly_with_one_tail_write_per_flush() {
    let (bench, mut vf) = started();
    let tail_writes = bench.fake.tx_tail_writes(0);
    let frames: Vec<Vec<u8>> = [60usize, 1514, 42, 1518, 100]
        .iter()
        .enumerate()
        .map(|(i, len)| frame(PEER_MAC, *len, i as u8))
        .collect();
    for data in &frames {
        send(&mut vf, data).expect("room in the ring");
    }
    assert!(
        bench.fake.take_transmitted(0).is_empty(),
        "nothing leaves before the doorbell"
    );
    vf.flush();
    assert_eq!(bench.fake.tx_tail_writes(0), tail_writes + 1);
    let wire = bench.fake.take_transmitted(0);
    assert_eq!(wire.len(), frames.len());
    for (sent, data) in wire.iter().zip(&frames) {
        if data.len() >= 60 {
            assert_eq!(sent, data);
        } else {
            // Short frames are zero-padded to the Ethernet minimum.
            assert_eq!(sent.len(), 60);
            assert_eq!(&sent[..data.len()], &data[..]);
            assert!(sent[data.len()..].iter().all(|byte| *byte == 0));
        }
    }
    vf.flush();
    assert_eq!(
        bench.fake.tx_tail_writes(0),
        tail_writes + 1,
        "no doorbell without new frames"
    );
    vf.poll(bench.now());
    let stats = vf.stats();
    assert_eq!(stats.tx_frames, 5);
    assert_eq!(stats.tx_bytes, 60 + 1514 + 60 + 1518 + 100);
}

#[test]
fn transmit_refuses_oversized_frames_and_reports_a_full_ring() {
    let (bench, mut vf) = started();
    assert_eq!(
        send(&mut vf, &frame(PEER_MAC, 1519, 0)),
        Err(DeviceError::FrameTooLarge {
            len: 1519,
            max: 1518
        })
    );
    bench.fake.stall_tx(0, true);
    // A 16-entry ring keeps one slot empty.
    for i in 0..15 {
        send(&mut vf, &frame(PEER_MAC, 64, i)).expect("room");
    }
    assert!(!vf.can_transmit());
    assert_eq!(
        send(&mut vf, &frame(PEER_MAC, 64, 99)),
        Err(DeviceError::RingFull)
    );
    assert_eq!(vf.stats().tx_ring_full, 1);
    vf.flush();
    bench.fake.stall_tx(0, false);
    assert_eq!(bench.fake.take_transmitted(0).len(), 15);
    send(&mut vf, &frame(PEER_MAC, 64, 100)).expect("completions free the ring");
}

#[test]
fn received_frames_arrive_exactly_and_in_order_across_ring_wraps() {
    let (bench, mut vf) = started();
    let mut expected = Vec::new();
    let mut got = Vec::new();
    for round in 0..5u8 {
        for i in 0..10u8 {
            let data = frame(
                PF_MAC.0,
                60 + usize::from(round) * 300 + usize::from(i),
                round * 10 + i,
            );
            assert!(
                bench.fake.inject_rx_frame(0, &data),
                "a free descriptor is posted"
            );
            expected.push(data);
        }
        let rdt_writes = bench.fake.rx_tail_writes(0);
        got.extend(receive_all(&mut vf));
        vf.flush();
        assert_eq!(
            bench.fake.rx_tail_writes(0),
            rdt_writes + 1,
            "one tail write per batch"
        );
    }
    assert_eq!(got, expected);
    let stats = vf.stats();
    assert_eq!(stats.rx_frames, 50);
    assert_eq!(
        stats.rx_bytes,
        expected.iter().map(|f| f.len() as u64).sum::<u64>()
    );
    assert_eq!(stats.rx_dropped_bad, 0);
}

#[test]
fn buffers_go_back_to_the_device_half_a_ring_at_a_time() {
    // The test ring has 16 slots: 15 buffers posted, handed back in batches of 7.
    let (bench, mut vf) = started();
    let writes = bench.fake.rx_tail_writes(0);
    for i in 0..6 {
        assert!(bench.fake.inject_rx_frame(0, &frame(PF_MAC.0, 64, i)));
    }
    assert_eq!(receive_all(&mut vf).len(), 6);
    assert_eq!(
        bench.fake.rx_tail_writes(0),
        writes,
        "6 free buffers wait for a batch"
    );
    assert!(bench.fake.inject_rx_frame(0, &frame(PF_MAC.0, 64, 6)));
    assert_eq!(receive_all(&mut vf).len(), 1);
    vf.flush();
    assert_eq!(
        bench.fake.rx_tail_writes(0),
        writes + 1,
        "the 7th is a batch: one tail write"
    );
    // All 15 buffers are the device's again: 15 frames fit, the 16th finds none.
    for i in 0..15 {
        assert!(bench.fake.inject_rx_frame(0, &frame(PF_MAC.0, 64, i)));
    }
    assert!(!bench.fake.inject_rx_frame(0, &frame(PF_MAC.0, 64, 15)));
    assert_eq!(receive_all(&mut vf).len(), 15);
}

#[test]
fn refilled_buffers_are_announced_by_the_next_flush_sleep_or_receive_whichever_comes_first() {
    // The test ring refills in batches of 7.
    let (bench, mut vf) = started();
    let before = bench.fake.rx_tail_writes(0);
    let refill_a_batch = |vf: &mut Vf| {
        for i in 0..7 {
            assert!(bench.fake.inject_rx_frame(0, &frame(PF_MAC.0, 64, i)));
        }
        assert_eq!(receive_all(vf).len(), 7);
    };

    refill_a_batch(&mut vf);
    assert_eq!(bench.fake.rx_tail_writes(0), before, "held by receive");
    // With so few buffers the device has, the held ones are not yet its.
    for i in 0..8 {
        assert!(bench.fake.inject_rx_frame(0, &frame(PF_MAC.0, 64, i)));
    }
    assert!(!bench.fake.inject_rx_frame(0, &frame(PF_MAC.0, 64, 8)));
    assert_eq!(receive_all(&mut vf).len(), 8);
    assert_eq!(
        bench.fake.rx_tail_writes(0),
        before + 1,
        "the next receive call announced the first batch"
    );

    // The transmit doorbell carries the second batch (refilled by that call).
    let tx_writes = bench.fake.tx_tail_writes(0);
    send(&mut vf, &frame(PEER_MAC, 64, 1)).expect("room");
    vf.flush();
    assert_eq!(
        bench.fake.rx_tail_writes(0),
        before + 2,
        "with the doorbell"
    );
    assert_eq!(bench.fake.tx_tail_writes(0), tx_writes + 1);
    vf.flush();
    assert_eq!(bench.fake.rx_tail_writes(0), before + 2, "nothing new");

    // The loop going to sleep.
    refill_a_batch(&mut vf);
    assert_eq!(bench.fake.rx_tail_writes(0), before + 2);
    vf.arm_interrupts();
    assert_eq!(bench.fake.rx_tail_writes(0), before + 3, "before sleeping");
    // Every buffer is the device's again.
    for i in 0..15 {
        assert!(bench.fake.inject_rx_frame(0, &frame(PF_MAC.0, 64, i)));
    }
    assert_eq!(receive_all(&mut vf).len(), 15);
}

#[test]
fn receive_respects_the_budget() {
    let (bench, mut vf) = started();
    for i in 0..6 {
        assert!(bench.fake.inject_rx_frame(0, &frame(PF_MAC.0, 64, i)));
    }
    assert_eq!(vf.receive(4, &mut |_, _| {}), 4);
    assert_eq!(vf.receive(4, &mut |_, _| {}), 2);
}

#[test]
fn hostile_write_backs_are_dropped_and_counted_and_the_driver_keeps_working() {
    let (bench, mut vf) = started();
    let good = frame(PF_MAC.0, 128, 1);
    let inject =
        |tweak: RxWriteBackOverride| assert!(bench.fake.inject_rx_frame_with(0, &good, tweak));

    inject(RxWriteBackOverride {
        length: Some(9000),
        ..Default::default()
    });
    inject(RxWriteBackOverride {
        length: Some(0),
        ..Default::default()
    });
    inject(RxWriteBackOverride {
        extra_status: 0x8000_0000,
        ..Default::default()
    });
    // A frame that "continues" in the next descriptor: that descriptor (the following frame's)
    // belongs to the broken frame and is dropped with it.
    inject(RxWriteBackOverride {
        omit_end_of_packet: true,
        ..Default::default()
    });
    assert!(bench.fake.inject_rx_frame(0, &frame(PF_MAC.0, 64, 2)));
    assert!(bench.fake.inject_rx_frame(0, &good));
    assert_eq!(receive_all(&mut vf), core::slice::from_ref(&good));

    // The device writes a descriptor it does not own: noticed when the slot is posted again.
    bench.fake.write_back_unposted_rx(0);
    assert!(receive_all(&mut vf).is_empty());
    for i in 0..20 {
        assert!(bench.fake.inject_rx_frame(0, &frame(PF_MAC.0, 64, i)));
        assert_eq!(receive_all(&mut vf).len(), 1);
    }

    let counters = vf.driver_counters();
    assert_eq!(counters.rx_bad_length, 2);
    assert_eq!(counters.rx_frame_errors, 1);
    assert_eq!(counters.rx_multi_descriptor, 1);
    assert_eq!(counters.rx_unposted_written, 1);
    assert_eq!(vf.stats().rx_dropped_bad, 5);
    assert_eq!(vf.stats().rx_frames, 21);
    assert_eq!(vf.link_state(), LinkState::Up);
    assert_eq!(bench.fake.dma_faults(), 0);
}

#[test]
fn checksum_error_bits_are_not_frame_errors() {
    let (bench, mut vf) = started();
    let data = frame(PF_MAC.0, 90, 3);
    // L4 checksum error: the stack verifies checksums itself, so the frame is delivered.
    let tweak = RxWriteBackOverride {
        extra_status: 0x2000_0000,
        ..Default::default()
    };
    assert!(bench.fake.inject_rx_frame_with(0, &data, tweak));
    assert_eq!(receive_all(&mut vf), [data]);
}

#[test]
fn an_unplugged_device_is_gone_at_the_next_poll_without_spinning() {
    for style in [UnplugStyle::Zeros, UnplugStyle::AllOnes] {
        let (bench, mut vf) = started();
        send(&mut vf, &frame(PEER_MAC, 64, 0)).expect("room");
        bench.fake.unplug(style);
        let reads = bench.fake.vf_register_reads();
        vf.poll(bench.now());
        assert_eq!(vf.link_state(), LinkState::Gone, "{style:?}");
        assert!(
            bench.fake.vf_register_reads() - reads <= 2,
            "{style:?}: one STATUS read decides"
        );
        let reads = bench.fake.vf_register_reads();
        vf.flush();
        vf.poll(bench.now() + 1_000_000_000);
        vf.handle_interrupt();
        assert_eq!(
            send(&mut vf, &frame(PEER_MAC, 64, 1)),
            Err(DeviceError::Gone)
        );
        assert_eq!(
            vf.receive(8, &mut |_, _| panic!("nothing from a dead device")),
            0
        );
        assert_eq!(vf.hardware_stats(), vf.hardware_stats());
        vf.stop();
        assert_eq!(
            bench.fake.vf_register_reads(),
            reads,
            "{style:?}: no access once gone"
        );
        assert!(matches!(vf.reinitialize(), Err(Error::DeviceGone { .. })));
        assert_eq!(vf.driver_counters().removals_detected, 1);
    }
}

#[test]
fn removal_during_initialisation_ends_the_wait_at_once() {
    let fake = FakeIgb::with_scripted_pf(Some(PF_MAC));
    fake.set_scripted_pf(ScriptedPf::NeverAnswers);
    let unplug = fake.clone();
    let host = TestHost::new(STEP_NS).with_idle(move || unplug.unplug(UnplugStyle::Zeros));
    let turns = host.idle_turns();
    let result = IgbVf::new(
        fake.vf_registers(0),
        FakeDmaAllocator::new(),
        Box::new(host),
        test_config(),
    );
    assert!(matches!(result, Err(Error::DeviceGone { .. })));
    assert!(turns.get() <= 2);
}

#[test]
fn mark_gone_stops_all_register_access() {
    let (bench, mut vf) = started();
    vf.mark_gone();
    let reads = bench.fake.vf_register_reads();
    vf.poll(bench.now());
    vf.flush();
    assert_eq!(vf.link_state(), LinkState::Gone);
    assert_eq!(bench.fake.vf_register_reads(), reads);
}

#[test]
fn a_pf_that_forgets_the_vf_leads_to_resetting_and_reinitialisation_brings_it_back() {
    let (bench, mut vf) = started();
    // PF state reset for this VF: a control message without CTS, then a NACK once the VF has
    // read it (what a Linux PF does, see lab_pf tests for the full conversation).
    bench.fake.pf_forget_vf(0);
    bench.fake.pf_send(0, &[mailbox::PF_CONTROL_MSG]);
    vf.poll(bench.now());
    assert_eq!(vf.link_state(), LinkState::Down);
    bench.fake.pf_send(0, &[mailbox::MSGTYPE_NACK]);
    vf.poll(bench.now());
    assert_eq!(vf.link_state(), LinkState::Resetting);
    assert_eq!(
        send(&mut vf, &frame(PEER_MAC, 64, 0)),
        Err(DeviceError::NotReady)
    );

    vf.reinitialize().expect("the PF answers again");
    assert_eq!(vf.link_state(), LinkState::Up);
    send(&mut vf, &frame(PEER_MAC, 64, 1)).expect("traffic again");
    vf.flush();
    assert_eq!(bench.fake.take_transmitted(0).len(), 1);
    let counters = vf.driver_counters();
    assert_eq!(counters.pf_control_messages, 1);
    assert_eq!(counters.pf_not_clear_to_send, 1);
    assert_eq!(counters.initializations, 2);
    // Up at start, down on the control message, up again after re-initialisation.
    assert_eq!(counters.link_changes, 3);
}

#[test]
fn a_control_message_with_cts_keeps_the_link_up() {
    let (bench, mut vf) = started();
    bench
        .fake
        .pf_send(0, &[mailbox::PF_CONTROL_MSG | mailbox::MSGTYPE_CTS]);
    vf.poll(bench.now());
    assert_eq!(vf.link_state(), LinkState::Up);
    assert_eq!(vf.driver_counters().pf_control_messages, 1);
}

#[test]
fn a_pf_reset_indication_leads_to_resetting() {
    let (bench, mut vf) = started();
    bench.fake.signal_pf_reset_done();
    vf.poll(bench.now());
    assert_eq!(vf.link_state(), LinkState::Resetting);
    assert_eq!(vf.driver_counters().pf_resets, 1);
    assert_eq!(vf.driver_counters().mailbox.resets_seen, 1);
    vf.reinitialize().expect("PF answers after its reset");
    assert_eq!(vf.link_state(), LinkState::Up);
}

#[test]
fn link_follows_the_phy() {
    let (bench, mut vf) = started();
    bench.fake.set_cable(false);
    vf.poll(bench.now());
    assert_eq!(vf.link_state(), LinkState::Down);
    assert_eq!(
        send(&mut vf, &frame(PEER_MAC, 64, 0)),
        Err(DeviceError::NotReady)
    );
    bench.fake.set_cable(true);
    for _ in 0..5 {
        vf.poll(bench.now());
    }
    assert_eq!(vf.link_state(), LinkState::Up);
    assert_eq!(
        vf.driver_counters().link_changes,
        3,
        "up at start, down, up"
    );
}

#[test]
fn a_transmitter_that_stops_completing_is_a_hang() {
    let (bench, mut vf) = started();
    bench.fake.stall_tx(0, true);
    send(&mut vf, &frame(PEER_MAC, 64, 0)).expect("room");
    vf.flush();
    let start = bench.now();
    vf.poll(start);
    vf.poll(start + 50_000_000);
    assert_eq!(vf.link_state(), LinkState::Up, "not yet");
    vf.poll(start + 150_000_000);
    assert_eq!(vf.link_state(), LinkState::Resetting);
    assert_eq!(vf.driver_counters().tx_hangs, 1);

    vf.reinitialize().expect("reset clears the hang");
    bench.fake.stall_tx(0, false);
    assert!(
        bench.fake.take_transmitted(0).is_empty(),
        "the stuck frame was dropped by the reset"
    );
    send(&mut vf, &frame(PEER_MAC, 64, 1)).expect("room");
    vf.flush();
    assert_eq!(bench.fake.take_transmitted(0).len(), 1);
}

#[test]
fn hardware_counters_match_the_frames_and_survive_wraps_and_resets() {
    let mut bench = new_bench(Some(PF_MAC));
    // Counters near 2^32 before the driver starts: they wrap while it runs.
    bench.fake.set_counter(0, regs::VFGPRC, u32::MAX - 1);
    bench.fake.set_counter(0, regs::VFGORC, u32::MAX - 100);
    let mut vf = bench.start(test_config()).expect("init");
    let multicast = frame([0x01, 0x00, 0x5e, 0x00, 0x00, 0x01], 80, 0);
    let received = [frame(PF_MAC.0, 100, 1), frame(PF_MAC.0, 200, 2), multicast];
    for data in &received {
        assert!(bench.fake.inject_rx_frame(0, data));
    }
    let sent = [frame(PEER_MAC, 300, 3), frame(PEER_MAC, 400, 4)];
    for data in &sent {
        send(&mut vf, data).expect("room");
    }
    vf.flush();
    let stats = vf.hardware_stats();
    assert_eq!(stats.rx_packets, 3);
    assert_eq!(stats.rx_bytes, (100 + 4) + (200 + 4) + (80 + 4));
    assert_eq!(stats.rx_multicast, 1);
    assert_eq!(stats.tx_packets, 2);
    assert_eq!(stats.tx_bytes, (300 + 4) + (400 + 4));

    vf.reinitialize().expect("reinit");
    receive_all(&mut vf);
    assert!(bench.fake.inject_rx_frame(0, &frame(PF_MAC.0, 60, 5)));
    assert_eq!(vf.hardware_stats().rx_packets, 4);
}

#[test]
fn stop_leaves_the_queues_disabled_and_reinitialisation_restarts() {
    let (bench, mut vf) = started();
    vf.stop();
    assert_eq!(bench.fake.queues_enabled(0), (false, false));
    assert_eq!(vf.link_state(), LinkState::Down);
    assert_eq!(
        send(&mut vf, &frame(PEER_MAC, 64, 0)),
        Err(DeviceError::NotReady)
    );
    assert!(
        !bench.fake.inject_rx_frame(0, &frame(PF_MAC.0, 64, 0)),
        "no DMA after stop"
    );
    let reads = bench.fake.vf_register_reads();
    vf.poll(bench.now());
    assert_eq!(bench.fake.vf_register_reads(), reads);

    vf.reinitialize().expect("restart");
    assert_eq!(vf.link_state(), LinkState::Up);
    assert!(bench.fake.inject_rx_frame(0, &frame(PF_MAC.0, 64, 1)));
    assert_eq!(receive_all(&mut vf).len(), 1);
}

#[test]
fn dropping_the_driver_stops_dma_and_frees_its_memory() {
    let before = live_allocations();
    let fake = {
        let (bench, vf) = started();
        assert!(live_allocations() > before);
        drop(vf);
        bench.fake
    };
    assert_eq!(fake.queues_enabled(0), (false, false));
    assert_eq!(live_allocations(), before);
    assert!(!fake.inject_rx_frame(0, &frame(PF_MAC.0, 64, 0)));
    assert_eq!(fake.dma_faults(), 0);
}

#[test]
fn msix_routes_queues_and_the_mailbox_and_the_handler_clears_causes() {
    let (bench, mut vf) = started();
    assert!(matches!(
        vf.configure_msix(3, 0),
        Err(Error::InvalidVector { index: 3, .. })
    ));
    assert!(
        matches!(
            vf.configure_msix(0, 2),
            Err(Error::InvalidVector { index: 2, .. })
        ),
        "QEMU quirk"
    );
    vf.configure_msix(0, 0).expect("valid vectors");
    assert!(bench.fake.inject_rx_frame(0, &frame(PF_MAC.0, 64, 0)));
    assert_eq!(bench.fake.vf_interrupts(0)[0], 1);
    vf.handle_interrupt();
    assert_eq!(receive_all(&mut vf).len(), 1);
    // Receiving masked the queue vector, which the mailbox shares here; the event loop
    // unmasks it before it sleeps.
    assert!(!vf.arm_interrupts(), "nothing more arrived");
    bench
        .fake
        .pf_send(0, &[mailbox::PF_CONTROL_MSG | mailbox::MSGTYPE_CTS]);
    assert_eq!(
        bench.fake.vf_interrupts(0)[0],
        2,
        "mailbox on vector 0 via VTIVAR_MISC 0x81"
    );
    vf.handle_interrupt();
    assert_eq!(vf.driver_counters().pf_control_messages, 1);
    assert_eq!(vf.stats().interrupts, 2);

    // The datasheet encoding puts the mailbox on vector 1 as 0x81 — QEMU then uses vector 0.
    let mut bench2 = new_bench(Some(PF_MAC));
    let mut vf2 = bench2
        .start(Config {
            mailbox_vector_encoding: MailboxVectorEncoding::Datasheet,
            ..test_config()
        })
        .expect("init");
    vf2.configure_msix(1, 2).expect("datasheet allows vector 2");
    assert!(bench2.fake.inject_rx_frame(0, &frame(PF_MAC.0, 64, 0)));
    assert_eq!(bench2.fake.vf_interrupts(0), [0, 1, 0]);
}

#[test]
fn msix_settings_survive_reinitialisation() {
    let (bench, mut vf) = started();
    vf.configure_msix(1, 1).expect("valid");
    vf.reinitialize().expect("reinit");
    let before = bench.fake.vf_interrupts(0);
    assert!(
        before[1] > 0,
        "mailbox replies during re-initialisation interrupt on vector 1"
    );
    assert!(bench.fake.inject_rx_frame(0, &frame(PF_MAC.0, 64, 0)));
    assert_eq!(bench.fake.vf_interrupts(0), [0, before[1] + 1, 0]);
}

#[test]
fn the_multicast_list_reaches_the_pf_as_hashes() {
    let solicited = MacAddress([0x33, 0x33, 0xff, 0x00, 0x12, 0x34]);
    let mut bench = new_bench(Some(PF_MAC));
    let mut vf = bench
        .start(Config {
            multicast: alloc::vec![solicited],
            ..test_config()
        })
        .expect("init");
    let requests = bench.fake.mailbox_requests(0);
    let initial = requests
        .iter()
        .find(|r| mailbox::message_type(r[0]) == mailbox::SET_MULTICAST)
        .expect("sent");
    assert_eq!(initial[0] >> mailbox::MSGINFO_SHIFT & 0xFF, 1);
    assert_eq!(
        initial[1] & 0xFFFF,
        u32::from(mailbox::multicast_hash(solicited))
    );

    let more = [solicited, MacAddress([0x01, 0x00, 0x5e, 0x00, 0x00, 0xfb])];
    vf.set_multicast_list(&more).expect("PF accepts");
    let last = *bench.fake.mailbox_requests(0).last().expect("sent");
    assert_eq!(
        last[0],
        mailbox::SET_MULTICAST | (2 << mailbox::MSGINFO_SHIFT)
    );
    assert_eq!(last[1] >> 16, u32::from(mailbox::multicast_hash(more[1])));
}

#[test]
fn a_configuration_request_the_pf_no_longer_accepts_means_resetting() {
    let (bench, mut vf) = started();
    bench.fake.pf_forget_vf(0);
    let error = vf.set_multicast_list(&[]).expect_err("NACK without CTS");
    assert!(matches!(
        error,
        Error::PfRefused {
            request: Request::SetMulticast,
            ..
        }
    ));
    vf.poll(bench.now());
    assert_eq!(vf.link_state(), LinkState::Resetting);
}

#[test]
fn every_driver_counter_is_reachable() {
    // Firecracker-style check: each counter moves in at least one scenario above; this test
    // gathers them in one run so a counter that is never incremented is caught.
    let (bench, mut vf) = started();
    bench
        .fake
        .pf_send(0, &[mailbox::PF_CONTROL_MSG | mailbox::MSGTYPE_CTS]);
    vf.poll(bench.now());
    let good = frame(PF_MAC.0, 64, 0);
    for tweak in [
        RxWriteBackOverride {
            length: Some(4000),
            ..Default::default()
        },
        RxWriteBackOverride {
            extra_status: 0x0100_0000,
            ..Default::default()
        },
        RxWriteBackOverride {
            omit_end_of_packet: true,
            ..Default::default()
        },
    ] {
        assert!(bench.fake.inject_rx_frame_with(0, &good, tweak));
    }
    assert!(bench.fake.inject_rx_frame(0, &good));
    receive_all(&mut vf);
    bench.fake.write_back_unposted_rx(0);
    // Seven consumed buffers make a refill batch, which finds the hostile write-back.
    for _ in 0..3 {
        assert!(bench.fake.inject_rx_frame(0, &good));
    }
    receive_all(&mut vf);
    bench.fake.stall_tx(0, true);
    send(&mut vf, &good).expect("room");
    vf.flush();
    vf.poll(bench.now());
    vf.poll(bench.now() + 1_000_000_000);
    vf.reinitialize().expect("reinit");
    bench.fake.signal_pf_reset_done();
    vf.poll(bench.now());
    vf.reinitialize().expect("reinit");
    bench.fake.pf_forget_vf(0);
    bench.fake.pf_send(0, &[mailbox::MSGTYPE_NACK]);
    vf.poll(bench.now());
    vf.reinitialize().expect("reinit");
    bench.fake.set_scripted_pf(ScriptedPf::AcksWithoutReply);
    assert!(matches!(
        vf.set_multicast_list(&[]),
        Err(Error::MailboxTimeout { .. })
    ));
    bench.fake.unplug(UnplugStyle::Zeros);
    vf.poll(bench.now());
    let c = vf.driver_counters();
    let all = [
        c.mailbox.messages_sent,
        c.mailbox.messages_received,
        c.mailbox.acks_received,
        c.mailbox.resets_seen,
        c.mailbox.timeouts,
        c.initializations,
        c.pf_resets,
        c.pf_not_clear_to_send,
        c.pf_control_messages,
        c.link_changes,
        c.tx_hangs,
        c.rx_bad_length,
        c.rx_frame_errors,
        c.rx_multi_descriptor,
        c.rx_unposted_written,
        c.removals_detected,
    ];
    assert!(all.iter().all(|count| *count > 0), "{c:?}");
}

#[test]
fn a_polled_driver_takes_one_interrupt_per_busy_period() {
    let (bench, mut vf) = started();
    vf.configure_msix(1, 0).expect("valid vectors");
    let queue_interrupts = |bench: &Bench| bench.fake.vf_interrupts(0)[1];
    assert!(bench.fake.inject_rx_frame(0, &frame(PF_MAC.0, 64, 0)));
    assert_eq!(queue_interrupts(&bench), 1, "an idle driver is interrupted");
    assert_eq!(receive_all(&mut vf).len(), 1);

    // Busy: the driver is being polled, frames arrive without interrupting it.
    for seed in 1..=10 {
        assert!(bench.fake.inject_rx_frame(0, &frame(PF_MAC.0, 64, seed)));
    }
    assert_eq!(queue_interrupts(&bench), 1, "masked while polled");
    // About to sleep with frames waiting: no sleep, and unmasking raises nothing stale.
    assert!(vf.arm_interrupts(), "work arrived since the last poll");
    assert_eq!(queue_interrupts(&bench), 1);
    assert_eq!(receive_all(&mut vf).len(), 10, "nothing lost while masked");

    // Idle again: armed, the next frame interrupts.
    assert!(!vf.arm_interrupts());
    assert!(bench.fake.inject_rx_frame(0, &frame(PF_MAC.0, 64, 11)));
    assert_eq!(queue_interrupts(&bench), 2);
    assert_eq!(receive_all(&mut vf).len(), 1);

    // Transmitting masks it too; a completion that lands before the sleep is reported.
    assert!(!vf.arm_interrupts());
    send(&mut vf, &frame(PEER_MAC, 64, 12)).expect("room");
    vf.flush();
    assert!(
        vf.arm_interrupts(),
        "the transmit completed: reclaim before sleeping"
    );
    assert_eq!(vf.driver_counters().interrupt_rearms, 4);
    // Armed and nothing pending: a second call has nothing to do.
    assert!(!vf.arm_interrupts());
    assert_eq!(vf.driver_counters().interrupt_rearms, 4);
}

#[test]
fn a_busy_driver_reads_link_and_mailbox_once_per_period() {
    let mut bench = new_bench(Some(PF_MAC));
    let mut vf = bench
        .start(Config {
            register_check_period_ns: 1_000_000,
            ..test_config()
        })
        .expect("init");
    let start = bench.now();
    vf.poll(start);
    assert_eq!(vf.link_state(), LinkState::Up);
    bench.fake.set_cable(false);
    vf.poll(start + 500_000);
    assert_eq!(
        vf.link_state(),
        LinkState::Up,
        "within the period: not read"
    );
    vf.poll(start + 1_000_000);
    assert_eq!(
        vf.link_state(),
        LinkState::Down,
        "read once the period is over"
    );
    // Not up: every poll reads (a VF that is down or resetting has no traffic to protect).
    bench.fake.set_cable(true);
    for step in 1..=5 {
        vf.poll(start + 1_000_000 + step);
    }
    assert_eq!(
        vf.link_state(),
        LinkState::Up,
        "seen without waiting a period"
    );

    // The loop runs out of work within the period: the deferred check asks for a poll when
    // it is due, so a sleep cannot outlast it (the skipped poll may have been a PF message's
    // wake-up).
    let read = start + 3_000_000;
    vf.poll(read);
    assert_eq!(
        vf.next_poll_ns(),
        None,
        "that poll read them: nothing deferred"
    );
    bench.fake.set_cable(false);
    vf.poll(read + 100_000);
    assert_eq!(vf.link_state(), LinkState::Up, "deferred");
    assert!(!vf.arm_interrupts(), "no work: the caller may sleep");
    assert_eq!(
        vf.next_poll_ns(),
        Some(read + 1_000_000),
        "but not past the period"
    );
    vf.poll(read + 1_000_000);
    assert_eq!(vf.link_state(), LinkState::Down, "read when due");
    assert_eq!(vf.next_poll_ns(), None);
}

/// A VF whose register check runs every 1 ms, every 10 ms while frames arrive.
fn started_with_check_periods(bench: &mut Bench) -> Vf {
    bench
        .start(Config {
            register_check_period_ns: 1_000_000,
            busy_register_check_period_ns: 10_000_000,
            ..test_config()
        })
        .expect("init")
}

/// Polls `vf` `polls` times, `interval_ns` apart after `start`, a frame arriving before each,
/// and checks that a pending PF message stays unread (the VF is busy: its registers wait for
/// the busy period). Returns the last poll's time.
fn poll_busy_leaving_the_message_unread(
    bench: &Bench,
    vf: &mut Vf,
    start: u64,
    interval_ns: u64,
    polls: usize,
) -> u64 {
    let mut now = start;
    for _ in 0..polls {
        now += interval_ns;
        assert!(bench.fake.inject_rx_frame(0, &frame(PF_MAC.0, 64, 0)));
        vf.poll(now);
        assert_eq!(receive_all(vf).len(), 1);
        assert_eq!(
            vf.driver_counters().pf_control_messages,
            0,
            "at {} ns: busy, registers not read",
            now - start
        );
    }
    now
}

#[test]
fn while_frames_arrive_the_register_check_stretches_and_resumes_once_they_stop() {
    let mut bench = new_bench(Some(PF_MAC));
    let mut vf = started_with_check_periods(&mut bench);
    let start = bench.now();
    vf.poll(start);
    // A frame every 0.5 ms: the VF is plainly there with link, so a PF message that leaves
    // traffic flowing waits for the busy period.
    bench
        .fake
        .pf_send(0, &[mailbox::PF_CONTROL_MSG | mailbox::MSGTYPE_CTS]);
    poll_busy_leaving_the_message_unread(&bench, &mut vf, start, 500_000, 19);
    assert_eq!(vf.next_poll_ns(), Some(start + 10_000_000));
    vf.poll(start + 10_000_000);
    assert_eq!(
        vf.driver_counters().pf_control_messages,
        1,
        "read at the busy period"
    );

    // The mailbox vector firing reads the message at once, busy or not.
    let fired = Rc::new(Cell::new(false));
    let flag = fired.clone();
    vf.set_mailbox_interrupt(Box::new(move || flag.replace(false)));
    bench
        .fake
        .pf_send(0, &[mailbox::PF_CONTROL_MSG | mailbox::MSGTYPE_CTS]);
    let now = start + 10_500_000;
    assert!(bench.fake.inject_rx_frame(0, &frame(PF_MAC.0, 64, 0)));
    vf.poll(now);
    assert_eq!(receive_all(&mut vf).len(), 1);
    assert_eq!(
        vf.driver_counters().pf_control_messages,
        1,
        "deferred, no interrupt"
    );
    fired.set(true);
    vf.poll(now + 1);
    assert_eq!(
        vf.driver_counters().pf_control_messages,
        2,
        "read on the interrupt"
    );
    assert!(!fired.get(), "the flag was taken");

    // Frames stop: the plain period applies again from the last one.
    bench.fake.set_cable(true);
    vf.poll(start + 12_000_000);
    assert_eq!(vf.link_state(), LinkState::Up);
    let last_frame = start + 12_500_000;
    assert!(bench.fake.inject_rx_frame(0, &frame(PF_MAC.0, 64, 1)));
    vf.poll(last_frame);
    assert_eq!(receive_all(&mut vf).len(), 1);
    bench.fake.set_cable(false);
    vf.poll(last_frame + 600_000);
    assert!(receive_all(&mut vf).is_empty(), "no frame since");
    assert_eq!(
        vf.link_state(),
        LinkState::Up,
        "within a period of the last frame"
    );
    assert_eq!(vf.next_poll_ns(), Some(last_frame + 1_000_000));
    vf.poll(last_frame + 1_000_000);
    assert_eq!(
        vf.link_state(),
        LinkState::Down,
        "a period after the last frame, not the busy period"
    );
}

#[test]
fn poll_cycles_longer_than_the_period_still_count_as_busy_while_each_finds_frames() {
    let mut bench = new_bench(Some(PF_MAC));
    let mut vf = started_with_check_periods(&mut bench);
    let start = bench.now();
    assert!(bench.fake.inject_rx_frame(0, &frame(PF_MAC.0, 64, 0)));
    vf.poll(start);
    assert_eq!(receive_all(&mut vf).len(), 1);
    bench
        .fake
        .pf_send(0, &[mailbox::PF_CONTROL_MSG | mailbox::MSGTYPE_CTS]);
    // A loaded event loop: 3 ms between polls, each finding frames (within the busy period).
    let mut now = poll_busy_leaving_the_message_unread(&bench, &mut vf, start, 3_000_000, 2);
    // The next cycle finds nothing: a period after the last frame has passed, so the
    // registers are due at once.
    let last_frame = now;
    now += 3_000_000;
    vf.poll(now);
    assert!(receive_all(&mut vf).is_empty());
    assert_eq!(vf.next_poll_ns(), Some(last_frame + 1_000_000));
    vf.poll(now + 1);
    assert_eq!(
        vf.driver_counters().pf_control_messages,
        1,
        "read once quiet"
    );
}
