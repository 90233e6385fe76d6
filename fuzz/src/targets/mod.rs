//! The registered targets: one line each in [`TARGETS`].

mod acpi;
mod bond;
mod boot;
mod cmdline;
mod coalesce;
mod common;
mod igbvf;
mod iperf_control;
mod iperf_json;
mod iperf_server;
mod lab_pf;
mod mana;
mod netvsc;
mod pci;
mod stack;
mod virtio_net;
mod vmbus_messages;
mod vmbus_packet;
mod vmbus_ring;
mod vpci;

use crate::engine::Target;

/// Every target, in the order `cargo xtask fuzz` runs them. To add one, write a module with a
/// `TARGET` constant (see any of these) and list it here.
pub static TARGETS: &[Target] = &[
    cmdline::TARGET,
    boot::TARGET,
    acpi::TARGET,
    iperf_json::TARGET,
    iperf_control::TARGET,
    iperf_server::TARGET,
    virtio_net::TARGET,
    igbvf::TARGET,
    lab_pf::TARGET,
    pci::TARGET,
    bond::TARGET,
    stack::TARGET,
    vmbus_packet::TARGET,
    vmbus_ring::TARGET,
    vmbus_messages::TARGET,
    vpci::TARGET,
    netvsc::TARGET,
    mana::TARGET,
    coalesce::TARGET,
];
