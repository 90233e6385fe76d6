//! The `echo` app: TCP and UDP echo (RFC 862) on port 7, or `echo.port=N`.
//!
//! Many clients at once; a client that stops reading only stalls itself (its bytes wait in a
//! bounded per-connection buffer and we stop reading from it), a client that resets is dropped.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::vec::Vec;
use core::ops::ControlFlow;

use net_stack::{Error, NetStack, TcpListener, TcpStream, UdpSocket};

guest_kernel::app!(main);

/// Bytes read from a client but not yet written back, at most.
const PENDING_LIMIT: usize = 64 * 1024;
/// Read chunk.
const CHUNK: usize = 16 * 1024;

struct Client {
    stream: TcpStream,
    pending: Vec<u8>,
    peer_finished: bool,
}

struct Echo {
    listener: TcpListener,
    udp: UdpSocket,
    clients: Vec<Client>,
    scratch: Vec<u8>,
    served: u64,
}

impl Echo {
    fn new(stack: &mut NetStack, port: u16) -> Result<Echo, Error> {
        let listener = stack.tcp_listen(port)?;
        let udp = stack.udp_bind(port)?;
        Ok(Echo {
            listener,
            udp,
            clients: Vec::new(),
            scratch: alloc::vec![0; CHUNK],
            served: 0,
        })
    }

    fn step(&mut self, stack: &mut NetStack) {
        while let Some(stream) = stack.accept(&self.listener) {
            self.served += 1;
            log::debug!(
                "echo: client {} connected from {:?}",
                self.served,
                stack.tcp_remote_endpoint(&stream)
            );
            self.clients.push(Client {
                stream,
                pending: Vec::new(),
                peer_finished: false,
            });
        }
        let mut index = 0;
        while index < self.clients.len() {
            match serve_client(stack, &mut self.clients[index], &mut self.scratch) {
                Outcome::Keep => index += 1,
                Outcome::Close => stack.tcp_close(self.clients.swap_remove(index).stream),
                Outcome::Abort => stack.tcp_abort(self.clients.swap_remove(index).stream),
            }
        }
        while let Ok(Some((len, remote))) = stack.udp_recv_from(&self.udp, &mut self.scratch) {
            if let Err(error) = stack.udp_send_to(&self.udp, &self.scratch[..len], remote) {
                log::debug!("echo: UDP reply to {remote} dropped: {error}");
            }
        }
    }
}

/// What to do with a client after serving it.
enum Outcome {
    Keep,
    /// The peer finished and everything was echoed: close gracefully.
    Close,
    /// The connection broke (reset, timed out): drop it.
    Abort,
}

/// Moves bytes for one client until it would block.
fn serve_client(stack: &mut NetStack, client: &mut Client, scratch: &mut [u8]) -> Outcome {
    loop {
        if !client.pending.is_empty() {
            match stack.tcp_write(&client.stream, &client.pending) {
                Ok(0) | Err(Error::WouldBlock) => {}
                Ok(written) => {
                    client.pending.drain(..written);
                    continue;
                }
                Err(_) => return Outcome::Abort,
            }
        }
        if client.peer_finished || client.pending.len() >= PENDING_LIMIT {
            break;
        }
        let room = (PENDING_LIMIT - client.pending.len()).min(scratch.len());
        match stack.tcp_read(&client.stream, &mut scratch[..room]) {
            Ok(0) => break,
            Ok(read) => client.pending.extend_from_slice(&scratch[..read]),
            Err(Error::PeerClosed) => client.peer_finished = true,
            Err(_) => return Outcome::Abort,
        }
    }
    if client.peer_finished && client.pending.is_empty() {
        return Outcome::Close;
    }
    Outcome::Keep
}

fn main() -> i32 {
    let port = match guest_kernel::cmdline_value("echo.port").map(str::parse::<u16>) {
        None => 7,
        Some(Ok(port)) if port != 0 => port,
        Some(_) => {
            log::error!("echo: echo.port must be a port number 1-65535");
            return 2;
        }
    };
    let mut stack = match guest_kernel::net::bring_up() {
        Ok(stack) => stack,
        Err(error) => {
            log::error!("echo: no network: {error}");
            return 3;
        }
    };
    let mut echo = match Echo::new(&mut stack, port) {
        Ok(echo) => echo,
        Err(error) => {
            log::error!("echo: cannot listen on port {port}: {error}");
            return 4;
        }
    };
    log::info!("echo: serving TCP and UDP on port {port}");
    guest_kernel::net::run(&mut stack, |stack| {
        echo.step(stack);
        ControlFlow::Continue(())
    })
}
