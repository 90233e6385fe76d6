//! Host tool checks (QEMU ≥ 10, iperf3, nc, ping, ip) and their installation on Debian.
//!
//! On Debian bookworm QEMU 10 comes from bookworm-backports. As root we install what is
//! missing ourselves; otherwise we print the exact commands and stop.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::{Error, Result};

/// Lowest QEMU major version we support (native PCIe hot-plug and igb behaviour were checked on 10).
pub const MIN_QEMU_MAJOR: u32 = 10;

/// The QEMU binary we launch.
pub const QEMU_BINARY: &str = "qemu-system-x86_64";

/// The backports line added for bookworm, and the file it goes into.
pub const BACKPORTS_LINE: &str = "deb http://deb.debian.org/debian bookworm-backports main";
/// Where [`BACKPORTS_LINE`] is written.
pub const BACKPORTS_LIST: &str = "/etc/apt/sources.list.d/backports.list";

/// A host program some command needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tool {
    /// qemu-system-x86_64, at least [`MIN_QEMU_MAJOR`].
    Qemu,
    /// iperf3, the client for the iperf app's tests.
    Iperf3,
    /// nc (OpenBSD netcat), for the echo app's tests.
    Netcat,
    /// ping, for ICMP tests.
    Ping,
    /// ip (iproute2), for tap set-up.
    Ip,
}

impl Tool {
    /// The program name looked up in PATH.
    pub fn program(self) -> &'static str {
        match self {
            Tool::Qemu => QEMU_BINARY,
            Tool::Iperf3 => "iperf3",
            Tool::Netcat => "nc",
            Tool::Ping => "ping",
            Tool::Ip => "ip",
        }
    }
}

/// Tools `cargo xtask run` needs.
pub const RUN_TOOLS: &[Tool] = &[Tool::Qemu];
/// Tools `cargo xtask test` needs (the network tests drive the guest with these).
pub const TEST_TOOLS: &[Tool] = &[Tool::Qemu, Tool::Iperf3, Tool::Netcat, Tool::Ping, Tool::Ip];

/// Parses `qemu-system-x86_64 --version` output into (major, minor, micro).
pub fn parse_qemu_version(output: &str) -> Option<(u32, u32, u32)> {
    let rest = output.split("version ").nth(1)?;
    let token = rest.split_whitespace().next()?;
    let mut numbers = token.split('.').map(|part| {
        let digits: String = part.chars().take_while(char::is_ascii_digit).collect();
        digits.parse::<u32>().ok()
    });
    let major = numbers.next()??;
    let minor = numbers.next().flatten().unwrap_or(0);
    let micro = numbers.next().flatten().unwrap_or(0);
    Some((major, minor, micro))
}

/// Finds a program in PATH, also looking in the sbin directories that non-root PATHs lack.
pub fn find_program(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join(program))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
}

/// Why a tool is not usable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ToolProblem {
    /// Not found in PATH.
    Missing,
    /// QEMU is older than [`MIN_QEMU_MAJOR`] (or its version was unreadable).
    TooOld(String),
}

/// Checks one tool; `Ok(())` when usable.
pub fn check_tool(tool: Tool) -> std::result::Result<(), ToolProblem> {
    let path = find_program(tool.program()).ok_or(ToolProblem::Missing)?;
    if tool != Tool::Qemu {
        return Ok(());
    }
    let output = Command::new(&path)
        .arg("--version")
        .output()
        .map_err(|error| {
            ToolProblem::TooOld(format!("`{} --version` failed: {error}", path.display()))
        })?;
    let text = String::from_utf8_lossy(&output.stdout);
    match parse_qemu_version(&text) {
        Some((major, ..)) if major >= MIN_QEMU_MAJOR => Ok(()),
        Some((major, minor, micro)) => Err(ToolProblem::TooOld(format!(
            "{QEMU_BINARY} is {major}.{minor}.{micro}, need ≥ {MIN_QEMU_MAJOR}"
        ))),
        None => Err(ToolProblem::TooOld(format!(
            "cannot read a version from `{QEMU_BINARY} --version`: {:?}",
            text.lines().next().unwrap_or("")
        ))),
    }
}

/// The host's OS, as far as installing packages is concerned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostOs {
    /// True on Debian (or a derivative whose /etc/os-release says ID_LIKE=debian).
    pub debian: bool,
    /// VERSION_CODENAME, e.g. `bookworm`.
    pub codename: String,
    /// True when we run as uid 0.
    pub root: bool,
    /// True when [`BACKPORTS_LIST`] already names bookworm-backports.
    pub backports_listed: bool,
}

impl HostOs {
    /// Reads /etc/os-release, /proc/self/status and the apt sources.
    pub fn probe() -> Self {
        let os_release = std::fs::read_to_string("/etc/os-release").unwrap_or_default();
        let (debian, codename) = parse_os_release(&os_release);
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let backports_listed = std::fs::read_to_string(BACKPORTS_LIST)
            .is_ok_and(|text| text.contains("bookworm-backports"));
        HostOs {
            debian,
            codename,
            root: uid_from_status(&status) == Some(0),
            backports_listed,
        }
    }
}

/// Returns (is Debian or Debian-like, VERSION_CODENAME) from /etc/os-release text.
pub fn parse_os_release(text: &str) -> (bool, String) {
    let mut debian = false;
    let mut codename = String::new();
    for line in text.lines() {
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        let value = value.trim_matches('"');
        match key {
            "ID" if value == "debian" => debian = true,
            "ID_LIKE" if value.split_whitespace().any(|id| id == "debian") => debian = true,
            "VERSION_CODENAME" => codename = value.to_string(),
            _ => {}
        }
    }
    (debian, codename)
}

/// The real uid from a /proc/<pid>/status text.
pub fn uid_from_status(status: &str) -> Option<u32> {
    status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|uid| uid.parse().ok())
}

/// One installation step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InstallStep {
    /// Append [`BACKPORTS_LINE`] to [`BACKPORTS_LIST`].
    AddBackports,
    /// Run a command (program, arguments).
    Run(Vec<String>),
}

impl InstallStep {
    /// The step as a shell command a user can paste (with `sudo` when not root).
    pub fn shell(&self, sudo: bool) -> String {
        let prefix = if sudo { "sudo " } else { "" };
        match self {
            InstallStep::AddBackports => {
                format!("echo '{BACKPORTS_LINE}' | {prefix}tee -a {BACKPORTS_LIST}")
            }
            InstallStep::Run(argv) => format!("{prefix}{}", argv.join(" ")),
        }
    }
}

fn run_step(words: &[&str]) -> InstallStep {
    InstallStep::Run(words.iter().map(|word| word.to_string()).collect())
}

/// The steps that install every tool we use on this Debian host.
pub fn install_plan(os: &HostOs) -> Vec<InstallStep> {
    let mut steps = Vec::new();
    let bookworm = os.codename == "bookworm";
    if bookworm && !os.backports_listed {
        steps.push(InstallStep::AddBackports);
    }
    steps.push(run_step(&["apt-get", "update"]));
    if bookworm {
        steps.push(run_step(&[
            "apt-get",
            "install",
            "-y",
            "-t",
            "bookworm-backports",
            "qemu-system-x86",
            "qemu-utils",
        ]));
    } else {
        steps.push(run_step(&[
            "apt-get",
            "install",
            "-y",
            "qemu-system-x86",
            "qemu-utils",
        ]));
    }
    steps.push(run_step(&[
        "apt-get",
        "install",
        "-y",
        "ovmf",
        "iperf3",
        "netcat-openbsd",
        "iproute2",
        "iputils-ping",
    ]));
    steps
}

fn execute_step(step: &InstallStep) -> Result<()> {
    eprintln!("xtask: install: {}", step.shell(false));
    match step {
        InstallStep::AddBackports => {
            use std::io::Write;
            let mut file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(BACKPORTS_LIST)
                .map_err(|error| Error::io(format!("opening {BACKPORTS_LIST}"), error))?;
            writeln!(file, "{BACKPORTS_LINE}")
                .map_err(|error| Error::io(format!("writing {BACKPORTS_LIST}"), error))
        }
        InstallStep::Run(argv) => {
            let status = Command::new(&argv[0])
                .args(&argv[1..])
                .env("DEBIAN_FRONTEND", "noninteractive")
                .status()
                .map_err(|error| Error::io(format!("starting {}", argv[0]), error))?;
            if status.success() {
                Ok(())
            } else {
                Err(Error::CommandFailed {
                    command: argv.join(" "),
                    status,
                })
            }
        }
    }
}

fn describe(problems: &[(Tool, ToolProblem)]) -> String {
    problems
        .iter()
        .map(|(tool, problem)| match problem {
            ToolProblem::Missing => format!("{} is not installed", tool.program()),
            ToolProblem::TooOld(detail) => detail.clone(),
        })
        .collect::<Vec<_>>()
        .join("; ")
}

fn problems(tools: &[Tool]) -> Vec<(Tool, ToolProblem)> {
    tools
        .iter()
        .filter_map(|&tool| check_tool(tool).err().map(|problem| (tool, problem)))
        .collect()
}

/// Makes sure every tool is usable, installing them as root on Debian.
pub fn ensure_tools(tools: &[Tool]) -> Result<()> {
    let found = problems(tools);
    if found.is_empty() {
        return Ok(());
    }
    eprintln!("xtask: {}", describe(&found));
    let os = HostOs::probe();
    if !os.debian {
        return Err(Error::Tools(format!(
            "{}; this is not Debian, so install QEMU ≥ {MIN_QEMU_MAJOR}, iperf3, OpenBSD netcat, \
             ping and iproute2 with your package manager",
            describe(&found)
        )));
    }
    let plan = install_plan(&os);
    if !os.root {
        let commands: Vec<String> = plan.iter().map(|step| step.shell(true)).collect();
        return Err(Error::Tools(format!(
            "{}; not running as root, so run these commands and retry:\n  {}",
            describe(&found),
            commands.join("\n  ")
        )));
    }
    for step in &plan {
        execute_step(step)?;
    }
    let remaining = problems(tools);
    if remaining.is_empty() {
        eprintln!("xtask: tools installed");
        Ok(())
    } else {
        Err(Error::Tools(format!(
            "still unusable after installing: {}",
            describe(&remaining)
        )))
    }
}

/// Installs Debian `packages` (e.g. GRUB's platform files, which no program check covers) when
/// root on Debian; otherwise says which command to run. `why` names what needs them.
pub fn ensure_packages(packages: &[&str], why: &str) -> Result<()> {
    if packages.is_empty() {
        return Ok(());
    }
    let list = packages.join(" ");
    let os = HostOs::probe();
    if !os.debian {
        return Err(Error::Tools(format!(
            "{why} need these Debian packages or their equivalents: {list}"
        )));
    }
    if !os.root {
        return Err(Error::Tools(format!(
            "{why} need packages that are missing; run `sudo apt-get install -y {list}` and retry"
        )));
    }
    eprintln!("xtask: {why} need {list}: installing");
    execute_step(&run_step(&["apt-get", "update"]))?;
    let mut install = vec!["apt-get", "install", "-y"];
    install.extend_from_slice(packages);
    execute_step(&run_step(&install))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_debian_backports_qemu_version() {
        let text = "QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)\n\
                    Copyright (c) 2003-2025 Fabrice Bellard and the QEMU Project developers\n";
        assert_eq!(parse_qemu_version(text), Some((10, 0, 2)));
    }

    #[test]
    fn parses_bookworm_and_development_versions() {
        assert_eq!(
            parse_qemu_version("QEMU emulator version 7.2.19 (Debian 1:7.2+dfsg-7+deb12u16)"),
            Some((7, 2, 19))
        );
        assert_eq!(
            parse_qemu_version("QEMU emulator version 10.1.50 (v10.1.0-rc1)"),
            Some((10, 1, 50))
        );
        assert_eq!(
            parse_qemu_version("QEMU emulator version 11"),
            Some((11, 0, 0))
        );
        assert_eq!(parse_qemu_version("qemu: command not found"), None);
        assert_eq!(parse_qemu_version("QEMU emulator version x.y"), None);
    }

    #[test]
    fn os_release_and_uid_parsing() {
        let bookworm = "PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\nID=debian\n\
                        VERSION_CODENAME=bookworm\n";
        assert_eq!(parse_os_release(bookworm), (true, "bookworm".to_string()));
        let ubuntu = "ID=ubuntu\nID_LIKE=debian\nVERSION_CODENAME=noble\n";
        assert_eq!(parse_os_release(ubuntu), (true, "noble".to_string()));
        assert!(!parse_os_release("ID=fedora\n").0);
        assert_eq!(
            uid_from_status("Name:\tx\nUid:\t1000\t1000\t1000\t1000\n"),
            Some(1000)
        );
        assert_eq!(uid_from_status("Uid:\t0\t0\t0\t0\n"), Some(0));
    }

    #[test]
    fn bookworm_plan_adds_backports_once_and_installs_qemu_from_it() {
        let mut os = HostOs {
            debian: true,
            codename: "bookworm".to_string(),
            root: true,
            backports_listed: false,
        };
        let plan = install_plan(&os);
        assert_eq!(plan[0], InstallStep::AddBackports);
        assert_eq!(plan[1].shell(false), "apt-get update");
        assert_eq!(
            plan[2].shell(false),
            "apt-get install -y -t bookworm-backports qemu-system-x86 qemu-utils"
        );
        assert_eq!(
            plan[3].shell(true),
            "sudo apt-get install -y ovmf iperf3 netcat-openbsd iproute2 iputils-ping"
        );
        os.backports_listed = true;
        assert!(!install_plan(&os).contains(&InstallStep::AddBackports));
    }

    #[test]
    fn newer_debian_installs_qemu_from_main() {
        let os = HostOs {
            debian: true,
            codename: "trixie".to_string(),
            root: true,
            backports_listed: false,
        };
        let plan = install_plan(&os);
        assert!(!plan.contains(&InstallStep::AddBackports));
        assert_eq!(
            plan[1].shell(false),
            "apt-get install -y qemu-system-x86 qemu-utils"
        );
    }

    #[test]
    fn installed_qemu_is_accepted() {
        // The development and CI machines have QEMU 10 from bookworm-backports.
        assert_eq!(check_tool(Tool::Qemu), Ok(()));
        // Nothing missing, so nothing is installed and no root is needed.
        assert!(ensure_tools(RUN_TOOLS).is_ok());
        assert!(find_program("sh").is_some());
        assert!(find_program("surely-not-a-program-xyz").is_none());
    }
}
