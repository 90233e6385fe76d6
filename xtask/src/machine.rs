//! The QEMU command line: the fixed q35 machine every image boots on, plus its network topology.
//!
//! Fixed parts (see shared/reference/qemu-igb-sriov-hotplug.md §4.1): native PCIe hot-plug
//! (ACPI hot-plug off), no 64-bit PCI hole so hot-plugged and VF BARs stay below 4 GiB, two
//! hot-plug root ports `rp1` (chassis 1, 00:04.0) and `rp2` (chassis 2, 00:05.0), isa-debug-exit
//! for the exit code, serial on QEMU's stdio.

use std::fmt;
use std::path::PathBuf;

use crate::accel::Accel;
use crate::error::{Error, Result};

/// Default guest memory.
pub const DEFAULT_MEMORY: &str = "64M";
/// Root port the igb PF (and so the VFs) goes on.
pub const PF_ROOT_PORT: &str = "rp1";
/// Root port left empty for hot-plug tests.
pub const SPARE_ROOT_PORT: &str = "rp2";

/// Which NIC paths the guest gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NetPaths {
    /// A virtio-net device only.
    Virtio,
    /// The igb PF on `rp1`, whose VF the guest drives.
    Vf,
    /// Both, as a failover pair.
    Both,
}

impl std::str::FromStr for NetPaths {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self> {
        match text {
            "virtio" => Ok(NetPaths::Virtio),
            "vf" => Ok(NetPaths::Vf),
            "both" => Ok(NetPaths::Both),
            other => Err(Error::Usage(format!(
                "unknown --paths `{other}` (expected virtio, vf or both)"
            ))),
        }
    }
}

/// Host side of the guest's network.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NetBackend {
    /// QEMU user-mode networking (slirp) with host port forwards.
    User,
    /// An existing tap interface.
    Tap(String),
}

impl std::str::FromStr for NetBackend {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self> {
        match text.split_once('=') {
            None if text == "user" => Ok(NetBackend::User),
            Some(("tap", ifname)) if !ifname.is_empty() => Ok(NetBackend::Tap(ifname.to_string())),
            _ => Err(Error::Usage(format!(
                "unknown --net `{text}` (expected user or tap=<ifname>)"
            ))),
        }
    }
}

/// Transport protocol of a host port forward.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

/// A slirp `hostfwd`: 127.0.0.1:`host_port` on the host reaches `guest_port` in the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostForward {
    /// Transport protocol.
    pub protocol: Protocol,
    /// Port on the host's loopback.
    pub host_port: u16,
    /// Port in the guest.
    pub guest_port: u16,
}

impl fmt::Display for HostForward {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let protocol = match self.protocol {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        };
        write!(
            f,
            "hostfwd={protocol}:127.0.0.1:{}-:{}",
            self.host_port, self.guest_port
        )
    }
}

/// Host port forwards an app needs under user networking: echo (port 7) on 7007, iperf3 on 5201.
pub fn app_forwards(app: &str) -> Vec<HostForward> {
    let both = |host_port, guest_port| {
        [Protocol::Tcp, Protocol::Udp].map(|protocol| HostForward {
            protocol,
            host_port,
            guest_port,
        })
    };
    match app {
        "echo" => both(7007, 7).to_vec(),
        "iperf" => both(5201, 5201).to_vec(),
        _ => Vec::new(),
    }
}

/// `-netdev` value for user networking.
pub fn user_netdev(id: &str, forwards: &[HostForward]) -> String {
    let mut spec = format!("user,id={id}");
    for forward in forwards {
        spec.push(',');
        spec.push_str(&forward.to_string());
    }
    spec
}

/// `-netdev` value for a tap interface that already exists (no helper scripts).
pub fn tap_netdev(id: &str, ifname: &str) -> String {
    format!("tap,id={id},ifname={ifname},script=no,downscript=no")
}

/// `-device` value for a modern-only virtio-net NIC.
pub fn virtio_net_device(netdev: &str) -> String {
    format!("virtio-net-pci,id=virtio0,disable-legacy=on,netdev={netdev}")
}

/// `-device` value for the igb (82576) PF on its native hot-plug root port [`PF_ROOT_PORT`].
pub fn igb_pf_device(netdev: &str) -> String {
    format!("igb,id=pf0,bus={PF_ROOT_PORT},netdev={netdev}")
}

/// A QEMU invocation for one guest.
#[derive(Clone, Debug)]
pub struct Machine {
    /// Accelerator.
    pub accel: Accel,
    /// Guest RAM, QEMU `-m` syntax.
    pub memory: String,
    /// The kernel ELF (PVH); `None` boots the firmware alone (harness self-tests).
    pub kernel: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
    /// Where the QMP server socket goes, if any.
    pub qmp_socket: Option<PathBuf>,
    /// `-netdev` values.
    pub netdevs: Vec<String>,
    /// `-device` values beyond the fixed ones.
    pub devices: Vec<String>,
    /// Arguments appended verbatim.
    pub extra_args: Vec<String>,
}

impl Machine {
    /// A machine with no NICs, default memory and an empty command line.
    pub fn new(accel: Accel) -> Self {
        Machine {
            accel,
            memory: DEFAULT_MEMORY.to_string(),
            kernel: None,
            cmdline: String::new(),
            qmp_socket: None,
            netdevs: Vec::new(),
            devices: Vec::new(),
            extra_args: Vec::new(),
        }
    }

    /// Adds the NICs for `paths` on `backend`; `forwards` apply to user networking.
    pub fn add_network(
        &mut self,
        paths: NetPaths,
        backend: &NetBackend,
        forwards: &[HostForward],
    ) -> Result<()> {
        let netdev = match backend {
            NetBackend::User => user_netdev("net0", forwards),
            NetBackend::Tap(ifname) => tap_netdev("net0", ifname),
        };
        match paths {
            NetPaths::Virtio => {
                self.netdevs.push(netdev);
                self.devices.push(virtio_net_device("net0"));
                Ok(())
            }
            NetPaths::Vf | NetPaths::Both => Err(Error::NotImplemented(
                "--paths vf/both: the igbvf driver and the failover pair are not written yet \
                 (use --paths virtio)"
                    .to_string(),
            )),
        }
    }

    /// The full argument list (without the program name).
    pub fn args(&self) -> Vec<String> {
        let mut args: Vec<String> = [
            "-M",
            "q35",
            "-nodefaults",
            "-no-reboot",
            "-display",
            "none",
            "-monitor",
            "none",
            "-serial",
            "stdio",
            "-cpu",
            "max",
            "-accel",
            self.accel.qemu_name(),
            "-m",
            &self.memory,
            "-device",
            "isa-debug-exit,iobase=0xf4,iosize=0x04",
            "-global",
            "ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off",
            "-global",
            "q35-pcihost.pci-hole64-size=0",
            "-device",
            "pcie-root-port,id=rp1,bus=pcie.0,addr=0x4,chassis=1,slot=1",
            "-device",
            "pcie-root-port,id=rp2,bus=pcie.0,addr=0x5,chassis=2,slot=2",
        ]
        .iter()
        .map(|arg| arg.to_string())
        .collect();
        if let Some(socket) = &self.qmp_socket {
            args.push("-qmp".to_string());
            args.push(format!("unix:{},server=on,wait=off", socket.display()));
        }
        for netdev in &self.netdevs {
            args.push("-netdev".to_string());
            args.push(netdev.clone());
        }
        for device in &self.devices {
            args.push("-device".to_string());
            args.push(device.clone());
        }
        if let Some(kernel) = &self.kernel {
            args.push("-kernel".to_string());
            args.push(kernel.display().to_string());
            args.push("-append".to_string());
            args.push(self.cmdline.clone());
        }
        args.extend(self.extra_args.iter().cloned());
        args
    }
}

/// Quotes one word for a POSIX shell when it needs it.
pub fn shell_quote(word: &str) -> String {
    let plain = !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:=,@+%".contains(c));
    if plain {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// A command line a user can paste into a shell.
pub fn shell_command_line(program: &str, args: &[String]) -> String {
    std::iter::once(program)
        .chain(args.iter().map(String::as_str))
        .map(shell_quote)
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value_after<'a>(args: &'a [String], flag: &str) -> Vec<&'a str> {
        args.windows(2)
            .filter(|pair| pair[0] == flag)
            .map(|pair| pair[1].as_str())
            .collect()
    }

    #[test]
    fn fixed_machine_has_native_hotplug_debug_exit_and_two_root_ports() {
        let mut machine = Machine::new(Accel::Tcg);
        machine.kernel = Some(PathBuf::from("/images/hello"));
        machine.cmdline = "log=debug hello.stay=1".to_string();
        let args = machine.args();
        assert_eq!(value_after(&args, "-M"), ["q35"]);
        assert_eq!(value_after(&args, "-accel"), ["tcg"]);
        assert_eq!(value_after(&args, "-m"), ["64M"]);
        assert_eq!(value_after(&args, "-serial"), ["stdio"]);
        assert_eq!(value_after(&args, "-monitor"), ["none"]);
        assert!(args.contains(&"-nodefaults".to_string()));
        assert!(args.contains(&"-no-reboot".to_string()));
        let globals = value_after(&args, "-global");
        assert!(globals.contains(&"ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off"));
        assert!(globals.contains(&"q35-pcihost.pci-hole64-size=0"));
        let devices = value_after(&args, "-device");
        assert!(devices.contains(&"isa-debug-exit,iobase=0xf4,iosize=0x04"));
        assert!(
            devices
                .iter()
                .any(|d| d.starts_with("pcie-root-port,id=rp1,"))
        );
        assert!(
            devices
                .iter()
                .any(|d| d.starts_with("pcie-root-port,id=rp2,"))
        );
        assert_eq!(value_after(&args, "-kernel"), ["/images/hello"]);
        assert_eq!(value_after(&args, "-append"), ["log=debug hello.stay=1"]);
    }

    #[test]
    fn virtio_path_with_user_networking_forwards_echo_ports() {
        let mut machine = Machine::new(Accel::Kvm);
        machine
            .add_network(NetPaths::Virtio, &NetBackend::User, &app_forwards("echo"))
            .unwrap();
        machine.qmp_socket = Some(PathBuf::from("/t/qemu/echo.qmp"));
        let args = machine.args();
        assert_eq!(
            value_after(&args, "-netdev"),
            ["user,id=net0,hostfwd=tcp:127.0.0.1:7007-:7,hostfwd=udp:127.0.0.1:7007-:7"]
        );
        assert!(
            value_after(&args, "-device")
                .contains(&"virtio-net-pci,id=virtio0,disable-legacy=on,netdev=net0")
        );
        assert_eq!(
            value_after(&args, "-qmp"),
            ["unix:/t/qemu/echo.qmp,server=on,wait=off"]
        );
        assert_eq!(value_after(&args, "-accel"), ["kvm"]);
    }

    #[test]
    fn tap_backend_and_iperf_forwards() {
        let mut machine = Machine::new(Accel::Tcg);
        let tap: NetBackend = "tap=tap0".parse().unwrap();
        machine.add_network(NetPaths::Virtio, &tap, &[]).unwrap();
        assert_eq!(
            value_after(&machine.args(), "-netdev"),
            ["tap,id=net0,ifname=tap0,script=no,downscript=no"]
        );
        let iperf = user_netdev("n", &app_forwards("iperf"));
        assert!(iperf.contains("hostfwd=tcp:127.0.0.1:5201-:5201"));
        assert!(iperf.contains("hostfwd=udp:127.0.0.1:5201-:5201"));
        assert!(app_forwards("hello").is_empty());
        assert!("tap=".parse::<NetBackend>().is_err());
        assert!("bridge".parse::<NetBackend>().is_err());
    }

    #[test]
    fn vf_paths_are_refused_clearly() {
        let mut machine = Machine::new(Accel::Tcg);
        for paths in [NetPaths::Vf, NetPaths::Both] {
            let error = machine
                .add_network(paths, &NetBackend::User, &[])
                .unwrap_err();
            assert!(error.to_string().contains("not implemented yet"));
        }
        assert!(machine.netdevs.is_empty() && machine.devices.is_empty());
        assert_eq!(igb_pf_device("pfnet"), "igb,id=pf0,bus=rp1,netdev=pfnet");
        assert!("sriov".parse::<NetPaths>().is_err());
    }

    #[test]
    fn firmware_only_machine_has_no_kernel_arguments() {
        let args = Machine::new(Accel::Tcg).args();
        assert!(!args.contains(&"-kernel".to_string()));
        assert!(!args.contains(&"-append".to_string()));
    }

    #[test]
    fn extra_args_come_last() {
        let mut machine = Machine::new(Accel::Tcg);
        machine.extra_args = vec!["-s".to_string(), "-S".to_string()];
        let args = machine.args();
        assert_eq!(&args[args.len() - 2..], ["-s", "-S"]);
    }

    #[test]
    fn printed_command_line_is_pasteable() {
        let args = vec![
            "-append".to_string(),
            "log=debug hello.crash=panic".to_string(),
            "-device".to_string(),
            "igb,id=pf0,bus=rp1".to_string(),
            String::new(),
            "it's".to_string(),
        ];
        assert_eq!(
            shell_command_line("qemu-system-x86_64", &args),
            r"qemu-system-x86_64 -append 'log=debug hello.crash=panic' -device igb,id=pf0,bus=rp1 '' 'it'\''s'"
        );
    }
}
