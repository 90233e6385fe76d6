//! GDMA/HWC/BNIC message layouts and queue entry formats (WQE, SGE, CQE, EQE, OOBs).
//!
//! Facts from OpenVMM's `gdma_defs` (MIT; layouts and constants read, nothing copied) and the
//! `gdma` emulator. Every struct is `#[repr(C)]` with zerocopy's layout-checking derives and a
//! size assertion; device-written ones are parsed with `FromBytes::read_from_bytes`, so a short
//! or long buffer is an error, never a panic. Packed bit fields are plain integers here with
//! named masks and accessors. Multi-byte fields are little-endian (the driver is x86_64 only).

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// The size of a GDMA page; queue and DMA-region page lists count in these.
pub const PAGE_SIZE: usize = 4096;

/// Extracts `width` bits at `shift` of a 32-bit field.
const fn bits32(value: u32, shift: u32, width: u32) -> u32 {
    (value >> shift) & ((1 << width) - 1)
}

/// Extracts `width` bits at `shift` of a 64-bit field.
const fn bits64(value: u64, shift: u32, width: u32) -> u64 {
    (value >> shift) & ((1 << width) - 1)
}

// ---------------------------------------------------------------------------------------------
// Work queue entries.
// ---------------------------------------------------------------------------------------------

/// WQEs are padded to this many bytes ("basic units"); WQ doorbell tails count bytes.
pub const WQE_UNIT: usize = 32;
/// Largest WQE the device reads.
pub const WQE_MAX: usize = 512;
/// `inline_client_oob_size` code of an 8-byte inline OOB.
pub const CLIENT_OOB_8: u32 = 2;
/// `inline_client_oob_size` code of a 24-byte inline OOB.
pub const CLIENT_OOB_24: u32 = 6;

/// The 8-byte header every WQE starts with.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct WqeHeader {
    /// Unused by the driver.
    pub reserved: [u8; 3],
    /// Only for SGL-direct WQEs (not used).
    pub last_vbytes: u8,
    /// Packed [`WqeParams`] bits.
    pub params: u32,
}
const _: () = assert!(size_of::<WqeHeader>() == 8);

/// Builder of [`WqeHeader::params`].
pub struct WqeParams;

impl WqeParams {
    /// Number of SGEs that follow the OOB (bits 0..8).
    pub const fn encode(sges: u32, oob_code: u32, oob_in_sgl: bool, client_unit_data: u32) -> u32 {
        (sges & 0xff)
            | ((oob_code & 0x7) << 8)
            | ((oob_in_sgl as u32) << 11)
            | ((client_unit_data & 0x3fff) << 16)
    }
}

/// A scatter-gather element: one buffer of a WQE.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct Sge {
    /// Device address of the buffer.
    pub address: u64,
    /// Memory key (the GPA mkey from device registration).
    pub mem_key: u32,
    /// Buffer length in bytes.
    pub size: u32,
}
const _: () = assert!(size_of::<Sge>() == 16);

/// Byte length of a WQE with `oob_len` bytes of inline OOB and `sges` SGEs, padded.
pub const fn wqe_len(oob_len: usize, sges: usize) -> usize {
    (size_of::<WqeHeader>() + oob_len + sges * size_of::<Sge>()).next_multiple_of(WQE_UNIT)
}

// ---------------------------------------------------------------------------------------------
// Completion and event queue entries.
// ---------------------------------------------------------------------------------------------

/// Bits of the owner count that tag each CQE/EQE with the lap of the ring it was written in.
pub const OWNER_BITS: u32 = 3;
/// Mask of the owner count.
pub const OWNER_MASK: u32 = (1 << OWNER_BITS) - 1;

/// A completion queue entry (64 bytes): client data then the packed [`Cqe::params`].
#[repr(C)]
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct Cqe {
    /// Client (BNIC or HWC) completion OOB.
    pub data: [u8; 60],
    /// WQ number (bits 0..24), is-send (24), owner count (29..32).
    pub params: u32,
}
const _: () = assert!(size_of::<Cqe>() == 64);

impl Cqe {
    /// The work queue the completion is for.
    pub fn wq_number(&self) -> u32 {
        bits32(self.params, 0, 24)
    }
    /// True for a send (SQ) completion.
    pub fn is_send(&self) -> bool {
        bits32(self.params, 24, 1) != 0
    }
    /// The owner count (lap tag).
    pub fn owner_count(&self) -> u32 {
        bits32(self.params, 29, 3)
    }
}

/// An event queue entry (16 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct Eqe {
    /// Event data (a CQ id for completions, init data for the HWC, …).
    pub data: [u8; 12],
    /// Event type (bits 0..8), owner count (29..32).
    pub params: u32,
}
const _: () = assert!(size_of::<Eqe>() == 16);

impl Eqe {
    /// The event type (`EQE_*`).
    pub fn event_type(&self) -> u8 {
        bits32(self.params, 0, 8) as u8
    }
    /// The owner count (lap tag).
    pub fn owner_count(&self) -> u32 {
        bits32(self.params, 29, 3)
    }
    /// The first data dword.
    pub fn data_u32(&self) -> u32 {
        u32::from_le_bytes([self.data[0], self.data[1], self.data[2], self.data[3]])
    }
}

/// EQE: a CQ attached to this EQ has new entries (data: the CQ id).
pub const EQE_COMPLETION: u8 = 3;
/// EQE: answer to GDMA_GENERATE_TEST_EQE.
pub const EQE_TEST_EVENT: u8 = 64;
/// EQE: HWC init, the HWC EQ id and doorbell page (data: [`HwcInitEqIdDb`] bits).
pub const EQE_HWC_INIT_EQ_ID_DB: u8 = 129;
/// EQE: HWC init, one typed value (data: type in bits 24..32, value in 0..24).
pub const EQE_HWC_INIT_DATA: u8 = 130;
/// EQE: HWC init finished.
pub const EQE_HWC_INIT_DONE: u8 = 131;
/// EQE: the device changes a setting (data: [`EqeReconfig`]).
pub const EQE_HWC_RECONFIG_DATA: u8 = 133;
/// EQE: the device asks the driver to reset itself.
pub const EQE_HWC_RESET_REQUEST: u8 = 135;

/// Data of [`EQE_HWC_INIT_EQ_ID_DB`]: EQ id (bits 0..16), doorbell page (16..32).
pub struct HwcInitEqIdDb;

impl HwcInitEqIdDb {
    /// The HWC EQ id.
    pub fn eq_id(value: u32) -> u32 {
        bits32(value, 0, 16)
    }
    /// The HWC doorbell page index.
    pub fn doorbell(value: u32) -> u32 {
        bits32(value, 16, 16)
    }
}

/// Splits [`EQE_HWC_INIT_DATA`] data into (type, value).
pub fn hwc_init_data(value: u32) -> (u8, u32) {
    (bits32(value, 24, 8) as u8, bits32(value, 0, 24))
}

/// HWC init data type: HWC CQ id.
pub const HWC_INIT_CQ_ID: u8 = 1;
/// HWC init data type: HWC RQ id.
pub const HWC_INIT_RQ_ID: u8 = 2;
/// HWC init data type: HWC SQ id.
pub const HWC_INIT_SQ_ID: u8 = 3;
/// HWC init data type: requests the HWC takes at once.
pub const HWC_INIT_QUEUE_DEPTH: u8 = 4;
/// HWC init data type: largest request message.
pub const HWC_INIT_MAX_REQUEST: u8 = 5;
/// HWC init data type: largest response message.
pub const HWC_INIT_MAX_RESPONSE: u8 = 6;
/// HWC init data type: CQs the device has.
pub const HWC_INIT_MAX_NUM_CQS: u8 = 7;
/// HWC init data type: protection domain of the HWC.
pub const HWC_INIT_PDID: u8 = 8;
/// HWC init data type: memory key for HWC buffers.
pub const HWC_INIT_GPA_MKEY: u8 = 9;

/// Data of [`EQE_HWC_RECONFIG_DATA`].
#[repr(C)]
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct EqeReconfig {
    /// Type-specific value (24 bits).
    pub data: [u8; 3],
    /// `RECONFIG_*`.
    pub data_type: u8,
    /// Unused.
    pub reserved: [u8; 8],
}
const _: () = assert!(size_of::<EqeReconfig>() == 12);

/// Reconfig: new HWC timeout.
pub const RECONFIG_HWC_TIMEOUT: u8 = 1;
/// Reconfig: the vPort's link came up.
pub const RECONFIG_LINK_CONNECT: u8 = 2;
/// Reconfig: the vPort's link went down.
pub const RECONFIG_LINK_DISCONNECT: u8 = 3;

// ---------------------------------------------------------------------------------------------
// Hardware channel (HWC) OOBs and GDMA message headers.
// ---------------------------------------------------------------------------------------------

/// Inline OOB of an HWC send WQE: which HWC queues the request and its answer use.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct HwcTxOob {
    /// Unused.
    pub reserved: u64,
    /// Receive queue id (bits 0..24).
    pub vrq_id: u32,
    /// Receive CQ id (bits 0..24).
    pub vrcq_id: u32,
    /// Send CQ id (bits 0..24) plus flags the driver leaves clear.
    pub vscq_id: u32,
    /// Send queue id (bits 0..24).
    pub vsq_id: u32,
}
const _: () = assert!(size_of::<HwcTxOob>() == 24);

/// OOB of an HWC receive completion (in [`Cqe::data`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct HwcRxOob {
    /// Type, SOM/EOM, vendor error, source queue.
    pub flags: u64,
    /// Unused.
    pub reserved: u32,
    /// Byte offset (running WQ position) of the completed receive WQE.
    pub wqe_offset: u32,
    /// Unused here.
    pub wqe_addr_high: u32,
    /// Unused here.
    pub client_data_unit: u32,
    /// Bytes of the response message written into the receive buffer.
    pub data_size: u32,
    /// Unused here.
    pub chunk_offset: u32,
}
const _: () = assert!(size_of::<HwcRxOob>() == 32);

/// Header of every GDMA message, request or response.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct GdmaMessageHeader {
    /// Always [`GDMA_STANDARD_HEADER`].
    pub header_type: u32,
    /// The request code (`GDMA_*` or `MANA_*`).
    pub message_type: u32,
    /// Message layout version.
    pub message_version: u16,
    /// Matches a response to its request.
    pub hwc_message_id: u16,
    /// Total message bytes, header included.
    pub message_size: u32,
}
const _: () = assert!(size_of::<GdmaMessageHeader>() == 16);

/// The only GDMA header type.
pub const GDMA_STANDARD_HEADER: u32 = 0;
/// Message layout version 1.
pub const GDMA_MESSAGE_V1: u16 = 1;

/// A GDMA device: HWC, or a function such as the MANA (BNIC) device.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct GdmaDeviceId {
    /// `GDMA_DEVICE_*`.
    pub device_type: u16,
    /// Instance of that type.
    pub instance: u16,
}
const _: () = assert!(size_of::<GdmaDeviceId>() == 4);

/// Device type: the hardware channel itself.
pub const GDMA_DEVICE_HWC: u16 = 1;
/// Device type: the MANA network function (BNIC).
pub const GDMA_DEVICE_MANA: u16 = 2;
/// The HWC's own device id (GDMA requests are addressed to it).
pub const HWC_DEVICE_ID: GdmaDeviceId = GdmaDeviceId {
    device_type: GDMA_DEVICE_HWC,
    instance: 0,
};

/// Header of a request: its own header, the expected response's, and the target device.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct GdmaRequestHeader {
    /// The request.
    pub request: GdmaMessageHeader,
    /// What the response will look like (its size bounds what the device writes).
    pub response: GdmaMessageHeader,
    /// The addressed device.
    pub device_id: GdmaDeviceId,
    /// Free-form correlation value.
    pub activity_id: u32,
}
const _: () = assert!(size_of::<GdmaRequestHeader>() == 40);

/// Header of a response.
#[repr(C)]
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct GdmaResponseHeader {
    /// The request's `response` header, echoed.
    pub response: GdmaMessageHeader,
    /// The addressed device, echoed.
    pub device_id: GdmaDeviceId,
    /// The request's activity id, echoed.
    pub activity_id: u32,
    /// 0 on success.
    pub status: u32,
    /// Unused.
    pub reserved: u32,
}
const _: () = assert!(size_of::<GdmaResponseHeader>() == 32);

/// GDMA request: check the driver/device protocol versions.
pub const GDMA_VERIFY_VF_DRIVER_VERSION: u32 = 1;
/// GDMA request: resource limits.
pub const GDMA_QUERY_MAX_RESOURCES: u32 = 2;
/// GDMA request: the functions behind the HWC.
pub const GDMA_LIST_DEVICES: u32 = 3;
/// GDMA request: take a function (BNIC) into use.
pub const GDMA_REGISTER_DEVICE: u32 = 4;
/// GDMA request: release a function.
pub const GDMA_DEREGISTER_DEVICE: u32 = 5;
/// GDMA request: make the device post a test EQE.
pub const GDMA_GENERATE_TEST_EQE: u32 = 10;
/// GDMA request: make the device post a reset-request EQE (a test facility).
pub const GDMA_GENERATE_RESET_REQUEST_EQE: u32 = 11;
/// GDMA request: create an EQ (or CQ) over a DMA region.
pub const GDMA_CREATE_QUEUE: u32 = 12;
/// GDMA request: destroy a queue.
pub const GDMA_DISABLE_QUEUE: u32 = 13;
/// GDMA request: describe DMA memory (a page list) to the device.
pub const GDMA_CREATE_DMA_REGION: u32 = 25;
/// GDMA request: forget a DMA region.
pub const GDMA_DESTROY_DMA_REGION: u32 = 27;

/// Lowest GDMA protocol version this driver speaks.
pub const GDMA_PROTOCOL_V1: u64 = 1;
/// Driver capability: understands vPort link-state reconfig EQEs.
pub const DRIVER_CAP_HW_VPORT_LINK_AWARE: u64 = 0x40;
/// Driver capability: resets itself when the device sends a reset-request EQE.
pub const DRIVER_CAP_SELF_RESET_ON_EQE: u64 = 0x4000;

/// GDMA_VERIFY_VF_DRIVER_VERSION request body.
#[repr(C)]
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct VerifyVersionRequest {
    /// Oldest protocol version the driver speaks.
    pub protocol_version_min: u64,
    /// Newest protocol version the driver speaks.
    pub protocol_version_max: u64,
    /// `DRIVER_CAP_*` bits.
    pub driver_capabilities: [u64; 4],
    /// Driver version.
    pub driver_version: u64,
    /// OS type code.
    pub os_type: u32,
    /// Unused.
    pub reserved: u32,
    /// OS version: major, minor, build, platform.
    pub os_version: [u32; 4],
    /// Unused.
    pub reserved2: u64,
    /// NUL-terminated strings: driver name, driver commit, two free ones.
    pub os_strings: [[u8; 128]; 4],
}
const _: () = assert!(size_of::<VerifyVersionRequest>() == 600);

/// GDMA_VERIFY_VF_DRIVER_VERSION response body.
#[repr(C)]
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct VerifyVersionResponse {
    /// The protocol version chosen by the device.
    pub protocol_version: u64,
    /// Device capability bits.
    pub device_capabilities: [u64; 4],
}
const _: () = assert!(size_of::<VerifyVersionResponse>() == 40);

/// GDMA_QUERY_MAX_RESOURCES response body.
#[repr(C)]
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct QueryMaxResourcesResponse {
    /// Unused status word.
    pub status: u32,
    /// Send queues.
    pub max_sq: u32,
    /// Receive queues.
    pub max_rq: u32,
    /// Completion queues.
    pub max_cq: u32,
    /// Event queues.
    pub max_eq: u32,
    /// Doorbell pages.
    pub max_doorbell: u32,
    /// Memory space tables.
    pub max_mst: u32,
    /// CQ moderation contexts.
    pub max_cq_moderation_contexts: u32,
    /// Moderated CQs.
    pub max_moderated_cq: u32,
    /// MSI-X vectors.
    pub max_msix: u32,
}
const _: () = assert!(size_of::<QueryMaxResourcesResponse>() == 40);

/// Most devices a GDMA_LIST_DEVICES response can name.
pub const MAX_LISTED_DEVICES: usize = 64;

/// GDMA_LIST_DEVICES response body.
#[repr(C)]
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct ListDevicesResponse {
    /// Valid entries of `devices` (the device could claim more: bounds-checked).
    pub count: u32,
    /// Unused.
    pub reserved: u32,
    /// The devices.
    pub devices: [GdmaDeviceId; MAX_LISTED_DEVICES],
}
const _: () = assert!(size_of::<ListDevicesResponse>() == 264);

/// GDMA_REGISTER_DEVICE response body.
#[repr(C)]
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct RegisterDeviceResponse {
    /// Protection domain for the function's queues.
    pub pdid: u32,
    /// Memory key for buffers in SGEs.
    pub gpa_mkey: u32,
    /// Doorbell page index of the function.
    pub doorbell_id: u32,
}
const _: () = assert!(size_of::<RegisterDeviceResponse>() == 12);

/// Page type code: 4 KiB pages.
pub const GDMA_PAGE_TYPE_4K: u32 = 0;

/// GDMA_CREATE_DMA_REGION request body; a list of `page_count` u64 page addresses follows.
#[repr(C)]
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct CreateDmaRegionRequest {
    /// Region length in bytes.
    pub length: u64,
    /// Where the region starts in its first page.
    pub offset_in_page: u32,
    /// [`GDMA_PAGE_TYPE_4K`].
    pub page_type: u32,
    /// Pages of the region.
    pub page_count: u32,
    /// Pages listed in this message (all of them).
    pub page_list_len: u32,
}
const _: () = assert!(size_of::<CreateDmaRegionRequest>() == 24);

/// GDMA_CREATE_DMA_REGION response body.
#[repr(C)]
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct CreateDmaRegionResponse {
    /// Handle of the region.
    pub region: u64,
}
const _: () = assert!(size_of::<CreateDmaRegionResponse>() == 8);

/// GDMA_DESTROY_DMA_REGION request body.
#[repr(C)]
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct DestroyDmaRegionRequest {
    /// Handle of the region.
    pub region: u64,
}
const _: () = assert!(size_of::<DestroyDmaRegionRequest>() == 8);

/// Queue type: send work queue.
pub const QUEUE_TYPE_SQ: u32 = 1;
/// Queue type: receive work queue.
pub const QUEUE_TYPE_RQ: u32 = 2;
/// Queue type: completion queue.
pub const QUEUE_TYPE_CQ: u32 = 3;
/// Queue type: event queue.
pub const QUEUE_TYPE_EQ: u32 = 4;

/// GDMA_CREATE_QUEUE request body.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct CreateQueueRequest {
    /// `QUEUE_TYPE_*`.
    pub queue_type: u32,
    /// Unused.
    pub reserved1: u32,
    /// Protection domain.
    pub pdid: u32,
    /// Doorbell page index.
    pub doorbell_id: u32,
    /// DMA region holding the queue (consumed by the queue).
    pub region: u64,
    /// Unused.
    pub reserved2: u32,
    /// Queue size in bytes.
    pub queue_size: u32,
    /// EQ throttling (0: none).
    pub log2_throttle_limit: u32,
    /// MSI-X table index the EQ interrupts through.
    pub eq_msix_index: u32,
    /// CQ moderation context (CQs only).
    pub cq_moderation_context: u32,
    /// Parent EQ (CQs only).
    pub cq_parent_eq_id: u32,
    /// RQ flags (RQs only).
    pub rq_flags: [u8; 4],
    /// Unused.
    pub reserved3: u32,
}
const _: () = assert!(size_of::<CreateQueueRequest>() == 56);

/// GDMA_CREATE_QUEUE response body.
#[repr(C)]
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct CreateQueueResponse {
    /// Id of the new queue.
    pub queue_id: u32,
}
const _: () = assert!(size_of::<CreateQueueResponse>() == 4);

/// GDMA_DISABLE_QUEUE request body.
#[repr(C)]
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct DisableQueueRequest {
    /// `QUEUE_TYPE_*`.
    pub queue_type: u32,
    /// Id of the queue.
    pub queue_id: u32,
    /// Always 1 (the id was allocated when the queue was created).
    pub allocated_on_creation: u32,
}
const _: () = assert!(size_of::<DisableQueueRequest>() == 12);

/// GDMA_GENERATE_TEST_EQE request body.
#[repr(C)]
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct GenerateTestEqeRequest {
    /// The EQ that gets the test event.
    pub queue_id: u32,
}
const _: () = assert!(size_of::<GenerateTestEqeRequest>() == 4);

/// GDMA_GENERATE_RESET_REQUEST_EQE request body.
#[repr(C)]
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct GenerateResetRequestEqeRequest {
    /// The EQ that gets the reset request.
    pub queue_id: u32,
    /// Reset flags carried in the EQE (0: a plain reset request).
    pub flags: u32,
}
const _: () = assert!(size_of::<GenerateResetRequestEqeRequest>() == 8);

// ---------------------------------------------------------------------------------------------
// BNIC (MANA function) requests.
// ---------------------------------------------------------------------------------------------

/// BNIC request: device configuration (vPorts, MTU).
pub const MANA_QUERY_DEV_CONFIG: u32 = 0x20001;
/// BNIC request: configure a vPort's transmit side.
pub const MANA_CONFIG_VPORT_TX: u32 = 0x20003;
/// BNIC request: create a work queue object (WQ + its CQ).
pub const MANA_CREATE_WQ_OBJ: u32 = 0x20004;
/// BNIC request: destroy a work queue object.
pub const MANA_DESTROY_WQ_OBJ: u32 = 0x20005;
/// BNIC request: configure receive steering (and enable/disable receive).
pub const MANA_CONFIG_VPORT_RX: u32 = 0x20007;
/// BNIC request: a vPort's configuration (MAC, queue limits).
pub const MANA_QUERY_VPORT_CONFIG: u32 = 0x20008;
/// Layout version of the MANA_QUERY_DEV_CONFIG request.
pub const MANA_QUERY_DEV_CONFIG_REQUEST_V1: u16 = 1;
/// Layout version of the MANA_QUERY_DEV_CONFIG response this driver reads.
pub const MANA_QUERY_DEV_CONFIG_RESPONSE_V4: u16 = 4;

/// MANA_QUERY_DEV_CONFIG request body.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct QueryDeviceConfigRequest {
    /// Driver capability bits.
    pub driver_capabilities: [u64; 4],
    /// BNIC protocol version: major, minor, micro.
    pub protocol_version: [u32; 3],
    /// Unused.
    pub reserved: u32,
}
const _: () = assert!(size_of::<QueryDeviceConfigRequest>() == 48);

/// MANA_QUERY_DEV_CONFIG response body.
#[repr(C)]
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct QueryDeviceConfigResponse {
    /// Device capability bits.
    pub device_capabilities: [u64; 4],
    /// vPorts of the function.
    pub max_vports: u16,
    /// Unused.
    pub reserved: u16,
    /// EQs the function may create.
    pub max_eqs: u32,
    /// Largest MTU (0: not reported).
    pub adapter_mtu: u16,
    /// Unused.
    pub reserved2: u16,
    /// Link speed (0: not reported).
    pub link_speed_mbps: u32,
}
const _: () = assert!(size_of::<QueryDeviceConfigResponse>() == 48);

/// MANA_QUERY_VPORT_CONFIG request body.
#[repr(C)]
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct QueryVportConfigRequest {
    /// Index of the vPort.
    pub vport_index: u32,
}
const _: () = assert!(size_of::<QueryVportConfigRequest>() == 4);

/// MANA_QUERY_VPORT_CONFIG response body.
#[repr(C)]
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct QueryVportConfigResponse {
    /// Send queues the vPort takes.
    pub max_sq: u32,
    /// Receive queues the vPort takes.
    pub max_rq: u32,
    /// RSS indirection table entries.
    pub indirection_entries: u32,
    /// Unused.
    pub reserved1: u32,
    /// The vPort's MAC address.
    pub mac_address: [u8; 6],
    /// Unused.
    pub reserved2: [u8; 2],
    /// Handle of the vPort in later requests.
    pub vport: u64,
}
const _: () = assert!(size_of::<QueryVportConfigResponse>() == 32);

/// MANA_CONFIG_VPORT_TX request body.
#[repr(C)]
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct ConfigVportTxRequest {
    /// The vPort handle.
    pub vport: u64,
    /// Protection domain.
    pub pdid: u32,
    /// Doorbell page index.
    pub doorbell_page: u32,
}
const _: () = assert!(size_of::<ConfigVportTxRequest>() == 16);

/// MANA_CONFIG_VPORT_TX response body.
#[repr(C)]
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct ConfigVportTxResponse {
    /// vPort offset every transmit OOB carries.
    pub tx_vport_offset: u16,
    /// Non-zero when the 8-byte (short) transmit OOB may be used.
    pub short_form_allowed: u8,
    /// Unused.
    pub reserved: u8,
}
const _: () = assert!(size_of::<ConfigVportTxResponse>() == 4);

/// MANA_CREATE_WQ_OBJ request body.
#[repr(C)]
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct CreateWqObjectRequest {
    /// The vPort handle.
    pub vport: u64,
    /// [`QUEUE_TYPE_SQ`] or [`QUEUE_TYPE_RQ`].
    pub wq_type: u32,
    /// Unused.
    pub reserved: u32,
    /// DMA region of the WQ (consumed).
    pub wq_region: u64,
    /// DMA region of its CQ (consumed).
    pub cq_region: u64,
    /// WQ bytes.
    pub wq_size: u32,
    /// CQ bytes.
    pub cq_size: u32,
    /// CQ moderation context (0: none).
    pub cq_moderation_context: u32,
    /// EQ the CQ reports to.
    pub cq_parent_eq_id: u32,
}
const _: () = assert!(size_of::<CreateWqObjectRequest>() == 48);

/// MANA_CREATE_WQ_OBJ response body.
#[repr(C)]
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct CreateWqObjectResponse {
    /// Id of the WQ (doorbells, CQE wq numbers).
    pub wq_id: u32,
    /// Id of its CQ.
    pub cq_id: u32,
    /// Handle for destroy and receive steering.
    pub wq_object: u64,
}
const _: () = assert!(size_of::<CreateWqObjectResponse>() == 16);

/// MANA_DESTROY_WQ_OBJ request body.
#[repr(C)]
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct DestroyWqObjectRequest {
    /// [`QUEUE_TYPE_SQ`] or [`QUEUE_TYPE_RQ`].
    pub wq_type: u32,
    /// Unused.
    pub reserved: u32,
    /// The object handle.
    pub wq_object: u64,
}
const _: () = assert!(size_of::<DestroyWqObjectRequest>() == 16);

/// Tri-state value "true" (receive steering fields).
pub const TRISTATE_TRUE: u32 = 1;
/// Tri-state value "false".
pub const TRISTATE_FALSE: u32 = 0;

/// MANA_CONFIG_VPORT_RX request body (receive steering without an indirection table).
#[repr(C)]
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct ConfigVportRxRequest {
    /// The vPort handle.
    pub vport: u64,
    /// Indirection entries that follow (0).
    pub indirection_entries: u16,
    /// Where they follow (0).
    pub indirection_offset: u16,
    /// Receive on/off (tri-state).
    pub rx_enable: u32,
    /// RSS on/off (tri-state).
    pub rss_enable: u32,
    /// Set `default_rx_object`.
    pub update_default_rx_object: u8,
    /// Set `hash_key`.
    pub update_hash_key: u8,
    /// Set the indirection table.
    pub update_indirection_table: u8,
    /// Unused.
    pub reserved: u8,
    /// RQ object that gets all traffic without RSS.
    pub default_rx_object: u64,
    /// RSS hash key.
    pub hash_key: [u8; 40],
}
const _: () = assert!(size_of::<ConfigVportRxRequest>() == 72);

// ---------------------------------------------------------------------------------------------
// BNIC data path OOBs.
// ---------------------------------------------------------------------------------------------

/// Client type of a BNIC completion in [`ManaCqeHeader`].
pub const MANA_CQE_COMPLETION: u32 = 1;
/// RX CQE: a frame was received.
pub const CQE_RX_OKAY: u32 = 1;
/// RX CQE: several frames in one (never enabled by this driver).
pub const CQE_RX_COALESCED_4: u32 = 2;
/// RX CQE: an RQ fence completed (no buffer consumed).
pub const CQE_RX_OBJECT_FENCE: u32 = 3;
/// RX CQE: the frame was longer than the buffer.
pub const CQE_RX_TRUNCATED: u32 = 4;
/// TX CQE: sent.
pub const CQE_TX_OKAY: u32 = 32;
/// TX CQE: the first error code; everything from here to [`CQE_TX_LAST_ERROR`] is a drop.
pub const CQE_TX_FIRST_ERROR: u32 = 33;
/// TX CQE: the last error code (GDMA error).
pub const CQE_TX_LAST_ERROR: u32 = 42;

/// First dword of every BNIC completion OOB: type (bits 0..6), client (6..8), vendor error.
pub struct ManaCqeHeader;

impl ManaCqeHeader {
    /// The completion type (`CQE_*`).
    pub fn cqe_type(value: u32) -> u32 {
        bits32(value, 0, 6)
    }
    /// The client type.
    pub fn client_type(value: u32) -> u32 {
        bits32(value, 6, 2)
    }
    /// Vendor error code.
    pub fn vendor_error(value: u32) -> u32 {
        bits32(value, 8, 24)
    }
}

/// TX completion OOB (in [`Cqe::data`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct TxCompletionOob {
    /// [`ManaCqeHeader`] bits.
    pub cqe_header: u32,
    /// Unused here.
    pub tx_data_offset: u32,
    /// SGL offset (bits 0..5) and WQE offset (5..32).
    pub offsets: u32,
    /// Unused.
    pub reserved: [u32; 12],
}
const _: () = assert!(size_of::<TxCompletionOob>() == 60);

/// Per-packet information of an RX completion.
#[repr(C)]
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct RxPacketInfo {
    /// Bytes of the frame.
    pub packet_length: u16,
    /// Unused.
    pub reserved1: u16,
    /// Unused.
    pub reserved2: u32,
    /// RSS hash.
    pub packet_hash: u32,
}
const _: () = assert!(size_of::<RxPacketInfo>() == 12);

/// RX completion OOB (in [`Cqe::data`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct RxCompletionOob {
    /// [`ManaCqeHeader`] bits.
    pub cqe_header: u32,
    /// [`RxFlags`] bits.
    pub flags: u32,
    /// Frames of this completion (only the first without coalescing).
    pub packets: [RxPacketInfo; 4],
    /// Running byte offset of the receive WQE the frame landed in.
    pub rx_wqe_offset: u32,
}
const _: () = assert!(size_of::<RxCompletionOob>() == 60);

bitflags::bitflags! {
    /// Receive checksum and VLAN results ([`RxCompletionOob::flags`]).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct RxFlags: u32 {
        /// A VLAN tag was stripped.
        const VLAN_TAG_PRESENT = 1 << 12;
        /// The IPv4 header checksum is good.
        const IP_CHECKSUM_GOOD = 1 << 25;
        /// The IPv4 header checksum is bad.
        const IP_CHECKSUM_BAD = 1 << 26;
        /// The TCP checksum is good.
        const TCP_CHECKSUM_GOOD = 1 << 27;
        /// The TCP checksum is bad.
        const TCP_CHECKSUM_BAD = 1 << 28;
        /// The UDP checksum is good.
        const UDP_CHECKSUM_GOOD = 1 << 29;
        /// The UDP checksum is bad.
        const UDP_CHECKSUM_BAD = 1 << 30;
        /// Any other bit the device sets.
        const _ = !0;
    }
}

/// Transmit packet format: 8-byte short OOB only.
pub const MANA_SHORT_PACKET_FORMAT: u64 = 0;
/// Transmit packet format: short plus long OOB (24 bytes).
pub const MANA_LONG_PACKET_FORMAT: u64 = 1;

/// Builder of the 8-byte short transmit OOB.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TxShortOob {
    /// [`MANA_SHORT_PACKET_FORMAT`] or [`MANA_LONG_PACKET_FORMAT`].
    pub packet_format: u64,
    /// The frame is IPv4.
    pub ipv4: bool,
    /// The frame is IPv6.
    pub ipv6: bool,
    /// Compute the IPv4 header checksum.
    pub ip_checksum: bool,
    /// Compute the TCP checksum.
    pub tcp_checksum: bool,
    /// Compute the UDP checksum.
    pub udp_checksum: bool,
    /// Completion queue of the send queue.
    pub cq_id: u32,
    /// Where the transport header starts (10 bits).
    pub transport_offset: u16,
    /// The vPort offset, short form (8 bits).
    pub vport_offset: u8,
}

impl TxShortOob {
    /// The packed value.
    pub fn encode(&self) -> u64 {
        (self.packet_format & 3)
            | (self.ipv4 as u64) << 2
            | (self.ipv6 as u64) << 3
            | (self.ip_checksum as u64) << 4
            | (self.tcp_checksum as u64) << 5
            | (self.udp_checksum as u64) << 6
            | (u64::from(self.cq_id) & 0xff_ffff) << 8
            | (u64::from(self.transport_offset) & 0x3ff) << 32
            | u64::from(self.vport_offset) << 56
    }

    /// Parses a packed value (the fake device and tests read what the driver wrote).
    pub fn decode(value: u64) -> Self {
        TxShortOob {
            packet_format: bits64(value, 0, 2),
            ipv4: bits64(value, 2, 1) != 0,
            ipv6: bits64(value, 3, 1) != 0,
            ip_checksum: bits64(value, 4, 1) != 0,
            tcp_checksum: bits64(value, 5, 1) != 0,
            udp_checksum: bits64(value, 6, 1) != 0,
            cq_id: bits64(value, 8, 24) as u32,
            transport_offset: bits64(value, 32, 10) as u16,
            vport_offset: bits64(value, 56, 8) as u8,
        }
    }
}

/// The long form's second word: only the vPort offset is used (no VLAN insertion, no
/// encapsulation), bits 48..60.
pub fn tx_long_oob_vport_offset(offset: u16) -> u64 {
    (u64::from(offset) & 0xfff) << 48
}

/// The 24-byte (long form) transmit OOB.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct TxLongOob {
    /// Packed [`TxShortOob`] with [`MANA_LONG_PACKET_FORMAT`].
    pub short: u64,
    /// See [`tx_long_oob_vport_offset`].
    pub long: u64,
    /// Unused.
    pub reserved: [u32; 2],
}
const _: () = assert!(size_of::<TxLongOob>() == 24);
