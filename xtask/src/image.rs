//! Building app images (`cargo build -p <app>`) and locating the workspace's directories.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::error::{Error, Result};

/// Cargo profile an image is built with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Profile {
    /// `--release` (the default for run, test and bench: TCG is slow enough already).
    Release,
    /// The dev profile.
    Debug,
}

/// The nearest directory at or above `start` whose Cargo.toml declares a `[workspace]`.
pub fn find_workspace_root(start: &Path) -> Option<PathBuf> {
    start
        .ancestors()
        .find(|dir| {
            std::fs::read_to_string(dir.join("Cargo.toml"))
                .is_ok_and(|manifest| manifest.lines().any(|line| line.trim() == "[workspace]"))
        })
        .map(Path::to_path_buf)
}

/// The workspace root.
///
/// Found from the CARGO_MANIFEST_DIR that cargo sets when it runs us (`cargo xtask`, `cargo
/// test`), falling back to where this crate was compiled: a target directory shared between
/// two checkouts can hand one checkout a binary compiled in the other.
pub fn workspace_root() -> PathBuf {
    let compiled_in = Path::new(env!("CARGO_MANIFEST_DIR"));
    std::env::var_os("CARGO_MANIFEST_DIR")
        .and_then(|dir| find_workspace_root(Path::new(&dir)))
        .or_else(|| find_workspace_root(compiled_in))
        .unwrap_or_else(|| compiled_in.to_path_buf())
}

/// The cargo binary: the one that started us if any, else `cargo` from PATH.
pub fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

/// Cargo's target directory for this workspace (honours CARGO_TARGET_DIR and config).
pub fn target_dir() -> Result<PathBuf> {
    let output = cargo()
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .current_dir(workspace_root())
        .stderr(Stdio::inherit())
        .output()
        .map_err(|error| Error::io("running cargo metadata", error))?;
    if !output.status.success() {
        return Err(Error::CommandFailed {
            command: "cargo metadata --format-version 1 --no-deps".to_string(),
            status: output.status,
        });
    }
    let metadata: serde_json::Value =
        serde_json::from_slice(&output.stdout).map_err(|error| Error::Build {
            app: String::new(),
            detail: format!("cargo metadata printed invalid JSON: {error}"),
        })?;
    metadata["target_directory"]
        .as_str()
        .map(PathBuf::from)
        .ok_or_else(|| Error::Build {
            app: String::new(),
            detail: "cargo metadata has no target_directory".to_string(),
        })
}

/// From one line of `cargo build --message-format=json` output, the executable of bin `app`.
pub fn executable_from_message(line: &str, app: &str) -> Option<PathBuf> {
    let message: serde_json::Value = serde_json::from_str(line).ok()?;
    if message["reason"] != "compiler-artifact" || message["target"]["name"] != app {
        return None;
    }
    let is_bin = message["target"]["kind"]
        .as_array()
        .is_some_and(|kinds| kinds.iter().any(|kind| kind == "bin"));
    if !is_bin {
        return None;
    }
    message["executable"].as_str().map(PathBuf::from)
}

/// Builds app `app` (a package under examples/) and returns the path of its ELF image.
///
/// Cargo's progress and diagnostics go to our stderr.
pub fn build_app(app: &str, profile: Profile) -> Result<PathBuf> {
    let mut command = cargo();
    command
        .args(["build", "--package", app, "--bin", app])
        .arg("--message-format=json-render-diagnostics")
        .current_dir(workspace_root())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if profile == Profile::Release {
        command.arg("--release");
    }
    let description = format!(
        "cargo build --package {app} --bin {app}{}",
        if profile == Profile::Release {
            " --release"
        } else {
            ""
        }
    );
    let mut child = command
        .spawn()
        .map_err(|error| Error::io(format!("starting {description}"), error))?;
    let mut executable = None;
    if let Some(stdout) = child.stdout.take() {
        for line in BufReader::new(stdout).lines() {
            let line = line.map_err(|error| Error::io("reading cargo's output", error))?;
            if let Some(path) = executable_from_message(&line, app) {
                executable = Some(path);
            }
        }
    }
    let status = child
        .wait()
        .map_err(|error| Error::io(format!("waiting for {description}"), error))?;
    if !status.success() {
        return Err(Error::CommandFailed {
            command: description,
            status,
        });
    }
    executable.ok_or_else(|| Error::Build {
        app: app.to_string(),
        detail: format!("{description} reported no executable for bin `{app}`"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_bin_artifact_of_the_app() {
        let bin = r#"{"reason":"compiler-artifact","package_id":"path+file:///w/examples/hello#0.1.0","target":{"kind":["bin"],"crate_types":["bin"],"name":"hello","src_path":"/w/examples/hello/src/main.rs"},"profile":{},"features":[],"filenames":["/w/target/release/hello"],"executable":"/w/target/release/hello","fresh":true}"#;
        assert_eq!(
            executable_from_message(bin, "hello"),
            Some(PathBuf::from("/w/target/release/hello"))
        );
        assert_eq!(executable_from_message(bin, "echo"), None);
    }

    #[test]
    fn ignores_libraries_build_scripts_and_other_messages() {
        let lib = r#"{"reason":"compiler-artifact","target":{"kind":["lib"],"name":"hello"},"executable":null}"#;
        let build_script =
            r#"{"reason":"build-script-executed","package_id":"x","linked_libs":[]}"#;
        let finished = r#"{"reason":"build-finished","success":true}"#;
        for line in [lib, build_script, finished, "not json"] {
            assert_eq!(executable_from_message(line, "hello"), None);
        }
    }

    #[test]
    fn workspace_root_is_found_from_a_member_directory() {
        let root = workspace_root();
        assert_eq!(
            find_workspace_root(&root.join("xtask").join("src")),
            Some(root.clone())
        );
        assert_eq!(find_workspace_root(Path::new("/")), None);
    }

    #[test]
    fn workspace_root_holds_the_workspace_manifest() {
        let manifest = std::fs::read_to_string(workspace_root().join("Cargo.toml")).unwrap();
        assert!(manifest.contains("[workspace]"));
    }
}
