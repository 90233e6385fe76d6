//! The VF drivers: Intel 82576 (8086:10CA) / I350 (8086:1520) igbvf, the SR-IOV VF on KVM, and
//! MANA (1414:00BA, module [`mana`]), the VF behind Azure accelerated networking; plus the lab
//! PF responder that stands in for an igb PF driver inside QEMU test VMs.
//!
//! The drivers know nothing about PCI or the kernel: each gets its function's BAR0 as a
//! [`RegisterIo`](net_device::RegisterIo), DMA memory from a
//! [`DmaAllocator`](net_device::DmaAllocator), a clock and an idle hook through [`WaitHost`], and
//! presents itself as a [`NetDevice`](net_device::NetDevice) ([`IgbVf`], [`Mana`]).
//!
//! igbvf layout (like Linux `igbvf`, facts only): [`regs`] register map, [`descriptors`] DMA
//! descriptor layouts, [`mailbox`] PF↔VF mailbox protocol, `ring` descriptor rings that never
//! touch MMIO, `offload` transmit checksum/TSO planning, `hw` reset/init/link sequences,
//! [`device`] the `NetDevice` implementation,
//! [`stats`] wrapping hardware counters. [`lab_pf`] (with [`pf_regs`]) is the PF side for test
//! VMs; nothing in the VF driver uses it.
//!
//! # Waiting for the PF in a single-threaded unikernel
//! Initialisation talks to the PF through the mailbox and must wait for its answers. In our
//! test VMs the PF responder ([`lab_pf::LabPf`]) runs *in the same image on the same CPU*, so a
//! plain busy-wait would wait forever. Every wait loop in this crate is therefore bounded by time
//! (from [`WaitHost::now_ns`]) *and* by an iteration cap, and calls [`WaitHost::idle`] on every
//! turn: the kernel's implementation runs `LabPf::service` there in lab builds (and just spins
//! on real hardware). The datapath (`poll`, `receive`, `transmit`) never waits.
#![cfg_attr(not(test), no_std)]
#![deny(unsafe_code)]

extern crate alloc;
#[cfg(all(feature = "test-utils", not(test)))]
extern crate std;

pub mod descriptors;
pub mod device;
mod hw;
pub mod lab_pf;
pub mod mailbox;
pub mod mana;
mod offload;
pub mod pf_regs;
pub mod regs;
mod ring;
pub mod stats;

#[cfg(any(test, feature = "test-utils"))]
pub mod fake;
#[cfg(any(test, feature = "test-utils"))]
pub mod fake_dma;
#[cfg(any(test, feature = "test-utils"))]
mod fake_offload;

#[cfg(test)]
mod device_tests;
#[cfg(test)]
mod lab_pf_tests;
#[cfg(test)]
mod offload_tests;

pub use device::{Config, DriverCounters, IgbVf, MailboxVectorEncoding};
pub use lab_pf::{LabPf, LabPfConfig, LabPfCounters, SriovControl};
pub use mailbox::{MailboxStage, Request};
pub use mana::{Mana, ManaConfig, ManaCounters};
pub use stats::HardwareStats;

/// What the driver needs from its host while it waits for the device or the PF.
///
/// Waits are short busy-waits (the PF normally answers within microseconds; the longest bound is
/// [`Config::mailbox_timeout_ns`]). See the crate docs for why `idle` exists.
pub trait WaitHost {
    /// Monotonic time in nanoseconds.
    fn now_ns(&mut self) -> u64;
    /// Called once per turn of every wait loop: run an in-image PF responder (lab builds) or
    /// relax the CPU (`core::hint::spin_loop`).
    fn idle(&mut self);
}

/// Which RX/TX queue an error is about.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Queue {
    /// Receive queue 0.
    Receive,
    /// Transmit queue 0.
    Transmit,
}

impl core::fmt::Display for Queue {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            Queue::Receive => "receive",
            Queue::Transmit => "transmit",
        })
    }
}

/// Everything that can go wrong in this crate (VF driver and lab PF).
#[derive(Clone, Copy, PartialEq, Eq, Debug, thiserror::Error)]
pub enum Error {
    /// The device no longer answers: its STATUS register read as 0 (QEMU after removal) or
    /// all-ones (real hardware after removal).
    #[error("device gone during {operation}: STATUS reads {status:#010x}")]
    DeviceGone {
        /// What the driver was doing.
        operation: &'static str,
        /// The STATUS value that gave it away.
        status: u32,
    },
    /// The PF kept its reset indication (RSTI/RSTD) up after the VF reset.
    #[error("PF still in reset {waited_ns} ns after the VF reset (V2PMAILBOX {mailbox:#04x})")]
    ResetTimeout {
        /// How long the driver waited.
        waited_ns: u64,
        /// The last V2PMAILBOX value read.
        mailbox: u32,
    },
    /// The PF did not take part in a mailbox exchange in time.
    #[error("mailbox {request} timed out waiting for the {stage}")]
    MailboxTimeout {
        /// The request that was being made.
        request: Request,
        /// Which step did not happen.
        stage: MailboxStage,
    },
    /// The PF answered a request with NACK.
    #[error("PF refused {request} (reply {reply:#010x})")]
    PfRefused {
        /// The refused request.
        request: Request,
        /// The PF's reply word.
        reply: u32,
    },
    /// The PF answered with something that is not a reply to the request.
    #[error("PF answered {request} with {reply:#010x}")]
    UnexpectedReply {
        /// The request that was being made.
        request: Request,
        /// The PF's reply word.
        reply: u32,
    },
    /// The PF assigned no MAC address (VF_RESET NACKed or all-zero) and none was configured.
    #[error("the PF assigned no MAC address and Config::requested_mac is not set")]
    NoMacAddress,
    /// DMA memory ran out.
    #[error("could not allocate {bytes} bytes of DMA memory for {purpose}")]
    DmaAllocation {
        /// What the memory was for.
        purpose: &'static str,
        /// How much was asked for.
        bytes: usize,
    },
    /// A configuration value is out of range.
    #[error("invalid configuration: {reason}")]
    InvalidConfig {
        /// Which rule was broken.
        reason: &'static str,
    },
    /// A queue did not report enabled/disabled in time.
    #[error("{queue} queue did not {} within {waited_ns} ns", if *enable { "start" } else { "stop" })]
    QueueTimeout {
        /// Which queue.
        queue: Queue,
        /// True when enabling, false when disabling.
        enable: bool,
        /// How long the driver waited.
        waited_ns: u64,
    },
    /// An MSI-X vector index the VF cannot use.
    #[error("MSI-X vector {index} cannot be used: {reason}")]
    InvalidVector {
        /// The requested vector.
        index: u8,
        /// Why not.
        reason: &'static str,
    },
    /// The operation needs a working device but the driver is stopped or resetting.
    #[error("device not ready for {operation}")]
    NotReady {
        /// What was attempted.
        operation: &'static str,
    },
    /// MANA: an SMC command (hardware channel setup/teardown) did not complete in time.
    #[error("MANA SMC command {command} not answered within {waited_ns} ns")]
    SmcTimeout {
        /// The SMC command type.
        command: u32,
        /// How long the driver waited.
        waited_ns: u64,
    },
    /// MANA: the device refused an SMC command.
    #[error("MANA SMC command {command} failed with status {status}")]
    SmcFailed {
        /// The SMC command type.
        command: u32,
        /// The status byte of the response.
        status: u8,
    },
    /// MANA: a hardware channel request got no response in time.
    #[error("MANA HWC request {request:#x} not answered within {waited_ns} ns")]
    HwcTimeout {
        /// The request (message type), or the init EQE awaited.
        request: u32,
        /// How long the driver waited.
        waited_ns: u64,
    },
    /// MANA: the device answered a hardware channel request with an error status.
    #[error("MANA HWC request {request:#x} failed with status {status:#x}")]
    HwcFailed {
        /// The request (message type).
        request: u32,
        /// The response status.
        status: u32,
    },
    /// MANA: the device said something impossible (out-of-range id, length, owner count…).
    #[error("MANA device protocol error: {what} ({value:#x})")]
    ManaProtocol {
        /// What was wrong.
        what: &'static str,
        /// The offending value.
        value: u64,
    },
    /// Lab PF: the kernel's SR-IOV code could not enable the VFs.
    #[error("could not enable {requested} VFs: {reason}")]
    SriovEnable {
        /// How many VFs were asked for.
        requested: u16,
        /// Why not.
        reason: &'static str,
    },
    /// Lab PF: a VF index outside the VFs it manages.
    #[error("VF {vf} does not exist (the lab PF manages {count})")]
    NoSuchVf {
        /// The requested VF.
        vf: u16,
        /// How many VFs the lab PF manages.
        count: u16,
    },
    /// Lab PF: an MDIC (PHY register) access did not complete or reported an error.
    #[error("PHY register {register} access failed (MDIC {mdic:#010x})")]
    PhyAccess {
        /// The PHY register.
        register: u32,
        /// The last MDIC value read.
        mdic: u32,
    },
}
