//! The VF's hardware statistics: 32-bit counters that wrap, folded into 64-bit totals.
//!
//! VFGPRC/VFGPTC/VFGORC/VFGOTC/VFMPRC count per VF, are not cleared by reading (82576 datasheet
//! §8.26.8; QEMU implements them as plain registers) and wrap at 2^32. Each read adds the
//! wrapping difference to the last read value, so totals stay right across wraps; around a VF
//! reset the driver folds the counters in just before and takes a fresh baseline just after, so
//! totals survive whether or not the reset clears the hardware counters.

/// Number of counters tracked.
pub(crate) const COUNTER_COUNT: usize = 5;
const GOOD_PACKETS_RECEIVED: usize = 0;
const GOOD_PACKETS_TRANSMITTED: usize = 1;
const GOOD_OCTETS_RECEIVED: usize = 2;
const GOOD_OCTETS_TRANSMITTED: usize = 3;
const MULTICAST_PACKETS_RECEIVED: usize = 4;

/// Totals of the VF's hardware counters since the driver was created.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct HardwareStats {
    /// Good packets received (VFGPRC).
    pub rx_packets: u64,
    /// Good packets transmitted (VFGPTC).
    pub tx_packets: u64,
    /// Good octets received, counting the 4-byte FCS (VFGORC).
    pub rx_bytes: u64,
    /// Good octets transmitted, counting the 4-byte FCS (VFGOTC).
    pub tx_bytes: u64,
    /// Multicast packets received (VFMPRC).
    pub rx_multicast: u64,
}

/// Folds successive 32-bit counter readings into 64-bit totals.
#[derive(Clone, Debug, Default)]
pub(crate) struct CounterAccumulator {
    /// The previous reading; `None` until a baseline was taken (whatever the counters held
    /// before the driver started is not ours).
    last: Option<[u32; COUNTER_COUNT]>,
    totals: [u64; COUNTER_COUNT],
}

impl CounterAccumulator {
    /// Starts counting from `current` (after a reset, or at start-up).
    pub(crate) fn rebaseline(&mut self, current: [u32; COUNTER_COUNT]) {
        self.last = Some(current);
    }

    /// Adds what happened since the last reading (nothing before the first baseline).
    pub(crate) fn accumulate(&mut self, current: [u32; COUNTER_COUNT]) {
        let Some(last) = self.last.as_mut() else {
            return;
        };
        for ((total, last), now) in self.totals.iter_mut().zip(last.iter_mut()).zip(current) {
            *total += u64::from(now.wrapping_sub(*last));
            *last = now;
        }
    }

    /// The totals so far.
    pub(crate) fn snapshot(&self) -> HardwareStats {
        HardwareStats {
            rx_packets: self.totals[GOOD_PACKETS_RECEIVED],
            tx_packets: self.totals[GOOD_PACKETS_TRANSMITTED],
            rx_bytes: self.totals[GOOD_OCTETS_RECEIVED],
            tx_bytes: self.totals[GOOD_OCTETS_TRANSMITTED],
            rx_multicast: self.totals[MULTICAST_PACKETS_RECEIVED],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrapping_counters_keep_counting_past_two_to_the_32() {
        let mut accumulator = CounterAccumulator::default();
        accumulator.accumulate([7, 7, 7, 7, 7]);
        assert_eq!(
            accumulator.snapshot(),
            HardwareStats::default(),
            "no baseline yet"
        );
        accumulator.rebaseline([u32::MAX - 1, 0, 0, 0, 0]);
        accumulator.accumulate([1, 0, 0, 0, 0]);
        assert_eq!(accumulator.snapshot().rx_packets, 3);
        accumulator.accumulate([5, 2, 0, 0, 0]);
        assert_eq!(accumulator.snapshot().rx_packets, 7);
        assert_eq!(accumulator.snapshot().tx_packets, 2);
    }

    #[test]
    fn a_reset_that_clears_the_counters_loses_nothing() {
        let mut accumulator = CounterAccumulator::default();
        accumulator.rebaseline([100, 0, 0, 0, 0]);
        accumulator.accumulate([110, 0, 0, 0, 0]);
        // The device resets its counters to 0; the driver re-baselines.
        accumulator.rebaseline([0, 0, 0, 0, 0]);
        accumulator.accumulate([4, 0, 0, 0, 0]);
        assert_eq!(accumulator.snapshot().rx_packets, 14);
    }
}
