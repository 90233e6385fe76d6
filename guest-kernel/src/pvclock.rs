//! Paravirtual clock arithmetic (KVM pvclock scaling factors), kept pure for host tests.

/// TSC frequency from pvclock scaling: ns = ((ticks << shift) * mul) >> 32, so
/// Hz = 10^9 * 2^32 / (mul * 2^shift).
pub fn tsc_hz_from_pvclock(mul: u32, shift: i8) -> Option<u64> {
    if mul == 0 || !(-32..=32).contains(&shift) {
        return None;
    }
    let numerator = 1_000_000_000u128 << 32;
    let hz = if shift >= 0 {
        numerator / (u128::from(mul) << shift)
    } else {
        (numerator << (-shift)) / u128::from(mul)
    };
    u64::try_from(hz).ok().filter(|hz| *hz >= 1_000_000)
}

#[cfg(test)]
mod tests {
    use super::tsc_hz_from_pvclock;

    #[test]
    fn pvclock_scaling_gives_the_tsc_frequency() {
        // 2 GHz: 0.5 ns per tick = mul 2^31 with shift 0.
        assert_eq!(tsc_hz_from_pvclock(1 << 31, 0), Some(2_000_000_000));
        // 3 GHz as KVM encodes it: shift -1, mul = 2^32 * 2/3.
        let hz = tsc_hz_from_pvclock(0xaaaa_aaaa, -1).unwrap();
        assert!((2_999_999_000..=3_000_001_000).contains(&hz), "{hz}");
        assert_eq!(tsc_hz_from_pvclock(0, 0), None);
        assert_eq!(tsc_hz_from_pvclock(1, 40), None);
    }
}
