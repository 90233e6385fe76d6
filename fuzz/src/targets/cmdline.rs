//! Target `cmdline`: the kernel command line (`ip=`, `gw=`, `dns=`, `mtu=`, `ip6=`, `gw6=`,
//! `key=value` lookup, the iperf app's options), built from grammar tokens and raw bytes.

use guest_kernel::boot::cmdline_value;
use iperf::options::Options;
use net_stack::NetConfig;
use net_stack::config::{MAX_DNS_SERVERS, MAX_MTU, MIN_MTU};

use crate::engine::{Input, Outcome, Steps, Target, check};

/// Pieces of the grammar; an input byte below their count picks one, any other byte is itself.
const TOKENS: &[&str] = &[
    "ip=",
    "gw=",
    "dns=",
    "mtu=",
    "ip6=",
    "gw6=",
    "iperf.port=",
    "iperf.raw=",
    "log=",
    " ",
    " ",
    "/",
    ".",
    ":",
    ",",
    "=",
    "10",
    "0",
    "255",
    "256",
    "24",
    "32",
    "33",
    "dhcp",
    "off",
    "none",
    "fe80::1",
    "2001:db8::15",
    "::",
    "10.0.2.15",
    "10.0.2.2",
    "1500",
    "9000",
    "65536",
    "tx",
    "rx",
    "-",
    "99999999999999999999",
    "\t",
    "\u{a0}",
    "é",
];

/// The command line a well-formed boot passes.
const GOOD: &str = "ip=10.0.2.15/24 gw=10.0.2.2 dns=10.0.2.3 mtu=1500 iperf.port=5201";

fn build(input: &mut Input) -> String {
    let mut line = String::new();
    while !input.is_empty() && line.len() < 2048 {
        let byte = input.u8();
        match TOKENS.get(usize::from(byte)) {
            Some(token) => line.push_str(token),
            None => line.push(char::from(byte)),
        }
    }
    line
}

fn run(input: &mut Input, steps: &mut Steps) -> Outcome {
    let line = build(input);
    steps.count(line.len() as u64)?;
    if let Ok(config) = NetConfig::from_cmdline(&line) {
        check(
            config
                .mtu
                .is_none_or(|mtu| (MIN_MTU..=MAX_MTU).contains(&mtu)),
            || {
                format!(
                    "accepted mtu {:?} outside {MIN_MTU}..={MAX_MTU}",
                    config.mtu
                )
            },
        )?;
        check(config.dns.len() <= MAX_DNS_SERVERS, || {
            format!("kept {} DNS servers", config.dns.len())
        })?;
    }
    for key in ["ip", "gw", "mtu", "iperf.port", "log", ""] {
        if let Some(value) = cmdline_value(&line, key) {
            check(line.contains(value), || {
                format!("cmdline_value({key}) returned {value:?}, not part of the line")
            })?;
        }
    }
    if let Ok(options) = Options::from_cmdline(|key| cmdline_value(&line, key)) {
        check(options.port != 0, || "iperf accepted port 0".to_string())?;
    }
    // Parsing keeps no state, so a well-formed line after a hostile one must still parse.
    let good =
        NetConfig::from_cmdline(GOOD).map_err(|error| format!("good line rejected: {error}"))?;
    check(good.mtu == Some(1500), || {
        "good line lost its mtu".to_string()
    })?;
    check(
        Options::from_cmdline(|key| cmdline_value(GOOD, key))
            .is_ok_and(|options| options.port == 5201),
        || "good iperf options rejected".to_string(),
    )
}

fn seeds() -> Vec<Vec<u8>> {
    let token = |text: &str| TOKENS.iter().position(|token| *token == text).unwrap() as u8;
    vec![
        vec![
            token("ip="),
            token("10.0.2.15"),
            token("/"),
            token("24"),
            token(" "),
            token("gw="),
            token("10.0.2.2"),
        ],
        vec![
            token("ip="),
            token("dhcp"),
            token(" "),
            token("mtu="),
            token("9000"),
            token(" "),
            token("dns="),
            token("10.0.2.2"),
            token(","),
            token("fe80::1"),
        ],
        vec![
            token("ip6="),
            token("2001:db8::15"),
            token("/"),
            token("33"),
            token(" "),
            token("gw6="),
            token("fe80::1"),
        ],
        GOOD.bytes().collect(),
        b"ip=10.0.2.15::10.0.2.2:255.255.255.0:host:eth0:off:10.0.2.3:10.0.2.4".to_vec(),
        vec![
            token("iperf.port="),
            token("65536"),
            token(" "),
            token("iperf.raw="),
            token("tx"),
        ],
    ]
}

/// The registration.
pub const TARGET: Target = Target {
    name: "cmdline",
    about: "kernel command line: ip=/gw=/dns=/mtu=/ip6=/gw6=, key lookup, iperf options",
    default_cases: 200_000,
    max_input_len: 512,
    memory_bound: 256 * 1024,
    step_bound: 4096,
    seeds,
    run,
};
