//! Host-side helpers for tests (feature `fake-host`; no_std, so enabling it never links std
//! into the kernel): guest memory seen by page number, as a host sees it through a GPADL, and a
//! recording event signal.
//!
//! They let a fake host drive the same [`crate::ring`] code in the opposite role over the
//! guest's real ring memory (allocated by `net_device::heap_dma::HeapDmaAllocator`).

use crate::hypervisor::{EventSignal, HvStatus};
use crate::ring::{PAGE_SIZE, RingMemory};
use alloc::sync::Arc;
use alloc::vec::Vec;
use net_device::heap_dma::{phys_load_u32, phys_read, phys_store_u32, phys_write};
use spin::Mutex;

/// Guest memory as a list of 4 KiB page numbers: offset `n` is byte `n % 4096` of page
/// `pfns[n / 4096]`. Every access is checked against live heap-DMA allocations.
#[derive(Clone, Debug)]
pub struct PageListMemory {
    pfns: Vec<u64>,
}

impl PageListMemory {
    /// Memory over `pfns` (as listed in a GPADL).
    pub fn new(pfns: Vec<u64>) -> Self {
        PageListMemory { pfns }
    }

    /// Bytes covered.
    pub fn len(&self) -> usize {
        self.pfns.len() * PAGE_SIZE
    }

    /// True when no pages are listed.
    pub fn is_empty(&self) -> bool {
        self.pfns.is_empty()
    }

    fn address(&self, offset: usize) -> Option<u64> {
        let pfn = *self.pfns.get(offset / PAGE_SIZE)?;
        pfn.checked_mul(PAGE_SIZE as u64)?
            .checked_add((offset % PAGE_SIZE) as u64)
    }

    /// Splits `[offset, offset + len)` at page boundaries: (physical address, start, len).
    fn pieces(&self, offset: usize, len: usize) -> Option<Vec<(u64, usize, usize)>> {
        let end = offset.checked_add(len)?;
        if end > self.len() {
            return None;
        }
        let mut pieces = Vec::new();
        let mut at = offset;
        while at < end {
            let run = (PAGE_SIZE - at % PAGE_SIZE).min(end - at);
            pieces.push((self.address(at)?, at - offset, run));
            at += run;
        }
        Some(pieces)
    }
}

impl RingMemory for PageListMemory {
    fn load_u32(&self, offset: usize) -> Option<u32> {
        phys_load_u32(self.address(offset)?)
    }

    fn store_u32(&mut self, offset: usize, value: u32) -> bool {
        self.address(offset)
            .is_some_and(|address| phys_store_u32(address, value))
    }

    fn read(&self, offset: usize, buffer: &mut [u8]) -> bool {
        let Some(pieces) = self.pieces(offset, buffer.len()) else {
            return false;
        };
        pieces
            .into_iter()
            .all(|(address, start, len)| phys_read(address, &mut buffer[start..start + len]))
    }

    fn write(&mut self, offset: usize, data: &[u8]) -> bool {
        let Some(pieces) = self.pieces(offset, data.len()) else {
            return false;
        };
        pieces
            .into_iter()
            .all(|(address, start, len)| phys_write(address, &data[start..start + len]))
    }
}

/// An [`EventSignal`] that records the connection ids it was asked to signal.
#[derive(Clone, Debug, Default)]
pub struct RecordingSignal {
    signals: Arc<Mutex<Vec<u32>>>,
    /// When set, every signal fails with this status.
    failure: Arc<Mutex<Option<HvStatus>>>,
}

impl RecordingSignal {
    /// A signal that succeeds and records.
    pub fn new() -> Self {
        Self::default()
    }

    /// Connection ids signalled so far, in order; clears the record.
    pub fn take(&self) -> Vec<u32> {
        core::mem::take(&mut *self.signals.lock())
    }

    /// Makes every later signal fail with `status` (or succeed again with `None`).
    pub fn fail_with(&self, status: Option<HvStatus>) {
        *self.failure.lock() = status;
    }
}

impl EventSignal for RecordingSignal {
    fn signal_event(&self, connection_id: u32) -> Result<(), HvStatus> {
        if let Some(status) = *self.failure.lock() {
            return Err(status);
        }
        self.signals.lock().push(connection_id);
        Ok(())
    }
}
