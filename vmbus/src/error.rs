//! The crate's error type.

use crate::hypervisor::HvStatus;
use crate::protocol::Version;

/// How a shared ring was found corrupt (the peer wrote something impossible).
#[derive(Clone, Copy, PartialEq, Eq, Debug, thiserror::Error)]
pub enum RingCorruption {
    /// The peer's index is past the data area or not 8-byte aligned.
    #[error("index {index:#x} outside the {data_len:#x}-byte data area or unaligned")]
    BadIndex {
        /// The index read from the control page.
        index: u32,
        /// Size of the data area.
        data_len: u32,
    },
    /// Fewer bytes available than the smallest packet (descriptor + trailer).
    #[error("{available} bytes available, less than a packet")]
    ShortData {
        /// Bytes between read and write index.
        available: u32,
    },
    /// The descriptor's header/packet lengths contradict each other.
    #[error("descriptor offset8 {offset8} / len8 {len8} invalid")]
    DescriptorLengths {
        /// Header length in 8-byte units.
        offset8: u16,
        /// Packet length in 8-byte units.
        len8: u16,
    },
    /// The descriptor claims more bytes than the writer published.
    #[error("packet of {len} bytes (+ trailer) exceeds the {available} bytes available")]
    PacketExceedsData {
        /// Packet length without trailer.
        len: u32,
        /// Bytes between read and write index.
        available: u32,
    },
    /// A control word could not be accessed (ring memory smaller than its geometry).
    #[error("control page inaccessible")]
    ControlPage,
}

/// Why a packet with sound ring framing was rejected.
#[derive(Clone, Copy, PartialEq, Eq, Debug, thiserror::Error)]
pub enum PacketError {
    /// Shorter than its descriptor or its declared header.
    #[error("packet truncated")]
    Truncated,
    /// A packet type this client does not handle.
    #[error("unknown packet type {0:#x}")]
    UnknownType(u16),
    /// Flag bits other than completion-requested.
    #[error("unknown packet flags {0:#x}")]
    UnknownFlags(u16),
    /// The transfer-page range count does not fit the header.
    #[error("transfer-page ranges ({count}) exceed the header")]
    TransferPageRanges {
        /// Declared range count.
        count: u32,
    },
    /// The GPA-direct ranges are missing or do not fit the header.
    #[error("GPA-direct ranges ({count}) invalid")]
    GpaDirectRanges {
        /// Declared range count.
        count: u32,
    },
}

/// Errors of the VMBus client, its rings and its channels.
#[derive(Clone, PartialEq, Eq, Debug, thiserror::Error)]
pub enum Error {
    /// Ring memory of the wrong size or alignment.
    #[error("ring layout invalid: {reason}")]
    RingLayout {
        /// What is wrong.
        reason: &'static str,
    },
    /// The peer corrupted a ring: the channel is unusable.
    #[error("ring corrupt: {0}")]
    RingCorrupt(#[from] RingCorruption),
    /// Not enough room in the outgoing ring right now.
    #[error("ring full: {needed} bytes needed, {free} free")]
    RingFull {
        /// Bytes the packet takes, trailer included.
        needed: u32,
        /// Bytes free.
        free: u32,
    },
    /// The packet can never fit the ring (or the descriptor's 16-bit length fields).
    #[error("packet of {len} bytes exceeds the maximum {max}")]
    PacketTooLarge {
        /// Bytes the packet takes.
        len: usize,
        /// Largest possible.
        max: usize,
    },
    /// A received packet was malformed (dropped).
    #[error("malformed packet: {0}")]
    MalformedPacket(#[from] PacketError),
    /// HvPostMessage failed for good (or kept failing with a retryable status).
    #[error("posting a {what} message failed: {status}")]
    PostMessage {
        /// The message.
        what: &'static str,
        /// The last status.
        status: HvStatus,
    },
    /// HvSignalEvent failed.
    #[error("signalling connection {connection_id:#x} failed: {status}")]
    SignalEvent {
        /// The channel's connection id.
        connection_id: u32,
        /// The status.
        status: HvStatus,
    },
    /// The host did not answer in time.
    #[error("timed out after {waited_ms} ms waiting for {what}")]
    Timeout {
        /// What we waited for.
        what: &'static str,
        /// How long.
        waited_ms: u64,
    },
    /// The host refused every version we offered.
    #[error("the host accepted no VMBus version down to {lowest}")]
    NoVersionAccepted {
        /// The last version tried.
        lowest: Version,
    },
    /// The host refused the connection (VERSION_RESPONSE connection_state ≠ 0).
    #[error("the host refused the connection: state {state}")]
    ConnectionRefused {
        /// connection_state.
        state: u8,
    },
    /// Not connected (or already unloaded).
    #[error("not connected to the host")]
    NotConnected,
    /// No offer with this relid (or it was rescinded).
    #[error("no channel with relid {relid}")]
    UnknownChannel {
        /// The relid.
        relid: u32,
    },
    /// The host refused a GPADL.
    #[error("the host refused GPADL {gpadl}: status {status:#x}")]
    GpadlRefused {
        /// The GPADL id.
        gpadl: u32,
        /// creation_status.
        status: u32,
    },
    /// The channel is already open.
    #[error("relid {relid} is already open")]
    AlreadyOpen {
        /// The channel.
        relid: u32,
    },
    /// The host refused to open a channel.
    #[error("the host refused to open relid {relid}: status {status:#x}")]
    OpenRefused {
        /// The channel.
        relid: u32,
        /// OPENCHANNEL_RESULT status.
        status: u32,
    },
    /// The channel was rescinded while we waited on it.
    #[error("relid {relid} was rescinded")]
    Rescinded {
        /// The channel.
        relid: u32,
    },
    /// DMA memory could not be allocated.
    #[error("out of DMA memory ({bytes} bytes)")]
    OutOfMemory {
        /// Bytes asked for.
        bytes: usize,
    },
    /// A buffer that cannot be described by a GPADL (empty, unaligned, too large).
    #[error("buffer cannot be described by a GPADL: {reason}")]
    BadGpadlBuffer {
        /// What is wrong.
        reason: &'static str,
    },
}
