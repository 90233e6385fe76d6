//! Target `vpci`: the vPCI client (`vmbus::vpci::VpciBus`) against a scripted Hyper-V host whose
//! every answer is taken from the input — well-formed by default (a zero byte means "answer
//! honestly"), otherwise with bad statuses, truncated or garbage completions, wrong, duplicate
//! and unknown transaction ids, the wrong packet kind, silence, a busy ring, a broken ring or a
//! rescind — through bring-up (version negotiation, FDO_D0_ENTRY, BUS_RELATIONS(2)) and a
//! steady state of resource queries, BAR placement, ASSIGNED_RESOURCES, CREATE/DELETE_INTERRUPT,
//! power changes, config-window accesses, the kernel's presentation of a function to its PCI
//! layer (`guest_kernel::hyperv::vpci_vf::present_function`: enumeration and BAR sizing through
//! the window), host messages (relations with any count, EJECT, unknown types, truncated) and
//! EJECTION_COMPLETE.
//!
//! A model of the host's side decides, for every packet the client takes, what the client must
//! do with it (apply it, count it as malformed, stray or ignored), and for every call whether it
//! must succeed (the host answered its request well-formed) or fail; the client's counters,
//! function list, results and what it sent must match the model exactly.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;

use guest_kernel::hyperv::vpci_vf::{SharedVpciBus, present_function, wslot_address};
use guest_kernel::pci::AddressRange;
use net_device::RegisterIo;
use vmbus::vpci::protocol::{
    self, AssignedResources, BusRelations, CreateInterruptReply, DeviceDescription,
    DeviceDescription2, FunctionMessage, MsiRemapped, PnpId, QueryProtocolVersion,
    QueryProtocolVersionReply, ResourceRequirementsReply, message, status, version,
};
use vmbus::vpci::{BarPlacement, MAX_FUNCTIONS, VpciBus, VpciCounters, VpciEvent, VpciPort};
use vmbus::{Error, IncomingKind, IncomingPacket, OutgoingPacket, PacketError};
use zerocopy::{FromBytes, IntoBytes};

use crate::engine::{Input, Outcome, Steps, Target, check, monotonic, tracing};

/// Operations of the steady state one case runs at most.
const MAX_OPERATIONS: usize = 48;
/// Nanoseconds one wait advances the host's clock.
const WAIT_NS: u64 = 1_000_000;
/// Waits one request may take before it times out.
const TIMEOUT_WAITS: u64 = 4;
/// The config window's guest physical address.
const WINDOW_PHYS: u64 = 0xf800_0000;
/// MMIO the BARs are placed in.
const MMIO_START: u64 = 0x1_0000_0000;
/// Bytes of that MMIO.
const MMIO_LEN: u64 = 0x10_0000;
/// wslots the host's messages and the operations name (0 and 1 exist behind the window; 0x21
/// is function 1 of device 1, which the PCI layer never finds without a multi-function
/// function 0; 0x1234_5678 cannot be a wslot at all).
const WSLOTS: [u32; 5] = [0, 1, 0x21, 0xff, 0x1234_5678];
/// Functions the host really has (config space behind the window): (wslot, serial).
const DEVICES: [(u32, u32); 2] = [(0, 7), (1, 9)];
/// MMIO below 4 GiB the kernel's presentation places BARs in (the VMBus `_CRS` on Hyper-V).
const LOW_MMIO_START: u64 = 0xfe00_0000;
/// The BAR size masks the honest host reports: BAR0 64-bit 8 KiB, BAR4 64-bit 4 KiB.
const HONEST_MASKS: [u32; 6] = [0xffff_e00c, 0xffff_ffff, 0, 0, 0xffff_f00c, 0xffff_ffff];
/// Largest payload of a hostile packet.
const MAX_HOSTILE_PAYLOAD: usize = 96;
/// Most polls of the final drain (each takes up to 64 packets or reports one event).
const MAX_DRAIN_POLLS: usize = 4096;

/// How a completion answers the request it names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verdict {
    /// Well-formed success: the call must succeed.
    Good,
    /// QUERY_PROTOCOL_VERSION refused with REVISION_MISMATCH: the next version is tried.
    Mismatch,
    /// A failure status, or too short: the call must fail.
    Bad,
}

/// A function as the client must list it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Known {
    wslot: u32,
    serial: u32,
    ejecting: bool,
}

/// What the client must have done with everything it took from the host so far.
#[derive(Clone, Debug, Default)]
struct Model {
    known: Vec<Known>,
    relations_seen: bool,
    counters: VpciCounters,
    stopped: bool,
}

impl Model {
    /// Classifies an in-band host message exactly as the protocol says it must be handled.
    fn message(&mut self, payload: &[u8]) {
        let Ok((message_type, _)) = u32::read_from_prefix(payload) else {
            self.counters.malformed += 1;
            return;
        };
        match message_type {
            message::BUS_RELATIONS | message::BUS_RELATIONS2 => self.relations(payload),
            message::EJECT => {
                let Ok((eject, _)) = FunctionMessage::read_from_prefix(payload) else {
                    self.counters.malformed += 1;
                    return;
                };
                match self
                    .known
                    .iter_mut()
                    .find(|known| known.wslot == eject.wslot)
                {
                    Some(known) if !known.ejecting => {
                        known.ejecting = true;
                        self.counters.ejects += 1;
                    }
                    Some(_) => self.counters.ignored += 1,
                    None => self.counters.malformed += 1,
                }
            }
            _ => self.counters.ignored += 1,
        }
    }

    fn relations(&mut self, payload: &[u8]) {
        let Ok((header, entries)) = BusRelations::read_from_prefix(payload) else {
            self.counters.malformed += 1;
            return;
        };
        let second = header.message_type == message::BUS_RELATIONS2;
        let entry_len = if second {
            size_of::<DeviceDescription2>()
        } else {
            size_of::<DeviceDescription>()
        };
        let count = header.device_count as usize;
        if count > MAX_FUNCTIONS || count * entry_len > entries.len() {
            self.counters.malformed += 1;
            return;
        }
        let mut listed: Vec<Known> = Vec::new();
        for entry in entries.chunks(entry_len).take(count) {
            let (wslot, serial) = if second {
                let (description, _) =
                    DeviceDescription2::read_from_prefix(entry).expect("length checked");
                (description.wslot, description.serial_number)
            } else {
                let (description, _) =
                    DeviceDescription::read_from_prefix(entry).expect("length checked");
                (description.wslot, description.serial_number)
            };
            if listed.iter().any(|known| known.wslot == wslot) {
                self.counters.malformed += 1;
                return;
            }
            let ejecting = self
                .known
                .iter()
                .any(|known| known.wslot == wslot && known.ejecting);
            listed.push(Known {
                wslot,
                serial,
                ejecting,
            });
        }
        for old in &self.known {
            if old.ejecting && !listed.iter().any(|new| new.wslot == old.wslot) {
                listed.push(*old);
            }
        }
        self.known = listed;
        self.relations_seen = true;
        self.counters.relations += 1;
    }

    fn usable(&self, wslot: u32) -> bool {
        !self.stopped
            && self
                .known
                .iter()
                .any(|known| known.wslot == wslot && !known.ejecting)
    }
}

/// The first word of a message or completion: its type or status.
fn first_word(bytes: &[u8]) -> Option<u32> {
    u32::read_from_prefix(bytes).ok().map(|(value, _)| value)
}

/// The version a QUERY_PROTOCOL_VERSION asks for.
fn version_asked(request: &[u8]) -> Option<u32> {
    QueryProtocolVersion::read_from_prefix(request)
        .ok()
        .map(|(query, _)| query.protocol_version)
}

/// How `reply` answers a request of `message_type` (what the client must conclude from it).
fn verdict(message_type: u32, reply: &[u8]) -> Verdict {
    let status = first_word(reply);
    let long_enough = |len: usize| reply.len() >= len;
    match message_type {
        message::QUERY_PROTOCOL_VERSION if long_enough(8) => match status {
            Some(status::SUCCESS) => Verdict::Good,
            Some(status::REVISION_MISMATCH) => Verdict::Mismatch,
            _ => Verdict::Bad,
        },
        message::QUERY_PROTOCOL_VERSION => Verdict::Bad,
        message::QUERY_RESOURCE_REQUIREMENTS
            if long_enough(size_of::<ResourceRequirementsReply>()) && status == Some(0) =>
        {
            Verdict::Good
        }
        message::CREATE_INTERRUPT | message::CREATE_INTERRUPT2
            if long_enough(size_of::<CreateInterruptReply>()) && status == Some(0) =>
        {
            Verdict::Good
        }
        message::QUERY_RESOURCE_REQUIREMENTS
        | message::CREATE_INTERRUPT
        | message::CREATE_INTERRUPT2 => Verdict::Bad,
        _ if status == Some(0) => Verdict::Good,
        _ => Verdict::Bad,
    }
}

/// A packet for the guest.
#[derive(Clone, Debug)]
struct ToGuest {
    kind: Kind,
    transaction: u64,
    payload: Vec<u8>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    InBand,
    Completion,
    /// A kind the vPCI channel never carries (GPA direct).
    Unexpected,
}

/// A request of the guest waiting for its completion.
#[derive(Clone, Debug)]
struct InFlight {
    transaction: u64,
    message_type: u32,
    request: Vec<u8>,
}

/// A completion that answered the request of the current call.
#[derive(Clone, Debug)]
struct Answer {
    message_type: u32,
    request: Vec<u8>,
    reply: Vec<u8>,
    verdict: Verdict,
}

/// A function behind the config window.
struct Device {
    wslot: u32,
    config: Box<[u32; 1024]>,
}

/// The scripted host: its answers come from the input.
struct Host<'a> {
    input: Input<'a>,
    /// Versions up to this one are accepted (0: none).
    highest_version: u32,
    devices: Vec<Device>,
    to_guest: VecDeque<ToGuest>,
    /// Every packet the guest sent: (message type, transaction, completion requested, payload).
    sent: Vec<(u32, u64, bool, Vec<u8>)>,
    in_flight: Option<InFlight>,
    /// Completions that answered the current call's requests, in order.
    answers: Vec<Answer>,
    /// Version of the QUERY_PROTOCOL_VERSION that was answered with success.
    negotiated: Option<u32>,
    /// Distinct requests (transaction ids) the guest tried to send.
    requests: u64,
    last_request: Option<u64>,
    /// Sends refused as "ring full" still to come.
    busy: u32,
    /// Every receive fails (a corrupt ring).
    broken: bool,
    rescinded: bool,
    clock: u64,
    waits: u64,
    receives: u64,
    sends: u64,
    /// The host deviated from a well-formed answer at least once.
    lied: bool,
    model: Model,
    /// The window's slot select.
    selected: u32,
    /// Window accesses outside the window or misaligned.
    violations: Vec<String>,
}

type Shared<'a> = Rc<RefCell<Host<'a>>>;

fn config_of(wslot: u32) -> Box<[u32; 1024]> {
    let mut config = Box::new([0u32; 1024]);
    config[0] = 0x00ba_1414 ^ (wslot << 16);
    config[1] = 0x0010_0000;
    config[4] = 0xc;
    config[8] = 0xc;
    config
}

/// What config dword `index` holds after a write of `width` bytes at `offset` (only its low two
/// bits matter): the bytes written, and of a BAR only the bits its size lets the device decode
/// (what BAR sizing reads back; the low halves' type bits are read-only).
fn written(index: usize, old: u32, offset: usize, width: usize, value: u32) -> u32 {
    let shift = (offset % 4) * 8;
    let lanes = if width == 4 {
        u32::MAX
    } else {
        ((1u32 << (width * 8)) - 1) << shift
    };
    let merged = (old & !lanes) | ((value << shift) & lanes);
    match index {
        4 | 8 => {
            let mask = HONEST_MASKS[index - 4];
            (merged & mask & !0xf) | (mask & 0xf)
        }
        5..=9 => merged & HONEST_MASKS[index - 4],
        _ => merged,
    }
}

fn relations_message(second: bool, functions: &[(u32, u32)]) -> Vec<u8> {
    let mut bytes = BusRelations {
        message_type: if second {
            message::BUS_RELATIONS2
        } else {
            message::BUS_RELATIONS
        },
        device_count: functions.len() as u32,
    }
    .as_bytes()
    .to_vec();
    for &(wslot, serial) in functions {
        let pnp_id = PnpId {
            vendor_id: 0x1414,
            device_id: 0x00ba,
            revision_id: 1,
            prog_if: 0,
            sub_class: 0,
            base_class: 2,
            sub_vendor_id: 0,
            sub_system_id: 0,
        };
        if second {
            bytes.extend_from_slice(
                DeviceDescription2 {
                    pnp_id,
                    wslot,
                    serial_number: serial,
                    flags: 1,
                    numa_node: 0,
                    reserved: 0,
                }
                .as_bytes(),
            );
        } else {
            bytes.extend_from_slice(
                DeviceDescription {
                    pnp_id,
                    wslot,
                    serial_number: serial,
                }
                .as_bytes(),
            );
        }
    }
    bytes
}

impl Host<'_> {
    fn trace(&self, what: &str) {
        if tracing() {
            println!("vpci host: {what}");
        }
    }

    fn queue(&mut self, kind: Kind, transaction: u64, payload: Vec<u8>) {
        self.to_guest.push_back(ToGuest {
            kind,
            transaction,
            payload,
        });
    }

    /// BUS_RELATIONS(2) listing the functions the host really has.
    fn honest_relations(&self) -> Vec<u8> {
        let second = self
            .negotiated
            .is_some_and(|version| version >= version::V1_3);
        relations_message(second, &DEVICES)
    }

    /// The well-formed completion of a request.
    fn honest_reply(&self, message_type: u32, request: &[u8]) -> Vec<u8> {
        match message_type {
            message::QUERY_PROTOCOL_VERSION => {
                let asked = version_asked(request).unwrap_or(0);
                QueryProtocolVersionReply {
                    status: if asked <= self.highest_version {
                        status::SUCCESS
                    } else {
                        status::REVISION_MISMATCH
                    },
                    protocol_version: self.highest_version,
                }
                .as_bytes()
                .to_vec()
            }
            message::QUERY_RESOURCE_REQUIREMENTS => ResourceRequirementsReply {
                status: 0,
                bar_masks: HONEST_MASKS,
            }
            .as_bytes()
            .to_vec(),
            message::CREATE_INTERRUPT | message::CREATE_INTERRUPT2 => {
                let vector = request.get(8).copied().unwrap_or(0);
                CreateInterruptReply {
                    status: 0,
                    reserved: 0,
                    interrupt: MsiRemapped {
                        reserved: 0,
                        message_count: 1,
                        data: u32::from(vector),
                        address: 0xfee0_0000,
                    },
                }
                .as_bytes()
                .to_vec()
            }
            _ => 0u32.to_le_bytes().to_vec(),
        }
    }

    /// A reply to `message_type` that lies in some way (it may still happen to be well-formed).
    fn hostile_reply(&mut self, message_type: u32, request: &[u8]) -> Vec<u8> {
        let mut reply = self.honest_reply(message_type, request);
        match self.input.below(5) {
            0 => {
                let bad = match self.input.below(3) {
                    0 => status::REVISION_MISMATCH,
                    1 => 0xc000_0001,
                    _ => self.input.u32(),
                };
                reply[..4].copy_from_slice(&bad.to_le_bytes());
            }
            1 => {
                let len = self.input.below(reply.len());
                reply.truncate(len);
            }
            2 => reply.extend_from_slice(self.input.bytes(16)),
            3 => reply = self.input.bytes(40).to_vec(),
            _ => {
                for _ in 0..1 + self.input.below(3) {
                    let at = self.input.below(reply.len().max(1));
                    if let Some(byte) = reply.get_mut(at) {
                        *byte = self.input.u8();
                    }
                }
            }
        }
        reply
    }

    /// A host → guest message: relations (with lies or not), EJECT, an unknown type, or bytes.
    fn hostile_message(&mut self) -> Vec<u8> {
        let mut bytes = match self.input.below(6) {
            0 | 1 => {
                let count = self.input.below(4);
                let mut functions = Vec::new();
                for _ in 0..count {
                    let wslot = WSLOTS[self.input.below(WSLOTS.len())];
                    functions.push((wslot, u32::from(self.input.u8())));
                }
                let mut bytes = relations_message(self.input.bool(), &functions);
                match self.input.below(6) {
                    0 => {
                        // A count past the packet (huge or just a few more).
                        let lie = match self.input.below(4) {
                            0 => u32::MAX,
                            1 => 0x1000_0000,
                            2 => MAX_FUNCTIONS as u32 + 1,
                            _ => count as u32 + 1 + self.input.below(4) as u32,
                        };
                        bytes[4..8].copy_from_slice(&lie.to_le_bytes());
                    }
                    1 => {
                        let len = self.input.below(bytes.len());
                        bytes.truncate(len);
                    }
                    _ => {}
                }
                bytes
            }
            2 => FunctionMessage {
                message_type: message::EJECT,
                wslot: WSLOTS[self.input.below(WSLOTS.len())],
            }
            .as_bytes()
            .to_vec(),
            3 => {
                let message_type = match self.input.below(3) {
                    0 => message::INVALIDATE_BLOCK,
                    1 => message::QUERY_RESOURCE_REQUIREMENTS,
                    _ => self.input.u32(),
                };
                let mut bytes = message_type.to_le_bytes().to_vec();
                bytes.extend_from_slice(self.input.bytes(32));
                bytes
            }
            _ => self.input.bytes(MAX_HOSTILE_PAYLOAD).to_vec(),
        };
        if self.input.below(4) == 0 {
            // A few bytes overwritten.
            for _ in 0..1 + self.input.below(3) {
                let at = self.input.below(bytes.len().max(1));
                if let Some(byte) = bytes.get_mut(at) {
                    *byte = self.input.u8();
                }
            }
        }
        bytes
    }

    /// Queues `count` hostile host packets: messages, completions for nothing, odd kinds.
    fn inject(&mut self, count: usize) {
        self.lied = true;
        for _ in 0..count {
            match self.input.below(8) {
                0 => {
                    let transaction = self.stray_transaction();
                    let payload = self.input.bytes(40).to_vec();
                    self.queue(Kind::Completion, transaction, payload);
                }
                1 => {
                    let payload = self.input.bytes(32).to_vec();
                    self.queue(Kind::Unexpected, 0, payload);
                }
                _ => {
                    let payload = self.hostile_message();
                    let transaction = self.input.u64();
                    self.queue(Kind::InBand, transaction, payload);
                }
            }
        }
    }

    /// A transaction id no request in flight carries: an old one, zero, or any.
    fn stray_transaction(&mut self) -> u64 {
        let in_flight = self.in_flight.as_ref().map(|request| request.transaction);
        let candidate = match self.input.below(3) {
            0 => self
                .last_request
                .unwrap_or(0)
                .wrapping_sub(1 + self.input.below(3) as u64),
            1 => 0,
            _ => self.input.u64(),
        };
        if Some(candidate) == in_flight {
            candidate.wrapping_add(0x1_0000)
        } else {
            candidate
        }
    }

    /// The host's reaction to a packet the guest sent.
    fn on_send(&mut self, packet: &OutgoingPacket<'_>) -> Result<(), Error> {
        let transaction = packet.transaction_id;
        if packet.completion_requested && self.last_request != Some(transaction) {
            self.requests += 1;
            self.last_request = Some(transaction);
        }
        if self.busy > 0 {
            self.busy -= 1;
            return Err(Error::RingFull {
                needed: 64,
                free: 0,
            });
        }
        let mut payload = Vec::new();
        for piece in packet.payload {
            payload.extend_from_slice(piece);
        }
        let message_type = first_word(&payload).unwrap_or(u32::MAX);
        // 0 (and every read past the input's end) answers honestly.
        let action = self.input.below(32);
        if action == 12 && packet.completion_requested {
            self.busy = 1 + self.input.below(3) as u32;
            self.lied = true;
            self.trace(&format!("busy for {message_type:#x}"));
            self.busy -= 1;
            return Err(Error::RingFull {
                needed: 64,
                free: 0,
            });
        }
        self.sent.push((
            message_type,
            transaction,
            packet.completion_requested,
            payload.clone(),
        ));
        if packet.completion_requested {
            self.in_flight = Some(InFlight {
                transaction,
                message_type,
                request: payload.clone(),
            });
        }
        self.trace(&format!(
            "guest sent {message_type:#x} (transaction {transaction}), action {action}"
        ));
        let honest_extras = |host: &mut Self| {
            if message_type == message::FDO_D0_ENTRY || message_type == message::QUERY_BUS_RELATIONS
            {
                let relations = host.honest_relations();
                host.queue(Kind::InBand, 0, relations);
            }
        };
        if !packet.completion_requested {
            match action {
                13..=15 => {
                    let count = 1 + self.input.below(3);
                    self.inject(count);
                }
                16 | 17 => self.lied = true,
                _ => honest_extras(self),
            }
            return Ok(());
        }
        match action {
            // A hostile reply (which may lie about status, length or content).
            13 | 14 => {
                self.lied = true;
                honest_extras(self);
                let reply = self.hostile_reply(message_type, &payload);
                self.queue(Kind::Completion, transaction, reply);
            }
            // Host messages first, then the honest answer.
            15 | 16 => {
                let count = 1 + self.input.below(3);
                self.inject(count);
                honest_extras(self);
                let reply = self.honest_reply(message_type, &payload);
                self.queue(Kind::Completion, transaction, reply);
            }
            // A completion with the wrong id (or for nothing), then the right one.
            17 => {
                self.lied = true;
                let stray = self.stray_transaction();
                let reply = self.honest_reply(message_type, &payload);
                self.queue(Kind::Completion, stray, reply.clone());
                honest_extras(self);
                self.queue(Kind::Completion, transaction, reply);
            }
            // The answer twice.
            18 => {
                self.lied = true;
                honest_extras(self);
                let reply = self.honest_reply(message_type, &payload);
                self.queue(Kind::Completion, transaction, reply.clone());
                self.queue(Kind::Completion, transaction, reply);
            }
            // The answer as the wrong packet kind (it is no completion), nothing else.
            19 => {
                self.lied = true;
                let reply = self.honest_reply(message_type, &payload);
                let kind = if self.input.bool() {
                    Kind::InBand
                } else {
                    Kind::Unexpected
                };
                self.queue(kind, transaction, reply);
            }
            // Silence.
            20 => self.lied = true,
            // The ring breaks.
            21 => {
                self.lied = true;
                self.broken = true;
            }
            // The channel is rescinded.
            22 => {
                self.lied = true;
                self.rescinded = true;
            }
            _ => {
                honest_extras(self);
                let reply = self.honest_reply(message_type, &payload);
                self.queue(Kind::Completion, transaction, reply);
            }
        }
        Ok(())
    }

    /// The host's half of delivering `packet`: what the client must make of it.
    fn on_deliver(&mut self, packet: &ToGuest) {
        match packet.kind {
            Kind::Completion => {
                let answers_in_flight = self
                    .in_flight
                    .as_ref()
                    .is_some_and(|request| request.transaction == packet.transaction);
                if answers_in_flight {
                    let request = self.in_flight.take().expect("checked");
                    let verdict = verdict(request.message_type, &packet.payload);
                    if request.message_type == message::QUERY_PROTOCOL_VERSION
                        && verdict == Verdict::Good
                    {
                        self.negotiated = version_asked(&request.request);
                    }
                    self.answers.push(Answer {
                        message_type: request.message_type,
                        request: request.request,
                        reply: packet.payload.clone(),
                        verdict,
                    });
                } else {
                    self.model.counters.stray_completions += 1;
                }
            }
            Kind::InBand => self.model.message(&packet.payload),
            Kind::Unexpected => self.model.counters.malformed += 1,
        }
    }

    fn device(&self, wslot: u32) -> Option<&Device> {
        self.devices.iter().find(|device| device.wslot == wslot)
    }

    /// What the window reads for `wslot` at config `offset` (all-ones with no function).
    fn config_value(&self, wslot: u32, offset: usize) -> u32 {
        self.device(wslot)
            .and_then(|device| device.config.get(offset / 4).copied())
            .unwrap_or(u32::MAX)
    }
}

/// The guest's side of the channel.
struct Port<'a>(Shared<'a>);

impl VpciPort for Port<'_> {
    fn send(&mut self, packet: &OutgoingPacket<'_>) -> Result<(), Error> {
        let mut host = self.0.borrow_mut();
        host.sends += 1;
        host.on_send(packet)
    }

    fn receive<'b>(
        &mut self,
        buffer: &'b mut Vec<u8>,
    ) -> Result<Option<IncomingPacket<'b>>, Error> {
        let mut host = self.0.borrow_mut();
        host.receives += 1;
        if host.broken {
            return Err(Error::MalformedPacket(PacketError::Truncated));
        }
        let Some(packet) = host.to_guest.pop_front() else {
            return Ok(None);
        };
        host.on_deliver(&packet);
        buffer.clear();
        buffer.extend_from_slice(&packet.payload);
        let kind = match packet.kind {
            Kind::InBand => IncomingKind::InBand,
            Kind::Completion => IncomingKind::Completion,
            Kind::Unexpected => IncomingKind::GpaDirect {
                range_count: 1,
                range_bytes: &[],
            },
        };
        Ok(Some(IncomingPacket {
            kind,
            transaction_id: packet.transaction,
            completion_requested: false,
            payload: buffer,
        }))
    }

    fn now_ns(&mut self) -> u64 {
        self.0.borrow().clock
    }

    fn wait(&mut self, deadline_ns: u64) {
        let mut host = self.0.borrow_mut();
        host.waits += 1;
        host.clock = deadline_ns.min(host.clock + WAIT_NS).max(host.clock);
    }

    fn is_rescinded(&mut self) -> bool {
        self.0.borrow().rescinded
    }
}

/// The config window: page 0 selects the slot, page 1 is that function's config space.
struct Window<'a>(Shared<'a>);

impl Window<'_> {
    /// The selected function's config dword index for an access of `width` at `offset`.
    fn index(&self, offset: usize, width: usize, what: &str) -> Option<usize> {
        let config = offset.checked_sub(protocol::WINDOW_CONFIG_SPACE);
        match config {
            Some(config) if config + width <= 0x1000 && offset.is_multiple_of(width) => {
                Some(config / 4)
            }
            _ => {
                self.0.borrow_mut().violations.push(format!(
                    "{what} of {width} bytes at window offset {offset:#x}"
                ));
                None
            }
        }
    }

    fn update(&self, offset: usize, width: usize, value: u32) {
        let Some(index) = self.index(offset, width, "write") else {
            return;
        };
        let mut host = self.0.borrow_mut();
        let selected = host.selected;
        if let Some(device) = host
            .devices
            .iter_mut()
            .find(|device| device.wslot == selected)
        {
            let slot = &mut device.config[index];
            *slot = written(index, *slot, offset, width, value);
        }
    }
}

impl RegisterIo for Window<'_> {
    fn read32(&self, offset: usize) -> u32 {
        let Some(index) = self.index(offset, 4, "read") else {
            return 0;
        };
        let host = self.0.borrow();
        host.config_value(host.selected, index * 4)
    }

    fn write32(&self, offset: usize, value: u32) {
        if offset == protocol::WINDOW_SLOT_SELECT {
            self.0.borrow_mut().selected = value;
        } else {
            self.update(offset, 4, value);
        }
    }

    fn read16(&self, offset: usize) -> u16 {
        self.0
            .borrow_mut()
            .violations
            .push(format!("16-bit read at {offset:#x}"));
        0
    }

    fn write16(&self, offset: usize, value: u16) {
        self.update(offset, 2, u32::from(value));
    }

    fn read8(&self, offset: usize) -> u8 {
        self.0
            .borrow_mut()
            .violations
            .push(format!("8-bit read at {offset:#x}"));
        0
    }

    fn write8(&self, offset: usize, value: u8) {
        self.update(offset, 1, u32::from(value));
    }

    fn len(&self) -> usize {
        protocol::WINDOW_LEN
    }
}

type Bus<'a> = VpciBus<Port<'a>, Window<'a>>;
type SharedBus<'a> = SharedVpciBus<Port<'a>, Window<'a>>;

fn figures(counters: &VpciCounters) -> [(&'static str, u64); 7] {
    [
        ("requests", counters.requests),
        ("relations", counters.relations),
        ("ejects", counters.ejects),
        ("ejections_completed", counters.ejections_completed),
        ("malformed", counters.malformed),
        ("stray_completions", counters.stray_completions),
        ("ignored", counters.ignored),
    ]
}

/// How far a case got (what the seeds must reach).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Progress {
    /// The probe succeeded.
    probed: bool,
    /// ASSIGNED_RESOURCES(2) succeeded for a function.
    assigned: bool,
    /// The kernel presented a function to its PCI layer (enumerated, BARs placed, assigned).
    presented: bool,
    /// CREATE_INTERRUPT(2) succeeded.
    interrupt: bool,
    /// A config read through the window succeeded.
    config_read: bool,
    /// An EJECT was acknowledged with EJECTION_COMPLETE.
    eject_completed: bool,
}

/// Fails unless the client's counters, functions and the host's record agree with the model.
fn check_model(bus: &Bus<'_>, host: &Shared<'_>) -> Outcome {
    let host = host.borrow();
    let actual = bus.counters();
    let expected = host.model.counters;
    let ejections_sent = host
        .sent
        .iter()
        .filter(|(kind, ..)| *kind == message::EJECTION_COMPLETE)
        .count() as u64;
    let pairs = [
        ("requests", actual.requests, host.requests),
        ("relations", actual.relations, expected.relations),
        ("ejects", actual.ejects, expected.ejects),
        (
            "ejections_completed",
            actual.ejections_completed,
            ejections_sent,
        ),
        ("malformed", actual.malformed, expected.malformed),
        (
            "stray_completions",
            actual.stray_completions,
            expected.stray_completions,
        ),
        ("ignored", actual.ignored, expected.ignored),
    ];
    for (name, actual, expected) in pairs {
        check(actual == expected, || {
            format!("counter {name} is {actual}, the host's packets make it {expected}")
        })?;
    }
    let mut listed: Vec<Known> = bus
        .functions()
        .iter()
        .map(|function| Known {
            wslot: function.wslot,
            serial: function.serial_number,
            ejecting: function.ejecting,
        })
        .collect();
    let mut known = host.model.known.clone();
    listed.sort();
    known.sort();
    check(listed == known, || {
        format!("functions {listed:x?}, the host's relations and EJECTs make them {known:x?}")
    })?;
    check(host.violations.is_empty(), || {
        format!("config window misused: {:?}", host.violations)
    })
}

/// Starts a call: forgets the last call's answers.
fn begin(host: &Shared<'_>) -> (usize, u64) {
    let mut host = host.borrow_mut();
    host.answers.clear();
    (host.sent.len(), host.waits)
}

/// Ends a call: no request is waiting any more, so a late completion is stray. Checks the wait
/// bound: at most the call's requests (+1 for a relations wait) times the timeout.
fn end(host: &Shared<'_>, start: (usize, u64), requests_before: u64) -> Outcome {
    let mut host = host.borrow_mut();
    host.in_flight = None;
    let waits = host.waits - start.1;
    let requests = host.requests - requests_before;
    check(waits <= (requests + 1) * (TIMEOUT_WAITS + 1), || {
        format!("{waits} waits for {requests} request(s)")
    })
}

/// The verdict of the last answer, if the current call's request was answered at all.
fn last_verdict(host: &Shared<'_>) -> Option<Verdict> {
    host.borrow().answers.last().map(|answer| answer.verdict)
}

/// Checks a request-based call on `wslot`: refused without sending when the function is not
/// usable, otherwise successful exactly when its request got a well-formed answer.
fn check_request<T>(
    what: &str,
    host: &Shared<'_>,
    usable: bool,
    sent_before: usize,
    result: &Result<T, Error>,
) -> Outcome {
    let sent_now = host.borrow().sent.len();
    if !usable {
        check(result.is_err(), || {
            format!("{what} on an unusable function succeeded")
        })?;
        return check(sent_now == sent_before, || {
            format!("{what} on an unusable function sent a request")
        });
    }
    let answered_well = last_verdict(host) == Some(Verdict::Good);
    check(result.is_ok() == answered_well, || {
        format!(
            "{what}: result {:?}, but the host's answer was {:?}",
            result.as_ref().err(),
            last_verdict(host)
        )
    })
}

/// Checks BAR placements: inside `[start, start + MMIO_LEN)`, naturally aligned powers of two,
/// no overlap.
fn check_placements(masks: &[u32; 6], bars: &[BarPlacement; 6], start: u64) -> Outcome {
    let end = start + MMIO_LEN;
    for (index, bar) in bars.iter().enumerate() {
        if bar.len == 0 {
            continue;
        }
        check(bar.len.is_power_of_two(), || {
            format!("BAR{index} of {:#x} bytes (masks {masks:x?})", bar.len)
        })?;
        check(bar.address.is_multiple_of(bar.len), || {
            format!(
                "BAR{index} at {:#x} not aligned to its {:#x} bytes (masks {masks:x?})",
                bar.address, bar.len
            )
        })?;
        check(
            bar.address >= start && bar.address.checked_add(bar.len).is_some_and(|e| e <= end),
            || {
                format!(
                    "BAR{index} at {:#x}+{:#x} outside the range",
                    bar.address, bar.len
                )
            },
        )?;
        for (other_index, other) in bars.iter().enumerate().skip(index + 1) {
            if other.len != 0 {
                check(
                    bar.address + bar.len <= other.address
                        || other.address + other.len <= bar.address,
                    || format!("BAR{index} and BAR{other_index} overlap"),
                )?;
            }
        }
    }
    Ok(())
}

fn pick_wslot(host: &Shared<'_>) -> u32 {
    let mut host = host.borrow_mut();
    WSLOTS[host.input.below(WSLOTS.len())]
}

fn read_below(host: &Shared<'_>, bound: usize) -> usize {
    host.borrow_mut().input.below(bound)
}

/// QUERY_RESOURCE_REQUIREMENTS, BAR placement and ASSIGNED_RESOURCES(2) for `wslot`.
fn resources(
    bus: &SharedBus<'_>,
    host: &Shared<'_>,
    wslot: u32,
    progress: &mut Progress,
) -> Outcome {
    let usable = host.borrow().model.usable(wslot);
    let requests = host.borrow().requests;
    let start = begin(host);
    let result = bus.borrow_mut().resource_requirements(wslot);
    end(host, start, requests)?;
    check_request(
        "QUERY_RESOURCE_REQUIREMENTS",
        host,
        usable,
        start.0,
        &result,
    )?;
    let Ok(masks) = result else {
        return Ok(());
    };
    let reply = host
        .borrow()
        .answers
        .last()
        .expect("answered")
        .reply
        .clone();
    let (told, _) =
        ResourceRequirementsReply::read_from_prefix(&reply).expect("judged long enough");
    check(masks == told.bar_masks, || {
        format!("masks {masks:x?}, the host said {:x?}", told.bar_masks)
    })?;
    let Ok(bars) = vmbus::vpci::place_bars(&masks, MMIO_START, MMIO_LEN) else {
        return Ok(());
    };
    check_placements(&masks, &bars, MMIO_START)?;
    let usable = host.borrow().model.usable(wslot);
    let requests = host.borrow().requests;
    let start = begin(host);
    let result = bus.borrow_mut().assign_resources(wslot, &bars);
    end(host, start, requests)?;
    check_request("ASSIGNED_RESOURCES", host, usable, start.0, &result)?;
    if result.is_ok() {
        let host = host.borrow();
        let answer = host.answers.last().expect("answered");
        let expected_type = if bus.borrow().version() >= version::V1_2 {
            message::ASSIGNED_RESOURCES2
        } else {
            message::ASSIGNED_RESOURCES
        };
        let (assigned, _) =
            AssignedResources::read_from_prefix(&answer.request).map_err(|_| "short request")?;
        check(
            answer.message_type == expected_type && assigned.wslot == wslot,
            || {
                format!(
                    "resources sent as {:#x} for {:#x}",
                    answer.message_type, assigned.wslot
                )
            },
        )?;
        for (index, bar) in bars.iter().enumerate() {
            check(
                assigned.mmio_resources[index] == protocol::memory_descriptor(bar.address, bar.len),
                || format!("BAR{index} described wrongly to the host"),
            )?;
        }
        progress.assigned = true;
    }
    Ok(())
}

/// CREATE_INTERRUPT(2) for `wslot`, then maybe DELETE_INTERRUPT.
fn interrupts(
    bus: &SharedBus<'_>,
    host: &Shared<'_>,
    wslot: u32,
    progress: &mut Progress,
) -> Outcome {
    let (vector, processors) = {
        let mut host = host.borrow_mut();
        let vector = host.input.u8().wrapping_add(0x30);
        // Zero (past the input's end) means one processor, number 0.
        let count = match host.input.below(8) {
            7 => [0, 33, 32][host.input.below(3)],
            other => 1 + other,
        };
        let processors: Vec<u16> = (0..count)
            .map(|_| match host.input.below(4) {
                3 => host.input.u16(),
                other => other as u16,
            })
            .collect();
        (vector, processors)
    };
    let arguments_valid = (1..=32).contains(&processors.len())
        && (bus.borrow().version() >= version::V1_2 || processors.iter().all(|&cpu| cpu < 64));
    let usable = host.borrow().model.usable(wslot) && arguments_valid;
    let requests = host.borrow().requests;
    let start = begin(host);
    let result = bus
        .borrow_mut()
        .create_interrupt(wslot, vector, &processors);
    end(host, start, requests)?;
    check_request("CREATE_INTERRUPT", host, usable, start.0, &result)?;
    let Ok(mapping) = result else {
        return Ok(());
    };
    let granted = {
        let host = host.borrow();
        let reply = &host.answers.last().expect("answered").reply;
        CreateInterruptReply::read_from_prefix(reply)
            .expect("judged long enough")
            .0
            .interrupt
    };
    check(
        mapping.address == granted.address && mapping.data == granted.data,
        || "the mapping returned is not the host's".into(),
    )?;
    progress.interrupt = true;
    if read_below(host, 2) == 0 {
        let usable = host.borrow().model.usable(wslot);
        let requests = host.borrow().requests;
        let start = begin(host);
        let result = bus.borrow_mut().delete_interrupt(wslot, &mapping);
        end(host, start, requests)?;
        check_request("DELETE_INTERRUPT", host, usable, start.0, &result)?;
        if let Some(answer) = host.borrow().answers.last() {
            check(
                answer.request.get(8..24) == Some(granted.as_bytes()),
                || "DELETE_INTERRUPT named another mapping than the host granted".into(),
            )?;
        }
    }
    Ok(())
}

/// The kernel's presentation of `wslot` (`guest_kernel::hyperv::vpci_vf::present_function`):
/// QUERY_RESOURCE_REQUIREMENTS, the PCI layer's enumeration and BAR sizing through the
/// window, placement in MMIO below 4 GiB, ASSIGNED_RESOURCES(2).
fn present(bus: &SharedBus<'_>, host: &Shared<'_>, wslot: u32, progress: &mut Progress) -> Outcome {
    let (usable, uncertain, enumerable) = {
        let host = host.borrow();
        (
            host.model.usable(wslot),
            host.rescinded || host.broken,
            // Found by the PCI layer's scan: a function 0 behind the window.
            host.device(wslot).is_some() && wslot < 0x20,
        )
    };
    let mmio = AddressRange::from_start_size(LOW_MMIO_START, MMIO_LEN).expect("valid range");
    let requests = host.borrow().requests;
    let start = begin(host);
    let result = present_function(bus, wslot, mmio);
    end(host, start, requests)?;
    let host_state = host.borrow();
    let verdicts: Vec<Verdict> = host_state.answers.iter().map(|a| a.verdict).collect();
    let expected = usable && enumerable && verdicts == [Verdict::Good, Verdict::Good];
    check(
        result.is_ok() == expected || (uncertain && result.is_err()),
        || {
            format!(
                "present_function({wslot:#x}): {:?}, usable {usable}, enumerable {enumerable}, answers {verdicts:?}",
                result.as_ref().err()
            )
        },
    )?;
    if !usable {
        check(host_state.sent.len() == start.0, || {
            "presenting an unusable function sent a request".into()
        })?;
    }
    let Ok(presented) = result else {
        return Ok(());
    };
    check(presented.address == wslot_address(wslot), || {
        format!("presented at {:?}", presented.address)
    })?;
    check_placements(&HONEST_MASKS, &presented.bars, LOW_MMIO_START)?;
    let answer = host_state.answers.last().expect("answered");
    let (assigned, _) =
        AssignedResources::read_from_prefix(&answer.request).map_err(|_| "short request")?;
    for (index, bar) in presented.bars.iter().enumerate() {
        check(
            assigned.mmio_resources[index] == protocol::memory_descriptor(bar.address, bar.len),
            || format!("BAR{index} of the presented function described wrongly to the host"),
        )?;
    }
    progress.presented = true;
    Ok(())
}

/// A config access through the window (bus calls and the `ConfigSpace` register block).
fn config_access(
    bus: &SharedBus<'_>,
    host: &Shared<'_>,
    wslot: u32,
    progress: &mut Progress,
) -> Outcome {
    let (offset, access, value) = {
        let mut host = host.borrow_mut();
        let offset = match host.input.below(4) {
            0 => 4 * host.input.below(64),
            1 => host.input.below(0x1000),
            2 => 0xff8 + host.input.below(16),
            _ => usize::from(host.input.u16()),
        };
        (offset, host.input.below(6), host.input.u32())
    };
    let (usable, uncertain) = {
        let host = host.borrow();
        (host.model.usable(wslot), host.rescinded || host.broken)
    };
    let width = [4, 4, 2, 1, 2, 1][access];
    let in_page = offset.is_multiple_of(width) && offset + width <= 0x1000;
    let before = host.borrow().config_value(wslot, offset & !3);
    let result: Result<Option<u32>, Error> = match access {
        0 => bus.borrow().config_read32(wslot, offset).map(Some),
        1 => bus
            .borrow()
            .config_write32(wslot, offset, value)
            .map(|()| None),
        2 => bus
            .borrow()
            .config_write16(wslot, offset, value as u16)
            .map(|()| None),
        3 => bus
            .borrow()
            .config_write8(wslot, offset, value as u8)
            .map(|()| None),
        // The register block the PCI layer walks: reads of a gone function are all-ones.
        4 => match bus.borrow().config_space(wslot) {
            Ok(space) => Ok(Some(u32::from(space.read16(offset & !1)))),
            Err(error) => Err(error),
        },
        _ => match bus.borrow().config_space(wslot) {
            Ok(space) => Ok(Some(u32::from(space.read8(offset)))),
            Err(error) => Err(error),
        },
    };
    if access >= 4 {
        // `config_space` itself only asks whether the function is usable.
        if !uncertain {
            check(result.is_ok() == usable, || {
                format!("config_space({wslot:#x}): {result:?}, usable {usable}")
            })?;
        }
        if let Ok(Some(read)) = result {
            let dword_offset = if access == 4 {
                offset & !3 & !1
            } else {
                offset & !3
            };
            let dword = if dword_offset + 4 <= 0x1000 {
                host.borrow().config_value(wslot, dword_offset)
            } else {
                u32::MAX
            };
            let expected = if access == 4 {
                (dword >> (((offset & !1) & 2) * 8)) & 0xffff
            } else {
                (dword >> ((offset & 3) * 8)) & 0xff
            };
            check(read == expected, || {
                format!(
                    "config space read {read:#x} at {offset:#x}, the function holds {expected:#x}"
                )
            })?;
            progress.config_read = true;
        }
        return Ok(());
    }
    if !uncertain {
        check(result.is_ok() == (usable && in_page), || {
            format!(
                "config access {access} at {offset:#x} of {wslot:#x}: {result:?}, usable {usable}"
            )
        })?;
    } else if result.is_ok() {
        check(in_page, || {
            format!("config access outside the page at {offset:#x} accepted")
        })?;
    }
    match result {
        Ok(Some(read)) => {
            check(read == before, || {
                format!("config read {read:#x}, the function holds {before:#x}")
            })?;
            progress.config_read = true;
        }
        Ok(None) => {
            let after = host.borrow().config_value(wslot, offset & !3);
            if host.borrow().device(wslot).is_some() {
                let expected = written(offset / 4, before, offset, width, value);
                check(after == expected, || {
                    format!("config write at {offset:#x} left {after:#x}, not {expected:#x}")
                })?;
            }
        }
        Err(_) => {
            let after = host.borrow().config_value(wslot, offset & !3);
            check(after == before, || {
                "a refused config write changed the function".into()
            })?;
        }
    }
    Ok(())
}

/// The whole case: returns how far it got.
fn drive(input: &mut Input, steps: &mut Steps) -> Result<Progress, String> {
    let mut progress = Progress::default();
    let script = Input::new(input.rest());
    let host: Shared<'_> = Rc::new(RefCell::new(Host {
        input: script,
        highest_version: 0,
        devices: DEVICES
            .iter()
            .map(|&(wslot, _)| Device {
                wslot,
                config: config_of(wslot),
            })
            .collect(),
        to_guest: VecDeque::new(),
        sent: Vec::new(),
        in_flight: None,
        answers: Vec::new(),
        negotiated: None,
        requests: 0,
        last_request: None,
        busy: 0,
        broken: false,
        rescinded: false,
        clock: 0,
        waits: 0,
        receives: 0,
        sends: 0,
        lied: false,
        model: Model::default(),
        selected: u32::MAX,
        violations: Vec::new(),
    }));
    {
        let mut host = host.borrow_mut();
        // 0 accepts 1.4; 4 accepts nothing.
        host.highest_version = match host.input.below(8) {
            1 => version::V1_3,
            2 => version::V1_2,
            3 => version::V1_1,
            4 => 0x0001_0000,
            _ => version::V1_4,
        };
        if host.input.below(8) == 7 {
            let count = 1 + host.input.below(3);
            host.inject(count);
        }
    }

    // Bring-up.
    let start = begin(&host);
    let calls = |host: &Shared<'_>| {
        let host = host.borrow();
        host.waits + host.receives + host.sends
    };
    let probed = VpciBus::probe(
        Port(host.clone()),
        Window(host.clone()),
        WINDOW_PHYS,
        TIMEOUT_WAITS * WAIT_NS,
    );
    steps.observe(calls(&host))?;
    {
        let mut host_state = host.borrow_mut();
        host_state.in_flight = None;
        let answers: Vec<Verdict> = host_state.answers.iter().map(|a| a.verdict).collect();
        let types: Vec<u32> = host_state.answers.iter().map(|a| a.message_type).collect();
        // Mismatches, then one accepted version, then D0 entry accepted; relations applied.
        let good_sequence = answers.len() >= 2
            && answers[..answers.len() - 2]
                .iter()
                .all(|verdict| *verdict == Verdict::Mismatch)
            && answers[answers.len() - 2..] == [Verdict::Good, Verdict::Good]
            && types[types.len() - 1] == message::FDO_D0_ENTRY
            && host_state.model.relations_seen;
        check(
            host_state.waits - start.1 <= (host_state.requests + 1) * (TIMEOUT_WAITS + 1),
            || format!("probe waited {} times", host_state.waits),
        )?;
        check(probed.is_ok() == good_sequence, || {
            format!(
                "probe: {:?}, but the host answered {answers:?} (relations seen: {})",
                probed.as_ref().err(),
                host_state.model.relations_seen
            )
        })?;
        let honest = !host_state.lied && host_state.highest_version >= version::V1_1;
        check(probed.is_ok() || !honest, || {
            "an honest host failed the probe".into()
        })?;
        if let Ok(bus) = &probed {
            check(Some(bus.version()) == host_state.negotiated, || {
                format!(
                    "version {:#x}, the host accepted {:x?}",
                    bus.version(),
                    host_state.negotiated
                )
            })?;
        }
    }
    let Ok(bus) = probed else {
        return Ok(progress);
    };
    let bus: SharedBus<'_> = Rc::new(RefCell::new(bus));
    progress.probed = true;
    check_model(&bus.borrow(), &host)?;
    let mut before = bus.borrow().counters();
    let mut events: Vec<VpciEvent> = Vec::new();

    for _ in 0..MAX_OPERATIONS {
        if host.borrow().input.is_empty() {
            break;
        }
        let operation = read_below(&host, 17);
        if tracing() {
            println!("vpci: operation {operation}");
        }
        match operation {
            0 | 1 => {
                let wslot = pick_wslot(&host);
                resources(&bus, &host, wslot, &mut progress)?;
            }
            2 => {
                let wslot = pick_wslot(&host);
                interrupts(&bus, &host, wslot, &mut progress)?;
            }
            3 | 4 => {
                let wslot = pick_wslot(&host);
                config_access(&bus, &host, wslot, &mut progress)?;
            }
            5 => {
                let start = begin(&host);
                let requests = host.borrow().requests;
                for _ in 0..1 + read_below(&host, 4) {
                    if let Some(event) = bus.borrow_mut().poll() {
                        events.push(event);
                    }
                }
                end(&host, start, requests)?;
            }
            6 | 7 => {
                let count = 1 + read_below(&host, 4);
                host.borrow_mut().inject(count);
            }
            8 => {
                // The host ejects a function (or names one it never listed).
                let wslot = pick_wslot(&host);
                let eject = FunctionMessage {
                    message_type: message::EJECT,
                    wslot,
                };
                host.borrow_mut()
                    .queue(Kind::InBand, 0, eject.as_bytes().to_vec());
            }
            9 => {
                // The host changes the bus: a subset of its functions, listed honestly.
                let mut host_state = host.borrow_mut();
                let mut functions = Vec::new();
                for &(wslot, serial) in &DEVICES {
                    if host_state.input.bool() {
                        functions.push((wslot, serial));
                    }
                }
                let second = host_state.input.bool();
                host_state.queue(Kind::InBand, 0, relations_message(second, &functions));
            }
            10 => {
                let wslot = pick_wslot(&host);
                let (may, ejecting_known) = {
                    let host = host.borrow();
                    let known = host
                        .model
                        .known
                        .iter()
                        .any(|known| known.wslot == wslot && known.ejecting);
                    (known, known)
                };
                let sent_before = host.borrow().sent.len();
                let result = bus.borrow_mut().complete_eject(wslot);
                // A broken ring may fail the acknowledgement (the function then stays known).
                let uncertain = host.borrow().broken;
                check(
                    result.is_ok() == may || (uncertain && result.is_err()),
                    || format!("complete_eject({wslot:#x}): {result:?}, ejecting {ejecting_known}"),
                )?;
                let mut host_state = host.borrow_mut();
                if result.is_ok() {
                    host_state.model.known.retain(|known| known.wslot != wslot);
                    progress.eject_completed = true;
                    if !host_state.rescinded && !host_state.broken {
                        let last = host_state.sent.last().cloned();
                        check(
                            host_state.sent.len() == sent_before + 1
                                && last.as_ref().is_some_and(|(kind, _, _, payload)| {
                                    *kind == message::EJECTION_COMPLETE
                                        && FunctionMessage::read_from_prefix(payload)
                                            .is_ok_and(|(complete, _)| complete.wslot == wslot)
                                }),
                            || "EJECTION_COMPLETE not sent for the ejected function".into(),
                        )?;
                    }
                } else if !may {
                    check(host_state.sent.len() == sent_before, || {
                        "a refused EJECTION_COMPLETE was sent".into()
                    })?;
                }
            }
            11 => {
                let wslot = pick_wslot(&host);
                let d0 = host.borrow_mut().input.bool();
                let usable = host.borrow().model.usable(wslot);
                let requests = host.borrow().requests;
                let start = begin(&host);
                let result = bus.borrow_mut().set_power(wslot, d0);
                end(&host, start, requests)?;
                check_request("DEVICE_POWER_STATE_CHANGE", &host, usable, start.0, &result)?;
            }
            12 => {
                let wslot = pick_wslot(&host);
                let usable = host.borrow().model.usable(wslot);
                let requests = host.borrow().requests;
                let start = begin(&host);
                let result = bus.borrow_mut().release_resources(wslot);
                end(&host, start, requests)?;
                check_request("RELEASE_RESOURCES", &host, usable, start.0, &result)?;
            }
            13 if read_below(&host, 4) == 0 => {
                host.borrow_mut().rescinded = true;
            }
            14 if read_below(&host, 4) == 0 => {
                let stopped = host.borrow().model.stopped;
                let requests = host.borrow().requests;
                let start = begin(&host);
                let result = bus.borrow_mut().stop();
                end(&host, start, requests)?;
                let mut host_state = host.borrow_mut();
                let answered = host_state.answers.last().map(|answer| answer.verdict);
                if answered.is_some() {
                    host_state.model.stopped = true;
                }
                if !stopped {
                    check(result.is_ok() == (answered == Some(Verdict::Good)), || {
                        format!("stop: {result:?}, the host answered {answered:?}")
                    })?;
                } else {
                    check(result.is_err(), || "a stopped bus stopped again".into())?;
                }
            }
            16 => {
                let wslot = pick_wslot(&host);
                present(&bus, &host, wslot, &mut progress)?;
            }
            _ => {
                // Completions for nothing and packets of the wrong kind.
                let count = 1 + read_below(&host, 3);
                host.borrow_mut().inject(count);
            }
        }
        steps.observe(calls(&host))?;
        check_model(&bus.borrow(), &host)?;
        let after = bus.borrow().counters();
        monotonic("vpci", &figures(&before), &figures(&after))?;
        before = after;
    }

    // Drain: every queued packet is taken and classified, every event reported once.
    let start = begin(&host);
    let requests = host.borrow().requests;
    // A broken ring is noticed by one poll and reported by the next: stop after two idle ones.
    let mut idle = 0;
    for _ in 0..MAX_DRAIN_POLLS {
        match bus.borrow_mut().poll() {
            Some(event) => {
                idle = 0;
                events.push(event);
            }
            None => {
                let settled = {
                    let host = host.borrow();
                    host.to_guest.is_empty() || host.rescinded || host.broken
                };
                if settled {
                    idle += 1;
                    if idle == 2 {
                        break;
                    }
                }
            }
        }
    }
    end(&host, start, requests)?;
    steps.observe(calls(&host))?;
    check_model(&bus.borrow(), &host)?;
    let host_state = host.borrow();
    let gone = host_state.rescinded || host_state.broken;
    if !gone {
        check(host_state.to_guest.is_empty(), || {
            format!("{} packets never taken", host_state.to_guest.len())
        })?;
    }
    let rescinds = events
        .iter()
        .filter(|event| **event == VpciEvent::Rescinded)
        .count();
    check(rescinds == usize::from(gone), || {
        format!("{rescinds} rescind events, channel gone: {gone}")
    })?;
    let ejects = events
        .iter()
        .filter(|event| matches!(event, VpciEvent::Eject { .. }))
        .count() as u64;
    check(ejects == bus.borrow().counters().ejects, || {
        format!(
            "{ejects} EJECT events for {} EJECTs",
            bus.borrow().counters().ejects
        )
    })?;
    Ok(progress)
}

fn run(input: &mut Input, steps: &mut Steps) -> Outcome {
    drive(input, steps).map(|_| ())
}

/// The seeds: well-formed programs over an honest host (zero bytes answer honestly).
fn seeds() -> Vec<Vec<u8>> {
    // Bring-up at a version (0: 1.4, 3: 1.1), no early injection (0); the probe's answers
    // honest (0, one byte per request: each version tried, then FDO_D0_ENTRY).
    let bring_up = |version: u8, versions_tried: usize| {
        let mut bytes = vec![version, 0];
        bytes.extend(std::iter::repeat_n(0, versions_tried + 1));
        bytes
    };
    // resources(0): op 0, wslot index 0, honest answers for both requests.
    let resources = [0u8, 0, 0, 0];
    // interrupts(1): op 2, wslot index 1, vector 0x41, one processor (0), cpu 0, answer,
    // then delete (0) with an honest answer.
    let interrupt = [2u8, 1, 0x11, 0, 0, 0, 0, 0];
    // config read32 of wslot 1 at dword 0: op 3, wslot 1, offset kind 0, dword 0, access 0, value.
    let config = [3u8, 1, 0, 0, 0, 0, 0, 0, 0];
    // EJECT of wslot 1, four polls (two arrivals from the probe, then the EJECT),
    // EJECTION_COMPLETE of wslot 1 (honest: nothing to answer).
    let eject = [8u8, 1, 5, 3, 10, 1, 0];
    // The kernel's presentation of wslot 0: op 16, wslot 0, honest answers for both requests.
    let present = [16u8, 0, 0, 0];
    let mut full = bring_up(0, 1);
    full.extend_from_slice(&resources);
    full.extend_from_slice(&present);
    full.extend_from_slice(&interrupt);
    full.extend_from_slice(&config);
    full.extend_from_slice(&eject);
    // At 1.1 (BUS_RELATIONS, ASSIGNED_RESOURCES, CREATE_INTERRUPT with a processor mask).
    let mut old = bring_up(3, 4);
    old.extend_from_slice(&resources);
    old.extend_from_slice(&present);
    old.extend_from_slice(&interrupt);
    old.extend_from_slice(&config);
    old.extend_from_slice(&eject);
    // Hostile traffic amid the steady state: injected messages, relations changes, a stray
    // completion and a hostile reply to the resource query.
    let mut hostile = bring_up(0, 1);
    hostile.extend_from_slice(&[6, 2, 0, 1, 3, 0, 1, 2, 0x7f, 0x21, 0, 0, 0]);
    hostile.extend_from_slice(&[9, 1, 0, 1, 5, 3]);
    hostile.extend_from_slice(&[0, 0, 13, 1, 0, 0]);
    hostile.extend_from_slice(&config);
    vec![full, old, hostile]
}

/// The registration.
pub const TARGET: Target = Target {
    name: "vpci",
    about: "vPCI client vs a host whose every answer and message comes from the input, bring-up to EJECT",
    default_cases: 100_000,
    max_input_len: 1024,
    memory_bound: 1 << 20,
    // Port calls (sends, receives, waits): per operation at most three requests of
    // TIMEOUT_WAITS + 1 waits and four sends each, plus one receive per packet the input queued.
    step_bound: 6_000,
    seeds,
    run,
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn well_formed_seeds_reach_the_assigned_state() {
        for (index, seed) in seeds().iter().enumerate() {
            let mut input = Input::new(seed);
            let mut steps = Steps::new(TARGET.step_bound);
            let progress = drive(&mut input, &mut steps)
                .unwrap_or_else(|failure| panic!("seed {index} fails: {failure}"));
            assert!(progress.probed, "seed {index} did not probe");
            if index < 2 {
                assert_eq!(
                    progress,
                    Progress {
                        probed: true,
                        assigned: true,
                        presented: true,
                        interrupt: true,
                        config_read: true,
                        eject_completed: true,
                    },
                    "seed {index}"
                );
            }
        }
    }
}
