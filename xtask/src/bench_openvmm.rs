//! `cargo xtask bench iperf|echo --vmm openvmm`: Tandem's netvsc path against a Linux 6.1
//! guest with `hv_netvsc` ([`crate::linux_guest`]), each booted in turn under the same nested
//! OpenVMM (QEMU/TCG L1 → KVM → OpenVMM, netvsc on consomme), in the same run.
//!
//! Both guests get the same L1, the same OpenVMM command line apart from the kernel, one vCPU,
//! and the same forwards: host 127.0.0.1:P → (QEMU user net) L1 → (consomme) guest port
//! 5201 or 7. The host's clients are the QEMU benches' own (stock `iperf3 -J`; the echo
//! bench's 1-byte round trips and bulk stream), so the two rows differ only in the guest.
//! No root and no namespace: everything travels through loopback forwards.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::Path;
use std::time::{Duration, Instant};

use crate::bench::median;
use crate::bench_echo::{bulk_throughput, tcp_round_trips, udp_round_trips};
use crate::bench_iperf::{Direction, bench_client_args, parse_json_summary, run_client};
use crate::error::{Error, Result};
use crate::image::{Profile, build_app};
use crate::linux_guest;
use crate::machine::{HostForward, NetPaths, Protocol};
use crate::nested::{self, L1Assets, L1Payload};
use crate::openvmm::{self, VmConfig};
use crate::openvmm_run::{GuestSpec, NestedGuest, fetch_l1_assets, l1_initramfs_path};

/// Client runs per measurement when `--runs` is not given.
pub const DEFAULT_RUNS: usize = 3;
/// Seconds each iperf3 run measures (`-t`), after [`crate::bench_iperf::OMIT_SECONDS`].
pub const IPERF_SECONDS: u32 = crate::bench_iperf::RUN_SECONDS;
/// How long each round-trip measurement lasts.
pub const ROUND_TRIP_WINDOW: Duration = Duration::from_secs(3);
/// Bytes the bulk echo client streams (two user-mode NATs make the path slow: ~MB/s).
pub const BULK_BYTES: usize = 4 << 20;
/// Pause before each client run (the same for both guests).
const PAUSE_BETWEEN_RUNS: Duration = Duration::from_secs(2);
/// Time from starting L1 to the guest serving (L1 boots under TCG, the guest under nested KVM).
const BOOT_TIMEOUT: Duration = Duration::from_secs(400);
/// Time one iperf3 run may take beyond its `-t` and `-O`.
const CLIENT_GRACE: Duration = Duration::from_secs(90);
/// What our kernel prints once consomme's DHCP server gave it an address.
const DHCP_LEASE_LINE: &str = "net: DHCP lease";
/// Our guest's memory (the apps' usual size under OpenVMM).
const TANDEM_MEMORY: &str = "64M";

/// The two guests, in the order they are measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Contender {
    /// Our image (the `iperf` or `echo` app) with its netvsc driver.
    Tandem,
    /// Debian's 6.1 kernel with `hv_netvsc`, iperf3 and socat.
    Linux,
}

impl Contender {
    /// The table's name for it.
    pub fn name(self) -> &'static str {
        match self {
            Contender::Tandem => "Tandem",
            Contender::Linux => "Linux 6.1",
        }
    }
}

/// A TCP port free on 127.0.0.1 right now.
fn free_port() -> Result<u16> {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .map_err(|error| Error::io("finding a free port on 127.0.0.1", error))
}

/// What one bench shares between its two boots.
struct Bench {
    assets: L1Assets,
    openvmm_binary: std::path::PathBuf,
    linux_initrd: Vec<u8>,
    linux_kernel: Vec<u8>,
}

impl Bench {
    /// Builds OpenVMM, fetches L1's kernel and busybox, writes the Linux guest's initramfs.
    fn prepare() -> Result<Bench> {
        let started = Instant::now();
        let openvmm_binary = openvmm::build()?;
        let assets = fetch_l1_assets()?;
        let linux_initrd = linux_guest::build_initramfs(&assets)?;
        let linux_kernel = std::fs::read(&assets.kernel)
            .map_err(|error| Error::io(format!("reading {}", assets.kernel.display()), error))?;
        eprintln!(
            "xtask: bench: OpenVMM, L1 assets and the Linux guest's initramfs ({} KiB) ready in \
             {:.1} s",
            linux_initrd.len() >> 10,
            started.elapsed().as_secs_f64()
        );
        Ok(Bench {
            assets,
            openvmm_binary,
            linux_initrd,
            linux_kernel,
        })
    }

    /// Boots `contender` nested with `forwards` and waits until it serves; `app` is our image
    /// (for [`Contender::Tandem`]) and `serving` the line our app prints once it serves.
    fn boot(
        &self,
        contender: Contender,
        app: &Path,
        serving: &str,
        forwards: &[HostForward],
    ) -> Result<NestedGuest> {
        let started = Instant::now();
        let label = format!("bench openvmm {}", contender.name());
        let initramfs = l1_initramfs_path(&label)?;
        let (payload, args) = match contender {
            Contender::Tandem => {
                let spec = GuestSpec {
                    app: app.to_path_buf(),
                    cmdline: "log=info".to_string(),
                    memory: TANDEM_MEMORY.to_string(),
                    paths: NetPaths::Virtio,
                    forwards: forwards.to_vec(),
                    l1_tap_ping: false,
                };
                let image = std::fs::read(app)
                    .map_err(|error| Error::io(format!("reading {}", app.display()), error))?;
                let payload = L1Payload {
                    files: vec![(nested::L1_APP_PATH.to_string(), image)],
                    tap_ping: false,
                };
                (payload, crate::openvmm_run::nested_openvmm_args(&spec))
            }
            Contender::Linux => {
                let config = VmConfig {
                    kernel: linux_guest::L1_KERNEL_PATH.into(),
                    cmdline: linux_guest::CMDLINE.to_string(),
                    memory: linux_guest::MEMORY.to_string(),
                    processors: 1,
                    paths: NetPaths::Virtio,
                    forwards: forwards.to_vec(),
                    listen_on_all_addresses: true,
                    synthetic_tap: None,
                    initrd: Some(linux_guest::L1_INITRD_PATH.into()),
                };
                let payload = L1Payload {
                    files: vec![
                        (
                            linux_guest::L1_KERNEL_PATH.to_string(),
                            self.linux_kernel.clone(),
                        ),
                        (
                            linux_guest::L1_INITRD_PATH.to_string(),
                            self.linux_initrd.clone(),
                        ),
                    ],
                    tap_ping: false,
                };
                (payload, openvmm::openvmm_args(&config))
            }
        };
        nested::build_initramfs(
            &self.assets,
            &self.openvmm_binary,
            &payload,
            &args,
            &initramfs,
        )?;
        let mut guest = NestedGuest::boot(&label, &self.assets, initramfs, forwards, false)?;
        let needle = match contender {
            Contender::Tandem => serving.to_string(),
            Contender::Linux => format!("{} {}", linux_guest::LINUX_MARKER, linux_guest::SERVING),
        };
        let waited = guest.wait_for_line(&needle, BOOT_TIMEOUT);
        let lines = guest.l1.serial_lines();
        if let Some(failure) = linux_guest::failure(&lines) {
            return Err(Error::Environment(format!(
                "the Linux guest failed: {failure}\n{}",
                guest.l1.diagnostics()
            )));
        }
        if let Err(error) = waited {
            return Err(match error {
                Error::Environment(reason) => Error::Environment(reason),
                other => Error::Environment(format!(
                    "{} did not serve under nested OpenVMM: {other}\n{}",
                    contender.name(),
                    guest.l1.diagnostics()
                )),
            });
        }
        // The app may serve before its lease arrives (the QEMU benches wait the same way).
        let leased = |lines: &[String]| lines.iter().any(|line| line.contains(DHCP_LEASE_LINE));
        if contender == Contender::Tandem && !leased(&guest.l1.serial_lines()) {
            guest.wait_for_line(DHCP_LEASE_LINE, BOOT_TIMEOUT)?;
        }
        eprintln!(
            "xtask: bench: {} serving {:.1} s after L1 started (L1 boot under TCG, KVM, \
             OpenVMM, guest boot, DHCP)",
            contender.name(),
            started.elapsed().as_secs_f64()
        );
        Ok(guest)
    }
}

/// The forwards both guests get for `guest_port`: TCP (and UDP when asked) from one free port.
fn forwards_for(guest_port: u16, udp: bool) -> Result<Vec<HostForward>> {
    let host_port = free_port()?;
    let mut forwards = vec![HostForward {
        protocol: Protocol::Tcp,
        host_port,
        guest_port,
    }];
    if udp {
        forwards.push(HostForward {
            protocol: Protocol::Udp,
            host_port,
            guest_port,
        });
    }
    Ok(forwards)
}

/// `a / b` as a ratio column, `-` when `b` is not positive.
fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 && a.is_finite() {
        format!("{:.2}x", a / b)
    } else {
        "-".to_string()
    }
}

/// One measurement for both guests: the name, the unit, every run's value per guest.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    /// What was measured.
    pub name: String,
    /// Tandem's values, one per run.
    pub tandem: Vec<f64>,
    /// The Linux guest's values, one per run.
    pub linux: Vec<f64>,
    /// Runs that failed (Tandem, Linux): left out of the medians, counted in the table.
    pub failed: (usize, usize),
}

impl Row {
    fn new(name: impl Into<String>) -> Row {
        Row {
            name: name.into(),
            tandem: Vec::new(),
            linux: Vec::new(),
            failed: (0, 0),
        }
    }

    /// Records one run of `contender`: its value, or (logged) that it failed.
    fn record(&mut self, contender: Contender, run: Result<f64>) {
        match (run, contender) {
            (Ok(value), Contender::Tandem) => self.tandem.push(value),
            (Ok(value), Contender::Linux) => self.linux.push(value),
            (Err(error), _) => {
                eprintln!(
                    "xtask: bench: {} {}: run FAILED (left out of the median): {error}",
                    contender.name(),
                    self.name
                );
                match contender {
                    Contender::Tandem => self.failed.0 += 1,
                    Contender::Linux => self.failed.1 += 1,
                }
            }
        }
    }
}

/// The table: medians of each row for both guests and Tandem's as a multiple of Linux's.
pub fn format_table(title: &str, rows: &[Row]) -> String {
    let mut text = format!("--- {title} ---\n");
    text.push_str(&format!(
        "{:<36} {:>12} {:>12} {:>14} {:>12}\n",
        "measurement", "Tandem", "Linux 6.1", "Tandem/Linux", "failed T/L"
    ));
    for row in rows {
        let tandem = median(&row.tandem).unwrap_or(f64::NAN);
        let linux = median(&row.linux).unwrap_or(f64::NAN);
        let precision = if tandem.abs() < 100.0 { 2 } else { 0 };
        text.push_str(&format!(
            "{:<36} {tandem:>12.precision$} {linux:>12.precision$} {:>14} {:>12}\n",
            row.name,
            ratio(tandem, linux),
            format!("{}/{}", row.failed.0, row.failed.1)
        ));
    }
    text
}

/// One iperf3 client run against 127.0.0.1:`port`: the receiver's Mbit/s.
fn iperf_run(port: u16, direction: Direction) -> Result<f64> {
    let args = bench_client_args(direction, 1);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let timeout = Duration::from_secs(u64::from(IPERF_SECONDS + crate::bench_iperf::OMIT_SECONDS))
        + CLIENT_GRACE;
    let outcome = run_client(Ipv4Addr::LOCALHOST, port, &args, timeout)?;
    let summary = parse_json_summary(&outcome.stdout).map_err(|error| {
        Error::io(
            format!("{error}\n{outcome}"),
            std::io::Error::from(std::io::ErrorKind::InvalidData),
        )
    })?;
    Ok(summary.received_bits_per_second / 1e6)
}

/// After a guest's runs: if any failed, the last console lines (guest and OpenVMM) on stderr.
fn console_tail_on_failure(guest: &NestedGuest, rows: &[Row]) {
    if rows.iter().all(|row| row.failed == (0, 0)) {
        return;
    }
    let lines = guest.l1.serial_lines();
    eprintln!("xtask: bench: the last console lines of L1 after the failed run(s):");
    for line in &lines[lines.len().saturating_sub(25)..] {
        eprintln!("  {line}");
    }
}

/// Prints where the time went and the phase's start.
fn phase(name: &str, started: Instant) {
    eprintln!(
        "xtask: bench: {name} took {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// `cargo xtask bench iperf --vmm openvmm`: the host's `iperf3` against each guest, in (host
/// → guest) and out (`-R`), one stream, `runs` runs each.
pub fn iperf_benchmark(runs: usize) -> Result<()> {
    let started = Instant::now();
    let app = build_app("iperf", Profile::Release)?;
    let bench = Bench::prepare()?;
    let forwards = forwards_for(linux_guest::IPERF_PORT, false)?;
    let port = forwards[0].host_port;
    let mut rows: Vec<Row> = [Direction::In, Direction::Out]
        .map(|direction| {
            Row::new(format!(
                "iperf3 {} Mbit/s ({})",
                direction.name(),
                match direction {
                    Direction::In => "host -> guest",
                    Direction::Out => "guest -> host, -R",
                }
            ))
        })
        .to_vec();
    for contender in [Contender::Tandem, Contender::Linux] {
        let boot = Instant::now();
        let guest = bench.boot(contender, &app, crate::bench_iperf::SERVING_LINE, &forwards)?;
        phase(&format!("booting {}", contender.name()), boot);
        let measuring = Instant::now();
        for (row, direction) in rows.iter_mut().zip([Direction::In, Direction::Out]) {
            for run in 1..=runs {
                // Both NATs and the iperf3 servers settle the previous test's connections.
                std::thread::sleep(PAUSE_BETWEEN_RUNS);
                let mbits = iperf_run(port, direction);
                if let Ok(mbits) = &mbits {
                    eprintln!(
                        "xtask: {} iperf3 {} run {run}/{runs}: {mbits:.2} Mbit/s",
                        contender.name(),
                        direction.name()
                    );
                }
                row.record(contender, mbits);
            }
        }
        phase(&format!("measuring {}", contender.name()), measuring);
        console_tail_on_failure(&guest, &rows);
    }
    println!(
        "{}",
        format_table(
            &format!(
                "bench iperf --vmm openvmm (nested: QEMU/TCG L1 -> KVM -> OpenVMM; netvsc on \
                 consomme; median of {runs} runs, iperf3 -t {IPERF_SECONDS} -O {} -J, 1 stream)",
                crate::bench_iperf::OMIT_SECONDS
            ),
            &rows
        )
    );
    println!(
        "Both guests: 1 vCPU, the same L1 and OpenVMM; Tandem -m {TANDEM_MEMORY}, Linux -m {}. \
         Traffic: host 127.0.0.1:{port} -> QEMU user net -> L1 -> consomme -> guest port {}. \
         Whole bench: {:.0} s.",
        linux_guest::MEMORY,
        linux_guest::IPERF_PORT,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// `cargo xtask bench echo --vmm openvmm`: 1-byte TCP and UDP round trips and a bulk TCP
/// echo against each guest, `runs` times each.
pub fn echo_benchmark(runs: usize) -> Result<()> {
    let started = Instant::now();
    let app = build_app("echo", Profile::Release)?;
    let bench = Bench::prepare()?;
    let forwards = forwards_for(linux_guest::ECHO_PORT, true)?;
    let address = SocketAddr::from((Ipv4Addr::LOCALHOST, forwards[0].host_port));
    let mut rows: Vec<Row> = [
        "TCP 1-byte echo round trips/s".to_string(),
        "UDP 1-byte echo round trips/s".to_string(),
        format!("TCP bulk echo MB/s ({} MiB)", BULK_BYTES >> 20),
    ]
    .map(Row::new)
    .to_vec();
    for contender in [Contender::Tandem, Contender::Linux] {
        let boot = Instant::now();
        let guest = bench.boot(contender, &app, "echo: serving", &forwards)?;
        phase(&format!("booting {}", contender.name()), boot);
        let measuring = Instant::now();
        // Warm-up: the first connection through both NATs sets up their flows.
        if let Err(error) = tcp_round_trips(address, Duration::from_millis(500)) {
            eprintln!("xtask: bench: {} warm-up failed: {error}", contender.name());
        }
        for run in 1..=runs {
            std::thread::sleep(PAUSE_BETWEEN_RUNS);
            let tcp = tcp_round_trips(address, ROUND_TRIP_WINDOW);
            let udp = udp_round_trips(Ipv4Addr::LOCALHOST, address, false, ROUND_TRIP_WINDOW);
            let bulk = bulk_throughput(address, BULK_BYTES);
            let shown = |value: &Result<f64>| match value {
                Ok(value) => format!("{value:.2}"),
                Err(_) => "failed".to_string(),
            };
            let lost = udp.as_ref().map_or(0, |(_, lost)| *lost);
            let udp = udp.map(|(rate, _)| rate);
            eprintln!(
                "xtask: {} echo run {run}/{runs}: TCP {} round trips/s, UDP {} round trips/s \
                 ({lost} lost), bulk {} MB/s",
                contender.name(),
                shown(&tcp),
                shown(&udp),
                shown(&bulk)
            );
            for (row, value) in rows.iter_mut().zip([tcp, udp, bulk]) {
                row.record(contender, value);
            }
        }
        phase(&format!("measuring {}", contender.name()), measuring);
        console_tail_on_failure(&guest, &rows);
    }
    println!(
        "{}",
        format_table(
            &format!(
                "bench echo --vmm openvmm (nested: QEMU/TCG L1 -> KVM -> OpenVMM; netvsc on \
                 consomme; median of {runs} runs)"
            ),
            &rows
        )
    );
    println!(
        "Each run: {} s of 1-byte TCP round trips, {} s of 1-byte UDP round trips (unconnected \
         socket: consomme answers from another port), {} MiB streamed through TCP. Servers: \
         Tandem's echo app; socat (TCP-LISTEN,fork PIPE and UDP-LISTEN,fork PIPE) on Linux. \
         Whole bench: {:.0} s.",
        ROUND_TRIP_WINDOW.as_secs(),
        ROUND_TRIP_WINDOW.as_secs(),
        BULK_BYTES >> 20,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_shows_both_guests_medians_and_the_ratio() {
        let mut throughput = Row::new("iperf3 in Mbit/s");
        throughput.tandem = vec![12.0, 30.0, 20.0];
        throughput.linux = vec![10.0, 8.0, 9.0];
        throughput.record(Contender::Linux, Err(Error::Usage("stalled".to_string())));
        let mut round_trips = Row::new("TCP 1-byte echo round trips/s");
        round_trips.record(Contender::Tandem, Ok(400.0));
        round_trips.record(Contender::Linux, Ok(0.0));
        let rows = [throughput, round_trips];
        let table = format_table("bench", &rows);
        let words = |start: &str| -> Vec<String> {
            table
                .lines()
                .find(|line| line.starts_with(start))
                .unwrap_or_else(|| panic!("no {start} row in\n{table}"))
                .split_whitespace()
                .rev()
                .take(4)
                .map(str::to_string)
                .collect()
        };
        assert_eq!(words("iperf3 in"), ["0/1", "2.22x", "9.00", "20.00"]);
        assert_eq!(words("TCP 1-byte"), ["0/0", "-", "0", "400"]);
        assert!(table.starts_with("--- bench ---\n"));
    }

    #[test]
    fn echo_forwards_carry_tcp_and_udp_on_one_port() {
        let forwards = forwards_for(7, true).unwrap();
        assert_eq!(forwards.len(), 2);
        assert_eq!(forwards[0].host_port, forwards[1].host_port);
        assert_eq!(forwards[1].protocol, Protocol::Udp);
        assert!(forwards.iter().all(|forward| forward.guest_port == 7));
        assert_eq!(forwards_for(5201, false).unwrap().len(), 1);
    }
}
