//! Nested KVM for hosts without it: a Debian Linux L1 under QEMU/TCG that runs OpenVMM.
//!
//! QEMU's TCG with `-cpu max` emulates AMD SVM, so a Linux L1 can load `kvm_amd` and give
//! OpenVMM a working `/dev/kvm`. The L1 is a Debian kernel (`apt-get download` of the package
//! `linux-image-amd64` points at) and an initramfs this module writes itself: busybox, the
//! kernel's kvm/virtio-net modules in dependency order, the `openvmm` binary with the shared
//! libraries `ldd` names, an `/etc/resolv.conf` (consomme reads it), the app image and an
//! `/init` that checks for SVM, loads KVM, configures the NIC and runs OpenVMM on the console
//! (a terminal on its stdin, which OpenVMM demands).
//!
//! Ports travel host 127.0.0.1:P → (QEMU user net) L1 10.0.2.15:P → (consomme) the guest's
//! port. `/init` reports on the console with [`L1_MARKER`] lines: an environment failure
//! (no SVM, a module refused, no /dev/kvm) or OpenVMM's exit status; [`outcome`] reads them.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::accel::Accel;
use crate::error::{Error, Result};
use crate::machine::{HostForward, shell_quote, user_netdev};
use crate::openvmm::{self, Outcome};
use crate::qemu::QemuBuilder;

/// Prefix of every line the L1's `/init` prints about itself.
pub const L1_MARKER: &str = "TANDEM-L1:";
/// What follows [`L1_MARKER`] on an environment failure.
pub const ENVIRONMENT_FAILURE: &str = "environment:";
/// What follows [`L1_MARKER`] when OpenVMM has ended (then its status).
pub const OPENVMM_EXITED: &str = "openvmm exited with status";
/// The Debian package whose dependency names the current kernel package.
pub const KERNEL_META_PACKAGE: &str = "linux-image-amd64";
/// The Debian package with a static busybox.
pub const BUSYBOX_PACKAGE: &str = "busybox-static";
/// Modules for KVM on AMD SVM (what QEMU's `-cpu max` emulates); their dependencies are found.
pub const KVM_MODULES: &[&str] = &["kvm_amd"];
/// Modules for L1's NIC (virtio-net on QEMU's user network).
pub const NET_MODULES: &[&str] = &["virtio_pci", "virtio_net"];
/// Modules for a tap device in L1 (OpenVMM's `--net tap:` backend opens `/dev/net/tun`).
pub const TAP_MODULES: &[&str] = &["tun"];
/// The tap device L1 creates for the guest's synthetic NIC when asked to.
pub const L1_TAP_DEVICE: &str = "tap0";
/// L1's address on that tap: a private subnet that exists only inside the L1 VM.
pub const L1_TAP_ADDRESS: &str = "10.77.0.1";
/// The prefix length of the tap subnet.
pub const L1_TAP_PREFIX_LENGTH: u8 = 24;
/// The guest's static address on the tap subnet (its `ip=`), which L1 pings.
pub const L1_TAP_GUEST: &str = "10.77.0.2";
/// What follows [`L1_MARKER`] on each line of L1's ping of the guest.
pub const PING_REPORT: &str = "ping:";
/// How many one-second single pings L1 tries while the guest boots before giving up.
pub const PING_WAIT_TRIES: u32 = 180;
/// L1's memory: OpenVMM, its guest and the ~50 MB initramfs, with room.
pub const L1_MEMORY: &str = "1G";
/// L1's command line.
pub const L1_CMDLINE: &str = "console=ttyS0 quiet loglevel=3 panic=-1 rdinit=/init";
/// Where the app image lies in L1.
pub const L1_APP_PATH: &str = "/tandem/app.elf";
/// Where `openvmm` lies in L1.
pub const L1_OPENVMM_PATH: &str = "/tandem/openvmm";
/// L1's address on QEMU's user network (fixed by slirp), its gateway and DNS server.
pub const L1_ADDRESS: &str = "10.0.2.15/24";
/// The slirp gateway.
pub const L1_GATEWAY: &str = "10.0.2.2";
/// The slirp DNS server, written into L1's resolv.conf.
pub const L1_DNS: &str = "10.0.2.3";

/// From `apt-cache depends linux-image-amd64`, the versioned kernel package it depends on.
pub fn kernel_package_from_depends(text: &str) -> Option<String> {
    text.lines()
        .filter_map(|line| line.trim().strip_prefix("Depends:"))
        .map(str::trim)
        .find(|name| name.starts_with("linux-image-") && name.ends_with("-amd64"))
        .map(str::to_string)
}

/// The module names (`-` spelled `_`) a `.ko` file's `.modinfo` says it depends on.
pub fn module_depends(ko: &[u8]) -> Vec<String> {
    const KEY: &[u8] = b"\0depends=";
    let Some(start) = ko.windows(KEY.len()).position(|window| window == KEY) else {
        return Vec::new();
    };
    let value = &ko[start + KEY.len()..];
    let end = value
        .iter()
        .position(|&byte| byte == 0)
        .unwrap_or(value.len());
    String::from_utf8_lossy(&value[..end])
        .split(',')
        .map(str::trim)
        .filter(|name| !name.is_empty())
        .map(|name| name.replace('-', "_"))
        .collect()
}

/// The order to load `wanted` and everything they depend on (dependencies first, each once).
pub fn module_load_order(
    wanted: &[&str],
    depends: &dyn Fn(&str) -> Option<Vec<String>>,
) -> Result<Vec<String>> {
    fn visit(
        name: &str,
        depends: &dyn Fn(&str) -> Option<Vec<String>>,
        visiting: &mut HashSet<String>,
        order: &mut Vec<String>,
    ) -> Result<()> {
        if order.iter().any(|done| done == name) {
            return Ok(());
        }
        if !visiting.insert(name.to_string()) {
            return Err(Error::Environment(format!(
                "kernel module dependency cycle through {name}"
            )));
        }
        let deps = depends(name)
            .ok_or_else(|| Error::Environment(format!("the L1 kernel has no module {name}")))?;
        for dep in deps {
            visit(&dep, depends, visiting, order)?;
        }
        order.push(name.to_string());
        Ok(())
    }
    let mut order = Vec::new();
    let mut visiting = HashSet::new();
    for name in wanted {
        visit(&name.replace('-', "_"), depends, &mut visiting, &mut order)?;
    }
    Ok(order)
}

/// From `ldd` output, every library file it resolved (and the program interpreter).
pub fn libraries_from_ldd(text: &str) -> Vec<PathBuf> {
    text.lines()
        .filter_map(|line| {
            let line = line.trim();
            let path = match line.split_once("=>") {
                Some((_, resolved)) => resolved.trim(),
                None => line,
            };
            let path = path.split_whitespace().next()?;
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

/// A `newc` cpio archive (what the Linux kernel unpacks as an initramfs), built in memory.
#[derive(Default)]
pub struct Cpio {
    bytes: Vec<u8>,
    next_inode: u32,
}

/// `mode` file-type bits.
const MODE_DIRECTORY: u32 = 0o040000;
const MODE_REGULAR: u32 = 0o100000;
const MODE_SYMLINK: u32 = 0o120000;
const MODE_CHARACTER_DEVICE: u32 = 0o020000;

impl Cpio {
    /// An empty archive.
    pub fn new() -> Self {
        Cpio::default()
    }

    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
        let name = name.trim_start_matches('/');
        self.next_inode += 1;
        let fields = [
            self.next_inode,
            mode,
            0, // uid
            0, // gid
            if mode & MODE_DIRECTORY != 0 { 2 } else { 1 },
            0, // mtime: fixed, so the archive is reproducible
            data.len() as u32,
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0, // check
        ];
        self.bytes.extend_from_slice(b"070701");
        for field in fields {
            self.bytes
                .extend_from_slice(format!("{field:08x}").as_bytes());
        }
        self.bytes.extend_from_slice(name.as_bytes());
        self.bytes.push(0);
        self.pad();
        self.bytes.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.bytes.len().is_multiple_of(4) {
            self.bytes.push(0);
        }
    }

    /// Adds a directory.
    pub fn directory(&mut self, name: &str) {
        self.entry(name, MODE_DIRECTORY | 0o755, (0, 0), &[]);
    }

    /// Adds a regular file with permission bits `permissions`.
    pub fn file(&mut self, name: &str, permissions: u32, data: &[u8]) {
        self.entry(name, MODE_REGULAR | permissions, (0, 0), data);
    }

    /// Adds a symbolic link `name` → `target`.
    pub fn symlink(&mut self, name: &str, target: &str) {
        self.entry(name, MODE_SYMLINK | 0o777, (0, 0), target.as_bytes());
    }

    /// Adds a character device node.
    pub fn character_device(&mut self, name: &str, major: u32, minor: u32) {
        self.entry(name, MODE_CHARACTER_DEVICE | 0o600, (major, minor), &[]);
    }

    /// Closes the archive and returns its bytes.
    pub fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        self.bytes
    }
}

/// What L1's `/init` does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InitConfig {
    /// KVM modules in load order.
    pub kvm_modules: Vec<String>,
    /// NIC modules in load order (L1's own NIC and, with a tap, `tun`).
    pub net_modules: Vec<String>,
    /// Create [`L1_TAP_DEVICE`] at [`L1_TAP_ADDRESS`] for the guest's NIC and ping the guest
    /// at [`L1_TAP_GUEST`] once it answers, reporting on the console.
    pub tap_ping: bool,
    /// `openvmm` arguments.
    pub openvmm_args: Vec<String>,
    /// `OPENVMM_LOG` filter.
    pub log_filter: String,
}

/// The `/init` shell script. OpenVMM's stdout carries only its REPL, whose prompt redraws
/// would land in the middle of console lines; the guest's com1 and OpenVMM's logs go to stderr.
pub fn init_script(config: &InitConfig) -> String {
    let modules = |names: &[String]| names.join(" ");
    let args: Vec<String> = config
        .openvmm_args
        .iter()
        .map(|arg| shell_quote(arg))
        .collect();
    format!(
        r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
say() {{ echo "{L1_MARKER} $*"; }}
environment() {{ say "{ENVIRONMENT_FAILURE} $*"; poweroff -f; exit 1; }}
grep -qw svm /proc/cpuinfo || environment "no svm flag in L1's /proc/cpuinfo: QEMU does not emulate AMD SVM here"
for module in {kvm}; do
    insmod /tandem/modules/$module.ko || environment "the L1 kernel refused module $module"
done
[ -c /dev/kvm ] || environment "no /dev/kvm in L1 after loading KVM"
for module in {net}; do
    insmod /tandem/modules/$module.ko || environment "the L1 kernel refused module $module"
done
ip link set lo up
ip link set eth0 up || environment "L1 has no eth0"
ip addr add {L1_ADDRESS} dev eth0
ip route add default via {L1_GATEWAY}
{tap}say "KVM ready (kvm_amd), starting OpenVMM"
OPENVMM_LOG='{log}' {L1_OPENVMM_PATH} {args} </dev/console >/dev/null
say "{OPENVMM_EXITED} $?"
poweroff -f
"#,
        kvm = modules(&config.kvm_modules),
        net = modules(&config.net_modules),
        log = config.log_filter.replace('\'', ""),
        args = args.join(" "),
        tap = if config.tap_ping {
            tap_ping_script()
        } else {
            String::new()
        },
    )
}

/// The part of `/init` that creates the tap for OpenVMM and, in the background, pings the
/// guest on it: single pings once a second until one is answered (the guest is booting), then
/// `ping -c 3`, whose two summary lines (counts, round-trip times) are reported after
/// [`L1_MARKER`] [`PING_REPORT`].
fn tap_ping_script() -> String {
    format!(
        r#"tunctl -t {L1_TAP_DEVICE} >/dev/null || environment "L1 could not create {L1_TAP_DEVICE}"
ip addr add {L1_TAP_ADDRESS}/{L1_TAP_PREFIX_LENGTH} dev {L1_TAP_DEVICE}
ip link set {L1_TAP_DEVICE} up
(
    tries=0
    until ping -c 1 -W 1 {L1_TAP_GUEST} >/dev/null 2>&1; do
        tries=$((tries + 1))
        if [ $tries -ge {PING_WAIT_TRIES} ]; then
            say "{PING_REPORT} no answer from {L1_TAP_GUEST} in {PING_WAIT_TRIES} tries"
            exit 0
        fi
        sleep 1
    done
    ping -c 3 -W 2 {L1_TAP_GUEST} 2>&1 | tail -n 2 | while read -r line; do say "{PING_REPORT} $line"; done
) &
"#
    )
}

/// How the nested run ended, from L1's console lines.
pub fn outcome(lines: &[String]) -> Outcome {
    let marker_text = |line: &String| {
        line.split_once(L1_MARKER)
            .map(|(_, rest)| rest.trim().to_string())
    };
    let mut status = None;
    for text in lines.iter().filter_map(marker_text) {
        if let Some(reason) = text.strip_prefix(ENVIRONMENT_FAILURE) {
            return Outcome::Environment(format!("nested L1: {}", reason.trim()));
        }
        if let Some(code) = text.strip_prefix(OPENVMM_EXITED) {
            status = code.trim().parse::<i32>().ok();
        }
    }
    if status.is_none() {
        return Outcome::Environment(
            "the nested L1 stopped before OpenVMM finished (see its console above)".to_string(),
        );
    }
    openvmm::outcome(lines, status)
}

/// The L1 kernel and the files its initramfs is made of, unpacked from Debian packages.
#[derive(Clone, Debug)]
pub struct L1Assets {
    /// The L1 kernel (bzImage).
    pub kernel: PathBuf,
    /// `lib/modules/<version>/kernel` of the unpacked package.
    pub modules_dir: PathBuf,
    /// A static busybox.
    pub busybox: PathBuf,
}

fn run_checked(command: &mut Command, what: &str) -> Result<Vec<u8>> {
    let output = command
        .stderr(Stdio::inherit())
        .output()
        .map_err(|error| Error::Environment(format!("{what}: {error}")))?;
    if !output.status.success() {
        return Err(Error::Environment(format!(
            "{what} failed ({})",
            output.status
        )));
    }
    Ok(output.stdout)
}

/// Downloads and unpacks `package` under `cache` once; returns the unpacked root.
fn unpacked_package(cache: &Path, package: &str) -> Result<PathBuf> {
    let root = cache.join(package);
    let done = root.join(".unpacked");
    if done.is_file() {
        return Ok(root);
    }
    let download = cache.join("download");
    let _ = std::fs::remove_dir_all(&download);
    std::fs::create_dir_all(&download)
        .map_err(|error| Error::io(format!("creating {}", download.display()), error))?;
    eprintln!("xtask: nested L1: apt-get download {package}");
    run_checked(
        Command::new("apt-get")
            .args(["download", package])
            .current_dir(&download),
        &format!("apt-get download {package}"),
    )?;
    let deb = std::fs::read_dir(&download)
        .map_err(|error| Error::io(format!("listing {}", download.display()), error))?
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .find(|path| path.extension().is_some_and(|ext| ext == "deb"))
        .ok_or_else(|| Error::Environment(format!("apt-get download {package} left no .deb")))?;
    let _ = std::fs::remove_dir_all(&root);
    run_checked(
        Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root),
        &format!("dpkg-deb -x {}", deb.display()),
    )?;
    let _ = std::fs::remove_dir_all(&download);
    std::fs::write(&done, package)
        .map_err(|error| Error::io(format!("writing {}", done.display()), error))?;
    Ok(root)
}

/// Fetches (once, cached under `cache`) the Debian kernel and busybox for L1.
///
/// The nested tests run in parallel and each prepares its own L1: an exclusive lock on
/// `cache/.lock` makes the first one download and unpack while the others wait, so none of
/// them sees (or deletes) a half-unpacked package.
pub fn fetch_assets(cache: &Path) -> Result<L1Assets> {
    std::fs::create_dir_all(cache)
        .map_err(|error| Error::io(format!("creating {}", cache.display()), error))?;
    let lock_path = cache.join(".lock");
    let lock = std::fs::File::create(&lock_path)
        .map_err(|error| Error::io(format!("creating {}", lock_path.display()), error))?;
    lock.lock()
        .map_err(|error| Error::io(format!("locking {}", lock_path.display()), error))?;
    let depends = run_checked(
        Command::new("apt-cache").args(["depends", KERNEL_META_PACKAGE]),
        &format!("apt-cache depends {KERNEL_META_PACKAGE}"),
    )?;
    let package =
        kernel_package_from_depends(&String::from_utf8_lossy(&depends)).ok_or_else(|| {
            Error::Environment(format!(
                "apt-cache names no kernel package for {KERNEL_META_PACKAGE}"
            ))
        })?;
    let kernel_root = unpacked_package(cache, &package)?;
    let version = package
        .strip_prefix("linux-image-")
        .unwrap_or(&package)
        .to_string();
    let kernel = kernel_root.join(format!("boot/vmlinuz-{version}"));
    let modules_dir = kernel_root.join(format!("lib/modules/{version}/kernel"));
    let busybox = unpacked_package(cache, BUSYBOX_PACKAGE)?.join("bin/busybox");
    for path in [&kernel, &modules_dir, &busybox] {
        if !path.exists() {
            return Err(Error::Environment(format!(
                "the unpacked Debian packages lack {}",
                path.display()
            )));
        }
    }
    Ok(L1Assets {
        kernel,
        modules_dir,
        busybox,
    })
}

/// Every `.ko` under `dir`, by module name (`-` spelled `_`).
fn module_index(dir: &Path) -> Result<BTreeMap<String, PathBuf>> {
    let mut index = BTreeMap::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let entries = std::fs::read_dir(&dir)
            .map_err(|error| Error::io(format!("listing {}", dir.display()), error))?;
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                pending.push(path);
            } else if let Some(name) = path
                .file_name()
                .and_then(|name| name.to_str())
                .and_then(|name| name.strip_suffix(".ko"))
            {
                index.insert(name.replace('-', "_"), path);
            }
        }
    }
    Ok(index)
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|error| Error::io(format!("reading {}", path.display()), error))
}

/// Adds `program` to `cpio` at `name`, with every shared library `ldd` names for it stored at
/// the path the dynamic loader will look for (directories made once, tracked in `made_dirs`).
pub fn add_program_with_libraries(
    cpio: &mut Cpio,
    made_dirs: &mut HashSet<String>,
    program: &Path,
    name: &str,
) -> Result<()> {
    let ldd = run_checked(
        Command::new("ldd").arg(program),
        &format!("ldd {}", program.display()),
    )?;
    for library in libraries_from_ldd(&String::from_utf8_lossy(&ldd)) {
        for ancestor in library.ancestors().skip(1).collect::<Vec<_>>().iter().rev() {
            let directory = ancestor
                .to_string_lossy()
                .trim_start_matches('/')
                .to_string();
            if !directory.is_empty() && made_dirs.insert(directory.clone()) {
                cpio.directory(&directory);
            }
        }
        let library_name = library
            .to_string_lossy()
            .trim_start_matches('/')
            .to_string();
        // Two programs may share a library: store it once.
        if made_dirs.insert(library_name.clone()) {
            cpio.file(&library_name, 0o755, &read(&library)?);
        }
    }
    cpio.file(name, 0o755, &read(program)?);
    Ok(())
}

/// The `.ko` files of `wanted` and their dependencies, in load order, from `modules_dir`.
pub fn modules_in_load_order(
    modules_dir: &Path,
    wanted: &[&str],
) -> Result<Vec<(String, PathBuf)>> {
    let index = module_index(modules_dir)?;
    let depends = |name: &str| -> Option<Vec<String>> {
        let path = index.get(name)?;
        std::fs::read(path).ok().map(|bytes| module_depends(&bytes))
    };
    let order = module_load_order(wanted, &depends)?;
    Ok(order
        .into_iter()
        .map(|name| {
            let path = index[&name].clone();
            (name, path)
        })
        .collect())
}

/// What L1 carries and does besides loading KVM and running OpenVMM.
#[derive(Clone, Debug, Default)]
pub struct L1Payload {
    /// Files to store in L1 (path in L1, contents): the guest's kernel, its initramfs.
    pub files: Vec<(String, Vec<u8>)>,
    /// Put the guest's synthetic NIC on a tap in L1 and ping the guest (see [`InitConfig`]).
    pub tap_ping: bool,
}

/// Writes L1's initramfs to `out`: busybox, modules, OpenVMM and its libraries, the payload's
/// files, /init.
pub fn build_initramfs(
    assets: &L1Assets,
    openvmm_binary: &Path,
    payload: &L1Payload,
    openvmm_args: &[String],
    out: &Path,
) -> Result<()> {
    let kvm_modules = modules_in_load_order(&assets.modules_dir, KVM_MODULES)?;
    let mut net_wanted = NET_MODULES.to_vec();
    if payload.tap_ping {
        net_wanted.extend(TAP_MODULES);
    }
    let net_modules = modules_in_load_order(&assets.modules_dir, &net_wanted)?;

    let mut cpio = Cpio::new();
    for dir in [
        "bin",
        "dev",
        "proc",
        "sys",
        "etc",
        "tmp",
        "run",
        "tandem",
        "tandem/modules",
    ] {
        cpio.directory(dir);
    }
    // The kernel opens /dev/console for init before devtmpfs is mounted.
    cpio.character_device("dev/console", 5, 1);
    cpio.file("bin/busybox", 0o755, &read(&assets.busybox)?);
    cpio.symlink("bin/sh", "busybox");
    cpio.file(
        "etc/resolv.conf",
        0o644,
        format!("nameserver {L1_DNS}\n").as_bytes(),
    );
    let mut made_dirs: HashSet<String> = ["tandem".to_string()].into();
    add_program_with_libraries(&mut cpio, &mut made_dirs, openvmm_binary, L1_OPENVMM_PATH)?;
    for (name, path) in kvm_modules.iter().chain(&net_modules) {
        cpio.file(&format!("tandem/modules/{name}.ko"), 0o644, &read(path)?);
    }
    for (name, contents) in &payload.files {
        let name = name.trim_start_matches('/');
        let parents: Vec<&Path> = Path::new(name).ancestors().skip(1).collect();
        for parent in parents.iter().rev() {
            let parent = parent.to_string_lossy().to_string();
            if !parent.is_empty() && made_dirs.insert(parent.clone()) {
                cpio.directory(&parent);
            }
        }
        cpio.file(name, 0o644, contents);
    }
    let log_filter =
        std::env::var("OPENVMM_LOG").unwrap_or_else(|_| openvmm::DEFAULT_LOG_FILTER.to_string());
    let names =
        |modules: &[(String, PathBuf)]| modules.iter().map(|(name, _)| name.clone()).collect();
    let script = init_script(&InitConfig {
        kvm_modules: names(&kvm_modules),
        net_modules: names(&net_modules),
        tap_ping: payload.tap_ping,
        openvmm_args: openvmm_args.to_vec(),
        log_filter,
    });
    cpio.file("init", 0o755, script.as_bytes());
    std::fs::write(out, cpio.finish())
        .map_err(|error| Error::io(format!("writing {}", out.display()), error))
}

/// L1's port forwards: each host port reaches the same port on L1, where consomme listens.
pub fn l1_forwards(forwards: &[HostForward]) -> Vec<HostForward> {
    forwards
        .iter()
        .map(|forward| HostForward {
            guest_port: forward.host_port,
            ..*forward
        })
        .collect()
}

/// The QEMU guest that is L1: TCG (SVM is emulated), `-cpu max` (the machine's default), two
/// vCPUs (OpenVMM's VP and device threads), virtio-net on user networking with the forwards.
pub fn l1_qemu(
    label: &str,
    assets: &L1Assets,
    initramfs: &Path,
    forwards: &[HostForward],
) -> QemuBuilder {
    QemuBuilder::new(label, Accel::Tcg)
        .kernel(&assets.kernel)
        .cmdline(L1_CMDLINE)
        .memory(L1_MEMORY)
        .netdev(user_netdev("l1net", &l1_forwards(forwards)))
        .device("virtio-net-pci,netdev=l1net")
        .arg("-initrd")
        .arg(initramfs.display().to_string())
        .arg("-smp")
        .arg("2")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::machine::Protocol;

    #[test]
    fn the_versioned_kernel_package_is_found() {
        let text = "linux-image-amd64\n  Depends: linux-image-6.1.0-57-amd64\n";
        assert_eq!(
            kernel_package_from_depends(text).as_deref(),
            Some("linux-image-6.1.0-57-amd64")
        );
        assert_eq!(kernel_package_from_depends("linux-image-amd64\n"), None);
    }

    #[test]
    fn modinfo_depends_are_read_and_normalised() {
        let ko = b"\x7fELF...\0license=GPL\0depends=kvm,ccp\0name=kvm_amd\0";
        assert_eq!(module_depends(ko), ["kvm", "ccp"]);
        assert!(module_depends(b"\0depends=\0name=ccp\0").is_empty());
        assert_eq!(module_depends(b"\0depends=virtio-ring\0"), ["virtio_ring"]);
        assert!(module_depends(b"no modinfo at all").is_empty());
    }

    fn debian_depends(name: &str) -> Option<Vec<String>> {
        let deps: &[&str] = match name {
            "kvm_amd" => &["kvm", "ccp"],
            "kvm" => &["irqbypass"],
            "ccp" | "irqbypass" | "virtio" | "failover" => &[],
            "virtio_ring" => &["virtio"],
            "virtio_net" => &["virtio_ring", "virtio", "net_failover"],
            "net_failover" => &["failover"],
            "loop_a" => &["loop_b"],
            "loop_b" => &["loop_a"],
            _ => return None,
        };
        Some(deps.iter().map(|dep| dep.to_string()).collect())
    }

    #[test]
    fn modules_load_dependencies_first_and_once() {
        let order = module_load_order(&["kvm-amd"], &debian_depends).unwrap();
        assert_eq!(order, ["irqbypass", "kvm", "ccp", "kvm_amd"]);
        let order = module_load_order(&["virtio_net", "virtio_ring"], &debian_depends).unwrap();
        assert_eq!(
            order,
            [
                "virtio",
                "virtio_ring",
                "failover",
                "net_failover",
                "virtio_net"
            ]
        );
    }

    #[test]
    fn missing_modules_and_cycles_are_environment_failures() {
        assert!(matches!(
            module_load_order(&["kvm_intel"], &debian_depends),
            Err(Error::Environment(_))
        ));
        assert!(matches!(
            module_load_order(&["loop_a"], &debian_depends),
            Err(Error::Environment(_))
        ));
    }

    #[test]
    fn ldd_output_gives_library_paths_and_the_interpreter() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\
            \tlibssl.so.3 => /lib/x86_64-linux-gnu/libssl.so.3 (0x00007f)\n\
            \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n\
            \t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n";
        assert_eq!(
            libraries_from_ldd(text),
            [
                PathBuf::from("/lib/x86_64-linux-gnu/libssl.so.3"),
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2"),
            ]
        );
    }

    /// Reads a newc archive back: (name, mode, rdev major, data) per entry.
    fn parse_cpio(bytes: &[u8]) -> Vec<(String, u32, u32, Vec<u8>)> {
        let mut entries = Vec::new();
        let mut at = 0;
        let field = |at: usize, index: usize| {
            let start = at + 6 + index * 8;
            u32::from_str_radix(std::str::from_utf8(&bytes[start..start + 8]).unwrap(), 16).unwrap()
        };
        loop {
            assert_eq!(&bytes[at..at + 6], b"070701");
            let mode = field(at, 1);
            let size = field(at, 6) as usize;
            let major = field(at, 9);
            let name_size = field(at, 11) as usize;
            let name_start = at + 110;
            let name =
                String::from_utf8(bytes[name_start..name_start + name_size - 1].to_vec()).unwrap();
            let data_start = (name_start + name_size).next_multiple_of(4);
            let data = bytes[data_start..data_start + size].to_vec();
            at = (data_start + size).next_multiple_of(4);
            if name == "TRAILER!!!" {
                assert_eq!(at, bytes.len());
                return entries;
            }
            entries.push((name, mode, major, data));
        }
    }

    #[test]
    fn cpio_archive_round_trips_with_newc_alignment() {
        let mut cpio = Cpio::new();
        cpio.directory("bin");
        cpio.file("/bin/busybox", 0o755, b"ELF!!");
        cpio.symlink("bin/sh", "busybox");
        cpio.character_device("dev/console", 5, 1);
        cpio.file("init", 0o755, b"");
        let entries = parse_cpio(&cpio.finish());
        let names: Vec<&str> = entries.iter().map(|entry| entry.0.as_str()).collect();
        assert_eq!(
            names,
            ["bin", "bin/busybox", "bin/sh", "dev/console", "init"]
        );
        assert_eq!(entries[0].1, 0o040755);
        assert_eq!(entries[1].1, 0o100755);
        assert_eq!(entries[1].3, b"ELF!!");
        assert_eq!(entries[2].1 & 0o170000, 0o120000);
        assert_eq!(entries[2].3, b"busybox");
        assert_eq!((entries[3].1 & 0o170000, entries[3].2), (0o020000, 5));
    }

    #[test]
    fn init_checks_svm_loads_kvm_then_runs_openvmm_on_the_console() {
        let script = init_script(&InitConfig {
            kvm_modules: vec![
                "irqbypass".into(),
                "kvm".into(),
                "ccp".into(),
                "kvm_amd".into(),
            ],
            net_modules: vec!["virtio_net".into()],
            tap_ping: false,
            openvmm_args: vec!["--hv".into(), "-c".into(), "log=debug echo.port=7".into()],
            log_filter: "info".into(),
        });
        let svm = script.find("grep -qw svm").unwrap();
        let kvm = script.find("irqbypass kvm ccp kvm_amd").unwrap();
        // Only the REPL writes to stdout: its prompt would land in the middle of console lines.
        let run = script
            .find("/tandem/openvmm --hv -c 'log=debug echo.port=7' </dev/console >/dev/null\n");
        assert!(svm < kvm && kvm < run.unwrap(), "{script}");
        assert!(script.contains("TANDEM-L1: $*"));
        assert!(script.contains("openvmm exited with status $?"));
    }

    #[test]
    fn with_a_tap_init_creates_it_before_openvmm_and_pings_the_guest_in_the_background() {
        let config = |tap_ping| InitConfig {
            kvm_modules: vec!["kvm_amd".into()],
            net_modules: vec!["virtio_net".into(), "tun".into()],
            tap_ping,
            openvmm_args: vec!["--net".into(), "tap:tap0".into()],
            log_filter: "info".into(),
        };
        let script = init_script(&config(true));
        let tap = script.find("tunctl -t tap0").unwrap();
        let address = script.find("ip addr add 10.77.0.1/24 dev tap0").unwrap();
        let ping = script.find("ping -c 3 -W 2 10.77.0.2").unwrap();
        let openvmm = script.find("/tandem/openvmm --net tap:tap0").unwrap();
        assert!(
            tap < address && address < ping && ping < openvmm,
            "{script}"
        );
        assert!(
            script.contains(") &\n"),
            "the ping waits in the background: {script}"
        );
        assert!(script.contains("say \"ping: $line\""));
        assert!(!init_script(&config(false)).contains("tunctl"));
    }

    fn lines(text: &str) -> Vec<String> {
        text.lines().map(str::to_string).collect()
    }

    #[test]
    fn outcomes_tell_environment_from_guest() {
        let no_svm = lines("TANDEM-L1: environment: no svm flag in L1's /proc/cpuinfo");
        assert!(matches!(outcome(&no_svm), Outcome::Environment(reason) if reason.contains("svm")));
        let panicked_l1 = lines("Kernel panic - not syncing");
        assert!(matches!(outcome(&panicked_l1), Outcome::Environment(_)));
        let passed = lines(
            "TANDEM-L1: KVM ready\nhello: done\ntandem: exit code 0\r\nTANDEM-L1: openvmm exited with status 0",
        );
        assert_eq!(outcome(&passed), Outcome::Guest(0));
        let triple_fault = lines("TANDEM-L1: openvmm exited with status 3");
        assert_eq!(
            outcome(&triple_fault),
            Outcome::NoGuestCode { status: Some(3) }
        );
    }

    #[test]
    fn l1_forwards_land_on_the_same_port_in_l1() {
        let forwards = [HostForward {
            protocol: Protocol::Udp,
            host_port: 7007,
            guest_port: 7,
        }];
        assert_eq!(l1_forwards(&forwards)[0].guest_port, 7007);
        assert_eq!(
            user_netdev("l1net", &l1_forwards(&forwards)),
            "user,id=l1net,hostfwd=udp:127.0.0.1:7007-:7007"
        );
    }
}
