//! Memory copies tuned for QEMU TCG, behind the kernel's `memcpy` (disjoint) and `memmove`.

use core::arch::asm;

/// Assembly that moves the 64 bytes at `rsi` to `rdi` in 8-byte moves through the scratch
/// registers `{a}`..`{d}` (the loop body of both copies).
macro_rules! move_64_bytes {
    () => {
        concat!(
            "mov {a}, [rsi]\n",
            "mov {b}, [rsi + 8]\n",
            "mov {c}, [rsi + 16]\n",
            "mov {d}, [rsi + 24]\n",
            "mov [rdi], {a}\n",
            "mov [rdi + 8], {b}\n",
            "mov [rdi + 16], {c}\n",
            "mov [rdi + 24], {d}\n",
            "mov {a}, [rsi + 32]\n",
            "mov {b}, [rsi + 40]\n",
            "mov {c}, [rsi + 48]\n",
            "mov {d}, [rsi + 56]\n",
            "mov [rdi + 32], {a}\n",
            "mov [rdi + 40], {b}\n",
            "mov [rdi + 48], {c}\n",
            "mov [rdi + 56], {d}",
        )
    };
}

/// Copies `len` bytes from `source` to `destination`, lowest address first.
///
/// Under QEMU TCG a `rep` string instruction costs a translated-block exit and lookup per
/// iteration whatever its width: `rep movsb` alone was the hottest guest code of a bulk
/// transfer, and `rep movsq` still took a quarter of the vCPU thread's time receiving TCP
/// (`perf` on QEMU with `-perfmap`). So 64-byte blocks go through an unrolled loop of 8-byte
/// moves (one translated block, chained to itself; plain loads and stores take TCG's inline
/// fast path, unaligned 16-byte SSE moves measured slower), the rest 8 bytes per `rep movsq`
/// step and the tail bytewise.
///
/// # Safety
/// `source` must be valid for reads and `destination` for writes of `len` bytes, and the two
/// regions must not overlap unless `destination` is below `source` (a forward copy never reads
/// a byte it already overwrote then).
pub unsafe fn copy_forward(destination: *mut u8, source: *const u8, len: usize) {
    let blocks = len / 64;
    let rest = len % 64;
    // SAFETY: the caller guarantees the regions; the loop moves exactly `blocks * 64` bytes
    // forwards, 8 at a time, then the string moves copy `rest` bytes forwards with DF clear
    // (the ABI's state).
    unsafe {
        asm!("test {blocks}, {blocks}",
             "jz 3f",
             "2:",
             move_64_bytes!(),
             "add rsi, 64",
             "add rdi, 64",
             "dec {blocks}",
             "jnz 2b",
             "3:",
             "mov rcx, {rest}",
             "shr rcx, 3",
             "rep movsq",
             "mov rcx, {rest}",
             "and rcx, 7",
             "rep movsb",
             blocks = inout(reg) blocks => _, rest = in(reg) rest,
             a = out(reg) _, b = out(reg) _, c = out(reg) _, d = out(reg) _,
             out("rcx") _, inout("rdi") destination => _, inout("rsi") source => _,
             options(nostack));
    }
}

/// Copies `len` bytes between regions that do not overlap.
///
/// As [`copy_forward`], without `rep` steps: a length of 64 or more that is not a multiple of
/// 64 ends with one more 64-byte block over the last 64 bytes (rewriting some bytes the loop
/// already copied, with the same values), a shorter one is two overlapping moves of the
/// largest width that fits. A received segment's 1448-byte payload otherwise ends in five
/// `rep movsq` steps and an empty `rep movsb`, each a translated-block exit under TCG.
///
/// # Safety
/// `source` must be valid for reads and `destination` for writes of `len` bytes, and the two
/// regions must not overlap.
#[inline(always)]
pub unsafe fn copy_disjoint(destination: *mut u8, source: *const u8, len: usize) {
    if len < 64 {
        // SAFETY: the caller's contract.
        unsafe { copy_short(destination, source, len) };
        return;
    }
    let blocks = len / 64;
    let rest = len % 64;
    // SAFETY: the caller guarantees the regions; the loop moves `blocks * 64` bytes forwards,
    // then (if `rest` is not 0) the 64 bytes ending at `len`, which lie inside both regions
    // because `len` ≥ 64; the regions do not overlap, so rewritten bytes get their own values.
    unsafe {
        asm!("2:",
             move_64_bytes!(),
             "add rsi, 64",
             "add rdi, 64",
             "dec {blocks}",
             "jnz 2b",
             "test {rest}, {rest}",
             "jz 3f",
             "lea rsi, [rsi + {rest} - 64]",
             "lea rdi, [rdi + {rest} - 64]",
             move_64_bytes!(),
             "3:",
             blocks = inout(reg) blocks => _, rest = in(reg) rest,
             a = out(reg) _, b = out(reg) _, c = out(reg) _, d = out(reg) _,
             inout("rdi") destination => _, inout("rsi") source => _,
             options(nostack));
    }
}

/// [`copy_disjoint`] below 64 bytes: the first and the last `width` bytes, where `width` is
/// the largest of 32, 16, 8, 4, 2 and 1 that is at most `len` (the two ranges overlap or
/// meet, so together they cover `len`), in 8-byte general-register moves where they fit
/// (the compiler's own choice, SSE moves through the stack, costs more under TCG).
///
/// # Safety
/// As [`copy_disjoint`], with `len` < 64.
#[inline(always)]
unsafe fn copy_short(destination: *mut u8, source: *const u8, len: usize) {
    // SAFETY: in every arm `width` ≤ `len`, so both `width`-byte ranges, at 0 and at
    // `len - width`, lie inside both regions; unaligned accesses are allowed.
    unsafe {
        match len {
            32.. => {
                move_words::<4>(destination, source);
                move_words::<4>(destination.add(len - 32), source.add(len - 32));
            }
            16.. => {
                move_words::<2>(destination, source);
                move_words::<2>(destination.add(len - 16), source.add(len - 16));
            }
            8.. => {
                move_words::<1>(destination, source);
                move_words::<1>(destination.add(len - 8), source.add(len - 8));
            }
            4.. => {
                let first = source.cast::<u32>().read_unaligned();
                let last = source.add(len - 4).cast::<u32>().read_unaligned();
                destination.cast::<u32>().write_unaligned(first);
                destination.add(len - 4).cast::<u32>().write_unaligned(last);
            }
            2.. => {
                let first = source.cast::<u16>().read_unaligned();
                let last = source.add(len - 2).cast::<u16>().read_unaligned();
                destination.cast::<u16>().write_unaligned(first);
                destination.add(len - 2).cast::<u16>().write_unaligned(last);
            }
            1 => destination.write(source.read()),
            0 => {}
        }
    }
}

/// Moves `WORDS` (1, 2 or 4) 8-byte words, all loads first.
///
/// # Safety
/// `source` valid for reads and `destination` for writes of `WORDS * 8` bytes.
#[inline(always)]
unsafe fn move_words<const WORDS: usize>(destination: *mut u8, source: *const u8) {
    // SAFETY: the caller guarantees both ranges; the moves touch exactly `WORDS * 8` bytes.
    unsafe {
        match WORDS {
            4 => asm!("mov {a}, [{source}]",
                      "mov {b}, [{source} + 8]",
                      "mov {c}, [{source} + 16]",
                      "mov {d}, [{source} + 24]",
                      "mov [{destination}], {a}",
                      "mov [{destination} + 8], {b}",
                      "mov [{destination} + 16], {c}",
                      "mov [{destination} + 24], {d}",
                      source = in(reg) source, destination = in(reg) destination,
                      a = out(reg) _, b = out(reg) _, c = out(reg) _, d = out(reg) _,
                      options(nostack, preserves_flags)),
            2 => asm!("mov {a}, [{source}]",
                      "mov {b}, [{source} + 8]",
                      "mov [{destination}], {a}",
                      "mov [{destination} + 8], {b}",
                      source = in(reg) source, destination = in(reg) destination,
                      a = out(reg) _, b = out(reg) _,
                      options(nostack, preserves_flags)),
            _ => asm!("mov {a}, [{source}]",
                      "mov [{destination}], {a}",
                      source = in(reg) source, destination = in(reg) destination,
                      a = out(reg) _,
                      options(nostack, preserves_flags)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{copy_disjoint, copy_forward};

    /// Runs `copy` for every length below 300 between every pair of a few alignments into a
    /// separate buffer, and checks the copied bytes and that nothing around them changed.
    fn copies_exactly_and_nothing_else(copy: unsafe fn(*mut u8, *const u8, usize)) {
        let source: alloc::vec::Vec<u8> = (0..400u32).map(|i| (i * 7 + 3) as u8).collect();
        for len in 0..300 {
            for source_offset in 0..17 {
                for destination_offset in [0, 1, 7, 8, 15, 16, 33] {
                    let mut destination = alloc::vec![0xa5u8; 400];
                    // SAFETY: both ranges lie inside their own vectors.
                    unsafe {
                        copy(
                            destination.as_mut_ptr().add(destination_offset),
                            source.as_ptr().add(source_offset),
                            len,
                        );
                    }
                    let copied = destination_offset..destination_offset + len;
                    assert_eq!(
                        destination[copied.clone()],
                        source[source_offset..source_offset + len]
                    );
                    assert!(destination[..copied.start].iter().all(|&byte| byte == 0xa5));
                    assert!(destination[copied.end..].iter().all(|&byte| byte == 0xa5));
                }
            }
        }
    }

    #[test]
    fn copies_every_length_and_alignment_exactly_and_nothing_else() {
        copies_exactly_and_nothing_else(copy_forward);
    }

    #[test]
    fn a_forward_copy_to_a_lower_overlapping_address_is_exact() {
        let mut buffer: alloc::vec::Vec<u8> = (0..=255u8).cycle().take(500).collect();
        let expected = buffer[10..410].to_vec();
        // SAFETY: both ranges lie inside `buffer`; the destination is below the source.
        unsafe { copy_forward(buffer.as_mut_ptr(), buffer.as_ptr().add(10), 400) };
        assert_eq!(buffer[..400], expected[..]);
    }

    #[test]
    fn a_disjoint_copy_of_every_length_and_alignment_is_exact_and_nothing_else() {
        copies_exactly_and_nothing_else(copy_disjoint);
    }
}
