//! OpenVMM as a second VMM: building its binary, its command line, and what its ending means.
//!
//! The `openvmm` binary is built from the read-only third-party tree (`$OPENVMM_DIR`, else
//! `../shared/openvmm` beside the workspace) into `target/openvmm/` (or `$OPENVMM_TARGET_DIR`),
//! once: later builds are cargo no-ops. It boots our image by the Linux x86-64 boot protocol
//! with `--hv` (VMBus, SynIC, hypercall page), netvsc over consomme (user-mode NAT in the
//! `openvmm` process) and, for the VF path, a MANA function on an emulated PCIe root port.
//!
//! OpenVMM turns a guest power-off into exit status 0 whatever the guest's code was, so the
//! code is read from the kernel's `tandem: exit code N` console line; the status only tells a
//! clean power-off (0) from a reset (2), a triple fault (3) or OpenVMM's own failure.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::error::{Error, Result};
use crate::image;
use crate::machine::{HostForward, NetPaths, Protocol};

/// Cargo features of the one `openvmm` build this project uses (KVM backend, consomme, and
/// tap for the ping test: consomme carries no ICMP from outside).
pub const FEATURES: &str = "virt_kvm,net_consomme,net_tap";
/// Console line prefix with which the kernel announces its exit code (`guest_kernel::exit`).
pub const EXIT_MARKER: &str = "tandem: exit code";
/// `--guest-reset-action exit:N`: the guest reset (or asked for a reboot).
pub const STATUS_RESET: i32 = 2;
/// `--guest-crash-action exit:N`: the guest triple-faulted.
pub const STATUS_CRASH: i32 = 3;
/// Log filter for OpenVMM unless `OPENVMM_LOG` is set: informative, without one line per
/// unclaimed I/O port access.
pub const DEFAULT_LOG_FILTER: &str = "info,vmotherboard::chipset=warn";
/// The subnet MANA's consomme uses when netvsc has the default one (each NIC gets its own NAT).
pub const MANA_SUBNET: &str = "10.1.0.0/24";

/// Where the OpenVMM source tree is: `$OPENVMM_DIR`, else `../shared/openvmm` from the root.
pub fn source_dir() -> Result<PathBuf> {
    let dir = match std::env::var_os("OPENVMM_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => image::workspace_root().join("../shared/openvmm"),
    };
    if !dir.join("openvmm/openvmm/Cargo.toml").is_file() {
        return Err(Error::Environment(format!(
            "no OpenVMM source tree at {} (set OPENVMM_DIR to a checkout)",
            dir.display()
        )));
    }
    Ok(dir)
}

/// Debian packages the OpenVMM build needs (protoc for its protobuf crates, OpenSSL headers
/// found through pkg-config) that this host lacks.
pub fn missing_build_packages() -> Vec<&'static str> {
    let mut missing = Vec::new();
    if crate::tools::find_program("protoc").is_none() {
        missing.push("protobuf-compiler");
    }
    if crate::tools::find_program("pkg-config").is_none() {
        missing.push("pkg-config");
    }
    if !Path::new("/usr/include/openssl/ssl.h").is_file() {
        missing.push("libssl-dev");
    }
    missing
}

/// The cargo target directory of the OpenVMM build: `$OPENVMM_TARGET_DIR`, else
/// `target/openvmm` of this workspace.
pub fn build_dir() -> Result<PathBuf> {
    match std::env::var_os("OPENVMM_TARGET_DIR") {
        Some(dir) => Ok(PathBuf::from(dir)),
        None => Ok(image::target_dir()?.join("openvmm")),
    }
}

/// Builds (or finds up to date) the `openvmm` binary and returns its path.
///
/// Every failure here is an [`Error::Environment`]: nothing of ours has run yet.
pub fn build() -> Result<PathBuf> {
    crate::tools::ensure_packages(&missing_build_packages(), "building OpenVMM")
        .map_err(|error| Error::Environment(format!("OpenVMM build prerequisites: {error}")))?;
    let source = source_dir()?;
    let target = build_dir()?;
    let args = [
        "build",
        "--locked",
        "--release",
        "-p",
        "openvmm",
        "--no-default-features",
        "--features",
        FEATURES,
    ];
    eprintln!(
        "xtask: building OpenVMM from {} into {} (~7 min the first time on 2 cores; log in \
         xtask-build.log there)",
        source.display(),
        target.display()
    );
    let mut command = image::cargo();
    command
        .args(args)
        .current_dir(&source)
        .env("CARGO_TARGET_DIR", &target)
        .stdin(Stdio::null());
    if std::env::var_os("PROTOC").is_none()
        && let Some(protoc) = crate::tools::find_program("protoc")
    {
        command.env("PROTOC", protoc);
    }
    // Cargo replays the third-party crates' ~300 warnings on every (no-op) build: keep its
    // output in a log and show the tail only when the build fails.
    std::fs::create_dir_all(&target)
        .map_err(|error| Error::Environment(format!("creating {}: {error}", target.display())))?;
    let log_path = target.join("xtask-build.log");
    let log = std::fs::File::create(&log_path)
        .map_err(|error| Error::Environment(format!("creating {}: {error}", log_path.display())))?;
    let log_for_stderr = log
        .try_clone()
        .map_err(|error| Error::Environment(format!("{}: {error}", log_path.display())))?;
    let status = command
        .stdout(log)
        .stderr(log_for_stderr)
        .status()
        .map_err(|error| Error::Environment(format!("starting the OpenVMM build: {error}")))?;
    if !status.success() {
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(30)..].join("\n");
        return Err(Error::Environment(format!(
            "the OpenVMM build failed ({status}): cd {} && CARGO_TARGET_DIR={} cargo {}\n\
             --- last lines of {} ---\n{tail}",
            source.display(),
            target.display(),
            args.join(" "),
            log_path.display()
        )));
    }
    let binary = target.join("release/openvmm");
    if !binary.is_file() {
        return Err(Error::Environment(format!(
            "the OpenVMM build succeeded but left no {}",
            binary.display()
        )));
    }
    Ok(binary)
}

/// One guest as OpenVMM should run it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmConfig {
    /// The kernel ELF, as a path OpenVMM can open.
    pub kernel: PathBuf,
    /// Our command line (OpenVMM prepends `panic=-1 debug`, and `pci=off` without PCIe).
    pub cmdline: String,
    /// Guest memory in QEMU syntax (`64M`, `1G`).
    pub memory: String,
    /// Virtual processors.
    pub processors: u32,
    /// Which NICs: the synthetic one (`virtio` names it for QEMU: here it is netvsc), the VF
    /// (a MANA function on PCIe) or both (unpaired: standalone OpenVMM has no VF association).
    pub paths: NetPaths,
    /// Ports forwarded from OpenVMM's host into the guest.
    pub forwards: Vec<HostForward>,
    /// Forwards listen on every host address (nested: L1's QEMU delivers to L1's own NIC
    /// address), else on 127.0.0.1 only.
    pub listen_on_all_addresses: bool,
    /// The synthetic NIC's backend is this tap device instead of consomme (whose `hostfwd`
    /// carries only TCP and UDP: a tap carries ICMP too). The forwards then go nowhere.
    pub synthetic_tap: Option<String>,
    /// A Linux initramfs (`--initrd`), for a Linux guest.
    pub initrd: Option<PathBuf>,
}

/// A memory size in QEMU syntax (`64M`) as OpenVMM writes it (`64MB`).
pub fn openvmm_memory(memory: &str) -> String {
    let memory = memory.trim();
    if memory.ends_with(['K', 'M', 'G', 'T', 'k', 'm', 'g', 't']) {
        format!("{}B", memory.to_ascii_uppercase())
    } else {
        memory.to_string()
    }
}

/// The `consomme:` endpoint with `forwards` (and a subnet, if not the default one).
pub fn consomme_endpoint(
    subnet: Option<&str>,
    forwards: &[HostForward],
    listen_on_all_addresses: bool,
) -> String {
    let mut options: Vec<String> = subnet.map(str::to_string).into_iter().collect();
    for forward in forwards {
        let protocol = match forward.protocol {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        };
        let address = if listen_on_all_addresses {
            ""
        } else {
            "127.0.0.1"
        };
        options.push(format!(
            "hostfwd={protocol}:{address}:{}-:{}",
            forward.host_port, forward.guest_port
        ));
    }
    format!("consomme:{}", options.join(","))
}

/// The `openvmm` arguments for `config` (without the program name).
pub fn openvmm_args(config: &VmConfig) -> Vec<String> {
    let mut args: Vec<String> = [
        "--hv",
        "-p",
        &config.processors.to_string(),
        "-m",
        &openvmm_memory(&config.memory),
        "--kernel",
        &config.kernel.display().to_string(),
        "-c",
        &config.cmdline,
        "--com1",
        "stderr",
        "--guest-shutdown-action",
        "exit",
        "--guest-reset-action",
        &format!("exit:{STATUS_RESET}"),
        "--guest-crash-action",
        &format!("exit:{STATUS_CRASH}"),
    ]
    .iter()
    .map(|arg| arg.to_string())
    .collect();
    if let Some(initrd) = &config.initrd {
        args.push("--initrd".to_string());
        args.push(initrd.display().to_string());
    }
    let all = config.listen_on_all_addresses;
    let synthetic = matches!(config.paths, NetPaths::Virtio | NetPaths::Both);
    if synthetic {
        args.push("--net".to_string());
        args.push(match &config.synthetic_tap {
            Some(tap) => format!("tap:{tap}"),
            None => consomme_endpoint(None, &config.forwards, all),
        });
    }
    if matches!(config.paths, NetPaths::Vf | NetPaths::Both) {
        // The forwards go to one NIC only (two listeners cannot share a port); without
        // `pcie_port=` OpenVMM would put MANA on vPCI, which its KVM backend drops silently.
        let forwards: &[HostForward] = if synthetic { &[] } else { &config.forwards };
        args.extend(
            [
                "--pcie-root-complex",
                "rc0",
                "--pcie-root-port",
                "rc0:rp0",
                "--mana",
            ]
            .map(str::to_string),
        );
        args.push(format!(
            "pcie_port=rp0:{}",
            consomme_endpoint(Some(MANA_SUBNET), forwards, all)
        ));
    }
    args
}

/// How a run under OpenVMM ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The guest reported this exit code and powered off.
    Guest(u8),
    /// OpenVMM ended without a guest exit code: the guest reset (status 2), triple-faulted
    /// (3), or stopped some other way; a guest failure.
    NoGuestCode {
        /// OpenVMM's exit status, if it exited.
        status: Option<i32>,
    },
    /// OpenVMM could not run the guest at all: an environment failure, not the guest's.
    Environment(String),
}

impl Outcome {
    /// The exit code `cargo xtask run` returns: the guest's code, 254 for an environment
    /// failure, 255 when the guest never reported one (the QEMU runs use 255 the same way).
    pub fn process_exit_code(&self) -> i32 {
        match self {
            Outcome::Guest(code) => i32::from(*code),
            Outcome::Environment(_) => 254,
            Outcome::NoGuestCode { .. } => 255,
        }
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::Guest(0) => write!(f, "guest exited with code 0 (success)"),
            Outcome::Guest(code) => write!(f, "guest exited with code {code}"),
            Outcome::NoGuestCode {
                status: Some(STATUS_CRASH),
            } => write!(f, "guest triple-faulted (OpenVMM status {STATUS_CRASH})"),
            Outcome::NoGuestCode {
                status: Some(STATUS_RESET),
            } => write!(f, "guest reset (OpenVMM status {STATUS_RESET})"),
            Outcome::NoGuestCode { status: Some(code) } => write!(
                f,
                "OpenVMM exited with status {code} without a guest exit code"
            ),
            Outcome::NoGuestCode { status: None } => {
                write!(f, "OpenVMM ended without a guest exit code")
            }
            Outcome::Environment(reason) => write!(f, "environment failure: {reason}"),
        }
    }
}

/// The guest's code from an `EXIT_MARKER` line anywhere in `line` (OpenVMM may prefix it).
pub fn exit_code_in_line(line: &str) -> Option<u8> {
    let (_, rest) = line.split_once(EXIT_MARKER)?;
    let digits: String = rest
        .trim_start()
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// Decides how the run ended from the console lines and OpenVMM's exit status.
///
/// A status other than power-off (0), reset (2) or crash (3) is OpenVMM failing to run the
/// VM (no /dev/kvm, a bad argument, consomme without resolv.conf): an environment failure,
/// unless the guest already reported its code.
pub fn outcome(lines: &[String], status: Option<i32>) -> Outcome {
    let code = lines.iter().rev().find_map(|line| exit_code_in_line(line));
    match (code, status) {
        (Some(code), Some(0)) => Outcome::Guest(code),
        (_, Some(STATUS_RESET | STATUS_CRASH)) => Outcome::NoGuestCode { status },
        (Some(code), _) => Outcome::Guest(code),
        (None, Some(0)) | (None, None) => Outcome::NoGuestCode { status },
        (None, Some(other)) => {
            Outcome::Environment(format!("OpenVMM failed to run the VM (status {other})"))
        }
    }
}

/// A command that runs `program args` with a terminal on its stdin, as OpenVMM's console
/// thread demands: directly when our stdin is a terminal, else under `script`.
pub fn with_terminal(program: &Path, args: &[String]) -> Command {
    use std::io::IsTerminal;
    if std::io::stdin().is_terminal() {
        let mut command = Command::new(program);
        command.args(args);
        return command;
    }
    let line = crate::machine::shell_command_line(&program.display().to_string(), args);
    let mut command = Command::new("script");
    command.args(["-qfec", &line, "/dev/null"]);
    command
}

#[cfg(test)]
mod tests {
    use super::*;

    fn forward(protocol: Protocol, host_port: u16, guest_port: u16) -> HostForward {
        HostForward {
            protocol,
            host_port,
            guest_port,
        }
    }

    fn config(paths: NetPaths) -> VmConfig {
        VmConfig {
            kernel: PathBuf::from("/tandem/app.elf"),
            cmdline: "log=debug echo.port=7".to_string(),
            memory: "64M".to_string(),
            processors: 1,
            paths,
            forwards: vec![
                forward(Protocol::Tcp, 7007, 7),
                forward(Protocol::Udp, 7007, 7),
            ],
            listen_on_all_addresses: false,
            synthetic_tap: None,
            initrd: None,
        }
    }

    fn value_after<'a>(args: &'a [String], flag: &str) -> Vec<&'a str> {
        args.windows(2)
            .filter(|pair| pair[0] == flag)
            .map(|pair| pair[1].as_str())
            .collect()
    }

    #[test]
    fn synthetic_nic_is_netvsc_on_consomme_with_the_forwards() {
        let args = openvmm_args(&config(NetPaths::Virtio));
        assert!(args.contains(&"--hv".to_string()), "VMBus needs --hv");
        assert_eq!(value_after(&args, "--kernel"), ["/tandem/app.elf"]);
        assert_eq!(value_after(&args, "-c"), ["log=debug echo.port=7"]);
        assert_eq!(value_after(&args, "-m"), ["64MB"]);
        assert_eq!(value_after(&args, "--com1"), ["stderr"]);
        assert_eq!(value_after(&args, "--guest-crash-action"), ["exit:3"]);
        assert_eq!(
            value_after(&args, "--net"),
            ["consomme:hostfwd=tcp:127.0.0.1:7007-:7,hostfwd=udp:127.0.0.1:7007-:7"]
        );
        assert!(value_after(&args, "--mana").is_empty());
        assert!(!args.contains(&"--pcie-root-complex".to_string()));
    }

    #[test]
    fn vf_path_is_mana_on_a_pcie_root_port_with_the_forwards() {
        let mut nested = config(NetPaths::Vf);
        nested.listen_on_all_addresses = true;
        let args = openvmm_args(&nested);
        assert!(value_after(&args, "--net").is_empty());
        assert_eq!(value_after(&args, "--pcie-root-complex"), ["rc0"]);
        assert_eq!(value_after(&args, "--pcie-root-port"), ["rc0:rp0"]);
        assert_eq!(
            value_after(&args, "--mana"),
            ["pcie_port=rp0:consomme:10.1.0.0/24,hostfwd=tcp::7007-:7,hostfwd=udp::7007-:7"]
        );
    }

    #[test]
    fn a_tap_backend_replaces_consomme_and_an_initrd_is_passed() {
        let mut linux = config(NetPaths::Virtio);
        linux.synthetic_tap = Some("tap0".to_string());
        linux.initrd = Some(PathBuf::from("/tandem/linux/initrd.cpio"));
        let args = openvmm_args(&linux);
        assert_eq!(value_after(&args, "--net"), ["tap:tap0"]);
        assert_eq!(
            value_after(&args, "--initrd"),
            ["/tandem/linux/initrd.cpio"]
        );
        assert!(value_after(&openvmm_args(&config(NetPaths::Virtio)), "--initrd").is_empty());
    }

    #[test]
    fn both_paths_forward_through_netvsc_only() {
        let args = openvmm_args(&config(NetPaths::Both));
        assert_eq!(value_after(&args, "--net").len(), 1);
        assert_eq!(
            value_after(&args, "--mana"),
            ["pcie_port=rp0:consomme:10.1.0.0/24"]
        );
    }

    #[test]
    fn memory_sizes_take_openvmm_spelling() {
        assert_eq!(openvmm_memory("64M"), "64MB");
        assert_eq!(openvmm_memory("1g"), "1GB");
        assert_eq!(openvmm_memory("512MB"), "512MB");
        assert_eq!(openvmm_memory("67108864"), "67108864");
    }

    fn lines(text: &str) -> Vec<String> {
        text.lines().map(str::to_string).collect()
    }

    #[test]
    fn the_guest_code_comes_from_the_console_and_needs_a_power_off() {
        let transcript =
            lines("hello: done\n[    0.05] INFO app exited with code 0\ntandem: exit code 0");
        assert_eq!(outcome(&transcript, Some(0)), Outcome::Guest(0));
        let failed = lines("tandem: exit code 101\r");
        assert_eq!(outcome(&failed, Some(0)), Outcome::Guest(101));
        assert_eq!(Outcome::Guest(101).process_exit_code(), 101);
        // A triple fault after the code was printed (a broken power-off) is still a failure.
        assert_eq!(
            outcome(&transcript, Some(STATUS_CRASH)),
            Outcome::NoGuestCode {
                status: Some(STATUS_CRASH)
            }
        );
    }

    #[test]
    fn no_code_is_a_guest_failure_and_an_openvmm_error_an_environment_one() {
        let boot_only = lines("Tandem guest kernel booted");
        assert_eq!(
            outcome(&boot_only, Some(STATUS_CRASH)),
            Outcome::NoGuestCode {
                status: Some(STATUS_CRASH)
            }
        );
        assert!(
            Outcome::NoGuestCode {
                status: Some(STATUS_CRASH)
            }
            .to_string()
            .contains("triple")
        );
        assert_eq!(
            outcome(&boot_only, Some(0)),
            Outcome::NoGuestCode { status: Some(0) }
        );
        let refused = outcome(&lines("error: failed to open /dev/kvm"), Some(1));
        assert!(matches!(refused, Outcome::Environment(_)));
        assert_eq!(refused.process_exit_code(), 254);
        assert_eq!(exit_code_in_line("tandem: exit code x"), None);
        assert_eq!(exit_code_in_line("[com1] tandem: exit code 7"), Some(7));
    }
}
