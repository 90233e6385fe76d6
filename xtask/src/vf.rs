//! `cargo xtask vf ...`: VF events on a running instance, so a user can watch failover by hand.
//!
//! Hot-plug goes through QMP (`device_del`/`device_add` of the igb PF on its native hot-plug
//! root port); VF disable/enable and link changes go through the guest's lab control channel
//! (its COM2, a unix socket next to the QMP socket), where the lab PF responder acts on them.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::machine::{PF_MAC, PF_ROOT_PORT};
use crate::qmp::Qmp;
use crate::{Error, Result};

/// What `cargo xtask vf` can do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VfAction {
    /// Orderly hot-unplug of the igb PF (attention button; the guest completes it).
    Unplug,
    /// Hot-add the igb PF again.
    Plug,
    /// Surprise removal: the lab PF clears VF Enable.
    Disable,
    /// The lab PF enables the VF again.
    Enable,
    /// The VF's link goes down.
    LinkDown,
    /// The VF's link comes back.
    LinkUp,
}

impl std::str::FromStr for VfAction {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self> {
        Ok(match text {
            "unplug" => VfAction::Unplug,
            "plug" => VfAction::Plug,
            "disable" => VfAction::Disable,
            "enable" => VfAction::Enable,
            "link-down" => VfAction::LinkDown,
            "link-up" => VfAction::LinkUp,
            other => {
                return Err(Error::Usage(format!(
                    "unknown vf action `{other}` (unplug, plug, disable, enable, link-down, link-up)"
                )));
            }
        })
    }
}

/// The file next to the QMP socket that remembers which netdev the PF was attached to.
fn pf_netdev_file(qmp_socket: &Path) -> PathBuf {
    qmp_socket.with_extension("pf-netdev")
}

/// Remembers (or forgets) the PF's netdev for a later `vf plug`.
pub fn record_pf_netdev(qmp_socket: &Path, netdev: Option<&str>) -> Result<()> {
    let file = pf_netdev_file(qmp_socket);
    match netdev {
        Some(netdev) => std::fs::write(&file, netdev)
            .map_err(|error| Error::io(format!("writing {}", file.display()), error)),
        None => {
            let _ = std::fs::remove_file(&file);
            Ok(())
        }
    }
}

/// The newest QMP socket under `dir` (the instance `cargo xtask run` started last).
pub fn newest_qmp_socket(dir: &Path) -> Result<PathBuf> {
    let entries = std::fs::read_dir(dir).map_err(|error| {
        Error::io(
            format!("reading {} (is an instance running?)", dir.display()),
            error,
        )
    })?;
    entries
        .filter_map(|entry| entry.ok())
        .map(|entry| entry.path())
        .filter(|path| path.extension().is_some_and(|extension| extension == "qmp"))
        .max_by_key(|path| path.metadata().and_then(|meta| meta.modified()).ok())
        .ok_or_else(|| {
            Error::Tools(format!(
                "no QMP socket in {}: start an instance with `cargo xtask run <app> --paths both`",
                dir.display()
            ))
        })
}

/// The `device_add` arguments that put the PF back where `cargo xtask run` had it.
pub fn pf_device_add_arguments(netdev: &str) -> serde_json::Value {
    serde_json::json!({
        "driver": "igb",
        "id": "pf0",
        "bus": PF_ROOT_PORT,
        "netdev": netdev,
        "mac": PF_MAC,
    })
}

/// Sends one line to the lab control channel and returns the guest's answer.
pub fn lab_command(lab_socket: &Path, command: &str, timeout: Duration) -> Result<String> {
    let mut stream = UnixStream::connect(lab_socket).map_err(|error| {
        Error::io(
            format!(
                "connecting to the lab channel {} (booted with --paths vf|both?)",
                lab_socket.display()
            ),
            error,
        )
    })?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|error| Error::io("setting a read timeout", error))?;
    stream
        .write_all(format!("{command}\n").as_bytes())
        .map_err(|error| Error::io("writing to the lab channel", error))?;
    let mut answer = String::new();
    BufReader::new(stream)
        .read_line(&mut answer)
        .map_err(|error| Error::io("reading the lab channel's answer", error))?;
    Ok(answer.trim().to_string())
}

/// Carries out `action` on the instance behind `qmp_socket`.
pub fn run_action(action: VfAction, qmp_socket: &Path) -> Result<String> {
    let timeout = Duration::from_secs(30);
    let lab = |command: &str| {
        let answer = lab_command(&qmp_socket.with_extension("lab"), command, timeout)?;
        if answer.starts_with("ok") {
            Ok(answer)
        } else {
            Err(Error::Tools(format!(
                "the guest refused `{command}`: {answer}"
            )))
        }
    };
    match action {
        VfAction::Unplug => {
            let mut qmp = Qmp::connect(qmp_socket, timeout)?;
            qmp.execute("device_del", Some(serde_json::json!({ "id": "pf0" })))?;
            qmp.wait_event("DEVICE_DELETED", timeout)?;
            Ok("igb PF unplugged (the guest completed device_del)".to_string())
        }
        VfAction::Plug => {
            let netdev = std::fs::read_to_string(pf_netdev_file(qmp_socket)).map_err(|error| {
                Error::io(
                    "reading which netdev the PF used (was the instance started with a VF?)",
                    error,
                )
            })?;
            let mut qmp = Qmp::connect(qmp_socket, timeout)?;
            qmp.execute("device_add", Some(pf_device_add_arguments(netdev.trim())))?;
            Ok("igb PF plugged in (the guest powers the slot and brings the VF up)".to_string())
        }
        VfAction::Disable => lab("vf disable"),
        VfAction::Enable => lab("vf enable"),
        VfAction::LinkDown => lab("vf link-down"),
        VfAction::LinkUp => lab("vf link-up"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn actions_parse_and_unknown_ones_are_refused() {
        assert_eq!("unplug".parse::<VfAction>().unwrap(), VfAction::Unplug);
        assert_eq!("link-down".parse::<VfAction>().unwrap(), VfAction::LinkDown);
        assert!("explode".parse::<VfAction>().is_err());
    }

    #[test]
    fn plug_reuses_the_recorded_netdev_on_the_pf_root_port() {
        let arguments = pf_device_add_arguments("hub-igb");
        assert_eq!(arguments["driver"], "igb");
        assert_eq!(arguments["id"], "pf0");
        assert_eq!(arguments["bus"], PF_ROOT_PORT);
        assert_eq!(arguments["netdev"], "hub-igb");
    }

    #[test]
    fn pf_netdev_is_recorded_next_to_the_qmp_socket() {
        let dir = std::env::temp_dir().join(format!("tandem-vf-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("echo.qmp");
        record_pf_netdev(&socket, Some("net1")).unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.join("echo.pf-netdev")).unwrap(),
            "net1"
        );
        record_pf_netdev(&socket, None).unwrap();
        assert!(!dir.join("echo.pf-netdev").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
