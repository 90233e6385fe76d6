//! The iperf app's logic as a library: control protocol, JSON, server and command-line options,
//! so host tests and the fuzz harness (`fuzz/`) reach the code that reads what a peer sends.
#![cfg_attr(not(test), no_std)]

extern crate alloc;

pub mod buffers;
pub mod error;
pub mod json;
pub mod options;
pub mod protocol;
pub mod server;
