//! netvsc through the real control plane: our `VmbusClient` connected to OpenVMM's
//! `vmbus_server` (through the SynIC bridge), netvsp offered on it, the channel opened, GPADLs
//! created and torn down and the rescind delivered by the server, not by a mock bus.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use guid::Guid;
use net_backend::RxMetadata;
use net_device::{DmaRegion, LinkState, MacAddress, NetDevice, TxMeta};
use netvsc_fallback::netvsc::{Netvsc, NetvscConfig, VmbusChannelControl, VmbusNetvscChannel};
use tandem_conformance::GuestDma;
use tandem_conformance::synic::BridgePort;
use tandem_conformance::vmbus_host::VmbusHost;
use vmbus::client::{ClientConfig, ClientEvent, GpadlBuffer, OpenParams, VmbusClient};
use vmbus::{ChannelEvents, HypervisorPort};

use super::harness::{EndpointState, HOST_MAC, HostOptions, capture_endpoint, inject_into};

/// A second handle on `region`'s pages for the client's GPADL bookkeeping, which only reads its
/// physical address and length (the driver keeps owning the memory).
fn gpadl_view(region: &DmaRegion) -> Option<DmaRegion> {
    let virt = std::ptr::NonNull::new(region.as_ptr())?;
    // SAFETY: no release function, so dropping or quarantining the view never frees the pages;
    // the client never reads or writes memory through it (it lists the pages in GPADL messages
    // from `phys` and `len`); the driver frees the pages only after a confirmed teardown.
    Some(unsafe { DmaRegion::from_raw(virt, region.phys(), region.len(), None) })
}

/// The client-level operations over our `VmbusClient`.
struct ClientControl {
    client: VmbusClient<BridgePort>,
    gpadls: Vec<GpadlBuffer>,
    rescinded: BTreeSet<u32>,
    events: ChannelEvents,
}

impl ClientControl {
    /// Processes host messages; true when `relid`'s event flag was set.
    fn pump(&mut self, relid: u32) -> bool {
        while let Some(event) = self.client.poll() {
            if let ClientEvent::Rescinded { relid } = event {
                self.rescinded.insert(relid);
            }
        }
        self.client.take_channel_events(&mut self.events);
        self.events.take(relid)
    }
}

fn client_error(error: vmbus::Error) -> netvsc_fallback::Error {
    eprintln!("VMBus client: {error}");
    netvsc_fallback::Error::VmbusChannel {
        what: "VMBus client request failed",
    }
}

impl VmbusChannelControl for ClientControl {
    fn create_gpadl(
        &mut self,
        relid: u32,
        region: &DmaRegion,
    ) -> Result<u32, netvsc_fallback::Error> {
        let view = gpadl_view(region).ok_or(netvsc_fallback::Error::VmbusChannel {
            what: "empty region",
        })?;
        let buffer = self
            .client
            .create_gpadl(relid, view)
            .map_err(client_error)?;
        let id = buffer.id();
        self.gpadls.push(buffer);
        Ok(id)
    }

    fn teardown_gpadl(&mut self, _relid: u32, gpadl: u32) -> Result<(), netvsc_fallback::Error> {
        let index = self
            .gpadls
            .iter()
            .position(|buffer| buffer.id() == gpadl)
            .ok_or(netvsc_fallback::Error::VmbusChannel {
                what: "unknown GPADL",
            })?;
        let buffer = self.gpadls.swap_remove(index);
        self.client
            .teardown_gpadl(buffer)
            .map(drop)
            .map_err(client_error)
    }

    fn now_ns(&self) -> u64 {
        self.client.port().now_ns()
    }

    fn wait(&mut self, relid: u32, deadline_ns: u64) {
        loop {
            if self.pump(relid) || self.rescinded.contains(&relid) {
                return;
            }
            if self.client.port().now_ns() >= deadline_ns {
                return;
            }
            self.client.port_mut().idle();
        }
    }

    fn is_rescinded(&self, relid: u32) -> bool {
        self.rescinded.contains(&relid)
    }

    fn process_host_messages(&mut self, relid: u32) {
        // An event flag seen here needs no action: the caller reads the ring next anyway.
        let _signalled = self.pump(relid);
    }

    fn close(&mut self, channel: vmbus::Channel) {
        // On failure the client keeps the ring memory (quarantine).
        if let Err(error) = self.client.close_channel(channel) {
            eprintln!("closing the channel: {error}");
        }
    }
}

type Device = Netvsc<VmbusNetvscChannel<ClientControl>>;

/// vmbus_server with netvsp (capture endpoint), our client connected, the netvsc channel
/// opened with 16-page rings and the driver up on it.
fn start(config: NetvscConfig) -> (VmbusHost, Arc<Mutex<EndpointState>>, Device) {
    let mut host = VmbusHost::start(GuestDma::new(32 << 20, 0));
    let (endpoint, state) = capture_endpoint(HostOptions::default().offloads);
    host.offer_nic(endpoint, Guid::new_random(), HOST_MAC);
    let mut client =
        VmbusClient::connect(host.guest_port(), ClientConfig::default()).expect("connects");
    let relid = client
        .offers()
        .find(|offer| offer.interface_id == vmbus::guid::interface::NETWORK)
        .expect("netvsc offer")
        .relid;
    let channel = client
        .open_channel(relid, &OpenParams::new(16, 16), host.dma())
        .expect("channel opens");
    let control = ClientControl {
        client,
        gpadls: Vec::new(),
        rescinded: BTreeSet::new(),
        events: ChannelEvents::new(),
    };
    let device = Netvsc::new(
        VmbusNetvscChannel::new(channel, control),
        host.dma(),
        config,
    )
    .unwrap_or_else(|(error, _)| panic!("netvsc over vmbus_server: {error}"));
    (host, state, device)
}

fn take_transmitted(
    state: &Mutex<EndpointState>,
    device: &mut Device,
    count: usize,
) -> Vec<Vec<u8>> {
    let started = Instant::now();
    let mut frames = Vec::new();
    while frames.len() < count && started.elapsed() < Duration::from_secs(10) {
        device.poll(0);
        frames.extend(
            std::mem::take(&mut state.lock().unwrap().transmitted)
                .into_iter()
                .map(|(frame, _)| frame),
        );
        std::thread::sleep(Duration::from_micros(100));
    }
    frames
}

fn receive(device: &mut Device, count: usize) -> Vec<Vec<u8>> {
    let started = Instant::now();
    let mut frames = Vec::new();
    while frames.len() < count && started.elapsed() < Duration::from_secs(10) {
        device.poll(0);
        device.receive(64, &mut |frame, _| frames.push(frame.to_vec()));
        std::thread::sleep(Duration::from_micros(100));
    }
    frames
}

fn frame_of(len: usize, seed: u8) -> Vec<u8> {
    let mut frame: Vec<u8> = (0..len)
        .map(|i| (i as u8).wrapping_mul(29).wrapping_add(seed))
        .collect();
    frame[..6].copy_from_slice(&HOST_MAC);
    frame[12] = 0x88;
    frame[13] = 0xb5;
    frame
}

fn send(device: &mut Device, frame: &[u8]) {
    let started = Instant::now();
    loop {
        device.poll(0);
        match device.transmit(frame.len(), &mut |buffer| {
            buffer.copy_from_slice(frame);
            TxMeta::default()
        }) {
            Ok(()) => break,
            Err(net_device::DeviceError::RingFull)
                if started.elapsed() < Duration::from_secs(5) =>
            {
                std::thread::sleep(Duration::from_micros(100));
            }
            Err(error) => panic!("transmit failed: {error}"),
        }
    }
    device.flush();
}

#[test]
fn frames_of_every_length_pass_both_ways_through_vmbus_server() {
    for use_send_buffer in [true, false] {
        let config = NetvscConfig {
            use_send_buffer,
            ..NetvscConfig::default()
        };
        let (_host, state, mut device) = start(config);
        assert_eq!(device.mac_address(), MacAddress(HOST_MAC));
        assert_eq!(device.link_state(), LinkState::Up);
        let frames: Vec<Vec<u8>> = (14..=1514).map(|len| frame_of(len, len as u8)).collect();
        for frame in &frames {
            send(&mut device, frame);
        }
        assert_eq!(take_transmitted(&state, &mut device, frames.len()), frames);
        for frame in &frames {
            inject_into(&state, frame.clone(), RxMetadata::default());
        }
        assert_eq!(receive(&mut device, frames.len()), frames);
        device.stop();
    }
}

#[test]
fn a_rescind_from_vmbus_server_mid_traffic_makes_the_device_gone_and_completes() {
    let (mut host, state, mut device) = start(NetvscConfig::default());
    for i in 0..20 {
        send(&mut device, &frame_of(500, i));
        inject_into(&state, frame_of(400, i), RxMetadata::default());
    }
    let revoked = host.revoke_nic();
    let started = Instant::now();
    while device.link_state() != LinkState::Gone && started.elapsed() < Duration::from_secs(10) {
        device.poll(0);
        device.receive(64, &mut |_, _| {});
        std::thread::sleep(Duration::from_micros(200));
    }
    assert_eq!(device.link_state(), LinkState::Gone);
    assert!(!device.can_transmit());
    // Closing the channel and tearing the buffers down lets the server finish the revoke.
    device.stop();
    assert!(VmbusHost::wait_revoked(&revoked, Duration::from_secs(10)));
}
