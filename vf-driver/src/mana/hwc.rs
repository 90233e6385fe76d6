//! The hardware channel (HWC): set up through the SMC window, then a request/response queue
//! pair over which every control message (GDMA and BNIC) travels.
//!
//! Sequence (facts from OpenVMM's `gdma` emulator, `hwc.rs` and `lib.rs`): the driver gives the
//! device four pages (EQ, CQ, RQ, SQ) and an MSI-X index in an SMC ESTABLISH_HWC command; the
//! device answers in the SMC header and then posts, on that EQ, the EQ id and doorbell page,
//! typed init values (queue ids, limits, protection domain, memory key) and INIT_DONE. A
//! request is a send WQE (24-byte HWC OOB naming the HWC queues, one SGE at the request
//! buffer); the device writes the response into the buffer of the posted receive WQE and
//! completes both WQEs on the HWC CQ. One request is outstanding at a time.

use alloc::vec::Vec;

use net_device::{DmaAllocator, DmaRegion, RegisterIo};
use zerocopy::{FromBytes, IntoBytes};

use super::defs::{
    CLIENT_OOB_8, CLIENT_OOB_24, Cqe, EQE_COMPLETION, EQE_HWC_INIT_DATA, EQE_HWC_INIT_DONE,
    EQE_HWC_INIT_EQ_ID_DB, EQE_HWC_RECONFIG_DATA, EQE_HWC_RESET_REQUEST, EQE_TEST_EVENT, Eqe,
    EqeReconfig, GDMA_MESSAGE_V1, GDMA_STANDARD_HEADER, GdmaDeviceId, GdmaMessageHeader,
    GdmaRequestHeader, GdmaResponseHeader, HWC_INIT_CQ_ID, HWC_INIT_GPA_MKEY, HWC_INIT_MAX_NUM_CQS,
    HWC_INIT_MAX_REQUEST, HWC_INIT_MAX_RESPONSE, HWC_INIT_PDID, HWC_INIT_QUEUE_DEPTH,
    HWC_INIT_RQ_ID, HWC_INIT_SQ_ID, HwcInitEqIdDb, HwcRxOob, HwcTxOob, PAGE_SIZE,
    RECONFIG_HWC_TIMEOUT, RECONFIG_LINK_CONNECT, RECONFIG_LINK_DISCONNECT, Sge, WqeHeader,
    WqeParams, hwc_init_data, wqe_len,
};
use super::queues::{EntryRing, Polled, WorkRing, allocate};
use super::regs::{
    self, RegisterMap, SMC_DESTROY_HWC, SMC_ESTABLISH_HWC, SMC_HEADER, SMC_MAX_PAGE_NUMBER,
    SMC_SIZE, SmcEstablishHwc, SmcHeader,
};
use crate::{Error, WaitHost};

/// Bytes of the request and response buffers (the HWC's messages are at most a page).
const MESSAGE_BUFFER: usize = PAGE_SIZE;
/// Smallest request/response size a usable device must take (the largest message this driver
/// sends is the 640-byte version check).
const MIN_MESSAGE: u32 = 1024;

/// Bounds of one wait.
#[derive(Clone, Copy, Debug)]
pub(crate) struct WaitLimits {
    /// Longest wait in nanoseconds.
    pub timeout_ns: u64,
    /// Most turns of the loop, whatever the clock says.
    pub max_iterations: u32,
}

/// A running bounded wait.
pub(crate) struct Deadline {
    start_ns: u64,
    limits: WaitLimits,
    iterations: u32,
}

impl Deadline {
    pub(crate) fn start(host: &mut dyn WaitHost, limits: WaitLimits) -> Self {
        Deadline {
            start_ns: host.now_ns(),
            limits,
            iterations: 0,
        }
    }

    /// One more turn; `Some(waited_ns)` when the wait is over.
    pub(crate) fn expired(&mut self, host: &mut dyn WaitHost) -> Option<u64> {
        self.iterations += 1;
        host.idle();
        let waited = host.now_ns().saturating_sub(self.start_ns);
        (waited > self.limits.timeout_ns || self.iterations > self.limits.max_iterations)
            .then_some(waited)
    }
}

/// True when BAR0 reads like a removed device (all-ones, or zero where a version must be).
pub(crate) fn is_removed(regs: &dyn RegisterIo) -> bool {
    matches!(regs.read32(regs::VERSION), 0 | u32::MAX)
}

/// Reads the register map at BAR0 offset 0.
pub(crate) fn read_register_map(regs: &dyn RegisterIo) -> RegisterMap {
    let mut bytes = [0u8; size_of::<RegisterMap>()];
    for (index, chunk) in bytes.chunks_exact_mut(4).enumerate() {
        chunk.copy_from_slice(&regs.read32(regs::REGISTER_MAP + index * 4).to_le_bytes());
    }
    RegisterMap::read_from_bytes(&bytes).unwrap_or_default()
}

/// Runs one SMC command: arguments, then the header dword that starts it; waits for the
/// device's response bit.
fn smc_command(
    regs: &dyn RegisterIo,
    smc_offset: usize,
    message: &SmcEstablishHwc,
    host: &mut dyn WaitHost,
    limits: WaitLimits,
) -> Result<(), Error> {
    let command = message.header & regs::SMC_TYPE_MASK;
    let bytes = message.as_bytes();
    for (index, chunk) in bytes.chunks_exact(4).enumerate() {
        let value = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        regs.write32(smc_offset + index * 4, value);
    }
    let mut deadline = Deadline::start(host, limits);
    loop {
        let header = regs.read32(smc_offset + SMC_HEADER);
        if header == u32::MAX {
            return Err(Error::DeviceGone {
                operation: "SMC command",
                status: header,
            });
        }
        if SmcHeader::from_bits_retain(header).contains(SmcHeader::IS_RESPONSE) {
            let status = regs::smc_status(header);
            return if status == 0 {
                Ok(())
            } else {
                Err(Error::SmcFailed { command, status })
            };
        }
        if let Some(waited_ns) = deadline.expired(host) {
            return Err(Error::SmcTimeout { command, waited_ns });
        }
    }
}

/// Events of the HWC EQ outside of request handling.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum HwcEvent {
    /// The vPort's link came up.
    LinkUp,
    /// The vPort's link went down.
    LinkDown,
    /// The device asks the driver to reset (re-initialise) itself.
    ResetRequest,
    /// A test EQE arrived.
    Test,
    /// The EQ was overrun or holds garbage.
    Overflow,
}

/// Counters of things the device got wrong on the HWC.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HwcCounters {
    /// Requests answered.
    pub requests: u64,
    /// EQEs of unknown type or with out-of-range data, dropped.
    pub bad_events: u64,
    /// CQEs for a queue that is not the HWC's, dropped.
    pub bad_completions: u64,
}

/// Where an established HWC stands.
pub(crate) struct Hwc {
    eq: EntryRing<Eqe>,
    cq: EntryRing<Cqe>,
    sq: WorkRing,
    rq: WorkRing,
    request: DmaRegion,
    response: DmaRegion,
    /// BAR0 offset of the SMC window.
    smc_offset: usize,
    /// BAR0 offset of the HWC's doorbell page.
    doorbell_page: usize,
    /// Memory key for the HWC's buffers.
    gpa_mkey: u32,
    /// Largest request the device takes.
    max_request: u32,
    /// Largest response the device writes.
    max_response: u32,
    /// Position of the posted receive WQE.
    receive_posted: Option<u32>,
    /// Length of each posted send WQE.
    send_wqe_len: u32,
    next_message_id: u16,
    /// Events seen while waiting for a response, handed out by `poll_events`.
    pending: Vec<HwcEvent>,
    /// EQEs were taken since the EQ was last armed.
    events_consumed: bool,
    pub(crate) counters: HwcCounters,
    pub(crate) limits: WaitLimits,
}

/// Values the device gives during HWC init.
#[derive(Default)]
struct InitValues {
    eq_id: Option<u32>,
    doorbell: Option<u32>,
    cq_id: Option<u32>,
    rq_id: Option<u32>,
    sq_id: Option<u32>,
    queue_depth: Option<u32>,
    max_request: Option<u32>,
    max_response: Option<u32>,
    gpa_mkey: u32,
}

impl Hwc {
    /// Establishes the HWC: allocates its queues, runs ESTABLISH_HWC with `msix_index` for its
    /// EQ, and takes the init EQEs. Every wait is bounded by `limits`.
    pub(crate) fn establish(
        regs: &dyn RegisterIo,
        dma: &dyn DmaAllocator,
        host: &mut dyn WaitHost,
        map: &RegisterMap,
        msix_index: u16,
        limits: WaitLimits,
    ) -> Result<Hwc, Error> {
        let smc_offset = usize::try_from(map.smc_offset).unwrap_or(usize::MAX);
        if usize::from(map.smc_size) < SMC_SIZE
            || smc_offset
                .checked_add(SMC_SIZE)
                .is_none_or(|end| end > regs.len())
        {
            return Err(Error::ManaProtocol {
                what: "SMC window outside BAR0",
                value: map.smc_offset,
            });
        }
        let eq = EntryRing::<Eqe>::new(dma, PAGE_SIZE, "MANA HWC event queue")?;
        let cq = EntryRing::<Cqe>::new(dma, PAGE_SIZE, "MANA HWC completion queue")?;
        let sq = WorkRing::new(dma, PAGE_SIZE, "MANA HWC send queue")?;
        let rq = WorkRing::new(dma, PAGE_SIZE, "MANA HWC receive queue")?;
        let request = allocate(dma, MESSAGE_BUFFER, "MANA HWC request buffer")?;
        let response = allocate(dma, MESSAGE_BUFFER, "MANA HWC response buffer")?;

        let page = |region: &DmaRegion| -> Result<([u8; 6], u16), Error> {
            let number = region.phys().0 / PAGE_SIZE as u64;
            if number > SMC_MAX_PAGE_NUMBER {
                return Err(Error::ManaProtocol {
                    what: "HWC page above the SMC's 52-bit page numbers",
                    value: number,
                });
            }
            Ok(regs::split_page_number(number))
        };
        let (eq_page, eq_high) = page(eq.region())?;
        let (cq_page, cq_high) = page(cq.region())?;
        let (rq_page, rq_high) = page(rq.region())?;
        let (sq_page, sq_high) = page(sq.region())?;
        let message = SmcEstablishHwc {
            eq_page,
            cq_page,
            rq_page,
            sq_page,
            page_high_bits: eq_high | cq_high << 4 | rq_high << 8 | sq_high << 12,
            msix_index,
            header: regs::smc_request(SMC_ESTABLISH_HWC),
        };
        smc_command(regs, smc_offset, &message, host, limits)?;

        let mut hwc = Hwc {
            eq,
            cq,
            sq,
            rq,
            request,
            response,
            smc_offset,
            doorbell_page: 0,
            gpa_mkey: 0,
            max_request: 0,
            max_response: 0,
            receive_posted: None,
            send_wqe_len: wqe_len(size_of::<HwcTxOob>(), 1) as u32,
            next_message_id: 1,
            pending: Vec::new(),
            events_consumed: false,
            counters: HwcCounters::default(),
            limits,
        };
        let values = hwc.take_init_events(regs, host)?;
        hwc.apply_init_values(regs, map, &values)?;
        hwc.post_receive()?;
        hwc.ring_receive(regs);
        hwc.arm_events(regs);
        Ok(hwc)
    }

    /// Reads HWC init EQEs until INIT_DONE.
    fn take_init_events(
        &mut self,
        regs: &dyn RegisterIo,
        host: &mut dyn WaitHost,
    ) -> Result<InitValues, Error> {
        let mut values = InitValues::default();
        let mut deadline = Deadline::start(host, self.limits);
        loop {
            match self.eq.poll() {
                Polled::Entry(eqe) => {
                    let data = eqe.data_u32();
                    match eqe.event_type() {
                        EQE_HWC_INIT_EQ_ID_DB => {
                            values.eq_id = Some(HwcInitEqIdDb::eq_id(data));
                            values.doorbell = Some(HwcInitEqIdDb::doorbell(data));
                        }
                        EQE_HWC_INIT_DATA => {
                            let (kind, value) = hwc_init_data(data);
                            match kind {
                                HWC_INIT_CQ_ID => values.cq_id = Some(value),
                                HWC_INIT_RQ_ID => values.rq_id = Some(value),
                                HWC_INIT_SQ_ID => values.sq_id = Some(value),
                                HWC_INIT_QUEUE_DEPTH => values.queue_depth = Some(value),
                                HWC_INIT_MAX_REQUEST => values.max_request = Some(value),
                                HWC_INIT_MAX_RESPONSE => values.max_response = Some(value),
                                HWC_INIT_GPA_MKEY => values.gpa_mkey = value,
                                HWC_INIT_MAX_NUM_CQS | HWC_INIT_PDID => {}
                                other => {
                                    self.counters.bad_events += 1;
                                    log::warn!("MANA HWC: unknown init data type {other}");
                                }
                            }
                        }
                        EQE_HWC_INIT_DONE => return Ok(values),
                        other => {
                            self.counters.bad_events += 1;
                            log::warn!("MANA HWC: unexpected EQE type {other} during init");
                        }
                    }
                    continue;
                }
                Polled::Overflow { found, expected } => {
                    return Err(Error::ManaProtocol {
                        what: "HWC event queue owner count",
                        value: u64::from(found) << 8 | u64::from(expected),
                    });
                }
                Polled::Empty => {}
            }
            if is_removed(regs) {
                return Err(Error::DeviceGone {
                    operation: "HWC init",
                    status: regs.read32(regs::VERSION),
                });
            }
            if let Some(waited_ns) = deadline.expired(host) {
                return Err(Error::HwcTimeout {
                    request: u32::from(EQE_HWC_INIT_DONE),
                    waited_ns,
                });
            }
        }
    }

    fn apply_init_values(
        &mut self,
        regs: &dyn RegisterIo,
        map: &RegisterMap,
        values: &InitValues,
    ) -> Result<(), Error> {
        let missing = |what| Error::ManaProtocol { what, value: 0 };
        self.eq.id = values.eq_id.ok_or(missing("HWC init gave no EQ id"))?;
        self.cq.id = values.cq_id.ok_or(missing("HWC init gave no CQ id"))?;
        self.sq.id = values.sq_id.ok_or(missing("HWC init gave no SQ id"))?;
        self.rq.id = values.rq_id.ok_or(missing("HWC init gave no RQ id"))?;
        let depth = values.queue_depth.unwrap_or(0);
        if depth == 0 {
            return Err(Error::ManaProtocol {
                what: "HWC queue depth",
                value: u64::from(depth),
            });
        }
        self.max_request = values.max_request.unwrap_or(0).min(MESSAGE_BUFFER as u32);
        self.max_response = values.max_response.unwrap_or(0).min(MESSAGE_BUFFER as u32);
        if self.max_request < MIN_MESSAGE || self.max_response < MIN_MESSAGE {
            return Err(Error::ManaProtocol {
                what: "HWC message size limit",
                value: u64::from(self.max_request.min(self.max_response)),
            });
        }
        self.gpa_mkey = values.gpa_mkey;
        self.doorbell_page = doorbell_page(regs, map, values.doorbell.unwrap_or(0))?;
        Ok(())
    }

    /// Posts the receive WQE for the next response.
    fn post_receive(&mut self) -> Result<(), Error> {
        if self.receive_posted.is_some() {
            return Ok(());
        }
        let mut wqe = [0u8; wqe_len(8, 1)];
        let header = WqeHeader {
            params: WqeParams::encode(1, CLIENT_OOB_8, false, 0),
            ..WqeHeader::default()
        };
        let sge = Sge {
            address: self.response.phys().0,
            mem_key: self.gpa_mkey,
            size: self.max_response,
        };
        wqe[..8].copy_from_slice(header.as_bytes());
        wqe[16..32].copy_from_slice(sge.as_bytes());
        let position = self.rq.post(&wqe).ok_or(Error::ManaProtocol {
            what: "HWC receive queue full",
            value: 0,
        })?;
        self.receive_posted = Some(position);
        Ok(())
    }

    fn ring_receive(&self, regs: &dyn RegisterIo) {
        regs.write64(
            self.doorbell_page + regs::DOORBELL_RQ,
            regs::wq_doorbell(self.rq.id, 1, self.rq.tail()),
        );
    }

    /// Re-arms the HWC EQ so the next event raises its MSI-X vector.
    pub(crate) fn arm_events(&self, regs: &dyn RegisterIo) {
        regs.write64(
            self.doorbell_page + regs::DOORBELL_EQ,
            regs::cq_eq_doorbell(self.eq.id, self.eq.doorbell_position(), true),
        );
    }

    /// Sends one request and returns the response body (after the response header).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn request_raw(
        &mut self,
        regs: &dyn RegisterIo,
        host: &mut dyn WaitHost,
        message_type: u32,
        versions: (u16, u16),
        device_id: GdmaDeviceId,
        body: &[u8],
        response_body_len: usize,
    ) -> Result<Vec<u8>, Error> {
        let request_len = size_of::<GdmaRequestHeader>() + body.len();
        let response_len = size_of::<GdmaResponseHeader>() + response_body_len;
        if request_len > self.max_request as usize || response_len > self.max_response as usize {
            return Err(Error::ManaProtocol {
                what: "HWC message larger than the device takes",
                value: request_len.max(response_len) as u64,
            });
        }
        let message_id = self.next_message_id;
        self.next_message_id = self.next_message_id.wrapping_add(1).max(1);
        let header = GdmaRequestHeader {
            request: GdmaMessageHeader {
                header_type: GDMA_STANDARD_HEADER,
                message_type,
                message_version: versions.0,
                hwc_message_id: message_id,
                message_size: request_len as u32,
            },
            response: GdmaMessageHeader {
                header_type: GDMA_STANDARD_HEADER,
                message_type,
                message_version: versions.1,
                hwc_message_id: message_id,
                message_size: response_len as u32,
            },
            device_id,
            activity_id: u32::from(message_id),
        };
        let buffer = self.request.as_mut_slice();
        buffer[..size_of::<GdmaRequestHeader>()].copy_from_slice(header.as_bytes());
        buffer[size_of::<GdmaRequestHeader>()..request_len].copy_from_slice(body);
        if self.receive_posted.is_none() {
            // Given up after a timeout: post and announce a fresh one.
            self.post_receive()?;
            self.ring_receive(regs);
        }
        let receive_position = self.receive_posted.unwrap_or(0);

        let mut wqe = [0u8; wqe_len(size_of::<HwcTxOob>(), 1)];
        let wqe_header = WqeHeader {
            params: WqeParams::encode(1, CLIENT_OOB_24, false, 0),
            ..WqeHeader::default()
        };
        let oob = HwcTxOob {
            reserved: 0,
            vrq_id: self.rq.id,
            vrcq_id: self.cq.id,
            vscq_id: self.cq.id,
            vsq_id: self.sq.id,
        };
        let sge = Sge {
            address: self.request.phys().0,
            mem_key: self.gpa_mkey,
            size: request_len as u32,
        };
        wqe[..8].copy_from_slice(wqe_header.as_bytes());
        wqe[8..32].copy_from_slice(oob.as_bytes());
        wqe[32..48].copy_from_slice(sge.as_bytes());
        if self.sq.post(&wqe).is_none() {
            // Completions were lost (a timed-out request): start the ring over.
            self.sq.reset();
            self.sq.post(&wqe).ok_or(Error::ManaProtocol {
                what: "HWC send queue full",
                value: 0,
            })?;
        }
        regs.write64(
            self.doorbell_page + regs::DOORBELL_SQ,
            regs::wq_doorbell(self.sq.id, 0, self.sq.tail()),
        );

        let received = self.wait_response(regs, host, message_type, receive_position)?;
        self.counters.requests += 1;
        self.post_receive()?;
        self.ring_receive(regs);
        self.parse_response(message_type, message_id, received)
    }

    /// Waits for the send and the receive completion of the outstanding request; returns the
    /// response length.
    fn wait_response(
        &mut self,
        regs: &dyn RegisterIo,
        host: &mut dyn WaitHost,
        message_type: u32,
        receive_position: u32,
    ) -> Result<usize, Error> {
        let mut sent = false;
        let mut received = None;
        let mut deadline = Deadline::start(host, self.limits);
        loop {
            match self.cq.poll() {
                Polled::Entry(cqe) => {
                    if cqe.wq_number() == self.sq.id && cqe.is_send() {
                        sent = true;
                        self.sq.release(self.send_wqe_len);
                    } else if cqe.wq_number() == self.rq.id && !cqe.is_send() {
                        let oob = HwcRxOob::read_from_prefix(&cqe.data)
                            .map(|(oob, _)| oob)
                            .map_err(|_| Error::ManaProtocol {
                                what: "HWC receive completion",
                                value: 0,
                            })?;
                        if oob.wqe_offset != receive_position {
                            // A late answer to a request that timed out (its receive WQE was
                            // given up), or garbage: not this request's response.
                            self.counters.bad_completions += 1;
                            log::warn!(
                                "MANA HWC: response in receive WQE {:#x}, expected {:#x}, dropped",
                                oob.wqe_offset,
                                receive_position
                            );
                            continue;
                        }
                        self.rq.release(wqe_len(8, 1) as u32);
                        self.receive_posted = None;
                        received = Some(oob.data_size as usize);
                    } else {
                        self.counters.bad_completions += 1;
                        log::warn!(
                            "MANA HWC: completion for queue {} dropped (HWC SQ {}, RQ {})",
                            cqe.wq_number(),
                            self.sq.id,
                            self.rq.id
                        );
                    }
                    if let (true, Some(len)) = (sent, received) {
                        return Ok(len);
                    }
                    continue;
                }
                Polled::Overflow { found, .. } => {
                    return Err(Error::ManaProtocol {
                        what: "HWC completion queue owner count",
                        value: u64::from(found),
                    });
                }
                Polled::Empty => {}
            }
            // Reset requests and link events may come while a request waits.
            self.collect_events();
            if is_removed(regs) {
                return Err(Error::DeviceGone {
                    operation: "HWC request",
                    status: regs.read32(regs::VERSION),
                });
            }
            if let Some(waited_ns) = deadline.expired(host) {
                // The receive WQE may still be written later: forget it and post another.
                self.rq.reset();
                self.receive_posted = None;
                return Err(Error::HwcTimeout {
                    request: message_type,
                    waited_ns,
                });
            }
        }
    }

    fn parse_response(
        &self,
        message_type: u32,
        message_id: u16,
        len: usize,
    ) -> Result<Vec<u8>, Error> {
        if len < size_of::<GdmaResponseHeader>() || len > self.max_response as usize {
            return Err(Error::ManaProtocol {
                what: "HWC response length",
                value: len as u64,
            });
        }
        let bytes = &self.response.as_slice()[..len];
        let (header, body) =
            GdmaResponseHeader::read_from_prefix(bytes).map_err(|_| Error::ManaProtocol {
                what: "HWC response header",
                value: len as u64,
            })?;
        if header.response.hwc_message_id != message_id {
            return Err(Error::ManaProtocol {
                what: "HWC response to another request",
                value: u64::from(header.response.hwc_message_id),
            });
        }
        if header.status != 0 {
            return Err(Error::HwcFailed {
                request: message_type,
                status: header.status,
            });
        }
        Ok(body.to_vec())
    }

    /// Sends a request whose response body is `Resp` (a longer body is accepted, a shorter one
    /// is a protocol error).
    pub(crate) fn request<Resp: FromBytes>(
        &mut self,
        regs: &dyn RegisterIo,
        host: &mut dyn WaitHost,
        message_type: u32,
        device_id: GdmaDeviceId,
        body: &[u8],
    ) -> Result<Resp, Error> {
        self.request_versioned(
            regs,
            host,
            message_type,
            (GDMA_MESSAGE_V1, GDMA_MESSAGE_V1),
            device_id,
            body,
        )
    }

    /// As [`Hwc::request`], with explicit request/response layout versions.
    pub(crate) fn request_versioned<Resp: FromBytes>(
        &mut self,
        regs: &dyn RegisterIo,
        host: &mut dyn WaitHost,
        message_type: u32,
        versions: (u16, u16),
        device_id: GdmaDeviceId,
        body: &[u8],
    ) -> Result<Resp, Error> {
        let response = self.request_raw(
            regs,
            host,
            message_type,
            versions,
            device_id,
            body,
            size_of::<Resp>(),
        )?;
        Resp::read_from_prefix(&response)
            .map(|(value, _)| value)
            .map_err(|_| Error::ManaProtocol {
                what: "HWC response body too short",
                value: response.len() as u64,
            })
    }

    /// Moves HWC EQ events into `pending`.
    fn collect_events(&mut self) {
        loop {
            match self.eq.poll() {
                Polled::Entry(eqe) => {
                    self.events_consumed = true;
                    if let Some(event) = self.classify(&eqe) {
                        self.pending.push(event);
                    }
                }
                Polled::Overflow { found, expected } => {
                    self.counters.bad_events += 1;
                    log::warn!("MANA HWC: event queue owner count {found}, expected {expected}");
                    self.pending.push(HwcEvent::Overflow);
                    return;
                }
                Polled::Empty => return,
            }
        }
    }

    fn classify(&mut self, eqe: &Eqe) -> Option<HwcEvent> {
        match eqe.event_type() {
            // The HWC CQ is polled directly; its completion events carry nothing new.
            EQE_COMPLETION if eqe.data_u32() == self.cq.id => None,
            EQE_HWC_RESET_REQUEST => Some(HwcEvent::ResetRequest),
            EQE_TEST_EVENT => Some(HwcEvent::Test),
            EQE_HWC_RECONFIG_DATA => {
                let reconfig = EqeReconfig::read_from_bytes(&eqe.data).ok()?;
                match reconfig.data_type {
                    RECONFIG_LINK_CONNECT => Some(HwcEvent::LinkUp),
                    RECONFIG_LINK_DISCONNECT => Some(HwcEvent::LinkDown),
                    // Not asked for (no DRIVER_CAP for it); the driver's own bound stays.
                    RECONFIG_HWC_TIMEOUT => None,
                    other => {
                        self.counters.bad_events += 1;
                        log::warn!("MANA HWC: unknown reconfig type {other} dropped");
                        None
                    }
                }
            }
            other => {
                self.counters.bad_events += 1;
                log::warn!(
                    "MANA HWC: EQE type {other} (data {:#x}) dropped",
                    eqe.data_u32()
                );
                None
            }
        }
    }

    /// Drains the HWC EQ, re-arms it when it took anything (the device disarms an EQ each
    /// time it posts), and returns every event since the last call.
    pub(crate) fn poll_events(&mut self, regs: &dyn RegisterIo) -> Vec<HwcEvent> {
        let before = self.eq.doorbell_position();
        self.collect_events();
        if self.eq.doorbell_position() != before || self.events_consumed {
            self.events_consumed = false;
            self.arm_events(regs);
        }
        core::mem::take(&mut self.pending)
    }

    /// The HWC EQ's id (control events are posted there).
    pub(crate) fn event_queue_id(&self) -> u32 {
        self.eq.id
    }

    /// Tears the HWC down with SMC DESTROY_HWC; the queues are freed when `self` drops.
    pub(crate) fn destroy(
        self,
        regs: &dyn RegisterIo,
        host: &mut dyn WaitHost,
    ) -> Result<(), Error> {
        let message = SmcEstablishHwc {
            header: regs::smc_request(SMC_DESTROY_HWC),
            ..SmcEstablishHwc::default()
        };
        smc_command(regs, self.smc_offset, &message, host, self.limits)
    }
}

/// BAR0 offset of doorbell page `index`, checked against BAR0.
pub(crate) fn doorbell_page(
    regs: &dyn RegisterIo,
    map: &RegisterMap,
    index: u32,
) -> Result<usize, Error> {
    let page_size = usize::from(map.doorbell_page_size);
    let offset = usize::try_from(map.doorbell_zone_offset)
        .ok()
        .and_then(|zone| zone.checked_add(page_size.checked_mul(index as usize)?));
    match offset {
        Some(offset)
            if page_size > regs::DOORBELL_EQ
                && offset
                    .checked_add(regs::DOORBELL_EQ + 8)
                    .is_some_and(|end| end <= regs.len()) =>
        {
            Ok(offset)
        }
        _ => Err(Error::ManaProtocol {
            what: "doorbell page outside BAR0",
            value: u64::from(index),
        }),
    }
}
