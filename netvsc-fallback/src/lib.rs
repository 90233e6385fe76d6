//! The synthetic (standby) path of the failover NIC: virtio-net on KVM, netvsc on Hyper-V.
//!
//! **virtio-net** (the crate root): a virtio-net 1.x driver over modern virtio-pci.
//! The kernel finds the device (PCI 1af4:1041, or transitional 1af4:1000), parses its vendor
//! capabilities with [`parse_virtio_pci_capability`], maps the windows and builds a
//! [`VirtioNet`] from [`VirtioPciRegions`], a [`net_device::DmaAllocator`] and a
//! [`VirtioNetConfig`]. The driver knows nothing about PCI: it reaches registers through
//! [`net_device::RegisterIo`] and presents itself as a [`net_device::NetDevice`].
//!
//! The split virtqueues are our own (`virtqueue`), not virtio-drivers': that crate allocates per
//! multi-buffer add, cannot program MSI-X vectors and fixes the feature set.
//!
//! **netvsc** ([`netvsc`]): the Hyper-V synthetic NIC, NVSP 6.1 down to 2 and RNDIS over a
//! VMBus channel, bounds-checking everything the host writes.
//!
//! Both report failures as the one [`Error`].
//!
//! With the `test-utils` feature (always on in this crate's tests), [`fake`] provides a fake
//! virtio-net device model and a heap-backed DMA allocator for host tests, and
//! [`netvsc::fake_host`] a fake netvsc host.
#![cfg_attr(not(test), no_std)]
#![deny(unsafe_code)]
#![warn(missing_docs)]

extern crate alloc;
#[cfg(all(feature = "test-utils", not(test)))]
extern crate std;

mod checksum;
mod device;
mod dma_memory;
mod error;
mod features;
mod net_header;
pub mod netvsc;
pub mod pci;
mod virtqueue;

#[cfg(any(test, feature = "test-utils"))]
pub mod fake;

#[cfg(test)]
mod tests;

pub use device::{MsixVectors, VirtioNet, VirtioNetConfig, VirtioNetCounters};
pub use error::{DmaPurpose, Error, Layer, MsixTarget, QueueKind, Step, Window};
pub use features::Features;
pub use net_header::{NET_HEADER_LEN, NetHeaderFlags, VirtioNetHeader};
pub use pci::{
    DeviceStatus, NetStatus, VirtioPciCapability, VirtioPciCapabilityType, VirtioPciRegions,
    parse_virtio_pci_capability,
};
