//! The kernel's one VMBus client, shared by every channel driver (netvsc, vPCI): host messages
//! are pumped in one place and sorted per relid (signals, rescinds, late offers).
//!
//! Generic over the hypervisor port, so the same code runs in the kernel (SynIC) and over
//! `vmbus`'s fake host in host tests. The client is shared (`Rc<RefCell<_>>`) because the
//! control plane outlives and serves every channel; the kernel runs one event loop on one CPU.
//! [`HubChannelControl`] is what netvsc's generic channel adapter
//! ([`netvsc_fallback::netvsc::VmbusNetvscChannel`]) asks of the client; [`HubVpciPort`] is the
//! vPCI client's port over one channel.

use alloc::collections::{BTreeSet, VecDeque};
use alloc::rc::Rc;
use alloc::vec::Vec;
use core::cell::RefCell;

use net_device::DmaRegion;
use netvsc_fallback::netvsc::VmbusChannelControl;
use vmbus::client::{ClientEvent, Offer, VmbusClient};
use vmbus::vpci::VpciPort;
use vmbus::{Channel, ChannelEvents, Error as VmbusError, HypervisorPort};

/// Most `idle` rounds of one wait, whatever the clock says (a stuck clock must not hang us).
const MAX_WAIT_STEPS: u32 = 1_000_000;

/// Counters of the hub, beyond the client's own.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HubCounters {
    /// Times a channel's event flag was found set and handed to its driver.
    pub channel_events: u64,
    /// Offers that arrived after the initial enumeration (hot-add: the vPCI bus of a VF).
    pub late_offers: u64,
    /// Rescinds seen.
    pub rescinds: u64,
}

/// The shared VMBus client and what its host messages said, per relid.
pub struct VmbusHub<P: HypervisorPort> {
    client: VmbusClient<P>,
    /// Event flags taken from the hypervisor that no driver has looked at yet.
    signalled: ChannelEvents,
    /// Relids the host withdrew (forgotten again when the host reuses the relid for an offer).
    rescinded: BTreeSet<u32>,
    /// Offers that arrived after bring-up, for the owner to look at.
    late_offers: VecDeque<Offer>,
    counters: HubCounters,
}

/// The hub as the drivers share it.
pub type SharedHub<P> = Rc<RefCell<VmbusHub<P>>>;

/// Late offers kept for the owner at most (older ones are dropped with a log line).
const MAX_PENDING_OFFERS: usize = 64;

impl<P: HypervisorPort> VmbusHub<P> {
    /// Wraps a connected client.
    pub fn new(client: VmbusClient<P>) -> Self {
        VmbusHub {
            client,
            signalled: ChannelEvents::new(),
            rescinded: BTreeSet::new(),
            late_offers: VecDeque::new(),
            counters: HubCounters::default(),
        }
    }

    /// Wraps a connected client for sharing.
    pub fn shared(client: VmbusClient<P>) -> SharedHub<P> {
        Rc::new(RefCell::new(VmbusHub::new(client)))
    }

    /// The client.
    pub fn client(&self) -> &VmbusClient<P> {
        &self.client
    }

    /// The client, mutably (open, close, GPADLs).
    pub fn client_mut(&mut self) -> &mut VmbusClient<P> {
        &mut self.client
    }

    /// The hub's counters.
    pub fn counters(&self) -> HubCounters {
        self.counters
    }

    /// Processes every waiting host message and collects the channels' event flags. Taking
    /// the flags re-arms the hypervisor's interrupt for the next signal.
    pub fn pump(&mut self) {
        while let Some(event) = self.client.poll() {
            match event {
                ClientEvent::Rescinded { relid } => {
                    self.counters.rescinds += 1;
                    log::warn!("vmbus: relid {relid} rescinded by the host");
                    self.rescinded.insert(relid);
                }
                ClientEvent::Offer(offer) => {
                    self.counters.late_offers += 1;
                    log::info!(
                        "vmbus: late offer relid {} interface {} instance {}",
                        offer.relid,
                        offer.interface_id,
                        offer.instance_id
                    );
                    // A released relid may come back for a new device.
                    self.rescinded.remove(&offer.relid);
                    if self.late_offers.len() >= MAX_PENDING_OFFERS {
                        log::warn!("vmbus: too many unhandled offers; the oldest is dropped");
                        self.late_offers.pop_front();
                    }
                    self.late_offers.push_back(offer);
                }
            }
        }
        self.client.take_channel_events(&mut self.signalled);
    }

    /// True (once) when the host signalled `relid` since the last call; pumps first.
    pub fn take_signal(&mut self, relid: u32) -> bool {
        self.pump();
        let signalled = self.signalled.take(relid);
        if signalled {
            self.counters.channel_events += 1;
        }
        signalled
    }

    /// True once the host withdrew `relid` (or the client no longer knows it).
    pub fn is_rescinded(&self, relid: u32) -> bool {
        self.rescinded.contains(&relid) || self.client.offer(relid).is_none()
    }

    /// The next offer that arrived after bring-up, if any.
    pub fn take_late_offer(&mut self) -> Option<Offer> {
        self.pump();
        self.late_offers.pop_front()
    }

    /// Waits until the host signals `relid`, rescinds it, or `deadline_ns` passes. The
    /// caller has unmasked the channel's interrupt and looked at its ring first.
    pub fn wait(&mut self, relid: u32, deadline_ns: u64) {
        for _ in 0..MAX_WAIT_STEPS {
            if self.take_signal(relid) || self.is_rescinded(relid) {
                return;
            }
            if self.client.port().now_ns() >= deadline_ns {
                return;
            }
            self.client.port_mut().idle();
        }
    }

    /// Monotonic time of the port.
    pub fn now_ns(&self) -> u64 {
        self.client.port().now_ns()
    }
}

/// netvsc's view of the shared client: GPADLs over the driver's own memory, waits, rescind
/// and close for one channel.
pub struct HubChannelControl<P: HypervisorPort> {
    hub: SharedHub<P>,
    /// GPADLs made for the driver's buffers (the memory stays the driver's).
    gpadls: Vec<u32>,
}

impl<P: HypervisorPort> HubChannelControl<P> {
    /// A control over `hub`.
    pub fn new(hub: SharedHub<P>) -> Self {
        HubChannelControl {
            hub,
            gpadls: Vec::new(),
        }
    }

    /// The shared hub.
    pub fn hub(&self) -> &SharedHub<P> {
        &self.hub
    }
}

fn client_error(error: VmbusError) -> netvsc_fallback::Error {
    match error {
        VmbusError::Rescinded { .. } => netvsc_fallback::Error::ChannelRescinded,
        error => {
            log::warn!("netvsc: VMBus client: {error}");
            netvsc_fallback::Error::VmbusChannel {
                what: match error {
                    VmbusError::GpadlRefused { .. } => "GPADL refused by the host",
                    VmbusError::Timeout { .. } => "no answer from the VMBus host",
                    VmbusError::NotConnected => "VMBus not connected",
                    _ => "VMBus client request failed",
                },
            }
        }
    }
}

impl<P: HypervisorPort> VmbusChannelControl for HubChannelControl<P> {
    fn create_gpadl(
        &mut self,
        relid: u32,
        region: &DmaRegion,
    ) -> Result<u32, netvsc_fallback::Error> {
        let id = self
            .hub
            .borrow_mut()
            .client_mut()
            .create_borrowed_gpadl(relid, region.phys(), region.len())
            .map_err(client_error)?;
        self.gpadls.push(id);
        Ok(id)
    }

    fn teardown_gpadl(&mut self, relid: u32, gpadl: u32) -> Result<(), netvsc_fallback::Error> {
        let index = self.gpadls.iter().position(|&id| id == gpadl).ok_or(
            netvsc_fallback::Error::VmbusChannel {
                what: "teardown of an unknown GPADL",
            },
        )?;
        self.gpadls.swap_remove(index);
        self.hub
            .borrow_mut()
            .client_mut()
            .teardown_borrowed_gpadl(relid, gpadl)
            .map_err(client_error)
    }

    fn now_ns(&self) -> u64 {
        self.hub.borrow().now_ns()
    }

    fn wait(&mut self, relid: u32, deadline_ns: u64) {
        self.hub.borrow_mut().wait(relid, deadline_ns);
    }

    fn is_rescinded(&self, relid: u32) -> bool {
        self.hub.borrow().is_rescinded(relid)
    }

    fn process_host_messages(&mut self, relid: u32) {
        // A signal needs no action here: the caller reads the ring next anyway.
        let _signalled = self.hub.borrow_mut().take_signal(relid);
    }

    fn close(&mut self, channel: Channel) {
        let relid = channel.relid();
        if let Err(error) = self.hub.borrow_mut().client_mut().close_channel(channel) {
            log::warn!("vmbus: closing relid {relid}: {error} (ring memory kept)");
        }
    }
}

/// The vPCI client's port: one opened channel on the shared hub.
pub struct HubVpciPort<P: HypervisorPort> {
    hub: SharedHub<P>,
    /// `None` once closed.
    channel: Option<Channel>,
    relid: u32,
}

impl<P: HypervisorPort> HubVpciPort<P> {
    /// Wraps the opened vPCI `channel` of `hub`.
    pub fn new(hub: SharedHub<P>, channel: Channel) -> Self {
        HubVpciPort {
            hub,
            relid: channel.relid(),
            channel: Some(channel),
        }
    }

    /// The channel's relid.
    pub fn relid(&self) -> u32 {
        self.relid
    }

    /// The shared hub.
    pub fn hub(&self) -> &SharedHub<P> {
        &self.hub
    }

    /// Closes the channel (CLOSECHANNEL, ring GPADL teardown; the rings are kept if the host
    /// does not confirm).
    pub fn close(&mut self) {
        if let Some(channel) = self.channel.take()
            && let Err(error) = self.hub.borrow_mut().client_mut().close_channel(channel)
        {
            log::warn!(
                "vpci: closing relid {}: {error} (ring memory kept)",
                self.relid
            );
        }
    }
}

impl<P: HypervisorPort> Drop for HubVpciPort<P> {
    /// A port dropped open (e.g. by a failed probe) closes its channel, so the host stops
    /// using the rings before their memory goes; with the hub busy the rings are kept forever.
    fn drop(&mut self) {
        let Some(channel) = self.channel.take() else {
            return;
        };
        match self.hub.try_borrow_mut() {
            Ok(mut hub) => {
                if let Err(error) = hub.client_mut().close_channel(channel) {
                    log::warn!(
                        "vpci: closing relid {}: {error} (ring memory kept)",
                        self.relid
                    );
                }
            }
            Err(_) => core::mem::forget(channel),
        }
    }
}

impl<P: HypervisorPort> VpciPort for HubVpciPort<P> {
    fn send(&mut self, packet: &vmbus::OutgoingPacket<'_>) -> Result<(), VmbusError> {
        if self.hub.borrow().is_rescinded(self.relid) {
            return Err(VmbusError::Rescinded { relid: self.relid });
        }
        self.channel
            .as_mut()
            .ok_or(VmbusError::Rescinded { relid: self.relid })?
            .send(packet)
    }

    fn receive<'b>(
        &mut self,
        buffer: &'b mut Vec<u8>,
    ) -> Result<Option<vmbus::IncomingPacket<'b>>, VmbusError> {
        let _signalled = self.hub.borrow_mut().take_signal(self.relid);
        match self.channel.as_mut() {
            Some(channel) => channel.receive(buffer),
            None => Ok(None),
        }
    }

    fn now_ns(&mut self) -> u64 {
        self.hub.borrow().now_ns()
    }

    fn wait(&mut self, deadline_ns: u64) {
        if let Some(channel) = self.channel.as_mut() {
            // Unmask, then look again before sleeping (ring protocol, reference §2.4).
            let _ = channel.set_interrupt_mask(false);
            if channel.has_incoming().unwrap_or(true) {
                return;
            }
        }
        self.hub.borrow_mut().wait(self.relid, deadline_ns);
    }

    fn is_rescinded(&mut self) -> bool {
        let mut hub = self.hub.borrow_mut();
        hub.pump();
        self.channel.is_none() || hub.is_rescinded(self.relid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use net_device::DmaAllocator;
    use net_device::heap_dma::HeapDmaAllocator;
    use netvsc_fallback::netvsc::{
        self, GpaRange, IncomingKind, NetvscChannel, OutgoingPacket, VmbusNetvscChannel,
    };
    use vmbus::guid::interface;
    use vmbus::testing::{FakeHost, FakeHostConfig, FakeHostPort, offer_message};
    use vmbus::{ClientConfig, OpenParams};

    const RELID: u32 = 3;
    const CONNECTION: u32 = 0x2003;
    const VPCI_RELID: u32 = 5;

    type Adapter = VmbusNetvscChannel<HubChannelControl<FakeHostPort>>;

    fn hub() -> (FakeHost, SharedHub<FakeHostPort>, HeapDmaAllocator) {
        let (host, port) = FakeHost::new(FakeHostConfig {
            offers: alloc::vec![
                offer_message(interface::NETWORK, RELID, CONNECTION),
                offer_message(interface::VPCI, VPCI_RELID, 0x2005),
            ],
            ..FakeHostConfig::default()
        });
        let config = ClientConfig {
            response_timeout_ns: 50_000_000,
            ..ClientConfig::default()
        };
        let client = VmbusClient::connect(port, config).unwrap();
        (host, VmbusHub::shared(client), HeapDmaAllocator::new())
    }

    fn adapter() -> (FakeHost, Adapter, HeapDmaAllocator) {
        let (host, hub, dma) = hub();
        let channel = hub
            .borrow_mut()
            .client_mut()
            .open_channel(RELID, &OpenParams::new(2, 2), &dma)
            .unwrap();
        let adapter = VmbusNetvscChannel::new(channel, HubChannelControl::new(hub));
        (host, adapter, dma)
    }

    #[test]
    fn netvsc_packets_cross_both_rings_through_the_generic_adapter() {
        let (host, mut adapter, _dma) = adapter();
        assert!(
            adapter
                .try_send(&OutgoingPacket::InBand {
                    transaction_id: 7,
                    completion_requested: true,
                    payload: b"nvsp init",
                })
                .unwrap()
        );
        let pages = [0x1234u64, 0x1235];
        assert!(
            adapter
                .try_send(&OutgoingPacket::GpaDirect {
                    transaction_id: 8,
                    ranges: &[GpaRange {
                        byte_count: 5000,
                        byte_offset: 16,
                        page_numbers: &pages,
                    }],
                    payload: b"rndis packet",
                })
                .unwrap()
        );
        let sent = host.read_outgoing(RELID);
        assert_eq!(sent.len(), 2);
        let first = vmbus::IncomingPacket::parse(&sent[0]).unwrap();
        assert_eq!(first.transaction_id, 7);
        assert_eq!(&first.payload[..9], b"nvsp init");
        host.write_incoming(
            RELID,
            &vmbus::OutgoingPacket::completion(7, &[&[2, 0, 0, 0, 1, 0, 0, 0]]),
        );
        let mut packet = netvsc::IncomingPacket::default();
        assert!(adapter.try_receive(&mut packet).unwrap());
        assert_eq!(packet.kind, IncomingKind::Completion);
        assert_eq!(packet.transaction_id, 7);
        assert!(!adapter.try_receive(&mut packet).unwrap(), "ring empty");
    }

    #[test]
    fn gpadls_name_the_driver_s_pages_and_leave_the_memory_with_the_driver() {
        let (host, mut adapter, dma) = adapter();
        let mut region = dma.allocate(40 * 4096, 4096).unwrap();
        let gpadl = adapter.create_gpadl(&region).unwrap();
        let described = host.gpadl(gpadl).unwrap();
        assert_eq!(described.relid, RELID);
        assert_eq!(described.byte_count, 40 * 4096);
        let first = region.phys().0 / 4096;
        assert_eq!(described.pfns, (first..first + 40).collect::<Vec<_>>());
        assert!(described.bodies >= 1, "40 pages need a GPADL_BODY");
        adapter.teardown_gpadl(gpadl).unwrap();
        assert!(host.gpadl(gpadl).is_none());
        assert!(region.write_bytes(0, b"still mine"));
        assert!(matches!(
            adapter.teardown_gpadl(gpadl),
            Err(netvsc_fallback::Error::VmbusChannel { .. })
        ));
    }

    #[test]
    fn a_rescind_stops_the_channel_and_close_gives_the_rings_back() {
        let (host, mut adapter, _dma) = adapter();
        assert!(!adapter.is_rescinded());
        host.rescind(RELID);
        let mut packet = netvsc::IncomingPacket::default();
        assert_eq!(
            adapter.try_receive(&mut packet),
            Err(netvsc_fallback::Error::ChannelRescinded)
        );
        assert!(adapter.is_rescinded());
        adapter.close();
        assert_eq!(host.closed(), [RELID]);
        assert_eq!(host.released(), [RELID], "relid released once closed");
        let hub = adapter.control().hub().borrow();
        assert_eq!(hub.counters().rescinds, 1);
    }

    #[test]
    fn waits_end_at_the_deadline_or_when_the_host_signals() {
        let (host, mut adapter, _dma) = adapter();
        let start = adapter.now_ns();
        adapter.wait(start + 5_000_000);
        let waited = adapter.now_ns() - start;
        assert!(
            (5_000_000..6_000_000).contains(&waited),
            "bounded by the deadline: {waited} ns"
        );
        host.raise_event(RELID);
        let start = adapter.now_ns();
        adapter.wait(start + 1_000_000_000);
        assert_eq!(adapter.now_ns(), start, "the signal ends the wait at once");
        assert_eq!(
            adapter.control().hub().borrow().counters().channel_events,
            1
        );
    }

    #[test]
    fn signals_rescinds_and_offers_reach_the_channel_they_name_only() {
        let (host, hub, dma) = hub();
        let netvsc = hub
            .borrow_mut()
            .client_mut()
            .open_channel(RELID, &OpenParams::new(2, 2), &dma)
            .unwrap();
        let vpci = hub
            .borrow_mut()
            .client_mut()
            .open_channel(VPCI_RELID, &OpenParams::new(1, 1), &dma)
            .unwrap();
        let mut adapter = VmbusNetvscChannel::new(netvsc, HubChannelControl::new(hub.clone()));
        let mut port = HubVpciPort::new(hub.clone(), vpci);
        // netvsc's pumps must not eat the vPCI channel's signal.
        host.raise_event(VPCI_RELID);
        let mut packet = netvsc::IncomingPacket::default();
        assert!(!adapter.try_receive(&mut packet).unwrap());
        let start = port.now_ns();
        port.wait(start + 1_000_000_000);
        assert_eq!(port.now_ns(), start, "the vPCI signal was kept for it");
        // A vPCI packet arrives through the port.
        host.write_incoming(
            VPCI_RELID,
            &vmbus::OutgoingPacket::in_band(0, false, &[&[1, 2, 3, 4, 0, 0, 0, 0]]),
        );
        let mut buffer = Vec::new();
        let received = port.receive(&mut buffer).unwrap().unwrap();
        assert_eq!(&received.payload[..4], &[1, 2, 3, 4]);
        port.send(&vmbus::OutgoingPacket::in_band(9, true, &[&[7; 8]]))
            .unwrap();
        assert_eq!(host.read_outgoing(VPCI_RELID).len(), 1);
        // The vPCI rescind, seen by netvsc's pump, is the vPCI port's only.
        host.rescind(VPCI_RELID);
        assert!(!adapter.try_receive(&mut packet).unwrap());
        assert!(!adapter.is_rescinded());
        assert!(port.is_rescinded());
        assert!(matches!(
            port.send(&vmbus::OutgoingPacket::in_band(10, true, &[&[7; 8]])),
            Err(VmbusError::Rescinded { .. })
        ));
        drop(port);
        assert_eq!(
            host.released(),
            [VPCI_RELID],
            "dropping the port closed the channel"
        );
        // The host offers a new vPCI bus on the released relid: a late offer, not rescinded.
        host.offer(offer_message(interface::VPCI, VPCI_RELID, 0x2006));
        let offer = hub.borrow_mut().take_late_offer().expect("late offer kept");
        assert_eq!(offer.relid, VPCI_RELID);
        assert!(!hub.borrow().is_rescinded(VPCI_RELID));
        assert_eq!(hub.borrow().counters().late_offers, 1);
    }
}
