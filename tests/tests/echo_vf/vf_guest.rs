//! Booting the `echo` image with the igbvf VF as its only NIC (the guest plays the igb PF's
//! driver to create it; no virtio-net device), and reading its counters over the lab channel.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use tandem_tests::BOOT_TIMEOUT;
use tandem_tests::topology::{GUEST_ADDRESS, HOST_ADDRESS, PREFIX_LENGTH, TAP};
use xtask::machine::{GUEST_MAC, LAB_PF_CMDLINE, igb_pf_device, tap_netdev};
use xtask::{Accel, Qemu, QemuBuilder};

/// What the app prints once it serves.
const SERVING: &str = "echo: serving TCP and UDP on port 7";
/// What the kernel prints once the interface's link is up and its addresses were announced
/// (the app may serve before the lab PF has brought the VF's link up).
const ANNOUNCED: &str = "net: announced";
/// What the kernel prints when no virtio-net device is there and the VF alone carries the
/// interface.
pub const VF_ALONE: &str = "net: no virtio-net device: the VF alone carries the interface";
/// How long the guest gets to answer one lab command.
const LAB_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the VF driver folds the hardware counters (VFGPRC/VFGPTC) into its statistics.
const COUNTER_FOLD_PERIOD: Duration = Duration::from_millis(100);

/// A VF-only echo guest and its lab control socket (removed on drop).
pub struct VfGuest {
    /// The running QEMU.
    pub qemu: Qemu,
    lab_socket: PathBuf,
}

impl Drop for VfGuest {
    fn drop(&mut self) {
        self.qemu.kill();
        let _ = std::fs::remove_file(&self.lab_socket);
    }
}

/// A fresh path for a lab socket (unix socket paths are limited to 108 bytes: stay in /tmp).
fn lab_socket_path() -> PathBuf {
    static INSTANCE: AtomicU32 = AtomicU32::new(0);
    std::env::temp_dir().join(format!(
        "tandem-vf-echo-{}-{}.lab",
        std::process::id(),
        INSTANCE.fetch_add(1, Ordering::Relaxed)
    ))
}

/// The echo app (`elf`) on the namespace's tap as 10.77.0.2/24, reached only through the VF
/// of the igb PF on root port rp1. Call inside [`tandem_tests::topology::BridgedTap::run`].
/// Panics unless the guest serves, announces its addresses and says the VF alone carries
/// its interface.
pub fn on_tap_vf_only(label: &str, elf: PathBuf) -> VfGuest {
    let lab_socket = lab_socket_path();
    let _ = std::fs::remove_file(&lab_socket);
    let qemu = QemuBuilder::new(label, Accel::Tcg)
        .cmdline(format!(
            "log=debug ip={GUEST_ADDRESS}/{PREFIX_LENGTH} gw={HOST_ADDRESS} {LAB_PF_CMDLINE}"
        ))
        .netdev(tap_netdev("n0", TAP))
        .device(igb_pf_device("n0"))
        .arg("-chardev")
        .arg(format!(
            "socket,id=lab,path={},server=on,wait=off",
            lab_socket.display()
        ))
        .arg("-device")
        .arg("isa-serial,chardev=lab")
        .kernel(elf)
        .spawn()
        .unwrap_or_else(|error| panic!("{error}"));
    let mut guest = VfGuest { qemu, lab_socket };
    guest
        .qemu
        .wait_for_line(SERVING, BOOT_TIMEOUT)
        .unwrap_or_else(|error| panic!("{error}"));
    let announced = |qemu: &Qemu| {
        qemu.serial_lines()
            .iter()
            .any(|line| line.contains(ANNOUNCED))
    };
    if !announced(&guest.qemu) {
        guest
            .qemu
            .wait_for_line(ANNOUNCED, BOOT_TIMEOUT)
            .unwrap_or_else(|error| panic!("{error}"));
    }
    guest.assert_vf_alone();
    guest
}

impl VfGuest {
    /// Panics unless the serial output shows no virtio-net device and the interface on the
    /// igbvf VF with the shared guest MAC.
    fn assert_vf_alone(&self) {
        let lines = self.qemu.serial_lines();
        assert!(
            lines.iter().any(|line| line.contains(VF_ALONE)),
            "the guest did not report running on the VF alone (`{VF_ALONE}`)\n{}",
            self.qemu.diagnostics()
        );
        let virtio_lines: Vec<&String> = lines
            .iter()
            .filter(|line| line.contains("virtio-net") && !line.contains(VF_ALONE))
            .collect();
        assert!(
            virtio_lines.is_empty(),
            "the guest mentions a virtio-net device: {virtio_lines:?}\n{}",
            self.qemu.diagnostics()
        );
        let interface = lines
            .iter()
            .find(|line| line.contains("net: interface "))
            .unwrap_or_else(|| {
                panic!(
                    "no `net: interface` line on serial\n{}",
                    self.qemu.diagnostics()
                )
            });
        assert!(
            interface.contains(" on igbvf ") && interface.contains(GUEST_MAC),
            "the interface is not on the igbvf VF with MAC {GUEST_MAC}: {interface}"
        );
    }

    /// The guest's `stats` answer, parsed.
    pub fn stats(&self) -> Stats {
        let answer = xtask::vf::lab_command(&self.lab_socket, "stats", LAB_TIMEOUT)
            .unwrap_or_else(|error| panic!("lab `stats`: {error}\n{}", self.qemu.diagnostics()));
        Stats::parse(&answer).unwrap_or_else(|| {
            panic!(
                "unexpected `stats` answer {answer:?}\n{}",
                self.qemu.diagnostics()
            )
        })
    }

    /// The counters once the traffic has stopped and the driver has folded the hardware
    /// counters in: two readings at least two fold periods apart that agree.
    pub fn settled_stats(&self) -> Stats {
        const TRIES: usize = 20;
        let mut previous = self.stats();
        for _ in 0..TRIES {
            std::thread::sleep(COUNTER_FOLD_PERIOD * 3);
            let current = self.stats();
            if current.counters == previous.counters {
                return current;
            }
            previous = current;
        }
        panic!(
            "the counters kept changing over {TRIES} readings with no traffic: last {:?}\n{}",
            previous.counters,
            self.qemu.diagnostics()
        );
    }
}

/// One `stats` answer: `ok active=<Path> name=value ...`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stats {
    /// The active path's name (`Synthetic` or `Vf`).
    pub active: String,
    /// Every numeric counter by name.
    pub counters: HashMap<String, u64>,
}

impl Stats {
    /// Parses an answer; `None` unless it starts with `ok` and every field is `name=value`.
    pub fn parse(answer: &str) -> Option<Stats> {
        let mut words = answer.split_whitespace();
        if words.next()? != "ok" {
            return None;
        }
        let mut active = None;
        let mut counters = HashMap::new();
        for word in words {
            let (name, value) = word.split_once('=')?;
            if name == "active" {
                active = Some(value.to_string());
            } else {
                counters.insert(name.to_string(), value.parse().ok()?);
            }
        }
        Some(Stats {
            active: active?,
            counters,
        })
    }

    /// Counter `name`; panics if the guest did not report it.
    pub fn get(&self, name: &str) -> u64 {
        *self
            .counters
            .get(name)
            .unwrap_or_else(|| panic!("`stats` has no `{name}`: {self:?}"))
    }

    /// How much counter `name` grew from `earlier` to `self`.
    pub fn delta(&self, earlier: &Stats, name: &str) -> u64 {
        let (before, after) = (earlier.get(name), self.get(name));
        after
            .checked_sub(before)
            .unwrap_or_else(|| panic!("counter `{name}` went backwards: {before} -> {after}"))
    }
}
