//! Address-space allocation for BARs and bridge windows: first fit inside a bus's windows,
//! aligned, in the caller's order of preference (below 4 GiB first).

use super::bar::{AddressRange, BarKind};
use alloc::vec::Vec;

/// Which kind of bridge window a range came from.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum WindowKind {
    /// I/O ports.
    Io,
    /// Non-prefetchable memory.
    Memory,
    /// Prefetchable memory.
    Prefetchable,
}

/// One address window a bus forwards.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Window {
    /// What the window decodes.
    pub kind: WindowKind,
    /// The addresses it covers.
    pub range: AddressRange,
}

/// Where an allocation may go: a window kind, optionally limited to addresses below 4 GiB.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Placement {
    /// Window kind to allocate from.
    pub kind: WindowKind,
    /// Only use addresses whose whole range lies below 4 GiB.
    pub below_4g: bool,
}

const FOUR_GIB_LAST: u64 = 0xffff_ffff;

impl Placement {
    /// The placements a BAR may use, best first.
    ///
    /// Non-prefetchable memory must sit in the (32-bit) memory window. Prefetchable BARs go to
    /// the prefetchable window, else the memory window; 64-bit prefetchable BARs go above
    /// 4 GiB only as a last resort, because QEMU 10.0.2 loses the upper dword of igb VF BARs.
    pub fn for_bar(kind: BarKind, prefetchable: bool) -> &'static [Placement] {
        const IO: &[Placement] = &[Placement {
            kind: WindowKind::Io,
            below_4g: true,
        }];
        const MEMORY: &[Placement] = &[Placement {
            kind: WindowKind::Memory,
            below_4g: true,
        }];
        const PREFETCHABLE_32: &[Placement] = &[
            Placement {
                kind: WindowKind::Prefetchable,
                below_4g: true,
            },
            Placement {
                kind: WindowKind::Memory,
                below_4g: true,
            },
        ];
        const PREFETCHABLE_64: &[Placement] = &[
            Placement {
                kind: WindowKind::Prefetchable,
                below_4g: true,
            },
            Placement {
                kind: WindowKind::Memory,
                below_4g: true,
            },
            Placement {
                kind: WindowKind::Prefetchable,
                below_4g: false,
            },
        ];
        match (kind, prefetchable) {
            (BarKind::Io, _) => IO,
            (_, false) => MEMORY,
            (BarKind::Memory32, true) => PREFETCHABLE_32,
            (BarKind::Memory64, true) => PREFETCHABLE_64,
        }
    }
}

/// Free space of one bus, carved up by allocations and reservations.
#[derive(Clone, Debug, Default)]
pub struct BarAllocator {
    /// Free ranges, sorted by start address within each kind.
    free: Vec<Window>,
}

impl BarAllocator {
    /// An allocator whose free space is exactly `windows` (overlapping windows are fine).
    pub fn new(windows: &[Window]) -> Self {
        let mut free: Vec<Window> = windows.to_vec();
        free.sort_by_key(|w| w.range.start);
        BarAllocator { free }
    }

    /// Removes `range` from the free space of every kind (something already decodes there).
    pub fn reserve(&mut self, range: AddressRange) {
        let mut remaining = Vec::with_capacity(self.free.len() + 1);
        for window in self.free.drain(..) {
            if !window.range.overlaps(&range) {
                remaining.push(window);
                continue;
            }
            if window.range.start < range.start {
                let end = range.start - 1;
                remaining.push(Window {
                    kind: window.kind,
                    range: AddressRange {
                        start: window.range.start,
                        end,
                    },
                });
            }
            if window.range.end > range.end {
                let start = range.end + 1;
                remaining.push(Window {
                    kind: window.kind,
                    range: AddressRange {
                        start,
                        end: window.range.end,
                    },
                });
            }
        }
        remaining.sort_by_key(|w| w.range.start);
        self.free = remaining;
    }

    /// Allocates `size` bytes aligned to `align` (a power of two) at the lowest free address
    /// of the first placement that has room. Returns the start address.
    pub fn allocate(&mut self, size: u64, align: u64, placements: &[Placement]) -> Option<u64> {
        if size == 0 || !align.is_power_of_two() {
            return None;
        }
        for placement in placements {
            let limit = if placement.below_4g {
                FOUR_GIB_LAST
            } else {
                u64::MAX
            };
            let found = self
                .free
                .iter()
                .filter(|w| w.kind == placement.kind)
                .find_map(|w| {
                    let start = w.range.start.checked_next_multiple_of(align)?;
                    let range = AddressRange::from_start_size(start, size)?;
                    (range.end <= w.range.end.min(limit)).then_some(range)
                });
            if let Some(range) = found {
                // Allocations are exclusive across kinds too: windows of different kinds may
                // overlap (the root bus offers one range as both memory and prefetchable).
                self.reserve(range);
                return Some(range.start);
            }
        }
        None
    }

    /// Total free bytes of `kind` (for logs and tests).
    pub fn free_bytes(&self, kind: WindowKind) -> u64 {
        self.free
            .iter()
            .filter(|w| w.kind == kind)
            .map(|w| w.range.size())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(start: u64, end: u64) -> AddressRange {
        AddressRange { start, end }
    }

    fn memory(start: u64, end: u64) -> Window {
        Window {
            kind: WindowKind::Memory,
            range: range(start, end),
        }
    }

    fn prefetchable(start: u64, end: u64) -> Window {
        Window {
            kind: WindowKind::Prefetchable,
            range: range(start, end),
        }
    }

    const MEMORY_ONLY: &[Placement] = &[Placement {
        kind: WindowKind::Memory,
        below_4g: true,
    }];

    #[test]
    fn allocations_are_aligned_to_their_size_and_do_not_overlap() {
        let mut allocator = BarAllocator::new(&[memory(0xfe00_1000, 0xfe3f_ffff)]);
        let small = allocator.allocate(0x1000, 0x1000, MEMORY_ONLY).unwrap();
        let big = allocator.allocate(0x20000, 0x20000, MEMORY_ONLY).unwrap();
        let next = allocator.allocate(0x1000, 0x1000, MEMORY_ONLY).unwrap();
        assert_eq!(small, 0xfe00_1000);
        assert_eq!(big, 0xfe02_0000, "rounded up to a 128 KiB boundary");
        assert_eq!(next, 0xfe00_2000, "the gap before the big BAR is reused");
        assert_eq!(
            allocator.free_bytes(WindowKind::Memory),
            0x40_0000 - 0x1000 - 0x22000
        );
    }

    #[test]
    fn exhaustion_returns_none() {
        let mut allocator = BarAllocator::new(&[memory(0xfe00_0000, 0xfe0f_ffff)]);
        assert_eq!(
            allocator.allocate(0x10_0000, 0x10_0000, MEMORY_ONLY),
            Some(0xfe00_0000)
        );
        assert_eq!(allocator.allocate(0x1000, 0x1000, MEMORY_ONLY), None);
        let mut tiny = BarAllocator::new(&[memory(0xfe00_0000, 0xfe00_0fff)]);
        assert_eq!(tiny.allocate(0x2000, 0x2000, MEMORY_ONLY), None);
    }

    #[test]
    fn reservations_split_free_space() {
        let mut allocator = BarAllocator::new(&[memory(0x1000_0000, 0x1fff_ffff)]);
        allocator.reserve(range(0x1000_0000, 0x17ff_ffff));
        assert_eq!(
            allocator.allocate(0x100_0000, 0x100_0000, MEMORY_ONLY),
            Some(0x1800_0000)
        );
        allocator.reserve(range(0x1a00_0000, 0x1a00_0fff));
        assert_eq!(
            allocator.allocate(0x200_0000, 0x200_0000, MEMORY_ONLY),
            Some(0x1c00_0000)
        );
        assert_eq!(
            allocator.allocate(0x1000, 0x1000, MEMORY_ONLY),
            Some(0x1900_0000)
        );
    }

    #[test]
    fn prefetchable_64bit_prefers_below_4g_then_memory_then_high() {
        let placements = Placement::for_bar(BarKind::Memory64, true);
        let mut allocator = BarAllocator::new(&[
            memory(0xfe00_0000, 0xfe00_ffff),
            prefetchable(0xfff0_0000, 0x1_000f_ffff),
        ]);
        // Fits below 4 GiB in the prefetchable window.
        assert_eq!(
            allocator.allocate(0x8_0000, 0x8_0000, placements),
            Some(0xfff0_0000)
        );
        // The rest of the prefetchable space below 4 GiB is too small: use the memory window.
        assert_eq!(
            allocator.allocate(0x1_0000, 0x1_0000, placements),
            Some(0xfff8_0000)
        );
        assert_eq!(
            allocator.allocate(0x8_0000, 0x8_0000, placements),
            Some(0x1_0000_0000)
        );
        // Non-prefetchable BARs never go to the prefetchable window.
        let strict = Placement::for_bar(BarKind::Memory64, false);
        assert_eq!(
            allocator.allocate(0x1_0000, 0x1_0000, strict),
            Some(0xfe00_0000)
        );
        assert_eq!(allocator.allocate(0x1000, 0x1000, strict), None);
    }

    #[test]
    fn below_4g_limit_rejects_ranges_crossing_the_boundary() {
        let mut allocator = BarAllocator::new(&[prefetchable(0xffff_f000, 0x1_0000_ffff)]);
        let low_only = &[Placement {
            kind: WindowKind::Prefetchable,
            below_4g: true,
        }];
        assert_eq!(allocator.allocate(0x2000, 0x1000, low_only), None);
        assert_eq!(
            allocator.allocate(0x1000, 0x1000, low_only),
            Some(0xffff_f000)
        );
    }

    #[test]
    fn top_of_address_space_does_not_overflow() {
        let mut allocator = BarAllocator::new(&[prefetchable(u64::MAX - 0xfff, u64::MAX)]);
        let anywhere = &[Placement {
            kind: WindowKind::Prefetchable,
            below_4g: false,
        }];
        assert_eq!(allocator.allocate(0x2000, 0x1000, anywhere), None);
        assert_eq!(allocator.allocate(0x1000, 1 << 63, anywhere), None);
        assert_eq!(
            allocator.allocate(0x1000, 0x1000, anywhere),
            Some(u64::MAX - 0xfff)
        );
        assert_eq!(allocator.allocate(1, 1, anywhere), None);
    }

    #[test]
    fn rejects_bad_alignment_and_zero_size() {
        let mut allocator = BarAllocator::new(&[memory(0x1000, 0xffff)]);
        assert_eq!(allocator.allocate(0x1000, 0x3000, MEMORY_ONLY), None);
        assert_eq!(allocator.allocate(0, 0x1000, MEMORY_ONLY), None);
    }

    #[test]
    fn overlapping_kinds_never_hand_out_the_same_bytes() {
        let mut allocator = BarAllocator::new(&[
            memory(0xc000_0000, 0xc0ff_ffff),
            prefetchable(0xc000_0000, 0xc0ff_ffff),
        ]);
        let a = allocator
            .allocate(0x10_0000, 0x10_0000, MEMORY_ONLY)
            .unwrap();
        let b = allocator
            .allocate(
                0x10_0000,
                0x10_0000,
                &[Placement {
                    kind: WindowKind::Prefetchable,
                    below_4g: true,
                }],
            )
            .unwrap();
        assert_ne!(a, b);
    }
}
