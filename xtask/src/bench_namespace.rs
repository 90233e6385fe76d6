//! The network namespace the network benches measure in: a bridge `br0` with the host's
//! address and the guest's taps, removed on drop (and when a killed run left one behind).

use std::io::Write;
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Command, Stdio};

use crate::{Error, Result};

/// Runs `ip <args>`, feeding it `input` on stdin (for `-batch -`).
fn run_ip(args: &[&str], input: &str) -> Result<()> {
    let command = format!("ip {}", args.join(" "));
    let mut child = Command::new("ip")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|error| Error::io(format!("starting {command}"), error))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(input.as_bytes())
            .map_err(|error| Error::io(format!("feeding {command}"), error))?;
    }
    let output = child
        .wait_with_output()
        .map_err(|error| Error::io(format!("waiting for {command}"), error))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(Error::Tools(format!(
            "`{command}` failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )))
    }
}

/// The `ip -batch` script that builds the bridge with `host/prefix_length` and `taps` on it.
/// STP stays off (the default), so the ports forward at once.
pub fn setup_script(host: Ipv4Addr, prefix_length: u8, taps: &[&str]) -> String {
    let mut script = format!(
        "link set lo up\nlink add br0 type bridge\naddr add {host}/{prefix_length} dev br0\n"
    );
    for tap in taps {
        script.push_str(&format!(
            "tuntap add {tap} mode tap\nlink set {tap} master br0\nlink set {tap} up\n"
        ));
    }
    script.push_str("link set br0 up\n");
    script
}

/// A bench's namespace, named `<prefix><pid>`; deleted on drop.
pub struct BenchNamespace {
    /// The namespace's name (for `ip netns exec`).
    pub name: String,
}

impl BenchNamespace {
    /// Creates the namespace with bridge `br0` at `host/prefix_length` and `taps` enslaved to
    /// it, after deleting namespaces with the same prefix whose creating process is gone.
    pub fn create(
        prefix: &str,
        host: Ipv4Addr,
        prefix_length: u8,
        taps: &[&str],
    ) -> Result<BenchNamespace> {
        let listed = Command::new("ip").args(["netns", "list"]).output();
        let listed = listed.map(|output| String::from_utf8_lossy(&output.stdout).into_owned());
        for name in listed.iter().flat_map(|text| text.lines()) {
            let name = name.split_whitespace().next().unwrap_or_default();
            if let Some(pid) = name.strip_prefix(prefix)
                && (pid == std::process::id().to_string() || !Path::new("/proc").join(pid).exists())
            {
                let _ = run_ip(&["netns", "delete", name], "");
            }
        }
        let name = format!("{prefix}{}", std::process::id());
        run_ip(&["netns", "add", &name], "")?;
        let namespace = BenchNamespace { name };
        run_ip(
            &["-n", &namespace.name, "-batch", "-"],
            &setup_script(host, prefix_length, taps),
        )?;
        Ok(namespace)
    }
}

impl BenchNamespace {
    /// Runs this xtask again inside the namespace as `cargo xtask <xtask_args...>`, with
    /// `image_env` naming the app image (which tells the inner run to measure, not to set up).
    pub fn run_xtask_inside(
        &self,
        xtask_args: &[&str],
        image_env: &str,
        image: &Path,
    ) -> Result<()> {
        let program = std::env::current_exe()
            .map_err(|error| Error::io("finding the xtask binary", error))?;
        let program = program.to_string_lossy();
        let mut args = vec!["netns", "exec", self.name.as_str(), program.as_ref()];
        args.extend_from_slice(xtask_args);
        let status = Command::new("ip")
            .args(&args)
            .env(image_env, image)
            .status()
            .map_err(|error| Error::io("running the bench inside the namespace", error))?;
        if status.success() {
            Ok(())
        } else {
            Err(Error::CommandFailed {
                command: format!("ip {}", args.join(" ")),
                status,
            })
        }
    }
}

impl Drop for BenchNamespace {
    fn drop(&mut self) {
        if let Err(error) = run_ip(&["netns", "delete", &self.name], "") {
            eprintln!("xtask: removing namespace {}: {error}", self.name);
        }
    }
}

/// Fails unless root: `bench` creates a network namespace, a bridge and taps.
pub fn require_root(bench: &str) -> Result<()> {
    let status = std::fs::read_to_string("/proc/self/status")
        .map_err(|error| Error::io("reading /proc/self/status", error))?;
    match crate::tools::uid_from_status(&status) {
        Some(0) => Ok(()),
        uid => Err(Error::Tools(format!(
            "`bench {bench}` needs root (it creates a network namespace, a bridge and taps); \
             this runs as uid {}: try sudo -E cargo xtask bench {bench}",
            uid.map_or("?".to_string(), |uid| uid.to_string())
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_script_puts_every_tap_on_the_bridge_and_brings_it_up_last() {
        let script = setup_script(Ipv4Addr::new(10, 77, 1, 1), 24, &["tap0", "tap1"]);
        assert!(script.contains("addr add 10.77.1.1/24 dev br0"));
        assert!(
            script.contains("link set tap0 master br0")
                && script.contains("link set tap1 master br0")
        );
        assert!(script.trim_end().ends_with("link set br0 up"));
    }
}
