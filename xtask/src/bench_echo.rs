//! `cargo xtask bench echo`: 1-byte TCP and UDP round trips per second and bulk TCP throughput
//! through the `echo` app under TCG, over virtio-net, the igbvf VF alone, or both bonded.
//!
//! The bench needs root: it creates a network namespace (`tandem-bench-echo-<pid>`) holding
//! bridge `br0` (10.77.1.1/24) and the guest's tap(s), then re-runs itself inside it with `ip
//! netns exec`, so QEMU and the client sockets live there. Nothing outside the namespace is
//! touched, and the namespace is deleted afterwards.

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::accel::Accel;
use crate::bench::median;
use crate::bench_namespace::{BenchNamespace, require_root};
use crate::error::{Error, Result};
use crate::image::{Profile, build_app};
use crate::machine::{LAB_PF_CMDLINE, Machine, NetBackend, NetPaths};
use crate::qemu::{Qemu, QemuBuilder};
use crate::vf::lab_command;

/// Runs when no `--runs` is given.
pub const DEFAULT_RUNS: usize = 3;
/// How long each round-trip measurement lasts.
pub const ROUND_TRIP_WINDOW: Duration = Duration::from_secs(3);
/// Bytes the bulk client streams through the echo.
pub const BULK_BYTES: usize = 32 << 20;
/// 1-byte echo round trips per second of a Linux 6.1 guest on the same QEMU over virtio-net.
pub const LINUX_VIRTIO_ROUND_TRIPS: f64 = 3700.0;
/// 1-byte echo round trips per second of a Linux 6.1 guest on the same QEMU over igbvf.
pub const LINUX_IGBVF_ROUND_TRIPS: f64 = 2400.0;

/// The echo port.
const ECHO_PORT: u16 = 7;
/// What the app prints once it serves.
const SERVING_LINE: &str = "echo: serving TCP and UDP on port 7";
/// What the kernel prints once the link is up and the guest's addresses were announced.
const ANNOUNCED_LINE: &str = "net: announced";
/// Environment variable that carries the echo image to the copy of the bench running inside
/// the namespace (its presence means "you are inside").
const INSIDE_ENV: &str = "TANDEM_BENCH_ECHO_IMAGE";
/// The bench namespace's bridge address (the host side).
const BENCH_HOST: Ipv4Addr = Ipv4Addr::new(10, 77, 1, 1);
/// The guest's address in the bench namespace.
const BENCH_GUEST: Ipv4Addr = Ipv4Addr::new(10, 77, 1, 2);
/// The bench namespace's taps: the first for the only NIC (or virtio-net), the second for the
/// igb PF when both paths are there.
const BENCH_TAPS: [&str; 2] = ["tap0", "tap1"];
/// Time the guest gets to boot under TCG.
const BOOT_TIMEOUT: Duration = Duration::from_secs(240);
/// Time the bond gets to make the VF active when both paths are there.
const VF_ACTIVE_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest a single TCP read or write may block before the run fails.
const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a UDP round trip may take before it counts as lost.
const UDP_LOSS_TIMEOUT: Duration = Duration::from_millis(200);
/// Time a lab command may take to be answered.
const LAB_TIMEOUT: Duration = Duration::from_secs(30);

/// What one boot of the echo app measured.
#[derive(Clone, Debug, PartialEq)]
pub struct EchoSample {
    /// 1-byte TCP round trips per second (one client, one byte in flight).
    pub tcp_round_trips: f64,
    /// 1-byte UDP round trips per second (one datagram in flight).
    pub udp_round_trips: f64,
    /// UDP round trips that timed out.
    pub udp_lost: u64,
    /// Echoed bytes per second (10^6) of one TCP client streaming while reading.
    pub bulk_megabytes: f64,
    /// The path that carried the traffic, as the bench names it (see [`path_name`]).
    pub path: &'static str,
}

/// Which path carried the traffic, from `paths` and the guest's `active=` value (`None`
/// without a lab channel, i.e. virtio-net alone).
pub fn path_name(paths: NetPaths, active: Option<&str>) -> &'static str {
    match (paths, active) {
        (NetPaths::Virtio, _) => "virtio-net",
        // With no synthetic NIC the VF takes the bond's primary ("synthetic") slot.
        (NetPaths::Vf, _) => "igbvf",
        (NetPaths::Both, Some("Vf")) => "igbvf",
        (NetPaths::Both, _) => "virtio-net",
    }
}

/// The Linux 6.1 guest's 1-byte echo round trips per second over the path named `path`.
pub fn linux_round_trips(path: &str) -> f64 {
    if path == "igbvf" {
        LINUX_IGBVF_ROUND_TRIPS
    } else {
        LINUX_VIRTIO_ROUND_TRIPS
    }
}

/// The `active=` value of a `stats` answer.
pub fn active_from_stats(answer: &str) -> Option<&str> {
    answer
        .split_whitespace()
        .find_map(|word| word.strip_prefix("active="))
}

/// The taps `paths` needs.
fn taps_for(paths: NetPaths) -> &'static [&'static str] {
    match paths {
        NetPaths::Virtio | NetPaths::Vf => &BENCH_TAPS[..1],
        NetPaths::Both => &BENCH_TAPS,
    }
}

/// The words of `--paths`.
fn paths_word(paths: NetPaths) -> &'static str {
    match paths {
        NetPaths::Virtio => "virtio",
        NetPaths::Vf => "vf",
        NetPaths::Both => "both",
    }
}

/// `cargo xtask bench echo [--paths virtio|vf|both] [--runs N]`: builds the echo image,
/// creates the namespace, measures inside it, prints the table, removes the namespace.
pub fn echo_benchmark(paths: NetPaths, runs: usize) -> Result<()> {
    if let Some(elf) = std::env::var_os(INSIDE_ENV) {
        return measure(Path::new(&elf), paths, runs);
    }
    require_root("echo")?;
    let elf = build_app("echo", Profile::Release)?;
    let taps = taps_for(paths);
    let namespace = BenchNamespace::create("tandem-bench-echo-", BENCH_HOST, 24, taps)?;
    let runs_text = runs.to_string();
    let args = [
        "bench",
        "echo",
        "--paths",
        paths_word(paths),
        "--runs",
        &runs_text,
    ];
    eprintln!(
        "xtask: namespace {} (br0 {BENCH_HOST}/24, taps {})",
        namespace.name,
        taps.join(" + ")
    );
    namespace.run_xtask_inside(&args, INSIDE_ENV, &elf)
}

/// The echo guest of one run, with its lab channel socket (if any) removed on drop.
struct Guest {
    qemu: Qemu,
    lab_socket: Option<PathBuf>,
}

impl Drop for Guest {
    fn drop(&mut self) {
        self.qemu.kill();
        if let Some(socket) = &self.lab_socket {
            let _ = std::fs::remove_file(socket);
        }
    }
}

impl Guest {
    /// Boots the echo app on the namespace's tap(s) with the NICs `paths` asks for, and waits
    /// until it serves with its link up.
    fn boot(elf: &Path, paths: NetPaths, run: usize) -> Result<Guest> {
        let mut machine = Machine::new(Accel::Tcg);
        machine.add_network(paths, &NetBackend::Tap(taps_for(paths).join(",")), &[])?;
        let mut cmdline = format!("log=info ip={BENCH_GUEST}/24 gw={BENCH_HOST}");
        let label = format!("bench echo #{run}");
        let mut builder = QemuBuilder::new(&label, Accel::Tcg).echo(false).kernel(elf);
        for netdev in &machine.netdevs {
            builder = builder.netdev(netdev);
        }
        for device in &machine.devices {
            builder = builder.device(device);
        }
        let lab_socket = machine.lab_pf.then(|| {
            std::env::temp_dir().join(format!(
                "tandem-bench-echo-{}-{run}.lab",
                std::process::id()
            ))
        });
        if let Some(socket) = &lab_socket {
            let _ = std::fs::remove_file(socket);
            cmdline.push(' ');
            cmdline.push_str(LAB_PF_CMDLINE);
            builder = builder
                .arg("-chardev")
                .arg(format!(
                    "socket,id=lab,path={},server=on,wait=off",
                    socket.display()
                ))
                .arg("-device")
                .arg("isa-serial,chardev=lab");
        }
        let mut guest = Guest {
            qemu: builder.cmdline(cmdline).spawn()?,
            lab_socket,
        };
        guest.qemu.wait_for_line(SERVING_LINE, BOOT_TIMEOUT)?;
        let announced = |qemu: &Qemu| {
            qemu.serial_lines()
                .iter()
                .any(|line| line.contains(ANNOUNCED_LINE))
        };
        if !announced(&guest.qemu) {
            guest.qemu.wait_for_line(ANNOUNCED_LINE, BOOT_TIMEOUT)?;
        }
        Ok(guest)
    }

    /// The guest's `stats` answer, if it has a lab channel.
    fn stats(&self) -> Result<Option<String>> {
        self.lab_socket
            .as_deref()
            .map(|socket| lab_command(socket, "stats", LAB_TIMEOUT))
            .transpose()
    }

    /// With both paths: waits until the bond has made the VF active (it prefers the VF once
    /// its link is up and stable); false if it did not within [`VF_ACTIVE_TIMEOUT`].
    fn wait_for_vf_active(&self) -> Result<bool> {
        let deadline = Instant::now() + VF_ACTIVE_TIMEOUT;
        loop {
            let answer = self.stats()?.unwrap_or_default();
            if active_from_stats(&answer) == Some("Vf") {
                return Ok(true);
            }
            if Instant::now() >= deadline {
                return Ok(false);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

fn echo_address() -> SocketAddr {
    SocketAddr::from((BENCH_GUEST, ECHO_PORT))
}

fn io_error(what: &str) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |error| Error::io(what, error)
}

fn connect(address: SocketAddr) -> Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&address, IO_TIMEOUT)
        .map_err(io_error("connecting to the echo port"))?;
    stream
        .set_nodelay(true)
        .map_err(io_error("setting TCP_NODELAY"))?;
    stream
        .set_read_timeout(Some(IO_TIMEOUT))
        .map_err(io_error("setting a read timeout"))?;
    stream
        .set_write_timeout(Some(IO_TIMEOUT))
        .map_err(io_error("setting a write timeout"))?;
    Ok(stream)
}

/// One TCP client of the echo server at `address` sends one byte, waits for its echo, and
/// repeats for `window`; returns round trips per second.
pub fn tcp_round_trips(address: SocketAddr, window: Duration) -> Result<f64> {
    let mut stream = connect(address)?;
    let mut byte = [0u8; 1];
    let mut count = 0u64;
    let started = Instant::now();
    while started.elapsed() < window {
        let sent = [count as u8];
        stream
            .write_all(&sent)
            .map_err(io_error("TCP round trip: writing a byte"))?;
        stream
            .read_exact(&mut byte)
            .map_err(io_error("TCP round trip: reading the echo"))?;
        if byte != sent {
            return Err(invalid(format!(
                "TCP round trip {count}: sent {:#04x}, got {:#04x} back",
                sent[0], byte[0]
            )));
        }
        count += 1;
    }
    Ok(count as f64 / started.elapsed().as_secs_f64())
}

fn invalid(message: String) -> Error {
    Error::io(message, std::io::Error::from(ErrorKind::InvalidData))
}

/// One UDP socket bound on `local` sends a 1-byte datagram to `address`, waits for its echo,
/// and repeats for `window`; returns round trips per second and how many timed out. A
/// `connected` socket takes echoes from `address` only; an unconnected one from anywhere
/// (consomme's `hostfwd=udp` answers from another port, see docs/openvmm.md).
pub fn udp_round_trips(
    local: Ipv4Addr,
    address: SocketAddr,
    connected: bool,
    window: Duration,
) -> Result<(f64, u64)> {
    let socket = UdpSocket::bind((local, 0)).map_err(io_error("binding a UDP socket"))?;
    if connected {
        socket
            .connect(address)
            .map_err(io_error("connecting the UDP socket"))?;
    }
    socket
        .set_read_timeout(Some(UDP_LOSS_TIMEOUT))
        .map_err(io_error("setting a read timeout"))?;
    let mut buffer = [0u8; 16];
    let (mut echoed, mut lost) = (0u64, 0u64);
    let started = Instant::now();
    let mut sequence = 0u8;
    while started.elapsed() < window {
        sequence = sequence.wrapping_add(1);
        let sent = if connected {
            socket.send(&[sequence])
        } else {
            socket.send_to(&[sequence], address)
        };
        sent.map_err(io_error("UDP round trip: sending"))?;
        // Skip late echoes of earlier (timed-out) datagrams until ours or the timeout.
        let answered = loop {
            match socket.recv(&mut buffer) {
                Ok(1) if buffer[0] == sequence => break true,
                Ok(_) => continue,
                Err(error)
                    if matches!(error.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) =>
                {
                    break false;
                }
                Err(error) => return Err(Error::io("UDP round trip: receiving", error)),
            }
        };
        if answered {
            echoed += 1;
        } else {
            lost += 1;
        }
    }
    Ok((echoed as f64 / started.elapsed().as_secs_f64(), lost))
}

/// The byte at `offset` of the bulk stream (a pattern with a long period, so a misplaced
/// chunk shows).
fn bulk_byte(offset: usize) -> u8 {
    (offset % 251) as u8 ^ (offset >> 16) as u8
}

/// One TCP client of the echo server at `address` streams `bytes` while reading the echo
/// concurrently; returns echoed megabytes (10^6 bytes) per second, from the first write to
/// the end of the echo.
pub fn bulk_throughput(address: SocketAddr, bytes: usize) -> Result<f64> {
    let mut reader = connect(address)?;
    let mut writer = reader
        .try_clone()
        .map_err(io_error("cloning the bulk socket"))?;
    let started = Instant::now();
    let sending = std::thread::spawn(move || -> std::io::Result<()> {
        let mut chunk = vec![0u8; 64 * 1024];
        let mut sent = 0;
        while sent < bytes {
            let len = chunk.len().min(bytes - sent);
            for (index, byte) in chunk[..len].iter_mut().enumerate() {
                *byte = bulk_byte(sent + index);
            }
            writer.write_all(&chunk[..len])?;
            sent += len;
        }
        writer.shutdown(Shutdown::Write)
    });
    let mut buffer = vec![0u8; 256 * 1024];
    let mut received = 0usize;
    let read_result = loop {
        match reader.read(&mut buffer) {
            Ok(0) => break Ok(()),
            Ok(count) => {
                if let Some(index) = (0..count).find(|&i| buffer[i] != bulk_byte(received + i)) {
                    break Err(invalid(format!(
                        "bulk echo: byte {} differs from the byte sent",
                        received + index
                    )));
                }
                received += count;
            }
            Err(error) if error.kind() == ErrorKind::Interrupted => {}
            Err(error) => {
                break Err(Error::io(
                    format!("bulk echo: reading after {received} of {bytes} bytes"),
                    error,
                ));
            }
        }
    };
    let elapsed = started.elapsed();
    let sent = sending
        .join()
        .map_err(|_| invalid("bulk echo: the writer thread panicked".to_string()))?;
    read_result?;
    sent.map_err(io_error("bulk echo: writing"))?;
    if received != bytes {
        return Err(invalid(format!(
            "bulk echo: {received} of {bytes} bytes came back before end of stream"
        )));
    }
    Ok(bytes as f64 / elapsed.as_secs_f64() / 1e6)
}

/// Boots the echo app once and takes every measurement.
fn measure_once(elf: &Path, paths: NetPaths, run: usize) -> Result<EchoSample> {
    let guest = Guest::boot(elf, paths, run)?;
    if paths == NetPaths::Both && !guest.wait_for_vf_active()? {
        eprintln!(
            "xtask: run {run}: the bond did not make the VF active within {} s; measuring \
             whatever path is active",
            VF_ACTIVE_TIMEOUT.as_secs()
        );
    }
    let with_context = |error: Error| match error {
        Error::Io { context, source } => {
            Error::io(format!("{context}\n{}", guest.qemu.diagnostics()), source)
        }
        other => other,
    };
    // Warm-up: resolves both sides' neighbour entries and wakes the guest's paths.
    let address = echo_address();
    tcp_round_trips(address, Duration::from_millis(200)).map_err(with_context)?;
    let tcp_round_trips = tcp_round_trips(address, ROUND_TRIP_WINDOW).map_err(with_context)?;
    let (udp_round_trips, udp_lost) =
        udp_round_trips(BENCH_HOST, address, true, ROUND_TRIP_WINDOW).map_err(with_context)?;
    let bulk_megabytes = bulk_throughput(address, BULK_BYTES).map_err(with_context)?;
    let stats = guest.stats()?;
    let path = path_name(paths, stats.as_deref().and_then(active_from_stats));
    Ok(EchoSample {
        tcp_round_trips,
        udp_round_trips,
        udp_lost,
        bulk_megabytes,
        path,
    })
}

/// The summary table: medians of `samples` and, for round trips, the ratio to the Linux
/// guest over the same path.
pub fn summary_table(paths: NetPaths, samples: &[EchoSample]) -> String {
    let column = |pick: fn(&EchoSample) -> f64| {
        median(&samples.iter().map(pick).collect::<Vec<_>>()).unwrap_or(f64::NAN)
    };
    // The path the median run would have used: all runs use the same one unless the bond
    // misbehaved, which the per-run lines show.
    let path = samples.first().map_or("virtio-net", |sample| sample.path);
    let linux = linux_round_trips(path);
    let tcp = column(|sample| sample.tcp_round_trips);
    let udp = column(|sample| sample.udp_round_trips);
    let bulk = column(|sample| sample.bulk_megabytes);
    let mut table = format!(
        "--- bench echo (TCG, --paths {}, traffic on {path}, median of {} runs) ---\n",
        paths_word(paths),
        samples.len()
    );
    table.push_str(&format!(
        "{:<34} {:>10} {:>18} {:>10}\n",
        "measurement", "median", "Linux 6.1 guest", "ratio"
    ));
    for (name, value) in [
        ("TCP 1-byte echo round trips/s", tcp),
        ("UDP 1-byte echo round trips/s", udp),
    ] {
        table.push_str(&format!(
            "{name:<34} {value:>10.0} {linux:>18.0} {:>9.2}x\n",
            value / linux
        ));
    }
    table.push_str(&format!(
        "{:<34} {bulk:>10.1} {:>18} {:>10}\n",
        format!("TCP bulk echo MB/s ({} MiB)", BULK_BYTES >> 20),
        "-",
        "-"
    ));
    table.push_str(&format!(
        "Linux 6.1 guest on the same QEMU: {LINUX_VIRTIO_ROUND_TRIPS:.0} (virtio-net) / \
         {LINUX_IGBVF_ROUND_TRIPS:.0} (igbvf) 1-byte echo round trips/s; the targets are 2x \
         those: {:.0} / {:.0}",
        LINUX_VIRTIO_ROUND_TRIPS * 2.0,
        LINUX_IGBVF_ROUND_TRIPS * 2.0
    ));
    table
}

/// Inside the namespace: `runs` boots, each measured, then the table.
fn measure(elf: &Path, paths: NetPaths, runs: usize) -> Result<()> {
    println!(
        "bench echo: --paths {}, {runs} runs of the release echo image under TCG; one client \
         per measurement ({} s of 1-byte TCP round trips, {} s of 1-byte UDP round trips, \
         {} MiB streamed through TCP)",
        paths_word(paths),
        ROUND_TRIP_WINDOW.as_secs(),
        ROUND_TRIP_WINDOW.as_secs(),
        BULK_BYTES >> 20
    );
    let mut samples = Vec::new();
    for run in 1..=runs {
        let sample = measure_once(elf, paths, run)?;
        println!(
            "run {run}: TCP {:.0} round trips/s, UDP {:.0} round trips/s ({} lost), bulk {:.1} \
             MB/s, traffic on {}",
            sample.tcp_round_trips,
            sample.udp_round_trips,
            sample.udp_lost,
            sample.bulk_megabytes,
            sample.path
        );
        samples.push(sample);
    }
    println!("{}", summary_table(paths, &samples));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(tcp: f64, udp: f64, bulk: f64, path: &'static str) -> EchoSample {
        EchoSample {
            tcp_round_trips: tcp,
            udp_round_trips: udp,
            udp_lost: 0,
            bulk_megabytes: bulk,
            path,
        }
    }

    #[test]
    fn the_path_that_carried_the_traffic_picks_the_linux_baseline() {
        assert_eq!(path_name(NetPaths::Virtio, None), "virtio-net");
        assert_eq!(path_name(NetPaths::Vf, Some("Synthetic")), "igbvf");
        assert_eq!(path_name(NetPaths::Both, Some("Vf")), "igbvf");
        assert_eq!(path_name(NetPaths::Both, Some("Synthetic")), "virtio-net");
        assert_eq!(linux_round_trips("igbvf"), 2400.0);
        assert_eq!(linux_round_trips("virtio-net"), 3700.0);
    }

    #[test]
    fn active_path_is_read_from_a_stats_answer() {
        assert_eq!(
            active_from_stats("ok active=Vf rx_frames=3 tx_frames=4"),
            Some("Vf")
        );
        assert_eq!(active_from_stats("error unknown command"), None);
    }

    #[test]
    fn table_shows_medians_and_ratios_to_the_linux_guest() {
        let samples = [
            sample(4800.0, 6000.0, 20.0, "igbvf"),
            sample(5000.0, 6400.0, 21.0, "igbvf"),
            sample(9000.0, 6200.0, 19.0, "igbvf"),
        ];
        let table = summary_table(NetPaths::Vf, &samples);
        let row = |name: &str| {
            table
                .lines()
                .find(|line| line.starts_with(name))
                .unwrap_or_else(|| panic!("no `{name}` row in\n{table}"))
                .split_whitespace()
                .rev()
                .take(3)
                .collect::<Vec<_>>()
        };
        assert_eq!(row("TCP 1-byte"), ["2.08x", "2400", "5000"]);
        assert_eq!(row("UDP 1-byte"), ["2.58x", "2400", "6200"]);
        assert_eq!(row("TCP bulk"), ["-", "-", "20.0"]);
        assert!(table.contains("--paths vf, traffic on igbvf, median of 3 runs"));
    }

    #[test]
    fn taps_follow_the_paths() {
        assert_eq!(taps_for(NetPaths::Virtio), ["tap0"]);
        assert_eq!(taps_for(NetPaths::Vf), ["tap0"]);
        assert_eq!(taps_for(NetPaths::Both), ["tap0", "tap1"]);
    }

    #[test]
    fn the_bulk_pattern_does_not_repeat_every_chunk() {
        let chunk = 64 * 1024;
        assert_ne!(
            (0..chunk).map(bulk_byte).collect::<Vec<_>>(),
            (chunk..2 * chunk).map(bulk_byte).collect::<Vec<_>>()
        );
    }
}
