//! `tandem-fuzz`: runs the hostile-input targets (usually through `cargo xtask fuzz`).

use std::process::ExitCode;
use std::time::Duration;

use tandem_fuzz::engine::{self, Watchdog, run_case, run_target, to_hex};
use tandem_fuzz::{TARGETS, target};

const USAGE: &str = "\
usage: tandem-fuzz [--target NAME]... [--cases N] [--seed S] [--input HEX] [--list]

  --target NAME  run only this target (repeatable; default: all)
  --cases N      cases per target (default: each target's own count, 10^6 or more in all)
  --seed S       generator seed, decimal or 0x-hex (default 0x7a4d3); a case is a pure function
                 of seed, target and case index
  --input HEX    run one input (a reproducer) on the one --target and print the outcome
  --case I       run case I of the generated sequence (after cases 0..I, as in a full run)
  --list         print the targets with their bounds
  --trace        targets print what they do (with --input or --case)";

/// Seed of runs that do not name one: fixed, so CI runs the same cases every time.
const DEFAULT_SEED: u64 = 0x7a4d3;
/// A case running longer than this is a hang.
const HANG_LIMIT: Duration = Duration::from_secs(20);

struct Options {
    targets: Vec<String>,
    cases: Option<u64>,
    seed: u64,
    input: Option<String>,
    case: Option<u64>,
    list: bool,
}

fn parse_number(text: &str) -> Option<u64> {
    match text.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => text.parse().ok(),
    }
}

fn parse(args: &[String]) -> Result<Options, String> {
    let mut options = Options {
        targets: Vec::new(),
        cases: None,
        seed: DEFAULT_SEED,
        input: None,
        case: None,
        list: false,
    };
    let mut words = args.iter();
    while let Some(word) = words.next() {
        let (name, inline) = match word.split_once('=') {
            Some((name, value)) if name.starts_with("--") => (name, Some(value.to_string())),
            _ => (word.as_str(), None),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| words.next().cloned())
                .ok_or_else(|| format!("{name} needs a value"))
        };
        match name {
            "--target" => {
                let value = value()?;
                for name in value.split(',') {
                    if target(name).is_none() {
                        return Err(format!("no target `{name}` (see --list)"));
                    }
                    options.targets.push(name.to_string());
                }
            }
            "--cases" => {
                options.cases = Some(
                    parse_number(&value()?)
                        .filter(|cases| *cases > 0)
                        .ok_or("--cases takes a positive number")?,
                );
            }
            "--seed" => options.seed = parse_number(&value()?).ok_or("--seed takes a number")?,
            "--input" => options.input = Some(value()?),
            "--case" => {
                options.case = Some(parse_number(&value()?).ok_or("--case takes a number")?)
            }
            "--list" => options.list = true,
            "--trace" => engine::TRACE.store(true, std::sync::atomic::Ordering::Relaxed),
            "--help" | "-h" => return Err(String::new()),
            other => return Err(format!("unexpected `{other}`")),
        }
    }
    Ok(options)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let options = match parse(&args) {
        Ok(options) => options,
        Err(message) => {
            if !message.is_empty() {
                eprintln!("tandem-fuzz: {message}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    if options.list {
        println!(
            "{:<16} {:>9} {:>9} {:>10}  what",
            "target", "cases", "steps", "heap"
        );
        for target in TARGETS {
            println!(
                "{:<16} {:>9} {:>9} {:>9}K  {}",
                target.name,
                target.default_cases,
                target.step_bound,
                target.memory_bound / 1024,
                target.about
            );
        }
        return ExitCode::SUCCESS;
    }
    engine::capture_panics();
    if let Some(index) = options.case {
        let [name] = options.targets.as_slice() else {
            eprintln!("tandem-fuzz: --case needs exactly one --target");
            return ExitCode::from(2);
        };
        let target = target(name).expect("checked when parsed");
        let seeds = (target.seeds)();
        for earlier in 0..=index {
            let input = match seeds.get(earlier as usize) {
                Some(seed_input) => seed_input.clone(),
                None => engine::generate(target, &seeds, options.seed, earlier),
            };
            let result = run_case(target, &input);
            if earlier + 1 == index {
                engine::TRACE.store(true, std::sync::atomic::Ordering::Relaxed);
            }
            if earlier == index {
                println!("{name} case {index}: {result:?}\ninput {}", to_hex(&input));
                let again = run_case(target, &input);
                println!("again: {again:?}");
            }
        }
        return ExitCode::SUCCESS;
    }
    if let Some(hex) = &options.input {
        let [name] = options.targets.as_slice() else {
            eprintln!("tandem-fuzz: --input needs exactly one --target");
            return ExitCode::from(2);
        };
        let Some(bytes) = engine::from_hex(hex) else {
            eprintln!("tandem-fuzz: --input is not hex");
            return ExitCode::from(2);
        };
        let target = target(name).expect("checked when parsed");
        return match run_case(target, &bytes) {
            Ok(figures) => {
                println!(
                    "{name}: passes ({} steps, {} heap bytes)",
                    figures.steps, figures.peak_bytes
                );
                ExitCode::SUCCESS
            }
            Err(failure) => {
                println!("{name}: FAILS ({:?}): {}", failure.kind, failure.message);
                ExitCode::FAILURE
            }
        };
    }
    let selected: Vec<_> = TARGETS
        .iter()
        .filter(|target| {
            options.targets.is_empty() || options.targets.iter().any(|name| name == target.name)
        })
        .collect();
    let watchdog = Watchdog::start(HANG_LIMIT);
    println!(
        "tandem-fuzz: seed {:#x}, {} target(s)",
        options.seed,
        selected.len()
    );
    println!(
        "{:<16} {:>9} {:>8} {:>9} {:>9} {:>9} {:>11}",
        "target", "cases", "failures", "time", "cases/s", "max steps", "max heap"
    );
    let (mut total_cases, mut total_failures, mut total_time) = (0u64, 0u64, Duration::ZERO);
    let mut reproducers = Vec::new();
    for target in selected {
        let cases = options.cases.unwrap_or(target.default_cases);
        let report = run_target(target, cases, options.seed, &watchdog);
        println!(
            "{:<16} {:>9} {:>8} {:>8.1}s {:>9.0} {:>9} {:>10}K",
            report.name,
            report.cases,
            report.failures,
            report.elapsed.as_secs_f64(),
            report.cases as f64 / report.elapsed.as_secs_f64().max(1e-9),
            report.max_steps,
            report.max_peak_bytes.div_ceil(1024)
        );
        total_cases += report.cases;
        total_failures += report.failures;
        total_time += report.elapsed;
        if let Some((failure, minimal, index)) = report.first_failure {
            reproducers.push(format!(
                "fuzz: {} case {index} (seed {:#x}) FAILED ({:?}): {}\nfuzz: minimal input ({} bytes): cargo xtask fuzz --target {} --input {}",
                report.name,
                options.seed,
                failure.kind,
                failure.message,
                minimal.len(),
                report.name,
                to_hex(&minimal)
            ));
        }
    }
    println!(
        "{:<16} {:>9} {:>8} {:>8.1}s",
        "total",
        total_cases,
        total_failures,
        total_time.as_secs_f64()
    );
    for reproducer in &reproducers {
        println!("{reproducer}");
    }
    if total_failures == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
