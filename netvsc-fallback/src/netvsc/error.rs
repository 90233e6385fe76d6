//! The netvsc error type: malformed host messages, refusals during negotiation, timeouts and
//! resource shortages, each with the context needed to act on it.

use thiserror::Error;

/// Which protocol layer a malformed message belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layer {
    /// A VMBus packet (descriptor, transfer-page header, GPA ranges).
    Vmbus,
    /// An NVSP message (the netvsc control protocol).
    Nvsp,
    /// An RNDIS message inside a transfer-page range or a send.
    Rndis,
}

/// What the driver was waiting for when a deadline passed.
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

/// Everything that can go wrong between netvsc and its host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Error)]
pub enum NetvscError {
    /// A message is shorter than the structure it must hold.
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
    /// A length, offset, count or identifier the host wrote is out of range.
    #[error("{layer:?} {what} = {value:#x} out of range")]
    OutOfRange {
        /// Protocol layer.
        layer: Layer,
        /// Which field.
        what: &'static str,
        /// The value found.
        value: u64,
    },
    /// A message type this driver does not know or does not expect here.
    #[error("{layer:?} unexpected message type {message_type:#x}")]
    UnexpectedMessage {
        /// Protocol layer.
        layer: Layer,
        /// The message type found.
        message_type: u32,
    },
    /// The host refused every NVSP version we offer (6.1, 6, 5, 4, 2).
    #[error("host accepts none of NVSP 6.1, 6, 5, 4, 2")]
    NoCommonVersion,
    /// The host answered a request with a failure status.
    #[error("host refused {step:?} with status {status:#x}")]
    Refused {
        /// The step refused.
        step: Step,
        /// The host's status value (NVSP or NDIS status).
        status: u32,
    },
    /// A bounded wait ran out.
    #[error("no answer from the host for {step:?} within {timeout_ms} ms")]
    Timeout {
        /// The step waited for.
        step: Step,
        /// The wait bound in milliseconds.
        timeout_ms: u64,
    },
    /// DMA memory for a buffer could not be allocated.
    #[error("cannot allocate {len} bytes of DMA memory for {what}")]
    OutOfMemory {
        /// What the memory was for.
        what: &'static str,
        /// Bytes asked for.
        len: usize,
    },
    /// The VMBus channel failed (GPADL refused, ring broken, channel closed).
    #[error("VMBus channel: {what}")]
    Channel {
        /// What failed.
        what: &'static str,
    },
    /// The channel was rescinded by the host: the device is gone.
    #[error("channel rescinded")]
    Rescinded,
}
