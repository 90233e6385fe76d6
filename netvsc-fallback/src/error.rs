//! The crate's one error type: everything that can go wrong in virtio-net (finding,
//! initialising, resetting the device) and in netvsc (malformed host messages, refusals during
//! negotiation, timeouts, the VMBus channel), each variant with the context to act on it.

use thiserror::Error;

/// Which virtqueue an error is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueueKind {
    /// receiveq1 (virtqueue 0).
    Receive,
    /// transmitq1 (virtqueue 1).
    Transmit,
    /// controlq (virtqueue 2 without multiqueue).
    Control,
}

/// Which register window an error is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Window {
    /// The common configuration structure (VIRTIO_PCI_CAP_COMMON_CFG).
    Common,
    /// The notification area (VIRTIO_PCI_CAP_NOTIFY_CFG).
    Notify,
    /// The ISR status byte (VIRTIO_PCI_CAP_ISR_CFG).
    Isr,
    /// The virtio-net device configuration (VIRTIO_PCI_CAP_DEVICE_CFG).
    Device,
}

/// What an MSI-X vector was being assigned to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MsixTarget {
    /// Configuration change notifications (`config_msix_vector`).
    Config,
    /// Used buffer notifications of one queue (`queue_msix_vector`).
    Queue(QueueKind),
}

/// What a DMA allocation was for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DmaPurpose {
    /// Descriptor table and rings of a virtqueue.
    Ring(QueueKind),
    /// The receive buffers.
    ReceiveBuffers,
    /// The transmit buffer pool.
    TransmitBuffers,
    /// The control command buffer.
    ControlCommand,
    /// netvsc: the pages RNDIS control messages are sent from.
    RndisControlPages,
    /// netvsc: the receive buffer the host writes frames into.
    NetvscReceiveBuffer,
    /// netvsc: the send buffer whose sections frames are copied into.
    NetvscSendBuffer,
    /// netvsc: the GPA-direct transmit slots for MTU-sized frames.
    NetvscTransmitSlots,
    /// netvsc: the GPA-direct transmit slots for LSO frames.
    NetvscLsoSlots,
}

/// Which netvsc protocol layer a malformed message belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layer {
    /// A VMBus packet (descriptor, transfer-page header, GPA ranges).
    Vmbus,
    /// An NVSP message (the netvsc control protocol).
    Nvsp,
    /// An RNDIS message inside a transfer-page range or a send.
    Rndis,
}

/// What the netvsc driver was waiting for from its host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// NVSP INIT_COMPLETE for one version.
    Init,
    /// Completion of NVSP SEND_NDIS_CONFIG.
    NdisConfig,
    /// Completion of NVSP SEND_NDIS_VERSION.
    NdisVersion,
    /// NVSP SEND_RECEIVE_BUFFER_COMPLETE.
    ReceiveBuffer,
    /// NVSP SEND_SEND_BUFFER_COMPLETE.
    SendBuffer,
    /// An RNDIS control reply (INITIALIZE, QUERY or SET completion).
    RndisReply,
    /// Room in the guest-to-host ring for a control message.
    RingSpace,
}

/// Why a driver of this crate could not parse a capability, bring its device up or keep
/// talking to its host. virtio-net variants first, then netvsc's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Error)]
pub enum Error {
    /// The capability bytes are shorter than the structure they must hold.
    #[error("virtio capability of {len} bytes is shorter than the {needed} needed")]
    CapabilityTooShort {
        /// Bytes available (the smaller of the slice length and `cap_len`).
        len: usize,
        /// Bytes the structure needs.
        needed: usize,
    },
    /// The capability is not vendor-specific (ID 0x09), so it is not a virtio structure.
    #[error("capability id {id:#04x} is not a vendor-specific (virtio) capability")]
    NotVendorCapability {
        /// The capability ID found.
        id: u8,
    },
    /// The capability has a reserved `cfg_type`; the spec says to ignore it (virtio 1.x §4.1.4).
    #[error("virtio capability has reserved cfg_type {cfg_type}")]
    ReservedCapabilityType {
        /// The reserved type value.
        cfg_type: u8,
    },
    /// The capability names a reserved BAR (above 5); the spec says to ignore it.
    #[error("virtio capability names reserved BAR {bar}")]
    ReservedBar {
        /// The BAR number found.
        bar: u8,
    },
    /// The structure offset breaks the alignment the spec requires for its type.
    #[error("virtio structure type {cfg_type} at misaligned offset {offset:#x}")]
    MisalignedCapability {
        /// The capability type.
        cfg_type: u8,
        /// The offset within the BAR.
        offset: u64,
    },
    /// `notify_off_multiplier` is neither 0 nor a power of two (virtio 1.x §4.1.4.4).
    #[error("notify_off_multiplier {multiplier} is not 0 or a power of two")]
    InvalidNotifyMultiplier {
        /// The value found.
        multiplier: u32,
    },
    /// A register window is too small for the structure it must hold.
    #[error("{window:?} window of {len} bytes is smaller than the {needed} needed")]
    WindowTooSmall {
        /// Which window.
        window: Window,
        /// Its length in bytes.
        len: usize,
        /// The length the driver needs.
        needed: usize,
    },
    /// A field of [`crate::VirtioNetConfig`] is out of range.
    #[error("driver configuration field {field} has invalid value {value}")]
    InvalidConfig {
        /// The field name.
        field: &'static str,
        /// The rejected value.
        value: usize,
    },
    /// The device has been removed: its registers read all-ones or zero.
    #[error("virtio-net device is gone (registers read all-ones/zero)")]
    DeviceGone,
    /// The device did not report reset completion (status 0) within the bounded wait.
    #[error("device reset not complete after {reads} reads (status {last_status:#04x})")]
    ResetTimeout {
        /// The last `device_status` value read.
        last_status: u8,
        /// How many reads were made.
        reads: u32,
    },
    /// The device does not offer VIRTIO_F_VERSION_1, so it is legacy-only.
    #[error("device does not offer VIRTIO_F_VERSION_1 (offered {offered:#018x})")]
    MissingVersion1 {
        /// The feature bits the device offered.
        offered: u64,
    },
    /// The device cleared FEATURES_OK: it does not accept the feature subset (virtio 1.x §3.1.1).
    #[error("device refused features {requested:#018x} (status {status:#04x} lacks FEATURES_OK)")]
    FeaturesRejected {
        /// The feature bits the driver wrote.
        requested: u64,
        /// `device_status` read back.
        status: u8,
    },
    /// The device reports fewer virtqueues than the negotiated features need.
    #[error("device has {num_queues} virtqueues, driver needs {needed}")]
    TooFewQueues {
        /// `num_queues` read from the device.
        num_queues: u16,
        /// How many the driver needs.
        needed: u16,
    },
    /// `queue_size` reads 0: the virtqueue does not exist.
    #[error("{queue:?} virtqueue {index} is unavailable (queue_size 0)")]
    QueueUnavailable {
        /// Which queue.
        queue: QueueKind,
        /// Its virtqueue index.
        index: u16,
    },
    /// The device's maximum size for a queue is too small for the driver's use of it.
    #[error("{queue:?} virtqueue has {size} entries, driver needs {needed}")]
    QueueTooSmall {
        /// Which queue.
        queue: QueueKind,
        /// The size available.
        size: u16,
        /// The size needed.
        needed: u16,
    },
    /// The queue's notification address lies outside the notify window.
    #[error(
        "{queue:?} queue notify offset {offset:#x} is outside the {window_len}-byte notify window"
    )]
    NotifyOutOfRange {
        /// Which queue.
        queue: QueueKind,
        /// `queue_notify_off * notify_off_multiplier`.
        offset: usize,
        /// Length of the notify window.
        window_len: usize,
    },
    /// The device read back NO_VECTOR after an MSI-X vector was written (virtio 1.x §4.1.5.1.2).
    #[error("device refused MSI-X vector {vector} for {target:?}")]
    MsixVectorRefused {
        /// What the vector was for.
        target: MsixTarget,
        /// The vector that was refused.
        vector: u16,
    },
    /// The DMA allocator ran out of memory (virtio-net or netvsc).
    #[error("DMA allocation of {len} bytes for {purpose:?} failed")]
    DmaAllocationFailed {
        /// What the memory was for.
        purpose: DmaPurpose,
        /// Bytes requested.
        len: usize,
    },
    /// The device configuration kept changing while the driver read it.
    #[error("device configuration kept changing while being read")]
    ConfigUnstable,
    /// The device does not offer VIRTIO_NET_F_MAC and no fallback address was configured.
    #[error("device offers no MAC address and none was configured")]
    NoMacAddress,
    /// Without mergeable buffers, each receive buffer must hold the largest frame.
    #[error(
        "receive buffers of {size} bytes cannot hold a {needed}-byte frame without mergeable buffers"
    )]
    ReceiveBufferTooSmall {
        /// The configured buffer size.
        size: usize,
        /// The size needed (virtio-net header plus largest frame).
        needed: usize,
    },
    /// netvsc: a host message is shorter than the structure it must hold.
    #[error("{layer:?} {what}: {len} bytes, need {needed}")]
    Truncated {
        /// Protocol layer.
        layer: Layer,
        /// Which message or field.
        what: &'static str,
        /// Bytes available.
        len: usize,
        /// Bytes needed.
        needed: usize,
    },
    /// netvsc: a length, offset, count or identifier the host wrote is out of range.
    #[error("{layer:?} {what} = {value:#x} out of range")]
    OutOfRange {
        /// Protocol layer.
        layer: Layer,
        /// Which field.
        what: &'static str,
        /// The value found.
        value: u64,
    },
    /// netvsc: a message type the driver does not know or does not expect here.
    #[error("{layer:?} unexpected message type {message_type:#x}")]
    UnexpectedMessage {
        /// Protocol layer.
        layer: Layer,
        /// The message type found.
        message_type: u32,
    },
    /// netvsc: the host refused every NVSP version we offer (6.1, 6, 5, 4, 2).
    #[error("host accepts none of NVSP 6.1, 6, 5, 4, 2")]
    NoCommonVersion,
    /// netvsc: the host answered a request with a failure status.
    #[error("host refused {step:?} with status {status:#x}")]
    HostRefused {
        /// The step refused.
        step: Step,
        /// The host's status value (NVSP or NDIS status).
        status: u32,
    },
    /// netvsc: a bounded wait for the host ran out.
    #[error("no answer from the host for {step:?} within {timeout_ms} ms")]
    HostTimeout {
        /// The step waited for.
        step: Step,
        /// The wait bound in milliseconds.
        timeout_ms: u64,
    },
    /// netvsc: the VMBus channel failed (GPADL refused, ring broken, channel closed).
    #[error("VMBus channel: {what}")]
    VmbusChannel {
        /// What failed.
        what: &'static str,
    },
    /// netvsc: the host rescinded the VMBus channel: the device is gone.
    #[error("channel rescinded")]
    ChannelRescinded,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::string::ToString;

    #[test]
    fn messages_carry_their_context() {
        let cases = [
            (
                Error::CapabilityTooShort { len: 4, needed: 16 },
                "virtio capability of 4 bytes is shorter than the 16 needed",
            ),
            (
                Error::NotVendorCapability { id: 5 },
                "capability id 0x05 is not a vendor-specific (virtio) capability",
            ),
            (
                Error::ReservedCapabilityType { cfg_type: 9 },
                "virtio capability has reserved cfg_type 9",
            ),
            (
                Error::ReservedBar { bar: 6 },
                "virtio capability names reserved BAR 6",
            ),
            (
                Error::MisalignedCapability {
                    cfg_type: 1,
                    offset: 0x13,
                },
                "virtio structure type 1 at misaligned offset 0x13",
            ),
            (
                Error::InvalidNotifyMultiplier { multiplier: 3 },
                "notify_off_multiplier 3 is not 0 or a power of two",
            ),
            (
                Error::WindowTooSmall {
                    window: Window::Notify,
                    len: 2,
                    needed: 4,
                },
                "Notify window of 2 bytes is smaller than the 4 needed",
            ),
            (
                Error::InvalidConfig {
                    field: "receive_buffers",
                    value: 0,
                },
                "driver configuration field receive_buffers has invalid value 0",
            ),
            (
                Error::DeviceGone,
                "virtio-net device is gone (registers read all-ones/zero)",
            ),
            (
                Error::ResetTimeout {
                    last_status: 0xf,
                    reads: 100,
                },
                "device reset not complete after 100 reads (status 0x0f)",
            ),
            (
                Error::MissingVersion1 { offered: 0x20 },
                "device does not offer VIRTIO_F_VERSION_1 (offered 0x0000000000000020)",
            ),
            (
                Error::FeaturesRejected {
                    requested: 1 << 32,
                    status: 3,
                },
                "device refused features 0x0000000100000000 (status 0x03 lacks FEATURES_OK)",
            ),
            (
                Error::TooFewQueues {
                    num_queues: 2,
                    needed: 3,
                },
                "device has 2 virtqueues, driver needs 3",
            ),
            (
                Error::QueueUnavailable {
                    queue: QueueKind::Control,
                    index: 2,
                },
                "Control virtqueue 2 is unavailable (queue_size 0)",
            ),
            (
                Error::QueueTooSmall {
                    queue: QueueKind::Receive,
                    size: 8,
                    needed: 16,
                },
                "Receive virtqueue has 8 entries, driver needs 16",
            ),
            (
                Error::NotifyOutOfRange {
                    queue: QueueKind::Transmit,
                    offset: 0x1000,
                    window_len: 64,
                },
                "Transmit queue notify offset 0x1000 is outside the 64-byte notify window",
            ),
            (
                Error::MsixVectorRefused {
                    target: MsixTarget::Queue(QueueKind::Receive),
                    vector: 1,
                },
                "device refused MSI-X vector 1 for Queue(Receive)",
            ),
            (
                Error::DmaAllocationFailed {
                    purpose: DmaPurpose::Ring(QueueKind::Transmit),
                    len: 4096,
                },
                "DMA allocation of 4096 bytes for Ring(Transmit) failed",
            ),
            (
                Error::ConfigUnstable,
                "device configuration kept changing while being read",
            ),
            (
                Error::NoMacAddress,
                "device offers no MAC address and none was configured",
            ),
            (
                Error::ReceiveBufferTooSmall {
                    size: 1024,
                    needed: 1526,
                },
                "receive buffers of 1024 bytes cannot hold a 1526-byte frame without mergeable buffers",
            ),
            (
                Error::DmaAllocationFailed {
                    purpose: DmaPurpose::NetvscSendBuffer,
                    len: 393216,
                },
                "DMA allocation of 393216 bytes for NetvscSendBuffer failed",
            ),
            (
                Error::Truncated {
                    layer: Layer::Rndis,
                    what: "MAC address",
                    len: 4,
                    needed: 6,
                },
                "Rndis MAC address: 4 bytes, need 6",
            ),
            (
                Error::OutOfRange {
                    layer: Layer::Nvsp,
                    what: "send buffer section size",
                    value: 0x10,
                },
                "Nvsp send buffer section size = 0x10 out of range",
            ),
            (
                Error::UnexpectedMessage {
                    layer: Layer::Vmbus,
                    message_type: 0x9,
                },
                "Vmbus unexpected message type 0x9",
            ),
            (
                Error::NoCommonVersion,
                "host accepts none of NVSP 6.1, 6, 5, 4, 2",
            ),
            (
                Error::HostRefused {
                    step: Step::SendBuffer,
                    status: 2,
                },
                "host refused SendBuffer with status 0x2",
            ),
            (
                Error::HostTimeout {
                    step: Step::Init,
                    timeout_ms: 5000,
                },
                "no answer from the host for Init within 5000 ms",
            ),
            (
                Error::VmbusChannel {
                    what: "ring corrupt",
                },
                "VMBus channel: ring corrupt",
            ),
            (Error::ChannelRescinded, "channel rescinded"),
        ];
        for (error, message) in cases {
            assert_eq!(error.to_string(), message);
        }
    }
}
