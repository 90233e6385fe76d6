//! Forward memory copy tuned for QEMU TCG, behind the kernel's `memcpy`/`memmove`.

use core::arch::asm;

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
             "mov {a}, [rsi]",
             "mov {b}, [rsi + 8]",
             "mov {c}, [rsi + 16]",
             "mov {d}, [rsi + 24]",
             "mov [rdi], {a}",
             "mov [rdi + 8], {b}",
             "mov [rdi + 16], {c}",
             "mov [rdi + 24], {d}",
             "mov {a}, [rsi + 32]",
             "mov {b}, [rsi + 40]",
             "mov {c}, [rsi + 48]",
             "mov {d}, [rsi + 56]",
             "mov [rdi + 32], {a}",
             "mov [rdi + 40], {b}",
             "mov [rdi + 48], {c}",
             "mov [rdi + 56], {d}",
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

#[cfg(test)]
mod tests {
    use super::copy_forward;

    #[test]
    fn copies_every_length_and_alignment_exactly_and_nothing_else() {
        let source: alloc::vec::Vec<u8> = (0..400u32).map(|i| (i * 7 + 3) as u8).collect();
        for len in 0..300 {
            for source_offset in 0..17 {
                for destination_offset in [0, 1, 7, 8, 15, 16, 33] {
                    let mut destination = alloc::vec![0xa5u8; 400];
                    // SAFETY: both ranges lie inside their own vectors.
                    unsafe {
                        copy_forward(
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
    fn a_forward_copy_to_a_lower_overlapping_address_is_exact() {
        let mut buffer: alloc::vec::Vec<u8> = (0..=255u8).cycle().take(500).collect();
        let expected = buffer[10..410].to_vec();
        // SAFETY: both ranges lie inside `buffer`; the destination is below the source.
        unsafe { copy_forward(buffer.as_mut_ptr(), buffer.as_ptr().add(10), 400) };
        assert_eq!(buffer[..400], expected[..]);
    }
}
