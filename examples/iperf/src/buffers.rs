//! Socket buffer sizes of a test's TCP streams, from its parameters and the memory budget.
//!
//! A receiving stream's buffer is its window. Too small, and the sender idles waiting for
//! room: under QEMU a 256 KiB window left a single VF stream at half of what the NIC
//! delivers, and every acknowledgement made the sender's TCP push its next burst from inside
//! our transmit, with the device emulation locked meanwhile. Too large, and the sender only
//! queues more in front of us until the path's buffers overflow (QEMU's tap queue of 500 frames
//! and our 1024-frame ring hold ~2.2 MB): four streams of 1.8 MiB each lost hundreds of
//! segments there. One stream gets [`MAX_STREAM_BUFFER`] (it lost none); several share
//! [`SHARED_WINDOW`]: their ACKs leave in one batch, so their bursts arrive together, and 2 MiB
//! shared still lost a few hundred segments in some runs where 1.5 MiB lost none. Each stays
//! within [`MIN_STREAM_BUFFER`]..=[`MAX_STREAM_BUFFER`] and within the memory budget. The direction a
//! stream does not use gets a token buffer, and the spare listening sockets that wait for the
//! streams count against the budget too: they carry the same buffers.

use net_stack::TcpOptions;

use crate::protocol::{Protocol, TestParams};

const KIB: usize = 1024;
const MIB: usize = 1024 * KIB;

/// Window per direction that several streams of a test share.
pub const SHARED_WINDOW: usize = 3 * MIB / 2;
/// Largest buffer per stream and direction: a lone stream's.
pub const MAX_STREAM_BUFFER: usize = 2 * MIB;
/// Smallest buffer of a direction a stream uses, however many streams share the budget.
pub const MIN_STREAM_BUFFER: usize = 32 * KIB;
/// Buffer of the direction a stream does not use (its cookie, or nothing at all).
pub const IDLE_DIRECTION_BUFFER: usize = 4 * KIB;
/// Spare listening sockets while the streams connect: iperf3 clients connect them one after
/// another, so a couple keep up.
pub const STREAM_SPARES: usize = 2;

/// The listener options while `params`' TCP streams connect: `control` with the streams'
/// buffers and spares, sized so that streams and spares together stay within `budget` bytes.
/// The client's `-w` (`window`) is honoured up to that share. UDP tests keep `control`.
pub fn stream_options(params: &TestParams, budget: usize, control: TcpOptions) -> TcpOptions {
    if params.protocol != Protocol::Tcp {
        return control;
    }
    let streams = params.stream_count().max(1);
    let spare_listeners = STREAM_SPARES.min(streams);
    let share = budget / (streams + spare_listeners);
    let directions = if params.bidirectional { 2 } else { 1 };
    let window = match params.parallel {
        0 | 1 => MAX_STREAM_BUFFER,
        parallel => (SHARED_WINDOW / parallel).min(MAX_STREAM_BUFFER),
    };
    let mut used = (share / directions).min(window);
    if let Some(window) = params.window {
        used = used.min(window);
    }
    let used = used.max(MIN_STREAM_BUFFER);
    let (rx_buffer, tx_buffer) = if params.bidirectional {
        (used, used)
    } else if params.reverse {
        (IDLE_DIRECTION_BUFFER, used)
    } else {
        (used, IDLE_DIRECTION_BUFFER)
    };
    TcpOptions {
        rx_buffer,
        tx_buffer,
        spare_listeners,
        ..control
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::String;

    fn params(parallel: usize, reverse: bool, bidirectional: bool) -> TestParams {
        TestParams {
            protocol: Protocol::Tcp,
            omit_s: 0,
            time_s: 5,
            parallel,
            reverse,
            bidirectional,
            block_len: 128 * KIB,
            bandwidth_bps: 0,
            udp_counters_64bit: false,
            get_server_output: false,
            client_version: String::new(),
            window: None,
        }
    }

    fn control() -> TcpOptions {
        TcpOptions {
            spare_listeners: 4,
            keep_alive_ms: Some(1_000),
            ..TcpOptions::default()
        }
    }

    /// Bytes of socket buffers while all streams and spares exist.
    fn total(params: &TestParams, options: &TcpOptions) -> usize {
        (params.stream_count() + options.spare_listeners) * (options.rx_buffer + options.tx_buffer)
    }

    #[test]
    fn one_receiving_stream_gets_the_largest_window_and_a_token_send_buffer() {
        let test = params(1, false, false);
        let options = stream_options(&test, 11 * MIB, control());
        assert_eq!(options.rx_buffer, MAX_STREAM_BUFFER);
        assert_eq!(options.tx_buffer, IDLE_DIRECTION_BUFFER);
        assert_eq!(options.spare_listeners, 1);
        // Everything else is the control connection's.
        assert_eq!(options.keep_alive_ms, Some(1_000));
        assert_eq!(options.max_connections, control().max_connections);
    }

    #[test]
    fn streams_share_the_budget_in_the_direction_they_use() {
        let budget = 11 * MIB;
        let four = params(4, false, false);
        let options = stream_options(&four, budget, control());
        // The test's window is shared: more streams do not queue more in front of us.
        assert_eq!(options.rx_buffer, SHARED_WINDOW / 4);
        assert!(total(&four, &options) <= budget + 6 * IDLE_DIRECTION_BUFFER);
        // The memory budget comes first.
        let options = stream_options(&four, MIB, control());
        assert_eq!(options.rx_buffer, MIB / 6);
        let reverse = params(4, true, false);
        let options = stream_options(&reverse, budget, control());
        assert_eq!(
            (options.rx_buffer, options.tx_buffer),
            (IDLE_DIRECTION_BUFFER, SHARED_WINDOW / 4)
        );
        // --bidir: every stream may end up either way round, so both directions get half.
        let bidir = params(16, false, true);
        let options = stream_options(&bidir, budget, control());
        assert_eq!(options.rx_buffer, options.tx_buffer);
        assert_eq!(options.rx_buffer, SHARED_WINDOW / 16);
        assert!(total(&bidir, &options) <= budget);
        let options = stream_options(&bidir, 4 * MIB, control());
        assert_eq!(options.rx_buffer, 4 * MIB / 34 / 2);
    }

    #[test]
    fn a_small_budget_still_gives_each_stream_a_usable_window() {
        let options = stream_options(&params(32, false, false), MIB, control());
        assert_eq!(options.rx_buffer, MIN_STREAM_BUFFER);
    }

    #[test]
    fn the_clients_window_is_honoured_within_the_share() {
        let mut test = params(1, false, false);
        test.window = Some(256 * KIB);
        assert_eq!(
            stream_options(&test, 11 * MIB, control()).rx_buffer,
            256 * KIB
        );
        test.window = Some(64 * MIB);
        assert_eq!(
            stream_options(&test, 11 * MIB, control()).rx_buffer,
            MAX_STREAM_BUFFER
        );
        test.window = Some(1);
        assert_eq!(
            stream_options(&test, 11 * MIB, control()).rx_buffer,
            MIN_STREAM_BUFFER
        );
    }

    #[test]
    fn udp_tests_keep_the_control_options() {
        let mut test = params(4, false, false);
        test.protocol = Protocol::Udp;
        assert_eq!(stream_options(&test, 11 * MIB, control()), control());
    }
}
