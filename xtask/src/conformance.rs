//! `cargo xtask conformance`: our Hyper-V guest code against OpenVMM's host code, in one process.
//!
//! The test crate (`conformance/`) lives outside the main workspace and depends by path on a
//! checkout of microsoft/openvmm: `$OPENVMM_DIR`, else `../shared/openvmm` next to the project
//! (the paths its manifest names). When `$OPENVMM_DIR` points elsewhere, the manifest is written
//! again with that tree's paths under `target/`. A missing tree is an error, never a pass.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use crate::image;
use crate::{Error, Result};

/// The OpenVMM commit the project's conformance tests were written against.
pub const OPENVMM_COMMIT: &str = "1488a37b7cfe596c8fd72bbf7d2bb3af3f99aea6";
/// Where the manifest expects the tree, relative to the conformance crate.
const DEFAULT_RELATIVE: &str = "../../shared/openvmm";
/// A file every usable tree has (the netvsp crate's manifest).
const PROBE_FILE: &str = "vm/devices/net/netvsp/Cargo.toml";

/// Totals parsed from libtest's `test result:` lines.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    /// Tests that passed.
    pub passed: u64,
    /// Tests that failed.
    pub failed: u64,
    /// Tests ignored.
    pub ignored: u64,
}

/// Adds up every `test result: ok. 3 passed; 0 failed; 1 ignored; ...` line of cargo test's output.
pub fn parse_totals(output: &str) -> Totals {
    let mut totals = Totals::default();
    for line in output.lines() {
        let Some(rest) = line.trim().strip_prefix("test result: ") else {
            continue;
        };
        for part in rest.split(';') {
            let words: Vec<&str> = part.split_whitespace().collect();
            let (count, label) = match words.as_slice() {
                [_, count, label, ..] if count.parse::<u64>().is_ok() => (*count, *label),
                [count, label, ..] => (*count, *label),
                _ => continue,
            };
            let Ok(count) = count.parse::<u64>() else {
                continue;
            };
            match label {
                "passed" => totals.passed += count,
                "failed" => totals.failed += count,
                "ignored" => totals.ignored += count,
                _ => {}
            }
        }
    }
    totals
}

/// The OpenVMM tree to use: `$OPENVMM_DIR`, else `../shared/openvmm` beside the project.
pub fn openvmm_dir() -> PathBuf {
    match std::env::var_os("OPENVMM_DIR") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => image::workspace_root()
            .join("conformance")
            .join(DEFAULT_RELATIVE),
    }
}

fn missing_tree_message(dir: &Path) -> String {
    format!(
        "no OpenVMM tree at {} (looked for {PROBE_FILE}). The conformance tests need Microsoft's \
         OpenVMM source: clone https://github.com/microsoft/openvmm, check out {OPENVMM_COMMIT}, \
         and set OPENVMM_DIR to it (or place it at ../shared/openvmm next to this project)",
        dir.display()
    )
}

/// Writes a copy of the conformance manifest whose paths point at `tree` and at this checkout,
/// returning the manifest's path.
fn rewritten_manifest(tree: &Path, out_dir: &Path) -> Result<PathBuf> {
    let crate_dir = image::workspace_root().join("conformance");
    let original = crate_dir.join("Cargo.toml");
    let text = std::fs::read_to_string(&original)
        .map_err(|error| Error::io(format!("reading {}", original.display()), error))?;
    let root = image::workspace_root();
    let text = text
        .replace(
            &format!("\"{DEFAULT_RELATIVE}/"),
            &format!("\"{}/", tree.display()),
        )
        .replace("path = \"../", &format!("path = \"{}/", root.display()))
        .replace(
            "[lib]\n",
            &format!("[lib]\npath = \"{}/src/lib.rs\"\n", crate_dir.display()),
        )
        .replace(
            "path = \"tests/",
            &format!("path = \"{}/tests/", crate_dir.display()),
        );
    std::fs::create_dir_all(out_dir)
        .map_err(|error| Error::io(format!("creating {}", out_dir.display()), error))?;
    let manifest = out_dir.join("Cargo.toml");
    std::fs::write(&manifest, text)
        .map_err(|error| Error::io(format!("writing {}", manifest.display()), error))?;
    let lock = crate_dir.join("Cargo.lock");
    std::fs::copy(&lock, out_dir.join("Cargo.lock"))
        .map_err(|error| Error::io(format!("copying {}", lock.display()), error))?;
    Ok(manifest)
}

/// The manifest to build, the target directory and the `protoc` to use; fails (saying how to
/// get it) when the OpenVMM tree is missing.
fn prepare() -> Result<(PathBuf, PathBuf, String)> {
    let tree = openvmm_dir();
    if !tree.join(PROBE_FILE).is_file() {
        return Err(Error::Tools(missing_tree_message(&tree)));
    }
    if crate::tools::find_program("protoc").is_none() {
        crate::tools::ensure_packages(&["protobuf-compiler"], "OpenVMM's build scripts (protoc)")?;
    }
    let target = image::target_dir()?;
    let default_tree = image::workspace_root()
        .join("conformance")
        .join(DEFAULT_RELATIVE);
    let same_tree = match (tree.canonicalize(), default_tree.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    let manifest = if same_tree {
        image::workspace_root()
            .join("conformance")
            .join("Cargo.toml")
    } else {
        eprintln!("xtask: OpenVMM tree {}", tree.display());
        rewritten_manifest(&tree, &target.join("conformance-manifest"))?
    };
    let target_dir = std::env::var_os("TANDEM_CONFORMANCE_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| target.join("conformance"));
    let protoc = crate::tools::find_program("protoc")
        .map(|path| path.display().to_string())
        .unwrap_or_else(|| "protoc".to_string());
    Ok((manifest, target_dir, protoc))
}

/// Runs `cargo test` on the conformance crate with `args`; returns its status and stdout.
fn cargo_test(args: &[String]) -> Result<(bool, String)> {
    let (manifest, target_dir, protoc) = prepare()?;
    let mut all = vec![
        "test".to_string(),
        "--manifest-path".to_string(),
        manifest.display().to_string(),
    ];
    all.extend_from_slice(args);
    eprintln!(
        "xtask: === conformance (OpenVMM in-process): cargo {} ===",
        all.join(" ")
    );
    let output = image::cargo()
        .args(&all)
        .env("CARGO_TARGET_DIR", &target_dir)
        .env("PROTOC", protoc)
        .current_dir(image::workspace_root())
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .map_err(|error| Error::io("starting cargo test for the conformance crate", error))?;
    Ok((
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
    ))
}

/// Builds and runs the conformance tests; prints `conformance: N passed, M failed`. Returns
/// whether everything passed (and at least one test ran).
pub fn run(filter: Option<&str>) -> Result<bool> {
    let mut args = vec!["--no-fail-fast".to_string()];
    if let Some(filter) = filter {
        args.push("--".to_string());
        args.push(filter.to_string());
    }
    let (success, stdout) = cargo_test(&args)?;
    print!("{stdout}");
    let totals = parse_totals(&stdout);
    println!(
        "conformance: {} passed, {} failed",
        totals.passed, totals.failed
    );
    Ok(success && totals.failed == 0 && totals.passed > 0)
}

/// `cargo xtask bench conformance`: the in-process throughput benchmarks (netvsc against
/// netvsp), built in release mode, one at a time; prints their `bench …` lines. Returns whether
/// they ran and printed numbers.
pub fn bench() -> Result<bool> {
    let args: Vec<String> = [
        "--release",
        "--",
        "--ignored",
        "--nocapture",
        "--test-threads=1",
        "bench",
    ]
    .iter()
    .map(|arg| arg.to_string())
    .collect();
    let (success, stdout) = cargo_test(&args)?;
    // With --nocapture the harness's `test … ` prefix can share a line with the first result.
    let lines: Vec<&str> = stdout
        .lines()
        .filter_map(|line| line.find("bench ").map(|start| &line[start..]))
        .collect();
    for line in &lines {
        println!("{line}");
    }
    Ok(success && !lines.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_add_up_every_test_binary() {
        let output = "\
running 2 tests
test a ... ok
test result: ok. 2 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.01s

test result: FAILED. 5 passed; 2 failed; 1 ignored; 0 measured; 0 filtered out; finished in 1.2s
";
        assert_eq!(
            parse_totals(output),
            Totals {
                passed: 7,
                failed: 2,
                ignored: 1
            }
        );
    }

    #[test]
    fn no_result_lines_means_nothing_ran() {
        assert_eq!(parse_totals("error: could not compile"), Totals::default());
    }
}
