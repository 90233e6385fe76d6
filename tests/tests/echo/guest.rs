//! Booting the `echo` image on user-mode networking or on the namespace's tap, and checking
//! that it is still alive and never crashed.

use std::path::PathBuf;
use std::time::Duration;

use tandem_tests::topology::{GUEST_ADDRESS, HOST_ADDRESS, PREFIX_LENGTH, TAP};
use tandem_tests::{BOOT_TIMEOUT, image};
use xtask::machine::{HostForward, Protocol, tap_netdev, user_netdev, virtio_net_device};
use xtask::{Accel, Error, Qemu, QemuBuilder};

use crate::frames::{Mac, parse_mac};

/// The port the echo app serves in the guest.
pub const ECHO_PORT: u16 = 7;
/// What the app prints once it serves.
const SERVING: &str = "echo: serving TCP and UDP on port 7";
/// Serial text that means the guest crashed (kernel panic, CPU exception report).
const CRASH_MARKERS: [&str; 2] = ["panic:", "EXCEPTION"];

/// The echo image, built on first use. Build it before entering a network namespace: cargo
/// may have to download crates, and the namespace has no way out.
pub fn echo_image() -> PathBuf {
    image("echo")
}

fn boot(builder: QemuBuilder, elf: PathBuf) -> Qemu {
    let mut qemu = builder
        .kernel(elf)
        .spawn()
        .unwrap_or_else(|error| panic!("{error}"));
    qemu.wait_for_line(SERVING, BOOT_TIMEOUT)
        .unwrap_or_else(|error| panic!("{error}"));
    qemu
}

/// The echo app on user-mode networking; 127.0.0.1:`host_port` (TCP and UDP) reaches port 7.
pub fn on_user_network(label: &str, host_port: u16) -> Qemu {
    let forwards = [Protocol::Tcp, Protocol::Udp].map(|protocol| HostForward {
        protocol,
        host_port,
        guest_port: ECHO_PORT,
    });
    boot(
        QemuBuilder::new(label, Accel::Tcg)
            .cmdline("log=debug ip=10.0.2.15/24 gw=10.0.2.2")
            .netdev(user_netdev("n0", &forwards))
            .device(virtio_net_device("n0")),
        echo_image(),
    )
}

/// The echo app (`elf`, from [`echo_image`]) on the namespace's tap as 10.77.0.2/24. Call
/// inside [`tandem_tests::topology::BridgedTap::run`] so QEMU opens the namespace's tap.
pub fn on_tap(label: &str, elf: PathBuf) -> Qemu {
    boot(
        QemuBuilder::new(label, Accel::Tcg)
            .cmdline(format!(
                "log=debug ip={GUEST_ADDRESS}/{PREFIX_LENGTH} gw={HOST_ADDRESS}"
            ))
            .netdev(tap_netdev("n0", TAP))
            .device(virtio_net_device("n0")),
        elf,
    )
}

/// Like [`on_tap`], with the guest's lab control channel (COM2) on the unix socket `lab`, for
/// reading its counters (`stats`).
pub fn on_tap_with_lab(label: &str, elf: PathBuf, lab: &std::path::Path) -> Qemu {
    let _ = std::fs::remove_file(lab);
    boot(
        QemuBuilder::new(label, Accel::Tcg)
            .cmdline(format!(
                "log=debug ip={GUEST_ADDRESS}/{PREFIX_LENGTH} gw={HOST_ADDRESS}"
            ))
            .netdev(tap_netdev("n0", TAP))
            .device(virtio_net_device("n0"))
            .arg("-chardev")
            .arg(format!(
                "socket,id=lab,path={},server=on,wait=off",
                lab.display()
            ))
            .arg("-device")
            .arg("isa-serial,chardev=lab"),
        elf,
    )
}

/// The guest's `bad_frames_dropped` counter, read over the lab channel `lab`.
pub fn bad_frames_dropped(lab: &std::path::Path) -> u64 {
    let answer = xtask::vf::lab_command(lab, "stats", std::time::Duration::from_secs(30))
        .unwrap_or_else(|error| panic!("reading the guest's counters: {error}"));
    answer
        .split_whitespace()
        .find_map(|field| field.strip_prefix("bad_frames_dropped="))
        .and_then(|value| value.parse().ok())
        .unwrap_or_else(|| panic!("no bad_frames_dropped in {answer:?}"))
}

/// The guest NIC's MAC, from the driver's `up, MAC xx:...` line.
pub fn guest_mac(qemu: &Qemu) -> Mac {
    qemu.serial_lines()
        .iter()
        .filter_map(|line| line.split_once(", MAC ").map(|(_, rest)| rest))
        .find_map(|rest| parse_mac(rest.split([',', ' ']).next().unwrap_or("")))
        .unwrap_or_else(|| panic!("no `MAC` line on serial\n{}", qemu.diagnostics()))
}

/// Panics (with the serial tail) if QEMU has ended or the guest printed a crash report.
pub fn assert_alive(qemu: &mut Qemu, when: &str) {
    match qemu.wait_for_exit(Duration::ZERO) {
        Err(Error::Timeout { .. }) => {}
        Ok(exit) => panic!("{when}: QEMU ended ({exit:?})\n{}", qemu.diagnostics()),
        Err(error) => panic!("{when}: {error}"),
    }
    let crashes: Vec<String> = qemu
        .serial_lines()
        .into_iter()
        .filter(|line| CRASH_MARKERS.iter().any(|marker| line.contains(marker)))
        .collect();
    assert!(
        crashes.is_empty(),
        "{when}: the guest reported a crash:\n{}\n{}",
        crashes.join("\n"),
        qemu.diagnostics()
    );
}

/// Panics with the failures and the serial tail if `failures` is not empty.
pub fn assert_no_failures(qemu: &Qemu, what: &str, failures: &[String]) {
    const SHOWN: usize = 10;
    if failures.is_empty() {
        return;
    }
    let mut shown: Vec<&str> = failures.iter().take(SHOWN).map(String::as_str).collect();
    let more = format!("... and {} more", failures.len().saturating_sub(SHOWN));
    if failures.len() > SHOWN {
        shown.push(&more);
    }
    panic!(
        "{what}: {} failure(s):\n{}\n{}",
        failures.len(),
        shown.join("\n"),
        qemu.diagnostics()
    );
}
