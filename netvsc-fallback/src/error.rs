//! The crate's error type: everything that can go wrong while finding, initialising or resetting
//! the device.

use core::fmt;

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
}

/// Why the driver could not parse a capability or bring the device up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error {
    /// The capability bytes are shorter than the structure they must hold.
    CapabilityTooShort {
        /// Bytes available (the smaller of the slice length and `cap_len`).
        len: usize,
        /// Bytes the structure needs.
        needed: usize,
    },
    /// The capability is not vendor-specific (ID 0x09), so it is not a virtio structure.
    NotVendorCapability {
        /// The capability ID found.
        id: u8,
    },
    /// The capability has a reserved `cfg_type`; the spec says to ignore it (virtio 1.x §4.1.4).
    ReservedCapabilityType {
        /// The reserved type value.
        cfg_type: u8,
    },
    /// The capability names a reserved BAR (above 5); the spec says to ignore it.
    ReservedBar {
        /// The BAR number found.
        bar: u8,
    },
    /// The structure offset breaks the alignment the spec requires for its type.
    MisalignedCapability {
        /// The capability type.
        cfg_type: u8,
        /// The offset within the BAR.
        offset: u64,
    },
    /// `notify_off_multiplier` is neither 0 nor a power of two (virtio 1.x §4.1.4.4).
    InvalidNotifyMultiplier {
        /// The value found.
        multiplier: u32,
    },
    /// A register window is too small for the structure it must hold.
    WindowTooSmall {
        /// Which window.
        window: Window,
        /// Its length in bytes.
        len: usize,
        /// The length the driver needs.
        needed: usize,
    },
    /// A field of [`crate::VirtioNetConfig`] is out of range.
    InvalidConfig {
        /// The field name.
        field: &'static str,
        /// The rejected value.
        value: usize,
    },
    /// The device has been removed: its registers read all-ones or zero.
    DeviceGone,
    /// The device did not report reset completion (status 0) within the bounded wait.
    ResetTimeout {
        /// The last `device_status` value read.
        last_status: u8,
        /// How many reads were made.
        reads: u32,
    },
    /// The device does not offer VIRTIO_F_VERSION_1, so it is legacy-only.
    MissingVersion1 {
        /// The feature bits the device offered.
        offered: u64,
    },
    /// The device cleared FEATURES_OK: it does not accept the feature subset (virtio 1.x §3.1.1).
    FeaturesRejected {
        /// The feature bits the driver wrote.
        requested: u64,
        /// `device_status` read back.
        status: u8,
    },
    /// The device reports fewer virtqueues than the negotiated features need.
    TooFewQueues {
        /// `num_queues` read from the device.
        num_queues: u16,
        /// How many the driver needs.
        needed: u16,
    },
    /// `queue_size` reads 0: the virtqueue does not exist.
    QueueUnavailable {
        /// Which queue.
        queue: QueueKind,
        /// Its virtqueue index.
        index: u16,
    },
    /// The device's maximum size for a queue is too small for the driver's use of it.
    QueueTooSmall {
        /// Which queue.
        queue: QueueKind,
        /// The size available.
        size: u16,
        /// The size needed.
        needed: u16,
    },
    /// The queue's notification address lies outside the notify window.
    NotifyOutOfRange {
        /// Which queue.
        queue: QueueKind,
        /// `queue_notify_off * notify_off_multiplier`.
        offset: usize,
        /// Length of the notify window.
        window_len: usize,
    },
    /// The device read back NO_VECTOR after an MSI-X vector was written (virtio 1.x §4.1.5.1.2).
    MsixVectorRefused {
        /// What the vector was for.
        target: MsixTarget,
        /// The vector that was refused.
        vector: u16,
    },
    /// The DMA allocator ran out of memory.
    DmaAllocationFailed {
        /// What the memory was for.
        purpose: DmaPurpose,
        /// Bytes requested.
        len: usize,
    },
    /// The device configuration kept changing while the driver read it.
    ConfigUnstable,
    /// The device does not offer VIRTIO_NET_F_MAC and no fallback address was configured.
    NoMacAddress,
    /// Without mergeable buffers, each receive buffer must hold the largest frame.
    ReceiveBufferTooSmall {
        /// The configured buffer size.
        size: usize,
        /// The size needed (virtio-net header plus largest frame).
        needed: usize,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::CapabilityTooShort { len, needed } => {
                write!(
                    f,
                    "virtio capability of {len} bytes is shorter than the {needed} needed"
                )
            }
            Error::NotVendorCapability { id } => {
                write!(
                    f,
                    "capability id {id:#04x} is not a vendor-specific (virtio) capability"
                )
            }
            Error::ReservedCapabilityType { cfg_type } => {
                write!(f, "virtio capability has reserved cfg_type {cfg_type}")
            }
            Error::ReservedBar { bar } => write!(f, "virtio capability names reserved BAR {bar}"),
            Error::MisalignedCapability { cfg_type, offset } => {
                write!(
                    f,
                    "virtio structure type {cfg_type} at misaligned offset {offset:#x}"
                )
            }
            Error::InvalidNotifyMultiplier { multiplier } => {
                write!(
                    f,
                    "notify_off_multiplier {multiplier} is not 0 or a power of two"
                )
            }
            Error::WindowTooSmall {
                window,
                len,
                needed,
            } => {
                write!(
                    f,
                    "{window:?} window of {len} bytes is smaller than the {needed} needed"
                )
            }
            Error::InvalidConfig { field, value } => {
                write!(
                    f,
                    "driver configuration field {field} has invalid value {value}"
                )
            }
            Error::DeviceGone => write!(
                f,
                "virtio-net device is gone (registers read all-ones/zero)"
            ),
            Error::ResetTimeout { last_status, reads } => write!(
                f,
                "device reset not complete after {reads} reads (status {last_status:#04x})"
            ),
            Error::MissingVersion1 { offered } => {
                write!(
                    f,
                    "device does not offer VIRTIO_F_VERSION_1 (offered {offered:#018x})"
                )
            }
            Error::FeaturesRejected { requested, status } => write!(
                f,
                "device refused features {requested:#018x} (status {status:#04x} lacks FEATURES_OK)"
            ),
            Error::TooFewQueues { num_queues, needed } => {
                write!(
                    f,
                    "device has {num_queues} virtqueues, driver needs {needed}"
                )
            }
            Error::QueueUnavailable { queue, index } => {
                write!(
                    f,
                    "{queue:?} virtqueue {index} is unavailable (queue_size 0)"
                )
            }
            Error::QueueTooSmall {
                queue,
                size,
                needed,
            } => {
                write!(
                    f,
                    "{queue:?} virtqueue has {size} entries, driver needs {needed}"
                )
            }
            Error::NotifyOutOfRange {
                queue,
                offset,
                window_len,
            } => write!(
                f,
                "{queue:?} queue notify offset {offset:#x} is outside the {window_len}-byte notify window"
            ),
            Error::MsixVectorRefused { target, vector } => {
                write!(f, "device refused MSI-X vector {vector} for {target:?}")
            }
            Error::DmaAllocationFailed { purpose, len } => {
                write!(f, "DMA allocation of {len} bytes for {purpose:?} failed")
            }
            Error::ConfigUnstable => {
                write!(f, "device configuration kept changing while being read")
            }
            Error::NoMacAddress => {
                write!(f, "device offers no MAC address and none was configured")
            }
            Error::ReceiveBufferTooSmall { size, needed } => write!(
                f,
                "receive buffers of {size} bytes cannot hold a {needed}-byte frame without mergeable buffers"
            ),
        }
    }
}
