//! `cargo xtask bench boot`: boot time of the `hello` image under TCG and idle CPU cost.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::accel::Accel;
use crate::error::{Error, Result};
use crate::qemu::QemuBuilder;

/// Serial marker of the first line `hello` prints.
pub const FIRST_APP_LINE: &str = "cmdline:";
/// Serial marker printed once `hello.stay=1` is idle.
pub const IDLE_LINE: &str = "hello: waiting for hot-plug events";
/// How long one boot may take under TCG on a slow machine.
const BOOT_TIMEOUT: Duration = Duration::from_secs(180);
/// How long idle CPU use is sampled.
pub const IDLE_SAMPLE: Duration = Duration::from_secs(5);

/// The kernel timestamp (seconds since boot) of a `[    0.012345] INFO ...` log line.
pub fn kernel_timestamp(line: &str) -> Option<f64> {
    let rest = line.trim_start().strip_prefix('[')?;
    let (seconds, _) = rest.split_once(']')?;
    seconds.trim().parse().ok()
}

/// The latest kernel timestamp among `lines[..end]`.
pub fn last_timestamp_before(lines: &[String], end: usize) -> Option<f64> {
    lines[..end.min(lines.len())]
        .iter()
        .rev()
        .find_map(|line| kernel_timestamp(line))
}

/// utime + stime (clock ticks) from the text of /proc/<pid>/stat.
pub fn cpu_ticks_from_stat(stat: &str) -> Option<u64> {
    // The command name (field 2) may contain spaces, so count fields after its closing ')'.
    let (_, after_name) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // Fields 14 (utime) and 15 (stime) of proc(5); `fields[0]` is field 3.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// The median of `values` (mean of the middle two for an even count); `None` when empty.
pub fn median(values: &[f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let middle = sorted.len() / 2;
    Some(if sorted.len().is_multiple_of(2) {
        (sorted[middle - 1] + sorted[middle]) / 2.0
    } else {
        sorted[middle]
    })
}

/// Clock ticks per second for /proc/<pid>/stat (`getconf CLK_TCK`, 100 if unavailable).
fn clock_ticks_per_second() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|output| String::from_utf8_lossy(&output.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

fn read_cpu_ticks(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).map_err(|error| Error::io(&path, error))?;
    cpu_ticks_from_stat(&stat).ok_or_else(|| {
        Error::io(
            &path,
            std::io::Error::new(std::io::ErrorKind::InvalidData, "unexpected format"),
        )
    })
}

/// One boot's measurements.
#[derive(Clone, Copy, Debug)]
pub struct BootSample {
    /// Host time from starting QEMU to the app's first line.
    pub host: Duration,
    /// The kernel's own timestamp just before that line, if it printed one.
    pub guest_seconds: Option<f64>,
}

/// Boots `elf` once under TCG and times the app's first line.
pub fn boot_once(elf: &Path, run: usize) -> Result<BootSample> {
    let mut qemu = QemuBuilder::new(format!("bench boot #{run}"), Accel::Tcg)
        .echo(false)
        .kernel(elf)
        .spawn()?;
    let line = qemu.wait_for_serial_line(FIRST_APP_LINE, BOOT_TIMEOUT)?;
    let guest_seconds = last_timestamp_before(&qemu.serial_lines(), line.index);
    Ok(BootSample {
        host: line.since_start,
        guest_seconds,
    })
}

/// Host CPU use (percent of one CPU) of an idle `hello.stay=1` guest under TCG.
pub fn idle_cpu_percent(elf: &Path) -> Result<f64> {
    let mut qemu = QemuBuilder::new("bench idle", Accel::Tcg)
        .echo(false)
        .kernel(elf)
        .cmdline("hello.stay=1")
        .spawn()?;
    qemu.wait_for_line(IDLE_LINE, BOOT_TIMEOUT)?;
    let ticks_per_second = clock_ticks_per_second();
    let before = read_cpu_ticks(qemu.pid())?;
    let start = Instant::now();
    std::thread::sleep(IDLE_SAMPLE);
    let after = read_cpu_ticks(qemu.pid())?;
    let elapsed = start.elapsed().as_secs_f64();
    Ok((after.saturating_sub(before) as f64 / ticks_per_second) / elapsed * 100.0)
}

/// Runs the whole boot benchmark and prints the numbers.
pub fn boot_benchmark(elf: &Path, runs: usize) -> Result<()> {
    let mut host = Vec::new();
    let mut guest = Vec::new();
    for run in 1..=runs {
        let sample = boot_once(elf, run)?;
        let guest_text = sample.guest_seconds.map_or("n/a".to_string(), |seconds| {
            format!("{:.1} ms", seconds * 1000.0)
        });
        println!(
            "boot #{run}: host {:.1} ms to `{FIRST_APP_LINE}`, guest clock {guest_text}",
            sample.host.as_secs_f64() * 1000.0
        );
        host.push(sample.host.as_secs_f64());
        guest.extend(sample.guest_seconds);
    }
    let idle = idle_cpu_percent(elf)?;
    println!("--- bench boot (TCG, {runs} runs) ---");
    if let Some(median_host) = median(&host) {
        println!(
            "median host time from QEMU start to `{FIRST_APP_LINE}`: {:.1} ms",
            median_host * 1000.0
        );
    }
    match median(&guest) {
        Some(median_guest) => println!(
            "median guest time (kernel clock) at `{FIRST_APP_LINE}`: {:.1} ms",
            median_guest * 1000.0
        ),
        None => println!("median guest time: n/a (no timestamped kernel line before it)"),
    }
    println!(
        "host CPU of an idle guest (hello.stay=1) over {} s: {idle:.1} %",
        IDLE_SAMPLE.as_secs()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_timestamps_are_parsed_from_log_lines_only() {
        assert_eq!(
            kernel_timestamp("[    0.012345] INFO  pci: scan done"),
            Some(0.012345)
        );
        assert_eq!(kernel_timestamp("[   12.500000] DEBUG x"), Some(12.5));
        assert_eq!(kernel_timestamp("cmdline: log=debug"), None);
        assert_eq!(kernel_timestamp("  bar0 mem32 0xfe000000"), None);
        assert_eq!(kernel_timestamp("[x] y"), None);
    }

    #[test]
    fn guest_time_is_the_last_log_line_before_the_marker() {
        let lines: Vec<String> = [
            "Tandem guest kernel",
            "[    0.001000] INFO  memory",
            "[    0.020000] INFO  starting app",
            "cmdline: ",
            "[    0.030000] INFO  later",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(last_timestamp_before(&lines, 3), Some(0.02));
        assert_eq!(last_timestamp_before(&lines, 1), None);
    }

    #[test]
    fn proc_stat_ticks_survive_spaces_in_the_name() {
        let stat = "4242 (qemu-system (x86)) S 1 4242 4242 0 -1 4194560 2000 0 0 0 \
                    150 25 0 0 20 0 3 0 100 123456 789 18446744073709551615";
        assert_eq!(cpu_ticks_from_stat(stat), Some(175));
        assert_eq!(cpu_ticks_from_stat("4242 (short) S 1"), None);
        let own = std::fs::read_to_string("/proc/self/stat").unwrap();
        assert!(cpu_ticks_from_stat(&own).is_some());
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(&[]), None);
    }
}
