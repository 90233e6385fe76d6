//! The seam to the hypervisor: what the client needs from SynIC and hypercalls.
//!
//! The kernel implements [`HypervisorPort`] over HvPostMessage/HvSignalEvent and the SIMP/SIEFP
//! pages of SINT 2; host tests implement it over a fake host or OpenVMM's `vmbus_server`.

use crate::protocol::MAX_MESSAGE_SIZE;
use alloc::sync::Arc;

/// A hypercall result status (`HV_STATUS`, fact sheet §1.3).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct HvStatus(pub u16);

impl HvStatus {
    /// HV_STATUS_INVALID_HYPERCALL_CODE.
    pub const INVALID_HYPERCALL_CODE: HvStatus = HvStatus(0x0002);
    /// HV_STATUS_INVALID_PARAMETER.
    pub const INVALID_PARAMETER: HvStatus = HvStatus(0x0005);
    /// HV_STATUS_ACCESS_DENIED.
    pub const ACCESS_DENIED: HvStatus = HvStatus(0x0006);
    /// HV_STATUS_INSUFFICIENT_MEMORY: transient, retry.
    pub const INSUFFICIENT_MEMORY: HvStatus = HvStatus(0x000b);
    /// HV_STATUS_INVALID_CONNECTION_ID: no such port (for INITIATE_CONTACT: an old host).
    pub const INVALID_CONNECTION_ID: HvStatus = HvStatus(0x0012);
    /// HV_STATUS_INSUFFICIENT_BUFFERS: the host's queue is full, retry.
    pub const INSUFFICIENT_BUFFERS: HvStatus = HvStatus(0x0013);

    /// True for statuses worth retrying after a pause (the host is momentarily out of buffers).
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            HvStatus::INSUFFICIENT_BUFFERS | HvStatus::INSUFFICIENT_MEMORY
        )
    }
}

impl core::fmt::Display for HvStatus {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "HV_STATUS {:#06x}", self.0)
    }
}

/// Signals a channel's host side (HvSignalEvent). Cheap to clone behind an `Arc`, so an open
/// [`crate::Channel`] can signal without the client object.
pub trait EventSignal: Send + Sync {
    /// Signals `connection_id` (the offer's connection id), event flag 0.
    fn signal_event(&self, connection_id: u32) -> Result<(), HvStatus>;
}

/// Relids whose SIEFP event flag (SINT 2) was set: a 2048-bit set, bit n = relid n.
#[derive(Clone, PartialEq, Eq)]
pub struct ChannelEvents {
    words: [u64; Self::WORDS],
}

impl Default for ChannelEvents {
    fn default() -> Self {
        ChannelEvents {
            words: [0; Self::WORDS],
        }
    }
}

impl ChannelEvents {
    /// Flags per SINT in the SIEFP page (256 bytes).
    pub const CAPACITY: usize = 2048;
    const WORDS: usize = Self::CAPACITY / 64;

    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Marks `relid` (ignored when ≥ [`Self::CAPACITY`]).
    pub fn insert(&mut self, relid: u32) {
        if let Some(word) = self.words.get_mut(relid as usize / 64) {
            *word |= 1 << (relid % 64);
        }
    }

    /// ORs a raw 64-bit word of the SIEFP flag array into the set (index = word number).
    pub fn insert_word(&mut self, index: usize, bits: u64) {
        if let Some(word) = self.words.get_mut(index) {
            *word |= bits;
        }
    }

    /// True when `relid` is marked.
    pub fn contains(&self, relid: u32) -> bool {
        self.words
            .get(relid as usize / 64)
            .is_some_and(|word| word & (1 << (relid % 64)) != 0)
    }

    /// Unmarks `relid` and says whether it was marked.
    pub fn take(&mut self, relid: u32) -> bool {
        let was = self.contains(relid);
        if let Some(word) = self.words.get_mut(relid as usize / 64) {
            *word &= !(1 << (relid % 64));
        }
        was
    }

    /// True when nothing is marked.
    pub fn is_empty(&self) -> bool {
        self.words.iter().all(|&word| word == 0)
    }

    /// The marked relids, ascending.
    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        self.words.iter().enumerate().flat_map(|(index, &word)| {
            (0..64u32)
                .filter(move |bit| word & (1 << bit) != 0)
                .map(move |bit| index as u32 * 64 + bit)
        })
    }
}

impl core::fmt::Debug for ChannelEvents {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_set().entries(self.iter()).finish()
    }
}

/// Everything the VMBus client needs from the hypervisor.
///
/// All methods are non-blocking: waits are built by the client from [`HypervisorPort::now_ns`]
/// and [`HypervisorPort::idle`], and are always bounded.
pub trait HypervisorPort {
    /// Posts a VMBus message (HvPostMessage, message type 1) of at most 240 bytes to
    /// `connection_id`. A retryable status ([`HvStatus::is_retryable`]) means "try again".
    fn post_message(&mut self, connection_id: u32, payload: &[u8]) -> Result<(), HvStatus>;

    /// Signals a channel (HvSignalEvent).
    fn signal_event(&self, connection_id: u32) -> Result<(), HvStatus>;

    /// A handle that signals like [`HypervisorPort::signal_event`] without borrowing the port,
    /// for open channels.
    fn event_signal(&self) -> Arc<dyn EventSignal>;

    /// Takes the next VMBus message delivered in the SINT 2 slot: copies its payload into
    /// `buffer`, frees the slot (and EOMs if another message is pending) and returns the
    /// payload length (capped at 240). `None` when no message is waiting.
    fn poll_message(&mut self, buffer: &mut [u8; MAX_MESSAGE_SIZE]) -> Option<usize>;

    /// Moves the channel event flags set for SINT 2 into `events` (test-and-clear).
    fn take_channel_events(&mut self, events: &mut ChannelEvents);

    /// This VP's index (VP_INDEX MSR), the target for messages and channel interrupts.
    fn vp_index(&self) -> u32;

    /// A monotonic clock in nanoseconds, for bounded waits.
    fn now_ns(&self) -> u64;

    /// Called while waiting for the host: pause, relax or (in tests) let the host run.
    fn idle(&mut self);
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec::Vec;

    #[test]
    fn channel_events_track_relids_and_ignore_out_of_range() {
        let mut events = ChannelEvents::new();
        events.insert(1);
        events.insert(64);
        events.insert(2047);
        events.insert(2048);
        events.insert_word(1, 1 << 3);
        assert_eq!(events.iter().collect::<Vec<_>>(), [1, 64, 67, 2047]);
        assert!(events.take(64));
        assert!(!events.take(64));
        assert!(!events.contains(2048));
        assert!(HvStatus::INSUFFICIENT_BUFFERS.is_retryable());
        assert!(!HvStatus::INVALID_CONNECTION_ID.is_retryable());
    }
}
