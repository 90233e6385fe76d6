//! The `echo` app over virtio-net. Rootless, on user-mode networking: 64 concurrent TCP clients,
//! every UDP size, resetting and non-reading clients. As root, on a bridge + tap in a network
//! namespace the test creates: echo, ping, and malformed frames injected from the host.

#[path = "echo/clients.rs"]
mod clients;
#[path = "echo/frames.rs"]
mod frames;
#[path = "echo/guest.rs"]
mod guest;
#[path = "echo/tap.rs"]
mod tap;
#[path = "echo/user.rs"]
mod user;
