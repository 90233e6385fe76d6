//! Shared plumbing for the conformance tests: guest memory as a DMA allocator, our hypervisor
//! port bridged to OpenVMM's SynIC seam, and OpenVMM's VMBus host in-process.
//!
//! OpenVMM's host-side devices see guest memory as one `guestmem::GuestMemory`, where a guest
//! physical address is a byte offset into the allocation. Our drivers take memory from a
//! `net_device::DmaAllocator`; [`GuestDma`] hands out pieces of that same allocation so both sides
//! agree on every address. [`synic::SynicBridge`] / [`synic::BridgePort`] carry SynIC messages
//! and events between our `vmbus::VmbusClient` and `vmbus_server`; [`vmbus_host::VmbusHost`]
//! runs the server with netvsp offered on it (reused by the netvsc and vPCI tests).

pub mod dma;
pub mod synic;
pub mod vmbus_host;

pub use dma::GuestDma;
