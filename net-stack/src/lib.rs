//! One logical network interface over a failover bond (SR-IOV VF + synthetic NIC), run by smoltcp.
//!
//! The crate is independent of the kernel and of concrete drivers: NICs arrive as
//! `Box<dyn net_device::NetDevice>` and time, sleeping and randomness come through [`Platform`].
//!
//! * [`config`] parses `ip=`, `gw=`, `dns=`, `mtu=` (and `ip6=`, `gw6=`) from the kernel command
//!   line into a [`NetConfig`].
//! * [`bond`] is a sans-IO state machine over the synthetic path (always present, the identity)
//!   and an optional VF path: it picks the transmit path, accepts receive traffic from both
//!   without delivering a frame twice, damps a flapping VF and asks for announcements after every
//!   switch.
//! * [`glue`] implements `smoltcp::phy::Device` for the bond.
//! * [`NetStack`] owns the smoltcp interface, the sockets, the bond and the platform and offers a
//!   small non-blocking, handle-based socket API plus an event loop ([`NetStack::run`]).
//! * [`fake`] is a scripted in-memory [`net_device::NetDevice`] for host tests of the stack and
//!   of applications built on it.
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

extern crate alloc;

pub mod announce;
pub mod bond;
pub mod checksum;
mod coalesce;
pub mod config;
mod dedup;
mod error;
pub mod fake;
pub mod glue;
mod segmentation;
mod slab;
mod stack;
mod window_edge;

pub use bond::{
    AttachRejected, Bond, BondConfig, BondStats, PathCounters, PathId, PathStats, ReceiveTimings,
};
pub use coalesce::{CoalesceStats, coalesce_batches};
pub use config::{Ipv4Mode, Ipv6Static, NetConfig};
pub use error::Error;
pub use stack::{
    NetStack, NetStats, StackOptions, TcpListener, TcpOptions, TcpStream, UdpOptions, UdpSocket,
    link_local_address,
};

/// Addresses and endpoints as the socket API takes and returns them (smoltcp's wire types; the
/// address types are `core::net`'s).
pub use smoltcp::wire::{
    IpAddress, IpCidr, IpEndpoint, Ipv4Address, Ipv4Cidr, Ipv6Address, Ipv6Cidr,
};

/// The TCP state of a stream, for diagnostics (smoltcp's state enum).
pub use smoltcp::socket::tcp::State as TcpState;

/// What the stack needs from the machine it runs on.
pub trait Platform {
    /// Monotonic time in nanoseconds since an arbitrary origin (boot).
    fn now_ns(&self) -> u64;
    /// Sleep until an interrupt or the deadline (None = no deadline).
    ///
    /// Implementations must not lose a wake-up that happened after the caller last polled (for
    /// example by checking a pending-interrupt flag with interrupts disabled before halting).
    fn wait_for_event(&self, deadline_ns: Option<u64>);
    /// A seed that differs from boot to boot (TCP initial sequence numbers, ephemeral ports).
    fn random_seed(&self) -> u64;
}

/// Result type of this crate.
pub type Result<T> = core::result::Result<T, Error>;
