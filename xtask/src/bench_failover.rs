//! `cargo xtask bench failover`: how long echoed data stops, and what the host's TCP retransmits,
//! each time the VF leaves and comes back; also the streaming echo client, lab-channel helpers
//! and VF triggers that the failover integration tests use.
//!
//! The bench needs root: it creates a network namespace (`tandem-bench-failover-<pid>`) holding
//! bridge `br0` (10.77.1.1/24) and two taps, the virtio-net NIC on one and the igb PF (whose VF
//! the guest creates) on the other, then re-runs itself inside the namespace with `ip netns
//! exec` so that QEMU, the client sockets and `ss` all live there. Nothing outside the
//! namespace is touched, and the namespace is deleted afterwards.

use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::accel::{self, Accel};
use crate::bench::median;
use crate::bench_namespace::{BenchNamespace, require_root};
use crate::error::{Error, Result};
use crate::image::{Profile, build_app};
use crate::machine::{igb_pf_device, tap_netdev, virtio_net_device};
use crate::qemu::{Qemu, QemuBuilder};
use crate::vf::{lab_command, pf_device_add_arguments};

/// The echo app's port.
pub const ECHO_PORT: u16 = 7;
/// What the echo app prints once it serves.
pub const SERVING_LINE: &str = "echo: serving TCP and UDP on port 7";
/// The README's target for the longest stop of received data around a switch.
pub const TARGET_GAP: Duration = Duration::from_millis(20);
/// The README's target for bytes lost across a switch.
pub const TARGET_LOST_BYTES: u64 = 0;
/// Cycles per trigger when `--cycles` is not given.
pub const DEFAULT_CYCLES: usize = 5;
/// The id QEMU gives the virtio-net device ([`virtio_net_device`]), for QMP `set_link`.
pub const VIRTIO_DEVICE_ID: &str = "virtio0";
/// The id of the igb PF device ([`igb_pf_device`]), for QMP `device_del`.
pub const PF_DEVICE_ID: &str = "pf0";
/// How long a VF must stay up before leaving for the bond to count it stable rather than a
/// flap (net-stack `BondConfig::stable_ns`, 1 s, plus a margin). Cycles faster than this would
/// double the hold-down every time and measure flap damping instead of a switch.
pub const VF_STABLE: Duration = Duration::from_millis(1200);

/// Environment variable that carries the echo image to the copy of the bench running inside
/// the namespace (its presence means "you are inside").
const INSIDE_ENV: &str = "TANDEM_BENCH_FAILOVER_IMAGE";
/// The bench namespace's bridge address (the host side).
const BENCH_HOST: Ipv4Addr = Ipv4Addr::new(10, 77, 1, 1);
/// The guest's address in the bench namespace.
const BENCH_GUEST: Ipv4Addr = Ipv4Addr::new(10, 77, 1, 2);
/// The bench namespace's tap for virtio-net.
const BENCH_TAP_SYNTHETIC: &str = "tap-virtio";
/// The bench namespace's tap for the igb PF.
const BENCH_TAP_VF: &str = "tap-vf";
/// Time the guest gets to boot under TCG.
const BOOT_TIMEOUT: Duration = Duration::from_secs(240);
/// Time one state change (a switch, a hot-plug) may take under TCG.
const STATE_TIMEOUT: Duration = Duration::from_secs(90);
/// How often the lab channel is asked for `stats` while waiting for a state; each answer is
/// also logged on the guest's serial console, so not much faster than this.
const STATS_POLL: Duration = Duration::from_millis(50);
/// How long the bench streams on the synthetic path before restoring the VF.
const ON_SYNTHETIC: Duration = Duration::from_millis(1500);
/// The steady-state window (VF active, no event) whose longest gap is the baseline.
const BASELINE_WINDOW: Duration = Duration::from_secs(1);

fn invalid_data(context: impl Into<String>) -> Error {
    Error::io(context, std::io::Error::from(ErrorKind::InvalidData))
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // The data behind these locks stays consistent even if a holder panicked.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A reproducible byte stream (xorshift64*): the writer sends it, the reader regenerates it to
/// check every echoed byte.
#[derive(Clone, Debug)]
pub struct PatternBytes {
    state: u64,
    word: [u8; 8],
    used: usize,
}

impl PatternBytes {
    /// The stream for `seed` (any value, zero included).
    pub fn new(seed: u64) -> Self {
        // splitmix64 of the seed, so neighbouring seeds give unrelated streams and the state
        // is never zero (xorshift would stay at zero).
        let mut mixed = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mixed = (mixed ^ (mixed >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        mixed = (mixed ^ (mixed >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        mixed ^= mixed >> 31;
        PatternBytes {
            state: mixed | 1,
            word: [0; 8],
            used: 8,
        }
    }

    /// Fills `out` with the next bytes of the stream.
    pub fn fill(&mut self, out: &mut [u8]) {
        for byte in out {
            if self.used == self.word.len() {
                self.state ^= self.state >> 12;
                self.state ^= self.state << 25;
                self.state ^= self.state >> 27;
                self.word = self.state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
                self.used = 0;
            }
            *byte = self.word[self.used];
            self.used += 1;
        }
    }
}

/// How an [`EchoStream`] sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamConfig {
    /// Seed of the byte pattern.
    pub seed: u64,
    /// Sending rate.
    pub bytes_per_second: u64,
    /// Bytes per write; with the rate this sets the time resolution of arrival gaps.
    pub write_size: usize,
}

impl StreamConfig {
    /// 256 KiB/s in 512-byte writes (one write every 2 ms): a steady trickle the guest keeps
    /// up with under TCG, fine-grained enough to time a 20 ms gap.
    pub fn new(seed: u64) -> Self {
        StreamConfig {
            seed,
            bytes_per_second: 256 * 1024,
            write_size: 512,
        }
    }

    /// Time between two writes.
    pub fn write_interval(&self) -> Duration {
        Duration::from_secs_f64(self.write_size as f64 / self.bytes_per_second.max(1) as f64)
    }
}

/// One read of echoed data: when, and how many bytes had arrived by then (this read included).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Arrival {
    /// When the read returned.
    pub at: Instant,
    /// Bytes received so far.
    pub total: u64,
}

/// The longest time without received data in `from..to`: the largest distance between two
/// consecutive arrivals (or a window edge and the nearest arrival) inside the window. The
/// arrivals must be in time order.
pub fn longest_gap(arrivals: &[Arrival], from: Instant, to: Instant) -> Duration {
    let mut previous = from;
    let mut longest = Duration::ZERO;
    for arrival in arrivals
        .iter()
        .filter(|arrival| arrival.at > from && arrival.at < to)
    {
        longest = longest.max(arrival.at - previous);
        previous = arrival.at;
    }
    longest.max(to.saturating_duration_since(previous))
}

/// State shared by an [`EchoStream`]'s threads.
struct StreamShared {
    sent: AtomicU64,
    received: AtomicU64,
    /// The writer is to stop after its current write (orderly end).
    stop_writing: AtomicBool,
    /// Both threads are to give up at once (drop, or a finish that timed out).
    abandon: AtomicBool,
    /// The first thing that went wrong (write or read error, wrong byte, early end of stream).
    failure: Mutex<Option<String>>,
    arrivals: Mutex<Vec<Arrival>>,
}

impl StreamShared {
    fn fail(&self, what: String) {
        lock(&self.failure).get_or_insert(what);
    }
}

/// What a finished [`EchoStream`] moved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamTotals {
    /// Bytes written.
    pub sent: u64,
    /// Bytes echoed back, every one checked against the pattern.
    pub received: u64,
    /// Bytes sent but never echoed (zero for a finished stream).
    pub lost: u64,
}

/// One TCP connection to the echo app carrying a paced pattern stream both ways: a writer
/// thread sends it at a fixed rate, a reader thread checks every echoed byte and records when
/// data arrived. Threads and socket are shut down on drop.
pub struct EchoStream {
    shared: Arc<StreamShared>,
    stream: TcpStream,
    local: SocketAddr,
    peer: SocketAddr,
    writer: Option<JoinHandle<()>>,
    reader: Option<JoinHandle<()>>,
}

impl EchoStream {
    /// Connects to `peer` (from the calling thread, so inside its network namespace) and
    /// starts streaming.
    pub fn connect(peer: SocketAddr, config: StreamConfig, timeout: Duration) -> Result<Self> {
        let stream = TcpStream::connect_timeout(&peer, timeout)
            .map_err(|error| Error::io(format!("connecting to the echo app at {peer}"), error))?;
        let setup = |error| Error::io(format!("setting up the connection to {peer}"), error);
        // Each paced write goes out at once, so arrival times show the path, not Nagle.
        stream.set_nodelay(true).map_err(setup)?;
        // Short timeouts let both threads notice `abandon` while the path is stalled.
        stream
            .set_read_timeout(Some(Duration::from_millis(200)))
            .map_err(setup)?;
        stream
            .set_write_timeout(Some(Duration::from_millis(200)))
            .map_err(setup)?;
        let local = stream.local_addr().map_err(setup)?;
        let shared = Arc::new(StreamShared {
            sent: AtomicU64::new(0),
            received: AtomicU64::new(0),
            stop_writing: AtomicBool::new(false),
            abandon: AtomicBool::new(false),
            failure: Mutex::new(None),
            arrivals: Mutex::new(Vec::new()),
        });
        let writer_stream = stream.try_clone().map_err(setup)?;
        let reader_stream = stream.try_clone().map_err(setup)?;
        let writer = {
            let shared = Arc::clone(&shared);
            std::thread::spawn(move || write_pattern(writer_stream, config, &shared))
        };
        let reader = {
            let shared = Arc::clone(&shared);
            std::thread::spawn(move || check_echo(reader_stream, config.seed, &shared))
        };
        Ok(EchoStream {
            shared,
            stream,
            local,
            peer,
            writer: Some(writer),
            reader: Some(reader),
        })
    }

    /// Our end of the connection.
    pub fn local_address(&self) -> SocketAddr {
        self.local
    }

    /// Bytes written so far.
    pub fn sent(&self) -> u64 {
        self.shared.sent.load(Ordering::Relaxed)
    }

    /// Bytes echoed back (and checked) so far.
    pub fn received(&self) -> u64 {
        self.shared.received.load(Ordering::Relaxed)
    }

    /// The first failure (connection error, wrong byte, early end), if any.
    pub fn failure(&self) -> Option<String> {
        lock(&self.shared.failure).clone()
    }

    /// Fails if the stream has failed.
    pub fn check(&self) -> Result<()> {
        match self.failure() {
            None => Ok(()),
            Some(failure) => Err(invalid_data(format!(
                "echo stream {} -> {}: {failure} (sent {}, received {})",
                self.local,
                self.peer,
                self.sent(),
                self.received()
            ))),
        }
    }

    /// Waits until at least `total` bytes have come back; fails early if the stream fails.
    pub fn wait_for_received(&self, total: u64, timeout: Duration) -> Result<u64> {
        let deadline = Instant::now() + timeout;
        loop {
            self.check()?;
            let received = self.received();
            if received >= total {
                return Ok(received);
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout {
                    waiting_for: format!(
                        "{total} echoed bytes on {} -> {} (have {received}, sent {})",
                        self.local,
                        self.peer,
                        self.sent()
                    ),
                    after: timeout,
                    context: String::new(),
                });
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits until `bytes` more bytes have come back than now.
    pub fn wait_for_progress(&self, bytes: u64, timeout: Duration) -> Result<u64> {
        self.wait_for_received(self.received() + bytes, timeout)
    }

    /// A copy of the arrivals so far.
    pub fn arrivals(&self) -> Vec<Arrival> {
        lock(&self.shared.arrivals).clone()
    }

    /// The longest time without received data in `from..to`.
    pub fn longest_gap(&self, from: Instant, to: Instant) -> Duration {
        longest_gap(&lock(&self.shared.arrivals), from, to)
    }

    /// Stops sending, half-closes, and waits (up to `timeout`) until every byte sent has come
    /// back and the echo app closed its side. Fails if anything went wrong on the way or bytes
    /// are missing.
    pub fn finish(mut self, timeout: Duration) -> Result<StreamTotals> {
        let deadline = Instant::now() + timeout;
        self.shared.stop_writing.store(true, Ordering::Relaxed);
        let writer = self.writer.take();
        let reader = self.reader.take();
        let ended =
            |thread: &Option<JoinHandle<()>>| thread.as_ref().is_none_or(|t| t.is_finished());
        while !ended(&writer) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        let writer_ended = ended(&writer);
        if writer_ended {
            // Everything is written: the FIN tells the echo app to close once it has echoed all.
            let _ = self.stream.shutdown(Shutdown::Write);
        }
        while !ended(&reader) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        let reader_ended = ended(&reader);
        self.shared.abandon.store(true, Ordering::Relaxed);
        let _ = self.stream.shutdown(Shutdown::Both);
        for thread in [writer, reader].into_iter().flatten() {
            let _ = thread.join();
        }
        self.check()?;
        let totals = StreamTotals {
            sent: self.sent(),
            received: self.received(),
            lost: self.sent().saturating_sub(self.received()),
        };
        if !writer_ended || !reader_ended || totals.lost != TARGET_LOST_BYTES {
            return Err(Error::Timeout {
                waiting_for: format!(
                    "the echo of the last bytes on {} -> {} ({} sent, {} echoed, {} missing; \
                     writer {}, reader {})",
                    self.local,
                    self.peer,
                    totals.sent,
                    totals.received,
                    totals.lost,
                    if writer_ended { "done" } else { "stuck" },
                    if reader_ended {
                        "saw the end"
                    } else {
                        "no end of stream"
                    },
                ),
                after: timeout,
                context: String::new(),
            });
        }
        Ok(totals)
    }
}

impl Drop for EchoStream {
    fn drop(&mut self) {
        self.shared.stop_writing.store(true, Ordering::Relaxed);
        self.shared.abandon.store(true, Ordering::Relaxed);
        let _ = self.stream.shutdown(Shutdown::Both);
        for thread in [self.writer.take(), self.reader.take()]
            .into_iter()
            .flatten()
        {
            let _ = thread.join();
        }
    }
}

fn timed_out(error: &std::io::Error) -> bool {
    matches!(
        error.kind(),
        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
    )
}

/// The writer thread: the pattern at `config.bytes_per_second`.
fn write_pattern(mut stream: TcpStream, config: StreamConfig, shared: &StreamShared) {
    let mut pattern = PatternBytes::new(config.seed);
    let mut chunk = vec![0u8; config.write_size.max(1)];
    let interval = config.write_interval();
    let mut next_write = Instant::now();
    while !shared.stop_writing.load(Ordering::Relaxed) {
        pattern.fill(&mut chunk);
        let mut offset = 0;
        while offset < chunk.len() {
            if shared.abandon.load(Ordering::Relaxed) {
                return;
            }
            match stream.write(&chunk[offset..]) {
                Ok(0) => {
                    shared.fail(format!(
                        "the connection stopped taking data after {} bytes",
                        shared.sent.load(Ordering::Relaxed)
                    ));
                    return;
                }
                Ok(written) => {
                    offset += written;
                    shared.sent.fetch_add(written as u64, Ordering::Relaxed);
                }
                // The path is stalled and the send buffer full: keep trying.
                Err(error) if timed_out(&error) => {}
                Err(error) => {
                    shared.fail(format!(
                        "writing after {} bytes: {error}",
                        shared.sent.load(Ordering::Relaxed)
                    ));
                    return;
                }
            }
        }
        next_write += interval;
        let now = Instant::now();
        if next_write > now {
            std::thread::sleep(next_write - now);
        } else if now - next_write > Duration::from_millis(100) {
            // After a stall, carry on at the normal rate instead of bursting to catch up.
            next_write = now;
        }
    }
}

/// The reader thread: checks every echoed byte against the pattern and records arrivals.
fn check_echo(mut stream: TcpStream, seed: u64, shared: &StreamShared) {
    let mut expected = PatternBytes::new(seed);
    let mut buffer = vec![0u8; 64 * 1024];
    let mut wanted = vec![0u8; buffer.len()];
    loop {
        if shared.abandon.load(Ordering::Relaxed) {
            return;
        }
        match stream.read(&mut buffer) {
            Ok(0) => {
                let received = shared.received.load(Ordering::Relaxed);
                if !shared.stop_writing.load(Ordering::Relaxed) {
                    shared.fail(format!(
                        "the echo app closed the connection after echoing {received} bytes"
                    ));
                }
                return;
            }
            Ok(count) => {
                let at = Instant::now();
                expected.fill(&mut wanted[..count]);
                let offset = shared.received.load(Ordering::Relaxed);
                if let Some(index) = (0..count).find(|&index| buffer[index] != wanted[index]) {
                    let end = (index + 8).min(count);
                    shared.fail(format!(
                        "echoed byte {} is wrong: got {:02x?}, expected {:02x?}",
                        offset + index as u64,
                        &buffer[index..end],
                        &wanted[index..end]
                    ));
                    return;
                }
                let total = offset + count as u64;
                shared.received.store(total, Ordering::Relaxed);
                lock(&shared.arrivals).push(Arrival { at, total });
            }
            Err(error) if timed_out(&error) => {}
            Err(error) => {
                shared.fail(format!(
                    "reading after {} bytes: {error}",
                    shared.received.load(Ordering::Relaxed)
                ));
                return;
            }
        }
    }
}

/// Which path the bond transmits on, as the guest's `stats` names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ActivePath {
    /// The igbvf VF.
    Vf,
    /// virtio-net.
    Synthetic,
}

impl ActivePath {
    /// The `active=` value.
    pub fn name(self) -> &'static str {
        match self {
            ActivePath::Vf => "Vf",
            ActivePath::Synthetic => "Synthetic",
        }
    }

    /// The prefix of this path's counters (`vf_tx`, `synthetic_tx`).
    pub fn counter_prefix(self) -> &'static str {
        match self {
            ActivePath::Vf => "vf",
            ActivePath::Synthetic => "synthetic",
        }
    }
}

/// The guest's answer to the lab command `stats`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LabStats {
    /// The `active=` value (`Vf` or `Synthetic`).
    pub active: String,
    /// Every numeric `name=value` field.
    pub counters: BTreeMap<String, u64>,
    /// When the answer arrived.
    pub at: Instant,
}

impl LabStats {
    /// Parses `ok active=Vf rx_frames=1 ...`.
    pub fn parse(answer: &str) -> Result<LabStats> {
        let malformed = || invalid_data(format!("the guest's stats answer {answer:?}"));
        let mut words = answer.split_whitespace();
        if words.next() != Some("ok") {
            return Err(malformed());
        }
        let mut active = None;
        let mut counters = BTreeMap::new();
        for word in words {
            let (name, value) = word.split_once('=').ok_or_else(malformed)?;
            if name == "active" {
                active = Some(value.to_string());
            } else {
                counters.insert(name.to_string(), value.parse().map_err(|_| malformed())?);
            }
        }
        Ok(LabStats {
            active: active.ok_or_else(malformed)?,
            counters,
            at: Instant::now(),
        })
    }

    /// Counter `name`; a missing counter is an error naming it.
    pub fn counter(&self, name: &str) -> Result<u64> {
        self.counters
            .get(name)
            .copied()
            .ok_or_else(|| invalid_data(format!("no counter `{name}` in the guest's stats")))
    }

    /// Whether the bond transmits on `path`.
    pub fn is_active(&self, path: ActivePath) -> bool {
        self.active == path.name()
    }

    /// The counters as one line (for messages).
    pub fn summary(&self) -> String {
        let counters: Vec<String> = self
            .counters
            .iter()
            .map(|(name, value)| format!("{name}={value}"))
            .collect();
        format!("active={} {}", self.active, counters.join(" "))
    }
}

/// Time a lab command may take to be answered.
const LAB_TIMEOUT: Duration = Duration::from_secs(30);

/// Sends `command` on the lab channel and fails unless the guest answers `ok ...`.
pub fn lab_ok(lab_socket: &Path, command: &str) -> Result<String> {
    let answer = lab_command(lab_socket, command, LAB_TIMEOUT)?;
    if answer.starts_with("ok") {
        Ok(answer)
    } else {
        Err(invalid_data(format!(
            "the guest answered `{command}` with {answer:?}"
        )))
    }
}

/// Sends a lone newline on the lab channel so that the first real command arrives whole.
///
/// The guest programs COM2 (FIFO reset included) only when its event loop starts, which is
/// after the app prints that it serves; a byte that reached the UART before that is dropped. An
/// empty line is ignored by the guest, so sending one first costs nothing when the channel is
/// already open and absorbs the loss when it is not (the UART holds one byte until then).
pub fn prime_lab_channel(lab_socket: &Path) -> Result<()> {
    let mut stream = std::os::unix::net::UnixStream::connect(lab_socket).map_err(|error| {
        Error::io(
            format!("connecting to the lab channel {}", lab_socket.display()),
            error,
        )
    })?;
    stream
        .write_all(b"\n")
        .map_err(|error| Error::io("writing to the lab channel", error))
}

/// The guest's counters now.
pub fn lab_stats(lab_socket: &Path) -> Result<LabStats> {
    LabStats::parse(&lab_ok(lab_socket, "stats")?)
}

/// Polls `stats` until `done` accepts them; the last stats seen are in the timeout error.
pub fn wait_for_stats(
    lab_socket: &Path,
    what: &str,
    timeout: Duration,
    done: impl Fn(&LabStats) -> bool,
) -> Result<LabStats> {
    let deadline = Instant::now() + timeout;
    loop {
        let stats = lab_stats(lab_socket)?;
        if done(&stats) {
            return Ok(stats);
        }
        if Instant::now() >= deadline {
            return Err(Error::Timeout {
                waiting_for: what.to_string(),
                after: timeout,
                context: format!("last stats: {}", stats.summary()),
            });
        }
        std::thread::sleep(STATS_POLL);
    }
}

/// Polls `stats` until the bond transmits on `path`.
pub fn wait_for_active(lab_socket: &Path, path: ActivePath, timeout: Duration) -> Result<LabStats> {
    wait_for_stats(
        lab_socket,
        &format!("active={}", path.name()),
        timeout,
        |stats| stats.is_active(path),
    )
}

/// A way to take the VF away and give it back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trigger {
    /// QMP `device_del` of the igb PF (the guest completes the orderly unplug), `device_add`.
    HotPlug,
    /// Lab `vf disable` / `vf enable` (the lab PF clears and sets VF Enable: surprise removal).
    VfEnable,
    /// Lab `vf link-down` / `vf link-up` (the VF stays, its link goes).
    VfLink,
}

impl Trigger {
    /// Every trigger, in bench order.
    pub const ALL: [Trigger; 3] = [Trigger::HotPlug, Trigger::VfEnable, Trigger::VfLink];

    /// A short name for tables and messages.
    pub fn name(self) -> &'static str {
        match self {
            Trigger::HotPlug => "hot-plug (device_del/add)",
            Trigger::VfEnable => "vf disable/enable",
            Trigger::VfLink => "vf link-down/up",
        }
    }

    /// Takes the VF away. For hot-plug this returns once QEMU reports the PF deleted.
    pub fn remove(self, qemu: &mut Qemu, lab_socket: &Path) -> Result<()> {
        match self {
            Trigger::HotPlug => {
                let qmp = qemu.qmp()?;
                qmp.execute(
                    "device_del",
                    Some(serde_json::json!({ "id": PF_DEVICE_ID })),
                )?;
                qmp.wait_event_where("DEVICE_DELETED", STATE_TIMEOUT, |data| {
                    data["device"] == PF_DEVICE_ID
                })?;
                Ok(())
            }
            Trigger::VfEnable => lab_ok(lab_socket, "vf disable").map(drop),
            Trigger::VfLink => lab_ok(lab_socket, "vf link-down").map(drop),
        }
    }

    /// Gives the VF back; `pf_netdev` is the `-netdev` id the PF is attached to.
    pub fn restore(self, qemu: &mut Qemu, lab_socket: &Path, pf_netdev: &str) -> Result<()> {
        match self {
            Trigger::HotPlug => qemu
                .qmp()?
                .execute("device_add", Some(pf_device_add_arguments(pf_netdev)))
                .map(drop),
            Trigger::VfEnable => lab_ok(lab_socket, "vf enable").map(drop),
            Trigger::VfLink => lab_ok(lab_socket, "vf link-up").map(drop),
        }
    }
}

/// Retransmissions of one host TCP socket, from `ss -tin`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Retransmissions {
    /// Segments retransmitted over the connection's life (`retrans:<now>/<total>`).
    pub segments: u64,
    /// Bytes retransmitted over the connection's life (`bytes_retrans:`).
    pub bytes: u64,
}

/// The retransmission counters of the socket whose local address is `local` in `ss -tin`
/// output; `None` if the socket is not listed. ss leaves out counters that are zero.
pub fn parse_ss_retransmissions(output: &str, local: SocketAddr) -> Option<Retransmissions> {
    let local = local.to_string();
    let mut lines = output.lines();
    lines.find(|line| line.split_whitespace().any(|word| word == local))?;
    let mut found = Retransmissions::default();
    for line in lines.take_while(|line| line.starts_with([' ', '\t'])) {
        for word in line.split_whitespace() {
            if let Some(value) = word.strip_prefix("bytes_retrans:") {
                found.bytes = value.parse().unwrap_or(0);
            } else if let Some(value) = word.strip_prefix("retrans:") {
                let total = value.split_once('/').map_or(value, |(_, total)| total);
                found.segments = total.parse().unwrap_or(0);
            }
        }
    }
    Some(found)
}

/// Runs `ss -tin` (in the caller's network namespace) and reads `local`'s retransmissions.
pub fn socket_retransmissions(local: SocketAddr) -> Result<Retransmissions> {
    let output = Command::new("ss")
        .args(["-t", "-i", "-n"])
        .output()
        .map_err(|error| Error::io("running ss -tin", error))?;
    if !output.status.success() {
        return Err(Error::CommandFailed {
            command: "ss -tin".to_string(),
            status: output.status,
        });
    }
    parse_ss_retransmissions(&String::from_utf8_lossy(&output.stdout), local)
        .ok_or_else(|| invalid_data(format!("ss -tin does not list the socket {local}")))
}

/// One cycle's measurements.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CycleSample {
    /// Longest gap in a steady window just before the removal (VF active, nothing happening).
    pub baseline_gap: Duration,
    /// Longest gap from the removal trigger until the restore trigger.
    pub removal_gap: Duration,
    /// Longest gap from the restore trigger until the end of the cycle.
    pub restore_gap: Duration,
    /// From the removal trigger until `stats` reported the synthetic path active.
    pub removal_switch: Duration,
    /// From the restore trigger until `stats` reported the VF active (hold-down included).
    pub restore_switch: Duration,
    /// Host TCP retransmissions from the removal trigger until the restore trigger.
    pub removal_retransmitted: Retransmissions,
    /// Host TCP retransmissions from the restore trigger until the end of the cycle.
    pub restore_retransmitted: Retransmissions,
}

/// All cycles of one trigger.
#[derive(Clone, Debug, PartialEq)]
pub struct TriggerResult {
    /// The trigger.
    pub trigger: Trigger,
    /// One sample per cycle.
    pub cycles: Vec<CycleSample>,
    /// What the stream moved (lost is zero, or the bench failed).
    pub totals: StreamTotals,
}

fn median_of(cycles: &[CycleSample], value: impl Fn(&CycleSample) -> f64) -> f64 {
    let values: Vec<f64> = cycles.iter().map(value).collect();
    median(&values).unwrap_or(f64::NAN)
}

fn milliseconds(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

/// The result table: medians over the cycles per trigger, gaps also as multiples of
/// [`TARGET_GAP`]. "Out" is the switch VF -> synthetic (removal), "in" the way back.
pub fn format_table(results: &[TriggerResult]) -> String {
    let target = milliseconds(TARGET_GAP);
    let row = |cells: [&str; 10]| {
        format!(
            "{:<26} {:>6} {:>9} {:>15} {:>15} {:>7} {:>7} {:>9} {:>9} {:>6}\n",
            cells[0],
            cells[1],
            cells[2],
            cells[3],
            cells[4],
            cells[5],
            cells[6],
            cells[7],
            cells[8],
            cells[9]
        )
    };
    let mut text = row([
        "", "", "baseline", "gap out", "gap in", "switch", "switch", "retrans", "retrans", "lost",
    ]);
    text.push_str(&row([
        "trigger",
        "cycles",
        "gap ms",
        "ms (x target)",
        "ms (x target)",
        "out ms",
        "in ms",
        "out B",
        "in B",
        "B",
    ]));
    for result in results {
        let cycles = &result.cycles;
        let median_ms = |value: fn(&CycleSample) -> Duration| {
            median_of(cycles, |cycle| milliseconds(value(cycle)))
        };
        let removal = median_ms(|cycle| cycle.removal_gap);
        let restore = median_ms(|cycle| cycle.restore_gap);
        text.push_str(&row([
            result.trigger.name(),
            &cycles.len().to_string(),
            &format!("{:.1}", median_ms(|cycle| cycle.baseline_gap)),
            &format!("{removal:.1} ({:.1}x)", removal / target),
            &format!("{restore:.1} ({:.1}x)", restore / target),
            &format!("{:.0}", median_ms(|cycle| cycle.removal_switch)),
            &format!("{:.0}", median_ms(|cycle| cycle.restore_switch)),
            &format!(
                "{:.0}",
                median_of(cycles, |cycle| cycle.removal_retransmitted.bytes as f64)
            ),
            &format!(
                "{:.0}",
                median_of(cycles, |cycle| cycle.restore_retransmitted.bytes as f64)
            ),
            &result.totals.lost.to_string(),
        ]));
    }
    text.push_str(&format!(
        "targets (README): gap < {target:.0} ms (x target = median gap / {target:.0} ms), lost \
         bytes = {TARGET_LOST_BYTES}. Medians over the cycles. gap = longest time without echoed \
         data from the trigger to the next trigger (out) or the end of the cycle (in); switch = \
         trigger until `stats` showed the new path (polled every {} ms, hot-plug and hold-down \
         included); retrans = bytes the host's TCP retransmitted (ss bytes_retrans) in the \
         same windows\n",
        STATS_POLL.as_millis()
    ));
    text
}

/// `cargo xtask bench failover [--cycles N]`: builds the echo image, creates the namespace,
/// runs the measurement inside it, prints the table, removes the namespace.
pub fn failover_benchmark(cycles: usize) -> Result<()> {
    if let Some(elf) = std::env::var_os(INSIDE_ENV) {
        return measure(Path::new(&elf), cycles);
    }
    require_root("failover")?;
    let elf = build_app("echo", Profile::Release)?;
    let namespace = BenchNamespace::create(
        "tandem-bench-failover-",
        BENCH_HOST,
        24,
        &[BENCH_TAP_SYNTHETIC, BENCH_TAP_VF],
    )?;
    let cycles_text = cycles.to_string();
    let args = ["bench", "failover", "--cycles", &cycles_text];
    eprintln!(
        "xtask: namespace {} (br0 {BENCH_HOST}/24, taps {BENCH_TAP_SYNTHETIC} + {BENCH_TAP_VF})",
        namespace.name
    );
    namespace.run_xtask_inside(&args, INSIDE_ENV, &elf)
}

/// The unix socket of the lab channel, in a private directory removed on drop.
struct LabSocket {
    dir: PathBuf,
}

impl LabSocket {
    fn new() -> Result<LabSocket> {
        let dir =
            std::env::temp_dir().join(format!("tandem-bench-failover-{}", std::process::id()));
        std::fs::create_dir_all(&dir)
            .map_err(|error| Error::io(format!("creating {}", dir.display()), error))?;
        Ok(LabSocket { dir })
    }

    fn path(&self) -> PathBuf {
        self.dir.join("lab.sock")
    }
}

impl Drop for LabSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Inside the namespace: boots the echo app with both NICs, measures every trigger, prints.
fn measure(elf: &Path, cycles: usize) -> Result<()> {
    let choice = accel::decide(None);
    let lab = LabSocket::new()?;
    let lab_path = lab.path();
    let pf_netdev = "net1";
    let mut qemu = QemuBuilder::new("bench failover", choice.accel)
        .echo(false)
        .kernel(elf)
        .cmdline(format!(
            "log=info ip={BENCH_GUEST}/24 gw={BENCH_HOST} igb.lab_pf=1"
        ))
        .netdev(tap_netdev("net0", BENCH_TAP_SYNTHETIC))
        .netdev(tap_netdev(pf_netdev, BENCH_TAP_VF))
        .device(virtio_net_device("net0"))
        .device(igb_pf_device(pf_netdev))
        .arg("-chardev")
        .arg(format!(
            "socket,id=lab,path={},server=on,wait=off",
            lab_path.display()
        ))
        .arg("-device")
        .arg("isa-serial,chardev=lab")
        .spawn()?;
    qemu.wait_for_line(SERVING_LINE, BOOT_TIMEOUT)?;
    prime_lab_channel(&lab_path)?;
    let in_context = |qemu: &Qemu, error: Error| match error {
        Error::Timeout {
            waiting_for,
            after,
            context,
        } => Error::Timeout {
            waiting_for,
            after,
            context: format!("{context}\n{}", qemu.diagnostics()),
        },
        other => other,
    };
    wait_for_active(&lab_path, ActivePath::Vf, STATE_TIMEOUT)
        .map_err(|error| in_context(&qemu, error))?;
    eprintln!(
        "xtask: bench failover: {cycles} cycles per trigger, accelerator {} ({}), stream {} KiB/s \
         in {}-byte writes",
        choice.accel,
        choice.reason,
        StreamConfig::new(0).bytes_per_second / 1024,
        StreamConfig::new(0).write_size
    );
    let mut results = Vec::new();
    for (index, trigger) in Trigger::ALL.into_iter().enumerate() {
        let result = measure_trigger(&mut qemu, &lab_path, pf_netdev, trigger, cycles, index)
            .map_err(|error| in_context(&qemu, error))?;
        results.push(result);
    }
    println!(
        "--- bench failover ({}, echo app, {cycles} cycles per trigger) ---",
        match choice.accel {
            Accel::Kvm => "KVM",
            Accel::Tcg => "TCG",
        }
    );
    print!("{}", format_table(&results));
    Ok(())
}

/// `cycles` removals and restores by `trigger` under one echo stream.
fn measure_trigger(
    qemu: &mut Qemu,
    lab: &Path,
    pf_netdev: &str,
    trigger: Trigger,
    cycles: usize,
    index: usize,
) -> Result<TriggerResult> {
    let peer = SocketAddr::from((BENCH_GUEST, ECHO_PORT));
    let stream = EchoStream::connect(
        peer,
        StreamConfig::new(0xFA11_0000 + index as u64),
        Duration::from_secs(10),
    )?;
    stream.wait_for_progress(64 * 1024, STATE_TIMEOUT)?;
    let mut samples = Vec::new();
    for cycle in 1..=cycles {
        let on_vf = wait_for_active(lab, ActivePath::Vf, STATE_TIMEOUT)?;
        // Let the VF count as stable (else the hold-down doubles), and time a quiet window.
        sleep_until(on_vf.at + VF_STABLE);
        let baseline_end = Instant::now();
        let baseline_gap = stream.longest_gap(baseline_end - BASELINE_WINDOW, baseline_end);
        let before_removal = socket_retransmissions(stream.local_address())?;

        let removed_at = Instant::now();
        trigger.remove(qemu, lab)?;
        let on_synthetic = wait_for_active(lab, ActivePath::Synthetic, STATE_TIMEOUT)?;
        sleep_until(removed_at + ON_SYNTHETIC);
        stream.wait_for_progress(16 * 1024, STATE_TIMEOUT)?;

        let before_restore = socket_retransmissions(stream.local_address())?;
        let restored_at = Instant::now();
        trigger.restore(qemu, lab, pf_netdev)?;
        let back_on_vf = wait_for_active(lab, ActivePath::Vf, STATE_TIMEOUT)?;
        sleep_until(back_on_vf.at + VF_STABLE);
        stream.wait_for_progress(16 * 1024, STATE_TIMEOUT)?;
        let end = Instant::now();
        let after = socket_retransmissions(stream.local_address())?;
        stream.check()?;
        let difference = |from: Retransmissions, to: Retransmissions| Retransmissions {
            segments: to.segments.saturating_sub(from.segments),
            bytes: to.bytes.saturating_sub(from.bytes),
        };

        let sample = CycleSample {
            baseline_gap,
            removal_gap: stream.longest_gap(removed_at, restored_at),
            restore_gap: stream.longest_gap(restored_at, end),
            removal_switch: on_synthetic.at.saturating_duration_since(removed_at),
            restore_switch: back_on_vf.at.saturating_duration_since(restored_at),
            removal_retransmitted: difference(before_removal, before_restore),
            restore_retransmitted: difference(before_restore, after),
        };
        eprintln!(
            "xtask: {} cycle {cycle}/{cycles}: baseline gap {:.1} ms, gap VF->synthetic {:.1} ms, \
             gap synthetic->VF {:.1} ms, switch out {:.0} ms, in {:.0} ms, retransmitted out {} \
             bytes ({} segments), in {} bytes ({} segments)",
            trigger.name(),
            milliseconds(sample.baseline_gap),
            milliseconds(sample.removal_gap),
            milliseconds(sample.restore_gap),
            milliseconds(sample.removal_switch),
            milliseconds(sample.restore_switch),
            sample.removal_retransmitted.bytes,
            sample.removal_retransmitted.segments,
            sample.restore_retransmitted.bytes,
            sample.restore_retransmitted.segments,
        );
        samples.push(sample);
    }
    let totals = stream.finish(STATE_TIMEOUT)?;
    eprintln!(
        "xtask: {}: {} bytes sent, {} echoed exactly, {} lost",
        trigger.name(),
        totals.sent,
        totals.received,
        totals.lost
    );
    Ok(TriggerResult {
        trigger,
        cycles: samples,
        totals,
    })
}

fn sleep_until(when: Instant) {
    let now = Instant::now();
    if when > now {
        std::thread::sleep(when - now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn pattern_is_reproducible_whatever_the_chunking_and_differs_per_seed() {
        let mut whole = vec![0u8; 1000];
        PatternBytes::new(7).fill(&mut whole);
        let mut pieces = vec![0u8; 1000];
        let mut pattern = PatternBytes::new(7);
        for chunk in pieces.chunks_mut(3) {
            pattern.fill(chunk);
        }
        assert_eq!(whole, pieces);
        let mut other = vec![0u8; 1000];
        PatternBytes::new(8).fill(&mut other);
        assert_ne!(whole, other);
        // Not a constant or short-period stream.
        assert!(whole.windows(8).any(|w| w != &whole[..8]));
        let mut zero_seed = vec![0u8; 64];
        PatternBytes::new(0).fill(&mut zero_seed);
        assert!(zero_seed.iter().any(|&byte| byte != 0));
    }

    fn arrivals_at(start: Instant, milliseconds: &[u64]) -> Vec<Arrival> {
        milliseconds
            .iter()
            .enumerate()
            .map(|(index, &ms)| Arrival {
                at: start + Duration::from_millis(ms),
                total: index as u64 * 100,
            })
            .collect()
    }

    #[test]
    fn longest_gap_counts_window_edges_and_ignores_outside_arrivals() {
        let start = Instant::now();
        let ms = |value: u64| start + Duration::from_millis(value);
        let arrivals = arrivals_at(start, &[0, 10, 20, 300, 310, 900]);
        // Inside 5..400: 5->10, 10->20, 20->300 (280), 300->310, 310->400 (90).
        assert_eq!(
            longest_gap(&arrivals, ms(5), ms(400)),
            Duration::from_millis(280)
        );
        // Nothing arrives in 320..800: the whole window is a gap.
        assert_eq!(
            longest_gap(&arrivals, ms(320), ms(800)),
            Duration::from_millis(480)
        );
        assert_eq!(longest_gap(&[], ms(0), ms(50)), Duration::from_millis(50));
    }

    #[test]
    fn stats_answers_parse_and_bad_ones_are_refused() {
        let stats = LabStats::parse(
            "ok active=Vf rx_frames=266 tx_frames=163 synthetic_tx=68 vf_tx=95 switches_to_vf=3",
        )
        .unwrap();
        assert!(stats.is_active(ActivePath::Vf));
        assert!(!stats.is_active(ActivePath::Synthetic));
        assert_eq!(stats.counter("vf_tx").unwrap(), 95);
        assert_eq!(stats.counter("switches_to_vf").unwrap(), 3);
        assert!(stats.counter("vf_rx").is_err());
        assert!(stats.summary().starts_with("active=Vf "));
        for bad in [
            "error unknown command",
            "ok rx_frames=1",
            "ok active=Vf rx_frames=lots",
            "ok active=Vf junk",
        ] {
            assert!(LabStats::parse(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn ss_retransmissions_of_one_socket() {
        let output = "\
State Recv-Q Send-Q Local Address:Port Peer Address:Port Process
ESTAB 0      0      10.77.1.1:40001    10.77.1.2:7
\t cubic wscale:7,7 rto:204 rtt:1.5/0.7 bytes_sent:5000 bytes_retrans:2896 bytes_acked:4000 retrans:0/2 rcv_space:14480
ESTAB 0      0      10.77.1.1:40002    10.77.1.2:7
\t cubic wscale:7,7 rto:204 rtt:1.5/0.7 bytes_sent:100 bytes_acked:101
";
        let first: SocketAddr = "10.77.1.1:40001".parse().unwrap();
        let second: SocketAddr = "10.77.1.1:40002".parse().unwrap();
        let absent: SocketAddr = "10.77.1.1:40003".parse().unwrap();
        assert_eq!(
            parse_ss_retransmissions(output, first),
            Some(Retransmissions {
                segments: 2,
                bytes: 2896
            })
        );
        assert_eq!(
            parse_ss_retransmissions(output, second),
            Some(Retransmissions::default())
        );
        assert_eq!(parse_ss_retransmissions(output, absent), None);
    }

    fn sample(gap_ms: u64, retrans_bytes: u64) -> CycleSample {
        CycleSample {
            baseline_gap: Duration::from_millis(4),
            removal_gap: Duration::from_millis(gap_ms),
            restore_gap: Duration::from_millis(10),
            removal_switch: Duration::from_millis(100),
            restore_switch: Duration::from_millis(60),
            removal_retransmitted: Retransmissions {
                segments: retrans_bytes / 1000,
                bytes: retrans_bytes,
            },
            restore_retransmitted: Retransmissions::default(),
        }
    }

    #[test]
    fn table_shows_medians_and_ratios_to_the_target() {
        let result = TriggerResult {
            trigger: Trigger::VfEnable,
            cycles: vec![sample(400, 3000), sample(200, 1000), sample(900, 2000)],
            totals: StreamTotals {
                sent: 10,
                received: 10,
                lost: 0,
            },
        };
        let table = format_table(&[result]);
        let row = table
            .lines()
            .find(|line| line.starts_with("vf disable/enable"))
            .unwrap();
        // Median removal gap 400 ms = 20x the 20 ms target; median retransmitted 2000 bytes
        // on the way out, none on the way back; nothing lost.
        assert!(row.contains("400.0 (20.0x)"), "{row}");
        assert!(row.contains("10.0 (0.5x)"), "{row}");
        let numbers: Vec<&str> = row.split_whitespace().rev().take(3).collect();
        assert_eq!(numbers, ["0", "0", "2000"], "{row}");
        assert!(table.contains("gap < 20 ms"));
    }

    /// A local echo server: reads and writes back until the client half-closes.
    fn echo_server(corrupt_at: Option<usize>) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            let (mut socket, _) = listener.accept().unwrap();
            let mut buffer = [0u8; 4096];
            let mut offset = 0;
            loop {
                let count = match socket.read(&mut buffer) {
                    Ok(0) | Err(_) => return,
                    Ok(count) => count,
                };
                if let Some(at) = corrupt_at
                    && (offset..offset + count).contains(&at)
                {
                    buffer[at - offset] ^= 0x40;
                }
                offset += count;
                if socket.write_all(&buffer[..count]).is_err() {
                    return;
                }
            }
        });
        address
    }

    fn fast(seed: u64) -> StreamConfig {
        StreamConfig {
            seed,
            bytes_per_second: 4 * 1024 * 1024,
            write_size: 1024,
        }
    }

    #[test]
    fn a_faithful_echo_finishes_with_every_byte_back() {
        let stream =
            EchoStream::connect(echo_server(None), fast(1), Duration::from_secs(5)).unwrap();
        stream
            .wait_for_received(200 * 1024, Duration::from_secs(10))
            .unwrap();
        let start = stream.arrivals()[0].at;
        assert!(stream.longest_gap(start, Instant::now()) < Duration::from_secs(1));
        let totals = stream.finish(Duration::from_secs(10)).unwrap();
        assert!(totals.sent >= 200 * 1024);
        assert_eq!(totals.received, totals.sent);
        assert_eq!(totals.lost, 0);
    }

    #[test]
    fn a_corrupted_echo_is_reported_with_its_offset() {
        let stream =
            EchoStream::connect(echo_server(Some(5000)), fast(2), Duration::from_secs(5)).unwrap();
        let error = stream
            .wait_for_received(1 << 30, Duration::from_secs(10))
            .unwrap_err()
            .to_string();
        assert!(error.contains("echoed byte 5000 is wrong"), "{error}");
        assert!(stream.finish(Duration::from_secs(5)).is_err());
    }

    #[test]
    fn an_echo_that_closes_early_is_a_failure() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            let (socket, _) = listener.accept().unwrap();
            drop(socket);
        });
        let stream = EchoStream::connect(address, fast(3), Duration::from_secs(5)).unwrap();
        let error = stream
            .wait_for_received(1 << 30, Duration::from_secs(10))
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("closed the connection")
                || error.contains("writing")
                || error.contains("reading"),
            "{error}"
        );
    }
}
