//! Booting an app under OpenVMM: directly on a host with real KVM, else nested in a QEMU L1.
//!
//! `cargo xtask run <app> --vmm openvmm` and the OpenVMM integration tests both come here.
//! Real KVM (vmx/svm, not kvm_pvm: the same test as QEMU's accelerator choice) runs `openvmm`
//! on this host; anywhere else OpenVMM runs inside the nested L1 of [`crate::nested`].

use std::fmt;
use std::io::{BufRead, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::str::FromStr;
use std::time::Duration;

use crate::accel::{self, Accel};
use crate::error::{Error, Result};
use crate::machine::{HostForward, NetPaths};
use crate::nested;
use crate::openvmm::{self, Outcome, VmConfig};
use crate::qemu::Qemu;

/// The VMM an app boots under.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Vmm {
    /// QEMU (q35, virtio-net and igb).
    Qemu,
    /// OpenVMM (Hyper-V enlightenments, VMBus netvsc, MANA).
    OpenVmm,
}

impl fmt::Display for Vmm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Vmm::Qemu => "qemu",
            Vmm::OpenVmm => "openvmm",
        })
    }
}

impl FromStr for Vmm {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self> {
        match text {
            "qemu" => Ok(Vmm::Qemu),
            "openvmm" => Ok(Vmm::OpenVmm),
            other => Err(Error::Usage(format!(
                "unknown --vmm `{other}` (expected qemu or openvmm)"
            ))),
        }
    }
}

/// Where OpenVMM runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    /// On this host, which has real KVM.
    Direct,
    /// In a Linux L1 under QEMU/TCG with emulated SVM.
    Nested,
}

/// Direct on real KVM, nested otherwise (with the reason, for the user).
pub fn placement() -> (Placement, String) {
    let choice = accel::decide(None);
    match choice.accel {
        Accel::Kvm => (Placement::Direct, choice.reason),
        Accel::Tcg => (
            Placement::Nested,
            format!("{}: OpenVMM runs nested in a QEMU/TCG L1", choice.reason),
        ),
    }
}

/// The guest a caller wants under OpenVMM.
#[derive(Clone, Debug)]
pub struct GuestSpec {
    /// The app image.
    pub app: PathBuf,
    /// Our command line.
    pub cmdline: String,
    /// Guest memory (QEMU syntax).
    pub memory: String,
    /// NICs: `virtio` = netvsc (the synthetic path), `vf` = MANA, `both`.
    pub paths: NetPaths,
    /// Host port forwards (127.0.0.1 on this host).
    pub forwards: Vec<HostForward>,
    /// Nested only: the synthetic NIC (netvsc) sits on a tap in L1 instead of consomme, the
    /// guest takes the static address [`nested::L1_TAP_GUEST`] on L1's private tap subnet,
    /// and L1 pings it (ICMP, which consomme's `hostfwd` cannot carry); the forwards go
    /// nowhere.
    pub l1_tap_ping: bool,
}

impl GuestSpec {
    fn vm_config(&self, placement: Placement) -> VmConfig {
        let mut cmdline = self.cmdline.clone();
        if self.l1_tap_ping {
            cmdline = format!(
                "{cmdline} ip={}/{} gw={}",
                nested::L1_TAP_GUEST,
                nested::L1_TAP_PREFIX_LENGTH,
                nested::L1_TAP_ADDRESS
            )
            .trim_start()
            .to_string();
        }
        VmConfig {
            kernel: match placement {
                Placement::Direct => self.app.clone(),
                Placement::Nested => PathBuf::from(nested::L1_APP_PATH),
            },
            cmdline,
            memory: self.memory.clone(),
            processors: 1,
            paths: self.paths,
            forwards: self.forwards.clone(),
            listen_on_all_addresses: placement == Placement::Nested,
            synthetic_tap: self.l1_tap_ping.then(|| nested::L1_TAP_DEVICE.to_string()),
            initrd: None,
        }
    }
}

/// Fetches (or finds cached under `target/openvmm-l1/`) L1's Debian kernel and busybox.
pub fn fetch_l1_assets() -> Result<nested::L1Assets> {
    nested::fetch_assets(&crate::image::target_dir()?.join("openvmm-l1"))
}

/// Where the initramfs of an L1 labelled `name` is written (under `target/openvmm-l1/`, one
/// per process so parallel tests do not share one).
pub fn l1_initramfs_path(name: &str) -> Result<PathBuf> {
    let file = format!(
        "{}-{}.cpio",
        name.replace(|c: char| !c.is_ascii_alphanumeric(), "-"),
        std::process::id()
    );
    Ok(crate::image::target_dir()?.join("openvmm-l1").join(file))
}

/// The `openvmm` arguments L1 runs for `spec`.
pub fn nested_openvmm_args(spec: &GuestSpec) -> Vec<String> {
    openvmm::openvmm_args(&spec.vm_config(Placement::Nested))
}

/// Builds OpenVMM, fetches the L1 assets and writes the initramfs for `spec`; returns the L1
/// assets and the initramfs path (under `target/openvmm-l1/`).
pub fn prepare_nested(spec: &GuestSpec, name: &str) -> Result<(nested::L1Assets, PathBuf)> {
    let binary = openvmm::build()?;
    let assets = fetch_l1_assets()?;
    let initramfs = l1_initramfs_path(name)?;
    let args = nested_openvmm_args(spec);
    let app = std::fs::read(&spec.app)
        .map_err(|error| Error::io(format!("reading {}", spec.app.display()), error))?;
    let payload = nested::L1Payload {
        files: vec![(nested::L1_APP_PATH.to_string(), app)],
        tap_ping: spec.l1_tap_ping,
    };
    nested::build_initramfs(&assets, &binary, &payload, &args, &initramfs)?;
    Ok((assets, initramfs))
}

/// A guest under nested OpenVMM, for tests: L1's console is the QEMU serial capture.
pub struct NestedGuest {
    /// The L1 QEMU (its serial lines hold L1's markers, OpenVMM's log and the guest console).
    pub l1: Qemu,
    initramfs: PathBuf,
}

impl NestedGuest {
    /// Boots `spec` under OpenVMM in a fresh L1 labelled `label`.
    pub fn spawn(label: &str, spec: &GuestSpec) -> Result<NestedGuest> {
        let (assets, initramfs) = prepare_nested(spec, label)?;
        Self::boot(label, &assets, initramfs, &spec.forwards, true)
    }

    /// Boots L1 from a prepared `initramfs` (removed when the guest is dropped) with the host
    /// `forwards`; `echo` copies L1's console to this process's stderr.
    pub fn boot(
        label: &str,
        assets: &nested::L1Assets,
        initramfs: PathBuf,
        forwards: &[HostForward],
        echo: bool,
    ) -> Result<NestedGuest> {
        let l1 = nested::l1_qemu(label, assets, &initramfs, forwards)
            .echo(echo)
            .spawn();
        match l1 {
            Ok(l1) => Ok(NestedGuest { l1, initramfs }),
            Err(error) => {
                let _ = std::fs::remove_file(&initramfs);
                Err(error)
            }
        }
    }

    /// Waits for the next console line containing `needle`; an environment failure that
    /// ends L1 first is reported as [`Error::Environment`], not as a missing line.
    pub fn wait_for_line(&mut self, needle: &str, timeout: Duration) -> Result<String> {
        match self.l1.wait_for_line(needle, timeout) {
            Ok(line) => Ok(line),
            Err(error) => match nested::outcome(&self.l1.serial_lines()) {
                Outcome::Environment(reason) => Err(Error::Environment(format!(
                    "{reason} (while waiting for {needle:?})\n{}",
                    self.l1.diagnostics()
                ))),
                _ => Err(error),
            },
        }
    }

    /// Waits for L1 to power off and says how the guest ended.
    pub fn wait_outcome(&mut self, timeout: Duration) -> Result<Outcome> {
        self.l1.wait_for_exit(timeout)?;
        Ok(nested::outcome(&self.l1.serial_lines()))
    }
}

impl Drop for NestedGuest {
    fn drop(&mut self) {
        self.l1.kill();
        let _ = std::fs::remove_file(&self.initramfs);
    }
}

/// `cargo xtask run <app> --vmm openvmm`: the guest console on this terminal; returns the
/// process exit code (the guest's, 254 for an environment failure, 255 without a code).
pub fn run(spec: &GuestSpec) -> Result<i32> {
    let (placement, reason) = placement();
    eprintln!("xtask: OpenVMM {placement:?} ({reason})");
    for forward in &spec.forwards {
        eprintln!(
            "xtask: forwarding {:?} 127.0.0.1:{} -> guest port {}",
            forward.protocol, forward.host_port, forward.guest_port
        );
    }
    let outcome = match placement {
        Placement::Direct if spec.l1_tap_ping => Err(Error::Usage(
            "the tap-and-ping set-up exists only nested (it would touch this host's network)"
                .to_string(),
        )),
        Placement::Direct => run_direct(spec),
        Placement::Nested => run_nested(spec),
    };
    let outcome = match outcome {
        Ok(outcome) => outcome,
        Err(Error::Environment(reason)) => Outcome::Environment(reason),
        Err(error) => return Err(error),
    };
    eprintln!("xtask: {outcome}");
    Ok(outcome.process_exit_code())
}

/// Copies `pipe` to `sink` byte for byte (the terminal sees exactly what was sent) while
/// collecting its lines.
pub fn tee_lines(pipe: impl Read, mut sink: impl Write) -> Vec<String> {
    let mut reader = std::io::BufReader::new(pipe);
    let mut lines = Vec::new();
    let mut buffer = Vec::new();
    while let Ok(count) = reader.read_until(b'\n', &mut buffer) {
        if count == 0 {
            break;
        }
        let _ = sink.write_all(&buffer);
        let _ = sink.flush();
        lines.push(
            String::from_utf8_lossy(&buffer)
                .trim_end_matches(['\r', '\n'])
                .to_string(),
        );
        buffer.clear();
    }
    lines
}

fn run_direct(spec: &GuestSpec) -> Result<Outcome> {
    let binary = openvmm::build()?;
    let args = openvmm::openvmm_args(&spec.vm_config(Placement::Direct));
    eprintln!(
        "{}",
        crate::machine::shell_command_line(&binary.display().to_string(), &args)
    );
    let mut child = openvmm::with_terminal(&binary, &args)
        .env(
            "OPENVMM_LOG",
            std::env::var("OPENVMM_LOG")
                .unwrap_or_else(|_| openvmm::DEFAULT_LOG_FILTER.to_string()),
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|error| Error::Environment(format!("starting {}: {error}", binary.display())))?;
    // The guest console is OpenVMM's stderr, or `script`'s stdout when it lends the terminal.
    let stdout = child
        .stdout
        .take()
        .map(|pipe| std::thread::spawn(move || tee_lines(pipe, std::io::stdout())));
    let mut lines = child
        .stderr
        .take()
        .map(|pipe| tee_lines(pipe, std::io::stderr()))
        .unwrap_or_default();
    if let Some(thread) = stdout {
        lines.extend(thread.join().unwrap_or_default());
    }
    let status = child
        .wait()
        .map_err(|error| Error::io("waiting for openvmm", error))?;
    Ok(openvmm::outcome(&lines, status.code()))
}

fn run_nested(spec: &GuestSpec) -> Result<Outcome> {
    let (assets, initramfs) = prepare_nested(spec, "run")?;
    let builder = nested::l1_qemu("l1", &assets, &initramfs, &spec.forwards);
    let (program, args) = builder.command_line();
    eprintln!("{}", crate::machine::shell_command_line(&program, &args));
    eprintln!("xtask: L1 boots in ~10 s under TCG; Ctrl-C stops it");
    let result = std::process::Command::new(&program)
        .args(&args)
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|error| Error::io(format!("starting {program}"), error))
        .and_then(|mut child| {
            let lines = child
                .stdout
                .take()
                .map(|pipe| tee_lines(pipe, std::io::stdout()))
                .unwrap_or_default();
            child
                .wait()
                .map_err(|error| Error::io("waiting for the L1 QEMU", error))?;
            Ok(nested::outcome(&lines))
        });
    let _ = std::fs::remove_file(&initramfs);
    result
}

/// The image path `cargo xtask run` should pass for `app`, and its forwards.
pub fn spec_for_app(
    app: &Path,
    app_name: &str,
    cmdline: &str,
    memory: &str,
    paths: NetPaths,
) -> GuestSpec {
    GuestSpec {
        app: app.to_path_buf(),
        cmdline: cmdline.to_string(),
        memory: memory.to_string(),
        paths,
        forwards: crate::machine::app_forwards(app_name),
        l1_tap_ping: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vmm_names_parse() {
        assert_eq!("openvmm".parse::<Vmm>().unwrap(), Vmm::OpenVmm);
        assert_eq!("qemu".parse::<Vmm>().unwrap(), Vmm::Qemu);
        assert!(matches!("hyperv".parse::<Vmm>(), Err(Error::Usage(_))));
        assert_eq!(Vmm::OpenVmm.to_string(), "openvmm");
    }

    #[test]
    fn nested_guests_see_the_app_inside_l1_and_forward_from_every_address() {
        let spec = spec_for_app(
            Path::new("/w/target/release/echo"),
            "echo",
            "log=debug",
            "64M",
            NetPaths::Virtio,
        );
        let nested = spec.vm_config(Placement::Nested);
        assert_eq!(nested.kernel, PathBuf::from(nested::L1_APP_PATH));
        assert!(nested.listen_on_all_addresses);
        assert_eq!(nested.forwards.len(), 2, "echo: TCP and UDP 7007 -> 7");
        let direct = spec.vm_config(Placement::Direct);
        assert_eq!(direct.kernel, PathBuf::from("/w/target/release/echo"));
        assert!(!direct.listen_on_all_addresses);
    }

    #[test]
    fn tee_keeps_bytes_and_collects_lines() {
        let mut sink = Vec::new();
        let lines = tee_lines(&b"a\r\nb\nc"[..], &mut sink);
        assert_eq!(sink, b"a\r\nb\nc");
        assert_eq!(lines, ["a", "b", "c"]);
    }
}
