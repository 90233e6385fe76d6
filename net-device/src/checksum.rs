//! The Internet checksum (RFC 1071) core shared by the drivers and the stack.
//!
//! It sums 64-bit words with an explicit end-around carry. A byte-pair loop gets
//! auto-vectorised into SSE unpack instructions, which an emulated CPU (QEMU TCG) runs through
//! slow helpers; this form stays scalar and touches 4× fewer words.

/// One's-complement sum of `data` (big-endian 16-bit words, odd byte padded) added to `sum`,
/// as a 64-bit accumulator with end-around carry; fold it with [`fold`].
pub fn add(mut sum: u64, data: &[u8]) -> u64 {
    let mut words = data.chunks_exact(8);
    for word in &mut words {
        let value = u64::from_be_bytes([
            word[0], word[1], word[2], word[3], word[4], word[5], word[6], word[7],
        ]);
        let (total, carry) = sum.overflowing_add(value);
        sum = total + u64::from(carry);
    }
    let rest = words.remainder();
    let mut tail = [0u8; 8];
    tail[..rest.len()].copy_from_slice(rest);
    let (total, carry) = sum.overflowing_add(u64::from_be_bytes(tail));
    total + u64::from(carry)
}

/// Folds a 64-bit accumulator to the 16-bit one's-complement sum.
pub fn fold(mut sum: u64) -> u16 {
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// The RFC 1071 definition, byte pair by byte pair: slow and obviously right. Tests check the
/// fast paths (and what fake devices produce) against it.
pub fn reference(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for pair in data.chunks(2) {
        sum += u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]));
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_match_the_reference_for_every_length_and_carry_heavy_data() {
        for len in 0..200 {
            let ones = std::vec![0xffu8; len];
            let pattern: std::vec::Vec<u8> = (0..len).map(|i| (i * 37 + 11) as u8).collect();
            assert_eq!(fold(add(0, &ones)), reference(&ones), "len {len}");
            assert_eq!(fold(add(0, &pattern)), reference(&pattern), "len {len}");
            // A saturated accumulator must carry around, not overflow.
            let _ = fold(add(u64::MAX, &pattern));
        }
    }
}
