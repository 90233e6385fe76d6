//! The crate's error enum.

use alloc::string::String;

use net_device::MacAddress;
use smoltcp::wire::IpEndpoint;
use thiserror::Error;

/// Everything that can go wrong in the network stack.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum Error {
    /// A kernel command line argument could not be used.
    #[error("kernel command line `{argument}`: {reason}")]
    Config {
        /// The offending argument as written, e.g. `ip=10.0.2.300/24`.
        argument: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The synthetic NIC reported a MAC that cannot be an interface address.
    #[error("MAC {mac} is not a valid unicast interface address")]
    InvalidMac {
        /// The MAC the device reported.
        mac: MacAddress,
    },
    /// A VF is already attached; detach it first.
    #[error("a VF ({attached}) is already attached")]
    VfAlreadyAttached {
        /// Name of the VF that is attached.
        attached: String,
    },
    /// The handle does not name a live socket of this stack (already closed, or from another
    /// stack).
    #[error("socket handle is not live")]
    InvalidHandle,
    /// The connection is gone: reset by the peer, aborted, timed out, or fully closed. Nothing
    /// more can be read or written.
    #[error("connection closed")]
    Closed,
    /// The peer finished sending (FIN received) and all its data has been read: end of stream.
    /// Writing may still be possible.
    #[error("peer closed the connection (end of stream)")]
    PeerClosed,
    /// A listener or socket already uses this port.
    #[error("port {port} is already in use")]
    AddressInUse {
        /// The port.
        port: u16,
    },
    /// Port 0 cannot be listened on.
    #[error("port 0 is not a valid listening port")]
    InvalidPort,
    /// The heap cannot give the memory asked for.
    #[error("no memory for {what} ({bytes} bytes)")]
    OutOfMemory {
        /// What the memory was for.
        what: &'static str,
        /// Bytes asked for.
        bytes: usize,
    },
    /// Every ephemeral port is in use.
    #[error("no free ephemeral port")]
    NoEphemeralPort,
    /// The destination cannot be used (unspecified address or port, or no source address of
    /// that IP version configured yet).
    #[error("cannot address {endpoint} (no route or source address)")]
    Unaddressable {
        /// The endpoint that was asked for.
        endpoint: IpEndpoint,
    },
    /// The socket's transmit buffer is full; retry after the stack has polled.
    #[error("transmit buffer full, try again after polling")]
    WouldBlock,
    /// The datagram is larger than one IP packet on this interface can carry (no fragmentation).
    #[error("datagram of {len} bytes exceeds the maximum of {max}")]
    DatagramTooLarge {
        /// Requested payload length.
        len: usize,
        /// Largest payload that fits.
        max: usize,
    },
    /// A received datagram did not fit the buffer; it was consumed and its first
    /// `buffer_len` bytes were copied.
    #[error("datagram of {datagram_len} bytes truncated to the {buffer_len}-byte buffer")]
    Truncated {
        /// Length of the datagram.
        datagram_len: usize,
        /// Length of the buffer given.
        buffer_len: usize,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;
    use smoltcp::wire::{IpAddress, Ipv4Address};

    #[test]
    fn messages_carry_their_context() {
        let cases = [
            (
                Error::Config {
                    argument: "ip=10.0.2.300/24".into(),
                    reason: "bad address".into(),
                },
                "kernel command line `ip=10.0.2.300/24`: bad address",
            ),
            (
                Error::InvalidMac {
                    mac: MacAddress::BROADCAST,
                },
                "MAC ff:ff:ff:ff:ff:ff is not a valid unicast interface address",
            ),
            (
                Error::VfAlreadyAttached {
                    attached: "mlx5 00:04.0".into(),
                },
                "a VF (mlx5 00:04.0) is already attached",
            ),
            (Error::InvalidHandle, "socket handle is not live"),
            (Error::Closed, "connection closed"),
            (
                Error::PeerClosed,
                "peer closed the connection (end of stream)",
            ),
            (
                Error::AddressInUse { port: 5201 },
                "port 5201 is already in use",
            ),
            (Error::InvalidPort, "port 0 is not a valid listening port"),
            (Error::NoEphemeralPort, "no free ephemeral port"),
            (
                Error::Unaddressable {
                    endpoint: IpEndpoint::new(IpAddress::Ipv4(Ipv4Address::new(10, 0, 2, 2)), 80),
                },
                "cannot address 10.0.2.2:80 (no route or source address)",
            ),
            (
                Error::WouldBlock,
                "transmit buffer full, try again after polling",
            ),
            (
                Error::DatagramTooLarge {
                    len: 2000,
                    max: 1472,
                },
                "datagram of 2000 bytes exceeds the maximum of 1472",
            ),
            (
                Error::Truncated {
                    datagram_len: 100,
                    buffer_len: 10,
                },
                "datagram of 100 bytes truncated to the 10-byte buffer",
            ),
        ];
        for (error, message) in cases {
            assert_eq!(error.to_string(), message);
        }
    }
}
