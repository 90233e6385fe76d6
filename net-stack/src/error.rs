//! The crate's error enum.

use alloc::string::String;
use core::fmt;

use net_device::MacAddress;
use smoltcp::wire::IpEndpoint;

/// Everything that can go wrong in the network stack.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Error {
    /// A kernel command line argument could not be used.
    Config {
        /// The offending argument as written, e.g. `ip=10.0.2.300/24`.
        argument: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The synthetic NIC reported a MAC that cannot be an interface address.
    InvalidMac {
        /// The MAC the device reported.
        mac: MacAddress,
    },
    /// A VF is already attached; detach it first.
    VfAlreadyAttached {
        /// Name of the VF that is attached.
        attached: String,
    },
    /// The handle does not name a live socket of this stack (already closed, or from another
    /// stack).
    InvalidHandle,
    /// The connection is gone: reset by the peer, aborted, timed out, or fully closed. Nothing
    /// more can be read or written.
    Closed,
    /// The peer finished sending (FIN received) and all its data has been read: end of stream.
    /// Writing may still be possible.
    PeerClosed,
    /// A listener or socket already uses this port.
    AddressInUse {
        /// The port.
        port: u16,
    },
    /// Port 0 cannot be listened on.
    InvalidPort,
    /// Every ephemeral port is in use.
    NoEphemeralPort,
    /// The destination cannot be used (unspecified address or port, or no source address of
    /// that IP version configured yet).
    Unaddressable {
        /// The endpoint that was asked for.
        endpoint: IpEndpoint,
    },
    /// The socket's transmit buffer is full; retry after the stack has polled.
    WouldBlock,
    /// The datagram is larger than one IP packet on this interface can carry (no fragmentation).
    DatagramTooLarge {
        /// Requested payload length.
        len: usize,
        /// Largest payload that fits.
        max: usize,
    },
    /// A received datagram did not fit the buffer; it was consumed and its first
    /// `buffer_len` bytes were copied.
    Truncated {
        /// Length of the datagram.
        datagram_len: usize,
        /// Length of the buffer given.
        buffer_len: usize,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Config { argument, reason } => {
                write!(f, "kernel command line `{argument}`: {reason}")
            }
            Error::InvalidMac { mac } => {
                write!(f, "MAC {mac} is not a valid unicast interface address")
            }
            Error::VfAlreadyAttached { attached } => {
                write!(f, "a VF ({attached}) is already attached")
            }
            Error::InvalidHandle => write!(f, "socket handle is not live"),
            Error::Closed => write!(f, "connection closed"),
            Error::PeerClosed => write!(f, "peer closed the connection (end of stream)"),
            Error::AddressInUse { port } => write!(f, "port {port} is already in use"),
            Error::InvalidPort => write!(f, "port 0 is not a valid listening port"),
            Error::NoEphemeralPort => write!(f, "no free ephemeral port"),
            Error::Unaddressable { endpoint } => {
                write!(f, "cannot address {endpoint} (no route or source address)")
            }
            Error::WouldBlock => write!(f, "transmit buffer full, try again after polling"),
            Error::DatagramTooLarge { len, max } => {
                write!(f, "datagram of {len} bytes exceeds the maximum of {max}")
            }
            Error::Truncated {
                datagram_len,
                buffer_len,
            } => write!(
                f,
                "datagram of {datagram_len} bytes truncated to the {buffer_len}-byte buffer"
            ),
        }
    }
}

impl core::error::Error for Error {}
