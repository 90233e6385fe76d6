//! Shared plumbing for the conformance tests: guest memory as a DMA allocator, our hypervisor
//! port bridged to OpenVMM's SynIC seam, and OpenVMM's VMBus host in-process.
//!
//! OpenVMM's host-side devices see guest memory as one `guestmem::GuestMemory`, where a guest
//! physical address is a byte offset into the allocation. Our drivers take memory from a
//! `net_device::DmaAllocator`; [`GuestDma`] hands out pieces of that same allocation so both sides
//! agree on every address. [`synic::SynicBridge`] / [`synic::BridgePort`] carry SynIC messages
//! and events between our `vmbus::VmbusClient` and `vmbus_server`; [`vmbus_host::VmbusHost`]
//! runs the server with netvsp offered on it (reused by the netvsc and vPCI tests);
//! [`vpci_host::GdmaOnVpci`] offers a MANA emulator behind OpenVMM's vPCI server on it;
//! [`vf_host`] makes that netvsp's virtual function, and [`wire::Wire`] puts netvsp's and the
//! VF's endpoints on one simulated wire steered by netvsp's data-path switch.

pub mod dma;
pub mod synic;
pub mod vf_host;
pub mod vmbus_host;
pub mod vpci_host;
pub mod wire;

pub use dma::GuestDma;
