//! netvsc: the Hyper-V synthetic NIC over VMBus (NVSP and RNDIS), presented as a
//! [`net_device::NetDevice`].
//!
//! The kernel (or a test) opens the netvsc VMBus channel, wraps the [`vmbus::Channel`] and its
//! client in a [`VmbusNetvscChannel`] (the client supplies GPADLs, waiting, rescind and close
//! through [`VmbusChannelControl`]), or implements [`NetvscChannel`] directly, and calls
//! [`Netvsc::new`] with a
//! [`net_device::DmaAllocator`] and a [`NetvscConfig`]. `new` runs the whole bring-up with
//! bounded waits and returns the device, which the bond then drives like virtio-net. Wire
//! formats live in [`nvsp`] and [`rndis`] as typed layouts parsed without `unsafe`.

mod channel;
pub mod data_path;
mod device;
pub mod nvsp;
pub mod rndis;
mod vmbus_channel;

#[cfg(any(test, feature = "test-utils"))]
pub mod fake_host;

#[cfg(test)]
mod tests;

pub use crate::error::{Layer, Step};
pub use channel::{
    GpaRange, IncomingKind, IncomingPacket, NetvscChannel, OutgoingPacket, TransferRange,
};
pub use data_path::{DataPathCounters, Pairing, SyntheticCause, VfEvent, pair};
pub use device::{Negotiated, Netvsc, NetvscConfig, NetvscCounters, VfAssociation};
pub use rndis::OffloadSupport;
pub use vmbus_channel::{AdapterCounters, VmbusChannelControl, VmbusNetvscChannel};
