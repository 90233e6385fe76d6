//! The iperf3 server over the network stack: one test at a time, driven step by step from the
//! event loop.
//!
//! A session is one control connection: cookie → parameters → data streams → test → results.
//! TCP data streams arrive on the same listener as control connections and are told apart by
//! the session's phase; UDP streams are demultiplexed by their source endpoint. Connections
//! that arrive while a test is set up or running get ACCESS_DENIED and are closed.

use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use core::fmt::Write;

use net_stack::{
    Error as NetError, IpEndpoint, NetStack, TcpListener, TcpOptions, TcpStream, UdpSocket,
};

use crate::buffers;
use crate::error::Error;
use crate::protocol::{
    self, COOKIE_LEN, LENGTH_PREFIX, Limits, Pacer, Protocol, StreamResult, TestParams,
    UDP_CONNECT_REPLY, UDP_CONNECT_REQUEST_LEN, UdpReceiveStats, code, errno, state,
};

/// Data streams per test at most (`-P 16 --bidir`); each holds 512 KiB of socket buffers.
pub const MAX_STREAMS: usize = 32;
/// Receive/transmit chunk: reads are discarded into, writes come from, a buffer this large.
const CHUNK: usize = 64 * 1024;
/// Parameter messages longer than this are refused (real ones are < 1 KiB).
const PARAMS_MAX: usize = 64 * 1024;
/// Client results longer than this end the session (-P 128 --bidir sends ~30 KB).
const CLIENT_RESULTS_MAX: usize = 1024 * 1024;
/// Connections in the stream-accept phase that have not sent their cookie yet, beyond the
/// streams still expected (a second client connecting then gets ACCESS_DENIED from the cookie
/// check; more than this are refused at once).
const PENDING_SLACK: usize = 4;
/// A data connection that has not sent its cookie after this long no longer holds up the
/// connections accepted after it (streams are numbered in accept order).
const COOKIE_WAIT_NS: u64 = 2 * NS_PER_S;
/// In `--bidir` TCP tests, how long to wait for data that tells the client's sending streams
/// from its receiving ones before falling back to accept order.
const ROLE_DETECTION_NS: u64 = NS_PER_S;
/// Datagrams taken from the UDP socket per step at most (the rest wait for the next step).
const UDP_BUDGET: usize = 512;

const NS_PER_S: u64 = 1_000_000_000;
/// From accepting a control connection to a complete parameter message.
const SETUP_TIMEOUT_NS: u64 = 10 * NS_PER_S;
/// For all data streams to connect (the client waits up to 30 s per UDP handshake).
const CREATE_STREAMS_TIMEOUT_NS: u64 = 40 * NS_PER_S;
/// Grace after `time + omit` before the server ends a test on its own (iperf3 uses 40 s too).
const RUN_GRACE_NS: u64 = 40 * NS_PER_S;
/// For the client's results after EXCHANGE_RESULTS.
const RESULTS_TIMEOUT_NS: u64 = 10 * NS_PER_S;
/// For IPERF_DONE after DISPLAY_RESULTS.
const DONE_TIMEOUT_NS: u64 = 5 * NS_PER_S;

/// Socket options of the listener between tests: control connections (and the few refused
/// clients) need small buffers. While a test's TCP streams connect, the listener takes the
/// options [`buffers::stream_options`] derives from these.
fn control_options() -> TcpOptions {
    TcpOptions {
        spare_listeners: 4,
        // Every stream of a full test, the control connection, a few refused clients and the
        // previous test's streams that are still closing.
        max_connections: 2 * MAX_STREAMS + 8,
        // Keep-alive probes on idle connections find dead clients and, as a side effect, wake
        // the event loop at least once a second while a session exists, which is all the
        // resolution the session timeouts need.
        keep_alive_ms: Some(1_000),
        timeout_ms: Some(60_000),
        ..TcpOptions::default()
    }
}

/// Counters over the server's life, for the log.
#[derive(Clone, Copy, Debug, Default)]
struct Counters {
    sessions: u64,
    tests_completed: u64,
    busy_refusals: u64,
    bad_stream_cookies: u64,
    stray_datagrams: u64,
}

/// The server.
pub struct Server {
    port: u16,
    listener: TcpListener,
    /// Socket buffer bytes a test's TCP streams may use together.
    stream_buffer_budget: usize,
    udp: UdpSocket,
    session: Option<Session>,
    /// Control messages and UDP datagrams are read into this (TCP test data is discarded
    /// where it lies).
    receive_buffer: Vec<u8>,
    /// Data is sent from this (a fixed pattern; UDP headers are written into its head).
    send_buffer: Vec<u8>,
    /// Something was queued for sending during the current step.
    queued: bool,
    /// Rotates the first UDP sender served per step, so streams share the socket's queue.
    udp_rotation: usize,
    counters: Counters,
}

/// Where a session is in the protocol.
enum Phase {
    /// Reading the 37-byte cookie (`filled` bytes so far).
    Cookie { filled: usize },
    /// PARAM_EXCHANGE sent; reading the parameter message.
    Params(MessageReader),
    /// CREATE_STREAMS sent; accepting data streams.
    CreateStreams,
    /// TEST_START and TEST_RUNNING sent; moving data until TEST_END.
    Running,
    /// EXCHANGE_RESULTS sent; reading (and discarding) the client's results.
    Results(MessageReader),
    /// Our results and DISPLAY_RESULTS sent; waiting for IPERF_DONE or EOF.
    Done,
}

impl Phase {
    fn name(&self) -> &'static str {
        match self {
            Phase::Cookie { .. } => "cookie",
            Phase::Params(_) => "parameter exchange",
            Phase::CreateStreams => "stream setup",
            Phase::Running => "test",
            Phase::Results(_) => "results exchange",
            Phase::Done => "wait for IPERF_DONE",
        }
    }
}

/// One control connection and its test.
struct Session {
    number: u64,
    control: Option<TcpStream>,
    peer: Option<IpEndpoint>,
    phase: Phase,
    /// The session is ended when the clock passes this.
    deadline_ns: Option<u64>,
    cookie: [u8; COOKIE_LEN],
    test: Option<Test>,
    /// Our results message, built at TEST_END, sent after the client's.
    results: Vec<u8>,
}

/// A running (or finished) test.
struct Test {
    params: TestParams,
    streams: Vec<DataStream>,
    /// Connections accepted during stream setup whose cookie is not complete yet, in accept
    /// order.
    pending: Vec<PendingStream>,
    /// The stack's receive counters when the test was set up.
    receive_start: ReceiveCounters,
    /// The omit period ends then (statistics restart).
    omit_until_ns: Option<u64>,
    /// `--bidir` over TCP: which streams the client sends on is not known yet (see
    /// [`Test::detect_roles`]); until then every stream only receives. Role detection gives up
    /// and falls back to accept order at this time.
    roles_pending_until_ns: Option<u64>,
}

/// What the stack counted on receive, to report the cost per frame of a test.
#[derive(Clone, Copy)]
struct ReceiveCounters {
    /// Frames the drivers delivered.
    frames: u64,
    /// Guest time spent receiving them (`NetStats::receive_ns`), and the part before smoltcp.
    receive_ns: u64,
    receive_device_ns: u64,
    /// Frames the bond sent (while receiving: ACKs).
    sent_frames: u64,
    /// Segments that went into merged frames, and those frames.
    segments_merged: u64,
    merged_frames: u64,
    /// The bond's receive stages, smoltcp's egress and the idle time (`NetStats`).
    timings: net_stack::ReceiveTimings,
    egress_ns: u64,
    idle_ns: u64,
    /// When these were taken (the stack's clock).
    at_ns: u64,
}

impl ReceiveCounters {
    fn of(stack: &NetStack) -> ReceiveCounters {
        let stats = stack.stats();
        ReceiveCounters {
            frames: stats.bond.total.device.rx_frames,
            receive_ns: stats.receive_ns,
            receive_device_ns: stats.receive_device_ns,
            sent_frames: stats.bond.total.bond.tx_frames,
            segments_merged: stats.bond.coalesce.segments_merged,
            merged_frames: stats.bond.coalesce.merged_frames,
            timings: stats.bond.receive_timings,
            egress_ns: stats.egress_ns,
            idle_ns: stats.idle_ns,
            at_ns: stack.now_ns(),
        }
    }

    /// `rx_frames=N tx_frames=M rx_ns_per_frame=T rx_device_ns_per_frame=D rx_merged=S/F
    /// rx_stage_ns=H/D/C/G/S/E/I/W` over the time since `start`; the stages are per frame:
    /// housekeeping, driver, checks and duplicate window, coalescing, smoltcp's ingress,
    /// egress, idle, and the wall time.
    fn since(&self, start: &ReceiveCounters) -> String {
        let frames = self.frames.saturating_sub(start.frames);
        let receive_ns = self.receive_ns.saturating_sub(start.receive_ns);
        let device_ns = self
            .receive_device_ns
            .saturating_sub(start.receive_device_ns);
        let per_frame =
            |now: u64, then: u64| now.saturating_sub(then).checked_div(frames).unwrap_or(0);
        let (now, then) = (&self.timings, &start.timings);
        format!(
            "rx_frames={frames} tx_frames={} rx_ns_per_frame={} rx_device_ns_per_frame={} \
             rx_merged={}/{} rx_stage_ns={}/{}/{}/{}/{}/{}/{}/{}",
            self.sent_frames.saturating_sub(start.sent_frames),
            receive_ns.checked_div(frames).unwrap_or(0),
            device_ns.checked_div(frames).unwrap_or(0),
            self.segments_merged.saturating_sub(start.segments_merged),
            self.merged_frames.saturating_sub(start.merged_frames),
            per_frame(now.housekeeping_ns, then.housekeeping_ns),
            per_frame(now.driver_ns, then.driver_ns),
            per_frame(now.checks_ns, then.checks_ns),
            per_frame(now.coalesce_ns, then.coalesce_ns),
            per_frame(receive_ns.saturating_sub(device_ns), 0),
            per_frame(self.egress_ns, start.egress_ns),
            per_frame(self.idle_ns, start.idle_ns),
            per_frame(self.at_ns, start.at_ns),
        )
    }
}

struct PendingStream {
    stream: TcpStream,
    cookie: [u8; COOKIE_LEN],
    filled: usize,
    accepted_ns: u64,
}

enum Link {
    /// `None` once closed.
    Tcp(Option<TcpStream>),
    Udp(IpEndpoint),
}

struct DataStream {
    id: u32,
    /// The server sends on this stream (else it receives).
    sender: bool,
    link: Link,
    /// Bytes since the start (or the end of the omit period).
    bytes: u64,
    /// Bytes including the omit period.
    total_bytes: u64,
    start_ns: u64,
    end_ns: u64,
    /// The stream ended early (peer closed, reset, send error): no more I/O.
    finished: bool,
    udp: UdpReceiveStats,
    /// UDP datagrams sent (the last sequence number).
    udp_sent: u64,
    pacer: Pacer,
}

/// Reads one length-prefixed message from the control connection, keeping or discarding the
/// body.
struct MessageReader {
    header: [u8; LENGTH_PREFIX],
    header_filled: usize,
    body: Vec<u8>,
    body_len: usize,
    body_read: usize,
    limit: usize,
    keep: bool,
}

impl MessageReader {
    fn new(limit: usize, keep: bool) -> MessageReader {
        MessageReader {
            header: [0; LENGTH_PREFIX],
            header_filled: 0,
            body: Vec::new(),
            body_len: 0,
            body_read: 0,
            limit,
            keep,
        }
    }

    /// Reads what is available; true once the whole message is in.
    fn poll(
        &mut self,
        stack: &mut NetStack,
        control: &TcpStream,
        scratch: &mut [u8],
    ) -> Result<bool, Error> {
        while self.header_filled < LENGTH_PREFIX {
            let read = read_control(stack, control, &mut self.header[self.header_filled..])?;
            if read == 0 {
                return Ok(false);
            }
            self.header_filled += read;
            if self.header_filled == LENGTH_PREFIX {
                let length = u32::from_be_bytes(self.header) as usize;
                if length > self.limit {
                    return Err(Error::Protocol {
                        reason: format!(
                            "message of {length} bytes announced, limit {}",
                            self.limit
                        ),
                    });
                }
                self.body_len = length;
                if self.keep {
                    self.body = vec![0; length];
                }
            }
        }
        while self.body_read < self.body_len {
            let want = self.body_len - self.body_read;
            let read = if self.keep {
                read_control(stack, control, &mut self.body[self.body_read..])?
            } else {
                let take = want.min(scratch.len());
                read_control(stack, control, &mut scratch[..take])?
            };
            if read == 0 {
                return Ok(false);
            }
            self.body_read += read;
        }
        Ok(true)
    }
}

/// Reads from the control connection; end of stream and errors end the session.
fn read_control(
    stack: &mut NetStack,
    control: &TcpStream,
    buffer: &mut [u8],
) -> Result<usize, Error> {
    match stack.tcp_read(control, buffer) {
        Ok(read) => Ok(read),
        Err(NetError::PeerClosed) => Err(Error::Disconnected {
            reason: "the client closed the control connection",
        }),
        Err(error) => Err(Error::Net {
            context: "reading the control connection",
            error,
        }),
    }
}

/// Queues control bytes. The control connection's 64 KiB buffer holds every message we send
/// (at most a few KiB per session), so a short write means the connection is broken.
fn send_control(stack: &mut NetStack, control: &TcpStream, bytes: &[u8]) -> Result<(), Error> {
    match stack.tcp_write(control, bytes) {
        Ok(written) if written == bytes.len() => Ok(()),
        Ok(written) => Err(Error::Protocol {
            reason: format!(
                "control connection does not take data ({written} of {} bytes queued)",
                bytes.len()
            ),
        }),
        Err(error) => Err(Error::Net {
            context: "writing the control connection",
            error,
        }),
    }
}

/// How a step left the session.
enum Progress {
    Continue,
    /// The session is over (IPERF_DONE, EOF after the results, or the wait timed out).
    Finished,
}

/// Stream id of the `index`-th stream: 1, 3, 4, 5, ... (iperf3 never uses 2).
fn stream_id(index: usize) -> u32 {
    if index == 0 { 1 } else { index as u32 + 2 }
}

fn seconds_between(start_ns: u64, end_ns: u64) -> f64 {
    end_ns.saturating_sub(start_ns) as f64 / NS_PER_S as f64
}

fn yes_no(flag: bool) -> &'static str {
    if flag { "yes" } else { "no" }
}

impl Server {
    /// Listens on TCP and UDP `port`; a test's TCP streams get socket buffers of
    /// `stream_buffer_budget` bytes in all (see [`buffers`]).
    pub fn new(
        stack: &mut NetStack,
        port: u16,
        stream_buffer_budget: usize,
    ) -> Result<Server, Error> {
        let listener = stack
            .tcp_listen_with(port, control_options())
            .map_err(|error| Error::Net {
                context: "listening on TCP",
                error,
            })?;
        let udp = stack.udp_bind(port).map_err(|error| Error::Net {
            context: "binding UDP",
            error,
        })?;
        // A recognisable, non-constant pattern (iperf3 sends random bytes; content is
        // irrelevant to the client).
        let send_buffer = (0..CHUNK)
            .map(|index| (index as u32).wrapping_mul(2_654_435_761).to_be_bytes()[0])
            .collect();
        Ok(Server {
            port,
            listener,
            stream_buffer_budget,
            udp,
            session: None,
            receive_buffer: vec![0; CHUNK],
            send_buffer,
            queued: false,
            udp_rotation: 0,
            counters: Counters::default(),
        })
    }

    /// Does all work that is possible now. Returns true when data was queued for sending.
    pub fn step(&mut self, stack: &mut NetStack) -> bool {
        self.queued = false;
        let now = stack.now_ns();
        // The session first: a finished client's IPERF_DONE may be waiting, and the next
        // client, already connected, must not be refused as busy because of it. New
        // connections are then served in the same step (their data is already here, and no
        // further interrupt may come to trigger another step).
        self.drive_session(stack, now);
        while self.accept_connections(stack, now) {
            self.drive_session(stack, now);
        }
        if self.session.is_none() {
            self.drop_stray_datagrams(stack);
        }
        self.queued
    }

    fn drive_session(&mut self, stack: &mut NetStack, now: u64) {
        if let Some(mut session) = self.session.take() {
            match self.drive(stack, &mut session, now) {
                Ok(Progress::Continue) => self.session = Some(session),
                Ok(Progress::Finished) => self.end_session(stack, session, None),
                Err(error) => self.end_session(stack, session, Some(error)),
            }
        }
    }

    /// When a rate-limited sending stream may send next, if that is in the future and nothing
    /// else is due; the event loop sleeps until then (the stack has no timer for it).
    pub fn pacing_deadline(&self, now_ns: u64) -> Option<u64> {
        let session = self.session.as_ref()?;
        if !matches!(session.phase, Phase::Running) {
            return None;
        }
        let test = session.test.as_ref()?;
        test.streams
            .iter()
            .filter(|stream| stream.sender && !stream.finished && stream.pacer.is_limited())
            .filter_map(|stream| {
                if stream.pacer.allowance(now_ns) > 0 {
                    Some(now_ns)
                } else {
                    stream.pacer.next_send_ns()
                }
            })
            .min()
    }

    /// Takes new connections: the first becomes the session when idle, data streams while the
    /// session sets up its test, the rest are refused. True when anything was accepted.
    fn accept_connections(&mut self, stack: &mut NetStack, now: u64) -> bool {
        let mut accepted = false;
        while let Some(stream) = stack.accept(&self.listener) {
            accepted = true;
            let peer = stack.tcp_remote_endpoint(&stream);
            match self.session.as_mut() {
                None => {
                    self.counters.sessions += 1;
                    log::info!(
                        "iperf: session {} from {}",
                        self.counters.sessions,
                        display_endpoint(peer)
                    );
                    self.session = Some(Session {
                        number: self.counters.sessions,
                        control: Some(stream),
                        peer,
                        phase: Phase::Cookie { filled: 0 },
                        deadline_ns: Some(now + SETUP_TIMEOUT_NS),
                        cookie: [0; COOKIE_LEN],
                        test: None,
                        results: Vec::new(),
                    });
                }
                Some(session) if session.wants_tcp_stream() => {
                    if let Some(test) = session.test.as_mut() {
                        test.pending.push(PendingStream {
                            stream,
                            cookie: [0; COOKIE_LEN],
                            filled: 0,
                            accepted_ns: now,
                        });
                    }
                }
                Some(_) => {
                    self.counters.busy_refusals += 1;
                    log::info!(
                        "iperf: busy; refused the connection from {}",
                        display_endpoint(peer)
                    );
                    refuse(stack, stream);
                }
            }
        }
        accepted
    }

    /// Advances the session. Errors end it.
    fn drive(
        &mut self,
        stack: &mut NetStack,
        session: &mut Session,
        now: u64,
    ) -> Result<Progress, Error> {
        let Some(control) = session.control.take() else {
            return Err(Error::Protocol {
                reason: "control connection missing".into(),
            });
        };
        let result = self.drive_with_control(stack, session, &control, now);
        session.control = Some(control);
        let progress = result?;
        if let Some(deadline) = session.deadline_ns
            && now > deadline
            && matches!(progress, Progress::Continue)
        {
            if matches!(session.phase, Phase::Done) {
                // The results are out; a client that never says IPERF_DONE changes nothing.
                return Ok(Progress::Finished);
            }
            return Err(Error::Protocol {
                reason: format!("timed out in the {} phase", session.phase.name()),
            });
        }
        Ok(progress)
    }

    fn drive_with_control(
        &mut self,
        stack: &mut NetStack,
        session: &mut Session,
        control: &TcpStream,
        now: u64,
    ) -> Result<Progress, Error> {
        if let Phase::Cookie { filled } = &mut session.phase {
            while *filled < COOKIE_LEN {
                let read = read_control(stack, control, &mut session.cookie[*filled..])?;
                if read == 0 {
                    return Ok(Progress::Continue);
                }
                let start = *filled;
                *filled += read;
                for index in start..*filled {
                    if !protocol::cookie_byte_ok(index, session.cookie[index]) {
                        // Not an iperf3 client: say so (harmless to others) and hang up.
                        let _ = send_control(
                            stack,
                            control,
                            &protocol::server_error_message(code::RECEIVE_COOKIE, errno::EINVAL),
                        );
                        return Err(Error::Protocol {
                            reason: format!(
                                "byte {:#04x} at offset {index} cannot be part of a cookie",
                                session.cookie[index]
                            ),
                        });
                    }
                }
            }
            send_control(stack, control, &[state::PARAM_EXCHANGE])?;
            session.phase = Phase::Params(MessageReader::new(PARAMS_MAX, true));
        }

        if let Phase::Params(reader) = &mut session.phase {
            let complete = match reader.poll(stack, control, &mut self.receive_buffer) {
                Ok(complete) => complete,
                Err(error @ Error::Protocol { .. }) => {
                    // An oversized message (the reader's only protocol error): tell an iperf3
                    // client why before hanging up.
                    let _ = send_control(
                        stack,
                        control,
                        &protocol::server_error_message(code::RECEIVE_PARAMETERS, errno::EMSGSIZE),
                    );
                    return Err(error);
                }
                Err(error) => return Err(error),
            };
            if !complete {
                return Ok(Progress::Continue);
            }
            let body = core::mem::take(&mut reader.body);
            let limits = Limits {
                max_streams: MAX_STREAMS,
                max_udp_payload: session
                    .peer
                    .map_or(1472, |peer| stack.udp_max_payload(&peer)),
            };
            let params = match protocol::parse_params(&body, &limits) {
                Ok(params) => params,
                Err(Error::Rejected {
                    i_errno,
                    errno,
                    reason,
                }) => {
                    send_control(
                        stack,
                        control,
                        &protocol::server_error_message(i_errno, errno),
                    )?;
                    return Err(Error::Rejected {
                        i_errno,
                        errno,
                        reason,
                    });
                }
                Err(other) => return Err(other),
            };
            let stream_options =
                buffers::stream_options(&params, self.stream_buffer_budget, control_options());
            log::info!(
                "iperf: session {}: {} streams={} reverse={} bidir={} len={} bandwidth={} time={} omit={} window={} buffers={}/{} client {}",
                session.number,
                params.protocol.name(),
                params.stream_count(),
                yes_no(params.reverse),
                yes_no(params.bidirectional),
                params.block_len,
                params.bandwidth_bps,
                params.time_s,
                params.omit_s,
                params.window.unwrap_or(0),
                stream_options.rx_buffer,
                stream_options.tx_buffer,
                params.client_version
            );
            self.set_listener_options(stack, stream_options);
            session.test = Some(Test {
                params,
                streams: Vec::new(),
                pending: Vec::new(),
                omit_until_ns: None,
                roles_pending_until_ns: None,
                receive_start: ReceiveCounters::of(stack),
            });
            send_control(stack, control, &[state::CREATE_STREAMS])?;
            session.phase = Phase::CreateStreams;
            session.deadline_ns = Some(now + CREATE_STREAMS_TIMEOUT_NS);
        }

        if matches!(session.phase, Phase::CreateStreams | Phase::Running) {
            self.read_test_control(stack, session, control, now)?;
        }

        if matches!(session.phase, Phase::CreateStreams) {
            self.accept_streams(stack, session, now);
            let test = session.test.as_mut().ok_or_else(missing_test)?;
            if test.streams.len() == test.params.stream_count() {
                self.set_listener_options(stack, control_options());
                let test = session.test.as_mut().ok_or_else(missing_test)?;
                start_test(test, now);
                for pending in test.pending.drain(..) {
                    refuse(stack, pending.stream);
                }
                send_control(stack, control, &[state::TEST_START, state::TEST_RUNNING])?;
                session.phase = Phase::Running;
                // The client chose `time`: saturate rather than overflow on absurd values.
                session.deadline_ns = (test.params.time_s > 0).then(|| {
                    test.params
                        .time_s
                        .saturating_add(test.params.omit_s)
                        .saturating_mul(NS_PER_S)
                        .saturating_add(now + RUN_GRACE_NS)
                });
                log::debug!("iperf: session {}: test running", session.number);
            }
        }

        if matches!(session.phase, Phase::Running) {
            self.move_data(stack, session, now);
        }

        if let Phase::Results(reader) = &mut session.phase {
            if !reader.poll(stack, control, &mut self.receive_buffer)? {
                return Ok(Progress::Continue);
            }
            let mut message = protocol::framed(&session.results);
            message.push(state::DISPLAY_RESULTS);
            send_control(stack, control, &message)?;
            session.phase = Phase::Done;
            session.deadline_ns = Some(now + DONE_TIMEOUT_NS);
        }

        if matches!(session.phase, Phase::Done) {
            let mut byte = [0u8; 1];
            loop {
                match stack.tcp_read(control, &mut byte) {
                    Ok(0) => break,
                    Ok(_) if byte[0] == state::IPERF_DONE => return Ok(Progress::Finished),
                    Ok(_) => log::debug!("iperf: ignoring byte {:#04x} after the results", byte[0]),
                    // EOF or a reset after our results: the client has all it needs.
                    Err(_) => return Ok(Progress::Finished),
                }
            }
        }
        Ok(Progress::Continue)
    }

    /// Handles state bytes from the client during stream setup and the test.
    fn read_test_control(
        &mut self,
        stack: &mut NetStack,
        session: &mut Session,
        control: &TcpStream,
        now: u64,
    ) -> Result<(), Error> {
        let mut byte = [0u8; 1];
        while matches!(session.phase, Phase::CreateStreams | Phase::Running) {
            if read_control(stack, control, &mut byte)? == 0 {
                return Ok(());
            }
            match byte[0] {
                state::TEST_START => {}
                state::TEST_END => self.end_test(stack, session, control, now)?,
                state::CLIENT_TERMINATE => {
                    return Err(Error::Disconnected {
                        reason: "the client terminated the test",
                    });
                }
                state::IPERF_DONE => {
                    return Err(Error::Disconnected {
                        reason: "the client quit before the test ended",
                    });
                }
                other => {
                    return Err(Error::Protocol {
                        reason: format!("unknown control message {other:#04x}"),
                    });
                }
            }
        }
        Ok(())
    }

    /// Takes TCP streams whose cookie is complete and UDP streams' first datagrams.
    fn accept_streams(&mut self, stack: &mut NetStack, session: &mut Session, now: u64) {
        let Some(test) = session.test.as_mut() else {
            return;
        };
        // Read what the cookies have sent; drop connections that failed, refuse complete
        // cookies that are not this test's.
        let mut index = 0;
        while index < test.pending.len() {
            let pending = &mut test.pending[index];
            let mut failed = false;
            while pending.filled < COOKIE_LEN {
                match stack.tcp_read(&pending.stream, &mut pending.cookie[pending.filled..]) {
                    Ok(0) => break,
                    Ok(read) => pending.filled += read,
                    Err(_) => {
                        failed = true;
                        break;
                    }
                }
            }
            let foreign = pending.filled == COOKIE_LEN && pending.cookie != session.cookie;
            if failed {
                stack.tcp_close(test.pending.remove(index).stream);
            } else if foreign {
                // Another client (or a stale stream): the stock server answers this too.
                let pending = test.pending.remove(index);
                self.counters.bad_stream_cookies += 1;
                log::info!(
                    "iperf: refused a data connection from {} (cookie does not match the test)",
                    display_endpoint(stack.tcp_remote_endpoint(&pending.stream))
                );
                refuse(stack, pending.stream);
            } else {
                index += 1;
            }
        }
        // Take streams strictly in accept order: the client numbers (and, with --bidir,
        // assigns directions to) its streams in connect order, and a cookie that happens to
        // complete early must not overtake. A connection that keeps its cookie back too long
        // stops holding the others up.
        while let Some(head) = test.pending.first() {
            if head.filled == COOKIE_LEN && test.streams.len() < test.params.stream_count() {
                let pending = test.pending.remove(0);
                test.add_stream(Link::Tcp(Some(pending.stream)), now);
            } else if head.filled < COOKIE_LEN
                && now.saturating_sub(head.accepted_ns) > COOKIE_WAIT_NS
            {
                let pending = test.pending.remove(0);
                log::info!(
                    "iperf: refused a data connection from {} (no cookie within {} ms)",
                    display_endpoint(stack.tcp_remote_endpoint(&pending.stream)),
                    COOKIE_WAIT_NS / 1_000_000
                );
                refuse(stack, pending.stream);
            } else {
                break;
            }
        }

        if test.params.protocol != Protocol::Udp {
            return;
        }
        for _ in 0..UDP_BUDGET {
            let (len, from) = match stack.udp_recv_from(&self.udp, &mut self.receive_buffer) {
                Ok(Some(datagram)) => datagram,
                Ok(None) => break,
                Err(error) => {
                    self.counters.stray_datagrams += 1;
                    log::debug!("iperf: UDP datagram dropped: {error}");
                    continue;
                }
            };
            let known = test
                .streams
                .iter()
                .any(|stream| matches!(stream.link, Link::Udp(endpoint) if endpoint == from));
            if len != UDP_CONNECT_REQUEST_LEN {
                // Early data from a stream we know, or noise: nothing is counted before the
                // test runs.
                self.counters.stray_datagrams += 1;
                continue;
            }
            if !known {
                if test.streams.len() >= test.params.stream_count() {
                    self.counters.stray_datagrams += 1;
                    continue;
                }
                test.add_stream(Link::Udp(from), now);
            }
            // Answer a repeated request too, in case our first answer was lost.
            if let Err(error) = stack.udp_send_to(&self.udp, &UDP_CONNECT_REPLY, from) {
                log::warn!("iperf: UDP connect reply to {from} failed: {error}");
            }
        }
    }

    /// Receives and sends on all data streams.
    fn move_data(&mut self, stack: &mut NetStack, session: &mut Session, now: u64) {
        let Some(test) = session.test.as_mut() else {
            return;
        };
        if let Some(omit_until) = test.omit_until_ns
            && now >= omit_until
        {
            test.omit_until_ns = None;
            for stream in &mut test.streams {
                stream.bytes = 0;
                stream.start_ns = now;
                stream.udp.reset_jitter();
            }
            log::debug!("iperf: session {}: omit period over", session.number);
        }
        self.receive_udp(stack, test, now);
        receive_tcp(stack, test);
        if test.roles_pending_until_ns.is_some() {
            test.detect_roles(now);
        }
        match test.params.protocol {
            Protocol::Tcp => self.send_tcp(stack, test, now),
            Protocol::Udp => self.send_udp(stack, test, now),
        }
    }

    fn receive_udp(&mut self, stack: &mut NetStack, test: &mut Test, now: u64) {
        for _ in 0..UDP_BUDGET {
            let (len, from) = match stack.udp_recv_from(&self.udp, &mut self.receive_buffer) {
                Ok(Some(datagram)) => datagram,
                Ok(None) => break,
                Err(error) => {
                    self.counters.stray_datagrams += 1;
                    log::debug!("iperf: UDP datagram dropped: {error}");
                    continue;
                }
            };
            let stream = test.streams.iter_mut().find(|stream| {
                !stream.sender && matches!(stream.link, Link::Udp(endpoint) if endpoint == from)
            });
            let Some(stream) = stream else {
                self.counters.stray_datagrams += 1;
                continue;
            };
            let first = stream.bytes == 0;
            stream.bytes += len as u64;
            stream.total_bytes += len as u64;
            match protocol::read_udp_header(
                &self.receive_buffer[..len],
                test.params.udp_counters_64bit,
            ) {
                Some((sent_s, sequence)) => {
                    stream
                        .udp
                        .record(sequence, sent_s, now as f64 / NS_PER_S as f64, first)
                }
                None => self.counters.stray_datagrams += 1,
            }
        }
    }

    fn send_tcp(&mut self, stack: &mut NetStack, test: &mut Test, now: u64) {
        for stream in test.streams.iter_mut() {
            if !stream.sender || stream.finished {
                continue;
            }
            let Link::Tcp(Some(tcp)) = &stream.link else {
                continue;
            };
            loop {
                let allowance = stream.pacer.allowance(now);
                let chunk = (allowance.min(self.send_buffer.len() as u64)) as usize;
                if chunk == 0 {
                    break;
                }
                match stack.tcp_write(tcp, &self.send_buffer[..chunk]) {
                    Ok(0) | Err(NetError::WouldBlock) => break,
                    Ok(written) => {
                        stream.bytes += written as u64;
                        stream.total_bytes += written as u64;
                        stream.pacer.sent(written);
                        self.queued = true;
                    }
                    Err(error) => {
                        log::info!("iperf: stream {} stopped sending: {error}", stream.id);
                        stream.finished = true;
                        break;
                    }
                }
            }
        }
    }

    fn send_udp(&mut self, stack: &mut NetStack, test: &mut Test, now: u64) {
        let count = test.streams.len();
        if count == 0 {
            return;
        }
        self.udp_rotation = (self.udp_rotation + 1) % count;
        let len = test.params.block_len.min(self.send_buffer.len());
        let counters_64bit = test.params.udp_counters_64bit;
        for offset in 0..count {
            let stream = &mut test.streams[(self.udp_rotation + offset) % count];
            if !stream.sender || stream.finished {
                continue;
            }
            let Link::Udp(endpoint) = stream.link else {
                continue;
            };
            while stream.pacer.allowance(now) > 0 {
                let sequence = stream.udp_sent + 1;
                protocol::write_udp_header(
                    &mut self.send_buffer[..len],
                    now,
                    sequence,
                    counters_64bit,
                );
                match stack.udp_send_to(&self.udp, &self.send_buffer[..len], endpoint) {
                    Ok(()) => {
                        stream.udp_sent = sequence;
                        stream.bytes += len as u64;
                        stream.total_bytes += len as u64;
                        stream.pacer.sent(len);
                        self.queued = true;
                    }
                    // The socket's queue is full; every stream shares it.
                    Err(NetError::WouldBlock) => return,
                    Err(error) => {
                        log::warn!("iperf: UDP stream {} cannot send: {error}", stream.id);
                        stream.finished = true;
                        break;
                    }
                }
            }
        }
    }

    /// TEST_END: final reads, close the data streams, prepare our results, ask for theirs.
    fn end_test(
        &mut self,
        stack: &mut NetStack,
        session: &mut Session,
        control: &TcpStream,
        now: u64,
    ) -> Result<(), Error> {
        let test = session.test.as_mut().ok_or_else(missing_test)?;
        if matches!(session.phase, Phase::Running) {
            // What already arrived belongs to the test.
            self.receive_udp(stack, test, now);
            receive_tcp(stack, test);
        }
        for stream in &mut test.streams {
            stream.end_ns = now;
            if let Link::Tcp(tcp) = &mut stream.link
                && let Some(tcp) = tcp.take()
            {
                // FIN after the queued data, never RST: the client reads its receiving
                // streams until EXCHANGE_RESULTS, and a reset there is fatal to it.
                stack.tcp_close(tcp);
            }
        }
        for pending in test.pending.drain(..) {
            refuse(stack, pending.stream);
        }
        let results = test.results();
        let summary = format!(
            "{} {}",
            test.summary_line(),
            ReceiveCounters::of(stack).since(&test.receive_start)
        );
        log::info!("iperf: test done: {summary}");
        self.counters.tests_completed += 1;
        let output = test.params.get_server_output.then(|| {
            server_output_text(
                self.port,
                session.number,
                session.peer,
                &test.params,
                &results,
                &summary,
            )
        });
        session.results =
            protocol::results_json(&results, test.params.protocol, output.as_deref()).into_bytes();
        send_control(stack, control, &[state::EXCHANGE_RESULTS])?;
        session.phase = Phase::Results(MessageReader::new(CLIENT_RESULTS_MAX, false));
        session.deadline_ns = Some(now + RESULTS_TIMEOUT_NS);
        Ok(())
    }

    /// Gives the listener's future connections `options` (the streams' buffers, or back to
    /// the control connection's).
    fn set_listener_options(&self, stack: &mut NetStack, options: TcpOptions) {
        if let Err(error) = stack.set_listener_options(&self.listener, options) {
            // Only a stale handle fails; connections keep the buffers they had.
            log::warn!("iperf: cannot change the listener's socket buffers: {error}");
        }
    }

    /// Closes everything the session holds (gracefully) and logs why it ended.
    fn end_session(&mut self, stack: &mut NetStack, mut session: Session, error: Option<Error>) {
        // A test cut short while its streams connected leaves the listener on their buffers.
        self.set_listener_options(stack, control_options());
        let running = matches!(session.phase, Phase::Running);
        let now = stack.now_ns();
        if let Some(test) = session.test.as_mut() {
            for stream in &mut test.streams {
                if running {
                    // Cut short: the partial figures in the log run until now.
                    stream.end_ns = now;
                }
                if let Link::Tcp(tcp) = &mut stream.link
                    && let Some(tcp) = tcp.take()
                {
                    stack.tcp_close(tcp);
                }
            }
            for pending in test.pending.drain(..) {
                stack.tcp_close(pending.stream);
            }
        }
        if let Some(control) = session.control.take() {
            stack.tcp_close(control);
        }
        let stats = stack.stats();
        match error {
            None => log::info!(
                "iperf: session {} finished ({} tests, {} busy refusals, {} bad stream cookies, {} stray datagrams so far; {} connections closing)",
                session.number,
                self.counters.tests_completed,
                self.counters.busy_refusals,
                self.counters.bad_stream_cookies,
                self.counters.stray_datagrams,
                stats.tcp_lingering
            ),
            Some(error) => {
                let during_test = matches!(session.phase, Phase::CreateStreams | Phase::Running);
                if during_test && let Some(test) = session.test.as_ref() {
                    log::warn!(
                        "iperf: test aborted: {error} (so far: {})",
                        test.summary_line()
                    );
                } else {
                    log::warn!(
                        "iperf: session {} ended in the {} phase: {error}",
                        session.number,
                        session.phase.name()
                    );
                }
            }
        }
        // Late datagrams of this session must not count for the next one.
        self.drop_stray_datagrams(stack);
    }

    fn drop_stray_datagrams(&mut self, stack: &mut NetStack) {
        for _ in 0..UDP_BUDGET {
            match stack.udp_recv_from(&self.udp, &mut self.receive_buffer) {
                Ok(None) => break,
                Ok(Some(_)) | Err(_) => self.counters.stray_datagrams += 1,
            }
        }
    }
}

impl Session {
    /// True when a new TCP connection is to be taken as a data stream of this test.
    fn wants_tcp_stream(&self) -> bool {
        let Some(test) = self.test.as_ref() else {
            return false;
        };
        matches!(self.phase, Phase::CreateStreams)
            && test.params.protocol == Protocol::Tcp
            && test.pending.len() + test.streams.len() < test.params.stream_count() + PENDING_SLACK
    }
}

impl Test {
    fn add_stream(&mut self, link: Link, now: u64) {
        let index = self.streams.len();
        let sender = self.params.server_sends_on(index);
        self.streams.push(DataStream {
            id: stream_id(index),
            sender,
            link,
            bytes: 0,
            total_bytes: 0,
            start_ns: now,
            end_ns: now,
            finished: false,
            udp: UdpReceiveStats::default(),
            udp_sent: 0,
            pacer: Pacer::new(0, now, self.params.block_len),
        });
    }

    /// `--bidir` over TCP: the streams that brought data are the client's sending streams
    /// (ours to receive on), the others are ours to send on. Ids follow: 1, 3, ... for the
    /// client's sending streams, then the rest, each group in accept order.
    fn detect_roles(&mut self, now: u64) {
        let Some(give_up_ns) = self.roles_pending_until_ns else {
            return;
        };
        let parallel = self.params.parallel;
        let talking = self
            .streams
            .iter()
            .filter(|stream| stream.total_bytes > 0)
            .count();
        let receives: Vec<bool> = if talking == parallel {
            self.streams
                .iter()
                .map(|stream| stream.total_bytes > 0)
                .collect()
        } else if talking > parallel || now >= give_up_ns {
            log::warn!(
                "iperf: {talking} of {} streams sent data ({parallel} expected); directions follow accept order",
                self.streams.len()
            );
            (0..self.streams.len())
                .map(|index| index < parallel)
                .collect()
        } else {
            return;
        };
        self.roles_pending_until_ns = None;
        let mut order: Vec<usize> = (0..self.streams.len()).collect();
        // Stable: accept order within each direction.
        order.sort_by_key(|&index| !receives[index]);
        for (position, &index) in order.iter().enumerate() {
            let stream = &mut self.streams[index];
            stream.id = stream_id(position);
            stream.sender = !receives[index];
            if stream.sender {
                stream.pacer = Pacer::new(self.params.bandwidth_bps, now, self.params.block_len);
            }
        }
        self.streams.sort_by_key(|stream| stream.id);
    }

    fn results(&self) -> Vec<StreamResult> {
        self.streams
            .iter()
            .map(|stream| StreamResult {
                id: stream.id,
                bytes: stream.bytes,
                sender: stream.sender,
                jitter_s: if stream.sender {
                    0.0
                } else {
                    stream.udp.jitter_s
                },
                errors: if stream.sender { 0 } else { stream.udp.errors },
                packets: if stream.sender {
                    stream.udp_sent
                } else {
                    stream.udp.packet_count
                },
                seconds: seconds_between(stream.start_ns, stream.end_ns),
            })
            .collect()
    }

    /// The one-line summary logged per test.
    fn summary_line(&self) -> String {
        let received: u64 = self
            .streams
            .iter()
            .filter(|stream| !stream.sender)
            .map(|stream| stream.bytes)
            .sum();
        let sent: u64 = self
            .streams
            .iter()
            .filter(|stream| stream.sender)
            .map(|stream| stream.bytes)
            .sum();
        let seconds = self
            .streams
            .iter()
            .map(|stream| seconds_between(stream.start_ns, stream.end_ns))
            .fold(0.0, f64::max);
        let rate = if seconds > 0.0 {
            (received + sent) as f64 * 8.0 / seconds / 1e6
        } else {
            0.0
        };
        let mut line = format!(
            "{} reverse={} streams={} bytes_received={received} seconds={seconds:.3} Mbit/s={rate:.2} bidir={} bytes_sent={sent}",
            self.params.protocol.name(),
            yes_no(self.params.reverse),
            self.streams.len(),
            yes_no(self.params.bidirectional),
        );
        if self.params.protocol == Protocol::Udp {
            let receivers = || self.streams.iter().filter(|stream| !stream.sender);
            let lost: u64 = receivers().map(|stream| stream.udp.errors).sum();
            let packets: u64 = receivers().map(|stream| stream.udp.packet_count).sum();
            let out_of_order: u64 = receivers().map(|stream| stream.udp.out_of_order).sum();
            let count = receivers().count();
            let jitter_ms = if count > 0 {
                receivers().map(|stream| stream.udp.jitter_s).sum::<f64>() * 1000.0 / count as f64
            } else {
                0.0
            };
            let sent_packets: u64 = self
                .streams
                .iter()
                .filter(|stream| stream.sender)
                .map(|stream| stream.udp_sent)
                .sum();
            let _ = write!(
                line,
                " lost={lost}/{packets} out_of_order={out_of_order} jitter_ms={jitter_ms:.3} datagrams_sent={sent_packets}"
            );
        }
        line
    }
}

fn start_test(test: &mut Test, now: u64) {
    for stream in &mut test.streams {
        stream.start_ns = now;
        stream.end_ns = now;
        stream.bytes = 0;
        stream.total_bytes = 0;
        stream.pacer = Pacer::new(
            if stream.sender {
                test.params.bandwidth_bps
            } else {
                0
            },
            now,
            test.params.block_len,
        );
    }
    test.omit_until_ns = (test.params.omit_s > 0).then(|| now + test.params.omit_s * NS_PER_S);
    if test.params.bidirectional && test.params.protocol == Protocol::Tcp {
        // TCP streams can reach us in another order than the client connected them (its
        // connects complete on the host before our handshakes, which may finish in one
        // batch), so accept order alone may swap directions. The client starts sending on its
        // sending streams right after TEST_RUNNING: until that shows, every stream receives.
        for stream in &mut test.streams {
            stream.sender = false;
        }
        test.roles_pending_until_ns = Some(now + ROLE_DETECTION_NS);
    }
}

/// Reads everything available on receiving TCP streams (discarded, counted).
fn receive_tcp(stack: &mut NetStack, test: &mut Test) {
    for stream in &mut test.streams {
        if stream.sender || stream.finished {
            continue;
        }
        let Link::Tcp(Some(tcp)) = &stream.link else {
            continue;
        };
        loop {
            // Discarded where it lies: copying it out first would double the cost per byte.
            match stack.tcp_read_with(tcp, <[u8]>::len) {
                Ok(0) => break,
                Ok(read) => {
                    stream.bytes += read as u64;
                    stream.total_bytes += read as u64;
                }
                Err(_) => {
                    // The client closed (or reset) this stream: it has nothing more to send.
                    stream.finished = true;
                    break;
                }
            }
        }
    }
}

/// Answers ACCESS_DENIED and closes without reading (the stock server does the same).
fn refuse(stack: &mut NetStack, stream: TcpStream) {
    let _ = stack.tcp_write(&stream, &[state::ACCESS_DENIED]);
    stack.tcp_close(stream);
}

fn missing_test() -> Error {
    Error::Protocol {
        reason: "no test parameters".into(),
    }
}

fn display_endpoint(endpoint: Option<IpEndpoint>) -> String {
    endpoint.map_or_else(|| String::from("unknown"), |endpoint| format!("{endpoint}"))
}

/// The text report `--get-server-output` shows.
fn server_output_text(
    port: u16,
    session: u64,
    peer: Option<IpEndpoint>,
    params: &TestParams,
    results: &[StreamResult],
    summary: &str,
) -> String {
    let mut text = String::new();
    let _ = writeln!(
        text,
        "Tandem iperf server on port {port}, session {session}"
    );
    let _ = writeln!(text, "Accepted connection from {}", display_endpoint(peer));
    let _ = writeln!(
        text,
        "{} test, {} streams, {}, block {} bytes, omit {} s",
        params.protocol.name(),
        results.len(),
        if params.bidirectional {
            "bidirectional"
        } else if params.reverse {
            "reverse (server sends)"
        } else {
            "server receives"
        },
        params.block_len,
        params.omit_s
    );
    for stream in results {
        let rate = if stream.seconds > 0.0 {
            stream.bytes as f64 * 8.0 / stream.seconds / 1e6
        } else {
            0.0
        };
        let _ = write!(
            text,
            "[{:3}] 0.00-{:.2} sec  {} bytes  {:.2} Mbits/sec  {}",
            stream.id,
            stream.seconds,
            stream.bytes,
            rate,
            if stream.sender { "sender" } else { "receiver" }
        );
        if params.protocol == Protocol::Udp {
            if stream.sender {
                let _ = write!(text, "  {} datagrams", stream.packets);
            } else {
                let _ = write!(
                    text,
                    "  jitter {:.3} ms  lost {}/{}",
                    stream.jitter_s * 1000.0,
                    stream.errors,
                    stream.packets
                );
            }
        }
        text.push('\n');
    }
    let _ = writeln!(text, "summary: {summary}");
    text
}
