//! The physical frame allocator: a bitmap over one contiguous pool of DMA-able 4 KiB frames.
//!
//! Rings and buffer pools need physically contiguous runs, so allocation is first-fit over the
//! bitmap with an alignment in frames. The pool is small (at most 256 MiB = 64 Ki frames), so
//! a linear scan is cheap and allocation happens only at device bring-up.

use super::PAGE_SIZE;

/// Largest pool, in frames (256 MiB).
pub const MAX_FRAMES: usize = 65536;

/// Bitmap frame allocator over `[base, base + frames * 4096)`.
pub struct FrameAllocator {
    base: u64,
    frames: usize,
    used: [u64; MAX_FRAMES / 64],
    free_frames: usize,
}

impl FrameAllocator {
    /// An allocator with no memory.
    pub const fn empty() -> FrameAllocator {
        FrameAllocator {
            base: 0,
            frames: 0,
            used: [0; MAX_FRAMES / 64],
            free_frames: 0,
        }
    }

    /// Takes ownership of the page-aligned pool `[base, base + len)` (clamped to
    /// [`MAX_FRAMES`]).
    pub fn init(&mut self, base: u64, len: u64) {
        self.base = base;
        self.frames = ((len / PAGE_SIZE) as usize).min(MAX_FRAMES);
        self.used = [0; MAX_FRAMES / 64];
        self.free_frames = self.frames;
    }

    fn is_used(&self, frame: usize) -> bool {
        self.used[frame / 64] & (1 << (frame % 64)) != 0
    }

    fn set_used(&mut self, frame: usize, used: bool) {
        if used {
            self.used[frame / 64] |= 1 << (frame % 64);
        } else {
            self.used[frame / 64] &= !(1 << (frame % 64));
        }
    }

    /// Allocates `count` contiguous frames whose physical address is a multiple of
    /// `align_frames` frames. Returns the physical address of the first.
    pub fn allocate(&mut self, count: usize, align_frames: usize) -> Option<u64> {
        if count == 0 || count > self.free_frames || !align_frames.is_power_of_two() {
            return None;
        }
        let base_frame = (self.base / PAGE_SIZE) as usize;
        let mut start = 0;
        while start + count <= self.frames {
            // Align the absolute frame number, not the index into the pool.
            let misalignment = (base_frame + start) % align_frames;
            if misalignment != 0 {
                start += align_frames - misalignment;
                continue;
            }
            match (start..start + count).find(|&frame| self.is_used(frame)) {
                Some(used) => start = used + 1,
                None => {
                    for frame in start..start + count {
                        self.set_used(frame, true);
                    }
                    self.free_frames -= count;
                    return Some(self.base + start as u64 * PAGE_SIZE);
                }
            }
        }
        None
    }

    /// Returns `count` frames starting at `address`. Frames outside the pool or already free
    /// are ignored (and reported by the return value: how many were actually freed).
    pub fn free(&mut self, address: u64, count: usize) -> usize {
        if address < self.base || !address.is_multiple_of(PAGE_SIZE) {
            return 0;
        }
        let first = ((address - self.base) / PAGE_SIZE) as usize;
        let mut freed = 0;
        for frame in first..first.saturating_add(count).min(self.frames) {
            if self.is_used(frame) {
                self.set_used(frame, false);
                freed += 1;
            }
        }
        self.free_frames += freed;
        freed
    }

    /// Free frames left.
    pub fn free_frames(&self) -> usize {
        self.free_frames
    }

    /// Frames in the pool.
    pub fn total_frames(&self) -> usize {
        self.frames
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allocator(frames: u64) -> Box<FrameAllocator> {
        let mut allocator = Box::new(FrameAllocator::empty());
        allocator.init(0x20_0000, frames * PAGE_SIZE);
        allocator
    }

    #[test]
    fn allocations_are_contiguous_aligned_and_disjoint() {
        let mut frames = allocator(64);
        let a = frames.allocate(1, 1).unwrap();
        let b = frames.allocate(3, 4).unwrap();
        assert_eq!(a, 0x20_0000);
        assert_eq!(b % (4 * PAGE_SIZE), 0);
        assert!(b >= a + PAGE_SIZE);
        let c = frames.allocate(2, 1).unwrap();
        assert!(
            c + 2 * PAGE_SIZE <= b || c >= b + 3 * PAGE_SIZE,
            "no overlap"
        );
        assert_eq!(frames.free_frames(), 64 - 6);
    }

    #[test]
    fn exhaustion_and_free_and_double_free() {
        let mut frames = allocator(8);
        let all = frames.allocate(8, 1).unwrap();
        assert_eq!(frames.allocate(1, 1), None);
        assert_eq!(frames.free(all + PAGE_SIZE, 2), 2);
        assert_eq!(frames.free(all + PAGE_SIZE, 2), 0, "double free is ignored");
        assert_eq!(frames.allocate(2, 1), Some(all + PAGE_SIZE));
        assert_eq!(frames.allocate(0, 1), None);
        assert_eq!(
            frames.allocate(1, 3),
            None,
            "alignment must be a power of two"
        );
        assert_eq!(frames.free(0x1000, 1), 0, "outside the pool");
    }

    #[test]
    fn fragmented_pool_finds_a_run_past_holes() {
        let mut frames = allocator(16);
        let singles: Vec<u64> = (0..16).map(|_| frames.allocate(1, 1).unwrap()).collect();
        for (index, frame) in singles.iter().enumerate() {
            if index % 2 == 0 || index >= 12 {
                frames.free(*frame, 1);
            }
        }
        assert_eq!(frames.allocate(4, 1), Some(singles[12]));
    }
}
