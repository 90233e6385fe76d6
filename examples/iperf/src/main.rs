//! The `iperf` app: an iperf3-protocol server (TCP and UDP) on port 5201, or `iperf.port=N`.
//!
//! Works with the stock iperf3 3.x client: TCP and UDP, `-R`, `-P`, `--bidir`, `-b`, `-l`,
//! `-t`, `-O`, `--get-server-output`. One test at a time; other clients are told the server is
//! busy. Logs one summary line per test (`iperf: test done: ...`).
#![no_std]
#![no_main]

extern crate alloc;

use core::ops::ControlFlow;

use iperf::options::{Options, RawMode};
use iperf::server::{self, Server};

guest_kernel::app!(main);

/// Longest the app keeps the event loop while it waits for paced sends and traffic arrives.
const PACING_SLICE_NS: u64 = 10_000_000;

fn main() -> i32 {
    let options = match Options::from_cmdline(guest_kernel::cmdline_value) {
        Ok(options) => options,
        Err(_) => {
            log::error!("iperf: iperf.port must be a port number 1-65535");
            return 2;
        }
    };
    let port = options.port;
    let mut stack = match guest_kernel::net::bring_up() {
        Ok(stack) => stack,
        Err(error) => {
            log::error!("iperf: no network: {error}");
            return 3;
        }
    };
    match options.raw {
        Some(RawMode::Transmit) => return raw_transmit(&mut stack),
        Some(RawMode::Receive) => return raw_receive(&mut stack),
        None => {}
    }
    // Half the heap: the rest is the bond's queues, the control connection and whatever the
    // previous test's streams still hold while they close.
    let stream_buffer_budget = guest_kernel::mm::heap::heap_bytes() / 2;
    let mut server = match Server::new(&mut stack, port, stream_buffer_budget) {
        Ok(server) => server,
        Err(error) => {
            log::error!("iperf: cannot serve on port {port}: {error}");
            return 4;
        }
    };
    log::info!(
        "iperf: server listening on TCP and UDP port {port} (up to {} streams per test)",
        server::MAX_STREAMS
    );
    guest_kernel::net::run(&mut stack, |stack| {
        // The event loop sleeps until an interrupt or a network timer; a rate-limited sender
        // (UDP, or TCP with -b) needs to wake at its next send time, which the stack does not
        // know. So while such a send is pending and nothing else was queued, wait for it here
        // (an interrupt still ends the wait early), poll, and serve again. Returning only after
        // queueing data keeps the loop's own sleep short: queued data makes it poll at once.
        // While traffic keeps arriving, hand the loop back every slice anyway (its hot-plug
        // service runs only there); the traffic's next interrupt brings us back promptly.
        let entered = stack.now_ns();
        loop {
            if server.step(stack) {
                break;
            }
            let now = stack.now_ns();
            let Some(deadline) = server.pacing_deadline(now) else {
                break;
            };
            if deadline <= now {
                // Due but blocked by a full queue: the stack's sleep ends when it drains.
                break;
            }
            stack.wait_until(deadline);
            if stack.poll() && stack.now_ns().saturating_sub(entered) > PACING_SLICE_NS {
                break;
            }
        }
        ControlFlow::Continue(())
    })
}

/// `iperf.raw=tx`: the raw-frame ceiling of the active path. Sends pre-built 1514-byte
/// broadcast frames (local experimental ethertype 0x88B5, which hosts ignore) as fast as the
/// device takes them, bypassing TCP/IP, and logs the rate every second, so the stack's
/// throughput can be compared with what the path itself carries.
fn raw_transmit(stack: &mut net_stack::NetStack) -> i32 {
    let mut frame = alloc::vec![0x5au8; 1514];
    frame[..6].copy_from_slice(&[0xff; 6]);
    frame[6..12].copy_from_slice(&stack.mac_address().0);
    frame[12..14].copy_from_slice(&0x88b5u16.to_be_bytes());
    log::info!(
        "iperf: raw transmit of {}-byte frames on the active path",
        frame.len()
    );
    let mut window_start = stack.now_ns();
    let mut window_frames = 0u64;
    guest_kernel::net::run(stack, |stack| {
        match stack.transmit_raw_burst(&frame, 256) {
            Ok(sent) => window_frames += sent as u64,
            Err(error) => {
                log::error!("iperf: raw transmit refused: {error}");
                return ControlFlow::Break(5);
            }
        }
        let now = stack.now_ns();
        if now - window_start >= 1_000_000_000 {
            let seconds = (now - window_start) as f64 / 1e9;
            log::info!(
                "iperf: raw tx {} frames/s {:.3} Gbit/s",
                (window_frames as f64 / seconds) as u64,
                window_frames as f64 * frame.len() as f64 * 8.0 / seconds / 1e9
            );
            window_start = now;
            window_frames = 0;
        }
        ControlFlow::Continue(())
    })
}

/// `iperf.raw=rx`: the raw-frame receive ceiling. Serves nothing; logs every second how many
/// frames the NICs handed to the stack (a host floods the segment with frames meanwhile).
fn raw_receive(stack: &mut net_stack::NetStack) -> i32 {
    log::info!("iperf: raw receive: counting the frames the NICs deliver");
    let received = |stack: &net_stack::NetStack| {
        let stats = stack.stats();
        (
            stats.bond.total.device.rx_frames,
            stats.bond.total.device.rx_bytes,
        )
    };
    let mut window_start = stack.now_ns();
    let mut window_base = received(stack);
    guest_kernel::net::run(stack, |stack| {
        let now = stack.now_ns();
        if now - window_start >= 1_000_000_000 {
            let (frames, bytes) = received(stack);
            let seconds = (now - window_start) as f64 / 1e9;
            log::info!(
                "iperf: raw rx {} frames/s {:.3} Gbit/s",
                ((frames - window_base.0) as f64 / seconds) as u64,
                (bytes - window_base.1) as f64 * 8.0 / seconds / 1e9
            );
            window_start = now;
            window_base = (frames, bytes);
        }
        ControlFlow::Continue(())
    })
}
