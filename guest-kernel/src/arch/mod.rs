//! x86_64 CPU support: port I/O, control registers, descriptor tables, the local APIC.

pub mod apic;
pub mod cpu;
pub mod descriptors;
pub mod port;
