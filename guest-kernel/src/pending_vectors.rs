//! Per-vector "fired" flags for interrupt owners that poll instead of doing work in the handler.

use core::sync::atomic::{AtomicU64, Ordering};

/// Vectors that fired and whose owner has not looked yet.
static PENDING_VECTORS: [AtomicU64; 4] = [
    AtomicU64::new(0),
    AtomicU64::new(0),
    AtomicU64::new(0),
    AtomicU64::new(0),
];

/// An interrupt handler that only notes that `vector` fired (the interrupt itself already
/// woke the event loop); its owner looks with [`take_pending`].
pub fn note_pending(vector: u8) {
    PENDING_VECTORS[usize::from(vector / 64)].fetch_or(1 << (vector % 64), Ordering::Release);
}

/// Takes the flag [`note_pending`] set for `vector`: true once per firing (or burst).
pub fn take_pending(vector: u8) -> bool {
    let bit = 1u64 << (vector % 64);
    PENDING_VECTORS[usize::from(vector / 64)].fetch_and(!bit, Ordering::AcqRel) & bit != 0
}
