//! Native PCIe hot-plug (PCIe Base §6.7, Slot registers §7.5.3.9-11) on root and downstream
//! ports: arming the slot, turning Slot Status events into [`HotplugEvent`]s, powering slots on
//! for arrivals and off for orderly removals. QEMU behaviour: reference
//! `qemu-igb-sriov-hotplug.md` §4.2-4.6.

use super::capability::{PcieCapability, SlotCapabilities, find_capability, id, pcie};
use super::config::{Command, ConfigAccess, write_command};
use super::{PciAddress, PciBus, PciDevice, bad_value, gone};
use crate::error::KernelError;
use crate::pending_vectors;
use alloc::vec::Vec;
use bitflags::bitflags;
use core::fmt;

bitflags! {
    /// Slot Control (PCIe Base §7.5.3.10).
    #[derive(Clone, Copy, PartialEq, Eq, Debug)]
    pub struct SlotControl: u16 {
        /// Attention Button Pressed Enable.
        const ATTENTION_BUTTON_ENABLE = 1 << 0;
        /// Power Fault Detected Enable.
        const POWER_FAULT_ENABLE = 1 << 1;
        /// MRL Sensor Changed Enable.
        const MRL_SENSOR_ENABLE = 1 << 2;
        /// Presence Detect Changed Enable.
        const PRESENCE_DETECT_ENABLE = 1 << 3;
        /// Command Completed Interrupt Enable.
        const COMMAND_COMPLETED_ENABLE = 1 << 4;
        /// Hot-Plug Interrupt Enable.
        const HOTPLUG_INTERRUPT_ENABLE = 1 << 5;
        /// Attention Indicator Control (2 bits).
        const ATTENTION_INDICATOR = 0b11 << 6;
        /// Power Indicator Control (2 bits): 01 on, 10 blink, 11 off.
        const POWER_INDICATOR = 0b11 << 8;
        /// Power Controller Control: 1 = power off.
        const POWER_OFF = 1 << 10;
        /// Electromechanical Interlock Control.
        const INTERLOCK = 1 << 11;
        /// Data Link Layer State Changed Enable.
        const DLL_STATE_CHANGED_ENABLE = 1 << 12;
    }
}

/// Power Indicator Control value "on".
const POWER_INDICATOR_ON: u16 = 0b01 << 8;
/// Power Indicator Control value "off".
const POWER_INDICATOR_OFF: u16 = 0b11 << 8;

bitflags! {
    /// Slot Status (PCIe Base §7.5.3.11); the event bits are write-1-to-clear.
    #[derive(Clone, Copy, PartialEq, Eq, Debug)]
    pub struct SlotStatus: u16 {
        /// Attention Button Pressed (event).
        const ATTENTION_BUTTON_PRESSED = 1 << 0;
        /// Power Fault Detected (event).
        const POWER_FAULT = 1 << 1;
        /// MRL Sensor Changed (event).
        const MRL_SENSOR_CHANGED = 1 << 2;
        /// Presence Detect Changed (event).
        const PRESENCE_DETECT_CHANGED = 1 << 3;
        /// Command Completed (event).
        const COMMAND_COMPLETED = 1 << 4;
        /// MRL Sensor State.
        const MRL_SENSOR_STATE = 1 << 5;
        /// Presence Detect State: an adapter is in the slot.
        const PRESENCE_DETECT_STATE = 1 << 6;
        /// Electromechanical Interlock Status.
        const INTERLOCK_STATUS = 1 << 7;
        /// Data Link Layer State Changed (event).
        const DLL_STATE_CHANGED = 1 << 8;
    }
}

impl SlotStatus {
    /// The write-1-to-clear event bits.
    pub const EVENTS: SlotStatus = SlotStatus::ATTENTION_BUTTON_PRESSED
        .union(SlotStatus::POWER_FAULT)
        .union(SlotStatus::MRL_SENSOR_CHANGED)
        .union(SlotStatus::PRESENCE_DETECT_CHANGED)
        .union(SlotStatus::COMMAND_COMPLETED)
        .union(SlotStatus::DLL_STATE_CHANGED);
}

/// Service calls between two polls of slots that have an interrupt, in case one was lost.
const SAFETY_POLL_INTERVAL: u32 = 64;
/// Service calls an arriving device gets to start answering config reads (real links train
/// for up to 100 ms; QEMU's devices answer at once).
const ARRIVAL_ATTEMPTS: u32 = 1000;

/// What a slot is doing.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum SlotState {
    /// Nothing in the slot (or nothing we know of).
    Empty,
    /// Powered on for a new device that has not answered yet; retried on each service.
    Arriving {
        /// Scans tried so far.
        attempts: u32,
    },
    /// Devices present and enumerated.
    Occupied,
    /// Removal requested (attention button); waiting for the owner's `complete_removal`.
    Leaving,
    /// We powered the slot off; the adapter may still sit in it.
    PoweredOff,
}

impl fmt::Display for SlotState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SlotState::Empty => f.write_str("empty"),
            SlotState::Arriving { .. } => f.write_str("arriving"),
            SlotState::Occupied => f.write_str("occupied"),
            SlotState::Leaving => f.write_str("leaving"),
            SlotState::PoweredOff => f.write_str("powered off"),
        }
    }
}

/// A change in the set of devices, as the kernel's main loop sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HotplugEvent {
    /// A device was added, powered, enumerated and given BARs (decoding enabled, bus
    /// mastering left to its driver).
    DeviceArrived {
        /// The hot-plug port.
        slot: PciAddress,
        /// The new functions.
        devices: Vec<PciDevice>,
    },
    /// Removal was requested and a driver claimed one of the slot's functions: the owner must
    /// quiesce (stop DMA) and then call [`PciBus::complete_removal`].
    DeviceLeaving {
        /// The hot-plug port.
        slot: PciAddress,
        /// The slot's functions (VFs included).
        devices: Vec<PciDevice>,
    },
    /// The slot was powered off after a removal request; its functions are gone.
    UnplugComplete {
        /// The hot-plug port.
        slot: PciAddress,
        /// The functions that went away.
        devices: Vec<PciDevice>,
    },
    /// The adapter disappeared without a removal request: drivers must `mark_gone`.
    DeviceRemoved {
        /// The hot-plug port.
        slot: PciAddress,
        /// The functions that went away.
        devices: Vec<PciDevice>,
    },
}

/// One hot-plug capable port.
#[derive(Clone, Debug)]
pub(super) struct HotplugSlot {
    port: PciAddress,
    /// Offset of the port's PCI Express capability.
    pcie_offset: u16,
    capabilities: SlotCapabilities,
    state: SlotState,
    /// Interrupt vector, when MSI/MSI-X is wired; otherwise the slot is polled.
    vector: Option<u8>,
    armed: bool,
    /// Events seen while arming, handled on the first service call.
    pending: SlotStatus,
}

/// Hot-plug bookkeeping of a [`PciBus`].
#[derive(Clone, Debug, Default)]
pub(super) struct HotplugState {
    slots: Vec<HotplugSlot>,
    /// Events produced outside `service` (by `complete_removal`), delivered by the next call.
    queued: Vec<HotplugEvent>,
    service_calls: u32,
}

impl<A: ConfigAccess> PciBus<A> {
    /// Records every root/downstream port with a hot-plug capable slot not yet known; returns
    /// the ports added. They are not armed until [`PciBus::arm_hotplug_slot`].
    pub fn discover_hotplug_slots(&mut self) -> Vec<PciAddress> {
        let mut added = Vec::new();
        let ports: Vec<PciAddress> = self
            .devices
            .iter()
            .filter(|d| d.hotplug_slot)
            .map(|d| d.address)
            .collect();
        for port in ports {
            if self.hotplug.slots.iter().any(|s| s.port == port) {
                continue;
            }
            let Some(offset) = find_capability(&self.access, port, id::PCI_EXPRESS) else {
                continue;
            };
            let Ok(capability) = PcieCapability::read(&self.access, port, offset) else {
                continue;
            };
            if !capability.is_hotplug_port() {
                continue;
            }
            self.hotplug.slots.push(HotplugSlot {
                port,
                pcie_offset: offset,
                capabilities: capability.slot_capabilities,
                state: SlotState::Empty,
                vector: None,
                armed: false,
                pending: SlotStatus::empty(),
            });
            added.push(port);
        }
        added
    }

    /// The hot-plug ports known, with their state.
    pub fn hotplug_slots(&self) -> impl Iterator<Item = (PciAddress, SlotState)> + '_ {
        self.hotplug.slots.iter().map(|s| (s.port, s.state))
    }

    /// The MSI/MSI-X message number the port uses for hot-plug interrupts (PCIe Capabilities
    /// register bits 13:9), needed to pick the MSI-X table entry.
    pub fn hotplug_message_number(&self, port: PciAddress) -> Result<u8, KernelError> {
        let slot = self.slot(port)?;
        let capability = PcieCapability::read(&self.access, port, slot.pcie_offset)?;
        Ok(capability.interrupt_message_number)
    }

    /// Arms the slot of `port` (PCIe Base §6.7.3.1): enables Presence Detect Changed and (if
    /// the slot has a button) Attention Button events, Hot-Plug Interrupt Enable only when
    /// `vector` says an MSI/MSI-X vector is wired, Command Completed interrupts off; then
    /// clears stale events by writing back exactly the bits it read (QEMU reverts a W1C write
    /// that sets event bits which are not pending). Stale events are kept and handled by the
    /// first `service` call, so a removal requested during boot is not lost.
    pub fn arm_hotplug_slot(
        &mut self,
        port: PciAddress,
        vector: Option<u8>,
    ) -> Result<(), KernelError> {
        let index = self.slot_index(port)?;
        let slot = self.hotplug.slots[index].clone();
        let control_offset = slot.pcie_offset + pcie::SLOT_CONTROL;
        let status_offset = slot.pcie_offset + pcie::SLOT_STATUS;
        let raw_control = self.access.read16(port, control_offset);
        if raw_control == u16::MAX {
            return Err(gone(port));
        }
        let unwanted = SlotControl::COMMAND_COMPLETED_ENABLE
            | SlotControl::DLL_STATE_CHANGED_ENABLE
            | SlotControl::POWER_FAULT_ENABLE
            | SlotControl::MRL_SENSOR_ENABLE
            | SlotControl::HOTPLUG_INTERRUPT_ENABLE;
        let mut control = (SlotControl::from_bits_retain(raw_control) - unwanted)
            | SlotControl::PRESENCE_DETECT_ENABLE;
        if slot
            .capabilities
            .contains(SlotCapabilities::ATTENTION_BUTTON)
        {
            control |= SlotControl::ATTENTION_BUTTON_ENABLE;
        }
        if vector.is_some() {
            control |= SlotControl::HOTPLUG_INTERRUPT_ENABLE;
        }
        self.access.write16(port, control_offset, control.bits());

        let status = SlotStatus::from_bits_retain(self.access.read16(port, status_offset));
        let stale = status & SlotStatus::EVENTS;
        if !stale.is_empty() {
            self.access.write16(port, status_offset, stale.bits());
        }
        let present = status.contains(SlotStatus::PRESENCE_DETECT_STATE);
        let has_devices = !self.slot_devices(port).is_empty();
        let mut pending = stale - SlotStatus::COMMAND_COMPLETED;
        let state = if has_devices {
            SlotState::Occupied
        } else {
            SlotState::Empty
        };
        if present && !has_devices {
            // An adapter sits in a powered-off (or silent) slot: treat it as an arrival.
            pending |= SlotStatus::PRESENCE_DETECT_CHANGED;
        }
        let slot = &mut self.hotplug.slots[index];
        slot.state = state;
        slot.vector = vector;
        slot.armed = true;
        slot.pending = pending;
        match vector {
            Some(vector) => log::info!("hotplug: slot {port} armed ({state}), vector {vector}"),
            None => log::info!("hotplug: slot {port} armed ({state}), polled"),
        }
        Ok(())
    }

    /// Handles hot-plug events: slots whose interrupt fired, polled slots, slots with work in
    /// progress, and every slot once per 64 calls. Call it from the main loop.
    pub fn service(&mut self) -> Vec<HotplugEvent> {
        self.hotplug.service_calls = self.hotplug.service_calls.wrapping_add(1);
        let safety_poll = self
            .hotplug
            .service_calls
            .is_multiple_of(SAFETY_POLL_INTERVAL);
        let mut events = core::mem::take(&mut self.hotplug.queued);
        let mut index = 0;
        while index < self.hotplug.slots.len() {
            let slot = &self.hotplug.slots[index];
            let interrupted = slot.vector.is_some_and(pending_vectors::take_pending);
            let due = slot.armed
                && (slot.vector.is_none()
                    || interrupted
                    || safety_poll
                    || !slot.pending.is_empty()
                    || matches!(slot.state, SlotState::Arriving { .. }));
            if due {
                self.service_slot(index, &mut events);
            }
            index += 1;
        }
        events
    }

    /// Reads every armed slot now, whatever the interrupts say.
    pub fn poll_events(&mut self) -> Vec<HotplugEvent> {
        let mut events = core::mem::take(&mut self.hotplug.queued);
        let mut index = 0;
        while index < self.hotplug.slots.len() {
            if self.hotplug.slots[index].armed {
                self.service_slot(index, &mut events);
            }
            index += 1;
        }
        events
    }

    /// Finishes an orderly removal after the owner quiesced its devices: turns off their
    /// decoding and bus mastering, then powers the slot off with Power Controller = off and
    /// Power Indicator = off in one Slot Control write (QEMU deletes the device on that
    /// write, reference §4.4). The `UnplugComplete` event follows on the next `service`.
    pub fn complete_removal(&mut self, slot: PciAddress) -> Result<(), KernelError> {
        let index = self.slot_index(slot)?;
        match self.hotplug.slots[index].state {
            SlotState::Leaving | SlotState::Occupied => {
                let mut events = Vec::new();
                self.finish_removal(index, &mut events);
                self.hotplug.queued.extend(events);
                Ok(())
            }
            _ => Err(bad_value(slot, "slot has no device to remove")),
        }
    }

    fn slot_index(&self, port: PciAddress) -> Result<usize, KernelError> {
        self.hotplug
            .slots
            .iter()
            .position(|s| s.port == port)
            .ok_or_else(|| bad_value(port, "not a hot-plug slot"))
    }

    fn slot(&self, port: PciAddress) -> Result<&HotplugSlot, KernelError> {
        self.slot_index(port)
            .map(|index| &self.hotplug.slots[index])
    }

    /// The functions behind `port` (all buses in its secondary..=subordinate range).
    fn slot_devices(&self, port: PciAddress) -> Vec<PciDevice> {
        let Some(bridge) = self.device(port).and_then(|d| d.bridge) else {
            return Vec::new();
        };
        if bridge.secondary_bus <= port.bus() {
            return Vec::new();
        }
        let buses = bridge.secondary_bus..=bridge.subordinate_bus;
        self.devices
            .iter()
            .filter(|d| buses.contains(&d.address.bus()))
            .cloned()
            .collect()
    }

    /// Reads and acknowledges the slot's events and acts on them.
    fn service_slot(&mut self, index: usize, events: &mut Vec<HotplugEvent>) {
        let slot = self.hotplug.slots[index].clone();
        let port = slot.port;
        let status_offset = slot.pcie_offset + pcie::SLOT_STATUS;
        let raw = self.access.read16(port, status_offset);
        if raw == u16::MAX {
            log::warn!("hotplug: port {port} stopped answering");
            self.hotplug.slots[index].armed = false;
            return;
        }
        let status = SlotStatus::from_bits_retain(raw);
        let fresh = status & SlotStatus::EVENTS;
        if !fresh.is_empty() {
            // Exactly the bits read: QEMU ignores a W1C write with extra 1s (reference §4.3).
            self.access.write16(port, status_offset, fresh.bits());
        }
        let happened = fresh | slot.pending;
        self.hotplug.slots[index].pending = SlotStatus::empty();
        let present = status.contains(SlotStatus::PRESENCE_DETECT_STATE);

        if happened.contains(SlotStatus::PRESENCE_DETECT_CHANGED) {
            match (present, slot.state) {
                (true, SlotState::Empty | SlotState::PoweredOff) => {
                    // device_add sets ABP together with PDC: that press is part of the add.
                    self.begin_arrival(index, events);
                }
                (false, SlotState::Occupied | SlotState::Leaving | SlotState::Arriving { .. }) => {
                    self.surprise_removal(index, events);
                }
                (false, SlotState::PoweredOff) => {
                    log::debug!("hotplug: slot {port} adapter taken out");
                    self.hotplug.slots[index].state = SlotState::Empty;
                }
                (true, SlotState::Arriving { .. }) => self.try_finish_arrival(index, events),
                _ => log::debug!(
                    "hotplug: slot {port} presence change ignored ({})",
                    slot.state
                ),
            }
            return;
        }
        if happened.contains(SlotStatus::ATTENTION_BUTTON_PRESSED) {
            match (present, slot.state) {
                (true, SlotState::Occupied) => self.begin_leaving(index, events),
                (true, SlotState::Empty | SlotState::PoweredOff) => {
                    // The button on a powered-off occupied slot asks for power on.
                    self.begin_arrival(index, events);
                }
                (_, SlotState::Leaving) => {
                    log::debug!("hotplug: slot {port} removal already in progress");
                }
                _ => log::debug!("hotplug: slot {port} button ignored ({})", slot.state),
            }
            return;
        }
        if matches!(slot.state, SlotState::Arriving { .. }) {
            self.try_finish_arrival(index, events);
        }
    }

    /// Attention button with devices present: ask the owner, or power off at once.
    fn begin_leaving(&mut self, index: usize, events: &mut Vec<HotplugEvent>) {
        let port = self.hotplug.slots[index].port;
        let devices = self.slot_devices(port);
        for device in &devices {
            log::info!("hotplug: slot {port} device leaving: {}", device.identity());
        }
        if devices.iter().any(|d| self.claimed.contains(&d.address)) {
            self.hotplug.slots[index].state = SlotState::Leaving;
            events.push(HotplugEvent::DeviceLeaving {
                slot: port,
                devices,
            });
        } else {
            self.finish_removal(index, events);
        }
    }

    /// Quiesces the slot's functions, powers the slot off and forgets the functions.
    fn finish_removal(&mut self, index: usize, events: &mut Vec<HotplugEvent>) {
        let slot = self.hotplug.slots[index].clone();
        let port = slot.port;
        for device in self.slot_devices(port) {
            // No decoding, no DMA from here on, whatever the driver did.
            write_command(&self.access, device.address, Command::empty());
        }
        self.power_slot(&slot, false);
        let devices = self.remove_slot_devices(port);
        self.hotplug.slots[index].state = SlotState::PoweredOff;
        log::info!("hotplug: slot {port} powered off, unplug complete");
        events.push(HotplugEvent::UnplugComplete {
            slot: port,
            devices,
        });
    }

    /// Presence lost without a removal request.
    fn surprise_removal(&mut self, index: usize, events: &mut Vec<HotplugEvent>) {
        let slot = self.hotplug.slots[index].clone();
        let port = slot.port;
        let devices = self.remove_slot_devices(port);
        if devices.is_empty() {
            log::info!("hotplug: slot {port} device removed (surprise)");
        }
        for device in &devices {
            log::info!(
                "hotplug: slot {port} device removed (surprise): {}",
                device.identity()
            );
        }
        // Power off so the next adapter comes up through the normal power-on path.
        self.power_slot(&slot, false);
        self.hotplug.slots[index].state = SlotState::Empty;
        events.push(HotplugEvent::DeviceRemoved {
            slot: port,
            devices,
        });
    }

    /// Presence detected (or button on a powered-off slot): power on, then enumerate.
    fn begin_arrival(&mut self, index: usize, events: &mut Vec<HotplugEvent>) {
        let slot = self.hotplug.slots[index].clone();
        self.power_slot(&slot, true);
        self.hotplug.slots[index].state = SlotState::Arriving { attempts: 0 };
        self.try_finish_arrival(index, events);
    }

    /// Scans behind the port; once functions answer, assigns their BARs and reports them.
    fn try_finish_arrival(&mut self, index: usize, events: &mut Vec<HotplugEvent>) {
        let port = self.hotplug.slots[index].port;
        let found = self.scan_behind(port);
        if found.is_empty() {
            let attempts = match self.hotplug.slots[index].state {
                SlotState::Arriving { attempts } => attempts + 1,
                _ => 1,
            };
            if attempts >= ARRIVAL_ATTEMPTS {
                log::warn!("hotplug: slot {port} adapter present but no function answers");
                // Occupied with nothing enumerated: a button press still powers it off.
                self.hotplug.slots[index].state = SlotState::Occupied;
            } else {
                self.hotplug.slots[index].state = SlotState::Arriving { attempts };
            }
            return;
        }
        let report = self.assign_resources();
        for failure in &report.failures {
            log::warn!("hotplug: slot {port} resource assignment: {failure}");
        }
        let devices: Vec<PciDevice> = found
            .iter()
            .filter_map(|address| self.device(*address).cloned())
            .collect();
        for device in &devices {
            log::info!(
                "hotplug: slot {port} device arrived: {} {}",
                device.identity(),
                device.bar_summary()
            );
        }
        self.hotplug.slots[index].state = SlotState::Occupied;
        // A hot-added switch brings ports of its own; they are polled.
        for new_port in self.discover_hotplug_slots() {
            if let Err(error) = self.arm_hotplug_slot(new_port, None) {
                log::warn!("hotplug: could not arm new slot {new_port}: {error}");
            }
        }
        events.push(HotplugEvent::DeviceArrived {
            slot: port,
            devices,
        });
    }

    /// Forgets the slot's functions (and hot-plug ports among them).
    fn remove_slot_devices(&mut self, port: PciAddress) -> Vec<PciDevice> {
        let Some(bridge) = self.device(port).and_then(|d| d.bridge) else {
            return Vec::new();
        };
        if bridge.secondary_bus <= port.bus() {
            return Vec::new();
        }
        let removed = self.remove_buses(bridge.secondary_bus, bridge.subordinate_bus);
        self.hotplug
            .slots
            .retain(|s| !removed.iter().any(|d| d.address == s.port));
        removed
    }

    /// Switches slot power (and the power indicator) with a single Slot Control write.
    fn power_slot(&self, slot: &HotplugSlot, on: bool) {
        let control_offset = slot.pcie_offset + pcie::SLOT_CONTROL;
        let raw = self.access.read16(slot.port, control_offset);
        if raw == u16::MAX {
            return;
        }
        let mut control = raw;
        if slot
            .capabilities
            .contains(SlotCapabilities::POWER_CONTROLLER)
        {
            control = if on {
                control & !SlotControl::POWER_OFF.bits()
            } else {
                control | SlotControl::POWER_OFF.bits()
            };
        }
        if slot
            .capabilities
            .contains(SlotCapabilities::POWER_INDICATOR)
        {
            let indicator = if on {
                POWER_INDICATOR_ON
            } else {
                POWER_INDICATOR_OFF
            };
            control = (control & !SlotControl::POWER_INDICATOR.bits()) | indicator;
        }
        if control != raw {
            self.access.write16(slot.port, control_offset, control);
        }
    }
}
