//! Recent-frames window that stops a frame arriving on both bond paths from reaching the stack twice.
//!
//! In a hub-like topology (or while the host's switch is re-learning) every frame may arrive on
//! both the VF and the synthetic NIC. The window remembers, for a few milliseconds, a hash of each
//! delivered frame and the path it came on. A frame is a duplicate only if an identical frame
//! arrived on the *other* path within the window and has not already been matched; so:
//! * a frame seen only on the inactive path is delivered (nothing to match);
//! * the same frame arriving twice on one path (a genuine retransmission) is delivered twice;
//! * an identical frame arriving after the window (a later retransmission) is delivered.
//!
//! The table is a fixed-size set-associative hash table (a key maps to one bucket of four
//! slots), so the cost per frame is small and bounded and no allocation happens after
//! construction. It runs for every received frame while two paths deliver.

use alloc::vec;
use alloc::vec::Vec;

use crate::bond::PathId;

/// Bytes hashed from the start of the frame: Ethernet + IPv4/IPv6 + TCP/UDP headers, which
/// carry the IP ID, ports, sequence and acknowledgement numbers and the transport checksum (so
/// the payload counts too: the checksum covers it).
const HEAD_BYTES: usize = 80;
/// Bytes hashed from the end of the frame, so frames with equal headers but different payload
/// tails (and no checksum) still differ.
const TAIL_BYTES: usize = 64;
/// Slots per bucket, all inspected per lookup: 4 × 16 bytes, one cache line.
const PROBES: usize = 4;

/// A 64-bit fingerprint of a frame: its length, its first [`HEAD_BYTES`] and last
/// [`TAIL_BYTES`]. Hashing only part of the frame keeps the cost flat at line rate.
pub fn frame_key(frame: &[u8]) -> u64 {
    let mut hash = (frame.len() as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x6a09_e667_f3bc_c908;
    let head = &frame[..frame.len().min(HEAD_BYTES)];
    let tail_start = frame.len().saturating_sub(TAIL_BYTES).max(head.len());
    let tail = &frame[tail_start..];
    let mut mix = |word: u64| {
        hash = (hash ^ word).wrapping_mul(0x0000_0100_0000_01b3);
        hash ^= hash >> 29;
    };
    for part in [head, tail] {
        // Whole words are loaded at once: copying each chunk into an array would call
        // `memcpy` per word, the largest cost of this function under an emulated CPU.
        let mut words = part.chunks_exact(8);
        for chunk in &mut words {
            if let Ok(bytes) = <[u8; 8]>::try_from(chunk) {
                mix(u64::from_le_bytes(bytes));
            }
        }
        let rest = words.remainder();
        if !rest.is_empty() {
            let word = rest
                .iter()
                .rev()
                .fold(0u64, |word, &byte| word << 8 | u64::from(byte));
            mix(word);
        }
    }
    hash
}

/// 16 bytes, so a probe sequence spans two cache lines: the table is touched for every frame.
#[derive(Clone, Copy)]
struct Entry {
    /// The fingerprint with its lowest bit replaced by the path it arrived on.
    tagged_key: u64,
    /// When it arrived; 0 for a free (or consumed) slot.
    arrived_ns: u64,
}

const EMPTY: Entry = Entry {
    tagged_key: 0,
    arrived_ns: 0,
};

/// `key` with its lowest bit standing for `path`.
fn tag(key: u64, path: PathId) -> u64 {
    (key & !1)
        | match path {
            PathId::Synthetic => 0,
            PathId::Vf => 1,
        }
}

/// What [`DedupWindow::check`] decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// First sighting (or a legitimate repeat): hand it to the stack.
    Deliver,
    /// The other path already delivered this frame within the window: drop it.
    Duplicate,
}

/// The window; see the module documentation.
pub struct DedupWindow {
    slots: Vec<Entry>,
    mask: usize,
    window_ns: u64,
    /// Live entries overwritten before they expired because the probe range was full; a
    /// duplicate of such a frame may get through (harmless: TCP and the stack tolerate it).
    pub evictions: u64,
}

impl DedupWindow {
    /// A window remembering frames for `window_ns`, with `slots` entries (rounded up to a power of
    /// two, at least 64).
    pub fn new(slots: usize, window_ns: u64) -> DedupWindow {
        let size = slots.max(64).next_power_of_two();
        DedupWindow {
            slots: vec![EMPTY; size],
            mask: size - 1,
            window_ns,
            evictions: 0,
        }
    }

    /// Forgets everything (when the second path goes away).
    pub fn clear(&mut self) {
        self.slots.fill(EMPTY);
    }

    /// Decides about a frame with fingerprint `key` that arrived on `path` at `now_ns`, and
    /// records it when it is delivered.
    pub fn check(&mut self, key: u64, path: PathId, now_ns: u64) -> Verdict {
        let tagged_key = tag(key, path);
        // Bit 0 is the path, so the bucket comes from the bits above it. Buckets are aligned
        // groups of PROBES slots (one cache line).
        let base = ((key >> 1) as usize & self.mask) & !(PROBES - 1);
        // A frame at time 0 must still count as live.
        let arrived_ns = now_ns.max(1);
        let window_ns = self.window_ns;
        let bucket = &mut self.slots[base..base + PROBES];
        let live = |entry: &Entry| {
            entry.arrived_ns != 0 && arrived_ns.saturating_sub(entry.arrived_ns) <= window_ns
        };
        let mut free = None;
        for (index, entry) in bucket.iter_mut().enumerate() {
            if !live(entry) {
                free.get_or_insert(index);
            } else if entry.tagged_key ^ tagged_key == 1 {
                // The other path's copy: consume the entry so a third copy is judged afresh.
                entry.arrived_ns = 0;
                return Verdict::Duplicate;
            }
        }
        let index = free.unwrap_or_else(|| {
            // A full bucket: the oldest entry's copy most likely arrived long ago.
            self.evictions += 1;
            (0..PROBES)
                .min_by_key(|&index| bucket[index].arrived_ns)
                .unwrap_or(0)
        });
        bucket[index] = Entry {
            tagged_key,
            arrived_ns,
        };
        Verdict::Deliver
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn copy_on_other_path_within_window_is_a_duplicate() {
        let mut window = DedupWindow::new(256, 5 * MS);
        let key = frame_key(b"some frame bytes");
        assert_eq!(window.check(key, PathId::Vf, 0), Verdict::Deliver);
        assert_eq!(window.check(key, PathId::Synthetic, MS), Verdict::Duplicate);
        // The entry was consumed: a third copy is delivered.
        assert_eq!(
            window.check(key, PathId::Synthetic, 2 * MS),
            Verdict::Deliver
        );
    }

    #[test]
    fn same_path_repeat_and_late_copy_are_delivered() {
        let mut window = DedupWindow::new(256, 5 * MS);
        let key = frame_key(b"retransmitted");
        assert_eq!(window.check(key, PathId::Vf, 0), Verdict::Deliver);
        assert_eq!(window.check(key, PathId::Vf, MS), Verdict::Deliver);
        let other = frame_key(b"another");
        assert_eq!(window.check(other, PathId::Vf, 0), Verdict::Deliver);
        assert_eq!(
            window.check(other, PathId::Synthetic, 6 * MS),
            Verdict::Deliver
        );
    }

    /// The fingerprint as first written (a copy per word): keys must not change meaning.
    fn reference_key(frame: &[u8]) -> u64 {
        let mut hash =
            (frame.len() as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x6a09_e667_f3bc_c908;
        let head = &frame[..frame.len().min(HEAD_BYTES)];
        let tail_start = frame.len().saturating_sub(TAIL_BYTES).max(head.len());
        for part in [head, &frame[tail_start..]] {
            for chunk in part.chunks(8) {
                let mut word = [0u8; 8];
                word[..chunk.len()].copy_from_slice(chunk);
                hash = (hash ^ u64::from_le_bytes(word)).wrapping_mul(0x0000_0100_0000_01b3);
                hash ^= hash >> 29;
            }
        }
        hash
    }

    #[test]
    fn keys_hash_whole_and_partial_words_as_bytes() {
        let frame: Vec<u8> = (0..1600u32).map(|i| (i * 37 % 251) as u8).collect();
        for len in [
            0, 1, 7, 8, 13, 60, 79, 80, 81, 143, 144, 145, 150, 1514, 1600,
        ] {
            assert_eq!(
                frame_key(&frame[..len]),
                reference_key(&frame[..len]),
                "len {len}"
            );
        }
    }

    #[test]
    fn keys_differ_for_different_frames() {
        let mut a = [0u8; 1500];
        let mut b = [0u8; 1500];
        a[1490] = 1;
        b[1490] = 2;
        assert_ne!(frame_key(&a), frame_key(&b), "tail bytes count");
        assert_ne!(frame_key(&a[..100]), frame_key(&a[..101]), "length counts");
        b[1490] = 1;
        b[20] = 7;
        assert_ne!(frame_key(&a), frame_key(&b), "head bytes count");
    }

    #[test]
    fn a_full_probe_range_evicts_the_oldest_entry() {
        let mut window = DedupWindow::new(64, 100 * MS);
        // Keys that all land in bucket 0.
        for i in 0..(PROBES as u64 + 1) {
            assert_eq!(window.check(i << 32, PathId::Vf, i + 1), Verdict::Deliver);
        }
        assert_eq!(window.evictions, 1);
        // The first key was evicted; the second is still matched.
        assert_eq!(window.check(0, PathId::Synthetic, 20), Verdict::Deliver);
        assert_eq!(
            window.check(2 << 32, PathId::Synthetic, 20),
            Verdict::Duplicate
        );
    }
}
