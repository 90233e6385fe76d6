//! Echo clients: exact TCP round trips, a UDP sweep over datagram sizes, resetting and
//! non-reading TCP clients. Each reports what went wrong instead of panicking, so a test can
//! show every failure together with the guest's serial output.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, UdpSocket};
use std::sync::{Arc, Barrier, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tandem_tests::topology::close_with_reset;

/// xorshift64* generator: reproducible test data without a dependency.
pub struct XorShift(u64);

impl XorShift {
    /// A generator for `seed` (any value, zero included).
    pub fn new(seed: u64) -> XorShift {
        XorShift(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number in `low..=high`.
    pub fn between(&mut self, low: usize, high: usize) -> usize {
        low + (self.next_u64() % (high - low + 1) as u64) as usize
    }

    /// `len` random bytes.
    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(len + 8);
        while bytes.len() < len {
            bytes.extend_from_slice(&self.next_u64().to_le_bytes());
        }
        bytes.truncate(len);
        bytes
    }
}

/// Connects with a bounded wait and sets per-call read and write timeouts.
pub fn connect(address: SocketAddr, io_timeout: Duration) -> std::io::Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&address, Duration::from_secs(30))?;
    stream.set_read_timeout(Some(io_timeout))?;
    stream.set_write_timeout(Some(io_timeout))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Reads from `stream` until end of stream, checking every byte against `expected`. `Ok` only
/// if exactly `expected` came back before end of stream and `deadline`.
fn read_back_exactly(
    stream: &mut TcpStream,
    expected: &[u8],
    deadline: Instant,
) -> Result<(), String> {
    let mut received = 0usize;
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        if Instant::now() > deadline {
            return Err(format!(
                "deadline passed with {received} of {} bytes echoed",
                expected.len()
            ));
        }
        let count = match stream.read(&mut buffer) {
            Ok(0) => break,
            Ok(count) => count,
            Err(error) if error.kind() == ErrorKind::Interrupted => continue,
            Err(error) => {
                return Err(format!(
                    "read failed after {received} of {} bytes echoed: {error}",
                    expected.len()
                ));
            }
        };
        let chunk = &buffer[..count];
        let Some(want) = expected.get(received..received + count) else {
            return Err(format!(
                "{} bytes echoed, more than the {} sent",
                received + count,
                expected.len()
            ));
        };
        if let Some(offset) = chunk.iter().zip(want).position(|(got, want)| got != want) {
            return Err(format!(
                "echoed byte {} is {:#04x}, sent {:#04x}",
                received + offset,
                chunk[offset],
                want[offset]
            ));
        }
        received += count;
    }
    if received == expected.len() {
        Ok(())
    } else {
        Err(format!(
            "end of stream after {received} of {} bytes echoed",
            expected.len()
        ))
    }
}

/// How clients open their connections.
#[derive(Clone)]
pub enum Arrival {
    /// All at the same moment (a burst of SYNs).
    Burst,
    /// One at a time through this lock, each waiting for its first echo before the next
    /// connects. QEMU user networking accepts forwarded connections with a listen backlog of 1,
    /// so a burst of host connects overflows the host's accept queue and, with syncookies on,
    /// gets reset by the host kernel before the guest ever sees a SYN.
    OneAtATime(Arc<Mutex<()>>),
}

impl Arrival {
    /// One at a time, with a lock of its own.
    pub fn one_at_a_time() -> Arrival {
        Arrival::OneAtATime(Arc::new(Mutex::new(())))
    }
}

/// Bytes a staggered client sends and reads back before the next client connects.
const GREETING: usize = 64;

/// Connects as `arrival` says; for [`Arrival::OneAtATime`] also exchanges the first
/// [`GREETING`] bytes of `data`. Returns the stream and how many bytes were echoed already.
fn open(
    address: SocketAddr,
    arrival: &Arrival,
    data: &[u8],
    io_timeout: Duration,
) -> Result<(TcpStream, usize), String> {
    let connect = || connect(address, io_timeout).map_err(|error| format!("connect: {error}"));
    match arrival {
        Arrival::Burst => Ok((connect()?, 0)),
        Arrival::OneAtATime(turn) => {
            let _turn = turn.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            let mut stream = connect()?;
            let greeting = &data[..GREETING.min(data.len())];
            stream
                .write_all(greeting)
                .map_err(|error| format!("writing the first {} bytes: {error}", greeting.len()))?;
            let mut echoed = vec![0u8; greeting.len()];
            stream
                .read_exact(&mut echoed)
                .map_err(|error| format!("reading the first {} bytes: {error}", greeting.len()))?;
            if echoed != greeting {
                return Err("the first bytes came back different".to_string());
            }
            Ok((stream, greeting.len()))
        }
    }
}

/// One client: connects (all clients are connected before any sends more), sends `len`
/// random bytes (seeded by `seed`) in random-sized writes while a second thread reads the
/// echo back, then half-closes and expects exactly the same bytes followed by end of stream,
/// all before `deadline`.
fn tcp_round_trip(
    address: SocketAddr,
    arrival: &Arrival,
    all_connected: &Barrier,
    len: usize,
    seed: u64,
    deadline: Instant,
) -> Result<(), String> {
    let io_timeout = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_secs(1));
    let data = Arc::new(XorShift::new(seed).bytes(len));
    if matches!(arrival, Arrival::Burst) {
        all_connected.wait();
    }
    let opened = open(address, arrival, &data, io_timeout);
    if matches!(arrival, Arrival::OneAtATime(_)) {
        // Every client passes here exactly once, failed or not, so none waits forever.
        all_connected.wait();
    }
    let (mut reader, already) = opened?;
    let mut writer = reader
        .try_clone()
        .map_err(|error| format!("cloning the socket: {error}"))?;
    let to_send = Arc::clone(&data);
    // Writing and reading at once: a client that wrote everything before reading would stall
    // as soon as both directions' windows and the guest's buffer are full.
    let sending = std::thread::spawn(move || -> Result<(), String> {
        let mut sizes = XorShift::new(seed ^ 0x5EED);
        let mut sent = already;
        while sent < to_send.len() {
            let end = (sent + sizes.between(1, 32 * 1024)).min(to_send.len());
            writer
                .write_all(&to_send[sent..end])
                .map_err(|error| format!("write failed after {sent} bytes sent: {error}"))?;
            sent = end;
        }
        writer
            .shutdown(Shutdown::Write)
            .map_err(|error| format!("half-close: {error}"))
    });
    let read = read_back_exactly(&mut reader, &data[already..], deadline)
        .map_err(|error| format!("{error} (after the first {already})"));
    let sent = sending
        .join()
        .unwrap_or_else(|_| Err("writer thread panicked".to_string()));
    sent.and(read)
}

/// Runs `clients` round trips of `len` bytes at once (all connected before the data flows);
/// returns one line per failed client.
pub fn concurrent_round_trips(
    address: SocketAddr,
    arrival: &Arrival,
    clients: usize,
    len: usize,
    seed: u64,
    deadline: Instant,
) -> Vec<String> {
    let all_connected = Arc::new(Barrier::new(clients));
    let threads: Vec<JoinHandle<Result<(), String>>> = (0..clients)
        .map(|client| {
            let arrival = arrival.clone();
            let all_connected = Arc::clone(&all_connected);
            std::thread::spawn(move || {
                let seed = seed.wrapping_add(client as u64);
                tcp_round_trip(address, &arrival, &all_connected, len, seed, deadline)
            })
        })
        .collect();
    threads
        .into_iter()
        .enumerate()
        .filter_map(|(client, thread)| {
            let result = thread
                .join()
                .unwrap_or_else(|_| Err("client thread panicked".to_string()));
            result
                .err()
                .map(|error| format!("client {client} of {clients}: {error}"))
        })
        .collect()
}

/// What a UDP sweep saw.
#[derive(Debug, Default)]
pub struct UdpSweep {
    /// Datagrams sent (first tries and retries).
    pub sent: usize,
    /// Sizes echoed correctly.
    pub echoed: usize,
    /// Tries whose echo did not come back in time (each was retried).
    pub lost: usize,
    /// Sizes never echoed within all tries.
    pub never_echoed: Vec<usize>,
    /// Echoes with the right length but different contents, or a length never sent.
    pub corrupted: Vec<String>,
    /// Late echoes of earlier, already retried datagrams (harmless).
    pub late: usize,
}

/// Sends one datagram of each size in `sizes` through `socket` (connected to the echo port)
/// and waits up to `wait` for its exact echo, trying each size up to `tries` times.
pub fn udp_sweep(
    socket: &UdpSocket,
    sizes: std::ops::RangeInclusive<usize>,
    seed: u64,
    tries: usize,
    wait: Duration,
) -> UdpSweep {
    let mut random = XorShift::new(seed);
    let mut sweep = UdpSweep::default();
    let mut buffer = vec![0u8; 65536];
    let mut previous_sizes = std::collections::HashSet::new();
    for size in sizes {
        let payload = random.bytes(size);
        let mut echoed = false;
        for _ in 0..tries {
            if let Err(error) = socket.send(&payload) {
                sweep
                    .corrupted
                    .push(format!("size {size}: send failed: {error}"));
                break;
            }
            sweep.sent += 1;
            let deadline = Instant::now() + wait;
            while !echoed {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                // A zero timeout would mean "block forever".
                let _ = socket.set_read_timeout(Some(left.max(Duration::from_millis(1))));
                match socket.recv(&mut buffer) {
                    Ok(count) if buffer[..count] == payload[..] => echoed = true,
                    Ok(count) if count != size && previous_sizes.contains(&count) => {
                        sweep.late += 1
                    }
                    Ok(count) => sweep.corrupted.push(format!(
                        "sent {size} bytes, got back {count} bytes that differ"
                    )),
                    Err(error)
                        if matches!(error.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                    Err(error) => {
                        sweep
                            .corrupted
                            .push(format!("size {size}: receive failed: {error}"));
                        break;
                    }
                }
            }
            if echoed {
                break;
            }
            sweep.lost += 1;
        }
        previous_sizes.insert(size);
        if echoed {
            sweep.echoed += 1;
        } else {
            sweep.never_echoed.push(size);
        }
    }
    sweep
}

/// Connects as `arrival` says, sends `send` random bytes and reads back `read` of them (so the
/// guest has the connection and is echoing; for [`Arrival::OneAtATime`] at least the
/// greeting), then closes with a RST, leaving the rest of the echo unread.
pub fn reset_client(
    address: SocketAddr,
    arrival: &Arrival,
    send: usize,
    read: usize,
    seed: u64,
) -> Result<(), String> {
    let data = XorShift::new(seed).bytes(send);
    let (mut stream, mut echoed) = open(address, arrival, &data, Duration::from_secs(60))?;
    stream
        .write_all(&data[echoed.min(send)..])
        .map_err(|error| format!("write: {error}"))?;
    let mut buffer = vec![0u8; 16 * 1024];
    while echoed < read.min(send) {
        let want = (read.min(send) - echoed).min(buffer.len());
        let count = stream
            .read(&mut buffer[..want])
            .map_err(|error| format!("read after {echoed} bytes echoed: {error}"))?;
        if count == 0 {
            return Err(format!("end of stream after {echoed} bytes echoed"));
        }
        if buffer[..count] != data[echoed..echoed + count] {
            return Err(format!("echoed bytes {echoed}.. differ from those sent"));
        }
        echoed += count;
    }
    close_with_reset(stream).map_err(|error| format!("SO_LINGER 0: {error}"))
}

/// A client that writes without reading until its writes block, then stops writing.
pub struct StalledClient {
    stream: TcpStream,
    sent: Vec<u8>,
}

impl StalledClient {
    /// Connects and writes random data until a write blocks for `stall` (the guest stopped
    /// reading, as it must once its buffer for us is full). Fails if more than `limit` bytes
    /// went out without blocking.
    pub fn start(
        address: SocketAddr,
        arrival: &Arrival,
        seed: u64,
        stall: Duration,
        limit: usize,
    ) -> Result<StalledClient, String> {
        let mut random = XorShift::new(seed);
        let greeting = random.bytes(GREETING);
        let (mut stream, echoed) = open(address, arrival, &greeting, stall)?;
        stream
            .write_all(&greeting[echoed..])
            .map_err(|error| format!("write: {error}"))?;
        // Bytes written and not read back yet (the greeting's echo was read already).
        let mut sent = greeting[echoed..].to_vec();
        loop {
            if sent.len() > limit {
                return Err(format!(
                    "{} bytes written without ever blocking: nobody applies back-pressure",
                    sent.len()
                ));
            }
            let chunk = random.bytes(64 * 1024);
            match stream.write(&chunk) {
                Ok(0) => return Err("the connection closed while writing".to_string()),
                Ok(count) => sent.extend_from_slice(&chunk[..count]),
                Err(error)
                    if matches!(error.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) =>
                {
                    return Ok(StalledClient { stream, sent });
                }
                Err(error) if error.kind() == ErrorKind::Interrupted => {}
                Err(error) => {
                    return Err(format!("write failed after {} bytes: {error}", sent.len()));
                }
            }
        }
    }

    /// Bytes written before the writes blocked.
    pub fn sent(&self) -> usize {
        self.sent.len()
    }

    /// Half-closes, then reads everything back: all bytes written must come back, exactly.
    pub fn drain(mut self, deadline: Instant) -> Result<(), String> {
        self.stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .map_err(|error| error.to_string())?;
        self.stream
            .shutdown(Shutdown::Write)
            .map_err(|error| format!("half-close: {error}"))?;
        read_back_exactly(&mut self.stream, &self.sent, deadline)
    }
}
