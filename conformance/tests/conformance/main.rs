//! Conformance against OpenVMM's host code, one test binary (linking OpenVMM once).
//!
//! Each area has its own module: the VMBus control plane against `vmbus_server`, netvsc against
//! `netvsp`, MANA against `gdma`, vPCI against `vpci`.

mod guest_memory;
mod hyperv_vf;
mod mana;
mod netvsc;
mod vmbus_control;
mod vpci;
