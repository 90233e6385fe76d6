//! The `cargo xtask` command-line grammar (a small hand-written parser).

use crate::accel::Accel;
use crate::error::{Error, Result};
use crate::image::Profile;
use crate::machine::{DEFAULT_MEMORY, NetBackend, NetPaths};

/// Usage text.
pub const USAGE: &str = "\
usage: cargo xtask <command>

commands:
  build <app> [--release | --debug]      build examples/<app> (release by default), print the ELF path
  run <app> [options] [-- <qemu args>]   build and boot <app> with the serial console on this terminal
      --debug                 boot the debug build instead of release
      --accel kvm|tcg         override the accelerator choice
      --cmdline \"...\"         kernel command line (e.g. \"log=debug\")
      --memory 64M            guest memory
      --net user|tap=<if>     network backend (user: 127.0.0.1:7007 -> echo port 7, 5201 -> iperf)
      --paths both|virtio|vf  NIC paths: both bonded (default), virtio-net, or the igb VF alone
      --vmm qemu|openvmm      OpenVMM: Hyper-V enlightenments with netvsc (default) or MANA
                              (--paths vf); nested in a QEMU/TCG L1 without real KVM
  vf unplug|plug|disable|enable|link-down|link-up [--qmp <socket>]
                                         VF event on the running instance (default: the newest)
  image <app> [--format raw|qcow2|vhdx|vhd|iso] [--cmdline \"...\"] [--debug]
                                         bootable disk image (GRUB, BIOS + UEFI); prints its path last
  test                                   host unit tests, a short fuzz run, conformance, then QEMU integration tests
  fuzz [--target NAME] [--cases N] [--seed S] [--input HEX]
                                         hostile-input harness (fuzz/): per target cases, failures,
                                         time; a failure prints its reproducer (--input)
  conformance [FILTER]                   our VMBus/netvsc/vPCI/MANA code against OpenVMM's host code
                                         in one process ($OPENVMM_DIR, else ../shared/openvmm)
  bench boot [--runs N]                  hello boot time under TCG (default 5 runs) and idle CPU
  bench echo [--paths virtio|vf|both] [--runs N] [--vmm qemu|openvmm]
                                         root: echo round trips/s and bulk MB/s under TCG on a
                                         bridged tap (default virtio, 3 runs), vs a Linux guest;
                                         --vmm openvmm: netvsc vs a Linux 6.1 hv_netvsc guest,
                                         both under the same nested OpenVMM (no root)
  bench conformance                      netvsc against OpenVMM's netvsp in one process (release
                                         build): frames/s and Gbit/s, MTU frames both ways, LSO out
  bench failover [--cycles N]            root: echo stream across VF removal/restore per trigger
                                         (default 5 cycles): longest gap, TCP retransmissions
  bench iperf [--paths vf|virtio|both] [--runs N] [--vmm qemu|openvmm]
                                         root: host iperf3 against the iperf app (-m 32M) under TCG
                                         over the VF, virtio-net and the bond (default all three),
                                         in/out, 1 and 4 streams (default 3 runs): Gbit/s vs a
                                         Linux guest, retransmits, QEMU CPU; raw-frame ceilings;
                                         --vmm openvmm: netvsc vs a Linux 6.1 hv_netvsc guest,
                                         both under the same nested OpenVMM (no root)
  help                                   this text

The QEMU exit status is translated: `cargo xtask run` exits with the guest's exit code
(101 = kernel panic, 102 = fatal CPU exception), 255 when QEMU itself failed.";

/// Options of `cargo xtask run`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunOptions {
    /// App package to boot.
    pub app: String,
    /// Build profile.
    pub profile: Profile,
    /// Accelerator override.
    pub accel: Option<Accel>,
    /// Kernel command line.
    pub cmdline: String,
    /// Guest memory.
    pub memory: String,
    /// Network backend.
    pub net: NetBackend,
    /// NIC paths.
    pub paths: NetPaths,
    /// Extra QEMU arguments (after `--`).
    pub qemu_args: Vec<String>,
    /// The VMM.
    pub vmm: crate::openvmm_run::Vmm,
}

/// A parsed `cargo xtask` invocation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// `build <app>`.
    Build {
        /// App package.
        app: String,
        /// Build profile.
        profile: Profile,
    },
    /// `run <app> ...`.
    Run(RunOptions),
    /// `image <app> ...`.
    Image {
        /// App package.
        app: String,
        /// Build profile.
        profile: Profile,
        /// Disk image format.
        format: crate::disk_image::ImageFormat,
        /// Kernel command line written into the image's grub.cfg.
        cmdline: String,
    },
    /// `vf <action> [--qmp <socket>]`.
    Vf {
        /// What to do.
        action: crate::vf::VfAction,
        /// The instance's QMP socket (default: the newest one `cargo xtask run` left).
        qmp: Option<std::path::PathBuf>,
    },
    /// `test`.
    Test,
    /// `fuzz ...`.
    Fuzz(crate::fuzz::FuzzOptions),
    /// `conformance [FILTER]`.
    Conformance {
        /// Only tests whose name contains this.
        filter: Option<String>,
    },
    /// `bench boot`.
    BenchBoot {
        /// Number of boots.
        runs: usize,
    },
    /// `bench echo`.
    BenchEcho {
        /// NIC paths the guest gets.
        paths: NetPaths,
        /// Number of boots measured (under OpenVMM: runs in one boot of each guest).
        runs: usize,
        /// The VMM (OpenVMM: netvsc against a Linux guest, nested).
        vmm: crate::openvmm_run::Vmm,
    },
    /// `bench conformance`.
    BenchConformance,
    /// `bench failover`.
    BenchFailover {
        /// Removal/restore cycles per trigger.
        cycles: usize,
    },
    /// `bench iperf`.
    BenchIperf {
        /// Client runs per measurement.
        runs: usize,
        /// Only this path (VF alone, virtio-net alone or the bond); all three when `None`.
        paths: Option<NetPaths>,
        /// The VMM (OpenVMM: netvsc against a Linux guest, nested).
        vmm: crate::openvmm_run::Vmm,
    },
    /// `help`.
    Help,
}

/// Splits `--name value` / `--name=value` / flags / positionals.
struct Words<'a> {
    words: std::iter::Cloned<std::slice::Iter<'a, String>>,
}

impl Words<'_> {
    fn value(&mut self, name: &str, inline: Option<String>) -> Result<String> {
        inline
            .or_else(|| self.words.next())
            .ok_or_else(|| Error::Usage(format!("{name} needs a value\n\n{USAGE}")))
    }
}

fn unexpected(word: &str) -> Error {
    Error::Usage(format!("unexpected argument `{word}`\n\n{USAGE}"))
}

fn split_option(word: &str) -> (String, Option<String>) {
    match word.split_once('=') {
        Some((name, value)) if word.starts_with("--") => {
            (name.to_string(), Some(value.to_string()))
        }
        _ => (word.to_string(), None),
    }
}

fn app_name(words: &mut Words, command: &str) -> Result<String> {
    match words.words.next() {
        Some(app) if !app.starts_with('-') => Ok(app),
        _ => Err(Error::Usage(format!(
            "`{command}` needs an app name (e.g. hello)\n\n{USAGE}"
        ))),
    }
}

/// Parses the options of `bench echo`.
fn parse_bench_echo(mut words: Words) -> Result<Command> {
    let mut paths = NetPaths::Virtio;
    let mut runs = crate::bench_echo::DEFAULT_RUNS;
    let mut vmm = crate::openvmm_run::Vmm::Qemu;
    while let Some(word) = words.words.next() {
        let (name, inline) = split_option(&word);
        match name.as_str() {
            "--paths" => paths = words.value(&name, inline)?.parse()?,
            "--vmm" => vmm = words.value(&name, inline)?.parse()?,
            "--runs" => {
                let text = words.value(&name, inline)?;
                runs = text
                    .parse()
                    .ok()
                    .filter(|&runs: &usize| runs > 0)
                    .ok_or_else(|| {
                        Error::Usage(format!("--runs `{text}` is not a positive number"))
                    })?;
            }
            _ => return Err(unexpected(&word)),
        }
    }
    openvmm_bench_paths(vmm, Some(paths))?;
    Ok(Command::BenchEcho { paths, runs, vmm })
}

/// Parses the options of `bench failover`.
fn parse_bench_failover(mut words: Words) -> Result<Command> {
    let mut cycles = crate::bench_failover::DEFAULT_CYCLES;
    while let Some(word) = words.words.next() {
        let (name, inline) = split_option(&word);
        match name.as_str() {
            "--cycles" => {
                let text = words.value(&name, inline)?;
                cycles = text
                    .parse()
                    .ok()
                    .filter(|&cycles: &usize| cycles > 0)
                    .ok_or_else(|| {
                        Error::Usage(format!("--cycles `{text}` is not a positive number"))
                    })?;
            }
            _ => return Err(unexpected(&word)),
        }
    }
    Ok(Command::BenchFailover { cycles })
}

/// Parses the options of `bench iperf`.
fn parse_bench_iperf(mut words: Words) -> Result<Command> {
    let mut runs = crate::bench_iperf::DEFAULT_RUNS;
    let mut paths = None;
    let mut vmm = crate::openvmm_run::Vmm::Qemu;
    while let Some(word) = words.words.next() {
        let (name, inline) = split_option(&word);
        match name.as_str() {
            "--paths" => paths = Some(words.value(&name, inline)?.parse()?),
            "--vmm" => vmm = words.value(&name, inline)?.parse()?,
            "--runs" => {
                let text = words.value(&name, inline)?;
                runs = match text.parse::<usize>() {
                    Ok(count) if count > 0 => count,
                    _ => {
                        return Err(Error::Usage(format!(
                            "--runs `{text}` is not a positive number"
                        )));
                    }
                };
            }
            _ => return Err(unexpected(&word)),
        }
    }
    openvmm_bench_paths(vmm, paths)?;
    Ok(Command::BenchIperf { runs, paths, vmm })
}

/// The OpenVMM benches measure netvsc only (standalone OpenVMM pairs no VF with it).
fn openvmm_bench_paths(vmm: crate::openvmm_run::Vmm, paths: Option<NetPaths>) -> Result<()> {
    match (vmm, paths) {
        (crate::openvmm_run::Vmm::OpenVmm, Some(NetPaths::Vf | NetPaths::Both)) => {
            Err(Error::Usage(
                "the OpenVMM benches measure netvsc only: drop --paths or say --paths virtio"
                    .to_string(),
            ))
        }
        _ => Ok(()),
    }
}

fn parse_fuzz(mut words: Words) -> Result<Command> {
    let mut options = crate::fuzz::FuzzOptions::default();
    let number = |name: &str, text: String| -> Result<u64> {
        let parsed = match text.strip_prefix("0x") {
            Some(hex) => u64::from_str_radix(hex, 16).ok(),
            None => text.parse().ok(),
        };
        parsed.ok_or_else(|| Error::Usage(format!("{name} `{text}` is not a number")))
    };
    while let Some(word) = words.words.next() {
        let (name, inline) = split_option(&word);
        match name.as_str() {
            "--target" => options.targets.push(words.value(&name, inline)?),
            "--cases" => {
                let cases = number(&name, words.value(&name, inline)?)?;
                if cases == 0 {
                    return Err(Error::Usage("--cases must be positive".into()));
                }
                options.cases = Some(cases);
            }
            "--seed" => options.seed = Some(number(&name, words.value(&name, inline)?)?),
            "--input" => options.input = Some(words.value(&name, inline)?),
            _ => return Err(unexpected(&word)),
        }
    }
    Ok(Command::Fuzz(options))
}

/// Parses the arguments after `cargo xtask`.
pub fn parse(args: &[String]) -> Result<Command> {
    let mut words = Words {
        words: args.iter().cloned(),
    };
    let Some(command) = words.words.next() else {
        return Ok(Command::Help);
    };
    match command.as_str() {
        "help" | "--help" | "-h" => Ok(Command::Help),
        "build" => {
            let app = app_name(&mut words, "build")?;
            let mut profile = Profile::Release;
            for word in words.words {
                match word.as_str() {
                    "--release" => profile = Profile::Release,
                    "--debug" => profile = Profile::Debug,
                    other => return Err(unexpected(other)),
                }
            }
            Ok(Command::Build { app, profile })
        }
        "run" => {
            let mut options = RunOptions {
                app: app_name(&mut words, "run")?,
                profile: Profile::Release,
                accel: None,
                cmdline: String::new(),
                memory: DEFAULT_MEMORY.to_string(),
                net: NetBackend::User,
                paths: NetPaths::Both,
                qemu_args: Vec::new(),
                vmm: crate::openvmm_run::Vmm::Qemu,
            };
            while let Some(word) = words.words.next() {
                let (name, inline) = split_option(&word);
                match name.as_str() {
                    "--" => {
                        options.qemu_args = words.words.by_ref().collect();
                    }
                    "--debug" => options.profile = Profile::Debug,
                    "--release" => options.profile = Profile::Release,
                    "--accel" => options.accel = Some(words.value(&name, inline)?.parse()?),
                    "--cmdline" => options.cmdline = words.value(&name, inline)?,
                    "--memory" => options.memory = words.value(&name, inline)?,
                    "--net" => options.net = words.value(&name, inline)?.parse()?,
                    "--paths" => options.paths = words.value(&name, inline)?.parse()?,
                    "--vmm" => options.vmm = words.value(&name, inline)?.parse()?,
                    _ => return Err(unexpected(&word)),
                }
            }
            Ok(Command::Run(options))
        }
        "image" => {
            let app = app_name(&mut words, "image")?;
            let mut profile = Profile::Release;
            let mut format = crate::disk_image::ImageFormat::Raw;
            let mut cmdline = String::new();
            while let Some(word) = words.words.next() {
                let (name, inline) = split_option(&word);
                match name.as_str() {
                    "--debug" => profile = Profile::Debug,
                    "--release" => profile = Profile::Release,
                    "--format" => {
                        let text = words.value(&name, inline)?;
                        format = text.parse().map_err(|error| {
                            Error::Usage(format!("--format `{text}`: {error}\n\n{USAGE}"))
                        })?;
                    }
                    "--cmdline" => cmdline = words.value(&name, inline)?,
                    _ => return Err(unexpected(&word)),
                }
            }
            Ok(Command::Image {
                app,
                profile,
                format,
                cmdline,
            })
        }
        "vf" => {
            let action = words
                .words
                .next()
                .ok_or_else(|| Error::Usage(format!("`vf` needs an action\n\n{USAGE}")))?
                .parse()?;
            let mut qmp = None;
            while let Some(word) = words.words.next() {
                let (name, inline) = split_option(&word);
                match name.as_str() {
                    "--qmp" => qmp = Some(std::path::PathBuf::from(words.value(&name, inline)?)),
                    _ => return Err(unexpected(&word)),
                }
            }
            Ok(Command::Vf { action, qmp })
        }
        "fuzz" => parse_fuzz(words),
        "conformance" => {
            let filter = words.words.next();
            if let Some(extra) = words.words.next() {
                return Err(unexpected(&extra));
            }
            Ok(Command::Conformance { filter })
        }
        "test" => match words.words.next() {
            None => Ok(Command::Test),
            Some(other) => Err(unexpected(&other)),
        },
        "bench" => {
            match words.words.next().as_deref() {
                Some("boot") => {}
                Some("failover") => return parse_bench_failover(words),
                Some("conformance") => {
                    if let Some(extra) = words.words.next() {
                        return Err(unexpected(&extra));
                    }
                    return Ok(Command::BenchConformance);
                }
                Some("echo") => return parse_bench_echo(words),
                Some("iperf") => return parse_bench_iperf(words),
                _ => {
                    return Err(Error::Usage(format!(
                        "`bench` needs `boot`, `conformance`, `echo`, `failover` or `iperf`\n\n{USAGE}"
                    )));
                }
            }
            let mut runs = 5;
            while let Some(word) = words.words.next() {
                let (name, inline) = split_option(&word);
                match name.as_str() {
                    "--runs" => {
                        let text = words.value(&name, inline)?;
                        runs = text
                            .parse()
                            .ok()
                            .filter(|&runs: &usize| runs > 0)
                            .ok_or_else(|| {
                                Error::Usage(format!("--runs `{text}` is not a positive number"))
                            })?;
                    }
                    _ => return Err(unexpected(&word)),
                }
            }
            Ok(Command::BenchBoot { runs })
        }
        other => Err(Error::Usage(format!(
            "unknown command `{other}`\n\n{USAGE}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_words(line: &str) -> Result<Command> {
        let words: Vec<String> = line.split_whitespace().map(String::from).collect();
        parse(&words)
    }

    #[test]
    fn image_takes_format_and_cmdline() {
        let command = parse(&[
            "image".to_string(),
            "echo".to_string(),
            "--format".to_string(),
            "vhdx".to_string(),
            "--cmdline".to_string(),
            "log=debug ip=10.0.2.15/24".to_string(),
        ])
        .unwrap();
        assert_eq!(
            command,
            Command::Image {
                app: "echo".to_string(),
                profile: Profile::Release,
                format: crate::disk_image::ImageFormat::Vhdx,
                cmdline: "log=debug ip=10.0.2.15/24".to_string(),
            }
        );
        assert!(parse_words("image echo --format floppy").is_err());
    }

    #[test]
    fn run_defaults_to_release_both_paths_on_user_networking() {
        let Command::Run(options) = parse_words("run echo").unwrap() else {
            panic!("not a run command");
        };
        assert_eq!(options.app, "echo");
        assert_eq!(options.profile, Profile::Release);
        assert_eq!(options.accel, None);
        assert_eq!(options.memory, "64M");
        assert_eq!(options.net, NetBackend::User);
        assert_eq!(options.paths, NetPaths::Both);
        assert!(options.qemu_args.is_empty());
    }

    #[test]
    fn run_options_in_both_spellings_and_qemu_args_after_double_dash() {
        let args: Vec<String> = [
            "run",
            "hello",
            "--accel",
            "tcg",
            "--cmdline",
            "log=debug hello.stay=1",
            "--memory=128M",
            "--net=tap=tap0",
            "--debug",
            "--",
            "-s",
            "--cmdline",
        ]
        .map(String::from)
        .to_vec();
        let Command::Run(options) = parse(&args).unwrap() else {
            panic!("not a run command");
        };
        assert_eq!(options.accel, Some(Accel::Tcg));
        assert_eq!(options.cmdline, "log=debug hello.stay=1");
        assert_eq!(options.memory, "128M");
        assert_eq!(options.net, NetBackend::Tap("tap0".to_string()));
        assert_eq!(options.profile, Profile::Debug);
        assert_eq!(options.qemu_args, ["-s", "--cmdline"]);
    }

    #[test]
    fn run_takes_the_vmm() {
        let Command::Run(options) = parse_words("run echo --vmm openvmm --paths vf").unwrap()
        else {
            panic!("not a run command");
        };
        assert_eq!(options.vmm, crate::openvmm_run::Vmm::OpenVmm);
        assert_eq!(options.paths, NetPaths::Vf);
        let Command::Run(options) = parse_words("run echo").unwrap() else {
            panic!("not a run command");
        };
        assert_eq!(options.vmm, crate::openvmm_run::Vmm::Qemu);
        assert!(matches!(
            parse_words("run echo --vmm hyperv"),
            Err(Error::Usage(_))
        ));
    }

    #[test]
    fn bad_invocations_are_usage_errors() {
        for line in [
            "run",
            "run --accel kvm",
            "run hello --accel",
            "run hello --accel hvf",
            "run hello --paths sriov",
            "run hello --verbose",
            "build",
            "build hello --fast",
            "bench",
            "bench boot --runs 0",
            "bench failover --cycles 0",
            "bench echo --runs 0",
            "bench echo --paths sriov",
            "bench echo --cycles 3",
            "bench failover --runs 3",
            "bench conformance --runs 3",
            "test now",
            "deploy",
        ] {
            assert!(
                matches!(parse_words(line), Err(Error::Usage(_))),
                "`{line}` should be a usage error"
            );
        }
    }

    #[test]
    fn bench_iperf_takes_only_a_positive_run_count() {
        assert_eq!(
            parse_words("bench iperf").unwrap(),
            Command::BenchIperf {
                runs: 3,
                paths: None,
                vmm: crate::openvmm_run::Vmm::Qemu,
            }
        );
        assert_eq!(
            parse_words("bench iperf --runs=7 --paths vf").unwrap(),
            Command::BenchIperf {
                runs: 7,
                paths: Some(NetPaths::Vf),
                vmm: crate::openvmm_run::Vmm::Qemu,
            }
        );
        for paths in [NetPaths::Virtio, NetPaths::Vf, NetPaths::Both] {
            assert_eq!(paths.name().parse::<NetPaths>().unwrap(), paths);
        }
        assert_eq!(
            parse_words("bench iperf --runs 1").unwrap(),
            Command::BenchIperf {
                runs: 1,
                paths: None,
                vmm: crate::openvmm_run::Vmm::Qemu,
            }
        );
        assert_eq!(
            parse_words("bench iperf --vmm openvmm --runs 2").unwrap(),
            Command::BenchIperf {
                runs: 2,
                paths: None,
                vmm: crate::openvmm_run::Vmm::OpenVmm,
            }
        );
        for line in [
            "bench iperf --runs 0",
            "bench iperf --runs",
            "bench iperf --runs many",
            "bench iperf --paths sriov",
            "bench iperf --vmm openvmm --paths vf",
            "bench iperf --vmm hyperv",
        ] {
            assert!(
                matches!(parse_words(line), Err(Error::Usage(_))),
                "`{line}` should be a usage error"
            );
        }
    }

    #[test]
    fn other_commands() {
        assert_eq!(parse_words("").unwrap(), Command::Help);
        assert_eq!(parse_words("test").unwrap(), Command::Test);
        assert_eq!(
            parse_words("conformance").unwrap(),
            Command::Conformance { filter: None }
        );
        assert_eq!(
            parse_words("conformance netvsc").unwrap(),
            Command::Conformance {
                filter: Some("netvsc".to_string())
            }
        );
        assert!(parse_words("conformance a b").is_err());
        assert_eq!(
            parse_words("fuzz --target acpi --cases 10 --seed 0x10").unwrap(),
            Command::Fuzz(crate::fuzz::FuzzOptions {
                targets: vec!["acpi".into()],
                cases: Some(10),
                seed: Some(16),
                input: None,
            })
        );
        assert!(parse_words("fuzz --cases 0").is_err());
        assert!(parse_words("fuzz --bogus").is_err());
        assert_eq!(
            parse_words("bench boot").unwrap(),
            Command::BenchBoot { runs: 5 }
        );
        assert_eq!(
            parse_words("bench boot --runs 3").unwrap(),
            Command::BenchBoot { runs: 3 }
        );
        assert_eq!(
            parse_words("bench echo").unwrap(),
            Command::BenchEcho {
                paths: NetPaths::Virtio,
                runs: 3,
                vmm: crate::openvmm_run::Vmm::Qemu,
            }
        );
        assert_eq!(
            parse_words("bench echo --paths vf --runs=5").unwrap(),
            Command::BenchEcho {
                paths: NetPaths::Vf,
                runs: 5,
                vmm: crate::openvmm_run::Vmm::Qemu,
            }
        );
        assert_eq!(
            parse_words("bench echo --vmm=openvmm").unwrap(),
            Command::BenchEcho {
                paths: NetPaths::Virtio,
                runs: 3,
                vmm: crate::openvmm_run::Vmm::OpenVmm,
            }
        );
        assert!(parse_words("bench echo --vmm openvmm --paths both").is_err());
        assert_eq!(
            parse_words("bench failover").unwrap(),
            Command::BenchFailover { cycles: 5 }
        );
        assert_eq!(
            parse_words("bench conformance").unwrap(),
            Command::BenchConformance
        );
        assert_eq!(
            parse_words("bench failover --cycles=9").unwrap(),
            Command::BenchFailover { cycles: 9 }
        );
        assert_eq!(
            parse_words("build hello --debug").unwrap(),
            Command::Build {
                app: "hello".to_string(),
                profile: Profile::Debug
            }
        );
    }
}
