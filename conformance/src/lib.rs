//! Shared plumbing for the conformance tests: guest memory as a DMA allocator, and helpers.
//!
//! OpenVMM's host-side devices see guest memory as one `guestmem::GuestMemory`, where a guest
//! physical address is a byte offset into the allocation. Our drivers take memory from a
//! `net_device::DmaAllocator`; [`GuestDma`] hands out pieces of that same allocation so both sides
//! agree on every address.

pub mod dma;

pub use dma::GuestDma;
