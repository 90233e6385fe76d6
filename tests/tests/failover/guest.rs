//! The echo app booted with both NICs on a two-tap bridge, and the waits the failover tests
//! build on: which path the bond uses, and proof that the stream's traffic moved onto it.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use tandem_tests::topology::{BRIDGE, BridgedTap, GUEST_ADDRESS, HOST_ADDRESS, PREFIX_LENGTH, TAP};
use tandem_tests::{BOOT_TIMEOUT, image};
use xtask::bench_failover::{
    ActivePath, ECHO_PORT, EchoStream, LabStats, PF_DEVICE_ID, SERVING_LINE, StreamConfig, Trigger,
    VIRTIO_DEVICE_ID, lab_stats, prime_lab_channel, wait_for_stats,
};
use xtask::machine::{igb_pf_device, tap_netdev, virtio_net_device};
use xtask::vf::pf_device_add_arguments;
use xtask::{Accel, Error, Qemu, QemuBuilder};

/// The namespace's second tap, for the igb PF ([`TAP`] is virtio-net's).
pub const PF_TAP: &str = "tap1";
/// The `-netdev` the igb PF is attached to (what `device_add` names again).
pub const PF_NETDEV: &str = "net-pf";
/// Time one state change (switch, hot-plug, stream progress) may take under TCG on a busy
/// 2-core machine.
pub const STATE_TIMEOUT: Duration = Duration::from_secs(90);
/// Frames that must go each way on a path before its traffic counts as moved there.
const MIN_FRAMES_ON_PATH: u64 = 8;
/// Echoed bytes that must arrive while a path is active before it counts as carrying the
/// stream.
const MIN_BYTES_ON_PATH: u64 = 32 * 1024;
/// Serial text that means the guest crashed (kernel panic, CPU exception report).
const CRASH_MARKERS: [&str; 2] = ["panic:", "EXCEPTION"];
/// Serial lines shown when a test fails.
const EXCERPT_LINES: usize = 60;

/// The echo image, built before entering a namespace (cargo may need the network).
pub fn echo_image() -> PathBuf {
    image("echo")
}

/// The test's namespace: [`BridgedTap`] (bridge with [`TAP`] for virtio-net) plus [`PF_TAP`]
/// on the same bridge for the igb PF.
pub fn two_tap_topology() -> BridgedTap {
    let topology = BridgedTap::create().unwrap_or_else(|error| panic!("{error}"));
    let steps: [&[&str]; 3] = [
        &["tuntap", "add", PF_TAP, "mode", "tap"],
        &["link", "set", PF_TAP, "master", BRIDGE],
        &["link", "set", PF_TAP, "up"],
    ];
    for step in steps {
        topology
            .ip(step)
            .unwrap_or_else(|error| panic!("adding {PF_TAP}: {error}"));
    }
    topology
}

/// Whether the igb PF (and so the VF) is there when the guest boots.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VfAtBoot {
    /// `-device igb` on the command line.
    Present,
    /// Only its netdev; a later `device_add` brings the PF.
    Absent,
}

/// A private directory for the lab channel's socket, removed on drop.
struct LabDir(PathBuf);

impl Drop for LabDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The echo app with virtio-net on [`TAP`], the igb PF on [`PF_TAP`], and the lab channel.
pub struct Guest {
    // Declared first so QEMU is gone before its socket directory.
    pub qemu: Qemu,
    lab_dir: LabDir,
}

impl Guest {
    /// Boots the echo app (call inside the topology's `run`) and waits until it serves.
    pub fn boot(label: &str, elf: PathBuf, vf: VfAtBoot) -> Guest {
        static INSTANCE: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let instance = INSTANCE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("tandem-failover-{}-{instance}", std::process::id()));
        std::fs::create_dir_all(&dir)
            .unwrap_or_else(|error| panic!("creating {}: {error}", dir.display()));
        let lab_dir = LabDir(dir);
        let mut builder = QemuBuilder::new(label, Accel::Tcg)
            .cmdline(format!(
                "log=info ip={GUEST_ADDRESS}/{PREFIX_LENGTH} gw={HOST_ADDRESS} igb.lab_pf=1"
            ))
            .netdev(tap_netdev("net0", TAP))
            .netdev(tap_netdev(PF_NETDEV, PF_TAP))
            .device(virtio_net_device("net0"))
            .arg("-chardev")
            .arg(format!(
                "socket,id=lab,path={},server=on,wait=off",
                lab_dir.0.join("lab.sock").display()
            ))
            .arg("-device")
            .arg("isa-serial,chardev=lab");
        if vf == VfAtBoot::Present {
            builder = builder.device(igb_pf_device(PF_NETDEV));
        }
        let mut qemu = builder
            .kernel(elf)
            .spawn()
            .unwrap_or_else(|error| panic!("{error}"));
        qemu.wait_for_line(SERVING_LINE, BOOT_TIMEOUT)
            .unwrap_or_else(|error| panic!("{error}"));
        let guest = Guest { qemu, lab_dir };
        guest.ok("priming the lab channel", prime_lab_channel(&guest.lab()));
        guest
    }

    /// The lab channel's socket.
    pub fn lab(&self) -> PathBuf {
        self.lab_dir.0.join("lab.sock")
    }

    /// The last serial lines, leaving out the `stats` answers the tests poll for, and QEMU's
    /// command line.
    pub fn excerpt(&self) -> String {
        let lines: Vec<String> = self
            .qemu
            .serial_lines()
            .into_iter()
            .filter(|line| !line.contains("lab control: stats"))
            .collect();
        let start = lines.len().saturating_sub(EXCERPT_LINES);
        format!(
            "--- {}: last {} serial lines (stats answers left out) ---\n{}\n--- command ---\n{}",
            self.qemu.label(),
            lines.len() - start,
            lines[start..].join("\n"),
            self.qemu.command_line()
        )
    }

    /// Panics with `what` and the serial excerpt.
    pub fn fail(&self, what: impl std::fmt::Display) -> ! {
        panic!("{what}\n{}", self.excerpt())
    }

    /// Unwraps `result` or fails with `when` and the excerpt.
    pub fn ok<T>(&self, when: &str, result: Result<T, Error>) -> T {
        result.unwrap_or_else(|error| self.fail(format!("{when}: {error}")))
    }

    /// The guest's counters now.
    pub fn stats(&self, when: &str) -> LabStats {
        self.ok(when, lab_stats(&self.lab()))
    }

    /// Polls `stats` until the bond transmits on `path`.
    pub fn wait_active(&self, path: ActivePath, when: &str) -> LabStats {
        self.ok(
            &format!("{when}: waiting for active={}", path.name()),
            wait_for_stats(&self.lab(), "the new path", STATE_TIMEOUT, |stats| {
                stats.is_active(path)
            }),
        )
    }

    /// Waits until the stream's traffic demonstrably runs on `path`: the path's transmit and
    /// receive counters grew by [`MIN_FRAMES_ON_PATH`] since `since`, and [`MIN_BYTES_ON_PATH`]
    /// more bytes came back meanwhile, with `path` active all along.
    pub fn wait_traffic_on(
        &self,
        path: ActivePath,
        stream: &EchoStream,
        since: &LabStats,
        when: &str,
    ) -> LabStats {
        let prefix = path.counter_prefix();
        let (tx, rx) = (format!("{prefix}_tx"), format!("{prefix}_rx"));
        let counter = |stats: &LabStats, name: &str| {
            stats
                .counter(name)
                .unwrap_or_else(|error| self.fail(format!("{when}: {error}")))
        };
        let (tx_before, rx_before) = (counter(since, &tx), counter(since, &rx));
        let received_before = stream.received();
        let when = format!("{when}: traffic on the {} path", path.name());
        self.ok(
            &when,
            stream.wait_for_received(received_before + MIN_BYTES_ON_PATH, STATE_TIMEOUT),
        );
        let stats = self.ok(
            &when,
            wait_for_stats(
                &self.lab(),
                &format!("{tx} and {rx} to grow by {MIN_FRAMES_ON_PATH}"),
                STATE_TIMEOUT,
                |stats| {
                    !stats.is_active(path)
                        || (counter(stats, &tx) >= tx_before + MIN_FRAMES_ON_PATH
                            && counter(stats, &rx) >= rx_before + MIN_FRAMES_ON_PATH)
                },
            ),
        );
        if !stats.is_active(path) {
            self.fail(format!(
                "{when}: the bond left the {} path on its own: {}",
                path.name(),
                stats.summary()
            ));
        }
        stats
    }

    /// Takes the VF away with `trigger`.
    pub fn remove(&mut self, trigger: Trigger, when: &str) {
        let lab = self.lab();
        let result = trigger.remove(&mut self.qemu, &lab);
        self.ok(
            &format!("{when}: removing the VF ({})", trigger.name()),
            result,
        );
    }

    /// Gives the VF back with `trigger`.
    pub fn restore(&mut self, trigger: Trigger, when: &str) {
        let lab = self.lab();
        let result = trigger.restore(&mut self.qemu, &lab, PF_NETDEV);
        self.ok(
            &format!("{when}: restoring the VF ({})", trigger.name()),
            result,
        );
    }

    /// QMP `device_add` of the igb PF on its root port.
    pub fn hot_add_pf(&mut self, when: &str) {
        let result = self
            .qemu
            .qmp()
            .and_then(|qmp| qmp.execute("device_add", Some(pf_device_add_arguments(PF_NETDEV))));
        self.ok(&format!("{when}: device_add {PF_DEVICE_ID}"), result);
    }

    /// QMP `set_link` of the virtio-net device.
    pub fn set_synthetic_link(&mut self, up: bool, when: &str) {
        let result = self.qemu.qmp().and_then(|qmp| {
            qmp.execute(
                "set_link",
                Some(serde_json::json!({ "name": VIRTIO_DEVICE_ID, "up": up })),
            )
        });
        self.ok(
            &format!("{when}: set_link {VIRTIO_DEVICE_ID} up={up}"),
            result,
        );
    }

    /// Starts a paced pattern stream to the echo app and waits until it flows.
    pub fn stream(&self, seed: u64, when: &str) -> EchoStream {
        let peer = std::net::SocketAddr::from((GUEST_ADDRESS, ECHO_PORT));
        let stream = self.ok(
            when,
            EchoStream::connect(peer, StreamConfig::new(seed), Duration::from_secs(30)),
        );
        self.ok(
            &format!("{when}: first echoed bytes"),
            stream.wait_for_received(MIN_BYTES_ON_PATH, STATE_TIMEOUT),
        );
        stream
    }

    /// Ends `stream` and fails unless every byte sent came back exactly.
    pub fn finish(&self, stream: EchoStream, when: &str) -> xtask::bench_failover::StreamTotals {
        let totals = self.ok(when, stream.finish(STATE_TIMEOUT));
        assert_eq!(totals.lost, 0, "{when}: bytes lost");
        totals
    }

    /// Fails if QEMU has ended or the guest printed a crash report.
    pub fn assert_alive(&mut self, when: &str) {
        match self.qemu.wait_for_exit(Duration::ZERO) {
            Err(Error::Timeout { .. }) => {}
            Ok(exit) => self.fail(format!("{when}: QEMU ended ({exit:?})")),
            Err(error) => self.fail(format!("{when}: {error}")),
        }
        let crashes: Vec<String> = self
            .qemu
            .serial_lines()
            .into_iter()
            .filter(|line| CRASH_MARKERS.iter().any(|marker| line.contains(marker)))
            .collect();
        if !crashes.is_empty() {
            self.fail(format!(
                "{when}: the guest reported a crash:\n{}",
                crashes.join("\n")
            ));
        }
    }
}

/// Counter `name` of `stats` (a missing counter fails the test).
pub fn counter(stats: &LabStats, name: &str) -> u64 {
    stats
        .counter(name)
        .unwrap_or_else(|error| panic!("{error}: {}", stats.summary()))
}

/// Sleeps until `when` (no-op if it has passed).
pub fn sleep_until(when: Instant) {
    let now = Instant::now();
    if when > now {
        std::thread::sleep(when - now);
    }
}
