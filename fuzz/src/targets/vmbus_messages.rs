//! Target `vmbus-messages`: the VMBus control plane (`vmbus::VmbusClient`) against a fake host
//! that also injects arbitrary channel messages (any type, any length, fields naming known and
//! unknown relids and GPADL ids), mixed with connect, offer/rescind, GPADL create/teardown,
//! channel open/close, poll and unload. Afterwards a hot-added channel is still offered, gets
//! its GPADL and opens.

use net_device::heap_dma::HeapDmaAllocator;
use net_device::{DmaAllocator, DmaRegion};
use vmbus::client::{ClientConfig, ClientCounters, GpadlBuffer, OpenParams, VmbusClient};
use vmbus::guid::interface;
use vmbus::hypervisor::HypervisorPort;
use vmbus::protocol::MAX_MESSAGE_SIZE;
use vmbus::ring::PAGE_SIZE;
use vmbus::testing::{FakeHost, FakeHostConfig, FakeHostPort, offer_message};
use vmbus::{Channel, ClientEvent};

use crate::engine::{Input, Outcome, Steps, Target, check, monotonic};

/// Operations one case runs at most.
const MAX_OPERATIONS: usize = 64;
/// Most `idle()` rounds one wait may take (the client's own bound).
const MAX_WAIT_STEPS: u64 = 40;
/// Relids the hostile messages and operations name.
const RELIDS: [u32; 3] = [1, 2, 3];
/// The relid hot-added at the end (no hostile message names it; relids stop at 2047).
const FINAL_RELID: u32 = 2000;
/// The client's first GPADL id (ids are handed out upwards from it).
const FIRST_GPADL_ID: u32 = 0x000e_1e10;
/// Live GPADL buffers and open channels kept at most.
const MAX_LIVE: usize = 4;

fn figures(counters: &ClientCounters) -> [(&'static str, u64); 9] {
    [
        ("messages_received", counters.messages_received),
        ("unknown_type", counters.unknown_type),
        ("malformed", counters.malformed),
        ("unknown_relid", counters.unknown_relid),
        ("unexpected", counters.unexpected),
        ("post_retries", counters.post_retries),
        ("timeouts", counters.timeouts),
        ("offers", counters.offers),
        ("rescinds", counters.rescinds),
    ]
}

/// One word of a hostile message body: a relid, a GPADL id, a status, or anything.
fn hostile_word(input: &mut Input) -> u32 {
    match input.below(6) {
        0 => 0,
        1 => RELIDS[input.below(RELIDS.len())],
        2 => FIRST_GPADL_ID + input.below(8) as u32,
        3 => [1, 0xc000_0001, 0x0001_0001][input.below(3)],
        _ => input.u32(),
    }
}

/// A host → guest message: a type (mostly a real one), then 0 to 58 body words.
fn hostile_message(input: &mut Input) -> Vec<u8> {
    let message_type = match input.below(4) {
        0 => input.u32(),
        _ => 1 + input.below(17) as u32,
    };
    let mut bytes = message_type.to_le_bytes().to_vec();
    bytes.extend_from_slice(&[0; 4]);
    let words = input.below((MAX_MESSAGE_SIZE - 8) / 4 + 1);
    for _ in 0..words {
        bytes.extend_from_slice(&hostile_word(input).to_le_bytes());
    }
    if input.bool() {
        // A length that is no multiple of 4.
        bytes.truncate(bytes.len().saturating_sub(1 + input.below(3)));
    }
    bytes
}

fn region(pages: usize) -> Result<DmaRegion, String> {
    HeapDmaAllocator::new()
        .allocate(pages * PAGE_SIZE, PAGE_SIZE)
        .ok_or_else(|| "DMA allocation failed".to_string())
}

fn idles(client: &VmbusClient<FakeHostPort>) -> u64 {
    client.port().now_ns() / 1_000_000
}

fn run(input: &mut Input, steps: &mut Steps) -> Outcome {
    let mut config = FakeHostConfig::default();
    for relid in RELIDS.iter().take(input.below(RELIDS.len() + 1)) {
        config
            .offers
            .push(offer_message(interface::NETWORK, *relid, 0x2000 + relid));
    }
    let (host, port) = FakeHost::new(config);
    for _ in 0..input.below(3) {
        host.inject(&hostile_message(input));
    }
    let client_config = ClientConfig {
        response_timeout_ns: MAX_WAIT_STEPS * 1_000_000 / 2,
        max_wait_steps: MAX_WAIT_STEPS,
        ..ClientConfig::default()
    };
    let versions = client_config.versions.len() as u64;
    let mut client = match VmbusClient::connect(port, client_config) {
        Ok(client) => client,
        Err(_) => {
            // Hostile messages ahead of the handshake may fail it; a clean host then connects.
            let (_host, port) = FakeHost::new(FakeHostConfig::default());
            VmbusClient::connect(port, ClientConfig::default())
                .map_err(|error| format!("a clean host refused the connection: {error}"))?;
            return Ok(());
        }
    };
    // Every version try and the offer wait may take a whole wait.
    let mut waits = versions + 1;
    steps.observe(idles(&client))?;
    check(idles(&client) <= waits * MAX_WAIT_STEPS, || {
        "connect waited longer than its bound".into()
    })?;

    let dma = HeapDmaAllocator::new();
    let mut gpadls: Vec<GpadlBuffer> = Vec::new();
    let mut channels: Vec<Channel> = Vec::new();
    let mut unloaded = false;
    let mut before = client.counters();
    for _ in 0..MAX_OPERATIONS {
        if input.is_empty() {
            break;
        }
        waits += 3;
        match input.below(11) {
            0 | 1 => {
                for _ in 0..1 + input.below(4) {
                    host.inject(&hostile_message(input));
                }
            }
            2 => {
                let relid = RELIDS[input.below(RELIDS.len())];
                host.offer(offer_message(interface::NETWORK, relid, 0x2000 + relid));
            }
            3 => host.rescind(RELIDS[input.below(RELIDS.len())]),
            4 => {
                for _ in 0..16 {
                    if client.poll().is_none() {
                        break;
                    }
                }
            }
            5 if gpadls.len() < MAX_LIVE => {
                let relid = RELIDS[input.below(RELIDS.len())];
                if let Ok(buffer) = client.create_gpadl(relid, region(1 + input.below(2))?) {
                    gpadls.push(buffer);
                }
            }
            6 if !gpadls.is_empty() => {
                let buffer = gpadls.swap_remove(input.below(gpadls.len()));
                let _ = client.teardown_gpadl(buffer);
            }
            7 if channels.len() < MAX_LIVE => {
                let relid = RELIDS[input.below(RELIDS.len())];
                if let Ok(channel) = client.open_channel(relid, &OpenParams::new(1, 1), &dma) {
                    channels.push(channel);
                }
            }
            8 if !channels.is_empty() => {
                let channel = channels.swap_remove(input.below(channels.len()));
                let _ = client.close_channel(channel);
            }
            9 => match input.below(4) {
                0 => host.set_silent(input.bool()),
                1 => host.set_busy_posts(input.below(4) as u32),
                2 => host.raise_event(RELIDS[input.below(RELIDS.len())]),
                _ => {
                    let _ = host.take_signals();
                }
            },
            10 if input.below(8) == 0 => {
                unloaded = true;
                let _ = client.unload();
            }
            _ => {}
        }
        steps.observe(idles(&client))?;
        check(idles(&client) <= waits * MAX_WAIT_STEPS, || {
            format!("{} idle rounds for {waits} waits", idles(&client))
        })?;
        let after = client.counters();
        monotonic("client", &figures(&before), &figures(&after))?;
        check(
            after.messages_received >= after.malformed + after.unknown_type,
            || "more drops than messages".into(),
        )?;
        before = after;
    }
    if unloaded {
        return Ok(());
    }
    // A well-behaved host again: a hot-added channel is offered, gets a GPADL and opens.
    host.set_silent(false);
    host.set_busy_posts(0);
    host.offer(offer_message(interface::NETWORK, FINAL_RELID, 0x3000));
    let mut offered = false;
    for _ in 0..MAX_OPERATIONS * 16 {
        match client.poll() {
            Some(ClientEvent::Offer(offer)) if offer.relid == FINAL_RELID => offered = true,
            Some(_) => {}
            None => break,
        }
    }
    check(offered, || {
        "a hot-added channel was not offered after hostile input".into()
    })?;
    let buffer = client
        .create_gpadl(FINAL_RELID, region(1)?)
        .map_err(|error| format!("GPADL refused after hostile input: {error}"))?;
    let channel = client
        .open_channel(FINAL_RELID, &OpenParams::new(1, 1), &dma)
        .map_err(|error| format!("open refused after hostile input: {error}"))?;
    client
        .close_channel(channel)
        .map_err(|error| format!("close failed after hostile input: {error}"))?;
    client
        .teardown_gpadl(buffer)
        .map_err(|error| format!("teardown failed after hostile input: {error}"))?;
    steps.observe(idles(&client))?;
    monotonic("client", &figures(&before), &figures(&client.counters()))
}

fn seeds() -> Vec<Vec<u8>> {
    // Choices below 256 take one byte. Offers 2, no early injection, then: GPADL on relid 1,
    // open relid 2, poll, inject a GPADL_CREATED for the first id, teardown, close.
    let ops = vec![
        2, 0, // two offers, no early injection
        5, 0, 0, // GPADL on relid 1, one page
        7, 1, // open relid 2
        4, // poll
        0, 0, 1, 9, 3, 1, 0, 2, 0, 0, 0, // GPADL_CREATED(relid 1, first id, status 0)
        6, 0, // teardown
        8, 0, // close
        2, 2, 3, 2, 4, // offer and rescind relid 3, poll
    ];
    let hostile_first = vec![1, 1, 0, 14, 3, 0, 4, 0, 0, 4, 0, 0];
    vec![ops, hostile_first]
}

/// The registration.
pub const TARGET: Target = Target {
    name: "vmbus-messages",
    about: "VMBus control plane vs a host injecting any channel message amid connect/GPADL/open/close",
    default_cases: 30_000,
    max_input_len: 1024,
    memory_bound: 2 << 20,
    step_bound: (10 + 3 * MAX_OPERATIONS as u64 + 8) * MAX_WAIT_STEPS,
    seeds,
    run,
};
