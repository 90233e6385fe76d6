//! The kernel's `vmbus::HypervisorPort`: the VMBus client's posts, signals, messages and channel
//! events, carried by the SynIC layer ([`super::synic`]), with the kernel's clock for its waits.

use alloc::sync::Arc;

use vmbus::protocol::{HV_MESSAGE_TYPE_VMBUS, MAX_MESSAGE_SIZE};
use vmbus::{ChannelEvents, EventSignal, HvStatus, HypervisorPort};

use super::abi;
use super::synic::Synic;
use crate::time;

/// How long one `idle` call of a waiting client may sleep before it checks again (a SINT
/// interrupt ends the sleep sooner).
const IDLE_SLICE_NS: u64 = 200_000;

fn status(status: abi::HvStatus) -> HvStatus {
    HvStatus(status.0)
}

/// The VMBus client's view of the hypervisor on the boot CPU.
#[derive(Clone, Copy)]
pub struct KernelPort {
    synic: &'static Synic,
}

impl KernelPort {
    /// A port over the enabled SynIC.
    pub fn new(synic: &'static Synic) -> Self {
        KernelPort { synic }
    }

    /// The SynIC underneath (for its counters).
    pub fn synic(&self) -> &'static Synic {
        self.synic
    }
}

/// Signals channels through HvSignalEvent, for open channels (event flag 0, as mu_msvm and
/// Linux do for Win8+ hosts).
struct KernelSignal {
    synic: &'static Synic,
}

impl EventSignal for KernelSignal {
    fn signal_event(&self, connection_id: u32) -> Result<(), HvStatus> {
        self.synic.signal_event(connection_id, 0).map_err(status)
    }
}

impl HypervisorPort for KernelPort {
    fn post_message(&mut self, connection_id: u32, payload: &[u8]) -> Result<(), HvStatus> {
        self.synic
            .try_post_message(connection_id, HV_MESSAGE_TYPE_VMBUS, payload)
            .map_err(status)
    }

    fn signal_event(&self, connection_id: u32) -> Result<(), HvStatus> {
        self.synic.signal_event(connection_id, 0).map_err(status)
    }

    fn event_signal(&self) -> Arc<dyn EventSignal> {
        Arc::new(KernelSignal { synic: self.synic })
    }

    fn poll_message(&mut self, buffer: &mut [u8; MAX_MESSAGE_SIZE]) -> Option<usize> {
        let message = self.synic.poll_message()?;
        let payload = message.payload();
        let len = payload.len().min(MAX_MESSAGE_SIZE);
        buffer[..len].copy_from_slice(&payload[..len]);
        Some(len)
    }

    fn take_channel_events(&mut self, events: &mut ChannelEvents) {
        self.synic
            .take_event_words(|index, bits| events.insert_word(index, bits));
    }

    fn vp_index(&self) -> u32 {
        self.synic.vp_index()
    }

    fn now_ns(&self) -> u64 {
        time::now_ns()
    }

    fn idle(&mut self) {
        time::wait_for_event(Some(time::now_ns().saturating_add(IDLE_SLICE_NS)));
    }
}
