//! `cargo xtask bench iperf`: the host's stock iperf3 client against the `iperf` app under TCG
//! over the VF alone, virtio-net alone and the bond (VF active), each way, with one and four
//! streams; also the guest set-up and iperf3 client runner the iperf integration tests use.
//!
//! The bench needs root: it creates a network namespace (`tandem-bench-iperf-<pid>`) holding
//! bridge `br0` (10.77.3.1/24) with two taps, one for virtio-net and one for the igb PF (whose
//! VF the guest creates), then re-runs itself inside the namespace with `ip netns exec` so that
//! QEMU and the iperf3 client live there. Nothing outside the namespace is touched, and the
//! namespace is deleted afterwards.

use std::fmt;
use std::io::{ErrorKind, Read};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::accel::Accel;
use crate::bench::{cpu_ticks_from_stat, median};
use crate::bench_failover::{ActivePath, lab_stats, prime_lab_channel, wait_for_active};
use crate::bench_namespace::{BenchNamespace, require_root};
use crate::error::{Error, Result};
use crate::image::{Profile, build_app};
use crate::machine::{LAB_PF_CMDLINE, Machine, NetBackend, NetPaths};
use crate::qemu::{Qemu, QemuBuilder};

/// The iperf3 port the app serves on by default.
pub const IPERF_PORT: u16 = 5201;
/// What the app prints once it serves.
pub const SERVING_LINE: &str = "iperf: server listening on TCP and UDP port";
/// What the kernel prints once the link is up and the guest's addresses were announced (with
/// the VF the app may serve before the lab PF has brought the link up).
pub const ANNOUNCED_LINE: &str = "net: announced";
/// A fragment only the app's per-test parameter line has (`iperf: session 3: tcp streams=1
/// reverse=no bidir=no len=131072 ...`), printed when a test is set up.
pub const PARAMETERS_MARK: &str = " len=";
/// The start of the app's summary line for a completed test.
pub const TEST_DONE_LINE: &str = "iperf: test done: ";
/// The start of the app's line for a test cut short.
pub const TEST_ABORTED_LINE: &str = "iperf: test aborted: ";
/// Guest memory: the README claims iperf runs in a 32 MiB VM.
pub const GUEST_MEMORY: &str = "32M";
/// Guest memory the bench falls back to (and says so) if the guest does not serve in 32 MiB.
pub const FALLBACK_MEMORY: &str = "64M";
/// Runs per measurement when `--runs` is not given.
pub const DEFAULT_RUNS: usize = 3;
/// Seconds each bench client run measures (`-t`), after [`OMIT_SECONDS`] left out (`-O`).
pub const RUN_SECONDS: u32 = 5;
/// Seconds at the start of each bench run that iperf3 leaves out of its figures (slow start).
pub const OMIT_SECONDS: u32 = 1;
/// Parallel streams of the multi-stream bench rows.
pub const PARALLEL_STREAMS: u32 = 4;
/// Host→guest Gbit/s of a Linux 6.1 guest on the same QEMU (TCG, tap) over virtio-net.
pub const LINUX_VIRTIO_IN_GBITS: f64 = 1.44;
/// Guest→host Gbit/s of the Linux guest over virtio-net.
pub const LINUX_VIRTIO_OUT_GBITS: f64 = 1.22;
/// Host→guest Gbit/s of the Linux guest over igbvf.
pub const LINUX_IGBVF_IN_GBITS: f64 = 0.65;
/// Guest→host Gbit/s of the Linux guest over igbvf.
pub const LINUX_IGBVF_OUT_GBITS: f64 = 0.63;
/// The README's throughput target, as a multiple of the Linux guest's.
pub const TARGET_RATIO: f64 = 1.5;

/// Environment variable that carries the iperf image to the copy of the bench running inside
/// the namespace (its presence means "you are inside").
const INSIDE_ENV: &str = "TANDEM_BENCH_IPERF_IMAGE";
/// Prefix of the bench's namespace names; the rest is the creating process's id.
const NAMESPACE_PREFIX: &str = "tandem-bench-iperf-";
/// The bench namespace's bridge address (the host side, where the client runs).
const BENCH_HOST: Ipv4Addr = Ipv4Addr::new(10, 77, 3, 1);
/// The guest's address in the bench namespace.
const BENCH_GUEST: Ipv4Addr = Ipv4Addr::new(10, 77, 3, 2);
/// Prefix length of the bench subnet.
const BENCH_PREFIX_LENGTH: u8 = 24;
/// The bench namespace's tap for virtio-net.
const TAP_SYNTHETIC: &str = "tap-virtio";
/// The bench namespace's tap for the igb PF.
const TAP_VF: &str = "tap-vf";
/// Time the guest gets to boot (and bring its link up) under TCG.
const BOOT_TIMEOUT: Duration = Duration::from_secs(240);
/// Time the bond gets to make the VF active.
const VF_ACTIVE_TIMEOUT: Duration = Duration::from_secs(90);
/// Time one client run may take beyond its `-t` and `-O` before it is killed.
const CLIENT_GRACE: Duration = Duration::from_secs(60);

/// Where an iperf guest sits on the host's network.
#[derive(Clone, Copy, Debug)]
pub struct GuestNetwork<'a> {
    /// Which NICs the guest gets.
    pub paths: NetPaths,
    /// The taps: the first for virtio-net (or the only NIC), the second for the igb PF when
    /// both paths are there.
    pub taps: &'a [&'a str],
    /// The guest's address (`ip=`).
    pub address: Ipv4Addr,
    /// Its prefix length.
    pub prefix_length: u8,
    /// Its gateway (`gw=`), the host side of the bridge.
    pub gateway: Ipv4Addr,
}

/// A QEMU command for the iperf app, not started yet.
#[derive(Clone, Debug)]
pub struct GuestLaunch {
    /// The builder (spawn it inside the namespace that holds the taps).
    pub builder: QemuBuilder,
    /// The `-netdev` the igb PF is attached to (what a re-plugging `device_add` names again),
    /// if the guest has the VF path.
    pub pf_netdev: Option<String>,
    /// The lab channel's socket, if the guest plays the lab PF (it answers on its COM2).
    pub lab_socket: Option<PathBuf>,
}

/// The iperf app (`elf`) on `network` with `memory` of RAM and `cmdline_extra` appended to its
/// command line (e.g. `iperf.port=N`). With the VF path the guest plays the igb PF's driver
/// and its lab channel listens on `lab_socket`.
pub fn guest_launch(
    label: &str,
    accel: Accel,
    elf: &Path,
    network: &GuestNetwork,
    memory: &str,
    cmdline_extra: &str,
    lab_socket: &Path,
) -> Result<GuestLaunch> {
    guest_launch_with(
        label,
        accel,
        elf,
        network,
        memory,
        cmdline_extra,
        lab_socket,
        "",
    )
}

/// [`guest_launch`] with `virtio_properties` (e.g. `,guest_tso4=off`) appended to the
/// virtio-net device.
#[allow(clippy::too_many_arguments)]
fn guest_launch_with(
    label: &str,
    accel: Accel,
    elf: &Path,
    network: &GuestNetwork,
    memory: &str,
    cmdline_extra: &str,
    lab_socket: &Path,
    virtio_properties: &str,
) -> Result<GuestLaunch> {
    let mut machine = Machine::new(accel);
    machine.add_network(network.paths, &NetBackend::Tap(network.taps.join(",")), &[])?;
    let mut cmdline = format!(
        "log=info ip={}/{} gw={}",
        network.address, network.prefix_length, network.gateway
    );
    if machine.lab_pf {
        cmdline = format!("{cmdline} {LAB_PF_CMDLINE}");
    }
    if !cmdline_extra.is_empty() {
        cmdline = format!("{cmdline} {cmdline_extra}");
    }
    // Named threads ("CPU 0/TCG"): the bench tells the vCPU's CPU time from the I/O thread's.
    let mut builder = QemuBuilder::new(label, accel)
        .kernel(elf)
        .memory(memory)
        .cmdline(cmdline)
        .arg("-name")
        .arg("tandem-iperf,debug-threads=on");
    for netdev in machine.netdevs {
        builder = builder.netdev(netdev);
    }
    for device in machine.devices {
        builder = if device.starts_with("virtio-net-pci") {
            builder.device(format!("{device}{virtio_properties}"))
        } else {
            builder.device(device)
        };
    }
    if machine.lab_pf {
        builder = builder
            .arg("-chardev")
            .arg(format!(
                "socket,id=lab,path={},server=on,wait=off",
                lab_socket.display()
            ))
            .arg("-device")
            .arg("isa-serial,chardev=lab");
    }
    Ok(GuestLaunch {
        builder,
        pf_netdev: machine.pf_netdev,
        lab_socket: machine.lab_pf.then(|| lab_socket.to_path_buf()),
    })
}

impl GuestLaunch {
    /// Starts QEMU (in the calling thread's network namespace) and waits until the app serves
    /// with its link up and its addresses announced; with a lab channel, also opens that
    /// channel (see [`prime_lab_channel`]).
    pub fn boot(self, timeout: Duration) -> Result<IperfVm> {
        if let Some(socket) = &self.lab_socket {
            // A socket left by a killed run would make QEMU fail to bind.
            let _ = std::fs::remove_file(socket);
        }
        let mut vm = IperfVm {
            qemu: self.builder.spawn()?,
            lab_socket: self.lab_socket,
            pf_netdev: self.pf_netdev,
        };
        vm.qemu.wait_for_line(SERVING_LINE, timeout)?;
        let announced = vm
            .qemu
            .serial_lines()
            .iter()
            .any(|line| line.contains(ANNOUNCED_LINE));
        if !announced {
            vm.qemu.wait_for_line(ANNOUNCED_LINE, timeout)?;
        }
        if let Some(socket) = &vm.lab_socket {
            prime_lab_channel(socket)?;
        }
        Ok(vm)
    }
}

/// The iperf app running in QEMU; QEMU is killed and the lab socket removed on drop.
pub struct IperfVm {
    /// The running QEMU.
    pub qemu: Qemu,
    /// The lab channel's socket, if the guest plays the lab PF.
    pub lab_socket: Option<PathBuf>,
    /// The igb PF's `-netdev`, if the guest has the VF path.
    pub pf_netdev: Option<String>,
}

impl Drop for IperfVm {
    fn drop(&mut self) {
        // QEMU goes first: it holds the socket open.
        self.qemu.kill();
        if let Some(socket) = self.lab_socket.take() {
            let _ = std::fs::remove_file(socket);
        }
    }
}

/// The stock client's command: `iperf3 -c <server> -p <port> <args>`.
pub fn client_command(server: Ipv4Addr, port: u16, args: &[&str]) -> Command {
    let mut command = Command::new("iperf3");
    command
        .arg("-c")
        .arg(server.to_string())
        .arg("-p")
        .arg(port.to_string())
        .args(args);
    command
}

/// How one client run ended, with everything it printed.
#[derive(Clone, Debug)]
pub struct ClientOutcome {
    /// The command line.
    pub command: String,
    /// Its exit code; `None` if a signal ended it.
    pub exit_code: Option<i32>,
    /// What it printed on stdout.
    pub stdout: String,
    /// What it printed on stderr.
    pub stderr: String,
    /// From start to exit.
    pub elapsed: Duration,
}

impl ClientOutcome {
    /// Whether it exited with 0.
    pub fn succeeded(&self) -> bool {
        self.exit_code == Some(0)
    }

    /// stdout followed by stderr (iperf3 prints some errors on either).
    pub fn text(&self) -> String {
        format!("{}\n{}", self.stdout, self.stderr)
    }
}

impl fmt::Display for ClientOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ending = match self.exit_code {
            Some(code) => format!("exited with {code}"),
            None => "was ended by a signal".to_string(),
        };
        write!(
            f,
            "`{}` {ending} after {:.2} s\n--- its stdout ---\n{}\n--- its stderr ---\n{}",
            self.command,
            self.elapsed.as_secs_f64(),
            self.stdout.trim_end(),
            self.stderr.trim_end()
        )
    }
}

/// Reads `pipe` to its end on a thread.
fn collect(pipe: Option<impl Read + Send + 'static>) -> Option<JoinHandle<String>> {
    let mut pipe = pipe?;
    Some(std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = pipe.read_to_end(&mut bytes);
        String::from_utf8_lossy(&bytes).into_owned()
    }))
}

/// A client started in the background (killed on drop).
pub struct RunningClient {
    child: Child,
    command: String,
    started: Instant,
    stdout: Option<JoinHandle<String>>,
    stderr: Option<JoinHandle<String>>,
}

impl RunningClient {
    /// Starts `iperf3 -c <server> -p <port> <args>` (in the calling thread's network
    /// namespace).
    pub fn spawn(server: Ipv4Addr, port: u16, args: &[&str]) -> Result<RunningClient> {
        let command = format!("iperf3 -c {server} -p {port} {}", args.join(" "));
        let mut child = client_command(server, port, args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|error| Error::io(format!("starting {command}"), error))?;
        let stdout = collect(child.stdout.take());
        let stderr = collect(child.stderr.take());
        Ok(RunningClient {
            child,
            command,
            started: Instant::now(),
            stdout,
            stderr,
        })
    }

    /// Whether it has ended.
    pub fn has_exited(&mut self) -> bool {
        !matches!(self.child.try_wait(), Ok(None))
    }

    /// How long ago it started.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Waits (up to `timeout`) for it to end and collects its output; if it does not end in
    /// time it is killed and the error shows what it printed.
    pub fn finish(mut self, timeout: Duration) -> Result<ClientOutcome> {
        let deadline = Instant::now() + timeout;
        loop {
            let status = self
                .child
                .try_wait()
                .map_err(|error| Error::io(format!("waiting for {}", self.command), error))?;
            if let Some(status) = status {
                return Ok(self.outcome(status.code()));
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                let outcome = self.outcome(None);
                return Err(Error::Timeout {
                    waiting_for: format!("`{}` to end", outcome.command),
                    after: timeout,
                    context: outcome.to_string(),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills it with SIGKILL (as `kill -9` would) and collects what it printed.
    pub fn kill(mut self) -> Result<ClientOutcome> {
        self.child
            .kill()
            .map_err(|error| Error::io(format!("killing {}", self.command), error))?;
        let status = self
            .child
            .wait()
            .map_err(|error| Error::io(format!("reaping {}", self.command), error))?;
        Ok(self.outcome(status.code()))
    }

    fn outcome(&mut self, exit_code: Option<i32>) -> ClientOutcome {
        let text = |handle: Option<JoinHandle<String>>| {
            handle
                .and_then(|handle| handle.join().ok())
                .unwrap_or_default()
        };
        ClientOutcome {
            command: self.command.clone(),
            exit_code,
            stdout: text(self.stdout.take()),
            stderr: text(self.stderr.take()),
            elapsed: self.started.elapsed(),
        }
    }
}

impl Drop for RunningClient {
    fn drop(&mut self) {
        if !self.has_exited() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// Runs the client to its end (killed after `timeout`).
pub fn run_client(
    server: Ipv4Addr,
    port: u16,
    args: &[&str],
    timeout: Duration,
) -> Result<ClientOutcome> {
    RunningClient::spawn(server, port, args)?.finish(timeout)
}

fn invalid_data(context: impl Into<String>) -> Error {
    Error::io(context, std::io::Error::from(ErrorKind::InvalidData))
}

/// What the bench takes from one `iperf3 -J` report.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct JsonSummary {
    /// The receiver's rate over the measured seconds (`end.sum_received.bits_per_second`).
    pub received_bits_per_second: f64,
    /// TCP retransmits of the sending side, when the sender reported them
    /// (`end.sum_sent.retransmits`): the host's own counter when the host sends; the app does
    /// not report one when it sends (`-R`).
    pub retransmits: Option<u64>,
}

/// Parses the report `iperf3 -J` printed; a report carrying an `error` is an error.
pub fn parse_json_summary(text: &str) -> Result<JsonSummary> {
    let report: serde_json::Value = serde_json::from_str(text)
        .map_err(|error| invalid_data(format!("iperf3 -J printed invalid JSON ({error})")))?;
    if let Some(error) = report["error"].as_str() {
        return Err(invalid_data(format!("iperf3 reported: {error}")));
    }
    let end = &report["end"];
    let received_bits_per_second = end["sum_received"]["bits_per_second"]
        .as_f64()
        .ok_or_else(|| invalid_data("iperf3 -J report has no end.sum_received.bits_per_second"))?;
    Ok(JsonSummary {
        received_bits_per_second,
        retransmits: end["sum_sent"]["retransmits"].as_u64(),
    })
}

/// Which way the data goes in a bench row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Host to guest: the client sends (iperf3's default).
    In,
    /// Guest to host: the app sends (`-R`).
    Out,
}

impl Direction {
    /// The table's name for it.
    pub fn name(self) -> &'static str {
        match self {
            Direction::In => "in",
            Direction::Out => "out",
        }
    }
}

/// One of the bench's guest set-ups.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BenchPath {
    /// The table's name for it.
    pub name: &'static str,
    /// The NICs the guest gets.
    pub paths: NetPaths,
    /// Whether the traffic runs on the VF (and so compares with the Linux guest's igbvf).
    pub on_vf: bool,
    /// Properties appended to the virtio-net device (`-device virtio-net-pci,...`).
    pub virtio_properties: &'static str,
    /// Appended to the guest's command line.
    pub cmdline: &'static str,
}

/// virtio-net without GUEST_TSO4/6 (and GUEST_UFO/ECN, which need them): the host hands over
/// MTU-sized segments, as a VF, netvsc or a host without receive coalescing does.
const NO_GUEST_TSO: &str = ",guest_tso4=off,guest_tso6=off,guest_ecn=off,guest_ufo=off";

/// The bench's set-ups, in table order: (a) VF alone, (b) the same with receive coalescing
/// off (what it brings, in the same run), (c) virtio-net alone, (d) virtio-net without
/// GUEST_TSO, (e) the bond.
pub const BENCH_PATHS: [BenchPath; 5] = [
    BenchPath {
        name: "VF alone",
        paths: NetPaths::Vf,
        on_vf: true,
        virtio_properties: "",
        cmdline: "",
    },
    BenchPath {
        name: "VF, no coalescing",
        paths: NetPaths::Vf,
        on_vf: true,
        virtio_properties: "",
        cmdline: "net.coalesce=off",
    },
    BenchPath {
        name: "virtio-net alone",
        paths: NetPaths::Virtio,
        on_vf: false,
        virtio_properties: "",
        cmdline: "",
    },
    BenchPath {
        name: "virtio no GUEST_TSO",
        paths: NetPaths::Virtio,
        on_vf: false,
        virtio_properties: NO_GUEST_TSO,
        cmdline: "",
    },
    BenchPath {
        name: "bond (VF active)",
        paths: NetPaths::Both,
        on_vf: true,
        virtio_properties: "",
        cmdline: "",
    },
];

/// The Linux guest's Gbit/s for a path and direction.
pub fn linux_gbits(on_vf: bool, direction: Direction) -> f64 {
    match (on_vf, direction) {
        (true, Direction::In) => LINUX_IGBVF_IN_GBITS,
        (true, Direction::Out) => LINUX_IGBVF_OUT_GBITS,
        (false, Direction::In) => LINUX_VIRTIO_IN_GBITS,
        (false, Direction::Out) => LINUX_VIRTIO_OUT_GBITS,
    }
}

/// The client arguments of one bench run.
pub fn bench_client_args(direction: Direction, streams: u32) -> Vec<String> {
    let mut args = vec![
        "-t".to_string(),
        RUN_SECONDS.to_string(),
        "-O".to_string(),
        OMIT_SECONDS.to_string(),
        "-J".to_string(),
    ];
    if direction == Direction::Out {
        args.push("-R".to_string());
    }
    if streams > 1 {
        args.push("-P".to_string());
        args.push(streams.to_string());
    }
    args
}

/// What one client run measured.
#[derive(Clone, Debug, PartialEq)]
pub struct RunSample {
    /// Receiver Gbit/s (10^9 bits per second).
    pub gbits: f64,
    /// Host TCP retransmits, when the host sent.
    pub retransmits: Option<u64>,
    /// QEMU's CPU time (user + system, all threads) over the run's wall time, in percent of
    /// one host CPU.
    pub qemu_cpu_percent: f64,
    /// The bond's active path after the run (`stats`), when the guest has a lab channel.
    pub active: Option<String>,
    /// What the guest reported about receiving over the test, when it did.
    pub receive: Option<ReceiveReport>,
    /// On-CPU ns of QEMU's vCPU thread per frame the guest received, over the client's run.
    pub vcpu_ns_per_frame: Option<f64>,
    /// The same for QEMU's other threads (device emulation, tap I/O).
    pub io_ns_per_frame: Option<f64>,
}

/// The receive figures of the app's `iperf: test done: ...` line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReceiveReport {
    /// Frames the guest's drivers delivered (`rx_frames=`).
    pub frames: u64,
    /// Frames the guest sent (`tx_frames=`; while it receives, ACKs).
    pub sent_frames: u64,
    /// Guest time receiving per delivered frame: device reads, bond, coalescing and smoltcp's
    /// ingress (`rx_ns_per_frame=`).
    pub ns_per_frame: u64,
    /// The part of it before smoltcp (`rx_device_ns_per_frame=`).
    pub device_ns_per_frame: u64,
    /// Segments merged and the merged frames they made (`rx_merged=S/F`).
    pub merged: (u64, u64),
    /// Guest ns per delivered frame by stage (`rx_stage_ns=`, see [`STAGE_NAMES`]), when the
    /// app reported them.
    pub stages: Option<[u64; STAGES]>,
}

/// Stages of the app's `rx_stage_ns=` field, in order.
pub const STAGE_NAMES: [&str; STAGES] = [
    "housekeep",
    "driver",
    "checks",
    "coalesce",
    "smoltcp in",
    "egress",
    "idle",
    "wall",
];
/// Fields of `rx_stage_ns=`.
pub const STAGES: usize = 8;

/// The receive figures of a done line; `None` when it has none.
pub fn parse_receive_report(line: &str) -> Option<ReceiveReport> {
    let field = |name: &str| {
        line.split_whitespace()
            .find_map(|word| word.strip_prefix(name))
    };
    let number = |name: &str| field(name)?.parse::<u64>().ok();
    let (segments, frames) = field("rx_merged=")?.split_once('/')?;
    Some(ReceiveReport {
        frames: number("rx_frames=")?,
        sent_frames: number("tx_frames=")?,
        ns_per_frame: number("rx_ns_per_frame=")?,
        device_ns_per_frame: number("rx_device_ns_per_frame=")?,
        merged: (segments.parse().ok()?, frames.parse().ok()?),
        stages: field("rx_stage_ns=").and_then(|text| {
            let values: Vec<u64> = text
                .split('/')
                .map(str::parse)
                .collect::<std::result::Result<_, _>>()
                .ok()?;
            values.try_into().ok()
        }),
    })
}

/// Per-frame receive cost by stage for the `in` rows (medians over the runs), with what the
/// wall time per frame leaves for the rest (the app reading its sockets, the loop).
pub fn format_stages(rows: &[BenchRow]) -> String {
    let mut text = format!("{:<20} {:>7}", "path (in)", "streams");
    for name in STAGE_NAMES {
        text.push_str(&format!(" {name:>10}"));
    }
    text.push_str(&format!(
        " {:>10} {:>10} {:>10}\n",
        "rest", "vCPU cpu", "I/O cpu"
    ));
    for row in rows.iter().filter(|row| row.direction == Direction::In) {
        let reports: Vec<[u64; STAGES]> = row
            .samples
            .iter()
            .filter_map(|sample| sample.receive.and_then(|report| report.stages))
            .collect();
        if reports.is_empty()
            && row
                .samples
                .iter()
                .all(|sample| sample.vcpu_ns_per_frame.is_none())
        {
            continue;
        }
        let medians: Vec<f64> = (0..STAGES)
            .map(|stage| {
                let values: Vec<f64> = reports.iter().map(|report| report[stage] as f64).collect();
                median(&values).unwrap_or(0.0)
            })
            .collect();
        text.push_str(&format!("{:<20} {:>7}", row.path.name, row.streams));
        for value in &medians {
            text.push_str(&format!(" {value:>10.0}"));
        }
        let accounted: f64 = medians[..STAGES - 1].iter().sum();
        let cpu = |value: fn(&RunSample) -> Option<f64>| {
            let values: Vec<f64> = row.samples.iter().filter_map(value).collect();
            median(&values).map_or("n/a".to_string(), |ns| format!("{ns:.0}"))
        };
        text.push_str(&format!(
            " {:>10.0} {:>10} {:>10}\n",
            medians[STAGES - 1] - accounted,
            cpu(|sample| sample.vcpu_ns_per_frame),
            cpu(|sample| sample.io_ns_per_frame)
        ));
    }
    text.push_str(
        "Guest ns per frame the drivers delivered, medians of the runs: housekeep = device \
         polls and path choice; driver = inside the drivers' receive (descriptors, buffers, \
         doorbell); checks = the bond's checks and duplicate window; coalesce = coalescing and \
         the copy into the receive queue (checks and coalesce are timed on every 8th frame); \
         smoltcp in = smoltcp's ingress; egress = smoltcp's egress (ACKs) and the transmit \
         flush; idle = waiting for interrupts; wall = the test's duration per frame; rest = wall \
         minus the stages (the app reading its sockets, the event loop). The stages are guest \
         clock time, which runs on while the host runs other work; vCPU cpu / I/O cpu = on-CPU ns \
         of QEMU's vCPU thread / its other threads (device emulation, tap) per frame, which \
         does not.\n",
    );
    text
}

/// One table row: a path, a direction and a stream count, with every run's sample.
#[derive(Clone, Debug, PartialEq)]
pub struct BenchRow {
    /// The set-up.
    pub path: BenchPath,
    /// Which way the data went.
    pub direction: Direction,
    /// Parallel streams.
    pub streams: u32,
    /// One sample per run.
    pub samples: Vec<RunSample>,
}

fn median_of(samples: &[RunSample], value: impl Fn(&RunSample) -> f64) -> f64 {
    let values: Vec<f64> = samples.iter().map(value).collect();
    median(&values).unwrap_or(f64::NAN)
}

/// The result table: medians over the runs, throughput also as a multiple of the Linux
/// guest's on the same path and direction.
pub fn format_table(rows: &[BenchRow], memory: &str) -> String {
    let line = |cells: [&str; 12]| {
        format!(
            "{:<20} {:>4} {:>7} {:>8} {:>14} {:>8} {:>9} {:>10} {:>8} {:>8} {:>10} {:>8}\n",
            cells[0],
            cells[1],
            cells[2],
            cells[3],
            cells[4],
            cells[5],
            cells[6],
            cells[7],
            cells[8],
            cells[9],
            cells[10],
            cells[11]
        )
    };
    let mut text = line([
        "path",
        "dir",
        "streams",
        "Gbit/s",
        "x Linux guest",
        "retrans",
        "QEMU CPU",
        "bond path",
        "rx ns/fr",
        "of it NIC",
        "segs/merge",
        "rx/tx fr",
    ]);
    for row in rows {
        let gbits = median_of(&row.samples, |sample| sample.gbits);
        let linux = linux_gbits(row.path.on_vf, row.direction);
        let retransmits: Vec<f64> = row
            .samples
            .iter()
            .filter_map(|sample| sample.retransmits.map(|count| count as f64))
            .collect();
        let retransmits = match median(&retransmits) {
            Some(value) if retransmits.len() == row.samples.len() => format!("{value:.0}"),
            _ => "n/a".to_string(),
        };
        let mut active: Vec<&str> = row
            .samples
            .iter()
            .map(|sample| sample.active.as_deref().unwrap_or("-"))
            .collect();
        active.dedup();
        let reports: Vec<ReceiveReport> = row
            .samples
            .iter()
            .filter_map(|sample| sample.receive)
            .collect();
        let median_ns = |value: fn(&ReceiveReport) -> u64| {
            let values: Vec<f64> = reports.iter().map(|report| value(report) as f64).collect();
            median(&values).map_or("n/a".to_string(), |ns| format!("{ns:.0}"))
        };
        let sum = |value: fn(&ReceiveReport) -> u64| reports.iter().map(value).sum::<u64>();
        let ratio = |numerator: u64, denominator: u64| {
            if denominator > 0 {
                format!("{:.1}", numerator as f64 / denominator as f64)
            } else {
                "-".to_string()
            }
        };
        let per_merge = ratio(sum(|report| report.merged.0), sum(|report| report.merged.1));
        let per_sent = ratio(
            sum(|report| report.frames),
            sum(|report| report.sent_frames),
        );
        text.push_str(&line([
            row.path.name,
            row.direction.name(),
            &row.streams.to_string(),
            &format!("{gbits:.3}"),
            &format!("{:.2}x of {linux:.2}", gbits / linux),
            &retransmits,
            &format!(
                "{:.0} %",
                median_of(&row.samples, |sample| sample.qemu_cpu_percent)
            ),
            &active.join("/"),
            &median_ns(|report| report.ns_per_frame),
            &median_ns(|report| report.device_ns_per_frame),
            &per_merge,
            &per_sent,
        ]));
    }
    text.push_str(&format!(
        "Medians of the runs; each run `iperf3 -t {RUN_SECONDS} -O {OMIT_SECONDS} -J` (-R for \
         out, -P {PARALLEL_STREAMS} for {PARALLEL_STREAMS} streams), guest -m {memory}. Gbit/s = \
         receiver rate. x Linux guest = Gbit/s / the Linux 6.1 guest's single-stream figure on the \
         same path and direction (virtio {LINUX_VIRTIO_IN_GBITS}/{LINUX_VIRTIO_OUT_GBITS}, igbvf \
         {LINUX_IGBVF_IN_GBITS}/{LINUX_IGBVF_OUT_GBITS} Gbit/s in/out; README target \
         {TARGET_RATIO}x). retrans = the host's TCP retransmits (reported only when the host \
         sends). QEMU CPU = QEMU's user+system time / wall time over the run, % of one host CPU. \
         bond path = the guest's `stats` active= after each run (VF alone takes the synthetic \
         slot). rx ns/fr = the guest's time receiving (NIC reads, bond, coalescing, smoltcp \
         ingress) per frame its drivers delivered, guest clock (host time: includes time the \
         host did not run the vCPU), median; of it NIC = the part before smoltcp. segs/merge = \
         segments per merged frame (receive coalescing); rx/tx fr = frames received per frame \
         sent (for `in`: segments per ACK), both over all runs.\n"
    ));
    text
}

/// Clock ticks per second of /proc/<pid>/stat times.
fn user_hz() -> f64 {
    // USER_HZ is 100 on the usual Linux builds; getconf knows for sure.
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|output| String::from_utf8(output.stdout).ok())
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(100.0)
}

/// QEMU's CPU time so far (user + system, all threads), in clock ticks.
fn qemu_cpu_ticks(qemu: &Qemu) -> Result<u64> {
    let path = format!("/proc/{}/stat", qemu.pid());
    let stat = std::fs::read_to_string(&path).map_err(|error| Error::io(&path, error))?;
    cpu_ticks_from_stat(&stat).ok_or_else(|| invalid_data(format!("{path}: unexpected format")))
}

/// On-CPU nanoseconds of QEMU's vCPU threads (named `CPU n/...`) and of all its other
/// threads so far (`/proc/<pid>/task/*/schedstat`): unlike wall time, not inflated when the
/// host runs other work.
fn qemu_thread_cpu_ns(qemu: &Qemu) -> Result<(u64, u64)> {
    let tasks = format!("/proc/{}/task", qemu.pid());
    let entries = std::fs::read_dir(&tasks).map_err(|error| Error::io(&tasks, error))?;
    let (mut vcpu, mut other) = (0, 0);
    for entry in entries.flatten() {
        let path = entry.path();
        let comm = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
        let Some(ns) = std::fs::read_to_string(path.join("schedstat"))
            .ok()
            .and_then(|text| text.split_whitespace().next()?.parse::<u64>().ok())
        else {
            continue;
        };
        if comm.starts_with("CPU ") {
            vcpu += ns;
        } else {
            other += ns;
        }
    }
    Ok((vcpu, other))
}

/// Puts the guest's serial tail into a timeout's message.
fn with_diagnostics(qemu: &Qemu, error: Error) -> Error {
    if let Error::Timeout {
        waiting_for,
        after,
        context,
    } = error
    {
        let context = format!("{context}\n{}", qemu.diagnostics());
        return Error::Timeout {
            waiting_for,
            after,
            context,
        };
    }
    error
}

/// A bench guest.
struct BenchGuest {
    vm: IperfVm,
}

impl BenchGuest {
    /// Boots the app for `path` with `memory` of RAM and waits until it serves (and, on the
    /// bond, until the VF is active).
    fn boot(elf: &Path, path: BenchPath, memory: &str) -> Result<BenchGuest> {
        let taps: &[&str] = match path.paths {
            NetPaths::Virtio => &[TAP_SYNTHETIC],
            NetPaths::Vf => &[TAP_VF],
            NetPaths::Both => &[TAP_SYNTHETIC, TAP_VF],
        };
        let network = GuestNetwork {
            paths: path.paths,
            taps,
            address: BENCH_GUEST,
            prefix_length: BENCH_PREFIX_LENGTH,
            gateway: BENCH_HOST,
        };
        let socket = std::env::temp_dir().join(format!(
            "tandem-bench-iperf-{}-{:?}.lab",
            std::process::id(),
            path.paths
        ));
        let mut launch = guest_launch_with(
            &format!("bench iperf {}", path.name),
            Accel::Tcg,
            elf,
            &network,
            memory,
            path.cmdline,
            &socket,
            path.virtio_properties,
        )?;
        launch.builder = launch.builder.echo(false);
        let vm = launch.boot(BOOT_TIMEOUT)?;
        if path.paths == NetPaths::Both
            && let Some(socket) = &vm.lab_socket
        {
            wait_for_active(socket, ActivePath::Vf, VF_ACTIVE_TIMEOUT)
                .map_err(|error| with_diagnostics(&vm.qemu, error))?;
        }
        Ok(BenchGuest { vm })
    }

    /// One client run, with QEMU's CPU use over it.
    fn measure(&self, direction: Direction, streams: u32) -> Result<RunSample> {
        let args = bench_client_args(direction, streams);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let hz = user_hz();
        let done_lines = || {
            self.vm
                .qemu
                .serial_lines()
                .into_iter()
                .filter(|line| line.contains(TEST_DONE_LINE))
                .collect::<Vec<_>>()
        };
        let done_before = done_lines().len();
        let ticks_before = qemu_cpu_ticks(&self.vm.qemu)?;
        let threads_before = qemu_thread_cpu_ns(&self.vm.qemu)?;
        let started = Instant::now();
        let outcome = run_client(
            BENCH_GUEST,
            IPERF_PORT,
            &args,
            Duration::from_secs(u64::from(RUN_SECONDS + OMIT_SECONDS)) + CLIENT_GRACE,
        )?;
        let wall = started.elapsed().as_secs_f64();
        let ticks = qemu_cpu_ticks(&self.vm.qemu)?.saturating_sub(ticks_before);
        let threads_after = qemu_thread_cpu_ns(&self.vm.qemu)?;
        let thread_cpu_ns = (
            threads_after.0.saturating_sub(threads_before.0),
            threads_after.1.saturating_sub(threads_before.1),
        );
        let summary = parse_json_summary(&outcome.stdout).map_err(|error| {
            invalid_data(format!(
                "{error}\n{outcome}\n{}",
                self.vm.qemu.diagnostics()
            ))
        })?;
        if !outcome.succeeded() {
            return Err(invalid_data(format!(
                "{outcome}\n{}",
                self.vm.qemu.diagnostics()
            )));
        }
        let active = match &self.vm.lab_socket {
            Some(socket) => Some(lab_stats(socket)?.active),
            None => None,
        };
        // The app logs its summary before the client exits; the console may lag a little.
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut done = done_lines();
        while done.len() <= done_before && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
            done = done_lines();
        }
        let receive = done
            .get(done_before..)
            .and_then(<[_]>::last)
            .and_then(|line| parse_receive_report(line));
        // Over the client's run (connection set-up included) per frame of the test.
        let per_frame = |ns: u64| {
            receive
                .filter(|report| report.frames > 0)
                .map(|report| ns as f64 / report.frames as f64)
        };
        Ok(RunSample {
            gbits: summary.received_bits_per_second / 1e9,
            retransmits: summary.retransmits,
            qemu_cpu_percent: ticks as f64 / hz / wall * 100.0,
            active,
            receive,
            vcpu_ns_per_frame: per_frame(thread_cpu_ns.0),
            io_ns_per_frame: per_frame(thread_cpu_ns.1),
        })
    }
}

/// Inside the namespace: every path (or the one asked for), direction and stream count, `runs`
/// times each.
fn measure_all(elf: &Path, runs: usize, only: Option<NetPaths>) -> Result<()> {
    let mut rows = Vec::new();
    let mut memory = GUEST_MEMORY;
    let selected = |path: &BenchPath| only.is_none_or(|only| only == path.paths);
    // This host's speed drifts by tens of percent within minutes, so each set-up's ceilings
    // are measured next to its rows: the receive ceiling (the one the targets are shares of)
    // right before and right after them, averaged; the send ceiling after them.
    // (set-up name, direction, ceiling).
    let mut ceilings = Vec::new();
    for path in BENCH_PATHS.into_iter().filter(selected) {
        let nic = plain_setup(path.on_vf);
        let receive_before = raw_ceiling(elf, nic, memory, Direction::In)?;
        measure_rows(elf, path, runs, &mut memory, &mut rows)?;
        let receive_after = raw_ceiling(elf, nic, memory, Direction::In)?;
        ceilings.push((
            path.name,
            Direction::In,
            RawCeiling::mean(receive_before, receive_after),
        ));
        let send = raw_ceiling(elf, nic, memory, Direction::Out)?;
        ceilings.push((path.name, Direction::Out, send));
    }
    println!("--- bench iperf (TCG, 1 vCPU, tap; {runs} runs per row) ---");
    print!("{}", format_table(&rows, memory));
    println!("--- receive cost per frame by stage (host to guest) ---");
    print!("{}", format_stages(&rows));
    println!(
        "--- raw-frame ceiling (1514-byte frames, no TCP/IP: the host floods the guest for `in`, \
         the guest sends pre-built frames for `out`; on the set-up's NIC alone; `in` is the mean \
         of a measurement right before and one right after the set-up's rows, `out` is measured \
         right after them) ---"
    );
    for path in BENCH_PATHS.iter().filter(|path| selected(path)) {
        for direction in [Direction::In, Direction::Out] {
            let Some(&(_, _, raw)) = ceilings
                .iter()
                .find(|(name, way, _)| *name == path.name && *way == direction)
            else {
                continue;
            };
            for streams in [1, PARALLEL_STREAMS] {
                let stack = stack_rate(&rows, path, direction, streams);
                let gbits = raw.gbits;
                // Host→guest only: per frame received, both sides count the same frames.
                let mut cpu = match (raw.vcpu_ns_per_frame, direction) {
                    (Some(raw_ns), Direction::In) => {
                        let stack_ns =
                            stack_cpu_ns(&rows, path, streams, |sample| sample.vcpu_ns_per_frame);
                        format!(
                            "; vCPU {raw_ns:.0} ns/frame raw, {stack_ns:.0} with TCP = {:.0} % \
                             by CPU",
                            if stack_ns > 0.0 {
                                raw_ns / stack_ns * 100.0
                            } else {
                                0.0
                            }
                        )
                    }
                    _ => String::new(),
                };
                // QEMU's other threads read the tap and run the NIC model: the side that
                // bounds the ceiling when the vCPU idles.
                if let (Some(raw_ns), Direction::In) = (raw.io_ns_per_frame, direction) {
                    let stack_ns =
                        stack_cpu_ns(&rows, path, streams, |sample| sample.io_ns_per_frame);
                    cpu.push_str(&format!(
                        "; I/O threads {raw_ns:.0} ns/frame raw, {stack_ns:.0} with TCP"
                    ));
                }
                let measured = raw
                    .measured_gbits
                    .map(|(before, after)| {
                        format!(", {before:.3} before / {after:.3} after the rows")
                    })
                    .unwrap_or_default();
                println!(
                    "{:<20} {:>3} x{streams} {gbits:>7.3} Gbit/s raw ({} NIC{measured}); iperf \
                     {stack:.3} Gbit/s = {:.0} % of the ceiling{cpu}",
                    path.name,
                    direction.name(),
                    if path.on_vf { "VF" } else { "virtio" },
                    if gbits > 0.0 {
                        stack / gbits * 100.0
                    } else {
                        0.0
                    }
                );
            }
        }
    }
    Ok(())
}

/// Boots `path`'s guest and measures its rows (both directions, 1 and
/// [`PARALLEL_STREAMS`] streams, `runs` each) into `rows`; the guest is gone on return.
fn measure_rows(
    elf: &Path,
    path: BenchPath,
    runs: usize,
    memory: &mut &'static str,
    rows: &mut Vec<BenchRow>,
) -> Result<()> {
    let guest = match BenchGuest::boot(elf, path, memory) {
        Ok(guest) => guest,
        Err(error) if *memory == GUEST_MEMORY => {
            eprintln!(
                "xtask: bench iperf: the guest did not serve in -m {GUEST_MEMORY} ({error}); \
                 NOTE: falling back to -m {FALLBACK_MEMORY} for the rest of the bench"
            );
            *memory = FALLBACK_MEMORY;
            BenchGuest::boot(elf, path, memory)?
        }
        Err(error) => return Err(error),
    };
    for direction in [Direction::In, Direction::Out] {
        for streams in [1, PARALLEL_STREAMS] {
            let mut samples = Vec::new();
            for run in 1..=runs {
                let sample = guest.measure(direction, streams)?;
                eprintln!(
                    "xtask: {} {} x{streams} run {run}/{runs}: {:.3} Gbit/s, retransmits {}, \
                     QEMU CPU {:.0} %, bond path {}, vCPU {:.0} / I/O {:.0} ns per frame, \
                     receive {:?}",
                    path.name,
                    direction.name(),
                    sample.gbits,
                    sample
                        .retransmits
                        .map_or("n/a".to_string(), |count| count.to_string()),
                    sample.qemu_cpu_percent,
                    sample.active.as_deref().unwrap_or("-"),
                    sample.vcpu_ns_per_frame.unwrap_or(f64::NAN),
                    sample.io_ns_per_frame.unwrap_or(f64::NAN),
                    sample.receive
                );
                samples.push(sample);
            }
            rows.push(BenchRow {
                path,
                direction,
                streams,
                samples,
            });
        }
    }
    Ok(())
}

/// The plain set-up of the VF (`on_vf`) or of virtio-net: the NIC alone, nothing switched
/// off. Every set-up on that NIC is compared with its raw ceiling (the bond with the VF's,
/// virtio-net without GUEST_TSO with virtio-net's).
fn plain_setup(on_vf: bool) -> BenchPath {
    BENCH_PATHS
        .into_iter()
        .find(|path| {
            path.on_vf == on_vf
                && path.paths != NetPaths::Both
                && path.virtio_properties.is_empty()
                && path.cmdline.is_empty()
        })
        .expect("BENCH_PATHS has a plain set-up per NIC")
}

/// The median of one of QEMU's CPU figures (`figure`: vCPU or I/O threads, ns per received
/// frame) over the host→guest runs on `path` with `streams`.
fn stack_cpu_ns(
    rows: &[BenchRow],
    path: &BenchPath,
    streams: u32,
    figure: fn(&RunSample) -> Option<f64>,
) -> f64 {
    rows.iter()
        .filter(|row| row.path == *path && row.direction == Direction::In && row.streams == streams)
        .filter_map(|row| {
            let values: Vec<f64> = row.samples.iter().filter_map(figure).collect();
            median(&values)
        })
        .fold(0.0, f64::max)
}

/// The median iperf rate measured on `path` in `direction` with `streams` streams.
fn stack_rate(rows: &[BenchRow], path: &BenchPath, direction: Direction, streams: u32) -> f64 {
    rows.iter()
        .filter(|row| row.path == *path && row.direction == direction && row.streams == streams)
        .filter_map(|row| {
            median(
                &row.samples
                    .iter()
                    .map(|sample| sample.gbits)
                    .collect::<Vec<_>>(),
            )
        })
        .fold(0.0, f64::max)
}

/// Floods a tap with 1514-byte broadcast frames (ethertype 0x88B5) for the given seconds.
///
/// The tap's queue (1000 frames) is kept full at little CPU cost, because on a 2-CPU host every
/// cycle the flood burns may be taken from QEMU's two threads: a `send` per frame in a busy
/// loop took a whole host CPU (this takes a quarter to a third of one). So frames go out
/// through a packet socket's transmit ring (`PACKET_TX_RING`, TPACKET_V2, qdisc bypassed;
/// written once, each `send` hands the kernel 64 ready slots), and when the tap dropped frames
/// (its queue was full: QEMU had not read them) the flood sleeps half a millisecond, in which
/// QEMU reads about a tenth of the queue. The tap's drop count is printed with the ceiling:
/// none would mean the flood, not QEMU, set the rate.
const FLOOD_SCRIPT: &str = "import mmap, os, socket, struct, sys, time
SOL_PACKET, PACKET_VERSION, PACKET_TX_RING, PACKET_QDISC_BYPASS, TPACKET_V2 = 263, 10, 13, 20, 1
SLOT, SLOTS_PER_BLOCK, BLOCKS, BATCH = 2048, 32, 8, 64
SLOTS = SLOTS_PER_BLOCK * BLOCKS
DATA = 32  # TPACKET_ALIGN(sizeof(struct tpacket2_hdr)): where a slot's frame starts
tap = sys.argv[1]
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind((tap, 0))
s.setsockopt(SOL_PACKET, PACKET_VERSION, TPACKET_V2)
s.setsockopt(SOL_PACKET, PACKET_QDISC_BYPASS, 1)
s.setsockopt(SOL_PACKET, PACKET_TX_RING, struct.pack('IIII', SLOT * SLOTS_PER_BLOCK, BLOCKS, SLOT, SLOTS))
ring = mmap.mmap(s.fileno(), SLOT * SLOTS)
frame = bytes([255] * 6 + [2, 0, 0, 0, 0, 1, 0x88, 0xb5]) + bytes(1500)
for slot in range(SLOTS):
    base = slot * SLOT
    ring[base + DATA:base + DATA + len(frame)] = frame
    struct.pack_into('II', ring, base + 4, len(frame), len(frame))  # tp_len, tp_snaplen
status = memoryview(ring).cast('I')
batches = [[slot * SLOT // 4 for slot in range(first, first + BATCH)] for first in range(0, SLOTS, BATCH)]
dropped = os.open('/sys/class/net/%s/statistics/tx_dropped' % tap, os.O_RDONLY)
drops = lambda: int(os.pread(dropped, 32, 0))
last = drops()
end = time.time() + float(sys.argv[2])
while time.time() < end:
    for batch in batches:
        for index in batch:
            if status[index] == 0:  # TP_STATUS_AVAILABLE
                status[index] = 1  # TP_STATUS_SEND_REQUEST
        try:
            s.send(b'')
        except OSError:
            pass
        now = drops()
        if now != last:
            last = now
            time.sleep(0.0005)
";

/// Frames the kernel dropped sending to `tap` so far (its queue to QEMU was full).
fn tap_dropped(tap: &str) -> Result<u64> {
    let path = format!("/sys/class/net/{tap}/statistics/tx_dropped");
    let text = std::fs::read_to_string(&path).map_err(|error| Error::io(&path, error))?;
    text.trim()
        .parse()
        .map_err(|_| Error::Environment(format!("{path} holds {text:?}, not a count")))
}

/// Raw-frame ceiling of `path` in `direction`: boots the app with `iperf.raw=tx` (out) or with
/// `iperf.raw=rx` while the host floods the path's tap (in), and takes the median of the
/// guest's per-second rate lines (partial seconds left out).
fn raw_ceiling(
    elf: &Path,
    path: BenchPath,
    memory: &str,
    direction: Direction,
) -> Result<RawCeiling> {
    let taps: &[&str] = match path.paths {
        NetPaths::Virtio => &[TAP_SYNTHETIC],
        NetPaths::Vf => &[TAP_VF],
        NetPaths::Both => &[TAP_SYNTHETIC, TAP_VF],
    };
    let network = GuestNetwork {
        paths: path.paths,
        taps,
        address: BENCH_GUEST,
        prefix_length: BENCH_PREFIX_LENGTH,
        gateway: BENCH_HOST,
    };
    let socket = std::env::temp_dir().join(format!(
        "tandem-bench-iperf-raw-{}-{:?}.lab",
        std::process::id(),
        path.paths
    ));
    let (mode, marker) = match direction {
        Direction::Out => ("iperf.raw=tx", "iperf: raw tx"),
        Direction::In => ("iperf.raw=rx", "iperf: raw rx"),
    };
    let launch = guest_launch(
        &format!("bench raw {}", path.name),
        Accel::Tcg,
        elf,
        &network,
        memory,
        mode,
        &socket,
    )?;
    let mut qemu = launch.builder.echo(false).spawn()?;
    // The flood, the tap it fills and that tap's drop count before it started.
    let mut flood = None;
    if direction == Direction::In {
        qemu.wait_for_line("iperf: raw receive", BOOT_TIMEOUT)?;
        // The VF's link may come up after the app started (the lab PF brings it up): a flood
        // before that is lost and the ceiling would read 0.
        let announced = qemu
            .serial_lines()
            .iter()
            .any(|line| line.contains(ANNOUNCED_LINE));
        if !announced {
            qemu.wait_for_line(ANNOUNCED_LINE, BOOT_TIMEOUT)?;
        }
        // The NIC the set-up's traffic uses (the bond's is the VF).
        let tap = if path.on_vf { TAP_VF } else { TAP_SYNTHETIC };
        let dropped_before = tap_dropped(tap)?;
        let child = Command::new("python3")
            .args(["-c", FLOOD_SCRIPT, tap, "9"])
            .stdout(Stdio::null())
            .spawn()
            .map_err(|error| Error::io("starting the frame flood (python3)", error))?;
        flood = Some((child, tap, dropped_before));
        // The second in which the flood starts is partial too.
        qemu.wait_for_line(marker, BOOT_TIMEOUT)?;
    }
    let mut rates = Vec::new();
    let mut frames = 0.0;
    let mut cpu_start_ns = None;
    for second in 0..6 {
        let line = qemu.wait_for_line(marker, BOOT_TIMEOUT)?;
        let words: Vec<&str> = line.split_whitespace().collect();
        let value_before = |unit: &str| {
            words
                .windows(2)
                .find(|pair| pair[1] == unit)
                .and_then(|pair| pair[0].parse::<f64>().ok())
        };
        if second == 0 {
            cpu_start_ns = Some(qemu_thread_cpu_ns(&qemu)?);
        } else if let Some(gbits) = value_before("Gbit/s") {
            rates.push(gbits);
            frames += value_before("frames/s").unwrap_or(0.0);
        }
    }
    let (vcpu_ns, io_ns) = qemu_thread_cpu_ns(&qemu)?;
    // Before the flood stops: frames the tap dropped because QEMU had not read its queue.
    let mut dropped = None;
    if let Some((mut child, tap, before)) = flood {
        let count = tap_dropped(tap);
        let _ = child.kill();
        let _ = child.wait();
        dropped = Some(count?.saturating_sub(before));
    }
    let _ = std::fs::remove_file(&socket);
    let flood_note = match dropped {
        Some(0) => {
            "; WARNING: the tap dropped nothing, so the flood, not QEMU, set this rate".to_string()
        }
        Some(dropped) => format!("; the tap dropped {dropped} flood frames (its queue was full)"),
        None => String::new(),
    };
    eprintln!(
        "xtask: {} raw {}: {rates:?} Gbit/s per second{flood_note}",
        path.name,
        direction.name()
    );
    let per_frame =
        |end: u64, start: u64| (frames > 0.0).then(|| end.saturating_sub(start) as f64 / frames);
    Ok(RawCeiling {
        gbits: median(&rates).unwrap_or(0.0),
        vcpu_ns_per_frame: cpu_start_ns.and_then(|(vcpu, _)| per_frame(vcpu_ns, vcpu)),
        io_ns_per_frame: cpu_start_ns.and_then(|(_, io)| per_frame(io_ns, io)),
        measured_gbits: None,
    })
}

/// A path's raw-frame ceiling in one direction.
#[derive(Clone, Copy, Debug)]
struct RawCeiling {
    /// Median Gbit/s of the measured seconds.
    gbits: f64,
    /// On-CPU ns of QEMU's vCPU thread per frame over those seconds.
    vcpu_ns_per_frame: Option<f64>,
    /// On-CPU ns of QEMU's other threads (tap, NIC model) per frame over those seconds.
    io_ns_per_frame: Option<f64>,
    /// For a mean of two measurements: their Gbit/s, in order.
    measured_gbits: Option<(f64, f64)>,
}

impl RawCeiling {
    /// The mean of two measurements of one ceiling (a CPU figure only if both have one).
    fn mean(first: RawCeiling, second: RawCeiling) -> RawCeiling {
        RawCeiling {
            gbits: (first.gbits + second.gbits) / 2.0,
            vcpu_ns_per_frame: first
                .vcpu_ns_per_frame
                .zip(second.vcpu_ns_per_frame)
                .map(|(first, second)| (first + second) / 2.0),
            io_ns_per_frame: first
                .io_ns_per_frame
                .zip(second.io_ns_per_frame)
                .map(|(first, second)| (first + second) / 2.0),
            measured_gbits: Some((first.gbits, second.gbits)),
        }
    }
}

/// `cargo xtask bench iperf [--runs N]`: builds the iperf image, creates the namespace, runs
/// the measurements inside it, prints the table, removes the namespace.
pub fn iperf_benchmark(runs: usize, paths: Option<NetPaths>) -> Result<()> {
    if let Some(elf) = std::env::var_os(INSIDE_ENV) {
        return measure_all(Path::new(&elf), runs, paths);
    }
    require_root("iperf")?;
    let elf = build_app("iperf", Profile::Release)?;
    let namespace = BenchNamespace::create(
        NAMESPACE_PREFIX,
        BENCH_HOST,
        BENCH_PREFIX_LENGTH,
        &[TAP_SYNTHETIC, TAP_VF],
    )?;
    let runs_text = runs.to_string();
    let mut args = vec!["bench", "iperf", "--runs", &runs_text];
    if let Some(paths) = paths {
        args.extend(["--paths", paths.name()]);
    }
    eprintln!(
        "xtask: namespace {} (br0 {BENCH_HOST}/{BENCH_PREFIX_LENGTH}, taps {TAP_SYNTHETIC} + \
         {TAP_VF}), guest {BENCH_GUEST}",
        namespace.name
    );
    namespace.run_xtask_inside(&args, INSIDE_ENV, &elf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_report_gives_receiver_rate_and_host_retransmits() {
        let host_sends = r#"{"start":{},"intervals":[],"end":{
            "sum_sent":{"bytes":280838300,"bits_per_second":1123289734.13,"retransmits":7,"sender":true},
            "sum_received":{"bytes":279265540,"bits_per_second":1115374021.34,"sender":true}}}"#;
        let summary = parse_json_summary(host_sends).unwrap();
        assert_eq!(summary.received_bits_per_second, 1115374021.34);
        assert_eq!(summary.retransmits, Some(7));

        // With -R the app sends and reports no retransmits.
        let guest_sends = r#"{"end":{
            "sum_sent":{"bits_per_second":842271952.2,"sender":false},
            "sum_received":{"bits_per_second":843268672.6,"sender":false}}}"#;
        assert_eq!(parse_json_summary(guest_sends).unwrap().retransmits, None);
    }

    #[test]
    fn json_errors_and_truncated_reports_are_refused() {
        let busy = r#"{"start":{},"intervals":[],"end":{},
            "error":"the server is busy running a test. try again later"}"#;
        let error = parse_json_summary(busy).unwrap_err().to_string();
        assert!(error.contains("server is busy"), "{error}");
        assert!(parse_json_summary(r#"{"end":{"sum_sent":{}}}"#).is_err());
        assert!(parse_json_summary("iperf3: error - unable to connect").is_err());
    }

    #[test]
    fn client_arguments_per_direction_and_stream_count() {
        assert_eq!(
            bench_client_args(Direction::In, 1),
            ["-t", "5", "-O", "1", "-J"]
        );
        assert_eq!(
            bench_client_args(Direction::Out, 4),
            ["-t", "5", "-O", "1", "-J", "-R", "-P", "4"]
        );
    }

    #[test]
    fn baselines_follow_path_and_direction() {
        assert_eq!(linux_gbits(false, Direction::In), 1.44);
        assert_eq!(linux_gbits(false, Direction::Out), 1.22);
        assert_eq!(linux_gbits(true, Direction::In), 0.65);
        assert_eq!(linux_gbits(true, Direction::Out), 0.63);
        assert!(
            BENCH_PATHS
                .iter()
                .any(|path| path.paths == NetPaths::Both && path.on_vf)
        );
    }

    #[test]
    fn a_ceiling_measured_twice_is_their_mean_and_keeps_both() {
        let before = RawCeiling {
            gbits: 3.0,
            vcpu_ns_per_frame: Some(1500.0),
            io_ns_per_frame: Some(4000.0),
            measured_gbits: None,
        };
        let after = RawCeiling {
            gbits: 2.0,
            vcpu_ns_per_frame: None,
            io_ns_per_frame: Some(6000.0),
            measured_gbits: None,
        };
        let mean = RawCeiling::mean(before, after);
        assert_eq!(mean.gbits, 2.5);
        assert_eq!(mean.measured_gbits, Some((3.0, 2.0)));
        // Half a CPU figure would be no figure.
        assert_eq!(mean.vcpu_ns_per_frame, None);
        assert_eq!(mean.io_ns_per_frame, Some(5000.0));
        let both = RawCeiling::mean(
            before,
            RawCeiling {
                gbits: 2.0,
                ..before
            },
        );
        assert_eq!(both.vcpu_ns_per_frame, Some(1500.0));
    }

    fn sample(gbits: f64, retransmits: Option<u64>, active: &str) -> RunSample {
        RunSample {
            gbits,
            retransmits,
            qemu_cpu_percent: 150.0,
            active: Some(active.to_string()),
            receive: Some(ReceiveReport {
                frames: 100,
                sent_frames: 10,
                ns_per_frame: 700,
                device_ns_per_frame: 300,
                merged: (90, 3),
                stages: Some([10, 20, 30, 40, 50, 60, 70, 400]),
            }),
            vcpu_ns_per_frame: Some(3000.0),
            io_ns_per_frame: Some(1000.0),
        }
    }

    #[test]
    fn receive_cost_is_read_from_the_done_line() {
        let line = "iperf: test done: tcp reverse=no streams=1 bytes_received=1 seconds=5.0 \
                    Mbit/s=1.00 bidir=no bytes_sent=0 rx_frames=12 tx_frames=3 \
                    rx_ns_per_frame=812 rx_device_ns_per_frame=300 rx_merged=400/20 \
                    rx_stage_ns=1/2/3/4/5/6/7/40";
        assert_eq!(
            parse_receive_report(line),
            Some(ReceiveReport {
                frames: 12,
                sent_frames: 3,
                ns_per_frame: 812,
                device_ns_per_frame: 300,
                merged: (400, 20),
                stages: Some([1, 2, 3, 4, 5, 6, 7, 40]),
            })
        );
        assert_eq!(parse_receive_report("iperf: test done: tcp"), None);
    }

    #[test]
    fn stage_table_shows_in_rows_and_what_the_stages_leave_of_the_wall_time() {
        let rows = [
            BenchRow {
                path: BENCH_PATHS[0],
                direction: Direction::In,
                streams: 4,
                samples: vec![sample(2.0, Some(0), "Synthetic")],
            },
            BenchRow {
                path: BENCH_PATHS[0],
                direction: Direction::Out,
                streams: 1,
                samples: vec![sample(2.0, None, "Synthetic")],
            },
        ];
        let table = format_stages(&rows);
        let lines: Vec<&str> = table
            .lines()
            .filter(|line| line.starts_with("VF alone"))
            .collect();
        assert_eq!(lines.len(), 1, "{table}");
        // 10+20+...+70 = 280 of a 400 ns wall time: 120 left for the rest.
        assert!(
            lines[0]
                .trim_end()
                .ends_with("70        400        120       3000       1000"),
            "{table}"
        );
    }

    #[test]
    fn table_shows_medians_ratios_and_missing_retransmits() {
        let rows = [
            BenchRow {
                path: BENCH_PATHS[2],
                direction: Direction::In,
                streams: 1,
                samples: vec![
                    sample(2.0, Some(4), "Synthetic"),
                    sample(2.88, Some(0), "Synthetic"),
                    sample(1.0, Some(9), "Synthetic"),
                ],
            },
            BenchRow {
                path: BENCH_PATHS[4],
                direction: Direction::Out,
                streams: 4,
                samples: vec![sample(0.63, None, "Vf"), sample(0.63, None, "Vf")],
            },
        ];
        let table = format_table(&rows, "32M");
        let virtio = table
            .lines()
            .find(|line| line.starts_with("virtio-net alone"))
            .unwrap();
        // Median 2.0 Gbit/s against Linux's 1.44 in; median retransmits 4.
        assert!(virtio.contains("2.000"), "{virtio}");
        assert!(virtio.contains("1.39x of 1.44"), "{virtio}");
        assert!(virtio.contains(" 4 "), "{virtio}");
        assert!(virtio.contains("150 %"), "{virtio}");
        let bond = table
            .lines()
            .find(|line| line.starts_with("bond (VF active)"))
            .unwrap();
        assert!(bond.contains("1.00x of 0.63"), "{bond}");
        assert!(bond.contains("n/a"), "{bond}");
        assert!(bond.contains(" Vf "), "{bond}");
        assert!(
            bond.trim_end()
                .ends_with("700      300       30.0     10.0"),
            "{bond}"
        );
        assert!(table.contains("-m 32M"));
    }

    #[test]
    fn a_client_run_collects_exit_code_and_output() {
        // `iperf3 -c` against a port nothing listens on in this (test) namespace fails fast:
        // the runner must report that as an outcome, not hang or panic.
        let outcome = match run_client(
            Ipv4Addr::LOCALHOST,
            9,
            &["-t", "1"],
            Duration::from_secs(30),
        ) {
            Ok(outcome) => outcome,
            Err(Error::Io { source, .. }) if source.kind() == ErrorKind::NotFound => {
                // `cargo xtask test` installs iperf3 first; a bare `cargo test` may lack it.
                eprintln!("skipped: no iperf3 on this host");
                return;
            }
            Err(error) => panic!("{error}"),
        };
        assert!(!outcome.succeeded(), "{outcome}");
        assert!(outcome.text().contains("unable to connect"), "{outcome}");
        assert!(outcome.command.starts_with("iperf3 -c 127.0.0.1 -p 9 -t 1"));
    }
}
