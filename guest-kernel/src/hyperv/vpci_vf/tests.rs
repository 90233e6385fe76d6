//! The Hyper-V VF hook against a scripted vPCI host whose config window is the PCI layer's
//! fake config space (BAR sizing, capabilities), a fake netvsc side and fake VF drivers.

use super::*;
use crate::pci::fake::{FakeBar, FakeConfigSpace, FakeFunction};
use alloc::collections::VecDeque;
use core::cell::Cell;
use vmbus::Error as VmbusError;
use vmbus::guid::{Guid, interface};
use vmbus::packet::{IncomingPacket, OutgoingKind};
use vmbus::testing::received_by_guest;
use vmbus::vpci::protocol::{self, message};
use zerocopy::{FromBytes, IntoBytes};

const SECOND: u64 = 1_000_000_000;
const WINDOW: u64 = 0xf800_0000;
const SERIAL: u32 = 7;
const WSLOT: u32 = 0;
const MAC: MacAddress = MacAddress([0, 0x15, 0x5d, 1, 2, 3]);

/// The scripted host: what it saw, what it sends, its functions' config space.
#[derive(Default)]
struct HostState {
    seen: Vec<(u32, Vec<u8>)>,
    /// For each message seen: whether the VF driver had been stopped by then.
    vf_stopped: Vec<bool>,
    /// The VF driver of the latest start.
    vf: Option<Rc<VfRecord>>,
    /// DELETE_INTERRUPT and RELEASE_RESOURCES are never answered.
    silent_release: bool,
    to_guest: VecDeque<(bool, u64, Vec<u8>)>,
    config: FakeConfigSpace,
    rescinded: bool,
    /// The guest's outgoing ring has no room: every send fails.
    ring_full: bool,
    clock: u64,
}

type Host = Rc<RefCell<HostState>>;

impl HostState {
    fn relations(&mut self) {
        let mut payload = protocol::BusRelations {
            message_type: message::BUS_RELATIONS,
            device_count: 1,
        }
        .as_bytes()
        .to_vec();
        let description = protocol::DeviceDescription {
            pnp_id: protocol::PnpId {
                vendor_id: 0x1414,
                device_id: 0x00ba,
                revision_id: 0,
                prog_if: 0,
                sub_class: 0,
                base_class: 2,
                sub_vendor_id: 0,
                sub_system_id: 0,
            },
            wslot: WSLOT,
            serial_number: SERIAL,
        };
        payload.extend_from_slice(description.as_bytes());
        self.to_guest.push_back((false, 0, payload));
    }

    fn handle(&mut self, transaction: u64, payload: &[u8]) {
        let kind = u32::read_from_prefix(payload).unwrap().0;
        self.seen.push((kind, payload.to_vec()));
        let stopped = self.vf.as_ref().is_some_and(|vf| vf.stopped.get());
        self.vf_stopped.push(stopped);
        let reply: Vec<u8> = match kind {
            message::QUERY_PROTOCOL_VERSION => protocol::QueryProtocolVersionReply {
                status: 0,
                protocol_version: protocol::version::V1_4,
            }
            .as_bytes()
            .to_vec(),
            message::FDO_D0_ENTRY => {
                self.relations();
                0u32.to_le_bytes().to_vec()
            }
            message::QUERY_RESOURCE_REQUIREMENTS => protocol::ResourceRequirementsReply {
                status: 0,
                bar_masks: [0xffff_8004, 0xffff_ffff, 0, 0, 0, 0],
            }
            .as_bytes()
            .to_vec(),
            message::CREATE_INTERRUPT2 => protocol::CreateInterruptReply {
                status: 0,
                reserved: 0,
                interrupt: protocol::MsiRemapped {
                    reserved: 0,
                    message_count: 1,
                    data: 0x4000 | u32::from(payload[8]),
                    address: 0xfee0_1000,
                },
            }
            .as_bytes()
            .to_vec(),
            message::EJECTION_COMPLETE => return,
            message::DELETE_INTERRUPT | message::RELEASE_RESOURCES if self.silent_release => {
                return;
            }
            _ => 0u32.to_le_bytes().to_vec(),
        };
        self.to_guest.push_back((true, transaction, reply));
    }

    fn eject(&mut self) {
        let eject = protocol::FunctionMessage {
            message_type: message::EJECT,
            wslot: WSLOT,
        };
        self.to_guest
            .push_back((false, 0, eject.as_bytes().to_vec()));
    }

    fn count(&self, kind: u32) -> usize {
        self.seen.iter().filter(|(seen, _)| *seen == kind).count()
    }

    /// Messages sent since the last CREATE_INTERRUPT2 (the VF's bring-up), with whether the
    /// driver was stopped when each went out.
    fn after_bring_up(&self) -> Vec<(u32, bool)> {
        let start = self
            .seen
            .iter()
            .rposition(|(kind, _)| *kind == message::CREATE_INTERRUPT2)
            .map_or(0, |last| last + 1);
        self.seen[start..]
            .iter()
            .zip(&self.vf_stopped[start..])
            .map(|((kind, _), stopped)| (*kind, *stopped))
            .collect()
    }
}

struct TestPort(Host);

impl VpciPort for TestPort {
    fn send(&mut self, packet: &vmbus::OutgoingPacket<'_>) -> Result<(), VmbusError> {
        if self.0.borrow().ring_full {
            return Err(VmbusError::RingFull {
                needed: 24,
                free: 0,
            });
        }
        let mut payload = Vec::new();
        for piece in packet.payload {
            payload.extend_from_slice(piece);
        }
        self.0.borrow_mut().handle(packet.transaction_id, &payload);
        Ok(())
    }

    fn receive<'b>(
        &mut self,
        buffer: &'b mut Vec<u8>,
    ) -> Result<Option<IncomingPacket<'b>>, VmbusError> {
        let Some((completion, transaction, payload)) = self.0.borrow_mut().to_guest.pop_front()
        else {
            return Ok(None);
        };
        let kind = if completion {
            OutgoingKind::Completion
        } else {
            OutgoingKind::InBand
        };
        Ok(Some(received_by_guest(kind, transaction, &payload, buffer)))
    }

    fn now_ns(&mut self) -> u64 {
        self.0.borrow().clock
    }

    fn wait(&mut self, deadline_ns: u64) {
        let mut host = self.0.borrow_mut();
        host.clock = deadline_ns.min(host.clock + SECOND / 10);
    }

    fn is_rescinded(&mut self) -> bool {
        self.0.borrow().rescinded
    }
}

/// The config window: page 0 selects the wslot, page 1 is the fake config space.
struct TestWindow {
    host: Host,
    selected: Cell<u32>,
}

impl TestWindow {
    fn address(&self) -> PciAddress {
        wslot_address(self.selected.get())
    }
}

impl RegisterIo for TestWindow {
    fn read32(&self, offset: usize) -> u32 {
        let offset = (offset - protocol::WINDOW_CONFIG_SPACE) as u16;
        self.host.borrow().config.read32(self.address(), offset)
    }

    fn write32(&self, offset: usize, value: u32) {
        if offset == protocol::WINDOW_SLOT_SELECT {
            self.selected.set(value);
            return;
        }
        let offset = (offset - protocol::WINDOW_CONFIG_SPACE) as u16;
        self.host
            .borrow()
            .config
            .write32(self.address(), offset, value);
    }

    fn write16(&self, offset: usize, value: u16) {
        let offset = (offset - protocol::WINDOW_CONFIG_SPACE) as u16;
        self.host
            .borrow()
            .config
            .write16(self.address(), offset, value);
    }

    fn write8(&self, offset: usize, value: u8) {
        let offset = (offset - protocol::WINDOW_CONFIG_SPACE) as u16;
        self.host
            .borrow()
            .config
            .write8(self.address(), offset, value);
    }

    fn len(&self) -> usize {
        protocol::WINDOW_LEN
    }
}

/// A MANA-like function: 64-bit 32 KiB BAR0, MSI-X (4 entries, table in BAR0).
fn host() -> Host {
    let host = Host::default();
    let function = FakeFunction::endpoint(0x1414, 0x00ba, [2, 0, 0])
        .with_bar(
            0,
            FakeBar::Memory64 {
                size: 0x8000,
                prefetchable: false,
            },
        )
        // The host's leftover BAR value, outside the guest's MMIO: must not be kept.
        .with_bar_address(0, 0xe000_0000)
        .with_capability(0x40, 0x11, &[3, 0, 0x00, 0x40, 0, 0, 0x00, 0x50, 0, 0]);
    host.borrow().config.insert(wslot_address(WSLOT), function);
    host
}

fn probe(host: &Host) -> SharedVpciBus<TestPort, TestWindow> {
    let window = TestWindow {
        host: host.clone(),
        selected: Cell::new(u32::MAX),
    };
    Rc::new(RefCell::new(
        VpciBus::probe(TestPort(host.clone()), window, WINDOW, 5 * SECOND).unwrap(),
    ))
}

/// What a fake VF driver reports and what was done to it.
#[derive(Default)]
struct VfRecord {
    stopped: Cell<bool>,
    gone: Cell<bool>,
    /// Frames in the VF's receive queue.
    rx: RefCell<VecDeque<Vec<u8>>>,
}

struct FakeVf {
    mac: MacAddress,
    record: Rc<VfRecord>,
}

impl NetDevice for FakeVf {
    fn name(&self) -> &str {
        "fake-mana"
    }
    fn mac_address(&self) -> MacAddress {
        self.mac
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
    }
    fn link_state(&self) -> LinkState {
        LinkState::Up
    }
    fn poll(&mut self, _now_ns: u64) {}
    fn receive(&mut self, budget: usize, sink: &mut dyn FnMut(&[u8], RxMeta)) -> usize {
        assert!(!self.record.stopped.get(), "received from a stopped VF");
        let mut delivered = 0;
        while delivered < budget {
            let Some(frame) = self.record.rx.borrow_mut().pop_front() else {
                break;
            };
            sink(
                &frame,
                RxMeta {
                    checksum_verified: true,
                    checksum_partial: false,
                },
            );
            delivered += 1;
        }
        delivered
    }
    fn can_transmit(&self) -> bool {
        true
    }
    fn transmit(
        &mut self,
        _len: usize,
        _fill: &mut dyn FnMut(&mut [u8]) -> TxMeta,
    ) -> Result<(), DeviceError> {
        Ok(())
    }
    fn flush(&mut self) {}
    fn stats(&self) -> Stats {
        Stats {
            tx_frames: 5,
            ..Stats::default()
        }
    }
    fn stop(&mut self) {
        self.record.stopped.set(true);
    }
    fn mark_gone(&mut self) {
        self.record.gone.set(true);
    }
}

/// The platform: offers handed out, buses probed against the scripted host, functions
/// presented through the PCI layer, and a fake VF with `vf_mac`.
struct TestPlatform {
    host: Host,
    offers: VecDeque<Offer>,
    vf_mac: MacAddress,
    records: Vec<Rc<VfRecord>>,
    closed: Vec<u32>,
    stopped_functions: u32,
    placed_bar0: Option<u64>,
    msi: Vec<(u64, u32)>,
}

impl VfPlatform for TestPlatform {
    type Port = TestPort;
    type Window = TestWindow;

    fn take_vpci_offer(&mut self) -> Option<Offer> {
        self.offers.pop_front()
    }

    fn open_bus(
        &mut self,
        _offer: &Offer,
    ) -> Result<SharedVpciBus<TestPort, TestWindow>, KernelError> {
        Ok(probe(&self.host))
    }

    fn start_function(
        &mut self,
        _offer: &Offer,
        bus: &SharedVpciBus<TestPort, TestWindow>,
        wslot: u32,
    ) -> Result<Box<dyn NetDevice>, KernelError> {
        let mmio = AddressRange::from_start_size(WINDOW + 0x2000, 0x10_0000).unwrap();
        let presented = present_function(bus, wslot, mmio)?;
        self.placed_bar0 = presented
            .pci
            .bar(presented.address, 0)
            .map(|bar| bar.address);
        self.msi = interrupt_messages(bus, wslot, &[0x41, 0x42], 0)?;
        let record = Rc::new(VfRecord::default());
        self.records.push(record.clone());
        self.host.borrow_mut().vf = Some(record.clone());
        Ok(Box::new(FakeVf {
            mac: self.vf_mac,
            record,
        }))
    }

    fn function_stopped(&mut self, _offer: &Offer, _wslot: u32) {
        self.stopped_functions += 1;
    }

    fn close_bus(&mut self, offer: &Offer, _bus: SharedVpciBus<TestPort, TestWindow>) {
        self.closed.push(offer.relid);
    }
}

/// netvsc as the hook sees it.
struct TestSynthetic {
    events: VecDeque<VfEvent>,
    association: Option<VfAssociation>,
    path: HostPath,
    requests: u32,
}

impl SyntheticSide for TestSynthetic {
    fn take_vf_event(&mut self) -> Option<VfEvent> {
        self.events.pop_front()
    }
    fn association(&self) -> Option<VfAssociation> {
        self.association
    }
    fn mac(&self) -> MacAddress {
        MAC
    }
    fn data_path(&self) -> HostPath {
        self.path
    }
    fn request_synthetic(&mut self) {
        self.requests += 1;
        if self.path == HostPath::Vf {
            self.path = HostPath::SwitchingToSynthetic;
        }
    }
}

fn vpci_offer() -> Offer {
    Offer {
        interface_id: interface::VPCI,
        instance_id: Guid::from_fields(0x1234, 0, 0, [0; 8]),
        relid: 9,
        connection_id: 0x2009,
        subchannel_index: 0,
        mmio_megabytes: 32,
        flags: 0,
        user_defined: [0; vmbus::protocol::USER_DEFINED_DATA_SIZE],
    }
}

fn setup(vf_mac: MacAddress) -> (Host, VfHook<TestPlatform>, VfSlot, TestSynthetic) {
    let host = host();
    let platform = TestPlatform {
        host: host.clone(),
        offers: VecDeque::from([vpci_offer()]),
        vf_mac,
        records: Vec::new(),
        closed: Vec::new(),
        stopped_functions: 0,
        placed_bar0: None,
        msi: Vec::new(),
    };
    let (hook, slot) = VfHook::new(platform, MAC, Capabilities::default());
    let synthetic = TestSynthetic {
        events: VecDeque::from([VfEvent::Associated {
            serial_number: SERIAL,
        }]),
        association: Some(VfAssociation {
            allocated: true,
            serial_number: SERIAL,
        }),
        path: HostPath::Synthetic,
        requests: 0,
    };
    (host, hook, slot, synthetic)
}

#[test]
fn the_associated_vpci_function_is_presented_to_the_pci_layer_and_fills_the_slot() {
    let (host, mut hook, slot, mut synthetic) = setup(MAC);
    assert_eq!(slot.link_state(), LinkState::Down, "empty slot");
    assert_eq!(slot.mac_address(), MAC, "eligible while empty");
    hook.step(&mut synthetic, 0);
    assert!(slot.is_filled());
    assert_eq!(slot.link_state(), LinkState::Up);
    assert_eq!(hook.counters().vfs_paired, 1);
    // BAR0 placed by the PCI layer inside the MMIO given, after the config window, and
    // reported to the host with that address.
    let bar0 = hook.platform().placed_bar0.unwrap();
    assert!((WINDOW + 0x2000..WINDOW + 0x2000 + 0x10_0000).contains(&bar0));
    assert_eq!(bar0 % 0x8000, 0, "naturally aligned");
    let host_state = host.borrow();
    let (_, assigned) = host_state
        .seen
        .iter()
        .find(|(kind, _)| *kind == message::ASSIGNED_RESOURCES2)
        .expect("ASSIGNED_RESOURCES2 sent");
    let assigned = protocol::AssignedResources::read_from_prefix(assigned)
        .unwrap()
        .0;
    assert_eq!(
        assigned.mmio_resources[0],
        protocol::memory_descriptor(bar0, 0x8000)
    );
    // The MSI-X messages are the host's mappings, one CREATE_INTERRUPT2 per vector.
    assert_eq!(
        hook.platform().msi,
        [(0xfee0_1000, 0x4041), (0xfee0_1000, 0x4042)]
    );
    assert_eq!(host_state.count(message::CREATE_INTERRUPT2), 2);
}

#[test]
fn a_vf_with_another_mac_is_not_paired_and_not_retried() {
    let (_host, mut hook, slot, mut synthetic) = setup(MacAddress([0, 0x15, 0x5d, 9, 9, 9]));
    hook.step(&mut synthetic, 0);
    hook.step(&mut synthetic, 1);
    assert!(!slot.is_filled());
    assert_eq!(hook.counters().mac_mismatches, 1, "tried once");
    assert!(hook.platform().records[0].stopped.get());
    assert_eq!(hook.platform().stopped_functions, 1);
}

/// A frame from a peer to the synthetic NIC's MAC, told apart by `index`.
fn frame(index: u8) -> Vec<u8> {
    let mut frame = alloc::vec![0u8; 60];
    frame[..6].copy_from_slice(&MAC.0);
    frame[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x99]);
    frame[12..14].copy_from_slice(&[0x88, 0xb5]);
    frame[14] = index;
    frame
}

/// One receive round of the bond on the slot: the frames it got.
fn receive_round(slot: &mut VfSlot) -> Vec<Vec<u8>> {
    let mut frames = Vec::new();
    slot.receive(64, &mut |frame, _| frames.push(frame.to_vec()));
    frames
}

fn queue_on_vf(host: &Host, frames: &[Vec<u8>]) {
    let vf = host.borrow().vf.clone().expect("a VF was started");
    vf.rx.borrow_mut().extend(frames.iter().cloned());
}

/// The release messages of a VF's departure as Linux sends them: the driver stopped first,
/// one DELETE_INTERRUPT per interrupt created (with the host's mapping), RELEASE_RESOURCES.
fn assert_released(host: &Host) {
    let host = host.borrow();
    let after = host.after_bring_up();
    let kinds: Vec<u32> = after.iter().map(|(kind, _)| *kind).collect();
    assert_eq!(
        &kinds[..3],
        [
            message::DELETE_INTERRUPT,
            message::DELETE_INTERRUPT,
            message::RELEASE_RESOURCES
        ]
    );
    assert!(
        after.iter().all(|(_, stopped)| *stopped),
        "the driver stops before anything is released: {after:?}"
    );
    let deleted: Vec<(u64, u32)> = host
        .seen
        .iter()
        .filter(|(kind, _)| *kind == message::DELETE_INTERRUPT)
        .map(|(_, payload)| {
            let delete = protocol::DeleteInterrupt::read_from_prefix(payload)
                .unwrap()
                .0;
            assert_eq!(delete.wslot, WSLOT);
            (delete.interrupt.address, delete.interrupt.data)
        })
        .collect();
    assert_eq!(deleted, [(0xfee0_1000, 0x4041), (0xfee0_1000, 0x4042)]);
}

#[test]
fn an_ejected_vf_is_drained_until_the_switch_is_confirmed_then_released_and_acknowledged() {
    let (host, mut hook, mut slot, mut synthetic) = setup(MAC);
    hook.step(&mut synthetic, 0);
    synthetic.path = HostPath::Vf;
    host.borrow_mut().eject();
    hook.step(&mut synthetic, 10);
    assert_eq!(
        slot.link_state(),
        LinkState::Down,
        "the bond moves transmit off the VF"
    );
    assert!(!slot.can_transmit());
    assert_eq!(
        slot.transmit(60, &mut |_| TxMeta::default()),
        Err(DeviceError::Gone)
    );
    assert_eq!(synthetic.requests, 1, "SWITCH_DATA_PATH(synthetic) asked");

    // The host still steers to the VF until it switched: those frames are received.
    queue_on_vf(&host, &[frame(1), frame(2), frame(3)]);
    assert_eq!(receive_round(&mut slot), [frame(1), frame(2), frame(3)]);
    hook.step(&mut synthetic, 20);
    assert_eq!(receive_round(&mut slot), Vec::<Vec<u8>>::new());
    hook.step(&mut synthetic, 20 + SECOND / 2);
    assert!(
        !hook.platform().records[0].stopped.get(),
        "not confirmed yet"
    );
    assert_eq!(host.borrow().after_bring_up(), [], "nothing released yet");

    // Confirmed; one more frame was already on its way into the VF's queue.
    synthetic.path = HostPath::Synthetic;
    let confirmed = SECOND;
    hook.step(&mut synthetic, confirmed);
    queue_on_vf(&host, &[frame(4)]);
    assert_eq!(receive_round(&mut slot), [frame(4)]);
    hook.step(&mut synthetic, confirmed + DRAIN_QUIET_NS);
    assert!(
        !hook.platform().records[0].stopped.get(),
        "the VF delivered: the quiet time starts again"
    );
    assert_eq!(receive_round(&mut slot), Vec::<Vec<u8>>::new());
    hook.step(&mut synthetic, confirmed + 2 * DRAIN_QUIET_NS - 1);
    assert!(!hook.platform().records[0].stopped.get());
    hook.step(&mut synthetic, confirmed + 2 * DRAIN_QUIET_NS);
    assert!(hook.platform().records[0].stopped.get(), "no DMA in flight");
    assert_released(&host);
    assert_eq!(
        host.borrow().count(message::EJECTION_COMPLETE),
        0,
        "after the host answered the release"
    );
    hook.step(&mut synthetic, confirmed + 2 * DRAIN_QUIET_NS + 1);
    let kinds: Vec<u32> = host
        .borrow()
        .after_bring_up()
        .iter()
        .map(|(kind, _)| *kind)
        .collect();
    assert_eq!(kinds.last(), Some(&message::EJECTION_COMPLETE));
    assert_eq!(kinds.len(), 4, "nothing else sent: {kinds:x?}");
    assert_eq!(slot.link_state(), LinkState::Down, "slot empty again");
    assert_eq!(
        slot.stats().tx_frames,
        5,
        "the VF's counters stay in the slot"
    );
    let counters = hook.counters();
    assert_eq!(
        (
            counters.ejects_completed,
            counters.drained_frames,
            counters.releases,
            counters.release_timeouts,
            counters.leave_timeouts
        ),
        (1, 4, 1, 0, 0)
    );
    assert_eq!(hook.platform().stopped_functions, 1, "BAR space given back");
}

#[test]
fn an_eject_without_confirmation_is_acknowledged_after_the_bounded_wait() {
    let (host, mut hook, mut slot, mut synthetic) = setup(MAC);
    hook.step(&mut synthetic, 0);
    synthetic.path = HostPath::Vf;
    host.borrow_mut().eject();
    hook.step(&mut synthetic, 10);
    queue_on_vf(&host, &[frame(1)]);
    hook.step(&mut synthetic, 10 + LEAVE_TIMEOUT_NS - 1);
    assert_eq!(
        receive_round(&mut slot),
        [frame(1)],
        "received until the bound"
    );
    assert!(!hook.platform().records[0].stopped.get());
    assert_eq!(host.borrow().after_bring_up(), []);
    hook.step(&mut synthetic, 10 + LEAVE_TIMEOUT_NS);
    assert!(hook.platform().records[0].stopped.get());
    assert_released(&host);
    hook.step(&mut synthetic, 20 + LEAVE_TIMEOUT_NS);
    assert_eq!(host.borrow().count(message::EJECTION_COMPLETE), 1);
    assert_eq!(hook.counters().leave_timeouts, 1);
}

#[test]
fn a_host_that_does_not_answer_the_release_gets_its_ejection_complete_after_the_bound() {
    let (host, mut hook, mut slot, mut synthetic) = setup(MAC);
    hook.step(&mut synthetic, 0);
    host.borrow_mut().silent_release = true;
    host.borrow_mut().eject();
    // Already on the synthetic path: only the quiet time to wait.
    hook.step(&mut synthetic, 10);
    hook.step(&mut synthetic, 10 + DRAIN_QUIET_NS);
    assert!(
        !hook.platform().records[0].stopped.get(),
        "the bond has not asked the VF for frames since the confirmation"
    );
    assert_eq!(receive_round(&mut slot), Vec::<Vec<u8>>::new());
    let released = 20 + DRAIN_QUIET_NS;
    hook.step(&mut synthetic, released);
    assert_released(&host);
    hook.step(&mut synthetic, released + RELEASE_TIMEOUT_NS - 1);
    assert_eq!(host.borrow().count(message::EJECTION_COMPLETE), 0);
    hook.step(&mut synthetic, released + RELEASE_TIMEOUT_NS);
    assert_eq!(host.borrow().count(message::EJECTION_COMPLETE), 1);
    assert_eq!(hook.counters().release_timeouts, 1);
}

/// The host withdraws the association of the paired VF; the hook drains and releases it (by
/// `10 + DRAIN_QUIET_NS` on the hook's clock).
fn withdraw_and_release(
    host: &Host,
    hook: &mut VfHook<TestPlatform>,
    slot: &mut VfSlot,
    synthetic: &mut TestSynthetic,
) {
    hook.step(synthetic, 0);
    synthetic.events.push_back(VfEvent::Withdrawn {
        serial_number: SERIAL,
    });
    synthetic.association = Some(VfAssociation {
        allocated: false,
        serial_number: SERIAL,
    });
    hook.step(synthetic, 10);
    assert_eq!(slot.link_state(), LinkState::Down);
    assert_eq!(receive_round(slot), Vec::<Vec<u8>>::new());
    hook.step(synthetic, 10 + DRAIN_QUIET_NS);
    assert_released(host);
}

#[test]
fn a_withdrawn_association_releases_the_function_and_a_later_eject_is_acknowledged() {
    let (host, mut hook, mut slot, mut synthetic) = setup(MAC);
    withdraw_and_release(&host, &mut hook, &mut slot, &mut synthetic);
    assert_eq!(
        host.borrow().count(message::EJECTION_COMPLETE),
        0,
        "no EJECT yet"
    );
    host.borrow_mut().eject();
    hook.step(&mut synthetic, 20 + DRAIN_QUIET_NS);
    assert_eq!(host.borrow().count(message::EJECTION_COMPLETE), 1);
    assert_eq!(
        host.borrow().count(message::RELEASE_RESOURCES),
        1,
        "released once"
    );
    assert_eq!(hook.counters().ejects_completed, 1);
}

#[test]
fn an_ejection_complete_that_cannot_be_sent_is_retried_until_it_goes_out() {
    let (host, mut hook, mut slot, mut synthetic) = setup(MAC);
    withdraw_and_release(&host, &mut hook, &mut slot, &mut synthetic);
    // The EJECT arrives while the ring to the host stays full.
    host.borrow_mut().ring_full = true;
    host.borrow_mut().eject();
    let ejected_at = 20 + DRAIN_QUIET_NS;
    hook.step(&mut synthetic, ejected_at);
    let sent = |host: &Host| host.borrow().count(message::EJECTION_COMPLETE);
    assert_eq!(sent(&host), 0);
    assert_eq!(hook.counters().eject_send_failures, 1);
    hook.step(&mut synthetic, ejected_at + EJECT_RETRY_NS - 1);
    assert_eq!(
        hook.counters().eject_send_failures,
        1,
        "not tried before it is due"
    );
    hook.step(&mut synthetic, ejected_at + EJECT_RETRY_NS);
    assert_eq!(
        hook.counters().eject_send_failures,
        2,
        "tried again when due"
    );
    // Room again: the next try gets it out, once.
    host.borrow_mut().ring_full = false;
    hook.step(&mut synthetic, ejected_at + 3 * EJECT_RETRY_NS);
    assert_eq!(sent(&host), 1);
    assert_eq!(hook.counters().ejects_completed, 1);
    hook.step(&mut synthetic, ejected_at + 10 * EJECT_RETRY_NS);
    assert_eq!(sent(&host), 1);
    assert_eq!(hook.counters().eject_send_failures, 2);
}

#[test]
fn a_rescinded_vpci_channel_takes_the_vf_at_once_without_acknowledgement() {
    let (host, mut hook, slot, mut synthetic) = setup(MAC);
    hook.step(&mut synthetic, 0);
    host.borrow_mut().rescinded = true;
    hook.step(&mut synthetic, 10);
    assert!(!slot.is_filled());
    assert!(hook.platform().records[0].gone.get());
    assert_eq!(
        host.borrow().after_bring_up(),
        [],
        "nothing sent to a host gone"
    );
    assert_eq!(hook.platform().closed, [9]);
    assert_eq!(hook.counters().rescinds, 1);
    assert_eq!(hook.platform().stopped_functions, 1, "BAR space given back");
}

#[test]
fn a_rescind_while_draining_sends_nothing() {
    let (host, mut hook, mut slot, mut synthetic) = setup(MAC);
    hook.step(&mut synthetic, 0);
    synthetic.path = HostPath::Vf;
    host.borrow_mut().eject();
    hook.step(&mut synthetic, 10);
    assert_eq!(receive_round(&mut slot), Vec::<Vec<u8>>::new());
    host.borrow_mut().rescinded = true;
    synthetic.path = HostPath::Synthetic;
    hook.step(&mut synthetic, 20);
    hook.step(&mut synthetic, 20 + LEAVE_TIMEOUT_NS);
    assert!(hook.platform().records[0].gone.get());
    assert_eq!(
        host.borrow().after_bring_up(),
        [],
        "nothing sent to a host gone"
    );
    assert_eq!(hook.counters().releases, 0);
}

#[test]
fn mmio_is_carved_aligned_below_4_gib_and_reused() {
    let mut pool = MmioPool::new(&[(0xf800_1000, 0x0200_0000), (0x10_0000_0000, 1 << 30)]);
    assert_eq!(
        pool.free_bytes(),
        0x0200_0000,
        "the range above 4 GiB is left out"
    );
    let window = pool.carve(0x2000, 0x2000).unwrap();
    assert_eq!(window.start, 0xf800_2000);
    let bars = pool.carve(0x10_0000, 0x10_0000).unwrap();
    assert_eq!(bars.start % 0x10_0000, 0);
    pool.give_back(bars);
    assert_eq!(pool.carve(0x10_0000, 0x10_0000), Some(bars), "reused");
    assert!(pool.carve(1 << 30, 4096).is_none());
}

/// A synthetic NIC with Hyper-V's data-path switch, the hook behind it, and the real bond.
mod with_the_bond {
    use super::*;
    use net_stack::{Bond, BondConfig, PathId};

    const MS: u64 = 1_000_000;

    /// What the test controls and sees of the synthetic NIC's host.
    #[derive(Default)]
    struct SwitchHost {
        /// SWITCH_DATA_PATH requests, `true` = to the VF.
        requests: Vec<bool>,
        /// Completions are held back until released.
        hold: bool,
        /// A request whose completion is due.
        pending: Option<bool>,
        path: Option<HostPath>,
        events: VecDeque<VfEvent>,
        association: Option<VfAssociation>,
    }

    /// The synthetic NIC: link up, no traffic, a host that completes switches on the next
    /// poll unless held (netvsc's own switch logic is tested in netvsc-fallback).
    struct SwitchingNic(Rc<RefCell<SwitchHost>>);

    impl HostDataPath for SwitchingNic {
        fn state(&self) -> HostPath {
            self.0.borrow().path.unwrap_or(HostPath::Synthetic)
        }
        fn vf_associated(&self) -> bool {
            self.0
                .borrow()
                .association
                .is_some_and(|known| known.allocated)
        }
        fn request(&mut self, to_vf: bool) -> bool {
            let mut host = self.0.borrow_mut();
            let state = host.path.unwrap_or(HostPath::Synthetic);
            let already = if to_vf {
                matches!(state, HostPath::SwitchingToVf | HostPath::Vf)
            } else {
                matches!(state, HostPath::SwitchingToSynthetic | HostPath::Synthetic)
            };
            if already {
                return false;
            }
            host.requests.push(to_vf);
            host.pending = Some(to_vf);
            host.path = Some(if to_vf {
                HostPath::SwitchingToVf
            } else {
                HostPath::SwitchingToSynthetic
            });
            true
        }
    }

    impl SyntheticSide for SwitchingNic {
        fn take_vf_event(&mut self) -> Option<VfEvent> {
            self.0.borrow_mut().events.pop_front()
        }
        fn association(&self) -> Option<VfAssociation> {
            self.0.borrow().association
        }
        fn mac(&self) -> MacAddress {
            MAC
        }
        fn data_path(&self) -> HostPath {
            self.state()
        }
        fn request_synthetic(&mut self) {
            let _sent = self.request(false);
        }
    }

    impl NetDevice for SwitchingNic {
        fn name(&self) -> &str {
            "netvsc"
        }
        fn mac_address(&self) -> MacAddress {
            MAC
        }
        fn capabilities(&self) -> Capabilities {
            Capabilities::default()
        }
        fn link_state(&self) -> LinkState {
            LinkState::Up
        }
        fn poll(&mut self, _now_ns: u64) {
            let mut host = self.0.borrow_mut();
            if !host.hold
                && let Some(to_vf) = host.pending.take()
            {
                host.path = Some(if to_vf {
                    HostPath::Vf
                } else {
                    HostPath::Synthetic
                });
            }
        }
        fn receive(&mut self, _budget: usize, _sink: &mut dyn FnMut(&[u8], RxMeta)) -> usize {
            0
        }
        fn can_transmit(&self) -> bool {
            true
        }
        fn transmit(
            &mut self,
            _len: usize,
            _fill: &mut dyn FnMut(&mut [u8]) -> TxMeta,
        ) -> Result<(), DeviceError> {
            Ok(())
        }
        fn flush(&mut self) {}
        fn stats(&self) -> Stats {
            Stats::default()
        }
        fn stop(&mut self) {}
        fn mark_gone(&mut self) {}
        fn host_data_path(&mut self) -> Option<&mut dyn HostDataPath> {
            Some(self)
        }
    }

    #[test]
    fn the_bond_uses_the_vf_after_the_switch_and_leaves_it_before_the_eject_is_acknowledged() {
        let switch_host = Rc::new(RefCell::new(SwitchHost::default()));
        let (vpci_host, hook, slot, _) = setup(MAC);
        let nic = SwitchingNic(switch_host.clone());
        let mut bond = Bond::new(
            Box::new(HyperVNic::new(nic, hook)),
            1500,
            BondConfig::default(),
        );
        bond.attach_vf(Box::new(slot), 0).unwrap();
        bond.poll(0);
        assert_eq!(bond.active_path(), PathId::Synthetic, "empty slot");

        // Association (the vPCI bus is already offered): the VF is paired on the next poll
        // and used once the hold-down passed and the host completed SWITCH_DATA_PATH(VF).
        switch_host.borrow_mut().association = Some(VfAssociation {
            allocated: true,
            serial_number: SERIAL,
        });
        bond.poll(MS);
        assert_eq!(bond.active_path(), PathId::Synthetic, "hold-down first");
        bond.poll(100 * MS);
        assert_eq!(switch_host.borrow().requests, [true]);
        assert_eq!(bond.active_path(), PathId::Synthetic, "completion awaited");
        bond.poll(101 * MS);
        assert_eq!(bond.active_path(), PathId::Vf);

        // EJECT while the host holds its completion back: transmit off the VF at once, the
        // switch back asked, no EJECTION_COMPLETE yet; what the host still steers to the VF
        // reaches the stack.
        switch_host.borrow_mut().hold = true;
        vpci_host.borrow_mut().eject();
        queue_on_vf(&vpci_host, &[frame(1), frame(2)]);
        bond.poll(200 * MS);
        assert_eq!(bond.active_path(), PathId::Synthetic);
        assert_eq!(switch_host.borrow().requests, [true, false]);
        assert_eq!(vpci_host.borrow().count(message::EJECTION_COMPLETE), 0);
        queue_on_vf(&vpci_host, &[frame(3)]);
        bond.poll(300 * MS);
        assert_eq!(vpci_host.borrow().count(message::EJECTION_COMPLETE), 0);
        let received: Vec<Vec<u8>> = core::iter::from_fn(|| bond.pop_rx()).collect();
        assert_eq!(received, [frame(1), frame(2), frame(3)], "nothing lost");
        // The host confirms: the VF is drained once more, then stopped, released, and the
        // eject acknowledged.
        switch_host.borrow_mut().hold = false;
        queue_on_vf(&vpci_host, &[frame(4)]);
        bond.poll(400 * MS);
        assert_eq!(bond.pop_rx(), Some(frame(4)));
        // Frame 4 came after the confirmation: the quiet time counts from the next round.
        bond.poll(400 * MS + DRAIN_QUIET_NS);
        assert_eq!(vpci_host.borrow().count(message::RELEASE_RESOURCES), 0);
        bond.poll(400 * MS + 2 * DRAIN_QUIET_NS);
        assert_released(&vpci_host);
        bond.poll(401 * MS + 2 * DRAIN_QUIET_NS);
        assert_eq!(vpci_host.borrow().count(message::EJECTION_COMPLETE), 1);
        assert_eq!(bond.stats().host_data_path, Some(HostPath::Synthetic));
    }
}
