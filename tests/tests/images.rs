//! Disk images from `xtask::disk_image`: GRUB boots the app via Multiboot2 under SeaBIOS and
//! OVMF, from raw, converted VHDX/VHD and ISO images, with the command line written in the image.
//!
//! Every boot runs under TCG (the firmware paths are what is tested, not speed). The raw images
//! carry the echo app and a host client gets its bytes echoed through them; the other images
//! carry `hello`, which prints its command line and exits.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use tandem_tests::image;
use xtask::disk_image::{
    ImageFormat, build_image, config_cmdline, missing_packages, read_grub_config, set_cmdline,
};
use xtask::{Accel, Qemu, QemuBuilder};

/// OVMF from Debian's `ovmf` package: the code (read-only) and a template of its variable store.
const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE.fd";
const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS.fd";
/// From QEMU start to the app's `cmdline:` line: SeaBIOS + GRUB take ~4 s, OVMF + GRUB ~8 s
/// alone on this machine; this leaves room for a loaded CI host.
const BOOT_TIMEOUT: Duration = Duration::from_secs(90);
/// From the `cmdline:` line to QEMU's exit.
const EXIT_TIMEOUT: Duration = Duration::from_secs(20);
/// The app most images carry: it prints its command line and exits 0.
const APP: &str = "hello";
/// The app the raw images carry, served to a host client.
const ECHO: &str = "echo";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Firmware {
    /// QEMU's default: SeaBIOS.
    Bios,
    /// OVMF (UEFI, no Secure Boot).
    Uefi,
}

/// A fresh directory for one test's images.
fn scratch_dir(test: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("images-{test}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap_or_else(|error| panic!("creating {dir:?}: {error}"));
    dir
}

/// Builds an image of the `hello` app, panicking with the build log on failure.
fn build(format: ImageFormat, cmdline: &str, dir: &Path) -> PathBuf {
    build_app(APP, format, cmdline, dir)
}

/// Builds an image of `app`, panicking with the build log on failure.
fn build_app(app: &str, format: ImageFormat, cmdline: &str, dir: &Path) -> PathBuf {
    let missing = missing_packages(format);
    assert!(
        missing.is_empty(),
        "building {format} images needs: apt-get install {}",
        missing.join(" ")
    );
    let mut steps = Vec::new();
    let result = build_image(&image(app), app, format, cmdline, dir, &mut |line| {
        steps.push(line.to_string())
    });
    let path = result.unwrap_or_else(|error| {
        panic!(
            "building the {format} image failed: {error}\n{}",
            steps.join("\n")
        )
    });
    assert!(
        steps.iter().any(|step| step.starts_with("$ ")),
        "the build reported no commands: {steps:?}"
    );
    path
}

/// Starts QEMU on `firmware` with the given drive arguments (no `-kernel`: firmware boots).
fn boot(label: &str, firmware: Firmware, dir: &Path, drive_args: &[String]) -> Qemu {
    let mut builder = QemuBuilder::new(label, Accel::Tcg).memory("256M");
    if firmware == Firmware::Uefi {
        for file in [OVMF_CODE, OVMF_VARS] {
            assert!(
                Path::new(file).is_file(),
                "{file} is missing: apt-get install ovmf"
            );
        }
        let vars = dir.join(format!("{}-vars.fd", label.replace(' ', "-")));
        std::fs::copy(OVMF_VARS, &vars)
            .unwrap_or_else(|error| panic!("copying OVMF vars: {error}"));
        builder = builder
            .arg("-drive")
            .arg(format!(
                "if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}"
            ))
            .arg("-drive")
            .arg(format!(
                "if=pflash,format=raw,unit=1,file={}",
                vars.display()
            ));
    }
    for arg in drive_args {
        builder = builder.arg(arg.clone());
    }
    builder.spawn().unwrap_or_else(|error| panic!("{error}"))
}

/// A disk on virtio-blk, first in the boot order; `snapshot=on` keeps the image unchanged.
fn disk(path: &Path, format: &str) -> Vec<String> {
    vec![
        "-drive".to_string(),
        format!(
            "file={},format={format},if=none,id=disk0,snapshot=on",
            path.display()
        ),
        "-device".to_string(),
        "virtio-blk-pci,drive=disk0,bootindex=0".to_string(),
    ]
}

/// A CD-ROM on the q35 AHCI controller, first in the boot order.
fn cdrom(path: &Path) -> Vec<String> {
    vec![
        "-drive".to_string(),
        format!(
            "file={},format=raw,if=none,id=cd0,media=cdrom,readonly=on",
            path.display()
        ),
        "-device".to_string(),
        "ide-cd,drive=cd0,bus=ide.0,bootindex=0".to_string(),
    ]
}

/// Waits for the Multiboot2 boot banner, the app's `cmdline:` line (which must be exactly
/// `cmdline`) and a clean exit.
fn expect_multiboot2_boot(qemu: &mut Qemu, cmdline: &str) {
    let banner = qemu
        .wait_for_line("Tandem guest kernel", BOOT_TIMEOUT)
        .unwrap_or_else(|error| panic!("{error}"));
    assert!(
        banner.contains("booted via Multiboot2"),
        "not booted by GRUB: {banner}"
    );
    let line = qemu
        .wait_for_line("cmdline:", BOOT_TIMEOUT)
        .unwrap_or_else(|error| panic!("{error}"));
    assert_eq!(line.trim_end(), format!("cmdline: {cmdline}"));
    let code = qemu
        .wait_exit(EXIT_TIMEOUT)
        .unwrap_or_else(|error| panic!("{error}"));
    assert_eq!(
        code,
        0,
        "the app exited with {code}:\n{}",
        qemu.serial_text()
    );
}

fn qemu_img(args: &[&str], path: &Path) -> String {
    let output = Command::new("qemu-img")
        .args(args)
        .arg(path)
        .output()
        .unwrap_or_else(|error| panic!("running qemu-img: {error}"));
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "qemu-img {args:?} {path:?} failed: {text}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    text
}

/// `qemu-img info` of `path` read as `driver`: (format, virtual size).
fn image_info(path: &Path, driver: &str) -> (String, u64) {
    let text = qemu_img(&["info", "--output=json", "-f", driver], path);
    let info: serde_json::Value = serde_json::from_str(&text)
        .unwrap_or_else(|error| panic!("qemu-img info output {text:?}: {error}"));
    (
        info["format"].as_str().unwrap_or_default().to_string(),
        info["virtual-size"].as_u64().unwrap_or_default(),
    )
}

/// `path` converted to a raw image beside it, named after its own format (`hello.vhdx.raw`):
/// two sources never share an output, so one conversion cannot meet the lock a QEMU that is
/// still shutting down holds on the other's (CI saw "Failed to get "write" lock" when both
/// were `hello.back.img`).
fn convert_to_raw(path: &Path, driver: &str) -> PathBuf {
    let source_extension = path
        .extension()
        .and_then(|extension| extension.to_str())
        .unwrap_or(driver);
    let raw = path.with_extension(format!("{source_extension}.raw"));
    let status = Command::new("qemu-img")
        .args(["convert", "-f", driver, "-O", "raw"])
        .arg(path)
        .arg(&raw)
        .status()
        .unwrap_or_else(|error| panic!("running qemu-img convert: {error}"));
    assert!(status.success(), "qemu-img convert {path:?} to raw failed");
    raw
}

/// User-mode networking with the echo port forwarded to a free loopback port: (args, port).
fn echo_network() -> (Vec<String>, u16) {
    let port = tandem_tests::topology::free_loopback_port()
        .unwrap_or_else(|error| panic!("no free loopback port: {error}"));
    let args = vec![
        "-netdev".to_string(),
        format!("user,id=net0,hostfwd=tcp:127.0.0.1:{port}-:7"),
        "-device".to_string(),
        "virtio-net-pci,disable-legacy=on,netdev=net0".to_string(),
    ];
    (args, port)
}

/// Waits for the Multiboot2 banner and the echo app, then sends 64 KiB through it and expects
/// exactly the same bytes back.
fn expect_echo_served(qemu: &mut Qemu, port: u16) {
    let banner = qemu
        .wait_for_line("Tandem guest kernel", BOOT_TIMEOUT)
        .unwrap_or_else(|error| panic!("{error}"));
    assert!(
        banner.contains("booted via Multiboot2"),
        "not booted by GRUB: {banner}"
    );
    qemu.wait_for_line("echo: serving", BOOT_TIMEOUT)
        .unwrap_or_else(|error| panic!("{error}"));
    let data: Vec<u8> = (0..65536u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))
        .unwrap_or_else(|error| panic!("connecting to the echo app: {error}"));
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("read timeout");
    let writer = {
        let mut stream = stream.try_clone().expect("clone");
        let data = data.clone();
        std::thread::spawn(move || {
            use std::io::Write;
            stream.write_all(&data).expect("sending to the echo app");
        })
    };
    let mut echoed = vec![0u8; data.len()];
    std::io::Read::read_exact(&mut stream, &mut echoed)
        .unwrap_or_else(|error| panic!("reading the echo: {error}\n{}", qemu.serial_text()));
    writer.join().expect("writer");
    assert!(echoed == data, "the echoed bytes differ from what was sent");
}

#[test]
fn raw_image_serves_echo_through_grub_under_seabios() {
    let dir = scratch_dir("raw-bios");
    let cmdline = "log=info ip=10.0.2.15/24 gw=10.0.2.2 tandem.test=raw-seabios";
    let raw = build_app(ECHO, ImageFormat::Raw, cmdline, &dir);
    assert_eq!(raw, dir.join("echo.img"));
    let (mut args, port) = echo_network();
    args.extend(disk(&raw, "raw"));
    let mut qemu = boot("raw seabios", Firmware::Bios, &dir, &args);
    expect_echo_served(&mut qemu, port);
}

#[test]
fn raw_image_serves_echo_through_grub_under_ovmf() {
    let dir = scratch_dir("raw-uefi");
    let cmdline = "log=info ip=10.0.2.15/24 gw=10.0.2.2 tandem.test=raw-ovmf";
    let raw = build_app(ECHO, ImageFormat::Raw, cmdline, &dir);
    let (mut args, port) = echo_network();
    args.extend(disk(&raw, "raw"));
    let mut qemu = boot("raw ovmf", Firmware::Uefi, &dir, &args);
    expect_echo_served(&mut qemu, port);
}

#[test]
fn command_line_rewritten_in_the_image_reaches_the_app() {
    let dir = scratch_dir("cmdline");
    let raw = build(ImageFormat::Raw, "log=info tandem.test=original", &dir);
    // `$` and `;` would be GRUB syntax if written bare: they must arrive unchanged.
    let edited = "log=debug tandem.test=edited note=$HOME;x";
    let mut steps = Vec::new();
    set_cmdline(&raw, edited, &mut |line| steps.push(line.to_string()))
        .unwrap_or_else(|error| panic!("set_cmdline: {error}\n{}", steps.join("\n")));
    let config = read_grub_config(&raw).unwrap_or_else(|error| panic!("{error}"));
    assert_eq!(config_cmdline(&config).as_deref(), Some(edited), "{config}");
    assert!(config.contains("set timeout=0"), "{config}");
    let mut qemu = boot("cmdline seabios", Firmware::Bios, &dir, &disk(&raw, "raw"));
    expect_multiboot2_boot(&mut qemu, edited);
}

#[test]
fn vhdx_and_vhd_are_valid_and_boot_after_conversion_back_to_raw() {
    let dir = scratch_dir("hyperv");
    let cmdline = "log=info tandem.test=hyperv";
    let vhdx = build(ImageFormat::Vhdx, cmdline, &dir);
    let vhd = build(ImageFormat::Vhd, cmdline, &dir);
    let qcow2 = build(ImageFormat::Qcow2, cmdline, &dir);
    let raw_size = 64 << 20;
    assert_eq!(image_info(&vhdx, "vhdx"), ("vhdx".to_string(), raw_size));
    assert_eq!(image_info(&vhd, "vpc"), ("vpc".to_string(), raw_size));
    assert_eq!(image_info(&qcow2, "qcow2"), ("qcow2".to_string(), raw_size));
    qemu_img(&["check", "-f", "vhdx"], &vhdx);
    qemu_img(&["check", "-f", "qcow2"], &qcow2);
    // A fixed VHD is the raw disk plus a 512-byte footer: "conectix" cookie, disk type 2 (fixed).
    let bytes = std::fs::read(&vhd).unwrap_or_else(|error| panic!("reading {vhd:?}: {error}"));
    assert_eq!(bytes.len() as u64, raw_size + 512);
    let footer = &bytes[bytes.len() - 512..];
    assert_eq!(&footer[..8], b"conectix");
    assert_eq!(
        footer[60..64],
        2u32.to_be_bytes(),
        "VHD disk type is not fixed"
    );

    // Hyper-V Gen2 boots the VHDX through UEFI, Gen1 the VHD through BIOS.
    let from_vhdx = convert_to_raw(&vhdx, "vhdx");
    let mut qemu = boot("vhdx ovmf", Firmware::Uefi, &dir, &disk(&from_vhdx, "raw"));
    expect_multiboot2_boot(&mut qemu, cmdline);
    drop(qemu);
    let from_vhd = convert_to_raw(&vhd, "vpc");
    let mut qemu = boot("vhd seabios", Firmware::Bios, &dir, &disk(&from_vhd, "raw"));
    expect_multiboot2_boot(&mut qemu, cmdline);
}

#[test]
fn iso_boots_from_cdrom_under_seabios_and_ovmf() {
    let dir = scratch_dir("iso");
    let cmdline = "log=info tandem.test=iso";
    let iso = build(ImageFormat::Iso, cmdline, &dir);
    assert_eq!(iso, dir.join("hello.iso"));
    let mut qemu = boot("iso seabios", Firmware::Bios, &dir, &cdrom(&iso));
    expect_multiboot2_boot(&mut qemu, cmdline);
    drop(qemu);
    let mut qemu = boot("iso ovmf", Firmware::Uefi, &dir, &cdrom(&iso));
    expect_multiboot2_boot(&mut qemu, cmdline);
}
