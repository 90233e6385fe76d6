//! What the stock iperf3 client is asked to do in the iperf tests, and how its human-readable
//! report is read: the per-stream and `[SUM]` receiver lines with their rates.

/// One client invocation that must succeed, with what the client and the app must show.
#[derive(Clone, Copy, Debug)]
pub struct Mode {
    /// The client's arguments after `-c <guest> -p <port>`.
    pub args: &'static str,
    /// Fragments the app's parameter line for the test must contain.
    pub parameters: &'static [&'static str],
    /// Fragments the app's `iperf: test done:` line must contain.
    pub summary: &'static [&'static str],
    /// Fragments the client's output must contain.
    pub output: &'static [&'static str],
    /// Whether the report has separate sending (`TX-C`) and receiving (`RX-C`) halves.
    pub bidirectional: bool,
}

impl Mode {
    /// A mode with no expectations beyond success and non-zero throughput.
    pub const fn plain(args: &'static str) -> Mode {
        Mode {
            args,
            parameters: &[],
            summary: &[],
            output: &[],
            bidirectional: false,
        }
    }
}

/// Every mode the app supports, with short runs (the suite boots one guest per path and runs
/// them all against it).
pub const MODES: &[Mode] = &[
    Mode {
        summary: &["tcp reverse=no streams=1 ", "bidir=no"],
        // One receiving stream: the largest window, a token send buffer.
        parameters: &["time=3", "window=0 buffers=2097152/4096 "],
        ..Mode::plain("-t 3")
    },
    Mode {
        // The client's -w sizes the streams' buffers (the used direction only).
        parameters: &["window=131072 buffers=131072/4096 "],
        summary: &["tcp reverse=no streams=1 "],
        ..Mode::plain("-t 2 -w 128K")
    },
    Mode {
        summary: &["tcp reverse=yes streams=1 "],
        ..Mode::plain("-t 3 -R")
    },
    Mode {
        summary: &["tcp reverse=no streams=4 "],
        // Four streams share 1.5 MiB of window.
        parameters: &["buffers=393216/4096 "],
        output: &["[SUM]"],
        ..Mode::plain("-t 3 -P 4")
    },
    Mode {
        summary: &["streams=2 ", "bidir=yes"],
        bidirectional: true,
        ..Mode::plain("-t 3 --bidir")
    },
    Mode {
        summary: &["streams=32 ", "bidir=yes"],
        bidirectional: true,
        ..Mode::plain("-t 2 -P 16 --bidir")
    },
    Mode {
        parameters: &["len=1400", "bandwidth=10000000"],
        summary: &["udp reverse=no streams=1 ", " lost="],
        ..Mode::plain("-u -t 3 -b 10M -l 1400")
    },
    Mode {
        parameters: &["len=1400"],
        summary: &["udp reverse=yes streams=1 "],
        ..Mode::plain("-u -t 3 -R -b 10M -l 1400")
    },
    Mode {
        parameters: &["omit=1"],
        summary: &["tcp reverse=no streams=1 "],
        ..Mode::plain("-t 3 -O 1")
    },
    Mode {
        parameters: &["omit=1", "len=1400"],
        summary: &["udp reverse=no streams=1 "],
        ..Mode::plain("-u -t 3 -O 1 -b 10M -l 1400")
    },
    Mode {
        summary: &["tcp reverse=no streams=1 "],
        output: &["Server output:", "Tandem iperf server"],
        ..Mode::plain("-t 2 --get-server-output")
    },
    Mode {
        parameters: &["len=1024"],
        summary: &["tcp reverse=no streams=1 "],
        ..Mode::plain("-t 2 -l 1K")
    },
    Mode {
        parameters: &["len=1024"],
        summary: &["udp reverse=no streams=1 "],
        ..Mode::plain("-u -t 2 -l 1K -b 10M")
    },
    // Datagrams beyond the MTU travel as IPv4 fragments, reassembled by the guest...
    Mode {
        parameters: &["len=16000"],
        summary: &["udp reverse=no streams=1 "],
        ..Mode::plain("-u -t 2 -l 16000 -b 10M")
    },
    // ... and fragmented by it.
    Mode {
        parameters: &["len=16000"],
        summary: &["udp reverse=yes streams=1 "],
        ..Mode::plain("-u -t 2 -R -l 16000 -b 10M")
    },
];

/// One client invocation the app must refuse, with the message the client prints.
#[derive(Clone, Copy, Debug)]
pub struct Refusal {
    /// The client's arguments.
    pub args: &'static str,
    /// What the client's error message must contain.
    pub message: &'static str,
    /// What the app's log line about it must contain.
    pub log: &'static str,
}

/// Requests the app turns down.
pub const REFUSALS: &[Refusal] = &[
    Refusal {
        args: "-t 1 --sctp",
        message: "not implemented yet",
        log: "refused (SCTP",
    },
    Refusal {
        args: "-t 1 -P 33",
        message: "parallel streams too large",
        log: "refused (33 streams",
    },
];

/// One `... receiver` line of the client's final report.
#[derive(Clone, Debug, PartialEq)]
pub struct ReceiverLine {
    /// The stream id, or `SUM`.
    pub stream: String,
    /// `TX-C` or `RX-C` in a bidirectional report.
    pub role: Option<String>,
    /// The receiver's rate.
    pub bits_per_second: f64,
}

/// The receiver lines of a report, e.g. `[  5][TX-C]   0.00-3.01   sec   142 MBytes   397
/// Mbits/sec                  receiver` or `[SUM]   0.00-3.01   sec   360 MBytes  1.00
/// Gbits/sec                  receiver`.
pub fn receiver_lines(report: &str) -> Vec<ReceiverLine> {
    report
        .lines()
        .filter(|line| line.trim_end().ends_with("receiver"))
        .filter_map(parse_receiver_line)
        .collect()
}

fn parse_receiver_line(line: &str) -> Option<ReceiverLine> {
    let mut rest = line.trim_start();
    let mut tags = Vec::new();
    while let Some(tagged) = rest.strip_prefix('[') {
        let (tag, after) = tagged.split_once(']')?;
        tags.push(tag.trim().to_string());
        rest = after;
    }
    let mut tags = tags.into_iter();
    let stream = tags.next()?;
    let role = tags.next();
    let words: Vec<&str> = rest.split_whitespace().collect();
    let unit_at = words.iter().position(|word| word.ends_with("bits/sec"))?;
    let scale = match words[unit_at].trim_end_matches("bits/sec") {
        "" => 1.0,
        "K" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        _ => return None,
    };
    let value: f64 = words.get(unit_at.checked_sub(1)?)?.parse().ok()?;
    Some(ReceiverLine {
        stream,
        role,
        bits_per_second: value * scale,
    })
}

/// Checks that every half of the report (`roles`: `None` for a one-way test) has receiver
/// lines and that they all show a rate above zero: the `[SUM]` lines when there are several
/// streams, else the stream's own line. Returns the rates checked, or what is wrong.
pub fn check_throughput(report: &str, roles: &[Option<&str>]) -> Result<Vec<f64>, String> {
    let lines = receiver_lines(report);
    let mut rates = Vec::new();
    for role in roles {
        let of_role: Vec<&ReceiverLine> = lines
            .iter()
            .filter(|line| line.role.as_deref() == *role)
            .collect();
        let sums: Vec<&ReceiverLine> = of_role
            .iter()
            .copied()
            .filter(|line| line.stream == "SUM")
            .collect();
        let checked = if sums.is_empty() { of_role } else { sums };
        let half = role.unwrap_or("the test");
        if checked.is_empty() {
            return Err(format!(
                "no receiver line for {half} in the client's report"
            ));
        }
        for line in checked {
            if line.bits_per_second <= 0.0 {
                return Err(format!(
                    "receiver line of stream {} ({half}) shows no throughput",
                    line.stream
                ));
            }
            rates.push(line.bits_per_second);
        }
    }
    Ok(rates)
}

/// The `Mbit/s=` value of the app's `iperf: test done:` line.
pub fn summary_rate(line: &str) -> Option<f64> {
    line.split_whitespace()
        .find_map(|word| word.strip_prefix("Mbit/s="))?
        .parse()
        .ok()
}

#[test]
fn receiver_lines_of_one_stream_several_and_bidirectional_reports() {
    let single = "\
[ ID] Interval           Transfer     Bitrate         Retr
[  5]   0.00-3.00   sec   357 MBytes   998 Mbits/sec    0             sender
[  5]   0.00-3.01   sec   354 MBytes   989 Mbits/sec                  receiver
";
    assert_eq!(
        receiver_lines(single),
        [ReceiverLine {
            stream: "5".to_string(),
            role: None,
            bits_per_second: 989e6
        }]
    );
    assert_eq!(check_throughput(single, &[None]), Ok(vec![989e6]));

    let parallel = "\
[  9]   0.00-3.02   sec  88.9 MBytes   247 Mbits/sec                  receiver
[ 12]   0.00-3.02   sec  85.6 MBytes   0.00 bits/sec                  receiver
[SUM]   0.00-3.00   sec   369 MBytes  1.03 Gbits/sec    0             sender
[SUM]   0.00-3.02   sec   363 MBytes  1.01 Gbits/sec                  receiver
";
    // With several streams the sum decides, even if one stream starved.
    assert_eq!(check_throughput(parallel, &[None]), Ok(vec![1.01e9]));

    let bidirectional = "\
[  5][TX-C]   0.00-3.01   sec   142 MBytes   397 Mbits/sec                  receiver
[  7][RX-C]   0.00-3.01   sec   140 MBytes   0.00 bits/sec                  receiver
";
    let roles = [Some("TX-C"), Some("RX-C")];
    let error = check_throughput(bidirectional, &roles).unwrap_err();
    assert!(error.contains("stream 7 (RX-C)"), "{error}");
    let error =
        check_throughput("[  5] 0.00-3.01 sec 1 MBytes 3 Kbits/sec receiver", &roles).unwrap_err();
    assert!(error.contains("no receiver line for TX-C"), "{error}");

    let udp =
        "[  5]   0.00-3.01   sec  3.58 MBytes  9.95 Mbits/sec  0.087 ms  0/2678 (0%)  receiver";
    assert_eq!(check_throughput(udp, &[None]), Ok(vec![9.95e6]));
    assert_eq!(check_throughput("iperf3: error - busy", &[None]).ok(), None);
}

#[test]
fn summary_rate_is_read_from_the_done_line() {
    let line = "[   22.717556] INFO  iperf: test done: tcp reverse=yes streams=1 bytes_received=0 \
                seconds=3.008 Mbit/s=564.39 bidir=no bytes_sent=212235928";
    assert_eq!(summary_rate(line), Some(564.39));
    assert_eq!(summary_rate("iperf: test done: tcp"), None);
}
