//! Guest-side VMBus client: the hypervisor seam, channel-management messages, ring buffers,
//! packet framing and open channels.
//!
//! Layers, bottom up: [`hypervisor::HypervisorPort`] (implemented by the kernel over SynIC and
//! hypercalls, by tests over fakes or OpenVMM), [`protocol`] (typed channel messages),
//! [`ring`] (the standard shared ring, both roles), [`packet`] (ring packet framing) and
//! [`channel::Channel`] (an open channel a driver owns). Everything the host writes is
//! bounds-checked; a bad value is a counted error, never a panic.
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

extern crate alloc;

pub mod channel;
pub mod client;
pub mod error;
pub mod guid;
pub mod hypervisor;
pub mod packet;
pub mod protocol;
pub mod ring;
#[cfg(any(test, feature = "fake-host"))]
pub mod testing;

pub use channel::{Channel, ChannelCounters, ChannelIds};
pub use client::{
    ClientConfig, ClientCounters, ClientEvent, GpadlBuffer, Offer, OpenParams, VmbusClient,
};
pub use error::{Error, PacketError, RingCorruption};
pub use guid::Guid;
pub use hypervisor::{ChannelEvents, EventSignal, HvStatus, HypervisorPort};
pub use packet::{
    GpaDirectRange, IncomingKind, IncomingPacket, OutgoingKind, OutgoingPacket, TransferPageRange,
};
pub use ring::{RingGeometry, RingMemory, RingReader, RingWriter};
