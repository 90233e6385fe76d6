//! MANA (Microsoft Azure Network Adapter, PCI 1414:00BA): the VF behind Azure accelerated
//! networking, driven through BAR0 ([`RegisterIo`](net_device::RegisterIo)) and DMA memory
//! ([`DmaAllocator`](net_device::DmaAllocator)) only, presented as a
//! [`NetDevice`](net_device::NetDevice) ([`Mana`]).
//!
//! Facts come from OpenVMM's `gdma_defs` and `gdma` emulator (MIT; read, nothing copied) and
//! `reference/hyperv-vmbus-netvsc.md` §5. Layout: [`regs`] BAR0 (register map, SMC window,
//! doorbells), [`defs`] message and queue-entry layouts, `queues` rings in DMA memory, `hwc`
//! the hardware channel, `transmit` offload planning, [`device`] bring-up, data path and
//! teardown.
//!
//! # Interrupts
//! Two EQs, each on its own MSI-X table entry chosen by [`ManaConfig::hwc_msix_index`]
//! (control events) and [`ManaConfig::data_msix_index`] (completions). The kernel programs the
//! MSI-X table (as for igbvf) and its handler only wakes the event loop: an interrupt means
//! "call [`NetDevice::poll`](net_device::NetDevice::poll) and `receive`", which drain the EQs
//! and CQs and re-arm them. Without MSI-X the driver works the same, polled.

pub mod defs;
pub mod device;
mod hwc;
mod queues;
pub mod regs;
mod transmit;

#[cfg(any(test, feature = "test-utils"))]
pub mod fake;
#[cfg(any(test, feature = "test-utils"))]
pub mod fuzz;
#[cfg(test)]
mod tests;

pub use device::{Mana, ManaConfig, ManaCounters};
pub use hwc::HwcCounters;
pub use regs::is_supported_device;
