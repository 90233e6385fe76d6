//! Hyper-V VF association and data-path switch state of one netvsc NIC
//! (`hyperv-vmbus-netvsc.md` §3.7, `failover-lessons.md` §2.2, §2.6).
//!
//! The host announces a VF with SEND_VF_ASSOCIATION `{allocated, serial}`. The guest asks for
//! the data path with SWITCH_DATA_PATH sent with a completion requested; transmit moves to the
//! VF only once that completion arrived (Linux since 5.12). Moving back is immediate on the
//! guest side (the VF is no longer used from the moment it is asked, as Linux clears
//! `data_path_is_vf` before sending), and is also forced by the host: `allocated = 0` or a
//! host-sent SWITCH_DATA_PATH(synthetic). A completion of a request that a newer request or a
//! host move overtook is stale and ignored (an eject during an in-flight switch).

use alloc::collections::VecDeque;

use net_device::HostPath;

use super::device::VfAssociation;

/// Why the data path went back to synthetic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyntheticCause {
    /// The guest asked (VF ejected, lost or not wanted) and the host confirmed.
    Requested,
    /// The host switched on its own (SWITCH_DATA_PATH from the host).
    HostSwitched,
    /// The host withdrew the VF (association with `allocated = 0`).
    Withdrawn,
}

/// A change of association or data path, for the owner's logs and decisions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VfEvent {
    /// A VF with this serial number is allocated to the NIC.
    Associated {
        /// The vPCI serial number to pair with.
        serial_number: u32,
    },
    /// The VF is no longer allocated.
    Withdrawn {
        /// Its serial number.
        serial_number: u32,
    },
    /// The host confirmed the switch to the VF.
    DataPathVf,
    /// The data path is synthetic again.
    DataPathSynthetic(SyntheticCause),
}

/// Counters (monotonic).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DataPathCounters {
    /// SWITCH_DATA_PATH requests sent.
    pub switch_requests: u64,
    /// Their completions that counted.
    pub switch_completions: u64,
    /// Completions of requests already overtaken (ignored).
    pub stale_completions: u64,
    /// Times the host moved the path back on its own or by withdrawing the VF.
    pub host_reverts: u64,
}

/// Most events kept for the owner; older ones are dropped first.
const MAX_EVENTS: usize = 32;

/// The state machine.
#[derive(Debug)]
pub struct DataPathState {
    association: Option<VfAssociation>,
    path: HostPath,
    /// Sequence number of the request whose completion is awaited.
    pending: Option<u64>,
    next_sequence: u64,
    events: VecDeque<VfEvent>,
    counters: DataPathCounters,
}

impl Default for DataPathState {
    fn default() -> Self {
        DataPathState {
            association: None,
            path: HostPath::Synthetic,
            pending: None,
            next_sequence: 1,
            events: VecDeque::new(),
            counters: DataPathCounters::default(),
        }
    }
}

impl DataPathState {
    /// The latest association message.
    pub fn association(&self) -> Option<VfAssociation> {
        self.association
    }

    /// Where traffic is steered.
    pub fn path(&self) -> HostPath {
        self.path
    }

    /// Counters.
    pub fn counters(&self) -> DataPathCounters {
        self.counters
    }

    /// The next event, oldest first.
    pub fn take_event(&mut self) -> Option<VfEvent> {
        self.events.pop_front()
    }

    fn push(&mut self, event: VfEvent) {
        if self.events.len() == MAX_EVENTS {
            self.events.pop_front();
        }
        self.events.push_back(event);
    }

    fn revert(&mut self, cause: SyntheticCause) {
        if self.path != HostPath::Synthetic {
            self.path = HostPath::Synthetic;
            self.pending = None;
            self.counters.host_reverts += 1;
            self.push(VfEvent::DataPathSynthetic(cause));
        }
    }

    /// SEND_VF_ASSOCIATION from the host.
    pub fn on_association(&mut self, association: VfAssociation) {
        let previous = self.association.filter(|known| known.allocated);
        self.association = Some(association);
        if association.allocated {
            if previous.map(|known| known.serial_number) != Some(association.serial_number) {
                self.push(VfEvent::Associated {
                    serial_number: association.serial_number,
                });
            }
        } else {
            // The host has already moved the traffic back before withdrawing the VF.
            self.revert(SyntheticCause::Withdrawn);
            self.push(VfEvent::Withdrawn {
                serial_number: association.serial_number,
            });
        }
    }

    /// SWITCH_DATA_PATH sent by the host.
    pub fn on_host_switch(&mut self, to_vf: bool) {
        if !to_vf {
            self.revert(SyntheticCause::HostSwitched);
        }
    }

    /// Starts a request; returns its sequence number, or `None` when there is nothing to ask
    /// (to the VF without an allocated VF, or already there or on the way).
    pub fn begin_request(&mut self, to_vf: bool) -> Option<u64> {
        if to_vf {
            let allocated = self.association.is_some_and(|known| known.allocated);
            if !allocated || self.path != HostPath::Synthetic {
                return None;
            }
            self.path = HostPath::SwitchingToVf;
        } else {
            let asked = self.path == HostPath::SwitchingToSynthetic && self.pending.is_some();
            if self.path == HostPath::Synthetic || asked {
                return None;
            }
            self.path = HostPath::SwitchingToSynthetic;
        }
        let sequence = self.next_sequence;
        self.next_sequence = (self.next_sequence + 1) & 0xff_ffff_ffff;
        self.pending = Some(sequence);
        self.counters.switch_requests += 1;
        Some(sequence)
    }

    /// The request could not be sent: to the VF it is as if never asked; back to synthetic
    /// the VF stays unused and the owner asks again.
    pub fn request_not_sent(&mut self, sequence: u64) {
        if self.pending == Some(sequence) {
            self.pending = None;
            self.counters.switch_requests -= 1;
            if self.path == HostPath::SwitchingToVf {
                self.path = HostPath::Synthetic;
            }
        }
    }

    /// The host completed request `sequence`.
    pub fn on_completion(&mut self, sequence: u64) {
        if self.pending != Some(sequence) {
            self.counters.stale_completions += 1;
            return;
        }
        self.pending = None;
        self.counters.switch_completions += 1;
        match self.path {
            HostPath::SwitchingToVf => {
                self.path = HostPath::Vf;
                self.push(VfEvent::DataPathVf);
            }
            HostPath::SwitchingToSynthetic => {
                self.path = HostPath::Synthetic;
                self.push(VfEvent::DataPathSynthetic(SyntheticCause::Requested));
            }
            HostPath::Synthetic | HostPath::Vf => {}
        }
    }

    /// True while a request back to synthetic still has to be (re)sent.
    pub fn needs_resend_to_synthetic(&self) -> bool {
        self.path == HostPath::SwitchingToSynthetic && self.pending.is_none()
    }
}

/// How a VF was matched to this NIC.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pairing {
    /// The vPCI function's serial is the associated one and the MACs are equal (Linux's rule
    /// since 5.13: MANA puts several vPorts behind one function).
    SerialAndMac,
    /// Equal MACs without a matching association (what DPDK and FreeBSD check; Linux's
    /// fallback).
    MacOnly,
}

/// Pairs a VF (vPCI function `function_serial`, permanent MAC `vf_mac`) with the synthetic NIC
/// (`synthetic_mac`, latest association `association`) as Linux's `get_netvsc_byslot` does
/// (`failover-lessons.md` §2.3). A different MAC never pairs: on Hyper-V a VF cannot take a MAC
/// that belongs to another synthetic NIC.
pub fn pair(
    association: Option<VfAssociation>,
    function_serial: u32,
    vf_mac: net_device::MacAddress,
    synthetic_mac: net_device::MacAddress,
) -> Option<Pairing> {
    if vf_mac != synthetic_mac {
        return None;
    }
    let serial_matches = association.is_some_and(|association| {
        association.allocated && association.serial_number == function_serial
    });
    Some(if serial_matches {
        Pairing::SerialAndMac
    } else {
        Pairing::MacOnly
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairing_needs_the_mac_and_prefers_the_serial() {
        let mac = net_device::MacAddress([0, 0x15, 0x5d, 1, 2, 3]);
        let other = net_device::MacAddress([0, 0x15, 0x5d, 1, 2, 4]);
        let association = Some(allocated(7));
        assert_eq!(pair(association, 7, mac, mac), Some(Pairing::SerialAndMac));
        assert_eq!(pair(association, 8, mac, mac), Some(Pairing::MacOnly));
        assert_eq!(pair(None, 7, mac, mac), Some(Pairing::MacOnly));
        assert_eq!(
            pair(association, 7, other, mac),
            None,
            "another NIC's vPort"
        );
        let withdrawn = Some(VfAssociation {
            allocated: false,
            serial_number: 7,
        });
        assert_eq!(pair(withdrawn, 7, mac, mac), Some(Pairing::MacOnly));
    }

    fn allocated(serial_number: u32) -> VfAssociation {
        VfAssociation {
            allocated: true,
            serial_number,
        }
    }

    #[test]
    fn the_vf_is_used_only_after_the_completion() {
        let mut state = DataPathState::default();
        assert_eq!(state.begin_request(true), None, "no VF associated yet");
        state.on_association(allocated(7));
        assert_eq!(
            state.take_event(),
            Some(VfEvent::Associated { serial_number: 7 })
        );
        let sequence = state.begin_request(true).unwrap();
        assert_eq!(state.path(), HostPath::SwitchingToVf);
        assert_eq!(state.begin_request(true), None, "one request at a time");
        state.on_completion(sequence);
        assert_eq!(state.path(), HostPath::Vf);
        assert_eq!(state.take_event(), Some(VfEvent::DataPathVf));
        let back = state.begin_request(false).unwrap();
        assert_eq!(
            state.path(),
            HostPath::SwitchingToSynthetic,
            "VF unused at once"
        );
        state.on_completion(back);
        assert_eq!(state.path(), HostPath::Synthetic);
        assert_eq!(
            state.take_event(),
            Some(VfEvent::DataPathSynthetic(SyntheticCause::Requested))
        );
        assert_eq!(state.counters().switch_completions, 2);
    }

    #[test]
    fn an_eject_during_an_in_flight_switch_wins_over_the_late_completion() {
        let mut state = DataPathState::default();
        state.on_association(allocated(3));
        let to_vf = state.begin_request(true).unwrap();
        let back = state.begin_request(false).unwrap();
        state.on_completion(to_vf);
        assert_eq!(
            state.path(),
            HostPath::SwitchingToSynthetic,
            "stale completion"
        );
        assert_eq!(state.counters().stale_completions, 1);
        state.on_completion(back);
        assert_eq!(state.path(), HostPath::Synthetic);
    }

    #[test]
    fn the_host_moves_the_path_back_by_withdrawal_or_its_own_switch() {
        let mut state = DataPathState::default();
        state.on_association(allocated(3));
        let sequence = state.begin_request(true).unwrap();
        state.on_completion(sequence);
        state.on_host_switch(false);
        assert_eq!(state.path(), HostPath::Synthetic);
        let sequence = state.begin_request(true).unwrap();
        state.on_association(VfAssociation {
            allocated: false,
            serial_number: 3,
        });
        assert_eq!(
            state.path(),
            HostPath::Synthetic,
            "pending switch abandoned"
        );
        state.on_completion(sequence);
        assert_eq!(state.path(), HostPath::Synthetic, "its completion is stale");
        assert_eq!(state.begin_request(true), None, "withdrawn VF");
        assert_eq!(state.counters().host_reverts, 2);
        let events: alloc::vec::Vec<VfEvent> = core::iter::from_fn(|| state.take_event()).collect();
        assert!(events.contains(&VfEvent::DataPathSynthetic(SyntheticCause::HostSwitched)));
        assert!(events.contains(&VfEvent::DataPathSynthetic(SyntheticCause::Withdrawn)));
        assert!(events.contains(&VfEvent::Withdrawn { serial_number: 3 }));
    }

    #[test]
    fn an_unsent_request_leaves_the_vf_unused() {
        let mut state = DataPathState::default();
        state.on_association(allocated(1));
        let sequence = state.begin_request(true).unwrap();
        state.request_not_sent(sequence);
        assert_eq!(state.path(), HostPath::Synthetic);
        let sequence = state.begin_request(true).unwrap();
        state.on_completion(sequence);
        let back = state.begin_request(false).unwrap();
        state.request_not_sent(back);
        assert_eq!(state.path(), HostPath::SwitchingToSynthetic);
        assert!(state.needs_resend_to_synthetic());
    }
}
