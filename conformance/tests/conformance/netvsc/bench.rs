//! `cargo xtask bench conformance`: frames/s and Gbit/s through our netvsc driver and
//! OpenVMM's netvsp in one process (channel level), MTU frames both ways and LSO frames out.
//! A baseline, not a target: the host is shared and noisy.

use std::time::{Duration, Instant};

use net_backend::RxMetadata;
use net_device::{DeviceError, NetDevice, TxMeta};
use netvsc_fallback::netvsc::{Netvsc, NetvscConfig};

use super::harness::{HOST_MAC, HostOptions, NetvspChannel, NetvspHost};

fn report(what: &str, frames: u64, bytes: u64, elapsed: Duration) {
    let seconds = elapsed.as_secs_f64();
    println!(
        "bench netvsc: {what}: {frames} frames in {:.3} s: {:.0} frames/s, {:.2} Gbit/s",
        seconds,
        frames as f64 / seconds,
        bytes as f64 * 8.0 / seconds / 1e9
    );
}

fn transmit(
    host: &NetvspHost,
    device: &mut Netvsc<NetvspChannel>,
    frame: &[u8],
    meta: TxMeta,
    count: u64,
) -> Duration {
    host.endpoint.lock().unwrap().discard = true;
    let before = host.endpoint.lock().unwrap().transmitted_frames;
    let started = Instant::now();
    let mut sent = 0;
    while sent < count {
        match device.transmit(frame.len(), &mut |buffer| {
            buffer.copy_from_slice(frame);
            meta
        }) {
            Ok(()) => sent += 1,
            Err(DeviceError::RingFull) => {
                device.flush();
                device.poll(0);
            }
            Err(error) => panic!("transmit failed: {error}"),
        }
        if sent % 16 == 0 {
            device.flush();
        }
    }
    device.flush();
    while host.endpoint.lock().unwrap().transmitted_frames < before + count {
        device.poll(0);
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "transmit stalled"
        );
    }
    started.elapsed()
}

fn mtu_frame() -> Vec<u8> {
    let mut frame: Vec<u8> = (0..1514).map(|i| i as u8).collect();
    frame[..6].copy_from_slice(&HOST_MAC);
    frame[12] = 0x88;
    frame[13] = 0xb5;
    frame
}

/// A TCP/IPv4 frame of `len` bytes whose checksum field holds the pseudo-header sum.
fn tcp_frame(len: usize) -> Vec<u8> {
    let mut frame = vec![0u8; len];
    frame[..6].copy_from_slice(&HOST_MAC);
    frame[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
    frame[12..14].copy_from_slice(&[0x08, 0x00]);
    let ip = &mut frame[14..34];
    ip.copy_from_slice(&[
        0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, 6, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2,
    ]);
    ip[2..4].copy_from_slice(&((len - 14) as u16).to_be_bytes());
    frame[46] = 0x50;
    frame
}

#[test]
#[ignore = "benchmark: run by `cargo xtask bench conformance` (release build, prints numbers)"]
fn netvsc_throughput_against_netvsp() {
    let (host, mut device) =
        NetvspHost::with_driver(HostOptions::default(), NetvscConfig::default());
    let frame = mtu_frame();
    // Warm-up, then MTU frames out (send buffer).
    transmit(&host, &mut device, &frame, TxMeta::default(), 1_000);
    let count = 50_000;
    let elapsed = transmit(&host, &mut device, &frame, TxMeta::default(), count);
    report("transmit 1514-byte frames", count, count * 1514, elapsed);
    // LSO frames out.
    let max = device.capabilities().max_tso_size + 14;
    let large = tcp_frame(max);
    let meta = TxMeta {
        checksum: Some((34, 16)),
        tso_mss: Some(1448),
    };
    let count = 5_000;
    let elapsed = transmit(&host, &mut device, &large, meta, count);
    report(
        &format!("transmit {max}-byte LSO frames"),
        count,
        count * max as u64,
        elapsed,
    );
    // MTU frames in: injected in batches the host delivers as fast as we complete them.
    let count = 50_000u64;
    let started = Instant::now();
    let mut received = 0u64;
    let mut injected = 0u64;
    while received < count {
        while injected < count && injected - received < 2_000 {
            host.inject(frame.clone(), RxMetadata::default());
            injected += 1;
        }
        received += device.receive(256, &mut |_, _| {}) as u64;
        device.poll(0);
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "receive stalled"
        );
    }
    report(
        "receive 1514-byte frames",
        count,
        count * 1514,
        started.elapsed(),
    );
}
