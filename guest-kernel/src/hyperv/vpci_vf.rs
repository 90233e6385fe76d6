//! The Hyper-V VF path: the vPCI bus carrying netvsc's associated VF, its function presented
//! to the kernel's PCI layer, and the hand-over to the bond through a VF slot (arrival, EJECT
//! with the data path back to synthetic first, rescind).
//!
//! On Hyper-V/Azure the VF is not on a PCI bus the guest enumerates: after netvsc's
//! SEND_VF_ASSOCIATION the host offers a vPCI VMBus channel per VF bus
//! (`reference/hyperv-vmbus-netvsc.md` §5). [`VfHook`] opens every vPCI offer (probe:
//! negotiation, FDO_D0_ENTRY, BUS_RELATIONS), and once a function's serial equals the
//! associated serial it asks the platform to start it: the kernel maps the function's config
//! space through the vPCI window into a [`PciBus`] of its own ([`VpciConfig`],
//! [`present_function`]: capability walk, BAR sizing and placement, MSI-X table as on any PCI
//! bus), so `vf_path` and the MANA driver need no vPCI knowledge. The driver's MAC must equal
//! netvsc's (pairing by serial **and** MAC). The bond sees the VF through a [`VfSlot`] attached
//! once at bring-up: empty (link down) until a VF is paired, then the VF itself.
//!
//! Removal: on EJECT (or the association withdrawn, or the function vanishing) the slot reports
//! the VF's link down and refuses to transmit, so the bond moves transmit to synthetic on its
//! next evaluation, while the VF's receive path keeps delivering into the bond (frames the
//! host steered to it before the switch are still in its queue: dropping them costs TCP a
//! retransmission timeout). The hook asks netvsc for the synthetic data path and waits
//! (bounded by [`LEAVE_TIMEOUT_NS`], across polls) until the host confirmed it and the VF
//! delivered nothing for [`DRAIN_QUIET_NS`]; only then is the driver stopped, its interrupts
//! deleted and its resources released (DELETE_INTERRUPT, RELEASE_RESOURCES, answers awaited
//! across polls for at most [`RELEASE_TIMEOUT_NS`]) and EJECTION_COMPLETE sent (Linux
//! `hv_eject_device_work` order). A rescinded vPCI channel means the VF is gone at once
//! (nothing is sent on it). Everything here is sans-IO over
//! [`VfPlatform`] and [`SyntheticSide`], so host tests drive it with fakes; the kernel
//! implements the platform in `net::hyperv`.

use alloc::boxed::Box;
use alloc::format;
use alloc::rc::Rc;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::cell::RefCell;

use net_device::{
    Capabilities, DeviceError, HostDataPath, HostPath, LinkState, MacAddress, NetDevice,
    RegisterIo, RxMeta, Stats, TxMeta,
};
use netvsc_fallback::netvsc::{self, Netvsc, NetvscChannel, Pairing, VfAssociation, VfEvent};
use vmbus::Error as VmbusError;
use vmbus::client::Offer;
use vmbus::vpci::{BarPlacement, VpciBus, VpciEvent, VpciPort};

use crate::error::KernelError;
use crate::pci::{
    AddressRange, ConfigAccess, PciAddress, PciBus, RootResources, Window, WindowKind,
};

/// A probed vPCI bus, shared by its config access and the hook.
pub type SharedVpciBus<P, W> = Rc<RefCell<VpciBus<P, W>>>;

/// Longest wait for the host to confirm the synthetic data path before a VF is let go anyway
/// (OpenHCL gives the guest 10 s for the whole eject; Linux waits for the completion too).
pub const LEAVE_TIMEOUT_NS: u64 = 2_000_000_000;

/// After the host confirmed the synthetic data path, how long a leaving VF must deliver
/// nothing (with the bond having asked it for frames) before it is stopped: frames steered to
/// it just before the switch may still be on their way into its queue.
pub const DRAIN_QUIET_NS: u64 = 10_000_000;

/// Longest wait for the host's answers to DELETE_INTERRUPT and RELEASE_RESOURCES before the
/// EJECTION_COMPLETE goes out anyway (Linux does not wait at all; OpenHCL gives the guest 10 s
/// for the whole eject).
pub const RELEASE_TIMEOUT_NS: u64 = 500_000_000;

/// How soon an EJECTION_COMPLETE that could not be sent is tried again: the host waits for it
/// before it takes the function back, so it is retried until it goes out or the bus is gone.
pub const EJECT_RETRY_NS: u64 = 100_000_000;

fn vpci_error(step: &'static str, error: impl ToString) -> KernelError {
    KernelError::HyperV {
        step,
        reason: error.to_string(),
    }
}

/// The PCI address a wslot has on its vPCI bus (bus 0; wslot bits 0–4 device, 5–7 function).
pub fn wslot_address(wslot: u32) -> PciAddress {
    PciAddress::new(0, (wslot & 0x1f) as u8, ((wslot >> 5) & 7) as u8)
}

fn address_wslot(address: PciAddress) -> Option<u32> {
    (address.bus() == 0).then(|| u32::from(address.device()) | (u32::from(address.function()) << 5))
}

/// Config access for the PCI layer over one vPCI bus's window. Functions the bus does not
/// list (or that are ejecting, or a bus that is gone) read as all-ones like absent hardware.
pub struct VpciConfig<P: VpciPort, W: RegisterIo> {
    bus: SharedVpciBus<P, W>,
}

impl<P: VpciPort, W: RegisterIo> VpciConfig<P, W> {
    /// Config access over `bus`.
    pub fn new(bus: SharedVpciBus<P, W>) -> Self {
        VpciConfig { bus }
    }

    fn with_bus<T>(&self, absent: T, f: impl FnOnce(&VpciBus<P, W>) -> T) -> T {
        match self.bus.try_borrow() {
            Ok(bus) => f(&bus),
            Err(_) => absent,
        }
    }
}

impl<P: VpciPort, W: RegisterIo> ConfigAccess for VpciConfig<P, W> {
    fn read32(&self, address: PciAddress, offset: u16) -> u32 {
        let Some(wslot) = address_wslot(address) else {
            return u32::MAX;
        };
        self.with_bus(u32::MAX, |bus| {
            bus.config_read32(wslot, usize::from(offset & !3))
                .unwrap_or(u32::MAX)
        })
    }

    fn write32(&self, address: PciAddress, offset: u16, value: u32) {
        if let Some(wslot) = address_wslot(address) {
            self.with_bus((), |bus| {
                let _ = bus.config_write32(wslot, usize::from(offset & !3), value);
            });
        }
    }

    fn write16(&self, address: PciAddress, offset: u16, value: u16) {
        if let Some(wslot) = address_wslot(address) {
            self.with_bus((), |bus| {
                let _ = bus.config_write16(wslot, usize::from(offset & !1), value);
            });
        }
    }

    fn write8(&self, address: PciAddress, offset: u16, value: u8) {
        if let Some(wslot) = address_wslot(address) {
            self.with_bus((), |bus| {
                let _ = bus.config_write8(wslot, usize::from(offset), value);
            });
        }
    }
}

/// A vPCI function as a PCI function: its own PCI bus (enumerated, BARs placed) and address.
pub struct PresentedFunction<P: VpciPort, W: RegisterIo> {
    /// The function's bus, for `map_bar`, capabilities and MSI-X like any PCI bus.
    pub pci: PciBus<VpciConfig<P, W>>,
    /// The function on it.
    pub address: PciAddress,
    /// Where its BARs went (reported to the host with ASSIGNED_RESOURCES).
    pub bars: [BarPlacement; 6],
}

/// Presents `wslot` of `bus` to the PCI layer: enumerates it through the config window, lets
/// the PCI layer size and place its BARs in `mmio` (memory below 4 GiB carved from the VMBus
/// `_CRS` ranges) and reports the placement to the host (ASSIGNED_RESOURCES(2)).
pub fn present_function<P: VpciPort, W: RegisterIo>(
    bus: &SharedVpciBus<P, W>,
    wslot: u32,
    mmio: AddressRange,
) -> Result<PresentedFunction<P, W>, KernelError> {
    let masks = bus
        .borrow_mut()
        .resource_requirements(wslot)
        .map_err(|error| vpci_error("vPCI QUERY_RESOURCE_REQUIREMENTS", error))?;
    log::info!("vpci: wslot {wslot:#x} BAR masks {masks:08x?}");
    let root = RootResources {
        windows: alloc::vec![Window {
            kind: WindowKind::Memory,
            range: mmio,
        },],
        reserved: Vec::new(),
        last_bus: 0,
    };
    let config = VpciConfig::new(bus.clone());
    let address = wslot_address(wslot);
    // What the host left in the BAR registers means nothing to this guest (Linux
    // `prepopulate_bars` overwrites them too): unassigned, the PCI layer places them.
    for index in 0..6u16 {
        config.write32(address, crate::pci::config::reg::BAR0 + 4 * index, 0);
    }
    let mut pci = PciBus::new(config, root);
    pci.scan();
    let report = pci.assign_resources();
    let device = pci.device(address).ok_or(KernelError::HyperV {
        step: "vPCI function enumeration",
        reason: format!("wslot {wslot:#x} does not answer through the config window"),
    })?;
    if !report.failures.is_empty() {
        return Err(KernelError::HyperV {
            step: "vPCI BAR placement",
            reason: format!(
                "{} BAR(s) did not fit in {:#x}+{:#x}",
                report.failures.len(),
                mmio.start,
                mmio.size()
            ),
        });
    }
    let mut bars = [BarPlacement::default(); 6];
    for (index, bar) in device.bars.iter().enumerate() {
        if let Some(bar) = bar.filter(|bar| bar.is_memory() && bar.is_assigned()) {
            bars[index] = BarPlacement {
                address: bar.address,
                len: bar.size,
            };
        }
    }
    bus.borrow_mut()
        .assign_resources(wslot, &bars)
        .map_err(|error| vpci_error("vPCI ASSIGNED_RESOURCES", error))?;
    log::info!(
        "vpci: wslot {wslot:#x} is {} {}",
        device.identity(),
        device.bar_summary()
    );
    Ok(PresentedFunction { pci, address, bars })
}

/// MSI address/data for each of `vectors` of `wslot`, mapped by the host (CREATE_INTERRUPT(2))
/// to virtual processor `vp`: what the MSI-X entries are programmed with.
pub fn interrupt_messages<P: VpciPort, W: RegisterIo>(
    bus: &SharedVpciBus<P, W>,
    wslot: u32,
    vectors: &[u8],
    vp: u16,
) -> Result<Vec<(u64, u32)>, KernelError> {
    vectors
        .iter()
        .map(|&vector| {
            bus.borrow_mut()
                .create_interrupt(wslot, vector, &[vp])
                .map(|mapping| (mapping.address, mapping.data))
                .map_err(|error| vpci_error("vPCI CREATE_INTERRUPT", error))
        })
        .collect()
}

/// MMIO for vPCI config windows and BARs, carved from the VMBus `_CRS` ranges below 4 GiB;
/// space given back is reused (a VF comes and goes many times).
#[derive(Clone, Debug, Default)]
pub struct MmioPool {
    free: Vec<AddressRange>,
}

impl MmioPool {
    /// A pool over `ranges` (`(start, len)`); parts above 4 GiB are left out (the PCI layer
    /// places non-prefetchable BARs below 4 GiB only).
    pub fn new(ranges: &[(u64, u64)]) -> Self {
        let free = ranges
            .iter()
            .filter_map(|&(start, len)| {
                let end = start.checked_add(len)?.min(1 << 32);
                (end > start).then(|| AddressRange::from_start_size(start, end - start))?
            })
            .collect();
        let mut pool = MmioPool { free };
        pool.normalize();
        pool
    }

    /// `len` bytes aligned to `align` (a power of two), if any range has room.
    pub fn carve(&mut self, len: u64, align: u64) -> Option<AddressRange> {
        for index in 0..self.free.len() {
            let range = self.free[index];
            let start = range.start.checked_add(align - 1)? & !(align - 1);
            let last = start.checked_add(len.checked_sub(1)?)?;
            if last > range.end {
                continue;
            }
            self.free.remove(index);
            if start > range.start {
                self.free.push(AddressRange {
                    start: range.start,
                    end: start - 1,
                });
            }
            if last < range.end {
                self.free.push(AddressRange {
                    start: last + 1,
                    end: range.end,
                });
            }
            self.normalize();
            return Some(AddressRange { start, end: last });
        }
        None
    }

    /// Returns `range` to the pool.
    pub fn give_back(&mut self, range: AddressRange) {
        self.free.push(range);
        self.normalize();
    }

    /// Lowest address first, neighbours merged, so carving is first-fit from the bottom and
    /// returned space joins its neighbours again.
    fn normalize(&mut self) {
        self.free.sort_by_key(|range| range.start);
        let mut merged: Vec<AddressRange> = Vec::with_capacity(self.free.len());
        for range in self.free.drain(..) {
            match merged.last_mut() {
                Some(last) if last.end.checked_add(1) == Some(range.start) => last.end = range.end,
                _ => merged.push(range),
            }
        }
        self.free = merged;
    }

    /// Bytes free.
    pub fn free_bytes(&self) -> u64 {
        self.free.iter().map(AddressRange::size).sum()
    }
}

/// What the hook needs from the synthetic NIC (netvsc).
pub trait SyntheticSide {
    /// The next association or data-path change.
    fn take_vf_event(&mut self) -> Option<VfEvent>;
    /// The latest association.
    fn association(&self) -> Option<VfAssociation>;
    /// The synthetic NIC's permanent MAC.
    fn mac(&self) -> MacAddress;
    /// Where the host steers traffic.
    fn data_path(&self) -> HostPath;
    /// Asks the host for the synthetic data path (SWITCH_DATA_PATH with a completion).
    fn request_synthetic(&mut self);
}

impl<C: NetvscChannel> SyntheticSide for Netvsc<C> {
    fn take_vf_event(&mut self) -> Option<VfEvent> {
        Netvsc::take_vf_event(self)
    }

    fn association(&self) -> Option<VfAssociation> {
        self.vf_association()
    }

    fn mac(&self) -> MacAddress {
        self.mac_address()
    }

    fn data_path(&self) -> HostPath {
        Netvsc::data_path(self)
    }

    fn request_synthetic(&mut self) {
        let _sent = self.request_data_path(false);
    }
}

/// What the hook needs from the machine: vPCI offers, buses and VF drivers.
pub trait VfPlatform {
    /// The vPCI bus's port (its channel).
    type Port: VpciPort;
    /// The config window.
    type Window: RegisterIo;
    /// The next vPCI offer not yet handed out (initial or hot-added).
    fn take_vpci_offer(&mut self) -> Option<Offer>;
    /// Opens the offer's channel, places its config window and probes the bus.
    fn open_bus(
        &mut self,
        offer: &Offer,
    ) -> Result<SharedVpciBus<Self::Port, Self::Window>, KernelError>;
    /// Presents function `wslot` to the PCI layer and starts its VF driver.
    fn start_function(
        &mut self,
        offer: &Offer,
        bus: &SharedVpciBus<Self::Port, Self::Window>,
        wslot: u32,
    ) -> Result<Box<dyn NetDevice>, KernelError>;
    /// The function's driver is gone: give its BAR space back.
    fn function_stopped(&mut self, offer: &Offer, wslot: u32);
    /// Closes a bus (rescinded, or no longer wanted) and gives its window back.
    fn close_bus(&mut self, offer: &Offer, bus: SharedVpciBus<Self::Port, Self::Window>);
}

/// Counters of the hook (monotonic).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HookCounters {
    /// vPCI buses opened.
    pub buses_opened: u64,
    /// VFs paired (serial and MAC) and handed to the bond.
    pub vfs_paired: u64,
    /// Functions with the associated serial whose MAC differed: not used.
    pub mac_mismatches: u64,
    /// Bring-ups that failed.
    pub start_failures: u64,
    /// EJECTION_COMPLETEs sent.
    pub ejects_completed: u64,
    /// EJECTION_COMPLETEs that could not be sent when due (each is retried every
    /// [`EJECT_RETRY_NS`]).
    pub eject_send_failures: u64,
    /// Ejects acknowledged only after [`LEAVE_TIMEOUT_NS`] without the host's confirmation.
    pub leave_timeouts: u64,
    /// VFs lost to a rescinded vPCI channel.
    pub rescinds: u64,
    /// Frames a leaving VF delivered to the bond after it was told to leave.
    pub drained_frames: u64,
    /// Functions let go with DELETE_INTERRUPT + RELEASE_RESOURCES.
    pub releases: u64,
    /// Releases whose answers did not all arrive within [`RELEASE_TIMEOUT_NS`].
    pub release_timeouts: u64,
}

/// The slot's shared state.
struct SlotState {
    device: Option<Box<dyn NetDevice>>,
    /// The VF is leaving: the bond must stop using it (reported gone).
    leaving: bool,
    mac: MacAddress,
    idle_capabilities: Capabilities,
    /// Counters of VFs that left, so the slot's counters only grow.
    retired: Stats,
    /// Frames the VFs delivered through the slot (the drain watches it).
    delivered: u64,
    /// Calls of `receive` on a VF (a round with nothing delivered proves the queue empty).
    receive_rounds: u64,
}

fn add_stats(total: &mut Stats, more: &Stats) {
    total.rx_frames += more.rx_frames;
    total.rx_bytes += more.rx_bytes;
    total.tx_frames += more.tx_frames;
    total.tx_bytes += more.tx_bytes;
    total.rx_dropped_bad += more.rx_dropped_bad;
    total.tx_ring_full += more.tx_ring_full;
    total.interrupts += more.interrupts;
    total.hardware_rx_frames += more.hardware_rx_frames;
    total.hardware_tx_frames += more.hardware_tx_frames;
}

/// The bond's VF on Hyper-V: whichever VF the host paired with the synthetic NIC, or none
/// (link down). Attached once; VFs come and go inside it.
pub struct VfSlot {
    name: String,
    state: Rc<RefCell<SlotState>>,
}

impl VfSlot {
    /// True while a VF is in the slot and not leaving.
    pub fn is_filled(&self) -> bool {
        let state = self.state.borrow();
        state.device.is_some() && !state.leaving
    }
}

impl NetDevice for VfSlot {
    fn name(&self) -> &str {
        &self.name
    }

    fn mac_address(&self) -> MacAddress {
        let state = self.state.borrow();
        match &state.device {
            Some(device) => device.mac_address(),
            None => state.mac,
        }
    }

    fn capabilities(&self) -> Capabilities {
        let state = self.state.borrow();
        match &state.device {
            Some(device) => device.capabilities(),
            None => state.idle_capabilities,
        }
    }

    fn link_state(&self) -> LinkState {
        let state = self.state.borrow();
        match &state.device {
            // Down, not gone: the bond keeps receiving from it while it drains.
            Some(device) if state.leaving => match device.link_state() {
                LinkState::Gone => LinkState::Gone,
                _ => LinkState::Down,
            },
            Some(device) => device.link_state(),
            None => LinkState::Down,
        }
    }

    fn poll(&mut self, now_ns: u64) {
        if let Some(device) = self.state.borrow_mut().device.as_mut() {
            device.poll(now_ns);
        }
    }

    fn receive(&mut self, budget: usize, sink: &mut dyn FnMut(&[u8], RxMeta)) -> usize {
        let mut state = self.state.borrow_mut();
        let Some(device) = state.device.as_mut() else {
            return 0;
        };
        let delivered = device.receive(budget, sink);
        state.delivered += delivered as u64;
        state.receive_rounds += 1;
        delivered
    }

    fn can_transmit(&self) -> bool {
        let state = self.state.borrow();
        !state.leaving
            && state
                .device
                .as_ref()
                .is_some_and(|device| device.can_transmit())
    }

    fn transmit(
        &mut self,
        len: usize,
        fill: &mut dyn FnMut(&mut [u8]) -> TxMeta,
    ) -> Result<(), DeviceError> {
        let mut state = self.state.borrow_mut();
        if state.leaving {
            return Err(DeviceError::Gone);
        }
        match state.device.as_mut() {
            Some(device) => device.transmit(len, fill),
            None => Err(DeviceError::NotReady),
        }
    }

    fn flush(&mut self) {
        if let Some(device) = self.state.borrow_mut().device.as_mut() {
            device.flush();
        }
    }

    fn arm_interrupts(&mut self) -> bool {
        self.state
            .borrow_mut()
            .device
            .as_mut()
            .is_some_and(|device| device.arm_interrupts())
    }

    fn next_poll_ns(&self) -> Option<u64> {
        self.state
            .borrow()
            .device
            .as_ref()
            .and_then(|device| device.next_poll_ns())
    }

    fn stats(&self) -> Stats {
        let state = self.state.borrow();
        let mut stats = state.retired;
        if let Some(device) = &state.device {
            add_stats(&mut stats, &device.stats());
        }
        stats
    }

    fn stop(&mut self) {
        if let Some(device) = self.state.borrow_mut().device.as_mut() {
            device.stop();
        }
    }

    fn mark_gone(&mut self) {
        if let Some(device) = self.state.borrow_mut().device.as_mut() {
            device.mark_gone();
        }
    }
}

/// An opened vPCI bus.
struct OpenBus<P: VpciPort, W: RegisterIo> {
    offer: Offer,
    bus: SharedVpciBus<P, W>,
}

/// The VF in use: which bus and function it came from.
#[derive(Clone, Copy, Debug)]
struct ActiveVf {
    relid: u32,
    wslot: u32,
    serial: u32,
    /// Set once it must go.
    leaving: Option<Leaving>,
}

/// A VF on its way out.
#[derive(Clone, Copy, Debug)]
struct Leaving {
    /// When it was told to go.
    since: u64,
    /// The host waits for EJECTION_COMPLETE.
    acknowledge: bool,
    /// The slot's delivered frames then.
    delivered_at_start: u64,
    /// Once the host confirmed the synthetic path: the last time the VF delivered (the
    /// confirmation at first), and the slot's delivered frames and receive rounds then.
    quiet: Option<Quiet>,
}

#[derive(Clone, Copy, Debug)]
struct Quiet {
    since: u64,
    delivered: u64,
    rounds: u64,
}

/// A stopped function whose DELETE_INTERRUPT/RELEASE_RESOURCES answers are awaited.
#[derive(Clone, Copy, Debug)]
struct Release {
    relid: u32,
    wslot: u32,
    since: u64,
    /// EJECTION_COMPLETE follows the answers.
    acknowledge: bool,
}

/// An eject whose acknowledgement failed to go out.
#[derive(Clone, Copy, Debug)]
struct UnacknowledgedEject {
    relid: u32,
    wslot: u32,
    next_try_ns: u64,
}

/// The Hyper-V VF state machine (see the module docs).
pub struct VfHook<F: VfPlatform> {
    platform: F,
    buses: Vec<OpenBus<F::Port, F::Window>>,
    active: Option<ActiveVf>,
    /// (relid, wslot) pairs that failed or did not pair: not retried until they change.
    refused: Vec<(u32, u32)>,
    /// Functions being released.
    releasing: Vec<Release>,
    /// Ejects whose EJECTION_COMPLETE could not be sent yet.
    unacknowledged: Vec<UnacknowledgedEject>,
    slot: Rc<RefCell<SlotState>>,
    counters: HookCounters,
}

impl<F: VfPlatform> VfHook<F> {
    /// A hook for the synthetic NIC with MAC `mac` and capabilities `capabilities`, and the
    /// slot to attach to the bond.
    pub fn new(platform: F, mac: MacAddress, capabilities: Capabilities) -> (Self, VfSlot) {
        let slot = Rc::new(RefCell::new(SlotState {
            device: None,
            leaving: false,
            mac,
            idle_capabilities: capabilities,
            retired: Stats::default(),
            delivered: 0,
            receive_rounds: 0,
        }));
        let hook = VfHook {
            platform,
            buses: Vec::new(),
            active: None,
            refused: Vec::new(),
            releasing: Vec::new(),
            unacknowledged: Vec::new(),
            slot: slot.clone(),
            counters: HookCounters::default(),
        };
        let slot = VfSlot {
            name: String::from("hyperv-vf"),
            state: slot,
        };
        (hook, slot)
    }

    /// Counters.
    pub fn counters(&self) -> HookCounters {
        self.counters
    }

    /// The platform (tests inspect their fakes through it).
    pub fn platform(&self) -> &F {
        &self.platform
    }

    /// One round: netvsc's association events, new vPCI offers, vPCI bus events, pairing,
    /// and a leaving VF's progress. Called on every poll of the synthetic NIC.
    pub fn step(&mut self, synthetic: &mut dyn SyntheticSide, now_ns: u64) {
        while let Some(event) = synthetic.take_vf_event() {
            let leaving = self.start_leaving(now_ns, false);
            if let VfEvent::Withdrawn { serial_number } = event
                && let Some(active) = self.active.as_mut()
                && active.serial == serial_number
                && active.leaving.is_none()
            {
                log::info!("hyperv: VF serial {serial_number} withdrawn by the host");
                active.leaving = Some(leaving);
            }
        }
        while let Some(offer) = self.platform.take_vpci_offer() {
            match self.platform.open_bus(&offer) {
                Ok(bus) => {
                    self.counters.buses_opened += 1;
                    self.buses.push(OpenBus { offer, bus });
                }
                Err(error) => log::warn!("hyperv: vPCI relid {}: {error}", offer.relid),
            }
        }
        self.service_buses(now_ns);
        self.progress_leaving(synthetic, now_ns);
        self.progress_releases(now_ns);
        self.retry_ejects(now_ns);
        if self.active.is_none() {
            self.pair(synthetic, now_ns);
        }
    }

    fn service_buses(&mut self, now_ns: u64) {
        let mut index = 0;
        while index < self.buses.len() {
            let relid = self.buses[index].offer.relid;
            let mut rescinded = false;
            loop {
                let event = self.buses[index].bus.borrow_mut().poll();
                let Some(event) = event else { break };
                let active = self.active.filter(|active| active.relid == relid);
                match event {
                    VpciEvent::Eject { wslot } => match active {
                        Some(active) if active.wslot == wslot => {
                            log::info!("hyperv: EJECT of the VF (wslot {wslot:#x})");
                            let leaving = match active.leaving {
                                Some(leaving) => leaving,
                                None => self.start_leaving(now_ns, true),
                            };
                            if let Some(active) = self.active.as_mut() {
                                active.leaving = Some(Leaving {
                                    acknowledge: true,
                                    ..leaving
                                });
                            }
                        }
                        _ => match self
                            .releasing
                            .iter_mut()
                            .find(|release| release.relid == relid && release.wslot == wslot)
                        {
                            // Acknowledged once the release is answered.
                            Some(release) => release.acknowledge = true,
                            // Not in use: acknowledge at once.
                            None => self.complete_eject(index, wslot, now_ns),
                        },
                    },
                    VpciEvent::FunctionVanished { wslot } => {
                        if let Some(active) = active
                            && active.wslot == wslot
                            && active.leaving.is_none()
                        {
                            let leaving = self.start_leaving(now_ns, false);
                            if let Some(active) = self.active.as_mut() {
                                active.leaving = Some(leaving);
                            }
                        }
                    }
                    VpciEvent::FunctionArrived { wslot } => {
                        self.refused.retain(|&known| known != (relid, wslot));
                    }
                    VpciEvent::Rescinded => {
                        rescinded = true;
                        break;
                    }
                }
            }
            if rescinded {
                if self.active.is_some_and(|active| active.relid == relid) {
                    self.counters.rescinds += 1;
                    self.drop_vf(true);
                }
                // The host is gone: nothing to wait for, nobody to acknowledge to.
                self.releasing.retain(|release| release.relid != relid);
                self.unacknowledged.retain(|eject| eject.relid != relid);
                let closed = self.buses.remove(index);
                self.refused.retain(|&(known, _)| known != relid);
                self.platform.close_bus(&closed.offer, closed.bus);
                continue;
            }
            index += 1;
        }
    }

    /// Sends EJECTION_COMPLETE for `wslot` on bus `index`; if it cannot go out now (the ring
    /// stayed full for the bus's bounded wait), it is retried from `step` later.
    fn complete_eject(&mut self, index: usize, wslot: u32, now_ns: u64) {
        let relid = self.buses[index].offer.relid;
        let result = self.buses[index].bus.borrow_mut().complete_eject(wslot);
        match result {
            Ok(()) => self.counters.ejects_completed += 1,
            // Already acknowledged, or the function is gone from the bus: nothing to send.
            Err(VmbusError::VpciUnknownFunction { .. }) => {}
            Err(error) => {
                self.counters.eject_send_failures += 1;
                // Logged at 1, 2, 4, 8... failures: a ring that stays full must not flood.
                if self.counters.eject_send_failures.is_power_of_two() {
                    log::warn!(
                        "hyperv: EJECTION_COMPLETE of wslot {wslot:#x}: {error}; retrying every {} ms ({} failures so far)",
                        EJECT_RETRY_NS / 1_000_000,
                        self.counters.eject_send_failures
                    );
                }
                if !self
                    .unacknowledged
                    .iter()
                    .any(|eject| eject.relid == relid && eject.wslot == wslot)
                {
                    self.unacknowledged.push(UnacknowledgedEject {
                        relid,
                        wslot,
                        next_try_ns: now_ns.saturating_add(EJECT_RETRY_NS),
                    });
                }
            }
        }
    }

    /// Tries the EJECTION_COMPLETEs that failed again once their retry time has come.
    fn retry_ejects(&mut self, now_ns: u64) {
        let due: Vec<UnacknowledgedEject> = self
            .unacknowledged
            .iter()
            .copied()
            .filter(|eject| eject.next_try_ns <= now_ns)
            .collect();
        for eject in due {
            self.unacknowledged
                .retain(|known| (known.relid, known.wslot) != (eject.relid, eject.wslot));
            // A bus that went away took the function with it.
            if let Some(index) = self
                .buses
                .iter()
                .position(|bus| bus.offer.relid == eject.relid)
            {
                self.complete_eject(index, eject.wslot, now_ns);
            }
        }
    }

    fn start_leaving(&self, now_ns: u64, acknowledge: bool) -> Leaving {
        Leaving {
            since: now_ns,
            acknowledge,
            delivered_at_start: self.slot.borrow().delivered,
            quiet: None,
        }
    }

    /// A leaving VF: transmit is off (the slot reads down), the host is asked for the
    /// synthetic path; the VF is let go once the host confirmed it and the VF's receive queue
    /// stayed empty for [`DRAIN_QUIET_NS`], or at [`LEAVE_TIMEOUT_NS`].
    fn progress_leaving(&mut self, synthetic: &mut dyn SyntheticSide, now_ns: u64) {
        let Some(active) = self.active else { return };
        let Some(mut leaving) = active.leaving else {
            return;
        };
        let (delivered, rounds, device_gone) = {
            let mut slot = self.slot.borrow_mut();
            slot.leaving = true;
            let device_gone = slot
                .device
                .as_ref()
                .is_some_and(|device| device.link_state() == LinkState::Gone);
            (slot.delivered, slot.receive_rounds, device_gone)
        };
        let back = synthetic.data_path() == HostPath::Synthetic;
        let timed_out = now_ns.saturating_sub(leaving.since) >= LEAVE_TIMEOUT_NS;
        if !timed_out {
            if !back {
                // Repeats are harmless: netvsc sends only when nothing is on the way.
                synthetic.request_synthetic();
                return;
            }
            let quiet = match leaving.quiet {
                Some(quiet) if quiet.delivered == delivered => quiet,
                // Confirmed just now, or the VF still delivered: the quiet time starts again.
                _ => Quiet {
                    since: now_ns,
                    delivered,
                    rounds,
                },
            };
            leaving.quiet = Some(quiet);
            if let Some(active) = self.active.as_mut() {
                active.leaving = Some(leaving);
            }
            // A VF that reads as removed is not received from any more: nothing to drain.
            let drained = device_gone
                || (rounds > quiet.rounds && now_ns.saturating_sub(quiet.since) >= DRAIN_QUIET_NS);
            if !drained {
                return;
            }
        } else if !back {
            self.counters.leave_timeouts += 1;
            log::warn!(
                "hyperv: no synthetic data path confirmed within {} ms; letting the VF go",
                LEAVE_TIMEOUT_NS / 1_000_000
            );
        } else {
            log::warn!(
                "hyperv: the VF still received {} ms after it was told to leave; letting it go",
                LEAVE_TIMEOUT_NS / 1_000_000
            );
        }
        let drained_frames = delivered.saturating_sub(leaving.delivered_at_start);
        self.counters.drained_frames += drained_frames;
        log::info!(
            "hyperv: VF drained ({drained_frames} frame(s) received while leaving, {} ms)",
            now_ns.saturating_sub(leaving.since) / 1_000_000
        );
        self.drop_vf(false);
        self.let_function_go(active.relid, active.wslot, leaving.acknowledge, now_ns);
    }

    /// A stopped function: its interrupts deleted and its resources released, EJECTION_COMPLETE
    /// once the host answered (if it ejected the function), then its BAR space given back.
    fn let_function_go(&mut self, relid: u32, wslot: u32, acknowledge: bool, now_ns: u64) {
        let Some(index) = self.buses.iter().position(|open| open.offer.relid == relid) else {
            return;
        };
        let released = self.buses[index].bus.borrow_mut().release_function(wslot);
        match released {
            Ok(_) => {
                self.counters.releases += 1;
                self.releasing.push(Release {
                    relid,
                    wslot,
                    since: now_ns,
                    acknowledge,
                });
            }
            Err(error) => {
                log::warn!("hyperv: vPCI release of wslot {wslot:#x}: {error}");
                if acknowledge {
                    self.complete_eject(index, wslot, now_ns);
                }
            }
        }
        let offer = self.buses[index].offer;
        self.platform.function_stopped(&offer, wslot);
    }

    /// Released functions whose answers all arrived (or did not within the bound): the
    /// EJECTION_COMPLETE the host waits for.
    fn progress_releases(&mut self, now_ns: u64) {
        let mut index = 0;
        while index < self.releasing.len() {
            let release = self.releasing[index];
            let Some(bus_index) = self
                .buses
                .iter()
                .position(|open| open.offer.relid == release.relid)
            else {
                self.releasing.remove(index);
                continue;
            };
            let awaiting = self.buses[bus_index].bus.borrow().awaiting(release.wslot);
            if awaiting > 0 {
                if now_ns.saturating_sub(release.since) < RELEASE_TIMEOUT_NS {
                    index += 1;
                    continue;
                }
                self.counters.release_timeouts += 1;
                log::warn!(
                    "hyperv: {awaiting} vPCI release answer(s) for wslot {:#x} missing after {} ms",
                    release.wslot,
                    RELEASE_TIMEOUT_NS / 1_000_000
                );
                self.buses[bus_index]
                    .bus
                    .borrow_mut()
                    .stop_awaiting(release.wslot);
            }
            self.releasing.remove(index);
            if release.acknowledge {
                self.complete_eject(bus_index, release.wslot, now_ns);
            }
        }
    }

    /// Takes the VF out of the slot: stopped (no DMA in flight), or marked gone when the host
    /// already took it (then its BAR space is given back at once: nothing is released).
    fn drop_vf(&mut self, gone: bool) {
        let Some(active) = self.active.take() else {
            return;
        };
        let mut slot = self.slot.borrow_mut();
        if let Some(mut device) = slot.device.take() {
            if gone {
                device.mark_gone();
            } else {
                device.stop();
            }
            let stats = device.stats();
            add_stats(&mut slot.retired, &stats);
            log::info!(
                "hyperv: VF {} (serial {}) left the slot",
                device.name(),
                active.serial
            );
        }
        slot.leaving = false;
        drop(slot);
        if gone
            && let Some(open) = self
                .buses
                .iter()
                .find(|open| open.offer.relid == active.relid)
        {
            let offer = open.offer;
            self.platform.function_stopped(&offer, active.wslot);
        }
    }

    fn pair(&mut self, synthetic: &mut dyn SyntheticSide, now_ns: u64) {
        let Some(association) = synthetic.association().filter(|known| known.allocated) else {
            return;
        };
        let serial = association.serial_number;
        let found = self.buses.iter().find_map(|open| {
            let bus = open.bus.borrow();
            bus.functions()
                .iter()
                .find(|function| {
                    function.serial_number == serial
                        && !function.ejecting
                        && !self.refused.contains(&(open.offer.relid, function.wslot))
                        && !self.releasing.iter().any(|release| {
                            (release.relid, release.wslot) == (open.offer.relid, function.wslot)
                        })
                })
                .map(|function| (open.offer, open.bus.clone(), function.wslot))
        });
        let Some((offer, bus, wslot)) = found else {
            return;
        };
        let mut device = match self.platform.start_function(&offer, &bus, wslot) {
            Ok(device) => device,
            Err(error) => {
                self.counters.start_failures += 1;
                self.refused.push((offer.relid, wslot));
                log::warn!("hyperv: VF serial {serial} (wslot {wslot:#x}) not started: {error}");
                // Whatever the failed start got from the host (interrupts) goes back.
                if bus.borrow().interrupts_of(wslot) > 0 {
                    self.let_function_go(offer.relid, wslot, false, now_ns);
                }
                return;
            }
        };
        let pairing = netvsc::pair(
            Some(association),
            serial,
            device.mac_address(),
            synthetic.mac(),
        );
        if pairing != Some(Pairing::SerialAndMac) {
            self.counters.mac_mismatches += 1;
            self.refused.push((offer.relid, wslot));
            log::warn!(
                "hyperv: VF serial {serial} has MAC {}, the synthetic NIC {}: not paired",
                device.mac_address(),
                synthetic.mac()
            );
            device.stop();
            self.let_function_go(offer.relid, wslot, false, now_ns);
            return;
        }
        log::info!(
            "hyperv: VF {} paired with the synthetic NIC (serial {serial}, MAC {})",
            device.name(),
            device.mac_address()
        );
        self.counters.vfs_paired += 1;
        self.slot.borrow_mut().device = Some(device);
        self.active = Some(ActiveVf {
            relid: offer.relid,
            wslot,
            serial,
            leaving: None,
        });
    }
}

/// The synthetic NIC (netvsc) plus the VF hook, as the bond's synthetic path: polling it runs
/// the hook right after the NIC, so association changes are acted on in the same round.
pub struct HyperVNic<S: NetDevice + SyntheticSide, F: VfPlatform> {
    netvsc: S,
    hook: VfHook<F>,
}

impl<S: NetDevice + SyntheticSide, F: VfPlatform> HyperVNic<S, F> {
    /// netvsc with its hook.
    pub fn new(netvsc: S, hook: VfHook<F>) -> Self {
        HyperVNic { netvsc, hook }
    }

    /// The hook's counters.
    pub fn hook_counters(&self) -> HookCounters {
        self.hook.counters()
    }
}

impl<S: NetDevice + SyntheticSide, F: VfPlatform> NetDevice for HyperVNic<S, F> {
    fn name(&self) -> &str {
        self.netvsc.name()
    }

    fn mac_address(&self) -> MacAddress {
        self.netvsc.mac_address()
    }

    fn capabilities(&self) -> Capabilities {
        self.netvsc.capabilities()
    }

    fn link_state(&self) -> LinkState {
        self.netvsc.link_state()
    }

    fn poll(&mut self, now_ns: u64) {
        self.netvsc.poll(now_ns);
        self.hook.step(&mut self.netvsc, now_ns);
    }

    fn receive(&mut self, budget: usize, sink: &mut dyn FnMut(&[u8], RxMeta)) -> usize {
        self.netvsc.receive(budget, sink)
    }

    fn can_transmit(&self) -> bool {
        self.netvsc.can_transmit()
    }

    fn transmit(
        &mut self,
        len: usize,
        fill: &mut dyn FnMut(&mut [u8]) -> TxMeta,
    ) -> Result<(), DeviceError> {
        self.netvsc.transmit(len, fill)
    }

    fn flush(&mut self) {
        self.netvsc.flush();
    }

    fn arm_interrupts(&mut self) -> bool {
        self.netvsc.arm_interrupts()
    }

    fn next_poll_ns(&self) -> Option<u64> {
        self.netvsc.next_poll_ns()
    }

    fn stats(&self) -> Stats {
        self.netvsc.stats()
    }

    fn stop(&mut self) {
        self.netvsc.stop();
    }

    fn mark_gone(&mut self) {
        self.netvsc.mark_gone();
    }

    fn take_announce_request(&mut self) -> bool {
        self.netvsc.take_announce_request()
    }

    fn announce_done(&mut self) {
        self.netvsc.announce_done();
    }

    fn host_data_path(&mut self) -> Option<&mut dyn HostDataPath> {
        self.netvsc.host_data_path()
    }
}

#[cfg(test)]
mod tests;
