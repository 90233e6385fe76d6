//! The VMBus channel as netvsc needs it: packets in and out of the rings, GPADLs, the host's
//! signal, a clock, and rescind.
//!
//! The driver is written against this trait, not a concrete VMBus client, so the same code
//! runs over the kernel's VMBus client (through an adapter in the kernel glue or the `vmbus`
//! crate), over OpenVMM's netvsp in the conformance tests and over the fake host of this
//! crate's unit tests.

use alloc::vec::Vec;

use net_device::DmaRegion;

use crate::error::Error;

/// One GPA range of a GPA-direct packet: `byte_count` bytes starting `byte_offset` bytes into
/// the first of `page_numbers` (4 KiB guest page numbers, consecutive memory).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GpaRange<'a> {
    /// Bytes covered.
    pub byte_count: u32,
    /// Offset into the first page.
    pub byte_offset: u32,
    /// Guest page numbers.
    pub page_numbers: &'a [u64],
}

/// A packet for the guest → host ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutgoingPacket<'a> {
    /// An in-band packet (VMBus type 6) carrying `payload`.
    InBand {
        /// Echoed by the host's completion.
        transaction_id: u64,
        /// Ask the host for a completion.
        completion_requested: bool,
        /// The NVSP message.
        payload: &'a [u8],
    },
    /// A completion (type 0xB) of a host packet.
    Completion {
        /// The host packet's transaction id.
        transaction_id: u64,
        /// The NVSP completion message (may be empty).
        payload: &'a [u8],
    },
    /// A GPA-direct packet (type 9): `payload` in-band, the data in guest memory, always with
    /// a completion requested.
    GpaDirect {
        /// Echoed by the host's completion.
        transaction_id: u64,
        /// Where the data is.
        ranges: &'a [GpaRange<'a>],
        /// The NVSP message.
        payload: &'a [u8],
    },
}

impl OutgoingPacket<'_> {
    /// Bytes the packet takes in a VMBus ring: the 16-byte descriptor, a GPA-direct packet's
    /// range header and page lists, the payload padded to 8 bytes, and the 8-byte trailer
    /// (`hyperv-vmbus-netvsc.md` §2.4). Compared with [`NetvscChannel::outgoing_free`].
    pub fn ring_len(&self) -> usize {
        const DESCRIPTOR: usize = 16;
        const TRAILER: usize = 8;
        let (header, payload) = match *self {
            OutgoingPacket::InBand { payload, .. } | OutgoingPacket::Completion { payload, .. } => {
                (DESCRIPTOR, payload)
            }
            OutgoingPacket::GpaDirect {
                ranges, payload, ..
            } => {
                // Reserved word and range count, then per range its byte count and offset
                // followed by one u64 per page.
                let ranges: usize = ranges
                    .iter()
                    .map(|range| 8 + 8 * range.page_numbers.len())
                    .sum();
                (DESCRIPTOR + 8 + ranges, payload)
            }
        };
        (header + payload.len()).next_multiple_of(8) + TRAILER
    }
}

/// What kind of packet arrived from the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum IncomingKind {
    /// In-band data (type 6).
    #[default]
    InBand,
    /// A completion of one of our packets (type 0xB).
    Completion,
    /// Data in the receive buffer (type 7): see [`IncomingPacket::ranges`].
    TransferPages,
}

/// One range of a transfer-page packet: `byte_count` bytes at `byte_offset` of the buffer
/// named by the packet's page-set id. Untrusted: the driver checks it against the buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct TransferRange {
    /// Bytes in the range.
    pub byte_count: u32,
    /// Offset in the receive buffer.
    pub byte_offset: u32,
}

/// A packet read from the host → guest ring into reusable storage.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IncomingPacket {
    /// The packet type.
    pub kind: IncomingKind,
    /// The host's transaction id (ours, for completions).
    pub transaction_id: u64,
    /// The host asked for a completion.
    pub completion_requested: bool,
    /// Transfer-page packets: the buffer id we gave the host (`xfer_pageset_id`).
    pub pageset_id: u16,
    /// Transfer-page packets: the ranges, as the host wrote them.
    pub ranges: Vec<TransferRange>,
    /// The in-band payload (the NVSP message).
    pub payload: Vec<u8>,
}

/// The channel a netvsc driver runs on: one opened VMBus channel plus the client operations it
/// needs. Datapath calls (`try_send`, `try_receive`, `flush`) never block; `create_gpadl`,
/// `teardown_gpadl` and `wait` block at most for bounded times the implementation chooses.
pub trait NetvscChannel {
    /// Writes one packet into the guest → host ring. `Ok(false)` when the ring lacks room (the
    /// caller retries later); errors mean the channel is unusable (rescinded, corrupt ring).
    fn try_send(&mut self, packet: &OutgoingPacket<'_>) -> Result<bool, Error>;
    /// Signals the host if packets written since the last flush need it.
    fn flush(&mut self);
    /// Bytes free in the guest → host ring right now, to compare with
    /// [`OutgoingPacket::ring_len`]: a packet that needs no more than this is written by the
    /// next `try_send`. Only our own sends take room, so the answer stays a lower bound until
    /// the next send. Errors mean the channel is unusable.
    fn outgoing_free(&mut self) -> Result<usize, Error>;
    /// Asks the host to signal the channel once `bytes` are free in the guest → host ring
    /// (0 = no such signal). Without it a host signals only for packets it writes, so a
    /// driver that found the ring full would learn of the room only at its next unrelated
    /// wake-up. Errors mean the channel is unusable.
    fn request_room_signal(&mut self, bytes: usize) -> Result<(), Error>;
    /// Reads the next packet of the host → guest ring into `into`. `Ok(false)` when empty.
    /// Malformed packets are the implementation's to count and skip, or an error if the ring
    /// itself cannot be trusted any more.
    fn try_receive(&mut self, into: &mut IncomingPacket) -> Result<bool, Error>;
    /// Describes `region` (page-aligned, a multiple of 4 KiB) to the host as a GPADL and
    /// returns its id once the host has confirmed it.
    fn create_gpadl(&mut self, region: &DmaRegion) -> Result<u32, Error>;
    /// Tears a GPADL down; the memory may be reused once this returns `Ok`.
    fn teardown_gpadl(&mut self, gpadl: u32) -> Result<(), Error>;
    /// Monotonic time in nanoseconds.
    fn now_ns(&self) -> u64;
    /// Waits until the host signals the channel or `deadline_ns` passes (whichever is first);
    /// may return early.
    fn wait(&mut self, deadline_ns: u64);
    /// True once the host rescinded the channel.
    fn is_rescinded(&self) -> bool;
    /// Closes the channel (the host stops using the rings).
    fn close(&mut self);
}
