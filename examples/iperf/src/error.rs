//! The app's error enum: why a client or a test was turned away or cut short.

use alloc::string::String;
use core::fmt;

/// Everything that ends a session early.
#[derive(Clone, Debug, PartialEq)]
pub enum Error {
    /// A JSON message from the client is not valid JSON.
    Json {
        /// Byte offset of the problem in the message body.
        offset: usize,
        /// What is wrong there.
        reason: &'static str,
    },
    /// The client asked for something this server cannot do; answered with SERVER_ERROR.
    Rejected {
        /// iperf3's `i_errno` code sent to the client (it prints the matching message).
        i_errno: i32,
        /// Linux `errno` sent along (the client appends `strerror` for some codes), 0 for none.
        errno: i32,
        /// What exactly was refused, for our log.
        reason: String,
    },
    /// The peer broke the control protocol (bad cookie, unknown state byte, oversized message).
    Protocol {
        /// What it did.
        reason: String,
    },
    /// The client went away or gave up (EOF, CLIENT_TERMINATE, early IPERF_DONE).
    Disconnected {
        /// How.
        reason: &'static str,
    },
    /// A socket operation failed.
    Net {
        /// What we were doing.
        context: &'static str,
        /// The stack's error.
        source: net_stack::Error,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Json { offset, reason } => write!(f, "bad JSON at byte {offset}: {reason}"),
            Error::Rejected {
                i_errno,
                errno,
                reason,
            } => write!(
                f,
                "refused ({reason}; iperf3 error {i_errno}, errno {errno})"
            ),
            Error::Protocol { reason } => write!(f, "protocol violation: {reason}"),
            Error::Disconnected { reason } => f.write_str(reason),
            Error::Net { context, source } => write!(f, "{context}: {source}"),
        }
    }
}

impl core::error::Error for Error {}
