//! The network stack: smoltcp's interface over the bond, handle-based sockets for applications,
//! and the event loop.
//!
//! Everything is non-blocking. An application calls [`NetStack::poll`] (or uses
//! [`NetStack::run`]), then reads and writes its sockets, then [`NetStack::wait`]s for the next
//! interrupt or deadline. Socket handles are plain values carrying a generation, so a handle
//! that outlived its socket can never reach another socket.
//!
//! TCP servers listen through a pool of smoltcp sockets (smoltcp has no backlog: one listening
//! socket takes one connection), replenished as connections arrive, up to a connection limit.
//! Sockets that end (reset, closed, timed out) are removed from smoltcp's socket set
//! automatically, so thousands of connections do not leak memory, and a peer that never reads
//! after the application closed is cut off after a linger time.

use alloc::boxed::Box;
use alloc::collections::VecDeque;
use alloc::vec;
use alloc::vec::Vec;
use core::ops::ControlFlow;

use net_device::{MacAddress, NetDevice};
use smoltcp::iface::{
    Config, Interface, PollIngressSingleResult, PollResult, SocketHandle, SocketSet,
};
use smoltcp::socket::{Socket, dhcpv4, tcp, udp};
use smoltcp::time::{Duration, Instant};
use smoltcp::wire::{
    EthernetAddress, EthernetFrame, EthernetProtocol, HardwareAddress, IPV4_HEADER_LEN,
    IPV6_HEADER_LEN, IpAddress, IpCidr, IpEndpoint, IpProtocol, Ipv4Address, Ipv4Cidr, Ipv4Packet,
    Ipv6Address, Ipv6Cidr, Ipv6Packet, TcpPacket, UDP_HEADER_LEN,
};

use crate::announce::{
    arp_request, gratuitous_arp, neighbor_solicitation, unsolicited_neighbor_advertisement,
};
use crate::bond::{AttachRejected, Bond, BondConfig, BondStats, ETHERNET_HEADER_LEN, PathId};
use crate::config::{Ipv4Mode, MIN_MTU, NetConfig};
use crate::slab::{Key, Slab};
use crate::{Error, Platform, Result, TcpState};

/// Largest IPv4 packet: the limit of a fragmented UDP datagram (smoltcp's fragmentation and
/// reassembly buffers are sized for it).
const MAX_IPV4_PACKET: usize = 65_535;
const NS_PER_MS: u64 = 1_000_000;
const FIRST_EPHEMERAL_PORT: u16 = 49152;
const EPHEMERAL_PORTS: u16 = 16384;
/// A half-open connection (SYN received, our SYN-ACK unanswered) is dropped after this long, so
/// clients that vanish mid-handshake cannot use up a listener's connection limit.
const HANDSHAKE_TIMEOUT_MS: u64 = 20_000;

/// Options of TCP sockets (per listener or per outgoing connection).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpOptions {
    /// Receive buffer per socket. Above 64 KiB smoltcp uses window scaling; bulk transfers
    /// want 256 KiB or more.
    pub rx_buffer: usize,
    /// Transmit buffer per socket.
    pub tx_buffer: usize,
    /// Disable Nagle's algorithm (small writes go out at once; right for echo-like traffic).
    pub nodelay: bool,
    /// Listening sockets kept ready per listener (the effective backlog for simultaneous SYNs).
    pub spare_listeners: usize,
    /// Sockets per listener at most (listening, connecting, connected and closing).
    pub max_connections: usize,
    /// TCP keep-alive interval, if any.
    pub keep_alive_ms: Option<u64>,
    /// Abort a connection whose sent data stays unacknowledged this long, if set.
    pub timeout_ms: Option<u64>,
}

impl Default for TcpOptions {
    fn default() -> Self {
        TcpOptions {
            rx_buffer: 64 * 1024,
            tx_buffer: 64 * 1024,
            nodelay: true,
            spare_listeners: 8,
            max_connections: 128,
            keep_alive_ms: None,
            timeout_ms: None,
        }
    }
}

impl TcpOptions {
    /// Large buffers for throughput tests (window scaling, 256 KiB each way).
    pub fn bulk() -> TcpOptions {
        TcpOptions {
            rx_buffer: 256 * 1024,
            tx_buffer: 256 * 1024,
            ..TcpOptions::default()
        }
    }
}

/// Buffer sizes of UDP sockets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UdpOptions {
    /// Datagrams the receive queue holds.
    pub rx_datagrams: usize,
    /// Payload bytes the receive queue holds.
    pub rx_payload_bytes: usize,
    /// Datagrams the transmit queue holds.
    pub tx_datagrams: usize,
    /// Payload bytes the transmit queue holds.
    pub tx_payload_bytes: usize,
}

impl Default for UdpOptions {
    fn default() -> Self {
        // 256 full-size (1472-byte) datagrams each way.
        UdpOptions {
            rx_datagrams: 256,
            rx_payload_bytes: 256 * 1472,
            tx_datagrams: 256,
            tx_payload_bytes: 256 * 1472,
        }
    }
}

/// Stack-wide options.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StackOptions {
    /// Bond tuning.
    pub bond: BondConfig,
    /// Default TCP options ([`NetStack::tcp_listen`], [`NetStack::tcp_connect`]).
    pub tcp: TcpOptions,
    /// UDP socket buffers.
    pub udp: UdpOptions,
    /// After [`NetStack::tcp_close`], how long the stack keeps trying to deliver queued data and
    /// the FIN before it resets the connection (a peer that never reads cannot pin memory).
    pub close_linger_ns: u64,
    /// Received frames processed per [`NetStack::poll`] at most.
    pub ingress_budget: usize,
}

impl Default for StackOptions {
    fn default() -> Self {
        StackOptions {
            bond: BondConfig::default(),
            tcp: TcpOptions::default(),
            udp: UdpOptions::default(),
            close_linger_ns: 30_000 * NS_PER_MS,
            ingress_budget: 512,
        }
    }
}

/// A TCP listener. Not `Clone`: give it back with [`NetStack::tcp_unlisten`].
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct TcpListener {
    key: Key,
    port: u16,
}

impl TcpListener {
    /// The port listened on.
    pub fn port(&self) -> u16 {
        self.port
    }
}

/// A TCP connection. Not `Clone`: end it with [`NetStack::tcp_close`] or
/// [`NetStack::tcp_abort`], which consume it.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct TcpStream {
    key: Key,
}

impl TcpStream {
    /// A number unique among this stack's live streams (for maps and logs).
    pub fn id(&self) -> u64 {
        (u64::from(self.key.generation) << 32) | u64::from(self.key.index)
    }
}

/// A bound UDP socket. Not `Clone`: give it back with [`NetStack::udp_close`].
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct UdpSocket {
    key: Key,
    port: u16,
}

impl UdpSocket {
    /// The local port.
    pub fn port(&self) -> u16 {
        self.port
    }
}

struct Listener {
    port: u16,
    options: TcpOptions,
    /// Sockets in LISTEN or SYN-RECEIVED.
    pending: Vec<SocketHandle>,
    /// Established connections waiting for `accept`.
    ready: VecDeque<SocketHandle>,
    /// Sockets created for this listener that still exist (any state, accepted or not).
    open: usize,
    at_limit: bool,
}

enum Stream {
    Live {
        socket: SocketHandle,
        origin: Option<Key>,
    },
    /// The connection ended and its smoltcp socket was freed; the slot remembers how it ended
    /// until the application closes the handle.
    Reclaimed { peer_finished: bool },
}

struct Lingering {
    socket: SocketHandle,
    origin: Option<Key>,
    deadline_ns: u64,
    /// Poll number at which the socket was aborted; it is removed after the next egress (so
    /// the RST goes out).
    aborted_at_poll: Option<u64>,
}

struct UdpEntry {
    socket: SocketHandle,
    port: u16,
}

#[derive(Clone, Copy, Default)]
struct StackCounters {
    tcp_accepted: u64,
    tcp_connects: u64,
    tcp_reclaimed: u64,
    tcp_linger_aborts: u64,
    tcp_duplicate_syns: u64,
    tcp_buffer_allocation_failures: u64,
    dhcp_leases: u64,
    announcement_frames: u64,
    gateway_solicitations: u64,
    receive_ns: u64,
    receive_device_ns: u64,
    egress_ns: u64,
    idle_ns: u64,
}

/// A snapshot of the stack's counters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetStats {
    /// Per path, total, switches, duplicate and bad-frame drops.
    pub bond: BondStats,
    /// TCP listeners.
    pub tcp_listeners: usize,
    /// Streams held by the application (including ended ones not yet closed).
    pub tcp_streams: usize,
    /// Connections closed by the application that are still finishing.
    pub tcp_lingering: usize,
    /// Sockets in smoltcp's socket set (all kinds).
    pub sockets_in_use: usize,
    /// UDP sockets.
    pub udp_sockets: usize,
    /// Connections accepted.
    pub tcp_accepted: u64,
    /// Outgoing connections started.
    pub tcp_connects: u64,
    /// smoltcp sockets removed after their connection ended.
    pub tcp_reclaimed: u64,
    /// Closed connections reset because the linger time ran out.
    pub tcp_linger_aborts: u64,
    /// Retransmitted SYNs dropped because a connection for them already exists.
    pub tcp_duplicate_syns_dropped: u64,
    /// Sockets not created because the heap could not give their buffers (a listener's spare
    /// sockets, retried at the next poll, or [`NetStack::tcp_connect`] failing).
    pub tcp_buffer_allocation_failures: u64,
    /// DHCP leases obtained.
    pub dhcp_leases: u64,
    /// Gratuitous ARP / unsolicited NA frames sent.
    pub announcement_frames: u64,
    /// ARP requests / neighbour solicitations for the default gateways sent with the
    /// announcements.
    pub gateway_solicitations: u64,
    /// Time spent receiving, on the platform's clock: taking frames from the NICs (checks,
    /// duplicate window, coalescing) and smoltcp's processing of them. Divided by the frames
    /// the drivers delivered it is the receive cost per frame.
    pub receive_ns: u64,
    /// The part of `receive_ns` spent before smoltcp: device reads, the bond's checks, the
    /// duplicate window, coalescing, the copies into the receive queue.
    pub receive_device_ns: u64,
    /// Time in smoltcp's egress (while receiving bulk data: the ACKs) and the transmit flush.
    pub egress_ns: u64,
    /// Time [`NetStack::wait`] slept (waiting for an interrupt or a deadline).
    pub idle_ns: u64,
}

/// The network stack. See the module documentation.
pub struct NetStack {
    platform: Box<dyn Platform>,
    config: NetConfig,
    options: StackOptions,
    /// Boxed: with IPv4 fragmentation its buffers make it ~64 KiB, too much to move around on
    /// the kernel's boot stack.
    iface: Box<Interface>,
    sockets: SocketSet<'static>,
    bond: Bond,
    dhcp: Option<SocketHandle>,
    /// A DHCP lease is in effect.
    dhcp_bound: bool,
    dns: Vec<IpAddress>,
    listeners: Slab<Listener>,
    streams: Slab<Stream>,
    udp: Slab<UdpEntry>,
    lingering: Vec<Lingering>,
    next_port: u16,
    polls: u64,
    /// A raw burst since the last poll queued frames: its sender wants to go on as soon as the
    /// ring has room, which may be at once (no interrupt would say so).
    raw_burst_progressed: bool,
    counters: StackCounters,
}

fn instant(now_ns: u64) -> Instant {
    Instant::from_micros(i64::try_from(now_ns / 1_000).unwrap_or(i64::MAX))
}

/// The EUI-64 link-local address for `mac` (RFC 4291 appendix A, RFC 2464 §5).
pub fn link_local_address(mac: MacAddress) -> Ipv6Address {
    let m = mac.0;
    Ipv6Address::new(
        0xfe80,
        0,
        0,
        0,
        u16::from_be_bytes([m[0] ^ 0x02, m[1]]),
        u16::from_be_bytes([m[2], 0xff]),
        u16::from_be_bytes([0xfe, m[3]]),
        u16::from_be_bytes([m[4], m[5]]),
    )
}

/// A zeroed buffer of `len` bytes, or `None` when the heap cannot give it (a socket's buffers
/// are its largest allocation; running out must refuse the connection, not stop the kernel).
fn socket_buffer(len: usize) -> Option<Vec<u8>> {
    let mut buffer = Vec::new();
    buffer.try_reserve_exact(len).ok()?;
    buffer.resize(len, 0);
    Some(buffer)
}

/// A TCP socket with `options`' buffers; `Err` with the bytes asked for when memory is short.
fn new_tcp_socket(options: &TcpOptions) -> core::result::Result<tcp::Socket<'static>, usize> {
    let (rx_len, tx_len) = (options.rx_buffer.max(1), options.tx_buffer.max(1));
    let (Some(rx), Some(tx)) = (socket_buffer(rx_len), socket_buffer(tx_len)) else {
        return Err(rx_len + tx_len);
    };
    let mut socket = tcp::Socket::new(tcp::SocketBuffer::new(rx), tcp::SocketBuffer::new(tx));
    socket.set_nagle_enabled(!options.nodelay);
    socket.set_ack_delay(None);
    socket.set_congestion_control(tcp::CongestionControl::Reno);
    socket.set_keep_alive(options.keep_alive_ms.map(Duration::from_millis));
    socket.set_timeout(options.timeout_ms.map(Duration::from_millis));
    Ok(socket)
}

/// Source endpoint and destination port of a TCP SYN (without ACK) frame.
fn tcp_syn(frame: &[u8]) -> Option<(IpEndpoint, u16)> {
    let ethernet = EthernetFrame::new_checked(frame).ok()?;
    let (source, tcp_bytes) = match ethernet.ethertype() {
        EthernetProtocol::Ipv4 => {
            let ip = Ipv4Packet::new_checked(ethernet.payload()).ok()?;
            if ip.next_header() != IpProtocol::Tcp || ip.frag_offset() != 0 {
                return None;
            }
            (IpAddress::Ipv4(ip.src_addr()), ip.payload())
        }
        EthernetProtocol::Ipv6 => {
            let ip = Ipv6Packet::new_checked(ethernet.payload()).ok()?;
            if ip.next_header() != IpProtocol::Tcp {
                return None;
            }
            (IpAddress::Ipv6(ip.src_addr()), ip.payload())
        }
        _ => return None,
    };
    let tcp = TcpPacket::new_checked(tcp_bytes).ok()?;
    (tcp.syn() && !tcp.ack()).then(|| (IpEndpoint::new(source, tcp.src_port()), tcp.dst_port()))
}

fn release_origin(listeners: &mut Slab<Listener>, origin: Option<Key>) {
    if let Some(listener) = origin.and_then(|key| listeners.get_mut(key)) {
        listener.open = listener.open.saturating_sub(1);
    }
}

/// Tops up a listener's pool of listening sockets.
fn replenish(
    listener: &mut Listener,
    sockets: &mut SocketSet<'static>,
    counters: &mut StackCounters,
) {
    let mut spare = listener
        .pending
        .iter()
        .filter(|handle| sockets.get::<tcp::Socket>(**handle).state() == TcpState::Listen)
        .count();
    while spare < listener.options.spare_listeners
        && listener.open < listener.options.max_connections
    {
        let mut socket = match new_tcp_socket(&listener.options) {
            Ok(socket) => socket,
            Err(bytes) => {
                // Retried at the next poll; until then SYNs beyond the spares left are refused.
                counters.tcp_buffer_allocation_failures += 1;
                if counters.tcp_buffer_allocation_failures.is_power_of_two() {
                    log::warn!(
                        "net: no memory for a {bytes}-byte socket on tcp port {}; {} such failures so far",
                        listener.port,
                        counters.tcp_buffer_allocation_failures
                    );
                }
                break;
            }
        };
        socket.set_timeout(Some(Duration::from_millis(HANDSHAKE_TIMEOUT_MS)));
        if let Err(error) = socket.listen(listener.port) {
            log::error!("net: cannot listen on tcp port {}: {error}", listener.port);
            return;
        }
        listener.pending.push(sockets.add(socket));
        listener.open += 1;
        spare += 1;
    }
    let at_limit = spare == 0;
    if at_limit && !listener.at_limit {
        log::warn!(
            "net: tcp port {} reached its limit of {} connections; new SYNs are refused",
            listener.port,
            listener.options.max_connections
        );
    }
    listener.at_limit = at_limit;
}

impl NetStack {
    /// Builds the stack over the synthetic NIC (whose MAC becomes the interface MAC) with
    /// default options.
    pub fn new(
        config: NetConfig,
        synthetic: Box<dyn NetDevice>,
        platform: Box<dyn Platform>,
    ) -> Result<NetStack> {
        NetStack::with_options(config, synthetic, platform, StackOptions::default())
    }

    /// Builds the stack with explicit options.
    pub fn with_options(
        config: NetConfig,
        synthetic: Box<dyn NetDevice>,
        platform: Box<dyn Platform>,
        options: StackOptions,
    ) -> Result<NetStack> {
        let mac = synthetic.mac_address();
        if !mac.is_valid_unicast() {
            return Err(Error::InvalidMac { mac });
        }
        let device_mtu = synthetic.capabilities().mtu;
        let ip_mtu = match config.mtu {
            Some(mtu) if mtu > device_mtu => {
                log::warn!(
                    "net: mtu={mtu} exceeds what {} supports; using {device_mtu}",
                    synthetic.name()
                );
                device_mtu
            }
            Some(mtu) => mtu,
            None => device_mtu,
        };
        if ip_mtu < MIN_MTU {
            log::warn!("net: MTU {ip_mtu} is below {MIN_MTU}; IPv6 will not work");
        }
        let now_ns = platform.now_ns();
        let seed = platform.random_seed();
        let mut bond = Bond::new(synthetic, ip_mtu, options.bond.clone());
        let mut iface_config = Config::new(HardwareAddress::Ethernet(EthernetAddress(mac.0)));
        iface_config.random_seed = seed;
        let mut iface = Box::new(Interface::new(iface_config, &mut bond, instant(now_ns)));

        let link_local = link_local_address(mac);
        let mut addresses = vec![IpCidr::Ipv6(Ipv6Cidr::new(link_local, 64))];
        if let Ipv4Mode::Static { address, .. } = config.ipv4 {
            addresses.push(IpCidr::Ipv4(address));
        }
        if let Some(ipv6) = config.ipv6 {
            addresses.push(IpCidr::Ipv6(ipv6.address));
        }
        iface.update_ip_addrs(|list| {
            for address in addresses {
                if list.push(address).is_err() {
                    log::error!("net: no room for address {address} on the interface");
                }
            }
        });
        if let Ipv4Mode::Static {
            gateway: Some(gateway),
            ..
        } = config.ipv4
            && iface.routes_mut().add_default_ipv4_route(gateway).is_err()
        {
            log::error!("net: route table full, default route via {gateway} not added");
        }
        if let Some(gateway) = config.ipv6.and_then(|ipv6| ipv6.gateway)
            && iface.routes_mut().add_default_ipv6_route(gateway).is_err()
        {
            log::error!("net: route table full, default route via {gateway} not added");
        }

        let mut sockets = SocketSet::new(Vec::new());
        let dhcp = (config.ipv4 == Ipv4Mode::Dhcp).then(|| sockets.add(dhcpv4::Socket::new()));
        log::info!(
            "net: interface {mac} mtu {ip_mtu} on {}: ipv4 {}, ipv6 {link_local}/64{}",
            bond.synthetic_name(),
            match config.ipv4 {
                Ipv4Mode::Static { address, gateway } => alloc::format!(
                    "{address}{}",
                    gateway.map_or(alloc::string::String::new(), |g| alloc::format!(" via {g}"))
                ),
                Ipv4Mode::Dhcp => "dhcp".into(),
                Ipv4Mode::Off => "off".into(),
            },
            config
                .ipv6
                .map_or(alloc::string::String::new(), |ipv6| alloc::format!(
                    " and {}",
                    ipv6.address
                ))
        );
        // Tell the segment where we are, as Linux does on carrier up.
        bond.request_announce();
        let dns = config.dns.clone();
        Ok(NetStack {
            platform,
            options,
            iface,
            sockets,
            bond,
            dhcp,
            dhcp_bound: false,
            dns,
            listeners: Slab::new(),
            streams: Slab::new(),
            udp: Slab::new(),
            lingering: Vec::new(),
            next_port: FIRST_EPHEMERAL_PORT + (seed % u64::from(EPHEMERAL_PORTS)) as u16,
            polls: 0,
            raw_burst_progressed: false,
            counters: StackCounters::default(),
            config,
        })
    }

    // ----- interface and bond -----

    /// The interface MAC.
    pub fn mac_address(&self) -> MacAddress {
        self.bond.mac()
    }

    /// The IP MTU.
    pub fn ip_mtu(&self) -> usize {
        self.bond.ip_mtu()
    }

    /// The configuration the stack was built with.
    pub fn config(&self) -> &NetConfig {
        &self.config
    }

    /// The current IPv4 address (static or from DHCP).
    pub fn ipv4_address(&self) -> Option<Ipv4Cidr> {
        self.iface.ip_addrs().iter().find_map(|cidr| match cidr {
            IpCidr::Ipv4(cidr) => Some(*cidr),
            IpCidr::Ipv6(_) => None,
        })
    }

    /// All addresses on the interface.
    pub fn ip_addresses(&self) -> Vec<IpCidr> {
        self.iface.ip_addrs().to_vec()
    }

    /// DNS resolvers (command line first, else from DHCP).
    pub fn dns_servers(&self) -> &[IpAddress] {
        &self.dns
    }

    /// The platform's clock.
    pub fn now_ns(&self) -> u64 {
        self.platform.now_ns()
    }

    /// The path transmit uses.
    pub fn active_path(&self) -> PathId {
        self.bond.active_path()
    }

    /// The bond, for inspection.
    pub fn bond(&self) -> &Bond {
        &self.bond
    }

    /// Attaches a VF to the bond (see [`Bond::attach_vf`]).
    pub fn attach_vf(
        &mut self,
        device: Box<dyn NetDevice>,
    ) -> core::result::Result<(), AttachRejected> {
        let now_ns = self.platform.now_ns();
        self.bond.attach_vf(device, now_ns)
    }

    /// Detaches the VF; traffic is on the synthetic path when this returns. The caller stops
    /// and releases the device.
    pub fn detach_vf(&mut self) -> Option<Box<dyn NetDevice>> {
        let now_ns = self.platform.now_ns();
        let device = self.bond.detach_vf(now_ns);
        if device.is_some() && self.bond.take_announce_request() {
            self.announce();
        }
        device
    }

    // ----- event loop -----

    /// Does all pending work: device housekeeping and path selection, received frames,
    /// announcements, transmission, DHCP, socket bookkeeping. Returns true when something
    /// happened (call again before sleeping).
    pub fn poll(&mut self) -> bool {
        self.polls += 1;
        self.raw_burst_progressed = false;
        let now_ns = self.platform.now_ns();
        let now = instant(now_ns);
        let platform = &*self.platform;
        let mut did_work = self.bond.poll_timed(now_ns, &|| platform.now_ns());
        let receiving = self.bond.pending_rx() > 0;
        if receiving {
            let polled_ns = self.platform.now_ns();
            self.counters.receive_device_ns += polled_ns.saturating_sub(now_ns);
        }
        if self.bond.take_announce_request() {
            self.announce();
            did_work = true;
        }
        self.iface.poll_maintenance(now);

        let mut budget = self.options.ingress_budget;
        while budget > 0 && self.bond.pending_rx() > 0 {
            budget -= 1;
            if self
                .bond
                .peek_rx()
                .and_then(tcp_syn)
                .is_some_and(|syn| self.is_duplicate_syn(syn))
            {
                if let Some(frame) = self.bond.pop_rx() {
                    self.bond.recycle_rx(frame);
                }
                self.counters.tcp_duplicate_syns += 1;
                did_work = true;
                continue;
            }
            match self
                .iface
                .poll_ingress_single(now, &mut self.bond, &mut self.sockets)
            {
                PollIngressSingleResult::None => break,
                PollIngressSingleResult::PacketProcessed => did_work = true,
                PollIngressSingleResult::SocketStateChanged => {
                    did_work = true;
                    // A listening socket may just have taken a SYN: keep the pool topped up
                    // before the next SYN in this batch.
                    let NetStack {
                        listeners,
                        sockets,
                        counters,
                        ..
                    } = self;
                    for listener in listeners.values_mut() {
                        replenish(listener, sockets, counters);
                    }
                }
            }
        }

        let received_ns = self.platform.now_ns();
        if receiving {
            // From the start of this poll: the bond's device reads, then smoltcp's ingress.
            self.counters.receive_ns += received_ns.saturating_sub(now_ns);
        }
        while self
            .iface
            .poll_egress(now, &mut self.bond, &mut self.sockets)
            == PollResult::SocketStateChanged
        {
            did_work = true;
        }
        self.bond.flush();
        self.counters.egress_ns += self.platform.now_ns().saturating_sub(received_ns);
        did_work |= self.process_dhcp();
        did_work |= self.maintain_sockets(now_ns);
        did_work
    }

    /// When the stack next needs [`NetStack::poll`] without an interrupt (`Some(now)` or earlier
    /// = at once).
    pub fn next_wakeup_ns(&mut self) -> Option<u64> {
        let now_ns = self.platform.now_ns();
        if self.bond.pending_rx() > 0
            || self.bond.has_pending_transmit()
            || self.raw_burst_progressed
            || self.lingering.iter().any(|l| l.aborted_at_poll.is_some())
        {
            return Some(now_ns);
        }
        // With no usable path smoltcp wants to send "now" forever; sleep until the bond's
        // deadline or an interrupt (a link coming back) instead of spinning.
        let smoltcp = if self.bond.has_usable_path() {
            self.iface
                .poll_delay(instant(now_ns), &self.sockets)
                .map(|delay| now_ns.saturating_add(delay.total_micros() * 1_000))
        } else {
            None
        };
        let linger = self.lingering.iter().map(|l| l.deadline_ns).min();
        [smoltcp, self.bond.next_deadline_ns(), linger]
            .into_iter()
            .flatten()
            .min()
    }

    /// Sleeps until an interrupt or the next deadline (returns at once when work is due).
    pub fn wait(&mut self) {
        let deadline = self.next_wakeup_ns();
        self.sleep(deadline);
    }

    /// Like [`NetStack::wait`], but wakes by `deadline_ns` at the latest (an app's own timer,
    /// e.g. pacing). Apps sleep through this rather than the platform directly: drivers mask
    /// their interrupts while they are polled and unmask them only here.
    pub fn wait_until(&mut self, deadline_ns: u64) {
        let deadline = self
            .next_wakeup_ns()
            .map_or(deadline_ns, |next| next.min(deadline_ns));
        self.sleep(Some(deadline));
    }

    fn sleep(&mut self, deadline: Option<u64>) {
        if deadline.is_some_and(|deadline| deadline <= self.platform.now_ns()) {
            return;
        }
        if self.bond.arm_interrupts() {
            return;
        }
        let started_ns = self.platform.now_ns();
        self.platform.wait_for_event(deadline);
        self.counters.idle_ns += self.platform.now_ns().saturating_sub(started_ns);
    }

    /// Runs the event loop: poll, then `app`, then wait when nothing happened; until `app`
    /// breaks with an exit code.
    pub fn run(&mut self, mut app: impl FnMut(&mut NetStack) -> ControlFlow<i32>) -> i32 {
        loop {
            let did_work = self.poll();
            if let ControlFlow::Break(code) = app(self) {
                return code;
            }
            if !did_work {
                self.wait();
            }
        }
    }

    // ----- TCP -----

    /// Listens on `port` with the stack's default TCP options.
    pub fn tcp_listen(&mut self, port: u16) -> Result<TcpListener> {
        let options = self.options.tcp;
        self.tcp_listen_with(port, options)
    }

    /// Listens on `port` with the given options.
    pub fn tcp_listen_with(&mut self, port: u16, options: TcpOptions) -> Result<TcpListener> {
        if port == 0 {
            return Err(Error::InvalidPort);
        }
        if self
            .listeners
            .values()
            .any(|listener| listener.port == port)
        {
            return Err(Error::AddressInUse { port });
        }
        let mut listener = Listener {
            port,
            options,
            pending: Vec::new(),
            ready: VecDeque::new(),
            open: 0,
            at_limit: false,
        };
        replenish(&mut listener, &mut self.sockets, &mut self.counters);
        log::info!(
            "net: listening on tcp port {port} ({} spare sockets, up to {} connections, buffers {}/{} bytes)",
            options.spare_listeners,
            options.max_connections,
            options.rx_buffer,
            options.tx_buffer
        );
        Ok(TcpListener {
            key: self.listeners.insert(listener),
            port,
        })
    }

    /// Changes the options of `listener`'s future connections. Its spare listening sockets
    /// (no SYN taken yet) are replaced at once, so the next SYN already gets the new buffer
    /// sizes (the window and window scale a connection offers are fixed by its SYN-ACK);
    /// connections in the handshake, waiting for `accept` or accepted keep theirs.
    pub fn set_listener_options(
        &mut self,
        listener: &TcpListener,
        options: TcpOptions,
    ) -> Result<()> {
        let NetStack {
            listeners,
            sockets,
            counters,
            ..
        } = self;
        let entry = listeners
            .get_mut(listener.key)
            .ok_or(Error::InvalidHandle)?;
        if entry.options == options {
            return Ok(());
        }
        entry.options = options;
        entry.pending.retain(|handle| {
            if sockets.get::<tcp::Socket>(*handle).state() == TcpState::Listen {
                // Freed before its replacement is allocated: the old buffers may be large.
                sockets.remove(*handle);
                entry.open = entry.open.saturating_sub(1);
                false
            } else {
                true
            }
        });
        replenish(entry, sockets, counters);
        log::debug!(
            "net: tcp port {}: new connections get buffers {}/{} bytes, {} spare sockets",
            listener.port,
            options.rx_buffer,
            options.tx_buffer,
            options.spare_listeners
        );
        Ok(())
    }

    /// Stops listening. Connections already accepted are unaffected; those not yet accepted
    /// are reset.
    pub fn tcp_unlisten(&mut self, listener: TcpListener) {
        let Some(entry) = self.listeners.remove(listener.key) else {
            return;
        };
        let deadline_ns = self.platform.now_ns();
        for handle in entry.pending.into_iter().chain(entry.ready) {
            let socket = self.sockets.get_mut::<tcp::Socket>(handle);
            if socket.state() == TcpState::Listen {
                self.sockets.remove(handle);
            } else {
                socket.abort();
                self.lingering.push(Lingering {
                    socket: handle,
                    origin: None,
                    deadline_ns,
                    aborted_at_poll: Some(self.polls),
                });
            }
        }
        log::info!("net: stopped listening on tcp port {}", listener.port);
    }

    /// The next established connection on `listener`, if any.
    pub fn accept(&mut self, listener: &TcpListener) -> Option<TcpStream> {
        let NetStack {
            listeners,
            sockets,
            streams,
            counters,
            ..
        } = self;
        let entry = listeners.get_mut(listener.key)?;
        while let Some(handle) = entry.ready.pop_front() {
            let state = sockets.get::<tcp::Socket>(handle).state();
            if state == TcpState::Closed {
                sockets.remove(handle);
                entry.open = entry.open.saturating_sub(1);
                counters.tcp_reclaimed += 1;
                continue;
            }
            counters.tcp_accepted += 1;
            let key = streams.insert(Stream::Live {
                socket: handle,
                origin: Some(listener.key),
            });
            return Some(TcpStream { key });
        }
        None
    }

    /// Opens a connection to `remote` with the default TCP options. The stream is usable at
    /// once; writes are accepted (queued) when the handshake completes (`can_write`).
    pub fn tcp_connect(&mut self, remote: IpEndpoint) -> Result<TcpStream> {
        let options = self.options.tcp;
        self.tcp_connect_with(remote, options)
    }

    /// Opens a connection with the given options.
    pub fn tcp_connect_with(
        &mut self,
        remote: IpEndpoint,
        options: TcpOptions,
    ) -> Result<TcpStream> {
        let local_port = self.allocate_port(|socket| match socket {
            Socket::Tcp(tcp) => tcp.local_endpoint().map(|endpoint| endpoint.port),
            _ => None,
        })?;
        let mut socket = new_tcp_socket(&options).map_err(|bytes| {
            self.counters.tcp_buffer_allocation_failures += 1;
            Error::OutOfMemory {
                what: "TCP socket buffers",
                bytes,
            }
        })?;
        socket
            .connect(self.iface.context(), remote, local_port)
            .map_err(|_| Error::Unaddressable { endpoint: remote })?;
        let handle = self.sockets.add(socket);
        self.counters.tcp_connects += 1;
        Ok(TcpStream {
            key: self.streams.insert(Stream::Live {
                socket: handle,
                origin: None,
            }),
        })
    }

    fn live_socket(&self, stream: &TcpStream) -> Result<core::result::Result<SocketHandle, bool>> {
        match self.streams.get(stream.key) {
            None => Err(Error::InvalidHandle),
            Some(Stream::Live { socket, .. }) => Ok(Ok(*socket)),
            Some(Stream::Reclaimed { peer_finished }) => Ok(Err(*peer_finished)),
        }
    }

    fn ended(peer_finished: bool) -> Error {
        if peer_finished {
            Error::PeerClosed
        } else {
            Error::Closed
        }
    }

    /// Reads received data. `Ok(0)`: nothing available now (or `buffer` is empty);
    /// `Err(PeerClosed)`: end of stream; `Err(Closed)`: the connection is gone.
    pub fn tcp_read(&mut self, stream: &TcpStream, buffer: &mut [u8]) -> Result<usize> {
        let handle = match self.live_socket(stream)? {
            Ok(handle) => handle,
            Err(peer_finished) => return Err(Self::ended(peer_finished)),
        };
        let socket = self.sockets.get_mut::<tcp::Socket>(handle);
        match socket.recv_slice(buffer) {
            Ok(read) => Ok(read),
            Err(tcp::RecvError::Finished) => Err(Error::PeerClosed),
            Err(tcp::RecvError::InvalidState) => match socket.state() {
                TcpState::SynSent | TcpState::SynReceived => Ok(0),
                _ => Err(Error::Closed),
            },
        }
    }

    /// Lends received data in place, without copying it out: `consume` sees the oldest
    /// received bytes (a contiguous part of them; call again for more) and returns how many of
    /// them it used, which are then gone from the stream. Returns that count; `Ok(0)` and the
    /// errors as [`NetStack::tcp_read`]. For applications that parse, checksum or discard data
    /// where it lies: each copy of a received byte costs as much as the rest of receiving it
    /// under an emulated CPU.
    pub fn tcp_read_with(
        &mut self,
        stream: &TcpStream,
        consume: impl FnOnce(&[u8]) -> usize,
    ) -> Result<usize> {
        let handle = match self.live_socket(stream)? {
            Ok(handle) => handle,
            Err(peer_finished) => return Err(Self::ended(peer_finished)),
        };
        let socket = self.sockets.get_mut::<tcp::Socket>(handle);
        let result = socket.recv(|data| {
            let used = consume(data).min(data.len());
            (used, used)
        });
        match result {
            Ok(used) => Ok(used),
            Err(tcp::RecvError::Finished) => Err(Error::PeerClosed),
            Err(tcp::RecvError::InvalidState) => match socket.state() {
                TcpState::SynSent | TcpState::SynReceived => Ok(0),
                _ => Err(Error::Closed),
            },
        }
    }

    /// Queues data for sending; returns how much was taken (`Ok(0)` when the buffer is full or
    /// the handshake is still in progress). `Err(Closed)` once sending is no longer possible.
    pub fn tcp_write(&mut self, stream: &TcpStream, data: &[u8]) -> Result<usize> {
        let handle = match self.live_socket(stream)? {
            Ok(handle) => handle,
            Err(_) => return Err(Error::Closed),
        };
        let socket = self.sockets.get_mut::<tcp::Socket>(handle);
        match socket.send_slice(data) {
            Ok(written) => Ok(written),
            Err(tcp::SendError::InvalidState) => match socket.state() {
                TcpState::SynSent | TcpState::SynReceived => Ok(0),
                _ => Err(Error::Closed),
            },
        }
    }

    /// Sends FIN after the queued data (half close); reading stays possible.
    pub fn tcp_shutdown(&mut self, stream: &TcpStream) -> Result<()> {
        match self.live_socket(stream)? {
            Ok(handle) => {
                self.sockets.get_mut::<tcp::Socket>(handle).close();
                Ok(())
            }
            Err(_) => Ok(()),
        }
    }

    /// Closes the connection gracefully: queued data and a FIN are still delivered (for up to
    /// `close_linger_ns`, then the connection is reset), data arriving afterwards is discarded.
    pub fn tcp_close(&mut self, stream: TcpStream) {
        let Some(Stream::Live {
            socket: handle,
            origin,
        }) = self.streams.remove(stream.key)
        else {
            return;
        };
        let socket = self.sockets.get_mut::<tcp::Socket>(handle);
        if socket.state() == TcpState::Closed {
            self.sockets.remove(handle);
            release_origin(&mut self.listeners, origin);
            self.counters.tcp_reclaimed += 1;
            return;
        }
        socket.close();
        let deadline_ns = self
            .platform
            .now_ns()
            .saturating_add(self.options.close_linger_ns);
        self.lingering.push(Lingering {
            socket: handle,
            origin,
            deadline_ns,
            aborted_at_poll: None,
        });
    }

    /// Resets the connection (RST) and releases it.
    pub fn tcp_abort(&mut self, stream: TcpStream) {
        let Some(Stream::Live {
            socket: handle,
            origin,
        }) = self.streams.remove(stream.key)
        else {
            return;
        };
        self.sockets.get_mut::<tcp::Socket>(handle).abort();
        self.lingering.push(Lingering {
            socket: handle,
            origin,
            deadline_ns: self.platform.now_ns(),
            aborted_at_poll: Some(self.polls),
        });
    }

    /// True when [`NetStack::tcp_read`] would return data or an end-of-stream/closed error.
    pub fn can_read(&self, stream: &TcpStream) -> bool {
        match self.live_socket(stream) {
            Ok(Ok(handle)) => {
                let socket = self.sockets.get::<tcp::Socket>(handle);
                socket.can_recv()
                    || (!socket.may_recv()
                        && !matches!(socket.state(), TcpState::SynSent | TcpState::SynReceived))
            }
            Ok(Err(_)) | Err(_) => true,
        }
    }

    /// True when [`NetStack::tcp_write`] would take at least one byte.
    pub fn can_write(&self, stream: &TcpStream) -> bool {
        match self.live_socket(stream) {
            Ok(Ok(handle)) => self.sockets.get::<tcp::Socket>(handle).can_send(),
            _ => false,
        }
    }

    /// Bytes queued for sending and not yet acknowledged by the peer.
    pub fn send_queue_len(&self, stream: &TcpStream) -> usize {
        match self.live_socket(stream) {
            Ok(Ok(handle)) => self.sockets.get::<tcp::Socket>(handle).send_queue(),
            _ => 0,
        }
    }

    /// Bytes received and not yet read.
    pub fn recv_queue_len(&self, stream: &TcpStream) -> usize {
        match self.live_socket(stream) {
            Ok(Ok(handle)) => self.sockets.get::<tcp::Socket>(handle).recv_queue(),
            _ => 0,
        }
    }

    /// The TCP state (`Closed` once the connection ended); `None` for an invalid handle.
    pub fn tcp_state(&self, stream: &TcpStream) -> Option<TcpState> {
        match self.live_socket(stream) {
            Ok(Ok(handle)) => Some(self.sockets.get::<tcp::Socket>(handle).state()),
            Ok(Err(_)) => Some(TcpState::Closed),
            Err(_) => None,
        }
    }

    /// The peer's address and port.
    pub fn tcp_remote_endpoint(&self, stream: &TcpStream) -> Option<IpEndpoint> {
        match self.live_socket(stream) {
            Ok(Ok(handle)) => self.sockets.get::<tcp::Socket>(handle).remote_endpoint(),
            _ => None,
        }
    }

    /// Turns Nagle's algorithm off (`true`) or on.
    pub fn set_nodelay(&mut self, stream: &TcpStream, nodelay: bool) -> Result<()> {
        match self.live_socket(stream)? {
            Ok(handle) => {
                self.sockets
                    .get_mut::<tcp::Socket>(handle)
                    .set_nagle_enabled(!nodelay);
                Ok(())
            }
            Err(_) => Err(Error::Closed),
        }
    }

    // ----- UDP -----

    /// Binds a UDP socket to `port` (0 = an ephemeral port).
    pub fn udp_bind(&mut self, port: u16) -> Result<UdpSocket> {
        let port = if port == 0 {
            self.allocate_port(|socket| match socket {
                Socket::Udp(udp) => Some(udp.endpoint().port),
                _ => None,
            })?
        } else {
            if self.udp.values().any(|entry| entry.port == port) {
                return Err(Error::AddressInUse { port });
            }
            port
        };
        let options = self.options.udp;
        let rx = udp::PacketBuffer::new(
            vec![udp::PacketMetadata::EMPTY; options.rx_datagrams.max(1)],
            vec![0u8; options.rx_payload_bytes.max(1)],
        );
        let tx = udp::PacketBuffer::new(
            vec![udp::PacketMetadata::EMPTY; options.tx_datagrams.max(1)],
            vec![0u8; options.tx_payload_bytes.max(1)],
        );
        let mut socket = udp::Socket::new(rx, tx);
        socket.bind(port).map_err(|_| Error::InvalidPort)?;
        let handle = self.sockets.add(socket);
        Ok(UdpSocket {
            key: self.udp.insert(UdpEntry {
                socket: handle,
                port,
            }),
            port,
        })
    }

    fn udp_handle(&self, socket: &UdpSocket) -> Result<SocketHandle> {
        self.udp
            .get(socket.key)
            .map(|entry| entry.socket)
            .ok_or(Error::InvalidHandle)
    }

    /// Largest UDP payload to `remote`: a whole IPv4 datagram (sent as fragments when it
    /// exceeds the MTU, as stock tools expect), or what fits one IPv6 packet (no IPv6
    /// fragmentation).
    pub fn udp_max_payload(&self, remote: &IpEndpoint) -> usize {
        let (packet_limit, ip_header) = match remote.addr {
            IpAddress::Ipv4(_) => (MAX_IPV4_PACKET, IPV4_HEADER_LEN),
            IpAddress::Ipv6(_) => (self.bond.ip_mtu(), IPV6_HEADER_LEN),
        };
        packet_limit
            .saturating_sub(ip_header + UDP_HEADER_LEN)
            .min(self.options.udp.tx_payload_bytes)
    }

    /// Queues one datagram to `remote`. `Err(WouldBlock)` when the transmit queue is full.
    pub fn udp_send_to(
        &mut self,
        socket: &UdpSocket,
        data: &[u8],
        remote: IpEndpoint,
    ) -> Result<()> {
        let handle = self.udp_handle(socket)?;
        let max = self.udp_max_payload(&remote);
        if data.len() > max {
            return Err(Error::DatagramTooLarge {
                len: data.len(),
                max,
            });
        }
        match self
            .sockets
            .get_mut::<udp::Socket>(handle)
            .send_slice(data, remote)
        {
            Ok(()) => Ok(()),
            Err(udp::SendError::BufferFull) => Err(Error::WouldBlock),
            Err(udp::SendError::Unaddressable) => Err(Error::Unaddressable { endpoint: remote }),
        }
    }

    /// Takes one received datagram: `Ok(None)` when none is waiting. A datagram longer than
    /// `buffer` is consumed and reported as `Err(Truncated)` (its head is in `buffer`).
    pub fn udp_recv_from(
        &mut self,
        socket: &UdpSocket,
        buffer: &mut [u8],
    ) -> Result<Option<(usize, IpEndpoint)>> {
        let handle = self.udp_handle(socket)?;
        let socket = self.sockets.get_mut::<udp::Socket>(handle);
        let (payload, metadata) = match socket.recv() {
            Ok(received) => received,
            Err(_) => return Ok(None),
        };
        let copy = payload.len().min(buffer.len());
        buffer[..copy].copy_from_slice(&payload[..copy]);
        if copy < payload.len() {
            return Err(Error::Truncated {
                datagram_len: payload.len(),
                buffer_len: buffer.len(),
            });
        }
        Ok(Some((copy, metadata.endpoint)))
    }

    /// True when a datagram is waiting.
    pub fn udp_can_recv(&self, socket: &UdpSocket) -> bool {
        self.udp_handle(socket)
            .is_ok_and(|handle| self.sockets.get::<udp::Socket>(handle).can_recv())
    }

    /// True when the transmit queue has room for at least one more datagram.
    pub fn udp_can_send(&self, socket: &UdpSocket) -> bool {
        self.udp_handle(socket)
            .is_ok_and(|handle| self.sockets.get::<udp::Socket>(handle).can_send())
    }

    /// Closes the socket (queued, unsent datagrams are dropped).
    pub fn udp_close(&mut self, socket: UdpSocket) {
        if let Some(entry) = self.udp.remove(socket.key) {
            self.sockets.remove(entry.socket);
        }
    }

    // ----- counters -----

    /// Queues up to `max` copies of the pre-built Ethernet `frame` on the active path, as
    /// many as its transmit ring takes now, and rings the doorbell once. Returns how many were
    /// queued. The frames bypass smoltcp: this measures what the path itself can carry (the
    /// raw-frame ceiling the stack's throughput is compared with).
    pub fn transmit_raw_burst(&mut self, frame: &[u8], max: usize) -> Result<usize> {
        let largest = self.ip_mtu() + ETHERNET_HEADER_LEN;
        if frame.len() < ETHERNET_HEADER_LEN || frame.len() > largest {
            return Err(Error::DatagramTooLarge {
                len: frame.len(),
                max: largest,
            });
        }
        let mut sent = 0;
        while sent < max && self.bond.can_transmit() && self.bond.send_frame(frame) {
            sent += 1;
        }
        self.bond.flush();
        // A ring that took frames may have room again right after the doorbell (the device is
        // quick, or `flush` reclaimed): don't sleep on it. A ring that took none arms its
        // completion interrupt, which wakes the loop.
        self.raw_burst_progressed |= sent > 0;
        Ok(sent)
    }

    /// Counters.
    pub fn stats(&self) -> NetStats {
        NetStats {
            bond: self.bond.stats(),
            tcp_listeners: self.listeners.len(),
            tcp_streams: self.streams.len(),
            tcp_lingering: self.lingering.len(),
            sockets_in_use: self.sockets.iter().count(),
            udp_sockets: self.udp.len(),
            tcp_accepted: self.counters.tcp_accepted,
            tcp_connects: self.counters.tcp_connects,
            tcp_reclaimed: self.counters.tcp_reclaimed,
            tcp_linger_aborts: self.counters.tcp_linger_aborts,
            tcp_duplicate_syns_dropped: self.counters.tcp_duplicate_syns,
            tcp_buffer_allocation_failures: self.counters.tcp_buffer_allocation_failures,
            dhcp_leases: self.counters.dhcp_leases,
            announcement_frames: self.counters.announcement_frames,
            gateway_solicitations: self.counters.gateway_solicitations,
            receive_ns: self.counters.receive_ns,
            receive_device_ns: self.counters.receive_device_ns,
            egress_ns: self.counters.egress_ns,
            idle_ns: self.counters.idle_ns,
        }
    }

    /// Logs the counters (info level), a few lines.
    pub fn log_summary(&self) {
        let stats = self.stats();
        let bond = &stats.bond;
        log::info!(
            "net: active path {}; switches to vf {}, to synthetic {}; hold-down {} ms; vf attached {} / detached {}",
            bond.active,
            bond.switches_to_vf,
            bond.switches_to_synthetic,
            bond.hold_down_ns / NS_PER_MS,
            bond.vf_attaches,
            bond.vf_detaches
        );
        let paths = [
            ("synthetic", Some(&bond.synthetic)),
            ("vf", bond.vf.as_ref()),
            ("vf (retired)", Some(&bond.vf_retired)),
            ("total", Some(&bond.total)),
        ];
        for (name, path) in paths {
            let Some(path) = path else { continue };
            log::info!(
                "net: {name}: rx {} frames {} bytes, tx {} frames {} bytes, tx errors {}, duplicates {}, bad {}, ignored {}; driver rx {} tx {} bad {} ring-full {} irq {}",
                path.bond.rx_frames,
                path.bond.rx_bytes,
                path.bond.tx_frames,
                path.bond.tx_bytes,
                path.bond.tx_errors,
                path.bond.rx_duplicates,
                path.bond.rx_bad,
                path.bond.rx_ignored,
                path.device.rx_frames,
                path.device.tx_frames,
                path.device.rx_dropped_bad,
                path.device.tx_ring_full,
                path.device.interrupts
            );
        }
        log::info!(
            "net: dropped: no path {}, duplicates {}, bad frames {}, dedup evictions {}; announcements {} frames, gateway solicitations {}",
            bond.tx_dropped_no_path,
            bond.duplicates_dropped,
            bond.bad_frames_dropped,
            bond.dedup_evictions,
            stats.announcement_frames,
            stats.gateway_solicitations
        );
        let coalesce = &bond.coalesce;
        log::info!(
            "net: rx coalescing: {} segments merged into {} frames; not merged: flags {}, no payload {}, out of order {}, ip options {}, header {}, tcp options {}, size {}, memory {}, malformed {}, vlan {}, evictions {}",
            coalesce.segments_merged,
            coalesce.merged_frames,
            coalesce.refused_flags,
            coalesce.refused_no_payload,
            coalesce.refused_out_of_order,
            coalesce.refused_ip_options,
            coalesce.refused_header_mismatch,
            coalesce.refused_tcp_options,
            coalesce.refused_size,
            coalesce.refused_memory,
            coalesce.refused_malformed,
            coalesce.vlan_passed,
            coalesce.flow_evictions
        );
        log::info!(
            "net: tcp listeners {}, streams {}, lingering {}, accepted {}, connects {}, reclaimed {}, linger resets {}, duplicate SYNs {}, buffer allocation failures {}; udp sockets {}; smoltcp sockets {}; dhcp leases {}",
            stats.tcp_listeners,
            stats.tcp_streams,
            stats.tcp_lingering,
            stats.tcp_accepted,
            stats.tcp_connects,
            stats.tcp_reclaimed,
            stats.tcp_linger_aborts,
            stats.tcp_duplicate_syns_dropped,
            stats.tcp_buffer_allocation_failures,
            stats.udp_sockets,
            stats.sockets_in_use,
            stats.dhcp_leases
        );
    }

    // ----- internals -----

    /// Picks an ephemeral port that no socket of the kind `port_of` recognises uses.
    fn allocate_port(&mut self, port_of: impl Fn(&Socket) -> Option<u16>) -> Result<u16> {
        for _ in 0..EPHEMERAL_PORTS {
            let port = self.next_port;
            self.next_port = if port == u16::MAX {
                FIRST_EPHEMERAL_PORT
            } else {
                port + 1
            };
            let in_use = self
                .sockets
                .iter()
                .any(|(_, socket)| port_of(socket) == Some(port))
                || self
                    .listeners
                    .values()
                    .any(|listener| listener.port == port);
            if !in_use {
                return Ok(port);
            }
        }
        Err(Error::NoEphemeralPort)
    }

    /// True when a SYN from `source` to `port` belongs to a connection that already exists
    /// (a retransmitted SYN). smoltcp hands a SYN to the first socket that accepts it, and a
    /// spare listening socket may come before the existing connection: it would open a second,
    /// conflicting connection for the same 4-tuple.
    fn is_duplicate_syn(&self, (source, port): (IpEndpoint, u16)) -> bool {
        self.sockets.iter().any(|(_, socket)| match socket {
            Socket::Tcp(tcp) => {
                matches!(tcp.state(), TcpState::SynReceived | TcpState::Established)
                    && tcp.remote_endpoint() == Some(source)
                    && tcp.local_endpoint().map(|local| local.port) == Some(port)
            }
            _ => false,
        })
    }

    /// Sends an ARP request / neighbour solicitation for each default gateway, then a
    /// gratuitous ARP / unsolicited NA for every address, out of the active path.
    fn announce(&mut self) {
        let mac = self.bond.mac();
        // The gateways first. smoltcp answers a peer it has no neighbour entry for (a ping, a
        // SYN) only after resolving it, and drops that first answer meanwhile; a host learns our
        // MAC from these requests or the announcements and may talk to us at once. Asked before
        // the announcements, the gateway has queued its reply ahead of anything it sends us.
        // After a migration the gateway may also sit behind a different MAC.
        let gateways = self.gateway_solicitation_frames(mac);
        let mut asked = 0;
        for frame in &gateways {
            if self.bond.send_frame(frame) {
                asked += 1;
            }
        }
        let addresses = self.iface.ip_addrs().to_vec();
        let mut sent = 0;
        for cidr in &addresses {
            let frame = match cidr.address() {
                IpAddress::Ipv4(address) => gratuitous_arp(mac, address),
                IpAddress::Ipv6(address) => unsolicited_neighbor_advertisement(mac, address),
            };
            if self.bond.send_frame(&frame) {
                sent += 1;
            }
        }
        self.bond.flush();
        self.counters.announcement_frames += sent;
        self.counters.gateway_solicitations += asked;
        let asked = if gateways.is_empty() {
            alloc::string::String::new()
        } else {
            alloc::format!(" and asked for {asked} of {} gateways", gateways.len())
        };
        log::info!(
            "net: announced {sent} of {} addresses{asked} on the {} path",
            addresses.len(),
            self.bond.active_path()
        );
    }

    /// An ARP request / neighbour solicitation for each default gateway, from the address we
    /// would reach it with.
    fn gateway_solicitation_frames(&self, mac: MacAddress) -> Vec<Vec<u8>> {
        let routes = self.iface.routes();
        let mut frames = Vec::new();
        if let Some(IpAddress::Ipv4(gateway)) = routes
            .get_default_ipv4_route()
            .map(|route| route.via_router)
            && let Some(source) = self.iface.get_source_address_ipv4(&gateway)
        {
            frames.push(arp_request(mac, source, gateway));
        }
        if let Some(IpAddress::Ipv6(gateway)) = routes
            .get_default_ipv6_route()
            .map(|route| route.via_router)
        {
            let source = self.iface.get_source_address_ipv6(&gateway);
            frames.push(neighbor_solicitation(mac, source, gateway));
        }
        frames
    }

    fn process_dhcp(&mut self) -> bool {
        let Some(handle) = self.dhcp else {
            return false;
        };
        let lease = match self.sockets.get_mut::<dhcpv4::Socket>(handle).poll() {
            None => return false,
            Some(dhcpv4::Event::Configured(config)) => Some((
                config.address,
                config.router,
                config
                    .dns_servers
                    .iter()
                    .copied()
                    .collect::<Vec<Ipv4Address>>(),
            )),
            Some(dhcpv4::Event::Deconfigured) if !self.dhcp_bound => {
                // The client reports "deconfigured" once when it starts: nothing to undo.
                return false;
            }
            Some(dhcpv4::Event::Deconfigured) => None,
        };
        self.dhcp_bound = lease.is_some();
        self.iface.update_ip_addrs(|addresses| {
            addresses.retain(|cidr| !matches!(cidr, IpCidr::Ipv4(_)));
        });
        self.iface.routes_mut().remove_default_ipv4_route();
        match lease {
            Some((address, router, dns)) => {
                self.iface.update_ip_addrs(|addresses| {
                    if addresses.push(IpCidr::Ipv4(address)).is_err() {
                        log::error!("net: no room for the DHCP address {address}");
                    }
                });
                if let Some(router) = router
                    && self
                        .iface
                        .routes_mut()
                        .add_default_ipv4_route(router)
                        .is_err()
                {
                    log::error!("net: route table full, default route via {router} not added");
                }
                if self.config.dns.is_empty() {
                    self.dns = dns.iter().copied().map(IpAddress::Ipv4).collect();
                }
                self.counters.dhcp_leases += 1;
                log::info!(
                    "net: DHCP lease {address}, gateway {}, dns {:?}",
                    router.map_or(alloc::string::String::from("none"), |r| alloc::format!(
                        "{r}"
                    )),
                    dns
                );
                self.bond.request_announce();
            }
            None => log::warn!("net: DHCP lease lost; IPv4 deconfigured"),
        }
        true
    }

    /// Moves established connections to accept queues, tops up listening pools, and removes
    /// sockets whose connection ended. Returns true when anything changed.
    fn maintain_sockets(&mut self, now_ns: u64) -> bool {
        let polls = self.polls;
        let NetStack {
            listeners,
            sockets,
            streams,
            lingering,
            counters,
            ..
        } = self;
        let mut changed = false;

        for listener in listeners.values_mut() {
            let mut index = 0;
            while index < listener.pending.len() {
                let handle = listener.pending[index];
                let socket = sockets.get_mut::<tcp::Socket>(handle);
                match socket.state() {
                    TcpState::Listen | TcpState::SynReceived => index += 1,
                    TcpState::Established | TcpState::CloseWait => {
                        // Handshake done: the connection's own timeout applies from now on.
                        socket.set_timeout(listener.options.timeout_ms.map(Duration::from_millis));
                        // `remove`, not `swap_remove`: connections are accepted in the order
                        // their listening sockets took them (iperf3 tells streams apart by it).
                        listener.pending.remove(index);
                        listener.ready.push_back(handle);
                        changed = true;
                    }
                    _ => {
                        listener.pending.remove(index);
                        sockets.remove(handle);
                        listener.open = listener.open.saturating_sub(1);
                        counters.tcp_reclaimed += 1;
                        changed = true;
                    }
                }
            }
            listener.ready.retain(|handle| {
                if sockets.get::<tcp::Socket>(*handle).state() == TcpState::Closed {
                    sockets.remove(*handle);
                    listener.open = listener.open.saturating_sub(1);
                    counters.tcp_reclaimed += 1;
                    changed = true;
                    false
                } else {
                    true
                }
            });
            replenish(listener, sockets, counters);
        }

        for stream in streams.values_mut() {
            let Stream::Live {
                socket: handle,
                origin,
            } = *stream
            else {
                continue;
            };
            let socket = sockets.get_mut::<tcp::Socket>(handle);
            if socket.state() == TcpState::Closed && socket.recv_queue() == 0 {
                let peer_finished =
                    matches!(socket.recv_slice(&mut []), Err(tcp::RecvError::Finished));
                sockets.remove(handle);
                release_origin(listeners, origin);
                counters.tcp_reclaimed += 1;
                *stream = Stream::Reclaimed { peer_finished };
                changed = true;
            }
        }

        lingering.retain_mut(|entry| {
            let socket = sockets.get_mut::<tcp::Socket>(entry.socket);
            let done = match entry.aborted_at_poll {
                Some(poll) => polls > poll,
                None => matches!(socket.state(), TcpState::Closed | TcpState::TimeWait),
            };
            if done {
                sockets.remove(entry.socket);
                release_origin(listeners, entry.origin);
                counters.tcp_reclaimed += 1;
                changed = true;
                return false;
            }
            // The application is gone: discard what still arrives so the peer's FIN gets in.
            while socket.can_recv() {
                if socket.recv(|data| (data.len(), ())).is_err() {
                    break;
                }
            }
            if entry.aborted_at_poll.is_none() && now_ns >= entry.deadline_ns {
                log::warn!(
                    "net: closed connection to {:?} still {} after the linger time; resetting it",
                    socket.remote_endpoint(),
                    socket.state()
                );
                socket.abort();
                entry.aborted_at_poll = Some(polls);
                counters.tcp_linger_aborts += 1;
                changed = true;
            }
            true
        });
        changed
    }
}

/// End-to-end tests: two stacks over fake wires (a child module, so tests can add raw smoltcp
/// sockets such as ICMP to the client stack).
#[cfg(test)]
#[path = "e2e_tests.rs"]
mod e2e_tests;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_local_address_is_eui64() {
        let mac = MacAddress([0x52, 0x54, 0x00, 0x12, 0x34, 0x56]);
        assert_eq!(
            link_local_address(mac),
            "fe80::5054:ff:fe12:3456".parse::<Ipv6Address>().unwrap()
        );
    }
}
