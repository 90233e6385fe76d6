//! [`Mana`]: a MANA function (one vPort, one SQ/RQ pair) as a [`NetDevice`].
//!
//! States: `Up`/`Down` (running; link as the device's reconfig EQEs say), `Resetting` (the
//! device sent a reset-request EQE, or one of its queues overflowed or held garbage: `poll`
//! tears everything down and brings the function up again — **a reset request means
//! re-initialisation**, falling back to `Gone` only when BAR0 reads as removed), `Stopped`
//! (after `stop`: receive disabled, queues destroyed, HWC destroyed, no DMA), `Gone` (removed:
//! no register access ever again).
//!
//! Bring-up order (OpenVMM `gdma`/`gdma_defs` and the MANA section of
//! `reference/hyperv-vmbus-netvsc.md` §5): register map → HWC (SMC, init EQEs) → verify
//! version → max resources → list devices → register the BNIC → data EQ (DMA region + create
//! queue with its MSI-X index) → device config → vPort config (MAC) → vPort TX config → SQ and
//! RQ work-queue objects (each with its CQ) → receive buffers → vPort RX enable.

use alloc::boxed::Box;
use alloc::collections::VecDeque;
use alloc::string::String;
use alloc::vec::Vec;

use net_device::{
    Capabilities, DeviceError, DmaAllocator, DmaRegion, LinkState, MacAddress, NetDevice,
    RegisterIo, RxMeta, Stats, TxMeta,
};
use zerocopy::{FromBytes, IntoBytes};

use super::defs::{
    CLIENT_OOB_8, CLIENT_OOB_24, CQE_RX_OBJECT_FENCE, CQE_RX_OKAY, CQE_RX_TRUNCATED, CQE_TX_OKAY,
    ConfigVportRxRequest, ConfigVportTxRequest, ConfigVportTxResponse, Cqe, CreateDmaRegionRequest,
    CreateDmaRegionResponse, CreateQueueRequest, CreateQueueResponse, CreateWqObjectRequest,
    CreateWqObjectResponse, DRIVER_CAP_HW_VPORT_LINK_AWARE, DRIVER_CAP_SELF_RESET_ON_EQE,
    DestroyWqObjectRequest, DisableQueueRequest, EQE_COMPLETION, EQE_TEST_EVENT, Eqe,
    GDMA_CREATE_DMA_REGION, GDMA_CREATE_QUEUE, GDMA_DEREGISTER_DEVICE, GDMA_DEVICE_MANA,
    GDMA_DISABLE_QUEUE, GDMA_GENERATE_RESET_REQUEST_EQE, GDMA_GENERATE_TEST_EQE, GDMA_LIST_DEVICES,
    GDMA_MESSAGE_V1, GDMA_PAGE_TYPE_4K, GDMA_PROTOCOL_V1, GDMA_QUERY_MAX_RESOURCES,
    GDMA_REGISTER_DEVICE, GDMA_VERIFY_VF_DRIVER_VERSION, GdmaDeviceId,
    GenerateResetRequestEqeRequest, GenerateTestEqeRequest, HWC_DEVICE_ID, ListDevicesResponse,
    MANA_CONFIG_VPORT_RX, MANA_CONFIG_VPORT_TX, MANA_CREATE_WQ_OBJ, MANA_DESTROY_WQ_OBJ,
    MANA_LONG_PACKET_FORMAT, MANA_QUERY_DEV_CONFIG, MANA_QUERY_DEV_CONFIG_REQUEST_V1,
    MANA_QUERY_DEV_CONFIG_RESPONSE_V4, MANA_QUERY_VPORT_CONFIG, MAX_LISTED_DEVICES, ManaCqeHeader,
    PAGE_SIZE, QUEUE_TYPE_EQ, QUEUE_TYPE_RQ, QUEUE_TYPE_SQ, QueryDeviceConfigRequest,
    QueryDeviceConfigResponse, QueryMaxResourcesResponse, QueryVportConfigRequest,
    QueryVportConfigResponse, RegisterDeviceResponse, RxCompletionOob, RxFlags, Sge,
    TRISTATE_FALSE, TRISTATE_TRUE, TxCompletionOob, TxLongOob, VerifyVersionRequest,
    VerifyVersionResponse, WqeHeader, WqeParams, tx_long_oob_vport_offset, wqe_len,
};
use super::hwc::{self, Hwc, HwcCounters, HwcEvent, WaitLimits};
use super::queues::{EntryRing, Polled, TxArena, WorkRing, allocate};
use super::regs::{self, RegisterMap};
use super::transmit::{self, TxKind};
use crate::{Error, WaitHost};

/// Ethernet header length.
const ETHERNET_HEADER: usize = 14;
/// One 802.1Q tag.
const VLAN_TAG: usize = 4;
/// Largest IP packet, hence the largest LSO frame's IP part.
const MAX_IP_PACKET: usize = 65_535;
/// Bytes of a receive WQE: header, 8-byte OOB, one SGE.
const RX_WQE_LEN: usize = wqe_len(8, 1);
/// Bytes of the largest transmit WQE: header, 24-byte OOB, two SGEs.
const TX_WQE_MAX: usize = wqe_len(24, 2);
/// Device-assigned queue ids are 24-bit in doorbells and CQEs.
const MAX_QUEUE_ID: u32 = 0xff_ffff;
/// First automatic re-initialisation attempt after a reset request.
const REINIT_INITIAL_BACKOFF_NS: u64 = 1_000_000;
/// Longest delay between automatic re-initialisation attempts.
const REINIT_MAX_BACKOFF_NS: u64 = 1_000_000_000;

/// Driver settings. `ManaConfig::default()` suits a 1500-byte MTU.
#[derive(Clone, Debug)]
pub struct ManaConfig {
    /// Name for logs and [`NetDevice::name`], e.g. "mana 00:04.0".
    pub name: String,
    /// Receive buffers (a power of two, 8..=1024).
    pub rx_ring_size: u16,
    /// Transmit WQEs outstanding at most (a power of two, 8..=1024).
    pub tx_ring_size: u16,
    /// Bytes per receive buffer (must hold a whole frame: at least MTU + 18).
    pub rx_buffer_size: usize,
    /// Bytes of transmit buffer memory (at least one largest LSO frame when offloads are on).
    pub tx_buffer_bytes: usize,
    /// Largest IP packet; the device's own MTU caps it when it reports one.
    pub mtu: usize,
    /// Which vPort of the function to drive.
    pub vport_index: u32,
    /// MSI-X table index of the HWC EQ (control events: link, reset requests).
    pub hwc_msix_index: u16,
    /// MSI-X table index of the data EQ (transmit and receive completions).
    pub data_msix_index: u16,
    /// Bound on each SMC command and each HWC request.
    pub hwc_timeout_ns: u64,
    /// Iteration bound of every wait loop, whatever the clock says.
    pub max_wait_iterations: u32,
    /// Offer transmit checksum offload and LSO (receive checksum reports are always used).
    pub offloads: bool,
}

impl Default for ManaConfig {
    fn default() -> Self {
        ManaConfig {
            name: String::from("mana"),
            rx_ring_size: 256,
            tx_ring_size: 256,
            rx_buffer_size: 2048,
            tx_buffer_bytes: 512 * 1024,
            mtu: 1500,
            vport_index: 0,
            hwc_msix_index: 0,
            data_msix_index: 1,
            hwc_timeout_ns: 2_000_000_000,
            max_wait_iterations: 10_000_000,
            offloads: true,
        }
    }
}

impl ManaConfig {
    fn validate(&self) -> Result<(), Error> {
        let ring_ok = |size: u16| size.is_power_of_two() && (8..=1024).contains(&size);
        if !ring_ok(self.rx_ring_size) || !ring_ok(self.tx_ring_size) {
            return Err(Error::InvalidConfig {
                reason: "MANA ring sizes must be powers of two in 8..=1024",
            });
        }
        if self.rx_buffer_size < self.mtu + ETHERNET_HEADER + VLAN_TAG
            || !self.rx_buffer_size.is_multiple_of(64)
            || self.rx_buffer_size > 16 * 1024
        {
            return Err(Error::InvalidConfig {
                reason: "MANA rx_buffer_size must hold MTU + 18, be a multiple of 64, ≤ 16 KiB",
            });
        }
        let largest = if self.offloads {
            MAX_IP_PACKET + ETHERNET_HEADER + VLAN_TAG
        } else {
            self.mtu + ETHERNET_HEADER + VLAN_TAG
        };
        if self.tx_buffer_bytes < largest.next_multiple_of(64) {
            return Err(Error::InvalidConfig {
                reason: "MANA tx_buffer_bytes must hold the largest frame",
            });
        }
        if self.data_msix_index == self.hwc_msix_index {
            return Err(Error::InvalidConfig {
                reason: "MANA HWC and data EQs need different MSI-X indexes",
            });
        }
        Ok(())
    }
}

/// Things the device got wrong or asked for, beyond [`Stats`]. They only grow.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ManaCounters {
    /// Completed bring-ups (first one and re-initialisations).
    pub initializations: u64,
    /// Reset-request EQEs taken.
    pub reset_requests: u64,
    /// Link up/down events taken.
    pub link_events: u64,
    /// Completion or event queues found overrun or holding garbage.
    pub queue_overflows: u64,
    /// Data-path CQEs for another queue, of an unknown type, or naming a WQE never posted.
    pub bad_completions: u64,
    /// Data EQEs of an unexpected type or for an unknown CQ.
    pub bad_events: u64,
    /// Transmit completions with an error type (the frame was dropped by the device).
    pub tx_errors: u64,
    /// Frames sent with device checksum insertion.
    pub tx_checksum_offloads: u64,
    /// Frames sent with LSO.
    pub tx_segmentation_offloads: u64,
    /// Frames whose checksum the driver completed.
    pub tx_software_checksums: u64,
    /// Frames dropped because their offload request was unusable.
    pub tx_refused: u64,
    /// Test EQEs seen (bring-up's interrupt check, or asked for with
    /// [`Mana::generate_test_event`]).
    pub test_events: u64,
    /// HWC counters.
    pub hwc: HwcCounters,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Up,
    Down,
    Resetting,
    Stopped,
    Gone,
}

/// A transmit WQE in flight.
struct TxInFlight {
    wqe_len: u32,
    arena_end: u64,
    frame_len: usize,
}

/// A receive WQE in flight.
struct RxPosted {
    position: u32,
    buffer: u16,
}

/// The data path's queues and buffers; dropped (freed) only when the device no longer uses
/// them (queues destroyed, or the device gone).
struct DataPath {
    eq: EntryRing<Eqe>,
    tx_cq: EntryRing<Cqe>,
    rx_cq: EntryRing<Cqe>,
    sq: WorkRing,
    rq: WorkRing,
    sq_object: Option<u64>,
    rq_object: Option<u64>,
    eq_created: bool,
    rx_buffers: DmaRegion,
    rx_posted: VecDeque<RxPosted>,
    rx_doorbell_added: u8,
    tx_arena: TxArena,
    tx_in_flight: VecDeque<TxInFlight>,
    tx_doorbell_pending: bool,
    eq_armed: bool,
    tx_cq_armed: bool,
    rx_cq_armed: bool,
}

/// What the device told the driver at bring-up.
#[derive(Clone, Copy, Debug, Default)]
struct Function {
    device_id: GdmaDeviceId,
    registered: bool,
    pdid: u32,
    gpa_mkey: u32,
    doorbell_page: usize,
    vport: u64,
    tx_vport_offset: u16,
    short_form: bool,
    mtu: usize,
}

/// The MANA driver.
pub struct Mana<R: RegisterIo, D: DmaAllocator> {
    regs: R,
    host: Box<dyn WaitHost>,
    config: ManaConfig,
    state: State,
    mac: MacAddress,
    hwc: Option<Hwc>,
    data: Option<DataPath>,
    function: Function,
    stats: Stats,
    counters: ManaCounters,
    reinit_at_ns: Option<u64>,
    reinit_backoff_ns: u64,
    /// Kept to the end (fields drop in order) so the allocator outlives the regions it gave out.
    dma: D,
}

impl<R: RegisterIo, D: DmaAllocator> Mana<R, D> {
    /// Brings the function up (module docs). Every wait is bounded by
    /// [`ManaConfig::hwc_timeout_ns`] and [`ManaConfig::max_wait_iterations`] through `host`.
    pub fn new(
        regs: R,
        dma: D,
        host: Box<dyn WaitHost>,
        config: ManaConfig,
    ) -> Result<Self, Error> {
        config.validate()?;
        let mut mana = Mana {
            regs,
            host,
            config,
            state: State::Resetting,
            mac: MacAddress::default(),
            hwc: None,
            data: None,
            function: Function::default(),
            stats: Stats::default(),
            counters: ManaCounters::default(),
            reinit_at_ns: None,
            reinit_backoff_ns: REINIT_INITIAL_BACKOFF_NS,
            dma,
        };
        mana.reinitialize()?;
        Ok(mana)
    }

    /// Tears down whatever is set up and brings the function up again, as at start-up. Use it
    /// to restart after [`NetDevice::stop`]; `poll` calls it by itself after a reset request.
    /// Fails with [`Error::DeviceGone`] once the device is gone.
    pub fn reinitialize(&mut self) -> Result<(), Error> {
        if self.state == State::Gone {
            return Err(Error::DeviceGone {
                operation: "reinitialize",
                status: u32::MAX,
            });
        }
        self.tear_down();
        self.state = State::Resetting;
        match self.bring_up() {
            Ok(()) => {
                self.counters.initializations += 1;
                self.state = State::Up;
                log::info!(
                    "{}: up, MAC {}, vPort {:#x}, MTU {}",
                    self.config.name,
                    self.mac,
                    self.function.vport,
                    self.function.mtu
                );
                Ok(())
            }
            Err(error) => {
                log::error!("{}: initialisation failed: {error}", self.config.name);
                if hwc::is_removed(&self.regs) {
                    self.become_gone();
                } else {
                    self.tear_down();
                    self.state = State::Resetting;
                }
                Err(error)
            }
        }
    }

    fn limits(&self) -> WaitLimits {
        WaitLimits {
            timeout_ns: self.config.hwc_timeout_ns,
            max_iterations: self.config.max_wait_iterations,
        }
    }

    /// One HWC request with a typed response.
    fn call<Resp: FromBytes>(
        &mut self,
        message_type: u32,
        device_id: GdmaDeviceId,
        body: &[u8],
    ) -> Result<Resp, Error> {
        let hwc = self.hwc.as_mut().ok_or(Error::NotReady {
            operation: "HWC request",
        })?;
        hwc.request(
            &self.regs,
            self.host.as_mut(),
            message_type,
            device_id,
            body,
        )
    }

    /// One HWC request without a response body.
    fn call_empty(
        &mut self,
        message_type: u32,
        device_id: GdmaDeviceId,
        body: &[u8],
    ) -> Result<(), Error> {
        let hwc = self.hwc.as_mut().ok_or(Error::NotReady {
            operation: "HWC request",
        })?;
        hwc.request_raw(
            &self.regs,
            self.host.as_mut(),
            message_type,
            (GDMA_MESSAGE_V1, GDMA_MESSAGE_V1),
            device_id,
            body,
            0,
        )
        .map(|_| ())
    }

    fn bring_up(&mut self) -> Result<(), Error> {
        if hwc::is_removed(&self.regs) {
            return Err(Error::DeviceGone {
                operation: "initialisation",
                status: self.regs.read32(regs::VERSION),
            });
        }
        let map = hwc::read_register_map(&self.regs);
        let limits = self.limits();
        let hwc = Hwc::establish(
            &self.regs,
            &self.dma,
            self.host.as_mut(),
            &map,
            self.config.hwc_msix_index,
            limits,
        )?;
        self.hwc = Some(hwc);
        self.verify_version()?;
        self.query_max_resources()?;
        self.function.device_id = self.find_mana_device()?;
        self.register_device(&map)?;
        self.create_data_path()?;
        self.query_configuration()?;
        self.create_work_queues()?;
        self.start_receive()
    }

    fn verify_version(&mut self) -> Result<(), Error> {
        let mut request = VerifyVersionRequest {
            protocol_version_min: GDMA_PROTOCOL_V1,
            protocol_version_max: GDMA_PROTOCOL_V1,
            driver_capabilities: [
                DRIVER_CAP_HW_VPORT_LINK_AWARE | DRIVER_CAP_SELF_RESET_ON_EQE,
                0,
                0,
                0,
            ],
            driver_version: 1,
            os_type: 0,
            reserved: 0,
            os_version: [0; 4],
            reserved2: 0,
            os_strings: [[0; 128]; 4],
        };
        let name = b"tandem vf-driver mana";
        request.os_strings[0][..name.len()].copy_from_slice(name);
        let response: VerifyVersionResponse = self.call(
            GDMA_VERIFY_VF_DRIVER_VERSION,
            HWC_DEVICE_ID,
            request.as_bytes(),
        )?;
        if response.protocol_version != GDMA_PROTOCOL_V1 {
            return Err(Error::ManaProtocol {
                what: "GDMA protocol version",
                value: response.protocol_version,
            });
        }
        Ok(())
    }

    fn query_max_resources(&mut self) -> Result<(), Error> {
        let response: QueryMaxResourcesResponse =
            self.call(GDMA_QUERY_MAX_RESOURCES, HWC_DEVICE_ID, &[])?;
        let enough = response.max_eq >= 1
            && response.max_cq >= 2
            && response.max_sq >= 1
            && response.max_rq >= 1
            && (response.max_msix == 0
                || response.max_msix > u32::from(self.config.data_msix_index));
        if !enough {
            return Err(Error::ManaProtocol {
                what: "device resources (EQ/CQ/SQ/RQ/MSI-X) too few",
                value: u64::from(response.max_msix),
            });
        }
        Ok(())
    }

    fn find_mana_device(&mut self) -> Result<GdmaDeviceId, Error> {
        let response: ListDevicesResponse = self.call(GDMA_LIST_DEVICES, HWC_DEVICE_ID, &[])?;
        let count = response.count as usize;
        if count > MAX_LISTED_DEVICES {
            self.counters.bad_events += 1;
            log::warn!(
                "{}: device lists {count} functions, room for {MAX_LISTED_DEVICES}",
                self.config.name
            );
        }
        response.devices[..count.min(MAX_LISTED_DEVICES)]
            .iter()
            .copied()
            .find(|device| device.device_type == GDMA_DEVICE_MANA)
            .ok_or(Error::ManaProtocol {
                what: "no MANA function behind the HWC",
                value: count as u64,
            })
    }

    fn register_device(&mut self, map: &RegisterMap) -> Result<(), Error> {
        let device = self.function.device_id;
        let response: RegisterDeviceResponse = self.call(GDMA_REGISTER_DEVICE, device, &[])?;
        self.function.registered = true;
        self.function.pdid = response.pdid;
        self.function.gpa_mkey = response.gpa_mkey;
        self.function.doorbell_page = hwc::doorbell_page(&self.regs, map, response.doorbell_id)?;
        Ok(())
    }

    /// Describes `region` (page-aligned, `len` bytes) to the device; returns its handle.
    fn create_dma_region(&mut self, phys: u64, len: usize) -> Result<u64, Error> {
        let pages = len.div_ceil(PAGE_SIZE);
        let header = CreateDmaRegionRequest {
            length: len as u64,
            offset_in_page: 0,
            page_type: GDMA_PAGE_TYPE_4K,
            page_count: pages as u32,
            page_list_len: pages as u32,
        };
        let mut body = Vec::with_capacity(size_of::<CreateDmaRegionRequest>() + pages * 8);
        body.extend_from_slice(header.as_bytes());
        for page in 0..pages {
            body.extend_from_slice(&(phys + (page * PAGE_SIZE) as u64).to_le_bytes());
        }
        let response: CreateDmaRegionResponse =
            self.call(GDMA_CREATE_DMA_REGION, HWC_DEVICE_ID, &body)?;
        Ok(response.region)
    }

    fn check_id(what: &'static str, id: u32) -> Result<u32, Error> {
        if id > MAX_QUEUE_ID {
            return Err(Error::ManaProtocol {
                what,
                value: u64::from(id),
            });
        }
        Ok(id)
    }

    fn create_data_path(&mut self) -> Result<(), Error> {
        let tx_wqes = usize::from(self.config.tx_ring_size);
        let rx_wqes = usize::from(self.config.rx_ring_size);
        let dma: &dyn DmaAllocator = &self.dma;
        let rx_buffer_bytes = rx_wqes * self.config.rx_buffer_size;
        let data = DataPath {
            // Each armed CQ posts at most one EQE before it is re-armed: a page is plenty.
            eq: EntryRing::new(dma, PAGE_SIZE, "MANA data event queue")?,
            tx_cq: EntryRing::new(dma, tx_wqes * size_of::<Cqe>(), "MANA transmit CQ")?,
            rx_cq: EntryRing::new(dma, rx_wqes * size_of::<Cqe>(), "MANA receive CQ")?,
            sq: WorkRing::new(dma, tx_wqes * TX_WQE_MAX, "MANA send queue")?,
            rq: WorkRing::new(dma, rx_wqes * RX_WQE_LEN, "MANA receive queue")?,
            sq_object: None,
            rq_object: None,
            eq_created: false,
            rx_buffers: allocate(dma, rx_buffer_bytes, "MANA receive buffers")?,
            rx_posted: VecDeque::with_capacity(rx_wqes),
            rx_doorbell_added: 0,
            tx_arena: TxArena::new(dma, self.config.tx_buffer_bytes)?,
            tx_in_flight: VecDeque::with_capacity(tx_wqes),
            tx_doorbell_pending: false,
            eq_armed: false,
            tx_cq_armed: false,
            rx_cq_armed: false,
        };
        let (eq_phys, eq_bytes) = (data.eq.region().phys().0, data.eq.bytes());
        self.data = Some(data);
        let region = self.create_dma_region(eq_phys, eq_bytes)?;
        let request = CreateQueueRequest {
            queue_type: QUEUE_TYPE_EQ,
            pdid: self.function.pdid,
            doorbell_id: 0,
            region,
            queue_size: eq_bytes as u32,
            eq_msix_index: u32::from(self.config.data_msix_index),
            ..CreateQueueRequest::default()
        };
        let response: CreateQueueResponse =
            self.call(GDMA_CREATE_QUEUE, HWC_DEVICE_ID, request.as_bytes())?;
        let eq_id = Self::check_id("data EQ id", response.queue_id)?;
        if let Some(data) = self.data.as_mut() {
            data.eq.id = eq_id;
            data.eq_created = true;
        }
        Ok(())
    }

    fn query_configuration(&mut self) -> Result<(), Error> {
        let device = self.function.device_id;
        let request = QueryDeviceConfigRequest {
            driver_capabilities: [0; 4],
            protocol_version: [0, 1, 1],
            reserved: 0,
        };
        let hwc = self.hwc.as_mut().ok_or(Error::NotReady {
            operation: "HWC request",
        })?;
        let config: QueryDeviceConfigResponse = hwc.request_versioned(
            &self.regs,
            self.host.as_mut(),
            MANA_QUERY_DEV_CONFIG,
            (
                MANA_QUERY_DEV_CONFIG_REQUEST_V1,
                MANA_QUERY_DEV_CONFIG_RESPONSE_V4,
            ),
            device,
            request.as_bytes(),
        )?;
        if u32::from(config.max_vports) <= self.config.vport_index {
            return Err(Error::ManaProtocol {
                what: "vPort index beyond the function's vPorts",
                value: u64::from(config.max_vports),
            });
        }
        // 0 means "not reported"; anything else caps the configured MTU.
        let adapter_mtu = usize::from(config.adapter_mtu);
        self.function.mtu = if adapter_mtu > ETHERNET_HEADER + 68 {
            self.config.mtu.min(adapter_mtu - ETHERNET_HEADER)
        } else {
            self.config.mtu
        };
        let request = QueryVportConfigRequest {
            vport_index: self.config.vport_index,
        };
        let vport: QueryVportConfigResponse =
            self.call(MANA_QUERY_VPORT_CONFIG, device, request.as_bytes())?;
        let mac = MacAddress(vport.mac_address);
        if vport.max_sq == 0 || vport.max_rq == 0 || !mac.is_valid_unicast() {
            return Err(Error::ManaProtocol {
                what: "vPort without queues or a unicast MAC",
                value: u64::from(vport.max_sq.min(vport.max_rq)),
            });
        }
        self.mac = mac;
        self.function.vport = vport.vport;
        let request = ConfigVportTxRequest {
            vport: vport.vport,
            pdid: self.function.pdid,
            doorbell_page: 0,
        };
        let tx: ConfigVportTxResponse =
            self.call(MANA_CONFIG_VPORT_TX, device, request.as_bytes())?;
        self.function.tx_vport_offset = tx.tx_vport_offset;
        // The short OOB has 8 bits for the offset; larger offsets need the long form.
        self.function.short_form = tx.short_form_allowed != 0 && tx.tx_vport_offset <= 0xff;
        Ok(())
    }

    fn create_work_queue(&mut self, send: bool) -> Result<(), Error> {
        let data = self.data.as_ref().ok_or(Error::NotReady {
            operation: "create work queue",
        })?;
        let (wq, cq) = if send {
            (&data.sq, &data.tx_cq)
        } else {
            (&data.rq, &data.rx_cq)
        };
        let (wq_phys, wq_bytes) = (wq.region().phys().0, wq.bytes());
        let (cq_phys, cq_bytes) = (cq.region().phys().0, cq.bytes());
        let eq_id = data.eq.id;
        let wq_region = self.create_dma_region(wq_phys, wq_bytes)?;
        let cq_region = self.create_dma_region(cq_phys, cq_bytes)?;
        let request = CreateWqObjectRequest {
            vport: self.function.vport,
            wq_type: if send { QUEUE_TYPE_SQ } else { QUEUE_TYPE_RQ },
            reserved: 0,
            wq_region,
            cq_region,
            wq_size: wq_bytes as u32,
            cq_size: cq_bytes as u32,
            cq_moderation_context: 0,
            cq_parent_eq_id: eq_id,
        };
        let device = self.function.device_id;
        let response: CreateWqObjectResponse =
            self.call(MANA_CREATE_WQ_OBJ, device, request.as_bytes())?;
        let wq_id = Self::check_id("work queue id", response.wq_id)?;
        let cq_id = Self::check_id("completion queue id", response.cq_id)?;
        let data = self.data.as_mut().ok_or(Error::NotReady {
            operation: "create work queue",
        })?;
        if send {
            data.sq.id = wq_id;
            data.tx_cq.id = cq_id;
            data.sq_object = Some(response.wq_object);
        } else {
            data.rq.id = wq_id;
            data.rx_cq.id = cq_id;
            data.rq_object = Some(response.wq_object);
        }
        Ok(())
    }

    fn create_work_queues(&mut self) -> Result<(), Error> {
        self.create_work_queue(true)?;
        self.create_work_queue(false)
    }

    fn start_receive(&mut self) -> Result<(), Error> {
        let mkey = self.function.gpa_mkey;
        let buffer_size = self.config.rx_buffer_size;
        let data = self.data.as_mut().ok_or(Error::NotReady {
            operation: "start receive",
        })?;
        for buffer in 0..self.config.rx_ring_size {
            post_receive(data, buffer, buffer_size, mkey)?;
        }
        let doorbell = self.function.doorbell_page;
        ring_receive(&self.regs, doorbell, data);
        arm(
            &self.regs,
            doorbell,
            regs::DOORBELL_CQ,
            data.tx_cq.id,
            data.tx_cq.doorbell_position(),
        );
        arm(
            &self.regs,
            doorbell,
            regs::DOORBELL_CQ,
            data.rx_cq.id,
            data.rx_cq.doorbell_position(),
        );
        arm(
            &self.regs,
            doorbell,
            regs::DOORBELL_EQ,
            data.eq.id,
            data.eq.doorbell_position(),
        );
        data.tx_cq_armed = true;
        data.rx_cq_armed = true;
        data.eq_armed = true;
        let rq_object = data.rq_object.unwrap_or(0);
        self.set_receive(true, rq_object)
    }

    fn set_receive(&mut self, enable: bool, rq_object: u64) -> Result<(), Error> {
        let request = ConfigVportRxRequest {
            vport: self.function.vport,
            indirection_entries: 0,
            indirection_offset: 0,
            rx_enable: if enable {
                TRISTATE_TRUE
            } else {
                TRISTATE_FALSE
            },
            rss_enable: TRISTATE_FALSE,
            update_default_rx_object: u8::from(enable),
            update_hash_key: 0,
            update_indirection_table: 0,
            reserved: 0,
            default_rx_object: rq_object,
            hash_key: [0; 40],
        };
        let device = self.function.device_id;
        self.call_empty(MANA_CONFIG_VPORT_RX, device, request.as_bytes())
    }

    /// Asks the device for a test EQE on the data EQ (its MSI-X vector should fire); `poll`
    /// counts it in [`ManaCounters::test_events`].
    pub fn generate_test_event(&mut self) -> Result<(), Error> {
        let queue_id = self.data.as_ref().map_or(0, |data| data.eq.id);
        let request = GenerateTestEqeRequest { queue_id };
        self.call_empty(GDMA_GENERATE_TEST_EQE, HWC_DEVICE_ID, request.as_bytes())
    }

    /// Asks the device to post a reset-request EQE on the HWC EQ (the device's own test
    /// facility); `poll` then re-initialises the function as for a real one.
    pub fn generate_reset_request(&mut self) -> Result<(), Error> {
        let queue_id = self.hwc.as_ref().map_or(0, |hwc| hwc.event_queue_id());
        let request = GenerateResetRequestEqeRequest { queue_id, flags: 0 };
        self.call_empty(
            GDMA_GENERATE_RESET_REQUEST_EQE,
            HWC_DEVICE_ID,
            request.as_bytes(),
        )
    }

    /// Orderly teardown of whatever exists, in reverse bring-up order. Errors are logged and
    /// the rest is still attempted, but nothing is sent once the device reads as removed.
    fn tear_down(&mut self) {
        if self.hwc.is_some() && !hwc::is_removed(&self.regs) {
            let device = self.function.device_id;
            let objects = self
                .data
                .as_ref()
                .map(|data| (data.sq_object, data.rq_object, data.eq_created, data.eq.id));
            let mut steps: Vec<(&'static str, u32, GdmaDeviceId, Vec<u8>)> = Vec::new();
            if let Some((sq_object, rq_object, eq_created, eq_id)) = objects {
                if rq_object.is_some() {
                    let request = ConfigVportRxRequest {
                        vport: self.function.vport,
                        indirection_entries: 0,
                        indirection_offset: 0,
                        rx_enable: TRISTATE_FALSE,
                        rss_enable: TRISTATE_FALSE,
                        update_default_rx_object: 0,
                        update_hash_key: 0,
                        update_indirection_table: 0,
                        reserved: 0,
                        default_rx_object: 0,
                        hash_key: [0; 40],
                    };
                    steps.push((
                        "disable receive",
                        MANA_CONFIG_VPORT_RX,
                        device,
                        request.as_bytes().to_vec(),
                    ));
                }
                for (object, wq_type) in [(sq_object, QUEUE_TYPE_SQ), (rq_object, QUEUE_TYPE_RQ)] {
                    if let Some(wq_object) = object {
                        let request = DestroyWqObjectRequest {
                            wq_type,
                            reserved: 0,
                            wq_object,
                        };
                        steps.push((
                            "destroy work queue",
                            MANA_DESTROY_WQ_OBJ,
                            device,
                            request.as_bytes().to_vec(),
                        ));
                    }
                }
                if eq_created {
                    let request = DisableQueueRequest {
                        queue_type: QUEUE_TYPE_EQ,
                        queue_id: eq_id,
                        allocated_on_creation: 1,
                    };
                    steps.push((
                        "destroy event queue",
                        GDMA_DISABLE_QUEUE,
                        HWC_DEVICE_ID,
                        request.as_bytes().to_vec(),
                    ));
                }
            }
            if self.function.registered {
                steps.push(("deregister", GDMA_DEREGISTER_DEVICE, device, Vec::new()));
            }
            for (what, message_type, device_id, body) in steps {
                if let Err(error) = self.call_empty(message_type, device_id, &body) {
                    log::warn!("{}: teardown: {what}: {error}", self.config.name);
                    if matches!(error, Error::DeviceGone { .. }) {
                        break;
                    }
                }
            }
            if let Some(hwc) = self.hwc.take()
                && !hwc::is_removed(&self.regs)
            {
                let counters = hwc.counters;
                self.fold_hwc_counters(counters);
                if let Err(error) = hwc.destroy(&self.regs, self.host.as_mut()) {
                    log::warn!("{}: teardown: destroy HWC: {error}", self.config.name);
                }
            }
        }
        if let Some(hwc) = self.hwc.take() {
            self.fold_hwc_counters(hwc.counters);
        }
        self.function.registered = false;
        self.data = None;
    }

    fn fold_hwc_counters(&mut self, counters: HwcCounters) {
        self.counters.hwc.requests += counters.requests;
        self.counters.hwc.bad_events += counters.bad_events;
        self.counters.hwc.bad_completions += counters.bad_completions;
    }

    fn become_gone(&mut self) {
        if self.state != State::Gone {
            log::warn!("{}: device gone", self.config.name);
        }
        self.state = State::Gone;
        // No register access from here on; the memory is freed with the driver (a removed
        // device does no more DMA).
        if let Some(hwc) = self.hwc.take() {
            self.fold_hwc_counters(hwc.counters);
        }
    }

    /// Driver counters beyond [`Stats`].
    pub fn counters(&self) -> ManaCounters {
        let mut counters = self.counters;
        if let Some(hwc) = self.hwc.as_ref() {
            counters.hwc.requests += hwc.counters.requests;
            counters.hwc.bad_events += hwc.counters.bad_events;
            counters.hwc.bad_completions += hwc.counters.bad_completions;
        }
        counters
    }

    fn reinitialize_when_due(&mut self, now_ns: u64) {
        let due = *self
            .reinit_at_ns
            .get_or_insert(now_ns + self.reinit_backoff_ns);
        if now_ns < due {
            return;
        }
        match self.reinitialize() {
            Ok(()) => {
                self.reinit_at_ns = None;
                self.reinit_backoff_ns = REINIT_INITIAL_BACKOFF_NS;
            }
            Err(error) => {
                self.reinit_backoff_ns = (self.reinit_backoff_ns * 2).min(REINIT_MAX_BACKOFF_NS);
                self.reinit_at_ns = Some(now_ns + self.reinit_backoff_ns);
                log::warn!(
                    "{}: re-initialisation failed ({error}); next try in {} ms",
                    self.config.name,
                    self.reinit_backoff_ns / 1_000_000
                );
            }
        }
    }

    fn handle_hwc_events(&mut self) {
        let Some(hwc) = self.hwc.as_mut() else {
            return;
        };
        for event in hwc.poll_events(&self.regs) {
            match event {
                HwcEvent::LinkUp => {
                    self.counters.link_events += 1;
                    if self.state == State::Down {
                        log::info!("{}: link up", self.config.name);
                        self.state = State::Up;
                    }
                }
                HwcEvent::LinkDown => {
                    self.counters.link_events += 1;
                    if self.state == State::Up {
                        log::info!("{}: link down", self.config.name);
                        self.state = State::Down;
                    }
                }
                HwcEvent::ResetRequest => {
                    self.counters.reset_requests += 1;
                    log::warn!(
                        "{}: device asks for a reset: re-initialising",
                        self.config.name
                    );
                    self.state = State::Resetting;
                }
                HwcEvent::Overflow => {
                    self.counters.queue_overflows += 1;
                    self.state = State::Resetting;
                }
                HwcEvent::Test => self.counters.test_events += 1,
            }
        }
    }

    /// Drains the data EQ (its entries only name CQs, which are polled anyway) and re-arms it.
    fn drain_data_events(&mut self) {
        let Some(data) = self.data.as_mut() else {
            return;
        };
        let mut consumed = false;
        loop {
            match data.eq.poll() {
                Polled::Entry(eqe) => {
                    consumed = true;
                    let cq = eqe.data_u32();
                    match eqe.event_type() {
                        // Each one was an interrupt (the EQ was armed when it was posted).
                        EQE_COMPLETION if cq == data.tx_cq.id || cq == data.rx_cq.id => {
                            self.stats.interrupts += 1;
                        }
                        EQE_TEST_EVENT => self.counters.test_events += 1,
                        other => {
                            self.counters.bad_events += 1;
                            log::warn!(
                                "{}: data EQE type {other} for queue {cq} dropped",
                                self.config.name
                            );
                        }
                    }
                }
                Polled::Overflow { found, expected } => {
                    self.counters.queue_overflows += 1;
                    log::warn!(
                        "{}: data EQ owner count {found}, expected {expected}: resetting",
                        self.config.name
                    );
                    self.state = State::Resetting;
                    return;
                }
                Polled::Empty => break,
            }
        }
        if consumed || !data.eq_armed {
            arm(
                &self.regs,
                self.function.doorbell_page,
                regs::DOORBELL_EQ,
                data.eq.id,
                data.eq.doorbell_position(),
            );
            data.eq_armed = true;
        }
    }

    /// Takes transmit completions, frees their WQEs and buffers; true when any were taken.
    fn reclaim_tx(&mut self) -> bool {
        let Some(data) = self.data.as_mut() else {
            return false;
        };
        let mut consumed = false;
        loop {
            match data.tx_cq.poll() {
                Polled::Entry(cqe) => {
                    consumed = true;
                    if cqe.wq_number() != data.sq.id || !cqe.is_send() {
                        self.counters.bad_completions += 1;
                        log::warn!(
                            "{}: TX CQE for queue {} dropped",
                            self.config.name,
                            cqe.wq_number()
                        );
                        continue;
                    }
                    let Some(done) = data.tx_in_flight.pop_front() else {
                        self.counters.bad_completions += 1;
                        log::warn!("{}: TX CQE with nothing in flight", self.config.name);
                        continue;
                    };
                    data.sq.release(done.wqe_len);
                    data.tx_arena.release(done.arena_end);
                    let oob = TxCompletionOob::read_from_prefix(&cqe.data).map(|(oob, _)| oob);
                    let kind = oob.map_or(0, |oob| ManaCqeHeader::cqe_type(oob.cqe_header));
                    if kind == CQE_TX_OKAY {
                        self.stats.tx_frames += 1;
                        self.stats.tx_bytes += done.frame_len as u64;
                    } else {
                        self.counters.tx_errors += 1;
                        log::warn!(
                            "{}: device dropped a {}-byte frame (TX CQE type {kind})",
                            self.config.name,
                            done.frame_len
                        );
                    }
                }
                Polled::Overflow { found, expected } => {
                    self.counters.queue_overflows += 1;
                    log::warn!(
                        "{}: TX CQ owner count {found}, expected {expected}: resetting",
                        self.config.name
                    );
                    self.state = State::Resetting;
                    return consumed;
                }
                Polled::Empty => break,
            }
        }
        if consumed || !data.tx_cq_armed {
            arm(
                &self.regs,
                self.function.doorbell_page,
                regs::DOORBELL_CQ,
                data.tx_cq.id,
                data.tx_cq.doorbell_position(),
            );
            data.tx_cq_armed = true;
        }
        consumed
    }

    fn max_frame(&self) -> usize {
        self.function.mtu + ETHERNET_HEADER + VLAN_TAG
    }

    fn largest_frame(&self) -> usize {
        if self.config.offloads {
            MAX_IP_PACKET + ETHERNET_HEADER + VLAN_TAG
        } else {
            self.max_frame()
        }
    }

    fn count_kind(&mut self, kind: TxKind) {
        match kind {
            TxKind::Plain => {}
            TxKind::Checksum => self.counters.tx_checksum_offloads += 1,
            TxKind::SoftwareChecksum => self.counters.tx_software_checksums += 1,
            TxKind::Segmentation => self.counters.tx_segmentation_offloads += 1,
            TxKind::Refused => self.counters.tx_refused += 1,
        }
    }

    fn tx_room(&self, len: usize) -> bool {
        self.data.as_ref().is_some_and(|data| {
            data.tx_in_flight.len() < usize::from(self.config.tx_ring_size)
                && data.sq.free_bytes() as usize >= TX_WQE_MAX
                && data.tx_arena.reserve(len.max(1)).is_some()
        })
    }
}

/// Posts one receive WQE for buffer `buffer`.
fn post_receive(
    data: &mut DataPath,
    buffer: u16,
    buffer_size: usize,
    mkey: u32,
) -> Result<(), Error> {
    let mut wqe = [0u8; RX_WQE_LEN];
    let header = WqeHeader {
        params: WqeParams::encode(1, CLIENT_OOB_8, false, 0),
        ..WqeHeader::default()
    };
    let sge = Sge {
        address: data.rx_buffers.phys().0 + (usize::from(buffer) * buffer_size) as u64,
        mem_key: mkey,
        size: buffer_size as u32,
    };
    wqe[..8].copy_from_slice(header.as_bytes());
    wqe[16..32].copy_from_slice(sge.as_bytes());
    let position = data.rq.post(&wqe).ok_or(Error::ManaProtocol {
        what: "receive queue full",
        value: u64::from(buffer),
    })?;
    data.rx_posted.push_back(RxPosted { position, buffer });
    data.rx_doorbell_added = data.rx_doorbell_added.saturating_add(1);
    Ok(())
}

fn ring_receive(regs: &dyn RegisterIo, doorbell_page: usize, data: &mut DataPath) {
    regs.write64(
        doorbell_page + regs::DOORBELL_RQ,
        regs::wq_doorbell(data.rq.id, data.rx_doorbell_added, data.rq.tail()),
    );
    data.rx_doorbell_added = 0;
}

fn arm(regs: &dyn RegisterIo, doorbell_page: usize, doorbell: usize, id: u32, position: u32) {
    regs.write64(
        doorbell_page + doorbell,
        regs::cq_eq_doorbell(id, position, true),
    );
}

impl<R: RegisterIo, D: DmaAllocator> NetDevice for Mana<R, D> {
    fn name(&self) -> &str {
        &self.config.name
    }

    fn mac_address(&self) -> MacAddress {
        self.mac
    }

    fn capabilities(&self) -> Capabilities {
        let mtu = if self.function.mtu == 0 {
            self.config.mtu
        } else {
            self.function.mtu
        };
        Capabilities {
            mtu,
            tx_checksum: self.config.offloads,
            rx_checksum: true,
            max_tso_size: if self.config.offloads {
                MAX_IP_PACKET
            } else {
                0
            },
        }
    }

    fn link_state(&self) -> LinkState {
        match self.state {
            State::Up => LinkState::Up,
            State::Down | State::Stopped => LinkState::Down,
            State::Resetting => LinkState::Resetting,
            State::Gone => LinkState::Gone,
        }
    }

    fn poll(&mut self, now_ns: u64) {
        if matches!(self.state, State::Gone | State::Stopped) {
            return;
        }
        if hwc::is_removed(&self.regs) {
            self.become_gone();
            return;
        }
        self.handle_hwc_events();
        if self.state == State::Resetting {
            self.reinitialize_when_due(now_ns);
            return;
        }
        self.drain_data_events();
        self.reclaim_tx();
        if self.state == State::Resetting {
            // A queue turned out untrustworthy just now: re-initialise after the back-off.
            self.reinitialize_when_due(now_ns);
        }
    }

    fn receive(&mut self, budget: usize, sink: &mut dyn FnMut(&[u8], RxMeta)) -> usize {
        if !matches!(self.state, State::Up | State::Down) {
            return 0;
        }
        let buffer_size = self.config.rx_buffer_size;
        let mkey = self.function.gpa_mkey;
        let Some(data) = self.data.as_mut() else {
            return 0;
        };
        let mut delivered = 0;
        let mut consumed = false;
        let mut drained = false;
        while delivered < budget {
            let cqe = match data.rx_cq.poll() {
                Polled::Entry(cqe) => cqe,
                Polled::Empty => {
                    drained = true;
                    break;
                }
                Polled::Overflow { found, expected } => {
                    self.counters.queue_overflows += 1;
                    log::warn!(
                        "{}: RX CQ owner count {found}, expected {expected}: resetting",
                        self.config.name
                    );
                    self.state = State::Resetting;
                    return delivered;
                }
            };
            consumed = true;
            if cqe.wq_number() != data.rq.id || cqe.is_send() {
                self.counters.bad_completions += 1;
                log::warn!(
                    "{}: RX CQE for queue {} dropped",
                    self.config.name,
                    cqe.wq_number()
                );
                continue;
            }
            let Ok((oob, _)) = RxCompletionOob::read_from_prefix(&cqe.data) else {
                continue;
            };
            let kind = ManaCqeHeader::cqe_type(oob.cqe_header);
            if kind == CQE_RX_OBJECT_FENCE {
                continue;
            }
            // The device completes receive WQEs in order. One it skipped is lost to it: take
            // it back and post it again. A completion naming no posted WQE is not trusted.
            let Some(index) = data
                .rx_posted
                .iter()
                .position(|posted| posted.position == oob.rx_wqe_offset)
            else {
                self.counters.bad_completions += 1;
                self.stats.rx_dropped_bad += 1;
                log::warn!(
                    "{}: RX CQE for WQE {:#x}, which was never posted, dropped",
                    self.config.name,
                    oob.rx_wqe_offset
                );
                continue;
            };
            for _ in 0..index {
                if let Some(skipped) = data.rx_posted.pop_front() {
                    self.counters.bad_completions += 1;
                    data.rq.release(RX_WQE_LEN as u32);
                    if post_receive(data, skipped.buffer, buffer_size, mkey).is_err() {
                        log::warn!(
                            "{}: receive buffer {} lost",
                            self.config.name,
                            skipped.buffer
                        );
                    }
                }
            }
            let Some(posted) = data.rx_posted.pop_front() else {
                continue;
            };
            data.rq.release(RX_WQE_LEN as u32);
            let length = usize::from(oob.packets[0].packet_length);
            let good = kind == CQE_RX_OKAY && (ETHERNET_HEADER..=buffer_size).contains(&length);
            if good {
                let start = usize::from(posted.buffer) * buffer_size;
                let flags = RxFlags::from_bits_retain(oob.flags);
                let l4_good =
                    flags.intersects(RxFlags::TCP_CHECKSUM_GOOD | RxFlags::UDP_CHECKSUM_GOOD);
                let any_bad = flags.intersects(
                    RxFlags::IP_CHECKSUM_BAD
                        | RxFlags::TCP_CHECKSUM_BAD
                        | RxFlags::UDP_CHECKSUM_BAD,
                );
                let meta = RxMeta {
                    checksum_verified: l4_good && !any_bad,
                    checksum_partial: false,
                };
                sink(&data.rx_buffers.as_slice()[start..start + length], meta);
                delivered += 1;
                self.stats.rx_frames += 1;
                self.stats.rx_bytes += length as u64;
            } else {
                self.stats.rx_dropped_bad += 1;
                if kind != CQE_RX_OKAY && kind != CQE_RX_TRUNCATED {
                    self.counters.bad_completions += 1;
                }
                log::warn!(
                    "{}: RX CQE type {kind}, length {length} (buffer {buffer_size}) dropped",
                    self.config.name,
                );
            }
            // The buffer goes straight back to the device.
            if post_receive(data, posted.buffer, buffer_size, mkey).is_err() {
                log::warn!(
                    "{}: receive buffer {} not reposted",
                    self.config.name,
                    posted.buffer
                );
            }
        }
        let doorbell = self.function.doorbell_page;
        if data.rx_doorbell_added > 0 {
            ring_receive(&self.regs, doorbell, data);
        }
        if consumed {
            data.rx_cq_armed = false;
        }
        if drained && !data.rx_cq_armed {
            arm(
                &self.regs,
                doorbell,
                regs::DOORBELL_CQ,
                data.rx_cq.id,
                data.rx_cq.doorbell_position(),
            );
            data.rx_cq_armed = true;
        }
        delivered
    }

    fn can_transmit(&self) -> bool {
        self.state == State::Up && self.tx_room(self.largest_frame())
    }

    fn transmit(
        &mut self,
        len: usize,
        fill: &mut dyn FnMut(&mut [u8]) -> TxMeta,
    ) -> Result<(), DeviceError> {
        match self.state {
            State::Up => {}
            State::Gone => return Err(DeviceError::Gone),
            State::Down | State::Resetting | State::Stopped => return Err(DeviceError::NotReady),
        }
        let largest = self.largest_frame();
        if len > largest || len == 0 {
            return Err(DeviceError::FrameTooLarge { len, max: largest });
        }
        if !self.tx_room(len) {
            self.reclaim_tx();
        }
        if !self.tx_room(len) {
            self.stats.tx_ring_full += 1;
            return Err(DeviceError::RingFull);
        }
        let max_frame = self.max_frame();
        let offloads = self.config.offloads;
        let short_form = self.function.short_form;
        let vport_offset = self.function.tx_vport_offset;
        let mkey = self.function.gpa_mkey;
        let Some(data) = self.data.as_mut() else {
            return Err(DeviceError::NotReady);
        };
        let Some((offset, arena_end)) = data.tx_arena.reserve(len) else {
            return Err(DeviceError::RingFull);
        };
        let Some(area) = data.tx_arena.area(offset, len) else {
            return Err(DeviceError::RingFull);
        };
        let meta = fill(area);
        let plan = transmit::plan(area, meta, max_frame, offloads);
        let kind = plan.kind;
        if kind == TxKind::Refused {
            self.count_kind(kind);
            return if len > max_frame {
                Err(DeviceError::FrameTooLarge {
                    len,
                    max: max_frame,
                })
            } else {
                Ok(())
            };
        }
        let mut oob = plan.oob;
        oob.cq_id = data.tx_cq.id;
        let mut wqe = [0u8; TX_WQE_MAX];
        let (oob_len, oob_code) = if short_form {
            oob.packet_format = 0;
            oob.vport_offset = vport_offset as u8;
            wqe[8..16].copy_from_slice(&oob.encode().to_le_bytes());
            (8, CLIENT_OOB_8)
        } else {
            oob.packet_format = MANA_LONG_PACKET_FORMAT;
            let long = TxLongOob {
                short: oob.encode(),
                long: tx_long_oob_vport_offset(vport_offset),
                reserved: [0; 2],
            };
            wqe[8..32].copy_from_slice(long.as_bytes());
            (24, CLIENT_OOB_24)
        };
        let phys = data.tx_arena.phys(offset);
        let sges = match plan.lso {
            Some((headers, _)) => [(phys, headers), (phys + headers as u64, len - headers)],
            None => [(phys, len), (0, 0)],
        };
        let sge_count = if plan.lso.is_some() { 2 } else { 1 };
        let params = WqeParams::encode(
            sge_count as u32,
            oob_code,
            plan.lso.is_some(),
            plan.lso.map_or(0, |(_, mss)| u32::from(mss)),
        );
        let header = WqeHeader {
            params,
            ..WqeHeader::default()
        };
        wqe[..8].copy_from_slice(header.as_bytes());
        let sgl = 8 + oob_len;
        for (index, (address, size)) in sges.iter().take(sge_count).enumerate() {
            let sge = Sge {
                address: *address,
                mem_key: mkey,
                size: *size as u32,
            };
            wqe[sgl + index * 16..sgl + (index + 1) * 16].copy_from_slice(sge.as_bytes());
        }
        let wqe_bytes = wqe_len(oob_len, sge_count);
        if data.sq.post(&wqe[..wqe_bytes]).is_none() {
            self.stats.tx_ring_full += 1;
            return Err(DeviceError::RingFull);
        }
        data.tx_arena.commit(arena_end);
        data.tx_in_flight.push_back(TxInFlight {
            wqe_len: wqe_bytes as u32,
            arena_end,
            frame_len: len,
        });
        data.tx_doorbell_pending = true;
        self.count_kind(kind);
        Ok(())
    }

    fn flush(&mut self) {
        if !matches!(self.state, State::Up | State::Down) {
            return;
        }
        let doorbell = self.function.doorbell_page;
        if let Some(data) = self.data.as_mut()
            && data.tx_doorbell_pending
        {
            data.tx_doorbell_pending = false;
            self.regs.write64(
                doorbell + regs::DOORBELL_SQ,
                regs::wq_doorbell(data.sq.id, 0, data.sq.tail()),
            );
        }
    }

    fn stats(&self) -> Stats {
        self.stats
    }

    fn stop(&mut self) {
        if matches!(self.state, State::Gone | State::Stopped) {
            return;
        }
        if hwc::is_removed(&self.regs) {
            self.become_gone();
            return;
        }
        self.reclaim_tx();
        self.tear_down();
        if hwc::is_removed(&self.regs) {
            self.become_gone();
        } else {
            self.state = State::Stopped;
            log::info!("{}: stopped", self.config.name);
        }
    }

    fn mark_gone(&mut self) {
        self.become_gone();
    }
}

impl<R: RegisterIo, D: DmaAllocator> Drop for Mana<R, D> {
    /// The queues are freed with the driver, so the device must not DMA into them afterwards.
    fn drop(&mut self) {
        if !matches!(self.state, State::Gone | State::Stopped) {
            self.stop();
        }
    }
}
