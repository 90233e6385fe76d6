//! Checks shared by the device targets.

use net_device::{LinkState, NetDevice, Stats};

use crate::engine::{Outcome, monotonic};

/// The counters of [`Stats`], named, for [`monotonic`].
pub fn stats_fields(stats: &Stats) -> [(&'static str, u64); 9] {
    [
        ("rx_frames", stats.rx_frames),
        ("rx_bytes", stats.rx_bytes),
        ("tx_frames", stats.tx_frames),
        ("tx_bytes", stats.tx_bytes),
        ("rx_dropped_bad", stats.rx_dropped_bad),
        ("tx_ring_full", stats.tx_ring_full),
        ("interrupts", stats.interrupts),
        ("hardware_rx_frames", stats.hardware_rx_frames),
        ("hardware_tx_frames", stats.hardware_tx_frames),
    ]
}

/// Tracks a device's [`Stats`] between steps: they must never go backwards.
pub struct StatsWatch {
    last: Stats,
}

impl StatsWatch {
    /// Starts from the device's current counters.
    pub fn new(device: &dyn NetDevice) -> Self {
        StatsWatch {
            last: device.stats(),
        }
    }

    /// Fails when a counter shrank since the last call.
    pub fn check(&mut self, device: &dyn NetDevice) -> Outcome {
        let now = device.stats();
        monotonic("device", &stats_fields(&self.last), &stats_fields(&now))?;
        self.last = now;
        Ok(())
    }
}

/// Everything a device hands up within `budget`, with the count the driver returned.
pub fn drain(device: &mut dyn NetDevice, budget: usize) -> (Vec<Vec<u8>>, usize) {
    let mut frames = Vec::new();
    let count = device.receive(budget, &mut |frame, _| frames.push(frame.to_vec()));
    (frames, count)
}

/// True when the device says it can carry traffic.
pub fn is_up(device: &dyn NetDevice) -> bool {
    device.link_state() == LinkState::Up
}
