//! A running QEMU guest for tests and benchmarks: serial capture, exit code, QMP, kill on drop.
//!
//! QEMU's serial port is its stdout (`-serial stdio`), read by a background thread that keeps
//! every line (with its arrival time) and echoes it to stderr prefixed with the guest's label, so
//! a failing test shows what the guest printed. QEMU's own stderr is kept the same way.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::accel::Accel;
use crate::error::{Error, Result};
use crate::exit::QemuExit;
use crate::machine::{Machine, shell_command_line};
use crate::qmp::Qmp;
use crate::tools::QEMU_BINARY;

/// Extra QEMU arguments for every instance (space-separated), for profiling.
pub const EXTRA_ARGS_ENV: &str = "TANDEM_QEMU_EXTRA_ARGS";

/// How many trailing serial lines an error message shows.
const CONTEXT_LINES: usize = 40;
/// How long QEMU gets to create its QMP socket.
const QMP_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// One line the guest printed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SerialLine {
    /// The text, without the line ending.
    pub text: String,
    /// Position among all lines printed so far.
    pub index: usize,
    /// When it arrived, measured from just before QEMU was started.
    pub since_start: Duration,
}

#[derive(Default)]
struct CapturedLines {
    lines: Vec<(Duration, String)>,
    closed: bool,
}

/// Lines from one of QEMU's output pipes, filled by a reader thread.
#[derive(Default)]
struct Capture {
    state: Mutex<CapturedLines>,
    changed: Condvar,
}

impl Capture {
    fn lock(&self) -> MutexGuard<'_, CapturedLines> {
        // A panicking reader thread cannot leave the line list half-updated; keep using it.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Reads `pipe` to its end, storing each line and echoing it to stderr under `prefix`
    /// (unless `prefix` is `None`).
    fn spawn_reader(
        self: &Arc<Self>,
        pipe: impl Read + Send + 'static,
        prefix: Option<String>,
        started: Instant,
    ) {
        let capture = Arc::clone(self);
        std::thread::spawn(move || {
            let mut reader = BufReader::new(pipe);
            let mut buffer = Vec::new();
            loop {
                buffer.clear();
                match reader.read_until(b'\n', &mut buffer) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let text = String::from_utf8_lossy(&buffer)
                            .trim_end_matches(['\r', '\n'])
                            .to_string();
                        if let Some(prefix) = &prefix {
                            eprintln!("{prefix}{text}");
                        }
                        capture.lock().lines.push((started.elapsed(), text));
                        capture.changed.notify_all();
                    }
                }
            }
            capture.lock().closed = true;
            capture.changed.notify_all();
        });
    }

    fn tail(&self, count: usize) -> Vec<String> {
        let state = self.lock();
        let start = state.lines.len().saturating_sub(count);
        state.lines[start..]
            .iter()
            .map(|(_, text)| text.clone())
            .collect()
    }
}

/// Builder for a [`Qemu`] guest.
#[derive(Clone, Debug)]
pub struct QemuBuilder {
    label: String,
    machine: Machine,
    echo: bool,
}

impl QemuBuilder {
    /// A guest labelled `label` (the prefix of its echoed serial lines) on `accel`.
    pub fn new(label: impl Into<String>, accel: Accel) -> Self {
        QemuBuilder {
            label: label.into(),
            machine: Machine::new(accel),
            echo: true,
        }
    }

    /// Whether serial lines, QEMU's stderr and the command line are echoed to our stderr
    /// (default: yes, so a failing test shows them).
    pub fn echo(mut self, echo: bool) -> Self {
        self.echo = echo;
        self
    }

    /// The kernel ELF to boot; without one the firmware runs alone.
    pub fn kernel(mut self, elf: impl Into<PathBuf>) -> Self {
        self.machine.kernel = Some(elf.into());
        self
    }

    /// The kernel command line.
    pub fn cmdline(mut self, cmdline: impl Into<String>) -> Self {
        self.machine.cmdline = cmdline.into();
        self
    }

    /// The board (default q35).
    pub fn board(mut self, board: crate::machine::Board) -> Self {
        self.machine.board = board;
        self
    }

    /// Guest memory (QEMU `-m` syntax).
    pub fn memory(mut self, memory: impl Into<String>) -> Self {
        self.machine.memory = memory.into();
        self
    }

    /// Adds a `-netdev` (e.g. `user,id=n0`).
    pub fn netdev(mut self, spec: impl Into<String>) -> Self {
        self.machine.netdevs.push(spec.into());
        self
    }

    /// Adds a `-device` (e.g. `igb,id=pf0,bus=rp1,netdev=n0`).
    pub fn device(mut self, spec: impl Into<String>) -> Self {
        self.machine.devices.push(spec.into());
        self
    }

    /// Appends a raw QEMU argument.
    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.machine.extra_args.push(arg.into());
        self
    }

    /// The QEMU program and the arguments this builder would start it with (no QMP socket).
    pub fn command_line(&self) -> (String, Vec<String>) {
        (QEMU_BINARY.to_string(), self.machine.args())
    }

    /// Starts QEMU with a QMP socket in a fresh private directory.
    pub fn spawn(mut self) -> Result<Qemu> {
        static INSTANCE: AtomicU32 = AtomicU32::new(0);
        let instance = INSTANCE.fetch_add(1, Ordering::Relaxed);
        // Unix socket paths are limited to 108 bytes, so stay in the (short) temp dir.
        let socket_dir =
            std::env::temp_dir().join(format!("tandem-qemu-{}-{instance}", std::process::id()));
        std::fs::create_dir_all(&socket_dir)
            .map_err(|error| Error::io(format!("creating {}", socket_dir.display()), error))?;
        let qmp_socket = socket_dir.join("qmp.sock");
        self.machine.qmp_socket = Some(qmp_socket.clone());
        let mut args = self.machine.args();
        // Profiling hook: extra QEMU arguments, e.g. `-perfmap` so `perf` can name the guest
        // code behind QEMU's translated blocks.
        if let Ok(extra) = std::env::var(EXTRA_ARGS_ENV) {
            args.extend(extra.split_whitespace().map(str::to_string));
        }
        let command_line = shell_command_line(QEMU_BINARY, &args);
        if self.echo {
            eprintln!("[{}] $ {command_line}", self.label);
        }
        let started = Instant::now();
        let mut child = Command::new(QEMU_BINARY)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|error| Error::io(format!("starting {QEMU_BINARY}"), error))?;
        let serial = Arc::new(Capture::default());
        let stderr = Arc::new(Capture::default());
        if let Some(pipe) = child.stdout.take() {
            let prefix = self.echo.then(|| format!("[{}] ", self.label));
            serial.spawn_reader(pipe, prefix, started);
        }
        if let Some(pipe) = child.stderr.take() {
            let prefix = self.echo.then(|| format!("[{} qemu stderr] ", self.label));
            stderr.spawn_reader(pipe, prefix, started);
        }
        Ok(Qemu {
            label: self.label,
            child,
            serial,
            stderr,
            cursor: 0,
            qmp: None,
            socket_dir,
            qmp_socket,
            command_line,
            exit: None,
        })
    }
}

/// A running QEMU; killed (and its socket removed) on drop.
pub struct Qemu {
    label: String,
    child: Child,
    serial: Arc<Capture>,
    stderr: Arc<Capture>,
    /// Lines before this index were already matched by a wait.
    cursor: usize,
    qmp: Option<Qmp>,
    socket_dir: PathBuf,
    qmp_socket: PathBuf,
    command_line: String,
    exit: Option<QemuExit>,
}

impl Qemu {
    /// The label given to the builder.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// QEMU's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The QEMU command line, shell-quoted.
    pub fn command_line(&self) -> &str {
        &self.command_line
    }

    /// The QMP socket path.
    pub fn qmp_socket(&self) -> &Path {
        &self.qmp_socket
    }

    /// Every serial line so far.
    pub fn serial_lines(&self) -> Vec<String> {
        self.serial
            .lock()
            .lines
            .iter()
            .map(|(_, text)| text.clone())
            .collect()
    }

    /// Every serial line so far, joined with newlines.
    pub fn serial_text(&self) -> String {
        self.serial_lines().join("\n")
    }

    /// The tail of serial output and QEMU's stderr, for error messages.
    pub fn diagnostics(&self) -> String {
        let serial = self.serial.tail(CONTEXT_LINES);
        let stderr = self.stderr.tail(CONTEXT_LINES);
        let mut text = format!(
            "--- {}: last {} serial lines ---\n{}",
            self.label,
            serial.len(),
            serial.join("\n")
        );
        if !stderr.is_empty() {
            text.push_str(&format!("\n--- QEMU stderr ---\n{}", stderr.join("\n")));
        }
        text.push_str(&format!("\n--- command ---\n{}", self.command_line));
        text
    }

    /// Waits for the next serial line (after the last one matched) containing `needle`.
    pub fn wait_for_line(&mut self, needle: &str, timeout: Duration) -> Result<String> {
        self.wait_for_serial_line(needle, timeout)
            .map(|line| line.text)
    }

    /// Like [`Qemu::wait_for_line`], with the line's position and arrival time.
    pub fn wait_for_serial_line(&mut self, needle: &str, timeout: Duration) -> Result<SerialLine> {
        let deadline = Instant::now() + timeout;
        let waiting_for = || format!("a serial line containing {needle:?}");
        let mut state = self.serial.lock();
        loop {
            let found = state.lines[self.cursor..]
                .iter()
                .position(|(_, text)| text.contains(needle));
            if let Some(offset) = found {
                let index = self.cursor + offset;
                let (since_start, text) = state.lines[index].clone();
                self.cursor = index + 1;
                return Ok(SerialLine {
                    text,
                    index,
                    since_start,
                });
            }
            if state.closed {
                drop(state);
                let exit = self.reap(Duration::from_secs(5))?;
                return Err(match exit {
                    Some(exit) => Error::QemuExited {
                        waiting_for: waiting_for(),
                        exit,
                        context: self.diagnostics(),
                    },
                    None => Error::Timeout {
                        waiting_for: format!(
                            "QEMU to exit after closing its stdout ({})",
                            waiting_for()
                        ),
                        after: Duration::from_secs(5),
                        context: self.diagnostics(),
                    },
                });
            }
            let now = Instant::now();
            if now >= deadline {
                drop(state);
                return Err(Error::Timeout {
                    waiting_for: waiting_for(),
                    after: timeout,
                    context: self.diagnostics(),
                });
            }
            state = self
                .serial
                .changed
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .0;
        }
    }

    /// Waits up to `timeout` for QEMU to end; `None` if it is still running.
    fn reap(&mut self, timeout: Duration) -> Result<Option<QemuExit>> {
        if self.exit.is_some() {
            return Ok(self.exit);
        }
        let deadline = Instant::now() + timeout;
        loop {
            let status = self
                .child
                .try_wait()
                .map_err(|error| Error::io("waiting for QEMU", error))?;
            if let Some(status) = status {
                self.exit = Some(QemuExit::from_status(status));
                // Let the reader threads drain what QEMU wrote last.
                for capture in [&self.serial, &self.stderr] {
                    let state = capture.lock();
                    let _ = capture.changed.wait_timeout_while(
                        state,
                        Duration::from_secs(5),
                        |state| !state.closed,
                    );
                }
                return Ok(self.exit);
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for QEMU to end and reports how.
    pub fn wait_for_exit(&mut self, timeout: Duration) -> Result<QemuExit> {
        self.reap(timeout)?.ok_or_else(|| Error::Timeout {
            waiting_for: "QEMU to exit".to_string(),
            after: timeout,
            context: self.diagnostics(),
        })
    }

    /// Waits for the guest to exit and returns its exit code; QEMU failures are errors.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<u8> {
        match self.wait_for_exit(timeout)? {
            QemuExit::Guest(code) => Ok(code),
            exit => Err(Error::QemuExited {
                waiting_for: "the guest's exit code".to_string(),
                exit,
                context: self.diagnostics(),
            }),
        }
    }

    /// The QMP session, connected on first use.
    pub fn qmp(&mut self) -> Result<&mut Qmp> {
        if self.qmp.is_none() {
            self.qmp = Some(Qmp::connect(&self.qmp_socket, QMP_CONNECT_TIMEOUT)?);
        }
        // The branch above filled it.
        self.qmp
            .as_mut()
            .ok_or_else(|| Error::QmpProtocol("no QMP session".to_string()))
    }

    /// Kills QEMU now (no-op if it already ended).
    pub fn kill(&mut self) {
        if self.exit.is_none() {
            let _ = self.child.kill();
            if let Ok(status) = self.child.wait() {
                self.exit = Some(QemuExit::from_status(status));
            }
        }
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        self.qmp = None;
        self.kill();
        let _ = std::fs::remove_dir_all(&self.socket_dir);
    }
}
