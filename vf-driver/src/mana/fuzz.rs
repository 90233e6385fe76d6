//! Fuzz entry points: the MANA driver's handling of device-written memory (EQEs, CQEs, HWC
//! responses) driven with arbitrary bytes through the fake device. Each must return without
//! panicking or hanging whatever `data` holds; the harness calls them from its targets.

use alloc::boxed::Box;
use alloc::vec::Vec;

use net_device::{NetDevice, TxMeta};

use super::fake::{FakeMana, RxForgery};
use super::{Mana, ManaConfig};
use crate::WaitHost;
use crate::fake_dma::FakeDmaAllocator;

/// A clock that moves 1 µs per look, so the driver's bounded waits end fast.
struct StepClock(u64);

impl WaitHost for StepClock {
    fn now_ns(&mut self) -> u64 {
        self.0 += 1_000;
        self.0
    }
    fn idle(&mut self) {}
}

fn config() -> ManaConfig {
    ManaConfig {
        rx_ring_size: 8,
        tx_ring_size: 8,
        tx_buffer_bytes: 128 * 1024,
        hwc_timeout_ns: 2_000_000,
        max_wait_iterations: 10_000,
        ..ManaConfig::default()
    }
}

/// Brings a driver up on the fake, then treats `data` as a script of raw queue entries: each
/// step's first byte picks the ring (RX CQ, TX CQ, data EQ, HWC EQ) and whether the owner
/// count is the right one or forged, the next 64 bytes are the entry; between steps the
/// driver receives, polls and transmits.
pub fn data_path_entries(data: &[u8]) {
    let fake = FakeMana::new();
    let Ok(mut driver) = Mana::new(
        fake.clone(),
        FakeDmaAllocator::new(),
        Box::new(StepClock(0)),
        config(),
    ) else {
        return;
    };
    let mut now = 0;
    for step in data.chunks(65) {
        let control = step[0];
        let entry = &step[1..];
        let owner = (control & 0x10 != 0).then_some(u32::from(control >> 5));
        fake.post_raw(control & 3, entry, owner);
        if control & 0x04 != 0 {
            fake.inject(entry, RxForgery::default());
        }
        let _ = driver.receive(16, &mut |_, _| {});
        now += 2_000_000;
        driver.poll(now);
        let _ = driver.transmit(entry.len().max(14), &mut |buffer| {
            let len = buffer.len().min(entry.len());
            buffer[..len].copy_from_slice(&entry[..len]);
            TxMeta::default()
        });
        driver.flush();
    }
    driver.stop();
}

/// Answers the driver's HWC requests (bring-up, then teardown) with `data` cut into forged
/// responses (see [`super::fake::FakeState::forged_responses`]): claimed lengths, receive WQE
/// offsets, headers and bodies all hostile.
pub fn hwc_responses(data: &[u8]) {
    let fake = FakeMana::new();
    {
        let mut state = fake.state.borrow_mut();
        let mut rest = data;
        while !rest.is_empty() {
            let len = usize::from(rest[0]).min(rest.len() - 1) * 4;
            let len = len.min(rest.len() - 1);
            state.forged_responses.push_back(rest[1..1 + len].to_vec());
            rest = &rest[1 + len..];
        }
    }
    let mut driver = Mana::new(
        fake.clone(),
        FakeDmaAllocator::new(),
        Box::new(StepClock(0)),
        config(),
    );
    if let Ok(driver) = driver.as_mut() {
        driver.poll(1_000_000_000);
        driver.stop();
    }
    let _: Vec<u32> = fake.state.borrow().requests.clone();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn noise(len: usize, seed: u32) -> Vec<u8> {
        let mut state = seed | 1;
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                state as u8
            })
            .collect()
    }

    #[test]
    fn the_fuzz_entry_points_survive_noise() {
        for seed in 1..40 {
            data_path_entries(&noise(65 * 12, seed));
            hwc_responses(&noise(400, seed));
        }
        data_path_entries(&[]);
        hwc_responses(&[]);
    }
}
