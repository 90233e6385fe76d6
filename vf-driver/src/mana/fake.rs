//! A fake MANA function for host tests: BAR0 (register map, SMC window, doorbells) over a
//! [`FakeDmaAllocator`](crate::fake_dma::FakeDmaAllocator)'s memory, answering the HWC and
//! running the data path synchronously on doorbell writes.
//!
//! It exists for what OpenVMM's emulator never does (the conformance tests use the emulator
//! for everything else): error completions, a silent HWC, link and reset-request events,
//! malformed or overflowing EQEs/CQEs, out-of-range ids, removal. It speaks the layouts of
//! [`super::defs`], so it checks the driver against the same reading of the facts, not
//! against the real device.
#![allow(missing_docs)]

use alloc::collections::{BTreeMap, VecDeque};
use alloc::rc::Rc;
use alloc::vec;
use alloc::vec::Vec;
use core::cell::RefCell;

use net_device::RegisterIo;
use zerocopy::{FromBytes, IntoBytes};

use super::defs::*;
use super::regs::{self, RegisterMap, SmcHeader};
use crate::fake_dma::{dma_read, dma_write};

/// BAR0 length of the fake.
pub const BAR0_LEN: usize = 0x2000;
/// BAR0 offset of the SMC window.
const SMC_OFFSET: usize = 0x28;
/// BAR0 offset of the doorbell zone (one page, index 0).
const DOORBELL_ZONE: usize = 0x1000;
/// Queue ids start here (as in the emulator) so 0 is never valid.
const FIRST_ID: u32 = 24;

/// An EQ or CQ the fake writes.
#[derive(Clone, Copy, Debug)]
struct EntryQueue {
    base: u64,
    entries: u32,
    entry_size: usize,
    position: u32,
    armed: bool,
    /// Parent EQ (CQs) or MSI-X index (EQs).
    target: u32,
}

impl EntryQueue {
    fn new(base: u64, bytes: usize, entry_size: usize, target: u32) -> Self {
        let entries = (bytes / entry_size) as u32;
        EntryQueue {
            base,
            entries,
            entry_size,
            position: entries,
            armed: true,
            target,
        }
    }

    fn owner(&self) -> u32 {
        (self.position >> self.entries.trailing_zeros()) & OWNER_MASK
    }

    /// Writes `entry` (its last dword's owner bits are set here unless `owner` overrides).
    fn write(&mut self, mut entry: Vec<u8>, owner: Option<u32>) -> bool {
        let len = entry.len();
        let last = u32::from_le_bytes(entry[len - 4..].try_into().unwrap_or([0; 4]));
        let last = (last & 0x1fff_ffff) | (owner.unwrap_or(self.owner()) << 29);
        entry[len - 4..].copy_from_slice(&last.to_le_bytes());
        let offset = (self.position % self.entries) as u64 * self.entry_size as u64;
        dma_write(self.base + offset, &entry);
        self.position = self.position.wrapping_add(1);
        core::mem::take(&mut self.armed)
    }

    fn doorbell(&mut self, position: u32, arm: bool) -> bool {
        if !arm {
            self.armed = false;
            return false;
        }
        let pending = self.position.wrapping_sub(position) & ((self.entries << OWNER_BITS) - 1);
        if pending == 0 {
            self.armed = true;
            false
        } else {
            self.armed = false;
            true
        }
    }
}

/// A WQ the fake reads.
#[derive(Clone, Copy, Debug)]
struct WorkQueue {
    base: u64,
    size: u32,
    head: u32,
    tail: u32,
    cq: u32,
}

/// A parsed WQE.
struct ParsedWqe {
    position: u32,
    len: u32,
    oob: Vec<u8>,
    oob_in_sgl: bool,
    client_unit_data: u32,
    sges: Vec<Sge>,
}

impl WorkQueue {
    fn read(&self, offset: u32, out: &mut [u8]) {
        for (index, byte) in out.iter_mut().enumerate() {
            let at = (offset.wrapping_add(index as u32) % self.size) as u64;
            let mut one = [0u8];
            dma_read(self.base + at, &mut one);
            *byte = one[0];
        }
    }

    fn pop(&mut self) -> Option<ParsedWqe> {
        if self.head == self.tail {
            return None;
        }
        let mut header = [0u8; 8];
        self.read(self.head, &mut header);
        let header = WqeHeader::read_from_bytes(&header).ok()?;
        let sges = (header.params & 0xff) as usize;
        let oob_len = match (header.params >> 8) & 7 {
            CLIENT_OOB_24 => 24,
            _ => 8,
        };
        let len = wqe_len(oob_len, sges) as u32;
        let mut body = vec![0u8; len as usize - 8];
        self.read(self.head.wrapping_add(8), &mut body);
        let sge_list = (0..sges)
            .filter_map(|index| {
                Sge::read_from_bytes(&body[oob_len + index * 16..oob_len + (index + 1) * 16]).ok()
            })
            .collect();
        let wqe = ParsedWqe {
            position: self.head,
            len,
            oob: body[..oob_len].to_vec(),
            oob_in_sgl: (header.params >> 11) & 1 != 0,
            client_unit_data: (header.params >> 16) & 0x3fff,
            sges: sge_list,
        };
        self.head = self.head.wrapping_add(len);
        Some(wqe)
    }
}

/// A frame the driver sent, as the fake's "wire" saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SentFrame {
    /// The bytes, all SGEs joined.
    pub bytes: Vec<u8>,
    /// The short OOB.
    pub oob: TxShortOob,
    /// True when the long OOB form was used.
    pub long_form: bool,
    /// SGE lengths.
    pub sge_lengths: Vec<u32>,
    /// MSS when LSO was asked for.
    pub lso_mss: Option<u32>,
}

/// How the next RX completion is forged.
#[derive(Clone, Copy, Debug, Default)]
pub struct RxForgery {
    /// CQE type instead of RX_OKAY.
    pub cqe_type: Option<u32>,
    /// Reported length instead of the frame's.
    pub length: Option<u16>,
    /// WQE offset instead of the right one.
    pub wqe_offset: Option<u32>,
    /// WQ number instead of the RQ's.
    pub wq_number: Option<u32>,
    /// Checksum flags.
    pub flags: u32,
}

/// The fake's state, shared by the driver's register window and the test's handle.
#[derive(Default)]
pub struct FakeState {
    /// Reads return all-ones and writes are dropped.
    pub removed: bool,
    /// HWC requests are taken but never answered.
    pub hwc_silent: bool,
    /// The next N transmit completions report this error type.
    pub tx_error: Option<(u32, usize)>,
    /// The vPort's MAC address.
    pub mac: [u8; 6],
    /// Allow the short OOB form.
    pub short_form_allowed: bool,
    /// The transmit vPort offset the device reports.
    pub tx_vport_offset: u16,
    /// Reported LIST_DEVICES count (to test the bound); `None`: the real 2.
    pub listed_devices: Option<u32>,
    /// Fail this request type with status 1.
    pub fail_request: Option<u32>,
    /// Give this value as the data EQ id (to test the id bound).
    pub eq_id_override: Option<u32>,
    /// Every HWC request type, in order.
    pub requests: Vec<u32>,
    /// Hostile HWC answers: each request takes the next one. Bytes 0..4 are the length the
    /// receive completion claims, 4..8 XOR the receive WQE offset it names, the rest is
    /// written over the real response (header included).
    pub forged_responses: VecDeque<Vec<u8>>,
    /// MSI-X indexes raised, in order.
    pub interrupts: Vec<u32>,
    /// Frames sent.
    pub sent: Vec<SentFrame>,
    /// Receive enabled on the vPort.
    pub rx_enabled: bool,
    smc: [u32; 8],
    hwc_established: bool,
    hwc_eq: u32,
    hwc_cq: u32,
    hwc_sq: u32,
    hwc_rq: u32,
    eqs: BTreeMap<u32, EntryQueue>,
    cqs: BTreeMap<u32, EntryQueue>,
    sqs: BTreeMap<u32, WorkQueue>,
    rqs: BTreeMap<u32, WorkQueue>,
    regions: BTreeMap<u64, (u64, usize)>,
    data_sq: Option<u32>,
    data_rq: Option<u32>,
    next_id: u32,
    next_region: u64,
}

/// The fake device (its BAR0) and a handle to its state.
#[derive(Clone)]
pub struct FakeMana {
    pub state: Rc<RefCell<FakeState>>,
}

impl Default for FakeMana {
    fn default() -> Self {
        Self::new()
    }
}

impl FakeMana {
    pub fn new() -> Self {
        let state = FakeState {
            mac: [0x00, 0x15, 0x5d, 0x11, 0x22, 0x33],
            short_form_allowed: true,
            next_id: FIRST_ID,
            next_region: 1,
            ..FakeState::default()
        };
        FakeMana {
            state: Rc::new(RefCell::new(state)),
        }
    }

    /// Posts an event on the HWC EQ (link, reset request, …); `owner` forges its owner count.
    pub fn post_hwc_event(&self, event_type: u8, data: [u8; 12], owner: Option<u32>) {
        let mut state = self.state.borrow_mut();
        let eq = state.hwc_eq;
        state.post_eq(eq, event_type, data, owner);
    }

    /// Posts a raw EQE on the data EQ (the only EQ created over the HWC).
    pub fn post_data_event(&self, event_type: u8, data: [u8; 12], owner: Option<u32>) {
        let mut state = self.state.borrow_mut();
        let eq = state
            .eqs
            .keys()
            .copied()
            .find(|id| *id != state.hwc_eq)
            .unwrap_or(0);
        state.post_eq(eq, event_type, data, owner);
    }

    /// Writes a raw entry (its last dword's owner bits replaced unless `owner` forges them)
    /// into the data path's RX CQ (`ring` 0), TX CQ (1), data EQ (2) or HWC EQ (3).
    pub fn post_raw(&self, ring: u8, entry: &[u8], owner: Option<u32>) {
        let mut state = self.state.borrow_mut();
        let data_cq = |state: &FakeState, rx: bool| {
            let wq = if rx { state.data_rq } else { state.data_sq };
            let queues = if rx { &state.rqs } else { &state.sqs };
            wq.and_then(|id| queues.get(&id)).map(|queue| queue.cq)
        };
        let (queue, size) = match ring {
            0 => (
                data_cq(&state, true).and_then(|id| state.cqs.get_mut(&id)),
                64,
            ),
            1 => (
                data_cq(&state, false).and_then(|id| state.cqs.get_mut(&id)),
                64,
            ),
            2 => {
                let hwc = state.hwc_eq;
                (
                    state
                        .eqs
                        .iter_mut()
                        .find(|(id, _)| **id != hwc)
                        .map(|(_, eq)| eq),
                    16,
                )
            }
            _ => {
                let hwc = state.hwc_eq;
                (state.eqs.get_mut(&hwc), 16)
            }
        };
        if let Some(queue) = queue {
            let mut bytes = vec![0u8; size];
            let len = entry.len().min(size);
            bytes[..len].copy_from_slice(&entry[..len]);
            queue.write(bytes, owner);
        }
    }

    /// Receives `frame` into the next posted buffer; `false` when none is posted.
    pub fn inject(&self, frame: &[u8], forgery: RxForgery) -> bool {
        self.state.borrow_mut().inject(frame, forgery)
    }

    /// Receive buffers posted and not yet used.
    pub fn rx_buffers_posted(&self) -> usize {
        let state = self.state.borrow();
        state
            .data_rq
            .and_then(|id| state.rqs.get(&id))
            .map_or(0, |rq| {
                (rq.tail.wrapping_sub(rq.head) as usize) / wqe_len(8, 1)
            })
    }
}

impl FakeState {
    fn id(&mut self) -> u32 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    fn post_eq(&mut self, eq_id: u32, event_type: u8, data: [u8; 12], owner: Option<u32>) {
        let Some(eq) = self.eqs.get_mut(&eq_id) else {
            return;
        };
        let eqe = Eqe {
            data,
            params: u32::from(event_type),
        };
        if eq.write(eqe.as_bytes().to_vec(), owner) {
            self.interrupts.push(eq.target);
        }
    }

    fn post_cq(&mut self, cq_id: u32, data: &[u8], wq: u32, send: bool) {
        let Some(cq) = self.cqs.get_mut(&cq_id) else {
            return;
        };
        let mut cqe = Cqe {
            data: [0; 60],
            params: (wq & 0xff_ffff) | (u32::from(send) << 24),
        };
        cqe.data[..data.len()].copy_from_slice(data);
        if cq.write(cqe.as_bytes().to_vec(), None) {
            let eq = cq.target;
            let mut event = [0u8; 12];
            event[..4].copy_from_slice(&cq_id.to_le_bytes());
            self.post_eq(eq, EQE_COMPLETION, event, None);
        }
    }

    fn register_map() -> RegisterMap {
        RegisterMap {
            micro_version: 1,
            minor_version: 0,
            major_version: 1,
            doorbell_zone_offset: DOORBELL_ZONE as u64,
            doorbell_page_size: 0x1000,
            smc_offset: SMC_OFFSET as u64,
            smc_size: 32,
            ..RegisterMap::default()
        }
    }

    fn smc(&mut self) {
        let header = self.smc[7];
        let command = header & regs::SMC_TYPE_MASK;
        let status: u32 = match command {
            regs::SMC_ESTABLISH_HWC if !self.hwc_established => {
                let bytes = self.smc.as_bytes().to_vec();
                let high = u64::from(u16::from_le_bytes([bytes[24], bytes[25]]));
                let msix = u32::from(u16::from_le_bytes([bytes[26], bytes[27]]));
                let page = |at: usize, shift: u32| {
                    let mut low = [0u8; 8];
                    low[..6].copy_from_slice(&bytes[at..at + 6]);
                    (u64::from_le_bytes(low) | (((high >> shift) & 0xf) << 48)) * 4096
                };
                let (eq, cq, rq, sq) = (page(0, 0), page(6, 4), page(12, 8), page(18, 12));
                self.establish(eq, cq, rq, sq, msix);
                0
            }
            regs::SMC_DESTROY_HWC if self.hwc_established => {
                self.hwc_established = false;
                0
            }
            _ => 1,
        };
        self.smc[7] = header | SmcHeader::IS_RESPONSE.bits() | (status << regs::SMC_STATUS_SHIFT);
    }

    fn establish(&mut self, eq: u64, cq: u64, rq: u64, sq: u64, msix: u32) {
        self.hwc_established = true;
        let (eq_id, cq_id, sq_id, rq_id) = (self.id(), self.id(), self.id(), self.id());
        self.hwc_eq = eq_id;
        self.hwc_cq = cq_id;
        self.hwc_sq = sq_id;
        self.hwc_rq = rq_id;
        self.eqs.insert(eq_id, EntryQueue::new(eq, 4096, 16, msix));
        self.cqs.insert(cq_id, EntryQueue::new(cq, 4096, 64, eq_id));
        for (id, base, map) in [(sq_id, sq, true), (rq_id, rq, false)] {
            let wq = WorkQueue {
                base,
                size: 4096,
                head: 0,
                tail: 0,
                cq: cq_id,
            };
            if map {
                self.sqs.insert(id, wq);
            } else {
                self.rqs.insert(id, wq);
            }
        }
        let mut data = [0u8; 12];
        data[..4].copy_from_slice(&(eq_id & 0xffff).to_le_bytes());
        self.post_eq(eq_id, EQE_HWC_INIT_EQ_ID_DB, data, None);
        for (kind, value) in [
            (HWC_INIT_CQ_ID, cq_id),
            (HWC_INIT_RQ_ID, rq_id),
            (HWC_INIT_SQ_ID, sq_id),
            (HWC_INIT_QUEUE_DEPTH, 1),
            (HWC_INIT_MAX_REQUEST, 4096),
            (HWC_INIT_MAX_RESPONSE, 4096),
            (HWC_INIT_MAX_NUM_CQS, 64),
            (HWC_INIT_PDID, 0),
            (HWC_INIT_GPA_MKEY, 0),
        ] {
            let mut data = [0u8; 12];
            data[..4].copy_from_slice(&((u32::from(kind) << 24) | value).to_le_bytes());
            self.post_eq(eq_id, EQE_HWC_INIT_DATA, data, None);
        }
        self.post_eq(eq_id, EQE_HWC_INIT_DONE, [0; 12], None);
    }

    fn doorbell(&mut self, offset: usize, value: u64) {
        let id = (value & 0xff_ffff) as u32;
        let position = (value >> 32) as u32;
        match offset - DOORBELL_ZONE {
            regs::DOORBELL_SQ => {
                if let Some(sq) = self.sqs.get_mut(&id) {
                    sq.tail = position;
                }
                if id == self.hwc_sq {
                    self.hwc_requests();
                } else if Some(id) == self.data_sq {
                    self.transmit();
                }
            }
            regs::DOORBELL_RQ => {
                if let Some(rq) = self.rqs.get_mut(&id) {
                    rq.tail = position;
                }
            }
            regs::DOORBELL_CQ => {
                let arm = value >> 63 != 0;
                let position = position & 0x7fff_ffff;
                if let Some(cq) = self.cqs.get_mut(&id)
                    && cq.doorbell(position, arm)
                {
                    let eq = cq.target;
                    let mut event = [0u8; 12];
                    event[..4].copy_from_slice(&id.to_le_bytes());
                    self.post_eq(eq, EQE_COMPLETION, event, None);
                }
            }
            regs::DOORBELL_EQ => {
                let arm = value >> 63 != 0;
                let position = position & 0x7fff_ffff;
                if let Some(eq) = self.eqs.get_mut(&id)
                    && eq.doorbell(position, arm)
                {
                    self.interrupts.push(eq.target);
                }
            }
            _ => {}
        }
    }

    fn hwc_requests(&mut self) {
        if self.hwc_silent {
            return;
        }
        loop {
            let Some(sq) = self.sqs.get_mut(&self.hwc_sq) else {
                return;
            };
            let Some(wqe) = sq.pop() else {
                return;
            };
            let Some(rq) = self.rqs.get_mut(&self.hwc_rq) else {
                return;
            };
            let Some(receive) = rq.pop() else {
                return;
            };
            let Some(sge) = wqe.sges.first().copied() else {
                return;
            };
            let mut request = vec![0u8; sge.size as usize];
            dma_read(sge.address, &mut request);
            let Ok((header, body)) = GdmaRequestHeader::read_from_prefix(&request) else {
                return;
            };
            self.requests.push(header.request.message_type);
            let (status, response) = if self.fail_request == Some(header.request.message_type) {
                (1, Vec::new())
            } else {
                self.handle(&header, body)
            };
            let response_header = GdmaResponseHeader {
                response: header.response,
                device_id: header.device_id,
                activity_id: header.activity_id,
                status,
                reserved: 0,
            };
            let mut bytes = response_header.as_bytes().to_vec();
            bytes.extend_from_slice(&response);
            let mut claimed_len = bytes.len() as u32;
            let mut offset_xor = 0;
            if let Some(forged) = self.forged_responses.pop_front() {
                let word = |at: usize| {
                    forged
                        .get(at..at + 4)
                        .map_or(0, |w| u32::from_le_bytes([w[0], w[1], w[2], w[3]]))
                };
                claimed_len = word(0);
                offset_xor = word(4);
                let body = forged.get(8..).unwrap_or(&[]);
                if bytes.len() < body.len() {
                    bytes.resize(body.len(), 0);
                }
                bytes[..body.len()].copy_from_slice(body);
            }
            if let Some(target) = receive.sges.first() {
                dma_write(
                    target.address,
                    &bytes[..bytes.len().min(target.size as usize)],
                );
            }
            let (cq, sq_id, rq_id) = (self.hwc_cq, self.hwc_sq, self.hwc_rq);
            self.post_cq(cq, &[], sq_id, true);
            let oob = HwcRxOob {
                flags: 0,
                reserved: 0,
                wqe_offset: receive.position ^ offset_xor,
                wqe_addr_high: 0,
                client_data_unit: 0,
                data_size: claimed_len,
                chunk_offset: 0,
            };
            self.post_cq(cq, oob.as_bytes(), rq_id, false);
        }
    }

    fn handle(&mut self, header: &GdmaRequestHeader, body: &[u8]) -> (u32, Vec<u8>) {
        let ok = |bytes: &[u8]| (0, bytes.to_vec());
        match header.request.message_type {
            GDMA_VERIFY_VF_DRIVER_VERSION => ok(VerifyVersionResponse {
                protocol_version: GDMA_PROTOCOL_V1,
                device_capabilities: [0; 4],
            }
            .as_bytes()),
            GDMA_QUERY_MAX_RESOURCES => ok(QueryMaxResourcesResponse {
                status: 0,
                max_sq: 64,
                max_rq: 64,
                max_cq: 128,
                max_eq: 64,
                max_doorbell: 1,
                max_mst: 1,
                max_cq_moderation_contexts: 0,
                max_moderated_cq: 0,
                max_msix: 64,
            }
            .as_bytes()),
            GDMA_LIST_DEVICES => {
                let mut response = ListDevicesResponse {
                    count: self.listed_devices.unwrap_or(2),
                    reserved: 0,
                    devices: [GdmaDeviceId::default(); MAX_LISTED_DEVICES],
                };
                response.devices[0] = HWC_DEVICE_ID;
                response.devices[1] = GdmaDeviceId {
                    device_type: GDMA_DEVICE_MANA,
                    instance: 1,
                };
                ok(response.as_bytes())
            }
            GDMA_REGISTER_DEVICE => ok(RegisterDeviceResponse {
                pdid: 0,
                gpa_mkey: 0,
                doorbell_id: 0,
            }
            .as_bytes()),
            GDMA_CREATE_DMA_REGION => {
                let Ok((request, pages)) = CreateDmaRegionRequest::read_from_prefix(body) else {
                    return (1, Vec::new());
                };
                let first = pages.get(..8).map_or(0, |bytes| {
                    u64::from_le_bytes(bytes.try_into().unwrap_or([0; 8]))
                });
                let handle = self.next_region;
                self.next_region += 1;
                self.regions
                    .insert(handle, (first, request.length as usize));
                ok(CreateDmaRegionResponse { region: handle }.as_bytes())
            }
            GDMA_CREATE_QUEUE => {
                let Ok((request, _)) = CreateQueueRequest::read_from_prefix(body) else {
                    return (1, Vec::new());
                };
                let Some((base, len)) = self.regions.remove(&request.region) else {
                    return (1, Vec::new());
                };
                let id = self.id();
                self.eqs
                    .insert(id, EntryQueue::new(base, len, 16, request.eq_msix_index));
                let reported = self.eq_id_override.unwrap_or(id);
                if reported != id
                    && let Some(eq) = self.eqs.remove(&id)
                {
                    self.eqs.insert(reported, eq);
                }
                ok(CreateQueueResponse { queue_id: reported }.as_bytes())
            }
            GDMA_DISABLE_QUEUE => {
                if let Ok((request, _)) = DisableQueueRequest::read_from_prefix(body) {
                    self.eqs.remove(&request.queue_id);
                }
                (0, Vec::new())
            }
            GDMA_DEREGISTER_DEVICE => (0, Vec::new()),
            GDMA_GENERATE_RESET_REQUEST_EQE => {
                if let Ok((request, _)) = GenerateResetRequestEqeRequest::read_from_prefix(body) {
                    let mut data = [0u8; 12];
                    data[..4].copy_from_slice(&request.flags.to_le_bytes());
                    self.post_eq(request.queue_id, EQE_HWC_RESET_REQUEST, data, None);
                }
                (0, Vec::new())
            }
            GDMA_GENERATE_TEST_EQE => {
                if let Ok((request, _)) = GenerateTestEqeRequest::read_from_prefix(body) {
                    self.post_eq(request.queue_id, EQE_TEST_EVENT, [0; 12], None);
                }
                (0, Vec::new())
            }
            MANA_QUERY_DEV_CONFIG => ok(QueryDeviceConfigResponse {
                device_capabilities: [0; 4],
                max_vports: 1,
                reserved: 0,
                max_eqs: 64,
                adapter_mtu: 0,
                reserved2: 0,
                link_speed_mbps: 0,
            }
            .as_bytes()),
            MANA_QUERY_VPORT_CONFIG => ok(QueryVportConfigResponse {
                max_sq: 1,
                max_rq: 1,
                indirection_entries: 0,
                reserved1: 0,
                mac_address: self.mac,
                reserved2: [0; 2],
                vport: 0,
            }
            .as_bytes()),
            MANA_CONFIG_VPORT_TX => ok(ConfigVportTxResponse {
                tx_vport_offset: self.tx_vport_offset,
                short_form_allowed: u8::from(self.short_form_allowed),
                reserved: 0,
            }
            .as_bytes()),
            MANA_CREATE_WQ_OBJ => {
                let Ok((request, _)) = CreateWqObjectRequest::read_from_prefix(body) else {
                    return (1, Vec::new());
                };
                let (Some(wq), Some(cq)) = (
                    self.regions.remove(&request.wq_region),
                    self.regions.remove(&request.cq_region),
                ) else {
                    return (1, Vec::new());
                };
                let (wq_id, cq_id) = (self.id(), self.id());
                self.cqs.insert(
                    cq_id,
                    EntryQueue::new(cq.0, cq.1, 64, request.cq_parent_eq_id),
                );
                let queue = WorkQueue {
                    base: wq.0,
                    size: wq.1 as u32,
                    head: 0,
                    tail: 0,
                    cq: cq_id,
                };
                if request.wq_type == QUEUE_TYPE_SQ {
                    self.sqs.insert(wq_id, queue);
                    self.data_sq = Some(wq_id);
                } else {
                    self.rqs.insert(wq_id, queue);
                    self.data_rq = Some(wq_id);
                }
                ok(CreateWqObjectResponse {
                    wq_id,
                    cq_id,
                    wq_object: u64::from(wq_id),
                }
                .as_bytes())
            }
            MANA_DESTROY_WQ_OBJ => {
                if let Ok((request, _)) = DestroyWqObjectRequest::read_from_prefix(body) {
                    let id = request.wq_object as u32;
                    let queue = self.sqs.remove(&id).or_else(|| self.rqs.remove(&id));
                    if let Some(queue) = queue {
                        self.cqs.remove(&queue.cq);
                    }
                    if self.data_sq == Some(id) {
                        self.data_sq = None;
                    }
                    if self.data_rq == Some(id) {
                        self.data_rq = None;
                    }
                }
                (0, Vec::new())
            }
            MANA_CONFIG_VPORT_RX => {
                if let Ok((request, _)) = ConfigVportRxRequest::read_from_prefix(body) {
                    self.rx_enabled = request.rx_enable == TRISTATE_TRUE;
                }
                (0, Vec::new())
            }
            _ => (1, Vec::new()),
        }
    }

    fn transmit(&mut self) {
        let Some(sq_id) = self.data_sq else {
            return;
        };
        loop {
            let Some(sq) = self.sqs.get_mut(&sq_id) else {
                return;
            };
            let cq = sq.cq;
            let Some(wqe) = sq.pop() else {
                return;
            };
            let mut bytes = Vec::new();
            for sge in &wqe.sges {
                let mut part = vec![0u8; sge.size as usize];
                dma_read(sge.address, &mut part);
                bytes.extend_from_slice(&part);
            }
            let short = u64::from_le_bytes(wqe.oob[..8].try_into().unwrap_or([0; 8]));
            self.sent.push(SentFrame {
                bytes,
                oob: TxShortOob::decode(short),
                long_form: wqe.oob.len() == 24,
                sge_lengths: wqe.sges.iter().map(|sge| sge.size).collect(),
                lso_mss: wqe.oob_in_sgl.then_some(wqe.client_unit_data),
            });
            let _ = wqe.len;
            let kind = match self.tx_error.as_mut() {
                Some((kind, left)) if *left > 0 => {
                    *left -= 1;
                    *kind
                }
                _ => CQE_TX_OKAY,
            };
            let oob = TxCompletionOob {
                cqe_header: kind | (MANA_CQE_COMPLETION << 6),
                tx_data_offset: 0,
                offsets: 0,
                reserved: [0; 12],
            };
            self.post_cq(cq, oob.as_bytes(), sq_id, true);
        }
    }

    fn inject(&mut self, frame: &[u8], forgery: RxForgery) -> bool {
        let Some(rq_id) = self.data_rq else {
            return false;
        };
        let Some(rq) = self.rqs.get_mut(&rq_id) else {
            return false;
        };
        let cq = rq.cq;
        let Some(wqe) = rq.pop() else {
            return false;
        };
        let Some(sge) = wqe.sges.first() else {
            return false;
        };
        let fits = frame.len() <= sge.size as usize;
        dma_write(sge.address, &frame[..frame.len().min(sge.size as usize)]);
        let kind = forgery
            .cqe_type
            .unwrap_or(if fits { CQE_RX_OKAY } else { CQE_RX_TRUNCATED });
        let mut oob = RxCompletionOob {
            cqe_header: kind | (MANA_CQE_COMPLETION << 6),
            flags: forgery.flags,
            packets: [RxPacketInfo {
                packet_length: 0,
                reserved1: 0,
                reserved2: 0,
                packet_hash: 0,
            }; 4],
            rx_wqe_offset: forgery.wqe_offset.unwrap_or(wqe.position),
        };
        oob.packets[0].packet_length = forgery.length.unwrap_or(frame.len() as u16);
        self.post_cq(
            cq,
            oob.as_bytes(),
            forgery.wq_number.unwrap_or(rq_id),
            false,
        );
        true
    }
}

impl RegisterIo for FakeMana {
    fn read32(&self, offset: usize) -> u32 {
        let state = self.state.borrow();
        if state.removed || !offset.is_multiple_of(4) {
            return u32::MAX;
        }
        let map = FakeState::register_map();
        let map = map.as_bytes();
        if offset + 4 <= map.len() {
            return u32::from_le_bytes(map[offset..offset + 4].try_into().unwrap_or([0xff; 4]));
        }
        if (SMC_OFFSET..SMC_OFFSET + 32).contains(&offset) {
            return state.smc[(offset - SMC_OFFSET) / 4];
        }
        u32::MAX
    }

    fn write32(&self, offset: usize, value: u32) {
        let mut state = self.state.borrow_mut();
        if state.removed {
            return;
        }
        if (SMC_OFFSET..SMC_OFFSET + 32).contains(&offset) && offset.is_multiple_of(4) {
            let index = (offset - SMC_OFFSET) / 4;
            state.smc[index] = value;
            if index == 7 {
                state.smc();
            }
        }
    }

    fn write64(&self, offset: usize, value: u64) {
        let mut state = self.state.borrow_mut();
        if state.removed {
            return;
        }
        if (DOORBELL_ZONE..BAR0_LEN).contains(&offset) {
            state.doorbell(offset, value);
        }
    }

    fn len(&self) -> usize {
        BAR0_LEN
    }
}
