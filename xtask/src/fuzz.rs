//! `cargo xtask fuzz`: builds and runs the hostile-input harness (`fuzz/`, a workspace of its
//! own) and the small run `cargo xtask test` does.

use std::process::Stdio;

use crate::error::{Error, Result};
use crate::image;

/// Cases per target in `cargo xtask test`: every target runs, the whole step stays well under
/// two minutes once built.
pub const SMOKE_CASES: u64 = 300;

/// Options of `cargo xtask fuzz`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FuzzOptions {
    /// Only these targets (all when empty).
    pub targets: Vec<String>,
    /// Cases per target (each target's default when `None`).
    pub cases: Option<u64>,
    /// Generator seed (the harness's fixed default when `None`).
    pub seed: Option<u64>,
    /// One input to run (a reproducer, hex).
    pub input: Option<String>,
}

impl FuzzOptions {
    /// The harness's own arguments.
    pub fn harness_args(&self) -> Vec<String> {
        let mut args = Vec::new();
        for target in &self.targets {
            args.extend(["--target".to_string(), target.clone()]);
        }
        if let Some(cases) = self.cases {
            args.extend(["--cases".to_string(), cases.to_string()]);
        }
        if let Some(seed) = self.seed {
            args.extend(["--seed".to_string(), seed.to_string()]);
        }
        if let Some(input) = &self.input {
            args.extend(["--input".to_string(), input.clone()]);
        }
        args
    }
}

/// Builds the harness (release, with overflow checks; see `fuzz/Cargo.toml`) and runs it with
/// `args`; returns its exit code.
pub fn run_harness(args: &[String]) -> Result<i32> {
    let root = image::workspace_root();
    let target_dir = image::target_dir()?.join("fuzz");
    eprintln!("xtask: === fuzz: tandem-fuzz {} ===", args.join(" "));
    let status = image::cargo()
        .args(["run", "--release", "--quiet", "--manifest-path"])
        .arg(root.join("fuzz/Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir)
        .arg("--")
        .args(args)
        .current_dir(&root)
        .stdin(Stdio::null())
        .status()
        .map_err(|error| Error::io("starting cargo run (fuzz harness)", error))?;
    Ok(status.code().unwrap_or(1))
}

/// Runs the harness's own unit tests (the generators' checks, e.g. that the `vpci` seeds reach
/// the assigned state over an honest host) in the harness's release build; returns the exit
/// code.
pub fn run_harness_tests() -> Result<i32> {
    let root = image::workspace_root();
    let target_dir = image::target_dir()?.join("fuzz");
    eprintln!("xtask: === fuzz harness unit tests ===");
    let status = image::cargo()
        .args(["test", "--release", "--quiet", "--lib", "--manifest-path"])
        .arg(root.join("fuzz/Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir)
        .current_dir(&root)
        .stdin(Stdio::null())
        .status()
        .map_err(|error| Error::io("starting cargo test (fuzz harness)", error))?;
    Ok(status.code().unwrap_or(1))
}
