//! Our VMBus client against OpenVMM's `vmbus_server` with netvsp offered on it: the control
//! plane end to end over the SynIC bridge (version, offers, GPADLs, open/close, rescind, unload).

use std::time::{Duration, Instant};

use net_backend::null::NullEndpoint;
use net_device::DmaAllocator;
use tandem_conformance::GuestDma;
use tandem_conformance::synic::BridgePort;
use tandem_conformance::vmbus_host::VmbusHost;
use vmbus::guid::interface;
use vmbus::hypervisor::ChannelEvents;
use vmbus::packet::{IncomingKind, OutgoingPacket};
use vmbus::protocol::{MessageType, Version};
use vmbus::{Channel, ClientConfig, ClientEvent, Error, Guid, OpenParams, VmbusClient};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

const NIC_INSTANCE: Guid = Guid::from_fields(
    0x1234_5678,
    0x9abc,
    0xdef0,
    [0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08],
);
const WAIT: Duration = Duration::from_secs(10);

/// A host with 64 MiB of guest memory and a netvsp NIC (NullEndpoint) offered.
fn host_with_nic() -> VmbusHost {
    let mut host = VmbusHost::start(GuestDma::new(64 << 20, 0));
    host.offer_nic(
        Box::new(NullEndpoint::new()),
        guid::guid!("12345678-9abc-def0-0102-030405060708"),
        [0x00, 0x15, 0x5d, 0x01, 0x02, 0x03],
    );
    host
}

fn connect(host: &VmbusHost) -> VmbusClient<BridgePort> {
    VmbusClient::connect(host.guest_port(), ClientConfig::default()).expect("connects")
}

fn nic_relid(client: &VmbusClient<BridgePort>) -> u32 {
    client
        .offers()
        .find(|offer| offer.interface_id == interface::NETWORK)
        .expect("netvsc offer")
        .relid
}

#[test]
fn connects_at_the_highest_version_and_receives_the_netvsc_offer() {
    let host = host_with_nic();
    let client = connect(&host);
    assert_eq!(client.version(), Some(Version::COPPER));
    assert_eq!(
        client.message_connection_id(),
        1,
        "vmbus_server's VTL0 message port"
    );
    let offers: Vec<_> = client.offers().copied().collect();
    assert_eq!(offers.len(), 1);
    let offer = offers[0];
    assert_eq!(offer.interface_id, interface::NETWORK);
    assert_eq!(
        offer.interface_id.to_string(),
        "f8615163-df3e-46c5-913f-f2d2f965ed0e"
    );
    assert_eq!(offer.instance_id, NIC_INSTANCE);
    assert_ne!(offer.connection_id, 0);
    assert_eq!(
        client.counters().malformed + client.counters().unknown_type,
        0
    );
    assert_eq!(host.bridge().message_connection_ids(), [1, 4]);
    let posted = host.bridge().posted_messages();
    assert_eq!(
        posted[0],
        (4, MessageType::INITIATE_CONTACT.0),
        "6.0 goes to the multiclient port"
    );
    assert_eq!(posted[1], (1, MessageType::REQUEST_OFFERS.0));
}

#[test]
fn small_and_multi_megabyte_gpadls_are_created_and_torn_down() {
    let host = host_with_nic();
    let mut client = connect(&host);
    let relid = nic_relid(&client);
    let small = client
        .create_gpadl(relid, host.dma().allocate(4096, 4096).unwrap())
        .expect("one-page GPADL");
    // 4 MiB = 1024 pages: the header carries 26 PFNs, 36 GPADL_BODY messages the rest.
    let posted_before = host.bridge().counters().posted;
    let large = client
        .create_gpadl(relid, host.dma().allocate(4 << 20, 4096).unwrap())
        .expect("4 MiB GPADL");
    assert!(host.bridge().counters().posted - posted_before >= 37);
    assert_ne!(small.id(), large.id());
    let free_before = host.dma().free_bytes();
    drop(client.teardown_gpadl(large).expect("teardown 4 MiB"));
    drop(client.teardown_gpadl(small).expect("teardown 1 page"));
    assert_eq!(host.dma().free_bytes(), free_before + (4 << 20) + 4096);
    assert_eq!(client.quarantined_bytes(), 0);
    assert_eq!(client.counters().timeouts, 0);
}

/// NVSP INIT (netvsc protocol, message type 1): enough to prove netvsp reads our ring.
#[repr(C)]
#[derive(IntoBytes, FromBytes, Immutable, KnownLayout)]
struct NvspInit {
    message_type: u32,
    protocol_version: u32,
    protocol_version2: u32,
}

/// NVSP INIT_COMPLETE (message type 2).
#[repr(C)]
#[derive(Debug, IntoBytes, FromBytes, Immutable, KnownLayout)]
struct NvspInitComplete {
    message_type: u32,
    deprecated: u32,
    maximum_mdl_chain_length: u32,
    status: u32,
}

/// Waits for the next packet on `channel`, driven by channel events like the kernel would be.
fn next_packet(
    client: &mut VmbusClient<BridgePort>,
    channel: &mut Channel,
) -> (IncomingKind<'static>, u64, Vec<u8>) {
    let start = Instant::now();
    let mut buffer = Vec::new();
    let mut events = ChannelEvents::new();
    loop {
        client.take_channel_events(&mut events);
        events.take(channel.relid());
        if let Some(packet) = channel.receive(&mut buffer).expect("ring intact") {
            let kind = match packet.kind {
                IncomingKind::InBand => IncomingKind::InBand,
                IncomingKind::Completion => IncomingKind::Completion,
                other => panic!("unexpected packet kind {other:?}"),
            };
            return (kind, packet.transaction_id, packet.payload.to_vec());
        }
        assert!(start.elapsed() < WAIT, "no packet from the host");
        let port = client.port();
        port.wait_for_activity(port.activity(), Duration::from_millis(5));
    }
}

#[test]
fn open_channel_carries_nvsp_init_and_close_releases_the_rings() {
    let host = host_with_nic();
    let mut client = connect(&host);
    let relid = nic_relid(&client);
    let connection_id = client.offer(relid).unwrap().connection_id;
    let free_before = host.dma().free_bytes();
    let mut channel = client
        .open_channel(relid, &OpenParams::new(15, 15), host.dma())
        .expect("OPENCHANNEL accepted");
    assert!(host.bridge().has_event_port(connection_id));

    let init = NvspInit {
        message_type: 1,
        protocol_version: 0x50000,
        protocol_version2: 0x60000,
    };
    channel
        .send(&OutgoingPacket::in_band(0x1234, true, &[init.as_bytes()]))
        .unwrap();
    // netvsp keeps our outgoing ring's interrupt_mask set while it polls, so whether this
    // first packet needed a signal depends on its timing: at most one was sent.
    assert!(channel.counters().signals_sent <= 1);
    let (kind, transaction_id, payload) = next_packet(&mut client, &mut channel);
    assert_eq!(kind, IncomingKind::Completion);
    assert_eq!(transaction_id, 0x1234);
    let (complete, _) = NvspInitComplete::read_from_prefix(&payload).unwrap();
    assert_eq!(complete.message_type, 2, "INIT_COMPLETE");
    assert_eq!(complete.status, 1, "success for NVSP 5");
    // The host writes the completion, then raises the interrupt from its own thread: the
    // packet can be read before the interrupt is counted.
    let start = Instant::now();
    while host.bridge().counters().host_interrupts < 1 {
        assert!(
            start.elapsed() < WAIT,
            "the host never interrupted the guest"
        );
        std::thread::sleep(Duration::from_millis(1));
    }

    let memory = client
        .close_channel(channel)
        .expect("close + ring teardown");
    drop(memory);
    assert_eq!(host.dma().free_bytes(), free_before);
    // Closed channels can be opened again.
    let channel = client
        .open_channel(relid, &OpenParams::new(1, 1), host.dma())
        .expect("reopen");
    client.close_channel(channel).unwrap();
}

#[test]
fn rescinding_an_open_channel_reaches_the_guest_and_completes_after_close() {
    let mut host = host_with_nic();
    let mut client = connect(&host);
    let relid = nic_relid(&client);
    let channel = client
        .open_channel(relid, &OpenParams::new(1, 1), host.dma())
        .unwrap();
    let revoked = host.revoke_nic();
    let start = Instant::now();
    let event = loop {
        if let Some(event) = client.poll() {
            break event;
        }
        assert!(start.elapsed() < WAIT, "no rescind");
        std::thread::sleep(Duration::from_millis(1));
    };
    assert_eq!(event, ClientEvent::Rescinded { relid });
    assert!(client.offer(relid).is_none());
    assert!(matches!(
        client.create_gpadl(relid, host.dma().allocate(4096, 4096).unwrap()),
        Err(Error::Rescinded { .. })
    ));
    // Close + ring teardown, then RELID_RELEASED: the host's revoke finishes.
    let posted_before = host.bridge().posted_messages().len();
    client.close_channel(channel).expect("close after rescind");
    let after: Vec<u32> = host.bridge().posted_messages()[posted_before..]
        .iter()
        .map(|&(_, message_type)| message_type)
        .collect();
    assert_eq!(
        after,
        [
            MessageType::CLOSE_CHANNEL.0,
            MessageType::GPADL_TEARDOWN.0,
            MessageType::RELID_RELEASED.0
        ]
    );
    assert!(
        VmbusHost::wait_revoked(&revoked, WAIT),
        "host revoke completed"
    );
    assert_eq!(client.counters().rescinds, 1);
}

#[test]
fn rescinding_a_closed_channel_is_released_at_once_and_hot_add_is_an_event() {
    let mut host = host_with_nic();
    let mut client = connect(&host);
    let relid = nic_relid(&client);
    let revoked = host.revoke_nic();
    let start = Instant::now();
    while client.poll() != Some(ClientEvent::Rescinded { relid }) {
        assert!(start.elapsed() < WAIT, "no rescind");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(VmbusHost::wait_revoked(&revoked, WAIT));
    let released = host
        .bridge()
        .posted_messages()
        .iter()
        .filter(|&&(_, message_type)| message_type == MessageType::RELID_RELEASED.0)
        .count();
    assert_eq!(released, 1, "a never-opened channel is released at once");

    host.offer_nic(
        Box::new(NullEndpoint::new()),
        guid::guid!("12345678-9abc-def0-0102-030405060709"),
        [0x00, 0x15, 0x5d, 0x01, 0x02, 0x04],
    );
    let start = Instant::now();
    let offer = loop {
        if let Some(ClientEvent::Offer(offer)) = client.poll() {
            break offer;
        }
        assert!(start.elapsed() < WAIT, "no hot-add offer");
        std::thread::sleep(Duration::from_millis(1));
    };
    assert_eq!(offer.interface_id, interface::NETWORK);
    let channel = client
        .open_channel(offer.relid, &OpenParams::new(1, 1), host.dma())
        .expect("hot-added channel opens");
    client.close_channel(channel).unwrap();
}

#[test]
fn unload_disconnects_and_a_new_connection_works() {
    let host = host_with_nic();
    let mut client = connect(&host);
    client.unload().expect("UNLOAD_RESPONSE");
    assert_eq!(client.version(), None);
    let again = connect(&host);
    assert_eq!(again.offers().count(), 1);
}

#[test]
fn lower_versions_are_negotiated_on_the_right_connection_id() {
    let host = host_with_nic();
    for (version, message_connection_id) in [
        (Version::IRON, 1),
        (Version::WIN10_RS3_1, 1),
        (Version::WIN10, 1),
        (Version::WIN8_1, 1),
        (Version::WIN8, 1),
    ] {
        let config = ClientConfig {
            versions: vec![version],
            ..ClientConfig::default()
        };
        let mut client = VmbusClient::connect(host.guest_port(), config)
            .unwrap_or_else(|error| panic!("{version}: {error}"));
        assert_eq!(client.version(), Some(version));
        assert_eq!(client.message_connection_id(), message_connection_id);
        assert_eq!(client.offers().count(), 1, "{version}");
        client.unload().unwrap();
    }
}

#[test]
fn an_older_host_is_met_at_its_highest_version() {
    for (max, expected, contacts) in [
        (Version::WIN10_RS5, Version::WIN10_RS5, vec![4, 4, 4]),
        (Version::WIN10, Version::WIN10, vec![4, 4, 4, 4, 4, 1, 1]),
    ] {
        let mut host = VmbusHost::start_with_max_version(GuestDma::new(16 << 20, 0), Some(max.0));
        host.offer_nic(
            Box::new(NullEndpoint::new()),
            guid::guid!("12345678-9abc-def0-0102-030405060708"),
            [0x00, 0x15, 0x5d, 0x01, 0x02, 0x03],
        );
        let client = connect(&host);
        assert_eq!(client.version(), Some(expected));
        let tried: Vec<u32> = host
            .bridge()
            .posted_messages()
            .iter()
            .filter(|&&(_, message_type)| message_type == MessageType::INITIATE_CONTACT.0)
            .map(|&(connection_id, _)| connection_id)
            .collect();
        assert_eq!(
            tried, contacts,
            "highest first, id 4 from 5.0 up, id 1 below"
        );
        assert_eq!(client.offers().count(), 1);
    }
}
