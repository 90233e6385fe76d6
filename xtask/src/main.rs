//! `cargo xtask`: build, run, test and benchmark Tandem images (see `cargo xtask help`).

use std::process::{Command, ExitCode, Stdio};

use xtask::accel;
use xtask::bench;
use xtask::cli::{self, RunOptions, USAGE};
use xtask::exit::QemuExit;
use xtask::image::{self, Profile};
use xtask::machine::{self, Machine};
use xtask::tools::{self, QEMU_BINARY};
use xtask::{Error, Result};

/// Apps whose images the integration tests boot.
const TEST_APPS: &[&str] = &["hello", "echo", "iperf"];
/// The integration-test package (run after the host unit tests).
const INTEGRATION_PACKAGE: &str = "tandem-tests";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = cli::parse(&args).and_then(|command| match command {
        cli::Command::Help => {
            println!("{USAGE}");
            Ok(0)
        }
        cli::Command::Build { app, profile } => {
            let elf = image::build_app(&app, profile)?;
            println!("{}", elf.display());
            Ok(0)
        }
        cli::Command::Run(options) => run(&options),
        cli::Command::Image {
            app,
            profile,
            format,
            cmdline,
        } => {
            tools::ensure_packages(&xtask::disk_image::missing_packages(format), "disk images")?;
            let elf = image::build_app(&app, profile)?;
            let out_dir = image::target_dir()?.join("images");
            let path = xtask::disk_image::build_image(
                &elf,
                &app,
                format,
                &cmdline,
                &out_dir,
                &mut |step| {
                    eprintln!("xtask: {step}");
                },
            )
            .map_err(Error::Image)?;
            println!("{}", path.display());
            Ok(0)
        }
        cli::Command::Vf { action, qmp } => {
            let qmp = match qmp {
                Some(qmp) => qmp,
                None => xtask::vf::newest_qmp_socket(&image::target_dir()?.join("qemu"))?,
            };
            println!("{}", xtask::vf::run_action(action, &qmp)?);
            Ok(0)
        }
        cli::Command::Test => test(),
        cli::Command::Fuzz(options) => xtask::fuzz::run_harness(&options.harness_args()),
        cli::Command::Conformance { filter } => {
            Ok(if xtask::conformance::run(filter.as_deref())? {
                0
            } else {
                1
            })
        }
        cli::Command::BenchBoot { runs } => {
            tools::ensure_tools(tools::RUN_TOOLS)?;
            let elf = image::build_app("hello", Profile::Release)?;
            bench::boot_benchmark(&elf, runs)?;
            Ok(0)
        }
        cli::Command::BenchEcho {
            runs,
            vmm: xtask::openvmm_run::Vmm::OpenVmm,
            ..
        } => {
            tools::ensure_tools(&[tools::Tool::Qemu])?;
            xtask::bench_openvmm::echo_benchmark(runs)?;
            Ok(0)
        }
        cli::Command::BenchEcho { paths, runs, .. } => {
            tools::ensure_tools(&[tools::Tool::Qemu, tools::Tool::Ip])?;
            xtask::bench_echo::echo_benchmark(paths, runs)?;
            Ok(0)
        }
        cli::Command::BenchConformance => Ok(if xtask::conformance::bench()? { 0 } else { 1 }),
        cli::Command::BenchFailover { cycles } => {
            tools::ensure_tools(&[tools::Tool::Qemu, tools::Tool::Ip])?;
            xtask::bench_failover::failover_benchmark(cycles)?;
            Ok(0)
        }
        cli::Command::BenchIperf {
            runs,
            vmm: xtask::openvmm_run::Vmm::OpenVmm,
            ..
        } => {
            tools::ensure_tools(&[tools::Tool::Qemu, tools::Tool::Iperf3])?;
            xtask::bench_openvmm::iperf_benchmark(runs)?;
            Ok(0)
        }
        cli::Command::BenchIperf { runs, paths, .. } => {
            tools::ensure_tools(&[tools::Tool::Qemu, tools::Tool::Ip, tools::Tool::Iperf3])?;
            xtask::bench_iperf::iperf_benchmark(runs, paths)?;
            Ok(0)
        }
    });
    match result {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(u8::MAX)),
        Err(error) => {
            eprintln!("xtask: error: {error}");
            ExitCode::from(if matches!(error, Error::Usage(_)) {
                2
            } else {
                1
            })
        }
    }
}

/// `cargo xtask run`: boots the app with the serial console on this terminal.
fn run(options: &RunOptions) -> Result<i32> {
    tools::ensure_tools(tools::RUN_TOOLS)?;
    if options.vmm == xtask::openvmm_run::Vmm::OpenVmm {
        let elf = image::build_app(&options.app, options.profile)?;
        eprintln!("xtask: image {}", elf.display());
        let paths = match options.paths {
            // Standalone OpenVMM cannot pair MANA with netvsc (no VF association), so the
            // default `both` means the synthetic NIC alone there.
            machine::NetPaths::Both => machine::NetPaths::Virtio,
            paths => paths,
        };
        let spec = xtask::openvmm_run::spec_for_app(
            &elf,
            &options.app,
            &options.cmdline,
            &options.memory,
            paths,
        );
        return xtask::openvmm_run::run(&spec);
    }
    let choice = accel::decide(options.accel);
    eprintln!("xtask: accelerator {} ({})", choice.accel, choice.reason);
    let mut machine = Machine::new(choice.accel);
    // Check the network request before spending time on a build.
    machine.add_network(
        options.paths,
        &options.net,
        &machine::app_forwards(&options.app),
    )?;
    machine.memory = options.memory.clone();
    machine.cmdline = options.cmdline.clone();
    machine.extra_args = options.qemu_args.clone();
    let elf = image::build_app(&options.app, options.profile)?;
    eprintln!("xtask: image {}", elf.display());
    machine.kernel = Some(elf);
    let qmp_dir = image::target_dir()?.join("qemu");
    std::fs::create_dir_all(&qmp_dir)
        .map_err(|error| Error::io(format!("creating {}", qmp_dir.display()), error))?;
    let qmp_socket = qmp_dir.join(format!("{}.qmp", options.app));
    // A socket left by a QEMU that was killed would make QEMU fail to bind.
    let _ = std::fs::remove_file(&qmp_socket);
    machine.qmp_socket = Some(qmp_socket.clone());
    if machine.lab_pf {
        let lab_socket = qmp_socket.with_extension("lab");
        let _ = std::fs::remove_file(&lab_socket);
        machine.lab_socket = Some(lab_socket.clone());
        eprintln!(
            "xtask: lab PF control on {} (try `cargo xtask vf unplug|plug|disable|enable|link-down|link-up`)",
            lab_socket.display()
        );
    }
    xtask::vf::record_pf_netdev(&qmp_socket, machine.pf_netdev.as_deref())?;
    let args = machine.args();
    eprintln!("xtask: QMP socket {}", qmp_socket.display());
    eprintln!("{}", machine::shell_command_line(QEMU_BINARY, &args));
    if options.net == machine::NetBackend::User {
        match options.app.as_str() {
            "echo" => eprintln!(
                "xtask: talk to the echo app with `nc 127.0.0.1 7007` (TCP) or `nc -u 127.0.0.1 7007` (UDP)"
            ),
            "iperf" => eprintln!(
                "xtask: measure with `iperf3 -c 127.0.0.1 -p 5201` (add -R, -P 4, --bidir, or -u -b 100M -l 1400)"
            ),
            _ => {}
        }
    }
    eprintln!("xtask: Ctrl-C stops QEMU");
    let status = Command::new(QEMU_BINARY)
        .args(&args)
        .status()
        .map_err(|error| Error::io(format!("starting {QEMU_BINARY}"), error))?;
    let _ = std::fs::remove_file(&qmp_socket);
    let exit = QemuExit::from_status(status);
    eprintln!("xtask: {exit}");
    Ok(exit.process_exit_code())
}

/// Runs a cargo command in the workspace root with output streamed; true when it succeeded.
fn cargo_step(title: &str, args: &[&str]) -> Result<bool> {
    eprintln!("xtask: === {title}: cargo {} ===", args.join(" "));
    let status = image::cargo()
        .args(args)
        .current_dir(image::workspace_root())
        .stdin(Stdio::null())
        .status()
        .map_err(|error| Error::io(format!("starting cargo {}", args.join(" ")), error))?;
    Ok(status.success())
}

/// [`cargo_step`] for a test run whose failures should be explained at the very end: its
/// stdout (where libtest prints failed tests' messages) is passed through and kept, and when
/// the step fails, [`xtask::digest`] prints each failed test's panic message, head and tail.
fn cargo_test_step_with_digest(title: &str, args: &[&str]) -> Result<bool> {
    eprintln!("xtask: === {title}: cargo {} ===", args.join(" "));
    let mut child = image::cargo()
        .args(args)
        .current_dir(image::workspace_root())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|error| Error::io(format!("starting cargo {}", args.join(" ")), error))?;
    let kept = child
        .stdout
        .take()
        .map(|stdout| xtask::openvmm_run::tee_lines(stdout, std::io::stdout()))
        .unwrap_or_default();
    let status = child
        .wait()
        .map_err(|error| Error::io(format!("waiting for cargo {}", args.join(" ")), error))?;
    if !status.success() {
        for line in xtask::digest::render(&xtask::digest::failures(&kept.join("\n"))) {
            eprintln!("{line}");
        }
    }
    Ok(status.success())
}

/// Debian packages the disk-image tests need that no program check covers (GRUB's platform
/// files, OVMF's firmware files).
fn missing_image_packages() -> Vec<&'static str> {
    let mut packages: Vec<&'static str> = xtask::disk_image::ImageFormat::ALL
        .iter()
        .flat_map(|format| xtask::disk_image::missing_packages(*format))
        .collect();
    if !std::path::Path::new("/usr/share/OVMF/OVMF_CODE.fd").is_file() {
        packages.push("ovmf");
    }
    packages.sort_unstable();
    packages.dedup();
    packages
}

/// `cargo xtask test`: host unit tests, image builds, QEMU integration tests.
fn test() -> Result<i32> {
    tools::ensure_tools(tools::TEST_TOOLS)?;
    tools::ensure_packages(&missing_image_packages(), "the disk image tests")?;
    let choice = accel::decide(None);
    eprintln!(
        "xtask: the integration tests use TCG, plus KVM where available: here {} ({})",
        choice.accel, choice.reason
    );
    let mut failed = Vec::new();
    if !cargo_step(
        "host unit tests",
        &[
            "test",
            "--workspace",
            "--exclude",
            INTEGRATION_PACKAGE,
            "--no-fail-fast",
        ],
    )? {
        failed.push("host unit tests");
    }
    let smoke = ["--cases".to_string(), xtask::fuzz::SMOKE_CASES.to_string()];
    if xtask::fuzz::run_harness(&smoke)? != 0 {
        failed.push("fuzz targets");
    }
    if xtask::fuzz::run_harness_tests()? != 0 {
        failed.push("fuzz harness unit tests");
    }
    match xtask::conformance::run(None) {
        Ok(true) => {}
        Ok(false) => failed.push("conformance (OpenVMM in-process)"),
        Err(error) => {
            eprintln!("xtask: error: {error}");
            failed.push("conformance (OpenVMM in-process)");
        }
    }
    let mut images_built = true;
    for app in TEST_APPS {
        eprintln!("xtask: === building image `{app}` ===");
        if let Err(error) = image::build_app(app, Profile::Release) {
            eprintln!("xtask: error: {error}");
            images_built = false;
        }
    }
    // Built before the integration tests so its ~7 cold minutes do not run beside the QEMU
    // guests; a failure here is the environment's, and the OpenVMM tests report it again.
    eprintln!("xtask: === building OpenVMM (tests under nested OpenVMM) ===");
    if let Err(error) = xtask::openvmm::build() {
        eprintln!("xtask: error: {error}");
        failed.push("OpenVMM build (environment)");
    }
    // L1's Debian kernel and busybox, fetched once here rather than by whichever nested test
    // starts first (they also take a lock, for `cargo test` run on its own).
    if let Err(error) = xtask::openvmm_run::fetch_l1_assets() {
        eprintln!("xtask: error: {error}");
        failed.push("nested L1 assets (environment)");
    }
    if !images_built {
        failed.push("image build");
    } else if !cargo_test_step_with_digest(
        "QEMU integration tests",
        &[
            "test",
            "--package",
            INTEGRATION_PACKAGE,
            "--no-fail-fast",
            "--",
            "--test-threads=2",
        ],
    )? {
        failed.push("QEMU integration tests");
    }
    if failed.is_empty() {
        eprintln!("xtask: all tests passed");
        Ok(0)
    } else {
        eprintln!("xtask: FAILED: {}", failed.join(", "));
        Ok(1)
    }
}
