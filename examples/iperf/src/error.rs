//! The app's error enum: why a client or a test was turned away or cut short.

use alloc::string::String;

use thiserror::Error;

/// Everything that ends a session early.
#[derive(Clone, Debug, PartialEq, Error)]
pub enum Error {
    /// A JSON message from the client is not valid JSON.
    #[error("bad JSON at byte {offset}: {reason}")]
    Json {
        /// Byte offset of the problem in the message body.
        offset: usize,
        /// What is wrong there.
        reason: &'static str,
    },
    /// The client asked for something this server cannot do; answered with SERVER_ERROR.
    #[error("refused ({reason}; iperf3 error {i_errno}, errno {errno})")]
    Rejected {
        /// iperf3's `i_errno` code sent to the client (it prints the matching message).
        i_errno: i32,
        /// Linux `errno` sent along (the client appends `strerror` for some codes), 0 for none.
        errno: i32,
        /// What exactly was refused, for our log.
        reason: String,
    },
    /// The peer broke the control protocol (bad cookie, unknown state byte, oversized message).
    #[error("protocol violation: {reason}")]
    Protocol {
        /// What it did.
        reason: String,
    },
    /// The client went away or gave up (EOF, CLIENT_TERMINATE, early IPERF_DONE).
    #[error("{reason}")]
    Disconnected {
        /// How.
        reason: &'static str,
    },
    /// A socket operation failed.
    #[error("{context}: {error}")]
    Net {
        /// What we were doing.
        context: &'static str,
        /// The stack's error.
        error: net_stack::Error,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;
    use core::error::Error as _;

    #[test]
    fn messages_carry_their_context() {
        let cases = [
            (
                Error::Json {
                    offset: 7,
                    reason: "expected a string",
                },
                "bad JSON at byte 7: expected a string",
            ),
            (
                Error::Rejected {
                    i_errno: 1,
                    errno: 22,
                    reason: "SCTP".into(),
                },
                "refused (SCTP; iperf3 error 1, errno 22)",
            ),
            (
                Error::Protocol {
                    reason: "bad cookie".into(),
                },
                "protocol violation: bad cookie",
            ),
            (
                Error::Disconnected {
                    reason: "client terminated",
                },
                "client terminated",
            ),
            (
                Error::Net {
                    context: "accepting the data connection",
                    error: net_stack::Error::Closed,
                },
                "accepting the data connection: connection closed",
            ),
        ];
        for (error, message) in cases {
            assert_eq!(error.to_string(), message);
            // The message already names the stack's error: a chain must not print it twice.
            assert!(error.source().is_none());
        }
    }
}
