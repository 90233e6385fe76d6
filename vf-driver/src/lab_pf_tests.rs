//! Host tests of the lab PF responder: a real [`IgbVf`] talks to a real [`LabPf`] through the
//! fake register model, the way they share one CPU in a QEMU test VM.

use crate::device::{Config, IgbVf};
use crate::fake::{FakeIgb, FakePfRegisters, FakeSriov, FakeVfRegisters, TestHost, UnplugStyle};
use crate::fake_dma::FakeDmaAllocator;
use crate::lab_pf::{LabPf, LabPfConfig, SriovControl};
use crate::mailbox::{self, MailboxStage, Request};
use crate::pf_regs as pf;
use crate::regs;
use crate::{Error, WaitHost};
use alloc::boxed::Box;
use alloc::rc::Rc;
use alloc::vec::Vec;
use core::cell::RefCell;
use net_device::{DeviceError, LinkState, MacAddress, NetDevice, RegisterIo, TxMeta};

type Lab = LabPf<FakePfRegisters, FakeSriov>;
type Vf = IgbVf<FakeVfRegisters, FakeDmaAllocator>;

/// The MAC the lab assigns to VF 0 (in the product: the synthetic NIC's MAC).
const VF0_MAC: MacAddress = MacAddress([0x52, 0x54, 0x00, 0x00, 0x0a, 0x00]);
const PEER: [u8; 6] = [0x52, 0x54, 0x00, 0x99, 0x99, 0x99];
const STEP_NS: u64 = 1_000;

struct Rig {
    fake: FakeIgb,
    lab: Rc<RefCell<Lab>>,
}

fn rig(num_vfs: u16, vf_macs: Vec<Option<MacAddress>>) -> Rig {
    let fake = FakeIgb::new();
    let config = LabPfConfig {
        num_vfs,
        vf_macs,
        ..LabPfConfig::default()
    };
    let lab = LabPf::new(fake.pf_registers(), fake.sriov(), config).expect("valid lab config");
    let lab = Rc::new(RefCell::new(lab));
    let link = lab
        .borrow_mut()
        .bring_up(&mut TestHost::new(STEP_NS))
        .expect("PF programs");
    assert!(link, "autoneg completes");
    Rig { fake, lab }
}

impl Rig {
    /// A host whose idle turns run the lab PF, as the kernel's does in test images.
    fn host(&self) -> TestHost {
        let lab = self.lab.clone();
        TestHost::new(STEP_NS).with_idle(move || lab.borrow_mut().service())
    }

    fn start_vf(&self, vf: usize, config: Config) -> Result<Vf, Error> {
        IgbVf::new(
            self.fake.vf_registers(vf),
            FakeDmaAllocator::new(),
            Box::new(self.host()),
            config,
        )
    }

    fn service(&self) {
        self.lab.borrow_mut().service();
    }

    /// A few rounds of "kernel main loop": the PF answers, the VF polls.
    fn run(&self, vf: &mut Vf, rounds: usize) {
        for _ in 0..rounds {
            self.service();
            vf.poll(0);
        }
    }
}

fn config() -> Config {
    Config {
        rx_ring_size: 32,
        tx_ring_size: 32,
        mailbox_timeout_ns: 5_000_000,
        register_check_period_ns: 0,
        ..Config::default()
    }
}

fn frame(destination: [u8; 6], len: usize, seed: u8) -> Vec<u8> {
    let mut frame = Vec::new();
    frame.extend_from_slice(&destination);
    frame.extend_from_slice(&PEER);
    frame.extend_from_slice(&[0x08, 0x06]);
    frame.extend((14..len).map(|i| (i as u8) ^ seed));
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
    vf.receive(64, &mut |data, _| frames.push(data.to_vec()));
    frames
}

/// Drives VF `vf`'s mailbox by hand (raw registers), for messages the driver never sends.
fn raw_request(rig: &Rig, vf: usize, words: &[u32], reply_words: usize) -> Vec<u32> {
    let regs = rig.fake.vf_registers(vf);
    regs.write32(regs::V2PMAILBOX, regs::Mailbox::VFU.bits());
    for (index, word) in words.iter().enumerate() {
        regs.write32(regs::VMBMEM + 4 * index, *word);
    }
    regs.write32(regs::V2PMAILBOX, regs::Mailbox::REQ.bits());
    rig.service();
    let control = regs.read32(regs::V2PMAILBOX);
    assert_ne!(control & regs::Mailbox::PFSTS.bits(), 0, "the lab replied");
    regs.write32(regs::V2PMAILBOX, regs::Mailbox::VFU.bits());
    let reply = (0..reply_words)
        .map(|index| regs.read32(regs::VMBMEM + 4 * index))
        .collect();
    regs.write32(regs::V2PMAILBOX, regs::Mailbox::ACK.bits());
    rig.service();
    reply
}

#[test]
fn bring_up_programs_the_pf_as_the_reference_recipe_says() {
    let rig = rig(2, alloc::vec![Some(VF0_MAC)]);
    let fake = &rig.fake;
    assert_eq!(fake.enabled_vfs(), 2);
    assert!(fake.link_up());
    assert_eq!(fake.pf_register(pf::MRQC), pf::MRQC_VMDQ);
    assert_eq!(
        fake.pf_register(pf::VT_CTL),
        pf::VT_CTL_DISABLE_DEFAULT_POOL
    );
    assert_eq!(
        fake.pf_register(pf::RCTL),
        pf::RCTL_ENABLE | pf::RCTL_STRIP_CRC
    );
    assert_ne!(fake.pf_register(pf::TCTL) & pf::TCTL_ENABLE, 0);
    assert_ne!(
        fake.pf_register(pf::CTRL_EXT) & pf::CTRL_EXT_PF_RESET_DONE,
        0
    );
    assert_ne!(fake.pf_register(pf::GPIE) & pf::GPIE_MSIX_MODE, 0);
    // Receive checksum offload on, as a Linux igb PF leaves it (PCSD and CRCOFL are not
    // reset values, so this is the lab PF's write).
    assert_eq!(
        fake.pf_register(pf::RXCSUM),
        pf::RXCSUM_IP_OFFLOAD
            | pf::RXCSUM_L4_OFFLOAD
            | pf::RXCSUM_SCTP_OFFLOAD
            | pf::RXCSUM_PACKET_CHECKSUM_DISABLE
    );
    // VF 0's filter in RAR[23] with pool 0 (reference §2.1 step 6).
    assert_eq!(fake.pf_register(pf::ral(23)), 0x0000_5452);
    assert_eq!(
        fake.pf_register(pf::rah(23)),
        0x0000_000a | pf::RAH_ADDRESS_VALID | pf::RAH_POOL_0
    );
    assert_eq!(fake.pf_register(pf::rah(22)), 0, "VF 1 has no MAC yet");
    assert_ne!(fake.pf_register(pf::vmolr(0)) & pf::VMOLR_BAM, 0);
    // Traffic stays off until each VF completes VF_RESET.
    assert_eq!(fake.pf_register(pf::VFRE) & 0b11, 0);
    assert!(rig.lab.borrow().pf_link_up());
}

#[test]
fn a_vf_initialises_through_the_lab_pf_and_passes_traffic() {
    let rig = rig(1, alloc::vec![Some(VF0_MAC)]);
    let mut vf = rig.start_vf(0, config()).expect("the lab answers");
    assert_eq!(vf.mac_address(), VF0_MAC);
    assert_eq!(vf.link_state(), LinkState::Up);
    assert!(rig.lab.borrow().vf_clear_to_send(0));
    assert_eq!(rig.fake.pf_register(pf::VFRE) & 1, 1);
    assert_eq!(rig.fake.pf_register(pf::VFTE) & 1, 1);
    // SET_LPE reached the pool: 1522 bytes, long packets enabled.
    let vmolr = rig.fake.pf_register(pf::vmolr(0));
    assert_eq!(vmolr & pf::VMOLR_RLPML_MASK, 1522);
    assert_ne!(vmolr & pf::VMOLR_LPE, 0);
    let counters = rig.lab.borrow().counters();
    assert_eq!(counters.vf_resets, 1);
    assert_eq!(
        counters.function_resets, 1,
        "the VF's own CTRL.RST shows up as VFLRE"
    );
    assert_eq!(counters.requests, 3);

    // Unicast to the VF and broadcast arrive; unknown unicast does not (no default pool).
    let unicast = frame(VF0_MAC.0, 100, 1);
    let broadcast = frame([0xFF; 6], 60, 2);
    assert_eq!(rig.fake.deliver_from_wire(&unicast), [0]);
    assert_eq!(rig.fake.deliver_from_wire(&broadcast), [0]);
    assert!(
        rig.fake
            .deliver_from_wire(&frame([0x52, 0x54, 0, 1, 2, 3], 80, 3))
            .is_empty()
    );
    assert_eq!(receive_all(&mut vf), [unicast, broadcast]);

    let outgoing = frame(PEER, 200, 4);
    send(&mut vf, &outgoing).expect("link up");
    vf.flush();
    assert_eq!(rig.fake.take_transmitted(0), [outgoing]);
}

#[test]
fn the_multicast_list_reaches_the_mta() {
    let rig = rig(1, alloc::vec![Some(VF0_MAC)]);
    let solicited = MacAddress([0x33, 0x33, 0xff, 0x00, 0x0a, 0x00]);
    let mut vf = rig
        .start_vf(
            0,
            Config {
                multicast: alloc::vec![solicited],
                ..config()
            },
        )
        .expect("init");
    assert_ne!(rig.fake.pf_register(pf::vmolr(0)) & pf::VMOLR_ROMPE, 0);
    let wanted = frame(solicited.0, 86, 5);
    assert_eq!(rig.fake.deliver_from_wire(&wanted), [0]);
    assert!(
        rig.fake
            .deliver_from_wire(&frame([0x33, 0x33, 0xff, 0x77, 0x77, 0x77], 86, 6))
            .is_empty()
    );
    assert_eq!(receive_all(&mut vf), [wanted]);
}

#[test]
fn a_vf_without_an_assigned_mac_may_choose_one_and_the_filter_follows() {
    let rig = rig(2, alloc::vec![Some(VF0_MAC), None]);
    assert_eq!(rig.start_vf(1, config()).err(), Some(Error::NoMacAddress));
    let chosen = MacAddress([0x02, 0x00, 0x00, 0x00, 0x00, 0x01]);
    let mut vf1 = rig
        .start_vf(
            1,
            Config {
                requested_mac: Some(chosen),
                ..config()
            },
        )
        .expect("accepted");
    assert_eq!(vf1.mac_address(), chosen);
    assert_eq!(rig.lab.borrow().vf_mac(1), Some(chosen));
    assert_eq!(
        rig.fake.pf_register(pf::rah(22)) & (pf::RAH_POOL_0 << 1),
        pf::RAH_POOL_0 << 1
    );
    let data = frame(chosen.0, 64, 7);
    assert_eq!(rig.fake.deliver_from_wire(&data), [1]);
    assert_eq!(receive_all(&mut vf1), [data]);
}

#[test]
fn an_assigned_mac_cannot_be_overridden_by_the_vf() {
    let rig = rig(1, alloc::vec![Some(VF0_MAC)]);
    let other = MacAddress([0x02, 0, 0, 0, 0, 0x99]);
    let vf = rig
        .start_vf(
            0,
            Config {
                requested_mac: Some(other),
                ..config()
            },
        )
        .expect("falls back");
    assert_eq!(vf.mac_address(), VF0_MAC);
    assert_eq!(rig.lab.borrow().vf_mac(0), Some(VF0_MAC));
    assert!(rig.lab.borrow().counters().nacks_sent >= 1);
}

#[test]
fn a_pf_control_message_makes_the_vf_reinitialise_and_come_back() {
    let rig = rig(1, alloc::vec![Some(VF0_MAC)]);
    let mut vf = rig.start_vf(0, config()).expect("init");
    rig.lab
        .borrow_mut()
        .send_control_message(0)
        .expect("VF 0 exists");
    vf.poll(0);
    assert_eq!(
        vf.link_state(),
        LinkState::Down,
        "the PF no longer has us clear to send"
    );
    assert_eq!(
        send(&mut vf, &frame(PEER, 64, 0)),
        Err(DeviceError::NotReady)
    );
    rig.run(&mut vf, 3);
    assert_eq!(
        vf.link_state(),
        LinkState::Resetting,
        "the NACK to our acknowledgement"
    );

    vf.reinitialize().expect("the lab admits the VF again");
    assert_eq!(vf.link_state(), LinkState::Up);
    let data = frame(VF0_MAC.0, 70, 1);
    assert_eq!(rig.fake.deliver_from_wire(&data), [0]);
    assert_eq!(receive_all(&mut vf), [data]);
    send(&mut vf, &frame(PEER, 64, 2)).expect("up");
    vf.flush();
    assert_eq!(rig.fake.take_transmitted(0).len(), 1);
    assert_eq!(rig.lab.borrow().counters().vf_resets, 2);
}

#[test]
fn a_resetting_vf_reinitialises_itself_from_poll_after_its_back_off() {
    let rig = rig(1, alloc::vec![Some(VF0_MAC)]);
    let mut vf = rig.start_vf(0, config()).expect("init");
    rig.lab
        .borrow_mut()
        .send_control_message(0)
        .expect("VF 0 exists");
    vf.poll(0);
    rig.run(&mut vf, 3);
    assert_eq!(vf.link_state(), LinkState::Resetting);
    vf.poll(1_000_000);
    assert_eq!(
        vf.link_state(),
        LinkState::Resetting,
        "not before the back-off"
    );
    vf.poll(50_000_000);
    assert_eq!(vf.link_state(), LinkState::Up, "poll re-initialised the VF");
    send(&mut vf, &frame(PEER, 64, 2)).expect("up");
    vf.flush();
    assert_eq!(rig.fake.take_transmitted(0).len(), 1);
}

#[test]
fn the_lab_can_take_a_vf_link_down_and_up() {
    let rig = rig(1, alloc::vec![Some(VF0_MAC)]);
    let mut vf = rig.start_vf(0, config()).expect("init");
    rig.lab
        .borrow_mut()
        .set_vf_link(0, false)
        .expect("VF 0 exists");
    rig.run(&mut vf, 3);
    assert_eq!(vf.link_state(), LinkState::Down);
    assert_eq!(
        rig.fake.pf_register(pf::VFTE) & 1,
        0,
        "no traffic while down"
    );
    assert!(
        rig.fake
            .deliver_from_wire(&frame(VF0_MAC.0, 64, 0))
            .is_empty()
    );

    rig.lab
        .borrow_mut()
        .set_vf_link(0, true)
        .expect("VF 0 exists");
    rig.run(&mut vf, 3);
    assert_eq!(vf.link_state(), LinkState::Up);
    assert_eq!(rig.fake.deliver_from_wire(&frame(VF0_MAC.0, 64, 1)), [0]);
    assert_eq!(vf.driver_counters().pf_control_messages, 2);
    assert!(matches!(
        rig.lab.borrow_mut().set_vf_link(3, true),
        Err(Error::NoSuchVf { vf: 3, count: 1 })
    ));
}

#[test]
fn a_vf_initialised_while_its_lab_link_is_down_comes_up_with_it() {
    let rig = rig(1, alloc::vec![Some(VF0_MAC)]);
    rig.lab
        .borrow_mut()
        .set_vf_link(0, false)
        .expect("VF 0 exists");
    let mut vf = rig.start_vf(0, config()).expect("admitted, link down");
    assert_eq!(vf.link_state(), LinkState::Down);
    rig.lab
        .borrow_mut()
        .set_vf_link(0, true)
        .expect("VF 0 exists");
    rig.run(&mut vf, 3);
    assert_eq!(vf.link_state(), LinkState::Up);
}

#[test]
fn disabling_the_vfs_is_a_surprise_removal_and_re_enabling_gives_a_fresh_vf() {
    let rig = rig(1, alloc::vec![Some(VF0_MAC)]);
    let mut vf = rig.start_vf(0, config()).expect("init");
    send(&mut vf, &frame(PEER, 64, 0)).expect("up");
    rig.lab.borrow_mut().disable_vfs();
    vf.flush();
    vf.poll(0);
    assert_eq!(vf.link_state(), LinkState::Gone);
    assert_eq!(send(&mut vf, &frame(PEER, 64, 1)), Err(DeviceError::Gone));
    assert!(rig.fake.take_transmitted(0).is_empty());
    drop(vf);

    rig.lab.borrow_mut().enable_vfs().expect("PF present");
    let mut vf = rig.start_vf(0, config()).expect("fresh VF initialises");
    assert_eq!(vf.link_state(), LinkState::Up);
    send(&mut vf, &frame(PEER, 64, 2)).expect("up");
    vf.flush();
    assert_eq!(rig.fake.take_transmitted(0).len(), 1);
    assert_eq!(rig.fake.dma_faults(), 0);
}

#[test]
fn a_function_level_reset_is_noticed_by_the_pf_and_healed_by_the_tx_hang_check() {
    let rig = rig(1, alloc::vec![Some(VF0_MAC)]);
    let mut vf = rig.start_vf(0, config()).expect("init");
    let resets = rig.lab.borrow().counters().function_resets;
    rig.lab
        .borrow_mut()
        .reset_vf_function(0)
        .expect("VF 0 exists");
    rig.service();
    assert_eq!(rig.lab.borrow().counters().function_resets, resets + 1);
    assert!(!rig.lab.borrow().vf_clear_to_send(0));
    // The VF does not know its queues were reset: its frames stop completing.
    send(&mut vf, &frame(PEER, 64, 0)).expect("the driver still thinks it is up");
    vf.flush();
    vf.poll(1_000);
    vf.poll(200_000_000);
    // The hang check marks it Resetting; poll re-initialises it once the back-off passed.
    vf.poll(400_000_000);
    vf.poll(600_000_000);
    assert_eq!(
        vf.link_state(),
        LinkState::Up,
        "healed without outside help"
    );
    send(&mut vf, &frame(PEER, 64, 1)).expect("up");
    vf.flush();
    assert_eq!(rig.fake.take_transmitted(0).len(), 1);
}

#[test]
fn a_pf_reset_is_seen_by_the_vf_which_then_reinitialises() {
    let rig = rig(1, alloc::vec![Some(VF0_MAC)]);
    let mut vf = rig.start_vf(0, config()).expect("init");
    let link = rig
        .lab
        .borrow_mut()
        .reset_pf(&mut TestHost::new(STEP_NS))
        .expect("PF reset");
    assert!(link);
    vf.poll(0);
    assert_eq!(vf.link_state(), LinkState::Resetting);
    assert_eq!(vf.driver_counters().pf_resets, 1);
    vf.reinitialize().expect("PF programmed again");
    assert_eq!(vf.link_state(), LinkState::Up);
    let data = frame(VF0_MAC.0, 64, 3);
    assert_eq!(rig.fake.deliver_from_wire(&data), [0]);
    assert_eq!(receive_all(&mut vf), [data]);
}

#[test]
fn pf_link_changes_are_announced_to_the_vfs() {
    let rig = rig(1, alloc::vec![Some(VF0_MAC)]);
    let mut vf = rig.start_vf(0, config()).expect("init");
    rig.fake.set_cable(false);
    rig.run(&mut vf, 2);
    assert_eq!(vf.link_state(), LinkState::Down);
    rig.fake.set_cable(true);
    rig.run(&mut vf, 6);
    assert_eq!(vf.link_state(), LinkState::Up);
    assert_eq!(rig.lab.borrow().counters().link_changes, 2);
    assert!(vf.driver_counters().pf_control_messages >= 1);
}

#[test]
fn requests_before_vf_reset_are_refused_without_cts() {
    let rig = rig(1, alloc::vec![Some(VF0_MAC)]);
    let reply = raw_request(&rig, 0, &[mailbox::SET_LPE, 1522], 1);
    assert_eq!(reply[0], mailbox::SET_LPE | mailbox::MSGTYPE_NACK);
}

#[test]
fn unknown_and_unsupported_requests_are_refused_like_linux_igb() {
    let rig = rig(1, alloc::vec![Some(VF0_MAC)]);
    let reset = raw_request(&rig, 0, &[mailbox::VF_RESET], 3);
    assert_eq!(
        reset,
        [
            mailbox::VF_RESET | mailbox::MSGTYPE_ACK,
            0x0000_5452,
            0x0000_000a
        ]
    );
    let cts_nack = mailbox::MSGTYPE_NACK | mailbox::MSGTYPE_CTS;
    // ixgbe's API negotiation (0x08) is not an igb message.
    assert_eq!(
        raw_request(&rig, 0, &[0x08, 0x0001_0000], 1),
        [0x08 | cts_nack]
    );
    assert_eq!(rig.lab.borrow().counters().unknown_requests, 1);
    // The lab programs no VLAN filters.
    assert_eq!(
        raw_request(&rig, 0, &[mailbox::SET_VLAN | (1 << 16), 100], 1),
        [mailbox::SET_VLAN | (1 << 16) | cts_nack]
    );
    // Maximum frame sizes outside what the 82576 pools take.
    assert_eq!(
        raw_request(&rig, 0, &[mailbox::SET_LPE, 20_000], 1),
        [mailbox::SET_LPE | cts_nack]
    );
    // Multicast promiscuous mode sets VMOLR.MPME.
    let promiscuous = mailbox::SET_PROMISC | mailbox::PROMISC_MULTICAST;
    let cts_ack = mailbox::MSGTYPE_ACK | mailbox::MSGTYPE_CTS;
    assert_eq!(
        raw_request(&rig, 0, &[promiscuous], 1),
        [promiscuous | cts_ack]
    );
    assert_ne!(rig.fake.pf_register(pf::vmolr(0)) & pf::VMOLR_MPME, 0);
    // Extra unicast filters are refused; clearing them is fine.
    let add = mailbox::SET_MAC_ADDR | mailbox::MAC_FILTER_ADD;
    assert_eq!(
        raw_request(&rig, 0, &[add, 0x0000_0002, 0x0000_0100], 1),
        [add | cts_nack]
    );
    let clear = mailbox::SET_MAC_ADDR | mailbox::MAC_FILTER_CLEAR;
    assert_eq!(raw_request(&rig, 0, &[clear, 0, 0], 1), [clear | cts_ack]);
}

#[test]
fn the_lab_never_reads_the_vf_side_mailbox_register() {
    // Reading V2PMAILBOX from the PF clears the VF's read-to-clear bits in QEMU; a VF waiting
    // for PFACK would then never see it. A full initialisation proves the lab leaves it alone.
    let rig = rig(1, alloc::vec![Some(VF0_MAC)]);
    let regs = rig.fake.vf_registers(0);
    regs.write32(regs::V2PMAILBOX, regs::Mailbox::VFU.bits());
    regs.write32(regs::VMBMEM, mailbox::VF_RESET);
    regs.write32(regs::V2PMAILBOX, regs::Mailbox::REQ.bits());
    rig.service();
    let control = regs.read32(regs::V2PMAILBOX);
    assert_ne!(control & regs::Mailbox::PFACK.bits(), 0);
    assert_ne!(control & regs::Mailbox::PFSTS.bits(), 0);
}

#[test]
fn a_vf_holding_the_mailbox_delays_the_reply_instead_of_losing_it() {
    let rig = rig(1, alloc::vec![Some(VF0_MAC)]);
    let regs = rig.fake.vf_registers(0);
    regs.write32(regs::V2PMAILBOX, regs::Mailbox::VFU.bits());
    regs.write32(regs::VMBMEM, mailbox::VF_RESET);
    // REQ together with VFU: the VF keeps the lock.
    regs.write32(
        regs::V2PMAILBOX,
        (regs::Mailbox::REQ | regs::Mailbox::VFU).bits(),
    );
    rig.service();
    assert_eq!(
        rig.lab.borrow().counters().requests,
        0,
        "cannot read while the VF holds it"
    );
    regs.write32(regs::V2PMAILBOX, 0);
    rig.service();
    assert_eq!(rig.lab.borrow().counters().requests, 1);
    assert_eq!(
        regs.read32(regs::VMBMEM),
        mailbox::VF_RESET | mailbox::MSGTYPE_ACK
    );
}

#[test]
fn a_vf_that_never_gets_an_answer_from_a_dead_pf_fails_cleanly() {
    let rig = rig(1, alloc::vec![Some(VF0_MAC)]);
    // The PF's registers vanish (and with them the VF's): the lab stops touching them.
    rig.fake.unplug(UnplugStyle::Zeros);
    rig.service();
    assert!(!rig.lab.borrow().is_present());
    assert!(matches!(
        rig.start_vf(0, config()),
        Err(Error::DeviceGone { .. })
    ));
    assert!(matches!(
        rig.lab.borrow_mut().reset_pf(&mut TestHost::new(STEP_NS)),
        Err(Error::DeviceGone { .. })
    ));
}

#[test]
fn a_lab_that_is_never_serviced_means_a_vf_mailbox_timeout() {
    let rig = rig(1, alloc::vec![Some(VF0_MAC)]);
    let host = TestHost::new(STEP_NS);
    let result = IgbVf::new(
        rig.fake.vf_registers(0),
        FakeDmaAllocator::new(),
        Box::new(host),
        config(),
    );
    assert!(matches!(
        result,
        Err(Error::MailboxTimeout {
            request: Request::Reset,
            stage: MailboxStage::Acknowledgement
        })
    ));
}

#[test]
fn lab_configuration_is_checked() {
    let fake = FakeIgb::new();
    let too_many = LabPfConfig {
        num_vfs: 9,
        ..LabPfConfig::default()
    };
    assert!(matches!(
        LabPf::new(fake.pf_registers(), fake.sriov(), too_many),
        Err(Error::SriovEnable { .. })
    ));
    let multicast_mac = LabPfConfig {
        vf_macs: alloc::vec![Some(MacAddress([1, 0, 0, 0, 0, 1]))],
        ..LabPfConfig::default()
    };
    assert!(matches!(
        LabPf::new(fake.pf_registers(), fake.sriov(), multicast_mac),
        Err(Error::InvalidConfig { .. })
    ));
}

#[test]
fn the_phy_link_timeout_is_reported_not_waited_out_forever() {
    let fake = FakeIgb::new();
    fake.set_cable(false);
    let config = LabPfConfig {
        link_timeout_ns: 1_000_000,
        ..LabPfConfig::default()
    };
    let mut lab = LabPf::new(fake.pf_registers(), fake.sriov(), config).expect("valid");
    let mut host = TestHost::new(STEP_NS);
    assert_eq!(lab.bring_up(&mut host), Ok(false));
    assert!(host.now_ns() < 10_000_000);
}

#[test]
fn vf_interrupts_are_delivered_through_the_lab_configured_pf() {
    let rig = rig(1, alloc::vec![Some(VF0_MAC)]);
    let mut vf = rig.start_vf(0, config()).expect("init");
    vf.configure_msix(0, 0).expect("valid");
    let before = rig.fake.vf_interrupts(0)[0];
    assert_eq!(rig.fake.deliver_from_wire(&frame(VF0_MAC.0, 64, 0)), [0]);
    assert_eq!(rig.fake.vf_interrupts(0)[0], before + 1);
    rig.lab
        .borrow_mut()
        .set_vf_link(0, true)
        .expect("VF 0 exists");
    assert_eq!(
        rig.fake.vf_interrupts(0)[0],
        before + 2,
        "the control message interrupts too"
    );
    vf.handle_interrupt();
    assert_eq!(vf.driver_counters().pf_control_messages, 1);
}

#[test]
fn sriov_control_of_the_fake_matches_the_trait_contract() {
    let fake = FakeIgb::new();
    let mut sriov = fake.sriov();
    assert_eq!(sriov.total_vfs(), 8);
    assert!(sriov.enable_vfs(9).is_err());
    sriov.enable_vfs(2).expect("two VFs");
    assert_eq!(sriov.enabled_vfs(), 2);
    assert_eq!(
        fake.pf_register(pf::VFLRE) & 0b11,
        0b11,
        "enabling resets each VF"
    );
    assert!(matches!(
        sriov.function_level_reset(2),
        Err(Error::NoSuchVf { vf: 2, count: 2 })
    ));
    sriov.disable_vfs();
    assert_eq!(sriov.enabled_vfs(), 0);
    assert_eq!(
        fake.vf_registers(0).read32(regs::STATUS),
        0,
        "a disabled VF reads 0"
    );
}

/// PF registers whose next read of VF 0's P2V mailbox answers 0 once armed.
struct LyingOnce {
    inner: FakePfRegisters,
    armed: Rc<core::cell::Cell<bool>>,
}

impl RegisterIo for LyingOnce {
    fn read32(&self, offset: usize) -> u32 {
        if offset == pf::p2v_mailbox(0) && self.armed.replace(false) {
            return 0;
        }
        self.inner.read32(offset)
    }
    fn write32(&self, offset: usize, value: u32) {
        self.inner.write32(offset, value);
    }
    fn len(&self) -> usize {
        self.inner.len()
    }
}

/// Found by the fuzz harness (target lab-pf): when the read-back of the PF's lock claim lied,
/// the lab kept the lock it did not believe it had, and VF 0 could never use its mailbox again.
#[test]
fn a_lock_claim_that_reads_back_wrong_is_dropped() {
    let fake = FakeIgb::new();
    let armed = Rc::new(core::cell::Cell::new(false));
    let registers = LyingOnce {
        inner: fake.pf_registers(),
        armed: armed.clone(),
    };
    let lab_config = LabPfConfig {
        num_vfs: 1,
        vf_macs: alloc::vec![Some(VF0_MAC)],
        ..LabPfConfig::default()
    };
    let lab = LabPf::new(registers, fake.sriov(), lab_config).expect("valid lab config");
    let lab = Rc::new(RefCell::new(lab));
    lab.borrow_mut()
        .bring_up(&mut TestHost::new(STEP_NS))
        .expect("PF programs");
    armed.set(true);
    lab.borrow_mut()
        .send_control_message(0)
        .expect("VF 0 exists");
    assert_eq!(
        fake.pf_register(pf::p2v_mailbox(0)) & pf::P2V_PFU,
        0,
        "the PF holds no lock"
    );
    let serviced = lab.clone();
    let host = TestHost::new(STEP_NS).with_idle(move || serviced.borrow_mut().service());
    let vf = IgbVf::new(
        fake.vf_registers(0),
        FakeDmaAllocator::new(),
        Box::new(host),
        config(),
    )
    .expect("VF 0 comes up");
    assert_eq!(vf.mac_address(), VF0_MAC);
}

#[test]
fn receive_checksum_offload_can_be_left_off() {
    let fake = FakeIgb::new();
    let config = LabPfConfig {
        num_vfs: 1,
        vf_macs: alloc::vec![Some(VF0_MAC)],
        receive_checksum_offload: false,
        ..LabPfConfig::default()
    };
    let mut lab = LabPf::new(fake.pf_registers(), fake.sriov(), config).expect("valid lab config");
    lab.bring_up(&mut TestHost::new(STEP_NS))
        .expect("PF programs");
    let rxcsum = fake.pf_register(pf::RXCSUM);
    assert_eq!(
        rxcsum & (pf::RXCSUM_IP_OFFLOAD | pf::RXCSUM_L4_OFFLOAD | pf::RXCSUM_SCTP_OFFLOAD),
        0,
        "RXCSUM {rxcsum:#x}"
    );
}
