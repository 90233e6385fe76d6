//! Host-side network plumbing for the tests: a throw-away network namespace with a bridge and a
//! tap for one guest, running code inside it, raw Ethernet frame injection, and RST closes.
//!
//! Everything stays inside the namespace the test creates (10.77.0.0/24) or on loopback: no
//! other network is ever touched. Creating a namespace needs root; [`require_root`] says so
//! plainly instead of letting a test pass without having run.

use std::ffi::CString;
use std::fmt;
use std::fs::File;
use std::io;
use std::net::{Ipv4Addr, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// Prefix of the namespaces these tests create; the rest of the name is `<pid>-<n>`.
pub const NAMESPACE_PREFIX: &str = "tandem-test-";
/// The bridge inside the namespace; it holds the host's address.
pub const BRIDGE: &str = "br0";
/// The tap inside the namespace, enslaved to [`BRIDGE`]; QEMU attaches the guest NIC to it.
pub const TAP: &str = "tap0";
/// The host's address on [`BRIDGE`].
pub const HOST_ADDRESS: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
/// The address the guest is given (`ip=` on its command line).
pub const GUEST_ADDRESS: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
/// Prefix length of the namespace's subnet.
pub const PREFIX_LENGTH: u8 = 24;

/// Why setting up or using the topology failed.
#[derive(Debug)]
pub enum TopologyError {
    /// The test does not run as root (network namespaces and taps need it).
    NotRoot {
        /// What needed root.
        what: String,
        /// The effective user id we have.
        uid: u32,
    },
    /// A command (`ip ...`) could not be started or failed.
    Command {
        /// The command line.
        command: String,
        /// Its exit status and stderr, or why it did not start.
        detail: String,
    },
    /// A system call failed.
    System {
        /// What was being done.
        context: String,
        /// The OS error.
        error: io::Error,
    },
}

impl fmt::Display for TopologyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TopologyError::NotRoot { what, uid } => write!(
                f,
                "{what} needs root (network namespaces, bridges and taps), but this test runs as \
                 uid {uid}; run it as root (CI does): sudo -E cargo test -p tandem-tests --test echo"
            ),
            TopologyError::Command { command, detail } => write!(f, "`{command}` failed: {detail}"),
            TopologyError::System { context, error } => write!(f, "{context}: {error}"),
        }
    }
}

impl std::error::Error for TopologyError {}

fn system_error(context: impl Into<String>) -> impl FnOnce(io::Error) -> TopologyError {
    let context = context.into();
    move |error| TopologyError::System { context, error }
}

/// Our effective user id, from `/proc/self/status` (`Uid: real effective saved fs`).
pub fn effective_uid() -> Result<u32, TopologyError> {
    let status = std::fs::read_to_string("/proc/self/status")
        .map_err(system_error("reading /proc/self/status"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        .and_then(|uid| uid.parse().ok())
        .ok_or_else(|| TopologyError::System {
            context: "parsing the Uid line of /proc/self/status".to_string(),
            error: io::Error::from(io::ErrorKind::InvalidData),
        })
}

/// Fails with [`TopologyError::NotRoot`] unless we run as root.
pub fn require_root(what: &str) -> Result<(), TopologyError> {
    match effective_uid()? {
        0 => Ok(()),
        uid => Err(TopologyError::NotRoot {
            what: what.to_string(),
            uid,
        }),
    }
}

/// Runs `ip <args>` and returns its stdout.
pub fn ip(args: &[&str]) -> Result<String, TopologyError> {
    let command = format!("ip {}", args.join(" "));
    let output =
        Command::new("ip")
            .args(args)
            .output()
            .map_err(|error| TopologyError::Command {
                command: command.clone(),
                detail: format!("cannot start: {error}"),
            })?;
    if !output.status.success() {
        return Err(TopologyError::Command {
            command,
            detail: format!(
                "{}: {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Deletes namespaces left by earlier runs of these tests whose process is gone (a test killed
/// before its tear-down ran).
fn remove_stale_namespaces() {
    let Ok(list) = ip(&["netns", "list"]) else {
        return;
    };
    for name in list
        .lines()
        .filter_map(|line| line.split_whitespace().next())
    {
        let Some(rest) = name.strip_prefix(NAMESPACE_PREFIX) else {
            continue;
        };
        let Some(pid) = rest.split('-').next() else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = ip(&["netns", "delete", name]);
        }
    }
}

/// A network namespace holding bridge [`BRIDGE`] (address [`HOST_ADDRESS`]) with tap [`TAP`]
/// enslaved to it; deleted on drop, also when a test panics.
///
/// Drop the QEMU attached to the tap before this (declare it after): the namespace lives on
/// while a process is inside it.
pub struct BridgedTap {
    name: String,
}

impl BridgedTap {
    /// Creates the namespace and its interfaces (root only).
    pub fn create() -> Result<BridgedTap, TopologyError> {
        static INSTANCE: AtomicU32 = AtomicU32::new(0);
        require_root("the bridge + tap topology")?;
        remove_stale_namespaces();
        let name = format!(
            "{NAMESPACE_PREFIX}{}-{}",
            std::process::id(),
            INSTANCE.fetch_add(1, Ordering::Relaxed)
        );
        ip(&["netns", "add", &name])?;
        // From here on, drop removes the namespace whatever fails next.
        let topology = BridgedTap { name };
        let host_cidr = format!("{HOST_ADDRESS}/{PREFIX_LENGTH}");
        let steps: [&[&str]; 7] = [
            &["link", "set", "lo", "up"],
            // STP stays off (the default), so the port forwards at once instead of listening
            // and learning for 2 × forward delay first.
            &["link", "add", BRIDGE, "type", "bridge"],
            &["addr", "add", &host_cidr, "dev", BRIDGE],
            &["tuntap", "add", TAP, "mode", "tap"],
            &["link", "set", TAP, "master", BRIDGE],
            &["link", "set", TAP, "up"],
            &["link", "set", BRIDGE, "up"],
        ];
        for step in steps {
            topology.ip(step)?;
        }
        Ok(topology)
    }

    /// The namespace's name (for `ip netns exec`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `ip -n <namespace> <args>` and returns its stdout.
    pub fn ip(&self, args: &[&str]) -> Result<String, TopologyError> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        ip(&full)
    }

    /// Sets the MTU of interface `ifname` inside the namespace.
    pub fn set_mtu(&self, ifname: &str, mtu: u32) -> Result<(), TopologyError> {
        self.ip(&["link", "set", ifname, "mtu", &mtu.to_string()])
            .map(drop)
    }

    /// `ip -s link show <ifname>` inside the namespace (for diagnostics).
    pub fn link_statistics(&self, ifname: &str) -> String {
        self.ip(&["-s", "link", "show", ifname])
            .unwrap_or_else(|error| error.to_string())
    }

    /// Runs `work` on a fresh thread that has entered the namespace, and returns its result
    /// (a panic in `work` goes on in the caller). Sockets `work` opens, threads it starts and
    /// processes it spawns (QEMU, ping) are all inside the namespace; the caller's thread is
    /// untouched.
    pub fn run<T: Send>(&self, work: impl FnOnce() -> T + Send) -> Result<T, TopologyError> {
        let path = format!("/run/netns/{}", self.name);
        let namespace = File::open(&path).map_err(system_error(format!("opening {path}")))?;
        std::thread::scope(|scope| {
            let thread = scope.spawn(move || {
                enter_network_namespace(&namespace)
                    .map_err(system_error(format!("entering network namespace {path}")))?;
                Ok(work())
            });
            thread
                .join()
                .unwrap_or_else(|payload| std::panic::resume_unwind(payload))
        })
    }
}

impl Drop for BridgedTap {
    fn drop(&mut self) {
        if let Err(error) = ip(&["netns", "delete", &self.name]) {
            eprintln!("tear-down: {error}");
        }
    }
}

/// Moves the calling thread (only) into the network namespace `namespace` refers to.
fn enter_network_namespace(namespace: &File) -> io::Result<()> {
    // SAFETY: the descriptor is open for the whole call; setns(CLONE_NEWNET) only changes the
    // network namespace of this thread and touches no memory of ours.
    let result = unsafe { libc::setns(namespace.as_raw_fd(), libc::CLONE_NEWNET) };
    if result == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The index of network interface `ifname` in the calling thread's namespace.
fn interface_index(ifname: &str) -> io::Result<u32> {
    let name = CString::new(ifname).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: `name` is a NUL-terminated string that outlives the call.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(index)
    }
}

/// A raw `AF_PACKET` socket bound to one interface: whole Ethernet frames go out of it as
/// given, with no checks by the host stack. Sending on a tap hands the frame to the process
/// reading the tap (QEMU), i.e. to the guest's NIC.
pub struct PacketSocket {
    fd: OwnedFd,
    interface: String,
}

impl PacketSocket {
    /// Opens a packet socket on `ifname` in the calling thread's namespace (inside
    /// [`BridgedTap::run`] for the namespace's interfaces).
    pub fn bind(ifname: &str) -> Result<PacketSocket, TopologyError> {
        let context = format!("raw packet socket on {ifname}");
        let index = interface_index(ifname).map_err(system_error(context.clone()))?;
        // ETH_P_ALL in network byte order, as packet(7) asks.
        let all_protocols = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain socket(2) call with constant arguments; no memory is passed.
        let raw = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                i32::from(all_protocols),
            )
        };
        if raw < 0 {
            return Err(system_error(context)(io::Error::last_os_error()));
        }
        // SAFETY: `raw` is a descriptor socket(2) just returned, owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value.
        let mut address: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        address.sll_family = libc::AF_PACKET as u16;
        address.sll_protocol = all_protocols;
        address.sll_ifindex = index as i32;
        // SAFETY: `address` is a valid sockaddr_ll and the length passed is its size.
        let result = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&raw const address).cast::<libc::sockaddr>(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if result != 0 {
            return Err(system_error(context)(io::Error::last_os_error()));
        }
        Ok(PacketSocket {
            fd,
            interface: ifname.to_string(),
        })
    }

    /// The interface it is bound to.
    pub fn interface(&self) -> &str {
        &self.interface
    }

    /// Sends one whole Ethernet frame (destination MAC first, no FCS); returns the bytes sent.
    /// Frames longer than the interface MTU plus the Ethernet header fail with `EMSGSIZE`.
    pub fn send(&self, frame: &[u8]) -> io::Result<usize> {
        // SAFETY: `frame` is valid for reads of `frame.len()` bytes during the call.
        let sent = unsafe {
            libc::send(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast::<libc::c_void>(),
                frame.len(),
                0,
            )
        };
        usize::try_from(sent).map_err(|_| io::Error::last_os_error())
    }
}

/// Closes `stream` abortively: `SO_LINGER` with a zero timeout makes the close send a RST (and
/// drop unsent data) instead of a FIN.
pub fn close_with_reset(stream: TcpStream) -> io::Result<()> {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: `linger` is a valid struct linger and the length passed is its size; the
    // descriptor is open while `stream` lives.
    let result = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast::<libc::c_void>(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    if result != 0 {
        return Err(io::Error::last_os_error());
    }
    drop(stream);
    Ok(())
}

/// A free port on 127.0.0.1 for both TCP and UDP (for a slirp `hostfwd`). Another process may
/// take it before QEMU binds it; that is unlikely and shows as a QEMU start-up error.
pub fn free_loopback_port() -> io::Result<u16> {
    for _ in 0..20 {
        let tcp = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
        let port = tcp.local_addr()?.port();
        if std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, port)).is_ok() {
            return Ok(port);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Err(io::Error::new(
        io::ErrorKind::AddrInUse,
        "no port free for both TCP and UDP on 127.0.0.1",
    ))
}
