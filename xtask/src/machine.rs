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

impl NetPaths {
    /// The `--paths` word for this choice.
    pub fn name(self) -> &'static str {
        match self {
            NetPaths::Virtio => "virtio",
            NetPaths::Vf => "vf",
            NetPaths::Both => "both",
        }
    }
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

/// The MAC of the synthetic NIC, which the lab PF also gives the VF (the pair shares one MAC).
pub const GUEST_MAC: &str = "52:54:00:12:34:56";
/// The igb PF's own MAC (never used for guest traffic).
pub const PF_MAC: &str = "52:54:00:12:34:ff";
/// Command-line words that switch on the lab PF responder in the guest.
pub const LAB_PF_CMDLINE: &str = "igb.lab_pf=1";

/// `-device` value for a modern-only virtio-net NIC.
pub fn virtio_net_device(netdev: &str) -> String {
    format!("virtio-net-pci,id=virtio0,disable-legacy=on,netdev={netdev},mac={GUEST_MAC}")
}

/// `-device` value for the igb (82576) PF on its native hot-plug root port [`PF_ROOT_PORT`].
pub fn igb_pf_device(netdev: &str) -> String {
    format!("igb,id=pf0,bus={PF_ROOT_PORT},netdev={netdev},mac={PF_MAC}")
}

/// The board QEMU emulates.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Board {
    /// q35 with the fixed hot-plug root ports (every image's default).
    #[default]
    Q35,
    /// QEMU's `microvm` without PIT, PIC or RTC: no PCI bus, no legacy timer or interrupt
    /// controller, like a Hyper-V Gen2 VM (which QEMU cannot emulate under TCG). Only the serial
    /// port and isa-debug-exit remain; NIC options do not apply.
    LegacyFree,
}

/// A QEMU invocation for one guest.
#[derive(Clone, Debug)]
pub struct Machine {
    /// Accelerator.
    pub accel: Accel,
    /// Board.
    pub board: Board,
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
    /// The `-netdev` id the igb PF is attached to (what `device_add` must name again).
    pub pf_netdev: Option<String>,
    /// The guest plays the igb PF's driver (`igb.lab_pf=1` is added to the command line).
    pub lab_pf: bool,
    /// Where the lab control channel (the guest's COM2) listens, if any.
    pub lab_socket: Option<PathBuf>,
}

impl Machine {
    /// A machine with no NICs, default memory and an empty command line.
    pub fn new(accel: Accel) -> Self {
        Machine {
            accel,
            board: Board::Q35,
            memory: DEFAULT_MEMORY.to_string(),
            kernel: None,
            cmdline: String::new(),
            qmp_socket: None,
            netdevs: Vec::new(),
            devices: Vec::new(),
            extra_args: Vec::new(),
            pf_netdev: None,
            lab_pf: false,
            lab_socket: None,
        }
    }

    /// Adds the NICs for `paths` on `backend`; `forwards` apply to user networking.
    pub fn add_network(
        &mut self,
        paths: NetPaths,
        backend: &NetBackend,
        forwards: &[HostForward],
    ) -> Result<()> {
        let netdev = |id: &str, tap_index: usize| match backend {
            NetBackend::User => user_netdev(id, forwards),
            NetBackend::Tap(ifnames) => {
                let names: Vec<&str> = ifnames.split(',').collect();
                tap_netdev(id, names.get(tap_index).copied().unwrap_or(names[0]))
            }
        };
        match paths {
            NetPaths::Virtio => {
                self.netdevs.push(netdev("net0", 0));
                self.devices.push(virtio_net_device("net0"));
            }
            NetPaths::Vf => {
                self.netdevs.push(netdev("net0", 0));
                self.devices.push(igb_pf_device("net0"));
                self.pf_netdev = Some("net0".to_string());
                self.lab_pf = true;
            }
            NetPaths::Both => {
                match backend {
                    // Two taps (`tap=a,b`): each NIC on its own bridge port, like a host whose
                    // VF and synthetic NIC reach the same switch through different ports.
                    NetBackend::Tap(ifnames) if ifnames.contains(',') => {
                        self.netdevs.push(netdev("net0", 0));
                        self.netdevs.push(netdev("net1", 1));
                        self.devices.push(virtio_net_device("net0"));
                        self.devices.push(igb_pf_device("net1"));
                        self.pf_netdev = Some("net1".to_string());
                    }
                    // One backend: a hub puts both NICs on one segment.
                    _ => {
                        self.netdevs.push(netdev("net0-hub", 0));
                        self.netdevs
                            .push("hubport,id=hub-uplink,hubid=0,netdev=net0-hub".to_string());
                        self.netdevs
                            .push("hubport,id=hub-virtio,hubid=0".to_string());
                        self.netdevs.push("hubport,id=hub-igb,hubid=0".to_string());
                        self.devices.push(virtio_net_device("hub-virtio"));
                        self.devices.push(igb_pf_device("hub-igb"));
                        self.pf_netdev = Some("hub-igb".to_string());
                    }
                }
                self.lab_pf = true;
            }
        }
        Ok(())
    }

    /// The full argument list (without the program name).
    pub fn args(&self) -> Vec<String> {
        let (board, board_args): (&str, &[&str]) = match self.board {
            Board::Q35 => (
                "q35",
                &[
                    "-global",
                    "ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off",
                    "-global",
                    "q35-pcihost.pci-hole64-size=0",
                    "-device",
                    "pcie-root-port,id=rp1,bus=pcie.0,addr=0x4,chassis=1,slot=1",
                    "-device",
                    "pcie-root-port,id=rp2,bus=pcie.0,addr=0x5,chassis=2,slot=2",
                ],
            ),
            Board::LegacyFree => ("microvm,pit=off,pic=off,rtc=off", &[]),
        };
        let mut args: Vec<String> = [
            "-M",
            board,
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
        ]
        .iter()
        .chain(board_args)
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
        if let Some(socket) = &self.lab_socket {
            args.push("-chardev".to_string());
            args.push(format!(
                "socket,id=lab,path={},server=on,wait=off",
                socket.display()
            ));
            args.push("-device".to_string());
            args.push("isa-serial,chardev=lab".to_string());
        }
        if let Some(kernel) = &self.kernel {
            args.push("-kernel".to_string());
            args.push(kernel.display().to_string());
            args.push("-append".to_string());
            let mut cmdline = self.cmdline.clone();
            if self.lab_pf
                && !cmdline
                    .split_whitespace()
                    .any(|word| word.starts_with("igb.lab_pf="))
            {
                if !cmdline.is_empty() {
                    cmdline.push(' ');
                }
                cmdline.push_str(LAB_PF_CMDLINE);
            }
            args.push(cmdline);
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
    fn the_legacy_free_board_is_microvm_without_pit_pic_rtc_or_root_ports() {
        let mut machine = Machine::new(Accel::Tcg);
        machine.board = Board::LegacyFree;
        machine.kernel = Some(PathBuf::from("/images/hello"));
        let args = machine.args();
        assert_eq!(
            value_after(&args, "-M"),
            ["microvm,pit=off,pic=off,rtc=off"]
        );
        assert!(value_after(&args, "-global").is_empty());
        let devices = value_after(&args, "-device");
        assert_eq!(devices, ["isa-debug-exit,iobase=0xf4,iosize=0x04"]);
        assert_eq!(value_after(&args, "-serial"), ["stdio"]);
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
        assert!(value_after(&args, "-device").contains(
            &"virtio-net-pci,id=virtio0,disable-legacy=on,netdev=net0,mac=52:54:00:12:34:56"
        ));
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
    fn both_paths_share_one_segment_and_switch_on_the_lab_pf() {
        let mut machine = Machine::new(Accel::Tcg);
        machine.kernel = Some(PathBuf::from("/images/echo"));
        machine.cmdline = "log=info".to_string();
        machine
            .add_network(NetPaths::Both, &NetBackend::User, &app_forwards("echo"))
            .unwrap();
        machine.lab_socket = Some(PathBuf::from("/t/echo.lab"));
        let args = machine.args();
        let netdevs = value_after(&args, "-netdev");
        assert!(netdevs[0].starts_with("user,id=net0-hub,hostfwd="));
        assert!(netdevs.contains(&"hubport,id=hub-uplink,hubid=0,netdev=net0-hub"));
        let devices = value_after(&args, "-device");
        assert!(
            devices
                .iter()
                .any(|d| d.starts_with("virtio-net-pci,") && d.contains("netdev=hub-virtio"))
        );
        assert!(
            devices
                .iter()
                .any(|d| d.starts_with("igb,id=pf0,bus=rp1,netdev=hub-igb"))
        );
        assert!(devices.contains(&"isa-serial,chardev=lab"));
        assert_eq!(value_after(&args, "-append"), ["log=info igb.lab_pf=1"]);
        assert_eq!(machine.pf_netdev.as_deref(), Some("hub-igb"));
    }

    #[test]
    fn vf_alone_and_two_taps_for_a_bridge() {
        let mut machine = Machine::new(Accel::Tcg);
        machine
            .add_network(NetPaths::Vf, &NetBackend::User, &[])
            .unwrap();
        let args = machine.args();
        assert!(
            !value_after(&args, "-device")
                .iter()
                .any(|d| d.starts_with("virtio-net-pci"))
        );
        assert_eq!(machine.pf_netdev.as_deref(), Some("net0"));

        let mut machine = Machine::new(Accel::Tcg);
        let taps: NetBackend = "tap=tap0,tap1".parse().unwrap();
        machine.add_network(NetPaths::Both, &taps, &[]).unwrap();
        let netdevs = value_after(&machine.args(), "-netdev").join(" ");
        assert!(netdevs.contains("ifname=tap0") && netdevs.contains("ifname=tap1"));
        assert_eq!(machine.pf_netdev.as_deref(), Some("net1"));
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
