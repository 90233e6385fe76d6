//! Tandem's hostile-input harness: property tests with shrinking over every parser and state
//! machine that reads what a device, a host or a network peer wrote (see `fuzz/README.md`).

pub mod engine;
pub mod frames;
pub mod hostile;
pub mod memory;
pub mod targets;

pub use engine::{Input, Outcome, Steps, Target};
pub use targets::TARGETS;

#[global_allocator]
static ALLOCATOR: memory::CountingAllocator = memory::CountingAllocator;

/// The target called `name`.
pub fn target(name: &str) -> Option<&'static Target> {
    TARGETS.iter().find(|target| target.name == name)
}

/// Runs `target` once on the input given as hex (a reproducer line): `Err` describes the
/// failure. What a regression test pins.
pub fn reproduce(name: &str, hex: &str) -> Result<(), String> {
    let target = target(name).ok_or_else(|| format!("no target {name}"))?;
    let bytes = engine::from_hex(hex).ok_or_else(|| "input is not hex".to_string())?;
    engine::run_case(target, &bytes)
        .map(|_| ())
        .map_err(|failure| format!("{:?}: {}", failure.kind, failure.message))
}
