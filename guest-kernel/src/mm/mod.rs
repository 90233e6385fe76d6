//! Physical memory: the usable-RAM plan from the memory map, the frame allocator for DMA-able
//! pages, the kernel heap, and (on the target) page tables and MMIO mappings.
//!
//! All RAM is identity-mapped, so a frame's physical address is also its address for the CPU;
//! that is what makes heap and frame memory DMA-able without translation.

pub mod copy;
pub mod frames;
#[cfg(not(any(test, feature = "host")))]
pub mod heap;
#[cfg(not(any(test, feature = "host")))]
pub mod mmio;
#[cfg(not(any(test, feature = "host")))]
pub mod paging;

use crate::boot::{MemoryRegion, RegionKind};

/// Page size.
pub const PAGE_SIZE: u64 = 4096;

/// A half-open physical range `[start, end)`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct PhysRange {
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
}

impl PhysRange {
    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.end <= self.start
    }
}

/// Most usable ranges we track.
pub const MAX_RANGES: usize = 64;

/// Usable RAM from the memory map, page-aligned, minus `exclude` (kernel image, boot data, the
/// first MiB), in ascending order. Overlapping or reserved-overlapped entries are handled
/// conservatively: anything any non-usable entry covers is not usable.
pub fn usable_ranges(regions: &[MemoryRegion], exclude: &[PhysRange]) -> heapless_ranges::Ranges {
    let mut ranges = heapless_ranges::Ranges::new();
    for region in regions
        .iter()
        .filter(|region| region.kind == RegionKind::Usable)
    {
        let start = region.start.div_ceil(PAGE_SIZE) * PAGE_SIZE;
        let end = region.end() / PAGE_SIZE * PAGE_SIZE;
        if start < end {
            ranges.push(PhysRange { start, end });
        }
    }
    for region in regions
        .iter()
        .filter(|region| region.kind != RegionKind::Usable)
    {
        let start = region.start / PAGE_SIZE * PAGE_SIZE;
        let end = region.end().div_ceil(PAGE_SIZE) * PAGE_SIZE;
        ranges.remove(PhysRange { start, end });
    }
    for range in exclude {
        let start = range.start / PAGE_SIZE * PAGE_SIZE;
        let end = range.end.div_ceil(PAGE_SIZE) * PAGE_SIZE;
        ranges.remove(PhysRange { start, end });
    }
    ranges
}

/// A fixed-capacity, sorted set of disjoint ranges (no heap: it is needed before the heap).
pub mod heapless_ranges {
    use super::{MAX_RANGES, PhysRange};

    /// Sorted, disjoint ranges.
    #[derive(Clone, Debug)]
    pub struct Ranges {
        items: [PhysRange; MAX_RANGES],
        count: usize,
        /// Pieces lost because the table was full.
        pub dropped: usize,
    }

    impl Default for Ranges {
        fn default() -> Self {
            Self::new()
        }
    }

    impl Ranges {
        /// An empty set.
        pub const fn new() -> Ranges {
            Ranges {
                items: [PhysRange { start: 0, end: 0 }; MAX_RANGES],
                count: 0,
                dropped: 0,
            }
        }

        /// The ranges in ascending order.
        pub fn as_slice(&self) -> &[PhysRange] {
            &self.items[..self.count]
        }

        /// Adds a range, merging with overlapping or adjacent ones.
        pub fn push(&mut self, range: PhysRange) {
            if range.is_empty() {
                return;
            }
            let mut merged = range;
            let mut kept = [PhysRange { start: 0, end: 0 }; MAX_RANGES];
            let mut kept_count = 0;
            for existing in self.as_slice() {
                if existing.end < merged.start || existing.start > merged.end {
                    kept[kept_count] = *existing;
                    kept_count += 1;
                } else {
                    merged.start = merged.start.min(existing.start);
                    merged.end = merged.end.max(existing.end);
                }
            }
            if kept_count == MAX_RANGES {
                self.dropped += 1;
                return;
            }
            kept[kept_count] = merged;
            kept_count += 1;
            kept[..kept_count].sort_unstable_by_key(|range| range.start);
            self.items = kept;
            self.count = kept_count;
        }

        /// Removes `hole` from every range, splitting where needed.
        pub fn remove(&mut self, hole: PhysRange) {
            if hole.is_empty() {
                return;
            }
            let mut result = [PhysRange { start: 0, end: 0 }; MAX_RANGES];
            let mut count = 0;
            let mut keep = |range: PhysRange, dropped: &mut usize| {
                if range.is_empty() {
                    return;
                }
                if count == MAX_RANGES {
                    *dropped += 1;
                    return;
                }
                result[count] = range;
                count += 1;
            };
            let mut dropped = 0;
            for range in self.as_slice() {
                if range.end <= hole.start || range.start >= hole.end {
                    keep(*range, &mut dropped);
                } else {
                    keep(
                        PhysRange {
                            start: range.start,
                            end: hole.start,
                        },
                        &mut dropped,
                    );
                    keep(
                        PhysRange {
                            start: hole.end,
                            end: range.end,
                        },
                        &mut dropped,
                    );
                }
            }
            self.items = result;
            self.count = count;
            self.dropped += dropped;
        }

        /// Total bytes.
        pub fn total(&self) -> u64 {
            self.as_slice().iter().map(PhysRange::len).sum()
        }
    }
}

/// How much of usable RAM goes to the DMA frame pool: a quarter, at least 4 MiB, at most
/// 256 MiB (drivers allocate rings and buffer pools from it; the rest is heap).
pub fn frame_pool_size(total_usable: u64) -> u64 {
    (total_usable / 4)
        .clamp(4 << 20, 256 << 20)
        .min(total_usable / 2)
        / PAGE_SIZE
        * PAGE_SIZE
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(start: u64, len: u64, kind: RegionKind) -> MemoryRegion {
        MemoryRegion { start, len, kind }
    }

    #[test]
    fn usable_ranges_drop_reserved_overlaps_and_exclusions_and_align_to_pages() {
        let regions = [
            region(0, 0x9fc00, RegionKind::Usable),
            region(0x9fc00, 0x400, RegionKind::Reserved),
            region(0x10_0000, 0x1ee_0000, RegionKind::Usable),
            region(0x1fe_0000, 0x2_0000, RegionKind::Reserved),
            region(0x1_0000_0000, 0x4000_0000, RegionKind::Usable),
            // a firmware bug: a reserved entry inside usable RAM
            region(0x50_0800, 0x100, RegionKind::Reserved),
        ];
        let kernel = PhysRange {
            start: 0x10_0000,
            end: 0x18_0123,
        };
        let low = PhysRange {
            start: 0,
            end: 0x10_0000,
        };
        let ranges = usable_ranges(&regions, &[kernel, low]);
        assert_eq!(
            ranges.as_slice(),
            &[
                PhysRange {
                    start: 0x18_1000,
                    end: 0x50_0000
                },
                PhysRange {
                    start: 0x50_1000,
                    end: 0x1fe_0000
                },
                PhysRange {
                    start: 0x1_0000_0000,
                    end: 0x1_4000_0000
                },
            ]
        );
        assert_eq!(ranges.dropped, 0);
    }

    #[test]
    fn ranges_merge_adjacent_pieces() {
        let mut ranges = heapless_ranges::Ranges::new();
        ranges.push(PhysRange {
            start: 0x3000,
            end: 0x4000,
        });
        ranges.push(PhysRange {
            start: 0x1000,
            end: 0x2000,
        });
        ranges.push(PhysRange {
            start: 0x2000,
            end: 0x3000,
        });
        assert_eq!(
            ranges.as_slice(),
            &[PhysRange {
                start: 0x1000,
                end: 0x4000
            }]
        );
        assert_eq!(ranges.total(), 0x3000);
    }

    #[test]
    fn frame_pool_is_a_quarter_within_bounds() {
        assert_eq!(frame_pool_size(32 << 20), 8 << 20);
        assert_eq!(frame_pool_size(8 << 20), 4 << 20);
        assert_eq!(frame_pool_size(4 << 30), 256 << 20);
        assert_eq!(frame_pool_size(6 << 20), 3 << 20, "never more than half");
    }
}
