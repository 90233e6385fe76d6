//! Target `iperf-control`: what an iperf3 client controls besides raw JSON: the parameter
//! message (validated against our limits), the cookie, UDP datagram headers and the loss and
//! jitter accounting fed by them, and the pacer driven by the client's rate.

use iperf::protocol::{self, COOKIE_LEN, Limits, MAX_TCP_BLOCK, Pacer, Protocol, UdpReceiveStats};

use crate::engine::{Input, Outcome, Steps, Target, check, monotonic};

const LIMITS: Limits = Limits {
    max_streams: 8,
    max_udp_payload: 1472,
};

const GOOD: &[u8] = br#"{"udp":true,"omit":0,"time":10,"parallel":2,"len":1400,"bandwidth":1000000,"udp_counters_64bit":1,"client_version":"3.12"}"#;

fn udp_counters(stats: &UdpReceiveStats) -> [(&'static str, u64); 2] {
    [
        ("packet_count", stats.packet_count),
        ("out_of_order", stats.out_of_order),
    ]
}

fn run(input: &mut Input, steps: &mut Steps) -> Outcome {
    let body = input.bytes(1024);
    steps.count(body.len() as u64)?;
    if let Ok(params) = protocol::parse_params(body, &LIMITS) {
        check(
            params.stream_count() <= LIMITS.max_streams && params.parallel > 0,
            || format!("accepted {} streams", params.stream_count()),
        )?;
        match params.protocol {
            Protocol::Tcp => check(
                (1..=MAX_TCP_BLOCK as usize).contains(&params.block_len),
                || format!("accepted TCP block {}", params.block_len),
            )?,
            Protocol::Udp => check(
                (12..=LIMITS.max_udp_payload).contains(&params.block_len),
                || format!("accepted UDP block {}", params.block_len),
            )?,
        }
        check(params.client_version.len() <= 32, || {
            "long client version kept".to_string()
        })?;
        let mut pacer = Pacer::new(params.bandwidth_bps, input.u64(), params.block_len);
        for _ in 0..4 {
            let now = input.u64();
            let allowance = pacer.allowance(now);
            pacer.sent(allowance.min(1 << 40) as usize);
            let _ = pacer.next_send_ns();
        }
    }
    // Cookie bytes as the server checks them.
    let cookie = input.take(COOKIE_LEN);
    let accepted = cookie
        .iter()
        .enumerate()
        .all(|(index, byte)| protocol::cookie_byte_ok(index, *byte));
    if accepted && cookie.len() == COOKIE_LEN {
        check(cookie[COOKIE_LEN - 1] == 0, || {
            "cookie without NUL accepted".to_string()
        })?;
    }
    // A stream of datagrams with hostile headers.
    let counters_64bit = input.bool();
    let mut stats = UdpReceiveStats::default();
    let mut arrival = 0.0;
    let mut first = true;
    while !input.is_empty() {
        steps.count(1)?;
        let datagram = input.bytes(24);
        arrival += f64::from(input.u8()) / 1000.0;
        if let Some((sent, sequence)) = protocol::read_udp_header(datagram, counters_64bit) {
            let before = udp_counters(&stats);
            stats.record(sequence, sent, arrival, first);
            first = false;
            monotonic("udp", &before, &udp_counters(&stats))?;
            check(stats.jitter_s.is_finite(), || {
                format!("jitter {}", stats.jitter_s)
            })?;
        } else {
            check(
                datagram.len() < if counters_64bit { 16 } else { 12 },
                || format!("{}-byte datagram header refused", datagram.len()),
            )?;
        }
    }
    check(
        protocol::parse_params(GOOD, &LIMITS).is_ok_and(|params| params.parallel == 2),
        || "well-formed parameters rejected".to_string(),
    )
}

fn seeds() -> Vec<Vec<u8>> {
    let with_len = |body: &[u8], rest: &[u8]| {
        let mut bytes = (body.len() as u16).to_le_bytes().to_vec();
        bytes.extend_from_slice(body);
        bytes.extend_from_slice(rest);
        bytes
    };
    let mut cookie_and_datagrams = b"abcdefghijklmnopqrstuvwxyz2345672345\0\x01".to_vec();
    for sequence in [1u64, 2, 5, 3, u64::MAX, 0] {
        cookie_and_datagrams.push(16);
        cookie_and_datagrams.extend_from_slice(&[0, 0, 0, 9, 0, 0, 0x12, 0x34]);
        cookie_and_datagrams.extend_from_slice(&sequence.to_be_bytes());
        cookie_and_datagrams.push(3);
    }
    vec![
        with_len(GOOD, &cookie_and_datagrams),
        with_len(
            br#"{"tcp":true,"time":10,"parallel":4,"bidirectional":true,"len":131072}"#,
            &cookie_and_datagrams,
        ),
        with_len(
            br#"{"reverse":1,"time":1e300,"bandwidth":1.8e19,"len":1048576,"omit":86400}"#,
            b"",
        ),
        with_len(
            br#"{"udp":1,"len":12,"parallel":8,"bandwidth":18446744073709551615}"#,
            &cookie_and_datagrams,
        ),
    ]
}

/// The registration.
pub const TARGET: Target = Target {
    name: "iperf-control",
    about: "iperf3 parameters vs limits, cookie, UDP headers, loss/jitter accounting, pacer",
    default_cases: 150_000,
    max_input_len: 2048,
    memory_bound: 512 * 1024,
    step_bound: 4096,
    seeds,
    run,
};
