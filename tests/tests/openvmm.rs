//! The images under OpenVMM (Hyper-V enlightenments, VMBus) on nested KVM in a QEMU/TCG L1.
//!
//! These boot the real `openvmm` binary built from `../shared/openvmm`; the first test to run
//! builds it (cached under target/openvmm, ~7 min cold on 2 cores) and fetches the L1 Debian
//! kernel and busybox (cached under target/openvmm-l1). An environment failure (no SVM in
//! L1, a KVM module refused, the OpenVMM build failed) fails the test with a message saying
//! so: nothing here passes without the guest having run.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream, UdpSocket};
use std::time::Duration;

use tandem_tests::{bar_addresses, image, pci_function_block};
use xtask::machine::{HostForward, NetPaths, Protocol};
use xtask::openvmm::Outcome;
use xtask::openvmm_run::{GuestSpec, NestedGuest};

/// L1 boots in ~10 s under TCG, loads KVM and starts OpenVMM; the guest then boots in ~1 s.
/// Generous for CI's 2 shared cores running two guests at once.
const BOOT_TIMEOUT: Duration = Duration::from_secs(300);
/// From the guest's last line to L1's power-off.
const EXIT_TIMEOUT: Duration = Duration::from_secs(120);

fn spawn(label: &str, spec: &GuestSpec) -> NestedGuest {
    NestedGuest::spawn(label, spec).unwrap_or_else(|error| panic!("{error}"))
}

/// MANA's PCI vendor:device.
const MANA: &str = "1414:00ba";

/// One boot covers the boot protocol, the Hyper-V enlightenments, the command line, both NICs'
/// plumbing (netvsc offered on VMBus, MANA on a PCIe root port whose ECAM and 64-bit BARs lie
/// above 4 GiB) and the exit code: each nested boot costs CI about a minute.
#[test]
fn hello_boots_under_openvmm_by_the_linux_boot_protocol_and_exits_0() {
    let cmdline = "log=debug tandem.test=openvmm";
    let spec = GuestSpec {
        app: image("hello"),
        cmdline: cmdline.to_string(),
        memory: "64M".to_string(),
        paths: NetPaths::Both,
        forwards: Vec::new(),
        l1_tap_ping: false,
    };
    let mut guest = spawn("openvmm hello", &spec);
    let booted = guest
        .wait_for_line("booted via", BOOT_TIMEOUT)
        .unwrap_or_else(|error| panic!("{error}"));
    assert!(
        booted.contains("booted via the Linux x86-64 boot protocol"),
        "OpenVMM enters at e_entry with boot_params: {booted}"
    );
    guest
        .wait_for_line("Hyper-V detected", BOOT_TIMEOUT)
        .unwrap_or_else(|error| panic!("{error}"));
    // OpenVMM prepends its own words; ours must arrive whole through `cmd_line_ptr`.
    let line = guest
        .wait_for_line("cmdline:", BOOT_TIMEOUT)
        .unwrap_or_else(|error| panic!("{error}"));
    assert!(line.trim_end().ends_with(cmdline), "{line}");
    guest
        .wait_for_line("hello: done", BOOT_TIMEOUT)
        .unwrap_or_else(|error| panic!("{error}"));
    let lines = guest.l1.serial_lines();
    let mana = pci_function_block(&lines, MANA).unwrap_or_else(|| {
        panic!(
            "no MANA function {MANA} in the PCI tree:\n{}",
            lines.join("\n")
        )
    });
    assert!(
        bar_addresses(&mana)
            .iter()
            .any(|&address| address >= 1 << 32),
        "MANA's 64-bit BARs are placed above 4 GiB:\n{}",
        mana.join("\n")
    );
    let outcome = guest
        .wait_outcome(EXIT_TIMEOUT)
        .unwrap_or_else(|error| panic!("{error}"));
    assert_eq!(
        outcome,
        Outcome::Guest(0),
        "{outcome}\n{}",
        guest.l1.diagnostics()
    );
}

/// A TCP port free on 127.0.0.1 right now (the host is shared: 7007 may be taken).
fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .unwrap_or_else(|error| panic!("no free port: {error}"))
}

/// Sends `data` through the echo server at 127.0.0.1:`port` and returns what came back.
fn echo_through(port: u16, data: &[u8]) -> Vec<u8> {
    let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port))
        .unwrap_or_else(|error| panic!("connecting to 127.0.0.1:{port}: {error}"));
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap_or_else(|error| panic!("{error}"));
    let mut writer = stream.try_clone().unwrap_or_else(|error| panic!("{error}"));
    let payload = data.to_vec();
    let sender = std::thread::spawn(move || writer.write_all(&payload));
    let mut echoed = vec![0u8; data.len()];
    stream
        .read_exact(&mut echoed)
        .unwrap_or_else(|error| panic!("reading the echo back: {error}"));
    sender
        .join()
        .unwrap_or_else(|_| panic!("sender panicked"))
        .unwrap_or_else(|error| panic!("sending: {error}"));
    echoed
}

/// The VF path alone: our MANA driver on OpenVMM's MANA emulator (`gdma`) behind a PCIe root
/// port, DHCP from consomme, and 1 MiB through host → L1 → consomme → guest and back.
#[test]
fn echo_over_mana_alone_returns_one_mib_exactly() {
    let port = free_port();
    let spec = GuestSpec {
        app: image("echo"),
        cmdline: "log=info".to_string(),
        memory: "64M".to_string(),
        paths: NetPaths::Vf,
        forwards: vec![HostForward {
            protocol: Protocol::Tcp,
            host_port: port,
            guest_port: 7,
        }],
        l1_tap_ping: false,
    };
    let mut guest = spawn("openvmm echo mana", &spec);
    let up = guest
        .wait_for_line("net: interface", BOOT_TIMEOUT)
        .unwrap_or_else(|error| panic!("{error}"));
    assert!(
        up.contains("on mana 01:00.0"),
        "the VF carries the interface: {up}"
    );
    guest
        .wait_for_line("net: DHCP lease", BOOT_TIMEOUT)
        .unwrap_or_else(|error| panic!("{error}"));
    let data: Vec<u8> = (0..1u32 << 20)
        .map(|index| (index.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let echoed = echo_through(port, &data);
    assert!(echoed == data, "the echo differs from what was sent");
}

/// The bytes every echo test sends: not a repeating pattern, so a dropped or repeated segment
/// shows.
fn echo_payload(len: usize, seed: u32) -> Vec<u8> {
    (0..len as u32)
        .map(|index| (index.wrapping_add(seed).wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect()
}

/// Boots the echo app with netvsc alone and waits until the synthetic path is up and leased.
fn echo_over_netvsc(label: &str, forwards: Vec<HostForward>) -> NestedGuest {
    let spec = GuestSpec {
        app: image("echo"),
        cmdline: "log=info".to_string(),
        memory: "64M".to_string(),
        paths: NetPaths::Virtio,
        forwards,
        l1_tap_ping: false,
    };
    let mut guest = spawn(label, &spec);
    let up = guest
        .wait_for_line("net: synthetic path up", BOOT_TIMEOUT)
        .unwrap_or_else(|error| panic!("{error}"));
    assert!(
        up.contains("netvsc over VMBus") && up.contains("NVSP"),
        "netvsc came up over VMBus: {up}"
    );
    let interface = guest
        .wait_for_line("net: interface", BOOT_TIMEOUT)
        .unwrap_or_else(|error| panic!("{error}"));
    assert!(
        interface.contains("on netvsc"),
        "netvsc carries the interface: {interface}"
    );
    guest
        .wait_for_line("net: DHCP lease", BOOT_TIMEOUT)
        .unwrap_or_else(|error| panic!("{error}"));
    guest
}

/// The synthetic path: our VMBus client and netvsc driver against OpenVMM's real `netvsp`,
/// DHCP from consomme, 1 MiB byte-exact through host → L1 → consomme → guest and back, then
/// several connections at once, each getting its own bytes back.
#[test]
fn echo_over_netvsc_returns_one_mib_exactly_and_serves_concurrent_connections() {
    let port = free_port();
    let _guest = echo_over_netvsc(
        "openvmm echo netvsc",
        vec![HostForward {
            protocol: Protocol::Tcp,
            host_port: port,
            guest_port: 7,
        }],
    );
    let data = echo_payload(1 << 20, 0);
    let echoed = echo_through(port, &data);
    assert!(echoed == data, "the 1 MiB echo differs from what was sent");
    let clients: Vec<_> = (1..=4u32)
        .map(|seed| {
            std::thread::spawn(move || {
                let data = echo_payload(64 << 10, seed);
                echo_through(port, &data) == data
            })
        })
        .collect();
    for (index, client) in clients.into_iter().enumerate() {
        let same = client
            .join()
            .unwrap_or_else(|_| panic!("client {index} panicked"));
        assert!(same, "concurrent connection {index}: the echo differs");
    }
}

/// UDP through consomme's `hostfwd=udp`: each datagram sent to 127.0.0.1:`port` comes back
/// whole. consomme answers from a fresh host socket rather than the forwarded port, so the
/// reply's source port differs from `port`: the client must not `connect()` (see
/// docs/openvmm.md).
#[test]
fn echo_over_netvsc_answers_udp() {
    let port = free_port();
    let guest = echo_over_netvsc(
        "openvmm echo netvsc udp",
        vec![HostForward {
            protocol: Protocol::Udp,
            host_port: port,
            guest_port: 7,
        }],
    );
    let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))
        .unwrap_or_else(|error| panic!("binding a UDP socket: {error}"));
    socket
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap_or_else(|error| panic!("{error}"));
    for (index, size) in [64usize, 512, 1400].into_iter().enumerate() {
        let datagram = echo_payload(size, index as u32);
        let mut reply = vec![0u8; 2048];
        // A datagram may be lost on the way through two user-mode NATs: a few tries each.
        let received = (0..6).find_map(|_| {
            socket
                .send_to(&datagram, (Ipv4Addr::LOCALHOST, port))
                .unwrap_or_else(|error| panic!("sending to 127.0.0.1:{port}: {error}"));
            loop {
                match socket.recv_from(&mut reply) {
                    Ok((len, from)) if reply[..len] == datagram[..] => return Some(from),
                    // A late answer to an earlier try of a different datagram.
                    Ok(_) => continue,
                    Err(_) => return None,
                }
            }
        });
        let from = received.unwrap_or_else(|| {
            panic!(
                "no UDP echo of {size} bytes from 127.0.0.1:{port}\n{}",
                guest.l1.serial_lines().join("\n")
            )
        });
        eprintln!("udp echo of {size} bytes came back from {from}");
    }
}

/// One run of the host's stock `iperf3` client against 127.0.0.1:`port`, bounded by
/// `timeout`: its exit status and report (stdout, then stderr).
fn run_iperf3_client(port: u16, extra: &[&str]) -> (std::process::ExitStatus, String) {
    let output = std::process::Command::new("timeout")
        .args(["90", "iperf3", "-c", "127.0.0.1", "-p", &port.to_string()])
        .args(["-t", "3", "--connect-timeout", "20000"])
        .args(extra)
        .output()
        .unwrap_or_else(|error| panic!("running iperf3 (install the iperf3 package): {error}"));
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status, report)
}

/// Sessions the iperf app has logged so far (`iperf: session N from ...`).
fn iperf_sessions_seen(guest: &NestedGuest) -> usize {
    guest
        .l1
        .serial_lines()
        .iter()
        .filter(|line| line.contains("iperf: session ") && line.contains(" from "))
        .count()
}

/// Runs the host's stock `iperf3` client against 127.0.0.1:`port` and returns its report;
/// fails the test unless it exits 0 with a receiver rate above zero.
///
/// A client whose control connection never reached the guest is run once more: now and then
/// a new connection through L0's slirp and L1's consomme is lost on the way (seen: the client
/// connected, as slirp accepts on the host at once, then waited in vain; the app never logged
/// the session, and answered the next connection at once). Whatever reached the app counts:
/// a session it logged and failed fails the test.
fn iperf3_client(port: u16, extra: &[&str], guest: &NestedGuest) -> String {
    let sessions_before = iperf_sessions_seen(guest);
    let (mut status, mut report) = run_iperf3_client(port, extra);
    if !iperf3_succeeded(status, &report) && iperf_sessions_seen(guest) == sessions_before {
        eprintln!(
            "iperf3 {extra:?}: the connection never reached the guest (no session logged); \
             trying once more. The first try's report:\n{report}"
        );
        (status, report) = run_iperf3_client(port, extra);
    }
    assert!(
        iperf3_succeeded(status, &report),
        "iperf3 {extra:?} against the app over netvsc must complete with throughput \
         ({status}; the app logged {} of its sessions for it):\n{report}\n{}",
        iperf_sessions_seen(guest) - sessions_before,
        guest.l1.serial_lines().join("\n")
    );
    report
}

/// True when iperf3 exited 0 and its report has a receiver rate above zero.
fn iperf3_succeeded(status: std::process::ExitStatus, report: &str) -> bool {
    let receiver_rate = report
        .lines()
        .filter(|line| line.trim_end().ends_with("receiver"))
        .find_map(|line| {
            let words: Vec<&str> = line.split_whitespace().collect();
            let unit = words.iter().position(|word| word.ends_with("bits/sec"))?;
            words.get(unit.checked_sub(1)?)?.parse::<f64>().ok()
        });
    status.success() && receiver_rate.is_some_and(|rate| rate > 0.0)
}

/// The iperf app over netvsc: stock `iperf3` TCP tests host → guest and (`-R`) guest → host,
/// 3 s each, through host → L1 → consomme → guest; each completes with throughput and the app
/// reports each test done and its session finished (before the next client connects).
#[test]
fn iperf_over_netvsc_completes_stock_iperf3_tcp_both_ways() {
    let port = free_port();
    let spec = GuestSpec {
        app: image("iperf"),
        cmdline: "log=info".to_string(),
        memory: "64M".to_string(),
        paths: NetPaths::Virtio,
        forwards: vec![HostForward {
            protocol: Protocol::Tcp,
            host_port: port,
            guest_port: 5201,
        }],
        l1_tap_ping: false,
    };
    let mut guest = spawn("openvmm iperf netvsc", &spec);
    guest
        .wait_for_line("net: synthetic path up", BOOT_TIMEOUT)
        .unwrap_or_else(|error| panic!("{error}"));
    guest
        .wait_for_line("net: DHCP lease", BOOT_TIMEOUT)
        .unwrap_or_else(|error| panic!("{error}"));
    for extra in [&[][..], &["-R"][..]] {
        let report = iperf3_client(port, extra, &guest);
        let done = guest
            .wait_for_line("iperf: test done", Duration::from_secs(30))
            .unwrap_or_else(|error| panic!("{error}\n{report}"));
        eprintln!("iperf3 {extra:?}: {done}");
        guest
            .wait_for_line(" finished (", Duration::from_secs(30))
            .unwrap_or_else(|error| panic!("the iperf session did not end: {error}\n{report}"));
    }
}

/// Ping, which consomme cannot carry (its `hostfwd` takes TCP and UDP only): the echo app's
/// netvsc sits on OpenVMM's tap backend, on a tap L1 creates in a subnet private to the L1 VM
/// (10.77.0.1/24), with the static address 10.77.0.2; L1's busybox `ping -c 3` gets all three
/// echo replies from our ICMP path over VMBus and netvsc.
#[test]
fn echo_over_netvsc_on_an_l1_tap_answers_ping() {
    let spec = GuestSpec {
        app: image("echo"),
        cmdline: "log=info".to_string(),
        memory: "64M".to_string(),
        paths: NetPaths::Virtio,
        forwards: Vec::new(),
        l1_tap_ping: true,
    };
    let mut guest = spawn("openvmm echo netvsc ping", &spec);
    let up = guest
        .wait_for_line("net: synthetic path up", BOOT_TIMEOUT)
        .unwrap_or_else(|error| panic!("{error}"));
    assert!(up.contains("netvsc over VMBus"), "netvsc came up: {up}");
    // L1's first report is ping's count line, or that no ping was answered at all.
    let summary = guest
        .wait_for_line("TANDEM-L1: ping:", BOOT_TIMEOUT)
        .unwrap_or_else(|error| panic!("{error}"));
    assert!(
        summary.contains("3 packets transmitted, 3 packets received"),
        "L1 pinged the guest over the tap and every echo request was answered: {summary}\n{}",
        guest.l1.serial_lines().join("\n")
    );
    if let Ok(times) = guest.wait_for_line("TANDEM-L1: ping:", Duration::from_secs(10)) {
        eprintln!("{summary}\n{times}");
    }
}
