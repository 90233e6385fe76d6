//! The engine: deterministic case generation, one case run under panic, step, memory and time
//! checks, shrinking of a failing input, and the per-target report.

use std::cell::RefCell;
use std::fmt::Write as _;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::memory;

/// Set by `--trace`: targets print what they do (for reading a reproducer).
pub static TRACE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// True when targets should print what they do.
pub fn tracing() -> bool {
    TRACE.load(Ordering::Relaxed)
}

/// What a target's case function returns: `Err` names the broken invariant.
pub type Outcome = Result<(), String>;

/// One fuzz target: a parser or state machine fed hostile bytes. Registered in
/// [`crate::targets::TARGETS`].
pub struct Target {
    /// Name on the command line (`--target NAME`).
    pub name: &'static str,
    /// What the input drives and what is checked, one line.
    pub about: &'static str,
    /// Cases run by default (the defaults of all targets add up to at least 10⁶).
    pub default_cases: u64,
    /// Longest input generated.
    pub max_input_len: usize,
    /// Most heap bytes one case may hold at once (driver, fake device, stack and all).
    pub memory_bound: usize,
    /// Most steps one case may take (what a step is — a register read, a loader-memory read, a
    /// poll — is the target's to say; every loop of the code under test is behind some step).
    pub step_bound: u64,
    /// Well-formed inputs the generator mutates (the rest is random bytes).
    pub seeds: fn() -> Vec<Vec<u8>>,
    /// Runs one case.
    pub run: fn(&mut Input, &mut Steps) -> Outcome,
}

/// The hostile input of one case, read front to back; reads past the end give zeros.
pub struct Input<'a> {
    bytes: &'a [u8],
    position: usize,
}

impl<'a> Input<'a> {
    /// Wraps the bytes of one case.
    pub fn new(bytes: &'a [u8]) -> Self {
        Input { bytes, position: 0 }
    }

    /// True when every byte has been read.
    pub fn is_empty(&self) -> bool {
        self.position >= self.bytes.len()
    }

    /// Bytes not read yet.
    pub fn remaining(&self) -> usize {
        self.bytes.len().saturating_sub(self.position)
    }

    /// The next byte (0 past the end).
    pub fn u8(&mut self) -> u8 {
        let byte = self.bytes.get(self.position).copied().unwrap_or(0);
        self.position += 1;
        byte
    }

    /// The next two bytes, little-endian.
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }

    /// The next four bytes, little-endian.
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }

    /// The next eight bytes, little-endian.
    pub fn u64(&mut self) -> u64 {
        u64::from(self.u32()) | (u64::from(self.u32()) << 32)
    }

    /// A coin toss.
    pub fn bool(&mut self) -> bool {
        self.u8() & 1 == 1
    }

    /// A number below `bound` (0 when `bound` is 0).
    pub fn below(&mut self, bound: usize) -> usize {
        if bound == 0 {
            return 0;
        }
        if bound <= 256 {
            usize::from(self.u8()) % bound
        } else if bound <= 65536 {
            usize::from(self.u16()) % bound
        } else {
            self.u32() as usize % bound
        }
    }

    /// Up to `max` bytes: a length (one byte up to 255, two up to 65535, else four), then that
    /// many bytes (fewer at the end).
    pub fn bytes(&mut self, max: usize) -> &'a [u8] {
        let wanted = self.below(max.saturating_add(1));
        self.take(wanted)
    }

    /// Exactly the next `len` bytes, or what is left.
    pub fn take(&mut self, len: usize) -> &'a [u8] {
        let start = self.position.min(self.bytes.len());
        let end = start.saturating_add(len).min(self.bytes.len());
        self.position = start + len.min(usize::MAX - start);
        &self.bytes[start..end]
    }

    /// Everything not read yet.
    pub fn rest(&mut self) -> &'a [u8] {
        let start = self.position.min(self.bytes.len());
        self.position = self.bytes.len();
        &self.bytes[start..]
    }
}

/// Step accounting of one case, against the target's bound.
pub struct Steps {
    taken: u64,
    bound: u64,
}

impl Steps {
    /// A fresh count with `bound` allowed steps.
    pub fn new(bound: u64) -> Self {
        Steps { taken: 0, bound }
    }

    /// Counts `steps` more; `Err` once the bound is passed (a loop that does not end).
    pub fn count(&mut self, steps: u64) -> Outcome {
        self.taken = self.taken.saturating_add(steps);
        if self.taken > self.bound {
            return Err(format!(
                "step bound exceeded: {} steps > {}",
                self.taken, self.bound
            ));
        }
        Ok(())
    }

    /// Sets the count to an absolute figure the target measured itself (a fake device's read
    /// counter); `Err` once the bound is passed.
    pub fn observe(&mut self, total: u64) -> Outcome {
        self.taken = self.taken.max(total);
        self.count(0)
    }

    /// Steps taken so far.
    pub fn taken(&self) -> u64 {
        self.taken
    }
}

/// Fails the case with `message` unless `condition` holds.
pub fn check(condition: bool, message: impl FnOnce() -> String) -> Outcome {
    if condition { Ok(()) } else { Err(message()) }
}

/// Fails unless every field of `after` is at least the same field of `before` (counters that
/// only ever grow).
pub fn monotonic(what: &str, before: &[(&str, u64)], after: &[(&str, u64)]) -> Outcome {
    for ((name, old), (_, new)) in before.iter().zip(after) {
        if new < old {
            return Err(format!(
                "{what} counter {name} went backwards: {old} -> {new}"
            ));
        }
    }
    Ok(())
}

/// How a case failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FailureKind {
    /// The code under test panicked.
    Panic,
    /// A checked invariant (or the step bound) does not hold.
    Invariant,
    /// The case held more heap than the target's bound.
    Memory,
}

/// One failing case.
#[derive(Clone, Debug)]
pub struct Failure {
    /// What went wrong.
    pub kind: FailureKind,
    /// The panic message or the broken invariant.
    pub message: String,
}

/// Counters of one case that passed.
#[derive(Clone, Copy, Debug, Default)]
pub struct CaseFigures {
    /// Steps the case took.
    pub steps: u64,
    /// Peak heap bytes above the case's start.
    pub peak_bytes: usize,
}

thread_local! {
    static PANIC_MESSAGE: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Replaces the panic hook with one that records the message (with its location) for the
/// report instead of printing it: a million cases may panic the same way.
pub fn capture_panics() {
    panic::set_hook(Box::new(|info| {
        let payload = info.payload();
        let text = payload
            .downcast_ref::<&str>()
            .map(|text| (*text).to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "(non-string panic payload)".to_string());
        let location = info
            .location()
            .map(|location| format!(" at {}:{}", location.file(), location.line()))
            .unwrap_or_default();
        PANIC_MESSAGE.with(|slot| *slot.borrow_mut() = Some(format!("{text}{location}")));
    }));
}

/// Runs `target` on `bytes` once.
pub fn run_case(target: &Target, bytes: &[u8]) -> Result<CaseFigures, Failure> {
    let start_bytes = memory::live_bytes();
    memory::reset_peak();
    let mut steps = Steps::new(target.step_bound);
    let result = panic::catch_unwind(AssertUnwindSafe(|| {
        let mut input = Input::new(bytes);
        (target.run)(&mut input, &mut steps)
    }));
    let peak_bytes = memory::peak_bytes().saturating_sub(start_bytes);
    match result {
        Err(_) => Err(Failure {
            kind: FailureKind::Panic,
            message: PANIC_MESSAGE
                .with(|slot| slot.borrow_mut().take())
                .unwrap_or_else(|| "panic".to_string()),
        }),
        Ok(Err(message)) => Err(Failure {
            kind: FailureKind::Invariant,
            message,
        }),
        Ok(Ok(())) if peak_bytes > target.memory_bound => Err(Failure {
            kind: FailureKind::Memory,
            message: format!(
                "case held {peak_bytes} heap bytes, bound {}",
                target.memory_bound
            ),
        }),
        Ok(Ok(())) => Ok(CaseFigures {
            steps: steps.taken(),
            peak_bytes,
        }),
    }
}

/// A small, fast, seedable generator (SplitMix64): cases are a pure function of seed and index.
#[derive(Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator for case `index` of `target` under `seed`.
    pub fn for_case(seed: u64, target: &str, index: u64) -> Rng {
        let mut name_hash: u64 = 0xcbf2_9ce4_8422_2325;
        for byte in target.bytes() {
            name_hash = (name_hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
        }
        let mut rng = Rng(seed ^ name_hash ^ index.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        rng.next_u64();
        rng
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number below `bound` (0 when `bound` is 0).
    pub fn below(&mut self, bound: usize) -> usize {
        if bound == 0 {
            0
        } else {
            (self.next_u64() % bound as u64) as usize
        }
    }
}

/// Values that break naive length and index arithmetic.
const INTERESTING: [u32; 14] = [
    0,
    1,
    2,
    0x7f,
    0x80,
    0xff,
    0x100,
    0x5dc,
    0x5ea,
    0x7fff,
    0x8000,
    0xffff,
    0x7fff_ffff,
    0xffff_ffff,
];

/// The input of case `index`: random bytes, or a seed with a few mutations.
pub fn generate(target: &Target, seeds: &[Vec<u8>], seed: u64, index: u64) -> Vec<u8> {
    let mut rng = Rng::for_case(seed, target.name, index);
    let max = target.max_input_len;
    if seeds.is_empty() || rng.below(4) == 0 {
        let scale = [16, 64, 256, max][rng.below(4)].min(max);
        let len = rng.below(scale + 1);
        return (0..len).map(|_| rng.next_u64() as u8).collect();
    }
    let mut bytes = seeds[rng.below(seeds.len())].clone();
    let mutations = 1 + rng.below(8);
    for _ in 0..mutations {
        mutate(&mut bytes, seeds, &mut rng);
    }
    bytes.truncate(max);
    bytes
}

fn mutate(bytes: &mut Vec<u8>, seeds: &[Vec<u8>], rng: &mut Rng) {
    let len = bytes.len();
    match rng.below(9) {
        0 if len > 0 => {
            let at = rng.below(len);
            bytes[at] ^= 1 << rng.below(8);
        }
        1 if len > 0 => {
            let at = rng.below(len);
            bytes[at] = rng.next_u64() as u8;
        }
        2 if len > 0 => {
            let at = rng.below(len);
            let value = INTERESTING[rng.below(INTERESTING.len())].to_le_bytes();
            let width = [1, 2, 4][rng.below(3)];
            for (offset, byte) in value.iter().take(width).enumerate() {
                if let Some(slot) = bytes.get_mut(at + offset) {
                    *slot = *byte;
                }
            }
        }
        3 => {
            let at = rng.below(len + 1);
            let count = 1 + rng.below(16);
            for _ in 0..count {
                bytes.insert(at, rng.next_u64() as u8);
            }
        }
        4 if len > 0 => {
            let at = rng.below(len);
            let count = 1 + rng.below((len - at).min(32));
            bytes.drain(at..at + count);
        }
        5 if len > 0 => {
            let at = rng.below(len);
            let count = 1 + rng.below((len - at).min(64));
            let chunk: Vec<u8> = bytes[at..at + count].to_vec();
            let to = rng.below(len + 1);
            bytes.splice(to..to, chunk);
        }
        6 => {
            let other = &seeds[rng.below(seeds.len())];
            if !other.is_empty() {
                let from = rng.below(other.len());
                let count = 1 + rng.below(other.len() - from);
                let to = rng.below(len + 1);
                bytes.splice(to..to, other[from..from + count].iter().copied());
            }
        }
        7 if len > 0 => bytes.truncate(rng.below(len)),
        _ => {
            let at = rng.below(len + 1);
            bytes.insert(at, rng.next_u64() as u8);
        }
    }
}

/// Makes a failing input smaller while it still fails the same way (same kind, and for panics
/// the same message): drops chunks, then lowers bytes. Bounded by `budget` runs.
pub fn shrink(target: &Target, input: &[u8], failure: &Failure, budget: usize) -> Vec<u8> {
    let same = |candidate: &[u8]| match run_case(target, candidate) {
        Err(other) => {
            other.kind == failure.kind
                && (failure.kind != FailureKind::Panic || other.message == failure.message)
        }
        Ok(_) => false,
    };
    let mut best = input.to_vec();
    let mut runs = 0;
    let mut chunk = best.len().div_ceil(2).max(1);
    while chunk >= 1 && runs < budget {
        let mut at = 0;
        let mut progressed = false;
        while at < best.len() && runs < budget {
            let end = (at + chunk).min(best.len());
            let mut candidate = best.clone();
            candidate.drain(at..end);
            runs += 1;
            if same(&candidate) {
                best = candidate;
                progressed = true;
            } else {
                at += chunk;
            }
        }
        if !progressed {
            if chunk == 1 {
                break;
            }
            chunk /= 2;
        }
    }
    for at in 0..best.len() {
        for value in [0u8, 1, best[at] / 2] {
            if runs >= budget || best[at] <= value {
                continue;
            }
            let mut candidate = best.clone();
            candidate[at] = value;
            runs += 1;
            if same(&candidate) {
                best = candidate;
                break;
            }
        }
    }
    best
}

/// Lower-case hex of `bytes`.
pub fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::new(), |mut text, byte| {
        let _ = write!(text, "{byte:02x}");
        text
    })
}

/// Bytes from hex (whitespace ignored); `None` when it is not hex.
pub fn from_hex(text: &str) -> Option<Vec<u8>> {
    let digits: Vec<u8> = text.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    if !digits.len().is_multiple_of(2) {
        return None;
    }
    digits
        .chunks(2)
        .map(|pair| u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok())
        .collect()
}

/// What one target's run found.
#[derive(Clone, Debug)]
pub struct TargetReport {
    /// The target.
    pub name: &'static str,
    /// Cases run.
    pub cases: u64,
    /// Cases that failed.
    pub failures: u64,
    /// Wall time.
    pub elapsed: Duration,
    /// Most steps one case took.
    pub max_steps: u64,
    /// Most heap one case held.
    pub max_peak_bytes: usize,
    /// The first failure, shrunk: (failure, minimal input, case index).
    pub first_failure: Option<(Failure, Vec<u8>, u64)>,
}

/// The case running now, for the watchdog.
struct Current {
    target: &'static str,
    started: Instant,
    input: Vec<u8>,
    generation: u64,
}

/// Watches for a case that runs longer than `limit` (a hang): prints its reproducer and ends
/// the process, since a hung case cannot be interrupted from outside.
pub struct Watchdog {
    current: Arc<Mutex<Option<Current>>>,
    generation: Arc<AtomicU64>,
}

impl Watchdog {
    /// Starts the watchdog thread.
    pub fn start(limit: Duration) -> Watchdog {
        let current: Arc<Mutex<Option<Current>>> = Arc::new(Mutex::new(None));
        let generation = Arc::new(AtomicU64::new(0));
        let watched = Arc::clone(&current);
        std::thread::spawn(move || {
            loop {
                std::thread::sleep(Duration::from_millis(250));
                let guard = watched.lock().unwrap_or_else(|poison| poison.into_inner());
                if let Some(case) = guard.as_ref()
                    && case.started.elapsed() > limit
                {
                    eprintln!(
                        "fuzz: HANG in target {} (case {}): no return after {:?}\nfuzz: reproduce: cargo xtask fuzz --target {} --input {}",
                        case.target,
                        case.generation,
                        limit,
                        case.target,
                        to_hex(&case.input)
                    );
                    std::process::exit(3);
                }
            }
        });
        Watchdog {
            current,
            generation,
        }
    }

    fn begin(&self, target: &'static str, input: &[u8], index: u64) {
        self.generation.store(index, Ordering::Relaxed);
        let mut guard = self
            .current
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        *guard = Some(Current {
            target,
            started: Instant::now(),
            input: input.to_vec(),
            generation: index,
        });
    }

    fn end(&self) {
        let mut guard = self
            .current
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        *guard = None;
    }
}

/// Runs `cases` generated cases of `target` under `seed`.
pub fn run_target(
    target: &'static Target,
    cases: u64,
    seed: u64,
    watchdog: &Watchdog,
) -> TargetReport {
    let seeds = (target.seeds)();
    let started = Instant::now();
    let mut report = TargetReport {
        name: target.name,
        cases: 0,
        failures: 0,
        elapsed: Duration::ZERO,
        max_steps: 0,
        max_peak_bytes: 0,
        first_failure: None,
    };
    for index in 0..cases {
        // Each seed once, unmutated, first: the well-formed inputs must pass too.
        let input = match seeds.get(index as usize) {
            Some(seed_input) => seed_input.clone(),
            None => generate(target, &seeds, seed, index),
        };
        watchdog.begin(target.name, &input, index);
        let result = run_case(target, &input);
        watchdog.end();
        report.cases += 1;
        match result {
            Ok(figures) => {
                report.max_steps = report.max_steps.max(figures.steps);
                report.max_peak_bytes = report.max_peak_bytes.max(figures.peak_bytes);
            }
            Err(failure) => {
                report.failures += 1;
                if report.first_failure.is_none() {
                    watchdog.begin(target.name, &input, index);
                    let minimal = shrink(target, &input, &failure, 4000);
                    watchdog.end();
                    let failure = run_case(target, &minimal).err().unwrap_or(failure);
                    report.first_failure = Some((failure, minimal, index));
                }
            }
        }
    }
    report.elapsed = started.elapsed();
    report
}
