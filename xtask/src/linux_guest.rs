//! The Linux 6.1 guest the OpenVMM benches measure Tandem against, under the same nested OpenVMM.
//!
//! It is L1's own Debian kernel (OpenVMM boots its bzImage by the Linux boot protocol) with an
//! initramfs this module writes: busybox, the kernel's `hv_vmbus` and `hv_netvsc` modules,
//! Debian's `iperf3` and `socat` (the echo server, TCP and UDP) with the libraries `ldd` names,
//! and an `/init` that loads the modules, takes a DHCP lease from consomme with `udhcpc` and
//! serves iperf3 on 5201 and echo on 7 — the ports the `iperf` and `echo` apps serve on, so the
//! same forwards reach either guest. Both files travel inside L1's initramfs.

use std::collections::HashSet;
use std::path::PathBuf;

use crate::error::{Error, Result};
use crate::nested::{self, Cpio, L1Assets};

/// Modules for VMBus and the synthetic NIC (their dependencies are found).
pub const HV_MODULES: &[&str] = &["hv_netvsc"];
/// Where the Linux kernel lies in L1.
pub const L1_KERNEL_PATH: &str = "/tandem/linux/vmlinuz";
/// Where the Linux guest's initramfs lies in L1.
pub const L1_INITRD_PATH: &str = "/tandem/linux/initrd.cpio";
/// Prefix of every line the Linux guest's `/init` prints about itself.
pub const LINUX_MARKER: &str = "TANDEM-LINUX:";
/// What follows [`LINUX_MARKER`] once iperf3 and the echo server run.
pub const SERVING: &str = "serving";
/// What follows [`LINUX_MARKER`] when a step failed (then what).
pub const FAILED: &str = "failed:";
/// The guest's command line (OpenVMM prepends `panic=-1 debug`; `loglevel` quiets `debug`).
pub const CMDLINE: &str = "console=ttyS0 loglevel=4 rdinit=/init";
/// The guest's memory: the kernel, its unpacked initramfs and iperf3's buffers.
pub const MEMORY: &str = "256M";
/// The iperf3 server port.
pub const IPERF_PORT: u16 = 5201;
/// The echo port.
pub const ECHO_PORT: u16 = 7;
/// Debian packages whose programs the guest runs (taken from this host, which must be Debian
/// like the kernel, so the libraries match).
pub const PROGRAMS: &[(&str, &str)] = &[("iperf3", "iperf3"), ("socat", "socat")];

/// The DHCP event script `udhcpc` runs: applies the lease (address, prefix length, router).
pub const UDHCPC_SCRIPT: &str = r#"#!/bin/sh
case "$1" in
    deconfig)
        ip addr flush dev "$interface"
        ip link set "$interface" up
        ;;
    bound|renew)
        ip addr flush dev "$interface"
        ip addr add "$ip/${mask:-24}" dev "$interface"
        for gateway in $router; do
            ip route add default via "$gateway" dev "$interface"
            break
        done
        ;;
esac
"#;

/// The guest's `/init`: modules in `modules` order, DHCP on eth0, then iperf3 and the echo
/// server in the background, reporting on the console after [`LINUX_MARKER`].
pub fn init_script(modules: &[String]) -> String {
    format!(
        r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
say() {{ echo "{LINUX_MARKER} $*"; }}
for module in {modules}; do
    insmod /modules/$module.ko || say "{FAILED} module $module refused"
done
ip link set lo up
tries=0
until [ -e /sys/class/net/eth0 ]; do
    tries=$((tries + 1))
    [ $tries -ge 300 ] && say "{FAILED} hv_netvsc brought up no eth0" && break
    sleep 0.1
done
udhcpc -i eth0 -s /etc/udhcpc.script -f -q -n -t 20 -T 1 >/dev/null 2>&1 || say "{FAILED} no DHCP lease"
say "eth0 $(ip -4 addr show dev eth0 | grep inet)"
iperf3 -s -p {IPERF_PORT} -D
socat -b 65536 TCP-LISTEN:{ECHO_PORT},fork,reuseaddr PIPE &
socat -b 65536 -T 10 UDP-LISTEN:{ECHO_PORT},fork,reuseaddr PIPE &
# consomme accepts a forwarded connection before the guest does: announce only once all listen.
tries=0
until netstat -ltn | grep -q ":{IPERF_PORT} " && netstat -ltn | grep -q ":{ECHO_PORT} " && netstat -lun | grep -q ":{ECHO_PORT} "; do
    tries=$((tries + 1))
    [ $tries -ge 300 ] && say "{FAILED} iperf3 or socat is not listening" && break
    sleep 0.1
done
say "{SERVING} iperf3 on {IPERF_PORT}, echo on {ECHO_PORT} (TCP and UDP)"
while true; do sleep 3600; done
"#,
        modules = modules.join(" "),
    )
}

/// Where this host's copy of a guest program is, installing its Debian package if missing.
fn host_program(program: &str, package: &str) -> Result<PathBuf> {
    if let Some(path) = crate::tools::find_program(program) {
        return Ok(path);
    }
    crate::tools::ensure_packages(&[package], "the Linux guest of the OpenVMM benches")?;
    crate::tools::find_program(program).ok_or_else(|| {
        Error::Environment(format!(
            "{program} is still missing after installing {package}"
        ))
    })
}

/// Writes the Linux guest's initramfs from L1's kernel package and this host's programs.
pub fn build_initramfs(assets: &L1Assets) -> Result<Vec<u8>> {
    let modules = nested::modules_in_load_order(&assets.modules_dir, HV_MODULES)?;
    let mut cpio = Cpio::new();
    for dir in [
        "bin", "usr", "usr/bin", "dev", "proc", "sys", "etc", "tmp", "modules",
    ] {
        cpio.directory(dir);
    }
    cpio.character_device("dev/console", 5, 1);
    let busybox = std::fs::read(&assets.busybox)
        .map_err(|error| Error::io(format!("reading {}", assets.busybox.display()), error))?;
    cpio.file("bin/busybox", 0o755, &busybox);
    cpio.symlink("bin/sh", "busybox");
    cpio.file("etc/udhcpc.script", 0o755, UDHCPC_SCRIPT.as_bytes());
    let mut made_dirs: HashSet<String> = ["usr", "usr/bin"].map(str::to_string).into();
    for (program, package) in PROGRAMS {
        let path = host_program(program, package)?;
        nested::add_program_with_libraries(
            &mut cpio,
            &mut made_dirs,
            &path,
            &format!("usr/bin/{program}"),
        )?;
    }
    for (name, path) in &modules {
        let bytes = std::fs::read(path)
            .map_err(|error| Error::io(format!("reading {}", path.display()), error))?;
        cpio.file(&format!("modules/{name}.ko"), 0o644, &bytes);
    }
    let names: Vec<String> = modules.into_iter().map(|(name, _)| name).collect();
    cpio.file("init", 0o755, init_script(&names).as_bytes());
    Ok(cpio.finish())
}

/// The Linux guest's failure report among console `lines`, if it made one.
pub fn failure(lines: &[String]) -> Option<String> {
    lines.iter().find_map(|line| {
        let (_, rest) = line.split_once(LINUX_MARKER)?;
        rest.trim()
            .strip_prefix(FAILED)
            .map(|what| what.trim().to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_loads_modules_then_leases_then_serves_on_the_apps_ports() {
        let script = init_script(&["hv_vmbus".to_string(), "hv_netvsc".to_string()]);
        let modules = script.find("for module in hv_vmbus hv_netvsc").unwrap();
        let lease = script.find("udhcpc -i eth0 -s /etc/udhcpc.script").unwrap();
        let iperf = script.find("iperf3 -s -p 5201 -D").unwrap();
        let serving = script.find("TANDEM-LINUX: $*").unwrap();
        assert!(
            serving < modules && modules < lease && lease < iperf,
            "{script}"
        );
        assert!(script.contains("socat -b 65536 TCP-LISTEN:7,fork,reuseaddr PIPE &"));
        let listening = script.find("netstat -ltn | grep -q \":5201 \"").unwrap();
        let announced = script.find("say \"serving").unwrap();
        assert!(iperf < listening && listening < announced, "{script}");
        assert!(script.contains("UDP-LISTEN:7,fork,reuseaddr PIPE &"));
        // pid 1 must never end.
        assert!(
            script
                .trim_end()
                .ends_with("while true; do sleep 3600; done")
        );
    }

    #[test]
    fn the_lease_script_applies_address_prefix_and_first_router() {
        assert!(UDHCPC_SCRIPT.contains(r#"ip addr add "$ip/${mask:-24}" dev "$interface""#));
        assert!(UDHCPC_SCRIPT.contains("ip route add default via \"$gateway\""));
    }

    #[test]
    fn failures_are_read_from_the_marker_lines() {
        let lines: Vec<String> = [
            "[    1.0] hv_vmbus: registering driver hv_netvsc",
            "TANDEM-LINUX: eth0 inet 10.0.0.2/24",
            "TANDEM-LINUX: failed: no DHCP lease",
        ]
        .map(str::to_string)
        .to_vec();
        assert_eq!(failure(&lines).as_deref(), Some("no DHCP lease"));
        assert_eq!(failure(&lines[..2]), None);
    }
}
