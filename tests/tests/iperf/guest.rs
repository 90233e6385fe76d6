//! The iperf app booted on the test namespace's tap(s), and the checks every client run
//! shares: the client's exit code and report, and the app's parameter and summary lines.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use tandem_tests::BOOT_TIMEOUT;
use tandem_tests::topology::{GUEST_ADDRESS, HOST_ADDRESS, PREFIX_LENGTH};
use xtask::bench_iperf::{
    ClientOutcome, GUEST_MEMORY, GuestNetwork, IPERF_PORT, IperfVm, PARAMETERS_MARK, RunningClient,
    TEST_DONE_LINE, guest_launch, run_client,
};
use xtask::machine::NetPaths;
use xtask::{Accel, Error};

use crate::client::{Mode, Refusal, check_throughput, summary_rate};

/// The app's line when a session is over (all its connections closed or closing).
const SESSION_FINISHED_MARK: &str = " finished (";
/// Time a client may take beyond its own `-t` (connection set-up and result exchange under
/// TCG on a busy 2-core machine).
pub const CLIENT_GRACE: Duration = Duration::from_secs(60);
/// Time the app gets to print a line about a test once the client has done its part.
pub const LINE_TIMEOUT: Duration = Duration::from_secs(60);
/// Serial lines a failure message shows.
const EXCERPT_LINES: usize = 50;

/// The iperf app in a VM, with the test-side checks.
pub struct IperfGuest {
    /// The VM (QEMU, lab socket, PF netdev).
    pub vm: IperfVm,
}

impl IperfGuest {
    /// Boots the app (call inside the topology's `run`) on `taps` with the NICs `paths`
    /// asks for, in [`GUEST_MEMORY`] (the README's 32 MiB), as [`GUEST_ADDRESS`], and waits
    /// until it serves with its link up.
    pub fn boot(label: &str, elf: &Path, paths: NetPaths, taps: &[&str]) -> IperfGuest {
        static INSTANCE: AtomicU32 = AtomicU32::new(0);
        let socket = std::env::temp_dir().join(format!(
            "tandem-iperf-{}-{}.lab",
            std::process::id(),
            INSTANCE.fetch_add(1, Ordering::Relaxed)
        ));
        let network = GuestNetwork {
            paths,
            taps,
            address: GUEST_ADDRESS,
            prefix_length: PREFIX_LENGTH,
            gateway: HOST_ADDRESS,
        };
        let vm = guest_launch(label, Accel::Tcg, elf, &network, GUEST_MEMORY, "", &socket)
            .and_then(|launch| launch.boot(BOOT_TIMEOUT))
            .unwrap_or_else(|error| panic!("booting {label}: {error}"));
        IperfGuest { vm }
    }

    /// The lab channel's socket (the guest has one when it has the VF path).
    pub fn lab(&self) -> PathBuf {
        self.vm
            .lab_socket
            .clone()
            .unwrap_or_else(|| self.fail("this guest has no lab channel"))
    }

    /// The last serial lines (without the lab channel's `stats` answers, which the waits
    /// poll for) and QEMU's command line.
    pub fn excerpt(&self) -> String {
        let qemu = &self.vm.qemu;
        let mut shown = qemu.serial_lines();
        shown.retain(|line| !line.contains("lab control: stats"));
        let skipped = shown.len().saturating_sub(EXCERPT_LINES);
        let mut text = format!(
            "--- {} serial, stats answers left out, last {} lines ---\n",
            qemu.label(),
            shown.len() - skipped
        );
        for line in &shown[skipped..] {
            text.push_str(line);
            text.push('\n');
        }
        text + "--- QEMU command ---\n" + qemu.command_line()
    }

    /// Panics with `what` and the serial excerpt.
    pub fn fail(&self, what: impl std::fmt::Display) -> ! {
        panic!("{what}\n{}", self.excerpt())
    }

    /// Unwraps `result` or fails with `when` and the excerpt.
    pub fn ok<T>(&self, when: &str, result: Result<T, Error>) -> T {
        result.unwrap_or_else(|error| self.fail(format!("{when}: {error}")))
    }

    /// Waits for the next serial line containing `needle`; returns it with its index.
    pub fn wait_line(&mut self, needle: &str, when: &str) -> (usize, String) {
        let result = self.vm.qemu.wait_for_serial_line(needle, LINE_TIMEOUT);
        let line = self.ok(when, result);
        (line.index, line.text)
    }

    /// Starts the client with `args` (split at spaces) in the background.
    pub fn spawn_client(&self, args: &str) -> RunningClient {
        let args: Vec<&str> = args.split_whitespace().collect();
        self.ok(
            "starting iperf3",
            RunningClient::spawn(GUEST_ADDRESS, IPERF_PORT, &args),
        )
    }

    /// Runs the client with `args` to its end.
    pub fn client(&self, args: &str, seconds: u64) -> ClientOutcome {
        let words: Vec<&str> = args.split_whitespace().collect();
        let timeout = Duration::from_secs(seconds) + CLIENT_GRACE;
        self.ok(
            &format!("iperf3 {args}"),
            run_client(GUEST_ADDRESS, IPERF_PORT, &words, timeout),
        )
    }

    /// Checks a finished client run of `mode`: exit code 0, a rate above zero in every half
    /// of its report, the output fragments; then the app's parameter line for the test
    /// (`parameters`, or else the next one on the serial console) and its summary line (the
    /// next one). Returns the summary line.
    pub fn check_success(
        &mut self,
        mode: &Mode,
        outcome: &ClientOutcome,
        parameters: Option<String>,
    ) -> String {
        if !outcome.succeeded() {
            self.fail(format!("iperf3 {} must succeed\n{outcome}", mode.args));
        }
        let roles: &[Option<&str>] = if mode.bidirectional {
            &[Some("TX-C"), Some("RX-C")]
        } else {
            &[None]
        };
        if let Err(problem) = check_throughput(&outcome.stdout, roles) {
            self.fail(format!("iperf3 {}: {problem}\n{outcome}", mode.args));
        }
        let text = outcome.text();
        for fragment in mode.output {
            if !text.contains(fragment) {
                self.fail(format!(
                    "iperf3 {}: the output lacks {fragment:?}\n{outcome}",
                    mode.args
                ));
            }
        }
        let when = format!("the app's lines for iperf3 {}", mode.args);
        let parameters = parameters.unwrap_or_else(|| self.wait_line(PARAMETERS_MARK, &when).1);
        let (_, summary) = self.wait_line(TEST_DONE_LINE, &when);
        // The next client may only come once this session is over: the stock client quits
        // right after IPERF_DONE, and a server still closing the streams answers "busy" (the
        // app finishes them within a second, longer than the next client takes on a busy host).
        self.wait_line(SESSION_FINISHED_MARK, &when);
        for (line, fragments) in [(&parameters, mode.parameters), (&summary, mode.summary)] {
            for fragment in fragments {
                if !line.contains(fragment) {
                    self.fail(format!(
                        "iperf3 {}: the app's line lacks {fragment:?}: {line}",
                        mode.args
                    ));
                }
            }
        }
        if !summary_rate(&summary).is_some_and(|rate| rate > 0.0) {
            self.fail(format!(
                "iperf3 {}: the app counted no throughput: {summary}",
                mode.args
            ));
        }
        summary
    }

    /// Runs `mode` and checks it (see [`IperfGuest::check_success`]).
    pub fn run_mode(&mut self, mode: &Mode) -> String {
        let seconds = mode_seconds(mode.args);
        let outcome = self.client(mode.args, seconds);
        let summary = self.check_success(mode, &outcome, None);
        eprintln!(
            "{}: iperf3 {} ok in {:.1} s; {}",
            self.vm.qemu.label(),
            mode.args,
            outcome.elapsed.as_secs_f64(),
            summary
                .split_once(TEST_DONE_LINE)
                .map_or(summary.as_str(), |(_, rest)| rest)
        );
        summary
    }

    /// Runs `refusal` and checks the client fails with its message and the app says why.
    pub fn run_refusal(&mut self, refusal: &Refusal) {
        let outcome = self.client(refusal.args, 0);
        if outcome.exit_code != Some(1) || !outcome.text().contains(refusal.message) {
            self.fail(format!(
                "iperf3 {} must fail with exit code 1 and {:?}\n{outcome}",
                refusal.args, refusal.message
            ));
        }
        self.wait_line(
            refusal.log,
            &format!("the app's refusal of {}", refusal.args),
        );
    }

    /// Fails unless QEMU still runs and the guest printed no panic or CPU exception report.
    pub fn assert_alive(&mut self, when: &str) {
        let running = matches!(
            self.vm.qemu.wait_for_exit(Duration::ZERO),
            Err(Error::Timeout { .. })
        );
        let crash = self
            .vm
            .qemu
            .serial_lines()
            .into_iter()
            .find(|line| line.contains("panic:") || line.contains("EXCEPTION"));
        if !running || crash.is_some() {
            self.fail(format!(
                "{when}: the guest must still run, uncrashed (QEMU running: {running}, crash \
                 report: {crash:?})"
            ));
        }
    }
}

/// The seconds a client with `args` runs: `-t` plus `-O` (iperf3's defaults: 10 and 0).
pub fn mode_seconds(args: &str) -> u64 {
    let words: Vec<&str> = args.split_whitespace().collect();
    let value = |flag: &str, default: u64| {
        words
            .windows(2)
            .find(|pair| pair[0] == flag)
            .and_then(|pair| pair[1].parse().ok())
            .unwrap_or(default)
    };
    value("-t", 10) + value("-O", 0)
}

#[test]
fn run_time_counts_test_and_omitted_seconds() {
    assert_eq!(mode_seconds("-t 3 -O 1"), 4);
    assert_eq!(mode_seconds("-u -t 2 -l 1K -b 10M"), 2);
    assert_eq!(mode_seconds("-R"), 10);
}
