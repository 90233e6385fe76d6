//! The iperf3 (3.x) wire protocol without I/O: control state bytes, error codes, the cookie,
//! test parameters, the results message, UDP datagram headers, loss/jitter accounting, pacing.
//!
//! Reference: /work/shared/reference/iperf3-protocol.md (esnet/iperf 3.12 `iperf_api.[ch]`,
//! `iperf_udp.c`, `iperf_error.c`, and captures of the stock client).

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use crate::error::Error;
use crate::json::{self, ObjectWriter, Value};

/// Control state bytes (`iperf_api.h`), sent as one signed char each.
pub mod state {
    /// Server → client: all streams are in, the test starts.
    pub const TEST_START: u8 = 1;
    /// Server → client: data may flow.
    pub const TEST_RUNNING: u8 = 2;
    /// Client → server: the client decided the test is over.
    pub const TEST_END: u8 = 4;
    /// Server → client: send your parameters.
    pub const PARAM_EXCHANGE: u8 = 9;
    /// Server → client: connect the data streams.
    pub const CREATE_STREAMS: u8 = 10;
    /// Client → server: the client was interrupted.
    pub const CLIENT_TERMINATE: u8 = 12;
    /// Server → client: send your results, then read ours.
    pub const EXCHANGE_RESULTS: u8 = 13;
    /// Server → client: print the summary.
    pub const DISPLAY_RESULTS: u8 = 14;
    /// Client → server: last byte of a session.
    pub const IPERF_DONE: u8 = 16;
    /// Server → client: busy with another test (-1).
    pub const ACCESS_DENIED: u8 = 0xff;
    /// Server → client: error, followed by `i_errno` and `errno` as big-endian int32 (-2).
    pub const SERVER_ERROR: u8 = 0xfe;
}

/// iperf3 `i_errno` codes we send (`iperf_api.h`); the client prints its own text for each.
pub mod code {
    /// "number of parallel streams too large".
    pub const NUM_STREAMS: i32 = 6;
    /// "block size too large".
    pub const BLOCK_SIZE: i32 = 7;
    /// "bogus value for --omit".
    pub const OMIT: i32 = 12;
    /// "an option you are trying to set is not implemented yet".
    pub const NOT_IMPLEMENTED: i32 = 13;
    /// "block size invalid" (UDP).
    pub const UDP_BLOCK_SIZE: i32 = 20;
    /// "cannot be both reverse and bidirectional".
    pub const REVERSE_BIDIR: i32 = 25;
    /// "unable to receive cookie at server" (+ strerror).
    pub const RECEIVE_COOKIE: i32 = 106;
    /// "unable to receive parameters from client" (+ strerror).
    pub const RECEIVE_PARAMETERS: i32 = 114;
    /// "unable to create a new stream" (+ strerror).
    pub const CREATE_STREAM: i32 = 200;
}

/// Linux errno values the client turns into text with `strerror`.
pub mod errno {
    /// "Invalid argument".
    pub const EINVAL: i32 = 22;
    /// "Message too long".
    pub const EMSGSIZE: i32 = 90;
}

/// Length of the session cookie: 36 characters and a NUL.
pub const COOKIE_LEN: usize = 37;
/// Characters the client draws its cookie from (`make_cookie`, `iperf_util.c`).
const COOKIE_ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz234567";
/// The 4 bytes a UDP stream's first datagram carries ("9876"; content not checked).
pub const UDP_CONNECT_REQUEST_LEN: usize = 4;
/// What the server answers to a UDP stream's first datagram ("6789").
pub const UDP_CONNECT_REPLY: [u8; 4] = *b"6789";
/// Largest TCP block size the stock client allows (`MAX_BLOCKSIZE`).
pub const MAX_TCP_BLOCK: u64 = 1024 * 1024;
/// Length prefix of a JSON message on the control connection.
pub const LENGTH_PREFIX: usize = 4;

/// True when `byte` may stand at `index` of a cookie (rejects non-iperf clients early).
pub fn cookie_byte_ok(index: usize, byte: u8) -> bool {
    if index + 1 == COOKIE_LEN {
        byte == 0
    } else {
        COOKIE_ALPHABET.contains(&byte)
    }
}

/// The SERVER_ERROR message: state byte, `i_errno`, `errno`.
pub fn server_error_message(i_errno: i32, errno: i32) -> [u8; 9] {
    let mut message = [0u8; 9];
    message[0] = state::SERVER_ERROR;
    message[1..5].copy_from_slice(&i_errno.to_be_bytes());
    message[5..9].copy_from_slice(&errno.to_be_bytes());
    message
}

/// Transport of the data streams.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// TCP streams to the same port as the control connection.
    Tcp,
    /// UDP datagrams to the same port number.
    Udp,
}

impl Protocol {
    /// Lower-case name for logs.
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

/// Test parameters from the client's parameter message, validated.
#[derive(Clone, Debug, PartialEq)]
pub struct TestParams {
    /// Data stream transport.
    pub protocol: Protocol,
    /// Seconds at the start whose statistics are discarded (`-O`).
    pub omit_s: u64,
    /// Test length in seconds (0 when the client ends by bytes or blocks).
    pub time_s: u64,
    /// Streams per direction (`-P`).
    pub parallel: usize,
    /// The server sends (`-R`).
    pub reverse: bool,
    /// Both directions, `parallel` streams each (`--bidir`).
    pub bidirectional: bool,
    /// Block size: UDP datagram payload length, TCP write size.
    pub block_len: usize,
    /// Sending rate per stream in bit/s; 0 = unlimited.
    pub bandwidth_bps: u64,
    /// UDP sequence numbers are 64-bit.
    pub udp_counters_64bit: bool,
    /// The client wants our text report in the results.
    pub get_server_output: bool,
    /// Client's version string, for the log (sanitised, short).
    pub client_version: String,
    /// Socket buffer size the client asked for (`-w`), if any.
    pub window: Option<usize>,
}

impl TestParams {
    /// Data streams the client will open.
    pub fn stream_count(&self) -> usize {
        if self.bidirectional {
            self.parallel * 2
        } else {
            self.parallel
        }
    }

    /// Whether the `index`-th accepted stream (0-based) is one the server sends on: in
    /// `--bidir` the client connects its sending streams first, so ours come second.
    pub fn server_sends_on(&self, index: usize) -> bool {
        if self.bidirectional {
            index >= self.parallel
        } else {
            self.reverse
        }
    }
}

/// What this server supports, used to validate parameters.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Data streams per test at most (both directions together).
    pub max_streams: usize,
    /// Largest UDP payload that fits one IP packet to this client (no fragmentation).
    pub max_udp_payload: usize,
}

fn rejected(i_errno: i32, errno: i32, reason: String) -> Error {
    Error::Rejected {
        i_errno,
        errno,
        reason,
    }
}

/// A non-negative whole number member, `default` when absent; fractions are truncated like
/// cJSON's `valueint`.
fn unsigned(object: &Value, key: &str, default: u64) -> Result<u64, Error> {
    match object.get(key) {
        None => Ok(default),
        Some(value) => match value.as_number() {
            Some(number) if number >= 0.0 => Ok(number as u64),
            _ => Err(rejected(
                code::RECEIVE_PARAMETERS,
                errno::EINVAL,
                format!("parameter {key} is not a non-negative number"),
            )),
        },
    }
}

/// A flag is set by its mere presence, as iperf3's get_parameters reads it (clients send
/// flags only when set, as `true` or `1`).
fn flag(object: &Value, key: &str) -> bool {
    object.get(key).is_some()
}

/// Parses and validates the parameter message body.
pub fn parse_params(body: &[u8], limits: &Limits) -> Result<TestParams, Error> {
    let object = json::parse(body).map_err(|error| {
        rejected(
            code::RECEIVE_PARAMETERS,
            errno::EINVAL,
            format!("parameters: {error}"),
        )
    })?;
    if !matches!(object, Value::Object(_)) {
        return Err(rejected(
            code::RECEIVE_PARAMETERS,
            errno::EINVAL,
            "parameters are not a JSON object".into(),
        ));
    }
    // Like iperf3's get_parameters: later keys override earlier ones, TCP is the default.
    let protocol = if flag(&object, "sctp") {
        return Err(rejected(
            code::NOT_IMPLEMENTED,
            0,
            "SCTP is not supported".into(),
        ));
    } else if flag(&object, "udp") {
        Protocol::Udp
    } else {
        Protocol::Tcp
    };
    let reverse = flag(&object, "reverse");
    let bidirectional = flag(&object, "bidirectional");
    if reverse && bidirectional {
        return Err(rejected(
            code::REVERSE_BIDIR,
            0,
            "both reverse and bidirectional".into(),
        ));
    }
    let parallel = unsigned(&object, "parallel", 1)?;
    let directions = if bidirectional { 2 } else { 1 };
    if parallel == 0 || parallel.saturating_mul(directions) > limits.max_streams as u64 {
        return Err(rejected(
            code::NUM_STREAMS,
            0,
            format!(
                "{parallel} streams per direction; at most {} streams in all",
                limits.max_streams
            ),
        ));
    }
    let omit_s = object
        .get("omit")
        .map_or(Ok(0), |value| match value.as_number() {
            Some(number) if (0.0..=86_400.0).contains(&number) => Ok(number as u64),
            _ => Err(rejected(code::OMIT, 0, "bad omit value".into())),
        })?;
    let time_s = unsigned(&object, "time", 0)?;
    let bandwidth_bps = unsigned(&object, "bandwidth", 0)?;
    let udp_counters_64bit = flag(&object, "udp_counters_64bit");
    let default_len = match protocol {
        Protocol::Tcp => 128 * 1024,
        // iperf3's own default datagram size, where a client leaves `len` out.
        Protocol::Udp => (limits.max_udp_payload as u64).min(1460),
    };
    let block_len = unsigned(&object, "len", default_len)?;
    let header_len: u64 = if udp_counters_64bit { 16 } else { 12 };
    match protocol {
        Protocol::Tcp if block_len == 0 || block_len > MAX_TCP_BLOCK => {
            return Err(rejected(
                code::BLOCK_SIZE,
                0,
                format!("TCP block size {block_len}"),
            ));
        }
        Protocol::Udp if block_len < header_len => {
            return Err(rejected(
                code::UDP_BLOCK_SIZE,
                0,
                format!("UDP datagram size {block_len} is below the {header_len}-byte header"),
            ));
        }
        Protocol::Udp if block_len > limits.max_udp_payload as u64 => {
            // Larger than any datagram to this client (IPv4: 65507 bytes, as fragments; IPv6:
            // one packet, there is no IPv6 fragmentation): tell the client "Message too long"
            // instead of losing every datagram.
            return Err(rejected(
                code::CREATE_STREAM,
                errno::EMSGSIZE,
                format!(
                    "UDP datagram size {block_len} exceeds {}, the largest to this client; use -l",
                    limits.max_udp_payload
                ),
            ));
        }
        _ => {}
    }
    // iperf3 sends `window` only with -w; 0 means the system default, as in iperf3.
    let window = match unsigned(&object, "window", 0)? {
        0 => None,
        bytes => Some(usize::try_from(bytes).unwrap_or(usize::MAX)),
    };
    let client_version = object
        .get("client_version")
        .and_then(Value::as_str)
        .unwrap_or("unknown")
        .chars()
        .filter(|character| character.is_ascii_graphic())
        .take(32)
        .collect();
    Ok(TestParams {
        protocol,
        omit_s,
        time_s,
        parallel: parallel as usize,
        reverse,
        bidirectional,
        block_len: block_len as usize,
        bandwidth_bps,
        udp_counters_64bit,
        get_server_output: flag(&object, "get_server_output"),
        client_version,
        window,
    })
}

/// One stream's entry in our results message.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StreamResult {
    /// Stream id (1, 3, 4, ...).
    pub id: u32,
    /// Bytes sent (server sends) or received (server receives), after the omit period.
    pub bytes: u64,
    /// The server sends on this stream.
    pub sender: bool,
    /// UDP receive jitter in seconds (0 otherwise).
    pub jitter_s: f64,
    /// UDP datagrams lost (receiving streams).
    pub errors: u64,
    /// UDP datagrams: highest sequence number seen (receiving) or sent (sending).
    pub packets: u64,
    /// Seconds from the stream's (post-omit) start to the test end.
    pub seconds: f64,
}

/// Builds our results message body (without the length prefix).
///
/// `sender_has_retransmits` is 0 when any stream sends (smoltcp does not report
/// retransmissions, 0 makes the client hide the column) and -1 when the server only receives.
pub fn results_json(
    streams: &[StreamResult],
    protocol: Protocol,
    server_output: Option<&str>,
) -> String {
    let any_sender = streams.iter().any(|stream| stream.sender);
    let mut out = String::new();
    let mut object = ObjectWriter::new(&mut out);
    object
        .integer("cpu_util_total", 0)
        .integer("cpu_util_user", 0)
        .integer("cpu_util_system", 0)
        .integer("sender_has_retransmits", if any_sender { 0 } else { -1 });
    if protocol == Protocol::Tcp {
        object.string("congestion_used", "reno");
    }
    if let Some(text) = server_output {
        object.string("server_output_text", text);
    }
    object.array("streams", |array| {
        for stream in streams {
            array.object(|entry| {
                entry
                    .integer("id", i64::from(stream.id))
                    .integer("bytes", i64::try_from(stream.bytes).unwrap_or(i64::MAX))
                    .integer("retransmits", -1)
                    .number("jitter", stream.jitter_s)
                    .integer("errors", i64::try_from(stream.errors).unwrap_or(i64::MAX))
                    .integer("packets", i64::try_from(stream.packets).unwrap_or(i64::MAX))
                    .integer("start_time", 0)
                    .number("end_time", stream.seconds);
            });
        }
    });
    object.finish();
    out
}

/// Prefixes a message body with its big-endian length.
pub fn framed(body: &[u8]) -> Vec<u8> {
    let mut message = Vec::with_capacity(LENGTH_PREFIX + body.len());
    message.extend_from_slice(&(body.len() as u32).to_be_bytes());
    message.extend_from_slice(body);
    message
}

/// Writes the UDP header (send time and sequence number) at the start of `datagram`.
/// `datagram` must be at least 16 bytes (12 without 64-bit counters); callers validate `len`.
pub fn write_udp_header(datagram: &mut [u8], now_ns: u64, sequence: u64, counters_64bit: bool) {
    let seconds = (now_ns / 1_000_000_000) as u32;
    let microseconds = ((now_ns % 1_000_000_000) / 1_000) as u32;
    datagram[0..4].copy_from_slice(&seconds.to_be_bytes());
    datagram[4..8].copy_from_slice(&microseconds.to_be_bytes());
    if counters_64bit {
        datagram[8..16].copy_from_slice(&sequence.to_be_bytes());
    } else {
        datagram[8..12].copy_from_slice(&(sequence as u32).to_be_bytes());
    }
}

/// Send time (seconds) and sequence number of a received datagram; `None` when too short.
pub fn read_udp_header(datagram: &[u8], counters_64bit: bool) -> Option<(f64, u64)> {
    let word = |at: usize| -> Option<u32> {
        Some(u32::from_be_bytes(
            datagram.get(at..at + 4)?.try_into().ok()?,
        ))
    };
    let seconds = word(0)?;
    let microseconds = word(4)?;
    let sequence = if counters_64bit {
        u64::from_be_bytes(datagram.get(8..16)?.try_into().ok()?)
    } else {
        u64::from(word(8)?)
    };
    Some((
        f64::from(seconds) + f64::from(microseconds) / 1_000_000.0,
        sequence,
    ))
}

/// Loss, reordering and jitter of one receiving UDP stream (`iperf_udp_recv`).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct UdpReceiveStats {
    /// Highest sequence number seen (never reset by the omit period, like iperf3).
    pub packet_count: u64,
    /// Datagrams presumed lost (gaps, less late arrivals).
    pub errors: u64,
    /// Datagrams that arrived with a lower sequence number than an earlier one.
    pub out_of_order: u64,
    /// RFC 1889 inter-arrival jitter, seconds.
    pub jitter_s: f64,
    previous_transit_s: f64,
}

impl UdpReceiveStats {
    /// Accounts one datagram sent at `sent_s` (sender's clock) with `sequence`, arriving at
    /// `arrival_s` (our clock; only differences matter). `first` restarts the jitter estimate
    /// (first datagram after the start or the omit period).
    pub fn record(&mut self, sequence: u64, sent_s: f64, arrival_s: f64, first: bool) {
        if sequence > self.packet_count {
            // Saturating: the sequence number is the peer's and may be anything.
            self.errors = self.errors.saturating_add(sequence - 1 - self.packet_count);
            self.packet_count = sequence;
        } else {
            self.out_of_order += 1;
            self.errors = self.errors.saturating_sub(1);
        }
        // iperf_time_diff yields the absolute difference.
        let transit = absolute(arrival_s - sent_s);
        if first {
            self.previous_transit_s = transit;
        }
        let delta = absolute(transit - self.previous_transit_s);
        self.previous_transit_s = transit;
        self.jitter_s += (delta - self.jitter_s) / 16.0;
    }

    /// The omit period ended: iperf3 restarts the jitter estimate (counts continue).
    pub fn reset_jitter(&mut self) {
        self.jitter_s = 0.0;
    }
}

fn absolute(value: f64) -> f64 {
    if value < 0.0 { -value } else { value }
}

/// Paces a sending stream to a bit rate: a stream may send while it has sent less than the
/// rate allows since its start, plus one block (so a block always fits at the start), like
/// iperf3's throttle check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pacer {
    rate_bps: u64,
    start_ns: u64,
    sent: u64,
    block: u64,
}

const NS_PER_S: u128 = 1_000_000_000;

impl Pacer {
    /// A pacer for `rate_bps` (0 = unlimited) starting at `start_ns`, `block` bytes per send.
    pub fn new(rate_bps: u64, start_ns: u64, block: usize) -> Pacer {
        Pacer {
            rate_bps,
            start_ns,
            sent: 0,
            block: block.max(1) as u64,
        }
    }

    /// True when the stream is rate limited.
    pub fn is_limited(&self) -> bool {
        self.rate_bps != 0
    }

    /// Bytes the stream may send at `now_ns`.
    pub fn allowance(&self, now_ns: u64) -> u64 {
        if self.rate_bps == 0 {
            return u64::MAX;
        }
        let elapsed = u128::from(now_ns.saturating_sub(self.start_ns));
        let earned = u128::from(self.rate_bps) * elapsed / (8 * NS_PER_S);
        let allowed = earned.saturating_add(u128::from(self.block));
        u64::try_from(allowed.saturating_sub(u128::from(self.sent))).unwrap_or(u64::MAX)
    }

    /// Records `bytes` sent.
    pub fn sent(&mut self, bytes: usize) {
        self.sent = self.sent.saturating_add(bytes as u64);
    }

    /// When the allowance next becomes non-zero (`None` when unlimited).
    pub fn next_send_ns(&self) -> Option<u64> {
        if self.rate_bps == 0 {
            return None;
        }
        // allowance > 0  <=>  rate * elapsed / 8e9 > sent - block
        let owed = u128::from(self.sent.saturating_sub(self.block)) + 1;
        let rate = u128::from(self.rate_bps);
        let elapsed = (owed * 8 * NS_PER_S).div_ceil(rate);
        Some(
            self.start_ns
                .saturating_add(u64::try_from(elapsed).unwrap_or(u64::MAX)),
        )
    }
}
