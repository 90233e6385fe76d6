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
//! Matching uses a fixed-size set-associative hash table (a key maps to one bucket of four
//! slots), so the cost per frame is small and bounded and no allocation happens after
//! construction. Most of the time only one path delivers (a switch sends our unicast to one
//! port): then nothing can match, and a frame is only appended to its path's ring of recent
//! frames, a sequential write instead of a table bucket anywhere in a few hundred KiB (which
//! under an emulated CPU costs more than the hashing). When the other path delivers again, the
//! first of its frames moves the ring's live entries into the table before it is matched, so
//! no copy is missed.

use alloc::vec;
use alloc::vec::Vec;

use crate::bond::PathId;

/// Bytes hashed from the start of the frame: Ethernet + IPv4/IPv6 + TCP/UDP headers, which
/// carry the IP ID, ports, sequence and acknowledgement numbers and the transport checksum (so
/// the payload counts too: the checksum covers it).
const HEAD_BYTES: usize = 80;
/// Bytes hashed from the end of the frame, so frames with equal headers but different payload
/// tails (and no checksum) still differ. Skipped for TCP (see [`frame_key`]).
const TAIL_BYTES: usize = 64;
/// Ethernet header length (no VLAN tag: a tagged frame is hashed head and tail).
const ETHERNET_HEADER: usize = 14;
/// Slots per bucket, all inspected per lookup: 4 × 16 bytes, one cache line.
const PROBES: usize = 4;

/// A 64-bit fingerprint of a frame: its length, its first [`HEAD_BYTES`] and last
/// [`TAIL_BYTES`]. Hashing only part of the frame keeps the cost flat at line rate.
///
/// A TCP segment is hashed as its length, IP header and the first 20 bytes of its TCP header
/// only: those carry the IP ID, addresses, ports, sequence and acknowledgement numbers and the
/// TCP checksum, which covers the options and the payload (the bond verified it, or the NIC
/// did, before asking), so they tell segments apart. The MACs, the options and the tail are
/// more loads (the tail another cache line, often another page of the receive buffer), each
/// dear under an emulated CPU. With `checksum_partial` (the field holds only the
/// pseudo-header sum) the frame is hashed head and tail like any other.
pub fn frame_key(frame: &[u8], checksum_partial: bool) -> u64 {
    let mut hash = (frame.len() as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x6a09_e667_f3bc_c908;
    let tcp_headers = tcp_header_end(frame)
        .filter(|_| !checksum_partial)
        .and_then(|end| frame.get(ETHERNET_HEADER..end));
    let (head, tail) = match tcp_headers {
        Some(headers) => (headers, &[][..]),
        None => {
            let head = &frame[..frame.len().min(HEAD_BYTES)];
            (
                head,
                &frame[frame.len().saturating_sub(TAIL_BYTES).max(head.len())..],
            )
        }
    };
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

/// For an untagged IPv4 or IPv6 frame carrying TCP, where the fixed 20 bytes of its TCP header
/// end, when the frame holds them. IPv6 counts only without extension headers.
fn tcp_header_end(frame: &[u8]) -> Option<usize> {
    const TCP_HEADER: usize = 20;
    const PROTOCOL_TCP: u8 = 6;
    let transport = match (frame.get(12..14), frame.get(ETHERNET_HEADER)) {
        (Some([0x08, 0x00]), Some(&version_and_length)) if version_and_length >> 4 == 4 => {
            let header_len = usize::from(version_and_length & 0x0f) * 4;
            // A fragment's transport header is not where the IP header says.
            let fragment = frame
                .get(ETHERNET_HEADER + 6..ETHERNET_HEADER + 8)
                .is_none_or(|field| field[0] & 0x3f != 0 || field[1] != 0);
            if header_len < 20 || fragment || frame.get(ETHERNET_HEADER + 9) != Some(&PROTOCOL_TCP)
            {
                return None;
            }
            ETHERNET_HEADER + header_len
        }
        (Some([0x86, 0xdd]), _) => {
            if frame.get(ETHERNET_HEADER + 6) != Some(&PROTOCOL_TCP) {
                return None;
            }
            ETHERNET_HEADER + 40
        }
        _ => return None,
    };
    let end = transport + TCP_HEADER;
    (end <= frame.len()).then_some(end)
}

/// 16 bytes, so a probe sequence spans two cache lines.
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

/// Index of `path` in [`DedupWindow::recent`].
fn path_index(path: PathId) -> usize {
    match path {
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

/// The hash table frames are matched in.
struct Table {
    slots: Vec<Entry>,
    mask: usize,
    /// Live entries overwritten before they expired.
    evictions: u64,
}

impl Table {
    /// Consumes the other path's live copy of `entry` if there is one (a duplicate), else
    /// stores `entry` (in a free or expired slot, or over the bucket's oldest).
    fn match_or_insert(&mut self, entry: Entry, window_ns: u64) -> Verdict {
        let now_ns = entry.arrived_ns;
        // Buckets are aligned groups of PROBES slots (one cache line). Bit 0 is the path, so
        // the bucket comes from the bits above it.
        let base = ((entry.tagged_key >> 1) as usize & self.mask) & !(PROBES - 1);
        let bucket = &mut self.slots[base..base + PROBES];
        let evictions = &mut self.evictions;
        let mut free = None;
        for (index, slot) in bucket.iter_mut().enumerate() {
            if slot.arrived_ns == 0 || now_ns.saturating_sub(slot.arrived_ns) > window_ns {
                free.get_or_insert(index);
            } else if slot.tagged_key ^ entry.tagged_key == 1 {
                // The other path's copy: consume it so a third copy is judged afresh.
                slot.arrived_ns = 0;
                return Verdict::Duplicate;
            }
        }
        let index = free.unwrap_or_else(|| {
            // A full bucket: the oldest entry's copy most likely arrived long ago.
            *evictions += 1;
            (0..PROBES)
                .min_by_key(|&index| bucket[index].arrived_ns)
                .unwrap_or(0)
        });
        bucket[index] = entry;
        Verdict::Deliver
    }
}

/// One path's frames delivered while the other path was quiet, oldest first, in a ring.
struct Recent {
    ring: Vec<Entry>,
    /// The ring's length minus one (a power of two).
    mask: usize,
    /// Frames appended since the window was created or cleared (the ring position is this
    /// masked).
    written: u64,
    /// Of those, the ones moved into the table (or skipped as expired or overwritten); never
    /// more than the ring's length behind `written`.
    indexed: u64,
    /// When this path last had a frame checked; 0 for never.
    last_ns: u64,
}

impl Recent {
    fn new(size: usize) -> Recent {
        Recent {
            ring: vec![EMPTY; size],
            mask: size - 1,
            written: 0,
            indexed: 0,
            last_ns: 0,
        }
    }

    fn position(&self, count: u64) -> usize {
        count as usize & self.mask
    }

    /// Appends `entry`; true when that overwrote an entry that had not reached the table and
    /// was still live (its copy could still have come).
    fn push(&mut self, entry: Entry, window_ns: u64) -> bool {
        let position = self.position(self.written);
        let mut overran = false;
        if self.written - self.indexed == self.ring.len() as u64 {
            let oldest = self.ring[position];
            overran = entry.arrived_ns.saturating_sub(oldest.arrived_ns) <= window_ns;
            self.indexed += 1;
        }
        self.ring[position] = entry;
        self.written += 1;
        overran
    }
}

/// The window; see the module documentation.
pub struct DedupWindow {
    table: Table,
    /// Per path, by [`path_index`].
    recent: [Recent; 2],
    window_ns: u64,
    /// Ring entries overwritten while still live, before they reached the table.
    ring_overruns: u64,
}

impl DedupWindow {
    /// A window remembering frames for `window_ns`, with `slots` table entries and as many
    /// per path in the rings (rounded up to a power of two, at least 64).
    pub fn new(slots: usize, window_ns: u64) -> DedupWindow {
        let size = slots.max(64).next_power_of_two();
        DedupWindow {
            table: Table {
                slots: vec![EMPTY; size],
                mask: size - 1,
                evictions: 0,
            },
            recent: [Recent::new(size), Recent::new(size)],
            window_ns,
            ring_overruns: 0,
        }
    }

    /// Live frames forgotten before their window ended: table entries overwritten because
    /// their bucket was full, or ring entries overwritten before they reached the table. A
    /// duplicate of such a frame may get through (harmless: TCP and the stack tolerate it).
    pub fn evictions(&self) -> u64 {
        self.table.evictions + self.ring_overruns
    }

    /// Forgets everything (when the second path goes away).
    pub fn clear(&mut self) {
        self.table.slots.fill(EMPTY);
        for recent in &mut self.recent {
            recent.written = 0;
            recent.indexed = 0;
            recent.last_ns = 0;
        }
    }

    /// Decides about a frame with fingerprint `key` that arrived on `path` at `now_ns`, and
    /// records it when it is delivered.
    pub fn check(&mut self, key: u64, path: PathId, now_ns: u64) -> Verdict {
        // A frame at time 0 must still count as live.
        let entry = Entry {
            tagged_key: tag(key, path),
            arrived_ns: now_ns.max(1),
        };
        let this = path_index(path);
        let other = 1 - this;
        let other_last_ns = self.recent[other].last_ns;
        self.recent[this].last_ns = entry.arrived_ns;
        if other_last_ns == 0 || entry.arrived_ns.saturating_sub(other_last_ns) > self.window_ns {
            // Everything the other path had is older than the window: nothing can match.
            if self.recent[this].push(entry, self.window_ns) {
                self.ring_overruns += 1;
            }
            return Verdict::Deliver;
        }
        // Both paths deliver: the table must hold every live frame of both before matching.
        self.move_to_table(this, entry.arrived_ns);
        self.move_to_table(other, entry.arrived_ns);
        self.table.match_or_insert(entry, self.window_ns)
    }

    /// Moves `path`'s ring entries not yet in the table, and still live at `now_ns`, into it.
    /// None of them can match: they were appended while the other path's frames were all
    /// older than the window.
    fn move_to_table(&mut self, path: usize, now_ns: u64) {
        let recent = &mut self.recent[path];
        while recent.indexed < recent.written {
            let entry = recent.ring[recent.position(recent.indexed)];
            recent.indexed += 1;
            if now_ns.saturating_sub(entry.arrived_ns) <= self.window_ns {
                self.table.match_or_insert(entry, self.window_ns);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn copy_on_other_path_within_window_is_a_duplicate() {
        let mut window = DedupWindow::new(256, 5 * MS);
        let key = frame_key(b"some frame bytes", false);
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
        let key = frame_key(b"retransmitted", false);
        assert_eq!(window.check(key, PathId::Vf, 0), Verdict::Deliver);
        assert_eq!(window.check(key, PathId::Vf, MS), Verdict::Deliver);
        let other = frame_key(b"another", false);
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
                frame_key(&frame[..len], false),
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
        assert_ne!(
            frame_key(&a, false),
            frame_key(&b, false),
            "tail bytes count"
        );
        assert_ne!(
            frame_key(&a[..100], false),
            frame_key(&a[..101], false),
            "length counts"
        );
        b[1490] = 1;
        b[20] = 7;
        assert_ne!(
            frame_key(&a, false),
            frame_key(&b, false),
            "head bytes count"
        );
    }

    /// An untagged IPv4 (or IPv6) TCP frame of `len` bytes whose bytes beyond the head are
    /// `tail`.
    fn tcp_frame(ipv6: bool, ip_options: usize, len: usize, tail: u8) -> Vec<u8> {
        let mut frame = vec![0x11; len];
        frame[HEAD_BYTES..].fill(tail);
        if ipv6 {
            frame[12..14].copy_from_slice(&[0x86, 0xdd]);
            frame[14] = 0x60;
            frame[20] = 6;
        } else {
            frame[12..14].copy_from_slice(&[0x08, 0x00]);
            frame[14] = 0x45 + (ip_options / 4) as u8;
            frame[20..22].copy_from_slice(&[0x40, 0]);
            frame[23] = 6;
        }
        frame
    }

    #[test]
    fn tcp_keys_rest_on_the_header_and_its_checksum_others_on_the_tail_too() {
        let key = |frame: &[u8]| frame_key(frame, false);
        for ipv6 in [false, true] {
            let (a, b) = (tcp_frame(ipv6, 0, 1514, 1), tcp_frame(ipv6, 0, 1514, 2));
            assert_eq!(
                key(&a),
                key(&b),
                "ipv6 {ipv6}: the checksum in the head covers the tail"
            );
            assert_ne!(
                frame_key(&a, true),
                frame_key(&b, true),
                "a partial checksum does not"
            );
            let mut other_header = a.clone();
            other_header[40] ^= 1;
            assert_ne!(
                key(&a),
                key(&other_header),
                "ipv6 {ipv6}: header bytes count"
            );
        }
        // The TCP options are not hashed (the checksum covers them); the MACs neither.
        let a = tcp_frame(false, 0, 1514, 1);
        let mut options = a.clone();
        options[60] ^= 1;
        options[0] ^= 1;
        assert_eq!(key(&a), key(&options));
        // IPv4 options move the TCP header, which is hashed wherever it is.
        let (a, b) = (tcp_frame(false, 40, 1514, 1), tcp_frame(false, 40, 1514, 2));
        assert_ne!(key(&a), key(&b));
        // Not TCP, a fragment, or a tagged frame: the tail counts.
        for change in [
            |frame: &mut Vec<u8>| frame[23] = 17,
            |frame: &mut Vec<u8>| frame[21] = 1,
            |frame: &mut Vec<u8>| frame[12..14].copy_from_slice(&[0x81, 0x00]),
        ] {
            let (mut a, mut b) = (tcp_frame(false, 0, 1514, 1), tcp_frame(false, 0, 1514, 2));
            change(&mut a);
            change(&mut b);
            assert_ne!(key(&a), key(&b));
        }
        // A frame cut short inside its headers is hashed whole, never read beyond its end.
        let short = tcp_frame(false, 0, 1514, 1);
        for len in [0, 13, 14, 24, 40, 51, 52, 53] {
            assert_eq!(
                key(&short[..len]),
                reference_key(&short[..len]),
                "len {len}"
            );
        }
    }

    #[test]
    fn a_full_probe_range_evicts_the_oldest_entry() {
        let mut window = DedupWindow::new(64, 100 * MS);
        // Keys that all land in bucket 0.
        for i in 0..(PROBES as u64 + 1) {
            assert_eq!(window.check(i << 32, PathId::Vf, i + 1), Verdict::Deliver);
        }
        // The synthetic path's first frame (another bucket) moves them into the table: the
        // first key is evicted, the second is still matched.
        assert_eq!(window.check(16, PathId::Synthetic, 20), Verdict::Deliver);
        assert_eq!(window.evictions(), 1);
        assert_eq!(window.check(0, PathId::Synthetic, 20), Verdict::Deliver);
        assert_eq!(
            window.check(2 << 32, PathId::Synthetic, 20),
            Verdict::Duplicate
        );
    }

    #[test]
    fn frames_of_a_lone_path_are_matched_when_the_other_path_wakes_up() {
        let mut window = DedupWindow::new(1024, 50 * MS);
        // The VF alone for a second: its frames only go to its ring.
        for frame in 0..800u64 {
            let key = frame_key(&frame.to_le_bytes(), false);
            assert_eq!(window.check(key, PathId::Vf, frame * MS), Verdict::Deliver);
        }
        // The synthetic path delivers copies: those of frames within the window are
        // duplicates, older ones are delivered.
        let now = 800 * MS;
        for frame in (700..800u64).rev() {
            let key = frame_key(&frame.to_le_bytes(), false);
            let expected = if now - frame * MS <= 50 * MS {
                Verdict::Duplicate
            } else {
                Verdict::Deliver
            };
            assert_eq!(
                window.check(key, PathId::Synthetic, now),
                expected,
                "frame {frame}"
            );
        }
        assert_eq!(window.evictions(), 0);
    }

    #[test]
    fn interleaved_copies_on_both_paths_are_each_dropped_once() {
        let mut window = DedupWindow::new(4096, 50 * MS);
        let mut duplicates = 0;
        // Like a hub: every frame on both paths, the copies up to 40 frames apart, either path
        // first, with quiet gaps longer than the window in between.
        for round in 0..3u64 {
            let start = round * 200 * MS;
            for frame in 0..1000u64 {
                let key = frame_key(&(round << 32 | frame).to_le_bytes(), false);
                let (first, second) = if frame % 3 == 0 {
                    (PathId::Synthetic, PathId::Vf)
                } else {
                    (PathId::Vf, PathId::Synthetic)
                };
                let at = start + frame * 10_000;
                assert_eq!(window.check(key, first, at), Verdict::Deliver);
                let lag = (frame * 7919 % 40) * 10_000;
                if window.check(key, second, at + lag) == Verdict::Duplicate {
                    duplicates += 1;
                }
            }
        }
        assert_eq!(duplicates, 3000);
        assert_eq!(window.evictions(), 0);
    }

    #[test]
    fn ring_entries_overwritten_before_the_other_path_woke_up_are_counted() {
        let mut window = DedupWindow::new(64, 50 * MS);
        // A long lone-path stretch overwrites only entries already out of the window: not
        // counted.
        for frame in 0..200u64 {
            window.check(
                frame_key(&frame.to_le_bytes(), false),
                PathId::Vf,
                frame * MS,
            );
        }
        assert_eq!(window.evictions(), 0);
        window.clear();
        for frame in 0..100u64 {
            window.check(
                frame_key(&frame.to_le_bytes(), false),
                PathId::Vf,
                MS + frame,
            );
        }
        let newest = frame_key(&99u64.to_le_bytes(), false);
        assert_eq!(
            window.check(newest, PathId::Synthetic, 2 * MS),
            Verdict::Duplicate
        );
        assert!(window.evictions() >= 36, "{}", window.evictions());
    }
}
